//! Mistral: the Llama layout plus sliding-window attention (HF `model_type: "mistral"`).

use std::path::Path;

use serde::Deserialize;

use super::config::{CommonFields, DecoderConfig, FamilyParts};
use crate::error::Result;

/// HF `MistralConfig` fields (names as in config.json).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Fields all families share.
    #[serde(flatten)]
    pub common: CommonFields,
    /// KV heads; defaults to 8 like HF's MistralConfig.
    #[serde(default = "default_kv")]
    pub num_key_value_heads: i64,
    /// Head width; `null` or absent means `hidden_size / num_attention_heads`.
    pub head_dim: Option<i64>,
    /// Longest context.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: i64,
    /// Attention window in tokens; `null` disables it.
    #[serde(default)]
    pub sliding_window: Option<i64>,
}

fn default_kv() -> i64 {
    8
}
fn default_max_pos() -> i64 {
    4096 * 32
}

impl Config {
    /// The shared decoder description.
    pub fn to_decoder(&self, path: &Path) -> Result<DecoderConfig> {
        self.common.decoder(
            path,
            FamilyParts {
                num_kv_heads: self.num_key_value_heads,
                head_dim: self.head_dim,
                max_position_embeddings: self.max_position_embeddings,
                qkv_bias: false,
                o_bias: false,
                mlp_bias: false,
                sliding_window: self.sliding_window.filter(|&w| w > 0),
                qk_norm: false,
            },
        )
    }
}
