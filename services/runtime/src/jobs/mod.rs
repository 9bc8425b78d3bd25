//! Jobs: long work (training, alignment) with an id, a state, streamed events and checkpoints. The store
//! (SQLite) keeps every job and every event, so `WatchJob` can replay a job's history after a restart and a
//! job that was running when its service died is resumed from its last checkpoint when it starts again.

mod manager;
mod service;
mod store;

pub use ferrotune_proto::v1::{Artifact, Job, JobEvent, JobState, Progress};
pub use manager::{JobContext, JobManager, JobOutcome, JobRunner};
pub use service::JobApi;
pub use store::Store;

/// Whether a state is final.
pub fn is_terminal(s: JobState) -> bool {
    matches!(s, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use ferrotune_proto::v1::job_event::Body;

    use super::*;

    /// Counts steps to `spec.steps`, one per 20 ms, "checkpointing" the step reached in a shared map (like
    /// a training run's checkpoint dir), resuming from it.
    struct Counter {
        checkpoints: Arc<Mutex<HashMap<String, u64>>>,
        runs: Arc<AtomicUsize>,
    }

    impl JobRunner for Counter {
        fn run(&self, ctx: &JobContext) -> anyhow::Result<JobOutcome> {
            self.runs.fetch_add(1, Ordering::SeqCst);
            let total = ctx.spec["steps"].as_u64().unwrap();
            if ctx.spec["fail"].as_bool() == Some(true) {
                anyhow::bail!("data.path: x.jsonl:3: missing field `messages`");
            }
            let start =
                if ctx.resume { self.checkpoints.lock().unwrap().get(&ctx.id).copied().unwrap_or(0) } else { 0 };
            for step in start + 1..=total {
                if ctx.should_stop() {
                    return Ok(JobOutcome::Stopped);
                }
                std::thread::sleep(Duration::from_millis(20));
                self.checkpoints.lock().unwrap().insert(ctx.id.clone(), step);
                ctx.progress(Progress { step, total, loss: 1.0 / step as f64, ..Default::default() });
            }
            Ok(JobOutcome::Finished(vec![Artifact {
                kind: "adapter".into(),
                path: ctx.output_dir.display().to_string(),
            }]))
        }
    }

    fn manager(db: &std::path::Path, ck: &Arc<Mutex<HashMap<String, u64>>>, runs: &Arc<AtomicUsize>) -> JobManager {
        let m = JobManager::start(Store::open(db).unwrap()).unwrap();
        m.register("count", Arc::new(Counter { checkpoints: ck.clone(), runs: runs.clone() }), 1);
        m
    }

    fn wait_for(m: &JobManager, id: &str, pred: impl Fn(&Job) -> bool) -> Job {
        for _ in 0..500 {
            let j = m.get(id).unwrap().unwrap();
            if pred(&j) {
                return j;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("job {id} never reached the expected state: {:?}", m.get(id).unwrap());
    }

    fn states(events: &[JobEvent]) -> Vec<JobState> {
        events
            .iter()
            .filter_map(|e| if let Some(Body::State(s)) = &e.body { JobState::try_from(s.state).ok() } else { None })
            .collect()
    }

    #[test]
    fn events_are_ordered_and_complete() {
        let d = tempfile::tempdir().unwrap();
        let (ck, runs) = (Arc::default(), Arc::new(AtomicUsize::new(0)));
        let m = manager(&d.path().join("j.sqlite"), &ck, &runs);
        let job = m.submit("count", serde_json::json!({"steps": 5}), d.path().join("out")).unwrap();
        let done = wait_for(&m, &job.id, |j| is_terminal(j.state()));
        assert_eq!(done.state(), JobState::Succeeded);
        assert_eq!(done.artifacts[0].kind, "adapter");
        assert_eq!(done.progress.unwrap().step, 5);
        let (events, _) = m.watch(&job.id, 0).unwrap();
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>(), "seq is 1, 2, 3, … without gaps");
        assert_eq!(states(&events), vec![JobState::Queued, JobState::Running, JobState::Succeeded]);
        let steps: Vec<u64> = events
            .iter()
            .filter_map(|e| if let Some(Body::Progress(p)) = &e.body { Some(p.step) } else { None })
            .collect();
        assert_eq!(steps, vec![1, 2, 3, 4, 5]);
        // Replay from the middle.
        let (tail, _) = m.watch(&job.id, 4).unwrap();
        assert_eq!(tail.first().unwrap().seq, 5);
    }

    #[test]
    fn failures_and_unknown_kinds_are_failed_jobs() {
        let d = tempfile::tempdir().unwrap();
        let (ck, runs) = (Arc::default(), Arc::new(AtomicUsize::new(0)));
        let m = manager(&d.path().join("j.sqlite"), &ck, &runs);
        let job = m.submit("count", serde_json::json!({"steps": 2, "fail": true}), d.path().join("o")).unwrap();
        let j = wait_for(&m, &job.id, |j| is_terminal(j.state()));
        assert_eq!(j.state(), JobState::Failed);
        assert!(j.error.contains("x.jsonl:3"), "{}", j.error);
        let job = m.submit("paint", serde_json::json!({}), d.path().join("p")).unwrap();
        let j = wait_for(&m, &job.id, |j| is_terminal(j.state()));
        assert!(j.error.contains("cannot run `paint` jobs"), "{}", j.error);
        assert!(m.get("nope").unwrap().is_none());
    }

    #[test]
    fn cancel_running_and_queued() {
        let d = tempfile::tempdir().unwrap();
        let (ck, runs) = (Arc::default(), Arc::new(AtomicUsize::new(0)));
        let m = manager(&d.path().join("j.sqlite"), &ck, &runs);
        let a = m.submit("count", serde_json::json!({"steps": 1000}), d.path().join("a")).unwrap();
        let b = m.submit("count", serde_json::json!({"steps": 3}), d.path().join("b")).unwrap();
        wait_for(&m, &a.id, |j| j.progress.as_ref().is_some_and(|p| p.step >= 2));
        // b waits behind a (one job at a time): cancelled at once.
        assert_eq!(m.cancel(&b.id).unwrap().unwrap().state(), JobState::Cancelled);
        m.cancel(&a.id).unwrap();
        let j = wait_for(&m, &a.id, |j| is_terminal(j.state()));
        assert_eq!(j.state(), JobState::Cancelled);
        assert!(j.progress.unwrap().step < 1000);
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the cancelled queued job never ran");
        // Cancelling a finished job changes nothing.
        assert_eq!(m.cancel(&a.id).unwrap().unwrap().state(), JobState::Cancelled);
    }

    #[test]
    fn interrupted_jobs_resume_after_restart() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("j.sqlite");
        let (ck, runs) = (Arc::new(Mutex::new(HashMap::new())), Arc::new(AtomicUsize::new(0)));
        let m = manager(&db, &ck, &runs);
        let job = m.submit("count", serde_json::json!({"steps": 30}), d.path().join("out")).unwrap();
        wait_for(&m, &job.id, |j| j.progress.as_ref().is_some_and(|p| p.step >= 3));
        m.shutdown(Duration::from_secs(10));
        let j = m.get(&job.id).unwrap().unwrap();
        assert_eq!(j.state(), JobState::Interrupted);
        let reached = ck.lock().unwrap()[&job.id];
        assert!(reached < 30);
        drop(m);
        // A new service on the same store picks the job up where its checkpoint left it.
        let m2 = manager(&db, &ck, &runs);
        assert_eq!(m2.resume_pending().unwrap(), 1);
        let j = wait_for(&m2, &job.id, |j| is_terminal(j.state()));
        assert_eq!((j.state(), j.resumes), (JobState::Succeeded, 1));
        let (events, _) = m2.watch(&job.id, 0).unwrap();
        let steps: Vec<u64> = events
            .iter()
            .filter_map(|e| if let Some(Body::Progress(p)) = &e.body { Some(p.step) } else { None })
            .collect();
        assert_eq!(steps, (1..=30).collect::<Vec<_>>(), "no step repeated or lost across the restart");
        assert_eq!(
            states(&events),
            vec![JobState::Queued, JobState::Running, JobState::Interrupted, JobState::Running, JobState::Succeeded]
        );
    }
}
