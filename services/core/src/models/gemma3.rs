//! Gemma 3 (text; HF `model_type: "gemma3_text"`, `Gemma3ForCausalLM`): the Llama layout with (1 + w)
//! RMSNorms, four of them per layer (the attention's and the MLP's outputs normed before their residual adds),
//! q/k norms, embeddings scaled by √hidden, a GeGLU MLP (`gelu_pytorch_tanh`), attention scores scaled by
//! `query_pre_attn_scalar^-½`, and two kinds of layer (`layer_types`): `sliding_attention` layers see a window
//! of `sliding_window` keys and rotate with their own base, `full_attention` layers see everything and rotate
//! with `rope_theta` (and its scaling). transformers 5 spells the bases as `rope_parameters` keyed by layer type;
//! older configs as `rope_theta`, `rope_local_base_freq` and `rope_scaling` (applied to global layers).

use std::path::Path;

use serde::Deserialize;

use super::config::{Activation, CommonFields, DecoderConfig, FamilyParts, LocalAttention, RopeFields};
use crate::error::{CoreError, Result};

/// HF `Gemma3TextConfig` fields (names as in config.json).
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Fields all families share (`hidden_act` is Gemma's `hidden_activation` here).
    #[serde(flatten)]
    pub common: CommonFields,
    /// KV heads.
    #[serde(default = "default_kv")]
    pub num_key_value_heads: i64,
    /// Per-head width.
    #[serde(default = "default_head_dim")]
    pub head_dim: i64,
    /// Longest context.
    #[serde(default = "default_max_pos")]
    pub max_position_embeddings: i64,
    /// The MLP's activation.
    #[serde(default = "default_activation")]
    pub hidden_activation: String,
    /// Attention scores are scaled by this to the power −½.
    #[serde(default = "default_head_dim")]
    pub query_pre_attn_scalar: i64,
    /// Keys a local layer sees.
    #[serde(default = "default_window")]
    pub sliding_window: i64,
    /// `sliding_attention` | `full_attention` per layer; default: every sixth layer global.
    #[serde(default)]
    pub layer_types: Option<Vec<String>>,
    /// Biases on q, k, v and o.
    #[serde(default)]
    pub attention_bias: bool,
    /// Legacy spelling of the local layers' RoPE base.
    #[serde(default)]
    pub rope_local_base_freq: Option<f64>,
    /// Soft-capping of attention scores (Gemma 2); must be absent.
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// Soft-capping of the final logits (Gemma 2); must be absent.
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// Bidirectional attention (embedding variants); must be off.
    #[serde(default)]
    pub use_bidirectional_attention: Option<bool>,
}

fn default_kv() -> i64 {
    4
}
fn default_head_dim() -> i64 {
    256
}
fn default_max_pos() -> i64 {
    131_072
}
fn default_activation() -> String {
    "gelu_pytorch_tanh".into()
}
fn default_window() -> i64 {
    4096
}

impl Config {
    /// The shared decoder description.
    pub fn to_decoder(&self, path: &Path) -> Result<DecoderConfig> {
        let bad = |m: String| Err(CoreError::config(path, m));
        if !matches!(self.hidden_activation.as_str(), "gelu_pytorch_tanh" | "gelu_tanh") {
            return bad(format!(
                "unsupported hidden_activation `{}` (supported: gelu_pytorch_tanh)",
                self.hidden_activation
            ));
        }
        if self.attn_logit_softcapping.is_some() || self.final_logit_softcapping.is_some() {
            return bad("logit soft-capping (Gemma 2) is not supported".into());
        }
        if self.use_bidirectional_attention == Some(true) {
            return bad("use_bidirectional_attention=true is not supported".into());
        }
        if self.sliding_window <= 0 || self.query_pre_attn_scalar <= 0 {
            return bad("sliding_window and query_pre_attn_scalar must be positive".into());
        }
        let n = self.common.num_hidden_layers.max(0) as usize;
        let layers: Vec<bool> = match &self.layer_types {
            Some(t) => {
                if t.len() != n {
                    return bad(format!("layer_types has {} entries for {n} layers", t.len()));
                }
                t.iter()
                    .map(|x| match x.as_str() {
                        "sliding_attention" => Ok(true),
                        "full_attention" => Ok(false),
                        other => Err(CoreError::config(path, format!("unknown layer type `{other}`"))),
                    })
                    .collect::<Result<_>>()?
            }
            None => (0..n).map(|i| (i + 1) % 6 != 0).collect(),
        };
        // The global layers' rope: `rope_parameters.full_attention` (transformers 5) or the legacy top-level
        // `rope_theta` + `rope_scaling`; the local layers': `rope_parameters.sliding_attention.rope_theta` or
        // `rope_local_base_freq`.
        let by_type = self.common.rope.rope_parameters.as_ref().filter(|p| p.get("full_attention").is_some());
        let (global, local_theta) = match by_type {
            Some(p) => {
                let local = &p["sliding_attention"];
                if local.get("rope_type").and_then(|t| t.as_str()).is_some_and(|t| t != "default") {
                    return bad("sliding_attention layers support only the default rope".into());
                }
                let theta = local.get("rope_theta").and_then(|t| t.as_f64()).unwrap_or(10_000.0);
                (
                    RopeFields {
                        rope_theta: None,
                        rope_scaling: None,
                        rope_parameters: Some(p["full_attention"].clone()),
                    },
                    theta,
                )
            }
            None => (self.common.rope.clone(), self.rope_local_base_freq.unwrap_or(10_000.0)),
        };
        let (rope_theta, rope_scaling) = global.resolve(path, 1_000_000.0)?;
        let mut common = self.common.clone();
        common.hidden_act = "silu".into(); // checked above; the shared check knows only SiLU
        common.rope = RopeFields { rope_theta: Some(rope_theta), rope_scaling: None, rope_parameters: None };
        let mut cfg = common.decoder(
            path,
            FamilyParts {
                num_kv_heads: self.num_key_value_heads,
                head_dim: Some(self.head_dim),
                max_position_embeddings: self.max_position_embeddings,
                qkv_bias: self.attention_bias,
                o_bias: self.attention_bias,
                mlp_bias: false,
                sliding_window: None,
                qk_norm: true,
            },
        )?;
        cfg.rope_scaling = rope_scaling;
        cfg.norm_offset = true;
        cfg.embed_scale = Some((self.common.hidden_size as f64).sqrt());
        cfg.activation = Activation::GeluTanh;
        cfg.sandwich_norms = true;
        cfg.attn_scale = Some((self.query_pre_attn_scalar as f64).powf(-0.5));
        if !(local_theta > 0.0) {
            return bad("the sliding layers' rope_theta must be positive".into());
        }
        cfg.local_attention = Some(LocalAttention { window: self.sliding_window, rope_theta: local_theta, layers });
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(extra: serde_json::Value) -> Result<DecoderConfig> {
        let mut v = serde_json::json!({
            "model_type": "gemma3_text", "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96,
            "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0, "sliding_window": 512
        });
        for (k, x) in extra.as_object().unwrap() {
            v[k] = x.clone();
        }
        serde_json::from_value::<Config>(v).unwrap().to_decoder(Path::new("config.json"))
    }

    #[test]
    fn legacy_spelling_gives_every_sixth_layer_global_and_both_bases() {
        let c = cfg(serde_json::json!({})).unwrap();
        let l = c.local_attention.unwrap();
        assert_eq!(l.layers, vec![true, true, true, true, true, false]);
        assert_eq!((c.rope_theta, l.rope_theta, l.window), (1e6, 1e4, 512));
        assert_eq!(c.attn_scale, Some(256f64.powf(-0.5)), "query_pre_attn_scalar defaults to 256");
        assert_eq!(c.embed_scale, Some(8.0));
    }

    #[test]
    fn what_we_do_not_compute_is_refused_by_name() {
        for (extra, want) in [
            (serde_json::json!({"final_logit_softcapping": 30.0}), "soft-capping"),
            (serde_json::json!({"layer_types": ["sliding_attention"]}), "layer_types"),
            (serde_json::json!({"layer_types": ["a", "b", "c", "d", "e", "f"]}), "unknown layer type `a`"),
            (serde_json::json!({"hidden_activation": "relu"}), "hidden_activation"),
            (serde_json::json!({"use_bidirectional_attention": true}), "bidirectional"),
        ] {
            let e = cfg(extra).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("config.json"), "{e}");
        }
    }
}
