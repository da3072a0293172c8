//! Wiring only: builds the components from the config and runs them until a signal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use mesh::ca::Ca;
use mesh::certs::CertManager;
use mesh::hbone::{Pool, PoolConfig};
use mesh::metrics::Metrics;
use mesh::model::Model;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::admin::{AdminState, Server};
use crate::config::Config;
use crate::conns::ConnTracker;
use crate::logging::LogHandle;
use crate::netns::Netns;
use crate::proxy::ProxyInputs;
use crate::workloads::Manager;

/// How often pods that failed to enroll (e.g. netns not there yet) are retried.
const ENROLL_RETRY: Duration = Duration::from_secs(1);

pub async fn run(mut cfg: Config, log: LogHandle) -> anyhow::Result<()> {
    cfg.redirect = crate::redirect::resolve(cfg.redirect, &cfg.bpf_fs)
        .context("set up the requested redirection backend")?;
    tracing::info!(backend = ?cfg.redirect, "redirection backend");
    let cfg = Arc::new(cfg);
    let home = Arc::new(Netns::current().context("open the agent's own netns")?);
    let ca = Arc::new(
        Ca::load_or_create(&cfg.ca_dir, &cfg.trust_domain)
            .with_context(|| format!("load CA from {}", cfg.ca_dir.display()))?,
    );
    let certs = CertManager::new(ca, cfg.cert_ttl);
    let metrics = Metrics::new();
    let config_loaded = Arc::new(AtomicBool::new(false));
    let (initial, loaded) = match mesh::k8s::load_dir(&cfg.config_dir) {
        Ok(m) => {
            metrics.config_loaded();
            (m, true)
        }
        Err(e) => {
            metrics.config_rejected("local");
            tracing::error!(error = %e, dir = %cfg.config_dir.display(), "config rejected; not ready until a valid config arrives");
            (Model::default(), false)
        }
    };
    config_loaded.store(loaded, Ordering::SeqCst);
    let model = Arc::new(ArcSwap::from_pointee(initial));
    let pool = Pool::new(PoolConfig {
        connect_timeout: cfg.connect_timeout,
        ..PoolConfig::default()
    });
    let conns = Arc::new(ConnTracker::default());
    let stop = CancellationToken::new();
    let pi = Arc::new(ProxyInputs::new(
        cfg.clone(),
        model.clone(),
        certs.clone(),
        pool,
        metrics.clone(),
        conns.clone(),
        home,
        stop.clone(),
    ));

    let ready = Arc::new(AtomicBool::new(false));
    let pod_status = Arc::new(std::sync::Mutex::new(Vec::new()));
    let state = Arc::new(AdminState {
        pi: pi.clone(),
        ready: ready.clone(),
        config_loaded: config_loaded.clone(),
        pods: pod_status.clone(),
        log,
    });
    let admin = Server::admin(cfg.admin_addr).await?;
    let metrics_srv = Server::metrics(cfg.metrics_addr).await?;
    let readiness = Server::readiness(cfg.readiness_addr).await?;
    for srv in [admin, metrics_srv, readiness] {
        tokio::spawn(srv.run(state.clone(), stop.clone()));
    }
    tokio::spawn(
        certs
            .clone()
            .run_rotation(stop.clone())
            .instrument(tracing::info_span!("cert_rotation")),
    );

    let (tx, rx) = watch::channel(());
    tokio::spawn(
        watch_config(
            cfg.clone(),
            model.clone(),
            metrics.clone(),
            config_loaded,
            tx,
            stop.clone(),
        )
        .instrument(tracing::info_span!("config")),
    );
    let manager = Manager::new(pi.clone(), ready, pod_status);
    let manager_task = tokio::spawn(
        manage_workloads(manager, model, conns.clone(), rx, stop.clone())
            .instrument(tracing::info_span!("workloads")),
    );
    tracing::info!(node = %cfg.node_name, config_dir = %cfg.config_dir.display(), "ztunnel started");

    shutdown_signal().await;
    tracing::info!(
        open = conns.len(),
        "shutting down: listeners closed, draining connections"
    );
    stop.cancel();
    let _ = manager_task.await;
    if tokio::time::timeout(cfg.drain_timeout, conns.drained())
        .await
        .is_err()
    {
        tracing::warn!(
            open = conns.len(),
            "drain deadline reached; closing remaining connections"
        );
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the agent can only be killed; keep serving.
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
    model: Arc<ArcSwap<Model>>,
    metrics: Arc<Metrics>,
    loaded: Arc<AtomicBool>,
    tx: watch::Sender<()>,
    stop: CancellationToken,
) {
    let mut last = mesh::k8s::dir_fingerprint(&cfg.config_dir).ok();
    let mut tick = tokio::time::interval(cfg.config_poll);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let fp = match mesh::k8s::dir_fingerprint(&cfg.config_dir) {
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
        match mesh::k8s::load_dir(&cfg.config_dir) {
            Ok(m) => {
                model.store(Arc::new(m));
                loaded.store(true, Ordering::SeqCst);
                metrics.config_loaded();
                tracing::info!("config reloaded");
                let _ = tx.send(());
            }
            Err(e) => {
                metrics.config_rejected("local");
                tracing::error!(error = %e, "config rejected; keeping the last good config");
            }
        }
    }
}

async fn manage_workloads(
    mut manager: Manager,
    model: Arc<ArcSwap<Model>>,
    conns: Arc<ConnTracker>,
    mut rx: watch::Receiver<()>,
    stop: CancellationToken,
) {
    let mut settled = manager.reconcile(&model.load());
    loop {
        let retry = async {
            if settled {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep(ENROLL_RETRY).await
            }
        };
        tokio::select! {
            _ = stop.cancelled() => {
                manager.stop_all();
                return;
            }
            changed = rx.changed() => {
                if changed.is_err() {
                    return;
                }
                let m = model.load_full();
                settled = manager.reconcile(&m);
                let closed = conns.recheck(&m);
                if closed > 0 {
                    tracing::info!(closed, "policy change closed connections");
                }
            }
            _ = retry => settled = manager.reconcile(&model.load()),
        }
    }
}
