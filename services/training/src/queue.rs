//! Starting a recipe job: the recipe validated for its kind (one place for every runner's "LoRA only" and
//! section checks), its paths resolved under the artifact root, the output dir checked, then queued.

use std::path::Path;

use ferrotune_proto::v1::JobState;
use ferrotune_runtime::jobs::JobManager;
use ferrotune_runtime::{invalid, ArtifactRoot, StatusExt};
use tonic::Status;

/// Validates a recipe for a `kind` job (`sft`, `dpo`, `reward`), resolves its paths under `root`, runs it on
/// `device`, and queues it in `jobs`.
pub fn queue_recipe_job(
    kind: &str,
    yaml: &str,
    overrides: &[String],
    resume: bool,
    root: &ArtifactRoot,
    device: &str,
    jobs: &JobManager,
) -> Result<ferrotune_proto::v1::Job, Status> {
    if yaml.trim().is_empty() {
        return Err(invalid("recipe_yaml", "empty"));
    }
    let mut recipe = crate::recipe::parse(yaml, Path::new("recipe"), overrides).status()?;
    match kind {
        "ppo" => {
            if recipe.ppo.is_none() {
                return Err(invalid("ppo", "missing: a PPO recipe needs a ppo section with its reward (ppo.reward.rule, or ppo.reward.model and ppo.reward.adapter)"));
            }
            if !matches!(recipe.adapter.method().status()?, crate::recipe::Method::Lora | crate::recipe::Method::Qlora)
            {
                return Err(invalid(
                    "adapter.method",
                    format!("`{}`: ppo trains lora or qlora adapters", recipe.adapter.method),
                ));
            }
        }
        _ if recipe.ppo.is_some() => {
            return Err(invalid(
                "ppo",
                "this recipe has a ppo section: run it with align ppo (AlignmentService.StartPpo)",
            ))
        }
        "dpo" | "reward" => {
            if kind == "dpo" {
                recipe.dpo.get_or_insert_with(Default::default);
            } else {
                recipe.reward.get_or_insert_with(Default::default);
            }
            if !matches!(recipe.adapter.method().status()?, crate::recipe::Method::Lora | crate::recipe::Method::Qlora)
            {
                return Err(invalid(
                    "adapter.method",
                    format!("`{}`: {kind} trains lora or qlora adapters", recipe.adapter.method),
                ));
            }
        }
        _ if recipe.dpo.is_some() => {
            return Err(invalid(
                "dpo",
                "this recipe has a dpo section: run it with align dpo (AlignmentService.StartDpo)",
            ))
        }
        _ if recipe.reward.is_some() => {
            return Err(invalid("reward", "this recipe has a reward section: run it with train reward (RewardService)"))
        }
        _ => {}
    }
    recipe.resolve_paths(root, device)?;
    if Path::new(&recipe.model).is_absolute() && !Path::new(&recipe.model).join("config.json").is_file() {
        return Err(Status::not_found(format!("model: {} is not a model directory (no config.json)", recipe.model)));
    }
    for (field, p) in [
        ("data.path", &recipe.data.path),
        ("data.dataset", &recipe.data.dataset),
        ("data.eval_path", &recipe.data.eval_path),
    ] {
        if let Some(p) = p {
            if !p.exists() {
                return Err(Status::not_found(format!("{field}: {} not found", p.display())));
            }
        }
    }
    let out = recipe.output_dir.clone();
    let active = jobs.list(&[JobState::Queued, JobState::Running], 1000).status()?;
    if let Some(j) = active.iter().find(|j| Path::new(&j.output_dir) == out) {
        return Err(Status::failed_precondition(format!(
            "output_dir: job {} is already writing to {}",
            j.id,
            out.display()
        )));
    }
    // Refused now rather than as a failed job: a fresh run into another run's directory.
    ferrotune_core::train::run_dir::check(&out, resume, recipe.training.overwrite_output_dir)
        .map_err(|e| Status::failed_precondition(e.to_string()))?;
    let spec = serde_json::json!({"recipe": recipe, "resume": resume});
    let job = jobs.submit(kind, spec, out).status()?;
    tracing::info!(job = %job.id, kind, "job queued");
    Ok(job)
}
