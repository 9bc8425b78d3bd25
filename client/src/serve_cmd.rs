//! `ferrotune serve`: hosts any subset of the services on one port, with paths confined to the configured
//! artifact root, until SIGINT / SIGTERM (then drains: health NOT_SERVING, running jobs checkpoint).

use anyhow::{Context, Result};
use ferrotune_runtime::server::{termination, Hosting};
use ferrotune_runtime::{ArtifactRoot, Settings};

/// Arguments of `serve`.
#[derive(clap::Args)]
pub(crate) struct ServeArgs {
    /// Comma-separated services to host (default: `services` from the config: data,policy,merge).
    #[arg(long, value_delimiter = ',')]
    services: Vec<String>,
    /// Address to listen on (default: `listen` from the config); port 0 picks a free one.
    #[arg(long)]
    listen: Option<String>,
    /// Artifact root (default: `artifact_root` from the config).
    #[arg(long)]
    artifact_root: Option<std::path::PathBuf>,
}

pub(crate) async fn serve(a: &ServeArgs, mut s: Settings) -> Result<()> {
    if !a.services.is_empty() {
        s.services = a.services.clone();
    }
    if let Some(l) = &a.listen {
        s.listen = l.clone();
    }
    if let Some(r) = &a.artifact_root {
        s.artifact_root = r.clone();
    }
    s.validate()?;
    let root = ArtifactRoot::confined(&s.artifact_root)?;
    // From here on every file this process opens lies beneath the root (or the pulled models, read-only).
    ferrotune_core::fsx::confine(root.root(), &[&ferrotune_core::registry::models_dir()])
        .context("confining file access to the artifact root")?;
    let listener = tokio::net::TcpListener::bind(&s.listen).await.with_context(|| format!("listen {}", s.listen))?;
    let addr = listener.local_addr()?;
    let services = ferrotune_runtime::settings::hosted_services(&s.services);
    let me = format!("http://127.0.0.1:{}", addr.port());
    s.score_on_self(services.iter().any(|x| x == "reward"), me.clone());
    s.policy_on_self(services.iter().any(|x| x == "policy"), me);
    let mut h = Hosting::new(s, root);
    for name in &services {
        match name.as_str() {
            "data" => ferrotune_data::service::host(&mut h),
            "policy" => ferrotune_policy::host(&mut h)?,
            "merge" => ferrotune_merge::host(&mut h),
            "reward" => ferrotune_reward::host(&mut h)?,
            "alignment" => ferrotune_alignment::host(&mut h)?,
            other => anyhow::bail!("unknown service `{other}`"),
        }
    }
    let mut dashboard = String::new();
    if let Some(d) = h.settings.http.listen.clone() {
        let l = tokio::net::TcpListener::bind(&d).await.with_context(|| format!("http.listen {d}"))?;
        dashboard = format!(" dashboard http://{}/", l.local_addr()?);
        let me = format!("http://127.0.0.1:{}", addr.port());
        tokio::spawn(crate::dashboard::serve(l, h.settings.clone(), me, h.root.clone()));
    }
    let mut metrics = String::new();
    if let Some(m) = h.settings.metrics.listen.clone() {
        let l = tokio::net::TcpListener::bind(&m).await.with_context(|| format!("metrics.listen {m}"))?;
        metrics = format!(" metrics http://{}/metrics", l.local_addr()?);
        h.serve_metrics(l);
    }
    // One line on stdout that scripts (and the tests) read the port from.
    println!("listening on {addr} ({}) root {}{metrics}{dashboard}", services.join(","), h.root.root().display());
    h.serve(listener, termination()).await
}
