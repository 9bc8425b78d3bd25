//! What every ferrotune service hosts (the server side; clients of the services are `ferrotune-clients`): layered configuration, telemetry, the server bootstrap (health,
//! reflection, TLS, auth, limits, graceful shutdown), the job store and runner, artifact-path confinement,
//! the domain-error → gRPC status mapping, and the worker thread that owns a service's libtorch state.

pub mod auth;
pub mod jobs;
pub mod lru;
pub mod metrics;
pub mod paths;
pub mod plot;
pub mod server;
pub mod settings;
pub mod status;
pub mod telemetry;
pub mod tracking;
pub mod worker;

pub use paths::ArtifactRoot;
pub use settings::Settings;
pub use status::{invalid, StatusExt};
