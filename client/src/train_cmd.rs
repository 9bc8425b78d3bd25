//! `ferrotune train sft --recipe R.yaml`: formats the data (unless given a formatted dataset), loads the
//! base (NF4 for QLoRA), adds LoRA adapters, and runs the training loop with a progress bar (or JSON lines
//! with `--json`). The adapter lands in the output dir in PEFT format with checkpoints, metrics, the chat
//! template and the resolved recipe beside it. `--resume` continues from the newest checkpoint.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferrotune_core::prompt_tuning::{PromptInit, PromptState, PromptTuningConfig};
use ferrotune_core::train::full::FullState;
use ferrotune_core::train::sft::{LoraState, SftObjective};
use ferrotune_core::train::{train, Run};
use ferrotune_core::{registry, ChatTemplate};
use ferrotune_data::{build, load_split, BuildOptions};
use serde_json::json;

use crate::recipe;

/// Arguments of `train sft`.
#[derive(clap::Args)]
pub(crate) struct SftArgs {
    /// The recipe (YAML).
    #[arg(long)]
    recipe: PathBuf,
    /// Overrides output_dir.
    #[arg(long)]
    output_dir: Option<PathBuf>,
    /// Overrides training.max_steps.
    #[arg(long)]
    max_steps: Option<usize>,
    /// key=value overrides, e.g. training.learning_rate=1e-4 (repeatable).
    #[arg(long = "set")]
    sets: Vec<String>,
    /// Continue from the newest checkpoint in the output dir.
    #[arg(long)]
    resume: bool,
}

pub(crate) fn sft(a: &SftArgs, json_out: bool) -> Result<()> {
    let mut sets = a.sets.clone();
    if let Some(d) = &a.output_dir {
        sets.push(format!("output_dir={}", d.display()));
    }
    if let Some(n) = a.max_steps {
        sets.push(format!("training.max_steps={n}"));
    }
    let r = recipe::load(&a.recipe, &sets)?;
    let out = r.output_dir.clone();
    std::fs::create_dir_all(&out).with_context(|| format!("{}", out.display()))?;
    let model_dir = if std::path::Path::new(&r.model).is_dir() { PathBuf::from(&r.model) } else { registry::pull(&r.model)? };
    let dataset = match (&r.data.dataset, &r.data.path) {
        (Some(d), _) => d.clone(),
        (None, Some(p)) => {
            let d = out.join("dataset");
            let stats = build(
                &BuildOptions {
                    inputs: vec![p.clone()],
                    format: r.data.format.context("data.format")?,
                    columns: Default::default(),
                    model: model_dir.clone(),
                    mask: r.data.mask,
                    max_seq_len: r.data.max_seq_len,
                    eval_fraction: r.data.eval_fraction,
                    seed: r.training.seed,
                    strict: false,
                    pack: r.data.pack,
                },
                &d,
            )?;
            if !json_out {
                eprintln!("data: {} train / {} eval examples, {} trained tokens ({} skipped)", stats.train, stats.eval, stats.trained_tokens, stats.dropped.values().sum::<usize>());
            }
            d
        }
        (None, None) => unreachable!("validated by recipe::load"),
    };
    let train_set = load_split(&dataset, "train")?;
    let eval_set = if dataset.join("eval.jsonl").exists() { load_split(&dataset, "eval")? } else { vec![] };
    let kind = ferrotune_core::parse_dtype(&r.dtype)?;
    let device = ferrotune_core::parse_device(&r.device)?;
    let mut model = ferrotune_core::load_model(&model_dir, kind, device)?;
    let method = r.adapter.method()?;
    let qlora = method == recipe::Method::Qlora;
    if qlora {
        let (before, after) = model.quantize_nf4()?;
        if !json_out {
            eprintln!("qlora: decoder linear weights {:.1} MB → {:.1} MB in NF4", before as f64 / 1e6, after as f64 / 1e6);
        }
    }
    let tok = ferrotune_core::Tokenizer::from_dir(&model_dir)?;
    let state: Box<dyn ferrotune_core::train::TrainableState> = match method {
        recipe::Method::Full => {
            FullState::prepare(&mut model)?;
            Box::new(FullState { base_dir: model_dir.clone() })
        }
        recipe::Method::PromptTuning => {
            let init = match &r.adapter.prompt_tuning_init_text {
                Some(t) => PromptInit::Text(t.clone()),
                None => PromptInit::Random,
            };
            let cfg = PromptTuningConfig { num_virtual_tokens: r.adapter.num_virtual_tokens, init: init.clone() };
            model.add_prompt_tuning(&cfg, Some(&tok), r.training.seed)?;
            Box::new(PromptState { init, base_model: model_dir.display().to_string() })
        }
        recipe::Method::Lora | recipe::Method::Qlora => {
            let lcfg = r.adapter.lora()?;
            model.add_lora(&lcfg, r.training.seed)?;
            Box::new(LoraState { cfg: lcfg, base_model: model_dir.display().to_string() })
        }
    };
    let pad_id = ferrotune_core::ModelDefaults::from_dir(&model_dir, &tok)?.pad_id;
    // Provenance beside the adapter: the template used for the data, the resolved recipe.
    let template = ChatTemplate::from_dir(&model_dir)?;
    std::fs::write(out.join("chat_template.jinja"), template.source()).context("writing chat_template.jinja")?;
    std::fs::write(out.join("recipe.yaml"), serde_yaml::to_string(&r)?).context("writing recipe.yaml")?;
    std::fs::write(
        out.join("ferrotune_train.json"),
        serde_json::to_string_pretty(&json!({"base_model": model_dir, "method": r.adapter.method, "base_quantization": if qlora { "nf4" } else { "none" },
            "chat_template": template.origin(), "dataset": dataset, "train_examples": train_set.len(), "eval_examples": eval_set.len()}))?,
    )?;
    let objective = SftObjective::new(pad_id, &r.training);
    let tokens_of = |e: &ferrotune_core::train::sft::SftExample| e.input_ids.len();
    let run = Run { objective: &objective, train: &train_set, eval: &eval_set, state: state.as_ref(), cfg: &r.training, output_dir: &out, tokens_of: &tokens_of };
    let bar = (!json_out).then(|| {
        let b = indicatif::ProgressBar::new(r.training.max_steps as u64);
        b.set_style(indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}").expect("valid template"));
        b
    });
    // SIGINT / SIGTERM: finish the current step, checkpoint, and exit; `--resume` continues.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing the signal handler")?;
    }
    let summary = train(
        &mut model,
        &run,
        a.resume,
        &mut |ev| match &bar {
            Some(b) => {
                b.set_position(ev.step as u64);
                let eval = ev.eval_loss.map(|l| format!(" eval {l:.4}")).unwrap_or_default();
                b.set_message(format!("loss {:.4}{eval} lr {:.2e} {:.0} tok/s", ev.loss, ev.lr, ev.tokens_per_s));
            }
            None => println!("{}", serde_json::to_string(ev).unwrap_or_default()),
        },
        &|| stop.load(std::sync::atomic::Ordering::Relaxed),
    )?;
    if summary.stopped {
        if let Some(b) = &bar {
            b.abandon();
        }
        let msg = format!("stopped at step {} of {}; checkpoint saved, continue with --resume", summary.position.step, r.training.max_steps);
        if json_out {
            println!("{}", json!({"stopped": true, "step": summary.position.step, "output_dir": out}));
        } else {
            eprintln!("{msg}");
        }
        return Ok(());
    }
    if let Some(b) = bar {
        b.finish();
        if method == recipe::Method::Full {
            println!("fine-tuned model (HF layout) in {}", out.display());
        } else {
            println!("adapter (PEFT format) in {}", out.display());
        }
    } else {
        println!("{}", serde_json::to_string(&json!({"done": true, "output_dir": out, "final_loss": summary.final_loss, "final_eval_loss": summary.final_eval_loss, "step": summary.position.step}))?);
    }
    Ok(())
}
