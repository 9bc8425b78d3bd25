//! PolicyService's training sessions (session.proto): the handlers parse and check a request, then run the
//! domain ([`ferrotune_core::train::session`]) on the service's worker thread, which owns the sessions beside
//! the loaded models. At most `policy.max_sessions` are open; one unused for `policy.session_idle_s` is
//! closed by a timer ([`spawn_idle_expiry`]) or at the next session call, whichever comes first (its
//! checkpoints stay, so reopening it restores it).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Weak;
use std::time::{Duration, Instant};

use ferrotune_core::lora::{LoraConfig, Targets};
use ferrotune_core::train::grpo::{LossType, PolicyLoss, RatioLevel};
use ferrotune_core::train::session::{
    AdapterInit, PolicySession, PpoLoss, RolloutSpec, SessionSpec, UpdateLoss, UpdateSample,
};
use ferrotune_core::train::TrainConfig;
use ferrotune_proto::v1::{
    CheckpointSessionRequest, CheckpointSessionResponse, CloseSessionRequest, CloseSessionResponse, OpenSessionRequest,
    RolloutRequest, RolloutResponse, RolloutSample, SessionInfo, UpdateRequest, UpdateResponse,
};
use ferrotune_runtime::worker::Worker;
use ferrotune_runtime::{invalid, StatusExt};
use tonic::Status;

use crate::models::Models;
use crate::service::{sampling, Policy, MAX_NEW_TOKENS, MAX_PROMPTS};

/// Most samples in one Update call.
pub const MAX_UPDATE_SAMPLES: usize = 4096;
/// Checkpoints a session keeps.
const KEEP: usize = 2;

struct Open {
    session: PolicySession,
    checkpoints: PathBuf,
    last_used: Instant,
}

/// The open sessions (on the worker thread).
pub struct Sessions {
    open: HashMap<String, Open>,
    max: usize,
    idle: Duration,
}

impl Sessions {
    /// None open; at most `max`, closed after `idle` unused.
    pub fn new(max: usize, idle: Duration) -> Self {
        Self { open: HashMap::new(), max, idle }
    }

    /// Closes the sessions unused for longer than the idle limit.
    pub(crate) fn expire(&mut self) {
        let idle = self.idle;
        self.open.retain(|id, o| {
            let keep = o.last_used.elapsed() <= idle;
            if !keep {
                tracing::info!(session = %id, "training session idle too long: closed");
            }
            keep
        });
    }

    fn get(&mut self, id: &str) -> Result<&mut Open, Status> {
        self.expire();
        let o = self.open.get_mut(id).ok_or_else(|| {
            Status::not_found(format!("session `{id}` is not open here (expired, closed, or the policy restarted: open it again to restore its checkpoint)"))
        })?;
        o.last_used = Instant::now();
        Ok(o)
    }
}

/// Closes idle sessions (freeing their model copies and optimizer state) without waiting for another
/// session call: a thread asks the worker to expire them every quarter of the idle limit (between 1 and 60
/// s), and stops once `alive` is gone (the service dropped) or the worker has stopped.
pub fn spawn_idle_expiry(worker: Worker<Models>, alive: Weak<()>, idle: Duration) -> std::io::Result<()> {
    let period = (idle / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
    std::thread::Builder::new().name("ferrotune-session-expiry".into()).spawn(move || loop {
        std::thread::sleep(period);
        if alive.upgrade().is_none() || worker.submit(|m| m.sessions.expire()).is_err() {
            return;
        }
    })?;
    Ok(())
}

fn session_id(id: &str) -> Result<String, Status> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !ok {
        return Err(invalid("session_id", "1 to 128 characters of A-Z a-z 0-9 . _ -"));
    }
    Ok(id.to_owned())
}

fn positive_or(v: f64, default: f64, field: &str) -> Result<f64, Status> {
    match v {
        0.0 => Ok(default),
        v if v.is_finite() && v > 0.0 => Ok(v),
        v => Err(invalid(field, format!("must be > 0 (0 = default), got {v}"))),
    }
}

fn train_config(r: &OpenSessionRequest) -> Result<TrainConfig, Status> {
    let o = r.optimizer.unwrap_or_default();
    let d = TrainConfig::default();
    let wd = o.weight_decay;
    if !(wd.is_finite() && wd >= 0.0) {
        return Err(invalid("optimizer.weight_decay", format!("must be >= 0, got {wd}")));
    }
    let cfg = TrainConfig {
        adam_beta1: positive_or(o.adam_beta1, d.adam_beta1, "optimizer.adam_beta1")?,
        adam_beta2: positive_or(o.adam_beta2, d.adam_beta2, "optimizer.adam_beta2")?,
        adam_epsilon: positive_or(o.adam_epsilon, d.adam_epsilon, "optimizer.adam_epsilon")?,
        weight_decay: wd,
        max_grad_norm: positive_or(o.max_grad_norm, 1.0, "optimizer.max_grad_norm")?,
        seed: r.seed,
        ..d
    };
    if cfg.adam_beta1 >= 1.0 || cfg.adam_beta2 >= 1.0 {
        return Err(invalid("optimizer", "adam betas must be < 1"));
    }
    Ok(cfg)
}

fn lora(r: &OpenSessionRequest) -> Result<LoraConfig, Status> {
    let l = r.lora.clone().unwrap_or_default();
    let targets = match l.target_modules.as_slice() {
        [] => Targets::AllLinear,
        [one] if one == "all-linear" => Targets::AllLinear,
        names => Targets::Names(names.to_vec()),
    };
    let cfg = LoraConfig {
        r: i64::from(l.r),
        alpha: l.lora_alpha,
        dropout: l.lora_dropout,
        targets,
        use_rslora: l.use_rslora,
        use_dora: l.use_dora,
    };
    cfg.validate().map_err(|e| invalid("lora", e))?;
    Ok(cfg)
}

fn loss(r: &UpdateRequest) -> Result<UpdateLoss, Status> {
    let l = r.loss.clone().unwrap_or_default();
    if l.loss_type == "ppo" {
        let cfg = PpoLoss {
            cliprange: if l.epsilon == 0.0 { 0.2 } else { l.epsilon },
            cliprange_value: if l.cliprange_value == 0.0 { 0.2 } else { l.cliprange_value },
            vf_coef: l.vf_coef,
        };
        if !(cfg.cliprange > 0.0 && cfg.cliprange < 1.0 && cfg.cliprange_value > 0.0)
            || !(cfg.vf_coef.is_finite() && cfg.vf_coef >= 0.0)
        {
            return Err(invalid(
                "loss",
                format!("PPO: epsilon in (0, 1), cliprange_value > 0, vf_coef >= 0; got {cfg:?}"),
            ));
        }
        if l.on_policy {
            return Err(invalid("loss.on_policy", "PPO updates use the rollout's log-probs and values"));
        }
        return Ok(UpdateLoss::Ppo(cfg));
    }
    let loss_type = if l.loss_type.is_empty() { LossType::Dapo } else { LossType::parse(&l.loss_type).status()? };
    let epsilon = if l.epsilon == 0.0 { 0.2 } else { l.epsilon };
    let cfg = PolicyLoss {
        loss_type,
        epsilon_low: epsilon,
        epsilon_high: if l.epsilon_high == 0.0 { epsilon } else { l.epsilon_high },
        beta: l.beta,
        max_completion_length: l.max_completion_length as usize,
        bias_correction_kl: !l.no_bias_correction_kl,
        ratio: match l.importance_sampling_level.as_str() {
            "" | "token" => RatioLevel::Token,
            "sequence" => RatioLevel::SequenceMean,
            "sequence_sum" => RatioLevel::SequenceSum,
            other => {
                return Err(invalid(
                    "loss.importance_sampling_level",
                    format!("`{other}`: token, sequence or sequence_sum"),
                ))
            }
        },
        on_policy: l.on_policy,
    };
    cfg.validate().map_err(|e| invalid("loss", e))?;
    Ok(UpdateLoss::Clipped(cfg))
}

impl Policy {
    pub(crate) async fn session_open(&self, r: OpenSessionRequest) -> Result<SessionInfo, Status> {
        let id = session_id(&r.session_id)?;
        let base = self.model_dir(r.model.as_ref())?;
        let adapter = match self.root.resolve_opt("adapter", &r.adapter)? {
            Some(a) => {
                if !a.join("adapter_config.json").is_file() {
                    return Err(Status::not_found(format!("adapter: {} has no adapter_config.json", a.display())));
                }
                AdapterInit::Continue(a)
            }
            None => AdapterInit::New(lora(&r)?),
        };
        if r.output_dir.is_empty() {
            return Err(invalid("output_dir", "required: where the session checkpoints"));
        }
        let out = self.root.resolve("output_dir", &r.output_dir)?;
        let spec = SessionSpec {
            base,
            qlora: r.qlora,
            adapter,
            train: train_config(&r)?,
            value_head: r.value_head,
            kind: self.kind,
            device: self.device_of,
            device_map: self.device_map.clone(),
        };
        let device = self.device.clone();
        let restore = r.restore_updates;
        self.worker
            .call(move |m| {
                let s = &mut m.sessions;
                s.expire();
                if s.open.contains_key(&id) {
                    return Err(Status::already_exists(format!("session `{id}` is open already")));
                }
                if s.open.len() >= s.max {
                    return Err(Status::resource_exhausted(format!(
                        "{} training sessions are open, the most policy.max_sessions allows: close one first",
                        s.open.len()
                    )));
                }
                let checkpoints = out.join("session");
                let mut session = PolicySession::open(&spec).status()?;
                let restored = restore != 0 && session.restore(&checkpoints, &id, Some(restore as usize)).status()?;
                let info = SessionInfo {
                    session_id: id.clone(),
                    updates: session.updates() as u32,
                    restored,
                    device,
                    eos_ids: session.stop_ids.clone(),
                    pad_id: session.defaults.pad_id,
                };
                tracing::info!(session = %id, restored, updates = info.updates, "training session open");
                s.open.insert(id, Open { session, checkpoints, last_used: Instant::now() });
                Ok(info)
            })
            .await
    }

    pub(crate) async fn session_rollout(&self, r: RolloutRequest) -> Result<RolloutResponse, Status> {
        let id = session_id(&r.session_id)?;
        if r.prompts.is_empty() || r.prompts.len() > MAX_PROMPTS {
            return Err(invalid("prompts", format!("{} prompts; send 1 to {MAX_PROMPTS}", r.prompts.len())));
        }
        if let Some(i) = r.prompts.iter().position(|p| p.ids.is_empty()) {
            return Err(invalid(&format!("prompts[{i}]"), "empty"));
        }
        if r.n == 0 || r.n > 64 {
            return Err(invalid("n", format!("{}: 1 to 64 samples per prompt", r.n)));
        }
        if r.max_new_tokens == 0 || r.max_new_tokens > MAX_NEW_TOKENS {
            return Err(invalid("max_new_tokens", format!("{}: 1 to {MAX_NEW_TOKENS}", r.max_new_tokens)));
        }
        let total = r.prompts.len() * r.n as usize * r.max_new_tokens as usize;
        if total > self.max_generated_tokens {
            return Err(Status::resource_exhausted(format!(
                "{} prompts × {} samples × {} new tokens is more than policy.max_generated_tokens ({})",
                r.prompts.len(),
                r.n,
                r.max_new_tokens,
                self.max_generated_tokens
            )));
        }
        let sampling = sampling(r.sampling)?;
        sampling.validate().map_err(|e| invalid("sampling", e))?;
        let spec = RolloutSpec {
            prompts: r.prompts.into_iter().map(|p| p.ids).collect(),
            n: r.n as usize,
            max_new_tokens: r.max_new_tokens as usize,
            sampling,
            seed: r.seed,
            stop: r.stop,
            reference: r.reference,
            logprobs: !r.skip_logprobs,
        };
        self.worker
            .call(move |m| {
                let o = m.sessions.get(&id)?;
                let vocab = o.session.model.cfg.vocab_size;
                for (i, p) in spec.prompts.iter().enumerate() {
                    if let Some(&t) = p.iter().find(|&&t| i64::from(t) >= vocab) {
                        return Err(invalid(
                            &format!("prompts[{i}]"),
                            format!("token id {t} is outside the vocabulary ({vocab})"),
                        ));
                    }
                }
                let samples = o.session.rollout(&spec, &ferrotune_runtime::worker::cancelled).status()?;
                Ok(RolloutResponse {
                    samples: samples
                        .into_iter()
                        .map(|s| RolloutSample {
                            prompt: s.prompt as u32,
                            ids: s.ids,
                            text: s.text,
                            finish_reason: serde_json::to_value(s.finish)
                                .ok()
                                .and_then(|v| v.as_str().map(str::to_owned))
                                .unwrap_or_default(),
                            logprobs: s.logp,
                            ref_logprobs: s.ref_logp,
                            values: s.values,
                        })
                        .collect(),
                })
            })
            .await
    }

    pub(crate) async fn session_update(&self, r: UpdateRequest) -> Result<UpdateResponse, Status> {
        let id = session_id(&r.session_id)?;
        if r.samples.is_empty() || r.samples.len() > MAX_UPDATE_SAMPLES {
            return Err(invalid("samples", format!("{} samples; send 1 to {MAX_UPDATE_SAMPLES}", r.samples.len())));
        }
        if r.micro_batch_size == 0 {
            return Err(invalid("micro_batch_size", "at least 1"));
        }
        let loss = loss(&r)?;
        let (lr, temperature) = (r.learning_rate, if r.temperature == 0.0 { 1.0 } else { r.temperature });
        let micro = r.micro_batch_size as usize;
        let samples: Vec<UpdateSample> = r
            .samples
            .into_iter()
            .map(|s| UpdateSample {
                prompt: s.prompt_ids,
                completion: s.completion_ids,
                old_logp: s.old_logprobs,
                ref_logp: s.ref_logprobs,
                advantages: s.advantages,
                masked: s.masked,
                returns: s.returns,
                old_values: s.old_values,
            })
            .collect();
        if let Some(i) = samples.iter().position(|s| {
            s.old_logp
                .iter()
                .chain(&s.ref_logp)
                .chain(&s.advantages)
                .chain(&s.returns)
                .chain(&s.old_values)
                .any(|v| !v.is_finite())
        }) {
            return Err(invalid(&format!("samples[{i}]"), "log-probs and advantages must be finite"));
        }
        self.worker
            .call(move |m| {
                let o = m.sessions.get(&id)?;
                let vocab = o.session.model.cfg.vocab_size;
                if let Some(i) =
                    samples.iter().position(|s| s.prompt.iter().chain(&s.completion).any(|&t| i64::from(t) >= vocab))
                {
                    return Err(invalid(
                        &format!("samples[{i}]"),
                        format!("a token id is outside the vocabulary ({vocab})"),
                    ));
                }
                let u = o.session.update(&samples, &loss, temperature, lr, micro).status()?;
                let tokens = u.stats.tokens.max(1.0);
                let ppo = u.ppo.unwrap_or_default().map(|x| x / tokens);
                Ok(UpdateResponse {
                    loss: u.loss,
                    grad_norm: u.grad_norm,
                    clip_ratio_low: u.stats.clipped_low / tokens,
                    clip_ratio_high: u.stats.clipped_high / tokens,
                    kl: u.stats.kl / tokens,
                    tokens: u.stats.tokens as u64,
                    updates: u.updates as u32,
                    policy_loss: ppo[0],
                    value_loss: ppo[1],
                    approx_kl: ppo[2],
                    value_clip_fraction: ppo[3],
                })
            })
            .await
    }

    pub(crate) async fn session_checkpoint(
        &self,
        r: CheckpointSessionRequest,
    ) -> Result<CheckpointSessionResponse, Status> {
        let id = session_id(&r.session_id)?;
        self.worker
            .call(move |m| {
                let o = m.sessions.get(&id)?;
                let dir = o.session.checkpoint(&o.checkpoints, KEEP, &id).status()?;
                Ok(CheckpointSessionResponse {
                    checkpoint_dir: dir.display().to_string(),
                    updates: o.session.updates() as u32,
                })
            })
            .await
    }

    pub(crate) async fn session_close(&self, r: CloseSessionRequest) -> Result<CloseSessionResponse, Status> {
        let id = session_id(&r.session_id)?;
        let save = self.root.resolve_opt("save_adapter_to", &r.save_adapter_to)?;
        self.worker
            .call(move |m| {
                let o = m.sessions.get(&id)?;
                if let Some(dir) = &save {
                    o.session.save_adapter(dir).status()?;
                }
                let updates = o.session.updates() as u32;
                m.sessions.open.remove(&id);
                tracing::info!(session = %id, updates, "training session closed");
                Ok(CloseSessionResponse { updates })
            })
            .await
    }
}
