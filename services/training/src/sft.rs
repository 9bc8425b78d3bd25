//! The SFT job: formats the data (unless the recipe names a formatted dataset), loads the base (NF4 for
//! QLoRA), adds the adapter (LoRA, QLoRA, prompt tuning) or trains every weight, runs the training loop, and
//! reports every step as a job event. The adapter lands in the output dir in PEFT format with checkpoints,
//! metrics, a loss plot, the chat template and the resolved recipe beside it.

use anyhow::{Context, Result};
use ferrotune_core::data::load_split;
use ferrotune_core::prompt_tuning::{PromptInit, PromptState, PromptTuningConfig};
use ferrotune_core::train::full::FullState;
use ferrotune_core::train::sft::{LoraState, SftObjective};
use ferrotune_core::train::Run;
use ferrotune_runtime::jobs::{JobContext, JobOutcome, JobRunner};

use crate::recipe::{Method, Recipe};
use crate::scaffold::{
    dataset_dir, finish, job_recipe, load_base, model_dir, splits, train_job, write_provenance, Base,
};

/// Runs `sft` jobs; the spec is `{"recipe": <resolved recipe>, "resume": bool}`.
pub struct SftRunner;

impl JobRunner for SftRunner {
    fn run(&self, ctx: &JobContext) -> Result<JobOutcome> {
        let (r, resume) = job_recipe(ctx)?;
        run_sft(&r, resume, ctx)
    }
}

fn run_sft(r: &Recipe, resume: bool, ctx: &JobContext) -> Result<JobOutcome> {
    let out = r.output_dir.clone();
    ferrotune_core::fsx::create_dir_all(&out).with_context(|| format!("{}", out.display()))?;
    let model_dir = model_dir(r)?;
    let dataset = dataset_dir(r, &model_dir, ctx)?;
    let (train_set, eval_set) = splits(&dataset, load_split)?;
    let Base { mut model, qlora, tokenizer: tok, pad_id } = load_base(r, &model_dir, ctx)?;
    let method = r.adapter.method()?;
    let state: Box<dyn ferrotune_core::train::TrainableState> = match method {
        Method::Full => {
            FullState::prepare(&mut model)?;
            Box::new(FullState { base_dir: model_dir.clone() })
        }
        Method::PromptTuning => {
            let init = match &r.adapter.prompt_tuning_init_text {
                Some(t) => PromptInit::Text(t.clone()),
                None => PromptInit::Random,
            };
            let cfg = PromptTuningConfig { num_virtual_tokens: r.adapter.num_virtual_tokens, init: init.clone() };
            model.add_prompt_tuning(&cfg, Some(&tok), r.training.seed)?;
            Box::new(PromptState { init, base_model: model_dir.display().to_string() })
        }
        Method::PrefixTuning => {
            let cfg = ferrotune_core::prefix_tuning::PrefixTuningConfig {
                num_virtual_tokens: r.adapter.num_virtual_tokens,
                prefix_projection: r.adapter.prefix_projection,
                encoder_hidden_size: r.adapter.encoder_hidden_size,
            };
            model.add_prefix_tuning(&cfg, r.training.seed)?;
            Box::new(ferrotune_core::prefix_tuning::PrefixState { cfg, base_model: model_dir.display().to_string() })
        }
        Method::Lora | Method::Qlora => {
            let lcfg = r.adapter.lora()?;
            model.add_lora(&lcfg, r.training.seed)?;
            Box::new(LoraState { cfg: lcfg, base_model: model_dir.display().to_string() })
        }
    };
    write_provenance(r, &model_dir, &dataset, qlora, (train_set.len(), eval_set.len()))?;
    let sizes: Vec<(String, usize)> = state.params(&mut model).into_iter().map(|(n, t)| (n, t.numel())).collect();
    let planned = |eight| ferrotune_core::train::optim::planned_state_bytes(&sizes, eight) as f64 / 1e6;
    let name = serde_json::to_value(r.training.optim)?;
    ctx.log(format!(
        "optimizer state: {:.1} MB ({}; 32-bit AdamW moments: {:.1} MB)",
        planned(r.training.optim.eight_bit()),
        name.as_str().unwrap_or("adamw"),
        planned(false)
    ));
    let objective = SftObjective::new(pad_id, &r.training);
    let tokens_of = |e: &ferrotune_core::train::sft::SftExample| e.input_ids.len();
    let run = Run {
        objective: &objective,
        train: &train_set,
        eval: &eval_set,
        state: state.as_ref(),
        cfg: &r.training,
        output_dir: &out,
        tokens_of: &tokens_of,
    };
    if train_job(&mut model, &run, resume, ctx, &mut |_| {})?.is_none() {
        return Ok(JobOutcome::Stopped);
    }
    let kind = if method == Method::Full { "model" } else { "adapter" };
    Ok(JobOutcome::Finished(finish(&out, &dataset, kind, &format!("SFT ({})", r.adapter.method), ctx)))
}
