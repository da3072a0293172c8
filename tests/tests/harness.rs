//! The harness on its own, with no ztunnel: topology up and down, plain pod-to-pod traffic
//! across nodes, the echo server behind it, wire capture, and cleanup.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use anyhow::{Context, Result};
use e2e::{
    cleanup_stale, eventually, wait_until, Ambient, ChildGuard, Mesh, Pod, Service, MARKER_ENV,
};

/// Two nodes with two pods each, no node agent: traffic is plain routed IPv4.
fn two_nodes_two_pods_each(test: &str) -> Result<Mesh> {
    Mesh::builder(test)
        .node("n1")
        .node("n2")
        .without_ztunnel()
        .namespace("default", Ambient::Yes)
        .pod(Pod::new("default", "a1").on("n1").labels([("app", "a")]))
        .pod(Pod::new("default", "a2").on("n1"))
        .pod(Pod::new("default", "b1").on("n2").labels([("app", "b")]))
        .pod(Pod::new("default", "b2").on("n2"))
        .service(
            Service::new("default", "b")
                .vip("10.96.0.10")
                .port(80, 8080)
                .selector([("app", "b")]),
        )
        .build()
}

fn addr(mesh: &Mesh, pod: &str, port: u16) -> Result<SocketAddr> {
    Ok(SocketAddr::from((mesh.pod_ip(pod)?, port)))
}

fn netns_with_prefix(prefix: &str) -> Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output()?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| name.starts_with(prefix))
        .map(str::to_owned)
        .collect())
}

/// Processes carrying the harness marker for `prefix` that are still alive (not zombies).
fn live_marked_processes(prefix: &str) -> Vec<u32> {
    let needle = format!("{MARKER_ENV}={prefix}");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|&b| b == 0)
                    .any(|v| v.starts_with(needle.as_bytes()))
            })
        })
        .filter(|pid| !is_zombie_or_gone(*pid))
        .collect()
}

fn is_zombie_or_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

#[test]
fn a_pod_on_one_node_reaches_a_pod_on_the_other_which_sees_the_true_client_ip() -> Result<()> {
    let mesh = two_nodes_two_pods_each("cross_node_http")?;
    let _server = mesh.spawn_echo("default/b1", 8080, "b1")?;

    let reply = mesh.http_get("default/a1", addr(&mesh, "default/b1", 8080)?, "/hello")?;

    assert_eq!(reply.status, 200);
    let body = reply.json()?;
    assert_eq!(body["server"], "b1");
    assert_eq!(body["method"], "GET");
    assert_eq!(body["path"], "/hello");
    let peer = body["peer"].as_str().context("peer is a string")?;
    let client_ip = mesh.pod_ip("default/a1")?;
    assert!(
        peer.starts_with(&format!("{client_ip}:")),
        "server saw {peer}, client is {client_ip}"
    );
    Ok(())
}

#[test]
fn every_pod_reaches_every_other_pod_on_the_same_or_the_other_node() -> Result<()> {
    let mesh = two_nodes_two_pods_each("full_mesh")?;
    let pods = mesh.pods();
    let _servers: Vec<ChildGuard> = pods
        .iter()
        .map(|pod| mesh.spawn_echo(pod, 9000, pod))
        .collect::<Result<_>>()?;

    let check = |from: &str, to: &str| -> Result<()> {
        let payload = format!("hello from {from} to {to}");
        let back = mesh.echo_roundtrip(from, addr(&mesh, to, 9000)?, payload.as_bytes())?;
        assert_eq!(String::from_utf8_lossy(&back), payload, "{from} -> {to}");
        Ok(())
    };
    for from in &pods {
        for to in pods.iter().filter(|to| *to != from) {
            check(from, to)?;
        }
    }
    Ok(())
}

#[test]
fn the_wire_capture_sees_cross_node_bytes_in_clear_and_nothing_node_local() -> Result<()> {
    let mesh = two_nodes_two_pods_each("capture_clear")?;
    let _far = mesh.spawn_echo("default/b1", 8080, "b1")?;
    let _near = mesh.spawn_echo("default/a2", 8080, "a2")?;
    let capture = mesh.capture_wire()?;

    let across = b"MARKER-across-the-wire-7c1e";
    let local = b"MARKER-stays-on-node-n1-93fd";
    let back = mesh.echo_roundtrip("default/a1", addr(&mesh, "default/b1", 8080)?, across)?;
    assert_eq!(back, across);
    let back = mesh.echo_roundtrip("default/a1", addr(&mesh, "default/a2", 8080)?, local)?;
    assert_eq!(back, local);
    let summary = capture.stop()?;

    assert!(
        summary.contains(across),
        "cross-node bytes missing from the capture"
    );
    assert!(
        !summary.contains(local),
        "node-local bytes must not cross the wire"
    );
    let server = std::net::SocketAddrV4::new(mesh.pod_ip("default/b1")?, 8080);
    let clients: BTreeSet<_> = summary
        .tcp_connections()
        .into_iter()
        .filter(|(_, to)| *to == server)
        .map(|(from, _)| *from.ip())
        .collect();
    assert_eq!(clients, BTreeSet::from([mesh.pod_ip("default/a1")?]));
    assert_eq!(summary.tcp_server_ports(), BTreeSet::from([8080]));
    Ok(())
}

#[test]
fn dropping_the_mesh_removes_its_namespaces_and_kills_its_processes() -> Result<()> {
    let mesh = two_nodes_two_pods_each("drop_cleans")?;
    let prefix = mesh.prefix().to_owned();
    let work_dir = mesh.work_dir().to_path_buf();
    let server = mesh.spawn_echo("default/b2", 8080, "b2")?;
    // A daemonised process the test holds no guard for: only the mesh's sweep can end it.
    let stray = mesh.exec_ok(
        "default/a1",
        &["sh", "-c", "sleep 300 >/dev/null 2>&1 </dev/null & echo $!"],
    )?;
    let stray_pid: u32 = stray.trim().parse()?;
    assert!(!is_zombie_or_gone(stray_pid));
    assert_eq!(
        netns_with_prefix(&prefix)?.len(),
        1 + 2 + 4,
        "wire, nodes, pods"
    );

    drop(mesh);

    assert_eq!(netns_with_prefix(&prefix)?, Vec::<String>::new());
    assert_eq!(live_marked_processes(&prefix), Vec::<u32>::new());
    assert!(is_zombie_or_gone(stray_pid));
    assert!(
        !work_dir.exists(),
        "work dir {} left behind",
        work_dir.display()
    );
    drop(server);
    Ok(())
}

#[test]
fn a_test_that_panics_still_leaves_nothing_behind() -> Result<()> {
    let prefix = Mutex::new(String::new());
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mesh = two_nodes_two_pods_each("panic_cleans").expect("mesh builds");
        *prefix.lock().expect("not poisoned") = mesh.prefix().to_owned();
        let _server = mesh
            .spawn_echo("default/b1", 8080, "b1")
            .expect("echo starts");
        panic!("the test body fails while the mesh is up");
    }));

    assert!(outcome.is_err());
    let prefix = prefix.into_inner().expect("not poisoned");
    assert!(prefix.starts_with("mt"), "{prefix:?}");
    assert_eq!(netns_with_prefix(&prefix)?, Vec::<String>::new());
    assert_eq!(live_marked_processes(&prefix), Vec::<u32>::new());
    Ok(())
}

#[test]
fn cleanup_stale_removes_what_a_killed_test_run_left_behind() -> Result<()> {
    // What a SIGKILLed test leaves: namespaces with the prefix and a process inside one.
    let prefix = format!("mt{:06x}-", (std::process::id() ^ 0x5a5a5a) & 0xff_ffff);
    for name in ["n1", "default.x"] {
        let status = Command::new("ip")
            .args(["netns", "add", &format!("{prefix}{name}")])
            .status()?;
        assert!(status.success());
    }
    let mut orphan = Command::new("ip")
        .args([
            "netns",
            "exec",
            &format!("{prefix}default.x"),
            "sleep",
            "300",
        ])
        .env(MARKER_ENV, &prefix)
        .spawn()?;
    let orphan_comm = format!("/proc/{}/comm", orphan.id());
    wait_until(
        "the orphan to run inside its netns",
        Duration::from_secs(10),
        || Ok(std::fs::read_to_string(&orphan_comm)?.trim() == "sleep"),
    )?;

    let swept = cleanup_stale(&prefix)?;

    assert_eq!(
        swept.netns,
        [format!("{prefix}default.x"), format!("{prefix}n1")]
    );
    let orphan_pid = i32::try_from(orphan.id())?;
    assert!(swept.killed.contains(&orphan_pid), "{swept:?}");
    let status = orphan.wait()?;
    assert!(!status.success(), "the orphan was killed, it did not exit");
    assert_eq!(netns_with_prefix(&prefix)?, Vec::<String>::new());
    Ok(())
}

#[test]
fn sweeping_a_prefix_that_is_not_the_harness_s_is_refused() {
    let err = cleanup_stale("docker").expect_err("foreign prefix");
    assert!(format!("{err}").contains("refusing"), "{err}");
}

#[test]
fn pods_have_their_address_and_a_default_route_via_their_node_which_has_no_way_out() -> Result<()> {
    let mesh = two_nodes_two_pods_each("routes")?;

    let addrs = mesh.exec_ok(
        "default/b2",
        &["ip", "-4", "-o", "addr", "show", "dev", "eth0"],
    )?;
    assert!(addrs.contains("10.244.2.3/32"), "{addrs}");
    let routes = mesh.exec_ok("default/b2", &["ip", "-4", "route", "show"])?;
    assert!(
        routes.contains("default via 10.244.2.1 dev eth0"),
        "{routes}"
    );

    for node in mesh.nodes() {
        let out = mesh.exec_node(&node, &["ip", "-4", "route", "show"])?;
        let routes = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success());
        assert!(
            !routes.contains("default"),
            "node {node} has a way out: {routes}"
        );
    }
    let n1_routes =
        String::from_utf8_lossy(&mesh.exec_node("n1", &["ip", "route"])?.stdout).into_owned();
    assert!(
        n1_routes.contains("10.244.2.0/24 via 10.255.0.2 dev wire"),
        "{n1_routes}"
    );
    Ok(())
}

#[test]
fn the_config_directory_holds_the_topology_and_takes_extra_files() -> Result<()> {
    let mesh = two_nodes_two_pods_each("config_dir")?;
    let topology = std::fs::read_to_string(mesh.config_dir().join("topology.yaml"))?;
    for expected in [
        "kind: Namespace",
        "istio.io/dataplane-mode: ambient",
        "kind: Pod",
        "podIP: 10.244.2.2",
        "nodeName: n2",
        "kind: Service",
        "clusterIP: 10.96.0.10",
    ] {
        assert!(topology.contains(expected), "missing {expected:?}");
    }

    mesh.write_yaml("policy.yaml", "kind: AuthorizationPolicy\n")?;
    let written = eventually("policy file visible", Duration::from_secs(1), || {
        Ok(std::fs::read_to_string(
            mesh.config_dir().join("policy.yaml"),
        )?)
    })?;
    assert_eq!(written, "kind: AuthorizationPolicy\n");
    mesh.remove_yaml("policy.yaml")?;
    assert!(!mesh.config_dir().join("policy.yaml").exists());
    assert!(mesh.write_yaml("../escape.yaml", "").is_err());
    let leftovers: Vec<_> = std::fs::read_dir(mesh.config_dir())?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(leftovers, ["topology.yaml"]);
    Ok(())
}

#[test]
fn a_command_that_hangs_is_killed_at_its_time_limit() -> Result<()> {
    let mesh = Mesh::builder("exec_timeout")
        .node("n1")
        .without_ztunnel()
        .namespace("default", Ambient::No)
        .pod(Pod::new("default", "p").on("n1"))
        .build()?;
    let err = mesh
        .exec_timeout("default/p", &["sleep", "30"], Duration::from_millis(200))
        .expect_err("must time out");
    assert!(format!("{err}").contains("did not finish"), "{err}");
    Ok(())
}

#[test]
fn asking_for_something_the_mesh_does_not_have_is_an_error() -> Result<()> {
    let mesh = Mesh::builder("unknown_names")
        .node("n1")
        .without_ztunnel()
        .namespace("default", Ambient::No)
        .pod(Pod::new("default", "p").on("n1"))
        .build()?;
    assert!(mesh.pod_ip("default/nope").is_err());
    assert!(mesh.exec("nope/p", &["true"]).is_err());
    assert!(mesh.metrics("n9").is_err());
    assert!(mesh.start_ztunnel("n1").is_err(), "n1 is bare");
    assert!(mesh.stop_ztunnel("n1").is_err());
    assert_eq!(mesh.ztunnel_log("n1"), "");
    Ok(())
}

/// Writes an executable shell script standing in for ztunnel.
fn stand_in_ztunnel(dir: &std::path::Path, body: &str) -> Result<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("ztunnel");
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

#[test]
fn node_agents_are_started_per_node_waited_for_queried_and_restarted() -> Result<()> {
    // mesh-echo answers 200 on every path, which is all the harness needs from a ztunnel's
    // readiness, metrics and admin ports.
    let bin_dir = tempfile::tempdir()?;
    let fake = stand_in_ztunnel(
        bin_dir.path(),
        &format!(
            "echo \"stand-in ztunnel: $*\" >&2\nexec {} --port 15000 --port 15020 --port 15021 --name \"$2\"",
            env!("CARGO_BIN_EXE_mesh-echo")
        ),
    )?;
    let mesh = Mesh::builder("stand_in_ztunnel")
        .node("n1")
        .node("n2")
        .bare_node("n3")
        .namespace("default", Ambient::Yes)
        .pod(Pod::new("default", "a").on("n1"))
        .ztunnel_binary(&fake)
        .ztunnel_args(["--redirect", "none"])
        .build()?;

    let log = mesh.ztunnel_log("n1");
    // The agent is a client of the mesh's CA process: the root, a token, no CA directory.
    let expected_args = format!(
        "stand-in ztunnel: --node-name n1 --config-dir {} --ca-address https://10.255.0.253:15012 \
         --ca-root-file {} --ca-token-file {} --ca-server-name istiod.istio-system.svc \
         --netns-prefix {} --redirect none",
        mesh.config_dir().display(),
        mesh.ca_dir().join("root-cert.pem").display(),
        mesh.work_dir().join("tokens/node-n1.token").display(),
        mesh.prefix()
    );
    assert!(log.contains(&expected_args), "{log}");
    assert!(!log.contains("--ca-dir"), "{log}");
    assert!(
        mesh.control_pid().is_some(),
        "the CA runs as its own process"
    );
    assert_eq!(mesh.ztunnel_log("n3"), "", "a bare node runs no agent");

    let metrics: serde_json::Value = serde_json::from_str(&mesh.metrics("n1")?)?;
    assert_eq!(metrics["path"], "/metrics");
    assert_eq!(metrics["server"], "n1");
    let admin: serde_json::Value =
        serde_json::from_str(&mesh.admin_post("n2", "/logging?level=debug")?)?;
    assert_eq!(admin["method"], "POST");
    assert_eq!(admin["server"], "n2");

    let first_pid = mesh.ztunnel_pid("n1").context("n1 runs")?;
    mesh.stop_ztunnel("n1")?;
    assert_eq!(mesh.ztunnel_pid("n1"), None);
    mesh.start_ztunnel("n1")?;
    let second_pid = mesh.ztunnel_pid("n1").context("n1 runs again")?;
    assert_ne!(first_pid, second_pid);
    assert_eq!(
        mesh.ztunnel_log("n1").matches("stand-in ztunnel:").count(),
        2
    );
    assert!(mesh.start_ztunnel("n1").is_err(), "already running");

    mesh.signal_ztunnel("n2", nix::sys::signal::Signal::SIGTERM)?;
    wait_until("n2's agent to exit", Duration::from_secs(10), || {
        Ok(mesh.ztunnel_pid("n2").is_none())
    })?;
    assert!(
        mesh.wait_ready("n2").is_err(),
        "an exited agent is not ready"
    );
    mesh.start_ztunnel("n2")?;
    mesh.kill_ztunnel("n2")?;
    assert!(
        mesh.wait_ready("n2").is_err(),
        "a killed agent is not ready"
    );
    Ok(())
}

#[test]
fn a_node_agent_that_dies_at_startup_fails_the_build_with_its_log() -> Result<()> {
    let bin_dir = tempfile::tempdir()?;
    let fake = stand_in_ztunnel(
        bin_dir.path(),
        "echo 'error: unknown flag --frobnicate' >&2\nexit 2",
    )?;
    let started = std::time::Instant::now();

    let err = Mesh::builder("dying_ztunnel")
        .node("n1")
        .namespace("default", Ambient::Yes)
        .ztunnel_binary(&fake)
        .build()
        .expect_err("the agent exits");

    let text = format!("{err:#}");
    assert!(text.contains("unknown flag --frobnicate"), "{text}");
    assert!(text.contains("exited"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "a dead agent must fail fast, not wait out the readiness timeout"
    );
    Ok(())
}
