//! Prometheus metrics with Istio's names and labels, plus process metrics.
//!
//! Exposed (OpenMetrics text; serve with [`CONTENT_TYPE`]):
//! - `istio_tcp_connections_opened_total`, `istio_tcp_connections_closed_total`,
//!   `istio_tcp_sent_bytes_total`, `istio_tcp_received_bytes_total` with [`TcpLabels`];
//! - `mesh_connections_refused_total{reporter,reason}`, `mesh_config_rejections_total{source}`,
//!   `mesh_config_reloads_total`, `mesh_policies_failed_closed{kind,namespace,name}` (1 for
//!   each refused policy enforced fail closed);
//! - `mesh_dns_requests_total{result}` (the node agent's DNS proxy);
//! - `process_*` read from `/proc/self` at scrape time.
//!
//! [`ResponseFlag`] names why a connection or request was refused, in both binaries;
//! [`LabelInputs`] builds every Istio label set from the model's pods, Services and
//! identities (the agent's TCP labels and the base of the waypoint's request labels).
//!
//! [`Metrics::snapshot`] reads them all back, typed, for the node dashboard.
//!
//! prometheus-client appends `_total` to counter names itself, so counters are registered
//! without it.
#![forbid(unsafe_code)]

use std::collections::HashSet;
use std::fmt;
use std::sync::{Arc, Mutex};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::registry::Registry;

mod flags;
pub mod labels;
pub use flags::ResponseFlag;
pub use labels::LabelInputs;

/// The `Content-Type` for [`Metrics::encode`]'s output (OpenMetrics 1.0, ends in `# EOF`).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// The `Content-Type` for [`Metrics::encode_text`]'s output (Prometheus text format 0.0.4),
/// for scrapers that do not ask for OpenMetrics (`Accept` without `openmetrics`).
pub const TEXT_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The value Istio uses for a label it cannot fill.
pub const UNKNOWN: &str = "unknown";

/// Istio's standard TCP metric labels, built by [`LabelInputs`]. Fill what is not known
/// with [`UNKNOWN`] (`TcpLabels::default()` starts with every label unknown).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: String,
    pub source_workload: String,
    pub source_workload_namespace: String,
    pub source_principal: String,
    pub source_app: String,
    pub source_version: String,
    pub source_canonical_service: String,
    pub source_canonical_revision: String,
    pub source_cluster: String,
    pub destination_workload: String,
    pub destination_workload_namespace: String,
    pub destination_principal: String,
    pub destination_app: String,
    pub destination_version: String,
    pub destination_service: String,
    pub destination_service_name: String,
    pub destination_service_namespace: String,
    pub destination_canonical_service: String,
    pub destination_canonical_revision: String,
    pub destination_cluster: String,
    pub request_protocol: String,
    pub response_flags: String,
    pub connection_security_policy: String,
}

impl Default for TcpLabels {
    fn default() -> Self {
        let u = || UNKNOWN.to_string();
        TcpLabels {
            reporter: u(),
            source_workload: u(),
            source_workload_namespace: u(),
            source_principal: u(),
            source_app: u(),
            source_version: u(),
            source_canonical_service: u(),
            source_canonical_revision: u(),
            source_cluster: u(),
            destination_workload: u(),
            destination_workload_namespace: u(),
            destination_principal: u(),
            destination_app: u(),
            destination_version: u(),
            destination_service: u(),
            destination_service_name: u(),
            destination_service_namespace: u(),
            destination_canonical_service: u(),
            destination_canonical_revision: u(),
            destination_cluster: u(),
            request_protocol: u(),
            response_flags: u(),
            connection_security_policy: u(),
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    reporter: String,
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DnsLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PolicyLabels {
    kind: String,
    namespace: String,
    name: String,
}

/// All metrics of one process. Shared as `Arc<Metrics>`.
pub struct Metrics {
    registry: Registry,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    config_rejections: Family<SourceLabels, Counter>,
    config_reloads: Counter,
    failed_closed: Family<PolicyLabels, Gauge>,
    dns_requests: Family<DnsLabels, Counter>,
    /// One shared copy of every TCP label set seen (see [`Metrics::intern`]).
    interned: Mutex<HashSet<Arc<TcpLabels>>>,
}

/// Byte counters of one live connection, resolved once so that each chunk is one atomic
/// add rather than a hash of 23 labels.
#[derive(Clone, Debug)]
pub struct TcpCounters {
    sent: Counter,
    received: Counter,
}

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        Self::new_with(|_| {})
    }

    /// Like [`Metrics::new`], letting the caller register more metrics (e.g. the waypoint's
    /// HTTP metrics) in the same registry so one scrape returns everything.
    pub fn new_with(register: impl FnOnce(&mut Registry)) -> Arc<Metrics> {
        let mut registry = Registry::default();
        let tcp_opened = Family::default();
        let tcp_closed = Family::default();
        let tcp_sent = Family::default();
        let tcp_received = Family::default();
        let refused = Family::default();
        let config_rejections = Family::default();
        let config_reloads = Counter::default();
        let failed_closed = Family::default();
        let dns_requests = Family::default();
        registry.register(
            "istio_tcp_connections_opened",
            "The total number of TCP connections opened",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "The total number of TCP connections closed",
            tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "The size of total bytes sent during response in case of a TCP connection",
            tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "The size of total bytes received during request in case of a TCP connection",
            tcp_received.clone(),
        );
        registry.register(
            "mesh_connections_refused",
            "Connections refused, by reporter and reason",
            refused.clone(),
        );
        registry.register(
            "mesh_config_rejections",
            "Configurations rejected as invalid, by source",
            config_rejections.clone(),
        );
        registry.register(
            "mesh_config_reloads",
            "Configurations loaded successfully",
            config_reloads.clone(),
        );
        registry.register(
            "mesh_policies_failed_closed",
            "Refused policies enforced fail closed (deny all, or reject their tokens), by kind, namespace and name",
            failed_closed.clone(),
        );
        registry.register(
            "mesh_dns_requests",
            "DNS queries of enrolled pods, by result (answered, nodata, forwarded, upstream_failed, refused, malformed, overloaded)",
            dns_requests.clone(),
        );
        registry.register_collector(Box::new(ProcessCollector));
        register(&mut registry);
        Arc::new(Metrics {
            registry,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            refused,
            config_rejections,
            config_reloads,
            failed_closed,
            dns_requests,
            interned: Mutex::default(),
        })
    }

    /// The shared copy of `labels`: a live connection holds this one pointer rather than its
    /// own 23 strings (about 1 KiB) until it closes. Label sets name workloads, never
    /// addresses or ports, so there are as many as the metric families already keep (they
    /// too keep every set they have seen), and this one copy of each is never dropped.
    pub fn intern(&self, labels: TcpLabels) -> Arc<TcpLabels> {
        let mut set = self.interned.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = set.get(&labels) {
            return shared.clone();
        }
        let shared = Arc::new(labels);
        set.insert(shared.clone());
        shared
    }

    pub fn tcp_opened(&self, l: &TcpLabels) {
        self.tcp_opened.get_or_create(l).inc();
    }

    pub fn tcp_closed(&self, l: &TcpLabels) {
        self.tcp_closed.get_or_create(l).inc();
    }

    pub fn tcp_sent(&self, l: &TcpLabels, n: u64) {
        self.tcp_sent.get_or_create(l).inc_by(n);
    }

    pub fn tcp_received(&self, l: &TcpLabels, n: u64) {
        self.tcp_received.get_or_create(l).inc_by(n);
    }

    /// Handles on this label set's byte counters for a live connection.
    pub fn tcp_counters(&self, l: &TcpLabels) -> TcpCounters {
        TcpCounters {
            sent: self.tcp_sent.get_or_create(l).clone(),
            received: self.tcp_received.get_or_create(l).clone(),
        }
    }

    /// `mesh_connections_refused_total{reporter,reason}`.
    pub fn refused(&self, reporter: &str, reason: &str) {
        self.refused
            .get_or_create(&RefusedLabels {
                reporter: reporter.to_string(),
                reason: reason.to_string(),
            })
            .inc();
    }

    /// `mesh_dns_requests_total{result}` (the agent's DNS proxy).
    pub fn dns_request(&self, result: &'static str) {
        self.dns_requests.get_or_create(&DnsLabels { result }).inc();
    }

    /// `mesh_config_rejections_total{source}`.
    pub fn config_rejected(&self, source: &str) {
        self.config_rejections
            .get_or_create(&SourceLabels {
                source: source.to_string(),
            })
            .inc();
    }

    /// `mesh_config_reloads_total`.
    pub fn config_loaded(&self) {
        self.config_reloads.inc();
    }

    /// `mesh_policies_failed_closed{kind,namespace,name}`: exactly the `(kind, namespace,
    /// name)` of `policies` read 1 (the previous set is replaced).
    pub fn set_failed_closed<'a>(
        &self,
        policies: impl IntoIterator<Item = (&'a str, &'a str, &'a str)>,
    ) {
        self.failed_closed.clear();
        for (kind, namespace, name) in policies {
            self.failed_closed
                .get_or_create(&PolicyLabels {
                    kind: kind.to_string(),
                    namespace: namespace.to_string(),
                    name: name.to_string(),
                })
                .set(1);
        }
    }

    /// The whole registry in OpenMetrics text format, ending in `# EOF`.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(4096);
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            // Only a failing `fmt::Write` can end here, and String never fails; keep what
            // was written rather than serving nothing.
            tracing::error!(error = %e, "encode metrics");
        }
        out
    }

    /// The same metrics in the classic Prometheus text format (what `promtool check
    /// metrics` validates). OpenMetrics names a counter family without `_total` in its
    /// `# HELP`/`# TYPE` lines; the classic format names the series itself.
    pub fn encode_text(&self) -> String {
        openmetrics_to_text(&self.encode())
    }
}

/// Classic text from prometheus-client's OpenMetrics output: counter metadata renamed to the
/// `_total` series, `unknown` → `untyped`, no `# UNIT`, no `# EOF`. Samples are identical in
/// both formats (we emit no exemplars or `_created` series).
fn openmetrics_to_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len() + 16 * counters.len());
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|p| Some((p, line.strip_prefix(p)?.split_once(' ')?)));
        match meta {
            Some((prefix, (name, rest))) if counters.contains(name) => {
                out.push_str(prefix);
                out.push_str(name);
                out.push_str("_total ");
                out.push_str(rest);
            }
            Some(("# TYPE ", (name, "unknown"))) => {
                out.push_str("# TYPE ");
                out.push_str(name);
                out.push_str(" untyped");
            }
            _ => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

// === snapshot ===

/// Every counter of the registry at one moment, typed, for views that summarise them (the
/// node dashboard) without keeping counters of their own.
///
/// prometheus-client has no public way to iterate a [`Family`], so a snapshot is read back
/// from the registry's own exposition ([`Metrics::encode`]): the same numbers a scrape sees,
/// at the cost of one scrape, and nothing on the connection path.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// One entry per TCP label set, with its four counters (absent ones read 0).
    pub tcp: Vec<TcpSample>,
    /// `mesh_connections_refused_total`, by (reporter, reason).
    pub refused: Vec<RefusedSample>,
    /// `mesh_config_rejections_total`, by source.
    pub config_rejections: Vec<(String, u64)>,
    /// `mesh_config_reloads_total`.
    pub config_reloads: u64,
    /// `mesh_policies_failed_closed`: how many refused policies are enforced fail closed.
    pub failed_closed: u64,
    pub process: ProcessSample,
}

/// The TCP counters of one label set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TcpSample {
    pub labels: TcpLabels,
    pub opened: u64,
    pub closed: u64,
    /// Bytes sent to the client (`istio_tcp_sent_bytes_total`).
    pub sent_bytes: u64,
    /// Bytes received from the client (`istio_tcp_received_bytes_total`).
    pub received_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RefusedSample {
    pub reporter: String,
    pub reason: String,
    pub count: u64,
}

/// The `process_*` metrics; `None` when `/proc` could not tell.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessSample {
    pub rss_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub threads: Option<u64>,
    /// Seconds since the epoch.
    pub start_time_seconds: Option<f64>,
}

impl Metrics {
    /// The registry's counters now (one encode of the registry; see [`Snapshot`]).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot::parse(&self.encode())
    }
}

impl Snapshot {
    /// Reads the metrics this module registers out of exposition text (OpenMetrics or classic);
    /// other metrics and lines that do not parse are skipped.
    pub fn parse(text: &str) -> Snapshot {
        let mut snap = Snapshot::default();
        let mut tcp: Vec<TcpSample> = Vec::new();
        let mut tcp_index: std::collections::HashMap<TcpLabels, usize> =
            std::collections::HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') {
                continue;
            }
            let Some((name, labels, value)) = parse_sample(line) else {
                continue;
            };
            let count = || counter_value(value);
            match name {
                "istio_tcp_connections_opened_total"
                | "istio_tcp_connections_closed_total"
                | "istio_tcp_sent_bytes_total"
                | "istio_tcp_received_bytes_total" => {
                    let mut l = TcpLabels::default();
                    for (k, v) in labels {
                        l.set(&k, v);
                    }
                    let i = *tcp_index.entry(l.clone()).or_insert_with(|| {
                        tcp.push(TcpSample {
                            labels: l,
                            ..TcpSample::default()
                        });
                        tcp.len() - 1
                    });
                    let Some(s) = tcp.get_mut(i) else { continue };
                    let n = count();
                    match name {
                        "istio_tcp_connections_opened_total" => s.opened = n,
                        "istio_tcp_connections_closed_total" => s.closed = n,
                        "istio_tcp_sent_bytes_total" => s.sent_bytes = n,
                        _ => s.received_bytes = n,
                    }
                }
                "mesh_connections_refused_total" => {
                    let get = |k: &str| {
                        labels
                            .iter()
                            .find(|(key, _)| key == k)
                            .map(|(_, v)| v.clone())
                            .unwrap_or_else(|| UNKNOWN.to_string())
                    };
                    snap.refused.push(RefusedSample {
                        reporter: get("reporter"),
                        reason: get("reason"),
                        count: count(),
                    });
                }
                "mesh_config_rejections_total" => {
                    let source = labels
                        .into_iter()
                        .find(|(k, _)| k == "source")
                        .map(|(_, v)| v)
                        .unwrap_or_else(|| UNKNOWN.to_string());
                    snap.config_rejections.push((source, count()));
                }
                "mesh_config_reloads_total" => snap.config_reloads = count(),
                "mesh_policies_failed_closed" => snap.failed_closed += count(),
                "process_resident_memory_bytes" => snap.process.rss_bytes = Some(count()),
                "process_cpu_seconds_total" => snap.process.cpu_seconds = Some(value),
                "process_open_fds" => snap.process.open_fds = Some(count()),
                "process_max_fds" => snap.process.max_fds = Some(count()),
                "process_threads" => snap.process.threads = Some(count()),
                "process_start_time_seconds" => snap.process.start_time_seconds = Some(value),
                _ => {}
            }
        }
        snap.tcp = tcp;
        snap
    }
}

/// Label names and unescaped values, in exposition order.
type LabelPairs = Vec<(String, String)>;

/// A counter or gauge read back as a whole number (negative or NaN → 0).
fn counter_value(v: f64) -> u64 {
    if v.is_finite() && v > 0.0 {
        // Saturates at u64::MAX; counters here are whole numbers.
        v as u64
    } else {
        0
    }
}

/// `name{k="v",...} value [timestamp]` → (name, labels, value). Label values are unescaped
/// (`\\`, `\"`, `\n`).
fn parse_sample(line: &str) -> Option<(&str, LabelPairs, f64)> {
    let end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..end];
    let mut rest = &line[end..];
    let mut labels = Vec::new();
    if let Some(mut s) = rest.strip_prefix('{') {
        loop {
            s = s.trim_start_matches([' ', ',']);
            if let Some(after) = s.strip_prefix('}') {
                rest = after;
                break;
            }
            let (key, after) = s.split_once('=')?;
            let after = after.strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = after.char_indices();
            let close = loop {
                let (i, c) = chars.next()?;
                match c {
                    '"' => break i,
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    c => value.push(c),
                }
            };
            labels.push((key.trim().to_string(), value));
            s = after.get(close + 1..)?;
        }
    }
    let value = match rest.split_whitespace().next()? {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

// === impl TcpLabels ===

impl TcpLabels {
    /// Sets the label named `key`; unknown names are ignored (returns false).
    pub fn set(&mut self, key: &str, value: String) -> bool {
        let field = match key {
            "reporter" => &mut self.reporter,
            "source_workload" => &mut self.source_workload,
            "source_workload_namespace" => &mut self.source_workload_namespace,
            "source_principal" => &mut self.source_principal,
            "source_app" => &mut self.source_app,
            "source_version" => &mut self.source_version,
            "source_canonical_service" => &mut self.source_canonical_service,
            "source_canonical_revision" => &mut self.source_canonical_revision,
            "source_cluster" => &mut self.source_cluster,
            "destination_workload" => &mut self.destination_workload,
            "destination_workload_namespace" => &mut self.destination_workload_namespace,
            "destination_principal" => &mut self.destination_principal,
            "destination_app" => &mut self.destination_app,
            "destination_version" => &mut self.destination_version,
            "destination_service" => &mut self.destination_service,
            "destination_service_name" => &mut self.destination_service_name,
            "destination_service_namespace" => &mut self.destination_service_namespace,
            "destination_canonical_service" => &mut self.destination_canonical_service,
            "destination_canonical_revision" => &mut self.destination_canonical_revision,
            "destination_cluster" => &mut self.destination_cluster,
            "request_protocol" => &mut self.request_protocol,
            "response_flags" => &mut self.response_flags,
            "connection_security_policy" => &mut self.connection_security_policy,
            _ => return false,
        };
        *field = value;
        true
    }
}

// === impl TcpCounters ===

impl TcpCounters {
    pub fn sent(&self, n: u64) {
        self.sent.inc_by(n);
    }

    pub fn received(&self, n: u64) {
        self.received.inc_by(n);
    }
}

// === process metrics ===

/// Linux reports `/proc/<pid>/stat` times in USER_HZ, which the kernel ABI fixes at 100 on
/// every architecture we build for (it is not the configurable kernel HZ).
const USER_HZ: f64 = 100.0;

/// Reads `/proc/self` on every scrape; a value that cannot be read is left out rather than
/// failing the scrape.
#[derive(Debug)]
struct ProcessCollector;

impl Collector for ProcessCollector {
    fn encode(&self, mut enc: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let p = ProcessStats::read();
        let boot = read_proc("/proc/stat").and_then(|s| parse_boot_time(&s));
        gauge(
            &mut enc,
            "process_resident_memory_bytes",
            "Resident memory size in bytes.",
            p.rss_bytes,
        )?;
        gauge(
            &mut enc,
            "process_virtual_memory_bytes",
            "Virtual memory size in bytes.",
            p.vm_bytes,
        )?;
        if let Some(ticks) = p.cpu_ticks {
            let c = ConstCounter::new(ticks as f64 / USER_HZ);
            let m = enc.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                c.metric_type(),
            )?;
            c.encode(m)?;
        }
        gauge(
            &mut enc,
            "process_open_fds",
            "Number of open file descriptors.",
            open_fds(),
        )?;
        gauge(
            &mut enc,
            "process_max_fds",
            "Maximum number of open file descriptors.",
            read_proc("/proc/self/limits").and_then(|s| parse_max_fds(&s)),
        )?;
        if let (Some(boot), Some(start)) = (boot, p.start_ticks) {
            let g = ConstGauge::new(boot as f64 + start as f64 / USER_HZ);
            let m = enc.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                None,
                g.metric_type(),
            )?;
            g.encode(m)?;
        }
        gauge(
            &mut enc,
            "process_threads",
            "Number of OS threads in the process.",
            p.threads,
        )?;
        Ok(())
    }
}

fn gauge(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    value: Option<u64>,
) -> Result<(), fmt::Error> {
    let Some(v) = value else {
        return Ok(());
    };
    // Gauges are signed in prometheus-client; no process value comes near i64::MAX.
    let g = ConstGauge::new(i64::try_from(v).unwrap_or(i64::MAX));
    let m = enc.encode_descriptor(name, help, None, g.metric_type())?;
    g.encode(m)
}

fn read_proc(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn open_fds() -> Option<u64> {
    let n = std::fs::read_dir("/proc/self/fd").ok()?.count();
    u64::try_from(n).ok()
}

/// What `/proc/self/status` and `/proc/self/stat` tell.
#[derive(Debug, Default, PartialEq, Eq)]
struct ProcessStats {
    rss_bytes: Option<u64>,
    vm_bytes: Option<u64>,
    threads: Option<u64>,
    /// utime + stime, in USER_HZ ticks.
    cpu_ticks: Option<u64>,
    /// Start time after boot, in USER_HZ ticks.
    start_ticks: Option<u64>,
}

impl ProcessStats {
    fn read() -> Self {
        let mut p = read_proc("/proc/self/status")
            .map(|s| parse_status(&s))
            .unwrap_or_default();
        if let Some((cpu, start)) = read_proc("/proc/self/stat").and_then(|s| parse_stat(&s)) {
            p.cpu_ticks = Some(cpu);
            p.start_ticks = Some(start);
        }
        p
    }
}

/// `VmRSS:`, `VmSize:` (kB) and `Threads:` from `/proc/<pid>/status`.
fn parse_status(s: &str) -> ProcessStats {
    let mut p = ProcessStats::default();
    for line in s.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let number = value
            .split_whitespace()
            .next()
            .and_then(|v| v.parse::<u64>().ok());
        match key {
            "VmRSS" => p.rss_bytes = number.map(|kb| kb.saturating_mul(1024)),
            "VmSize" => p.vm_bytes = number.map(|kb| kb.saturating_mul(1024)),
            "Threads" => p.threads = number,
            _ => {}
        }
    }
    p
}

/// (utime + stime, starttime) from `/proc/<pid>/stat`. The command name (field 2) may hold
/// spaces and parentheses, so fields are counted from its last `)`.
fn parse_stat(s: &str) -> Option<(u64, u64)> {
    let rest = &s[s.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // `rest` starts at field 3 (state); utime is field 14, stime 15, starttime 22.
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((field(14)?.checked_add(field(15)?)?, field(22)?))
}

/// `btime` (boot time, seconds since the epoch) from `/proc/stat`.
fn parse_boot_time(s: &str) -> Option<u64> {
    s.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of `Max open files` from `/proc/<pid>/limits`; `None` when unlimited.
fn parse_max_fds(s: &str) -> Option<u64> {
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> TcpLabels {
        TcpLabels {
            reporter: "destination".into(),
            source_workload: "sleep".into(),
            source_workload_namespace: "default".into(),
            source_principal: "spiffe://cluster.local/ns/default/sa/sleep".into(),
            source_app: "sleep".into(),
            destination_workload: "echo".into(),
            destination_workload_namespace: "default".into(),
            destination_principal: "spiffe://cluster.local/ns/default/sa/echo".into(),
            destination_service: "echo.default.svc.cluster.local".into(),
            request_protocol: "tcp".into(),
            response_flags: "-".into(),
            connection_security_policy: "mutual_tls".into(),
            ..TcpLabels::default()
        }
    }

    /// The label block prometheus-client writes for `labels()`: field order, `unknown`s.
    const LABELS: &str = concat!(
        r#"{reporter="destination",source_workload="sleep",source_workload_namespace="default","#,
        r#"source_principal="spiffe://cluster.local/ns/default/sa/sleep",source_app="sleep","#,
        r#"source_version="unknown",source_canonical_service="unknown","#,
        r#"source_canonical_revision="unknown",source_cluster="unknown","#,
        r#"destination_workload="echo",destination_workload_namespace="default","#,
        r#"destination_principal="spiffe://cluster.local/ns/default/sa/echo","#,
        r#"destination_app="unknown",destination_version="unknown","#,
        r#"destination_service="echo.default.svc.cluster.local","#,
        r#"destination_service_name="unknown",destination_service_namespace="unknown","#,
        r#"destination_canonical_service="unknown",destination_canonical_revision="unknown","#,
        r#"destination_cluster="unknown",request_protocol="tcp",response_flags="-","#,
        r#"connection_security_policy="mutual_tls"}"#,
    );

    fn sample<'a>(text: &'a str, name: &str) -> Option<&'a str> {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
    }

    #[test]
    fn equal_label_sets_share_one_copy() {
        let m = Metrics::new();
        let a = m.intern(labels());
        let b = m.intern(labels());
        assert!(Arc::ptr_eq(&a, &b));
        let other = TcpLabels {
            response_flags: "DENY".into(),
            ..labels()
        };
        assert!(!Arc::ptr_eq(&a, &m.intern(other)));
        assert_eq!(*a, labels());
    }

    #[test]
    fn a_connection_shows_up_under_istio_names_with_all_labels() {
        let m = Metrics::new();
        let l = labels();
        m.tcp_opened(&l);
        m.tcp_sent(&l, 100);
        m.tcp_received(&l, 7);
        let live = m.tcp_counters(&l);
        live.sent(23);
        live.received(3);
        m.tcp_closed(&l);
        let text = m.encode();
        for (name, value) in [
            ("istio_tcp_connections_opened_total", 1),
            ("istio_tcp_connections_closed_total", 1),
            ("istio_tcp_sent_bytes_total", 123),
            ("istio_tcp_received_bytes_total", 10),
        ] {
            let want = format!("{name}{LABELS} {value}");
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in\n{text}"
            );
        }
        assert!(text.contains("# TYPE istio_tcp_sent_bytes counter\n"));
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn refusals_and_config_events_are_counted_by_reason() {
        let m = Metrics::new();
        m.refused("destination", "authz_denied");
        m.refused("destination", "authz_denied");
        m.refused("source", "no_route");
        m.config_rejected("local");
        m.config_loaded();
        m.config_loaded();
        let text = m.encode();
        for want in [
            r#"mesh_connections_refused_total{reporter="destination",reason="authz_denied"} 2"#,
            r#"mesh_connections_refused_total{reporter="source",reason="no_route"} 1"#,
            r#"mesh_config_rejections_total{source="local"} 1"#,
            "mesh_config_reloads_total 2",
        ] {
            assert!(
                text.lines().any(|l| l == want),
                "missing {want:?} in\n{text}"
            );
        }
    }

    #[test]
    fn process_metrics_are_read_at_scrape_time() {
        let text = Metrics::new().encode();
        for name in [
            "process_resident_memory_bytes",
            "process_virtual_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
            "process_max_fds",
            "process_start_time_seconds",
            "process_threads",
        ] {
            assert!(sample(&text, name).is_some(), "missing {name} in\n{text}");
        }
        let value = |name: &str| -> f64 {
            let line = sample(&text, name).unwrap_or_default();
            line.rsplit(' ')
                .next()
                .unwrap_or_default()
                .parse()
                .unwrap_or(0.0)
        };
        assert!(value("process_resident_memory_bytes") > 1024.0 * 1024.0);
        assert!(value("process_open_fds") >= 3.0);
        assert!(value("process_threads") >= 1.0);
        // Started after 2020 and not in the future.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = value("process_start_time_seconds");
        assert!(start > 1.5e9 && start <= now + 1.0, "start time {start}");
    }

    #[test]
    fn classic_text_names_counter_series_and_has_no_eof() {
        let m = Metrics::new();
        m.tcp_opened(&labels());
        let text = m.encode_text();
        assert!(text.contains("# TYPE istio_tcp_connections_opened_total counter\n"));
        assert!(text.contains("# HELP istio_tcp_connections_opened_total The total number"));
        assert!(text.contains("# TYPE process_cpu_seconds_total counter\n"));
        assert!(text.contains("# TYPE process_resident_memory_bytes gauge\n"));
        assert!(text.contains(&format!("istio_tcp_connections_opened_total{LABELS} 1\n")));
        assert!(!text.contains("# EOF"));
    }

    /// promtool (Debian package `prometheus`) is the reference linter for the classic text
    /// format; machines without it still run every other check.
    #[test]
    fn classic_text_passes_promtool_when_available() {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let m = Metrics::new();
        m.tcp_opened(&labels());
        m.refused("source", "no_route");
        m.config_loaded();
        let Ok(mut child) = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
        else {
            eprintln!("promtool not installed; exposition format not cross-checked");
            return;
        };
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(m.encode_text().as_bytes()).unwrap();
        }
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn a_snapshot_reads_back_every_counter_and_label() {
        let m = Metrics::new();
        let l = labels();
        m.tcp_opened(&l);
        m.tcp_opened(&l);
        m.tcp_closed(&l);
        m.tcp_sent(&l, 100);
        m.tcp_received(&l, 7);
        let other = TcpLabels {
            reporter: "source".into(),
            response_flags: "DENY".into(),
            ..TcpLabels::default()
        };
        m.tcp_opened(&other);
        m.tcp_closed(&other);
        m.refused("destination", "DENY");
        m.refused("destination", "DENY");
        m.config_rejected("local");
        m.config_loaded();
        let snap = m.snapshot();
        let mut tcp = snap.tcp.clone();
        tcp.sort_by(|a, b| a.labels.reporter.cmp(&b.labels.reporter));
        assert_eq!(
            tcp,
            vec![
                TcpSample {
                    labels: l,
                    opened: 2,
                    closed: 1,
                    sent_bytes: 100,
                    received_bytes: 7,
                },
                TcpSample {
                    labels: other,
                    opened: 1,
                    closed: 1,
                    ..TcpSample::default()
                },
            ]
        );
        assert_eq!(
            snap.refused,
            vec![RefusedSample {
                reporter: "destination".into(),
                reason: "DENY".into(),
                count: 2
            }]
        );
        assert_eq!(snap.config_rejections, vec![("local".to_string(), 1)]);
        assert_eq!(snap.config_reloads, 1);
        assert!(snap.process.rss_bytes.is_some_and(|r| r > 0));
        assert!(snap.process.open_fds.is_some());
        assert!(snap.process.cpu_seconds.is_some());
        // The classic format reads the same.
        assert_eq!(Snapshot::parse(&m.encode_text()).tcp.len(), 2);
    }

    #[test]
    fn snapshots_skip_what_does_not_parse() {
        let text = concat!(
            "garbage line\n",
            "istio_tcp_connections_opened_total{reporter=\"source\"\n",
            "istio_tcp_connections_opened_total{reporter=\"a \\\"q\\\" b\",bogus=\"x\"} 3\n",
            "mesh_config_reloads_total NaN\n",
            "mesh_connections_refused_total{reason=\"TLS\"} -4\n",
            "process_cpu_seconds_total 1.5\n",
            "other_metric 7\n",
        );
        let snap = Snapshot::parse(text);
        assert_eq!(snap.tcp.len(), 1);
        assert_eq!(snap.tcp[0].labels.reporter, "a \"q\" b");
        assert_eq!(snap.tcp[0].opened, 3);
        assert_eq!(snap.config_reloads, 0);
        assert_eq!(snap.refused[0].reporter, UNKNOWN);
        assert_eq!(snap.refused[0].count, 0);
        assert_eq!(snap.process.cpu_seconds, Some(1.5));
        assert_eq!(Snapshot::parse(""), Snapshot::default());
    }

    fn check<T: PartialEq + fmt::Debug>(parse: impl Fn(&str) -> T, input: &str, want: T) {
        assert_eq!(parse(input), want, "input {input:?}");
    }

    #[test]
    fn proc_files_parse() {
        let status = "Name:\tztunnel\nVmSize:\t  123456 kB\nVmRSS:\t    2048 kB\nThreads:\t7\n";
        check(
            parse_status,
            status,
            ProcessStats {
                rss_bytes: Some(2048 * 1024),
                vm_bytes: Some(123456 * 1024),
                threads: Some(7),
                ..ProcessStats::default()
            },
        );
        check(parse_status, "garbage", ProcessStats::default());

        // A command name with spaces and parentheses must not shift the fields.
        let stat =
            "42 (odd) name) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 7000 1000 200";
        check(parse_stat, stat, Some((300, 7000)));
        check(parse_stat, "42 (short) S 1", None);
        check(parse_stat, "no parens at all", None);

        check(
            parse_boot_time,
            "cpu 1 2 3\nbtime 1700000000\nprocesses 5\n",
            Some(1_700_000_000),
        );
        check(parse_boot_time, "cpu 1 2 3\n", None);

        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 1048576              files\n";
        check(parse_max_fds, limits, Some(1024));
        check(
            parse_max_fds,
            "Max open files            unlimited            unlimited            files\n",
            None,
        );
    }

    #[test]
    fn failed_closed_policies_are_a_gauge_per_policy_replaced_as_a_set() {
        let m = Metrics::new();
        m.set_failed_closed([
            ("AuthorizationPolicy", "app", "allow-web"),
            ("RequestAuthentication", "app", "jwt"),
        ]);
        let text = m.encode();
        let want = r#"mesh_policies_failed_closed{kind="AuthorizationPolicy",namespace="app",name="allow-web"} 1"#;
        assert!(
            text.lines().any(|l| l == want),
            "missing {want:?} in\n{text}"
        );
        assert_eq!(m.snapshot().failed_closed, 2);

        m.set_failed_closed([("RequestAuthentication", "app", "jwt")]);
        let text = m.encode();
        assert!(!text.contains("allow-web"), "{text}");
        assert_eq!(m.snapshot().failed_closed, 1);
        m.set_failed_closed([]);
        assert_eq!(m.snapshot().failed_closed, 0);
    }
}
