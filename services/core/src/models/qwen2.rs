//! Qwen2 / Qwen2.5: the Llama layout with biases on q/k/v (not o) (HF `model_type: "qwen2"`).
//! Qwen2's sliding window is only used when `use_sliding_window` is true, and then only on the layers
//! from `max_window_layers` on; released checkpoints leave it off, and so do we unless asked.

use std::path::Path;

use serde::Deserialize;

use super::config::{check_act, default_act, validate, DecoderConfig, RopeFields};
use crate::error::{CoreError, Result};

/// HF `Qwen2Config` fields (names as in config.json).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
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
    /// KV heads; defaults to `num_attention_heads`.
    pub num_key_value_heads: Option<i64>,
    /// RMSNorm epsilon.
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    /// Rope settings.
    #[serde(flatten)]
    pub rope: RopeFields,
    /// Longest context.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: i64,
    /// lm_head shares the embedding.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Whether sliding-window attention is on.
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Activation (must be silu).
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> i64 {
    32768
}

impl Config {
    /// The shared decoder description.
    pub fn to_decoder(&self, path: &Path) -> Result<DecoderConfig> {
        check_act(&self.hidden_act, path)?;
        if self.use_sliding_window {
            return Err(CoreError::config(path, "qwen2 with use_sliding_window=true is not supported yet"));
        }
        let (rope_theta, rope_scaling) = self.rope.resolve(path, 10000.0)?;
        let n = self.num_attention_heads;
        let cfg = DecoderConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: n,
            num_kv_heads: self.num_key_value_heads.unwrap_or(n),
            head_dim: if n > 0 { self.hidden_size / n } else { 0 },
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: true,
            o_bias: false,
            mlp_bias: false,
            sliding_window: None,
        };
        validate(&cfg, path)?;
        Ok(cfg)
    }
}
