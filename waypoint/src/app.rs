//! Wiring only: builds the components from the config and runs them until a signal.
//!
//! Configuration is read exactly as the node agent reads it: the same YAML directory
//! (polled, reloaded on change, an invalid change rejected and the last good model kept) or
//! the API server (`mesh_kube::watch` with the waypoint's kinds: also HTTPRoutes,
//! GRPCRoutes, RequestAuthentications, VirtualServices and DestinationRules), the same CA directory (the waypoint issues its own certificate
//! from it). Not ready until a first good model is in.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use mesh_model::model::Model;
use mesh_pki::ca::Ca;
use mesh_pki::certs::CertManager;
use mesh_telemetry::Metrics;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Config, ConfigSource};
use crate::inbound::Inbound;
use crate::jwks::JwksCache;
use crate::proxy::{Active, Inputs};
use crate::stats::{Endpoints, StatsServer, StatsState};
use crate::telemetry::HttpMetrics;
use crate::upstream::{UpstreamConfig, Upstreams};

pub async fn run(cfg: Config) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let ca = Arc::new(
        Ca::load_or_create(&cfg.ca_dir, &cfg.trust_domain)
            .with_context(|| format!("load CA from {}", cfg.ca_dir.display()))?,
    );
    let certs = CertManager::new(ca, cfg.cert_ttl);
    // Issued now so that a CA problem fails startup instead of the first handshake.
    certs
        .certified_key(&cfg.identity)
        .with_context(|| format!("issue a certificate for {}", cfg.identity))?;
    let (metrics, http_metrics) = HttpMetrics::new();
    let config_loaded = Arc::new(AtomicBool::new(false));
    let source = match cfg.config_source {
        ConfigSource::Dir => Source::Dir(
            cfg.config_dir
                .clone()
                .context("--config-source dir needs --config-dir")?,
        ),
        ConfigSource::Kube => Source::Kube(
            mesh_kube::client()
                .await
                .context("set up the kubernetes api client")?,
        ),
    };
    let initial = match &source {
        Source::Dir(dir) => match mesh_model::k8s::load_dir(dir) {
            Ok(m) => {
                metrics.config_loaded();
                config_loaded.store(true, Ordering::SeqCst);
                check_gateway(&m, &cfg);
                m
            }
            Err(e) => {
                metrics.config_rejected("local");
                tracing::error!(error = %e, dir = %dir.display(), "config rejected; not ready until a valid config arrives");
                Model::default()
            }
        },
        // Not ready until the watch has listed every kind.
        Source::Kube(_) => Model::default(),
    };
    let model = Arc::new(ArcSwap::from_pointee(initial));
    let upstreams = Upstreams::new(
        UpstreamConfig {
            identity: cfg.identity.clone(),
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.upstream_idle_timeout,
            max_idle: cfg.max_idle_per_endpoint,
            outlier_ejections: http_metrics.outlier_ejections.clone(),
        },
        certs.clone(),
    );
    let stop = CancellationToken::new();
    let jwks_tls =
        crate::jwks::tls_config(cfg.jwks_ca_file.as_deref()).context("roots for https jwksUri")?;
    let jwks = JwksCache::new(cfg.jwks, jwks_tls, http_metrics.clone());
    let inputs = Arc::new(Inputs {
        cfg: cfg.clone(),
        model: model.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
        http_metrics,
        upstreams,
        jwks: jwks.clone(),
        drain: stop.clone(),
        active: Arc::new(Active::default()),
    });

    let inbound = Inbound::new(cfg.hbone_addr, inputs.clone()).await?;
    let state = Arc::new(StatsState {
        metrics: metrics.clone(),
        ready: config_loaded.clone(),
        model: model.clone(),
    });
    for (addr, what, endpoints) in [
        (cfg.metrics_addr, "metrics", Endpoints::Public),
        (cfg.readiness_addr, "readiness", Endpoints::Public),
        (cfg.admin_addr, "admin", Endpoints::Admin),
    ] {
        let srv = StatsServer::new(addr, what, endpoints).await?;
        tokio::spawn(
            srv.run(state.clone(), stop.clone())
                .instrument(tracing::info_span!("stats", what)),
        );
    }
    tokio::spawn(certs.clone().run_rotation(stop.clone()));
    tokio::spawn(
        jwks.run(model.clone(), stop.clone())
            .instrument(tracing::info_span!("jwks")),
    );
    let source_name = match &source {
        Source::Dir(dir) => dir.display().to_string(),
        Source::Kube(_) => "kubernetes api server".to_string(),
    };
    match source {
        Source::Dir(dir) => {
            tokio::spawn(
                watch_config(
                    cfg.clone(),
                    dir,
                    model,
                    metrics,
                    config_loaded,
                    stop.clone(),
                )
                .instrument(tracing::info_span!("config")),
            );
        }
        Source::Kube(client) => {
            let (models_tx, models) = watch::channel(Arc::new(Model::default()));
            let opts = mesh_kube::Options {
                metrics: Some(metrics.clone()),
                scope: mesh_kube::Scope::Waypoint,
                ..mesh_kube::Options::default()
            };
            tokio::spawn(
                mesh_kube::watch(client, models_tx, opts, stop.clone())
                    .instrument(tracing::info_span!("kube")),
            );
            tokio::spawn(
                follow_models(cfg.clone(), models, model, config_loaded, stop.clone())
                    .instrument(tracing::info_span!("config")),
            );
        }
    }
    tracing::info!(
        gateway = %cfg.gateway,
        identity = %cfg.identity,
        hbone = %inbound.local_addr().unwrap_or(cfg.hbone_addr),
        config = %source_name,
        "waypoint started"
    );
    let inbound_task = tokio::spawn(inbound.run().instrument(tracing::info_span!("inbound")));

    shutdown_signal().await;
    tracing::info!(
        open = inputs.active.len(),
        "shutting down: listener closed, draining connections"
    );
    stop.cancel();
    let _ = inbound_task.await;
    if tokio::time::timeout(cfg.drain_timeout, inputs.active.idle())
        .await
        .is_err()
    {
        tracing::warn!(
            open = inputs.active.len(),
            "drain deadline reached; closing remaining connections"
        );
    }
    Ok(())
}

/// Where the model comes from.
enum Source {
    Dir(PathBuf),
    Kube(mesh_kube::Client),
}

/// Installs every model the API server watch publishes (only complete, accepted models: the
/// first once every kind was listed; a refused object keeps its last accepted version).
async fn follow_models(
    cfg: Arc<Config>,
    mut models: watch::Receiver<Arc<Model>>,
    model: Arc<ArcSwap<Model>>,
    loaded: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = models.changed() => {
                if changed.is_err() {
                    return;
                }
            }
        }
        let next = models.borrow_and_update().clone();
        check_gateway(&next, &cfg);
        model.store(next);
        if !loaded.swap(true, Ordering::SeqCst) {
            tracing::info!("first model from the api server installed");
        } else {
            tracing::debug!("model from the api server installed");
        }
    }
}

/// Says so when the model does not (yet) know this waypoint: then no destination uses it and
/// every CONNECT is refused.
fn check_gateway(model: &Model, cfg: &Config) {
    match model.gateways.get(&cfg.gateway) {
        Some(gw) if gw.is_waypoint() => {}
        Some(gw) => {
            tracing::warn!(gateway = %cfg.gateway, class = %gw.class, "the gateway is not of class istio-waypoint")
        }
        None => {
            tracing::warn!(gateway = %cfg.gateway, "no such Gateway in the config; nothing will be routed here")
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process can only be killed; keep serving.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}

/// Polls the config directory; a valid change replaces the model, an invalid one is rejected
/// with its error logged and counted, and the last good model stays.
async fn watch_config(
    cfg: Arc<Config>,
    dir: PathBuf,
    model: Arc<ArcSwap<Model>>,
    metrics: Arc<Metrics>,
    loaded: Arc<AtomicBool>,
    stop: CancellationToken,
) {
    let dir: &Path = &dir;
    let mut last = mesh_model::k8s::dir_fingerprint(dir).ok();
    let mut tick = tokio::time::interval(cfg.config_poll);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let fp = match mesh_model::k8s::dir_fingerprint(dir) {
            Ok(fp) => Some(fp),
            Err(e) => {
                tracing::warn!(error = %e, "reading config dir failed; keeping the last good config");
                continue;
            }
        };
        if fp == last && loaded.load(Ordering::SeqCst) {
            continue;
        }
        last = fp;
        match mesh_model::k8s::load_dir(dir) {
            Ok(m) => {
                check_gateway(&m, &cfg);
                model.store(Arc::new(m));
                loaded.store(true, Ordering::SeqCst);
                metrics.config_loaded();
                tracing::info!("config reloaded");
            }
            Err(e) => {
                metrics.config_rejected("local");
                tracing::error!(error = %e, "config rejected; keeping the last good config");
            }
        }
    }
}
