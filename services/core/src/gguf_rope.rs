//! Llama 3's band-wise RoPE rescaling as llama.cpp keeps it: not as metadata but as a `rope_freqs.weight`
//! tensor of `head_dim / 2` divisors of the rotary frequencies (`convert_hf_to_gguf.py`,
//! `LlamaModel.generate_extra_tensors`). Export computes the tensor from the config; import recovers the config
//! from the tensor (and the original context length, when the file states it) and refuses a tensor that no
//! Llama 3 setting produces.

/// Rotary frequencies `1 / θ^(2i/d)` in f32, as llama.cpp's converter computes them.
fn base_freqs(head_dim: i64, theta: f64) -> Vec<f64> {
    (0..head_dim).step_by(2).map(|i| 1.0 / (theta as f32).powf(i as f32 / head_dim as f32) as f64).collect()
}

/// The divisors llama.cpp applies to each rotary frequency: 1 for short wavelengths, `factor` for long ones,
/// a smooth blend between.
pub fn llama3_factors(head_dim: i64, theta: f64, factor: f64, low: f64, high: f64, original: f64) -> Vec<f32> {
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    base_freqs(head_dim, theta)
        .into_iter()
        .map(|f| {
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor as f32
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
            }
        })
        .collect()
}

/// Llama 3 parameters `(factor, low_freq_factor, high_freq_factor, original)` that reproduce `factors`
/// (within f32 rounding), with `original` as given (llama.cpp's default 8192 when the file does not say).
/// Only the ratios `original / low` and `original / high` matter: they are fitted to the blended frequencies
/// (at least two), or, with fewer, placed in the gaps between the bands. None when nothing fits.
pub fn llama3_from_factors(head_dim: i64, theta: f64, factors: &[f32], original: f64) -> Option<(f64, f64, f64)> {
    let freqs = base_freqs(head_dim, theta);
    // A divisor of 1 written through f32 arithmetic may come back a hair below it.
    if factors.len() != freqs.len() || factors.iter().any(|f| !f.is_finite() || *f < 1.0 - 1e-6) {
        return None;
    }
    let factor = factors.iter().fold(1f32, |a, &b| a.max(b)) as f64;
    if factor <= 1.0 + 1e-6 {
        return None;
    }
    // x = original / wavelength grows with the frequency; bands: x < low → factor, x > high → 1.
    let x: Vec<f64> = freqs.iter().map(|f| original * f / (2.0 * std::f64::consts::PI)).collect();
    let near = |a: f64, b: f64| (a - b).abs() <= 1e-5 * b.abs().max(1.0);
    let mut kept = Vec::new(); // x of frequencies left alone
    let mut scaled = Vec::new(); // x of frequencies divided by `factor`
    let mut blended = Vec::new(); // (x, smooth) of the others
    for (&xi, &r) in x.iter().zip(factors) {
        let r = r as f64;
        if near(r, 1.0) {
            kept.push(xi);
        } else if near(r, factor) {
            scaled.push(xi);
        } else {
            blended.push((xi, (factor / r - 1.0) / (factor - 1.0)));
        }
    }
    let max_scaled = scaled.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let min_kept = kept.iter().copied().fold(f64::INFINITY, f64::min);
    let (low, high) = match blended.len() {
        0 => {
            let lo = if max_scaled.is_finite() { max_scaled } else { min_kept / 2.0 };
            let hi = if min_kept.is_finite() { min_kept } else { max_scaled * 2.0 };
            (lo + (hi - lo) / 3.0, lo + 2.0 * (hi - lo) / 3.0)
        }
        1 => {
            // smooth = (x - low) / (high - low): put `low` halfway between the scaled band and the point.
            let (x0, s0) = blended[0];
            let lo = if max_scaled.is_finite() { (max_scaled + x0) / 2.0 } else { x0 / 2.0 };
            (lo, lo + (x0 - lo) / s0)
        }
        n => {
            // Least squares of smooth = a·x + b: low = −b/a, high = (1 − b)/a.
            let n = n as f64;
            let (sx, sy) = blended.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
            let (mx, my) = (sx / n, sy / n);
            let sxx: f64 = blended.iter().map(|(x, _)| (x - mx).powi(2)).sum();
            let sxy: f64 = blended.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
            let a = sxy / sxx;
            let b = my - a * mx;
            (-b / a, (1.0 - b) / a)
        }
    };
    if !(low.is_finite() && high.is_finite() && low > 0.0 && high > low) {
        return None;
    }
    let back = llama3_factors(head_dim, theta, factor, low, high, original);
    let fits = back.iter().zip(factors).all(|(a, b)| (a - b).abs() <= 1e-5 * b.abs());
    fits.then_some((factor, low, high))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_3_1_parameters_come_back_from_their_factors() {
        // Llama 3.1 8B: head_dim 128, θ 500000, factor 8, low 1, high 4, original 8192.
        let f128 = llama3_factors(128, 500_000.0, 8.0, 1.0, 4.0, 8192.0);
        assert!(f128.iter().any(|&x| x > 1.0 && x < 8.0), "some frequencies are blended");
        let (factor, low, high) = llama3_from_factors(128, 500_000.0, &f128, 8192.0).unwrap();
        assert!((factor - 8.0).abs() < 1e-9 && (low - 1.0).abs() < 1e-4 && (high - 4.0).abs() < 1e-4, "{low} {high}");
        // Tiny heads with no or one blended frequency still give a setting that reproduces the tensor.
        for (orig, low, high) in [(16.0, 1.0, 4.0), (64.0, 1.0, 4.0), (16.0, 2.0, 3.0)] {
            let f = llama3_factors(16, 10_000.0, 4.0, low, high, orig);
            let (fa, lo, hi) = llama3_from_factors(16, 10_000.0, &f, orig).unwrap();
            assert_eq!(llama3_factors(16, 10_000.0, fa, lo, hi, orig), f);
        }
        let mut bad = f128.clone();
        bad[3] = 2.5;
        bad[4] = 1.5; // decreasing: no band layout gives this
        assert!(llama3_from_factors(128, 500_000.0, &bad, 8192.0).is_none());
        assert!(llama3_from_factors(128, 500_000.0, &f128[..10], 8192.0).is_none(), "wrong length");
    }
}
