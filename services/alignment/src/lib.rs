//! AlignmentService in its own crate: the RL orchestrator. GRPO and RLOO jobs run here and reach the policy
//! (a training session) and the reward replicas only through their gRPC clients — over the network when
//! the alignment service runs alone (`serve --services alignment` with `endpoints.policy` and
//! `endpoints.reward`), over loopback when it is hosted with them. DPO and PPO are started here too and run
//! as jobs of a co-hosted policy.

pub mod follow;
pub mod orchestrator;
mod ppo;
pub mod service;

use std::sync::Arc;

use ferrotune_core::train::group_rl::GroupAlgorithm;
use ferrotune_proto::v1::alignment_service_server::AlignmentServiceServer;
use ferrotune_runtime::server::Hosting;
use orchestrator::AlignKind;

/// A client of the reward replicas (none configured: None). Built inside the server's runtime, lazily
/// connected.
fn reward_pool(h: &Hosting) -> anyhow::Result<Option<ferrotune_clients::RewardPool>> {
    if h.settings.endpoints.reward.is_empty() {
        return Ok(None);
    }
    let auth = ferrotune_clients::ClientAuth::new(h.settings.auth.token.as_deref())?;
    Ok(Some(ferrotune_clients::RewardPool::new(&h.settings.endpoints.reward, auth)?))
}

/// The policy server's AlignmentService, when this server does not host the policy (DPO and PPO run there).
fn remote_alignment(
    h: &mut Hosting,
) -> anyhow::Result<
    Option<
        ferrotune_proto::v1::alignment_service_client::AlignmentServiceClient<
            tonic::service::interceptor::InterceptedService<tonic::transport::Channel, ferrotune_clients::ClientAuth>,
        >,
    >,
> {
    let Some(url) = h.settings.endpoints.policy.clone() else { return Ok(None) };
    if h.jobs()?.runs("dpo") {
        return Ok(None); // the policy is hosted here
    }
    let auth = ferrotune_clients::ClientAuth::new(h.settings.auth.token.as_deref())?;
    let channel = tonic::transport::Endpoint::from_shared(url.clone())
        .map_err(|e| anyhow::anyhow!("endpoints.policy `{url}`: {e}"))?
        .connect_timeout(std::time::Duration::from_secs(5))
        .connect_lazy();
    h.jobs()?.register(
        "follow",
        Arc::new(follow::FollowRunner { policy: url, token: h.settings.auth.token.clone() }),
        1,
    );
    Ok(Some(
        ferrotune_proto::v1::alignment_service_client::AlignmentServiceClient::with_interceptor(channel, auth)
            .max_decoding_message_size(h.max_message()),
    ))
}

/// Adds AlignmentService (and its GRPO / RLOO jobs) to a server being assembled.
pub fn host(h: &mut Hosting) -> anyhow::Result<()> {
    let jobs = h.jobs()?;
    for (kind, algo) in [
        ("grpo", AlignKind::Group(GroupAlgorithm::Grpo)),
        ("rloo", AlignKind::Group(GroupAlgorithm::Rloo)),
        ("ppo", AlignKind::Ppo),
    ] {
        let runner = orchestrator::GroupRlRunner {
            algo,
            policy: h.settings.endpoints.policy.clone(),
            rewards: h.settings.endpoints.reward.clone(),
            token: h.settings.auth.token.clone(),
            root: h.root.root().to_path_buf(),
        };
        // The orchestrator computes no tensors: one thread is plenty.
        jobs.register(kind, Arc::new(runner), 1);
    }
    let svc = service::Alignment {
        root: h.root.clone(),
        jobs,
        device: h.settings.policy.device.clone(),
        device_map: h.settings.policy.device_map.clone(),
        has_reward: !h.settings.endpoints.reward.is_empty(),
        has_policy: h.settings.endpoints.policy.is_some(),
        rewards: reward_pool(h)?,
        remote: remote_alignment(h)?,
    };
    h.routes.add_service(h.authed(AlignmentServiceServer::new(svc).max_decoding_message_size(h.max_message())));
    h.hosted("ferrotune.v1.AlignmentService");
    Ok(())
}
