//! What the waypoint plugs into `mesh_shell`'s endpoints: `/metrics` and `/healthz/ready`
//! on :15020 and :15021 (both paths on both ports), and on the admin address (loopback
//! :15000 by default: it shows the whole mesh) also `/config_dump` (the model the waypoint
//! applies as JSON, as Envoy's admin `config_dump` is, with `access_log`: whether requests
//! are logged and which Telemetry decided), `/logging` and `/quitquitquit`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_l7::telemetry::AccessLogSwitch;
use mesh_model::identity::Identity;
use mesh_model::model::Model;
use mesh_pki::certs::CertManager;
use mesh_shell::admin::{AdminApp, Endpoints, Role};
use mesh_telemetry::Metrics;

/// Which shared endpoints each of the waypoint's listeners answers.
pub const LISTENERS: [(Role, Endpoints); 3] = [
    (Role::Admin, Endpoints::ALL),
    (Role::Metrics, Endpoints::PUBLIC),
    (Role::Readiness, Endpoints::PUBLIC),
];

/// What the endpoints read.
pub struct StatsState {
    pub metrics: Arc<Metrics>,
    /// True once a config has loaded and the waypoint's certificate was issued.
    pub ready: Arc<AtomicBool>,
    /// The model in force, for `/config_dump`.
    pub model: Arc<ArcSwap<Model>>,
    /// Whether requests get access-log lines, and which Telemetry decided.
    pub access_log: Arc<AccessLogSwitch>,
    /// The waypoint's certificate (from the CA service, or signed here in single-process
    /// mode): not ready without it.
    pub certs: Arc<CertManager>,
    pub identity: Identity,
    /// The upstream pools, for their HBONE connection counts per data worker.
    pub upstreams: Arc<mesh_l7::upstream::Upstreams>,
}

impl AdminApp for StatsState {
    fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && self.certs.has_all([&self.identity])
    }

    fn config_dump(&self) -> Result<Vec<u8>, serde_json::Error> {
        let model = self.model.load_full();
        serde_json::to_vec_pretty(&serde_json::json!({
            "ready": self.ready(),
            "certificates": self.certs.dump(),
            "certificates_pending": self.certs.pending(),
            "access_log": *self.access_log.decision(),
            "upstream_hbone_pools": self.upstreams.hbone_stats(),
            "model": model.dump(),
        }))
    }
}
