//! Collectives across processes for data-parallel training, on libtorch's own c10d (`csrc/process_group.cpp`):
//! ranks meet at a TCPStore on the master's address and port (what torchrun's `MASTER_ADDR` / `MASTER_PORT`
//! name), then sum tensors with ProcessGroupGloo's all-reduce on the CPU. Every wait is bounded: a rank that
//! never arrives, or dies mid-collective, is an error on the others after `timeout`, never a hang.

use std::ffi::{c_char, c_int, c_longlong, c_void, CStr, CString};
use std::time::Duration;

use tch::Tensor;
use torch_sys::C_tensor;

use crate::{CoreError, Result};

extern "C" {
    fn ft_pg_new(
        master_addr: *const c_char,
        port: c_int,
        rank: c_int,
        world: c_int,
        timeout_ms: c_longlong,
        nccl: *mut c_void,
        device: c_int,
    ) -> *mut c_void;
    fn ft_pg_allreduce_sum(g: *mut c_void, tensors: *const *mut C_tensor, n: usize) -> c_int;
    fn ft_pg_backend(g: *mut c_void) -> *const c_char;
    fn ft_pg_last_error() -> *const c_char;
    fn ft_pg_free(g: *mut c_void);
}

pub(crate) fn last_error() -> String {
    // SAFETY: a NUL-terminated thread-local string owned by the C++ side, valid until its next call here.
    unsafe { CStr::from_ptr(ft_pg_last_error()) }.to_string_lossy().into_owned()
}

/// The collective engine of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// c10d's ProcessGroupGloo (CPU; CUDA tensors through host copies).
    Gloo,
    /// c10d's ProcessGroupNCCL on this rank's CUDA device (from the NCCL shim, [`crate::nccl`]).
    Nccl {
        /// The rank's CUDA device index.
        device: usize,
    },
}

impl Backend {
    /// NCCL for a CUDA `device`, Gloo otherwise; `FERROTUNE_DIST_BACKEND=gloo|nccl` overrides (NCCL still
    /// needs a CUDA device).
    pub fn for_device(device: tch::Device) -> Result<Self> {
        let asked = std::env::var("FERROTUNE_DIST_BACKEND").unwrap_or_default();
        match (asked.as_str(), device) {
            ("" | "nccl", tch::Device::Cuda(i)) => Ok(Self::Nccl { device: i }),
            ("nccl", d) => Err(CoreError::InvalidArgument(format!(
                "FERROTUNE_DIST_BACKEND=nccl: NCCL sums CUDA tensors, and this job trains on {d:?} (use gloo)"
            ))),
            ("" | "gloo", _) => Ok(Self::Gloo),
            (other, _) => Err(CoreError::InvalidArgument(format!("FERROTUNE_DIST_BACKEND={other}: use gloo or nccl"))),
        }
    }
}

/// One process's membership of a group of `world` ranks.
pub struct ProcessGroup {
    handle: *mut c_void,
    /// This process's rank (0 = the master, which hosts the store).
    pub rank: usize,
    /// Ranks in the group.
    pub world: usize,
}

// SAFETY: the handle is an owned C++ object used by one thread at a time (&mut self for collectives).
unsafe impl Send for ProcessGroup {}

impl ProcessGroup {
    /// Joins the group at `addr:port` as `rank` of `world` on Gloo, waiting up to `timeout` for every rank (and
    /// bounding every later collective by it).
    pub fn join(addr: &str, port: u16, rank: usize, world: usize, timeout: Duration) -> Result<Self> {
        Self::join_on(addr, port, rank, world, timeout, Backend::Gloo)
    }

    /// [`Self::join`] on `backend`.
    pub fn join_on(
        addr: &str,
        port: u16,
        rank: usize,
        world: usize,
        timeout: Duration,
        backend: Backend,
    ) -> Result<Self> {
        if world == 0 || rank >= world {
            return Err(CoreError::InvalidArgument(format!("rank {rank} is not in a group of {world}")));
        }
        let host = CString::new(addr).map_err(|_| CoreError::InvalidArgument(format!("master address `{addr}`")))?;
        let ms = timeout.as_millis().min(i64::MAX as u128) as c_longlong;
        let (nccl, device) = match backend {
            Backend::Gloo => (std::ptr::null_mut(), -1),
            Backend::Nccl { device } => (crate::nccl::backend_fn()?, device as c_int),
        };
        // SAFETY: valid C string for the call; `nccl` is null or ft_nccl_backend from the loaded shim; the
        // result is null or an owned handle.
        let handle =
            unsafe { ft_pg_new(host.as_ptr(), port as c_int, rank as c_int, world as c_int, ms, nccl, device) };
        if handle.is_null() {
            return Err(CoreError::Unavailable(format!(
                "rank {rank} of {world}: joining the group at {addr}:{port} failed (the ranks wait {timeout:?} for each other): {}",
                first_line(&last_error())
            )));
        }
        Ok(Self { handle, rank, world })
    }

    /// The C++ group, for [`crate::grad_sync`].
    pub(crate) fn raw(&self) -> *mut c_void {
        self.handle
    }

    /// The c10d backend in use (`gloo`, `nccl`).
    pub fn backend(&self) -> String {
        // SAFETY: live handle; the string is copied at once.
        unsafe { CStr::from_ptr(ft_pg_backend(self.handle)) }.to_string_lossy().into_owned()
    }

    /// Sums each tensor in place over the ranks (dense CPU tensors, equal shapes and dtypes on every rank).
    pub fn all_reduce_sum(&mut self, tensors: &[&Tensor]) -> Result<()> {
        let ptrs: Vec<*mut C_tensor> = tensors.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
        // SAFETY: live handle; the tensor handles outlive the call, which writes their storage in place.
        let rc = unsafe { ft_pg_allreduce_sum(self.handle, ptrs.as_ptr(), ptrs.len()) };
        if rc != 0 {
            return Err(CoreError::Unavailable(format!(
                "rank {} of {}: all-reduce failed (a rank died or stopped answering?): {}",
                self.rank,
                self.world,
                first_line(&last_error())
            )));
        }
        Ok(())
    }
}

/// Where this process sits in a data-parallel job, from the environment torchrun and the Kubernetes operators
/// set: `WORLD_SIZE`, `RANK`, `LOCAL_RANK`, `MASTER_ADDR`, `MASTER_PORT`, or Kubeflow Trainer's `PET_NNODES`,
/// `PET_NPROC_PER_NODE`, `PET_NODE_RANK`, `PET_MASTER_ADDR`, `PET_MASTER_PORT` (with `LOCAL_RANK`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DistEnv {
    /// Global rank.
    pub rank: usize,
    /// Ranks in all.
    pub world: usize,
    /// Rank on this machine (its device: `cuda:LOCAL_RANK`).
    pub local_rank: usize,
    /// The master's address (rank 0 hosts the store there).
    pub master_addr: String,
    /// The store's port.
    pub master_port: u16,
    /// Bound on the rendezvous and on every collective.
    pub timeout: Duration,
}

impl DistEnv {
    /// The job's place from `var` (the process environment in [`DistEnv::from_env`]); `None` for a one-rank job.
    pub fn from_vars(var: &dyn Fn(&str) -> Option<String>) -> Result<Option<Self>> {
        let num = |k: &str| -> Result<Option<usize>> {
            match var(k) {
                None => Ok(None),
                Some(v) => v
                    .trim()
                    .parse::<usize>()
                    .map(Some)
                    .map_err(|_| CoreError::InvalidArgument(format!("{k}={v}: not a non-negative integer"))),
            }
        };
        let local_rank = num("LOCAL_RANK")?.unwrap_or(0);
        let (world, rank, addr, port) = match num("WORLD_SIZE")? {
            Some(w) => (w, num("RANK")?.unwrap_or(0), var("MASTER_ADDR"), var("MASTER_PORT")),
            None => match (num("PET_NNODES")?, num("PET_NPROC_PER_NODE")?) {
                (Some(nodes), Some(per)) => {
                    let node = num("PET_NODE_RANK")?.unwrap_or(0);
                    if local_rank >= per {
                        return Err(CoreError::InvalidArgument(format!(
                            "LOCAL_RANK={local_rank} is not below PET_NPROC_PER_NODE={per}"
                        )));
                    }
                    (nodes * per, node * per + local_rank, var("PET_MASTER_ADDR"), var("PET_MASTER_PORT"))
                }
                _ => return Ok(None),
            },
        };
        if world <= 1 {
            return Ok(None);
        }
        if rank >= world {
            return Err(CoreError::InvalidArgument(format!("RANK={rank} is not below WORLD_SIZE={world}")));
        }
        let master_addr = addr.filter(|a| !a.is_empty()).unwrap_or_else(|| "127.0.0.1".into());
        let master_port = match port {
            Some(p) => p
                .trim()
                .parse::<u16>()
                .map_err(|_| CoreError::InvalidArgument(format!("MASTER_PORT={p}: not a port")))?,
            None => 29500,
        };
        let timeout_s = num("FERROTUNE_DIST_TIMEOUT_S")?.unwrap_or(300).max(1);
        Ok(Some(Self {
            rank,
            world,
            local_rank,
            master_addr,
            master_port,
            timeout: Duration::from_secs(timeout_s as u64),
        }))
    }

    /// [`DistEnv::from_vars`] over the process environment.
    pub fn from_env() -> Result<Option<Self>> {
        Self::from_vars(&|k| std::env::var(k).ok())
    }

    /// Joins the group this environment describes, on the backend for a job training on `device`
    /// ([`Backend::for_device`]).
    pub fn join(&self, device: tch::Device) -> Result<ProcessGroup> {
        let backend = Backend::for_device(device)?;
        ProcessGroup::join_on(&self.master_addr, self.master_port, self.rank, self.world, self.timeout, backend)
    }
}

/// This process's rank (0 outside a data-parallel job, or when the environment does not parse).
pub fn rank() -> usize {
    DistEnv::from_env().ok().flatten().map_or(0, |d| d.rank)
}

pub(crate) fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or(s)
}

impl Drop for ProcessGroup {
    fn drop(&mut self) {
        // SAFETY: the handle came from ft_pg_new and is freed once.
        unsafe { ft_pg_free(self.handle) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free_port() -> u16 {
        std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
    }

    #[test]
    fn two_ranks_sum_with_gloo() {
        let port = free_port();
        let ranks: Vec<_> = (0..2)
            .map(|rank| {
                std::thread::spawn(move || {
                    let mut g = ProcessGroup::join("127.0.0.1", port, rank, 2, Duration::from_secs(30)).unwrap();
                    assert_eq!(g.backend(), "gloo");
                    let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0]) * (rank as f64 + 1.0);
                    let b = Tensor::from_slice(&[0.5f64; 1000]) * (rank as f64 + 1.0);
                    g.all_reduce_sum(&[&a, &b]).unwrap();
                    (Vec::<f32>::try_from(&a).unwrap(), Vec::<f64>::try_from(&b).unwrap())
                })
            })
            .collect();
        for r in ranks {
            let (a, b) = r.join().unwrap();
            assert_eq!(a, vec![3.0, 6.0, 9.0], "1×(rank 0) + 2×(rank 1)");
            assert!(b.iter().all(|&x| x == 1.5));
        }
    }

    #[test]
    fn torchrun_and_kubeflow_environments() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
        };
        assert_eq!(DistEnv::from_vars(&env(&[])).unwrap(), None);
        assert_eq!(DistEnv::from_vars(&env(&[("WORLD_SIZE", "1")])).unwrap(), None);
        let d = DistEnv::from_vars(&env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "10.0.0.2"),
            ("MASTER_PORT", "23456"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(
            (d.rank, d.world, d.local_rank, d.master_addr.as_str(), d.master_port),
            (3, 4, 1, "10.0.0.2", 23456)
        );
        let k = DistEnv::from_vars(&env(&[
            ("PET_NNODES", "2"),
            ("PET_NPROC_PER_NODE", "2"),
            ("PET_NODE_RANK", "1"),
            ("LOCAL_RANK", "1"),
            ("PET_MASTER_ADDR", "m"),
            ("PET_MASTER_PORT", "29400"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((k.rank, k.world, k.master_addr.as_str(), k.master_port), (3, 4, "m", 29400));
        let e = DistEnv::from_vars(&env(&[("WORLD_SIZE", "2"), ("RANK", "2")])).unwrap_err();
        assert!(e.to_string().contains("RANK=2 is not below WORLD_SIZE=2"), "{e}");
        let e = DistEnv::from_vars(&env(&[("WORLD_SIZE", "two")])).unwrap_err();
        assert!(e.to_string().contains("WORLD_SIZE=two"), "{e}");
        let e = DistEnv::from_vars(&env(&[("WORLD_SIZE", "2"), ("MASTER_PORT", "70000")])).unwrap_err();
        assert!(e.to_string().contains("MASTER_PORT=70000"), "{e}");
    }

    #[test]
    fn a_missing_rank_is_an_error_not_a_hang() {
        let port = free_port();
        let started = std::time::Instant::now();
        let e = ProcessGroup::join("127.0.0.1", port, 0, 2, Duration::from_millis(1500)).err().unwrap();
        assert!(started.elapsed() < Duration::from_secs(20), "bounded by the timeout");
        assert!(e.to_string().contains("joining the group") && e.to_string().contains("wait 1.5s"), "{e}");
        assert!(ProcessGroup::join("127.0.0.1", port, 2, 2, Duration::from_secs(1)).is_err());
    }
}
