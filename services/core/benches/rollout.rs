//! Rollout throughput for group RL, side by side in one run: GRPO-shaped work — 8 prompts × 8 samples, at most
//! 128 new tokens, temperature 1.0, stopping at EOS — on SmolLM2-135M-Instruct in f32 on the CPU:
//!
//! - ferrotune's rollout engine (`generate_groups`: each prompt prefilled once and its KV cache shared by its
//!   samples, finished rows leaving the batch);
//! - ferrotune's plain batched generation of the prompts repeated 8 times (what a generic `generate` does);
//! - HF transformers' `generate(num_return_sequences=8)` on the same prompts (when a dev Python with
//!   transformers exists: `FERROTUNE_DEV_PYTHON`, else `~/.cache/ferrotune-dev/venv/bin/python`);
//! - policy-session rollouts with a LoRA adapter on the f32 base and on the NF4 base (QLoRA: dense copies of
//!   the NF4 weights held for the rollout), with the teacher-forced log-prob pass an off-policy update needs,
//!   and without it (an on-policy update: GRPO with `num_iterations` 1).
//!
//! Throughput counts useful tokens: each completion's tokens up to and including its EOS. Sampling makes
//! lengths differ between engines; tokens/s is what compares.
//!
//! Run: `make bench-rollout` (or `cargo bench -p ferrotune-core --bench rollout`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use ferrotune_core::generation::generate_groups;
use ferrotune_core::lora::{LoraConfig, Targets};
use ferrotune_core::train::session::{AdapterInit, PolicySession, RolloutSpec, SessionSpec};
use ferrotune_core::train::TrainConfig;
use ferrotune_core::{generate, registry, GenerateOptions, Message, ModelBundle, SamplingParams};
use tch::{Device, Kind};

const PROMPTS: usize = 8;
const N: usize = 8;
const NEW: usize = 128;
const REPEATS: usize = 3;

fn sampling() -> SamplingParams {
    SamplingParams { greedy: false, temperature: 1.0, top_k: None, top_p: None, repetition_penalty: 1.0 }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = registry::pull(registry::DEFAULT_MODEL)?;
    let b = ModelBundle::load(&dir, Kind::Float, Device::Cpu)?;
    let data = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../recipes/data/capitals-eval.jsonl"),
    )?;
    let prompts: Vec<Vec<u32>> = data
        .lines()
        .take(PROMPTS)
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).expect("record");
            b.chat_prompt(&[Message::new("user", v["prompt"].as_str().expect("prompt"))]).expect("prompt")
        })
        .collect();
    let opts = GenerateOptions {
        max_new_tokens: NEW,
        sampling: sampling(),
        seed: 0,
        eos_ids: b.defaults.eos_ids.clone(),
        stop_strings: vec![],
        pad_id: b.defaults.pad_id,
    };
    // Warm-up.
    generate(
        &b.model,
        &b.tokenizer,
        &prompts[..1],
        &GenerateOptions { max_new_tokens: 4, ..opts.clone() },
        &mut |_| {},
    )?;
    let mut rows = vec![];
    let best = |f: &mut dyn FnMut(u64) -> Result<usize, Box<dyn std::error::Error>>| -> Result<(usize, f64), Box<dyn std::error::Error>> {
        let mut out = (0, f64::MAX);
        for r in 0..REPEATS {
            let start = Instant::now();
            let tokens = f(r as u64)?;
            let s = start.elapsed().as_secs_f64();
            if s < out.1 {
                out = (tokens, s);
            }
        }
        Ok(out)
    };
    let engine = best(&mut |seed| {
        let g = generate_groups(
            &b.model,
            &b.tokenizer,
            &prompts,
            N,
            &GenerateOptions { seed, ..opts.clone() },
            &mut |_| {},
            &|| false,
        )?;
        Ok(g.iter().map(|x| x.ids.len()).sum())
    })?;
    rows.push(("ferrotune rollout engine (generate_groups)", engine));
    let repeated: Vec<Vec<u32>> = prompts.iter().flat_map(|p| std::iter::repeat_n(p.clone(), N)).collect();
    let plain = best(&mut |seed| {
        let g = generate(&b.model, &b.tokenizer, &repeated, &GenerateOptions { seed, ..opts.clone() }, &mut |_| {})?;
        Ok(g.iter().map(|x| x.ids.len()).sum())
    })?;
    rows.push(("ferrotune generate, prompts repeated ×8", plain));
    let hf = hf(&dir, &prompts, &b.defaults.eos_ids, b.defaults.pad_id);
    drop(b);
    let mut session_rows = vec![];
    for (qlora, logprobs, name) in [
        (false, true, "session rollout, LoRA r=8 on the f32 base (+ teacher-forced log-probs)"),
        (false, false, "session rollout, LoRA r=8, on-policy (no log-prob pass)"),
        (true, true, "session rollout, QLoRA (NF4 base, dense copies held; + log-probs)"),
    ] {
        let spec = SessionSpec {
            base: dir.clone(),
            qlora,
            adapter: AdapterInit::New(LoraConfig {
                r: 8,
                alpha: 16.0,
                dropout: 0.0,
                targets: Targets::AllLinear,
                use_rslora: false,
                use_dora: false,
            }),
            train: TrainConfig::default(),
            value_head: false,
            kind: Kind::Float,
            device: Device::Cpu,
            device_map: None,
        };
        let mut s = PolicySession::open(&spec)?;
        let r = best(&mut |seed| {
            let spec = RolloutSpec {
                prompts: prompts.clone(),
                n: N,
                max_new_tokens: NEW,
                sampling: sampling(),
                seed,
                stop: vec![],
                reference: false,
                logprobs,
            };
            Ok(s.rollout(&spec, &|| false)?.iter().map(|x| x.ids.len()).sum())
        })?;
        session_rows.push((name, r));
    }
    println!(
        "\nrollout benchmark: SmolLM2-135M-Instruct f32 on CPU ({} threads), {PROMPTS} prompts × {N} samples, ≤{NEW} new tokens, temperature 1.0, EOS stops; best of {REPEATS}\n",
        tch::get_num_threads()
    );
    println!("| engine | useful tokens | seconds | tokens/s | vs HF |");
    println!("|:--|--:|--:|--:|--:|");
    let hf_tps = hf.as_ref().ok().map(|h| h.0 as f64 / h.1);
    let line = |name: &str, (t, s): (usize, f64)| {
        let tps = t as f64 / s;
        let vs = hf_tps.map_or("—".into(), |h| format!("{:.2}×", tps / h));
        println!("| {name} | {t} | {s:.1} | {tps:.1} | {vs} |");
    };
    for (name, r) in rows.iter().chain(&session_rows) {
        line(name, *r);
    }
    match &hf {
        Ok(h) => line("HF generate(num_return_sequences=8)", *h),
        Err(e) => println!("\nHF side skipped: {e}"),
    }
    let tps = |r: (usize, f64)| r.0 as f64 / r.1;
    println!("\nQLoRA / LoRA session rollouts: {:.2}×", tps(session_rows[2].1) / tps(session_rows[0].1));
    Ok(())
}

fn hf(dir: &std::path::Path, prompts: &[Vec<u32>], eos: &[u32], pad: u32) -> Result<(usize, f64), String> {
    let python = std::env::var_os("FERROTUNE_DEV_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/ferrotune-dev/venv/bin/python")
    });
    if !python.exists() {
        return Err(format!("no Python with transformers at {} (scripts/dev-python.sh makes one)", python.display()));
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench_hf_rollout.py");
    let out = Command::new(&python)
        .arg(&script)
        .arg(dir)
        .arg(serde_json::to_string(prompts).map_err(|e| e.to_string())?)
        .arg(N.to_string())
        .arg(NEW.to_string())
        .arg(REPEATS.to_string())
        .arg(serde_json::to_string(eos).map_err(|e| e.to_string())?)
        .arg(pad.to_string())
        .output()
        .map_err(|e| format!("{}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "HF benchmark failed: {}",
            String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(out.stdout.trim_ascii()).map_err(|e| format!("bad HF output: {e}"))?;
    Ok((v["tokens"].as_u64().unwrap_or(0) as usize, v["seconds"].as_f64().unwrap_or(f64::NAN)))
}
