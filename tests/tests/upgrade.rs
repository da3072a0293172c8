//! Hitless agent upgrade, end to end (issue 14 item 5): a new agent started on a node while
//! the old one runs (a DaemonSet rolling update with `maxSurge: 1`) takes new connections at
//! once; the old one, SIGTERMed once the new one is ready, keeps serving its established
//! connections until they end, then exits; a third generation upgrades again.
//!
//! Topology: `default/client` on n1, `default/server` on n2, both enrolled; a long-lived raw
//! echo stream from client to server crosses both agents (client → n1's 15001 → HBONE → n2's
//! 15008 → server). Each test upgrades one side with the agents' default drain deadline
//! (1 h), while a second thread opens short echo connections in a tight, bounded loop the
//! whole time: not one may fail. Every test runs against the backend the harness picks
//! (`E2E_REDIRECT`); `cargo xtask test` runs the file once per backend.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use e2e::stream::EchoStream;
use e2e::{wait_until, ChildGuard, Mesh, OldAgent, Pod, Redirect, Signal};

const APP_PORT: u16 = 8080;
/// Short connections each phase lasts at least (before the new agent starts, overlap before
/// SIGTERM, drain while the old stream lives, after the old agent exited).
const PHASE: Duration = Duration::from_millis(1500);
/// Bound on the short-connection loop (it normally stops long before).
const MAX_SHORT: u32 = 200_000;
/// The fewest short connections a test must have made for its zero to mean something.
const MIN_SHORT: u32 = 200;
/// How long the old agent may take to exit once its last connection ended.
const EXIT_AFTER_LAST: Duration = Duration::from_secs(2);

fn main() -> ExitCode {
    e2e::scenario::main(
        || Ok(NoSharedMesh),
        &[],
        &e2e::tests![
            the_client_side_agent_upgrades_without_a_failed_connection,
            the_server_side_agent_upgrades_without_a_failed_connection,
            a_policy_change_reaches_the_connections_an_old_agent_drains,
        ],
    )
}

/// Every test builds its own mesh: nothing is shared.
struct NoSharedMesh;

impl e2e::Suite for NoSharedMesh {}

// === scenarios ===

/// n1 (outbound: the client's 15001) is upgraded twice.
fn the_client_side_agent_upgrades_without_a_failed_connection() -> Result<()> {
    upgrades_one_side("upgrade_out", "n1")
}

/// n2 (inbound: the server's 15008, HBONE from n1's pool) is upgraded twice.
fn the_server_side_agent_upgrades_without_a_failed_connection() -> Result<()> {
    upgrades_one_side("upgrade_in", "n2")
}

/// A mesh with a client on n1 and an echo server on n2 (its process, its address), and a
/// long-lived stream from the client to it that has echoed once.
fn with_a_stream(name: &str) -> Result<(Mesh, ChildGuard, SocketAddr, EchoStream)> {
    let mesh = Mesh::two_nodes(name)
        .pod(
            Pod::new("default", "server")
                .on("n2")
                .service_account("server"),
        )
        .build()?;
    let server_process = mesh.spawn_echo("default/server", APP_PORT, "server")?;
    let server = server_addr(&mesh)?;
    let mut stream = EchoStream::open(&mesh, "default/client", server)?;
    stream.exchange(0)?;
    Ok((mesh, server_process, server, stream))
}

fn upgrades_one_side(name: &str, node: &str) -> Result<()> {
    let (mesh, _server, server, stream) = with_a_stream(name)?;
    let mut stream = Some(stream);

    let short = ShortLoop::default();
    let (second, third) = std::thread::scope(|s| -> Result<(Upgrade, Upgrade)> {
        let looping = s.spawn(|| short.run(&mesh, server));
        let result = (|| {
            let second = upgrade(&mesh, node, stream.take(), &short)?;
            // The third generation takes the first one's ports back, with no stream open.
            let third = upgrade(&mesh, node, None, &short)?;
            Ok((second, third))
        })();
        std::thread::sleep(PHASE);
        short.stop.store(true, Ordering::SeqCst);
        looping
            .join()
            .map_err(|_| anyhow::anyhow!("the short-connection loop panicked"))?;
        result
    })?;

    let (ok, failures) = short.outcome();
    println!(
        "{node}: {ok} short connections, {} failed; long stream {} B echoed byte-exact; \
         generation 1 exited {:?} after its stream ended ({:?} after SIGTERM); generation 2 \
         exited {:?} after SIGTERM with no stream",
        failures.len(),
        second.echoed,
        second.exit_after_last,
        second.exit_after_sigterm,
        third.exit_after_sigterm,
    );
    ensure!(
        failures.is_empty(),
        "{} of {} short connections failed during the upgrades of {node}; first: {:?}\n\
         what the agents refused:\n{}",
        failures.len(),
        ok + failures.len() as u32,
        &failures[..failures.len().min(5)],
        [
            second.old_log.as_str(),
            third.old_log.as_str(),
            &mesh.ztunnel_log("n1"),
            &mesh.ztunnel_log("n2"),
        ]
        .iter()
        .flat_map(|log| log.lines())
        .filter(|l| l.contains("connection complete") && !l.contains("flags=\"-\""))
        .take(20)
        .collect::<Vec<_>>()
        .join("\n")
    );
    ensure!(
        ok >= MIN_SHORT,
        "only {ok} short connections were made (at least {MIN_SHORT} expected)"
    );
    for (generation, up) in [(1, &second), (2, &third)] {
        ensure!(
            up.exit_after_last < EXIT_AFTER_LAST,
            "{node}'s generation {generation} agent took {:?} to exit after its last \
             connection ended",
            up.exit_after_last
        );
        ensure!(
            up.old_log.contains("drained: every connection finished")
                && !up.old_log.contains("connections cut"),
            "{node}'s generation {generation} agent did not report a complete drain:\n{}",
            tail(&up.old_log)
        );
    }
    if mesh.redirect() == Some(Redirect::Ebpf) {
        // Each generation took over the pinned capture (its map now holds its listeners)
        // rather than attaching a program of its own beside the old one's.
        for (generation, log) in [(2, &third.old_log), (3, &mesh.ztunnel_log(node))] {
            ensure!(
                log.contains("adopted the capture an earlier agent pinned"),
                "{node}'s generation {generation} agent did not adopt the pinned capture"
            );
        }
    }
    // The new generation took over: it served short connections itself.
    let served = count_served(&mesh.ztunnel_log(node));
    ensure!(
        served > 0,
        "{node}'s third-generation agent served no connection:\n{}",
        tail(&mesh.ztunnel_log(node))
    );
    println!("{node}: the third generation served {served} connections by the end");
    Ok(())
}

/// Per-process decisions keep working in both agents during the overlap: with a stream still
/// draining through n2's old agent (SIGTERMed, the new one serving), a policy that denies the
/// client closes that stream (the old agent re-checks it) and the new agent refuses new
/// connections; the old agent then exits, its last connection gone.
fn a_policy_change_reaches_the_connections_an_old_agent_drains() -> Result<()> {
    let (mesh, _server, server, mut stream) = with_a_stream("upgrade_policy")?;
    let mut old = mesh.start_next_ztunnel("n2")?;
    old.signal(Signal::SIGTERM)?;
    stream
        .exchange(1)
        .context("the stream while the old agent drains")?;
    ensure!(old.is_running(), "the old agent exited with a stream open");

    mesh.write_yaml(
        "deny.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-client\n  \
         namespace: default\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        \
         principals: [\"cluster.local/ns/default/sa/client\"]\n",
    )?;
    let written = Instant::now();
    let mut round = 2;
    let closed_after = loop {
        ensure!(
            written.elapsed() < Duration::from_secs(10),
            "the denied stream still flows through the draining agent"
        );
        if stream.exchange(round).is_err() {
            break written.elapsed();
        }
        round += 1;
    };
    wait_exit(&mut old, "n2")?;
    let exited_after = written.elapsed();
    // The new agent polls the same config: it refuses the client too once it has it.
    wait_until(
        "the new agent refuses the denied client",
        Duration::from_secs(10),
        || {
            let echoed = mesh.echo_roundtrip("default/client", server, b"denied");
            Ok(!matches!(echoed, Ok(b) if b.as_slice() == b"denied"))
        },
    )?;
    println!(
        "denied stream closed by the draining agent {closed_after:?} after the policy was \
         written (config poll included); it exited {exited_after:?} after it"
    );
    ensure!(
        old.log()
            .contains("policy change closed connections (draining)"),
        "the old agent did not say it closed the stream:\n{}",
        tail(&old.log())
    );
    Ok(())
}

/// What one upgrade measured.
struct Upgrade {
    /// Bytes the long-lived stream echoed while the old agent drained (0 without a stream).
    echoed: u64,
    /// From the end of the old agent's last connection (the stream, or SIGTERM without one)
    /// to its exit.
    exit_after_last: Duration,
    exit_after_sigterm: Duration,
    old_log: String,
}

/// Starts the next agent on `node`, waits until it is ready, SIGTERMs the old one (the
/// kubelet's order) and checks that it stays up while `stream` is open and exits once it
/// ends normally. Each phase lasts [`PHASE`] while `short` keeps connecting.
fn upgrade(
    mesh: &Mesh,
    node: &str,
    mut stream: Option<EchoStream>,
    short: &ShortLoop,
) -> Result<Upgrade> {
    let mut round = 1;
    busy(&mut stream, &mut round, "before the upgrade")?;
    let before = short.outcome().0;
    let mut old = mesh.start_next_ztunnel(node)?;
    busy(&mut stream, &mut round, "while both agents run")?;
    ensure!(
        short.outcome().0 > before,
        "no short connection succeeded while both agents ran"
    );
    old.signal(Signal::SIGTERM)?;
    let signalled = Instant::now();
    let Some(mut s) = stream else {
        // Nothing long-lived on it: it exits as soon as its short connections are done.
        wait_exit(&mut old, node)?;
        let exit_after_sigterm = signalled.elapsed();
        busy(&mut None, &mut round, "after the old agent exited")?;
        return Ok(Upgrade {
            echoed: 0,
            exit_after_last: exit_after_sigterm,
            exit_after_sigterm,
            old_log: old.log(),
        });
    };
    let echoed_before = s.echoed;
    let mut stream = Some(s);
    busy(&mut stream, &mut round, "while the old agent drains")?;
    s = stream.context("the stream")?;
    let echoed = s.echoed - echoed_before;
    ensure!(
        old.is_running(),
        "the old agent on {node} exited with a stream still open"
    );
    // Ends normally: the old agent relays the FIN both ways.
    s.finish().context("the long stream's end")?;
    let last_ended = Instant::now();
    wait_exit(&mut old, node)?;
    Ok(Upgrade {
        echoed,
        exit_after_last: last_ended.elapsed(),
        exit_after_sigterm: signalled.elapsed(),
        old_log: old.log(),
    })
}

/// Keeps the stream (if any) exchanging for a phase, else just lets the phase pass.
fn busy(stream: &mut Option<EchoStream>, round: &mut u32, what: &str) -> Result<()> {
    let until = Instant::now() + PHASE;
    while Instant::now() < until {
        match stream {
            Some(s) => s
                .exchange(*round)
                .with_context(|| format!("long stream {what}"))?,
            None => std::thread::sleep(Duration::from_millis(50)),
        }
        *round += 1;
    }
    Ok(())
}

fn server_addr(mesh: &Mesh) -> Result<SocketAddr> {
    Ok(SocketAddr::new(
        mesh.pod_ip("default/server")?.into(),
        APP_PORT,
    ))
}

fn wait_exit(old: &mut OldAgent, node: &str) -> Result<()> {
    let pid = old.pid();
    wait_until(
        &format!("the old agent on {node} (pid {pid}) exits"),
        Duration::from_secs(10),
        || Ok(!old.is_running()),
    )
}

/// Short echo connections from the client to the server, one after the other, until
/// `stop` (or [`MAX_SHORT`]): each must come back byte for byte.
#[derive(Default)]
struct ShortLoop {
    stop: AtomicBool,
    /// Successes, and what each failure was (attempt number and error).
    results: Mutex<(u32, Vec<String>)>,
}

impl ShortLoop {
    fn run(&self, mesh: &Mesh, server: SocketAddr) {
        for i in 0..MAX_SHORT {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            let payload = format!("short {i}");
            let outcome = mesh.echo_roundtrip("default/client", server, payload.as_bytes());
            let mut results = self.results.lock().unwrap_or_else(|e| e.into_inner());
            match outcome {
                Ok(back) if back == payload.as_bytes() => results.0 += 1,
                Ok(back) => results.1.push(format!("#{i}: {} bytes back", back.len())),
                Err(e) => results.1.push(format!("#{i} at {}: {e:#}", wall_clock())),
            }
        }
    }

    fn outcome(&self) -> (u32, Vec<String>) {
        self.results
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// Connections an agent's log says it served (access lines without a response flag).
fn count_served(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("connection complete") && l.contains("flags=\"-\""))
        .count()
}

/// Now as seconds since the epoch, to line a failure up with the agents' log timestamps.
fn wall_clock() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{}.{:03}", now.as_secs() % 86_400, now.subsec_millis())
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
