//! The model-size dimension (issue 15, target 3): the same ztunnel world measured with the
//! model holding, besides the measured pair, nothing ("empty"), 10,000 or 50,000 pods on
//! other nodes ([`mesh_model::synthetic::BigMesh`]: one Service per 10 pods, 1,000
//! AuthorizationPolicies that select nothing). A connection's cost must not grow with the
//! mesh: each measure is compared with the empty model's.
//!
//! Per size: new connections/s through a Service VIP (a Service selecting the server pod, no
//! waypoint), keep-alive latency at 1,000 req/s over one connection through that VIP, each
//! agent's RSS with the model loaded and idle, and, per agent, the time from its restart to
//! `/healthz/ready` answering 200 (what the harness waits on: the first config loaded and
//! every local pod enrolled) and to the first request carried through it.
//!
//! One world at a time (build, measure, drop) bounds memory and keeps an idle big world's
//! config polling off the others' measures; repetitions interleave the sizes, in a rotating
//! order, so that a noisy neighbour hits every size alike.
//!
//! Pure parts first (plan, ratios, the report section; unit-tested), then the measuring IO.

use std::fmt::Write;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_model::synthetic::BigMesh;

use super::load::{self, FixedRate};
use super::model::{DataPath, Metric, Quantile, Results, Side};
use super::procstat::group_usage;
use super::report::{fmt_spread, thousands};
use super::run::{
    first_success, measured_pair, say_line, World, CLIENT, CONN_WORKERS, EVERY_ATTEMPT, HTTP_PORT,
    MIB, SETTLE,
};
use super::signals::Stop;
use super::stats::{percentiles_us, Spread};
use crate::{Mesh, Redirect, Service};

/// The size every other is compared with: no pods besides the measured pair.
pub const EMPTY: u32 = 0;
/// The size the issue's target is judged at.
pub const LARGEST: u32 = 50_000;
/// Target 3: at [`LARGEST`], connections/s and 1 / keep-alive p50 at least this fraction of
/// the empty model's.
pub const TARGET_RATIO: f64 = 0.95;
/// The keep-alive fixed rate, req/s, over one connection.
pub const RATE: u32 = 1_000;

/// The VIP of the Service selecting the server pod (no waypoint), and its port.
const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
const VIP_PORT: u16 = 80;
/// Bound on an agent loading the largest model and reporting ready.
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// Pause between readiness polls while timing a start.
const READY_POLL: Duration = Duration::from_millis(2);

/// Sizes, repetitions and durations of the dimension.
#[derive(Clone, Debug, PartialEq)]
pub struct SizePlan {
    /// Pods besides the measured pair; the first is the reference.
    pub sizes: &'static [u32],
    pub reps: usize,
    /// Seconds of each connection-rate and fixed-rate run.
    pub run_secs: u64,
    /// The uncounted start of a fixed-rate run.
    pub warmup: Duration,
}

impl SizePlan {
    /// `--quick`: the empty model against 10,000 pods.
    pub const QUICK: SizePlan = SizePlan {
        sizes: &[EMPTY, 10_000],
        reps: 2,
        run_secs: 1,
        warmup: Duration::from_millis(200),
    };
    pub const FULL: SizePlan = SizePlan {
        sizes: &[EMPTY, 10_000, LARGEST],
        reps: 3,
        run_secs: 3,
        warmup: Duration::from_millis(500),
    };

    pub fn of(quick: bool) -> SizePlan {
        if quick {
            SizePlan::QUICK
        } else {
            SizePlan::FULL
        }
    }

    /// The sizes in repetition `rep`'s order: rotated by one each repetition.
    pub fn order(&self, rep: usize) -> Vec<u32> {
        let mut sizes = self.sizes.to_vec();
        if !sizes.is_empty() {
            let n = rep % sizes.len();
            sizes.rotate_left(n);
        }
        sizes
    }
}

/// The mesh added around the measured pair at `pods`; none for the empty model.
pub fn big_mesh(pods: u32) -> Option<BigMesh> {
    (pods > EMPTY).then(|| BigMesh::new(pods))
}

// === ratios and the report section ===

/// One size's measures divided by the empty model's (medians over repetitions), each
/// oriented so that 1 is "as cheap as empty" and lower is worse.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SizeRatios {
    pub pods: u32,
    /// conn/s(size) / conn/s(empty).
    pub connection_rate: Option<f64>,
    /// p50(empty) / p50(size): the inverse keep-alive p50.
    pub inverse_p50: Option<f64>,
    /// p99(empty) / p99(size).
    pub inverse_p99: Option<f64>,
    /// RSS(empty) / RSS(size), both agents summed.
    pub inverse_rss: Option<f64>,
    /// ready(empty) / ready(size), the client side's agent.
    pub inverse_time_to_ready: Option<f64>,
}

impl SizeRatios {
    /// Target 3's verdict at this size: both the rate and the inverse p50 at least
    /// [`TARGET_RATIO`]; `None` without both.
    pub fn meets_target(&self) -> Option<bool> {
        Some(self.connection_rate? >= TARGET_RATIO && self.inverse_p50? >= TARGET_RATIO)
    }
}

fn p(pods: u32, q: Quantile) -> Metric {
    Metric::SizeLatency { pods, q }
}

/// Median over repetitions of both agents' RSS summed per repetition.
fn rss_both(r: &Results, path: DataPath, pods: u32) -> Option<Spread> {
    let per_rep = |side| {
        r.samples
            .iter()
            .filter(move |s| s.path == path && s.metric == Metric::SizeRss { pods, side })
    };
    let sums: Vec<f64> = per_rep(Side::Client)
        .filter_map(|c| {
            per_rep(Side::Server)
                .find(|s| s.rep == c.rep)
                .map(|s| s.value + c.value)
        })
        .collect();
    Spread::of(&sums)
}

/// `pods`' measures against the empty model's on `path` (e.g. [`LARGEST`] for the verdict).
pub fn ratios_to_empty(r: &Results, path: DataPath, pods: u32) -> SizeRatios {
    let higher = |m: fn(u32) -> Metric| Some(r.median(path, m(pods))? / r.median(path, m(EMPTY))?);
    let lower = |m: fn(u32) -> Metric| Some(r.median(path, m(EMPTY))? / r.median(path, m(pods))?);
    let rss = || Some(rss_both(r, path, EMPTY)?.median / rss_both(r, path, pods)?.median);
    SizeRatios {
        pods,
        connection_rate: higher(|pods| Metric::SizeConnectionRate { pods }),
        inverse_p50: lower(|pods| p(pods, Quantile::P50)),
        inverse_p99: lower(|pods| p(pods, Quantile::P99)),
        inverse_rss: rss(),
        inverse_time_to_ready: lower(|pods| Metric::SizeTimeToReady {
            pods,
            side: Side::Client,
        }),
    }
}

/// The sizes measured on `path`, ascending.
pub fn sizes_measured(r: &Results, path: DataPath) -> Vec<u32> {
    let mut sizes: Vec<u32> = r
        .samples
        .iter()
        .filter(|s| s.path == path)
        .filter_map(|s| match s.metric {
            Metric::SizeConnectionRate { pods }
            | Metric::SizeLatency { pods, .. }
            | Metric::SizeRss { pods, .. }
            | Metric::SizeTimeToReady { pods, .. }
            | Metric::SizeFirstRequest { pods, .. } => Some(pods),
            _ => None,
        })
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    sizes
}

/// "Model size (issue 15, target 3)": one table per backend measured; nothing for a run
/// (or an older JSON) without the dimension.
pub fn section(out: &mut String, r: &Results) {
    let paths: Vec<DataPath> = DataPath::ALL
        .into_iter()
        .filter(|&path| !sizes_measured(r, path).is_empty())
        .collect();
    if paths.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "## Model size (issue 15, target 3)\n\n\
         The ztunnel world again, one world per size at a time, its model holding besides the \
         measured pair N pods on 100 other nodes in 50 namespaces, one Service per 10 pods and \
         1,000 AuthorizationPolicies that select nothing (`mesh_model::synthetic::BigMesh`). \
         **conn/s**: new connections through a Service VIP selecting the server (no \
         waypoint), as in the connection-rate table; **p50/p99**: keep-alive latency at \
         {} req/s over one connection through the VIP; **RSS**: each agent idle with the \
         model loaded; **ready**: from an agent's restart (the old one killed, its pods left \
         captured) to `/healthz/ready` answering 200 (model loaded, pods enrolled); **first \
         request**: to the first request carried through it (a new GET every 5 ms). `× empty` is oriented so that below 1 is worse (for p50 and RSS: \
         empty's value over this size's). Target: ≥ {TARGET_RATIO}× at {} pods for conn/s \
         and p50.\n",
        thousands(f64::from(RATE)),
        thousands(f64::from(LARGEST)),
    );
    for path in paths {
        size_table(out, r, path);
    }
}

fn size_table(out: &mut String, r: &Results, path: DataPath) {
    let _ = writeln!(
        out,
        "{}:\n\n\
         | pods (Services) | conn/s | × empty | p50 µs | × empty | p99 µs | RSS MiB n1 / n2 | \
         × empty | ready ms n1 / n2 | first request ms n1 / n2 |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        path.label()
    );
    let cell = |m: Metric| {
        r.spread(path, m)
            .map(fmt_spread)
            .unwrap_or_else(|| "—".into())
    };
    let pair = |m: &dyn Fn(Side) -> Metric| {
        format!("{} / {}", cell(m(Side::Client)), cell(m(Side::Server)))
    };
    let ratio = |v: Option<f64>| v.map_or_else(|| "—".into(), |v| format!("{v:.2}×"));
    for pods in sizes_measured(r, path) {
        let ratios = ratios_to_empty(r, path, pods);
        let services = big_mesh(pods).map_or(0, |m| m.services());
        let _ = writeln!(
            out,
            "| {} ({}) | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            thousands(f64::from(pods)),
            thousands(f64::from(services)),
            cell(Metric::SizeConnectionRate { pods }),
            ratio(ratios.connection_rate),
            cell(p(pods, Quantile::P50)),
            ratio(ratios.inverse_p50),
            cell(p(pods, Quantile::P99)),
            pair(&|side| Metric::SizeRss { pods, side }),
            ratio(ratios.inverse_rss),
            pair(&|side| Metric::SizeTimeToReady { pods, side }),
            pair(&|side| Metric::SizeFirstRequest { pods, side }),
        );
    }
    let largest = ratios_to_empty(r, path, LARGEST);
    let verdict = match largest.meets_target() {
        Some(true) => "**met**",
        Some(false) => "**not met**",
        None => "not judged (no data at that size)",
    };
    let _ = writeln!(
        out,
        "\nTarget 3 at {} pods: conn/s {}, 1 / p50 {} of the empty model's (≥ {TARGET_RATIO}×): \
         {verdict}.\n",
        thousands(f64::from(LARGEST)),
        ratio(largest.connection_rate),
        ratio(largest.inverse_p50),
    );
}

// === measuring ===

/// Measures every size of `plan` on `backend`'s world, repetitions interleaved, into
/// `results`. A size that cannot be built or measured is noted and the rest goes on; only a
/// stop request ends it early.
pub fn measure(
    results: &mut Results,
    plan: &SizePlan,
    backend: Redirect,
    nofile: u64,
    stop: &Stop,
) -> Result<()> {
    let path = match backend {
        Redirect::Ebpf => DataPath::ZtunnelEbpf,
        _ => DataPath::ZtunnelNftables,
    };
    let mut files: Vec<(u32, Vec<(String, String)>)> = Vec::new();
    for &pods in plan.sizes {
        let t = Instant::now();
        let yaml = big_mesh(pods).map(|m| m.files()).unwrap_or_default();
        let bytes: usize = yaml.iter().map(|(_, text)| text.len()).sum();
        say_line(&format!(
            "model size {}: {:.1} MiB of YAML generated in {:.2} s",
            thousands(f64::from(pods)),
            bytes as f64 / MIB,
            t.elapsed().as_secs_f64()
        ));
        files.push((pods, yaml));
    }
    for rep in 0..plan.reps {
        for pods in plan.order(rep) {
            stop.check()?;
            let Some((_, yaml)) = files.iter().find(|(p, _)| *p == pods) else {
                continue;
            };
            let what = format!(
                "{}: model size {}, repetition {}",
                path.short(),
                thousands(f64::from(pods)),
                rep + 1
            );
            if let Err(e) =
                measure_size(results, path, backend, pods, yaml, rep, plan, nofile, stop)
            {
                stop.check()?;
                say_line(&format!("{what}: {e:#}"));
                results.meta.notes.push(format!("{what} failed: {e:#}"));
            }
        }
    }
    Ok(())
}

/// The measured pair, a Service VIP selecting the server, and the model's extra `yaml`.
fn topology(pods: u32, backend: Redirect, yaml: &[(String, String)]) -> crate::MeshBuilder {
    let mut builder = measured_pair(&format!("bench-size-{pods}"))
        .service(
            Service::new("default", "server-vip")
                .vip(&VIP.to_string())
                .named_port("http", VIP_PORT, HTTP_PORT)
                .selector([("app", "server")]),
        )
        .redirect(backend)
        .ready_timeout(READY_TIMEOUT);
    for (name, text) in yaml {
        builder = builder.yaml(name, text);
    }
    builder
}

#[allow(clippy::too_many_arguments)]
fn measure_size(
    r: &mut Results,
    path: DataPath,
    backend: Redirect,
    pods: u32,
    yaml: &[(String, String)],
    rep: usize,
    plan: &SizePlan,
    nofile: u64,
    stop: &Stop,
) -> Result<()> {
    let size = thousands(f64::from(pods));
    let t = Instant::now();
    let world = World::custom("model-size", topology(pods, backend, yaml), nofile)?;
    let built = t.elapsed();
    let mesh = world.mesh();
    let netns = mesh.pod_netns(CLIENT)?;
    let vip = SocketAddr::from((VIP, VIP_PORT));
    first_success(&netns, vip, Instant::now(), EVERY_ATTEMPT)?
        .context("the client never reached the server through the Service VIP")?;
    say_line(&format!(
        "  model size {size}: world built and carrying in {:.1} s",
        built.as_secs_f64()
    ));
    stop.check()?;

    // Idle, the model loaded.
    std::thread::sleep(SETTLE);
    let mut rss = Vec::new();
    for (side, node) in [(Side::Client, "n1"), (Side::Server, "n2")] {
        let pid = mesh
            .ztunnel_pid(node)
            .with_context(|| format!("ztunnel on {node} is not running"))?;
        let mib = group_usage(pid)?.rss_bytes as f64 / MIB;
        r.record(path, Metric::SizeRss { pods, side }, rep, mib);
        rss.push(mib);
    }
    stop.check()?;

    let run = Duration::from_secs(plan.run_secs);
    let c = load::connection_rate(&netns, vip, CONN_WORKERS, run)?;
    if c.completed == 0 || c.errors > 0 {
        bail!(
            "connection rate: {} completed, {} failed",
            c.completed,
            c.errors
        );
    }
    r.record(
        path,
        Metric::SizeConnectionRate { pods },
        rep,
        c.per_second(),
    );
    stop.check()?;

    let stream = mesh.connect(CLIENT, vip)?;
    let mut out = load::fixed_rate(
        vec![stream],
        FixedRate {
            rate: f64::from(RATE),
            duration: run,
            warmup: plan.warmup,
        },
    )?;
    if out.errors > 0 || out.non_200 > 0 {
        bail!(
            "{RATE} req/s: {} broken connections, {} non-200 responses",
            out.errors,
            out.non_200
        );
    }
    let lat = percentiles_us(&mut out.latencies_ns).context("no request completed")?;
    for q in Quantile::ALL {
        r.record(path, p(pods, q), rep, q.of(&lat));
    }
    stop.check()?;

    let mut starts = Vec::new();
    for (side, node) in [(Side::Client, "n1"), (Side::Server, "n2")] {
        let (ready, first) = time_restart(mesh, node, &netns, vip)?;
        r.record(path, Metric::SizeTimeToReady { pods, side }, rep, ms(ready));
        r.record(
            path,
            Metric::SizeFirstRequest { pods, side },
            rep,
            ms(first),
        );
        starts.push(format!(
            "{node} ready {:.0} ms, first request {:.0} ms",
            ms(ready),
            ms(first)
        ));
        stop.check()?;
    }
    say_line(&format!(
        "  model size {size}: {:.0} conn/s, p50 {:.0} µs, p99 {:.0} µs, RSS {:.1} / {:.1} MiB, {}",
        c.per_second(),
        lat.p50,
        lat.p99,
        rss[0],
        rss[1],
        starts.join(", ")
    ));
    drop(world);
    Ok(())
}

/// Kills the agent on `node`, starts it again, and times from the start to `/healthz/ready`
/// answering 200 and to the first request from the client to `target` carried.
fn time_restart(
    mesh: &Mesh,
    node: &str,
    netns: &str,
    target: SocketAddr,
) -> Result<(Duration, Duration)> {
    // Killed, not stopped: a graceful stop drains the pooled HBONE connections for the
    // whole drain timeout (10 s). Either way the pods stay captured for the next agent.
    mesh.kill_ztunnel(node)?;
    let t0 = Instant::now();
    mesh.start_ztunnel_unready(node)?;
    let (ready, first) = std::thread::scope(|scope| {
        let ready = scope.spawn(|| {
            while t0.elapsed() < READY_TIMEOUT {
                if matches!(mesh.readiness_status(node), Ok(200)) {
                    return Some(t0.elapsed());
                }
                std::thread::sleep(READY_POLL);
            }
            None
        });
        let first = first_success(netns, target, t0, EVERY_ATTEMPT);
        (ready.join().ok().flatten(), first)
    });
    let ready = ready.with_context(|| {
        format!("ztunnel on {node} was not ready {READY_TIMEOUT:?} after its start")
    })?;
    let (first, _) =
        first?.with_context(|| format!("no request carried after ztunnel on {node} started"))?;
    Ok((ready, first))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::report::Verdict;

    /// Three repetitions of every measure at `sizes`, the cost growing by `grow` per 10,000
    /// pods (rates fall, latencies and memory rise).
    fn results(sizes: &[u32], grow: f64) -> Results {
        let mut r = Results::default();
        let path = DataPath::ZtunnelEbpf;
        for &pods in sizes {
            let f = 1.0 + grow * f64::from(pods) / 10_000.0;
            for (rep, jitter) in [1.0, 0.98, 1.02].into_iter().enumerate() {
                r.record(
                    path,
                    Metric::SizeConnectionRate { pods },
                    rep,
                    4_000.0 / f * jitter,
                );
                r.record(path, p(pods, Quantile::P50), rep, 100.0 * f * jitter);
                r.record(path, p(pods, Quantile::P99), rep, 300.0 * f * jitter);
                for (side, base) in [(Side::Client, 14.0), (Side::Server, 16.0)] {
                    r.record(path, Metric::SizeRss { pods, side }, rep, base * f);
                    r.record(path, Metric::SizeTimeToReady { pods, side }, rep, 50.0 * f);
                    r.record(path, Metric::SizeFirstRequest { pods, side }, rep, 60.0 * f);
                }
            }
        }
        r
    }

    #[test]
    fn ratios_are_oriented_so_that_below_one_is_worse() {
        let r = results(&[EMPTY, 10_000, LARGEST], 0.1);
        let path = DataPath::ZtunnelEbpf;
        let at = |pods| ratios_to_empty(&r, path, pods);
        let close = |v: Option<f64>, want: f64| (v.expect("ratio") - want).abs() < 1e-9;
        // 50k pods: every cost 1.5× the empty model's.
        let big = at(LARGEST);
        assert!(close(big.connection_rate, 1.0 / 1.5), "{big:?}");
        assert!(close(big.inverse_p50, 1.0 / 1.5), "{big:?}");
        assert!(close(big.inverse_p99, 1.0 / 1.5), "{big:?}");
        assert!(close(big.inverse_rss, 1.0 / 1.5), "{big:?}");
        assert!(close(big.inverse_time_to_ready, 1.0 / 1.5), "{big:?}");
        assert_eq!(big.meets_target(), Some(false));
        assert!(close(at(EMPTY).connection_rate, 1.0));
        assert_eq!(at(EMPTY).meets_target(), Some(true));
        // 10k pods: 1.1× the cost, below the 0.95 target.
        assert_eq!(at(10_000).meets_target(), Some(false));
        // A flat mesh meets it.
        let flat = results(&[EMPTY, LARGEST], 0.0);
        assert_eq!(
            ratios_to_empty(&flat, path, LARGEST).meets_target(),
            Some(true)
        );
        // Without the empty model, or on an unmeasured path, nothing is judged.
        let no_empty = results(&[LARGEST], 0.0);
        assert_eq!(
            ratios_to_empty(&no_empty, path, LARGEST).meets_target(),
            None
        );
        assert_eq!(
            ratios_to_empty(&r, DataPath::ZtunnelNftables, LARGEST),
            SizeRatios {
                pods: LARGEST,
                ..SizeRatios::default()
            }
        );
    }

    #[test]
    fn rss_is_summed_per_repetition_over_both_agents() {
        let mut r = Results::default();
        let path = DataPath::ZtunnelEbpf;
        let rss = |pods, side| Metric::SizeRss { pods, side };
        r.record(path, rss(EMPTY, Side::Client), 0, 10.0);
        r.record(path, rss(EMPTY, Side::Server), 0, 10.0);
        r.record(path, rss(LARGEST, Side::Client), 0, 30.0);
        r.record(path, rss(LARGEST, Side::Server), 0, 50.0);
        // A repetition with one side only does not count.
        r.record(path, rss(LARGEST, Side::Client), 1, 1.0);
        let ratios = ratios_to_empty(&r, path, LARGEST);
        assert_eq!(ratios.inverse_rss, Some(20.0 / 80.0));
    }

    #[test]
    fn the_section_has_one_row_per_size_and_the_verdict() {
        let r = results(&[EMPTY, 10_000, LARGEST], 0.1);
        let mut md = String::new();
        section(&mut md, &r);
        assert!(md.starts_with("## Model size (issue 15, target 3)"), "{md}");
        assert!(md.contains("ztunnel L4, eBPF:"), "{md}");
        // Empty: 4,000 conn/s (3,920–4,080), 1×; 50k: ÷1.5.
        assert!(
            md.contains("| 0 (0) | 4,000 (3,920–4,080) | 1.00× | 100 (98.0–102) | 1.00× |"),
            "{md}"
        );
        assert!(md.contains("| 10,000 (1,000) |"), "{md}");
        assert!(
            md.contains("| 50,000 (5,000) | 2,667 (2,613–2,720) | 0.67× | 150 (147–153) | 0.67× |"),
            "{md}"
        );
        // RSS per side, time to ready and first request per side.
        assert!(
            md.contains("| 21.0 / 24.0 | 0.67× | 75.0 / 75.0 | 90.0 / 90.0 |"),
            "{md}"
        );
        assert!(
            md.contains("Target 3 at 50,000 pods: conn/s 0.67×, 1 / p50 0.67×"),
            "{md}"
        );
        assert!(md.contains("**not met**"), "{md}");
        assert!(!md.contains("nftables"), "only the measured backend: {md}");

        let flat = results(&[EMPTY, LARGEST], 0.0);
        let mut md = String::new();
        section(&mut md, &flat);
        assert!(md.contains("**met**"), "{md}");

        // The quick plan has no 50k: its verdict says so.
        let quick = results(&[EMPTY, 10_000], 0.0);
        let mut md = String::new();
        section(&mut md, &quick);
        assert!(md.contains("not judged"), "{md}");
    }

    #[test]
    fn a_run_without_the_dimension_renders_as_before() {
        // An older run's JSON: no size metrics, and it still parses and renders.
        let old = r#"{"meta":{"machine":"m","date":"d","commit":"c","quick":true,"reps":1,
            "run_secs":1.0,"idle_connections":1,"tools":[],"notes":[]},
            "samples":[{"path":"ZtunnelEbpf","metric":"ConnectionRate","rep":0,"value":5.0}]}"#;
        let r: Results = serde_json::from_str(old).expect("old JSON parses");
        let mut md = String::new();
        section(&mut md, &r);
        assert_eq!(md, "");
        assert!(!super::super::report::render(&r, None).contains("Model size"));
        // The new metrics survive a round trip.
        let sized = results(&[EMPTY, LARGEST], 0.1);
        let text = serde_json::to_string(&sized).expect("serialise");
        let back: Results = serde_json::from_str(&text).expect("parse");
        assert_eq!(back, sized);
        assert!(super::super::report::render(&back, None).contains("## Model size"));
    }

    #[test]
    fn issue_15s_verdict_table_judges_target_3() {
        let row = |r: &Results| {
            super::super::report::issue15_targets(r)
                .into_iter()
                .find(|row| row.target.starts_with("3."))
                .expect("target 3's row")
        };
        let grows = row(&results(&[EMPTY, LARGEST], 0.1));
        assert_eq!(grows.verdict, Verdict::NotMet);
        assert_eq!(grows.ours, "conn/s 0.67×, 1 / p50 0.67×");
        assert_eq!(row(&results(&[EMPTY, LARGEST], 0.0)).verdict, Verdict::Met);
        let quick = row(&results(&[EMPTY, 10_000], 0.0));
        assert_eq!(
            (quick.verdict, quick.ours.as_str()),
            (Verdict::NoData, "not measured")
        );
    }

    #[test]
    fn plans_rotate_the_sizes_and_quick_is_smaller() {
        let (q, f) = (SizePlan::of(true), SizePlan::of(false));
        assert_eq!(f.sizes, &[EMPTY, 10_000, LARGEST]);
        assert_eq!(q.sizes[0], EMPTY);
        assert!(q.sizes.len() < f.sizes.len() && q.run_secs <= f.run_secs);
        assert_eq!(f.order(0), vec![EMPTY, 10_000, LARGEST]);
        assert_eq!(f.order(1), vec![10_000, LARGEST, EMPTY]);
        assert_eq!(f.order(3), f.order(0));
        // Rough budget per world: build and load (≤ 15 s at 50k), a settle, the two runs, two
        // restarts (≤ 5 s each); quick must stay small beside the rest of `--quick`.
        let budget = |p: &SizePlan| {
            (p.reps * p.sizes.len()) as f64 * (15.0 + 1.0 + 2.0 * p.run_secs as f64 + 10.0)
        };
        assert!(budget(&q) < 150.0, "quick: {} s", budget(&q));
        assert!(budget(&f) < 6.0 * 60.0, "full: {} s", budget(&f));
        assert!(big_mesh(EMPTY).is_none());
        assert_eq!(big_mesh(LARGEST).map(|m| m.services()), Some(5_000));
    }
}
