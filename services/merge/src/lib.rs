//! MergeService: folds a LoRA adapter into its base (the original or the NF4-dequantized weights, the
//! choice recorded in the output's config.json) and writes a plain Hugging Face model directory.

use ferrotune_proto::v1::merge_service_server::{MergeService, MergeServiceServer};
use ferrotune_proto::v1::{MergeRequest, MergeResponse};
use ferrotune_runtime::server::Hosting;
use ferrotune_runtime::{core_status, invalid, ArtifactRoot};
use tonic::{Request, Response, Status};

/// The MergeService handlers.
#[derive(Clone)]
pub struct Merge {
    /// Path confinement.
    pub root: ArtifactRoot,
}

/// Adds MergeService to a server being assembled.
pub fn host(h: &mut Hosting) {
    let svc = MergeServiceServer::new(Merge { root: h.root.clone() }).max_decoding_message_size(h.max_message());
    h.routes.add_service(h.authed(svc));
    h.hosted("ferrotune.v1.MergeService");
}

#[tonic::async_trait]
impl MergeService for Merge {
    async fn merge(&self, req: Request<MergeRequest>) -> Result<Response<MergeResponse>, Status> {
        let r = req.into_inner();
        let name = r.model.as_ref().map(|m| m.path.as_str()).unwrap_or("");
        let model = if ferrotune_core::registry::KNOWN_MODELS.iter().any(|k| k.name == name) {
            ferrotune_core::registry::model_dir(name)
        } else {
            self.root.resolve("model.path", name)?
        };
        let adapter = self.root.resolve("adapter", &r.adapter)?;
        let out = self.root.resolve("out", &r.out)?;
        if !model.join("config.json").is_file() {
            return Err(Status::not_found(format!("model.path: {} is not a model directory (no config.json)", model.display())));
        }
        if !adapter.join("adapter_config.json").is_file() {
            return Err(Status::not_found(format!("adapter: {} is not an adapter directory (no adapter_config.json)", adapter.display())));
        }
        if out == model || out == adapter {
            return Err(invalid("out", "must differ from the model and adapter directories"));
        }
        let nf4 = match r.base.as_str() {
            "" => None,
            "nf4" => Some(true),
            "original" => Some(false),
            other => return Err(invalid("base", format!("`{other}`: use nf4 or original"))),
        };
        let (o, a, m) = (out.clone(), adapter.clone(), model.clone());
        let report = tokio::task::spawn_blocking(move || ferrotune_core::merge::merge_adapter(&m, &a, &o, nf4))
            .await
            .map_err(|e| Status::internal(format!("internal error: {e}")))?
            .map_err(|e| core_status(&e))?;
        let merge_base = serde_json::to_value(report.merge_base).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default();
        Ok(Response::new(MergeResponse { path: out.display().to_string(), merged_layers: report.merged_layers as u32, merge_base }))
    }
}
