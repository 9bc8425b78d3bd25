//! ggml's reference quantizers (`ggml-quants.c`, the `quantize_row_*_ref` functions `llama-quantize` runs when
//! no importance matrix is given), written for GGUF export: Q8_0, Q4_0, Q5_0 (blocks of 32) and the K-quants
//! Q4_K and Q6_K (super-blocks of 256). Same operations in the same f32 order, so the bytes equal ggml's
//! (checked against libggml's own functions by `scripts/check_gguf_quant_bytes.py`); each is decoded by
//! [`crate::gguf_quants`]. Like ggml's, they take whole blocks: the input's length must be a multiple of the
//! block size (the exporter picks a type whose blocks divide each row, see `gguf_export`).

/// ggml's `nearest_int`: round half to even through the float adder, as ggml does it.
fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

fn f16_bytes(v: f32) -> [u8; 2] {
    half::f16::from_f32(v).to_le_bytes()
}

fn f16_value(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// `quantize_row_q8_0_ref` over rows of 32-element blocks.
pub fn quantize_q8_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 34);
    for block in x.chunks(32) {
        let amax = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16_bytes(d));
        out.extend(block.iter().map(|v| (v * id).round() as i8 as u8));
    }
    out
}

/// The value of largest magnitude in a block (the first one on ties), as Q4_0 / Q5_0 scale by it.
fn signed_max(block: &[f32]) -> f32 {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in block {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    max
}

/// `quantize_row_q4_0_ref`: per block of 32, d = (the value of largest magnitude) / −8, codes
/// `min(15, trunc(x/d + 8.5))`, the first 16 in the low nibbles and the last 16 in the high ones.
pub fn quantize_q4_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 18);
    for block in x.chunks(32) {
        let d = signed_max(block) / -8.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        out.extend(f16_bytes(d));
        let code = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
        for j in 0..16 {
            out.push(code(block[j]) | (code(block[16 + j]) << 4));
        }
    }
    out
}

/// `quantize_row_q5_0_ref`: Q4_0 with five bits, d = max / −16, codes `min(31, trunc(x/d + 16.5))`, the fifth
/// bits gathered in a 32-bit word.
pub fn quantize_q5_0(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 32 * 22);
    for block in x.chunks(32) {
        let d = signed_max(block) / -16.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let code = |v: f32| ((v * id + 16.5) as i8).min(31) as u8;
        let mut qh = 0u32;
        let mut qs = [0u8; 16];
        for j in 0..16 {
            let (a, b) = (code(block[j]), code(block[16 + j]));
            qs[j] = (a & 0x0f) | ((b & 0x0f) << 4);
            qh |= (((a & 0x10) >> 4) as u32) << j;
            qh |= (((b & 0x10) >> 4) as u32) << (j + 16);
        }
        out.extend(f16_bytes(d));
        out.extend(qh.to_le_bytes());
        out.extend(qs);
    }
    out
}

/// `make_qkx2_quants`: codes in 0..=nmax with a scale and a (non-positive) minimum minimising the weighted
/// squared error, searched over `nstep + 1` candidate scales; returns (scale, −min).
#[allow(clippy::too_many_arguments)]
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    laux: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        if x[i] < min {
            min = x[i];
        }
        if x[i] > max {
            max = x[i];
        }
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l.iter_mut().for_each(|q| *q = 0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * l[i] as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    if nstep < 1 {
        return (scale, -min);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let (w, q) = (weights[i], q as f32);
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * x[i];
        }
        let d = sum_w * sum_l2 - sum_l * sum_l;
        if d > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / d;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / d;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// `quantize_row_q4_K_ref`: super-blocks of 256 (eight sub-blocks of 32 with 6-bit scales and minimums under
/// two f16 super-scales, 4-bit codes), 144 bytes each.
pub fn quantize_q4_k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 256 * 144);
    let (mut l, mut laux, mut weights) = ([0u8; 256], [0u8; 32], [0f32; 32]);
    for sb in x.chunks(256) {
        let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
        let (mut max_scale, mut max_min) = (0f32, 0f32);
        for j in 0..8 {
            let xs = &sb[32 * j..32 * j + 32];
            let sum_x2 = xs.iter().fold(0f32, |a, v| a + v * v);
            let av_x = (sum_x2 / 32.0).sqrt();
            for (w, v) in weights.iter_mut().zip(xs) {
                *w = av_x + v.abs();
            }
            let (s, m) = make_qkx2_quants(15, xs, &weights, &mut l[32 * j..32 * j + 32], &mut laux, -1.0, 0.1, 20);
            (scales[j], mins[j]) = (s, m);
            // ggml's comparisons, so that a −0.0 minimum leaves the super-minimum +0.0 as it does.
            if s > max_scale {
                max_scale = s;
            }
            if m > max_min {
                max_min = m;
            }
        }
        let inv_scale = if max_scale > 0.0 { 63.0 / max_scale } else { 0.0 };
        let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
        let mut packed = [0u8; 12];
        for j in 0..8 {
            // ggml stores the rounded value in a uint8_t first, then takes MIN(63, ·).
            let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
            let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
            if j < 4 {
                packed[j] = ls;
                packed[j + 4] = lm;
            } else {
                packed[j + 4] = (ls & 0xf) | ((lm & 0xf) << 4);
                packed[j - 4] |= (ls >> 4) << 6;
                packed[j] |= (lm >> 4) << 6;
            }
        }
        let (d, dmin) = (f16_value(max_scale / 63.0), f16_value(max_min / 63.0));
        for j in 0..8 {
            let (sc, m) = if j < 4 {
                (packed[j] & 63, packed[j + 4] & 63)
            } else {
                ((packed[j + 4] & 0xf) | ((packed[j - 4] >> 6) << 4), (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4))
            };
            let ds = d * sc as f32;
            if ds == 0.0 {
                continue;
            }
            let dm = dmin * m as f32;
            for i in 0..32 {
                l[32 * j + i] = nearest_int((sb[32 * j + i] + dm) / ds).clamp(0, 15) as u8;
            }
        }
        out.extend(f16_bytes(max_scale / 63.0));
        out.extend(f16_bytes(max_min / 63.0));
        out.extend(packed);
        for j in (0..256).step_by(64) {
            out.extend((0..32).map(|i| l[j + i] | (l[j + i + 32] << 4)));
        }
    }
    out
}

/// ggml's `GROUP_MAX_EPS`.
const GROUP_MAX_EPS: f32 = 1e-15;

/// `make_qx_quants` with `rmse_type` 1 (weights x²) and no importance: signed codes in −nmax..nmax−1 (returned
/// offset by nmax) and the scale of least weighted error over 19 candidate scales.
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l.iter_mut().for_each(|q| *q = 0);
        return 0.0;
    }
    let code = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let mut iscale = -(nmax as f32) / max;
    let (mut sumlx, mut suml2) = (0f32, 0f32);
    for (q, &v) in l.iter_mut().zip(x) {
        let c = code(iscale, v);
        *q = (c + nmax) as i8;
        let w = v * v;
        sumlx += w * v * c as f32;
        suml2 += w * c as f32 * c as f32;
    }
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        sumlx = 0.0;
        suml2 = 0.0;
        for &v in x {
            let c = code(iscale, v);
            let w = v * v;
            sumlx += w * v * c as f32;
            suml2 += w * c as f32 * c as f32;
        }
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (q, &v) in l.iter_mut().zip(x) {
                *q = (code(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// `quantize_row_q6_K_ref`: super-blocks of 256 (sixteen sub-blocks of 16 with 8-bit scales under an f16
/// super-scale, 6-bit codes split into low nibbles and high bit pairs), 210 bytes each.
pub fn quantize_q6_k(x: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(x.len() / 256 * 210);
    let mut l = [0i8; 256];
    for sb in x.chunks(256) {
        let mut scales = [0f32; 16];
        let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
        for ib in 0..16 {
            let s = make_qx_quants(32, &sb[16 * ib..16 * ib + 16], &mut l[16 * ib..16 * ib + 16]);
            scales[ib] = s;
            if s.abs() > max_abs_scale {
                max_abs_scale = s.abs();
                max_scale = s;
            }
        }
        if max_abs_scale < GROUP_MAX_EPS {
            out.extend([0u8; 210]);
            continue;
        }
        let iscale = -128.0 / max_scale;
        let d = f16_value(1.0 / iscale);
        let sc: Vec<i8> = scales.iter().map(|s| nearest_int(iscale * s).min(127) as i8).collect();
        for j in 0..16 {
            let ds = d * sc[j] as f32;
            if ds == 0.0 {
                continue;
            }
            for i in 0..16 {
                l[16 * j + i] = (nearest_int(sb[16 * j + i] / ds).clamp(-32, 31) + 32) as i8;
            }
        }
        let (mut ql, mut qh) = ([0u8; 128], [0u8; 64]);
        for (h, j) in (0..256).step_by(128).enumerate() {
            let q = |k: usize| l[j + k] as u8;
            for i in 0..32 {
                ql[64 * h + i] = (q(i) & 0xf) | ((q(i + 64) & 0xf) << 4);
                ql[64 * h + i + 32] = (q(i + 32) & 0xf) | ((q(i + 96) & 0xf) << 4);
                qh[32 * h + i] =
                    (q(i) >> 4) | ((q(i + 32) >> 4) << 2) | ((q(i + 64) >> 4) << 4) | ((q(i + 96) >> 4) << 6);
            }
        }
        out.extend(ql);
        out.extend(qh);
        out.extend(sc.iter().map(|&s| s as u8));
        out.extend(f16_bytes(1.0 / iscale));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|i| {
                s = s.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let u = (s >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                // Mostly small with a few outliers, like weights.
                if i % 97 == 0 {
                    u * 0.4
                } else {
                    u * 0.05 + 0.01
                }
            })
            .collect()
    }

    fn rms(a: &[f32], b: &[f32]) -> f32 {
        (a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f32>() / a.len() as f32).sqrt()
    }

    #[test]
    fn nearest_int_rounds_half_to_even() {
        assert_eq!([0.5, 1.5, 2.5, -0.5, -1.5, 2.49, -2.51].map(nearest_int), [0, 2, 2, 0, -2, 2, -3]);
    }

    #[test]
    fn k_quants_decode_close_and_beat_the_plain_4_bit_blocks() {
        let x = data(4096, 7);
        use crate::gguf::{dequantize, TensorType};
        let a = quantize_q4_k(&x);
        assert_eq!(a.len(), 16 * 144);
        let b = quantize_q6_k(&x);
        assert_eq!(b.len(), 16 * 210);
        let q4k = dequantize(TensorType::Q4_K, &a, x.len());
        let q6k = dequantize(TensorType::Q6_K, &b, x.len());
        let q5 = dequantize(TensorType::Q5_0, &quantize_q5_0(&x), x.len());
        let q4 = dequantize(TensorType::Q4_0, &quantize_q4_0(&x), x.len());
        let (e4k, e6k, e5, e4) = (rms(&x, &q4k), rms(&x, &q6k), rms(&x, &q5), rms(&x, &q4));
        // The spread of the data is ~0.05; a 6-bit code is ~4× finer than a 4-bit one.
        assert!(e6k < e5 && e5 < e4 && e4k < e4, "q6_k {e6k} q5_0 {e5} q4_k {e4k} q4_0 {e4}");
        assert!(e6k < 0.5 * e4k, "q6_k {e6k} vs q4_k {e4k}");
        // All zeros stay zeros.
        let z = vec![0f32; 256];
        assert!(dequantize(TensorType::Q4_K, &quantize_q4_k(&z), 256).iter().all(|v| *v == 0.0));
        assert!(dequantize(TensorType::Q6_K, &quantize_q6_k(&z), 256).iter().all(|v| *v == 0.0));
    }
}
