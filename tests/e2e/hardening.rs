//! The probes of the hardening issue, each asserting the fixed behaviour against a real `ferrotune serve`
//! or the CLI: symlinks planted under the artifact root (read and write), a 10 MB path and a 1 MB job id,
//! two servers on one job store, `import gguf --out .`, a GGUF whose dimensions overflow, and a fresh run
//! into an output dir that holds another run.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

use ferrotune_proto::v1::data_service_client::DataServiceClient;
use ferrotune_proto::v1::job_service_client::JobServiceClient;
use ferrotune_proto::v1::policy_service_client::PolicyServiceClient;
use ferrotune_proto::v1::{
    prompt, GenerateRequest, GetJobRequest, GetStatsRequest, ListAdaptersRequest, ModelRef, Prompt, Sampling,
    TokenizeRequest,
};
use ferrotune_tests::{fixture, repo, run_cli_env, smollm2_dir, Server};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

#[test]
fn symlinks_long_paths_and_long_job_ids_against_a_server() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    let outside = t.path().join("outside");
    std::fs::create_dir_all(root.join("ds")).unwrap();
    std::fs::create_dir_all(root.join("m")).unwrap();
    std::fs::create_dir_all(root.join("adapters/real")).unwrap();
    std::fs::create_dir_all(outside.join("adapter")).unwrap();
    let secret = r#"{"records": 1, "train": 1, "eval": 0, "tokens": 7, "trained_tokens": 3}"#;
    std::fs::write(outside.join("stats.json"), secret).unwrap();
    std::fs::write(outside.join("tokenizer.json"), "{}").unwrap();
    let lora = fixture("tiny-lora/llama3-all-linear");
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        std::fs::copy(lora.join(f), outside.join("adapter").join(f)).unwrap();
        std::fs::copy(lora.join(f), root.join("adapters/real").join(f)).unwrap();
    }
    symlink(outside.join("stats.json"), root.join("ds/stats.json")).unwrap();
    symlink(outside.join("tokenizer.json"), root.join("m/tokenizer.json")).unwrap();
    symlink(outside.join("adapter"), root.join("adapters/escaped")).unwrap();
    let server = Server::start("data,policy", &root, &[]);
    let url = server.url.clone();
    rt().block_on(async move {
        let ch = tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.unwrap();
        let mut data = DataServiceClient::new(ch.clone());
        let mut policy = PolicyServiceClient::new(ch.clone());
        // Reads through symlinks inside a named directory are refused, not followed.
        let e = data.get_stats(GetStatsRequest { path: "ds".into() }).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let tok = TokenizeRequest { model: Some(ModelRef { path: "m".into() }), text: "hi".into() };
        let e = data.tokenize(tok).await.unwrap_err();
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        // Listing adapters leaves out the symlinked folder that points outside.
        let found = policy.list_adapters(ListAdaptersRequest { dir: "adapters".into() }).await.unwrap().into_inner();
        let paths: Vec<String> = found.adapters.iter().map(|a| a.path.clone()).collect();
        assert_eq!(paths.len(), 1, "{paths:?}");
        assert!(paths[0].ends_with("adapters/real"), "{paths:?}");
        // A 10 MB path and a 1 MB job id: answered at once with a short message; health stays SERVING.
        let mut health = HealthClient::new(ch.clone());
        let started = Instant::now();
        let e = data.get_stats(GetStatsRequest { path: "a/".repeat(5_000_000) }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{}", &e.message()[..e.message().len().min(200)]);
        assert!(e.message().len() < 300, "the error echoes {} bytes", e.message().len());
        let mut jobs = JobServiceClient::new(ch.clone());
        let e = jobs.get_job(GetJobRequest { id: "x".repeat(1 << 20) }).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().len() < 300, "the error echoes {} bytes", e.message().len());
        assert!(started.elapsed() < Duration::from_secs(2), "took {:?}", started.elapsed());
        let h = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner();
        assert_eq!(h.status(), ServingStatus::Serving);
    });
    assert_eq!(std::fs::read_to_string(outside.join("stats.json")).unwrap(), secret);
}

#[test]
fn a_second_server_on_the_same_job_store_refuses_to_start() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let _first = Server::start("policy", &root, &[]);
    let root_s = root.to_str().unwrap();
    let out = run_cli_env(
        &root,
        &[],
        &["serve", "--services", "policy", "--listen", "127.0.0.1:0", "--artifact-root", root_s],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the second server started: {err}");
    assert!(err.contains("in use by another ferrotune server"), "{err}");
}

/// A GGUF v3 header with one F32 tensor of the given dimensions and no data.
fn gguf_with_tensor(dims: &[u64]) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(0u64.to_le_bytes()); // metadata
    let name = b"token_embd.weight";
    b.extend((name.len() as u64).to_le_bytes());
    b.extend(name);
    b.extend((dims.len() as u32).to_le_bytes());
    for d in dims {
        b.extend(d.to_le_bytes());
    }
    b.extend(0u32.to_le_bytes()); // F32
    b.extend(0u64.to_le_bytes()); // offset
    b
}

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    v.sort();
    v
}

#[test]
fn import_never_replaces_what_it_did_not_make() {
    let t = tempfile::tempdir().unwrap();
    let dir = t.path();
    std::fs::write(dir.join("model.gguf"), gguf_with_tensor(&[4, 4])).unwrap();
    std::fs::write(dir.join("keep.txt"), "mine").unwrap();
    std::fs::create_dir_all(dir.join("other")).unwrap();
    std::fs::write(dir.join("other/notes.txt"), "mine too").unwrap();
    for (out, needle) in
        [(".", "working directory"), ("other", "not an earlier import"), ("keep.txt", "not a directory")]
    {
        let o = run_cli_env(dir, &[], &["import", "gguf", "model.gguf", "--out", out]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(needle), "--out {out}: {err}");
    }
    assert_eq!(listing(dir), ["keep.txt", "model.gguf", "other"]);
    assert_eq!(listing(&dir.join("other")), ["notes.txt"]);
    // Dimensions whose product overflows: refused at once, nothing left behind.
    std::fs::write(dir.join("overflow.gguf"), gguf_with_tensor(&[1 << 40, 1 << 40, 1 << 40])).unwrap();
    let started = Instant::now();
    let o = run_cli_env(dir, &[], &["import", "gguf", "overflow.gguf", "--out", "new"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("overflows"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(listing(dir), ["keep.txt", "model.gguf", "other", "overflow.gguf"]);
}

#[test]
fn smollm2_a_fresh_run_into_another_runs_output_dir_is_refused() {
    smollm2_dir();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("run");
    std::fs::create_dir_all(out.join("checkpoints/step-00000010")).unwrap();
    std::fs::write(out.join("metrics.jsonl"), "{\"step\": 10}\n").unwrap();
    std::fs::write(out.join("adapter_model.safetensors"), "not touched").unwrap();
    let recipe = repo("recipes/lora-sft.yaml");
    let data = format!("data.path={}", repo("recipes/data/pirate-train.jsonl").display());
    let args = ["train", "sft", "--recipe", recipe.to_str().unwrap(), "--output-dir", out.to_str().unwrap()];
    let o = run_cli_env(t.path(), &[], &[&args[..], &["--set", &data]].concat());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a fresh run overwrote another run");
    assert!(err.contains("already holds a run") && err.contains("--overwrite"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert_eq!(std::fs::read_to_string(out.join("adapter_model.safetensors")).unwrap(), "not touched");
    assert!(out.join("checkpoints/step-00000010").is_dir());
}

/// A generation of `n` prompts × `max_new` tokens, sampled hot enough that no row stops early at EOS.
fn long_generation(n: usize, max_new: u32) -> GenerateRequest {
    GenerateRequest {
        model: Some(ModelRef { path: "smollm2-135m-instruct".into() }),
        prompts: (0..n).map(|i| Prompt { kind: Some(prompt::Kind::Text(format!("Story {i}:"))) }).collect(),
        max_new_tokens: max_new,
        sampling: Some(Sampling { temperature: 5.0, ..Default::default() }),
        ..Default::default()
    }
}

#[test]
fn smollm2_abandoned_generations_stop_and_the_next_call_answers_promptly() {
    smollm2_dir();
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let server = Server::start("policy", &root, &[("FERROTUNE__POLICY__PRELOAD", "smollm2-135m-instruct")]);
    let url = server.url.clone();
    rt().block_on(async move {
        let ch = tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.unwrap();
        let mut policy = PolicyServiceClient::new(ch.clone());
        let quick = || long_generation(1, 1);
        policy.generate(quick()).await.expect("warm-up"); // the preloaded model is ready
                                                          // 8 × 4096 tokens (minutes of work) whose caller gives up after 2 s.
        let mut req = tonic::Request::new(long_generation(8, 4096));
        req.set_timeout(Duration::from_secs(2)); // the server's deadline (grpc-timeout)…
        let mut p = policy.clone();
        // …or the client's own: on timeout it drops the call.
        if let Ok(r) = tokio::time::timeout(Duration::from_secs(3), p.generate(req)).await {
            // tonic's server answers an expired grpc-timeout with CANCELLED ("Timeout expired").
            let code = r.unwrap_err().code();
            assert!(matches!(code, Code::DeadlineExceeded | Code::Cancelled), "{code:?}");
        }
        let started = Instant::now();
        policy.generate(quick()).await.expect("the next call");
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(20), "the next call waited {waited:?} behind abandoned work");
        // 20 streams dropped after a second: their queued work never starts, the running one stops.
        let mut streams = vec![];
        for _ in 0..20 {
            let mut p = policy.clone();
            streams.push(tokio::spawn(async move {
                let mut s = p.generate_stream(long_generation(4, 2048)).await?.into_inner();
                while s.message().await?.is_some() {}
                Ok::<_, tonic::Status>(())
            }));
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        for s in &streams {
            s.abort();
        }
        let started = Instant::now();
        policy.generate(quick()).await.expect("the call after the streams");
        let waited = started.elapsed();
        assert!(waited < Duration::from_secs(20), "the next call waited {waited:?} behind abandoned streams");
    });
}

#[test]
fn smollm2_sigterm_ends_a_server_within_bounds_while_a_call_is_running() {
    smollm2_dir();
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let server = Server::start("policy", &root, &[("FERROTUNE__POLICY__PRELOAD", "smollm2-135m-instruct")]);
    let url = server.url.clone();
    let rt = rt();
    // A call that would run for minutes, still waited for by its client.
    let call = rt.spawn(async move {
        let ch = tonic::transport::Endpoint::from_shared(url).unwrap().connect().await.unwrap();
        let mut policy = PolicyServiceClient::new(ch);
        policy.generate(long_generation(1, 1)).await.expect("warm-up");
        let _ = policy.generate(long_generation(8, 4096)).await;
    });
    std::thread::sleep(Duration::from_secs(8));
    assert!(!call.is_finished(), "the long call should still be running");
    let started = Instant::now();
    let status = server.terminate();
    let took = started.elapsed();
    assert!(took < Duration::from_secs(40), "SIGTERM took {took:?} with a call in flight");
    assert!(status.success(), "{status:?}");
    call.abort();
}

/// Runs `ferrotune ARGS` in `dir` and returns its exit status, stderr and peak RSS in MB: the high-water mark
/// of its own memory (`VmHWM`, read until it exits). Not wait4's `ru_maxrss`: that one keeps the RSS the
/// child had between fork and exec, i.e. this test process's (which holds SmolLM2 for other tests).
fn run_measured(dir: &Path, args: &[&str]) -> (std::process::ExitStatus, String, f64) {
    let mut child = std::process::Command::new(ferrotune_tests::ferrotune_bin())
        .args(args)
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut s).unwrap();
        s
    });
    let status_file = format!("/proc/{}/status", child.id());
    let mut peak_kb = 0u64;
    let status = loop {
        // Between fork and exec the child is still a copy of this process (named like it): not counted.
        if let Ok(text) =
            std::fs::read_to_string(&status_file)
                .map(|t| if t.starts_with("Name:\tferrotune") { t } else { String::new() })
        {
            let hwm = text.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.split_whitespace().next());
            peak_kb = peak_kb.max(hwm.and_then(|v| v.parse().ok()).unwrap_or(0));
        }
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    (status, reader.join().unwrap(), peak_kb as f64 / 1024.0)
}

#[test]
fn smollm2_a_50_mb_record_is_refused_with_bounded_memory() {
    let model = smollm2_dir();
    let t = tempfile::tempdir().unwrap();
    let good = r#"{"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Ahoy!"}]}"#;
    let huge = format!(
        r#"{{"messages": [{{"role": "user", "content": "{}"}}, {{"role": "assistant", "content": "x"}}]}}"#,
        "word ".repeat(10_000_000)
    );
    std::fs::write(t.path().join("in.jsonl"), format!("{good}\n{huge}\n{good}\n{good}\n")).unwrap();
    let m = model.to_str().unwrap();
    let args = ["data", "format", "--input", "in.jsonl", "--format", "messages", "--model", m, "--out", "ds"];
    let (status, err, peak_mb) = run_measured(t.path(), &args);
    println!("data format with a 50 MB record: peak RSS {peak_mb:.0} MB");
    assert!(status.success(), "{err}");
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(t.path().join("ds/stats.json")).unwrap()).unwrap();
    assert_eq!(stats["train"].as_u64().unwrap() + stats["eval"].as_u64().unwrap(), 3, "{stats}");
    let errors = stats["errors"].to_string();
    assert!(errors.contains("in.jsonl:2") && errors.contains("max_text_bytes"), "{stats}");
    assert!(peak_mb < 1000.0, "peak RSS {peak_mb:.0} MB");
}
