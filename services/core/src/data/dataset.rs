//! Building a tokenized dataset directory and reading it back.
//!
//! On-disk format (`ferrotune data format --out DIR`):
//! - `train.jsonl`, `eval.jsonl`: one example per line, `{"input_ids": [...], "labels": [...]}` (labels −100
//!   where not trained; packed rows add `"segment_ids"`, the 1-based sample of each token), or for preference data `{"chosen_input_ids", "chosen_labels", "rejected_input_ids",
//!   "rejected_labels"}`, or for unpaired (KTO) data `{"input_ids", "labels", "label": bool}`;
//! - `stats.json`: counts (samples, tokens, trained tokens, truncated, dropped by reason, first errors);
//! - `dataset_info.json`: how it was made (format, mask, max_seq_len, seed, model dir, template origin);
//! - `chat_template.jinja`: the exact template used, so training and inference can be checked to match.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::chat::TemplateOrigin;
use crate::generation::ModelDefaults;
use crate::sampling::Rng;
use crate::train::sft::SftExample;
use crate::{ChatTemplate, CoreError, Tokenizer};
use serde::{Deserialize, Serialize};

use crate::data::formats::{parse, Columns, Format, MaskMode};
use crate::data::read::read_records;
use crate::data::tokenize::{Renderer, Tokenized, TokenizedSample};
use crate::data::{DataError, Result};

/// What to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Input files (JSONL / JSON / CSV).
    pub inputs: Vec<PathBuf>,
    /// Record format.
    pub format: Format,
    /// Column renames (canonical → actual).
    pub columns: Columns,
    /// Model directory (tokenizer, chat template, EOS ids).
    pub model: PathBuf,
    /// What is trained.
    pub mask: MaskMode,
    /// Longest sequence; longer ones are truncated (and dropped if nothing trained remains).
    pub max_seq_len: usize,
    /// Fraction of samples held out for evaluation.
    pub eval_fraction: f64,
    /// Shuffle seed.
    pub seed: u64,
    /// Fail on the first bad record instead of skipping it.
    pub strict: bool,
    /// Pack several samples into each row of up to `max_seq_len` tokens (no attention across samples).
    pub pack: bool,
    /// Longest record text, in bytes (see [`crate::data::read::DEFAULT_MAX_TEXT_BYTES`]).
    pub max_text_bytes: usize,
    /// Another chat template than the model's: a name of [`crate::chat::NAMED`] or a Jinja file.
    pub chat_template: Option<String>,
}

/// Counts reported in `stats.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    /// Records read.
    pub records: usize,
    /// Examples written to train.jsonl.
    pub train: usize,
    /// Examples written to eval.jsonl.
    pub eval: usize,
    /// Tokens over all written examples.
    pub tokens: usize,
    /// Trained tokens over all written examples.
    pub trained_tokens: usize,
    /// Examples cut to max_seq_len.
    pub truncated: usize,
    /// Rows written when packing (train + eval); 0 without packing.
    pub packed_rows: usize,
    /// Records dropped, by reason.
    pub dropped: BTreeMap<String, usize>,
    /// The first errors, `file:line: reason`.
    pub errors: Vec<String>,
}

/// How a dataset was made (`dataset_info.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DatasetInfo {
    /// Record format.
    pub format: Format,
    /// Mask mode.
    pub mask: MaskMode,
    /// Truncation (and packing) length.
    pub max_seq_len: usize,
    /// Whether rows are packed.
    #[serde(default)]
    pub pack: bool,
    /// Shuffle seed.
    pub seed: u64,
    /// Model directory whose tokenizer and template were used.
    pub model: PathBuf,
    /// Where the template came from.
    pub chat_template: TemplateOrigin,
    /// Input files.
    pub inputs: Vec<PathBuf>,
}

const MAX_LISTED_ERRORS: usize = 20;

/// Builds the dataset into `out` and returns its statistics.
pub fn build(opts: &BuildOptions, out: &Path) -> Result<Stats> {
    if opts.max_seq_len < 2 {
        return Err(DataError::InvalidArgument(format!("max_seq_len must be at least 2, got {}", opts.max_seq_len)));
    }
    if !(0.0..1.0).contains(&opts.eval_fraction) {
        return Err(DataError::InvalidArgument(format!("eval_fraction must be in [0, 1), got {}", opts.eval_fraction)));
    }
    if opts.inputs.is_empty() {
        return Err(DataError::InvalidArgument("no input files".into()));
    }
    let tokenizer = Tokenizer::from_dir(&opts.model)?;
    let template = ChatTemplate::for_model(&opts.model, opts.chat_template.as_deref())?;
    let defaults = ModelDefaults::from_dir(&opts.model, &tokenizer)?;
    let eos_id = *defaults.eos_ids.first().ok_or_else(|| {
        DataError::InvalidArgument(format!("{}: the model declares no EOS token", opts.model.display()))
    })?;
    let renderer =
        Renderer { tokenizer: &tokenizer, template: &template, eos_id, eos_ids: &defaults.eos_ids, mask: opts.mask };
    let mut stats = Stats::default();
    let mut examples: Vec<TokenizedSample> = Vec::new();
    for file in &opts.inputs {
        for rec in read_records(file, opts.max_text_bytes)? {
            stats.records += 1;
            let result = rec
                .value
                .and_then(|v| parse(opts.format, &v, &opts.columns))
                .and_then(|s| renderer.sample(&s))
                .and_then(|t| fit(t, opts.max_seq_len, &mut stats.truncated));
            match result {
                Ok(t) => examples.push(t),
                Err(reason) => {
                    if opts.strict {
                        return Err(DataError::Record { file: file.clone(), line: rec.line, reason });
                    }
                    let key = reason.split(':').next().unwrap_or(&reason).to_owned();
                    *stats.dropped.entry(key).or_default() += 1;
                    if stats.errors.len() < MAX_LISTED_ERRORS {
                        stats.errors.push(format!("{}:{}: {reason}", file.display(), rec.line));
                    }
                }
            }
        }
    }
    if examples.is_empty() {
        let first = stats.errors.first().cloned().unwrap_or_else(|| "the input has no records".into());
        return Err(DataError::InvalidArgument(format!(
            "no usable records ({} read); first problem: {first}",
            stats.records
        )));
    }
    // Deterministic shuffle, then the held-out split from the front.
    let mut rng = Rng::for_row(opts.seed, 0);
    for i in (1..examples.len()).rev() {
        let j = ((rng.uniform() * (i + 1) as f64) as usize).min(i);
        examples.swap(i, j);
    }
    let n_eval = ((examples.len() as f64) * opts.eval_fraction).round() as usize;
    let n_eval = if opts.eval_fraction > 0.0 { n_eval.clamp(1, examples.len().saturating_sub(1)) } else { 0 };
    let (eval, train) = examples.split_at(n_eval);
    crate::fsx::create_dir_all(out).map_err(|e| CoreError::io(out, e))?;
    if opts.pack {
        let (tr, ev) = (pack(train, opts.max_seq_len)?, pack(eval, opts.max_seq_len)?);
        stats.packed_rows = tr.len() + ev.len();
        write_rows(&out.join("train.jsonl"), &tr)?;
        write_rows(&out.join("eval.jsonl"), &ev)?;
    } else {
        write_split(&out.join("train.jsonl"), train)?;
        write_split(&out.join("eval.jsonl"), eval)?;
    }
    stats.train = train.len();
    stats.eval = eval.len();
    for t in &examples {
        for s in seqs(t) {
            stats.tokens += s.input_ids.len();
            stats.trained_tokens += s.trained();
        }
    }
    let info = DatasetInfo {
        format: opts.format,
        mask: opts.mask,
        max_seq_len: opts.max_seq_len,
        pack: opts.pack,
        seed: opts.seed,
        model: opts.model.clone(),
        chat_template: template.origin(),
        inputs: opts.inputs.clone(),
    };
    let write = |name: &str, bytes: &[u8]| crate::weights::write_atomically(&out.join(name), bytes);
    write("stats.json", serde_json::to_string_pretty(&stats).expect("stats serialize").as_bytes())?;
    write("dataset_info.json", serde_json::to_string_pretty(&info).expect("info serializes").as_bytes())?;
    write("chat_template.jinja", template.source().as_bytes())?;
    Ok(stats)
}

fn seqs(t: &TokenizedSample) -> Vec<&Tokenized> {
    match t {
        TokenizedSample::Single(s) | TokenizedSample::Judged { seq: s, .. } => vec![s],
        TokenizedSample::Pair { chosen, rejected } => vec![chosen, rejected],
    }
}

/// Truncates to `max`; a sequence with nothing left to train is an error (the record is dropped).
fn fit(mut t: TokenizedSample, max: usize, truncated: &mut usize) -> std::result::Result<TokenizedSample, String> {
    let mut cut = false;
    match &mut t {
        TokenizedSample::Single(s) | TokenizedSample::Judged { seq: s, .. } => cut |= s.truncate(max),
        TokenizedSample::Pair { chosen, rejected } => {
            cut |= chosen.truncate(max);
            cut |= rejected.truncate(max);
        }
    }
    if seqs(&t).iter().any(|s| s.trained() == 0) {
        return Err(format!("no trained tokens after truncation to {max} tokens"));
    }
    *truncated += usize::from(cut);
    Ok(t)
}

/// Greedy packing in dataset order: a row takes samples while they fit in `max` tokens.
fn pack(examples: &[TokenizedSample], max: usize) -> Result<Vec<SftExample>> {
    let mut rows = Vec::new();
    let mut cur: Vec<SftExample> = Vec::new();
    let mut len = 0;
    let flush = |cur: &mut Vec<SftExample>, rows: &mut Vec<SftExample>| {
        if !cur.is_empty() {
            rows.push(SftExample::pack(&cur.iter().collect::<Vec<_>>()));
            cur.clear();
        }
    };
    for t in examples {
        let TokenizedSample::Single(s) = t else {
            return Err(DataError::InvalidArgument(
                "preference pairs and unpaired (KTO) examples cannot be packed".into(),
            ));
        };
        if len + s.input_ids.len() > max {
            flush(&mut cur, &mut rows);
            len = 0;
        }
        len += s.input_ids.len();
        cur.push(SftExample::new(s.input_ids.clone(), s.labels.clone()));
    }
    flush(&mut cur, &mut rows);
    Ok(rows)
}

fn write_rows(path: &Path, rows: &[SftExample]) -> Result<()> {
    let mut buf = Vec::new();
    for r in rows {
        let line = serde_json::json!({"input_ids": r.input_ids, "labels": r.labels, "segment_ids": r.segment_ids});
        writeln!(buf, "{line}").expect("writing to a Vec");
    }
    Ok(crate::weights::write_atomically(path, &buf)?)
}

fn write_split(path: &Path, examples: &[TokenizedSample]) -> Result<()> {
    let mut buf = Vec::new();
    for t in examples {
        let line = match t {
            TokenizedSample::Single(s) => serde_json::json!({"input_ids": s.input_ids, "labels": s.labels}),
            TokenizedSample::Pair { chosen, rejected } => serde_json::json!({
                "chosen_input_ids": chosen.input_ids, "chosen_labels": chosen.labels,
                "rejected_input_ids": rejected.input_ids, "rejected_labels": rejected.labels,
            }),
            TokenizedSample::Judged { seq, desirable } => {
                serde_json::json!({"input_ids": seq.input_ids, "labels": seq.labels, "label": desirable})
            }
        };
        writeln!(buf, "{line}").expect("writing to a Vec");
    }
    Ok(crate::weights::write_atomically(path, &buf)?)
}

/// Reads `split` (`train` or `eval`) of a dataset directory as SFT examples.
pub fn load_split(dir: &Path, split: &str) -> Result<Vec<SftExample>> {
    let path = dir.join(format!("{split}.jsonl"));
    let text = crate::fsx::read_to_string(&path).map_err(|e| CoreError::io(&path, e))?;
    #[derive(Deserialize)]
    struct Line {
        input_ids: Vec<u32>,
        labels: Vec<i64>,
        #[serde(default)]
        segment_ids: Vec<u32>,
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let bad = |reason: String| DataError::Record { file: path.clone(), line: i + 1, reason };
            let x: Line = serde_json::from_str(l).map_err(|e| bad(format!("not a tokenized SFT example: {e}")))?;
            if x.input_ids.len() != x.labels.len()
                || x.input_ids.is_empty()
                || !(x.segment_ids.is_empty() || x.segment_ids.len() == x.input_ids.len())
            {
                return Err(bad(format!(
                    "{} ids, {} labels, {} segment ids",
                    x.input_ids.len(),
                    x.labels.len(),
                    x.segment_ids.len()
                )));
            }
            Ok(SftExample { input_ids: x.input_ids, labels: x.labels, segment_ids: x.segment_ids })
        })
        .collect()
}

/// Reads `split` of a dataset directory as KTO's judged examples (completion labelled, desirable or not): an
/// unpaired dataset (`--format unpaired`), or a preference one unpaired as TRL does (each pair gives its
/// chosen sequence, desirable, then its rejected one, undesirable).
pub fn load_judged(dir: &Path, split: &str) -> Result<Vec<(SftExample, bool)>> {
    let path = dir.join(format!("{split}.jsonl"));
    let text = crate::fsx::read_to_string(&path).map_err(|e| CoreError::io(&path, e))?;
    if text.lines().find(|l| !l.trim().is_empty()).is_some_and(|l| l.contains("\"chosen_input_ids\"")) {
        return Ok(load_pairs(dir, split)?.into_iter().flat_map(|(c, r)| [(c, true), (r, false)]).collect());
    }
    #[derive(Deserialize)]
    struct Line {
        input_ids: Vec<u32>,
        labels: Vec<i64>,
        label: bool,
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let bad = |reason: String| DataError::Record { file: path.clone(), line: i + 1, reason };
            let x: Line = serde_json::from_str(l).map_err(|e| {
                bad(format!("not a tokenized unpaired example (format the data with --format unpaired): {e}"))
            })?;
            if x.input_ids.len() != x.labels.len() || x.input_ids.is_empty() {
                return Err(bad("ids and labels differ in length, or the sequence is empty".into()));
            }
            Ok((SftExample::new(x.input_ids, x.labels), x.label))
        })
        .collect()
}

/// Reads `split` of a preference dataset directory as (chosen, rejected) pairs, completions labelled.
pub fn load_pairs(dir: &Path, split: &str) -> Result<Vec<(SftExample, SftExample)>> {
    let path = dir.join(format!("{split}.jsonl"));
    let text = crate::fsx::read_to_string(&path).map_err(|e| CoreError::io(&path, e))?;
    #[derive(Deserialize)]
    struct Line {
        chosen_input_ids: Vec<u32>,
        chosen_labels: Vec<i64>,
        rejected_input_ids: Vec<u32>,
        rejected_labels: Vec<i64>,
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            let bad = |reason: String| DataError::Record { file: path.clone(), line: i + 1, reason };
            let x: Line = serde_json::from_str(l).map_err(|e| {
                bad(format!("not a tokenized preference pair (format the data with --format preference): {e}"))
            })?;
            if x.chosen_input_ids.len() != x.chosen_labels.len()
                || x.rejected_input_ids.len() != x.rejected_labels.len()
                || x.chosen_input_ids.is_empty()
                || x.rejected_input_ids.is_empty()
            {
                return Err(bad("ids and labels differ in length, or a side is empty".into()));
            }
            Ok((
                SftExample::new(x.chosen_input_ids, x.chosen_labels),
                SftExample::new(x.rejected_input_ids, x.rejected_labels),
            ))
        })
        .collect()
}
