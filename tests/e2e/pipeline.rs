//! `ferrotune pipeline run`: the seed's flow (SFT → reward model → DPO on the SFT-merged model → merge →
//! eval, and a GGUF export) on the tiny chat model through the embedded services; a failed stage and
//! `--resume` (finished stages skipped, the rest run); bad pipelines refused before anything runs. The
//! SmolLM2 run of `recipes/pipeline.yaml` is the learning proof.

use std::path::Path;

use ferrotune_tests::{repo, run_cli_env, smollm2_dir, tiny_chat_in};
use serde_json::Value;

fn write(root: &Path, name: &str, text: &str) {
    std::fs::write(root.join(name), text).unwrap();
}

/// Tiny recipes (a few steps each) and data under `root`.
fn setup(root: &Path) {
    for f in ["pirate-train.jsonl", "pirate-prefs-train.jsonl", "pirate-eval.jsonl", "pirate-eval.txt"] {
        std::fs::copy(repo(&format!("recipes/data/{f}")), root.join(f)).unwrap();
    }
    let m = tiny_chat_in(root);
    let common = "adapter: {method: lora, r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj]}\n\
                  training: {learning_rate: 1.0e-3, max_steps: 3, micro_batch_size: 2, save_steps: 0}\noutput_dir: unused\n";
    write(
        root,
        "sft.yaml",
        &format!("model: {m}\ndata: {{path: pirate-train.jsonl, format: messages, max_seq_len: 128}}\n{common}"),
    );
    write(
        root,
        "reward.yaml",
        &format!(
            "model: {m}\ndata: {{path: pirate-prefs-train.jsonl, format: preference, max_seq_len: 128}}\n{common}"
        ),
    );
    write(
        root,
        "dpo.yaml",
        &format!(
            "model: {m}\ndata: {{path: pirate-prefs-train.jsonl, format: preference, max_seq_len: 128}}\n{common}"
        ),
    );
}

const FLOW: &str = r#"name: tiny
output_dir: runs/p
stages:
  sft: {kind: sft, recipe: sft.yaml}
  reward: {kind: reward, recipe: reward.yaml}
  sft_merged: {kind: merge, model: tiny-chat, adapter: '${sft.adapter}'}
  dpo: {kind: dpo, recipe: dpo.yaml, set: ['model=${sft_merged.model}']}
  merged: {kind: merge, model: '${sft_merged.model}', adapter: '${dpo.adapter}'}
  eval:
    kind: eval
    model: '${merged.model}'
    prompts: PROMPTS
    max_new_tokens: 8
    rules: {pirate_start: 'regex:^Ahoy!', length: length}
    reward_model: {model: tiny-chat, adapter: '${reward.adapter}'}
    perplexity: pirate-eval.txt
  gguf: {kind: export, model: '${merged.model}', type: q8_0}
"#;

fn run(root: &Path, args: &[&str]) -> std::process::Output {
    run_cli_env(root, &[], args)
}

#[test]
fn pipeline_runs_the_seed_flow_resumes_after_a_failed_stage_and_refuses_bad_files() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    setup(root);
    // The eval stage's prompts are missing: the stages before it finish, the pipeline fails there.
    write(root, "p.yaml", &FLOW.replace("PROMPTS", "held-out.jsonl"));
    let o = run(root, &["pipeline", "run", "p.yaml"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(err.contains("stage eval (eval)") && err.contains("held-out.jsonl"), "{err}");
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("runs/p/pipeline.json")).unwrap()).unwrap();
    let done: Vec<&String> = state["stages"].as_object().unwrap().keys().collect();
    assert_eq!(done, ["dpo", "merged", "reward", "sft", "sft_merged"], "{state}");
    // Without --resume the run is not started over on top of itself.
    let o = run(root, &["pipeline", "run", "p.yaml"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume"), "{}", String::from_utf8_lossy(&o.stderr));
    // The prompts appear; --resume skips the five finished stages and runs the rest.
    std::fs::copy(root.join("pirate-eval.jsonl"), root.join("held-out.jsonl")).unwrap();
    let o = run(root, &["pipeline", "run", "p.yaml", "--resume", "--json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert_eq!(err.matches("finished before, skipped").count(), 5, "{err}");
    let last: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    let stages = &last["stages"];
    let dpo_out = stages["dpo"]["adapter"].as_str().unwrap();
    assert!(Path::new(dpo_out).join("adapter_model.safetensors").exists());
    let merged = stages["merged"]["model"].as_str().unwrap();
    assert!(Path::new(merged).join("config.json").exists());
    assert!(Path::new(stages["gguf"]["file"].as_str().unwrap()).exists());
    // The DPO stage trained on the SFT-merged model.
    let dpo_recipe = std::fs::read_to_string(Path::new(dpo_out).join("recipe.yaml")).unwrap();
    assert!(dpo_recipe.contains(stages["sft_merged"]["model"].as_str().unwrap()), "{dpo_recipe}");
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(stages["eval"]["report"].as_str().unwrap()).unwrap()).unwrap();
    let m = &report["metrics"];
    for k in ["pirate_start", "length", "reward_mean", "perplexity", "mean_nll"] {
        assert!(m[k].as_f64().is_some_and(f64::is_finite), "{k} missing: {report}");
    }
    assert_eq!(report["samples"].as_array().unwrap().len(), 8);
    let mean_len: f64 = report["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["answer"].as_str().unwrap().chars().count() as f64)
        .sum::<f64>()
        / 8.0;
    assert!((m["length"].as_f64().unwrap() - mean_len).abs() < 1e-3, "the length rule scored the answers: {report}");
    // Everything finished: a second --resume runs nothing.
    let o = run(root, &["pipeline", "run", "p.yaml", "--resume"]);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stderr).matches("finished before, skipped").count(), 7);

    // Bad files: one line, nothing run.
    write(root, "cycle.yaml", "name: c\nstages:\n  a: {kind: merge, model: '${b.model}', adapter: x}\n  b: {kind: merge, model: '${a.model}', adapter: x}\n");
    let o = run(root, &["pipeline", "run", "cycle.yaml"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("cycle: a → b → a") && err.lines().count() == 1, "{err}");
    write(root, "ref.yaml", "name: r\nstages:\n  a: {kind: sft, recipe: sft.yaml}\n  b: {kind: eval, model: '${sft.adapter}', prompts: x}\n");
    let o = run(root, &["pipeline", "run", "ref.yaml"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("stages.b.model: `${sft.adapter}` names no stage `sft`"));
    write(root, "missing.yaml", "name: m\nstages:\n  a: {kind: sft, recipe: nope.yaml}\n");
    let o = run(root, &["pipeline", "run", "missing.yaml"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("stages.a.recipe: nope.yaml not found"));
    assert!(!root.join("runs/c").exists() && !root.join("runs/r").exists() && !root.join("runs/m").exists());
}

/// Learning proof: `recipes/pipeline.yaml` on SmolLM2 (QLoRA SFT → reward model → DPO on the SFT model →
/// merge → eval, the base evaluated alongside), then `--resume` finds everything done.
#[test]
#[ignore = "learning proof (make test-learning)"]
fn smollm2_pipeline_runs_the_seed_flow_and_learns_the_persona() {
    let _ = smollm2_dir();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("pipeline");
    let set = format!("output_dir: {}\n", out.display());
    let text =
        std::fs::read_to_string(repo("recipes/pipeline.yaml")).unwrap().replace("output_dir: runs/pipeline\n", &set);
    std::fs::write(t.path().join("p.yaml"), text).unwrap();
    // Recipes and data paths are relative to the repository.
    let started = std::time::Instant::now();
    let p = t.path().join("p.yaml");
    let o = run_cli_env(&repo(""), &[], &["pipeline", "run", p.to_str().unwrap(), "--json"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    eprintln!("pipeline: {:.0} s", started.elapsed().as_secs_f64());
    let last: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    let report = |stage: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(last["stages"][stage]["report"].as_str().unwrap()).unwrap())
            .unwrap()
    };
    let (base, tuned) = (report("eval_base"), report("eval"));
    let num = |r: &Value, k: &str| r["metrics"][k].as_f64().unwrap();
    eprintln!("base: {}\ntuned: {}", base["metrics"], tuned["metrics"]);
    assert!(num(&base, "pirate_start") <= 0.125, "{base}");
    assert!(num(&tuned, "pirate_start") >= 0.75, "held-out answers start like a pirate: {tuned}");
    // Measured (2 threads, 281 s): pirate_start 0 → 1.0, reward_mean −4.72 → 4.17, perplexity of the plain
    // answer text 5.02 → 5.14 (the persona is learnt in chat form; the plain text stays about as likely).
    assert!(num(&tuned, "perplexity") < 1.5 * num(&base, "perplexity"), "the flow kept the model's language");
    assert!(num(&tuned, "reward_mean") > num(&base, "reward_mean"), "the reward model prefers the tuned answers");
    let o = run_cli_env(&repo(""), &[], &["pipeline", "run", p.to_str().unwrap(), "--resume"]);
    assert!(o.status.success());
    assert_eq!(String::from_utf8_lossy(&o.stderr).matches("finished before, skipped").count(), 7);
}
