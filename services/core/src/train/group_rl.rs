//! Settings of group-baseline online RL — GRPO and RLOO, TRL's names and defaults — as a recipe's `grpo:` or
//! `rloo:` section. The orchestrator (the alignment service) runs the algorithm with them: rollouts of
//! `num_generations` completions per prompt on a policy session, scores from the reward functions,
//! advantages ([`super::advantages`]), updates with the clipped loss ([`super::grpo`]).

use serde::{Deserialize, Serialize};

use super::advantages::{Aggregation, ScaleRewards};
use super::grpo::{LossType, PolicyLoss, RatioLevel};
use super::ppo_objective::RewardSource;
use crate::error::{CoreError, Result};

/// GRPO or RLOO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupAlgorithm {
    /// Group-normalised advantages, token-level clipped loss, k3 KL in the loss.
    Grpo,
    /// Leave-one-out baseline, k1 KL penalty on the reward, sequence-level ratio.
    Rloo,
}

/// A reward function with its weight (TRL's `reward_funcs` / `reward_weights`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardFunc {
    /// Its name in metrics (`rewards/<name>/mean`); default `reward<i>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// A rule (`rule: regex:…`) or a learned reward model (`model` + `adapter`), scored by RewardService.
    #[serde(flatten)]
    pub source: RewardSource,
    /// Weight in the sum (default 1).
    #[serde(default = "one")]
    pub weight: f64,
    /// The field of each prompt record holding the reference answer that `answer:…` rules compare with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reference_field: Option<String>,
}

fn one() -> f64 {
    1.0
}

/// GRPO / RLOO settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupRlConfig {
    /// The reward functions (at least one).
    pub rewards: Vec<RewardFunc>,
    /// Completions per prompt (>= 2).
    pub num_generations: usize,
    /// Most tokens per completion.
    pub max_completion_length: usize,
    /// Sampling temperature (also divides the logits of the log-probs).
    pub temperature: f64,
    /// Nucleus sampling (1 = off).
    pub top_p: f64,
    /// Top-k sampling (0 = off).
    pub top_k: usize,
    /// GRPO's loss normalisation.
    pub loss_type: LossType,
    /// Lower clip ε.
    pub epsilon: f64,
    /// Upper clip (absent = `epsilon`).
    pub epsilon_high: Option<f64>,
    /// KL weight (absent = TRL's default: 0 for GRPO, 0.05 for RLOO).
    pub beta: Option<f64>,
    /// Updates per batch of rollouts.
    pub num_iterations: usize,
    /// GRPO: `group`, `batch` or `none`.
    pub scale_rewards: ScaleRewards,
    /// GRPO: `sum_then_normalize` or `normalize_then_sum`.
    pub multi_objective_aggregation: Aggregation,
    /// Completions that hit `max_completion_length` without EOS train nothing.
    pub mask_truncated_completions: bool,
    /// GRPO: multiply the k3 KL by the importance ratio.
    pub use_bias_correction_kl: bool,
    /// GRPO: `token` or `sequence` (GSPO).
    pub importance_sampling_level: String,
    /// RLOO: normalise the advantages over the batch.
    pub normalize_advantages: bool,
    /// RLOO: clamp the summed reward to [lo, hi] before the KL penalty.
    pub reward_clip_range: Option<[f64; 2]>,
}

impl Default for GroupRlConfig {
    fn default() -> Self {
        Self {
            rewards: vec![],
            num_generations: 8,
            max_completion_length: 256,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            loss_type: LossType::Dapo,
            epsilon: 0.2,
            epsilon_high: None,
            beta: None,
            num_iterations: 1,
            scale_rewards: ScaleRewards::Group,
            multi_objective_aggregation: Aggregation::SumThenNormalize,
            mask_truncated_completions: false,
            use_bias_correction_kl: true,
            importance_sampling_level: "token".into(),
            normalize_advantages: false,
            reward_clip_range: None,
        }
    }
}

impl GroupRlConfig {
    /// The KL weight in effect.
    pub fn beta(&self, algo: GroupAlgorithm) -> f64 {
        self.beta.unwrap_or(match algo {
            GroupAlgorithm::Grpo => 0.0,
            GroupAlgorithm::Rloo => 0.05,
        })
    }

    /// Rejects settings no run can use, naming the field (`section` is `grpo` or `rloo`).
    pub fn validate(&self, section: &str) -> Result<()> {
        let bad = |m: String| Err(CoreError::InvalidArgument(format!("{section}.{m}")));
        if self.rewards.is_empty() {
            return bad("rewards: list at least one reward function (rule, or model + adapter)".into());
        }
        for (i, r) in self.rewards.iter().enumerate() {
            match (&r.source.rule, &r.source.model, &r.source.adapter) {
                (Some(rule), None, None) if !rule.is_empty() => {}
                (None, Some(_), Some(_)) => {}
                _ => return bad(format!("rewards[{i}]: set either `rule` or both `model` and `adapter`")),
            }
            if !r.weight.is_finite() {
                return bad(format!("rewards[{i}].weight must be a number"));
            }
            let answer_rule = r.source.rule.as_deref().is_some_and(|x| x.starts_with("answer:"));
            if answer_rule != r.reference_field.is_some() {
                return bad(format!(
                    "rewards[{i}]: an answer:… rule needs reference_field (the prompt records' field with the answer), and only it uses one"
                ));
            }
        }
        if self.num_generations < 2 || self.num_generations > 64 {
            return bad(format!(
                "num_generations must be in 2..=64 (a group needs a baseline), got {}",
                self.num_generations
            ));
        }
        if self.max_completion_length == 0 || self.max_completion_length > 4096 {
            return bad(format!("max_completion_length must be in 1..=4096, got {}", self.max_completion_length));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) || !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad(format!(
                "temperature must be > 0 and top_p in (0, 1], got {} and {}",
                self.temperature, self.top_p
            ));
        }
        if self.num_iterations == 0 {
            return bad("num_iterations must be at least 1".into());
        }
        if let Some([lo, hi]) = self.reward_clip_range {
            if !(lo < hi) {
                return bad(format!("reward_clip_range [{lo}, {hi}] must be increasing"));
            }
        }
        if let Some(b) = self.beta {
            if !(b.is_finite() && b >= 0.0) {
                return bad(format!("beta must be >= 0, got {b}"));
            }
        }
        self.policy_loss(GroupAlgorithm::Grpo)
            .and_then(|l| l.validate())
            .map_err(|e| CoreError::InvalidArgument(format!("{section}: {e}")))
    }

    /// The policy loss the updates use.
    pub fn policy_loss(&self, algo: GroupAlgorithm) -> Result<PolicyLoss> {
        Ok(match algo {
            GroupAlgorithm::Grpo => PolicyLoss {
                loss_type: self.loss_type,
                epsilon_low: self.epsilon,
                epsilon_high: self.epsilon_high.unwrap_or(self.epsilon),
                beta: self.beta(algo),
                max_completion_length: self.max_completion_length,
                bias_correction_kl: self.use_bias_correction_kl,
                ratio: match self.importance_sampling_level.as_str() {
                    "token" => RatioLevel::Token,
                    "sequence" => RatioLevel::SequenceMean,
                    other => {
                        return Err(CoreError::InvalidArgument(format!(
                            "importance_sampling_level `{other}`: token or sequence"
                        )))
                    }
                },
                on_policy: self.num_iterations == 1,
            },
            // RLOO: the KL is in the reward; the loss is the mean over completions of the sequence-ratio
            // surrogate.
            GroupAlgorithm::Rloo => PolicyLoss {
                loss_type: LossType::Grpo,
                epsilon_low: self.epsilon,
                epsilon_high: self.epsilon_high.unwrap_or(self.epsilon),
                beta: 0.0,
                max_completion_length: self.max_completion_length,
                bias_correction_kl: false,
                ratio: RatioLevel::SequenceSum,
                // RLOO's KL penalty needs the sampling policy's log-probs anyway.
                on_policy: false,
            },
        })
    }
}
