//! Starting a recipe job: the recipe validated for its kind (one place for every runner's "LoRA only" and
//! section checks), its paths resolved under the artifact root, the output dir checked, then queued.

use std::path::Path;

use ferrotune_proto::v1::JobState;
use ferrotune_runtime::jobs::JobManager;
use ferrotune_runtime::{invalid, ArtifactRoot, StatusExt};
use tonic::Status;

/// Validates a recipe for a `kind` job (`sft`, `dpo`, `reward`), resolves its paths under `root`, runs it on
/// the service's `(device, device map)` (the recipe's own device map wins), and queues it in `jobs`.
pub fn queue_recipe_job(
    kind: &str,
    yaml: &str,
    overrides: &[String],
    resume: bool,
    root: &ArtifactRoot,
    (device, device_map): (&str, Option<&serde_json::Value>),
    jobs: &JobManager,
) -> Result<ferrotune_proto::v1::Job, Status> {
    if yaml.trim().is_empty() {
        return Err(invalid("recipe_yaml", "empty"));
    }
    let mut recipe = crate::recipe::parse(yaml, Path::new("recipe"), overrides).status()?;
    recipe.settle_objective(kind).map_err(|(field, msg)| invalid(field, msg))?;
    recipe.resolve_paths(root, device)?;
    if recipe.device_map.is_none() {
        recipe.device_map = device_map.cloned();
    }
    // Devices are known where the job runs: checked here, before anything is queued.
    ferrotune_core::parse_device(&recipe.device).status()?;
    if let Some(m) = &recipe.device_map {
        ferrotune_core::models::device_map::check(m).status()?;
    }
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
    // Refused now rather than as a failed job: a fresh run into another run's directory (rank 0's call, in a
    // data-parallel job: the other ranks find the directory rank 0 has just claimed).
    if ferrotune_core::dist::rank() == 0 {
        ferrotune_core::train::run_dir::check(&out, resume, recipe.training.overwrite_output_dir)
            .map_err(|e| Status::failed_precondition(e.to_string()))?;
    }
    let spec = serde_json::json!({"recipe": recipe, "resume": resume});
    let job = jobs.submit(kind, spec, out).status()?;
    tracing::info!(job = %job.id, kind, "job queued");
    Ok(job)
}
