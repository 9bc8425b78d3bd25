//! Online RL through the alignment service in its own process, on the tiny chat model: GRPO and RLOO driven
//! over gRPC (alignment → a policy training session, alignment → two reward replicas), and the faults — the
//! orchestrator SIGKILLed and restarted, the policy SIGKILLed and restarted, a reward replica SIGKILLed —
//! after which the job ends with exactly the adapter of an uninterrupted run.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferrotune_tests::{ferrotune_bin, repo, run_cli_env, tiny_chat_in, Server};

const STEPS: usize = 24;

/// A GRPO (or RLOO) recipe on the tiny chat model whose reward varies within groups (the completion's
/// length in characters), paths relative to the root.
fn recipe(root: &Path, section: &str) -> std::path::PathBuf {
    std::fs::copy(repo("recipes/data/capitals-train.jsonl"), root.join("prompts.jsonl")).unwrap();
    let model = tiny_chat_in(root);
    let text = format!(
        "model: {model}\nadapter: {{method: lora, r: 4, lora_alpha: 8, target_modules: all-linear}}\n\
         data: {{path: prompts.jsonl}}\n\
         {section}: {{rewards: [{{name: len, rule: length, weight: 0.1}}, \
         {{name: correct, rule: 'answer:contains', reference_field: answer}}], \
         num_generations: 4, max_completion_length: 8, beta: 0.04}}\n\
         training: {{learning_rate: 1.0e-2, lr_scheduler: constant, max_steps: {STEPS}, micro_batch_size: 4, \
         gradient_accumulation_steps: 2, save_steps: 4, seed: 5}}\noutput_dir: runs/{section}\n"
    );
    let p = root.join(format!("{section}.yaml"));
    std::fs::write(&p, text).unwrap();
    p
}

struct Stack {
    policy: Server,
    rewards: [Option<Server>; 2],
    alignment: Server,
}

fn stack(root: &Path) -> Stack {
    let policy = Server::start("policy", root, &[("FERROTUNE__JOBS__DB", ".ferrotune/jobs-policy.sqlite")]);
    let rewards = [1, 2].map(|i| {
        let db = format!(".ferrotune/jobs-reward{i}.sqlite");
        Some(Server::start("reward", root, &[("FERROTUNE__JOBS__DB", db.as_str())]))
    });
    let urls = rewards.iter().map(|r| r.as_ref().unwrap().url.clone()).collect::<Vec<_>>().join(",");
    let alignment = alignment(root, &policy, &urls, "127.0.0.1:0");
    Stack { policy, rewards, alignment }
}

fn alignment(root: &Path, policy: &Server, rewards: &str, listen: &str) -> Server {
    Server::start_on(
        "alignment",
        root,
        &[
            ("FERROTUNE__JOBS__DB", ".ferrotune/jobs-alignment.sqlite"),
            ("FERROTUNE__ENDPOINTS__POLICY", &policy.url),
            ("FERROTUNE__ENDPOINTS__REWARD", rewards),
        ],
        listen,
    )
}

fn align(root: &Path, alignment: &Server, section: &str, out: &str) -> std::process::Output {
    let r = recipe(root, section);
    run_cli_env(
        root,
        &[("FERROTUNE__ENDPOINTS__ALIGNMENT", &alignment.url)],
        &["align", section, "--recipe", r.to_str().unwrap(), "--output-dir", out, "--json"],
    )
}

fn adapter(root: &Path, out: &str) -> Vec<u8> {
    std::fs::read(root.join(out).join("adapter_model.safetensors"))
        .unwrap_or_else(|e| panic!("{out}: no adapter ({e})"))
}

/// Starts `align grpo` detached and returns its job id.
fn start(root: &Path, alignment: &Server, out: &str) -> String {
    let r = recipe(root, "grpo");
    let mut cli = Command::new(ferrotune_bin())
        .args(["align", "grpo", "--recipe", r.to_str().unwrap(), "--output-dir", out, "--json"])
        .current_dir(root)
        .env("FERROTUNE__ENDPOINTS__ALIGNMENT", &alignment.url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(cli.stdout.take().unwrap()), &mut first).unwrap();
    cli.kill().unwrap();
    cli.wait().unwrap();
    serde_json::from_str::<serde_json::Value>(&first).unwrap()["job_id"].as_str().unwrap().to_owned()
}

/// Waits for the orchestrator's checkpoint of `step` (or later) in `out`.
fn wait_state(root: &Path, out: &str, step: u64) {
    let p = root.join(out).join("orchestrator_state.json");
    let started = Instant::now();
    loop {
        let s = std::fs::read_to_string(&p).ok().and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
        if s.is_some_and(|v| v["step"].as_u64().unwrap_or(0) >= step) {
            return;
        }
        assert!(started.elapsed() < Duration::from_secs(120), "no checkpoint of step {step} in {out}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_done(root: &Path, alignment: &Server, id: &str) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let o =
            run_cli_env(root, &[("FERROTUNE__ENDPOINTS__ALIGNMENT", &alignment.url)], &["jobs", "get", id, "--json"]);
        if o.status.success() {
            let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            if !matches!(j["state"].as_str(), Some("running" | "queued")) {
                return j;
            }
        }
        assert!(started.elapsed() < Duration::from_secs(180), "job {id} never ended");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn grpo_and_rloo_through_three_processes_and_resume_after_sigkill() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let Stack { policy, mut rewards, alignment: a } = stack(&root);
    let reward_urls = rewards.iter().map(|r| r.as_ref().unwrap().url.clone()).collect::<Vec<_>>().join(",");

    // Uninterrupted GRPO: the policy learns (reward and loss reported per step), the adapter is written.
    let o = align(&root, &a, "grpo", "runs/u");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(root.join("runs/u/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(metrics.len(), STEPS);
    for k in [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "rewards/len/mean",
        "rewards/correct/mean",
        "kl",
        "clip_ratio/region_mean",
        "grad_norm",
    ] {
        assert!(metrics.iter().all(|m| m[k].is_number()), "{k} missing: {}", metrics[0]);
    }
    assert!(metrics.iter().any(|m| m["grad_norm"].as_f64().unwrap() > 0.0), "nothing was trained");
    assert!(metrics.last().unwrap()["kl"].as_f64().unwrap() > 0.0, "beta > 0: the KL to the reference is reported");
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("runs/u/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["peft_type"].as_str(), cfg["r"].as_i64()), (Some("LORA"), Some(4)));
    let want = adapter(&root, "runs/u");

    // The orchestrator SIGKILLed mid-run and restarted on the same port: the job resumes by itself.
    let id = start(&root, &a, "runs/k");
    wait_state(&root, "runs/k", 8);
    let addr = a.addr().to_owned();
    drop(a); // SIGKILL
    assert!(!root.join("runs/k/adapter_model.safetensors").exists(), "killed too late to test anything");
    let a = alignment(&root, &policy, &reward_urls, &addr);
    let j = wait_done(&root, &a, &id);
    assert_eq!((j["state"].as_str(), j["resumes"].as_u64()), (Some("succeeded"), Some(1)), "{j}");
    assert!(adapter(&root, "runs/k") == want, "the resumed run's adapter differs from the uninterrupted run's");

    // The policy SIGKILLed mid-run and restarted: the session is reopened at its checkpoint, the job finishes.
    let id = start(&root, &a, "runs/p");
    wait_state(&root, "runs/p", 8);
    let paddr = policy.addr().to_owned();
    drop(policy);
    assert!(!root.join("runs/p/adapter_model.safetensors").exists(), "killed too late to test anything");
    let _policy =
        Server::start_on("policy", &root, &[("FERROTUNE__JOBS__DB", ".ferrotune/jobs-policy.sqlite")], &paddr);
    let j = wait_done(&root, &a, &id);
    assert_eq!(j["state"].as_str(), Some("succeeded"), "{j}");
    assert!(adapter(&root, "runs/p") == want, "the run across a policy restart differs from the uninterrupted run");

    // A reward replica SIGKILLed mid-run: the survivor scores every step after it (a step is scored whole
    // or retried), and the run ends as the uninterrupted one.
    let id = start(&root, &a, "runs/r");
    wait_state(&root, "runs/r", 8);
    drop(rewards[0].take());
    assert!(!root.join("runs/r/adapter_model.safetensors").exists(), "killed too late to test anything");
    let j = wait_done(&root, &a, &id);
    assert_eq!(j["state"].as_str(), Some("succeeded"), "{j}");
    assert!(adapter(&root, "runs/r") == want, "the run across a reward replica's death differs");

    // RLOO on the same stack.
    let o = align(&root, &a, "rloo", "runs/rloo");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(adapter(&root, "runs/rloo") != want);
}

/// DPO started on an alignment service that runs alone: it runs as a job of the policy server, followed by a
/// job of the alignment service that the CLI watches there. PPO there: the orchestrator drives a session with
/// a value head on the policy server.
#[test]
fn dpo_and_ppo_through_a_standalone_alignment_service() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let Stack { policy: _policy, rewards: _rewards, alignment: a } = stack(&root);
    std::fs::copy(repo("recipes/data/pirate-prefs-train.jsonl"), root.join("prefs.jsonl")).unwrap();
    let model = format!("model={}", tiny_chat_in(&root));
    let o = run_cli_env(
        &root,
        &[("FERROTUNE__ENDPOINTS__ALIGNMENT", &a.url)],
        &[
            "align",
            "dpo",
            "--recipe",
            repo("recipes/dpo.yaml").to_str().unwrap(),
            "--output-dir",
            "dpo",
            "--set",
            "data.path=prefs.jsonl",
            "--set",
            &model,
            "--max-steps",
            "3",
            "--json",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let steps = out.lines().filter(|l| l.contains("\"loss\"") && !l.contains("\"done\"")).count();
    assert_eq!(steps, 3, "the follower mirrors every step: {out}");
    assert!(out.contains("following policy job dpo-"), "{out}");
    assert!(root.join("dpo/adapter_model.safetensors").exists());
    // The follower's job is the alignment service's; the DPO job itself the policy's.
    let list = run_cli_env(&root, &[("FERROTUNE__ENDPOINTS__ALIGNMENT", &a.url)], &["jobs", "list", "--json"]);
    let jobs: serde_json::Value = serde_json::from_slice(&list.stdout).unwrap();
    let kinds: Vec<&str> = jobs.as_array().unwrap().iter().map(|j| j["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["follow"], "{jobs}");

    let o = run_cli_env(
        &root,
        &[("FERROTUNE__ENDPOINTS__ALIGNMENT", &a.url)],
        &[
            "align",
            "ppo",
            "--recipe",
            repo("recipes/ppo.yaml").to_str().unwrap(),
            "--output-dir",
            "ppo",
            "--set",
            "data.path=prefs.jsonl",
            "--set",
            "data.eval_path=null",
            "--set",
            &model,
            "--set",
            "ppo.max_new_tokens=8",
            "--max-steps",
            "3",
            "--json",
        ],
    );
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let steps: Vec<serde_json::Value> = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["metrics"].is_object())
        .collect();
    assert_eq!(steps.len(), 3, "{out}");
    for k in ["objective/scores", "objective/kl", "loss/value_avg", "policy/clipfrac_avg", "objective/kl_coef"] {
        assert!(steps[0]["metrics"][k].is_number(), "metric {k} missing: {}", steps[0]);
    }
    for f in ["adapter_model.safetensors", "value_head.safetensors", "metrics.jsonl"] {
        assert!(root.join("ppo").join(f).exists(), "{f} missing");
    }
}

#[test]
fn bad_grpo_requests_are_clear() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let r = recipe(&root, "grpo");
    let run = |sets: &[&str]| {
        let mut args = vec!["align", "grpo", "--recipe", r.to_str().unwrap()];
        for s in sets {
            args.extend(["--set", s]);
        }
        let o = run_cli_env(&root, &[], &args);
        (o.status.success(), String::from_utf8_lossy(&o.stderr).trim_end().to_owned())
    };
    let (ok, err) = run(&["grpo.num_generations=1"]);
    assert!(!ok && err.contains("grpo.num_generations") && err.lines().count() == 1, "{err}");
    let (ok, err) = run(&["grpo.rewards=[]"]);
    assert!(!ok && err.contains("grpo.rewards") && err.lines().count() == 1, "{err}");
    let (ok, err) = run(&["grpo.loss_type=magic"]);
    assert!(!ok && err.contains("magic") && err.lines().count() == 1, "{err}");
    let (ok, err) = run(&["grpo.rewards=[{rule: 'answer:contains'}]"]);
    assert!(!ok && err.contains("reference_field") && err.lines().count() == 1, "{err}");
    // A prompt record without the reference field is named by file and line.
    std::fs::write(root.join("prompts.jsonl"), "{\"prompt\": \"a?\", \"answer\": \"x\"}\n{\"prompt\": \"b?\"}\n")
        .unwrap();
    let (ok, err) = run(&["training.max_steps=1"]);
    assert!(!ok && err.contains("prompts.jsonl:2") && err.contains("`answer`"), "{err}");
    // A bad rule is refused before the job is queued, naming the reward function.
    let (ok, err) = run(&["grpo.rewards=[{rule: 'regex:('}]", "training.max_steps=1"]);
    assert!(!ok && err.contains("grpo.rewards[0]") && err.contains("regex") && err.lines().count() == 1, "{err}");
    // A policy endpoint that is down: one line, no hang.
    let started = Instant::now();
    let o = run_cli_env(
        &root,
        &[("FERROTUNE__ENDPOINTS__POLICY", "http://127.0.0.1:9")],
        &["align", "grpo", "--recipe", r.to_str().unwrap()],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.trim_end().lines().count() == 1, "{err}");
    assert!(started.elapsed() < Duration::from_secs(60));
}

/// The learning proof of GRPO (and of the three-process layout): SmolLM2 on the capitals prompts with two
/// verifiable rewards (the format "The capital of X is Y." and the answer matched against the record's
/// `answer`), run by an alignment server driving a policy server and scoring on two reward servers. The
/// held-out mean reward (12 prompts × 4 samples, of 2) must clearly rise; the KL to the reference is reported.
#[test]
#[ignore = "learning proof: make test-learning"]
fn smollm2_grpo_raises_the_held_out_reward_through_three_processes() {
    ferrotune_tests::smollm2_dir();
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    for f in ["capitals-train.jsonl", "capitals-eval.jsonl"] {
        std::fs::copy(repo(&format!("recipes/data/{f}")), root.join(f)).unwrap();
    }
    let policy = Server::start("policy", &root, &[("FERROTUNE__JOBS__DB", ".ferrotune/jobs-policy.sqlite")]);
    let (r1, r2) = (
        Server::start("reward", &root, &[("FERROTUNE__JOBS__DB", ".ferrotune/jobs-r1.sqlite")]),
        Server::start("reward", &root, &[("FERROTUNE__JOBS__DB", ".ferrotune/jobs-r2.sqlite")]),
    );
    let rewards = format!("{},{}", r1.url, r2.url);
    let a = Server::start(
        "alignment",
        &root,
        &[
            ("FERROTUNE__JOBS__DB", ".ferrotune/jobs-alignment.sqlite"),
            ("FERROTUNE__ENDPOINTS__POLICY", &policy.url),
            ("FERROTUNE__ENDPOINTS__REWARD", &rewards),
        ],
    );
    let started = Instant::now();
    let o = run_cli_env(
        &root,
        &[("FERROTUNE__ENDPOINTS__ALIGNMENT", &a.url)],
        &[
            "align",
            "grpo",
            "--recipe",
            repo("recipes/grpo.yaml").to_str().unwrap(),
            "--output-dir",
            "grpo",
            "--set",
            "data.path=capitals-train.jsonl",
            "--set",
            "data.eval_path=capitals-eval.jsonl",
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("grpo/align_eval.json")).unwrap()).unwrap();
    let (before, after) = (eval["before"].as_f64().unwrap(), eval["after"].as_f64().unwrap());
    let metrics: Vec<serde_json::Value> = std::fs::read_to_string(root.join("grpo/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let kl: Vec<f64> = metrics.iter().map(|m| m["kl"].as_f64().unwrap()).collect();
    println!(
        "GRPO, 3 processes ({:.0} s): held-out mean reward {before:.3} -> {after:.3} (of 2); KL per token at steps 5/15/25: {:.4} {:.4} {:.4}",
        started.elapsed().as_secs_f64(),
        kl[4],
        kl[14],
        kl[24]
    );
    assert!(after >= before + 0.4, "held-out mean reward {before:.3} -> {after:.3}");
    assert!(kl.iter().all(|k| k.is_finite() && *k >= 0.0) && kl[24] > 0.0, "KL {kl:?}");
}

/// RLOO on the same task (embedded services): the held-out mean reward rises too.
#[test]
#[ignore = "learning proof: make test-learning"]
fn smollm2_rloo_raises_the_held_out_reward() {
    ferrotune_tests::smollm2_dir();
    let t = tempfile::tempdir().unwrap();
    let o = run_cli_env(
        t.path(),
        &[],
        &[
            "align",
            "rloo",
            "--recipe",
            repo("recipes/rloo.yaml").to_str().unwrap(),
            "--output-dir",
            "rloo",
            "--set",
            &format!("data.path={}", repo("recipes/data/capitals-train.jsonl").display()),
            "--set",
            &format!("data.eval_path={}", repo("recipes/data/capitals-eval.jsonl").display()),
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let eval: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join("rloo/align_eval.json")).unwrap()).unwrap();
    let (before, after) = (eval["before"].as_f64().unwrap(), eval["after"].as_f64().unwrap());
    println!("RLOO: held-out mean reward {before:.3} -> {after:.3} (of 2)");
    assert!(after >= before + 0.4, "held-out mean reward {before:.3} -> {after:.3}");
}
