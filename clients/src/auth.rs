//! The client interceptor of every ferrotune call: the bearer token (when configured) and the W3C trace
//! context of the current span (`traceparent`), so a trace started by the CLI continues in every service.

use opentelemetry::propagation::Injector;
use tonic::metadata::MetadataValue;
use tonic::service::Interceptor;
use tonic::{Request, Status};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Client side: adds the bearer token (when configured) and the W3C trace context of the current span.
#[derive(Clone, Default)]
pub struct ClientAuth {
    header: Option<MetadataValue<tonic::metadata::Ascii>>,
}

impl ClientAuth {
    /// With `token`, sends it on every call.
    pub fn new(token: Option<&str>) -> anyhow::Result<Self> {
        let header = match token {
            Some(t) => Some(
                format!("Bearer {t}").parse().map_err(|_| anyhow::anyhow!("auth.token: not a valid header value"))?,
            ),
            None => None,
        };
        Ok(Self { header })
    }
}

impl Interceptor for ClientAuth {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(h) = &self.header {
            req.metadata_mut().insert("authorization", h.clone());
        }
        inject_context(req.metadata_mut());
        Ok(req)
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), value.parse()) {
            self.0.insert(k, v);
        }
    }
}

/// Writes the current span's trace context into outgoing metadata (the global propagator, which the
/// process's telemetry init installs).
pub fn inject_context(md: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut MetadataInjector(md)));
}
