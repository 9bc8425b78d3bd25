//! One telemetry init for services and the CLI: `tracing` logs to stderr (filter from config or
//! `RUST_LOG`), and, when `telemetry.otlp_endpoint` is set, spans exported over OTLP/gRPC. The W3C trace
//! context travels in gRPC metadata (`traceparent`), so a trace started by the CLI continues in every
//! service it calls.

use opentelemetry::propagation::Extractor;
use opentelemetry::trace::TracerProvider as _;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer as _;

use crate::settings::Telemetry;

/// Flushes exported spans when dropped.
pub struct TelemetryGuard {
    provider: Option<opentelemetry_sdk::trace::SdkTracerProvider>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

/// Installs the global subscriber (once per process; later calls only return a guard) and the W3C
/// propagator. `default_log` applies when neither `RUST_LOG` nor the config overrides it.
pub fn init(t: &Telemetry, service_name: &str) -> anyhow::Result<TelemetryGuard> {
    opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| t.log.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .map_err(|e| anyhow::anyhow!("telemetry.log `{filter}`: {e}"))?;
    // Each layer filters for itself: a quiet terminal (the CLI logs warnings only) still exports its spans.
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false).with_filter(filter);
    let (otel, provider) = match &t.otlp_endpoint {
        Some(ep) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(ep.clone())
                .build()
                .map_err(|e| anyhow::anyhow!("telemetry.otlp_endpoint `{ep}`: {e}"))?;
            let name = if t.service_name.is_empty() {
                service_name.to_owned()
            } else {
                format!("{}-{service_name}", t.service_name)
            };
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(opentelemetry_sdk::Resource::builder().with_service_name(name).build())
                .build();
            let tracer = provider.tracer("ferrotune");
            opentelemetry::global::set_tracer_provider(provider.clone());
            let spans = tracing_subscriber::filter::Targets::new().with_default(tracing::Level::INFO);
            (Some(tracing_opentelemetry::layer().with_tracer(tracer).with_filter(spans)), Some(provider))
        }
        None => (None, None),
    };
    // Already initialised (embedded servers inside the CLI, tests): keep the first subscriber.
    let _ = tracing_subscriber::registry().with(fmt).with(otel).try_init();
    Ok(TelemetryGuard { provider })
}

struct HeaderExtractor<'a>(&'a tonic::codegen::http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The server span of one gRPC request, child of the caller's trace when `traceparent` is present.
pub fn server_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&HeaderExtractor(req.headers())));
    let traceparent = req.headers().get("traceparent").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let span = tracing::info_span!("grpc", rpc = %req.uri().path(), traceparent = %traceparent);
    let _ = span.set_parent(parent);
    span
}
