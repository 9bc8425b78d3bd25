//! Domain errors → gRPC status. One exhaustive match over the core's error type; anyhow chains are
//! searched for it. The message is the whole error chain on one line (file, tensor, line and reason).

use ferrotune_core::CoreError;
use tonic::{Code, Status};

/// The status for a core error.
pub fn core_status(e: &CoreError) -> Status {
    let code = match e {
        CoreError::Io { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => Code::NotFound,
            std::io::ErrorKind::PermissionDenied => Code::PermissionDenied,
            // Bytes that are not what they must be (not UTF-8 text, a FIFO or a directory named as a file).
            std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput => Code::InvalidArgument,
            _ => Code::Internal,
        },
        CoreError::Format { .. } | CoreError::Config { .. } | CoreError::Weight { .. } => Code::InvalidArgument,
        CoreError::InvalidArgument(_) | CoreError::Tokenizer(_) => Code::InvalidArgument,
        CoreError::Cancelled => Code::Cancelled,
        CoreError::Unavailable(_) => Code::Unavailable,
        CoreError::Torch(t) => {
            if t.to_string().contains("out of memory") {
                Code::ResourceExhausted
            } else {
                Code::Internal
            }
        }
    };
    Status::new(code, one_line(&e.to_string()))
}

/// The status for an error of the dataset library: bad records and options are the caller's input.
pub fn data_status(e: &ferrotune_core::data::DataError) -> Status {
    use ferrotune_core::data::DataError;
    match e {
        DataError::Record { .. } | DataError::InvalidArgument(_) => Status::invalid_argument(one_line(&e.to_string())),
        DataError::Core(c) => core_status(c),
    }
}

/// INVALID_ARGUMENT naming the field.
pub fn invalid(field: &str, msg: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {msg}"))
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// Converts handler errors to a status.
pub trait StatusExt<T> {
    /// Maps the error.
    fn status(self) -> Result<T, Status>;
}

impl<T> StatusExt<T> for Result<T, CoreError> {
    fn status(self) -> Result<T, Status> {
        self.map_err(|e| core_status(&e))
    }
}

impl<T> StatusExt<T> for anyhow::Result<T> {
    fn status(self) -> Result<T, Status> {
        self.map_err(|e| anyhow_status(&e))
    }
}

/// The status for an anyhow chain: a `Status` or `CoreError` inside decides the code (the message keeps
/// the whole chain); anything else is the caller's input (recipes, options) → INVALID_ARGUMENT.
pub fn anyhow_status(e: &anyhow::Error) -> Status {
    let msg = one_line(&format!("{e:#}"));
    for cause in e.chain() {
        if let Some(s) = cause.downcast_ref::<Status>() {
            return Status::new(s.code(), msg);
        }
        if let Some(c) = cause.downcast_ref::<CoreError>() {
            return Status::new(core_status(c).code(), msg);
        }
        if let Some(d) = cause.downcast_ref::<ferrotune_core::data::DataError>() {
            return Status::new(data_status(d).code(), msg);
        }
    }
    Status::invalid_argument(msg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes() {
        let nf = CoreError::io("/x/config.json", std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(core_status(&nf).code(), Code::NotFound);
        assert!(core_status(&nf).message().contains("/x/config.json"));
        assert_eq!(core_status(&CoreError::format("f", "bad")).code(), Code::InvalidArgument);
        assert_eq!(core_status(&CoreError::InvalidArgument("x".into())).code(), Code::InvalidArgument);
        let chained = anyhow::Error::new(CoreError::config("c.json", "no hidden_size")).context("loading the model");
        let s = anyhow_status(&chained);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "loading the model: c.json: no hidden_size");
        let st = anyhow::Error::new(Status::not_found("job x")).context("watch");
        assert_eq!(anyhow_status(&st).code(), Code::NotFound);
        // A reward replica that cannot be reached stays UNAVAILABLE; a denied path PERMISSION_DENIED.
        assert_eq!(core_status(&CoreError::Unavailable("reward".into())).code(), Code::Unavailable);
        let denied = CoreError::io("/r/x", std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert_eq!(core_status(&denied).code(), Code::PermissionDenied);
        assert_eq!(core_status(&CoreError::Cancelled).code(), Code::Cancelled);
        // Dataset errors: bad records are the caller's; a file that cannot be read keeps its I/O code.
        use ferrotune_core::data::DataError;
        let rec = DataError::Record { file: "a.jsonl".into(), line: 3, reason: "missing field".into() };
        assert_eq!(data_status(&rec).code(), Code::InvalidArgument);
        assert_eq!(data_status(&DataError::Core(nf)).code(), Code::NotFound);
        let chained = anyhow::Error::new(DataError::Core(denied)).context("formatting");
        assert_eq!(anyhow_status(&chained).code(), Code::PermissionDenied);
    }
}
