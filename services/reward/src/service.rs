//! The RewardService handlers and the dynamic batcher.

use std::path::PathBuf;
use std::time::Duration;

use ferrotune_proto::v1::reward_service_server::RewardService;
use ferrotune_proto::v1::{reward_model_ref, ScoreRequest, ScoreResponse, StartJobResponse, StartRecipeJobRequest};
use ferrotune_runtime::jobs::JobManager;
use ferrotune_runtime::settings::RewardSettings;
use ferrotune_runtime::worker::Worker;
use ferrotune_runtime::{invalid, ArtifactRoot};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status};

use crate::rules::rule_score;
use crate::scorer::Scorers;

/// This process as a replica: host name and process id.
fn replica() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    format!("{host}:{}", std::process::id())
}

/// Most items in one Score call.
pub const MAX_ITEMS: usize = 256;

type Key = (PathBuf, PathBuf);
type Reply = oneshot::Sender<Result<(Vec<f32>, u32), Status>>;

struct Pending {
    key: Key,
    items: Vec<(String, String)>,
    reply: Reply,
    /// When the call joined the queue.
    queued: std::time::Instant,
}

/// The reward service.
#[derive(Clone)]
pub struct Reward {
    root: ArtifactRoot,
    worker: Worker<Scorers>,
    jobs: JobManager,
    cfg: RewardSettings,
    batcher: Option<mpsc::Sender<Pending>>,
    /// `limits.max_text_bytes`: the longest prompt or response of a Score item.
    max_text_bytes: usize,
}

impl Reward {
    /// The service; with `cfg.max_batch_size > 1`, a batcher task gathers concurrent calls.
    pub fn new(
        root: ArtifactRoot,
        worker: Worker<Scorers>,
        jobs: JobManager,
        cfg: RewardSettings,
        max_text_bytes: usize,
    ) -> Self {
        let batcher = (cfg.max_batch_size > 1).then(|| {
            let (tx, rx) = mpsc::channel(1024);
            tokio::spawn(batch_loop(rx, worker.clone(), cfg.max_batch_size, Duration::from_millis(cfg.max_wait_ms)));
            tx
        });
        Self { root, worker, jobs, cfg, batcher, max_text_bytes }
    }

    fn base_dir(&self, p: &str) -> Result<PathBuf, Status> {
        let dir = self.root.model("model.learned.base.path", p)?;
        if !dir.join("config.json").is_file() {
            return Err(Status::not_found(format!(
                "model.learned.base.path: {} is not a model directory (no config.json)",
                dir.display()
            )));
        }
        Ok(dir)
    }
}

/// Gathers pending calls for up to `max_wait` or `max_items`, scores each model's items in one batch on
/// the worker, and answers every caller with its slice.
async fn batch_loop(mut rx: mpsc::Receiver<Pending>, worker: Worker<Scorers>, max_items: usize, max_wait: Duration) {
    while let Some(first) = rx.recv().await {
        let mut n = first.items.len();
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + max_wait;
        while n < max_items {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(p)) => {
                    n += p.items.len();
                    batch.push(p);
                }
                _ => break,
            }
        }
        while !batch.is_empty() {
            let key = batch[0].key.clone();
            let (same, rest): (Vec<Pending>, Vec<Pending>) = batch.into_iter().partition(|p| p.key == key);
            batch = rest;
            // Calls whose caller went away (disconnected, past its deadline) are not scored.
            let same: Vec<Pending> = same.into_iter().filter(|p| !p.reply.is_closed()).collect();
            if same.is_empty() {
                continue;
            }
            let items: Vec<(String, String)> = same.iter().flat_map(|p| p.items.iter().cloned()).collect();
            let total = items.len() as u32;
            ferrotune_runtime::metrics::SCORE_BATCH.observe(&[], total as f64);
            for p in &same {
                ferrotune_runtime::metrics::SCORE_WAIT.observe(&[], p.queued.elapsed().as_secs_f64());
            }
            let (base, adapter) = key.clone();
            let result = worker.call(move |s| s.score(&base, &adapter, &items)).await;
            let mut at = 0;
            for p in same {
                let k = p.items.len();
                let r = match &result {
                    Ok(scores) => Ok((scores[at..at + k].to_vec(), total)),
                    Err(e) => Err(Status::new(e.code(), e.message().to_owned())),
                };
                at += k;
                let _ = p.reply.send(r);
            }
        }
    }
}

#[tonic::async_trait]
impl RewardService for Reward {
    async fn start_reward_training(
        &self,
        req: Request<StartRecipeJobRequest>,
    ) -> Result<Response<StartJobResponse>, Status> {
        let r = req.into_inner();
        let job = ferrotune_training::queue_recipe_job(
            "reward",
            &r.recipe_yaml,
            &r.overrides,
            r.resume,
            &self.root,
            (&self.cfg.device, None),
            &self.jobs,
        )?;
        Ok(Response::new(StartJobResponse { job: Some(job) }))
    }

    async fn score(&self, req: Request<ScoreRequest>) -> Result<Response<ScoreResponse>, Status> {
        let r = req.into_inner();
        if r.items.is_empty() || r.items.len() > MAX_ITEMS {
            return Err(invalid("items", format!("{} items; send 1 to {MAX_ITEMS}", r.items.len())));
        }
        if let Some(i) = r.items.iter().position(|i| i.prompt.len().max(i.response.len()) > self.max_text_bytes) {
            return Err(Status::resource_exhausted(format!(
                "items[{i}]: a text is longer than limits.max_text_bytes ({})",
                self.max_text_bytes
            )));
        }
        let kind = r.model.and_then(|m| m.kind).ok_or_else(|| invalid("model", "set learned or rule"))?;
        if let reward_model_ref::Kind::Rule(rule) = &kind {
            let scores = r
                .items
                .iter()
                .enumerate()
                .map(|(i, it)| {
                    rule_score(rule, &it.response, &it.reference)
                        .map_err(|e| Status::new(e.code(), format!("items[{i}]: {}", e.message())))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let n = scores.len() as u32;
            return Ok(Response::new(ScoreResponse { scores, batch_size: n, replica: replica() }));
        }
        let items: Vec<(String, String)> = r.items.into_iter().map(|i| (i.prompt, i.response)).collect();
        match kind {
            reward_model_ref::Kind::Rule(rule) => {
                let scores =
                    items.iter().map(|(_, resp)| rule_score(&rule, resp, "")).collect::<Result<Vec<_>, _>>()?;
                let n = scores.len() as u32;
                Ok(Response::new(ScoreResponse { scores, batch_size: n, replica: replica() }))
            }
            reward_model_ref::Kind::Learned(l) => {
                let base = self.base_dir(l.base.as_ref().map(|b| b.path.as_str()).unwrap_or(""))?;
                let adapter = self.root.resolve("model.learned.adapter", &l.adapter)?;
                let (scores, batch_size) = match &self.batcher {
                    Some(tx) => {
                        let (reply, rx) = oneshot::channel();
                        tx.send(Pending { key: (base, adapter), items, reply, queued: std::time::Instant::now() })
                            .await
                            .map_err(|_| Status::unavailable("the batcher has stopped"))?;
                        rx.await.map_err(|_| Status::internal("the batcher dropped the request"))??
                    }
                    None => {
                        let n = items.len() as u32;
                        ferrotune_runtime::metrics::SCORE_BATCH.observe(&[], n as f64);
                        (self.worker.call(move |s| s.score(&base, &adapter, &items)).await?, n)
                    }
                };
                Ok(Response::new(ScoreResponse { scores, batch_size, replica: replica() }))
            }
        }
    }
}
