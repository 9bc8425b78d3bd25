//! Checkpoints and the metrics log. A checkpoint is a directory `checkpoints/step-NNNNNNNN/` with the
//! trained state (e.g. a PEFT adapter), `optimizer.safetensors` (AdamW moments) and `trainer_state.json`
//! (step, data position, units); it is written under a temporary name and renamed, so a crash (even
//! SIGKILL) leaves either the previous checkpoint or the new one, never half of one.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::optim::AdamW;
use super::{Position, StepEvent, TrainableState};
use crate::error::{CoreError, Result};
use crate::models::CausalLm;
use crate::weights::{save_safetensors, write_atomically, WeightFiles};

#[derive(Serialize, Deserialize)]
struct TrainerState {
    position: Position,
    optimizer_step: i64,
    /// The run that wrote it (see [`super::run_dir`]); absent in checkpoints of runs without an identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    run_id: Option<String>,
}

const STATE: &str = "trainer_state.json";

fn step_of(p: &Path) -> Option<usize> {
    p.file_name()?.to_str()?.strip_prefix("step-")?.parse().ok()
}

/// The complete checkpoints under `root` written by run `run_id`, oldest first. Another run's checkpoints
/// are left out (and left alone).
fn complete(root: &Path, run_id: Option<&str>) -> Result<Vec<(usize, PathBuf)>> {
    if !crate::fsx::exists(root) {
        return Ok(vec![]);
    }
    let mut v: Vec<(usize, PathBuf)> = crate::fsx::read_dir(root)
        .map_err(|e| CoreError::io(root, e))?
        .into_iter()
        .map(|e| e.path)
        .filter(|p| crate::fsx::is_file(p.join(STATE)))
        .filter(|p| read_state(p).map_or(true, |s| s.run_id.as_deref() == run_id))
        .filter_map(|p| step_of(&p).map(|s| (s, p)))
        .collect();
    v.sort();
    Ok(v)
}

fn read_state(dir: &Path) -> Result<TrainerState> {
    let p = dir.join(STATE);
    let text = crate::fsx::read_to_string(&p).map_err(|e| CoreError::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| CoreError::format(&p, e.to_string()))
}

/// Run `run_id`'s complete checkpoints under `root`, newest first.
pub fn candidates(root: &Path, run_id: Option<&str>) -> Result<Vec<PathBuf>> {
    Ok(complete(root, run_id)?.into_iter().rev().map(|(_, p)| p).collect())
}

/// The newest complete checkpoint of run `run_id` under `root`.
pub fn latest(root: &Path, run_id: Option<&str>) -> Result<Option<PathBuf>> {
    Ok(candidates(root, run_id)?.into_iter().next())
}

/// Checks that a checkpoint can be restored: its trainer state parses and every safetensors file in it has
/// a valid header with its data inside the file. What is wrong, when something is.
pub fn verify(dir: &Path) -> Result<()> {
    read_state(dir)?;
    let files: Vec<PathBuf> = crate::fsx::read_dir(dir)
        .map_err(|e| CoreError::io(dir, e))?
        .into_iter()
        .map(|e| e.path)
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    if !files.iter().any(|p| p.ends_with("optimizer.safetensors")) {
        return Err(CoreError::format(dir, "optimizer.safetensors is missing"));
    }
    WeightFiles::open_files(&files)?;
    Ok(())
}

/// Writes a checkpoint for `pos` and prunes all but the newest `keep` (at least one is kept).
pub fn save(
    root: &Path,
    model: &mut CausalLm,
    state: &dyn TrainableState,
    opt: &AdamW,
    pos: &Position,
    keep: usize,
    run_id: Option<&str>,
) -> Result<PathBuf> {
    crate::fsx::create_dir_all(root).map_err(|e| CoreError::io(root, e))?;
    let final_dir = root.join(format!("step-{:08}", pos.step));
    let tmp = root.join(format!(".step-{:08}.tmp-{}", pos.step, crate::weights::unique_suffix()));
    crate::fsx::create_dir_all(&tmp).map_err(|e| CoreError::io(&tmp, e))?;
    let mut write = || -> Result<()> {
        state.save(model, &tmp)?;
        save_safetensors(&tmp.join("optimizer.safetensors"), &opt.state_tensors())?;
        let s = TrainerState { position: *pos, optimizer_step: opt.step, run_id: run_id.map(str::to_owned) };
        write_atomically(&tmp.join(STATE), serde_json::to_string_pretty(&s).expect("state serializes").as_bytes())?;
        if final_dir.exists() {
            crate::fsx::remove_dir_all(&final_dir).map_err(|e| CoreError::io(&final_dir, e))?;
        }
        crate::fsx::rename(&tmp, &final_dir).map_err(|e| CoreError::io(&final_dir, e))
    };
    if let Err(e) = write() {
        let _ = crate::fsx::remove_dir_all(&tmp);
        return Err(e);
    }
    let all = complete(root, run_id)?;
    for (_, old) in all.iter().take(all.len().saturating_sub(keep.max(1))) {
        let _ = crate::fsx::remove_dir_all(old);
    }
    Ok(final_dir)
}

/// Restores the optimizer from checkpoint `dir` and returns the position to continue from. (The trained
/// state itself is restored by [`TrainableState::load`] before the optimizer is built.)
pub fn load(dir: &Path, opt: &mut AdamW) -> Result<Position> {
    let s = read_state(dir)?;
    let files = WeightFiles::open_files(&[dir.join("optimizer.safetensors")])?;
    opt.load_state(&|name| files.load_raw(name), s.optimizer_step)?;
    Ok(s.position)
}

/// `metrics.jsonl`: one JSON object per optimizer step. On resume, lines past the checkpoint's step are
/// dropped so the file reads as one uninterrupted run.
pub struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    /// Opens (creating) the log, keeping only lines with `step <= keep_upto`.
    pub fn open(path: &Path, keep_upto: usize) -> Result<Self> {
        let kept: Vec<String> = match crate::fsx::read_to_string(path) {
            Ok(text) => text
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s as usize <= keep_upto)
                })
                .map(str::to_owned)
                .collect(),
            Err(_) => vec![],
        };
        let body: String = kept.iter().map(|l| format!("{l}\n")).collect();
        write_atomically(path, body.as_bytes())?;
        let file = crate::fsx::append(path).map_err(|e| CoreError::io(path, e))?;
        Ok(Self { file, path: path.to_path_buf() })
    }

    /// Appends one step.
    pub fn write(&mut self, ev: &StepEvent) -> Result<()> {
        let line = serde_json::to_string(ev).expect("event serializes");
        writeln!(self.file, "{line}").map_err(|e| CoreError::io(&self.path, e))
    }
}
