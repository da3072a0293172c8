//! Wiring only: builds the components from the config and runs them until a signal.
//!
//! Configuration is read exactly as the node agent reads it: the same YAML directory
//! (polled, reloaded on change, an invalid change rejected and the last good model kept) or
//! the API server (`mesh_kube::watch` with the waypoint's kinds: also HTTPRoutes,
//! GRPCRoutes, RequestAuthentications, VirtualServices, DestinationRules and Telemetries;
//! with `--ingress` the gateway's, also TLS Secrets and ReferenceGrants), the same CA
//! directory (the waypoint issues its own certificate from it). Not ready until a first
//! good model is in. Each model's access-log decision (Telemetry API, off by default) is
//! resolved as the model is installed. With `--ingress` and the API server, the Gateway's
//! status is written back after each installed model (`mesh_kube::status`).

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use mesh_l7::jwks::JwksCache;
use mesh_l7::proxy::Inputs;
use mesh_l7::telemetry::{AccessLogSwitch, HttpMetrics};
use mesh_l7::upstream::{UpstreamConfig, Upstreams};
use mesh_model::model::{ListenerProtocol, Model, INGRESS_GATEWAY_CLASS};
use mesh_shell::admin::Control;
use mesh_shell::conns::Active;
use mesh_shell::logging::LogHandle;
use mesh_shell::process::{spawn, AppHandle};
use mesh_shell::source::{Installed, Source};
use mesh_shell::workers::Workers;
use tokio_util::sync::CancellationToken;
use tracing::info_span;

use crate::config::{Config, ConfigSource};
use crate::inbound::{Inbound, InboundConfig};
use crate::stats::{StatsState, LISTENERS};

/// The waypoint's listeners as bound (the ports chosen for `:0`).
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    pub hbone: SocketAddr,
    /// Admin, metrics, readiness.
    pub endpoints: mesh_shell::admin::Addrs,
}

/// Runs the waypoint until SIGTERM, SIGINT or `/quitquitquit`, then drains.
pub async fn run(cfg: Config, log: LogHandle) -> anyhow::Result<()> {
    mesh_shell::process::run_until_signalled(log, |ctl| start(cfg, ctl)).await
}

/// Starts the waypoint: every listener is bound and serving when this returns. The
/// handle's shutdown (or `ctl.shutdown`: `/quitquitquit`) closes the HBONE listener and
/// drains open connections for at most `drain_timeout`.
pub async fn start(cfg: Config, ctl: Control) -> anyhow::Result<AppHandle<Addrs>> {
    let cfg = Arc::new(cfg);
    // The waypoint asks for its own identity only.
    let certs = mesh_shell::certs::open(&cfg.ca, &cfg.trust_domain, cfg.cert_ttl, false)
        .context("set up certificates")?;
    if certs.is_remote() {
        // Fetched in the background (rotation task); not ready until it arrives.
        certs.want(&cfg.identity);
    } else {
        // Issued now so that a CA problem fails startup instead of the first handshake.
        certs
            .certified_key(&cfg.identity)
            .with_context(|| format!("issue a certificate for {}", cfg.identity))?;
    }
    let (metrics, http_metrics) = HttpMetrics::new();
    let source = Source::open(cfg.config_source, cfg.config_dir.as_deref())
        .await
        .context("set up the config source")?;
    // Not ready until a first good model is in (with the API server: once every kind was
    // listed).
    // The access-log switch is resolved here, once per model, before the model is installed.
    let access_log = Arc::new(AccessLogSwitch::default());
    let (installed, installed_changes) =
        Installed::new(source.initial(&metrics), metrics.clone(), {
            let cfg = cfg.clone();
            let access_log = access_log.clone();
            move |m: &Model| {
                check_gateway(m, &cfg);
                access_log.update(m, &cfg.gateway);
            }
        });
    let model = installed.model.clone();
    // `--threading per-worker`: the HBONE connections and the upstream pools live on these;
    // they stop (cutting what still runs on them, as an exit does) when the drain is over.
    let (workers, turns) = Workers::start_data_path("waypoint", cfg.data_workers)
        .context("start the data-path workers")?;
    let upstreams = Upstreams::new(
        UpstreamConfig {
            identity: cfg.identity.clone(),
            connect_timeout: cfg.connect_timeout,
            idle_timeout: cfg.upstream_idle_timeout,
            max_idle: cfg.max_idle_per_endpoint,
            keepalive: cfg.limits.keepalive(),
            outlier_ejections: http_metrics.outlier_ejections.clone(),
            hbone: cfg.limits.hbone_pool(),
            worker: mesh_shell::workers::current,
        },
        certs.clone(),
        turns.handles().len(),
    );
    let stop = CancellationToken::new();
    let jwks_tls = mesh_l7::jwks::tls_config(cfg.jwks_ca_file.as_deref())
        .context("roots for https jwksUri")?;
    let jwks = JwksCache::new(cfg.jwks, jwks_tls, http_metrics.clone());
    let inputs = Arc::new(Inputs {
        receive_budget: cfg.limits.receive_budget(),
        cfg: cfg.engine(),
        model: model.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
        http_metrics,
        upstreams: upstreams.clone(),
        jwks: jwks.clone(),
        drain: stop.clone(),
        access_log: access_log.clone(),
        hosts: Arc::new(mesh_l7::resolve::HostCache::new(cfg.connect_timeout)),
    });
    let active = Arc::new(Active::default());

    let inbound = Inbound::new(
        InboundConfig {
            addr: cfg.hbone_addr,
            tls_handshake_timeout: cfg.tls_handshake_timeout,
            detect_timeout: cfg.detect_timeout,
        },
        inputs.clone(),
        active.clone(),
        &cfg.limits,
        turns,
    )
    .await?;
    let hbone = inbound.local_addr().unwrap_or(cfg.hbone_addr);
    let state = Arc::new(StatsState {
        metrics: metrics.clone(),
        ready: installed.loaded.clone(),
        model: model.clone(),
        access_log,
        certs: certs.clone(),
        identity: cfg.identity.clone(),
        upstreams,
    });
    let endpoints =
        mesh_shell::admin::start(cfg.endpoints, LISTENERS, state, ctl.clone(), stop.clone())
            .await?;
    spawn(
        info_span!("cert_rotation"),
        certs.clone().run_rotation(stop.clone()),
    );
    spawn(info_span!("jwks"), jwks.run(model.clone(), stop.clone()));
    let source_name = source.describe();
    // Only an ingress gateway's deployment may read Secrets (and its RBAC allows it); a
    // waypoint never lists one.
    let scope = if cfg.ingress {
        mesh_kube::Scope::Gateway
    } else {
        mesh_kube::Scope::Waypoint
    };
    if let (true, Source::Kube(client)) = (cfg.ingress, &source) {
        // After each installed model (`installed_changes` fires once it is in force).
        let model = model.clone();
        spawn(
            info_span!("gateway_status"),
            mesh_kube::status::write_gateway_status(
                client.clone(),
                cfg.gateway.clone(),
                installed_changes.clone(),
                move || model.load_full(),
                stop.clone(),
            ),
        );
    }
    source.run(
        cfg.config_poll,
        installed,
        mesh_kube::Options {
            scope,
            ..mesh_kube::Options::default()
        },
        stop.clone(),
    );
    tracing::info!(
        gateway = %cfg.gateway,
        identity = %cfg.identity,
        hbone = %hbone,
        config = %source_name,
        "waypoint started"
    );
    // The ingress listeners (an ingress gateway's) count against the HBONE listener's caps:
    // one budget of connections and of TLS handshakes per process.
    let (conn_cap, handshake_cap) = inbound.caps();
    let inbound_task = spawn(info_span!("inbound"), inbound.run());
    let ingress = crate::ingress::Ingress::new(
        cfg.gateway.clone(),
        inputs.clone(),
        active.clone(),
        crate::ingress::IngressLimits {
            conn_cap,
            handshake_cap,
            handshake_timeout: cfg.tls_handshake_timeout,
        },
        cfg.hbone_addr.ip(),
        stop.clone(),
    );
    // The ingress listeners (a Gateway of class `istio`) follow each installed model
    // (`installed_changes` fires once it is in force).
    spawn(info_span!("ingress"), ingress.run(installed_changes));

    let shutdown = ctl.shutdown.clone();
    let done = tokio::spawn(async move {
        shutdown.triggered().await;
        tracing::info!(
            open = active.len(),
            "shutting down: listener closed, draining connections"
        );
        stop.cancel();
        let _ = inbound_task.await;
        mesh_shell::process::drain(cfg.drain_timeout, active.idle(), || active.len()).await;
        drop(workers);
    });
    Ok(AppHandle::new(
        Addrs { hbone, endpoints },
        ctl.shutdown,
        done,
    ))
}

/// Says so when the model does not (yet) know this waypoint: then no destination uses it and
/// every CONNECT is refused.
fn check_gateway(model: &Model, cfg: &Config) {
    match model.gateways.get(&cfg.gateway) {
        Some(gw) if gw.class == INGRESS_GATEWAY_CLASS => {
            if !cfg.ingress && cfg.config_source == ConfigSource::Kube {
                let https = gw
                    .listeners
                    .iter()
                    .any(|l| l.protocol == ListenerProtocol::Https);
                if https {
                    tracing::warn!(gateway = %cfg.gateway, "ingress Gateway with HTTPS listeners but no --ingress: no Secret is read, so they are not served (and no status is written)");
                }
            }
        }
        Some(gw) if gw.is_waypoint() => {}
        Some(gw) => {
            tracing::warn!(gateway = %cfg.gateway, class = %gw.class, "the gateway is neither of class istio-waypoint nor istio (ingress)")
        }
        None => {
            tracing::warn!(gateway = %cfg.gateway, "no such Gateway in the config; nothing will be routed here")
        }
    }
}
