//! The client side of separately scaled reward services: one client over every configured replica,
//! balanced by tower's power-of-two-choices over tonic channels (`Channel::balance_list`), with a call that
//! fails at the transport level (replica down, connection reset) retried — the balancer has evicted the
//! failed replica by then, so the retry lands on another one.

use std::time::Duration;

use crate::auth::ClientAuth;
use ferrotune_proto::v1::reward_service_client::RewardServiceClient;
use ferrotune_proto::v1::{ScoreRequest, ScoreResponse};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Scores through any live replica.
#[derive(Clone)]
pub struct RewardPool {
    client: RewardServiceClient<InterceptedService<Channel, ClientAuth>>,
    attempts: usize,
}

/// Codes that mean "this replica did not answer", not "the request is wrong".
fn retryable(c: Code) -> bool {
    matches!(c, Code::Unavailable | Code::Unknown | Code::Cancelled | Code::Aborted)
}

impl RewardPool {
    /// A pool over `endpoints` (http(s)://host:port); calls carry `auth`. Call it inside a tokio runtime (the
    /// balancer runs as a task).
    pub fn new(endpoints: &[String], auth: ClientAuth) -> anyhow::Result<Self> {
        if endpoints.is_empty() {
            anyhow::bail!("endpoints.reward: no reward replicas configured");
        }
        let eps = endpoints
            .iter()
            .map(|u| {
                Ok(Endpoint::from_shared(u.clone())
                    .map_err(|e| anyhow::anyhow!("endpoints.reward `{u}`: {e}"))?
                    .connect_timeout(Duration::from_secs(5)))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let channel = Channel::balance_list(eps.into_iter());
        Ok(Self {
            client: RewardServiceClient::with_interceptor(channel, auth).max_decoding_message_size(64 << 20),
            attempts: 2 * endpoints.len() + 1,
        })
    }

    /// Scores on some replica, retrying transport failures on the others.
    pub async fn score(&self, req: ScoreRequest) -> Result<ScoreResponse, Status> {
        let mut last = Status::unavailable("no reward replica answered");
        for attempt in 0..self.attempts {
            match self.client.clone().score(req.clone()).await {
                Ok(r) => return Ok(r.into_inner()),
                Err(s) if retryable(s.code()) => {
                    tracing::warn!(attempt, "reward replica failed ({}): retrying on another", s.message());
                    last = s;
                    tokio::time::sleep(Duration::from_millis(50 * (attempt as u64 + 1))).await;
                }
                Err(s) => return Err(s),
            }
        }
        Err(last)
    }
}
