//! The clipped policy losses of group-baseline RL (TRL's `GRPOTrainer._compute_loss`): per completion token,
//! `ratio = exp(logp − old_logp)`, the surrogate `−min(ratio·A, clamp(ratio, 1 − ε_low, 1 + ε_high)·A)`,
//! plus `β · k3` with `k3 = exp(ref − logp) − (ref − logp) − 1` when β > 0 (times the ratio with TRL's
//! default `use_bias_correction_kl`); then normalised as `loss_type` says (checked against TRL 1.16's own
//! `_compute_loss` on the fixture `tests/fixtures/grpo/trl-reference.json`):
//!
//! - `grpo`: each completion's mean over its tokens, averaged over the completions;
//! - `bnpo`: the sum over the micro-batch's tokens / its token count;
//! - `dr_grpo`: the sum over the micro-batch's tokens / (completions × `max_completion_length`);
//! - `dapo`: the sum over tokens / the token count of the whole update (all micro-batches).
//!
//! With several micro-batches per update TRL's gradient accumulation averages the per-micro-batch values of
//! `grpo`, `bnpo` and `dr_grpo` ([`PolicyLoss::units`] gives the update's divisor accordingly), while `dapo`
//! divides by the global token count. The orchestrator computes advantages; this is the policy side.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{CoreError, Result};

/// How the per-token losses are normalised (TRL's `loss_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LossType {
    /// Mean per completion, then over completions.
    Grpo,
    /// Sum over the micro-batch's tokens / its token count.
    Bnpo,
    /// Sum over tokens / (completions × max completion length).
    DrGrpo,
    /// Sum over tokens / the update's token count (TRL's default).
    #[default]
    Dapo,
}

impl LossType {
    /// From its name (`grpo`, `bnpo`, `dr_grpo`, `dapo`).
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "grpo" => Self::Grpo,
            "bnpo" => Self::Bnpo,
            "dr_grpo" => Self::DrGrpo,
            "dapo" => Self::Dapo,
            other => {
                return Err(CoreError::InvalidArgument(format!(
                    "loss_type `{other}` is unknown (grpo, bnpo, dr_grpo, dapo)"
                )))
            }
        })
    }
}

/// The settings of the clipped policy loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyLoss {
    /// Normalisation.
    pub loss_type: LossType,
    /// Lower clip: the ratio is clamped at `1 − epsilon_low`.
    pub epsilon_low: f64,
    /// Upper clip: at `1 + epsilon_high` (DAPO's clip-higher when > `epsilon_low`).
    pub epsilon_high: f64,
    /// Weight of the k3 KL to the reference (0: no reference needed).
    pub beta: f64,
    /// `dr_grpo`'s constant length.
    pub max_completion_length: usize,
    /// Multiply the k3 KL by the importance ratio (TRL's `use_bias_correction_kl`, on by default there).
    pub bias_correction_kl: bool,
    /// Where the importance ratio is taken.
    pub ratio: RatioLevel,
    /// The old log-probs are the update's own, detached: the update is the only one on its rollout, so the
    /// policy that sampled is the policy being updated (TRL's GRPO with `num_iterations` 1, which then
    /// skips the old log-probs' forward pass). The ratio is exactly 1 and the samples carry no old log-probs.
    pub on_policy: bool,
}

/// Where the importance ratio is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RatioLevel {
    /// One ratio per token (GRPO).
    #[default]
    Token,
    /// One per completion from its mean token log-ratio (GSPO; TRL's `importance_sampling_level: sequence`).
    SequenceMean,
    /// One per completion from its summed log-ratio, i.e. the ratio of the completion's probabilities
    /// (TRL's RLOO, whose loss is then the mean over completions: use `loss_type: grpo`).
    SequenceSum,
}

impl PolicyLoss {
    /// Rejects settings no run can use, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CoreError::InvalidArgument(m));
        if !(self.epsilon_low > 0.0 && self.epsilon_low < 1.0) || !(self.epsilon_high > 0.0) {
            return bad(format!(
                "epsilon must be in (0, 1) and epsilon_high > 0, got {} and {}",
                self.epsilon_low, self.epsilon_high
            ));
        }
        if !(self.beta.is_finite() && self.beta >= 0.0) {
            return bad(format!("beta must be >= 0, got {}", self.beta));
        }
        if self.loss_type == LossType::DrGrpo && self.max_completion_length == 0 {
            return bad("max_completion_length must be positive for dr_grpo".into());
        }
        Ok(())
    }

    /// The divisor of an update of `micro_batches` micro-batches holding `tokens` completion tokens: each
    /// micro-batch's [`micro_batch_loss`] is summed and divided by it.
    pub fn units(&self, micro_batches: usize, tokens: usize) -> usize {
        match self.loss_type {
            LossType::Dapo => tokens.max(1),
            _ => micro_batches.max(1),
        }
    }
}

/// Sums of the micro-batch's clip and KL statistics over its tokens (TRL's `clip_ratio/*` and `kl` are their
/// means: divide by `tokens`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossStats {
    /// Completion tokens.
    pub tokens: f64,
    /// Tokens clipped below (`ratio < 1 − ε_low` with `A < 0`).
    pub clipped_low: f64,
    /// Tokens clipped above (`ratio > 1 + ε_high` with `A > 0`).
    pub clipped_high: f64,
    /// Σ k3 KL (0 when β = 0 and no reference was given).
    pub kl: f64,
}

impl LossStats {
    /// Adds another micro-batch's sums.
    pub fn add(&mut self, o: &LossStats) {
        self.tokens += o.tokens;
        self.clipped_low += o.clipped_low;
        self.clipped_high += o.clipped_high;
        self.kl += o.kl;
    }
}

/// One micro-batch's loss, as the update sums it (see [`PolicyLoss::units`]), and its statistics. All token
/// tensors are flat over the micro-batch's completion tokens (completion after completion, `counts[i]`
/// tokens each); `logp` carries the gradient, `old_logp`, `ref_logp` and `adv` do not. A completion whose
/// tokens are all masked out (TRL's `mask_truncated_completions`) is given with `counts[i] = 0`.
pub fn micro_batch_loss(
    cfg: &PolicyLoss,
    logp: &Tensor,
    old_logp: &Tensor,
    ref_logp: Option<&Tensor>,
    adv: &Tensor,
    counts: &[usize],
) -> Result<(Tensor, LossStats)> {
    let n: usize = counts.iter().sum();
    if logp.size() != [n as i64] || old_logp.size() != [n as i64] || adv.size() != [n as i64] {
        return Err(CoreError::InvalidArgument(format!(
            "policy loss: {n} tokens, but log-probs {:?}, old log-probs {:?}, advantages {:?}",
            logp.size(),
            old_logp.size(),
            adv.size()
        )));
    }
    let device = logp.device();
    let seg: Vec<i64> = counts.iter().enumerate().flat_map(|(i, &c)| std::iter::repeat_n(i as i64, c)).collect();
    let seg = Tensor::from_slice(&seg).to_device(device);
    let denom: Vec<f64> = counts.iter().map(|&c| c.max(1) as f64).collect();
    let denom = Tensor::from_slice(&denom).to_device(device).f_to_kind(logp.kind())?;
    // Each completion's Σ over its tokens of `x` / its count.
    let per_completion_mean = |x: &Tensor| -> Result<Tensor> {
        let sums = Tensor::f_zeros([counts.len() as i64], (x.kind(), device))?.f_index_add(0, &seg, x)?;
        Ok(sums.f_div(&denom)?)
    };
    let mut log_ratio = logp.f_sub(old_logp)?;
    match cfg.ratio {
        RatioLevel::Token => {}
        RatioLevel::SequenceMean => log_ratio = per_completion_mean(&log_ratio)?.f_index_select(0, &seg)?,
        RatioLevel::SequenceSum => {
            let sums =
                Tensor::f_zeros([counts.len() as i64], (log_ratio.kind(), device))?.f_index_add(0, &seg, &log_ratio)?;
            log_ratio = sums.f_index_select(0, &seg)?;
        }
    }
    let ratio = log_ratio.f_exp()?;
    let clipped = ratio.f_clamp(1.0 - cfg.epsilon_low, 1.0 + cfg.epsilon_high)?;
    let surrogate = ratio.f_mul(adv)?.f_min_other(&clipped.f_mul(adv)?)?;
    let mut per_token = surrogate.f_neg()?;
    let mut kl_sum = 0.0;
    if cfg.beta > 0.0 {
        let r = ref_logp.ok_or_else(|| CoreError::InvalidArgument("beta > 0 needs the reference log-probs".into()))?;
        if r.size() != [n as i64] {
            return Err(CoreError::InvalidArgument(format!("reference log-probs {:?} for {n} tokens", r.size())));
        }
        let d = r.f_sub(logp)?;
        let mut kl = d.f_exp()?.f_sub(&d)?.f_sub_scalar(1.0)?;
        if cfg.bias_correction_kl {
            kl = kl.f_mul(&ratio)?;
        }
        kl_sum = kl.f_detach()?.f_sum(Kind::Double)?.f_double_value(&[])?;
        per_token = per_token.f_add(&kl.f_mul_scalar(cfg.beta)?)?;
    }
    let stats = {
        let _g = tch::no_grad_guard();
        let r = ratio.f_detach()?;
        let low = r.f_lt(1.0 - cfg.epsilon_low)?.f_logical_and(&adv.f_lt(0.0)?)?;
        let high = r.f_gt(1.0 + cfg.epsilon_high)?.f_logical_and(&adv.f_gt(0.0)?)?;
        LossStats {
            tokens: n as f64,
            clipped_low: low.f_sum(Kind::Double)?.f_double_value(&[])?,
            clipped_high: high.f_sum(Kind::Double)?.f_double_value(&[])?,
            kl: kl_sum,
        }
    };
    let loss = match cfg.loss_type {
        LossType::Dapo => per_token.f_sum(per_token.kind())?,
        LossType::Bnpo => per_token.f_sum(per_token.kind())?.f_div_scalar(n.max(1) as f64)?,
        LossType::DrGrpo => {
            per_token.f_sum(per_token.kind())?.f_div_scalar((counts.len() * cfg.max_completion_length).max(1) as f64)?
        }
        // The mean over completions of each one's token mean; an all-masked completion counts with a zero
        // mean (TRL clamps its denominator at 1).
        LossType::Grpo => per_completion_mean(&per_token)?.f_mean(per_token.kind())?,
    };
    Ok((loss, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64]) -> Tensor {
        Tensor::from_slice(v)
    }

    /// The formulas written out by hand on a 2-completion batch (an independent computation).
    #[test]
    fn losses_by_hand() {
        let logp: [f64; 3] = [-1.0, -0.5, -2.0];
        let old = [-1.1, -0.9, -1.5];
        let refp: [f64; 3] = [-1.2, -0.4, -2.1];
        let adv = [1.0, 1.0, -0.5];
        let counts = [2, 1];
        let (el, eh, beta) = (0.2, 0.28, 0.04);
        let per: Vec<f64> = (0..3)
            .map(|i| {
                let r = (logp[i] - old[i]).exp();
                let c = r.clamp(1.0 - el, 1.0 + eh);
                let s = -(r * adv[i]).min(c * adv[i]);
                let d = refp[i] - logp[i];
                s + beta * (d.exp() - d - 1.0)
            })
            .collect();
        let cfg = |lt| PolicyLoss {
            loss_type: lt,
            epsilon_low: el,
            epsilon_high: eh,
            beta,
            max_completion_length: 4,
            bias_correction_kl: false,
            ratio: RatioLevel::Token,
            on_policy: false,
        };
        let want = [
            (LossType::Grpo, ((per[0] + per[1]) / 2.0 + per[2]) / 2.0),
            (LossType::Bnpo, per.iter().sum::<f64>() / 3.0),
            (LossType::DrGrpo, per.iter().sum::<f64>() / 8.0),
            (LossType::Dapo, per.iter().sum::<f64>()),
        ];
        for (lt, w) in want {
            let (l, s) = micro_batch_loss(&cfg(lt), &t(&logp), &t(&old), Some(&t(&refp)), &t(&adv), &counts).unwrap();
            assert!((l.double_value(&[]) - w).abs() < 1e-6, "{lt:?}: {} vs {w}", l.double_value(&[]));
            // ratio 1.105 (A>0, not clipped), 1.49 (A>0, clipped high), 0.607 (A<0, clipped low).
            assert_eq!((s.tokens, s.clipped_low, s.clipped_high), (3.0, 1.0, 1.0));
        }
        assert_eq!(cfg(LossType::Dapo).units(2, 30), 30);
        assert_eq!(cfg(LossType::Grpo).units(2, 30), 2);
        // β = 0 needs no reference; β > 0 without one is an error.
        let mut c = cfg(LossType::Grpo);
        assert!(micro_batch_loss(&c, &t(&logp), &t(&old), None, &t(&adv), &counts).is_err());
        c.beta = 0.0;
        assert!(micro_batch_loss(&c, &t(&logp), &t(&old), None, &t(&adv), &counts).is_ok());
        assert!(micro_batch_loss(&c, &t(&logp), &t(&old), None, &t(&adv), &[1, 1]).is_err());
        assert!(LossType::parse("ppo").is_err());
    }

    /// TRL 1.16's `_compute_loss` on fixed inputs (tests/fixtures/make_grpo.py): the loss and its gradient
    /// with respect to the per-token log-probs, for every loss type, clip setting, β, the KL bias correction
    /// on and off, gradient accumulation, and sequence-level ratios (GSPO).
    #[test]
    fn losses_equal_trl() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/grpo/trl-reference.json");
        let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let g = &fx["grpo"];
        let rows = |v: &serde_json::Value| -> Vec<Vec<f64>> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
                .collect()
        };
        let inp = &g["loss_inputs"];
        let mask = rows(&inp["completion_mask"]);
        let counts: Vec<usize> = mask.iter().map(|r| r.iter().filter(|&&m| m > 0.0).count()).collect();
        // Flat over the unmasked tokens (each completion's mask is a prefix).
        let flat = |v: &serde_json::Value| -> Vec<f64> {
            rows(v).iter().zip(&counts).flat_map(|(r, &c)| r[..c].to_vec()).collect()
        };
        let adv_seq: Vec<f64> = inp["advantages"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let adv: Vec<f64> = adv_seq.iter().zip(&counts).flat_map(|(&a, &c)| std::iter::repeat_n(a, c)).collect();
        let max_len = inp["max_completion_length"].as_u64().unwrap() as usize;
        let cases = g["loss_cases"].as_array().unwrap();
        assert!(cases.len() >= 20);
        for (i, c) in cases.iter().enumerate() {
            let old = flat(c.get("old_per_token_logps").unwrap_or(&inp["old_per_token_logps"]));
            let cfg = PolicyLoss {
                loss_type: LossType::parse(c["loss_type"].as_str().unwrap()).unwrap(),
                epsilon_low: c["epsilon_low_used"].as_f64().unwrap(),
                epsilon_high: c["epsilon_high_used"].as_f64().unwrap(),
                beta: c["beta"].as_f64().unwrap(),
                max_completion_length: max_len,
                bias_correction_kl: c["use_bias_correction_kl"].as_bool().unwrap(),
                ratio: if c["importance_sampling_level"] == "sequence" {
                    RatioLevel::SequenceMean
                } else {
                    RatioLevel::Token
                },
                on_policy: false,
            };
            let logp = t(&flat(&inp["per_token_logps"])).set_requires_grad(true);
            let refp = t(&flat(&inp["ref_per_token_logps"]));
            let (l, _) = micro_batch_loss(&cfg, &logp, &t(&old), Some(&refp), &t(&adv), &counts).unwrap();
            // The update divides by `units`: gradient accumulation steps (micro-batches) for grpo, bnpo and
            // dr_grpo, the generation batch's token count for dapo.
            let ga = c["gradient_accumulation_steps"].as_u64().unwrap() as usize;
            let items = c["num_items_in_batch"].as_f64().unwrap() as usize;
            let l = l / cfg.units(ga, items) as f64;
            let want = c["loss"].as_f64().unwrap();
            assert!((l.double_value(&[]) - want).abs() < 1e-12, "case {i} {c}: {} vs {want}", l.double_value(&[]));
            l.backward();
            let grad = Vec::<f64>::try_from(&logp.grad()).unwrap();
            let want_grad = flat(&c["grad_per_token_logps"]);
            for (a, b) in grad.iter().zip(&want_grad) {
                assert!((a - b).abs() < 1e-12, "case {i}: gradient {grad:?} vs {want_grad:?}");
            }
        }
    }

    /// TRL 1.16's RLOO loss: the ratio of each completion's probabilities, the clipped surrogate, the mean
    /// over completions (`SequenceSum` ratios with `grpo` normalisation), no KL term.
    #[test]
    fn rloo_loss_equals_trl() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/grpo/trl-reference.json");
        let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let r = &fx["rloo"];
        let rows = |v: &serde_json::Value| -> Vec<Vec<f64>> {
            v.as_array()
                .unwrap()
                .iter()
                .map(|r| r.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect())
                .collect()
        };
        let nums =
            |v: &serde_json::Value| -> Vec<f64> { v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect() };
        let inp = &r["loss_inputs"];
        let mask = rows(&inp["completion_mask"]);
        let counts: Vec<usize> = mask.iter().map(|r| r.iter().filter(|&&m| m > 0.0).count()).collect();
        let logp_rows = rows(&inp["per_token_logps"]);
        let logp: Vec<f64> = logp_rows.iter().zip(&counts).flat_map(|(r, &c)| r[..c].to_vec()).collect();
        let adv: Vec<f64> =
            nums(&inp["advantages"]).iter().zip(&counts).flat_map(|(&a, &c)| std::iter::repeat_n(a, c)).collect();
        for (i, c) in r["loss_cases"].as_array().unwrap().iter().enumerate() {
            // Only each completion's summed old log-prob matters: put it on its first token.
            let old: Vec<f64> = nums(&c["old_logps"])
                .iter()
                .zip(&counts)
                .flat_map(|(&o, &n)| std::iter::once(o).chain(std::iter::repeat_n(0.0, n - 1)))
                .collect();
            let cfg = PolicyLoss {
                loss_type: LossType::Grpo,
                epsilon_low: c["epsilon_low_used"].as_f64().unwrap(),
                epsilon_high: c["epsilon_high_used"].as_f64().unwrap(),
                beta: 0.0,
                max_completion_length: 0,
                bias_correction_kl: false,
                ratio: RatioLevel::SequenceSum,
                on_policy: false,
            };
            let lp = t(&logp).set_requires_grad(true);
            let (l, _) = micro_batch_loss(&cfg, &lp, &t(&old), None, &t(&adv), &counts).unwrap();
            let want = c["loss"].as_f64().unwrap();
            assert!((l.double_value(&[]) - want).abs() < 1e-12, "case {i}: {} vs {want}", l.double_value(&[]));
            l.backward();
            let grad = Vec::<f64>::try_from(&lp.grad()).unwrap();
            let want_grad: Vec<f64> =
                rows(&c["grad_per_token_logps"]).iter().zip(&counts).flat_map(|(r, &n)| r[..n].to_vec()).collect();
            for (a, b) in grad.iter().zip(&want_grad) {
                assert!((a - b).abs() < 1e-12, "case {i}: gradient {grad:?} vs {want_grad:?}");
            }
        }
    }
}
