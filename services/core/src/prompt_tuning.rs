//! Prompt tuning (Lester et al. 2021, <https://arxiv.org/abs/2104.08691>): `n` trainable virtual token
//! embeddings prepended to every sequence, the model frozen. Saved in PEFT's `PROMPT_TUNING` format:
//! `adapter_config.json` (num_virtual_tokens, token_dim, num_transformer_submodules, num_attention_heads,
//! num_layers, prompt_tuning_init, …) and `adapter_model.safetensors` with one tensor `prompt_embeddings`
//! `[num_virtual_tokens, hidden]`. [`load_adapter`] loads either kind of PEFT adapter.

use std::path::Path;

use serde_json::json;
use tch::{Kind, Tensor};

use crate::error::{CoreError, Result};
use crate::models::CausalLm;
use crate::sampling::Rng;
use crate::tokenizer::Tokenizer;
use crate::weights::{save_safetensors, write_atomically, WeightFiles};

/// How the virtual tokens start.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInit {
    /// N(0, 1), like PEFT's `RANDOM` (a fresh `nn.Embedding`).
    Random,
    /// The embeddings of this text's tokens, repeated or cut to `n` (PEFT's `TEXT`).
    Text(String),
}

/// Prompt-tuning hyperparameters.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptTuningConfig {
    /// Virtual tokens.
    pub num_virtual_tokens: i64,
    /// Initialisation.
    pub init: PromptInit,
}

impl CausalLm {
    /// Adds fresh trainable virtual tokens (replacing any). `tokenizer` is needed for text init.
    pub fn add_prompt_tuning(
        &mut self,
        cfg: &PromptTuningConfig,
        tokenizer: Option<&Tokenizer>,
        seed: u64,
    ) -> Result<()> {
        let n = cfg.num_virtual_tokens;
        if !(1..=4096).contains(&n) {
            return Err(CoreError::InvalidArgument(format!("num_virtual_tokens must be in 1..=4096, got {n}")));
        }
        let h = self.cfg.hidden_size;
        // Where the virtual tokens join the sequence (the embedding's device, under a device map too).
        let dev = self.embed_tokens.device();
        let init = match &cfg.init {
            PromptInit::Random => {
                let mut rng = Rng(seed ^ 0x9E37_79B9_7F4A_7C15);
                let v = crate::prefix_tuning::normal(&mut rng, n * h);
                Tensor::f_from_slice(&v)?.f_view([n, h])?.f_to_device(dev)?
            }
            PromptInit::Text(text) => {
                let tok = tokenizer.ok_or_else(|| {
                    CoreError::InvalidArgument("text init of prompt tuning needs the tokenizer".into())
                })?;
                let ids = tok.encode_no_special(text)?;
                if ids.is_empty() {
                    return Err(CoreError::InvalidArgument("prompt_tuning_init_text is empty".into()));
                }
                let idx: Vec<i64> = (0..n as usize).map(|i| ids[i % ids.len()] as i64).collect();
                let _g = tch::no_grad_guard();
                self.embed_tokens
                    .f_index_select(0, &Tensor::f_from_slice(&idx)?.f_to_device(dev)?)?
                    .f_to_kind(Kind::Float)?
            }
        };
        self.prompt_embeddings = Some(init.f_detach()?.f_to_kind(Kind::Float)?.f_set_requires_grad(true)?);
        Ok(())
    }
}

/// Saves the model's virtual tokens in PEFT's PROMPT_TUNING format.
pub fn save_prompt_tuning(model: &CausalLm, init: &PromptInit, base_model: &str, dir: &Path) -> Result<()> {
    let p = model
        .prompt_embeddings
        .as_ref()
        .ok_or_else(|| CoreError::InvalidArgument("the model has no prompt-tuning embeddings to save".into()))?;
    crate::fsx::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
    let (kind, text) = match init {
        PromptInit::Random => ("RANDOM", serde_json::Value::Null),
        PromptInit::Text(t) => ("TEXT", json!(t)),
    };
    let cfg = json!({
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": p.size()[0], "token_dim": p.size()[1],
        "num_transformer_submodules": 1, "num_attention_heads": model.cfg.num_heads, "num_layers": model.cfg.num_layers,
        "prompt_tuning_init": kind, "prompt_tuning_init_text": text, "tokenizer_name_or_path": if kind == "TEXT" { json!(base_model) } else { serde_json::Value::Null },
        "base_model_name_or_path": base_model, "inference_mode": true, "peft_version": "0.21.2", "modules_to_save": null,
        "revision": null, "auto_mapping": null, "tokenizer_kwargs": null,
    });
    write_atomically(&dir.join("adapter_config.json"), serde_json::to_string_pretty(&cfg).expect("json").as_bytes())?;
    save_safetensors(&dir.join("adapter_model.safetensors"), &[("prompt_embeddings".to_owned(), p.shallow_clone())])
}

/// Loads PEFT prompt-tuning embeddings from `dir` onto the model.
pub fn load_prompt_tuning(model: &mut CausalLm, dir: &Path) -> Result<()> {
    let cfg_path = dir.join("adapter_config.json");
    let v = read_config(&cfg_path)?;
    let n = v["num_virtual_tokens"]
        .as_i64()
        .ok_or_else(|| CoreError::config(&cfg_path, "missing integer `num_virtual_tokens`"))?;
    if v["num_transformer_submodules"].as_i64().unwrap_or(1) != 1 {
        return Err(CoreError::config(&cfg_path, "num_transformer_submodules other than 1 is not supported"));
    }
    let files = WeightFiles::open_files(&[dir.join("adapter_model.safetensors")])?;
    let p = files.load("prompt_embeddings", &[n, model.cfg.hidden_size], Kind::Float, model.device())?;
    model.prompt_embeddings = Some(p.f_set_requires_grad(true)?);
    Ok(())
}

fn read_config(path: &Path) -> Result<serde_json::Value> {
    let text = crate::fsx::read_to_string(path).map_err(|e| CoreError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| CoreError::config(path, format!("invalid JSON: {e}")))
}

/// Loads a PEFT adapter of any supported kind (`LORA`, `PROMPT_TUNING`, `PREFIX_TUNING`) from `dir`.
pub fn load_adapter(model: &mut CausalLm, dir: &Path) -> Result<()> {
    let cfg_path = dir.join("adapter_config.json");
    let v = read_config(&cfg_path)?;
    match v["peft_type"].as_str() {
        Some("LORA") => crate::lora::load_peft(model, dir).map(|_| ()),
        Some("PROMPT_TUNING") => load_prompt_tuning(model, dir),
        Some("PREFIX_TUNING") => crate::prefix_tuning::load_prefix_tuning(model, dir, false),
        Some(other) => Err(CoreError::config(
            &cfg_path,
            format!("peft_type `{other}` is not supported (LORA, PROMPT_TUNING, PREFIX_TUNING)"),
        )),
        None => Err(CoreError::config(&cfg_path, "missing `peft_type`")),
    }
}

/// Prompt tuning as the trained state.
pub struct PromptState {
    /// Initialisation (recorded in the config).
    pub init: PromptInit,
    /// `base_model_name_or_path`.
    pub base_model: String,
}

impl crate::train::TrainableState for PromptState {
    fn params(&self, model: &mut CausalLm) -> Vec<(String, Tensor)> {
        model.prompt_embeddings.iter().map(|p| ("prompt_embeddings".to_owned(), p.shallow_clone())).collect()
    }

    fn save(&self, model: &mut CausalLm, dir: &Path) -> Result<()> {
        save_prompt_tuning(model, &self.init, &self.base_model, dir)
    }

    fn load(&self, model: &mut CausalLm, dir: &Path) -> Result<()> {
        load_prompt_tuning(model, dir)
    }
}
