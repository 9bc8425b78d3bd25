//! The loaded (model, adapter) pairs of a policy service, least recently used dropped first. Lives on the
//! service's worker thread.

use std::path::{Path, PathBuf};

use ferrotune_core::ModelBundle;
use ferrotune_runtime::lru::Lru;
use ferrotune_runtime::StatusExt;
use tch::{Device, Kind};
use tonic::Status;

type Key = (PathBuf, Option<PathBuf>);

/// Loaded models and the open training sessions (both on the worker thread).
pub struct Models {
    device: Device,
    device_map: Option<serde_json::Value>,
    kind: Kind,
    cache: Lru<Key, ModelBundle>,
    /// Training sessions.
    pub sessions: crate::sessions::Sessions,
}

impl Models {
    /// Empty; models load on `device` (split by `device_map` when given) in `kind`, at most `max` kept;
    /// `sessions` bounds the sessions.
    pub fn new(
        device: Device,
        device_map: Option<serde_json::Value>,
        kind: Kind,
        max: usize,
        sessions: crate::sessions::Sessions,
    ) -> Self {
        Self { device, device_map, kind, cache: Lru::new(max).metered("policy"), sessions }
    }

    /// The bundle for `model` + `adapter`, loading it when needed.
    pub fn get(&mut self, model: &Path, adapter: Option<&Path>) -> Result<&mut ModelBundle, Status> {
        let key: Key = (model.to_path_buf(), adapter.map(Path::to_path_buf));
        if !self.cache.touch(&key) {
            // Checked before anything is evicted to make room.
            if !model.join("config.json").is_file() {
                return Err(Status::not_found(format!(
                    "model: {} is not a model directory (no config.json)",
                    model.display()
                )));
            }
            if let Some(a) = adapter {
                if !a.join("adapter_config.json").is_file() {
                    return Err(Status::not_found(format!(
                        "adapter: {} is not an adapter directory (no adapter_config.json)",
                        a.display()
                    )));
                }
            }
        }
        let (device, kind, map) = (self.device, self.kind, self.device_map.as_ref());
        // Room is made before loading: two models need not fit at once.
        self.cache.get_or_load(key, || {
            let mut b = ModelBundle::load_placed(model, kind, device, map).status()?;
            if let Some(a) = adapter {
                b.attach_adapter(a).status()?;
            }
            Ok(b)
        })
    }
}
