//! Each tiny random model (llama with llama3 rope, llama with linear rope + explicit head_dim + shards in
//! the legacy config spelling, mistral with a sliding window, qwen2 with biases + untied embeddings, qwen3
//! with q/k norms, gemma3 with local and global layers)
//! reproduces the logits HF transformers computed for it.

use ferrotune_core::load_model;
use tch::{Device, Kind, Tensor};

use crate::common::{max_abs_diff, reference, tiny_dir, TINY};

/// f32 on CPU: libtorch's SDPA vs transformers' eager attention differ only by summation order.
const TOL: f64 = 1e-5;

#[test]
fn tiny_models_match_transformers_logits() {
    for name in TINY {
        let model = load_model(&tiny_dir(name), Kind::Float, Device::Cpu).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (ids, want) = reference(name);
        let got = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
        let d = max_abs_diff(&got, &want);
        println!("{name}: max |Δlogit| = {d:.3e}");
        assert!(d < TOL, "{name}: max |Δlogit| {d} ≥ {TOL}");
    }
}

#[test]
fn left_padded_rows_equal_unpadded_rows() {
    for name in TINY {
        let model = load_model(&tiny_dir(name), Kind::Float, Device::Cpu).unwrap();
        let (ids, _) = reference(name);
        let t = ids.size()[1];
        let pad = 4;
        // row 0 full length; row 1 keeps its last t-pad tokens, left-padded with a junk id.
        let short = ids.get(1).narrow(0, pad, t - pad);
        let padded = Tensor::cat(&[Tensor::full([pad], 7, (Kind::Int64, Device::Cpu)), short.shallow_clone()], 0);
        let batch = Tensor::stack(&[ids.get(0), padded], 0);
        let mask = Tensor::ones([2, t], (Kind::Int64, Device::Cpu));
        let _ = mask.get(1).narrow(0, 0, pad).fill_(0);
        let (batched, alone0, alone1) = tch::no_grad(|| {
            (
                model.forward(&batch, Some(&mask), None).unwrap(),
                model.forward(&ids.get(0).unsqueeze(0), None, None).unwrap(),
                model.forward(&short.unsqueeze(0), None, None).unwrap(),
            )
        });
        let d0 = max_abs_diff(&batched.get(0), &alone0.get(0));
        let d1 = max_abs_diff(&batched.get(1).narrow(0, pad, t - pad), &alone1.get(0));
        assert!(batched.isfinite().all().int64_value(&[]) == 1, "{name}: padded rows produced non-finite logits");
        assert!(d0 < 1e-5 && d1 < 1e-5, "{name}: padded batch differs from single rows ({d0:e}, {d1:e})");
    }
}

#[test]
fn half_precision_loads_and_stays_close() {
    for (name, kind) in [("qwen2-bias", Kind::BFloat16), ("qwen2-bias", Kind::Half), ("gemma3-window", Kind::BFloat16)]
    {
        let (ids, want) = reference(name);
        let model = load_model(&tiny_dir(name), kind, Device::Cpu).unwrap();
        assert_eq!(model.kind(), kind);
        let got = tch::no_grad(|| model.forward(&ids, None, None)).unwrap();
        assert_eq!(got.kind(), kind);
        let scale = want.abs().max().double_value(&[]);
        let d = max_abs_diff(&got, &want);
        assert!(d < 0.05 * scale, "{name} {kind:?}: max |Δ| {d} vs logit scale {scale}");
    }
}

#[test]
fn llama3_rope_frequencies_follow_transformers_formula() {
    // Independent check of the three bands with transformers' constants (factor 8, low 1, high 4,
    // original context 16, theta 5e5, head_dim 16): wavelengths < 4 keep their frequency, > 16 are divided
    // by 8, the band between is interpolated.
    let cfg = ferrotune_core::models::read_config(&tiny_dir("llama3-rope")).unwrap();
    let f = ferrotune_core::models::decoder::inv_freq(&cfg);
    let base: Vec<f64> = (0..8).map(|i| 1.0 / 500000f64.powf(2.0 * i as f64 / 16.0)).collect();
    for (i, (&got, &b)) in f.iter().zip(&base).enumerate() {
        let wl = 2.0 * std::f64::consts::PI / b;
        let want = if wl < 4.0 {
            b
        } else if wl > 16.0 {
            b / 8.0
        } else {
            let s = (16.0 / wl - 1.0) / 3.0;
            (1.0 - s) * b / 8.0 + s * b
        };
        assert!((got as f64 - want).abs() <= 1e-6 * want.abs().max(1e-30), "freq {i}: {got} vs {want}");
    }
    assert!(
        f.iter().zip(&base).any(|(&g, &b)| (g as f64 - b).abs() > 1e-3 * b),
        "scaling must change some frequencies"
    );
}

#[test]
fn windowed_batched_perplexity_equals_naive_per_window_loss() {
    use ferrotune_core::{perplexity, PerplexityOptions};
    // Full attention (not the sliding-window fixture), so that the lost context shows in the loss.
    let model = load_model(&tiny_dir("llama3-rope"), Kind::Float, Device::Cpu).unwrap();
    let ids: Vec<u32> = (0..41u32).map(|i| (i * 37 + 11) % 250 + 3).collect();
    let (w, s) = (16usize, 6usize);
    // Naive: one unpadded forward per window; token p is scored by the first window that reaches it.
    let mut total = 0.0;
    let mut n = 0;
    let mut scored_to = 1;
    let mut start = 0;
    while scored_to < ids.len() {
        let end = (start + w).min(ids.len());
        let x = Tensor::from_slice(&ids[start..end].iter().map(|&t| t as i64).collect::<Vec<_>>()).unsqueeze(0);
        let lp = tch::no_grad(|| model.forward(&x, None, None)).unwrap().get(0).log_softmax(-1, Kind::Double);
        for (p, &id) in ids.iter().enumerate().take(end).skip(scored_to) {
            total -= lp.double_value(&[(p - start - 1) as i64, id as i64]);
            n += 1;
        }
        scored_to = end;
        start += s;
    }
    let naive = total / n as f64;
    assert_eq!(n, ids.len() - 1);
    let got = perplexity(&model, &ids, PerplexityOptions { window: w, stride: s, batch: 3 }).unwrap();
    assert_eq!(got.tokens, ids.len());
    assert!((got.mean_nll - naive).abs() < 1e-5, "{} vs naive {naive}", got.mean_nll);
    let one = perplexity(&model, &ids, PerplexityOptions { window: 64, stride: 32, batch: 1 }).unwrap();
    assert!((one.mean_nll - got.mean_nll).abs() > 1e-4, "windowing must change the loss of a 41-token text");
    assert!(perplexity(&model, &ids[..1], PerplexityOptions::default()).is_err());
    assert!(perplexity(&model, &ids, PerplexityOptions { window: 8, stride: 8, batch: 1 }).is_err());
}
