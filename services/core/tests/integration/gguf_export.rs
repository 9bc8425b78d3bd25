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

fn round_trip(model: &Path, adapter: Option<&Path>, ty: ExportType, t: &Path) -> (PathBuf, PathBuf) {
    let file = t.join(format!("{ty:?}.gguf"));
    export_gguf(model, adapter, &file, ty).unwrap();
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
    for ty in [ExportType::F32, ExportType::F16, ExportType::Q8_0, ExportType::Q4_0] {
        let (file, back) = round_trip(&tiny_chat(), None, ty, t.path());
        let g = GgufFile::open(&file).unwrap();
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

#[test]
fn a_qwen2_with_a_merged_lora_adapter_round_trips() {
    let t = tempfile::tempdir().unwrap();
    // The tiny Qwen2 (q/k/v biases, no rotary permutation) with a byte-level vocabulary cut from the chat model's
    // to its 256 ids.
    let model = t.path().join("qwen2");
    std::fs::create_dir_all(&model).unwrap();
    for e in std::fs::read_dir(tiny_dir("qwen2-bias")).unwrap() {
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
    // Qwen2's own pre-tokenizer (a regex split, then byte-level without its regex): exported as `qwen2`.
    tok["pre_tokenizer"] = serde_json::json!({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"},
         "behavior": "Isolated", "invert": false},
        {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]});
    tok["model"]["merges"] = serde_json::Value::Array(merges);
    std::fs::write(model.join("tokenizer.json"), tok.to_string()).unwrap();
    std::fs::copy(tiny_chat().join("tokenizer_config.json"), model.join("tokenizer_config.json")).unwrap();
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
    // What cannot be exported yet says so.
    let e = export_gguf(&tiny_dir("llama3-rope"), None, &t.path().join("x.gguf"), ExportType::F16).unwrap_err();
    assert!(e.to_string().contains("tokenizer.json") || e.to_string().contains("llama3 rope"), "{e}");
    let e = export_gguf(&tiny_dir("qwen3-qknorm"), None, &t.path().join("y.gguf"), ExportType::F16).unwrap_err();
    assert!(e.to_string().contains("qwen3") && e.to_string().contains("cannot be exported"), "{e}");
}
