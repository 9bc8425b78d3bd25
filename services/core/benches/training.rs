//! Training throughput and peak memory on the default model (SmolLM2-135M-Instruct, f32, CPU): LoRA on
//! q_proj/v_proj, LoRA on all linear layers, and QLoRA (NF4 base) on all linear layers; r=8, batch 4 × 256
//! tokens, one warm-up step then `STEPS` timed steps of the real training loop, with and without gradient
//! checkpointing. Each setting runs in its own
//! process so its peak RSS (VmHWM) is its own. HF PEFT runs the same settings side by side when a dev
//! Python with transformers + peft is available (`FERROTUNE_DEV_PYTHON`, else
//! `~/.cache/ferrotune-dev/venv/bin/python`); skipped with a message otherwise.
//!
//! Run: `make bench-train` (or `cargo bench -p ferrotune-core --bench training`).

use std::path::PathBuf;
use std::process::Command;

use ferrotune_core::lora::{LoraConfig, Targets};
use ferrotune_core::registry;
use ferrotune_core::train::sft::{LoraState, SftExample, SftObjective};
use ferrotune_core::train::{train, Run, TrainConfig};
use tch::{Device, Kind};

const BATCH: usize = 4;
const SEQ: usize = 256;
const STEPS: usize = 3;
/// (name, targets, method, gradient checkpointing); HF runs without checkpointing (PEFT's default).
const SETTINGS: [(&str, &str, &str, bool); 5] = [
    ("LoRA q,v", "qv", "lora", false),
    ("LoRA all-linear", "all", "lora", false),
    ("QLoRA all-linear", "all", "qlora", false),
    ("LoRA all-linear, checkpointing", "all", "lora", true),
    ("QLoRA all-linear, checkpointing", "all", "qlora", true),
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        return child(&args[i + 1], &args[i + 2], args[i + 3] == "1");
    }
    let dir = registry::pull(registry::DEFAULT_MODEL)?;
    let exe = std::env::current_exe()?;
    let python = std::env::var_os("FERROTUNE_DEV_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/ferrotune-dev/venv/bin/python")
    });
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench_hf_train.py");
    let run = |cmd: &mut Command| -> Result<(f64, f64), String> {
        let out = cmd.output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("failed").to_owned());
        }
        let line = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or("").to_owned();
        let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("{e}: {line}"))?;
        Ok((v["tokens_per_s"].as_f64().unwrap_or(f64::NAN), v["peak_rss_mb"].as_f64().unwrap_or(f64::NAN)))
    };
    let mut rows = Vec::new();
    let mut lora_hf_rss = None;
    let mut hf_cache: Vec<((&str, &str), Result<(f64, f64), String>)> = Vec::new();
    for (name, targets, method, gc) in SETTINGS {
        let ours = run(Command::new(&exe).args(["--child", targets, method, if gc { "1" } else { "0" }]))?;
        if let Some((_, r)) = hf_cache.iter().find(|(k, _)| *k == (targets, method)) {
            rows.push((name, ours, r.clone()));
            continue;
        }
        let hf = if python.exists() {
            run(Command::new(&python).arg(&script).arg(&dir).args([targets, method, &BATCH.to_string(), &SEQ.to_string(), &STEPS.to_string()]))
        } else {
            Err(format!("no Python with transformers + peft at {}", python.display()))
        };
        if method == "lora" && targets == "all" {
            lora_hf_rss = hf.as_ref().ok().map(|h| h.1);
        }
        hf_cache.push(((targets, method), hf.clone()));
        rows.push((name, ours, hf));
    }
    println!("\ntraining benchmark: SmolLM2-135M-Instruct, f32, CPU ({} threads), r=8, batch {BATCH} × {SEQ} tokens, {STEPS} timed steps", tch::get_num_threads());
    println!("| setting | ferrotune tokens/s | ferrotune peak RSS MB | HF PEFT tokens/s | HF PEFT peak RSS MB | speed ratio | memory ratio |");
    println!("|:--|--:|--:|--:|--:|--:|--:|");
    for (name, (t, m), hf) in &rows {
        match hf {
            Ok((ht, hm)) => println!("| {name} | {t:.0} | {m:.0} | {ht:.0} | {hm:.0} | {:.2}× | {:.2}× |", t / ht, m / hm),
            Err(e) => println!("| {name} | {t:.0} | {m:.0} | — | — | — | — |  ({e})"),
        }
    }
    if let Some(hf_lora) = lora_hf_rss {
        for (name, (_, q), _) in rows.iter().filter(|r| r.0.starts_with("QLoRA")) {
            println!("\n{name}: peak RSS / HF PEFT LoRA all-linear peak RSS = {:.2}×", q / hf_lora);
        }
    }
    Ok(())
}

/// One setting in this process; prints {"tokens_per_s", "peak_rss_mb"}.
fn child(targets: &str, method: &str, gc: bool) -> Result<(), Box<dyn std::error::Error>> {
    let dir = registry::model_dir(registry::DEFAULT_MODEL);
    let mut model = ferrotune_core::load_model(&dir, Kind::Float, Device::Cpu)?;
    if method == "qlora" {
        model.quantize_nf4()?;
    }
    let t = if targets == "qv" { Targets::Names(vec!["q_proj".into(), "v_proj".into()]) } else { Targets::AllLinear };
    let lcfg = LoraConfig { r: 8, alpha: 16.0, dropout: 0.05, targets: t, use_rslora: false };
    model.add_lora(&lcfg, 0)?;
    let mut x = 12345u64;
    let examples: Vec<SftExample> = (0..BATCH)
        .map(|_| {
            let ids: Vec<u32> = (0..SEQ)
                .map(|_| {
                    x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    3 + ((x >> 33) % 49149) as u32
                })
                .collect();
            SftExample::new(ids.clone(), ids.iter().map(|&i| i as i64).collect())
        })
        .collect();
    let cfg = TrainConfig { max_steps: STEPS + 1, micro_batch_size: BATCH, gradient_accumulation_steps: 1, learning_rate: 1e-4, gradient_checkpointing: gc, ..TrainConfig::default() };
    let obj = SftObjective::new(0, &cfg);
    let state = LoraState { cfg: lcfg, base_model: dir.display().to_string() };
    let tmp = std::env::temp_dir().join(format!("ferrotune-bench-train-{}", std::process::id()));
    let tokens_of = |e: &SftExample| e.input_ids.len();
    let run = Run { objective: &obj, train: &examples, eval: &[], state: &state, cfg: &cfg, output_dir: &tmp, tokens_of: &tokens_of };
    let mut rates = Vec::new();
    train(&mut model, &run, false, &mut |ev| if ev.step > 1 { rates.push(ev.tokens_per_s) }, &|| false)?;
    let _ = std::fs::remove_dir_all(&tmp);
    let secs: f64 = rates.iter().map(|r| (BATCH * SEQ) as f64 / r).sum();
    let status = std::fs::read_to_string("/proc/self/status")?;
    let hwm_kb: f64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok()).unwrap_or(f64::NAN);
    println!("{}", serde_json::json!({"tokens_per_s": (BATCH * SEQ * rates.len()) as f64 / secs, "peak_rss_mb": hwm_kb / 1024.0}));
    Ok(())
}
