//! KTO (Ethayarajh et al. 2024) on unpaired data, as TRL 1.16's `KTOTrainer` computes it: each example is a
//! prompt, a completion and a label (desirable or not); its reward is β (log π − log π_ref) of the summed
//! completion log-probs, compared with a KL baseline estimated on mismatched pairs — prompt i with the
//! completion of example i − 1 of its chunk of `micro_batch_size` examples (TRL's rotation), the policy's
//! log-probs taken without gradients:
//!
//! - `kl = max(0, mean_batch(log π(y′|x) − log π_ref(y′|x)))`, detached;
//! - desirable: `1 − σ(β (logratio − kl))`, undesirable: `1 − σ(β (kl − logratio))` (`loss_type: kto`), or
//!   `1 − σ(β logratio)` / `σ(β logratio)` without a KL term (`apo_zero_unpaired`);
//! - the loss is Σ weight · loss over the batch divided by its size (TRL's `nanmean` of the weighted
//!   losses), one unit per example.
//!
//! Reference log-probs (matched and mismatched) are computed once with the adapter disabled.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::logps::{backward, scored_pass};
use super::loss::{sigmoid, LossSum};
use super::sft::SftExample;
use super::{MetricSums, Objective};
use crate::error::{CoreError, Result};
use crate::models::CausalLm;

/// The KTO loss family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KtoLoss {
    /// The KTO loss with the KL baseline.
    #[default]
    Kto,
    /// APO-zero on unpaired data (no KL term).
    ApoZeroUnpaired,
}

/// KTO hyperparameters (TRL's `KTOConfig`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KtoConfig {
    /// β.
    pub beta: f64,
    /// Weight of the desirable examples' losses.
    pub desirable_weight: f64,
    /// Weight of the undesirable examples' losses.
    pub undesirable_weight: f64,
    /// Which loss.
    pub loss_type: KtoLoss,
}

impl Default for KtoConfig {
    fn default() -> Self {
        Self { beta: 0.1, desirable_weight: 1.0, undesirable_weight: 1.0, loss_type: KtoLoss::Kto }
    }
}

impl KtoConfig {
    /// Rejects values no run can use.
    pub fn validate(&self) -> Result<()> {
        for (name, v) in [
            ("kto.beta", self.beta),
            ("kto.desirable_weight", self.desirable_weight),
            ("kto.undesirable_weight", self.undesirable_weight),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(CoreError::InvalidArgument(format!("{name} must be positive, got {v}")));
            }
        }
        Ok(())
    }
}

/// One example's log-probs: policy and reference, matched and mismatched (KL) completion.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KtoLogps {
    /// Desirable (TRL's `label: true`).
    pub desirable: bool,
    /// log π(y | x).
    pub policy: f64,
    /// log π_ref(y | x).
    pub reference: f64,
    /// log π(y′ | x), the mismatched completion.
    pub policy_kl: f64,
    /// log π_ref(y′ | x).
    pub reference_kl: f64,
}

/// A batch's KTO loss, its derivative with respect to each example's policy log-prob, the KL estimate and
/// the rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct KtoBatch {
    /// Σ weight · loss / batch size.
    pub loss: f64,
    /// ∂loss / ∂ log π(y_i | x_i).
    pub d_policy: Vec<f64>,
    /// The clamped KL estimate (0 for `apo_zero_unpaired`).
    pub kl: f64,
    /// β (log π − log π_ref) per example.
    pub rewards: Vec<f64>,
}

/// The loss of one batch.
pub fn kto_batch(ex: &[KtoLogps], cfg: &KtoConfig) -> KtoBatch {
    let n = ex.len().max(1) as f64;
    let kl = match cfg.loss_type {
        KtoLoss::Kto => (ex.iter().map(|e| e.policy_kl - e.reference_kl).sum::<f64>() / n).max(0.0),
        KtoLoss::ApoZeroUnpaired => 0.0,
    };
    let b = cfg.beta;
    let mut out = KtoBatch { loss: 0.0, d_policy: vec![], kl, rewards: vec![] };
    for e in ex {
        let lr = e.policy - e.reference;
        // loss = 1 − σ(z) with z = s·β(lr − kl): s = +1 desirable, −1 undesirable (KTO); APO-zero's
        // undesirable loss σ(β lr) = 1 − σ(−β lr) is the same with kl = 0.
        let (s, w) = if e.desirable { (1.0, cfg.desirable_weight) } else { (-1.0, cfg.undesirable_weight) };
        let z = s * b * (lr - kl);
        let sz = sigmoid(z);
        out.loss += w * (1.0 - sz) / n;
        out.d_policy.push(-w * sz * (1.0 - sz) * s * b / n);
        out.rewards.push(b * lr);
    }
    out
}

/// A KTO example: prompt + completion (completion labelled), the mismatched sequence (this prompt with another
/// example's completion), the label and the reference log-probs of both.
#[derive(Debug, Clone, PartialEq)]
pub struct KtoExample {
    /// Prompt + completion.
    pub seq: SftExample,
    /// Prompt + another example's completion (the KL estimate's sample).
    pub kl: SftExample,
    /// Desirable.
    pub desirable: bool,
    /// log π_ref(completion | prompt).
    pub ref_logp: f64,
    /// log π_ref(mismatched completion | prompt).
    pub ref_kl_logp: f64,
}

/// The index of the first labelled token (where the completion starts).
fn completion_start(e: &SftExample) -> usize {
    e.labels.iter().position(|&l| l != super::loss::IGNORE_INDEX).unwrap_or(e.labels.len())
}

/// TRL's mismatched pairs: in each consecutive chunk of `chunk` examples, prompt i takes the completion of
/// example i − 1 (the first takes the chunk's last). Returns the mismatched sequences, completions labelled.
pub fn mismatched(seqs: &[SftExample], chunk: usize) -> Vec<SftExample> {
    let mut out = Vec::with_capacity(seqs.len());
    for group in seqs.chunks(chunk.max(1)) {
        for i in 0..group.len() {
            let (p, c) = (&group[i], &group[(i + group.len() - 1) % group.len()]);
            let (ps, cs) = (completion_start(p), completion_start(c));
            let mut ex = SftExample::new(p.input_ids[..ps].to_vec(), p.labels[..ps].to_vec());
            ex.input_ids.extend_from_slice(&c.input_ids[cs..]);
            ex.labels.extend_from_slice(&c.labels[cs..]);
            out.push(ex);
        }
    }
    out
}

/// The KTO objective, one unit per example.
pub struct KtoObjective {
    /// Padding id.
    pub pad_id: u32,
    /// Rows of logits per chunk.
    pub chunk: i64,
    /// Settings.
    pub cfg: KtoConfig,
    metrics: MetricSums,
}

impl KtoObjective {
    /// The objective.
    pub fn new(pad_id: u32, chunk: i64, cfg: KtoConfig) -> Self {
        Self { pad_id, chunk, cfg, metrics: MetricSums::default() }
    }

    fn pass(&self, model: &CausalLm, batch: &[&KtoExample], prefix: &str) -> Result<(KtoBatch, super::logps::Scored)> {
        let kl_logps = if self.cfg.loss_type == KtoLoss::Kto {
            let _guard = tch::no_grad_guard();
            let kl: Vec<&SftExample> = batch.iter().map(|e| &e.kl).collect();
            scored_pass(model, &kl, &[], self.pad_id, self.chunk)?.1.into_iter().map(|s| s.completion).collect()
        } else {
            vec![0.0; batch.len()]
        };
        let seqs: Vec<&SftExample> = batch.iter().map(|e| &e.seq).collect();
        let (scored, lps) = scored_pass(model, &seqs, &[], self.pad_id, self.chunk)?;
        let ex: Vec<KtoLogps> = batch
            .iter()
            .zip(&lps)
            .zip(&kl_logps)
            .map(|((e, lp), &pk)| KtoLogps {
                desirable: e.desirable,
                policy: lp.completion,
                reference: e.ref_logp,
                policy_kl: pk,
                reference_kl: e.ref_kl_logp,
            })
            .collect();
        let out = kto_batch(&ex, &self.cfg);
        self.metrics.add(prefix, &[("kl", out.kl)]);
        for (e, r) in ex.iter().zip(&out.rewards) {
            let side = if e.desirable { "chosen" } else { "rejected" };
            self.metrics.add(prefix, &[(&format!("rewards/{side}"), *r), (&format!("logps/{side}"), e.policy)]);
        }
        Ok((out, scored))
    }
}

impl Objective for KtoObjective {
    type Example = KtoExample;

    fn units(&self, _: &KtoExample) -> usize {
        1
    }

    fn backward(&self, model: &CausalLm, batch: &[&KtoExample], scale: f64) -> Result<LossSum> {
        let (out, scored) = self.pass(model, batch, "")?;
        let n = batch.len() as f64;
        let coef: Vec<f64> = out.d_policy.iter().map(|d| d * n * scale).collect();
        backward(model, &scored, &coef, &vec![0.0; batch.len()], self.chunk)?;
        Ok(LossSum { nll: out.loss * n, tokens: batch.len() })
    }

    fn eval(&self, model: &CausalLm, batch: &[&KtoExample]) -> Result<LossSum> {
        let _guard = tch::no_grad_guard();
        let (out, _) = self.pass(model, batch, "eval_")?;
        Ok(LossSum { nll: out.loss * batch.len() as f64, tokens: batch.len() })
    }

    fn take_metrics(&self) -> BTreeMap<String, f64> {
        let mut m = self.metrics.take();
        self.derive_metrics(&mut m);
        m
    }

    fn take_metric_sums(&self) -> BTreeMap<String, (f64, usize)> {
        self.metrics.take_sums()
    }

    fn metric_names(&self) -> Option<Vec<String>> {
        let names = ["kl", "rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"];
        Some(["", "eval_"].iter().flat_map(|p| names.iter().map(move |n| format!("{p}{n}"))).collect())
    }

    fn derive_metrics(&self, m: &mut BTreeMap<String, f64>) {
        // TRL's margin: the mean chosen reward minus the mean rejected one, when both were seen.
        for prefix in ["", "eval_"] {
            if let (Some(c), Some(r)) =
                (m.get(&format!("{prefix}rewards/chosen")), m.get(&format!("{prefix}rewards/rejected")))
            {
                let margin = c - r;
                m.insert(format!("{prefix}rewards/margins"), margin);
            }
        }
    }
}
