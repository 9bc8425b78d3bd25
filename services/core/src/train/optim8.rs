//! bitsandbytes' blockwise 8-bit AdamW (`adamw_8bit`, `paged_adamw_8bit`: `bnb.optim.AdamW8bit`, Dettmers et
//! al. 2022), as its CPU build (0.50) updates: the moments are stored as one byte per element — codes into a
//! 256-value dynamic quantization map (signed for m, unsigned for v) — times an f32 absmax per block of 256
//! elements. A step dequantizes, updates m and v in f32, applies decoupled weight decay and the Adam step
//! with the unquantized moments, then requantizes through bitsandbytes' 65,536-entry lookup table (which is
//! not nearest-code rounding: an exact 0 does not map to the zero code). Tensors under 4,096 elements keep
//! 32-bit moments with bitsandbytes' 32-bit formula, as `min_8bit_size` does. Each operation rounds in f32
//! where bitsandbytes rounds (fused multiply-adds where ATen fuses), so codes equal bitsandbytes' and
//! parameters agree to an ulp (`sqrt` here is exactly rounded).

/// Elements per absmax block.
pub const BLOCK: usize = 256;
/// Tensors with fewer elements keep 32-bit moments (bitsandbytes' `min_8bit_size`).
pub const MIN_8BIT_SIZE: usize = 4096;

/// `torch.linspace(start, end, steps)` in f32 as the x86 CPU kernel computes it.
fn linspace(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| if i < half { step.mul_add(i as f32, start) } else { (-step).mul_add((steps - 1 - i) as f32, end) })
        .collect()
}

/// bitsandbytes' `create_dynamic_map(signed, max_exponent_bits=7, total_bits=8)`: 256 sorted f32 values.
pub fn dynamic_map(signed: bool) -> Vec<f32> {
    let mut data = Vec::with_capacity(256);
    for i in 0..7i32 {
        let n = if signed { (1usize << i) + 1 } else { (1usize << (i + 1)) + 1 };
        let b = linspace(0.1, 1.0, n);
        let scale = 10f64.powi(i - 6) as f32;
        for w in b.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(scale * mean);
            if signed {
                data.push(-scale * mean);
            }
        }
    }
    data.extend([0.0, 1.0]);
    data.sort_by(f32::total_cmp);
    data
}

/// A quantization map with bitsandbytes' lookup table: entry i (of 65,536 over [−1, 1]) is the number of
/// midpoints between consecutive codes below `2i/65535 − 1`.
pub struct QuantMap {
    /// The 256 values.
    pub code: Vec<f32>,
    lut: Vec<u8>,
}

impl QuantMap {
    /// The map and its table.
    pub fn new(code: Vec<f32>) -> Self {
        let mid: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) * 0.5).collect();
        let lut = (0..65536u32)
            .map(|i| {
                let val = (2.0f32 * i as f32) / 65535.0 - 1.0;
                mid.partition_point(|&m| m < val) as u8
            })
            .collect();
        Self { code, lut }
    }

    /// Quantizes `x` block by block into `codes` and `absmax`.
    pub fn quantize(&self, x: &[f32], codes: &mut [u8], absmax: &mut [f32]) {
        for ((blk, out), am) in x.chunks(BLOCK).zip(codes.chunks_mut(BLOCK)).zip(absmax.iter_mut()) {
            let a = blk.iter().filter(|v| !v.is_nan()).fold(0f32, |a, v| a.max(v.abs()));
            *am = a;
            if a == 0.0 {
                out.fill(0);
                continue;
            }
            let inv = 1.0 / a;
            for (o, &v) in out.iter_mut().zip(blk) {
                let y = (v * inv).clamp(-1.0, 1.0);
                let t = (y + 1.0) * 0.5;
                let idx = (t.mul_add(65535.0, 0.5) as u32 & 0xFFFF) as usize;
                *o = self.lut[idx];
            }
        }
    }

    /// The values of `codes` scaled by their block's absmax.
    pub fn dequantize(&self, codes: &[u8], absmax: &[f32]) -> Vec<f32> {
        codes.iter().enumerate().map(|(i, &c)| self.code[c as usize] * absmax[i / BLOCK]).collect()
    }
}

/// The two maps (m signed, v unsigned), built once.
pub fn maps() -> &'static (QuantMap, QuantMap) {
    static MAPS: std::sync::OnceLock<(QuantMap, QuantMap)> = std::sync::OnceLock::new();
    MAPS.get_or_init(|| (QuantMap::new(dynamic_map(true)), QuantMap::new(dynamic_map(false))))
}

/// One parameter's 8-bit moments.
#[derive(Debug, Clone, PartialEq)]
pub struct State8 {
    /// Codes of m.
    pub state1: Vec<u8>,
    /// Codes of v.
    pub state2: Vec<u8>,
    /// Per-block absmax of m.
    pub absmax1: Vec<f32>,
    /// Per-block absmax of v.
    pub absmax2: Vec<f32>,
}

impl State8 {
    /// Zero moments for `n` elements.
    pub fn new(n: usize) -> Self {
        let blocks = n.div_ceil(BLOCK);
        Self { state1: vec![0; n], state2: vec![0; n], absmax1: vec![0.0; blocks], absmax2: vec![0.0; blocks] }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.state1.len() + self.state2.len() + 4 * (self.absmax1.len() + self.absmax2.len())
    }
}

/// Adam settings of one step: learning rate, betas, epsilon, weight decay, and the step number (from 1).
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// Learning rate.
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
    /// The step count, from 1.
    pub t: i32,
}

/// One 8-bit AdamW step of `p` with gradient `g`.
pub fn step8(p: &mut [f32], g: &[f32], st: &mut State8, s: Step) {
    let (m1, m2) = maps();
    let mut m = m1.dequantize(&st.state1, &st.absmax1);
    let mut v = m2.dequantize(&st.state2, &st.absmax2);
    let (b1, b2) = (s.beta1 as f32, s.beta2 as f32);
    let (a1, a2) = ((1.0 - s.beta1) as f32, (1.0 - s.beta2) as f32);
    let c1 = 1.0 - s.beta1.powi(s.t);
    let c2 = ((1.0 - s.beta2.powi(s.t)).sqrt()) as f32;
    let eps = s.eps as f32;
    let decay = (s.weight_decay > 0.0).then_some((1.0 - s.lr * s.weight_decay) as f32);
    let value = (-s.lr / c1) as f32;
    for i in 0..p.len() {
        m[i] = g[i].mul_add(a1, m[i] * b1);
        v[i] = (a2 * g[i]).mul_add(g[i], v[i] * b2);
        let denom = v[i].sqrt() / c2 + eps;
        let mut x = p[i];
        if let Some(d) = decay {
            x *= d;
        }
        p[i] = x + (value * m[i]) / denom;
    }
    m1.quantize(&m, &mut st.state1, &mut st.absmax1);
    m2.quantize(&v, &mut st.state2, &mut st.absmax2);
}

/// One step of bitsandbytes' 32-bit AdamW (its tensors under [`MIN_8BIT_SIZE`] elements): ε is scaled by
/// √(1 − β₂ᵗ) inside the denominator and the step size carries the bias corrections.
pub fn step32(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], s: Step) {
    let (b1, b2) = (s.beta1 as f32, s.beta2 as f32);
    let (a1, a2) = ((1.0 - s.beta1) as f32, (1.0 - s.beta2) as f32);
    let c1 = 1.0 - s.beta1.powi(s.t);
    let c2 = (1.0 - s.beta2.powi(s.t)).sqrt();
    let step_size = (-s.lr * c2 / c1) as f32;
    let eps = (s.eps * c2) as f32;
    let decay = (s.weight_decay > 0.0).then_some((1.0 - s.lr * s.weight_decay) as f32);
    for i in 0..p.len() {
        m[i] = g[i].mul_add(a1, m[i] * b1);
        v[i] = (a2 * g[i]).mul_add(g[i], v[i] * b2);
        if let Some(d) = decay {
            p[i] *= d;
        }
        let upd = m[i] / (v[i].sqrt() + eps);
        p[i] = upd.mul_add(step_size, p[i]);
    }
}
