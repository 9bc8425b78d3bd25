//! Dequantization of ggml's block types to f32, value for value as ggml's `dequantize_row_*` and the `gguf`
//! package's numpy reference (same f32 operations in the same order, so the results are bit-identical; checked
//! against fixtures made with the `gguf` package, `tests/fixtures/make_gguf_quants.py`).
//!
//! Legacy blocks hold 32 values: Q8_0 (f16 d, 32 × i8), Q4_0 / Q4_1 (f16 d [, f16 m], 16 bytes of nibbles: low
//! nibbles are values 0–15, high nibbles 16–31), Q5_0 / Q5_1 (as Q4 plus a u32 of fifth bits). K-quant
//! super-blocks hold 256 values in sub-blocks of 16 or 32 with their own 4–8-bit scales (Q2_K … Q6_K), and
//! Q8_K (f32 d, 256 × i8, block sums) is the intermediate type of llama.cpp's dot products.

/// Values per K-quant super-block.
const QK_K: usize = 256;

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Q5_0: `d · (q − 16)`, q = nibble | fifth bit << 4.
pub fn q5_0(b: &[u8], out: &mut Vec<f32>) {
    let d = f16_at(b, 0);
    let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
    let qs = &b[6..22];
    for j in 0..32 {
        let low = if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 };
        let q = (low | ((((qh >> j) & 1) as u8) << 4)) as i32 - 16;
        out.push(d * q as f32);
    }
}

/// Q5_1: `d · q + m`.
pub fn q5_1(b: &[u8], out: &mut Vec<f32>) {
    let (d, m) = (f16_at(b, 0), f16_at(b, 2));
    let qh = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
    let qs = &b[8..24];
    for j in 0..32 {
        let low = if j < 16 { qs[j] & 0x0F } else { qs[j - 16] >> 4 };
        let q = low | ((((qh >> j) & 1) as u8) << 4);
        out.push(d * q as f32 + m);
    }
}

/// Q2_K: 16 sub-blocks of 16, each `d · (scale & 15) · q − dmin · (scale >> 4)` with 2-bit q.
/// Layout: scales[16], qs[64], d, dmin.
pub fn q2_k(b: &[u8], out: &mut Vec<f32>) {
    let (scales, qs) = (&b[0..16], &b[16..80]);
    let (d, dmin) = (f16_at(b, 80), f16_at(b, 82));
    for e in 0..QK_K {
        let (half, s, l) = (e / 128, (e % 128) / 32, e % 32);
        let q = (qs[half * 32 + l] >> (2 * s)) & 3;
        let sc = scales[e / 16];
        let dl = d * (sc & 0x0F) as f32;
        let ml = dmin * (sc >> 4) as f32;
        out.push(dl * q as f32 - ml);
    }
}

/// Q3_K: 16 sub-blocks of 16, each `d · (scale − 32) · (q − 4·!hbit)`, 6-bit scales packed in 12 bytes.
/// Layout: hmask[32], qs[64], scales[12], d.
pub fn q3_k(b: &[u8], out: &mut Vec<f32>) {
    let (hmask, qs, sc) = (&b[0..32], &b[32..96], &b[96..108]);
    let d = f16_at(b, 108);
    let mut dl = [0f32; 16];
    for (i, v) in dl.iter_mut().enumerate() {
        let low = if i < 8 { sc[i] & 0x0F } else { sc[i - 8] >> 4 };
        let high = (sc[8 + i % 4] >> (2 * (i / 4))) & 3;
        *v = d * ((low | (high << 4)) as i8 - 32) as f32;
    }
    for e in 0..QK_K {
        let (half, s, l) = (e / 128, (e % 128) / 32, e % 32);
        let ql = ((qs[half * 32 + l] >> (2 * s)) & 3) as i8;
        let hbit = ((hmask[l] >> (e / 32)) & 1) ^ 1;
        out.push(dl[e / 16] * (ql - (hbit << 2) as i8) as f32);
    }
}

/// The 8 (scale, min) pairs of Q4_K / Q5_K, 6 bits each, packed in 12 bytes.
fn scale_min_k4(s: &[u8]) -> ([u8; 8], [u8; 8]) {
    let (mut sc, mut mn) = ([0u8; 8], [0u8; 8]);
    for j in 0..4 {
        sc[j] = s[j] & 0x3F;
        mn[j] = s[4 + j] & 0x3F;
        sc[4 + j] = (s[8 + j] & 0x0F) | ((s[j] >> 2) & 0x30);
        mn[4 + j] = (s[8 + j] >> 4) | ((s[4 + j] >> 2) & 0x30);
    }
    (sc, mn)
}

/// Q4_K: 8 sub-blocks of 32, each `d · scale · q − dmin · min` with 4-bit q.
/// Layout: d, dmin, scales[12], qs[128] (32 bytes per pair of sub-blocks: low nibbles, then high).
pub fn q4_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, mn) = scale_min_k4(&b[4..16]);
    let qs = &b[16..144];
    for e in 0..QK_K {
        let (chunk, which, l) = (e / 64, (e % 64) / 32, e % 32);
        let q = (qs[chunk * 32 + l] >> (4 * which)) & 0x0F;
        let j = e / 32;
        out.push(d * sc[j] as f32 * q as f32 - dmin * mn[j] as f32);
    }
}

/// Q5_K: Q4_K with a fifth bit per value from qh. Layout: d, dmin, scales[12], qh[32], qs[128].
pub fn q5_k(b: &[u8], out: &mut Vec<f32>) {
    let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
    let (sc, mn) = scale_min_k4(&b[4..16]);
    let (qh, qs) = (&b[16..48], &b[48..176]);
    for e in 0..QK_K {
        let (chunk, which, l) = (e / 64, (e % 64) / 32, e % 32);
        let low = (qs[chunk * 32 + l] >> (4 * which)) & 0x0F;
        let q = low | (((qh[l] >> (e / 32)) & 1) << 4);
        let j = e / 32;
        out.push(d * sc[j] as f32 * q as f32 - dmin * mn[j] as f32);
    }
}

/// Q6_K: 16 sub-blocks of 16, each `d · scale · (q − 32)` with 6-bit q and i8 scales.
/// Layout: ql[128], qh[64], scales[16], d.
pub fn q6_k(b: &[u8], out: &mut Vec<f32>) {
    let (ql, qh, scales) = (&b[0..128], &b[128..192], &b[192..208]);
    let d = f16_at(b, 208);
    for e in 0..QK_K {
        let (half, within) = (e / 128, e % 128);
        let low = (ql[half * 64 + within % 64] >> (4 * (within / 64))) & 0x0F;
        let high = (qh[half * 32 + within % 32] >> (2 * (within / 32))) & 3;
        let q = (low | (high << 4)) as i8 - 32;
        out.push(d * scales[e / 16] as i8 as f32 * q as f32);
    }
}

/// Q8_K: `d · q` with an f32 d. Layout: d (f32), qs[256], bsums[16] (i16, unused here).
pub fn q8_k(b: &[u8], out: &mut Vec<f32>) {
    let d = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    out.extend(b[4..4 + QK_K].iter().map(|&q| d * q as i8 as f32));
}
