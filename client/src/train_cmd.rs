//! `ferrotune train sft|reward --recipe R.yaml` and `ferrotune align dpo|orpo|simpo|kto|ppo|grpo|rloo --recipe R.yaml`: validates the recipe here
//! (errors name the file), starts the job on the policy service (embedded or remote) and follows it. With the embedded service, SIGINT /
//! SIGTERM cancel the job after it checkpoints (`--resume` continues); against a remote service the job
//! keeps running when the CLI stops (`ferrotune jobs watch ID`).

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferrotune_proto::v1::{Job, StartRecipeJobRequest};
use serde_json::json;

use crate::connect::{status_error, EmbeddedPolicy, Services};
use crate::jobs_cmd::{finish_message, follow};

/// Arguments of every recipe command (`train sft`, `train reward`, every `align` method).
#[derive(clap::Args)]
pub(crate) struct RecipeArgs {
    /// The recipe (YAML).
    #[arg(long)]
    recipe: PathBuf,
    /// Overrides output_dir.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Overrides training.max_steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// key=value overrides, e.g. training.learning_rate=1e-4 (repeatable).
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Continue from the newest checkpoint in the output dir.
    #[arg(long, conflicts_with = "overwrite")]
    resume: bool,
    /// Start afresh in an output dir that holds another run, replacing its checkpoints and metrics.
    #[arg(long)]
    overwrite: bool,
    /// Data parallel: run the job on N local processes (ranks), each on its share of every global batch
    /// (micro × accumulation × ranks), gradients summed by c10d's Gloo all-reduce.
    #[arg(long)]
    pub(crate) nproc_per_node: Option<usize>,
}

/// `--nproc-per-node`: starts the ranks (see `launch`) instead of running the job here.
pub(crate) fn launch(
    kind: Kind,
    a: &RecipeArgs,
    s: &ferrotune_runtime::Settings,
    threads: Option<usize>,
) -> Result<()> {
    let n = a.nproc_per_node.expect("asked for");
    if !matches!(kind, Kind::Sft | Kind::Reward | Kind::Dpo | Kind::Orpo | Kind::Simpo | Kind::Kto) {
        anyhow::bail!("--nproc-per-node: data parallelism covers sft, reward, dpo, orpo, simpo and kto (PPO, GRPO and RLOO train on a policy session)");
    }
    let remote = if kind == Kind::Reward { !s.endpoints.reward.is_empty() } else { s.endpoints.policy.is_some() };
    if remote {
        anyhow::bail!("--nproc-per-node starts the ranks on this machine, with embedded services; unset the remote endpoint (or run ferrotune on each node with torchrun's environment)");
    }
    let (_, _, r) = load(a)?;
    if r.device_map.is_some() {
        anyhow::bail!("--nproc-per-node gives each rank one device; remove the recipe's device_map (or run one rank per node with torchrun's environment)");
    }
    crate::launch::run(n, &r.device, threads)
}

/// The recipe text, the overrides (with --output-dir / --max-steps), and the validated recipe.
fn load(a: &RecipeArgs) -> Result<(String, Vec<String>, ferrotune_training::recipe::Recipe)> {
    let mut sets = a.sets.clone();
    if let Some(d) = &a.output_dir {
        sets.push(format!("output_dir={}", d.display()));
    }
    if let Some(n) = a.max_steps {
        sets.push(format!("training.max_steps={n}"));
    }
    if a.overwrite {
        sets.push("training.overwrite_output_dir=true".into());
    }
    let text = std::fs::read_to_string(&a.recipe).with_context(|| format!("{}", a.recipe.display()))?;
    let r = ferrotune_training::recipe::parse(&text, &a.recipe, &sets)?;
    Ok((text, sets, r))
}

/// The embedded policy service runs on the recipe's device (a remote one uses its own).
pub(crate) fn embedded_policy(a: &RecipeArgs) -> Result<EmbeddedPolicy> {
    Ok(EmbeddedPolicy { device: Some(load(a)?.2.device), dtype: None })
}

/// What a recipe trains.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// `train sft`.
    Sft,
    /// `align dpo`.
    Dpo,
    /// `align ppo`.
    Ppo,
    /// `align grpo` (the alignment service's orchestrator).
    Grpo,
    /// `align rloo`.
    Rloo,
    /// `align orpo`.
    Orpo,
    /// `align simpo`.
    Simpo,
    /// `align kto`.
    Kto,
    /// `train reward` (on the reward service).
    Reward,
}

pub(crate) async fn run(kind: Kind, a: &RecipeArgs, svc: &mut Services, json_out: bool) -> Result<()> {
    let (text, sets, _) = load(a)?;
    let j = start_and_follow(kind, text, sets, a.resume, svc, json_out).await?;
    finish_message(&j, json_out)
}

/// Starts a recipe job of `kind` and follows it to its end (with the embedded service, SIGINT / SIGTERM
/// cancel it after it checkpoints); the job as it ended.
pub(crate) async fn start_and_follow(
    kind: Kind,
    text: String,
    sets: Vec<String>,
    resume: bool,
    svc: &mut Services,
    json_out: bool,
) -> Result<Job> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let embedded = match kind {
        Kind::Reward => svc.reward_embedded,
        Kind::Grpo | Kind::Rloo => svc.alignment_embedded,
        _ => svc.policy_embedded,
    };
    if embedded {
        for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(sig, stop.clone()).context("installing the signal handler")?;
        }
    }
    let req = StartRecipeJobRequest { recipe_yaml: text, overrides: sets, resume };
    let started = match kind {
        Kind::Sft => svc.policy.start_sft(req).await,
        Kind::Dpo => svc.align.start_dpo(req).await,
        Kind::Ppo => svc.align.start_ppo(req).await,
        Kind::Grpo => svc.align.start_grpo(req).await,
        Kind::Rloo => svc.align.start_rloo(req).await,
        Kind::Orpo => svc.align.start_orpo(req).await,
        Kind::Simpo => svc.align.start_simpo(req).await,
        Kind::Kto => svc.align.start_kto(req).await,
        Kind::Reward => svc.reward.start_reward_training(req).await,
    };
    let job = started.map_err(status_error)?.into_inner().job.context("the service returned no job")?;
    if json_out {
        println!("{}", json!({"job_id": job.id, "output_dir": job.output_dir}));
    } else {
        eprintln!("job {} → {}", job.id, job.output_dir);
    }
    let cancel = embedded.then_some(stop);
    let jobs = match kind {
        Kind::Reward => &mut svc.reward_jobs,
        Kind::Sft => &mut svc.jobs,
        _ => &mut svc.align_jobs,
    };
    follow(jobs, &job.id, json_out, cancel).await
}

impl Kind {
    /// The kind of a job stage's name (`sft`, `dpo`, …).
    pub(crate) fn of(name: &str) -> Option<Self> {
        Some(match name {
            "sft" => Self::Sft,
            "dpo" => Self::Dpo,
            "ppo" => Self::Ppo,
            "grpo" => Self::Grpo,
            "rloo" => Self::Rloo,
            "orpo" => Self::Orpo,
            "simpo" => Self::Simpo,
            "kto" => Self::Kto,
            "reward" => Self::Reward,
            _ => return None,
        })
    }
}
