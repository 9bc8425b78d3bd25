//! `ferrotune import gguf`: a llama.cpp GGUF file → a Hugging Face model directory (config.json,
//! model.safetensors in f32, tokenizer.json, tokenizer_config.json with the chat template,
//! generation_config.json), loadable by transformers and by [`crate::models::load_model`].
//!
//! llama.cpp's converter permutes the rows of `attn_q` / `attn_k` of Llama-architecture models so that its
//! RoPE kernel can rotate adjacent pairs; HF rotates halves. For a dequantized `[out, in]` weight the HF
//! layout is `w.reshape(n, head_dim/2, 2, in).transpose(1, 2).reshape(out, in)` with n the number of query
//! (resp. key/value) heads.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{json, Value as Json};

use crate::error::{CoreError, Result};
use crate::gguf::{GgufFile, Value};
use crate::weights::{unique_suffix, RawTensor};

/// What an import produced.
#[derive(Debug, Clone, Serialize)]
pub struct ImportReport {
    /// The HF model directory written.
    pub path: PathBuf,
    /// GGUF architecture (`llama`, `qwen2`, `qwen3`, `gemma3`).
    pub architecture: String,
    /// Number of tensors written.
    pub tensors: usize,
    /// GGUF tensors not carried over (with why), e.g. `rope_freqs.weight`.
    pub skipped: Vec<String>,
}

/// The file every import writes; a directory holding it is an earlier import that a new one may replace.
pub const IMPORT_MARKER: &str = "ferrotune_import.json";

/// Imports `gguf_path` into `out_dir`. Files are written to a temporary sibling directory and renamed into
/// place, so a failed import leaves no half-written model. `out_dir` must be missing, empty, or an earlier
/// import (it holds [`IMPORT_MARKER`]); never the working directory or a directory holding the input.
pub fn import_gguf(gguf_path: &Path, out_dir: &Path) -> Result<ImportReport> {
    check_output_dir(gguf_path, out_dir)?;
    let g = GgufFile::open(gguf_path)?;
    let arch = g.get_str("general.architecture")?.to_owned();
    if !matches!(arch.as_str(), "llama" | "qwen2" | "qwen3" | "gemma3") {
        return Err(CoreError::format(
            gguf_path,
            format!("unsupported architecture `{arch}` (supported: llama, qwen2, qwen3, gemma3)"),
        ));
    }
    let cfg = hf_config(&g, &arch)?;
    let tmp = tmp_sibling(out_dir)?;
    let result = (|| {
        let (tensors, skipped) = write_weights(&g, &arch, &cfg, &tmp.join("model.safetensors"))?;
        write_json(&tmp.join("config.json"), &cfg)?;
        write_tokenizer(&g, &tmp)?;
        let gen = json!({
            "bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "pad_token_id": cfg["pad_token_id"],
        });
        write_json(&tmp.join("generation_config.json"), &gen)?;
        let source = json!({
            "source": gguf_path.display().to_string(), "gguf_version": g.version, "architecture": arch,
            "tensor_types": tensor_type_counts(&g), "skipped": skipped,
            "note": "weights dequantized to f32; attn_q/attn_k rows un-permuted to HF layout",
        });
        write_json(&tmp.join(IMPORT_MARKER), &source)?;
        Ok((tensors, skipped))
    })();
    let (tensors, skipped) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = crate::fsx::remove_dir_all(&tmp);
            return Err(e);
        }
    };
    if let Err(e) = replace_dir(&tmp, out_dir) {
        let _ = crate::fsx::remove_dir_all(&tmp);
        return Err(e);
    }
    Ok(ImportReport { path: out_dir.to_path_buf(), architecture: arch, tensors, skipped })
}

/// What an output directory holds, as far as replacing it is concerned.
#[derive(PartialEq)]
enum OutDir {
    /// Nothing there.
    Missing,
    /// An empty directory.
    Empty,
    /// An earlier import (it holds [`IMPORT_MARKER`]).
    EarlierImport,
    /// Something else: never replaced.
    Other,
}

fn out_dir_state(out_dir: &Path) -> Result<OutDir> {
    Ok(match crate::fsx::read_dir(out_dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => OutDir::Missing,
        Err(e) => return Err(CoreError::io(out_dir, e)),
        Ok(entries) if entries.is_empty() => OutDir::Empty,
        Ok(entries) if entries.iter().any(|e| e.name == IMPORT_MARKER) => OutDir::EarlierImport,
        Ok(_) => OutDir::Other,
    })
}

/// Refuses an output directory an import must not replace (see [`import_gguf`]), before any work is done.
fn check_output_dir(gguf_path: &Path, out_dir: &Path) -> Result<()> {
    let refuse = |why: &str| Err(CoreError::InvalidArgument(format!("--out {}: {why}", out_dir.display())));
    let Ok(meta) = crate::fsx::metadata(out_dir) else { return Ok(()) };
    if !meta.is_dir() {
        return refuse("exists and is not a directory");
    }
    let real = out_dir.canonicalize().map_err(|e| CoreError::io(out_dir, e))?;
    if std::env::current_dir().is_ok_and(|cwd| cwd.canonicalize().is_ok_and(|c| c.starts_with(&real))) {
        return refuse("is the working directory (or holds it); name a new directory for the model");
    }
    if gguf_path.canonicalize().is_ok_and(|g| g.starts_with(&real)) {
        return refuse("holds the input GGUF; name a new directory for the model");
    }
    if out_dir_state(out_dir)? == OutDir::Other {
        return refuse("holds files that are not an earlier import; name a new or empty directory");
    }
    Ok(())
}

/// Moves the finished import `tmp` to `out_dir`: a missing or empty directory is simply taken; an earlier
/// import is first moved aside, then removed once the new one is in place.
fn replace_dir(tmp: &Path, out_dir: &Path) -> Result<()> {
    let io = |e| CoreError::io(out_dir, e);
    let old = match out_dir_state(out_dir)? {
        OutDir::Missing => None,
        OutDir::Empty => {
            std::fs::remove_dir(out_dir).map_err(io)?;
            None
        }
        OutDir::EarlierImport => {
            let aside = tmp.with_extension("replaced");
            crate::fsx::rename(out_dir, &aside).map_err(io)?;
            Some(aside)
        }
        OutDir::Other => {
            return Err(CoreError::InvalidArgument(format!(
                "--out {}: files appeared there during the import; nothing was replaced",
                out_dir.display()
            )))
        }
    };
    crate::fsx::rename(tmp, out_dir).map_err(io)?;
    if let Some(old) = old {
        crate::fsx::remove_dir_all(&old).map_err(|e| CoreError::io(&old, e))?;
    }
    Ok(())
}

fn tmp_sibling(out_dir: &Path) -> Result<PathBuf> {
    let parent = out_dir.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    crate::fsx::create_dir_all(parent).map_err(|e| CoreError::io(parent, e))?;
    let name = out_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let tmp = parent.join(format!(".{name}.importing-{}", unique_suffix()));
    if tmp.exists() {
        crate::fsx::remove_dir_all(&tmp).map_err(|e| CoreError::io(&tmp, e))?;
    }
    crate::fsx::create_dir_all(&tmp).map_err(|e| CoreError::io(&tmp, e))?;
    Ok(tmp)
}

fn write_json(path: &Path, v: &Json) -> Result<()> {
    let text = serde_json::to_string_pretty(v).expect("JSON values serialize");
    crate::fsx::write(path, text + "\n").map_err(|e| CoreError::io(path, e))
}

fn tensor_type_counts(g: &GgufFile) -> Json {
    let mut m = std::collections::BTreeMap::<String, usize>::new();
    for t in &g.tensors {
        let name = match t.ty {
            Ok(ty) => format!("{ty:?}"),
            Err(id) => format!("type{id}"),
        };
        *m.entry(name).or_default() += 1;
    }
    json!(m)
}

/// HF config.json for the GGUF's architecture, from its metadata.
fn hf_config(g: &GgufFile, arch: &str) -> Result<Json> {
    let k = |s: &str| format!("{arch}.{s}");
    let heads = g.get_u64(&k("attention.head_count"))?;
    let kv_heads = g.metadata.get(&k("attention.head_count_kv")).and_then(Value::as_u64).unwrap_or(heads);
    let hidden = g.get_u64(&k("embedding_length"))?;
    let vocab = match g.metadata.get(&k("vocab_size")).and_then(Value::as_u64) {
        Some(v) => v,
        None => g.get("tokenizer.ggml.tokens")?.as_array().map(|a| a.len() as u64).unwrap_or(0),
    };
    let head_dim = g.metadata.get(&k("attention.key_length")).and_then(Value::as_u64).unwrap_or(hidden / heads.max(1));
    let tied = g.tensor("output.weight").is_none();
    let id = |key: &str| g.metadata.get(key).and_then(Value::as_u64);
    let mut rope_scaling = Json::Null;
    if let Some(ty) = g.metadata.get(&k("rope.scaling.type")).and_then(Value::as_str) {
        match ty {
            "none" => {}
            "linear" => rope_scaling = json!({"rope_type": "linear", "factor": g.get_f64(&k("rope.scaling.factor"))?}),
            other => {
                return Err(CoreError::format(
                    g.path(),
                    format!("unsupported rope scaling `{other}` (supported: none, linear)"),
                ))
            }
        }
    }
    if let Some(t) = g.tensor("rope_freqs.weight") {
        if !rope_scaling.is_null() {
            return Err(CoreError::format(g.path(), "both `rope.scaling.type` and a `rope_freqs.weight` tensor"));
        }
        // Llama 3's band-wise scaling, kept by llama.cpp as per-frequency divisors.
        let factors: Vec<f32> = g.dequantize(t)?;
        let theta = g.metadata.get(&k("rope.freq_base")).and_then(Value::as_f64).unwrap_or(10000.0);
        let original =
            g.metadata.get(&k("rope.scaling.original_context_length")).and_then(Value::as_f64).unwrap_or(8192.0);
        if factors.iter().any(|f| (f - 1.0).abs() > 1e-6) {
            let (factor, low, high) = crate::gguf_rope::llama3_from_factors(head_dim as i64, theta, &factors, original)
                .ok_or_else(|| {
                    CoreError::format(
                        g.path(),
                        format!(
                            "tensor `rope_freqs.weight`: {} divisors that no Llama 3 rope scaling gives (head_dim {head_dim})",
                            factors.len()
                        ),
                    )
                })?;
            rope_scaling = json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                                  "high_freq_factor": high, "original_max_position_embeddings": original});
        }
    }
    let (model_type, class) = match arch {
        "qwen2" => ("qwen2", "Qwen2ForCausalLM"),
        "qwen3" => ("qwen3", "Qwen3ForCausalLM"),
        "gemma3" => ("gemma3_text", "Gemma3ForCausalLM"),
        _ => ("llama", "LlamaForCausalLM"),
    };
    let mut cfg = json!({
        "architectures": [class],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": g.get_u64(&k("feed_forward_length"))?,
        "num_hidden_layers": g.get_u64(&k("block_count"))?,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": g.get_u64(&k("context_length"))?,
        "rms_norm_eps": g.get_f64(&k("attention.layer_norm_rms_epsilon"))?,
        "rope_theta": g.metadata.get(&k("rope.freq_base")).and_then(Value::as_f64).unwrap_or(10000.0),
        "rope_scaling": rope_scaling.clone(),
        "tie_word_embeddings": tied,
        "attention_bias": g.tensor("blk.0.attn_q.bias").is_some(),
        "mlp_bias": false,
        "bos_token_id": id("tokenizer.ggml.bos_token_id"),
        "eos_token_id": id("tokenizer.ggml.eos_token_id"),
        "pad_token_id": id("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    });
    if arch == "gemma3" {
        // llama.cpp's Gemma 3: every sixth layer global, the others windowed with their own RoPE base
        // (`rope.freq_base_swa`, 10000 when absent); attention scaled by 1/√head_dim.
        let layers = cfg["num_hidden_layers"].as_u64().unwrap_or(0);
        let types: Vec<&str> =
            (0..layers).map(|i| if (i + 1) % 6 == 0 { "full_attention" } else { "sliding_attention" }).collect();
        let global = match rope_scaling {
            Json::Null => json!({"rope_type": "default", "rope_theta": cfg["rope_theta"]}),
            mut r => {
                r["rope_theta"] = cfg["rope_theta"].clone();
                r
            }
        };
        let local_theta = g.metadata.get(&k("rope.freq_base_swa")).and_then(Value::as_f64).unwrap_or(10000.0);
        let c = cfg.as_object_mut().expect("object");
        for key in ["hidden_act", "rope_theta", "rope_scaling", "mlp_bias"] {
            c.remove(key);
        }
        c.insert("hidden_activation".into(), json!("gelu_pytorch_tanh"));
        c.insert("query_pre_attn_scalar".into(), json!(head_dim));
        c.insert("sliding_window".into(), json!(g.get_u64(&k("attention.sliding_window"))?));
        c.insert("layer_types".into(), json!(types));
        c.insert(
            "rope_parameters".into(),
            json!({"full_attention": global, "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}}),
        );
    }
    Ok(cfg)
}

/// llama.cpp's names of the tensors outside the blocks, with HF's.
pub(crate) const FIXED_TENSORS: [(&str, &str); 3] = [
    ("token_embd.weight", "model.embed_tokens.weight"),
    ("output_norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
];

/// llama.cpp's module names inside a block (`blk.N.<module>`), with HF's (`model.layers.N.<module>`), for the
/// Llama layout (Gemma 3 names three norms differently, see [`hf_name`]).
pub(crate) const LAYER_MODULES: [(&str, &str); 11] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
];

/// Gemma's norms whose llama.cpp names differ from the Llama layout's (`ffn_norm` is the MLP's input norm) or
/// that only Gemma has.
pub(crate) const GEMMA_NORMS: [(&str, &str); 3] = [
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
];

/// llama.cpp tensor name → HF name (and, for llama q/k, the head count to un-permute with). Gemma's norm
/// names differ: `ffn_norm` is the MLP's input norm (`pre_feedforward_layernorm`) and the outputs of attention
/// and MLP have their own (`post_attention_norm`, `post_ffw_norm`).
fn hf_name(gguf: &str, arch: &str, heads: u64, kv_heads: u64) -> Option<(String, Option<u64>)> {
    if let Some((_, hf)) = FIXED_TENSORS.iter().find(|(g, _)| *g == gguf) {
        return Some(((*hf).to_owned(), None));
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: u64 = layer.parse().ok()?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let gemma = GEMMA_NORMS.iter().find(|(g, _)| arch == "gemma3" && *g == module);
    let hf = match gemma {
        Some((_, hf)) => hf,
        None => LAYER_MODULES.iter().find(|(g, _)| *g == module)?.1,
    };
    let permute = match module {
        "attn_q" => Some(heads),
        "attn_k" => Some(kv_heads),
        _ => None,
    };
    // Only llama-architecture GGUFs carry the permutation (qwen2's converter leaves q/k alone), and only
    // weights/biases of q and k are affected.
    let permute = if arch == "llama" { permute } else { None };
    Some((format!("model.layers.{layer}.{hf}.{suffix}"), permute))
}

/// llama.cpp's q/k row permutation on a row-major `[out, inner]` tensor (`inner` = 1 for biases): row (h, i, j) of
/// llama.cpp's layout (i < head_dim/2, j < 2) is row (h, j, i) of HF's. `to_hf` undoes it (import); otherwise it
/// is applied ([`crate::gguf_export`]).
pub(crate) fn permute_rows(w: &[f32], out: usize, inner: usize, n_heads: usize, to_hf: bool) -> Vec<f32> {
    let head_dim = out / n_heads;
    let half = head_dim / 2;
    let mut r = vec![0f32; w.len()];
    for h in 0..n_heads {
        for i in 0..half {
            for j in 0..2 {
                let (gguf, hf) = (h * head_dim + i * 2 + j, h * head_dim + j * half + i);
                let (src, dst) = if to_hf { (gguf, hf) } else { (hf, gguf) };
                r[dst * inner..(dst + 1) * inner].copy_from_slice(&w[src * inner..(src + 1) * inner]);
            }
        }
    }
    r
}

/// Undoes llama.cpp's q/k row permutation (see [`permute_rows`]).
fn unpermute(w: &[f32], out: usize, inner: usize, n_heads: usize) -> Vec<f32> {
    permute_rows(w, out, inner, n_heads, true)
}

fn write_weights(g: &GgufFile, arch: &str, cfg: &Json, out: &Path) -> Result<(usize, Vec<String>)> {
    let heads = cfg["num_attention_heads"].as_u64().unwrap_or(1);
    let kv_heads = cfg["num_key_value_heads"].as_u64().unwrap_or(heads);
    let mut tensors: Vec<(String, RawTensor)> = Vec::new();
    let mut skipped = Vec::new();
    for t in &g.tensors {
        if t.name == "rope_freqs.weight" {
            continue; // in config.json as `rope_scaling` (see [`hf_config`])
        }
        let Some((name, permute)) = hf_name(&t.name, arch, heads, kv_heads) else {
            skipped.push(format!("{} (no HF equivalent)", t.name));
            continue;
        };
        let mut data = g.dequantize(t)?;
        if let Some(n) = permute {
            let out_rows = t.shape[0];
            let inner = t.numel() / out_rows.max(1);
            if n == 0 || !out_rows.is_multiple_of(n as usize) || !(out_rows / n as usize).is_multiple_of(2) {
                return Err(CoreError::format(
                    g.path(),
                    format!("tensor `{}`: {out_rows} rows do not split into {n} heads of even size", t.name),
                ));
            }
            data = unpermute(&data, out_rows, inner, n as usize);
        }
        if arch == "gemma3" && name.ends_with("norm.weight") {
            // llama.cpp stores Gemma's (1 + w) norm scales as 1 + w; HF stores w.
            data.iter_mut().for_each(|x| *x -= 1.0);
        }
        let bytes = data.iter().flat_map(|x| x.to_le_bytes()).collect();
        tensors.push((name, RawTensor { dtype: safetensors::Dtype::F32, shape: t.shape.clone(), data: bytes }));
    }
    if !tensors.iter().any(|(n, _)| n == "model.embed_tokens.weight") {
        return Err(CoreError::format(g.path(), "tensor `token_embd.weight` is missing"));
    }
    let meta = std::collections::HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let n = tensors.len();
    crate::fsx::checked_for_write(out).map_err(|e| CoreError::io(out, e))?;
    safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.clone(), v)), Some(meta), out)
        .map_err(|e| CoreError::format(out, format!("cannot write safetensors: {e}")))?;
    Ok((n, skipped))
}

/// tokenizer.json + tokenizer_config.json for a GGUF byte-level BPE (`tokenizer.ggml.model == "gpt2"`) or a
/// Gemma SentencePiece vocabulary (`llama` in a `gemma*` file, [`crate::gguf_spm`]).
fn write_tokenizer(g: &GgufFile, dir: &Path) -> Result<()> {
    let model = g.get_str("tokenizer.ggml.model")?;
    let arch = g.get_str("general.architecture")?;
    let spm = model == "llama";
    if model != "gpt2" && !spm {
        return Err(CoreError::format(
            g.path(),
            format!(
                "tokenizer model `{model}` of a `{arch}` file is not supported yet (supported: gpt2 byte-level BPE, \
                 llama SentencePiece)"
            ),
        ));
    }
    let strings = |key: &str| -> Result<Vec<String>> {
        let arr = g
            .get(key)?
            .as_array()
            .ok_or_else(|| CoreError::format(g.path(), format!("metadata `{key}` is not an array")))?;
        arr.iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| CoreError::format(g.path(), format!("metadata `{key}` holds a non-string")))
            })
            .collect()
    };
    let tokens = strings("tokenizer.ggml.tokens")?;
    let types: Vec<i64> = match g.metadata.get("tokenizer.ggml.token_type").and_then(Value::as_array) {
        Some(a) => a
            .iter()
            .map(|v| match v {
                Value::I64(x) => *x,
                Value::U64(x) => *x as i64,
                _ => 1,
            })
            .collect(),
        None => vec![1; tokens.len()],
    };
    if types.len() != tokens.len() {
        return Err(CoreError::format(g.path(), format!("{} token types for {} tokens", types.len(), tokens.len())));
    }
    let id = |key: &str| g.metadata.get(key).and_then(Value::as_u64).map(|i| i as usize);
    let tok_at = |i: Option<usize>| i.and_then(|i| tokens.get(i)).cloned();
    let (bos, eos, pad, unk) = (
        tok_at(id("tokenizer.ggml.bos_token_id")),
        tok_at(id("tokenizer.ggml.eos_token_id")),
        tok_at(id("tokenizer.ggml.padding_token_id")),
        tok_at(id("tokenizer.ggml.unknown_token_id")),
    );
    // A SentencePiece vocabulary that does not say otherwise gets BOS (llama.cpp's rule, which transformers
    // follows).
    let add_bos = match g.metadata.get("tokenizer.ggml.add_bos_token") {
        Some(Value::Bool(b)) => *b,
        _ => spm,
    };
    let bos_template = match (&bos, add_bos) {
        (Some(b), true) => Some(json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": b, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": b, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {b: {"id": b, "ids": [id("tokenizer.ggml.bos_token_id")], "tokens": [b]}}})),
        _ => None,
    };
    // Checked for every file, as before SentencePiece vocabularies came (which do not use it: such a file
    // naming another pre-tokenizer is refused rather than imported differently from transformers).
    let pre_tokenizer = byte_level_pre_tokenizer(g)?;
    let tokenizer = if spm {
        let flavor = if arch.starts_with("gemma") {
            crate::gguf_spm::SpmFlavor::Gemma
        } else {
            crate::gguf_spm::SpmFlavor::Llama
        };
        let scores: Vec<f64> = match g.metadata.get("tokenizer.ggml.scores").and_then(Value::as_array) {
            Some(a) if a.len() == tokens.len() => a.iter().map(|v| v.as_f64().unwrap_or(0.0)).collect(),
            Some(a) => {
                return Err(CoreError::format(
                    g.path(),
                    format!("{} token scores for {} tokens", a.len(), tokens.len()),
                ))
            }
            None if flavor == crate::gguf_spm::SpmFlavor::Gemma => vec![0.0; tokens.len()],
            None => {
                return Err(CoreError::format(
                    g.path(),
                    "metadata `tokenizer.ggml.scores` is missing: a SentencePiece vocabulary needs its scores",
                ))
            }
        };
        let specials: Vec<&str> = [&bos, &eos, &unk, &pad].into_iter().flatten().map(String::as_str).collect();
        crate::gguf_spm::spm_tokenizer_json(
            flavor,
            &tokens,
            &scores,
            &types,
            &specials,
            unk.as_deref(),
            bos_template.unwrap_or(Json::Null),
        )
    } else {
        let post = bos_template.unwrap_or_else(
            || json!({"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": false, "use_regex": true}),
        );
        byte_level_tokenizer_json(&tokens, &types, strings("tokenizer.ggml.merges")?, pre_tokenizer, post)
    };
    write_json(&dir.join("tokenizer.json"), &tokenizer)?;
    let mut tc = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": add_bos,
        "add_eos_token": false,
        "clean_up_tokenization_spaces": false,
        "model_max_length": g.metadata.get(&format!("{arch}.context_length")).and_then(Value::as_u64),
        "bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk,
    });
    if let Some(t) = g.metadata.get("tokenizer.chat_template").and_then(Value::as_str) {
        tc["chat_template"] = json!(t);
    }
    write_json(&dir.join("tokenizer_config.json"), &tc)
}

/// Llama 3's split: up to three digits per piece, newline runs kept whole.
pub(crate) const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split: Llama 3's with one digit per piece.
pub(crate) const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The byte-level pre-tokenizer `tokenizer.ggml.pre` names; any other name is refused.
fn byte_level_pre_tokenizer(g: &GgufFile) -> Result<Json> {
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let pre = g.metadata.get("tokenizer.ggml.pre").and_then(Value::as_str).unwrap_or("default");
    // transformers' GGUF loader (`GGUF_PRE_TOKENIZER_SPLITS`): a regex split before a byte-level step without
    // its own regex, for the pre-tokenizers llama.cpp names.
    let split = |regex: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]})
    };
    Ok(match pre {
        "llama-bpe" | "llama3" | "llama-v3" | "dbrx" | "smaug-bpe" | "falcon3" => split(LLAMA3_SPLIT),
        "qwen2" | "deepseek-r1-qwen" | "megrez" => split(QWEN2_SPLIT),
        "default" | "gpt2" | "gpt-2" => byte_level.clone(),
        // SmolLM's tokenizer isolates every digit before the GPT-2 byte-level split.
        "smollm" => {
            json!({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": true}, byte_level]})
        }
        other => {
            return Err(CoreError::format(
                g.path(),
                format!("pre-tokenizer `{other}` is not supported yet (supported: default, gpt2, gpt-2, smollm, llama-bpe, qwen2)"),
            ))
        }
    })
}

/// GPT-2's byte → printable character table (`bytes_to_unicode`): the byte-level BPE alphabet.
fn byte_level_alphabet() -> [char; 256] {
    let printable = |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut table = ['\0'; 256];
    let mut extra = 0;
    for b in 0..256u32 {
        table[b as usize] = if printable(b) {
            char::from_u32(b).expect("latin-1")
        } else {
            extra += 1;
            char::from_u32(255 + extra).expect("latin extended")
        };
    }
    table
}

/// `tokenizer.json` of a GGUF byte-level BPE: the file's vocabulary and merges, its control (special) and
/// user-defined tokens matched whole.
fn byte_level_tokenizer_json(
    tokens: &[String],
    types: &[i64],
    merges: Vec<String>,
    pre_tokenizer: Json,
    post_processor: Json,
) -> Json {
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    let table = byte_level_alphabet();
    for (i, (tok, ty)) in tokens.iter().zip(types).enumerate() {
        if !tok.chars().all(|c| table.contains(&c)) {
            // Spelled outside the byte-level alphabet (e.g. a special token with a space): transformers
            // respells it byte by byte in the vocabulary, keeping its id, and does not match it whole.
            vocab.insert(tok.bytes().map(|b| table[b as usize]).collect::<String>(), json!(i));
            continue;
        }
        vocab.insert(tok.clone(), json!(i));
        // 3 = control (special), 4 = user-defined: both are matched before BPE, as in transformers.
        if *ty == 3 || *ty == 4 {
            added.push(json!({"id": i, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                              "normalized": *ty == 4, "special": *ty == 3}));
        }
    }
    json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": merges},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: w.reshape(n, 2, head_dim/2, in).swapaxes(1, 2).reshape(out, in) — rows of each head
        // interleaved (0, h, 1, h+1, ...). Build that from a known HF matrix and check we get it back.
        let (n, head_dim, inner) = (3, 4, 2);
        let out = n * head_dim;
        let hf: Vec<f32> = (0..out * inner).map(|x| x as f32).collect();
        let mut perm = vec![0f32; hf.len()];
        for h in 0..n {
            for i in 0..head_dim / 2 {
                for j in 0..2 {
                    let src = h * head_dim + j * (head_dim / 2) + i; // HF row (h, j, i)
                    let dst = h * head_dim + i * 2 + j; // llama.cpp row (h, i, j)
                    perm[dst * inner..(dst + 1) * inner].copy_from_slice(&hf[src * inner..(src + 1) * inner]);
                }
            }
        }
        assert_ne!(perm, hf);
        assert_eq!(unpermute(&perm, out, inner, n), hf);
    }

    #[test]
    fn names_map_to_hf() {
        assert_eq!(
            hf_name("blk.3.attn_k.weight", "llama", 9, 3),
            Some(("model.layers.3.self_attn.k_proj.weight".into(), Some(3)))
        );
        assert_eq!(
            hf_name("blk.0.attn_q.bias", "qwen2", 9, 3),
            Some(("model.layers.0.self_attn.q_proj.bias".into(), None))
        );
        assert_eq!(hf_name("output_norm.weight", "llama", 9, 3), Some(("model.norm.weight".into(), None)));
        assert_eq!(hf_name("rope_freqs.weight", "llama", 9, 3), None);
    }
}
