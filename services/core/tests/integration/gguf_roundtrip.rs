//! GGUF import end to end on a tiny model: a HF fixture is written as a llama.cpp-style GGUF (q/k rows
//! permuted the way llama.cpp's converter does, byte-level BPE tokenizer metadata), imported back, and
//! must reproduce transformers' logits. Damaged GGUFs give errors naming the tensor.

use std::path::Path;

use ferrotune_core::gguf_import::import_gguf;
use ferrotune_core::weights::WeightFiles;
use ferrotune_core::{load_model, Tokenizer};
use tch::{Device, Kind, Tensor};

use crate::common::{max_abs_diff, reference, tiny_dir};

enum Kv {
    Bool(bool),
    U32(u32),
    F32(f32),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
}

/// A minimal GGUF v3 writer (test-only), alignment 32.
#[derive(Default)]
struct Writer {
    kv: Vec<(String, Kv)>,
    tensors: Vec<(String, Vec<usize>, u32, Vec<u8>)>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend((s.len() as u64).to_le_bytes());
    b.extend(s.as_bytes());
}

impl Writer {
    fn kv(&mut self, k: &str, v: Kv) {
        self.kv.push((k.to_owned(), v));
    }

    fn bytes(&self) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((self.tensors.len() as u64).to_le_bytes());
        b.extend((self.kv.len() as u64).to_le_bytes());
        for (k, v) in &self.kv {
            put_str(&mut b, k);
            match v {
                Kv::Bool(x) => {
                    b.extend(7u32.to_le_bytes());
                    b.push(u8::from(*x));
                }
                Kv::U32(x) => {
                    b.extend(4u32.to_le_bytes());
                    b.extend(x.to_le_bytes());
                }
                Kv::F32(x) => {
                    b.extend(6u32.to_le_bytes());
                    b.extend(x.to_le_bytes());
                }
                Kv::Str(s) => {
                    b.extend(8u32.to_le_bytes());
                    put_str(&mut b, s);
                }
                Kv::Strs(a) => {
                    b.extend(9u32.to_le_bytes());
                    b.extend(8u32.to_le_bytes());
                    b.extend((a.len() as u64).to_le_bytes());
                    a.iter().for_each(|s| put_str(&mut b, s));
                }
                Kv::I32s(a) => {
                    b.extend(9u32.to_le_bytes());
                    b.extend(5u32.to_le_bytes());
                    b.extend((a.len() as u64).to_le_bytes());
                    a.iter().for_each(|x| b.extend(x.to_le_bytes()));
                }
                Kv::F32s(a) => {
                    b.extend(9u32.to_le_bytes());
                    b.extend(6u32.to_le_bytes());
                    b.extend((a.len() as u64).to_le_bytes());
                    a.iter().for_each(|x| b.extend(x.to_le_bytes()));
                }
            }
        }
        let mut offset = 0u64;
        for (name, shape, ty, data) in &self.tensors {
            put_str(&mut b, name);
            b.extend((shape.len() as u32).to_le_bytes());
            shape.iter().rev().for_each(|&d| b.extend((d as u64).to_le_bytes()));
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
            offset += (data.len() as u64).div_ceil(32) * 32;
        }
        b.resize(b.len().div_ceil(32) * 32, 0);
        for (_, _, _, data) in &self.tensors {
            b.extend(data);
            b.resize(b.len().div_ceil(32) * 32, 0);
        }
        b
    }
}

/// GPT-2's byte → printable-char table (the byte-level BPE alphabet).
fn byte_chars() -> Vec<char> {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut n = 0;
    (0..256u32)
        .map(|b| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                n += 1;
                char::from_u32(255 + n).unwrap()
            }
        })
        .collect()
}

fn f32_bytes(t: &Tensor) -> Vec<u8> {
    let v: Vec<f32> = Vec::try_from(t.to_kind(Kind::Float).contiguous().view(-1)).unwrap();
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// The `llama-linear-sharded` fixture as a llama.cpp would write it.
fn fixture_as_gguf() -> Writer {
    fixture_as_gguf_of("llama-linear-sharded", "llama")
}

/// A tiny fixture as llama.cpp's converter writes its architecture `arch` (llama: q/k rows permuted and
/// linear rope scaling ×2, as `llama-linear-sharded` has; qwen3: q/k norms, no permutation; gemma3: Gemma's
/// norm names, every norm stored as 1 + w, the window and linear scaling ×2 of the global layers).
fn fixture_as_gguf_of(name: &str, arch: &str) -> Writer {
    let dir = tiny_dir(name);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let files = WeightFiles::open_dir(&dir).unwrap();
    let (heads, kv_heads) =
        (cfg["num_attention_heads"].as_i64().unwrap(), cfg["num_key_value_heads"].as_i64().unwrap());
    let mut w = Writer::default();
    let u = |k: &str| cfg[k].as_u64().unwrap() as u32;
    let a = |k: &str| format!("{arch}.{k}");
    let theta = cfg["rope_theta"]
        .as_f64()
        .or_else(|| cfg["rope_parameters"]["rope_theta"].as_f64())
        .or_else(|| cfg["rope_parameters"]["full_attention"]["rope_theta"].as_f64())
        .unwrap();
    w.kv("general.architecture", Kv::Str(arch.into()));
    w.kv(&a("block_count"), Kv::U32(u("num_hidden_layers")));
    w.kv(&a("context_length"), Kv::U32(u("max_position_embeddings")));
    w.kv(&a("embedding_length"), Kv::U32(u("hidden_size")));
    w.kv(&a("feed_forward_length"), Kv::U32(u("intermediate_size")));
    w.kv(&a("attention.head_count"), Kv::U32(heads as u32));
    w.kv(&a("attention.head_count_kv"), Kv::U32(kv_heads as u32));
    w.kv(&a("attention.key_length"), Kv::U32(u("head_dim")));
    w.kv(&a("rope.freq_base"), Kv::F32(theta as f32));
    if arch == "gemma3" {
        w.kv(&a("attention.sliding_window"), Kv::U32(u("sliding_window")));
    }
    if arch == "llama" || arch == "gemma3" {
        w.kv(&a("rope.scaling.type"), Kv::Str("linear".into()));
        w.kv(&a("rope.scaling.factor"), Kv::F32(2.0));
    }
    w.kv(&a("attention.layer_norm_rms_epsilon"), Kv::F32(cfg["rms_norm_eps"].as_f64().unwrap() as f32));
    w.kv("tokenizer.ggml.model", Kv::Str("gpt2".into()));
    w.kv("tokenizer.ggml.pre", Kv::Str("default".into()));
    w.kv("tokenizer.ggml.tokens", Kv::Strs(byte_chars().iter().map(|c| c.to_string()).collect()));
    w.kv("tokenizer.ggml.token_type", Kv::I32s(vec![1; 256]));
    w.kv("tokenizer.ggml.merges", Kv::Strs(vec![]));
    w.kv("tokenizer.ggml.bos_token_id", Kv::U32(1));
    w.kv("tokenizer.ggml.eos_token_id", Kv::U32(2));
    w.kv("tokenizer.chat_template", Kv::Str("{% for m in messages %}{{ m['content'] }}{% endfor %}".into()));
    let mut names: Vec<&str> = files.names().collect();
    names.sort();
    for hf in names {
        let t = files.load_raw(hf).unwrap();
        let mut gg = hf
            .replace("model.embed_tokens", "token_embd")
            .replace("model.norm", "output_norm")
            .replace("lm_head", "output")
            .replace("model.layers.", "blk.");
        if arch == "gemma3" {
            for (a, b) in [
                ("post_attention_layernorm", "post_attention_norm"),
                ("pre_feedforward_layernorm", "ffn_norm"),
                ("post_feedforward_layernorm", "post_ffw_norm"),
            ] {
                gg = gg.replace(a, b);
            }
        }
        for (a, b) in [
            ("self_attn.q_proj", "attn_q"),
            ("self_attn.k_proj", "attn_k"),
            ("self_attn.v_proj", "attn_v"),
            ("self_attn.o_proj", "attn_output"),
            ("self_attn.q_norm", "attn_q_norm"),
            ("self_attn.k_norm", "attn_k_norm"),
            ("post_attention_layernorm", "ffn_norm"),
            ("input_layernorm", "attn_norm"),
            ("mlp.gate_proj", "ffn_gate"),
            ("mlp.up_proj", "ffn_up"),
            ("mlp.down_proj", "ffn_down"),
        ] {
            gg = gg.replace(a, b);
        }
        // llama.cpp's permute: rows of each head reordered from halves to interleaved pairs.
        let n = if arch != "llama" || gg.contains("_norm") {
            None
        } else if gg.contains("attn_q") {
            Some(heads)
        } else if gg.contains("attn_k") {
            Some(kv_heads)
        } else {
            None
        };
        let t = match n {
            Some(n) => {
                let (out, inp) = (t.size()[0], t.size()[1]);
                t.reshape([n, 2, out / n / 2, inp]).transpose(1, 2).reshape([out, inp])
            }
            None => t,
        };
        let t = if arch == "gemma3" && gg.ends_with("norm.weight") { t + 1.0 } else { t };
        let shape = t.size().iter().map(|&d| d as usize).collect();
        w.tensors.push((gg, shape, 0, f32_bytes(&t)));
    }
    w
}

fn write(w: &Writer, dir: &Path) -> std::path::PathBuf {
    let p = dir.join("tiny.gguf");
    std::fs::write(&p, w.bytes()).unwrap();
    p
}

#[test]
fn imported_gguf_reproduces_transformers_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = write(&fixture_as_gguf(), tmp.path());
    let out = tmp.path().join("hf");
    let report = import_gguf(&gguf, &out).unwrap();
    assert_eq!(report.architecture, "llama");
    let model = load_model(&out, Kind::Float, Device::Cpu).unwrap();
    assert!(!model.cfg.tie_word_embeddings, "output.weight present → untied");
    let (ids, want) = reference("llama-linear-sharded");
    let got = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-4, "max |Δlogit| {d}");

    let tok = Tokenizer::from_dir(&out).unwrap();
    assert_eq!(tok.encode("hi!").unwrap(), vec![104, 105, 33]);
    assert_eq!(tok.encode(" é").unwrap().len(), 3, "space + two UTF-8 bytes");
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(tc["eos_token"], byte_chars()[2].to_string());
    assert!(tc["chat_template"].as_str().unwrap().contains("messages"));
}

#[test]
fn imported_qwen3_gguf_reproduces_transformers_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = write(&fixture_as_gguf_of("qwen3-qknorm", "qwen3"), tmp.path());
    let out = tmp.path().join("hf");
    assert_eq!(import_gguf(&gguf, &out).unwrap().architecture, "qwen3");
    let model = load_model(&out, Kind::Float, Device::Cpu).unwrap();
    assert!(model.layers[0].self_attn.qk_norm.is_some() && model.cfg.qkv_bias && model.cfg.o_bias);
    let (ids, want) = reference("qwen3-qknorm");
    let d = max_abs_diff(&tch::no_grad(|| model.forward(&ids, None, None)).unwrap(), &want);
    assert!(d < 1e-5, "max |Δlogit| {d}");
}

#[test]
fn imported_gemma3_gguf_reproduces_transformers_logits() {
    let tmp = tempfile::tempdir().unwrap();
    let gguf = write(&fixture_as_gguf_of("gemma3-gguf-shape", "gemma3"), tmp.path());
    let out = tmp.path().join("hf");
    assert_eq!(import_gguf(&gguf, &out).unwrap().architecture, "gemma3");
    let model = load_model(&out, Kind::Float, Device::Cpu).unwrap();
    let local: Vec<bool> = model.layers.iter().map(|l| l.local).collect();
    assert_eq!(local, vec![true, true, true, true, true, false], "every sixth layer global");
    let (ids, want) = reference("gemma3-gguf-shape");
    let d = max_abs_diff(&tch::no_grad(|| model.forward(&ids, None, None)).unwrap(), &want);
    assert!(d < 1e-5, "max |Δlogit| {d}");
}

/// The SentencePiece vocabulary of fixture dir `spm` (`vocab.json`: tokens, types, scores, special ids) in place
/// of the tokenizer metadata of the tiny model `model` written as a `arch` GGUF, with the fixture's
/// `reference.json`. `specials` are (GGUF key, vocab.json field) of the special ids to write.
fn spm_gguf(
    spm: &str,
    model: &str,
    arch: &str,
    specials: &[(&str, &str)],
) -> (Writer, serde_json::Value, serde_json::Value) {
    let fx = |f: &str| -> serde_json::Value {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures").join(spm).join(f);
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    let (vocab, reference) = (fx("vocab.json"), fx("reference.json"));
    let mut w = fixture_as_gguf_of(model, arch);
    w.kv.retain(|(k, _)| !k.starts_with("tokenizer."));
    let tokens: Vec<String> =
        vocab["tokens"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect();
    let types: Vec<i32> = vocab["token_type"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap() as i32).collect();
    w.kv("tokenizer.ggml.model", Kv::Str("llama".into()));
    w.kv("tokenizer.ggml.pre", Kv::Str("default".into()));
    w.kv("tokenizer.ggml.tokens", Kv::Strs(tokens));
    w.kv("tokenizer.ggml.token_type", Kv::I32s(types));
    for (key, field) in specials {
        w.kv(&format!("tokenizer.ggml.{key}_token_id"), Kv::U32(vocab[*field].as_u64().unwrap() as u32));
    }
    (w, vocab, reference)
}

/// The imported tokenizer in `out` gives the reference's ids for every fixture string (without specials) and
/// decodes them back to its text; returns the tokenizer.
fn tokenizes_as_reference(out: &Path, reference: &serde_json::Value) -> Tokenizer {
    let tok = Tokenizer::from_dir(out).unwrap();
    for case in reference["strings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode_no_special(text).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want, false).unwrap(), case["decoded"].as_str().unwrap(), "{text:?}");
    }
    tok
}

/// A Gemma SentencePiece vocabulary (`tests/fixtures/make_spm_gguf.py`) imported with a tiny Gemma 3: the
/// tokenizer it becomes gives transformers' ids for every fixture string (with and without BOS) and decodes
/// them back to transformers' text.
#[test]
fn gemma_sentencepiece_vocabulary_tokenizes_as_transformers() {
    let specials = [("bos", "bos"), ("eos", "eos"), ("unknown", "unk"), ("padding", "pad")];
    let (w, _, reference) = spm_gguf("spm", "gemma3-gguf-shape", "gemma3", &specials);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("hf");
    import_gguf(&write(&w, tmp.path()), &out).unwrap();
    let tok = tokenizes_as_reference(&out, &reference);
    let with_bos: Vec<u32> =
        reference["with_bos"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect();
    assert_eq!(tok.encode("hello").unwrap(), with_bos);
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!((tc["bos_token"].as_str(), tc["add_bos_token"].as_bool()), (Some("<bos>"), Some(true)));
}

/// A Llama SentencePiece vocabulary (TinyLlama-style, trained by `tests/fixtures/make_tiny_llama_spm.py` and
/// written as llama.cpp's converter does: tokens, scores, types, no merges): the tokenizer the import rebuilds
/// gives transformers' ids for every fixture string, decodes them back to its text, and adds BOS as llama.cpp
/// does; without its scores the file is refused by name.
#[test]
fn llama_sentencepiece_vocabulary_tokenizes_as_transformers() {
    let specials = [("bos", "bos"), ("eos", "eos"), ("unknown", "unk")];
    let (mut w, vocab, reference) = spm_gguf("spm-llama", "llama-linear-sharded", "llama", &specials);
    let tmp = tempfile::tempdir().unwrap();
    let e = import_gguf(&write(&w, tmp.path()), &tmp.path().join("no-scores")).unwrap_err().to_string();
    assert!(e.contains("tokenizer.ggml.scores"), "{e}");
    let scores: Vec<f32> = vocab["scores"].as_array().unwrap().iter().map(|t| t.as_f64().unwrap() as f32).collect();
    w.kv("tokenizer.ggml.scores", Kv::F32s(scores));
    let out = tmp.path().join("hf");
    import_gguf(&write(&w, tmp.path()), &out).unwrap();
    let tok = tokenizes_as_reference(&out, &reference);
    // llama.cpp adds BOS to a SentencePiece vocabulary (transformers 5.24's GGUF loader leaves it out).
    let mut with_bos = vec![1u32];
    with_bos.extend(reference["with_bos"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32));
    assert_eq!(tok.encode("hello world").unwrap(), with_bos);
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!((tc["bos_token"].as_str(), tc["unk_token"].as_str()), (Some("<s>"), Some("<unk>")));
}

/// Byte-level BPE vocabularies with llama.cpp's `llama-bpe` (Llama 3), `qwen2` and `gpt-2` pre-tokenizers
/// (`tests/fixtures/make_bpe_pre_gguf.py`, references from transformers' GGUF tokenizer loader): the imported
/// tokenizer gives transformers' ids for every fixture string, with and without the specials, and decodes them
/// back to its text.
#[test]
fn byte_level_vocabularies_with_llama3_qwen2_and_gpt2_pre_tokenizers_tokenize_as_transformers() {
    for case in ["llama-bpe", "qwen2", "gpt-2"] {
        let fx = |f: &str| -> serde_json::Value {
            let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/bpe-pre").join(case).join(f);
            serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
        };
        let (vocab, reference) = (fx("vocab.json"), fx("reference.json"));
        let arch = vocab["architecture"].as_str().unwrap();
        // The tokenizer does not depend on the architecture (transformers picks it by `pre`): the tiny Llama's
        // tensors under the case's architecture name (gpt2 files go in as llama).
        let mut w = fixture_as_gguf_of("llama-linear-sharded", if arch == "qwen2" { "qwen2" } else { "llama" });
        w.kv.retain(|(k, _)| !k.starts_with("tokenizer."));
        let strs = |k: &str| -> Vec<String> {
            vocab[k].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_owned()).collect()
        };
        let types: Vec<i32> =
            vocab["token_type"].as_array().unwrap().iter().map(|t| t.as_i64().unwrap() as i32).collect();
        w.kv("tokenizer.ggml.model", Kv::Str("gpt2".into()));
        w.kv("tokenizer.ggml.pre", Kv::Str(vocab["pre"].as_str().unwrap().into()));
        w.kv("tokenizer.ggml.tokens", Kv::Strs(strs("tokens")));
        w.kv("tokenizer.ggml.token_type", Kv::I32s(types));
        w.kv("tokenizer.ggml.merges", Kv::Strs(strs("merges")));
        for (key, field) in [("bos", "bos"), ("eos", "eos"), ("padding", "pad")] {
            if let Some(id) = vocab[field].as_u64() {
                w.kv(&format!("tokenizer.ggml.{key}_token_id"), Kv::U32(id as u32));
            }
        }
        if let Some(b) = vocab["add_bos_token"].as_bool() {
            w.kv("tokenizer.ggml.add_bos_token", Kv::Bool(b));
        }
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("hf");
        import_gguf(&write(&w, tmp.path()), &out).unwrap();
        let tok = Tokenizer::from_dir(&out).unwrap();
        let ids = |v: &serde_json::Value| -> Vec<u32> {
            v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()
        };
        for s in reference["strings"].as_array().unwrap() {
            let text = s["text"].as_str().unwrap();
            assert_eq!(tok.encode_no_special(text).unwrap(), ids(&s["ids"]), "{case}: {text:?}");
            assert_eq!(tok.encode(text).unwrap(), ids(&s["ids_with_specials"]), "{case}: {text:?} with specials");
            assert_eq!(tok.decode(&ids(&s["ids"]), false).unwrap(), s["decoded"].as_str().unwrap(), "{case}: {text:?}");
        }
    }
}

#[test]
fn truncated_gguf_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let w = fixture_as_gguf();
    let last = w.tensors.last().unwrap().0.clone();
    let mut b = w.bytes();
    b.truncate(b.len() - 100);
    let p = tmp.path().join("cut.gguf");
    std::fs::write(&p, b).unwrap();
    let e = import_gguf(&p, &tmp.path().join("out")).unwrap_err().to_string();
    assert!(e.contains("cut.gguf") && e.contains("truncated") && e.contains(&last), "{e}");
    assert!(!tmp.path().join("out").exists(), "a failed import leaves no output");
}

#[test]
fn unsupported_tensor_type_names_the_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = fixture_as_gguf();
    let t = w.tensors.iter_mut().find(|t| t.0 == "blk.1.ffn_up.weight").unwrap();
    t.2 = 16; // IQ2_XXS
    let p = write(&w, tmp.path());
    let e = import_gguf(&p, &tmp.path().join("out")).unwrap_err().to_string();
    assert!(e.contains("blk.1.ffn_up.weight") && e.contains("IQ*") && e.contains("Q6_K"), "{e}");
}

#[test]
fn corrupt_headers_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("x.gguf");
    std::fs::write(&p, b"NOPE and some more bytes").unwrap();
    assert!(import_gguf(&p, &tmp.path().join("o")).unwrap_err().to_string().contains("not a GGUF file"));
    // valid magic and version, then an absurd key length
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(u64::MAX.to_le_bytes());
    std::fs::write(&p, &b).unwrap();
    let e = import_gguf(&p, &tmp.path().join("o")).unwrap_err().to_string();
    assert!(e.contains("corrupt GGUF") && e.contains("impossible length"), "{e}");
    std::fs::write(&p, &b[..10]).unwrap();
    assert!(import_gguf(&p, &tmp.path().join("o")).unwrap_err().to_string().contains("truncated GGUF"));
    let missing = import_gguf(&tmp.path().join("nope.gguf"), &tmp.path().join("o")).unwrap_err().to_string();
    assert!(missing.contains("nope.gguf"), "{missing}");
}
