//! Prometheus metrics of a `serve` process: a policy + reward server with `metrics.listen` runs a tiny SFT
//! job, answers Score calls (one bad), sheds a call while `limits.concurrency` (1) calls are in flight, and its
//! `/metrics` passes `promtool check metrics` (Debian's prometheus package) and counts exactly that.

use std::path::Path;
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

use ferrotune_proto::v1::policy_service_client::PolicyServiceClient;
use ferrotune_proto::v1::reward_model_ref::Kind;
use ferrotune_proto::v1::reward_service_client::RewardServiceClient;
use ferrotune_proto::v1::{prompt, GenerateRequest, ModelRef, Prompt, Sampling};
use ferrotune_proto::v1::{RewardModelRef, ScoreItem, ScoreRequest};
use ferrotune_runtime::tracking::http::{self, Body, Endpoint};
use ferrotune_tests::{repo, run_cli_env, tiny_chat_in, Server};
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{ExportMetricsServiceRequest, ExportMetricsServiceResponse};
use opentelemetry_proto::tonic::metrics::v1::{metric as otlp_metric, number_data_point};

fn scrape(ep: &Endpoint) -> String {
    let r = http::request(ep, "GET", "/metrics", None, Body::Empty).expect("GET /metrics");
    assert_eq!(r.status, 200);
    String::from_utf8(r.body).unwrap()
}

/// The value of the series `name{labels}` exactly as written (labels in their order), if present.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')).and_then(|v| v.parse().ok()))
}

fn score(url: &str, items: Vec<ScoreItem>) -> Result<(), tonic::Status> {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
        let mut c = RewardServiceClient::connect(url.to_owned()).await.unwrap();
        let model = Some(RewardModelRef { kind: Some(Kind::Rule("length".into())) });
        c.score(ScoreRequest { model, items }).await.map(|_| ())
    })
}

fn item() -> ScoreItem {
    ScoreItem { prompt: "p".into(), response: "four".into(), reference: String::new() }
}

fn recipe(root: &Path) -> std::path::PathBuf {
    std::fs::copy(repo("recipes/data/pirate-train.jsonl"), root.join("pirate-train.jsonl")).unwrap();
    let model = tiny_chat_in(root);
    let text = format!(
        "model: {model}\nadapter: {{method: lora, r: 4, target_modules: [q_proj, v_proj]}}\n\
         data: {{path: pirate-train.jsonl, format: messages, max_seq_len: 128}}\n\
         training: {{max_steps: 5, micro_batch_size: 1, save_steps: 0}}\noutput_dir: runs/m\n"
    );
    std::fs::write(root.join("m.yaml"), text).unwrap();
    root.join("m.yaml")
}

#[test]
fn metrics_endpoint_passes_promtool_and_counts_calls_jobs_and_shedding() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path().canonicalize().unwrap();
    let r = recipe(&root);
    let server = Server::start(
        "policy,reward",
        &root,
        &[("FERROTUNE__METRICS__LISTEN", "127.0.0.1:0"), ("FERROTUNE__LIMITS__CONCURRENCY", "1")],
    );
    let murl = server.line.split(" metrics ").nth(1).and_then(|r| r.split_whitespace().next());
    let murl = murl.expect("the metrics address on the listening line").to_owned();
    let ep = Endpoint::parse(murl.trim_end_matches("/metrics")).unwrap();
    let env = [("FERROTUNE__ENDPOINTS__POLICY", server.url.as_str())];
    let o = run_cli_env(&root, &env, &["train", "sft", "--recipe", r.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    score(&server.url, vec![item(), item()]).unwrap();
    assert_eq!(score(&server.url, vec![]).unwrap_err().code(), tonic::Code::InvalidArgument);

    // A long (unary) Generate holds the one slot; a Score meanwhile is shed.
    let url = server.url.clone();
    let generate = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
            let mut c = PolicyServiceClient::connect(url).await.unwrap();
            let prompt = Prompt { kind: Some(prompt::Kind::Text("hi".into())) };
            let req = GenerateRequest {
                model: Some(ModelRef { path: "tiny-chat".into() }),
                prompts: vec![prompt.clone(), prompt.clone(), prompt.clone(), prompt],
                max_new_tokens: 4096,
                sampling: Some(Sampling { temperature: 1.0, ..Default::default() }),
                ..Default::default()
            };
            c.generate(req).await.map(|_| ())
        })
    });
    let start = Instant::now();
    while value(&scrape(&ep), "ferrotune_grpc_requests_in_flight{service=\"ferrotune.v1.PolicyService\"}") != Some(1.0)
    {
        assert!(start.elapsed() < Duration::from_secs(60), "the Generate call never showed in flight");
        std::thread::sleep(Duration::from_millis(20));
    }
    let shed = score(&server.url, vec![item()]).unwrap_err();
    assert_eq!(shed.code(), tonic::Code::ResourceExhausted, "{shed:?}");
    assert!(shed.message().contains("limits.concurrency"), "{shed:?}");
    generate.join().unwrap().expect("the Generate call");

    let text = scrape(&ep);
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (make test-tools installs Debian's prometheus package)");
    std::io::Write::write_all(promtool.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    let p = promtool.wait_with_output().unwrap();
    let lint = format!("{}{}", String::from_utf8_lossy(&p.stdout), String::from_utf8_lossy(&p.stderr));
    assert!(p.status.success() && lint.trim().is_empty(), "promtool: {lint}\n{text}");

    let reward = "service=\"ferrotune.v1.RewardService\",method=\"Score\"";
    assert_eq!(value(&text, &format!("ferrotune_grpc_requests_total{{{reward},code=\"OK\"}}")), Some(1.0), "{text}");
    assert_eq!(
        value(&text, &format!("ferrotune_grpc_requests_total{{{reward},code=\"INVALID_ARGUMENT\"}}")),
        Some(1.0)
    );
    assert_eq!(
        value(&text, &format!("ferrotune_grpc_requests_total{{{reward},code=\"RESOURCE_EXHAUSTED\"}}")),
        Some(1.0)
    );
    assert_eq!(value(&text, &format!("ferrotune_grpc_load_shed_total{{{reward}}}")), Some(1.0));
    assert_eq!(value(&text, &format!("ferrotune_grpc_request_duration_seconds_count{{{reward}}}")), Some(2.0));
    let gen = "service=\"ferrotune.v1.PolicyService\",method=\"Generate\"";
    assert_eq!(value(&text, &format!("ferrotune_grpc_requests_total{{{gen},code=\"OK\"}}")), Some(1.0), "{text}");
    assert_eq!(value(&text, "ferrotune_grpc_requests_in_flight{service=\"ferrotune.v1.PolicyService\"}"), Some(0.0));
    assert_eq!(value(&text, "ferrotune_jobs{kind=\"sft\",state=\"succeeded\"}"), Some(1.0), "{text}");
    assert_eq!(value(&text, "ferrotune_training_steps_total{kind=\"sft\"}"), Some(5.0));
    assert_eq!(value(&text, "ferrotune_training_step_duration_seconds_count{kind=\"sft\"}"), Some(5.0));
    assert!(value(&text, "ferrotune_training_tokens_per_second{kind=\"sft\"}").unwrap() > 0.0);
    assert!(value(&text, "ferrotune_models_loaded{service=\"policy\"}").unwrap() >= 1.0, "{text}");
    assert!(value(&text, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(value(&text, "process_start_time_seconds").unwrap() > 1.7e9);
    let r = http::request(&ep, "GET", "/other", None, Body::Empty).unwrap();
    assert_eq!(r.status, 404);
}

/// A fake OTLP collector keeping every metrics export request.
#[derive(Clone, Default)]
struct MetricsCollector(std::sync::Arc<std::sync::Mutex<Vec<ExportMetricsServiceRequest>>>);

#[tonic::async_trait]
impl MetricsService for MetricsCollector {
    async fn export(
        &self,
        req: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.0.lock().unwrap().push(req.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse { partial_success: None }))
    }
}

#[test]
fn metrics_are_exported_over_otlp_when_a_collector_is_configured() {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let collector = MetricsCollector::default();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    rt.spawn(
        tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let t = tempfile::tempdir().unwrap();
    let env = [
        ("FERROTUNE__TELEMETRY__OTLP_ENDPOINT", otlp.as_str()),
        ("FERROTUNE__TELEMETRY__OTLP_METRICS_INTERVAL_S", "1"),
    ];
    let server = Server::start("reward", t.path(), &env);
    score(&server.url, vec![item()]).unwrap();
    score(&server.url, vec![item(), item()]).unwrap();
    // The newest export that counts both calls.
    let start = Instant::now();
    let (sum, service, rss) = loop {
        let found = collector.0.lock().unwrap().iter().rev().find_map(|req| {
            let rm = &req.resource_metrics[0];
            let service = rm.resource.as_ref().map(|r| format!("{:?}", r.attributes[0].value)).unwrap_or_default();
            let metrics = &rm.scope_metrics[0].metrics;
            let calls = metrics.iter().find(|m| m.name == "ferrotune_grpc_requests_total")?;
            let Some(otlp_metric::Data::Sum(s)) = &calls.data else { return None };
            let p = s
                .data_points
                .iter()
                .find(|p| p.attributes.iter().any(|a| format!("{:?}", a.value).contains("\"Score\"")))?;
            let v = match p.value {
                Some(number_data_point::Value::AsDouble(v)) => v,
                _ => return None,
            };
            let rss =
                metrics.iter().find(|m| m.name == "process_resident_memory_bytes").and_then(|m| match &m.data {
                    Some(otlp_metric::Data::Gauge(g)) => match g.data_points[0].value {
                        Some(number_data_point::Value::AsDouble(v)) => Some(v),
                        _ => None,
                    },
                    _ => None,
                })?;
            (v == 2.0).then_some((s.clone(), service, rss))
        });
        if let Some(f) = found {
            break f;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no export counted the two Score calls");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(sum.is_monotonic && sum.aggregation_temporality == 2, "a cumulative monotonic sum");
    assert!(service.contains("ferrotune-serve"), "{service}");
    assert!(rss > 1e6);
    drop(server);
}
