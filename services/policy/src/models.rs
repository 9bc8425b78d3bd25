//! The loaded (model, adapter) pairs of a policy service, least recently used dropped first. Lives on the
//! service's worker thread.

use std::path::{Path, PathBuf};

use ferrotune_core::ModelBundle;
use ferrotune_runtime::StatusExt;
use tch::{Device, Kind};
use tonic::Status;

type Key = (PathBuf, Option<PathBuf>);

/// Loaded models.
pub struct Models {
    device: Device,
    kind: Kind,
    max: usize,
    entries: Vec<(Key, ModelBundle)>,
}

impl Models {
    /// Empty; models load on `device` in `kind`, at most `max` kept.
    pub fn new(device: Device, kind: Kind, max: usize) -> Self {
        Self { device, kind, max: max.max(1), entries: vec![] }
    }

    /// The bundle for `model` + `adapter`, loading it when needed.
    pub fn get(&mut self, model: &Path, adapter: Option<&Path>) -> Result<&mut ModelBundle, Status> {
        let key: Key = (model.to_path_buf(), adapter.map(Path::to_path_buf));
        if let Some(i) = self.entries.iter().position(|(k, _)| *k == key) {
            let e = self.entries.remove(i);
            self.entries.push(e);
        } else {
            if !model.join("config.json").is_file() {
                return Err(Status::not_found(format!("model: {} is not a model directory (no config.json)", model.display())));
            }
            if let Some(a) = adapter {
                if !a.join("adapter_config.json").is_file() {
                    return Err(Status::not_found(format!("adapter: {} is not an adapter directory (no adapter_config.json)", a.display())));
                }
            }
            // Make room first: two models need not fit at once.
            while self.entries.len() >= self.max {
                self.entries.remove(0);
            }
            let mut b = ModelBundle::load(model, self.kind, self.device).status()?;
            if let Some(a) = adapter {
                b.attach_adapter(a).status()?;
            }
            self.entries.push((key, b));
        }
        Ok(&mut self.entries.last_mut().expect("just pushed").1)
    }
}
