//! jemalloc as the allocator of every process that links this crate (the CLI, the services, tests and
//! benches). With its unprefixed `malloc` symbols the executable's definitions also serve libtorch's C++
//! allocations, where most of the memory is. glibc's allocator kept about 1 GB of freed activation memory
//! at the peak of a LoRA step on SmolLM2 (peak RSS 3.5 GB against 2.45 GB of live tensors); jemalloc with
//! the settings below peaks lower at the same speed (`make bench-train`; README "Parity").

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's start-up options (read from this symbol): huge allocations share the ordinary arenas instead
/// of a dedicated one that returns its pages at once (full-vocabulary logits would otherwise be fresh pages
/// on every chunk), and unused pages go back to the system after ~30 s instead of ~10 s.
#[unsafe(export_name = "malloc_conf")]
static MALLOC_CONF: &[u8] = b"oversize_threshold:0,dirty_decay_ms:30000,muzzy_decay_ms:30000\0";
