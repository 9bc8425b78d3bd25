//! A policy training session: a base model with a trainable LoRA adapter (new, or continued from a saved
//! one) and its [`Trainer`], pinned on one device, driven step by step from outside — by an RL orchestrator
//! over gRPC — instead of by the data loop. [`PolicySession::rollout`] samples `n` completions per prompt and
//! gives the sampling policy's per-token log-probs (teacher-forced, logits / temperature, as TRL) and, when
//! asked, the reference's (the adapter disabled); [`PolicySession::update`] runs one optimizer update of the
//! clipped policy loss ([`super::grpo`]) over completions with their per-token advantages;
//! [`PolicySession::checkpoint`] / [`PolicySession::restore`] save and restore the adapter, the optimizer and
//! the counters, so a session survives a restart of its server. With a value head (PPO) rollouts also give
//! each completion token's value, and an update may use PPO's loss (clipped policy loss + `vf_coef` × clipped
//! value loss, token means over the update, as [`super::ppo_objective`]).

use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use super::grpo::{micro_batch_loss, LossStats, PolicyLoss};
use super::ppo::{policy_loss, value_loss};
use super::ppo_objective::{split, to_vec, token_stats, Pass, PolicyValueState};
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
    /// A zero-initialised value head on the trunk (PPO), trained and checkpointed with the adapter.
    pub value_head: bool,
    /// Compute dtype.
    pub kind: Kind,
    /// Device.
    pub device: Device,
    /// The base's layers across several devices ([`crate::models::device_map`]; `None`: all on `device`).
    pub device_map: Option<serde_json::Value>,
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
    /// Compute the sampling policy's teacher-forced log-probs (and the values, with a value head): one more
    /// forward pass over every completion. Off, `logp` and `values` stay empty — what an on-policy update
    /// ([`crate::train::grpo::PolicyLoss::on_policy`]) or an evaluation needs.
    pub logprobs: bool,
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
    /// Per completion token: the value head's estimate (empty without a value head).
    pub values: Vec<f64>,
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
    /// PPO: per completion token, the return (the value loss's target).
    pub returns: Vec<f64>,
    /// PPO: per completion token, the value when it was sampled (the value clip's centre).
    pub old_values: Vec<f64>,
}

/// PPO's update loss (TRL `PPOTrainer`): the clipped policy loss plus `vf_coef` × the clipped value loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PpoLoss {
    /// Policy ratio clip ε.
    pub cliprange: f64,
    /// Value clip ε.
    pub cliprange_value: f64,
    /// Weight of the value loss.
    pub vf_coef: f64,
}

/// The loss of an update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum UpdateLoss {
    /// GRPO-family clipped policy loss ([`super::grpo`]).
    Clipped(PolicyLoss),
    /// PPO with the value head.
    Ppo(PpoLoss),
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
    /// PPO: Σ over micro-batches of tokens × (policy loss, value loss, approximate KL, value clip fraction).
    pub ppo: Option<[f64; 4]>,
}

/// An open session.
pub struct PolicySession {
    /// The policy (base + adapter).
    pub model: CausalLm,
    /// Its tokenizer.
    pub tokenizer: Tokenizer,
    /// EOS and pad ids.
    pub defaults: ModelDefaults,
    /// Where rollouts stop: the EOS ids and the chat template's turn end (the base's template, or the one a
    /// continued adapter was trained with), as [`crate::ModelBundle::stop_ids`] for generation.
    pub stop_ids: Vec<u32>,
    trainer: Trainer,
    state: Box<dyn TrainableState + Send>,
    updates: usize,
}

/// The model's weights held for a rollout phase ([`CausalLm::hold_dense`]), released when this is dropped —
/// on every path out of the phase, errors and panics included (a caught panic leaves the session open, and
/// stale folded weights would otherwise outlive the next update).
struct HeldWeights<'a>(&'a mut CausalLm);

impl<'a> HeldWeights<'a> {
    fn new(model: &'a mut CausalLm) -> Result<Self> {
        let held = Self(model);
        held.0.hold_dense(true)?;
        Ok(held)
    }
}

impl Drop for HeldWeights<'_> {
    fn drop(&mut self) {
        // Releasing only drops tensors.
        let _ = self.0.hold_dense(false);
    }
}

impl PolicySession {
    /// Loads the base, adds (or loads) the adapter and builds the trainer.
    pub fn open(spec: &SessionSpec) -> Result<Self> {
        let tokenizer = Tokenizer::from_dir(&spec.base)?;
        let defaults = ModelDefaults::from_dir(&spec.base, &tokenizer)?;
        let mut templates = vec![crate::chat::ChatTemplate::from_dir(&spec.base)?.source().to_owned()];
        if let AdapterInit::Continue(dir) = &spec.adapter {
            let jinja = dir.join("chat_template.jinja");
            if crate::fsx::is_file(&jinja) {
                templates.push(crate::fsx::read_to_string(&jinja).map_err(|e| CoreError::io(&jinja, e))?);
            }
        }
        let sources: Vec<&str> = templates.iter().map(String::as_str).collect();
        let stop_ids = crate::chat::stop_ids(&defaults.eos_ids, &sources, &tokenizer);
        let mut model = crate::models::load_model_placed(&spec.base, spec.kind, spec.device, spec.device_map.as_ref())?;
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
        let base_model = spec.base.display().to_string();
        let state: Box<dyn TrainableState + Send> = if spec.value_head {
            model.add_value_head()?;
            Box::new(PolicyValueState { cfg, base_model })
        } else {
            Box::new(LoraState { cfg, base_model })
        };
        let trainer = Trainer::new(state.params(&mut model), &spec.train)?;
        Ok(Self { model, tokenizer, defaults, stop_ids, trainer, state, updates: 0 })
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
            eos_ids: self.stop_ids.clone(),
            stop_strings: spec.stop.clone(),
            pad_id: self.defaults.pad_id,
        };
        // The rollout phase runs on dense weights held for it: each LoRA adapter folded into its base, NF4
        // weights dequantized once instead of at every token; released on every way out, a panic included.
        let gen = {
            let held = HeldWeights::new(&mut self.model)?;
            generate_groups(held.0, &self.tokenizer, &spec.prompts, spec.n, &opts, &mut |_| {}, cancelled)?
        };
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
                values: vec![],
            })
            .collect();
        let seqs: Vec<SftExample> = samples.iter().map(|s| example(&spec.prompts[s.prompt], &s.ids)).collect();
        let temperature = if spec.sampling.greedy { 1.0 } else { f64::from(spec.sampling.temperature) };
        let pad = self.defaults.pad_id;
        if spec.logprobs {
            let pass = if self.model.score.is_some() { Pass::Rollout } else { Pass::Reference };
            let pol = token_stats(&self.model, &seqs, pad, temperature, pass)?;
            for (s, lp) in samples.iter_mut().zip(split(&to_vec(&pol.logp)?, &pol.counts)) {
                s.logp = lp;
            }
            if let Some(v) = pol.values() {
                for (s, v) in samples.iter_mut().zip(split(&to_vec(v)?, &pol.counts)) {
                    s.values = v;
                }
            }
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
        loss: &UpdateLoss,
        temperature: f64,
        lr: f64,
        micro_batch_size: usize,
    ) -> Result<UpdateReport> {
        let (beta, on_policy) = match loss {
            UpdateLoss::Clipped(l) => {
                l.validate()?;
                (l.beta, l.on_policy)
            }
            UpdateLoss::Ppo(p) => {
                if self.model.score.is_none() {
                    return Err(CoreError::FailedPrecondition(
                        "the PPO loss needs a value head: open the session with value_head".into(),
                    ));
                }
                if !(p.cliprange > 0.0 && p.cliprange < 1.0 && p.cliprange_value > 0.0 && p.vf_coef >= 0.0) {
                    return Err(CoreError::InvalidArgument(format!("PPO loss settings out of range: {p:?}")));
                }
                (0.0, false)
            }
        };
        let ppo = matches!(loss, UpdateLoss::Ppo(_));
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
            let refs_ok = beta == 0.0 || s.ref_logp.len() == n;
            let ppo_ok = !ppo || (s.returns.len() == n && s.old_values.len() == n);
            let old_ok = if on_policy { s.old_logp.is_empty() } else { s.old_logp.len() == n };
            if s.prompt.is_empty() || n == 0 || !old_ok || s.advantages.len() != n || !refs_ok || !ppo_ok {
                return Err(CoreError::InvalidArgument(format!(
                    "samples[{i}]: {} prompt ids, {n} completion ids, {} old log-probs, {} advantages, {} reference \
                     log-probs, {} returns, {} old values: every per-token list needs one value per completion \
                     token{}{}{}",
                    s.prompt.len(),
                    s.old_logp.len(),
                    s.advantages.len(),
                    s.ref_logp.len(),
                    s.returns.len(),
                    s.old_values.len(),
                    if beta > 0.0 { " (reference log-probs too, beta > 0)" } else { "" },
                    if ppo { " (returns and old values too, PPO)" } else { "" },
                    if on_policy { " (no old log-probs: the update is on-policy)" } else { "" }
                )));
            }
        }
        let chunks: Vec<&[UpdateSample]> = samples.chunks(micro_batch_size).collect();
        let tokens: usize = samples.iter().filter(|s| !s.masked).map(|s| s.completion.len()).sum();
        let units = match loss {
            UpdateLoss::Clipped(l) => l.units(chunks.len(), tokens),
            // Token means over the whole update, as TRL's PPO mini-batch.
            UpdateLoss::Ppo(_) => tokens.max(1),
        };
        let pad = self.defaults.pad_id;
        let mut stats = LossStats::default();
        let mut ppo_sums = [0.0; 4];
        self.model.set_training(true);
        let report = self.trainer.update(&mut self.model, chunks.len(), units, lr, &mut |model, i, scale| {
            let chunk = chunks[i];
            let live: Vec<&UpdateSample> = chunk.iter().filter(|s| !s.masked).collect();
            let counts: Vec<usize> = chunk.iter().map(|s| if s.masked { 0 } else { s.completion.len() }).collect();
            if live.is_empty() {
                return Ok(LossSum { nll: 0.0, tokens: 0 });
            }
            let seqs: Vec<SftExample> = live.iter().map(|s| example(&s.prompt, &s.completion)).collect();
            let st = token_stats(model, &seqs, pad, temperature, Pass::Update)?;
            let flat = |f: &dyn Fn(&UpdateSample) -> &[f64]| {
                let v: Vec<f64> = live.iter().flat_map(|s| f(s).iter().copied()).collect();
                Tensor::from_slice(&v).to_device(st.logp.device())
            };
            let adv = flat(&|s| &s.advantages);
            let logp = st.logp.f_to_kind(Kind::Double)?;
            let old = if on_policy { logp.f_detach()? } else { flat(&|s| &s.old_logp) };
            let (l, n) = match loss {
                UpdateLoss::Clipped(cfg) => {
                    let refp = (cfg.beta > 0.0).then(|| flat(&|s| &s.ref_logp));
                    let (l, s) = micro_batch_loss(cfg, &logp, &old, refp.as_ref(), &adv, &counts)?;
                    stats.add(&s);
                    (l, s.tokens as usize)
                }
                UpdateLoss::Ppo(p) => {
                    // The micro-batch's token sum of (policy loss + vf_coef × value loss); the update divides
                    // by the update's tokens.
                    let n: usize = st.counts.iter().sum();
                    let values =
                        st.values().ok_or_else(|| CoreError::Internal("no values from the value head".into()))?;
                    let values = values.f_to_kind(Kind::Double)?;
                    let mask = Tensor::f_ones([n as i64], (Kind::Double, logp.device()))?;
                    let (pg, clipfrac) = policy_loss(&logp, &old, &adv, &mask, p.cliprange)?;
                    let old_v = flat(&|s| &s.old_values);
                    let vf = value_loss(&values, &old_v, &flat(&|s| &s.returns), &mask, p.cliprange_value)?;
                    let _g = tch::no_grad_guard();
                    let diff = logp.f_detach()?.f_sub(&old)?;
                    let approxkl = diff.f_square()?.f_mean(Kind::Double)?.f_double_value(&[])? * 0.5;
                    let vclip = values
                        .f_detach()?
                        .f_sub(&old_v)?
                        .f_abs()?
                        .f_gt(p.cliprange_value)?
                        .f_to_kind(Kind::Double)?
                        .f_mean(Kind::Double)?
                        .f_double_value(&[])?;
                    let w = n as f64;
                    for (k, v) in
                        [pg.f_double_value(&[])?, vf.f_double_value(&[])?, approxkl, vclip].into_iter().enumerate()
                    {
                        ppo_sums[k] += w * v;
                    }
                    stats.add(&LossStats { tokens: w, clipped_low: 0.0, clipped_high: w * clipfrac, kl: 0.0 });
                    drop(_g);
                    (pg.f_add(&vf.f_mul_scalar(p.vf_coef)?)?.f_mul_scalar(w)?, n)
                }
            };
            l.f_mul_scalar(scale)?.f_backward()?;
            Ok(LossSum { nll: l.f_double_value(&[])?, tokens: n })
        })?;
        self.model.set_training(false);
        self.updates += 1;
        Ok(UpdateReport {
            loss: report.loss_sum / report.units.max(1) as f64,
            grad_norm: report.grad_norm,
            stats,
            updates: self.updates,
            ppo: ppo.then_some(ppo_sums),
        })
    }

    /// Saves the adapter, the optimizer and the counters into `root/step-<updates>` as run `run_id` (the
    /// newest `keep` of that run kept) and returns that directory; its adapter is a PEFT adapter.
    pub fn checkpoint(&mut self, root: &Path, keep: usize, run_id: &str) -> Result<PathBuf> {
        let mut pos = Position { step: self.updates, ..Default::default() };
        self.trainer.record(&mut pos);
        checkpoint::save(root, &mut self.model, self.state.as_ref(), &self.trainer.opt, &pos, keep, Some(run_id))
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
