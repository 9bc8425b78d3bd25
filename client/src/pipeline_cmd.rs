//! `ferrotune pipeline run P.yaml [--resume]`: runs a pipeline's stages in order, each on its service (jobs
//! followed with their progress, merge / export / format calls, the eval stage's generations and scores),
//! keeping what each finished stage produced in `OUTPUT_DIR/pipeline.json`. `--resume` skips the stages that
//! finished with the same resolved settings and continues an interrupted job from its checkpoint. With
//! `report_to: [mlflow]` the pipeline has its own MLflow run, the parent of its job stages' runs, which also
//! receives the eval numbers.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ferrotune_proto::v1::reward_model_ref::Kind as RewardKind;
use ferrotune_proto::v1::{
    prompt, Chat, ChatMessage, DataSource, ExportGgufRequest, FormatRequest, GenerateRequest, JobState, LearnedReward,
    MergeRequest, ModelRef, PerplexityRequest, Prompt, RewardModelRef, Sampling, ScoreItem, ScoreRequest,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::connect::{status_error, Services};
use crate::pipeline::{resolved, Plan, Stage, JOB_KINDS};
use crate::train_cmd::{start_and_follow, Kind};

type Outputs = BTreeMap<String, String>;

/// `pipeline.json`: what each finished stage produced, with the settings it ran with.
#[derive(Debug, Default, Serialize, Deserialize)]
struct State {
    name: String,
    /// Every stage, in run order.
    #[serde(default)]
    order: Vec<String>,
    stages: BTreeMap<String, Done>,
    /// The stage running now.
    #[serde(default)]
    running: Option<String>,
    /// The stage that failed last, and why.
    #[serde(default)]
    failed: Option<(String, String)>,
}

impl State {
    fn save(&self, path: &Path) -> Result<()> {
        Ok(ferrotune_core::weights::write_atomically(path, serde_json::to_string_pretty(self)?.as_bytes())?)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Done {
    /// The stage as it ran (references resolved).
    spec: serde_json::Value,
    outputs: Outputs,
}

fn model(p: &str) -> Option<ModelRef> {
    Some(ModelRef { path: p.to_owned() })
}

/// Runs the pipeline in `path`.
pub(crate) async fn run(
    path: &Path,
    resume: bool,
    svc: &mut Services,
    settings: &ferrotune_runtime::Settings,
    json_out: bool,
) -> Result<()> {
    let plan = Plan::load(path)?;
    for (name, s) in &plan.stages {
        if let Some(r) = s.recipe.as_deref().filter(|r| !r.contains("${")) {
            if !Path::new(r).is_file() {
                bail!("{}: stages.{name}.recipe: {r} not found", path.display());
            }
        }
    }
    let out = &plan.output_dir;
    let state_path = out.join("pipeline.json");
    let mut state: State = match std::fs::read_to_string(&state_path) {
        Ok(_) if !resume => bail!(
            "{} holds a run of pipeline `{}`: continue it with --resume, or set another output_dir",
            out.display(),
            plan.name
        ),
        Ok(t) => serde_json::from_str(&t).with_context(|| format!("{}", state_path.display()))?,
        Err(_) => State { name: plan.name.clone(), ..Default::default() },
    };
    std::fs::create_dir_all(out).with_context(|| format!("{}", out.display()))?;
    state.order = plan.stages.iter().map(|(n, _)| n.clone()).collect();
    state.failed = None;
    let tracker = if plan.report_to.iter().any(|t| t == "mlflow") {
        let warn: ferrotune_runtime::tracking::Warn = std::sync::Arc::new(|m: String| eprintln!("warning: {m}"));
        let params = vec![
            ("pipeline".to_owned(), path.display().to_string()),
            ("stages".to_owned(), plan.stages.len().to_string()),
        ];
        let exp = plan.experiment_name.as_deref();
        let t = tokio::task::block_in_place(|| {
            ferrotune_runtime::tracking::PipelineRun::start(
                &settings.tracking,
                out,
                &plan.name,
                exp,
                params,
                resume,
                warn,
            )
        });
        match t {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("warning: mlflow: the pipeline is not tracked: {e}");
                None
            }
        }
    } else {
        None
    };
    let parent = tracker.as_ref().and_then(|t| t.run_id.clone());
    let mut outputs: BTreeMap<String, Outputs> = BTreeMap::new();
    let total = plan.stages.len();
    let mut result = Ok(());
    for (i, (name, stage)) in plan.stages.iter().enumerate() {
        let s = resolved(stage, &outputs);
        let spec = serde_json::to_value(&s)?;
        if let Some(done) = state.stages.get(name).filter(|d| d.spec == spec) {
            eprintln!("[{}/{total}] {name} ({}): finished before, skipped", i + 1, s.kind);
            outputs.insert(name.clone(), done.outputs.clone());
            continue;
        }
        eprintln!("[{}/{total}] {name} ({})", i + 1, s.kind);
        state.running = Some(name.clone());
        state.save(&state_path)?;
        let ctx = StageCtx { name, dir: out.join(name), plan: &plan, parent: parent.as_deref(), resume, json_out };
        let r = run_stage(&ctx, &s, svc, tracker.as_ref()).await;
        match r {
            Ok(o) => {
                state.stages.insert(name.clone(), Done { spec, outputs: o.clone() });
                ferrotune_core::weights::write_atomically(
                    &state_path,
                    serde_json::to_string_pretty(&state)?.as_bytes(),
                )?;
                outputs.insert(name.clone(), o);
            }
            Err(e) => {
                result = Err(e.context(format!("stage {name} ({})", s.kind)));
                break;
            }
        }
    }
    if let Some(t) = &tracker {
        t.end(result.is_ok());
    }
    result?;
    if json_out {
        println!("{}", json!({"pipeline": plan.name, "output_dir": out, "stages": outputs}));
    } else {
        println!("pipeline {} done → {}", plan.name, state_path.display());
        for (name, o) in &outputs {
            let shown: Vec<String> =
                o.iter().filter(|(k, _)| *k != "job_id").map(|(k, v)| format!("{k}: {v}")).collect();
            println!("  {name}: {}", shown.join(", "));
        }
    }
    Ok(())
}

struct StageCtx<'a> {
    name: &'a str,
    /// The stage's default output place.
    dir: PathBuf,
    plan: &'a Plan,
    parent: Option<&'a str>,
    resume: bool,
    json_out: bool,
}

async fn run_stage(
    c: &StageCtx<'_>,
    s: &Stage,
    svc: &mut Services,
    tracker: Option<&ferrotune_runtime::tracking::PipelineRun>,
) -> Result<Outputs> {
    let dir = c.dir.display().to_string();
    let mut o = Outputs::new();
    match s.kind.as_str() {
        k if JOB_KINDS.contains(&k) => {
            let recipe = s.recipe.as_deref().expect("checked");
            let text = std::fs::read_to_string(recipe).with_context(|| recipe.to_owned())?;
            let mut sets = vec![format!("output_dir={dir}")];
            if !c.plan.report_to.is_empty() {
                sets.push(format!("report_to=[{}]", c.plan.report_to.join(",")));
            }
            if let Some(e) = &c.plan.experiment_name {
                sets.push(format!("tracking.experiment_name={e}"));
            }
            if let Some(p) = c.parent {
                sets.push(format!("tracking.parent_run_id={p}"));
            }
            sets.extend(s.set.iter().cloned());
            ferrotune_training::recipe::parse(&text, Path::new(recipe), &sets)?;
            let kind = Kind::of(k).expect("a job kind");
            let j = start_and_follow(kind, text, sets, c.resume, svc, c.json_out).await?;
            if JobState::try_from(j.state) != Ok(JobState::Succeeded) {
                bail!("job {} ended {}: {}", j.id, crate::jobs_cmd::state_name(j.state), j.error);
            }
            for key in ["output_dir", "adapter", "model"] {
                o.insert(key.into(), j.output_dir.clone());
            }
            o.insert("metrics".into(), format!("{}/metrics.jsonl", j.output_dir));
            o.insert("job_id".into(), j.id.clone());
        }
        "merge" => {
            let req = MergeRequest {
                model: model(s.model.as_deref().expect("checked")),
                adapter: s.adapter.clone().unwrap_or_default(),
                out: s.out.clone().unwrap_or(dir),
                base: s.base.clone().unwrap_or_default(),
                max_shard_bytes: 0,
            };
            let r = svc.merge.merge(req).await.map_err(status_error)?.into_inner();
            eprintln!("  merged {} layers into the {} base → {}", r.merged_layers, r.merge_base, r.path);
            if let (Some(name), Some(t)) = (&s.register_model, tracker) {
                t.register(Path::new(&r.path), c.name, name);
                eprintln!("  registering {} as a new version of `{name}` (MLflow)", r.path);
            }
            o.insert("model".into(), r.path);
        }
        "export" => {
            let req = ExportGgufRequest {
                model: model(s.model.as_deref().expect("checked")),
                adapter: s.adapter.clone().unwrap_or_default(),
                out: s.out.clone().unwrap_or(format!("{dir}.gguf")),
                r#type: s.r#type.clone().unwrap_or_else(|| "f16".into()),
            };
            let r = svc.merge.export_gguf(req).await.map_err(status_error)?.into_inner();
            eprintln!("  {} GGUF ({} tensors) → {}", r.architecture, r.tensors, r.path);
            o.insert("file".into(), r.path);
        }
        "format" => {
            let out = s.out.clone().unwrap_or(dir);
            let req = FormatRequest {
                source: Some(DataSource {
                    inputs: s.inputs.clone(),
                    format: s.format.clone().unwrap_or_default(),
                    model: model(s.model.as_deref().expect("checked")),
                    ..Default::default()
                }),
                out: out.clone(),
                max_seq_len: s.max_seq_len.unwrap_or(0),
                ..Default::default()
            };
            let r = svc.data.format(req).await.map_err(status_error)?.into_inner();
            eprintln!("  {} train / {} eval examples → {out}", r.train, r.eval);
            o.insert("dataset".into(), out);
        }
        "eval" => {
            let report = evaluate(s, svc).await?;
            std::fs::create_dir_all(&c.dir)?;
            let path = std::fs::canonicalize(&c.dir).with_context(|| c.dir.display().to_string())?.join("eval.json");
            std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
            let numbers: Vec<(String, f64)> = report["metrics"]
                .as_object()
                .map(|m| m.iter().filter_map(|(k, v)| v.as_f64().map(|x| (format!("{}/{k}", c.name), x))).collect())
                .unwrap_or_default();
            for (k, v) in &numbers {
                eprintln!("  {k}: {v:.4}");
            }
            if let Some(t) = tracker {
                t.metrics(0, &numbers);
            }
            o.insert("report".into(), path.display().to_string());
        }
        other => bail!("unknown stage kind `{other}`"),
    }
    Ok(o)
}

/// One held-out prompt: the conversation before the answer, and the reference answer if any.
struct Held {
    chat: Vec<ChatMessage>,
    reference: String,
}

fn held_out(path: &str) -> Result<Vec<Held>> {
    let text = std::fs::read_to_string(path).with_context(|| path.to_owned())?;
    let mut out = vec![];
    for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let at = || format!("{path}:{}", i + 1);
        let v: serde_json::Value = serde_json::from_str(line).with_context(|| format!("{}: not JSON", at()))?;
        let msg = |m: &serde_json::Value| ChatMessage {
            role: m["role"].as_str().unwrap_or_default().to_owned(),
            content: m["content"].as_str().unwrap_or_default().to_owned(),
        };
        if let Some(ms) = v["messages"].as_array() {
            let mut chat: Vec<ChatMessage> = ms.iter().map(msg).collect();
            let reference = match chat.last() {
                Some(m) if m.role == "assistant" => chat.pop().map(|m| m.content).unwrap_or_default(),
                _ => String::new(),
            };
            if chat.is_empty() {
                bail!("{}: no prompt before the answer", at());
            }
            out.push(Held { chat, reference });
        } else if let Some(p) = v["prompt"].as_str() {
            let reference = v["reference"].as_str().or(v["answer"].as_str()).unwrap_or_default().to_owned();
            out.push(Held { chat: vec![ChatMessage { role: "user".into(), content: p.into() }], reference });
        } else {
            bail!("{}: expected `messages` or `prompt`", at());
        }
    }
    if out.is_empty() {
        bail!("{path}: no prompts");
    }
    Ok(out)
}

/// The eval stage: greedy answers to the held-out prompts scored with the rules (and a learned reward
/// model), and a text's perplexity, under the stage's model and adapter.
async fn evaluate(s: &Stage, svc: &mut Services) -> Result<serde_json::Value> {
    let m = s.model.clone().expect("checked");
    let adapter = s.adapter.clone().unwrap_or_default();
    let mut metrics = serde_json::Map::new();
    let mut samples = vec![];
    if let Some(p) = &s.prompts {
        let held = held_out(p)?;
        let mut answers = vec![];
        for chunk in held.chunks(32) {
            let req = GenerateRequest {
                model: model(&m),
                adapter: adapter.clone(),
                prompts: chunk
                    .iter()
                    .map(|h| Prompt { kind: Some(prompt::Kind::Chat(Chat { messages: h.chat.clone() })) })
                    .collect(),
                max_new_tokens: s.max_new_tokens.unwrap_or(64),
                sampling: Some(Sampling { greedy: true, ..Default::default() }),
                ..Default::default()
            };
            let r = svc.policy.generate(req).await.map_err(status_error)?.into_inner();
            answers.extend(r.completions.into_iter().map(|c| c.text));
        }
        let items: Vec<ScoreItem> = held
            .iter()
            .zip(&answers)
            .map(|(h, a)| ScoreItem {
                prompt: h.chat.last().map(|m| m.content.clone()).unwrap_or_default(),
                response: a.clone(),
                reference: h.reference.clone(),
            })
            .collect();
        let mut sources: Vec<(String, RewardModelRef)> = s
            .rules
            .iter()
            .map(|(k, r)| (k.clone(), RewardModelRef { kind: Some(RewardKind::Rule(r.clone())) }))
            .collect();
        if let Some(rm) = &s.reward_model {
            let learned = LearnedReward { base: model(&rm.model), adapter: rm.adapter.clone() };
            sources.push(("reward_mean".into(), RewardModelRef { kind: Some(RewardKind::Learned(learned)) }));
        }
        for (name, src) in sources {
            let mut scores = vec![];
            for chunk in items.chunks(64) {
                let req = ScoreRequest { model: Some(src.clone()), items: chunk.to_vec() };
                let r = svc.reward.score(req).await.map_err(|e| status_error(e).context(format!("rules.{name}")))?;
                scores.extend(r.into_inner().scores);
            }
            let mean = scores.iter().map(|&x| x as f64).sum::<f64>() / scores.len().max(1) as f64;
            metrics.insert(name, json!(mean));
        }
        samples = held
            .iter()
            .zip(&answers)
            .map(|(h, a)| json!({"prompt": h.chat.last().map(|m| m.content.clone()), "answer": a, "reference": h.reference}))
            .collect();
    }
    if let Some(f) = &s.perplexity {
        let text = std::fs::read_to_string(f).with_context(|| f.clone())?;
        let req = PerplexityRequest { model: model(&m), adapter: adapter.clone(), text, ..Default::default() };
        let r = svc.policy.perplexity(req).await.map_err(status_error)?.into_inner();
        metrics.insert("perplexity".into(), json!(r.perplexity));
        metrics.insert("mean_nll".into(), json!(r.mean_nll));
    }
    Ok(json!({"model": m, "adapter": adapter, "metrics": metrics, "samples": samples}))
}
