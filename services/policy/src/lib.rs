//! PolicyService: owns the policy model(s) on the service's device; runs SFT and DPO jobs (LoRA, QLoRA,
//! prompt tuning, full fine-tuning), generation (batched and streaming), log-probs with the adapter on or
//! off, and the training sessions an RL orchestrator drives (GRPO, RLOO, PPO). DPO jobs are started through
//! AlignmentService (the alignment crate), which a server hosting the policy hosts too.

pub mod models;
pub mod service;
pub mod sessions;

use std::sync::Arc;

use ferrotune_proto::v1::policy_service_server::PolicyServiceServer;
use ferrotune_runtime::server::Hosting;
use ferrotune_runtime::worker::Worker;

/// Adds PolicyService (and its jobs) to a server being assembled.
pub fn host(h: &mut Hosting) -> anyhow::Result<()> {
    let cfg = h.settings.policy.clone();
    let device = ferrotune_core::parse_device(&cfg.device).map_err(|e| anyhow::anyhow!("policy.device: {e}"))?;
    let kind = ferrotune_core::parse_dtype(&cfg.dtype).map_err(|e| anyhow::anyhow!("policy.dtype: {e}"))?;
    let idle = std::time::Duration::from_secs(cfg.session_idle_s);
    let sessions = sessions::Sessions::new(cfg.max_sessions, idle);
    let worker = Worker::spawn("ferrotune-policy", cfg.threads, move || {
        models::Models::new(device, cfg.device_map, kind, cfg.max_loaded_models, sessions)
    })?;
    let alive = Arc::new(());
    sessions::spawn_idle_expiry(worker.clone(), Arc::downgrade(&alive), idle)
        .map_err(|e| anyhow::anyhow!("starting the session expiry thread: {e}"))?;
    let jobs = h.jobs()?;
    let threads = h.settings.policy.threads;
    let parallel = ferrotune_training::data_parallel::Devices::parse(&h.settings.policy.devices)
        .map_err(|e| anyhow::anyhow!("policy.devices: {e}"))?;
    if parallel.is_some() && h.settings.policy.device_map.is_some() {
        anyhow::bail!(
            "policy.devices and policy.device_map cannot both be set: data-parallel ranks take one device each"
        );
    }
    match parallel {
        Some(devices) => {
            for kind in ["sft", "dpo", "orpo", "simpo", "kto"] {
                let runner = ferrotune_training::data_parallel::DataParallel::runner(kind, devices.clone(), threads);
                jobs.register(kind, runner, threads);
            }
        }
        None => {
            jobs.register("sft", Arc::new(ferrotune_training::sft::SftRunner), threads);
            jobs.register("dpo", Arc::new(ferrotune_training::dpo::DpoRunner), threads);
            for kind in ["orpo", "simpo", "kto"] {
                jobs.register(kind, Arc::new(ferrotune_training::preference::PreferenceRunner), threads);
            }
        }
    }
    let svc = service::Policy {
        root: h.root.clone(),
        worker,
        jobs,
        device: h.settings.policy.device.clone(),
        device_map: h.settings.policy.device_map.clone(),
        device_of: device,
        kind,
        max_generated_tokens: h.settings.policy.max_generated_tokens,
        max_text_bytes: h.settings.limits.max_text_bytes,
        _alive: alive,
    };
    if let Some(m) = h.settings.policy.preload.clone() {
        let dir = svc
            .model_dir(Some(&ferrotune_proto::v1::ModelRef { path: m.clone() }))
            .map_err(|e| anyhow::anyhow!("policy.preload `{m}`: {}", e.message()))?;
        let w = svc.worker.clone();
        h.when_ready(async move {
            w.call(move |models| models.get(&dir, None).map(|_| ()))
                .await
                .map_err(|e| anyhow::anyhow!("policy.preload: {}", e.message()))?;
            tracing::info!("policy model loaded");
            Ok(())
        });
    }
    let server = PolicyServiceServer::new(svc).max_decoding_message_size(h.max_message());
    h.routes.add_service(h.authed(server));
    h.hosted("ferrotune.v1.PolicyService");
    Ok(())
}
