//! Whose run an output directory holds. A run claims its directory when it starts: a fresh run refuses a
//! directory that holds another run's artifacts (unless told to overwrite them), and records its identity in
//! [`RUN_FILE`]; a resumed run keeps the identity found there. Checkpoints carry that identity, so resuming
//! never restores a step of some other run that happened to write into the same directory.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{CoreError, Result};

/// The run's identity file in the output directory.
pub const RUN_FILE: &str = "ferrotune_run.json";

/// What a run leaves in its output directory; any of these means the directory holds a run.
const RUN_ARTIFACTS: [&str; 6] =
    [RUN_FILE, "metrics.jsonl", "checkpoints", "adapter_model.safetensors", "model.safetensors", "recipe.yaml"];

#[derive(Serialize, Deserialize)]
struct RunFile {
    run_id: String,
}

/// The identity recorded in `dir` (`None` when the directory holds no run file: none yet, or a run made
/// before runs had identities).
pub fn run_id(dir: &Path) -> Result<Option<String>> {
    let p = dir.join(RUN_FILE);
    let text = match crate::fsx::read_to_string(&p) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(CoreError::io(&p, e)),
    };
    let f: RunFile = serde_json::from_str(&text).map_err(|e| CoreError::format(&p, e.to_string()))?;
    Ok(Some(f.run_id))
}

/// The run artifacts `dir` holds (empty when it is free for a new run).
pub fn held_artifacts(dir: &Path) -> Vec<&'static str> {
    RUN_ARTIFACTS.into_iter().filter(|n| crate::fsx::exists(dir.join(n))).collect()
}

/// Refuses to start a fresh run (not `resume`, not `overwrite`) in a directory holding another run.
pub fn check(dir: &Path, resume: bool, overwrite: bool) -> Result<()> {
    let held = held_artifacts(dir);
    if resume || overwrite || held.is_empty() {
        return Ok(());
    }
    Err(CoreError::InvalidArgument(format!(
        "output_dir {} already holds a run ({}): continue it with --resume, replace it with --overwrite \
         (training.overwrite_output_dir: true), or choose another output_dir",
        dir.display(),
        held.join(", ")
    )))
}

/// Claims `dir` for a run and returns the run's identity: a resumed run keeps the one recorded there (or
/// records `new_id` when there is none); a fresh run is refused where [`check`] refuses it, else removes
/// what an overwritten run left that could be mistaken for its own (checkpoints, metrics, identity) and
/// records `new_id`.
pub fn claim(dir: &Path, resume: bool, overwrite: bool, new_id: &str) -> Result<String> {
    check(dir, resume, overwrite)?;
    crate::fsx::create_dir_all(dir).map_err(|e| CoreError::io(dir, e))?;
    if resume {
        if let Some(id) = run_id(dir)? {
            return Ok(id);
        }
        if crate::fsx::exists(dir.join("checkpoints")) {
            // A run from before runs had identities: its checkpoints carry none, and so will this run's.
            return Ok(new_id.to_owned());
        }
    } else {
        for stale in ["checkpoints", "metrics.jsonl", RUN_FILE] {
            let p = dir.join(stale);
            let gone =
                if crate::fsx::is_dir(&p) { crate::fsx::remove_dir_all(&p) } else { crate::fsx::remove_file(&p) };
            if let Err(e) = gone {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(CoreError::io(&p, e));
                }
            }
        }
    }
    let body = serde_json::to_string_pretty(&RunFile { run_id: new_id.to_owned() }).expect("serializes");
    crate::weights::write_atomically(&dir.join(RUN_FILE), body.as_bytes())?;
    Ok(new_id.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_runs_are_refused_over_another_run_unless_resumed_or_overwritten() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("out");
        assert_eq!(claim(&dir, false, false, "a").unwrap(), "a");
        assert_eq!(run_id(&dir).unwrap().as_deref(), Some("a"));
        crate::fsx::create_dir_all(dir.join("checkpoints/step-00000002")).unwrap();
        crate::fsx::write(dir.join("metrics.jsonl"), "{\"step\":1}\n").unwrap();
        let e = claim(&dir, false, false, "b").unwrap_err().to_string();
        assert!(e.contains("already holds a run") && e.contains("--resume") && e.contains("checkpoints"), "{e}");
        // Resuming keeps the first run's identity.
        assert_eq!(claim(&dir, true, false, "c").unwrap(), "a");
        assert!(dir.join("checkpoints/step-00000002").is_dir());
        // Overwriting removes what the old run left that a resume could mistake for the new run's.
        assert_eq!(claim(&dir, false, true, "d").unwrap(), "d");
        assert!(!dir.join("checkpoints").exists() && !dir.join("metrics.jsonl").exists());
        // A directory with unrelated files is not a run.
        let other = d.path().join("other");
        crate::fsx::create_dir_all(&other).unwrap();
        crate::fsx::write(other.join("notes.txt"), "mine").unwrap();
        assert_eq!(claim(&other, false, false, "e").unwrap(), "e");
        assert_eq!(std::fs::read_to_string(other.join("notes.txt")).unwrap(), "mine");
    }
}
