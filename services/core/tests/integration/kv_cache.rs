//! Decoding with the KV cache (a prompt chunk, then one token at a time) gives the logits of a full
//! forward pass at every step, with and without left padding, for every tiny family (mistral's sliding
//! window included).

use ferrotune_core::load_model;
use tch::{Device, Kind, Tensor};

use crate::common::{max_abs_diff, reference, tiny_dir, TINY};

/// f32 on CPU; the cached path attends over the same keys in another grouping of matmuls.
const TOL: f64 = 1e-5;

#[test]
fn cached_steps_equal_full_forward() {
    const PAD: i64 = 3;
    for name in TINY {
        let model = load_model(&tiny_dir(name), Kind::Float, Device::Cpu).unwrap();
        let (ids, _) = reference(name);
        let t = ids.size()[1];
        // With a mask, row 1 is left-padded by PAD (its first tokens are masked out).
        let mask = Tensor::ones([2, t], (Kind::Int64, Device::Cpu));
        let _ = mask.get(1).narrow(0, 0, PAD).fill_(0);
        for masked in [false, true] {
            let m = masked.then_some(&mask);
            let full = tch::no_grad(|| model.forward(&ids, m, None)).unwrap();
            // Compares logits of positions [p, p+n) of both rows, skipping row 1's pad queries (unspecified).
            let diff = |got: &Tensor, p: i64, n: i64| -> f64 {
                let mut d = max_abs_diff(&got.get(0), &full.get(0).narrow(0, p, n));
                let skip = if masked { (PAD - p).clamp(0, n) } else { 0 };
                if skip < n {
                    d = d.max(max_abs_diff(
                        &got.get(1).narrow(0, skip, n - skip),
                        &full.get(1).narrow(0, p + skip, n - skip),
                    ));
                }
                d
            };
            let mut cache = model.new_cache(2, t).unwrap();
            let chunk = 5;
            let h = tch::no_grad(|| {
                let mm = m.map(|m| m.narrow(1, 0, chunk));
                model.forward_hidden_cached(&ids.narrow(1, 0, chunk), mm.as_ref(), None, Some(&mut cache))
            })
            .unwrap();
            let mut worst = diff(&model.logits(&h).unwrap(), 0, chunk);
            for p in chunk..t {
                let h = tch::no_grad(|| {
                    let mm = m.map(|m| m.narrow(1, 0, p + 1));
                    model.forward_hidden_cached(&ids.narrow(1, p, 1), mm.as_ref(), None, Some(&mut cache))
                })
                .unwrap();
                worst = worst.max(diff(&model.logits(&h).unwrap(), p, 1));
            }
            assert_eq!(cache.len(), t);
            assert!(worst < TOL, "{name} (masked {masked}): max |Δ| {worst}");
        }
    }
}

#[test]
fn cache_overflow_and_batch_mismatch_are_errors() {
    let model = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    let (ids, _) = reference("llama3-rope");
    let mut small = model.new_cache(2, 4).unwrap();
    let e = model.forward_hidden_cached(&ids, None, None, Some(&mut small)).unwrap_err().to_string();
    assert!(e.contains("KV cache"), "{e}");
    let mut one_row = model.new_cache(1, 64).unwrap();
    assert!(model.forward_hidden_cached(&ids, None, None, Some(&mut one_row)).is_err());
}
