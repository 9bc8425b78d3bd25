//! Mistral: the Llama layout plus sliding-window attention (HF `model_type: "mistral"`).

use std::path::Path;

use serde::Deserialize;

use super::config::{check_act, default_act, validate, DecoderConfig, RopeFields};
use crate::error::Result;

/// HF `MistralConfig` fields (names as in config.json).
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
    /// KV heads; defaults to 8 like HF's MistralConfig.
    #[serde(default = "default_kv")]
    pub num_key_value_heads: i64,
    /// Head width; `null` or absent means `hidden_size / num_attention_heads`.
    pub head_dim: Option<i64>,
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
    /// Attention window in tokens; `null` disables it.
    #[serde(default)]
    pub sliding_window: Option<i64>,
    /// Activation (must be silu).
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_kv() -> i64 {
    8
}
fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> i64 {
    4096 * 32
}

impl Config {
    /// The shared decoder description.
    pub fn to_decoder(&self, path: &Path) -> Result<DecoderConfig> {
        check_act(&self.hidden_act, path)?;
        let (rope_theta, rope_scaling) = self.rope.resolve(path, 10000.0)?;
        let n = self.num_attention_heads;
        let cfg = DecoderConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads: n,
            num_kv_heads: self.num_key_value_heads,
            head_dim: self.head_dim.unwrap_or(if n > 0 { self.hidden_size / n } else { 0 }),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            sliding_window: self.sliding_window.filter(|&w| w > 0),
        };
        validate(&cfg, path)?;
        Ok(cfg)
    }
}
