//! What every trainer-hosting service shares (PolicyService, AlignmentService, RewardService): the recipe
//! and its validation, starting a recipe job, the job scaffold, and the runners of the four kinds of
//! training job (SFT, DPO, reward model, PPO). No service crate depends on another; they all depend on this.

pub mod dpo;
pub mod ppo;
pub mod queue;
pub mod recipe;
pub mod reward;
pub mod scaffold;
pub mod sft;

pub use queue::queue_recipe_job;
