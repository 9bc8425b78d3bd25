//! jemalloc as the allocator of every process that links this crate (the CLI, the services, tests and
//! benches). With its unprefixed `malloc` symbols the executable's definitions also serve libtorch's C++
//! allocations, where most of the memory is. glibc's allocator kept about 1 GB of freed activation memory
//! at the peak of a LoRA step on SmolLM2 (peak RSS 3.5 GB against 2.45 GB of live tensors); jemalloc with
//! the settings below peaks 0.9 GB lower at the same speed (`make bench-train`; README "Parity").

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's start-up options (read from this symbol; `MALLOC_CONF` overrides them): huge allocations share
/// the ordinary arenas instead of a dedicated one that returns its pages at once; freed pages are handed
/// back lazily (MADV_FREE) after ~5 s and never force-purged. Measured on LoRA all-linear (batch 4×256):
/// this setting peaks at 2.63 GB at glibc's speed; purging the lazily freed pages too ("muzzy" decay, the
/// default) saved another 130 MB but cost 12% of the speed in refaults; never handing pages back peaked at
/// 3.55 GB like glibc.
#[unsafe(export_name = "malloc_conf")]
static MALLOC_CONF: &[u8] = b"oversize_threshold:0,dirty_decay_ms:5000,muzzy_decay_ms:-1\0";
