//! PPO as an [`Objective`] of the one training loop (TRL's `PPOTrainer` recipe on LoRA adapters with a value
//! head on the shared trunk). Each optimizer step of the loop is one PPO iteration:
//!
//! 1. [`Objective::prepare`]: the step's prompts are answered by sampling from the policy (dropout off,
//!    `temperature`); a teacher-forced pass gives each response token's log-prob (logits / temperature, as
//!    TRL) and value, a second pass with the adapters disabled the reference log-probs; the scorer (the
//!    reward service) scores each (prompt, response); per-token rewards are `−kl_coef·kl` plus the score at
//!    the last token (minus `missing_eos_penalty` when no EOS was generated); GAE gives advantages (whitened
//!    over the batch) and returns; the adaptive KL coefficient moves toward its target.
//! 2. `ppo_epochs × num_mini_batches` updates over those rollouts: clipped policy loss + `vf_coef` × clipped
//!    value loss, a token-level mean over the mini-batch.
//!
//! Held-out evaluation samples answers to the eval prompts with a fixed seed and reports their mean score
//! (`eval_loss` is its negative).

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::logps::scored_rows;
use super::loss::LossSum;
use super::ppo::{gae, policy_loss, token_kl, token_rewards, value_loss, whiten, AdaptiveKl, KlEstimator};
use super::sft::{SftExample, SftObjective};
use super::{epoch_order, Algorithm, MetricSums, TrainableState, Trainer, UpdateStats};
use crate::error::{CoreError, Result};
use crate::generation::{generate, FinishReason, GenerateOptions};
use crate::lora::{load_peft, save_peft, LoraConfig};
use crate::models::CausalLm;
use crate::sampling::SamplingParams;
use crate::tokenizer::Tokenizer;
use crate::weights::WeightFiles;

/// The value head's file beside the adapter, and its tensor name.
pub const VALUE_HEAD_FILE: &str = "value_head.safetensors";
const VALUE_KEY: &str = "v_head.weight";

/// Where scores come from: a rule or a trained reward model (the reward service interprets it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSource {
    /// A rule: `regex:…`, `exact:…`, `prefix:…` or `length`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The reward model's base (a known name or a directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The reward model's SEQ_CLS adapter directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<PathBuf>,
}

/// PPO hyperparameters (TRL's `PPOConfig` names and defaults unless noted).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PpoConfig {
    /// The reward.
    pub reward: RewardSource,
    /// Longest response (TRL's `response_length`).
    pub max_new_tokens: usize,
    /// Sampling temperature of the rollouts (and of the log-probs).
    pub temperature: f64,
    /// Passes over each batch of rollouts.
    pub ppo_epochs: usize,
    /// Updates per pass (the step's micro-batches split into this many groups).
    pub num_mini_batches: usize,
    /// Initial (or fixed) KL coefficient β.
    pub kl_coef: f64,
    /// `k1` or `k3`.
    pub kl_estimator: KlEstimator,
    /// Adaptive KL: the target per-response KL (absent = fixed coefficient).
    pub target_kl: Option<f64>,
    /// Adaptive KL: horizon in samples.
    pub kl_horizon: f64,
    /// GAE discount γ.
    pub gamma: f64,
    /// GAE λ.
    pub lam: f64,
    /// Policy ratio clip ε.
    pub cliprange: f64,
    /// Value clip ε.
    pub cliprange_value: f64,
    /// Weight of the value loss.
    pub vf_coef: f64,
    /// Subtracted from the score of a response that did not end with EOS (0 = off).
    pub missing_eos_penalty: f64,
    /// Whiten the per-token rewards over the batch before GAE.
    pub whiten_rewards: bool,
    /// Samples per held-out prompt in evaluation.
    pub eval_samples: usize,
}

impl Default for PpoConfig {
    fn default() -> Self {
        Self {
            reward: RewardSource::default(),
            max_new_tokens: 53,
            temperature: 0.7,
            ppo_epochs: 4,
            num_mini_batches: 1,
            kl_coef: 0.05,
            kl_estimator: KlEstimator::K1,
            target_kl: None,
            kl_horizon: 10000.0,
            gamma: 1.0,
            lam: 0.95,
            cliprange: 0.2,
            cliprange_value: 0.2,
            vf_coef: 0.1,
            missing_eos_penalty: 0.0,
            whiten_rewards: false,
            eval_samples: 1,
        }
    }
}

impl PpoConfig {
    /// Rejects values no run can use, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CoreError::InvalidArgument(format!("ppo.{m}")));
        match (&self.reward.rule, &self.reward.model, &self.reward.adapter) {
            (Some(r), None, None) if !r.is_empty() => {}
            (None, Some(_), Some(_)) => {}
            _ => return bad("reward: set either `rule` or both `model` and `adapter`".into()),
        }
        if self.max_new_tokens == 0 || self.max_new_tokens > 4096 {
            return bad(format!("max_new_tokens must be in 1..=4096, got {}", self.max_new_tokens));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) {
            return bad(format!("temperature must be > 0, got {}", self.temperature));
        }
        if self.ppo_epochs == 0 || self.num_mini_batches == 0 || self.eval_samples == 0 {
            return bad("ppo_epochs, num_mini_batches and eval_samples must be at least 1".into());
        }
        if !(self.kl_coef.is_finite() && self.kl_coef >= 0.0) {
            return bad(format!("kl_coef must be >= 0, got {}", self.kl_coef));
        }
        if self.target_kl.is_some_and(|t| !(t.is_finite() && t > 0.0)) || !(self.kl_horizon > 0.0) {
            return bad("target_kl and kl_horizon must be positive".into());
        }
        if !(0.0..=1.0).contains(&self.gamma) || !(0.0..=1.0).contains(&self.lam) {
            return bad(format!("gamma and lam must be in [0, 1], got {} and {}", self.gamma, self.lam));
        }
        if !(self.cliprange > 0.0 && self.cliprange < 1.0) || !(self.cliprange_value > 0.0) {
            return bad("cliprange must be in (0, 1) and cliprange_value > 0".into());
        }
        if !(self.vf_coef.is_finite() && self.vf_coef >= 0.0)
            || !(self.missing_eos_penalty.is_finite() && self.missing_eos_penalty >= 0.0)
        {
            return bad("vf_coef and missing_eos_penalty must be >= 0".into());
        }
        Ok(())
    }
}

/// A prompt: the chat-rendered ids (ending with the generation prompt) and the text the scorer sees.
#[derive(Debug, Clone, PartialEq)]
pub struct PpoPrompt {
    /// Rendered prompt ids.
    pub ids: Vec<u32>,
    /// The user's text (what the reward model / rule is given as the prompt).
    pub text: String,
}

/// One sampled response with everything the updates need.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// Prompt ids.
    pub prompt: Vec<u32>,
    /// Response ids (with the EOS id when it ended on one).
    pub response: Vec<u32>,
    /// Whether it ended with EOS.
    pub ended_with_eos: bool,
    /// The response's text (without EOS).
    pub text: String,
    /// The score.
    pub score: f64,
    /// Per response token: log-prob under the sampling policy.
    pub logp: Vec<f64>,
    /// Per response token: log-prob under the reference (adapters disabled).
    pub ref_logp: Vec<f64>,
    /// Per response token: the value estimate when it was sampled.
    pub values: Vec<f64>,
    /// Per response token: whitened advantage.
    pub advantages: Vec<f64>,
    /// Per response token: return (advantage before whitening + value).
    pub returns: Vec<f64>,
}

impl Rollout {
    fn example(&self) -> SftExample {
        let ids: Vec<u32> = self.prompt.iter().chain(&self.response).copied().collect();
        let labels = self.prompt.iter().map(|_| -100).chain(self.response.iter().map(|&t| t as i64)).collect();
        SftExample::new(ids, labels)
    }
}

/// The sampling seed of step `step`'s rollouts (row i of the batch draws from stream (this, i)).
pub fn rollout_seed(seed: u64, step: usize) -> u64 {
    seed ^ (step as u64 + 1).wrapping_mul(0xA24B_AED4_963E_E407)
}

/// Scores (prompt text, response text) pairs.
pub type Scorer<'a> = dyn Fn(&[(String, String)]) -> Result<Vec<f64>> + 'a;

/// Which teacher-forced pass over rollouts: what it computes besides the log-probs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pass {
    /// The policy when sampling: values and entropies (for metrics), no gradients.
    Rollout,
    /// The reference (adapters disabled): log-probs only.
    Reference,
    /// An update, with gradients: values too with a value head (PPO).
    Update,
}

/// Per-token log-probs (logits / temperature), entropies and values of `seqs`' labelled tokens, flat in
/// sequence order, as the [`Pass`] asks; values need the value head.
pub(crate) struct TokenStats {
    pub(crate) logp: Tensor,
    entropy: Option<Tensor>,
    values: Option<Tensor>,
    /// Tokens of each sequence.
    pub(crate) counts: Vec<usize>,
}

impl TokenStats {
    /// The value estimates (with a value head, in a rollout or update pass).
    pub(crate) fn values(&self) -> Option<&Tensor> {
        self.values.as_ref()
    }
}

/// Sequences per forward pass of a pass without gradients.
const NO_GRAD_BATCH: usize = 16;

/// With [`Pass::Rollout`] or [`Pass::Update`], values come from the value head when the model has one.
/// Without gradients (rollout and reference passes), longer lists go through in batches of
/// [`NO_GRAD_BATCH`] sequences of similar length, longest first, so each batch pads only to its own longest
/// instead of every sequence to the longest of all (a group's completions range from a few tokens to
/// `max_new_tokens`); the results come back in the sequences' order.
pub(crate) fn token_stats(
    model: &CausalLm,
    seqs: &[SftExample],
    pad_id: u32,
    temperature: f64,
    pass: Pass,
) -> Result<TokenStats> {
    let all: Vec<&SftExample> = seqs.iter().collect();
    if pass == Pass::Update || seqs.len() <= NO_GRAD_BATCH {
        return batch_stats(model, &all, pad_id, temperature, pass);
    }
    let mut order: Vec<usize> = (0..seqs.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(seqs[i].input_ids.len()));
    let parts = order
        .chunks(NO_GRAD_BATCH)
        .map(|chunk| {
            let sub: Vec<&SftExample> = chunk.iter().map(|&i| &seqs[i]).collect();
            batch_stats(model, &sub, pad_id, temperature, pass)
        })
        .collect::<Result<Vec<_>>>()?;
    // Where each sequence's tokens are in the batches' concatenation, in the sequences' order.
    let counts = labelled_counts(&all);
    let mut start = vec![0; seqs.len()];
    let mut at = 0;
    for &i in &order {
        start[i] = at;
        at += counts[i];
    }
    let index: Vec<i64> = (0..seqs.len()).flat_map(|i| (start[i]..start[i] + counts[i]).map(|p| p as i64)).collect();
    let index = Tensor::f_from_slice(&index)?.f_to_device(parts[0].logp.device())?;
    let gather = |f: &dyn Fn(&TokenStats) -> Option<&Tensor>| -> Result<Option<Tensor>> {
        let Some(ts) = parts.iter().map(f).collect::<Option<Vec<&Tensor>>>() else { return Ok(None) };
        Ok(Some(Tensor::f_cat(&ts, 0)?.f_index_select(0, &index)?))
    };
    Ok(TokenStats {
        logp: gather(&|p| Some(&p.logp))?.ok_or_else(|| CoreError::Internal("no log-probs".into()))?,
        entropy: gather(&|p| p.entropy.as_ref())?,
        values: gather(&|p| p.values.as_ref())?,
        counts,
    })
}

/// Labelled (scored) tokens of each sequence.
fn labelled_counts(seqs: &[&SftExample]) -> Vec<usize> {
    seqs.iter().map(|s| s.labels.iter().skip(1).filter(|&&l| l != -100).count()).collect()
}

/// [`token_stats`] of `seqs` in one forward pass.
fn batch_stats(
    model: &CausalLm,
    seqs: &[&SftExample],
    pad_id: u32,
    temperature: f64,
    pass: Pass,
) -> Result<TokenStats> {
    let c = SftObjective { pad_id, chunk: 1, gradient_checkpointing: false }.collate(model, seqs)?;
    let hidden = model.forward_hidden(&c.ids, c.mask.as_ref(), c.positions.as_ref())?;
    let (rows, target, _) = scored_rows(&hidden, &c.labels)?;
    let logits = model.logits(&rows)?.f_to_kind(Kind::Float)?.f_div_scalar(temperature)?;
    let lp = logits.f_log_softmax(-1, Kind::Float)?;
    let logp = lp.f_gather(1, &target.f_unsqueeze(1)?, false)?.f_squeeze_dim(1)?;
    let entropy = if pass == Pass::Rollout {
        Some(lp.f_exp()?.f_mul(&lp)?.f_sum_dim_intlist(-1, false, Kind::Float)?.f_neg()?)
    } else {
        None
    };
    let values = match (&model.score, pass) {
        (Some(head), Pass::Rollout | Pass::Update) => {
            Some(rows.f_to_kind(Kind::Float)?.f_linear::<Tensor>(head, None)?.f_squeeze_dim(1)?)
        }
        _ => None,
    };
    Ok(TokenStats { logp, entropy, values, counts: labelled_counts(seqs) })
}

fn no_value_head() -> CoreError {
    CoreError::InvalidArgument("the policy has no value head".into())
}

pub(crate) fn to_vec(t: &Tensor) -> Result<Vec<f64>> {
    Ok(Vec::<f64>::try_from(&t.f_detach()?.f_to_kind(Kind::Double)?.f_to_device(tch::Device::Cpu)?)?)
}

/// `flat` cut into consecutive pieces of `counts[i]` values (per-token values of each completion).
pub fn split(flat: &[f64], counts: &[usize]) -> Vec<Vec<f64>> {
    let mut out = Vec::with_capacity(counts.len());
    let mut at = 0;
    for &n in counts {
        out.push(flat[at..at + n].to_vec());
        at += n;
    }
    out
}

/// The PPO objective: one unit per response token.
pub struct PpoObjective<'a> {
    /// Hyperparameters.
    pub cfg: PpoConfig,
    /// Padding id.
    pub pad_id: u32,
    /// Ids that end a response.
    pub eos_ids: Vec<u32>,
    /// Decodes responses.
    pub tokenizer: &'a Tokenizer,
    /// Scores responses (the reward service).
    pub scorer: &'a Scorer<'a>,
    /// The run seed (rollout sampling streams derive from it and the step).
    pub seed: u64,
    kl_coef: Cell<f64>,
    rollouts: RefCell<Vec<Vec<Rollout>>>,
    metrics: MetricSums,
}

impl<'a> PpoObjective<'a> {
    /// The objective.
    pub fn new(
        cfg: PpoConfig,
        pad_id: u32,
        eos_ids: Vec<u32>,
        tokenizer: &'a Tokenizer,
        scorer: &'a Scorer<'a>,
        seed: u64,
    ) -> Self {
        let kl = cfg.kl_coef;
        Self {
            cfg,
            pad_id,
            eos_ids,
            tokenizer,
            scorer,
            seed,
            kl_coef: Cell::new(kl),
            rollouts: RefCell::new(vec![]),
            metrics: MetricSums::default(),
        }
    }

    /// Samples one response per prompt (row i of the batch uses stream (seed, i)) and scores it.
    fn sample(&self, model: &CausalLm, prompts: &[&PpoPrompt], seed: u64) -> Result<Vec<Rollout>> {
        let opts = GenerateOptions {
            max_new_tokens: self.cfg.max_new_tokens,
            sampling: SamplingParams {
                greedy: false,
                temperature: self.cfg.temperature as f32,
                top_k: None,
                top_p: None,
                repetition_penalty: 1.0,
            },
            seed,
            eos_ids: self.eos_ids.clone(),
            stop_strings: vec![],
            pad_id: self.pad_id,
        };
        let ids: Vec<Vec<u32>> = prompts.iter().map(|p| p.ids.clone()).collect();
        let gen = generate(model, self.tokenizer, &ids, &opts, &mut |_| {})?;
        let items: Vec<(String, String)> =
            prompts.iter().zip(&gen).map(|(p, g)| (p.text.clone(), g.text.clone())).collect();
        let scores = (self.scorer)(&items)?;
        if scores.len() != gen.len() {
            return Err(CoreError::InvalidArgument(format!(
                "the scorer returned {} scores for {} responses",
                scores.len(),
                gen.len()
            )));
        }
        Ok(prompts
            .iter()
            .zip(gen)
            .zip(scores)
            .map(|((p, g), score)| Rollout {
                prompt: p.ids.clone(),
                ended_with_eos: g.finish_reason == FinishReason::Eos,
                response: g.ids,
                text: g.text,
                score,
                logp: vec![],
                ref_logp: vec![],
                values: vec![],
                advantages: vec![],
                returns: vec![],
            })
            .collect())
    }

    /// Rollouts for `prompts` with log-probs, reference log-probs, values, rewards, advantages and returns.
    pub fn rollouts(&self, model: &mut CausalLm, prompts: &[&PpoPrompt], step: usize) -> Result<Vec<Rollout>> {
        let _guard = tch::no_grad_guard();
        model.set_training(false);
        let mut rs = self.sample(model, prompts, rollout_seed(self.seed, step))?;
        let seqs: Vec<SftExample> = rs.iter().map(Rollout::example).collect();
        let pol = token_stats(model, &seqs, self.pad_id, self.cfg.temperature, Pass::Rollout)?;
        let reference =
            token_stats(&model.adapters_disabled(), &seqs, self.pad_id, self.cfg.temperature, Pass::Reference)?;
        let (logp, ref_logp) = (split(&to_vec(&pol.logp)?, &pol.counts), split(&to_vec(&reference.logp)?, &pol.counts));
        let values = split(&to_vec(pol.values.as_ref().ok_or_else(no_value_head)?)?, &pol.counts);
        let entropy = split(&to_vec(pol.entropy.as_ref().expect("rollout pass"))?, &pol.counts);
        let beta = self.kl_coef.get();
        let mut rewards = Vec::with_capacity(rs.len());
        let mut kl_sums = Vec::with_capacity(rs.len());
        for (i, r) in rs.iter_mut().enumerate() {
            r.logp = logp[i].clone();
            r.ref_logp = ref_logp[i].clone();
            r.values = values[i].clone();
            let kl = token_kl(&r.logp, &r.ref_logp, self.cfg.kl_estimator);
            let kl_sum: f64 = kl.iter().sum();
            kl_sums.push(kl_sum);
            self.metrics.add(
                "",
                &[
                    ("objective/scores", r.score),
                    ("objective/kl", kl_sum),
                    ("objective/entropy", -r.logp.iter().sum::<f64>()),
                    ("objective/non_score_reward", -beta * kl_sum),
                    ("objective/rlhf_reward", r.score - beta * kl_sum),
                    ("policy/entropy_avg", entropy[i].iter().sum::<f64>() / entropy[i].len().max(1) as f64),
                    ("val/response_length", r.response.len() as f64),
                    ("val/eos_fraction", f64::from(u8::from(r.ended_with_eos))),
                    ("objective/kl_coef", beta),
                ],
            );
            rewards.push(token_rewards(&kl, beta, r.score, r.ended_with_eos, self.cfg.missing_eos_penalty));
        }
        if self.cfg.whiten_rewards {
            let mut flat: Vec<f64> = rewards.concat();
            whiten(&mut flat, false);
            let counts: Vec<usize> = rewards.iter().map(Vec::len).collect();
            rewards = split(&flat, &counts);
        }
        for (r, rew) in rs.iter_mut().zip(&rewards) {
            let (adv, ret) = gae(rew, &r.values, self.cfg.gamma, self.cfg.lam);
            r.advantages = adv;
            r.returns = ret;
        }
        let mut flat: Vec<f64> = rs.iter().flat_map(|r| r.advantages.iter().copied()).collect();
        whiten(&mut flat, true);
        let counts: Vec<usize> = rs.iter().map(|r| r.advantages.len()).collect();
        for (r, a) in rs.iter_mut().zip(split(&flat, &counts)) {
            r.advantages = a;
        }
        if let Some(target) = self.cfg.target_kl {
            let mut k = AdaptiveKl { value: beta, target, horizon: self.cfg.kl_horizon };
            k.update(kl_sums.iter().sum::<f64>() / kl_sums.len().max(1) as f64, rs.len());
            self.kl_coef.set(k.value);
        }
        Ok(rs)
    }

    /// The PPO loss over `rs` (token mean of clipped policy loss + vf_coef × clipped value loss) times the
    /// token count, with gradients; records the update metrics.
    fn update_loss(&self, model: &CausalLm, rs: &[Rollout]) -> Result<(Tensor, usize)> {
        let seqs: Vec<SftExample> = rs.iter().map(Rollout::example).collect();
        let st = token_stats(model, &seqs, self.pad_id, self.cfg.temperature, Pass::Update)?;
        let dev = st.logp.device();
        let flat = |f: &dyn Fn(&Rollout) -> &Vec<f64>| -> Result<Tensor> {
            let v: Vec<f32> = rs.iter().flat_map(|r| f(r).iter().map(|&x| x as f32)).collect();
            Ok(Tensor::f_from_slice(&v)?.f_to_device(dev)?)
        };
        let (old, adv, ret, old_v) =
            (flat(&|r| &r.logp)?, flat(&|r| &r.advantages)?, flat(&|r| &r.returns)?, flat(&|r| &r.values)?);
        let n: usize = st.counts.iter().sum();
        let mask = Tensor::f_ones([n as i64], (Kind::Float, dev))?;
        let values = st.values.as_ref().ok_or_else(no_value_head)?;
        let (pg, clipfrac) = policy_loss(&st.logp, &old, &adv, &mask, self.cfg.cliprange)?;
        let vf = value_loss(values, &old_v, &ret, &mask, self.cfg.cliprange_value)?;
        let loss = pg.f_add(&vf.f_mul_scalar(self.cfg.vf_coef)?)?.f_mul_scalar(n as f64)?;
        let _guard = tch::no_grad_guard();
        let diff = st.logp.f_sub(&old)?;
        let approxkl = diff.f_square()?.f_mean(Kind::Float)?.f_double_value(&[])? * 0.5;
        let vclip = values
            .f_sub(&old_v)?
            .f_abs()?
            .f_gt(self.cfg.cliprange_value)?
            .f_to_kind(Kind::Float)?
            .f_mean(Kind::Float)?
            .f_double_value(&[])?;
        let ratio = diff.f_exp()?.f_mean(Kind::Float)?.f_double_value(&[])?;
        self.metrics.add(
            "",
            &[
                ("policy/clipfrac_avg", clipfrac),
                ("policy/approxkl_avg", approxkl),
                ("loss/policy_avg", pg.f_double_value(&[])?),
                ("loss/value_avg", vf.f_double_value(&[])?),
                ("val/clipfrac_avg", vclip),
                ("val/ratio", ratio),
            ],
        );
        Ok((loss, n))
    }

    /// The current KL coefficient.
    pub fn kl_coef(&self) -> f64 {
        self.kl_coef.get()
    }
}

impl PpoObjective<'_> {
    /// Samples the step's rollouts (with the adapters as trained so far) and returns its updates: each a
    /// list of micro-batch indices whose accumulated gradients make one optimizer update — `ppo_epochs`
    /// passes, each over the micro-batches in a fresh order split into `num_mini_batches` updates.
    pub fn prepare(&self, model: &mut CausalLm, micro: &[Vec<&PpoPrompt>], step: usize) -> Result<Vec<Vec<usize>>> {
        let prompts: Vec<&PpoPrompt> = micro.iter().flatten().copied().collect();
        let mut all = self.rollouts(model, &prompts, step)?.into_iter();
        *self.rollouts.borrow_mut() = micro.iter().map(|mb| all.by_ref().take(mb.len()).collect()).collect();
        let k = micro.len();
        let per = k.div_ceil(self.cfg.num_mini_batches.min(k));
        let mut updates = vec![];
        for epoch in 0..self.cfg.ppo_epochs {
            let order = epoch_order(k, self.seed ^ step as u64, epoch);
            updates.extend(order.chunks(per).map(<[usize]>::to_vec));
        }
        Ok(updates)
    }

    /// Response tokens of micro-batch `index`'s rollouts (an update's normaliser).
    pub fn micro_units(&self, index: usize) -> usize {
        self.rollouts.borrow().get(index).map_or(0, |rs| rs.iter().map(|r| r.response.len()).sum())
    }

    /// Backward of `scale ×` the PPO loss of micro-batch `index`'s rollouts.
    pub fn backward_micro(&self, model: &CausalLm, index: usize, scale: f64) -> Result<LossSum> {
        let rollouts = self.rollouts.borrow();
        let rs = rollouts
            .get(index)
            .ok_or_else(|| CoreError::InvalidArgument(format!("PPO: no rollouts for micro-batch {index}")))?;
        let (loss, n) = self.update_loss(model, rs)?;
        let value = loss.f_double_value(&[])?;
        loss.f_mul_scalar(scale)?.f_backward()?;
        Ok(LossSum { nll: value, tokens: n })
    }
}

/// PPO drives the [`Trainer`] itself: rollouts, then `ppo_epochs × num_mini_batches` updates over them.
impl Algorithm for PpoObjective<'_> {
    type Example = PpoPrompt;

    fn step(
        &self,
        model: &mut CausalLm,
        trainer: &mut Trainer,
        micro: &[Vec<&PpoPrompt>],
        step: usize,
        lr: f64,
    ) -> Result<UpdateStats> {
        let updates = self.prepare(model, micro, step)?;
        model.set_training(true);
        let mut total = UpdateStats { loss_sum: 0.0, units: 0, grad_norm: 0.0, skipped: false, amp: 1.0 };
        for group in &updates {
            let units: usize = group.iter().map(|&i| self.micro_units(i)).sum();
            let u = trainer
                .update(model, group.len(), units, lr, &mut |m, k, scale| self.backward_micro(m, group[k], scale))?;
            // Each update's loss is a mean over its units; the step reports their mean.
            total = UpdateStats { loss_sum: total.loss_sum + u.loss_sum, units: total.units + u.units, ..u };
        }
        Ok(total)
    }

    fn eval(&self, model: &CausalLm, batch: &[&PpoPrompt]) -> Result<LossSum> {
        let _guard = tch::no_grad_guard();
        let prompts: Vec<&PpoPrompt> =
            batch.iter().flat_map(|p| std::iter::repeat_n(*p, self.cfg.eval_samples)).collect();
        let rs = self.sample(model, &prompts, self.seed ^ 0x0E7A_15EE_D000_0001)?;
        for r in &rs {
            self.metrics.add(
                "eval_",
                &[
                    ("objective/scores", r.score),
                    ("val/response_length", r.response.len() as f64),
                    ("val/eos_fraction", f64::from(u8::from(r.ended_with_eos))),
                ],
            );
        }
        Ok(LossSum { nll: -rs.iter().map(|r| r.score).sum::<f64>(), tokens: rs.len() })
    }

    fn take_metrics(&self) -> BTreeMap<String, f64> {
        self.metrics.take()
    }

    fn carried(&self) -> Option<f64> {
        Some(self.kl_coef.get())
    }

    fn restore_carried(&self, value: f64) {
        self.kl_coef.set(value);
    }
}

/// LoRA adapters plus the value head: the adapter saved PEFT-style (a plain causal-LM LoRA that
/// `generate --adapter` and PEFT load), the head beside it in [`VALUE_HEAD_FILE`].
pub struct PolicyValueState {
    /// The adapters' hyperparameters.
    pub cfg: LoraConfig,
    /// `base_model_name_or_path`.
    pub base_model: String,
}

impl CausalLm {
    /// Adds a zero-initialised value head `[1, hidden]` (kept in the `score` slot: one scalar head per model).
    pub fn add_value_head(&mut self) -> Result<()> {
        let h = self.cfg.hidden_size;
        self.score = Some(Tensor::f_zeros([1, h], (Kind::Float, self.device()))?.f_set_requires_grad(true)?);
        Ok(())
    }
}

impl TrainableState for PolicyValueState {
    fn params(&self, model: &mut CausalLm) -> Vec<(String, Tensor)> {
        let mut p = model.lora_tensors();
        if let Some(s) = &model.score {
            p.push((VALUE_KEY.to_owned(), s.shallow_clone()));
        }
        p
    }

    fn save(&self, model: &mut CausalLm, dir: &Path) -> Result<()> {
        save_peft(model, &self.cfg, &self.base_model, dir)?;
        let head =
            model.score.as_ref().ok_or_else(|| CoreError::InvalidArgument("the policy has no value head".into()))?;
        crate::weights::save_safetensors(&dir.join(VALUE_HEAD_FILE), &[(VALUE_KEY.to_owned(), head.f_detach()?)])
    }

    fn load(&self, model: &mut CausalLm, dir: &Path) -> Result<()> {
        load_peft(model, dir)?;
        let files = WeightFiles::open_files(&[dir.join(VALUE_HEAD_FILE)])?;
        let head = files.load(VALUE_KEY, &[1, model.cfg.hidden_size], Kind::Float, model.device())?;
        model.score = Some(head.f_set_requires_grad(true)?);
        Ok(())
    }
}
