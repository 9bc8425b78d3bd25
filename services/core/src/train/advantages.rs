//! Advantages of group-baseline RL from the scores of each completion (pure arithmetic, run by the
//! orchestrator): GRPO's group-normalised rewards and RLOO's leave-one-out baseline, as TRL 1.16 computes
//! them in `_generate_and_score_completions` (checked on `tests/fixtures/grpo/trl-reference.json`).
//! Completions come prompt-major: the `g` completions of prompt 0, then of prompt 1, and so on. Standard
//! deviations are Bessel-corrected (n − 1) and `1e-4` is added to them before dividing, as in TRL.

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

const STD_EPS: f64 = 1e-4;

/// How GRPO scales the centred rewards (TRL's `scale_rewards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScaleRewards {
    /// By the standard deviation of the prompt's group (the default).
    #[default]
    Group,
    /// By the standard deviation of the whole batch (the mean stays per group).
    Batch,
    /// Not at all (Dr. GRPO).
    None,
}

/// How several reward functions combine (TRL's `multi_objective_aggregation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Aggregation {
    /// The weighted sum of the scores, then normalised (the default).
    #[default]
    SumThenNormalize,
    /// Each function's scores normalised in their group, the weighted sum normalised over the batch.
    NormalizeThenSum,
}

/// Advantages and what TRL logs about the rewards.
#[derive(Debug, Clone, PartialEq)]
pub struct Advantages {
    /// One per completion.
    pub advantages: Vec<f64>,
    /// The weighted sum of the scores of each completion.
    pub rewards: Vec<f64>,
    /// `reward`: the mean of `rewards`.
    pub reward_mean: f64,
    /// `reward_std`: their standard deviation over the batch.
    pub reward_std: f64,
    /// `frac_reward_zero_std`: the share of completions whose scaling deviation is zero.
    pub frac_zero_std: f64,
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

fn std(x: &[f64]) -> f64 {
    if x.len() < 2 {
        return 0.0;
    }
    let m = mean(x);
    (x.iter().map(|v| (v - m).powi(2)).sum::<f64>() / (x.len() - 1) as f64).sqrt()
}

fn is_zero(s: f64) -> bool {
    s.abs() <= 1e-8
}

/// The weighted sum of each completion's scores (`funcs[k][i]`: function k's score of completion i).
fn weighted(funcs: &[Vec<f64>], weights: &[f64], n: usize) -> Vec<f64> {
    (0..n).map(|i| funcs.iter().zip(weights).map(|(f, w)| w * f[i]).sum()).collect()
}

fn check(funcs: &[Vec<f64>], weights: &[f64], g: usize) -> Result<usize> {
    let n = funcs.first().map_or(0, Vec::len);
    if funcs.is_empty() || funcs.len() != weights.len() || funcs.iter().any(|f| f.len() != n) {
        return Err(CoreError::InvalidArgument(format!(
            "{} reward functions, {} weights, score lists of lengths {:?}",
            funcs.len(),
            weights.len(),
            funcs.iter().map(Vec::len).collect::<Vec<_>>()
        )));
    }
    if g < 2 || n == 0 || !n.is_multiple_of(g) {
        return Err(CoreError::InvalidArgument(format!("{n} completions do not form groups of {g} (>= 2)")));
    }
    if funcs.iter().flatten().chain(weights).any(|v| !v.is_finite()) {
        return Err(CoreError::InvalidArgument("reward scores and weights must be finite".into()));
    }
    Ok(n)
}

/// GRPO's advantages for groups of `g` completions.
pub fn grpo(
    funcs: &[Vec<f64>],
    weights: &[f64],
    g: usize,
    scale: ScaleRewards,
    aggregation: Aggregation,
) -> Result<Advantages> {
    let n = check(funcs, weights, g)?;
    let rewards = weighted(funcs, weights, n);
    let (advantages, scale_std): (Vec<f64>, Vec<f64>) = match aggregation {
        Aggregation::SumThenNormalize => {
            let batch_std = std(&rewards);
            rewards
                .chunks(g)
                .flat_map(|grp| {
                    let (m, s) = (mean(grp), if scale == ScaleRewards::Batch { batch_std } else { std(grp) });
                    grp.iter().map(move |r| {
                        let a = r - m;
                        (if scale == ScaleRewards::None { a } else { a / (s + STD_EPS) }, s)
                    })
                })
                .unzip()
        }
        Aggregation::NormalizeThenSum => {
            let z: Vec<Vec<f64>> = funcs
                .iter()
                .map(|f| {
                    f.chunks(g)
                        .flat_map(|grp| {
                            let (m, s) = (mean(grp), std(grp));
                            grp.iter().map(move |r| (r - m) / (s + STD_EPS))
                        })
                        .collect()
                })
                .collect();
            let r = weighted(&z, weights, n);
            let (m, s) = (mean(&r), std(&r));
            r.iter().map(|v| ((v - m) / (s + STD_EPS), s)).unzip()
        }
    };
    Ok(Advantages {
        advantages,
        reward_mean: mean(&rewards),
        reward_std: std(&rewards),
        frac_zero_std: scale_std.iter().filter(|&&s| is_zero(s)).count() as f64 / n as f64,
        rewards,
    })
}

/// RLOO's advantages for groups of `g` completions: the weighted score, clamped to `clip` when given, minus
/// `beta` × each completion's summed log-ratio to the reference (`kl[i]` = Σ_t old − ref, k1), against the
/// mean of the group's other completions; normalised over the batch when `normalize`.
pub fn rloo(
    funcs: &[Vec<f64>],
    weights: &[f64],
    g: usize,
    beta: f64,
    kl: &[f64],
    clip: Option<(f64, f64)>,
    normalize: bool,
) -> Result<Advantages> {
    let n = check(funcs, weights, g)?;
    if beta != 0.0 && kl.len() != n {
        return Err(CoreError::InvalidArgument(format!("{} KL values for {n} completions", kl.len())));
    }
    let rewards = weighted(funcs, weights, n);
    let penalised: Vec<f64> = rewards
        .iter()
        .enumerate()
        .map(|(i, &r)| {
            let r = clip.map_or(r, |(lo, hi)| r.clamp(lo, hi));
            if beta != 0.0 {
                r - beta * kl[i]
            } else {
                r
            }
        })
        .collect();
    let mut advantages = vec![];
    let mut zero = 0;
    for grp in penalised.chunks(g) {
        let total: f64 = grp.iter().sum();
        if is_zero(std(grp)) {
            zero += grp.len();
        }
        advantages.extend(grp.iter().map(|r| r - (total - r) / (g - 1) as f64));
    }
    if normalize {
        let (m, s) = (mean(&advantages), std(&advantages));
        advantages.iter_mut().for_each(|a| *a = (*a - m) / (s + STD_EPS));
    }
    Ok(Advantages {
        advantages,
        reward_mean: mean(&rewards),
        reward_std: std(&rewards),
        frac_zero_std: zero as f64 / n as f64,
        rewards,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> serde_json::Value {
        let p = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/grpo/trl-reference.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    fn nums(v: &serde_json::Value) -> Vec<f64> {
        v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
    }

    fn close(a: &[f64], b: &[f64], what: &str) {
        assert_eq!(a.len(), b.len(), "{what}");
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-9, "{what}: {a:?} vs {b:?}");
        }
    }

    /// The reward set without unscorable completions (TRL's None scores are not something a reward
    /// service returns).
    fn plain(fx: &serde_json::Value) -> (Vec<Vec<f64>>, Vec<f64>) {
        let s = &fx["grpo"]["reward_sets"]["plain"];
        (s["funcs"].as_array().unwrap().iter().map(nums).collect(), nums(&s["weights"]))
    }

    #[test]
    fn grpo_equals_trl() {
        let fx = fixture();
        let (funcs, weights) = plain(&fx);
        let g = fx["grpo"]["num_generations"].as_u64().unwrap() as usize;
        let mut seen = 0;
        for c in fx["grpo"]["advantage_cases"].as_array().unwrap().iter().filter(|c| c["rewards_set"] == "plain") {
            let scale = serde_json::from_value(c["scale_rewards"].clone()).unwrap();
            let agg = serde_json::from_value(c["multi_objective_aggregation"].clone()).unwrap();
            let a = grpo(&funcs, &weights, g, scale, agg).unwrap();
            close(&a.advantages, &nums(&c["advantages"]), &format!("{c}"));
            let l = &c["logged"];
            let logged = [
                l["reward"].as_f64().unwrap(),
                l["reward_std"].as_f64().unwrap(),
                l["frac_reward_zero_std"].as_f64().unwrap(),
            ];
            close(&[a.reward_mean, a.reward_std, a.frac_zero_std], &logged, &format!("logged {c}"));
            seen += 1;
        }
        assert_eq!(seen, 4);
        assert!(grpo(&funcs, &weights, 3, ScaleRewards::Group, Aggregation::SumThenNormalize).is_err());
        assert!(grpo(&funcs, &weights[..1], 4, ScaleRewards::Group, Aggregation::SumThenNormalize).is_err());
    }

    #[test]
    fn rloo_equals_trl() {
        let fx = fixture();
        let (funcs, weights) = plain(&fx);
        let r = &fx["rloo"];
        let g = r["num_generations"].as_u64().unwrap() as usize;
        let inp = &r["advantage_inputs"];
        let rows = |v: &serde_json::Value| -> Vec<Vec<f64>> { v.as_array().unwrap().iter().map(nums).collect() };
        let (mask, old, refp) =
            (rows(&inp["completion_mask"]), rows(&inp["old_per_token_logps"]), rows(&inp["ref_per_token_logps"]));
        let kl: Vec<f64> =
            (0..mask.len()).map(|i| (0..mask[i].len()).map(|t| (old[i][t] - refp[i][t]) * mask[i][t]).sum()).collect();
        let mut seen = 0;
        for c in r["advantage_cases"].as_array().unwrap().iter().filter(|c| c["rewards_set"] == "plain") {
            let clip = c["reward_clip_range"].as_array().map(|v| (v[0].as_f64().unwrap(), v[1].as_f64().unwrap()));
            let beta = c["beta"].as_f64().unwrap();
            let a = rloo(&funcs, &weights, g, beta, &kl, clip, c["normalize_advantages"].as_bool().unwrap()).unwrap();
            close(&a.advantages, &nums(&c["advantages"]), &format!("{c}"));
            let l = &c["logged"];
            let logged = [
                l["reward"].as_f64().unwrap(),
                l["reward_std"].as_f64().unwrap(),
                l["frac_reward_zero_std"].as_f64().unwrap(),
            ];
            close(&[a.reward_mean, a.reward_std, a.frac_zero_std], &logged, &format!("logged {c}"));
            seen += 1;
        }
        assert_eq!(seen, 6);
    }
}
