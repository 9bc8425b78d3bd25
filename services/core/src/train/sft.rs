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
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SftExample {
    /// Token ids.
    pub input_ids: Vec<u32>,
    /// Labels, same length.
    pub labels: Vec<i64>,
    /// For a packed row: the 1-based sample each token belongs to (tokens attend only within their sample
    /// and positions restart at 0 in each); empty for an ordinary example.
    pub segment_ids: Vec<u32>,
}

impl SftExample {
    /// An ordinary (unpacked) example.
    pub fn new(input_ids: Vec<u32>, labels: Vec<i64>) -> Self {
        Self { input_ids, labels, segment_ids: vec![] }
    }

    /// Packs examples into one row: segments numbered from 1, each segment's first label −100 (nothing
    /// before it in its own sample predicts it, exactly as in the unpacked example).
    pub fn pack(parts: &[&SftExample]) -> Self {
        let mut row = Self::default();
        for (i, p) in parts.iter().enumerate() {
            row.input_ids.extend(&p.input_ids);
            row.labels.extend(p.labels.iter().enumerate().map(|(j, &l)| if j == 0 { IGNORE_INDEX } else { l }));
            row.segment_ids.extend(std::iter::repeat_n(i as u32 + 1, p.input_ids.len()));
        }
        row
    }
}

impl SftExample {
    /// Trained tokens (labels that are predicted, i.e. after the first position).
    pub fn trained_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l != IGNORE_INDEX).count()
    }
}

/// A collated micro-batch (right-padded).
pub(crate) struct Collated {
    pub(crate) ids: Tensor,
    /// Padding / segment mask (`None` when neither is needed).
    pub(crate) mask: Option<Tensor>,
    /// Positions restarting per segment (packed rows only).
    pub(crate) positions: Option<Tensor>,
    pub(crate) labels: Tensor,
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

    pub(crate) fn collate(&self, model: &CausalLm, batch: &[&SftExample]) -> Result<Collated> {
        let len = batch.iter().map(|e| e.input_ids.len()).max().unwrap_or(1);
        let b = batch.len();
        let mut ids = vec![self.pad_id as i64; b * len];
        let mut mask = vec![0i64; b * len];
        let mut labels = vec![IGNORE_INDEX; b * len];
        let mut positions = vec![0i64; b * len];
        for (r, e) in batch.iter().enumerate() {
            let mut pos = 0;
            for (j, (&t, &l)) in e.input_ids.iter().zip(&e.labels).enumerate() {
                let seg = e.segment_ids.get(j).copied().unwrap_or(1);
                if j > 0 && e.segment_ids.get(j - 1).is_some_and(|&p| p != seg) {
                    pos = 0;
                }
                ids[r * len + j] = t as i64;
                mask[r * len + j] = seg as i64;
                labels[r * len + j] = l;
                positions[r * len + j] = pos;
                pos += 1;
            }
        }
        let packed = batch.iter().any(|e| !e.segment_ids.is_empty());
        let dev = model.device();
        let shape = [b as i64, len as i64];
        // Without padding the model can use plain causal attention (libtorch's fused kernel, which never
        // materialises the [b, heads, s, s] attention matrix); with padding it needs the explicit mask.
        let padded = batch.iter().any(|e| e.input_ids.len() != len);
        let mask =
            if padded || packed { Some(Tensor::f_from_slice(&mask)?.f_view(shape)?.f_to_device(dev)?) } else { None };
        let positions =
            if packed { Some(Tensor::f_from_slice(&positions)?.f_view(shape)?.f_to_device(dev)?) } else { None };
        Ok(Collated {
            ids: Tensor::f_from_slice(&ids)?.f_view(shape)?.f_to_device(dev)?,
            mask,
            positions,
            labels: Tensor::f_from_slice(&labels)?.f_view(shape)?.f_to_kind(Kind::Int64)?,
        })
    }
}

impl Objective for SftObjective {
    type Example = SftExample;

    fn units(&self, ex: &SftExample) -> usize {
        ex.trained_tokens()
    }

    fn backward(&self, model: &CausalLm, batch: &[&SftExample], scale: f64) -> Result<LossSum> {
        let c = self.collate(model, batch)?;
        if self.gradient_checkpointing {
            return model.forward_backward_checkpointed(&c.ids, c.mask.as_ref(), c.positions.as_ref(), |hidden| {
                causal_lm_loss_backward(model, hidden, &c.labels, scale, self.chunk)
            });
        }
        let hidden = model.forward_hidden(&c.ids, c.mask.as_ref(), c.positions.as_ref())?;
        causal_lm_loss_backward(model, &hidden, &c.labels, scale, self.chunk)
    }

    fn eval(&self, model: &CausalLm, batch: &[&SftExample]) -> Result<LossSum> {
        let _guard = tch::no_grad_guard();
        let c = self.collate(model, batch)?;
        let hidden = model.forward_hidden(&c.ids, c.mask.as_ref(), c.positions.as_ref())?;
        causal_lm_loss(model, &hidden, &c.labels, self.chunk)
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
