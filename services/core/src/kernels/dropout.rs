//! Dropout's masking, `x` with zeros where the mask is set, in one pass forward and one backward (f32 on the
//! CPU; other kinds and devices use `masked_fill`, with the same values). See `csrc/dropout.cpp`.

use tch::Tensor;
use torch_sys::C_tensor;

use super::owned;
use crate::Result;

extern "C" {
    fn ft_zero_where(x: *mut C_tensor, dropped: *mut C_tensor) -> *mut C_tensor;
}

/// `x` with zeros where `dropped` (bool, `x`'s shape) is true; the gradient is masked alike. The mask is
/// kept for the backward pass.
pub fn zero_where(x: &Tensor, dropped: &Tensor) -> Result<Tensor> {
    // SAFETY: valid tensor handles for the duration of the call; the C++ side copies what it keeps.
    owned(unsafe { ft_zero_where(x.as_ptr() as *mut C_tensor, dropped.as_ptr() as *mut C_tensor) })
}

#[cfg(test)]
mod tests {
    use tch::{Device, Kind, Tensor};

    use super::*;

    #[test]
    fn equals_masked_fill_forward_and_backward() {
        tch::manual_seed(3);
        for shape in [vec![7i64], vec![4, 33, 70_000 / 33]] {
            let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let m = Tensor::rand(shape.as_slice(), (Kind::Float, Device::Cpu)).ge(0.9);
            let g = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu));
            let ours = zero_where(&x, &m).unwrap();
            let theirs = x.masked_fill(&m, 0.0);
            assert!(ours.equal(&theirs));
            (&ours * &g).sum(Kind::Float).backward();
            let gx = x.grad().copy();
            let mut x2 = x.detach().set_requires_grad(true);
            (x2.masked_fill(&m, 0.0) * &g).sum(Kind::Float).backward();
            assert!(gx.equal(&x2.grad()), "gradients differ");
            x2.zero_grad();
        }
    }

    #[test]
    fn other_kinds_and_layouts_and_no_grad_and_bad_masks() {
        let x = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]).tr();
        let m = Tensor::from_slice(&[true, false, false, true, false, false]).view([3, 2]);
        assert!(zero_where(&x, &m).unwrap().equal(&x.masked_fill(&m, 0.0)), "non-contiguous input");
        let xd = x.to_kind(Kind::Double);
        assert!(zero_where(&xd, &m).unwrap().equal(&xd.masked_fill(&m, 0.0)), "f64 falls back");
        assert!(!zero_where(&x, &m).unwrap().requires_grad());
        let bad = Tensor::from_slice(&[true, false]);
        let err = zero_where(&x, &bad).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
    }
}
