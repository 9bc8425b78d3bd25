//! Decoder-only causal LMs in HF layout. One file per architecture family translates its config.json
//! into a [`DecoderConfig`]; [`decoder`] holds the shared layers. [`load_model`] is the entry point.

pub mod config;
pub mod decoder;
pub mod device_map;
pub mod gemma3;
pub mod kv_cache;
pub mod llama;
pub mod mistral;
pub mod qwen2;
pub mod qwen3;

use std::path::Path;
use std::sync::Arc;

use tch::{Device, Kind};

pub use config::{Activation, DecoderConfig, LocalAttention, RopeScaling};
pub use decoder::CausalLm;
pub use kv_cache::KvCache;

use crate::error::{CoreError, Result};
use crate::weights::{WeightFiles, Weights};

/// Reads `dir/config.json` and returns the normalised config of a supported family.
pub fn read_config(dir: &Path) -> Result<DecoderConfig> {
    let path = dir.join("config.json");
    let text = crate::fsx::read_to_string(&path).map_err(|e| CoreError::io(&path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CoreError::config(&path, format!("invalid JSON: {e}")))?;
    let ty = v
        .get("model_type")
        .and_then(|t| t.as_str())
        .ok_or_else(|| CoreError::config(&path, "missing key `model_type`"))?;
    fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value, path: &Path) -> Result<T> {
        serde_json::from_value(v).map_err(|e| CoreError::config(path, e.to_string()))
    }
    match ty {
        "llama" => parse::<llama::Config>(v, &path)?.to_decoder(&path),
        "mistral" => parse::<mistral::Config>(v, &path)?.to_decoder(&path),
        "qwen2" => parse::<qwen2::Config>(v, &path)?.to_decoder(&path),
        "qwen3" => parse::<qwen3::Config>(v, &path)?.to_decoder(&path),
        "gemma3_text" => parse::<gemma3::Config>(v, &path)?.to_decoder(&path),
        other => Err(CoreError::config(
            &path,
            format!("unknown model_type `{other}` (supported: llama, mistral, qwen2, qwen3, gemma3_text)"),
        )),
    }
}

/// Loads the model in `dir` (config.json + safetensors) with weights in `kind` on `device`.
pub fn load_model(dir: &Path, kind: Kind, device: Device) -> Result<CausalLm> {
    load_model_placed(dir, kind, device, None)
}

/// [`load_model`] with the layers placed by a `device_map` ([`device_map`]; `None`: all on `device`).
pub fn load_model_placed(
    dir: &Path,
    kind: Kind,
    device: Device,
    device_map: Option<&serde_json::Value>,
) -> Result<CausalLm> {
    let cfg = read_config(dir)?;
    let placement = device_map
        .map(|m| device_map::resolve(m, cfg.num_layers as usize, cfg.tie_word_embeddings, device))
        .transpose()?;
    let files = Arc::new(WeightFiles::open_dir(dir)?);
    let _guard = tch::no_grad_guard();
    CausalLm::load_placed(&Weights::new(files, kind, device), cfg, placement.as_ref())
}

/// Parses `cpu`, `cuda` or `cuda:N`; a CUDA device that libtorch cannot see is an error.
pub fn parse_device(s: &str) -> Result<Device> {
    parse_device_with(s, tch::Cuda::device_count() as usize)
}

/// [`parse_device`] on a host with `n` CUDA devices.
pub fn parse_device_with(s: &str, n: usize) -> Result<Device> {
    let dev = match s {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => 0,
        _ => s
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
            .ok_or_else(|| CoreError::InvalidArgument(format!("unknown device `{s}` (use cpu, cuda or cuda:N)")))?,
    };
    if dev >= n {
        return Err(CoreError::InvalidArgument(format!(
            "device `{s}` is not available: libtorch sees {n} CUDA device(s)"
        )));
    }
    Ok(Device::Cuda(dev))
}

/// Parses `f32`/`float32`, `bf16`/`bfloat16` or `f16`/`float16`.
pub fn parse_dtype(s: &str) -> Result<Kind> {
    match s {
        "f32" | "float32" | "float" => Ok(Kind::Float),
        "bf16" | "bfloat16" => Ok(Kind::BFloat16),
        "f16" | "float16" | "half" => Ok(Kind::Half),
        _ => Err(CoreError::InvalidArgument(format!("unknown dtype `{s}` (use f32, bf16 or f16)"))),
    }
}
