//! A reader for GGUF (v2 and v3) files as llama.cpp writes them: metadata, tensor directory, and
//! dequantization of the tensor types F32, F16, BF16, the legacy blocks Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 and the
//! K-quants Q2_K … Q6_K, Q8_K to f32 ([`crate::gguf_quants`]).
//!
//! Format: <https://github.com/ggml-org/ggml/blob/master/docs/gguf.md>. Dimensions are stored innermost
//! first (`ne[0]` is the row length), so a PyTorch `[out, in]` weight has GGUF dims `[in, out]`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{CoreError, Result};
use crate::gguf_quants;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// Any unsigned integer type.
    U64(u64),
    /// Any signed integer type.
    I64(i64),
    /// f32 or f64.
    F64(f64),
    /// bool.
    Bool(bool),
    /// UTF-8 string.
    Str(String),
    /// Array of values.
    Array(Vec<Value>),
}

impl Value {
    /// The value as an unsigned integer, if it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U64(v) => Some(v),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
    /// The value as a float, if it is numeric.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F64(v) => Some(v),
            Value::U64(v) => Some(v as f64),
            Value::I64(v) => Some(v as f64),
            _ => None,
        }
    }
    /// The value as a string slice.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }
    /// The value as an array.
    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }
}

/// The tensor element types this reader can dequantize.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(non_camel_case_types)] // ggml's own type names (Q4_K, …), as users see them in file listings
pub enum TensorType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 32: f16 scale + 32 × i8.
    Q8_0,
    /// Blocks of 32: f16 scale + 32 × 4-bit, offset −8.
    Q4_0,
    /// Blocks of 32: f16 scale, f16 min + 32 × 4-bit.
    Q4_1,
    /// Blocks of 32: f16 scale, 32 fifth bits + 32 × 4-bit, offset −16.
    Q5_0,
    /// Blocks of 32: f16 scale, f16 min, 32 fifth bits + 32 × 4-bit.
    Q5_1,
    /// K-quant super-blocks of 256 ([`crate::gguf_quants`]): 2-bit values.
    Q2_K,
    /// 3-bit values.
    Q3_K,
    /// 4-bit values.
    Q4_K,
    /// 5-bit values.
    Q5_K,
    /// 6-bit values.
    Q6_K,
    /// 8-bit values, f32 scale.
    Q8_K,
}

impl TensorType {
    /// ggml's type id (the inverse of [`Self::from_id`]).
    pub fn id(self) -> u32 {
        (0..32).find(|&i| Self::from_id(i) == Some(self)).expect("every type has an id")
    }

    /// Elements per block.
    pub fn block_size(self) -> usize {
        self.block().0
    }

    fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::F16,
            2 => Self::Q4_0,
            3 => Self::Q4_1,
            6 => Self::Q5_0,
            7 => Self::Q5_1,
            8 => Self::Q8_0,
            10 => Self::Q2_K,
            11 => Self::Q3_K,
            12 => Self::Q4_K,
            13 => Self::Q5_K,
            14 => Self::Q6_K,
            15 => Self::Q8_K,
            30 => Self::BF16,
            _ => return None,
        })
    }
    /// (elements per block, bytes per block).
    fn block(self) -> (usize, usize) {
        match self {
            Self::F32 => (1, 4),
            Self::F16 | Self::BF16 => (1, 2),
            Self::Q8_0 => (32, 34),
            Self::Q4_0 => (32, 18),
            Self::Q4_1 => (32, 20),
            Self::Q5_0 => (32, 22),
            Self::Q5_1 => (32, 24),
            Self::Q2_K => (256, 84),
            Self::Q3_K => (256, 110),
            Self::Q4_K => (256, 144),
            Self::Q5_K => (256, 176),
            Self::Q6_K => (256, 210),
            Self::Q8_K => (256, 292),
        }
    }
}

/// The types [`dequantize`] reads, for error messages.
const SUPPORTED: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, Q8_K";

/// ggml type ids → names, for error messages about types we do not support.
fn ggml_type_name(id: u32) -> &'static str {
    match id {
        9 => "Q8_1",
        16..=23 => "IQ*",
        24 => "I8",
        25 => "I16",
        26 => "I32",
        27 => "I64",
        28 => "F64",
        _ => "unknown",
    }
}

/// One entry of the tensor directory.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Tensor name (llama.cpp naming, e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Shape in PyTorch order (outermost first).
    pub shape: Vec<usize>,
    /// Element type; `Err(id)` for a type this reader cannot dequantize.
    pub ty: std::result::Result<TensorType, u32>,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
}

impl TensorInfo {
    /// Number of elements ([`GgufFile::open`] refuses a file where this product overflows).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// An opened GGUF file: metadata and tensor directory parsed, data memory-mapped.
pub struct GgufFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    /// GGUF version (2 or 3).
    pub version: u32,
    /// Metadata key → value.
    pub metadata: BTreeMap<String, Value>,
    /// Tensors in file order.
    pub tensors: Vec<TensorInfo>,
}

struct Cursor<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            CoreError::format(
                self.path,
                format!(
                    "truncated GGUF: reading {what} at byte {} needs {n} bytes, file has {}",
                    self.pos,
                    self.buf.len()
                ),
            )
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.take(4, what)?.try_into().expect("4 bytes")))
    }
    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.take(8, what)?.try_into().expect("8 bytes")))
    }
    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        // Any length longer than the rest of the file is corrupt; checking here avoids huge allocations.
        let n = usize::try_from(n).ok().filter(|&n| n <= self.buf.len() - self.pos.min(self.buf.len()));
        n.ok_or_else(|| {
            CoreError::format(
                self.path,
                format!("corrupt GGUF: {what} at byte {} has an impossible length", self.pos - 8),
            )
        })
    }
    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|_| CoreError::format(self.path, format!("corrupt GGUF: {what} is not UTF-8")))
    }
    fn value(&mut self, ty: u32, what: &str, depth: usize) -> Result<Value> {
        let v = match ty {
            0 => Value::U64(self.take(1, what)?[0] as u64),
            1 => Value::I64(self.take(1, what)?[0] as i8 as i64),
            2 => Value::U64(u16::from_le_bytes(self.take(2, what)?.try_into().expect("2")) as u64),
            3 => Value::I64(i16::from_le_bytes(self.take(2, what)?.try_into().expect("2")) as i64),
            4 => Value::U64(self.u32(what)? as u64),
            5 => Value::I64(self.u32(what)? as i32 as i64),
            6 => Value::F64(f32::from_bits(self.u32(what)?) as f64),
            7 => Value::Bool(self.take(1, what)?[0] != 0),
            8 => Value::Str(self.string(what)?),
            9 if depth == 0 => {
                let inner = self.u32(what)?;
                let n = self.len(what)?;
                let mut items = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    items.push(self.value(inner, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(self.u64(what)? as i64),
            12 => Value::F64(f64::from_bits(self.u64(what)?)),
            _ => return Err(CoreError::format(self.path, format!("corrupt GGUF: {what} has unknown value type {ty}"))),
        };
        Ok(v)
    }
}

impl GgufFile {
    /// Opens and parses a GGUF file; the tensor data is checked to lie inside the file.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let mmap = crate::fsx::mmap(path).map_err(|e| CoreError::io(path, e))?;
        let mut c = Cursor { path, buf: &mmap, pos: 0 };
        let magic = c.take(4, "magic")?;
        if magic != b"GGUF" {
            return Err(CoreError::format(path, "not a GGUF file (bad magic)"));
        }
        let version = c.u32("version")?;
        if !(2..=3).contains(&version) {
            return Err(CoreError::format(path, format!("unsupported GGUF version {version} (need 2 or 3)")));
        }
        let n_tensors = c.u64("tensor count")?;
        let n_kv = c.u64("metadata count")?;
        let mut metadata = BTreeMap::new();
        for i in 0..n_kv {
            let key = c.string(&format!("metadata key #{i}"))?;
            let ty = c.u32(&format!("type of metadata `{key}`"))?;
            let v = c.value(ty, &format!("metadata `{key}`"), 0)?;
            metadata.insert(key, v);
        }
        let mut tensors = Vec::new();
        for i in 0..n_tensors {
            let name = c.string(&format!("name of tensor #{i}"))?;
            let n_dims = c.u32(&format!("dims of tensor `{name}`"))?;
            if n_dims == 0 || n_dims > 4 {
                return Err(CoreError::format(path, format!("corrupt GGUF: tensor `{name}` has {n_dims} dimensions")));
            }
            let mut shape = Vec::new();
            for _ in 0..n_dims {
                let d = c.u64(&format!("shape of tensor `{name}`"))?;
                shape.push(
                    usize::try_from(d)
                        .map_err(|_| CoreError::format(path, format!("tensor `{name}`: dimension too large")))?,
                );
            }
            shape.reverse();
            let ty_id = c.u32(&format!("type of tensor `{name}`"))?;
            let offset = c.u64(&format!("offset of tensor `{name}`"))?;
            let ty = TensorType::from_id(ty_id).ok_or(ty_id);
            tensors.push(TensorInfo { name, shape, ty, offset: offset as usize });
        }
        let align = metadata.get("general.alignment").and_then(Value::as_u64).unwrap_or(32).max(1) as usize;
        let data_start =
            c.pos.div_ceil(align).checked_mul(align).ok_or_else(|| {
                CoreError::format(path, format!("corrupt GGUF: general.alignment {align} is impossible"))
            })?;
        for t in &mut tensors {
            t.offset = t.offset.checked_add(data_start).ok_or_else(|| {
                CoreError::format(path, format!("corrupt GGUF: tensor `{}` has an impossible offset", t.name))
            })?;
            if t.shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).is_none() {
                return Err(CoreError::format(
                    path,
                    format!("corrupt GGUF: tensor `{}` has dimensions {:?} whose product overflows", t.name, t.shape),
                ));
            }
            if let Ok(ty) = t.ty {
                let n = byte_len(ty, t.numel()).ok_or_else(|| {
                    CoreError::format(
                        path,
                        format!(
                            "corrupt GGUF: tensor `{}` of type {ty:?} has {} elements, not a whole number of blocks",
                            t.name,
                            t.numel()
                        ),
                    )
                })?;
                if t.offset.checked_add(n).is_none_or(|end| end > mmap.len()) {
                    return Err(CoreError::format(
                        path,
                        format!(
                            "truncated GGUF: tensor `{}` needs bytes {}..{} but the file has {}",
                            t.name,
                            t.offset,
                            t.offset.saturating_add(n),
                            mmap.len()
                        ),
                    ));
                }
            }
        }
        Ok(Self { path: path.to_path_buf(), mmap, version, metadata, tensors })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A metadata value, or an error naming the missing key.
    pub fn get(&self, key: &str) -> Result<&Value> {
        self.metadata.get(key).ok_or_else(|| CoreError::format(&self.path, format!("metadata key `{key}` is missing")))
    }

    /// A metadata value as an unsigned integer, or an error naming the key.
    pub fn get_u64(&self, key: &str) -> Result<u64> {
        self.get(key)?
            .as_u64()
            .ok_or_else(|| CoreError::format(&self.path, format!("metadata `{key}` is not an unsigned integer")))
    }

    /// A metadata value as a float, or an error naming the key.
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        self.get(key)?
            .as_f64()
            .ok_or_else(|| CoreError::format(&self.path, format!("metadata `{key}` is not a number")))
    }

    /// A metadata value as a string, or an error naming the key.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        self.get(key)?
            .as_str()
            .ok_or_else(|| CoreError::format(&self.path, format!("metadata `{key}` is not a string")))
    }

    /// The directory entry of tensor `name`.
    pub fn tensor(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Dequantizes tensor `t` to f32 (row-major, PyTorch shape `t.shape`).
    pub fn dequantize(&self, t: &TensorInfo) -> Result<Vec<f32>> {
        let ty = t.ty.map_err(|id| {
            CoreError::format(
                &self.path,
                format!(
                    "tensor `{}` has unsupported type {} (id {id}); supported: {SUPPORTED}",
                    t.name,
                    ggml_type_name(id)
                ),
            )
        })?;
        let n = t.numel();
        let bytes = &self.mmap[t.offset..t.offset + byte_len(ty, n).expect("checked at open")];
        Ok(dequantize(ty, bytes, n))
    }
}

fn byte_len(ty: TensorType, numel: usize) -> Option<usize> {
    let (per_block, block_bytes) = ty.block();
    if !numel.is_multiple_of(per_block) {
        return None;
    }
    (numel / per_block).checked_mul(block_bytes)
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// Dequantizes `n` elements of type `ty` from `bytes` (which must hold exactly that many).
pub fn dequantize(ty: TensorType, bytes: &[u8], n: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(n);
    match ty {
        TensorType::F32 => out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().expect("4")))),
        TensorType::F16 => out.extend(bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())),
        TensorType::BF16 => out.extend(bytes.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())),
        TensorType::Q8_0 => {
            for b in bytes.chunks_exact(34) {
                let d = f16_at(b, 0);
                out.extend(b[2..].iter().map(|&q| q as i8 as f32 * d));
            }
        }
        TensorType::Q4_0 => {
            for b in bytes.chunks_exact(18) {
                let d = f16_at(b, 0);
                let qs = &b[2..];
                out.extend(qs.iter().map(|&q| ((q & 0x0F) as i32 - 8) as f32 * d));
                out.extend(qs.iter().map(|&q| ((q >> 4) as i32 - 8) as f32 * d));
            }
        }
        TensorType::Q4_1 => {
            for b in bytes.chunks_exact(20) {
                let (d, m) = (f16_at(b, 0), f16_at(b, 2));
                let qs = &b[4..];
                out.extend(qs.iter().map(|&q| (q & 0x0F) as f32 * d + m));
                out.extend(qs.iter().map(|&q| (q >> 4) as f32 * d + m));
            }
        }
        TensorType::Q5_0 => bytes.chunks_exact(22).for_each(|b| gguf_quants::q5_0(b, &mut out)),
        TensorType::Q5_1 => bytes.chunks_exact(24).for_each(|b| gguf_quants::q5_1(b, &mut out)),
        TensorType::Q2_K => bytes.chunks_exact(84).for_each(|b| gguf_quants::q2_k(b, &mut out)),
        TensorType::Q3_K => bytes.chunks_exact(110).for_each(|b| gguf_quants::q3_k(b, &mut out)),
        TensorType::Q4_K => bytes.chunks_exact(144).for_each(|b| gguf_quants::q4_k(b, &mut out)),
        TensorType::Q5_K => bytes.chunks_exact(176).for_each(|b| gguf_quants::q5_k(b, &mut out)),
        TensorType::Q6_K => bytes.chunks_exact(210).for_each(|b| gguf_quants::q6_k(b, &mut out)),
        TensorType::Q8_K => bytes.chunks_exact(292).for_each(|b| gguf_quants::q8_k(b, &mut out)),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn q4_1_block_low_nibbles_first_then_high() {
        // d = 0.5, m = -1.0; qs[j] = j | ((15 - j) << 4)
        let mut b = Vec::new();
        b.extend(half::f16::from_f32(0.5).to_le_bytes());
        b.extend(half::f16::from_f32(-1.0).to_le_bytes());
        b.extend((0..16u8).map(|j| j | ((15 - j) << 4)));
        let x = dequantize(TensorType::Q4_1, &b, 32);
        for j in 0..16 {
            assert_eq!(x[j], j as f32 * 0.5 - 1.0);
            assert_eq!(x[j + 16], (15 - j) as f32 * 0.5 - 1.0);
        }
    }

    #[test]
    fn f16_and_bf16_are_little_endian_halves() {
        let vals = [1.5f32, -2.25, 0.0, 65504.0];
        let f16: Vec<u8> = vals.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        assert_eq!(dequantize(TensorType::F16, &f16, 4), vals);
        let bf16: Vec<u8> =
            [1.5f32, -2.25, 0.0, 3.0e38].iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let got = dequantize(TensorType::BF16, &bf16, 4);
        assert_eq!(&got[..3], &[1.5, -2.25, 0.0]);
        assert!((got[3] / 3.0e38 - 1.0).abs() < 1e-2);
    }

    #[test]
    fn q4_0_and_q8_0_blocks() {
        let mut b = Vec::new();
        b.extend(half::f16::from_f32(2.0).to_le_bytes());
        b.extend((0..16u8).map(|j| j | (j << 4)));
        let x = dequantize(TensorType::Q4_0, &b, 32);
        assert_eq!(x[0], -16.0);
        assert_eq!(x[15], 14.0);
        assert_eq!(x[31], 14.0);
        let mut b = Vec::new();
        b.extend(half::f16::from_f32(0.25).to_le_bytes());
        b.extend((0..32i8).map(|j| (j - 16) as u8));
        let x = dequantize(TensorType::Q8_0, &b, 32);
        assert_eq!(x[0], -4.0);
        assert_eq!(x[31], 3.75);
    }
}
