//! AdamW with decoupled weight decay (Loshchilov & Hutter, <https://arxiv.org/abs/1711.05101>), exactly as
//! `torch.optim.AdamW` updates (decay first, then the bias-corrected Adam step), with its state kept as
//! named f32 tensors so that checkpoints restore it bit for bit.

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::optim8::{step32, step8, State8, Step, MIN_8BIT_SIZE};
use crate::error::{CoreError, Result};

/// The optimizer names of transformers' `TrainingArguments.optim` that ferrotune runs. The 32-bit ones are
/// all this AdamW (bitsandbytes' paging is a CUDA unified-memory device that changes where the moments live,
/// not the update); the 8-bit ones keep bitsandbytes' blockwise 8-bit moments ([`super::optim8`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimName {
    /// `torch.optim.AdamW`.
    #[default]
    AdamwTorch,
    /// `torch.optim.AdamW(fused=True)`: the same update.
    AdamwTorchFused,
    /// bitsandbytes' 32-bit AdamW: the same update.
    #[serde(rename = "adamw_32bit")]
    Adamw32bit,
    /// bitsandbytes' paged 32-bit AdamW (the seed's `optim="paged_adamw_32bit"`): the same update.
    #[serde(rename = "paged_adamw_32bit")]
    PagedAdamw32bit,
    /// bitsandbytes' `AdamW8bit` (transformers' `adamw_8bit` / `adamw_bnb_8bit`).
    #[serde(rename = "adamw_8bit", alias = "adamw_bnb_8bit")]
    Adamw8bit,
    /// bitsandbytes' paged 8-bit AdamW: the same update.
    #[serde(rename = "paged_adamw_8bit")]
    PagedAdamw8bit,
}

impl OptimName {
    /// Whether the moments are bitsandbytes' blockwise 8-bit ones.
    pub fn eight_bit(self) -> bool {
        matches!(self, Self::Adamw8bit | Self::PagedAdamw8bit)
    }
}

/// AdamW hyperparameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay (not applied to 1-D parameters: biases and norms).
    pub weight_decay: f64,
    /// bitsandbytes' blockwise 8-bit moments (tensors of at least 4,096 elements; embeddings and smaller
    /// tensors keep bitsandbytes' 32-bit ones, as transformers sets up `adamw_8bit`).
    pub eight_bit: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0, eight_bit: false }
    }
}

/// A parameter's moments.
enum Moments {
    /// torch's AdamW: f32 tensors beside the parameter.
    Torch { m: Tensor, v: Tensor },
    /// bitsandbytes' 8-bit moments (host memory).
    Bnb8(State8),
    /// bitsandbytes' 32-bit moments (host memory) for tensors it keeps in 32 bits.
    Bnb32 { m: Vec<f32>, v: Vec<f32> },
}

/// One trainable parameter with its moments.
pub struct Param {
    /// Name (PEFT key for adapters, HF key for full fine-tuning).
    pub name: String,
    /// The leaf tensor (requires grad).
    pub tensor: Tensor,
    moments: Moments,
    decay: bool,
    /// This parameter's learning rate is the step's times this (LoRA+ gives `lora_B` a larger one).
    pub lr_scale: f64,
}

/// The optimizer over a fixed list of parameters.
pub struct AdamW {
    /// Hyperparameters.
    pub cfg: AdamWConfig,
    /// Parameters in a fixed order.
    pub params: Vec<Param>,
    /// Updates taken so far.
    pub step: i64,
}

impl AdamW {
    /// An optimizer over `params` (name, leaf tensor); moments start at zero.
    pub fn new(params: Vec<(String, Tensor)>, cfg: AdamWConfig) -> Result<Self> {
        let params = params
            .into_iter()
            .map(|(name, tensor)| {
                let n = tensor.numel();
                let moments = if !cfg.eight_bit {
                    let m = tensor.f_zeros_like()?.f_to_kind(Kind::Float)?;
                    Moments::Torch { v: m.f_zeros_like()?, m }
                } else if eight_bit_moments(&name, n) {
                    Moments::Bnb8(State8::new(n))
                } else {
                    Moments::Bnb32 { m: vec![0.0; n], v: vec![0.0; n] }
                };
                // transformers decays every weight but biases and norms: DoRA's 1-D magnitudes too.
                let decay = tensor.dim() >= 2 || name.ends_with("lora_magnitude_vector");
                Ok(Param { name, tensor, moments, decay, lr_scale: 1.0 })
            })
            .collect::<Result<_>>()?;
        Ok(Self { cfg, params, step: 0 })
    }

    /// LoRA+ (PEFT's `create_loraplus_optimizer`): the `lora_B` matrices and every 1-D parameter (PEFT's
    /// groupB) learn at `ratio` × the learning rate, everything else at the learning rate; decoupled weight
    /// decay follows each parameter's rate, as torch's AdamW does per parameter group.
    pub fn set_loraplus_ratio(&mut self, ratio: f64) {
        for p in &mut self.params {
            p.lr_scale = if p.name.contains(".lora_B.") || p.tensor.dim() == 1 { ratio } else { 1.0 };
        }
    }

    /// Sets every gradient to zero (drops them).
    pub fn zero_grad(&mut self) -> Result<()> {
        for p in &mut self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.f_detach_()?;
                let _ = g.f_zero_()?;
            }
        }
        Ok(())
    }

    /// Sums every gradient over the ranks of `pg` (one flat buffer per dtype, on the CPU). A parameter this
    /// rank's micro-batches never reached contributes zeros (and gets the others' sum).
    pub fn all_reduce_grads(&mut self, pg: &mut crate::dist::ProcessGroup) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for p in &self.params {
            if !p.tensor.grad().defined() {
                // Allocates a zero gradient through autograd (tch cannot set `.grad` directly).
                let _guard = tch::with_grad(|| (p.tensor.sum(None) * 0.0).f_backward());
            }
        }
        let mut kinds: Vec<Kind> = self.params.iter().map(|p| p.tensor.kind()).collect();
        kinds.sort_by_key(|k| format!("{k:?}"));
        kinds.dedup();
        for kind in kinds {
            let grads: Vec<Tensor> =
                self.params.iter().filter(|p| p.tensor.kind() == kind).map(|p| p.tensor.grad()).collect();
            let flat: Vec<Tensor> = grads.iter().map(|g| g.reshape([-1]).to_device(tch::Device::Cpu)).collect();
            let buf = Tensor::f_cat(&flat, 0)?;
            pg.all_reduce_sum(&[&buf])?;
            let mut off = 0;
            for g in &grads {
                let n = g.numel() as i64;
                let mut g = g.shallow_clone();
                let part = buf.narrow(0, off, n).view(g.size().as_slice()).to_device(g.device());
                g.f_copy_(&part)?;
                off += n;
            }
        }
        Ok(())
    }

    /// Multiplies every gradient by `f` (unscaling after a scaled loss).
    pub fn scale_grads(&mut self, f: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for p in &self.params {
            let mut g = p.tensor.grad();
            if g.defined() {
                let _ = g.f_mul_scalar_(f)?;
            }
        }
        Ok(())
    }

    /// Global L2 norm of the gradients; when above `max_norm` (> 0), gradients are scaled down to it
    /// (`torch.nn.utils.clip_grad_norm_`). Returns the norm before clipping.
    pub fn clip_grad_norm(&mut self, max_norm: f64) -> Result<f64> {
        let _guard = tch::no_grad_guard();
        let mut sq = 0f64;
        for p in &self.params {
            let g = p.tensor.grad();
            if g.defined() {
                sq += g.f_to_kind(Kind::Double)?.f_pow_tensor_scalar(2)?.f_sum(Kind::Double)?.f_double_value(&[])?;
            }
        }
        let norm = sq.sqrt();
        if max_norm > 0.0 && norm > max_norm {
            let coef = max_norm / (norm + 1e-6);
            for p in &self.params {
                let mut g = p.tensor.grad();
                if g.defined() {
                    let _ = g.f_mul_scalar_(coef)?;
                }
            }
        }
        Ok(norm)
    }

    /// One update with learning rate `lr`.
    pub fn step(&mut self, lr: f64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2 = 1.0 - c.beta2.powi(self.step as i32);
        for p in &mut self.params {
            let g = p.tensor.grad();
            if !g.defined() {
                continue;
            }
            let g = g.f_to_kind(Kind::Float)?;
            let lr = lr * p.lr_scale;
            let Moments::Torch { m, v } = &mut p.moments else {
                let wd = if p.decay { c.weight_decay } else { 0.0 };
                let s = Step { lr, beta1: c.beta1, beta2: c.beta2, eps: c.eps, weight_decay: wd, t: self.step as i32 };
                host_step(&mut p.tensor, &g, &mut p.moments, s)?;
                continue;
            };
            if p.decay && c.weight_decay != 0.0 {
                let _ = p.tensor.f_mul_scalar_(1.0 - lr * c.weight_decay)?;
            }
            let _ = m.f_mul_scalar_(c.beta1)?.f_add_(&g.f_mul_scalar(1.0 - c.beta1)?)?;
            let _ = v.f_mul_scalar_(c.beta2)?.f_addcmul_(&g, &g.f_mul_scalar(1.0 - c.beta2)?)?;
            let denom = v.f_sqrt()?.f_div_scalar(bc2.sqrt())?.f_add_scalar(c.eps)?;
            let update = m.f_div(&denom)?.f_mul_scalar(-lr / bc1)?;
            let _ = p.tensor.f_add_(&update.f_to_kind(p.tensor.kind())?)?;
        }
        Ok(())
    }

    /// Bytes of optimizer state (the moments and, for 8-bit ones, their block scales).
    pub fn state_bytes(&self) -> usize {
        self.params
            .iter()
            .map(|p| match &p.moments {
                Moments::Torch { m, v } => (m.numel() + v.numel()) * 4,
                Moments::Bnb8(s) => s.bytes(),
                Moments::Bnb32 { m, v } => (m.len() + v.len()) * 4,
            })
            .sum()
    }

    /// Moments as named tensors for checkpoints: `NAME.exp_avg`, `NAME.exp_avg_sq` (32-bit), or bitsandbytes'
    /// `NAME.state1`, `NAME.state2` (u8 codes) and `NAME.absmax1`, `NAME.absmax2` (8-bit).
    pub fn state_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![];
        for p in &self.params {
            let name = |k: &str| format!("{}.{k}", p.name);
            match &p.moments {
                Moments::Torch { m, v } => {
                    out.push((name("exp_avg"), m.shallow_clone()));
                    out.push((name("exp_avg_sq"), v.shallow_clone()));
                }
                Moments::Bnb32 { m, v } => {
                    out.push((name("exp_avg"), Tensor::from_slice(m)));
                    out.push((name("exp_avg_sq"), Tensor::from_slice(v)));
                }
                Moments::Bnb8(s) => {
                    out.push((name("state1"), Tensor::from_slice(&s.state1)));
                    out.push((name("state2"), Tensor::from_slice(&s.state2)));
                    out.push((name("absmax1"), Tensor::from_slice(&s.absmax1)));
                    out.push((name("absmax2"), Tensor::from_slice(&s.absmax2)));
                }
            }
        }
        out
    }

    /// Restores moments saved by [`Self::state_tensors`] and the step count.
    pub fn load_state(&mut self, get: &dyn Fn(&str) -> Result<Tensor>, step: i64) -> Result<()> {
        let _guard = tch::no_grad_guard();
        for p in &mut self.params {
            let name = |k: &str| format!("{}.{k}", p.name);
            let wrong = || CoreError::InvalidArgument(format!("optimizer state for `{}` has the wrong shape", p.name));
            match &mut p.moments {
                Moments::Torch { m, v } => {
                    let (lm, lv) = (get(&name("exp_avg"))?, get(&name("exp_avg_sq"))?);
                    if lm.size() != m.size() || lv.size() != v.size() {
                        return Err(wrong());
                    }
                    m.f_copy_(&lm)?;
                    v.f_copy_(&lv)?;
                }
                Moments::Bnb32 { m, v } => {
                    let (lm, lv) = (host::<f32>(&get(&name("exp_avg"))?)?, host::<f32>(&get(&name("exp_avg_sq"))?)?);
                    if lm.len() != m.len() || lv.len() != v.len() {
                        return Err(wrong());
                    }
                    (*m, *v) = (lm, lv);
                }
                Moments::Bnb8(s) => {
                    let loaded = State8 {
                        state1: host::<u8>(&get(&name("state1"))?)?,
                        state2: host::<u8>(&get(&name("state2"))?)?,
                        absmax1: host::<f32>(&get(&name("absmax1"))?)?,
                        absmax2: host::<f32>(&get(&name("absmax2"))?)?,
                    };
                    let fresh = State8::new(s.state1.len());
                    if loaded.state1.len() != fresh.state1.len()
                        || loaded.state2.len() != fresh.state2.len()
                        || loaded.absmax1.len() != fresh.absmax1.len()
                        || loaded.absmax2.len() != fresh.absmax2.len()
                    {
                        return Err(wrong());
                    }
                    *s = loaded;
                }
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Whether bitsandbytes' 8-bit AdamW keeps 8-bit moments for this tensor: at least `min_8bit_size`
/// elements and not an embedding (transformers registers embeddings for 32-bit states).
fn eight_bit_moments(name: &str, numel: usize) -> bool {
    numel >= MIN_8BIT_SIZE && !name.contains("embed_tokens")
}

/// The optimizer-state bytes AdamW will hold for `params` (name, element count), with 8-bit moments or not.
pub fn planned_state_bytes(params: &[(String, usize)], eight_bit: bool) -> usize {
    params
        .iter()
        .map(|(name, n)| if eight_bit && eight_bit_moments(name, *n) { State8::new(*n).bytes() } else { 8 * n })
        .sum()
}

/// A tensor's elements on the host, flattened, as `T`.
fn host<T: tch::kind::Element + Default + Clone>(t: &Tensor) -> Result<Vec<T>> {
    let flat = t.f_to_device(tch::Device::Cpu)?.f_reshape([-1])?.f_to_kind(T::KIND)?.f_contiguous()?;
    let n = flat.numel();
    let mut out = vec![T::default(); n];
    flat.f_copy_data(&mut out, n)?;
    Ok(out)
}

/// bitsandbytes' update of one parameter whose moments live on the host: the parameter and its gradient
/// come to the host in f32, are updated there, and the result is written back in the parameter's kind.
fn host_step(param: &mut Tensor, g: &Tensor, moments: &mut Moments, s: Step) -> Result<()> {
    let grad = host::<f32>(g)?;
    let mut p = host::<f32>(param)?;
    match moments {
        Moments::Bnb8(st) => step8(&mut p, &grad, st, s),
        Moments::Bnb32 { m, v } => step32(&mut p, &grad, m, v, s),
        Moments::Torch { .. } => unreachable!("torch moments are updated on the device"),
    }
    let updated = Tensor::f_from_slice(&p)?.f_view(param.size().as_slice())?;
    param.f_copy_(&updated.f_to_kind(param.kind())?.f_to_device(param.device())?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_steps_match_torch_adamw() {
        // Reference: torch 2.11 `torch.optim.AdamW([{params: [p]}, {params: [b], weight_decay: 0}], lr=0.1,
        // betas=(0.9, 0.99), eps=1e-6, weight_decay=0.05)` with these gradients (1-D b is not decayed).
        let p = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.1, 0.0, -0.3]).view([2, 3]).set_requires_grad(true);
        let b = Tensor::from_slice(&[0.2f32, -0.2]).set_requires_grad(true);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-6, weight_decay: 0.05, eight_bit: false };
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone()), ("b".into(), b.shallow_clone())], cfg).unwrap();
        let grads: [([f32; 6], [f32; 2]); 3] = [
            ([1.0, -2.0, 0.5, 0.0, 3.0, -1.0], [0.5, -0.5]),
            ([0.2, 0.2, -0.4, 1.0, -1.0, 0.0], [0.1, 0.3]),
            ([-3.0, 1.0, 0.0, 0.5, 0.5, 0.5], [-1.0, 2.0]),
        ];
        for (gp, gb) in grads {
            opt.zero_grad().unwrap();
            // d(Σ p·gp + Σ b·gb) = (gp, gb)
            let loss = (&p * Tensor::from_slice(&gp).view([2, 3])).sum(Kind::Float)
                + (&b * Tensor::from_slice(&gb)).sum(Kind::Float);
            loss.backward();
            opt.step(0.1).unwrap();
        }
        let want_p = [
            0.35384681820869446,
            -0.8144086599349976,
            1.8608556985855103,
            -0.055319786071777344,
            -0.1795964390039444,
            -0.11192302405834198,
        ];
        let want_b = [0.048196058720350266, -0.13779973983764648];
        let got_p: Vec<f32> = Vec::try_from(p.detach().view([-1])).unwrap();
        let got_b: Vec<f32> = Vec::try_from(b.detach()).unwrap();
        for (g, w) in got_p.iter().zip(want_p).chain(got_b.iter().zip(want_b)) {
            assert!((*g as f64 - w).abs() < 1e-6, "{g} vs {w}");
        }
        assert_eq!(opt.step, 3);
    }

    #[test]
    fn loraplus_matches_torch_adamw_with_peft_groups() {
        // Reference: torch 2.11 `AdamW([{params: [A], lr: 0.1}, {params: [B], lr: 0.1 × 16}], betas=(0.9, 0.99),
        // eps=1e-6, weight_decay=0.05)` — PEFT's create_loraplus_optimizer groups with loraplus_lr_ratio 16.
        let a = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 0.1, 0.0, -0.3]).view([2, 3]).set_requires_grad(true);
        let b = Tensor::from_slice(&[0.2f32, -0.2, 0.4, 1.0, 0.0, -0.5]).view([3, 2]).set_requires_grad(true);
        let cfg = AdamWConfig { beta1: 0.9, beta2: 0.99, eps: 1e-6, weight_decay: 0.05, eight_bit: false };
        let named = vec![
            ("m.q_proj.lora_A.weight".into(), a.shallow_clone()),
            ("m.q_proj.lora_B.weight".into(), b.shallow_clone()),
        ];
        let mut opt = AdamW::new(named, cfg).unwrap();
        opt.set_loraplus_ratio(16.0);
        let grads: [([f32; 6], [f32; 6]); 2] = [
            ([1.0, -2.0, 0.5, 0.0, 3.0, -1.0], [0.5, -0.5, 0.1, 0.3, -1.0, 2.0]),
            ([0.2, 0.2, -0.4, 1.0, -1.0, 0.0], [-3.0, 1.0, 0.0, 0.5, 0.5, 0.5]),
        ];
        for (ga, gb) in grads {
            opt.zero_grad().unwrap();
            let loss = (&a * Tensor::from_slice(&ga).view([2, 3])).sum(Kind::Float)
                + (&b * Tensor::from_slice(&gb).view([3, 2])).sum(Kind::Float);
            loss.backward();
            opt.step(0.1).unwrap();
        }
        let want_a = [
            0.31504032015800476,
            -0.8311282992362976,
            1.874734878540039,
            0.02475663274526596,
            -0.13959448039531708,
            -0.13034966588020325,
        ];
        let want_b = [
            -0.3065762519836426,
            0.7177454829216003,
            -2.2079386711120605,
            -2.1963870525360107,
            1.8987171649932861,
            -3.2268166542053223,
        ];
        let got_a: Vec<f32> = Vec::try_from(a.detach().view([-1])).unwrap();
        let got_b: Vec<f32> = Vec::try_from(b.detach().view([-1])).unwrap();
        for (g, w) in got_a.iter().zip(want_a).chain(got_b.iter().zip(want_b)) {
            assert!((*g as f64 - w).abs() < 2e-6, "{g} vs {w}");
        }
    }

    #[test]
    fn clipping_scales_to_max_norm() {
        let p = Tensor::from_slice(&[1.0f32, 1.0]).set_requires_grad(true);
        let mut opt = AdamW::new(vec![("p".into(), p.shallow_clone())], AdamWConfig::default()).unwrap();
        (&p * Tensor::from_slice(&[3.0f32, 4.0])).sum(Kind::Float).backward();
        let norm = opt.clip_grad_norm(1.0).unwrap();
        assert!((norm - 5.0).abs() < 1e-9);
        let g: Vec<f32> = Vec::try_from(p.grad()).unwrap();
        assert!((g[0] - 0.6).abs() < 1e-5 && (g[1] - 0.8).abs() < 1e-5, "{g:?}");
    }
}
