//! Folding a LoRA adapter into its base and writing a plain Hugging Face model directory (weights,
//! config, tokenizer, template) that transformers loads without PEFT. For a QLoRA adapter the merge base is
//! either the NF4-dequantized weights the adapter was trained against (default) or the original weights;
//! the choice is recorded in the output's `config.json` under `ferrotune_merge`.

use std::path::Path;

use serde::Serialize;
use tch::{Device, Kind};

use crate::error::{CoreError, Result};
use crate::models::{load_model, CausalLm};

/// Which base weights a QLoRA adapter is merged into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MergeBase {
    /// The NF4 round trip of the base (what a QLoRA adapter was trained against).
    Nf4Dequantized,
    /// The original dense weights.
    Original,
}

/// What a merge produced.
#[derive(Debug, Clone, Serialize)]
pub struct MergeReport {
    /// Linear layers that had an adapter.
    pub merged_layers: usize,
    /// The base the adapter was folded into.
    pub merge_base: MergeBase,
    /// Safetensors files written.
    pub shards: usize,
}

/// Prompt and prefix tuning add inputs to the model rather than changing a weight: no merged model equals
/// them, so a merge is refused with the reason.
fn refuse_unmergeable(adapter: &Path) -> Result<()> {
    let cfg = adapter.join("adapter_config.json");
    let Ok(text) = crate::fsx::read_to_string(&cfg) else { return Ok(()) }; // load_peft names a missing file
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    let why = match v["peft_type"].as_str() {
        Some("PREFIX_TUNING") => "a prefix is key/value state prepended to every layer's attention, not a weight delta",
        Some("PROMPT_TUNING") => "virtual tokens are inputs prepended to every sequence, not a weight delta",
        _ => return Ok(()),
    };
    Err(CoreError::InvalidArgument(format!(
        "{}: {} adapters cannot be merged into the weights ({why}); use the adapter with --adapter instead",
        adapter.display(),
        v["peft_type"].as_str().unwrap_or_default()
    )))
}

/// Merges the LoRA adapter in `adapter` into the model in `base` and writes the result to `out`.
/// `nf4_base` overrides the choice of merge base (default: NF4-dequantized when the adapter was trained
/// by ferrotune on an NF4 base, the original weights otherwise).
pub fn merge_adapter(base: &Path, adapter: &Path, out: &Path, nf4_base: Option<bool>) -> Result<MergeReport> {
    merge_adapter_sharded(base, adapter, out, nf4_base, DEFAULT_MAX_SHARD_BYTES)
}

/// transformers' default `max_shard_size` (5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: u64 = 5_000_000_000;

/// The base in `base` with the LoRA (or DoRA) adapter in `adapter` folded in, in f32 on the CPU (into the
/// NF4-dequantized weights when `nf4_base` says so or, by default, when the adapter was trained on NF4; the
/// layers it does not target then keep their dequantized weights too); the layers merged and the base used.
pub fn merged_model(base: &Path, adapter: &Path, nf4_base: Option<bool>) -> Result<(CausalLm, usize, MergeBase)> {
    refuse_unmergeable(adapter)?;
    let mut model = load_model(base, Kind::Float, Device::Cpu)?;
    let use_nf4 = match nf4_base {
        Some(b) => b,
        None => crate::lora::trained_on_nf4(adapter)?,
    };
    if use_nf4 {
        model.quantize_nf4()?;
    }
    crate::lora::load_peft(&mut model, adapter)?;
    let merged_layers = model.merge_lora()?;
    if merged_layers == 0 {
        return Err(CoreError::InvalidArgument(format!(
            "{}: the adapter has no LoRA layers to merge",
            adapter.display()
        )));
    }
    // Layers the adapter did not target keep the weights it was trained against: dequantized NF4 too.
    for (_, lin) in model.linears_mut() {
        if matches!(lin.base, crate::models::decoder::BaseWeight::Nf4 { .. }) {
            lin.base = crate::models::decoder::BaseWeight::Dense(lin.dense_weight()?);
        }
    }
    let merge_base = if use_nf4 { MergeBase::Nf4Dequantized } else { MergeBase::Original };
    Ok((model, merged_layers, merge_base))
}

/// [`merge_adapter`] with the weights split into shards of at most `max_shard_bytes` (plus the index).
pub fn merge_adapter_sharded(
    base: &Path,
    adapter: &Path,
    out: &Path,
    nf4_base: Option<bool>,
    max_shard_bytes: u64,
) -> Result<MergeReport> {
    let (mut model, merged_layers, merge_base) = merged_model(base, adapter, nf4_base)?;
    crate::fsx::create_dir_all(out).map_err(|e| CoreError::io(out, e))?;
    let shards = crate::weights::save_sharded(out, &model.named_weights()?, max_shard_bytes)?;
    let cfg_path = base.join("config.json");
    let text = crate::fsx::read_to_string(&cfg_path).map_err(|e| CoreError::io(&cfg_path, e))?;
    let mut cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CoreError::config(&cfg_path, e.to_string()))?;
    cfg["ferrotune_merge"] = serde_json::json!({"base_model": base, "adapter": adapter, "merge_base": merge_base, "merged_layers": merged_layers});
    crate::weights::write_atomically(
        &out.join("config.json"),
        serde_json::to_string_pretty(&cfg).expect("json").as_bytes(),
    )?;
    crate::weights::copy_side_files(base, out)?;
    Ok(MergeReport { merged_layers, merge_base, shards })
}
