//! How the CLI reaches the services: each service with an endpoint in the configuration is called
//! remotely; the others run inside this process, on a loopback port, from the very same server code
//! (the embedded default: no configuration needed, paths relative to the working directory).

use std::time::Duration;

use anyhow::{Context, Result};
use ferrotune_clients::ClientAuth;
use ferrotune_proto::v1::alignment_service_client::AlignmentServiceClient;
use ferrotune_proto::v1::data_service_client::DataServiceClient;
use ferrotune_proto::v1::job_service_client::JobServiceClient;
use ferrotune_proto::v1::merge_service_client::MergeServiceClient;
use ferrotune_proto::v1::policy_service_client::PolicyServiceClient;
use ferrotune_proto::v1::reward_service_client::RewardServiceClient;
use ferrotune_runtime::server::Hosting;
use ferrotune_runtime::{ArtifactRoot, Settings};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

type Ch = InterceptedService<Channel, ClientAuth>;

/// Largest response the CLI accepts.
const MAX_RESPONSE: usize = 256 << 20;

/// Clients of every service.
pub(crate) struct Services {
    /// DataService.
    pub data: DataServiceClient<Ch>,
    /// PolicyService.
    pub policy: PolicyServiceClient<Ch>,
    /// AlignmentService (`endpoints.alignment`, else where the policy service runs).
    pub align: AlignmentServiceClient<Ch>,
    /// JobService where the alignment service runs (DPO, PPO, GRPO, RLOO jobs).
    pub align_jobs: JobServiceClient<Ch>,
    /// JobService (where the policy service runs).
    pub jobs: JobServiceClient<Ch>,
    /// MergeService.
    pub merge: MergeServiceClient<Ch>,
    /// RewardService (the first configured replica, or embedded).
    pub reward: RewardServiceClient<Ch>,
    /// JobService where the reward service runs (reward-model jobs).
    pub reward_jobs: JobServiceClient<Ch>,
    /// Whether the policy service (and its jobs) runs in this process.
    pub policy_embedded: bool,
    /// Whether the reward service runs in this process.
    pub reward_embedded: bool,
    /// Whether the alignment service runs in this process.
    pub alignment_embedded: bool,
    _embedded: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Embedded-mode overrides of the policy service (the CLI's --device / --dtype).
#[derive(Default, Clone)]
pub(crate) struct EmbeddedPolicy {
    pub device: Option<String>,
    pub dtype: Option<String>,
}

async fn channel(url: &str, s: &Settings) -> Result<Channel> {
    let mut ep = Endpoint::from_shared(url.to_owned())
        .with_context(|| format!("endpoint `{url}`"))?
        .connect_timeout(Duration::from_secs(10));
    if url.starts_with("https://") {
        let mut tls = ClientTlsConfig::new().with_enabled_roots();
        if let Some(ca) = &s.tls.ca {
            let pem = std::fs::read(ca).with_context(|| format!("tls.ca {}", ca.display()))?;
            tls = tls.ca_certificate(Certificate::from_pem(pem));
        }
        ep = ep.tls_config(tls).with_context(|| format!("endpoint `{url}`: TLS"))?;
    }
    ep.connect().await.map_err(|e| anyhow::anyhow!("cannot reach {url}: {}", source_chain(&e)))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(&format!(": {c}"));
        cur = c.source();
    }
    s
}

impl Services {
    /// Connects to the configured endpoints and starts the rest in-process.
    pub(crate) async fn connect(s: &Settings, policy_opts: &EmbeddedPolicy) -> Result<Self> {
        let e = &s.endpoints;
        let mut embedded = vec![];
        if e.data.is_none() {
            embedded.push("data");
        }
        if e.policy.is_none() {
            embedded.push("policy");
        }
        if e.merge.is_none() {
            embedded.push("merge");
        }
        if e.reward.is_empty() {
            embedded.push("reward");
        }
        let (local, stop) = if embedded.is_empty() {
            (None, None)
        } else {
            let (url, stop) = start_embedded(s, &embedded, policy_opts).await?;
            (Some(url), Some(stop))
        };
        let auth = ClientAuth::new(s.auth.token.as_deref())?;
        let pick =
            |remote: &Option<String>| remote.clone().or_else(|| local.clone()).expect("embedded when not remote");
        let data = channel(&pick(&e.data), s).await?;
        let policy = channel(&pick(&e.policy), s).await?;
        let merge = channel(&pick(&e.merge), s).await?;
        let reward = channel(&pick(&e.reward.first().cloned()), s).await?;
        let align = match &e.alignment {
            Some(url) => channel(url, s).await?,
            None => policy.clone(),
        };
        Ok(Self {
            data: DataServiceClient::with_interceptor(data, auth.clone()).max_decoding_message_size(MAX_RESPONSE),
            jobs: JobServiceClient::with_interceptor(policy.clone(), auth.clone())
                .max_decoding_message_size(MAX_RESPONSE),
            align: AlignmentServiceClient::with_interceptor(align.clone(), auth.clone())
                .max_decoding_message_size(MAX_RESPONSE),
            align_jobs: JobServiceClient::with_interceptor(align, auth.clone()).max_decoding_message_size(MAX_RESPONSE),
            policy: PolicyServiceClient::with_interceptor(policy, auth.clone()).max_decoding_message_size(MAX_RESPONSE),
            merge: MergeServiceClient::with_interceptor(merge, auth.clone()).max_decoding_message_size(MAX_RESPONSE),
            reward_jobs: JobServiceClient::with_interceptor(reward.clone(), auth.clone())
                .max_decoding_message_size(MAX_RESPONSE),
            reward: RewardServiceClient::with_interceptor(reward, auth).max_decoding_message_size(MAX_RESPONSE),
            policy_embedded: e.policy.is_none(),
            reward_embedded: e.reward.is_empty(),
            alignment_embedded: e.alignment.is_none() && e.policy.is_none(),
            _embedded: stop,
        })
    }

    /// Only the JobService of a remote policy service (for `ferrotune jobs`).
    /// The JobService of every configured service that runs jobs: the policy endpoint (SFT, DPO, PPO) and
    /// each reward endpoint (reward-model training), as (endpoint, client). Jobs live in the service that
    /// runs them.
    pub(crate) async fn job_services(s: &Settings) -> Result<Vec<(String, JobServiceClient<Ch>)>> {
        let mut urls: Vec<String> = s.endpoints.policy.iter().cloned().collect();
        for u in s.endpoints.alignment.iter().chain(&s.endpoints.reward) {
            if !urls.contains(u) {
                urls.push(u.clone());
            }
        }
        if urls.is_empty() {
            anyhow::bail!(
                "no policy or reward endpoint is configured, and jobs live in the service that runs them: set endpoints.policy / endpoints.reward in ferrotune.yaml or FERROTUNE__ENDPOINTS__POLICY=http://HOST:PORT (a running `ferrotune serve`)"
            );
        }
        let auth = ClientAuth::new(s.auth.token.as_deref())?;
        let mut out = vec![];
        for url in urls {
            let ch = channel(&url, s).await?;
            out.push((
                url,
                JobServiceClient::with_interceptor(ch, auth.clone()).max_decoding_message_size(MAX_RESPONSE),
            ));
        }
        Ok(out)
    }
}

/// Starts `services` on 127.0.0.1:0 in this process; returns the URL and the stop handle.
async fn start_embedded(
    s: &Settings,
    services: &[&str],
    p: &EmbeddedPolicy,
) -> Result<(String, tokio::sync::oneshot::Sender<()>)> {
    let mut cfg = s.clone();
    // The user's own files in the user's own process: no confinement, relative paths from here, a job
    // store of this invocation only (`--resume` continues from checkpoints in the output dir).
    let root = ArtifactRoot::unconfined(&std::env::current_dir().context("working directory")?)?;
    let jobs_dir = tempfile::tempdir().context("temporary job store")?;
    cfg.jobs.db = Some(jobs_dir.path().join("jobs.sqlite"));
    cfg.jobs.resume_on_start = false;
    cfg.auth.token = s.auth.token.clone();
    cfg.tls = Default::default();
    if let Some(d) = &p.device {
        cfg.policy.device = d.clone();
        cfg.reward.device = d.clone();
    }
    if let Some(d) = &p.dtype {
        cfg.policy.dtype = d.clone();
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .context("binding a loopback port for the embedded services")?;
    let url = format!("http://{}", listener.local_addr()?);
    // The embedded policy's PPO jobs score on the embedded reward service (reward is embedded only when no
    // replicas are configured).
    cfg.score_on_self(services.contains(&"reward"), url.clone());
    cfg.policy_on_self(services.contains(&"policy"), url.clone());
    let services =
        ferrotune_runtime::settings::hosted_services(&services.iter().map(|s| s.to_string()).collect::<Vec<_>>());
    let mut h = Hosting::new(cfg, root);
    for name in &services {
        match name.as_str() {
            "data" => ferrotune_data::service::host(&mut h),
            "policy" => ferrotune_policy::host(&mut h)?,
            "merge" => ferrotune_merge::host(&mut h),
            "reward" => ferrotune_reward::host(&mut h)?,
            "alignment" => ferrotune_alignment::host(&mut h)?,
            _ => unreachable!(),
        }
    }
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _keep = jobs_dir;
        if let Err(e) = h
            .serve(listener, async move {
                let _ = rx.await;
            })
            .await
        {
            eprintln!("error: embedded services: {e:#}");
        }
    });
    Ok((url, tx))
}

/// A gRPC status as one line for the terminal.
pub(crate) fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{} ({:?})", s.message().replace('\n', " "), s.code())
}
