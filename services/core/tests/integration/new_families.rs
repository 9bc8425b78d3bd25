//! Qwen3 and Gemma 3 beyond parity (which `tiny_models` and `kv_cache` check): LoRA and QLoRA train on them,
//! a trained adapter merges into a model that loads and gives the adapter's logits, and full fine-tuning
//! trains and saves every weight, the q/k norms and Gemma's feed-forward norms included.

use std::cell::Cell;

use ferrotune_core::load_model;
use ferrotune_core::lora::{LoraConfig, Targets};
use ferrotune_core::merge::merge_adapter;
use ferrotune_core::train::full::FullState;
use ferrotune_core::train::sft::{LoraState, SftExample, SftObjective};
use ferrotune_core::train::{train, Run, TrainConfig};
use ferrotune_core::CausalLm;
use tch::{Device, Kind, Tensor};

use crate::common::{max_abs_diff, tiny_dir};

const NAMES: [&str; 2] = ["qwen3-qknorm", "gemma3-window"];

fn data() -> Vec<SftExample> {
    (0..4u32)
        .map(|i| {
            let ids: Vec<u32> = (0..10).map(|j| 3 + (i * 37 + j * 11) % 250).collect();
            let labels = ids.iter().enumerate().map(|(k, &t)| if k < 4 { -100 } else { t as i64 }).collect();
            SftExample::new(ids, labels)
        })
        .collect()
}

/// Trains `m` for `steps` on [`data`] into `out`; returns (first loss, last loss).
fn fit(
    m: &mut CausalLm,
    state: &dyn ferrotune_core::train::TrainableState,
    out: &std::path::Path,
    steps: usize,
    lr: f64,
) -> (f64, f64) {
    let cfg = TrainConfig {
        learning_rate: lr,
        max_steps: steps,
        micro_batch_size: 4,
        warmup_steps: 1,
        seed: 3,
        lr_scheduler: ferrotune_core::train::schedule::ScheduleKind::Constant,
        ..TrainConfig::default()
    };
    let obj = SftObjective::new(0, &cfg);
    let data = data();
    let tokens_of = |e: &SftExample| e.input_ids.len();
    let run =
        Run { objective: &obj, train: &data, eval: &[], state, cfg: &cfg, output_dir: out, tokens_of: &tokens_of };
    let first = Cell::new(f64::NAN);
    let s = train(
        m,
        &run,
        false,
        &mut |ev| {
            if ev.step == 1 {
                first.set(ev.loss)
            }
        },
        &|| false,
    )
    .unwrap();
    (first.get(), s.final_loss)
}

fn lora(m: &mut CausalLm) -> LoraConfig {
    let cfg =
        LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false };
    m.add_lora(&cfg, 5).unwrap();
    cfg
}

#[test]
fn lora_trains_and_merges_into_a_model_with_the_adapters_logits() {
    for name in NAMES {
        lora_and_merge(name);
    }
}

fn lora_and_merge(name: &str) {
    lora_and_merge_dir(&tiny_dir(name), name)
}

/// LoRA on the model in `dir` lowers the loss, and the adapter merges into a model with its logits.
pub(crate) fn lora_and_merge_dir(dir: &std::path::Path, name: &str) {
    let t = tempfile::tempdir().unwrap();
    let mut m = load_model(dir, Kind::Float, Device::Cpu).unwrap();
    let cfg = lora(&mut m);
    let state = LoraState { cfg, base_model: "tiny".into() };
    let (first, last) = fit(&mut m, &state, &t.path().join("adapter"), 40, 3e-2);
    assert!(last < first - 0.3, "{name}: LoRA loss {first} → {last}");
    merge_adapter(dir, &t.path().join("adapter"), &t.path().join("merged"), Some(false)).unwrap();
    let merged = load_model(&t.path().join("merged"), Kind::Float, Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[5i64, 9, 77, 3, 41, 100]).unsqueeze(0);
    let (a, b) = tch::no_grad(|| (m.forward(&ids, None, None).unwrap(), merged.forward(&ids, None, None).unwrap()));
    let d = max_abs_diff(&a, &b);
    assert!(d < 1e-5, "{name}: merged vs adapter: max |Δlogit| {d}");
}

#[test]
fn qlora_trains_on_the_nf4_base() {
    for name in NAMES {
        qlora(name);
    }
}

fn qlora(name: &str) {
    let t = tempfile::tempdir().unwrap();
    let mut m = load_model(&tiny_dir(name), Kind::Float, Device::Cpu).unwrap();
    m.quantize_nf4().unwrap();
    let cfg = lora(&mut m);
    let state = LoraState { cfg, base_model: "tiny".into() };
    let (first, last) = fit(&mut m, &state, t.path(), 40, 3e-2);
    assert!(last < first - 0.3, "{name}: QLoRA loss {first} → {last}");
}

#[test]
fn full_fine_tuning_trains_and_saves_every_norm() {
    for name in NAMES {
        full(name);
    }
}

fn full(name: &str) {
    let t = tempfile::tempdir().unwrap();
    let mut m = load_model(&tiny_dir(name), Kind::Float, Device::Cpu).unwrap();
    FullState::prepare(&mut m).unwrap();
    let state = FullState { base_dir: tiny_dir(name) };
    let (first, last) = fit(&mut m, &state, &t.path().join("full"), 12, 3e-3);
    assert!(last < first, "{name}: full fine-tuning loss {first} → {last}");
    let base = load_model(&tiny_dir(name), Kind::Float, Device::Cpu).unwrap();
    let (q0, _) = base.layers[0].self_attn.qk_norm.as_ref().unwrap();
    let (q1, _) = m.layers[0].self_attn.qk_norm.as_ref().unwrap();
    assert!((&q0.weight - q1.weight.detach()).abs().max().double_value(&[]) > 1e-5, "{name}: q_norm did not move");
    let saved = load_model(&t.path().join("full"), Kind::Float, Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[5i64, 9, 77, 3]).unsqueeze(0);
    let (a, b) = tch::no_grad(|| (m.forward(&ids, None, None).unwrap(), saved.forward(&ids, None, None).unwrap()));
    assert_eq!(max_abs_diff(&a, &b), 0.0, "{name}: the saved model is the trained one, every norm included");
}
