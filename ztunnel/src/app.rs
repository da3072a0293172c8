//! Wiring only: builds the components from the config and runs them until a signal.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use mesh_hbone::{Pool, PoolConfig};
use mesh_model::model::Model;
use mesh_pki::ca::Ca;
use mesh_pki::certs::CertManager;
use mesh_telemetry::Metrics;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::admin::{AdminState, Server};
use crate::config::{Config, ConfigSource};
use crate::conns::ConnTracker;
use crate::logging::LogHandle;
use crate::netns::Netns;
use crate::netns_source::PodNetnsSource;
use crate::podns::PodNetnsFinder;
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
    // `config_loaded`: the source has a good model. `serving` (what readiness reads): the
    // workload manager has reconciled such a model, so readiness never reports pods that are
    // not enrolled yet.
    let config_loaded = Arc::new(AtomicBool::new(false));
    let serving = Arc::new(AtomicBool::new(false));
    // The source is set up before anything listens, so a missing directory or API server
    // configuration fails startup instead of leaving an agent that is never ready.
    let source = match cfg.config_source {
        ConfigSource::Dir => {
            let dir = cfg
                .config_dir
                .clone()
                .context("--config-source dir needs --config-dir")?;
            Source::Dir(dir)
        }
        ConfigSource::Kube => Source::Kube(
            mesh_kube::client()
                .await
                .context("set up the kubernetes api client")?,
        ),
    };
    let (initial, loaded) = match &source {
        Source::Dir(dir) => match mesh_model::k8s::load_dir(dir) {
            Ok(m) => {
                metrics.config_loaded();
                (m, true)
            }
            Err(e) => {
                metrics.config_rejected("local");
                tracing::error!(error = %e, dir = %dir.display(), "config rejected; not ready until a valid config arrives");
                (Model::default(), false)
            }
        },
        // Not ready until the first complete list of every watched kind.
        Source::Kube(_) => (Model::default(), false),
    };
    config_loaded.store(loaded, Ordering::SeqCst);
    let pod_netns = match cfg.config_source {
        ConfigSource::Dir => PodNetnsSource::Named(cfg.clone()),
        ConfigSource::Kube => PodNetnsSource::ByIp(Arc::new(
            PodNetnsFinder::new(home.clone()).context("set up the pod netns finder")?,
        )),
    };
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
        pod_netns,
        stop.clone(),
    ));

    let ready = Arc::new(AtomicBool::new(false));
    let pod_status = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (rejections_tx, rejections) = watch::channel(Vec::new());
    let state = Arc::new(AdminState {
        pi: pi.clone(),
        ready: ready.clone(),
        config_loaded: serving.clone(),
        pods: pod_status.clone(),
        rejections,
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
    match source {
        Source::Dir(dir) => {
            tokio::spawn(
                watch_config(
                    dir,
                    cfg.config_poll,
                    model.clone(),
                    metrics.clone(),
                    config_loaded.clone(),
                    tx,
                    stop.clone(),
                )
                .instrument(tracing::info_span!("config")),
            );
        }
        Source::Kube(client) => {
            let (models_tx, models) = watch::channel(Arc::new(Model::default()));
            let opts = mesh_kube::Options {
                metrics: Some(metrics.clone()),
                rejections: Some(rejections_tx),
                ..mesh_kube::Options::default()
            };
            tokio::spawn(
                mesh_kube::watch(client, models_tx, opts, stop.clone())
                    .instrument(tracing::info_span!("kube")),
            );
            tokio::spawn(
                follow_models(
                    models,
                    model.clone(),
                    config_loaded.clone(),
                    tx,
                    stop.clone(),
                )
                .instrument(tracing::info_span!("config")),
            );
        }
    }
    let manager = Manager::new(pi.clone(), ready, pod_status);
    let manager_task = tokio::spawn(
        manage_workloads(
            manager,
            model,
            Loaded {
                source: config_loaded,
                serving,
            },
            conns.clone(),
            rx,
            stop.clone(),
        )
        .instrument(tracing::info_span!("workloads")),
    );
    tracing::info!(node = %cfg.node_name, source = ?cfg.config_source, config_dir = ?cfg.config_dir, "ztunnel started");

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

/// Where the model comes from, set up and ready to run.
enum Source {
    Dir(PathBuf),
    Kube(::kube::Client),
}

/// Polls the config directory; a valid change replaces the model, an invalid one is rejected
/// with its error logged and counted, and the last good model stays.
async fn watch_config(
    dir: PathBuf,
    poll: Duration,
    model: Arc<ArcSwap<Model>>,
    metrics: Arc<Metrics>,
    loaded: Arc<AtomicBool>,
    tx: watch::Sender<()>,
    stop: CancellationToken,
) {
    let mut last = mesh_model::k8s::dir_fingerprint(&dir).ok();
    let mut tick = tokio::time::interval(poll);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let fp = match mesh_model::k8s::dir_fingerprint(&dir) {
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
        match mesh_model::k8s::load_dir(&dir) {
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

/// Installs every model the API server watch publishes (`mesh_kube::watch` publishes only
/// complete, accepted models, the first one after every kind was listed), then tells the
/// workload manager, exactly as a directory reload does.
async fn follow_models(
    mut models: watch::Receiver<Arc<Model>>,
    model: Arc<ArcSwap<Model>>,
    loaded: Arc<AtomicBool>,
    tx: watch::Sender<()>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = models.changed() => {
                if changed.is_err() {
                    // The watch only ends on shutdown; the last model stays in force.
                    return;
                }
            }
        }
        let next = models.borrow_and_update().clone();
        model.store(next);
        if !loaded.swap(true, Ordering::SeqCst) {
            tracing::info!("first model from the api server installed");
        } else {
            tracing::debug!("model from the api server installed");
        }
        let _ = tx.send(());
    }
}

/// Whether a good model is in: at the source, and reconciled by the workload manager.
struct Loaded {
    source: Arc<AtomicBool>,
    serving: Arc<AtomicBool>,
}

impl Loaded {
    /// Reconciles the current model, then says it is served if the source had a good model
    /// before it was read (the source stores the model, then sets its flag).
    fn reconcile(&self, manager: &mut Manager, model: &ArcSwap<Model>) -> bool {
        let loaded = self.source.load(Ordering::SeqCst);
        let settled = manager.reconcile(&model.load());
        self.serving.store(loaded, Ordering::SeqCst);
        settled
    }
}

async fn manage_workloads(
    mut manager: Manager,
    model: Arc<ArcSwap<Model>>,
    loaded: Loaded,
    conns: Arc<ConnTracker>,
    mut rx: watch::Receiver<()>,
    stop: CancellationToken,
) {
    let mut settled = loaded.reconcile(&mut manager, &model);
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
                settled = loaded.reconcile(&mut manager, &model);
                let closed = conns.recheck(&model.load_full());
                if closed > 0 {
                    tracing::info!(closed, "policy change closed connections");
                }
            }
            _ = retry => settled = loaded.reconcile(&mut manager, &model),
        }
    }
}
