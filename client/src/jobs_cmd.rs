//! `ferrotune jobs list | get | watch | cancel` against every service that runs jobs (the policy endpoint and
//! the reward endpoints: a job lives in the service that runs it), and the job follower
//! that `train sft` uses: a progress bar with loss, lr and tokens/s (or JSON lines with `--json`) from
//! WatchJob events.

use anyhow::Result;
use ferrotune_proto::v1::job_service_client::JobServiceClient;
use ferrotune_proto::v1::{
    job_event::Body, CancelJobRequest, GetJobRequest, Job, JobState, ListJobsRequest, Progress, WatchJobRequest,
};
use serde_json::{json, Value};
use tokio_stream::StreamExt;

use crate::connect::status_error;

type Client = JobServiceClient<
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ferrotune_clients::ClientAuth>,
>;

/// `ferrotune jobs …`.
#[derive(clap::Subcommand)]
pub(crate) enum JobsCmd {
    /// Jobs of the policy and reward services, newest first.
    List {
        /// Only running (and queued) jobs.
        #[arg(long)]
        active: bool,
    },
    /// One job.
    Get {
        /// Job id.
        id: String,
    },
    /// Follow a job's progress until it ends (replays what already happened).
    Watch {
        /// Job id.
        id: String,
    },
    /// Ask a job to stop (it checkpoints first).
    Cancel {
        /// Job id.
        id: String,
    },
}

pub(crate) fn state_name(s: i32) -> &'static str {
    match JobState::try_from(s).unwrap_or(JobState::Unspecified) {
        JobState::Unspecified => "unknown",
        JobState::Queued => "queued",
        JobState::Running => "running",
        JobState::Succeeded => "succeeded",
        JobState::Failed => "failed",
        JobState::Cancelled => "cancelled",
        JobState::Interrupted => "interrupted",
    }
}

pub(crate) fn job_json(j: &Job) -> Value {
    json!({
        "id": j.id, "kind": j.kind, "state": state_name(j.state), "created_ms": j.created_ms, "updated_ms": j.updated_ms,
        "step": j.progress.as_ref().map(|p| p.step), "total": j.progress.as_ref().map(|p| p.total),
        "loss": j.progress.as_ref().map(|p| p.loss), "error": j.error, "error_code": code_name(j.error_code), "output_dir": j.output_dir, "resumes": j.resumes,
        "artifacts": j.artifacts.iter().map(|a| json!({"kind": a.kind, "path": a.path})).collect::<Vec<_>>(),
    })
}

pub(crate) fn progress_json(p: &Progress) -> Value {
    json!({"step": p.step, "total": p.total, "loss": p.loss, "eval_loss": p.eval_loss, "lr": p.lr, "grad_norm": p.grad_norm,
           "tokens_per_s": p.tokens_per_s, "trained_tokens": p.trained_tokens, "epoch": p.epoch, "eta_s": p.eta_s,
           "checkpoint": if p.checkpoint.is_empty() { Value::Null } else { json!(p.checkpoint) },
           "metrics": p.metrics.iter().collect::<std::collections::BTreeMap<_, _>>()})
}

/// The service holding job `id` (the first whose JobService knows it; NOT_FOUND elsewhere) and the job.
async fn locate(services: &mut [(String, Client)], id: &str) -> Result<(Client, Job)> {
    for (url, c) in services.iter_mut() {
        match c.get_job(GetJobRequest { id: id.to_owned() }).await {
            Ok(j) => return Ok((c.clone(), j.into_inner())),
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => return Err(status_error(s).context(url.clone())),
        }
    }
    let urls: Vec<&str> = services.iter().map(|(u, _)| u.as_str()).collect();
    anyhow::bail!("job `{id}` not found on {}", urls.join(", "))
}

pub(crate) async fn run(cmd: &JobsCmd, mut services: Vec<(String, Client)>, json_out: bool) -> Result<()> {
    match cmd {
        JobsCmd::List { active } => {
            let states = if *active { vec![JobState::Queued as i32, JobState::Running as i32] } else { vec![] };
            let mut jobs = vec![];
            for (url, c) in services.iter_mut() {
                let req = ListJobsRequest { states: states.clone(), limit: 0 };
                jobs.extend(
                    c.list_jobs(req).await.map_err(|s| status_error(s).context(url.clone()))?.into_inner().jobs,
                );
            }
            jobs.sort_by_key(|j| std::cmp::Reverse(j.created_ms));
            if json_out {
                println!("{}", Value::Array(jobs.iter().map(job_json).collect()));
            } else {
                for j in &jobs {
                    let p = j
                        .progress
                        .as_ref()
                        .map(|p| format!("step {}/{} loss {:.4}", p.step, p.total, p.loss))
                        .unwrap_or_default();
                    println!("{}\t{}\t{}\t{}\t{}", j.id, j.kind, state_name(j.state), p, j.output_dir);
                }
            }
        }
        JobsCmd::Get { id } => {
            let (_, j) = locate(&mut services, id).await?;
            println!(
                "{}",
                if json_out { job_json(&j).to_string() } else { serde_json::to_string_pretty(&job_json(&j))? }
            );
        }
        JobsCmd::Cancel { id } => {
            let (mut c, _) = locate(&mut services, id).await?;
            let j = c.cancel_job(CancelJobRequest { id: id.clone() }).await.map_err(status_error)?.into_inner();
            if json_out {
                println!("{}", job_json(&j));
            } else {
                println!("{}: {} (a running job checkpoints, then ends cancelled)", j.id, state_name(j.state));
            }
        }
        JobsCmd::Watch { id } => {
            let (mut c, _) = locate(&mut services, id).await?;
            let j = follow(&mut c, id, json_out, None).await?;
            finish_message(&j, json_out)?;
        }
    }
    Ok(())
}

/// Follows job `id` to its end. `cancel_on` — a flag set by SIGINT/SIGTERM — cancels the job (embedded
/// mode) and keeps following until it has checkpointed.
pub(crate) async fn follow(
    c: &mut Client,
    id: &str,
    json_out: bool,
    cancel_on: Option<std::sync::Arc<std::sync::atomic::AtomicBool>>,
) -> Result<Job> {
    let mut stream =
        c.watch_job(WatchJobRequest { id: id.to_owned(), after_seq: 0 }).await.map_err(status_error)?.into_inner();
    let bar = (!json_out).then(|| {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
                .expect("valid template"),
        );
        b
    });
    let mut cancelled = false;
    let mut last: Option<Job> = None;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        let ev = tokio::select! {
            ev = stream.next() => ev,
            _ = tick.tick() => {
                if let Some(flag) = &cancel_on {
                    if !cancelled && flag.load(std::sync::atomic::Ordering::Relaxed) {
                        cancelled = true;
                        c.cancel_job(CancelJobRequest { id: id.to_owned() }).await.map_err(status_error)?;
                        if let Some(b) = &bar { b.suspend(|| eprintln!("stopping: the job checkpoints first")); }
                    }
                }
                continue;
            }
        };
        let Some(ev) = ev else { break };
        let ev = ev.map_err(status_error)?;
        match ev.body {
            Some(Body::Progress(p)) => match &bar {
                Some(b) => {
                    b.set_length(p.total);
                    b.set_position(p.step);
                    let eval = p.eval_loss.map(|l| format!(" eval {l:.4}")).unwrap_or_default();
                    b.set_message(format!("loss {:.4}{eval} lr {:.2e} {:.0} tok/s", p.loss, p.lr, p.tokens_per_s));
                }
                None => println!("{}", progress_json(&p)),
            },
            Some(Body::Log(l)) => match &bar {
                Some(b) => b.suspend(|| eprintln!("{l}")),
                None => println!("{}", json!({"log": l})),
            },
            Some(Body::State(s)) => {
                if json_out {
                    println!("{}", json!({"state": state_name(s.state), "job_id": id}));
                }
                last = s.job;
            }
            None => {}
        }
    }
    if let Some(b) = bar {
        b.abandon();
    }
    let job = match last {
        Some(j) => j,
        None => c.get_job(GetJobRequest { id: id.to_owned() }).await.map_err(status_error)?.into_inner(),
    };
    Ok(job)
}

/// The name of a job's failure code (`UNAVAILABLE`, …; empty when it did not fail).
fn code_name(code: i32) -> String {
    if code == 0 {
        return String::new();
    }
    // `InvalidArgument` → `INVALID_ARGUMENT`, as gRPC spells the codes.
    let mut name = String::new();
    for (i, ch) in format!("{:?}", tonic::Code::from(code)).chars().enumerate() {
        if ch.is_uppercase() && i > 0 {
            name.push('_');
        }
        name.push(ch.to_ascii_uppercase());
    }
    name
}

/// Prints how a job ended; an error when it failed.
pub(crate) fn finish_message(j: &Job, json_out: bool) -> Result<()> {
    match JobState::try_from(j.state).unwrap_or(JobState::Unspecified) {
        JobState::Failed => anyhow::bail!("job {} failed ({}): {}", j.id, code_name(j.error_code), j.error),
        JobState::Succeeded => {
            let p = j.progress.clone().unwrap_or_default();
            if json_out {
                println!(
                    "{}",
                    json!({"done": true, "job_id": j.id, "output_dir": j.output_dir, "final_loss": p.loss, "final_eval_loss": p.eval_loss, "step": p.step,
                    "artifacts": j.artifacts.iter().map(|a| json!({"kind": a.kind, "path": a.path})).collect::<Vec<_>>()})
                );
            } else {
                for a in &j.artifacts {
                    println!("{}: {}", a.kind, a.path);
                }
            }
        }
        s => {
            let step = j.progress.as_ref().map_or(0, |p| p.step);
            if json_out {
                println!(
                    "{}",
                    json!({"stopped": true, "state": state_name(s as i32), "job_id": j.id, "step": step, "output_dir": j.output_dir})
                );
            } else {
                eprintln!(
                    "job {} {} at step {step}; checkpoint saved, continue with --resume",
                    j.id,
                    state_name(s as i32)
                );
            }
        }
    }
    Ok(())
}
