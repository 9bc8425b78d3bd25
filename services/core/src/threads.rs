//! CPU threads for libtorch's intra-op work. Each service runs its model work on threads of its own (a
//! worker, a job thread) and sets their thread count there, so that a policy and a reward service hosted by
//! one process can each have their own. The default is `OMP_NUM_THREADS` when the environment sets it, else
//! the number of CPUs this process may use: its affinity mask and cgroup CPU quota (`taskset`, a
//! container's CPU limit), not the machine's core count.

/// The CPUs this process may run on (affinity and cgroup quota), at least 1.
pub fn available() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// `configured` threads; when it is 0, `OMP_NUM_THREADS` if the environment sets it, else [`available`].
pub fn resolve(configured: usize) -> usize {
    if configured > 0 {
        return configured;
    }
    std::env::var("OMP_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(available)
}

/// Sets the intra-op thread count of libtorch work started from the calling thread (OpenMP's per-thread
/// `nthreads` and MKL's thread-local count).
pub fn set_for_this_thread(n: usize) {
    tch::set_num_threads(n.clamp(1, 1024) as i32);
}
