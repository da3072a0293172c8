//! Ways around capture (issue 13 part 4), end to end on the backend `E2E_REDIRECT` names: a
//! hostile pod (`default/attacker`, with every capability, as a pod granted `NET_ADMIN`
//! would have) tries to reach the application of a pod whose namespace is STRICT and whose
//! ALLOW-only policy admits `default/client` alone. Every attempt must end without the
//! application answering and without the application seeing the connection (or, for what
//! the mesh does not cover, pass exactly as README's "What the mesh does not protect against"
//! says).
//!
//! The destinations' "application" is a recorder written here: a dual-stack TCP listener on
//! 8080 and a UDP socket on 9999 that note every peer and answer `APP:<pod>`, so an attempt
//! that reached it is seen on both ends. Two destinations: `default/server` on the other node
//! (n2) and `default/near` on the attacker's node (n1).

use std::io::{ErrorKind, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV6, TcpListener, TcpStream,
    UdpSocket,
};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use e2e::{prom, scenarios, wait_until, Mesh, Pod, Redirect, Suite, PROBE_SOURCE};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const ATTACKER: &str = "default/attacker";
const CLIENT: &str = "default/client";
/// On n2, across the wire from the attacker.
const SERVER: &str = "default/server";
/// On n1, beside the attacker.
const NEAR: &str = "default/near";
const TCP_PORT: u16 = 8080;
const UDP_PORT: u16 = 9999;
/// The agent's mark on its own sockets in a pod (ztunnel's `SKIP_MARK`).
const SKIP_MARK: u32 = 0x539;
/// The agent's ports in every pod.
const AGENT_PORTS: [u16; 3] = [15001, 15006, 15008];
/// The agents' admin listener (`--admin-addr`, default 127.0.0.1:15000).
const ADMIN_PORT: u16 = 15000;
/// Bound on one attempt's connect and on each of its reads.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a config change or a counter update may take.
const APPLY: Duration = Duration::from_secs(10);
/// What the recorders answer with (then the pod's name).
const ANSWER: &[u8] = b"APP:";
/// The table a test adds in a destination pod to count packets from the probe source.
const WATCH_TABLE: &str = "e2e_probe_watch";
/// The extra link between the attacker and `near` in the IPv6 scenario: a shared L2 segment,
/// as same-node pods on a bridge CNI have, carrying only IPv6 link-local addresses.
const V6_ATTACKER_IF: &str = "v6bad";
const V6_NEAR_IF: &str = "v6near";
const V6_ATTACKER: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xbad, 1);
const V6_NEAR: Ipv6Addr = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0xbad, 2);

const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: default}
spec:
  mtls: {mode: STRICT}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-client, namespace: default}
spec:
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/default/sa/client"]
"#;

// === the recorder ===

/// A destination pod's application: records every TCP connection and UDP datagram it gets.
struct App {
    pod: &'static str,
    seen: Arc<Mutex<Vec<(&'static str, SocketAddr)>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl App {
    fn start(mesh: &Mesh, pod: &'static str) -> Result<App> {
        let (tcp, udp) = mesh.in_pod(pod, || -> std::io::Result<(TcpListener, UdpSocket)> {
            // Dual stack, as most servers listen: it would take IPv6 connections too.
            let any = SockAddr::from(SocketAddr::from((Ipv6Addr::UNSPECIFIED, TCP_PORT)));
            let tcp = Socket::new(Domain::IPV6, Type::STREAM, Some(Protocol::TCP))?;
            tcp.set_only_v6(false)?;
            tcp.set_reuse_address(true)?;
            tcp.bind(&any)?;
            tcp.listen(64)?;
            let udp = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP))?;
            udp.set_only_v6(false)?;
            udp.bind(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, UDP_PORT)).into())?;
            Ok((tcp.into(), udp.into()))
        })??;
        tcp.set_nonblocking(true)?;
        udp.set_nonblocking(true)?;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (rec, halt) = (Arc::clone(&seen), Arc::clone(&stop));
        let answer = [ANSWER, pod.as_bytes(), b"\n"].concat();
        let thread = std::thread::Builder::new()
            .name(format!("app-{pod}"))
            .spawn(move || serve(&tcp, &udp, &answer, &rec, &halt))?;
        Ok(App {
            pod,
            seen,
            stop,
            thread: Some(thread),
        })
    }

    /// Everything seen so far: `("tcp" | "udp", peer)`.
    fn seen(&self) -> Vec<(&'static str, SocketAddr)> {
        self.seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Answers every connection and datagram until `stop`; polls (the sockets are non-blocking)
/// so that it notices `stop` within a few milliseconds.
fn serve(
    tcp: &TcpListener,
    udp: &UdpSocket,
    answer: &[u8],
    seen: &Mutex<Vec<(&'static str, SocketAddr)>>,
    stop: &AtomicBool,
) {
    let record = |kind, peer: SocketAddr| {
        let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
        seen.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((kind, peer));
    };
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let mut idle = true;
        if let Ok((mut conn, peer)) = tcp.accept() {
            idle = false;
            record("tcp", peer);
            // Answer, then read until the client closes: closing with its request unread
            // would reset the connection and could destroy the answer in flight.
            let _ = conn.set_nonblocking(false);
            let _ = conn.set_read_timeout(Some(ATTEMPT_TIMEOUT));
            let _ = conn.write_all(answer);
            let _ = conn.shutdown(Shutdown::Write);
            let _ = std::io::copy(&mut conn.take(64 * 1024), &mut std::io::sink());
        }
        if let Ok((_, peer)) = udp.recv_from(&mut buf) {
            idle = false;
            record("udp", peer);
            let _ = udp.send_to(answer, peer);
        }
        if idle {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

// === attempts ===

/// One connection attempt from a pod.
#[derive(Clone, Copy, Debug)]
struct Attempt {
    to: SocketAddr,
    /// Set the agent's own mark on the socket (skips the pod's outbound capture).
    mark: bool,
    /// Bind this source address (which the pod must have).
    from: Option<IpAddr>,
}

impl Attempt {
    fn to(to: SocketAddr) -> Self {
        Attempt {
            to,
            mark: false,
            from: None,
        }
    }

    fn marked(self) -> Self {
        Attempt { mark: true, ..self }
    }

    fn from(self, ip: IpAddr) -> Self {
        Attempt {
            from: Some(ip),
            ..self
        }
    }
}

/// What the attacker got: whether the connect succeeded, and every byte read back.
#[derive(Debug)]
struct Outcome {
    connect: std::result::Result<(), ErrorKind>,
    received: Vec<u8>,
}

impl Outcome {
    fn answered(&self) -> bool {
        self.connect.is_ok() && self.received.starts_with(ANSWER)
    }
}

/// Connects as `attempt` says from inside `pod`, sends a request, and reads until the peer
/// closes or stops answering (each step bounded by [`ATTEMPT_TIMEOUT`]).
fn try_tcp(mesh: &Mesh, pod: &str, attempt: Attempt) -> Result<Outcome> {
    let stream = mesh.in_pod(pod, move || -> std::io::Result<TcpStream> {
        let domain = Domain::for_address(attempt.to);
        let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        if attempt.mark {
            s.set_mark(SKIP_MARK)?;
        }
        if let Some(ip) = attempt.from {
            s.bind(&SocketAddr::new(ip, 0).into())?;
        }
        s.connect_timeout(&attempt.to.into(), ATTEMPT_TIMEOUT)?;
        Ok(s.into())
    })?;
    let mut stream = match stream {
        Ok(s) => s,
        Err(e) => {
            return Ok(Outcome {
                connect: Err(e.kind()),
                received: Vec::new(),
            })
        }
    };
    stream.set_read_timeout(Some(ATTEMPT_TIMEOUT))?;
    stream.set_write_timeout(Some(ATTEMPT_TIMEOUT))?;
    let _ = stream.write_all(b"GET / HTTP/1.1\r\nHost: app\r\n\r\n");
    let mut received = Vec::new();
    let mut buf = [0u8; 1024];
    while received.len() < 64 * 1024 {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => received.extend_from_slice(&buf[..n]),
        }
    }
    Ok(Outcome {
        connect: Ok(()),
        received,
    })
}

/// Sends one UDP datagram from `pod` to `to` and returns the answer, if one comes.
fn try_udp(mesh: &Mesh, pod: &str, to: SocketAddr) -> Result<Option<Vec<u8>>> {
    mesh.in_pod(pod, move || -> Result<Option<Vec<u8>>> {
        let any: SocketAddr = match to {
            SocketAddr::V4(_) => "0.0.0.0:0".parse()?,
            SocketAddr::V6(_) => "[::]:0".parse()?,
        };
        let sock = UdpSocket::bind(any)?;
        sock.set_read_timeout(Some(ATTEMPT_TIMEOUT))?;
        sock.send_to(b"udp hello", to)?;
        let mut buf = [0u8; 512];
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => Ok(Some(buf[..n].to_vec())),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Ok(None),
            Err(e) => Err(e.into()),
        }
    })?
}

// === the suite ===

struct Bypass {
    server: App,
    near: App,
    mesh: Mesh,
}

impl Bypass {
    fn build() -> Result<Self> {
        let mesh = Mesh::two_nodes("bypass_capture")
            .pod(
                Pod::new("default", "attacker")
                    .on("n1")
                    .service_account("attacker"),
            )
            .pod(
                Pod::new("default", "server")
                    .on("n2")
                    .service_account("server"),
            )
            .pod(Pod::new("default", "near").on("n1").service_account("near"))
            .yaml("policy.yaml", POLICY)
            .build()?;
        let server = App::start(&mesh, SERVER)?;
        let near = App::start(&mesh, NEAR)?;
        let ctx = Bypass { server, near, mesh };
        // The suite's premise, before any attack: the allowed client gets through.
        for app in [&ctx.server, &ctx.near] {
            let to = ctx.app_addr(app.pod)?;
            wait_until(&format!("{CLIENT} reaches {}", app.pod), APPLY, || {
                Ok(try_tcp(&ctx.mesh, CLIENT, Attempt::to(to))?.answered())
            })?;
        }
        Ok(ctx)
    }

    fn app_addr(&self, pod: &str) -> Result<SocketAddr> {
        Ok(SocketAddr::new(self.mesh.pod_ip(pod)?.into(), TCP_PORT))
    }

    fn apps(&self) -> [&App; 2] {
        [&self.server, &self.near]
    }

    /// Connections refused by both agents so far (any reason).
    fn refused(&self) -> Result<f64> {
        let mut total = 0.0;
        for node in ["n1", "n2"] {
            total += prom::sum(
                &self.mesh.metrics(node)?,
                "mesh_connections_refused_total",
                &[],
            );
        }
        Ok(total)
    }

    /// Runs `attempt` from the attacker and checks it got nowhere: no answer from the
    /// application, and the application saw no TCP connection. With `refused_by_mesh`, an
    /// agent must also have counted a refusal (the connection was captured and policy said
    /// no), rather than it failing for another reason.
    fn expect_blocked(&self, app: &App, attempt: Attempt, refused_by_mesh: bool) -> Result<()> {
        let before_seen = app.seen().len();
        let before_refused = self.refused()?;
        let outcome = try_tcp(&self.mesh, ATTACKER, attempt)?;
        ensure!(
            !outcome.answered(),
            "{attempt:?}: the application of {} answered the attacker: {outcome:?}",
            app.pod
        );
        if refused_by_mesh {
            wait_until(&format!("{attempt:?} counted as refused"), APPLY, || {
                Ok(self.refused()? > before_refused)
            })?;
        }
        let seen = app.seen();
        ensure!(
            seen.len() == before_seen,
            "{attempt:?}: the application of {} saw {:?}",
            app.pod,
            &seen[before_seen..]
        );
        println!("blocked as expected: {attempt:?} -> {outcome:?}");
        Ok(())
    }
}

impl Suite for Bypass {}

// === scenarios ===

/// The baseline: through its own capture, the attacker is refused by policy at both
/// destinations, while the allowed client reaches them.
fn a_captured_attacker_is_refused_by_policy(s: &mut Bypass) -> Result<()> {
    for app in s.apps() {
        let to = s.app_addr(app.pod)?;
        s.expect_blocked(app, Attempt::to(to), true)?;
        ensure!(
            try_tcp(&s.mesh, CLIENT, Attempt::to(to))?.answered(),
            "the allowed client no longer reaches {}",
            app.pod
        );
    }
    Ok(())
}

/// 1. The agent's skip mark on the attacker's own socket skips the attacker's outbound
///    capture (a documented limit: a pod with NET_ADMIN owns its own egress), but the
///    destination's inbound capture takes the plaintext connection and STRICT refuses it:
///    marks do not cross network namespaces, and no inbound rule trusts a conntrack mark set
///    outside the pod.
fn the_skip_mark_does_not_get_past_the_destinations_capture(s: &mut Bypass) -> Result<()> {
    for app in s.apps() {
        let to = s.app_addr(app.pod)?;
        s.expect_blocked(app, Attempt::to(to).marked(), true)?;
    }
    Ok(())
}

/// 2. A pod that forges the node's probe source (adds 169.254.7.127 to its interface, as a
///    pod with NET_ADMIN can, and connects from it) is dropped by its node before it reaches
///    any pod: the node lets that source out only for its own probes. The destination's
///    counter of packets from the probe source stays at zero (the handshake could not finish
///    anyway, as the answer goes to the node, but the SYN alone must not reach an uncaptured
///    port), while a real probe from each destination's node afterwards still reaches the
///    application uncaptured (and is counted: the counter works).
fn a_spoofed_probe_source_is_dropped_before_any_pod(s: &mut Bypass) -> Result<()> {
    let _spoofed = SpoofedProbeSource::add(&s.mesh)?;
    for (app, node) in [(&s.server, "n2"), (&s.near, "n1")] {
        let watch = ProbeWatch::install(&s.mesh, app.pod)?;
        let dropped_before = forward_drops(&s.mesh, "n1")?;
        let to = s.app_addr(app.pod)?;
        for attempt in [
            Attempt::to(to).from(PROBE_SOURCE.into()).marked(),
            Attempt::to(to).from(PROBE_SOURCE.into()),
        ] {
            s.expect_blocked(app, attempt, false)?;
        }
        let spoofed = watch.packets()?;
        ensure!(
            spoofed == 0,
            "{spoofed} packets from the probe source reached {} from the attacker",
            app.pod
        );
        ensure!(
            forward_drops(&s.mesh, "n1")? > dropped_before,
            "the attacker's node did not count its spoofed packets as dropped"
        );
        // The real probe: the node itself connects; its SNAT gives it the probe source.
        let probe = s
            .mesh
            .in_node(node, move || {
                TcpStream::connect_timeout(&to, ATTEMPT_TIMEOUT)
            })?
            .with_context(|| format!("probe {to} from node {node}"))?;
        let mut probe = probe;
        probe.set_read_timeout(Some(ATTEMPT_TIMEOUT))?;
        let mut answer = Vec::new();
        let _ = probe.read_to_end(&mut answer);
        ensure!(
            answer.starts_with(ANSWER),
            "node {node}'s probe of {} got {:?}",
            app.pod,
            String::from_utf8_lossy(&answer)
        );
        ensure!(
            app.seen().last().map(|(_, peer)| peer.ip()) == Some(PROBE_SOURCE.into()),
            "the probe reached {} from {:?}, not the probe source",
            app.pod,
            app.seen().last()
        );
        ensure!(
            watch.packets()? > 0,
            "the probe-source counter counts nothing"
        );
    }
    Ok(())
}

/// 3. Straight to the agent's ports (RELIABILITY 10): another pod's 15006 and 15001
///    (plaintext, on the pod's IP) and 15008 (plaintext to the HBONE port), with and without
///    the skip mark, and the attacker's own 15001/15006/15008 on its pod IP and on loopback:
///    refused and counted by the agents, never an open door to an application or an outbound
///    proxy lending another pod's identity.
fn the_agents_ports_are_no_way_in(s: &mut Bypass) -> Result<()> {
    for app in s.apps() {
        let ip = s.mesh.pod_ip(app.pod)?;
        for port in AGENT_PORTS {
            let to = SocketAddr::new(ip.into(), port);
            for attempt in [Attempt::to(to), Attempt::to(to).marked()] {
                s.expect_blocked(app, attempt, true)?;
            }
        }
    }
    // Its own ports: nothing listens there (refused by the kernel), or the agent refuses
    // the loop and counts it.
    let own: IpAddr = s.mesh.pod_ip(ATTACKER)?.into();
    for ip in [own, Ipv4Addr::LOCALHOST.into()] {
        for port in AGENT_PORTS {
            let attempt = Attempt::to(SocketAddr::new(ip, port));
            let before = s.refused()?;
            let outcome = try_tcp(&s.mesh, ATTACKER, attempt)?;
            ensure!(!outcome.answered(), "{attempt:?} answered: {outcome:?}");
            if outcome.connect.is_ok() {
                wait_until(&format!("{attempt:?} counted as refused"), APPLY, || {
                    Ok(s.refused()? > before)
                })?;
            }
            println!("blocked as expected: {attempt:?} -> {outcome:?}");
        }
    }
    // RELIABILITY 10: the agents' admin port (config dump, log level, quitquitquit) listens
    // on the node's loopback only: from a pod, the node's address gets no answer.
    for node in ["n1", "n2"] {
        let to = SocketAddr::new(s.mesh.node_ip(node)?.into(), ADMIN_PORT);
        for attempt in [Attempt::to(to), Attempt::to(to).marked()] {
            let outcome = try_tcp(&s.mesh, ATTACKER, attempt)?;
            ensure!(!outcome.answered(), "{attempt:?} answered: {outcome:?}");
            println!("blocked as expected: {attempt:?} -> {outcome:?}");
        }
    }
    Ok(())
}

/// 4. IPv6 in an IPv4-only mesh: the attacker and `near` share a link that carries only IPv6
///    link-local addresses (as same-node pods on a bridge CNI do when the kernel has IPv6 on).
///    The link works (UDP crosses it), but IPv6 TCP fails closed on both backends, marked or
///    not: first at the attacker's own pod (`connect()` fails with `EACCES`: the agent
///    prohibits IPv6 TCP in pods without an IPv6 address), then, once the attacker
///    (NET_ADMIN) has deleted that rule of its own, at `near`, whose capture takes no IPv6
///    connection and whose own replies are prohibited too: `near`'s dual-stack application
///    never sees it.
fn ipv6_link_local_to_an_ipv4_only_pod_fails_closed(s: &mut Bypass) -> Result<()> {
    let link = V6Link::create(&s.mesh)?;
    let to = SocketAddr::V6(SocketAddrV6::new(
        V6_NEAR,
        TCP_PORT,
        0,
        link.attacker_ifindex,
    ));
    let udp_to = SocketAddr::V6(SocketAddrV6::new(
        V6_NEAR,
        UDP_PORT,
        0,
        link.attacker_ifindex,
    ));
    let answer = try_udp(&s.mesh, ATTACKER, udp_to)?;
    ensure!(
        answer.as_deref().is_some_and(|a| a.starts_with(ANSWER)),
        "the IPv6 link does not work (UDP got {answer:?}): the test would prove nothing"
    );
    for attempt in [Attempt::to(to), Attempt::to(to).marked()] {
        let outcome = try_tcp(&s.mesh, ATTACKER, attempt)?;
        ensure!(
            outcome.connect == Err(ErrorKind::PermissionDenied),
            "{attempt:?}: IPv6 TCP from the attacker's IPv4-only pod was not prohibited at \
             connect(): {outcome:?}"
        );
        s.expect_blocked(&s.near, attempt, false)?;
    }
    let _removed = RemovedIpv6Block::remove(&s.mesh)?;
    for attempt in [Attempt::to(to), Attempt::to(to).marked()] {
        s.expect_blocked(&s.near, attempt, false)?;
    }
    Ok(())
}

/// 5. UDP is not captured (as in Istio's ambient mode): a datagram from the attacker reaches
///    the application of a STRICT pod that denies it TCP. README lists this under "What the
///    mesh does not protect against" (closed by a NetworkPolicy); this test keeps that
///    statement true.
fn udp_is_not_captured_as_documented(s: &mut Bypass) -> Result<()> {
    for app in s.apps() {
        let to = SocketAddr::new(s.mesh.pod_ip(app.pod)?.into(), UDP_PORT);
        let attacker = s.mesh.pod_ip(ATTACKER)?;
        let answer = try_udp(&s.mesh, ATTACKER, to)?;
        ensure!(
            answer.as_deref().is_some_and(|a| a.starts_with(ANSWER)),
            "UDP to {} got {answer:?}: README says it passes",
            app.pod
        );
        ensure!(
            app.seen()
                .iter()
                .any(|(kind, peer)| *kind == "udp" && peer.ip() == IpAddr::from(attacker)),
            "{} did not see the attacker's datagram",
            app.pod
        );
    }
    Ok(())
}

/// 6. A pod with NET_ADMIN can delete its own capture (the eBPF backend's policy-routing
///    rule, or the nftables table): its outbound then leaves uncaptured (shown by plaintext to
///    another pod's 15008 now meeting that agent's TLS directly), which gains it nothing, as
///    each destination's own capture enforces that destination's policy. The agent does not
///    notice the deletion (README lists it); restarting it reinstalls the rules, after which
///    the attacker's outbound is captured again.
fn deleting_its_own_capture_gains_a_pod_nothing(s: &mut Bypass) -> Result<()> {
    let server_ip = s.mesh.pod_ip(SERVER)?;
    let hbone = SocketAddr::new(server_ip.into(), 15008);
    // The first bytes of a TLS alert record: the agent on n2 answered directly.
    let meets_tls_directly = |s: &Bypass| -> Result<bool> {
        Ok(try_tcp(&s.mesh, ATTACKER, Attempt::to(hbone))?
            .received
            .first()
            == Some(&21))
    };
    ensure!(
        !meets_tls_directly(s)?,
        "the attacker's outbound is not captured to begin with"
    );
    let removal: &[&str] = match s.mesh.redirect() {
        Some(Redirect::Nftables) => &["nft", "delete", "table", "inet", "ztunnel"],
        _ => &["ip", "rule", "del", "pref", "31992"],
    };
    s.mesh.exec_ok(ATTACKER, removal)?;
    let result = (|| {
        ensure!(
            meets_tls_directly(s)?,
            "deleting its capture did not free the attacker's outbound: the test proves nothing"
        );
        for app in s.apps() {
            s.expect_blocked(app, Attempt::to(s.app_addr(app.pod)?), true)?;
        }
        Ok(())
    })();
    s.mesh.stop_ztunnel("n1")?;
    s.mesh.start_ztunnel("n1")?;
    s.mesh.wait_ready("n1")?;
    result?;
    wait_until(
        "the restarted agent captures the attacker again",
        APPLY,
        || Ok(!meets_tls_directly(s)?),
    )?;
    let to = s.app_addr(SERVER)?;
    wait_until("the client reaches the server again", APPLY, || {
        Ok(try_tcp(&s.mesh, CLIENT, Attempt::to(to))?.answered())
    })
}

// === test fixtures inside pods ===

/// An nftables counter inside a pod of packets from the probe source to the application's
/// port, removed on drop.
struct ProbeWatch<'a> {
    mesh: &'a Mesh,
    pod: &'static str,
}

impl<'a> ProbeWatch<'a> {
    fn install(mesh: &'a Mesh, pod: &'static str) -> Result<Self> {
        let script = format!(
            "add table inet {WATCH_TABLE}\n\
             add chain inet {WATCH_TABLE} in {{ type filter hook prerouting priority -400; policy accept; }}\n\
             add rule inet {WATCH_TABLE} in ip saddr {PROBE_SOURCE} tcp dport {TCP_PORT} counter\n"
        );
        mesh.exec_ok(pod, &["nft", &script])?;
        Ok(ProbeWatch { mesh, pod })
    }

    fn packets(&self) -> Result<u64> {
        let out = self
            .mesh
            .exec_ok(self.pod, &["nft", "list", "table", "inet", WATCH_TABLE])?;
        counter(&out)
    }
}

impl Drop for ProbeWatch<'_> {
    fn drop(&mut self) {
        let _ = self
            .mesh
            .exec(self.pod, &["nft", "delete", "table", "inet", WATCH_TABLE]);
    }
}

/// Packets with the probe source that `node` refused to forward (the counter of the node's
/// anti-spoofing rule).
fn forward_drops(mesh: &Mesh, node: &str) -> Result<u64> {
    let out = mesh.exec_node(node, &["nft", "list", "chain", "ip", "kubelet", "forward"])?;
    ensure!(
        out.status.success(),
        "list node {node}'s forward chain: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    counter(&String::from_utf8_lossy(&out.stdout))
}

/// The packet count of the first `counter` in an `nft list` output.
fn counter(listing: &str) -> Result<u64> {
    let count = listing
        .split_whitespace()
        .skip_while(|w| *w != "packets")
        .nth(1)
        .context("no counter in the listing")?;
    Ok(count.parse()?)
}

/// The probe source on the attacker's interface, removed on drop.
struct SpoofedProbeSource<'a> {
    mesh: &'a Mesh,
}

impl<'a> SpoofedProbeSource<'a> {
    fn add(mesh: &'a Mesh) -> Result<Self> {
        let addr = format!("{PROBE_SOURCE}/32");
        mesh.exec_ok(ATTACKER, &["ip", "addr", "add", &addr, "dev", "eth0"])?;
        Ok(SpoofedProbeSource { mesh })
    }
}

impl Drop for SpoofedProbeSource<'_> {
    fn drop(&mut self) {
        let addr = format!("{PROBE_SOURCE}/32");
        let _ = self
            .mesh
            .exec(ATTACKER, &["ip", "addr", "del", &addr, "dev", "eth0"]);
    }
}

/// The attacker's own IPv6 block (ztunnel's `PREF_NO_IPV6` rule), deleted as a pod with
/// NET_ADMIN can; put back on drop.
struct RemovedIpv6Block<'a> {
    mesh: &'a Mesh,
}

const IPV6_BLOCK_RULE: [&str; 7] = ["pref", "31988", "iif", "lo", "ipproto", "tcp", "prohibit"];

impl<'a> RemovedIpv6Block<'a> {
    fn remove(mesh: &'a Mesh) -> Result<Self> {
        let argv = [["ip", "-6", "rule", "del"].as_slice(), &IPV6_BLOCK_RULE].concat();
        mesh.exec_ok(ATTACKER, &argv)
            .context("the attacker's pod has no IPv6 block to remove")?;
        Ok(RemovedIpv6Block { mesh })
    }
}

impl Drop for RemovedIpv6Block<'_> {
    fn drop(&mut self) {
        let argv = [["ip", "-6", "rule", "add"].as_slice(), &IPV6_BLOCK_RULE].concat();
        let _ = self.mesh.exec(ATTACKER, &argv);
    }
}

/// A veth between the attacker and `near` with IPv6 on (the harness turns it off in every
/// namespace) and a fixed link-local address at each end; IPv6 is turned back off and the
/// link deleted on drop.
struct V6Link<'a> {
    mesh: &'a Mesh,
    attacker_ifindex: u32,
}

impl<'a> V6Link<'a> {
    fn create(mesh: &'a Mesh) -> Result<Self> {
        let attacker_ns = mesh.pod_netns(ATTACKER)?;
        let near_ns = mesh.pod_netns(NEAR)?;
        let mut link = V6Link {
            mesh,
            attacker_ifindex: 0,
        };
        set_ipv6(mesh, true)?;
        ip(&[
            "link",
            "add",
            V6_ATTACKER_IF,
            "netns",
            &attacker_ns,
            "type",
            "veth",
            "peer",
            "name",
            V6_NEAR_IF,
            "netns",
            &near_ns,
        ])?;
        for (ns, dev, addr) in [
            (&attacker_ns, V6_ATTACKER_IF, V6_ATTACKER),
            (&near_ns, V6_NEAR_IF, V6_NEAR),
        ] {
            let addr = format!("{addr}/64");
            ip(&["-n", ns, "addr", "add", &addr, "dev", dev, "nodad"])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        link.attacker_ifindex =
            mesh.in_pod(ATTACKER, || nix::net::if_::if_nametoindex(V6_ATTACKER_IF))??;
        // The peer's address is usable once neighbour discovery can run: the link is up.
        let deadline = Instant::now() + APPLY;
        while !ip(&["-n", &attacker_ns, "link", "show", V6_ATTACKER_IF])?.contains("LOWER_UP") {
            if Instant::now() > deadline {
                bail!("the IPv6 test link did not come up");
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        Ok(link)
    }
}

impl Drop for V6Link<'_> {
    fn drop(&mut self) {
        if let Ok(ns) = self.mesh.pod_netns(ATTACKER) {
            let _ = ip(&["-n", &ns, "link", "del", V6_ATTACKER_IF]);
        }
        let _ = set_ipv6(self.mesh, false);
    }
}

/// Turns IPv6 on or off in the attacker's and `near`'s namespaces.
fn set_ipv6(mesh: &Mesh, on: bool) -> Result<()> {
    let value = if on { "0" } else { "1" };
    for pod in [ATTACKER, NEAR] {
        for key in ["all", "default"] {
            let path = format!("/proc/sys/net/ipv6/conf/{key}/disable_ipv6");
            mesh.in_pod(pod, || std::fs::write(&path, value))?
                .with_context(|| format!("write {path} in {pod}"))?;
        }
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<String> {
    let out = std::process::Command::new("ip")
        .args(args)
        .output()
        .context("run ip")?;
    ensure!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn main() -> ExitCode {
    e2e::scenario::main(
        Bypass::build,
        &scenarios![
            a_captured_attacker_is_refused_by_policy,
            the_skip_mark_does_not_get_past_the_destinations_capture,
            a_spoofed_probe_source_is_dropped_before_any_pod,
            the_agents_ports_are_no_way_in,
            ipv6_link_local_to_an_ipv4_only_pod_fails_closed,
            udp_is_not_captured_as_documented,
            deleting_its_own_capture_gains_a_pod_nothing,
        ],
        &[],
    )
}
