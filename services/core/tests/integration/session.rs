//! Policy training sessions on the tiny chat model: a new adapter starts as the reference, updates move the
//! policy the way the advantages say, and a session restored from a checkpoint continues bit-identically.

use std::path::{Path, PathBuf};

use ferrotune_core::lora::{LoraConfig, Targets};
use ferrotune_core::train::grpo::{LossType, PolicyLoss};
use ferrotune_core::train::session::{
    AdapterInit, PolicySession, PpoLoss, RolloutSpec, Sample, SessionSpec, UpdateLoss, UpdateSample,
};
use ferrotune_core::train::TrainConfig;
use ferrotune_core::SamplingParams;
use tch::{Device, Kind};

fn tiny_chat() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-chat")
}

fn spec() -> SessionSpec {
    SessionSpec {
        base: tiny_chat(),
        qlora: false,
        adapter: AdapterInit::New(LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.0,
            targets: Targets::AllLinear,
            use_rslora: false,
            use_dora: false,
        }),
        train: TrainConfig { seed: 3, ..Default::default() },
        value_head: false,
        kind: Kind::Float,
        device: Device::Cpu,
        device_map: None,
    }
}

fn rollout(s: &mut PolicySession, seed: u64) -> Vec<Sample> {
    rollout_with(s, seed, true)
}

fn rollout_with(s: &mut PolicySession, seed: u64, logprobs: bool) -> Vec<Sample> {
    let prompts = vec![s.tokenizer.encode("Ahoy there").unwrap(), s.tokenizer.encode("The sea is").unwrap()];
    let spec = RolloutSpec {
        prompts,
        n: 3,
        max_new_tokens: 6,
        sampling: SamplingParams { greedy: false, temperature: 1.0, top_k: None, top_p: None, repetition_penalty: 1.0 },
        seed,
        stop: vec![],
        reference: true,
        logprobs,
    };
    s.rollout(&spec, &|| false).unwrap()
}

/// The first sample of each prompt gets advantage +1, the others −0.25.
fn batch(s: &PolicySession, samples: &[Sample]) -> Vec<UpdateSample> {
    let prompts = [s.tokenizer.encode("Ahoy there").unwrap(), s.tokenizer.encode("The sea is").unwrap()];
    samples
        .iter()
        .enumerate()
        .map(|(i, x)| UpdateSample {
            prompt: prompts[x.prompt].clone(),
            completion: x.ids.clone(),
            old_logp: x.logp.clone(),
            ref_logp: x.ref_logp.clone(),
            advantages: vec![if i % 3 == 0 { 1.0 } else { -0.25 }; x.ids.len()],
            masked: false,
            returns: vec![],
            old_values: vec![],
        })
        .collect()
}

const LOSS: PolicyLoss = PolicyLoss {
    loss_type: LossType::Grpo,
    epsilon_low: 0.2,
    epsilon_high: 0.28,
    beta: 0.04,
    max_completion_length: 6,
    bias_correction_kl: true,
    ratio: ferrotune_core::train::grpo::RatioLevel::Token,
    on_policy: false,
};

#[test]
fn sessions_roll_out_update_and_resume_exactly() {
    let mut s = PolicySession::open(&spec()).unwrap();
    let samples = rollout(&mut s, 11);
    assert_eq!(samples.len(), 6);
    assert_eq!(samples.iter().map(|x| x.prompt).collect::<Vec<_>>(), [0, 0, 0, 1, 1, 1]);
    for x in &samples {
        assert_eq!((x.logp.len(), x.ref_logp.len()), (x.ids.len(), x.ids.len()));
        // A new adapter (B = 0) leaves the policy equal to its reference.
        for (a, b) in x.logp.iter().zip(&x.ref_logp) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
    }
    // Seeded: the same rollout again.
    assert_eq!(
        rollout(&mut s, 11).iter().map(|x| &x.ids).collect::<Vec<_>>(),
        samples.iter().map(|x| &x.ids).collect::<Vec<_>>()
    );
    let b = batch(&s, &samples);
    // At the first update the ratio is 1 and the KL 0: the grpo loss is minus the mean advantage (two
    // micro-batches of one prompt's group each).
    let r = s.update(&b, &UpdateLoss::Clipped(LOSS), 1.0, 1e-2, 3).unwrap();
    let want = -(1.0 - 0.25 - 0.25) / 3.0;
    assert!((r.loss - want).abs() < 1e-5, "{} vs {want}", r.loss);
    assert!(r.grad_norm > 0.0 && r.updates == 1 && r.stats.tokens > 0.0);
    // More updates on the same batch raise the log-prob of the favoured completions.
    for _ in 0..3 {
        s.update(&b, &UpdateLoss::Clipped(LOSS), 1.0, 1e-2, 4).unwrap();
    }
    let now: f64 = s.logprobs(&b[0].prompt, &b[0].completion, 1.0).unwrap().iter().sum();
    let before: f64 = samples[0].logp.iter().sum();
    assert!(now > before, "the favoured completion's log-prob should rise: {before} -> {now}");

    // Resume: checkpoint after one update, continue in a fresh session, compare with the uninterrupted one.
    let d = tempfile::tempdir().unwrap();
    let mut a = PolicySession::open(&spec()).unwrap();
    a.update(&b, &UpdateLoss::Clipped(LOSS), 1.0, 1e-2, 4).unwrap();
    a.checkpoint(d.path(), 2, "run-a").unwrap();
    let ra = a.update(&b, &UpdateLoss::Clipped(LOSS), 1.0, 1e-2, 4).unwrap();
    let mut c = PolicySession::open(&spec()).unwrap();
    assert!(c.restore(d.path(), "run-a", Some(1)).is_ok_and(|x| x));
    // Another run's checkpoints are not this one's; a step that was not saved is refused.
    assert!(!PolicySession::open(&spec()).unwrap().restore(d.path(), "run-b", None).unwrap());
    assert!(PolicySession::open(&spec()).unwrap().restore(d.path(), "run-a", Some(2)).is_err());
    assert_eq!(c.updates(), 1);
    let rc = c.update(&b, &UpdateLoss::Clipped(LOSS), 1.0, 1e-2, 4).unwrap();
    assert_eq!(ra, rc, "a restored session continues bit-identically");
    let (da, dc) = (d.path().join("a"), d.path().join("c"));
    a.save_adapter(&da).unwrap();
    c.save_adapter(&dc).unwrap();
    assert!(
        std::fs::read(da.join("adapter_model.safetensors")).unwrap()
            == std::fs::read(dc.join("adapter_model.safetensors")).unwrap()
    );
    // Bad per-token inputs are named.
    let mut bad = b.clone();
    bad[1].advantages.pop();
    let e = s.update(&bad, &UpdateLoss::Clipped(LOSS), 1.0, 1e-2, 4).unwrap_err().to_string();
    assert!(e.contains("samples[1]"), "{e}");
}

/// The rollout's teacher-forced log-probs of many samples (batched longest first, 16 at a time) equal each
/// sample's own full pass, in the samples' order — one-token completions too.
#[test]
fn rollout_log_probs_equal_one_sequence_passes() {
    let mut s = PolicySession::open(&spec()).unwrap();
    let prompts = vec![s.tokenizer.encode("Ahoy there").unwrap(), s.tokenizer.encode("The sea is a wide").unwrap()];
    // The prompts differ in length.
    assert_ne!(prompts[0].len(), prompts[1].len());
    for (n, max_new_tokens) in [(13, 9), (9, 1), (20, 5)] {
        let spec = RolloutSpec {
            prompts: prompts.clone(),
            n,
            max_new_tokens,
            sampling: SamplingParams {
                greedy: false,
                temperature: 0.7,
                top_k: None,
                top_p: None,
                repetition_penalty: 1.0,
            },
            seed: 2,
            stop: vec![],
            reference: true,
            logprobs: true,
        };
        let samples = s.rollout(&spec, &|| false).unwrap();
        assert_eq!(samples.len(), 2 * n);
        for (i, x) in samples.iter().enumerate() {
            let one = s.logprobs(&prompts[x.prompt], &x.ids, 0.7).unwrap();
            assert_eq!((one.len(), x.ref_logp.len()), (x.logp.len(), x.logp.len()), "sample {i}");
            for (a, b) in x.logp.iter().zip(&one) {
                // f32: a padded batch against a sequence alone.
                assert!((a - b).abs() < 5e-5, "n {n}, sample {i}: {a} vs {b}");
            }
            // A new adapter (B = 0): the reference's log-probs are the policy's.
            for (a, b) in x.ref_logp.iter().zip(&one) {
                assert!((a - b).abs() < 5e-5, "n {n}, sample {i}: reference {a} vs {b}");
            }
        }
    }
}

/// An on-policy update (TRL's GRPO with num_iterations 1) takes its old log-probs from its own forward pass:
/// the rollout can skip the teacher-forced pass, and the update equals one given the rollout's log-probs.
#[test]
fn on_policy_updates_need_no_old_log_probs() {
    let (mut a, mut b) = (PolicySession::open(&spec()).unwrap(), PolicySession::open(&spec()).unwrap());
    let with = rollout_with(&mut a, 5, true);
    let without = rollout_with(&mut b, 5, false);
    assert_eq!(with.iter().map(|x| &x.ids).collect::<Vec<_>>(), without.iter().map(|x| &x.ids).collect::<Vec<_>>());
    assert!(without.iter().all(|x| x.logp.is_empty() && x.ref_logp.len() == x.ids.len()));
    let on_policy = PolicyLoss { on_policy: true, ..LOSS };
    // Give the adapter a non-zero B first, so the policy differs from the reference and the KL term counts.
    let warm = batch(&a, &with);
    a.update(&warm, &UpdateLoss::Clipped(LOSS), 1.0, 1e-2, 3).unwrap();
    b.update(&warm, &UpdateLoss::Clipped(LOSS), 1.0, 1e-2, 3).unwrap();
    let with = rollout_with(&mut a, 6, true);
    let without = rollout_with(&mut b, 6, false);
    let ra = a.update(&batch(&a, &with), &UpdateLoss::Clipped(LOSS), 1.0, 1e-2, 3).unwrap();
    let mut nb = batch(&b, &without);
    let rb = b.update(&nb, &UpdateLoss::Clipped(on_policy), 1.0, 1e-2, 3).unwrap();
    assert!(rb.stats.kl > 0.0, "the KL to the reference counts");
    assert!((ra.loss - rb.loss).abs() < 1e-6, "{} vs {}", ra.loss, rb.loss);
    assert!((ra.grad_norm - rb.grad_norm).abs() < 1e-5 * ra.grad_norm, "{} vs {}", ra.grad_norm, rb.grad_norm);
    assert_eq!((rb.stats.clipped_low, rb.stats.clipped_high), (0.0, 0.0));
    // Old log-probs sent to an on-policy update are a mistake, named.
    nb[0].old_logp = vec![0.0; nb[0].completion.len()];
    let e = b.update(&nb, &UpdateLoss::Clipped(on_policy), 1.0, 1e-2, 3).unwrap_err().to_string();
    assert!(e.contains("samples[0]") && e.contains("on-policy"), "{e}");
}

#[test]
fn ppo_sessions_train_and_checkpoint_the_value_head() {
    let spec = SessionSpec { value_head: true, ..spec() };
    let mut s = PolicySession::open(&spec).unwrap();
    let samples = rollout(&mut s, 4);
    // A new value head is zero: every value 0.
    assert!(samples.iter().all(|x| x.values.len() == x.ids.len() && x.values.iter().all(|&v| v == 0.0)));
    let mut b = batch(&s, &samples);
    for (u, x) in b.iter_mut().zip(&samples) {
        u.returns = vec![1.0; x.ids.len()];
        u.old_values = x.values.clone();
    }
    let ppo = PpoLoss { cliprange: 0.2, cliprange_value: 0.2, vf_coef: 0.1 };
    let r = s.update(&b, &UpdateLoss::Ppo(ppo), 1.0, 1e-2, 4).unwrap();
    // At the first update the ratio is 1 and every value 0: the policy loss is minus the token mean of the
    // advantages, the value loss 0.5 · (0 − 1)².
    let tokens: usize = b.iter().map(|u| u.completion.len()).sum();
    let pg = -b.iter().map(|u| u.advantages.iter().sum::<f64>()).sum::<f64>() / tokens as f64;
    assert!((r.loss - (pg + 0.1 * 0.5)).abs() < 1e-5, "{} vs {}", r.loss, pg + 0.05);
    let [policy, value, approxkl, _] = r.ppo.unwrap().map(|x| x / tokens as f64);
    assert!((policy - pg).abs() < 1e-5 && (value - 0.5).abs() < 1e-6 && approxkl.abs() < 1e-9);
    // The value head learns the returns.
    for _ in 0..5 {
        s.update(&b, &UpdateLoss::Ppo(ppo), 1.0, 1e-2, 4).unwrap();
    }
    let after = rollout(&mut s, 4);
    let mean = after.iter().flat_map(|x| x.values.iter()).sum::<f64>()
        / after.iter().map(|x| x.values.len()).sum::<usize>() as f64;
    assert!(mean > 0.02, "values should move toward the returns (1): mean {mean}");
    // The head is checkpointed with the adapter and restored.
    let d = tempfile::tempdir().unwrap();
    s.checkpoint(d.path(), 2, "ppo").unwrap();
    let mut c = PolicySession::open(&spec).unwrap();
    assert!(c.restore(d.path(), "ppo", None).unwrap());
    assert_eq!(rollout(&mut c, 4), after);
    // Without a value head the PPO loss is refused.
    let mut plain = PolicySession::open(&self::spec()).unwrap();
    let e = plain.update(&b, &UpdateLoss::Ppo(ppo), 1.0, 1e-2, 4).unwrap_err().to_string();
    assert!(e.contains("value head"), "{e}");
}

#[test]
fn rollouts_stop_at_the_chat_templates_turn_end_when_the_eos_is_another_token() {
    // The tiny chat model re-declared with `<|endoftext|>` (id 0) as its EOS everywhere: its ChatML template still
    // ends turns with `<|im_end|>`, so rollouts must stop there too, as generation does.
    let t = tempfile::tempdir().unwrap();
    for e in std::fs::read_dir(tiny_chat()).unwrap() {
        let p = e.unwrap().path();
        let text = std::fs::read(&p).unwrap();
        let name = p.file_name().unwrap().to_str().unwrap();
        let text = match name {
            "generation_config.json" => br#"{"bos_token_id": 1, "eos_token_id": 0}"#.to_vec(),
            "config.json" => {
                String::from_utf8(text).unwrap().replace(r#""eos_token_id": 2"#, r#""eos_token_id": 0"#).into()
            }
            "tokenizer_config.json" => String::from_utf8(text)
                .unwrap()
                .replace(r#""eos_token": "<|im_end|>""#, r#""eos_token": "<|endoftext|>""#)
                .into(),
            _ => text,
        };
        std::fs::write(t.path().join(name), text).unwrap();
    }
    let s = PolicySession::open(&SessionSpec { base: t.path().to_path_buf(), ..spec() }).unwrap();
    assert_eq!(s.defaults.eos_ids, vec![0], "the declared EOS");
    let im_end = s.tokenizer.token_to_id("<|im_end|>").unwrap();
    assert_eq!(s.stop_ids, vec![0, im_end], "plus the template's turn end");
}
