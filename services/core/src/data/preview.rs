//! Preview: the first records rendered through the chat template with the trained tokens marked.

use std::path::PathBuf;

use crate::generation::ModelDefaults;
use crate::{ChatTemplate, Tokenizer};

use crate::data::formats::{parse, Columns, Format, MaskMode};
use crate::data::read::read_records;
use crate::data::tokenize::{Renderer, Tokenized, TokenizedSample};
use crate::data::{DataError, Result};

/// One previewed record.
#[derive(Debug, Clone, Default)]
pub struct PreviewItem {
    /// `file:line`.
    pub location: String,
    /// Rendered text, trained runs in `[[…]]` (chosen response for preference records).
    pub text: String,
    /// Rejected response (preference records).
    pub rejected: String,
    /// Tokens.
    pub tokens: usize,
    /// Trained tokens.
    pub trained: usize,
    /// Why the record is unusable.
    pub error: String,
}

/// Renders the first `n` records of `inputs`.
pub fn preview(
    inputs: &[PathBuf],
    format: Format,
    model: &std::path::Path,
    mask: MaskMode,
    cols: &Columns,
    n: usize,
) -> Result<Vec<PreviewItem>> {
    let tok = Tokenizer::from_dir(model)?;
    let tmpl = ChatTemplate::from_dir(model)?;
    let eos = ModelDefaults::from_dir(model, &tok)?.eos_ids;
    let eos_id = *eos
        .first()
        .ok_or_else(|| DataError::InvalidArgument(format!("{}: the model declares no EOS token", model.display())))?;
    let r = Renderer { tokenizer: &tok, template: &tmpl, eos_id, eos_ids: &eos, mask };
    let mut out = vec![];
    for file in inputs {
        for rec in read_records(file, crate::data::read::DEFAULT_MAX_TEXT_BYTES)? {
            if out.len() == n {
                return Ok(out);
            }
            let location = format!("{}:{}", file.display(), rec.line);
            let t = rec.value.and_then(|v| parse(format, &v, cols)).and_then(|s| r.sample(&s));
            out.push(match t {
                Ok(TokenizedSample::Single(s) | TokenizedSample::Judged { seq: s, .. }) => PreviewItem {
                    location,
                    text: highlight(&tok, &s)?,
                    tokens: s.input_ids.len(),
                    trained: s.trained(),
                    ..Default::default()
                },
                Ok(TokenizedSample::Pair { chosen, rejected }) => PreviewItem {
                    location,
                    text: highlight(&tok, &chosen)?,
                    rejected: highlight(&tok, &rejected)?,
                    tokens: chosen.input_ids.len(),
                    trained: chosen.trained(),
                    ..Default::default()
                },
                Err(e) => PreviewItem { location, error: e, ..Default::default() },
            });
        }
    }
    if out.is_empty() {
        let names: Vec<String> = inputs.iter().map(|p| p.display().to_string()).collect();
        return Err(DataError::InvalidArgument(format!("{}: no records to preview", names.join(", "))));
    }
    Ok(out)
}

/// The decoded sequence with trained runs wrapped in `[[…]]`.
pub fn highlight(tok: &Tokenizer, t: &Tokenized) -> Result<String> {
    let mut out = String::new();
    let mut i = 0;
    while i < t.input_ids.len() {
        let trained = t.labels[i] >= 0;
        let j = (i..t.input_ids.len()).find(|&j| (t.labels[j] >= 0) != trained).unwrap_or(t.input_ids.len());
        let text = tok.decode(&t.input_ids[i..j], false)?;
        if trained {
            out.push_str(&format!("[[{text}]]"));
        } else {
            out.push_str(&text);
        }
        i = j;
    }
    Ok(out)
}
