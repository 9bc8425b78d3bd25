//! Prefix tuning (Li & Liang 2021, <https://arxiv.org/abs/2101.00190>) as PEFT 0.21 implements it
//! (`PREFIX_TUNING`): `n` trainable key/value vectors prepended to every layer's attention, the model frozen.
//!
//! The prefix is one table `[n, layers · 2 · token_dim]` with `token_dim = head_dim · kv_heads` (PEFT's
//! grouped-query handling): layer i's keys are columns `[2i·td, (2i+1)·td)`, its values the next `td`, each
//! head-major `[kv_heads, head_dim]`. The table is a plain embedding, or, with `prefix_projection`, the output
//! of PEFT's reparameterisation `Linear(td, encoder_hidden) → tanh → Linear(encoder_hidden, layers·2·td)` over
//! an `[n, td]` embedding. Prefix keys get no rotary embedding, and the real tokens' positions start at `n`
//! (PEFT's forward: a cache of `n` positions precedes them). Saved as PEFT does after training: one tensor
//! `prompt_embeddings` holding the table (the projection's output) and `inference_mode: true`; checkpoints
//! also keep the raw projection parameters (`prefix_encoder.safetensors`) so that training resumes exactly.

use std::path::Path;

use serde_json::json;
use tch::{Kind, Tensor};

use crate::error::{CoreError, Result};
use crate::models::CausalLm;
use crate::sampling::Rng;
use crate::weights::{save_safetensors, write_atomically, WeightFiles};

/// Prefix-tuning hyperparameters (PEFT's `PrefixTuningConfig`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PrefixTuningConfig {
    /// Virtual tokens (key/value positions per layer).
    pub num_virtual_tokens: i64,
    /// Reparameterise the table through a two-layer MLP while training.
    pub prefix_projection: bool,
    /// The MLP's hidden width (PEFT's default: token_dim).
    pub encoder_hidden_size: Option<i64>,
}

/// The trainable prefix of a model.
#[derive(Debug)]
pub struct PrefixEncoder {
    /// `[n, layers·2·td]`, or `[n, td]` with the projection.
    pub embedding: Tensor,
    /// The projection `[W1 [enc, td], b1, W2 [layers·2·td, enc], b2]`.
    pub transform: Option<[Tensor; 4]>,
}

const PARAM_NAMES: [&str; 4] = ["transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"];

impl PrefixEncoder {
    /// Virtual tokens.
    pub fn len(&self) -> i64 {
        self.embedding.size()[0]
    }

    /// Whether there are none (never, once built).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The key/value table `[n, layers·2·td]` (with gradients when the parameters have them).
    pub fn table(&self) -> Result<Tensor> {
        match &self.transform {
            None => Ok(self.embedding.shallow_clone()),
            Some([w1, b1, w2, b2]) => Ok(self.embedding.f_linear(w1, Some(b1))?.f_tanh()?.f_linear(w2, Some(b2))?),
        }
    }

    /// The trainable tensors under PEFT's module names (`prompt_encoder.default.` stripped).
    pub fn params(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![("embedding.weight".to_owned(), self.embedding.shallow_clone())];
        if let Some(t) = &self.transform {
            out.extend(PARAM_NAMES.iter().zip(t).map(|(n, t)| ((*n).to_owned(), t.shallow_clone())));
        }
        out
    }
}

/// Layer `i`'s prefix keys and values `[b, kv_heads, n, head_dim]` from the table, in `kind`.
pub(crate) fn layer_kv(
    table: &Tensor,
    i: i64,
    b: i64,
    kv_heads: i64,
    head_dim: i64,
    kind: Kind,
) -> Result<(Tensor, Tensor)> {
    let n = table.size()[0];
    let td = kv_heads * head_dim;
    let slice = |j: i64| -> Result<Tensor> {
        Ok(table
            .f_narrow(1, j * td, td)?
            .f_view([n, kv_heads, head_dim])?
            .f_permute([1, 0, 2])?
            .f_unsqueeze(0)?
            .f_expand([b, kv_heads, n, head_dim], false)?
            .f_to_kind(kind)?)
    };
    Ok((slice(2 * i)?, slice(2 * i + 1)?))
}

/// `n` draws of N(0, 1) from `rng` (Box–Muller), as the random inits of prompt and prefix tuning use them.
pub(crate) fn normal(rng: &mut Rng, n: i64) -> Vec<f32> {
    // A fresh `nn.Embedding` is N(0, 1).
    (0..n)
        .map(|_| {
            let (u1, u2) = (rng.uniform().max(f64::MIN_POSITIVE), rng.uniform());
            ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
        })
        .collect()
}

fn uniform(rng: &mut Rng, n: i64, bound: f64) -> Vec<f32> {
    (0..n).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect()
}

impl CausalLm {
    /// PEFT's token_dim for prefix tuning: head_dim × kv_heads.
    pub fn prefix_token_dim(&self) -> i64 {
        self.cfg.head_dim * self.cfg.num_kv_heads
    }

    /// Adds a fresh trainable prefix (replacing any): the table (or the projection's embedding) N(0, 1), the
    /// projection's linears as torch initialises them (U(±1/√fan_in)), from `seed`.
    pub fn add_prefix_tuning(&mut self, cfg: &PrefixTuningConfig, seed: u64) -> Result<()> {
        let n = cfg.num_virtual_tokens;
        if !(1..=4096).contains(&n) {
            return Err(CoreError::InvalidArgument(format!(
                "adapter.num_virtual_tokens must be in 1..=4096 for prefix tuning, got {n}"
            )));
        }
        if self.prompt_embeddings.is_some() {
            return Err(CoreError::InvalidArgument("prefix tuning cannot be combined with prompt tuning".into()));
        }
        let td = self.prefix_token_dim();
        let width = self.cfg.num_layers * 2 * td;
        let dev = self.device();
        let mut rng = Rng(seed ^ 0xA076_1D64_78BD_642F);
        let leaf = |v: Vec<f32>, shape: &[i64]| -> Result<Tensor> {
            Ok(Tensor::f_from_slice(&v)?.f_view(shape)?.f_to_device(dev)?.f_set_requires_grad(true)?)
        };
        let enc = if cfg.prefix_projection {
            let hidden = cfg.encoder_hidden_size.unwrap_or(td);
            if !(1..=65536).contains(&hidden) {
                return Err(CoreError::InvalidArgument(format!(
                    "adapter.encoder_hidden_size must be in 1..=65536, got {hidden}"
                )));
            }
            let embedding = leaf(normal(&mut rng, n * td), &[n, td])?;
            let (b1, b2) = (1.0 / (td as f64).sqrt(), 1.0 / (hidden as f64).sqrt());
            let transform = [
                leaf(uniform(&mut rng, hidden * td, b1), &[hidden, td])?,
                leaf(uniform(&mut rng, hidden, b1), &[hidden])?,
                leaf(uniform(&mut rng, width * hidden, b2), &[width, hidden])?,
                leaf(uniform(&mut rng, width, b2), &[width])?,
            ];
            PrefixEncoder { embedding, transform: Some(transform) }
        } else {
            PrefixEncoder { embedding: leaf(normal(&mut rng, n * width), &[n, width])?, transform: None }
        };
        self.prefix_tuning = Some(enc);
        Ok(())
    }
}

/// Saves the model's prefix in PEFT's PREFIX_TUNING format (the table as `prompt_embeddings`), and, when it is
/// reparameterised, the raw parameters beside it (`prefix_encoder.safetensors`, which PEFT ignores).
pub fn save_prefix_tuning(model: &CausalLm, cfg: &PrefixTuningConfig, base_model: &str, dir: &Path) -> Result<()> {
    let p = model
        .prefix_tuning
        .as_ref()
        .ok_or_else(|| CoreError::InvalidArgument("the model has no prefix to save".into()))?;
    crate::fsx::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
    let td = model.prefix_token_dim();
    let config = json!({
        "peft_type": "PREFIX_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": p.len(), "token_dim": td,
        "num_transformer_submodules": 1, "num_attention_heads": model.cfg.num_kv_heads, "num_layers": model.cfg.num_layers,
        "encoder_hidden_size": cfg.encoder_hidden_size.unwrap_or(td), "prefix_projection": cfg.prefix_projection,
        "init_weights": null, "base_model_name_or_path": base_model, "inference_mode": true, "peft_version": "0.21.2",
        "modules_to_save": null, "revision": null, "auto_mapping": null,
    });
    write_atomically(
        &dir.join("adapter_config.json"),
        serde_json::to_string_pretty(&config).expect("json").as_bytes(),
    )?;
    let table = tch::no_grad(|| p.table())?;
    save_safetensors(&dir.join("adapter_model.safetensors"), &[("prompt_embeddings".to_owned(), table)])?;
    if p.transform.is_some() {
        save_safetensors(&dir.join(ENCODER_FILE), &p.params())?;
    }
    Ok(())
}

/// The raw parameters of a reparameterised prefix, kept beside the PEFT files.
pub const ENCODER_FILE: &str = "prefix_encoder.safetensors";

/// Loads a PEFT prefix-tuning adapter from `dir` (the table; with `trainable` and a `prefix_encoder.safetensors`
/// beside it, the projection's raw parameters instead, to continue training).
pub fn load_prefix_tuning(model: &mut CausalLm, dir: &Path, trainable: bool) -> Result<()> {
    let cfg_path = dir.join("adapter_config.json");
    let text = crate::fsx::read_to_string(&cfg_path).map_err(|e| CoreError::io(&cfg_path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CoreError::config(&cfg_path, format!("invalid JSON: {e}")))?;
    let int = |k: &str| v[k].as_i64().ok_or_else(|| CoreError::config(&cfg_path, format!("missing integer `{k}`")));
    let (n, td, layers) = (int("num_virtual_tokens")?, int("token_dim")?, int("num_layers")?);
    if v["num_transformer_submodules"].as_i64().unwrap_or(1) != 1 {
        return Err(CoreError::config(&cfg_path, "num_transformer_submodules other than 1 is not supported"));
    }
    if td != model.prefix_token_dim() || layers != model.cfg.num_layers {
        return Err(CoreError::config(
            &cfg_path,
            format!(
                "token_dim {td} × num_layers {layers} do not fit this model (head_dim × kv_heads = {}, {} layers)",
                model.prefix_token_dim(),
                model.cfg.num_layers
            ),
        ));
    }
    let dev = model.device();
    let raw = dir.join(ENCODER_FILE);
    let enc = if trainable && crate::fsx::is_file(&raw) {
        let files = WeightFiles::open_files(&[raw])?;
        let get = |k: &str| -> Result<Tensor> { Ok(files.load_raw(k)?.f_to_device(dev)?.f_set_requires_grad(true)?) };
        let embedding = get("embedding.weight")?;
        let transform = [get(PARAM_NAMES[0])?, get(PARAM_NAMES[1])?, get(PARAM_NAMES[2])?, get(PARAM_NAMES[3])?];
        PrefixEncoder { embedding, transform: Some(transform) }
    } else {
        let files = WeightFiles::open_files(&[dir.join("adapter_model.safetensors")])?;
        let table = files.load("prompt_embeddings", &[n, layers * 2 * td], Kind::Float, dev)?;
        PrefixEncoder { embedding: table.f_set_requires_grad(true)?, transform: None }
    };
    model.prompt_embeddings = None;
    model.prefix_tuning = Some(enc);
    Ok(())
}

/// Prefix tuning as the trained state.
pub struct PrefixState {
    /// The settings (recorded in the config).
    pub cfg: PrefixTuningConfig,
    /// `base_model_name_or_path`.
    pub base_model: String,
}

impl crate::train::TrainableState for PrefixState {
    fn params(&self, model: &mut CausalLm) -> Vec<(String, Tensor)> {
        model.prefix_tuning.as_ref().map(|p| p.params()).unwrap_or_default()
    }

    fn save(&self, model: &mut CausalLm, dir: &Path) -> Result<()> {
        save_prefix_tuning(model, &self.cfg, &self.base_model, dir)
    }

    fn load(&self, model: &mut CausalLm, dir: &Path) -> Result<()> {
        load_prefix_tuning(model, dir, true)
    }
}
