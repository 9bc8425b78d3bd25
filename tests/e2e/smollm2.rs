//! SmolLM2-135M-Instruct imported by our GGUF importer reproduces HF transformers' numbers.

use ferrotune_tests::{fixture, hf_reference, run_json, smollm2_dir};

#[test]
fn smollm2_pull_is_idempotent_and_complete() {
    let dir = smollm2_dir();
    let again = run_json(&["models", "pull", "smollm2-135m-instruct"]);
    assert_eq!(again["path"].as_str(), dir.to_str());
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        assert!(dir.join(f).exists(), "{f} missing in {}", dir.display());
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["num_hidden_layers"], 30);
    assert_eq!(cfg["hidden_size"], 576);
    assert_eq!(cfg["num_attention_heads"], 9);
    assert_eq!(cfg["num_key_value_heads"], 3);
    assert_eq!(cfg["vocab_size"], 49152);
    assert_eq!(cfg["tie_word_embeddings"], true);
    assert_eq!(cfg["rope_theta"], 100000.0);
    let tc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap()).unwrap();
    assert!(tc["chat_template"].as_str().unwrap().contains("<|im_start|>"));
    assert_eq!(tc["eos_token"], "<|im_end|>");
}

#[test]
fn smollm2_token_ids_equal_transformers() {
    let dir = smollm2_dir();
    let model = dir.to_str().unwrap();
    let reference = hf_reference();
    for case in reference["tokenize"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let got = run_json(&["tokenize", "--model", model, "--text", text]);
        assert_eq!(got["ids"], case["ids"], "text {text:?}");
    }
    // The chat prompts of the greedy fixtures, rendered by transformers, tokenize back to the same ids.
    let tok = ferrotune_core::Tokenizer::from_dir(&dir).unwrap();
    for case in reference["greedy"].as_array().unwrap() {
        let ids: Vec<u32> = case["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        let text = tok.decode(&ids, false).unwrap();
        assert_eq!(tok.encode(&text).unwrap(), ids, "round trip of {text:?}");
    }
}

#[test]
fn smollm2_token_ids_equal_hf_tokenizers_on_extra_strings() {
    let dir = smollm2_dir();
    let tok = ferrotune_core::Tokenizer::from_dir(&dir).unwrap();
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2-tokenize.json")).unwrap()).unwrap();
    let mut differ_from_transformers_gguf = 0;
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
        assert_eq!(tok.encode(text).unwrap(), want, "text {text:?}");
        differ_from_transformers_gguf += usize::from(case["ids"] != case["transformers_gguf_ids"]);
    }
    // Only the non-ASCII numerals case, where transformers' GGUF converter ignores `tokenizer.ggml.pre`.
    assert_eq!(differ_from_transformers_gguf, 1);
}

#[test]
fn smollm2_perplexity_matches_transformers() {
    let dir = smollm2_dir();
    let reference = hf_reference();
    let ppl = &reference["perplexity"];
    let tmp = tempfile::tempdir().unwrap();
    let text_file = tmp.path().join("text.txt");
    std::fs::write(&text_file, ppl["text"].as_str().unwrap()).unwrap();
    let got =
        run_json(&["eval", "perplexity", "--model", dir.to_str().unwrap(), "--text-file", text_file.to_str().unwrap()]);
    assert_eq!(got["tokens"], ppl["tokens"]);
    let d = (got["mean_nll"].as_f64().unwrap() - ppl["mean_nll"].as_f64().unwrap()).abs();
    println!("SmolLM2 mean NLL {} vs transformers {} (|Δ| = {d:.2e})", got["mean_nll"], ppl["mean_nll"]);
    assert!(d < 1e-4, "|Δ mean NLL| = {d}");
    let p = (got["perplexity"].as_f64().unwrap() / ppl["perplexity"].as_f64().unwrap() - 1.0).abs();
    assert!(p < 1e-4, "perplexity off by {p} (relative)");
}

#[test]
fn smollm2_windowed_perplexity_scores_every_token_once() {
    // A text longer than the window: windows of 16 with stride 8 in batches of 3 (the arithmetic is
    // checked against a naive computation in the core tests). Every token is counted, and short windows
    // lose the context that makes repeated text predictable.
    let dir = smollm2_dir();
    let text = hf_reference()["perplexity"]["text"].as_str().unwrap().repeat(3);
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("long.txt");
    std::fs::write(&f, &text).unwrap();
    let (m, fp) = (dir.to_str().unwrap(), f.to_str().unwrap());
    let full = run_json(&["eval", "perplexity", "--model", m, "--text-file", fp]);
    let windowed = run_json(&[
        "eval",
        "perplexity",
        "--model",
        m,
        "--text-file",
        fp,
        "--window",
        "16",
        "--stride",
        "8",
        "--batch",
        "3",
    ]);
    assert_eq!(full["tokens"], windowed["tokens"]);
    let (a, b) = (full["mean_nll"].as_f64().unwrap(), windowed["mean_nll"].as_f64().unwrap());
    // Repeated text is predictable with full context: the full-context loss must be lower.
    assert!(a + 1.0 < b, "full context {a} should clearly beat 8-to-16-token context {b}");
}

#[test]
fn smollm2_nf4_base_stays_close_to_f32() {
    // QLoRA's frozen base: every decoder linear layer in NF4 (double-quantized), embeddings/norms/lm_head f32.
    let dir = smollm2_dir();
    let text = hf_reference()["perplexity"]["text"].as_str().unwrap().to_owned();
    let tok = ferrotune_core::Tokenizer::from_dir(&dir).unwrap();
    let ids = tok.encode(&text).unwrap();
    let mut model = ferrotune_core::load_model(&dir, tch::Kind::Float, tch::Device::Cpu).unwrap();
    let f32_nll = ferrotune_core::perplexity(&model, &ids, Default::default()).unwrap().mean_nll;
    let (before, after) = model.quantize_nf4().unwrap();
    let nf4_nll = ferrotune_core::perplexity(&model, &ids, Default::default()).unwrap().mean_nll;
    println!(
        "SmolLM2 linear layers: f32 {:.1} MB → NF4 {:.1} MB; mean NLL {f32_nll:.4} → {nf4_nll:.4}",
        before as f64 / 1e6,
        after as f64 / 1e6
    );
    assert!((after as f64 / before as f64) < 0.13);
    // bitsandbytes' NF4 round trip of the same weights gives this NLL (tests/fixtures/smollm2-nf4.json).
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2-nf4.json")).unwrap()).unwrap();
    let want = r["nf4_mean_nll"].as_f64().unwrap();
    assert!((nf4_nll - want).abs() < 1e-4, "NF4 NLL {nf4_nll} vs bitsandbytes {want}");
}
