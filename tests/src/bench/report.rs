//! Results → `BENCHMARKS.md`: one table per measure with absolute values (median and
//! min–max over repetitions) and ratios to direct and to the baseline in the same position,
//! then where we stand against the targets of issue 4. Pure: the tables are unit-tested.

use std::fmt::Write as _;

use super::model::{Better, DataPath, Metric, Quantile, Results, Side};
use super::stats::Spread;

/// The fixed request rates of the latency tables, with the connections they are spread over.
pub const FIXED_RATES: [(u32, usize); 2] = [(1_000, 1), (5_000, 4)];
/// Connection counts of the saturation runs.
pub const SATURATION_CONNS: [u16; 2] = [1, 16];
/// iperf3 stream counts.
pub const STREAMS: [u16; 2] = [1, 8];
/// Tolerance when judging "eBPF no slower than nftables" on a noisy machine.
const SAME_TOLERANCE: f64 = 0.05;
/// "RSS returns near idle": within this fraction of the idle RSS (or [`NEAR_IDLE_MIB`]).
const NEAR_IDLE_FRACTION: f64 = 0.10;
const NEAR_IDLE_MIB: f64 = 2.0;

/// What one column of a table shows for a row's path.
#[derive(Clone, Copy, Debug)]
enum Cell {
    /// The metric's median (min–max).
    Value(Metric),
    /// A per-process metric summed over both sides.
    BothSides(Metric),
    /// median(path) / median(direct).
    VsDirect(Metric),
    /// median(path) / median(baseline of path).
    VsBaseline(Metric),
    /// The per-side sum, / the baseline's per-side sum.
    BothSidesVsBaseline(Metric),
    /// median(path) − median(direct).
    AddedVsDirect(Metric),
}

struct Table<'a> {
    paths: &'a [DataPath],
    columns: Vec<(String, Cell)>,
}

/// Renders the whole report. `chart` is the chart's file name (next to the report), if one
/// was drawn.
/// Everything after this line of an existing report is hand-written analysis, which
/// `mesh-bench` keeps when it writes the report again.
pub const KEPT_MARKER: &str =
    "<!-- Written by hand below this line; `cargo xtask bench` keeps it. -->";

pub fn render(results: &Results, chart: Option<&str>) -> String {
    let mut out = String::new();
    header(&mut out, results, chart);
    targets_section(&mut out, results);
    throughput_section(&mut out, results);
    fixed_rate_section(&mut out, results);
    saturation_section(&mut out, results);
    connection_rate_section(&mut out, results);
    cpu_section(&mut out, results);
    memory_section(&mut out, results);
    enrollment_section(&mut out, results);
    notes_section(&mut out, results);
    out
}

fn header(out: &mut String, r: &Results, chart: Option<&str>) {
    let m = &r.meta;
    let mode = if m.quick {
        "`cargo xtask bench --quick`"
    } else {
        "`cargo xtask bench`"
    };
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Written by {mode} on {} at commit `{}`. Regenerate it with the same command; \
         `--quick` is for development only.\n",
        m.date, m.commit
    );
    let _ = writeln!(out, "- **Machine:** {}", m.machine);
    let _ = writeln!(
        out,
        "- **Run:** {} repetition(s) of every measure, {} s per throughput/HTTP run, \
         repetitions interleaved across paths so that noise hits every path alike; each \
         cell is the median with (min–max).",
        m.reps,
        num(m.run_secs)
    );
    if !m.tools.is_empty() {
        let _ = writeln!(out, "- **Tools:** {}", m.tools.join(", "));
    }
    let _ = writeln!(
        out,
        "- **Topology** (the e2e harness, in the same run for every path): two node network \
         namespaces joined by a veth wire through a bridge, a client pod on node 1, a server \
         pod on node 2 running iperf3, nginx (`return 200`, the HTTP origin) and `mesh-echo` \
         (raw echo, for idle connections). Nothing is linked to a real interface.\n"
    );
    let _ = writeln!(out, "Data paths:\n");
    for path in DataPath::ALL {
        let what = match path {
            DataPath::Direct => "client → server, no proxy: what this machine can do.",
            DataPath::ZtunnelEbpf => {
                "client → ztunnel (n1) → HBONE (HTTP/2 CONNECT over mTLS 1.3, pooled) → \
                 ztunnel (n2) → server; capture by the eBPF `sk_lookup` backend \
                 (`--redirect ebpf`)."
            }
            DataPath::ZtunnelNftables => "the same, capture by nftables (`--redirect nftables`).",
            DataPath::HaproxyTls => {
                "haproxy on n1 (TCP → mTLS 1.3) and haproxy on n2 (mTLS → TCP), ECDSA P-256 \
                 certificates from rcgen, both sides verified; one TLS connection per TCP \
                 connection (haproxy has no multiplexing); the L4 baseline."
            }
            DataPath::NginxHttp => {
                "nginx on n1 as an HTTP/1.1 reverse proxy with a keep-alive upstream pool; \
                 the L7 baseline (plaintext: it stands where the waypoint will)."
            }
            DataPath::Waypoint => {
                "client → ztunnel (n1, eBPF) → HBONE → `waypoint` (its own pod on n2: HTTP \
                 parsed, L7 policy and routing phases, a pooled HBONE upstream) → ztunnel \
                 (n2) → server, through a Service labelled `istio.io/use-waypoint`; HTTP \
                 measures only; its baseline is nginx (which does no mTLS at all)."
            }
        };
        let _ = writeln!(out, "- **{}**: {what}", path.label());
    }
    let _ = writeln!(
        out,
        "\nReading the tables: `× direct` is the path's value divided by direct's, `× base` \
         divided by the baseline's in the same position (haproxy for ztunnel L4, nginx for \
         the waypoint). For throughput and rates higher is better; for latency, CPU and \
         memory lower is better. Ratios are what survive a noisy shared machine; absolute \
         values move with the neighbours.\n"
    );
    if let Some(chart) = chart {
        let _ = writeln!(out, "![throughput and latency per data path]({chart})\n");
    }
}

// === sections ===

fn throughput_section(out: &mut String, r: &Results) {
    let _ = writeln!(out, "## Throughput (iperf3, Gbit/s)\n");
    let paths = tcp_paths();
    let mut columns = Vec::new();
    for streams in STREAMS {
        let m = Metric::Throughput { streams };
        let s = if streams == 1 { "stream" } else { "streams" };
        columns.push((format!("{streams} {s}"), Cell::Value(m)));
        columns.push(("× direct".into(), Cell::VsDirect(m)));
        columns.push(("× base".into(), Cell::VsBaseline(m)));
    }
    table(
        out,
        r,
        &Table {
            paths: &paths,
            columns,
        },
    );
}

fn fixed_rate_section(out: &mut String, r: &Results) {
    let _ = writeln!(
        out,
        "## Latency at a fixed request rate (HTTP/1.1 keep-alive, µs)\n\n\
         Open-loop client in `mesh-bench`: requests leave on a fixed schedule; a request that \
         has to wait for the previous response on its connection is timed from when it \
         should have left (no coordinated omission). Small GET, 3-byte body.\n"
    );
    for (rate, conns) in FIXED_RATES {
        let c = if conns == 1 {
            "connection"
        } else {
            "connections"
        };
        let _ = writeln!(
            out,
            "### {} req/s over {conns} {c}\n",
            thousands(rate as f64)
        );
        let mut columns = Vec::new();
        for q in Quantile::ALL {
            columns.push((
                q.label().to_owned(),
                Cell::Value(Metric::FixedRateLatency { rate, q }),
            ));
        }
        for q in [Quantile::P50, Quantile::P99] {
            let m = Metric::FixedRateLatency { rate, q };
            columns.push((format!("added {}", q.label()), Cell::AddedVsDirect(m)));
            columns.push((format!("{} × base", q.label()), Cell::VsBaseline(m)));
        }
        columns.push((
            "achieved req/s".into(),
            Cell::Value(Metric::FixedRateAchieved { rate }),
        ));
        table(
            out,
            r,
            &Table {
                paths: &http_paths(),
                columns,
            },
        );
    }
}

fn saturation_section(out: &mut String, r: &Results) {
    let _ = writeln!(out, "## At saturation (wrk, HTTP/1.1 keep-alive)\n");
    for conns in SATURATION_CONNS {
        let c = if conns == 1 {
            "connection"
        } else {
            "connections"
        };
        let _ = writeln!(out, "### {conns} {c}\n");
        let rate = Metric::SaturationRate { conns };
        let mut columns = vec![
            ("req/s".to_owned(), Cell::Value(rate)),
            ("× direct".into(), Cell::VsDirect(rate)),
            ("× base".into(), Cell::VsBaseline(rate)),
        ];
        for q in [Quantile::P50, Quantile::P99] {
            let m = Metric::SaturationLatency { conns, q };
            columns.push((format!("{} µs", q.label()), Cell::Value(m)));
            columns.push((format!("{} × base", q.label()), Cell::VsBaseline(m)));
        }
        table(
            out,
            r,
            &Table {
                paths: &http_paths(),
                columns,
            },
        );
    }
}

fn connection_rate_section(out: &mut String, r: &Results) {
    let _ = writeln!(
        out,
        "## New connections per second\n\n\
         Closed loop, 4 client threads: connect, one GET with `Connection: close`, read to \
         the end, close. Through ztunnel each connection is a new CONNECT stream on a pooled \
         HBONE connection; through haproxy it is a new TLS connection (with session \
         resumption).\n"
    );
    let m = Metric::ConnectionRate;
    let columns = vec![
        ("conn/s".to_owned(), Cell::Value(m)),
        ("× direct".into(), Cell::VsDirect(m)),
        ("× base".into(), Cell::VsBaseline(m)),
    ];
    table(
        out,
        r,
        &Table {
            paths: &http_paths(),
            columns,
        },
    );
}

fn cpu_section(out: &mut String, r: &Results) {
    let _ = writeln!(
        out,
        "## CPU per proxy process\n\n\
         `utime + stime` of each proxy's process group from `/proc/<pid>/stat`, before and \
         after each run. Per GB: over the iperf3 runs (1 and 8 streams), per 10^9 bytes the \
         server received. Per 10,000 requests and cores: over the 1,000 req/s run.\n"
    );
    let paths: Vec<DataPath> = DataPath::ALL
        .into_iter()
        .filter(|p| p.has_proxy())
        .collect();
    let mut columns = Vec::new();
    for side in Side::BOTH {
        let short = side_short(side);
        columns.push((
            format!("CPU-s/GB {short}"),
            Cell::Value(Metric::CpuPerGb { side }),
        ));
    }
    columns.push((
        "CPU-s/GB both".into(),
        Cell::BothSides(Metric::CpuPerGb { side: Side::Client }),
    ));
    columns.push((
        "× base".into(),
        Cell::BothSidesVsBaseline(Metric::CpuPerGb { side: Side::Client }),
    ));
    for side in Side::BOTH {
        let short = side_short(side);
        columns.push((
            format!("CPU-s/10k req {short}"),
            Cell::Value(Metric::CpuPer10kRequests { side }),
        ));
    }
    columns.push((
        "× base".into(),
        Cell::BothSidesVsBaseline(Metric::CpuPer10kRequests { side: Side::Client }),
    ));
    columns.push((
        "cores at 1k req/s, both".into(),
        Cell::BothSides(Metric::CpuCoresAt1k { side: Side::Client }),
    ));
    table(
        out,
        r,
        &Table {
            paths: &paths,
            columns,
        },
    );
    let _ = writeln!(
        out,
        "n1 = node 1 (client side), n2 = node 2 (server side); nginx runs on n1 only. Istio \
         1.24 publishes ≈ 0.06 vCPU for its ztunnel at 1,000 HTTP req/s.\n"
    );
}

fn memory_section(out: &mut String, r: &Results) {
    let _ = writeln!(
        out,
        "## Resident memory per proxy process\n\n\
         `VmRSS` of each proxy's process group (nginx: master + workers, shared pages counted \
         in each). Idle: just before the test; then {} idle connections (fewer where the \
         open-file limit forbids; see the column) are opened through the path (one byte \
         echoed on each, so every hop is established), held, and closed.\n",
        thousands(r.meta.idle_connections as f64)
    );
    let paths: Vec<DataPath> = DataPath::ALL
        .into_iter()
        .filter(|p| p.has_proxy() && p.carries_tcp())
        .collect();
    let mut columns = vec![(
        "connections".to_owned(),
        Cell::Value(Metric::IdleConnections),
    )];
    for side in Side::BOTH {
        let s = side_short(side);
        columns.push((
            format!("start MiB {s}"),
            Cell::Value(Metric::RssStart { side }),
        ));
        columns.push((
            format!("idle MiB {s}"),
            Cell::Value(Metric::RssIdle { side }),
        ));
        columns.push((
            format!("loaded MiB {s}"),
            Cell::Value(Metric::RssLoaded { side }),
        ));
        columns.push((
            format!("KiB/conn {s}"),
            Cell::Value(Metric::BytesPerConnection { side }),
        ));
        columns.push((
            format!("after close MiB {s}"),
            Cell::Value(Metric::RssAfterClose { side }),
        ));
    }
    columns.push((
        "KiB/conn × base".into(),
        Cell::BothSidesVsBaseline(Metric::BytesPerConnection { side: Side::Client }),
    ));
    table(
        out,
        r,
        &Table {
            paths: &paths,
            columns,
        },
    );
}

fn enrollment_section(out: &mut String, r: &Results) {
    let _ = writeln!(
        out,
        "## Time to first connection through a freshly enrolled pod (ms)\n\n\
         A pod whose network namespace exists but which is not in the model yet; the server \
         is STRICT, so only tunneled connections succeed. Its Pod YAML is written, and the \
         client starts a new GET every 5 ms (each on its own thread) until one succeeds. \
         \"YAML → first request\" covers the agent's config poll (500 ms period), enrollment \
         (workload certificate, listeners, redirection) and the first request; \"first \
         connection\" is that successful attempt alone (TLS 1.3 + HTTP/2 handshakes with the \
         server's agent, CONNECT, request); \"warm\" is the pod's next connection, over the \
         pooled HBONE connection.\n"
    );
    let paths: Vec<DataPath> = DataPath::ALL
        .into_iter()
        .filter(|p| p.is_ztunnel())
        .collect();
    let columns = vec![
        (
            "YAML → first request".to_owned(),
            Cell::Value(Metric::EnrollToFirstRequest),
        ),
        (
            "first connection".into(),
            Cell::Value(Metric::FirstConnection),
        ),
        (
            "warm connection".into(),
            Cell::Value(Metric::WarmConnection),
        ),
    ];
    table(
        out,
        r,
        &Table {
            paths: &paths,
            columns,
        },
    );
    let _ = writeln!(
        out,
        "The baselines have no enrollment: their certificates are files written before they \
         start.\n"
    );
}

fn notes_section(out: &mut String, r: &Results) {
    let _ = writeln!(out, "## Notes\n");
    let mut notes = vec![
        "The load generators, the servers and the proxies share this machine's cores, so \
         absolute numbers are lower than on separate hosts; compare ratios."
            .to_owned(),
        "haproxy and nginx run with their defaults (haproxy: one thread per core; nginx: \
         `worker_processes auto`), as ztunnel does (one Tokio worker per core)."
            .to_owned(),
        "The harness's kubelet-probe SNAT on the baseline topology's nodes is removed, so \
         the baselines' upstream hops are not NATed."
            .to_owned(),
    ];
    notes.extend(r.meta.notes.iter().cloned());
    for note in notes {
        let _ = writeln!(out, "- {note}");
    }
    let _ = writeln!(out);
}

// === targets ===

/// One line of the target comparison.
#[derive(Clone, Debug, PartialEq)]
pub struct TargetRow {
    pub target: &'static str,
    pub istio: &'static str,
    pub ebpf: String,
    pub nftables: String,
    pub verdict: Verdict,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Met,
    NotMet,
    /// Met on one backend only.
    Partly,
    NoData,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Met => "**met**",
            Verdict::NotMet => "**not met**",
            Verdict::Partly => "**partly** (one backend)",
            Verdict::NoData => "no data",
        }
    }

    fn of(checks: &[Option<bool>]) -> Verdict {
        let known: Vec<bool> = checks.iter().filter_map(|c| *c).collect();
        if known.is_empty() {
            Verdict::NoData
        } else if known.iter().all(|&b| b) {
            Verdict::Met
        } else if known.iter().any(|&b| b) {
            Verdict::Partly
        } else {
            Verdict::NotMet
        }
    }
}

const ZTUNNELS: [DataPath; 2] = [DataPath::ZtunnelEbpf, DataPath::ZtunnelNftables];

/// Computes where each ztunnel backend stands against each target of issue 4.
pub fn targets(r: &Results) -> Vec<TargetRow> {
    let mut rows = Vec::new();
    let ratio_row = |target, istio, metric: Metric, min: f64| {
        let vals = ZTUNNELS.map(|p| ratio(r, p, DataPath::Direct, metric));
        TargetRow {
            target,
            istio,
            ebpf: fmt_ratio(vals[0]),
            nftables: fmt_ratio(vals[1]),
            verdict: Verdict::of(&vals.map(|v| v.map(|v| v >= min))),
        }
    };
    rows.push(ratio_row(
        "single-stream throughput ≥ 0.40 × direct",
        "0.16–0.30",
        Metric::Throughput { streams: 1 },
        0.40,
    ));
    rows.push(ratio_row(
        "8-stream throughput ≥ 0.30 × direct",
        "0.20 (4 streams)",
        Metric::Throughput { streams: 8 },
        0.30,
    ));
    for (q, limit, target, istio) in [
        (
            Quantile::P50,
            50.0,
            "added latency, one keep-alive connection, p50 ≤ 50 µs",
            "≈ 86 µs (direct 27 µs)",
        ),
        (
            Quantile::P99,
            80.0,
            "added latency, one keep-alive connection, p99 ≤ 80 µs",
            "≈ 125 µs",
        ),
    ] {
        let m = Metric::FixedRateLatency {
            rate: FIXED_RATES[0].0,
            q,
        };
        let vals = ZTUNNELS.map(|p| added(r, p, m));
        rows.push(TargetRow {
            target,
            istio,
            ebpf: fmt_added(vals[0]),
            nftables: fmt_added(vals[1]),
            verdict: Verdict::of(&vals.map(|v| v.map(|v| v <= limit))),
        });
    }
    rows.push(ratio_row(
        "new connections per second ≥ 0.35 × direct",
        "0.20",
        Metric::ConnectionRate,
        0.35,
    ));
    {
        let vals = ZTUNNELS.map(|p| worst_side(r, p, |side| Metric::BytesPerConnection { side }));
        rows.push(TargetRow {
            target: "≤ 4 KiB proxy memory per idle tunneled connection per side",
            istio: "≈ 6–7 KiB",
            ebpf: fmt_unit(vals[0], "KiB (worst side)"),
            nftables: fmt_unit(vals[1], "KiB (worst side)"),
            verdict: Verdict::of(&vals.map(|v| v.map(|v| v <= 4.0))),
        });
    }
    {
        let vals = ZTUNNELS.map(|p| back_to_idle(r, p));
        rows.push(TargetRow {
            target: "RSS returns near idle after the connections close",
            istio: "memory that never shrinks is a top complaint",
            ebpf: fmt_unit(vals[0].map(|v| v.0), "MiB above idle (worst side)"),
            nftables: fmt_unit(vals[1].map(|v| v.0), "MiB above idle (worst side)"),
            verdict: Verdict::of(&vals.map(|v| v.map(|v| v.1))),
        });
    }
    {
        let vals = ZTUNNELS.map(|p| worst_side(r, p, |side| Metric::CpuPerGb { side }));
        rows.push(TargetRow {
            target: "≤ 0.6 CPU-seconds per GB per side",
            istio: "≈ 1.1",
            ebpf: fmt_unit(vals[0], "CPU-s/GB (worst side)"),
            nftables: fmt_unit(vals[1], "CPU-s/GB (worst side)"),
            verdict: Verdict::of(&vals.map(|v| v.map(|v| v <= 0.6))),
        });
    }
    {
        let vals = ZTUNNELS.map(|p| versus(r, p, DataPath::HaproxyTls));
        rows.push(TargetRow {
            target: "ahead of the haproxy L4 baseline on every measure",
            istio: "—",
            ebpf: fmt_versus(&vals[0]),
            nftables: fmt_versus(&vals[1]),
            verdict: Verdict::of(&vals.map(|v| v.as_ref().map(|v| v.behind.is_empty()))),
        });
        let waypoint = versus(r, DataPath::Waypoint, DataPath::NginxHttp);
        rows.push(TargetRow {
            target: "ahead of the nginx L7 baseline (waypoint) on every measure",
            istio: "—",
            verdict: Verdict::of(&[waypoint.as_ref().map(|v| v.behind.is_empty())]),
            ebpf: fmt_versus(&waypoint),
            nftables: "—".into(),
        });
    }
    {
        let v = versus(r, DataPath::ZtunnelEbpf, DataPath::ZtunnelNftables);
        let ok = v.as_ref().map(|v| {
            v.behind
                .iter()
                .all(|(_, ratio)| (1.0 - ratio).abs() <= SAME_TOLERANCE)
        });
        rows.push(TargetRow {
            target: "eBPF redirection no slower than nftables (within 5 %)",
            istio: "—",
            ebpf: fmt_versus(&v),
            nftables: "(reference)".into(),
            verdict: Verdict::of(&[ok]),
        });
    }
    rows
}

fn targets_section(out: &mut String, r: &Results) {
    let _ = writeln!(
        out,
        "## Where we stand against each target (issue 4)\n\n\
         Istio's own ztunnel pair on this kind of machine (2 cores, two node namespaces on a \
         veth, medians of 3), as the issue quotes it, next to ours.\n"
    );
    let _ = writeln!(
        out,
        "| target | Istio ztunnel | ours, eBPF | ours, nftables | verdict |\n|---|---|---|---|---|"
    );
    for row in targets(r) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} |",
            row.target,
            row.istio,
            row.ebpf,
            row.nftables,
            row.verdict.label()
        );
    }
    let _ = writeln!(out);
}

/// How a path compares with another on the headline measures.
#[derive(Clone, Debug, PartialEq)]
pub struct Versus {
    pub ahead: usize,
    /// Measures where `path` is behind, with path/other as "better" ratio (< 1).
    pub behind: Vec<(String, f64)>,
}

/// The measures "ahead of the baseline on every measure" counts.
fn headline_metrics() -> Vec<(String, Metric, bool)> {
    let mut m: Vec<(String, Metric, bool)> = Vec::new();
    for streams in STREAMS {
        m.push((
            format!("throughput {streams}"),
            Metric::Throughput { streams },
            false,
        ));
    }
    for (rate, _) in FIXED_RATES {
        for q in [Quantile::P50, Quantile::P99] {
            m.push((
                format!("{} @{}", q.label(), thousands(rate as f64)),
                Metric::FixedRateLatency { rate, q },
                false,
            ));
        }
    }
    for conns in SATURATION_CONNS {
        m.push((
            format!("saturation req/s c{conns}"),
            Metric::SaturationRate { conns },
            false,
        ));
    }
    m.push(("conn/s".into(), Metric::ConnectionRate, false));
    m.push((
        "CPU/GB".into(),
        Metric::CpuPerGb { side: Side::Client },
        true,
    ));
    m.push((
        "CPU/10k req".into(),
        Metric::CpuPer10kRequests { side: Side::Client },
        true,
    ));
    m.push((
        "KiB/conn".into(),
        Metric::BytesPerConnection { side: Side::Client },
        true,
    ));
    m
}

fn versus(r: &Results, path: DataPath, other: DataPath) -> Option<Versus> {
    let mut v = Versus {
        ahead: 0,
        behind: Vec::new(),
    };
    for (name, metric, both_sides) in headline_metrics() {
        let get = |p| {
            if both_sides {
                r.spread_both_sides(p, metric).map(|s| s.median)
            } else {
                r.median(p, metric)
            }
        };
        let (Some(a), Some(b)) = (get(path), get(other)) else {
            continue;
        };
        if a <= 0.0 || b <= 0.0 {
            continue;
        }
        // "Goodness" ratio: > 1 means `path` is better.
        let good = match metric.better() {
            Better::Higher => a / b,
            Better::Lower => b / a,
        };
        if good >= 1.0 {
            v.ahead += 1;
        } else {
            v.behind.push((name, good));
        }
    }
    (v.ahead + v.behind.len() > 0).then_some(v)
}

fn fmt_versus(v: &Option<Versus>) -> String {
    match v {
        None => "no data".into(),
        Some(v) if v.behind.is_empty() => format!("ahead on all {}", v.ahead),
        Some(v) => {
            let behind: Vec<String> = v
                .behind
                .iter()
                .map(|(name, good)| format!("{name} ({})", fmt_ratio(Some(*good))))
                .collect();
            format!(
                "ahead on {} of {}; behind: {}",
                v.ahead,
                v.ahead + v.behind.len(),
                behind.join(", ")
            )
        }
    }
}

fn ratio(r: &Results, path: DataPath, to: DataPath, metric: Metric) -> Option<f64> {
    let a = r.median(path, metric)?;
    let b = r.median(to, metric)?;
    (b != 0.0).then(|| a / b)
}

fn added(r: &Results, path: DataPath, metric: Metric) -> Option<f64> {
    Some(r.median(path, metric)? - r.median(DataPath::Direct, metric)?)
}

/// The larger of the two sides' medians.
fn worst_side(r: &Results, path: DataPath, metric: fn(Side) -> Metric) -> Option<f64> {
    Side::BOTH
        .into_iter()
        .filter_map(|side| r.median(path, metric(side)))
        .reduce(f64::max)
}

/// (worst MiB above idle after close, whether every side is near idle).
fn back_to_idle(r: &Results, path: DataPath) -> Option<(f64, bool)> {
    let mut worst: Option<(f64, bool)> = None;
    for side in Side::BOTH {
        let (Some(idle), Some(after)) = (
            r.median(path, Metric::RssIdle { side }),
            r.median(path, Metric::RssAfterClose { side }),
        ) else {
            continue;
        };
        let above = after - idle;
        let near = above <= (idle * NEAR_IDLE_FRACTION).max(NEAR_IDLE_MIB);
        worst = Some(match worst {
            None => (above, near),
            Some((w, n)) => (w.max(above), n && near),
        });
    }
    worst
}

// === tables ===

fn tcp_paths() -> Vec<DataPath> {
    DataPath::ALL
        .into_iter()
        .filter(|p| p.carries_tcp())
        .collect()
}

fn http_paths() -> Vec<DataPath> {
    DataPath::ALL.to_vec()
}

fn side_short(side: Side) -> &'static str {
    match side {
        Side::Client => "n1",
        Side::Server => "n2",
    }
}

fn table(out: &mut String, r: &Results, t: &Table<'_>) {
    let _ = write!(out, "| path |");
    for (header, _) in &t.columns {
        let _ = write!(out, " {header} |");
    }
    let _ = write!(out, "\n|---|");
    for _ in &t.columns {
        let _ = write!(out, "---:|");
    }
    let _ = writeln!(out);
    for &path in t.paths {
        let _ = write!(out, "| {} |", path.label());
        for (_, cell) in &t.columns {
            let _ = write!(out, " {} |", cell_text(r, path, *cell));
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out);
}

fn cell_text(r: &Results, path: DataPath, cell: Cell) -> String {
    let dash = || "—".to_owned();
    match cell {
        Cell::Value(m) => r.spread(path, m).map(fmt_spread).unwrap_or_else(dash),
        Cell::BothSides(m) => r
            .spread_both_sides(path, m)
            .map(fmt_spread)
            .unwrap_or_else(dash),
        Cell::VsDirect(m) => {
            if path == DataPath::Direct {
                return "1×".into();
            }
            ratio(r, path, DataPath::Direct, m)
                .map(|v| fmt_ratio(Some(v)))
                .unwrap_or_else(dash)
        }
        Cell::VsBaseline(m) => match path.baseline() {
            None if path == DataPath::HaproxyTls || path == DataPath::NginxHttp => "(base)".into(),
            None => dash(),
            Some(base) => ratio(r, path, base, m)
                .map(|v| fmt_ratio(Some(v)))
                .unwrap_or_else(dash),
        },
        Cell::BothSidesVsBaseline(m) => match path.baseline() {
            None if path == DataPath::HaproxyTls || path == DataPath::NginxHttp => "(base)".into(),
            None => dash(),
            Some(base) => {
                let a = r.spread_both_sides(path, m).map(|s| s.median);
                let b = r.spread_both_sides(base, m).map(|s| s.median);
                match (a, b) {
                    (Some(a), Some(b)) if b != 0.0 => fmt_ratio(Some(a / b)),
                    _ => dash(),
                }
            }
        },
        Cell::AddedVsDirect(m) => {
            if path == DataPath::Direct {
                return "—".into();
            }
            added(r, path, m)
                .map(|v| fmt_added(Some(v)))
                .unwrap_or_else(dash)
        }
    }
}

// === number formatting ===

/// Three significant digits or so: 0.0123, 1.23, 12.3, 123, 12,345.
pub fn num(v: f64) -> String {
    let a = v.abs();
    if a >= 1_000.0 {
        thousands(v)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a == 0.0 {
        "0".into()
    } else {
        format!("{v:.3}")
    }
}

/// A whole number with `,` between thousands.
pub fn thousands(v: f64) -> String {
    let rounded = v.round();
    let digits = format!("{}", rounded.abs() as u64);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if rounded < 0.0 {
        out.insert(0, '-');
    }
    out
}

fn fmt_spread(s: Spread) -> String {
    if s.n > 1 && s.min != s.max {
        format!("{} ({}–{})", num(s.median), num(s.min), num(s.max))
    } else {
        num(s.median)
    }
}

fn fmt_ratio(v: Option<f64>) -> String {
    match v {
        Some(v) => format!("{v:.2}×"),
        None => "no data".into(),
    }
}

fn fmt_added(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 0.0 => format!("+{} µs", num(v)),
        Some(v) => format!("{} µs", num(v)),
        None => "no data".into(),
    }
}

fn fmt_unit(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(v) => format!("{} {unit}", num(v)),
        None => "no data".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::model::Meta;

    /// A small run: direct, haproxy and both ztunnel backends, three repetitions where it
    /// matters.
    fn sample_results() -> Results {
        let mut r = Results {
            meta: Meta {
                machine: "test machine".into(),
                date: "2025-01-01T00:00:00Z".into(),
                commit: "abc123".into(),
                quick: true,
                reps: 3,
                run_secs: 1.0,
                idle_connections: 10_000,
                tools: vec!["iperf3 3.12".into()],
                notes: vec!["a note".into()],
            },
            samples: Vec::new(),
        };
        let t1 = Metric::Throughput { streams: 1 };
        for (rep, v) in [10.0, 12.0, 11.0].into_iter().enumerate() {
            r.record(DataPath::Direct, t1, rep, v);
            r.record(DataPath::ZtunnelEbpf, t1, rep, v * 0.5);
            r.record(DataPath::ZtunnelNftables, t1, rep, v * 0.3);
            r.record(DataPath::HaproxyTls, t1, rep, v * 0.4);
        }
        let p50 = Metric::FixedRateLatency {
            rate: 1_000,
            q: Quantile::P50,
        };
        r.record(DataPath::Direct, p50, 0, 30.0);
        r.record(DataPath::ZtunnelEbpf, p50, 0, 70.0);
        r.record(DataPath::ZtunnelNftables, p50, 0, 90.0);
        r.record(DataPath::HaproxyTls, p50, 0, 140.0);
        for side in Side::BOTH {
            r.record(
                DataPath::ZtunnelEbpf,
                Metric::BytesPerConnection { side },
                0,
                3.0,
            );
            r.record(
                DataPath::ZtunnelNftables,
                Metric::BytesPerConnection { side },
                0,
                if side == Side::Server { 5.0 } else { 3.0 },
            );
            r.record(
                DataPath::HaproxyTls,
                Metric::BytesPerConnection { side },
                0,
                20.0,
            );
        }
        r
    }

    #[test]
    fn numbers_keep_about_three_significant_digits() {
        for (v, s) in [
            (0.0, "0"),
            (0.01234, "0.012"),
            (1.234, "1.23"),
            (12.34, "12.3"),
            (123.4, "123"),
            (12_345.6, "12,346"),
            (1_234_567.0, "1,234,567"),
            (-1_500.0, "-1,500"),
        ] {
            assert_eq!(num(v), s, "{v}");
        }
    }

    #[test]
    fn tables_show_median_range_and_ratios() {
        let r = sample_results();
        let md = render(&r, Some("BENCHMARKS.png"));
        // direct: median 11 of 10..12; zt-ebpf 5.5 (5–6), 0.50× direct, 1.25× haproxy.
        assert!(
            md.contains("| direct (no proxy) | 11.0 (10.0–12.0) | 1× |"),
            "{md}"
        );
        assert!(
            md.contains("| ztunnel L4, eBPF | 5.50 (5.00–6.00) | 0.50× | 1.25× |"),
            "{md}"
        );
        assert!(
            md.contains("| haproxy mTLS pair (L4 baseline) | 4.40 (4.00–4.80) | 0.40× | (base) |")
        );
        // The waypoint is in the HTTP tables (no samples here), absent from throughput.
        assert!(md.contains("| ztunnel + waypoint (L7) |"));
        assert!(md.contains("![throughput and latency per data path](BENCHMARKS.png)"));
        assert!(md.contains("commit `abc123`"));
        assert!(md.contains("- a note"));
        // Added latency: 70 − 30.
        assert!(md.contains("+40.0 µs"), "{md}");
    }

    #[test]
    fn targets_are_judged_per_backend() {
        let r = sample_results();
        let rows = targets(&r);
        let row = |prefix: &str| {
            rows.iter()
                .find(|row| row.target.starts_with(prefix))
                .unwrap_or_else(|| panic!("no target {prefix}"))
                .clone()
        };
        // 0.50 and 0.30 of direct against ≥ 0.40: eBPF only.
        let single = row("single-stream");
        assert_eq!(single.verdict, Verdict::Partly);
        assert_eq!(
            (single.ebpf.as_str(), single.nftables.as_str()),
            ("0.50×", "0.30×")
        );
        // +40 and +60 µs against ≤ 50.
        assert_eq!(
            row("added latency, one keep-alive connection, p50").verdict,
            Verdict::Partly
        );
        // No p99 samples at all.
        assert_eq!(
            row("added latency, one keep-alive connection, p99").verdict,
            Verdict::NoData
        );
        // 3 KiB on both sides vs 3 and 5 KiB: the worst side decides.
        let mem = row("≤ 4 KiB");
        assert_eq!(mem.verdict, Verdict::Partly);
        assert!(mem.nftables.starts_with("5.00 KiB"), "{}", mem.nftables);
        // Against haproxy: nftables is behind on throughput (0.3 < 0.4).
        let haproxy = row("ahead of the haproxy");
        assert_eq!(haproxy.verdict, Verdict::Partly);
        assert!(
            haproxy.nftables.contains("throughput 1 (0.75×)"),
            "{}",
            haproxy.nftables
        );
        assert_eq!(row("ahead of the nginx").verdict, Verdict::NoData);
        // eBPF is better than nftables everywhere it was measured.
        assert_eq!(row("eBPF redirection").verdict, Verdict::Met);
    }

    #[test]
    fn verdicts_combine_backends() {
        assert_eq!(Verdict::of(&[Some(true), Some(true)]), Verdict::Met);
        assert_eq!(Verdict::of(&[Some(true), None]), Verdict::Met);
        assert_eq!(Verdict::of(&[Some(false), Some(true)]), Verdict::Partly);
        assert_eq!(Verdict::of(&[Some(false), None]), Verdict::NotMet);
        assert_eq!(Verdict::of(&[None, None]), Verdict::NoData);
    }

    #[test]
    fn rss_back_to_idle_allows_a_little_slack() {
        let mut r = Results::default();
        let p = DataPath::ZtunnelEbpf;
        r.record(p, Metric::RssIdle { side: Side::Client }, 0, 10.0);
        r.record(p, Metric::RssAfterClose { side: Side::Client }, 0, 11.5);
        assert_eq!(back_to_idle(&r, p), Some((1.5, true)));
        r.record(p, Metric::RssIdle { side: Side::Server }, 0, 10.0);
        r.record(p, Metric::RssAfterClose { side: Side::Server }, 0, 30.0);
        assert_eq!(back_to_idle(&r, p), Some((20.0, false)));
        assert_eq!(back_to_idle(&r, DataPath::HaproxyTls), None);
    }
}
