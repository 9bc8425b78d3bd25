//! Server bootstrap shared by every service: the routes of the hosted services plus gRPC health
//! (NOT_SERVING until the services are ready and again while draining) and reflection, bearer auth,
//! optional TLS, request timeouts, load shedding beyond a number of calls in flight, message size
//! limits, Prometheus metrics of every call, one span per request (continuing the caller's trace), and graceful shutdown that checkpoints
//! running jobs.

use std::future::Future;
use std::time::Duration;

use tonic::service::interceptor::InterceptedService;
use tonic::service::RoutesBuilder;
use tonic::transport::{Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::auth::BearerAuth;
use crate::jobs::{JobApi, JobManager, Store};
use crate::paths::ArtifactRoot;
use crate::settings::Settings;

/// How long a running job gets to checkpoint on shutdown.
pub const DRAIN_GRACE: Duration = Duration::from_secs(120);
/// How long calls still in flight may run once a draining server's jobs have checkpointed.
pub const CALL_DRAIN_GRACE: Duration = Duration::from_secs(10);

/// Services being assembled into one server.
pub struct Hosting {
    /// Configuration.
    pub settings: Settings,
    /// Where request paths resolve.
    pub root: ArtifactRoot,
    /// The hosted services' routes (add with `routes.add_service`).
    pub routes: RoutesBuilder,
    names: Vec<String>,
    jobs: Option<JobManager>,
    drains: Vec<Box<dyn FnOnce() + Send>>,
    metrics: Option<tokio::net::TcpListener>,
    ready: Vec<std::pin::Pin<Box<dyn Future<Output = anyhow::Result<()>> + Send>>>,
}

impl Hosting {
    /// Nothing hosted yet.
    pub fn new(settings: Settings, root: ArtifactRoot) -> Self {
        Self {
            settings,
            root,
            routes: RoutesBuilder::default(),
            names: vec![],
            jobs: None,
            drains: vec![],
            metrics: None,
            ready: vec![],
        }
    }

    /// The auth interceptor every hosted service is wrapped in.
    pub fn auth(&self) -> BearerAuth {
        BearerAuth::new(self.settings.auth.token.as_deref())
    }

    /// Wraps a service in the auth interceptor.
    pub fn authed<S>(&self, svc: S) -> InterceptedService<S, BearerAuth> {
        InterceptedService::new(svc, self.auth())
    }

    /// Largest request message.
    pub fn max_message(&self) -> usize {
        self.settings.limits.max_message_bytes
    }

    /// Records a hosted service (by its full gRPC name) for health reporting.
    pub fn hosted(&mut self, name: &str) {
        self.names.push(name.to_owned());
    }

    /// The job manager of this server (created with the store on first use; JobService is then hosted).
    pub fn jobs(&mut self) -> anyhow::Result<JobManager> {
        if let Some(j) = &self.jobs {
            return Ok(j.clone());
        }
        let db = self.settings.jobs_db(self.root.root());
        let mgr = JobManager::start(Store::open(&db)?)?;
        mgr.set_tracking(self.settings.tracking.clone());
        let m = mgr.clone();
        crate::metrics::add_collector(move || m.metric_families());
        let api = JobApi { manager: mgr.clone() };
        let svc = ferrotune_proto::v1::job_service_server::JobServiceServer::new(api)
            .max_decoding_message_size(self.max_message());
        self.routes.add_service(self.authed(svc));
        self.hosted("ferrotune.v1.JobService");
        self.jobs = Some(mgr.clone());
        Ok(mgr)
    }

    /// Health stays NOT_SERVING until `f` completes (e.g. a model is loaded); the server already accepts
    /// connections meanwhile. A failure is logged and leaves the server NOT_SERVING.
    pub fn when_ready(&mut self, f: impl Future<Output = anyhow::Result<()>> + Send + 'static) {
        self.ready.push(Box::pin(f));
    }

    /// Answers `GET /metrics` (Prometheus) on `listener` while the server runs.
    pub fn serve_metrics(&mut self, listener: tokio::net::TcpListener) {
        self.metrics = Some(listener);
    }

    /// Runs `f` when the server drains.
    pub fn on_drain(&mut self, f: impl FnOnce() + Send + 'static) {
        self.drains.push(Box::new(f));
    }

    /// Serves on `listener` until `shutdown` completes, then drains: health NOT_SERVING, running jobs
    /// checkpoint (interrupted, resumed on the next start), in-flight calls finish.
    pub async fn serve(
        mut self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (reporter, health) = tonic_health::server::health_reporter();
        let all: Vec<String> = std::iter::once(String::new()).chain(self.names.iter().cloned()).collect();
        for n in &all {
            reporter.set_service_status(n, ServingStatus::NotServing).await;
        }
        // Both reflection versions: grpcurl and grpcui speak v1, grpcio-reflection's client and older
        // tools v1alpha.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(ferrotune_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let v1 = reflection().build_v1().map_err(|e| anyhow::anyhow!("reflection: {e}"))?;
        let v1alpha = reflection().build_v1alpha().map_err(|e| anyhow::anyhow!("reflection: {e}"))?;
        let (v1, v1alpha) = (self.authed(v1), self.authed(v1alpha));
        self.routes.add_service(health).add_service(v1).add_service(v1alpha);
        if let Some(j) = &self.jobs {
            if self.settings.jobs.resume_on_start {
                let n = j.resume_pending()?;
                if n > 0 {
                    tracing::info!("{n} interrupted job(s) queued to resume");
                }
            }
        }
        let limits = self.settings.limits.clone();
        let mut builder = Server::builder()
            .timeout(Duration::from_secs(limits.request_timeout_s))
            .trace_fn(crate::telemetry::server_span);
        if let (Some(cert), Some(key)) = (&self.settings.tls.cert, &self.settings.tls.key) {
            let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| anyhow::anyhow!("tls: {}: {e}", p.display()));
            builder = builder
                .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(read(cert)?, read(key)?)))
                .map_err(|e| anyhow::anyhow!("tls: {e}"))?;
        }
        let ready = std::mem::take(&mut self.ready);
        let (rep, names) = (reporter.clone(), all.clone());
        let readiness = tokio::spawn(async move {
            for f in ready {
                if let Err(e) = f.await {
                    tracing::error!("not serving: {e:#}");
                    return;
                }
            }
            for n in &names {
                rep.set_service_status(n, ServingStatus::Serving).await;
            }
        });
        let addr = listener.local_addr()?;
        tracing::info!(%addr, services = ?self.names, "serving");
        let jobs = self.jobs.take();
        let drains = std::mem::take(&mut self.drains);
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        let (drained_tx, drained_rx) = tokio::sync::oneshot::channel::<()>();
        if let Some(l) = self.metrics.take() {
            tokio::spawn(crate::metrics::serve(l));
        }
        if let Some(ep) = self.settings.telemetry.otlp_endpoint.clone() {
            let t = &self.settings.telemetry;
            let name = if t.service_name.is_empty() { "serve".to_owned() } else { format!("{}-serve", t.service_name) };
            let every = Duration::from_secs(t.otlp_metrics_interval_s);
            tokio::spawn(crate::metrics::otlp::export_every(ep, name, every));
        }
        let serve = builder
            .layer(crate::metrics::grpc::GrpcMetricsLayer::new(limits.concurrency))
            .add_routes(self.routes.routes())
            .serve_with_incoming_shutdown(incoming, async move {
                shutdown.await;
                tracing::info!("draining");
                readiness.abort();
                for n in &all {
                    reporter.set_service_status(n, ServingStatus::NotServing).await;
                }
                if let Some(j) = jobs {
                    let _ = tokio::task::spawn_blocking(move || j.shutdown(DRAIN_GRACE)).await;
                }
                for d in drains {
                    d();
                }
                let _ = drained_tx.send(());
            });
        // Draining has a deadline: once the jobs have checkpointed, calls still in flight get CALL_DRAIN_GRACE,
        // then the server returns without them (a stuck call must not keep a SIGTERMed server alive).
        tokio::select! {
            r = serve => r.map_err(|e| anyhow::anyhow!("server {addr}: {e}")),
            _ = async {
                if drained_rx.await.is_ok() {
                    tokio::time::sleep(CALL_DRAIN_GRACE).await;
                } else {
                    std::future::pending::<()>().await;
                }
            } => {
                tracing::warn!("calls still in flight {CALL_DRAIN_GRACE:?} after draining; stopping without them");
                Ok(())
            }
        }
    }
}

/// Completes on SIGINT or SIGTERM.
pub async fn termination() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
