//! The one data loop. SFT, reward modelling and DPO differ only in their [`Objective`] (how a micro-batch's
//! loss is computed and what it is normalised by: losses only) and in what is trainable
//! ([`TrainableState`]); PPO is an [`Algorithm`] of its own that drives the [`Trainer`] through several
//! updates per step. The loop owns the data order, schedule, evaluation, metrics, checkpoints and exact
//! resume; the [`Trainer`] owns one optimizer update (AdamW, accumulation, clipping, f16 loss scaling).
//!
//! Gradient accumulation normalises by the total units (trained tokens for SFT) of all micro-batches of an
//! optimizer step, so accumulating k micro-batches equals one batch k times larger (the trap of averaging per
//! micro-batch is avoided). Dropout is seeded per micro-batch from the run seed and the micro-batch's global
//! index, and the data order per epoch from the seed and the epoch, so a resumed run replays exactly the
//! same computation as an uninterrupted one.

pub mod advantages;
pub mod checkpoint;
pub mod dpo;
pub mod full;
pub mod group_rl;
pub mod grpo;
pub mod kto;
pub mod logps;
pub mod loss;
pub mod optim;
pub mod optim8;
pub mod ppo;
pub mod ppo_objective;
pub mod ref_free;
pub mod reward;
pub mod run_dir;
pub mod scaler;
pub mod schedule;
pub mod session;
pub mod sft;
pub mod trainer;

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::error::{CoreError, Result};
use crate::models::CausalLm;
use crate::sampling::Rng;
pub use loss::LossSum;
use schedule::{lr_at, ScheduleKind};
pub use trainer::{Trainer, UpdateStats};

/// How a batch of examples is turned into a loss.
pub trait Objective {
    /// One training example.
    type Example;
    /// Units an example adds to the normaliser (trained tokens for SFT, pairs for DPO).
    fn units(&self, ex: &Self::Example) -> usize;
    /// Forward and backward of `scale × Σ loss` over `batch`; returns the unscaled sum and its units.
    fn backward(&self, model: &CausalLm, batch: &[&Self::Example], scale: f64) -> Result<LossSum>;
    /// Loss without gradients.
    fn eval(&self, model: &CausalLm, batch: &[&Self::Example]) -> Result<LossSum>;
    /// Objective-specific metrics averaged since the last call (e.g. DPO's rewards/accuracies; eval ones
    /// prefixed `eval_`), reported with each step.
    fn take_metrics(&self) -> std::collections::BTreeMap<String, f64> {
        Default::default()
    }
    /// [`Objective::take_metrics`] as (sum, count) per name, so that data-parallel ranks can pool them; by
    /// default each mean counts once. Metrics derived from others (KTO's margin) are left to
    /// [`Objective::derive_metrics`].
    fn take_metric_sums(&self) -> std::collections::BTreeMap<String, (f64, usize)> {
        self.take_metrics().into_iter().map(|(k, v)| (k, (v, 1))).collect()
    }
    /// Adds the metrics computed from pooled means (after [`Objective::take_metric_sums`] is pooled).
    fn derive_metrics(&self, _m: &mut std::collections::BTreeMap<String, f64>) {}
    /// Every name [`Objective::take_metric_sums`] can report, when some are reported only for some batches
    /// (KTO's per-kind rewards): data-parallel ranks then pool each name over the ranks that saw it.
    fn metric_names(&self) -> Option<Vec<String>> {
        None
    }
}

/// What the data loop asks of a training algorithm once per optimizer step. Every [`Objective`] is one: a step
/// is one [`Trainer`] update over all the step's micro-batches. PPO is another: a step samples rollouts with
/// the policy as trained so far, then drives the trainer through several updates over them.
pub trait Algorithm {
    /// One training example.
    type Example;
    /// Runs optimizer step `step` on its micro-batches (in data order) at learning rate `lr`; the loss sum,
    /// units and the last update's statistics.
    fn step(
        &self,
        model: &mut CausalLm,
        trainer: &mut Trainer,
        micro: &[Vec<&Self::Example>],
        step: usize,
        lr: f64,
    ) -> Result<UpdateStats>;
    /// Loss without gradients.
    fn eval(&self, model: &CausalLm, batch: &[&Self::Example]) -> Result<LossSum>;
    /// Metrics averaged since the last call, reported with each step.
    fn take_metrics(&self) -> std::collections::BTreeMap<String, f64> {
        Default::default()
    }
    /// [`Algorithm::take_metrics`] as (sum, count) per name (see [`Objective::take_metric_sums`]).
    fn take_metric_sums(&self) -> std::collections::BTreeMap<String, (f64, usize)> {
        self.take_metrics().into_iter().map(|(k, v)| (k, (v, 1))).collect()
    }
    /// See [`Objective::derive_metrics`].
    fn derive_metrics(&self, _m: &mut std::collections::BTreeMap<String, f64>) {}
    /// See [`Objective::metric_names`].
    fn metric_names(&self) -> Option<Vec<String>> {
        None
    }
    /// A number the algorithm carries from step to step (PPO's adaptive KL coefficient), kept in checkpoints.
    fn carried(&self) -> Option<f64> {
        None
    }
    /// Restores [`Algorithm::carried`] on resume.
    fn restore_carried(&self, _value: f64) {}
}

impl<O: Objective> Algorithm for O {
    type Example = O::Example;

    fn step(
        &self,
        model: &mut CausalLm,
        trainer: &mut Trainer,
        micro: &[Vec<&O::Example>],
        _step: usize,
        lr: f64,
    ) -> Result<UpdateStats> {
        let units: usize = micro.iter().flatten().map(|e| self.units(e)).sum();
        trainer.update(model, micro.len(), units, lr, &mut |m, i, scale| self.backward(m, &micro[i], scale))
    }

    fn eval(&self, model: &CausalLm, batch: &[&O::Example]) -> Result<LossSum> {
        Objective::eval(self, model, batch)
    }

    fn take_metrics(&self) -> std::collections::BTreeMap<String, f64> {
        Objective::take_metrics(self)
    }

    fn take_metric_sums(&self) -> std::collections::BTreeMap<String, (f64, usize)> {
        Objective::take_metric_sums(self)
    }

    fn derive_metrics(&self, m: &mut std::collections::BTreeMap<String, f64>) {
        Objective::derive_metrics(self, m)
    }

    fn metric_names(&self) -> Option<Vec<String>> {
        Objective::metric_names(self)
    }
}

/// Running means of named per-example metrics, for [`Objective::take_metrics`]. Objectives record during
/// `backward` / `eval` (through `&self`, hence the cell) and the loop takes the means once per step.
#[derive(Debug, Default)]
pub struct MetricSums(std::cell::RefCell<std::collections::BTreeMap<String, (f64, usize)>>);

impl MetricSums {
    /// Adds one example's values, each named `{prefix}{name}`.
    pub fn add(&self, prefix: &str, values: &[(&str, f64)]) {
        let mut m = self.0.borrow_mut();
        for (k, v) in values {
            let e = m.entry(format!("{prefix}{k}")).or_insert((0.0, 0));
            e.0 += v;
            e.1 += 1;
        }
    }

    /// TRL's pairwise metrics of one pair's rewards: rewards/chosen, rejected, accuracies, margins.
    pub fn add_rewards(&self, prefix: &str, chosen: f64, rejected: f64) {
        self.add(
            prefix,
            &[
                ("rewards/chosen", chosen),
                ("rewards/rejected", rejected),
                ("rewards/accuracies", f64::from(u8::from(chosen > rejected))),
                ("rewards/margins", chosen - rejected),
            ],
        );
    }

    /// The sums and counts since the last call (and a fresh start).
    pub fn take_sums(&self) -> std::collections::BTreeMap<String, (f64, usize)> {
        std::mem::take(&mut *self.0.borrow_mut())
    }

    /// The means since the last call (and a fresh start).
    pub fn take(&self) -> std::collections::BTreeMap<String, f64> {
        std::mem::take(&mut *self.0.borrow_mut()).into_iter().map(|(k, (s, n))| (k, s / n.max(1) as f64)).collect()
    }
}

/// What the run trains and how it is saved: LoRA adapters, a reward head, full weights…
pub trait TrainableState {
    /// The leaf tensors to optimise, by name.
    fn params(&self, model: &mut CausalLm) -> Vec<(String, Tensor)>;
    /// Saves the trained state into `dir` (e.g. a PEFT adapter).
    fn save(&self, model: &mut CausalLm, dir: &Path) -> Result<()>;
    /// Restores it from `dir` (a checkpoint).
    fn load(&self, model: &mut CausalLm, dir: &Path) -> Result<()>;
}

/// Hyperparameters of the loop.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Schedule after warmup.
    pub lr_scheduler: ScheduleKind,
    /// Linear warmup steps.
    pub warmup_steps: usize,
    /// Optimizer steps to run.
    pub max_steps: usize,
    /// Examples per micro-batch.
    pub micro_batch_size: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Clip the global gradient norm to this (0 = off).
    pub max_grad_norm: f64,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW β₁.
    pub adam_beta1: f64,
    /// AdamW β₂.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_epsilon: f64,
    /// Seed for data order, dropout and initialisation.
    pub seed: u64,
    /// Evaluate every N optimizer steps (0 = only at the end).
    pub eval_steps: usize,
    /// Checkpoint every N optimizer steps (0 = only at the end).
    pub save_steps: usize,
    /// Checkpoints kept (oldest deleted first).
    pub save_total_limit: usize,
    /// Rows of logits computed at once in the loss.
    pub loss_chunk_tokens: usize,
    /// Recompute each decoder layer during the backward pass (one layer's activations in memory at a
    /// time instead of all of them; one extra forward pass).
    pub gradient_checkpointing: bool,
    /// f16 compute: the initial dynamic loss scale (a power of two; GradScaler's 65536).
    pub init_loss_scale: f64,
    /// Start a fresh run in an output dir that holds another run, replacing it (HF's
    /// `overwrite_output_dir`); without it such a run is refused.
    pub overwrite_output_dir: bool,
    /// The optimizer, by the name transformers' `optim` gives it (see [`optim::OptimName`]).
    pub optim: optim::OptimName,
    /// LoRA+: `lora_B` learns at this multiple of the learning rate (PEFT's `loraplus_lr_ratio`; off when
    /// absent).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loraplus_lr_ratio: Option<f64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            learning_rate: 2e-4,
            lr_scheduler: ScheduleKind::Linear,
            warmup_steps: 0,
            max_steps: 50,
            micro_batch_size: 1,
            gradient_accumulation_steps: 4,
            max_grad_norm: 1.0,
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            seed: 42,
            eval_steps: 0,
            save_steps: 0,
            save_total_limit: 2,
            loss_chunk_tokens: 256,
            gradient_checkpointing: false,
            init_loss_scale: 65536.0,
            overwrite_output_dir: false,
            optim: optim::OptimName::default(),
            loraplus_lr_ratio: None,
        }
    }
}

impl TrainConfig {
    /// Rejects absurd values with a message naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(CoreError::InvalidArgument(m));
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0 && self.learning_rate < 1.0) {
            return bad(format!("learning_rate must be in (0, 1), got {}", self.learning_rate));
        }
        if self.max_steps == 0 {
            return bad("max_steps must be at least 1".into());
        }
        if self.micro_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return bad("micro_batch_size and gradient_accumulation_steps must be at least 1".into());
        }
        if self.warmup_steps > self.max_steps {
            return bad(format!("warmup_steps ({}) exceeds max_steps ({})", self.warmup_steps, self.max_steps));
        }
        if !(self.max_grad_norm >= 0.0) || !(self.weight_decay >= 0.0) {
            return bad("max_grad_norm and weight_decay must be >= 0".into());
        }
        if !(0.0..1.0).contains(&self.adam_beta1)
            || !(0.0..1.0).contains(&self.adam_beta2)
            || !(self.adam_epsilon > 0.0)
        {
            return bad("adam betas must be in [0, 1) and adam_epsilon > 0".into());
        }
        if self.loss_chunk_tokens == 0 {
            return bad("loss_chunk_tokens must be at least 1".into());
        }
        if let Some(r) = self.loraplus_lr_ratio {
            if !(r.is_finite() && r > 0.0 && r <= 1e4) {
                return bad(format!("loraplus_lr_ratio must be in (0, 10000], got {r}"));
            }
        }
        let l = self.init_loss_scale.log2();
        if !(self.init_loss_scale >= 1.0 && l.fract() == 0.0 && l <= 120.0) {
            return bad(format!("init_loss_scale must be a power of two in [1, 2^120], got {}", self.init_loss_scale));
        }
        Ok(())
    }
}

/// Where the loop resumes: optimizer steps done and the data position.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct Position {
    /// Optimizer steps completed.
    pub step: usize,
    /// Epoch of the next example.
    pub epoch: usize,
    /// Index of the next example in that epoch's order.
    pub cursor: usize,
    /// Micro-batches run so far (seeds dropout).
    pub micro_batches: u64,
    /// Trained units (tokens) so far.
    pub units: u64,
    /// f16 compute: log2 of the dynamic loss scale and good steps since it last changed ([`scaler`]).
    #[serde(default)]
    pub loss_scale: Option<(i32, u64)>,
    /// What the objective carries across steps ([`Objective::carried`]).
    #[serde(default)]
    pub carried: Option<f64>,
}

/// Progress after an optimizer step (for progress bars, metrics files and job events).
#[derive(Debug, Clone, Serialize)]
pub struct StepEvent {
    /// Optimizer steps completed.
    pub step: usize,
    /// Total optimizer steps.
    pub total: usize,
    /// Mean loss per unit over this step's micro-batches.
    pub loss: f64,
    /// Mean evaluation loss, when evaluated at this step.
    pub eval_loss: Option<f64>,
    /// Learning rate used for this step.
    pub lr: f64,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens processed per second (all tokens of the step's micro-batches).
    pub tokens_per_s: f64,
    /// Trained units of this step.
    pub trained_tokens: usize,
    /// Epoch (fractional).
    pub epoch: f64,
    /// A checkpoint written at this step, if any.
    pub checkpoint: Option<PathBuf>,
    /// f16 compute: the loss scale used by this step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss_scale: Option<f64>,
    /// f16 compute: the step's gradients overflowed and the update was skipped.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// Objective-specific metrics of this step ([`Objective::take_metrics`]).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub metrics: std::collections::BTreeMap<String, f64>,
}

/// The data order of `epoch`: a permutation of `0..n` from the run seed.
pub fn epoch_order(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    let mut rng = Rng::for_row(seed ^ 0x005E_ED0F_DA7A, epoch);
    for i in (1..n).rev() {
        let j = (rng.uniform() * (i + 1) as f64) as usize;
        order.swap(i, j.min(i));
    }
    order
}

/// Everything the loop needs besides the model.
pub struct Run<'a, O: Algorithm> {
    /// The objective (or algorithm).
    pub objective: &'a O,
    /// Training examples.
    pub train: &'a [O::Example],
    /// Held-out examples (may be empty).
    pub eval: &'a [O::Example],
    /// What is trained and how it is saved.
    pub state: &'a dyn TrainableState,
    /// Hyperparameters.
    pub cfg: &'a TrainConfig,
    /// Output directory: `checkpoints/`, `metrics.jsonl`, and the final trained state.
    pub output_dir: &'a Path,
    /// Count of tokens in an example (for tokens/s).
    pub tokens_of: &'a dyn Fn(&O::Example) -> usize,
}

/// Outcome of [`train`].
#[derive(Debug, Clone, Serialize)]
pub struct TrainSummary {
    /// Final position.
    pub position: Position,
    /// Last step's loss.
    pub final_loss: f64,
    /// Last evaluation loss.
    pub final_eval_loss: Option<f64>,
    /// Where the final state was saved.
    pub output_dir: PathBuf,
    /// Whether the run stopped early because `should_stop` said so.
    pub stopped: bool,
}

/// The newest checkpoint of run `run_id` that [`checkpoint::verify`] accepts; a corrupt newer one is skipped
/// with a warning on stderr.
pub(crate) fn newest_intact(ckpt_root: &Path, run_id: Option<&str>) -> Result<Option<PathBuf>> {
    for dir in checkpoint::candidates(ckpt_root, run_id)? {
        match checkpoint::verify(&dir) {
            Ok(()) => return Ok(Some(dir)),
            Err(e) => eprintln!("warning: checkpoint {} is not intact ({e}); trying an older one", dir.display()),
        }
    }
    Ok(None)
}

/// Runs (or, with `resume`, continues from the newest intact checkpoint) the training loop.
pub fn train<O: Algorithm>(
    model: &mut CausalLm,
    run: &Run<'_, O>,
    resume: bool,
    on_step: &mut dyn FnMut(&StepEvent),
    should_stop: &dyn Fn() -> bool,
) -> Result<TrainSummary> {
    let cfg = run.cfg;
    cfg.validate()?;
    if run.train.is_empty() {
        return Err(CoreError::InvalidArgument("the training set is empty".into()));
    }
    crate::fsx::create_dir_all(run.output_dir).map_err(|e| CoreError::io(run.output_dir, e))?;
    let ckpt_root = run.output_dir.join("checkpoints");
    let run_id = run_dir::run_id(run.output_dir)?;
    let run_id = run_id.as_deref();
    let mut pos = Position::default();
    let resume_from = if resume { newest_intact(&ckpt_root, run_id)? } else { None };
    if let Some(dir) = &resume_from {
        run.state.load(model, dir)?;
    }
    let mut trainer = Trainer::new(run.state.params(model), cfg)?;
    // Data parallel (WORLD_SIZE > 1, as torchrun sets it): every rank runs this loop on its share of each
    // global batch; rank 0 alone writes checkpoints, metrics and the trained state.
    let dist = crate::dist::DistEnv::from_env()?;
    let (rank, world) = dist.as_ref().map_or((0, 1), |d| (d.rank, d.world));
    if let Some(d) = &dist {
        trainer.dist = Some(d.join(model.device())?);
    }
    let writer = rank == 0;
    if let Some(dir) = &resume_from {
        pos = checkpoint::load(dir, &mut trainer.opt)?;
        trainer.restore(&pos);
        if let Some(v) = pos.carried {
            run.objective.restore_carried(v);
        }
    }
    let metrics_path = run.output_dir.join("metrics.jsonl");
    let mut metrics = if writer { Some(checkpoint::MetricsLog::open(&metrics_path, pos.step)?) } else { None };
    model.set_training(true);
    let n = run.train.len();
    let mut order = epoch_order(n, cfg.seed, pos.epoch);
    let (mut last_loss, mut last_eval, mut stopped) = (f64::NAN, None, false);
    let mut checkpointed = pos.step;
    while pos.step < cfg.max_steps {
        // Data parallel: the ranks stop together (each may see the signal or the cancel a step apart, and one
        // that went on alone would wait for the others in its first all-reduce).
        let stop = match &mut trainer.dist {
            Some(g) => trainer::sum_over(g, f64::from(u8::from(should_stop())))? > 0.0,
            None => should_stop(),
        };
        if stop {
            // Asked to stop (SIGINT/SIGTERM, job cancelled): keep the progress so `--resume` loses nothing.
            if pos.step > checkpointed && writer {
                checkpoint::save(&ckpt_root, model, run.state, &trainer.opt, &pos, cfg.save_total_limit, run_id)?;
            }
            stopped = true;
            break;
        }
        let started = Instant::now();
        // This step's micro-batches, in data order: the global batch is micro × accumulation × ranks, and
        // this rank keeps its contiguous share.
        let mut micro: Vec<Vec<&O::Example>> = Vec::with_capacity(cfg.gradient_accumulation_steps * world);
        for _ in 0..cfg.gradient_accumulation_steps * world {
            let mut mb = Vec::with_capacity(cfg.micro_batch_size);
            for _ in 0..cfg.micro_batch_size {
                if pos.cursor == n {
                    pos.epoch += 1;
                    pos.cursor = 0;
                    order = epoch_order(n, cfg.seed, pos.epoch);
                }
                mb.push(&run.train[order[pos.cursor]]);
                pos.cursor += 1;
            }
            micro.push(mb);
        }
        let micro: Vec<Vec<&O::Example>> = micro
            .into_iter()
            .skip(rank * cfg.gradient_accumulation_steps)
            .take(cfg.gradient_accumulation_steps)
            .collect();
        let tokens: usize = micro.iter().flatten().map(|e| (run.tokens_of)(e)).sum();
        model.set_training(true);
        let lr = lr_at(cfg.lr_scheduler, cfg.learning_rate, pos.step, cfg.warmup_steps, cfg.max_steps);
        let u = run.objective.step(model, &mut trainer, &micro, pos.step, lr)?;
        let (sum, units, grad_norm, skipped, amp) = (u.loss_sum, u.units, u.grad_norm, u.skipped, u.amp);
        trainer.record(&mut pos);
        pos.carried = run.objective.carried();
        pos.step += 1;
        pos.units += units as u64;
        // Each update's loss is a mean over its units; a step with several updates (PPO) reports their mean.
        last_loss = sum / units.max(1) as f64;
        if !last_loss.is_finite() {
            return Err(CoreError::InvalidArgument(format!(
                "loss became {last_loss} at step {}; lower the learning rate",
                pos.step
            )));
        }
        let last = pos.step == cfg.max_steps;
        let eval_loss = if !run.eval.is_empty() && (last || (cfg.eval_steps > 0 && pos.step % cfg.eval_steps == 0)) {
            let l = evaluate(model, run.objective, run.eval, cfg.micro_batch_size)?;
            last_eval = Some(l);
            Some(l)
        } else {
            None
        };
        // The step's metrics before its checkpoint: pooling them is a collective, and a rank dying there must
        // not leave a checkpoint whose metrics line was never written (a resume would then miss that line).
        let step_metrics = {
            let mut m = match &mut trainer.dist {
                Some(g) => {
                    let names = run.objective.metric_names();
                    let mut m = trainer::mean_over_ranks(g, run.objective.take_metric_sums(), names)?;
                    run.objective.derive_metrics(&mut m);
                    m
                }
                None => run.objective.take_metrics(),
            };
            if trainer.dist.is_some() {
                // Time in collectives this step, waiting for the other ranks included (`make bench-dist`).
                m.insert("dist/comm_s".into(), trainer.comm_s);
                m.insert("dist/step_s".into(), started.elapsed().as_secs_f64());
                // Gradient buckets whose all-reduce started inside the backward pass, of all.
                let (early, all) = trainer.buckets_early;
                m.insert("dist/buckets_overlapped".into(), early as f64 / all.max(1) as f64);
            }
            m
        };
        let checkpoint = if writer && (last || (cfg.save_steps > 0 && pos.step % cfg.save_steps == 0)) {
            checkpointed = pos.step;
            Some(checkpoint::save(&ckpt_root, model, run.state, &trainer.opt, &pos, cfg.save_total_limit, run_id)?)
        } else {
            None
        };
        let ev = StepEvent {
            step: pos.step,
            total: cfg.max_steps,
            loss: last_loss,
            eval_loss,
            lr,
            grad_norm,
            tokens_per_s: tokens as f64 / started.elapsed().as_secs_f64(),
            trained_tokens: units,
            epoch: pos.epoch as f64 + pos.cursor as f64 / n as f64,
            checkpoint,
            loss_scale: (amp != 1.0).then_some(amp),
            skipped,
            metrics: step_metrics,
        };
        if let Some(m) = &mut metrics {
            m.write(&ev)?;
        }
        on_step(&ev);
    }
    model.set_training(false);
    if writer {
        run.state.save(model, run.output_dir)?;
    }
    Ok(TrainSummary {
        position: pos,
        final_loss: last_loss,
        final_eval_loss: last_eval,
        output_dir: run.output_dir.to_path_buf(),
        stopped,
    })
}

/// Mean loss per unit over `examples` (dropout off).
pub fn evaluate<O: Algorithm>(model: &mut CausalLm, obj: &O, examples: &[O::Example], batch: usize) -> Result<f64> {
    model.set_training(false);
    let refs: Vec<&O::Example> = examples.iter().collect();
    let mut total = LossSum::default();
    for chunk in refs.chunks(batch.max(1)) {
        let l = obj.eval(model, chunk)?;
        total.nll += l.nll;
        total.tokens += l.tokens;
    }
    model.set_training(true);
    Ok(total.nll / total.tokens.max(1) as f64)
}
