//! The reference-free preference objectives on pairs, as TRL 1.16 computes them: **ORPO** (`ORPOTrainer`,
//! Hong et al. 2024) and **SimPO** (`CPOTrainer` with `loss_type: simpo`, Meng et al. 2024). Both score the
//! chosen and rejected completions by their mean log-prob per completion token (TRL's `average_log_prob`).
//!
//! - ORPO: `loss = NLL − mean_i β · log σ(log_odds_i)` with `log_odds = (c − r) − (log(1 − eᶜ) − log(1 − eʳ))`
//!   and NLL the token-mean cross-entropy of the chosen sequences over **every** token after the first, the
//!   prompt included (TRL: "orpo chosen nll loss is computed over the full prompt and response").
//! - SimPO: `loss = mean_i [−(1 − ε) log σ(β(c − r) − γ) − ε log σ(−(β(c − r) − γ))] + α · NLL`, NLL over the
//!   chosen completion tokens only (`cpo_alpha` α defaults to 1, as in TRL).
//!
//! One unit per pair: a micro-batch's loss sum is B × its mean loss, so that accumulated micro-batches of
//! equal size average as transformers' Trainer does.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::logps::{backward, scored_pass, SeqLogp};
use super::loss::{log_sigmoid, sigmoid, LossSum};
use super::sft::SftExample;
use super::{MetricSums, Objective};
use crate::error::{CoreError, Result};
use crate::models::CausalLm;

/// ORPO hyperparameters (TRL's `ORPOConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrpoConfig {
    /// β (the paper's λ): weight of the odds-ratio term.
    pub beta: f64,
}

impl Default for OrpoConfig {
    fn default() -> Self {
        Self { beta: 0.1 }
    }
}

/// SimPO hyperparameters (TRL's `CPOConfig` with `loss_type: simpo`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimpoConfig {
    /// β: scale of the length-normalised reward.
    pub beta: f64,
    /// γ: the target reward margin.
    pub simpo_gamma: f64,
    /// α: weight of the chosen completions' NLL (0 for the paper's pure SimPO).
    pub cpo_alpha: f64,
    /// ε: label smoothing, in [0, 0.5).
    pub label_smoothing: f64,
}

impl Default for SimpoConfig {
    fn default() -> Self {
        Self { beta: 0.1, simpo_gamma: 0.5, cpo_alpha: 1.0, label_smoothing: 0.0 }
    }
}

fn positive(name: &str, v: f64) -> Result<()> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(CoreError::InvalidArgument(format!("{name} must be positive, got {v}")))
    }
}

impl OrpoConfig {
    /// Rejects values no run can use.
    pub fn validate(&self) -> Result<()> {
        positive("orpo.beta", self.beta)
    }
}

impl SimpoConfig {
    /// Rejects values no run can use.
    pub fn validate(&self) -> Result<()> {
        positive("simpo.beta", self.beta)?;
        if !self.simpo_gamma.is_finite() {
            return Err(CoreError::InvalidArgument(format!(
                "simpo.simpo_gamma must be finite, got {}",
                self.simpo_gamma
            )));
        }
        if !(self.cpo_alpha.is_finite() && self.cpo_alpha >= 0.0) {
            return Err(CoreError::InvalidArgument(format!("simpo.cpo_alpha must be >= 0, got {}", self.cpo_alpha)));
        }
        if !(0.0..0.5).contains(&self.label_smoothing) {
            return Err(CoreError::InvalidArgument(format!(
                "simpo.label_smoothing must be in [0, 0.5), got {}",
                self.label_smoothing
            )));
        }
        Ok(())
    }
}

/// A batch's loss as TRL reduces it, and its derivatives with respect to each pair's mean completion
/// log-probs and to the NLL term.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchLoss {
    /// The batch loss (a mean over pairs, plus the NLL term).
    pub loss: f64,
    /// ∂loss / ∂ mean log π(chosen_i).
    pub d_chosen: Vec<f64>,
    /// ∂loss / ∂ mean log π(rejected_i).
    pub d_rejected: Vec<f64>,
    /// ∂loss / ∂NLL.
    pub d_nll: f64,
    /// ORPO: each pair's log-odds (empty for SimPO).
    pub log_odds: Vec<f64>,
}

/// log(1 − eˣ) for x < 0, stable at both ends (TRL's `log1mexp`).
fn log1mexp(x: f64) -> f64 {
    if x < -std::f64::consts::LN_2 {
        (-x.exp()).ln_1p()
    } else {
        (-x.exp_m1()).ln()
    }
}

/// ORPO's batch loss from the pairs' mean completion log-probs and the chosen NLL.
pub fn orpo_batch(chosen: &[f64], rejected: &[f64], nll: f64, beta: f64) -> BatchLoss {
    let n = chosen.len().max(1) as f64;
    let mut out = BatchLoss { loss: nll, d_chosen: vec![], d_rejected: vec![], d_nll: 1.0, log_odds: vec![] };
    for (&c, &r) in chosen.iter().zip(rejected) {
        let lo = (c - r) - (log1mexp(c) - log1mexp(r));
        out.loss -= beta * log_sigmoid(lo) / n;
        // d log σ(lo) / d lo = σ(−lo); d lo / dc = 1 / (1 − eᶜ).
        let g = -beta * sigmoid(-lo) / n;
        out.d_chosen.push(g / -c.exp_m1());
        out.d_rejected.push(-g / -r.exp_m1());
        out.log_odds.push(lo);
    }
    out
}

/// SimPO's batch loss from the pairs' mean completion log-probs and the chosen completions' NLL.
pub fn simpo_batch(chosen: &[f64], rejected: &[f64], nll: f64, cfg: &SimpoConfig) -> BatchLoss {
    let n = chosen.len().max(1) as f64;
    let (b, e) = (cfg.beta, cfg.label_smoothing);
    let mut out = BatchLoss {
        loss: cfg.cpo_alpha * nll,
        d_chosen: vec![],
        d_rejected: vec![],
        d_nll: cfg.cpo_alpha,
        log_odds: vec![],
    };
    for (&c, &r) in chosen.iter().zip(rejected) {
        let z = b * (c - r - cfg.simpo_gamma / b);
        out.loss += (-(1.0 - e) * log_sigmoid(z) - e * log_sigmoid(-z)) / n;
        let g = b * (-(1.0 - e) * sigmoid(-z) + e * sigmoid(z)) / n;
        out.d_chosen.push(g);
        out.d_rejected.push(-g);
    }
    out
}

/// Which reference-free objective.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RefFree {
    /// ORPO.
    Orpo(OrpoConfig),
    /// SimPO.
    Simpo(SimpoConfig),
}

/// The ORPO / SimPO objective over (chosen, rejected) pairs (completions labelled), one unit per pair.
pub struct RefFreeObjective {
    /// Padding id.
    pub pad_id: u32,
    /// Rows of logits per chunk.
    pub chunk: i64,
    /// The method and its settings.
    pub method: RefFree,
    metrics: MetricSums,
}

impl RefFreeObjective {
    /// The objective.
    pub fn new(pad_id: u32, chunk: i64, method: RefFree) -> Self {
        Self { pad_id, chunk, method, metrics: MetricSums::default() }
    }

    /// The pass over the batch (chosen sequences scored in full for ORPO's NLL), the batch loss and the
    /// per-sequence coefficients of `B × loss` (completion sums, whole-sequence sums).
    fn pass(
        &self,
        model: &CausalLm,
        batch: &[&(SftExample, SftExample)],
        prefix: &str,
    ) -> Result<(BatchLoss, super::logps::Scored, Vec<f64>, Vec<f64>)> {
        let b = batch.len();
        let seqs: Vec<&SftExample> = batch.iter().map(|p| &p.0).chain(batch.iter().map(|p| &p.1)).collect();
        let orpo = matches!(self.method, RefFree::Orpo(_));
        let full: Vec<bool> = (0..2 * b).map(|i| orpo && i < b).collect();
        let (scored, lps) = scored_pass(model, &seqs, &full, self.pad_id, self.chunk)?;
        let (chosen, rejected): (Vec<SeqLogp>, Vec<SeqLogp>) = (lps[..b].to_vec(), lps[b..].to_vec());
        let means = |v: &[SeqLogp]| v.iter().map(SeqLogp::completion_mean).collect::<Vec<_>>();
        let (cm, rm) = (means(&chosen), means(&rejected));
        // The NLL's tokens: every scored token of the chosen sequences (ORPO) or their completions (SimPO).
        let (nll_sum, nll_tokens) = chosen.iter().fold((0.0, 0usize), |(s, n), x| {
            if orpo {
                (s - x.all, n + x.all_tokens)
            } else {
                (s - x.completion, n + x.completion_tokens)
            }
        });
        let nll = nll_sum / nll_tokens.max(1) as f64;
        let (loss, beta) = match self.method {
            RefFree::Orpo(c) => (orpo_batch(&cm, &rm, nll, c.beta), c.beta),
            RefFree::Simpo(c) => (simpo_batch(&cm, &rm, nll, &c), c.beta),
        };
        // Coefficients of B × loss on the sums: ∂/∂Σ = ∂/∂mean / tokens; the NLL is −Σ / N over its tokens.
        let bf = b as f64;
        let d_nll_sum = -bf * loss.d_nll / nll_tokens.max(1) as f64;
        let mut coef_comp = vec![0.0; 2 * b];
        let mut coef_all = vec![0.0; 2 * b];
        for i in 0..b {
            coef_comp[i] = bf * loss.d_chosen[i] / chosen[i].completion_tokens.max(1) as f64;
            coef_comp[b + i] = bf * loss.d_rejected[i] / rejected[i].completion_tokens.max(1) as f64;
            if orpo {
                coef_all[i] = d_nll_sum;
            } else {
                coef_comp[i] += d_nll_sum;
            }
        }
        for i in 0..b {
            self.metrics.add_rewards(prefix, beta * cm[i], beta * rm[i]);
            self.metrics.add(prefix, &[("logps/chosen", cm[i]), ("logps/rejected", rm[i]), ("nll_loss", nll)]);
            if let Some(&lo) = loss.log_odds.get(i) {
                self.metrics.add(prefix, &[("log_odds_ratio", log_sigmoid(lo)), ("log_odds_chosen", lo)]);
            }
        }
        Ok((loss, scored, coef_comp, coef_all))
    }
}

impl Objective for RefFreeObjective {
    type Example = (SftExample, SftExample);

    fn units(&self, _: &Self::Example) -> usize {
        1
    }

    fn backward(&self, model: &CausalLm, batch: &[&Self::Example], scale: f64) -> Result<LossSum> {
        let (loss, scored, comp, all) = self.pass(model, batch, "")?;
        let s = |v: Vec<f64>| v.into_iter().map(|x| x * scale).collect::<Vec<_>>();
        backward(model, &scored, &s(comp), &s(all), self.chunk)?;
        Ok(LossSum { nll: loss.loss * batch.len() as f64, tokens: batch.len() })
    }

    fn eval(&self, model: &CausalLm, batch: &[&Self::Example]) -> Result<LossSum> {
        let _guard = tch::no_grad_guard();
        let (loss, ..) = self.pass(model, batch, "eval_")?;
        Ok(LossSum { nll: loss.loss * batch.len() as f64, tokens: batch.len() })
    }

    fn take_metrics(&self) -> BTreeMap<String, f64> {
        self.metrics.take()
    }

    fn take_metric_sums(&self) -> BTreeMap<String, (f64, usize)> {
        self.metrics.take_sums()
    }
}
