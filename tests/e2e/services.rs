//! The services as real servers on 127.0.0.1:0 (`ferrotune serve` child processes): an SFT job through
//! the CLI against separate data / policy / merge servers, job watching, cancel, restart-and-resume,
//! health, reflection, auth, path confinement and malformed requests.

use std::path::Path;
use std::time::{Duration, Instant};

use ferrotune_proto::v1::data_service_client::DataServiceClient;
use ferrotune_proto::v1::job_service_client::JobServiceClient;
use ferrotune_proto::v1::policy_service_client::PolicyServiceClient;
use ferrotune_proto::v1::{
    prompt, GenerateRequest, GetJobRequest, LogProbsRequest, ModelRef, Prompt, ScoredSequence, StartRecipeJobRequest,
    TokenizeRequest,
};
use ferrotune_tests::{repo, run_cli_env, smollm2_dir, tiny_chat_in, Server};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A small QLoRA recipe on the tiny chat model (copied into the root), paths relative to the artifact root.
fn recipe(root: &Path, out: &str, steps: u32, save_steps: u32) -> std::path::PathBuf {
    std::fs::copy(repo("recipes/data/pirate-train.jsonl"), root.join("pirate-train.jsonl")).unwrap();
    let model = tiny_chat_in(root);
    let text = format!(
        "model: {model}\nadapter: {{method: qlora, r: 8, lora_alpha: 16, target_modules: [q_proj, v_proj]}}\n\
         data: {{path: pirate-train.jsonl, format: messages, max_seq_len: 256}}\n\
         training: {{learning_rate: 1.0e-3, max_steps: {steps}, micro_batch_size: 2, save_steps: {save_steps}, seed: 7}}\n\
         output_dir: {out}\n"
    );
    let p = root.join(format!("{}.yaml", out.replace('/', "-")));
    std::fs::write(&p, text).unwrap();
    p
}

fn ok(o: &std::process::Output) -> String {
    assert!(o.status.success(), "failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn last_json(stdout: &str) -> serde_json::Value {
    serde_json::from_str(stdout.trim_end().lines().last().expect("output")).expect("JSON")
}

#[test]
fn services_sft_generate_merge_through_separate_servers() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let (data, policy, merge) =
        (Server::start("data", &root, &[]), Server::start("policy", &root, &[]), Server::start("merge", &root, &[]));
    let env = [
        ("FERROTUNE__ENDPOINTS__DATA", data.url.as_str()),
        ("FERROTUNE__ENDPOINTS__POLICY", policy.url.as_str()),
        ("FERROTUNE__ENDPOINTS__MERGE", merge.url.as_str()),
    ];
    // Data service: format with relative paths (resolved under the server's root).
    let r = recipe(&root, "runs/q", 4, 2);
    let s = last_json(&ok(&run_cli_env(
        &root,
        &env,
        &[
            "data",
            "format",
            "--input",
            "pirate-train.jsonl",
            "--format",
            "messages",
            "--model",
            "tiny-chat",
            "--out",
            "ds",
            "--json",
        ],
    )));
    assert_eq!(s["records"], 32);
    assert!(root.join("ds/train.jsonl").exists());
    // Policy service: the SFT job, followed through WatchJob as JSON lines.
    let out = ok(&run_cli_env(&root, &env, &["train", "sft", "--recipe", r.to_str().unwrap(), "--json"]));
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let job_id = lines[0]["job_id"].as_str().unwrap().to_owned();
    let steps: Vec<u64> = lines
        .iter()
        .filter_map(|l| l["step"].as_u64().filter(|_| l.get("loss").is_some() && l.get("done").is_none()))
        .collect();
    assert_eq!(steps, vec![1, 2, 3, 4], "one progress event per step, in order: {out}");
    let done = lines.last().unwrap();
    assert_eq!(done["done"], true, "{out}");
    let kinds: Vec<&str> = done["artifacts"].as_array().unwrap().iter().map(|a| a["kind"].as_str().unwrap()).collect();
    assert!(kinds.contains(&"adapter") && kinds.contains(&"plot"), "{kinds:?}");
    let svg = std::fs::read_to_string(root.join("runs/q/loss.svg")).unwrap();
    assert!(svg.contains("<svg") && svg.contains("polyline"));
    assert!(root.join("runs/q/adapter_model.safetensors").exists());
    // A second terminal: the finished job's whole history replays, ending with its final state.
    let w = ok(&run_cli_env(&root, &env, &["jobs", "watch", &job_id, "--json"]));
    let states: Vec<String> = w
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| v["state"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(states, vec!["queued", "running", "succeeded"], "{w}");
    let list: serde_json::Value =
        serde_json::from_str(&ok(&run_cli_env(&root, &env, &["jobs", "list", "--json"]))).unwrap();
    assert_eq!(list[0]["id"], job_id.as_str());
    // Generation with the adapter on the policy server.
    let g = last_json(&ok(&run_cli_env(
        &root,
        &env,
        &[
            "generate",
            "--model",
            "tiny-chat",
            "--adapter",
            "runs/q",
            "--chat",
            "--prompt",
            "Hi",
            "--max-new-tokens",
            "8",
            "--json",
        ],
    )));
    assert!(g["new_tokens"].as_u64().unwrap() > 0);
    // ListAdapters finds it; LogProbs with the adapter disabled is the reference (restored afterwards).
    let purl = policy.url.clone();
    rt().block_on(async move {
        let mut p = PolicyServiceClient::connect(purl).await.unwrap();
        let list = p
            .list_adapters(ferrotune_proto::v1::ListAdaptersRequest { dir: "runs".into() })
            .await
            .unwrap()
            .into_inner()
            .adapters;
        assert_eq!(list.len(), 1, "{list:?}");
        assert_eq!((list[0].peft_type.as_str(), list[0].r, list[0].nf4_base), ("LORA", 8, true));
        let m = Some(ModelRef { path: "tiny-chat".into() });
        let seq = ScoredSequence { prompt_ids: vec![1, 400, 198], completion_ids: vec![300, 28, 305] };
        let call = |disable: bool| {
            let req = LogProbsRequest {
                model: m.clone(),
                adapter: "runs/q".into(),
                disable_adapter: disable,
                sequences: vec![seq.clone()],
            };
            let mut p = p.clone();
            async move { p.log_probs(req).await.unwrap().into_inner().sequences[0].sum }
        };
        let (on, off, on_again, off_again) = (call(false).await, call(true).await, call(false).await, call(true).await);
        assert!((on - off).abs() > 1e-4, "the adapter must matter: {on} vs {off}");
        assert_eq!((on, off), (on_again, off_again), "disabling is undone after the call");
    });
    // Merge service: merged model's perplexity equals base + adapter's.
    let m = last_json(&ok(&run_cli_env(
        &root,
        &env,
        &[
            "merge",
            "--model",
            "tiny-chat",
            "--adapter",
            "runs/q",
            "--out",
            "merged",
            "--max-shard-bytes",
            "1048576",
            "--json",
        ],
    )));
    assert_eq!(m["merge_base"], "nf4_dequantized");
    // The tiny model in f32 is ~430 KB: one file under a 1 MiB shard limit (sharding itself is a unit test of
    // `weights::save_sharded`).
    assert_eq!(m["shards"], 1);
    assert!(root.join("merged/model.safetensors").exists());
    std::fs::write(
        root.join("t.txt"),
        "The quick brown fox jumps over the lazy dog. Pirates say ahoy to every sailor they meet.",
    )
    .unwrap();
    let merged_dir = root.join("merged");
    let a = last_json(&ok(&run_cli_env(
        &root,
        &env,
        &["eval", "perplexity", "--model", merged_dir.to_str().unwrap(), "--text-file", "t.txt", "--json"],
    )));
    let b = last_json(&ok(&run_cli_env(
        &root,
        &env,
        &["eval", "perplexity", "--model", "tiny-chat", "--adapter", "runs/q", "--text-file", "t.txt", "--json"],
    )));
    let (na, nb) = (a["mean_nll"].as_f64().unwrap(), b["mean_nll"].as_f64().unwrap());
    println!("merged model NLL {na:.6} vs base+adapter {nb:.6}");
    assert!((na - nb).abs() < 1e-4, "merged {na} vs base+adapter {nb}");
    // Paths outside the artifact root are refused by the servers.
    let o = run_cli_env(
        &root,
        &env,
        &["merge", "--model", "tiny-chat", "--adapter", "runs/q", "--out", "../escape", "--json"],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("`../escape` is outside the artifact root")
            && err.contains("PermissionDenied"),
        "{err}"
    );
    let o = run_cli_env(
        &root,
        &env,
        &["data", "format", "--input", "/etc/passwd", "--format", "text", "--model", "tiny-chat", "--out", "x"],
    );
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("outside the artifact root"));
}

fn wait_job(
    root: &Path,
    env: &[(&str, &str)],
    id: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let o = run_cli_env(root, env, &["jobs", "get", id, "--json"]);
        if o.status.success() {
            let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            if pred(&j) {
                return j;
            }
        }
        assert!(start.elapsed() < Duration::from_secs(300), "job {id} never got there");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn services_policy_restart_resumes_the_job() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let policy = Server::start("policy", &root, &[]);
    let addr = policy.addr().to_owned();
    let env = [("FERROTUNE__ENDPOINTS__POLICY", policy.url.clone())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let r = recipe(&root, "runs/r", 300, 20);
    // Start through the CLI, which detaches when killed: the job lives in the server.
    let mut cli = std::process::Command::new(ferrotune_tests::ferrotune_bin())
        .args(["train", "sft", "--recipe", r.to_str().unwrap(), "--json"])
        .current_dir(&root)
        .env("FERROTUNE__ENDPOINTS__POLICY", &policy.url)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(cli.stdout.take().unwrap()), &mut first).unwrap();
    let id = serde_json::from_str::<serde_json::Value>(&first).unwrap()["job_id"].as_str().unwrap().to_owned();
    cli.kill().unwrap();
    cli.wait().unwrap();
    // Crash the server (SIGKILL) after the step-20 checkpoint, before the end.
    wait_job(&root, &env, &id, |j| j["step"].as_u64().unwrap_or(0) >= 21);
    drop(policy);
    assert!(ferrotune_tests::newest_checkpoint(&root.join("runs/r")).unwrap_or(0) >= 20);
    assert!(!root.join("runs/r/adapter_model.safetensors").exists(), "killed too late to test anything");
    // Same root, same port: the job resumes from its newest checkpoint.
    let policy = Server::start_on("policy", &root, &[], &addr);
    let w = ok(&run_cli_env(&root, &env, &["jobs", "watch", &id, "--json"]));
    let j = wait_job(&root, &env, &id, |j| j["state"] != "running" && j["state"] != "queued");
    assert_eq!(
        (j["state"].as_str(), j["step"].as_u64(), j["resumes"].as_u64()),
        (Some("succeeded"), Some(300), Some(1)),
        "{j}\n{w}"
    );
    assert!(w.contains("resuming from the newest checkpoint"), "{w}");
    assert!(root.join("runs/r/adapter_model.safetensors").exists());
    drop(policy);
}

#[test]
fn services_cancel_a_running_job() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let policy = Server::start("policy", &root, &[]);
    let env = [("FERROTUNE__ENDPOINTS__POLICY", policy.url.as_str())];
    let r = recipe(&root, "runs/c", 1_000_000, 2);
    let text = std::fs::read_to_string(&r).unwrap();
    let id = rt().block_on(async {
        let mut p = PolicyServiceClient::connect(policy.url.clone()).await.unwrap();
        p.start_sft(StartRecipeJobRequest { recipe_yaml: text, overrides: vec![], resume: false })
            .await
            .unwrap()
            .into_inner()
            .job
            .unwrap()
            .id
    });
    wait_job(&root, &env, &id, |j| j["step"].as_u64().unwrap_or(0) >= 1);
    ok(&run_cli_env(&root, &env, &["jobs", "cancel", &id]));
    let w = ok(&run_cli_env(&root, &env, &["jobs", "watch", &id, "--json"]));
    assert!(w.contains("\"state\":\"cancelled\""), "{w}");
    let j = wait_job(&root, &env, &id, |j| j["state"] == "cancelled");
    assert!(j["step"].as_u64().unwrap() < 1_000_000);
    assert!(root.join("runs/c/checkpoints").exists(), "a cancelled job keeps a checkpoint");
}

#[test]
fn smollm2_services_health_reflection_auth_and_bad_requests() {
    let model = smollm2_dir();
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let env = [
        ("FERROTUNE__AUTH__TOKEN", "s3cret"),
        ("FERROTUNE__POLICY__PRELOAD", "smollm2-135m-instruct"),
        ("FERROTUNE__LIMITS__MAX_MESSAGE_BYTES", "65536"),
        ("FERROTUNE__LIMITS__MAX_TEXT_BYTES", "1000"),
    ];
    let server = Server::start("data,policy,merge", &root, &env);
    let url = server.url.clone();
    rt().block_on(async move {
        let ch = tonic::transport::Endpoint::from_shared(url.clone()).unwrap().connect().await.unwrap();
        // Health is open (probes carry no token): NOT_SERVING while the preloaded model loads, then SERVING.
        let mut health = HealthClient::new(ch.clone());
        let mut watch = health
            .watch(HealthCheckRequest { service: "ferrotune.v1.PolicyService".into() })
            .await
            .unwrap()
            .into_inner();
        let mut seen = vec![];
        while let Some(s) = tokio_stream::StreamExt::next(&mut watch).await {
            let st = s.unwrap().status();
            seen.push(st);
            if st == ServingStatus::Serving {
                break;
            }
        }
        assert_eq!(seen.first(), Some(&ServingStatus::NotServing), "{seen:?}");
        assert_eq!(seen.last(), Some(&ServingStatus::Serving));
        // Auth: missing or wrong token → UNAUTHENTICATED.
        let mut anon = DataServiceClient::new(ch.clone());
        let tok = TokenizeRequest { model: Some(ModelRef { path: "smollm2-135m-instruct".into() }), text: "hi".into() };
        assert_eq!(anon.tokenize(tok.clone()).await.unwrap_err().code(), Code::Unauthenticated);
        let bearer = |t: &'static str| {
            move |mut r: tonic::Request<()>| {
                r.metadata_mut().insert("authorization", format!("Bearer {t}").parse().unwrap());
                Ok(r)
            }
        };
        let mut wrong = DataServiceClient::with_interceptor(ch.clone(), bearer("nope"));
        assert_eq!(wrong.tokenize(tok.clone()).await.unwrap_err().code(), Code::Unauthenticated);
        let mut data = DataServiceClient::with_interceptor(ch.clone(), bearer("s3cret"));
        assert!(!data.tokenize(tok.clone()).await.unwrap().into_inner().ids.is_empty());
        // Reflection lists every service.
        let mut refl = tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::with_interceptor(
            ch.clone(),
            bearer("s3cret"),
        );
        use tonic_reflection::pb::v1::{
            server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
            ServerReflectionRequest,
        };
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = refl.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
        let msg = tokio_stream::StreamExt::next(&mut resp).await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else { panic!("no service list") };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for n in [
            "ferrotune.v1.DataService",
            "ferrotune.v1.PolicyService",
            "ferrotune.v1.MergeService",
            "ferrotune.v1.JobService",
            "grpc.health.v1.Health",
        ] {
            assert!(names.iter().any(|x| x == n), "{n} not in {names:?}");
        }
        // The older reflection version (grpcio-reflection's client, older grpcurl) is served too.
        {
            use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
            use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
            use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
            use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
            let mut old = ServerReflectionClient::with_interceptor(ch.clone(), bearer("s3cret"));
            let req = ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            };
            let mut resp = old.server_reflection_info(tokio_stream::iter(vec![req])).await.unwrap().into_inner();
            let msg = tokio_stream::StreamExt::next(&mut resp).await.unwrap().unwrap();
            let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else { panic!("no list") };
            assert!(list.service.iter().any(|s| s.name == "ferrotune.v1.PolicyService"), "{:?}", list.service);
        }
        // Path traversal.
        for bad in ["../outside", "/etc"] {
            let e = data
                .tokenize(TokenizeRequest { model: Some(ModelRef { path: bad.into() }), text: "hi".into() })
                .await
                .unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "{bad}: {e:?}");
        }
        // Malformed requests → INVALID_ARGUMENT naming the field.
        let mut policy = PolicyServiceClient::with_interceptor(ch.clone(), bearer("s3cret"));
        let m = Some(ModelRef { path: "smollm2-135m-instruct".into() });
        let e = policy
            .generate(GenerateRequest { model: m.clone(), prompts: vec![], ..Default::default() })
            .await
            .unwrap_err();
        assert!(e.code() == Code::InvalidArgument && e.message().starts_with("prompts"), "{e:?}");
        let e = policy
            .generate(GenerateRequest { model: m.clone(), prompts: vec![Prompt { kind: None }], ..Default::default() })
            .await
            .unwrap_err();
        assert!(e.code() == Code::InvalidArgument && e.message().contains("prompts[0]"), "{e:?}");
        let ids = Prompt { kind: Some(prompt::Kind::Ids(ferrotune_proto::v1::TokenIds { ids: vec![1, 999_999] })) };
        let e = policy
            .generate(GenerateRequest { model: m.clone(), prompts: vec![ids], ..Default::default() })
            .await
            .unwrap_err();
        assert!(e.code() == Code::InvalidArgument && e.message().contains("outside the vocabulary"), "{e:?}");
        // Texts beyond limits.max_text_bytes (1000 here): refused before tokenizing.
        let long = Prompt { kind: Some(prompt::Kind::Text("x".repeat(2000))) };
        let e = policy.generate(GenerateRequest { model: m.clone(), prompts: vec![long], ..Default::default() }).await;
        let e = e.unwrap_err();
        assert!(e.code() == Code::ResourceExhausted && e.message().contains("limits.max_text_bytes"), "{e:?}");
        let e = data.tokenize(TokenizeRequest { model: m.clone(), text: "x".repeat(2000) }).await.unwrap_err();
        assert!(e.code() == Code::ResourceExhausted && e.message().contains("limits.max_text_bytes"), "{e:?}");
        // prompts × new tokens beyond policy.max_generated_tokens (65536): refused before any work.
        let many: Vec<Prompt> = (0..64).map(|_| Prompt { kind: Some(prompt::Kind::Text("hi".into())) }).collect();
        let req = GenerateRequest { model: m.clone(), prompts: many, max_new_tokens: 4096, ..Default::default() };
        let e = policy.generate(req).await.unwrap_err();
        assert!(e.code() == Code::ResourceExhausted && e.message().contains("policy.max_generated_tokens"), "{e:?}");
        // A negative or NaN temperature is an error, not a silent switch to greedy decoding.
        for t in [-1.0, f32::NAN] {
            let hi = Prompt { kind: Some(prompt::Kind::Text("hi".into())) };
            let sampling = Some(ferrotune_proto::v1::Sampling { temperature: t, ..Default::default() });
            let req = GenerateRequest { model: m.clone(), prompts: vec![hi], sampling, ..Default::default() };
            let e = policy.generate(req).await.unwrap_err();
            assert!(e.code() == Code::InvalidArgument && e.message().starts_with("sampling.temperature"), "{e:?}");
        }
        let seq = ScoredSequence { prompt_ids: vec![], completion_ids: vec![5] };
        let e = policy
            .log_probs(LogProbsRequest { model: m.clone(), sequences: vec![seq], ..Default::default() })
            .await
            .unwrap_err();
        assert!(e.code() == Code::InvalidArgument && e.message().contains("sequences[0]"), "{e:?}");
        let e = policy
            .start_sft(StartRecipeJobRequest { recipe_yaml: "model: [unclosed".into(), ..Default::default() })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        let mut jobs = JobServiceClient::with_interceptor(ch.clone(), bearer("s3cret"));
        assert_eq!(jobs.get_job(GetJobRequest { id: "nope".into() }).await.unwrap_err().code(), Code::NotFound);
        // A message over the configured limit is refused; the server stays healthy.
        let huge = TokenizeRequest { model: m.clone(), text: "x".repeat(200_000) };
        let e = data.tokenize(huge).await.unwrap_err();
        assert!(matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument), "{e:?}");
        // LogProbs with the adapter disabled without an adapter is a contradiction.
        let e = policy
            .log_probs(LogProbsRequest {
                model: m.clone(),
                disable_adapter: true,
                sequences: vec![ScoredSequence { prompt_ids: vec![1], completion_ids: vec![2] }],
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        let st = health.check(HealthCheckRequest { service: String::new() }).await.unwrap().into_inner().status();
        assert_eq!(st, ServingStatus::Serving);
        // And real work still succeeds: log-probs equal a direct forward pass of the model.
        let prompt_ids = data
            .tokenize(TokenizeRequest { model: m.clone(), text: "The capital of France is".into() })
            .await
            .unwrap()
            .into_inner()
            .ids;
        let completion =
            data.tokenize(TokenizeRequest { model: m.clone(), text: " Paris".into() }).await.unwrap().into_inner().ids;
        let lp = policy
            .log_probs(LogProbsRequest {
                model: m.clone(),
                sequences: vec![ScoredSequence { prompt_ids: prompt_ids.clone(), completion_ids: completion.clone() }],
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let b = ferrotune_core::ModelBundle::load(&model, tch::Kind::Float, tch::Device::Cpu).unwrap();
        let all: Vec<i64> = prompt_ids.iter().chain(&completion).map(|&x| x as i64).collect();
        let logits = b.model.forward(&tch::Tensor::from_slice(&all).unsqueeze(0), None, None).unwrap();
        let lsm = logits.log_softmax(-1, tch::Kind::Float);
        let pos = prompt_ids.len() as i64 - 1;
        let want = lsm.double_value(&[0, pos, completion[0] as i64]);
        let got = lp.sequences[0].logprobs[0] as f64;
        assert!((want - got).abs() < 1e-4, "log p(Paris) {got} vs {want}");
    });
    let status = server.terminate();
    assert!(status.success(), "graceful shutdown: {status:?}");
}

#[test]
fn combine_adapters_through_the_cli() {
    let fx = |n: &str| ferrotune_tests::fixture(&format!("tiny-lora/combine/{n}")).display().to_string();
    let t = tempfile::tempdir().unwrap();
    let out = t.path().join("cat");
    let (a, b, c) = (format!("{}=0.7", fx("a")), format!("{}=-0.4", fx("b")), format!("{}=1", fx("c")));
    let v = last_json(&ok(&run_cli_env(
        t.path(),
        &[],
        &[
            "combine",
            "--adapter",
            &a,
            "--adapter",
            &b,
            "--combination",
            "cat",
            "--out",
            out.to_str().unwrap(),
            "--json",
        ],
    )));
    assert_eq!(v["r"], 8);
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_i64(), cfg["lora_alpha"].as_f64()), (Some(8), Some(8.0)));
    let fails = |args: &[&str], needle: &str| {
        let o = run_cli_env(t.path(), &[], args);
        let e = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && e.contains(needle) && e.trim_end().lines().count() == 1, "{args:?}: {e}");
    };
    let o = t.path().join("x").display().to_string();
    fails(&["combine", "--adapter", &a, "--adapter", &c, "--out", &o], "one rank");
    fails(
        &["combine", "--adapter", &a, "--adapter", &b, "--combination", "ties", "--density", "0", "--out", &o],
        "density: 0 is not in (0, 1]",
    );
    fails(&["combine", "--adapter", &a, "--combination", "average", "--out", &o], "unknown combination `average`");
    fails(&["combine", "--adapter", "no-weight", "--out", &o], "expected DIR=WEIGHT");
    fails(&["combine", "--adapter", "/nonexistent=1", "--out", &o], "/nonexistent is not an adapter directory");
}

#[test]
fn smollm2_services_over_tls() {
    smollm2_dir();
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
    std::fs::write(root.join("cert.pem"), ck.cert.pem()).unwrap();
    std::fs::write(root.join("key.pem"), ck.signing_key.serialize_pem()).unwrap();
    let (cert, key) = (root.join("cert.pem").display().to_string(), root.join("key.pem").display().to_string());
    let server = Server::start("data", &root, &[("FERROTUNE__TLS__CERT", &cert), ("FERROTUNE__TLS__KEY", &key)]);
    let https = format!("https://{}", server.addr());
    let tokenize = ["tokenize", "--model", "smollm2-135m-instruct", "--text", "hi", "--json"];
    // Trusting the server's certificate: works.
    let o = run_cli_env(&root, &[("FERROTUNE__ENDPOINTS__DATA", &https), ("FERROTUNE__TLS__CA", &cert)], &tokenize);
    assert!(last_json(&ok(&o))["ids"].as_array().is_some_and(|a| !a.is_empty()));
    // Without the CA the certificate is not trusted; plaintext cannot talk to a TLS server.
    let o = run_cli_env(&root, &[("FERROTUNE__ENDPOINTS__DATA", &https)], &tokenize);
    assert!(!o.status.success(), "an untrusted certificate must be refused");
    let o = run_cli_env(&root, &[("FERROTUNE__ENDPOINTS__DATA", &server.url)], &tokenize);
    assert!(!o.status.success(), "plaintext against TLS must fail");
    assert_eq!(String::from_utf8_lossy(&o.stderr).trim_end().lines().count(), 1);
}

#[test]
fn jobs_commands_reach_reward_jobs_too() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let model = format!("model={}", tiny_chat_in(&root));
    std::fs::copy(repo("recipes/data/pirate-prefs-train.jsonl"), root.join("prefs.jsonl")).unwrap();
    std::fs::copy(repo("recipes/reward.yaml"), root.join("reward.yaml")).unwrap();
    let policy = Server::start("policy", &root, &[("FERROTUNE__JOBS__DB", ".ferrotune/jobs-policy.sqlite")]);
    let reward = Server::start("reward", &root, &[("FERROTUNE__JOBS__DB", ".ferrotune/jobs-reward.sqlite")]);
    let env =
        [("FERROTUNE__ENDPOINTS__POLICY", policy.url.as_str()), ("FERROTUNE__ENDPOINTS__REWARD", reward.url.as_str())];
    let args = [
        "train",
        "reward",
        "--recipe",
        "reward.yaml",
        "--output-dir",
        "rm",
        "--set",
        "data.path=prefs.jsonl",
        "--set",
        &model,
    ];
    let o = run_cli_env(&root, &env, &[&args[..], &["--max-steps", "1", "--json"]].concat());
    let out = ok(&o);
    let id = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v["job_id"].as_str().map(str::to_owned))
        .unwrap_or_else(|| panic!("no job id in {out}"));
    // `jobs list` gathers the policy's and the reward service's jobs; get finds the reward job there.
    let list: serde_json::Value =
        serde_json::from_str(&ok(&run_cli_env(&root, &env, &["jobs", "list", "--json"]))).unwrap();
    let kinds: Vec<(&str, &str)> =
        list.as_array().unwrap().iter().map(|j| (j["id"].as_str().unwrap(), j["kind"].as_str().unwrap())).collect();
    assert!(kinds.contains(&(id.as_str(), "reward")), "{kinds:?}");
    let got: serde_json::Value =
        serde_json::from_str(&ok(&run_cli_env(&root, &env, &["jobs", "get", &id, "--json"]))).unwrap();
    assert_eq!((got["kind"].as_str(), got["state"].as_str()), (Some("reward"), Some("succeeded")));
    let o = run_cli_env(&root, &env, &["jobs", "get", "no-such-job"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("not found on") && err.contains(&reward.url), "{err}");
}

/// `policy.devices: [cpu, cpu]`: a served SFT job runs on 2 ranks (through the launcher of `--nproc-per-node`),
/// streams its steps as job events and gives the losses of the CLI's own 2-rank run; cancelled, the ranks stop
/// together after a checkpoint and the job ends cancelled.
#[test]
fn services_policy_with_two_devices_runs_sft_data_parallel() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let policy = Server::start("policy", &root, &[("FERROTUNE__POLICY__DEVICES", "cpu,cpu")]);
    let env = [("FERROTUNE__ENDPOINTS__POLICY", policy.url.as_str())];
    let r = recipe(&root, "runs/dp", 4, 2);
    let served = ok(&run_cli_env(&root, &env, &["train", "sft", "--recipe", r.to_str().unwrap(), "--json"]));
    let steps = served.lines().filter(|l| l.contains("\"tokens_per_s\"")).count();
    assert_eq!(steps, 4, "every step streamed as a job event: {served}");
    assert!(last_json(&served)["done"].as_bool().unwrap_or(false), "{served}");
    let cli = ["train", "sft", "--recipe", r.to_str().unwrap(), "--output-dir", "runs/cli", "--nproc-per-node", "2"];
    ok(&run_cli_env(&root, &[], &cli));
    let losses = |d: &str| -> Vec<(f64, bool)> {
        std::fs::read_to_string(root.join(d).join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .map(|v| (v["loss"].as_f64().unwrap(), v["metrics"].get("dist/comm_s").is_some()))
            .collect()
    };
    let (a, b) = (losses("runs/dp"), losses("runs/cli"));
    assert_eq!(a.len(), 4);
    assert!(a.iter().all(|(_, dist)| *dist), "the served job ran on 2 ranks");
    for (i, (x, y)) in a.iter().zip(&b).enumerate() {
        assert!((x.0 - y.0).abs() <= 1e-6 * y.0.abs(), "step {}: served {} vs CLI {}", i + 1, x.0, y.0);
    }
    assert!(root.join("runs/dp/adapter_model.safetensors").exists());
    // Cancel a long one: every rank checkpoints and stops; the job ends cancelled.
    let long = recipe(&root, "runs/long", 1_000_000, 2);
    let text = std::fs::read_to_string(&long).unwrap();
    let id = rt().block_on(async {
        let mut p = PolicyServiceClient::connect(policy.url.clone()).await.unwrap();
        let req = StartRecipeJobRequest { recipe_yaml: text, overrides: vec![], resume: false };
        p.start_sft(req).await.unwrap().into_inner().job.unwrap().id
    });
    wait_job(&root, &env, &id, |j| j["step"].as_u64().unwrap_or(0) >= 3);
    ok(&run_cli_env(&root, &env, &["jobs", "cancel", &id]));
    let j = wait_job(&root, &env, &id, |j| j["state"] != "running" && j["state"] != "queued");
    assert_eq!(j["state"].as_str(), Some("cancelled"), "{j}");
    assert!(ferrotune_tests::newest_checkpoint(&root.join("runs/long")).unwrap_or(0) >= 3, "checkpointed on stop");
}
