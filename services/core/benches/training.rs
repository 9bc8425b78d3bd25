//! Training throughput and peak memory on the default model (SmolLM2-135M-Instruct, f32, CPU): LoRA on
//! q_proj/v_proj, LoRA on all linear layers, and QLoRA (NF4 base) on all linear layers; r=8, batch 4 × 256
//! tokens, one warm-up step then `STEPS` timed steps of the real training loop (a run reports the median
//! step), with and without gradient checkpointing. Each setting runs in its own process so its peak RSS
//! (VmHWM) is its own, `REPEATS` times on each side, alternating, and the table shows each side's best. HF
//! PEFT runs the same settings side by side when a dev Python with transformers + peft is available
//! (`FERROTUNE_DEV_PYTHON`, else `~/.cache/ferrotune-dev/venv/bin/python`); skipped with a message otherwise.
//!
//! The table names the CPU, the f32 GEMM peak measured in the same run on the model's own linear shapes
//! (`x[1024, in] · Wᵀ`), and each side's model-FLOP utilisation: the step's matrix-product FLOPs (counted from
//! the config, identical for both sides, see `common/mfu.rs`) per second over that peak.
//!
//! Run: `make bench-train` (or `cargo bench -p ferrotune-core --bench training`). `make bench-long`
//! (`FERROTUNE_BENCH_LONG=1`) runs the long-sequence curve instead: LoRA all-linear, batch 1 × 1k / 2k / 4k
//! tokens, with and without gradient checkpointing on both sides (HF: `gradient_checkpointing_enable`).
//!
//! Knobs: `FERROTUNE_BENCH_STEPS` timed steps, `FERROTUNE_BENCH_REPEATS` runs per side,
//! `FERROTUNE_BENCH_MODEL=DIR` for a model directory other than the registry's SmolLM2, and
//! `FERROTUNE_BENCH_DROPOUT` (default 0.05) for ferrotune's side, `FERROTUNE_BENCH_PAUSE` seconds between runs.
//!
//! On a GPU host (see `scripts/gpu_check.sh`): `FERROTUNE_BENCH_DEVICE=cuda:0 FERROTUNE_BENCH_DTYPE=bf16`
//! (base in bf16, adapters and optimizer in f32 on both sides). Memory is then the peak GPU memory of each
//! process as `nvidia-smi` reports it (allocator cache and CUDA context included, alike for both sides).

use std::path::PathBuf;
use std::process::Command;

#[path = "common/mfu.rs"]
mod mfu;

use ferrotune_core::lora::{LoraConfig, Targets};
use ferrotune_core::registry;
use ferrotune_core::train::sft::{LoraState, SftExample, SftObjective};
use ferrotune_core::train::{train, Run, TrainConfig};

const BATCH: usize = 4;
const SEQ: usize = 256;
/// Timed steps (after one warm-up), unless `FERROTUNE_BENCH_STEPS` says otherwise; a run reports the median.
const STEPS: usize = 3;
/// Runs of each setting on each side, alternating, unless `FERROTUNE_BENCH_REPEATS` says otherwise; the
/// table shows the best (the throughput the machine allows when nothing else slows it: run-to-run swings of
/// ±15% were seen on the 2-core machines, on both sides).
const REPEATS: usize = 2;
/// Seconds of idle before each run (`FERROTUNE_BENCH_PAUSE`), so that the memory a finished run (PEFT's
/// take 5–8 GB) gave back is settled before the next one starts.
const PAUSE_S: u64 = 5;
/// (name, targets, method, gradient checkpointing, batch, tokens per row); HF runs without checkpointing
/// (PEFT's default) in the main table.
type Setting = (&'static str, &'static str, &'static str, bool, usize, usize);
const SETTINGS: [Setting; 5] = [
    ("LoRA q,v", "qv", "lora", false, BATCH, SEQ),
    ("LoRA all-linear", "all", "lora", false, BATCH, SEQ),
    ("QLoRA all-linear", "all", "qlora", false, BATCH, SEQ),
    ("LoRA all-linear, checkpointing", "all", "lora", true, BATCH, SEQ),
    ("QLoRA all-linear, checkpointing", "all", "qlora", true, BATCH, SEQ),
];
/// The long-sequence curve (`FERROTUNE_BENCH_LONG=1`): both sides with the same checkpointing setting.
const LONG: [Setting; 6] = [
    ("1k tokens", "all", "lora", false, 1, 1024),
    ("1k tokens, checkpointing", "all", "lora", true, 1, 1024),
    ("2k tokens", "all", "lora", false, 1, 2048),
    ("2k tokens, checkpointing", "all", "lora", true, 1, 2048),
    ("4k tokens", "all", "lora", false, 1, 4096),
    ("4k tokens, checkpointing", "all", "lora", true, 1, 4096),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let (batch, seq) = (args[i + 4].parse()?, args[i + 5].parse()?);
        return child(&args[i + 1], &args[i + 2], args[i + 3] == "1", batch, seq);
    }
    let dir = match env("MODEL") {
        Some(d) => PathBuf::from(d),
        None => registry::pull(registry::DEFAULT_MODEL)?,
    };
    let (device, dtype, steps) = (device(), dtype(), steps());
    let gpu = device != "cpu";
    let exe = std::env::current_exe()?;
    let python = std::env::var_os("FERROTUNE_DEV_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/ferrotune-dev/venv/bin/python")
    });
    let script = env("HF_SCRIPT")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench_hf_train.py"));
    let pause = std::time::Duration::from_secs(env("PAUSE").and_then(|p| p.parse().ok()).unwrap_or(PAUSE_S));
    let run = |cmd: &mut Command| -> Result<(f64, f64), String> {
        std::thread::sleep(pause);
        let (out, gpu_mb) = run_measured(cmd, gpu).map_err(|e| e.to_string())?;
        if std::os::unix::process::ExitStatusExt::signal(&out.status) == Some(9) {
            return Err("killed (SIGKILL: out of memory)".into());
        }
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("failed").to_owned());
        }
        let line = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").to_owned();
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
        let mem = if gpu { gpu_mb } else { v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN) };
        Ok((v["tokens_per_s"].as_f64().unwrap_or(f64::NAN), mem))
    };
    let repeats = env("REPEATS").and_then(|r| r.parse().ok()).unwrap_or(REPEATS).max(1);
    let mut rows = Vec::new();
    let mut lora_hf_rss = None;
    // (targets, method) → PEFT's (tokens/s, peak RSS), measured once per pair.
    type HfRun = Result<(f64, f64), String>;
    type HfKey = (&'static str, &'static str, bool, usize);
    let mut hf_cache: Vec<(HfKey, HfRun)> = Vec::new();
    let long = env("LONG").is_some_and(|v| v == "1");
    let settings: &[Setting] = if long { &LONG } else { &SETTINGS };
    for &(name, targets, method, gc, batch, seq) in settings {
        // HF checkpoints only in the long-sequence curve; its no-checkpointing run is reused for the main table's
        // checkpointing rows.
        let hf_gc = long && gc;
        let key = (targets, method, hf_gc, seq);
        let cached = hf_cache.iter().find(|(k, _)| *k == key).map(|(_, r)| r.clone());
        let (mut ours, mut hf) = (Vec::new(), Vec::new());
        let (b, s) = (batch.to_string(), seq.to_string());
        // The two sides alternate, so that a slow spell of the machine does not fall on one side only.
        for _ in 0..repeats {
            ours.push(run(Command::new(&exe).args(["--child", targets, method, if gc { "1" } else { "0" }, &b, &s])));
            if cached.is_none() && python.exists() {
                hf.push(run(Command::new(&python).arg(&script).arg(&dir).args([
                    targets,
                    method,
                    &b,
                    &s,
                    &steps.to_string(),
                    &device,
                    &dtype,
                    if hf_gc { "1" } else { "0" },
                ])));
            }
        }
        let ours = best_of(ours)?;
        let hf = match cached {
            Some(r) => r,
            None if python.exists() => best_of(hf),
            None => Err(format!("no Python with transformers + peft at {}", python.display())),
        };
        if method == "lora" && targets == "all" {
            lora_hf_rss = hf.as_ref().ok().map(|h| h.1);
        }
        hf_cache.push((key, hf.clone()));
        rows.push((name, ours, hf, targets, gc, batch, seq));
    }
    let place = if gpu { device.clone() } else { format!("CPU ({} threads)", tch::get_num_threads()) };
    // The limit: the GEMM rate on the model's shapes, measured now on this machine.
    let shapes = mfu::Shapes::from_dir(&dir)?;
    let (kind, dev) = (ferrotune_core::parse_dtype(&dtype)?, ferrotune_core::parse_device(&device)?);
    let (peak, weighted, per) = shapes.gemm_peak((BATCH * SEQ) as i64, kind, dev);
    let machine = if gpu { device.clone() } else { mfu::cpu_model() };
    println!("\ntraining benchmark on {machine}: {}, {dtype}, {place}, r=8; each side: best of {repeats} runs, each the median of {steps} timed steps", dir.display());
    let per: Vec<String> = per.iter().map(|(s, g)| format!("{s} {g:.0}")).collect();
    println!("{dtype} GEMM on the model's shapes (x[{}, in]·Wᵀ, GFLOP/s): peak {peak:.0}, FLOP-weighted over a step's products {weighted:.0}; per shape: {}", BATCH * SEQ, per.join(", "));
    let fusion: Vec<String> = shapes
        .fusion((BATCH * SEQ) as i64, kind, dev)
        .iter()
        .map(|(name, split, fused)| {
            format!("{name} {:.2} / {:.2} ms ({:.2}×)", split * 1e3, fused * 1e3, split / fused)
        })
        .collect();
    println!(
        "projections fused into one product, per layer, forward + input gradient, separate / fused: {}",
        fusion.join(", ")
    );
    println!("MFU = the step's matrix-product FLOPs (counted from the config, the same for both sides) per second / the peak\n");
    let mem = if gpu { "peak GPU MB" } else { "peak RSS MB" };
    println!("| setting | rows × tokens | ferrotune tokens/s | ferrotune MFU | ferrotune {mem} | HF PEFT tokens/s | HF PEFT MFU | HF PEFT {mem} | speed ratio | memory ratio |");
    println!("|:--|--:|--:|--:|--:|--:|--:|--:|--:|--:|");
    for (name, (t, m), hf, targets, gc, batch, seq) in &rows {
        let mfu_of = |tokens_per_s: f64, gc: bool| {
            let flops = shapes.step_flops(targets, 8.0, *batch as f64, *seq as f64, gc);
            100.0 * tokens_per_s / (*batch * *seq) as f64 * flops / (peak * 1e9)
        };
        let ours_mfu = mfu_of(*t, *gc);
        match hf {
            Ok((ht, hm)) => println!(
                "| {name} | {batch} × {seq} | {t:.0} | {ours_mfu:.0}% | {m:.0} | {ht:.0} | {:.0}% | {hm:.0} | {:.2}× | {:.2}× |",
                mfu_of(*ht, long && *gc),
                t / ht,
                m / hm
            ),
            Err(e) => {
                println!("| {name} | {batch} × {seq} | {t:.0} | {ours_mfu:.0}% | {m:.0} | — | — | — | — | — |  ({e})")
            }
        }
    }
    if let Some(hf_lora) = lora_hf_rss {
        for (name, (_, q), ..) in rows.iter().filter(|r| r.0.starts_with("QLoRA")) {
            println!("\n{name}: peak memory / HF PEFT LoRA all-linear peak memory = {:.2}×", q / hf_lora);
        }
    }
    Ok(())
}

/// One setting in this process; prints {"tokens_per_s", "peak_rss_mb"}.
fn child(targets: &str, method: &str, gc: bool, batch: usize, seq: usize) -> Result<(), Box<dyn std::error::Error>> {
    let dir = env("MODEL").map(PathBuf::from).unwrap_or_else(|| registry::model_dir(registry::DEFAULT_MODEL));
    let device = ferrotune_core::parse_device(&device())?;
    let kind = ferrotune_core::parse_dtype(&dtype())?;
    let steps = steps();
    let mut model = ferrotune_core::load_model(&dir, kind, device)?;
    if method == "qlora" {
        model.quantize_nf4()?;
    }
    let t = if targets == "qv" { Targets::Names(vec!["q_proj".into(), "v_proj".into()]) } else { Targets::AllLinear };
    let lcfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: env("DROPOUT").and_then(|d| d.parse().ok()).unwrap_or(0.05),
        targets: t,
        use_rslora: false,
        use_dora: false,
    };
    model.add_lora(&lcfg, 0)?;
    let mut x = 12345u64;
    let examples: Vec<SftExample> = (0..batch)
        .map(|_| {
            let ids: Vec<u32> = (0..seq)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    3 + ((x >> 33) % 49149) as u32
                })
                .collect();
            SftExample::new(ids.clone(), ids.iter().map(|&i| i as i64).collect())
        })
        .collect();
    let cfg = TrainConfig {
        max_steps: steps + 1,
        micro_batch_size: batch,
        gradient_accumulation_steps: 1,
        learning_rate: 1e-4,
        gradient_checkpointing: gc,
        ..TrainConfig::default()
    };
    let obj = SftObjective::new(0, &cfg);
    let state = LoraState { cfg: lcfg, base_model: dir.display().to_string() };
    let tmp = std::env::temp_dir().join(format!("ferrotune-bench-train-{}", std::process::id()));
    let tokens_of = |e: &SftExample| e.input_ids.len();
    let run = Run {
        objective: &obj,
        train: &examples,
        eval: &[],
        state: &state,
        cfg: &cfg,
        output_dir: &tmp,
        tokens_of: &tokens_of,
    };
    let mut rates = Vec::new();
    train(
        &mut model,
        &run,
        false,
        &mut |ev| {
            if ev.step > 1 {
                rates.push(ev.tokens_per_s)
            }
        },
        &|| false,
    )?;
    let _ = std::fs::remove_dir_all(&tmp);
    let mut secs: Vec<f64> = rates.iter().map(|r| (batch * seq) as f64 / r).collect();
    secs.sort_by(f64::total_cmp);
    let median = secs[secs.len() / 2];
    let status = std::fs::read_to_string("/proc/self/status")?;
    let hwm_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(f64::NAN);
    println!("{}", serde_json::json!({"tokens_per_s": (batch * seq) as f64 / median, "peak_rss_mb": hwm_kb / 1024.0}));
    Ok(())
}

/// The run with the highest tokens/s (its memory the highest of the runs), or the first failure.
fn best_of(runs: Vec<Result<(f64, f64), String>>) -> Result<(f64, f64), String> {
    let ok: Vec<(f64, f64)> = runs.iter().filter_map(|r| r.as_ref().ok().copied()).collect();
    if ok.is_empty() {
        return runs.into_iter().next().unwrap_or_else(|| Err("no run".into()));
    }
    let speed = ok.iter().map(|r| r.0).fold(f64::NAN, f64::max);
    let mem = ok.iter().map(|r| r.1).fold(f64::NAN, f64::max);
    Ok((speed, mem))
}

/// `FERROTUNE_BENCH_<name>`.
fn env(name: &str) -> Option<String> {
    std::env::var(format!("FERROTUNE_BENCH_{name}")).ok().filter(|v| !v.is_empty())
}

fn device() -> String {
    env("DEVICE").unwrap_or_else(|| "cpu".into())
}

fn dtype() -> String {
    env("DTYPE").unwrap_or_else(|| "f32".into())
}

fn steps() -> usize {
    env("STEPS").and_then(|s| s.parse().ok()).unwrap_or(STEPS)
}

/// Runs `cmd` to the end; with `gpu`, also samples `nvidia-smi` every 50 ms for the child's GPU memory and
/// returns the peak in MB (NaN when nvidia-smi does not report the process).
fn run_measured(cmd: &mut Command, gpu: bool) -> std::io::Result<(std::process::Output, f64)> {
    use std::process::Stdio;
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id().to_string();
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut so, &mut b).map(|_| b)
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        std::io::Read::read_to_end(&mut se, &mut b).map(|_| b)
    });
    let mut peak = f64::NAN;
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if gpu {
            let q = Command::new("nvidia-smi")
                .env_remove("LD_PRELOAD")
                .args(["--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
                .output();
            for line in
                q.iter().flat_map(|o| String::from_utf8_lossy(&o.stdout).lines().map(str::to_owned).collect::<Vec<_>>())
            {
                let mut f = line.split(',').map(str::trim);
                if f.next() == Some(pid.as_str()) {
                    if let Some(mb) = f.next().and_then(|v| v.parse::<f64>().ok()) {
                        peak = if peak.is_nan() { mb } else { peak.max(mb) };
                    }
                }
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    let stdout = out_t.join().expect("reader thread")?;
    let stderr = err_t.join().expect("reader thread")?;
    Ok((std::process::Output { status, stdout, stderr }, peak))
}
