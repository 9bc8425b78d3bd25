//! Reward models: the base LM (with LoRA / QLoRA) plus a scalar head `score` `[1, hidden]` on the final
//! hidden state of each sequence's last token (right padding, so the last real token — what transformers'
//! `*ForSequenceClassification` picks as the last non-pad token). Trained on preference pairs with TRL's
//! `RewardTrainer` loss: −log σ(r_chosen − r_rejected − margin), plus `center_rewards_coefficient ·
//! (r_chosen + r_rejected)²` when set. Saved PEFT-style as `SEQ_CLS` with `modules_to_save: ["score"]` and
//! the head as `base_model.model.score.weight`.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::loss::LossSum;
use super::sft::{SftExample, SftObjective};
use super::{MetricSums, Objective, TrainableState};
use crate::error::{CoreError, Result};
use crate::lora::{load_peft, save_peft, LoraConfig};
use crate::models::CausalLm;
use crate::sampling::Rng;
use crate::weights::WeightFiles;

/// The head's key in the adapter file.
pub const SCORE_KEY: &str = "base_model.model.score.weight";

/// Reward-model loss settings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RewardConfig {
    /// Subtracted from r_chosen − r_rejected (a required gap).
    pub margin: f64,
    /// Weight of the reward-centering term (r_chosen + r_rejected)²; 0 = off.
    pub center_rewards_coefficient: f64,
}

impl RewardConfig {
    /// Rejects values no run can use.
    pub fn validate(&self) -> Result<()> {
        if !self.margin.is_finite()
            || !(self.center_rewards_coefficient.is_finite() && self.center_rewards_coefficient >= 0.0)
        {
            return Err(CoreError::InvalidArgument(
                "reward.margin must be finite and reward.center_rewards_coefficient >= 0".into(),
            ));
        }
        Ok(())
    }
}

impl CausalLm {
    /// Adds a fresh score head, N(0, 0.02²) like transformers' initializer, from `seed`.
    pub fn add_score_head(&mut self, seed: u64) -> Result<()> {
        let h = self.cfg.hidden_size;
        let mut rng = Rng::for_row(seed, 0xC0DE);
        let vals: Vec<f32> = (0..h)
            .map(|_| {
                let (u1, u2) = (rng.uniform().max(1e-12), rng.uniform());
                ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos() * 0.02) as f32
            })
            .collect();
        self.score =
            Some(Tensor::f_from_slice(&vals)?.f_view([1, h])?.f_to_device(self.device())?.f_set_requires_grad(true)?);
        Ok(())
    }

    /// Scores of sequences from their final hidden states: the head applied at index `last[i]` of row i.
    ///
    /// # Shapes
    /// `hidden`: `[b, s, h]` → `[b]` (f32).
    pub fn sequence_scores(&self, hidden: &Tensor, last: &[i64]) -> Result<Tensor> {
        let head = self
            .score
            .as_ref()
            .ok_or_else(|| CoreError::InvalidArgument("the model has no score head (not a reward model)".into()))?;
        let (b, _, h) = hidden.size3()?;
        let idx =
            Tensor::f_from_slice(last)?.f_to_device(hidden.device())?.f_view([b, 1, 1])?.f_expand([b, 1, h], false)?;
        let x = hidden.f_gather(1, &idx, false)?.f_squeeze_dim(1)?.f_to_kind(Kind::Float)?;
        Ok(x.f_linear::<Tensor>(head, None)?.f_squeeze_dim(1)?)
    }
}

/// Scores of `seqs` (each scored at its last token), `[n]`, with gradients when enabled.
pub fn score_sequences(model: &CausalLm, seqs: &[&SftExample], pad_id: u32) -> Result<Tensor> {
    let collate = SftObjective { pad_id, chunk: 1, gradient_checkpointing: false };
    let c = collate.collate(model, seqs)?;
    let hidden = model.forward_hidden(&c.ids, c.mask.as_ref(), c.positions.as_ref())?;
    let last: Vec<i64> = seqs.iter().map(|e| e.input_ids.len() as i64 - 1).collect();
    model.sequence_scores(&hidden, &last)
}

/// A preference pair for reward modelling.
#[derive(Debug, Clone, PartialEq)]
pub struct RewardExample {
    /// Prompt + chosen response.
    pub chosen: SftExample,
    /// Prompt + rejected response.
    pub rejected: SftExample,
}

/// The Bradley–Terry objective (one unit per pair).
pub struct RewardObjective {
    /// Padding id.
    pub pad_id: u32,
    /// Margin and centering.
    pub cfg: RewardConfig,
    metrics: MetricSums,
}

impl RewardObjective {
    /// The objective.
    pub fn new(pad_id: u32, cfg: RewardConfig) -> Self {
        Self { pad_id, cfg, metrics: MetricSums::default() }
    }

    /// Per-pair losses `[b]` (with gradients when enabled), recording metrics under `prefix`.
    fn losses(&self, model: &CausalLm, batch: &[&RewardExample], prefix: &str) -> Result<Tensor> {
        let seqs: Vec<&SftExample> = batch.iter().map(|e| &e.chosen).chain(batch.iter().map(|e| &e.rejected)).collect();
        let r = score_sequences(model, &seqs, self.pad_id)?;
        let b = batch.len() as i64;
        let (rc, rr) = (r.f_narrow(0, 0, b)?, r.f_narrow(0, b, b)?);
        let mut loss = rc.f_sub(&rr)?.f_sub_scalar(self.cfg.margin)?.f_log_sigmoid()?.f_neg()?;
        if self.cfg.center_rewards_coefficient > 0.0 {
            loss = loss.f_add(&rc.f_add(&rr)?.f_square()?.f_mul_scalar(self.cfg.center_rewards_coefficient)?)?;
        }
        let (c, j) = (
            Vec::<f32>::try_from(&rc.f_detach()?.f_to_device(tch::Device::Cpu)?)?,
            Vec::<f32>::try_from(&rr.f_detach()?.f_to_device(tch::Device::Cpu)?)?,
        );
        for (x, y) in c.iter().zip(&j) {
            self.metrics.add_rewards(prefix, *x as f64, *y as f64);
        }
        Ok(loss)
    }
}

impl Objective for RewardObjective {
    type Example = RewardExample;

    fn units(&self, _: &RewardExample) -> usize {
        1
    }

    fn backward(&self, model: &CausalLm, batch: &[&RewardExample], scale: f64) -> Result<LossSum> {
        let l = self.losses(model, batch, "")?;
        let sum = l.f_sum(Kind::Float)?;
        let value = sum.f_double_value(&[])?;
        sum.f_mul_scalar(scale)?.f_backward()?;
        Ok(LossSum { nll: value, tokens: batch.len() })
    }

    fn eval(&self, model: &CausalLm, batch: &[&RewardExample]) -> Result<LossSum> {
        let _guard = tch::no_grad_guard();
        let l = self.losses(model, batch, "eval_")?;
        Ok(LossSum { nll: l.f_sum(Kind::Float)?.f_double_value(&[])?, tokens: batch.len() })
    }

    fn take_metrics(&self) -> BTreeMap<String, f64> {
        self.metrics.take()
    }

    fn take_metric_sums(&self) -> BTreeMap<String, (f64, usize)> {
        self.metrics.take_sums()
    }
}

/// LoRA adapters plus the score head, saved PEFT-style as `SEQ_CLS`.
pub struct RewardState {
    /// The adapters' hyperparameters.
    pub cfg: LoraConfig,
    /// `base_model_name_or_path`.
    pub base_model: String,
}

impl TrainableState for RewardState {
    fn params(&self, model: &mut CausalLm) -> Vec<(String, Tensor)> {
        let mut p = model.lora_tensors();
        if let Some(s) = &model.score {
            p.push((SCORE_KEY.to_owned(), s.shallow_clone()));
        }
        p
    }

    fn save(&self, model: &mut CausalLm, dir: &Path) -> Result<()> {
        save_reward_model(model, &self.cfg, &self.base_model, dir)
    }

    fn load(&self, model: &mut CausalLm, dir: &Path) -> Result<()> {
        load_reward_model(model, dir)
    }
}

/// Saves LoRA + head: `adapter_config.json` with `task_type: SEQ_CLS`, `modules_to_save: ["score"]`,
/// `num_labels` = 1, and the head in `adapter_model.safetensors` as [`SCORE_KEY`].
pub fn save_reward_model(model: &mut CausalLm, cfg: &LoraConfig, base_model: &str, dir: &Path) -> Result<()> {
    let head = model
        .score
        .as_ref()
        .ok_or_else(|| CoreError::InvalidArgument("the model has no score head".into()))?
        .shallow_clone();
    save_peft(model, cfg, base_model, dir)?;
    let cfg_path = dir.join("adapter_config.json");
    let text = crate::fsx::read_to_string(&cfg_path).map_err(|e| CoreError::io(&cfg_path, e))?;
    let mut v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CoreError::config(&cfg_path, e.to_string()))?;
    v["task_type"] = serde_json::json!("SEQ_CLS");
    v["modules_to_save"] = serde_json::json!(["classifier", "score"]);
    crate::weights::write_atomically(&cfg_path, serde_json::to_string_pretty(&v).expect("json").as_bytes())?;
    let mut tensors = model.lora_tensors();
    tensors.push((SCORE_KEY.to_owned(), head));
    crate::weights::save_safetensors(&dir.join("adapter_model.safetensors"), &tensors)
}

/// Loads a reward model adapter (LoRA + head) saved by [`save_reward_model`] (or by PEFT for a `SEQ_CLS`
/// LoRA with a one-label `score` head).
pub fn load_reward_model(model: &mut CausalLm, dir: &Path) -> Result<()> {
    let cfg = load_peft(model, dir)?;
    if cfg.task_type.as_deref() != Some("SEQ_CLS") {
        return Err(CoreError::config(
            dir.join("adapter_config.json"),
            format!("task_type {:?}: a reward model is SEQ_CLS", cfg.task_type),
        ));
    }
    let w = dir.join("adapter_model.safetensors");
    let files = WeightFiles::open_files(std::slice::from_ref(&w))?;
    let h = model.cfg.hidden_size;
    let head = files.load(SCORE_KEY, &[1, h], Kind::Float, model.device())?;
    model.score = Some(head.f_set_requires_grad(true)?);
    Ok(())
}
