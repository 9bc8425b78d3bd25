//! The causal-LM loss over trained tokens, computed so that full-vocabulary f32 logits never exist for a
//! whole batch: logits + log-softmax run `chunk` rows of the trained positions' hidden states at a time, each
//! chunk's gradient with respect to those rows is taken at once (written out for a frozen head, by autograd
//! when the head trains), and the gradient of the hidden states is then sent back through the network in one
//! pass. Peak memory for the head is one chunk of logits.

use tch::{Kind, Tensor};

use crate::error::{CoreError, Result};
use crate::models::CausalLm;

/// Label value that excludes a position from the loss (as in transformers).
pub const IGNORE_INDEX: i64 = -100;

/// Sum of next-token NLL and number of trained tokens.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LossSum {
    /// Σ −log p(label) over trained positions.
    pub nll: f64,
    /// Trained positions.
    pub tokens: usize,
}

/// Rows of `hidden` that predict a trained label, and those labels.
///
/// # Shapes
/// `hidden`: `[b, s, h]`, `labels`: `[b, s]` (aligned with the inputs; position t+1's label is predicted
/// at t) → (`[n, h]`, `[n]`).
fn trained_rows(hidden: &Tensor, labels: &Tensor) -> Result<(Tensor, Tensor)> {
    let (b, s, h) = hidden.size3()?;
    if labels.size() != [b, s] {
        return Err(CoreError::InvalidArgument(format!("labels must be {:?}, got {:?}", [b, s], labels.size())));
    }
    let pred = hidden.f_narrow(1, 0, s - 1)?.f_reshape([-1, h])?;
    let target = labels.f_narrow(1, 1, s - 1)?.f_reshape([-1])?.f_to_device(hidden.device())?;
    let keep = target.f_ne(IGNORE_INDEX)?.f_nonzero()?.f_squeeze_dim(1)?;
    Ok((pred.f_index_select(0, &keep)?, target.f_index_select(0, &keep)?))
}

fn chunk_nll(model: &CausalLm, rows: &Tensor, target: &Tensor) -> Result<Tensor> {
    let logits = model.logits(rows)?;
    let lp = logits.f_log_softmax(-1, Kind::Float)?;
    Ok(lp.f_gather(1, &target.f_unsqueeze(1)?, false)?.f_neg()?.f_sum(Kind::Float)?)
}

/// A frozen head's chunk: Σ NLL and its gradient with respect to the rows, written out rather than taped:
/// with p = softmax(rows Wᵀ), d(scale · Σ NLL)/d rows = scale · (p − onehot(target)) W. One `[len, vocab]`
/// f32 buffer, overwritten in place (logits → exp(logits − max) → gradient of the logits), where autograd
/// keeps the logits, the log-probabilities and two full-vocabulary gradients. NLL = log Σ exp(z − max) + max
/// − z[target], from the same pass.
fn chunk_nll_grad(model: &CausalLm, rows: &Tensor, target: &Tensor, scale: f64) -> Result<(f64, Tensor)> {
    let _guard = tch::no_grad_guard();
    let mut z = model.logits(rows)?.f_to_kind(Kind::Float)?;
    let at = target.f_unsqueeze(1)?;
    let picked = z.f_gather(1, &at, false)?;
    let max = z.f_amax([1], true)?;
    let _ = z.f_sub_(&max)?.f_exp_()?;
    let sum = z.f_sum_dim_intlist(&[1i64][..], true, Kind::Float)?;
    let nll = sum.f_log()?.f_add(&max)?.f_sub(&picked)?.f_sum(Kind::Double)?.f_double_value(&[])?;
    // scale · p = exp(z − max) · (scale / Σ), then − scale at the targets.
    let _ = z.f_mul_(&sum.f_reciprocal()?.f_mul_scalar(scale)?)?;
    let minus = Tensor::f_full([rows.size()[0], 1], -scale, (Kind::Float, z.device()))?;
    let _ = z.f_scatter_add_(1, &at, &minus)?;
    let head = &model.lm_head;
    Ok((nll, z.f_to_kind(head.kind())?.f_mm(head)?))
}

/// Loss without gradients (evaluation).
pub fn causal_lm_loss(model: &CausalLm, hidden: &Tensor, labels: &Tensor, chunk: i64) -> Result<LossSum> {
    let _guard = tch::no_grad_guard();
    let (rows, target) = trained_rows(hidden, labels)?;
    let n = rows.size()[0];
    let mut nll = 0.0;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        nll +=
            chunk_nll(model, &rows.f_narrow(0, start, len)?, &target.f_narrow(0, start, len)?)?.f_double_value(&[])?;
        start += len;
    }
    Ok(LossSum { nll, tokens: n as usize })
}

/// Loss with gradients: backpropagates `scale × Σ NLL` into the model (gradients accumulate into the
/// leaves' `.grad`) and returns the unscaled sum.
pub fn causal_lm_loss_backward(
    model: &CausalLm,
    hidden: &Tensor,
    labels: &Tensor,
    scale: f64,
    chunk: i64,
) -> Result<LossSum> {
    let (rows, target) = trained_rows(hidden, labels)?;
    let n = rows.size()[0];
    if n == 0 {
        return Ok(LossSum::default());
    }
    // Full fine-tuning trains the head too: autograd then carries each chunk's gradient into it (and into
    // the detached rows); a frozen head's chunks have their row gradients written out.
    let detached = if model.lm_head.requires_grad() { Some(rows.f_detach()?.f_set_requires_grad(true)?) } else { None };
    let mut grads = Vec::new();
    let mut nll = 0.0;
    let mut start = 0;
    while start < n {
        let len = chunk.min(n - start);
        let t = target.f_narrow(0, start, len)?;
        match &detached {
            Some(d) => {
                let l = chunk_nll(model, &d.f_narrow(0, start, len)?, &t)?;
                nll += l.f_double_value(&[])?;
                l.f_mul_scalar(scale)?.f_backward()?;
            }
            None => {
                let (l, g) = chunk_nll_grad(model, &rows.f_narrow(0, start, len)?, &t, scale)?;
                nll += l;
                grads.push(g);
            }
        }
        start += len;
    }
    let grad = match detached {
        Some(d) => d.grad(),
        None => Tensor::f_cat(&grads, 0)?,
    };
    // d(scale·loss)/d(network) = Σ rows · grad, backpropagated once through the decoder.
    rows.f_mul(&grad)?.f_sum(Kind::Float)?.f_backward()?;
    Ok(LossSum { nll, tokens: n as usize })
}

/// log σ(x), stable for large |x| (the preference losses' scalar form).
pub(crate) fn log_sigmoid(x: f64) -> f64 {
    x.min(0.0) - (-x.abs()).exp().ln_1p()
}

/// σ(x), stable for large |x|.
pub(crate) fn sigmoid(x: f64) -> f64 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        x.exp() / (1.0 + x.exp())
    }
}
