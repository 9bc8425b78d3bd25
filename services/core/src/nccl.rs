//! The NCCL shim (`csrc/nccl_group.cpp` → `libferrotune_nccl.so`, built by build.rs against the wheel's
//! libtorch_cuda and embedded here): written to the temp dir and `dlopen`ed the first time a job asks for NCCL,
//! so that a CPU-only run never loads the CUDA libraries.

use std::ffi::{c_void, CStr, CString};
use std::sync::OnceLock;

use crate::{CoreError, Result};

/// The shim's bytes (empty when build.rs found no CUDA/NCCL headers beside libtorch).
static SHIM: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/libferrotune_nccl.so"));

/// `ft_nccl_backend` from the loaded shim (an address, to be `Sync`).
static LOADED: OnceLock<std::result::Result<usize, String>> = OnceLock::new();

/// Whether this build carries the NCCL shim.
pub fn built() -> bool {
    !SHIM.is_empty()
}

/// Loads the shim (once) and returns its `ft_nccl_backend`.
pub(crate) fn backend_fn() -> Result<*mut c_void> {
    let r = LOADED.get_or_init(|| load().map(|p| p as usize));
    match r {
        Ok(p) => Ok(*p as *mut c_void),
        Err(e) => Err(CoreError::FailedPrecondition(format!("NCCL: {e}"))),
    }
}

fn load() -> std::result::Result<*mut c_void, String> {
    if SHIM.is_empty() {
        return Err("this build has no NCCL support (its libtorch came without the CUDA and NCCL headers)".into());
    }
    // In a directory only this user can write (so nobody else can plant a library there), one file per shim
    // content: ranks racing here each write their own temp file and rename it into place; an existing file is
    // used only when it holds exactly these bytes.
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    // SAFETY: getuid cannot fail.
    let uid = unsafe { libc::getuid() };
    let dir = std::env::temp_dir().join(format!("ferrotune-{uid}"));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let meta = std::fs::symlink_metadata(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != uid || meta.permissions().mode() & 0o077 != 0 {
        return Err(format!("{} is not a directory of this user's alone (mode 0700)", dir.display()));
    }
    let hash = SHIM.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    let path = dir.join(format!("nccl-{hash:016x}.so"));
    if std::fs::read(&path).map_or(true, |b| b != SHIM) {
        let tmp = path.with_extension(format!("{}.tmp", std::process::id()));
        std::fs::write(&tmp, SHIM).map_err(|e| format!("writing {}: {e}", tmp.display()))?;
        std::fs::rename(&tmp, &path).map_err(|e| format!("placing {}: {e}", path.display()))?;
    }
    let c = CString::new(path.to_string_lossy().as_bytes()).map_err(|_| "temp dir path".to_owned())?;
    // SAFETY: dlopen/dlsym/dlerror with valid C strings; the library stays loaded for the process's life.
    unsafe {
        let lib = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if lib.is_null() {
            return Err(format!("loading the shim (libtorch_cuda and its CUDA libraries): {}", dl_error()));
        }
        let f = libc::dlsym(lib, c"ft_nccl_backend".as_ptr());
        if f.is_null() {
            return Err(format!("the shim has no ft_nccl_backend: {}", dl_error()));
        }
        Ok(f)
    }
}

/// The last dlopen/dlsym error.
fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string valid until the next dl* call on this thread.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use crate::dist::{Backend, ProcessGroup};

    #[test]
    fn the_shim_loads_and_a_host_without_cuda_gets_a_clear_error() {
        assert!(super::built(), "build.rs found the CUDA and NCCL headers of the torch wheel");
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let r = ProcessGroup::join_on("127.0.0.1", port, 0, 1, Duration::from_secs(10), Backend::Nccl { device: 0 });
        if tch::Cuda::device_count() > 0 {
            let mut g = r.unwrap();
            assert_eq!(g.backend(), "nccl");
            let t = tch::Tensor::from_slice(&[1.0f32, 2.0]);
            g.all_reduce_sum(&[&t]).unwrap();
            assert_eq!(Vec::<f32>::try_from(&t).unwrap(), vec![1.0, 2.0], "one rank: the sum is itself");
        } else {
            // The shim loaded (libtorch_cuda and the CUDA libraries with it) and ProcessGroupNCCL's side
            // answered: no CUDA device here.
            let e = r.err().expect("no CUDA device: an error").to_string();
            assert!(e.contains("NCCL needs CUDA devices"), "{e}");
        }
    }
}
