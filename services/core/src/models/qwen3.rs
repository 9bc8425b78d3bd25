//! Qwen3 (dense): the Llama layout with an RMSNorm over each head's queries and keys (`q_norm`, `k_norm`,
//! `[head_dim]`, applied before RoPE) and one `attention_bias` switch for all four attention projections
//! (HF `model_type: "qwen3"`). As for Qwen2, sliding-window layers are only used when `use_sliding_window` is
//! true, which released checkpoints leave off.

use std::path::Path;

use serde::Deserialize;

use super::config::{CommonFields, DecoderConfig, FamilyParts};
use crate::error::{CoreError, Result};

/// HF `Qwen3Config` fields (names as in config.json).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Fields all families share.
    #[serde(flatten)]
    pub common: CommonFields,
    /// KV heads; defaults to `num_attention_heads`.
    pub num_key_value_heads: Option<i64>,
    /// Per-head width; transformers' default is 128 (not hidden / heads).
    #[serde(default = "default_head_dim")]
    pub head_dim: i64,
    /// Longest context.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: i64,
    /// Biases on q, k, v and o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Whether sliding-window attention is on.
    #[serde(default)]
    pub use_sliding_window: bool,
}

fn default_head_dim() -> i64 {
    128
}

fn default_max_pos() -> i64 {
    32768
}

impl Config {
    /// The shared decoder description.
    pub fn to_decoder(&self, path: &Path) -> Result<DecoderConfig> {
        if self.use_sliding_window {
            return Err(CoreError::config(path, "qwen3 with use_sliding_window=true is not supported yet"));
        }
        self.common.decoder(
            path,
            FamilyParts {
                num_kv_heads: self.num_key_value_heads.unwrap_or(self.common.num_attention_heads),
                head_dim: Some(self.head_dim),
                max_position_embeddings: self.max_position_embeddings,
                qkv_bias: self.attention_bias,
                o_bias: self.attention_bias,
                mlp_bias: false,
                sliding_window: None,
                qk_norm: true,
            },
        )
    }
}
