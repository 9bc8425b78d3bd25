//! Reward models: a PEFT-made SEQ_CLS LoRA + score head (`tests/fixtures/make_reward.py`) reproduces
//! transformers' scores; ours save and load in the same layout; Bradley–Terry training separates pairs.

use std::path::{Path, PathBuf};

use ferrotune_core::load_model;
use ferrotune_core::lora::{LoraConfig, Targets};
use ferrotune_core::train::reward::{
    load_reward_model, save_reward_model, score_sequences, RewardConfig, RewardExample, RewardObjective, RewardState,
    SCORE_KEY,
};
use ferrotune_core::train::sft::SftExample;
use ferrotune_core::train::{train, Objective, Run, TrainConfig};
use ferrotune_core::weights::WeightFiles;
use tch::{Device, Kind};

use crate::common::tiny_dir;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-lora/reward")
}

fn rows() -> (Vec<SftExample>, Vec<f32>) {
    let f = WeightFiles::open_files(&[fixture().join("reference.safetensors")]).unwrap();
    let ids = f.load_raw("input_ids").unwrap();
    let scores = Vec::<f32>::try_from(&f.load_raw("scores").unwrap()).unwrap();
    let (b, t) = ids.size2().unwrap();
    let seqs = (0..b)
        .map(|i| {
            let row: Vec<u32> = Vec::<i64>::try_from(&ids.get(i)).unwrap().into_iter().map(|x| x as u32).collect();
            SftExample::new(row, vec![-100; t as usize])
        })
        .collect();
    (seqs, scores)
}

#[test]
fn peft_reward_model_reproduces_transformers_scores_and_round_trips() {
    let mut m = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    load_reward_model(&mut m, &fixture()).unwrap();
    let (seqs, want) = rows();
    let refs: Vec<&SftExample> = seqs.iter().collect();
    let got = Vec::<f32>::try_from(&tch::no_grad(|| score_sequences(&m, &refs, 0)).unwrap()).unwrap();
    for (g, w) in got.iter().zip(&want) {
        assert!((g - w).abs() < 1e-5, "score {g} vs transformers {w}");
    }
    // Different lengths in one batch (right padding) score each row at its own last token.
    let short = SftExample::new(seqs[1].input_ids[..5].to_vec(), vec![-100; 5]);
    let alone = tch::no_grad(|| score_sequences(&m, &[&short], 0)).unwrap().double_value(&[0]);
    let batched = tch::no_grad(|| score_sequences(&m, &[&seqs[0], &short], 0)).unwrap().double_value(&[1]);
    assert!((alone - batched).abs() < 1e-5, "{alone} vs {batched}");
    // Saved in PEFT's SEQ_CLS layout and loaded back: same scores.
    let t = tempfile::tempdir().unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Targets::Names(vec!["q_proj".into(), "v_proj".into()]),
        use_rslora: false,
        use_dora: false,
    };
    save_reward_model(&mut m, &cfg, "tiny", t.path()).unwrap();
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(c["task_type"], "SEQ_CLS");
    assert!(c["modules_to_save"].as_array().unwrap().iter().any(|x| x == "score"));
    assert!(WeightFiles::open_files(&[t.path().join("adapter_model.safetensors")]).unwrap().contains(SCORE_KEY));
    let mut m2 = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    load_reward_model(&mut m2, t.path()).unwrap();
    let again = Vec::<f32>::try_from(&tch::no_grad(|| score_sequences(&m2, &refs, 0)).unwrap()).unwrap();
    assert_eq!(got, again);
    // A causal-LM adapter is not a reward model.
    let lm = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-lora/llama3-all-linear");
    let e = load_reward_model(&mut m2, &lm).unwrap_err().to_string();
    assert!(e.contains("SEQ_CLS"), "{e}");
}

#[test]
fn bradley_terry_training_separates_pairs() {
    let mut m = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    let lcfg =
        LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false };
    m.add_lora(&lcfg, 1).unwrap();
    m.add_score_head(2).unwrap();
    // Chosen responses end in token 7, rejected ones in token 9: a learnable preference.
    let pair = |i: u32| {
        let prompt: Vec<u32> = (0..5).map(|k| 20 + (i * 13 + k) % 200).collect();
        let mk = |end: u32| {
            let ids: Vec<u32> = prompt.iter().copied().chain([30 + i, end]).collect();
            let n = ids.len();
            SftExample::new(ids, vec![-100; n])
        };
        RewardExample { chosen: mk(7), rejected: mk(9) }
    };
    let data: Vec<RewardExample> = (0..8).map(pair).collect();
    let obj = RewardObjective::new(0, RewardConfig { margin: 0.0, center_rewards_coefficient: 0.01 });
    let before = {
        let _g = tch::no_grad_guard();
        obj.eval(&m, &data.iter().collect::<Vec<_>>()).unwrap().nll / 8.0
    };
    obj.take_metrics();
    let t = tempfile::tempdir().unwrap();
    let cfg = TrainConfig {
        learning_rate: 1e-2,
        max_steps: 30,
        micro_batch_size: 4,
        warmup_steps: 0,
        eval_steps: 30,
        seed: 3,
        ..TrainConfig::default()
    };
    let state = RewardState { cfg: lcfg, base_model: "tiny".into() };
    let tokens_of = |e: &RewardExample| e.chosen.input_ids.len() + e.rejected.input_ids.len();
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
    println!(
        "reward loss {before:.4} → {:.4}; eval accuracy {}",
        s.final_eval_loss.unwrap(),
        last["eval_rewards/accuracies"]
    );
    assert_eq!(last["eval_rewards/accuracies"], 1.0);
    assert!(s.final_eval_loss.unwrap() < 0.3 && before > 0.5);
    // The run's output is a loadable reward model giving the same scores.
    let mut m2 = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    load_reward_model(&mut m2, t.path()).unwrap();
    let seqs = [&data[0].chosen, &data[0].rejected];
    let (a, b) = tch::no_grad(|| (score_sequences(&m, &seqs, 0).unwrap(), score_sequences(&m2, &seqs, 0).unwrap()));
    assert!((a - b).abs().max().double_value(&[]) < 1e-6);
}
