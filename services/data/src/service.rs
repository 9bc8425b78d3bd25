//! DataService: the data library behind gRPC. File work runs on tokio's blocking pool; every path is
//! confined to the artifact root; bad records and options are INVALID_ARGUMENT naming file and line.

use std::path::PathBuf;

use ferrotune_proto::v1::data_service_server::{DataService, DataServiceServer};
use ferrotune_proto::v1::{
    DataSource, DatasetStats, FormatRequest, GetStatsRequest, PreviewRequest, PreviewResponse, PreviewSample, TokenIds,
    TokenizeRequest,
};
use ferrotune_runtime::server::Hosting;
use ferrotune_runtime::worker::blocking;
use ferrotune_runtime::{invalid, ArtifactRoot, StatusExt};
use tonic::{Request, Response, Status};

use ferrotune_core::data::formats::{Columns, Format, MaskMode};
use ferrotune_core::data::{build, BuildOptions, Stats};

/// The DataService handlers.
#[derive(Clone)]
pub struct Data {
    /// Path confinement.
    pub root: ArtifactRoot,
    /// `limits.max_text_bytes`.
    pub max_text_bytes: usize,
}

/// Adds DataService to a server being assembled.
pub fn host(h: &mut Hosting) {
    let svc = DataServiceServer::new(Data { root: h.root.clone(), max_text_bytes: h.settings.limits.max_text_bytes })
        .max_decoding_message_size(h.max_message());
    h.routes.add_service(h.authed(svc));
    h.hosted("ferrotune.v1.DataService");
}

struct Source {
    inputs: Vec<PathBuf>,
    format: Format,
    model: PathBuf,
    mask: MaskMode,
    columns: Columns,
}

impl Data {
    fn model(&self, m: Option<&ferrotune_proto::v1::ModelRef>) -> Result<PathBuf, Status> {
        let dir = self.root.model("model.path", m.map(|m| m.path.as_str()).unwrap_or(""))?;
        if !dir.join("tokenizer.json").is_file() {
            return Err(Status::not_found(format!("model.path: {} not found", dir.join("tokenizer.json").display())));
        }
        Ok(dir)
    }

    fn source(&self, s: Option<DataSource>) -> Result<Source, Status> {
        let s = s.ok_or_else(|| invalid("source", "required"))?;
        if s.inputs.is_empty() {
            return Err(invalid("source.inputs", "at least one input file is required"));
        }
        let mut inputs = vec![];
        for (i, p) in s.inputs.iter().enumerate() {
            let p = self.root.resolve(&format!("source.inputs[{i}]"), p)?;
            if !p.is_file() {
                return Err(Status::not_found(format!("source.inputs[{i}]: {} not found", p.display())));
            }
            inputs.push(p);
        }
        let format: Format = s.format.parse().map_err(|e| invalid("source.format", e))?;
        let mask: MaskMode = if s.mask.is_empty() {
            MaskMode::default()
        } else {
            s.mask.parse().map_err(|e| invalid("source.mask", e))?
        };
        Ok(Source {
            inputs,
            format,
            model: self.model(s.model.as_ref())?,
            mask,
            columns: s.columns.into_iter().collect(),
        })
    }
}

fn stats_msg(s: Stats, path: &std::path::Path) -> DatasetStats {
    DatasetStats {
        records: s.records as u64,
        train: s.train as u64,
        eval: s.eval as u64,
        tokens: s.tokens as u64,
        trained_tokens: s.trained_tokens as u64,
        truncated: s.truncated as u64,
        packed_rows: s.packed_rows as u64,
        dropped: s.dropped.into_iter().map(|(k, v)| (k, v as u64)).collect(),
        errors: s.errors,
        path: path.display().to_string(),
    }
}

#[tonic::async_trait]
impl DataService for Data {
    async fn format(&self, req: Request<FormatRequest>) -> Result<Response<DatasetStats>, Status> {
        let r = req.into_inner();
        let src = self.source(r.source)?;
        let out = self.root.resolve("out", &r.out)?;
        if !(0.0..1.0).contains(&r.eval_fraction) {
            return Err(invalid("eval_fraction", format!("{} is not in [0, 1)", r.eval_fraction)));
        }
        let opts = BuildOptions {
            chat_template: None,
            inputs: src.inputs,
            format: src.format,
            columns: src.columns,
            model: src.model,
            mask: src.mask,
            max_seq_len: if r.max_seq_len == 0 { 1024 } else { r.max_seq_len as usize },
            eval_fraction: r.eval_fraction,
            seed: r.seed,
            strict: r.strict,
            pack: r.pack,
            max_text_bytes: self.max_text_bytes,
        };
        let stats = blocking(move || build(&opts, &out).map(|s| stats_msg(s, &out)).status()).await?;
        Ok(Response::new(stats))
    }

    async fn preview(&self, req: Request<PreviewRequest>) -> Result<Response<PreviewResponse>, Status> {
        let r = req.into_inner();
        if r.n > 100 {
            return Err(invalid("n", format!("{} is more than 100", r.n)));
        }
        let n = r.n.max(1) as usize;
        let src = self.source(r.source)?;
        let items = blocking(move || {
            ferrotune_core::data::preview::preview(&src.inputs, src.format, &src.model, src.mask, &src.columns, n)
                .status()
        })
        .await?;
        let samples = items
            .into_iter()
            .map(|i| PreviewSample {
                location: i.location,
                text: i.text,
                rejected: i.rejected,
                tokens: i.tokens as u32,
                trained: i.trained as u32,
                error: i.error,
            })
            .collect();
        Ok(Response::new(PreviewResponse { samples }))
    }

    async fn get_stats(&self, req: Request<GetStatsRequest>) -> Result<Response<DatasetStats>, Status> {
        let dir = self.root.resolve("path", &req.into_inner().path)?;
        let f = dir.join("stats.json");
        let text =
            ferrotune_core::fsx::read_to_string(&f).map_err(|e| ferrotune_core::CoreError::io(&f, e)).status()?;
        let s: Stats =
            serde_json::from_str(&text).map_err(|e| Status::invalid_argument(format!("{}: {e}", f.display())))?;
        Ok(Response::new(stats_msg(s, &dir)))
    }

    async fn tokenize(&self, req: Request<TokenizeRequest>) -> Result<Response<TokenIds>, Status> {
        let r = req.into_inner();
        if r.text.len() > self.max_text_bytes {
            return Err(Status::resource_exhausted(format!(
                "text: {} bytes is more than limits.max_text_bytes ({})",
                r.text.len(),
                self.max_text_bytes
            )));
        }
        let model = self.model(r.model.as_ref())?;
        let ids = blocking(move || {
            let tok = ferrotune_core::Tokenizer::from_dir(&model).status()?;
            tok.encode(&r.text).status()
        })
        .await?;
        Ok(Response::new(TokenIds { ids }))
    }
}
