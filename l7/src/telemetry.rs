//! Istio's HTTP metrics (`reporter="waypoint"`) and the per-request access log.
//!
//! - `istio_requests_total`, `istio_request_duration_milliseconds` (histogram, Istio's
//!   buckets), `istio_request_bytes`, `istio_response_bytes` (histograms) with the standard
//!   labels plus `response_code` and `grpc_response_status`;
//! - `waypoint_outlier_ejections_total{cluster}`: DestinationRule outlier-detection
//!   ejections (cluster = Envoy's `outbound|<port>|<subset>|<host>`);
//! - one `access` log line per request, only when the Telemetry API turns it on for this
//!   waypoint ([`AccessLogSwitch`]; off by default, as for Istio's Envoy-based proxies).
//!
//! Registered in the same registry as the shared `mesh_telemetry` families (TCP metrics for
//! L4-relayed ports, refusals, config reloads, process), so one scrape returns everything.

use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use mesh_model::identity::Identity;
use mesh_model::model::{AccessLogDecision, Model, NamespacedName, Pod, Service};
use mesh_telemetry::{Metrics, TcpLabels};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::balance::ClusterLabels;

/// The `reporter` label of everything a waypoint reports.
pub const REPORTER: &str = "waypoint";

/// Istio's buckets for `istio_request_duration_milliseconds`.
const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Istio's buckets for request and response sizes (bytes).
const SIZE_BUCKETS: [f64; 8] = [1.0, 10.0, 100.0, 1000.0, 10000.0, 100000.0, 1e6, 1e7];

/// Shared with the node agent: one enum of causes for logs and `response_flags`.
pub use mesh_telemetry::ResponseFlag;

/// `reason` of `waypoint_jwt_rejected_total` (`mesh_model::jwt::JwtError::reason`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: String,
}

/// `result` of `waypoint_mirror_requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: String,
}

/// `waypoint_jwks_fetches_total{uri, result}`; `result` is `ok` or why it failed.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwksFetchLabels {
    pub uri: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub response_code: String,
    pub grpc_response_status: String,
    /// Last: the derive can only flatten the final field.
    #[prometheus(flatten)]
    pub base: TcpLabels,
}

/// The HTTP families.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: Family<HttpLabels, Counter>,
    duration: Family<HttpLabels, Histogram, fn() -> Histogram>,
    request_bytes: Family<HttpLabels, Histogram, fn() -> Histogram>,
    response_bytes: Family<HttpLabels, Histogram, fn() -> Histogram>,
    jwt_rejected: Family<ReasonLabels, Counter>,
    jwks_fetches: Family<JwksFetchLabels, Counter>,
    /// `waypoint_outlier_ejections_total{cluster}`, counted by [`crate::balance`].
    pub outlier_ejections: Family<ClusterLabels, Counter>,
    retries: Family<ReasonLabels, Counter>,
    mirrors: Family<ResultLabels, Counter>,
    downstream_errors: Family<ReasonLabels, Counter>,
}

impl fmt::Debug for HttpMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpMetrics").finish_non_exhaustive()
    }
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS_MS)
}

fn size_histogram() -> Histogram {
    Histogram::new(SIZE_BUCKETS)
}

impl HttpMetrics {
    /// The shared metrics with the HTTP families registered in the same registry.
    pub fn new() -> (Arc<Metrics>, HttpMetrics) {
        let http = HttpMetrics {
            requests: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            request_bytes: Family::new_with_constructor(size_histogram),
            response_bytes: Family::new_with_constructor(size_histogram),
            jwt_rejected: Family::default(),
            jwks_fetches: Family::default(),
            outlier_ejections: Family::default(),
            retries: Family::default(),
            mirrors: Family::default(),
            downstream_errors: Family::default(),
        };
        let registered = http.clone();
        let metrics = Metrics::new_with(move |r: &mut Registry| {
            r.register(
                "istio_requests",
                "Requests processed by the waypoint",
                registered.requests,
            );
            r.register(
                "istio_request_duration_milliseconds",
                "Request duration, until the last byte of the response",
                registered.duration,
            );
            r.register(
                "istio_request_bytes",
                "Request body sizes",
                registered.request_bytes,
            );
            r.register(
                "istio_response_bytes",
                "Response body sizes",
                registered.response_bytes,
            );
            r.register(
                "waypoint_jwt_rejected",
                "Requests refused by RequestAuthentication (401), by reason",
                registered.jwt_rejected,
            );
            r.register(
                "waypoint_jwks_fetches",
                "Fetches of RequestAuthentication jwksUri documents, by result",
                registered.jwks_fetches,
            );
            r.register(
                "waypoint_outlier_ejections",
                "Endpoints ejected by DestinationRule outlier detection, by cluster",
                registered.outlier_ejections,
            );
            r.register(
                "waypoint_upstream_retries",
                "Upstream attempts retried, by what the failed attempt came to",
                registered.retries,
            );
            r.register(
                "waypoint_mirror_requests",
                "Mirrored request copies, by result (sent, failed, or why skipped)",
                registered.mirrors,
            );
            r.register(
                "waypoint_downstream_errors",
                "Downstream HTTP connections the HTTP stack ended on a protocol error before a \
                 request reached the phases (malformed head, head too large, HTTP/2 protocol \
                 error), by reason",
                registered.downstream_errors,
            );
        });
        (metrics, http)
    }

    pub fn jwt_rejected(&self, reason: &str) {
        self.jwt_rejected
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn retried(&self, reason: &str) {
        self.retries
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn downstream_error(&self, reason: &'static str) {
        self.downstream_errors
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .inc();
    }

    /// How many downstream connections ended on `reason` (tests read the counter back).
    #[cfg(test)]
    pub fn downstream_errors(&self, reason: &str) -> u64 {
        self.downstream_errors
            .get_or_create(&ReasonLabels {
                reason: reason.to_string(),
            })
            .get()
    }

    pub fn mirrored(&self, result: &str) {
        self.mirrors
            .get_or_create(&ResultLabels {
                result: result.to_string(),
            })
            .inc();
    }

    pub fn jwks_fetched(&self, uri: &str, result: &str) {
        self.jwks_fetches
            .get_or_create(&JwksFetchLabels {
                uri: uri.to_string(),
                result: result.to_string(),
            })
            .inc();
    }

    pub fn record(
        &self,
        l: &HttpLabels,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        self.requests.get_or_create(l).inc();
        self.duration.get_or_create(l).observe(duration_ms);
        self.request_bytes
            .get_or_create(l)
            .observe(request_bytes as f64);
        self.response_bytes
            .get_or_create(l)
            .observe(response_bytes as f64);
    }
}

/// What labels are made of: the owned form of [`mesh_telemetry::LabelInputs`] (it outlives
/// the request handler, until the response body ends).
#[derive(Clone, Debug, Default)]
pub struct LabelInputs {
    /// Pods and Services shared with the model (a request copies none).
    pub src_pod: Option<Arc<Pod>>,
    pub src_identity: Option<Identity>,
    pub dst_pod: Option<Arc<Pod>>,
    pub dst_identity: Option<Identity>,
    pub service: Option<Arc<Service>>,
    /// `http` or `grpc`.
    pub protocol: &'static str,
    /// Whether the upstream hop is mTLS (HBONE).
    pub mtls: bool,
}

impl LabelInputs {
    /// The request's labels: Istio's standard set ([`mesh_telemetry::LabelInputs`], the
    /// builder the node agent uses too) with `reporter="waypoint"`, plus the response.
    pub fn build(&self, code: u16, flag: Option<ResponseFlag>, grpc: Option<&str>) -> HttpLabels {
        HttpLabels {
            base: self.shared(flag).build_for(self.protocol),
            response_code: code.to_string(),
            grpc_response_status: grpc.unwrap_or("").to_string(),
        }
    }

    /// Istio's TCP labels, for connections relayed at L4.
    pub fn build_tcp(&self) -> TcpLabels {
        self.shared(None).build()
    }

    fn shared(&self, flag: Option<ResponseFlag>) -> mesh_telemetry::LabelInputs<'_> {
        mesh_telemetry::LabelInputs {
            reporter: REPORTER,
            src_pod: self.src_pod.as_deref(),
            src_identity: self.src_identity.as_ref(),
            dst_pod: self.dst_pod.as_deref(),
            dst_identity: self.dst_identity.as_ref(),
            service: self.service.as_deref(),
            flag,
            mtls: self.mtls,
        }
    }
}

/// Whether the proxy writes access-log lines (`request complete`, and the L4 relay's
/// `connection complete`): resolved from the Telemetries once per model
/// ([`Model::waypoint_access_log`]), read with one atomic load per request. Refusal lines are
/// not subject to it.
#[derive(Debug)]
pub struct AccessLogSwitch {
    on: AtomicBool,
    /// What decided, for `/config_dump`.
    decision: ArcSwap<AccessLogDecision>,
}

impl Default for AccessLogSwitch {
    fn default() -> Self {
        AccessLogSwitch {
            on: AtomicBool::new(false),
            decision: ArcSwap::from_pointee(AccessLogDecision::default()),
        }
    }
}

impl AccessLogSwitch {
    /// Resolves the decision of Gateway `gateway` in `model` (call once per model, before
    /// it is installed); logs when it changes.
    pub fn update(&self, model: &Model, gateway: &NamespacedName) {
        let next = model.waypoint_access_log(gateway);
        if *self.decision.load_full() != next {
            tracing::info!(
                enabled = next.enabled,
                telemetry = %next.telemetry.as_ref().map_or("-".to_string(), ToString::to_string),
                "access log {}",
                if next.enabled { "on" } else { "off" }
            );
        }
        self.on.store(next.enabled, Ordering::Relaxed);
        self.decision.store(Arc::new(next));
    }

    pub fn enabled(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    pub fn decision(&self) -> Arc<AccessLogDecision> {
        self.decision.load_full()
    }
}

/// One access-log line per request (target `access`), written only when `enabled`.
#[derive(Debug)]
pub struct AccessLog {
    /// The [`AccessLogSwitch`] when the request arrived.
    pub enabled: bool,
    pub started: Instant,
    pub src: SocketAddr,
    pub src_identity: Option<Identity>,
    pub protocol: &'static str,
    pub method: String,
    pub authority: String,
    pub path: String,
    pub request_id: String,
    /// `ns/name` of the Service (or `-`).
    pub service: Option<String>,
    /// Upstream attempts made (retries + 1; 0 when nothing was sent).
    pub attempts: u32,
    /// `ns/name/rule` of the HTTPRoute or VirtualService rule taken (rule index when it has no name).
    pub route: Option<String>,
    /// `ns/name:port` of the backend Service used (differs from `service` when routed).
    pub backend: Option<String>,
    /// The endpoint the request went to.
    pub upstream: Option<SocketAddr>,
    pub reason: Option<String>,
}

impl AccessLog {
    pub fn emit(&self, code: u16, flag: Option<ResponseFlag>, req_bytes: u64, rsp_bytes: u64) {
        if !self.enabled {
            return;
        }
        let src_id = self.src_identity.as_ref().map(Identity::to_string);
        let upstream = self.upstream.map(|u| u.to_string());
        tracing::info!(
            target: "access",
            src_addr = %self.src,
            src_identity = src_id.as_deref().unwrap_or("-"),
            protocol = self.protocol,
            method = %self.method,
            authority = %self.authority,
            path = %self.path,
            request_id = %self.request_id,
            service = self.service.as_deref().unwrap_or("-"),
            route = self.route.as_deref().unwrap_or("-"),
            backend = self.backend.as_deref().unwrap_or("-"),
            attempts = self.attempts,
            upstream = upstream.as_deref().unwrap_or("-"),
            code,
            flags = flag.map_or("-", ResponseFlag::as_str),
            reason = self.reason.as_deref().unwrap_or("-"),
            bytes_recv = req_bytes,
            bytes_sent = rsp_bytes,
            duration_ms = self.started.elapsed().as_millis() as u64,
            "request complete"
        );
    }
}

#[cfg(test)]
mod access_log_tests {
    use std::sync::atomic::AtomicUsize;

    use mesh_model::k8s::load_docs;
    use tracing::span::{Attributes, Id, Record};
    use tracing::{Event, Metadata};

    use super::*;

    /// Counts events of target `access`.
    #[derive(Default, Clone)]
    struct Count(Arc<AtomicUsize>);

    impl tracing::Subscriber for Count {
        fn enabled(&self, _: &Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, _: &Attributes<'_>) -> Id {
            Id::from_u64(1)
        }
        fn record(&self, _: &Id, _: &Record<'_>) {}
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, e: &Event<'_>) {
            if e.metadata().target() == "access" {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    fn model(docs: &str) -> Model {
        load_docs(&[("m.yaml".to_string(), docs.to_string())]).expect("model")
    }

    fn line(enabled: bool) -> AccessLog {
        AccessLog {
            enabled,
            started: Instant::now(),
            src: SocketAddr::from(([10, 0, 0, 1], 40000)),
            src_identity: None,
            protocol: "HTTP/1.1",
            method: "GET".to_string(),
            authority: "web".to_string(),
            path: "/".to_string(),
            request_id: "r".to_string(),
            service: None,
            attempts: 1,
            route: None,
            backend: None,
            upstream: None,
            reason: None,
        }
    }

    #[test]
    fn the_switch_follows_each_model_and_gates_the_line() {
        let gw = NamespacedName::new("shop", "waypoint");
        let switch = AccessLogSwitch::default();
        assert!(!switch.enabled());
        let on = "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n\
                  metadata: {name: logs, namespace: shop}\n\
                  spec: {accessLogging: [{providers: [{name: envoy}]}]}\n";
        switch.update(&model(on), &gw);
        assert!(switch.enabled());
        assert_eq!(
            switch.decision().telemetry,
            Some(NamespacedName::new("shop", "logs"))
        );
        // Another waypoint's namespace: not this one's.
        switch.update(&model(on), &NamespacedName::new("other", "waypoint"));
        assert!(!switch.enabled());
        switch.update(&model(""), &gw);
        assert!(!switch.enabled());
        assert_eq!(*switch.decision(), AccessLogDecision::default());

        let count = Count::default();
        tracing::subscriber::with_default(count.clone(), || {
            line(false).emit(200, None, 1, 2);
            assert_eq!(count.0.load(Ordering::SeqCst), 0);
            line(true).emit(200, None, 1, 2);
            assert_eq!(count.0.load(Ordering::SeqCst), 1);
        });
    }
}
