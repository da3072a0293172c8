//! A dual-stack pod's outbound TCP, through the real `ztunnel` binary on each capture
//! backend: a connection of each family to a server outside the mesh is captured by the
//! agent (counted in `istio_tcp_connections_opened_total{reporter="source"}` and logged
//! with its original destination) and passed through to the server byte for byte, from the
//! pod's address of that family.
//!
//! The namespaces are `support::dual_stack`'s, the servers in the one outside the mesh.
//! Needs root.

mod support;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use support::background::{lock, Background};
use support::dual_stack::DualStackPod;
use support::netns::TestNetns;
use support::node_agent::Agent;

const POD_IP4: Ipv4Addr = Ipv4Addr::new(10, 81, 0, 2);
const POD_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x81, 0, 0, 0, 0, 0, 2);
/// The servers outside the mesh, on the other end of the pod's link.
const SERVER_IP4: Ipv4Addr = Ipv4Addr::new(10, 81, 0, 1);
const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x81, 0, 0, 0, 0, 0, 1);
const SERVER_PORT: u16 = 7000;
/// How long the agent may take to enroll the pod.
const READY_WITHIN: Duration = Duration::from_secs(30);
/// How long one connection's echo, or its access log line, may take.
const ECHO_WITHIN: Duration = Duration::from_secs(10);
/// What each connection sends (several segments and windows' worth).
const PAYLOAD_LEN: usize = 256 * 1024;

#[test]
fn a_dual_stack_pods_outbound_of_both_families_is_captured_with_nftables() -> Result<()> {
    dual_stack_outbound("nftables")
}

#[test]
fn a_dual_stack_pods_outbound_of_both_families_is_captured_with_ebpf() -> Result<()> {
    dual_stack_outbound("ebpf")
}

fn dual_stack_outbound(backend: &str) -> Result<()> {
    let ns = DualStackPod::new((POD_IP4, POD_IP6), "outside", (SERVER_IP4, SERVER_IP6))?;
    let servers = Servers::start(&ns.outside)?;
    // No Service: the servers are outside the mesh, reached by passthrough.
    let mut agent = ns.start_agent(backend, "")?;
    agent.wait_ready(READY_WITHIN)?;

    // Each family in turn; every failure is collected, so that one run tells them all.
    let mut failures = Vec::new();
    for (server, from) in [
        (
            SocketAddr::from((SERVER_IP6, SERVER_PORT)),
            IpAddr::from(POD_IP6),
        ),
        (
            SocketAddr::from((SERVER_IP4, SERVER_PORT)),
            IpAddr::from(POD_IP4),
        ),
    ] {
        let before = opened_from_source(&agent.metrics()?);
        if let Err(e) = echo(&ns.pod, server) {
            failures.push(format!("{server}: {e:#}"));
            continue;
        }
        let after = opened_from_source(&agent.metrics()?);
        if after != before + 1 {
            failures.push(format!(
                "{server}: echoed, but the agent counted {} connections opened (not captured?)",
                after - before
            ));
        }
        if !servers.peers().iter().any(|p| p.ip() == from) {
            failures.push(format!("{server}: no connection from {from} reached it"));
        }
        if let Err(e) = wait_for_access_log(&agent, server) {
            failures.push(format!("{server}: {e:#}"));
        }
    }
    ensure!(
        failures.is_empty(),
        "{backend}: {}\nagent log:\n{}",
        failures.join("\n"),
        agent.log()
    );
    Ok(())
}

/// The sum of `istio_tcp_connections_opened_total{reporter="source",...}`: the
/// connections the agent accepted from its pods' applications.
fn opened_from_source(metrics: &str) -> u64 {
    metrics
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .filter(|l| l.contains(r#"reporter="source""#))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<u64>().ok())
        .sum()
}

/// Waits for the access log line of an outbound connection to `dst` (written once it
/// closes).
fn wait_for_access_log(agent: &Agent, dst: SocketAddr) -> Result<()> {
    let deadline = Instant::now() + ECHO_WITHIN;
    let wanted = format!("dst.addr={dst}");
    loop {
        let log = agent.log();
        if log
            .lines()
            .any(|l| l.contains("connection complete") && l.contains(&wanted))
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("no access log line with {wanted}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The payload of every connection: not a repeating pattern of a short period, so that a
/// lost or reordered segment shows.
fn payload() -> Vec<u8> {
    (0..PAYLOAD_LEN)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect()
}

// === the pod's application ===

/// Sends [`payload`] from the pod to `server`, as its application would, half-closes, and
/// checks that exactly it comes back.
fn echo(pod: &TestNetns, server: SocketAddr) -> Result<()> {
    let mut tcp = pod
        .run(|| TcpStream::connect_timeout(&server, ECHO_WITHIN))?
        .context("connect")?;
    tcp.set_read_timeout(Some(ECHO_WITHIN))?;
    tcp.set_write_timeout(Some(ECHO_WITHIN))?;
    let sent = payload();
    tcp.write_all(&sent).context("send")?;
    tcp.shutdown(Shutdown::Write)?;
    let mut back = Vec::with_capacity(sent.len());
    tcp.read_to_end(&mut back).context("receive")?;
    ensure!(
        back == sent,
        "{} bytes came back of the {} sent, or not the same",
        back.len(),
        sent.len()
    );
    Ok(())
}

// === the servers outside the mesh ===

/// An echo server on each of [`SERVER_IP4`] and [`SERVER_IP6`], port [`SERVER_PORT`]: reads
/// a connection to its end, then sends it all back and closes; stopped on drop.
struct Servers {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    _threads: Background,
}

impl Servers {
    fn start(ns: &TestNetns) -> Result<Servers> {
        let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let mut threads = Background::default();
        for ip in [IpAddr::from(SERVER_IP4), SERVER_IP6.into()] {
            let listener = ns.run(|| TcpListener::bind((ip, SERVER_PORT)))??;
            let peers = peers.clone();
            threads.serve_tcp(listener, move |tcp, peer| {
                lock(&peers).push(peer);
                let _ = echo_all(tcp);
            })?;
        }
        Ok(Servers {
            peers,
            _threads: threads,
        })
    }

    /// The clients each server has accepted.
    fn peers(&self) -> Vec<SocketAddr> {
        lock(&self.peers).clone()
    }
}

fn echo_all(mut tcp: TcpStream) -> std::io::Result<()> {
    tcp.set_nonblocking(false)?;
    tcp.set_read_timeout(Some(ECHO_WITHIN))?;
    let mut got = Vec::new();
    tcp.read_to_end(&mut got)?;
    tcp.write_all(&got)
}
