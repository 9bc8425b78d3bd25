//! Helpers for the end-to-end tests: run the real `ferrotune` binary (built by `make build`, which
//! `make test` runs first) and get the real default model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

/// The `ferrotune` binary of the same profile as the running test (`target/<profile>/ferrotune`).
pub fn ferrotune_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/e2e-xxxx → target/<profile>/ferrotune
    let bin = exe.parent().and_then(Path::parent).expect("target dir").join("ferrotune");
    assert!(
        bin.exists(),
        "{} not found: run `make build` (or `cargo build --release -p ferrotune-cli`) first",
        bin.display()
    );
    bin
}

/// Runs `ferrotune ARGS` and returns its output.
pub fn run_cli(args: &[&str]) -> Output {
    Command::new(ferrotune_bin()).args(args).output().expect("run ferrotune")
}

/// Runs `ferrotune ARGS --json`, asserts success, parses stdout.
pub fn run_json(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.push("--json");
    let out = run_cli(&a);
    assert!(out.status.success(), "ferrotune {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("ferrotune {args:?}: bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

/// The default model (SmolLM2-135M-Instruct), pulled once per test process with `ferrotune models pull`.
pub fn smollm2_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let v = run_json(&["models", "pull", "smollm2-135m-instruct"]);
        PathBuf::from(v["path"].as_str().expect("path"))
    })
    .clone()
}

/// The tiny chat model committed under `tests/fixtures/tiny-chat` (SmolLM2's tokenizer cut to 512 ids, its
/// chat template, random weights: 2 layers, hidden 64): the model of the end-to-end plumbing tests, which
/// assert resume equalities, merges and the services, not learning.
pub fn tiny_chat_dir() -> PathBuf {
    fixture("tiny-chat")
}

/// Copies the tiny chat model into `root/tiny-chat` (services resolve models under their artifact root) and
/// returns that relative name.
pub fn tiny_chat_in(root: &Path) -> &'static str {
    let to = root.join("tiny-chat");
    std::fs::create_dir_all(&to).expect("create tiny-chat");
    for e in std::fs::read_dir(tiny_chat_dir()).expect("tests/fixtures/tiny-chat") {
        let e = e.expect("entry");
        std::fs::copy(e.path(), to.join(e.file_name())).expect("copy the tiny chat model");
    }
    "tiny-chat"
}

/// The step of the newest complete checkpoint in `run_dir/checkpoints` (`step-NNNNNNNN`), if any. Older ones
/// are pruned as training goes on (and the tiny model trains fast), so tests wait for "at least step N"
/// rather than for one directory.
pub fn newest_checkpoint(run_dir: &Path) -> Option<u64> {
    std::fs::read_dir(run_dir.join("checkpoints"))
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
        .max()
}

/// `tests/fixtures/smollm2/hf-reference.json` (HF transformers reference numbers; a copy of the shared fixture).
pub fn hf_reference() -> serde_json::Value {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/smollm2/hf-reference.json");
    let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    serde_json::from_str(&text).expect("reference JSON")
}

/// A path in the repository (e.g. `recipes/lora-sft.yaml`).
pub fn repo(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(p)
}

/// A file under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name)
}

/// A `ferrotune serve` child process on an ephemeral loopback port; killed (SIGKILL) when dropped.
pub struct Server {
    /// The child.
    pub child: std::process::Child,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// The `listening on …` line it printed.
    pub line: String,
}

impl Server {
    /// Starts `ferrotune serve --services SERVICES --listen 127.0.0.1:0 --artifact-root ROOT` with extra
    /// environment (`FERROTUNE__…`) and waits for its "listening on" line.
    pub fn start(services: &str, root: &Path, env: &[(&str, &str)]) -> Self {
        Self::start_on(services, root, env, "127.0.0.1:0")
    }

    /// Like [`Server::start`] on a given address (to restart a server on the same port).
    pub fn start_on(services: &str, root: &Path, env: &[(&str, &str)], listen: &str) -> Self {
        Self::spawn(services, root, env, listen, std::process::Stdio::inherit())
    }

    /// Like [`Server::start`], its log (stderr) written to `log`.
    pub fn start_logged(services: &str, root: &Path, env: &[(&str, &str)], log: &Path) -> Self {
        let file = std::fs::File::create(log).expect("create the server log");
        Self::spawn(services, root, env, "127.0.0.1:0", std::process::Stdio::from(file))
    }

    fn spawn(services: &str, root: &Path, env: &[(&str, &str)], listen: &str, stderr: std::process::Stdio) -> Self {
        use std::io::BufRead;
        let mut cmd = Command::new(ferrotune_bin());
        cmd.args(["serve", "--services", services, "--listen", listen, "--artifact-root", root.to_str().unwrap()])
            .current_dir(root)
            .stdout(std::process::Stdio::piped())
            .stderr(stderr);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn ferrotune serve");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        std::io::BufReader::new(stdout).read_line(&mut line).expect("read the listening line");
        let addr = line
            .strip_prefix("listening on ")
            .and_then(|r| r.split_whitespace().next())
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"));
        Self { url: format!("http://{addr}"), child, line: line.trim_end().to_owned() }
    }

    /// The `host:port` part.
    pub fn addr(&self) -> &str {
        self.url.trim_start_matches("http://")
    }

    /// Sends SIGTERM and waits for the process to exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        self.child.wait().expect("wait")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `ferrotune ARGS` in `dir` with extra environment.
pub fn run_cli_env(dir: &Path, env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(ferrotune_bin());
    cmd.args(args).current_dir(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run ferrotune")
}
