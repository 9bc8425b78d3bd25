//! Bearer-token authentication: the server interceptor. (The client side, which adds the token and the
//! trace context to every call, is `ferrotune_clients::ClientAuth`.)

use std::sync::Arc;

use tonic::service::Interceptor;
use tonic::{Request, Status};

/// Server side: with a token configured, calls without `authorization: Bearer <token>` are UNAUTHENTICATED.
#[derive(Clone, Default)]
pub struct BearerAuth {
    token: Option<Arc<str>>,
}

impl BearerAuth {
    /// Checks `token` when given; lets everything through otherwise.
    pub fn new(token: Option<&str>) -> Self {
        Self { token: token.map(Arc::from) }
    }
}

/// Equal in time independent of where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl Interceptor for BearerAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(expected) = &self.token else { return Ok(req) };
        let given = req.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("");
        match given.strip_prefix("Bearer ") {
            Some(t) if same(t.as_bytes(), expected.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("invalid bearer token")),
            None => Err(Status::unauthenticated("missing `authorization: Bearer <token>` metadata")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer() {
        let mut a = BearerAuth::new(Some("s3cret"));
        assert_eq!(a.call(Request::new(())).unwrap_err().code(), tonic::Code::Unauthenticated);
        let mut r = Request::new(());
        r.metadata_mut().insert("authorization", "Bearer nope".parse().unwrap());
        assert_eq!(a.call(r).unwrap_err().code(), tonic::Code::Unauthenticated);
        let mut r = Request::new(());
        r.metadata_mut().insert("authorization", "Bearer s3cret".parse().unwrap());
        assert!(a.call(r).is_ok());
        assert!(BearerAuth::new(None).call(Request::new(())).is_ok());
    }
}
