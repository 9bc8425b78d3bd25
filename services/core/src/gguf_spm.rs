//! A Gemma GGUF's SentencePiece vocabulary (`tokenizer.ggml.model = llama`) rebuilt as a `tokenizer.json`, the
//! way transformers' GGUF loader builds it (`gemma_tokenizer` in `integrations/gguf/gguf_tokenizer_mapping.py`
//! and `GemmaTokenizer`): a BPE with byte fallback over the file's tokens, spaces normalised to `▁`, merges
//! rebuilt from the vocabulary because the file has none — every split of a token into two tokens, the
//! token's file position as its priority (Gemma's scores do not follow its merge order) — and the control /
//! user-defined tokens matched whole. Checked token for token against transformers on a fixture vocabulary
//! (`tests/fixtures/make_spm_gguf.py`).

use std::collections::HashMap;

use serde_json::{json, Value as Json};

/// GGUF token types (llama.cpp's `llama_token_type`).
const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

/// A token of two or more characters, all whitespace, with a space among them, is stored as real whitespace
/// while the tokenizer looks it up as `▁`s: respelled one `▁` per character.
fn respell(t: &str) -> String {
    if t.contains(' ') && t.trim().is_empty() {
        "▁".repeat(t.chars().count())
    } else {
        t.to_owned()
    }
}

/// The merges a vocabulary implies (transformers' `generate_merges`, with each token's score its negated
/// position as Gemma's builder gives it): for each token in order of first appearance, every split into two
/// vocabulary tokens (by their ids); then all of them ordered by the merged token's id (lowest = highest
/// score first), then longer left, then longer right parts, ties kept in that order.
fn merges(tokens: &[String], vocab: &HashMap<&str, usize>) -> Vec<(String, String)> {
    use std::cmp::Reverse;
    let mut seen = std::collections::HashSet::new();
    let mut all: Vec<(&str, &str, usize)> = Vec::new();
    for t in tokens {
        if !seen.insert(t.as_str()) {
            continue;
        }
        let id = vocab[t.as_str()];
        let mut local: Vec<(&str, &str, usize)> = t
            .char_indices()
            .skip(1)
            .map(|(i, _)| (&t[..i], &t[i..]))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (l, r, id))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        all.extend(local);
    }
    all.sort_by_key(|&(l, r, id)| (id, Reverse(l.chars().count()), Reverse(r.chars().count())));
    all.into_iter().map(|(l, r, _)| (l.to_owned(), r.to_owned())).collect()
}

/// `tokenizer.json` of a Gemma SentencePiece vocabulary. `types` are the GGUF token types; `post_processor`
/// adds BOS (or is null).
pub fn gemma_tokenizer_json(tokens: &[String], types: &[i64], post_processor: Json) -> Json {
    let tokens: Vec<String> = tokens.iter().map(|t| respell(t)).collect();
    // As a Python dict built in file order: a repeated token keeps its first place and its last id.
    let vocab: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let merges: Vec<Json> = merges(&tokens, &vocab).into_iter().map(|(l, r)| json!([l, r])).collect();
    // Special: GemmaTokenizer's own five (when the vocabulary has them) and the file's control tokens;
    // plain added: its user-defined tokens. All matched on the raw text, never normalised.
    let mut added: Vec<(usize, &str, bool)> = Vec::new();
    for name in ["<unk>", "<bos>", "<eos>", "<pad>", "<mask>"] {
        if let Some(&id) = vocab.get(name) {
            added.push((id, name, true));
        }
    }
    for (t, &ty) in tokens.iter().zip(types) {
        if ty == CONTROL || ty == USER_DEFINED {
            let id = vocab[t.as_str()];
            if !added.iter().any(|(i, _, _)| *i == id) {
                added.push((id, t, ty == CONTROL));
            }
        }
    }
    added.sort_by_key(|(id, _, _)| *id);
    let added: Vec<Json> = added
        .into_iter()
        .map(|(id, content, special)| {
            json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
                   "normalized": false, "special": special})
        })
        .collect();
    let vocab_json: serde_json::Map<String, Json> = vocab.iter().map(|(t, &i)| ((*t).to_owned(), json!(i))).collect();
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false},
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>", "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab_json, "merges": merges},
    })
}
