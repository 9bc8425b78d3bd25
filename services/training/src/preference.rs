//! The ORPO, SimPO and KTO jobs: like DPO's (see [`crate::dpo`]), on the policy's job thread with LoRA or QLoRA.
//! ORPO and SimPO need no reference model and train on preference pairs; KTO trains on unpaired examples
//! (`--format unpaired`: prompt, completion, boolean label — or preference pairs, unpaired as TRL does), with
//! reference log-probs of each example and of its mismatched KL sample computed once with the adapter
//! disabled and cached in the dataset dir (`kto_reference_logps.json`).

use anyhow::{Context, Result};
use ferrotune_core::data::{load_judged, load_pairs};
use ferrotune_core::train::dpo::sequence_logps;
use ferrotune_core::train::kto::{mismatched, KtoExample, KtoObjective};
use ferrotune_core::train::ref_free::{RefFree, RefFreeObjective};
use ferrotune_core::train::sft::{LoraState, SftExample};
use ferrotune_core::train::{Algorithm, Run};
use ferrotune_core::CausalLm;
use ferrotune_runtime::jobs::{JobContext, JobOutcome, JobRunner};
use serde_json::json;

use crate::dpo::reference_cached;
use crate::recipe::{Method, Objective, Recipe};
use crate::scaffold::{
    dataset_dir, finish, job_recipe, load_base, model_dir, splits, train_job, write_provenance, Base,
};

/// Runs `orpo`, `simpo` and `kto` jobs; the spec is `{"recipe": <resolved recipe with its section>, "resume": bool}`.
pub struct PreferenceRunner;

impl JobRunner for PreferenceRunner {
    fn run(&self, ctx: &JobContext) -> Result<JobOutcome> {
        let (r, resume) = job_recipe(ctx)?;
        match r.objective() {
            Objective::Orpo(c) => ref_free(&r, RefFree::Orpo(c), resume, ctx),
            Objective::Simpo(c) => ref_free(&r, RefFree::Simpo(c), resume, ctx),
            Objective::Kto(_) => kto(&r, resume, ctx),
            other => anyhow::bail!("recipe: a {} recipe is not an ORPO, SimPO or KTO one", other.name()),
        }
    }
}

/// What every preference job prepares: the output dir, the dataset, the base with fresh LoRA adapters.
struct Prepared {
    resume: bool,
    model_dir: std::path::PathBuf,
    dataset: std::path::PathBuf,
    base: Base,
    state: LoraState,
}

fn prepare(r: &Recipe, resume: bool, ctx: &JobContext) -> Result<Prepared> {
    if !matches!(r.adapter.method()?, Method::Lora | Method::Qlora) {
        anyhow::bail!("adapter.method `{}`: {} trains lora or qlora adapters", r.adapter.method, r.objective().name());
    }
    ferrotune_core::fsx::create_dir_all(&r.output_dir).with_context(|| format!("{}", r.output_dir.display()))?;
    let model_dir = model_dir(r)?;
    let dataset = dataset_dir(r, &model_dir, ctx)?;
    let mut base = load_base(r, &model_dir, ctx)?;
    let cfg = r.adapter.lora()?;
    base.model.add_lora(&cfg, r.training.seed)?;
    let state = LoraState { cfg, base_model: model_dir.display().to_string() };
    Ok(Prepared { resume, model_dir, dataset, base, state })
}

/// Trains `objective` over the examples and reports the adapter.
fn run<A: Algorithm>(
    r: &Recipe,
    p: &mut Prepared,
    objective: &A,
    (train, eval): (&[A::Example], &[A::Example]),
    tokens_of: &dyn Fn(&A::Example) -> usize,
    ctx: &JobContext,
    title: &str,
) -> Result<JobOutcome> {
    write_provenance(r, &p.model_dir, &p.dataset, p.base.qlora, (train.len(), eval.len()))?;
    let run = Run { objective, train, eval, state: &p.state, cfg: &r.training, output_dir: &r.output_dir, tokens_of };
    if train_job(&mut p.base.model, &run, p.resume, ctx, &mut |_| {})?.is_none() {
        return Ok(JobOutcome::Stopped);
    }
    Ok(JobOutcome::Finished(finish(&r.output_dir, &p.dataset, "adapter", title, ctx)))
}

fn ref_free(r: &Recipe, method: RefFree, resume: bool, ctx: &JobContext) -> Result<JobOutcome> {
    let mut p = prepare(r, resume, ctx)?;
    let (train, eval) = splits(&p.dataset, load_pairs)?;
    let objective = RefFreeObjective::new(p.base.pad_id, r.training.loss_chunk_tokens as i64, method);
    let title = match method {
        RefFree::Orpo(c) => format!("ORPO (β = {})", c.beta),
        RefFree::Simpo(c) => format!("SimPO (β = {}, γ = {})", c.beta, c.simpo_gamma),
    };
    let tokens_of = |e: &(SftExample, SftExample)| e.0.input_ids.len() + e.1.input_ids.len();
    run(r, &mut p, &objective, (&train, &eval), &tokens_of, ctx, &title)
}

/// Reference log-probs of each example and of its mismatched sample, `batch` sequences at a time.
fn kto_reference(
    model: &mut CausalLm,
    seqs: &[SftExample],
    kl: &[SftExample],
    pad_id: u32,
    batch: usize,
    chunk: i64,
) -> Result<Vec<(f64, f64)>> {
    let base = model.adapters_disabled();
    let all: Vec<&SftExample> = seqs.iter().chain(kl).collect();
    let mut lps = Vec::with_capacity(all.len());
    for group in all.chunks(batch.max(1)) {
        lps.extend(sequence_logps(&base, group, pad_id, chunk)?.into_iter().map(|x| x.0));
    }
    Ok((0..seqs.len()).map(|i| (lps[i], lps[seqs.len() + i])).collect())
}

fn kto(r: &Recipe, resume: bool, ctx: &JobContext) -> Result<JobOutcome> {
    let Objective::Kto(cfg) = r.objective() else { anyhow::bail!("recipe: the kto section is missing") };
    let mut p = prepare(r, resume, ctx)?;
    let (train, eval) = splits(&p.dataset, load_judged)?;
    for (name, set) in [("train", &train), ("eval", &eval)] {
        let desirable = set.iter().filter(|e| e.1).count();
        ctx.log(format!("kto {name}: {desirable} desirable, {} undesirable examples", set.len() - desirable));
    }
    // TRL's KL samples: the rotation within consecutive chunks of micro_batch_size examples, in dataset order.
    let mb = r.training.micro_batch_size;
    let seqs = |s: &[(SftExample, bool)]| s.iter().map(|e| e.0.clone()).collect::<Vec<_>>();
    let (train_seqs, eval_seqs) = (seqs(&train), seqs(&eval));
    let (train_kl, eval_kl) = (mismatched(&train_seqs, mb), mismatched(&eval_seqs, mb));
    let chunk = r.training.loss_chunk_tokens as i64;
    let pad_id = p.base.pad_id;
    let key = json!({"base_model": p.model_dir, "quantization": if p.base.qlora { "nf4" } else { "none" },
                     "dtype": r.dtype, "kl_chunk": mb});
    let model = &mut p.base.model;
    let (ref_train, ref_eval) =
        reference_cached(&p.dataset, "kto_reference_logps.json", &key, (train.len(), eval.len()), ctx, || {
            Ok((
                kto_reference(model, &train_seqs, &train_kl, pad_id, mb, chunk)?,
                kto_reference(model, &eval_seqs, &eval_kl, pad_id, mb, chunk)?,
            ))
        })?;
    let examples = |set: Vec<(SftExample, bool)>, kl: Vec<SftExample>, refs: Vec<(f64, f64)>| -> Vec<KtoExample> {
        set.into_iter()
            .zip(kl)
            .zip(refs)
            .map(|(((seq, desirable), kl), (ref_logp, ref_kl_logp))| KtoExample {
                seq,
                kl,
                desirable,
                ref_logp,
                ref_kl_logp,
            })
            .collect()
    };
    let (train_set, eval_set) = (examples(train, train_kl, ref_train), examples(eval, eval_kl, ref_eval));
    let objective = KtoObjective::new(pad_id, chunk, cfg);
    let tokens_of = |e: &KtoExample| e.seq.input_ids.len() + e.kl.input_ids.len();
    let title = format!("KTO ({:?}, β = {})", cfg.loss_type, cfg.beta);
    run(r, &mut p, &objective, (&train_set, &eval_set), &tokens_of, ctx, &title)
}
