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
    /// Something named does not exist (a job, a model that is not pulled, a session).
    #[error("{0}")]
    NotFound(String),
    /// The request is valid but the state does not allow it (a model not pulled on this service, a job that
    /// already ended, an output directory another run owns).
    #[error("{0}")]
    FailedPrecondition(String),
    /// A bound was reached (sessions per server, memory, queue length).
    #[error("{0}")]
    ResourceExhausted(String),
    /// A service this work depends on (a reward replica) could not be reached or answered in time, or this
    /// service is shutting down.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// A bug or an environment failure the caller cannot fix (a thread that could not start, a lost channel).
    #[error("internal: {0}")]
    Internal(String),
    /// The caller went away (or ran past its deadline) before the work finished.
    #[error("cancelled: the caller went away")]
    Cancelled,
    /// libtorch reported an error.
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// What kind of failure an error is, independent of the transport: the one vocabulary every domain error
/// maps to. The services turn it into a gRPC code in one place (`ferrotune_runtime::status`), the CLI prints the
/// message on one line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The caller's input is wrong (a field, a recipe, a record, a file's contents).
    InvalidArgument,
    /// Something named does not exist.
    NotFound,
    /// A path or credential the caller may not use.
    PermissionDenied,
    /// Valid, but not in the current state.
    FailedPrecondition,
    /// A dependency (or this service, while it shuts down) cannot answer now; retrying may work.
    Unavailable,
    /// A bound or memory ran out.
    ResourceExhausted,
    /// The caller went away.
    Cancelled,
    /// Not the caller's fault.
    Internal,
}

/// Errors that know their [`ErrorKind`].
pub trait Kinded {
    /// The kind of this error.
    fn kind(&self) -> ErrorKind;
}

impl Kinded for CoreError {
    fn kind(&self) -> ErrorKind {
        match self {
            CoreError::Io { source, .. } => io_kind(source),
            CoreError::Format { .. } | CoreError::Config { .. } | CoreError::Weight { .. } => {
                ErrorKind::InvalidArgument
            }
            CoreError::InvalidArgument(_) | CoreError::Tokenizer(_) => ErrorKind::InvalidArgument,
            CoreError::NotFound(_) => ErrorKind::NotFound,
            CoreError::FailedPrecondition(_) => ErrorKind::FailedPrecondition,
            CoreError::ResourceExhausted(_) => ErrorKind::ResourceExhausted,
            CoreError::Unavailable(_) => ErrorKind::Unavailable,
            CoreError::Cancelled => ErrorKind::Cancelled,
            CoreError::Internal(_) => ErrorKind::Internal,
            CoreError::Torch(t) if t.to_string().contains("out of memory") => ErrorKind::ResourceExhausted,
            CoreError::Torch(_) => ErrorKind::Internal,
        }
    }
}

/// The kind of an I/O error met while serving a request.
pub fn io_kind(e: &std::io::Error) -> ErrorKind {
    match e.kind() {
        std::io::ErrorKind::NotFound => ErrorKind::NotFound,
        std::io::ErrorKind::PermissionDenied => ErrorKind::PermissionDenied,
        // Bytes that are not what they must be (not UTF-8 text, a FIFO or a directory named as a file).
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => ErrorKind::InvalidArgument,
        std::io::ErrorKind::OutOfMemory | std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded => {
            ErrorKind::ResourceExhausted
        }
        _ => ErrorKind::Internal,
    }
}

/// The kind of the first error in an `anyhow`-style chain that knows its kind (core and dataset errors, and
/// I/O errors).
pub fn kind_in_chain<'a>(chain: impl IntoIterator<Item = &'a (dyn std::error::Error + 'static)>) -> Option<ErrorKind> {
    chain.into_iter().find_map(|e| {
        e.downcast_ref::<CoreError>()
            .map(Kinded::kind)
            .or_else(|| e.downcast_ref::<crate::data::DataError>().map(Kinded::kind))
            .or_else(|| e.downcast_ref::<std::io::Error>().map(io_kind))
    })
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
