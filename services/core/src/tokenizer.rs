//! The model's tokenizer: `tokenizer.json` loaded with the HF `tokenizers` crate, used exactly as
//! transformers' fast tokenizer is (special tokens added only if the tokenizer's post-processor adds them).

use std::path::Path;

/// Token ids and each token's byte range in the encoded text.
pub type IdsWithOffsets = (Vec<u32>, Vec<(usize, usize)>);

use crate::error::{CoreError, Result};

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

impl Tokenizer {
    /// Loads `dir/tokenizer.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::from_file(&dir.join("tokenizer.json"))
    }

    /// Loads a tokenizer.json file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = crate::fsx::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => CoreError::format(path, "tokenizer.json not found"),
            _ => CoreError::io(path, e),
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| CoreError::format(path, format!("cannot load tokenizer: {e}")))?;
        Ok(Self { inner })
    }

    /// Token ids of `text`, like `tokenizer(text).input_ids` in transformers.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| CoreError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` without the tokenizer's special tokens (how transformers tokenizes a rendered
    /// chat template: the template already contains them).
    pub fn encode_no_special(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, false).map_err(|e| CoreError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` (no special tokens added) with each token's byte range in `text`.
    pub fn encode_with_offsets(&self, text: &str) -> Result<IdsWithOffsets> {
        let enc = self.inner.encode(text, false).map_err(|e| CoreError::Tokenizer(e.to_string()))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    /// Text of `ids`, special tokens included or skipped.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.inner.decode(ids, skip_special_tokens).map_err(|e| CoreError::Tokenizer(e.to_string()))
    }

    /// Number of tokens including added ones.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string, if it is in the vocabulary.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }
}
/// Text of a token stream as it grows, for streaming: each [`StreamDecoder::push`] returns the text the new
/// token completes. A multi-byte character split over several byte-level tokens is held back until it is
/// whole (the decoded text then ends in U+FFFD), so streamed pieces always concatenate to the full text.
#[derive(Debug, Clone, Default)]
pub struct StreamDecoder {
    ids: Vec<u32>,
    printed: usize,
}

impl StreamDecoder {
    /// Adds token `id`; the text it completes (empty while a character is incomplete).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> String {
        self.ids.push(id);
        let Ok(all) = tok.decode(&self.ids, true) else { return String::new() };
        if all.ends_with('\u{FFFD}') || all.len() <= self.printed || !all.is_char_boundary(self.printed) {
            return String::new();
        }
        let text = all[self.printed..].to_owned();
        self.printed = all.len();
        text
    }
}
