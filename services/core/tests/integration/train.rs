//! The training loop on a tiny model: chunked loss = plain loss (values and gradients), gradient
//! accumulation = one big batch, an interrupted-and-resumed run = an uninterrupted one (bit for bit), the
//! loss goes down, and bad hyperparameters are rejected.

use std::cell::Cell;

use ferrotune_core::load_model;
use ferrotune_core::lora::{LoraConfig, Targets};
use ferrotune_core::train::loss::{causal_lm_loss, causal_lm_loss_backward};
use ferrotune_core::train::sft::{LoraState, SftExample, SftObjective};
use ferrotune_core::train::{train, Run, TrainConfig};
use ferrotune_core::CausalLm;
use tch::{Device, Kind, Tensor};

use crate::common::tiny_dir;

fn examples(n: usize, seed: u64) -> Vec<SftExample> {
    let mut x = seed;
    let mut next = || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 33) as u32
    };
    (0..n)
        .map(|_| {
            let len = 6 + (next() % 9) as usize;
            let ids: Vec<u32> = (0..len).map(|_| 3 + next() % 250).collect();
            let labels = ids.iter().enumerate().map(|(i, &t)| if i < len / 2 { -100 } else { t as i64 }).collect();
            SftExample::new(ids, labels)
        })
        .collect()
}

fn lora_model(dropout: f64) -> (CausalLm, LoraConfig) {
    let mut m = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    let cfg = LoraConfig { r: 4, alpha: 8.0, dropout, targets: Targets::AllLinear, use_rslora: false, use_dora: false };
    m.add_lora(&cfg, 7).unwrap();
    // B = 0 at init makes A's gradient zero on the first step; perturb (deterministically, without the
    // process-global generator other tests use concurrently) so both get gradients.
    let _g = tch::no_grad_guard();
    for (_, lin) in m.linears_mut() {
        let b = &mut lin.lora.as_mut().unwrap().b;
        let n = b.numel() as i64;
        let v = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.7).sin() * 0.02;
        b.copy_(&v.view(b.size().as_slice()));
    }
    drop(_g);
    (m, cfg)
}

fn grads(m: &mut CausalLm) -> Vec<Tensor> {
    m.lora_tensors().iter().map(|(_, t)| t.grad().copy()).collect()
}

fn zero(m: &mut CausalLm) {
    for (_, t) in m.lora_tensors() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

#[test]
fn chunked_loss_equals_plain_cross_entropy() {
    let (mut m, _) = lora_model(0.0);
    let ex = examples(3, 1);
    let obj = SftObjective { pad_id: 0, chunk: 5, gradient_checkpointing: false };
    let refs: Vec<&SftExample> = ex.iter().collect();
    let units: usize = ex.iter().map(|e| e.trained_tokens()).sum();
    // chunked (5 rows at a time)
    use ferrotune_core::train::Objective;
    let got = obj.backward(&m, &refs, 1.0 / units as f64).unwrap();
    let g1 = grads(&mut m);
    zero(&mut m);
    // plain: one example at a time, full logits, mean over all trained tokens
    let mut total = 0.0;
    for e in &ex {
        let ids = Tensor::from_slice(&e.input_ids.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
        let labels = Tensor::from_slice(&e.labels);
        let logits = m.forward(&ids, None, None).unwrap().get(0).to_kind(Kind::Float);
        let lp = logits.narrow(0, 0, ids.size()[1] - 1).log_softmax(-1, Kind::Float);
        let tgt = labels.narrow(0, 1, ids.size()[1] - 1);
        let keep = tgt.ne(-100);
        let nll = -(lp.gather(1, &tgt.clamp_min(0).unsqueeze(1), false).squeeze_dim(1) * keep.to_kind(Kind::Float))
            .sum(Kind::Float);
        total += nll.double_value(&[]);
        (nll / units as f64).backward();
    }
    let g2 = grads(&mut m);
    assert_eq!(got.tokens, units);
    assert!((got.nll - total).abs() < 1e-4 * total, "{} vs {total}", got.nll);
    for (a, b) in g1.iter().zip(&g2) {
        let d = (a - b).abs().max().double_value(&[]);
        assert!(d < 1e-6, "gradient differs by {d}");
    }
    // eval path agrees too
    let hidden_ids = Tensor::from_slice(&ex[0].input_ids.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
    let h = m.forward_hidden(&hidden_ids, None, None).unwrap();
    let e = causal_lm_loss(&m, &h, &Tensor::from_slice(&ex[0].labels).unsqueeze(0), 2).unwrap();
    let b = causal_lm_loss_backward(&m, &h, &Tensor::from_slice(&ex[0].labels).unsqueeze(0), 0.0, 64).unwrap();
    assert!((e.nll - b.nll).abs() < 1e-6 * e.nll && e.tokens == b.tokens);
}

fn cfg(steps: usize, mb: usize, accum: usize) -> TrainConfig {
    TrainConfig {
        learning_rate: 1e-2,
        max_steps: steps,
        micro_batch_size: mb,
        gradient_accumulation_steps: accum,
        warmup_steps: 1,
        seed: 11,
        save_total_limit: 5,
        loss_chunk_tokens: 7,
        ..TrainConfig::default()
    }
}

fn run_training(
    m: &mut CausalLm,
    lcfg: &LoraConfig,
    cfg: &TrainConfig,
    data: &[SftExample],
    out: &std::path::Path,
    resume: bool,
    stop_after: Option<usize>,
) -> ferrotune_core::train::TrainSummary {
    let obj = SftObjective::new(0, cfg);
    let state = LoraState { cfg: lcfg.clone(), base_model: "tiny".into() };
    let tokens_of = |e: &SftExample| e.input_ids.len();
    let run = Run {
        objective: &obj,
        train: data,
        eval: &data[..2],
        state: &state,
        cfg,
        output_dir: out,
        tokens_of: &tokens_of,
    };
    let done = Cell::new(0usize);
    train(m, &run, resume, &mut |_| done.set(done.get() + 1), &|| stop_after.is_some_and(|s| done.get() >= s)).unwrap()
}

/// The steps `metrics.jsonl` in `dir` records, in order.
fn metric_steps(dir: &std::path::Path) -> Vec<u64> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect()
}

fn adapter_bytes(dir: &std::path::Path) -> Vec<u8> {
    std::fs::read(dir.join("adapter_model.safetensors")).unwrap()
}

#[test]
fn accumulated_micro_batches_equal_one_big_batch() {
    let data = examples(8, 2);
    let t = tempfile::tempdir().unwrap();
    let (mut a, lcfg) = lora_model(0.0);
    run_training(&mut a, &lcfg, &cfg(2, 4, 1), &data, &t.path().join("big"), false, None);
    let (mut b, _) = lora_model(0.0);
    run_training(&mut b, &lcfg, &cfg(2, 1, 4), &data, &t.path().join("acc"), false, None);
    let (ta, tb) = (a.lora_tensors(), b.lora_tensors());
    let mut worst: f64 = 0.0;
    for ((_, x), (_, y)) in ta.iter().zip(&tb) {
        worst = worst.max((x - y).abs().max().double_value(&[]));
    }
    assert!(worst < 1e-6, "accumulation differs from one batch by {worst}");
    let (mut init, _) = lora_model(0.0);
    let moved = init
        .lora_tensors()
        .iter()
        .zip(&ta)
        .map(|((_, x), (_, y))| (x - y).abs().max().double_value(&[]))
        .fold(0.0, f64::max);
    assert!(moved > 1e-3, "training must move the adapter (moved {moved})");
    // And averaging per micro-batch instead (the known trap) would differ: lengths vary.
    let units: Vec<usize> = data[..4].iter().map(|e| e.trained_tokens()).collect();
    assert!(units.iter().any(|&u| u != units[0]), "examples must differ in trained tokens for this test to bite");
}

#[test]
fn killed_and_resumed_run_equals_uninterrupted_run() {
    let data = examples(10, 3);
    let t = tempfile::tempdir().unwrap();
    let mut c = cfg(6, 2, 2);
    c.save_steps = 2;
    let (mut a, lcfg) = lora_model(0.1);
    let full = run_training(&mut a, &lcfg, &c, &data, &t.path().join("full"), false, None);
    // Interrupted after step 3 (the last checkpoint is step 2), then a fresh process resumes.
    let (mut b, _) = lora_model(0.1);
    let part = run_training(&mut b, &lcfg, &c, &data, &t.path().join("resumed"), false, Some(3));
    assert!(part.stopped && part.position.step == 3);
    assert!(t.path().join("resumed/checkpoints/step-00000003").exists(), "stopping checkpoints the current step");
    drop(b);
    let (mut b2, _) = lora_model(0.1);
    let rest = run_training(&mut b2, &lcfg, &c, &data, &t.path().join("resumed"), true, None);
    assert_eq!(rest.position, full.position);
    for step in ["step-00000002", "step-00000004", "step-00000006"] {
        let (a, b) = (t.path().join("full/checkpoints").join(step), t.path().join("resumed/checkpoints").join(step));
        assert!(adapter_bytes(&a) == adapter_bytes(&b), "adapters differ at {step}");
        let (oa, ob) = (
            std::fs::read(a.join("optimizer.safetensors")).unwrap(),
            std::fs::read(b.join("optimizer.safetensors")).unwrap(),
        );
        assert!(oa == ob, "optimizer states differ at {step}");
    }
    assert!(adapter_bytes(&t.path().join("full")) == adapter_bytes(&t.path().join("resumed")), "final adapters differ");
    assert_eq!(rest.final_loss.to_bits(), full.final_loss.to_bits());
    assert_eq!(metric_steps(&t.path().join("resumed")), vec![1, 2, 3, 4, 5, 6], "metrics read as one run");
    let ckpts: Vec<_> = std::fs::read_dir(t.path().join("full/checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(ckpts.contains(&"step-00000006".to_string()) && !ckpts.iter().any(|n| n.contains("tmp")), "{ckpts:?}");
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

#[test]
fn resume_skips_a_corrupt_newest_checkpoint_and_another_runs_checkpoints() {
    use ferrotune_core::train::run_dir;
    let data = examples(10, 3);
    let t = tempfile::tempdir().unwrap();
    let mut c = cfg(6, 2, 2);
    c.save_steps = 2;
    let (full_dir, dir, other_dir) = (t.path().join("full"), t.path().join("resumed"), t.path().join("other"));
    run_dir::claim(&full_dir, false, false, "full").unwrap();
    let (mut a, lcfg) = lora_model(0.1);
    run_training(&mut a, &lcfg, &c, &data, &full_dir, false, None);
    // Another run's checkpoint, planted in the directory under a later step than any of this run's.
    run_dir::claim(&other_dir, false, false, "other").unwrap();
    let (mut o, _) = lora_model(0.1);
    run_training(&mut o, &lcfg, &cfg(2, 2, 2), &data, &other_dir, false, Some(2));
    // This run: stopped after step 5 (checkpoints 2, 4 and 5); the newest one is then damaged.
    run_dir::claim(&dir, false, false, "mine").unwrap();
    let (mut b, _) = lora_model(0.1);
    let part = run_training(&mut b, &lcfg, &c, &data, &dir, false, Some(5));
    assert!(part.stopped && part.position.step == 5);
    copy_dir(&other_dir.join("checkpoints/step-00000002"), &dir.join("checkpoints/step-00000099"));
    let newest = dir.join("checkpoints/step-00000005/adapter_model.safetensors");
    let bytes = std::fs::read(&newest).unwrap();
    std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
    // Resuming falls back to step 4, ignores step 99, and ends exactly where the uninterrupted run did.
    assert_eq!(run_dir::claim(&dir, true, false, "new-job").unwrap(), "mine");
    let (mut b2, _) = lora_model(0.1);
    let rest = run_training(&mut b2, &lcfg, &c, &data, &dir, true, None);
    assert_eq!(rest.position.step, 6);
    assert!(adapter_bytes(&full_dir) == adapter_bytes(&dir), "resumed from the wrong checkpoint");
    assert_eq!(metric_steps(&dir), vec![1, 2, 3, 4, 5, 6], "metrics read as one run");
    // The other run's checkpoint was neither restored nor pruned.
    assert!(dir.join("checkpoints/step-00000099").is_dir());
}

#[test]
fn loss_goes_down_when_memorising() {
    let data = examples(4, 4);
    let t = tempfile::tempdir().unwrap();
    let (mut m, lcfg) = lora_model(0.0);
    let mut c = cfg(60, 4, 1);
    c.learning_rate = 5e-2;
    c.lr_scheduler = ferrotune_core::train::schedule::ScheduleKind::Constant;
    let first = Cell::new(f64::NAN);
    let obj = SftObjective { pad_id: 0, chunk: 64, gradient_checkpointing: false };
    let state = LoraState { cfg: lcfg.clone(), base_model: "tiny".into() };
    let tokens_of = |e: &SftExample| e.input_ids.len();
    let run = Run {
        objective: &obj,
        train: &data,
        eval: &[],
        state: &state,
        cfg: &c,
        output_dir: t.path(),
        tokens_of: &tokens_of,
    };
    let s = train(
        &mut m,
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
    // A tiny random model with LoRA r=4 can move its near-uniform logits only so far (tied 0.02-scale
    // embeddings): the loss must fall clearly, not to zero. The optimizer itself is checked against torch.
    assert!(s.final_loss < first.get() - 0.4, "loss {} → {}", first.get(), s.final_loss);
    assert!(t.path().join("adapter_config.json").exists() && t.path().join("metrics.jsonl").exists());
}

#[test]
fn absurd_hyperparameters_are_rejected() {
    let ok = TrainConfig::default();
    for (bad, field) in [
        (TrainConfig { learning_rate: -1.0, ..ok.clone() }, "learning_rate"),
        (TrainConfig { max_steps: 0, ..ok.clone() }, "max_steps"),
        (TrainConfig { micro_batch_size: 0, ..ok.clone() }, "micro_batch_size"),
        (TrainConfig { warmup_steps: 100, max_steps: 10, ..ok.clone() }, "warmup_steps"),
        (TrainConfig { adam_beta2: 1.0, ..ok.clone() }, "adam"),
    ] {
        let e = bad.validate().unwrap_err().to_string();
        assert!(e.contains(field), "{e}");
    }
}

#[test]
fn checkpointed_backward_equals_plain_backward_with_dropout() {
    use ferrotune_core::train::Objective;
    let ex = examples(3, 9);
    let refs: Vec<&SftExample> = ex.iter().collect();
    let run = |gc: bool| {
        let (mut m, _) = lora_model(0.2);
        m.set_training(true);
        m.set_dropout_seed(77);
        let obj = SftObjective { pad_id: 0, chunk: 8, gradient_checkpointing: gc };
        let l = obj.backward(&m, &refs, 0.1).unwrap();
        (l, grads(&mut m))
    };
    let (l1, g1) = run(false);
    let (l2, g2) = run(true);
    assert!((l1.nll - l2.nll).abs() < 1e-9 * l1.nll.abs().max(1.0), "{} vs {}", l1.nll, l2.nll);
    let worst = g1.iter().zip(&g2).map(|(a, b)| (a - b).abs().max().double_value(&[])).fold(0.0, f64::max);
    assert!(worst < 1e-6, "checkpointed gradients differ by {worst}");
    assert!(g1.iter().all(|g| g.abs().sum(Kind::Float).double_value(&[]) > 0.0), "every adapter gets a gradient");
}

fn full_run(
    out: &std::path::Path,
    steps: usize,
    resume: bool,
    stop_after: Option<usize>,
) -> (CausalLm, ferrotune_core::train::TrainSummary, Vec<f64>) {
    use ferrotune_core::train::full::FullState;
    let dir = tiny_dir("qwen2-bias");
    let mut m = load_model(&dir, Kind::Float, Device::Cpu).unwrap();
    FullState::prepare(&mut m).unwrap();
    let data = examples(6, 5);
    let mut c = cfg(steps, 3, 1);
    c.learning_rate = 3e-3;
    c.save_steps = 2;
    c.weight_decay = 0.01;
    let obj = SftObjective::new(0, &c);
    let state = FullState { base_dir: dir };
    let tokens_of = |e: &SftExample| e.input_ids.len();
    let run = Run {
        objective: &obj,
        train: &data,
        eval: &[],
        state: &state,
        cfg: &c,
        output_dir: out,
        tokens_of: &tokens_of,
    };
    let losses = std::cell::RefCell::new(vec![]);
    let done = Cell::new(0usize);
    let s = train(
        &mut m,
        &run,
        resume,
        &mut |ev| {
            losses.borrow_mut().push(ev.loss);
            done.set(done.get() + 1);
        },
        &|| stop_after.is_some_and(|n| done.get() >= n),
    )
    .unwrap();
    (m, s, losses.into_inner())
}

#[test]
fn full_fine_tuning_trains_every_weight_and_saves_a_loadable_model() {
    let t = tempfile::tempdir().unwrap();
    let (m, _, losses) = full_run(&t.path().join("full"), 12, false, None);
    assert!(losses[11] < losses[0] - 1.0, "full fine-tuning loss {} → {}", losses[0], losses[11]);
    // The output dir is a HF model dir that loads to the same network.
    let saved = load_model(&t.path().join("full"), Kind::Float, Device::Cpu).unwrap();
    let ids = Tensor::from_slice(&[5i64, 9, 77, 3, 41]).unsqueeze(0);
    let (a, b) = tch::no_grad(|| (m.forward(&ids, None, None).unwrap(), saved.forward(&ids, None, None).unwrap()));
    assert_eq!((a - b).abs().max().double_value(&[]), 0.0);
    let base = load_model(&tiny_dir("qwen2-bias"), Kind::Float, Device::Cpu).unwrap();
    let moved = base.layers[1].mlp.down_proj.dense_weight().unwrap()
        - m.layers[1].mlp.down_proj.dense_weight().unwrap().detach();
    assert!(moved.abs().max().double_value(&[]) > 1e-4, "weights moved");
    // Resume from a checkpoint ends where the uninterrupted run ends.
    let (_, part, _) = full_run(&t.path().join("resumed"), 12, false, Some(5));
    assert!(part.stopped);
    let (_, rest, _) = full_run(&t.path().join("resumed"), 12, true, None);
    assert_eq!(rest.position.step, 12);
    assert!(
        std::fs::read(t.path().join("full/model.safetensors")).unwrap()
            == std::fs::read(t.path().join("resumed/model.safetensors")).unwrap(),
        "resumed full fine-tune differs"
    );
    // NF4 weights cannot be fully fine-tuned.
    let mut q = load_model(&tiny_dir("qwen2-bias"), Kind::Float, Device::Cpu).unwrap();
    q.quantize_nf4().unwrap();
    assert!(ferrotune_core::train::full::FullState::prepare(&mut q).unwrap_err().to_string().contains("NF4"));
}

#[test]
fn packed_rows_give_the_loss_and_gradients_of_unpacked_examples() {
    use ferrotune_core::train::Objective;
    let ex = examples(5, 21);
    let refs: Vec<&SftExample> = ex.iter().collect();
    let units: usize = ex.iter().map(|e| e.trained_tokens()).sum();
    let packed = [SftExample::pack(&refs[..3]), SftExample::pack(&refs[3..])];
    assert_eq!(packed.iter().map(|e| e.trained_tokens()).sum::<usize>(), units, "packing keeps the trained tokens");
    let packed_refs: Vec<&SftExample> = packed.iter().collect();
    for gc in [false, true] {
        let obj = SftObjective { pad_id: 0, chunk: 16, gradient_checkpointing: gc };
        let (mut a, _) = lora_model(0.0);
        let la = obj.backward(&a, &refs, 1.0 / units as f64).unwrap();
        let (mut b, _) = lora_model(0.0);
        let lb = obj.backward(&b, &packed_refs, 1.0 / units as f64).unwrap();
        assert_eq!(la.tokens, lb.tokens);
        assert!((la.nll - lb.nll).abs() < 1e-4, "checkpointing {gc}: unpacked {} vs packed {}", la.nll, lb.nll);
        let worst = grads(&mut a)
            .iter()
            .zip(&grads(&mut b))
            .map(|(x, y)| (x - y).abs().max().double_value(&[]))
            .fold(0.0, f64::max);
        assert!(worst < 1e-5, "checkpointing {gc}: gradients differ by {worst}");
    }
    // Without the segment mask (plain concatenation) samples would see each other: the loss changes.
    let mut concat = packed[0].clone();
    concat.segment_ids.clear();
    let obj = SftObjective { pad_id: 0, chunk: 16, gradient_checkpointing: false };
    let (m, _) = lora_model(0.0);
    let l_concat = obj.eval(&m, &[&concat]).unwrap();
    let l_packed = obj.eval(&m, &[&packed[0]]).unwrap();
    assert!((l_concat.nll - l_packed.nll).abs() > 1e-3, "cross-sample attention must matter for this test to bite");
}

#[test]
fn prompt_tuning_trains_only_the_virtual_tokens() {
    use ferrotune_core::prompt_tuning::{PromptInit, PromptState, PromptTuningConfig};
    use ferrotune_core::train::Objective;
    let data = examples(4, 8);
    let t = tempfile::tempdir().unwrap();
    let mut m = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    m.add_prompt_tuning(&PromptTuningConfig { num_virtual_tokens: 5, init: PromptInit::Random }, None, 3).unwrap();
    let before = m.prompt_embeddings.as_ref().unwrap().copy();
    // checkpointed and plain backward agree on the prompt's gradient
    let refs: Vec<&SftExample> = data.iter().collect();
    let grad = |gc: bool, m: &CausalLm| {
        let p = m.prompt_embeddings.as_ref().unwrap();
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
        SftObjective { pad_id: 0, chunk: 8, gradient_checkpointing: gc }.backward(m, &refs, 0.1).unwrap();
        p.grad().copy()
    };
    let (g1, g2) = (grad(false, &m), grad(true, &m));
    assert!((&g1 - &g2).abs().max().double_value(&[]) < 1e-6 && g1.abs().sum(Kind::Float).double_value(&[]) > 0.0);
    // Prompt tuning wants a large learning rate (Lester et al. use 0.3).
    let mut c = cfg(30, 4, 1);
    c.learning_rate = 0.3;
    c.lr_scheduler = ferrotune_core::train::schedule::ScheduleKind::Constant;
    let obj = SftObjective::new(0, &c);
    let state = PromptState { init: PromptInit::Random, base_model: "tiny".into() };
    let tokens_of = |e: &SftExample| e.input_ids.len();
    let run = Run {
        objective: &obj,
        train: &data,
        eval: &[],
        state: &state,
        cfg: &c,
        output_dir: t.path(),
        tokens_of: &tokens_of,
    };
    let first = Cell::new(f64::NAN);
    let s = train(
        &mut m,
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
    // A 2-layer random model attends almost uniformly, so a prefix moves its outputs only a little.
    assert!(s.final_loss < first.get() - 0.1, "prompt tuning loss {} → {}", first.get(), s.final_loss);
    assert!((m.prompt_embeddings.as_ref().unwrap() - before).abs().max().double_value(&[]) > 1e-3);
    let files =
        ferrotune_core::weights::WeightFiles::open_files(&[t.path().join("adapter_model.safetensors")]).unwrap();
    assert_eq!(files.names().collect::<Vec<_>>(), vec!["prompt_embeddings"]);
}

#[test]
fn f16_compute_scales_the_loss_and_skips_overflowing_steps() {
    let data = examples(4, 4);
    let t = tempfile::tempdir().unwrap();
    let mut m = load_model(&tiny_dir("llama3-rope"), Kind::Half, Device::Cpu).unwrap();
    let lcfg =
        LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false };
    m.add_lora(&lcfg, 7).unwrap();
    let mut c = cfg(40, 4, 1);
    c.learning_rate = 5e-2;
    c.lr_scheduler = ferrotune_core::train::schedule::ScheduleKind::Constant;
    // Far above what f16 gradients can hold: the first steps overflow, are skipped, and the scale halves.
    c.init_loss_scale = 2f64.powi(40);
    let events = std::cell::RefCell::new(vec![]);
    let obj = SftObjective { pad_id: 0, chunk: 64, gradient_checkpointing: false };
    let state = LoraState { cfg: lcfg.clone(), base_model: "tiny".into() };
    let tokens_of = |e: &SftExample| e.input_ids.len();
    let run = Run {
        objective: &obj,
        train: &data,
        eval: &[],
        state: &state,
        cfg: &c,
        output_dir: t.path(),
        tokens_of: &tokens_of,
    };
    train(
        &mut m,
        &run,
        false,
        &mut |ev| events.borrow_mut().push((ev.loss_scale.unwrap(), ev.skipped, ev.loss)),
        &|| false,
    )
    .unwrap();
    let ev = events.into_inner();
    assert!(ev[0].1, "2^40 must overflow f16 gradients");
    assert_eq!(ev[0].0, 2f64.powi(40));
    let first_ok = ev.iter().position(|e| !e.1).expect("the scale backs off until gradients are finite");
    for w in ev[..=first_ok].windows(2) {
        assert_eq!(w[1].0, w[0].0 / 2.0, "each skipped step halves the scale");
    }
    assert!(ev[first_ok..].iter().all(|e| !e.1 && e.0 == ev[first_ok].0), "no overflow once the scale fits: {ev:?}");
    let (start, end) = (ev[first_ok].2, ev.last().unwrap().2);
    assert!(end < start - 0.2, "f16 training learns: loss {start} → {end}");
}
