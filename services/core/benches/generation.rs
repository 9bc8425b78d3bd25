//! Generation throughput on the default model (SmolLM2-135M-Instruct, f32 and bf16, CPU, greedy, 128 new tokens,
//! EOS ignored so every run makes exactly 128), at batch 1 and 8, side by side with HF transformers'
//! `generate` on the same model dir and settings when a Python with transformers is available
//! (`FERROTUNE_DEV_PYTHON`, else `~/.cache/ferrotune-dev/venv/bin/python`); skipped with a message otherwise.
//! Also measures this machine's memory read bandwidth, whose ratio to the weight bytes bounds batch-1 speed.
//!
//! Run: `make bench` (or `cargo bench -p ferrotune-core --bench generation`).

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use ferrotune_core::{generate, registry, GenerateOptions, Message, ModelBundle, SamplingParams};
use tch::{Device, Kind, Tensor};

const NEW: usize = 128;
const BATCHES: [usize; 2] = [1, 8];
/// Runs per setting, best kept (for ferrotune and HF alike): this machine's timings vary by ~10%.
const REPEATS: usize = 3;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = registry::pull(registry::DEFAULT_MODEL)?;
    let bw = read_bandwidth();
    let mut rows = Vec::new();
    let mut prompt_len = 0;
    let mut skipped = None;
    for (kind, dtype) in [(Kind::Float, "f32"), (Kind::BFloat16, "bf16")] {
        let b = ModelBundle::load(&dir, kind, Device::Cpu)?;
        let prompt =
            b.chat_prompt(&[Message::new("user", "Tell me a long story about a dragon who learns to paint.")])?;
        prompt_len = prompt.len();
        let ours = ferrotune_tokens_per_s(&b, &prompt)?;
        let bound = bw / param_bytes(&b) as f64;
        let hf = hf_tokens_per_s(&dir, &prompt, dtype);
        for (i, &n) in BATCHES.iter().enumerate() {
            let (h, r) = match &hf {
                Ok(v) => (format!("{:.1}", v[i]), format!("{:.2}×", ours[i] / v[i])),
                Err(e) => {
                    skipped = Some(e.clone());
                    ("—".into(), "—".into())
                }
            };
            let pct = if n == 1 { format!("{:.0}% of {:.0}", 100.0 * ours[i] / bound, bound) } else { String::new() };
            rows.push(format!("| {dtype} | {n} | {:.1} | {h} | {r} | {pct} |", ours[i]));
        }
    }
    println!("\ngeneration benchmark: SmolLM2-135M-Instruct on CPU ({} threads), greedy, prompt {prompt_len} tokens, {NEW} new tokens (EOS ignored)", tch::get_num_threads());
    println!(
        "memory read bandwidth {:.1} GB/s (best streaming sum over 1 GiB); batch-1 bound = bandwidth / weight bytes\n",
        bw / 1e9
    );
    println!("| dtype | batch | ferrotune tokens/s | HF generate tokens/s | ratio | batch-1 % of bound (tokens/s) |");
    println!("|:-----|------:|-------------------:|---------------------:|------:|------------------------------:|");
    for r in rows {
        println!("{r}");
    }
    if let Some(e) = skipped {
        println!("\nHF side skipped: {e}");
    }
    Ok(())
}

/// Tokens/s for each batch size in [`BATCHES`] (best of [`REPEATS`]), after one short warm-up run.
fn ferrotune_tokens_per_s(b: &ModelBundle, prompt: &[u32]) -> Result<Vec<f64>, Box<dyn std::error::Error>> {
    let opts = GenerateOptions {
        max_new_tokens: NEW,
        sampling: SamplingParams::default(),
        seed: 0,
        eos_ids: vec![],
        stop_strings: vec![],
        pad_id: b.defaults.pad_id,
    };
    generate(
        &b.model,
        &b.tokenizer,
        &[prompt.to_vec()],
        &GenerateOptions { max_new_tokens: 4, ..opts.clone() },
        &mut |_| {},
    )?;
    let mut out = Vec::new();
    for &n in &BATCHES {
        let prompts = vec![prompt.to_vec(); n];
        let mut best = f64::MAX;
        for _ in 0..REPEATS {
            let start = Instant::now();
            let res = generate(&b.model, &b.tokenizer, &prompts, &opts, &mut |_| {})?;
            best = best.min(start.elapsed().as_secs_f64());
            assert!(res.iter().all(|g| g.ids.len() == NEW));
        }
        out.push((n * NEW) as f64 / best);
    }
    Ok(out)
}

/// Bytes of weights a decoding step reads (the tied embedding counted once, as lm_head).
fn param_bytes(b: &ModelBundle) -> i64 {
    let m = &b.model;
    let t = |x: &Tensor| x.numel() as i64 * x.kind().elt_size_in_bytes() as i64;
    let mut n = t(&m.lm_head) + t(&m.norm.weight);
    for l in &m.layers {
        for lin in [
            &l.self_attn.q_proj,
            &l.self_attn.k_proj,
            &l.self_attn.v_proj,
            &l.self_attn.o_proj,
            &l.mlp.gate_proj,
            &l.mlp.up_proj,
            &l.mlp.down_proj,
        ] {
            let (o, i) = lin.dims();
            n += o * i * m.kind().elt_size_in_bytes() as i64;
        }
        n += t(&l.input_layernorm.weight) + t(&l.post_attention_layernorm.weight);
    }
    n
}

/// Sustained read bandwidth (bytes/s): the best of several sums over a 1 GiB f32 tensor.
fn read_bandwidth() -> f64 {
    let x = Tensor::ones([1 << 28], (Kind::Float, Device::Cpu));
    let mut best = f64::MAX;
    for _ in 0..10 {
        let start = Instant::now();
        let _ = x.sum(Kind::Float).double_value(&[]);
        best = best.min(start.elapsed().as_secs_f64());
    }
    (1u64 << 30) as f64 / best
}

fn hf_tokens_per_s(dir: &std::path::Path, prompt: &[u32], dtype: &str) -> Result<Vec<f64>, String> {
    let python = std::env::var_os("FERROTUNE_DEV_PYTHON").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/ferrotune-dev/venv/bin/python")
    });
    if !python.exists() {
        return Err(format!(
            "no Python with transformers at {} (run scripts/dev-python.sh or set FERROTUNE_DEV_PYTHON)",
            python.display()
        ));
    }
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/bench_hf_generate.py");
    let ids = serde_json::to_string(prompt).map_err(|e| e.to_string())?;
    let mut cmd = Command::new(&python);
    cmd.arg(&script).arg(dir).arg(dtype).arg(ids).arg(NEW.to_string()).arg(REPEATS.to_string());
    for n in BATCHES {
        cmd.arg(n.to_string());
    }
    let out = cmd.output().map_err(|e| format!("{}: {e}", python.display()))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        return Err(format!("HF benchmark failed: {}", err.lines().last().unwrap_or("")));
    }
    let v: serde_json::Value =
        serde_json::from_slice(out.stdout.trim_ascii()).map_err(|e| format!("bad HF output: {e}"))?;
    BATCHES.iter().map(|n| v[n.to_string()].as_f64().ok_or_else(|| format!("HF output lacks batch {n}"))).collect()
}
