//! Operations that libtorch lacks, as C++ autograd nodes (`services/core/csrc`, compiled by build.rs against
//! libtorch's headers; tch has no custom autograd functions): a linear layer whose frozen weight is
//! recomputed for the backward pass instead of kept ([`frozen_linear`]), and dropout's masking in one pass
//! each way ([`dropout`]).

pub mod dropout;
pub mod frozen_linear;

use std::ffi::{c_char, CStr};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::{CoreError, Result};

extern "C" {
    fn ft_last_error() -> *const c_char;
}

/// Takes ownership of a tensor handle returned by a `csrc` function, or its error when null.
fn owned(t: *mut C_tensor) -> Result<Tensor> {
    if t.is_null() {
        // SAFETY: a NUL-terminated thread-local string owned by the C++ side, set by the failed call.
        let msg = unsafe { CStr::from_ptr(ft_last_error()) }.to_string_lossy().into_owned();
        return Err(CoreError::Torch(tch::TchError::Torch(msg)));
    }
    // SAFETY: a fresh `at::Tensor*` that the caller now owns.
    Ok(unsafe { Tensor::from_ptr(t) })
}
