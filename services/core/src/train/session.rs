//! A policy training session: a base model with a trainable LoRA adapter (new, or continued from a saved
//! one) and its [`Trainer`], pinned on one device, driven step by step from outside — by an RL orchestrator
//! over gRPC — instead of by the data loop. [`PolicySession::rollout`] samples `n` completions per prompt and
//! gives the sampling policy's per-token log-probs (teacher-forced, logits / temperature, as TRL) and, when
//! asked, the reference's (the adapter disabled); [`PolicySession::update`] runs one optimizer update of the
//! clipped policy loss ([`super::grpo`]) over completions with their per-token advantages;
//! [`PolicySession::checkpoint`] / [`PolicySession::restore`] save and restore the adapter, the optimizer and
//! the counters, so a session survives a restart of its server.

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::grpo::{micro_batch_loss, LossStats, PolicyLoss};
use super::ppo_objective::{split, to_vec, token_stats, Pass};
use super::sft::{LoraState, SftExample};
use super::{checkpoint, LossSum, Position, TrainConfig, TrainableState, Trainer};
use crate::error::{CoreError, Result};
use crate::generation::{generate_groups, FinishReason, GenerateOptions, ModelDefaults};
use crate::lora::LoraConfig;
use crate::models::CausalLm;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;

/// Where the session's adapter starts.
#[derive(Debug, Clone)]
pub enum AdapterInit {
    /// A new adapter (B = 0: the policy starts as the base).
    New(LoraConfig),
    /// A saved PEFT LoRA adapter (e.g. an SFT run's), trained further.
    Continue(PathBuf),
}

/// What a session is opened with.
#[derive(Debug, Clone)]
pub struct SessionSpec {
    /// The base model directory.
    pub base: PathBuf,
    /// NF4-quantize the base (QLoRA).
    pub qlora: bool,
    /// The adapter.
    pub adapter: AdapterInit,
    /// Optimizer settings (AdamW betas, epsilon, weight decay, gradient clipping) and the seed.
    pub train: TrainConfig,
    /// Compute dtype.
    pub kind: Kind,
    /// Device.
    pub device: Device,
}

/// A rollout: `n` samples of each prompt.
#[derive(Debug, Clone)]
pub struct RolloutSpec {
    /// Prompt ids.
    pub prompts: Vec<Vec<u32>>,
    /// Samples per prompt.
    pub n: usize,
    /// Most new tokens per sample.
    pub max_new_tokens: usize,
    /// Sampling (the log-probs use its temperature).
    pub sampling: SamplingParams,
    /// Sample `p × n + j` draws from stream (seed, that row).
    pub seed: u64,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Also compute the reference log-probs (adapter disabled).
    pub reference: bool,
}

/// One sampled completion.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Index of its prompt.
    pub prompt: usize,
    /// Completion ids (with the EOS id when it ended on one).
    pub ids: Vec<u32>,
    /// Its text (special tokens skipped, cut before a stop string).
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Per completion token: log-prob under the sampling policy.
    pub logp: Vec<f64>,
    /// Per completion token: log-prob under the reference (empty unless asked).
    pub ref_logp: Vec<f64>,
}

/// A completion to train on with its per-token inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct UpdateSample {
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Completion ids.
    pub completion: Vec<u32>,
    /// Per completion token: log-prob when it was sampled (or at the start of this round of updates).
    pub old_logp: Vec<f64>,
    /// Per completion token: reference log-prob (needed when β > 0).
    pub ref_logp: Vec<f64>,
    /// Per completion token: advantage.
    pub advantages: Vec<f64>,
    /// Masked out (TRL's `mask_truncated_completions`): counts in the normalisation, trains nothing.
    pub masked: bool,
}

/// What an update did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateReport {
    /// The loss of the update.
    pub loss: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Clip and KL sums over the update's tokens.
    pub stats: LossStats,
    /// Updates done by the session so far (this one included).
    pub updates: usize,
}

/// An open session.
pub struct PolicySession {
    /// The policy (base + adapter).
    pub model: CausalLm,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// EOS and pad ids.
    pub defaults: ModelDefaults,
    trainer: Trainer,
    state: LoraState,
    updates: usize,
}

impl PolicySession {
    /// Loads the base, adds (or loads) the adapter and builds the trainer.
    pub fn open(spec: &SessionSpec) -> Result<Self> {
        let tokenizer = Tokenizer::from_dir(&spec.base)?;
        let defaults = ModelDefaults::from_dir(&spec.base, &tokenizer)?;
        let mut model = crate::load_model(&spec.base, spec.kind, spec.device)?;
        if spec.qlora {
            model.quantize_nf4()?;
        }
        let cfg = match &spec.adapter {
            AdapterInit::New(cfg) => {
                model.add_lora(cfg, spec.train.seed)?;
                cfg.clone()
            }
            AdapterInit::Continue(dir) => crate::lora::load_peft(&mut model, dir)?.lora_config(dir)?,
        };
        let state = LoraState { cfg, base_model: spec.base.display().to_string() };
        let trainer = Trainer::new(state.params(&mut model), &spec.train)?;
        Ok(Self { model, tokenizer, defaults, trainer, state, updates: 0 })
    }

    /// Updates done so far.
    pub fn updates(&self) -> usize {
        self.updates
    }

    /// Samples `n` completions per prompt (dropout off, no gradients) with their log-probs.
    pub fn rollout(&mut self, spec: &RolloutSpec, cancelled: &dyn Fn() -> bool) -> Result<Vec<Sample>> {
        if spec.n == 0 {
            return Err(CoreError::InvalidArgument("n: at least one sample per prompt".into()));
        }
        let _g = tch::no_grad_guard();
        self.model.set_training(false);
        let opts = GenerateOptions {
            max_new_tokens: spec.max_new_tokens,
            sampling: spec.sampling,
            seed: spec.seed,
            eos_ids: self.defaults.eos_ids.clone(),
            stop_strings: spec.stop.clone(),
            pad_id: self.defaults.pad_id,
        };
        // QLoRA: the rollout phase runs on dense copies of the NF4 weights (freed afterwards), not on weights
        // dequantized again at every token.
        self.model.hold_dense(true)?;
        let gen = generate_groups(&self.model, &self.tokenizer, &spec.prompts, spec.n, &opts, &mut |_| {}, cancelled);
        self.model.hold_dense(false)?;
        let gen = gen?;
        let mut samples: Vec<Sample> = gen
            .into_iter()
            .enumerate()
            .map(|(i, g)| Sample {
                prompt: i / spec.n,
                ids: g.ids,
                text: g.text,
                finish: g.finish_reason,
                logp: vec![],
                ref_logp: vec![],
            })
            .collect();
        let seqs: Vec<SftExample> = samples.iter().map(|s| example(&spec.prompts[s.prompt], &s.ids)).collect();
        let temperature = if spec.sampling.greedy { 1.0 } else { f64::from(spec.sampling.temperature) };
        let pad = self.defaults.pad_id;
        let pol = token_stats(&self.model, &seqs, pad, temperature, Pass::Reference)?;
        for (s, lp) in samples.iter_mut().zip(split(&to_vec(&pol.logp)?, &pol.counts)) {
            s.logp = lp;
        }
        if spec.reference {
            let r = token_stats(&self.model.adapters_disabled(), &seqs, pad, temperature, Pass::Reference)?;
            for (s, lp) in samples.iter_mut().zip(split(&to_vec(&r.logp)?, &r.counts)) {
                s.ref_logp = lp;
            }
        }
        Ok(samples)
    }

    /// Teacher-forced per-token log-probs of `completion` after `prompt` under the current policy.
    pub fn logprobs(&self, prompt: &[u32], completion: &[u32], temperature: f64) -> Result<Vec<f64>> {
        let _g = tch::no_grad_guard();
        let st = token_stats(
            &self.model,
            &[example(prompt, completion)],
            self.defaults.pad_id,
            temperature,
            Pass::Reference,
        )?;
        to_vec(&st.logp)
    }

    /// One optimizer update at `lr` over `samples` in micro-batches of `micro_batch_size` (dropout on).
    pub fn update(
        &mut self,
        samples: &[UpdateSample],
        loss: &PolicyLoss,
        temperature: f64,
        lr: f64,
        micro_batch_size: usize,
    ) -> Result<UpdateReport> {
        loss.validate()?;
        if samples.is_empty() || micro_batch_size == 0 {
            return Err(CoreError::InvalidArgument("an update needs samples and micro_batch_size >= 1".into()));
        }
        if !(lr.is_finite() && lr >= 0.0) || !(temperature.is_finite() && temperature > 0.0) {
            return Err(CoreError::InvalidArgument(format!(
                "learning_rate ({lr}) must be >= 0 and temperature ({temperature}) > 0"
            )));
        }
        for (i, s) in samples.iter().enumerate() {
            let n = s.completion.len();
            let refs_ok = loss.beta == 0.0 || s.ref_logp.len() == n;
            if s.prompt.is_empty() || n == 0 || s.old_logp.len() != n || s.advantages.len() != n || !refs_ok {
                return Err(CoreError::InvalidArgument(format!(
                    "samples[{i}]: {} prompt ids, {n} completion ids, {} old log-probs, {} advantages, {} reference \
                     log-probs: every per-token list needs one value per completion token{}",
                    s.prompt.len(),
                    s.old_logp.len(),
                    s.advantages.len(),
                    s.ref_logp.len(),
                    if loss.beta > 0.0 { " (reference log-probs too, beta > 0)" } else { "" }
                )));
            }
        }
        let chunks: Vec<&[UpdateSample]> = samples.chunks(micro_batch_size).collect();
        let tokens: usize = samples.iter().filter(|s| !s.masked).map(|s| s.completion.len()).sum();
        let units = loss.units(chunks.len(), tokens);
        let pad = self.defaults.pad_id;
        let mut stats = LossStats::default();
        self.model.set_training(true);
        let report = self.trainer.update(&mut self.model, chunks.len(), units, lr, &mut |model, i, scale| {
            let chunk = chunks[i];
            let live: Vec<&UpdateSample> = chunk.iter().filter(|s| !s.masked).collect();
            let counts: Vec<usize> = chunk.iter().map(|s| if s.masked { 0 } else { s.completion.len() }).collect();
            if live.is_empty() {
                return Ok(LossSum { nll: 0.0, tokens: 0 });
            }
            let seqs: Vec<SftExample> = live.iter().map(|s| example(&s.prompt, &s.completion)).collect();
            let st = token_stats(model, &seqs, pad, temperature, Pass::Reference)?;
            let flat = |f: &dyn Fn(&UpdateSample) -> &[f64]| {
                let v: Vec<f64> = live.iter().flat_map(|s| f(s).iter().copied()).collect();
                Tensor::from_slice(&v).to_device(st.logp.device())
            };
            let old = flat(&|s| &s.old_logp);
            let adv = flat(&|s| &s.advantages);
            let refp = (loss.beta > 0.0).then(|| flat(&|s| &s.ref_logp));
            let logp = st.logp.f_to_kind(Kind::Double)?;
            let (l, s) = micro_batch_loss(loss, &logp, &old, refp.as_ref(), &adv, &counts)?;
            stats.add(&s);
            l.f_mul_scalar(scale)?.f_backward()?;
            Ok(LossSum { nll: l.f_double_value(&[])?, tokens: s.tokens as usize })
        })?;
        self.model.set_training(false);
        self.updates += 1;
        Ok(UpdateReport {
            loss: report.loss_sum / report.units.max(1) as f64,
            grad_norm: report.grad_norm,
            stats,
            updates: self.updates,
        })
    }

    /// Saves the adapter, the optimizer and the counters into `root/step-<updates>` as run `run_id` (the
    /// newest `keep` of that run kept) and returns that directory; its adapter is a PEFT adapter.
    pub fn checkpoint(&mut self, root: &Path, keep: usize, run_id: &str) -> Result<PathBuf> {
        let mut pos = Position { step: self.updates, ..Default::default() };
        self.trainer.record(&mut pos);
        checkpoint::save(root, &mut self.model, &self.state, &self.trainer.opt, &pos, keep, Some(run_id))
    }

    /// Restores run `run_id`'s checkpoint of `updates` updates under `root` (written by [`Self::checkpoint`]),
    /// or its newest intact one when `updates` is None; false when there is none.
    pub fn restore(&mut self, root: &Path, run_id: &str, updates: Option<usize>) -> Result<bool> {
        let dir = match updates {
            None => super::newest_intact(root, Some(run_id))?,
            Some(n) => {
                let dir = root.join(format!("step-{n:08}"));
                let ours = checkpoint::candidates(root, Some(run_id))?.contains(&dir);
                if !ours {
                    return Err(CoreError::FailedPrecondition(format!(
                        "{}: no checkpoint of session `{run_id}` after {n} updates",
                        root.display()
                    )));
                }
                checkpoint::verify(&dir)?;
                Some(dir)
            }
        };
        let Some(dir) = dir else { return Ok(false) };
        self.state.load(&mut self.model, &dir)?;
        self.trainer = Trainer::new(self.state.params(&mut self.model), &self.trainer_cfg())?;
        let pos = checkpoint::load(&dir, &mut self.trainer.opt)?;
        self.trainer.restore(&pos);
        self.updates = pos.step;
        Ok(true)
    }

    fn trainer_cfg(&self) -> TrainConfig {
        self.trainer.config.clone()
    }

    /// Saves the adapter alone (PEFT format) into `dir`.
    pub fn save_adapter(&mut self, dir: &Path) -> Result<()> {
        self.state.save(&mut self.model, dir)
    }
}

fn example(prompt: &[u32], completion: &[u32]) -> SftExample {
    let ids: Vec<u32> = prompt.iter().chain(completion).copied().collect();
    let labels = prompt.iter().map(|_| -100).chain(completion.iter().map(|&t| i64::from(t))).collect();
    SftExample::new(ids, labels)
}
