//! A linear layer over a frozen weight that autograd does not keep for the backward pass: the weight is
//! recomputed (`recompute`) when the input gradient is needed. Used for QLoRA's NF4 base weights, whose
//! dequantized copies would otherwise all stay alive from the forward to the backward pass (the base model
//! in the compute dtype, ~4× the f32 size of the 4-bit codes), as bitsandbytes' `MatMul4Bit` avoids too.
//! The autograd node is C++ (`csrc/frozen_linear.cpp`).

use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};

use tch::Tensor;
use torch_sys::C_tensor;

use super::owned;
use crate::Result;

type Recompute = Box<dyn Fn() -> Result<Tensor> + Send>;

extern "C" {
    fn ft_frozen_linear(
        x: *mut C_tensor,
        w: *mut C_tensor,
        state: *mut c_void,
        weight: extern "C" fn(*mut c_void) -> *mut C_tensor,
        drop: extern "C" fn(*mut c_void),
    ) -> *mut C_tensor;
}

extern "C" fn call_recompute(state: *mut c_void) -> *mut C_tensor {
    // SAFETY: `state` is the `Box<Recompute>` leaked by `frozen_linear`, alive until `drop_recompute`.
    let f = unsafe { &*(state as *const Recompute) };
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(mut t)) => {
            let p = t.as_mut_ptr();
            std::mem::forget(t);
            p
        }
        _ => std::ptr::null_mut(),
    }
}

extern "C" fn drop_recompute(state: *mut c_void) {
    // SAFETY: called once by the C++ side for the pointer `frozen_linear` leaked.
    drop(unsafe { Box::from_raw(state as *mut Recompute) });
}

/// `x wᵀ` for `x` `[n, in]` and a frozen `w` `[out, in]` (same kind and device). When `x` requires a
/// gradient, the result's backward node keeps only `recompute`, which must return `w` again.
pub fn frozen_linear(
    x: &Tensor,
    w: &Tensor,
    recompute: impl Fn() -> Result<Tensor> + Send + 'static,
) -> Result<Tensor> {
    let state: Box<Recompute> = Box::new(Box::new(recompute));
    let state = Box::into_raw(state) as *mut c_void;
    // SAFETY: the handles are valid tensors for the duration of the call (the C++ side copies what it keeps);
    // `state` is consumed by the C++ side, which drops it through `drop_recompute`.
    let y = unsafe {
        ft_frozen_linear(
            x.as_ptr() as *mut C_tensor,
            w.as_ptr() as *mut C_tensor,
            state,
            call_recompute,
            drop_recompute,
        )
    };
    owned(y)
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    use tch::{Kind, Tensor};

    use super::*;
    use crate::CoreError;

    #[test]
    fn forward_and_input_gradient_equal_autograds_linear_and_the_weight_is_recomputed() {
        tch::manual_seed(0);
        let w = Tensor::randn([5, 3], (Kind::Float, tch::Device::Cpu));
        let mut x = Tensor::randn([4, 3], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let g = Tensor::randn([4, 5], (Kind::Float, tch::Device::Cpu));
        let calls = Arc::new(AtomicUsize::new(0));
        let (w2, c2) = (w.shallow_clone(), calls.clone());
        let y = frozen_linear(&x, &w, move || {
            c2.fetch_add(1, Ordering::SeqCst);
            Ok(w2.copy())
        })
        .unwrap();
        let expected = x.linear::<Tensor>(&w, None);
        assert!(y.allclose(&expected, 1e-6, 1e-6, false));
        assert_eq!(calls.load(Ordering::SeqCst), 0, "the forward pass uses the weight it was given");
        (&y * &g).sum(Kind::Float).backward();
        let ours = x.grad().copy();
        x.zero_grad();
        (&expected * &g).sum(Kind::Float).backward();
        assert!(ours.allclose(&x.grad(), 1e-6, 1e-6, false), "{ours} vs {}", x.grad());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(Arc::strong_count(&calls), 1, "the node releases its state after the backward pass");
        drop(y);
    }

    #[test]
    fn without_grad_the_state_is_dropped_at_once() {
        let w = Tensor::ones([2, 2], (Kind::Float, tch::Device::Cpu));
        let x = Tensor::ones([1, 2], (Kind::Float, tch::Device::Cpu));
        let alive = Arc::new(());
        let held = alive.clone();
        let y = frozen_linear(&x, &w, move || {
            let _ = &held;
            Ok(Tensor::new())
        })
        .unwrap();
        assert_eq!(Vec::<f32>::try_from(y.view([-1])).unwrap(), vec![2.0, 2.0]);
        assert_eq!(Arc::strong_count(&alive), 1);
        assert!(!y.requires_grad());
    }

    #[test]
    fn a_failed_recompute_is_an_error_of_the_backward_pass_and_bad_shapes_an_error_of_the_forward() {
        let w = Tensor::ones([2, 2], (Kind::Float, tch::Device::Cpu));
        let x = Tensor::ones([1, 2], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true);
        let y = frozen_linear(&x, &w, || Err(CoreError::InvalidArgument("gone".into()))).unwrap();
        let err = y.sum(Kind::Float).f_backward().unwrap_err().to_string();
        assert!(err.contains("recomputing a frozen weight"), "{err}");
        let bad = Tensor::ones([1, 3], (Kind::Float, tch::Device::Cpu));
        assert!(frozen_linear(&bad, &w, || Ok(Tensor::new())).is_err());
    }
}
