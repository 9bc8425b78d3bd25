//! The normalised decoder description that every architecture file produces from its HF config.json,
//! and the config fields the families share (rope settings in both the pre- and post-transformers-5
//! spellings).

use std::path::Path;

use serde::Deserialize;

use crate::error::{CoreError, Result};

/// How rotary position frequencies are rescaled for long contexts.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE.
    None,
    /// Position interpolation: every frequency divided by `factor`.
    Linear {
        /// Divisor of the frequencies.
        factor: f64,
    },
    /// Llama 3.1's band-wise rescaling.
    Llama3 {
        /// Divisor of the low frequencies.
        factor: f64,
        /// Wavelengths above `original / low_freq_factor` are scaled.
        low_freq_factor: f64,
        /// Wavelengths below `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// Context length the model was pre-trained with.
        original_max_position_embeddings: f64,
    },
}

/// The gated MLP's activation: `down(act(gate(x)) · up(x))`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SiLU (SwiGLU): Llama, Mistral, Qwen.
    Silu,
    /// GELU with the tanh approximation (GeGLU): Gemma's `gelu_pytorch_tanh`.
    GeluTanh,
}

/// Sliding-window layers with their own RoPE base (Gemma 3's `sliding_attention` layers).
#[derive(Debug, Clone, PartialEq)]
pub struct LocalAttention {
    /// Each key within this many positions of the query (itself included) is seen.
    pub window: i64,
    /// RoPE base of these layers (unscaled).
    pub rope_theta: f64,
    /// Per layer: true = local (windowed), false = global.
    pub layers: Vec<bool>,
}

/// Everything the shared decoder needs to know about a model, whatever its family.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    /// Vocabulary size (rows of the embedding and of lm_head).
    pub vocab_size: i64,
    /// Width of the residual stream.
    pub hidden_size: i64,
    /// Width of the MLP.
    pub intermediate_size: i64,
    /// Number of decoder layers.
    pub num_layers: i64,
    /// Query heads.
    pub num_heads: i64,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: i64,
    /// Width of one head.
    pub head_dim: i64,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency rescaling.
    pub rope_scaling: RopeScaling,
    /// Longest context the model supports.
    pub max_position_embeddings: i64,
    /// lm_head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v projections have biases (qwen2, llama with attention_bias).
    pub qkv_bias: bool,
    /// o_proj has a bias (llama with attention_bias).
    pub o_bias: bool,
    /// MLP projections have biases.
    pub mlp_bias: bool,
    /// Keys further back than this many tokens are not attended to (mistral).
    pub sliding_window: Option<i64>,
    /// RMSNorm over each head's queries and keys before RoPE (`q_norm` / `k_norm`, Qwen3).
    pub qk_norm: bool,
    /// Gemma-style RMSNorm: weights stored as offsets from one, `x̂ · (1 + w)`, computed in f32.
    pub norm_offset: bool,
    /// Embeddings are multiplied by this (Gemma: √hidden, rounded to the weights' kind).
    pub embed_scale: Option<f64>,
    /// The gated MLP's activation.
    pub activation: Activation,
    /// Gemma's four norms per layer: the attention's and the MLP's outputs are normed before their residual
    /// adds (`post_attention_layernorm`, `post_feedforward_layernorm`), the MLP's input by
    /// `pre_feedforward_layernorm`.
    pub sandwich_norms: bool,
    /// Attention-score scale (default `1/√head_dim`; Gemma: `query_pre_attn_scalar^-½`).
    pub attn_scale: Option<f64>,
    /// Layers that attend through a sliding window with their own RoPE base, beside global layers
    /// (Gemma 3); `sliding_window` then applies to no layer.
    pub local_attention: Option<LocalAttention>,
}

/// Rope fields as HF config.json spells them: `rope_theta` + `rope_scaling` (before transformers 5) or
/// `rope_parameters` (transformers 5, with `rope_theta` inside).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RopeFields {
    /// RoPE base (legacy spelling).
    #[serde(default)]
    pub rope_theta: Option<f64>,
    /// Rescaling (legacy spelling).
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// Base and rescaling (transformers 5 spelling).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
}

impl RopeFields {
    /// Resolves (theta, scaling), with `default_theta` when neither spelling gives a base.
    pub fn resolve(&self, path: &Path, default_theta: f64) -> Result<(f64, RopeScaling)> {
        let params = self
            .rope_parameters
            .as_ref()
            .filter(|v| !v.is_null())
            .or(self.rope_scaling.as_ref().filter(|v| !v.is_null()));
        let theta_in_params = params.and_then(|p| p.get("rope_theta")).and_then(|v| v.as_f64());
        let theta = theta_in_params.or(self.rope_theta).unwrap_or(default_theta);
        let Some(p) = params else { return Ok((theta, RopeScaling::None)) };
        let ty = p.get("rope_type").or_else(|| p.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
        let num = |k: &str| -> Result<f64> {
            p.get(k)
                .and_then(|v| v.as_f64())
                .ok_or_else(|| CoreError::config(path, format!("rope scaling `{ty}` needs a numeric `{k}`")))
        };
        let scaling = match ty {
            "default" => RopeScaling::None,
            "linear" => RopeScaling::Linear { factor: num("factor")? },
            "llama3" => RopeScaling::Llama3 {
                factor: num("factor")?,
                low_freq_factor: num("low_freq_factor")?,
                high_freq_factor: num("high_freq_factor")?,
                original_max_position_embeddings: num("original_max_position_embeddings")?,
            },
            other => {
                return Err(CoreError::config(
                    path,
                    format!("unsupported rope type `{other}` (supported: default, linear, llama3)"),
                ))
            }
        };
        Ok((theta, scaling))
    }
}

/// The config.json fields every Llama-layout family shares (HF names); each family file adds its own.
#[derive(Debug, Clone, Deserialize)]
pub struct CommonFields {
    /// Vocabulary size.
    pub vocab_size: i64,
    /// Residual width.
    pub hidden_size: i64,
    /// MLP width.
    pub intermediate_size: i64,
    /// Decoder layers.
    pub num_hidden_layers: i64,
    /// Query heads.
    pub num_attention_heads: i64,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Rope settings.
    #[serde(flatten)]
    pub rope: RopeFields,
    /// lm_head shares the embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Activation (must be silu).
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_eps() -> f64 {
    1e-6
}

/// What differs between families when building a [`DecoderConfig`].
pub(crate) struct FamilyParts {
    pub(crate) num_kv_heads: i64,
    pub(crate) head_dim: Option<i64>,
    pub(crate) max_position_embeddings: i64,
    pub(crate) qkv_bias: bool,
    pub(crate) o_bias: bool,
    pub(crate) mlp_bias: bool,
    pub(crate) sliding_window: Option<i64>,
    pub(crate) qk_norm: bool,
}

impl CommonFields {
    /// The shared decoder description, validated.
    pub(crate) fn decoder(&self, path: &Path, f: FamilyParts) -> Result<DecoderConfig> {
        check_act(&self.hidden_act, path)?;
        let (rope_theta, rope_scaling) = self.rope.resolve(path, 10000.0)?;
        let n = self.num_attention_heads;
        let cfg = DecoderConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: n,
            num_kv_heads: f.num_kv_heads,
            head_dim: f.head_dim.unwrap_or(if n > 0 { self.hidden_size / n } else { 0 }),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: f.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: f.qkv_bias,
            o_bias: f.o_bias,
            mlp_bias: f.mlp_bias,
            sliding_window: f.sliding_window,
            qk_norm: f.qk_norm,
            norm_offset: false,
            embed_scale: None,
            activation: Activation::Silu,
            sandwich_norms: false,
            attn_scale: None,
            local_attention: None,
        };
        validate(&cfg, path)?;
        Ok(cfg)
    }
}

/// Checks the shape arithmetic of a decoder config, so that bad configs fail on load with a message
/// rather than deep inside a matmul.
fn validate(cfg: &DecoderConfig, path: &Path) -> Result<()> {
    let bad = |msg: String| Err(CoreError::config(path, msg));
    for (name, v) in [
        ("vocab_size", cfg.vocab_size),
        ("hidden_size", cfg.hidden_size),
        ("intermediate_size", cfg.intermediate_size),
        ("num_hidden_layers", cfg.num_layers),
        ("num_attention_heads", cfg.num_heads),
        ("num_key_value_heads", cfg.num_kv_heads),
        ("head_dim", cfg.head_dim),
    ] {
        if v <= 0 {
            return bad(format!("`{name}` must be positive, got {v}"));
        }
    }
    if cfg.num_heads % cfg.num_kv_heads != 0 {
        return bad(format!(
            "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
            cfg.num_heads, cfg.num_kv_heads
        ));
    }
    if cfg.head_dim % 2 != 0 {
        return bad(format!("head_dim ({}) must be even for rotary embeddings", cfg.head_dim));
    }
    if !(cfg.rms_norm_eps > 0.0) || !(cfg.rope_theta > 0.0) {
        return bad("rms_norm_eps and rope_theta must be positive".into());
    }
    Ok(())
}

/// `hidden_act` must be SiLU for these families.
fn check_act(act: &str, path: &Path) -> Result<()> {
    if act == "silu" || act == "swish" {
        Ok(())
    } else {
        Err(CoreError::config(path, format!("unsupported hidden_act `{act}` (supported: silu)")))
    }
}

fn default_act() -> String {
    "silu".into()
}
