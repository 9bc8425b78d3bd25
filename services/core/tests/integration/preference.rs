//! ORPO, SimPO and KTO: batch losses and gradients equal TRL 1.16's own code on fixed log-probs
//! (`tests/fixtures/make_pref_losses.py` calls ORPOTrainer.odds_ratio_loss, CPOTrainer.cpo_loss and
//! KTOTrainer._compute_loss); the chunked two-pass backward equals autograd through full logits on a tiny
//! model (ORPO's NLL over the whole chosen sequence included); training raises the preference accuracy.

use std::path::Path;

use ferrotune_core::lora::{LoraConfig, Targets};
use ferrotune_core::train::kto::{kto_batch, mismatched, KtoConfig, KtoExample, KtoLogps, KtoLoss, KtoObjective};
use ferrotune_core::train::ref_free::{orpo_batch, simpo_batch, OrpoConfig, RefFree, RefFreeObjective, SimpoConfig};
use ferrotune_core::train::sft::{LoraState, SftExample};
use ferrotune_core::train::{train, Objective, Run, TrainConfig};
use ferrotune_core::CausalLm;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::dpo::{grads, lora_model, pairs};

fn fixture() -> Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/preference/trl-losses.json");
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// TRL ran in float32: agreement to float32 rounding.
fn close(ours: f64, trl: f64, what: &str) {
    assert!((ours - trl).abs() <= 2e-6 * trl.abs().max(1.0), "{what}: ours {ours} vs TRL {trl}");
}

#[test]
fn orpo_simpo_and_kto_equal_trl_on_fixed_logps() {
    let f = fixture();
    let mut checked = 0;
    for (name, case) in f["orpo"].as_object().unwrap().iter().filter(|(k, _)| k.starts_with("seq")) {
        let i = &case["inputs"];
        let (c, r) = (floats(&i["policy_chosen_logps"]), floats(&i["policy_rejected_logps"]));
        let out = orpo_batch(&c, &r, i["nll_loss"].as_f64().unwrap(), case["beta"].as_f64().unwrap());
        close(out.loss, case["loss(=nll - mean(losses))"].as_f64().unwrap(), &format!("orpo {name} loss"));
        for (k, (o, t)) in out.d_chosen.iter().zip(floats(&case["grad_wrt_chosen_logps"])).enumerate() {
            close(*o, t, &format!("orpo {name} d_chosen[{k}]"));
        }
        for (k, (o, t)) in out.d_rejected.iter().zip(floats(&case["grad_wrt_rejected_logps"])).enumerate() {
            close(*o, t, &format!("orpo {name} d_rejected[{k}]"));
        }
        close(out.d_nll, case["grad_wrt_nll_loss"].as_f64().unwrap(), "orpo d_nll");
        let m = &case["metrics"];
        let n = out.log_odds.len() as f64;
        close(out.log_odds.iter().sum::<f64>() / n, m["log_odds_chosen"].as_f64().unwrap(), "log_odds_chosen");
        checked += 1;
    }
    for (name, case) in f["cpo_simpo"].as_object().unwrap().iter().filter(|(k, _)| k.starts_with("seq")) {
        let i = &case["inputs"];
        let cfg = SimpoConfig {
            beta: case["beta"].as_f64().unwrap(),
            simpo_gamma: case["simpo_gamma"].as_f64().unwrap(),
            cpo_alpha: case["cpo_alpha"].as_f64().unwrap(),
            label_smoothing: case["label_smoothing"].as_f64().unwrap(),
        };
        cfg.validate().unwrap();
        let (c, r) = (floats(&i["policy_chosen_logps"]), floats(&i["policy_rejected_logps"]));
        let out = simpo_batch(&c, &r, i["nll_loss"].as_f64().unwrap(), &cfg);
        close(out.loss, case["loss(=mean(losses) + cpo_alpha*nll)"].as_f64().unwrap(), &format!("simpo {name} loss"));
        for (k, (o, t)) in out.d_chosen.iter().zip(floats(&case["grad_wrt_chosen_logps"])).enumerate() {
            close(*o, t, &format!("simpo {name} d_chosen[{k}]"));
        }
        for (k, (o, t)) in out.d_rejected.iter().zip(floats(&case["grad_wrt_rejected_logps"])).enumerate() {
            close(*o, t, &format!("simpo {name} d_rejected[{k}]"));
        }
        close(out.d_nll, case["grad_wrt_nll_loss"].as_f64().unwrap(), "simpo d_nll");
        checked += 1;
    }
    for (name, case) in f["kto"].as_object().unwrap().iter().filter(|(k, _)| k.starts_with("seq")) {
        let i = &case["inputs"];
        let cfg = KtoConfig {
            beta: case["beta"].as_f64().unwrap(),
            desirable_weight: case["desirable_weight"].as_f64().unwrap(),
            undesirable_weight: case["undesirable_weight"].as_f64().unwrap(),
            loss_type: serde_json::from_value(case["loss_type"].clone()).unwrap(),
        };
        cfg.validate().unwrap();
        let labels: Vec<bool> = i["label"].as_array().unwrap().iter().map(|x| x.as_bool().unwrap()).collect();
        let (p, rf) = (floats(&i["policy_logps"]), floats(&i["ref_logps"]));
        // apo_zero_unpaired has no KL pass: its inputs carry no mismatched log-probs.
        let or_zero = |k: &str| if i[k].is_null() { vec![0.0; labels.len()] } else { floats(&i[k]) };
        let (pk, rk) = (or_zero("policy_KL_logps"), or_zero("ref_KL_logps"));
        let ex: Vec<KtoLogps> = (0..labels.len())
            .map(|k| KtoLogps {
                desirable: labels[k],
                policy: p[k],
                reference: rf[k],
                policy_kl: pk[k],
                reference_kl: rk[k],
            })
            .collect();
        let out = kto_batch(&ex, &cfg);
        close(out.loss, case["loss"].as_f64().unwrap(), &format!("kto {name} loss"));
        for (k, (o, t)) in out.d_policy.iter().zip(floats(&case["grad_wrt_policy_logps"])).enumerate() {
            close(*o, t, &format!("kto {name} d_policy[{k}]"));
        }
        if let Some(kl) = case["metrics"]["kl"].as_array() {
            close(out.kl, kl[0].as_f64().unwrap(), &format!("kto {name} kl"));
        }
        checked += 1;
    }
    assert_eq!(checked, 2 + 2 + 4, "every seq case of the fixture");
    assert!(KtoConfig { desirable_weight: 0.0, ..Default::default() }.validate().is_err());
    assert!(SimpoConfig { label_smoothing: 0.5, ..Default::default() }.validate().is_err());
    assert!(OrpoConfig { beta: -1.0 }.validate().is_err());
}

/// Σ log p of one sequence through full logits, with gradients: over its labelled tokens, or over every token
/// after the first (`all`); and the token count.
fn direct_sum(m: &CausalLm, e: &SftExample, all: bool) -> (Tensor, f64) {
    let ids = Tensor::from_slice(&e.input_ids.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
    let lp = m.forward(&ids, None, None).unwrap().log_softmax(-1, Kind::Float).squeeze_dim(0);
    let mut total = Tensor::zeros([], (Kind::Float, Device::Cpu));
    let mut n = 0.0;
    for t in 1..e.input_ids.len() {
        if all || e.labels[t] != -100 {
            total += lp.get(t as i64 - 1).get(e.input_ids[t] as i64);
            n += 1.0;
        }
    }
    (total, n)
}

fn zero_grads(m: &mut CausalLm) {
    for (_, t) in m.lora_tensors() {
        let mut g = t.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
}

fn relative_error(a: &[Tensor], b: &[Tensor]) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(b) {
        num += (x - y).square().sum(Kind::Double).double_value(&[]);
        den += y.square().sum(Kind::Double).double_value(&[]);
    }
    assert!(den > 0.0);
    (num / den).sqrt()
}

#[test]
fn chunked_backward_equals_autograd_through_full_logits() {
    let mut m = lora_model();
    let data: Vec<(SftExample, SftExample)> = pairs(&mut m, 3, 5).into_iter().map(|e| (e.chosen, e.rejected)).collect();
    let batch: Vec<&(SftExample, SftExample)> = data.iter().collect();
    let simpo = SimpoConfig { beta: 2.0, simpo_gamma: 1.0, cpo_alpha: 0.5, label_smoothing: 0.1 };
    for method in [RefFree::Orpo(OrpoConfig { beta: 0.5 }), RefFree::Simpo(simpo)] {
        zero_grads(&mut m);
        let l = RefFreeObjective::new(0, 4, method).backward(&m, &batch, 1.0 / 3.0).unwrap();
        let ours = grads(&mut m);
        zero_grads(&mut m);
        // TRL's batch loss written on full logits: mean completion log-probs, the NLL as a token mean.
        let (mut terms, mut nll_sum, mut nll_n) = (Tensor::zeros([], (Kind::Float, Device::Cpu)), None, 0.0);
        for (c, r) in &data {
            let ((sc, nc), (sr, nr)) = (direct_sum(&m, c, false), direct_sum(&m, r, false));
            let (cm, rm) = (sc / nc, sr / nr);
            let (nll_part, n) = match method {
                RefFree::Orpo(_) => direct_sum(&m, c, true),
                RefFree::Simpo(_) => direct_sum(&m, c, false),
            };
            nll_sum = Some(nll_sum.map_or(-&nll_part, |s: Tensor| s - nll_part));
            nll_n += n;
            terms += match method {
                RefFree::Orpo(o) => {
                    let lo = (&cm - &rm) - ((-cm.exp()).log1p() - (-rm.exp()).log1p());
                    -o.beta * lo.log_sigmoid()
                }
                RefFree::Simpo(s) => {
                    let z = s.beta * (cm - rm) - s.simpo_gamma;
                    -(1.0 - s.label_smoothing) * z.log_sigmoid() - s.label_smoothing * (-z).log_sigmoid()
                }
            };
        }
        let nll = nll_sum.unwrap() / nll_n;
        let alpha = if let RefFree::Simpo(s) = method { s.cpo_alpha } else { 1.0 };
        let total = terms / 3.0 + alpha * nll;
        assert!(
            (total.double_value(&[]) * 3.0 - l.nll).abs() < 1e-4,
            "{method:?}: {} vs {}",
            total.double_value(&[]),
            l.nll / 3.0
        );
        total.backward();
        let err = relative_error(&ours, &grads(&mut m));
        assert!(err < 1e-4, "{method:?}: relative gradient error {err}");
    }
    // KTO: desirable / undesirable alternate; the KL baseline from the rotated completions.
    let flat: Vec<SftExample> = data.iter().flat_map(|(c, r)| [c.clone(), r.clone()]).collect();
    let kl = mismatched(&flat, 3);
    let refs = ferrotune_core::train::dpo::sequence_logps(
        &m.adapters_disabled(),
        &flat.iter().chain(&kl).collect::<Vec<_>>(),
        0,
        5,
    )
    .unwrap();
    let ex: Vec<KtoExample> = (0..flat.len())
        .map(|i| KtoExample {
            seq: flat[i].clone(),
            kl: kl[i].clone(),
            desirable: i % 2 == 0,
            ref_logp: refs[i].0,
            ref_kl_logp: refs[flat.len() + i].0,
        })
        .collect();
    let batch: Vec<&KtoExample> = ex.iter().collect();
    for loss_type in [KtoLoss::Kto, KtoLoss::ApoZeroUnpaired] {
        let cfg = KtoConfig { beta: 0.7, desirable_weight: 1.33, undesirable_weight: 0.75, loss_type };
        zero_grads(&mut m);
        let l = KtoObjective::new(0, 4, cfg).backward(&m, &batch, 1.0 / 6.0).unwrap();
        let ours = grads(&mut m);
        zero_grads(&mut m);
        let n = ex.len() as f64;
        let kl_est = if loss_type == KtoLoss::Kto {
            let _g = tch::no_grad_guard();
            let s: f64 = ex.iter().map(|e| direct_sum(&m, &e.kl, false).0.double_value(&[]) - e.ref_kl_logp).sum();
            (s / n).max(0.0)
        } else {
            0.0
        };
        let mut total = Tensor::zeros([], (Kind::Float, Device::Cpu));
        for e in &ex {
            let lr = direct_sum(&m, &e.seq, false).0 - e.ref_logp;
            total += if e.desirable {
                1.33 * (1.0 - (cfg.beta * (lr - kl_est)).sigmoid())
            } else {
                0.75 * (1.0 - (cfg.beta * (kl_est - lr)).sigmoid())
            };
        }
        let total = total / n;
        assert!((total.double_value(&[]) * n - l.nll).abs() < 1e-4, "{loss_type:?} loss");
        total.backward();
        let err = relative_error(&ours, &grads(&mut m));
        assert!(err < 1e-4, "{loss_type:?}: relative gradient error {err}");
    }
}

#[test]
fn mismatched_pairs_rotate_within_chunks_as_trl() {
    let ex = |p: &[u32], c: &[u32]| {
        let ids: Vec<u32> = p.iter().chain(c).copied().collect();
        let labels = ids.iter().enumerate().map(|(i, &t)| if i < p.len() { -100 } else { t as i64 }).collect();
        SftExample::new(ids, labels)
    };
    let seqs = vec![ex(&[1, 2], &[10]), ex(&[3], &[11, 12]), ex(&[4, 5, 6], &[13]), ex(&[7], &[14, 15])];
    let kl = mismatched(&seqs, 3);
    let ids: Vec<Vec<u32>> = kl.iter().map(|e| e.input_ids.clone()).collect();
    // Chunk [0, 1, 2]: prompt 0 + completion 2, prompt 1 + completion 0, prompt 2 + completion 1; chunk [3]
    // pairs with itself.
    assert_eq!(ids, vec![vec![1, 2, 13], vec![3, 10], vec![4, 5, 6, 11, 12], vec![7, 14, 15]]);
    assert_eq!(kl[2].labels, vec![-100, -100, -100, 11, 12]);
}

#[test]
fn orpo_simpo_and_kto_training_raise_preference_accuracy() {
    let mut base = lora_model();
    let dpo_pairs = pairs(&mut base, 6, 9);
    let data: Vec<(SftExample, SftExample)> = dpo_pairs.into_iter().map(|e| (e.chosen, e.rejected)).collect();
    let t = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        learning_rate: 2e-2,
        max_steps: 25,
        micro_batch_size: 3,
        eval_steps: 25,
        seed: 1,
        ..TrainConfig::default()
    };
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
    let simpo = SimpoConfig { beta: 2.0, simpo_gamma: 0.5, cpo_alpha: 0.0, label_smoothing: 0.0 };
    for method in [RefFree::Orpo(OrpoConfig { beta: 1.0 }), RefFree::Simpo(simpo)] {
        let mut m = lora_model();
        let obj = RefFreeObjective::new(0, 16, method);
        let tokens_of = |e: &(SftExample, SftExample)| e.0.input_ids.len() + e.1.input_ids.len();
        obj.eval(&m, &data.iter().collect::<Vec<_>>()).unwrap();
        let before = obj.take_metrics();
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
        train(&mut m, &run, false, &mut |ev| last = ev.metrics.clone(), &|| false).unwrap();
        println!(
            "{method:?}: accuracy {} → {}, margin {} → {}",
            before["eval_rewards/accuracies"],
            last["eval_rewards/accuracies"],
            before["eval_rewards/margins"],
            last["eval_rewards/margins"]
        );
        assert_eq!(last["eval_rewards/accuracies"], 1.0, "{method:?}");
        assert!(last["eval_rewards/margins"] > before["eval_rewards/margins"], "{method:?}");
        assert!(last.contains_key("nll_loss"));
        std::fs::remove_dir_all(t.path()).ok();
    }
    // KTO on the pairs unpaired (chosen desirable, rejected undesirable), as TRL unpairs preference data.
    let mut m = lora_model();
    let flat: Vec<SftExample> = data.iter().flat_map(|(c, r)| [c.clone(), r.clone()]).collect();
    let kl = mismatched(&flat, 3);
    let all: Vec<&SftExample> = flat.iter().chain(&kl).collect();
    let refs = ferrotune_core::train::dpo::sequence_logps(&m.adapters_disabled(), &all, 0, 16).unwrap();
    let ex: Vec<KtoExample> = (0..flat.len())
        .map(|i| KtoExample {
            seq: flat[i].clone(),
            kl: kl[i].clone(),
            desirable: i % 2 == 0,
            ref_logp: refs[i].0,
            ref_kl_logp: refs[flat.len() + i].0,
        })
        .collect();
    let obj = KtoObjective::new(0, 16, KtoConfig { beta: 0.5, ..Default::default() });
    let tokens_of = |e: &KtoExample| e.seq.input_ids.len();
    let run = Run {
        objective: &obj,
        train: &ex,
        eval: &ex,
        state: &state,
        cfg: &cfg,
        output_dir: t.path(),
        tokens_of: &tokens_of,
    };
    let mut last = Default::default();
    let s = train(&mut m, &run, false, &mut |ev| last = ev.metrics.clone(), &|| false).unwrap();
    println!("KTO: eval margin {}, loss {}", last["eval_rewards/margins"], s.final_eval_loss.unwrap());
    // Every pair ordered by the trained policy's rewards.
    let _g = tch::no_grad_guard();
    let now = ferrotune_core::train::dpo::sequence_logps(&m, &flat.iter().collect::<Vec<_>>(), 0, 16).unwrap();
    for i in 0..data.len() {
        let (c, r) = (now[2 * i].0 - refs[2 * i].0, now[2 * i + 1].0 - refs[2 * i + 1].0);
        assert!(c > r, "KTO pair {i}: chosen reward {c} vs rejected {r}");
    }
    assert!(last["eval_rewards/margins"] > 1.0 && last.contains_key("eval_kl"));
}
