//! The tower layer every server's gRPC routes sit behind: counts calls by service, method and status code
//! (the code from a trailers-only answer's headers, or from the trailers at the end of the body), times them
//! to the end of the response, tracks calls in flight, and sheds load: beyond `limits.concurrency` calls in
//! flight in the process a new call is answered RESOURCE_EXHAUSTED at once (health checks are never shed).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tonic::body::Body;
use tonic::codegen::http::{HeaderMap, Request, Response};
use tonic::codegen::Bytes;
use tower::{Layer, Service};

use super::{GRPC_IN_FLIGHT, GRPC_LATENCY, GRPC_REQUESTS, GRPC_SHED};

/// gRPC status codes by number, as their canonical names.
const CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

fn code_of(h: &HeaderMap) -> Option<&'static str> {
    let n: usize = h.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
    Some(CODES.get(n).copied().unwrap_or("UNKNOWN"))
}

/// (service, method) of a gRPC path; paths of services nobody hosts become `unknown` (a caller must not be
/// able to grow the label set at will).
fn labels_of(path: &str) -> (String, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let (s, m) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let known = (s.starts_with("ferrotune.v1.") || s.starts_with("grpc."))
        && s.len() <= 64
        && m.len() <= 64
        && !m.contains('/')
        && s.chars().chain(m.chars()).all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_');
    if known {
        (s.to_owned(), m.to_owned())
    } else {
        ("unknown".into(), "unknown".into())
    }
}

/// The layer (one per server: the in-flight count is the process's).
#[derive(Clone)]
pub struct GrpcMetricsLayer {
    limit: usize,
    in_flight: Arc<AtomicUsize>,
}

impl GrpcMetricsLayer {
    /// Sheds calls beyond `limit` in flight.
    pub fn new(limit: usize) -> Self {
        Self { limit: limit.max(1), in_flight: Arc::new(AtomicUsize::new(0)) }
    }
}

impl<S> Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;
    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner, limit: self.limit, in_flight: self.in_flight.clone() }
    }
}

/// The service of [`GrpcMetricsLayer`].
#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    limit: usize,
    in_flight: Arc<AtomicUsize>,
}

/// Records one call once: when its response body ends or is dropped (or the call is dropped unanswered).
struct Recorder {
    service: String,
    method: String,
    start: Instant,
    code: Option<&'static str>,
}

impl Recorder {
    /// Records the call now, with `code`.
    fn end(mut self, code: &'static str) {
        self.code = Some(code);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        let code = self.code.unwrap_or("CANCELLED");
        let method = if code == "UNIMPLEMENTED" { "unknown" } else { self.method.as_str() };
        GRPC_REQUESTS.inc(&[&self.service, method, code]);
        GRPC_LATENCY.observe(&[&self.service, method], self.start.elapsed().as_secs_f64());
    }
}

/// Decrements the in-flight count when the handler is done (or dropped).
struct InFlight {
    count: Arc<AtomicUsize>,
    service: String,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.count.fetch_sub(1, Ordering::SeqCst);
        GRPC_IN_FLIGHT.add(&[&self.service], -1.0);
    }
}

/// A response body that reports its call's code when it ends.
struct Metered {
    inner: Body,
    rec: Recorder,
}

impl tonic::codegen::Body for Metered {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, tonic::Status>>> {
        let this = &mut *self;
        let r = Pin::new(&mut this.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(f))) => {
                if let Some(t) = f.trailers_ref() {
                    this.rec.code = code_of(t).or(Some("OK"));
                }
            }
            Poll::Ready(Some(Err(s))) => this.rec.code = CODES.get(s.code() as usize).copied(),
            Poll::Ready(None) => {
                this.rec.code.get_or_insert("OK");
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B> Service<Request<B>> for GrpcMetrics<S>
where
    S: Service<Request<B>, Response = Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    B: Send + 'static,
{
    type Response = Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<Response<Body>, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let (service, method) = labels_of(req.uri().path());
        let n = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        if n > self.limit && service != "grpc.health.v1.Health" {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            GRPC_SHED.inc(&[&service, &method]);
            GRPC_REQUESTS.inc(&[&service, &method, "RESOURCE_EXHAUSTED"]);
            let msg = format!("{} calls in flight (limits.concurrency); try again later", self.limit);
            return Box::pin(std::future::ready(Ok(tonic::Status::resource_exhausted(msg).into_http())));
        }
        GRPC_IN_FLIGHT.add(&[&service], 1.0);
        let guard = InFlight { count: self.in_flight.clone(), service: service.clone() };
        let mut rec = Recorder { service, method, start: Instant::now(), code: None };
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let r = inner.call(req).await;
            drop(guard);
            match r {
                Ok(resp) => {
                    rec.code = code_of(resp.headers());
                    Ok(resp.map(|b| Body::new(Metered { inner: b, rec })))
                }
                Err(e) => {
                    rec.end("UNKNOWN");
                    Err(e)
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_bounded() {
        assert_eq!(
            labels_of("/ferrotune.v1.PolicyService/Generate"),
            ("ferrotune.v1.PolicyService".into(), "Generate".into())
        );
        assert_eq!(labels_of("/grpc.health.v1.Health/Check"), ("grpc.health.v1.Health".into(), "Check".into()));
        assert_eq!(labels_of("/evil\"label/x"), ("unknown".into(), "unknown".into()));
        assert_eq!(labels_of(&format!("/ferrotune.v1.{}/M", "x".repeat(100))), ("unknown".into(), "unknown".into()));
        let mut h = HeaderMap::new();
        h.insert("grpc-status", "3".parse().unwrap());
        assert_eq!(code_of(&h), Some("INVALID_ARGUMENT"));
        h.insert("grpc-status", "99".parse().unwrap());
        assert_eq!(code_of(&h), Some("UNKNOWN"));
    }
}
