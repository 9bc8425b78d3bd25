//! Pipeline files (`ferrotune pipeline run P.yaml`): named stages, each a job on its service (format, sft,
//! reward, dpo, orpo, simpo, kto, ppo, grpo, rloo) or a call (merge, export, eval), whose string fields may
//! reference earlier stages' outputs as `${stage.output}`. Checked as a whole before anything runs: kinds,
//! the fields each kind needs, references to stages and outputs that exist, no cycles; stages run in an
//! order where every stage comes after those it references (file order among the rest).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Stage kinds that run as a recipe job.
pub(crate) const JOB_KINDS: &[&str] = &["sft", "reward", "dpo", "orpo", "simpo", "kto", "ppo", "grpo", "rloo"];
/// Every stage kind.
pub(crate) const KINDS: &[&str] =
    &["format", "sft", "reward", "dpo", "orpo", "simpo", "kto", "ppo", "grpo", "rloo", "merge", "export", "eval"];

/// A pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Pipeline {
    /// Name (the default output dir is `runs/<name>`).
    pub(crate) name: String,
    /// Where the pipeline keeps its state (`pipeline.json`) and stages their outputs by default.
    #[serde(default)]
    pub(crate) output_dir: Option<PathBuf>,
    /// Trackers of every job stage (and the pipeline's own MLflow run, the parent of theirs).
    #[serde(default)]
    pub(crate) report_to: Option<Vec<String>>,
    /// MLflow experiment of the pipeline and its stages.
    #[serde(default)]
    pub(crate) experiment_name: Option<String>,
    /// The stages, by name, in file order.
    pub(crate) stages: serde_yaml::Mapping,
}

/// A learned reward model for the eval stage.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct RewardModelSpec {
    /// Base model.
    pub(crate) model: String,
    /// SEQ_CLS adapter.
    pub(crate) adapter: String,
}

/// One stage. Which fields apply depends on `kind`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct Stage {
    /// What runs.
    pub(crate) kind: String,
    /// Job stages: the recipe file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) recipe: Option<String>,
    /// Job stages: `key=value` overrides of the recipe.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) set: Vec<String>,
    /// merge / export / eval: the model; format: the tokenizer's model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) model: Option<String>,
    /// merge / export / eval: an adapter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) adapter: Option<String>,
    /// merge / export / format: where the output goes (default under the pipeline's output dir).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) out: Option<String>,
    /// merge: `original` or `nf4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) base: Option<String>,
    /// export: f16, f32, q8_0 or q4_0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) r#type: Option<String>,
    /// format: the input JSONL files.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) inputs: Vec<String>,
    /// format: the data format (messages, alpaca, …).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) format: Option<String>,
    /// format: longest tokenized example.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_seq_len: Option<u32>,
    /// eval: held-out prompts (JSONL: `messages` whose last assistant turn is the reference, or `prompt` with
    /// an optional `reference`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) prompts: Option<String>,
    /// eval: new tokens per answer (greedy).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) max_new_tokens: Option<u32>,
    /// eval: reward-tier rules by metric name (`regex:…`, `exact:…`, `json`, `answer:exact`, …).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub(crate) rules: BTreeMap<String, String>,
    /// eval: a learned reward model whose mean score is reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) reward_model: Option<RewardModelSpec>,
    /// eval: a text file whose perplexity under the model is reported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) perplexity: Option<String>,
    /// merge: upload the merged model to the pipeline's MLflow run and register it as a new version of this
    /// registered model (needs `report_to: [mlflow]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) register_model: Option<String>,
}

impl Stage {
    /// The outputs later stages may reference.
    pub(crate) fn outputs(&self) -> &'static [&'static str] {
        match self.kind.as_str() {
            "format" => &["dataset"],
            "merge" => &["model"],
            "export" => &["file"],
            "eval" => &["report"],
            _ => &["output_dir", "adapter", "model", "metrics", "job_id"],
        }
    }

    /// Every string field with its name (for references and their substitution).
    fn strings_mut(&mut self) -> Vec<(String, &mut String)> {
        let mut v: Vec<(String, &mut String)> = vec![];
        for (name, f) in [
            ("recipe", &mut self.recipe),
            ("model", &mut self.model),
            ("adapter", &mut self.adapter),
            ("out", &mut self.out),
            ("base", &mut self.base),
            ("type", &mut self.r#type),
            ("format", &mut self.format),
            ("prompts", &mut self.prompts),
            ("perplexity", &mut self.perplexity),
        ] {
            if let Some(s) = f.as_mut() {
                v.push((name.to_owned(), s));
            }
        }
        for (i, s) in self.set.iter_mut().enumerate() {
            v.push((format!("set[{i}]"), s));
        }
        for (i, s) in self.inputs.iter_mut().enumerate() {
            v.push((format!("inputs[{i}]"), s));
        }
        for (k, s) in self.rules.iter_mut() {
            v.push((format!("rules.{k}"), s));
        }
        if let Some(r) = self.reward_model.as_mut() {
            v.push(("reward_model.model".into(), &mut r.model));
            v.push(("reward_model.adapter".into(), &mut r.adapter));
        }
        v
    }

    fn check_fields(&self) -> std::result::Result<(), String> {
        let k = self.kind.as_str();
        if !KINDS.contains(&k) {
            return Err(format!("kind: unknown stage kind `{k}` (known: {})", KINDS.join(", ")));
        }
        let need = |f: bool, name: &str| if f { Ok(()) } else { Err(format!("a `{k}` stage needs `{name}`")) };
        match k {
            "merge" => {
                need(self.model.is_some(), "model")?;
                need(self.adapter.is_some(), "adapter")
            }
            "export" => need(self.model.is_some(), "model"),
            "eval" => {
                need(self.model.is_some(), "model")?;
                need(self.prompts.is_some() || self.perplexity.is_some(), "prompts or perplexity")
            }
            "format" => {
                need(!self.inputs.is_empty(), "inputs")?;
                need(self.model.is_some(), "model")
            }
            _ => need(self.recipe.is_some(), "recipe"),
        }
    }
}

/// `${stage.output}` references in `s`: (stage, output).
pub(crate) fn references(s: &str) -> std::result::Result<Vec<(String, String)>, String> {
    let mut out = vec![];
    let mut rest = s;
    while let Some(i) = rest.find("${") {
        let after = &rest[i + 2..];
        let end = after.find('}').ok_or_else(|| format!("`{s}`: an unclosed `${{`"))?;
        let inner = &after[..end];
        let (stage, output) =
            inner.split_once('.').ok_or_else(|| format!("`${{{inner}}}`: write `${{stage.output}}`"))?;
        out.push((stage.trim().to_owned(), output.trim().to_owned()));
        rest = &after[end + 1..];
    }
    Ok(out)
}

/// `s` with each `${stage.output}` replaced from `outputs`.
pub(crate) fn substitute(s: &str, outputs: &BTreeMap<String, BTreeMap<String, String>>) -> String {
    let mut text = s.to_owned();
    for (stage, output) in references(s).unwrap_or_default() {
        if let Some(v) = outputs.get(&stage).and_then(|o| o.get(&output)) {
            text = text.replace(&format!("${{{stage}.{output}}}"), v);
        }
    }
    text
}

/// A checked pipeline: its stages in run order.
#[derive(Debug)]
pub(crate) struct Plan {
    /// Name.
    pub(crate) name: String,
    /// Output dir.
    pub(crate) output_dir: PathBuf,
    /// Trackers.
    pub(crate) report_to: Vec<String>,
    /// MLflow experiment.
    pub(crate) experiment_name: Option<String>,
    /// (name, stage) in run order.
    pub(crate) stages: Vec<(String, Stage)>,
}

impl Plan {
    /// Parses and checks `path`.
    pub(crate) fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
        Self::parse(&text).map_err(|e| anyhow::anyhow!("{}: {e:#}", path.display()))
    }

    /// Parses and checks a pipeline's text.
    pub(crate) fn parse(text: &str) -> Result<Self> {
        let p: Pipeline = serde_yaml::from_str(text).context("not a pipeline")?;
        if p.name.trim().is_empty() || p.name.contains('/') {
            bail!("name: give the pipeline a name without `/`");
        }
        if let Some(list) = &p.report_to {
            ferrotune_runtime::tracking::check_report_to(list).map_err(|e| anyhow::anyhow!("report_to: {e}"))?;
        }
        let mut stages: Vec<(String, Stage)> = vec![];
        for (k, v) in &p.stages {
            let name = k.as_str().context("stages: a stage name must be a string")?.to_owned();
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') {
                bail!("stages.{name}: stage names are letters, digits, `_` and `-`");
            }
            let s: Stage = serde_yaml::from_value(v.clone()).map_err(|e| anyhow::anyhow!("stages.{name}: {e}"))?;
            s.check_fields().map_err(|e| anyhow::anyhow!("stages.{name}: {e}"))?;
            if s.register_model.is_some() && s.kind != "merge" {
                bail!("stages.{name}.register_model: only a merge stage registers its model (job stages: `set: [tracking.register_model=NAME]`)");
            }
            if s.register_model.is_some() && !p.report_to.as_ref().is_some_and(|r| r.iter().any(|t| t == "mlflow")) {
                bail!("stages.{name}.register_model: registering a model needs `report_to: [mlflow]`");
            }
            stages.push((name, s));
        }
        if stages.is_empty() {
            bail!("stages: no stages");
        }
        let order = run_order(&stages)?;
        let mut by_name: BTreeMap<String, Stage> = stages.into_iter().collect();
        let stages = order.into_iter().map(|n| (n.clone(), by_name.remove(&n).expect("a stage"))).collect();
        Ok(Self {
            output_dir: p.output_dir.unwrap_or_else(|| PathBuf::from("runs").join(&p.name)),
            name: p.name,
            report_to: p.report_to.unwrap_or_default().into_iter().filter(|t| t != "none").collect(),
            experiment_name: p.experiment_name,
            stages,
        })
    }
}

/// The stages' run order: each after the stages it references, file order otherwise. Unknown stages or
/// outputs, self-references and cycles are errors naming the field.
fn run_order(stages: &[(String, Stage)]) -> Result<Vec<String>> {
    let index: BTreeMap<&str, usize> = stages.iter().enumerate().map(|(i, (n, _))| (n.as_str(), i)).collect();
    let mut deps: Vec<Vec<usize>> = vec![vec![]; stages.len()];
    for (i, (name, s)) in stages.iter().enumerate() {
        let mut s = s.clone();
        for (field, text) in s.strings_mut() {
            for (stage, output) in references(text).map_err(|e| anyhow::anyhow!("stages.{name}.{field}: {e}"))? {
                let Some(&j) = index.get(stage.as_str()) else {
                    bail!("stages.{name}.{field}: `${{{stage}.{output}}}` names no stage `{stage}`");
                };
                if j == i {
                    bail!("stages.{name}.{field}: a stage cannot use its own outputs");
                }
                let outs = stages[j].1.outputs();
                if !outs.contains(&output.as_str()) {
                    bail!(
                        "stages.{name}.{field}: a `{}` stage has no output `{output}` (it has {})",
                        stages[j].1.kind,
                        outs.join(", ")
                    );
                }
                if !deps[i].contains(&j) {
                    deps[i].push(j);
                }
            }
        }
    }
    // Depth-first, in file order; a node met again while on the path closes a cycle.
    fn visit(
        i: usize,
        deps: &[Vec<usize>],
        state: &mut [u8],
        path: &mut Vec<usize>,
        out: &mut Vec<usize>,
    ) -> Result<(), Vec<usize>> {
        match state[i] {
            2 => return Ok(()),
            1 => {
                let from = path.iter().position(|&p| p == i).unwrap_or(0);
                let mut cycle = path[from..].to_vec();
                cycle.push(i);
                return Err(cycle);
            }
            _ => {}
        }
        state[i] = 1;
        path.push(i);
        for &d in &deps[i] {
            visit(d, deps, state, path, out)?;
        }
        path.pop();
        state[i] = 2;
        out.push(i);
        Ok(())
    }
    let (mut state, mut out) = (vec![0u8; stages.len()], vec![]);
    for i in 0..stages.len() {
        visit(i, &deps, &mut state, &mut vec![], &mut out).map_err(|cycle| {
            let names: Vec<&str> = cycle.iter().map(|&c| stages[c].0.as_str()).collect();
            anyhow::anyhow!("stages form a cycle: {} (each uses the next's outputs)", names.join(" → "))
        })?;
    }
    Ok(out.into_iter().map(|i| stages[i].0.clone()).collect())
}

/// `stage` with its references replaced from `outputs` (every referenced stage has run).
pub(crate) fn resolved(stage: &Stage, outputs: &BTreeMap<String, BTreeMap<String, String>>) -> Stage {
    let mut s = stage.clone();
    for (_, text) in s.strings_mut() {
        *text = substitute(text, outputs);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "name: p\nstages:\n  merged: {kind: merge, model: m, adapter: '${sft.adapter}'}\n  \
        sft: {kind: sft, recipe: r.yaml}\n  eval: {kind: eval, model: '${merged.model}', prompts: e.jsonl}\n";

    #[test]
    fn stages_run_after_what_they_reference() {
        let p = Plan::parse(OK).unwrap();
        let names: Vec<&str> = p.stages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["sft", "merged", "eval"]);
        assert_eq!(p.output_dir, PathBuf::from("runs/p"));
        let mut outs = BTreeMap::new();
        outs.insert("sft".to_owned(), BTreeMap::from([("adapter".to_owned(), "runs/p/sft".to_owned())]));
        assert_eq!(resolved(&p.stages[1].1, &outs).adapter.as_deref(), Some("runs/p/sft"));
    }

    #[test]
    fn the_shipped_pipeline_parses() {
        let p = Plan::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../recipes/pipeline.yaml")).unwrap();
        let names: Vec<&str> = p.stages.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["sft", "reward", "sft_merged", "dpo", "merged", "eval_base", "eval"]);
    }

    #[test]
    fn bad_pipelines_are_one_clear_line() {
        let err = |t: &str| format!("{:#}", Plan::parse(t).unwrap_err());
        let e = err("name: p\nstages:\n  a: {kind: merge, model: m, adapter: '${nope.adapter}'}\n");
        assert!(e.contains("stages.a.adapter") && e.contains("no stage `nope`"), "{e}");
        let e = err("name: p\nstages:\n  a: {kind: merge, model: '${b.model}', adapter: x}\n  b: {kind: merge, model: '${a.model}', adapter: x}\n");
        assert!(e.contains("cycle: a → b → a"), "{e}");
        let e =
            err("name: p\nstages:\n  a: {kind: sft, recipe: r}\n  b: {kind: eval, model: '${a.file}', prompts: p}\n");
        assert!(e.contains("no output `file`") && e.contains("adapter"), "{e}");
        let e = err("name: p\nstages:\n  a: {kind: paint}\n");
        assert!(e.contains("unknown stage kind `paint`"), "{e}");
        let e = err("name: p\nstages:\n  a: {kind: merge, model: m}\n");
        assert!(e.contains("needs `adapter`"), "{e}");
        let e = err("name: p\nstages:\n  a: {kind: sft, recipe: r, sett: []}\n");
        assert!(e.contains("stages.a") && e.contains("sett"), "{e}");
        let e = err("name: p\nstages:\n  a: {kind: sft, recipe: '${a.adapter}'}\n");
        assert!(e.contains("own outputs"), "{e}");
        let e = err("name: p\nstages:\n  a: {kind: sft, recipe: '${b'}\n");
        assert!(e.contains("unclosed"), "{e}");
        let e = err("name: p\nstages:\n  a: {kind: merge, model: m, adapter: x, register_model: n}\n");
        assert!(e.contains("report_to: [mlflow]"), "{e}");
        let e = err("name: p\nreport_to: [wandb]\nstages:\n  a: {kind: sft, recipe: r}\n");
        assert!(e.contains("report_to") && e.contains("wandb"), "{e}");
    }
}
