//! The soak: traffic through the mesh for minutes while the faults of a node agent's life
//! happen in a cycle, with every byte accounted for (`cargo xtask soak --minutes N`; a short
//! form runs in `cargo xtask test`).
//!
//! Topology: `default/client` on n1 (the source of all load), `default/a` and `default/b` on
//! n2 (mesh-echo). Policy always allows `a`; `b`'s flips allow → deny → allow.
//!
//! Load, for the whole run: [`STREAMS_A`] + [`STREAMS_B`] long-lived echo streams sending
//! pseudo-random bytes at a modest rate, and one bounded loop of short connections per
//! destination (connect, send a few KiB, half-close, read the echo). sha256 of every byte
//! sent and received, per connection. A stream that ends early (to `b` while it is denied)
//! is counted and another one opened [`REOPEN_AFTER`] later; each refused attempt counts.
//!
//! Faults, in a cycle: (1) n2's agent replaced as an upgrade does it today
//! ([`Mesh::restart_ztunnel_draining`]: SIGTERM, the old one drains what it holds, a new one
//! starts); (2) `b`'s policy flips; (3) certificates rotate all along (`--cert-ttl`, renewed at
//! half-life); (4) a bad document in the config directory (refused with a named error, the
//! last good model kept, counted in `mesh_config_rejections_total`); (5) n1's pod released and
//! enrolled again.
//!
//! Accounting, asserted at the end: every stream to `a` byte-exact; every short connection to
//! `a` byte-exact or refused before any byte came back during a restart gap; the refusals of
//! the restart gaps are exactly n1's `UF` refusals; the connections to `b` that failed during
//! its deny are exactly n2's `DENY` refusals plus its `REVOKED` closes, and n1's `UAEX`
//! refusals equal n2's `DENY`; the old agents exit once their connections end; each node's
//! agent is back at its quiet fd count (within [`FD_TOLERANCE`]) once pooled connections
//! expired; each agent's RSS stays flat after warm-up ([`RSS_SPREAD_MAX`],
//! [`RSS_TREND_MAX`]). The report goes to stdout and `target/soak-<backend>.txt`.
//!
//! `SOAK_MINUTES` (default 1, fractions allowed) sets the length; at least one whole cycle
//! runs whatever it says. `SOAK_FAULTS` (comma-separated: `restart`, `policy`, `bad-config`,
//! `reenroll`) chooses the faults; by default all but those [`KNOWN_BROKEN`] lists for the
//! backend, which the report names.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use e2e::{
    fd_count, in_netns, prom, rss_kib, wait_until, ChildGuard, Labelled, Mesh, Pod, Redirect,
};
use sha2::{Digest, Sha256};

/// Long-lived streams to `a` (always allowed) and to `b` (policy flips).
const STREAMS_A: usize = 6;
const STREAMS_B: usize = 2;
/// Each stream writes one chunk per period (~40 KiB/s per stream).
const CHUNK: usize = 4096;
const STREAM_PERIOD: Duration = Duration::from_millis(100);
/// Short connections: one per period per destination, 2–16 KiB each.
const SHORT_PERIOD: Duration = Duration::from_millis(250);
const SHORT_MIN: usize = 2 * 1024;
const SHORT_MAX: usize = 16 * 1024;
/// A stream to `b` that was cut or refused tries again after this.
const REOPEN_AFTER: Duration = Duration::from_millis(500);
const APP_PORT: u16 = 8080;
/// Certificate lifetime the agents ask the CA for: renewed every ~10 s.
const CERT_TTL: &str = "20s";
/// Inbound HBONE connections without streams close after this, so pooled connections are
/// gone soon after the load stops and fd counts can be compared with the quiet baseline.
const HBONE_IDLE: &str = "10s";
/// The old agent of a restart keeps serving what it holds for the whole run.
const DRAIN_MARGIN: Duration = Duration::from_secs(300);
/// How long each fault is held and how long the load runs undisturbed after it.
const HOLD: Duration = Duration::from_secs(3);
const SETTLE: Duration = Duration::from_secs(3);
/// Bounds on waits for the agents (config reloads, enrollment, readiness).
const APPLY: Duration = Duration::from_secs(15);
/// Waits at the end: draining agents exit, pooled connections expire.
const DRAINED: Duration = Duration::from_secs(30);
const IDLE_EXPIRED: Duration = Duration::from_secs(60);
/// fds an agent at rest may hold beyond its quiet baseline: its gRPC connection to the CA
/// (opened for a renewal, closed when idle) may be up in one count and down in the other.
const FD_TOLERANCE: usize = 1;
/// RSS sampling, and what "flat" means after warm-up: max − min of one process's samples,
/// and the mean of the last third minus the mean of the first third.
const RSS_EVERY: Duration = Duration::from_secs(2);
const RSS_WARMUP: Duration = Duration::from_secs(10);
const RSS_SPREAD_MAX: u64 = 16 * 1024 * 1024;
const RSS_TREND_MAX: i64 = 8 * 1024 * 1024;
/// A process's RSS series is judged only with at least this many samples after warm-up.
const RSS_MIN_SAMPLES: usize = 6;
const DENY_B: &str = "soak-deny-b.yaml";
const BAD_DOC: &str = "soak-bad.yaml";
const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
const REFUSED: &str = "mesh_connections_refused_total";
const REJECTED: &str = "mesh_config_rejections_total";
const RELOADS: &str = "mesh_config_reloads_total";

fn main() -> ExitCode {
    e2e::scenario::main(
        || Ok(NoSharedMesh),
        &[],
        &e2e::tests![allowed_traffic_stays_byte_exact_through_the_faults_of_an_agents_life],
    )
}

/// The soak builds its own mesh.
struct NoSharedMesh;

impl e2e::Suite for NoSharedMesh {}

// === the soak ===

fn allowed_traffic_stays_byte_exact_through_the_faults_of_an_agents_life() -> Result<()> {
    let minutes: f64 = match std::env::var("SOAK_MINUTES") {
        Ok(v) => v
            .parse()
            .ok()
            .filter(|m: &f64| m.is_finite() && *m > 0.0)
            .with_context(|| format!("SOAK_MINUTES={v:?}: expected a positive number"))?,
        Err(_) => 1.0,
    };
    let run_for = Duration::from_secs_f64(minutes * 60.0);
    let drain = format!("{}s", (run_for + DRAIN_MARGIN).as_secs());
    let mut mesh = Mesh::two_nodes("soak")
        .pod(
            Pod::new("default", "a")
                .on("n2")
                .service_account("a")
                .labels([("app", "a")]),
        )
        .pod(
            Pod::new("default", "b")
                .on("n2")
                .service_account("b")
                .labels([("app", "b")]),
        )
        .ztunnel_args([
            "--cert-ttl",
            CERT_TTL,
            "--hbone-idle-timeout",
            HBONE_IDLE,
            "--drain-timeout",
            &drain,
        ])
        .build()?;
    let backend = mesh.redirect().map_or("as configured", |r| r.as_str());
    let _a = mesh.spawn_echo("default/a", APP_PORT, "a")?;
    let _b = mesh.spawn_echo("default/b", APP_PORT, "b")?;
    let a = SocketAddr::new(mesh.pod_ip("default/a")?.into(), APP_PORT);
    let b = SocketAddr::new(mesh.pod_ip("default/b")?.into(), APP_PORT);

    // Quiet baselines, before any load.
    let n1 = mesh.ztunnel_pid("n1").context("n1's agent")?;
    let first_n2 = mesh.ztunnel_pid("n2").context("n2's agent")?;
    let fd_base = [("n1", fd_count(n1)?), ("n2", fd_count(first_n2)?)];
    let fd_base_kinds = [fd_kinds(n1), fd_kinds(first_n2)];

    let load = Arc::new(Load {
        client_ns: mesh.pod_netns("default/client")?,
        stop: AtomicBool::new(false),
        phase: AtomicU8::new(Phase::Steady as u8),
        events: Mutex::new(Vec::new()),
    });
    let rss = Arc::new(RssSampler::new(&[("n1", n1), ("n2", first_n2)]));
    let started = Instant::now();
    let mut workers = Vec::new();
    for i in 0..STREAMS_A + STREAMS_B {
        let (dest, to) = if i < STREAMS_A {
            (Dest::A, a)
        } else {
            (Dest::B, b)
        };
        let load = load.clone();
        let seed = 0x5eed_0000 + i as u64;
        workers.push(std::thread::spawn(move || load.streams(dest, to, seed)));
    }
    for (dest, to, seed) in [(Dest::A, a, 0xa11), (Dest::B, b, 0xb22)] {
        let load = load.clone();
        workers.push(std::thread::spawn(move || load.shorts(dest, to, seed)));
    }
    let sampler = {
        let (rss, load) = (rss.clone(), load.clone());
        std::thread::spawn(move || rss.run(&load))
    };

    let (enabled, skipped) = enabled_faults(mesh.redirect())?;
    let mut faults = Faults {
        enabled,
        ..Faults::default()
    };
    let cycle = run_cycles(&mut mesh, &load, &rss, &mut faults, started + run_for);
    save_logs(&mesh, backend);
    let loaded_for = started.elapsed();
    load.stop.store(true, Ordering::SeqCst);
    for w in workers {
        w.join()
            .map_err(|_| anyhow::anyhow!("a load thread panicked"))?;
    }
    let _ = sampler.join();
    let cycles = cycle?;

    // The old agents exit once the connections they drain have ended.
    let drained_from = Instant::now();
    for (pid, old) in &mut faults.draining {
        let exited = old.wait_timeout(DRAINED)?;
        ensure!(
            exited.is_some(),
            "n2's old agent (pid {pid}) still runs {DRAINED:?} after the load stopped"
        );
    }
    let old_exit = drained_from.elapsed();

    // Pooled connections expire; each node's agent is back at its quiet fd count.
    let current = [
        ("n1", mesh.ztunnel_pid("n1").context("n1's agent")?),
        ("n2", mesh.ztunnel_pid("n2").context("n2's agent")?),
    ];
    let idle_from = Instant::now();
    let fds_settled = wait_until("fd counts back at the baselines", IDLE_EXPIRED, || {
        Ok(current
            .iter()
            .zip(&fd_base)
            .all(|((_, pid), (_, base))| fd_count(*pid).is_ok_and(|n| n <= base + FD_TOLERANCE)))
    });
    let fd_end_kinds: Vec<_> = current.iter().map(|(_, pid)| fd_kinds(*pid)).collect();
    let fd_end: Vec<usize> = current
        .iter()
        .map(|(_, pid)| fd_count(*pid).unwrap_or(usize::MAX))
        .collect();
    let idle_wait = idle_from.elapsed();

    // The agents' own account.
    let n1_metrics = mesh.metrics("n1")?;
    let n2_metrics = mesh.metrics("n2")?;
    let uf = counter(
        &n1_metrics,
        REFUSED,
        &[("reporter", "source"), ("reason", "UF")],
    );
    let uaex = counter(
        &n1_metrics,
        REFUSED,
        &[("reporter", "source"), ("reason", "UAEX")],
    );
    let deny = faults.n2_deny_before + destination_denials(&n2_metrics);
    let n2_log = mesh.ztunnel_log("n2");
    let revoked: Vec<&str> = n2_log
        .lines()
        .filter(|l| {
            l.contains("connection complete")
                && (l.contains("flags=\"REVOKED\"") || l.contains("flags=REVOKED"))
        })
        .collect();
    let revoked_a = revoked.iter().filter(|l| l.contains("default/a")).count();
    let n1_rejections = counter(&n1_metrics, REJECTED, &[]);
    let n2_rejections = faults.n2_rejections_before + counter(&n2_metrics, REJECTED, &[]);

    let tally = Tally::of(&load.events.lock().unwrap_or_else(|e| e.into_inner()));
    let rss_report = rss.judge();
    let mut report = String::new();
    let _ = writeln!(
        report,
        "soak ({backend}): {loaded_for:.0?} of load, {cycles} fault cycles; {} restarts of n2's agent, {} policy flips of b, {} bad documents, {} re-enrollments of n1's pod, {} certificate rotations seen on n1 (TTL {CERT_TTL})",
        faults.restarts, faults.flips, faults.bad_docs, faults.reenrollments, faults.rotations()
    );
    let _ = writeln!(report, "faults in the cycle: {:?}", faults.enabled);
    for (fault, why) in &skipped {
        let _ = writeln!(
            report,
            "NOT INJECTED on this backend (known to fail today; SOAK_FAULTS names it to reproduce): {fault:?}: {why}"
        );
    }
    tally.write(&mut report);
    let _ = writeln!(
        report,
        "restart gaps: {} connections refused before any byte (a {}, b {}); n1 counted UF {uf}",
        tally.gap_refused(),
        tally.count(Dest::A, None, Outcome::Refused, Some(Phase::Restart)),
        tally.count(Dest::B, None, Outcome::Refused, Some(Phase::Restart)),
    );
    let _ = writeln!(
        report,
        "b while denied: {} failed (refused {}, cut {}); n2 counted DENY {deny} + REVOKED {} (of which to a: {revoked_a}); n1 counted UAEX {uaex}",
        tally.denied_failures(),
        tally.count(Dest::B, None, Outcome::Refused, Some(Phase::Policy)),
        tally.count(Dest::B, None, Outcome::Cut, Some(Phase::Policy)),
        revoked.len(),
    );
    let _ = writeln!(
        report,
        "config: {} bad documents refused, counted n1 {n1_rejections} / n2 {n2_rejections} in {REJECTED}",
        faults.bad_docs
    );
    let _ = writeln!(
        report,
        "old agents: {} exited {old_exit:.1?} after the load stopped",
        faults.draining.len()
    );
    for (i, (node, base)) in fd_base.iter().enumerate() {
        let _ = writeln!(
            report,
            "fds {node}: quiet baseline {base}, at rest after the load {} (pid {}; tolerance {FD_TOLERANCE}; waited {idle_wait:.1?})",
            fd_end[i], current[i].1
        );
        if fd_end[i] != *base {
            let _ = writeln!(
                report,
                "  by kind: baseline {:?}, at rest {:?}",
                fd_base_kinds[i], fd_end_kinds[i]
            );
        }
    }
    report.push_str(&rss_report.text);
    println!("{report}");
    let path = report_path(&format!("{backend}.txt"));
    if let Err(e) = std::fs::write(&path, &report) {
        eprintln!("soak: could not write {}: {e}", path.display());
    } else {
        println!("soak: report written to {}", path.display());
    }

    // === assertions ===
    ensure!(
        tally.a_failures() == 0,
        "traffic to a lost or corrupted bytes:\n{}",
        tally.a_failure_details()
    );
    ensure!(
        tally.count(Dest::A, Some(Kind::Stream), Outcome::Exact, None) == STREAMS_A,
        "every stream to a must end byte-exact:\n{report}"
    );
    ensure!(
        tally.unexplained() == 0,
        "{} connections failed outside a restart gap or b's deny:\n{}\nn1's last refusals:\n{}",
        tally.unexplained(),
        tally.unexplained_details(),
        refusals(&mesh.ztunnel_log("n1"), 20)
    );
    ensure!(
        tally.gap_refused() as u64 == uf,
        "the restart gaps refused {} connections but n1 counted {uf} UF",
        tally.gap_refused()
    );
    ensure!(
        tally.denied_failures() as u64 == deny + revoked.len() as u64,
        "{} connections to b failed while denied, n2 counted DENY {deny} + REVOKED {}",
        tally.denied_failures(),
        revoked.len()
    );
    ensure!(uaex == deny, "n1 counted UAEX {uaex}, n2 DENY {deny}");
    ensure!(revoked_a == 0, "connections to a were revoked");
    ensure!(
        n1_rejections == faults.bad_docs as u64 && n2_rejections == faults.bad_docs as u64,
        "{} bad documents; rejections counted n1 {n1_rejections}, n2 {n2_rejections}",
        faults.bad_docs
    );
    ensure!(
        faults.rotations() >= 2,
        "certificates rotated {} times",
        faults.rotations()
    );
    fds_settled.with_context(|| format!("fd counts {fd_end:?}, baselines {fd_base:?}"))?;
    ensure!(rss_report.flat, "RSS not flat:\n{}", rss_report.text);
    Ok(())
}

// === the fault cycle ===

/// The faults a cycle can inject (`SOAK_FAULTS`, comma-separated; all by default).
/// Certificate rotation is not among them: it runs all along.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Restart,
    Policy,
    BadConfig,
    Reenroll,
}

const ALL_FAULTS: [(&str, Fault); 4] = [
    ("restart", Fault::Restart),
    ("policy", Fault::Policy),
    ("bad-config", Fault::BadConfig),
    ("reenroll", Fault::Reenroll),
];

/// Faults today's agents do not yet survive on one backend, left out unless `SOAK_FAULTS`
/// names them: the fault, the backend and what goes wrong. Remove a line when it is fixed.
const KNOWN_BROKEN: [(Fault, Redirect, &str); 0] = [];

/// Known-broken faults left out of a run, with the reason.
type Skipped = Vec<(Fault, &'static str)>;

/// The faults to inject: those `SOAK_FAULTS` names when set, else all but the known-broken
/// ones of this backend (returned with the reason, for the report).
fn enabled_faults(backend: Option<Redirect>) -> Result<(BTreeSet<Fault>, Skipped)> {
    let Ok(list) = std::env::var("SOAK_FAULTS") else {
        let skipped: Skipped = KNOWN_BROKEN
            .iter()
            .filter(|(_, on, _)| backend == Some(*on))
            .map(|(f, _, why)| (*f, *why))
            .collect();
        let enabled = ALL_FAULTS
            .iter()
            .map(|(_, f)| *f)
            .filter(|f| !skipped.iter().any(|(s, _)| s == f))
            .collect();
        return Ok((enabled, skipped));
    };
    let enabled = list
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| {
            ALL_FAULTS
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, f)| *f)
                .with_context(|| {
                    format!("SOAK_FAULTS: unknown fault {name:?} (restart, policy, bad-config, reenroll)")
                })
        })
        .collect::<Result<_>>()?;
    Ok((enabled, Vec::new()))
}

/// Each agent's log (all processes of the node) next to the report, for a failed run.
fn save_logs(mesh: &Mesh, backend: &str) {
    for node in ["n1", "n2"] {
        let path = report_path(&format!("{backend}-{node}.log"));
        if let Err(e) = std::fs::write(&path, mesh.ztunnel_log(node)) {
            eprintln!("soak: could not write {}: {e}", path.display());
        }
    }
}

/// What the fault cycle did, and what it must remember across n2's restarts.
#[derive(Default)]
struct Faults {
    enabled: BTreeSet<Fault>,
    restarts: usize,
    flips: usize,
    bad_docs: usize,
    reenrollments: usize,
    /// n2's old agents, still draining (pid, process).
    draining: Vec<(u32, ChildGuard)>,
    /// Counters of n2's earlier agents (a restart starts them from zero).
    n2_deny_before: u64,
    n2_rejections_before: u64,
    /// Serials of `default/client`'s certificate seen on n1.
    serials: BTreeSet<String>,
}

impl Faults {
    fn rotations(&self) -> usize {
        self.serials.len().saturating_sub(1)
    }
}

/// Runs whole fault cycles until `until` (at least one); returns how many.
fn run_cycles(
    mesh: &mut Mesh,
    load: &Load,
    rss: &RssSampler,
    faults: &mut Faults,
    until: Instant,
) -> Result<usize> {
    let mut cycles = 0;
    loop {
        note_serial(mesh, faults);
        settle(mesh, load, faults);
        if faults.enabled.contains(&Fault::Restart) {
            restart_n2(mesh, load, rss, faults)?;
            settle(mesh, load, faults);
        }
        if faults.enabled.contains(&Fault::Policy) {
            flip_policy_of_b(mesh, load, faults)?;
            settle(mesh, load, faults);
        }
        if faults.enabled.contains(&Fault::BadConfig) {
            bad_document(mesh, load, faults)?;
            settle(mesh, load, faults);
        }
        if faults.enabled.contains(&Fault::Reenroll) {
            reenroll_n1(mesh, load, faults)?;
            settle(mesh, load, faults);
        }
        cycles += 1;
        if Instant::now() >= until {
            return Ok(cycles);
        }
    }
}

/// The load runs undisturbed for [`SETTLE`]; the client certificate's serial is noted.
fn settle(mesh: &Mesh, load: &Load, faults: &mut Faults) {
    load.set_phase(Phase::Steady);
    let end = Instant::now() + SETTLE;
    while Instant::now() < end {
        note_serial(mesh, faults);
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn note_serial(mesh: &Mesh, faults: &mut Faults) {
    if let Ok(serial) = client_serial(mesh) {
        faults.serials.insert(serial);
    }
}

/// (1) n2's agent replaced while the old one drains.
fn restart_n2(mesh: &Mesh, load: &Load, rss: &RssSampler, faults: &mut Faults) -> Result<()> {
    load.set_phase(Phase::Restart);
    let metrics = mesh.metrics("n2")?;
    let old_pid = mesh.ztunnel_pid("n2").context("n2's agent")?;
    let old = mesh.restart_ztunnel_draining("n2")?;
    // Its counters as they stood: b is allowed in this phase, so nothing adds to them.
    faults.n2_deny_before += destination_denials(&metrics);
    faults.n2_rejections_before += counter(&metrics, REJECTED, &[]);
    faults.draining.push((old_pid, old));
    faults.restarts += 1;
    let new_pid = mesh.ztunnel_pid("n2").context("n2's new agent")?;
    rss.track("n2", new_pid);
    // New connections reach the new agent before the gap is declared over.
    // (The probes are load like any other: counted, so n1's UF count stays comparable.)
    wait_until("a reachable through n2's new agent", APPLY, || {
        let probe = load.short(a_addr(mesh)?, 7, 1024);
        let exact = probe.outcome == Outcome::Exact;
        load.record(probe);
        Ok(exact)
    })
}

/// (2) b denied, then allowed again.
fn flip_policy_of_b(mesh: &Mesh, load: &Load, faults: &mut Faults) -> Result<()> {
    load.set_phase(Phase::Policy);
    let reloads = reload_counts(mesh)?;
    mesh.write_yaml(
        DENY_B,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: soak-deny-b\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: b\n",
    )?;
    wait_reloaded(mesh, reloads, "b's deny")?;
    std::thread::sleep(HOLD);
    let reloads = reload_counts(mesh)?;
    mesh.remove_yaml(DENY_B)?;
    wait_reloaded(mesh, reloads, "b allowed again")?;
    faults.flips += 1;
    Ok(())
}

/// (4) A document that does not validate: refused by both agents with a named error, the
/// last good model kept (the load says so); then removed.
fn bad_document(mesh: &Mesh, load: &Load, faults: &mut Faults) -> Result<()> {
    load.set_phase(Phase::BadConfig);
    let rejected =
        |node: &str| -> Result<f64> { Ok(prom::sum(&mesh.metrics(node)?, REJECTED, &[])) };
    let before = [rejected("n1")?, rejected("n2")?];
    mesh.write_yaml(
        BAD_DOC,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: soak-bad\n  namespace: default\nspec:\n  action: SOMETIMES\n",
    )?;
    wait_until("both agents refuse the bad document", APPLY, || {
        Ok(rejected("n1")? > before[0] && rejected("n2")? > before[1])
    })?;
    for node in ["n1", "n2"] {
        let log = mesh.ztunnel_log(node);
        ensure!(
            log.lines()
                .any(|l| l.contains("config rejected") && l.contains(BAD_DOC)),
            "{node} did not name {BAD_DOC} when refusing it"
        );
    }
    std::thread::sleep(HOLD);
    let reloads = reload_counts(mesh)?;
    mesh.remove_yaml(BAD_DOC)?;
    wait_reloaded(mesh, reloads, "the good config again")?;
    faults.bad_docs += 1;
    Ok(())
}

/// (5) n1's pod released (`dataplane-mode: none`) and enrolled again.
fn reenroll_n1(mesh: &mut Mesh, load: &Load, faults: &mut Faults) -> Result<()> {
    load.set_phase(Phase::Reenroll);
    let none = BTreeMap::from([(DATAPLANE_MODE.to_owned(), "none".to_owned())]);
    mesh.set_labels(Labelled::Pod("default/client"), none)?;
    wait_until("n1 releases default/client", APPLY, || {
        Ok(!enrolled(mesh, "n1")?.contains("default/client"))
    })?;
    std::thread::sleep(HOLD);
    mesh.set_labels(Labelled::Pod("default/client"), BTreeMap::new())?;
    wait_until("n1 enrolls default/client again", APPLY, || {
        Ok(enrolled(mesh, "n1")?.contains("default/client"))
    })?;
    mesh.wait_ready("n1")?;
    faults.reenrollments += 1;
    Ok(())
}

fn a_addr(mesh: &Mesh) -> Result<SocketAddr> {
    Ok(SocketAddr::new(mesh.pod_ip("default/a")?.into(), APP_PORT))
}

fn reload_counts(mesh: &Mesh) -> Result<[f64; 2]> {
    Ok([
        prom::sum(&mesh.metrics("n1")?, RELOADS, &[]),
        prom::sum(&mesh.metrics("n2")?, RELOADS, &[]),
    ])
}

fn wait_reloaded(mesh: &Mesh, before: [f64; 2], what: &str) -> Result<()> {
    wait_until(&format!("both agents load {what}"), APPLY, || {
        Ok(reload_counts(mesh)?
            .iter()
            .zip(before)
            .all(|(now, was)| *now > was))
    })
}

/// A counter's value summed over the samples with `labels`, as a count.
fn counter(metrics: &str, name: &str, labels: &[(&str, &str)]) -> u64 {
    // Counters are integers; an empty sum is -0.0.
    prom::sum(metrics, name, labels).max(0.0).round() as u64
}

fn destination_denials(metrics: &str) -> u64 {
    counter(
        metrics,
        REFUSED,
        &[("reporter", "destination"), ("reason", "DENY")],
    )
}

/// The pods the node's agent lists as enrolled in `/config_dump`.
fn enrolled(mesh: &Mesh, node: &str) -> Result<BTreeSet<String>> {
    let dump: serde_json::Value = serde_json::from_str(&mesh.admin(node, "/config_dump")?)?;
    Ok(dump["workloads"]
        .as_array()
        .context("/config_dump has no workloads")?
        .iter()
        .filter(|w| w["state"] == "enrolled")
        .filter_map(|w| w["pod"].as_str().map(str::to_owned))
        .collect())
}

/// The serial of `default/client`'s certificate on n1.
fn client_serial(mesh: &Mesh) -> Result<String> {
    let dump: serde_json::Value = serde_json::from_str(&mesh.admin("n1", "/config_dump")?)?;
    dump["certificates"]
        .as_array()
        .context("/config_dump has no certificates")?
        .iter()
        .find(|c| {
            c["identity"]
                .as_str()
                .is_some_and(|i| i.ends_with("/sa/client"))
        })
        .and_then(|c| c["serial"].as_str())
        .map(str::to_owned)
        .context("no certificate for default/client")
}

// === the load ===

/// Which fault is underway (set by the fault cycle, read by the load).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
enum Phase {
    Steady = 0,
    Restart = 1,
    Policy = 2,
    BadConfig = 3,
    Reenroll = 4,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::Restart,
            2 => Phase::Policy,
            3 => Phase::BadConfig,
            4 => Phase::Reenroll,
            _ => Phase::Steady,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Dest {
    A,
    B,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Stream,
    Short,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Everything sent came back, digests equal.
    Exact,
    /// Closed or reset before any byte came back.
    Refused,
    /// Some bytes came back, then the connection ended early.
    Cut,
    /// As many bytes came back as were sent, but not the same ones (or more).
    Corrupt,
}

/// One connection's account.
#[derive(Clone, Debug)]
struct Event {
    dest: Dest,
    kind: Kind,
    outcome: Outcome,
    /// The fault underway when it started, and when its outcome was known.
    phase: Phase,
    ended_in: Phase,
    sent: u64,
    received: u64,
    error: Option<String>,
}

impl Event {
    /// Whether the fault `phase` was underway when the connection started or ended: an
    /// outcome decided by an agent just before a phase ended can reach the client just after.
    fn during(&self, phase: Phase) -> bool {
        self.phase == phase || self.ended_in == phase
    }

    fn is_refused_or_cut(&self) -> bool {
        matches!(self.outcome, Outcome::Refused | Outcome::Cut)
    }
}

struct Load {
    client_ns: String,
    stop: AtomicBool,
    phase: AtomicU8,
    events: Mutex<Vec<Event>>,
}

impl Load {
    fn set_phase(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::SeqCst);
    }

    fn phase(&self) -> Phase {
        Phase::from_u8(self.phase.load(Ordering::SeqCst))
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    fn record(&self, event: Event) {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(event);
    }

    fn connect(&self, to: SocketAddr) -> Result<TcpStream> {
        let tcp = in_netns(&self.client_ns, move || {
            TcpStream::connect_timeout(&to, Duration::from_secs(5))
        })??;
        tcp.set_read_timeout(Some(Duration::from_secs(15)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(15)))?;
        Ok(tcp)
    }

    /// Long-lived streams to `to`, one at a time, until the load stops: a stream that ends
    /// early is recorded and another one opened.
    fn streams(&self, dest: Dest, to: SocketAddr, seed: u64) {
        let mut n = 0u64;
        while !self.stopped() {
            let event = self.stream(dest, to, seed.wrapping_mul(1000).wrapping_add(n));
            n += 1;
            let exact = event.outcome == Outcome::Exact;
            self.record(event);
            if !exact {
                std::thread::sleep(REOPEN_AFTER);
            }
        }
    }

    /// One stream: a writer thread sends a chunk per period until the load stops (then
    /// half-closes), this thread reads the echo to its end.
    fn stream(&self, dest: Dest, to: SocketAddr, seed: u64) -> Event {
        let mut event = Event {
            dest,
            kind: Kind::Stream,
            outcome: Outcome::Refused,
            phase: self.phase(),
            ended_in: self.phase(),
            sent: 0,
            received: 0,
            error: None,
        };
        let tcp = match self.connect(to) {
            Ok(tcp) => tcp,
            Err(e) => {
                event.error = Some(format!("connect: {e:#}"));
                return event;
            }
        };
        let reader_done = AtomicBool::new(false);
        let (sent, sent_digest, stopped_cleanly, received, received_digest, read_error) =
            std::thread::scope(|s| {
                let writer = s.spawn(|| {
                    let mut out = &tcp;
                    let mut rng = Rng::new(seed);
                    let mut hash = Sha256::new();
                    let mut sent = 0u64;
                    let mut buf = vec![0u8; CHUNK];
                    let mut first = true;
                    let clean = loop {
                        if self.stopped() {
                            break true;
                        }
                        if reader_done.load(Ordering::SeqCst) {
                            break false;
                        }
                        rng.fill(&mut buf);
                        if first {
                            // Never mistaken for an HTTP request line: echoed raw at once.
                            buf[0] = 0xff;
                            first = false;
                        }
                        if out.write_all(&buf).is_err() {
                            break false;
                        }
                        hash.update(&buf);
                        sent += CHUNK as u64;
                        std::thread::sleep(STREAM_PERIOD);
                    };
                    let _ = tcp.shutdown(Shutdown::Write);
                    (sent, hash.finalize().to_vec(), clean)
                });
                let mut input = &tcp;
                let mut hash = Sha256::new();
                let mut received = 0u64;
                let mut buf = vec![0u8; 64 * 1024];
                let read_error = loop {
                    match input.read(&mut buf) {
                        Ok(0) => break None,
                        Ok(n) => {
                            hash.update(&buf[..n]);
                            received += n as u64;
                        }
                        // A signal to this process (a child of the harness exiting).
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => break Some(e.to_string()),
                    }
                };
                reader_done.store(true, Ordering::SeqCst);
                if read_error.is_some() {
                    let _ = tcp.shutdown(Shutdown::Both);
                }
                let (sent, digest, clean) = writer.join().unwrap_or((0, Vec::new(), false));
                (
                    sent,
                    digest,
                    clean,
                    received,
                    hash.finalize().to_vec(),
                    read_error,
                )
            });
        event.ended_in = self.phase();
        event.sent = sent;
        event.received = received;
        event.error = read_error;
        event.outcome = judge(
            stopped_cleanly && event.error.is_none(),
            sent,
            &sent_digest,
            received,
            &received_digest,
        );
        event
    }

    /// Short connections to `to`, one per period, until the load stops.
    fn shorts(&self, dest: Dest, to: SocketAddr, seed: u64) {
        let mut rng = Rng::new(seed);
        while !self.stopped() {
            let size = SHORT_MIN + (rng.next() as usize) % (SHORT_MAX - SHORT_MIN + 1);
            let mut event = self.short(to, rng.next(), size);
            event.dest = dest;
            self.record(event);
            std::thread::sleep(SHORT_PERIOD);
        }
    }

    /// One short connection: `size` pseudo-random bytes, half-close, the echo to its end.
    fn short(&self, to: SocketAddr, seed: u64, size: usize) -> Event {
        let mut payload = vec![0u8; size];
        Rng::new(seed).fill(&mut payload);
        payload[0] = 0xff;
        let mut event = Event {
            dest: Dest::A,
            kind: Kind::Short,
            outcome: Outcome::Refused,
            phase: self.phase(),
            ended_in: self.phase(),
            sent: size as u64,
            received: 0,
            error: None,
        };
        let started = wall_clock();
        let mut local = None;
        let result = (|| -> Result<Vec<u8>, (Vec<u8>, String)> {
            let mut tcp = self
                .connect(to)
                .map_err(|e| (Vec::new(), format!("connect: {e:#}")))?;
            local = tcp.local_addr().ok();
            tcp.write_all(&payload)
                .and_then(|()| tcp.shutdown(Shutdown::Write))
                .map_err(|e| (Vec::new(), format!("write: {e}")))?;
            let mut back = Vec::with_capacity(size);
            match tcp.read_to_end(&mut back) {
                Ok(_) => Ok(back),
                Err(e) => Err((back, format!("read: {e}"))),
            }
        })();
        event.ended_in = self.phase();
        let (back, clean) = match result {
            Ok(back) => (back, true),
            Err((back, e)) => {
                // Where and when, to find it in the agents' logs.
                let from = local.map_or_else(|| "-".to_owned(), |a| a.to_string());
                event.error = Some(format!("{e} (from {from}, {started}–{})", wall_clock()));
                (back, false)
            }
        };
        event.received = back.len() as u64;
        event.outcome = judge(
            clean,
            size as u64,
            &Sha256::digest(&payload),
            back.len() as u64,
            &Sha256::digest(&back),
        );
        event
    }
}

/// A connection's outcome from what was sent and what came back. `clean`: it ended the
/// way the client ended it (half-close answered by the echo's close).
fn judge(
    clean: bool,
    sent: u64,
    sent_digest: &[u8],
    received: u64,
    received_digest: &[u8],
) -> Outcome {
    let same = received == sent && sent_digest == received_digest;
    if received == 0 && (sent > 0 || !clean) {
        Outcome::Refused
    } else if same && clean {
        Outcome::Exact
    } else if received > sent || (received == sent && !same) {
        Outcome::Corrupt
    } else {
        // Ended early (an error, or a close the client did not ask for): what came back
        // is all that was sent so far or less.
        Outcome::Cut
    }
}

/// xorshift64*: pseudo-random bytes, reproducible from the seed.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed | 1)
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

// === accounting ===

/// Every connection's outcome, counted.
struct Tally {
    events: Vec<Event>,
}

impl Tally {
    fn of(events: &[Event]) -> Self {
        Tally {
            events: events.to_vec(),
        }
    }

    fn count(
        &self,
        dest: Dest,
        kind: Option<Kind>,
        outcome: Outcome,
        phase: Option<Phase>,
    ) -> usize {
        self.events
            .iter()
            .filter(|e| e.dest == dest && e.outcome == outcome)
            .filter(|e| kind.is_none_or(|k| e.kind == k))
            .filter(|e| phase.is_none_or(|p| e.during(p)))
            .count()
    }

    /// Connections to a that lost or corrupted bytes (refusals in a gap are not losses).
    fn a_failing(&self) -> impl Iterator<Item = &Event> {
        self.events
            .iter()
            .filter(|e| e.dest == Dest::A && matches!(e.outcome, Outcome::Cut | Outcome::Corrupt))
    }

    fn a_failures(&self) -> usize {
        self.a_failing().count()
    }

    fn a_failure_details(&self) -> String {
        details(self.a_failing())
    }

    fn gap_refused(&self) -> usize {
        self.events
            .iter()
            .filter(|e| e.outcome == Outcome::Refused && e.during(Phase::Restart))
            .count()
    }

    fn denied_failures(&self) -> usize {
        self.events
            .iter()
            .filter(|e| e.dest == Dest::B && e.during(Phase::Policy) && e.is_refused_or_cut())
            .count()
    }

    /// Failures neither a restart gap nor b's deny explains.
    fn unexplaining(&self) -> impl Iterator<Item = &Event> {
        self.events.iter().filter(|e| {
            e.outcome != Outcome::Exact
                && !(e.outcome == Outcome::Refused && e.during(Phase::Restart))
                && !(e.dest == Dest::B && e.during(Phase::Policy) && e.is_refused_or_cut())
        })
    }

    fn unexplained(&self) -> usize {
        self.unexplaining().count()
    }

    fn unexplained_details(&self) -> String {
        details(self.unexplaining())
    }

    fn write(&self, out: &mut String) {
        for dest in [Dest::A, Dest::B] {
            for kind in [Kind::Stream, Kind::Short] {
                let of: Vec<&Event> = self
                    .events
                    .iter()
                    .filter(|e| e.dest == dest && e.kind == kind)
                    .collect();
                let n = |o: Outcome| of.iter().filter(|e| e.outcome == o).count();
                let bytes: u64 = of.iter().map(|e| e.sent + e.received).sum();
                let _ = writeln!(
                    out,
                    "{dest:?} {kind:?}: {} connections, {} byte-exact, {} refused, {} cut, {} corrupt; {:.1} MiB moved (both ways)",
                    of.len(),
                    n(Outcome::Exact),
                    n(Outcome::Refused),
                    n(Outcome::Cut),
                    n(Outcome::Corrupt),
                    bytes as f64 / (1024.0 * 1024.0)
                );
            }
        }
    }
}

fn details<'a>(events: impl Iterator<Item = &'a Event>) -> String {
    events
        .take(20)
        .map(|e| format!("{e:?}"))
        .collect::<Vec<_>>()
        .join("\n")
}

// === process resources ===

/// The process's open fds by kind (`socket`, `anon_inode:bpf-map`, ...), for the report.
fn fd_kinds(pid: u32) -> BTreeMap<String, usize> {
    let mut kinds = BTreeMap::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return kinds;
    };
    for entry in dir.flatten() {
        let target = std::fs::read_link(entry.path())
            .map(|t| t.to_string_lossy().into_owned())
            .unwrap_or_default();
        let kind = match target.split_once(':') {
            Some((head, rest)) if head == "anon_inode" => format!("{head}:{rest}"),
            Some((head, _)) => head.to_owned(),
            None if target.starts_with('/') => "file".to_owned(),
            None => target,
        };
        *kinds.entry(kind).or_insert(0) += 1;
    }
    kinds
}

fn rss_bytes(pid: u32) -> Option<u64> {
    rss_kib(pid).ok().map(|kib| kib * 1024)
}

/// RSS of every agent process, sampled every [`RSS_EVERY`] while the load runs.
struct RssSampler {
    /// (node, pid) → (time since the process was first tracked, RSS) samples.
    series: Mutex<BTreeMap<(String, u32), Samples>>,
}

/// When a process was first tracked, and its (time since then, RSS, fault underway)
/// samples.
type Samples = (Instant, Vec<(Duration, u64, Phase)>);

struct RssReport {
    text: String,
    flat: bool,
}

impl RssSampler {
    fn new(procs: &[(&str, u32)]) -> Self {
        let sampler = RssSampler {
            series: Mutex::new(BTreeMap::new()),
        };
        for (node, pid) in procs {
            sampler.track(node, *pid);
        }
        sampler
    }

    fn track(&self, node: &str, pid: u32) {
        self.series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry((node.to_owned(), pid))
            .or_insert_with(|| (Instant::now(), Vec::new()));
    }

    fn run(&self, load: &Load) {
        while !load.stop.load(Ordering::SeqCst) {
            {
                let phase = load.phase();
                let mut series = self.series.lock().unwrap_or_else(|e| e.into_inner());
                for ((_, pid), (since, samples)) in series.iter_mut() {
                    if let Some(rss) = rss_bytes(*pid) {
                        samples.push((since.elapsed(), rss, phase));
                    }
                }
            }
            std::thread::sleep(RSS_EVERY);
        }
    }

    /// Each process's samples after warm-up: spread and trend against the bounds.
    fn judge(&self) -> RssReport {
        let series = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let mut text = String::new();
        let mut flat = true;
        const MIB: f64 = 1024.0 * 1024.0;
        for ((node, pid), (_, samples)) in series.iter() {
            let warm: Vec<u64> = samples
                .iter()
                .filter(|(t, ..)| *t >= RSS_WARMUP)
                .map(|(_, r, _)| *r)
                .collect();
            if warm.len() < RSS_MIN_SAMPLES {
                let _ = writeln!(
                    text,
                    "rss {node} pid {pid}: {} samples after warm-up (too few to judge)",
                    warm.len()
                );
                continue;
            }
            let (min, max) = (
                warm.iter().copied().min().unwrap_or(0),
                warm.iter().copied().max().unwrap_or(0),
            );
            let third = warm.len() / 3;
            let mean = |s: &[u64]| s.iter().sum::<u64>() as f64 / s.len().max(1) as f64;
            let trend = mean(&warm[warm.len() - third..]) - mean(&warm[..third]);
            let ok = max - min <= RSS_SPREAD_MAX && trend <= RSS_TREND_MAX as f64;
            flat &= ok;
            // Where the peak was, and for how many samples RSS stayed above the midpoint:
            // to tell a transient from a plateau.
            let peak = samples
                .iter()
                .filter(|(t, ..)| *t >= RSS_WARMUP)
                .max_by_key(|(_, r, _)| *r)
                .map(|(t, _, phase)| format!("peak at {:.0?} ({phase:?})", t))
                .unwrap_or_default();
            let high = warm.iter().filter(|r| **r > min + (max - min) / 2).count();
            let _ = writeln!(
                text,
                "rss {node} pid {pid}: {} samples after warm-up, {:.1}–{:.1} MiB (spread {:.1} MiB, bound {:.0}; {peak}, {high} samples above the midpoint), last third − first third {:+.2} MiB (bound {:+.0}){}",
                warm.len(),
                min as f64 / MIB,
                max as f64 / MIB,
                (max - min) as f64 / MIB,
                RSS_SPREAD_MAX as f64 / MIB,
                trend / MIB,
                RSS_TREND_MAX as f64 / MIB,
                if ok { "" } else { "  NOT FLAT" }
            );
        }
        RssReport { text, flat }
    }
}

/// `target/soak-<name>`.
fn report_path(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join(format!("soak-{name}"))
}

/// The time of day (UTC) as the agents' logs print it, to the millisecond.
fn wall_clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = now.as_secs() % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        secs / 3600,
        secs / 60 % 60,
        secs % 60,
        now.subsec_millis()
    )
}

/// The last `n` access-log lines of an agent with a response flag, but for `b`'s denials.
fn refusals(log: &str, n: usize) -> String {
    let flagged: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("connection complete") && !l.contains("flags=\"-\""))
        .filter(|l| !l.contains("flags=\"UAEX\""))
        .collect();
    flagged[flagged.len().saturating_sub(n)..].join("\n")
}
