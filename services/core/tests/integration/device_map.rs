//! Models split by a device map. libtorch has one CPU device (`cpu:1` does not exist), so on a CPU host the
//! split is `[cpu, cpu]`: every move between the parts is a no-op, but the code that makes them runs —
//! hidden states, rotary tables and masks moved to each layer, the KV cache allocated per layer, the
//! checkpointed backward's gradients carried across the split. Those paths must give transformers' logits
//! and the unsplit model's results. Placement itself (which module goes where) is unit-tested in
//! `models::device_map`; a real two-device split runs in `scripts/gpu_check.sh` when a GPU host is lent.

use ferrotune_core::lora::{LoraConfig, Targets};
use ferrotune_core::models::load_model_placed;
use ferrotune_core::{load_model, CausalLm};
use serde_json::json;
use tch::{Device, Kind, Tensor};

use crate::common::{max_abs_diff, reference, tiny_dir, TINY};

fn split(name: &str, map: serde_json::Value) -> CausalLm {
    load_model_placed(&tiny_dir(name), Kind::Float, Device::Cpu, Some(&map)).unwrap()
}

#[test]
fn split_models_give_the_reference_logits_full_and_cached() {
    for name in TINY {
        let model = split(name, json!(["cpu", "cpu"]));
        let plain = load_model(&tiny_dir(name), Kind::Float, Device::Cpu).unwrap();
        let (ids, want) = reference(name);
        let full = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
        let d = max_abs_diff(&full, &want);
        assert!(d < 1e-5, "{name}: split model vs transformers: max |Δlogit| {d}");
        let same = tch::no_grad(|| plain.forward(&ids, None, None)).unwrap();
        assert_eq!(max_abs_diff(&full, &same), 0.0, "{name}: split vs unsplit");
        // A prompt chunk, then one token at a time through the per-layer cache; rows reordered once.
        let t = ids.size()[1];
        let mut cache = model.new_cache(2, t).unwrap();
        let chunk = 4;
        let h = tch::no_grad(|| model.forward_hidden_cached(&ids.narrow(1, 0, chunk), None, None, Some(&mut cache)));
        let mut worst = max_abs_diff(&model.logits(&h.unwrap()).unwrap(), &full.narrow(1, 0, chunk));
        cache.select_rows(&Tensor::from_slice(&[0i64, 1])).unwrap();
        for p in chunk..t {
            let h = tch::no_grad(|| model.forward_hidden_cached(&ids.narrow(1, p, 1), None, None, Some(&mut cache)));
            worst = worst.max(max_abs_diff(&model.logits(&h.unwrap()).unwrap(), &full.narrow(1, p, 1)));
        }
        assert!(worst < 1e-5, "{name}: cached decoding on the split model: max |Δ| {worst}");
    }
}

/// LoRA gradients of `model` from the mean of its logits on `ids`, plain or checkpointed.
fn lora_grads(model: &mut CausalLm, ids: &Tensor, checkpointed: bool) -> Vec<Tensor> {
    let cfg =
        LoraConfig { r: 4, alpha: 8.0, dropout: 0.0, targets: Targets::AllLinear, use_rslora: false, use_dora: false };
    model.add_lora(&cfg, 3).unwrap();
    tch::manual_seed(5);
    for (_, t) in model.lora_tensors() {
        let _ = tch::no_grad(|| t.shallow_clone().normal_(0.0, 0.05));
    }
    let loss = |h: &Tensor| model.logits(h).unwrap().pow_tensor_scalar(2).mean(Kind::Float);
    if checkpointed {
        model.forward_backward_checkpointed(ids, None, None, |h| loss(h).f_backward().map_err(Into::into)).unwrap();
    } else {
        loss(&model.forward_hidden(ids, None, None).unwrap()).backward();
    }
    model.lora_tensors().iter().map(|(_, t)| t.grad().copy()).collect()
}

#[test]
fn gradients_cross_the_split_plain_and_checkpointed() {
    // transformers' form: the longest key wins, so layer 1 is its own part.
    let map = json!({"": "cpu", "model.layers.1": "cpu", "lm_head": "cpu"});
    for name in ["llama3-rope", "gemma3-window"] {
        let (ids, _) = reference(name);
        let mut plain = load_model(&tiny_dir(name), Kind::Float, Device::Cpu).unwrap();
        let want = lora_grads(&mut plain, &ids, false);
        for checkpointed in [false, true] {
            let got = lora_grads(&mut split(name, map.clone()), &ids, checkpointed);
            assert_eq!(got.len(), want.len());
            let worst = got.iter().zip(&want).map(|(a, b)| max_abs_diff(a, b)).fold(0.0, f64::max);
            assert!(worst < 1e-6, "{name} (checkpointed {checkpointed}): gradients differ by {worst}");
            assert!(got.iter().all(|g| g.abs().sum(Kind::Float).double_value(&[]) > 0.0), "{name}: every adapter");
        }
    }
}

#[test]
fn a_map_that_does_not_fit_the_model_is_refused_by_name() {
    let dir = tiny_dir("llama3-rope");
    for (map, says) in [
        (json!({"model.layers.7": "cpu", "": "cpu"}), "key `model.layers.7` names no module"),
        (json!(["cpu", "cpu", "cpu"]), "3 devices for 2 layers"),
        (json!(["cuda:9"]), "cuda:9"),
    ] {
        let e = load_model_placed(&dir, Kind::Float, Device::Cpu, Some(&map)).unwrap_err().to_string();
        assert!(e.contains("device_map") && e.contains(says), "{e}");
    }
}
