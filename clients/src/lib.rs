//! Clients of ferrotune's services, for whoever calls them — the CLI, a service that drives another (PPO's
//! reward calls; the alignment orchestrator) and the tests: the client interceptor that carries the bearer
//! token and the W3C trace context ([`auth::ClientAuth`]), and the reward client balanced over replicas with
//! failover ([`reward_pool::RewardPool`]). No libtorch here: a client links only the contracts.

pub mod auth;
pub mod reward_pool;

pub use auth::ClientAuth;
pub use reward_pool::RewardPool;
