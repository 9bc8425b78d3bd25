//! Per-token log-probs of given completions after given prompts, batched with right padding. This is what
//! DPO's reference cache and PPO's old / reference log-probs are computed with.

use tch::{Kind, Tensor};

use crate::error::{CoreError, Result};
use crate::models::CausalLm;

/// log p(completion[i] | prompt, completion[..i]) for every completion token of every pair, in batches of
/// at most `batch` sequences. Prompts must be non-empty.
pub fn completion_logprobs(model: &CausalLm, pairs: &[(Vec<u32>, Vec<u32>)], batch: usize) -> Result<Vec<Vec<f32>>> {
    completion_logprobs_until(model, pairs, batch, &|| false)
}

/// [`completion_logprobs`] that gives up with [`CoreError::Cancelled`] before the next batch once
/// `cancelled` says so (the caller went away).
pub fn completion_logprobs_until(
    model: &CausalLm,
    pairs: &[(Vec<u32>, Vec<u32>)],
    batch: usize,
    cancelled: &dyn Fn() -> bool,
) -> Result<Vec<Vec<f32>>> {
    let max_pos = model.cfg.max_position_embeddings as usize;
    for (i, (p, c)) in pairs.iter().enumerate() {
        if p.is_empty() {
            return Err(CoreError::InvalidArgument(format!(
                "sequences[{i}]: prompt_ids is empty (the first completion token needs a context)"
            )));
        }
        if p.len() + c.len() > max_pos {
            return Err(CoreError::InvalidArgument(format!(
                "sequences[{i}]: {} tokens exceed the model's {max_pos} positions",
                p.len() + c.len()
            )));
        }
        if let Some(&t) = p.iter().chain(c).find(|&&t| t as i64 >= model.cfg.vocab_size) {
            return Err(CoreError::InvalidArgument(format!(
                "sequences[{i}]: token id {t} is outside the vocabulary ({})",
                model.cfg.vocab_size
            )));
        }
    }
    let _guard = tch::no_grad_guard();
    let dev = model.device();
    let mut out = Vec::with_capacity(pairs.len());
    for group in pairs.chunks(batch.max(1)) {
        if cancelled() {
            return Err(CoreError::Cancelled);
        }
        let len = group.iter().map(|(p, c)| p.len() + c.len()).max().unwrap_or(0);
        let b = group.len();
        let mut flat = vec![0i64; b * len];
        let mut mask = vec![0i64; b * len];
        for (r, (p, c)) in group.iter().enumerate() {
            for (j, &t) in p.iter().chain(c).enumerate() {
                flat[r * len + j] = t as i64;
                mask[r * len + j] = 1;
            }
        }
        let input = Tensor::f_from_slice(&flat)?.f_view([b as i64, len as i64])?.f_to_device(dev)?;
        let m = Tensor::f_from_slice(&mask)?.f_view([b as i64, len as i64])?.f_to_device(dev)?;
        let hidden = model.forward_hidden(&input, Some(&m), None)?;
        for (r, (p, c)) in group.iter().enumerate() {
            if c.is_empty() {
                out.push(vec![]);
                continue;
            }
            // The hidden state at position t predicts token t+1.
            let h = hidden.f_get(r as i64)?.f_narrow(0, p.len() as i64 - 1, c.len() as i64)?;
            let lp = model.logits(&h)?.f_log_softmax(-1, Kind::Float)?;
            let target = input.f_get(r as i64)?.f_narrow(0, p.len() as i64, c.len() as i64)?;
            let g = lp.f_gather(1, &target.f_unsqueeze(1)?, false)?.f_squeeze_dim(1)?.f_to_device(tch::Device::Cpu)?;
            out.push(Vec::<f32>::try_from(&g)?);
        }
    }
    Ok(out)
}
