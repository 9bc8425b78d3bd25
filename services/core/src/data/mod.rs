//! Dataset formatting (the library DataService serves and the training runners use in-process): records
//! from JSONL / JSON / CSV / Parquet files in the common fine-tuning formats are
//! validated, rendered through the model's chat template, tokenized, masked (only what should be learned
//! gets a label), truncated, shuffled, split and written as a tokenized dataset that training reads
//! without re-tokenizing. Every bad record is reported with its file and line.

pub mod dataset;
pub mod formats;
pub mod preview;
pub mod prompts;
pub mod read;
pub mod tokenize;

use std::path::PathBuf;

/// Errors of the data library.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A record is malformed or unusable (file, 1-based line or row, reason).
    #[error("{file}:{line}: {reason}")]
    Record {
        /// The input file.
        file: PathBuf,
        /// 1-based line (JSONL), element (JSON array) or row (CSV, header = 1).
        line: usize,
        /// What is wrong.
        reason: String,
    },
    /// A whole file cannot be read or parsed.
    #[error("{0}")]
    Core(#[from] crate::CoreError),
    /// An option is invalid.
    #[error("{0}")]
    InvalidArgument(String),
}

impl crate::error::Kinded for DataError {
    fn kind(&self) -> crate::error::ErrorKind {
        match self {
            DataError::Record { .. } | DataError::InvalidArgument(_) => crate::error::ErrorKind::InvalidArgument,
            DataError::Core(c) => c.kind(),
        }
    }
}

/// Result alias.
pub type Result<T, E = DataError> = std::result::Result<T, E>;

pub use dataset::{build, load_judged, load_pairs, load_split, BuildOptions, DatasetInfo, Stats};
pub use formats::{Format, MaskMode};
