//! The job scaffold every training runner shares (SFT, DPO, reward, PPO): the job's recipe and the claim on
//! its output dir, the model and dataset directories, the base model (NF4 for QLoRA), the training loop run
//! as a job (every step a job event, stopping on cancel or drain), provenance files and the artifacts of a
//! finished run.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use ferrotune_core::data::{build, BuildOptions};
use ferrotune_core::train::{train, Algorithm, Run, StepEvent, TrainSummary};
use ferrotune_core::CausalLm;
use ferrotune_core::{registry, ChatTemplate};
use ferrotune_runtime::jobs::{Artifact, JobContext, Progress};
use serde_json::json;

use crate::recipe::{Method, Recipe};

/// The Progress of a step event.
pub fn progress_of(ev: &StepEvent) -> Progress {
    Progress {
        step: ev.step as u64,
        total: ev.total as u64,
        loss: ev.loss,
        eval_loss: ev.eval_loss,
        lr: ev.lr,
        grad_norm: ev.grad_norm,
        tokens_per_s: ev.tokens_per_s,
        trained_tokens: ev.trained_tokens as u64,
        epoch: ev.epoch,
        eta_s: 0.0,
        checkpoint: ev.checkpoint.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        metrics: ev.metrics.clone().into_iter().collect(),
    }
}

/// A recipe job's spec `{"recipe": <resolved recipe>, "resume": bool}`: the recipe, and whether to continue
/// from the newest checkpoint (asked for, or the job itself is being resumed after a restart).
/// The job claims the recipe's output dir here (see [`ferrotune_core::train::run_dir`]), before it writes
/// anything there; a fresh run is that job's run.
pub fn job_recipe(ctx: &JobContext) -> Result<(Recipe, bool)> {
    let r: Recipe = serde_json::from_value(ctx.spec["recipe"].clone()).context("job spec: recipe")?;
    let resume = ctx.resume || ctx.spec["resume"].as_bool().unwrap_or(false);
    // In a data-parallel job rank 0 alone owns the output dir.
    if ferrotune_core::dist::rank() == 0 {
        ferrotune_core::train::run_dir::claim(&r.output_dir, resume, r.training.overwrite_output_dir, &ctx.id)?;
    }
    Ok((r, resume))
}

/// Runs the training loop as a job: every step reported as a job event (after `on_step`), stopping when the
/// job is cancelled or the server drains. `None` when it stopped early (its checkpoint saved, and logged).
pub fn train_job<O: Algorithm>(
    model: &mut CausalLm,
    run: &Run<'_, O>,
    resume: bool,
    ctx: &JobContext,
    on_step: &mut dyn FnMut(&StepEvent),
) -> Result<Option<TrainSummary>> {
    let summary = train(
        model,
        run,
        resume,
        &mut |ev| {
            on_step(ev);
            ctx.progress(progress_of(ev));
        },
        &|| ctx.should_stop(),
    )?;
    if summary.stopped {
        ctx.log(format!("stopped at step {} of {}; checkpoint saved", summary.position.step, run.cfg.max_steps));
        return Ok(None);
    }
    Ok(Some(summary))
}

/// The recipe's model directory (pulled when it names a known model).
pub fn model_dir(r: &Recipe) -> Result<PathBuf> {
    Ok(if Path::new(&r.model).is_dir() { PathBuf::from(&r.model) } else { registry::pull(&r.model)? })
}

/// The recipe's dataset directory: formats `data.path` into `OUTPUT_DIR/dataset` unless `data.dataset` names one.
pub fn dataset_dir(r: &Recipe, model_dir: &Path, ctx: &JobContext) -> Result<PathBuf> {
    let out = &r.output_dir;
    // A bad `chat_template` is refused here, naming the key, before anything is formatted.
    ChatTemplate::for_model(model_dir, r.chat_template.as_deref())?;
    Ok(match (&r.data.dataset, &r.data.path) {
        (Some(d), _) => d.clone(),
        (None, Some(p)) => {
            // Ranks after the first of a data-parallel job format their own copy outside the output dir.
            let d = match ferrotune_core::dist::rank() {
                0 => out.join("dataset"),
                r => {
                    sweep_stale_rank_copies();
                    let own = std::env::temp_dir().join(format!("ferrotune-rank{r}-{}", std::process::id()));
                    hold_owner_lock(&own)?;
                    own.join("dataset")
                }
            };
            let stats = build(
                &BuildOptions {
                    inputs: vec![p.clone()],
                    format: r.data.format.context("data.format")?,
                    columns: Default::default(),
                    model: model_dir.to_path_buf(),
                    mask: r.data.mask,
                    max_seq_len: r.data.max_seq_len,
                    eval_fraction: r.data.eval_fraction,
                    seed: r.training.seed,
                    strict: false,
                    pack: r.data.pack,
                    max_text_bytes: ferrotune_core::data::read::DEFAULT_MAX_TEXT_BYTES,
                    chat_template: r.chat_template.clone(),
                },
                &d,
            )?;
            ctx.log(format!(
                "data: {} train / {} eval examples, {} trained tokens ({} skipped)",
                stats.train,
                stats.eval,
                stats.trained_tokens,
                stats.dropped.values().sum::<usize>()
            ));
            d
        }
        (None, None) => anyhow::bail!("recipe: set data.path or data.dataset"),
    })
}

/// Loads the base in the recipe's dtype and device, NF4-quantized for QLoRA.
pub fn load_model(r: &Recipe, model_dir: &Path, ctx: &JobContext) -> Result<(ferrotune_core::CausalLm, bool)> {
    let kind = ferrotune_core::parse_dtype(&r.dtype)?;
    let device = ferrotune_core::parse_device(&r.device)?;
    let mut model = ferrotune_core::models::load_model_placed(model_dir, kind, device, r.device_map.as_ref())?;
    let qlora = r.adapter.method()? == Method::Qlora || r.adapter.load_in_4bit;
    if qlora {
        let (before, after) = model.quantize_nf4()?;
        ctx.log(format!(
            "qlora: decoder linear weights {:.1} MB → {:.1} MB in NF4",
            before as f64 / 1e6,
            after as f64 / 1e6
        ));
    }
    Ok((model, qlora))
}

/// A recipe's base model loaded for training ([`load_model`]) with its tokenizer and pad id.
pub struct Base {
    /// The model (NF4 for QLoRA).
    pub model: CausalLm,
    /// Whether the base was quantized to NF4.
    pub qlora: bool,
    /// Its tokenizer.
    pub tokenizer: ferrotune_core::Tokenizer,
    /// Its pad id (generation defaults).
    pub pad_id: u32,
}

/// Loads the base, its tokenizer and its pad id.
pub fn load_base(r: &Recipe, model_dir: &Path, ctx: &JobContext) -> Result<Base> {
    let (model, qlora) = load_model(r, model_dir, ctx)?;
    let tokenizer = ferrotune_core::Tokenizer::from_dir(model_dir)?;
    let pad_id = ferrotune_core::ModelDefaults::from_dir(model_dir, &tokenizer)?.pad_id;
    Ok(Base { model, qlora, tokenizer, pad_id })
}

/// A dataset's train and eval splits loaded with `load`; the eval split is empty when the dataset has none.
pub fn splits<T, E: Into<anyhow::Error>>(
    dataset: &Path,
    load: impl Fn(&Path, &str) -> std::result::Result<Vec<T>, E>,
) -> Result<(Vec<T>, Vec<T>)> {
    let train = load(dataset, "train").map_err(Into::into)?;
    let eval = if ferrotune_core::fsx::exists(dataset.join("eval.jsonl")) {
        load(dataset, "eval").map_err(Into::into)?
    } else {
        vec![]
    };
    Ok((train, eval))
}

/// The lock file inside a rank's own copy of the data: held (flock) for the life of the process that made it.
const OWNER_LOCK: &str = ".owner.lock";

/// Creates `dir` and holds an exclusive lock on its [`OWNER_LOCK`] until the process ends, so that a sweep in
/// another process (another job, another PID namespace sharing the temp dir) knows the copy is in use.
fn hold_owner_lock(dir: &Path) -> Result<()> {
    static HELD: std::sync::Mutex<Vec<std::fs::File>> = std::sync::Mutex::new(Vec::new());
    ferrotune_core::fsx::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(OWNER_LOCK);
    let f = std::fs::File::create(&path).with_context(|| format!("creating {}", path.display()))?;
    f.lock().with_context(|| format!("locking {}", path.display()))?;
    HELD.lock().unwrap_or_else(|e| e.into_inner()).push(f);
    Ok(())
}

/// Removes the formatted copies (`ferrotune-rank{r}-{pid}` in the temp dir) that no process holds any more: a
/// rank killed mid-run (SIGKILL, out of memory) never reaches [`finish`], so the next rank that formats one
/// cleans up after it. A copy is in use while its [`OWNER_LOCK`] is locked (whatever PID namespace its process
/// runs in); a copy without one (made before locks, or still being created) is removed only when its process
/// id names no process here and it is more than a minute old.
fn sweep_stale_rank_copies() {
    let tmp = std::env::temp_dir();
    for e in ferrotune_core::fsx::read_dir(&tmp).unwrap_or_default() {
        let name = e.name.to_string_lossy();
        let Some(pid) = name.strip_prefix("ferrotune-rank").and_then(|r| r.split_once('-')).map(|(_, pid)| pid) else {
            continue;
        };
        if pid.parse::<u32>().is_err() {
            continue;
        }
        let dir = tmp.join(&e.name);
        let stale = match std::fs::File::open(dir.join(OWNER_LOCK)) {
            Ok(f) => f.try_lock().is_ok(),
            Err(_) => {
                let old = std::fs::metadata(&dir)
                    .and_then(|m| m.modified())
                    .is_ok_and(|t| t.elapsed().is_ok_and(|a| a.as_secs() > 60));
                old && !Path::new(&format!("/proc/{pid}")).exists()
            }
        };
        if stale {
            let _ = ferrotune_core::fsx::remove_dir_all(&dir);
        }
    }
}

/// The template used for the data, the resolved recipe and `ferrotune_train.json`, beside the output.
pub fn write_provenance(
    r: &Recipe,
    model_dir: &Path,
    dataset: &Path,
    qlora: bool,
    counts: (usize, usize),
) -> Result<()> {
    if ferrotune_core::dist::rank() > 0 {
        return Ok(());
    }
    let out = &r.output_dir;
    let template = ChatTemplate::for_model(model_dir, r.chat_template.as_deref())?;
    ferrotune_core::fsx::write(out.join("chat_template.jinja"), template.source())
        .context("writing chat_template.jinja")?;
    ferrotune_core::fsx::write(out.join("recipe.yaml"), serde_yaml::to_string(r)?).context("writing recipe.yaml")?;
    ferrotune_core::fsx::write(
        out.join("ferrotune_train.json"),
        serde_json::to_string_pretty(
            &json!({"base_model": model_dir, "method": r.adapter.method, "base_quantization": if qlora { "nf4" } else { "none" },
            "objective": r.objective().name(), "chat_template": template.origin(), "dataset": dataset,
            "train_examples": counts.0, "eval_examples": counts.1}),
        )?,
    )?;
    Ok(())
}

/// Artifacts of a finished run, with the loss plot written (titled `title`).
pub fn finish(out: &Path, dataset: &Path, kind: &str, title: &str, ctx: &JobContext) -> Vec<Artifact> {
    if ferrotune_core::dist::rank() > 0 {
        // This rank's own formatted copy of the data (see `dataset_dir`).
        if let Some(dir) = dataset.parent().filter(|d| d.starts_with(std::env::temp_dir())) {
            if dir.file_name().is_some_and(|n| n.to_string_lossy().starts_with("ferrotune-rank")) {
                let _ = ferrotune_core::fsx::remove_dir_all(dir);
            }
        }
        return vec![];
    }
    let metrics = out.join("metrics.jsonl");
    let plot = out.join("loss.svg");
    if let Err(e) = ferrotune_runtime::plot::loss_curve(&metrics, &plot, title) {
        ctx.log(format!("loss plot not written: {e:#}"));
    }
    let art = |k: &str, p: &Path| Artifact { kind: k.into(), path: p.display().to_string() };
    let mut artifacts = vec![art(kind, out), art("metrics", &metrics), art("dataset", dataset)];
    if plot.exists() {
        artifacts.push(art("plot", &plot));
    }
    artifacts
}
