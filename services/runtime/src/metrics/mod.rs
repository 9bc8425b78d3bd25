//! Prometheus metrics of a `serve` process, on `GET /metrics` at `metrics.listen`: gRPC requests by service,
//! method and code, their latency, requests in flight and shed, jobs by kind and state, training steps (time,
//! tokens/s, loss), reward Score batches and their queue wait, loaded models, the process's memory, CPU
//! time and open files, and GPU memory where NVIDIA's driver is. Families are process-wide statics fed where the work happens.

pub mod gpu;
pub mod grpc;
pub mod otlp;
pub mod registry;

use std::convert::Infallible;

use registry::{Collected, Histogram, Scalar};

const LATENCY: &[f64] = &[0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
const STEP: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
const BATCH: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
const WAIT: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0];

/// gRPC calls answered, by full service name, method and status code.
pub static GRPC_REQUESTS: Scalar =
    Scalar::counter("ferrotune_grpc_requests_total", "gRPC calls answered.", &["service", "method", "code"]);
/// Calls refused because `limits.concurrency` calls were in flight.
pub static GRPC_SHED: Scalar = Scalar::counter(
    "ferrotune_grpc_load_shed_total",
    "gRPC calls refused with RESOURCE_EXHAUSTED because limits.concurrency calls were in flight.",
    &["service", "method"],
);
/// Calls being handled.
pub static GRPC_IN_FLIGHT: Scalar =
    Scalar::gauge("ferrotune_grpc_requests_in_flight", "gRPC calls being handled.", &["service"]);
/// Call latency, to the end of the response (streams: their last message).
pub static GRPC_LATENCY: Histogram = Histogram::new(
    "ferrotune_grpc_request_duration_seconds",
    "gRPC call latency to the end of the response.",
    &["service", "method"],
    LATENCY,
);
/// Optimizer steps done by jobs of this process.
pub static TRAIN_STEPS: Scalar =
    Scalar::counter("ferrotune_training_steps_total", "Optimizer steps of this process's jobs.", &["kind"]);
/// Wall time of an optimizer step.
pub static TRAIN_STEP_TIME: Histogram =
    Histogram::new("ferrotune_training_step_duration_seconds", "Wall time of one optimizer step.", &["kind"], STEP);
/// Tokens per second of the last step.
pub static TRAIN_TOKENS_PER_S: Scalar = Scalar::gauge(
    "ferrotune_training_tokens_per_second",
    "Input tokens per second of the last optimizer step.",
    &["kind"],
);
/// Loss of the last step.
pub static TRAIN_LOSS: Scalar = Scalar::gauge("ferrotune_training_loss", "Loss of the last optimizer step.", &["kind"]);
/// Items per Score batch on the reward worker.
pub static SCORE_BATCH: Histogram =
    Histogram::new("ferrotune_score_batch_size", "Items scored together in one batch.", &[], BATCH);
/// Time a Score call waited for its batch to start.
pub static SCORE_WAIT: Histogram = Histogram::new(
    "ferrotune_score_queue_wait_seconds",
    "Time a Score call waited before its batch went to the model.",
    &[],
    WAIT,
);
/// Models held in a service's cache.
pub static MODELS_LOADED: Scalar =
    Scalar::gauge("ferrotune_models_loaded", "Models (with their adapters) held in memory.", &["service"]);

const SCALARS: [&Scalar; 7] =
    [&GRPC_REQUESTS, &GRPC_SHED, &GRPC_IN_FLIGHT, &TRAIN_STEPS, &TRAIN_TOKENS_PER_S, &TRAIN_LOSS, &MODELS_LOADED];
const HISTOGRAMS: [&Histogram; 4] = [&GRPC_LATENCY, &TRAIN_STEP_TIME, &SCORE_BATCH, &SCORE_WAIT];

/// The whole exposition.
pub fn render() -> String {
    registry::render(&snapshot())
}

/// Every family now (for the text exposition and the OTLP exporter).
pub fn snapshot() -> Vec<registry::Snapshot> {
    let mut out: Vec<registry::Snapshot> = SCALARS.iter().map(|s| s.snapshot()).collect();
    out.extend(HISTOGRAMS.iter().map(|h| h.snapshot()));
    out.extend(registry::collected());
    out.extend(process_values().into_iter().map(|(name, kind, help, v)| registry::Snapshot {
        name,
        help,
        kind,
        points: registry::Points::Scalar(vec![(vec![], v)]),
    }));
    out
}

/// `process_*` families as the Prometheus client libraries name them (name, type, help, value), read from
/// /proc (not files of the artifact root, so not through fsx).
fn process_values() -> Vec<(&'static str, &'static str, &'static str, f64)> {
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as f64;
    // SAFETY: as above.
    let tick = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let mut pages = statm.split_whitespace().map(|x| x.parse::<f64>().unwrap_or(0.0));
    let (virt, rss) = (pages.next().unwrap_or(0.0) * page, pages.next().unwrap_or(0.0) * page);
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is field 3, utime 14, stime 15, starttime 22.
    let after: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let field = |n: usize| after.get(n - 3).and_then(|x| x.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu = (field(14) + field(15)) / tick;
    let btime = std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("btime ").and_then(|x| x.trim().parse::<f64>().ok()))
        .unwrap_or(0.0);
    let start = btime + field(22) / tick;
    let fds = std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0) as f64;
    vec![
        ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes.", rss),
        ("process_virtual_memory_bytes", "gauge", "Virtual memory size in bytes.", virt),
        ("process_cpu_seconds_total", "counter", "Total user and system CPU time spent in seconds.", cpu),
        ("process_open_fds", "gauge", "Number of open file descriptors.", fds),
        ("process_start_time_seconds", "gauge", "Start time of the process since unix epoch in seconds.", start),
    ]
}

/// Adds a scrape-time family source (jobs by state, …).
pub fn add_collector(c: impl Fn() -> Vec<Collected> + Send + Sync + 'static) {
    registry::add_collector(Box::new(c));
}

/// Serves `GET /metrics` (and 404 elsewhere) on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener) {
    gpu::register();
    use http_body_util::Full;
    use hyper::body::Bytes;
    serve_http1(listener, |req: hyper::Request<hyper::body::Incoming>| async move {
        let (status, ctype, body) = match (req.method().as_str(), req.uri().path()) {
            ("GET", "/metrics") => (200, "text/plain; version=0.0.4; charset=utf-8", render()),
            _ => (404, "text/plain", "not found: metrics are at GET /metrics\n".to_owned()),
        };
        hyper::Response::builder()
            .status(status)
            .header("content-type", ctype)
            .body(Full::new(Bytes::from(body)))
            .expect("a valid response")
    })
    .await
}

/// Serves HTTP/1.1 on `listener` until the process ends, each connection on its own task and every request
/// answered by `handle` (the metrics endpoint here, the CLI's dashboard).
pub async fn serve_http1<F, Fut, B>(listener: tokio::net::TcpListener, handle: F)
where
    F: Fn(hyper::Request<hyper::body::Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = hyper::Response<B>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let h = handle.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let answer = h(req);
                async move { Ok::<_, Infallible>(answer.await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                .await;
        });
    }
}
