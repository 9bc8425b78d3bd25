//! The one error type of the model core. Every variant says which file (or tensor) and what went wrong,
//! so that the CLI can print it on one line and the services can map it to a gRPC status.

use std::path::PathBuf;

/// Result alias for the model core.
pub type Result<T, E = CoreError> = std::result::Result<T, E>;

/// Everything that can go wrong while loading, importing or running a model.
#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    /// A file could not be opened, read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A file exists but its contents are not what they must be (bad JSON, bad header, truncated data).
    #[error("{path}: {msg}")]
    Format {
        /// The file concerned.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A model's config.json lacks a key or has a value we cannot use.
    #[error("{path}: {msg}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// A weight is missing or has the wrong shape.
    #[error("{file}: tensor `{name}`: {msg}")]
    Weight {
        /// The file that holds (or should hold) the tensor.
        file: PathBuf,
        /// The tensor's name.
        name: String,
        /// What is wrong with it.
        msg: String,
    },
    /// The caller asked for something invalid (empty text, unknown device, bad shape).
    #[error("{0}")]
    InvalidArgument(String),
    /// The tokenizer failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// A service this work depends on (a reward replica) could not be reached or answered in time.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The caller went away (or ran past its deadline) before the work finished.
    #[error("cancelled: the caller went away")]
    Cancelled,
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

impl CoreError {
    /// An [`CoreError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io { path: path.into(), source }
    }
    /// A [`CoreError::Format`] for `path`.
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Format { path: path.into(), msg: msg.into() }
    }
    /// A [`CoreError::Config`] for `path`.
    pub fn config(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Self::Config { path: path.into(), msg: msg.into() }
    }
}
