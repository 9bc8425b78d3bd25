//! Llama (and everything that reuses its layout: SmolLM, TinyLlama, Llama 2/3.x): HF `model_type: "llama"`.
//! Optional `attention_bias` / `mlp_bias`; rope scaling `linear` and `llama3`.

use std::path::Path;

use serde::Deserialize;

use super::config::{CommonFields, DecoderConfig, FamilyParts};
use crate::error::Result;

/// HF `LlamaConfig` fields (names as in config.json).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Fields all families share.
    #[serde(flatten)]
    pub common: CommonFields,
    /// KV heads; defaults to `num_attention_heads`.
    pub num_key_value_heads: Option<i64>,
    /// Head width; defaults to `hidden_size / num_attention_heads`.
    pub head_dim: Option<i64>,
    /// Longest context.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: i64,
    /// Biases on q/k/v/o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP.
    #[serde(default)]
    pub mlp_bias: bool,
}

fn default_max_pos() -> i64 {
    2048
}

impl Config {
    /// The shared decoder description.
    pub fn to_decoder(&self, path: &Path) -> Result<DecoderConfig> {
        self.common.decoder(
            path,
            FamilyParts {
                num_kv_heads: self.num_key_value_heads.unwrap_or(self.common.num_attention_heads),
                head_dim: self.head_dim,
                max_position_embeddings: self.max_position_embeddings,
                qkv_bias: self.attention_bias,
                o_bias: self.attention_bias,
                mlp_bias: self.mlp_bias,
                sliding_window: None,
                qk_norm: false,
            },
        )
    }
}
