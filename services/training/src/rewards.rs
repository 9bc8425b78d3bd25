//! The reward service's view of a recipe's reward: a rule or a learned reward model (PPO's `ppo.reward`,
//! GRPO's and RLOO's reward functions), as a `RewardModelRef` of a Score call.

use ferrotune_core::train::ppo_objective::RewardSource;
use ferrotune_proto::v1::reward_model_ref::Kind as RewardKind;
use ferrotune_proto::v1::{LearnedReward, ModelRef, RewardModelRef};

/// The reward service's reference to a reward source (a rule or a learned reward model).
pub fn reward_ref(src: &RewardSource) -> RewardModelRef {
    let kind = match (&src.rule, &src.model, &src.adapter) {
        (Some(rule), _, _) => RewardKind::Rule(rule.clone()),
        (None, m, a) => RewardKind::Learned(LearnedReward {
            base: Some(ModelRef { path: m.clone().unwrap_or_default() }),
            adapter: a.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        }),
    };
    RewardModelRef { kind: Some(kind) }
}
