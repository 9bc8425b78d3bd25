//! MergeService: folds a LoRA adapter into its base (the original or the NF4-dequantized weights, the
//! choice recorded in the output's config.json) and writes a plain Hugging Face model directory (sharded
//! when asked); combines LoRA adapters (linear, cat, TIES) like PEFT's `add_weighted_adapter`; exports a
//! model (with an adapter merged in) as GGUF for llama.cpp and Ollama.

use ferrotune_proto::v1::merge_service_server::{MergeService, MergeServiceServer};
use ferrotune_proto::v1::{
    CombineRequest, CombineResponse, ExportGgufRequest, ExportGgufResponse, MergeRequest, MergeResponse,
};
use ferrotune_runtime::server::Hosting;
use ferrotune_runtime::worker::blocking;
use ferrotune_runtime::{invalid, ArtifactRoot, StatusExt};
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
        let model = self.root.model("model.path", r.model.as_ref().map(|m| m.path.as_str()).unwrap_or(""))?;
        let adapter = self.root.resolve("adapter", &r.adapter)?;
        let out = self.root.resolve("out", &r.out)?;
        if !model.join("config.json").is_file() {
            return Err(Status::not_found(format!(
                "model.path: {} is not a model directory (no config.json)",
                model.display()
            )));
        }
        if !adapter.join("adapter_config.json").is_file() {
            return Err(Status::not_found(format!(
                "adapter: {} is not an adapter directory (no adapter_config.json)",
                adapter.display()
            )));
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
        let shard =
            if r.max_shard_bytes == 0 { ferrotune_core::merge::DEFAULT_MAX_SHARD_BYTES } else { r.max_shard_bytes };
        if shard < 1 << 20 {
            return Err(invalid("max_shard_bytes", format!("{shard} is less than 1 MiB")));
        }
        let report =
            blocking(move || ferrotune_core::merge::merge_adapter_sharded(&m, &a, &o, nf4, shard).status()).await?;
        let merge_base = serde_json::to_value(report.merge_base)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        Ok(Response::new(MergeResponse {
            path: out.display().to_string(),
            merged_layers: report.merged_layers as u32,
            merge_base,
            shards: report.shards as u32,
        }))
    }

    async fn combine(&self, req: Request<CombineRequest>) -> Result<Response<CombineResponse>, Status> {
        let r = req.into_inner();
        if r.adapters.is_empty() {
            return Err(invalid("adapters", "at least one adapter is required"));
        }
        let mut adapters = vec![];
        for (i, a) in r.adapters.iter().enumerate() {
            let p = self.root.resolve(&format!("adapters[{i}].path"), &a.path)?;
            if !p.join("adapter_config.json").is_file() {
                return Err(Status::not_found(format!(
                    "adapters[{i}].path: {} is not an adapter directory (no adapter_config.json)",
                    p.display()
                )));
            }
            if !a.weight.is_finite() {
                return Err(invalid(&format!("adapters[{i}].weight"), format!("{} is not finite", a.weight)));
            }
            adapters.push((p, a.weight));
        }
        let mut how: ferrotune_core::combine::Combination =
            r.combination.parse().map_err(|e| invalid("combination", e))?;
        if let ferrotune_core::combine::Combination::Ties(_) = how {
            if !(r.density > 0.0 && r.density <= 1.0) {
                return Err(invalid("density", format!("{} is not in (0, 1]", r.density)));
            }
            how = ferrotune_core::combine::Combination::Ties(r.density);
        }
        let out = self.root.resolve("out", &r.out)?;
        if adapters.iter().any(|(p, _)| *p == out) {
            return Err(invalid("out", "must differ from the input adapters"));
        }
        let o = out.clone();
        let rank = blocking(move || ferrotune_core::combine::combine(&adapters, how, &o).status()).await?;
        Ok(Response::new(CombineResponse { path: out.display().to_string(), r: rank as u32 }))
    }

    async fn export_gguf(&self, req: Request<ExportGgufRequest>) -> Result<Response<ExportGgufResponse>, Status> {
        let r = req.into_inner();
        let model = self.root.model("model.path", r.model.as_ref().map(|m| m.path.as_str()).unwrap_or(""))?;
        if !model.join("config.json").is_file() {
            return Err(Status::not_found(format!(
                "model.path: {} is not a model directory (no config.json)",
                model.display()
            )));
        }
        let adapter = if r.adapter.is_empty() { None } else { Some(self.root.resolve("adapter", &r.adapter)?) };
        if let Some(a) = &adapter {
            if !a.join("adapter_config.json").is_file() {
                return Err(Status::not_found(format!(
                    "adapter: {} is not an adapter directory (no adapter_config.json)",
                    a.display()
                )));
            }
        }
        if r.out.is_empty() {
            return Err(invalid("out", "the GGUF file to write is required"));
        }
        let out = self.root.resolve("out", &r.out)?;
        if out.is_dir() {
            return Err(invalid("out", format!("{} is a directory; name the .gguf file", out.display())));
        }
        let ty: ferrotune_core::gguf_export::ExportType =
            if r.r#type.is_empty() { Ok(ferrotune_core::gguf_export::ExportType::F16) } else { r.r#type.parse() }
                .map_err(|e| invalid("type", e))?;
        let o = out.clone();
        let report =
            blocking(move || ferrotune_core::gguf_export::export_gguf(&model, adapter.as_deref(), &o, ty).status())
                .await?;
        Ok(Response::new(ExportGgufResponse {
            path: out.display().to_string(),
            architecture: report.architecture,
            tensors: report.tensors as u32,
            bytes: report.bytes,
        }))
    }
}
