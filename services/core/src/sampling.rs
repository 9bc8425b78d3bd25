//! Next-token selection on the host, in the order transformers applies its logits processors:
//! repetition penalty → temperature → top-k → top-p → sample (or argmax when greedy). Seeded with a
//! per-sequence SplitMix64 stream, so a sequence's sample depends only on its seed and its logits.

use tch::{Kind, Tensor};

use crate::error::{CoreError, Result};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// Always take the most likely token (after the repetition penalty).
    pub greedy: bool,
    /// Divides the logits (ignored when greedy).
    pub temperature: f32,
    /// Keep only the k most likely tokens.
    pub top_k: Option<usize>,
    /// Keep the smallest set of most likely tokens whose probability reaches p.
    pub top_p: Option<f32>,
    /// CTRL-style penalty on tokens already in the sequence (1.0 = off).
    pub repetition_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self { greedy: true, temperature: 1.0, top_k: None, top_p: None, repetition_penalty: 1.0 }
    }
}

impl SamplingParams {
    /// No repetition penalty and no top-k / top-p cut: the next token is drawn from the (tempered)
    /// softmax of the logits as they are, which [`sample_rows`] does for a whole batch on the device.
    pub fn is_plain(&self) -> bool {
        self.repetition_penalty == 1.0 && self.top_k.is_none() && self.top_p.is_none_or(|p| p >= 1.0)
    }

    /// Rejects values that make no sense.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CoreError::InvalidArgument(m));
        if !self.greedy && !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!("temperature must be > 0 when sampling, got {}", self.temperature));
        }
        if self.top_k == Some(0) {
            return bad("top_k must be at least 1".into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return bad(format!("top_p must be in (0, 1], got {p}"));
            }
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad(format!("repetition_penalty must be > 0, got {}", self.repetition_penalty));
        }
        Ok(())
    }
}

/// SplitMix64: tiny, fast, and good enough to draw one uniform number per token.
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The stream for sequence `row` of a request seeded with `seed`.
    pub fn for_row(seed: u64, row: usize) -> Self {
        Self(seed ^ (row as u64).wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// log-softmax of `logits` at `index`.
pub fn log_prob(logits: &[f32], index: usize) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().map(|&l| ((l - max) as f64).exp()).sum();
    (logits[index] - max) - sum.ln() as f32
}

/// Chooses the next token from one row of logits. `seen` are the sequence's tokens so far (prompt and
/// generated), for the repetition penalty. `logits` is modified.
pub fn choose(logits: &mut [f32], seen: &[u32], p: &SamplingParams, rng: &mut Rng) -> u32 {
    if p.repetition_penalty != 1.0 {
        let mut done = std::collections::HashSet::new();
        for &t in seen {
            if let Some(l) = logits.get_mut(t as usize) {
                if done.insert(t) {
                    *l = if *l < 0.0 { *l * p.repetition_penalty } else { *l / p.repetition_penalty };
                }
            }
        }
    }
    if p.greedy {
        return argmax(logits) as u32;
    }
    let inv_t = 1.0 / p.temperature;
    if p.is_plain() {
        // No filtering: draw in index order, as [`sample_rows`] does on the device.
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) * inv_t;
        let probs: Vec<f64> = logits.iter().map(|&l| ((l * inv_t - max) as f64).exp()).collect();
        let mut u = rng.uniform() * probs.iter().sum::<f64>();
        let mut last = 0;
        for (i, &q) in probs.iter().enumerate() {
            if q > 0.0 {
                if u < q {
                    return i as u32;
                }
                last = i;
            }
            u -= q;
        }
        return last as u32;
    }
    let mut cand: Vec<(f32, u32)> = logits.iter().enumerate().map(|(i, &l)| (l * inv_t, i as u32)).collect();
    let desc = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
    if let Some(k) = p.top_k.filter(|&k| k < cand.len()) {
        cand.select_nth_unstable_by(k - 1, desc);
        cand.truncate(k);
    }
    cand.sort_unstable_by(desc);
    let max = cand[0].0;
    let mut probs: Vec<f64> = cand.iter().map(|&(l, _)| ((l - max) as f64).exp()).collect();
    let total: f64 = probs.iter().sum();
    if let Some(top_p) = p.top_p {
        // Keep a token while the probability of the strictly more likely ones is below top_p.
        let mut before = 0.0;
        let mut keep = 0;
        for &q in &probs {
            if keep > 0 && before >= top_p as f64 * total {
                break;
            }
            before += q;
            keep += 1;
        }
        probs.truncate(keep);
    }
    let kept: f64 = probs.iter().sum();
    let mut u = rng.uniform() * kept;
    for (q, &(_, id)) in probs.iter().zip(&cand) {
        if u < *q {
            return id;
        }
        u -= q;
    }
    cand[probs.len() - 1].1
}

/// Chooses the next token of each row of `logits` (`[rows, vocab]`) for [`SamplingParams::is_plain`]
/// settings, on the logits' device: greedy rows take the argmax; sampled rows take the first token whose
/// cumulative probability (index order, accumulated in f64) exceeds `u[row]` × the total — the draw [`choose`]
/// makes on the host, `u` being the row's next [`Rng::uniform`] (unused when greedy). Returns each row's token
/// and its log-prob under the raw logits; only those cross to the host.
pub fn sample_rows(logits: &Tensor, u: &[f64], p: &SamplingParams) -> Result<(Vec<u32>, Vec<f32>)> {
    let logits = logits.f_to_kind(Kind::Float)?;
    let logp = logits.f_log_softmax(-1, Kind::Float)?;
    let ids = if p.greedy {
        logits.f_argmax(-1, true)?
    } else {
        let tempered = if p.temperature == 1.0 {
            logp.shallow_clone()
        } else {
            (&logits / p.temperature as f64).f_log_softmax(-1, Kind::Float)?
        };
        let cdf = tempered.f_exp()?.f_cumsum(-1, Kind::Double)?;
        let vocab = cdf.size()[1];
        let total = cdf.f_narrow(1, vocab - 1, 1)?;
        let target = Tensor::f_from_slice(u)?.f_to_device(logits.device())?.f_view([-1, 1])? * total;
        target.f_searchsorted(&cdf, false, true, "right", None::<Tensor>)?.f_clamp_max(vocab - 1)?
    };
    let lp = logp.f_gather(1, &ids, false)?;
    let ids: Vec<i64> = Vec::try_from(ids.f_view([-1])?.f_to_device(tch::Device::Cpu)?)?;
    let lp: Vec<f32> = Vec::try_from(lp.f_view([-1])?.f_to_device(tch::Device::Cpu)?)?;
    Ok((ids.into_iter().map(|i| i as u32).collect(), lp))
}

fn argmax(x: &[f32]) -> usize {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_counts(logits: &[f32], p: SamplingParams, n: usize) -> Vec<usize> {
        let mut rng = Rng::for_row(7, 0);
        let mut counts = vec![0; logits.len()];
        for _ in 0..n {
            counts[choose(&mut logits.to_vec(), &[], &p, &mut rng) as usize] += 1;
        }
        counts
    }

    #[test]
    fn greedy_takes_argmax_after_repetition_penalty() {
        let p = SamplingParams { repetition_penalty: 2.0, ..Default::default() };
        // token 0 (3.0 → 1.5) loses to token 1 (2.0); negative logits are multiplied.
        let mut l = vec![3.0, 2.0, -1.0];
        assert_eq!(choose(&mut l, &[0, 2, 0], &p, &mut Rng::for_row(0, 0)), 1);
        assert_eq!(l, vec![1.5, 2.0, -2.0]);
    }

    #[test]
    fn sampling_follows_softmax_with_temperature() {
        let logits = [0.0f32, (3.0f32).ln(), f32::NEG_INFINITY];
        let c = sample_counts(&logits, SamplingParams { greedy: false, ..Default::default() }, 40_000);
        let f = c[1] as f64 / 40_000.0;
        assert!((f - 0.75).abs() < 0.01, "p(1) = {f}, want 0.75");
        assert_eq!(c[2], 0);
        // temperature 0.5 squares the odds: 9:1
        let c =
            sample_counts(&logits, SamplingParams { greedy: false, temperature: 0.5, ..Default::default() }, 40_000);
        assert!((c[1] as f64 / 40_000.0 - 0.9).abs() < 0.01);
    }

    #[test]
    fn top_k_and_top_p_cut_the_tail() {
        let logits = [2.0f32, 1.0, 0.5, 0.0, -1.0];
        let c = sample_counts(&logits, SamplingParams { greedy: false, top_k: Some(2), ..Default::default() }, 5_000);
        assert!(c[2] == 0 && c[3] == 0 && c[4] == 0 && c[0] > 0 && c[1] > 0, "{c:?}");
        // probs ≈ [.54, .20, .12, .07, .03]: top_p 0.7 keeps {0, 1} (0.54 < 0.7, 0.74 ≥ 0.7)
        let c = sample_counts(&logits, SamplingParams { greedy: false, top_p: Some(0.7), ..Default::default() }, 5_000);
        assert!(c[2] == 0 && c[3] == 0 && c[0] > 0 && c[1] > 0, "{c:?}");
        let c = sample_counts(&logits, SamplingParams { greedy: false, top_p: Some(0.3), ..Default::default() }, 1_000);
        assert_eq!(c[0], 1_000, "top_p below the top token's probability keeps just it");
    }

    #[test]
    fn device_draws_equal_host_draws() {
        let mut g = Rng::for_row(3, 0);
        let (rows, vocab) = (6, 300);
        let logits: Vec<f32> = (0..rows * vocab).map(|_| (g.uniform() * 12.0 - 6.0) as f32).collect();
        let t = Tensor::from_slice(&logits).view([rows as i64, vocab as i64]);
        for p in [
            SamplingParams { greedy: false, ..Default::default() },
            SamplingParams { greedy: false, temperature: 0.7, ..Default::default() },
            SamplingParams { greedy: false, top_p: Some(1.0), ..Default::default() },
            SamplingParams::default(),
        ] {
            assert!(p.is_plain());
            for draw in 0..40u64 {
                let mut streams: Vec<Rng> = (0..rows).map(|r| Rng::for_row(draw, r)).collect();
                let u: Vec<f64> = streams.clone().iter_mut().map(Rng::uniform).collect();
                let (ids, lps) = sample_rows(&t, &u, &p).unwrap();
                for r in 0..rows {
                    let row = &logits[r * vocab..(r + 1) * vocab];
                    let want = choose(&mut row.to_vec(), &[], &p, &mut streams[r]);
                    assert_eq!(ids[r], want, "row {r}, draw {draw}, {p:?}");
                    assert!((lps[r] - log_prob(row, want as usize)).abs() < 1e-5);
                }
            }
        }
        assert!(!SamplingParams { top_k: Some(5), ..Default::default() }.is_plain());
        assert!(!SamplingParams { repetition_penalty: 1.1, ..Default::default() }.is_plain());
    }

    #[test]
    fn log_prob_is_log_softmax() {
        let l = [1.0f32, 2.0, 3.0];
        let z: f64 = l.iter().map(|&x| (x as f64).exp()).sum();
        assert!((log_prob(&l, 1) as f64 - (2.0 - z.ln())).abs() < 1e-6);
    }

    #[test]
    fn bad_params_are_rejected() {
        let ok = SamplingParams::default();
        assert!(ok.validate().is_ok());
        assert!(SamplingParams { greedy: false, temperature: 0.0, ..ok }.validate().is_err());
        assert!(SamplingParams { top_p: Some(1.5), ..ok }.validate().is_err());
        assert!(SamplingParams { top_k: Some(0), ..ok }.validate().is_err());
        assert!(SamplingParams { repetition_penalty: f32::NAN, ..ok }.validate().is_err());
    }
}
