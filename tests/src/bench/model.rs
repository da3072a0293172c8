//! What a benchmark run measures and what it found: data paths, metrics, samples. Pure data
//! (serialisable, so a run can be kept as JSON and compared with a later one).

use serde::{Deserialize, Serialize};

use super::stats::Spread;

/// One way for the client pod's traffic to reach the server pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum DataPath {
    /// client → server, no proxy: the limit of this machine.
    Direct,
    /// client → ztunnel (n1) → HBONE → ztunnel (n2) → server, captured by eBPF.
    ZtunnelEbpf,
    /// The same, captured by nftables.
    ZtunnelNftables,
    /// L4 baseline: haproxy TCP → mTLS on n1, mTLS → TCP on n2 (one TLS connection per TCP
    /// connection; no multiplexing).
    HaproxyTls,
    /// L7 baseline: nginx as an HTTP/1.1 reverse proxy on n1 (keep-alive upstream).
    NginxHttp,
    /// ztunnel + waypoint (L7): client → ztunnel (n1) → waypoint (n2) → ztunnel (n2) →
    /// server, HTTP only, eBPF capture.
    Waypoint,
    /// The ingress gateway (L7): a client outside the mesh → the gateway (a Gateway of class
    /// `istio`, its own pod on n1, not captured) → HBONE → ztunnel (n2) → server, routed by an
    /// HTTPRoute to the server's Service; HTTP only. In nginx's position: an HTTP reverse
    /// proxy on n1 in front of the server.
    Ingress,
}

impl DataPath {
    /// Every path, in report order.
    pub const ALL: [DataPath; 7] = [
        DataPath::Direct,
        DataPath::ZtunnelEbpf,
        DataPath::ZtunnelNftables,
        DataPath::HaproxyTls,
        DataPath::NginxHttp,
        DataPath::Waypoint,
        DataPath::Ingress,
    ];

    /// How the report names it.
    pub fn label(self) -> &'static str {
        match self {
            DataPath::Direct => "direct (no proxy)",
            DataPath::ZtunnelEbpf => "ztunnel L4, eBPF",
            DataPath::ZtunnelNftables => "ztunnel L4, nftables",
            DataPath::HaproxyTls => "haproxy mTLS pair (L4 baseline)",
            DataPath::NginxHttp => "nginx HTTP proxy (L7 baseline)",
            DataPath::Waypoint => "ztunnel + waypoint (L7)",
            DataPath::Ingress => "ingress gateway (L7)",
        }
    }

    /// A short name for the chart and the JSON.
    pub fn short(self) -> &'static str {
        match self {
            DataPath::Direct => "direct",
            DataPath::ZtunnelEbpf => "zt-ebpf",
            DataPath::ZtunnelNftables => "zt-nft",
            DataPath::HaproxyTls => "haproxy",
            DataPath::NginxHttp => "nginx",
            DataPath::Waypoint => "waypoint",
            DataPath::Ingress => "ingress",
        }
    }

    /// The established proxy in the same position, which ratios are taken against.
    pub fn baseline(self) -> Option<DataPath> {
        match self {
            DataPath::ZtunnelEbpf | DataPath::ZtunnelNftables => Some(DataPath::HaproxyTls),
            DataPath::Waypoint | DataPath::Ingress => Some(DataPath::NginxHttp),
            DataPath::Direct | DataPath::HaproxyTls | DataPath::NginxHttp => None,
        }
    }

    /// Whether it carries any TCP stream (iperf3, idle connections), not only HTTP.
    pub fn carries_tcp(self) -> bool {
        !matches!(
            self,
            DataPath::NginxHttp | DataPath::Waypoint | DataPath::Ingress
        )
    }

    /// Whether it involves proxy processes whose CPU and memory are measured.
    pub fn has_proxy(self) -> bool {
        !matches!(self, DataPath::Direct)
    }

    /// Whether the path runs ztunnel (so it has an enrollment to time).
    pub fn is_ztunnel(self) -> bool {
        matches!(self, DataPath::ZtunnelEbpf | DataPath::ZtunnelNftables)
    }
}

/// Which proxy process a per-process metric belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Side {
    /// Node 1, the client's side.
    Client,
    /// Node 2, the server's side (its node agent; the waypoint is [`Side::Waypoint`]).
    Server,
    /// The waypoint process of the L7 path (its own pod on node 2), measured by itself.
    Waypoint,
    /// The ingress gateway process (its own pod on node 1), measured by itself. The ingress
    /// path's other process is node 2's agent ([`Side::Server`]); node 1's agent carries
    /// none of its traffic (neither the client nor the gateway is captured).
    Ingress,
}

impl Side {
    /// The two nodes' proxies (what "per side" targets are about).
    pub const BOTH: [Side; 2] = [Side::Client, Side::Server];
    /// Every proxy process a path may have.
    pub const ALL: [Side; 4] = [Side::Client, Side::Server, Side::Waypoint, Side::Ingress];

    pub fn label(self) -> &'static str {
        match self {
            Side::Client => "node 1 (client side)",
            Side::Server => "node 2 (server side)",
            Side::Waypoint => "the waypoint (node 2)",
            Side::Ingress => "the ingress gateway (node 1)",
        }
    }
}

/// A latency percentile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Quantile {
    P50,
    P90,
    P99,
}

impl Quantile {
    pub const ALL: [Quantile; 3] = [Quantile::P50, Quantile::P90, Quantile::P99];

    pub fn label(self) -> &'static str {
        match self {
            Quantile::P50 => "p50",
            Quantile::P90 => "p90",
            Quantile::P99 => "p99",
        }
    }

    /// The value of this percentile in `p`.
    pub fn of(self, p: &super::stats::Percentiles) -> f64 {
        match self {
            Quantile::P50 => p.p50,
            Quantile::P90 => p.p90,
            Quantile::P99 => p.p99,
        }
    }
}

/// Whether more of a metric is better.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
}

/// One measured quantity. Units are in [`Metric::unit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Metric {
    /// iperf3 throughput as the receiver counted it, Gbit/s.
    Throughput { streams: u16 },
    /// HTTP/1.1 keep-alive latency at a fixed offered rate, µs.
    FixedRateLatency { rate: u32, q: Quantile },
    /// The rate actually completed during a fixed-rate run, req/s.
    FixedRateAchieved { rate: u32 },
    /// wrk at saturation: requests per second.
    SaturationRate { conns: u16 },
    /// wrk at saturation: latency, µs.
    SaturationLatency { conns: u16, q: Quantile },
    /// New connections per second, one small request on each.
    ConnectionRate,
    /// CPU seconds of one proxy process per GB (10^9 bytes) moved by iperf3.
    CpuPerGb { side: Side },
    /// CPU seconds of one proxy process per 10,000 requests at 1,000 req/s.
    CpuPer10kRequests { side: Side },
    /// CPU seconds of one proxy process per 10,000 requests during a wrk saturation run.
    SaturationCpuPer10k { conns: u16, side: Side },
    /// One HTTP/2 client connection (h2c, prior knowledge) with `streams` concurrent
    /// streams (h2load `-c 1 -m streams`): requests per second.
    Http2Streams { streams: u16 },
    /// CPU of one proxy process at 1,000 req/s, in cores.
    CpuCoresAt1k { side: Side },
    /// Resident memory before any traffic, bytes.
    RssStart { side: Side },
    /// Resident memory idle after the repetitions: just before the idle-connection test (on
    /// the HTTP-only paths, which have none, at the same point: after their HTTP runs), bytes.
    RssIdle { side: Side },
    /// Resident memory holding the idle tunneled connections, bytes.
    RssLoaded { side: Side },
    /// (loaded − idle) / connections, KiB.
    BytesPerConnection { side: Side },
    /// How many idle connections the memory test held on the path.
    IdleConnections,
    /// Resident memory after those connections closed: once the proxy released them and at
    /// least 15 s after the close (runs before issue 15: as soon as released), bytes.
    RssAfterClose { side: Side },
    /// From writing a new pod's YAML to its first successful request through the mesh, ms.
    EnrollToFirstRequest,
    /// The first successful connection + request of a freshly enrolled pod (certificate
    /// issue + mTLS/HTTP2 handshake + CONNECT), ms.
    FirstConnection,
    /// The pod's second connection + request (pooled HBONE connection), ms.
    WarmConnection,
    /// Model-size dimension ([`super::sizes`]), with `pods` other pods in the model: new
    /// connections per second through a Service VIP.
    SizeConnectionRate { pods: u32 },
    /// Model size: keep-alive latency at 1,000 req/s over one connection through the VIP, µs.
    SizeLatency { pods: u32, q: Quantile },
    /// Model size: one agent's resident memory with the model loaded, idle, MiB.
    SizeRss { pods: u32, side: Side },
    /// Model size: from an agent's start to its `/healthz/ready` answering 200 (model
    /// loaded, pods enrolled), ms.
    SizeTimeToReady { pods: u32, side: Side },
    /// Model size: from an agent's start to the first request carried through it, ms.
    SizeFirstRequest { pods: u32, side: Side },
}

impl Metric {
    pub fn unit(self) -> &'static str {
        match self {
            Metric::Throughput { .. } => "Gbit/s",
            Metric::FixedRateLatency { .. } | Metric::SaturationLatency { .. } => "µs",
            Metric::FixedRateAchieved { .. }
            | Metric::SaturationRate { .. }
            | Metric::Http2Streams { .. } => "req/s",
            Metric::ConnectionRate => "conn/s",
            Metric::CpuPerGb { .. } => "CPU-s/GB",
            Metric::CpuPer10kRequests { .. } | Metric::SaturationCpuPer10k { .. } => {
                "CPU-s/10k req"
            }
            Metric::CpuCoresAt1k { .. } => "cores",
            Metric::RssStart { .. }
            | Metric::RssIdle { .. }
            | Metric::RssLoaded { .. }
            | Metric::RssAfterClose { .. }
            | Metric::SizeRss { .. } => "MiB",
            Metric::BytesPerConnection { .. } => "KiB/conn",
            Metric::IdleConnections => "connections",
            Metric::EnrollToFirstRequest
            | Metric::FirstConnection
            | Metric::WarmConnection
            | Metric::SizeTimeToReady { .. }
            | Metric::SizeFirstRequest { .. } => "ms",
            Metric::SizeConnectionRate { .. } => "conn/s",
            Metric::SizeLatency { .. } => "µs",
        }
    }

    pub fn better(self) -> Better {
        match self {
            Metric::Throughput { .. }
            | Metric::FixedRateAchieved { .. }
            | Metric::SaturationRate { .. }
            | Metric::Http2Streams { .. }
            | Metric::ConnectionRate
            | Metric::SizeConnectionRate { .. } => Better::Higher,
            _ => Better::Lower,
        }
    }

    /// The same metric for another side, for per-process metrics (`None` for the others).
    pub fn with_side(self, side: Side) -> Option<Metric> {
        Some(match self {
            Metric::CpuPerGb { .. } => Metric::CpuPerGb { side },
            Metric::CpuPer10kRequests { .. } => Metric::CpuPer10kRequests { side },
            Metric::SaturationCpuPer10k { conns, .. } => {
                Metric::SaturationCpuPer10k { conns, side }
            }
            Metric::CpuCoresAt1k { .. } => Metric::CpuCoresAt1k { side },
            Metric::RssStart { .. } => Metric::RssStart { side },
            Metric::RssIdle { .. } => Metric::RssIdle { side },
            Metric::RssLoaded { .. } => Metric::RssLoaded { side },
            Metric::BytesPerConnection { .. } => Metric::BytesPerConnection { side },
            Metric::RssAfterClose { .. } => Metric::RssAfterClose { side },
            _ => return None,
        })
    }
}

/// One value of one metric on one path in one repetition (already in the metric's unit).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub path: DataPath,
    pub metric: Metric,
    pub rep: usize,
    pub value: f64,
}

/// Where and how the run happened.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Meta {
    /// e.g. "Intel Xeon …, 2 CPUs, 23.5 GiB RAM, Linux 6.x, Debian 12".
    pub machine: String,
    /// UTC, RFC 3339.
    pub date: String,
    /// `git rev-parse HEAD` (+ `-dirty`).
    pub commit: String,
    pub quick: bool,
    pub reps: usize,
    /// Seconds per throughput / HTTP run.
    pub run_secs: f64,
    /// How many idle connections the memory test held.
    pub idle_connections: usize,
    /// Versions of the external tools, e.g. "iperf3 3.12".
    pub tools: Vec<String>,
    /// Anything worth knowing about this run (skipped paths, failures).
    pub notes: Vec<String>,
}

/// Everything one run measured.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub meta: Meta,
    pub samples: Vec<Sample>,
}

impl Results {
    pub fn record(&mut self, path: DataPath, metric: Metric, rep: usize, value: f64) {
        if value.is_finite() {
            self.samples.push(Sample {
                path,
                metric,
                rep,
                value,
            });
        }
    }

    /// Median and range of `metric` on `path` over repetitions.
    pub fn spread(&self, path: DataPath, metric: Metric) -> Option<Spread> {
        let values: Vec<f64> = self
            .samples
            .iter()
            .filter(|s| s.path == path && s.metric == metric)
            .map(|s| s.value)
            .collect();
        Spread::of(&values)
    }

    pub fn median(&self, path: DataPath, metric: Metric) -> Option<f64> {
        self.spread(path, metric).map(|s| s.median)
    }

    /// The per-repetition sum over every proxy process of a per-process metric (both nodes,
    /// and the waypoint or the ingress gateway where the path has one), summarised. A
    /// repetition counts only when every side that has samples in the run has one in it.
    pub fn spread_both_sides(&self, path: DataPath, metric: Metric) -> Option<Spread> {
        // The metric of each side that was measured on this path.
        let metrics: Vec<Metric> = Side::ALL
            .into_iter()
            .filter_map(|side| metric.with_side(side))
            .filter(|&m| self.spread(path, m).is_some())
            .collect();
        let first = *metrics.first()?;
        let mut reps: Vec<usize> = self
            .samples
            .iter()
            .filter(|s| s.path == path && s.metric == first)
            .map(|s| s.rep)
            .collect();
        reps.sort_unstable();
        reps.dedup();
        let sums: Vec<f64> = reps
            .into_iter()
            .filter_map(|rep| {
                metrics
                    .iter()
                    .map(|&m| {
                        self.samples
                            .iter()
                            .find(|s| s.path == path && s.metric == m && s.rep == rep)
                            .map(|s| s.value)
                    })
                    .sum::<Option<f64>>()
            })
            .collect();
        Spread::of(&sums)
    }

    /// Whether anything at all was measured on `path`.
    pub fn has(&self, path: DataPath) -> bool {
        self.samples.iter().any(|s| s.path == path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spreads_are_per_path_and_metric() {
        let mut r = Results::default();
        let m = Metric::Throughput { streams: 1 };
        for (rep, v) in [3.0, 1.0, 2.0].into_iter().enumerate() {
            r.record(DataPath::Direct, m, rep, v);
        }
        r.record(DataPath::HaproxyTls, m, 0, 9.0);
        r.record(DataPath::Direct, m, 3, f64::NAN);
        let s = r.spread(DataPath::Direct, m).expect("direct");
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        assert_eq!(r.median(DataPath::HaproxyTls, m), Some(9.0));
        assert_eq!(r.spread(DataPath::ZtunnelEbpf, m), None);
        assert!(r.has(DataPath::Direct) && !r.has(DataPath::Waypoint));
    }

    #[test]
    fn both_sides_are_summed_per_repetition() {
        let mut r = Results::default();
        let gb = |side| Metric::CpuPerGb { side };
        r.record(DataPath::HaproxyTls, gb(Side::Client), 0, 1.0);
        r.record(DataPath::HaproxyTls, gb(Side::Server), 0, 2.0);
        r.record(DataPath::HaproxyTls, gb(Side::Client), 1, 3.0);
        r.record(DataPath::HaproxyTls, gb(Side::Server), 1, 4.0);
        // A repetition missing one side is not summed.
        r.record(DataPath::HaproxyTls, gb(Side::Client), 2, 100.0);
        let s = r
            .spread_both_sides(DataPath::HaproxyTls, gb(Side::Client))
            .expect("sums");
        assert_eq!((s.min, s.max, s.n), (3.0, 7.0, 2));
        // A one-process proxy is its own sum.
        r.record(DataPath::NginxHttp, gb(Side::Client), 0, 5.0);
        let s = r
            .spread_both_sides(DataPath::NginxHttp, gb(Side::Client))
            .expect("one side");
        assert_eq!(s.median, 5.0);
        assert!(r
            .spread_both_sides(DataPath::Direct, Metric::ConnectionRate)
            .is_none());
    }

    #[test]
    fn baselines_sit_in_the_same_position() {
        assert_eq!(DataPath::ZtunnelEbpf.baseline(), Some(DataPath::HaproxyTls));
        assert_eq!(DataPath::Waypoint.baseline(), Some(DataPath::NginxHttp));
        assert_eq!(DataPath::HaproxyTls.baseline(), None);
        assert!(!DataPath::NginxHttp.carries_tcp());
    }

    #[test]
    fn the_waypoint_process_is_its_own_side_and_in_the_sums() {
        let mut r = Results::default();
        let m = |side| Metric::CpuPer10kRequests { side };
        r.record(DataPath::Waypoint, m(Side::Client), 0, 1.0);
        r.record(DataPath::Waypoint, m(Side::Server), 0, 2.0);
        r.record(DataPath::Waypoint, m(Side::Waypoint), 0, 4.0);
        assert_eq!(r.median(DataPath::Waypoint, m(Side::Server)), Some(2.0));
        let s = r
            .spread_both_sides(DataPath::Waypoint, m(Side::Client))
            .expect("sum");
        assert_eq!(s.median, 7.0);
        let sat = Metric::SaturationCpuPer10k {
            conns: 16,
            side: Side::Client,
        };
        assert_eq!(
            sat.with_side(Side::Waypoint),
            Some(Metric::SaturationCpuPer10k {
                conns: 16,
                side: Side::Waypoint
            })
        );
        assert_eq!(Metric::ConnectionRate.with_side(Side::Client), None);
    }

    #[test]
    fn the_ingress_stands_where_nginx_does_and_counts_its_two_processes() {
        let p = DataPath::Ingress;
        assert_eq!(p.baseline(), Some(DataPath::NginxHttp));
        assert!(!p.carries_tcp() && p.has_proxy() && !p.is_ztunnel());
        assert_eq!(DataPath::ALL.last(), Some(&p));
        // The gateway and node 2's agent; node 1's agent is not on the path.
        let mut r = Results::default();
        let m = |side| Metric::CpuPer10kRequests { side };
        r.record(p, m(Side::Ingress), 0, 1.5);
        r.record(p, m(Side::Server), 0, 0.5);
        let s = r.spread_both_sides(p, m(Side::Client)).expect("sum");
        assert_eq!(s.median, 2.0);
        assert_eq!(
            Metric::RssIdle { side: Side::Client }.with_side(Side::Ingress),
            Some(Metric::RssIdle {
                side: Side::Ingress
            })
        );
        // Runs kept as JSON name the path and the side.
        let json = serde_json::to_string(&r).expect("json");
        assert!(json.contains(r#""path":"Ingress""#), "{json}");
        assert_eq!(serde_json::from_str::<Results>(&json).expect("back"), r);
    }
}
