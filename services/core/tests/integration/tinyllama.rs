//! The seed's model family: an HF dir shaped like TinyLlama-1.1B-Chat (Llama, a SentencePiece vocabulary with
//! byte fallback laid out as TinyLlama's `tokenizer.json`, its Zephyr chat template), made by
//! `tests/fixtures/make_tiny_llama_spm.py` with transformers, since the real weights cannot be fetched here.
//! Loads with transformers' token ids, decoded texts, rendered chat and logits; trains with LoRA and merges
//! into a model with the adapter's logits.

use std::path::PathBuf;

use ferrotune_core::chat::Message;
use ferrotune_core::{load_model, ChatTemplate, Tokenizer};
use tch::{Device, Kind, Tensor};

fn dir() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama-spm")
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir().join("reference.json")).unwrap()).unwrap()
}

fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|i| i.as_u64().unwrap() as u32).collect()
}

#[test]
fn a_tinyllama_shaped_dir_tokenizes_renders_and_computes_as_transformers() {
    let r = reference();
    let tok = Tokenizer::from_dir(&dir()).unwrap();
    for case in r["strings"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want = ids(&case["ids"]);
        assert_eq!(tok.encode_no_special(text).unwrap(), want, "{text:?}");
        assert_eq!(tok.decode(&want, true).unwrap(), case["decoded"].as_str().unwrap(), "{text:?}");
    }
    let want = ids(&r["logits_ids"]);
    assert_eq!(tok.encode(r["logits_text"].as_str().unwrap()).unwrap(), want, "with BOS");
    let chat: Vec<Message> = r["chat"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| Message::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
        .collect();
    let t = ChatTemplate::from_dir(&dir()).unwrap();
    assert_eq!(t.render(&chat, true).unwrap(), r["chat_rendered"].as_str().unwrap());
    let m = load_model(&dir(), Kind::Float, Device::Cpu).unwrap();
    let input = Tensor::from_slice(&want.iter().map(|&i| i as i64).collect::<Vec<_>>()).unsqueeze(0);
    let got = tch::no_grad(|| m.forward(&input, None, None)).unwrap().squeeze_dim(0);
    let rows: Vec<Vec<f32>> = r["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row.as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect())
        .collect();
    let want = Tensor::from_slice(&rows.concat()).view([rows.len() as i64, -1]);
    let d = (&got - &want).abs().max().double_value(&[]);
    assert!(d < 2e-5, "max |Δlogit| {d} (reference rounded to 1e-6)");
}

#[test]
fn lora_trains_on_the_tinyllama_shaped_model_and_merges() {
    crate::new_families::lora_and_merge_dir(&dir(), "tiny-llama-spm");
}
