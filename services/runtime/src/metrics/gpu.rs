//! GPU memory per device, from NVML (`libnvidia-ml.so.1`, which the NVIDIA driver installs), loaded when the
//! metrics are first served: `ferrotune_gpu_memory_used_bytes` and `ferrotune_gpu_memory_total_bytes`
//! by `device` (`cuda:N` in NVML's order). On a host without the driver the families are simply absent.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::sync::OnceLock;

use super::registry::Collected;

/// nvmlMemory_t.
#[repr(C)]
#[derive(Default)]
struct Memory {
    total: u64,
    free: u64,
    used: u64,
}

type Init = unsafe extern "C" fn() -> c_int;
type Count = unsafe extern "C" fn(*mut c_uint) -> c_int;
type Handle = unsafe extern "C" fn(c_uint, *mut *mut c_void) -> c_int;
type MemInfo = unsafe extern "C" fn(*mut c_void, *mut Memory) -> c_int;

struct Nvml {
    count: Count,
    handle: Handle,
    memory: MemInfo,
}

// SAFETY: NVML's functions are thread-safe once nvmlInit succeeded; only function pointers are held.
unsafe impl Send for Nvml {}
unsafe impl Sync for Nvml {}

fn sym(lib: *mut c_void, name: &CStr) -> Option<*mut c_void> {
    // SAFETY: lib is a live handle from dlopen; name is NUL-terminated.
    let p = unsafe { libc::dlsym(lib, name.as_ptr() as *const c_char) };
    (!p.is_null()).then_some(p)
}

fn load() -> Option<Nvml> {
    // SAFETY: dlopen with a NUL-terminated name; the handle is never closed (the process keeps NVML).
    let lib = unsafe { libc::dlopen(c"libnvidia-ml.so.1".as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
    if lib.is_null() {
        return None;
    }
    // SAFETY: the symbols have these C signatures in every NVML since the _v2 entry points (CUDA 10).
    unsafe {
        let init: Init = std::mem::transmute(sym(lib, c"nvmlInit_v2")?);
        let count: Count = std::mem::transmute(sym(lib, c"nvmlDeviceGetCount_v2")?);
        let handle: Handle = std::mem::transmute(sym(lib, c"nvmlDeviceGetHandleByIndex_v2")?);
        let memory: MemInfo = std::mem::transmute(sym(lib, c"nvmlDeviceGetMemoryInfo")?);
        if init() != 0 {
            return None;
        }
        Some(Nvml { count, handle, memory })
    }
}

static NVML: OnceLock<Option<Nvml>> = OnceLock::new();

/// The GPU memory families now (empty without NVML).
pub fn families() -> Vec<Collected> {
    let Some(n) = NVML.get_or_init(load) else { return vec![] };
    let mut used = vec![];
    let mut total = vec![];
    let mut count: c_uint = 0;
    // SAFETY: NVML initialised; out-pointers are valid for the calls.
    if unsafe { (n.count)(&mut count) } != 0 {
        return vec![];
    }
    for i in 0..count {
        let mut h: *mut c_void = std::ptr::null_mut();
        let mut m = Memory::default();
        // SAFETY: as above; h comes from NVML for index i < count.
        if unsafe { (n.handle)(i, &mut h) } != 0 || unsafe { (n.memory)(h, &mut m) } != 0 {
            continue;
        }
        used.push((vec![("device", format!("cuda:{i}"))], m.used as f64));
        total.push((vec![("device", format!("cuda:{i}"))], m.total as f64));
    }
    if used.is_empty() {
        return vec![];
    }
    vec![
        Collected {
            name: "ferrotune_gpu_memory_used_bytes",
            help: "GPU memory in use (NVML).",
            kind: "gauge",
            series: used,
        },
        Collected {
            name: "ferrotune_gpu_memory_total_bytes",
            help: "GPU memory in all (NVML).",
            kind: "gauge",
            series: total,
        },
    ]
}

/// Adds the GPU families to every scrape and export (once per process).
pub fn register() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| super::add_collector(families));
}

#[cfg(test)]
mod tests {
    #[test]
    fn no_driver_no_families() {
        // This host may or may not have an NVIDIA driver: either way the call returns, and with a driver every
        // device has used <= total.
        let f = super::families();
        if let [used, total] = f.as_slice() {
            for ((_, u), (_, t)) in used.series.iter().zip(&total.series) {
                assert!(u <= t);
            }
        } else {
            assert!(f.is_empty());
        }
    }
}
