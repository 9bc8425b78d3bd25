//! Weights from Hugging Face safetensors: one `model.safetensors` or shards listed in
//! `model.safetensors.index.json`, memory-mapped, with HF key names unchanged. [`Weights`] hands tensors
//! to the model code by path (`vb.pp("model").pp("layers").pp(0).get(&[576, 576], "weight")`), checking
//! shapes and converting to the caller's dtype and device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use safetensors::{Dtype as StDtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use crate::error::{CoreError, Result};

/// One memory-mapped safetensors file.
struct Shard {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

/// All weight files of a model directory, with an index from tensor name to file.
pub struct WeightFiles {
    shards: Vec<Shard>,
    index: HashMap<String, usize>,
}

impl WeightFiles {
    /// Opens `dir/model.safetensors`, or the shards named by `dir/model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        if index_path.exists() {
            let text = crate::fsx::read_to_string(&index_path).map_err(|e| CoreError::io(&index_path, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| CoreError::format(&index_path, e.to_string()))?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| CoreError::format(&index_path, "no `weight_map` object"))?;
            let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_owned)).collect();
            files.sort();
            files.dedup();
            let mut shards = Vec::new();
            for f in &files {
                if f.contains('/') || f.contains("..") {
                    return Err(CoreError::format(&index_path, format!("shard name `{f}` is not a plain file name")));
                }
                let p = dir.join(f);
                if !p.exists() {
                    return Err(CoreError::format(
                        &index_path,
                        format!("shard `{f}` listed in the index is missing ({})", p.display()),
                    ));
                }
                shards.push(Shard::open(&p)?);
            }
            Self::from_shards(shards)
        } else {
            let p = dir.join("model.safetensors");
            if !p.exists() {
                return Err(CoreError::format(
                    dir,
                    "no model.safetensors or model.safetensors.index.json in the model directory",
                ));
            }
            Self::from_shards(vec![Shard::open(&p)?])
        }
    }

    /// Opens the given safetensors files as one weight set.
    pub fn open_files(paths: &[PathBuf]) -> Result<Self> {
        Self::from_shards(paths.iter().map(|p| Shard::open(p)).collect::<Result<_>>()?)
    }

    fn from_shards(shards: Vec<Shard>) -> Result<Self> {
        let mut index = HashMap::new();
        for (i, s) in shards.iter().enumerate() {
            for name in s.parse()?.names() {
                index.insert(name.to_owned(), i);
            }
        }
        Ok(Self { shards, index })
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    /// All tensor names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    /// The file a name resolves to (the first shard when absent, for error messages).
    fn file_of(&self, name: &str) -> &Path {
        let i = self.index.get(name).copied().unwrap_or(0);
        &self.shards[i].path
    }

    /// Loads tensor `name` as stored (dtype and shape of the file), on the CPU.
    pub fn load_raw(&self, name: &str) -> Result<Tensor> {
        let i = *self.index.get(name).ok_or_else(|| CoreError::Weight {
            file: self.file_of(name).to_path_buf(),
            name: name.to_owned(),
            msg: "missing".into(),
        })?;
        let shard = &self.shards[i];
        let st = shard.parse()?;
        let view = st.tensor(name).map_err(|e| shard.err(e))?;
        let kind = match view.dtype() {
            StDtype::F32 => Kind::Float,
            StDtype::F16 => Kind::Half,
            StDtype::BF16 => Kind::BFloat16,
            StDtype::F64 => Kind::Double,
            StDtype::I64 => Kind::Int64,
            StDtype::I32 => Kind::Int,
            StDtype::I16 => Kind::Int16,
            StDtype::I8 => Kind::Int8,
            StDtype::U8 => Kind::Uint8,
            StDtype::BOOL => Kind::Bool,
            other => {
                return Err(CoreError::Weight {
                    file: shard.path.clone(),
                    name: name.to_owned(),
                    msg: format!("unsupported dtype {other:?}"),
                })
            }
        };
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        Ok(Tensor::f_from_data_size(view.data(), &shape, kind)?)
    }

    /// Loads tensor `name`, checks its shape, converts to `kind` on `device`.
    pub fn load(&self, name: &str, shape: &[i64], kind: Kind, device: Device) -> Result<Tensor> {
        let t = self.load_raw(name)?;
        if t.size() != shape {
            return Err(CoreError::Weight {
                file: self.file_of(name).to_path_buf(),
                name: name.to_owned(),
                msg: format!("shape mismatch: expected {shape:?}, found {:?}", t.size()),
            });
        }
        let floating = |k: Kind| matches!(k, Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double);
        if floating(kind) {
            let bad =
                |msg: String| CoreError::Weight { file: self.file_of(name).to_path_buf(), name: name.to_owned(), msg };
            if !floating(t.kind()) {
                return Err(bad(format!("stored as {:?}; a weight must be a floating-point tensor", t.kind())));
            }
            if !bool::try_from(t.f_isfinite()?.f_all()?)? {
                return Err(bad("holds NaN or infinite values".into()));
            }
        }
        Ok(t.f_to_device(device)?.f_to_kind(kind)?)
    }
}

impl Shard {
    fn open(path: &Path) -> Result<Self> {
        let mmap = crate::fsx::mmap(path).map_err(|e| CoreError::io(path, e))?;
        let shard = Self { path: path.to_path_buf(), mmap };
        shard.parse()?;
        Ok(shard)
    }

    /// Parses the header; cheap (the data stays mapped), so done on every access rather than stored
    /// as a self-referential struct.
    fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| self.err(e))
    }

    fn err(&self, e: safetensors::SafeTensorError) -> CoreError {
        CoreError::format(&self.path, format!("invalid safetensors file: {e}"))
    }
}

/// A path into a [`WeightFiles`] with the dtype and device the model wants (in the style of candle's
/// `VarBuilder`): `pp` descends, `get` loads and checks a tensor.
#[derive(Clone)]
pub struct Weights {
    files: Arc<WeightFiles>,
    prefix: String,
    /// Floating-point kind the weights are converted to.
    pub kind: Kind,
    /// Device the weights are moved to.
    pub device: Device,
}

impl Weights {
    /// The root of `files`.
    pub fn new(files: Arc<WeightFiles>, kind: Kind, device: Device) -> Self {
        Self { files, prefix: String::new(), kind, device }
    }

    /// Descends into `name` (`model` → `model.layers` → `model.layers.0`).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        let prefix = if self.prefix.is_empty() { name.to_string() } else { format!("{}.{name}", self.prefix) };
        Self { prefix, ..self.clone() }
    }

    /// The same path, loading onto `device`.
    pub fn on(&self, device: Device) -> Self {
        Self { device, ..self.clone() }
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_owned()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Loads `prefix.name` with the given shape.
    pub fn get(&self, shape: &[i64], name: &str) -> Result<Tensor> {
        self.files.load(&self.key(name), shape, self.kind, self.device)
    }

    /// Whether `prefix.name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.files.contains(&self.key(name))
    }
}

/// Files of a HF model directory besides its weights and config that go wherever the model goes
/// (tokenizer, chat template, generation defaults).
const SIDE_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
];

/// Copies the [`SIDE_FILES`] that exist in `base` into `out`.
pub(crate) fn copy_side_files(base: &Path, out: &Path) -> Result<()> {
    for f in SIDE_FILES {
        let src = base.join(f);
        if src.exists() {
            crate::fsx::copy(&src, out.join(f)).map_err(|e| CoreError::io(&src, e))?;
        }
    }
    Ok(())
}

/// `pid-nanos`: a suffix for temporary names that is distinct across concurrent writers, in this process or
/// another.
pub(crate) fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
    format!("{}-{nanos}", std::process::id())
}

/// Writes `bytes` to `path` atomically: a temporary sibling, fsync, rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", unique_suffix()));
    let write = || -> std::io::Result<()> {
        let mut f = crate::fsx::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        crate::fsx::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = crate::fsx::remove_file(&tmp);
        CoreError::io(path, e)
    })
}

/// Bytes of one tensor ready to serialise with the `safetensors` crate.
pub(crate) struct RawTensor {
    pub(crate) dtype: StDtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) data: Vec<u8>,
}

impl safetensors::View for &RawTensor {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Saves named tensors (any device/layout; f32, bf16, f16, i64, f64, u8) as a safetensors file with the
/// `{"format": "pt"}` metadata transformers and PEFT expect, atomically.
pub fn save_safetensors(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut raws = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let dtype = match t.kind() {
            Kind::Float => StDtype::F32,
            Kind::BFloat16 => StDtype::BF16,
            Kind::Half => StDtype::F16,
            Kind::Int64 => StDtype::I64,
            Kind::Double => StDtype::F64,
            Kind::Uint8 => StDtype::U8,
            k => {
                return Err(CoreError::Weight {
                    file: path.to_path_buf(),
                    name: name.clone(),
                    msg: format!("cannot save kind {k:?}"),
                })
            }
        };
        let t = t.f_detach()?.f_to_device(Device::Cpu)?.f_contiguous()?;
        let n = t.numel();
        let mut data = vec![0u8; n * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut data, n)?;
        raws.push((name.clone(), RawTensor { dtype, shape: t.size().iter().map(|&d| d as usize).collect(), data }));
    }
    let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    let bytes = safetensors::serialize(raws.iter().map(|(k, v)| (k.clone(), v)), Some(meta))
        .map_err(|e| CoreError::format(path, format!("cannot serialize safetensors: {e}")))?;
    write_atomically(path, &bytes)
}

/// Saves a model's tensors into `dir` like transformers' `save_pretrained`: one `model.safetensors`, or,
/// when they exceed `max_shard_bytes`, `model-0000i-of-0000N.safetensors` shards filled in order plus
/// `model.safetensors.index.json` (`metadata.total_size`, `weight_map`). Returns the number of files.
pub fn save_sharded(dir: &Path, tensors: &[(String, Tensor)], max_shard_bytes: u64) -> Result<usize> {
    if max_shard_bytes == 0 {
        return Err(CoreError::InvalidArgument("max_shard_bytes must be positive".into()));
    }
    let size = |t: &Tensor| (t.numel() * t.kind().elt_size_in_bytes()) as u64;
    let total: u64 = tensors.iter().map(|(_, t)| size(t)).sum();
    let mut shards: Vec<Vec<usize>> = vec![vec![]];
    let mut current = 0u64;
    for (i, (_, t)) in tensors.iter().enumerate() {
        let s = size(t);
        // A tensor larger than the limit gets a shard of its own, as in transformers.
        if current > 0 && current + s > max_shard_bytes {
            shards.push(vec![]);
            current = 0;
        }
        shards.last_mut().expect("one shard").push(i);
        current += s;
    }
    // Replacing a model dir: stale shards of an earlier save would confuse loaders.
    if let Ok(rd) = crate::fsx::read_dir(dir) {
        for e in rd {
            let n = e.name.to_string_lossy().into_owned();
            if n.ends_with(".safetensors") || n == "model.safetensors.index.json" {
                crate::fsx::remove_file(&e.path).map_err(|err| CoreError::io(&e.path, err))?;
            }
        }
    }
    if shards.len() == 1 {
        save_safetensors(&dir.join("model.safetensors"), tensors)?;
        return Ok(1);
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    for (k, idx) in shards.iter().enumerate() {
        let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
        let part: Vec<(String, Tensor)> =
            idx.iter().map(|&i| (tensors[i].0.clone(), tensors[i].1.shallow_clone())).collect();
        save_safetensors(&dir.join(&file), &part)?;
        for (name, _) in &part {
            weight_map.insert(name.clone(), serde_json::Value::String(file.clone()));
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
    write_atomically(
        &dir.join("model.safetensors.index.json"),
        serde_json::to_string_pretty(&index).expect("json").as_bytes(),
    )?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_sharded_fills_shards_in_order_and_reloads() {
        let d = tempfile::tempdir().unwrap();
        let t = |n: i64, v: f64| Tensor::full([n], v, (Kind::Float, Device::Cpu));
        // 400 + 200 bytes fit one 700-byte shard; 1200 bytes get a shard of their own; then 40.
        let tensors = vec![
            ("a".to_owned(), t(100, 1.0)),
            ("b".to_owned(), t(50, 2.0)),
            ("c".to_owned(), t(300, 3.0)),
            ("d".to_owned(), t(10, 4.0)),
        ];
        assert_eq!(save_sharded(d.path(), &tensors, 700).unwrap(), 3);
        let index: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.path().join("model.safetensors.index.json")).unwrap())
                .unwrap();
        assert_eq!(index["metadata"]["total_size"], 1840);
        let file = |n: &str| index["weight_map"][n].as_str().unwrap().to_owned();
        assert_eq!(
            [file("a"), file("b"), file("c"), file("d")],
            [1, 1, 2, 3].map(|i| format!("model-{i:05}-of-00003.safetensors"))
        );
        let w = WeightFiles::open_dir(d.path()).unwrap();
        for (name, want) in &tensors {
            assert!(w.load_raw(name).unwrap().equal(want), "{name}");
        }
        // Saving again into the same dir as one file leaves no stale shard or index behind.
        assert_eq!(save_sharded(d.path(), &tensors, 1 << 20).unwrap(), 1);
        let mut names: Vec<String> =
            std::fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into()).collect();
        names.sort();
        assert_eq!(names, ["model.safetensors"]);
        assert!(save_sharded(d.path(), &tensors, 0).is_err());
    }
}
