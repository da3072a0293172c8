//! The CA service end to end: the real `control` binary in a network namespace of its own,
//! the only process holding the signing key; node agents and waypoints are its clients (a
//! token, the public root, no key). Each test asserts what happens and the reason the CA or
//! the agent gives for it: a stolen node token, a waypoint claiming another identity, the CA
//! down at enrollment, the CA killed during traffic, rotation through the CA.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use e2e::waypoint::{waypoint_mesh, WAYPOINT};
use e2e::{echo_once, eventually, prom, wait_until, Labelled, Mesh, Pod};

const CLIENT: &str = "default/client";
const SERVER: &str = "default/server";
const APP: u16 = 8080;
/// How long the agent may take to see the CA's answer (or its return: the retry backoff
/// grows to a few seconds while the CA is down).
const CA_ANSWER: Duration = Duration::from_secs(40);
/// The CA's refusals, by reason.
const CA_REFUSED: &str = "mesh_ca_requests_refused_total";
const AGENT_REFUSED: &str = "mesh_connections_refused_total";

fn server_addr(mesh: &Mesh) -> Result<SocketAddr> {
    Ok(SocketAddr::new(mesh.pod_ip(SERVER)?.into(), APP))
}

/// Whether a TCP echo round trip from the client to `to` comes back intact.
fn reaches(mesh: &Mesh, to: SocketAddr) -> bool {
    let payload = format!("ping {to}");
    matches!(mesh.echo_roundtrip(CLIENT, to, payload.as_bytes()), Ok(back) if back == payload.as_bytes())
}

/// The state `node`'s agent shows for pod `key` (`ns/name`): `enrolled`, or `pending: ...` with
/// the reason.
fn pod_state(mesh: &Mesh, node: &str, key: &str) -> Result<String> {
    let dump: serde_json::Value = serde_json::from_str(&mesh.admin(node, "/config_dump")?)?;
    let workloads = dump["workloads"].as_array().context("workloads")?;
    let pod = workloads
        .iter()
        .find(|w| w["pod"] == key)
        .with_context(|| format!("pod {key} not enrolled on {node}: {workloads:?}"))?;
    Ok(pod["state"].as_str().unwrap_or_default().to_owned())
}

/// `(caller, identity, grant)` of every certificate the CA issued since it started.
fn issued(mesh: &Mesh) -> Result<Vec<(String, String, String)>> {
    let dump = mesh.control_dump()?;
    let field = |i: &serde_json::Value, k: &str| i[k].as_str().unwrap_or_default().to_owned();
    Ok(dump["issued"]
        .as_array()
        .context("issued")?
        .iter()
        .map(|i| (field(i, "caller"), field(i, "identity"), field(i, "grant")))
        .collect())
}

fn ca_refused(mesh: &Mesh, reason: &str) -> Result<f64> {
    Ok(prom::sum(
        &mesh.control_metrics()?,
        CA_REFUSED,
        &[("reason", reason)],
    ))
}

/// The serial of the certificate `node`'s agent holds for service account `sa`.
fn serial(mesh: &Mesh, node: &str, sa: &str) -> Result<String> {
    let dump: serde_json::Value = serde_json::from_str(&mesh.admin(node, "/config_dump")?)?;
    let cert = dump["certificates"]
        .as_array()
        .context("certificates")?
        .iter()
        .find(|c| {
            c["identity"]
                .as_str()
                .unwrap_or_default()
                .ends_with(&format!("/sa/{sa}"))
        })
        .with_context(|| format!("{node} holds no certificate for sa {sa}"))?;
    Ok(cert["serial"].as_str().unwrap_or_default().to_owned())
}

fn with_server(name: &str) -> e2e::MeshBuilder {
    Mesh::two_nodes(name).pod(Pod::echo_server("server", "n2"))
}

#[test]
fn a_node_agent_with_another_nodes_token_gets_nothing_and_its_pods_fail_closed() -> Result<()> {
    // n1's agent presents n2's token (stolen from n2).
    let mesh = with_server("ca_stolen_token")
        .node_token("n1", "n2")
        .build()?;
    let _server = mesh.spawn_echo(SERVER, APP, "server")?;

    // The client pod (on n1) stays pending with the CA's reason; n1 is not ready.
    let state = eventually("the client pending with the CA's reason", CA_ANSWER, || {
        let state = pod_state(&mesh, "n1", CLIENT)?;
        ensure!(state.contains("no_such_pod_on_node"), "state {state:?}");
        Ok(state)
    })?;
    ensure!(state.starts_with("pending"), "{state}");
    let ready = mesh.readiness_status("n1")?;
    ensure!(
        ready == 503,
        "n1 readiness {ready} without its pods' certificates"
    );

    // Its connection fails closed, refused by its own agent for want of a certificate.
    ensure!(
        !reaches(&mesh, server_addr(&mesh)?),
        "a pod without a certificate reached the server"
    );
    wait_until("n1 counts the refusal as TLS", CA_ANSWER, || {
        Ok(prom::sum(&mesh.metrics("n1")?, AGENT_REFUSED, &[("reason", "TLS")]) >= 1.0)
    })?;

    // The CA refused and counted it, and issued the client's identity to nobody; n2's own
    // agent (the token's rightful holder) got its pod's.
    ensure!(ca_refused(&mesh, "no_such_pod_on_node")? >= 1.0);
    let issued = issued(&mesh)?;
    ensure!(
        !issued.iter().any(|(_, id, _)| id.ends_with("/sa/client")),
        "{issued:?}"
    );
    ensure!(
        issued.contains(&(
            "istio-system/ztunnel @n2".into(),
            "spiffe://cluster.local/ns/default/sa/server".into(),
            "node".into()
        )),
        "{issued:?}"
    );
    Ok(())
}

#[test]
fn a_waypoint_claiming_a_workload_identity_is_refused_and_never_ready() -> Result<()> {
    let mesh = waypoint_mesh("ca_waypoint_claim")
        .pod(Pod::echo_server("server", "n2"))
        .build()?;
    // Its token is for its own account (default/waypoint), its flags claim default/server.
    let mut waypoint =
        mesh.start_waypoint(WAYPOINT, "default", "waypoint", "server", "waypoint")?;

    wait_until("the CA refuses the claimed identity", CA_ANSWER, || {
        Ok(ca_refused(&mesh, "csr_identity")? >= 1.0)
    })?;
    ensure!(waypoint.is_running(), "{}", waypoint.stderr());
    ensure!(
        !mesh.waypoint_ready(WAYPOINT),
        "a waypoint without its certificate reports ready"
    );
    let issued = issued(&mesh)?;
    ensure!(
        !issued
            .iter()
            .any(|(caller, _, _)| caller.contains("waypoint")),
        "the waypoint was issued something: {issued:?}"
    );
    // The same waypoint, configured as itself, is served.
    drop(waypoint);
    let _waypoint = mesh.spawn_default_waypoint()?;
    let issued = self::issued(&mesh)?;
    ensure!(
        issued
            .iter()
            .any(|(caller, id, grant)| caller == "default/waypoint"
                && id == "spiffe://cluster.local/ns/default/sa/waypoint"
                && grant == "own"),
        "{issued:?}"
    );
    Ok(())
}

#[test]
fn a_pod_enrolled_while_the_ca_is_down_waits_then_is_served_once_it_returns() -> Result<()> {
    // The server starts outside the mesh (opted out), so n2 is ready without it.
    let mut mesh = Mesh::two_nodes("ca_down_enroll")
        .pod(Pod::echo_server("server", "n2").labels([("istio.io/dataplane-mode", "none")]))
        .build()?;
    let _server = mesh.spawn_echo(SERVER, APP, "server")?;
    let agent = mesh.ztunnel_pid("n2").context("n2 runs")?;

    mesh.stop_control()?;
    mesh.set_labels(
        Labelled::Pod(SERVER),
        [("app".to_owned(), "echo".to_owned())].into(),
    )?;
    eventually(
        "the server pending: the CA is unreachable",
        CA_ANSWER,
        || {
            let state = pod_state(&mesh, "n2", SERVER)?;
            ensure!(state.starts_with("pending"), "state {state:?}");
            // "(requested)" until the agent's first attempt has failed.
            ensure!(state.contains("unavailable"), "state {state:?}");
            Ok(state)
        },
    )?;
    ensure!(
        mesh.readiness_status("n2")? == 503,
        "n2 ready while pending"
    );
    ensure!(
        !reaches(&mesh, server_addr(&mesh)?),
        "the pending server was reached"
    );

    mesh.start_control()?;
    wait_until("the server served once the CA is back", CA_ANSWER, || {
        Ok(reaches(&mesh, server_addr(&mesh)?))
    })?;
    let state = pod_state(&mesh, "n2", SERVER)?;
    ensure!(state == "enrolled", "{state}");
    ensure!(mesh.readiness_status("n2")? == 200);
    ensure!(
        mesh.ztunnel_pid("n2") == Some(agent),
        "the agent was restarted"
    );
    let issued = issued(&mesh)?;
    ensure!(
        issued.contains(&(
            "istio-system/ztunnel @n2".into(),
            "spiffe://cluster.local/ns/default/sa/server".into(),
            "node".into()
        )),
        "{issued:?}"
    );
    Ok(())
}

/// RELIABILITY 35: an agent that starts while the CA is down serves none of its pods (no
/// plaintext, not ready) and retries with backoff; once the CA is back it is served
/// within one backoff step (at most 30 s, `mesh_pki::certs::RETRY_MAX`; after this
/// outage's few failures, a few seconds), without a restart.
#[test]
fn an_agent_started_while_the_ca_is_down_serves_nothing_until_it_returns() -> Result<()> {
    let mesh = with_server("ca_down_start").build()?;
    let _server = mesh.spawn_echo(SERVER, APP, "server")?;
    let server = server_addr(&mesh)?;
    ensure!(reaches(&mesh, server), "served before the outage");
    mesh.stop_control()?;
    mesh.stop_ztunnel("n2")?;
    let down = Instant::now();
    mesh.start_ztunnel_unready("n2")?;
    eventually(
        "n2 up, its server pending: the CA is unreachable",
        CA_ANSWER,
        || {
            // Still captured (the previous agent's capture stays): the new agent takes the
            // pod over once it holds the pod's certificate.
            let state = pod_state(&mesh, "n2", SERVER)?;
            ensure!(state.starts_with("pending"), "state {state:?}");
            Ok(state)
        },
    )?;
    ensure!(
        mesh.readiness_status("n2")? == 503,
        "n2 ready without its certificates"
    );
    ensure!(
        !reaches(&mesh, server),
        "the server was reached without its identity"
    );
    let agent = mesh.ztunnel_pid("n2").context("n2 runs")?;
    let outage = down.elapsed();
    mesh.start_control()?;
    let back = Instant::now();
    wait_until("the server served once the CA is back", CA_ANSWER, || {
        Ok(reaches(&mesh, server))
    })?;
    let took = back.elapsed();
    // Equal-jitter doubling from 500 ms: the step pending when the CA returns is at most
    // about four times the outage so far, and never over 30 s.
    let step = (outage * 4 + Duration::from_secs(1)).min(Duration::from_secs(31));
    println!("CA down {outage:?} at the agent's start; served {took:?} after it returned");
    ensure!(
        took <= step,
        "served {took:?} after the CA returned (step bound {step:?})"
    );
    ensure!(mesh.readiness_status("n2")? == 200, "n2 ready");
    ensure!(
        mesh.ztunnel_pid("n2") == Some(agent),
        "the agent was restarted"
    );
    Ok(())
}

#[test]
fn killing_and_restarting_the_ca_during_traffic_fails_no_connection() -> Result<()> {
    const AT_LEAST: usize = 200;
    /// Connections after the restart, so the stream spans the CA's absence and its return.
    const AFTER_RESTART: usize = 50;
    let mesh = with_server("ca_restart_traffic").build()?;
    let _server = mesh.spawn_echo(SERVER, APP, "server")?;
    let server = server_addr(&mesh)?;
    let done = AtomicUsize::new(0);
    let restarted_at = AtomicUsize::new(usize::MAX);

    let failures = std::thread::scope(|s| -> Result<Vec<String>> {
        let traffic = s.spawn(|| {
            let mut failures = Vec::new();
            loop {
                let n = done.load(Ordering::SeqCst);
                let after = n.saturating_sub(restarted_at.load(Ordering::SeqCst));
                if n >= AT_LEAST && after >= AFTER_RESTART {
                    break;
                }
                let payload = format!("connection {n}");
                match mesh.echo_roundtrip(CLIENT, server, payload.as_bytes()) {
                    Ok(back) if back == payload.as_bytes() => {}
                    Ok(back) => failures.push(format!("{n}: echo {back:?}")),
                    Err(e) => failures.push(format!("{n}: {e:#}")),
                }
                done.fetch_add(1, Ordering::SeqCst);
                if n > 10 * AT_LEAST {
                    failures.push("the CA never came back".into());
                    break;
                }
            }
            failures
        });
        let outage = (|| -> Result<()> {
            wait_until("traffic flowing", CA_ANSWER, || {
                Ok(done.load(Ordering::SeqCst) >= 20)
            })?;
            mesh.kill_control()?;
            let killed_at = done.load(Ordering::SeqCst);
            wait_until("traffic while the CA is down", CA_ANSWER, || {
                Ok(done.load(Ordering::SeqCst) >= killed_at + 20)
            })?;
            mesh.start_control()?;
            restarted_at.store(done.load(Ordering::SeqCst), Ordering::SeqCst);
            Ok(())
        })();
        if outage.is_err() {
            restarted_at.store(0, Ordering::SeqCst);
        }
        let failures = traffic
            .join()
            .map_err(|_| anyhow::anyhow!("the traffic thread panicked"))?;
        outage?;
        Ok(failures)
    })?;
    let total = done.load(Ordering::SeqCst);
    ensure!(
        failures.is_empty(),
        "{} of {total} connections failed: {failures:?}",
        failures.len()
    );
    ensure!(total >= AT_LEAST, "only {total} connections");
    ensure!(mesh.control_pid().is_some(), "the CA runs again");
    Ok(())
}

#[test]
fn certificates_rotate_through_the_ca_under_a_long_lived_connection() -> Result<()> {
    let mesh = with_server("ca_rotation")
        .ztunnel_args(["--cert-ttl", "4s"])
        .build()?;
    let _server = mesh.spawn_echo(SERVER, APP, "server")?;
    let mut conn = mesh.connect(CLIENT, server_addr(&mesh)?)?;
    echo_once(&mut conn, b"before any renewal")?;

    // Two renewals of each side's certificate (three serials), bytes flowing between them.
    let mut client_serials = vec![serial(&mesh, "n1", "client")?];
    let mut server_serials = vec![serial(&mesh, "n2", "server")?];
    for round in 1..=2 {
        wait_until(
            &format!("renewal {round} of both certificates"),
            Duration::from_secs(15),
            || {
                let (c, s) = (
                    serial(&mesh, "n1", "client")?,
                    serial(&mesh, "n2", "server")?,
                );
                if !client_serials.contains(&c) && !server_serials.contains(&s) {
                    client_serials.push(c);
                    server_serials.push(s);
                    return Ok(true);
                }
                Ok(false)
            },
        )?;
        echo_once(&mut conn, format!("after renewal {round}").as_bytes())?;
    }

    // Every one of them came from the CA, to the agent of the pod's node.
    let dump = mesh.control_dump()?;
    let from_ca = |node: &str, sa: &str, serial: &str| {
        dump["issued"].as_array().is_some_and(|a| {
            a.iter().any(|i| {
                i["caller"] == format!("istio-system/ztunnel @{node}").as_str()
                    && i["identity"]
                        == format!("spiffe://cluster.local/ns/default/sa/{sa}").as_str()
                    && same_serial(i["serial"].as_str().unwrap_or_default(), serial)
            })
        })
    };
    for s in &client_serials {
        if !from_ca("n1", "client", s) {
            bail!(
                "client serial {s} not in the CA's ledger: {}",
                dump["issued"]
            );
        }
    }
    for s in &server_serials {
        if !from_ca("n2", "server", s) {
            bail!(
                "server serial {s} not in the CA's ledger: {}",
                dump["issued"]
            );
        }
    }
    Ok(())
}

/// Serials compared as numbers written in hex (with or without colons, any case).
fn same_serial(a: &str, b: &str) -> bool {
    let norm = |s: &str| {
        s.chars()
            .filter(char::is_ascii_hexdigit)
            .map(|c| c.to_ascii_lowercase())
            .collect::<String>()
            .trim_start_matches('0')
            .to_owned()
    };
    !a.is_empty() && norm(a) == norm(b)
}
