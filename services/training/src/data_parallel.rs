//! A service's recipe jobs on several devices (`policy.devices`): the job runs data-parallel, one rank per
//! device, through the same launcher as `--nproc-per-node` — this program started as
//! `ferrotune train sft|align … --nproc-per-node N --json` on the resolved recipe, with embedded services and
//! none of the server's settings — and is followed from here: rank 0's progress and log lines become this job's
//! events, its end this job's end. Cancelling (or the server draining) sends SIGTERM to the launcher and its
//! ranks (one process group); they checkpoint, so the job resumes like any other.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferrotune_proto::v1::{Artifact, Progress};
use ferrotune_runtime::jobs::{JobContext, JobOutcome, JobRunner};

use crate::recipe::Recipe;

/// Devices of a data-parallel job: all `cpu` (the CPU threads split between the ranks) or distinct CUDA
/// devices (`cuda:N`, each rank seeing its own as `cuda:LOCAL_RANK` through `CUDA_VISIBLE_DEVICES`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Devices {
    /// `n` ranks on the CPU.
    Cpu(usize),
    /// One rank per CUDA device index.
    Cuda(Vec<usize>),
}

impl Devices {
    /// Parses a device list (`policy.devices`); `None` for fewer than two devices.
    pub fn parse(list: &[String]) -> Result<Option<Self>> {
        if list.len() < 2 {
            return Ok(None);
        }
        if list.iter().all(|d| d == "cpu") {
            return Ok(Some(Self::Cpu(list.len())));
        }
        let mut ids = vec![];
        for d in list {
            let id = d.strip_prefix("cuda:").and_then(|n| n.parse::<usize>().ok()).with_context(|| {
                format!("`{d}`: a data-parallel device list is all `cpu` or all `cuda:N` (distinct)")
            })?;
            if ids.contains(&id) {
                bail!("`{d}` is listed twice (one rank per device)");
            }
            ids.push(id);
        }
        Ok(Some(Self::Cuda(ids)))
    }

    fn ranks(&self) -> usize {
        match self {
            Self::Cpu(n) => *n,
            Self::Cuda(ids) => ids.len(),
        }
    }
}

/// Runs jobs of `kind` (`sft`, `dpo`, `orpo`, `simpo`, `kto`) on `devices` with `threads` CPU threads in all.
pub struct DataParallel {
    /// The job kind.
    pub kind: String,
    /// Where the ranks run.
    pub devices: Devices,
    /// CPU threads of the whole job (0 = the launcher's default: the CPUs this process may use).
    pub threads: usize,
}

impl DataParallel {
    /// The runner for `kind` on `devices`.
    pub fn runner(kind: &str, devices: Devices, threads: usize) -> Arc<dyn JobRunner> {
        Arc::new(Self { kind: kind.to_owned(), devices, threads })
    }

    fn command_words(&self) -> Result<[&'static str; 2]> {
        Ok(match self.kind.as_str() {
            "sft" => ["train", "sft"],
            "dpo" => ["align", "dpo"],
            "orpo" => ["align", "orpo"],
            "simpo" => ["align", "simpo"],
            "kto" => ["align", "kto"],
            k => bail!("{k} jobs are not data-parallel"),
        })
    }
}

impl JobRunner for DataParallel {
    fn run(&self, ctx: &JobContext) -> Result<JobOutcome> {
        // The launched rank 0 claims the output dir for its own job; this one only reads the spec.
        let mut r: Recipe = serde_json::from_value(ctx.spec["recipe"].clone()).context("job spec: recipe")?;
        let resume = ctx.resume || ctx.spec["resume"].as_bool().unwrap_or(false);
        if r.device_map.is_some() {
            bail!("device_map: this service runs recipe jobs data-parallel (policy.devices), one device per rank");
        }
        let dir = r.output_dir.join(".data-parallel");
        ferrotune_core::fsx::create_dir_all(&dir).with_context(|| format!("{}", dir.display()))?;
        r.device = match &self.devices {
            Devices::Cpu(_) => "cpu".into(),
            Devices::Cuda(_) => "cuda".into(),
        };
        let recipe = dir.join("recipe.yaml");
        std::fs::write(&recipe, serde_yaml::to_string(&r)?).with_context(|| format!("{}", recipe.display()))?;
        let config = dir.join("ferrotune.yaml");
        std::fs::write(&config, "{}\n").with_context(|| format!("{}", config.display()))?;
        let exe = std::env::current_exe().context("this program's path")?;
        let mut cmd = Command::new(exe);
        cmd.args(self.command_words()?)
            .arg("--recipe")
            .arg(&recipe)
            .arg("--config")
            .arg(&config)
            .args(["--json", "--nproc-per-node", &self.devices.ranks().to_string()])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if self.threads > 0 {
            cmd.args(["--threads", &self.threads.to_string()]);
        }
        if resume {
            cmd.arg("--resume");
        }
        // None of the server's settings (its endpoints, store, listen address) apply to the ranks.
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FERROTUNE__") {
                cmd.env_remove(k);
            }
        }
        if let Devices::Cuda(ids) = &self.devices {
            let visible: Vec<String> = ids.iter().map(usize::to_string).collect();
            cmd.env("CUDA_VISIBLE_DEVICES", visible.join(","));
        }
        ctx.log(format!("data parallel: {} ranks on {:?}", self.devices.ranks(), self.devices));
        follow(cmd, ctx)
    }
}

/// What the launcher's JSON lines say.
enum Line {
    Progress(Progress),
    Log(String),
    Done(Vec<Artifact>),
    Stopped,
    Other,
}

fn parse_line(l: &str) -> Line {
    let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else { return Line::Log(l.to_owned()) };
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    if let Some(s) = v["log"].as_str() {
        Line::Log(s.to_owned())
    } else if v["done"].as_bool() == Some(true) {
        let artifacts = v["artifacts"].as_array().into_iter().flatten();
        Line::Done(
            artifacts
                .map(|a| Artifact {
                    kind: a["kind"].as_str().unwrap_or_default().to_owned(),
                    path: a["path"].as_str().unwrap_or_default().to_owned(),
                })
                .collect(),
        )
    } else if v["stopped"].as_bool() == Some(true) {
        Line::Stopped
    } else if v.get("step").is_some() && v.get("loss").is_some() {
        let metrics = v["metrics"].as_object().into_iter().flatten();
        Line::Progress(Progress {
            step: v["step"].as_u64().unwrap_or(0),
            total: v["total"].as_u64().unwrap_or(0),
            loss: f("loss"),
            eval_loss: v["eval_loss"].as_f64(),
            lr: f("lr"),
            grad_norm: f("grad_norm"),
            tokens_per_s: f("tokens_per_s"),
            trained_tokens: v["trained_tokens"].as_u64().unwrap_or(0),
            epoch: f("epoch"),
            eta_s: 0.0,
            checkpoint: v["checkpoint"].as_str().unwrap_or_default().to_owned(),
            metrics: metrics.filter_map(|(k, x)| Some((k.clone(), x.as_f64()?))).collect(),
        })
    } else {
        Line::Other
    }
}

/// Runs the launcher, turning rank 0's lines into job events; SIGTERM to it when the job must stop.
fn follow(mut cmd: Command, ctx: &JobContext) -> Result<JobOutcome> {
    // Its own process group (the ranks join it): a stop reaches the launcher and every rank at once.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().context("starting the ranks")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().expect("piped");
    std::thread::spawn(move || {
        let mut r = BufReader::new(out);
        let mut buf = vec![];
        // Lossy, line by line to the end: a line that is not UTF-8 must not stop the reading (rank 0 would block
        // on a full pipe).
        while r.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
            let l = String::from_utf8_lossy(&buf).trim_end().to_owned();
            buf.clear();
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let mut err = child.stderr.take().expect("piped");
    let errors = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let (mut outcome, mut signalled) = (None, false);
    loop {
        if ctx.should_stop() && !signalled {
            signalled = true;
            // SAFETY: kill(2) on the process group our own child leads.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGTERM) };
        }
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) => match parse_line(&l) {
                Line::Progress(p) => ctx.progress(p),
                Line::Log(s) => ctx.log(s),
                Line::Done(a) => outcome = Some(JobOutcome::Finished(a)),
                Line::Stopped => outcome = Some(JobOutcome::Stopped),
                Line::Other => {}
            },
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.wait().context("waiting for the ranks")?;
    let stderr = errors.join().unwrap_or_default();
    match outcome {
        Some(o) if status.success() => Ok(o),
        _ => {
            let why = stderr.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("no message");
            let why = why.strip_prefix("error: ").unwrap_or(why);
            bail!("data-parallel job ({status}): {why}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_lists() {
        let p = |l: &[&str]| Devices::parse(&l.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(p(&[]).unwrap(), None);
        assert_eq!(p(&["cuda:1"]).unwrap(), None, "one device: no data parallelism");
        assert_eq!(p(&["cpu", "cpu"]).unwrap(), Some(Devices::Cpu(2)));
        assert_eq!(p(&["cuda:2", "cuda:0"]).unwrap(), Some(Devices::Cuda(vec![2, 0])));
        assert!(p(&["cpu", "cuda:0"]).unwrap_err().to_string().contains("all `cpu` or all `cuda:N`"));
        assert!(p(&["cuda:1", "cuda:1"]).unwrap_err().to_string().contains("twice"));
    }

    #[test]
    fn launcher_lines_become_events() {
        let l = r#"{"step": 3, "total": 10, "loss": 1.5, "eval_loss": null, "lr": 0.001, "grad_norm": 2.0, "tokens_per_s": 9.0, "trained_tokens": 77, "epoch": 0.5, "eta_s": 1.0, "checkpoint": null, "metrics": {"dist/comm_s": 0.1}}"#;
        let Line::Progress(p) = parse_line(l) else { panic!("progress") };
        assert_eq!((p.step, p.total, p.loss, p.trained_tokens, p.metrics["dist/comm_s"]), (3, 10, 1.5, 77, 0.1));
        assert!(matches!(parse_line(r#"{"log": "hi"}"#), Line::Log(s) if s == "hi"));
        let done = r#"{"done": true, "artifacts": [{"kind": "adapter", "path": "/o"}]}"#;
        assert!(matches!(parse_line(done), Line::Done(a) if a[0].path == "/o"));
        assert!(matches!(parse_line(r#"{"stopped": true}"#), Line::Stopped));
        assert!(matches!(parse_line(r#"{"state": "running"}"#), Line::Other));
    }
}
