//! The agent's end of life, end to end: SIGTERM drains both directions, the drain deadline
//! cuts what is left (counted), and the mesh comes off a node cleanly (`--release-all`,
//! `--release-on-exit`).
//!
//! Topology: `default/client` on n1, `default/server` on n2, both enrolled; a long-lived raw
//! echo stream from client to server crosses both agents (client → n1's 15001 → HBONE →
//! n2's 15008 → server). Every test runs against the backend the harness picks
//! (`E2E_REDIRECT`); `cargo xtask test` runs the file once per backend.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use e2e::stream::{EchoStream, CHUNK};
use e2e::{wait_until, Mesh, Pod, Redirect, Signal};

const APP_PORT: u16 = 8080;
/// How long a config change or an agent's exit may take to show.
const APPLY: Duration = Duration::from_secs(10);
/// The drain deadline of the drain tests: long enough that a stream ended by the test
/// finishes well inside it.
const LONG_DRAIN: &str = "20s";
/// The drain deadline of the test that lets it pass.
const SHORT_DRAIN: Duration = Duration::from_secs(3);
/// How long the drain tests keep the stream busy after SIGTERM.
const BUSY_WHILE_DRAINING: Duration = Duration::from_millis(1500);

/// The tests run one at a time, in this order (the scenario harness's standalone tests):
/// each builds a two-node mesh of its own, and drain timings are measured on a quiet machine.
fn main() -> ExitCode {
    e2e::scenario::main(
        || Ok(NoSharedMesh),
        &[],
        &e2e::tests![
            sigterm_on_the_client_side_drains_outbound_streams,
            sigterm_on_the_server_side_drains_inbound_streams,
            a_stream_open_at_the_drain_deadline_is_cut_and_counted,
            release_all_takes_the_mesh_off_the_nodes,
            release_on_exit_uninstalls_without_a_black_hole,
        ],
    )
}

/// Every test builds its own mesh: nothing is shared.
struct NoSharedMesh;

impl e2e::Suite for NoSharedMesh {}

fn mesh(name: &str, drain: &str, extra: &[&str]) -> Result<Mesh> {
    let mut args = vec!["--drain-timeout", drain];
    args.extend_from_slice(extra);
    Mesh::two_nodes(name)
        .pod(
            Pod::new("default", "server")
                .on("n2")
                .service_account("server"),
        )
        .ztunnel_args(args)
        .build()
}

fn server_addr(mesh: &Mesh) -> Result<SocketAddr> {
    Ok(SocketAddr::new(
        mesh.pod_ip("default/server")?.into(),
        APP_PORT,
    ))
}

// === scenarios ===

/// The client-side agent (outbound) is SIGTERMed with a stream open: the stream keeps
/// echoing byte-exact and the agent exits as soon as the stream ends, long before the
/// deadline.
fn sigterm_on_the_client_side_drains_outbound_streams() -> Result<()> {
    drains_one_side("drain_out", "n1")
}

/// The same with the server-side agent (inbound HBONE): GOAWAY, the open stream finishes.
fn sigterm_on_the_server_side_drains_inbound_streams() -> Result<()> {
    drains_one_side("drain_in", "n2")
}

fn drains_one_side(name: &str, node: &str) -> Result<()> {
    let mesh = mesh(name, LONG_DRAIN, &[])?;
    let _server = mesh.spawn_echo("default/server", APP_PORT, "server")?;
    let server = server_addr(&mesh)?;
    let mut stream = EchoStream::open(&mesh, "default/client", server)?;
    stream.exchange(0)?;

    mesh.signal_ztunnel(node, Signal::SIGTERM)?;
    let signalled = Instant::now();
    let mut rounds = 1;
    while signalled.elapsed() < BUSY_WHILE_DRAINING {
        stream
            .exchange(rounds)
            .with_context(|| format!("stream while {node}'s agent drains"))?;
        rounds += 1;
    }
    ensure!(
        mesh.ztunnel_pid(node).is_some(),
        "{node}'s agent exited with a stream still open"
    );
    // A new connection during the drain fails closed: the draining agent's listeners are
    // closed and its HBONE connections refuse new streams, while the pods stay captured.
    // (It used to be served one run in three: the workload loop could end without closing
    // the pods' listeners, and the HBONE server took streams sent before its GOAWAY.)
    const LATE: &[u8] = b"new during drain";
    let refused = mesh.echo_roundtrip("default/client", server, LATE);
    ensure!(
        !matches!(&refused, Ok(back) if back.as_slice() == LATE),
        "a new connection was served by {node}'s draining agent: {refused:?}"
    );

    let ended = Instant::now();
    drop(stream);
    wait_until(&format!("{node}'s agent exits"), APPLY, || {
        Ok(mesh.ztunnel_pid(node).is_none())
    })?;
    let exit_after = ended.elapsed();
    println!(
        "{node}: {rounds} exchanges of {CHUNK} B while draining; agent exited {exit_after:?} \
         after the stream ended ({:?} after SIGTERM); new connection refused: {}",
        signalled.elapsed(),
        match &refused {
            Ok(back) => format!("{} bytes back", back.len()),
            Err(e) => format!("{e:#}").replace('\n', " "),
        }
    );
    ensure!(
        exit_after < Duration::from_secs(2),
        "{node}'s agent took {exit_after:?} to exit after the last stream ended"
    );
    let log = mesh.ztunnel_log(node);
    ensure!(
        log.contains("drained: every connection finished") && !log.contains("connections cut"),
        "{node}'s agent did not report a complete drain:\n{}",
        tail(&log)
    );
    Ok(())
}

/// A stream still open when the deadline passes is cut at the deadline (within 1 s), and the
/// agent says how many it cut.
fn a_stream_open_at_the_drain_deadline_is_cut_and_counted() -> Result<()> {
    let deadline = format!("{}s", SHORT_DRAIN.as_secs());
    let mesh = mesh("drain_cut", &deadline, &[])?;
    let _server = mesh.spawn_echo("default/server", APP_PORT, "server")?;
    let mut stream = EchoStream::open(&mesh, "default/client", server_addr(&mesh)?)?;
    stream.exchange(0)?;

    mesh.signal_ztunnel("n1", Signal::SIGTERM)?;
    let signalled = Instant::now();
    let mut rounds = 1;
    let cut_at = loop {
        ensure!(
            signalled.elapsed() < SHORT_DRAIN + Duration::from_secs(5),
            "the stream was never cut"
        );
        if stream.exchange(rounds).is_err() {
            break signalled.elapsed();
        }
        rounds += 1;
        std::thread::sleep(Duration::from_millis(100));
    };
    println!("cut {cut_at:?} after SIGTERM (deadline {SHORT_DRAIN:?}), {rounds} exchanges");
    let off = cut_at.abs_diff(SHORT_DRAIN);
    ensure!(
        off <= Duration::from_secs(1),
        "cut {cut_at:?} after SIGTERM; the deadline is {SHORT_DRAIN:?}"
    );
    wait_until("n1's agent exits", APPLY, || {
        Ok(mesh.ztunnel_pid("n1").is_none())
    })?;
    let log = mesh.ztunnel_log("n1");
    let cut = log
        .lines()
        .find(|l| l.contains("drain deadline: connections cut"))
        .with_context(|| format!("no cut count in n1's log:\n{}", tail(&log)))?;
    ensure!(cut.contains("cut=1 "), "one stream was open: {cut}");
    Ok(())
}

/// `--release-all` with the agents stopped: the pods, black-holed while nothing serves
/// their capture, talk directly again (plaintext on the app port, no 15008), and nothing of
/// the agent is left in their namespaces (nft table, ip rules, table 133's routes, capture
/// link, pins). Running it again is fine; an agent started afterwards captures again.
fn release_all_takes_the_mesh_off_the_nodes() -> Result<()> {
    let mesh = mesh("release_all", LONG_DRAIN, &[])?;
    let _server = mesh.spawn_echo("default/server", APP_PORT, "server")?;
    let server = server_addr(&mesh)?;
    let pods = ["default/client", "default/server"];
    expect_echo(&mesh, server, "through the mesh")?;
    for pod in pods {
        ensure!(
            leftovers(&mesh, pod)?.is_some(),
            "{pod} is not captured to begin with"
        );
    }
    mesh.stop_ztunnel("n1")?;
    mesh.stop_ztunnel("n2")?;
    ensure!(
        !echoes(&mesh, server, "while no agent runs"),
        "traffic got through with both agents stopped (not failing closed)"
    );

    for round in ["first", "second"] {
        for node in ["n1", "n2"] {
            let out = mesh.run_ztunnel_once(node, &["--release-all"])?;
            let log = String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout);
            ensure!(
                out.status.success(),
                "{round} --release-all on {node}: {}\n{}",
                out.status,
                tail(&log)
            );
            println!(
                "{round} --release-all on {node}: {}",
                log.lines()
                    .find(|l| l.contains("released every pod"))
                    .unwrap_or("(no summary)")
            );
        }
        for pod in pods {
            if let Some(left) = leftovers(&mesh, pod)? {
                anyhow::bail!("{pod} after the {round} --release-all: {left}");
            }
        }
        let capture = mesh.capture_wire()?;
        expect_echo(&mesh, server, &format!("after the {round} release"))?;
        let wire = capture.stop()?;
        let ports = wire.tcp_server_ports();
        ensure!(
            ports.contains(&APP_PORT) && !ports.contains(&15008),
            "after the {round} release the client reached the server over ports {ports:?}"
        );
    }

    mesh.start_ztunnel("n1")?;
    mesh.start_ztunnel("n2")?;
    for pod in pods {
        ensure!(
            leftovers(&mesh, pod)?.is_some(),
            "{pod} not captured again by the new agent"
        );
    }
    let capture = mesh.capture_wire()?;
    expect_echo(&mesh, server, "through the new agents")?;
    let ports = capture.stop()?.tcp_server_ports();
    ensure!(
        ports.contains(&15008) && !ports.contains(&APP_PORT),
        "after the restart the client reached the server over ports {ports:?}"
    );
    Ok(())
}

/// `--release-on-exit` (an uninstall by the agent itself): on SIGTERM the client's new
/// connections go directly at once (no black hole) while the open stream keeps flowing
/// through the agent; once it ends the agent exits and leaves nothing behind.
fn release_on_exit_uninstalls_without_a_black_hole() -> Result<()> {
    let mesh = mesh("release_on_exit", LONG_DRAIN, &["--release-on-exit"])?;
    let _server = mesh.spawn_echo("default/server", APP_PORT, "server")?;
    let server = server_addr(&mesh)?;
    let mut stream = EchoStream::open(&mesh, "default/client", server)?;
    stream.exchange(0)?;

    mesh.signal_ztunnel("n1", Signal::SIGTERM)?;
    // The stream was opened through the agent; it drains there.
    for round in 1..5 {
        stream.exchange(round).context("stream while n1 releases")?;
    }
    // New connections leave the client directly (n2 still serves the server: plaintext to
    // its 15006, PERMISSIVE).
    expect_echo(&mesh, server, "while n1 drains with --release-on-exit")?;
    ensure!(
        mesh.ztunnel_pid("n1").is_some(),
        "n1's agent exited with a stream still open"
    );
    drop(stream);
    wait_until("n1's agent exits", APPLY, || {
        Ok(mesh.ztunnel_pid("n1").is_none())
    })?;
    if let Some(left) = leftovers(&mesh, "default/client")? {
        anyhow::bail!("default/client after n1 released on exit: {left}");
    }
    expect_echo(&mesh, server, "after n1 exited")?;
    Ok(())
}

// === helpers ===

fn echoes(mesh: &Mesh, to: SocketAddr, what: &str) -> bool {
    let payload = format!("ping {what}");
    matches!(mesh.echo_roundtrip("default/client", to, payload.as_bytes()), Ok(b) if b == payload.as_bytes())
}

fn expect_echo(mesh: &Mesh, to: SocketAddr, what: &str) -> Result<()> {
    wait_until(&format!("client reaches server {what}"), APPLY, || {
        Ok(echoes(mesh, to, what))
    })
}

/// What of the agent's capture is in `pod`'s namespace, or `None` when nothing is: the nft
/// table, policy-routing rules naming the agent's table or the IPv6 block, routes in table
/// 133, the eBPF `sk_lookup` link, and the pod's pins under the bpffs.
fn leftovers(mesh: &Mesh, pod: &str) -> Result<Option<String>> {
    let mut found = Vec::new();
    let tables = mesh.exec_ok(pod, &["nft", "list", "tables"])?;
    if tables.contains("ztunnel") {
        found.push(format!("nft: {}", tables.trim()));
    }
    for family in ["-4", "-6"] {
        let rules = mesh.exec(pod, &["ip", family, "rule", "show"])?;
        let rules = String::from_utf8_lossy(&rules.stdout);
        for rule in rules
            .lines()
            .filter(|l| l.contains("lookup 133") || l.contains("prohibit"))
        {
            found.push(format!("ip {family} rule: {}", rule.trim()));
        }
        let routes = mesh.exec(pod, &["ip", family, "route", "show", "table", "133"])?;
        let routes = String::from_utf8_lossy(&routes.stdout);
        if !routes.trim().is_empty() {
            found.push(format!("ip {family} route table 133: {}", routes.trim()));
        }
    }
    if mesh.redirect() == Some(Redirect::Ebpf) {
        let links = mesh.capture_links(pod)?;
        if !links.is_empty() {
            found.push(format!("sk_lookup links {links:?}"));
        }
        if let Some(fs) = mesh.bpf_fs() {
            let prefix = pod.replace(['/', '.'], "_") + "_";
            let pins: Vec<String> = std::fs::read_dir(fs.join("ztunnel"))
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.starts_with(&prefix))
                        .collect()
                })
                .unwrap_or_default();
            if !pins.is_empty() {
                found.push(format!("pins {pins:?}"));
            }
        }
    }
    Ok((!found.is_empty()).then(|| found.join("; ")))
}

fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}
