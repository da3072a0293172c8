//! Live enrollment and release, and agent restarts, end to end.
//!
//! Pods join the mesh when `istio.io/dataplane-mode` labels change in the config directory and
//! leave it when they change back, while unrelated long-lived connections keep flowing; a
//! killed agent leaves its pods captured (fail closed) and its successor takes them over
//! without duplicating rules; a probe from the node itself reaches an enrolled pod.
//!
//! What "enrolled" means is checked from outside the agent, in the pod's own namespace: the
//! capture (nftables backend: the table `inet ztunnel` and its redirect rules; eBPF backend:
//! the `sk_lookup` link attached to the pod's namespace), the policy-routing rule to the
//! agent's table, the outbound listener on 15001, and the pod being listed under `workloads`
//! in `/config_dump`. Every test runs against the backend the harness picks
//! (`E2E_REDIRECT`); `cargo xtask test` runs the file once per backend.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use e2e::{prom, wait_until, Ambient, CaptureSummary, Mesh, Pod, Redirect};
use serde_json::Value;

/// How long a config change may take to apply (the agent polls every 500 ms).
const APPLY: Duration = Duration::from_secs(10);
/// Bound on one echo over a long-lived connection.
const ECHO_TIMEOUT: Duration = Duration::from_secs(5);
/// Where every test pod's mesh-echo listens.
const APP_PORT: u16 = 8080;
const HBONE_PORT: u16 = 15008;
const OUTBOUND_PORT: u16 = 15001;
const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// The file the harness writes the declared topology to.
const TOPOLOGY: &str = "topology.yaml";
/// The agent's nftables table in every enrolled pod's namespace.
const NFT_TABLE: &str = "table inet ztunnel";
/// What every policy-routing rule of the agent has in common: it selects the agent's table
/// (nftables: the inbound connmark's replies; eBPF: the pod's outgoing TCP, and the flows of
/// a released pod that still drain).
const AGENT_RULE: &str = "lookup 133";
/// The eBPF backend's rule that captures every new outgoing connection.
const EBPF_CAPTURE_RULE: &str = "iif lo ipproto tcp lookup 133";
/// What tells the eBPF backend's DNS rule (`iif lo ipproto udp dport 53 lookup 133`) apart
/// (whole words: a flow rule's `dport 53317` is no DNS rule).
const DNS_RULE: &str = "ipproto udp dport 53 lookup";
const OPENED: &str = "istio_tcp_connections_opened_total";
const REFUSED: &str = "mesh_connections_refused_total";

// === scenarios ===

/// `apps` starts outside the mesh. Labelling it ambient enrolls `apps/a` (n1) and `apps/b`
/// (n2) live: a's traffic to b then crosses the wire only as HBONE and is counted by n1.
/// Opting `a` out with `dataplane-mode: none` releases it: its new connections go to b in
/// plaintext, past the agent. Removing the namespace label releases `b` as well. Throughout,
/// `default/long` keeps one echo connection open to `default/server` and exchanges bytes
/// before, during and after every change.
#[test]
fn pods_are_enrolled_and_released_live_while_a_long_connection_flows() -> Result<()> {
    let mesh = Mesh::builder("enroll_release")
        .node("n1")
        .node("n2")
        .namespace("default", Ambient::Yes)
        .namespace("apps", Ambient::No)
        .pod(Pod::new("default", "long").on("n1").service_account("long"))
        .pod(
            Pod::new("default", "server")
                .on("n2")
                .service_account("server"),
        )
        .pod(Pod::new("apps", "a").on("n1").service_account("a"))
        .pod(Pod::new("apps", "b").on("n2").service_account("b"))
        .build()?;
    let _server = mesh.spawn_echo("default/server", APP_PORT, "server")?;
    let _b = mesh.spawn_echo("apps/b", APP_PORT, "b")?;
    let b = app_addr(&mesh, "apps/b")?;
    let (a_ip, b_ip) = (mesh.pod_ip("apps/a")?, mesh.pod_ip("apps/b")?);
    let mut long = LongLived::open(&mesh, "default/long", app_addr(&mesh, "default/server")?)?;
    long.exchange("before any change")?;

    // Outside the mesh, nothing of the agent is in a's namespace.
    expect_setup(&mesh, "n1", "apps/a", Setup::Gone, "a at start")?;
    expect_setup(&mesh, "n2", "apps/b", Setup::Gone, "b at start")?;
    let n1_serves = served(&mesh, "n1")?;
    ensure!(
        n1_serves == BTreeSet::from(["default/long".to_owned()]),
        "n1 serves {n1_serves:?} before apps is enrolled"
    );

    // Enroll the namespace.
    relabel(
        &mesh,
        Object::Namespace("apps"),
        DATAPLANE_MODE,
        Some("ambient"),
    )?;
    long.exchange("while apps is being enrolled")?;
    expect_setup(&mesh, "n1", "apps/a", Setup::Enrolled, "apps ambient")?;
    expect_setup(&mesh, "n2", "apps/b", Setup::Enrolled, "apps ambient")?;
    for node in ["n1", "n2"] {
        mesh.wait_ready(node)?;
    }
    let before = opened_from_apps(&mesh)?;
    let marker = b"MARKER-enrolled-a-to-b-0001";
    let wire = echo_captured(&mesh, "apps/a", b, marker)?;
    let ports = server_ports_between(&wire, a_ip, b_ip);
    ensure!(
        ports == BTreeSet::from([HBONE_PORT]),
        "enrolled a reached b over ports {ports:?}"
    );
    ensure!(
        !wire.contains(marker),
        "enrolled a's bytes in clear on the wire"
    );
    wait_until("n1 counts a's connection as source", APPLY, || {
        Ok(opened_from_apps(&mesh)? > before)
    })?;
    long.exchange("after apps was enrolled")?;

    // Opt a out with the pod label: a is released, b (still enrolled) takes its plaintext.
    relabel(&mesh, Object::Pod("apps/a"), DATAPLANE_MODE, Some("none"))?;
    long.exchange("while a is being released")?;
    expect_setup(&mesh, "n1", "apps/a", Setup::Gone, "a opted out")?;
    expect_setup(&mesh, "n2", "apps/b", Setup::Enrolled, "b stays enrolled")?;
    let before = opened_from_apps(&mesh)?;
    let marker = b"MARKER-released-a-to-b-0002";
    let wire = echo_captured(&mesh, "apps/a", b, marker)?;
    let ports = server_ports_between(&wire, a_ip, b_ip);
    ensure!(
        ports == BTreeSet::from([APP_PORT]),
        "released a reached b over ports {ports:?}"
    );
    ensure!(
        wire.contains(marker),
        "released a's plaintext not seen on the wire"
    );
    ensure!(
        opened_from_apps(&mesh)? == before,
        "n1 still counts connections from apps after a was released"
    );
    long.exchange("after a was released")?;

    // Remove the namespace label: b is released too, and a still reaches it directly.
    relabel(&mesh, Object::Namespace("apps"), DATAPLANE_MODE, None)?;
    long.exchange("while b is being released")?;
    expect_setup(&mesh, "n2", "apps/b", Setup::Gone, "apps label removed")?;
    expect_setup(&mesh, "n1", "apps/a", Setup::Gone, "a stays released")?;
    let back = mesh.echo_roundtrip("apps/a", b, b"plain-after-release")?;
    ensure!(back == b"plain-after-release", "a -> b after both released");
    let n2_serves = served(&mesh, "n2")?;
    ensure!(
        n2_serves == BTreeSet::from(["default/server".to_owned()]),
        "n2 serves {n2_serves:?} after apps left"
    );
    long.exchange("after every change")?;
    Ok(())
}

/// A connection a pod opened while enrolled belongs to the agent's relay; releasing the pod
/// closes its listeners but must let that connection run to completion. One change releases
/// the source of one held connection (`a1` opts out) and the destination of another (`c` opts
/// out); both connections must keep echoing.
#[test]
fn a_released_pods_established_connections_run_to_completion() -> Result<()> {
    let mesh = Mesh::builder("release_drain")
        .node("n1")
        .node("n2")
        .namespace("apps", Ambient::Yes)
        .pod(Pod::new("apps", "a1").on("n1").service_account("a1"))
        .pod(Pod::new("apps", "a2").on("n1").service_account("a2"))
        .pod(Pod::new("apps", "b").on("n2").service_account("b"))
        .pod(Pod::new("apps", "c").on("n2").service_account("c"))
        .build()?;
    let _b = mesh.spawn_echo("apps/b", APP_PORT, "b")?;
    let _c = mesh.spawn_echo("apps/c", APP_PORT, "c")?;
    let mut from_released = LongLived::open(&mesh, "apps/a1", app_addr(&mesh, "apps/b")?)?;
    let mut to_released = LongLived::open(&mesh, "apps/a2", app_addr(&mesh, "apps/c")?)?;
    from_released.exchange("while a1 is enrolled")?;
    to_released.exchange("while c is enrolled")?;

    relabel(&mesh, Object::Pod("apps/a1"), DATAPLANE_MODE, Some("none"))?;
    relabel(&mesh, Object::Pod("apps/c"), DATAPLANE_MODE, Some("none"))?;
    expect_setup(&mesh, "n1", "apps/a1", Setup::Released, "a1 opted out")?;
    expect_setup(&mesh, "n2", "apps/c", Setup::Released, "c opted out")?;

    // Both are tried, so one run tells which side of a release breaks connections.
    let broken: Vec<String> = [
        from_released.exchange("after its source a1 was released"),
        to_released.exchange("after its destination c was released"),
    ]
    .into_iter()
    .filter_map(|r| r.err().map(|e| format!("{e:#}")))
    .collect();
    ensure!(
        broken.is_empty(),
        "established connections broken by a release: {broken:#?}"
    );
    // Once they finish, the rest of the released pods' redirection state goes too.
    drop(from_released);
    drop(to_released);
    expect_setup(&mesh, "n1", "apps/a1", Setup::Gone, "a1 drained")?;
    expect_setup(&mesh, "n2", "apps/c", Setup::Gone, "c drained")?;
    Ok(())
}

/// A pod released and enrolled again, twice, while connections of every kind stay open:
/// those it opened while enrolled the first time and the second time (each owned by an
/// enrollment that is draining by the end), and those it opened and accepted directly while
/// released. Every one keeps echoing through every change: nothing is reset, neither by a
/// later release (which must keep routing an earlier enrollment's connections to the agent)
/// nor by the capture coming back (which must leave direct connections direct). The eBPF
/// backend's rules for the direct ones go once they close, and once everything has closed
/// after the last release the pod's redirection goes.
#[test]
fn a_pod_enrolled_again_keeps_every_connection_it_had_open() -> Result<()> {
    let mesh = Mesh::builder("reenroll")
        .node("n1")
        .node("n2")
        .namespace("apps", Ambient::Yes)
        .pod(Pod::new("apps", "a").on("n1").service_account("a"))
        .pod(Pod::new("apps", "b").on("n2").service_account("b"))
        .pod(Pod::new("apps", "x").on("n2").service_account("x"))
        .build()?;
    let _a = mesh.spawn_echo("apps/a", APP_PORT, "a")?;
    let _b = mesh.spawn_echo("apps/b", APP_PORT, "b")?;
    let (a, b) = (app_addr(&mesh, "apps/a")?, app_addr(&mesh, "apps/b")?);
    let mut open: Vec<(&str, LongLived)> = Vec::new();
    let exchange_all = |open: &mut Vec<(&str, LongLived)>, when: &str| -> Result<()> {
        let broken: Vec<String> = open
            .iter_mut()
            .filter_map(|(name, c)| c.exchange(&format!("{name}, {when}")).err())
            .map(|e| format!("{e:#}"))
            .collect();
        ensure!(broken.is_empty(), "connections broken {when}: {broken:#?}");
        Ok(())
    };

    expect_setup(&mesh, "n1", "apps/a", Setup::Enrolled, "a enrolled")?;
    open.push((
        "a -> b, opened enrolled",
        LongLived::open(&mesh, "apps/a", b)?,
    ));
    open.push((
        "x -> a, opened enrolled",
        LongLived::open(&mesh, "apps/x", a)?,
    ));
    exchange_all(&mut open, "while a is enrolled")?;

    relabel(&mesh, Object::Pod("apps/a"), DATAPLANE_MODE, Some("none"))?;
    expect_setup(&mesh, "n1", "apps/a", Setup::Released, "a opted out")?;
    exchange_all(&mut open, "after the first release")?;
    // n2's agent learns of the release on its own config poll; until then it tunnels to a's
    // 15008, which is closed.
    expect_reach(&mesh, "apps/x", a, true, "once n2 knows a is released")?;
    let mut direct = vec![
        (
            "a -> b, opened released",
            LongLived::open(&mesh, "apps/a", b)?,
        ),
        (
            "x -> a, opened released",
            LongLived::open(&mesh, "apps/x", a)?,
        ),
    ];
    exchange_all(&mut direct, "while a is released")?;

    relabel(&mesh, Object::Pod("apps/a"), DATAPLANE_MODE, None)?;
    expect_setup(&mesh, "n1", "apps/a", Setup::Enrolled, "a enrolled again")?;
    exchange_all(&mut open, "after a was enrolled again")?;
    exchange_all(&mut direct, "after a was enrolled again")?;
    if backend(&mesh) == Redirect::Ebpf {
        let rules = direct_rules(&mesh, "apps/a")?;
        ensure!(
            rules == 2,
            "a enrolled again: {rules} rules keep its direct connections direct, want 2"
        );
    }
    // A new connection is captured again: counted by n1 as one from `apps`.
    let before = opened_from_apps(&mesh)?;
    open.push((
        "a -> b, opened enrolled again",
        LongLived::open(&mesh, "apps/a", b)?,
    ));
    exchange_all(&mut open, "with a new connection")?;
    wait_until("n1 counts a's new connection", APPLY, || {
        Ok(opened_from_apps(&mesh)? > before)
    })?;

    relabel(&mesh, Object::Pod("apps/a"), DATAPLANE_MODE, Some("none"))?;
    expect_setup(&mesh, "n1", "apps/a", Setup::Released, "a opted out again")?;
    exchange_all(&mut open, "after the second release")?;
    exchange_all(&mut direct, "after the second release")?;

    relabel(&mesh, Object::Pod("apps/a"), DATAPLANE_MODE, None)?;
    expect_setup(
        &mesh,
        "n1",
        "apps/a",
        Setup::Enrolled,
        "a enrolled a third time",
    )?;
    exchange_all(&mut open, "after a was enrolled a third time")?;
    exchange_all(&mut direct, "after a was enrolled a third time")?;

    drop(direct);
    if backend(&mesh) == Redirect::Ebpf {
        // Swept every 5 s.
        wait_until(
            "the direct connections' rules go once they close",
            APPLY * 2,
            || Ok(direct_rules(&mesh, "apps/a")? == 0),
        )
        .with_context(|| {
            let rules = mesh.exec_ok("apps/a", &["ip", "rule", "show"]);
            let sockets = mesh.exec_ok("apps/a", &["ss", "-t", "-n", "-a"]);
            format!("a's rules: {rules:?}\na's sockets: {sockets:?}")
        })?;
    }
    relabel(&mesh, Object::Pod("apps/a"), DATAPLANE_MODE, Some("none"))?;
    expect_setup(
        &mesh,
        "n1",
        "apps/a",
        Setup::Released,
        "a opted out a third time",
    )?;
    exchange_all(&mut open, "after the third release")?;
    drop(open);
    expect_setup(&mesh, "n1", "apps/a", Setup::Gone, "a drained")?;
    Ok(())
}

/// A crashed agent (SIGKILL) leaves its pods captured: while it is down nothing reaches them,
/// neither plaintext from outside the mesh nor HBONE. The agent started again takes them over
/// from its own config: HBONE and a workload-level STRICT PeerAuthentication work as before,
/// each pod namespace holds exactly the rules it held before (one table, one ip rule), and
/// only the new process runs.
#[test]
fn a_killed_agent_fails_closed_and_its_successor_takes_over_cleanly() -> Result<()> {
    let mesh = Mesh::two_nodes("restart")
        .namespace("legacy", Ambient::No)
        .pod(Pod::new("legacy", "outsider").on("n1"))
        .pod(
            Pod::new("default", "server")
                .on("n2")
                .service_account("server"),
        )
        .pod(
            Pod::new("default", "locked")
                .on("n2")
                .service_account("locked")
                .labels([("app", "locked")]),
        )
        .yaml(
            "strict-locked.yaml",
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: locked\n  namespace: default\nspec:\n  selector:\n    matchLabels:\n      app: locked\n  mtls:\n    mode: STRICT\n",
        )
        .build()?;
    let _server = mesh.spawn_echo("default/server", APP_PORT, "server")?;
    let _locked = mesh.spawn_echo("default/locked", APP_PORT, "locked")?;
    let server = app_addr(&mesh, "default/server")?;
    let locked = app_addr(&mesh, "default/locked")?;
    let n2_pods = ["default/server", "default/locked"];

    // Before: PERMISSIVE server open to plaintext, STRICT locked only to the mesh.
    let reach_table = [
        ("legacy/outsider", server, true),
        ("legacy/outsider", locked, false),
        ("default/client", server, true),
        ("default/client", locked, true),
    ];
    for (from, to, allowed) in reach_table {
        expect_reach(&mesh, from, to, allowed, "before the crash")?;
    }
    let mut rules_before = Vec::new();
    for pod in n2_pods {
        rules_before.push(redirection_of(&mesh, pod)?);
    }
    let old_pid = mesh.ztunnel_pid("n2").context("n2 agent runs")?;

    mesh.kill_ztunnel("n2")?;
    // Fail closed: the rules stay, so plaintext is redirected to a port nobody listens on,
    // and HBONE finds no 15008 listener either.
    for pod in n2_pods {
        let setup = setup_in_pod(&mesh, pod)?;
        ensure!(
            setup.installed && setup.ip_rules == 1,
            "{pod} lost its redirection when the agent died: {setup:?}"
        );
    }
    for (from, to) in [
        ("legacy/outsider", server),
        ("default/client", server),
        ("default/client", locked),
    ] {
        ensure!(
            !reaches(&mesh, from, to),
            "{from} reached {to} while n2's agent was down"
        );
    }
    // Nothing listens on the pods' HBONE port now: a peer's SYN to it is refused at once
    // (the reset leaves the pod), so that a peer agent retries soon instead of waiting a
    // SYN retransmission (a second) for the restarted agent.
    let hbone = SocketAddr::new(server.ip(), 15008);
    let started = Instant::now();
    let dialled = mesh.in_pod("legacy/outsider", || {
        TcpStream::connect_timeout(&hbone, Duration::from_millis(800))
    })?;
    ensure!(
        matches!(&dialled, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused),
        "{hbone} while n2's agent was down: {dialled:?} after {:?} (want: refused at once)",
        started.elapsed()
    );

    mesh.start_ztunnel("n2")?;
    // The first connections after the restart dial new HBONE connections: the capture sees
    // their SYNs.
    let capture = mesh.capture_wire()?;
    for (from, to, allowed) in reach_table {
        expect_reach(&mesh, from, to, allowed, "after the restart")?;
    }
    let wire = capture.stop()?;
    ensure!(
        refused_by_peer_authn(&mesh, "n2")? >= 1.0,
        "the new agent did not count refusing plaintext to the STRICT pod"
    );
    let client_ip = mesh.pod_ip("default/client")?;
    for to in [server, locked] {
        let SocketAddr::V4(to) = to else {
            bail!("pod address {to} is not IPv4");
        };
        let ports = server_ports_between(&wire, client_ip, *to.ip());
        ensure!(
            ports == BTreeSet::from([HBONE_PORT]),
            "client reached {to} over ports {ports:?} after the restart"
        );
        let ping = format!("ping from default/client to {to}");
        ensure!(
            !wire.contains(ping.as_bytes()),
            "client's bytes to {to} in clear"
        );
    }

    for (pod, before) in n2_pods.into_iter().zip(rules_before) {
        let tables = mesh.exec_ok(pod, &["nft", "list", "tables"])?;
        let tables: Vec<&str> = tables.lines().map(str::trim).collect();
        let want: &[&str] = match backend(&mesh) {
            Redirect::Nftables => &[NFT_TABLE],
            Redirect::Ebpf => &[],
        };
        ensure!(tables == want, "{pod}: nft tables {tables:?}");
        let setup = setup_in_pod(&mesh, pod)?;
        ensure!(
            setup.ip_rules == 1,
            "{pod}: {} ip rules for {AGENT_RULE}",
            setup.ip_rules
        );
        let after = redirection_of(&mesh, pod)?;
        ensure!(
            after == before,
            "{pod}: redirection changed across the restart:\nbefore:\n{before}\nafter:\n{after}"
        );
    }

    let new_pid = mesh.ztunnel_pid("n2").context("n2 agent runs again")?;
    ensure!(new_pid != old_pid, "the restarted agent kept pid {old_pid}");
    let agents = agent_pids_in_node(&mesh, "n2")?;
    ensure!(
        agents == [new_pid],
        "agents in n2's namespace: {agents:?} (new {new_pid}, old {old_pid})"
    );

    // Killed again: a connection opened while the agent is down waits for the next one
    // (the client's agent dials the refusing HBONE port again within its connect timeout)
    // instead of failing.
    mesh.kill_ztunnel("n2")?;
    // (The client's agent hears of the crash from its pooled connection's reset first.)
    std::thread::sleep(Duration::from_millis(100));
    let payload = b"opened while the server's agent was down";
    let (across, started) = std::thread::scope(|scope| {
        let across = scope.spawn(|| mesh.echo_roundtrip("default/client", server, payload));
        std::thread::sleep(Duration::from_millis(200));
        let started = mesh.start_ztunnel("n2");
        (across.join(), started)
    });
    started?;
    let across = across.map_err(|_| anyhow::anyhow!("the connecting thread panicked"))?;
    ensure!(
        matches!(&across, Ok(back) if back == payload),
        "a connection opened while n2's agent was down: {across:?}"
    );
    Ok(())
}

/// A pod opted out while its agent is down keeps failing closed only until the next agent
/// starts: that one finds the old capture (eBPF: the pinned program and its pins; nftables:
/// the table) in a pod it does not enroll and removes it, so the pod is reachable directly and
/// nothing of the old agent is left in it.
#[test]
fn a_pod_released_while_its_agent_is_down_is_cleaned_up_by_the_next_agent() -> Result<()> {
    let mesh = Mesh::builder("release_while_down")
        .node("n1")
        .namespace("default", Ambient::Yes)
        .namespace("legacy", Ambient::No)
        .pod(Pod::new("default", "web").on("n1").service_account("web"))
        .pod(Pod::new("legacy", "outsider").on("n1"))
        .build()?;
    let _web = mesh.spawn_echo("default/web", APP_PORT, "web")?;
    let web = app_addr(&mesh, "default/web")?;
    expect_setup(&mesh, "n1", "default/web", Setup::Enrolled, "web enrolled")?;
    let pins = |mesh: &Mesh| -> Vec<String> {
        let dir = mesh.bpf_fs().map(|fs| fs.join("ztunnel"));
        dir.and_then(|d| std::fs::read_dir(d).ok())
            .into_iter()
            .flatten()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .collect()
    };
    if backend(&mesh) == Redirect::Ebpf {
        let pinned = pins(&mesh);
        ensure!(
            pinned.len() == 1 && pinned[0].starts_with("default_web_"),
            "pins while enrolled: {pinned:?}"
        );
    }

    mesh.kill_ztunnel("n1")?;
    ensure!(
        !reaches(&mesh, "legacy/outsider", web),
        "web was reachable while its agent was down (the capture must fail closed)"
    );
    relabel(
        &mesh,
        Object::Pod("default/web"),
        DATAPLANE_MODE,
        Some("none"),
    )?;
    mesh.start_ztunnel("n1")?;

    expect_setup(
        &mesh,
        "n1",
        "default/web",
        Setup::Gone,
        "web released by the new agent",
    )?;
    expect_reach(
        &mesh,
        "legacy/outsider",
        web,
        true,
        "after the new agent released web",
    )?;
    let tables = mesh.exec_ok("default/web", &["nft", "list", "tables"])?;
    ensure!(
        tables.trim().is_empty(),
        "web still has nft tables: {tables}"
    );
    let pinned = pins(&mesh);
    ensure!(pinned.is_empty(), "pins left after the release: {pinned:?}");
    Ok(())
}

/// A kubelet-style probe: the node itself connects to an enrolled pod's IP. The node sends it
/// from the link-local probe address (as Istio's CNI arranges), which the pod's capture lets
/// through to the application uncaptured, so probes work even when the pod is STRICT.
#[test]
fn a_probe_from_the_node_reaches_an_enrolled_pod_even_under_strict() -> Result<()> {
    let mesh = Mesh::builder("node_probe")
        .node("n1")
        .namespace("default", Ambient::Yes)
        .namespace("legacy", Ambient::No)
        .pod(Pod::new("default", "web").on("n1").service_account("web"))
        .pod(Pod::new("legacy", "outsider").on("n1"))
        .build()?;
    let _web = mesh.spawn_echo("default/web", APP_PORT, "web")?;
    expect_setup(&mesh, "n1", "default/web", Setup::Enrolled, "web enrolled")?;
    let web = app_addr(&mesh, "default/web")?;

    let probe = |why: &str| -> Result<()> {
        let reply = probe_from_node(&mesh, "n1", web, "/healthz").context(why.to_string())?;
        ensure!(
            reply["server"] == "web",
            "{why}: answered by {}",
            reply["server"]
        );
        ensure!(reply["path"] == "/healthz", "{why}: path {}", reply["path"]);
        let peer = reply["peer"].as_str().unwrap_or_default();
        ensure!(
            peer.starts_with(&format!("{}:", e2e::PROBE_SOURCE)),
            "{why}: the app saw {peer}, probes come from {}",
            e2e::PROBE_SOURCE
        );
        Ok(())
    };
    probe("permissive")?;

    mesh.write_yaml(
        "strict.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: default\nspec:\n  mtls:\n    mode: STRICT\n",
    )?;
    // STRICT is in force (plaintext from a pod outside the mesh is refused)...
    wait_until("STRICT refuses the outsider", APPLY, || {
        Ok(
            !matches!(mesh.echo_roundtrip("legacy/outsider", web, b"plain"), Ok(back) if back == b"plain"),
        )
    })?;
    // ...and the node's probe still reaches the app.
    probe("strict")?;
    Ok(())
}

/// The agent dials its upstream connections from inside the pod (HBONE to the peer's 15008,
/// and plain TCP to destinations outside the mesh), marked so the pod's capture leaves them
/// alone. Were they captured, each would come back to the agent's own 15001 listener: a second
/// outbound connection per application connection, refused as a loop to the agent itself. So
/// one connection of the app to an enrolled server and one to a server outside the mesh must
/// be exactly two outbound connections for n1's agent, with no refusal, and the pod holds the
/// agent's HBONE connection to the server's 15008 directly.
#[test]
fn the_agents_own_upstream_connections_are_not_captured() -> Result<()> {
    let mesh = Mesh::two_nodes("no_loops")
        .namespace("legacy", Ambient::No)
        .pod(
            Pod::new("default", "server")
                .on("n2")
                .service_account("server"),
        )
        .pod(Pod::new("legacy", "outside").on("n2"))
        .build()?;
    let _server = mesh.spawn_echo("default/server", APP_PORT, "server")?;
    let _outside = mesh.spawn_echo("legacy/outside", APP_PORT, "outside")?;
    let server = app_addr(&mesh, "default/server")?;
    let outside = app_addr(&mesh, "legacy/outside")?;

    let mut to_server = LongLived::open(&mesh, "default/client", server)?;
    to_server.exchange("to the enrolled server")?;
    let mut to_outside = LongLived::open(&mesh, "default/client", outside)?;
    to_outside.exchange("to the server outside the mesh")?;

    let metrics = mesh.metrics("n1")?;
    let opened = prom::sum(&metrics, OPENED, &[("reporter", "source")]);
    let refused = prom::sum(&metrics, REFUSED, &[]);
    ensure!(
        opened == 2.0 && refused == 0.0,
        "n1's agent counted {opened} outbound connections and {refused} refusals for 2 app \
         connections: its own upstream connections were captured"
    );
    let hbone = format!("{}:{HBONE_PORT}", server.ip());
    let established = mesh.exec_ok(
        "default/client",
        &["ss", "-H", "-t", "-n", "state", "established"],
    )?;
    let upstream = established.lines().filter(|l| l.contains(&hbone)).count();
    ensure!(
        upstream == 1,
        "the client pod should hold one HBONE connection to {hbone}, has {upstream}:\n{established}"
    );
    to_server.exchange("after the checks")?;
    to_outside.exchange("after the checks")?;
    Ok(())
}

// === enrollment as seen from the pod ===

/// What the agent has set up for one pod.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Setup {
    /// Listed by its agent, capturing (redirect rules), ip rule installed, 15001 listening.
    Enrolled,
    /// Not listed, not capturing, no listener. The mark handling and reply routing that its
    /// established connections still need (eBPF: one ip rule per connection) may remain until
    /// they finish.
    Released,
    /// Released and nothing of the agent left in the pod (no table, no ip rule).
    Gone,
}

/// The pieces of a pod's enrollment visible from inside its namespace.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PodSetup {
    /// The backend's capture exists (nftables: the table; eBPF: one `sk_lookup` link).
    installed: bool,
    /// New connections are captured (nftables: the redirect chains hold rules; eBPF: the link
    /// and the outgoing-capture rule).
    capturing: bool,
    /// The agent's policy-routing rules, besides the eBPF backend's DNS one.
    ip_rules: usize,
    /// The eBPF backend's rule routing the pod's DNS (UDP 53) to the agent.
    dns_rule: bool,
    outbound_listener: bool,
}

fn backend(mesh: &Mesh) -> Redirect {
    mesh.redirect().unwrap_or(Redirect::Nftables)
}

fn setup_in_pod(mesh: &Mesh, pod: &str) -> Result<PodSetup> {
    let rules = mesh.exec_ok(pod, &["ip", "rule", "show"])?;
    let listeners = mesh.exec_ok(pod, &["ss", "-H", "-t", "-l", "-n"])?;
    let outbound_port = format!(":{OUTBOUND_PORT}");
    let (installed, capturing) = match backend(mesh) {
        Redirect::Nftables => {
            let nft = mesh.exec(pod, &["nft", "list", "table", "inet", "ztunnel"])?;
            let ok = nft.status.success();
            (
                ok,
                ok && String::from_utf8_lossy(&nft.stdout).contains("redirect"),
            )
        }
        Redirect::Ebpf => {
            let links = mesh.capture_links(pod)?;
            ensure!(links.len() <= 1, "{pod}: {} capture links", links.len());
            let attached = links.len() == 1;
            (attached, attached && rules.contains(EBPF_CAPTURE_RULE))
        }
    };
    Ok(PodSetup {
        installed,
        capturing,
        ip_rules: rules
            .lines()
            .filter(|l| l.contains(AGENT_RULE) && !l.contains(DNS_RULE))
            .count(),
        dns_rule: rules
            .lines()
            .any(|l| l.contains(AGENT_RULE) && l.contains(DNS_RULE)),
        // Columns: state, recv-q, send-q, local address:port, peer address:port.
        outbound_listener: listeners.lines().any(|l| {
            l.split_whitespace()
                .nth(3)
                .is_some_and(|local| local.ends_with(&outbound_port))
        }),
    })
}

/// Waits until `pod`'s agent on `node` and the pod's namespace both show `want`.
fn expect_setup(mesh: &Mesh, node: &str, pod: &str, want: Setup, why: &str) -> Result<()> {
    let enrolled = want == Setup::Enrolled;
    let dns_routed = backend(mesh) == Redirect::Ebpf;
    let matches = |setup: &PodSetup| match want {
        Setup::Enrolled => {
            setup.installed
                && setup.capturing
                && setup.ip_rules == 1
                && setup.dns_rule == dns_routed
                && setup.outbound_listener
        }
        Setup::Released => !setup.capturing && !setup.dns_rule && !setup.outbound_listener,
        Setup::Gone => {
            !setup.installed
                && !setup.capturing
                && setup.ip_rules == 0
                && !setup.dns_rule
                && !setup.outbound_listener
        }
    };
    let mut last = None;
    let result = wait_until(why, APPLY, || {
        let listed = served(mesh, node)?.contains(pod);
        let setup = setup_in_pod(mesh, pod)?;
        last = Some((listed, setup));
        Ok(listed == enrolled && matches(&setup))
    });
    result.with_context(|| {
        let rules = mesh
            .exec_ok(pod, &["ip", "rule", "show"])
            .unwrap_or_default();
        let log = mesh.ztunnel_log(node);
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        format!(
            "{pod} on {node} should be {want:?}; last seen (listed, setup): {last:?}\n\
             its rules:\n{rules}\n{node}'s agent, last lines:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        )
    })
}

/// How many rules (eBPF backend) keep connections the pod opened or accepted while released
/// off the capture: `lookup main` rules for single connections, below the capture rule (not
/// the one for everything from the HBONE port, which stays while the pod is captured).
fn direct_rules(mesh: &Mesh, pod: &str) -> Result<usize> {
    let rules = mesh.exec_ok(pod, &["ip", "rule", "show"])?;
    Ok(rules
        .lines()
        .filter(|l| l.contains("sport") && l.contains("lookup main"))
        .filter(|l| !l.contains("iif lo ipproto tcp sport 15008 lookup main"))
        .count())
}

/// The pods the node's agent lists under `workloads` in `/config_dump`.
fn served(mesh: &Mesh, node: &str) -> Result<BTreeSet<String>> {
    let dump: Value = serde_json::from_str(&mesh.admin(node, "/config_dump")?)
        .with_context(|| format!("parse /config_dump of {node}"))?;
    let workloads = dump["workloads"]
        .as_array()
        .with_context(|| format!("{node}: /config_dump has no workloads list"))?;
    Ok(workloads
        .iter()
        .filter(|w| w["state"] == "enrolled")
        .filter_map(|w| w["pod"].as_str().map(str::to_owned))
        .collect())
}

/// The pod's redirection as text, to compare across agent restarts: the agent's nft table or
/// capture link (an adopted link keeps its id), and the ip rules.
fn redirection_of(mesh: &Mesh, pod: &str) -> Result<String> {
    let capture = match backend(mesh) {
        Redirect::Nftables => mesh.exec_ok(pod, &["nft", "list", "table", "inet", "ztunnel"])?,
        Redirect::Ebpf => format!("sk_lookup links {:?}", mesh.capture_links(pod)?),
    };
    let rules = mesh.exec_ok(pod, &["ip", "rule", "show"])?;
    Ok(format!("{capture}\n{rules}"))
}

// === configuration ===

/// An object of the harness's topology file.
#[derive(Clone, Copy, Debug)]
enum Object<'a> {
    Namespace(&'a str),
    /// `namespace/name`.
    Pod(&'a str),
}

impl Object<'_> {
    fn matches(&self, doc: &Value) -> bool {
        let meta = &doc["metadata"];
        match *self {
            Object::Namespace(name) => doc["kind"] == "Namespace" && meta["name"] == name,
            Object::Pod(key) => {
                doc["kind"] == "Pod"
                    && key
                        .split_once('/')
                        .is_some_and(|(ns, name)| meta["namespace"] == ns && meta["name"] == name)
            }
        }
    }
}

/// Sets (`Some`) or removes (`None`) one label of one object by rewriting the harness's
/// topology file. The object has to stay in that file: the loader rejects an object defined
/// twice, so an override in another file would only leave the agents on their last good
/// config.
fn relabel(mesh: &Mesh, object: Object<'_>, key: &str, value: Option<&str>) -> Result<()> {
    let path = mesh.config_dir().join(TOPOLOGY);
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let mut docs: Vec<Value> = Vec::new();
    for (i, doc) in text.split("\n---\n").enumerate() {
        let value: Value = serde_yaml::from_str(doc)
            .with_context(|| format!("{TOPOLOGY} part {i}: parse yaml"))?;
        // The part before the first separator is the harness's header comment.
        if !value.is_null() {
            docs.push(value);
        }
    }
    let target = docs
        .iter_mut()
        .find(|d| object.matches(d))
        .with_context(|| format!("{object:?} is not in {TOPOLOGY}"))?;
    let metadata = target
        .get_mut("metadata")
        .and_then(Value::as_object_mut)
        .with_context(|| format!("{object:?} has no metadata"))?;
    let labels = metadata
        .entry("labels")
        .or_insert_with(|| Value::Object(Default::default()));
    if labels.is_null() {
        *labels = Value::Object(Default::default());
    }
    let labels = labels
        .as_object_mut()
        .with_context(|| format!("{object:?}: labels are not a map"))?;
    match value {
        Some(v) => {
            labels.insert(key.to_owned(), Value::String(v.to_owned()));
        }
        None => {
            if labels.remove(key).is_none() {
                bail!("{object:?} has no label {key}");
            }
        }
    }
    let mut out = String::from("# Rewritten by the enrollment tests.\n");
    for doc in &docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(doc).context("render yaml document")?);
    }
    mesh.write_yaml(TOPOLOGY, &out)
}

// === traffic ===

fn app_addr(mesh: &Mesh, pod: &str) -> Result<SocketAddr> {
    Ok(SocketAddr::new(mesh.pod_ip(pod)?.into(), APP_PORT))
}

/// One echo connection kept open across changes; every exchange must come back intact.
struct LongLived {
    from: String,
    stream: TcpStream,
}

impl LongLived {
    fn open(mesh: &Mesh, from: &str, to: SocketAddr) -> Result<Self> {
        let stream = mesh.connect(from, to)?;
        // An echo on a live connection takes milliseconds; a broken one should fail the test
        // soon rather than after the harness's generic 15 s.
        stream.set_read_timeout(Some(ECHO_TIMEOUT))?;
        Ok(LongLived {
            from: from.to_owned(),
            stream,
        })
    }

    fn exchange(&mut self, when: &str) -> Result<()> {
        // Never an HTTP request line, so mesh-echo treats the connection as raw bytes.
        let msg = format!("long-lived bytes {when}");
        let mut back = vec![0u8; msg.len()];
        self.stream
            .write_all(msg.as_bytes())
            .and_then(|()| self.stream.read_exact(&mut back))
            .with_context(|| format!("long-lived connection from {} {when}", self.from))?;
        ensure!(
            back == msg.as_bytes(),
            "long-lived connection from {} {when}: got {:?}",
            self.from,
            String::from_utf8_lossy(&back)
        );
        Ok(())
    }
}

/// Whether an echo round trip from `from` to `to` comes back intact (a refusal or reset
/// does not).
fn reaches(mesh: &Mesh, from: &str, to: SocketAddr) -> bool {
    let payload = format!("ping from {from} to {to}");
    matches!(mesh.echo_roundtrip(from, to, payload.as_bytes()), Ok(back) if back == payload.as_bytes())
}

fn expect_reach(mesh: &Mesh, from: &str, to: SocketAddr, allowed: bool, when: &str) -> Result<()> {
    let verdict = if allowed { "allowed" } else { "refused" };
    wait_until(&format!("{from} -> {to} {verdict} {when}"), APPLY, || {
        Ok(reaches(mesh, from, to) == allowed)
    })
}

/// Echoes `marker` from `from` to `to` with the wire between the nodes captured.
fn echo_captured(mesh: &Mesh, from: &str, to: SocketAddr, marker: &[u8]) -> Result<CaptureSummary> {
    let capture = mesh.capture_wire()?;
    let back = mesh.echo_roundtrip(from, to, marker)?;
    let summary = capture.stop()?;
    ensure!(
        back == marker,
        "{from} -> {to}: echo returned {:?}",
        String::from_utf8_lossy(&back)
    );
    Ok(summary)
}

/// Server ports of the TCP connections opened across the wire from `client` to `server`
/// (the agent dials HBONE from inside the pod, so from the pod's own IP).
fn server_ports_between(
    wire: &CaptureSummary,
    client: Ipv4Addr,
    server: Ipv4Addr,
) -> BTreeSet<u16> {
    wire.tcp_connections()
        .into_iter()
        .filter(|(c, s)| *c.ip() == client && *s.ip() == server)
        .map(|(_, s)| s.port())
        .collect()
}

/// `GET path` from the node's own namespace (as a kubelet probe would), with curl.
fn probe_from_node(mesh: &Mesh, node: &str, to: SocketAddr, path: &str) -> Result<Value> {
    let url = format!("http://{to}{path}");
    let out = mesh.exec_node(
        node,
        &["curl", "-sS", "--fail", "--max-time", "10", url.as_str()],
    )?;
    ensure!(
        out.status.success(),
        "probe {url} from {node} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "probe {url}: reply is not json: {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

// === metrics and processes ===

/// Connections n1's agent opened for sources in namespace `apps`.
fn opened_from_apps(mesh: &Mesh) -> Result<f64> {
    Ok(prom::sum(
        &mesh.metrics("n1")?,
        OPENED,
        &[
            ("reporter", "source"),
            ("source_workload_namespace", "apps"),
        ],
    ))
}

fn refused_by_peer_authn(mesh: &Mesh, node: &str) -> Result<f64> {
    Ok(prom::sum(
        &mesh.metrics(node)?,
        REFUSED,
        &[("reason", "PEERAUTHN")],
    ))
}

/// Pids of the `ztunnel` processes living in the node's namespace.
fn agent_pids_in_node(mesh: &Mesh, node: &str) -> Result<Vec<u32>> {
    let netns = mesh.node_netns(node)?;
    let out = Command::new("ip")
        .args(["netns", "pids", &netns])
        .output()
        .with_context(|| format!("run ip netns pids {netns}"))?;
    ensure!(
        out.status.success(),
        "ip netns pids {netns}: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let mut pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|pid| {
            // A process may exit between the listing and this read: then it is not an agent.
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "ztunnel")
        })
        .collect();
    pids.sort_unstable();
    Ok(pids)
}
