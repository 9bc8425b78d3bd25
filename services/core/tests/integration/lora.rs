//! LoRA: PEFT-made adapters reproduce PEFT's logits, our adapters round-trip through PEFT's format,
//! the adapter forward equals the merged-weight forward, and bad adapters are clear errors.

use std::path::{Path, PathBuf};

use ferrotune_core::load_model;
use ferrotune_core::lora::{load_peft, save_peft, LoraConfig, Targets};
use ferrotune_core::models::decoder::BaseWeight;
use tch::{Device, Kind, Tensor};

use crate::common::{max_abs_diff, reference, tiny_dir};

fn lora_fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-lora").join(name)
}

fn lora_reference(name: &str) -> Tensor {
    let f =
        ferrotune_core::weights::WeightFiles::open_files(&[lora_fixture(name).join("reference.safetensors")]).unwrap();
    f.load_raw("logits").unwrap()
}

#[test]
fn peft_adapters_reproduce_peft_logits() {
    for (case, base) in [("llama3-all-linear", "llama3-rope"), ("qwen2-qv-rslora", "qwen2-bias")] {
        let mut model = load_model(&tiny_dir(base), Kind::Float, Device::Cpu).unwrap();
        let (ids, base_logits) = reference(base);
        let cfg = load_peft(&mut model, &lora_fixture(case)).unwrap();
        assert_eq!(cfg.peft_type, "LORA");
        let got = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
        let want = lora_reference(case);
        let d = max_abs_diff(&got, &want);
        assert!(d < 1e-5, "{case}: max |Δ| {d}");
        assert!(max_abs_diff(&want, &base_logits) > 1e-3, "{case}: the adapter must change the output");
        {
            let base = model.adapters_disabled();
            let off = tch::no_grad(|| base.forward(&ids, None, None)).unwrap();
            assert!(max_abs_diff(&off, &base_logits) < 1e-5, "{case}: disabled adapter = base model");
        }
        let again = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
        assert!(max_abs_diff(&again, &want) < 1e-5, "{case}: the guard restores the adapter");
    }
}

#[test]
fn a_panic_inside_the_adapters_disabled_scope_restores_them() {
    let mut model = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    load_peft(&mut model, &lora_fixture("llama3-all-linear")).unwrap();
    // One adapter turned off by the caller stays off; the others come back.
    let (first, _) =
        model.linears_mut().into_iter().next().map(|(p, l)| (p, l.lora.as_mut().map(|l| l.enabled = false))).unwrap();
    let (ids, _) = reference("llama3-rope");
    let before = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let _base = model.adapters_disabled();
        panic!("a failure while the base model is in use");
    }));
    assert!(caught.is_err());
    let after = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
    assert!(max_abs_diff(&after, &before) == 0.0, "the adapters were not restored after the panic");
    let states: Vec<(String, bool)> =
        model.linears_mut().into_iter().filter_map(|(p, l)| l.lora.as_ref().map(|l| (p, l.enabled))).collect();
    assert!(states.iter().all(|(p, on)| *on == (*p != first)), "{states:?}");
}

fn randomise_b(model: &mut ferrotune_core::CausalLm) {
    tch::manual_seed(5);
    let _g = tch::no_grad_guard();
    for (_, lin) in model.linears_mut() {
        if let Some(l) = &mut lin.lora {
            let _ = l.b.normal_(0.0, 0.05);
        }
    }
}

#[test]
fn adapter_forward_equals_merged_weights() {
    let mut model = load_model(&tiny_dir("qwen2-bias"), Kind::Float, Device::Cpu).unwrap();
    let cfg =
        LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false };
    assert_eq!(model.add_lora(&cfg, 3).unwrap(), 14);
    randomise_b(&mut model);
    let (ids, base) = reference("qwen2-bias");
    let with_adapter = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
    assert!(max_abs_diff(&with_adapter, &base) > 1e-3);
    assert_eq!(model.merge_lora().unwrap(), 14);
    assert!(model.lora_tensors().is_empty());
    let merged = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
    let d = max_abs_diff(&merged, &with_adapter);
    assert!(d < 1e-5, "merged vs adapter: {d}");
}

/// Zeroes every adapter's B (`None`) or writes back `saved` (every adapter tensor, in order).
fn set_b(model: &mut ferrotune_core::CausalLm, saved: Option<&[Tensor]>) {
    let _g = tch::no_grad_guard();
    for (k, (name, mut t)) in model.lora_tensors().into_iter().enumerate() {
        match saved {
            Some(s) => t.copy_(&s[k]),
            None if name.contains("lora_B") => {
                let _ = t.zero_();
            }
            None => {}
        }
    }
}

/// Rollout weights (`hold_dense`): each adapter folded into its base (dense and NF4, f32) gives the adapter's
/// logits; a disabled adapter (the reference) and a training-mode forward still use the live adapters; after the
/// rollout phase nothing folded is left; bf16 weights are not folded.
#[test]
fn held_rollout_weights_fold_the_adapters_in() {
    let cfg =
        LoraConfig { r: 4, alpha: 8.0, dropout: 0.1, targets: Targets::AllLinear, use_rslora: false, use_dora: false };
    let (ids, _) = reference("qwen2-bias");
    for nf4 in [false, true] {
        let mut model = load_model(&tiny_dir("qwen2-bias"), Kind::Float, Device::Cpu).unwrap();
        if nf4 {
            model.quantize_nf4().unwrap();
        }
        let base = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
        model.add_lora(&cfg, 3).unwrap();
        randomise_b(&mut model);
        model.set_training(false);
        let logits = |m: &mut ferrotune_core::CausalLm| tch::no_grad(|| m.forward(&ids, None, None)).unwrap();
        let adapter = logits(&mut model);
        assert!(max_abs_diff(&adapter, &base) > 1e-3);
        let dense: i64 = model.linears_mut().iter().map(|(_, l)| l.dims().0 * l.dims().1).sum();
        assert_eq!(model.hold_dense(true).unwrap(), dense as usize * 4, "nf4 {nf4}: one f32 weight per layer");
        // The folded weights, not the live adapters, compute the rollout: zeroing B changes nothing while held.
        let saved: Vec<Tensor> = model.lora_tensors().into_iter().map(|(_, t)| t.copy()).collect();
        set_b(&mut model, None);
        let held = logits(&mut model);
        let d = max_abs_diff(&held, &adapter);
        assert!(d < 1e-5, "nf4 {nf4}: folded vs adapter {d}");
        let reference = tch::no_grad(|| model.adapters_disabled().forward(&ids, None, None)).unwrap();
        assert!(max_abs_diff(&reference, &base) == 0.0, "nf4 {nf4}: the reference must not see the adapter");
        // Training mode (dropout on) takes the live adapters, here B = 0: the base's logits.
        model.set_training(true);
        let training = logits(&mut model);
        assert!(max_abs_diff(&training, &base) == 0.0, "nf4 {nf4}: training mode used the folded weights");
        model.set_training(false);
        // Released: the live adapters (B = 0) again, then B restored gives the adapter's logits exactly.
        model.hold_dense(false).unwrap();
        assert!(max_abs_diff(&logits(&mut model), &base) == 0.0, "nf4 {nf4}: folded weights left after release");
        set_b(&mut model, Some(&saved));
        assert!(max_abs_diff(&logits(&mut model), &adapter) == 0.0, "nf4 {nf4}: not restored");
    }
    // bf16: folding would round the update away; only NF4 bases are held (dequantized), nothing folded.
    let mut model = load_model(&tiny_dir("qwen2-bias"), Kind::BFloat16, Device::Cpu).unwrap();
    model.add_lora(&cfg, 3).unwrap();
    model.set_training(false);
    assert_eq!(model.hold_dense(true).unwrap(), 0);
    model.hold_dense(false).unwrap();
}

#[test]
fn fresh_adapter_is_identity_and_trains_only_a_and_b() {
    let mut model = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    let cfg = LoraConfig {
        r: 8,
        alpha: 16.0,
        dropout: 0.05,
        targets: Targets::Names(vec!["q_proj".into(), "v_proj".into()]),
        use_rslora: false,
        use_dora: false,
    };
    assert_eq!(model.add_lora(&cfg, 0).unwrap(), 4);
    let (ids, base) = reference("llama3-rope");
    let out = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
    assert!(max_abs_diff(&out, &base) < 1e-6, "B = 0 ⇒ no change");
    // A ~ U(-1/√in, 1/√in) like PEFT's kaiming_uniform_(a=√5)
    let t = model.lora_tensors();
    let a = &t.iter().find(|(k, _)| k == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").unwrap().1;
    assert_eq!(a.size(), [8, 64]);
    let max = a.abs().max().double_value(&[]);
    assert!(max <= 1.0 / 8.0 && max > 0.1, "max |A| {max}");
    model.set_training(true);
    let loss = model.forward(&ids, None, None).unwrap().mean(Kind::Float);
    loss.backward();
    for (_, lin) in model.linears_mut() {
        assert!(!lin.dense_weight().unwrap().requires_grad(), "base weights are frozen");
        if let Some(l) = &lin.lora {
            assert!(l.a.grad().defined() && l.b.grad().defined());
        }
    }
}

#[test]
fn saved_adapter_has_peft_layout_and_reloads() {
    let mut model = load_model(&tiny_dir("mistral-window"), Kind::Float, Device::Cpu).unwrap();
    let cfg =
        LoraConfig { r: 2, alpha: 4.0, dropout: 0.1, targets: Targets::AllLinear, use_rslora: true, use_dora: false };
    model.add_lora(&cfg, 9).unwrap();
    randomise_b(&mut model);
    let tmp = tempfile::tempdir().unwrap();
    save_peft(&mut model, &cfg, "tiny/mistral-window", tmp.path()).unwrap();
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(c["peft_type"], "LORA");
    assert_eq!(c["task_type"], "CAUSAL_LM");
    assert_eq!(
        (c["r"].as_i64(), c["lora_alpha"].as_f64(), c["use_rslora"].as_bool()),
        (Some(2), Some(4.0), Some(true))
    );
    assert_eq!(c["bias"], "none");
    assert_eq!(c["base_model_name_or_path"], "tiny/mistral-window");
    assert_eq!(c["target_modules"].as_array().unwrap().len(), 7);
    let files =
        ferrotune_core::weights::WeightFiles::open_files(&[tmp.path().join("adapter_model.safetensors")]).unwrap();
    assert_eq!(files.names().count(), 2 * 7 * 2);
    assert_eq!(files.load_raw("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight").unwrap().size(), [64, 2]);
    let (ids, _) = reference("mistral-window");
    let before = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
    let mut fresh = load_model(&tiny_dir("mistral-window"), Kind::Float, Device::Cpu).unwrap();
    load_peft(&mut fresh, tmp.path()).unwrap();
    let after = tch::no_grad(|| fresh.forward(&ids, None, None)).unwrap();
    assert_eq!(max_abs_diff(&before, &after), 0.0);
}

#[test]
fn bad_adapters_are_errors() {
    let mut model = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    let ok =
        LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false };
    assert!(model
        .add_lora(&LoraConfig { r: 0, ..ok.clone() }, 0)
        .unwrap_err()
        .to_string()
        .contains("r must be positive"));
    assert!(model.add_lora(&LoraConfig { dropout: 1.5, ..ok.clone() }, 0).is_err());
    let e = model
        .add_lora(&LoraConfig { targets: Targets::Names(vec!["c_attn".into()]), ..ok.clone() }, 0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("match no linear layer"), "{e}");
    // An absurd rank is refused before anything is allocated.
    let e = model.add_lora(&LoraConfig { r: 100_000, ..ok.clone() }, 0).unwrap_err().to_string();
    assert!(e.contains("adapter r = 100000 is larger than the smaller side"), "{e}");
    // Poisoned or integer-typed adapter weights are refused at load.
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(
        lora_fixture("llama3-all-linear").join("adapter_config.json"),
        tmp.path().join("adapter_config.json"),
    )
    .unwrap();
    let src = ferrotune_core::weights::WeightFiles::open_files(&[
        lora_fixture("llama3-all-linear").join("adapter_model.safetensors")
    ])
    .unwrap();
    let names: Vec<String> = src.names().map(str::to_owned).collect();
    for (poison, needle) in [("nan", "NaN or infinite"), ("int", "floating-point")] {
        let tensors: Vec<(String, tch::Tensor)> = names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let t = src.load_raw(n).unwrap();
                let t = match (i, poison) {
                    (0, "nan") => t.full_like(f64::NAN),
                    (0, _) => t.to_kind(Kind::Int64),
                    _ => t,
                };
                (n.clone(), t)
            })
            .collect();
        ferrotune_core::weights::save_safetensors(&tmp.path().join("adapter_model.safetensors"), &tensors).unwrap();
        let e = load_peft(&mut model, tmp.path()).unwrap_err().to_string();
        assert!(e.contains(needle), "{poison}: {e}");
    }
    // A PEFT adapter for another model (head_dim 24 there, 16 here): shapes differ → names the tensor.
    let mut other = load_model(&tiny_dir("llama-linear-sharded"), Kind::Float, Device::Cpu).unwrap();
    let e = load_peft(&mut other, &lora_fixture("qwen2-qv-rslora")).unwrap_err().to_string();
    assert!(e.contains("lora_") && e.contains("shape mismatch"), "{e}");
    let tmp = tempfile::tempdir().unwrap();
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(lora_fixture("llama3-all-linear").join(f), tmp.path().join(f)).unwrap();
    }
    let p = tmp.path().join("adapter_config.json");
    let text = std::fs::read_to_string(&p).unwrap();
    std::fs::write(&p, text.replace("\"use_dora\": false", "\"use_dora\": true")).unwrap();
    // DoRA declared but its magnitude vectors missing: the error names the tensor.
    let e = load_peft(&mut model, tmp.path()).unwrap_err().to_string();
    assert!(e.contains("lora_magnitude_vector"), "{e}");
    std::fs::write(&p, "{not json").unwrap();
    assert!(load_peft(&mut model, tmp.path()).unwrap_err().to_string().contains("adapter_config.json"));
    assert!(load_peft(&mut model, Path::new("/nonexistent/adapter"))
        .unwrap_err()
        .to_string()
        .contains("/nonexistent/adapter"));
}

#[test]
fn qlora_base_is_nf4_and_adapter_merges_into_its_dequantized_weights() {
    let mut model = load_model(&tiny_dir("qwen2-bias"), Kind::Float, Device::Cpu).unwrap();
    let (ids, base) = reference("qwen2-bias");
    let (before, after) = model.quantize_nf4().unwrap();
    let ratio = after as f64 / before as f64;
    assert!((ratio - 4.127 / 32.0).abs() < 0.01, "NF4 / f32 bytes = {ratio}");
    let q = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
    let d = max_abs_diff(&q, &base);
    let scale = base.abs().max().double_value(&[]);
    // Tiny random weights are all noise, so 4-bit error is large relative to them; the SmolLM2 test checks
    // NF4 quality on real weights.
    assert!(d > 0.0 && d < 0.25 * scale, "NF4 logits differ by {d} (scale {scale})");
    let cfg =
        LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false };
    model.add_lora(&cfg, 1).unwrap();
    randomise_b(&mut model);
    let with_adapter = model.forward(&ids, None, None).unwrap();
    with_adapter.mean(Kind::Float).backward();
    for (_, lin) in model.linears_mut() {
        let l = lin.lora.as_ref().unwrap();
        assert!(l.a.grad().defined() && l.b.grad().defined(), "QLoRA trains the adapters");
        assert!(matches!(lin.base, BaseWeight::Nf4 { .. }));
    }
    // The NF4 base's backward pass dequantizes again instead of keeping the dense weight; the adapters'
    // gradients equal those over the same dequantized weights held densely (autograd's own linear).
    let mut dense = load_model(&tiny_dir("qwen2-bias"), Kind::Float, Device::Cpu).unwrap();
    dense.quantize_nf4().unwrap();
    for (_, lin) in dense.linears_mut() {
        lin.base = BaseWeight::Dense(lin.dense_weight().unwrap());
    }
    dense.add_lora(&cfg, 1).unwrap();
    tch::no_grad(|| {
        for ((_, mut d), (_, q)) in dense.lora_tensors().into_iter().zip(model.lora_tensors()) {
            d.copy_(&q);
        }
    });
    let dense_out = dense.forward(&ids, None, None).unwrap();
    assert!(max_abs_diff(&dense_out, &with_adapter) < 1e-6);
    dense_out.mean(Kind::Float).backward();
    for ((name, d), (_, q)) in dense.lora_tensors().into_iter().zip(model.lora_tensors()) {
        let (dg, qg) = (d.grad(), q.grad());
        let diff = max_abs_diff(&dg, &qg);
        assert!(diff <= 1e-6 * (1.0 + dg.abs().max().double_value(&[])), "{name}: gradient differs by {diff}");
    }
    model.merge_lora().unwrap();
    let merged = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
    let d = max_abs_diff(&merged, &with_adapter.detach());
    assert!(d < 1e-5, "merged into the dequantized NF4 base: {d}");
}

#[test]
fn peft_prompt_tuning_reproduces_peft_logits_and_round_trips() {
    use ferrotune_core::prompt_tuning::{load_adapter, save_prompt_tuning, PromptInit};
    let mut model = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    load_adapter(&mut model, &lora_fixture("llama3-prompt-tuning")).unwrap();
    let (ids, base) = reference("llama3-rope");
    let got = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
    let want = lora_reference("llama3-prompt-tuning");
    assert_eq!(got.size(), want.size(), "outputs cover the real tokens only");
    let d = max_abs_diff(&got, &want);
    assert!(d < 1e-5, "prompt tuning vs PEFT: {d}");
    assert!(max_abs_diff(&want, &base) > 1e-3);
    // Left padding with the prefix: padded row equals the unpadded one.
    let short = ids.get(1).narrow(0, 3, 9);
    let batch = Tensor::stack(
        &[ids.get(0), Tensor::cat(&[Tensor::zeros([3], (Kind::Int64, Device::Cpu)), short.shallow_clone()], 0)],
        0,
    );
    let mask = Tensor::ones([2, 12], (Kind::Int64, Device::Cpu));
    let _ = mask.get(1).narrow(0, 0, 3).fill_(0);
    let (padded, alone) = tch::no_grad(|| {
        (model.forward(&batch, Some(&mask), None).unwrap(), model.forward(&short.unsqueeze(0), None, None).unwrap())
    });
    assert!(max_abs_diff(&padded.get(1).narrow(0, 3, 9), &alone.get(0)) < 1e-5);
    // KV-cached decoding with the prefix equals the full forward.
    let mut cache = model.new_cache(2, 12).unwrap();
    let first =
        tch::no_grad(|| model.forward_hidden_cached(&ids.narrow(1, 0, 6), None, None, Some(&mut cache))).unwrap();
    let mut worst = max_abs_diff(&model.logits(&first).unwrap(), &got.narrow(1, 0, 6));
    for p in 6..12 {
        let h =
            tch::no_grad(|| model.forward_hidden_cached(&ids.narrow(1, p, 1), None, None, Some(&mut cache))).unwrap();
        worst = worst.max(max_abs_diff(&model.logits(&h).unwrap(), &got.narrow(1, p, 1)));
    }
    assert!(worst < 1e-5, "cached decoding with a prefix: {worst}");
    // Our save is PEFT's layout and reloads to the same outputs.
    let tmp = tempfile::tempdir().unwrap();
    save_prompt_tuning(&model, &PromptInit::Random, "tiny", tmp.path()).unwrap();
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(
        (
            c["peft_type"].as_str(),
            c["num_virtual_tokens"].as_i64(),
            c["token_dim"].as_i64(),
            c["num_transformer_submodules"].as_i64()
        ),
        (Some("PROMPT_TUNING"), Some(4), Some(64), Some(1))
    );
    let mut again = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    load_adapter(&mut again, tmp.path()).unwrap();
    assert_eq!(max_abs_diff(&tch::no_grad(|| again.forward(&ids, None, None)).unwrap(), &got), 0.0);
}

#[test]
fn adapter_dropout_keeps_the_right_share_and_replays_from_its_seed() {
    use ferrotune_core::lora::Lora;
    let n = 40_000i64;
    let l = Lora {
        a: Tensor::ones([1, n], (Kind::Float, Device::Cpu)),
        b: Tensor::ones([1, 1], (Kind::Float, Device::Cpu)),
        scaling: 1.0,
        dropout: 0.25,
        training: true,
        enabled: true,
        dropout_state: std::cell::Cell::new(42),
        magnitude: None,
    };
    let x = Tensor::ones([1, n], (Kind::Float, Device::Cpu));
    // Σ dropout(x) = (kept count) / 0.75, whose expectation is n.
    let s1 = l.delta(&x).unwrap().double_value(&[0, 0]);
    let s2 = l.delta(&x).unwrap().double_value(&[0, 0]);
    assert!((s1 / n as f64 - 1.0).abs() < 0.02, "kept share off: {s1}");
    assert_ne!(s1, s2, "the stream advances between calls");
    l.dropout_state.set(42);
    assert_eq!(l.delta(&x).unwrap().double_value(&[0, 0]), s1, "same seed, same mask");
}
