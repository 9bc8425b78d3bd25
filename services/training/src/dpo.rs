//! The DPO job: formats the preference data (unless given a formatted dataset), loads the base (NF4 for
//! QLoRA), adds LoRA, computes the reference log-probs once with the adapter disabled (cached in the dataset
//! dir, `reference_logps.json`, keyed by base model and quantization), and runs the training loop with the
//! DPO objective. Metrics per step add TRL's rewards/chosen, rejected, accuracies, margins and logps/*.

use std::path::Path;

use anyhow::{Context, Result};
use ferrotune_core::data::load_pairs;
use ferrotune_core::train::dpo::{sequence_logps, DpoExample, DpoObjective};
use ferrotune_core::train::sft::{LoraState, SftExample};
use ferrotune_core::train::Run;
use ferrotune_core::CausalLm;
use ferrotune_runtime::jobs::{JobContext, JobOutcome, JobRunner};
use serde_json::json;

use crate::recipe::{Method, Objective, Recipe};
use crate::scaffold::{
    dataset_dir, finish, job_recipe, load_base, model_dir, splits, train_job, write_provenance, Base,
};

/// Runs `dpo` jobs; the spec is `{"recipe": <resolved recipe with a dpo section>, "resume": bool}`.
pub struct DpoRunner;

impl JobRunner for DpoRunner {
    fn run(&self, ctx: &JobContext) -> Result<JobOutcome> {
        let (r, resume) = job_recipe(ctx)?;
        run_dpo(&r, resume, ctx)
    }
}

/// Reference log-probs of every pair, computed with the adapters disabled, `batch` pairs at a time.
fn reference(
    model: &mut CausalLm,
    pairs: &[(SftExample, SftExample)],
    pad_id: u32,
    batch: usize,
    chunk: i64,
) -> Result<Vec<(f64, f64)>> {
    let base = model.adapters_disabled();
    let mut out = Vec::with_capacity(pairs.len());
    for group in pairs.chunks(batch.max(1)) {
        let seqs: Vec<&SftExample> = group.iter().flat_map(|(c, r)| [c, r]).collect();
        let lps = sequence_logps(&base, &seqs, pad_id, chunk)?;
        out.extend(lps.chunks(2).map(|p| (p[0].0, p[1].0)));
    }
    Ok(out)
}

/// The cached reference log-probs of a dataset split in `file`, when they were made for `key` (base,
/// quantization, dtype…).
fn cached<T: serde::de::DeserializeOwned>(
    dataset: &Path,
    file: &str,
    key: &serde_json::Value,
    split: &str,
    n: usize,
) -> Option<Vec<T>> {
    let v: serde_json::Value =
        serde_json::from_str(&ferrotune_core::fsx::read_to_string(dataset.join(file)).ok()?).ok()?;
    if &v["key"] != key {
        return None;
    }
    let rows: Vec<T> = serde_json::from_value(v[split].clone()).ok()?;
    (rows.len() == n).then_some(rows)
}

/// The reference log-probs of both splits: cached with the dataset (`file`, for `key`), or computed by
/// `compute` (with the adapter disabled) and cached.
pub(crate) fn reference_cached<T: serde::Serialize + serde::de::DeserializeOwned>(
    dataset: &Path,
    file: &str,
    key: &serde_json::Value,
    n: (usize, usize),
    ctx: &JobContext,
    compute: impl FnOnce() -> Result<(Vec<T>, Vec<T>)>,
) -> Result<(Vec<T>, Vec<T>)> {
    if let (Some(t), Some(e)) = (cached(dataset, file, key, "train", n.0), cached(dataset, file, key, "eval", n.1)) {
        ctx.log("reference log-probs: cached with the dataset");
        return Ok((t, e));
    }
    let started = std::time::Instant::now();
    let (t, e) = compute()?;
    let body = json!({"key": key, "train": t, "eval": e});
    ferrotune_core::weights::write_atomically(&dataset.join(file), serde_json::to_string(&body)?.as_bytes())?;
    ctx.log(format!(
        "reference log-probs: {} sequences in {:.1}s (adapter disabled), cached in the dataset",
        t.len() + e.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok((t, e))
}

fn run_dpo(r: &Recipe, resume: bool, ctx: &JobContext) -> Result<JobOutcome> {
    let Objective::Dpo(cfg) = r.objective() else { anyhow::bail!("recipe: the dpo section is missing") };
    let method = r.adapter.method()?;
    if !matches!(method, Method::Lora | Method::Qlora) {
        anyhow::bail!("adapter.method `{}`: DPO trains lora or qlora adapters (the reference is the base with the adapter disabled)", r.adapter.method);
    }
    let out = r.output_dir.clone();
    ferrotune_core::fsx::create_dir_all(&out).with_context(|| format!("{}", out.display()))?;
    let model_dir = model_dir(r)?;
    let dataset = dataset_dir(r, &model_dir, ctx)?;
    let (train_pairs, eval_pairs) = splits(&dataset, load_pairs)?;
    let Base { mut model, qlora, pad_id, .. } = load_base(r, &model_dir, ctx)?;
    let lcfg = r.adapter.lora()?;
    model.add_lora(&lcfg, r.training.seed)?;
    let chunk = r.training.loss_chunk_tokens as i64;
    let key = json!({"base_model": model_dir, "quantization": if qlora { "nf4" } else { "none" }, "dtype": r.dtype});
    let mb = r.training.micro_batch_size;
    let (ref_train, ref_eval) =
        reference_cached(&dataset, "reference_logps.json", &key, (train_pairs.len(), eval_pairs.len()), ctx, || {
            Ok((
                reference(&mut model, &train_pairs, pad_id, mb, chunk)?,
                reference(&mut model, &eval_pairs, pad_id, mb, chunk)?,
            ))
        })?;
    let pairs = |p: Vec<(SftExample, SftExample)>, refs: Vec<(f64, f64)>| -> Vec<DpoExample> {
        p.into_iter()
            .zip(refs)
            .map(|((chosen, rejected), (rc, rr))| DpoExample { chosen, rejected, ref_chosen: rc, ref_rejected: rr })
            .collect()
    };
    let (train_set, eval_set) = (pairs(train_pairs, ref_train), pairs(eval_pairs, ref_eval));
    write_provenance(r, &model_dir, &dataset, qlora, (train_set.len(), eval_set.len()))?;
    let objective = DpoObjective::new(pad_id, chunk, cfg);
    let state = LoraState { cfg: lcfg, base_model: model_dir.display().to_string() };
    let tokens_of = |e: &DpoExample| e.chosen.input_ids.len() + e.rejected.input_ids.len();
    let run = Run {
        objective: &objective,
        train: &train_set,
        eval: &eval_set,
        state: &state,
        cfg: &r.training,
        output_dir: &out,
        tokens_of: &tokens_of,
    };
    if train_job(&mut model, &run, resume, ctx, &mut |_| {})?.is_none() {
        return Ok(JobOutcome::Stopped);
    }
    Ok(JobOutcome::Finished(finish(
        &out,
        &dataset,
        "adapter",
        &format!("DPO ({:?}, β = {})", cfg.loss_type, cfg.beta),
        ctx,
    )))
}
