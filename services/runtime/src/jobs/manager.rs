//! The job manager: queues jobs, runs them one at a time on a dedicated thread (training saturates the
//! device), records every event in the store and fans it out to watchers, and on shutdown asks the
//! running job to checkpoint so that the next start resumes it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrotune_proto::v1::{job_event::Body, Artifact, Job, JobEvent, JobState, Progress, StateChange};
use tokio::sync::broadcast;

use super::store::{Store, StoredJob};
use super::{is_terminal, now_ms};
use crate::tracking::{JobInfo, JobTracker, TrackingSettings};

/// Runs jobs of one kind.
pub trait JobRunner: Send + Sync {
    /// Runs the job to its end or until `ctx.should_stop()`; blocking. With `ctx.resume`, continues from the
    /// newest checkpoint in the output directory (or starts over when there is none).
    fn run(&self, ctx: &JobContext) -> anyhow::Result<JobOutcome>;
}

/// How a run ended.
pub enum JobOutcome {
    /// Done; these are its outputs.
    Finished(Vec<Artifact>),
    /// Stopped on request after checkpointing.
    Stopped,
}

/// What a runner sees of its job.
pub struct JobContext {
    /// Job id.
    pub id: String,
    /// The spec given at submission.
    pub spec: serde_json::Value,
    /// The output directory.
    pub output_dir: PathBuf,
    /// Continue from the newest checkpoint.
    pub resume: bool,
    stop: Arc<AtomicBool>,
    inner: Arc<Inner>,
    started: Instant,
    first_step: Mutex<Option<u64>>,
    tracker: Mutex<Option<JobTracker>>,
    kind: String,
    last_step: Mutex<Instant>,
}

impl JobContext {
    /// Reports an optimizer step (the ETA is filled in from the pace of this run).
    pub fn progress(&self, mut p: Progress) {
        let first = *self.first_step.lock().expect("lock").get_or_insert(p.step.saturating_sub(1));
        let done = p.step.saturating_sub(first);
        if done > 0 && p.total >= p.step {
            p.eta_s = self.started.elapsed().as_secs_f64() / done as f64 * (p.total - p.step) as f64;
        }
        if let Some(t) = self.tracker.lock().expect("lock").as_mut() {
            t.step(&p);
        }
        let now = Instant::now();
        let took = std::mem::replace(&mut *self.last_step.lock().expect("lock"), now);
        let kind = [self.kind.as_str()];
        crate::metrics::TRAIN_STEPS.inc(&kind);
        crate::metrics::TRAIN_STEP_TIME.observe(&kind, (now - took).as_secs_f64());
        crate::metrics::TRAIN_TOKENS_PER_S.set(&kind, p.tokens_per_s);
        crate::metrics::TRAIN_LOSS.set(&kind, p.loss);
        self.inner.emit(&self.id, Body::Progress(p));
    }
    /// A log line.
    pub fn log(&self, line: impl Into<String>) {
        self.inner.emit(&self.id, Body::Log(line.into()));
    }
    /// True once the job was cancelled or the service is shutting down: checkpoint and return.
    pub fn should_stop(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }
    /// True once the job was cancelled (not merely stopped because the service drains).
    pub fn is_cancelled(&self) -> bool {
        self.inner.live.lock().expect("lock").get(&self.id).is_some_and(|l| l.cancelled)
    }
    /// The flag behind [`Self::should_stop`].
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }
}

struct Live {
    stop: Arc<AtomicBool>,
    cancelled: bool,
    resume: bool,
    seq: u64,
    tx: broadcast::Sender<JobEvent>,
}

/// A registered runner and its CPU threads.
type Registered = (Arc<dyn JobRunner>, usize);

struct Inner {
    store: Mutex<Store>,
    /// Each kind's runner and the CPU threads its jobs use (0 = all this process may use).
    runners: Mutex<HashMap<String, Registered>>,
    live: Mutex<HashMap<String, Live>>,
    queue: Mutex<Option<std::sync::mpsc::Sender<String>>>,
    worker: Mutex<Option<std::thread::JoinHandle<()>>>,
    shutting_down: AtomicBool,
    tracking: Mutex<TrackingSettings>,
}

/// Shared handle to the job manager.
#[derive(Clone)]
pub struct JobManager(Arc<Inner>);

/// Why a job failed, as the status a call would have answered (None: it did not fail).
type Failure = Option<tonic::Status>;

/// UNAVAILABLE: another replica (or this one, restarted) can take the work.
fn shutting_down() -> anyhow::Error {
    ferrotune_core::CoreError::Unavailable("the service is shutting down".into()).into()
}

fn db_err(e: rusqlite::Error) -> anyhow::Error {
    anyhow::anyhow!("job store: {e}")
}

impl Inner {
    /// Records and broadcasts an event.
    fn emit(&self, id: &str, body: Body) -> JobEvent {
        let mut live = self.live.lock().expect("lock");
        let store = self.store.lock().expect("lock");
        let seq = match live.get_mut(id) {
            Some(l) => {
                l.seq += 1;
                l.seq
            }
            None => store.last_seq(id).unwrap_or(0) + 1,
        };
        let ev = JobEvent { job_id: id.to_owned(), seq, time_ms: now_ms(), replayed: false, body: Some(body) };
        if let Err(e) = store.append(&ev) {
            tracing::error!(job = id, "job store: {e}");
        }
        if let Some(l) = live.get(id) {
            let _ = l.tx.send(ev.clone());
        }
        ev
    }

    fn set_state(&self, id: &str, state: JobState, error: Failure, artifacts: Vec<Artifact>, resumes: Option<u32>) {
        let mut job = match self.store.lock().expect("lock").get(id) {
            Ok(Some(j)) => j.job,
            _ => return,
        };
        job.state = state as i32;
        (job.error, job.error_code) = match error {
            Some(s) => (s.message().to_owned(), s.code() as i32),
            None => (String::new(), 0),
        };
        if !artifacts.is_empty() {
            job.artifacts = artifacts;
        }
        if let Some(r) = resumes {
            job.resumes = r;
        }
        job.updated_ms = now_ms();
        self.emit(id, Body::State(StateChange { state: state as i32, job: Some(job) }));
    }

    fn run_one(self: &Arc<Self>, id: String) {
        let stored = match self.store.lock().expect("lock").get(&id) {
            Ok(Some(j)) => j,
            _ => return,
        };
        let (stop, resume) = {
            let live = self.live.lock().expect("lock");
            match live.get(&id) {
                Some(l) => (l.stop.clone(), l.resume),
                None => return,
            }
        };
        if is_terminal(stored.job.state()) || stop.load(Ordering::Relaxed) && self.shutting_down.load(Ordering::Relaxed)
        {
            self.live.lock().expect("lock").remove(&id);
            return;
        }
        let resumes = stored.job.resumes + u32::from(resume);
        self.set_state(&id, JobState::Running, None, vec![], Some(resumes));
        let runner = self.runners.lock().expect("lock").get(&stored.job.kind).cloned();
        let Some((runner, threads)) = runner else {
            let msg = format!("this service cannot run `{}` jobs", stored.job.kind);
            self.set_state(&id, JobState::Failed, Some(tonic::Status::failed_precondition(msg)), vec![], None);
            self.live.lock().expect("lock").remove(&id);
            return;
        };
        let ctx = JobContext {
            id: id.clone(),
            spec: stored.spec,
            output_dir: PathBuf::from(&stored.job.output_dir),
            resume,
            stop: stop.clone(),
            inner: self.clone(),
            started: Instant::now(),
            first_step: Mutex::new(None),
            tracker: Mutex::new(None),
            kind: stored.job.kind.clone(),
            last_step: Mutex::new(Instant::now()),
        };
        if resume {
            ctx.log("resuming from the newest checkpoint");
        }
        *ctx.tracker.lock().expect("lock") = self.tracker(&ctx, &stored.job.kind);
        ferrotune_core::threads::set_for_this_thread(ferrotune_core::threads::resolve(threads));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| runner.run(&ctx)));
        let cancelled = self.live.lock().expect("lock").get(&id).is_some_and(|l| l.cancelled);
        let (state, error, artifacts) = match result {
            Ok(Ok(JobOutcome::Finished(a))) => (JobState::Succeeded, None, a),
            Ok(Ok(JobOutcome::Stopped)) if cancelled => (JobState::Cancelled, None, vec![]),
            Ok(Ok(JobOutcome::Stopped)) => (JobState::Interrupted, None, vec![]),
            Ok(Err(e)) => (JobState::Failed, Some(crate::status::to_status(&e)), vec![]),
            Err(p) => (
                JobState::Failed,
                Some(tonic::Status::internal(format!(
                    "internal error (panic): {}",
                    crate::worker::panic_message(p.as_ref())
                ))),
                vec![],
            ),
        };
        if let Some(t) = ctx.tracker.lock().expect("lock").as_mut() {
            t.finish(state, &artifacts);
        }
        self.set_state(&id, state, error, artifacts, None);
        self.live.lock().expect("lock").remove(&id);
    }

    /// The job's experiment trackers (its recipe's `report_to`, or the service default).
    fn tracker(self: &Arc<Self>, ctx: &JobContext, kind: &str) -> Option<JobTracker> {
        let settings = self.tracking.lock().expect("lock").clone();
        let (weak, id) = (Arc::downgrade(self), ctx.id.clone());
        let warn: crate::tracking::Warn = Arc::new(move |msg: String| {
            tracing::warn!(job = %id, "{msg}");
            if let Some(inner) = weak.upgrade() {
                if inner.live.lock().expect("lock").contains_key(&id) {
                    inner.emit(&id, Body::Log(msg));
                }
            }
        });
        let resume = ctx.resume || ctx.spec["resume"].as_bool().unwrap_or(false);
        let job = JobInfo { id: &ctx.id, kind, output_dir: &ctx.output_dir, spec: &ctx.spec, resume };
        JobTracker::start(&settings, &job, warn)
    }
}

impl JobManager {
    /// A manager over `store`; register runners, then [`Self::resume_pending`].
    pub fn start(store: Store) -> anyhow::Result<Self> {
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        let inner = Arc::new(Inner {
            store: Mutex::new(store),
            runners: Mutex::new(HashMap::new()),
            live: Mutex::new(HashMap::new()),
            queue: Mutex::new(Some(tx)),
            worker: Mutex::new(None),
            shutting_down: AtomicBool::new(false),
            tracking: Mutex::new(TrackingSettings::default()),
        });
        let weak = Arc::downgrade(&inner);
        let handle = std::thread::Builder::new()
            .name("ferrotune-jobs".into())
            .spawn(move || {
                while let Ok(id) = rx.recv() {
                    let Some(inner) = weak.upgrade() else { break };
                    if inner.shutting_down.load(Ordering::Relaxed) {
                        break;
                    }
                    inner.run_one(id);
                }
            })
            .map_err(|e| anyhow::anyhow!("starting the job thread: {e}"))?;
        *inner.worker.lock().expect("lock") = Some(handle);
        Ok(Self(inner))
    }

    /// `ferrotune_jobs{kind, state}`: the store's jobs by kind and state (for /metrics).
    pub fn metric_families(&self) -> Vec<crate::metrics::registry::Collected> {
        let counts = self.0.store.lock().expect("lock").counts().unwrap_or_default();
        let series = counts
            .into_iter()
            .map(|(kind, state, n)| {
                let state = state.as_str_name().trim_start_matches("JOB_STATE_").to_ascii_lowercase();
                (vec![("kind", kind), ("state", state)], n as f64)
            })
            .collect();
        vec![crate::metrics::registry::Collected {
            name: "ferrotune_jobs",
            help: "Jobs in this service's store by kind and state.",
            kind: "gauge",
            series,
        }]
    }

    /// The trackers of jobs whose recipe names none, and where MLflow is.
    pub fn set_tracking(&self, settings: TrackingSettings) {
        *self.0.tracking.lock().expect("lock") = settings;
    }

    /// Runs jobs of `kind` with `runner` on `threads` CPU threads (0 = all this process may use).
    pub fn register(&self, kind: &str, runner: Arc<dyn JobRunner>, threads: usize) {
        self.0.runners.lock().expect("lock").insert(kind.to_owned(), (runner, threads));
    }

    /// Queues again the jobs that were queued, running or interrupted when the service last stopped (and
    /// that a registered runner can run), oldest first; they resume from their newest checkpoint.
    pub fn resume_pending(&self) -> anyhow::Result<usize> {
        let pending = self
            .0
            .store
            .lock()
            .expect("lock")
            .list(&[JobState::Queued, JobState::Running, JobState::Interrupted], usize::MAX)
            .map_err(db_err)?;
        let mut n = 0;
        for j in pending.into_iter().rev() {
            if self.runs(&j.job.kind) && !self.0.live.lock().expect("lock").contains_key(&j.job.id) {
                tracing::info!(job = %j.job.id, "resuming job after restart");
                self.enqueue(&j.job.id, true)?;
                n += 1;
            }
        }
        Ok(n)
    }

    fn enqueue(&self, id: &str, resume: bool) -> anyhow::Result<()> {
        let seq = self.0.store.lock().expect("lock").last_seq(id).map_err(db_err)?;
        let (tx, _) = broadcast::channel(1024);
        self.0
            .live
            .lock()
            .expect("lock")
            .insert(id.to_owned(), Live { stop: Arc::new(AtomicBool::new(false)), cancelled: false, resume, seq, tx });
        let q = self.0.queue.lock().expect("lock");
        q.as_ref().context_send()?.send(id.to_owned()).map_err(|_| shutting_down())?;
        Ok(())
    }

    /// Whether this service runs jobs of `kind`.
    pub fn runs(&self, kind: &str) -> bool {
        self.0.runners.lock().expect("lock").contains_key(kind)
    }

    /// Queues a new job and returns it (QUEUED).
    pub fn submit(&self, kind: &str, spec: serde_json::Value, output_dir: PathBuf) -> anyhow::Result<Job> {
        if self.0.shutting_down.load(Ordering::Relaxed) {
            return Err(shutting_down());
        }
        let now = now_ms();
        let id = format!(
            "{kind}-{now:x}-{:04x}",
            (std::process::id() as u64 ^ now as u64 ^ (COUNTER.fetch_add(1, Ordering::Relaxed) * 0x9E37)) & 0xffff
        );
        let job = Job {
            id: id.clone(),
            kind: kind.to_owned(),
            state: JobState::Queued as i32,
            created_ms: now,
            updated_ms: now,
            output_dir: output_dir.display().to_string(),
            ..Default::default()
        };
        self.0.store.lock().expect("lock").insert(&job, &spec).map_err(db_err)?;
        self.0.emit(&id, Body::State(StateChange { state: JobState::Queued as i32, job: Some(job.clone()) }));
        self.enqueue(&id, false)?;
        Ok(job)
    }

    /// One job.
    pub fn get(&self, id: &str) -> anyhow::Result<Option<Job>> {
        Ok(self.0.store.lock().expect("lock").get(id).map_err(db_err)?.map(|j: StoredJob| j.job))
    }

    /// Jobs, newest first.
    pub fn list(&self, states: &[JobState], limit: usize) -> anyhow::Result<Vec<Job>> {
        Ok(self.0.store.lock().expect("lock").list(states, limit).map_err(db_err)?.into_iter().map(|j| j.job).collect())
    }

    /// Asks a job to stop; returns it as it stands.
    pub fn cancel(&self, id: &str) -> anyhow::Result<Option<Job>> {
        let Some(job) = self.get(id)? else { return Ok(None) };
        if is_terminal(job.state()) {
            return Ok(Some(job));
        }
        let live = {
            let mut live = self.0.live.lock().expect("lock");
            match live.get_mut(id) {
                Some(l) => {
                    l.cancelled = true;
                    l.stop.store(true, Ordering::Relaxed);
                    true
                }
                None => false,
            }
        };
        // Not started yet (queued, or interrupted and not resumed here): cancelled right away.
        if !live || job.state() == JobState::Queued {
            self.0.set_state(id, JobState::Cancelled, None, vec![], None);
        }
        self.get(id)
    }

    /// Events after `after_seq` (stored), and a receiver of later ones when the job is live here. The
    /// receiver is taken before the read, so nothing falls between them (duplicates are dropped by seq).
    pub fn watch(
        &self,
        id: &str,
        after_seq: u64,
    ) -> anyhow::Result<(Vec<JobEvent>, Option<broadcast::Receiver<JobEvent>>)> {
        let rx = self.0.live.lock().expect("lock").get(id).map(|l| l.tx.subscribe());
        let past = self.0.store.lock().expect("lock").events_after(id, after_seq).map_err(db_err)?;
        Ok((past, rx))
    }

    /// Stops accepting jobs, asks the running one to checkpoint and waits up to `grace` for it. Jobs not
    /// finished stay QUEUED / INTERRUPTED in the store and resume on the next start.
    pub fn shutdown(&self, grace: Duration) {
        self.0.shutting_down.store(true, Ordering::Relaxed);
        for l in self.0.live.lock().expect("lock").values() {
            l.stop.store(true, Ordering::Relaxed);
        }
        self.0.queue.lock().expect("lock").take();
        let handle = self.0.worker.lock().expect("lock").take();
        if let Some(h) = handle {
            let deadline = Instant::now() + grace;
            while !h.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                tracing::warn!(
                    "a job did not stop within {grace:?}; it resumes from its last checkpoint on the next start"
                );
            }
        }
    }
}

static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

trait SendContext<T> {
    fn context_send(self) -> anyhow::Result<T>;
}

impl<T> SendContext<T> for Option<T> {
    fn context_send(self) -> anyhow::Result<T> {
        self.ok_or_else(shutting_down)
    }
}
