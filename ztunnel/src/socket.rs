//! Sockets inside pod network namespaces: listeners for captured traffic and upstream
//! connections that carry the agent's mark (so redirection skips them).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use socket2::{Domain, Protocol, SockAddr, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

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

/// Binds a listener on `addr` inside `netns`.
pub fn listen_in(
    netns: &Netns,
    home: &Netns,
    addr: SocketAddr,
) -> Result<TcpListener, SocketError> {
    let bind_err = |source| SocketError::Bind {
        addr,
        netns: netns.path().display().to_string(),
        source,
    };
    let sock = netns.run(home, || -> io::Result<Socket> {
        let s = Socket::new(domain(&addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        s.set_nonblocking(true)?;
        s.bind(&SockAddr::from(addr))?;
        s.listen(1024)?;
        Ok(s)
    })?;
    let sock = sock.map_err(bind_err)?;
    TcpListener::from_std(sock.into()).map_err(bind_err)
}

/// Connects to `dst` from inside `netns`, marked so that redirection ignores it.
/// With `transparent_src`, the connection comes from that (non-local) address: used to
/// deliver inbound traffic with the client's IP preserved.
pub async fn connect_in(
    netns: &Netns,
    home: &Netns,
    dst: SocketAddr,
    transparent_src: Option<IpAddr>,
    timeout: Duration,
) -> Result<TcpStream, SocketError> {
    let netns_name = || netns.path().display().to_string();
    let err = |source| SocketError::Connect {
        addr: dst,
        netns: netns_name(),
        source,
    };
    let sock = netns
        .run(home, || -> io::Result<Socket> {
            let s = Socket::new(domain(&dst), Type::STREAM, Some(Protocol::TCP))?;
            s.set_mark(SKIP_MARK)?;
            s.set_nonblocking(true)?;
            s.set_nodelay(true)?;
            // IPv6 source preservation needs IPV6_TRANSPARENT, which socket2 lacks; v6 inbound
            // connections reach the app from the agent's address for now.
            if let Some(src @ IpAddr::V4(_)) = transparent_src {
                s.set_ip_transparent(true)?;
                s.bind(&SockAddr::from(SocketAddr::new(src, 0)))?;
            }
            Ok(s)
        })?
        .map_err(err)?;
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

/// The destination a redirected connection was originally sent to (`SO_ORIGINAL_DST`).
pub fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
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
