//! The DNS proxy: every enrolled pod's DNS (UDP and TCP to port 53, IPv4 and IPv6) is captured
//! to the agent's port [`DNS_PROXY_PORT`] inside the pod, like its TCP to 15001. Names the mesh
//! knows are answered from the model ([`Model::dns_lookup`]: Kubernetes Services by their
//! `svc.cluster.local` names and the short forms a pod's search path makes, ServiceEntry
//! hosts with their addresses or an auto-allocated VIP); every other query goes on, from the
//! pod's own network namespace, to the resolver the pod asked (the query's original
//! destination), and the answer comes back unchanged. An application therefore sees one
//! resolver, as before, that also knows the mesh: a ServiceEntry host without `addresses`
//! resolves to a VIP that the agent's outbound capture recognises (Istio's DNS
//! auto-allocation), so `REGISTRY_ONLY` and egress waypoints work by name.
//!
//! The proxy's sockets ([`bind`]): per address family a UDP socket and a TCP listener on the
//! family's loopback address (`127.0.0.1:15053`, and `[::1]:15053` for a pod with an IPv6
//! address, whose IPv6 the capture takes: see [`crate::redirect::captures_ipv6`]). One pair
//! per family rather than one dual-stack pair: a dual-stack socket must be bound to the
//! wildcard address, which would serve the pod's own addresses too (anyone outside the pod
//! could query the proxy on them), and its IPv4 peers would be v4-mapped.
//!
//! How a captured datagram keeps its original destination, and how the answer appears to
//! come from it (see `redirect/nft.rs` and `redirect/ebpf.rs` for the capture):
//! - nftables: locally generated UDP to port 53 is marked, routed over `lo`, and `tproxy`'d to
//!   the proxy's socket of its family; eBPF: the same routing, and the `sk_lookup` program
//!   assigns it. Neither rewrites the packet, so `IP_RECVORIGDSTADDR` (`IPV6_RECVORIGDSTADDR`)
//!   gives the resolver's address.
//! - The answer is sent from a short-lived transparent socket bound to that address and
//!   port (port 53, so the application's resolver library accepts it), marked so that
//!   capture skips it.
//! - TCP: the listener is the outbound one's twin; the original destination is read as for
//!   15001 (`SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` with nftables, the local address with
//!   eBPF).
//!
//! Bad input and floods: a datagram that is no DNS query gets FORMERR when its header can be
//! read and is dropped otherwise; each pod may have [`MAX_FORWARDS_PER_POD`] forwarded
//! queries and [`MAX_TCP_PER_POD`] TCP connections in progress, more are dropped (counted
//! `overloaded`); an upstream that does not answer within [`UPSTREAM_TIMEOUT`] gets the
//! client a SERVFAIL. Everything is counted in `mesh_dns_requests_total{result}`. Nothing a
//! pod sends affects another pod's proxy.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use mesh_model::model::Model;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrStorage};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::{Redirect, SKIP_MARK};
use crate::netns::Netns;
use crate::proxy::{PodCtx, ProxyInputs};
use crate::socket::{ListenFor, SocketError};

pub use crate::config::DNS_PROXY_PORT;

/// The port captured.
pub const DNS_PORT: u16 = 53;
/// TTL of the mesh's answers: short, as the model changes (Istio's proxy uses 30 s).
const TTL: u32 = 30;
/// How long a forwarded query waits for the pod's resolver.
pub const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// Forwarded queries in progress per pod; more are dropped (the client retries).
pub const MAX_FORWARDS_PER_POD: usize = 128;
/// TCP DNS connections open per pod; more are closed at once.
pub const MAX_TCP_PER_POD: usize = 64;
/// A TCP DNS connection with no query for this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// The largest UDP answer without EDNS (RFC 1035).
const UDP_PLAIN_MAX: usize = 512;
/// The largest UDP answer we send even when the client offers more (RFC 9715's advice).
const UDP_EDNS_MAX: u16 = 1232;

/// What the proxy does with one query.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// Answer with these bytes (the mesh's answer, or an error).
    Answer(Vec<u8>, &'static str),
    /// Not a mesh name: send the query on to the pod's resolver.
    Forward,
    /// Not worth an answer (no readable header).
    Drop,
}

/// Decides what to do with `query` from a pod in `namespace`. `udp`: the answer must fit the
/// client's UDP size (else it is truncated, and the client asks again over TCP).
pub fn decide(model: &Model, namespace: &str, query: &[u8], udp: bool) -> Reply {
    let msg = match Message::from_vec(query) {
        Ok(m) => m,
        Err(e) => {
            tracing::debug!(error = %e, len = query.len(), "malformed DNS query");
            // A whole header (12 bytes) to answer to, else nothing.
            return match query.len() >= 12 {
                true => error_answer(query, ResponseCode::FormErr)
                    .map_or(Reply::Drop, |b| Reply::Answer(b, "malformed")),
                false => Reply::Drop,
            };
        }
    };
    if msg.metadata.message_type != MessageType::Query {
        return Reply::Drop;
    }
    let [q] = msg.queries.as_slice() else {
        return Reply::Forward;
    };
    if msg.metadata.op_code != OpCode::Query || q.query_class() != DNSClass::IN {
        return Reply::Forward;
    }
    let Some(records) = model.dns_lookup(namespace, &q.name().to_ascii()) else {
        return Reply::Forward;
    };
    let wanted = |ip: &IpAddr| match q.query_type() {
        RecordType::A => ip.is_ipv4(),
        RecordType::AAAA => ip.is_ipv6(),
        RecordType::ANY => true,
        _ => false,
    };
    let mut answer = Message::response(msg.metadata.id, OpCode::Query);
    answer.metadata.authoritative = true;
    answer.metadata.recursion_desired = msg.metadata.recursion_desired;
    answer.metadata.recursion_available = true;
    answer.add_query(q.clone());
    for ip in records.addrs.iter().filter(|ip| wanted(ip)) {
        let rdata = match ip {
            IpAddr::V4(v4) => RData::A(A(*v4)),
            IpAddr::V6(v6) => RData::AAAA(AAAA(*v6)),
        };
        answer.add_answer(Record::from_rdata(q.name().clone(), TTL, rdata));
    }
    let result = if answer.answers.is_empty() {
        "nodata"
    } else {
        "answered"
    };
    let limit = match &msg.edns {
        Some(edns) => {
            let mut ours = Edns::new();
            ours.set_max_payload(UDP_EDNS_MAX);
            answer.set_edns(ours);
            usize::from(edns.max_payload().clamp(UDP_PLAIN_MAX as u16, UDP_EDNS_MAX))
        }
        None => UDP_PLAIN_MAX,
    };
    match answer.to_vec() {
        Ok(bytes) if !udp || bytes.len() <= limit => Reply::Answer(bytes, result),
        Ok(_) => answer
            .truncate()
            .to_vec()
            .map_or(Reply::Drop, |b| Reply::Answer(b, "truncated")),
        Err(e) => {
            tracing::warn!(error = %e, "DNS answer could not be encoded");
            Reply::Drop
        }
    }
}

/// An error answer `code` to `query` (its id; nothing when it has none): FORMERR for a
/// malformed query, SERVFAIL when the pod's resolver did not answer, REFUSED when there is no
/// resolver to forward to.
fn error_answer(query: &[u8], code: ResponseCode) -> Option<Vec<u8>> {
    let [a, b, ..] = query else { return None };
    Message::error_msg(u16::from_be_bytes([*a, *b]), OpCode::Query, code)
        .to_vec()
        .ok()
}

/// Whether a forwarded query may go to `upstream`: a resolver on port 53 that is not the pod
/// itself (a query sent straight to 15053 has nowhere to go on to).
fn forwardable(upstream: SocketAddr) -> bool {
    upstream.port() == DNS_PORT && !upstream.ip().is_loopback() && !upstream.ip().is_unspecified()
}

/// The DNS proxy's sockets in one pod (see the module docs).
#[derive(Debug)]
pub struct Sockets {
    pub v4: FamilySockets,
    /// For a pod with an IPv6 address only.
    pub v6: Option<FamilySockets>,
}

/// One address family's DNS sockets, on its loopback address, port [`DNS_PROXY_PORT`].
#[derive(Debug)]
pub struct FamilySockets {
    /// Transparent (the capture delivers datagrams for any resolver address to it), reporting
    /// each datagram's original destination.
    pub udp: std::net::UdpSocket,
    /// The outbound listener's twin (`setup` as for it).
    pub tcp: std::net::TcpListener,
}

/// Binds the DNS proxy's sockets inside `netns` for a pod with addresses `ips`: IPv4, and
/// IPv6 when the pod's IPv6 is captured. `setup` as for the pod's outbound listener.
pub fn bind(
    netns: &Netns,
    home: &Netns,
    ips: &[IpAddr],
    setup: ListenFor,
) -> Result<Sockets, SocketError> {
    let family = |ip: IpAddr| -> Result<FamilySockets, SocketError> {
        let addr = SocketAddr::new(ip, DNS_PROXY_PORT);
        Ok(FamilySockets {
            udp: bind_udp(netns, home, addr)?,
            tcp: crate::socket::listen_in(netns, home, addr, setup)?,
        })
    };
    Ok(Sockets {
        v4: family(Ipv4Addr::LOCALHOST.into())?,
        v6: match crate::redirect::captures_ipv6(ips) {
            true => Some(family(Ipv6Addr::LOCALHOST.into())?),
            false => None,
        },
    })
}

impl Sockets {
    /// Each family's UDP socket and TCP listener, IPv4 first.
    pub fn into_families(self) -> impl Iterator<Item = FamilySockets> {
        std::iter::once(self.v4).chain(self.v6)
    }
}

/// The pod's UDP DNS socket of `addr`'s family, bound there inside the pod.
fn bind_udp(
    netns: &Netns,
    home: &Netns,
    addr: SocketAddr,
) -> Result<std::net::UdpSocket, SocketError> {
    let sock = netns
        .run(home, || -> io::Result<Socket> {
            let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.set_nonblocking(true)?;
            // IP_TRANSPARENT also applies to IPv6 sockets (the kernel shares the flag).
            s.set_ip_transparent(true)?;
            s.set_mark(SKIP_MARK)?;
            match addr {
                SocketAddr::V4(_) => nix::sys::socket::setsockopt(
                    &s,
                    nix::sys::socket::sockopt::Ipv4OrigDstAddr,
                    &true,
                ),
                SocketAddr::V6(_) => {
                    s.set_only_v6(true)?;
                    nix::sys::socket::setsockopt(
                        &s,
                        nix::sys::socket::sockopt::Ipv6OrigDstAddr,
                        &true,
                    )
                }
            }
            .map_err(io::Error::from)?;
            s.bind(&SockAddr::from(addr))?;
            Ok(s)
        })?
        .map_err(|source| SocketError::Bind {
            addr,
            netns: netns.path().display().to_string(),
            source,
        })?;
    Ok(sock.into())
}

/// One datagram: its bytes, who sent it and where it was going (both of the socket's family).
struct Datagram {
    len: usize,
    from: SocketAddr,
    to: SocketAddr,
}

fn receive(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Datagram> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(nix::libc::sockaddr_in6);
    let msg = recvmsg::<SockaddrStorage>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let from = msg
        .address
        .and_then(|a| match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
            (Some(v4), _) => Some(SocketAddr::V4(SocketAddrV4::from(*v4))),
            (_, Some(v6)) => Some(SocketAddr::V6(SocketAddrV6::from(*v6))),
            _ => None,
        })
        .ok_or_else(|| io::Error::other("datagram without a source"))?;
    let mut to = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        match c {
            ControlMessageOwned::Ipv4OrigDstAddr(a) => {
                to = Some(SocketAddr::V4(SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                    u16::from_be(a.sin_port),
                )));
            }
            // The scope is left out: the kernel names `lo` (the capture delivered it there),
            // which is not where a link-local resolver is.
            ControlMessageOwned::Ipv6OrigDstAddr(a) => {
                to = Some(SocketAddr::V6(SocketAddrV6::new(
                    Ipv6Addr::from(a.sin6_addr.s6_addr),
                    u16::from_be(a.sin6_port),
                    0,
                    0,
                )));
            }
            _ => {}
        }
    }
    let to = to.ok_or_else(|| io::Error::other("datagram without its original destination"))?;
    Ok(Datagram {
        len: msg.bytes,
        from,
        to,
    })
}

/// Sends `payload` to `to` from `from` (the resolver the client asked), inside the pod.
fn send_as(
    netns: &Netns,
    home: &Netns,
    from: SocketAddr,
    to: SocketAddr,
    payload: &[u8],
) -> io::Result<()> {
    netns
        .run(home, || -> io::Result<()> {
            let s = Socket::new(Domain::for_address(from), Type::DGRAM, Some(Protocol::UDP))?;
            s.set_reuse_address(true)?;
            s.set_ip_transparent(true)?;
            s.set_mark(SKIP_MARK)?;
            s.bind(&SockAddr::from(from))?;
            s.send_to(payload, &SockAddr::from(to))?;
            Ok(())
        })
        .map_err(io::Error::other)?
}

/// Serves the pod's UDP DNS socket until `stop`.
pub async fn run_udp(
    sock: std::net::UdpSocket,
    pod: Arc<PodCtx>,
    pi: Arc<ProxyInputs>,
    stop: CancellationToken,
) {
    let sock = match UdpSocket::from_std(sock) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "the DNS socket could not be registered");
            return;
        }
    };
    let forwards = Arc::new(Semaphore::new(MAX_FORWARDS_PER_POD));
    let mut buf = vec![0u8; 65_535];
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = sock.readable() => if let Err(e) = r {
                tracing::error!(error = %e, "DNS socket failed");
                return;
            },
        }
        let d = match sock.try_io(Interest::READABLE, || receive(&sock, &mut buf)) {
            Ok(d) => d,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::debug!(error = %e, "DNS datagram not read");
                continue;
            }
        };
        let query = &buf[..d.len];
        let model = pi.model.load();
        match decide(&model, &pod.key.namespace, query, true) {
            Reply::Answer(bytes, result) => {
                pi.metrics.dns_request(result);
                if let Err(e) = send_as(&pod.netns, &pi.home, d.to, d.from, &bytes) {
                    tracing::debug!(error = %e, client = %d.from, "DNS answer not sent");
                }
            }
            Reply::Drop => pi.metrics.dns_request("malformed"),
            Reply::Forward if !forwardable(d.to) => {
                pi.metrics.dns_request("refused");
                if let Some(b) = error_answer(query, ResponseCode::Refused) {
                    let _ = send_as(&pod.netns, &pi.home, d.to, d.from, &b);
                }
            }
            Reply::Forward => {
                let Ok(permit) = forwards.clone().try_acquire_owned() else {
                    pi.metrics.dns_request("overloaded");
                    tracing::debug!(pod = %pod.key, "DNS forwards at their limit: query dropped");
                    continue;
                };
                let (pod, pi, query) = (pod.clone(), pi.clone(), query.to_vec());
                tokio::spawn(async move {
                    let _permit = permit;
                    let reply = match forward_udp(&pod.netns, &pi.home, d.to, &query).await {
                        Ok(reply) => {
                            pi.metrics.dns_request("forwarded");
                            Some(reply)
                        }
                        Err(e) => {
                            pi.metrics.dns_request("upstream_failed");
                            tracing::debug!(error = %e, upstream = %d.to, "DNS upstream failed");
                            error_answer(&query, ResponseCode::ServFail)
                        }
                    };
                    if let Some(reply) = reply {
                        if let Err(e) = send_as(&pod.netns, &pi.home, d.to, d.from, &reply) {
                            tracing::debug!(error = %e, client = %d.from, "DNS answer not sent");
                        }
                    }
                });
            }
        }
    }
}

/// Sends `query` to `upstream` from inside the pod's `netns` (marked: not captured again) and
/// waits for the answer with the same id.
async fn forward_udp(
    netns: &Netns,
    home: &Netns,
    upstream: SocketAddr,
    query: &[u8],
) -> io::Result<Vec<u8>> {
    let sock = netns
        .run(home, || -> io::Result<Socket> {
            let s = Socket::new(
                Domain::for_address(upstream),
                Type::DGRAM,
                Some(Protocol::UDP),
            )?;
            s.set_mark(SKIP_MARK)?;
            s.set_nonblocking(true)?;
            s.connect(&SockAddr::from(upstream))?;
            Ok(s)
        })
        .map_err(io::Error::other)??;
    let sock = UdpSocket::from_std(sock.into())?;
    sock.send(query).await?;
    let mut buf = vec![0u8; 65_535];
    tokio::time::timeout(UPSTREAM_TIMEOUT, async {
        loop {
            let n = sock.recv(&mut buf).await?;
            // The connected socket only takes the resolver's datagrams; the id must match.
            if n >= 2 && buf[..2] == query[..2] {
                return Ok(buf[..n].to_vec());
            }
        }
    })
    .await
    .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))?
}

/// Serves the pod's TCP DNS listener until `stop`.
pub async fn run_tcp(
    listener: TcpListener,
    pod: Arc<PodCtx>,
    pi: Arc<ProxyInputs>,
    stop: CancellationToken,
) {
    let conns = Arc::new(Semaphore::new(MAX_TCP_PER_POD));
    let nat = pi.cfg.redirect == Redirect::Nftables;
    let accepted = |(tcp, peer): (TcpStream, SocketAddr)| {
        let Ok(permit) = conns.clone().try_acquire_owned() else {
            pi.metrics.dns_request("overloaded");
            return;
        };
        let upstream = match crate::socket::original_dst(&tcp, nat) {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(error = %e, %peer, "DNS connection without original destination");
                return;
            }
        };
        let (pod, pi, stop) = (pod.clone(), pi.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            tokio::select! {
                _ = stop.cancelled() => {}
                r = serve_tcp(tcp, upstream, &pod, &pi) => {
                    if let Err(e) = r {
                        tracing::debug!(error = %e, %peer, "DNS connection ended");
                    }
                }
            }
        });
    };
    mesh_shell::accept::serve("dns", || listener.accept(), accepted, stop.clone()).await
}

/// One TCP DNS connection: length-prefixed queries, each answered or forwarded over one
/// upstream connection opened when first needed.
async fn serve_tcp(
    mut tcp: TcpStream,
    upstream: SocketAddr,
    pod: &PodCtx,
    pi: &ProxyInputs,
) -> io::Result<()> {
    let mut up: Option<TcpStream> = None;
    loop {
        let query = match tokio::time::timeout(TCP_IDLE, read_frame(&mut tcp)).await {
            Ok(Ok(Some(q))) => q,
            Ok(Ok(None)) | Err(_) => return Ok(()),
            Ok(Err(e)) => return Err(e),
        };
        let model = pi.model.load();
        let reply = match decide(&model, &pod.key.namespace, &query, false) {
            Reply::Answer(bytes, result) => {
                pi.metrics.dns_request(result);
                bytes
            }
            Reply::Drop => {
                pi.metrics.dns_request("malformed");
                return Ok(());
            }
            Reply::Forward if !forwardable(upstream) => {
                pi.metrics.dns_request("refused");
                error_answer(&query, ResponseCode::Refused).unwrap_or_default()
            }
            Reply::Forward => match forward_tcp(&mut up, pod, pi, upstream, &query).await {
                Ok(reply) => {
                    pi.metrics.dns_request("forwarded");
                    reply
                }
                Err(e) => {
                    pi.metrics.dns_request("upstream_failed");
                    tracing::debug!(error = %e, %upstream, "DNS upstream failed");
                    up = None;
                    error_answer(&query, ResponseCode::ServFail).unwrap_or_default()
                }
            },
        };
        write_frame(&mut tcp, &reply).await?;
    }
}

async fn forward_tcp(
    up: &mut Option<TcpStream>,
    pod: &PodCtx,
    pi: &ProxyInputs,
    upstream: SocketAddr,
    query: &[u8],
) -> io::Result<Vec<u8>> {
    let exchange = async {
        if up.is_none() {
            let keepalive = pi.cfg.limits.keepalive();
            let conn = crate::socket::connect_in(
                &pod.netns,
                &pi.home,
                upstream,
                None,
                pi.cfg.connect_timeout,
                &keepalive,
                None,
            )
            .await
            .map_err(io::Error::other)?;
            *up = Some(conn);
        }
        let conn = up.as_mut().ok_or_else(|| io::Error::other("no upstream"))?;
        write_frame(conn, query).await?;
        read_frame(conn)
            .await?
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "upstream closed"))
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, exchange)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer"))?
}

/// One length-prefixed DNS message; `None` at a clean end of stream.
async fn read_frame(s: &mut TcpStream) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut msg).await?;
    Ok(Some(msg))
}

async fn write_frame(s: &mut TcpStream, msg: &[u8]) -> io::Result<()> {
    let len = u16::try_from(msg.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "DNS message over 64 KiB"))?;
    let mut frame = Vec::with_capacity(msg.len() + 2);
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(msg);
    s.write_all(&frame).await
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::Query;
    use hickory_proto::rr::Name;

    use super::*;

    fn model() -> Model {
        let yaml = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: echo}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: dual, namespace: default}
spec:
  clusterIPs: [10.96.0.20, "fd00:96::20"]
  selector: {app: dual}
  ports: [{port: 80}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: many, namespace: default}
spec:
  hosts: [many.example.com]
  addresses: [192.0.2.1, 192.0.2.2, 192.0.2.3, 192.0.2.4, 192.0.2.5, 192.0.2.6, 192.0.2.7, 192.0.2.8, 192.0.2.9, 192.0.2.10, 192.0.2.11, 192.0.2.12, 192.0.2.13, 192.0.2.14, 192.0.2.15, 192.0.2.16, 192.0.2.17, 192.0.2.18, 192.0.2.19, 192.0.2.20, 192.0.2.21, 192.0.2.22, 192.0.2.23, 192.0.2.24, 192.0.2.25, 192.0.2.26, 192.0.2.27, 192.0.2.28, 192.0.2.29, 192.0.2.30, 192.0.2.31, 192.0.2.32]
  ports: [{number: 443, name: tls, protocol: TLS}]
  resolution: STATIC
"#;
        mesh_model::k8s::load_docs(&[("m.yaml".into(), yaml.into())]).expect("model")
    }

    fn query(name: &str, qtype: RecordType, edns: bool) -> Vec<u8> {
        let mut m = Message::new(0x1234, MessageType::Query, OpCode::Query);
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).expect("name"), qtype));
        if edns {
            let mut e = Edns::new();
            e.set_max_payload(4096);
            m.set_edns(e);
        }
        m.to_vec().expect("encode")
    }

    fn answered(reply: Reply) -> (Message, &'static str) {
        match reply {
            Reply::Answer(bytes, result) => (Message::from_vec(&bytes).expect("decode"), result),
            other => panic!("expected an answer, got {other:?}"),
        }
    }

    #[test]
    fn a_service_name_is_answered_with_its_vip_and_the_query_echoed() {
        let (m, result) = answered(decide(
            &model(),
            "default",
            &query("echo.default.svc.cluster.local.", RecordType::A, false),
            true,
        ));
        assert_eq!(result, "answered");
        assert_eq!(m.metadata.id, 0x1234);
        assert_eq!(m.metadata.message_type, MessageType::Response);
        assert_eq!(m.metadata.response_code, ResponseCode::NoError);
        assert!(m.metadata.authoritative && m.metadata.recursion_desired);
        assert_eq!(m.queries.len(), 1);
        let ips: Vec<_> = m.answers.iter().map(|r| r.data.clone()).collect();
        assert_eq!(ips, vec![RData::A(A("10.96.0.10".parse().expect("ip")))]);
    }

    #[test]
    fn a_dual_stack_service_is_answered_in_the_family_asked_for() {
        let ask = |qtype| {
            let q = query("dual.default.svc.cluster.local.", qtype, false);
            let (m, result) = answered(decide(&model(), "default", &q, true));
            assert_eq!(result, "answered", "{qtype}");
            m.answers.into_iter().map(|r| r.data).collect::<Vec<_>>()
        };
        let v6 = RData::AAAA(AAAA("fd00:96::20".parse().expect("ip")));
        let v4 = RData::A(A("10.96.0.20".parse().expect("ip")));
        assert_eq!(ask(RecordType::AAAA), vec![v6.clone()]);
        assert_eq!(ask(RecordType::A), vec![v4.clone()]);
        assert_eq!(ask(RecordType::ANY), vec![v4, v6]);
    }

    #[test]
    fn another_family_or_type_of_a_mesh_name_is_nodata() {
        for qtype in [RecordType::AAAA, RecordType::MX, RecordType::TXT] {
            let (m, result) = answered(decide(
                &model(),
                "default",
                &query("echo", qtype, false),
                true,
            ));
            assert_eq!(result, "nodata", "{qtype}");
            assert_eq!(m.metadata.response_code, ResponseCode::NoError);
            assert!(m.answers.is_empty());
        }
    }

    #[test]
    fn other_names_classes_and_opcodes_are_forwarded() {
        let model = model();
        let q = query("example.org.", RecordType::A, false);
        assert_eq!(decide(&model, "default", &q, true), Reply::Forward);
        // A Service name seen from a namespace where it does not exist as a short name.
        let q = query("echo", RecordType::A, false);
        assert_eq!(decide(&model, "other", &q, true), Reply::Forward);
        let mut chaos = Message::from_vec(&query("echo", RecordType::A, false)).expect("m");
        let mut q = chaos.queries[0].clone();
        q.set_query_class(DNSClass::CH);
        chaos.queries = vec![q];
        assert_eq!(
            decide(&model, "default", &chaos.to_vec().expect("e"), true),
            Reply::Forward
        );
    }

    #[test]
    fn malformed_queries_get_formerr_or_nothing() {
        let model = model();
        // A header promising a question that is cut short.
        let cut = [0xbe, 0xef, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 7, b'b'];
        let (m, result) = answered(decide(&model, "default", &cut, true));
        assert_eq!(result, "malformed");
        assert_eq!(m.metadata.id, 0xbeef);
        assert_eq!(m.metadata.response_code, ResponseCode::FormErr);
        // Less than a header: nothing to answer to.
        assert_eq!(decide(&model, "default", &[1, 2, 3], true), Reply::Drop);
        assert_eq!(decide(&model, "default", &[], true), Reply::Drop);
        // A response is not a query.
        let mut resp = Message::from_vec(&query("echo", RecordType::A, false)).expect("m");
        resp.metadata.message_type = MessageType::Response;
        assert_eq!(
            decide(&model, "default", &resp.to_vec().expect("e"), true),
            Reply::Drop
        );
    }

    #[test]
    fn an_answer_over_the_udp_size_is_truncated_and_whole_over_tcp_or_with_edns() {
        let model = model();
        let name = "many.example.com";
        let (m, result) = answered(decide(
            &model,
            "default",
            &query(name, RecordType::A, false),
            true,
        ));
        assert_eq!(result, "truncated");
        assert!(m.metadata.truncation && m.answers.is_empty());
        let (m, _) = answered(decide(
            &model,
            "default",
            &query(name, RecordType::A, false),
            false,
        ));
        assert_eq!(m.answers.len(), 32, "TCP: everything");
        let (m, result) = answered(decide(
            &model,
            "default",
            &query(name, RecordType::A, true),
            true,
        ));
        assert_eq!(
            (m.answers.len(), result),
            (32, "answered"),
            "EDNS: room for it"
        );
        assert!(m.edns.is_some(), "an EDNS query gets an EDNS answer");
    }

    #[test]
    fn only_a_resolver_on_port_53_elsewhere_is_forwarded_to() {
        for (upstream, expected) in [
            ("10.0.0.10:53", true),
            ("[fd00::53]:53", true),
            ("127.0.0.1:53", false),
            ("[::1]:53", false),
            ("10.0.0.10:15053", false),
            ("[fd00::53]:15053", false),
            ("0.0.0.0:53", false),
            ("[::]:53", false),
        ] {
            assert_eq!(
                forwardable(upstream.parse().expect("addr")),
                expected,
                "{upstream}"
            );
        }
    }

    #[tokio::test]
    async fn captured_queries_of_both_families_reach_the_proxy_and_their_resolver_with_nftables() {
        captured_queries(Redirect::Nftables).await;
    }

    #[tokio::test]
    async fn captured_queries_of_both_families_reach_the_proxy_and_their_resolver_with_ebpf() {
        captured_queries(Redirect::Ebpf).await;
    }

    /// A pod with an IPv4 and an IPv6 address and a resolver of each family on the node,
    /// captured by `backend` to the proxy's sockets ([`bind`]); per family: the application's
    /// UDP query reaches the proxy with the resolver as its original destination
    /// ([`receive`]), goes on to that resolver from the pod's address ([`forward_udp`]), and
    /// the resolver's answer reaches the application from the resolver's address
    /// ([`send_as`]); its TCP connection to the resolver reaches the proxy's listener of its
    /// family, which reads the resolver back as the original destination. Needs root (creates
    /// namespaces, installs capture); skipped otherwise.
    async fn captured_queries(backend: Redirect) {
        use crate::redirect::testing::{
            nameserver, skip_unless_root, TestBpffs, TestPod, POD_IP4, POD_IP6,
        };
        if skip_unless_root() {
            return;
        }
        let t = TestPod::new(match backend {
            Redirect::Ebpf => "dns-ebpf",
            _ => "dns-nft",
        });
        let home = Netns::current().expect("own netns");
        let (netns, node) = (t.pod.open(), t.node.open());
        let ips = t.ips();
        let setup = match backend {
            Redirect::Ebpf => ListenFor::Ebpf,
            _ => ListenFor::Nat,
        };
        let sockets = bind(&netns, &home, &ips, setup).expect("bind the DNS sockets");
        let fs;
        let _capture = match backend {
            Redirect::Ebpf => {
                fs = TestBpffs::mount();
                let listen = |port: u16| {
                    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
                    crate::socket::listen_in(&netns, &home, addr, setup).expect("listen")
                };
                let (inbound, outbound) = (listen(15006), listen(15001));
                let pins = fs.path().join("pod");
                let v4_only = crate::redirect::ebpf::Outbound {
                    v4: &outbound,
                    v6: None,
                };
                let guard = crate::redirect::ebpf::install(
                    &netns,
                    &ips,
                    &inbound,
                    v4_only,
                    &pins,
                    Some(&sockets),
                )
                .expect("install eBPF capture");
                Some((guard, inbound, outbound))
            }
            _ => {
                crate::redirect::nft::install(&t.pod.path(), &ips, true)
                    .expect("install nftables capture");
                None
            }
        };
        let wait = Duration::from_secs(5);
        let v6 = sockets
            .v6
            .as_ref()
            .expect("IPv6 sockets for a pod with an IPv6 address");
        for (pod_ip, family) in [(IpAddr::from(POD_IP4), &sockets.v4), (POD_IP6.into(), v6)] {
            let resolver = nameserver(pod_ip.is_ipv6());
            let any = SocketAddr::new(
                match pod_ip {
                    IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
                    IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
                },
                0,
            );
            // The resolver answers one query with its id.
            let server = node
                .run(&home, || std::net::UdpSocket::bind(resolver))
                .expect("enter the node's netns")
                .expect("bind the resolver");
            let answering = {
                let server = server.try_clone().expect("clone");
                std::thread::spawn(move || -> io::Result<SocketAddr> {
                    server.set_read_timeout(Some(wait))?;
                    let mut buf = [0u8; 64];
                    let (n, from) = server.recv_from(&mut buf)?;
                    let mut answer = buf[..n.min(2)].to_vec();
                    answer.extend_from_slice(b"answer");
                    server.send_to(&answer, from)?;
                    Ok(from)
                })
            };

            let app = netns
                .run(&home, || -> io::Result<std::net::UdpSocket> {
                    let s = std::net::UdpSocket::bind(any)?;
                    s.connect(resolver)?;
                    s.send(b"\x12\x34query")?;
                    Ok(s)
                })
                .expect("enter the pod's netns")
                .expect("send the query");
            let proxy = UdpSocket::from_std(family.udp.try_clone().expect("clone"))
                .expect("register the DNS socket");
            tokio::time::timeout(wait, proxy.readable())
                .await
                .unwrap_or_else(|_| panic!("{resolver}: no query reached the proxy"))
                .expect("readable");
            let mut buf = [0u8; 512];
            let d = receive(&proxy, &mut buf).expect("receive the query");
            assert_eq!(d.to, resolver, "original destination");
            assert_eq!(d.from, app.local_addr().expect("addr"), "the application");
            assert_eq!(d.from.ip(), pod_ip);

            let answer = forward_udp(&netns, &home, d.to, &buf[..d.len])
                .await
                .expect("forwarded to the resolver");
            assert_eq!(answer, b"\x12\x34answer");
            let forwarded_from = answering.join().expect("resolver").expect("resolver");
            assert_eq!(forwarded_from.ip(), pod_ip, "the forward left from the pod");
            server.set_nonblocking(true).expect("nonblocking");
            assert!(
                server.recv_from(&mut buf).is_err(),
                "{resolver}: the application's query reached the resolver"
            );

            send_as(&netns, &home, d.to, d.from, &answer).expect("answer");
            app.set_read_timeout(Some(wait)).expect("timeout");
            let (n, from) = app.recv_from(&mut buf).expect("the answer");
            assert_eq!((&buf[..n], from), (&answer[..], resolver));

            let client = netns
                .run(&home, || {
                    std::net::TcpStream::connect_timeout(&resolver, wait)
                })
                .expect("enter the pod's netns")
                .expect("connect over TCP");
            let listener = TcpListener::from_std(family.tcp.try_clone().expect("clone"))
                .expect("register the DNS listener");
            let (stream, peer) = tokio::time::timeout(wait, listener.accept())
                .await
                .unwrap_or_else(|_| panic!("{resolver}: nothing reached the DNS listener"))
                .expect("accept");
            assert_eq!(peer, client.local_addr().expect("addr"));
            let nat = backend == Redirect::Nftables;
            let orig_dst = crate::socket::original_dst(&stream, nat).expect("original dst");
            assert_eq!(orig_dst, resolver);
        }
    }
}
