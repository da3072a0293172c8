//! Sockets inside pod network namespaces: listeners for captured traffic and upstream
//! connections that carry the agent's mark (so redirection skips them).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};
use tokio::net::{TcpSocket, TcpStream};

use crate::config::SKIP_MARK;
use crate::netns::{Netns, NetnsError};

#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("bind {addr} in netns {netns}: {source}")]
    Bind {
        addr: SocketAddr,
        netns: String,
        source: io::Error,
    },
    #[error("connect {addr} from netns {netns}: {source}")]
    Connect {
        addr: SocketAddr,
        netns: String,
        source: io::Error,
    },
    #[error("set {name} in netns {netns}: {source}")]
    Sysctl {
        name: &'static str,
        netns: String,
        source: io::Error,
    },
    #[error("connect {addr} from netns {netns}: timed out after {timeout:?}")]
    ConnectTimeout {
        addr: SocketAddr,
        netns: String,
        timeout: Duration,
    },
}

fn domain(addr: &SocketAddr) -> Domain {
    if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    }
}

/// How a pod listener is set up for the redirection backend in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ListenFor {
    /// nftables NAT delivers to the listener's own address; nothing special.
    Nat,
    /// The eBPF backend hands connections over without rewriting addresses: the listener is
    /// `IP_TRANSPARENT` (its connections' local address may be any original destination) and
    /// carries [`SKIP_MARK`], which accepted connections inherit, so their packets are routed
    /// normally instead of by the pod's capture rule.
    Ebpf,
}

/// Binds a listener on `addr` inside `netns`, with `SO_REUSEPORT`: during an upgrade the
/// next agent binds the same pod ports while this one still serves, and the kernel spreads
/// new connections over both until one closes (`tcp_migrate_req`, set per pod namespace by
/// [`migrate_requests_in`], moves what was queued on the closed one to the other).
/// Non-blocking, and not yet registered with a runtime: the task that serves it does that
/// ([`tokio::net::TcpListener::from_std`]) on the runtime it runs on.
pub fn listen_in(
    netns: &Netns,
    home: &Netns,
    addr: SocketAddr,
    setup: ListenFor,
) -> Result<std::net::TcpListener, SocketError> {
    let bind_err = |source| SocketError::Bind {
        addr,
        netns: netns.path().display().to_string(),
        source,
    };
    let sock = netns.run(home, || -> io::Result<Socket> {
        let s = Socket::new(domain(&addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_reuse_port(true)?;
        s.set_nonblocking(true)?;
        if setup == ListenFor::Ebpf {
            // IP_TRANSPARENT also applies to IPv6 sockets (the kernel shares the flag).
            s.set_ip_transparent(true)?;
            s.set_mark(SKIP_MARK)?;
        }
        s.bind(&SockAddr::from(addr))?;
        s.listen(1024)?;
        Ok(s)
    })?;
    Ok(sock.map_err(bind_err)?.into())
}

/// The sysctl that makes a closing `SO_REUSEPORT` listener hand the connections in its
/// accept queue (and its half-open requests) to another listener of its group instead of
/// resetting them (Linux 5.14+, per network namespace).
const MIGRATE_REQ: &str = "/proc/sys/net/ipv4/tcp_migrate_req";

/// Sets `net.ipv4.tcp_migrate_req=1` inside `netns`, so that no connection queued on an
/// agent's pod listener is lost when that agent closes it while its successor listens on the
/// same port. `Ok(false)`: the kernel is older than 5.14 (the file is missing).
pub fn migrate_requests_in(netns: &Netns, home: &Netns) -> Result<bool, SocketError> {
    let set = netns.run(home, || match std::fs::write(MIGRATE_REQ, b"1") {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    })?;
    set.map_err(|source| SocketError::Sysctl {
        name: MIGRATE_REQ,
        netns: netns.path().display().to_string(),
        source,
    })
}

/// Connects to `dst` from inside `netns`, marked so that redirection ignores it, with TCP
/// keepalive and `TCP_USER_TIMEOUT` (a vanished peer is reaped).
/// With `transparent_src`, the connection comes from that (non-local) address: used to
/// deliver inbound traffic with the client's IP preserved. With `capture` (the eBPF backend's
/// guard for the pod), the bound source is exempted from capture while the connection is made,
/// so that the delivery is not steered back to the agent.
///
/// In the agent's own namespace (`--redirect loopback`, [`Netns::is_own`]) nothing captures,
/// so nothing is marked (`SO_MARK` would need `CAP_NET_ADMIN`), and `transparent_src` is bound
/// as an ordinary local address when both it and `dst` are loopback addresses (every pod
/// address is then local); otherwise the kernel picks the source.
pub async fn connect_in(
    netns: &Netns,
    home: &Netns,
    dst: SocketAddr,
    transparent_src: Option<IpAddr>,
    timeout: Duration,
    keepalive: &mesh_hbone::tcp::Keepalive,
    capture: Option<&ebpf::CaptureGuard>,
) -> Result<TcpStream, SocketError> {
    let netns_name = || netns.path().display().to_string();
    let err = |source| SocketError::Connect {
        addr: dst,
        netns: netns_name(),
        source,
    };
    let own = netns.is_own();
    let sock = netns
        .run(home, || -> io::Result<Socket> {
            let s = Socket::new(domain(&dst), Type::STREAM, Some(Protocol::TCP))?;
            if !own {
                s.set_mark(SKIP_MARK)?;
            }
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
            keepalive.apply(&s)?;
            match transparent_src {
                Some(src) if own && src.is_loopback() && dst.ip().is_loopback() => {
                    s.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
                }
                Some(_) if own => {}
                // IPv6 source preservation needs IPV6_TRANSPARENT, which socket2 lacks; v6
                // inbound connections reach the app from the agent's address for now.
                Some(src @ IpAddr::V4(_)) => {
                    s.set_ip_transparent(true)?;
                    s.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
                }
                _ => {}
            }
            Ok(s)
        })?
        .map_err(err)?;
    // Held until the handshake is over: only the SYN is looked up.
    let _exemption = match (capture, sock.local_addr().map(|a| a.as_socket())) {
        (Some(guard), Ok(Some(SocketAddr::V4(bound)))) if transparent_src.is_some() => Some(
            guard
                .exempt(bound)
                .map_err(|e| err(io::Error::other(e.to_string())))?,
        ),
        _ => None,
    };
    let socket = TcpSocket::from_std_stream(std::net::TcpStream::from(sock));
    match tokio::time::timeout(timeout, socket.connect(dst)).await {
        Ok(r) => r.map_err(err),
        Err(_) => Err(SocketError::ConnectTimeout {
            addr: dst,
            netns: netns_name(),
            timeout,
        }),
    }
}

/// The destination a captured connection was originally sent to: with NAT (nftables) the
/// conntrack entry's (`SO_ORIGINAL_DST`); with the eBPF backend, which rewrites nothing, the
/// socket's own local address.
pub fn original_dst(stream: &TcpStream, nat: bool) -> io::Result<SocketAddr> {
    if !nat {
        let local = stream.local_addr()?;
        // A dual-stack listener reports IPv4 destinations as v4-mapped IPv6.
        return Ok(SocketAddr::new(local.ip().to_canonical(), local.port()));
    }
    let sock = SockRef::from(stream);
    let addr = match stream.local_addr()? {
        SocketAddr::V4(_) => sock.original_dst()?,
        SocketAddr::V6(_) => sock.original_dst_ipv6()?,
    };
    addr.as_socket().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "original dst is not an IP address",
        )
    })
}
