//! The PPO job: loads the base (NF4 for QLoRA), adds LoRA and a value head, renders the prompt file through
//! the chat template, and runs the training loop with the PPO objective. Rollouts are sampled here, on the
//! policy's device, by the same generation code as PolicyService.Generate; their scores come from the reward
//! service(s) in `endpoints.reward` through the balanced, failing-over [`RewardPool`] (so a reward replica
//! may die mid-run). The held-out prompts are scored before training and at the end (`ppo_eval.json`).

use std::collections::BTreeSet;
use std::sync::Mutex;

use anyhow::{Context, Result};
use ferrotune_clients::ClientAuth;
use ferrotune_clients::RewardPool;
use ferrotune_core::data::prompts::load_prompts;
use ferrotune_core::train::ppo_objective::{PolicyValueState, PpoObjective, PpoPrompt, RewardSource};
use ferrotune_core::train::{evaluate, Algorithm, Run};
use ferrotune_core::{ChatTemplate, CoreError, ModelDefaults, Tokenizer};
use ferrotune_proto::v1::reward_model_ref::Kind as RewardKind;
use ferrotune_proto::v1::{LearnedReward, ModelRef, RewardModelRef, ScoreItem, ScoreRequest};
use ferrotune_runtime::jobs::{JobContext, JobOutcome, JobRunner};
use serde_json::json;

use crate::recipe::{Method, Objective, Recipe};
use crate::scaffold::{finish, job_recipe, load_model, model_dir, train_job, write_provenance};

/// Runs `ppo` jobs; the spec is `{"recipe": <resolved recipe with a ppo section>, "resume": bool}`.
pub struct PpoRunner {
    /// The reward replicas (`endpoints.reward`).
    pub endpoints: Vec<String>,
    /// Bearer token for them (`auth.token`).
    pub token: Option<String>,
}

impl JobRunner for PpoRunner {
    fn run(&self, ctx: &JobContext) -> Result<JobOutcome> {
        let (r, resume) = job_recipe(ctx)?;
        self.run_ppo(&r, resume, ctx)
    }
}

/// The ScoreRequest's model of a recipe's reward.
/// The reward service's reference to a reward source (a rule or a learned reward model).
pub fn reward_ref(src: &RewardSource) -> RewardModelRef {
    let kind = match (&src.rule, &src.model, &src.adapter) {
        (Some(rule), _, _) => RewardKind::Rule(rule.clone()),
        (None, m, a) => RewardKind::Learned(LearnedReward {
            base: Some(ModelRef { path: m.clone().unwrap_or_default() }),
            adapter: a.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
        }),
    };
    RewardModelRef { kind: Some(kind) }
}

fn mean_metrics(m: &std::collections::BTreeMap<String, f64>) -> serde_json::Value {
    json!({"score": m.get("eval_objective/scores"), "response_length": m.get("eval_val/response_length"), "eos_fraction": m.get("eval_val/eos_fraction")})
}

impl PpoRunner {
    fn run_ppo(&self, r: &Recipe, resume: bool, ctx: &JobContext) -> Result<JobOutcome> {
        let Objective::Ppo(cfg) = r.objective() else { anyhow::bail!("recipe: the ppo section is missing") };
        if !matches!(r.adapter.method()?, Method::Lora | Method::Qlora) {
            anyhow::bail!("adapter.method `{}`: PPO trains lora or qlora adapters (the reference is the base with the adapter disabled)", r.adapter.method);
        }
        let out = r.output_dir.clone();
        ferrotune_core::fsx::create_dir_all(&out).with_context(|| format!("{}", out.display()))?;
        let model_dir = model_dir(r)?;
        let tok = Tokenizer::from_dir(&model_dir)?;
        let template = ChatTemplate::from_dir(&model_dir)?;
        let defaults = ModelDefaults::from_dir(&model_dir, &tok)?;
        let render = |path: &std::path::Path| -> Result<Vec<PpoPrompt>> {
            load_prompts(path)?
                .into_iter()
                .map(|msgs| {
                    let ids = tok.encode_no_special(&template.render(&msgs, true)?)?;
                    let text = msgs.last().map(|m| m.content.clone()).unwrap_or_default();
                    Ok(PpoPrompt { ids, text })
                })
                .collect()
        };
        let prompts_path = r.data.path.clone().context("data.path: the prompt file")?;
        let train_set = render(&prompts_path)?;
        let eval_set = match &r.data.eval_path {
            Some(p) => render(p)?,
            None => vec![],
        };
        let (mut model, qlora) = load_model(r, &model_dir, ctx)?;
        let lcfg = r.adapter.lora()?;
        model.add_lora(&lcfg, r.training.seed)?;
        model.add_value_head()?;
        write_provenance(r, &model_dir, &prompts_path, qlora, (train_set.len(), eval_set.len()))?;

        // The reward replicas, called from this job thread through a small runtime of its own.
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("reward client runtime")?;
        let auth = ClientAuth::new(self.token.as_deref())?;
        let pool = rt.block_on(async { RewardPool::new(&self.endpoints, auth) })?;
        let model_ref = reward_ref(&cfg.reward);
        let replicas = Mutex::new(BTreeSet::new());
        let scorer = |items: &[(String, String)]| -> ferrotune_core::Result<Vec<f64>> {
            let req = ScoreRequest {
                model: Some(model_ref.clone()),
                items: items
                    .iter()
                    .map(|(p, r)| ScoreItem { prompt: p.clone(), response: r.clone(), reference: String::new() })
                    .collect(),
            };
            let resp = rt.block_on(pool.score(req)).map_err(|s| {
                let msg = format!("reward service: {} ({:?})", s.message(), s.code());
                match s.code() {
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                        CoreError::Unavailable(msg)
                    }
                    _ => CoreError::InvalidArgument(msg),
                }
            })?;
            replicas.lock().expect("replica set").insert(resp.replica.clone());
            Ok(resp.scores.into_iter().map(f64::from).collect())
        };
        let eos = defaults.eos_ids.clone();
        let objective = PpoObjective::new(cfg, defaults.pad_id, eos, &tok, &scorer, r.training.seed);
        let batch = r.training.micro_batch_size;
        let before = if eval_set.is_empty() {
            None
        } else {
            let started = std::time::Instant::now();
            let score = -evaluate(&mut model, &objective, &eval_set, batch)?;
            let m = objective.take_metrics();
            ctx.log(format!(
                "held-out mean score before training: {score:.4} ({} prompts, {:.1}s)",
                eval_set.len(),
                started.elapsed().as_secs_f64()
            ));
            Some(mean_metrics(&m))
        };
        let state = PolicyValueState { cfg: lcfg, base_model: model_dir.display().to_string() };
        let tokens_of = |p: &PpoPrompt| p.ids.len();
        let run = Run {
            objective: &objective,
            train: &train_set,
            eval: &eval_set,
            state: &state,
            cfg: &r.training,
            output_dir: &out,
            tokens_of: &tokens_of,
        };
        let mut after = None;
        let finished = train_job(&mut model, &run, resume, ctx, &mut |ev| {
            let used: Vec<String> = std::mem::take(&mut *replicas.lock().expect("replica set")).into_iter().collect();
            ctx.log(format!("step {}: scores from {}", ev.step, used.join(", ")));
            if ev.eval_loss.is_some() {
                after = Some(mean_metrics(&ev.metrics));
            }
        })?;
        if finished.is_none() {
            return Ok(JobOutcome::Stopped);
        }
        if let Some(b) = before {
            let body = json!({"before": b, "after": after, "eval_prompts": eval_set.len(), "eval_samples": objective.cfg.eval_samples});
            ferrotune_core::weights::write_atomically(
                &out.join("ppo_eval.json"),
                serde_json::to_string_pretty(&body)?.as_bytes(),
            )?;
            ctx.log(format!("held-out: {body}"));
        }
        Ok(JobOutcome::Finished(finish(&out, &prompts_path, "adapter", "PPO (eval loss = −held-out score)", ctx)))
    }
}
