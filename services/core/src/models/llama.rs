//! Llama (and everything that reuses its layout: SmolLM, TinyLlama, Llama 2/3.x): HF `model_type: "llama"`.
//! Optional `attention_bias` / `mlp_bias`; rope scaling `linear` and `llama3`.

use std::path::Path;

use serde::Deserialize;

use super::config::{check_act, default_act, validate, DecoderConfig, RopeFields};
use crate::error::Result;

/// HF `LlamaConfig` fields (names as in config.json).
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
    /// Head width; defaults to `hidden_size / num_attention_heads`.
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
    /// Biases on q/k/v/o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP.
    #[serde(default)]
    pub mlp_bias: bool,
    /// Activation (must be silu).
    #[serde(default = "default_act")]
    pub hidden_act: String,
}

fn default_eps() -> f64 {
    1e-6
}
fn default_max_pos() -> i64 {
    2048
}

impl Config {
    /// The shared decoder description.
    pub fn to_decoder(&self, path: &Path) -> Result<DecoderConfig> {
        check_act(&self.hidden_act, path)?;
        let (rope_theta, rope_scaling) = self.rope.resolve(path, 10000.0)?;
        let num_heads = self.num_attention_heads;
        let cfg = DecoderConfig {
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            intermediate_size: self.intermediate_size,
            num_layers: self.num_hidden_layers,
            num_heads,
            num_kv_heads: self.num_key_value_heads.unwrap_or(num_heads),
            head_dim: self.head_dim.unwrap_or(if num_heads > 0 { self.hidden_size / num_heads } else { 0 }),
            rms_norm_eps: self.rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.max_position_embeddings,
            tie_word_embeddings: self.tie_word_embeddings,
            qkv_bias: self.attention_bias,
            o_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            sliding_window: None,
        };
        validate(&cfg, path)?;
        Ok(cfg)
    }
}
