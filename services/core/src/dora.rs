//! DoRA (Liu et al. 2024, <https://arxiv.org/abs/2402.09353>): weight-decomposed LoRA as PEFT 0.21 computes it
//! (`use_dora: true`). Each adapted linear layer gains a trained magnitude vector m `[out]` (PEFT's
//! `lora_magnitude_vector`), initialised to the row norms of W + s·BA; its output is
//!
//! `y + (m/n − 1) · x Wᵀ + (m/n) · s · x Aᵀ Bᵀ` with `n = ‖W + s·BA‖` per output row, **detached**,
//!
//! where y is the base layer's output (bias included) and, with dropout active, x is the dropped input in the
//! two DoRA terms while y keeps the undropped one (PEFT's `base_result = None` path). An NF4 base (QLoRA) is
//! dequantized for the norm and the dropout path. Merging folds it as `W′ = (m/n) (W + s·BA)`.

use tch::{Kind, Tensor};

use crate::error::{CoreError, Result};
use crate::lora::Lora;
use crate::models::CausalLm;

/// ‖W + s·BA‖ per output row in f32, without gradients.
pub(crate) fn weight_norm(w: &Tensor, l: &Lora) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let delta = l.b.f_matmul(&l.a)?.f_mul_scalar(l.scaling)?;
    let full = w.f_to_kind(Kind::Float)?.f_add(&delta)?;
    Ok(full.f_square()?.f_sum_dim_intlist(1, false, Kind::Float)?.f_sqrt()?)
}

/// The DoRA layer's output from the base layer's output `y` (bias included) on input `x`, the dense base
/// weight `w` and the bias.
pub(crate) fn forward(
    l: &Lora,
    m: &Tensor,
    x: &Tensor,
    y: Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let scale = m.f_div(&weight_norm(w, l)?)?;
    let (base, lora) = match l.dropped_input(x)? {
        None => {
            let base = match bias {
                Some(b) => y.f_sub(b)?,
                None => y.shallow_clone(),
            };
            (base, l.delta(x)?)
        }
        Some(xd) => {
            let lora = xd.f_to_kind(l.a.kind())?.f_linear::<Tensor>(&l.a, None)?.f_mul_scalar(l.scaling)?;
            (xd.f_linear::<Tensor>(&w.f_to_kind(x.kind())?, None)?, lora.f_linear::<Tensor>(&l.b, None)?)
        }
    };
    let kind = y.kind();
    let dora = scale
        .f_sub_scalar(1.0)?
        .f_mul(&base.f_to_kind(Kind::Float)?)?
        .f_add(&scale.f_mul(&lora.f_to_kind(Kind::Float)?)?)?;
    Ok(y.f_add(&dora.f_to_kind(kind)?)?)
}

impl CausalLm {
    /// Gives every LoRA adapter a DoRA magnitude vector, initialised to the row norms of W + s·BA (PEFT's
    /// initialisation), trainable.
    pub fn init_dora(&mut self) -> Result<usize> {
        let mut n = 0;
        for (_, lin) in self.linears_mut() {
            let w = lin.dense_weight()?;
            if let Some(l) = &mut lin.lora {
                l.magnitude = Some(weight_norm(&w, l)?.f_detach()?.f_set_requires_grad(true)?);
                n += 1;
            }
        }
        if n == 0 {
            return Err(CoreError::InvalidArgument("use_dora: the model has no LoRA adapters".into()));
        }
        Ok(n)
    }
}

/// The merged weight `(m/n) (W + s·BA)` in f32.
pub(crate) fn merged(w: &Tensor, l: &Lora, m: &Tensor) -> Result<Tensor> {
    let _guard = tch::no_grad_guard();
    let full = w.f_to_kind(Kind::Float)?.f_add(&l.b.f_matmul(&l.a)?.f_mul_scalar(l.scaling)?)?;
    let factor = m.f_div(&weight_norm(w, l)?)?.f_unsqueeze(1)?;
    Ok(full.f_mul(&factor)?)
}
