//! PPO on a tiny model: rollout log-probs from the teacher-forced pass equal the sampler's own (KV-cached)
//! log-probs; the reference equals the policy while the adapter is still zero; returns and whitened
//! advantages match a direct computation; the first update's losses are what the formulas give at ratio 1;
//! training raises the held-out reward of a rule; a resumed run ends bit-identical to an uninterrupted one.

use ferrotune_core::generation::{generate, GenerateOptions};
use ferrotune_core::load_model;
use ferrotune_core::lora::{LoraConfig, Targets};
use ferrotune_core::sampling::SamplingParams;
use ferrotune_core::train::ppo::KlEstimator;
use ferrotune_core::train::ppo_objective::{
    rollout_seed, PolicyValueState, PpoConfig, PpoObjective, PpoPrompt, RewardSource, Scorer,
};
use ferrotune_core::train::{evaluate, train, Algorithm, Run, TrainConfig};
use ferrotune_core::{CausalLm, Tokenizer};
use tch::{Device, Kind, Tensor};

use crate::common::tiny_dir;

const EOS: u32 = 2;

/// A word-level tokenizer over the tiny models' 256 ids (`t0` … `t255`), decoding to space-separated words.
fn tokenizer(dir: &std::path::Path) -> Tokenizer {
    let vocab: serde_json::Map<String, serde_json::Value> =
        (0..256).map(|i| (format!("t{i}"), serde_json::json!(i))).collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "t0"}
    });
    let p = dir.join("tokenizer.json");
    std::fs::write(&p, json.to_string()).unwrap();
    Tokenizer::from_file(&p).unwrap()
}

fn policy(zero_b: bool) -> CausalLm {
    let mut m = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    m.add_lora(&lora_cfg(), 3).unwrap();
    if !zero_b {
        let _g = tch::no_grad_guard();
        for (_, lin) in m.linears_mut() {
            let b = &mut lin.lora.as_mut().unwrap().b;
            let n = b.numel() as i64;
            b.copy_(&((Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.3).cos() * 0.05).view(b.size().as_slice()));
        }
    }
    m.add_value_head().unwrap();
    m
}

fn lora_cfg() -> LoraConfig {
    LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false }
}

fn prompts(n: usize, salt: u32) -> Vec<PpoPrompt> {
    (0..n)
        .map(|i| PpoPrompt {
            ids: (0..3 + i % 3).map(|k| 10 + (salt + 7 * i as u32 + 3 * k as u32) % 200).collect(),
            text: format!("p{i}"),
        })
        .collect()
}

/// The rule: the fraction of response words `tN` with N < 64 (about 1/4 under a near-uniform policy).
fn low_ids(items: &[(String, String)]) -> ferrotune_core::Result<Vec<f64>> {
    Ok(items
        .iter()
        .map(|(_, r)| {
            let ids: Vec<u32> = r.split_whitespace().map(|w| w[1..].parse().unwrap()).collect();
            ids.iter().filter(|&&i| i < 64).count() as f64 / ids.len().max(1) as f64
        })
        .collect())
}

fn cfg(max_new: usize) -> PpoConfig {
    PpoConfig {
        reward: RewardSource { rule: Some("test".into()), ..Default::default() },
        max_new_tokens: max_new,
        temperature: 1.0,
        ppo_epochs: 2,
        ..Default::default()
    }
}

#[test]
fn rollouts_match_the_sampler_and_a_direct_gae() {
    let t = tempfile::tempdir().unwrap();
    let tok = tokenizer(t.path());
    let scorer: &Scorer = &low_ids;
    let mut m = policy(false);
    let c = PpoConfig { gamma: 0.9, lam: 0.8, kl_coef: 0.2, missing_eos_penalty: 0.5, ..cfg(6) };
    let obj = PpoObjective::new(c.clone(), 0, vec![EOS], &tok, scorer, 11);
    let ps = prompts(5, 1);
    let refs: Vec<&PpoPrompt> = ps.iter().collect();
    let rs = obj.rollouts(&mut m, &refs, 3).unwrap();
    // The sampler's own log-probs (KV cache, incremental) for the very same draws.
    let opts = GenerateOptions {
        max_new_tokens: 6,
        sampling: SamplingParams { greedy: false, temperature: 1.0, ..Default::default() },
        seed: rollout_seed(11, 3),
        eos_ids: vec![EOS],
        stop_strings: vec![],
        pad_id: 0,
    };
    let gen = generate(&m, &tok, &ps.iter().map(|p| p.ids.clone()).collect::<Vec<_>>(), &opts, &mut |_| {}).unwrap();
    let mut differs = 0.0f64;
    for (r, g) in rs.iter().zip(&gen) {
        assert_eq!(r.response, g.ids);
        for (a, b) in r.logp.iter().zip(&g.logprobs) {
            assert!((a - *b as f64).abs() < 1e-4, "teacher-forced {a} vs sampled {b}");
        }
        for (a, b) in r.logp.iter().zip(&r.ref_logp) {
            differs = differs.max((a - b).abs());
        }
        // Per-token rewards and GAE written out directly.
        let n = r.response.len();
        let score = low_ids(&[(String::new(), r.text.clone())]).unwrap()[0] - if r.ended_with_eos { 0.0 } else { 0.5 };
        assert!((r.score - low_ids(&[(String::new(), r.text.clone())]).unwrap()[0]).abs() < 1e-12);
        let mut ret = vec![0.0; n];
        let mut a = 0.0;
        for t in (0..n).rev() {
            let reward = -0.2 * (r.logp[t] - r.ref_logp[t]) + if t == n - 1 { score } else { 0.0 };
            let next = if t + 1 < n { r.values[t + 1] } else { 0.0 };
            a = reward + 0.9 * next - r.values[t] + 0.9 * 0.8 * a;
            ret[t] = a + r.values[t];
        }
        for (x, y) in r.returns.iter().zip(&ret) {
            assert!((x - y).abs() < 1e-9, "returns {:?} vs {ret:?}", r.returns);
        }
    }
    assert!(differs > 1e-3, "a non-zero adapter must move the policy away from the reference");
    let adv: Vec<f64> = rs.iter().flat_map(|r| r.advantages.clone()).collect();
    let mean = adv.iter().sum::<f64>() / adv.len() as f64;
    let var = adv.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (adv.len() - 1) as f64;
    assert!(mean.abs() < 1e-9 && (var - 1.0).abs() < 1e-6, "whitened advantages: mean {mean}, var {var}");

    // With a zero adapter the reference is the policy: KL 0.
    let mut fresh = policy(true);
    let obj2 = PpoObjective::new(PpoConfig { kl_estimator: KlEstimator::K3, ..c }, 0, vec![EOS], &tok, scorer, 11);
    for r in obj2.rollouts(&mut fresh, &refs, 0).unwrap() {
        for (a, b) in r.logp.iter().zip(&r.ref_logp) {
            assert!((a - b).abs() < 1e-6);
        }
    }
    let mt = obj2.take_metrics();
    assert!(mt["objective/kl"].abs() < 1e-5, "{mt:?}");
}

#[test]
fn first_update_losses_at_ratio_one() {
    let t = tempfile::tempdir().unwrap();
    let tok = tokenizer(t.path());
    let scorer: &Scorer = &low_ids;
    let mut m = policy(false);
    {
        // A non-zero value head, so that the value loss is not trivially the returns' square.
        let _g = tch::no_grad_guard();
        let h = m.score.as_mut().unwrap();
        let n = h.numel() as i64;
        h.copy_(&((Tensor::arange(n, (Kind::Float, Device::Cpu)) * 0.7).sin() * 0.1).view(h.size().as_slice()));
    }
    let obj = PpoObjective::new(cfg(5), 0, vec![EOS], &tok, scorer, 5);
    let ps = prompts(4, 2);
    let micro: Vec<Vec<&PpoPrompt>> = vec![ps.iter().collect()];
    let updates = obj.prepare(&mut m, &micro, 0).unwrap();
    assert_eq!(updates, vec![vec![0], vec![0]], "2 epochs × 1 mini-batch");
    let _ = obj.take_metrics();
    let n = obj.micro_units(0);
    let l = obj.backward_micro(&m, 0, 1.0 / n as f64).unwrap();
    let mt = obj.take_metrics();
    // At ratio 1 the clipped policy loss is −mean(advantage) = 0 (whitened) and nothing is clipped; the value
    // loss is ½·mean((V − R)²) with V the rollout's own values.
    assert!(
        mt["loss/policy_avg"].abs() < 1e-6 && mt["policy/clipfrac_avg"] == 0.0 && (mt["val/ratio"] - 1.0).abs() < 1e-6,
        "{mt:?}"
    );
    let rs = obj.rollouts(&mut m, &micro[0], 0).unwrap();
    let sq: Vec<f64> = rs
        .iter()
        .flat_map(|r| r.values.iter().zip(&r.returns).map(|(v, g)| (v - g).powi(2)).collect::<Vec<_>>())
        .collect();
    let want = 0.5 * sq.iter().sum::<f64>() / sq.len() as f64;
    assert!(
        (mt["loss/value_avg"] - want).abs() < 1e-5 * want.max(1.0),
        "value loss {} vs {want}",
        mt["loss/value_avg"]
    );
    assert!(
        (l.nll / n as f64 - 0.1 * want).abs() < 1e-5,
        "loss = vf_coef × value loss: {} vs {}",
        l.nll / n as f64,
        0.1 * want
    );
    assert!(m.score.as_ref().unwrap().grad().abs().sum(Kind::Float).double_value(&[]) > 0.0);
}

/// Mean probability the policy gives to the rewarded ids (< 64) as the first response token of the held-out
/// prompts.
fn low_mass(m: &CausalLm) -> f64 {
    let _g = tch::no_grad_guard();
    let ps = prompts(4, 101);
    let mut total = 0.0;
    for p in &ps {
        let ids = Tensor::from_slice(&p.ids.iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
        let probs = m.forward(&ids, None, None).unwrap().softmax(-1, Kind::Float).get(0).get(p.ids.len() as i64 - 1);
        total += probs.narrow(0, 0, 64).sum(Kind::Float).double_value(&[]);
    }
    total / ps.len() as f64
}

fn run_ppo(
    m: &mut CausalLm,
    out: &std::path::Path,
    steps: usize,
    resume: bool,
    stop_after: Option<usize>,
    tok: &Tokenizer,
) -> (f64, std::collections::BTreeMap<String, f64>) {
    let scorer: &Scorer = &low_ids;
    let obj =
        PpoObjective::new(PpoConfig { target_kl: Some(0.5), eval_samples: 4, ..cfg(8) }, 0, vec![EOS], tok, scorer, 7);
    let (train_set, eval_set) = (prompts(8, 3), prompts(4, 101));
    let tc = TrainConfig {
        learning_rate: 2e-1,
        max_steps: steps,
        micro_batch_size: 4,
        gradient_accumulation_steps: 2,
        warmup_steps: 0,
        eval_steps: steps,
        save_steps: 2,
        lr_scheduler: ferrotune_core::train::schedule::ScheduleKind::Constant,
        seed: 1,
        ..TrainConfig::default()
    };
    let state = PolicyValueState { cfg: lora_cfg(), base_model: "tiny".into() };
    let tokens_of = |p: &PpoPrompt| p.ids.len();
    let run = Run {
        objective: &obj,
        train: &train_set,
        eval: &eval_set,
        state: &state,
        cfg: &tc,
        output_dir: out,
        tokens_of: &tokens_of,
    };
    let mut last = Default::default();
    let seen = std::cell::Cell::new(0);
    let s = train(
        m,
        &run,
        resume,
        &mut |ev| {
            last = ev.metrics.clone();
            seen.set(ev.step);
        },
        &|| stop_after.is_some_and(|k| seen.get() >= k),
    )
    .unwrap();
    (s.final_eval_loss.unwrap_or(f64::NAN), last)
}

#[test]
fn ppo_raises_the_held_out_reward_and_resumes_exactly() {
    let t = tempfile::tempdir().unwrap();
    let tok = tokenizer(t.path());
    // Before: the held-out mean score of the untrained policy (the same eval sampling streams).
    let mut m = policy(true);
    let scorer: &Scorer = &low_ids;
    let probe = PpoObjective::new(PpoConfig { eval_samples: 4, ..cfg(8) }, 0, vec![EOS], &tok, scorer, 7);
    let before = -evaluate(&mut m, &probe, &prompts(4, 101), 4).unwrap();
    let mass0 = low_mass(&m);
    let (eval_loss, last) = run_ppo(&mut m, &t.path().join("full"), 24, false, None, &tok);
    let after = -eval_loss;
    let mass1 = low_mass(&m);
    println!("held-out mean score {before:.3} → {after:.3}; next-token mass on rewarded ids {mass0:.3} → {mass1:.3}; last step {last:?}");
    // The tiny random model is nearly uniform and moves slowly, so the sampled score is noisy here (the
    // SmolLM2 end-to-end test shows the held-out reward rising); the policy's probability of the rewarded
    // ids on held-out prompts is exact and must rise.
    assert!(mass1 > mass0 + 0.003, "PPO must move probability to the rewarded ids: {mass0} → {mass1}");
    assert!(last["objective/kl"].is_finite() && last["objective/kl_coef"] != 0.05, "adaptive KL moved: {last:?}");

    // 6 steps straight vs 3 steps, stop, resume to 6: identical adapters and value heads.
    let mut a = policy(true);
    run_ppo(&mut a, &t.path().join("a"), 6, false, None, &tok);
    let mut b = policy(true);
    run_ppo(&mut b, &t.path().join("b"), 6, false, Some(3), &tok);
    let mut b2 = policy(true);
    run_ppo(&mut b2, &t.path().join("b"), 6, true, None, &tok);
    for f in ["adapter_model.safetensors", "value_head.safetensors"] {
        assert_eq!(
            std::fs::read(t.path().join("a").join(f)).unwrap(),
            std::fs::read(t.path().join("b").join(f)).unwrap(),
            "{f} differs after resume"
        );
    }
}
