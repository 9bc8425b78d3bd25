//! Full fine-tuning: every weight of the model is trained and the result is saved as a Hugging Face model
//! directory (config, tokenizer and template copied from the base), loadable by transformers and by
//! [`crate::models::load_model`]. Needs dense weights (not NF4).

use std::path::{Path, PathBuf};

use tch::Tensor;

use super::TrainableState;
use crate::error::{CoreError, Result};
use crate::models::decoder::BaseWeight;
use crate::models::CausalLm;
use crate::weights::{save_safetensors, WeightFiles};

impl CausalLm {
    /// Every weight under its HF name (shallow handles: same storage, same autograd leaf). A tied lm_head
    /// is listed once, as the embedding. Errors if a layer is stored in NF4.
    pub fn named_weights(&mut self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("model.embed_tokens.weight".to_owned(), self.embed_tokens.shallow_clone())];
        for (i, l) in self.layers.iter().enumerate() {
            out.push((format!("model.layers.{i}.input_layernorm.weight"), l.input_layernorm.weight.shallow_clone()));
            out.push((
                format!("model.layers.{i}.post_attention_layernorm.weight"),
                l.post_attention_layernorm.weight.shallow_clone(),
            ));
            if let Some((pre, post)) = &l.feedforward_norms {
                out.push((format!("model.layers.{i}.pre_feedforward_layernorm.weight"), pre.weight.shallow_clone()));
                out.push((format!("model.layers.{i}.post_feedforward_layernorm.weight"), post.weight.shallow_clone()));
            }
            if let Some((q, k)) = &l.self_attn.qk_norm {
                out.push((format!("model.layers.{i}.self_attn.q_norm.weight"), q.weight.shallow_clone()));
                out.push((format!("model.layers.{i}.self_attn.k_norm.weight"), k.weight.shallow_clone()));
            }
        }
        for (path, lin) in self.linears_mut() {
            match &lin.base {
                BaseWeight::Dense(w) => out.push((format!("{path}.weight"), w.shallow_clone())),
                BaseWeight::Nf4 { .. } => {
                    return Err(CoreError::InvalidArgument(format!(
                        "{path} is stored in NF4: full fine-tuning needs dense weights"
                    )))
                }
            }
            if let Some(b) = &lin.bias {
                out.push((format!("{path}.bias"), b.shallow_clone()));
            }
        }
        out.push(("model.norm.weight".to_owned(), self.norm.weight.shallow_clone()));
        if !self.cfg.tie_word_embeddings {
            out.push(("lm_head.weight".to_owned(), self.lm_head.shallow_clone()));
        }
        Ok(out)
    }
}

/// All weights trainable; saved as a HF model dir.
pub struct FullState {
    /// The base model directory (config, tokenizer and template are copied from it).
    pub base_dir: PathBuf,
}

impl FullState {
    /// Makes every weight of `model` a trainable leaf.
    pub fn prepare(model: &mut CausalLm) -> Result<()> {
        for (_, t) in model.named_weights()? {
            let _ = t.f_set_requires_grad(true)?;
        }
        Ok(())
    }
}

impl TrainableState for FullState {
    fn params(&self, model: &mut CausalLm) -> Vec<(String, Tensor)> {
        model.named_weights().unwrap_or_default()
    }

    fn save(&self, model: &mut CausalLm, dir: &Path) -> Result<()> {
        crate::fsx::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
        save_safetensors(&dir.join("model.safetensors"), &model.named_weights()?)?;
        let cfg = self.base_dir.join("config.json");
        if cfg.exists() {
            crate::fsx::copy(&cfg, dir.join("config.json")).map_err(|e| CoreError::io(&cfg, e))?;
        }
        crate::weights::copy_side_files(&self.base_dir, dir)
    }

    fn load(&self, model: &mut CausalLm, dir: &Path) -> Result<()> {
        let files = WeightFiles::open_files(&[dir.join("model.safetensors")])?;
        let _guard = tch::no_grad_guard();
        for (name, mut t) in model.named_weights()? {
            let w = files.load(&name, &t.size(), t.kind(), t.device())?;
            t.f_copy_(&w)?;
        }
        Ok(())
    }
}
