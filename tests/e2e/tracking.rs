//! Experiment tracking against the real thing: an `mlflow server` (MLflow 3.17 from PyPI, made by
//! `make tracking-venv`) on loopback receives tiny-model SFT runs, read back through MLflow's REST API, and
//! TensorBoard's own event reader loads the event files. The server is down while the first run trains
//! (the CLI run succeeds, keeps its calls in the outbox, `tracking sync` delivers them), and is killed in the
//! middle of a served run (the job succeeds; its metrics arrive once the server is back).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrotune_runtime::tracking::http::{self, Body, Endpoint};
use ferrotune_tests::{ferrotune_bin, repo, run_cli_env, tiny_chat_in, Server};
use serde_json::Value;

fn tracking_venv() -> PathBuf {
    let v = std::env::var("FERROTUNE_TRACKING_VENV").map(PathBuf::from).unwrap_or_else(|_| {
        let cache = std::env::var("FERROTUNE_CACHE")
            .map(PathBuf::from)
            .unwrap_or_else(|_| Path::new(&std::env::var("HOME").unwrap()).join(".cache/ferrotune"));
        cache.join("tracking-venv")
    });
    assert!(v.join("bin/mlflow").exists(), "no MLflow in {} (make tracking-venv makes it)", v.display());
    v
}

/// An `mlflow server` child (its own process group, killed with it).
struct Mlflow {
    child: Child,
    ep: Endpoint,
}

impl Mlflow {
    fn start(dir: &Path, port: u16) -> Self {
        use std::os::unix::process::CommandExt;
        let child = Command::new(tracking_venv().join("bin/mlflow"))
            .args(["server", "--host", "127.0.0.1", "--port", &port.to_string(), "--workers", "1"])
            .arg("--backend-store-uri")
            .arg(format!("sqlite:///{}", dir.join("mlflow.db").display()))
            .arg("--artifacts-destination")
            .arg(dir.join("artifacts"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join(format!("server-{}.log", now_ms()))).unwrap())
            .process_group(0)
            .spawn()
            .expect("start mlflow server");
        let m = Self { child, ep: Endpoint::parse(&format!("http://127.0.0.1:{port}")).unwrap() };
        let start = Instant::now();
        while http::request(&m.ep, "GET", "/health", None, Body::Empty).map(|r| r.status).ok() != Some(200) {
            assert!(start.elapsed() < Duration::from_secs(120), "mlflow server did not come up");
            std::thread::sleep(Duration::from_millis(200));
        }
        m
    }

    fn get(&self, path: &str) -> Value {
        let r = http::request(&self.ep, "GET", path, None, Body::Empty).expect("mlflow reachable");
        r.json()
    }

    /// The run of `out` (its `mlflow/run.json`).
    fn run_of(&self, out: &Path) -> Value {
        let id: Value = serde_json::from_str(&std::fs::read_to_string(out.join("mlflow/run.json")).unwrap()).unwrap();
        self.get(&format!("/api/2.0/mlflow/runs/get?run_id={}", id["run_id"].as_str().unwrap()))["run"].clone()
    }

    fn history(&self, run_id: &str, key: &str) -> Vec<(i64, f64)> {
        let h =
            self.get(&format!("/api/2.0/mlflow/metrics/get-history?run_id={run_id}&metric_key={key}&max_results=5000"));
        let mut v: Vec<(i64, f64)> = h["metrics"]
            .as_array()
            .map(|a| a.iter().map(|m| (m["step"].as_i64().unwrap(), m["value"].as_f64().unwrap())).collect())
            .unwrap_or_default();
        v.sort_by_key(|p| p.0);
        v
    }

    fn kill(&mut self) {
        let _ = Command::new("kill").args(["-KILL", "--", &format!("-{}", self.child.id())]).status();
        let _ = self.child.wait();
    }
}

impl Drop for Mlflow {
    fn drop(&mut self) {
        self.kill();
    }
}

fn now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// (step, loss) of every line of `metrics.jsonl`.
fn losses(out: &Path) -> Vec<(i64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["step"].as_i64().unwrap(), v["loss"].as_f64().unwrap())
        })
        .collect()
}

fn recipe(root: &Path, out: &str, steps: u32) -> PathBuf {
    std::fs::copy(repo("recipes/data/pirate-train.jsonl"), root.join("pirate-train.jsonl")).unwrap();
    let model = tiny_chat_in(root);
    let text = format!(
        "model: {model}\nadapter: {{method: lora, r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}}\n\
         data: {{path: pirate-train.jsonl, format: messages, max_seq_len: 256}}\n\
         training: {{learning_rate: 1.0e-3, max_steps: {steps}, micro_batch_size: 1, save_steps: 0, seed: 7}}\n\
         output_dir: {out}\nreport_to: [mlflow, tensorboard]\nrun_name: {}\n\
         tracking: {{experiment_name: e2e-tracking, register_model: tiny-pirate}}\n",
        out.replace('/', "-")
    );
    let p = root.join(format!("{}.yaml", out.replace('/', "-")));
    std::fs::write(&p, text).unwrap();
    p
}

/// Waits up to 120 s for `pred`.
fn eventually(what: &str, pred: impl Fn() -> bool) {
    let start = Instant::now();
    while !pred() {
        assert!(start.elapsed() < Duration::from_secs(120), "{what}: not within 120 s");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The MLflow run of `out` holds every step of its `metrics.jsonl`, its artifacts and its end status.
fn check_run(m: &Mlflow, out: &Path, steps: usize) {
    let local = losses(out);
    assert_eq!(local.len(), steps);
    let run = m.run_of(out);
    let id = run["info"]["run_id"].as_str().unwrap().to_owned();
    eventually("the run's last calls", || {
        m.run_of(out)["info"]["status"] == "FINISHED" && m.history(&id, "loss").len() == steps
    });
    assert_eq!(m.history(&id, "loss"), local, "MLflow's loss history is metrics.jsonl's, step for step");
    let run = m.run_of(out);
    let tags: Vec<(String, String)> = run["data"]["tags"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["key"].as_str().unwrap().into(), t["value"].as_str().unwrap().into()))
        .collect();
    for (k, v) in
        [("ferrotune.job_kind", "sft"), ("ferrotune.adapter_method", "lora"), ("ferrotune.base_model", "tiny-chat")]
    {
        assert!(tags.iter().any(|(a, b)| a == k && b.ends_with(v)), "tag {k}=…{v} missing: {tags:?}");
    }
    let params = run["data"]["params"].as_array().unwrap();
    let param = |k: &str| params.iter().find(|p| p["key"] == k).map(|p| p["value"].as_str().unwrap().to_owned());
    assert_eq!(param("training.max_steps"), Some(steps.to_string()));
    assert_eq!(param("adapter.method").as_deref(), Some("lora"));
    let listed = m.get(&format!("/api/2.0/mlflow/artifacts/list?run_id={id}&path=adapter"));
    let size = |name: &str| {
        listed["files"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["path"] == format!("adapter/{name}"))
            .map(|f| f["file_size"].as_u64().unwrap())
    };
    let local_size = std::fs::metadata(out.join("adapter_model.safetensors")).unwrap().len();
    assert_eq!(size("adapter_model.safetensors"), Some(local_size), "{listed}");
    assert!(size("adapter_config.json").is_some(), "{listed}");
    let root = m.get(&format!("/api/2.0/mlflow/artifacts/list?run_id={id}"));
    for f in ["loss.svg", "metrics.jsonl", "stats.json"] {
        assert!(root["files"].as_array().unwrap().iter().any(|x| x["path"] == f), "{f} not uploaded: {root}");
    }
    let versions = m.get("/api/2.0/mlflow/model-versions/search?filter=name%3D%27tiny-pirate%27");
    assert!(
        versions["model_versions"].as_array().unwrap().iter().any(|v| v["run_id"] == id.as_str()),
        "no registered version from run {id}: {versions}"
    );
}

/// TensorBoard's EventAccumulator reads `out/runs`; its loss scalars are metrics.jsonl's (as f32).
fn check_tensorboard(out: &Path) {
    let py = tracking_venv().join("bin/python");
    let script =
        "import json,sys\nfrom tensorboard.backend.event_processing.event_accumulator import EventAccumulator\n\
        ea=EventAccumulator(sys.argv[1]); ea.Reload()\n\
        print(json.dumps({'loss':[[e.step,e.value] for e in ea.Scalars('loss')],'tensors':ea.Tags()['tensors']}))";
    let o = Command::new(py).args(["-c", script]).arg(out.join("runs")).output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    let tb: Vec<(i64, f64)> =
        v["loss"].as_array().unwrap().iter().map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap())).collect();
    let local = losses(out);
    assert_eq!(tb.len(), local.len());
    for ((s1, a), (s2, b)) in tb.iter().zip(&local) {
        assert_eq!(s1, s2);
        assert!((a - b).abs() <= 1e-6 * b.abs(), "step {s1}: {a} vs {b}");
    }
    assert_eq!(v["tensors"], serde_json::json!(["recipe"]));
}

#[test]
fn tracking_mlflow_and_tensorboard_survive_a_tracking_server_outage() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let ml = tempfile::tempdir().unwrap();
    let port = free_port();
    let uri = format!("http://127.0.0.1:{port}");
    let env = [("MLFLOW_TRACKING_URI", uri.as_str())];

    // 1. The server is not there: the CLI's run succeeds, warns, and keeps its calls in the outbox.
    let r = recipe(&root, "runs/a", 6);
    let started = Instant::now();
    let o = run_cli_env(&root, &env, &["train", "sft", "--recipe", r.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "an unreachable tracker slowed the run");
    assert!(err.contains("tracking sync"), "{err}");
    let outbox = root.join("runs/a/mlflow/outbox.json");
    assert!(outbox.exists(), "{err}");
    check_tensorboard(&root.join("runs/a"));

    // 2. The server comes up; `tracking sync` delivers the run.
    let mut m = Mlflow::start(ml.path(), port);
    let o = run_cli_env(&root, &env, &["tracking", "sync", "runs/a"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(!outbox.exists(), "the outbox is emptied once sent");
    check_run(&m, &root.join("runs/a"), 6);

    // 3. A served job: the server is killed mid-run, the job succeeds, the rest arrives once it is back.
    let policy = Server::start("policy", &root, &env);
    let r = recipe(&root, "runs/b", 400);
    let cli = Command::new(ferrotune_bin())
        .args(["train", "sft", "--recipe", r.to_str().unwrap(), "--json"])
        .current_dir(&root)
        .env("FERROTUNE__ENDPOINTS__POLICY", &policy.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = root.join("runs/b");
    eventually("the served run's first metrics in MLflow", || {
        out.join("mlflow/run.json").exists()
            && !m.history(m.run_of(&out)["info"]["run_id"].as_str().unwrap(), "loss").is_empty()
    });
    m.kill();
    let at_kill = losses(&out).len();
    let o = cli.wait_with_output().unwrap();
    assert!(o.status.success(), "the job failed with MLflow down: {}", String::from_utf8_lossy(&o.stderr));
    assert!(at_kill < 400, "the run ended before the server was killed");
    let m = Mlflow::start(ml.path(), port);
    check_run(&m, &out, 400);
    check_tensorboard(&out);
    let first: Value = serde_json::from_str(String::from_utf8_lossy(&o.stdout).lines().next().unwrap()).unwrap();
    let id = first["job_id"].as_str().expect("the job id line").to_owned();
    let penv = [("FERROTUNE__ENDPOINTS__POLICY", policy.url.as_str())];
    let w = run_cli_env(&root, &penv, &["jobs", "watch", &id, "--json"]);
    let w = String::from_utf8_lossy(&w.stdout);
    assert!(w.contains("unreachable"), "the outage is not in the job's log: {w}");

    // 4. A pipeline: its own run, the parent of its stages' runs, with the eval numbers and a registered
    //    version of its merged model.
    recipe(&root, "runs/unused", 3);
    std::fs::copy(repo("recipes/data/pirate-eval.jsonl"), root.join("pirate-eval.jsonl")).unwrap();
    let pipeline = "name: pl\noutput_dir: runs/pl\nreport_to: [mlflow]\nexperiment_name: e2e-pipeline\nstages:\n  \
        sft: {kind: sft, recipe: runs-unused.yaml}\n  \
        merged: {kind: merge, model: tiny-chat, adapter: '${sft.adapter}', register_model: tiny-merged}\n  \
        eval: {kind: eval, model: '${merged.model}', prompts: pirate-eval.jsonl, max_new_tokens: 4, rules: {ahoy: 'regex:^Ahoy'}}\n";
    std::fs::write(root.join("pl.yaml"), pipeline).unwrap();
    let o = run_cli_env(&root, &env, &["pipeline", "run", "pl.yaml"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let parent = m.run_of(&root.join("runs/pl"));
    let parent_id = parent["info"]["run_id"].as_str().unwrap().to_owned();
    eventually("the pipeline run's end", || m.run_of(&root.join("runs/pl"))["info"]["status"] == "FINISHED");
    assert_eq!(m.history(&parent_id, "eval/ahoy").len(), 1, "the eval number is a metric of the pipeline's run");
    let child = m.run_of(&root.join("runs/pl/sft"));
    let tag = |r: &Value, k: &str| {
        r["data"]["tags"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["key"] == k)
            .map(|t| t["value"].as_str().unwrap().to_owned())
    };
    assert_eq!(tag(&child, "mlflow.parentRunId"), Some(parent_id.clone()), "the stage's run is nested");
    let versions = m.get("/api/2.0/mlflow/model-versions/search?filter=name%3D%27tiny-merged%27");
    let v = versions["model_versions"].as_array().unwrap().iter().find(|v| v["run_id"] == parent_id.as_str()).cloned();
    let v = v.unwrap_or_else(|| panic!("no version of tiny-merged from the pipeline run: {versions}"));
    assert!(v["source"].as_str().unwrap().ends_with("/merged"), "{v}");
    let listed = m.get(&format!("/api/2.0/mlflow/artifacts/list?run_id={parent_id}&path=merged"));
    assert!(listed.to_string().contains("merged/model.safetensors"), "{listed}");
}
