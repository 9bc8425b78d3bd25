//! The arithmetic of PPO for language models, as TRL's `PPOTrainer` and OpenRLHF write it: per-token KL to
//! the reference (k1 `log π − log π_ref`, or k3 `(r − 1) − log r` with `r = π_ref/π`), rewards
//! `−kl_coef·kl` per token plus the score at the last response token (minus a penalty when no EOS was
//! generated), an adaptive KL coefficient, GAE, masked whitening, and the clipped policy and value losses.
//! The PPO loop itself (rollouts, epochs over minibatches) builds on these.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::Result;

/// How the per-token KL is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum KlEstimator {
    /// `log π − log π_ref` (unbiased, high variance, can be negative).
    #[default]
    K1,
    /// `(r − 1) − log r`, `r = π_ref / π` (unbiased, non-negative, lower variance).
    K3,
}

/// Per-token KL estimates of a response.
pub fn token_kl(logp: &[f64], ref_logp: &[f64], est: KlEstimator) -> Vec<f64> {
    logp.iter()
        .zip(ref_logp)
        .map(|(&lp, &rlp)| match est {
            KlEstimator::K1 => lp - rlp,
            KlEstimator::K3 => {
                let logr = rlp - lp;
                logr.exp() - 1.0 - logr
            }
        })
        .collect()
}

/// Per-token rewards of a response: `−kl_coef·kl[t]`, plus `score` at the last token; `score` is first
/// lowered by `missing_eos_penalty` when the response did not end with EOS.
pub fn token_rewards(kl: &[f64], kl_coef: f64, score: f64, ended_with_eos: bool, missing_eos_penalty: f64) -> Vec<f64> {
    let mut r: Vec<f64> = kl.iter().map(|k| -kl_coef * k).collect();
    let score = if ended_with_eos { score } else { score - missing_eos_penalty };
    if let Some(last) = r.last_mut() {
        *last += score;
    }
    r
}

/// Generalised advantage estimation over one response: `δ_t = r_t + γ·V_{t+1} − V_t` (V after the end = 0),
/// `A_t = δ_t + γλ·A_{t+1}`; returns (advantages, returns = A + V).
pub fn gae(rewards: &[f64], values: &[f64], gamma: f64, lam: f64) -> (Vec<f64>, Vec<f64>) {
    let n = rewards.len();
    let mut adv = vec![0.0; n];
    let mut last = 0.0;
    for t in (0..n).rev() {
        let next = if t + 1 < n { values[t + 1] } else { 0.0 };
        let delta = rewards[t] + gamma * next - values[t];
        last = delta + gamma * lam * last;
        adv[t] = last;
    }
    let ret = adv.iter().zip(values).map(|(a, v)| a + v).collect();
    (adv, ret)
}

/// Whitens `x` in place over all its entries (the valid tokens of a batch): `(x − mean)/sqrt(var + 1e-8)`
/// with the unbiased variance; with `shift_mean = false` the mean is added back.
pub fn whiten(x: &mut [f64], shift_mean: bool) {
    let n = x.len();
    if n < 2 {
        return;
    }
    let mean = x.iter().sum::<f64>() / n as f64;
    let var = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
    let inv = 1.0 / (var + 1e-8).sqrt();
    for v in x.iter_mut() {
        *v = (*v - mean) * inv + if shift_mean { 0.0 } else { mean };
    }
}

/// The adaptive KL coefficient (Ziegler et al.): moves toward the `target` KL over `horizon` samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdaptiveKl {
    /// The current coefficient.
    pub value: f64,
    /// Target KL per response.
    pub target: f64,
    /// Samples over which the error is corrected.
    pub horizon: f64,
}

impl AdaptiveKl {
    /// After a batch of `n_steps` samples whose mean KL was `current`.
    pub fn update(&mut self, current: f64, n_steps: usize) {
        let err = (current / self.target - 1.0).clamp(-0.2, 0.2);
        self.value *= 1.0 + err * n_steps as f64 / self.horizon;
    }
}

/// Mean of `x` over `mask` (1 = counted).
fn masked_mean(x: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Ok(x.f_mul(mask)?.f_sum(Kind::Float)?.f_div(&mask.f_sum(Kind::Float)?.f_clamp_min(1.0)?)?)
}

/// The clipped policy loss `mean(max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)))`, `ρ = exp(new − old)`, over `mask`, and
/// the fraction of tokens where clipping was active.
///
/// # Shapes
/// every argument `[b, t]` → (scalar, scalar).
pub fn policy_loss(
    new_logp: &Tensor,
    old_logp: &Tensor,
    advantages: &Tensor,
    mask: &Tensor,
    clip: f64,
) -> Result<(Tensor, f64)> {
    let ratio = new_logp.f_sub(old_logp)?.f_exp()?;
    let l1 = advantages.f_neg()?.f_mul(&ratio)?;
    let l2 = advantages.f_neg()?.f_mul(&ratio.f_clamp(1.0 - clip, 1.0 + clip)?)?;
    let loss = masked_mean(&l1.f_maximum(&l2)?, mask)?;
    let clipfrac = masked_mean(&l2.f_gt_tensor(&l1)?.f_to_kind(Kind::Float)?, mask)?.f_double_value(&[])?;
    Ok((loss, clipfrac))
}

/// The clipped value loss `0.5·mean(max((V − R)², (clip(V, V_old ± ε) − R)²))` over `mask`.
pub fn value_loss(values: &Tensor, old_values: &Tensor, returns: &Tensor, mask: &Tensor, clip: f64) -> Result<Tensor> {
    let clipped =
        values.f_clamp_tensor(Some(&old_values.f_sub_scalar(clip)?), Some(&old_values.f_add_scalar(clip)?))?;
    let l1 = values.f_sub(returns)?.f_square()?;
    let l2 = clipped.f_sub(returns)?.f_square()?;
    Ok(masked_mean(&l1.f_maximum(&l2)?, mask)?.f_mul_scalar(0.5)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-9, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn gae_by_hand() {
        // γ = 0.9, λ = 0.8: δ2 = 2 − 1.5 = 0.5; δ1 = 0.9·1.5 − 1 = 0.35, A1 = 0.35 + 0.72·0.5 = 0.71;
        // δ0 = 1 + 0.9·1 − 0.5 = 1.4, A0 = 1.4 + 0.72·0.71 = 1.9112.
        let (a, r) = gae(&[1.0, 0.0, 2.0], &[0.5, 1.0, 1.5], 0.9, 0.8);
        close(&a, &[1.9112, 0.71, 0.5]);
        close(&r, &[2.4112, 1.71, 2.0]);
        // λ = 1, γ = 1: advantages are returns-to-go minus values.
        let (a, _) = gae(&[1.0, 1.0, 1.0], &[0.0, 0.0, 0.0], 1.0, 1.0);
        close(&a, &[3.0, 2.0, 1.0]);
    }

    #[test]
    fn whitening_by_hand() {
        // mean 2.5, unbiased variance 5/3.
        let mut x = vec![1.0, 2.0, 3.0, 4.0];
        whiten(&mut x, true);
        let s = (5.0f64 / 3.0 + 1e-8).sqrt();
        close(&x, &[-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]);
        let mut y = vec![1.0, 2.0, 3.0, 4.0];
        whiten(&mut y, false);
        close(&y, &[2.5 - 1.5 / s, 2.5 - 0.5 / s, 2.5 + 0.5 / s, 2.5 + 1.5 / s]);
    }

    #[test]
    fn kl_rewards_and_adaptive_coefficient_by_hand() {
        close(&token_kl(&[-1.0], &[-1.5], KlEstimator::K1), &[0.5]);
        // log r = −0.5: e^−0.5 − 1 + 0.5.
        close(&token_kl(&[-1.0], &[-1.5], KlEstimator::K3), &[(-0.5f64).exp() - 0.5]);
        close(&token_rewards(&[0.5, -0.25, 1.0], 0.1, 2.0, true, 1.0), &[-0.05, 0.025, 1.9]);
        close(&token_rewards(&[0.5, -0.25, 1.0], 0.1, 2.0, false, 1.0), &[-0.05, 0.025, 0.9]);
        let mut k = AdaptiveKl { value: 0.1, target: 6.0, horizon: 10000.0 };
        k.update(12.0, 256); // error clipped to 0.2: × (1 + 0.2·256/10000)
        assert!((k.value - 0.1 * 1.00512).abs() < 1e-12);
        k.update(3.0, 100); // error −0.5 → −0.2
        assert!((k.value - 0.1 * 1.00512 * 0.998).abs() < 1e-12);
    }

    #[test]
    fn clipped_losses_by_hand() {
        let t = |v: &[f64]| Tensor::from_slice(v).to_kind(Kind::Float).view([1, v.len() as i64]);
        // ρ = 1.5 with A = 1 → clipped at 1.2: −1.2; ρ = 0.5 with A = −1 → max(0.5, 0.8) = 0.8.
        let (l, frac) = policy_loss(
            &t(&[1.5f64.ln(), 0.5f64.ln(), 0.0]),
            &t(&[0.0, 0.0, 0.0]),
            &t(&[1.0, -1.0, 5.0]),
            &t(&[1.0, 1.0, 0.0]),
            0.2,
        )
        .unwrap();
        assert!((l.double_value(&[]) - (-0.2)).abs() < 1e-6, "{}", l.double_value(&[]));
        assert!((frac - 1.0).abs() < 1e-9);
        // V = 2, V_old = 1, R = 3, ε = 0.2: max(1, (1.2 − 3)²) / 2 = 1.62.
        let v = value_loss(&t(&[2.0, 9.0]), &t(&[1.0, 0.0]), &t(&[3.0, 0.0]), &t(&[1.0, 0.0]), 0.2).unwrap();
        assert!((v.double_value(&[]) - 1.62).abs() < 1e-6);
    }
}
