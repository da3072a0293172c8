//! Results → `BENCHMARKS.md`: one table per measure with absolute values (median and
//! min–max over repetitions) and ratios to direct and to the baseline in the same position,
//! then where we stand against the targets of issue 4 and of issue 15 (the waypoint against
//! the L4 path under it, the L4 path against haproxy), and the ingress gateway against nginx
//! (no target of its own). Pure: the tables are unit-tested.

use std::fmt::Write as _;

use super::model::{Better, DataPath, Metric, Quantile, Results, Side};
use super::stats::Spread;

/// The fixed request rates of the latency tables, with the connections they are spread over.
pub const FIXED_RATES: [(u32, usize); 2] = [(1_000, 1), (5_000, 4)];
/// Connection counts of the saturation runs.
pub const SATURATION_CONNS: [u16; 2] = [1, 16];
/// iperf3 stream counts.
pub const STREAMS: [u16; 2] = [1, 8];
/// Concurrent streams on the one HTTP/2 client connection (h2load `-c 1 -m`).
pub const H2_STREAMS: u16 = 100;
/// Tolerance when judging "eBPF no slower than nftables" on a noisy machine.
const SAME_TOLERANCE: f64 = 0.05;
/// "RSS returns near idle": within this fraction of the idle RSS (or [`NEAR_IDLE_MIB`]).
const NEAR_IDLE_FRACTION: f64 = 0.10;
const NEAR_IDLE_MIB: f64 = 2.0;
/// Issue 15's targets.
const WAYPOINT_SATURATION_MIN: f64 = 0.75;
const WAYPOINT_INCREMENT_P50_MAX_US: f64 = 60.0;
const WAYPOINT_INCREMENT_P99_MAX_US: f64 = 150.0;
const WAYPOINT_H2_MIN: f64 = 0.7;
const L4_CPU_PER_GB_MAX: f64 = 0.6;
const L4_KIB_PER_CONN_MAX: f64 = 4.0;
/// "RSS back within 5 MiB of idle" (15 s after the close).
const L4_RSS_BACK_MIB: f64 = 5.0;

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
    issue15_section(&mut out, results);
    throughput_section(&mut out, results);
    fixed_rate_section(&mut out, results);
    saturation_section(&mut out, results);
    waypoint_section(&mut out, results);
    ingress_section(&mut out, results);
    connection_rate_section(&mut out, results);
    cpu_section(&mut out, results);
    memory_section(&mut out, results);
    enrollment_section(&mut out, results);
    super::sizes::section(&mut out, results);
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
            DataPath::Ingress => {
                "a client outside the mesh (a pod on n1 in a namespace no agent captures) → \
                 the ingress gateway (the `waypoint` binary serving a Gateway of class \
                 `istio` with one HTTP listener, its own pod on n1, not captured; HTTP \
                 parsed, the HTTPRoute attached to the listener picks the server's Service) \
                 → HBONE (mTLS, pooled) → ztunnel (n2, eBPF) → server; HTTP measures only; \
                 its baseline is nginx, in the same position (an HTTP reverse proxy on n1 in \
                 front of the server)."
            }
        };
        let _ = writeln!(out, "- **{}**: {what}", path.label());
    }
    let _ = writeln!(
        out,
        "\nReading the tables: `× direct` is the path's value divided by direct's, `× base` \
         divided by the baseline's in the same position (haproxy for ztunnel L4, nginx for \
         the waypoint and the ingress gateway). For throughput and rates higher is better; \
         for latency, CPU and memory lower is better. Ratios are what survive a noisy shared machine; absolute \
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
    increments_table(out, r);
}

/// What each L7 proxy adds to the path under it, at each fixed rate: the waypoint over the
/// ztunnel L4 eBPF path (same world, same run), nginx over direct (its yardstick), and the
/// ingress gateway over direct next to nginx's (both stand between a client outside the mesh
/// and the server).
fn increments_table(out: &mut String, r: &Results) {
    let _ = writeln!(
        out,
        "### Increments of the L7 proxies over the path under them\n\n\
         Median of the L7 path − median of the path under it, from the tables above (for \
         the ingress gateway, as for nginx in the same position: direct). Target (issue 15): \
         the waypoint's increment ≤ +{WAYPOINT_INCREMENT_P50_MAX_US:.0} µs at p50 and \
         ≤ +{WAYPOINT_INCREMENT_P99_MAX_US:.0} µs at p99 at {} req/s.\n",
        thousands(f64::from(FIXED_RATES[0].0))
    );
    let _ = write!(out, "| increment |");
    for (rate, _) in FIXED_RATES {
        for q in [Quantile::P50, Quantile::P99] {
            let _ = write!(out, " {} req/s {} |", thousands(f64::from(rate)), q.label());
        }
    }
    let _ = write!(out, "\n|---|");
    for _ in 0..FIXED_RATES.len() * 2 {
        let _ = write!(out, "---:|");
    }
    let _ = writeln!(out);
    for (name, path, under) in L7_INCREMENTS {
        let _ = write!(out, "| {name} |");
        for (rate, _) in FIXED_RATES {
            for q in [Quantile::P50, Quantile::P99] {
                let m = Metric::FixedRateLatency { rate, q };
                let _ = write!(out, " {} |", fmt_added(increment(r, path, under, m)));
            }
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out);
}

/// The rows of [`increments_table`]: (name, L7 path, the path under it).
const L7_INCREMENTS: [(&str, DataPath, DataPath); 3] = [
    (
        "waypoint increment over L4 (waypoint − ztunnel L4, eBPF)",
        DataPath::Waypoint,
        DataPath::ZtunnelEbpf,
    ),
    (
        "nginx increment over direct (nginx − direct)",
        DataPath::NginxHttp,
        DataPath::Direct,
    ),
    (
        "ingress increment over direct (ingress gateway − direct)",
        DataPath::Ingress,
        DataPath::Direct,
    ),
];

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

/// The waypoint path against the ztunnel L4 eBPF path under it (same world, same run), and
/// the waypoint process's CPU per request against nginx's.
fn waypoint_section(out: &mut String, r: &Results) {
    let _ = writeln!(
        out,
        "## The waypoint against the L4 path under it\n\n\
         Same world, same run: the waypoint path and the ztunnel L4 eBPF path differ only by \
         the waypoint. \"One HTTP/2 connection\": `h2load -c 1 -m {H2_STREAMS}` with prior \
         knowledge (h2c) to the origin's HTTP/2 port, directly through the L4 path and \
         through the waypoint by a Service port named `http2` (so the waypoint speaks \
         HTTP/2 upstream too); a run with any failed or non-2xx request is not counted. CPU \
         per 10,000 requests of the waypoint process alone (its own process group, not the \
         node agents), against nginx's (all its processes), over the 1,000 req/s run and \
         over the saturation runs.\n"
    );
    let _ = writeln!(
        out,
        "| measure | waypoint | compared with | waypoint ÷ that | target |\n\
         |---|---:|---:|---:|---|"
    );
    for conns in SATURATION_CONNS {
        let m = Metric::SaturationRate { conns };
        comparison_row(
            out,
            &saturation_row_name(conns),
            r.spread(DataPath::Waypoint, m),
            r.spread(DataPath::ZtunnelEbpf, m),
            Some("L4 eBPF"),
            Some(&format!("≥ {WAYPOINT_SATURATION_MIN:.2}×")),
        );
    }
    let h2 = Metric::Http2Streams {
        streams: H2_STREAMS,
    };
    comparison_row(
        out,
        &format!("req/s, one HTTP/2 connection, {H2_STREAMS} streams"),
        r.spread(DataPath::Waypoint, h2),
        r.spread(DataPath::ZtunnelEbpf, h2),
        Some("L4 eBPF"),
        Some(&format!("≥ {WAYPOINT_H2_MIN:.2}×")),
    );
    for (name, m) in cpu_loads() {
        comparison_row(
            out,
            &format!("CPU-s/10k req of the process, {name}"),
            waypoint_process(r, m),
            r.spread_both_sides(DataPath::NginxHttp, m),
            Some("nginx"),
            Some("≤ 1.00×"),
        );
    }
    let _ = writeln!(out);
}

/// The ingress gateway against nginx in the same position (an HTTP reverse proxy on n1 in
/// front of the server): no target of its own, the ratios for reference. CPU and memory of
/// the gateway process alone, and of the ingress path's processes together.
fn ingress_section(out: &mut String, r: &Results) {
    let _ = writeln!(
        out,
        "## The ingress gateway against nginx\n\n\
         Same load, same position: from a client outside the mesh through an HTTP reverse \
         proxy on node 1 to the server. The ingress gateway also speaks mTLS and HBONE to \
         node 2's agent, nginx plaintext straight to the server. No target of its own: the \
         ratios are for reference. CPU per 10,000 requests (over the 1,000 req/s run and the \
         saturation runs) and resident memory (idle, after the HTTP runs) are shown for the \
         gateway process alone (its own process group) and for the ingress path's processes \
         together (the gateway and node 2's agent, which ends the HBONE tunnel; node 1's \
         agent carries none of this traffic), each against nginx's (all its processes).\n"
    );
    let _ = writeln!(
        out,
        "| measure | ingress gateway | nginx | ingress ÷ nginx |\n|---|---:|---:|---:|"
    );
    let (ingress, nginx) = (DataPath::Ingress, DataPath::NginxHttp);
    let same = |out: &mut String, name: String, m: Metric| {
        comparison_row(
            out,
            &name,
            r.spread(ingress, m),
            r.spread(nginx, m),
            None,
            None,
        );
    };
    for conns in SATURATION_CONNS {
        same(
            out,
            saturation_row_name(conns),
            Metric::SaturationRate { conns },
        );
    }
    let rate = FIXED_RATES[0].0;
    for q in [Quantile::P50, Quantile::P99] {
        same(
            out,
            format!("{} µs at {} req/s", q.label(), thousands(f64::from(rate))),
            Metric::FixedRateLatency { rate, q },
        );
    }
    same(out, "new connections/s".into(), Metric::ConnectionRate);
    let mut loads: Vec<(String, Metric)> = cpu_loads()
        .into_iter()
        .map(|(name, m)| (format!("CPU-s/10k req, {name}"), m))
        .collect();
    loads.push((
        "RSS MiB after the HTTP runs".into(),
        Metric::RssIdle { side: Side::Client },
    ));
    for (name, m) in loads {
        let base = r.spread_both_sides(nginx, m);
        comparison_row(
            out,
            &format!("{name}: the gateway"),
            one_process(r, ingress, Side::Ingress, m),
            base,
            None,
            None,
        );
        comparison_row(
            out,
            &format!("{name}: the gateway + n2's agent"),
            r.spread_both_sides(ingress, m),
            base,
            None,
            None,
        );
    }
    let _ = writeln!(out);
}

/// One row of a comparison table: `| name | ours | other (what) | ours ÷ other |`, then
/// ` target |` where the table has targets.
fn comparison_row(
    out: &mut String,
    name: &str,
    ours: Option<Spread>,
    other: Option<Spread>,
    what: Option<&str>,
    target: Option<&str>,
) {
    let quotient = match (&ours, &other) {
        (Some(a), Some(b)) if b.median != 0.0 => fmt_ratio(Some(a.median / b.median)),
        _ => "—".into(),
    };
    let cell = |s: Option<Spread>| s.map(fmt_spread).unwrap_or_else(|| "—".into());
    let what = what.map(|w| format!(" ({w})")).unwrap_or_default();
    let target = target.map(|t| format!(" {t} |")).unwrap_or_default();
    let _ = writeln!(
        out,
        "| {name} | {} | {}{what} | {quotient} |{target}",
        cell(ours),
        cell(other)
    );
}

/// The loads the waypoint's CPU per request is measured over: (name, the metric on
/// [`Side::Client`]; [`Metric::with_side`] gives the waypoint's).
fn cpu_loads() -> Vec<(String, Metric)> {
    let side = Side::Client;
    let mut loads = vec![(
        format!("{} req/s", thousands(f64::from(FIXED_RATES[0].0))),
        Metric::CpuPer10kRequests { side },
    )];
    for conns in SATURATION_CONNS {
        loads.push((
            format!("saturation, {conns} {}", plural(conns, "connection")),
            Metric::SaturationCpuPer10k { conns, side },
        ));
    }
    loads
}

/// `metric` of the waypoint process alone, on the waypoint path.
fn waypoint_process(r: &Results, metric: Metric) -> Option<Spread> {
    one_process(r, DataPath::Waypoint, Side::Waypoint, metric)
}

/// A per-process `metric` of `side`'s process alone, on `path`.
fn one_process(r: &Results, path: DataPath, side: Side, metric: Metric) -> Option<Spread> {
    r.spread(path, metric.with_side(side)?)
}

fn saturation_row_name(conns: u16) -> String {
    format!(
        "saturation req/s, {conns} wrk {}",
        plural(conns, "connection")
    )
}

fn plural(n: u16, word: &str) -> String {
    if n == 1 {
        word.to_owned()
    } else {
        format!("{word}s")
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
    for side in Side::ALL {
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
        "n1 = node 1 (client side), n2 = node 2 (server side), wp = the waypoint process (its \
         own pod on node 2; counted in the sums), gw = the ingress gateway process (its own \
         pod on node 1; counted in the sums; on the ingress path n2 is node 2's agent, and \
         node 1's agent, which carries none of its traffic, is not counted); nginx runs on n1 \
         only. Istio 1.24 publishes ≈ 0.06 vCPU for its ztunnel at 1,000 HTTP req/s.\n"
    );
}

fn memory_section(out: &mut String, r: &Results) {
    let _ = writeln!(
        out,
        "## Resident memory per proxy process\n\n\
         `VmRSS` of each proxy's process group (nginx: master + workers, shared pages counted \
         in each). Idle: just before the test; then {} idle connections (fewer where the \
         open-file limit forbids; see the column) are opened through the path (one byte \
         echoed on each, so every hop is established), held, and closed; \"after close\" is \
         sampled once the proxy released them and at least 15 s after the close.\n",
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
    l7_memory_table(out, r);
}

/// The HTTP-only paths carry no raw TCP for the idle connections: their proxies' RSS idle
/// after the HTTP runs, per process and summed, against nginx's.
fn l7_memory_table(out: &mut String, r: &Results) {
    let paths: Vec<DataPath> = DataPath::ALL
        .into_iter()
        .filter(|p| p.has_proxy() && !p.carries_tcp())
        .collect();
    let _ = writeln!(
        out,
        "The HTTP-only paths (no idle-connection test): RSS idle after the HTTP runs, per \
         process (n1, n2, wp, gw as in the CPU table) and summed over the path's processes.\n"
    );
    let mut columns: Vec<(String, Cell)> = Side::ALL
        .into_iter()
        .map(|side| {
            (
                format!("MiB {}", side_short(side)),
                Cell::Value(Metric::RssIdle { side }),
            )
        })
        .collect();
    let (idle, start) = (
        Metric::RssIdle { side: Side::Client },
        Metric::RssStart { side: Side::Client },
    );
    columns.push(("MiB, all".into(), Cell::BothSides(idle)));
    columns.push(("× base".into(), Cell::BothSidesVsBaseline(idle)));
    columns.push(("start MiB, all".into(), Cell::BothSides(start)));
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
         `worker_processes auto`), as the agents and the waypoint do (one worker per core, \
         each its own runtime: `--threading per-worker`)."
            .to_owned(),
        "The harness's kubelet-probe SNAT on the baseline topology's nodes is removed, so \
         the baselines' upstream hops are not NATed."
            .to_owned(),
        "The agents' connection caps (`--max-connections`, `--max-connections-per-pod`) are \
         raised to the open-file limit: the memory test holds all its idle connections from \
         one pod."
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
    /// Shown for reference, against no target (the ingress gateway against nginx).
    NoTarget,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Met => "**met**",
            Verdict::NotMet => "**not met**",
            Verdict::Partly => "**partly** (one backend)",
            Verdict::NoData => "no data",
            Verdict::NoTarget => "— (no target; for reference)",
        }
    }

    /// For a target judged on several measures of one path, where `Partly` is "some of them".
    fn label_of_measures(self) -> &'static str {
        match self {
            Verdict::Partly => "**partly**",
            other => other.label(),
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
        // The ingress gateway stands where nginx does; it has no target, only the ratios.
        let ingress = versus(r, DataPath::Ingress, DataPath::NginxHttp);
        rows.push(TargetRow {
            target: "ingress gateway vs the nginx L7 baseline (ratios only)",
            istio: "—",
            verdict: if ingress.is_some() {
                Verdict::NoTarget
            } else {
                Verdict::NoData
            },
            ebpf: fmt_versus(&ingress),
            nftables: "—".into(),
        });
    }
    {
        let (v, ok) = ebpf_vs_nftables(r);
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

/// eBPF against nftables on the headline measures, and whether it is no slower on any (within
/// [`SAME_TOLERANCE`]).
fn ebpf_vs_nftables(r: &Results) -> (Option<Versus>, Option<bool>) {
    let v = versus(r, DataPath::ZtunnelEbpf, DataPath::ZtunnelNftables);
    let ok = v.as_ref().map(|v| {
        v.behind
            .iter()
            .all(|(_, ratio)| (1.0 - ratio).abs() <= SAME_TOLERANCE)
    });
    (v, ok)
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

// === issue 15 ===

/// One line of issue 15's verdict table.
#[derive(Clone, Debug, PartialEq)]
pub struct GoalRow {
    pub target: String,
    /// What we measured (the L4 rows: the eBPF backend).
    pub ours: String,
    /// What it is compared with or judged against (nginx over direct, haproxy, ...).
    pub yardstick: String,
    pub verdict: Verdict,
}

/// Where the waypoint and the L4 path stand against each target of issue 15. L4 rows are the
/// eBPF backend's (the default; nftables's are in issue 4's table).
pub fn issue15_targets(r: &Results) -> Vec<GoalRow> {
    let (wp, l4) = (DataPath::Waypoint, DataPath::ZtunnelEbpf);
    let mut rows = Vec::new();
    // 1. The waypoint.
    for conns in SATURATION_CONNS {
        let m = Metric::SaturationRate { conns };
        let v = ratio(r, wp, l4, m);
        rows.push(GoalRow {
            target: format!(
                "1. waypoint saturation req/s ≥ {WAYPOINT_SATURATION_MIN:.2} × L4, {conns} {}",
                plural(conns, "connection")
            ),
            ours: fmt_ratio(v),
            yardstick: format!(
                "nginx ÷ direct {}",
                fmt_ratio(ratio(r, DataPath::NginxHttp, DataPath::Direct, m))
            ),
            verdict: Verdict::of(&[v.map(|v| v >= WAYPOINT_SATURATION_MIN)]),
        });
    }
    let rate = FIXED_RATES[0].0;
    for (q, max) in [
        (Quantile::P50, WAYPOINT_INCREMENT_P50_MAX_US),
        (Quantile::P99, WAYPOINT_INCREMENT_P99_MAX_US),
    ] {
        let m = Metric::FixedRateLatency { rate, q };
        let v = increment(r, wp, l4, m);
        rows.push(GoalRow {
            target: format!(
                "1. waypoint increment over L4 at {} req/s, {} ≤ +{max:.0} µs",
                thousands(f64::from(rate)),
                q.label(),
            ),
            ours: fmt_added(v),
            yardstick: format!(
                "nginx over direct {}",
                fmt_added(increment(r, DataPath::NginxHttp, DataPath::Direct, m))
            ),
            verdict: Verdict::of(&[v.map(|v| v <= max)]),
        });
    }
    {
        let loads = cpu_loads();
        let waypoint: Vec<Option<f64>> = loads
            .iter()
            .map(|(_, m)| waypoint_process(r, *m).map(|s| s.median))
            .collect();
        let nginx: Vec<Option<f64>> = loads
            .iter()
            .map(|(_, m)| {
                r.spread_both_sides(DataPath::NginxHttp, *m)
                    .map(|s| s.median)
            })
            .collect();
        let names: Vec<&str> = loads.iter().map(|(name, _)| name.as_str()).collect();
        let list = |values: &[Option<f64>]| {
            values
                .iter()
                .map(|v| v.map(num).unwrap_or_else(|| "—".into()))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let checks: Vec<Option<bool>> = waypoint
            .iter()
            .zip(&nginx)
            .map(|(&w, &n)| Some(w? <= n?))
            .collect();
        rows.push(GoalRow {
            target: format!(
                "1. CPU per request of the waypoint process ≤ nginx's ({})",
                names.join(" / ")
            ),
            ours: format!("{} CPU-s/10k req", list(&waypoint)),
            yardstick: format!("nginx {}", list(&nginx)),
            verdict: Verdict::of(&checks),
        });
    }
    {
        let m = Metric::Http2Streams {
            streams: H2_STREAMS,
        };
        let v = ratio(r, wp, l4, m);
        rows.push(GoalRow {
            target: format!(
                "1. one HTTP/2 connection, {H2_STREAMS} streams: waypoint ≥ {WAYPOINT_H2_MIN:.2} × L4"
            ),
            ours: fmt_ratio(v),
            yardstick: r
                .median(l4, m)
                .map(|v| format!("L4 {} req/s", thousands(v)))
                .unwrap_or_else(|| "L4 no data".into()),
            verdict: Verdict::of(&[v.map(|v| v >= WAYPOINT_H2_MIN)]),
        });
    }
    // 2. The L4 path.
    {
        let v = versus(r, l4, DataPath::HaproxyTls);
        rows.push(GoalRow {
            target: format!(
                "2. L4 ahead of the haproxy mTLS pair on all {} measures",
                headline_metrics().len()
            ),
            ours: fmt_versus(&v),
            yardstick: "haproxy".into(),
            verdict: Verdict::of(&[v.as_ref().map(|v| v.behind.is_empty())]),
        });
    }
    for (target, metric, max, unit) in [
        (
            format!("2. ≤ {L4_CPU_PER_GB_MAX} CPU-s/GB per side"),
            (|side| Metric::CpuPerGb { side }) as fn(Side) -> Metric,
            L4_CPU_PER_GB_MAX,
            "CPU-s/GB (worst side)",
        ),
        (
            format!("2. ≤ {L4_KIB_PER_CONN_MAX} KiB per idle tunnelled connection per side"),
            |side| Metric::BytesPerConnection { side },
            L4_KIB_PER_CONN_MAX,
            "KiB (worst side)",
        ),
    ] {
        let v = worst_side(r, l4, metric);
        rows.push(GoalRow {
            target,
            ours: fmt_unit(v, unit),
            yardstick: format!(
                "haproxy {}",
                fmt_unit(worst_side(r, DataPath::HaproxyTls, metric), unit)
            ),
            verdict: Verdict::of(&[v.map(|v| v <= max)]),
        });
    }
    {
        let within = |p| back_within(r, p, |_| L4_RSS_BACK_MIB);
        let v = within(l4);
        let unit = "MiB above idle (worst side)";
        rows.push(GoalRow {
            target: format!(
                "2. RSS back within {L4_RSS_BACK_MIB:.0} MiB of idle 15 s after the idle \
                 connections close"
            ),
            ours: fmt_unit(v.map(|v| v.0), unit),
            yardstick: format!(
                "haproxy {}",
                fmt_unit(within(DataPath::HaproxyTls).map(|v| v.0), unit)
            ),
            verdict: Verdict::of(&[v.map(|v| v.1)]),
        });
    }
    // 3. The model's size (measured by the model-size dimension).
    rows.push(model_size_row(r));
    // 4. No regression: eBPF against nftables (issue 4's table has the same row).
    {
        let (v, ok) = ebpf_vs_nftables(r);
        rows.push(GoalRow {
            target: "4. eBPF at least as fast as nftables on every measure (within 5 %)".into(),
            ours: fmt_versus(&v),
            yardstick: "nftables".into(),
            verdict: Verdict::of(&[ok]),
        });
    }
    rows
}

/// Target 3 (cost that does not grow with the mesh): connections/s and the inverse
/// keep-alive p50 with 50k pods in the model against the empty model, eBPF (the model-size
/// dimension, [`super::sizes`]).
fn model_size_row(r: &Results) -> GoalRow {
    use super::sizes::{ratios_to_empty, LARGEST, TARGET_RATIO};
    let v = ratios_to_empty(r, DataPath::ZtunnelEbpf, LARGEST);
    let ours = match (v.connection_rate, v.inverse_p50) {
        (None, None) => "not measured".into(),
        (rate, p50) => format!("conn/s {}, 1 / p50 {}", fmt_ratio(rate), fmt_ratio(p50)),
    };
    GoalRow {
        target: format!(
            "3. connections/s and 1 / keep-alive p50 at {} pods ≥ {TARGET_RATIO} × the empty model",
            thousands(f64::from(LARGEST))
        ),
        ours,
        yardstick: "Istio's ztunnel: flat".into(),
        verdict: Verdict::of(&[v.meets_target()]),
    }
}

fn issue15_section(out: &mut String, r: &Results) {
    let _ = writeln!(
        out,
        "## Where we stand against each target (issue 15)\n\n\
         Each a ratio or a difference within this run. L4 is ztunnel with eBPF redirection \
         (nftables's figures are in the table above); the waypoint's rows come from the \
         tables in \"The waypoint against the L4 path under it\" and the increments under \
         the fixed-rate latencies.\n"
    );
    let _ = writeln!(
        out,
        "| target | ours | yardstick | verdict |\n|---|---|---|---|"
    );
    for row in issue15_targets(r) {
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            row.target,
            row.ours,
            row.yardstick,
            row.verdict.label_of_measures()
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
    increment(r, path, DataPath::Direct, metric)
}

/// median(path) − median(under): what `path` adds to the path under it.
fn increment(r: &Results, path: DataPath, under: DataPath, metric: Metric) -> Option<f64> {
    Some(r.median(path, metric)? - r.median(under, metric)?)
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
    back_within(r, path, |idle| {
        (idle * NEAR_IDLE_FRACTION).max(NEAR_IDLE_MIB)
    })
}

/// (worst MiB above idle after close, whether every side is within `slack(idle MiB)` MiB of
/// its idle RSS).
fn back_within(r: &Results, path: DataPath, slack: impl Fn(f64) -> f64) -> Option<(f64, bool)> {
    let mut worst: Option<(f64, bool)> = None;
    for side in Side::BOTH {
        let (Some(idle), Some(after)) = (
            r.median(path, Metric::RssIdle { side }),
            r.median(path, Metric::RssAfterClose { side }),
        ) else {
            continue;
        };
        let above = after - idle;
        let near = above <= slack(idle);
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
        Side::Waypoint => "wp",
        Side::Ingress => "gw",
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

pub(super) fn fmt_spread(s: Spread) -> String {
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

    /// A run of the HTTP paths as issue 15 reads it: the waypoint over the L4 eBPF path,
    /// nginx over direct.
    fn waypoint_results() -> Results {
        let mut r = Results::default();
        let (wp, l4, nginx, direct) = (
            DataPath::Waypoint,
            DataPath::ZtunnelEbpf,
            DataPath::NginxHttp,
            DataPath::Direct,
        );
        for rate in [1_000, 5_000] {
            for (q, values) in [
                // direct, nginx, L4, waypoint
                (Quantile::P50, [30.0, 80.0, 200.0, 250.0]),
                (Quantile::P99, [60.0, 150.0, 900.0, 1_100.0]),
            ] {
                let m = Metric::FixedRateLatency { rate, q };
                for (path, v) in [direct, nginx, l4, wp].into_iter().zip(values) {
                    r.record(path, m, 0, v);
                }
            }
        }
        // 1 connection: 0.8 of L4; 16: 0.5.
        for (conns, l4_rps, wp_rps) in [(1, 5_000.0, 4_000.0), (16, 20_000.0, 10_000.0)] {
            let m = Metric::SaturationRate { conns };
            r.record(l4, m, 0, l4_rps);
            r.record(wp, m, 0, wp_rps);
            r.record(direct, m, 0, 40_000.0);
            r.record(nginx, m, 0, 30_000.0);
        }
        let h2 = Metric::Http2Streams {
            streams: H2_STREAMS,
        };
        for (rep, (l4_rps, wp_rps)) in [(30_000.0, 24_000.0), (32_000.0, 21_000.0)]
            .into_iter()
            .enumerate()
        {
            r.record(l4, h2, rep, l4_rps);
            r.record(wp, h2, rep, wp_rps);
        }
        // The waypoint process alone against nginx; node 2's agent is not the waypoint.
        for (side, v) in [
            (Side::Client, 0.3),
            (Side::Server, 5.0),
            (Side::Waypoint, 0.9),
        ] {
            r.record(wp, Metric::CpuPer10kRequests { side }, 0, v);
        }
        r.record(
            nginx,
            Metric::CpuPer10kRequests { side: Side::Client },
            0,
            1.0,
        );
        for (conns, wp_cpu, nginx_cpu) in [(1, 0.5, 0.6), (16, 0.7, 0.4)] {
            let m = |side| Metric::SaturationCpuPer10k { conns, side };
            r.record(wp, m(Side::Waypoint), 0, wp_cpu);
            r.record(wp, m(Side::Server), 0, 9.0);
            r.record(nginx, m(Side::Client), 0, nginx_cpu);
        }
        r
    }

    fn goal(rows: &[GoalRow], prefix: &str) -> GoalRow {
        rows.iter()
            .find(|row| row.target.starts_with(prefix))
            .unwrap_or_else(|| panic!("no target {prefix}: {rows:?}"))
            .clone()
    }

    #[test]
    fn the_waypoint_is_judged_against_the_l4_path_under_it() {
        let rows = issue15_targets(&waypoint_results());
        let c1 = goal(
            &rows,
            "1. waypoint saturation req/s ≥ 0.75 × L4, 1 connection",
        );
        assert_eq!((c1.ours.as_str(), c1.verdict), ("0.80×", Verdict::Met));
        assert_eq!(c1.yardstick, "nginx ÷ direct 0.75×");
        let c16 = goal(
            &rows,
            "1. waypoint saturation req/s ≥ 0.75 × L4, 16 connections",
        );
        assert_eq!((c16.ours.as_str(), c16.verdict), ("0.50×", Verdict::NotMet));
        // Increments: 250 − 200 at p50, 1,100 − 900 at p99; nginx 80 − 30, 150 − 60.
        let p50 = goal(
            &rows,
            "1. waypoint increment over L4 at 1,000 req/s, p50 ≤ +60 µs",
        );
        assert_eq!((p50.ours.as_str(), p50.verdict), ("+50.0 µs", Verdict::Met));
        assert_eq!(p50.yardstick, "nginx over direct +50.0 µs");
        let p99 = goal(
            &rows,
            "1. waypoint increment over L4 at 1,000 req/s, p99 ≤ +150 µs",
        );
        assert_eq!(
            (p99.ours.as_str(), p99.verdict),
            ("+200 µs", Verdict::NotMet)
        );
        // The waypoint's own CPU (not node 2's agent): 0.9 ≤ 1.0 and 0.5 ≤ 0.6, 0.7 > 0.4.
        let cpu = goal(&rows, "1. CPU per request of the waypoint process");
        assert_eq!(cpu.verdict, Verdict::Partly);
        assert_eq!(cpu.ours, "0.900 / 0.500 / 0.700 CPU-s/10k req");
        assert_eq!(cpu.yardstick, "nginx 1.00 / 0.600 / 0.400");
        // Medians over repetitions: 22,500 / 31,000.
        let h2 = goal(&rows, "1. one HTTP/2 connection, 100 streams");
        assert_eq!((h2.ours.as_str(), h2.verdict), ("0.73×", Verdict::Met));
        assert_eq!(h2.yardstick, "L4 31,000 req/s");
        // Nothing measured for the L4 targets and the model's size.
        assert_eq!(goal(&rows, "2. L4 ahead").verdict, Verdict::NoData);
        let model = goal(&rows, "3. ");
        assert_eq!(
            (model.ours.as_str(), model.verdict),
            ("not measured", Verdict::NoData)
        );
    }

    #[test]
    fn the_report_shows_increments_and_the_waypoint_table() {
        let md = render(&waypoint_results(), None);
        assert!(
            md.contains(
                "| waypoint increment over L4 (waypoint − ztunnel L4, eBPF) | +50.0 µs | +200 µs | +50.0 µs | +200 µs |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| nginx increment over direct (nginx − direct) | +50.0 µs | +90.0 µs |"),
            "{md}"
        );
        assert!(
            md.contains("| saturation req/s, 1 wrk connection | 4,000 | 5,000 (L4 eBPF) | 0.80× | ≥ 0.75× |"),
            "{md}"
        );
        assert!(
            md.contains(
                "| req/s, one HTTP/2 connection, 100 streams | 22,500 (21,000–24,000) | 31,000 (30,000–32,000) (L4 eBPF) | 0.73× | ≥ 0.70× |"
            ),
            "{md}"
        );
        assert!(
            md.contains("| CPU-s/10k req of the process, 1,000 req/s | 0.900 | 1.00 (nginx) | 0.90× | ≤ 1.00× |"),
            "{md}"
        );
        assert!(md.contains("## Where we stand against each target (issue 15)"));
        assert!(md.contains("| **partly** |"), "{md}");
        // The CPU table's sums over the waypoint path count the waypoint process too.
        assert_eq!(
            r_sum(
                &waypoint_results(),
                Metric::CpuPer10kRequests { side: Side::Client }
            ),
            Some(6.2)
        );
    }

    /// [`waypoint_results`] plus the ingress gateway: slower than nginx, its CPU split between
    /// the gateway and node 2's agent.
    fn ingress_results() -> Results {
        let mut r = waypoint_results();
        let p = DataPath::Ingress;
        for rate in [1_000, 5_000] {
            // Against direct 30 / 60 and nginx 80 / 150.
            for (q, v) in [(Quantile::P50, 120.0), (Quantile::P99, 300.0)] {
                r.record(p, Metric::FixedRateLatency { rate, q }, 0, v);
            }
        }
        // nginx: 30,000 req/s on both.
        for (conns, rps) in [(1, 6_000.0), (16, 15_000.0)] {
            r.record(p, Metric::SaturationRate { conns }, 0, rps);
        }
        let cpu = |side| Metric::CpuPer10kRequests { side };
        r.record(p, cpu(Side::Ingress), 0, 0.8);
        r.record(p, cpu(Side::Server), 0, 0.2);
        for (conns, gw, n2) in [(1, 0.9, 0.3), (16, 0.6, 0.2)] {
            let m = |side| Metric::SaturationCpuPer10k { conns, side };
            r.record(p, m(Side::Ingress), 0, gw);
            r.record(p, m(Side::Server), 0, n2);
        }
        let idle = |side| Metric::RssIdle { side };
        r.record(p, idle(Side::Ingress), 0, 12.0);
        r.record(p, idle(Side::Server), 0, 16.0);
        r.record(DataPath::NginxHttp, idle(Side::Client), 0, 6.0);
        r
    }

    #[test]
    fn the_ingress_is_shown_beside_nginx() {
        let r = ingress_results();
        let md = render(&r, None);
        let has = |line: &str| assert!(md.contains(line), "missing {line:?} in\n{md}");
        // Prose wrapped in the source stays one line of single spaces.
        for line in md.lines().filter(|l| l.contains("ingress")) {
            assert!(!line.contains("  "), "a run of spaces in {line:?}");
        }
        has("- **ingress gateway (L7)**: a client outside the mesh");
        // The HTTP tables: × base is against nginx (120 / 80, 300 / 150; 6,000 / 30,000).
        has("| ingress gateway (L7) | 120 | — | 300 | +90.0 µs | 1.50× | +240 µs | 2.00× | — |");
        has("| ingress gateway (L7) | 6,000 | 0.15× | 0.20× |");
        // Its increment over direct next to nginx's.
        has("| nginx increment over direct (nginx − direct) | +50.0 µs | +90.0 µs | +50.0 µs | +90.0 µs |\n\
             | ingress increment over direct (ingress gateway − direct) | +90.0 µs | +240 µs | +90.0 µs | +240 µs |");
        // Its own section: the gateway alone and with node 2's agent, against nginx.
        has("## The ingress gateway against nginx");
        has("| saturation req/s, 16 wrk connections | 15,000 | 30,000 | 0.50× |");
        has("| p50 µs at 1,000 req/s | 120 | 80.0 | 1.50× |");
        has("| CPU-s/10k req, 1,000 req/s: the gateway | 0.800 | 1.00 | 0.80× |");
        has("| CPU-s/10k req, 1,000 req/s: the gateway + n2's agent | 1.00 | 1.00 | 1.00× |");
        has("| CPU-s/10k req, saturation, 1 connection: the gateway + n2's agent | 1.20 | 0.600 | 2.00× |");
        has("| RSS MiB after the HTTP runs: the gateway | 12.0 | 6.00 | 2.00× |");
        has("| RSS MiB after the HTTP runs: the gateway + n2's agent | 28.0 | 6.00 | 4.67× |");
        // The CPU table: n2 and gw columns, summed against nginx.
        has("| ingress gateway (L7) | — | — | — | — | — | 0.200 | — | 0.800 | 1.00× | — |");
        // The L7 memory table.
        has("| nginx HTTP proxy (L7 baseline) | 6.00 | — | — | — | 6.00 | (base) | — |");
        has("| ingress gateway (L7) | — | 16.0 | — | 12.0 | 28.0 | 4.67× | — |");
        // The verdict table: ratios against nginx, no target.
        let row = targets(&r)
            .into_iter()
            .find(|row| row.target.starts_with("ingress gateway vs"))
            .expect("the ingress row");
        assert_eq!(row.verdict, Verdict::NoTarget);
        assert_eq!(
            row.ebpf,
            "ahead on 1 of 7; behind: p50 @1,000 (0.67×), p99 @1,000 (0.50×), p50 @5,000 \
             (0.67×), p99 @5,000 (0.50×), saturation req/s c1 (0.20×), saturation req/s c16 \
             (0.50×)"
        );
        has("| ingress gateway vs the nginx L7 baseline (ratios only) | — | ahead on 1 of 7;");
        has("| — (no target; for reference) |");
        // Without ingress samples the row says so.
        let none = targets(&waypoint_results())
            .into_iter()
            .find(|row| row.target.starts_with("ingress gateway vs"))
            .expect("the ingress row");
        assert_eq!(
            (none.ebpf.as_str(), none.verdict),
            ("no data", Verdict::NoData)
        );
    }

    fn r_sum(r: &Results, m: Metric) -> Option<f64> {
        r.spread_both_sides(DataPath::Waypoint, m)
            .map(|s| (s.median * 10.0).round() / 10.0)
    }

    #[test]
    fn the_l4_targets_of_issue_15_are_stricter_on_memory() {
        let mut r = sample_results();
        let p = DataPath::ZtunnelEbpf;
        for side in Side::BOTH {
            r.record(p, Metric::RssIdle { side }, 0, 10.0);
            r.record(p, Metric::CpuPerGb { side }, 0, 0.5);
        }
        // 4 MiB above idle: within issue 15's 5 MiB, not within issue 4's 2 MiB (or 10 %).
        r.record(p, Metric::RssAfterClose { side: Side::Client }, 0, 14.0);
        r.record(p, Metric::RssAfterClose { side: Side::Server }, 0, 11.0);
        let rows = issue15_targets(&r);
        let rss = goal(&rows, "2. RSS back within 5 MiB");
        assert_eq!(rss.verdict, Verdict::Met);
        assert!(rss.ours.starts_with("4.00 MiB"), "{}", rss.ours);
        assert_eq!(back_to_idle(&r, p), Some((4.0, false)));
        assert_eq!(goal(&rows, "2. ≤ 0.6 CPU-s/GB").verdict, Verdict::Met);
        let kib = goal(&rows, "2. ≤ 4 KiB");
        assert_eq!(
            (kib.ours.as_str(), kib.verdict),
            ("3.00 KiB (worst side)", Verdict::Met)
        );
        assert_eq!(kib.yardstick, "haproxy 20.0 KiB (worst side)");
        // eBPF against haproxy: ahead on throughput, p50, KiB/conn.
        let haproxy = goal(
            &rows,
            "2. L4 ahead of the haproxy mTLS pair on all 12 measures",
        );
        assert_eq!(haproxy.verdict, Verdict::Met, "{}", haproxy.ours);
        assert_eq!(goal(&rows, "4. eBPF").verdict, Verdict::Met);
    }

    #[test]
    fn results_from_before_issue_15_still_render() {
        // A run kept before the waypoint had its own side: its process counted on node 2.
        let old = r#"{"meta":{"machine":"m","date":"d","commit":"c","quick":true,"reps":1,
            "run_secs":1.0,"idle_connections":10,"tools":[],"notes":[]},
            "samples":[
              {"path":"Waypoint","metric":{"CpuPer10kRequests":{"side":"Server"}},"rep":0,"value":1.5},
              {"path":"Waypoint","metric":{"SaturationRate":{"conns":1}},"rep":0,"value":2000.0},
              {"path":"ZtunnelEbpf","metric":{"SaturationRate":{"conns":1}},"rep":0,"value":4000.0}
            ]}"#;
        let r: Results = serde_json::from_str(old).expect("old JSON");
        let md = render(&r, None);
        let rows = issue15_targets(&r);
        assert_eq!(
            goal(&rows, "1. waypoint saturation req/s ≥ 0.75 × L4, 1").ours,
            "0.50×"
        );
        assert_eq!(goal(&rows, "1. CPU per request").verdict, Verdict::NoData);
        assert_eq!(goal(&rows, "1. one HTTP/2").verdict, Verdict::NoData);
        assert!(
            md.contains(
                "| 3. connections/s and 1 / keep-alive p50 at 50,000 pods ≥ 0.95 × the empty \
                 model | not measured |"
            ),
            "{md}"
        );
    }
}
