//! LoRA adapters (Hu et al. 2021, <https://arxiv.org/abs/2106.09685>) on the decoder's linear layers, in
//! PEFT's format: `y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ` with A `[r, in]` initialised like PEFT
//! (Kaiming-uniform with a = √5, i.e. U(−1/√in, 1/√in), drawn from our own seeded stream), B `[out, r]` zero, and s = alpha / r
//! (alpha / √r with rsLoRA). Saved as `adapter_config.json` + `adapter_model.safetensors` with keys
//! `base_model.model.<module>.lora_A.weight`, so PEFT loads our adapters and we load PEFT's.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::error::{CoreError, Result};
use crate::kernels::dropout::zero_where;
use crate::models::decoder::{cpu_column_major, Linear};
use crate::models::CausalLm;
use crate::sampling::Rng;
use crate::weights::WeightFiles;

/// Which linear layers get an adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// Every linear layer of the decoder (not lm_head), like PEFT's `"all-linear"`.
    AllLinear,
    /// Module names, matched as PEFT does: equal to the full module path or its last components
    /// (`q_proj` matches `model.layers.3.self_attn.q_proj`).
    Names(Vec<String>),
}

impl Targets {
    /// Whether module `path` (e.g. `model.layers.0.self_attn.q_proj`) is targeted.
    pub fn matches(&self, path: &str) -> bool {
        match self {
            Targets::AllLinear => true,
            Targets::Names(names) => names.iter().any(|n| path == n || path.ends_with(&format!(".{n}"))),
        }
    }
}

/// Hyperparameters of a LoRA adapter.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank.
    pub r: i64,
    /// Scaling numerator.
    pub alpha: f64,
    /// Dropout on the adapter's input while training.
    pub dropout: f64,
    /// Targeted modules.
    pub targets: Targets,
    /// Scale by alpha/√r instead of alpha/r.
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output row times the direction of W + s·BA ([`crate::dora`]).
    pub use_dora: bool,
}

impl LoraConfig {
    /// Rejects values that cannot work.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CoreError::InvalidArgument(m));
        if self.r <= 0 {
            return bad(format!("LoRA r must be positive, got {}", self.r));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return bad(format!("lora_alpha must be positive, got {}", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad(format!("lora_dropout must be in [0, 1), got {}", self.dropout));
        }
        if matches!(&self.targets, Targets::Names(n) if n.is_empty()) {
            return bad("target_modules is empty".into());
        }
        Ok(())
    }

    /// The scale applied to `B A x`.
    pub fn scaling(&self) -> f64 {
        scaling(self.alpha, self.r, self.use_rslora)
    }
}

pub(crate) fn scaling(alpha: f64, r: i64, rslora: bool) -> f64 {
    if rslora {
        alpha / (r as f64).sqrt()
    } else {
        alpha / r as f64
    }
}

/// One adapter on one linear layer. A and B are f32 leaf tensors (trainable), whatever the base's kind.
#[derive(Debug)]
pub struct Lora {
    /// `[r, in]`.
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// alpha / r (or alpha / √r).
    pub scaling: f64,
    /// Input dropout probability while training.
    pub dropout: f64,
    /// Whether dropout is active.
    pub training: bool,
    /// When false the adapter is bypassed (the reference model of DPO/PPO).
    pub enabled: bool,
    /// State of this adapter's own dropout stream (see [`CausalLm::set_dropout_seed`]). Dropout masks come
    /// from here, not from libtorch's process-global generator, so concurrent jobs in one process cannot
    /// perturb each other and a resumed run draws exactly the masks of an uninterrupted one.
    pub dropout_state: std::cell::Cell<u64>,
    /// DoRA's magnitude vector `[out]` (f32 leaf, trainable); `None` for plain LoRA.
    pub magnitude: Option<Tensor>,
}

impl Lora {
    /// The base weight `w` with this (plain) adapter folded in, `W + s · B A`: computed in f32, returned in
    /// `w`'s kind (PEFT's merge).
    pub fn merged(&self, w: &Tensor) -> Result<Tensor> {
        let delta = self.b.f_matmul(&self.a)?.f_mul_scalar(self.scaling)?;
        Ok(w.f_to_kind(Kind::Float)?.f_add(&delta)?.f_to_kind(w.kind())?)
    }

    /// `s · dropout(x) Aᵀ Bᵀ`, computed in the adapter's kind and returned in `x`'s.
    ///
    /// # Shapes
    /// `x`: `[.., in]` → `[.., out]`.
    pub fn delta(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.down(x)?.f_linear::<Tensor>(&self.b, None)?.f_to_kind(x.kind())?)
    }

    /// The rank-r side of the adapter, `s · dropout(x) Aᵀ`, in the adapter's kind. Both scalings (the
    /// adapter's `s` and dropout's `1/keep`) are applied here, to r columns, rather than to the full-width
    /// input or output: two passes over `[tokens, in]` / `[tokens, out]` fewer each way.
    ///
    /// # Shapes
    /// `x`: `[.., in]` → `[.., r]`.
    pub fn down(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.f_to_kind(self.a.kind())?;
        let mut scale = self.scaling;
        if let Some(dropped) = self.dropout_mask(&h)? {
            h = zero_where(&h, &dropped)?;
            scale /= 1.0 - self.dropout;
        }
        Ok(h.f_linear::<Tensor>(&self.a, None)?.f_mul_scalar(scale)?)
    }

    /// The "dropped" mask of this call's dropout (advancing the adapter's stream), or `None` when dropout is
    /// off (evaluation, or p = 0).
    fn dropout_mask(&self, h: &Tensor) -> Result<Option<Tensor>> {
        if !(self.training && self.dropout > 0.0) {
            return Ok(None);
        }
        let keep = 1.0 - self.dropout;
        let mut rng = Rng(self.dropout_state.get());
        let dropped = if h.device().is_cuda() {
            // On a GPU the mask is drawn there, from a seed taken off this adapter's stream: a host-side
            // mask would cost more per step than the step itself. Still exact on resume (the stream is
            // checkpointed); libtorch's CUDA generator is process-global, so two jobs training on GPUs of
            // one process at once may swap masks (still valid dropout, no longer reproducible).
            let seed = rng.next_u64();
            self.dropout_state.set(rng.0);
            tch::Cuda::manual_seed_all(seed);
            h.f_rand_like()?.f_ge(keep)?
        } else {
            // A boolean "dropped" mask: masked_fill keeps 1 byte per element for the backward pass where a
            // float mask multiplied in would keep 4.
            let n = h.numel();
            let words = n.div_ceil(4);
            let mask = Tensor::f_empty([4 * words as i64], (Kind::Bool, tch::Device::Cpu))?;
            // SAFETY: `mask` is a fresh contiguous CPU bool tensor of 4·words elements that nothing else
            // references while this slice lives; every byte is written as 0 or 1 below.
            let bytes = unsafe { std::slice::from_raw_parts_mut(mask.data_ptr() as *mut u8, 4 * words) };
            fill_dropout_mask(bytes, rng.0, keep, tch::get_num_threads().max(1) as usize);
            // The stream advanced by one step per 4 elements (SplitMix64 is a counter: step i is
            // independent of the others, so the fill may be split across threads).
            self.dropout_state.set(rng.0.wrapping_add((words as u64).wrapping_mul(SPLITMIX_GAMMA)));
            mask.f_narrow(0, 0, n as i64)?.f_view(h.size().as_slice())?.f_to_device(h.device())?
        };
        Ok(Some(dropped))
    }

    /// `dropout(x)` (scaled by 1/keep, in x's kind) when dropout is on, else `None` (DoRA's dropout path needs
    /// the dropped input itself).
    pub(crate) fn dropped_input(&self, x: &Tensor) -> Result<Option<Tensor>> {
        match self.dropout_mask(x)? {
            Some(d) => Ok(Some(zero_where(x, &d)?.f_div_scalar(1.0 - self.dropout)?)),
            None => Ok(None),
        }
    }
}

/// SplitMix64's increment ([`Rng::next_u64`] adds it once per draw).
const SPLITMIX_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// Writes the dropout mask (1 = dropped) for the stream at `state` into `out` (a multiple of 4 bytes): draw
/// `i` of the stream gives bytes `4i..4i+4`, one 16-bit field each, dropped when the field is at least
/// `keep·65536` (a 1/65536 grid for the keep probability). Large masks are filled by `threads` threads,
/// each from its own offset in the stream, with the same result as one thread.
fn fill_dropout_mask(out: &mut [u8], state: u64, keep: f64, threads: usize) {
    let threshold = (keep * 65536.0).round() as u64;
    let fill = |chunk: &mut [u8], first: u64| {
        let mut rng = Rng(state.wrapping_add(first.wrapping_mul(SPLITMIX_GAMMA)));
        for w in chunk.chunks_exact_mut(4) {
            let r = rng.next_u64();
            for (k, b) in w.iter_mut().enumerate() {
                *b = u8::from((r >> (16 * k)) & 0xFFFF >= threshold);
            }
        }
    };
    let words = out.len() / 4;
    if threads == 1 || words < 1 << 16 {
        return fill(out, 0);
    }
    let per = words.div_ceil(threads);
    std::thread::scope(|scope| {
        for (t, chunk) in out.chunks_mut(4 * per).enumerate() {
            scope.spawn(move || fill(chunk, (t * per) as u64));
        }
    });
}

/// An adapter directory found by [`find_adapters`].
#[derive(Debug, Clone, PartialEq)]
pub struct FoundAdapter {
    /// The directory.
    pub path: std::path::PathBuf,
    /// `peft_type` (`LORA`, `PROMPT_TUNING`; empty when the config does not say).
    pub peft_type: String,
    /// `base_model_name_or_path`.
    pub base_model: String,
    /// The LoRA rank (0 for prompt tuning).
    pub r: u32,
    /// Trained by ferrotune on an NF4 base (QLoRA).
    pub nf4_base: bool,
}

/// The adapters (directories holding `adapter_config.json`) in `dir` and up to `depth` levels below it,
/// sorted by path. Listings go through [`crate::fsx`], so a server never follows a symlink out of its root.
pub fn find_adapters(dir: &Path, depth: usize) -> Vec<FoundAdapter> {
    let mut found = vec![];
    let mut stack = vec![(dir.to_path_buf(), 0usize)];
    while let Some((d, level)) = stack.pop() {
        let cfg = d.join("adapter_config.json");
        if crate::fsx::is_file(&cfg) {
            let v: serde_json::Value =
                crate::fsx::read_to_string(&cfg).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
            found.push(FoundAdapter {
                peft_type: v["peft_type"].as_str().unwrap_or("").to_owned(),
                base_model: v["base_model_name_or_path"].as_str().unwrap_or("").to_owned(),
                r: v["r"].as_u64().unwrap_or(0) as u32,
                nf4_base: trained_on_nf4(&d).unwrap_or(false),
                path: d.clone(),
            });
        }
        if level < depth {
            if let Ok(entries) = crate::fsx::read_dir(&d) {
                stack.extend(entries.into_iter().filter(|e| e.is_dir).map(|e| (e.path, level + 1)));
            }
        }
    }
    found.sort_by(|a, b| a.path.cmp(&b.path));
    found
}

/// Whether the adapter in `dir` was trained by ferrotune on an NF4 base (QLoRA), as recorded in its
/// `ferrotune_train.json`; false when that file is absent (e.g. an adapter made by PEFT).
pub fn trained_on_nf4(dir: &Path) -> Result<bool> {
    let info = dir.join("ferrotune_train.json");
    match crate::fsx::read_to_string(&info) {
        Ok(text) => {
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| CoreError::format(&info, e.to_string()))?;
            Ok(v["base_quantization"] == "nf4")
        }
        Err(_) => Ok(false),
    }
}

/// PEFT's key prefix for a causal LM.
const PREFIX: &str = "base_model.model.";

impl CausalLm {
    /// Every linear layer of the decoder with its HF module path (lm_head excluded).
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            let a = &mut l.self_attn;
            let m = &mut l.mlp;
            for (name, lin) in [
                ("self_attn.q_proj", &mut a.q_proj),
                ("self_attn.k_proj", &mut a.k_proj),
                ("self_attn.v_proj", &mut a.v_proj),
                ("self_attn.o_proj", &mut a.o_proj),
                ("mlp.gate_proj", &mut m.gate_proj),
                ("mlp.up_proj", &mut m.up_proj),
                ("mlp.down_proj", &mut m.down_proj),
            ] {
                out.push((format!("model.layers.{i}.{name}"), lin));
            }
        }
        out
    }

    /// Adds fresh LoRA adapters (A Kaiming-uniform from `seed`, B zero) to the targeted layers; returns how
    /// many. The base weights are frozen.
    pub fn add_lora(&mut self, cfg: &LoraConfig, seed: u64) -> Result<usize> {
        cfg.validate()?;
        if let (true, Targets::Names(names)) = (cfg.use_dora, &cfg.targets) {
            let paths: Vec<String> = self.linears_mut().into_iter().map(|(p, _)| p).collect();
            for name in names {
                if !paths.iter().any(|p| Targets::Names(vec![name.clone()]).matches(p)) {
                    return Err(CoreError::InvalidArgument(format!(
                        "use_dora: target `{name}` is not a linear layer of this model (DoRA adapts linear layers: {})",
                        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
                    )));
                }
            }
        }
        // Checked before anything is allocated: a rank above min(in, out) adds parameters and nothing else.
        for (path, lin) in self.linears_mut() {
            let (out_dim, in_dim) = lin.dims();
            if cfg.targets.matches(&path) && cfg.r > out_dim.min(in_dim) {
                return Err(CoreError::InvalidArgument(format!(
                    "adapter r = {} is larger than the smaller side of {path} ({out_dim} × {in_dim}); use r <= {}",
                    cfg.r,
                    out_dim.min(in_dim)
                )));
            }
        }
        let mut n = 0;
        for (path, lin) in self.linears_mut() {
            if !cfg.targets.matches(&path) {
                continue;
            }
            let (out_dim, in_dim) = lin.dims();
            let dev = lin.device();
            // One stream per module, so adding a target does not shift the others' init.
            let mut rng = Rng(seed ^ fnv1a(&path));
            let bound = 1.0 / (in_dim as f64).sqrt();
            let init: Vec<f32> = (0..cfg.r * in_dim).map(|_| ((rng.uniform() * 2.0 - 1.0) * bound) as f32).collect();
            let a =
                Tensor::f_from_slice(&init)?.f_view([cfg.r, in_dim])?.f_to_device(dev)?.f_set_requires_grad(true)?;
            let b =
                cpu_column_major(Tensor::f_zeros([out_dim, cfg.r], (Kind::Float, dev))?)?.f_set_requires_grad(true)?;
            lin.lora = Some(Lora {
                a,
                b,
                scaling: cfg.scaling(),
                dropout: cfg.dropout,
                training: false,
                enabled: true,
                dropout_state: Default::default(),
                magnitude: None,
            });
            n += 1;
        }
        if n == 0 {
            return Err(CoreError::InvalidArgument(format!(
                "target_modules {:?} match no linear layer of this model",
                cfg.targets
            )));
        }
        if cfg.use_dora {
            self.init_dora()?;
        }
        Ok(n)
    }

    /// Turns adapter dropout on (training) or off (evaluation).
    pub fn set_training(&mut self, training: bool) {
        for (_, lin) in self.linears_mut() {
            if let Some(l) = &mut lin.lora {
                l.training = training;
            }
        }
    }

    /// Restarts every adapter's dropout stream from `seed` (each module mixes in its own path).
    pub fn set_dropout_seed(&mut self, seed: u64) {
        for (path, lin) in self.linears_mut() {
            if let Some(l) = &mut lin.lora {
                l.dropout_state.set(seed ^ fnv1a(&path));
            }
        }
    }

    /// Enables or bypasses every LoRA adapter (disabled = the base model's linears).
    pub fn set_adapters_enabled(&mut self, enabled: bool) {
        for (_, lin) in self.linears_mut() {
            if let Some(l) = &mut lin.lora {
                l.enabled = enabled;
            }
        }
    }

    /// The base model: every adapter bypassed (LoRA, prompt and prefix tuning, as PEFT's `disable_adapter()`) for as
    /// long as the guard lives; dropping it restores them exactly as they were, also when a panic unwinds.
    pub fn adapters_disabled(&mut self) -> AdaptersDisabled<'_> {
        let enabled: Vec<Option<bool>> =
            self.linears_mut().into_iter().map(|(_, lin)| lin.lora.as_ref().map(|l| l.enabled)).collect();
        self.set_adapters_enabled(false);
        let prompt = self.prompt_embeddings.take();
        let prefix = self.prefix_tuning.take();
        AdaptersDisabled { model: self, enabled, prompt, prefix }
    }

    /// Folds every enabled adapter into its base weight (`W += s · B A`, computed in f32 and stored in the
    /// weight's kind) and removes the adapters. An NF4 base is merged into its dequantized weight, which
    /// becomes dense.
    pub fn merge_lora(&mut self) -> Result<usize> {
        let _guard = tch::no_grad_guard();
        let mut n = 0;
        for (_, lin) in self.linears_mut() {
            if let Some(l) = lin.lora.take() {
                if !l.enabled {
                    continue;
                }
                let w = lin.dense_weight()?;
                let merged = match &l.magnitude {
                    Some(m) => crate::dora::merged(&w, &l, m)?.f_to_kind(w.kind())?,
                    None => l.merged(&w)?,
                };
                lin.base = crate::models::decoder::BaseWeight::Dense(merged);
                n += 1;
            }
        }
        Ok(n)
    }

    /// With `on`, holds dense weights for forward passes without gradients (a rollout phase, the model in
    /// evaluation mode): every plain LoRA adapter folded into its base (`W + s·B·A`), every other NF4 base
    /// dequantized — a rollout of LoRA or QLoRA then runs at the speed of the plain model, for the memory of
    /// the dense weights it holds (SmolLM2-135M in f32, all-linear: ~0.4 GB beside its ~0.1 GB of NF4 or
    /// its 0.5 GB of f32 weights); without, frees them. Returns the bytes held.
    /// If holding fails part way (out of memory), everything held so far is dropped.
    pub fn hold_dense(&mut self, on: bool) -> Result<usize> {
        let _guard = tch::no_grad_guard();
        let mut n = 0;
        for (_, lin) in self.linears_mut() {
            match lin.hold_dense(on) {
                Ok(b) => n += b,
                Err(e) => {
                    for (_, lin) in self.linears_mut() {
                        let _ = lin.hold_dense(false);
                    }
                    return Err(e);
                }
            }
        }
        Ok(n)
    }

    /// Stores every decoder linear layer's weight in NF4 (QLoRA); embeddings, norms and lm_head stay dense.
    /// Returns (bytes before, bytes after) of the quantized layers.
    pub fn quantize_nf4(&mut self) -> Result<(usize, usize)> {
        let _guard = tch::no_grad_guard();
        let (mut before, mut after) = (0, 0);
        for (_, lin) in self.linears_mut() {
            let (o, i) = lin.dims();
            if let crate::models::decoder::BaseWeight::Dense(w) = &lin.base {
                before += (o * i) as usize * w.kind().elt_size_in_bytes();
            }
            after += lin.quantize_nf4()?;
        }
        Ok((before, after))
    }

    /// The adapters' tensors under their PEFT keys (`base_model.model.<module>.lora_A.weight`).
    pub fn lora_tensors(&mut self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        for (path, lin) in self.linears_mut() {
            if let Some(l) = &lin.lora {
                out.push((format!("{PREFIX}{path}.lora_A.weight"), l.a.shallow_clone()));
                out.push((format!("{PREFIX}{path}.lora_B.weight"), l.b.shallow_clone()));
                if let Some(m) = &l.magnitude {
                    out.push((format!("{PREFIX}{path}.lora_magnitude_vector"), m.shallow_clone()));
                }
            }
        }
        out
    }
}

/// The override for module `path` in a PEFT `rank_pattern`/`alpha_pattern` (keys are module names or
/// suffixes, as for `target_modules`).
pub(crate) fn pattern_value<T: Copy>(m: &BTreeMap<String, T>, path: &str) -> Option<T> {
    m.iter().find(|(k, _)| path == k.as_str() || path.ends_with(&format!(".{k}"))).map(|(_, v)| *v)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

/// `adapter_config.json` as PEFT writes it for LoRA (the fields PEFT 0.21 needs; unknown ones are ignored
/// when reading).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PeftConfig {
    /// `"LORA"`.
    pub peft_type: String,
    /// `"CAUSAL_LM"` (or `"SEQ_CLS"` for reward models).
    pub task_type: Option<String>,
    /// Rank.
    pub r: i64,
    /// Scaling numerator.
    pub lora_alpha: f64,
    /// Dropout.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Targeted modules: a list of names, or a string (`"all-linear"` or a regex).
    pub target_modules: serde_json::Value,
    /// `"none"` (we neither train nor load biases).
    #[serde(default = "none")]
    pub bias: String,
    /// rsLoRA scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA (`lora_magnitude_vector` tensors beside A and B).
    #[serde(default)]
    pub use_dora: bool,
    /// Per-module rank overrides.
    #[serde(default)]
    pub rank_pattern: BTreeMap<String, i64>,
    /// Per-module alpha overrides.
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    /// Modules saved whole beside the adapter (reward heads).
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// The base model it was trained on.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Whether the adapter is for inference only.
    #[serde(default)]
    pub inference_mode: bool,
    /// Conv1D-style weights (never for our families).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// How LoRA weights were initialised.
    #[serde(default)]
    pub init_lora_weights: serde_json::Value,
    /// PEFT version that wrote it.
    #[serde(default)]
    pub peft_version: Option<String>,
}

fn none() -> String {
    "none".into()
}

/// Saves the model's adapters in PEFT format into `dir` (created). Files are written under temporary
/// names and renamed, so a crash never leaves a half-written adapter.
pub fn save_peft(model: &mut CausalLm, cfg: &LoraConfig, base_model: &str, dir: &Path) -> Result<()> {
    crate::fsx::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
    let tensors = model.lora_tensors();
    if tensors.is_empty() {
        return Err(CoreError::InvalidArgument("the model has no LoRA adapters to save".into()));
    }
    let target_modules = match &cfg.targets {
        Targets::AllLinear => {
            // Like PEFT, write the resolved module names (the suffixes present).
            let mut names: Vec<String> = tensors
                .iter()
                .filter_map(|(k, _)| k.strip_suffix(".lora_A.weight")?.rsplit('.').next().map(str::to_owned))
                .collect();
            names.sort();
            names.dedup();
            serde_json::json!(names)
        }
        Targets::Names(n) => serde_json::json!(n),
    };
    let config = PeftConfig {
        peft_type: "LORA".into(),
        task_type: Some("CAUSAL_LM".into()),
        r: cfg.r,
        lora_alpha: cfg.alpha,
        lora_dropout: cfg.dropout,
        target_modules,
        bias: "none".into(),
        use_rslora: cfg.use_rslora,
        use_dora: cfg.use_dora,
        rank_pattern: BTreeMap::new(),
        alpha_pattern: BTreeMap::new(),
        modules_to_save: None,
        base_model_name_or_path: Some(base_model.to_owned()),
        inference_mode: true,
        fan_in_fan_out: false,
        init_lora_weights: serde_json::json!(true),
        peft_version: Some("0.21.2".into()),
    };
    let json = serde_json::to_string_pretty(&config).expect("config serializes");
    crate::weights::write_atomically(&dir.join("adapter_config.json"), json.as_bytes())?;
    crate::weights::save_safetensors(&dir.join("adapter_model.safetensors"), &tensors)
}

/// Loads a PEFT LoRA adapter from `dir` onto the model (replacing any adapters it has). Every module with
/// `lora_A`/`lora_B` tensors gets one; the scaling comes from the config (with `alpha_pattern`/
/// `rank_pattern` overrides). Returns the config.
pub fn load_peft(model: &mut CausalLm, dir: &Path) -> Result<PeftConfig> {
    let cfg_path = dir.join("adapter_config.json");
    let text = crate::fsx::read_to_string(&cfg_path).map_err(|e| CoreError::io(&cfg_path, e))?;
    let cfg: PeftConfig = serde_json::from_str(&text).map_err(|e| CoreError::config(&cfg_path, e.to_string()))?;
    let unsupported = |what: &str| Err(CoreError::config(&cfg_path, format!("{what} is not supported")));
    if cfg.peft_type != "LORA" {
        return unsupported(&format!("peft_type `{}`", cfg.peft_type));
    }
    if cfg.bias != "none" {
        return unsupported(&format!("bias `{}`", cfg.bias));
    }
    if cfg.fan_in_fan_out {
        return unsupported("fan_in_fan_out");
    }
    if cfg.r <= 0 || !(cfg.lora_alpha > 0.0) {
        return Err(CoreError::config(
            &cfg_path,
            format!("r ({}) and lora_alpha ({}) must be positive", cfg.r, cfg.lora_alpha),
        ));
    }
    let wpath = dir.join("adapter_model.safetensors");
    if !wpath.exists() {
        return Err(CoreError::format(&wpath, "adapter weights not found"));
    }
    let files = WeightFiles::open_files(std::slice::from_ref(&wpath))?;
    let mut used = 0;
    for (path, lin) in model.linears_mut() {
        let dev = lin.device();
        let (ka, kb) = (format!("{PREFIX}{path}.lora_A.weight"), format!("{PREFIX}{path}.lora_B.weight"));
        if !files.contains(&ka) && !files.contains(&kb) {
            lin.lora = None;
            continue;
        }
        let r = pattern_value(&cfg.rank_pattern, &path).unwrap_or(cfg.r);
        let alpha = pattern_value(&cfg.alpha_pattern, &path).unwrap_or(cfg.lora_alpha);
        let (out_dim, in_dim) = lin.dims();
        let a = files.load(&ka, &[r, in_dim], Kind::Float, dev)?.f_set_requires_grad(true)?;
        let b = cpu_column_major(files.load(&kb, &[out_dim, r], Kind::Float, dev)?)?.f_set_requires_grad(true)?;
        let magnitude = if cfg.use_dora {
            let km = format!("{PREFIX}{path}.lora_magnitude_vector");
            used += 1;
            Some(files.load(&km, &[out_dim], Kind::Float, dev)?.f_set_requires_grad(true)?)
        } else {
            None
        };
        lin.lora = Some(Lora {
            a,
            b,
            scaling: scaling(alpha, r, cfg.use_rslora),
            dropout: cfg.lora_dropout,
            training: false,
            enabled: true,
            dropout_state: Default::default(),
            magnitude,
        });
        used += 2;
    }
    let lora_keys = files.names().filter(|k| k.contains(".lora_")).count();
    if used == 0 || used != lora_keys {
        let unknown: Vec<_> = files
            .names()
            .filter(|k| {
                k.contains(".lora_")
                    && !model.linears_mut().iter().any(|(p, _)| k.starts_with(&format!("{PREFIX}{p}.")))
            })
            .take(3)
            .map(str::to_owned)
            .collect();
        return Err(CoreError::format(
            &wpath,
            format!("{lora_keys} LoRA tensors, {used} match this model's layers (e.g. unmatched: {unknown:?})"),
        ));
    }
    Ok(cfg)
}

impl PeftConfig {
    /// The adapter's settings as a [`LoraConfig`] (to train it further and save it again); `dir` names it in
    /// errors. Per-module rank or alpha patterns and regex targets are not carried over.
    pub fn lora_config(&self, dir: &Path) -> Result<LoraConfig> {
        let unsupported = |what: &str| {
            Err(CoreError::config(dir.join("adapter_config.json"), format!("{what}: cannot be trained further here")))
        };
        if !self.rank_pattern.is_empty() || !self.alpha_pattern.is_empty() {
            return unsupported("rank_pattern / alpha_pattern");
        }
        let targets = match &self.target_modules {
            serde_json::Value::String(s) if s == "all-linear" => Targets::AllLinear,
            serde_json::Value::Array(a) => Targets::Names(
                a.iter().map(|v| v.as_str().map(str::to_owned)).collect::<Option<Vec<_>>>().unwrap_or_default(),
            ),
            other => return unsupported(&format!("target_modules {other}")),
        };
        Ok(LoraConfig {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets,
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
        })
    }
}

/// See [`CausalLm::adapters_disabled`]; derefs to the model.
pub struct AdaptersDisabled<'a> {
    model: &'a mut CausalLm,
    enabled: Vec<Option<bool>>,
    prompt: Option<Tensor>,
    prefix: Option<crate::prefix_tuning::PrefixEncoder>,
}

impl std::ops::Deref for AdaptersDisabled<'_> {
    type Target = CausalLm;
    fn deref(&self) -> &CausalLm {
        self.model
    }
}

impl std::ops::DerefMut for AdaptersDisabled<'_> {
    fn deref_mut(&mut self) -> &mut CausalLm {
        self.model
    }
}

impl Drop for AdaptersDisabled<'_> {
    fn drop(&mut self) {
        for ((_, lin), was) in self.model.linears_mut().into_iter().zip(&self.enabled) {
            if let (Some(l), Some(was)) = (&mut lin.lora, was) {
                l.enabled = *was;
            }
        }
        self.model.prompt_embeddings = self.prompt.take();
        self.model.prefix_tuning = self.prefix.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mask written one draw at a time straight from the stream (the layout `fill_dropout_mask` promises).
    fn reference(len: usize, state: u64, keep: f64) -> Vec<u8> {
        let mut rng = Rng(state);
        let threshold = (keep * 65536.0).round() as u64;
        let mut out = Vec::new();
        while out.len() < len {
            let r = rng.next_u64();
            out.extend((0..4).map(|k| u8::from((r >> (16 * k)) & 0xFFFF >= threshold)));
        }
        out
    }

    #[test]
    fn dropout_mask_is_the_stream_whatever_the_threads() {
        let len = 4 * ((1 << 17) + 3);
        let want = reference(len, 42, 0.95);
        for threads in [1, 2, 3, 8] {
            let mut got = vec![7u8; len];
            fill_dropout_mask(&mut got, 42, 0.95, threads);
            assert!(got == want, "{threads} threads");
        }
        let dropped = want.iter().filter(|&&b| b == 1).count() as f64 / len as f64;
        assert!((dropped - 0.05).abs() < 0.002, "dropped fraction {dropped}");
    }
}
