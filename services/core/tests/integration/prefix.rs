//! Prefix tuning: PEFT-made PREFIX_TUNING adapters (`tests/fixtures/make_tiny_prefix.py`, with and without
//! `prefix_projection`, on a grouped-query tiny Llama) give PEFT's logits, and PEFT's gradients for the raw
//! parameters (the projection's too); padded rows equal unpadded ones; the KV cache continues a prefix exactly;
//! gradient checkpointing gives the plain gradients; ours round-trip; bad settings are refused.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ferrotune_core::load_model;
use ferrotune_core::prefix_tuning::{load_prefix_tuning, save_prefix_tuning, PrefixEncoder, PrefixTuningConfig};
use ferrotune_core::prompt_tuning::load_adapter;
use ferrotune_core::CausalLm;
use tch::{Device, Kind, Tensor};

use crate::common::{max_abs_diff, reference, tiny_dir};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-lora").join(name)
}

fn fixture_tensors(name: &str) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture(name).join("reference.safetensors")).unwrap().into_iter().collect()
}

fn base() -> CausalLm {
    load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap()
}

fn leaf(t: &Tensor) -> Tensor {
    t.copy().set_requires_grad(true)
}

/// The fixture's PEFT state as ours: the raw parameters, trainable.
fn peft_state(case: &str) -> PrefixEncoder {
    let f = fixture_tensors(case);
    let transform = f.contains_key("transform.0.weight").then(|| {
        ["transform.0.weight", "transform.0.bias", "transform.2.weight", "transform.2.bias"].map(|k| leaf(&f[k]))
    });
    PrefixEncoder { embedding: leaf(&f["embedding.weight"]), transform }
}

#[test]
fn peft_prefix_adapters_give_peft_logits_and_gradients() {
    let (_, base_logits) = reference("llama3-rope");
    for case in ["llama3-prefix", "llama3-prefix-projection"] {
        let want = fixture_tensors(case);
        let ids = &want["input_ids"];
        // The saved adapter (the table) as PEFT's inference model loads it.
        let mut m = base();
        load_adapter(&mut m, &fixture(case)).unwrap();
        let got = tch::no_grad(|| m.forward(ids, None, None)).unwrap();
        let d = max_abs_diff(&got, &want["logits"]);
        assert!(d < 1e-5, "{case}: logits max |Δ| {d}");
        assert!(max_abs_diff(&want["logits"], &base_logits) > 1e-2, "{case}: the prefix changes the output");
        // The raw trainable state: PEFT's gradients of logits².mean().
        let mut m = base();
        m.prefix_tuning = Some(peft_state(case));
        let logits = m.forward(ids, None, None).unwrap();
        assert!(max_abs_diff(&logits.detach(), &want["logits"]) < 1e-5, "{case}: through the projection");
        logits.square().mean(Kind::Float).backward();
        for (name, t) in m.prefix_tuning.as_ref().unwrap().params() {
            let (g, w) = (t.grad(), &want[&format!("grad.{name}")]);
            let err = (&g - w).abs().max().double_value(&[]) / w.abs().max().double_value(&[]).max(1e-12);
            assert!(err < 1e-4, "{case}: gradient of {name}: relative error {err}");
        }
    }
}

#[test]
fn prefix_padding_cache_checkpointing_and_round_trip() {
    let mut m = base();
    let cfg = PrefixTuningConfig { num_virtual_tokens: 3, prefix_projection: true, encoder_hidden_size: Some(20) };
    m.add_prefix_tuning(&cfg, 11).unwrap();
    let ids: Vec<i64> = (0..7).map(|i| 5 + 13 * i % 200).collect();
    let one = Tensor::from_slice(&ids).unsqueeze(0);
    let full = tch::no_grad(|| m.forward(&one, None, None)).unwrap();
    // A right-padded batch: the real row's logits are the unpadded ones.
    let short = Tensor::from_slice(&ids[..4]).unsqueeze(0);
    let batch = Tensor::cat(
        &[one.copy(), Tensor::cat(&[short.copy(), Tensor::zeros([1, 3], (Kind::Int64, Device::Cpu))], 1)],
        0,
    );
    let mask = Tensor::from_slice(&[1i64, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]).view([2, 7]);
    let padded = tch::no_grad(|| m.forward(&batch, Some(&mask), None)).unwrap();
    assert!(max_abs_diff(&padded.get(0), &full.get(0)) < 1e-5, "padded batch, full row");
    let alone = tch::no_grad(|| m.forward(&short, None, None)).unwrap();
    assert!(max_abs_diff(&padded.get(1).narrow(0, 0, 4), &alone.get(0)) < 1e-5, "padded batch, short row");
    // The KV cache: 4 tokens, then 3 one at a time, equal the full pass.
    let mut cache = m.new_cache(1, 7).unwrap();
    let mut parts = vec![tch::no_grad(|| m.forward_hidden_cached(&short, None, None, Some(&mut cache))).unwrap()];
    for &id in &ids[4..7] {
        let next = Tensor::from_slice(&[id]).unsqueeze(0);
        parts.push(tch::no_grad(|| m.forward_hidden_cached(&next, None, None, Some(&mut cache))).unwrap());
    }
    let cached = m.logits(&Tensor::cat(&parts, 1)).unwrap();
    let d = max_abs_diff(&cached, &full);
    assert!(d < 1e-4, "cached decoding vs full forward: {d}");
    // Gradient checkpointing: the same gradients for the embedding and the projection.
    let grads = |m: &CausalLm| -> Vec<Tensor> {
        m.prefix_tuning.as_ref().unwrap().params().iter().map(|(_, t)| t.grad().copy()).collect()
    };
    let zero = |m: &CausalLm| {
        for (_, t) in m.prefix_tuning.as_ref().unwrap().params() {
            let mut g = t.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
    };
    zero(&m);
    m.forward_hidden(&batch, Some(&mask), None).unwrap().square().sum(Kind::Float).backward();
    let plain = grads(&m);
    zero(&m);
    m.forward_backward_checkpointed(&batch, Some(&mask), None, |h| {
        h.square().sum(Kind::Float).backward();
        Ok(())
    })
    .unwrap();
    for (a, b) in grads(&m).iter().zip(&plain) {
        let err = (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-12);
        assert!(err < 1e-4, "checkpointed gradient: relative error {err}");
    }
    // Saved in PEFT's format (the table) with the raw projection beside it; both load back.
    let dir = tempfile::tempdir().unwrap();
    save_prefix_tuning(&m, &cfg, "tiny", dir.path()).unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (v["peft_type"].as_str(), v["token_dim"].as_i64(), v["num_attention_heads"].as_i64()),
        (Some("PREFIX_TUNING"), Some(32), Some(2))
    );
    for trainable in [false, true] {
        let mut again = base();
        load_prefix_tuning(&mut again, dir.path(), trainable).unwrap();
        assert_eq!(again.prefix_tuning.as_ref().unwrap().transform.is_some(), trainable);
        let got = tch::no_grad(|| again.forward(&one, None, None)).unwrap();
        assert!(max_abs_diff(&got, &full) < 1e-5, "reloaded (trainable: {trainable})");
    }
    // The base without the prefix, while the guard lives.
    {
        let off = m.adapters_disabled();
        let (_, base_logits) = reference("llama3-rope");
        let ids = &fixture_tensors("llama3-prefix")["input_ids"];
        let got = tch::no_grad(|| off.forward(ids, None, None)).unwrap();
        assert!(max_abs_diff(&got, &base_logits) < 1e-5);
    }
    assert!(m.prefix_tuning.is_some());
    let e = base().add_prefix_tuning(&PrefixTuningConfig { num_virtual_tokens: 0, ..cfg }, 1).unwrap_err().to_string();
    assert!(e.contains("num_virtual_tokens"), "{e}");
}
