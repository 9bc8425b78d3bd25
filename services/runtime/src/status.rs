//! Domain errors → gRPC status: the one conversion. Every domain error knows its [`ErrorKind`]
//! (`ferrotune_core::Kinded`); [`code`] maps a kind to a gRPC code, [`to_status`] finds the kind in an
//! `anyhow` chain (a `Status` already in the chain keeps its code). An error that says nothing of its kind is
//! INTERNAL: caller input is classified where it is checked (recipes, records, fields), never by default.
//! The message is the whole error chain on one line (file, tensor, line and reason).

use ferrotune_core::{ErrorKind, Kinded};
use tonic::{Code, Status};

/// The gRPC code of an error kind.
pub fn code(kind: ErrorKind) -> Code {
    match kind {
        ErrorKind::InvalidArgument => Code::InvalidArgument,
        ErrorKind::NotFound => Code::NotFound,
        ErrorKind::PermissionDenied => Code::PermissionDenied,
        ErrorKind::FailedPrecondition => Code::FailedPrecondition,
        ErrorKind::Unavailable => Code::Unavailable,
        ErrorKind::ResourceExhausted => Code::ResourceExhausted,
        ErrorKind::Cancelled => Code::Cancelled,
        ErrorKind::Internal => Code::Internal,
    }
}

/// The status of a domain error that knows its kind.
pub fn kinded_status(e: &(impl Kinded + std::fmt::Display)) -> Status {
    Status::new(code(e.kind()), one_line(&e.to_string()))
}

/// The status of an `anyhow` chain: a `Status` inside keeps its code, else the first error that knows its
/// kind decides, else INTERNAL. The message keeps the whole chain.
pub fn to_status(e: &anyhow::Error) -> Status {
    let msg = one_line(&format!("{e:#}"));
    if let Some(s) = e.chain().find_map(|c| c.downcast_ref::<Status>()) {
        return Status::new(s.code(), msg);
    }
    Status::new(code(ferrotune_core::error::kind_in_chain(e.chain()).unwrap_or(ErrorKind::Internal)), msg)
}

/// INVALID_ARGUMENT naming the field.
pub fn invalid(field: &str, msg: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("{field}: {msg}"))
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// Converts a handler's domain result to a status result.
pub trait StatusExt<T> {
    /// Maps the error.
    fn status(self) -> Result<T, Status>;
}

impl<T> StatusExt<T> for Result<T, ferrotune_core::CoreError> {
    fn status(self) -> Result<T, Status> {
        self.map_err(|e| kinded_status(&e))
    }
}

impl<T> StatusExt<T> for Result<T, ferrotune_core::data::DataError> {
    fn status(self) -> Result<T, Status> {
        self.map_err(|e| kinded_status(&e))
    }
}

impl<T> StatusExt<T> for anyhow::Result<T> {
    fn status(self) -> Result<T, Status> {
        self.map_err(|e| to_status(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferrotune_core::CoreError;

    #[test]
    fn codes() {
        let nf = CoreError::io("/x/config.json", std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(kinded_status(&nf).code(), Code::NotFound);
        assert!(kinded_status(&nf).message().contains("/x/config.json"));
        assert_eq!(kinded_status(&CoreError::format("f", "bad")).code(), Code::InvalidArgument);
        assert_eq!(kinded_status(&CoreError::InvalidArgument("x".into())).code(), Code::InvalidArgument);
        let chained = anyhow::Error::new(CoreError::config("c.json", "no hidden_size")).context("loading the model");
        let s = to_status(&chained);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert_eq!(s.message(), "loading the model: c.json: no hidden_size");
        let st = anyhow::Error::new(Status::not_found("job x")).context("watch");
        assert_eq!(to_status(&st).code(), Code::NotFound);
        // A reward replica that cannot be reached stays UNAVAILABLE, also under context; a denied path
        // PERMISSION_DENIED.
        assert_eq!(kinded_status(&CoreError::Unavailable("reward".into())).code(), Code::Unavailable);
        let down = anyhow::Error::new(CoreError::Unavailable("reward replica".into())).context("step 3: scoring");
        assert_eq!(to_status(&down).code(), Code::Unavailable);
        let denied = CoreError::io("/r/x", std::io::Error::from(std::io::ErrorKind::PermissionDenied));
        assert_eq!(kinded_status(&denied).code(), Code::PermissionDenied);
        assert_eq!(kinded_status(&CoreError::Cancelled).code(), Code::Cancelled);
        for (e, c) in [
            (CoreError::NotFound("job".into()), Code::NotFound),
            (CoreError::FailedPrecondition("ended".into()), Code::FailedPrecondition),
            (CoreError::ResourceExhausted("sessions".into()), Code::ResourceExhausted),
            (CoreError::Internal("thread".into()), Code::Internal),
        ] {
            assert_eq!(kinded_status(&e).code(), c);
        }
        // Dataset errors: bad records are the caller's; a file that cannot be read keeps its I/O code.
        use ferrotune_core::data::DataError;
        let rec = DataError::Record { file: "a.jsonl".into(), line: 3, reason: "missing field".into() };
        assert_eq!(kinded_status(&rec).code(), Code::InvalidArgument);
        assert_eq!(kinded_status(&DataError::Core(nf)).code(), Code::NotFound);
        let chained = anyhow::Error::new(DataError::Core(denied)).context("formatting");
        assert_eq!(to_status(&chained).code(), Code::PermissionDenied);
        // An error that says nothing of its kind is not blamed on the caller.
        assert_eq!(to_status(&anyhow::anyhow!("lost the job channel")).code(), Code::Internal);
        let io = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::NotFound)).context("x.jsonl");
        assert_eq!(to_status(&io).code(), Code::NotFound);
    }
}
