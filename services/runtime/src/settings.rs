//! Layered configuration with the `config` crate: embedded defaults → a YAML file (`ferrotune.yaml` in
//! the working directory, or `--config PATH`) → `FERROTUNE__…` environment variables (double underscore
//! between levels, e.g. `FERROTUNE__POLICY__DEVICE=cuda:0`, `FERROTUNE__ENDPOINTS__POLICY=http://h:50051`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The embedded defaults (also the documented reference of every key).
pub const DEFAULTS: &str = include_str!("defaults.yaml");

/// Everything a service or the CLI reads from configuration.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Address `ferrotune serve` listens on (port 0 = any free port).
    pub listen: String,
    /// Every path in a request is resolved under, and confined to, this directory.
    pub artifact_root: PathBuf,
    /// Services `ferrotune serve` hosts when `--services` is not given.
    pub services: Vec<String>,
    /// Where the CLI finds remote services; a service without an endpoint runs embedded.
    pub endpoints: Endpoints,
    /// Bearer-token authentication.
    pub auth: Auth,
    /// TLS for servers (cert + key) and clients (ca).
    pub tls: Tls,
    /// Logs and traces.
    pub telemetry: Telemetry,
    /// Request limits.
    pub limits: Limits,
    /// The job store.
    pub jobs: Jobs,
    /// The policy service's device and models.
    pub policy: Policy,
    /// The reward service's device, models and batching.
    pub reward: RewardSettings,
    /// How CPU threads wait.
    pub cpu: Cpu,
    /// Experiment tracking (MLflow, TensorBoard) of every job.
    pub tracking: crate::tracking::TrackingSettings,
    /// Prometheus metrics of `serve`.
    pub metrics: MetricsSettings,
    /// The web dashboard of `serve`.
    pub http: HttpSettings,
}

/// The web dashboard.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// `host:port` where `serve` answers the dashboard and its JSON API (unset: none; port 0 = any free port).
    /// With `auth.token` set every request needs it.
    pub listen: Option<String>,
}

/// Prometheus metrics.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsSettings {
    /// `host:port` where `serve` answers `GET /metrics` (unset: no metrics endpoint; port 0 = any free port).
    pub listen: Option<String>,
}

/// CPU scheduling of the process.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cpu {
    /// `passive`: idle OpenMP threads sleep at once; `active`: they spin first (GNU OpenMP's default),
    /// which is faster alone but steals cores from other processes on a shared host. Applied at start
    /// (`OMP_WAIT_POLICY`, which the environment may set itself).
    pub wait_policy: String,
}

/// Reward service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSettings {
    /// `cpu`, `cuda` or `cuda:N` (reward training jobs run here too).
    pub device: String,
    /// Weights dtype for scoring: f32, bf16 or f16.
    pub dtype: String,
    /// Loaded reward models kept in memory.
    pub max_loaded_models: usize,
    /// Dynamic batching: most items scored together (1 = off).
    pub max_batch_size: usize,
    /// Dynamic batching: longest wait for more calls after the first, in milliseconds.
    pub max_wait_ms: u64,
    /// CPU threads for scoring and reward training (0 = the CPUs this process may use).
    pub threads: usize,
}

/// Remote endpoints (`http://host:port` or `https://…`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoints {
    /// DataService.
    pub data: Option<String>,
    /// PolicyService.
    pub policy: Option<String>,
    /// MergeService.
    pub merge: Option<String>,
    /// RewardService replicas (the first is used by `train reward`; alignment balances over all).
    #[serde(default)]
    pub reward: Vec<String>,
    /// AlignmentService (its own process; unset = where the policy runs).
    pub alignment: Option<String>,
}

/// Authentication.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// When set, every call (health excepted) needs `authorization: Bearer <token>`; the CLI sends it.
    pub token: Option<String>,
}

/// TLS (rustls).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// Server certificate chain (PEM).
    pub cert: Option<PathBuf>,
    /// Server private key (PEM).
    pub key: Option<PathBuf>,
    /// CA certificate the CLI trusts for https endpoints (PEM).
    pub ca: Option<PathBuf>,
}

/// Telemetry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Telemetry {
    /// OTLP/gRPC collector, e.g. http://127.0.0.1:4317; traces are exported only when set.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported spans.
    pub service_name: String,
    /// Log filter (tracing EnvFilter syntax), e.g. `info` or `ferrotune=debug`.
    pub log: String,
    /// Seconds between OTLP metrics exports (`serve`, with `otlp_endpoint`).
    pub otlp_metrics_interval_s: u64,
}

/// Limits applied by every server.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request message in bytes.
    pub max_message_bytes: usize,
    /// Unary calls (and stream set-up) taking longer are cut with DEADLINE_EXCEEDED.
    pub request_timeout_s: u64,
    /// Calls in flight in the process; more are shed (RESOURCE_EXHAUSTED at once; health checks never).
    pub concurrency: usize,
    /// Longest text of one record in data formatting (longer records are reported and skipped), of a
    /// Tokenize call, a Generate prompt or a Score item (RESOURCE_EXHAUSTED), in bytes.
    pub max_text_bytes: usize,
}

/// Job store.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Jobs {
    /// SQLite file (default `<artifact_root>/.ferrotune/jobs.sqlite`; a relative path is under the root).
    pub db: Option<PathBuf>,
    /// Resume jobs that were running when the service last stopped.
    pub resume_on_start: bool,
}

/// Policy service.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// `cpu`, `cuda` or `cuda:N`.
    pub device: String,
    /// The models' layers placed across several devices of this process (transformers' `device_map`, for a
    /// model that does not fit one): `auto`, a list of devices, or module name → device. Generation,
    /// log-probs and recipe jobs that set none of their own use it. Null: everything on `device`.
    #[serde(default)]
    pub device_map: Option<serde_json::Value>,
    /// Several devices (all `cpu`, or distinct `cuda:N`): recipe jobs (SFT, DPO, ORPO, SimPO, KTO) run
    /// data-parallel, one rank per device; generation and sessions stay on `device`. Empty or one: off.
    #[serde(default)]
    pub devices: Vec<String>,
    /// Weights dtype for generation and log-probs: f32, bf16 or f16.
    pub dtype: String,
    /// Loaded (model, adapter) pairs kept in memory.
    pub max_loaded_models: usize,
    /// A model (known name or path under the artifact root) loaded at start; health is NOT_SERVING until
    /// it is.
    pub preload: Option<String>,
    /// Most tokens one generation call may ask for: prompts × max_new_tokens (beyond: RESOURCE_EXHAUSTED).
    pub max_generated_tokens: usize,
    /// CPU threads for generation, log-probs and training jobs (0 = the CPUs this process may use).
    pub threads: usize,
    /// Training sessions open at once.
    pub max_sessions: usize,
    /// Seconds after which an unused session is closed.
    pub session_idle_s: u64,
}

impl Settings {
    /// Defaults, then `file` (or `./ferrotune.yaml` when it exists), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut b = config::Config::builder().add_source(config::File::from_str(DEFAULTS, config::FileFormat::Yaml));
        match file {
            Some(f) => {
                if !f.is_file() {
                    anyhow::bail!("config file {} not found", f.display());
                }
                b = b.add_source(config::File::from(f).format(config::FileFormat::Yaml));
            }
            None if Path::new("ferrotune.yaml").is_file() => {
                b = b.add_source(config::File::with_name("ferrotune.yaml").format(config::FileFormat::Yaml));
            }
            None => {}
        }
        let env = config::Environment::with_prefix("FERROTUNE")
            .prefix_separator("__")
            .separator("__")
            .list_separator(",")
            .with_list_parse_key("services")
            .with_list_parse_key("endpoints.reward")
            .with_list_parse_key("policy.devices")
            .try_parsing(true);
        let cfg = b.add_source(env).build().map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
        let s: Settings = cfg.try_deserialize().map_err(|e| anyhow::anyhow!("configuration: {e}"))?;
        s.validate()?;
        Ok(s)
    }

    /// A server that hosts reward (`hosts_reward`) at `url` scores its own policy's PPO rollouts when no reward
    /// replicas are configured (plaintext only: the reward pool does not speak TLS).
    pub fn score_on_self(&mut self, hosts_reward: bool, url: String) {
        if hosts_reward && self.endpoints.reward.is_empty() && self.tls.cert.is_none() {
            self.endpoints.reward = vec![url.clone()];
        }
    }

    /// Points `endpoints.policy` at this server (over loopback) when it hosts the policy and none is set,
    /// so that a co-hosted alignment orchestrator drives the local policy through the same client code.
    pub fn policy_on_self(&mut self, hosts_policy: bool, url: String) {
        if hosts_policy && self.endpoints.policy.is_none() && self.tls.cert.is_none() {
            self.endpoints.policy = Some(url);
        }
    }

    /// Rejects values no service can run with.
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.limits.max_message_bytes < 1024 {
            anyhow::bail!("configuration: limits.max_message_bytes must be at least 1024");
        }
        if self.telemetry.otlp_metrics_interval_s == 0 {
            anyhow::bail!("configuration: telemetry.otlp_metrics_interval_s must be positive");
        }
        if self.limits.concurrency == 0 || self.limits.request_timeout_s == 0 {
            anyhow::bail!("configuration: limits.concurrency and limits.request_timeout_s must be positive");
        }
        if self.reward.max_loaded_models == 0 || self.reward.max_batch_size == 0 {
            anyhow::bail!("configuration: reward.max_loaded_models and reward.max_batch_size must be positive");
        }
        if self.policy.max_loaded_models == 0 || self.policy.max_sessions == 0 || self.policy.session_idle_s == 0 {
            anyhow::bail!(
                "configuration: policy.max_loaded_models, policy.max_sessions and policy.session_idle_s must be positive"
            );
        }
        if !["passive", "active"].contains(&self.cpu.wait_policy.as_str()) {
            anyhow::bail!("configuration: cpu.wait_policy must be passive or active, not `{}`", self.cpu.wait_policy);
        }
        if self.policy.threads > 1024 || self.reward.threads > 1024 {
            anyhow::bail!("configuration: policy.threads and reward.threads must be at most 1024 (0 = all CPUs)");
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            anyhow::bail!("configuration: tls.cert and tls.key go together");
        }
        self.tracking.validate()?;
        for s in &self.services {
            if !KNOWN_SERVICES.contains(&s.as_str()) {
                anyhow::bail!("configuration: unknown service `{s}` (known: {})", KNOWN_SERVICES.join(", "));
            }
        }
        Ok(())
    }

    /// The job database path.
    pub fn jobs_db(&self, root: &Path) -> PathBuf {
        self.jobs.db.as_ref().map(|d| root.join(d)).unwrap_or_else(|| root.join(".ferrotune").join("jobs.sqlite"))
    }
}

/// Services a server can host.
pub const KNOWN_SERVICES: &[&str] = &["data", "policy", "merge", "reward", "alignment"];

/// The services a server hosts for a `services` list: AlignmentService comes with the policy (DPO and PPO
/// are policy jobs started through it), so `policy` implies `alignment`.
/// AlignmentService is hosted last, once the services whose jobs it starts are registered.
pub fn hosted_services(services: &[String]) -> Vec<String> {
    let mut out: Vec<String> = services.iter().filter(|s| *s != "alignment").cloned().collect();
    if services.iter().any(|s| s == "policy" || s == "alignment") {
        out.push("alignment".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_env_overrides_them() {
        let d = Settings::load(None).unwrap();
        assert_eq!(d.policy.device, "cpu");
        assert!(d.endpoints.policy.is_none());
        // Env layering is process-global; set variables unique to this test.
        // SAFETY: this test is the only one touching these variables.
        unsafe {
            std::env::set_var("FERROTUNE__POLICY__MAX_LOADED_MODELS", "5");
            std::env::set_var("FERROTUNE__ENDPOINTS__MERGE", "http://10.0.0.1:7000");
            std::env::set_var("FERROTUNE__ENDPOINTS__REWARD", "http://a:1,http://b:2");
        }
        let s = Settings::load(None).unwrap();
        unsafe {
            std::env::remove_var("FERROTUNE__POLICY__MAX_LOADED_MODELS");
            std::env::remove_var("FERROTUNE__ENDPOINTS__MERGE");
            std::env::remove_var("FERROTUNE__ENDPOINTS__REWARD");
        }
        assert_eq!(s.policy.max_loaded_models, 5);
        assert_eq!(s.endpoints.merge.as_deref(), Some("http://10.0.0.1:7000"));
        assert_eq!(s.endpoints.reward, vec!["http://a:1", "http://b:2"], "a comma-separated list of replicas");
    }

    #[test]
    fn file_layer_and_bad_values() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "policy:\n  device: cuda:1\nservices: [policy]\n").unwrap();
        let s = Settings::load(Some(&f)).unwrap();
        assert_eq!(s.policy.device, "cuda:1");
        assert_eq!(s.policy.dtype, "f32", "untouched keys keep their defaults");
        assert_eq!(s.services, vec!["policy"]);
        assert_eq!(s.policy.device_map, None);
        // transformers' form keeps its dotted module names as keys.
        std::fs::write(&f, "policy:\n  device_map: {model.embed_tokens: 0, model.layers.1: cuda:1, lm_head: 1}\n")
            .unwrap();
        let m = Settings::load(Some(&f)).unwrap().policy.device_map.unwrap();
        assert_eq!(m, serde_json::json!({"model.embed_tokens": 0, "model.layers.1": "cuda:1", "lm_head": 1}));
        std::fs::write(&f, "policy:\n  device_map: [cuda:0, cuda:1]\n").unwrap();
        let m = Settings::load(Some(&f)).unwrap().policy.device_map.unwrap();
        assert_eq!(m, serde_json::json!(["cuda:0", "cuda:1"]));
        std::fs::write(&f, "services: [policy, rewrd]\n").unwrap();
        assert!(Settings::load(Some(&f)).unwrap_err().to_string().contains("unknown service `rewrd`"));
        std::fs::write(&f, "polcy: {}\n").unwrap();
        assert!(Settings::load(Some(&f)).unwrap_err().to_string().contains("polcy"));
        assert!(Settings::load(Some(&dir.path().join("missing.yaml"))).is_err());
    }
}
