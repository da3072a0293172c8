//! Wiring only: the CA, the token check, the pods it learns from the config source, the gRPC
//! listener and the shell's endpoints.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::Context;
use arc_swap::ArcSwap;
use mesh_model::model::Model;
use mesh_pki::ca::{certs_to_pem, Ca, CaOrigin};
use mesh_shell::admin::{AdminApp, Control, Endpoints, Role};
use mesh_shell::conns::Active;
use mesh_shell::logging::LogHandle;
use mesh_shell::process::{spawn, AppHandle};
use mesh_shell::source::{Installed, Source};
use mesh_telemetry::Metrics;
use tokio_util::sync::CancellationToken;
use tracing::info_span;

use crate::authn::Authenticator;
use crate::authz::Rules;
use crate::config::{Args, ConfigSource, SERVING_CERT_TTL};
use crate::metrics::CaMetrics;
use crate::server::{GrpcServer, ServingCert};
use crate::service::{CaService, Limits};
use crate::token::TokenAuthority;

/// Which shared endpoints each listener answers.
pub const LISTENERS: [(Role, Endpoints); 3] = [
    (Role::Admin, Endpoints::ALL),
    (Role::Metrics, Endpoints::PUBLIC),
    (Role::Readiness, Endpoints::PUBLIC),
];

/// The listeners as bound (the ports chosen for `:0`).
#[derive(Clone, Copy, Debug)]
pub struct Addrs {
    pub grpc: SocketAddr,
    pub endpoints: mesh_shell::admin::Addrs,
}

/// Runs the CA until SIGTERM, SIGINT or `/quitquitquit`.
pub async fn run(args: Args, log: LogHandle) -> anyhow::Result<()> {
    mesh_shell::process::run_until_signalled(log, |ctl| start(args, ctl)).await
}

/// Starts the CA: every listener is bound and serving when this returns.
pub async fn start(args: Args, ctl: Control) -> anyhow::Result<AppHandle<Addrs>> {
    let p = &args.process;
    let ca_dir =
        p.ca.ca_dir
            .clone()
            .context("the CA service signs: it needs --ca-dir")?;
    let ca = Arc::new(
        Ca::load_or_create(&ca_dir, &p.trust_domain)
            .with_context(|| format!("load CA from {}", ca_dir.display()))?,
    );
    let source = Source::open(p.config_source, p.config_dir.as_deref())
        .await
        .context("set up the config source")?;
    let authn = match (&source, p.config_source) {
        (Source::Kube(client), _) => Authenticator::Kube {
            client: client.clone(),
            audience: args.token_audience.clone(),
        },
        (_, ConfigSource::Dir | ConfigSource::Kube) => Authenticator::Local {
            tokens: TokenAuthority::load_or_create(&ca_dir)?,
            audience: args.token_audience.clone(),
        },
    };
    let (metrics, ca_metrics) = CaMetrics::new();
    let (installed, _) = Installed::new(source.initial(&metrics), metrics.clone(), |_| {});
    let rules = Rules {
        trust_domain: p.trust_domain.clone(),
        node_accounts: args.node_accounts.clone(),
    };
    let limits = Limits {
        default_ttl: p.cert_ttl.min(args.max_cert_ttl),
        max_ttl: args.max_cert_ttl,
        max_in_flight: args.max_in_flight,
        per_caller_burst: args.per_caller_burst,
        per_caller_rate: args.per_caller_rate,
    };
    let authn_kind = authn.describe();
    let service = CaService::new(
        ca.clone(),
        authn,
        rules,
        installed.model.clone(),
        installed.loaded.clone(),
        limits,
        ca_metrics,
    );
    let serving = ServingCert::new(ca.clone(), args.serving_names.clone(), SERVING_CERT_TTL)
        .context("issue the serving certificate")?;
    let stop = CancellationToken::new();
    let grpc = GrpcServer::bind(
        args.grpc_addr,
        serving.clone(),
        service.clone(),
        p.tls_handshake_timeout,
        &p.limits,
        metrics.clone(),
    )
    .await?;
    let grpc_addr = grpc.local_addr().unwrap_or(args.grpc_addr);
    let state = Arc::new(State {
        metrics,
        ready: installed.loaded.clone(),
        model: installed.model.clone(),
        service,
        ca: ca.clone(),
        serving_names: args.serving_names.clone(),
        authn: authn_kind,
    });
    let endpoints = mesh_shell::admin::Addrs {
        admin: p.admin_addr,
        metrics: p.metrics_addr,
        readiness: p.readiness_addr,
    };
    let endpoints =
        mesh_shell::admin::start(endpoints, LISTENERS, state, ctl.clone(), stop.clone()).await?;
    let source_name = source.describe();
    source.run(
        p.config_poll,
        installed,
        mesh_kube::Options::default(),
        stop.clone(),
    );
    spawn(
        info_span!("serving_cert"),
        serving.run_rotation(stop.clone()),
    );
    let active = Arc::new(Active::default());
    let grpc_task = spawn(info_span!("grpc"), grpc.run(active.clone(), stop.clone()));
    tracing::info!(grpc = %grpc_addr, ca = ?ca.origin(), authn = authn_kind,
        config = %source_name, "control started");
    let drain = p.drain_timeout;
    let shutdown = ctl.shutdown.clone();
    let done = tokio::spawn(async move {
        shutdown.triggered().await;
        tracing::info!(
            open = active.len(),
            "shutting down: listener closed, draining"
        );
        stop.cancel();
        let _ = grpc_task.await;
        mesh_shell::process::drain(drain, active.idle(), || active.len()).await;
    });
    Ok(AppHandle::new(
        Addrs {
            grpc: grpc_addr,
            endpoints,
        },
        ctl.shutdown,
        done,
    ))
}

/// What the endpoints read.
struct State {
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    model: Arc<ArcSwap<Model>>,
    service: CaService,
    ca: Arc<Ca>,
    serving_names: Vec<String>,
    authn: &'static str,
}

/// `/config_dump`: what the CA knows and did. Never a key or a token.
#[derive(serde::Serialize)]
struct Dump<'a> {
    trust_domain: &'a str,
    ca_origin: String,
    roots_pem: String,
    serving_names: &'a [String],
    authentication: &'static str,
    node_accounts: Vec<String>,
    default_ttl_secs: u64,
    max_ttl_secs: u64,
    /// `ns/name` → node, of every pod with a node.
    pods: Vec<(String, String)>,
    issued: Vec<crate::service::Issued>,
}

impl AdminApp for State {
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }

    fn config_dump(&self) -> Result<Vec<u8>, serde_json::Error> {
        let model = self.model.load_full();
        let rules = self.service.rules();
        let limits = self.service.limits();
        let dump = Dump {
            trust_domain: &rules.trust_domain,
            ca_origin: match self.ca.origin() {
                CaOrigin::PlugIn(d) => format!("plug-in {}", d.display()),
                CaOrigin::Generated(d) => format!("generated {}", d.display()),
                CaOrigin::Ephemeral => "ephemeral".into(),
            },
            roots_pem: certs_to_pem(&self.ca.roots()),
            serving_names: &self.serving_names,
            authentication: self.authn,
            node_accounts: rules
                .node_accounts
                .iter()
                .map(|a| format!("{}/{}", a.namespace, a.name))
                .collect(),
            default_ttl_secs: limits.default_ttl.as_secs(),
            max_ttl_secs: limits.max_ttl.as_secs(),
            pods: model
                .pods
                .values()
                .filter_map(|p| Some((format!("{}/{}", p.namespace, p.name), p.node_name.clone()?)))
                .collect(),
            issued: self.service.ledger(),
        };
        serde_json::to_vec_pretty(&dump)
    }
}
