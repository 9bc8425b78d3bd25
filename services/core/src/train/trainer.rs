//! The [`Trainer`]: one optimizer update at a time, from micro-batches whose forward and backward passes the
//! caller runs. It owns what an update needs and what must be checkpointed with it: AdamW and its moments,
//! the dynamic loss scale of f16 compute, gradient clipping, and the count of micro-batches run (each
//! micro-batch's dropout is seeded from the run seed and that count, so a resumed run replays exactly).
//! The data loop ([`super::train`]) and anything that drives training from outside (PPO's rollouts, a
//! remote orchestrator) call [`Trainer::update`].

use tch::Tensor;

use super::optim::{AdamW, AdamWConfig};
use super::{scaler, LossSum, Position, TrainConfig};
use crate::error::{CoreError, Result};
use crate::models::CausalLm;

/// What one optimizer update did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct UpdateStats {
    /// Σ loss over the update's micro-batches (unscaled).
    pub loss_sum: f64,
    /// The units the loss was normalised by.
    pub units: usize,
    /// Gradient norm before clipping.
    pub grad_norm: f64,
    /// f16 compute: the update was skipped (gradients overflowed; the loss scale shrank).
    pub skipped: bool,
    /// The loss scale used (1 unless f16).
    pub amp: f64,
}

/// `x` summed over the ranks of `g`.
pub(crate) fn sum_over(g: &mut crate::dist::ProcessGroup, x: f64) -> Result<f64> {
    let t = Tensor::from_slice(&[x]);
    g.all_reduce_sum(&[&t])?;
    Ok(f64::try_from(&t)?)
}

/// Per-step objective metrics as the whole data-parallel step saw them: each name's sums and counts pooled
/// over the ranks, then divided (a metric recorded for some examples only, as KTO's, is weighted by how many each
/// rank saw). With `names`, every name the objective can report: a rank that did not see one (no example of a
/// kind this step) adds nothing to it, and a name no rank saw is left out. Without, when the ranks do not report
/// the same names each keeps its own means — decided together, so every rank makes the same collective calls.
pub fn mean_over_ranks(
    g: &mut crate::dist::ProcessGroup,
    m: std::collections::BTreeMap<String, (f64, usize)>,
    names: Option<Vec<String>>,
) -> Result<std::collections::BTreeMap<String, f64>> {
    if let Some(names) = names {
        let get = |k: &String| m.get(k).copied().unwrap_or((0.0, 0));
        let values: Vec<f64> = names.iter().map(|k| get(k).0).chain(names.iter().map(|k| get(k).1 as f64)).collect();
        let t = Tensor::from_slice(&values);
        g.all_reduce_sum(&[&t])?;
        let pooled = Vec::<f64>::try_from(&t)?;
        let n = names.len();
        return Ok(names
            .into_iter()
            .enumerate()
            .filter(|&(i, _)| pooled[n + i] > 0.0)
            .map(|(i, k)| (k, pooled[i] / pooled[n + i]))
            .collect());
    }
    let means = |m: std::collections::BTreeMap<String, (f64, usize)>| {
        m.into_iter().map(|(k, (s, n))| (k, s / n.max(1) as f64)).collect()
    };
    // The names' fingerprint: equal on every rank iff the sum over ranks is world × this rank's.
    let fp = m.keys().fold(0xcbf2_9ce4_8422_2325u64, |h, k| {
        k.bytes().chain([0]).fold(h, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
    });
    let mine = [(fp >> 40) as f64, ((fp >> 20) & 0xF_FFFF) as f64, (fp & 0xF_FFFF) as f64, m.len() as f64];
    let t = Tensor::from_slice(&mine);
    g.all_reduce_sum(&[&t])?;
    let all = Vec::<f64>::try_from(&t)?;
    // Fingerprints are exchanged in 24- and 20-bit pieces so that sums stay exact in f64; all ranks take the
    // same branch (they all see the same sums and agree on the outcome).
    let same = all.iter().zip(&mine).all(|(a, b)| *a == b * g.world as f64);
    let agree = sum_over(g, f64::from(u8::from(same)))? == g.world as f64;
    if !agree || m.is_empty() {
        return Ok(means(m));
    }
    let values: Vec<f64> = m.values().map(|v| v.0).chain(m.values().map(|v| v.1 as f64)).collect();
    let t = Tensor::from_slice(&values);
    g.all_reduce_sum(&[&t])?;
    let pooled = Vec::<f64>::try_from(&t)?;
    let n = m.len();
    Ok(m.into_keys().enumerate().map(|(i, k)| (k, pooled[i] / pooled[n + i].max(1.0))).collect())
}

/// Optimizer, loss scaler, clipping and dropout seeding for one trained state.
pub struct Trainer {
    /// AdamW over the trainable parameters.
    pub opt: AdamW,
    max_grad_norm: f64,
    init_loss_scale: f64,
    seed: u64,
    /// Micro-batches run so far (seeds dropout).
    pub micro_batches: u64,
    /// f16 compute: log2 of the dynamic loss scale and good steps since it last changed.
    pub loss_scale: Option<(i32, u64)>,
    /// The settings it was built with.
    pub config: TrainConfig,
    /// Data parallelism: gradient buckets summed while the last micro-batch's backward pass runs (made at the
    /// first update; off with `FERROTUNE_DIST_OVERLAP=0`, and for the rest of the run after a step where a
    /// gradient grew after its bucket started). Declared before `dist`, so that it is dropped first: it sums on
    /// that group.
    sync: Option<crate::grad_sync::GradSync>,
    /// The overlap fell back once: no more buckets for this run.
    sync_off: bool,
    /// Data parallelism: the group whose ranks' gradients are summed before every update.
    pub dist: Option<crate::dist::ProcessGroup>,
    /// Seconds the last update spent in collectives (waiting for the other ranks included).
    pub comm_s: f64,
    /// Buckets whose all-reduce started during the last update's backward pass, of all buckets.
    pub buckets_early: (usize, usize),
}

impl Trainer {
    /// A trainer of `params` with the optimizer settings of `cfg`.
    pub fn new(params: Vec<(String, Tensor)>, cfg: &TrainConfig) -> Result<Self> {
        let adam = AdamWConfig {
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_epsilon,
            weight_decay: cfg.weight_decay,
            eight_bit: cfg.optim.eight_bit(),
        };
        let mut opt = AdamW::new(params, adam)?;
        if let Some(ratio) = cfg.loraplus_lr_ratio {
            opt.set_loraplus_ratio(ratio);
        }
        if opt.params.is_empty() {
            return Err(CoreError::InvalidArgument("nothing to train: the model has no trainable parameters".into()));
        }
        Ok(Self {
            opt,
            max_grad_norm: cfg.max_grad_norm,
            init_loss_scale: cfg.init_loss_scale,
            seed: cfg.seed,
            micro_batches: 0,
            loss_scale: None,
            config: cfg.clone(),
            dist: None,
            comm_s: 0.0,
            sync: None,
            sync_off: false,
            buckets_early: (0, 0),
        })
    }

    /// Takes up the counters a checkpoint recorded (the optimizer's moments are loaded separately).
    pub fn restore(&mut self, pos: &Position) {
        self.micro_batches = pos.micro_batches;
        self.loss_scale = pos.loss_scale;
    }

    /// Records the counters into `pos`, which checkpoints carry.
    pub fn record(&self, pos: &mut Position) {
        pos.micro_batches = self.micro_batches;
        pos.loss_scale = self.loss_scale;
    }

    /// One optimizer update at learning rate `lr` from `n` micro-batches, normalised by `units` (the units of
    /// all of them, so that accumulating equals one big batch). `backward(model, i, scale)` runs micro-batch
    /// `i`'s forward and the backward of `scale × Σ loss`, and returns its unscaled loss sum.
    pub fn update(
        &mut self,
        model: &mut CausalLm,
        n: usize,
        units: usize,
        lr: f64,
        backward: &mut dyn FnMut(&CausalLm, usize, f64) -> Result<LossSum>,
    ) -> Result<UpdateStats> {
        // f16 compute: dynamic loss scaling (see `scaler`).
        let mut loss_scale = (model.kind() == tch::Kind::Half).then(|| {
            self.loss_scale.map_or(
                scaler::LossScale { log2: self.init_loss_scale.log2() as i32, good_steps: 0 },
                |(log2, good_steps)| scaler::LossScale { log2, good_steps },
            )
        });
        let amp = loss_scale.map_or(1.0, |s| s.scale());
        // Data parallel: the loss is normalised by the units of every rank's micro-batches, and rank r's
        // micro-batches are the global step's r·n … r·n + n − 1 (their dropout seeds too), so N ranks equal
        // one rank accumulating N times as many.
        let (rank, world) = self.dist.as_ref().map_or((0, 1), |g| (g.rank, g.world));
        let t0 = std::time::Instant::now();
        let units = match &mut self.dist {
            Some(g) => sum_over(g, units as f64)?.round() as usize,
            None => units,
        };
        self.comm_s = t0.elapsed().as_secs_f64();
        let scale = amp / units.max(1) as f64;
        self.opt.zero_grad()?;
        if let (Some(g), None, false) = (&self.dist, &self.sync, self.sync_off) {
            if std::env::var("FERROTUNE_DIST_OVERLAP").map_or(true, |v| v != "0") {
                let params: Vec<&Tensor> = self.opt.params.iter().map(|p| &p.tensor).collect();
                let (bucket, first) = (crate::grad_sync::BUCKET_BYTES, crate::grad_sync::FIRST_BUCKET_BYTES);
                self.sync = Some(crate::grad_sync::GradSync::new(g, &params, bucket, first)?);
            }
        }
        let mut loss_sum = 0.0;
        let first = self.micro_batches + (rank * n) as u64;
        for i in 0..n {
            model.set_dropout_seed(self.seed ^ (first + i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
            if i + 1 == n {
                if let Some(s) = &mut self.sync {
                    s.arm();
                }
            }
            loss_sum += backward(model, i, scale)?.nll;
        }
        self.micro_batches += (n * world) as u64;
        if let Some(g) = &mut self.dist {
            let t0 = std::time::Instant::now();
            let summed = match &mut self.sync {
                Some(s) => match s.finish()? {
                    crate::grad_sync::Finished::Summed { early } => {
                        self.buckets_early = (early, s.buckets());
                        true
                    }
                    crate::grad_sync::Finished::Stale => {
                        // A weight reached by several backward calls (full fine-tuning's chunked head): it
                        // would fall back on every step, so the run sums after the backward pass from now on.
                        self.sync_off = true;
                        self.buckets_early = (0, s.buckets());
                        false
                    }
                },
                None => false,
            };
            if self.sync_off {
                self.sync = None;
            }
            if !summed {
                self.opt.all_reduce_grads(g)?;
            }
            loss_sum = sum_over(g, loss_sum)?;
            self.comm_s += t0.elapsed().as_secs_f64();
        }
        if amp != 1.0 {
            self.opt.scale_grads(1.0 / amp)?;
        }
        let grad_norm = self.opt.clip_grad_norm(self.max_grad_norm)?;
        let skipped = match &mut loss_scale {
            Some(s) => {
                let step = s.update(grad_norm.is_finite());
                self.loss_scale = Some((s.log2, s.good_steps));
                !step
            }
            None => false,
        };
        if !skipped {
            self.opt.step(lr)?;
        }
        Ok(UpdateStats { loss_sum, units, grad_norm, skipped, amp })
    }
}
