//! PPO on a policy training session with a value head, run by the orchestrator (TRL `PPOTrainer`'s recipe,
//! as the policy job did before): each step answers `micro_batch_size × gradient_accumulation_steps`
//! prompts once (sampling at `temperature`, log-probs and values of the sampling policy, reference
//! log-probs), scores them on the reward service, turns the KL to the reference and the score into
//! per-token rewards (`−kl_coef·kl`, the score at the last token, minus `missing_eos_penalty` without EOS),
//! computes GAE advantages (whitened over the batch) and returns, moves the adaptive KL coefficient, and
//! has the session run `ppo_epochs × num_mini_batches` updates of the PPO loss over shuffled micro-batches.

use anyhow::Result;
use ferrotune_core::train::epoch_order;
use ferrotune_core::train::group_rl::{GroupRlConfig, RewardFunc};
use ferrotune_core::train::ppo::{gae, token_kl, token_rewards, whiten, AdaptiveKl};
use ferrotune_core::train::ppo_objective::{rollout_seed, split, PpoConfig};
use ferrotune_core::train::schedule::lr_at;
use ferrotune_proto::v1::{PolicyLossSettings, UpdateRequest, UpdateSample};
use ferrotune_runtime::jobs::JobContext;
use serde_json::json;

use crate::orchestrator::{status_err, step_lost, Orchestration, PromptRow};

/// The parts of a PPO recipe the shared orchestration uses (one sample per prompt, the reward).
pub(crate) fn as_group(p: &PpoConfig) -> GroupRlConfig {
    GroupRlConfig {
        rewards: vec![RewardFunc {
            name: Some("score".into()),
            source: p.reward.clone(),
            weight: 1.0,
            reference_field: None,
        }],
        num_generations: 1,
        max_completion_length: p.max_new_tokens,
        temperature: p.temperature,
        top_p: 1.0,
        top_k: 0,
        ..Default::default()
    }
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len().max(1) as f64
}

impl Orchestration<'_> {
    fn ppo_cfg(&self) -> &PpoConfig {
        self.ppo.as_ref().expect("a PPO job")
    }

    /// One PPO step; its metrics (TRL's names) and the reward replicas that scored.
    pub(crate) fn ppo_step(&self, step: usize) -> Result<(serde_json::Map<String, serde_json::Value>, Vec<String>)> {
        let cfg = self.ppo_cfg().clone();
        let t = self.r.training.clone();
        let rows = self.batch(step);
        let seed = rollout_seed(t.seed, step);
        let samples = self.rollout(&rows, 1, seed, true, true).map_err(|s| step_lost(step, s))?;
        let (funcs, replicas) = self.score(&rows, &samples)?;
        let scores = &funcs[0];
        let beta = self.kl_coef.get();
        let mut sums: std::collections::BTreeMap<&str, Vec<f64>> = Default::default();
        let mut rewards = Vec::with_capacity(samples.len());
        let mut kl_sums = Vec::with_capacity(samples.len());
        for (s, &score) in samples.iter().zip(scores) {
            let eos = s.finish_reason == "eos";
            let kl = token_kl(&s.logprobs, &s.ref_logprobs, cfg.kl_estimator);
            let kl_sum: f64 = kl.iter().sum();
            kl_sums.push(kl_sum);
            for (k, v) in [
                ("objective/scores", score),
                ("objective/kl", kl_sum),
                ("objective/entropy", -s.logprobs.iter().sum::<f64>()),
                ("objective/non_score_reward", -beta * kl_sum),
                ("objective/rlhf_reward", score - beta * kl_sum),
                ("val/response_length", s.ids.len() as f64),
                ("val/eos_fraction", f64::from(u8::from(eos))),
            ] {
                sums.entry(k).or_default().push(v);
            }
            rewards.push(token_rewards(&kl, beta, score, eos, cfg.missing_eos_penalty));
        }
        let counts: Vec<usize> = rewards.iter().map(Vec::len).collect();
        if cfg.whiten_rewards {
            let mut flat: Vec<f64> = rewards.concat();
            whiten(&mut flat, false);
            rewards = split(&flat, &counts);
        }
        let (mut advantages, mut returns) = (vec![], vec![]);
        for (r, s) in rewards.iter().zip(&samples) {
            let (a, ret) = gae(r, &s.values, cfg.gamma, cfg.lam);
            advantages.push(a);
            returns.push(ret);
        }
        let mut flat: Vec<f64> = advantages.concat();
        whiten(&mut flat, true);
        let advantages = split(&flat, &counts);
        if let Some(target) = cfg.target_kl {
            let mut k = AdaptiveKl { value: beta, target, horizon: cfg.kl_horizon };
            k.update(mean(&kl_sums), samples.len());
            self.kl_coef.set(k.value);
        }
        let updates: Vec<UpdateSample> = samples
            .iter()
            .enumerate()
            .map(|(i, s)| UpdateSample {
                prompt_ids: rows[s.prompt as usize].ids.clone(),
                completion_ids: s.ids.clone(),
                old_logprobs: s.logprobs.clone(),
                ref_logprobs: vec![],
                advantages: advantages[i].clone(),
                masked: false,
                returns: returns[i].clone(),
                old_values: s.values.clone(),
            })
            .collect();
        // `ppo_epochs` passes over the step's micro-batches in a fresh order, each split into
        // `num_mini_batches` updates.
        let micro: Vec<&[UpdateSample]> = updates.chunks(t.micro_batch_size.max(1)).collect();
        let k = micro.len();
        let per = k.div_ceil(cfg.num_mini_batches.min(k).max(1));
        let lr = lr_at(t.lr_scheduler, t.learning_rate, step, t.warmup_steps, t.max_steps);
        let loss = PolicyLossSettings {
            loss_type: "ppo".into(),
            epsilon: cfg.cliprange,
            cliprange_value: cfg.cliprange_value,
            vf_coef: cfg.vf_coef,
            ..Default::default()
        };
        let mut last_updates = 0;
        let mut losses = vec![];
        for epoch in 0..cfg.ppo_epochs {
            let order = epoch_order(k, t.seed ^ step as u64, epoch);
            for group in order.chunks(per) {
                let samples: Vec<UpdateSample> = group.iter().flat_map(|&i| micro[i].iter().cloned()).collect();
                let req = UpdateRequest {
                    session_id: self.run_id.clone(),
                    samples,
                    loss: Some(loss.clone()),
                    learning_rate: lr,
                    temperature: cfg.temperature,
                    micro_batch_size: t.micro_batch_size as u32,
                };
                let mut p = self.policy.clone();
                let u = self.rt.block_on(p.update(req)).map_err(|s| step_lost(step, s))?.into_inner();
                last_updates = u.updates;
                for (k, v) in [
                    ("policy/clipfrac_avg", u.clip_ratio_high),
                    ("policy/approxkl_avg", u.approx_kl),
                    ("loss/policy_avg", u.policy_loss),
                    ("loss/value_avg", u.value_loss),
                    ("val/clipfrac_avg", u.value_clip_fraction),
                ] {
                    sums.entry(k).or_default().push(v);
                }
                losses.push(u.loss);
                sums.entry("grad_norm").or_default().push(u.grad_norm);
            }
        }
        let mut m = serde_json::Map::new();
        for (k, v) in &sums {
            m.insert((*k).to_owned(), json!(mean(v)));
        }
        m.insert("objective/kl_coef".into(), json!(beta));
        m.insert("loss".into(), json!(mean(&losses)));
        m.insert("learning_rate".into(), json!(lr));
        m.insert("updates".into(), json!(f64::from(last_updates)));
        m.insert("completions/mean_length".into(), json!(mean(&sums["val/response_length"])));
        Ok((m, replicas))
    }

    /// Held-out evaluation: `eval_samples` answers to each eval prompt (fixed seed), their mean score,
    /// response length and EOS rate.
    pub(crate) fn ppo_evaluate(&self, ctx: &JobContext, when: &str) -> Result<serde_json::Value> {
        let cfg = self.ppo_cfg();
        let started = std::time::Instant::now();
        let rows: Vec<&PromptRow> = self.eval.iter().collect();
        let (mut scores, mut lengths, mut eos) = (vec![], vec![], vec![]);
        for chunk in rows.chunks(16) {
            let samples = self
                .rollout(chunk, cfg.eval_samples, self.r.training.seed ^ 0x0E7A_15EE_D000_0001, false, false)
                .map_err(|s| status_err("evaluation rollout", s))?;
            let (funcs, _) = self.score(chunk, &samples)?;
            scores.extend(funcs[0].iter().copied());
            lengths.extend(samples.iter().map(|s| s.ids.len() as f64));
            eos.extend(samples.iter().map(|s| f64::from(u8::from(s.finish_reason == "eos"))));
        }
        let v = json!({"score": mean(&scores), "response_length": mean(&lengths), "eos_fraction": mean(&eos)});
        ctx.log(format!(
            "held-out mean score {when} training: {:.4} ({} prompts × {}, {:.1}s)",
            mean(&scores),
            rows.len(),
            cfg.eval_samples,
            started.elapsed().as_secs_f64()
        ));
        Ok(v)
    }
}
