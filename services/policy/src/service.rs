//! The PolicyService handlers. Requests are validated here (INVALID_ARGUMENT naming the field); model
//! work runs on the service's worker thread; SFT runs as a job.

use std::path::PathBuf;
use std::pin::Pin;

use ferrotune_core::generation::generate_until;
use ferrotune_core::{GenerateOptions, Message, SamplingParams};
use ferrotune_proto::v1::policy_service_server::PolicyService;
use ferrotune_proto::v1::{
    prompt, AdapterInfo, CheckpointSessionRequest, CheckpointSessionResponse, CloseSessionRequest,
    CloseSessionResponse, Completion, GenerateChunk, GenerateRequest, GenerateResponse, ListAdaptersRequest,
    ListAdaptersResponse, LogProbsRequest, LogProbsResponse, OpenSessionRequest, PerplexityRequest, PerplexityResult,
    RolloutRequest, RolloutResponse, SequenceLogProbs, SessionInfo, StartJobResponse, StartRecipeJobRequest,
    StreamedToken, UpdateRequest, UpdateResponse,
};
use ferrotune_runtime::jobs::JobManager;
use ferrotune_runtime::worker::Worker;
use ferrotune_runtime::{invalid, ArtifactRoot, StatusExt};
use ferrotune_training::queue_recipe_job;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::models::Models;

/// Most prompts in one Generate call.
pub const MAX_PROMPTS: usize = 64;
/// Most new tokens per prompt.
pub const MAX_NEW_TOKENS: u32 = 4096;
/// Most sequences in one LogProbs call.
pub const MAX_SEQUENCES: usize = 256;

/// The policy service.
#[derive(Clone)]
pub struct Policy {
    /// Path confinement.
    pub root: ArtifactRoot,
    /// The models' thread.
    pub worker: Worker<Models>,
    /// The jobs of this process (SFT here; DPO and PPO through AlignmentService).
    pub jobs: JobManager,
    /// The service's device (recipes run there).
    pub device: String,
    /// `policy.device_map`, for recipe jobs that set none.
    pub device_map: Option<serde_json::Value>,
    /// The same, parsed (sessions are pinned there).
    pub device_of: tch::Device,
    /// The compute dtype of sessions (`policy.dtype`).
    pub kind: tch::Kind,
    /// `policy.max_generated_tokens`.
    pub max_generated_tokens: usize,
    /// `limits.max_text_bytes`: the longest text of one prompt.
    pub max_text_bytes: usize,
    /// Held while the service lives: the session expiry thread stops when it is gone.
    pub _alive: std::sync::Arc<()>,
}

impl Policy {
    /// Validates a recipe, resolves its paths and queues a `kind` job.
    async fn start_job(
        &self,
        kind: &str,
        yaml: &str,
        overrides: &[String],
        resume: bool,
    ) -> Result<Response<StartJobResponse>, Status> {
        let job = queue_recipe_job(
            kind,
            yaml,
            overrides,
            resume,
            &self.root,
            (&self.device, self.device_map.as_ref()),
            &self.jobs,
        )?;
        Ok(Response::new(StartJobResponse { job: Some(job) }))
    }

    /// A model reference: a known model name (from the registry) or a directory under the root.
    pub fn model_dir(&self, m: Option<&ferrotune_proto::v1::ModelRef>) -> Result<PathBuf, Status> {
        self.root.model("model.path", m.map(|m| m.path.as_str()).unwrap_or(""))
    }
}

/// The request's sampling settings; 0 means "unset" (proto3), a negative or non-finite value is an error
/// rather than a silent switch to greedy decoding.
pub(crate) fn sampling(s: Option<ferrotune_proto::v1::Sampling>) -> Result<SamplingParams, Status> {
    let s = s.unwrap_or_default();
    for (field, v) in [("temperature", s.temperature), ("top_p", s.top_p), ("repetition_penalty", s.repetition_penalty)]
    {
        if !v.is_finite() || v < 0.0 {
            return Err(invalid(&format!("sampling.{field}"), format!("must be a number >= 0 (0 = unset), got {v}")));
        }
    }
    if s.top_p > 1.0 {
        return Err(invalid("sampling.top_p", format!("must be in (0, 1] (0 = unset), got {}", s.top_p)));
    }
    let sample = !s.greedy && (s.temperature > 0.0 || s.top_k > 0 || s.top_p > 0.0);
    Ok(SamplingParams {
        greedy: !sample,
        temperature: if s.temperature == 0.0 { 1.0 } else { s.temperature },
        top_k: (s.top_k > 0).then_some(s.top_k as usize),
        top_p: (s.top_p > 0.0).then_some(s.top_p),
        repetition_penalty: if s.repetition_penalty == 0.0 { 1.0 } else { s.repetition_penalty },
    })
}

/// Checks a Generate request and returns its options (EOS and pad ids are filled in on the worker).
fn check_generate(
    r: &GenerateRequest,
    max_generated_tokens: usize,
    max_text_bytes: usize,
) -> Result<GenerateOptions, Status> {
    if r.prompts.is_empty() || r.prompts.len() > MAX_PROMPTS {
        return Err(invalid("prompts", format!("{} prompts; send 1 to {MAX_PROMPTS}", r.prompts.len())));
    }
    for (i, p) in r.prompts.iter().enumerate() {
        match &p.kind {
            None => return Err(invalid(&format!("prompts[{i}]"), "empty: set text, ids or chat")),
            Some(prompt::Kind::Text(t)) if t.is_empty() => return Err(invalid(&format!("prompts[{i}].text"), "empty")),
            Some(prompt::Kind::Ids(ids)) if ids.ids.is_empty() => {
                return Err(invalid(&format!("prompts[{i}].ids"), "empty"))
            }
            Some(prompt::Kind::Chat(c)) if c.messages.is_empty() => {
                return Err(invalid(&format!("prompts[{i}].chat"), "no messages"))
            }
            _ => {}
        }
        let text_bytes = match &p.kind {
            Some(prompt::Kind::Text(t)) => t.len(),
            Some(prompt::Kind::Chat(c)) => c.messages.iter().map(|m| m.content.len()).sum(),
            _ => 0,
        };
        if text_bytes > max_text_bytes {
            return Err(Status::resource_exhausted(format!(
                "prompts[{i}]: {text_bytes} bytes of text is more than limits.max_text_bytes ({max_text_bytes})"
            )));
        }
    }
    if r.max_new_tokens > MAX_NEW_TOKENS {
        return Err(invalid("max_new_tokens", format!("{} is more than {MAX_NEW_TOKENS}", r.max_new_tokens)));
    }
    let sampling = sampling(r.sampling)?;
    sampling.validate().map_err(|e| invalid("sampling", e))?;
    let max_new_tokens = if r.max_new_tokens == 0 { 128 } else { r.max_new_tokens as usize };
    if r.prompts.len() * max_new_tokens > max_generated_tokens {
        return Err(Status::resource_exhausted(format!(
            "{} prompts × {max_new_tokens} new tokens is more than policy.max_generated_tokens ({max_generated_tokens})",
            r.prompts.len()
        )));
    }
    Ok(GenerateOptions {
        max_new_tokens,
        sampling,
        seed: r.seed,
        eos_ids: vec![],
        stop_strings: r.stop.clone(),
        pad_id: 0,
    })
}

/// Prompt ids on the worker.
fn prompt_ids(b: &ferrotune_core::ModelBundle, r: &GenerateRequest) -> Result<(Vec<Vec<u32>>, bool), Status> {
    let mut chat = false;
    let mut out = vec![];
    for (i, p) in r.prompts.iter().enumerate() {
        let ids = match p.kind.as_ref().expect("checked") {
            prompt::Kind::Text(t) => b.tokenizer.encode(t).status()?,
            prompt::Kind::Ids(ids) => {
                if let Some(&t) = ids.ids.iter().find(|&&t| t as i64 >= b.model.cfg.vocab_size) {
                    return Err(invalid(
                        &format!("prompts[{i}].ids"),
                        format!("token id {t} is outside the vocabulary ({})", b.model.cfg.vocab_size),
                    ));
                }
                ids.ids.clone()
            }
            prompt::Kind::Chat(c) => {
                chat = true;
                let msgs: Vec<Message> = c.messages.iter().map(|m| Message::new(&m.role, &m.content)).collect();
                b.chat_prompt(&msgs).status()?
            }
        };
        out.push(ids);
    }
    Ok((out, chat))
}

fn origin_name(b: &ferrotune_core::ModelBundle) -> String {
    serde_json::to_value(b.template.origin()).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default()
}

fn completions(g: Vec<ferrotune_core::Generated>, prompts: &[Vec<u32>]) -> Vec<Completion> {
    g.into_iter()
        .zip(prompts)
        .map(|(g, p)| Completion {
            ids: g.ids,
            text: g.text,
            logprobs: g.logprobs,
            finish_reason: serde_json::to_value(g.finish_reason)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default(),
            prompt_tokens: g.prompt_tokens as u32,
            prompt_ids: p.clone(),
        })
        .collect()
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<GenerateChunk, Status>> + Send>>;

#[tonic::async_trait]
impl PolicyService for Policy {
    async fn open_session(&self, req: Request<OpenSessionRequest>) -> Result<Response<SessionInfo>, Status> {
        self.session_open(req.into_inner()).await.map(Response::new)
    }

    async fn rollout(&self, req: Request<RolloutRequest>) -> Result<Response<RolloutResponse>, Status> {
        self.session_rollout(req.into_inner()).await.map(Response::new)
    }

    async fn update(&self, req: Request<UpdateRequest>) -> Result<Response<UpdateResponse>, Status> {
        self.session_update(req.into_inner()).await.map(Response::new)
    }

    async fn checkpoint_session(
        &self,
        req: Request<CheckpointSessionRequest>,
    ) -> Result<Response<CheckpointSessionResponse>, Status> {
        self.session_checkpoint(req.into_inner()).await.map(Response::new)
    }

    async fn close_session(&self, req: Request<CloseSessionRequest>) -> Result<Response<CloseSessionResponse>, Status> {
        self.session_close(req.into_inner()).await.map(Response::new)
    }

    async fn start_sft(&self, req: Request<StartRecipeJobRequest>) -> Result<Response<StartJobResponse>, Status> {
        let r = req.into_inner();
        self.start_job("sft", &r.recipe_yaml, &r.overrides, r.resume).await
    }

    async fn generate(&self, req: Request<GenerateRequest>) -> Result<Response<GenerateResponse>, Status> {
        let r = req.into_inner();
        let mut opts = check_generate(&r, self.max_generated_tokens, self.max_text_bytes)?;
        let model = self.model_dir(r.model.as_ref())?;
        let adapter = self.root.resolve_opt("adapter", &r.adapter)?;
        let resp = self
            .worker
            .call(move |m| {
                let b = m.get(&model, adapter.as_deref())?;
                let (prompts, chat) = prompt_ids(b, &r)?;
                opts.eos_ids = b.stop_ids();
                opts.pad_id = b.defaults.pad_id;
                let cancelled = ferrotune_runtime::worker::cancelled;
                let g = generate_until(&b.model, &b.tokenizer, &prompts, &opts, &mut |_| {}, &cancelled).status()?;
                let tmpl = if chat { origin_name(b) } else { String::new() };
                Ok(GenerateResponse { completions: completions(g, &prompts), chat_template: tmpl })
            })
            .await?;
        Ok(Response::new(resp))
    }

    type GenerateStreamStream = ChunkStream;

    async fn generate_stream(
        &self,
        req: Request<GenerateRequest>,
    ) -> Result<Response<Self::GenerateStreamStream>, Status> {
        let r = req.into_inner();
        let mut opts = check_generate(&r, self.max_generated_tokens, self.max_text_bytes)?;
        let model = self.model_dir(r.model.as_ref())?;
        let adapter = self.root.resolve_opt("adapter", &r.adapter)?;
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<GenerateChunk, Status>>(256);
        self.worker.submit(move |m| {
            // A stream whose client is gone never starts, and stops at the next token.
            if tx.is_closed() {
                return;
            }
            let gone = || tx.is_closed();
            let run = || -> Result<GenerateResponse, Status> {
                let b = m.get(&model, adapter.as_deref())?;
                let (prompts, chat) = prompt_ids(b, &r)?;
                opts.eos_ids = b.stop_ids();
                opts.pad_id = b.defaults.pad_id;
                let mut rows = vec![ferrotune_core::tokenizer::StreamDecoder::default(); prompts.len()];
                let tok = &b.tokenizer;
                let g = generate_until(
                    &b.model,
                    tok,
                    &prompts,
                    &opts,
                    &mut |step| {
                        let tokens = step
                            .iter()
                            .map(|t| StreamedToken { row: t.row as u32, id: t.id, text: rows[t.row].push(tok, t.id) })
                            .collect();
                        let _ = tx.blocking_send(Ok(GenerateChunk { tokens, done: None }));
                    },
                    &gone,
                )
                .status()?;
                let tmpl = if chat { origin_name(b) } else { String::new() };
                Ok(GenerateResponse { completions: completions(g, &prompts), chat_template: tmpl })
            };
            let last = std::panic::catch_unwind(std::panic::AssertUnwindSafe(run))
                .unwrap_or_else(|_| Err(Status::internal("internal error (panic) in generation")));
            let _ = tx.blocking_send(last.map(|done| GenerateChunk { tokens: vec![], done: Some(done) }));
        })?;
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn log_probs(&self, req: Request<LogProbsRequest>) -> Result<Response<LogProbsResponse>, Status> {
        let r = req.into_inner();
        if r.sequences.is_empty() || r.sequences.len() > MAX_SEQUENCES {
            return Err(invalid("sequences", format!("{} sequences; send 1 to {MAX_SEQUENCES}", r.sequences.len())));
        }
        if r.disable_adapter && r.adapter.is_empty() {
            return Err(invalid("disable_adapter", "set without an adapter"));
        }
        let model = self.model_dir(r.model.as_ref())?;
        let adapter = self.root.resolve_opt("adapter", &r.adapter)?;
        let pairs: Vec<(Vec<u32>, Vec<u32>)> =
            r.sequences.into_iter().map(|s| (s.prompt_ids, s.completion_ids)).collect();
        let disable = r.disable_adapter;
        let lps = self
            .worker
            .call(move |m| {
                let b = m.get(&model, adapter.as_deref())?;
                use ferrotune_core::logprobs::completion_logprobs_until as logprobs;
                let cancelled = ferrotune_runtime::worker::cancelled;
                if disable {
                    logprobs(&b.model.adapters_disabled(), &pairs, 8, &cancelled).status()
                } else {
                    logprobs(&b.model, &pairs, 8, &cancelled).status()
                }
            })
            .await?;
        let sequences =
            lps.into_iter().map(|l| SequenceLogProbs { sum: l.iter().map(|&x| x as f64).sum(), logprobs: l }).collect();
        Ok(Response::new(LogProbsResponse { sequences }))
    }

    async fn perplexity(&self, req: Request<PerplexityRequest>) -> Result<Response<PerplexityResult>, Status> {
        let r = req.into_inner();
        if r.text.is_empty() {
            return Err(invalid("text", "empty"));
        }
        let or = |v: u32, d: usize| if v == 0 { d } else { v as usize };
        let opts = ferrotune_core::PerplexityOptions {
            window: or(r.window, 1024),
            stride: or(r.stride, 512),
            batch: or(r.batch, 4),
        };
        let model = self.model_dir(r.model.as_ref())?;
        let adapter = self.root.resolve_opt("adapter", &r.adapter)?;
        let p = self
            .worker
            .call(move |m| {
                let b = m.get(&model, adapter.as_deref())?;
                let ids = b.tokenizer.encode(&r.text).status()?;
                ferrotune_core::perplexity(&b.model, &ids, opts).status()
            })
            .await?;
        Ok(Response::new(PerplexityResult { tokens: p.tokens as u64, mean_nll: p.mean_nll, perplexity: p.perplexity }))
    }

    async fn list_adapters(&self, req: Request<ListAdaptersRequest>) -> Result<Response<ListAdaptersResponse>, Status> {
        let dir = self.root.resolve("dir", &req.into_inner().dir)?;
        if !ferrotune_core::fsx::is_dir(&dir) {
            return Err(Status::not_found(format!("dir: {} is not a directory", dir.display())));
        }
        let found = ferrotune_core::lora::find_adapters(&dir, 2)
            .into_iter()
            .map(|a| AdapterInfo {
                path: a.path.display().to_string(),
                peft_type: a.peft_type,
                base_model: a.base_model,
                r: a.r,
                nf4_base: a.nf4_base,
            })
            .collect();
        Ok(Response::new(ListAdaptersResponse { adapters: found }))
    }
}
