//! `JobService` over a [`JobManager`].

use std::pin::Pin;

use ferrotune_proto::v1::job_service_server::JobService;
use ferrotune_proto::v1::{
    job_event::Body, CancelJobRequest, GetJobRequest, Job, JobEvent, JobState, ListJobsRequest, ListJobsResponse,
    WatchJobRequest,
};
use tokio::sync::broadcast::error::RecvError;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::{is_terminal, JobManager};
use crate::status::StatusExt;

/// The JobService handlers.
#[derive(Clone)]
pub struct JobApi {
    /// The jobs.
    pub manager: JobManager,
}

fn not_found(id: &str) -> Status {
    Status::not_found(format!("job `{id}` not found"))
}

/// The longest job id a request may name (ids are made by the server: 36-character UUIDs).
pub(crate) const MAX_JOB_ID_BYTES: usize = 128;

/// `id` when it can be a job id: INVALID_ARGUMENT (quoting a short prefix) for an empty or oversized one.
fn job_id(id: &str) -> Result<&str, Status> {
    if id.is_empty() {
        return Err(Status::invalid_argument("id: a job id is required"));
    }
    if id.len() > MAX_JOB_ID_BYTES {
        return Err(Status::invalid_argument(format!(
            "id: {} is longer than the limit of {MAX_JOB_ID_BYTES} bytes for a job id",
            crate::paths::quote(id)
        )));
    }
    Ok(id)
}

/// Whether the stream ends after this event.
fn ends_stream(ev: &JobEvent) -> bool {
    match &ev.body {
        Some(Body::State(s)) => {
            let st = JobState::try_from(s.state).unwrap_or(JobState::Unspecified);
            is_terminal(st) || st == JobState::Interrupted
        }
        _ => false,
    }
}

type EventStream = Pin<Box<dyn Stream<Item = Result<JobEvent, Status>> + Send>>;

#[tonic::async_trait]
impl JobService for JobApi {
    async fn get_job(&self, req: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let id = req.into_inner().id;
        job_id(&id)?;
        self.manager.get(&id).status()?.map(Response::new).ok_or_else(|| not_found(&id))
    }

    async fn list_jobs(&self, req: Request<ListJobsRequest>) -> Result<Response<ListJobsResponse>, Status> {
        let r = req.into_inner();
        let mut states = vec![];
        for s in r.states {
            states.push(
                JobState::try_from(s)
                    .map_err(|_| Status::invalid_argument(format!("states: unknown job state {s}")))?,
            );
        }
        let limit = if r.limit == 0 { 100 } else { r.limit as usize };
        Ok(Response::new(ListJobsResponse { jobs: self.manager.list(&states, limit).status()? }))
    }

    async fn cancel_job(&self, req: Request<CancelJobRequest>) -> Result<Response<Job>, Status> {
        let id = req.into_inner().id;
        job_id(&id)?;
        self.manager.cancel(&id).status()?.map(Response::new).ok_or_else(|| not_found(&id))
    }

    type WatchJobStream = EventStream;

    async fn watch_job(&self, req: Request<WatchJobRequest>) -> Result<Response<Self::WatchJobStream>, Status> {
        let r = req.into_inner();
        job_id(&r.id)?;
        let job = self.manager.get(&r.id).status()?.ok_or_else(|| not_found(&r.id))?;
        let (past, rx) = self.manager.watch(&r.id, r.after_seq).status()?;
        let manager = self.manager.clone();
        let (tx, out) = tokio::sync::mpsc::channel::<Result<JobEvent, Status>>(64);
        tokio::spawn(async move {
            let mut last = r.after_seq;
            for mut ev in past {
                last = ev.seq;
                ev.replayed = true;
                let end = ends_stream(&ev);
                if tx.send(Ok(ev)).await.is_err() || end {
                    return;
                }
            }
            // Not live here: the replay is all there is (finished, or interrupted and not resumed).
            let Some(mut rx) = rx else { return };
            if is_terminal(job.state()) && last > r.after_seq {
                return;
            }
            loop {
                match rx.recv().await {
                    Ok(ev) if ev.seq <= last => {}
                    Ok(ev) => {
                        last = ev.seq;
                        let end = ends_stream(&ev);
                        if tx.send(Ok(ev)).await.is_err() || end {
                            return;
                        }
                    }
                    Err(RecvError::Lagged(_)) => {
                        // Too slow a reader: catch up from the store.
                        let Ok((missed, _)) = manager.watch(&r.id, last) else { return };
                        for ev in missed {
                            last = ev.seq;
                            let end = ends_stream(&ev);
                            if tx.send(Ok(ev)).await.is_err() || end {
                                return;
                            }
                        }
                    }
                    Err(RecvError::Closed) => return,
                }
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(out))))
    }
}
