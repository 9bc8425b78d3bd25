//! DoRA: PEFT-made DoRA adapters (`tests/fixtures/make_tiny_dora.py`) reproduce PEFT's logits and PEFT's
//! autograd gradients for every adapter tensor (A, B and the magnitude vectors); ours round-trip through PEFT's
//! format; a fresh DoRA adapter leaves the base output unchanged; merging equals the adapter forward, on a
//! dense and on an NF4 base; a DoRA target that is not a linear layer is refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ferrotune_core::load_model;
use ferrotune_core::lora::{load_peft, save_peft, LoraConfig, Targets};
use tch::{Device, Kind, Tensor};

use crate::common::{max_abs_diff, reference, tiny_dir};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-lora").join(name)
}

fn fixture_tensors(name: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture(name).join("reference.safetensors")).unwrap().into_iter().collect()
}

const CASES: [(&str, &str); 2] = [("llama3-dora", "llama3-rope"), ("qwen2-dora-qv", "qwen2-bias")];

#[test]
fn peft_dora_adapters_reproduce_peft_logits_and_gradients() {
    for (case, base) in CASES {
        let mut model = load_model(&tiny_dir(base), Kind::Float, Device::Cpu).unwrap();
        let cfg = load_peft(&mut model, &fixture(case)).unwrap();
        assert!(cfg.use_dora, "{case}");
        let want = fixture_tensors(case);
        let ids = &want["input_ids"];
        let logits = model.forward(ids, None, None).unwrap();
        let d = max_abs_diff(&logits.detach(), &want["logits"]);
        assert!(d < 1e-5, "{case}: logits max |Δ| {d}");
        let (_, base_logits) = reference(base);
        assert!(max_abs_diff(&want["logits"], &base_logits) > 1e-3, "{case}: the adapter changes the output");
        logits.square().mean(Kind::Float).backward();
        let tensors = model.lora_tensors();
        let magnitudes = tensors.iter().filter(|(k, _)| k.ends_with("lora_magnitude_vector")).count();
        assert!(magnitudes > 0 && 3 * magnitudes == tensors.len(), "{case}: A, B and m per module");
        for (key, t) in &tensors {
            let g = t.grad();
            let w = &want[&format!("grad.{key}")];
            let err = (&g - w).abs().max().double_value(&[]) / w.abs().max().double_value(&[]).max(1e-12);
            assert!(err < 1e-4, "{case}: gradient of {key}: relative error {err}");
        }
    }
}

#[test]
fn dora_round_trips_merges_and_starts_at_the_base() {
    let (ids, base_logits) = reference("llama3-rope");
    let mut model = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    let cfg = LoraConfig {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        targets: Targets::Names(vec!["q_proj".into(), "down_proj".into()]),
        use_rslora: false,
        use_dora: true,
    };
    model.add_lora(&cfg, 7).unwrap();
    let fresh = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
    assert!(max_abs_diff(&fresh, &base_logits) < 1e-5, "a fresh DoRA adapter is the base model");
    // Move B and m off their initial values, save in PEFT's format, load into a fresh base.
    tch::manual_seed(3);
    {
        let _g = tch::no_grad_guard();
        for (_, lin) in model.linears_mut() {
            if let Some(l) = &mut lin.lora {
                let _ = l.b.normal_(0.0, 0.05);
                let m = l.magnitude.as_mut().unwrap();
                let noise = m.rand_like() * 0.4 + 0.8;
                m.copy_(&(&*m * noise));
            }
        }
    }
    let want = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
    assert!(max_abs_diff(&want, &base_logits) > 1e-3);
    let dir = tempfile::tempdir().unwrap();
    save_peft(&mut model, &cfg, "tiny", dir.path()).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(v["use_dora"], true);
    let mut again = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    load_peft(&mut again, dir.path()).unwrap();
    let got = tch::no_grad(|| again.forward(&ids, None, None)).unwrap();
    assert!(max_abs_diff(&got, &want) < 1e-6, "round trip");
    // Merged: W′ = (m / ‖W + sBA‖) (W + sBA).
    assert_eq!(again.merge_lora().unwrap(), 4, "q_proj and down_proj of both layers");
    let merged = tch::no_grad(|| again.forward(&ids, None, None)).unwrap();
    let d = max_abs_diff(&merged, &want);
    assert!(d < 1e-4, "merged vs adapter: {d}");
    // On an NF4 base: the adapter forward equals the merge into the dequantized base.
    let mut q = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    q.quantize_nf4().unwrap();
    load_peft(&mut q, dir.path()).unwrap();
    let adapter = tch::no_grad(|| q.forward(&ids, None, None)).unwrap();
    assert!(max_abs_diff(&adapter, &want) > 1e-6, "NF4 changes the base");
    q.merge_lora().unwrap();
    let d = max_abs_diff(&tch::no_grad(|| q.forward(&ids, None, None)).unwrap(), &adapter);
    assert!(d < 1e-4, "NF4: merged vs adapter: {d}");
    // DoRA adapts linear layers only.
    let mut m = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    let bad = LoraConfig { targets: Targets::Names(vec!["q_proj".into(), "embed_tokens".into()]), ..cfg };
    let e = m.add_lora(&bad, 1).unwrap_err().to_string();
    assert!(e.contains("use_dora") && e.contains("embed_tokens") && e.contains("not a linear layer"), "{e}");
}
