//! Next-token loss of a model over a text: the causal-LM loss with labels = input ids (transformers'
//! `model(ids, labels=ids).loss`), over windows for texts longer than the context.
//!
//! Windows: a text of N tokens is cut into windows of at most `window` tokens that overlap by `window −
//! stride` tokens; every token after the first is predicted exactly once, by the first window that has it
//! past its overlap (the sliding-window scheme of HF's perplexity guide). Windows run `batch` at a time,
//! right-padded. The log-softmax is taken in f32 one window at a time, so full-vocabulary f32 logits for the
//! whole batch never exist at once.

use serde::Serialize;
use tch::{Kind, Tensor};

use crate::error::{CoreError, Result};
use crate::models::CausalLm;

/// Options of [`perplexity`].
#[derive(Debug, Clone, Copy)]
pub struct PerplexityOptions {
    /// Longest window in tokens (capped at the model's context).
    pub window: usize,
    /// Tokens a window advances (less than `window`); `window − stride` tokens of context overlap.
    pub stride: usize,
    /// Windows per forward pass.
    pub batch: usize,
}

impl Default for PerplexityOptions {
    fn default() -> Self {
        Self { window: 1024, stride: 512, batch: 4 }
    }
}

/// Result of [`perplexity`].
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct Perplexity {
    /// Tokens in the text.
    pub tokens: usize,
    /// Mean negative log-likelihood (nats) over the predicted tokens (all but the first).
    pub mean_nll: f64,
    /// exp(mean_nll).
    pub perplexity: f64,
}

/// One window: token range `[start, end)`, of which positions `>= first_scored` (relative) are scored.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Window {
    start: usize,
    end: usize,
    first_scored: usize,
}

fn windows(n: usize, window: usize, stride: usize) -> Vec<Window> {
    let mut out = Vec::new();
    let mut scored_to = 1; // token 0 is never predicted
    let mut start = 0;
    while scored_to < n {
        let end = (start + window).min(n);
        out.push(Window { start, end, first_scored: scored_to - start });
        scored_to = end;
        if end == n {
            break;
        }
        start += stride;
    }
    out
}

/// Mean NLL and perplexity of `ids` under `model`.
pub fn perplexity(model: &CausalLm, ids: &[u32], opts: PerplexityOptions) -> Result<Perplexity> {
    if ids.len() < 2 {
        return Err(CoreError::InvalidArgument(format!(
            "text has {} token(s); perplexity needs at least 2",
            ids.len()
        )));
    }
    let window = opts.window.min(model.cfg.max_position_embeddings as usize).max(2);
    if opts.stride == 0 || opts.stride >= window || opts.batch == 0 {
        return Err(CoreError::InvalidArgument(format!(
            "need 0 < stride < window and batch > 0 (window {window}, stride {}, batch {})",
            opts.stride, opts.batch
        )));
    }
    let _guard = tch::no_grad_guard();
    let dev = model.device();
    let mut total = 0f64;
    let mut count = 0usize;
    for group in windows(ids.len(), window, opts.stride).chunks(opts.batch) {
        let len = group.iter().map(|w| w.end - w.start).max().unwrap_or(0);
        let mut flat = vec![0i64; group.len() * len];
        let mut mask = vec![0i64; group.len() * len];
        for (r, w) in group.iter().enumerate() {
            for (j, &t) in ids[w.start..w.end].iter().enumerate() {
                flat[r * len + j] = t as i64;
                mask[r * len + j] = 1;
            }
        }
        let b = group.len() as i64;
        let input = Tensor::f_from_slice(&flat)?.f_view([b, len as i64])?.f_to_device(dev)?;
        let m = Tensor::f_from_slice(&mask)?.f_view([b, len as i64])?.f_to_device(dev)?;
        let hidden = model.forward_hidden(&input, Some(&m), None)?;
        for (r, w) in group.iter().enumerate() {
            let n = (w.end - w.start) as i64;
            let first = w.first_scored as i64;
            // hidden at position p predicts token p+1; score targets first..n.
            let h = hidden.f_get(r as i64)?.f_narrow(0, first - 1, n - first)?;
            let logits = model.logits(&h)?;
            let target = input.f_get(r as i64)?.f_narrow(0, first, n - first)?;
            let lp = logits.f_log_softmax(-1, Kind::Float)?;
            let nll = lp.f_gather(1, &target.f_unsqueeze(1)?, false)?.f_neg()?.f_sum(Kind::Double)?;
            total += nll.f_double_value(&[])?;
            count += (n - first) as usize;
        }
    }
    let mean_nll = total / count as f64;
    Ok(Perplexity { tokens: ids.len(), mean_nll, perplexity: mean_nll.exp() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_score_every_token_but_the_first_once() {
        for (n, w, s) in [(2, 4, 2), (10, 4, 2), (10, 4, 3), (11, 5, 3), (100, 16, 7), (5, 100, 50)] {
            let ws = windows(n, w, s);
            let mut scored = vec![0; n];
            for x in &ws {
                assert!(x.end - x.start <= w);
                assert!(x.first_scored >= 1, "a scored token needs context");
                for c in &mut scored[x.start + x.first_scored..x.end] {
                    *c += 1;
                }
            }
            assert_eq!(scored[0], 0);
            assert!(scored[1..].iter().all(|&c| c == 1), "n={n} w={w} s={s}: {scored:?}");
        }
    }
}
