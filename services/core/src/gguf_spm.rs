//! A GGUF's SentencePiece vocabulary (`tokenizer.ggml.model = llama`) rebuilt as a `tokenizer.json`, the way
//! transformers' GGUF loader builds it (`integrations/gguf/gguf_tokenizer_mapping.py`): a BPE with byte fallback
//! over the file's tokens, merges rebuilt from the vocabulary because the file has none — every split of a
//! token into two tokens, ranked by the merged token's score — and the control / user-defined tokens matched
//! whole. Gemma files (`gemma_tokenizer`, `GemmaTokenizer`): spaces normalised to `▁` with no prefix, the
//! token's file position as its priority (Gemma's scores do not follow its merge order). Other files
//! (`sentencepiece_tokenizer`, `LlamaTokenizer`: Llama 2, TinyLlama, Mistral): the file's scores as priorities,
//! a `▁` prepended to the text (two when it starts with a space), as SentencePiece's dummy prefix does.
//! Checked token for token against transformers on fixture vocabularies (`tests/fixtures/make_spm_gguf.py`,
//! `tests/fixtures/make_tiny_llama_spm.py`).

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

/// The merges a vocabulary implies (transformers' `generate_merges` with the given per-token scores, a
/// repeated token taking its last score): for each token in order of first appearance, every split into two
/// vocabulary tokens (by their ids); then all of them ordered by the merged token's score (highest first),
/// then longer left, then longer right parts, ties kept in that order.
fn merges(tokens: &[String], vocab: &HashMap<&str, usize>, scores: &[f64]) -> Vec<(String, String)> {
    use std::cmp::Reverse;
    let mut seen = std::collections::HashSet::new();
    let mut all: Vec<(&str, &str, f64)> = Vec::new();
    for t in tokens {
        if !seen.insert(t.as_str()) {
            continue;
        }
        let score = scores[vocab[t.as_str()]];
        let mut local: Vec<(&str, &str, f64)> = t
            .char_indices()
            .skip(1)
            .map(|(i, _)| (&t[..i], &t[i..]))
            .filter(|(l, r)| vocab.contains_key(l) && vocab.contains_key(r))
            .map(|(l, r)| (l, r, score))
            .collect();
        local.sort_by_key(|(l, r, _)| (vocab[l], vocab[r]));
        all.extend(local);
    }
    all.sort_by(|a, b| {
        // As Python compares floats: −0.0 and 0.0 are equal (the stable sort keeps their order).
        b.2.partial_cmp(&a.2)
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| Reverse(a.0.chars().count()).cmp(&Reverse(b.0.chars().count())))
            .then_with(|| Reverse(a.1.chars().count()).cmp(&Reverse(b.1.chars().count())))
    });
    all.into_iter().map(|(l, r, _)| (l.to_owned(), r.to_owned())).collect()
}

/// Which SentencePiece family a vocabulary is rebuilt as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpmFlavor {
    /// Gemma: position-ranked merges, no dummy prefix, whitespace-run tokens respelled.
    Gemma,
    /// Llama 2 / TinyLlama / Mistral: score-ranked merges, dummy prefix.
    Llama,
}

/// `tokenizer.json` of a SentencePiece vocabulary. `types` are the GGUF token types, `scores` its scores (unused
/// for Gemma), `specials` the tokens the file names as bos / eos / unk / pad, `unk` its unknown token;
/// `post_processor` adds BOS (or is null).
pub fn spm_tokenizer_json(
    flavor: SpmFlavor,
    tokens: &[String],
    scores: &[f64],
    types: &[i64],
    specials: &[&str],
    unk: Option<&str>,
    post_processor: Json,
) -> Json {
    let tokens: Vec<String> = match flavor {
        SpmFlavor::Gemma => tokens.iter().map(|t| respell(t)).collect(),
        SpmFlavor::Llama => tokens.to_vec(),
    };
    // As a Python dict built in file order: a repeated token keeps its first place and its last id.
    let vocab: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
    let scores: Vec<f64> = match flavor {
        SpmFlavor::Gemma => (0..tokens.len()).map(|i| -(i as f64)).collect(),
        SpmFlavor::Llama => scores.iter().copied().chain(std::iter::repeat(0.0)).take(tokens.len()).collect(),
    };
    let merges: Vec<Json> = merges(&tokens, &vocab, &scores).into_iter().map(|(l, r)| json!([l, r])).collect();
    // Special: the tokenizer class's own (GemmaTokenizer's five; the file's bos / eos / unk / pad for Llama)
    // when the vocabulary has them, and the file's control tokens; plain added: its user-defined tokens. All
    // matched on the raw text, never normalised.
    let own: Vec<&str> = match flavor {
        SpmFlavor::Gemma => vec!["<unk>", "<bos>", "<eos>", "<pad>", "<mask>"],
        SpmFlavor::Llama => specials.to_vec(),
    };
    let mut added: Vec<(usize, &str, bool)> = Vec::new();
    for name in own {
        if let Some(&id) = vocab.get(name) {
            if !added.iter().any(|(i, _, _)| *i == id) {
                added.push((id, name, true));
            }
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
    let space = json!({"type": "Replace", "pattern": {"String": " "}, "content": "▁"});
    let (normalizer, pre_tokenizer, unk, strip) = match flavor {
        SpmFlavor::Gemma => (
            space,
            json!({"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious", "invert": false}),
            json!("<unk>"),
            None,
        ),
        // LlamaTokenizer: spaces as `▁`, a text starting with one gets a second, and Metaspace prepends one to
        // every text that does not start with `▁`; the decoder strips that first space again.
        SpmFlavor::Llama => (
            json!({"type": "Sequence", "normalizers": [space,
                {"type": "Replace", "pattern": {"Regex": "\\A▁"}, "content": "▁▁"}]}),
            json!({"type": "Sequence", "pretokenizers": [
                {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": false}]}),
            unk.map_or(Json::Null, |u| json!(u)),
            Some(json!({"type": "Strip", "content": " ", "start": 1, "stop": 0})),
        ),
    };
    let mut decoders = vec![
        json!({"type": "Replace", "pattern": {"String": "▁"}, "content": " "}),
        json!({"type": "ByteFallback"}),
        json!({"type": "Fuse"}),
    ];
    decoders.extend(strip);
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab_json, "merges": merges},
    })
}
