//! Damaged model directories give errors that name the file and the problem, never a panic.

use ferrotune_core::load_model;
use tch::{Device, Kind};

use crate::common::copy_fixture;

fn load_err(dir: &std::path::Path) -> String {
    match load_model(dir, Kind::Float, Device::Cpu) {
        Ok(_) => panic!("loading {} should fail", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn edit_config(dir: &std::path::Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn missing_config_key_is_named() {
    let d = copy_fixture("llama3-rope");
    edit_config(d.path(), |c| {
        c.remove("hidden_size");
    });
    let e = load_err(d.path());
    assert!(e.contains("config.json") && e.contains("hidden_size"), "{e}");
}

#[test]
fn unknown_model_type_is_named() {
    let d = copy_fixture("llama3-rope");
    edit_config(d.path(), |c| {
        c.insert("model_type".into(), "gpt_neox".into());
    });
    let e = load_err(d.path());
    assert!(e.contains("config.json") && e.contains("unknown model_type `gpt_neox`"), "{e}");
}

#[test]
fn unsupported_rope_type_is_named() {
    let d = copy_fixture("llama3-rope");
    edit_config(d.path(), |c| {
        c.insert(
            "rope_parameters".into(),
            serde_json::json!({"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}),
        );
    });
    let e = load_err(d.path());
    assert!(e.contains("unsupported rope type `yarn`"), "{e}");
}

#[test]
fn weight_shape_mismatch_names_tensor_and_file() {
    let d = copy_fixture("mistral-window");
    edit_config(d.path(), |c| {
        c.insert("intermediate_size".into(), 100.into());
    });
    let e = load_err(d.path());
    assert!(
        e.contains("model.safetensors")
            && e.contains("model.layers.0.mlp.gate_proj.weight")
            && e.contains("shape mismatch"),
        "{e}"
    );
}

#[test]
fn truncated_safetensors_is_reported() {
    let d = copy_fixture("mistral-window");
    let p = d.path().join("model.safetensors");
    let len = std::fs::metadata(&p).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(len / 2).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model.safetensors") && e.contains("invalid safetensors"), "{e}");
}

#[test]
fn missing_shard_is_named() {
    let d = copy_fixture("qwen2-bias");
    std::fs::remove_file(d.path().join("model-00002-of-00004.safetensors")).unwrap();
    let e = load_err(d.path());
    assert!(e.contains("model-00002-of-00004.safetensors") && e.contains("missing"), "{e}");
}

#[test]
fn missing_weight_is_named() {
    let d = copy_fixture("llama3-rope");
    edit_config(d.path(), |c| {
        c.insert("tie_word_embeddings".into(), false.into());
    });
    let e = load_err(d.path());
    assert!(e.contains("lm_head.weight") && e.contains("missing"), "{e}");
}

#[test]
fn empty_directory_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let e = load_err(d.path());
    assert!(e.contains("config.json"), "{e}");
}

#[test]
fn bad_device_and_dtype_are_errors() {
    assert!(ferrotune_core::parse_device("tpu:0").unwrap_err().to_string().contains("unknown device"));
    assert!(ferrotune_core::parse_dtype("f8").unwrap_err().to_string().contains("unknown dtype"));
    if !tch::Cuda::is_available() {
        assert!(ferrotune_core::parse_device("cuda:0").unwrap_err().to_string().contains("not available"));
    }
}
