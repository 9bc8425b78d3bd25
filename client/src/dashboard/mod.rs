//! The web dashboard `ferrotune serve` answers on `http.listen`: one page (assets built into the binary, no
//! CDN) over a small JSON API that is itself a gRPC client of this server and of the configured endpoints —
//! jobs across the services the process knows (list, a job's live events, cancel, artifact downloads), a
//! playground that streams a model's answer, and a form that starts a job from a recipe under the artifact
//! root. With `auth.token` set nothing is served without it: an `Authorization: Bearer` header, or the
//! `ferrotune_token` cookie the page gets by opening it once with `?token=…`.

mod api;

use std::convert::Infallible;
use std::sync::Arc;

use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame};

use api::Api;

/// A response with a whole or streamed body.
pub(crate) type Resp = hyper::Response<BoxBody<Bytes, Infallible>>;

const INDEX: &str = include_str!("index.html");
const APP_JS: &str = include_str!("app.js");
const STYLE: &str = include_str!("style.css");

/// A whole response.
pub(crate) fn full(status: u16, ctype: &str, body: impl Into<Bytes>) -> Resp {
    hyper::Response::builder()
        .status(status)
        .header("content-type", ctype)
        .header("cache-control", "no-store")
        .body(Full::new(body.into()).boxed())
        .expect("a valid response")
}

/// A JSON response.
pub(crate) fn json(status: u16, v: &serde_json::Value) -> Resp {
    full(status, "application/json", v.to_string())
}

/// A streamed response: one `data: JSON` line per message sent on the returned channel (server-sent events).
pub(crate) fn events() -> (tokio::sync::mpsc::Sender<serde_json::Value>, Resp) {
    use tokio_stream::StreamExt;
    let (tx, rx) = tokio::sync::mpsc::channel::<serde_json::Value>(256);
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(|v| Ok::<_, Infallible>(Frame::data(Bytes::from(format!("data: {v}\n\n")))));
    let resp = hyper::Response::builder()
        .status(200)
        .header("content-type", "text/event-stream")
        .header("cache-control", "no-store")
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .expect("a valid response");
    (tx, resp)
}

/// Compares in time independent of where the strings differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn cookie<'a>(req: &'a hyper::Request<hyper::body::Incoming>, name: &str) -> Option<&'a str> {
    req.headers().get_all("cookie").iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// The token a request carries, and whether it came in the query (then the page gets it as a cookie).
fn presented(req: &hyper::Request<hyper::body::Incoming>) -> (Option<String>, bool) {
    if let Some(h) = req.headers().get("authorization").and_then(|v| v.to_str().ok()) {
        return (h.strip_prefix("Bearer ").map(str::to_owned), false);
    }
    if let Some(c) = cookie(req, "ferrotune_token") {
        return (Some(c.to_owned()), false);
    }
    let q = api::query(req.uri().query().unwrap_or(""), "token");
    let from_query = q.is_some();
    (q, from_query)
}

/// Serves the dashboard on `listener` until the process ends.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    settings: ferrotune_runtime::Settings,
    me: String,
    root: ferrotune_runtime::ArtifactRoot,
) {
    let token = settings.auth.token.clone();
    let api = match Api::new(&settings, &me, root) {
        Ok(a) => Arc::new(a),
        Err(e) => {
            tracing::error!("dashboard not served: {e:#}");
            return;
        }
    };
    let token = Arc::new(token);
    ferrotune_runtime::metrics::serve_http1(listener, move |req| {
        let (api, token) = (api.clone(), token.clone());
        async move { handle(req, &api, token.as_deref()).await }
    })
    .await
}

async fn handle(req: hyper::Request<hyper::body::Incoming>, api: &Api, token: Option<&str>) -> Resp {
    let mut set_cookie = None;
    if let Some(t) = token {
        let (given, from_query) = presented(&req);
        if !given.as_deref().is_some_and(|g| same(g, t)) {
            return full(
                401,
                "text/plain",
                "unauthorized: this server needs its auth token (open the page with ?token=…)\n",
            );
        }
        if from_query {
            set_cookie = Some(format!("ferrotune_token={t}; HttpOnly; SameSite=Strict; Path=/"));
        }
    }
    let path = req.uri().path().to_owned();
    let mut resp = match (req.method().as_str(), path.as_str()) {
        ("GET", "/") => full(200, "text/html; charset=utf-8", INDEX),
        ("GET", "/app.js") => full(200, "text/javascript; charset=utf-8", APP_JS),
        ("GET", "/style.css") => full(200, "text/css; charset=utf-8", STYLE),
        (_, p) if p.starts_with("/api/") => api.route(req).await,
        _ => full(404, "text/plain", "not found\n"),
    };
    if let Some(c) = set_cookie {
        resp.headers_mut().insert("set-cookie", c.parse().expect("a valid header"));
    }
    resp
}
