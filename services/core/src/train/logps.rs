//! Sequence log-probabilities for the preference objectives (DPO, ORPO, SimPO, KTO), and their backward pass
//! without full-vocabulary logits for the batch.
//!
//! A first pass (no gradients on the logits) gives each sequence's summed log-prob in chunks of rows. Every
//! preference loss is a function of those sums, so its derivative with respect to each token's log-prob is a
//! per-sequence scalar (one for completion tokens, one for every scored token — ORPO's NLL covers the prompt
//! too). A second chunked pass backpropagates Σ coef · log p(token) into the detached final hidden states,
//! whose gradient then goes through the network once.

use tch::{Kind, Tensor};

use super::loss::IGNORE_INDEX;
use super::sft::{SftExample, SftObjective};
use crate::error::Result;
use crate::models::CausalLm;

/// Rows of `hidden` that predict a labelled token, those tokens, and the batch row each belongs to.
pub(super) fn scored_rows(hidden: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    let (_, s, h) = hidden.size3()?;
    let pred = hidden.f_narrow(1, 0, s - 1)?.f_reshape([-1, h])?;
    let target = labels.f_narrow(1, 1, s - 1)?.f_reshape([-1])?.f_to_device(hidden.device())?;
    let keep = target.f_ne(IGNORE_INDEX)?.f_nonzero()?.f_squeeze_dim(1)?;
    let seq = keep.f_div_scalar_mode(s - 1, "floor")?;
    Ok((pred.f_index_select(0, &keep)?, target.f_index_select(0, &keep)?, seq))
}

fn token_logps(model: &CausalLm, rows: &Tensor, target: &Tensor) -> Result<Tensor> {
    let lp = model.logits(rows)?.f_log_softmax(-1, Kind::Float)?;
    Ok(lp.f_gather(1, &target.f_unsqueeze(1)?, false)?.f_squeeze_dim(1)?)
}

/// One sequence's log-prob sums.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SeqLogp {
    /// Σ log p over the completion (labelled) tokens.
    pub completion: f64,
    /// How many completion tokens.
    pub completion_tokens: usize,
    /// Σ log p over every scored token (the whole sequence after its first token when it was scored in
    /// full, else the completion).
    pub all: f64,
    /// How many scored tokens.
    pub all_tokens: usize,
}

impl SeqLogp {
    /// The completion's mean log-prob per token (TRL's `average_log_prob`).
    pub fn completion_mean(&self) -> f64 {
        self.completion / self.completion_tokens.max(1) as f64
    }
}

/// The scored rows of a batch's final hidden states (with the graph when gradients are on), their target
/// tokens, the sequence of each, and whether each is a completion token (1.0) or a prompt one (0.0).
pub struct Scored {
    rows: Tensor,
    target: Tensor,
    seq: Tensor,
    completion: Tensor,
}

/// The policy's pass over `seqs`: the scored rows (see [`Scored`]) and each sequence's sums, computed without
/// gradients on the logits, `chunk` rows at a time. Sequences with `full[i]` are scored on every token (their
/// labels only say which tokens are the completion); the others on their labelled tokens.
pub fn scored_pass(
    model: &CausalLm,
    seqs: &[&SftExample],
    full: &[bool],
    pad_id: u32,
    chunk: i64,
) -> Result<(Scored, Vec<SeqLogp>)> {
    let mut flags = Vec::new();
    let whole: Vec<SftExample> = seqs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let f = full.get(i).copied().unwrap_or(false);
            for &l in e.labels.iter().skip(1) {
                if f || l != IGNORE_INDEX {
                    flags.push(if l != IGNORE_INDEX { 1f32 } else { 0.0 });
                }
            }
            if f {
                SftExample { labels: e.input_ids.iter().map(|&t| t as i64).collect(), ..(*e).clone() }
            } else {
                (*e).clone()
            }
        })
        .collect();
    let refs: Vec<&SftExample> = whole.iter().collect();
    let collate = SftObjective { pad_id, chunk, gradient_checkpointing: false };
    let c = collate.collate(model, &refs)?;
    let hidden = model.forward_hidden(&c.ids, c.mask.as_ref(), c.positions.as_ref())?;
    let (rows, target, seq) = scored_rows(&hidden, &c.labels)?;
    let dev = rows.device();
    let completion = Tensor::f_from_slice(&flags)?.f_to_device(dev)?;
    let _guard = tch::no_grad_guard();
    let detached = rows.f_detach()?;
    let n = detached.size()[0];
    let zeros = || Tensor::f_zeros([seqs.len() as i64], (Kind::Float, dev));
    let (mut all, mut comp) = (zeros()?, zeros()?);
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let lp = token_logps(model, &detached.f_narrow(0, start, len)?, &target.f_narrow(0, start, len)?)?;
        let s = seq.f_narrow(0, start, len)?;
        all = all.f_index_add(0, &s, &lp)?;
        comp = comp.f_index_add(0, &s, &lp.f_mul(&completion.f_narrow(0, start, len)?)?)?;
        start += len;
    }
    let count = |w: &Tensor| -> Result<Vec<f64>> {
        let t = Tensor::f_zeros([seqs.len() as i64], (Kind::Float, dev))?.f_index_add(0, &seq, w)?;
        Ok(Vec::<f64>::try_from(&t.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?)?)
    };
    let host = |t: &Tensor| -> Result<Vec<f64>> {
        Ok(Vec::<f64>::try_from(&t.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?)?)
    };
    let (all, comp) = (host(&all)?, host(&comp)?);
    let (all_n, comp_n) = (count(&Tensor::f_ones_like(&completion)?)?, count(&completion)?);
    let sums = (0..seqs.len())
        .map(|i| SeqLogp {
            completion: comp[i],
            completion_tokens: comp_n[i] as usize,
            all: all[i],
            all_tokens: all_n[i] as usize,
        })
        .collect();
    Ok((Scored { rows, target, seq, completion }, sums))
}

/// Backpropagates Σ_seq (coef_completion[seq] · Σ_completion log p + coef_all[seq] · Σ_scored log p) through
/// the rows of `scored` and then the network, `chunk` rows of logits at a time.
pub fn backward(
    model: &CausalLm,
    scored: &Scored,
    coef_completion: &[f64],
    coef_all: &[f64],
    chunk: i64,
) -> Result<()> {
    let n = scored.rows.size()[0];
    if n == 0 {
        return Ok(());
    }
    let dev = scored.rows.device();
    let per_seq = |c: &[f64]| -> Result<Tensor> {
        let c: Vec<f32> = c.iter().map(|&x| x as f32).collect();
        Ok(Tensor::f_from_slice(&c)?.f_to_device(dev)?.f_index_select(0, &scored.seq)?)
    };
    let coef = per_seq(coef_completion)?.f_mul(&scored.completion)?.f_add(&per_seq(coef_all)?)?;
    let detached = scored.rows.f_detach()?.f_set_requires_grad(true)?;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let lp = token_logps(model, &detached.f_narrow(0, start, len)?, &scored.target.f_narrow(0, start, len)?)?;
        lp.f_mul(&coef.f_narrow(0, start, len)?)?.f_sum(Kind::Float)?.f_backward()?;
        start += len;
    }
    scored.rows.f_mul(&detached.grad())?.f_sum(Kind::Float)?.f_backward()?;
    Ok(())
}

/// Per-sequence summed completion log-probs (and token counts) of `seqs`, without gradients: the reference
/// pass of DPO and KTO (call it with the adapter disabled).
pub fn sequence_logps(model: &CausalLm, seqs: &[&SftExample], pad_id: u32, chunk: i64) -> Result<Vec<(f64, usize)>> {
    let _guard = tch::no_grad_guard();
    Ok(scored_pass(model, seqs, &[], pad_id, chunk)?
        .1
        .into_iter()
        .map(|s| (s.completion, s.completion_tokens))
        .collect())
}
