//! GGUF export for llama.cpp and Ollama (`ferrotune export gguf`): a HF model dir (optionally with a LoRA or
//! DoRA adapter merged in first) written as GGUF v3 the way llama.cpp's `convert_hf_to_gguf.py` lays it out for
//! the Llama (and Mistral) and Qwen2 families: `general.*` and `{arch}.*` hyperparameters, the byte-level BPE
//! vocabulary (`tokenizer.ggml.model = gpt2` with its `pre` name, tokens, token types, merges, special ids), the
//! chat template, and the tensors under llama.cpp's names — Llama's `attn_q` / `attn_k` rows permuted into
//! llama.cpp's rotary layout (the inverse of what [`crate::gguf_import`] undoes). Weights are F32, F16, Q8_0
//! (ggml's reference quantizer: blocks of 32, f16 scale max|x|/127, `roundf(x / d)` via the reciprocal) or Q4_0
//! (ggml's reference, as `llama-quantize` writes it); norms and biases stay F32 as llama.cpp keeps them.

use std::io::Write;
use std::path::Path;

use serde_json::Value as Json;
use tch::{Device, Kind};

use crate::error::{CoreError, Result};
use crate::gguf::TensorType;

/// Element type of the exported weight matrices.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportType {
    /// 32-bit floats.
    F32,
    /// IEEE half.
    F16,
    /// ggml's Q8_0 blocks.
    Q8_0,
    /// ggml's Q4_0 blocks (as `llama-quantize` writes them).
    Q4_0,
    /// llama.cpp's Q4_K_M mix: Q4_K, with Q6_K for the output and for half of the `attn_v` / `ffn_down`
    /// matrices; rows that do not split into 256-blocks fall back to Q5_0 / Q8_0 as `llama-quantize` does.
    Q4KM,
}

impl std::str::FromStr for ExportType {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "q8_0" => Ok(Self::Q8_0),
            "q4_0" => Ok(Self::Q4_0),
            "q4_k_m" => Ok(Self::Q4KM),
            other => Err(format!("unknown GGUF type `{other}` (f32, f16, q8_0, q4_0, q4_k_m)")),
        }
    }
}

impl ExportType {
    /// llama.cpp's `general.file_type` (LLAMA_FTYPE_ALL_F32, MOSTLY_F16, MOSTLY_Q4_0, MOSTLY_Q8_0,
    /// MOSTLY_Q4_K_M).
    fn file_type(self) -> u32 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
            Self::Q8_0 => 7,
            Self::Q4_0 => 2,
            Self::Q4KM => 15,
        }
    }

    /// The type of one tensor (`llama_tensor_get_type` for the mixes): vectors stay F32; with Q4_K_M the output
    /// (the embedding when tied) and `attn_v` / `ffn_down` of the layers `use_more_bits` picks take Q6_K. A row
    /// length the type's blocks do not divide falls back: Q4_K → Q5_0, Q6_K → Q8_0, then F16.
    fn tensor_type(self, name: &str, shape: &[i64], n_layers: usize, tied: bool) -> TensorType {
        if shape.len() != 2 {
            return TensorType::F32;
        }
        let layer = name.strip_prefix("blk.").and_then(|r| r.split('.').next()?.parse::<usize>().ok());
        // llama.cpp's `use_more_bits`: the first and last eighth of the layers and every third between.
        let more_bits =
            |i: usize| i < n_layers / 8 || i >= 7 * n_layers / 8 || (i >= n_layers / 8 && (i - n_layers / 8) % 3 == 2);
        let ty = match self {
            Self::F32 => TensorType::F32,
            Self::F16 => TensorType::F16,
            Self::Q8_0 => TensorType::Q8_0,
            Self::Q4_0 => TensorType::Q4_0,
            Self::Q4KM => {
                let output = name == "output.weight" || (tied && name == "token_embd.weight");
                let v_or_down = name.ends_with("attn_v.weight") || name.ends_with("ffn_down.weight");
                if output || (v_or_down && layer.is_some_and(more_bits)) {
                    TensorType::Q6_K
                } else {
                    TensorType::Q4_K
                }
            }
        };
        let cols = shape[1] as usize;
        let ty = match ty {
            TensorType::Q4_K if !cols.is_multiple_of(256) => TensorType::Q5_0,
            TensorType::Q6_K if !cols.is_multiple_of(256) => TensorType::Q8_0,
            t => t,
        };
        if !cols.is_multiple_of(ty.block_size()) {
            TensorType::F16
        } else {
            ty
        }
    }
}

/// One tensor's data in `ty` (one the exporter writes).
fn encode(ty: TensorType, data: &[f32]) -> Vec<u8> {
    use crate::gguf_quantize as q;
    match ty {
        TensorType::F16 => data.iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect(),
        TensorType::Q8_0 => q::quantize_q8_0(data),
        TensorType::Q4_0 => q::quantize_q4_0(data),
        TensorType::Q5_0 => q::quantize_q5_0(data),
        TensorType::Q4_K => q::quantize_q4_k(data),
        TensorType::Q6_K => q::quantize_q6_k(data),
        _ => data.iter().flat_map(|x| x.to_le_bytes()).collect(),
    }
}

/// What an export wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct ExportReport {
    /// `general.architecture`.
    pub architecture: String,
    /// Tensors written.
    pub tensors: usize,
    /// Bytes of the file.
    pub bytes: u64,
}

/// A GGUF metadata value.
enum Meta {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(String),
    Strs(Vec<String>),
    I32s(Vec<i32>),
    F32s(Vec<f32>),
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    buf.extend((s.len() as u64).to_le_bytes());
    buf.extend(s.as_bytes());
}

fn put_meta(buf: &mut Vec<u8>, key: &str, v: &Meta) {
    put_str(buf, key);
    match v {
        Meta::U32(x) => {
            buf.extend(4u32.to_le_bytes());
            buf.extend(x.to_le_bytes());
        }
        Meta::F32(x) => {
            buf.extend(6u32.to_le_bytes());
            buf.extend(x.to_le_bytes());
        }
        Meta::Bool(x) => {
            buf.extend(7u32.to_le_bytes());
            buf.push(u8::from(*x));
        }
        Meta::Str(s) => {
            buf.extend(8u32.to_le_bytes());
            put_str(buf, s);
        }
        Meta::Strs(v) => {
            buf.extend(9u32.to_le_bytes());
            buf.extend(8u32.to_le_bytes());
            buf.extend((v.len() as u64).to_le_bytes());
            v.iter().for_each(|s| put_str(buf, s));
        }
        Meta::I32s(v) => {
            buf.extend(9u32.to_le_bytes());
            buf.extend(5u32.to_le_bytes());
            buf.extend((v.len() as u64).to_le_bytes());
            v.iter().for_each(|x| buf.extend(x.to_le_bytes()));
        }
        Meta::F32s(v) => {
            buf.extend(9u32.to_le_bytes());
            buf.extend(6u32.to_le_bytes());
            buf.extend((v.len() as u64).to_le_bytes());
            v.iter().for_each(|x| buf.extend(x.to_le_bytes()));
        }
    }
}

pub use crate::gguf_quantize::{quantize_q4_0, quantize_q8_0};

/// HF name → llama.cpp name, and the heads to permute with (Llama q/k only).
fn gguf_name(hf: &str, arch: &str, heads: usize, kv_heads: usize) -> Option<(String, Option<usize>)> {
    use crate::gguf_import::{FIXED_TENSORS, GEMMA_NORMS, LAYER_MODULES};
    if let Some((gguf, _)) = FIXED_TENSORS.iter().find(|(_, h)| *h == hf) {
        return Some(((*gguf).to_owned(), None));
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (module, suffix) = rest.rsplit_once('.')?;
    let gemma = GEMMA_NORMS.iter().find(|(_, h)| arch == "gemma3" && *h == module);
    let (name, _) = match gemma {
        Some(g) => g,
        None => LAYER_MODULES.iter().find(|(_, h)| *h == module)?,
    };
    let perm = match *name {
        "attn_q" => Some(heads),
        "attn_k" => Some(kv_heads),
        _ => None,
    };
    Some((format!("blk.{layer}.{name}.{suffix}"), if arch == "llama" { perm } else { None }))
}

fn read_json(path: &Path) -> Result<Json> {
    let text = crate::fsx::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| CoreError::config(path, format!("invalid JSON: {e}")))
}

/// llama.cpp's name for a regex split before a byte-level step without its own regex (Llama 3's or Qwen2's).
fn split_pre_name(pre: &Json) -> Option<&'static str> {
    let parts = pre["pretokenizers"].as_array().filter(|a| pre["type"] == "Sequence" && a.len() == 2)?;
    let (split, bl) = (&parts[0], &parts[1]);
    if split["type"] != "Split" || bl["type"] != "ByteLevel" || bl["use_regex"] != false {
        return None;
    }
    match split["pattern"]["Regex"].as_str()? {
        r if r == crate::gguf_import::LLAMA3_SPLIT => Some("llama-bpe"),
        r if r == crate::gguf_import::QWEN2_SPLIT => Some("qwen2"),
        _ => None,
    }
}

/// The vocabulary of `tokenizer.json` as GGUF metadata: a byte-level BPE as `gpt2` (tokens by id, types,
/// merges, pre-tokenizer name), a BPE with byte fallback (SentencePiece-converted: Llama 2, TinyLlama, Mistral,
/// Gemma) as `llama` (tokens, scores, types).
fn vocabulary(dir: &Path, vocab_size: usize) -> Result<Vec<(&'static str, Meta)>> {
    let path = dir.join("tokenizer.json");
    let t = read_json(&path)?;
    let unsupported = |what: String| CoreError::InvalidArgument(format!("{}: {what}", path.display()));
    let sentencepiece = t["model"]["type"] == "BPE" && t["model"]["byte_fallback"] == true;
    if t["model"]["type"] != "BPE" || (t["decoder"]["type"] != "ByteLevel" && !sentencepiece) {
        return Err(unsupported(format!(
            "a {} vocabulary with a {} decoder cannot be exported (byte-level BPE, or BPE with byte fallback)",
            t["model"]["type"], t["decoder"]["type"]
        )));
    }
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![1i32; vocab_size];
    let vocab = t["model"]["vocab"].as_object().ok_or_else(|| unsupported("model.vocab is missing".into()))?;
    let mut place = |id: u64, tok: &str, ty: i32| -> Result<()> {
        let slot = tokens
            .get_mut(id as usize)
            .ok_or_else(|| unsupported(format!("token id {id} is beyond the model's vocab_size {vocab_size}")))?;
        *slot = Some(tok.to_owned());
        types[id as usize] = ty;
        Ok(())
    };
    let is_byte = |s: &str| s.len() == 6 && s.starts_with("<0x") && s.ends_with('>');
    let unk = t["model"]["unk_token"].as_str();
    for (tok, id) in vocab {
        let ty = match tok.as_str() {
            s if sentencepiece && is_byte(s) => 6,
            s if sentencepiece && Some(s) == unk => 2,
            _ => 1,
        };
        place(id.as_u64().unwrap_or(u64::MAX), tok, ty)?;
    }
    for a in t["added_tokens"].as_array().into_iter().flatten() {
        let content = a["content"].as_str().unwrap_or_default();
        let ty = match a["special"] == true {
            _ if sentencepiece && Some(content) == unk => 2,
            true => 3,
            false => 4,
        };
        place(a["id"].as_u64().unwrap_or(u64::MAX), content, ty)?;
    }
    // Rows of the embedding beyond the tokenizer (padded vocabularies): llama.cpp's `[PAD{i}]`, unused.
    let tokens: Vec<String> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            t.unwrap_or_else(|| {
                types[i] = 5;
                format!("[PAD{i}]")
            })
        })
        .collect();
    let merges: Vec<String> = t["model"]["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|m| match m {
            Json::String(s) => s.clone(),
            Json::Array(p) => p.iter().filter_map(Json::as_str).collect::<Vec<_>>().join(" "),
            other => other.to_string(),
        })
        .collect();
    if sentencepiece {
        let unk_id = types.iter().position(|&ty| ty == 2);
        let mut meta = sentencepiece_vocabulary(&t, tokens, types);
        meta.extend(unk_id.map(|i| ("tokenizer.ggml.unknown_token_id", Meta::U32(i as u32))));
        return Ok(meta);
    }
    let pre = &t["pre_tokenizer"];
    let is_byte_level = |p: &Json| p["type"] == "ByteLevel" && p["add_prefix_space"] != true;
    let pre_name = if is_byte_level(pre) {
        "gpt2"
    } else if pre["type"] == "Sequence"
        && pre["pretokenizers"].as_array().is_some_and(|a| {
            a.len() == 2 && a[0]["type"] == "Digits" && a[0]["individual_digits"] == true && is_byte_level(&a[1])
        })
    {
        "smollm"
    } else if let Some(name) = split_pre_name(pre) {
        name
    } else {
        return Err(unsupported(format!(
            "pre-tokenizer {pre} has no llama.cpp name this exporter knows (gpt2, smollm, llama-bpe, qwen2)"
        )));
    };
    Ok(vec![
        ("tokenizer.ggml.model", Meta::Str("gpt2".into())),
        ("tokenizer.ggml.pre", Meta::Str(pre_name.into())),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.merges", Meta::Strs(merges)),
    ])
}

/// A SentencePiece-converted vocabulary as llama.cpp's `llama` tokenizer takes it. The file has no merges:
/// llama.cpp (and transformers reading the GGUF) merge by the merged token's score, so each token's score is
/// minus the rank of the first `tokenizer.json` merge that makes it — the same priorities — and tokens no merge
/// makes (bytes, characters, specials) rank below all of them. `add_space_prefix` says whether a `▁` is
/// prepended to the text (Llama's dummy prefix; Gemma has none).
fn sentencepiece_vocabulary(t: &Json, tokens: Vec<String>, types: Vec<i32>) -> Vec<(&'static str, Meta)> {
    // The token each merge makes (an array merge's parts are joined as they are: a part may hold a space).
    let made: Vec<String> = t["model"]["merges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => s.split_once(' ').map(|(a, b)| format!("{a}{b}")),
            Json::Array(p) => Some(p.iter().filter_map(Json::as_str).collect()),
            _ => None,
        })
        .collect();
    let n_merges = made.len();
    let mut rank = std::collections::HashMap::<String, usize>::new();
    for (i, m) in made.into_iter().enumerate() {
        rank.entry(m).or_insert(i);
    }
    let scores: Vec<f32> = tokens
        .iter()
        .enumerate()
        .map(|(id, tok)| match rank.get(tok) {
            Some(&r) => -(r as f32),
            None => -((n_merges + id) as f32),
        })
        .collect();
    let prepends = |n: &Json| n["type"] == "Prepend" && n["prepend"] == "▁";
    let normalizer = &t["normalizer"];
    let metaspace =
        |p: &Json| p["type"] == "Metaspace" && p["prepend_scheme"] != "never" && p["add_prefix_space"] != false;
    let space_prefix = prepends(normalizer)
        || normalizer["normalizers"].as_array().is_some_and(|a| a.iter().any(prepends))
        || metaspace(&t["pre_tokenizer"])
        || t["pre_tokenizer"]["pretokenizers"].as_array().is_some_and(|a| a.iter().any(metaspace));
    vec![
        ("tokenizer.ggml.model", Meta::Str("llama".into())),
        ("tokenizer.ggml.pre", Meta::Str("default".into())),
        ("tokenizer.ggml.tokens", Meta::Strs(tokens)),
        ("tokenizer.ggml.scores", Meta::F32s(scores)),
        ("tokenizer.ggml.token_type", Meta::I32s(types)),
        ("tokenizer.ggml.add_space_prefix", Meta::Bool(space_prefix)),
    ]
}

/// What llama.cpp's Gemma 3 assumes and a GGUF cannot say otherwise: every sixth layer global, attention
/// scaled by 1/√head_dim (`query_pre_attn_scalar` = head_dim), GeGLU with tanh.
fn gemma3_fits_llama_cpp(c: &crate::models::DecoderConfig) -> std::result::Result<(), String> {
    let local = c.local_attention.as_ref().ok_or("no sliding-window layers")?;
    let pattern: Vec<bool> = (0..local.layers.len()).map(|i| (i + 1) % 6 != 0).collect();
    if local.layers != pattern {
        return Err("`layer_types` is not every sixth layer global, the pattern llama.cpp hard-codes".into());
    }
    // llama.cpp scales attention by 1/√head_dim, except for its 62-layer (27B) Gemma 3: 1/√(hidden/heads).
    let (scalar, rule) = if c.num_layers == 62 {
        (c.hidden_size as f64 / c.num_heads as f64, "hidden/heads, as llama.cpp takes it for 62 layers")
    } else {
        (c.head_dim as f64, "head_dim")
    };
    if c.attn_scale.is_some_and(|s| (s * scalar.sqrt() - 1.0).abs() > 1e-9) {
        return Err(format!("`query_pre_attn_scalar` differs from {scalar} ({rule}), the scale llama.cpp uses"));
    }
    if (local.rope_theta - 10_000.0).abs() > 1e-6 {
        return Err(format!(
            "the sliding layers' RoPE base is {} (llama.cpp's gemma3 takes 10000 whatever the file says)",
            local.rope_theta
        ));
    }
    if c.qkv_bias || c.o_bias || c.mlp_bias {
        return Err("it has linear biases (`attention_bias`), which llama.cpp's gemma3 has no place for".into());
    }
    if c.activation != crate::models::Activation::GeluTanh {
        return Err("`hidden_activation` is not gelu_pytorch_tanh".into());
    }
    Ok(())
}

/// Writes the model in `model_dir` (with `adapter` merged in, when given) to `out` as GGUF.
pub fn export_gguf(model_dir: &Path, adapter: Option<&Path>, out: &Path, ty: ExportType) -> Result<ExportReport> {
    let config = read_json(&model_dir.join("config.json"))?;
    let arch = match config["model_type"].as_str().unwrap_or_default() {
        "llama" | "mistral" => "llama",
        "qwen2" => "qwen2",
        "qwen3" => "qwen3",
        "gemma3_text" => "gemma3",
        other => {
            return Err(CoreError::InvalidArgument(format!(
                "{}: model_type `{other}` cannot be exported to GGUF yet (llama, mistral, qwen2, qwen3, gemma3_text)",
                model_dir.display()
            )))
        }
    };
    let mut model = match adapter {
        Some(a) => crate::merge::merged_model(model_dir, a, None)?.0,
        None => crate::load_model(model_dir, Kind::Float, Device::Cpu)?,
    };
    let c = model.cfg.clone();
    if arch != "llama" && matches!(c.rope_scaling, crate::models::RopeScaling::Llama3 { .. }) {
        // llama.cpp reads the `rope_freqs` tensor that carries it only for its llama architecture.
        return Err(CoreError::InvalidArgument(format!(
            "{}: Llama 3 rope scaling cannot be exported for `{arch}` (llama.cpp applies it to llama only)",
            model_dir.display()
        )));
    }
    if arch == "qwen3" && (c.o_bias || c.mlp_bias) {
        // llama.cpp's qwen3 takes optional q/k/v biases but has no slot for the others (it refuses such a file).
        return Err(CoreError::InvalidArgument(format!(
            "{}: cannot be exported as llama.cpp's qwen3: its o_proj{} bias (`attention_bias` puts one on o_proj) \
             has no place in llama.cpp's qwen3",
            model_dir.display(),
            if c.mlp_bias { " and MLP" } else { "" }
        )));
    }
    if arch == "gemma3" {
        gemma3_fits_llama_cpp(&c).map_err(|why| {
            CoreError::InvalidArgument(format!(
                "{}: cannot be exported as llama.cpp's gemma3: {why}",
                model_dir.display()
            ))
        })?;
    }
    let tokenizer = crate::Tokenizer::from_dir(model_dir)?;
    let defaults = crate::ModelDefaults::from_dir(model_dir, &tokenizer)?;
    let template = crate::ChatTemplate::from_dir(model_dir)?;
    let tok_cfg = read_json(&model_dir.join("tokenizer_config.json")).unwrap_or_default();
    let k = |s: &str| format!("{arch}.{s}");
    let name = model_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let mut meta: Vec<(String, Meta)> = vec![
        ("general.architecture".into(), Meta::Str(arch.into())),
        ("general.name".into(), Meta::Str(name)),
        ("general.file_type".into(), Meta::U32(ty.file_type())),
        (k("vocab_size"), Meta::U32(c.vocab_size as u32)),
        (k("context_length"), Meta::U32(c.max_position_embeddings as u32)),
        (k("embedding_length"), Meta::U32(c.hidden_size as u32)),
        (k("block_count"), Meta::U32(c.num_layers as u32)),
        (k("feed_forward_length"), Meta::U32(c.intermediate_size as u32)),
        (k("rope.dimension_count"), Meta::U32(c.head_dim as u32)),
        (k("attention.head_count"), Meta::U32(c.num_heads as u32)),
        (k("attention.head_count_kv"), Meta::U32(c.num_kv_heads as u32)),
        (k("attention.key_length"), Meta::U32(c.head_dim as u32)),
        (k("attention.value_length"), Meta::U32(c.head_dim as u32)),
        (k("attention.layer_norm_rms_epsilon"), Meta::F32(c.rms_norm_eps as f32)),
        (k("rope.freq_base"), Meta::F32(c.rope_theta as f32)),
    ];
    match c.rope_scaling {
        crate::models::RopeScaling::Linear { factor } => {
            meta.push((k("rope.scaling.type"), Meta::Str("linear".into())));
            meta.push((k("rope.scaling.factor"), Meta::F32(factor as f32)));
        }
        // llama.cpp keeps Llama 3's band-wise factors as the `rope_freqs` tensor (below); the original context
        // length goes beside it so that an import recovers the exact parameters.
        crate::models::RopeScaling::Llama3 { original_max_position_embeddings, .. } => {
            meta.push((k("rope.scaling.original_context_length"), Meta::U32(original_max_position_embeddings as u32)))
        }
        crate::models::RopeScaling::None => {}
    }
    if let Some(local) = &c.local_attention {
        meta.push((k("attention.sliding_window"), Meta::U32(local.window as u32)));
        meta.push((k("rope.freq_base_swa"), Meta::F32(local.rope_theta as f32)));
    }
    meta.extend(vocabulary(model_dir, c.vocab_size as usize)?.into_iter().map(|(k, v)| (k.to_owned(), v)));
    let id = |key: &str| config[key].as_u64().or_else(|| config[key].as_array()?.first()?.as_u64());
    if let Some(b) = id("bos_token_id") {
        meta.push(("tokenizer.ggml.bos_token_id".into(), Meta::U32(b as u32)));
    }
    if let Some(e) = defaults.eos_ids.first() {
        meta.push(("tokenizer.ggml.eos_token_id".into(), Meta::U32(*e)));
    }
    meta.push(("tokenizer.ggml.padding_token_id".into(), Meta::U32(defaults.pad_id)));
    meta.push(("tokenizer.ggml.add_bos_token".into(), Meta::Bool(tok_cfg["add_bos_token"] == true)));
    meta.push(("tokenizer.chat_template".into(), Meta::Str(template.source().to_owned())));

    // Tensors: name, ggml dims (innermost first), type id, bytes.
    let (heads, kv_heads) = (c.num_heads as usize, c.num_kv_heads as usize);
    let mut tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)> = Vec::new();
    let mut named = model.named_weights()?;
    if c.tie_word_embeddings {
        named.retain(|(n, _)| n != "lm_head.weight");
    }
    for (hf, t) in named {
        let Some((gname, perm)) = gguf_name(&hf, arch, heads, kv_heads) else { continue };
        let shape = t.size();
        let flat = t.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?;
        let mut data = Vec::<f32>::try_from(&flat)?;
        if arch == "gemma3" && hf.ends_with("norm.weight") {
            // llama.cpp's Gemma norms multiply by the stored weight: HF's offset w is stored as 1 + w.
            data.iter_mut().for_each(|x| *x += 1.0);
        }
        if let Some(n) = perm {
            let rows = shape[0] as usize;
            data = crate::gguf_import::permute_rows(&data, rows, data.len() / rows.max(1), n, false);
        }
        if let Some(bad) = data.iter().find(|x| !x.is_finite()) {
            return Err(CoreError::InvalidArgument(format!(
                "{}: tensor `{hf}` holds {bad}: a model with non-finite weights is not exported",
                model_dir.display()
            )));
        }
        let tt = ty.tensor_type(&gname, &shape, c.num_layers as usize, c.tie_word_embeddings);
        let bytes = encode(tt, &data);
        tensors.push((gname, shape.iter().rev().map(|&d| d as u64).collect(), tt.id(), bytes));
    }
    if let crate::models::RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = c.rope_scaling
    {
        let factors = crate::gguf_rope::llama3_factors(
            c.head_dim,
            c.rope_theta,
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        );
        let bytes = factors.iter().flat_map(|x| x.to_le_bytes()).collect();
        tensors.push(("rope_freqs.weight".into(), vec![factors.len() as u64], TensorType::F32.id(), bytes));
    }
    // llama.cpp's order: token_embd, then blocks by index, then output_norm / output.
    tensors.sort_by_key(|(n, ..)| {
        let block = n.strip_prefix("blk.").and_then(|r| r.split('.').next()?.parse::<u64>().ok());
        match (n.as_str(), block) {
            ("token_embd.weight", _) => (0, 0, n.clone()),
            (_, Some(b)) => (1, b, n.clone()),
            _ => (2, 0, n.clone()),
        }
    });

    const ALIGN: u64 = 32;
    let mut head = Vec::new();
    head.extend(b"GGUF");
    head.extend(3u32.to_le_bytes());
    head.extend((tensors.len() as u64).to_le_bytes());
    head.extend((meta.len() as u64).to_le_bytes());
    for (key, v) in &meta {
        put_meta(&mut head, key, v);
    }
    let mut offset = 0u64;
    for (name, dims, ty, bytes) in &tensors {
        put_str(&mut head, name);
        head.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| head.extend(d.to_le_bytes()));
        head.extend(ty.to_le_bytes());
        head.extend(offset.to_le_bytes());
        offset += (bytes.len() as u64).div_ceil(ALIGN) * ALIGN;
    }
    let pad = |n: u64| vec![0u8; (n.div_ceil(ALIGN) * ALIGN - n) as usize];
    let tmp = out.with_extension("gguf.tmp");
    crate::fsx::checked_for_write(&tmp).map_err(|e| CoreError::io(&tmp, e))?;
    let file = std::fs::File::create(&tmp).map_err(|e| CoreError::io(&tmp, e))?;
    let mut w = std::io::BufWriter::new(file);
    let io = |e| CoreError::io(&tmp, e);
    w.write_all(&head).map_err(io)?;
    w.write_all(&pad(head.len() as u64)).map_err(io)?;
    for (.., bytes) in &tensors {
        w.write_all(bytes).map_err(io)?;
        w.write_all(&pad(bytes.len() as u64)).map_err(io)?;
    }
    let file = w.into_inner().map_err(|e| CoreError::io(&tmp, e.into_error()))?;
    file.sync_all().map_err(io)?;
    crate::fsx::rename(&tmp, out).map_err(|e| CoreError::io(out, e))?;
    let bytes = std::fs::metadata(out).map_err(|e| CoreError::io(out, e))?.len();
    Ok(ExportReport { architecture: arch.into(), tensors: tensors.len(), bytes })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q8_0_blocks_dequantize_within_half_a_step() {
        let x: Vec<f32> = (0..64).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
        let q = quantize_q8_0(&x);
        assert_eq!(q.len(), 2 * 34);
        for (b, block) in x.chunks(32).enumerate() {
            let d = half::f16::from_le_bytes([q[34 * b], q[34 * b + 1]]).to_f32();
            for (j, v) in block.iter().enumerate() {
                let back = d * (q[34 * b + 2 + j] as i8) as f32;
                // Half a step, plus up to 127 codes × the f16 rounding of the scale.
                assert!((back - v).abs() <= d * (0.5 + 127.0 / 2048.0) + 1e-6, "{back} vs {v}");
            }
        }
        assert_eq!(quantize_q8_0(&[0.0; 32])[2..], [0u8; 32]);
    }
}
