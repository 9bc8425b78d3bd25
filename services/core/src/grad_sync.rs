//! Gradients summed over the ranks while the backward pass runs (`csrc/grad_sync.cpp`): the trainable
//! parameters in buckets, in the order their gradients become ready; each bucket's all-reduce starts as soon as
//! its last gradient is accumulated, on the same c10d group as [`crate::dist::ProcessGroup`]'s collectives.
//! Armed for the last micro-batch of a step ([`GradSync::arm`]); [`GradSync::finish`] waits and writes the sums.

use std::ffi::{c_longlong, c_void};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::dist::ProcessGroup;
use crate::{CoreError, Result};

extern "C" {
    fn ft_gs_new(
        g: *mut c_void,
        t: *const *mut C_tensor,
        n: usize,
        bucket: c_longlong,
        first: c_longlong,
    ) -> *mut c_void;
    fn ft_gs_buckets(h: *mut c_void) -> usize;
    fn ft_gs_arm(h: *mut c_void);
    fn ft_gs_finish(h: *mut c_void, launched_early: *mut usize) -> i32;
    fn ft_gs_free(h: *mut c_void);
}

/// Bucket size (DDP's default is 25 MiB; adapters are small, so smaller buckets start sooner).
pub const BUCKET_BYTES: i64 = 4 << 20;
/// The first bucket (the last layers' gradients, ready first), as DDP's `first_bucket_bytes_cap`.
pub const FIRST_BUCKET_BYTES: i64 = 1 << 20;

/// Overlapped gradient sums of a set of parameters; the hooks are removed on drop.
pub struct GradSync {
    handle: *mut c_void,
    rank: usize,
    world: usize,
}

// SAFETY: the handle is an owned C++ object; its state is behind a mutex on the C++ side.
unsafe impl Send for GradSync {}

/// How a [`GradSync::finish`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished {
    /// The gradients hold the sums; `early` of the buckets started during the backward pass.
    Summed {
        /// Buckets started before `finish`.
        early: usize,
    },
    /// A gradient grew after its bucket started on some rank: nothing was written; sum them without overlap.
    Stale,
}

impl GradSync {
    /// Hooks `params` (in forward order) of `group`'s ranks.
    pub fn new(group: &ProcessGroup, params: &[&Tensor], bucket_bytes: i64, first_bytes: i64) -> Result<Self> {
        let ptrs: Vec<*mut C_tensor> = params.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
        // SAFETY: live group handle; the tensor handles are read during the call (the C++ side keeps its own
        // references).
        let handle = unsafe { ft_gs_new(group.raw(), ptrs.as_ptr(), ptrs.len(), bucket_bytes, first_bytes) };
        if handle.is_null() {
            return Err(CoreError::Internal(format!("gradient buckets: {}", crate::dist::last_error())));
        }
        Ok(Self { handle, rank: group.rank, world: group.world })
    }

    /// Buckets the parameters were split into.
    pub fn buckets(&self) -> usize {
        // SAFETY: live handle.
        unsafe { ft_gs_buckets(self.handle) }
    }

    /// The next backward pass starts each bucket's all-reduce once its gradients are accumulated.
    pub fn arm(&mut self) {
        // SAFETY: live handle.
        unsafe { ft_gs_arm(self.handle) }
    }

    /// Starts the buckets left, waits for every all-reduce, and writes the sums into the gradients.
    pub fn finish(&mut self) -> Result<Finished> {
        let mut early = 0usize;
        // SAFETY: live handle; `early` is written once.
        match unsafe { ft_gs_finish(self.handle, &mut early) } {
            0 => Ok(Finished::Summed { early }),
            1 => Ok(Finished::Stale),
            _ => Err(CoreError::Unavailable(format!(
                "rank {} of {}: gradient all-reduce failed (a rank died or stopped answering?): {}",
                self.rank,
                self.world,
                crate::dist::first_line(&crate::dist::last_error())
            ))),
        }
    }
}

impl Drop for GradSync {
    fn drop(&mut self) {
        // SAFETY: the handle came from ft_gs_new and is freed once.
        unsafe { ft_gs_free(self.handle) }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tch::Kind;

    use super::*;

    fn two_ranks<T: Send + 'static>(f: fn(usize, ProcessGroup) -> T) -> Vec<T> {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    f(rank, ProcessGroup::join("127.0.0.1", port, rank, 2, Duration::from_secs(30)).unwrap())
                })
            })
            .collect();
        ranks.into_iter().map(|r| r.join().unwrap()).collect()
    }

    /// Three parameters (forward order), one per bucket; rank r's inputs are scaled by r + 1.
    fn params() -> Vec<Tensor> {
        [3, 1000, 5]
            .iter()
            .map(|&n| Tensor::ones([n], (Kind::Float, tch::Device::Cpu)).set_requires_grad(true))
            .collect()
    }

    /// [`params`] hooked into 16-byte buckets (one parameter each).
    fn synced(g: &ProcessGroup) -> (Vec<Tensor>, GradSync) {
        let p = params();
        let sync = GradSync::new(g, &p.iter().collect::<Vec<_>>(), 16, 16).unwrap();
        (p, sync)
    }

    /// Σ_k (k+1)·s·p_k² over the parameters `use_` picks: the gradient of p_k is 2(k+1)·s·p_k.
    fn backward(p: &[Tensor], s: f64, use_: &[usize]) {
        let loss = use_
            .iter()
            .map(|&k| (&p[k] * &p[k]).sum(Kind::Float) * ((k + 1) as f64 * s))
            .fold(Tensor::zeros([], (Kind::Float, tch::Device::Cpu)), |a, b| a + b);
        loss.backward();
    }

    #[test]
    fn buckets_sum_during_the_backward_pass_and_untouched_ones_at_finish() {
        let out = two_ranks(|rank, g| {
            let (p, mut sync) = synced(&g);
            assert_eq!(sync.buckets(), 3);
            let s = rank as f64 + 1.0;
            // An unarmed micro-batch accumulates; the armed one reaches p0 and p1 only (p2 never: zero).
            backward(&p, s, &[0, 1]);
            sync.arm();
            backward(&p, s, &[1]);
            let f = sync.finish().unwrap();
            (f, p.iter().map(|t| Vec::<f32>::try_from(t.grad()).unwrap()).collect::<Vec<_>>())
        });
        for (f, grads) in out {
            // Buckets run last parameter first (p2, p1, p0) and start in that order: p1's bucket was ready in the
            // backward pass but waited for p2's, which only `finish` starts.
            assert_eq!(f, Finished::Summed { early: 0 }, "bucket 0 (p2) was never ready, so none started early");
            // d/dp of (k+1)·s·p² = 2(k+1)·s; summed over s = 1, 2: 2(k+1)·3 per micro-batch that reached it.
            assert!(grads[0].iter().all(|&x| x == 6.0), "{:?}", &grads[0]);
            assert!(grads[1].iter().all(|&x| x == 24.0), "two micro-batches");
            assert!(grads[2].iter().all(|&x| x == 0.0), "never reached: a zero gradient");
        }
    }

    #[test]
    fn buckets_start_in_order_as_the_backward_pass_readies_them() {
        let out = two_ranks(|rank, g| {
            let (p, mut sync) = synced(&g);
            sync.arm();
            backward(&p, rank as f64 + 1.0, &[0, 1, 2]);
            (sync.finish().unwrap(), p.iter().map(|t| Vec::<f32>::try_from(t.grad()).unwrap()).collect::<Vec<_>>())
        });
        for (f, grads) in out {
            assert_eq!(f, Finished::Summed { early: 3 });
            for (k, g) in grads.iter().enumerate() {
                assert!(g.iter().all(|&x| x == 6.0 * (k + 1) as f32), "p{k}: {:?}", &g[..3]);
            }
        }
    }

    #[test]
    fn a_gradient_that_grows_after_its_bucket_started_is_stale_on_every_rank() {
        let out = two_ranks(|rank, g| {
            let (p, mut sync) = synced(&g);
            sync.arm();
            backward(&p, 1.0, &[0, 1, 2]);
            if rank == 0 {
                backward(&p, 1.0, &[2]);
            }
            (sync.finish().unwrap(), Vec::<f32>::try_from(p[2].grad()).unwrap())
        });
        assert_eq!(out[0].0, Finished::Stale);
        assert_eq!(out[1].0, Finished::Stale, "the ranks agree");
        assert!(out[0].1.iter().all(|&x| x == 12.0), "rank 0's own gradient is left as it was");
        assert!(out[1].1.iter().all(|&x| x == 6.0));
    }
}
