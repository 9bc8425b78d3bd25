//! Direct preference optimisation as TRL writes it (reverse-KL scores `policy − reference` of the summed
//! completion log-probs): losses `sigmoid` −log σ(βδ), `hinge` relu(1 − βδ), `ipo` (δ per completion token −
//! 1/(2β))², and `robust` (label smoothing ε) [−(1−ε) log σ(βδ) + ε log σ(−βδ)] / (1 − 2ε), where δ is the
//! chosen score minus the rejected one. Reference log-probs are computed once (adapter disabled) and carried
//! by the examples.
//!
//! The backward pass never holds full-vocabulary logits for the batch: a first pass (no gradients) gives
//! each sequence's log-prob in chunks; the loss's derivative with respect to each sequence's log-prob is a
//! scalar, so a second chunked pass backpropagates Σ coef_seq · log p(token) into the detached final hidden
//! states, whose gradient then goes through the network once.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::loss::{LossSum, IGNORE_INDEX};
use super::sft::{SftExample, SftObjective};
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

fn log_sigmoid(x: f64) -> f64 {
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        x.exp() / (1.0 + x.exp())
    }
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

/// Rows of `hidden` that predict a labelled token, those tokens, and the batch row each belongs to.
pub(super) fn scored_rows(hidden: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (_, s, h) = hidden.size3()?;
    let pred = hidden.f_narrow(1, 0, s - 1)?.f_reshape([-1, h])?;
    let target = labels.f_narrow(1, 1, s - 1)?.f_reshape([-1])?.f_to_device(hidden.device())?;
    let keep = target.f_ne(IGNORE_INDEX)?.f_nonzero()?.f_squeeze_dim(1)?;
    let seq = keep.f_div_scalar_mode(s - 1, "floor")?;
    Ok((pred.f_index_select(0, &keep)?, target.f_index_select(0, &keep)?, seq))
}

fn token_logps(model: &CausalLm, rows: &Tensor, target: &Tensor) -> Result<Tensor> {
    let lp = model.logits(rows)?.f_log_softmax(-1, Kind::Float)?;
    Ok(lp.f_gather(1, &target.f_unsqueeze(1)?, false)?.f_squeeze_dim(1)?)
}

/// Per-sequence summed log-probs (and scored token counts) of `seqs` (labels mark what is scored), without
/// gradients. The reference pass of DPO (call it with the adapter disabled).
pub fn sequence_logps(model: &CausalLm, seqs: &[&SftExample], pad_id: u32, chunk: i64) -> Result<Vec<(f64, usize)>> {
    let _guard = tch::no_grad_guard();
    Ok(scored_pass(model, seqs, pad_id, chunk)?.1)
}

/// Scored rows of final hidden states, their target tokens and the sequence of each.
type ScoredRows = (Tensor, Tensor, Tensor);

/// The scored rows of `seqs`' final hidden states (with the graph when gradients are on: rows, their target
/// tokens, the sequence of each) and each sequence's summed log-prob and token count (computed without
/// gradients, `chunk` rows of logits at a time).
fn scored_pass(
    model: &CausalLm,
    seqs: &[&SftExample],
    pad_id: u32,
    chunk: i64,
) -> Result<(ScoredRows, Vec<(f64, usize)>)> {
    let collate = SftObjective { pad_id, chunk, gradient_checkpointing: false };
    let c = collate.collate(model, seqs)?;
    let hidden = model.forward_hidden(&c.ids, c.mask.as_ref(), c.positions.as_ref())?;
    let (rows, target, seq) = scored_rows(&hidden, &c.labels)?;
    let _guard = tch::no_grad_guard();
    let detached = rows.f_detach()?;
    let n = detached.size()[0];
    let mut sums = Tensor::f_zeros([seqs.len() as i64], (Kind::Float, rows.device()))?;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let lp = token_logps(model, &detached.f_narrow(0, start, len)?, &target.f_narrow(0, start, len)?)?;
        sums = sums.f_index_add(0, &seq.f_narrow(0, start, len)?, &lp)?;
        start += len;
    }
    let counts = Tensor::f_zeros([seqs.len() as i64], (Kind::Int64, seq.device()))?.f_index_add(
        0,
        &seq,
        &Tensor::f_ones_like(&seq)?,
    )?;
    let sums = Vec::<f64>::try_from(&sums.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?)?;
    let counts = Vec::<i64>::try_from(&counts.f_to_device(tch::Device::Cpu)?)?;
    Ok(((rows, target, seq), sums.into_iter().zip(counts.into_iter().map(|c| c as usize)).collect()))
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
    fn losses(
        &self,
        model: &CausalLm,
        batch: &[&DpoExample],
        prefix: &str,
    ) -> Result<(Vec<PairLoss>, Tensor, Tensor, Tensor)> {
        let seqs: Vec<&SftExample> = batch.iter().map(|e| &e.chosen).chain(batch.iter().map(|e| &e.rejected)).collect();
        let ((rows, target, seq), lps) = scored_pass(model, &seqs, self.pad_id, self.chunk)?;
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
        Ok((out.into_iter().map(|(l, _)| l).collect(), rows, target, seq))
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
        let (losses, rows, target, seq) = self.losses(model, batch, "")?;
        let b = batch.len();
        let mut coef = vec![0f32; 2 * b];
        for (i, l) in losses.iter().enumerate() {
            coef[i] = (l.d_chosen * scale) as f32;
            coef[b + i] = (l.d_rejected * scale) as f32;
        }
        let n = rows.size()[0];
        if n > 0 {
            let coef = Tensor::f_from_slice(&coef)?.f_to_device(rows.device())?.f_index_select(0, &seq)?;
            let detached = rows.f_detach()?.f_set_requires_grad(true)?;
            let mut start = 0;
            while start < n {
                let len = self.chunk.min(n - start);
                let lp = token_logps(model, &detached.f_narrow(0, start, len)?, &target.f_narrow(0, start, len)?)?;
                lp.f_mul(&coef.f_narrow(0, start, len)?)?.f_sum(Kind::Float)?.f_backward()?;
                start += len;
            }
            rows.f_mul(&detached.grad())?.f_sum(Kind::Float)?.f_backward()?;
        }
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
}
