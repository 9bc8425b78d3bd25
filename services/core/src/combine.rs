//! Combining LoRA adapters of one base into one adapter, with PEFT's `add_weighted_adapter` semantics:
//!
//! - `cat`: ranks concatenated, `A = [w₁s₁A₁; w₂s₂A₂; …]`, `B = [B₁ B₂ …]`, so the delta is exactly
//!   `Σ wᵢ sᵢ Bᵢ Aᵢ` (sᵢ = each adapter's scaling);
//! - `linear` (same rank): `A = Σ sign(wᵢsᵢ)·√|wᵢsᵢ|·Aᵢ`, `B = Σ √|wᵢsᵢ|·Bᵢ`;
//! - `ties` (same rank): A and B separately, each adapter's matrix trimmed to its `density` largest
//!   magnitudes, a sign elected per entry from the sum of the trimmed matrices, then the mean of the
//!   weighted entries that agree with it (weights as for `linear`).
//!
//! The result has `lora_alpha = r` (scaling 1), `target_modules` the union, like PEFT's.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use crate::error::{CoreError, Result};
use crate::lora::{pattern_value, scaling, PeftConfig};
use crate::weights::{save_safetensors, write_atomically, WeightFiles};

/// How adapters are combined.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Combination {
    /// Weighted sum of A and B (same rank).
    Linear,
    /// Ranks concatenated (exact sum of deltas).
    Cat,
    /// TIES merging with this density in (0, 1].
    Ties(f64),
}

impl std::str::FromStr for Combination {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "linear" => Ok(Self::Linear),
            "cat" => Ok(Self::Cat),
            "ties" => Ok(Self::Ties(1.0)),
            _ => Err(format!("unknown combination `{s}` (linear, cat, ties)")),
        }
    }
}

struct Adapter {
    dir: PathBuf,
    cfg: PeftConfig,
    raw_cfg: serde_json::Value,
    files: WeightFiles,
    /// module path → (A key, B key)
    modules: BTreeMap<String, (String, String)>,
}

const PREFIX: &str = "base_model.model.";

fn open(dir: &Path) -> Result<Adapter> {
    let cfg_path = dir.join("adapter_config.json");
    let text = crate::fsx::read_to_string(&cfg_path).map_err(|e| CoreError::io(&cfg_path, e))?;
    let cfg: PeftConfig = serde_json::from_str(&text).map_err(|e| CoreError::config(&cfg_path, e.to_string()))?;
    let raw_cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| CoreError::config(&cfg_path, e.to_string()))?;
    if cfg.peft_type != "LORA" {
        return Err(CoreError::config(
            &cfg_path,
            format!("peft_type `{}`: only LoRA adapters can be combined", cfg.peft_type),
        ));
    }
    let files = WeightFiles::open_files(&[dir.join("adapter_model.safetensors")])?;
    let mut modules = BTreeMap::new();
    for name in files.names() {
        if let Some(path) = name.strip_prefix(PREFIX).and_then(|n| n.strip_suffix(".lora_A.weight")) {
            let b = format!("{PREFIX}{path}.lora_B.weight");
            if !files.contains(&b) {
                return Err(CoreError::Weight {
                    file: dir.join("adapter_model.safetensors"),
                    name: b,
                    msg: "missing (lora_A present)".into(),
                });
            }
            modules.insert(path.to_owned(), (name.to_owned(), b));
        }
    }
    if modules.is_empty() {
        return Err(CoreError::format(dir.join("adapter_model.safetensors"), "no LoRA weights"));
    }
    Ok(Adapter { dir: dir.to_path_buf(), cfg, raw_cfg, files, modules })
}

impl Adapter {
    fn rank(&self, path: &str) -> i64 {
        pattern_value(&self.cfg.rank_pattern, path).unwrap_or(self.cfg.r)
    }
    fn scaling(&self, path: &str) -> f64 {
        let alpha = pattern_value(&self.cfg.alpha_pattern, path).unwrap_or(self.cfg.lora_alpha);
        scaling(alpha, self.rank(path), self.cfg.use_rslora)
    }
    fn ab(&self, path: &str) -> Result<(Tensor, Tensor)> {
        let (ka, kb) = &self.modules[path];
        Ok((self.files.load_raw(ka)?.f_to_kind(Kind::Float)?, self.files.load_raw(kb)?.f_to_kind(Kind::Float)?))
    }
}

/// Keeps the `density` fraction of entries with the largest magnitude (PEFT's magnitude pruning).
fn prune(t: &Tensor, density: f64) -> Result<Tensor> {
    if density >= 1.0 {
        return Ok(t.shallow_clone());
    }
    let flat = t.f_reshape([-1])?;
    let k = (density * flat.size()[0] as f64) as i64;
    let mask = Tensor::f_zeros_like(&flat)?;
    let (_, idx) = flat.f_abs()?.f_topk(k, 0, true, true)?;
    let mask = mask.f_index_fill(0, &idx, 1.0)?;
    Ok(flat.f_mul(&mask)?.f_reshape(t.size())?)
}

fn ties(ts: &[Tensor], weights: &[f64], density: f64) -> Result<Tensor> {
    let pruned = ts.iter().map(|t| prune(t, density)).collect::<Result<Vec<_>>>()?;
    let stacked = Tensor::f_stack(&pruned, 0)?;
    let elected = stacked
        .f_sum_dim_intlist(0, false, Kind::Float)?
        .f_ge(0.0)?
        .f_to_kind(Kind::Float)?
        .f_mul_scalar(2.0)?
        .f_sub_scalar(1.0)?;
    let mask = stacked.f_sign()?.f_eq_tensor(&elected.f_unsqueeze(0)?)?.f_to_kind(Kind::Float)?;
    let w = Tensor::f_from_slice(weights)?.f_to_kind(Kind::Float)?.f_view([weights.len() as i64, 1, 1])?;
    let mixed = stacked.f_mul(&w)?.f_mul(&mask)?.f_sum_dim_intlist(0, false, Kind::Float)?;
    let count = mask.f_sum_dim_intlist(0, false, Kind::Float)?.f_clamp_min(1.0)?;
    Ok(mixed.f_div(&count)?)
}

/// Combines `adapters` (directory, weight) into a new adapter written to `out`; returns its rank.
pub fn combine(adapters: &[(PathBuf, f64)], how: Combination, out: &Path) -> Result<i64> {
    if adapters.is_empty() {
        return Err(CoreError::InvalidArgument("adapters: at least one is required".into()));
    }
    if let Combination::Ties(d) = how {
        if !(d > 0.0 && d <= 1.0) {
            return Err(CoreError::InvalidArgument(format!("density {d} is not in (0, 1]")));
        }
    }
    for (p, w) in adapters {
        if !w.is_finite() {
            return Err(CoreError::InvalidArgument(format!("{}: weight {w} is not finite", p.display())));
        }
    }
    let ads = adapters.iter().map(|(p, _)| open(p)).collect::<Result<Vec<_>>>()?;
    let weights: Vec<f64> = adapters.iter().map(|(_, w)| *w).collect();
    // PEFT: with a single adapter only linear applies.
    let how = if ads.len() == 1 { Combination::Linear } else { how };
    let paths: BTreeSet<String> = ads.iter().flat_map(|a| a.modules.keys().cloned()).collect();
    let new_rank = match how {
        Combination::Cat => ads.iter().map(|a| a.modules.keys().map(|p| a.rank(p)).max().unwrap_or(a.cfg.r)).sum(),
        _ => {
            let ranks: BTreeSet<i64> = ads.iter().flat_map(|a| a.modules.keys().map(|p| a.rank(p))).collect();
            if ranks.len() != 1 {
                return Err(CoreError::InvalidArgument(format!(
                    "linear and ties need adapters of one rank; found ranks {ranks:?} (use cat)"
                )));
            }
            *ranks.iter().next().expect("one rank")
        }
    };
    let mut tensors = Vec::new();
    for path in &paths {
        let present: Vec<(usize, &Adapter)> =
            ads.iter().enumerate().filter(|(_, a)| a.modules.contains_key(path)).collect();
        let (a_new, b_new) = match how {
            Combination::Cat => {
                let (mut a_parts, mut b_parts) = (vec![], vec![]);
                for (i, ad) in &present {
                    let (a, b) = ad.ab(path)?;
                    a_parts.push(a.f_mul_scalar(weights[*i] * ad.scaling(path))?);
                    b_parts.push(b);
                }
                let (a, b) = (Tensor::f_cat(&a_parts, 0)?, Tensor::f_cat(&b_parts, 1)?);
                // Modules some adapters lack keep zero rows / columns up to the full rank, as in PEFT.
                let pad = new_rank - a.size()[0];
                if pad > 0 {
                    (a.f_constant_pad_nd([0, 0, 0, pad])?, b.f_constant_pad_nd([0, pad])?)
                } else {
                    (a, b)
                }
            }
            Combination::Linear | Combination::Ties(_) => {
                let (mut wa, mut wb, mut as_, mut bs) = (vec![], vec![], vec![], vec![]);
                for (i, ad) in &present {
                    let ws = weights[*i] * ad.scaling(path);
                    wa.push(ws.abs().sqrt() * ws.signum());
                    wb.push(ws.abs().sqrt());
                    let (a, b) = ad.ab(path)?;
                    as_.push(a);
                    bs.push(b);
                }
                match how {
                    Combination::Ties(d) => (ties(&as_, &wa, d)?, ties(&bs, &wb, d)?),
                    _ => {
                        let sum = |ts: &[Tensor], w: &[f64]| -> Result<Tensor> {
                            let mut acc = ts[0].f_mul_scalar(w[0])?;
                            for (t, w) in ts.iter().zip(w).skip(1) {
                                acc = acc.f_add(&t.f_mul_scalar(*w)?)?;
                            }
                            Ok(acc)
                        };
                        (sum(&as_, &wa)?, sum(&bs, &wb)?)
                    }
                }
            }
        };
        tensors.push((format!("{PREFIX}{path}.lora_A.weight"), a_new.f_contiguous()?));
        tensors.push((format!("{PREFIX}{path}.lora_B.weight"), b_new.f_contiguous()?));
    }
    crate::fsx::create_dir_all(out).map_err(|e| CoreError::io(out, e))?;
    save_safetensors(&out.join("adapter_model.safetensors"), &tensors)?;
    let mut cfg = ads[0].raw_cfg.clone();
    let suffixes: BTreeSet<&str> = paths.iter().filter_map(|p| p.rsplit('.').next()).collect();
    cfg["r"] = serde_json::json!(new_rank);
    cfg["lora_alpha"] = serde_json::json!(new_rank);
    cfg["use_rslora"] = serde_json::json!(false);
    cfg["rank_pattern"] = serde_json::json!({});
    cfg["alpha_pattern"] = serde_json::json!({});
    cfg["target_modules"] = serde_json::json!(suffixes);
    let json = serde_json::to_string_pretty(&cfg).expect("json");
    write_atomically(&out.join("adapter_config.json"), json.as_bytes())?;
    // Adapters all trained on an NF4 base combine into one that is too.
    if ads.iter().all(|a| crate::lora::trained_on_nf4(&a.dir).unwrap_or(false)) {
        let info = serde_json::json!({"base_quantization": "nf4", "combined_from": ads.iter().map(|a| a.dir.display().to_string()).collect::<Vec<_>>()});
        write_atomically(
            &out.join("ferrotune_train.json"),
            serde_json::to_string_pretty(&info).expect("json").as_bytes(),
        )?;
    }
    Ok(new_rank)
}
