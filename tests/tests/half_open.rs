//! Half-open peers on the plain-TCP legs that cross a link (`tests/RELIABILITY.md` scenario
//! 37): the agent reaps them with TCP keepalive and `TCP_USER_TIMEOUT`, closes the other leg,
//! and gives its descriptors back.
//!
//! HBONE legs are reaped by PING liveness (`abuse_hbone.rs`). The legs between a pod and its
//! agent never cross a link (both ends are in the pod's network namespace), so a peer there
//! cannot vanish without its kernel closing the socket. What is left are the legs to and from
//! workloads outside the mesh: a client's connection passed through to one (`ALLOW_ANY`), and
//! one of theirs accepted in plaintext on 15006. `legacy/outsider` (not in the mesh, on n2)
//! plays both ends and then vanishes: every packet into or out of its namespace is dropped,
//! so nothing tells the agent its connection is gone.
//!
//! The agents run with short keepalive settings ([`KEEPALIVE`]); with them an idle leg whose
//! peer vanished is cut once `TCP_USER_TIMEOUT` has passed since the peer last answered
//! (the kernel waits for the later of the keepalive probes and the user timeout).

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use e2e::{fd_count, wait_until, Ambient, Mesh, Pod};

const CLIENT: &str = "default/client";
const SERVER: &str = "default/server";
const OUTSIDER: &str = "legacy/outsider";
/// Where the outsider listens for the client's passed-through connection.
const OUTSIDER_PORT: u16 = 7000;
/// Where the server listens for the outsider's plaintext connection.
const SERVER_PORT: u16 = 7100;
const USER_TIMEOUT: Duration = Duration::from_secs(3);
const KEEPALIVE: [&str; 8] = [
    "--tcp-keepalive-idle",
    "1s",
    "--tcp-keepalive-interval",
    "1s",
    "--tcp-keepalive-probes",
    "2",
    "--tcp-user-timeout",
    "3s",
];
/// From the peer vanishing to the other leg seeing the close: the user timeout, plus the
/// keepalive timer's granularity (one interval) and a second of scheduling slack.
const CLOSED_WITHIN: Duration = Duration::from_secs(5);
/// Bound on every other wait.
const WAIT: Duration = Duration::from_secs(10);

#[test]
fn half_open_plain_legs_are_reaped_by_keepalive() -> Result<()> {
    let mesh = Mesh::builder("half_open")
        .node("n1")
        .node("n2")
        .namespace("default", Ambient::Yes)
        .namespace("legacy", Ambient::No)
        .ztunnel_args(KEEPALIVE)
        .pod(Pod::new("default", "client").on("n1"))
        .pod(Pod::new("default", "server").on("n2"))
        .pod(Pod::new("legacy", "outsider").on("n2"))
        .build()?;

    // 1. The client's connection passed through n1's agent to the outsider.
    let at_outsider = listen(&mesh, OUTSIDER, OUTSIDER_PORT)?;
    let to_outsider = SocketAddr::new(mesh.pod_ip(OUTSIDER)?.into(), OUTSIDER_PORT);
    let client_leg = mesh.connect(CLIENT, to_outsider)?;
    reaped_when_the_outsider_vanishes(&mesh, "n1", "passed through", client_leg, &at_outsider)?;

    // 2. The outsider's plaintext connection accepted by n2's agent for the server.
    let at_server = listen(&mesh, SERVER, SERVER_PORT)?;
    let to_server = SocketAddr::new(mesh.pod_ip(SERVER)?.into(), SERVER_PORT);
    let outsider_leg = mesh.connect(OUTSIDER, to_server)?;
    // Here the leg that must see the close is the one the agent delivered to the server.
    reaped_when_the_outsider_vanishes(&mesh, "n2", "accepted", outsider_leg, &at_server)
}

/// `initiator` is connected through `node`'s agent to `listener`: one byte goes each way,
/// then the outsider vanishes and the end that stays (the client, or the server's accepted
/// socket) must see its connection closed within [`CLOSED_WITHIN`]; the agent's descriptors
/// come back to their count before the connection.
fn reaped_when_the_outsider_vanishes(
    mesh: &Mesh,
    node: &str,
    what: &str,
    mut initiator: TcpStream,
    listener: &TcpListener,
) -> Result<()> {
    let pid = mesh
        .ztunnel_pid(node)
        .with_context(|| format!("{node}'s agent is not running"))?;
    let (mut accepted, _) = accept_within(listener)?;
    initiator.write_all(b"?")?;
    let mut byte = [0u8; 1];
    accepted.read_exact(&mut byte)?;
    accepted.write_all(b"!")?;
    initiator.read_exact(&mut byte)?;
    ensure!(&byte == b"!", "{what}: the echo came back as {byte:?}");
    // The count with the connection open, less its two sockets in the agent.
    let fds_open = fd_count(pid)?;

    // The leg that stays: towards the outsider it is the initiator's (the client), from the
    // outsider it is the accepted one (the server).
    let mut staying = if node == "n1" { initiator } else { accepted };
    staying.set_read_timeout(Some(CLOSED_WITHIN + WAIT))?;
    let vanished = Instant::now();
    let _blackhole = mesh.blackhole(OUTSIDER)?;
    let closed = match staying.read(&mut byte) {
        Ok(0) => "closed",
        Err(e) if e.kind() == ErrorKind::ConnectionReset => "reset",
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            anyhow::bail!(
                "{what}: still open {:?} after the outsider vanished",
                vanished.elapsed()
            )
        }
        other => anyhow::bail!("{what}: read {other:?} after the outsider vanished"),
    };
    let after = vanished.elapsed();
    drop(staying);
    wait_until(
        &format!("{node}'s descriptors back below {fds_open}"),
        WAIT,
        || Ok(fd_count(pid)? <= fds_open.saturating_sub(2)),
    )?;
    println!(
        "{what} ({node}): the leg that stayed was {closed} {after:?} after the outsider vanished \
         (user timeout {USER_TIMEOUT:?}); {node}'s fds {fds_open} with it open, {} after",
        fd_count(pid)?
    );
    ensure!(
        after <= CLOSED_WITHIN,
        "{what}: closed {after:?} after the outsider vanished (at most {CLOSED_WITHIN:?})"
    );
    ensure!(
        after >= USER_TIMEOUT - Duration::from_millis(500),
        "{what}: closed {after:?} after the outsider vanished, before the user timeout: \
         something else than the reaping closed it"
    );
    Ok(())
}

fn listen(mesh: &Mesh, pod: &str, port: u16) -> Result<TcpListener> {
    let listener = mesh
        .in_pod(pod, move || {
            TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        })?
        .with_context(|| format!("listen on {port} in {pod}"))?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

fn accept_within(listener: &TcpListener) -> Result<(TcpStream, SocketAddr)> {
    let deadline = Instant::now() + WAIT;
    loop {
        match listener.accept() {
            Ok((stream, peer)) => {
                stream.set_nonblocking(false)?;
                stream.set_read_timeout(Some(WAIT))?;
                return Ok((stream, peer));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e).context("nothing was accepted"),
        }
    }
}
