//! Wiring only: builds the components from the config and runs them until a signal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use arc_swap::ArcSwap;
use mesh_hbone::PoolConfig;
use mesh_model::model::Model;
use mesh_shell::admin::Control;
use mesh_shell::logging::LogHandle;
use mesh_shell::process::{spawn, AppHandle};
use mesh_shell::source::{Installed, Source};
use mesh_shell::workers::Workers;
use mesh_telemetry::Metrics;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info_span;

use crate::admin::{AdminState, LISTENERS};
use crate::config::{Config, ConfigSource, Redirect};
use crate::conns::ConnTracker;
use crate::netns::Netns;
use crate::netns_source::PodNetnsSource;
use crate::podns::PodNetnsFinder;
use crate::proxy::ProxyInputs;
use crate::workloads::Manager;

/// How often pods that failed to enroll (e.g. netns not there yet) are retried.
const ENROLL_RETRY: Duration = Duration::from_secs(1);

/// The agent's endpoint listeners as bound (admin, metrics, readiness).
pub type Addrs = mesh_shell::admin::Addrs;

/// Runs the agent until SIGTERM, SIGINT or `/quitquitquit`, then drains.
pub async fn run(cfg: Config, log: LogHandle) -> anyhow::Result<()> {
    mesh_shell::process::run_until_signalled(log, |ctl| start(cfg, ctl)).await
}

/// Starts the agent: everything is bound and running when this returns; the handle's
/// shutdown (or `ctl.shutdown`) drains it.
pub async fn start(mut cfg: Config, ctl: Control) -> anyhow::Result<AppHandle<Addrs>> {
    cfg.redirect = crate::redirect::resolve(cfg.redirect, &cfg.bpf_fs)
        .context("set up the requested redirection backend")?;
    tracing::info!(backend = ?cfg.redirect, "redirection backend");
    let cfg = Arc::new(cfg);
    let home = Arc::new(Netns::current().context("open the agent's own netns")?);
    // A node agent asks the CA for its pods' identities (`ImpersonatedIdentity`).
    let certs = mesh_shell::certs::open(&cfg.ca, &cfg.trust_domain, cfg.cert_ttl, true)
        .context("set up certificates")?;
    let metrics = Metrics::new();
    // The source is set up before anything listens, so a missing directory or API server
    // configuration fails startup instead of leaving an agent that is never ready.
    let source = Source::open(cfg.config_source, cfg.config_dir.as_deref())
        .await
        .context("set up the config source")?;
    // `installed.loaded`: the source has a good model. `serving` (what readiness reads):
    // the workload manager has reconciled such a model, so readiness never reports pods that
    // are not enrolled yet.
    let (installed, changed) = Installed::new(source.initial(&metrics), metrics.clone(), |_| {});
    let serving = Arc::new(AtomicBool::new(false));
    let pod_netns = match cfg.config_source {
        _ if cfg.redirect == Redirect::Loopback => PodNetnsSource::Agent(home.clone()),
        ConfigSource::Dir => PodNetnsSource::Named(cfg.clone()),
        ConfigSource::Kube => PodNetnsSource::ByIp(Arc::new(
            PodNetnsFinder::new(home.clone()).context("set up the pod netns finder")?,
        )),
    };
    let model = installed.model.clone();
    let pool = PoolConfig {
        connect_timeout: cfg.connect_timeout,
        ..cfg.limits.hbone_pool()
    };
    // `--threading per-worker`: the pods' listeners and the HBONE pools live on these; they
    // stop (cutting what still runs on them, as an exit does) when the drain is over.
    let (workers, turns) = Workers::start_data_path("ztunnel", cfg.data_workers)
        .context("start the data-path workers")?;
    let conns = Arc::new(ConnTracker::default());
    let stop = CancellationToken::new();
    // Ends what the drain still needs (config, certificate renewal, policy re-checks of the
    // connections being drained: up to `--drain-timeout`, an hour by default) once it is over.
    let exit = CancellationToken::new();
    let pi = Arc::new(ProxyInputs::new(
        cfg.clone(),
        model.clone(),
        certs.clone(),
        pool,
        turns,
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
    });
    let endpoints =
        mesh_shell::admin::start(cfg.endpoints, LISTENERS, state, ctl.clone(), stop.clone())
            .await?;
    spawn(
        info_span!("cert_rotation"),
        certs.clone().run_rotation(exit.clone()),
    );

    source.run(
        cfg.config_poll,
        installed.clone(),
        mesh_kube::Options {
            rejections: Some(rejections_tx),
            ..mesh_kube::Options::default()
        },
        exit.clone(),
    );
    let manager = Manager::new(pi.clone(), ready, pod_status);
    let manager_task = spawn(
        info_span!("workloads"),
        manage_workloads(
            manager,
            model,
            certs.subscribe(),
            Loaded {
                source: installed.loaded.clone(),
                serving,
            },
            conns.clone(),
            changed,
            stop.clone(),
        ),
    );
    tracing::info!(node = %cfg.node_name, source = ?cfg.config_source, config_dir = ?cfg.config_dir, "ztunnel started");

    let shutdown = ctl.shutdown.clone();
    let done = tokio::spawn(async move {
        shutdown.triggered().await;
        let open = pi.open.clone();
        tracing::info!(
            open = open.len(),
            inbound_admitted = conns.len(),
            deadline_s = cfg.drain_timeout.as_secs_f64(),
            release = cfg.release_on_exit,
            "shutting down: listeners closed, draining connections (both directions)"
        );
        let started = std::time::Instant::now();
        stop.cancel();
        // Connections being drained stay subject to policy: a change that no longer allows
        // one closes it here too, as in the new agent serving the node meanwhile.
        if let Ok(changes) = manager_task.await {
            spawn(
                info_span!("drain_rechecks"),
                recheck_while_draining(changes, pi.model.clone(), conns.clone(), exit.clone()),
            );
        }
        let drained =
            mesh_shell::process::drain(cfg.drain_timeout, open.idle(), || open.len()).await;
        exit.cancel();
        let waited_ms = started.elapsed().as_millis() as u64;
        if drained {
            tracing::info!(waited_ms, "drained: every connection finished");
        } else {
            // Exiting closes them; the count is the deadline's toll.
            tracing::warn!(
                cut = open.len(),
                waited_ms,
                "drain deadline: connections cut"
            );
        }
        if cfg.release_on_exit {
            release_on_exit(&cfg, &pi.model.load()).await;
        }
        drop(workers);
    });
    Ok(AppHandle::new(endpoints, ctl.shutdown, done))
}

/// `--release-on-exit`: the pods were released when the drain began (new connections go
/// directly); this removes what the drained connections kept, for every pod of the node.
async fn release_on_exit(cfg: &Config, model: &Model) {
    match crate::uninstall::pod_netns(cfg) {
        Ok(pods) => {
            let released = crate::uninstall::release_node(cfg, model, &pods).await;
            tracing::info!(
                pods = released.pods,
                pins = released.pins,
                "released every pod's capture on exit"
            );
        }
        Err(e) => tracing::error!(error = format!("{e:#}"), "release on exit"),
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

/// After shutdown began: re-checks the open connections against every new model until
/// `exit`.
async fn recheck_while_draining(
    mut changes: watch::Receiver<()>,
    model: Arc<ArcSwap<Model>>,
    conns: Arc<ConnTracker>,
    exit: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = exit.cancelled() => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                let closed = conns.recheck(&model.load_full());
                if closed > 0 {
                    tracing::info!(closed, "policy change closed connections (draining)");
                }
            }
        }
    }
}

/// Keeps the node's pods enrolled as models come and go; on `stop` closes their listeners
/// and returns the model changes for [`recheck_while_draining`].
async fn manage_workloads(
    mut manager: Manager,
    model: Arc<ArcSwap<Model>>,
    mut certs: watch::Receiver<u64>,
    loaded: Loaded,
    conns: Arc<ConnTracker>,
    mut rx: watch::Receiver<()>,
    stop: CancellationToken,
) -> watch::Receiver<()> {
    let mut settled = loaded.reconcile(&mut manager, &model);
    // The source stops publishing (its sender goes) when it ends, which on shutdown races
    // with `stop`: the loop only ever ends through `stop`, so the pods' listeners always
    // close (returning here without `shut_down` left them accepting through the drain).
    let mut source_open = true;
    loop {
        let retry = async {
            if settled {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep(ENROLL_RETRY).await
            }
        };
        tokio::select! {
            biased;
            _ = stop.cancelled() => {
                manager.shut_down();
                return rx;
            }
            changed = rx.changed(), if source_open => {
                if changed.is_err() {
                    source_open = false;
                    continue;
                }
                settled = loaded.reconcile(&mut manager, &model);
                let closed = conns.recheck(&model.load_full());
                if closed > 0 {
                    tracing::info!(closed, "policy change closed connections");
                }
            }
            _ = retry => settled = loaded.reconcile(&mut manager, &model),
            // A certificate arrived, was renewed or refused: readiness and pod states, and
            // the enrollments that waited for it.
            Ok(()) = certs.changed() => {
                if settled {
                    manager.refresh();
                } else {
                    settled = loaded.reconcile(&mut manager, &model);
                }
            }
        }
    }
}
