//! `ferrotune data format` and `ferrotune data preview`, through DataService.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferrotune_proto::v1::{DataSource, FormatRequest, ModelRef, PreviewRequest};

use crate::connect::{status_error, Services};

/// Options shared by `format` and `preview`.
#[derive(clap::Args)]
pub(crate) struct Source {
    /// Input file(s): .jsonl, .json, .csv or .parquet (repeatable).
    #[arg(long, required = true)]
    input: Vec<PathBuf>,
    /// alpaca, messages, sharegpt, text, prompt-completion, preference or unpaired (KTO).
    #[arg(long)]
    format: String,
    /// Model directory whose tokenizer and chat template are used.
    #[arg(long)]
    model: PathBuf,
    /// What is trained: assistant (every assistant turn), completion (the last one), all.
    #[arg(long, default_value = "assistant")]
    mask: String,
    /// Rename a field: canonical=actual, e.g. --column instruction=question (repeatable).
    #[arg(long = "column")]
    columns: Vec<String>,
}

impl Source {
    fn message(&self) -> Result<DataSource> {
        let columns = self
            .columns
            .iter()
            .map(|c| {
                c.split_once('=')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .with_context(|| format!("--column `{c}`: expected canonical=actual"))
            })
            .collect::<Result<_>>()?;
        Ok(DataSource {
            inputs: self.input.iter().map(|p| p.display().to_string()).collect(),
            format: self.format.clone(),
            model: Some(ModelRef { path: self.model.display().to_string() }),
            mask: self.mask.clone(),
            columns,
        })
    }
}

#[derive(clap::Subcommand)]
pub(crate) enum DataCmd {
    /// Validate, template, tokenize, mask, split; writes train.jsonl, eval.jsonl, stats.json.
    Format {
        #[command(flatten)]
        src: Source,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// Longest sequence in tokens.
        #[arg(long, default_value_t = 1024)]
        max_seq_len: u32,
        /// Fraction held out for evaluation.
        #[arg(long, default_value_t = 0.0)]
        eval_fraction: f64,
        /// Shuffle seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
        /// Fail on the first bad record (default: skip and count).
        #[arg(long)]
        strict: bool,
        /// Pack several samples per row of --max-seq-len tokens (no attention across samples).
        #[arg(long)]
        pack: bool,
    },
    /// Show rendered samples with the trained tokens in [[double brackets]].
    Preview {
        #[command(flatten)]
        src: Source,
        /// How many records.
        #[arg(long, default_value_t = 1)]
        n: u32,
    },
}

pub(crate) async fn run(cmd: &DataCmd, svc: &mut Services, json_out: bool) -> Result<()> {
    match cmd {
        DataCmd::Format { src, out, max_seq_len, eval_fraction, seed, strict, pack } => {
            let req = FormatRequest {
                source: Some(src.message()?),
                out: out.display().to_string(),
                max_seq_len: *max_seq_len,
                eval_fraction: *eval_fraction,
                seed: *seed,
                strict: *strict,
                pack: *pack,
            };
            let s = svc.data.format(req).await.map_err(status_error)?.into_inner();
            if json_out {
                let stats = serde_json::json!({"records": s.records, "train": s.train, "eval": s.eval, "tokens": s.tokens, "trained_tokens": s.trained_tokens,
                    "truncated": s.truncated, "packed_rows": s.packed_rows, "dropped": s.dropped, "errors": s.errors, "path": s.path});
                println!("{stats}");
            } else {
                println!(
                    "{} records → {} train, {} eval ({} tokens, {} trained; {} truncated, {} dropped) in {}",
                    s.records,
                    s.train,
                    s.eval,
                    s.tokens,
                    s.trained_tokens,
                    s.truncated,
                    s.dropped.values().sum::<u64>(),
                    s.path
                );
                for e in &s.errors {
                    eprintln!("  skipped {e}");
                }
            }
        }
        DataCmd::Preview { src, n } => {
            let r = svc
                .data
                .preview(PreviewRequest { source: Some(src.message()?), n: *n })
                .await
                .map_err(status_error)?
                .into_inner();
            for s in r.samples {
                if json_out {
                    println!(
                        "{}",
                        serde_json::json!({"location": s.location, "text": s.text, "rejected": s.rejected, "tokens": s.tokens, "trained": s.trained, "error": s.error})
                    );
                } else if !s.error.is_empty() {
                    println!("--- {}: {}", s.location, s.error);
                } else if !s.rejected.is_empty() {
                    println!("--- {} chosen\n{}\n--- rejected\n{}", s.location, s.text, s.rejected);
                } else {
                    println!("--- {} ({} tokens, {} trained)\n{}", s.location, s.tokens, s.trained, s.text);
                }
            }
        }
    }
    Ok(())
}
