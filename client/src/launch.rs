//! `--nproc-per-node N`: the local launcher of a data-parallel job, as torchrun is. It starts N copies of this
//! command (one rank each, CPU threads split between them, `cuda:LOCAL_RANK` when the recipe trains on CUDA)
//! with the environment every rank reads (`RANK`, `LOCAL_RANK`, `WORLD_SIZE`, `MASTER_ADDR`, `MASTER_PORT`),
//! for several machines taking the node count and rank from `PET_NNODES` / `NNODES` and `PET_NODE_RANK` /
//! `NODE_RANK` and the master from `MASTER_ADDR` / `PET_MASTER_ADDR`. When a rank fails, the others are
//! stopped and the command fails naming it. SIGINT / SIGTERM to the launcher pass SIGTERM on to every rank
//! (each checkpoints and stops, so `--resume` continues); a second one stops them (SIGKILL after 30 s).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

fn var(names: &[&str]) -> Option<String> {
    names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.is_empty()))
}

fn num(names: &[&str], default: usize) -> Result<usize> {
    match var(names) {
        Some(v) => v.trim().parse().with_context(|| format!("{}={v}: not a number", names[0])),
        None => Ok(default),
    }
}

/// This command's arguments without `--nproc-per-node N` (and with `--json` for the ranks after the first,
/// whose output is not shown).
fn rank_args(rank: usize) -> Vec<std::ffi::OsString> {
    let mut out = vec![];
    let mut args = std::env::args_os().skip(1);
    while let Some(a) = args.next() {
        let s = a.to_string_lossy();
        if s == "--nproc-per-node" {
            args.next();
        } else if !s.starts_with("--nproc-per-node=") {
            out.push(a);
        }
    }
    if rank > 0 && !out.iter().any(|a| a == "--json") {
        out.push("--json".into());
    }
    out
}

/// Runs the job on `nproc` local ranks; `device` is the recipe's.
pub(crate) fn run(nproc: usize, device: &str, threads: Option<usize>) -> Result<()> {
    if nproc == 0 {
        bail!("--nproc-per-node 0: a job needs at least one process");
    }
    let nnodes = num(&["PET_NNODES", "NNODES"], 1)?;
    let node = num(&["PET_NODE_RANK", "NODE_RANK"], 0)?;
    let world = nnodes * nproc;
    if let Some(w) = var(&["WORLD_SIZE"]) {
        if w.trim().parse::<usize>().ok() != Some(world) {
            bail!("WORLD_SIZE={w} disagrees with --nproc-per-node {nproc} on {nnodes} node(s) ({world} ranks)");
        }
    }
    if node >= nnodes {
        bail!("node rank {node} is not below the node count {nnodes}");
    }
    let addr = var(&["MASTER_ADDR", "PET_MASTER_ADDR"]).unwrap_or_else(|| "127.0.0.1".into());
    let port: u16 = match var(&["MASTER_PORT", "PET_MASTER_PORT"]) {
        Some(p) => p.trim().parse().with_context(|| format!("MASTER_PORT={p}: not a port"))?,
        None if nnodes == 1 => {
            std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?.local_addr()?.port()
        }
        None => bail!("several nodes need MASTER_ADDR and MASTER_PORT (or PET_MASTER_ADDR / PET_MASTER_PORT)"),
    };
    // The master's port must be free before any rank starts (rank 0 hosts the store there).
    if node == 0 {
        std::net::TcpListener::bind(("0.0.0.0", port))
            .map_err(|e| anyhow::anyhow!("MASTER_PORT {port} cannot be used: {e}"))?;
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let total = threads
        .filter(|&t| t > 0)
        .unwrap_or_else(|| std::env::var("OMP_NUM_THREADS").ok().and_then(|t| t.parse().ok()).unwrap_or(cpus));
    let per_rank = (total / nproc).max(1);
    let exe = std::env::current_exe().context("this program's path")?;
    let stop_asked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop_asked.clone()).context("installing the signal handler")?;
    }
    let mut passed_on = false;
    let mut children: Vec<(usize, Child)> = vec![];
    for local in 0..nproc {
        let rank = node * nproc + local;
        let mut cmd = Command::new(&exe);
        cmd.args(rank_args(rank))
            .env("RANK", rank.to_string())
            .env("LOCAL_RANK", local.to_string())
            .env("WORLD_SIZE", world.to_string())
            .env("MASTER_ADDR", &addr)
            .env("MASTER_PORT", port.to_string())
            .env("OMP_NUM_THREADS", per_rank.to_string())
            .arg("--threads")
            .arg(per_rank.to_string());
        if device.starts_with("cuda") {
            cmd.args(["--set", &format!("device=cuda:{local}")]);
        }
        if rank > 0 {
            cmd.stdout(Stdio::null());
        }
        match cmd.spawn() {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                stop(&mut children);
                bail!("starting rank {rank}: {e}");
            }
        }
    }
    // Wait for all; the first failure stops the rest.
    loop {
        let mut running = 0;
        let mut failed = false;
        for (_, c) in children.iter_mut() {
            match c.try_wait()? {
                Some(s) if !s.success() => failed = true,
                Some(_) => {}
                None => running += 1,
            }
        }
        if failed {
            // The ranks that ended on their own, before the others are stopped.
            std::thread::sleep(Duration::from_millis(300));
            let mut why = vec![];
            for (rank, c) in children.iter_mut() {
                if let Some(s) = c.try_wait()?.filter(|s| !s.success()) {
                    why.push(format!("rank {rank} of {world} failed ({s})"));
                }
            }
            stop(&mut children);
            bail!("{}; the other ranks were stopped (--resume continues from the newest checkpoint)", why.join(", "));
        }
        if running == 0 {
            return Ok(());
        }
        if stop_asked.swap(false, std::sync::atomic::Ordering::Relaxed) {
            if passed_on {
                // Asked again while the ranks stop: SIGTERM once more, SIGKILL after 30 s.
                stop(&mut children);
                bail!("stopped on a second signal; --resume continues from the newest checkpoint");
            }
            passed_on = true;
            terminate(&mut children);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// SIGTERM to every rank still running (each checkpoints and stops).
fn terminate(children: &mut [(usize, Child)]) {
    for (_, c) in children.iter_mut() {
        if c.try_wait().ok().flatten().is_none() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
    }
}

/// [`terminate`], then SIGKILL to the ranks still running after 30 s.
fn stop(children: &mut [(usize, Child)]) {
    terminate(children);
    let deadline = Instant::now() + Duration::from_secs(30);
    for (_, c) in children.iter_mut() {
        while c.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}
