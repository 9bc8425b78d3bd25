//! Experiment tracking of every job: `report_to: [mlflow, tensorboard]` in a recipe (or `tracking.report_to`
//! in the service config for recipes that say nothing) sends the job's resolved recipe as params, tags (job
//! kind, base model, adapter method, ferrotune version, git revision when `FERROTUNE_GIT_REVISION` is set),
//! every step's metrics under the names of `metrics.jsonl`, and at the end its artifacts and status.
//! The job manager drives it from the job's own events, so every kind of job is tracked the same way and no
//! runner knows about it. A tracker never fails or slows the job: errors are warnings.

pub mod http;
pub mod mlflow;
pub mod tfevents;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferrotune_proto::v1::{Artifact, JobState, Progress};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Where warnings go (the job's log while it runs, and the service log).
pub type Warn = Arc<dyn Fn(String) + Send + Sync>;

/// The trackers a recipe can name.
pub const TRACKERS: &[&str] = &["mlflow", "tensorboard"];

/// `tracking:` in the service config.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackingSettings {
    /// Trackers of jobs whose recipe has no `report_to`.
    #[serde(default)]
    pub report_to: Vec<String>,
    /// The MLflow tracking server.
    #[serde(default)]
    pub mlflow: MlflowSettings,
}

/// `tracking.mlflow:`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlflowSettings {
    /// `http://host:port[/prefix]` (MLFLOW_TRACKING_URI when unset).
    pub tracking_uri: Option<String>,
    /// Experiment of runs whose recipe names none (MLFLOW_EXPERIMENT_NAME when unset, else `ferrotune`).
    pub experiment_name: Option<String>,
    /// Bearer token (MLFLOW_TRACKING_TOKEN when unset).
    pub token: Option<String>,
}

impl MlflowSettings {
    fn uri(&self) -> Option<String> {
        self.tracking_uri.clone().or_else(|| std::env::var("MLFLOW_TRACKING_URI").ok()).filter(|u| !u.is_empty())
    }
    fn experiment(&self) -> String {
        self.experiment_name
            .clone()
            .or_else(|| std::env::var("MLFLOW_EXPERIMENT_NAME").ok())
            .filter(|e| !e.is_empty())
            .unwrap_or_else(|| "ferrotune".into())
    }
    fn token(&self) -> Option<String> {
        self.token.clone().or_else(|| std::env::var("MLFLOW_TRACKING_TOKEN").ok()).filter(|t| !t.is_empty())
    }
}

/// Checks a `report_to` list: known trackers, or `none` alone.
pub fn check_report_to(list: &[String]) -> Result<(), String> {
    for t in list {
        if t == "none" && list.len() > 1 {
            return Err("`none` goes alone".into());
        }
        if t != "none" && !TRACKERS.contains(&t.as_str()) {
            return Err(format!("unknown tracker `{t}` (known: {}, or none)", TRACKERS.join(", ")));
        }
    }
    Ok(())
}

impl TrackingSettings {
    /// Rejects what no job could report with.
    pub fn validate(&self) -> anyhow::Result<()> {
        check_report_to(&self.report_to).map_err(|e| anyhow::anyhow!("configuration: tracking.report_to: {e}"))?;
        if let Some(u) = &self.mlflow.tracking_uri {
            http::Endpoint::parse(u)
                .map_err(|e| anyhow::anyhow!("configuration: tracking.mlflow.tracking_uri: {e}"))?;
        }
        Ok(())
    }
}

/// The job as tracking sees it.
pub struct JobInfo<'a> {
    /// Job id.
    pub id: &'a str,
    /// Job kind (`sft`, `dpo`, …).
    pub kind: &'a str,
    /// Output directory.
    pub output_dir: &'a Path,
    /// The job spec (`{"recipe": …}` for recipe jobs).
    pub spec: &'a Value,
    /// Continuing an earlier run on the same output dir.
    pub resume: bool,
}

trait Sink: Send {
    fn step(&mut self, p: &Progress);
    fn finish(&mut self, state: JobState, artifacts: &[Artifact]);
}

/// The trackers of one job.
pub struct JobTracker {
    sinks: Vec<Box<dyn Sink>>,
}

/// The metrics of a step, named as in `metrics.jsonl` (non-finite values left out).
pub fn step_metrics(p: &Progress) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = vec![
        ("loss".into(), p.loss),
        ("lr".into(), p.lr),
        ("grad_norm".into(), p.grad_norm),
        ("tokens_per_s".into(), p.tokens_per_s),
        ("trained_tokens".into(), p.trained_tokens as f64),
        ("epoch".into(), p.epoch),
    ];
    if let Some(e) = p.eval_loss {
        out.push(("eval_loss".into(), e));
    }
    let mut extra: Vec<(String, f64)> = p.metrics.iter().map(|(k, v)| (k.clone(), *v)).collect();
    extra.sort_by(|a, b| a.0.cmp(&b.0));
    out.extend(extra);
    out.retain(|(_, v)| v.is_finite());
    out
}

/// A recipe flattened into `a.b.c = value` params (lists and maps inside lists as JSON).
pub fn flatten(v: &Value) -> Vec<(String, String)> {
    fn walk(prefix: &str, v: &Value, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                for (k, x) in m {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, x, out);
                }
            }
            Value::Null => {}
            Value::String(s) => out.push((prefix.to_owned(), s.clone())),
            other => out.push((prefix.to_owned(), other.to_string())),
        }
    }
    let mut out = vec![];
    walk("", v, &mut out);
    out
}

/// The recipe's `report_to` (or the service default); empty when nothing is tracked.
fn trackers(settings: &TrackingSettings, recipe: &Value) -> Vec<String> {
    let list: Vec<String> = match recipe.get("report_to") {
        Some(Value::Array(a)) => a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => settings.report_to.clone(),
    };
    list.into_iter().filter(|t| t != "none").collect()
}

impl JobTracker {
    /// The trackers `job` asks for (none for jobs without a recipe, e.g. a mirror of a remote job).
    pub fn start(settings: &TrackingSettings, job: &JobInfo, warn: Warn) -> Option<Self> {
        let recipe = job.spec.get("recipe").filter(|r| r.is_object())?;
        let names = trackers(settings, recipe);
        let mut sinks: Vec<Box<dyn Sink>> = vec![];
        for name in &names {
            match name.as_str() {
                "tensorboard" => match TensorBoard::start(job, recipe) {
                    Ok(t) => sinks.push(Box::new(t)),
                    Err(e) => warn(format!("tensorboard: event file not written: {e}")),
                },
                "mlflow" => match MlflowSink::start(settings, job, recipe, warn.clone()) {
                    Ok(m) => sinks.push(Box::new(m)),
                    Err(e) => warn(format!("mlflow: not reporting: {e}")),
                },
                other => warn(format!("report_to: unknown tracker `{other}` ignored")),
            }
        }
        (!sinks.is_empty()).then_some(Self { sinks })
    }

    /// One optimizer step.
    pub fn step(&mut self, p: &Progress) {
        for s in &mut self.sinks {
            s.step(p);
        }
    }

    /// The job ended in `state` with `artifacts`.
    pub fn finish(&mut self, state: JobState, artifacts: &[Artifact]) {
        for s in &mut self.sinks {
            s.finish(state, artifacts);
        }
    }
}

/// TensorBoard: event files under `OUTPUT_DIR/runs/`.
struct TensorBoard {
    w: tfevents::EventWriter,
}

impl TensorBoard {
    fn start(job: &JobInfo, recipe: &Value) -> std::io::Result<Self> {
        let mut w = tfevents::EventWriter::create(&job.output_dir.join("runs"), job.resume)?;
        if !job.resume {
            let text = serde_json::to_string_pretty(recipe).unwrap_or_default();
            w.text(0, "recipe", &format!("```json\n{text}\n```"))?;
        }
        Ok(Self { w })
    }
}

impl Sink for TensorBoard {
    fn step(&mut self, p: &Progress) {
        if let Err(e) = self.w.scalars(p.step as i64, &step_metrics(p)) {
            tracing::warn!("tensorboard: {}: {e}", self.w.path().display());
        }
    }
    fn finish(&mut self, _: JobState, _: &[Artifact]) {}
}

/// MLflow: one run per job (continued when the job resumes).
struct MlflowSink {
    m: mlflow::Mlflow,
    out: PathBuf,
    register: Option<String>,
}

/// The job's tags.
fn tags(job: &JobInfo, recipe: &Value) -> Vec<(String, String)> {
    let mut t = vec![
        ("ferrotune.job_id".to_owned(), job.id.to_owned()),
        ("ferrotune.job_kind".to_owned(), job.kind.to_owned()),
        ("ferrotune.version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
        ("mlflow.source.name".to_owned(), "ferrotune".to_owned()),
        ("mlflow.source.type".to_owned(), "JOB".to_owned()),
    ];
    if let Some(m) = recipe["model"].as_str() {
        t.push(("ferrotune.base_model".into(), m.into()));
    }
    if let Some(m) = recipe["adapter"]["method"].as_str() {
        t.push(("ferrotune.adapter_method".into(), m.into()));
    }
    if let Some(parent) = recipe["tracking"]["parent_run_id"].as_str() {
        t.push(("mlflow.parentRunId".into(), parent.into()));
    }
    if let Ok(rev) = std::env::var("FERROTUNE_GIT_REVISION") {
        if !rev.is_empty() {
            t.push(("mlflow.source.git.commit".into(), rev.clone()));
            t.push(("ferrotune.git_revision".into(), rev));
        }
    }
    t
}

impl MlflowSink {
    fn start(settings: &TrackingSettings, job: &JobInfo, recipe: &Value, warn: Warn) -> Result<Self, String> {
        let uri =
            settings.mlflow.uri().ok_or("no tracking URI (tracking.mlflow.tracking_uri or MLFLOW_TRACKING_URI)")?;
        let ep = http::Endpoint::parse(&uri)?;
        let experiment = recipe["tracking"]["experiment_name"]
            .as_str()
            .map(str::to_owned)
            .unwrap_or_else(|| settings.mlflow.experiment());
        let run_name = recipe["run_name"].as_str().map(str::to_owned).unwrap_or_else(|| {
            job.output_dir.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| job.id.to_owned())
        });
        let params = flatten(recipe).into_iter().map(|(k, v)| (k, mlflow::param_value(&v))).collect();
        let m = mlflow::Mlflow::start(ep, settings.mlflow.token(), job.output_dir, warn);
        m.push(mlflow::Op::Start {
            experiment,
            run_name,
            tags: tags(job, recipe),
            params,
            resume: job.resume,
            start_ms: crate::jobs::now_ms(),
        });
        let register = recipe["tracking"]["register_model"].as_str().map(str::to_owned);
        Ok(Self { m, out: job.output_dir.to_path_buf(), register })
    }
}

/// The files (not directories) directly in `dir`, by name (read_dir sorts them).
fn top_files(dir: &Path) -> Vec<PathBuf> {
    ferrotune_core::fsx::read_dir(dir)
        .map(|es| es.into_iter().filter(|e| !e.is_dir).map(|e| e.path).collect())
        .unwrap_or_default()
}

/// The files of a finished run to keep as artifacts: (local file, artifact path). The trained output's
/// top-level files go under `adapter/` or `model/` (checkpoints and the formatted dataset stay behind).
pub fn artifact_files(out: &Path, artifacts: &[Artifact]) -> (Vec<(PathBuf, String)>, Option<String>) {
    let mut files = vec![];
    let mut output_dir = None;
    for a in artifacts {
        let p = PathBuf::from(&a.path);
        match a.kind.as_str() {
            "adapter" | "model" | "reward_model" if ferrotune_core::fsx::is_dir(&p) => {
                let sub = if a.kind == "adapter" { "adapter" } else { "model" };
                for f in top_files(&p) {
                    let name = f.file_name().expect("a file").to_string_lossy().into_owned();
                    if name == "metrics.jsonl" || name == "loss.svg" || name.starts_with('.') || name.ends_with(".lock")
                    {
                        continue;
                    }
                    files.push((f, format!("{sub}/{name}")));
                }
                output_dir = Some(sub.to_owned());
            }
            _ if ferrotune_core::fsx::is_file(&p) => {
                let name = p.file_name().expect("a file").to_string_lossy().into_owned();
                files.push((p, name));
            }
            _ => {}
        }
    }
    let stats = out.join("dataset").join("stats.json");
    if ferrotune_core::fsx::is_file(&stats) && !files.iter().any(|(_, n)| n == "stats.json") {
        files.push((stats, "stats.json".into()));
    }
    (files, output_dir)
}

impl Sink for MlflowSink {
    fn step(&mut self, p: &Progress) {
        let now = crate::jobs::now_ms();
        let m = step_metrics(p)
            .into_iter()
            .map(|(key, value)| mlflow::Metric { key, value, timestamp: now, step: p.step as i64 })
            .collect();
        self.m.push(mlflow::Op::Metrics(m));
    }

    fn finish(&mut self, state: JobState, artifacts: &[Artifact]) {
        let status = match state {
            JobState::Succeeded => "FINISHED",
            JobState::Failed => "FAILED",
            JobState::Cancelled => "KILLED",
            // Interrupted (the service drains): the run goes on when the job resumes.
            _ => {
                self.m.close();
                return;
            }
        };
        let (files, output) = artifact_files(&self.out, artifacts);
        for (file, artifact_path) in files {
            self.m.push(mlflow::Op::Artifact { file, artifact_path });
        }
        if let (Some(name), Some(dir), JobState::Succeeded) = (&self.register, output, state) {
            self.m.push(mlflow::Op::Register { name: name.clone(), artifact_dir: dir });
        }
        self.m.push(mlflow::Op::End { status: status.into(), end_ms: crate::jobs::now_ms() });
        self.m.close();
    }
}

/// A pipeline's own MLflow run, the parent of its stages' runs (`mlflow.parentRunId`).
pub struct PipelineRun {
    m: mlflow::Mlflow,
    /// The run id, once the server made it (None while it cannot be reached).
    pub run_id: Option<String>,
}

impl PipelineRun {
    /// Creates (or, resuming, reopens) the run of the pipeline kept in `out`, waiting up to 10 s for its id.
    pub fn start(
        settings: &TrackingSettings,
        out: &Path,
        name: &str,
        experiment: Option<&str>,
        params: Vec<(String, String)>,
        resume: bool,
        warn: Warn,
    ) -> Result<Self, String> {
        let uri =
            settings.mlflow.uri().ok_or("no tracking URI (tracking.mlflow.tracking_uri or MLFLOW_TRACKING_URI)")?;
        let ep = http::Endpoint::parse(&uri)?;
        let m = mlflow::Mlflow::start(ep, settings.mlflow.token(), out, warn);
        let tags = vec![
            ("ferrotune.job_kind".to_owned(), "pipeline".to_owned()),
            ("ferrotune.version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
            ("mlflow.source.name".to_owned(), "ferrotune".to_owned()),
        ];
        let experiment = experiment.map(str::to_owned).unwrap_or_else(|| settings.mlflow.experiment());
        let params = params.into_iter().map(|(k, v)| (k, mlflow::param_value(&v))).collect();
        m.push(mlflow::Op::Start {
            experiment,
            run_name: name.to_owned(),
            tags,
            params,
            resume,
            start_ms: crate::jobs::now_ms(),
        });
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while m.pending() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let run_id = ferrotune_core::fsx::read_to_string(out.join("mlflow").join("run.json"))
            .ok()
            .and_then(|t| serde_json::from_str::<mlflow::RunRef>(&t).ok())
            .filter(|_| m.pending() == 0)
            .map(|r| r.run_id);
        Ok(Self { m, run_id })
    }

    /// Logs metrics at `step`.
    pub fn metrics(&self, step: i64, values: &[(String, f64)]) {
        let now = crate::jobs::now_ms();
        let m = values
            .iter()
            .filter(|(_, v)| v.is_finite())
            .map(|(key, value)| mlflow::Metric { key: key.clone(), value: *value, timestamp: now, step })
            .collect();
        self.m.push(mlflow::Op::Metrics(m));
    }

    /// Uploads the top-level files of `dir` under `artifact_dir/` and registers them as a new version of
    /// model `name`.
    pub fn register(&self, dir: &Path, artifact_dir: &str, name: &str) {
        for f in top_files(dir) {
            let file_name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            self.m.push(mlflow::Op::Artifact { file: f, artifact_path: format!("{artifact_dir}/{file_name}") });
        }
        self.m.push(mlflow::Op::Register { name: name.to_owned(), artifact_dir: artifact_dir.to_owned() });
    }

    /// Ends the run (FINISHED or FAILED).
    pub fn end(&self, ok: bool) {
        let status = if ok { "FINISHED" } else { "FAILED" };
        self.m.push(mlflow::Op::End { status: status.into(), end_ms: crate::jobs::now_ms() });
        self.m.close();
    }
}

/// Sends the MLflow calls a process left unsent in `out` (`ferrotune tracking sync`), waiting up to
/// `timeout`; how many are still unsent.
pub fn sync(settings: &TrackingSettings, out: &Path, timeout: std::time::Duration) -> anyhow::Result<usize> {
    let uri = settings.mlflow.uri().ok_or_else(|| {
        anyhow::anyhow!("no MLflow tracking URI (tracking.mlflow.tracking_uri or MLFLOW_TRACKING_URI)")
    })?;
    let ep = http::Endpoint::parse(&uri).map_err(|e| anyhow::anyhow!(e))?;
    let outbox = out.join("mlflow").join("outbox.json");
    if !ferrotune_core::fsx::is_file(&outbox) {
        return Ok(0);
    }
    let warn: Warn = Arc::new(|m: String| eprintln!("warning: {m}"));
    let m = mlflow::Mlflow::start(ep, settings.mlflow.token(), out, warn);
    m.close();
    mlflow::flush(timeout);
    Ok(m.pending())
}

/// Waits up to `timeout` for the trackers' queued calls; the output dirs whose calls are still unsent.
pub fn flush(timeout: std::time::Duration) -> Vec<PathBuf> {
    mlflow::flush(timeout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_to_lists_and_flattening() {
        assert!(check_report_to(&["mlflow".into(), "tensorboard".into()]).is_ok());
        assert!(check_report_to(&["none".into()]).is_ok());
        assert!(check_report_to(&["none".into(), "mlflow".into()]).unwrap_err().contains("alone"));
        assert!(check_report_to(&["wandb".into()]).unwrap_err().contains("unknown tracker `wandb`"));
        let r = serde_json::json!({"model": "m", "training": {"learning_rate": 1e-4, "max_steps": 3}, "x": null,
            "adapter": {"target_modules": ["q_proj", "v_proj"]}, "report_to": ["mlflow"]});
        let f = flatten(&r);
        assert!(f.contains(&("training.learning_rate".into(), "0.0001".into())));
        assert!(f.contains(&("adapter.target_modules".into(), "[\"q_proj\",\"v_proj\"]".into())));
        assert!(f.contains(&("model".into(), "m".into())));
        assert!(!f.iter().any(|(k, _)| k == "x"));
        let s = TrackingSettings { report_to: vec!["tensorboard".into()], ..Default::default() };
        assert_eq!(trackers(&s, &serde_json::json!({})), vec!["tensorboard"], "the service default");
        assert!(trackers(&s, &serde_json::json!({"report_to": ["none"]})).is_empty(), "the recipe wins");
        assert_eq!(trackers(&s, &serde_json::json!({"report_to": "mlflow"})), vec!["mlflow"]);
    }

    #[test]
    fn step_metrics_use_metrics_jsonl_names() {
        let mut p = Progress { step: 3, loss: 1.25, lr: 1e-4, eval_loss: Some(2.0), ..Default::default() };
        p.metrics.insert("rewards/chosen".into(), 0.5);
        p.metrics.insert("bad".into(), f64::INFINITY);
        let m = step_metrics(&p);
        let names: Vec<&str> = m.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            names,
            ["loss", "lr", "grad_norm", "tokens_per_s", "trained_tokens", "epoch", "eval_loss", "rewards/chosen"]
        );
    }
}
