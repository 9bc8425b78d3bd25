//! `ferrotune data format` and `ferrotune data preview`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use ferrotune_core::generation::ModelDefaults;
use ferrotune_core::{ChatTemplate, Tokenizer};
use ferrotune_data::formats::{parse, Columns, Format, MaskMode};
use ferrotune_data::read::read_records;
use ferrotune_data::tokenize::{Renderer, Tokenized, TokenizedSample};
use ferrotune_data::{build, BuildOptions};

/// Options shared by `format` and `preview`.
#[derive(clap::Args)]
pub(crate) struct Source {
    /// Input file(s): .jsonl, .json or .csv (repeatable).
    #[arg(long, required = true)]
    input: Vec<PathBuf>,
    /// alpaca, messages, sharegpt, text, prompt-completion or preference.
    #[arg(long)]
    format: Format,
    /// Model directory whose tokenizer and chat template are used.
    #[arg(long)]
    model: PathBuf,
    /// What is trained: assistant (every assistant turn), completion (the last one), all.
    #[arg(long, default_value = "assistant")]
    mask: MaskMode,
    /// Rename a field: canonical=actual, e.g. --column instruction=question (repeatable).
    #[arg(long = "column")]
    columns: Vec<String>,
}

fn columns(list: &[String]) -> Result<Columns> {
    list.iter()
        .map(|c| c.split_once('=').map(|(a, b)| (a.to_owned(), b.to_owned())).with_context(|| format!("--column `{c}`: expected canonical=actual")))
        .collect()
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
        max_seq_len: usize,
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
        n: usize,
    },
}

pub(crate) fn run(cmd: &DataCmd, json_out: bool) -> Result<()> {
    match cmd {
        DataCmd::Format { src, out, max_seq_len, eval_fraction, seed, strict, pack } => {
            let opts = BuildOptions {
                inputs: src.input.clone(),
                format: src.format,
                columns: columns(&src.columns)?,
                model: src.model.clone(),
                mask: src.mask,
                max_seq_len: *max_seq_len,
                eval_fraction: *eval_fraction,
                seed: *seed,
                strict: *strict,
                pack: *pack,
            };
            let stats = build(&opts, out)?;
            if json_out {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                println!(
                    "{} records → {} train, {} eval ({} tokens, {} trained; {} truncated, {} dropped) in {}",
                    stats.records,
                    stats.train,
                    stats.eval,
                    stats.tokens,
                    stats.trained_tokens,
                    stats.truncated,
                    stats.dropped.values().sum::<usize>(),
                    out.display()
                );
                for e in &stats.errors {
                    eprintln!("  skipped {e}");
                }
            }
        }
        DataCmd::Preview { src, n } => {
            let tok = Tokenizer::from_dir(&src.model)?;
            let tmpl = ChatTemplate::from_dir(&src.model)?;
            let eos = ModelDefaults::from_dir(&src.model, &tok)?.eos_ids;
            let r = Renderer { tokenizer: &tok, template: &tmpl, eos_id: *eos.first().context("the model declares no EOS token")?, eos_ids: &eos, mask: src.mask };
            let cols = columns(&src.columns)?;
            let mut shown = 0;
            for file in &src.input {
                for rec in read_records(file)? {
                    if shown == *n {
                        return Ok(());
                    }
                    let t = rec.value.and_then(|v| parse(src.format, &v, &cols)).and_then(|s| r.sample(&s));
                    match t {
                        Ok(TokenizedSample::Single(s)) => println!("--- {}:{} ({} tokens, {} trained)\n{}", file.display(), rec.line, s.input_ids.len(), s.trained(), highlight(&tok, &s)?),
                        Ok(TokenizedSample::Pair { chosen, rejected }) => {
                            println!("--- {}:{} chosen\n{}\n--- rejected\n{}", file.display(), rec.line, highlight(&tok, &chosen)?, highlight(&tok, &rejected)?)
                        }
                        Err(e) => println!("--- {}:{}: {e}", file.display(), rec.line),
                    }
                    shown += 1;
                }
            }
        }
    }
    Ok(())
}

/// The decoded sequence with trained runs wrapped in `[[…]]`.
fn highlight(tok: &Tokenizer, t: &Tokenized) -> Result<String> {
    let mut out = String::new();
    let mut i = 0;
    while i < t.input_ids.len() {
        let trained = t.labels[i] >= 0;
        let j = (i..t.input_ids.len()).find(|&j| (t.labels[j] >= 0) != trained).unwrap_or(t.input_ids.len());
        let text = tok.decode(&t.input_ids[i..j], false)?;
        if trained {
            out.push_str(&format!("[[{text}]]"));
        } else {
            out.push_str(&text);
        }
        i = j;
    }
    Ok(out)
}
