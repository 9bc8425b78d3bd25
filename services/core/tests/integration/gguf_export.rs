//! GGUF export: the tiny chat model (Llama: permuted q/k, tied embeddings, SmolLM2's byte-level vocabulary and
//! chat template) and a tiny Qwen2 with biases and a merged PEFT LoRA adapter go out as GGUF and come back through
//! the importer (checked against files written by the `gguf` package) with every tensor as the chosen type
//! stores it: f32 exactly, f16 as the weights rounded to half, q8_0 within half a quantization step; the same
//! logits in f32, the same token ids for test strings, the same chat template.

use std::path::{Path, PathBuf};

use ferrotune_core::gguf::GgufFile;
use ferrotune_core::gguf_export::{export_gguf, ExportType};
use ferrotune_core::gguf_import::import_gguf;
use ferrotune_core::{load_model, ChatTemplate, Tokenizer};
use tch::{Device, Kind, Tensor};

use crate::common::{max_abs_diff, tiny_dir};

fn tiny_chat() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-chat")
}

fn weights(dir: &Path) -> Vec<(String, Tensor)> {
    let mut m = load_model(dir, Kind::Float, Device::Cpu).unwrap();
    let mut w = m.named_weights().unwrap();
    w.sort_by(|a, b| a.0.cmp(&b.0));
    w
}

fn logits(dir: &Path, ids: &Tensor) -> Tensor {
    let m = load_model(dir, Kind::Float, Device::Cpu).unwrap();
    tch::no_grad(|| m.forward(ids, None, None)).unwrap()
}

/// Exports and imports back. With `FERROTUNE_KEEP_EXPORTS=DIR`, the model dir and its GGUF are also copied to
/// `DIR/<model name>/` for `scripts/check_gguf_transformers.py` (dev-only: transformers loading them).
fn round_trip(model: &Path, adapter: Option<&Path>, ty: ExportType, t: &Path) -> (PathBuf, PathBuf) {
    let file = t.join(format!("{ty:?}.gguf"));
    export_gguf(model, adapter, &file, ty).unwrap();
    if let (Some(keep), None) = (std::env::var_os("FERROTUNE_KEEP_EXPORTS"), adapter) {
        let dir = Path::new(&keep).join(model.file_name().unwrap());
        std::fs::create_dir_all(&dir).unwrap();
        for e in std::fs::read_dir(model).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
        }
        std::fs::copy(&file, dir.join(format!("{ty:?}.gguf"))).unwrap();
    }
    let back = t.join(format!("{ty:?}-imported"));
    import_gguf(&file, &back).unwrap();
    (file, back)
}

#[test]
fn the_tiny_chat_model_round_trips_through_gguf() {
    let t = tempfile::tempdir().unwrap();
    let ids = Tensor::from_slice(&[1i64, 20, 300, 41, 7, 99, 2]).unsqueeze(0);
    let want = logits(&tiny_chat(), &ids);
    let original = weights(&tiny_chat());
    for ty in [ExportType::F32, ExportType::F16, ExportType::Q8_0, ExportType::Q4_0, ExportType::Q4KM] {
        let (file, back) = round_trip(&tiny_chat(), None, ty, t.path());
        let g = GgufFile::open(&file).unwrap();
        if ty == ExportType::Q4KM {
            // Rows of 64 do not split into 256-blocks: llama-quantize's fallbacks, Q4_K → Q5_0 and, for the tied
            // embedding (the output), Q6_K → Q8_0; vectors F32.
            use ferrotune_core::gguf::TensorType;
            let ty_of = |n: &str| g.tensor(n).unwrap().ty.unwrap();
            assert_eq!(ty_of("token_embd.weight"), TensorType::Q8_0);
            assert_eq!(ty_of("blk.0.ffn_down.weight"), TensorType::Q5_0);
            assert_eq!(ty_of("blk.1.attn_q.weight"), TensorType::Q5_0);
            assert_eq!(ty_of("blk.0.attn_norm.weight"), TensorType::F32);
        }
        assert_eq!(g.get_str("general.architecture").unwrap(), "llama");
        assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), "smollm");
        assert!(g.tensor("output.weight").is_none(), "tied embeddings are stored once");
        let imported = weights(&back);
        assert_eq!(imported.len(), original.len());
        for ((name, a), (name_b, b)) in original.iter().zip(&imported) {
            assert_eq!(name, name_b);
            let d = max_abs_diff(a, b);
            let matrix = a.dim() == 2;
            match (ty, matrix) {
                (ExportType::F32, _) | (_, false) => assert_eq!(d, 0.0, "{ty:?} {name}"),
                (ExportType::F16, true) => {
                    let half = a.to_kind(Kind::Half).to_kind(Kind::Float);
                    assert_eq!(max_abs_diff(&half, b), 0.0, "{name}: f16 rounding");
                }
                (ExportType::Q8_0, true) => {
                    // Half a step of each 32-block's scale d = max|x|/127, plus up to 127 codes × the f16
                    // rounding of d (2⁻¹¹ relative).
                    let amax = a.abs().view([-1, 32]).amax([1], true);
                    let err = (a.view([-1, 32]) - b.view([-1, 32])).abs();
                    let bound = amax / 127.0 * (0.5 + 127.0 / 2048.0) + 1e-7;
                    assert!(
                        bool::try_from(err.le_tensor(&bound).all()).unwrap(),
                        "{name}: q8_0 error beyond half a step"
                    );
                }
                (ExportType::Q4KM, true) if name != "model.embed_tokens.weight" => {
                    // Q5_0: d = max/−16, within one step |d| plus 16 codes × the f16 rounding of d.
                    let amax = a.abs().view([-1, 32]).amax([1], true);
                    let err = (a.view([-1, 32]) - b.view([-1, 32])).abs();
                    let bound = amax / 16.0 * (1.0 + 16.0 / 2048.0) + 1e-7;
                    assert!(bool::try_from(err.le_tensor(&bound).all()).unwrap(), "{name}: q5_0 error beyond a step");
                }
                (ExportType::Q4KM, true) => {
                    let amax = a.abs().view([-1, 32]).amax([1], true);
                    let err = (a.view([-1, 32]) - b.view([-1, 32])).abs();
                    let bound = amax / 127.0 * (0.5 + 127.0 / 2048.0) + 1e-7;
                    assert!(bool::try_from(err.le_tensor(&bound).all()).unwrap(), "{name}: q8_0 error");
                }
                (ExportType::Q4_0, true) => {
                    // d = max/−8: within one step |d| (the clamp at code 15 costs a full step for −max), plus
                    // 8 codes × the f16 rounding of d.
                    let amax = a.abs().view([-1, 32]).amax([1], true);
                    let err = (a.view([-1, 32]) - b.view([-1, 32])).abs();
                    let bound = amax / 8.0 * (1.0 + 8.0 / 2048.0) + 1e-7;
                    assert!(bool::try_from(err.le_tensor(&bound).all()).unwrap(), "{name}: q4_0 error beyond a step");
                }
            }
        }
        if ty == ExportType::F32 {
            assert!(max_abs_diff(&logits(&back, &ids), &want) < 1e-5, "f32 logits");
            let (a, b) = (Tokenizer::from_dir(&tiny_chat()).unwrap(), Tokenizer::from_dir(&back).unwrap());
            for s in ["Hello world!", "What is 1234 + 56?", "  spaces\tand\nlines <|im_start|>user"] {
                assert_eq!(a.encode_no_special(s).unwrap(), b.encode_no_special(s).unwrap(), "{s:?}");
            }
            let (ta, tb) = (ChatTemplate::from_dir(&tiny_chat()).unwrap(), ChatTemplate::from_dir(&back).unwrap());
            assert_eq!(ta.source(), tb.source(), "the chat template travels in the GGUF");
        }
    }
}

/// A copy of the tiny model `name` with a byte-level vocabulary cut from the chat model's to its 256 ids and
/// Qwen2's own pre-tokenizer (a regex split, then byte-level without its regex).
fn with_byte_level_vocabulary(name: &str, t: &Path) -> PathBuf {
    let model = t.join(name);
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(tiny_dir(name)).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    let mut tok: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tiny_chat().join("tokenizer.json")).unwrap()).unwrap();
    let vocab: serde_json::Map<String, serde_json::Value> = tok["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(_, id)| id.as_u64().unwrap() < 256)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let merges: Vec<serde_json::Value> = tok["model"]["merges"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| {
            let s = m.as_str().unwrap();
            let (a, b) = s.split_once(' ').unwrap();
            vocab.contains_key(a) && vocab.contains_key(b) && vocab.contains_key(&format!("{a}{b}"))
        })
        .cloned()
        .collect();
    tok["model"]["vocab"] = serde_json::Value::Object(vocab);
    tok["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
         "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]});
    tok["model"]["merges"] = serde_json::Value::Array(merges);
    std::fs::write(model.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::copy(tiny_chat().join("tokenizer_config.json"), model.join("tokenizer_config.json")).unwrap();
    model
}

#[test]
fn a_qwen2_with_a_merged_lora_adapter_round_trips() {
    let t = tempfile::tempdir().unwrap();
    // The tiny Qwen2 (q/k/v biases, no rotary permutation) with a byte-level vocabulary cut from the chat model's
    // to its 256 ids, and Qwen2's own pre-tokenizer (a regex split, then byte-level without its regex): exported
    // as `qwen2`.
    let model = with_byte_level_vocabulary("qwen2-bias", t.path());
    let adapter = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-lora/qwen2-qv-rslora");
    let ids = Tensor::from_slice(&[5i64, 17, 200, 3, 99]).unsqueeze(0);
    let mut with = load_model(&model, Kind::Float, Device::Cpu).unwrap();
    ferrotune_core::lora::load_peft(&mut with, &adapter).unwrap();
    let want = tch::no_grad(|| with.forward(&ids, None, None)).unwrap();
    let (file, back) = round_trip(&model, Some(&adapter), ExportType::F32, t.path());
    let g = GgufFile::open(&file).unwrap();
    assert_eq!(g.get_str("general.architecture").unwrap(), "qwen2");
    assert!(g.tensor("blk.0.attn_q.bias").is_some());
    assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), "qwen2");
    let (a, b) = (Tokenizer::from_dir(&model).unwrap(), Tokenizer::from_dir(&back).unwrap());
    for s in ["It's 12345 apples", "a\n\nb  c", "hello world"] {
        assert_eq!(a.encode_no_special(s).unwrap(), b.encode_no_special(s).unwrap(), "{s:?}");
    }
    let d = max_abs_diff(&logits(&back, &ids), &want);
    assert!(d < 1e-4, "base + adapter vs exported merge: {d}");
    assert!(max_abs_diff(&logits(&model, &ids), &want) > 1e-3, "the adapter matters");
}

/// The tiny model in `model` without its attention biases (`attention_bias: false`), as released Qwen3
/// checkpoints are.
fn without_biases(model: &Path) {
    let file = model.join("model.safetensors");
    let kept: Vec<(String, Tensor)> =
        Tensor::read_safetensors(&file).unwrap().into_iter().filter(|(n, _)| !n.ends_with(".bias")).collect();
    Tensor::write_safetensors(&kept, &file).unwrap();
    let path = model.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["attention_bias"] = serde_json::json!(false);
    std::fs::write(&path, cfg.to_string()).unwrap();
}

/// Qwen3 (q/k norms) and a Llama with Llama 3 rope scaling go out as `qwen3` and `llama`: the scaling as
/// llama.cpp keeps it (a `rope_freqs` tensor of per-frequency divisors) and recovered by the import; f32 logits
/// come back. A Qwen3 with `attention_bias` (an o_proj bias llama.cpp's qwen3 has no place for) is refused.
#[test]
fn qwen3_and_llama3_rope_models_round_trip() {
    let ids = Tensor::from_slice(&[5i64, 17, 200, 3, 99, 250, 7, 41, 8, 8, 120, 64]).unsqueeze(0);
    for (name, arch, tensor) in
        [("qwen3-qknorm", "qwen3", "blk.1.attn_k_norm.weight"), ("llama3-rope", "llama", "rope_freqs.weight")]
    {
        let t = tempfile::tempdir().unwrap();
        let model = with_byte_level_vocabulary(name, t.path());
        if arch == "qwen3" {
            let e = export_gguf(&model, None, &t.path().join("b.gguf"), ExportType::F16).unwrap_err().to_string();
            assert!(e.contains("o_proj") && e.contains("qwen3"), "{e}");
            without_biases(&model);
        }
        let (file, back) = round_trip(&model, None, ExportType::F32, t.path());
        let g = GgufFile::open(&file).unwrap();
        assert_eq!(g.get_str("general.architecture").unwrap(), arch);
        assert!(g.tensor(tensor).is_some(), "{name}: {tensor}");
        let d = max_abs_diff(&logits(&back, &ids), &logits(&model, &ids));
        assert!(d < 1e-5, "{name}: max |Δlogit| {d}");
        if name == "llama3-rope" {
            let cfg: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(back.join("config.json")).unwrap()).unwrap();
            assert_eq!(cfg["rope_scaling"]["rope_type"], "llama3");
            assert_eq!(cfg["rope_scaling"]["original_max_position_embeddings"].as_f64(), Some(16.0));
        }
    }
}

/// The spm fixture vocabulary (`tests/fixtures/spm`) cut to the tiny Gemma 3's 256 ids, as a Gemma
/// `tokenizer.json` (what an import of a Gemma GGUF writes).
fn gemma_vocabulary(model: &Path) {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/spm/vocab.json"))
            .unwrap(),
    )
    .unwrap();
    let all: Vec<(String, i64)> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .zip(v["token_type"].as_array().unwrap())
        .map(|(t, ty)| (t.as_str().unwrap().to_owned(), ty.as_i64().unwrap()))
        .collect();
    // Specials, then the pieces, then as many byte tokens as fit (ASCII first).
    let mut kept: Vec<(String, i64)> = all.iter().filter(|(_, ty)| *ty != 6 && *ty != 1).cloned().collect();
    kept.extend(all.iter().filter(|(_, ty)| *ty == 1).cloned());
    let room = 256 - kept.len();
    kept.extend(all.iter().filter(|(_, ty)| *ty == 6).take(room).cloned());
    let (tokens, types): (Vec<String>, Vec<i64>) = kept.into_iter().unzip();
    let post = serde_json::json!({"type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<bos>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": "<bos>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<bos>": {"id": "<bos>", "ids": [2], "tokens": ["<bos>"]}}});
    let tok = ferrotune_core::gguf_spm::spm_tokenizer_json(
        ferrotune_core::gguf_spm::SpmFlavor::Gemma,
        &tokens,
        &[],
        &types,
        &[],
        Some("<unk>"),
        post,
    );
    std::fs::write(model.join("tokenizer.json"), tok.to_string()).unwrap();
    let tc = serde_json::json!({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>",
                                "add_bos_token": true, "chat_template": ferrotune_core::chat::NAMED[2].1});
    std::fs::write(model.join("tokenizer_config.json"), tc.to_string()).unwrap();
}

/// Gemma 3 (the layout llama.cpp's gemma3 takes: every sixth layer global, one KV head) with a SentencePiece
/// vocabulary goes out as `gemma3`: norms stored as 1 + w, the window and both RoPE bases, `tokenizer.ggml.model`
/// `llama` with scores; imported back, its logits and token ids come back. A Gemma 3 that llama.cpp would run
/// differently (`query_pre_attn_scalar` ≠ head_dim, another layer pattern) is refused with the reason.
#[test]
fn gemma3_with_a_sentencepiece_vocabulary_round_trips() {
    let t = tempfile::tempdir().unwrap();
    let model = t.path().join("gemma3");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(tiny_dir("gemma3-gguf-shape")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), model.join(e.file_name())).unwrap();
    }
    gemma_vocabulary(&model);
    let (file, back) = round_trip(&model, None, ExportType::F32, t.path());
    let g = GgufFile::open(&file).unwrap();
    assert_eq!(g.get_str("general.architecture").unwrap(), "gemma3");
    assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "llama");
    assert!(g.tensor("blk.0.post_ffw_norm.weight").is_some() && g.tensor("blk.0.ffn_norm.weight").is_some());
    let norm = g.dequantize(g.tensor("blk.0.attn_norm.weight").unwrap()).unwrap();
    let hf = load_model(&model, Kind::Float, Device::Cpu).unwrap();
    let w = Vec::<f32>::try_from(hf.layers[0].input_layernorm.weight.flatten(0, -1)).unwrap();
    assert!(norm.iter().zip(&w).all(|(a, b)| (a - (1.0 + b)).abs() < 1e-6), "norms stored as 1 + w");
    let ids = Tensor::from_slice(&[5i64, 17, 200, 3, 99, 250, 7, 41, 8, 8, 120, 64]).unsqueeze(0);
    let d = max_abs_diff(&logits(&back, &ids), &logits(&model, &ids));
    assert!(d < 1e-5, "max |Δlogit| {d}");
    let (a, b) = (Tokenizer::from_dir(&model).unwrap(), Tokenizer::from_dir(&back).unwrap());
    for s in ["hello world", "The theater and an answer", "  two  spaces, tab\t here", "<start_of_turn>user\nhi"] {
        assert_eq!(a.encode(s).unwrap(), b.encode(s).unwrap(), "{s:?}");
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(back.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["sliding_window"].as_u64(), Some(5));
    let e = export_gguf(&tiny_dir("gemma3-window"), None, &t.path().join("w.gguf"), ExportType::F16).unwrap_err();
    assert!(e.to_string().contains("every sixth layer") || e.to_string().contains("query_pre_attn_scalar"), "{e}");
    assert!(!t.path().join("w.gguf").exists() && !t.path().join("w.gguf.tmp").exists(), "nothing half-written");
}

/// A TinyLlama-shaped model (`tests/fixtures/tiny-llama-spm`) goes out with its SentencePiece vocabulary as
/// llama.cpp's `llama` tokenizer (tokens, scores ranked as the merges, types, the dummy prefix, unk / bos / eos)
/// and its Zephyr template; imported back, it tokenizes every fixture string as before and gives its logits.
#[test]
fn a_tinyllama_shaped_model_exports_its_sentencepiece_vocabulary() {
    let t = tempfile::tempdir().unwrap();
    let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama-spm");
    let (file, back) = round_trip(&model, None, ExportType::F32, t.path());
    let g = GgufFile::open(&file).unwrap();
    assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), "llama");
    assert_eq!(g.get("tokenizer.ggml.scores").unwrap().as_array().unwrap().len(), 384);
    assert!(matches!(g.get("tokenizer.ggml.add_space_prefix").unwrap(), ferrotune_core::gguf::Value::Bool(true)));
    for (key, id) in [("unknown", 0), ("bos", 1), ("eos", 2)] {
        assert_eq!(g.get(&format!("tokenizer.ggml.{key}_token_id")).unwrap().as_u64(), Some(id), "{key}");
    }
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(model.join("reference.json")).unwrap()).unwrap();
    let (a, b) = (Tokenizer::from_dir(&model).unwrap(), Tokenizer::from_dir(&back).unwrap());
    for case in reference["strings"].as_array().unwrap() {
        let s = case["text"].as_str().unwrap();
        assert_eq!(a.encode(s).unwrap(), b.encode(s).unwrap(), "{s:?}");
    }
    let (ta, tb) = (ChatTemplate::from_dir(&model).unwrap(), ChatTemplate::from_dir(&back).unwrap());
    assert_eq!(ta.source(), tb.source());
    let ids = Tensor::from_slice(&[1i64, 17, 200, 3, 99, 250, 7, 41, 8, 383]).unsqueeze(0);
    let d = max_abs_diff(&logits(&back, &ids), &logits(&model, &ids));
    assert!(d < 1e-5, "max |Δlogit| {d}");
}
