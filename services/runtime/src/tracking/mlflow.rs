//! MLflow through its REST API (2.0): the job's run created in its experiment (made when missing) with tags
//! and the resolved recipe as params, every step's metrics in `log-batch` calls, artifacts uploaded through
//! the tracking server's artifact proxy (`mlflow-artifacts:` URIs) or copied where the artifact store is a
//! local directory, the run's end status, and on request a registered-model version of the trained output.
//!
//! Nothing here blocks or fails the job: calls are queued to a sender thread of the job's own. When the
//! server cannot be reached (or answers 5xx / 429) the call stays at the head of the queue and is retried
//! with backoff, a warning says so once, and the queue is kept in `OUTPUT_DIR/mlflow/outbox.json` while it
//! waits, so that a process that ends first (the CLI) leaves it for the next run on that directory (a
//! resume) or for `ferrotune tracking sync OUTPUT_DIR`. A 4xx answer drops that call with a warning.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::http::{self, Body, Endpoint};

/// MLflow's limits per `log-batch` call.
const MAX_METRICS: usize = 1000;
const MAX_PARAMS: usize = 100;
/// Longest param value the tracking server keeps (MLflow ≥ 2.x).
const MAX_PARAM_VALUE: usize = 6000;

/// One metric point.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Metric {
    /// Name (as in `metrics.jsonl`).
    pub key: String,
    /// Value (finite).
    pub value: f64,
    /// Unix milliseconds.
    pub timestamp: i64,
    /// Optimizer step.
    pub step: i64,
}

/// A queued call.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Op {
    /// Create (or, resuming, reopen) the run.
    Start {
        /// Experiment name.
        experiment: String,
        /// Run name.
        run_name: String,
        /// Tags.
        tags: Vec<(String, String)>,
        /// Params (the flattened recipe).
        params: Vec<(String, String)>,
        /// Continue the run recorded in the output dir.
        resume: bool,
        /// Unix ms.
        start_ms: i64,
    },
    /// Metric points.
    Metrics(Vec<Metric>),
    /// Upload a file as `artifact_path`.
    Artifact {
        /// Local file.
        file: PathBuf,
        /// Path under the run's artifact root.
        artifact_path: String,
    },
    /// Register the artifact directory `artifact_dir` as a new version of model `name`.
    Register {
        /// Registered model name.
        name: String,
        /// Artifact sub-directory of the run.
        artifact_dir: String,
    },
    /// End the run.
    End {
        /// FINISHED, FAILED or KILLED.
        status: String,
        /// Unix ms.
        end_ms: i64,
    },
}

/// The run this output dir reports to (`OUTPUT_DIR/mlflow/run.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRef {
    /// Run id.
    pub run_id: String,
    /// Experiment id.
    pub experiment_id: String,
    /// The run's artifact root.
    pub artifact_uri: String,
}

enum Failure {
    /// Unreachable or 5xx/429: keep the call, retry later.
    Retry(String),
    /// Refused (4xx): drop the call.
    Drop(String),
}

struct Queue {
    ops: VecDeque<Op>,
    closed: bool,
    down: bool,
}

/// State shared between the job's side and its sender thread.
pub(crate) struct Shared {
    q: Mutex<Queue>,
    cv: Condvar,
    dir: PathBuf,
}

impl Shared {
    fn outbox(&self) -> PathBuf {
        self.dir.join("outbox.json")
    }

    /// Keeps the queue on disk while the server is down (or removes the file once it is empty).
    fn persist(&self, q: &Queue) {
        let path = self.outbox();
        if q.ops.is_empty() {
            let _ = ferrotune_core::fsx::remove_file(&path);
            return;
        }
        let ops: Vec<&Op> = q.ops.iter().collect();
        let text = serde_json::to_string(&ops).expect("ops serialize");
        let _ = ferrotune_core::fsx::create_dir_all(&self.dir);
        if let Err(e) = ferrotune_core::weights::write_atomically(&path, text.as_bytes()) {
            tracing::warn!("mlflow: could not keep the unsent calls in {}: {e}", path.display());
        }
    }
}

/// How long [`flush`] waits on a server that is down.
const DOWN_GRACE: Duration = Duration::from_secs(3);

/// Every live sender, for [`flush`].
static LIVE: Mutex<Vec<Weak<Shared>>> = Mutex::new(vec![]);

/// Waits up to `timeout` for every sender's queue to empty; returns the output dirs whose calls are still
/// unsent (kept in their outbox).
pub fn flush(timeout: Duration) -> Vec<PathBuf> {
    let deadline = Instant::now() + timeout;
    let live: Vec<Arc<Shared>> = LIVE.lock().expect("lock").iter().filter_map(Weak::upgrade).collect();
    let mut left = vec![];
    let started = Instant::now();
    for s in live {
        let mut q = s.q.lock().expect("lock");
        // A server already found down gets a short grace, not the whole timeout.
        while !q.ops.is_empty() && Instant::now() < deadline && !(q.down && started.elapsed() > DOWN_GRACE) {
            q = s.cv.wait_timeout(q, Duration::from_millis(50)).expect("lock").0;
        }
        if !q.ops.is_empty() {
            s.persist(&q);
            left.push(s.dir.parent().unwrap_or(&s.dir).to_path_buf());
        }
    }
    left
}

/// The job's MLflow reporter.
pub struct Mlflow {
    shared: Arc<Shared>,
}

impl Mlflow {
    /// Starts the sender thread for output dir `out`, taking over calls an earlier process left unsent.
    pub fn start(ep: Endpoint, token: Option<String>, out: &Path, warn: super::Warn) -> Self {
        let dir = out.join("mlflow");
        let mut ops = VecDeque::new();
        if let Ok(text) = ferrotune_core::fsx::read_to_string(dir.join("outbox.json")) {
            match serde_json::from_str::<Vec<Op>>(&text) {
                Ok(left) => ops.extend(left),
                Err(e) => warn(format!("mlflow: ignoring an unreadable outbox.json ({e})")),
            }
        }
        let shared =
            Arc::new(Shared { q: Mutex::new(Queue { ops, closed: false, down: false }), cv: Condvar::new(), dir });
        LIVE.lock().expect("lock").retain(|w| w.strong_count() > 0);
        LIVE.lock().expect("lock").push(Arc::downgrade(&shared));
        let s = shared.clone();
        // Calls left by an earlier process after its run was made go to that run.
        let run: Option<RunRef> = ferrotune_core::fsx::read_to_string(shared.dir.join("run.json"))
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let spawned = std::thread::Builder::new().name("ferrotune-mlflow".into()).spawn(move || {
            Sender { ep, token, shared: s, warn, run, failed_start: false }.run();
        });
        if let Err(e) = spawned {
            tracing::warn!("mlflow: could not start its sender thread: {e}");
        }
        Self { shared }
    }

    /// Queues a call.
    pub fn push(&self, op: Op) {
        let mut q = self.shared.q.lock().expect("lock");
        q.ops.push_back(op);
        if q.down {
            self.shared.persist(&q);
        }
        self.shared.cv.notify_all();
    }

    /// Calls waiting to be sent.
    pub fn pending(&self) -> usize {
        self.shared.q.lock().expect("lock").ops.len()
    }

    /// No more calls: the sender ends once the queue is sent.
    pub fn close(&self) {
        self.shared.q.lock().expect("lock").closed = true;
        self.shared.cv.notify_all();
    }
}

struct Sender {
    ep: Endpoint,
    token: Option<String>,
    shared: Arc<Shared>,
    warn: super::Warn,
    run: Option<RunRef>,
    failed_start: bool,
}

impl Sender {
    fn run(mut self) {
        let mut backoff = Duration::from_millis(500);
        loop {
            // The head of the queue (consecutive metric batches merged up to MLflow's limit).
            let (op, n) = {
                let mut q = self.shared.q.lock().expect("lock");
                while q.ops.is_empty() && !q.closed {
                    q = self.shared.cv.wait(q).expect("lock");
                }
                if q.ops.is_empty() {
                    return;
                }
                merged_head(&q.ops)
            };
            match self.apply(&op) {
                Ok(()) | Err(Failure::Drop(_)) => {
                    let mut q = self.shared.q.lock().expect("lock");
                    q.ops.drain(..n);
                    if q.down {
                        q.down = false;
                        (self.warn)(format!("mlflow: {} reachable again; sending the buffered calls", self.ep));
                    }
                    if q.ops.is_empty() {
                        self.shared.persist(&q);
                    }
                    self.shared.cv.notify_all();
                    backoff = Duration::from_millis(500);
                }
                Err(Failure::Retry(e)) => {
                    let mut q = self.shared.q.lock().expect("lock");
                    if !q.down {
                        q.down = true;
                        (self.warn)(format!(
                            "mlflow: {} unreachable ({e}); the job goes on, its metrics are buffered and sent when it is back",
                            self.ep
                        ));
                    }
                    self.shared.persist(&q);
                    let _ = self.shared.cv.wait_timeout(q, backoff).expect("lock");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    fn call(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value, Failure> {
        let bytes = body.map(|b| b.to_string().into_bytes());
        let b = match &bytes {
            Some(b) => Body::Json(b),
            None => Body::Empty,
        };
        self.send(method, path, b)
    }

    fn send(&self, method: &str, path: &str, body: Body) -> Result<Value, Failure> {
        let r = http::request(&self.ep, method, path, self.token.as_deref(), body)
            .map_err(|e| Failure::Retry(e.to_string()))?;
        let v = r.json();
        match r.status {
            200..=299 => Ok(v),
            429 | 500..=599 => Err(Failure::Retry(format!("HTTP {}", r.status))),
            s => {
                let msg =
                    v["message"].as_str().map(str::to_owned).unwrap_or_else(|| String::from_utf8_lossy(&r.body).into());
                Err(Failure::Drop(format!("HTTP {s} {}: {msg}", v["error_code"].as_str().unwrap_or(""))))
            }
        }
    }

    fn apply(&mut self, op: &Op) -> Result<(), Failure> {
        let r = self.apply_inner(op);
        if let Err(Failure::Drop(e)) = &r {
            (self.warn)(format!("mlflow: {} refused ({e}); skipped", op_name(op)));
        }
        r
    }

    fn apply_inner(&mut self, op: &Op) -> Result<(), Failure> {
        if let Op::Start { experiment, run_name, tags, params, resume, start_ms } = op {
            let r = self.start(experiment, run_name, tags, params, *resume, *start_ms);
            if let Err(Failure::Drop(_)) = &r {
                self.failed_start = true;
            }
            return r;
        }
        let Some(run) = self.run.clone() else {
            if !self.failed_start {
                return Err(Failure::Drop("no run (its creation was refused)".into()));
            }
            return Ok(());
        };
        match op {
            Op::Start { .. } => unreachable!(),
            Op::Metrics(m) => {
                self.call(
                    "POST",
                    "/api/2.0/mlflow/runs/log-batch",
                    Some(&json!({"run_id": run.run_id, "metrics": m})),
                )?;
            }
            Op::Artifact { file, artifact_path } => self.upload(&run, file, artifact_path)?,
            Op::Register { name, artifact_dir } => {
                match self.call("POST", "/api/2.0/mlflow/registered-models/create", Some(&json!({"name": name}))) {
                    Ok(_) => {}
                    Err(Failure::Drop(e)) if e.contains("RESOURCE_ALREADY_EXISTS") => {}
                    Err(e) => return Err(e),
                }
                let source = format!("{}/{}", run.artifact_uri.trim_end_matches('/'), artifact_dir);
                self.call(
                    "POST",
                    "/api/2.0/mlflow/model-versions/create",
                    Some(&json!({"name": name, "source": source, "run_id": run.run_id})),
                )?;
            }
            Op::End { status, end_ms } => {
                self.call(
                    "POST",
                    "/api/2.0/mlflow/runs/update",
                    Some(&json!({"run_id": run.run_id, "status": status, "end_time": end_ms})),
                )?;
            }
        }
        Ok(())
    }

    fn experiment_id(&self, name: &str) -> Result<String, Failure> {
        let get = format!("/api/2.0/mlflow/experiments/get-by-name?experiment_name={}", http::query_escape(name));
        match self.call("GET", &get, None) {
            Ok(v) => return Ok(v["experiment"]["experiment_id"].as_str().unwrap_or_default().to_owned()),
            Err(Failure::Drop(e)) if e.contains("RESOURCE_DOES_NOT_EXIST") => {}
            Err(e) => return Err(e),
        }
        match self.call("POST", "/api/2.0/mlflow/experiments/create", Some(&json!({"name": name}))) {
            Ok(v) => Ok(v["experiment_id"].as_str().unwrap_or_default().to_owned()),
            // Made meanwhile by another job.
            Err(Failure::Drop(e)) if e.contains("RESOURCE_ALREADY_EXISTS") => self
                .call("GET", &get, None)
                .map(|v| v["experiment"]["experiment_id"].as_str().unwrap_or_default().to_owned()),
            Err(e) => Err(e),
        }
    }

    fn start(
        &mut self,
        experiment: &str,
        run_name: &str,
        tags: &[(String, String)],
        params: &[(String, String)],
        resume: bool,
        start_ms: i64,
    ) -> Result<(), Failure> {
        let file = self.shared.dir.join("run.json");
        let earlier: Option<RunRef> = if resume {
            ferrotune_core::fsx::read_to_string(&file).ok().and_then(|t| serde_json::from_str(&t).ok())
        } else {
            None
        };
        let run = match earlier {
            Some(run) => {
                self.call(
                    "POST",
                    "/api/2.0/mlflow/runs/update",
                    Some(&json!({"run_id": run.run_id, "status": "RUNNING"})),
                )?;
                run
            }
            None => {
                let experiment_id = self.experiment_id(experiment)?;
                let kv: Vec<Value> = tags.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
                let v = self.call(
                    "POST",
                    "/api/2.0/mlflow/runs/create",
                    Some(&json!({"experiment_id": experiment_id, "run_name": run_name, "start_time": start_ms, "tags": kv})),
                )?;
                let info = &v["run"]["info"];
                let run = RunRef {
                    run_id: info["run_id"].as_str().unwrap_or_default().to_owned(),
                    experiment_id,
                    artifact_uri: info["artifact_uri"].as_str().unwrap_or_default().to_owned(),
                };
                let _ = ferrotune_core::fsx::create_dir_all(&self.shared.dir);
                let _ = ferrotune_core::weights::write_atomically(
                    &file,
                    serde_json::to_string(&run).expect("json").as_bytes(),
                );
                run
            }
        };
        self.run = Some(run.clone());
        for chunk in params.chunks(MAX_PARAMS) {
            let ps: Vec<Value> = chunk.iter().map(|(k, v)| json!({"key": k, "value": v})).collect();
            match self.call(
                "POST",
                "/api/2.0/mlflow/runs/log-batch",
                Some(&json!({"run_id": run.run_id, "params": ps})),
            ) {
                // A resumed run whose recipe changed: MLflow keeps the first value.
                Err(Failure::Drop(e)) => (self.warn)(format!("mlflow: params not logged ({e})")),
                r => r.map(|_| ())?,
            }
        }
        Ok(())
    }

    fn upload(&self, run: &RunRef, file: &Path, artifact_path: &str) -> Result<(), Failure> {
        let uri = run.artifact_uri.as_str();
        if let Some(rest) = uri.strip_prefix("mlflow-artifacts:") {
            // mlflow-artifacts:/<exp>/<run>/artifacts, or with an authority: mlflow-artifacts://host:port/<…>.
            let rest = match rest.strip_prefix("//") {
                Some(r) => r.find('/').map(|i| &r[i..]).unwrap_or(""),
                None => rest,
            };
            let path = format!(
                "/api/2.0/mlflow-artifacts/artifacts/{}/{}",
                http::path_escape(rest.trim_matches('/')),
                http::path_escape(artifact_path)
            );
            return self.send("PUT", &path, Body::File(file)).map(|_| ());
        }
        let local = uri.strip_prefix("file://").unwrap_or(uri);
        if local.starts_with('/') {
            let to = Path::new(local).join(artifact_path);
            if let Some(parent) = to.parent() {
                ferrotune_core::fsx::create_dir_all(parent)
                    .map_err(|e| Failure::Drop(format!("{}: {e}", parent.display())))?;
            }
            return ferrotune_core::fsx::copy(file, &to)
                .map(|_| ())
                .map_err(|e| Failure::Drop(format!("{}: {e}", to.display())));
        }
        Err(Failure::Drop(format!(
            "artifact store {uri} is not supported (the server's artifact proxy or a local directory is)"
        )))
    }
}

fn op_name(op: &Op) -> String {
    match op {
        Op::Start { .. } => "creating the run".into(),
        Op::Metrics(m) => format!("{} metric points", m.len()),
        Op::Artifact { artifact_path, .. } => format!("artifact {artifact_path}"),
        Op::Register { name, .. } => format!("registering model {name}"),
        Op::End { .. } => "ending the run".into(),
    }
}

/// The head of the queue, with following metric batches merged into it up to MLflow's limit; and how many
/// queued calls it covers.
fn merged_head(ops: &VecDeque<Op>) -> (Op, usize) {
    let Some(Op::Metrics(first)) = ops.front() else {
        return (ops.front().expect("not empty").clone(), 1);
    };
    let mut all = first.clone();
    let mut n = 1;
    for op in ops.iter().skip(1) {
        match op {
            Op::Metrics(m) if all.len() + m.len() <= MAX_METRICS => {
                all.extend(m.iter().cloned());
                n += 1;
            }
            _ => break,
        }
    }
    (Op::Metrics(all), n)
}

/// A param value as MLflow keeps it (cut to its limit).
pub fn param_value(v: &str) -> String {
    if v.len() <= MAX_PARAM_VALUE {
        return v.to_owned();
    }
    let mut end = MAX_PARAM_VALUE - 3;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &v[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(step: i64, n: usize) -> Op {
        Op::Metrics((0..n).map(|i| Metric { key: format!("k{i}"), value: 1.0, timestamp: 0, step }).collect())
    }

    #[test]
    fn metric_batches_merge_up_to_the_limit() {
        let ops: VecDeque<Op> =
            vec![m(1, 400), m(2, 400), m(3, 400), Op::End { status: "FINISHED".into(), end_ms: 0 }].into();
        let (op, n) = merged_head(&ops);
        assert_eq!(n, 2, "a third batch would pass {MAX_METRICS} points");
        assert!(matches!(op, Op::Metrics(v) if v.len() == 800));
        let ops: VecDeque<Op> = vec![Op::End { status: "FINISHED".into(), end_ms: 0 }, m(1, 1)].into();
        assert_eq!(merged_head(&ops).1, 1);
        assert_eq!(param_value(&"é".repeat(4000)).len(), MAX_PARAM_VALUE - 1);
    }
}
