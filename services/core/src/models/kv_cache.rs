//! The KV cache of incremental decoding.

use tch::Tensor;

use crate::error::{CoreError, Result};

/// Keys and values of one layer for every cached position.
#[derive(Debug)]
pub struct LayerKv {
    /// `[b, kv_heads, capacity, head_dim]`.
    pub(crate) k: Tensor,
    /// `[b, kv_heads, capacity, head_dim]`.
    pub(crate) v: Tensor,
}

/// The KV cache of a batch of sequences: preallocated buffers, one per layer, filled front to back, so a
/// decoding step writes one slot instead of concatenating (and copying) the whole history.
#[derive(Debug)]
pub struct KvCache {
    pub(crate) layers: Vec<LayerKv>,
    pub(crate) len: i64,
    pub(crate) batch: i64,
    pub(crate) capacity: i64,
}

impl KvCache {
    /// Positions filled so far.
    pub fn len(&self) -> i64 {
        self.len
    }

    /// Whether nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every cached position (the buffers are kept for reuse).
    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Sequences cached.
    pub fn batch(&self) -> i64 {
        self.batch
    }

    /// Keeps the sequences `keep` (increasing indices into the batch) in place: each kept row's filled
    /// positions move down to its new index (rows before the first dropped one do not move), and the batch
    /// becomes a view of the first `keep.len()` rows. Cheaper than [`Self::select_rows`] for dropping
    /// finished sequences: only moved rows and only filled positions are copied, nothing is allocated.
    pub fn retain_rows(&mut self, keep: &[i64]) -> Result<()> {
        if keep.windows(2).any(|w| w[0] >= w[1]) || keep.last().is_some_and(|&i| i >= self.batch) {
            return Err(CoreError::InvalidArgument(format!("retain_rows: {keep:?} of {} rows", self.batch)));
        }
        let _guard = tch::no_grad_guard();
        for l in &mut self.layers {
            for t in [&mut l.k, &mut l.v] {
                for (dst, &src) in keep.iter().enumerate() {
                    let dst = dst as i64;
                    if dst != src {
                        let from = t.f_select(0, src)?.f_narrow(1, 0, self.len)?;
                        t.f_select(0, dst)?.f_narrow(1, 0, self.len)?.f_copy_(&from)?;
                    }
                }
                *t = t.f_narrow(0, 0, keep.len() as i64)?;
            }
        }
        self.batch = keep.len() as i64;
        Ok(())
    }

    /// Keeps the sequences `rows` (indices into the batch, in the new order; repeats allowed): a prompt's
    /// cache shared by its samples.
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for l in &mut self.layers {
            let rows = rows.f_to_device(l.k.device())?;
            l.k = l.k.f_index_select(0, &rows)?;
            l.v = l.v.f_index_select(0, &rows)?;
        }
        self.batch = rows.size()[0];
        Ok(())
    }
}
