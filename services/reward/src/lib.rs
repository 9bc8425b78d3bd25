//! RewardService: reward-model training jobs (Bradley–Terry on the shared training loop) and scoring, with
//! concurrent Score calls gathered into batches on the service's own device.

/// The balanced, failing-over client of reward replicas (in the runtime, so that the policy side can use it).
pub mod rules;
pub mod scorer;
pub mod service;

use std::sync::Arc;

use ferrotune_proto::v1::reward_service_server::RewardServiceServer;
use ferrotune_runtime::server::Hosting;
use ferrotune_runtime::worker::Worker;

/// Adds RewardService (and its jobs) to a server being assembled.
pub fn host(h: &mut Hosting) -> anyhow::Result<()> {
    let cfg = h.settings.reward.clone();
    let device = ferrotune_core::parse_device(&cfg.device).map_err(|e| anyhow::anyhow!("reward.device: {e}"))?;
    let kind = ferrotune_core::parse_dtype(&cfg.dtype).map_err(|e| anyhow::anyhow!("reward.dtype: {e}"))?;
    let max = cfg.max_loaded_models;
    let worker =
        Worker::spawn("ferrotune-reward", h.settings.reward.threads, move || scorer::Scorers::new(device, kind, max))?;
    let jobs = h.jobs()?;
    jobs.register("reward", Arc::new(ferrotune_training::reward::RewardRunner), h.settings.reward.threads);
    let svc = service::Reward::new(h.root.clone(), worker, jobs, cfg, h.settings.limits.max_text_bytes);
    let server = RewardServiceServer::new(svc).max_decoding_message_size(h.max_message());
    h.routes.add_service(h.authed(server));
    h.hosted("ferrotune.v1.RewardService");
    Ok(())
}
