//! The dashboard's JSON API (`/api/…`), a gRPC client of this server and of the configured endpoints:
//!
//! - `GET /api/jobs` — every job of every service that runs jobs (newest first);
//! - `GET /api/jobs/ID` — one job; `GET /api/jobs/ID/events?after=SEQ` — its events, replayed then live
//!   (server-sent events); `POST /api/jobs/ID/cancel`;
//! - `GET /api/files?path=P` — a file under the artifact root (artifact downloads);
//! - `POST /api/generate` `{model, adapter, messages, max_new_tokens, temperature}` — the answer's text as it
//!   is decoded (server-sent events), then the whole completion;
//! - `POST /api/start` `{kind, recipe, overrides}` — a job from a recipe file under the artifact root.
//!
//! Errors are `{"error": …, "code": …}` with the HTTP status of the gRPC code.

use std::path::PathBuf;

use anyhow::Result;
use ferrotune_clients::ClientAuth;
use ferrotune_proto::v1::alignment_service_client::AlignmentServiceClient;
use ferrotune_proto::v1::job_event::Body;
use ferrotune_proto::v1::job_service_client::JobServiceClient;
use ferrotune_proto::v1::policy_service_client::PolicyServiceClient;
use ferrotune_proto::v1::reward_service_client::RewardServiceClient;
use ferrotune_proto::v1::{
    prompt, CancelJobRequest, Chat, ChatMessage, GenerateRequest, GetJobRequest, ListJobsRequest, ModelRef, Prompt,
    Sampling, StartRecipeJobRequest, WatchJobRequest,
};
use ferrotune_runtime::ArtifactRoot;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use super::{events, full, json, Resp};
use crate::jobs_cmd::{job_json, progress_json, state_name};

type Ch = InterceptedService<Channel, ClientAuth>;

/// The value of `key` in a query string (percent-decoded).
pub(crate) fn query(q: &str, key: &str) -> Option<String> {
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| decode(v))
    })
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(x) => {
                        out.push(x);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// HTTP status of a gRPC code.
fn http_status(c: tonic::Code) -> u16 {
    use tonic::Code::*;
    match c {
        InvalidArgument | OutOfRange | FailedPrecondition => 400,
        Unauthenticated => 401,
        PermissionDenied => 403,
        NotFound => 404,
        AlreadyExists | Aborted => 409,
        ResourceExhausted => 429,
        Unimplemented => 501,
        Unavailable => 503,
        DeadlineExceeded => 504,
        _ => 500,
    }
}

fn error(s: &tonic::Status) -> Resp {
    json(http_status(s.code()), &json!({"error": s.message(), "code": format!("{:?}", s.code())}))
}

fn bad(msg: impl Into<String>) -> Resp {
    json(400, &json!({"error": msg.into(), "code": "InvalidArgument"}))
}

/// A job event as JSON for the page.
fn event_json(e: &ferrotune_proto::v1::JobEvent) -> Value {
    let mut v = json!({"seq": e.seq, "time_ms": e.time_ms});
    match &e.body {
        Some(Body::Progress(p)) => v["progress"] = progress_json(p),
        Some(Body::Log(l)) => v["log"] = json!(l),
        Some(Body::State(s)) => {
            v["state"] = json!(state_name(s.state));
            if let Some(j) = &s.job {
                v["job"] = job_json(j);
            }
        }
        None => {}
    }
    v
}

/// The clients.
pub(crate) struct Api {
    jobs: Vec<(String, JobServiceClient<Ch>)>,
    policy: PolicyServiceClient<Ch>,
    align: AlignmentServiceClient<Ch>,
    reward: RewardServiceClient<Ch>,
    root: ArtifactRoot,
}

fn lazy(url: &str) -> Result<Channel> {
    Ok(tonic::transport::Endpoint::from_shared(url.to_owned())?.connect_lazy())
}

impl Api {
    /// Clients of `me` (this server) and of the configured endpoints.
    pub(crate) fn new(s: &ferrotune_runtime::Settings, me: &str, root: ArtifactRoot) -> Result<Self> {
        let auth = ClientAuth::new(s.auth.token.as_deref())?;
        let e = &s.endpoints;
        let mut urls = vec![me.to_owned()];
        for u in e.policy.iter().chain(&e.alignment).chain(&e.reward) {
            if !urls.contains(u) {
                urls.push(u.clone());
            }
        }
        let mut jobs = vec![];
        for u in urls {
            jobs.push((u.clone(), JobServiceClient::with_interceptor(lazy(&u)?, auth.clone())));
        }
        let policy_url = e.policy.clone().unwrap_or_else(|| me.to_owned());
        let align_url = e.alignment.clone().unwrap_or_else(|| policy_url.clone());
        let reward_url = e.reward.first().cloned().unwrap_or_else(|| me.to_owned());
        Ok(Self {
            jobs,
            policy: PolicyServiceClient::with_interceptor(lazy(&policy_url)?, auth.clone()),
            align: AlignmentServiceClient::with_interceptor(lazy(&align_url)?, auth.clone()),
            reward: RewardServiceClient::with_interceptor(lazy(&reward_url)?, auth),
            root,
        })
    }

    pub(crate) async fn route(&self, req: hyper::Request<hyper::body::Incoming>) -> Resp {
        let method = req.method().as_str().to_owned();
        let path = req.uri().path().to_owned();
        let q = req.uri().query().unwrap_or("").to_owned();
        let parts: Vec<&str> = path.trim_start_matches("/api/").split('/').collect();
        match (method.as_str(), parts.as_slice()) {
            ("GET", ["jobs"]) => self.list().await,
            ("GET", ["jobs", id]) => match self.locate(id).await {
                Ok((_, j)) => json(200, &j),
                Err(s) => error(&s),
            },
            ("GET", ["jobs", id, "events"]) => {
                self.watch(id, query(&q, "after").and_then(|a| a.parse().ok()).unwrap_or(0)).await
            }
            ("POST", ["jobs", id, "cancel"]) => self.cancel(id).await,
            ("GET", ["pipelines"]) => json(200, &json!({"pipelines": self.pipelines()})),
            ("GET", ["files"]) => self.file(&query(&q, "path").unwrap_or_default()),
            ("POST", ["generate"]) => match body(req).await {
                Ok(b) => self.generate(b).await,
                Err(r) => r,
            },
            ("POST", ["start"]) => match body(req).await {
                Ok(b) => self.start(b).await,
                Err(r) => r,
            },
            _ => json(404, &json!({"error": format!("no such API: {method} {path}"), "code": "NotFound"})),
        }
    }

    async fn list(&self) -> Resp {
        let mut all = vec![];
        let mut errors = vec![];
        for (url, c) in &self.jobs {
            match c.clone().list_jobs(ListJobsRequest { states: vec![], limit: 200 }).await {
                Ok(r) => all.extend(r.into_inner().jobs.into_iter().map(|j| {
                    let mut v = job_json(&j);
                    v["service"] = json!(url);
                    v["eta_s"] = json!(j.progress.as_ref().map(|p| p.eta_s));
                    (j.created_ms, v)
                })),
                Err(s) => errors.push(json!({"service": url, "error": s.message()})),
            }
        }
        all.sort_by_key(|(t, _)| std::cmp::Reverse(*t));
        json(200, &json!({"jobs": all.into_iter().map(|(_, v)| v).collect::<Vec<_>>(), "unreachable": errors}))
    }

    /// The service holding job `id`, and the job.
    async fn locate(&self, id: &str) -> Result<(JobServiceClient<Ch>, Value), tonic::Status> {
        for (_, c) in &self.jobs {
            match c.clone().get_job(GetJobRequest { id: id.to_owned() }).await {
                Ok(j) => {
                    let j = j.into_inner();
                    let mut v = job_json(&j);
                    v["progress"] = j.progress.as_ref().map(progress_json).unwrap_or(Value::Null);
                    return Ok((c.clone(), v));
                }
                Err(s) if s.code() == tonic::Code::NotFound => {}
                Err(s) => return Err(s),
            }
        }
        Err(tonic::Status::not_found(format!("job `{id}` not found")))
    }

    async fn watch(&self, id: &str, after: u64) -> Resp {
        let (mut c, _) = match self.locate(id).await {
            Ok(x) => x,
            Err(s) => return error(&s),
        };
        let mut stream = match c.watch_job(WatchJobRequest { id: id.to_owned(), after_seq: after }).await {
            Ok(s) => s.into_inner(),
            Err(s) => return error(&s),
        };
        let (tx, resp) = events();
        tokio::spawn(async move {
            while let Some(ev) = stream.next().await {
                let v = match ev {
                    Ok(e) => event_json(&e),
                    Err(s) => json!({"error": s.message()}),
                };
                if tx.send(v).await.is_err() {
                    break; // the page went away
                }
            }
        });
        resp
    }

    /// The pipelines run on this artifact root: every `pipeline.json` up to four directories down (hidden
    /// directories, checkpoints and datasets skipped).
    fn pipelines(&self) -> Vec<Value> {
        fn walk(dir: &std::path::Path, depth: usize, out: &mut Vec<PathBuf>) {
            let Ok(entries) = ferrotune_core::fsx::read_dir(dir) else { return };
            for e in entries {
                let name = e.name.to_string_lossy();
                if e.is_dir {
                    if depth > 0
                        && !name.starts_with('.')
                        && !matches!(name.as_ref(), "checkpoints" | "dataset" | "mlflow")
                    {
                        walk(&e.path, depth - 1, out);
                    }
                } else if name == "pipeline.json" {
                    out.push(e.path);
                }
            }
        }
        let mut found = vec![];
        walk(self.root.root(), 4, &mut found);
        found
            .into_iter()
            .filter_map(|p| {
                let mut v: Value = serde_json::from_str(&ferrotune_core::fsx::read_to_string(&p).ok()?).ok()?;
                v["path"] = json!(p.parent().unwrap_or(&p).display().to_string());
                if let Some(stages) = v["stages"].as_object_mut() {
                    for d in stages.values_mut() {
                        d.as_object_mut().map(|o| o.remove("spec"));
                    }
                }
                Some(v)
            })
            .collect()
    }

    async fn cancel(&self, id: &str) -> Resp {
        match self.locate(id).await {
            Ok((mut c, _)) => match c.cancel_job(CancelJobRequest { id: id.to_owned() }).await {
                Ok(j) => json(200, &job_json(&j.into_inner())),
                Err(s) => error(&s),
            },
            Err(s) => error(&s),
        }
    }

    fn file(&self, p: &str) -> Resp {
        let path: PathBuf = match self.root.resolve("path", p) {
            Ok(p) => p,
            Err(s) => return error(&s),
        };
        match ferrotune_core::fsx::read(&path) {
            Ok(bytes) => {
                let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                let ctype = match path.extension().and_then(|e| e.to_str()) {
                    Some("svg") => "image/svg+xml",
                    Some("json" | "jsonl") => "application/json",
                    Some("yaml" | "txt" | "jinja") => "text/plain; charset=utf-8",
                    _ => "application/octet-stream",
                };
                let mut r = full(200, ctype, bytes);
                if ctype == "application/octet-stream" {
                    let cd = format!("attachment; filename=\"{}\"", name.replace('"', ""));
                    r.headers_mut().insert("content-disposition", cd.parse().expect("a header"));
                }
                r
            }
            Err(e) => error(&tonic::Status::not_found(format!("path: {p}: {e}"))),
        }
    }

    async fn generate(&self, b: Value) -> Resp {
        let Some(model) = b["model"].as_str().filter(|m| !m.is_empty()) else { return bad("model: required") };
        let messages: Vec<ChatMessage> = b["messages"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|m| ChatMessage {
                        role: m["role"].as_str().unwrap_or("user").to_owned(),
                        content: m["content"].as_str().unwrap_or_default().to_owned(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        if messages.is_empty() {
            return bad("messages: at least one");
        }
        let t = b["temperature"].as_f64().unwrap_or(0.0) as f32;
        let req = GenerateRequest {
            model: Some(ModelRef { path: model.to_owned() }),
            adapter: b["adapter"].as_str().unwrap_or_default().to_owned(),
            prompts: vec![Prompt { kind: Some(prompt::Kind::Chat(Chat { messages })) }],
            max_new_tokens: b["max_new_tokens"].as_u64().unwrap_or(128).min(4096) as u32,
            sampling: Some(Sampling { greedy: t <= 0.0, temperature: t.max(0.0), ..Default::default() }),
            seed: b["seed"].as_u64().unwrap_or(0),
            ..Default::default()
        };
        let mut stream = match self.policy.clone().generate_stream(req).await {
            Ok(s) => s.into_inner(),
            Err(s) => return error(&s),
        };
        let (tx, resp) = events();
        tokio::spawn(async move {
            while let Some(chunk) = stream.next().await {
                let v = match chunk {
                    Ok(c) => match c.done {
                        Some(d) => {
                            let c = d.completions.first().cloned().unwrap_or_default();
                            json!({"done": true, "text": c.text, "finish_reason": c.finish_reason, "tokens": c.ids.len()})
                        }
                        None => json!({"text": c.tokens.iter().map(|t| t.text.as_str()).collect::<String>()}),
                    },
                    Err(s) => json!({"error": s.message()}),
                };
                if tx.send(v).await.is_err() {
                    break;
                }
            }
        });
        resp
    }

    async fn start(&self, b: Value) -> Resp {
        let kind = b["kind"].as_str().unwrap_or_default().to_owned();
        let recipe = b["recipe"].as_str().unwrap_or_default();
        let path = match self.root.resolve("recipe", recipe) {
            Ok(p) => p,
            Err(s) => return error(&s),
        };
        let text = match ferrotune_core::fsx::read_to_string(&path) {
            Ok(t) => t,
            Err(e) => return error(&tonic::Status::not_found(format!("recipe: {recipe}: {e}"))),
        };
        let overrides: Vec<String> = b["overrides"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let req =
            StartRecipeJobRequest { recipe_yaml: text, overrides, resume: b["resume"].as_bool().unwrap_or(false) };
        let r = match kind.as_str() {
            "sft" => self.policy.clone().start_sft(req).await,
            "reward" => self.reward.clone().start_reward_training(req).await,
            "dpo" => self.align.clone().start_dpo(req).await,
            "orpo" => self.align.clone().start_orpo(req).await,
            "simpo" => self.align.clone().start_simpo(req).await,
            "kto" => self.align.clone().start_kto(req).await,
            "ppo" => self.align.clone().start_ppo(req).await,
            "grpo" => self.align.clone().start_grpo(req).await,
            "rloo" => self.align.clone().start_rloo(req).await,
            other => {
                return bad(format!(
                    "kind: `{other}` is not a job kind (sft, reward, dpo, orpo, simpo, kto, ppo, grpo, rloo)"
                ))
            }
        };
        match r {
            Ok(r) => match r.into_inner().job {
                Some(j) => json(200, &job_json(&j)),
                None => error(&tonic::Status::internal("the service returned no job")),
            },
            Err(s) => error(&s),
        }
    }
}

/// The request body as JSON (at most 1 MiB).
async fn body(req: hyper::Request<hyper::body::Incoming>) -> Result<Value, Resp> {
    let limited = http_body_util::Limited::new(req.into_body(), 1 << 20);
    let bytes = limited.collect().await.map_err(|_| bad("body: unreadable or over 1 MiB"))?.to_bytes();
    serde_json::from_slice(&bytes).map_err(|e| bad(format!("body: not JSON ({e})")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_decode() {
        assert_eq!(query("a=1&path=runs%2Fx%20y.json", "path").as_deref(), Some("runs/x y.json"));
        assert_eq!(query("token=a+b", "token").as_deref(), Some("a b"));
        assert_eq!(query("x=%zz%", "x").as_deref(), Some("%zz%"));
        assert_eq!(query("x=1", "y"), None);
        assert_eq!(http_status(tonic::Code::PermissionDenied), 403);
    }
}
