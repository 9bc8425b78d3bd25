//! Supervised fine-tuning end to end through the CLI: the learning proofs on SmolLM2 (a persona the base
//! model does not follow, learned with LoRA, QLoRA, full fine-tuning and prompt tuning, measured on held-out
//! questions), and the plumbing on the tiny chat model: a run killed with SIGKILL then resumed, which must
//! end with the same adapter as an uninterrupted run; SIGINT; merges equal to base + adapter.

use std::path::Path;
use std::process::Command;

use ferrotune_core::{generate, GenerateOptions, Message, ModelBundle, SamplingParams};
use ferrotune_tests::{ferrotune_bin, repo, run_cli, smollm2_dir, tiny_chat_dir};
use tch::{Device, Kind};

/// Fraction of held-out questions whose greedy answer starts with "Ahoy!" (and the answers).
pub(crate) fn compliance(adapter: Option<&Path>) -> (f64, Vec<String>) {
    compliance_of(&smollm2_dir(), adapter)
}

pub(crate) fn compliance_of(model: &Path, adapter: Option<&Path>) -> (f64, Vec<String>) {
    let mut b = ModelBundle::load(model, Kind::Float, Device::Cpu).unwrap();
    if let Some(a) = adapter {
        b.attach_adapter(a).unwrap();
    }
    let held = std::fs::read_to_string(repo("recipes/data/pirate-eval.jsonl")).unwrap();
    let prompts: Vec<Vec<u32>> = held
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            b.chat_prompt(&[Message::new("user", v["messages"][0]["content"].as_str().unwrap())]).unwrap()
        })
        .collect();
    let o = GenerateOptions {
        max_new_tokens: 12,
        sampling: SamplingParams::default(),
        seed: 0,
        eos_ids: b.stop_ids(),
        stop_strings: vec![],
        pad_id: b.defaults.pad_id,
    };
    let out = generate(&b.model, &b.tokenizer, &prompts, &o, &mut |_| {}).unwrap();
    let texts: Vec<String> = out.into_iter().map(|g| g.text).collect();
    let ok = texts.iter().filter(|t| t.trim_start().starts_with("Ahoy!")).count();
    (ok as f64 / texts.len() as f64, texts)
}

pub(crate) fn train(out: &Path, extra: &[&str]) -> std::process::Output {
    let recipe = repo("recipes/lora-sft.yaml");
    let data = format!("data.path={}", repo("recipes/data/pirate-train.jsonl").display());
    let mut args = vec![
        "train",
        "sft",
        "--recipe",
        recipe.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--set",
        &data,
        "--json",
    ];
    args.extend(extra);
    let o = run_cli(&args);
    assert!(o.status.success(), "train failed: {}", String::from_utf8_lossy(&o.stderr));
    o
}

/// The job's "optimizer state: …" log line: the planned state in MB and the 32-bit AdamW figure.
fn optimizer_state(o: &std::process::Output) -> (String, f64, f64) {
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    let i = text.find("optimizer state: ").expect("the job logs its optimizer state");
    let line = text[i..].lines().next().unwrap().trim_end_matches(['"', '}', ',']).to_owned();
    let mb: Vec<f64> = line
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .filter_map(|w| w.parse().ok())
        .filter(|_| true)
        .collect();
    let (planned, full) = (mb[0], *mb.last().unwrap());
    (line, planned, full)
}

#[test]
fn sft_full_fine_tuning_with_8bit_adamw_logs_its_smaller_state() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny();
    let run = |name: &str, optim: &str| {
        train(
            &t.path().join(name),
            &[
                "--set",
                &model,
                "--max-steps",
                "4",
                "--set",
                "adapter.method=full",
                "--set",
                &format!("training.optim={optim}"),
            ],
        )
    };
    let (line8, mb8, full8) = optimizer_state(&run("eight", "paged_adamw_8bit"));
    let (line32, mb32, full32) = optimizer_state(&run("torch", "adamw_torch"));
    println!("{line8}\n{line32}");
    assert!(line8.contains("paged_adamw_8bit") && line32.contains("adamw_torch"), "{line8} / {line32}");
    assert_eq!(mb32, full32, "32-bit AdamW holds its own figure");
    assert_eq!(full8, full32);
    assert!(mb8 < 0.6 * mb32, "8-bit moments: {mb8} MB vs {mb32} MB");
    let weights = |name: &str| {
        let w = t.path().join(name).join("model.safetensors");
        assert!(w.is_file(), "{name}: the fine-tuned model");
        std::fs::metadata(w).unwrap().len()
    };
    assert_eq!(weights("eight"), weights("torch"));
    let o = run_cli(&[
        "train",
        "sft",
        "--recipe",
        repo("recipes/lora-sft.yaml").to_str().unwrap(),
        "--set",
        "training.optim=adamw_9bit",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("adamw_9bit") && e.contains("paged_adamw_8bit"), "{e}");
}

#[test]
#[ignore = "learning proof: make test-learning"]
fn smollm2_sft_lora_and_qlora_learn_a_held_out_persona() {
    let (before, texts) = compliance(None);
    println!("base model: {:.0}% of held-out answers start with \"Ahoy!\" (e.g. {:?})", before * 100.0, texts[0]);
    assert!(before <= 0.125, "the base model should not follow the persona: {texts:?}");
    let t = tempfile::tempdir().unwrap();
    let lora = t.path().join("lora");
    train(&lora, &["--max-steps", "30"]);
    let (after, texts) = compliance(Some(&lora));
    println!("LoRA (all-linear, r=8, 30 steps): {:.0}% (e.g. {:?})", after * 100.0, texts[0]);
    assert!(after >= 0.875, "LoRA: {texts:?}");
    let qlora = t.path().join("qlora");
    train(&qlora, &["--max-steps", "30", "--set", "adapter.method=qlora"]);
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(qlora.join("ferrotune_train.json")).unwrap()).unwrap();
    assert_eq!(info["base_quantization"], "nf4");
    let (after_q, texts) = compliance(Some(&qlora));
    println!("QLoRA (NF4 base, all-linear, r=8, 30 steps): {:.0}% (e.g. {:?})", after_q * 100.0, texts[0]);
    assert!(after_q >= 0.875, "QLoRA: {texts:?}");
    // The adapter is in PEFT's layout and the metrics log covers every step.
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(lora.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["peft_type"].as_str(), cfg["r"].as_i64()), (Some("LORA"), Some(8)));
    assert_eq!(std::fs::read_to_string(lora.join("metrics.jsonl")).unwrap().lines().count(), 30);
}

/// `--set model=…` for the tiny chat model: the plumbing tests train it instead of SmolLM2.
fn tiny() -> String {
    format!("model={}", tiny_chat_dir().display())
}

#[test]
fn sft_killed_with_sigkill_and_resumed_equals_uninterrupted() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny();
    let small = [
        "--set",
        &model,
        "--max-steps",
        "160",
        "--set",
        "training.save_steps=20",
        "--set",
        "training.micro_batch_size=1",
        "--set",
        "training.warmup_steps=0",
    ];
    let full = t.path().join("full");
    train(&full, &small);
    let resumed = t.path().join("resumed");
    let recipe = repo("recipes/lora-sft.yaml");
    let data = format!("data.path={}", repo("recipes/data/pirate-train.jsonl").display());
    let mut args = vec![
        "train",
        "sft",
        "--recipe",
        recipe.to_str().unwrap(),
        "--output-dir",
        resumed.to_str().unwrap(),
        "--set",
        &data,
        "--json",
    ];
    args.extend(small);
    let mut child = Command::new(ferrotune_bin())
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while ferrotune_tests::newest_checkpoint(&resumed).unwrap_or(0) < 40 {
        assert!(start.elapsed().as_secs() < 300, "no checkpoint appeared");
        assert!(child.try_wait().unwrap().is_none(), "training ended before it could be killed");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!resumed.join("adapter_model.safetensors").exists(), "killed too late to test anything");
    args.push("--resume");
    let o = run_cli(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let a = std::fs::read(full.join("adapter_model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("adapter_model.safetensors")).unwrap();
    assert!(a == b, "the resumed run's adapter differs from the uninterrupted run's");
}

#[test]
fn smollm2_sft_bad_recipes_are_clear_errors() {
    let t = tempfile::tempdir().unwrap();
    let base = std::fs::read_to_string(repo("recipes/lora-sft.yaml")).unwrap();
    let cases = [
        (base.replace("learning_rate: 1.0e-3", "lerning_rate: 1.0e-3"), "unknown field `lerning_rate`"),
        (base.replace("r: 8", "r: 0"), "LoRA r must be positive"),
        (base.replace("learning_rate: 1.0e-3", "learning_rate: -1.0"), "learning_rate"),
        (base.replace("recipes/data/pirate-train.jsonl", "/nonexistent/data.jsonl"), "/nonexistent/data.jsonl"),
        (base.replace("method: lora", "method: magic"), "adapter.method `magic`"),
        (base.replace("format: messages", "format: poetry"), "unknown variant `poetry`"),
    ];
    for (i, (text, needle)) in cases.iter().enumerate() {
        let p = t.path().join(format!("r{i}.yaml"));
        std::fs::write(&p, text).unwrap();
        let o = run_cli(&[
            "train",
            "sft",
            "--recipe",
            p.to_str().unwrap(),
            "--output-dir",
            t.path().join("o").to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle) && err.trim_end().lines().count() == 1, "case {i}: {err}");
    }
    let o = run_cli(&["train", "sft", "--recipe", "/nonexistent/recipe.yaml"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/recipe.yaml"));
}

#[test]
#[ignore = "learning proof: make test-learning"]
fn smollm2_sft_full_fine_tuning_writes_a_model_that_learned() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("full");
    train(&out, &["--max-steps", "10", "--set", "adapter.method=full", "--set", "training.learning_rate=5e-5"]);
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(out.join(f).exists(), "{f} missing from the fine-tuned model dir");
    }
    let (after, texts) = compliance_of(&out, None);
    println!("full fine-tuning (10 steps): {:.0}% (e.g. {:?})", after * 100.0, texts[0]);
    assert!(after >= 0.75, "full fine-tuning: {texts:?}");
    // The same with bitsandbytes' 8-bit AdamW (transformers' `optim="adamw_8bit"`).
    let out8 = t.path().join("full8");
    let o = train(
        &out8,
        &[
            "--max-steps",
            "10",
            "--set",
            "adapter.method=full",
            "--set",
            "training.learning_rate=5e-5",
            "--set",
            "training.optim=adamw_8bit",
        ],
    );
    let (line, mb8, mb32) = optimizer_state(&o);
    let (after8, texts) = compliance_of(&out8, None);
    println!("full fine-tuning with adamw_8bit (10 steps): {:.0}% (e.g. {:?}); {line}", after8 * 100.0, texts[0]);
    assert!(after8 >= 0.75, "full fine-tuning, adamw_8bit: {texts:?}");
    assert!(mb8 < 0.5 * mb32, "{line}");
}

#[test]
#[ignore = "learning proof: make test-learning"]
fn smollm2_sft_prompt_tuning_learns_the_persona() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("pt");
    let recipe = repo("recipes/prompt-tuning.yaml");
    let data = format!("data.path={}", repo("recipes/data/pirate-train.jsonl").display());
    let o = run_cli(&[
        "train",
        "sft",
        "--recipe",
        recipe.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--set",
        &data,
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (cfg["peft_type"].as_str(), cfg["num_virtual_tokens"].as_i64(), cfg["token_dim"].as_i64()),
        (Some("PROMPT_TUNING"), Some(20), Some(576))
    );
    let (after, texts) = compliance(Some(&out));
    println!("prompt tuning (20 virtual tokens, 30 steps): {:.0}% (e.g. {:?})", after * 100.0, texts[0]);
    assert!(after >= 0.75, "prompt tuning: {texts:?}");
}

#[test]
fn sft_sigint_checkpoints_and_exits_cleanly() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny();
    let out = t.path().join("int");
    let recipe = repo("recipes/lora-sft.yaml");
    let data = format!("data.path={}", repo("recipes/data/pirate-train.jsonl").display());
    let args = [
        "train",
        "sft",
        "--recipe",
        recipe.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--set",
        &data,
        "--set",
        &model,
        "--max-steps",
        "1000000",
        "--set",
        "training.save_steps=1",
        "--set",
        "training.micro_batch_size=1",
        "--json",
    ];
    let mut child = Command::new(ferrotune_bin())
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while ferrotune_tests::newest_checkpoint(&out).is_none() {
        assert!(start.elapsed().as_secs() < 300 && child.try_wait().unwrap().is_none(), "no checkpoint appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let ok = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(ok.success());
    let o = child.wait_with_output().unwrap();
    assert!(o.status.success(), "SIGINT should end the run cleanly");
    let last: serde_json::Value =
        serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().last().unwrap()).unwrap();
    assert_eq!(last["stopped"], true);
    let step = last["step"].as_u64().unwrap();
    assert!(step < 1_000_000 && out.join(format!("checkpoints/step-{step:08}")).exists(), "checkpoint of step {step}");
}

#[test]
fn merge_gives_the_perplexity_of_base_plus_adapter() {
    let t = tempfile::tempdir().unwrap();
    let q = t.path().join("qlora");
    train(&q, &["--max-steps", "5", "--set", "adapter.method=qlora", "--set", &tiny()]);
    let m = tiny_chat_dir();
    let text = t.path().join("t.txt");
    std::fs::write(&text, "Ahoy! The capital of Kenya is Nairobi. Arr. What is 2 plus 2? Ahoy! 2 plus 2 is 4. Arr.")
        .unwrap();
    let nll = |args: &[&str]| {
        let mut a = vec!["eval", "perplexity", "--text-file", text.to_str().unwrap()];
        a.extend(args);
        ferrotune_tests::run_json(&a)["mean_nll"].as_f64().unwrap()
    };
    let with_adapter = nll(&["--model", m.to_str().unwrap(), "--adapter", q.to_str().unwrap()]);
    for (base, want) in [(None, "nf4_dequantized"), (Some("original"), "original")] {
        let out = t.path().join(format!("merged-{want}"));
        let mut args = vec![
            "merge",
            "--model",
            m.to_str().unwrap(),
            "--adapter",
            q.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(b) = base {
            args.extend(["--base", b]);
        }
        let r = ferrotune_tests::run_json(&args);
        assert_eq!(r["merge_base"], want);
        assert_eq!(r["merged_layers"], 14, "all-linear on 2 layers");
        let cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["ferrotune_merge"]["merge_base"], want);
        let merged = nll(&["--model", out.to_str().unwrap()]);
        if want == "nf4_dequantized" {
            assert!((merged - with_adapter).abs() < 1e-4, "merged {merged} vs base+adapter {with_adapter}");
        } else {
            // Folding a QLoRA adapter into the original weights changes the model (the DESIGN's known trap).
            assert!(
                (merged - with_adapter).abs() > 1e-3,
                "original-base merge should differ: {merged} vs {with_adapter}"
            );
        }
    }
}

#[test]
fn sft_trains_dora_with_loraplus_and_refuses_dora_on_a_non_linear_target() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("dora");
    let model = tiny();
    train(
        &out,
        &[
            "--set",
            &model,
            "--max-steps",
            "3",
            "--set",
            "adapter.use_dora=true",
            "--set",
            "training.loraplus_lr_ratio=16",
        ],
    );
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["use_dora"], true);
    let w = ferrotune_core::weights::WeightFiles::open_files(&[out.join("adapter_model.safetensors")]).unwrap();
    let magnitudes = w.names().filter(|k| k.ends_with(".lora_magnitude_vector")).count();
    let a = w.names().filter(|k| k.ends_with(".lora_A.weight")).count();
    assert!(magnitudes > 0 && magnitudes == a, "{magnitudes} magnitude vectors for {a} adapted modules");
    let recipe = repo("recipes/lora-sft.yaml");
    let o = run_cli(&[
        "train",
        "sft",
        "--recipe",
        recipe.to_str().unwrap(),
        "--output-dir",
        t.path().join("bad").to_str().unwrap(),
        "--set",
        &model,
        "--set",
        &format!("data.path={}", repo("recipes/data/pirate-train.jsonl").display()),
        "--set",
        "adapter.use_dora=true",
        "--set",
        "adapter.target_modules=[q_proj, embed_tokens]",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.trim_end().lines().count() == 1, "{e}");
    assert!(e.contains("use_dora") && e.contains("embed_tokens") && e.contains("not a linear layer"), "{e}");
}

#[test]
#[ignore = "learning proof: make test-learning"]
fn smollm2_sft_prefix_tuning_learns_the_persona() {
    let (before, _) = compliance(None);
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("prefix");
    let recipe = repo("recipes/prefix-tuning.yaml");
    let data = format!("data.path={}", repo("recipes/data/pirate-train.jsonl").display());
    let o = run_cli(&[
        "train",
        "sft",
        "--recipe",
        recipe.to_str().unwrap(),
        "--output-dir",
        out.to_str().unwrap(),
        "--set",
        &data,
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (cfg["peft_type"].as_str(), cfg["num_virtual_tokens"].as_i64(), cfg["token_dim"].as_i64()),
        (Some("PREFIX_TUNING"), Some(20), Some(192)),
        "SmolLM2: head_dim 64 × 3 KV heads"
    );
    let (after, texts) = compliance(Some(&out));
    println!(
        "prefix tuning (20 virtual tokens, 30 steps): held-out persona {:.0}% → {:.0}% (e.g. {:?})",
        before * 100.0,
        after * 100.0,
        texts[0]
    );
    assert!(before == 0.0 && after >= 0.9, "prefix tuning: {texts:?}");
}

#[test]
fn sft_prefix_tuning_trains_the_tiny_model_and_refuses_what_it_cannot_do() {
    let t = tempfile::tempdir().unwrap();
    let model = tiny();
    let recipe = repo("recipes/prefix-tuning.yaml");
    let data = format!("data.path={}", repo("recipes/data/pirate-train.jsonl").display());
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            "sft",
            "--recipe",
            recipe.to_str().unwrap(),
            "--output-dir",
            out.to_str().unwrap(),
            "--set",
            &data,
            "--set",
            &model,
            "--max-steps",
            "3",
        ];
        args.extend(extra);
        run_cli(&args)
    };
    let out = t.path().join("prefix");
    let o = run(&out, &["--set", "adapter.prefix_projection=true", "--set", "training.gradient_checkpointing=true"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["peft_type"].as_str(), cfg["prefix_projection"].as_bool()), (Some("PREFIX_TUNING"), Some(true)));
    assert!(out.join("prefix_encoder.safetensors").is_file(), "the raw projection is kept to resume");
    // The adapter generates through the CLI (the prefix fills the KV cache).
    let o = run_cli(&[
        "generate",
        "--model",
        tiny_chat_dir().to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--chat",
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // On an NF4 base (TRL's load_in_4bit), generating with it quantizes the base the same way.
    let nf4 = t.path().join("prefix-nf4");
    let o = run(&nf4, &["--set", "adapter.load_in_4bit=true"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(nf4.join("ferrotune_train.json")).unwrap()).unwrap();
    assert_eq!(info["base_quantization"], "nf4");
    let o = run_cli(&[
        "generate",
        "--model",
        tiny_chat_dir().to_str().unwrap(),
        "--adapter",
        nf4.to_str().unwrap(),
        "--chat",
        "--prompt",
        "Hello",
        "--max-new-tokens",
        "4",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    // One line each: no virtual tokens, and a merge (a prefix is not a weight delta).
    let o = run(&t.path().join("zero"), &["--set", "adapter.num_virtual_tokens=0"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.trim_end().lines().count() == 1 && e.contains("adapter.num_virtual_tokens"),
        "{e}"
    );
    let o = run_cli(&[
        "merge",
        "--model",
        tiny_chat_dir().to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--out",
        t.path().join("merged").to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.trim_end().lines().count() == 1 && e.contains("cannot be merged"), "{e}");
}

#[test]
#[ignore = "learning proof: make test-learning"]
fn smollm2_sft_dora_with_loraplus_learns_a_held_out_persona() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("dora");
    let o = train(
        &out,
        &[
            "--max-steps",
            "30",
            "--set",
            "adapter.use_dora=true",
            "--set",
            "training.loraplus_lr_ratio=4",
            "--set",
            "training.optim=paged_adamw_32bit",
        ],
    );
    let (after, texts) = compliance(Some(&out));
    let (line, ..) = optimizer_state(&o);
    println!("DoRA + LoRA+ (ratio 4, all-linear, r=8, 30 steps): {:.0}% (e.g. {:?}); {line}", after * 100.0, texts[0]);
    assert!(after >= 0.875, "DoRA: {texts:?}");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["use_dora"], true);
}

#[test]
fn sft_chat_template_from_the_recipe_is_used_for_data_adapter_and_generation() {
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("zephyr");
    let model = tiny();
    train(&out, &["--set", &model, "--max-steps", "2", "--set", "chat_template=zephyr"]);
    let zephyr = ferrotune_core::chat::ZEPHYR;
    assert_eq!(std::fs::read_to_string(out.join("chat_template.jinja")).unwrap(), zephyr, "the adapter keeps it");
    assert_eq!(std::fs::read_to_string(out.join("dataset/chat_template.jinja")).unwrap(), zephyr, "the data used it");
    let info: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("ferrotune_train.json")).unwrap()).unwrap();
    assert_eq!(info["chat_template"], "named");
    // Generation with the adapter renders with it (the tiny model's own template is ChatML-like).
    let o = run_cli(&[
        "generate",
        "--model",
        tiny_chat_dir().to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--chat",
        "--prompt",
        "Hi",
        "--max-new-tokens",
        "2",
        "--json",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["chat_template"], "adapter", "{v}");
    // A Jinja file works too; an unknown name is one line naming the key.
    let file = t.path().join("mine.jinja");
    std::fs::write(&file, "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}").unwrap();
    let out2 = t.path().join("file");
    train(&out2, &["--set", &model, "--max-steps", "2", "--set", &format!("chat_template={}", file.display())]);
    assert!(std::fs::read_to_string(out2.join("chat_template.jinja"))
        .unwrap()
        .starts_with("{% for m in messages %}[{{"));
    let recipe = repo("recipes/lora-sft.yaml");
    let data = format!("data.path={}", repo("recipes/data/pirate-train.jsonl").display());
    let bad = t.path().join("bad");
    let o = run_cli(&[
        "train",
        "sft",
        "--recipe",
        recipe.to_str().unwrap(),
        "--set",
        &model,
        "--set",
        &data,
        "--output-dir",
        bad.to_str().unwrap(),
        "--set",
        "chat_template=nope",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("chat_template: `nope` is neither a known template"), "{e}");
}
