//! Capture with sk_lookup (inbound, outbound, DNS), in network namespaces these tests create: a
//! "pod" namespace and a "node" namespace joined by a veth pair. The node side has two addresses: the node's
//! own, and the probe source. Nothing is sent outside those namespaces. Needs root.

use std::fs::File;
use std::io::ErrorKind;
use std::io::{IoSlice, IoSliceMut};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket,
};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ebpf::{attach_capture, attach_capture_pinned, CaptureConfig, CaptureError, CaptureGuard};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sched::{setns, CloneFlags};
use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrIn, SockaddrIn6, SockaddrStorage,
};
use socket2::{Domain, Socket, Type};

const POD_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const PROBE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 3);
/// A remote client's address, made local to the pod so that the test can bind to it (the
/// agent's transparent delivery socket gets the same effect from policy routing).
const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 7);
/// The pod's and the node's IPv6 addresses (a ULA prefix, on the same veth), and the pod's
/// IPv6 resolver, another address of the node's.
const POD_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
const NODE_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
const NAMESERVER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x53);
const APP_PORT: u16 = 8080;
/// A port nobody listens on in the pod.
const CLOSED_PORT: u16 = 9999;
const INBOUND_PORT: u16 = 15006;
const HBONE_PORT: u16 = 15008;
const OUTBOUND_PORT: u16 = 15001;
const DNS_PORT: u16 = 53;
/// The agent's DNS sockets (UDP and TCP).
const DNS_PROXY_PORT: u16 = 15053;
/// A UDP port that is not DNS.
const OTHER_UDP_PORT: u16 = 5353;
/// The agent's socket mark (ztunnel's `SKIP_MARK`).
const SKIP_MARK: u32 = 0x539;
/// Upper bound for a connection to show up in a listener's accept queue.
const ACCEPT_WITHIN: Duration = Duration::from_secs(5);

#[test]
fn inbound_connections_land_on_the_agent_listener_with_the_original_destination() -> Result<()> {
    let topo = Topology::new()?;
    let pod = topo.pod_listeners()?;
    let config = CaptureConfig::new(HBONE_PORT).with_probe_source(PROBE_IP);

    let guard = attach_capture(&topo.pod.file()?, &pod.agent, &config)?;
    assert_eq!(
        topo.sk_lookup_links()?,
        1,
        "one sk_lookup link in the pod namespace"
    );
    check(&topo, &pod, From::Node, APP_PORT, Lands::Agent);
    check(&topo, &pod, From::Node, CLOSED_PORT, Lands::Agent);
    check(&topo, &pod, From::Node, HBONE_PORT, Lands::Hbone);
    check(&topo, &pod, From::Probe, APP_PORT, Lands::App);
    check(&topo, &pod, From::PodLoopback, APP_PORT, Lands::App);
    check(&topo, &pod, From::PodOwnIp, APP_PORT, Lands::App);

    drop(guard);
    assert_eq!(
        topo.sk_lookup_links_become(0)?,
        0,
        "the guard detached the program"
    );
    check(&topo, &pod, From::Node, APP_PORT, Lands::App);
    check(&topo, &pod, From::Node, CLOSED_PORT, Lands::Refused);
    Ok(())
}

#[test]
fn the_agents_delivery_to_the_app_is_not_steered_back_to_the_agent() -> Result<()> {
    let topo = Topology::new()?;
    ip(&[
        "-n",
        &topo.pod.name,
        "route",
        "add",
        "local",
        &format!("{CLIENT_IP}/32"),
        "dev",
        "lo",
    ])?;
    let pod = topo.pod_listeners()?;
    let guard = attach_capture(
        &topo.pod.file()?,
        &pod.agent,
        &CaptureConfig::new(HBONE_PORT),
    )?;

    check(
        &topo,
        &pod,
        From::Delivery(Some(&guard)),
        APP_PORT,
        Lands::App,
    );
    // Unannounced (or after its exemption ended), the same connection would loop to the agent.
    check(&topo, &pod, From::Delivery(None), APP_PORT, Lands::Agent);
    Ok(())
}

#[test]
fn without_the_agent_listener_connections_are_refused_not_passed_to_the_app() -> Result<()> {
    let topo = Topology::new()?;
    let mut pod = topo.pod_listeners()?;
    let guard = attach_capture(
        &topo.pod.file()?,
        &pod.agent,
        &CaptureConfig::new(HBONE_PORT),
    )?;
    check(&topo, &pod, From::Node, APP_PORT, Lands::Agent);

    // The agent's listener goes away (agent restarting): the app must not be reachable.
    pod.agent = topo.pod.run(placeholder)??;
    check(&topo, &pod, From::Node, APP_PORT, Lands::Refused);
    check(&topo, &pod, From::Node, HBONE_PORT, Lands::Hbone);
    drop(guard);
    Ok(())
}

#[test]
fn a_pinned_capture_outlives_its_guard_and_is_adopted_by_the_next_agent() -> Result<()> {
    let topo = Topology::new()?;
    let bpffs = Bpffs::mount()?;
    let pin_dir = bpffs.path.join("pod");
    let mut pod = topo.pod_listeners()?;
    let config = CaptureConfig::new(HBONE_PORT);

    let first = attach_capture_pinned(&topo.pod.file()?, &pod.agent, &config, &pin_dir)?;
    assert!(!first.adopted());
    check(&topo, &pod, From::Node, APP_PORT, Lands::Agent);

    // The first agent exits, leaving the capture in place; its listener closes with it.
    first.keep_pinned();
    drop(first);
    pod.agent = topo.pod.run(placeholder)??;
    assert_eq!(
        topo.sk_lookup_links()?,
        1,
        "the pinned link survives its guard"
    );
    check(&topo, &pod, From::Node, APP_PORT, Lands::Refused);

    // The next agent binds a new listener and adopts the pinned capture.
    pod.agent = topo.pod.listen(INBOUND_PORT)?;
    let second = attach_capture_pinned(&topo.pod.file()?, &pod.agent, &config, &pin_dir)?;
    assert!(second.adopted());
    assert_eq!(topo.sk_lookup_links()?, 1, "adopted, not attached twice");
    check(&topo, &pod, From::Node, APP_PORT, Lands::Agent);

    // The pod leaves the mesh: the pins and the program go.
    drop(second);
    assert_eq!(topo.sk_lookup_links_become(0)?, 0, "unpinned and detached");
    assert!(!pin_dir.exists(), "pin directory removed");
    check(&topo, &pod, From::Node, APP_PORT, Lands::App);
    Ok(())
}

#[test]
fn an_upgrade_adopts_the_capture_while_the_old_agent_still_runs() -> Result<()> {
    let topo = Topology::new()?;
    ip(&[
        "-n",
        &topo.pod.name,
        "route",
        "add",
        "local",
        &format!("{CLIENT_IP}/32"),
        "dev",
        "lo",
    ])?;
    let bpffs = Bpffs::mount()?;
    let pin_dir = bpffs.path.join("pod");
    let mut pod = topo.pod_listeners()?;
    let config = CaptureConfig::new(HBONE_PORT);
    let old = attach_capture_pinned(&topo.pod.file()?, &pod.agent, &config, &pin_dir)?;

    // The old agent is delivering a connection when the new one adopts the capture.
    let delivery = topo.pod.run(|| -> Result<(Socket, SocketAddrV4)> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.bind(&SocketAddr::V4(SocketAddrV4::new(CLIENT_IP, 0)).into())?;
        let bound = socket.local_addr()?.as_socket_ipv4().context("v4")?;
        Ok((socket, bound))
    })??;
    let exemption = old.exempt(delivery.1)?;

    // The new agent's listener (any listening socket will do for the map) replaces the old
    // one's in the map while the old one still listens.
    let old_listener = std::mem::replace(&mut pod.agent, topo.pod.run(placeholder)??);
    let new = attach_capture_pinned(&topo.pod.file()?, &pod.agent, &config, &pin_dir)?;
    assert!(new.adopted());
    assert_eq!(topo.sk_lookup_links()?, 1, "adopted, not attached twice");
    check(&topo, &pod, From::Node, APP_PORT, Lands::Agent);

    // The old agent's delivery under way is not steered to the new agent by the adoption.
    let dst = SocketAddr::V4(SocketAddrV4::new(POD_IP, APP_PORT));
    let (socket, _) = delivery;
    let client = topo.pod.run(move || {
        socket
            .connect_timeout(&dst.into(), ACCEPT_WITHIN)
            .map(|()| socket)
    })??;
    let accepted = accept_within(&pod.app, ACCEPT_WITHIN).context("delivery reached the app")?;
    assert_eq!(
        accepted.peer_addr()?,
        client.local_addr()?.as_socket().context("addr")?
    );
    drop(exemption);
    // Later, whatever an earlier agent left is removed (here: nothing is left).
    assert_eq!(new.clear_stale_exemptions(), 0);

    // The old agent exits, leaving the capture pinned: the new agent's entry stays.
    old.keep_pinned();
    drop(old);
    drop(old_listener);
    check(&topo, &pod, From::Node, APP_PORT, Lands::Agent);
    assert_eq!(topo.sk_lookup_links()?, 1);
    Ok(())
}

#[test]
fn outgoing_connections_routed_over_lo_land_on_the_outbound_listener() -> Result<()> {
    let topo = Topology::new()?;
    let pod = topo.pod_listeners()?;
    topo.capture_routing()?;
    let outbound = topo.pod.run(|| transparent_listener(OUTBOUND_PORT))??;
    let node_app = topo.node.listen(APP_PORT)?;

    let mut guard = attach_capture(
        &topo.pod.file()?,
        &pod.agent,
        &CaptureConfig::new(HBONE_PORT),
    )?;
    guard.set_outbound_listener(&outbound)?;

    // The application connecting out lands on the outbound listener, which sees the pod's
    // address as the peer and the original destination as its own address.
    let dst = SocketAddr::from((NODE_IP, APP_PORT));
    let client = topo.pod.run(move || connect(None, dst, None))??;
    let accepted =
        accept_within(&outbound, ACCEPT_WITHIN).context("nothing reached the outbound listener")?;
    assert_eq!(accepted.local_addr()?, dst, "original destination");
    assert_eq!(accepted.peer_addr()?, client.local_addr()?, "peer");
    assert_eq!(
        client.local_addr()?.ip(),
        POD_IP,
        "the pod's address is the source"
    );
    assert!(
        accept_within(&node_app, Duration::ZERO).is_none(),
        "nothing left the pod"
    );
    // Data flows both ways over the captured connection.
    echo_once(&client, &accepted)?;

    // Loopback and the pod's own address are not captured.
    check(&topo, &pod, From::PodLoopback, APP_PORT, Lands::App);
    check(&topo, &pod, From::PodOwnIp, APP_PORT, Lands::App);

    // The agent's own connections (marked) leave the pod.
    let marked = topo.pod.run(move || -> std::io::Result<TcpStream> {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        s.set_mark(SKIP_MARK)?;
        s.connect_timeout(&dst.into(), ACCEPT_WITHIN)?;
        Ok(s.into())
    })??;
    let at_node = accept_within(&node_app, ACCEPT_WITHIN)
        .context("the marked connection did not reach the node")?;
    assert_eq!(at_node.peer_addr()?, marked.local_addr()?);
    assert!(accept_within(&outbound, Duration::ZERO).is_none());

    // Without an outbound listener registered, outgoing connections fail closed.
    drop(accepted);
    drop(outbound);
    let refused = topo.pod.run(move || connect(None, dst, None))?;
    if let Ok(client) = &refused {
        assert!(
            reset_by_a_closing_listener(client),
            "connected without the agent: {refused:?}"
        );
    }
    assert!(
        accept_within(&pod.app, Duration::ZERO).is_none(),
        "the pod's application took a connection"
    );
    assert!(
        accept_within(&node_app, Duration::ZERO).is_none(),
        "nothing left the pod"
    );
    Ok(())
}

#[test]
fn outgoing_connections_land_on_the_outbound_listener_of_their_family() -> Result<()> {
    let CapturedOutbound {
        topo,
        guard,
        outbound,
        ..
    } = &mut CapturedOutbound::new()?;
    guard.set_outbound_listener(&outbound.v4)?;
    guard.set_outbound6_listener(&outbound.v6)?;

    for family in [Family::V4, Family::V6] {
        let dst = family.node(APP_PORT);
        let node_app = topo.node.run(|| TcpListener::bind(dst))??;
        captured_by(topo, outbound.of(family), dst)?;
        let other = outbound.of(family.other());
        assert_none_waiting(
            &dst,
            &[
                (other, "the other family's listener"),
                (&node_app, "the node"),
            ],
        );
    }
    Ok(())
}

/// Why a listener per family: one on `[::1]` is v6-only (the kernel makes every IPv6 socket
/// bound to an address other than the wildcard one v6-only), and the program cannot hand it an
/// IPv4 lookup. Alone in the IPv4 slot, as agents before per-family listeners registered it
/// (and still do in a capture adopted from one), it takes a dual-stack pod's IPv6 connections
/// out (the IPv6 slot being empty), and the pod's IPv4 ones fail closed: they reach neither a
/// listener nor the network.
#[test]
fn an_ipv6_listener_alone_in_the_outbound_slot_takes_ipv6_only() -> Result<()> {
    let CapturedOutbound {
        topo,
        guard,
        outbound,
        pod,
    } = &mut CapturedOutbound::new()?;
    guard.set_outbound_listener(&outbound.v6)?;
    let (v4, v6) = (Family::V4.node(APP_PORT), Family::V6.node(APP_PORT));
    let mut node_apps = Vec::new();
    for dst in [v4, v6] {
        node_apps.push(topo.node.run(move || TcpListener::bind(dst))??);
    }

    captured_by(topo, &outbound.v6, v6).context("IPv6, through the IPv4 slot")?;

    // A SYN is retransmitted after a second: a first one taken by anything would have
    // connected by then.
    let attempt = topo.pod.run(move || -> std::io::Result<TcpStream> {
        let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
        socket.connect_timeout(&v4.into(), Duration::from_secs(1))?;
        Ok(socket.into())
    })?;
    assert!(attempt.is_err(), "IPv4 connected: {attempt:?}");
    let listeners = [
        (&outbound.v4, "the IPv4 listener"),
        (&outbound.v6, "the IPv6 listener"),
        (&pod.app, "the application"),
    ];
    let nodes = node_apps.iter().map(|l| (l, "the node"));
    assert_none_waiting(&v4, &listeners.into_iter().chain(nodes).collect::<Vec<_>>());
    Ok(())
}

/// Asserts that no connection of the scenario `what` waits on any of `listeners` (each with
/// the name to say).
fn assert_none_waiting(what: &dyn std::fmt::Display, listeners: &[(&TcpListener, &str)]) {
    for (listener, name) in listeners {
        assert!(
            accept_within(listener, Duration::ZERO).is_none(),
            "{what}: {name} took a connection"
        );
    }
}

/// The pod's application connects to `dst`, outside the pod: `listener` accepts the
/// connection with the original destination as its local address and the application's
/// (at the pod's address) as its peer, and data flows both ways.
fn captured_by(topo: &Topology, listener: &TcpListener, dst: SocketAddr) -> Result<()> {
    let client = topo.pod.run(move || connect(None, dst, None))??;
    let accepted = accept_within(listener, ACCEPT_WITHIN)
        .with_context(|| format!("{dst}: nothing reached the outbound listener"))?;
    assert_eq!(accepted.local_addr()?, dst, "original destination");
    assert_eq!(accepted.peer_addr()?, client.local_addr()?, "peer");
    let pod_ip = match dst {
        SocketAddr::V4(_) => IpAddr::from(POD_IP),
        SocketAddr::V6(_) => POD_IP6.into(),
    };
    assert_eq!(client.local_addr()?.ip(), pod_ip, "source");
    echo_once(&client, &accepted)
}

#[test]
fn dns_over_udp_lands_on_the_agents_dns_socket_with_the_original_destination() -> Result<()> {
    dns_over_udp(Family::V4)
}

#[test]
fn ipv6_dns_over_udp_lands_on_the_agents_ipv6_dns_socket_with_the_original_destination(
) -> Result<()> {
    dns_over_udp(Family::V6)
}

/// The application's query, from a connected socket as glibc's resolver sends it, reaches the
/// agent's DNS socket of its family with its original destination; the answer, sent from a
/// socket bound to the nameserver's address and port, comes back as if from the nameserver.
fn dns_over_udp(family: Family) -> Result<()> {
    let CapturedDns { topo, dns, .. } = &CapturedDns::new()?;
    let nameserver = family.nameserver();
    // The resolver the pod is configured with: nothing may reach it while DNS is captured.
    let resolver = topo.node.run(|| UdpSocket::bind(nameserver))??;

    let app = topo.pod.run(move || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind((family.any(), 0))?;
        s.connect(nameserver)?;
        s.send(b"query")?;
        Ok(s)
    })??;
    let query =
        recv_within(dns.udp(family), ACCEPT_WITHIN)?.context("no query reached the agent")?;
    assert_eq!(query.data, b"query");
    assert_eq!(query.from, app.local_addr()?, "sender");
    assert_eq!(
        query.from.ip(),
        family.pod_ip(),
        "the pod's address is the source"
    );
    assert_eq!(query.orig_dst, Some(nameserver), "original destination");
    assert!(
        recv_within(dns.udp(family.other()), Duration::ZERO)?.is_none(),
        "the other family's DNS socket took the query"
    );
    assert!(
        recv_within(&resolver, Duration::ZERO)?.is_none(),
        "the query left the pod"
    );

    // The agent replies from a socket bound to the original destination (IP_TRANSPARENT, as
    // it is not a local address; SO_REUSEADDR, as any number may be bound to it; the agent's
    // mark; unconnected: see below).
    let reply = topo.pod.run(move || reply_socket(nameserver))??;
    reply.send_to(b"answer", app.local_addr()?)?;
    let (answer, from) = recv_from_within(&app)?;
    assert_eq!(answer, b"answer");
    assert_eq!(from, nameserver, "the answer comes from the nameserver");

    // The reply socket, kept open for the next answers, takes no query: the program still
    // hands them to the agent's DNS socket (only a *connected* socket bound to the nameserver
    // would take the datagrams of its peer before the program runs).
    app.send(b"again")?;
    let query = recv_within(dns.udp(family), ACCEPT_WITHIN)?.context("a query after the answer")?;
    assert_eq!(query.data, b"again");
    assert!(recv_within(&reply, Duration::ZERO)?.is_none());
    assert!(recv_within(&resolver, Duration::ZERO)?.is_none());
    Ok(())
}

/// Why the agent answers from a socket bound to the nameserver: replying from its DNS socket
/// with IP_PKTINFO sets the source address only, so the reply comes from the agent's port,
/// which no resolver accepts (a connected socket does not even receive it).
#[test]
fn an_answer_from_the_dns_socket_with_ip_pktinfo_keeps_the_agents_port() -> Result<()> {
    let CapturedDns { topo, dns, .. } = &CapturedDns::new()?;
    let nameserver = SocketAddrV4::new(NODE_IP, DNS_PORT);
    let unconnected = topo.pod.run(move || -> std::io::Result<UdpSocket> {
        let s = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0))?;
        s.send_to(b"query", nameserver)?;
        Ok(s)
    })??;
    let query = recv_within(&dns.v4.udp, ACCEPT_WITHIN)?.context("the query")?;
    assert_eq!(query.orig_dst, Some(SocketAddr::V4(nameserver)));
    let SocketAddr::V4(client) = query.from else {
        bail!("an IPv4 query from {}", query.from);
    };
    send_from(&dns.v4.udp, *nameserver.ip(), client, b"answer")?;
    let (_, from) = recv_from_within(&unconnected)?;
    assert_eq!(
        from,
        SocketAddr::from((NODE_IP, DNS_PROXY_PORT)),
        "IP_PKTINFO keeps the socket's port"
    );
    Ok(())
}

#[test]
fn other_udp_is_not_steered() -> Result<()> {
    other_udp(Family::V4)
}

#[test]
fn other_ipv6_udp_is_not_steered() -> Result<()> {
    other_udp(Family::V6)
}

/// UDP to another port, and UDP to port 53 that the application does not send out of the
/// pod, reach whoever they would without capture.
fn other_udp(family: Family) -> Result<()> {
    let CapturedDns { topo, dns, .. } = &CapturedDns::new()?;
    let node_ip = family.nameserver().ip();
    let node = topo
        .node
        .run(|| UdpSocket::bind((node_ip, OTHER_UDP_PORT)))??;
    // A DNS server in the pod, on its loopback and on its own address.
    let pod_server = topo.pod.run(|| family.wildcard_udp(DNS_PORT))??;

    // The pod's UDP to another port leaves the pod.
    let to_node = SocketAddr::new(node_ip, OTHER_UDP_PORT);
    let sender = topo.pod.run(move || send_once(to_node))??;
    let (_, from) = recv_from_within(&node)?;
    assert_eq!(
        from,
        SocketAddr::new(family.pod_ip(), sender.local_addr()?.port())
    );

    // UDP to port 53 from outside the pod, to the pod's loopback and to its own address
    // reaches the pod's server.
    let to_pod = SocketAddr::new(family.pod_ip(), DNS_PORT);
    for (ns, dst) in [
        (&topo.node, to_pod),
        (&topo.pod, SocketAddr::new(family.loopback(), DNS_PORT)),
        (&topo.pod, to_pod),
    ] {
        ns.run(move || send_once(dst))??;
        recv_from_within(&pod_server).with_context(|| format!("to {dst} from {}", ns.name))?;
    }
    for f in [Family::V4, Family::V6] {
        assert!(
            recv_within(dns.udp(f), Duration::ZERO)?.is_none(),
            "the agent's {f:?} DNS socket took a datagram"
        );
    }
    Ok(())
}

#[test]
fn dns_over_tcp_lands_on_the_dns_listener_or_else_on_the_outbound_one() -> Result<()> {
    dns_over_tcp(Family::V4)
}

#[test]
fn ipv6_dns_over_tcp_lands_on_the_ipv6_dns_listener_or_else_on_the_outbound_one() -> Result<()> {
    dns_over_tcp(Family::V6)
}

fn dns_over_tcp(family: Family) -> Result<()> {
    let CapturedDns {
        topo, dns, guard, ..
    } = &mut CapturedDns::new()?;
    let outbound = topo
        .pod
        .run(|| transparent_listener_on(SocketAddr::new(family.loopback(), OUTBOUND_PORT)))??;
    let nameserver = family.nameserver();
    let resolver = topo.node.run(|| TcpListener::bind(nameserver))??;
    match family {
        Family::V4 => guard.set_outbound_listener(&outbound)?,
        Family::V6 => guard.set_outbound6_listener(&outbound)?,
    }

    let connect_out = || topo.pod.run(move || connect(None, nameserver, None));
    let client = connect_out()??;
    let accepted = accept_within(dns.tcp(family), ACCEPT_WITHIN)
        .context("nothing reached the DNS listener")?;
    assert_eq!(accepted.local_addr()?, nameserver, "original destination");
    assert_eq!(accepted.peer_addr()?, client.local_addr()?, "peer");
    echo_once(&client, &accepted)?;
    assert!(accept_within(&outbound, Duration::ZERO).is_none());
    assert!(accept_within(dns.tcp(family.other()), Duration::ZERO).is_none());

    // Without a DNS listener, TCP to port 53 is captured like any other connection.
    guard.clear_dns_listeners();
    let client = connect_out()??;
    let accepted =
        accept_within(&outbound, ACCEPT_WITHIN).context("nothing reached the outbound listener")?;
    assert_eq!(accepted.local_addr()?, nameserver, "original destination");
    assert_eq!(accepted.peer_addr()?, client.local_addr()?, "peer");
    assert!(accept_within(dns.tcp(family), Duration::ZERO).is_none());
    assert!(
        accept_within(&resolver, Duration::ZERO).is_none(),
        "nothing left the pod"
    );
    Ok(())
}

#[test]
fn without_the_dns_socket_udp_to_port_53_reaches_no_socket() -> Result<()> {
    dns_without_its_socket(Family::V4)
}

#[test]
fn without_the_ipv6_dns_socket_ipv6_udp_to_port_53_reaches_no_socket() -> Result<()> {
    dns_without_its_socket(Family::V6)
}

/// The application's UDP to port 53 of `family`, routed to `lo`, while the agent has no DNS
/// socket of that family in the map (only the other family's): dropped, neither handed to
/// the other family's socket nor to a server of the pod's own, nor sent on.
fn dns_without_its_socket(family: Family) -> Result<()> {
    let CapturedDns {
        topo, dns, guard, ..
    } = &mut CapturedDns::unregistered()?;
    let nameserver = family.nameserver();
    let resolver = topo.node.run(|| UdpSocket::bind(nameserver))??;
    // A DNS server of the application's own, on the wildcard address: the normal lookup would
    // hand it datagrams to any address.
    let pod_server = topo.pod.run(|| family.wildcard_udp(DNS_PORT))??;
    let lost = |dns: &DnsSockets, what: &str| -> Result<()> {
        let app = topo.pod.run(move || -> std::io::Result<UdpSocket> {
            let s = UdpSocket::bind((family.any(), 0))?;
            s.connect(nameserver)?;
            s.send(b"query")?;
            Ok(s)
        })??;
        // No answer, and no refusal either: the kernel sends "port unreachable" only from a
        // local address, and the nameserver's is not one of the pod's.
        app.set_read_timeout(Some(Duration::from_millis(300)))?;
        let mut buf = [0u8; 16];
        let answer = app.recv(&mut buf);
        let nothing = |e: &std::io::Error| {
            matches!(
                e.kind(),
                ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::ConnectionRefused
            )
        };
        assert!(
            matches!(&answer, Err(e) if nothing(e)),
            "{what}: got {answer:?}"
        );
        for (socket, name) in [
            (dns.udp(family), "the agent's unregistered DNS socket"),
            (dns.udp(family.other()), "the other family's DNS socket"),
            (&pod_server, "the pod's own DNS server"),
            (&resolver, "the resolver (the query left the pod)"),
        ] {
            assert!(
                recv_within(socket, Duration::ZERO)?.is_none(),
                "{what}: {name} received the query"
            );
        }
        Ok(())
    };
    let register_other = |guard: &mut CaptureGuard, dns: &DnsSockets| match family {
        Family::V4 => guard.set_dns6_listeners(&dns.v6.udp, &dns.v6.tcp),
        Family::V6 => guard.set_dns_listeners(&dns.v4.udp, &dns.v4.tcp),
    };

    // Never registered (the other family's are).
    register_other(guard, dns)?;
    lost(dns, "no DNS socket of its family registered")?;
    // Registered, then taken out.
    dns.register(guard)?;
    guard.clear_dns_listeners();
    register_other(guard, dns)?;
    lost(dns, "DNS sockets cleared")?;
    if family == Family::V6 {
        dns.register(guard)?;
        guard.clear_dns6_listeners();
        lost(dns, "IPv6 DNS sockets cleared")?;
    }
    // Registered, then closed (the agent exits): the kernel takes it out of the map.
    dns.register(guard)?;
    *dns = topo.pod.run(DnsSockets::bind_other)??;
    register_other(guard, dns)?;
    lost(dns, "DNS socket closed")?;
    Ok(())
}

#[test]
fn an_adopted_capture_without_dns_slots_says_so() -> Result<()> {
    let (topo, bpffs) = (Topology::new()?, Bpffs::mount()?);
    let pin_dir = bpffs.path.join("pod");
    let pod = topo.pod_listeners()?;
    let dns = topo.pod.run(DnsSockets::bind)??;
    // An agent from before DNS capture pinned a two-slot socket map.
    let mut adopted = adopt_with_map_of(&topo, &pod, &pin_dir, 2)?;
    assert!(adopted.adopted());
    let err = adopted
        .set_dns_listeners(&dns.v4.udp, &dns.v4.tcp)
        .expect_err("a two-slot map has no DNS slots");
    assert!(
        matches!(
            err,
            CaptureError::NoDnsSlots {
                slots: 2,
                needed: 4
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("predates DNS capture"), "{err}");
    let err = adopted
        .set_dns6_listeners(&dns.v6.udp, &dns.v6.tcp)
        .expect_err("nor IPv6 DNS slots");
    assert!(
        matches!(
            err,
            CaptureError::NoDns6Slots {
                slots: 2,
                needed: 6
            }
        ),
        "{err:?}"
    );
    // The rest of the capture is usable as before.
    adopted.clear_dns_listeners();
    adopted.set_inbound_listener(&pod.agent)?;
    drop(adopted);
    assert!(!pin_dir.exists(), "pin directory removed");
    Ok(())
}

#[test]
fn an_adopted_capture_without_ipv6_dns_slots_keeps_its_ipv4_dns_and_says_so() -> Result<()> {
    let (topo, bpffs) = (Topology::new()?, Bpffs::mount()?);
    let pin_dir = bpffs.path.join("pod");
    let pod = topo.pod_listeners()?;
    let dns = topo.pod.run(DnsSockets::bind)??;
    // An agent from before IPv6 DNS capture pinned a four-slot socket map.
    let mut adopted = adopt_with_map_of(&topo, &pod, &pin_dir, 4)?;
    adopted.set_dns_listeners(&dns.v4.udp, &dns.v4.tcp)?;
    let err = adopted
        .set_dns6_listeners(&dns.v6.udp, &dns.v6.tcp)
        .expect_err("a four-slot map has no IPv6 DNS slots");
    assert!(
        matches!(
            err,
            CaptureError::NoDns6Slots {
                slots: 4,
                needed: 6
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("predates IPv6 DNS capture"),
        "{err}"
    );
    adopted.clear_dns_listeners();
    drop(adopted);
    assert!(!pin_dir.exists(), "pin directory removed");
    Ok(())
}

#[test]
fn an_adopted_capture_without_an_ipv6_outbound_slot_says_so() -> Result<()> {
    let (topo, bpffs) = (Topology::new()?, Bpffs::mount()?);
    let pin_dir = bpffs.path.join("pod");
    let pod = topo.pod_listeners()?;
    let outbound = topo.pod.run(OutboundListeners::bind)??;
    // An agent from before per-family outbound listeners pinned a six-slot socket map.
    let mut adopted = adopt_with_map_of(&topo, &pod, &pin_dir, 6)?;
    let err = adopted
        .set_outbound6_listener(&outbound.v6)
        .expect_err("a six-slot map has no IPv6 outbound slot");
    assert!(
        matches!(
            err,
            CaptureError::NoOutbound6Slot {
                slots: 6,
                needed: 7
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("predates per-family outbound listeners"),
        "{err}"
    );
    // Its one outbound slot takes a listener as before; the slot it lacks needs no clearing.
    adopted.set_outbound_listener(&outbound.v6)?;
    adopted.clear_outbound6_listener();
    drop(adopted);
    assert!(!pin_dir.exists(), "pin directory removed");
    Ok(())
}

/// A capture pinned under `pin_dir` by an earlier agent whose socket map had `slots` slots
/// (the map pin replaced by one of that size), adopted.
fn adopt_with_map_of(
    topo: &Topology,
    pod: &PodListeners,
    pin_dir: &Path,
    slots: u32,
) -> Result<CaptureGuard> {
    let config = CaptureConfig::new(HBONE_PORT);
    let first = attach_capture_pinned(&topo.pod.file()?, &pod.agent, &config, pin_dir)?;
    first.keep_pinned();
    drop(first);
    let map_pin = pin_dir.join("listeners");
    std::fs::remove_file(&map_pin)?;
    run(
        &tool("bpftool")?,
        &[
            "map",
            "create",
            &map_pin.to_string_lossy(),
            "type",
            "sockmap",
            "key",
            "4",
            "value",
            "4",
            "entries",
            &slots.to_string(),
            "name",
            "listeners",
        ],
    )?;
    let adopted = attach_capture_pinned(&topo.pod.file()?, &pod.agent, &config, pin_dir)?;
    assert!(adopted.adopted());
    Ok(adopted)
}

/// Sends a byte each way between the two ends of one connection.
fn echo_once(a: &TcpStream, b: &TcpStream) -> Result<()> {
    use std::io::{Read, Write};
    let mut buf = [0u8; 1];
    for (from, to) in [(a, b), (b, a)] {
        (&*from).write_all(b"x")?;
        to.set_read_timeout(Some(ACCEPT_WITHIN))?;
        (&*to).read_exact(&mut buf)?;
        assert_eq!(&buf, b"x");
    }
    Ok(())
}

// === DNS helpers ===

/// The address family of a DNS scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    fn other(self) -> Self {
        match self {
            Self::V4 => Self::V6,
            Self::V6 => Self::V4,
        }
    }

    /// The pod's address of this family.
    fn pod_ip(self) -> IpAddr {
        match self {
            Self::V4 => POD_IP.into(),
            Self::V6 => POD_IP6.into(),
        }
    }

    /// `port` at the node's address of this family, across the veth.
    fn node(self, port: u16) -> SocketAddr {
        match self {
            Self::V4 => SocketAddr::from((NODE_IP, port)),
            Self::V6 => SocketAddr::from((NODE_IP6, port)),
        }
    }

    /// The resolver the pod is configured with, on the node's side of the veth.
    fn nameserver(self) -> SocketAddr {
        match self {
            Self::V4 => SocketAddr::from((NODE_IP, DNS_PORT)),
            Self::V6 => SocketAddr::from((NAMESERVER_IP6, DNS_PORT)),
        }
    }

    fn any(self) -> IpAddr {
        match self {
            Self::V4 => Ipv4Addr::UNSPECIFIED.into(),
            Self::V6 => Ipv6Addr::UNSPECIFIED.into(),
        }
    }

    fn loopback(self) -> IpAddr {
        match self {
            Self::V4 => Ipv4Addr::LOCALHOST.into(),
            Self::V6 => Ipv6Addr::LOCALHOST.into(),
        }
    }

    /// A UDP socket on this family's wildcard address (IPv6: only IPv6, so that an IPv4 one
    /// may take the same port).
    fn wildcard_udp(self, port: u16) -> std::io::Result<UdpSocket> {
        let addr = SocketAddr::new(self.any(), port);
        let s = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
        if self == Self::V6 {
            s.set_only_v6(true)?;
        }
        s.bind(&addr.into())?;
        Ok(s.into())
    }
}

/// A pod whose capture (its routing and the program, with the pod's inbound listener) takes
/// its DNS to the agent's DNS sockets of both families. Fields drop in order: the program
/// detaches before the namespaces go.
struct CapturedDns {
    guard: CaptureGuard,
    dns: DnsSockets,
    _pod: PodListeners,
    topo: Topology,
}

impl CapturedDns {
    fn new() -> Result<Self> {
        let mut captured = Self::unregistered()?;
        captured.dns.register(&mut captured.guard)?;
        Ok(captured)
    }

    /// The DNS sockets bound, not registered with the program.
    fn unregistered() -> Result<Self> {
        let topo = Topology::new()?;
        let pod = topo.pod_listeners()?;
        topo.capture_routing()?;
        let dns = topo.pod.run(DnsSockets::bind)??;
        let guard = attach_capture(
            &topo.pod.file()?,
            &pod.agent,
            &CaptureConfig::new(HBONE_PORT),
        )?;
        Ok(Self {
            guard,
            dns,
            _pod: pod,
            topo,
        })
    }
}

/// The agent's DNS sockets as it opens them in the pod, one pair per family.
struct DnsSockets {
    v4: DnsPair,
    v6: DnsPair,
}

/// One family's: on loopback, `IP_TRANSPARENT` (the TCP listener's connections, and the UDP
/// socket's answers, have the nameserver's address as their local one), with the agent's
/// mark, the UDP socket reporting each datagram's original destination
/// (`IP_RECVORIGDSTADDR` / `IPV6_RECVORIGDSTADDR`).
struct DnsPair {
    udp: UdpSocket,
    tcp: TcpListener,
}

impl DnsSockets {
    fn bind() -> std::io::Result<Self> {
        Self::bind_on(DNS_PROXY_PORT)
    }

    /// Another agent's sockets (the first ones may be held a moment longer by a forked child).
    fn bind_other() -> std::io::Result<Self> {
        Self::bind_on(DNS_PROXY_PORT + 100)
    }

    fn bind_on(port: u16) -> std::io::Result<Self> {
        Ok(Self {
            v4: DnsPair::bind(Family::V4, port)?,
            v6: DnsPair::bind(Family::V6, port)?,
        })
    }

    /// Registers both families' sockets with the capture.
    fn register(&self, guard: &mut CaptureGuard) -> Result<()> {
        guard.set_dns_listeners(&self.v4.udp, &self.v4.tcp)?;
        guard.set_dns6_listeners(&self.v6.udp, &self.v6.tcp)?;
        Ok(())
    }

    fn udp(&self, family: Family) -> &UdpSocket {
        match family {
            Family::V4 => &self.v4.udp,
            Family::V6 => &self.v6.udp,
        }
    }

    fn tcp(&self, family: Family) -> &TcpListener {
        match family {
            Family::V4 => &self.v4.tcp,
            Family::V6 => &self.v6.tcp,
        }
    }
}

impl DnsPair {
    fn bind(family: Family, port: u16) -> std::io::Result<Self> {
        let addr = SocketAddr::new(family.loopback(), port);
        let udp = Socket::new(Domain::for_address(addr), Type::DGRAM, None)?;
        udp.set_ip_transparent(true)?;
        udp.set_mark(SKIP_MARK)?;
        udp.bind(&addr.into())?;
        let udp = UdpSocket::from(udp);
        match family {
            Family::V4 => setsockopt(&udp, sockopt::Ipv4OrigDstAddr, &true)?,
            Family::V6 => setsockopt(&udp, sockopt::Ipv6OrigDstAddr, &true)?,
        }
        Ok(Self {
            udp,
            tcp: transparent_listener_on(addr)?,
        })
    }
}

/// What the agent sends an answer from: a socket bound to the nameserver's address and port.
fn reply_socket(nameserver: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(nameserver), Type::DGRAM, None)?;
    s.set_ip_transparent(true)?;
    s.set_reuse_address(true)?;
    s.set_mark(SKIP_MARK)?;
    s.bind(&nameserver.into())?;
    Ok(s.into())
}

/// A datagram as the agent's DNS socket receives it.
struct Datagram {
    data: Vec<u8>,
    from: SocketAddr,
    orig_dst: Option<SocketAddr>,
}

/// The next datagram on `socket` within `within`, with its original destination if the
/// socket reports it.
fn recv_within(socket: &UdpSocket, within: Duration) -> Result<Option<Datagram>> {
    if !readable_within(socket.as_fd(), within) {
        return Ok(None);
    }
    let mut buf = [0u8; 512];
    let mut iov = [IoSliceMut::new(&mut buf)];
    let mut cmsg = nix::cmsg_space!(nix::libc::sockaddr_in6);
    let msg = recvmsg::<SockaddrStorage>(
        socket.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )?;
    let from = msg.address.context("no sender address")?;
    let from = match (from.as_sockaddr_in(), from.as_sockaddr_in6()) {
        (Some(v4), _) => SocketAddr::V4((*v4).into()),
        (_, Some(v6)) => SocketAddr::V6((*v6).into()),
        _ => bail!("a sender that is no IP address: {from}"),
    };
    let orig_dst = msg.cmsgs()?.find_map(|c| match c {
        ControlMessageOwned::Ipv4OrigDstAddr(addr) => {
            Some(SocketAddr::V4(SockaddrIn::from(addr).into()))
        }
        ControlMessageOwned::Ipv6OrigDstAddr(addr) => {
            Some(SocketAddr::V6(SockaddrIn6::from(addr).into()))
        }
        _ => None,
    });
    let len = msg.bytes;
    Ok(Some(Datagram {
        data: buf[..len].to_vec(),
        from,
        orig_dst,
    }))
}

/// The next datagram on `socket` and its sender, within [`ACCEPT_WITHIN`].
fn recv_from_within(socket: &UdpSocket) -> Result<(Vec<u8>, SocketAddr)> {
    socket.set_read_timeout(Some(ACCEPT_WITHIN))?;
    let mut buf = [0u8; 512];
    let (len, from) = socket.recv_from(&mut buf).context("no datagram")?;
    Ok((buf[..len].to_vec(), from))
}

/// Sends `data` to `to` from `socket` with `src` as the source address (`IP_PKTINFO`).
fn send_from(socket: &UdpSocket, src: Ipv4Addr, to: SocketAddrV4, data: &[u8]) -> Result<()> {
    let info = nix::libc::in_pktinfo {
        ipi_ifindex: 0,
        ipi_spec_dst: nix::libc::in_addr {
            s_addr: u32::from_ne_bytes(src.octets()),
        },
        ipi_addr: nix::libc::in_addr { s_addr: 0 },
    };
    sendmsg(
        socket.as_raw_fd(),
        &[IoSlice::new(data)],
        &[ControlMessage::Ipv4PacketInfo(&info)],
        MsgFlags::empty(),
        Some(&SockaddrIn::from(to)),
    )?;
    Ok(())
}

/// Sends one datagram to `dst` from an ephemeral port.
fn send_once(dst: SocketAddr) -> std::io::Result<UdpSocket> {
    let any: IpAddr = match dst {
        SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let s = UdpSocket::bind((any, 0))?;
    s.send_to(b"datagram", dst)?;
    Ok(s)
}

fn readable_within(fd: std::os::fd::BorrowedFd<'_>, within: Duration) -> bool {
    let millis = u16::try_from(within.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
    matches!(poll(&mut fds, PollTimeout::from(millis)), Ok(n) if n > 0)
}

/// A listening IPv4 socket on loopback that takes connections to any address (the agent's
/// outbound listener).
fn transparent_listener(port: u16) -> std::io::Result<TcpListener> {
    transparent_listener_on(SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
}

/// A listening socket on `addr` that takes connections to any address of its family (the
/// agent's outbound and DNS listeners).
fn transparent_listener_on(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_ip_transparent(true)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(16)?;
    Ok(s.into())
}

/// A pod whose capture (its routing and the program, with the pod's inbound listener) takes
/// its outgoing connections to the agent's outbound listeners, once registered. Fields drop
/// in order: the program detaches before the namespaces go.
struct CapturedOutbound {
    guard: CaptureGuard,
    outbound: OutboundListeners,
    pod: PodListeners,
    topo: Topology,
}

impl CapturedOutbound {
    fn new() -> Result<Self> {
        let topo = Topology::new()?;
        let pod = topo.pod_listeners()?;
        topo.capture_routing()?;
        let outbound = topo.pod.run(OutboundListeners::bind)??;
        let config = CaptureConfig::new(HBONE_PORT);
        let guard = attach_capture(&topo.pod.file()?, &pod.agent, &config)?;
        Ok(Self {
            guard,
            outbound,
            pod,
            topo,
        })
    }
}

/// The agent's outbound listeners, one per family.
struct OutboundListeners {
    v4: TcpListener,
    v6: TcpListener,
}

impl OutboundListeners {
    fn bind() -> std::io::Result<Self> {
        let on = |f: Family| transparent_listener_on(SocketAddr::new(f.loopback(), OUTBOUND_PORT));
        Ok(Self {
            v4: on(Family::V4)?,
            v6: on(Family::V6)?,
        })
    }

    fn of(&self, family: Family) -> &TcpListener {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }
}

// === scenario helper ===

#[derive(Debug, Clone, Copy)]
enum From<'a> {
    /// The node's address, across the veth.
    Node,
    /// The probe source address, across the veth.
    Probe,
    /// Inside the pod, to 127.0.0.1.
    PodLoopback,
    /// Inside the pod, to the pod's own address (crosses `lo`).
    PodOwnIp,
    /// Inside the pod, from the client's address to the pod's (the agent handing a connection
    /// to the app), exempted with the guard if given.
    Delivery(Option<&'a CaptureGuard>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lands {
    Agent,
    App,
    Hbone,
    Refused,
}

/// Connects `from` to `<dst>:port` and asserts which pod listener accepted it; every accepted
/// socket must keep the original destination as its local address.
fn check(topo: &Topology, pod: &PodListeners, from: From<'_>, port: u16, expected: Lands) {
    let (client_ns, source, dst, exempt) = match from {
        From::Node => (&topo.node, Some(NODE_IP), POD_IP, None),
        From::Probe => (&topo.node, Some(PROBE_IP), POD_IP, None),
        From::PodLoopback => (&topo.pod, None, Ipv4Addr::LOCALHOST, None),
        From::PodOwnIp => (&topo.pod, None, POD_IP, None),
        From::Delivery(exempt) => (&topo.pod, Some(CLIENT_IP), POD_IP, exempt),
    };
    let dst = SocketAddr::V4(SocketAddrV4::new(dst, port));
    let what = format!("{from:?} -> {dst}");
    let connected = client_ns
        .run(move || connect(source, dst, exempt))
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
    let client = match connected {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            assert_eq!(expected, Lands::Refused, "{what}: refused");
            pod.assert_nothing_pending(&what);
            return;
        }
        Err(e) => panic!("{what}: connect: {e}"),
        Ok(client) => client,
    };
    if expected == Lands::Refused {
        assert!(
            reset_by_a_closing_listener(&client),
            "{what}: connected, expected a refusal"
        );
        pod.assert_nothing_pending(&what);
        return;
    }
    let listener = match expected {
        Lands::Agent => &pod.agent,
        Lands::App => &pod.app,
        Lands::Hbone => &pod.hbone,
        Lands::Refused => unreachable!(),
    };
    let accepted = accept_within(listener, ACCEPT_WITHIN).unwrap_or_else(|| {
        panic!(
            "{what}: nothing reached the {expected:?} listener; pending: {:?}",
            pod.pending()
        )
    });
    assert_eq!(
        accepted.peer_addr().ok(),
        client.local_addr().ok(),
        "{what}: peer"
    );
    assert_eq!(
        accepted.local_addr().ok(),
        Some(dst),
        "{what}: original destination"
    );
    pod.assert_nothing_pending(&what);
}

/// Whether `client`, connected where a refusal was expected, was only taken by an agent
/// listener that was closing, and is reset. A listener the test closes stays open until every
/// process holding it lets go, and a process spawned meanwhile by any thread of this binary
/// (`ip`, `bpftool`, `mount`) holds a copy of every descriptor between its fork and its exec:
/// a connection arriving in that moment is queued on the listener and reset when the copy
/// closes. It never reaches the application or leaves the pod (the callers check), so the
/// pod still fails closed. (Run with a thread spawning processes in a loop, 5 of 8 runs of
/// `outgoing_connections_routed_over_lo_land_on_the_outbound_listener` connected like this;
/// every such connection was reset, none reached the application or the node.)
fn reset_by_a_closing_listener(client: &TcpStream) -> bool {
    use std::io::Read;
    if client.set_read_timeout(Some(ACCEPT_WITHIN)).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    match (&*client).read(&mut byte) {
        Ok(0) => true,
        Err(e) => e.kind() == ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

/// Stands in for a closed agent listener: bound to an ephemeral loopback port no test
/// connects to, so nothing can ever be pending on it.
fn placeholder() -> std::io::Result<TcpListener> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
}

/// Connects to `dst` from `source` (any port); with `exempt`, the way the agent delivers: bind
/// first, announce the bound address, connect, end the exemption.
fn connect(
    source: Option<Ipv4Addr>,
    dst: SocketAddr,
    exempt: Option<&CaptureGuard>,
) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(dst), Type::STREAM, None)?;
    if let Some(ip) = source {
        socket.bind(&SocketAddr::V4(SocketAddrV4::new(ip, 0)).into())?;
    }
    let exemption = match (exempt, socket.local_addr()?.as_socket()) {
        (Some(guard), Some(SocketAddr::V4(bound))) => {
            Some(guard.exempt(bound).map_err(std::io::Error::other)?)
        }
        _ => None,
    };
    socket.connect_timeout(&dst.into(), ACCEPT_WITHIN)?;
    drop(exemption);
    Ok(socket.into())
}

/// Waits for a connection in `listener`'s accept queue (the client's `connect` returns on the
/// SYN-ACK, slightly before the server side completes), at most `within`.
fn accept_within(listener: &TcpListener, within: Duration) -> Option<TcpStream> {
    let millis = u16::try_from(within.as_millis()).unwrap_or(u16::MAX);
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    match poll(&mut fds, PollTimeout::from(millis)) {
        Ok(n) if n > 0 => listener.accept().ok().map(|(stream, _)| stream),
        _ => None,
    }
}

struct PodListeners {
    agent: TcpListener,
    app: TcpListener,
    hbone: TcpListener,
}

impl PodListeners {
    /// Names the listeners that have a connection waiting (and accepts it).
    fn pending(&self) -> Vec<&'static str> {
        [
            ("agent", &self.agent),
            ("app", &self.app),
            ("hbone", &self.hbone),
        ]
        .into_iter()
        .filter(|(_, listener)| accept_within(listener, Duration::ZERO).is_some())
        .map(|(name, _)| name)
        .collect()
    }

    fn assert_nothing_pending(&self, what: &str) {
        let pending = self.pending();
        assert!(
            pending.is_empty(),
            "{what}: unexpected connection on {pending:?}"
        );
    }
}

// === namespaces ===

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Two namespaces, pod and node, joined by a veth pair; removed on drop.
struct Topology {
    pod: Netns,
    node: Netns,
}

impl Topology {
    fn new() -> Result<Self> {
        let id = format!(
            "{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let pod = Netns::create(&format!("ebpft-pod-{id}"))?;
        let node = Netns::create(&format!("ebpft-node-{id}"))?;
        // Created directly inside the two namespaces: nothing appears in the host namespace.
        ip(&[
            "link", "add", "name", "eth0", "netns", &node.name, "type", "veth", "peer", "name",
            "eth0", "netns", &pod.name,
        ])?;
        let node_addrs = [
            format!("{NODE_IP}/24"),
            format!("{PROBE_IP}/24"),
            format!("{NODE_IP6}/64"),
            format!("{NAMESERVER_IP6}/64"),
        ];
        let pod_addrs = [format!("{POD_IP}/24"), format!("{POD_IP6}/64")];
        for (ns, addrs) in [(&node, &node_addrs[..]), (&pod, &pod_addrs[..])] {
            for addr in addrs {
                // `nodad`: usable at once (duplicate address detection would hold an IPv6
                // address back for a second or more; the veth has no one else on it).
                ip(&["-n", &ns.name, "addr", "add", addr, "dev", "eth0", "nodad"])?;
            }
            ip(&["-n", &ns.name, "link", "set", "eth0", "up"])?;
        }
        Ok(Self { pod, node })
    }

    fn pod_listeners(&self) -> Result<PodListeners> {
        Ok(PodListeners {
            agent: self.pod.listen(INBOUND_PORT)?,
            app: self.pod.listen(APP_PORT)?,
            hbone: self.pod.listen(HBONE_PORT)?,
        })
    }

    /// The agent's routing (ztunnel/src/redirect/ebpf.rs) in miniature, for both address
    /// families: the pod's own TCP, and its UDP to port 53, are delivered locally unless they
    /// carry the agent's mark.
    fn capture_routing(&self) -> Result<()> {
        let pod = self.pod.name.as_str();
        let table = "133";
        let skip = format!("{SKIP_MARK:#x}/0xfff");
        let rules: [&[&str]; 3] = [
            &["fwmark", &skip, "lookup", "main", "pref", "31999"],
            &[
                "iif", "lo", "ipproto", "tcp", "lookup", table, "pref", "32000",
            ],
            &[
                "iif", "lo", "ipproto", "udp", "dport", "53", "lookup", table, "pref", "32001",
            ],
        ];
        for (family, default, src) in [
            ("-4", "0.0.0.0/0", IpAddr::from(POD_IP)),
            ("-6", "::/0", IpAddr::from(POD_IP6)),
        ] {
            for rule in rules {
                ip(&[&["-n", pod, family, "rule", "add"], rule].concat())?;
            }
            let src = src.to_string();
            ip(&[
                "-n", pod, family, "route", "add", "local", default, "dev", "lo", "src", &src,
                "table", table,
            ])?;
        }
        Ok(())
    }

    /// [`Topology::sk_lookup_links`] once it is `expected`, else after [`ACCEPT_WITHIN`]. A
    /// link the test has just closed may be held a moment longer by a process another test
    /// thread is spawning, which holds a copy of every descriptor between its fork and its
    /// exec (see [`reset_by_a_closing_listener`]); the kernel detaches it when that copy
    /// closes.
    fn sk_lookup_links_become(&self, expected: usize) -> Result<usize> {
        let deadline = std::time::Instant::now() + ACCEPT_WITHIN;
        loop {
            let links = self.sk_lookup_links()?;
            if links == expected || std::time::Instant::now() > deadline {
                return Ok(links);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// sk_lookup links attached to the pod namespace, as bpftool sees them.
    fn sk_lookup_links(&self) -> Result<usize> {
        let ino = std::fs::metadata(self.pod.path())?.ino();
        let out = Command::new(tool("bpftool")?)
            .args(["-j", "link", "show"])
            .output()
            .context("run bpftool link show")?;
        if !out.status.success() {
            bail!(
                "bpftool link show: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        let ours = links
            .as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["netns_ino"].as_u64() == Some(ino) && l["attach_type"] == "sk_lookup")
            .count();
        Ok(ours)
    }
}

struct Netns {
    name: String,
}

impl Netns {
    fn create(name: &str) -> Result<Self> {
        ip(&["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    fn file(&self) -> Result<File> {
        File::open(self.path()).with_context(|| format!("open netns {}", self.name))
    }

    /// Runs `f` on a thread inside the namespace; sockets it creates stay in the namespace.
    fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> Result<T> {
        let file = self.file()?;
        std::thread::scope(|scope| {
            scope
                .spawn(move || -> Result<T> {
                    setns(file, CloneFlags::CLONE_NEWNET).context("setns")?;
                    Ok(f())
                })
                .join()
                .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
        })
    }

    fn listen(&self, port: u16) -> Result<TcpListener> {
        let listener = self.run(|| TcpListener::bind((Ipv4Addr::UNSPECIFIED, port)))??;
        Ok(listener)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// A private bpffs instance on a fresh directory (this machine need not have /sys/fs/bpf
/// mounted); unmounted and removed on drop.
struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    fn mount() -> Result<Self> {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("ebpft-bpffs-{}-{n}", std::process::id()));
        std::fs::create_dir(&path).with_context(|| format!("mkdir {}", path.display()))?;
        let fs = Self { path };
        run(
            Path::new("mount"),
            &["-t", "bpf", "bpf", &fs.path.to_string_lossy()],
        )?;
        Ok(fs)
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = run(Path::new("umount"), &[&self.path.to_string_lossy()]);
        let _ = std::fs::remove_dir(&self.path);
    }
}

fn ip(args: &[&str]) -> Result<()> {
    run(&tool("ip")?, args)
}

fn run(program: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {}", program.display()))?;
    if !out.status.success() {
        bail!(
            "{} {}: {}",
            program.display(),
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Root's tools live in sbin, which a test runner's PATH may lack.
fn tool(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .with_context(|| format!("{name} not found (apt-get install -y bpftool iproute2)"))
}
