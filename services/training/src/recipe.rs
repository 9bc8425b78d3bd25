//! Training recipes: YAML files naming the model, the adapter, the data and the hyperparameters, with any
//! key overridable from the command line (`--set training.learning_rate=1e-4`). Unknown keys are errors.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use ferrotune_core::data::formats::{Format, MaskMode};
use ferrotune_core::lora::{LoraConfig, Targets};
use ferrotune_core::train::group_rl::{GroupAlgorithm, GroupRlConfig};
use ferrotune_core::train::TrainConfig;
use serde::{Deserialize, Serialize};

/// A training recipe: model, data, adapter, loop settings, and the section of its objective when it is not
/// SFT (`dpo`, `reward`, `ppo`; the command that starts it says which one runs).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// A known model name (pulled if needed) or a model directory.
    pub model: String,
    /// The adapter to train.
    pub adapter: AdapterSpec,
    /// The data.
    pub data: DataSpec,
    /// Loop hyperparameters.
    #[serde(default)]
    pub training: TrainConfig,
    /// Where the adapter, checkpoints and metrics go.
    pub output_dir: PathBuf,
    /// cpu, cuda or cuda:N.
    #[serde(default = "cpu")]
    pub device: String,
    /// Compute dtype of the base: f32 (CPU), bf16/f16 (CUDA).
    #[serde(default = "f32")]
    pub dtype: String,
    /// The base's layers placed across several devices of this process (transformers' `device_map`), for a
    /// model that does not fit one: `auto`, a list of devices (`[cuda:0, cuda:1]`), or module name → device
    /// (`{model.embed_tokens: 0, model.layers.0: 0, …, lm_head: 1}`). Absent: everything on `device`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_map: Option<serde_json::Value>,
    /// DPO settings (`align dpo`; absent for SFT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpo: Option<ferrotune_core::train::dpo::DpoConfig>,
    /// ORPO settings (`align orpo`; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orpo: Option<ferrotune_core::train::ref_free::OrpoConfig>,
    /// SimPO settings (`align simpo`; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simpo: Option<ferrotune_core::train::ref_free::SimpoConfig>,
    /// KTO settings (`align kto`; absent otherwise). The data is unpaired (or preference pairs, unpaired).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kto: Option<ferrotune_core::train::kto::KtoConfig>,
    /// Reward-model settings (`train reward`; absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reward: Option<ferrotune_core::train::reward::RewardConfig>,
    /// PPO settings (`align ppo`; absent otherwise). `data.path` is then a prompt file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppo: Option<ferrotune_core::train::ppo_objective::PpoConfig>,
    /// GRPO settings (`align grpo`; absent otherwise). `data.path` is then a prompt file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpo: Option<GroupRlConfig>,
    /// RLOO settings (`align rloo`; absent otherwise). `data.path` is then a prompt file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rloo: Option<GroupRlConfig>,
    /// Another chat template than the model's, for the data and the adapter: `chatml`, `zephyr`, `gemma`, or a
    /// Jinja file. Stored beside the dataset and the adapter, so inference with the adapter uses it too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    /// Experiment trackers of this job (`mlflow`, `tensorboard`, or `none`); absent = the service default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub report_to: Option<Vec<String>>,
    /// The run's name in the trackers (default: the output dir's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_name: Option<String>,
    /// Tracker settings of this job.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking: Option<RecipeTracking>,
}

/// `tracking:` in a recipe.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecipeTracking {
    /// MLflow experiment (default: the service's `tracking.mlflow.experiment_name`).
    #[serde(default)]
    pub experiment_name: Option<String>,
    /// Register the trained output (adapter or model) as a new version of this MLflow registered model.
    #[serde(default)]
    pub register_model: Option<String>,
    /// The MLflow run this job's run is nested under (a pipeline's run).
    #[serde(default)]
    pub parent_run_id: Option<String>,
}

fn cpu() -> String {
    "cpu".into()
}
fn f32() -> String {
    "f32".into()
}

/// Adapter method and settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdapterSpec {
    /// `lora` or `qlora` (NF4 base).
    pub method: String,
    /// LoRA rank.
    #[serde(default = "r")]
    pub r: i64,
    /// LoRA alpha.
    #[serde(default = "alpha")]
    pub lora_alpha: f64,
    /// LoRA dropout.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module names, or the string `all-linear`.
    #[serde(default = "qv")]
    pub target_modules: serde_yaml::Value,
    /// rsLoRA scaling.
    #[serde(default)]
    pub use_rslora: bool,
    /// DoRA: a trained magnitude per output row (PEFT's `use_dora`).
    #[serde(default)]
    pub use_dora: bool,
    /// Prompt or prefix tuning: virtual tokens.
    #[serde(default = "virtual_tokens")]
    pub num_virtual_tokens: i64,
    /// Prefix tuning: reparameterise the prefix through a two-layer MLP while training (PEFT's
    /// `prefix_projection`).
    #[serde(default)]
    pub prefix_projection: bool,
    /// Prefix tuning: that MLP's hidden width (default: head_dim × kv_heads, as PEFT).
    #[serde(default)]
    pub encoder_hidden_size: Option<i64>,
    /// Store the frozen base's linear weights in NF4 (TRL's `load_in_4bit`): implied by `method: qlora`, and
    /// available to prompt and prefix tuning.
    #[serde(default)]
    pub load_in_4bit: bool,
    /// Prompt tuning: initialise from this text's token embeddings (random N(0,1) when absent).
    #[serde(default)]
    pub prompt_tuning_init_text: Option<String>,
}

fn virtual_tokens() -> i64 {
    20
}

fn r() -> i64 {
    8
}
fn alpha() -> f64 {
    16.0
}
fn qv() -> serde_yaml::Value {
    serde_yaml::Value::Sequence(vec!["q_proj".into(), "v_proj".into()])
}

/// What is trained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// LoRA adapters on a dense base.
    Lora,
    /// LoRA adapters on an NF4 base.
    Qlora,
    /// Every weight; the output is a HF model dir.
    Full,
    /// Trainable virtual tokens (PEFT PROMPT_TUNING).
    PromptTuning,
    /// Trainable key/value prefixes of every layer (PEFT PREFIX_TUNING).
    PrefixTuning,
}

/// Raw data to format, or a dataset directory made by `ferrotune data format`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSpec {
    /// Raw input file (formatted into `OUTPUT_DIR/dataset`).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// A pre-formatted dataset directory.
    #[serde(default)]
    pub dataset: Option<PathBuf>,
    /// Record format of `path`.
    #[serde(default)]
    pub format: Option<Format>,
    /// What is trained.
    #[serde(default)]
    pub mask: MaskMode,
    /// Longest sequence.
    #[serde(default = "max_len")]
    pub max_seq_len: usize,
    /// Held-out fraction.
    #[serde(default)]
    pub eval_fraction: f64,
    /// PPO: held-out prompts (evaluated before training, every `eval_steps` and at the end).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval_path: Option<PathBuf>,
    /// Pack several samples per row (no attention across samples).
    #[serde(default)]
    pub pack: bool,
}

fn max_len() -> usize {
    1024
}

impl AdapterSpec {
    /// The LoRA config, validated.
    pub fn lora(&self) -> Result<LoraConfig> {
        let targets = match &self.target_modules {
            serde_yaml::Value::String(s) if s == "all-linear" => Targets::AllLinear,
            serde_yaml::Value::String(s) => Targets::Names(vec![s.clone()]),
            serde_yaml::Value::Sequence(v) => Targets::Names(
                v.iter()
                    .map(|x| {
                        x.as_str().map(str::to_owned).context("adapter.target_modules: every entry must be a string")
                    })
                    .collect::<Result<_>>()?,
            ),
            _ => bail!("adapter.target_modules must be a list of module names or \"all-linear\""),
        };
        if let (true, Targets::Names(names)) = (self.use_dora, &targets) {
            const LINEAR: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
            if let Some(bad) = names.iter().find(|n| !LINEAR.contains(&n.rsplit('.').next().unwrap_or(n))) {
                bail!(
                    "adapter.use_dora: target `{bad}` is not a linear layer (DoRA adapts {}, or all-linear)",
                    LINEAR.join(", ")
                );
            }
        }
        let cfg = LoraConfig {
            r: self.r,
            alpha: self.lora_alpha,
            dropout: self.lora_dropout,
            targets,
            use_rslora: self.use_rslora,
            use_dora: self.use_dora,
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// The training method.
    pub fn method(&self) -> Result<Method> {
        match self.method.as_str() {
            "lora" => Ok(Method::Lora),
            "qlora" => Ok(Method::Qlora),
            "full" => Ok(Method::Full),
            "prompt-tuning" | "prompt_tuning" => Ok(Method::PromptTuning),
            "prefix-tuning" | "prefix_tuning" => Ok(Method::PrefixTuning),
            other => bail!("adapter.method `{other}` is unknown (lora, qlora, full, prompt-tuning, prefix-tuning)"),
        }
    }
}

/// Applies `a.b.c=value` to a YAML mapping (the value parsed as YAML: numbers, booleans, lists…).
fn apply_set(root: &mut serde_yaml::Value, set: &str) -> Result<()> {
    let (path, value) = set.split_once('=').with_context(|| format!("--set `{set}`: expected key=value"))?;
    // Values are YAML scalars or flow collections (`[q_proj, v_proj]`); anything else is taken as a string, so
    // that text with ": " in it needs no quoting.
    let value = match serde_yaml::from_str::<serde_yaml::Value>(value) {
        Ok(v @ (serde_yaml::Value::Mapping(_) | serde_yaml::Value::Sequence(_)))
            if !value.trim_start().starts_with(['{', '[']) =>
        {
            let _ = v;
            serde_yaml::Value::String(value.to_owned())
        }
        Ok(v) => v,
        Err(_) => serde_yaml::Value::String(value.to_owned()),
    };
    let mut node = root;
    let keys: Vec<&str> = path.split('.').collect();
    for (i, k) in keys.iter().enumerate() {
        let map = node
            .as_mapping_mut()
            .with_context(|| format!("--set `{set}`: `{}` is not a section", keys[..i].join(".")))?;
        if i + 1 == keys.len() {
            map.insert((*k).into(), value);
            return Ok(());
        }
        node = map.entry((*k).into()).or_insert_with(|| serde_yaml::Value::Mapping(Default::default()));
    }
    Ok(())
}

/// Reads a recipe file and applies `--set` overrides (and `--output-dir`, `--max-steps`).
pub fn load(path: &Path, sets: &[String]) -> Result<Recipe> {
    let text = ferrotune_core::fsx::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    parse(&text, path, sets)
}

/// What a recipe trains: its objective, with the settings of that objective's section.
#[derive(Debug, Clone)]
pub enum Objective {
    /// Supervised fine-tuning (no section).
    Sft,
    /// DPO (`dpo:`).
    Dpo(ferrotune_core::train::dpo::DpoConfig),
    /// ORPO (`orpo:`).
    Orpo(ferrotune_core::train::ref_free::OrpoConfig),
    /// SimPO (`simpo:`).
    Simpo(ferrotune_core::train::ref_free::SimpoConfig),
    /// KTO (`kto:`).
    Kto(ferrotune_core::train::kto::KtoConfig),
    /// A reward model (`reward:`).
    Reward(ferrotune_core::train::reward::RewardConfig),
    /// PPO (`ppo:`).
    Ppo(ferrotune_core::train::ppo_objective::PpoConfig),
    /// GRPO or RLOO (`grpo:` / `rloo:`), run by the alignment service's orchestrator.
    GroupRl(GroupAlgorithm, GroupRlConfig),
}

impl Objective {
    /// `sft`, `dpo`, `reward` or `ppo`: the job kind that runs it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Sft => "sft",
            Self::Dpo(_) => "dpo",
            Self::Orpo(_) => "orpo",
            Self::Simpo(_) => "simpo",
            Self::Kto(_) => "kto",
            Self::Reward(_) => "reward",
            Self::Ppo(_) => "ppo",
            Self::GroupRl(GroupAlgorithm::Grpo, _) => "grpo",
            Self::GroupRl(GroupAlgorithm::Rloo, _) => "rloo",
        }
    }
}

impl Recipe {
    /// The objective the recipe's sections give (at most one of them is present after [`parse`]).
    pub fn objective(&self) -> Objective {
        if let Some(c) = self.orpo {
            return Objective::Orpo(c);
        }
        if let Some(c) = self.simpo {
            return Objective::Simpo(c);
        }
        if let Some(c) = self.kto {
            return Objective::Kto(c);
        }
        match (&self.dpo, &self.reward, &self.ppo, &self.grpo, &self.rloo) {
            (Some(d), ..) => Objective::Dpo(*d),
            (_, Some(r), ..) => Objective::Reward(*r),
            (_, _, Some(p), ..) => Objective::Ppo(p.clone()),
            (_, _, _, Some(g), _) => Objective::GroupRl(GroupAlgorithm::Grpo, g.clone()),
            (.., Some(g)) => Objective::GroupRl(GroupAlgorithm::Rloo, g.clone()),
            _ => Objective::Sft,
        }
    }

    /// Checks the recipe against the `kind` of job asked to run it (`sft`, `dpo`, `reward`, `ppo`) — the one
    /// place that does — and settles its objective: a section of another objective is refused, DPO, reward
    /// and PPO train LoRA or QLoRA adapters only, PPO needs its section (DPO's and reward's default). The
    /// refusal names the field at fault.
    pub fn settle_objective(&mut self, kind: &str) -> std::result::Result<Objective, (&'static str, String)> {
        let lora_only = |r: &Self, what: &str| -> std::result::Result<(), (&'static str, String)> {
            match r.adapter.method().map_err(|e| ("adapter.method", e.to_string()))? {
                Method::Lora | Method::Qlora => Ok(()),
                _ => Err(("adapter.method", format!("`{}`: {what} trains lora or qlora adapters", r.adapter.method))),
            }
        };
        let other = |field: &'static str, how: &str| {
            Err((field, format!("this recipe has a {field} section: run it with {how}")))
        };
        match kind {
            "grpo" | "rloo" => {
                let present = if kind == "grpo" { self.grpo.is_some() } else { self.rloo.is_some() };
                if !present {
                    return Err((
                        if kind == "grpo" { "grpo" } else { "rloo" },
                        format!(
                            "missing: a {} recipe needs a {kind} section with its rewards (see recipes/{kind}.yaml)",
                            kind.to_uppercase()
                        ),
                    ));
                }
                lora_only(self, kind)?;
            }
            _ if self.grpo.is_some() => return other("grpo", "align grpo (AlignmentService.StartGrpo)"),
            _ if self.rloo.is_some() => return other("rloo", "align rloo (AlignmentService.StartRloo)"),
            "ppo" => {
                if self.ppo.is_none() {
                    return Err(("ppo", "missing: a PPO recipe needs a ppo section with its reward (ppo.reward.rule, or ppo.reward.model and ppo.reward.adapter)".into()));
                }
                lora_only(self, "ppo")?;
            }
            _ if self.ppo.is_some() => return other("ppo", "align ppo (AlignmentService.StartPpo)"),
            "dpo" | "orpo" | "simpo" | "kto" | "reward" => {
                // The offline methods default their section; a section of another one is refused.
                for (field, present) in [
                    ("dpo", self.dpo.is_some()),
                    ("orpo", self.orpo.is_some()),
                    ("simpo", self.simpo.is_some()),
                    ("kto", self.kto.is_some()),
                    ("reward", self.reward.is_some()),
                ] {
                    if present && field != kind {
                        let how = if field == "reward" { "train reward".to_owned() } else { format!("align {field}") };
                        return other(field, &how);
                    }
                }
                match kind {
                    "dpo" => drop(self.dpo.get_or_insert_with(Default::default)),
                    "orpo" => drop(self.orpo.get_or_insert_with(Default::default)),
                    "simpo" => drop(self.simpo.get_or_insert_with(Default::default)),
                    "kto" => drop(self.kto.get_or_insert_with(Default::default)),
                    _ => drop(self.reward.get_or_insert_with(Default::default)),
                }
                lora_only(self, kind)?;
            }
            _ if self.dpo.is_some() => return other("dpo", "align dpo (AlignmentService.StartDpo)"),
            _ if self.orpo.is_some() => return other("orpo", "align orpo (AlignmentService.StartOrpo)"),
            _ if self.simpo.is_some() => return other("simpo", "align simpo (AlignmentService.StartSimpo)"),
            _ if self.kto.is_some() => return other("kto", "align kto (AlignmentService.StartKto)"),
            _ if self.reward.is_some() => return other("reward", "train reward (RewardService)"),
            _ => {}
        }
        Ok(self.objective())
    }
}

/// Parses recipe text (`path` names it in errors), applies overrides and validates. Every refusal is the
/// caller's input: INVALID_ARGUMENT unless the chain already knows its kind.
pub fn parse(text: &str, path: &Path, sets: &[String]) -> Result<Recipe> {
    parse_unclassified(text, path, sets).map_err(|e| {
        if ferrotune_core::error::kind_in_chain(e.chain()).is_some() {
            e
        } else {
            anyhow::Error::new(ferrotune_core::CoreError::InvalidArgument(format!("{e:#}")))
        }
    })
}

fn parse_unclassified(text: &str, path: &Path, sets: &[String]) -> Result<Recipe> {
    let mut v: serde_yaml::Value =
        serde_yaml::from_str(text).with_context(|| format!("{}: invalid YAML", path.display()))?;
    for s in sets {
        apply_set(&mut v, s)?;
    }
    let r: Recipe = serde_yaml::from_value(v).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    r.training.validate().with_context(|| format!("{}: training", path.display()))?;
    if let Some(m) = &r.device_map {
        // The form here; the devices where the job runs (they may be another host's).
        ferrotune_core::models::device_map::check_with(m, usize::MAX).with_context(|| format!("{}", path.display()))?;
    }
    if let Some(list) = &r.report_to {
        ferrotune_runtime::tracking::check_report_to(list)
            .map_err(|e| anyhow::anyhow!("{}: report_to: {e}", path.display()))?;
    }
    if let Some(d) = &r.dpo {
        d.validate().with_context(|| format!("{}", path.display()))?;
    }
    if let Some(rw) = &r.reward {
        rw.validate().with_context(|| format!("{}", path.display()))?;
    }
    if let Some(c) = &r.orpo {
        c.validate().with_context(|| format!("{}", path.display()))?;
    }
    if let Some(c) = &r.simpo {
        c.validate().with_context(|| format!("{}", path.display()))?;
    }
    if let Some(c) = &r.kto {
        c.validate().with_context(|| format!("{}", path.display()))?;
    }
    if matches!(r.adapter.method().with_context(|| format!("{}", path.display()))?, Method::Lora | Method::Qlora) {
        r.adapter.lora().with_context(|| format!("{}: adapter", path.display()))?;
    }
    if r.adapter.load_in_4bit && r.adapter.method()? == Method::Full {
        bail!(
            "{}: adapter.load_in_4bit: full fine-tuning trains the weights themselves, which cannot be NF4",
            path.display()
        );
    }
    if matches!(r.adapter.method()?, Method::PromptTuning | Method::PrefixTuning) {
        let n = r.adapter.num_virtual_tokens;
        if !(1..=4096).contains(&n) {
            bail!("{}: adapter.num_virtual_tokens must be in 1..=4096, got {n}", path.display());
        }
        if let Some(h) = r.adapter.encoder_hidden_size.filter(|h| !(1..=65536).contains(h)) {
            bail!("{}: adapter.encoder_hidden_size must be in 1..=65536, got {h}", path.display());
        }
        if r.data.pack {
            bail!("{}: data.pack: packed rows cannot carry virtual tokens (prompt or prefix tuning)", path.display());
        }
    }
    let sections = [
        r.dpo.is_some(),
        r.orpo.is_some(),
        r.simpo.is_some(),
        r.kto.is_some(),
        r.reward.is_some(),
        r.ppo.is_some(),
        r.grpo.is_some(),
        r.rloo.is_some(),
    ];
    if sections.iter().filter(|&&x| x).count() > 1 {
        bail!(
            "{}: a recipe has at most one of the dpo, orpo, simpo, kto, reward, ppo, grpo and rloo sections",
            path.display()
        );
    }
    for (name, g) in [("grpo", &r.grpo), ("rloo", &r.rloo)] {
        if let Some(g) = g {
            g.validate(name).with_context(|| format!("{}", path.display()))?;
            let completions = r.training.micro_batch_size * r.training.gradient_accumulation_steps;
            if !completions.is_multiple_of(g.num_generations) {
                bail!(
                    "{}: training.micro_batch_size × gradient_accumulation_steps ({completions}) completions per step \
                     must be a multiple of {name}.num_generations ({})",
                    path.display(),
                    g.num_generations
                );
            }
        }
    }
    if let Some(p) = &r.ppo {
        p.validate().with_context(|| format!("{}", path.display()))?;
    }
    if r.ppo.is_some() || r.grpo.is_some() || r.rloo.is_some() {
        if r.data.path.is_none() || r.data.dataset.is_some() {
            bail!(
                "{}: online RL reads prompts from data.path (a JSONL file with `prompt` or `messages`), not data.dataset",
                path.display()
            );
        }
        return Ok(r);
    }
    if r.data.eval_path.is_some() {
        bail!(
            "{}: data.eval_path is for PPO prompt files (use data.eval_fraction to hold out formatted records)",
            path.display()
        );
    }
    match (&r.data.path, &r.data.dataset, &r.data.format) {
        (Some(_), None, Some(_)) | (None, Some(_), _) => {}
        (Some(_), None, None) => bail!("{}: data.format is required with data.path", path.display()),
        _ => bail!(
            "{}: set exactly one of data.path (raw records) and data.dataset (a formatted dataset dir)",
            path.display()
        ),
    }
    Ok(r)
}

impl Recipe {
    /// Resolves the recipe's paths under the artifact root (a model given by a known name is left for the
    /// registry); the device is the service's.
    pub fn resolve_paths(&mut self, root: &ferrotune_runtime::ArtifactRoot, device: &str) -> Result<(), tonic::Status> {
        if !ferrotune_core::registry::is_known(&self.model) {
            self.model = root.resolve("model", &self.model)?.display().to_string();
        }
        let s = |p: &PathBuf| p.to_string_lossy().into_owned();
        if let Some(p) = &self.data.path {
            self.data.path = Some(root.resolve("data.path", &s(p))?);
        }
        if let Some(p) = &self.data.dataset {
            self.data.dataset = Some(root.resolve("data.dataset", &s(p))?);
        }
        if let Some(p) = &self.data.eval_path {
            self.data.eval_path = Some(root.resolve("data.eval_path", &s(p))?);
        }
        self.output_dir = root.resolve("output_dir", &s(&self.output_dir))?;
        if let Some(t) = &self.chat_template {
            if t.contains('/') || t.ends_with(".jinja") {
                self.chat_template = Some(root.resolve("chat_template", t)?.display().to_string());
            }
        }
        self.device = device.to_owned();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(extra: &[&str]) -> Recipe {
        let yaml =
            "model: m\noutput_dir: out\nadapter: {method: lora, r: 4}\ndata: {path: d.jsonl, format: messages}\n";
        let sets: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        parse(yaml, Path::new("r.yaml"), &sets).unwrap()
    }

    #[test]
    fn a_device_map_is_read_in_transformers_form_and_a_bad_one_names_the_recipe() {
        let yaml =
            "model: m\noutput_dir: out\nadapter: {method: lora, r: 4}\ndata: {path: d.jsonl, format: messages}\n\
                    device_map: {model.embed_tokens: 0, model.layers: cuda:1, model.norm: 1, lm_head: cpu}\n";
        let r = parse(yaml, Path::new("r.yaml"), &[]).unwrap();
        let m = r.device_map.unwrap();
        assert_eq!((m["model.layers"].as_str(), m["model.embed_tokens"].as_i64()), (Some("cuda:1"), Some(0)));
        assert_eq!(recipe(&["device_map=auto"]).device_map.unwrap(), "auto");
        let e = parse(yaml, Path::new("r.yaml"), &["device_map=[gpu0]".into()]).unwrap_err();
        let e = format!("{e:#}");
        assert!(e.contains("r.yaml") && e.contains("device_map") && e.contains("gpu0"), "{e}");
    }

    #[test]
    fn one_place_settles_the_objective_for_the_job_that_runs_it() {
        assert_eq!(recipe(&[]).settle_objective("sft").unwrap().name(), "sft");
        assert_eq!(recipe(&[]).settle_objective("dpo").unwrap().name(), "dpo", "dpo defaults its section");
        assert_eq!(recipe(&[]).settle_objective("reward").unwrap().name(), "reward");
        let (field, msg) = recipe(&[]).settle_objective("ppo").unwrap_err();
        assert!(field == "ppo" && msg.starts_with("missing"), "{field}: {msg}");
        let (field, msg) = recipe(&["dpo.beta=0.2"]).settle_objective("sft").unwrap_err();
        assert!(field == "dpo" && msg.contains("align dpo"), "{field}: {msg}");
        let (field, msg) = recipe(&["adapter.method=full"]).settle_objective("dpo").unwrap_err();
        assert!(field == "adapter.method" && msg.contains("lora or qlora"), "{field}: {msg}");
        let r = recipe(&["dpo.beta=0.2"]);
        assert!(matches!(r.objective(), Objective::Dpo(c) if c.beta == 0.2));
        for kind in ["orpo", "simpo", "kto"] {
            assert_eq!(recipe(&[]).settle_objective(kind).unwrap().name(), kind, "{kind} defaults its section");
        }
        let (field, msg) = recipe(&["orpo.beta=0.2"]).settle_objective("dpo").unwrap_err();
        assert!(field == "orpo" && msg.contains("align orpo"), "{field}: {msg}");
        let (field, msg) = recipe(&["kto.beta=0.2"]).settle_objective("sft").unwrap_err();
        assert!(field == "kto" && msg.contains("align kto"), "{field}: {msg}");
        assert!(matches!(recipe(&["simpo.simpo_gamma=1.5"]).objective(), Objective::Simpo(c) if c.simpo_gamma == 1.5));
        let yaml = "model: m\noutput_dir: out\nadapter: {method: lora}\ndata: {path: d.jsonl, format: unpaired}\n";
        let e = format!("{:#}", parse(yaml, Path::new("r.yaml"), &["kto.desirable_weight=0".into()]).unwrap_err());
        assert!(e.contains("kto.desirable_weight must be positive"), "{e}");
        let e = format!("{:#}", parse(yaml, Path::new("r.yaml"), &["kto.loss_type=bco".into()]).unwrap_err());
        assert!(e.contains("bco") && e.contains("apo_zero_unpaired"), "{e}");
    }

    #[test]
    fn report_to_and_tracking_settings() {
        let r = recipe(&["report_to=[mlflow,tensorboard]", "tracking.experiment_name=exp", "run_name=r1"]);
        assert_eq!(r.report_to, Some(vec!["mlflow".to_owned(), "tensorboard".to_owned()]));
        assert_eq!(r.tracking.unwrap().experiment_name.as_deref(), Some("exp"));
        let yaml = "model: m\noutput_dir: out\nadapter: {method: lora}\ndata: {path: d.jsonl, format: messages}\n";
        let e = format!("{:#}", parse(yaml, Path::new("r.yaml"), &["report_to=[wandb]".into()]).unwrap_err());
        assert!(e.contains("report_to") && e.contains("unknown tracker `wandb`"), "{e}");
        let e = format!("{:#}", parse(yaml, Path::new("r.yaml"), &["tracking.experiment=x".into()]).unwrap_err());
        assert!(e.contains("experiment"), "{e}");
    }

    #[test]
    fn optimizer_names_and_loraplus() {
        let r = recipe(&["training.optim=paged_adamw_32bit", "training.loraplus_lr_ratio=16"]);
        assert_eq!(r.training.optim, ferrotune_core::train::optim::OptimName::PagedAdamw32bit);
        assert_eq!(r.training.loraplus_lr_ratio, Some(16.0));
        let yaml = "model: m\noutput_dir: out\nadapter: {method: lora}\ndata: {path: d.jsonl, format: messages}\n";
        let e = format!("{:#}", parse(yaml, Path::new("r.yaml"), &["training.optim=sgd_magic".into()]).unwrap_err());
        assert!(e.contains("sgd_magic") && e.contains("paged_adamw_32bit"), "{e}");
        let e =
            format!("{:#}", parse(yaml, Path::new("r.yaml"), &["training.loraplus_lr_ratio=-1".into()]).unwrap_err());
        assert!(e.contains("loraplus_lr_ratio"), "{e}");
    }

    #[test]
    fn group_rl_sections() {
        let yaml = "model: m\noutput_dir: out\nadapter: {method: lora, r: 4}\ndata: {path: p.jsonl}\n\
                    training: {micro_batch_size: 4}\n\
                    grpo: {num_generations: 4, rewards: [{rule: 'regex:^A', weight: 0.5, name: starts}, {model: rm, adapter: rm/a}]}\n";
        let mut r = parse(yaml, Path::new("g.yaml"), &[]).unwrap();
        let Objective::GroupRl(GroupAlgorithm::Grpo, g) = r.settle_objective("grpo").unwrap() else { panic!() };
        assert_eq!((g.rewards.len(), g.rewards[0].weight, g.rewards[1].weight), (2, 0.5, 1.0));
        assert_eq!(g.rewards[0].name.as_deref(), Some("starts"));
        assert_eq!(r.settle_objective("sft").unwrap_err().0, "grpo");
        let err = |y: &str| format!("{:#}", parse(y, Path::new("g.yaml"), &[]).unwrap_err());
        let e = err(&yaml.replace("num_generations: 4", "num_generations: 1"));
        assert!(e.contains("grpo.num_generations must be in 2..=64"), "{e}");
        let e = err(&yaml.replace("num_generations: 4", "num_generations: 3"));
        assert!(e.contains("must be a multiple of grpo.num_generations"), "{e}");
        let e = err(&yaml.replace("rule: 'regex:^A'", "rulez: 'x'"));
        assert!(e.contains("rulez") || e.contains("rewards[0]"), "{e}");
        let e = err(&yaml.replace("rewards: [", "loss_type: magic, rewards: ["));
        assert!(e.contains("magic"), "{e}");
    }
}
