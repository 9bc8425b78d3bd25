//! Qwen2 / Qwen2.5: the Llama layout with biases on q/k/v (not o) (HF `model_type: "qwen2"`).
//! Qwen2's sliding window is only used when `use_sliding_window` is true, and then only on the layers
//! from `max_window_layers` on; released checkpoints leave it off, and so do we unless asked.

use std::path::Path;

use serde::Deserialize;

use super::config::{CommonFields, DecoderConfig, FamilyParts};
use crate::error::{CoreError, Result};

/// HF `Qwen2Config` fields (names as in config.json).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Fields all families share.
    #[serde(flatten)]
    pub common: CommonFields,
    /// KV heads; defaults to `num_attention_heads`.
    pub num_key_value_heads: Option<i64>,
    /// Longest context.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: i64,
    /// Whether sliding-window attention is on.
    #[serde(default)]
    pub use_sliding_window: bool,
}

fn default_max_pos() -> i64 {
    32768
}

impl Config {
    /// The shared decoder description.
    pub fn to_decoder(&self, path: &Path) -> Result<DecoderConfig> {
        if self.use_sliding_window {
            return Err(CoreError::config(path, "qwen2 with use_sliding_window=true is not supported yet"));
        }
        self.common.decoder(
            path,
            FamilyParts {
                num_kv_heads: self.num_key_value_heads.unwrap_or(self.common.num_attention_heads),
                head_dim: None,
                max_position_embeddings: self.max_position_embeddings,
                qkv_bias: true,
                o_bias: false,
                mlp_bias: false,
                sliding_window: None,
                qk_norm: false,
            },
        )
    }
}
