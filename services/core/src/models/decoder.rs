//! The decoder shared by the Llama-layout families (llama, mistral, qwen2, qwen3, gemma3): token embedding,
//! N × (RMSNorm → GQA attention with RoPE → residual → RMSNorm → gated MLP → residual), final RMSNorm, lm_head;
//! what the families add is switched on by [`DecoderConfig`] (q/k norms, Gemma's (1 + w) and sandwich norms,
//! embedding scale, GeGLU, local-window layers). Parameter names equal the HF safetensors keys
//! (`model.layers.0.self_attn.q_proj.weight`). Numerics follow transformers' modeling_llama.py (and
//! modeling_gemma3.py): RMSNorm in f32, rotary tables in f32, attention through libtorch's scaled-dot-product
//! attention.

use tch::{Device, Kind, Tensor};

use super::config::{Activation, DecoderConfig, RopeScaling};
use super::device_map::Placement;
use super::kv_cache::{KvCache, LayerKv};
use crate::error::{CoreError, Result};
use crate::kernels::frozen_linear::frozen_linear;
use crate::lora::Lora;
use crate::nf4::Nf4Weight;
use crate::weights::Weights;

/// The base weight of a linear layer: dense, or NF4 (QLoRA) dequantized on the fly.
#[derive(Debug)]
pub enum BaseWeight {
    /// `[out, in]` in the model's kind.
    Dense(Tensor),
    /// 4-bit NormalFloat storage; dequantized to `kind` in every forward pass.
    Nf4 {
        /// The quantized weight.
        q: Nf4Weight,
        /// Compute kind.
        kind: Kind,
    },
}

/// `y = x Wᵀ + b`, plus a LoRA adapter's contribution when one is attached.
#[derive(Debug)]
pub struct Linear {
    /// The frozen (or, in full fine-tuning, trained) weight.
    pub base: BaseWeight,
    /// `[out]`.
    pub bias: Option<Tensor>,
    /// Optional adapter ([`crate::lora`]).
    pub lora: Option<Lora>,
    /// A dense copy of an NF4 base, held for a phase of forward passes without gradients (rollouts) so
    /// that they do not dequantize every weight on every token ([`Linear::hold_dense`]); with `merged`, the
    /// base with the adapter folded in.
    held: Option<Tensor>,
    /// `held` is `W + s·B·A`: the adapter's contribution is in the one product.
    merged: bool,
}

impl Linear {
    fn load(vb: &Weights, in_dim: i64, out_dim: i64, bias: bool) -> Result<Self> {
        let weight = vb.get(&[out_dim, in_dim], "weight")?;
        let bias = if bias { Some(vb.get(&[out_dim], "bias")?) } else { None };
        Ok(Self { base: BaseWeight::Dense(weight), bias, lora: None, held: None, merged: false })
    }

    /// `(out, in)`.
    pub fn dims(&self) -> (i64, i64) {
        match &self.base {
            BaseWeight::Dense(w) => (w.size()[0], w.size()[1]),
            BaseWeight::Nf4 { q, .. } => (q.shape[0], q.shape[1]),
        }
    }

    /// Device of the base weight.
    pub fn device(&self) -> Device {
        match &self.base {
            BaseWeight::Dense(w) => w.device(),
            BaseWeight::Nf4 { q, .. } => q.packed.device(),
        }
    }

    /// The base weight as a dense `[out, in]` tensor (dequantized for NF4).
    pub fn dense_weight(&self) -> Result<Tensor> {
        match &self.base {
            BaseWeight::Dense(w) => Ok(w.shallow_clone()),
            BaseWeight::Nf4 { q, kind } => q.dequantize(*kind),
        }
    }

    /// Replaces a dense base weight by its NF4 quantization (computing in the weight's kind); the dense
    /// tensor is freed. Returns the bytes now held.
    pub fn quantize_nf4(&mut self) -> Result<usize> {
        if let BaseWeight::Dense(w) = &self.base {
            let kind = w.kind();
            let q = Nf4Weight::quantize(w)?;
            self.base = BaseWeight::Nf4 { q, kind };
        }
        Ok(match &self.base {
            BaseWeight::Nf4 { q, .. } => q.bytes(),
            BaseWeight::Dense(w) => w.numel() * w.kind().elt_size_in_bytes(),
        })
    }

    /// With `on`, keeps dense weights for a phase of forward passes without gradients and without dropout
    /// (rollouts), each the memory of a dense weight in its compute kind: an enabled plain LoRA adapter folded
    /// into its base, `W + s·B·A` (one product per token instead of three, as PEFT's merge; a disabled adapter
    /// — the reference — still uses the base alone), else an NF4 base dequantized once instead of at every
    /// token. Folding needs f32 weights (in bf16 / f16 an update smaller than half a step of W would be lost,
    /// so the rollout would sample from another policy than the one the update sees), and a dense base is
    /// folded only on the CPU: on a GPU the copy would be memory taken from the KV cache, where an NF4 base
    /// holds its dense copy anyway. Without `on`, drops them. Returns the bytes held.
    pub fn hold_dense(&mut self, on: bool) -> Result<usize> {
        let (kind, nf4) = match &self.base {
            BaseWeight::Dense(w) => (w.kind(), false),
            BaseWeight::Nf4 { kind, .. } => (*kind, true),
        };
        let fold = self.lora.as_ref().filter(|l| {
            on && l.enabled
                && !l.training
                && l.magnitude.is_none()
                && kind == Kind::Float
                && (nf4 || self.device() == Device::Cpu)
        });
        let held = match (fold, &self.base, on) {
            (Some(l), _, _) => Some(l.merged(&self.dense_weight()?)?.f_contiguous()?),
            (None, BaseWeight::Nf4 { q, kind }, true) => Some(q.dequantize(*kind)?),
            _ => None,
        };
        self.merged = fold.is_some();
        self.held = held;
        Ok(self.held.as_ref().map_or(0, |w| w.numel() * w.kind().elt_size_in_bytes()))
    }

    /// # Shapes
    /// `x`: `[.., in]` → `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let (true, Some(w), false) = (self.merged, &self.held, x.requires_grad()) {
            if self.lora.as_ref().is_some_and(|l| l.enabled && !l.training) {
                return linear_product(x, w, self.bias.as_ref());
            }
        }
        let y = match &self.base {
            BaseWeight::Dense(w) => linear_product(x, w, self.bias.as_ref())?,
            BaseWeight::Nf4 { .. } if !x.requires_grad() && self.held.is_some() && !self.merged => {
                linear_product(x, self.held.as_ref().expect("held"), self.bias.as_ref())?
            }
            BaseWeight::Nf4 { q, kind } if x.requires_grad() => {
                // Training: the dequantized weight is not kept for the backward pass but dequantized again.
                let shape = x.size();
                let (inp, out) = (*shape.last().unwrap_or(&0), q.shape[0]);
                let (q2, kind) = (q.shallow_clone(), *kind);
                let y = frozen_linear(&x.f_reshape([-1, inp])?, &q.dequantize(kind)?, move || q2.dequantize(kind))?;
                let mut dims = shape;
                *dims.last_mut().unwrap_or(&mut 0) = out;
                let y = y.f_view(dims.as_slice())?;
                match &self.bias {
                    Some(b) => y.f_add(b)?,
                    None => y,
                }
            }
            BaseWeight::Nf4 { q, kind } => linear_product(x, &q.dequantize(*kind)?, self.bias.as_ref())?,
        };
        match &self.lora {
            Some(l) if l.enabled && l.magnitude.is_some() => {
                let w = match (&self.base, &self.held) {
                    (BaseWeight::Nf4 { .. }, Some(h)) if !x.requires_grad() => h.shallow_clone(),
                    _ => self.dense_weight()?,
                };
                crate::dora::forward(l, l.magnitude.as_ref().expect("dora"), x, y, &w, self.bias.as_ref())
            }
            // Same kind (f32 training): the adapter's output is added inside one GEMM, `y + u Bᵀ`, instead
            // of being written out, then read again by the add.
            Some(l) if l.enabled && x.kind() == l.b.kind() => {
                let u = l.down(x)?;
                let shape = y.size();
                let out = *shape.last().unwrap_or(&0);
                let r = l.b.size()[1];
                Ok(y.f_view([-1, out])?.f_addmm(&u.f_view([-1, r])?, &l.b.f_tr()?)?.f_view(shape.as_slice())?)
            }
            Some(l) if l.enabled => Ok(y.f_add(&l.delta(x)?)?),
            _ => Ok(y),
        }
    }
}

/// Most rows for which [`linear_product`] computes `(W xᵀ)ᵀ` on the CPU.
const FEW_ROWS: i64 = 64;

/// `x Wᵀ + b` for a row-major `w` `[out, in]`. With few rows of f32 on the CPU (decoding steps), the product
/// is computed as `(W xᵀ)ᵀ`, which MKL runs faster than `x Wᵀ` (it streams W instead of packing it first).
/// One SmolLM2-135M decoding step (every linear and lm_head, ~70 cached positions) on a 2-core AMD EPYC, the
/// three ways interleaved in one process, best of 3, ms: 64 rows 154 / 165 / 174 (`(W xᵀ)ᵀ` / `x Wᵀ` with W
/// row-major / `x Wᵀ` with W column-major, the layout base weights had before), 16 rows 73 / 73 / 79, 8 rows
/// 52 / 63 / 66, 4 rows 25 / 67 / 68, 2 rows 22 / 72 / 49, 1 row 19 / 38 / 30. One row is padded to two
/// (MKL's gemv, single-threaded, is slower than the two-row product). Gradients flow as through `linear`.
///
/// # Shapes
/// `x`: `[.., in]` → `[.., out]`.
pub fn linear_product(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let shape = x.size();
    let inp = *shape.last().unwrap_or(&0);
    let rows = if inp > 0 { x.numel() as i64 / inp } else { 0 };
    let cpu_f32 = x.device() == Device::Cpu && x.kind() == Kind::Float && w.kind() == Kind::Float;
    if !(cpu_f32 && (1..=FEW_ROWS).contains(&rows) && w.dim() == 2 && w.is_contiguous()) {
        return Ok(x.f_linear(w, bias)?);
    }
    let x2 = x.f_reshape([rows, inp])?;
    let y = if rows == 1 {
        w.f_mm(&x2.f_expand([2, inp], false)?.f_contiguous()?.f_tr()?)?.f_narrow(1, 0, 1)?
    } else {
        w.f_mm(&x2.f_tr()?)?
    };
    let mut y = y.f_tr()?.f_contiguous()?;
    if let Some(b) = bias {
        y = y.f_add(b)?;
    }
    let mut dims = shape;
    *dims.last_mut().unwrap_or(&mut 0) = w.size()[0];
    Ok(y.f_view(dims.as_slice())?)
}

/// A 2-D f32 CPU tensor stored column-major: same logical shape and values, only the strides change
/// (`w.t().contiguous().t()`); other kinds and devices are returned as they are (row-major is the faster
/// layout there). On the 2-core x86 machines we target, MKL's f32 products are faster that way for LoRA's
/// B `[out, r]` in training: the forward `y + u Bᵀ`, the input gradient `g B`, and B's gradient, which
/// autograd then computes as `uᵀ g` (`[r, n] × [n, out]`) instead of `gᵀ u` (2.4× slower for out = 1536,
/// n = 1024, r = 8). Base weights stay row-major for [`linear_product`].
///
/// Anything that serialises such tensors must call `.contiguous()` first (as `weights::save_safetensors`
/// does).
pub fn cpu_column_major(w: Tensor) -> Result<Tensor> {
    if w.device() == Device::Cpu && w.kind() == Kind::Float && w.dim() == 2 {
        Ok(w.f_tr()?.f_contiguous()?.f_tr()?)
    } else {
        Ok(w)
    }
}

/// Root-mean-square layer norm, computed in f32 like transformers' `LlamaRMSNorm`, or, with an offset
/// (Gemma), `x̂ · (1 + w)` like `Gemma3RMSNorm`.
#[derive(Debug)]
pub struct RmsNorm {
    /// `[hidden]` (for Gemma: the offset from one).
    pub weight: Tensor,
    eps: f64,
    offset: bool,
}

impl RmsNorm {
    fn load(vb: &Weights, dim: i64, cfg: &DecoderConfig) -> Result<Self> {
        Ok(Self { weight: vb.get(&[dim], "weight")?, eps: cfg.rms_norm_eps, offset: cfg.norm_offset })
    }

    /// # Shapes
    /// `x`: `[.., hidden]` → same.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let kind = x.kind();
        let scale = if self.offset {
            self.weight.f_to_kind(Kind::Float)?.f_add_scalar(1.0)?
        } else {
            self.weight.shallow_clone()
        };
        if kind == Kind::Float {
            // libtorch's fused op computes the same f32 formula in one kernel instead of six.
            return Ok(x.f_rms_norm(scale.size().as_slice(), Some(&scale), self.eps)?);
        }
        // Half precision: normalise in f32, then round to the input kind and scale (Llama's order), or scale
        // in f32 and round (Gemma's).
        let h = x.f_to_kind(Kind::Float)?;
        let var = h.f_pow_tensor_scalar(2)?.f_mean_dim(-1, true, Kind::Float)?;
        let h = h.f_mul(&var.f_add_scalar(self.eps)?.f_rsqrt()?)?;
        if self.offset {
            return Ok(h.f_mul(&scale)?.f_to_kind(kind)?);
        }
        Ok(self.weight.f_mul(&h.f_to_kind(kind)?)?)
    }
}

/// Inverse rotary frequencies `[head_dim / 2]` (f32), with the configured rescaling
/// (transformers' `_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`,
/// `_compute_llama3_parameters`).
pub fn inv_freq(cfg: &DecoderConfig) -> Vec<f32> {
    let d = cfg.head_dim as usize;
    let base: Vec<f32> = (0..d).step_by(2).map(|i| 1.0 / (cfg.rope_theta.powf(i as f64 / d as f64)) as f32).collect();
    match cfg.rope_scaling {
        RopeScaling::None => base,
        RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings: old } => {
            let low_wavelen = old / low_freq_factor;
            let high_wavelen = old / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f as f64;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        (f as f64 / factor) as f32
                    } else {
                        let smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * f as f64 / factor + smooth * f as f64) as f32
                    }
                })
                .collect()
        }
    }
}

/// Rotary position tables for given positions.
pub(crate) struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// # Shapes
    /// `inv_freq`: `[head_dim/2]` f32, `positions`: `[b, s]` → cos/sin `[b, 1, s, head_dim]` in `kind`.
    fn new(inv_freq: &Tensor, positions: &Tensor, kind: Kind) -> Result<Self> {
        let freqs = positions.f_to_kind(Kind::Float)?.f_unsqueeze(-1)?.f_mul(inv_freq)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?.f_unsqueeze(1)?;
        Ok(Self { cos: emb.f_cos()?.f_to_kind(kind)?, sin: emb.f_sin()?.f_to_kind(kind)? })
    }

    /// # Shapes
    /// `x`: `[b, heads, s, head_dim]` → same.
    fn apply(&self, x: &Tensor) -> Result<Tensor> {
        let half = x.size()[3] / 2;
        let x1 = x.f_narrow(3, 0, half)?;
        let x2 = x.f_narrow(3, half, half)?;
        let rotated = Tensor::f_cat(&[&x2.f_neg()?, &x1], 3)?;
        Ok(x.f_mul(&self.cos)?.f_add(&rotated.f_mul(&self.sin)?)?)
    }
}

/// Grouped-query self-attention.
#[derive(Debug)]
pub struct Attention {
    /// Query projection `[heads·head_dim, hidden]`.
    pub q_proj: Linear,
    /// Key projection `[kv_heads·head_dim, hidden]`.
    pub k_proj: Linear,
    /// Value projection `[kv_heads·head_dim, hidden]`.
    pub v_proj: Linear,
    /// Output projection `[hidden, heads·head_dim]`.
    pub o_proj: Linear,
    /// RMSNorm `[head_dim]` over each head's queries and keys before RoPE (Qwen3), when the family has it.
    pub qk_norm: Option<(RmsNorm, RmsNorm)>,
    n_heads: i64,
    n_kv: i64,
    head_dim: i64,
    scale: Option<f64>,
}

impl Attention {
    fn load(vb: &Weights, cfg: &DecoderConfig) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        Ok(Self {
            q_proj: Linear::load(&vb.pp("q_proj"), h, cfg.num_heads * d, cfg.qkv_bias)?,
            k_proj: Linear::load(&vb.pp("k_proj"), h, cfg.num_kv_heads * d, cfg.qkv_bias)?,
            v_proj: Linear::load(&vb.pp("v_proj"), h, cfg.num_kv_heads * d, cfg.qkv_bias)?,
            o_proj: Linear::load(&vb.pp("o_proj"), cfg.num_heads * d, h, cfg.o_bias)?,
            qk_norm: if cfg.qk_norm {
                Some((RmsNorm::load(&vb.pp("q_norm"), d, cfg)?, RmsNorm::load(&vb.pp("k_norm"), d, cfg)?))
            } else {
                None
            },
            n_heads: cfg.num_heads,
            n_kv: cfg.num_kv_heads,
            head_dim: d,
            scale: cfg.attn_scale,
        })
    }

    /// With a cache, the new keys/values are written at positions `past..past+s` of the layer's buffers
    /// and attention runs over all `past + s` of them.
    ///
    /// # Shapes
    /// `x`: `[b, s, hidden]`; `mask`: `None` (plain causal, or all keys when `s == 1`) or bool
    /// `[b, 1, s, past + s]` (true = attend) → `[b, s, hidden]`.
    fn forward(
        &self,
        x: &Tensor,
        rot: &Rotary,
        mask: Option<&Tensor>,
        cache: Option<(&mut LayerKv, i64)>,
        prefix: Option<&(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let (b, s) = (x.size()[0], x.size()[1]);
        let split = |t: Tensor, n: i64, norm: Option<&RmsNorm>| -> Result<Tensor> {
            let t = t.f_view([b, s, n, self.head_dim])?;
            let t = match norm {
                Some(norm) => norm.forward(&t)?,
                None => t,
            };
            Ok(t.f_transpose(1, 2)?)
        };
        let (qn, kn) = match &self.qk_norm {
            Some((q, k)) => (Some(q), Some(k)),
            None => (None, None),
        };
        let q = rot.apply(&split(self.q_proj.forward(x)?, self.n_heads, qn)?)?;
        let mut k = rot.apply(&split(self.k_proj.forward(x)?, self.n_kv, kn)?)?;
        let mut v = split(self.v_proj.forward(x)?, self.n_kv, None)?;
        let mut past = 0;
        if let Some((kv, p)) = cache {
            past = p;
            kv.k.f_narrow(2, p, s)?.f_copy_(&k)?;
            kv.v.f_narrow(2, p, s)?.f_copy_(&v)?;
            k = kv.k.f_narrow(2, 0, p + s)?;
            v = kv.v.f_narrow(2, 0, p + s)?;
        } else if let Some((pk, pv)) = prefix {
            // Prefix tuning without a cache: the prefix's keys and values come first.
            past = pk.size()[2];
            k = Tensor::f_cat(&[pk, &k], 2)?;
            v = Tensor::f_cat(&[pv, &v], 2)?;
        }
        let gqa = self.n_heads != self.n_kv;
        // Without a mask: causal for a fresh sequence; a single new token may see every cached key.
        let is_causal = mask.is_none() && past == 0 && s > 1;
        let y = if gqa && s == 1 && past > 0 {
            // One new token per row: the query heads sharing a key/value head attend as that head's rows, so
            // each cached key and value is read once per group instead of once per query head.
            let groups = self.n_heads / self.n_kv;
            let q = q.f_reshape([b, self.n_kv, groups, self.head_dim])?;
            let y = Tensor::f_scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, self.scale, false)?;
            y.f_reshape([b, self.n_heads, 1, self.head_dim])?
        } else {
            Tensor::f_scaled_dot_product_attention(&q, &k, &v, mask, 0.0, is_causal, self.scale, gqa)?
        };
        let y = y.f_transpose(1, 2)?.f_reshape([b, s, self.n_heads * self.head_dim])?;
        self.o_proj.forward(&y)
    }
}

/// SwiGLU MLP: `down(silu(gate(x)) · up(x))`.
#[derive(Debug)]
pub struct Mlp {
    /// `[intermediate, hidden]`.
    pub gate_proj: Linear,
    /// `[intermediate, hidden]`.
    pub up_proj: Linear,
    /// `[hidden, intermediate]`.
    pub down_proj: Linear,
    act: Activation,
}

impl Mlp {
    fn load(vb: &Weights, cfg: &DecoderConfig) -> Result<Self> {
        let (h, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate_proj: Linear::load(&vb.pp("gate_proj"), h, i, b)?,
            up_proj: Linear::load(&vb.pp("up_proj"), h, i, b)?,
            down_proj: Linear::load(&vb.pp("down_proj"), i, h, b)?,
            act: cfg.activation,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let g = self.gate_proj.forward(x)?;
        let g = match self.act {
            Activation::Silu => g.f_silu()?,
            Activation::GeluTanh => g.f_gelu("tanh")?,
        };
        self.down_proj.forward(&g.f_mul(&self.up_proj.forward(x)?)?)
    }
}

/// One pre-norm decoder layer.
#[derive(Debug)]
pub struct DecoderLayer {
    /// Norm before attention.
    pub input_layernorm: RmsNorm,
    /// Attention.
    pub self_attn: Attention,
    /// Norm before the MLP (Gemma: of the attention's output, before the residual add).
    pub post_attention_layernorm: RmsNorm,
    /// MLP.
    pub mlp: Mlp,
    /// Gemma's `pre_feedforward_layernorm` (the MLP's input) and `post_feedforward_layernorm` (its output).
    pub feedforward_norms: Option<(RmsNorm, RmsNorm)>,
    /// Attends through the local window with the local rotary tables ([`crate::models::LocalAttention`]).
    pub local: bool,
}

impl DecoderLayer {
    fn load(vb: &Weights, cfg: &DecoderConfig, index: usize) -> Result<Self> {
        Ok(Self {
            input_layernorm: RmsNorm::load(&vb.pp("input_layernorm"), cfg.hidden_size, cfg)?,
            self_attn: Attention::load(&vb.pp("self_attn"), cfg)?,
            post_attention_layernorm: RmsNorm::load(&vb.pp("post_attention_layernorm"), cfg.hidden_size, cfg)?,
            mlp: Mlp::load(&vb.pp("mlp"), cfg)?,
            feedforward_norms: if cfg.sandwich_norms {
                Some((
                    RmsNorm::load(&vb.pp("pre_feedforward_layernorm"), cfg.hidden_size, cfg)?,
                    RmsNorm::load(&vb.pp("post_feedforward_layernorm"), cfg.hidden_size, cfg)?,
                ))
            } else {
                None
            },
            local: cfg.local_attention.as_ref().is_some_and(|l| l.layers.get(index).copied().unwrap_or(false)),
        })
    }

    /// Device of the layer's weights.
    pub fn device(&self) -> Device {
        self.input_layernorm.weight.device()
    }

    fn linears(&self) -> [&Linear; 7] {
        let (a, m) = (&self.self_attn, &self.mlp);
        [&a.q_proj, &a.k_proj, &a.v_proj, &a.o_proj, &m.gate_proj, &m.up_proj, &m.down_proj]
    }

    /// The dropout stream positions of this layer's adapters (to replay the same masks on recompute).
    fn dropout_states(&self) -> Vec<u64> {
        self.linears().iter().map(|l| l.lora.as_ref().map_or(0, |a| a.dropout_state.get())).collect()
    }

    fn set_dropout_states(&self, states: &[u64]) {
        for (l, &s) in self.linears().iter().zip(states) {
            if let Some(a) = &l.lora {
                a.dropout_state.set(s);
            }
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        rot: &Rotary,
        mask: Option<&Tensor>,
        cache: Option<(&mut LayerKv, i64)>,
        prefix: Option<&(Tensor, Tensor)>,
    ) -> Result<Tensor> {
        let a = self.self_attn.forward(&self.input_layernorm.forward(x)?, rot, mask, cache, prefix)?;
        match &self.feedforward_norms {
            None => {
                let h = x.f_add(&a)?;
                Ok(h.f_add(&self.mlp.forward(&self.post_attention_layernorm.forward(&h)?)?)?)
            }
            Some((pre, post)) => {
                let h = x.f_add(&self.post_attention_layernorm.forward(&a)?)?;
                Ok(h.f_add(&post.forward(&self.mlp.forward(&pre.forward(&h)?)?)?)?)
            }
        }
    }
}

/// A decoder-only causal language model in the Llama layout.
#[derive(Debug)]
pub struct CausalLm {
    /// The normalised config.
    pub cfg: DecoderConfig,
    /// `model.embed_tokens.weight` `[vocab, hidden]`.
    pub embed_tokens: Tensor,
    /// `model.layers.*`.
    pub layers: Vec<DecoderLayer>,
    /// `model.norm`.
    pub norm: RmsNorm,
    /// `lm_head.weight` `[vocab, hidden]` (a view of the embedding when tied).
    pub lm_head: Tensor,
    /// Prompt tuning: virtual token embeddings `[n, hidden]` (f32) prepended to every sequence
    /// ([`crate::prompt_tuning`]). Outputs never include their positions.
    pub prompt_embeddings: Option<Tensor>,
    /// Prefix tuning: trainable key/value prefixes of every layer ([`crate::prefix_tuning`]).
    pub prefix_tuning: Option<crate::prefix_tuning::PrefixEncoder>,
    /// Sequence-score head `score.weight` `[1, hidden]` (f32) of a reward model ([`crate::train::reward`]).
    pub score: Option<Tensor>,
    inv_freq: Tensor,
    /// The local layers' inverse frequencies (Gemma 3).
    local_inv_freq: Option<Tensor>,
    /// Loaded with a device map: activations move between the parts' devices.
    split: bool,
}

impl CausalLm {
    /// Builds the model from HF-named weights.
    pub fn load(vb: &Weights, cfg: DecoderConfig) -> Result<Self> {
        Self::load_placed(vb, cfg, None)
    }

    /// [`Self::load`] with each part on the device `placement` gives it ([`super::device_map`]; `None`: all
    /// on `vb.device`).
    pub fn load_placed(vb: &Weights, cfg: DecoderConfig, placement: Option<&Placement>) -> Result<Self> {
        let at = |d: Option<Device>| vb.on(d.unwrap_or(vb.device));
        let m = at(placement.map(|p| p.embed)).pp("model");
        let embed_tokens = m.pp("embed_tokens").get(&[cfg.vocab_size, cfg.hidden_size], "weight")?;
        let layers = (0..cfg.num_layers)
            .map(|i| {
                let vb = at(placement.map(|p| p.layers[i as usize])).pp("model.layers").pp(i);
                DecoderLayer::load(&vb, &cfg, i as usize)
            })
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(&at(placement.map(|p| p.norm)).pp("model.norm"), cfg.hidden_size, &cfg)?;
        // Tied checkpoints normally omit lm_head.weight; when one stores it anyway it is the same matrix.
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.shallow_clone()
        } else {
            at(placement.map(|p| p.head)).pp("lm_head").get(&[cfg.vocab_size, cfg.hidden_size], "weight")?
        };
        let vb = &at(placement.map(|p| p.embed));
        let local_inv_freq = match &cfg.local_attention {
            Some(l) => {
                let local = DecoderConfig { rope_theta: l.rope_theta, rope_scaling: RopeScaling::None, ..cfg.clone() };
                Some(Tensor::f_from_slice(&inv_freq(&local))?.f_to_device(vb.device)?)
            }
            None => None,
        };
        let inv_freq = Tensor::f_from_slice(&inv_freq(&cfg))?.f_to_device(vb.device)?;
        Ok(Self {
            cfg,
            embed_tokens,
            layers,
            norm,
            lm_head,
            prompt_embeddings: None,
            prefix_tuning: None,
            score: None,
            inv_freq,
            local_inv_freq,
            split: placement.is_some(),
        })
    }

    /// Device of the outputs (hidden states, logits; the head's) and, unless a device map splits the model,
    /// of every weight. Inputs may be anywhere.
    pub fn device(&self) -> Device {
        self.lm_head.device()
    }

    /// Device of the embedding (where a forward pass starts).
    fn input_device(&self) -> Device {
        self.embed_tokens.device()
    }

    /// With a device map: `x` on the device of `to`'s weights (a no-op on the same device); without, `x`.
    fn moved(&self, x: Tensor, to: &Tensor) -> Result<Tensor> {
        Ok(if self.split { x.f_to_device(to.device())? } else { x })
    }

    /// Floating-point kind of the weights.
    pub fn kind(&self) -> Kind {
        self.embed_tokens.kind()
    }

    /// Final hidden states (after the last norm), before lm_head.
    ///
    /// `attention_mask` (1 = real token, 0 = padding) makes padded batches give the same states for the
    /// real tokens as unpadded rows. `position_ids` default to the running count of real tokens
    /// (`cumsum(mask) − 1`, as HF `generate` does), or `0..s` without a mask.
    ///
    /// # Shapes
    /// `input_ids`: `[b, s]` i64; `attention_mask`: `[b, s]`; `position_ids`: `[b, s]` → `[b, s, hidden]`.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.forward_hidden_cached(input_ids, attention_mask, position_ids, None)
    }

    /// [`Self::forward_hidden`] continuing from a [`KvCache`]: `input_ids` are the `s` tokens that follow
    /// the `cache.len()` already cached ones, and the cache grows by `s`.
    ///
    /// # Shapes
    /// `input_ids`: `[b, s]`; `attention_mask`: `[b, past + s]` (the whole sequence so far);
    /// `position_ids`: `[b, s]` → `[b, s, hidden]`.
    pub fn forward_hidden_cached(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
    ) -> Result<Tensor> {
        let size = input_ids.size();
        let [b, s] = size[..] else {
            return Err(CoreError::InvalidArgument(format!("input_ids must be [batch, seq], got {size:?}")));
        };
        if s == 0 {
            return Err(CoreError::InvalidArgument("input_ids has no tokens".into()));
        }
        let past = cache.as_ref().map_or(0, |c| c.len);
        let Prepared { mut h, tables, prefix, past, kv_table } =
            self.prepare(input_ids, attention_mask, position_ids, past)?;
        if let Some(c) = &cache {
            if c.batch != b || past + prefix + s > c.capacity {
                return Err(CoreError::InvalidArgument(format!(
                    "KV cache holds {} rows × {} positions ({} used); got {b} rows × {s} new tokens",
                    c.batch, c.capacity, c.len
                )));
            }
        }
        for (i, layer) in self.layers.iter().enumerate() {
            let pkv = self.prefix_kv(kv_table.as_ref(), i, b)?;
            if let (Some(c), Some((pk, pv))) = (cache.as_deref_mut(), &pkv) {
                // A fresh pass with prefix tuning: the prefix fills the cache's first positions.
                let n = pk.size()[2];
                c.layers[i].k.f_narrow(2, 0, n)?.f_copy_(pk)?;
                c.layers[i].v.f_narrow(2, 0, n)?.f_copy_(pv)?;
            }
            let kv = cache.as_deref_mut().map(|c| (&mut c.layers[i], past));
            let on = self.split.then(|| tables.on(layer.device())).transpose()?;
            let (rot, mask) = on.as_ref().unwrap_or(&tables).of(layer);
            h = layer.forward(&self.moved(h, &layer.input_layernorm.weight)?, rot, mask.as_ref(), kv, pkv.as_ref())?;
        }
        if let Some(c) = cache {
            c.len = past + prefix + s;
        }
        let h = self.norm.forward(&self.moved(h, &self.norm.weight)?.f_narrow(1, prefix, s)?)?;
        self.moved(h, &self.lm_head)
    }

    /// Forward and backward with per-layer recomputation (gradient checkpointing): the layers run once
    /// without building a graph, keeping only each layer's input; `loss_backward` gets the final hidden
    /// states (attached to a leaf) and must backpropagate its loss into them; then each layer, last to first,
    /// is recomputed with gradients and backpropagated alone. Peak memory holds one layer's graph instead of
    /// all of them, at the cost of one more forward pass. Adapter dropout replays the same masks. Only
    /// adapters (not embeddings or norms) may be trainable.
    ///
    /// # Shapes
    /// `input_ids`, `attention_mask`, `position_ids`: `[b, s]`; `loss_backward` receives `[b, s, hidden]`.
    pub fn forward_backward_checkpointed<T>(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        loss_backward: impl FnOnce(&Tensor) -> Result<T>,
    ) -> Result<T> {
        // Built with gradients: a prompt-tuning prefix must receive them through layer 0's input.
        let Prepared { mut h, tables, prefix, kv_table, .. } =
            self.prepare(input_ids, attention_mask, position_ids, 0)?;
        let (b, s) = (input_ids.size()[0], input_ids.size()[1]);
        // Prefix tuning: the layers read the table through a leaf whose gradient gathers over the per-layer
        // backward passes; it goes through the table's own graph (the projection) once at the end.
        let kv_leaf = kv_table.as_ref().map(|t| t.f_detach()?.f_set_requires_grad(t.requires_grad())).transpose()?;
        let mut inputs = Vec::with_capacity(self.layers.len());
        for (i, layer) in self.layers.iter().enumerate() {
            let states = layer.dropout_states();
            let on = self.split.then(|| tables.on(layer.device())).transpose()?;
            let (rot, mask) = on.as_ref().unwrap_or(&tables).of(layer);
            let pkv = self.prefix_kv(kv_leaf.as_ref(), i, b)?;
            h = self.moved(h, &layer.input_layernorm.weight)?;
            let out = tch::no_grad(|| layer.forward(&h, rot, mask.as_ref(), None, pkv.as_ref()))?;
            inputs.push((std::mem::replace(&mut h, out), states));
        }
        let leaf = h.f_detach()?.f_set_requires_grad(true)?;
        let last = self.norm.forward(&self.moved(leaf.shallow_clone(), &self.norm.weight)?.f_narrow(1, prefix, s)?)?;
        let result = loss_backward(&self.moved(last, &self.lm_head)?)?;
        let mut grad = leaf.grad();
        if !grad.defined() {
            return Ok(result);
        }
        for (i, layer) in self.layers.iter().enumerate().rev() {
            let (x, states) = inputs.pop().expect("one input per layer");
            layer.set_dropout_states(&states);
            let x = if i > 0 { x.f_detach()?.f_set_requires_grad(true)? } else { x };
            let on = self.split.then(|| tables.on(layer.device())).transpose()?;
            let (rot, mask) = on.as_ref().unwrap_or(&tables).of(layer);
            let pkv = self.prefix_kv(kv_leaf.as_ref(), i, b)?;
            let out = layer.forward(&x, rot, mask.as_ref(), None, pkv.as_ref())?;
            grad = self.moved(grad, &out)?;
            out.f_mul(&grad)?.f_sum(Kind::Float)?.f_backward()?;
            if i > 0 {
                grad = x.grad();
            }
        }
        if let (Some(table), Some(leaf)) = (&kv_table, &kv_leaf) {
            let g = leaf.grad();
            if table.requires_grad() && g.defined() {
                table.f_mul(&g)?.f_sum(Kind::Float)?.f_backward()?;
            }
        }
        Ok(result)
    }

    /// An empty cache for `batch` sequences of up to `capacity` tokens (plus any prompt-tuning prefix), in
    /// the model's kind and device.
    pub fn new_cache(&self, batch: i64, capacity: i64) -> Result<KvCache> {
        let capacity = capacity
            + self.prompt_embeddings.as_ref().map_or(0, |p| p.size()[0])
            + self.prefix_tuning.as_ref().map_or(0, |p| p.len());
        let shape = [batch, self.cfg.num_kv_heads, capacity, self.cfg.head_dim];
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let opts = (self.kind(), l.device());
                Ok(LayerKv { k: Tensor::f_zeros(shape, opts)?, v: Tensor::f_zeros(shape, opts)? })
            })
            .collect::<Result<_>>()?;
        Ok(KvCache { layers, len: 0, batch, capacity })
    }

    /// Logits from hidden states, in f32.
    ///
    /// # Shapes
    /// `[.., hidden]` → `[.., vocab]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(linear_product(hidden, &self.lm_head, None)?.f_to_kind(Kind::Float)?)
    }

    /// Logits for every position.
    ///
    /// # Shapes
    /// as [`Self::forward_hidden`] → `[b, s, vocab]` in the model's kind.
    pub fn forward(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
    ) -> Result<Tensor> {
        let h = self.forward_hidden(input_ids, attention_mask, position_ids)?;
        linear_product(&h, &self.lm_head, None)
    }

    /// Device ids, rotary tables and attention mask for a forward pass of `s` tokens after `past` cached ones.
    ///
    /// `attention_mask` holds 0 for padding and a positive value for real tokens; when values above 1 occur
    /// it is a **segment** mask (packed sequences): tokens attend only to earlier tokens of the same segment,
    /// and `position_ids` (restarting at 0 in every segment) must be given.
    ///
    /// With prompt tuning, the virtual tokens are prepended on a fresh pass (`past == 0`; `prefix` says
    /// how many) and count as cached positions afterwards; the caller's masks never include them.
    fn prepare(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
        position_ids: Option<&Tensor>,
        past: i64,
    ) -> Result<Prepared> {
        let (b, s) = input_ids.size2()?;
        let dev = self.input_device();
        let n_virtual = self.prompt_embeddings.as_ref().map_or(0, |p| p.size()[0]);
        let prefix = if past == 0 { n_virtual } else { 0 };
        // Prefix tuning: the prefix's positions count as cached ones, also on a fresh pass.
        let n_kv = self.prefix_tuning.as_ref().map_or(0, |p| p.len());
        let kv_table = match &self.prefix_tuning {
            Some(p) if past == 0 => Some(p.table()?),
            _ => None,
        };
        let past = if past == 0 { n_kv } else { past };
        let caller_past = past - (n_virtual - prefix) - n_kv;
        let ids = input_ids.f_to_device(dev)?;
        let mut raw = attention_mask.map(|m| m.f_to_device(dev)?.f_to_kind(Kind::Int64)).transpose()?;
        if let Some(m) = &raw {
            if m.size() != [b, caller_past + s] {
                return Err(CoreError::InvalidArgument(format!(
                    "attention_mask must be {:?}, got {:?}",
                    [b, caller_past + s],
                    m.size()
                )));
            }
        }
        let segments = match &raw {
            Some(m) if m.f_max()?.f_int64_value(&[])? > 1 => Some(m.shallow_clone()),
            _ => None,
        };
        if segments.is_some() && (past > 0 || position_ids.is_none() || n_virtual > 0) {
            return Err(CoreError::InvalidArgument(
                "a segment (packing) mask needs explicit position_ids, no KV cache and no prompt or prefix tuning"
                    .into(),
            ));
        }
        if (n_virtual > 0 || n_kv > 0) && position_ids.is_some() {
            return Err(CoreError::InvalidArgument(
                "explicit position_ids cannot be combined with prompt or prefix tuning".into(),
            ));
        }
        if n_virtual + n_kv > 0 {
            let ones = n_virtual + n_kv;
            raw = raw.map(|m| Tensor::f_cat(&[Tensor::f_ones([b, ones], (Kind::Int64, dev))?, m], 1)).transpose()?;
        }
        let (s_eff, total) = (prefix + s, past + prefix + s);
        let pad = raw.as_ref().map(|m| m.f_ne(0)).transpose()?;
        let positions = match (position_ids, &pad) {
            (Some(p), _) => p.f_to_device(dev)?,
            (None, Some(m)) => m
                .f_to_kind(Kind::Int64)?
                .f_cumsum(1, Kind::Int64)?
                .f_sub_scalar(1)?
                .f_clamp_min(0)?
                .f_narrow(1, past, s_eff)?,
            (None, None) => {
                Tensor::f_arange_start(past, total, (Kind::Int64, dev))?.f_unsqueeze(0)?.f_expand([b, s_eff], false)?
            }
        };
        let rot = Rotary::new(&self.inv_freq, &positions, self.kind())?;
        let mask = self.attention_mask(pad.as_ref(), segments.as_ref(), b, s_eff, past, self.cfg.sliding_window)?;
        let local = match (&self.local_inv_freq, &self.cfg.local_attention) {
            (Some(f), Some(l)) => Some((
                Rotary::new(f, &positions, self.kind())?,
                self.attention_mask(pad.as_ref(), segments.as_ref(), b, s_eff, past, Some(l.window))?,
            )),
            _ => None,
        };
        let mut h = Tensor::f_embedding(&self.embed_tokens, &ids, -1, false, false)?;
        if let Some(scale) = self.cfg.embed_scale {
            // transformers multiplies by the scale rounded to the weights' kind.
            let scale = Tensor::f_from_slice(&[scale as f32])?.f_to_kind(h.kind())?.f_to_device(dev)?;
            h = h.f_mul(&scale)?;
        }
        if prefix > 0 {
            let p = self.prompt_embeddings.as_ref().expect("n_virtual > 0").f_to_kind(h.kind())?.f_to_device(dev)?;
            h = Tensor::f_cat(&[p.f_unsqueeze(0)?.f_expand([b, prefix, p.size()[1]], false)?, h], 1)?;
        }
        Ok(Prepared { h, tables: LayerTables { global: (rot, mask), local }, prefix, past, kv_table })
    }

    /// Layer `i`'s prefix keys and values for a batch of `b` from a prefix-tuning table.
    fn prefix_kv(&self, table: Option<&Tensor>, i: usize, b: i64) -> Result<Option<(Tensor, Tensor)>> {
        let Some(t) = table else { return Ok(None) };
        let (k, v) =
            crate::prefix_tuning::layer_kv(t, i as i64, b, self.cfg.num_kv_heads, self.cfg.head_dim, self.kind())?;
        let w = &self.layers[i].input_layernorm.weight;
        Ok(Some((self.moved(k, w)?, self.moved(v, w)?)))
    }

    /// The boolean `[b, 1, s, past + s]` mask (true = attend) for padding, segments, sliding window, or new
    /// tokens after a cache, or `None` when plain causal attention (or, for one new token, attending to
    /// everything cached) suffices. Every query may attend to itself, so rows of padding tokens are never
    /// empty (an empty row would give NaN and, through the value matmul, poison real rows).
    fn attention_mask(
        &self,
        pad: Option<&Tensor>,
        segments: Option<&Tensor>,
        b: i64,
        s: i64,
        past: i64,
        window: Option<i64>,
    ) -> Result<Option<Tensor>> {
        let total = past + s;
        let window_bites = window.is_some_and(|w| w < total);
        if pad.is_none() && !window_bites && (past == 0 || s == 1) {
            return Ok(None);
        }
        let dev = self.input_device();
        let q = Tensor::f_arange_start(past, total, (Kind::Int64, dev))?.f_unsqueeze(1)?;
        let k = Tensor::f_arange(total, (Kind::Int64, dev))?.f_unsqueeze(0)?;
        let mut m = q.f_ge_tensor(&k)?;
        if let Some(w) = window {
            m = m.f_logical_and(&q.f_sub(&k)?.f_lt(w)?)?;
        }
        let mut m = m.f_unsqueeze(0)?.f_unsqueeze(0)?.f_expand([b, 1, s, total], false)?;
        if let Some(p) = pad {
            m = m.f_logical_and(&p.f_view([b, 1, 1, total])?)?;
        }
        if let Some(seg) = segments {
            // past == 0 here, so query i is key i: same segment on both sides.
            m = m.f_logical_and(&seg.f_view([b, 1, s, 1])?.f_eq_tensor(&seg.f_view([b, 1, 1, total])?)?)?;
        }
        let diag = q.f_eq_tensor(&k)?;
        Ok(Some(m.f_logical_or(&diag)?))
    }
}

/// What a forward pass needs besides the layers.
struct Prepared {
    /// Input embeddings (with any prompt-tuning prefix).
    h: Tensor,
    /// Rotary tables and masks of the layers.
    tables: LayerTables,
    /// Virtual tokens prepended in this pass.
    prefix: i64,
    /// Positions before this pass's tokens: the cache's, or, on a fresh pass with prefix tuning, the prefix's.
    past: i64,
    /// Prefix tuning on a fresh pass: the key/value table `[n, layers·2·td]`.
    kv_table: Option<Tensor>,
}

/// Rotary tables and attention mask of a forward pass, per kind of layer.
struct LayerTables {
    /// Those of the global layers (every layer but Gemma 3's local ones).
    global: (Rotary, Option<Tensor>),
    /// Those of the local (sliding-window) layers.
    local: Option<(Rotary, Option<Tensor>)>,
}

impl LayerTables {
    /// A copy on `device` (shared tensors where they are there already).
    fn on(&self, device: Device) -> Result<Self> {
        let pair = |(r, m): &(Rotary, Option<Tensor>)| -> Result<(Rotary, Option<Tensor>)> {
            let rot = Rotary { cos: r.cos.f_to_device(device)?, sin: r.sin.f_to_device(device)? };
            Ok((rot, m.as_ref().map(|m| m.f_to_device(device)).transpose()?))
        };
        Ok(Self { global: pair(&self.global)?, local: self.local.as_ref().map(pair).transpose()? })
    }

    /// The tables `layer` attends with.
    fn of(&self, layer: &DecoderLayer) -> &(Rotary, Option<Tensor>) {
        match &self.local {
            Some(local) if layer.local => local,
            _ => &self.global,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_product_equals_linear_for_every_row_count_and_passes_gradients() {
        tch::manual_seed(0);
        let w = Tensor::randn([7, 5], (Kind::Float, Device::Cpu));
        let bias = Tensor::randn([7], (Kind::Float, Device::Cpu));
        for shape in [vec![1, 5], vec![2, 5], vec![3, 1, 5], vec![4, 16, 5], vec![65, 5]] {
            let x = Tensor::randn(shape.as_slice(), (Kind::Float, Device::Cpu)).set_requires_grad(true);
            let got = linear_product(&x, &w, Some(&bias)).unwrap();
            let want = x.linear(&w, Some(&bias));
            assert_eq!(got.size(), want.size());
            assert!(got.allclose(&want, 1e-6, 1e-6, false), "{shape:?}");
            let g = Tensor::randn(got.size().as_slice(), (Kind::Float, Device::Cpu));
            let dx = Tensor::run_backward(&[&got * &g], &[&x], false, false).remove(0);
            let dx_want = g.matmul(&w);
            assert!(dx.allclose(&dx_want, 1e-5, 1e-5, false), "{shape:?}");
        }
    }
}
