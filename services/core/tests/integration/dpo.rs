//! DPO: the losses and their gradients equal TRL's formulas on fixed log-probs
//! (`tests/fixtures/make_dpo.py`); the chunked two-pass backward equals plain autograd through full logits;
//! training with the loop raises the preference accuracy on a tiny model.

use std::path::Path;

use ferrotune_core::load_model;
use ferrotune_core::lora::{LoraConfig, Targets};
use ferrotune_core::train::dpo::{pair_loss, sequence_logps, DpoConfig, DpoExample, DpoLoss, DpoObjective, PairLogps};
use ferrotune_core::train::sft::{LoraState, SftExample};
use ferrotune_core::train::{train, Objective, Run, TrainConfig};
use ferrotune_core::CausalLm;
use tch::{Device, Kind, Tensor};

use crate::common::tiny_dir;

#[test]
fn losses_equal_trl_formulas() {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/dpo/trl-losses.json");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap();
    let pairs: Vec<PairLogps> = v["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            let f = |i: usize| x[i].as_f64().unwrap();
            PairLogps {
                chosen: f(0),
                rejected: f(1),
                ref_chosen: f(2),
                ref_rejected: f(3),
                chosen_tokens: f(4) as usize,
                rejected_tokens: f(5) as usize,
            }
        })
        .collect();
    let mut checked = 0;
    for case in v["cases"].as_array().unwrap() {
        let loss_type: DpoLoss = serde_json::from_value(case["loss_type"].clone()).unwrap();
        let cfg = DpoConfig {
            beta: case["beta"].as_f64().unwrap(),
            loss_type,
            label_smoothing: case["label_smoothing"].as_f64().unwrap(),
        };
        cfg.validate().unwrap();
        for (i, p) in pairs.iter().enumerate() {
            let got = pair_loss(p, &cfg);
            for (name, ours) in [
                ("loss", got.loss),
                ("d_chosen", got.d_chosen),
                ("d_rejected", got.d_rejected),
                ("reward_chosen", got.reward_chosen),
                ("reward_rejected", got.reward_rejected),
            ] {
                let want = case[name][i].as_f64().unwrap();
                assert!(
                    (ours - want).abs() <= 1e-12 * want.abs().max(1.0),
                    "{loss_type:?} β={} pair {i} {name}: {ours} vs TRL {want}",
                    cfg.beta
                );
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 8 * 4 * 5);
    assert!(DpoConfig { beta: 0.0, ..Default::default() }.validate().is_err());
    assert!(DpoConfig { loss_type: DpoLoss::Robust, label_smoothing: 0.5, ..Default::default() }.validate().is_err());
    assert!(
        DpoConfig { label_smoothing: 0.1, ..Default::default() }.validate().is_err(),
        "smoothing is for robust only"
    );
}

pub(crate) fn lora_model() -> CausalLm {
    let mut m = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    m.add_lora(
        &LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false },
        3,
    )
    .unwrap();
    let _g = tch::no_grad_guard();
    for (_, lin) in m.linears_mut() {
        let b = &mut lin.lora.as_mut().unwrap().b;
        let n = b.numel() as i64;
        let v = (Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.3).cos() * 0.05;
        b.copy_(&v.view(b.size().as_slice()));
    }
    m
}

/// Pairs sharing a prompt; completions of different lengths; reference log-probs from the adapter-free model.
pub(crate) fn pairs(m: &mut CausalLm, n: usize, seed: u64) -> Vec<DpoExample> {
    let mut x = seed;
    let mut next = || {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (x >> 33) as u32
    };
    let mut seq = |prompt: &[u32], len: usize| {
        let comp: Vec<u32> = (0..len).map(|_| 3 + next() % 250).collect();
        let ids: Vec<u32> = prompt.iter().chain(&comp).copied().collect();
        let labels = ids.iter().enumerate().map(|(i, &t)| if i < prompt.len() { -100 } else { t as i64 }).collect();
        SftExample::new(ids, labels)
    };
    let mut out = vec![];
    for i in 0..n {
        let prompt: Vec<u32> = (0..4 + i % 3).map(|k| 10 + ((seed as usize + 7 * i + k) % 200) as u32).collect();
        let (c, r) = (seq(&prompt, 3 + i % 4), seq(&prompt, 5 - i % 3));
        out.push(DpoExample { chosen: c, rejected: r, ref_chosen: 0.0, ref_rejected: 0.0 });
    }
    let seqs: Vec<&SftExample> = out.iter().flat_map(|e| [&e.chosen, &e.rejected]).collect();
    let refs = sequence_logps(&m.adapters_disabled(), &seqs, 0, 5).unwrap();
    for (i, e) in out.iter_mut().enumerate() {
        e.ref_chosen = refs[2 * i].0;
        e.ref_rejected = refs[2 * i + 1].0;
    }
    out
}

pub(crate) fn grads(m: &mut CausalLm) -> Vec<Tensor> {
    m.lora_tensors().iter().map(|(_, t)| t.grad().copy()).collect()
}

/// Summed completion log-prob of one sequence through the full logits, with gradients.
pub(crate) fn direct_logp(m: &CausalLm, e: &SftExample) -> Tensor {
    let ids = Tensor::from_slice(&e.input_ids.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
    let lp = m.forward(&ids, None, None).unwrap().log_softmax(-1, Kind::Float).squeeze_dim(0);
    let mut total = Tensor::zeros([], (Kind::Float, Device::Cpu));
    for t in 1..e.input_ids.len() {
        if e.labels[t] != -100 {
            total += lp.get(t as i64 - 1).get(e.input_ids[t] as i64);
        }
    }
    total
}

#[test]
fn chunked_backward_equals_autograd_through_full_logits() {
    let mut m = lora_model();
    let data = pairs(&mut m, 3, 5);
    let batch: Vec<&DpoExample> = data.iter().collect();
    for loss_type in [DpoLoss::Sigmoid, DpoLoss::Ipo, DpoLoss::Robust] {
        let cfg =
            DpoConfig { beta: 0.5, loss_type, label_smoothing: if loss_type == DpoLoss::Robust { 0.2 } else { 0.0 } };
        for (_, t) in m.lora_tensors() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let obj = DpoObjective::new(0, 4, cfg);
        let l = obj.backward(&m, &batch, 1.0 / 3.0).unwrap();
        let ours = grads(&mut m);
        for (_, t) in m.lora_tensors() {
            let _ = t.grad().zero_();
        }
        // The same loss written directly as TRL does, on full logits.
        let mut total = Tensor::zeros([], (Kind::Float, Device::Cpu));
        for e in &data {
            let (pc, pr) = (direct_logp(&m, &e.chosen), direct_logp(&m, &e.rejected));
            let (sc, sr) = (pc - e.ref_chosen, pr - e.ref_rejected);
            let b = cfg.beta;
            let loss = match loss_type {
                DpoLoss::Sigmoid => -(b * (&sc - &sr)).log_sigmoid(),
                DpoLoss::Robust => {
                    let e2 = cfg.label_smoothing;
                    (-(1.0 - e2) * (b * (&sc - &sr)).log_sigmoid() + e2 * (-b * (&sc - &sr)).log_sigmoid())
                        / (1.0 - 2.0 * e2)
                }
                DpoLoss::Ipo => {
                    let nc = e.chosen.labels.iter().skip(1).filter(|&&x| x != -100).count() as f64;
                    let nr = e.rejected.labels.iter().skip(1).filter(|&&x| x != -100).count() as f64;
                    (sc / nc - sr / nr - 1.0 / (2.0 * b)).square()
                }
                DpoLoss::Hinge => unreachable!(),
            };
            total += loss;
        }
        assert!(
            (total.double_value(&[]) - l.nll).abs() < 1e-4,
            "{loss_type:?}: loss {} vs {}",
            total.double_value(&[]),
            l.nll
        );
        (total / 3.0).backward();
        let direct = grads(&mut m);
        let (mut num, mut den) = (0f64, 0f64);
        for (a, b) in ours.iter().zip(&direct) {
            num += (a - b).square().sum(Kind::Double).double_value(&[]);
            den += b.square().sum(Kind::Double).double_value(&[]);
        }
        assert!(
            den > 0.0 && (num / den).sqrt() < 1e-4,
            "{loss_type:?}: relative gradient error {}",
            (num / den).sqrt()
        );
    }
}

#[test]
fn dpo_training_raises_preference_accuracy() {
    let mut m = lora_model();
    let data = pairs(&mut m, 6, 9);
    let t = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        learning_rate: 2e-2,
        max_steps: 25,
        micro_batch_size: 3,
        warmup_steps: 0,
        eval_steps: 25,
        seed: 1,
        ..TrainConfig::default()
    };
    let obj = DpoObjective::new(0, 16, DpoConfig { beta: 0.5, ..Default::default() });
    let state = LoraState {
        cfg: LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: Targets::AllLinear,
            use_rslora: false,
            use_dora: false,
        },
        base_model: "tiny".into(),
    };
    let tokens_of = |e: &DpoExample| e.chosen.input_ids.len() + e.rejected.input_ids.len();
    let before = {
        let _g = tch::no_grad_guard();
        obj.eval(&m, &data.iter().collect::<Vec<_>>()).unwrap();
        obj.take_metrics()
    };
    let run = Run {
        objective: &obj,
        train: &data,
        eval: &data,
        state: &state,
        cfg: &cfg,
        output_dir: t.path(),
        tokens_of: &tokens_of,
    };
    let mut last = Default::default();
    let s = train(&mut m, &run, false, &mut |ev| last = ev.metrics.clone(), &|| false).unwrap();
    let (acc0, acc1) = (before["eval_rewards/accuracies"], last["eval_rewards/accuracies"]);
    println!(
        "held-in preference accuracy {acc0} → {acc1}; margin {} → {}; loss → {}",
        before["eval_rewards/margins"], last["eval_rewards/margins"], s.final_loss
    );
    assert_eq!(acc1, 1.0);
    assert!(last["eval_rewards/margins"] > before["eval_rewards/margins"] + 0.5);
    assert!(s.final_eval_loss.unwrap() < 0.5 * std::f64::consts::LN_2);
    assert!(last.contains_key("rewards/chosen") && last.contains_key("logps/rejected"));
}
