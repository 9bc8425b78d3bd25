//! `make bench-colocate`: two LoRA SFT trainings of SmolLM2 side by side on this host vs each alone, under
//! each CPU setting (OpenMP wait policy, threads per process). On a host with N cores two processes sharing
//! it fairly take about 2× as long as one alone; spinning OpenMP threads of one process stealing the cores
//! the other one's threads wait on make it far worse. Prints a table; `FERROTUNE_BENCH_STEPS` (default 10).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Instant;

use ferrotune_tests::{ferrotune_bin, repo, smollm2_dir};

/// `wait` is an OpenMP wait policy (`PASSIVE`, `ACTIVE`) or `spin:N`: GNU OpenMP's default policy with
/// `GOMP_SPINCOUNT=N` (its default count is 300000).
fn start(out: &Path, steps: usize, wait: &str, threads: usize) -> Child {
    let recipe = repo("recipes/lora-sft.yaml");
    let data = format!("data.path={}", repo("recipes/data/pirate-train.jsonl").display());
    let mut cmd = Command::new(ferrotune_bin());
    cmd.args(["--threads", &threads.to_string(), "train", "sft", "--recipe", recipe.to_str().unwrap()])
        .args(["--output-dir", out.to_str().unwrap(), "--set", &data, "--max-steps", &steps.to_string(), "--json"])
        .env_remove("OMP_NUM_THREADS")
        .env_remove("GOMP_SPINCOUNT");
    match wait.strip_prefix("spin:") {
        // ferrotune sets OMP_WAIT_POLICY itself unless the environment does: an empty value is GOMP's default.
        Some(n) => cmd.env("OMP_WAIT_POLICY", "").env("GOMP_SPINCOUNT", n),
        None => cmd.env("OMP_WAIT_POLICY", wait),
    };
    cmd.stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().expect("start ferrotune")
}

/// Wall seconds of `n` trainings started together (each one's own time).
fn run(tmp: &Path, tag: &str, n: usize, steps: usize, wait: &str, threads: usize) -> Vec<f64> {
    let t0 = Instant::now();
    let mut kids: Vec<(Child, Option<f64>)> =
        (0..n).map(|i| (start(&tmp.join(format!("{tag}-{n}-{i}")), steps, wait, threads), None)).collect();
    while kids.iter().any(|(_, t)| t.is_none()) {
        for (c, t) in kids.iter_mut().filter(|(_, t)| t.is_none()) {
            if let Some(status) = c.try_wait().unwrap() {
                assert!(status.success(), "training failed under {tag}");
                *t = Some(t0.elapsed().as_secs_f64());
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    kids.into_iter().map(|(_, t)| t.unwrap()).collect()
}

fn main() {
    let steps: usize = std::env::var("FERROTUNE_BENCH_STEPS").ok().and_then(|s| s.parse().ok()).unwrap_or(10);
    let cores = ferrotune_core::threads::available();
    smollm2_dir();
    let tmp = tempfile::tempdir().unwrap();
    println!("{steps} LoRA SFT steps of SmolLM2 per training, {cores} CPUs; wall seconds per training\n");
    println!("| wait policy | threads each | alone s | side by side s (each) | slowdown |");
    println!("|:--|--:|--:|--:|--:|");
    let configs = [
        ("PASSIVE", cores),
        ("ACTIVE", cores),
        ("spin:300000", cores),
        ("spin:20000", cores),
        ("PASSIVE", (cores / 2).max(1)),
    ];
    for (wait, threads) in configs {
        let tag = format!("{wait}-{threads}");
        let alone = run(tmp.path(), &tag, 1, steps, wait, threads)[0];
        let pair = run(tmp.path(), &tag, 2, steps, wait, threads);
        let mean = pair.iter().sum::<f64>() / pair.len() as f64;
        println!(
            "| {} | {threads} | {alone:.1} | {:.1} / {:.1} | {:.2}× |",
            wait.to_lowercase(),
            pair[0],
            pair[1],
            mean / alone
        );
    }
}
