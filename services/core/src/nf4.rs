//! NF4 4-bit weights as bitsandbytes stores them for QLoRA (Dettmers et al. 2023,
//! <https://arxiv.org/abs/2305.14314>): blocks of 64 values scaled by their absmax and rounded to the
//! nearest of 16 NormalFloat code values, two codes per byte (first in the high nibble); with double
//! quantization the per-block absmax (minus its mean) is itself stored as 8 bits with bitsandbytes' dynamic
//! map and one f32 scale per 256 blocks. Rounding follows bitsandbytes' CPU path (scale by the reciprocal
//! of absmax, clamp, bucketize against code midpoints; the 8-bit absmax through its 65 536-bin lookup table),
//! so codes and dequantized values match it exactly.

use tch::{Device, Kind, Tensor};

use crate::error::{CoreError, Result};

/// The NF4 code values (bitsandbytes' table, as f32).
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Values per NF4 block.
pub const BLOCK: usize = 64;
/// Absmax values per second-level block (double quantization).
pub const BLOCK2: usize = 256;

/// bitsandbytes' signed dynamic 8-bit map (`create_dynamic_map(signed=True, max_exponent_bits=7)`), the
/// code for the double-quantized absmax, computed in f32 as bitsandbytes does.
pub fn dynamic_map() -> [f32; 256] {
    fn linspace(n: usize) -> Vec<f32> {
        // torch.linspace(0.1, 1, n) in f32: from the start for the first half, from the end for the rest,
        // each a fused multiply-add as libtorch's vectorised CPU kernel computes it.
        let (start, end) = (0.1f32, 1.0f32);
        let step = (end - start) / (n - 1) as f32;
        (0..n)
            .map(|i| if i < n / 2 { step.mul_add(i as f32, start) } else { (-step).mul_add((n - 1 - i) as f32, end) })
            .collect()
    }
    let (max_exp, non_sign) = (7i32, 7i32);
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for i in 0..max_exp {
        let items = (1usize << (i + non_sign - max_exp)) + 1;
        let b = linspace(items);
        let scale = 10f64.powi(-(max_exp - 1) + i) as f32;
        for w in b.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            data.push(-scale * mean);
        }
    }
    // additional_items = 2^(7-7) - 1 = 0: none.
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    data.try_into().expect("256 values")
}

/// Number of entries of `sorted_bounds` strictly below `v` (torch.bucketize, right=False).
fn bucket(sorted_bounds: &[f32], v: f32) -> usize {
    sorted_bounds.partition_point(|&b| b < v)
}

fn midpoints(code: &[f32]) -> Vec<f32> {
    code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect()
}

/// Blockwise absmax quantization with `code` by nearest code value: returns (codes, absmax per block).
/// This is bitsandbytes' 4-bit path (scale by the reciprocal of absmax, clamp, bucketize on midpoints).
fn quantize_blockwise(x: &[f32], block: usize, code: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let bounds = midpoints(code);
    let mut q = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(block));
    for chunk in x.chunks(block) {
        let am = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = 1.0 / am.max(1e-38);
        absmax.push(am);
        q.extend(chunk.iter().map(|&v| bucket(&bounds, (v * inv).clamp(-1.0, 1.0)) as u8));
    }
    (q, absmax)
}

/// bitsandbytes' CPU 8-bit blockwise quantization (used for the double-quantized absmax): the value scaled
/// by 1/absmax is rounded onto a 65 536-bin grid over [−1, 1] and the bin's precomputed nearest code is
/// taken; an all-zero block gets code 0.
fn quantize_blockwise_lut(x: &[f32], block: usize, code: &[f32; 256]) -> (Vec<u8>, Vec<f32>) {
    const BINS: usize = 65536;
    let mids: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
    let mut lut = vec![0u8; BINS];
    let mut idx = 0;
    for (i, slot) in lut.iter_mut().enumerate() {
        let val = -1.0f32 + (2.0f32 * i as f32) / (BINS - 1) as f32;
        while idx < mids.len() && mids[idx] < val {
            idx += 1;
        }
        *slot = idx as u8;
    }
    let mut q = Vec::with_capacity(x.len());
    let mut absmax = Vec::with_capacity(x.len().div_ceil(block));
    for chunk in x.chunks(block) {
        let am = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
        absmax.push(am);
        if am == 0.0 {
            q.extend(std::iter::repeat_n(0u8, chunk.len()));
            continue;
        }
        let inv = 1.0 / am;
        q.extend(chunk.iter().map(|&v| {
            let n = (v * inv).clamp(-1.0, 1.0);
            lut[((n + 1.0) * 0.5 * (BINS - 1) as f32 + 0.5) as u16 as usize]
        }));
    }
    (q, absmax)
}

/// The code values of every byte, high nibble first: `[NF4_CODE[b >> 4], NF4_CODE[b & 15]]` for b in 0..256.
fn byte_pairs() -> Vec<f32> {
    (0..256usize).flat_map(|b| [NF4_CODE[b >> 4], NF4_CODE[b & 15]]).collect()
}

/// A frozen weight in NF4 with double-quantized statistics.
#[derive(Debug)]
pub struct Nf4Weight {
    /// Logical shape `[out, in]`.
    pub shape: [i64; 2],
    /// Two codes per byte, `ceil(numel / 2)` bytes.
    pub packed: Tensor,
    /// 8-bit absmax per 64-block (dynamic map, offset removed).
    pub qabsmax: Tensor,
    /// f32 scale per 256 absmax values.
    pub absmax2: Tensor,
    /// Mean of the absmax values, added back after dequantization.
    pub offset: f32,
    /// `[256, 2]`: the two code values a packed byte stands for (high nibble first).
    pairs: Tensor,
    code2: Tensor,
}

impl Nf4Weight {
    /// Quantizes a 2-D weight (any kind/device; quantization runs on the host in f32).
    pub fn quantize(w: &Tensor) -> Result<Self> {
        let size = w.size();
        let [out, inp] = size[..] else {
            return Err(CoreError::InvalidArgument(format!("NF4 needs a 2-D weight, got {size:?}")));
        };
        let dev = w.device();
        let host: Vec<f32> = Vec::try_from(
            w.f_detach()?.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?.f_view([-1])?,
        )?;
        let (codes, absmax) = quantize_blockwise(&host, BLOCK, &NF4_CODE);
        let mut packed = Vec::with_capacity(codes.len().div_ceil(2));
        for pair in codes.chunks(2) {
            packed.push((pair[0] << 4) | pair.get(1).copied().unwrap_or(0));
        }
        let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len() as f64) as f32;
        let centred: Vec<f32> = absmax.iter().map(|a| a - offset).collect();
        let map = dynamic_map();
        let (qabsmax, absmax2) = quantize_blockwise_lut(&centred, BLOCK2, &map);
        Ok(Self {
            shape: [out, inp],
            packed: Tensor::f_from_slice(&packed)?.f_to_device(dev)?,
            qabsmax: Tensor::f_from_slice(&qabsmax)?.f_to_device(dev)?,
            absmax2: Tensor::f_from_slice(&absmax2)?.f_to_device(dev)?,
            offset,
            pairs: Tensor::f_from_slice(&byte_pairs())?.f_view([256, 2])?.f_to_device(dev)?,
            code2: Tensor::f_from_slice(&map)?.f_to_device(dev)?,
        })
    }

    /// The dequantized weight `[out, in]` in `kind` (computed in f32 like bitsandbytes, then cast).
    pub fn dequantize(&self, kind: Kind) -> Result<Tensor> {
        let n = self.shape[0] * self.shape[1];
        let blocks = self.qabsmax.size()[0];
        // absmax = code2[q] * absmax2[block of 256] + offset
        let a = self.code2.f_index_select(0, &self.qabsmax.f_to_kind(Kind::Int64)?)?;
        let pad = (blocks + BLOCK2 as i64 - 1) / BLOCK2 as i64 * BLOCK2 as i64 - blocks;
        let a = a.f_constant_pad_nd([0, pad])?.f_view([-1, BLOCK2 as i64])?.f_mul(&self.absmax2.f_unsqueeze(1)?)?;
        let absmax = a.f_view([-1])?.f_narrow(0, 0, blocks)?.f_add_scalar(self.offset as f64)?;
        // Each packed byte looks up its two code values at once (i32 indices: half the bytes of i64).
        let vals = self.pairs.f_index_select(0, &self.packed.f_to_kind(Kind::Int)?)?.f_view([-1])?.f_narrow(0, 0, n)?;
        let pad = blocks * BLOCK as i64 - n;
        let vals = if pad > 0 { vals.f_constant_pad_nd([0, pad])? } else { vals };
        let w = vals.f_view([blocks, BLOCK as i64])?.f_mul(&absmax.f_unsqueeze(1)?)?;
        Ok(w.f_view([-1])?.f_narrow(0, 0, n)?.f_view([self.shape[0], self.shape[1]])?.f_to_kind(kind)?)
    }

    /// Another handle on the same codes (no copy).
    pub fn shallow_clone(&self) -> Self {
        Self {
            shape: self.shape,
            packed: self.packed.shallow_clone(),
            qabsmax: self.qabsmax.shallow_clone(),
            absmax2: self.absmax2.shallow_clone(),
            offset: self.offset,
            pairs: self.pairs.shallow_clone(),
            code2: self.code2.shallow_clone(),
        }
    }

    /// Bytes held (codes + statistics), for memory reports.
    pub fn bytes(&self) -> usize {
        self.packed.numel() + self.qabsmax.numel() + 4 * self.absmax2.numel() + 4
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounding_picks_the_nearest_code() {
        let bounds = midpoints(&NF4_CODE);
        for (i, &c) in NF4_CODE.iter().enumerate() {
            assert_eq!(bucket(&bounds, c), i, "a code value maps to itself");
        }
        // just above the midpoint between codes 8 and 9 → 9; exactly on it → 8 (bucketize right=False)
        let mid = (NF4_CODE[8] + NF4_CODE[9]) / 2.0;
        assert_eq!(bucket(&bounds, mid), 8);
        assert_eq!(bucket(&bounds, f32::from_bits(mid.to_bits() + 1)), 9);
    }

    #[test]
    fn error_is_bounded_by_half_the_widest_gap() {
        tch::manual_seed(0);
        let w = Tensor::randn([64, 256], (Kind::Float, Device::Cpu));
        let q = Nf4Weight::quantize(&w).unwrap();
        let d = q.dequantize(Kind::Float).unwrap();
        let widest = NF4_CODE.windows(2).map(|p| p[1] - p[0]).fold(0f32, f32::max) as f64;
        // per block: |w - dq| ≤ absmax · widest/2, plus the double-quantized absmax's own error (small)
        let err = (&w - &d).abs().view([-1, 64]).max_dim(1, false).0;
        let absmax = w.abs().view([-1, 64]).max_dim(1, false).0;
        let ratio = (err / absmax).max().double_value(&[]);
        assert!(ratio <= widest / 2.0 * 1.02 + 1e-3, "max error / absmax = {ratio}, bound {}", widest / 2.0);
        // 4 bits + 8/64 + 32/(64·256) bits per value
        let bits = q.bytes() as f64 * 8.0 / w.numel() as f64;
        assert!((bits - 4.127).abs() < 0.01, "{bits} bits/param");
    }
}
