//! Supervised fine-tuning: the next-token loss on the trained (label ≠ −100) tokens of right-padded
//! micro-batches, and LoRA adapters as the trained state.

use std::path::Path;

use tch::{Kind, Tensor};

use super::loss::{causal_lm_loss, causal_lm_loss_backward, LossSum, IGNORE_INDEX};
use super::{Objective, TrainableState};
use crate::error::Result;
use crate::lora::{load_peft, save_peft, LoraConfig};
use crate::models::CausalLm;

/// One tokenized example: input ids and, aligned with them, the labels (the id itself where trained,
/// −100 elsewhere; position t's label is predicted from positions < t).
#[derive(Debug, Clone, PartialEq)]
pub struct SftExample {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels, same length.
    pub labels: Vec<i64>,
}

impl SftExample {
    /// Trained tokens (labels that are predicted, i.e. after the first position).
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// The SFT objective.
pub struct SftObjective {
    /// Id used to pad micro-batches (never trained: padded labels are −100).
    pub pad_id: u32,
    /// Rows of logits per chunk in the loss.
    pub chunk: i64,
    /// Recompute each layer in the backward pass instead of keeping all activations.
    pub gradient_checkpointing: bool,
}

impl SftObjective {
    /// The objective with the loop's loss chunking and checkpointing settings.
    pub fn new(pad_id: u32, cfg: &super::TrainConfig) -> Self {
        Self { pad_id, chunk: cfg.loss_chunk_tokens as i64, gradient_checkpointing: cfg.gradient_checkpointing }
    }

    fn collate(&self, model: &CausalLm, batch: &[&SftExample]) -> Result<(Tensor, Option<Tensor>, Tensor)> {
        let len = batch.iter().map(|e| e.input_ids.len()).max().unwrap_or(1);
        let b = batch.len();
        let mut ids = vec![self.pad_id as i64; b * len];
        let mut mask = vec![0i64; b * len];
        let mut labels = vec![IGNORE_INDEX; b * len];
        for (r, e) in batch.iter().enumerate() {
            for (j, (&t, &l)) in e.input_ids.iter().zip(&e.labels).enumerate() {
                ids[r * len + j] = t as i64;
                mask[r * len + j] = 1;
                labels[r * len + j] = l;
            }
        }
        let dev = model.device();
        let shape = [b as i64, len as i64];
        // Without padding the model can use plain causal attention (libtorch's fused kernel, which never
        // materialises the [b, heads, s, s] attention matrix); with padding it needs the explicit mask.
        let padded = batch.iter().any(|e| e.input_ids.len() != len);
        let mask = if padded { Some(Tensor::f_from_slice(&mask)?.f_view(shape)?.f_to_device(dev)?) } else { None };
        Ok((
            Tensor::f_from_slice(&ids)?.f_view(shape)?.f_to_device(dev)?,
            mask,
            Tensor::f_from_slice(&labels)?.f_view(shape)?.f_to_kind(Kind::Int64)?,
        ))
    }
}

impl Objective for SftObjective {
    type Example = SftExample;

    fn units(&self, ex: &SftExample) -> usize {
        ex.trained_tokens()
    }

    fn backward(&self, model: &CausalLm, batch: &[&SftExample], scale: f64) -> Result<LossSum> {
        let (ids, mask, labels) = self.collate(model, batch)?;
        if self.gradient_checkpointing {
            return model.forward_backward_checkpointed(&ids, mask.as_ref(), |hidden| causal_lm_loss_backward(model, hidden, &labels, scale, self.chunk));
        }
        let hidden = model.forward_hidden(&ids, mask.as_ref(), None)?;
        causal_lm_loss_backward(model, &hidden, &labels, scale, self.chunk)
    }

    fn eval(&self, model: &CausalLm, batch: &[&SftExample]) -> Result<LossSum> {
        let _guard = tch::no_grad_guard();
        let (ids, mask, labels) = self.collate(model, batch)?;
        let hidden = model.forward_hidden(&ids, mask.as_ref(), None)?;
        causal_lm_loss(model, &hidden, &labels, self.chunk)
    }
}

/// LoRA adapters as the trained state, saved in PEFT format.
pub struct LoraState {
    /// The adapter's hyperparameters (written to adapter_config.json).
    pub cfg: LoraConfig,
    /// `base_model_name_or_path` recorded in the adapter.
    pub base_model: String,
}

impl TrainableState for LoraState {
    fn params(&self, model: &mut CausalLm) -> Vec<(String, Tensor)> {
        model.lora_tensors()
    }

    fn save(&self, model: &mut CausalLm, dir: &Path) -> Result<()> {
        save_peft(model, &self.cfg, &self.base_model, dir)
    }

    fn load(&self, model: &mut CausalLm, dir: &Path) -> Result<()> {
        load_peft(model, dir)?;
        Ok(())
    }
}
