//! The reward-model job: preference data → base (NF4 for QLoRA) + LoRA + a fresh score head → the training
//! loop with the Bradley–Terry objective → a PEFT SEQ_CLS adapter with the head. Eval metrics report the
//! held-out pairwise accuracy (`eval_rewards/accuracies`).

use std::path::Path;

use anyhow::{Context, Result};
use ferrotune_core::data::load_pairs;
use ferrotune_core::train::reward::{RewardExample, RewardObjective, RewardState};
use ferrotune_core::train::Run;
use ferrotune_runtime::jobs::{JobContext, JobOutcome, JobRunner};

use crate::recipe::Objective;
use crate::scaffold::{
    dataset_dir, finish, job_recipe, load_base, model_dir, splits, train_job, write_provenance, Base,
};

/// Runs `reward` jobs; the spec is `{"recipe": <resolved recipe>, "resume": bool}`.
pub struct RewardRunner;

impl JobRunner for RewardRunner {
    fn run(&self, ctx: &JobContext) -> Result<JobOutcome> {
        let (r, resume) = job_recipe(ctx)?;
        let cfg = match r.objective() {
            Objective::Reward(cfg) => cfg,
            _ => Default::default(),
        };
        let out = r.output_dir.clone();
        ferrotune_core::fsx::create_dir_all(&out).with_context(|| format!("{}", out.display()))?;
        let model_dir = model_dir(&r)?;
        let dataset = dataset_dir(&r, &model_dir, ctx)?;
        let pairs = |d: &Path, split: &str| -> Result<Vec<RewardExample>> {
            Ok(load_pairs(d, split)?.into_iter().map(|(chosen, rejected)| RewardExample { chosen, rejected }).collect())
        };
        let (train_set, eval_set) = splits(&dataset, pairs)?;
        let Base { mut model, qlora, pad_id, .. } = load_base(&r, &model_dir, ctx)?;
        let lcfg = r.adapter.lora()?;
        model.add_lora(&lcfg, r.training.seed)?;
        model.add_score_head(r.training.seed)?;
        write_provenance(&r, &model_dir, &dataset, qlora, (train_set.len(), eval_set.len()))?;
        let objective = RewardObjective::new(pad_id, cfg);
        let state = RewardState { cfg: lcfg, base_model: model_dir.display().to_string() };
        let tokens_of = |e: &RewardExample| e.chosen.input_ids.len() + e.rejected.input_ids.len();
        let run = Run {
            objective: &objective,
            train: &train_set,
            eval: &eval_set,
            state: &state,
            cfg: &r.training,
            output_dir: &out,
            tokens_of: &tokens_of,
        };
        if train_job(&mut model, &run, resume, ctx, &mut |_| {})?.is_none() {
            return Ok(JobOutcome::Stopped);
        }
        Ok(JobOutcome::Finished(finish(&out, &dataset, "reward_model", "reward model (Bradley–Terry)", ctx)))
    }
}
