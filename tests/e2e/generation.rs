//! Chat templates and generation on SmolLM2 against HF transformers' references, plus the engine's
//! own invariants (KV cache vs full forward, batching, seeds, stop strings) and bad input.

use ferrotune_core::generation::FinishReason;
use ferrotune_core::{generate, GenerateOptions, Generated, Message, ModelBundle, SamplingParams};
use ferrotune_tests::{fixture, hf_reference, run_cli, run_json, smollm2_dir};
use tch::{Device, Kind, Tensor};

fn bundle() -> ModelBundle {
    ModelBundle::load(&smollm2_dir(), Kind::Float, Device::Cpu).expect("load SmolLM2")
}

fn greedy(b: &ModelBundle, max_new_tokens: usize) -> GenerateOptions {
    GenerateOptions {
        max_new_tokens,
        sampling: SamplingParams::default(),
        seed: 0,
        eos_ids: b.defaults.eos_ids.clone(),
        stop_strings: vec![],
        pad_id: b.defaults.pad_id,
    }
}

fn run(b: &ModelBundle, prompts: &[Vec<u32>], o: &GenerateOptions) -> Vec<Generated> {
    generate(&b.model, &b.tokenizer, prompts, o, &mut |_| {}).expect("generate")
}

fn messages(v: &serde_json::Value) -> Vec<Message> {
    serde_json::from_value(v.clone()).expect("messages")
}

fn u32s(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().expect("array").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

#[test]
fn smollm2_chat_templates_equal_transformers() {
    let b = bundle();
    assert_eq!(b.template.origin(), ferrotune_core::chat::TemplateOrigin::TokenizerConfig);
    for case in hf_reference()["greedy"].as_array().unwrap() {
        assert_eq!(b.chat_prompt(&messages(&case["messages"])).unwrap(), u32s(&case["prompt_ids"]));
    }
    let cases: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2-chat.json")).unwrap()).unwrap();
    for case in cases.as_array().unwrap() {
        let m = messages(&case["messages"]);
        let gen = case["add_generation_prompt"].as_bool().unwrap();
        let text = b.template.render(&m, gen).unwrap();
        assert_eq!(text, case["text"].as_str().unwrap());
        assert_eq!(b.tokenizer.encode_no_special(&text).unwrap(), u32s(&case["ids"]), "{text:?}");
    }
}

#[test]
fn smollm2_greedy_generation_reproduces_transformers() {
    let b = bundle();
    for case in hf_reference()["greedy"].as_array().unwrap() {
        let prompt = u32s(&case["prompt_ids"]);
        let g = run(&b, &[prompt], &greedy(&b, 40)).remove(0);
        assert_eq!(g.ids, u32s(&case["new_ids"]), "{:?}", g.text);
        assert_eq!(g.text, case["text"].as_str().unwrap());
    }
}

#[test]
fn smollm2_cached_logprobs_equal_full_forward() {
    // Per-token log-probs from KV-cache decoding vs one forward over prompt + generated text.
    let b = bundle();
    let prompt = b.chat_prompt(&[Message::new("user", "Tell me about rivers.")]).unwrap();
    let g = run(&b, std::slice::from_ref(&prompt), &greedy(&b, 24)).remove(0);
    let all: Vec<i64> = prompt.iter().chain(&g.ids).map(|&t| t as i64).collect();
    let logits = tch::no_grad(|| b.model.forward(&Tensor::from_slice(&all).unsqueeze(0), None, None)).unwrap();
    let lp = logits.get(0).to_kind(Kind::Double).log_softmax(-1, Kind::Double);
    let mut worst: f64 = 0.0;
    for (i, (&id, &got)) in g.ids.iter().zip(&g.logprobs).enumerate() {
        let want = lp.double_value(&[(prompt.len() + i - 1) as i64, id as i64]);
        worst = worst.max((want - got as f64).abs());
    }
    println!("max |Δ logprob| cached vs full forward over {} tokens: {worst:.2e}", g.ids.len());
    assert!(worst < 1e-4, "max |Δ logprob| {worst}");
}

#[test]
fn smollm2_batched_left_padded_equals_one_by_one() {
    let b = bundle();
    let prompts: Vec<Vec<u32>> =
        ["Hi", "What is 2 + 2? Answer with a number.", "Name three fruits that are red, please."]
            .iter()
            .map(|p| b.chat_prompt(&[Message::new("user", *p)]).unwrap())
            .collect();
    assert!(prompts[0].len() != prompts[2].len());
    let o = greedy(&b, 20);
    let batched = run(&b, &prompts, &o);
    for (p, got) in prompts.iter().zip(&batched) {
        let alone = run(&b, std::slice::from_ref(p), &o).remove(0);
        assert_eq!(got.ids, alone.ids);
        assert_eq!(got.finish_reason, alone.finish_reason);
        for (x, y) in got.logprobs.iter().zip(&alone.logprobs) {
            assert!((x - y).abs() < 1e-3, "logprob {x} vs {y}");
        }
    }
}

#[test]
fn smollm2_seeded_sampling_is_reproducible() {
    let b = bundle();
    let prompt = b.chat_prompt(&[Message::new("user", "Write a short poem about the sea.")]).unwrap();
    let mut o = greedy(&b, 24);
    o.sampling =
        SamplingParams { greedy: false, temperature: 1.0, top_p: Some(0.95), top_k: Some(50), repetition_penalty: 1.1 };
    let sample = |seed| {
        let mut o = o.clone();
        o.seed = seed;
        run(&b, std::slice::from_ref(&prompt), &o).remove(0).ids
    };
    let (a, a2, c) = (sample(11), sample(11), sample(12));
    assert_eq!(a, a2, "same seed, same sample");
    assert_ne!(a, c, "different seeds should differ");
}

#[test]
fn smollm2_stops_on_stop_string_and_length() {
    let b = bundle();
    let prompt = b.chat_prompt(&[Message::new("user", "What is the capital of France?")]).unwrap();
    let mut o = greedy(&b, 40);
    o.stop_strings = vec![" Paris".into()];
    let g = run(&b, std::slice::from_ref(&prompt), &o).remove(0);
    assert_eq!(g.finish_reason, FinishReason::Stop);
    assert_eq!(g.text, "The capital of France is");
    let g = run(&b, &[prompt], &greedy(&b, 3)).remove(0);
    assert_eq!((g.finish_reason, g.ids.len()), (FinishReason::Length, 3));
}

#[test]
fn smollm2_generation_rejects_bad_input() {
    let b = bundle();
    let o = greedy(&b, 4);
    let err = |prompts: &[Vec<u32>], o: &GenerateOptions| {
        generate(&b.model, &b.tokenizer, prompts, o, &mut |_| {}).unwrap_err().to_string()
    };
    assert!(err(&[vec![]], &o).contains("prompt #0 is empty"));
    assert!(err(&[], &o).contains("no prompts"));
    assert!(err(&[vec![1; 8192]], &o).contains("does not fit the model's context of 8192"));
    assert!(err(&[vec![49152]], &o).contains("outside the vocabulary"));
    let mut bad = o.clone();
    bad.sampling = SamplingParams { greedy: false, temperature: -1.0, ..SamplingParams::default() };
    assert!(err(&[vec![1]], &bad).contains("temperature"));
    assert!(b.chat_prompt(&[Message::new("robot", "hi")]).unwrap_err().to_string().contains("unknown role `robot`"));
}

#[test]
fn smollm2_cli_generate_answers_paris() {
    let m = smollm2_dir();
    let v =
        run_json(&["generate", "--model", m.to_str().unwrap(), "--chat", "--prompt", "What is the capital of France?"]);
    assert!(v["text"].as_str().unwrap().contains("Paris"), "{v}");
    assert_eq!(v["finish_reason"], "eos");
    assert_eq!(v["chat_template"], "tokenizer_config");
    assert_eq!(v["new_tokens"].as_u64().unwrap() as usize, v["ids"].as_array().unwrap().len());
    assert!(v["tokens_per_s"].as_f64().unwrap() > 0.0);
}

#[test]
fn smollm2_cli_generate_bad_input() {
    let m = smollm2_dir();
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("chat.json");
    std::fs::write(&bad, r#"[{"role": "user"}]"#).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (vec!["--chat-file", bad.to_str().unwrap()], "chat.json"),
        (vec!["--prompt", ""], "--prompt is empty"),
        (vec!["--prompt", "hi", "--top-p", "2"], "top_p"),
        (vec!["--prompt", "hi", "--top-p", "NaN"], "top_p"),
        (vec!["--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1"),
        (vec!["--prompt", "hi", "--temperature=-1"], "--temperature must be a number > 0"),
        (vec!["--prompt", "hi", "--temperature", "NaN"], "--temperature must be a number > 0"),
    ];
    for (extra, needle) in cases {
        let mut args = vec!["generate", "--model", m.to_str().unwrap()];
        args.extend(extra);
        let out = run_cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(needle) && err.trim_end().lines().count() == 1,
            "{args:?}: {err}"
        );
    }
    std::fs::write(&bad, r#"[{"role": "wizard", "content": "x"}]"#).unwrap();
    let out = run_cli(&["generate", "--model", m.to_str().unwrap(), "--chat-file", bad.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown role `wizard`"));
}

#[test]
fn smollm2_stream_decoder_pieces_concatenate_to_the_text() {
    let tok = ferrotune_core::Tokenizer::from_dir(&smollm2_dir()).unwrap();
    for text in ["Ahoy! It is Cairo.", "café 😀 naïve — 東京", "  spaces\\tand\nlines "] {
        let ids = tok.encode(text).unwrap();
        let mut d = ferrotune_core::tokenizer::StreamDecoder::default();
        let pieces: Vec<String> = ids.iter().map(|&id| d.push(&tok, id)).collect();
        assert_eq!(pieces.concat(), tok.decode(&ids, true).unwrap(), "{text:?}: {pieces:?}");
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{text:?}: {pieces:?}");
    }
}
