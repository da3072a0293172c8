//! Istio's HTTP metrics (`reporter="waypoint"`) and the per-request access log.
//!
//! - `istio_requests_total`, `istio_request_duration_milliseconds` (histogram, Istio's
//!   buckets), `istio_request_bytes`, `istio_response_bytes` (histograms) with the standard
//!   labels plus `response_code` and `grpc_response_status` (each label set's series
//!   resolved once and cached by what selects it: a request builds no label strings);
//! - `waypoint_outlier_ejections_total{cluster}`: DestinationRule outlier-detection
//!   ejections (cluster = Envoy's `outbound|<port>|<subset>|<host>`);
//! - one `access` log line per request, only when the Telemetry API turns it on for this
//!   waypoint ([`AccessLogSwitch`]; off by default, as for Istio's Envoy-based proxies).
//!
//! Registered in the same registry as the shared `mesh_telemetry` families (TCP metrics for
//! L4-relayed ports, refusals, config reloads, process), so one scrape returns everything.

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasher, Hash, Hasher};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
    /// The request families' series by what picks them, so that a request builds and hashes
    /// no label strings ([`HttpMetrics::record`]).
    series: Arc<Mutex<SeriesCache>>,
}

/// Most label sets a waypoint keeps resolved; past it the cache starts over (the families
/// keep every series regardless: this only bounds the shortcut).
const MAX_CACHED_SERIES: usize = 4096;

/// The series of the four request families for one label set.
struct HttpSeries {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// One cached label set: what a request's labels are built from, kept as given (the model's
/// Pods and Services by pointer: the entry holds them, so no address is reused while it is
/// cached, and a changed pod is a new `Arc`, so a new entry), and the response.
struct SeriesEntry {
    inputs: LabelInputs,
    code: u16,
    flag: Option<ResponseFlag>,
    grpc: Option<String>,
    series: HttpSeries,
}

#[derive(Default)]
struct SeriesCache {
    /// Keyed by [`SeriesCache::hash`]; a list per hash, as different inputs may collide.
    entries: HashMap<u64, Vec<SeriesEntry>>,
    len: usize,
    hasher: RandomState,
}

/// What selects a request's series: its label inputs and its response.
#[derive(Clone, Copy)]
struct SeriesKey<'a> {
    inputs: &'a LabelInputs,
    code: u16,
    flag: Option<ResponseFlag>,
    grpc: Option<&'a str>,
}

impl SeriesCache {
    fn hash(&self, k: SeriesKey<'_>) -> u64 {
        let l = k.inputs;
        let mut h = self.hasher.build_hasher();
        l.src_pod.as_ref().map(Arc::as_ptr).hash(&mut h);
        l.src_identity.hash(&mut h);
        l.dst_pod.as_ref().map(Arc::as_ptr).hash(&mut h);
        l.dst_identity.hash(&mut h);
        l.service.as_ref().map(Arc::as_ptr).hash(&mut h);
        (l.protocol, l.mtls, k.code, k.flag, k.grpc).hash(&mut h);
        h.finish()
    }

    fn find(&self, hash: u64, k: SeriesKey<'_>) -> Option<&HttpSeries> {
        self.entries
            .get(&hash)?
            .iter()
            .find(|e| e.matches(k))
            .map(|e| &e.series)
    }

    fn insert(&mut self, hash: u64, k: SeriesKey<'_>, series: HttpSeries) -> &HttpSeries {
        if self.len >= MAX_CACHED_SERIES {
            self.entries.clear();
            self.len = 0;
        }
        self.len += 1;
        let list = self.entries.entry(hash).or_default();
        list.push(SeriesEntry {
            inputs: k.inputs.clone(),
            code: k.code,
            flag: k.flag,
            grpc: k.grpc.map(str::to_string),
            series,
        });
        &list[list.len() - 1].series
    }
}

impl SeriesEntry {
    fn matches(&self, k: SeriesKey<'_>) -> bool {
        fn same<T>(a: &Option<Arc<T>>, b: &Option<Arc<T>>) -> bool {
            match (a, b) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
        }
        let (a, b) = (&self.inputs, k.inputs);
        self.code == k.code
            && self.flag == k.flag
            && self.grpc.as_deref() == k.grpc
            && a.protocol == b.protocol
            && a.mtls == b.mtls
            && same(&a.src_pod, &b.src_pod)
            && same(&a.dst_pod, &b.dst_pod)
            && same(&a.service, &b.service)
            && a.src_identity == b.src_identity
            && a.dst_identity == b.dst_identity
    }
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
            series: Arc::default(),
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

    /// Counts a request whose labels are built from `inputs` and its response (`code`,
    /// `flag`, `grpc` status). The label set is built once per distinct set of inputs
    /// (a cache keyed by the model's shared Pods and Services, the identities and the
    /// response) rather than 25 strings and four family lookups per request.
    #[allow(clippy::too_many_arguments)]
    pub fn record(
        &self,
        inputs: &LabelInputs,
        code: u16,
        flag: Option<ResponseFlag>,
        grpc: Option<&str>,
        duration_ms: f64,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let key = SeriesKey {
            inputs,
            code,
            flag,
            grpc,
        };
        let mut cache = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let hash = cache.hash(key);
        let series = match cache.find(hash, key) {
            Some(series) => series,
            None => {
                let labels = inputs.build(code, flag, grpc);
                let series = HttpSeries {
                    requests: self.requests.get_or_create(&labels).clone(),
                    duration: self.duration.get_or_create(&labels).clone(),
                    request_bytes: self.request_bytes.get_or_create(&labels).clone(),
                    response_bytes: self.response_bytes.get_or_create(&labels).clone(),
                };
                cache.insert(hash, key, series)
            }
        };
        series.requests.inc();
        series.duration.observe(duration_ms);
        series.request_bytes.observe(request_bytes as f64);
        series.response_bytes.observe(response_bytes as f64);
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
mod series_tests {
    use mesh_model::k8s::load_docs;

    use super::*;

    const PODS: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: app, labels: {app: client}}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: app, labels: {app: web, version: v1}}
status: {podIP: 10.0.0.2}
"#;

    /// The value of the `istio_requests_total` line whose labels contain all of `want`.
    fn count(metrics: &Metrics, want: &[&str]) -> u64 {
        let text = metrics.encode_text();
        text.lines()
            .filter(|l| l.starts_with("istio_requests_total{"))
            .filter(|l| want.iter().all(|w| l.contains(w)))
            .map(|l| {
                l.rsplit(' ')
                    .next()
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    #[test]
    fn cached_series_count_as_their_labels_say_and_a_changed_pod_reads_its_new_labels() {
        let (metrics, http) = HttpMetrics::new();
        let m = load_docs(&[("m.yaml".to_string(), PODS.to_string())]).expect("model");
        let pod = |name: &str| m.pod_shared("app", name).cloned();
        let inputs = LabelInputs {
            src_pod: pod("client"),
            dst_pod: pod("web-1"),
            protocol: "http",
            mtls: true,
            ..LabelInputs::default()
        };
        for _ in 0..3 {
            http.record(&inputs, 200, None, None, 1.0, 10, 20);
        }
        http.record(
            &inputs,
            503,
            Some(ResponseFlag::UpstreamReset),
            None,
            1.0,
            0,
            0,
        );
        // An equal label set from other inputs (a copy of the pod): the same series.
        let copy = LabelInputs {
            dst_pod: inputs.dst_pod.as_deref().cloned().map(Arc::new),
            ..inputs.clone()
        };
        http.record(&copy, 200, None, None, 1.0, 10, 20);
        let v1 = ["destination_version=\"v1\"", "response_code=\"200\""];
        assert_eq!(count(&metrics, &v1), 4);
        assert_eq!(
            count(
                &metrics,
                &["response_code=\"503\"", "response_flags=\"UC\""]
            ),
            1
        );
        // The pod's labels change in a new model: a new Arc, so its new labels are read.
        let changed = PODS.replace("version: v1", "version: v2");
        let m2 = load_docs(&[("m.yaml".to_string(), changed)]).expect("model");
        let moved = LabelInputs {
            dst_pod: m2.pod_shared("app", "web-1").cloned(),
            ..inputs.clone()
        };
        http.record(&moved, 200, None, None, 1.0, 10, 20);
        assert_eq!(count(&metrics, &["destination_version=\"v2\""]), 1);
        assert_eq!(count(&metrics, &v1), 4);
        // Past the bound the cache starts over; counting goes on in the same series.
        for code in 0..(MAX_CACHED_SERIES as u16 + 10) {
            http.record(&inputs, 1000 + code, None, None, 1.0, 0, 0);
        }
        assert!(http.series.lock().expect("cache").len <= MAX_CACHED_SERIES);
        http.record(&inputs, 200, None, None, 1.0, 10, 20);
        assert_eq!(count(&metrics, &v1), 5);
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
