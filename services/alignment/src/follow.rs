//! DPO and PPO from an alignment service that runs alone: they train on the policy's job thread, so the
//! alignment service starts them on the policy server (whose AlignmentService runs them as policy jobs) and
//! follows each with a job of its own that mirrors the policy job — progress, log lines, the end state and
//! its error code — so `align dpo|ppo` has one front door and `jobs watch` works where it was started.
//! Cancelling the follower cancels the policy job; when the alignment service drains, the policy job goes on
//! and the restarted alignment service follows it again.

use std::time::Duration;

use anyhow::{Context, Result};
use ferrotune_clients::ClientAuth;
use ferrotune_core::CoreError;
use ferrotune_proto::v1::job_event::Body;
use ferrotune_proto::v1::job_service_client::JobServiceClient;
use ferrotune_proto::v1::{CancelJobRequest, JobState, WatchJobRequest};
use ferrotune_runtime::jobs::{JobContext, JobOutcome, JobRunner};
use tokio_stream::StreamExt;
use tonic::transport::Endpoint;

/// How long a policy that went away is waited for.
const PATIENCE: Duration = Duration::from_secs(120);

/// Follows jobs of the policy server (`spec.remote`: its job id there).
pub struct FollowRunner {
    /// The policy server.
    pub policy: String,
    /// Bearer token.
    pub token: Option<String>,
}

impl JobRunner for FollowRunner {
    fn run(&self, ctx: &JobContext) -> Result<JobOutcome> {
        let remote = ctx.spec["remote"].as_str().context("job spec: remote")?.to_owned();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("client runtime")?;
        rt.block_on(self.follow(ctx, &remote))
    }
}

impl FollowRunner {
    async fn follow(&self, ctx: &JobContext, remote: &str) -> Result<JobOutcome> {
        let channel = Endpoint::from_shared(self.policy.clone())
            .with_context(|| format!("endpoints.policy `{}`", self.policy))?
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        let mut jobs = JobServiceClient::with_interceptor(channel, ClientAuth::new(self.token.as_deref())?);
        ctx.log(format!("following policy job {remote} on {}", self.policy));
        let mut after = 0;
        let mut lost_since: Option<tokio::time::Instant> = None;
        let mut cancelled = false;
        loop {
            let stream = jobs.watch_job(WatchJobRequest { id: remote.to_owned(), after_seq: after }).await;
            let mut stream = match stream {
                Ok(s) => s.into_inner(),
                Err(s) if s.code() == tonic::Code::Unavailable => {
                    let since = *lost_since.get_or_insert_with(tokio::time::Instant::now);
                    anyhow::ensure!(
                        since.elapsed() < PATIENCE,
                        CoreError::Unavailable(format!(
                            "the policy server {} is unreachable: {}",
                            self.policy,
                            s.message()
                        ))
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
                Err(s) => anyhow::bail!(CoreError::NotFound(format!("policy job {remote}: {}", s.message()))),
            };
            lost_since = None;
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            loop {
                tokio::select! {
                    ev = stream.next() => {
                        let Some(ev) = ev else { break };
                        let Ok(ev) = ev else { break };
                        after = after.max(ev.seq);
                        match ev.body {
                            Some(Body::Progress(p)) => ctx.progress(p),
                            Some(Body::Log(l)) => ctx.log(l),
                            Some(Body::State(s)) => {
                                let job = s.job.unwrap_or_default();
                                match JobState::try_from(s.state).unwrap_or(JobState::Unspecified) {
                                    JobState::Succeeded => return Ok(JobOutcome::Finished(job.artifacts)),
                                    JobState::Cancelled | JobState::Interrupted => return Ok(JobOutcome::Stopped),
                                    JobState::Failed => {
                                        let status = tonic::Status::new(tonic::Code::from(job.error_code), job.error);
                                        return Err(anyhow::Error::new(status).context(format!("policy job {remote}")));
                                    }
                                    _ => {}
                                }
                            }
                            None => {}
                        }
                    }
                    _ = tick.tick() => {
                        if ctx.is_cancelled() && !cancelled {
                            // Cancelled here: the policy job checkpoints and ends cancelled (its end state
                            // ends this one).
                            cancelled = true;
                            let _ = jobs.cancel_job(CancelJobRequest { id: remote.to_owned() }).await;
                        } else if ctx.should_stop() && !ctx.is_cancelled() {
                            // This service drains: the policy job goes on; a restart follows it again.
                            return Ok(JobOutcome::Stopped);
                        }
                    }
                }
            }
            // The stream broke (the policy went away): watch again from where it stopped.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}
