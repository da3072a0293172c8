//! Ten thousand idle connections through the mesh (`tests/RELIABILITY.md` scenario 38): held
//! and kept working, shed at once over a pod's connection cap, memory per connection bounded,
//! and everything back where it was once they close.
//!
//! Three client pods on n1 each hold [`PER_PAIR`] connections to their own server pod on n2
//! (10,002 in all: a pod's cap is [`PER_POD_CAP`], set below the default so the numbers stay
//! exact), every one tunnelled n1 → n2 over HBONE. Then one client asks for [`EXTRA`] more:
//! exactly as many as its cap leaves are accepted, the rest are closed at once and counted
//! `OM` by n1, while every held connection still echoes and another pod is served. Each
//! agent's RSS growth per held connection is measured and bounded; once all close, each
//! agent's descriptors come back to their count before the load and new connections are
//! accepted again.

use std::net::{SocketAddr, TcpStream};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use e2e::{echo_once, fd_count, prom, rss_kib, wait_until, Ambient, Mesh, Pod};

const APP_PORT: u16 = 8080;
const PAIRS: usize = 3;
/// Connections each client pod holds: 10,002 in all.
const PER_PAIR: usize = 3_334;
/// `--max-connections-per-pod` of both agents.
const PER_POD_CAP: usize = 4_000;
/// What the first client asks for once it holds its share: more than its cap leaves.
const EXTRA: usize = 1_000;
/// Threads opening connections.
const WORKERS: usize = 8;
/// Bound on each agent's RSS growth per held connection (debug build; the release figure is
/// in BENCHMARKS.md, "KiB per idle tunnelled connection").
const MAX_KIB_PER_CONN: f64 = 16.0;
/// Bound on one connect or echo.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agents may take to close everything once the clients have.
const SETTLE: Duration = Duration::from_secs(30);
const REFUSED: &str = "mesh_connections_refused_total";

fn client(i: usize) -> String {
    format!("default/c{i}")
}

fn server(i: usize) -> String {
    format!("default/s{i}")
}

#[test]
fn ten_thousand_idle_connections_are_held_shed_over_the_cap_and_released() -> Result<()> {
    let mut builder = Mesh::builder("idle10k")
        .node("n1")
        .node("n2")
        .namespace("default", Ambient::Yes)
        .ztunnel_args([
            "--max-connections-per-pod",
            &PER_POD_CAP.to_string(),
            // Pooled HBONE connections close this long after their last tunnel, so the
            // descriptors come back within the test.
            "--hbone-idle-timeout",
            "5s",
        ])
        .pod(Pod::new("default", "bystander").on("n1"));
    for i in 0..PAIRS {
        builder = builder
            .pod(Pod::new("default", &format!("c{i}")).on("n1"))
            .pod(Pod::new("default", &format!("s{i}")).on("n2"));
    }
    let mesh = builder.build()?;
    let _servers: Vec<_> = (0..PAIRS)
        .map(|i| mesh.spawn_echo(&server(i), APP_PORT, &format!("s{i}")))
        .collect::<Result<_>>()?;
    let targets: Vec<SocketAddr> = (0..PAIRS)
        .map(|i| Ok(SocketAddr::new(mesh.pod_ip(&server(i))?.into(), APP_PORT)))
        .collect::<Result<_>>()?;
    // Warm up the pools and certificates, then take the baselines.
    for (i, to) in targets.iter().enumerate() {
        echo_once(&mut mesh.connect(&client(i), *to)?, b"warm")?;
    }
    let pids = [pid(&mesh, "n1")?, pid(&mesh, "n2")?];
    let fds_before = fds(pids);
    let rss_before = rss(pids)?;
    let om_before = refused_om(&mesh, "n1")?;

    // 1. Hold 10,002 connections, each proven to carry bytes.
    let started = Instant::now();
    let plan: Vec<(String, SocketAddr)> = (0..PAIRS)
        .flat_map(|i| std::iter::repeat_n((client(i), targets[i]), PER_PAIR))
        .collect();
    let (mut held, failed) = open_all(&mesh, &plan);
    ensure!(
        failed.is_empty(),
        "{} of {} connections failed, e.g. {:?}",
        failed.len(),
        plan.len(),
        failed.first()
    );
    let opened_in = started.elapsed();
    let rss_held = rss(pids)?;
    let per_conn: Vec<f64> = (0..2)
        .map(|n| (rss_held[n] as f64 - rss_before[n] as f64) / held.len() as f64)
        .collect();
    eprintln!(
        "{} connections held, opened in {opened_in:.1?}; RSS n1 {} → {} KiB, n2 {} → {} KiB: {:.2} / {:.2} KiB per connection",
        held.len(),
        rss_before[0],
        rss_held[0],
        rss_before[1],
        rss_held[1],
        per_conn[0],
        per_conn[1]
    );
    for (node, kib) in ["n1", "n2"].iter().zip(&per_conn) {
        ensure!(
            *kib <= MAX_KIB_PER_CONN,
            "{node}: {kib:.2} KiB per held connection (bound {MAX_KIB_PER_CONN})"
        );
    }

    // 2. Over the cap: c0 holds PER_PAIR and asks for EXTRA more.
    let extra: Vec<(String, SocketAddr)> =
        std::iter::repeat_n((client(0), targets[0]), EXTRA).collect();
    let (more, shed) = open_all(&mesh, &extra);
    let room = PER_POD_CAP - PER_PAIR;
    ensure!(
        more.len() == room && shed.len() == EXTRA - room,
        "over the cap: {} accepted, {} shed; want {room} and {}",
        more.len(),
        shed.len(),
        EXTRA - room
    );
    let om = refused_om(&mesh, "n1")? - om_before;
    ensure!(
        om == (EXTRA - room) as f64,
        "n1 counted {om} OM refusals for {} shed connections",
        EXTRA - room
    );
    eprintln!(
        "c0 asked for {EXTRA} more: {} accepted (its cap leaves {room}), {} shed, n1 counted OM {om}",
        more.len(),
        shed.len()
    );
    held.extend(more);

    // 3. Every held connection still works, and another pod is served meanwhile.
    let started = Instant::now();
    let broken = held
        .iter_mut()
        .map(|c| echo_once(c, b"still here"))
        .filter(Result::is_err)
        .count();
    ensure!(
        broken == 0,
        "{broken} of {} held connections broke",
        held.len()
    );
    eprintln!(
        "{} held connections echoed again in {:.1?}",
        held.len(),
        started.elapsed()
    );
    echo_once(
        &mut mesh.connect("default/bystander", targets[1])?,
        b"bystander",
    )?;

    // 4. All close: descriptors come back, and c0 is served again.
    drop(held);
    let mut last = [0, 0];
    wait_until("both agents back at their descriptor count", SETTLE, || {
        last = fds(pids);
        Ok(
            last[0] <= fds_before[0].saturating_add(1)
                && last[1] <= fds_before[1].saturating_add(1),
        )
    })
    .with_context(|| format!("fds before {fds_before:?}, now {last:?}"))?;
    eprintln!("fds before {fds_before:?}, after {last:?}");
    echo_once(&mut mesh.connect(&client(0), targets[0])?, b"again")?;
    Ok(())
}

/// Opens a connection for each entry of `plan` (from pod, to address) and proves each carries
/// bytes: the held ones, and the errors of those that failed. [`WORKERS`] threads, each of
/// which enters a pod's namespace once for all its connections (a thread per connection
/// would spend most of the time entering and leaving namespaces).
fn open_all(mesh: &Mesh, plan: &[(String, SocketAddr)]) -> (Vec<TcpStream>, Vec<String>) {
    let held = Mutex::new(Vec::with_capacity(plan.len()));
    let failed = Mutex::new(Vec::new());
    // Runs of the same source pod, cut so that each worker gets about as many.
    let chunk = plan.len().div_ceil(WORKERS).max(1);
    let mut parts: Vec<&[(String, SocketAddr)]> = Vec::new();
    for run in plan.chunk_by(|a, b| a.0 == b.0) {
        parts.extend(run.chunks(chunk));
    }
    std::thread::scope(|s| {
        for part in parts {
            let (held, failed) = (&held, &failed);
            s.spawn(move || {
                let from = &part[0].0;
                let opened = mesh.in_pod(from, || {
                    part.iter()
                        .map(|(_, to)| connect_and_echo(*to).map_err(|e| format!("{e:#}")))
                        .collect::<Vec<_>>()
                });
                match opened {
                    Ok(results) => {
                        for r in results {
                            match r {
                                Ok(c) => lock(held).push(c),
                                Err(e) => lock(failed).push(e),
                            }
                        }
                    }
                    Err(e) => lock(failed).push(format!("enter {from}: {e:#}")),
                }
            });
        }
    });
    (
        held.into_inner().unwrap_or_else(|e| e.into_inner()),
        failed.into_inner().unwrap_or_else(|e| e.into_inner()),
    )
}

/// Connects (from the calling thread's namespace) and proves the connection carries bytes.
fn connect_and_echo(to: SocketAddr) -> Result<TcpStream> {
    let mut c =
        TcpStream::connect_timeout(&to, IO_TIMEOUT).with_context(|| format!("connect to {to}"))?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    echo_once(&mut c, b"hello")?;
    Ok(c)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn pid(mesh: &Mesh, node: &str) -> Result<u32> {
    mesh.ztunnel_pid(node)
        .with_context(|| format!("no agent runs on {node}"))
}

fn refused_om(mesh: &Mesh, node: &str) -> Result<f64> {
    Ok(prom::sum(
        &mesh.metrics(node)?,
        REFUSED,
        &[("reason", "OM")],
    ))
}

/// Both agents' open descriptors (`usize::MAX` for one that is gone: no bound then holds).
fn fds(pids: [u32; 2]) -> [usize; 2] {
    pids.map(|pid| fd_count(pid).unwrap_or(usize::MAX))
}

/// Both agents' resident memory (KiB).
fn rss(pids: [u32; 2]) -> Result<[u64; 2]> {
    Ok([rss_kib(pids[0])?, rss_kib(pids[1])?])
}
