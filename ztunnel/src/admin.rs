//! The agent's own HTTP endpoints, in the node's network namespace (served by
//! `mesh_shell::admin`): admin (`/config_dump`, `/logging`, `/quitquitquit`) on
//! 127.0.0.1:15000, `/metrics` and the node dashboard (`/dashboard`, `/stats`: see
//! [`crate::dashboard`]) on :15020 (and on the admin port), `/healthz/ready` on :15021.
//! This module is what the agent plugs in: its dump, its readiness, the dashboard.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use mesh_shell::admin::{json, reply, AdminApp, Body, Endpoints, Role};
use mesh_telemetry::Metrics;

use crate::proxy::ProxyInputs;
use crate::workloads::PodStatus;

/// Which shared endpoints each of the agent's listeners answers.
pub const LISTENERS: [(Role, Endpoints); 3] = [
    (
        Role::Admin,
        Endpoints {
            metrics: true,
            ready: false,
            admin: true,
        },
    ),
    (Role::Metrics, Endpoints::METRICS),
    (Role::Readiness, Endpoints::READY),
];

/// What the endpoints read.
pub struct AdminState {
    pub pi: Arc<ProxyInputs>,
    /// True once the first config loaded and every enrolled pod has listeners + redirection.
    pub ready: Arc<AtomicBool>,
    pub config_loaded: Arc<AtomicBool>,
    pub pods: Arc<std::sync::Mutex<Vec<PodStatus>>>,
    /// Objects the API server watch refused (kept at their last accepted version); always
    /// empty with a config directory, whose refusals are whole-directory.
    pub rejections: tokio::sync::watch::Receiver<Vec<mesh_kube::Rejection>>,
}

impl AdminApp for AdminState {
    fn metrics(&self) -> &Metrics {
        &self.pi.metrics
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.config_loaded.load(Ordering::SeqCst)
    }

    fn config_dump(&self) -> Result<Vec<u8>, serde_json::Error> {
        let model = self.pi.model.load_full();
        let pods = self.pods.lock().map(|p| p.clone()).unwrap_or_default();
        serde_json::to_vec_pretty(&ConfigDump {
            config: &self.pi.cfg,
            ready: self.ready.load(Ordering::SeqCst),
            config_rejections: self.rejections.borrow().clone(),
            workloads: pods,
            certificates: self.pi.certs.dump(),
            open_connections: self.pi.conns.len(),
            pool: self.pi.pool_stats(),
            pool_per_worker: self
                .pi
                .pools()
                .iter()
                .map(mesh_hbone::Pool::stats)
                .collect(),
            model: model.dump(),
        })
    }

    fn route(&self, role: Role, req: &Request<Incoming>) -> Option<Response<Body>> {
        if !matches!(role, Role::Admin | Role::Metrics) || req.method() != Method::GET {
            return None;
        }
        match req.uri().path() {
            "/dashboard" => Some(reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                crate::dashboard::PAGE,
            )),
            "/stats" => Some(self.stats()),
            _ => None,
        }
    }

    fn index(&self) -> &'static [&'static str] {
        &["/dashboard", "/stats"]
    }
}

impl AdminState {
    /// The node dashboard's JSON, from the agent's state and one read of its metrics registry.
    fn stats(&self) -> Response<Body> {
        let pods = self.pods.lock().map(|p| p.clone()).unwrap_or_default();
        let certs = self.pi.certs.expiries();
        let metrics = self.pi.metrics.snapshot();
        let rejected = self.rejections.borrow().clone();
        let view = crate::dashboard::stats(&crate::dashboard::NodeState {
            node: &self.pi.cfg.node_name,
            backend: self.pi.cfg.redirect,
            ready: self.ready(),
            pods: &pods,
            certs: &certs,
            metrics: &metrics,
            rejected_objects: &rejected,
            now: std::time::SystemTime::now(),
        });
        let mut r = json("stats", serde_json::to_vec(&view));
        if r.status() == StatusCode::OK {
            r.headers_mut().insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
        }
        r
    }
}

#[derive(serde::Serialize)]
struct ConfigDump<'a> {
    config: &'a crate::config::Config,
    ready: bool,
    config_rejections: Vec<mesh_kube::Rejection>,
    workloads: Vec<PodStatus>,
    certificates: Vec<mesh_pki::certs::CertSummary>,
    open_connections: usize,
    /// The HBONE pools' connections and streams, added up and per data worker.
    pool: mesh_hbone::PoolStats,
    pool_per_worker: Vec<mesh_hbone::PoolStats>,
    model: mesh_model::model::ModelDump<'a>,
}
