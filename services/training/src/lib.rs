//! What every trainer-hosting service shares (PolicyService, AlignmentService, RewardService): the recipe
//! and its validation, starting a recipe job, the job scaffold, the runners of the training jobs that run on
//! one device (SFT, DPO, ORPO, SimPO, KTO, reward model), and the reward reference of online RL recipes (PPO, GRPO and RLOO
//! run as sessions driven by the alignment service). No service crate depends on another.

pub mod data_parallel;
pub mod dpo;
pub mod preference;
pub mod queue;
pub mod recipe;
pub mod reward;
pub mod rewards;
pub mod scaffold;
pub mod sft;

pub use queue::queue_recipe_job;
