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

/// The merges a vocabulary implies (transformers' `generate_merges` with scores): for each token in order of
/// first appearance, every split into two vocabulary tokens (by their ids), then all of them ordered by the
/// token's score, highest first, then longer left, then longer right parts, ties kept in that order.
fn merges(tokens: &[String], vocab: &HashMap<&str, usize>, score: &HashMap<&str, i64>) -> Vec<(String, String)> {
    let mut seen = std::collections::HashSet::new();
    let mut all: Vec<(&str, &str, i64)> = Vec::new();
    for t in tokens {
        if !seen.insert(t.as_str()) {
            continue;
        }
        let s = score[t.as_str()];
        let mut local: Vec<(&str, &str, i64)> = t
            .char_indices()
            .skip(1)
            .map(|(i, _)| (&t[..i], &t[i..]))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (l, r, s))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        all.extend(local);
    }
    let key = |x: &(&str, &str, i64)| (x.2, x.0.chars().count(), x.1.chars().count());
    all.sort_by_key(|x| std::cmp::Reverse(key(x)));
    all.into_iter().map(|(l, r, _)| (l.to_owned(), r.to_owned())).collect()
}

/// `tokenizer.json` of a Gemma SentencePiece vocabulary. `types` are the GGUF token types; `bos` is the BOS
/// token to prepend when `add_bos`.
pub fn gemma_tokenizer_json(tokens: &[String], types: &[i64], bos: Option<(&str, usize)>, add_bos: bool) -> Json {
    let tokens: Vec<String> = tokens.iter().map(|t| respell(t)).collect();
    // As a Python dict built in file order: a repeated token keeps its first place and its last id.
    let mut vocab: HashMap<&str, usize> = HashMap::new();
    let mut score: HashMap<&str, i64> = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        vocab.insert(t, i);
        score.insert(t, -(i as i64));
    }
    let merges: Vec<Json> = merges(&tokens, &vocab, &score).into_iter().map(|(l, r)| json!([l, r])).collect();
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
    let post_processor = match (bos, add_bos) {
        (Some((b, id)), true) => json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b: {"id": b, "ids": [id], "tokens": [b]}}}),
        _ => Json::Null,
    };
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
