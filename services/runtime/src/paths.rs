//! Artifact paths. Every path a request names is resolved under the configured artifact root; `..` or an
//! absolute path (or a symlink) leading outside it is refused with PERMISSION_DENIED. The CLI's embedded
//! mode uses an unconfined root at its working directory: the user's own files, in the user's own process.

use std::path::{Component, Path, PathBuf};

use tonic::Status;

/// The longest path a request may name, in bytes.
pub const MAX_PATH_BYTES: usize = 4096;
/// The most components a path a request names may have.
pub const MAX_PATH_COMPONENTS: usize = 256;

/// At most the first 64 characters of `p`, quoted, for error messages (a request's path may be megabytes).
pub fn quote(p: &str) -> String {
    match p.char_indices().nth(64) {
        Some((i, _)) => format!("`{}…` ({} bytes)", &p[..i], p.len()),
        None => format!("`{p}`"),
    }
}

/// Where artifacts live.
#[derive(Debug, Clone)]
pub struct ArtifactRoot {
    root: PathBuf,
    confined: bool,
}

impl ArtifactRoot {
    /// A confined root (created if missing).
    pub fn confined(root: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(root).map_err(|e| anyhow::anyhow!("artifact root {}: {e}", root.display()))?;
        let root = root.canonicalize().map_err(|e| anyhow::anyhow!("artifact root {}: {e}", root.display()))?;
        Ok(Self { root, confined: true })
    }

    /// Relative paths resolve under `root`; any absolute path is accepted.
    pub fn unconfined(root: &Path) -> anyhow::Result<Self> {
        let root = root.canonicalize().map_err(|e| anyhow::anyhow!("{}: {e}", root.display()))?;
        Ok(Self { root, confined: false })
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Resolves `p` (named `field` in errors) to an absolute path inside the root. Linear in the path's
    /// length, which is capped ([`MAX_PATH_BYTES`], [`MAX_PATH_COMPONENTS`]); errors quote at most a short
    /// prefix of `p`. This checks the named path only: what a service then opens inside it is confined by
    /// `ferrotune_core::fsx` (symlinks included).
    pub fn resolve(&self, field: &str, p: &str) -> Result<PathBuf, Status> {
        if p.is_empty() {
            return Err(Status::invalid_argument(format!("{field}: a path is required")));
        }
        if p.len() > MAX_PATH_BYTES {
            return Err(Status::invalid_argument(format!(
                "{field}: path of {} bytes is longer than the limit of {MAX_PATH_BYTES} ({})",
                p.len(),
                quote(p)
            )));
        }
        if p.contains('\0') {
            return Err(Status::invalid_argument(format!("{field}: path contains a NUL byte")));
        }
        let joined = self.root.join(p);
        let mut norm = PathBuf::new();
        for (n, c) in joined.components().enumerate() {
            if n > MAX_PATH_COMPONENTS {
                return Err(Status::invalid_argument(format!(
                    "{field}: path has more than {MAX_PATH_COMPONENTS} components ({})",
                    quote(p)
                )));
            }
            match c {
                Component::ParentDir => {
                    if !norm.pop() {
                        return Err(Status::permission_denied(format!(
                            "{field}: {} leaves the artifact root",
                            quote(p)
                        )));
                    }
                }
                Component::CurDir => {}
                other => norm.push(other.as_os_str()),
            }
        }
        if !self.confined {
            return Ok(norm);
        }
        if !norm.starts_with(&self.root) {
            return Err(Status::permission_denied(format!("{field}: {} is outside the artifact root", quote(p))));
        }
        // A symlink inside the root may still point outside it: check the deepest existing ancestor.
        let mut existing = norm.as_path();
        while std::fs::symlink_metadata(existing).is_err() {
            match existing.parent() {
                Some(parent) => existing = parent,
                None => break,
            }
        }
        match existing.canonicalize() {
            Ok(real) if !real.starts_with(&self.root) => {
                Err(Status::permission_denied(format!("{field}: {} resolves outside the artifact root", quote(p))))
            }
            // A dangling symlink on the way: where it would lead is not known to be inside.
            Err(_) => {
                Err(Status::permission_denied(format!("{field}: {} passes a symlink that leads nowhere", quote(p))))
            }
            Ok(_) => Ok(norm),
        }
    }

    /// A model reference: a known model name (the service's pulled copy; FAILED_PRECONDITION when it is not
    /// pulled there) or a directory resolved like [`Self::resolve`].
    pub fn model(&self, field: &str, p: &str) -> Result<PathBuf, Status> {
        if ferrotune_core::registry::is_known(p) {
            let dir = ferrotune_core::registry::model_dir(p);
            if !dir.join("config.json").is_file() {
                return Err(Status::failed_precondition(format!(
                    "{field}: `{p}` is not pulled on this service (ferrotune models pull {p})"
                )));
            }
            return Ok(dir);
        }
        self.resolve(field, p)
    }

    /// Like [`Self::resolve`] for an optional field (empty = absent).
    pub fn resolve_opt(&self, field: &str, p: &str) -> Result<Option<PathBuf>, Status> {
        if p.is_empty() {
            Ok(None)
        } else {
            self.resolve(field, p).map(Some)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn confinement() {
        let dir = tempfile::tempdir().unwrap();
        let root = ArtifactRoot::confined(dir.path()).unwrap();
        let r = root.root().to_path_buf();
        assert_eq!(root.resolve("f", "a/b").unwrap(), r.join("a/b"));
        assert_eq!(root.resolve("f", "a/../b/./c").unwrap(), r.join("b/c"));
        assert_eq!(root.resolve("f", r.join("x").to_str().unwrap()).unwrap(), r.join("x"));
        for bad in ["../x", "a/../../x", "/etc/passwd"] {
            let e = root.resolve("model.path", bad).unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "{bad}");
            assert!(e.message().starts_with("model.path:"), "{}", e.message());
        }
        assert_eq!(root.resolve("f", "").unwrap_err().code(), Code::InvalidArgument);
        std::os::unix::fs::symlink("/tmp", r.join("escape")).unwrap();
        assert_eq!(root.resolve("f", "escape/x").unwrap_err().code(), Code::PermissionDenied);
        // A dangling symlink is refused as such, not answered NOT_FOUND.
        std::os::unix::fs::symlink("/nonexistent/x", r.join("dangling")).unwrap();
        for p in ["dangling", "dangling/y"] {
            let e = root.resolve("f", p).unwrap_err();
            assert_eq!(e.code(), Code::PermissionDenied, "{p}: {}", e.message());
        }
        // A huge path is refused at once (the check is linear), quoting only a short prefix.
        let t = std::time::Instant::now();
        let huge = "a/".repeat(5_000_000);
        let e = root.resolve("path", &huge).unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument);
        assert!(e.message().len() < 200 && e.message().contains("10000000 bytes"), "{}", e.message());
        let deep = "a/".repeat(MAX_PATH_COMPONENTS + 1);
        assert_eq!(root.resolve("path", &deep).unwrap_err().code(), Code::InvalidArgument);
        assert!(root.resolve("path", &"a/".repeat(MAX_PATH_COMPONENTS / 2)).is_ok());
        assert!(t.elapsed() < std::time::Duration::from_secs(1), "{:?}", t.elapsed());
        let open = ArtifactRoot::unconfined(dir.path()).unwrap();
        assert_eq!(open.resolve("f", "/etc/passwd").unwrap(), PathBuf::from("/etc/passwd"));
        assert_eq!(open.resolve("f", "x").unwrap(), r.join("x"));
    }
}
