//! Direct preference optimisation as TRL writes it (reverse-KL scores `policy − reference` of the summed
//! completion log-probs): losses `sigmoid` −log σ(βδ), `hinge` relu(1 − βδ), `ipo` (δ per completion token −
//! 1/(2β))², and `robust` (label smoothing ε) [−(1−ε) log σ(βδ) + ε log σ(−βδ)] / (1 − 2ε), where δ is the
//! chosen score minus the rejected one. Reference log-probs are computed once (adapter disabled) and carried
//! by the examples.
//!
//! The backward pass never holds full-vocabulary logits for the batch (see [`super::logps`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use super::logps::sequence_logps;
use super::logps::{backward, scored_pass, Scored};
use super::loss::{log_sigmoid, sigmoid, LossSum};
use super::sft::SftExample;
use super::{MetricSums, Objective};
use crate::error::{CoreError, Result};
use crate::models::CausalLm;

/// The DPO loss family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DpoLoss {
    /// −log σ(βδ) (the DPO paper).
    #[default]
    Sigmoid,
    /// relu(1 − βδ) (SLiC).
    Hinge,
    /// (δ per token − 1/(2β))² (IPO, length-normalised as TRL does).
    Ipo,
    /// Label-smoothed sigmoid, unbiased for noisy preferences (rDPO).
    Robust,
}

/// DPO hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpoConfig {
    /// β: strength of the KL regularisation toward the reference.
    pub beta: f64,
    /// Which loss.
    pub loss_type: DpoLoss,
    /// ε of the robust loss, in [0, 0.5).
    pub label_smoothing: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        Self { beta: 0.1, loss_type: DpoLoss::Sigmoid, label_smoothing: 0.0 }
    }
}

impl DpoConfig {
    /// Rejects values no run can use.
    pub fn validate(&self) -> Result<()> {
        if !(self.beta.is_finite() && self.beta > 0.0) {
            return Err(CoreError::InvalidArgument(format!("dpo.beta must be positive, got {}", self.beta)));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(CoreError::InvalidArgument(format!(
                "dpo.label_smoothing must be in [0, 0.5), got {}",
                self.label_smoothing
            )));
        }
        if self.label_smoothing > 0.0 && self.loss_type != DpoLoss::Robust {
            return Err(CoreError::InvalidArgument("dpo.label_smoothing applies to loss_type robust only".into()));
        }
        Ok(())
    }
}

/// Summed completion log-probs of one pair under the policy and the reference, with token counts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLogps {
    /// log π(chosen | prompt).
    pub chosen: f64,
    /// log π(rejected | prompt).
    pub rejected: f64,
    /// log π_ref(chosen | prompt).
    pub ref_chosen: f64,
    /// log π_ref(rejected | prompt).
    pub ref_rejected: f64,
    /// Completion tokens of chosen.
    pub chosen_tokens: usize,
    /// Completion tokens of rejected.
    pub rejected_tokens: usize,
}

/// One pair's loss, its derivatives with respect to the policy log-probs, and the implicit rewards.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PairLoss {
    /// The loss.
    pub loss: f64,
    /// ∂loss / ∂ log π(chosen).
    pub d_chosen: f64,
    /// ∂loss / ∂ log π(rejected).
    pub d_rejected: f64,
    /// β (log π(chosen) − log π_ref(chosen)).
    pub reward_chosen: f64,
    /// β (log π(rejected) − log π_ref(rejected)).
    pub reward_rejected: f64,
}

/// The loss of one pair.
pub fn pair_loss(p: &PairLogps, cfg: &DpoConfig) -> PairLoss {
    let b = cfg.beta;
    let (sc, sr) = (p.chosen - p.ref_chosen, p.rejected - p.ref_rejected);
    let d = sc - sr;
    let (loss, dd) = match cfg.loss_type {
        DpoLoss::Sigmoid => (-log_sigmoid(b * d), -b * sigmoid(-b * d)),
        DpoLoss::Hinge => {
            let m = 1.0 - b * d;
            if m > 0.0 {
                (m, -b)
            } else {
                (0.0, 0.0)
            }
        }
        DpoLoss::Robust => {
            let e = cfg.label_smoothing;
            let loss = (-(1.0 - e) * log_sigmoid(b * d) + e * log_sigmoid(-b * d)) / (1.0 - 2.0 * e);
            (loss, -b * ((1.0 - e) * sigmoid(-b * d) + e * sigmoid(b * d)) / (1.0 - 2.0 * e))
        }
        DpoLoss::Ipo => {
            let (nc, nr) = (p.chosen_tokens.max(1) as f64, p.rejected_tokens.max(1) as f64);
            let u = sc / nc - sr / nr - 1.0 / (2.0 * b);
            let out = PairLoss {
                loss: u * u,
                d_chosen: 2.0 * u / nc,
                d_rejected: -2.0 * u / nr,
                reward_chosen: b * sc,
                reward_rejected: b * sr,
            };
            return out;
        }
    };
    PairLoss { loss, d_chosen: dd, d_rejected: -dd, reward_chosen: b * sc, reward_rejected: b * sr }
}

/// A preference pair: both sequences with their completion labelled, and the reference log-probs.
#[derive(Debug, Clone, PartialEq)]
pub struct DpoExample {
    /// Prompt + chosen completion (labels on the completion).
    pub chosen: SftExample,
    /// Prompt + rejected completion.
    pub rejected: SftExample,
    /// log π_ref(chosen | prompt).
    pub ref_chosen: f64,
    /// log π_ref(rejected | prompt).
    pub ref_rejected: f64,
}

/// The DPO objective (one unit per pair).
pub struct DpoObjective {
    /// Padding id.
    pub pad_id: u32,
    /// Rows of logits per chunk.
    pub chunk: i64,
    /// Loss and β.
    pub cfg: DpoConfig,
    metrics: MetricSums,
}

impl DpoObjective {
    /// The objective.
    pub fn new(pad_id: u32, chunk: i64, cfg: DpoConfig) -> Self {
        Self { pad_id, chunk, cfg, metrics: MetricSums::default() }
    }

    /// Policy log-probs of the batch's chosen and rejected sequences (no gradients), the pair losses, and the
    /// scored rows for the gradient pass.
    fn losses(&self, model: &CausalLm, batch: &[&DpoExample], prefix: &str) -> Result<(Vec<PairLoss>, Scored)> {
        let seqs: Vec<&SftExample> = batch.iter().map(|e| &e.chosen).chain(batch.iter().map(|e| &e.rejected)).collect();
        let (scored, lps) = scored_pass(model, &seqs, &[], self.pad_id, self.chunk)?;
        let lps: Vec<(f64, usize)> = lps.iter().map(|s| (s.completion, s.completion_tokens)).collect();
        let b = batch.len();
        let out = batch
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let p = PairLogps {
                    chosen: lps[i].0,
                    rejected: lps[b + i].0,
                    ref_chosen: e.ref_chosen,
                    ref_rejected: e.ref_rejected,
                    chosen_tokens: lps[i].1,
                    rejected_tokens: lps[b + i].1,
                };
                (pair_loss(&p, &self.cfg), p)
            })
            .collect::<Vec<_>>();
        self.record(prefix, &out);
        Ok((out.into_iter().map(|(l, _)| l).collect(), scored))
    }

    fn record(&self, prefix: &str, pairs: &[(PairLoss, PairLogps)]) {
        for (l, p) in pairs {
            self.metrics.add_rewards(prefix, l.reward_chosen, l.reward_rejected);
            self.metrics.add(prefix, &[("logps/chosen", p.chosen), ("logps/rejected", p.rejected)]);
        }
    }
}

impl Objective for DpoObjective {
    type Example = DpoExample;

    fn units(&self, _: &DpoExample) -> usize {
        1
    }

    fn backward(&self, model: &CausalLm, batch: &[&DpoExample], scale: f64) -> Result<LossSum> {
        let (losses, scored) = self.losses(model, batch, "")?;
        let b = batch.len();
        let mut coef = vec![0f64; 2 * b];
        for (i, l) in losses.iter().enumerate() {
            coef[i] = l.d_chosen * scale;
            coef[b + i] = l.d_rejected * scale;
        }
        backward(model, &scored, &coef, &vec![0.0; 2 * b], self.chunk)?;
        Ok(LossSum { nll: losses.iter().map(|l| l.loss).sum(), tokens: b })
    }

    fn eval(&self, model: &CausalLm, batch: &[&DpoExample]) -> Result<LossSum> {
        let _guard = tch::no_grad_guard();
        let (losses, ..) = self.losses(model, batch, "eval_")?;
        Ok(LossSum { nll: losses.iter().map(|l| l.loss).sum(), tokens: batch.len() })
    }

    fn take_metrics(&self) -> BTreeMap<String, f64> {
        self.metrics.take()
    }

    fn take_metric_sums(&self) -> BTreeMap<String, (f64, usize)> {
        self.metrics.take_sums()
    }
}
