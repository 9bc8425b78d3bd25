//! The GRPO / RLOO orchestrator: a job of the alignment service that owns the algorithm — data order, seeds,
//! reward calls, advantages, the learning-rate schedule, metrics and its own checkpoint — and drives a policy
//! training session (session.proto) and the reward replicas through their gRPC clients. Only ids, log-probs,
//! scores and metrics cross the wire.
//!
//! Step `s`: the next `P = completions / num_generations` prompts of the seeded epoch order are rolled out
//! `num_generations` times each (sampling seed derived from the run seed and `s`), every reward function
//! scores every completion on the reward service (the whole batch, or the step fails and is retried from the
//! checkpoint), the advantages are computed ([`ferrotune_core::train::advantages`]) and the session runs
//! `num_iterations` updates. Every `save_steps` the session checkpoints and then the orchestrator writes
//! `orchestrator_state.json` (step, updates); a restart — of this process or of the policy — reopens the
//! session at that checkpoint and replays from that step, which, everything being seeded by the step, ends
//! exactly where an uninterrupted run ends.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ferrotune_clients::{ClientAuth, RewardPool};
use ferrotune_core::train::advantages::{self, Advantages};
use ferrotune_core::train::group_rl::{GroupAlgorithm, GroupRlConfig};
use ferrotune_core::train::ppo::{token_kl, KlEstimator};
use ferrotune_core::train::ppo_objective::rollout_seed;
use ferrotune_core::train::schedule::lr_at;
use ferrotune_core::train::{epoch_order, TrainConfig};
use ferrotune_core::{ChatTemplate, CoreError, Message, Tokenizer};
use ferrotune_proto::v1::policy_service_client::PolicyServiceClient;
use ferrotune_proto::v1::{
    CheckpointSessionRequest, CloseSessionRequest, LoraSettings, ModelRef, OpenSessionRequest, OptimizerSettings,
    PolicyLossSettings, RolloutRequest, RolloutSample, Sampling, ScoreItem, ScoreRequest, TokenIds, UpdateRequest,
    UpdateSample,
};
use ferrotune_runtime::jobs::{Artifact, JobContext, JobOutcome, JobRunner, Progress};
use ferrotune_training::recipe::{Objective, Recipe};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

type Policy = PolicyServiceClient<InterceptedService<Channel, ClientAuth>>;

/// The orchestrator's checkpoint, beside the output.
const STATE: &str = "orchestrator_state.json";
/// How long a lost policy is waited for before the job fails.
const POLICY_PATIENCE: Duration = Duration::from_secs(120);

/// What an orchestrator job runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlignKind {
    /// GRPO or RLOO.
    Group(GroupAlgorithm),
    /// PPO with the value head on the policy session.
    Ppo,
}

/// Runs GRPO, RLOO or PPO jobs.
pub struct GroupRlRunner {
    /// Which algorithm.
    pub algo: AlignKind,
    /// The policy service (`endpoints.policy`).
    pub policy: Option<String>,
    /// The reward replicas (`endpoints.reward`).
    pub rewards: Vec<String>,
    /// Bearer token for both.
    pub token: Option<String>,
    /// This service's artifact root: paths sent to the policy are relative to it (the services share it).
    pub root: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub(crate) struct State {
    /// Steps done.
    pub(crate) step: usize,
    /// Session updates done (the session checkpoint of that count goes with it).
    pub(crate) updates: u32,
    /// PPO: the (adaptive) KL coefficient after that step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) kl_coef: Option<f64>,
}

/// A prompt: its ids, the user's text (what the reward functions see as the prompt) and its record (where
/// the reference answers of `answer:…` rules come from).
pub(crate) struct PromptRow {
    pub(crate) ids: Vec<u32>,
    pub(crate) text: String,
    record: serde_json::Value,
}

impl PromptRow {
    /// The reference answer in `field` (a string, or a number / boolean as written).
    fn reference(&self, field: &str) -> Option<String> {
        match self.record.get(field)? {
            serde_json::Value::String(s) => Some(s.clone()),
            v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => Some(v.to_string()),
            _ => None,
        }
    }
}

/// The codes that mean "the policy (or its session) is gone for now", not "the request is wrong".
fn lost(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::NotFound | Code::Unknown | Code::Cancelled | Code::Aborted)
}

pub(crate) fn status_err(what: &str, s: Status) -> anyhow::Error {
    let msg = format!("{what}: {} ({:?})", s.message(), s.code());
    anyhow::Error::new(match s.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => CoreError::Unavailable(msg),
        Code::NotFound => CoreError::NotFound(msg),
        Code::ResourceExhausted => CoreError::ResourceExhausted(msg),
        Code::FailedPrecondition => CoreError::FailedPrecondition(msg),
        Code::PermissionDenied => CoreError::Io {
            path: PathBuf::from(what),
            source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, s.message().to_owned()),
        },
        Code::InvalidArgument | Code::OutOfRange => CoreError::InvalidArgument(msg),
        _ => CoreError::Internal(msg),
    })
}

impl JobRunner for GroupRlRunner {
    fn run(&self, ctx: &JobContext) -> Result<JobOutcome> {
        let (r, resume) = ferrotune_training::scaffold::job_recipe(ctx)?;
        let run_id = ferrotune_core::train::run_dir::run_id(&r.output_dir)?.unwrap_or_else(|| ctx.id.clone());
        let (kind, cfg, ppo) = match r.objective() {
            Objective::GroupRl(algo, cfg) => (AlignKind::Group(algo), cfg, None),
            Objective::Ppo(p) => (AlignKind::Ppo, crate::ppo::as_group(&p), Some(p)),
            _ => anyhow::bail!("recipe: the grpo / rloo / ppo section is missing"),
        };
        anyhow::ensure!(kind == self.algo, "this runner runs {:?}, the recipe is {kind:?}", self.algo);
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("client runtime")?;
        let mut run = Orchestration::new(self, &r, cfg, run_id, &rt)?;
        run.ppo = ppo;
        run.run(ctx, resume)
    }
}

pub(crate) struct Orchestration<'a> {
    pub(crate) runner: &'a GroupRlRunner,
    pub(crate) r: &'a Recipe,
    pub(crate) cfg: GroupRlConfig,
    pub(crate) run_id: String,
    pub(crate) rt: &'a tokio::runtime::Runtime,
    pub(crate) policy: Policy,
    pub(crate) pool: RewardPool,
    pub(crate) prompts: Vec<PromptRow>,
    pub(crate) eval: Vec<PromptRow>,
    /// PPO's settings (a PPO job); its KL coefficient as the run goes.
    pub(crate) ppo: Option<ferrotune_core::train::ppo_objective::PpoConfig>,
    pub(crate) kl_coef: std::cell::Cell<f64>,
}

impl<'a> Orchestration<'a> {
    fn new(
        runner: &'a GroupRlRunner,
        r: &'a Recipe,
        cfg: GroupRlConfig,
        run_id: String,
        rt: &'a tokio::runtime::Runtime,
    ) -> Result<Self> {
        let url = runner.policy.clone().context("endpoints.policy: GRPO and RLOO drive a policy service")?;
        let auth = ClientAuth::new(runner.token.as_deref())?;
        let channel = {
            let _g = rt.enter();
            Endpoint::from_shared(url.clone())
                .with_context(|| format!("endpoints.policy `{url}`"))?
                .connect_timeout(Duration::from_secs(5))
                .connect_lazy()
        };
        let policy = PolicyServiceClient::with_interceptor(channel, auth.clone()).max_decoding_message_size(256 << 20);
        let pool = rt.block_on(async { RewardPool::new(&runner.rewards, auth) })?;
        // The tokenizer and chat template of the base render the prompts here; the policy gets ids.
        let model_dir = ferrotune_training::scaffold::model_dir(r)?;
        let tok = Tokenizer::from_dir(&model_dir)?;
        let template = ChatTemplate::for_model(&model_dir, r.chat_template.as_deref())?;
        let fields: Vec<&str> = cfg.rewards.iter().filter_map(|f| f.reference_field.as_deref()).collect();
        let render = |path: &Path| -> Result<Vec<PromptRow>> {
            // The records, in the order load_prompts reads them (blank lines skipped).
            let text = ferrotune_core::fsx::read_to_string(path).with_context(|| format!("{}", path.display()))?;
            let records: Vec<(usize, serde_json::Value)> = text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
                .map(|(i, l)| (i + 1, serde_json::from_str(l).unwrap_or(serde_json::Value::Null)))
                .collect();
            ferrotune_core::data::prompts::load_prompts(path)?
                .into_iter()
                .zip(records)
                .map(|(msgs, (line, record)): (Vec<Message>, _)| {
                    let ids = tok.encode_no_special(&template.render(&msgs, true)?)?;
                    let text = msgs.last().map(|m| m.content.clone()).unwrap_or_default();
                    let row = PromptRow { ids, text, record };
                    if let Some(f) = fields.iter().find(|f| row.reference(f).is_none()) {
                        return Err(anyhow::Error::new(CoreError::InvalidArgument(format!(
                            "{}:{line}: no `{f}` field with the reference answer (a string or a number)",
                            path.display()
                        ))));
                    }
                    Ok(row)
                })
                .collect()
        };
        let prompts = render(r.data.path.as_deref().context("data.path: the prompt file")?)?;
        anyhow::ensure!(!prompts.is_empty(), "data.path: no prompts");
        let eval = match &r.data.eval_path {
            Some(p) => render(p)?,
            None => vec![],
        };
        Ok(Self {
            runner,
            r,
            cfg,
            run_id,
            rt,
            policy,
            pool,
            prompts,
            eval,
            ppo: None,
            kl_coef: std::cell::Cell::new(0.0),
        })
    }

    /// A path under the shared artifact root as the policy should resolve it (relative when inside).
    fn for_policy(&self, p: &Path) -> String {
        p.strip_prefix(&self.runner.root).unwrap_or(p).display().to_string()
    }

    fn train_cfg(&self) -> &TrainConfig {
        &self.r.training
    }

    fn completions_per_step(&self) -> usize {
        self.train_cfg().micro_batch_size * self.train_cfg().gradient_accumulation_steps
    }

    fn open(&self, updates: u32) -> Result<(), Status> {
        let r = self.r;
        let lora = r.adapter.lora().map_err(|e| Status::invalid_argument(format!("adapter: {e}")))?;
        let target_modules = match &lora.targets {
            ferrotune_core::lora::Targets::AllLinear => vec!["all-linear".to_owned()],
            ferrotune_core::lora::Targets::Names(n) => n.clone(),
        };
        let t = self.train_cfg();
        let model = if ferrotune_core::registry::is_known(&r.model) {
            r.model.clone()
        } else {
            self.for_policy(Path::new(&r.model))
        };
        let req = OpenSessionRequest {
            session_id: self.run_id.clone(),
            model: Some(ModelRef { path: model }),
            adapter: String::new(),
            lora: Some(LoraSettings {
                r: lora.r as u32,
                lora_alpha: lora.alpha,
                lora_dropout: lora.dropout,
                target_modules,
                use_rslora: lora.use_rslora,
                use_dora: lora.use_dora,
            }),
            qlora: r.adapter.method == "qlora",
            optimizer: Some(OptimizerSettings {
                adam_beta1: t.adam_beta1,
                adam_beta2: t.adam_beta2,
                adam_epsilon: t.adam_epsilon,
                weight_decay: t.weight_decay,
                max_grad_norm: t.max_grad_norm,
            }),
            seed: t.seed,
            output_dir: self.for_policy(&r.output_dir),
            restore_updates: updates,
            value_head: self.ppo.is_some(),
        };
        let mut p = self.policy.clone();
        let info = self.rt.block_on(p.open_session(req))?.into_inner();
        if info.updates != updates {
            return Err(Status::failed_precondition(format!(
                "the session reopened at {} updates, the orchestrator's checkpoint holds {updates}",
                info.updates
            )));
        }
        Ok(())
    }

    /// Reopens the session at `state` after the policy went away, waiting for it to come back.
    fn reopen(&self, state: State, ctx: &JobContext) -> Result<()> {
        let started = Instant::now();
        loop {
            // An earlier incarnation may still hold it open: close it (its state is the checkpoint's).
            let mut p = self.policy.clone();
            let _ = self.rt.block_on(p.close_session(CloseSessionRequest {
                session_id: self.run_id.clone(),
                save_adapter_to: String::new(),
            }));
            match self.open(state.updates) {
                Ok(()) => {
                    if state.step > 0 {
                        ctx.log(format!("session reopened at step {} ({} updates)", state.step, state.updates));
                    }
                    return Ok(());
                }
                Err(s) if lost(&s) && started.elapsed() < POLICY_PATIENCE && !ctx.should_stop() => {
                    std::thread::sleep(Duration::from_millis(500));
                }
                Err(s) => return Err(status_err("reopening the policy session", s)),
            }
        }
    }

    fn sampling(&self) -> Sampling {
        Sampling {
            greedy: false,
            temperature: self.cfg.temperature as f32,
            top_k: self.cfg.top_k as u32,
            top_p: if self.cfg.top_p < 1.0 { self.cfg.top_p as f32 } else { 0.0 },
            repetition_penalty: 0.0,
        }
    }

    pub(crate) fn rollout(
        &self,
        rows: &[&PromptRow],
        n: usize,
        seed: u64,
        reference: bool,
        logprobs: bool,
    ) -> Result<Vec<RolloutSample>, Status> {
        let req = RolloutRequest {
            session_id: self.run_id.clone(),
            prompts: rows.iter().map(|p| TokenIds { ids: p.ids.clone() }).collect(),
            n: n as u32,
            max_new_tokens: self.cfg.max_completion_length as u32,
            sampling: Some(self.sampling()),
            seed,
            stop: vec![],
            reference,
            skip_logprobs: !logprobs,
        };
        let mut p = self.policy.clone();
        Ok(self.rt.block_on(p.rollout(req))?.into_inner().samples)
    }

    /// Scores every completion with every reward function: `funcs[k][i]`; the replicas that answered.
    pub(crate) fn score(&self, rows: &[&PromptRow], samples: &[RolloutSample]) -> Result<(Vec<Vec<f64>>, Vec<String>)> {
        let mut funcs = vec![];
        let mut replicas = vec![];
        for (k, f) in self.cfg.rewards.iter().enumerate() {
            let items: Vec<ScoreItem> = samples
                .iter()
                .map(|s| {
                    let row = rows[s.prompt as usize];
                    ScoreItem {
                        prompt: row.text.clone(),
                        response: s.text.clone(),
                        reference: f.reference_field.as_deref().and_then(|x| row.reference(x)).unwrap_or_default(),
                    }
                })
                .collect();
            let req = ScoreRequest { model: Some(ferrotune_training::rewards::reward_ref(&f.source)), items };
            let resp = self
                .rt
                .block_on(self.pool.score(req))
                .map_err(|s| status_err(&format!("reward function {}", self.reward_name(k)), s))?;
            anyhow::ensure!(
                resp.scores.len() == samples.len(),
                "reward function {}: {} scores for {} completions",
                self.reward_name(k),
                resp.scores.len(),
                samples.len()
            );
            if !replicas.contains(&resp.replica) {
                replicas.push(resp.replica.clone());
            }
            funcs.push(resp.scores.into_iter().map(f64::from).collect());
        }
        Ok((funcs, replicas))
    }

    fn reward_name(&self, k: usize) -> String {
        self.cfg.rewards[k].name.clone().unwrap_or_else(|| format!("reward{k}"))
    }

    /// The advantages of the step's completions; `k1` is each completion's summed log-ratio to the reference
    /// (RLOO's KL penalty).
    fn advantages(&self, algo: GroupAlgorithm, funcs: &[Vec<f64>], k1: &[f64]) -> Result<Advantages> {
        let weights: Vec<f64> = self.cfg.rewards.iter().map(|f| f.weight).collect();
        let g = self.cfg.num_generations;
        Ok(match algo {
            GroupAlgorithm::Grpo => {
                advantages::grpo(funcs, &weights, g, self.cfg.scale_rewards, self.cfg.multi_objective_aggregation)?
            }
            GroupAlgorithm::Rloo => {
                // k1 per completion, on the sampling policy's log-probs.
                let clip = self.cfg.reward_clip_range.map(|[lo, hi]| (lo, hi));
                let beta = self.cfg.beta(GroupAlgorithm::Rloo);
                advantages::rloo(funcs, &weights, g, beta, k1, clip, self.cfg.normalize_advantages)?
            }
        })
    }

    /// The prompts of step `step`.
    pub(crate) fn batch(&self, step: usize) -> Vec<&PromptRow> {
        let per_step = self.completions_per_step() / self.cfg.num_generations;
        let n = self.prompts.len();
        (0..per_step)
            .map(|j| {
                let pos = step * per_step + j;
                let order = epoch_order(n, self.train_cfg().seed, pos / n);
                &self.prompts[order[pos % n]]
            })
            .collect()
    }

    /// One step: rollouts, scores, advantages, updates. Its metrics and the replicas that scored.
    fn step(&self, step: usize) -> Result<(serde_json::Map<String, serde_json::Value>, Vec<String>)> {
        let AlignKind::Group(algo) = self.runner.algo else { return self.ppo_step(step) };
        let rows = self.batch(step);
        let beta = self.cfg.beta(algo);
        let seed = rollout_seed(self.train_cfg().seed, step);
        let loss = self.cfg.policy_loss(algo)?;
        // An on-policy update computes its old log-probs itself: the rollout skips that pass.
        let samples = self
            .rollout(&rows, self.cfg.num_generations, seed, beta > 0.0, !loss.on_policy)
            .map_err(|s| step_lost(step, s))?;
        let (funcs, replicas) = self.score(&rows, &samples)?;
        // k1 per completion, on the sampling policy's log-probs (RLOO's penalty and its `kl` metric).
        let k1: Vec<f64> = if algo == GroupAlgorithm::Rloo {
            samples.iter().map(|s| token_kl(&s.logprobs, &s.ref_logprobs, KlEstimator::K1).iter().sum()).collect()
        } else {
            vec![0.0; samples.len()]
        };
        let adv = self.advantages(algo, &funcs, &k1)?;
        let t = self.train_cfg();
        let lr = lr_at(t.lr_scheduler, t.learning_rate, step, t.warmup_steps, t.max_steps);
        let update_samples: Vec<UpdateSample> = samples
            .iter()
            .zip(&adv.advantages)
            .map(|(s, &a)| UpdateSample {
                prompt_ids: rows[s.prompt as usize].ids.clone(),
                completion_ids: s.ids.clone(),
                old_logprobs: if loss.on_policy { vec![] } else { s.logprobs.clone() },
                ref_logprobs: if loss.beta > 0.0 { s.ref_logprobs.clone() } else { vec![] },
                advantages: vec![a; s.ids.len()],
                masked: self.cfg.mask_truncated_completions && s.finish_reason == "length",
                returns: vec![],
                old_values: vec![],
            })
            .filter(|u| !u.completion_ids.is_empty())
            .collect();
        let loss_settings = PolicyLossSettings {
            loss_type: serde_json::to_value(loss.loss_type)?.as_str().unwrap_or("dapo").to_owned(),
            epsilon: loss.epsilon_low,
            epsilon_high: loss.epsilon_high,
            beta: loss.beta,
            max_completion_length: loss.max_completion_length as u32,
            no_bias_correction_kl: !loss.bias_correction_kl,
            importance_sampling_level: match loss.ratio {
                ferrotune_core::train::grpo::RatioLevel::Token => "token",
                ferrotune_core::train::grpo::RatioLevel::SequenceMean => "sequence",
                ferrotune_core::train::grpo::RatioLevel::SequenceSum => "sequence_sum",
            }
            .into(),
            on_policy: loss.on_policy,
            ..Default::default()
        };
        let mut last = None;
        for _ in 0..self.cfg.num_iterations {
            let req = UpdateRequest {
                session_id: self.run_id.clone(),
                samples: update_samples.clone(),
                loss: Some(loss_settings.clone()),
                learning_rate: lr,
                temperature: self.cfg.temperature,
                micro_batch_size: t.micro_batch_size as u32,
            };
            let mut p = self.policy.clone();
            last = Some(self.rt.block_on(p.update(req)).map_err(|s| step_lost(step, s))?.into_inner());
        }
        let u = last.expect("num_iterations >= 1");
        let lengths: Vec<f64> = samples.iter().map(|s| s.ids.len() as f64).collect();
        let mut m = serde_json::Map::new();
        let mut put = |k: &str, v: f64| {
            m.insert(k.to_owned(), json!(v));
        };
        put("loss", u.loss);
        put("grad_norm", u.grad_norm);
        put("learning_rate", lr);
        put("reward", adv.reward_mean);
        put("reward_std", adv.reward_std);
        put("frac_reward_zero_std", adv.frac_zero_std);
        for (k, f) in funcs.iter().enumerate() {
            put(&format!("rewards/{}/mean", self.reward_name(k)), f.iter().sum::<f64>() / f.len().max(1) as f64);
        }
        put("completions/mean_length", lengths.iter().sum::<f64>() / lengths.len().max(1) as f64);
        put(
            "completions/clipped_ratio",
            samples.iter().filter(|s| s.finish_reason == "length").count() as f64 / samples.len().max(1) as f64,
        );
        put("clip_ratio/low_mean", u.clip_ratio_low);
        put("clip_ratio/high_mean", u.clip_ratio_high);
        put("clip_ratio/region_mean", u.clip_ratio_low + u.clip_ratio_high);
        if algo == GroupAlgorithm::Rloo && beta > 0.0 {
            let tokens: usize = samples.iter().map(|s| s.ids.len()).sum();
            put("kl", k1.iter().sum::<f64>() / tokens.max(1) as f64);
        } else {
            put("kl", u.kl);
        }
        put("updates", f64::from(u.updates));
        Ok((m, replicas))
    }

    /// Mean combined reward of `n` samples of each held-out prompt (fixed seed).
    fn evaluate(&self) -> Result<f64> {
        let rows: Vec<&PromptRow> = self.eval.iter().collect();
        let mut all = vec![];
        for chunk in rows.chunks(16) {
            let samples = self
                .rollout(chunk, 4, rollout_seed(self.train_cfg().seed, usize::MAX / 2), false, false)
                .map_err(|s| status_err("evaluation rollout", s))?;
            let (funcs, _) = self.score(chunk, &samples)?;
            for i in 0..samples.len() {
                all.push(self.cfg.rewards.iter().zip(&funcs).map(|(f, s)| f.weight * s[i]).sum::<f64>());
            }
        }
        Ok(all.iter().sum::<f64>() / all.len().max(1) as f64)
    }

    pub(crate) fn checkpoint(&self, state: State) -> Result<()> {
        let mut p = self.policy.clone();
        let c = self
            .rt
            .block_on(p.checkpoint_session(CheckpointSessionRequest { session_id: self.run_id.clone() }))
            .map_err(|s| status_err("checkpointing the session", s))?
            .into_inner();
        anyhow::ensure!(
            c.updates == state.updates,
            "the session checkpointed {} updates, expected {}",
            c.updates,
            state.updates
        );
        let out = &self.r.output_dir;
        ferrotune_core::weights::write_atomically(&out.join(STATE), serde_json::to_string(&state)?.as_bytes())?;
        Ok(())
    }

    fn run(&self, ctx: &JobContext, resume: bool) -> Result<JobOutcome> {
        let out = self.r.output_dir.clone();
        let metrics_path = out.join("metrics.jsonl");
        let saved: Option<State> = if resume {
            match ferrotune_core::fsx::read_to_string(out.join(STATE)) {
                Ok(t) => Some(serde_json::from_str(&t).context(STATE)?),
                Err(_) => None,
            }
        } else {
            None
        };
        let mut state = saved.unwrap_or(State { step: 0, updates: 0, kl_coef: None });
        if let Some(p) = &self.ppo {
            self.kl_coef.set(state.kl_coef.unwrap_or(p.kl_coef));
        }
        ferrotune_core::fsx::write(out.join("recipe.yaml"), serde_yaml::to_string(self.r)?)?;
        if state.step > 0 {
            ctx.log(format!("resuming at step {} ({} session updates)", state.step, state.updates));
        }
        self.reopen(state, ctx)?;
        truncate_metrics(&metrics_path, state.step)?;
        let t = self.train_cfg().clone();
        // The held-out evaluation before training (kept beside the output, so a resumed run still reports it).
        let before_path = out.join("eval_before.json");
        let mut before: Option<serde_json::Value> = None;
        if !self.eval.is_empty() {
            if state.step > 0 {
                before =
                    ferrotune_core::fsx::read_to_string(&before_path).ok().and_then(|t| serde_json::from_str(&t).ok());
            } else {
                let b = if self.ppo.is_some() {
                    self.ppo_evaluate(ctx, "before")?
                } else {
                    let b = self.evaluate()?;
                    ctx.log(format!("held-out mean reward before training: {b:.4} ({} prompts × 4)", self.eval.len()));
                    json!(b)
                };
                ferrotune_core::weights::write_atomically(&before_path, b.to_string().as_bytes())?;
                before = Some(b);
            }
        }
        let mut step = state.step;
        while step < t.max_steps {
            if ctx.should_stop() {
                self.checkpoint(state)?;
                ctx.log(format!("stopped at step {step} of {}; checkpoint saved", t.max_steps));
                return Ok(JobOutcome::Stopped);
            }
            let started = Instant::now();
            let (m, replicas) = match self.step(step) {
                Ok(m) => m,
                Err(e) if is_lost(&e) => {
                    // The policy (or its session) went away: reopen at the checkpoint and replay from there.
                    ctx.log(format!("step {}: {e:#}; reopening the session at step {}", step + 1, state.step));
                    self.reopen(state, ctx)?;
                    if let (Some(p), true) = (&self.ppo, state.kl_coef.is_none()) {
                        self.kl_coef.set(p.kl_coef);
                    } else if let Some(k) = state.kl_coef {
                        self.kl_coef.set(k);
                    }
                    truncate_metrics(&metrics_path, state.step)?;
                    step = state.step;
                    continue;
                }
                Err(e) => return Err(e),
            };
            step += 1;
            let updates = m["updates"].as_f64().unwrap_or(0.0) as u32;
            let mut line = serde_json::Map::new();
            line.insert("step".into(), json!(step));
            line.extend(m.clone());
            append_line(&metrics_path, &serde_json::Value::Object(line).to_string())?;
            let mut checkpoint = String::new();
            if t.save_steps > 0 && step.is_multiple_of(t.save_steps) && step < t.max_steps {
                state = State { step, updates, kl_coef: self.ppo.as_ref().map(|_| self.kl_coef.get()) };
                self.checkpoint(state)?;
                checkpoint = out.join("session").display().to_string();
            }
            let tokens: f64 = m["completions/mean_length"].as_f64().unwrap_or(0.0) * self.completions_per_step() as f64;
            ctx.progress(Progress {
                step: step as u64,
                total: t.max_steps as u64,
                loss: m["loss"].as_f64().unwrap_or(0.0),
                eval_loss: None,
                lr: m["learning_rate"].as_f64().unwrap_or(0.0),
                grad_norm: m["grad_norm"].as_f64().unwrap_or(0.0),
                tokens_per_s: tokens / started.elapsed().as_secs_f64().max(1e-9),
                trained_tokens: 0,
                epoch: (step * self.completions_per_step() / self.cfg.num_generations) as f64
                    / self.prompts.len() as f64,
                eta_s: 0.0,
                checkpoint,
                metrics: m.iter().filter_map(|(k, v)| v.as_f64().map(|x| (k.clone(), x))).collect(),
            });
            ctx.log(format!("step {step}: scores from {}", replicas.join(", ")));
            if self.ppo.is_none() {
                ctx.log(format!(
                    "step {step}: reward {:.4} (std {:.4}), loss {:.4}, kl {:.5}",
                    m["reward"].as_f64().unwrap_or(0.0),
                    m["reward_std"].as_f64().unwrap_or(0.0),
                    m["loss"].as_f64().unwrap_or(0.0),
                    m["kl"].as_f64().unwrap_or(0.0)
                ));
            }
        }
        if let (Some(b), Some(_)) = (&before, &self.ppo) {
            let after = self.ppo_evaluate(ctx, "after")?;
            let body = json!({"before": b, "after": after, "eval_prompts": self.eval.len()});
            ferrotune_core::weights::write_atomically(
                &out.join("ppo_eval.json"),
                serde_json::to_string_pretty(&body)?.as_bytes(),
            )?;
            ctx.log(format!("held-out: {body}"));
            before = None;
        }
        if let Some(b) = before.and_then(|b| b.as_f64()) {
            let after = self.evaluate()?;
            ctx.log(format!("held-out mean reward: {b:.4} -> {after:.4}"));
            ferrotune_core::weights::write_atomically(
                &out.join("align_eval.json"),
                serde_json::to_string_pretty(
                    &json!({"before": b, "after": after, "eval_prompts": self.eval.len(), "samples_per_prompt": 4}),
                )?
                .as_bytes(),
            )?;
        }
        let mut p = self.policy.clone();
        self.rt
            .block_on(p.close_session(CloseSessionRequest {
                session_id: self.run_id.clone(),
                save_adapter_to: self.for_policy(&out),
            }))
            .map_err(|s| status_err("closing the session", s))?;
        let title = match self.runner.algo {
            AlignKind::Group(GroupAlgorithm::Grpo) => "GRPO",
            AlignKind::Group(GroupAlgorithm::Rloo) => "RLOO",
            AlignKind::Ppo => "PPO",
        };
        let mut artifacts = vec![
            Artifact { kind: "adapter".into(), path: out.display().to_string() },
            Artifact { kind: "metrics".into(), path: metrics_path.display().to_string() },
        ];
        let plot = out.join("loss.svg");
        if ferrotune_runtime::plot::loss_curve(&metrics_path, &plot, &format!("{title} loss")).is_ok() {
            artifacts.push(Artifact { kind: "plot".into(), path: plot.display().to_string() });
        }
        Ok(JobOutcome::Finished(artifacts))
    }
}

/// A lost policy during a step: retried from the checkpoint rather than failed.
pub(crate) fn step_lost(step: usize, s: Status) -> anyhow::Error {
    if lost(&s) {
        anyhow::Error::new(Lost(format!("step {}: the policy went away: {} ({:?})", step + 1, s.message(), s.code())))
    } else {
        status_err(&format!("step {}", step + 1), s)
    }
}

#[derive(Debug)]
struct Lost(String);

impl std::fmt::Display for Lost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Lost {}

fn is_lost(e: &anyhow::Error) -> bool {
    e.downcast_ref::<Lost>().is_some()
}

/// Keeps the lines of steps up to `upto` (a resumed or replayed run reads as one uninterrupted run).
fn truncate_metrics(path: &Path, upto: usize) -> Result<()> {
    let Ok(text) = ferrotune_core::fsx::read_to_string(path) else { return Ok(()) };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= upto)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    ferrotune_core::weights::write_atomically(path, kept.as_bytes())?;
    Ok(())
}

fn append_line(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    let mut f = ferrotune_core::fsx::append(path).with_context(|| format!("{}", path.display()))?;
    writeln!(f, "{line}").with_context(|| format!("{}", path.display()))?;
    Ok(())
}
