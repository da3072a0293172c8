//! The DNS proxy: every enrolled pod's DNS (UDP and TCP to port 53, IPv4) is captured to the
//! agent's port [`DNS_PROXY_PORT`] inside the pod, like its TCP to 15001. Names the mesh
//! knows are answered from the model ([`Model::dns_lookup`]: Kubernetes Services by their
//! `svc.cluster.local` names and the short forms a pod's search path makes, ServiceEntry
//! hosts with their addresses or an auto-allocated VIP); every other query goes on, from the
//! pod's own network namespace, to the resolver the pod asked (the query's original
//! destination), and the answer comes back unchanged. An application therefore sees one
//! resolver, as before, that also knows the mesh: a ServiceEntry host without `addresses`
//! resolves to a VIP that the agent's outbound capture recognises (Istio's DNS
//! auto-allocation), so `REGISTRY_ONLY` and egress waypoints work by name.
//!
//! How a captured datagram keeps its original destination, and how the answer appears to
//! come from it (see `redirect/nft.rs` and `redirect/ebpf.rs` for the capture):
//! - nftables: locally generated UDP to port 53 is marked, routed over `lo`, and `tproxy`'d to
//!   the proxy's socket; eBPF: the same routing, and the `sk_lookup` program assigns it.
//!   Neither rewrites the packet, so `IP_RECVORIGDSTADDR` gives the resolver's address.
//! - The answer is sent from a short-lived transparent socket bound to that address and
//!   port (port 53, so the application's resolver library accepts it), marked so that
//!   capture skips it.
//! - TCP: the listener is the outbound one's twin; the original destination is read as for
//!   15001 (`SO_ORIGINAL_DST` with nftables, the local address with eBPF).
//!
//! Bad input and floods: a datagram that is no DNS query gets FORMERR when its header can be
//! read and is dropped otherwise; each pod may have [`MAX_FORWARDS_PER_POD`] forwarded
//! queries and [`MAX_TCP_PER_POD`] TCP connections in progress, more are dropped (counted
//! `overloaded`); an upstream that does not answer within [`UPSTREAM_TIMEOUT`] gets the
//! client a SERVFAIL. Everything is counted in `mesh_dns_requests_total{result}`. Nothing a
//! pod sends affects another pod's proxy.

use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use mesh_model::model::Model;
use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrIn};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::{Redirect, SKIP_MARK};
use crate::netns::Netns;
use crate::proxy::{PodCtx, ProxyInputs};
use crate::socket::SocketError;

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

/// The pod's UDP DNS socket: bound on `127.0.0.1:15053` inside the pod, transparent (the
/// capture delivers datagrams for any resolver address to it) and reporting each datagram's
/// original destination.
pub fn bind_udp(netns: &Netns, home: &Netns) -> Result<std::net::UdpSocket, SocketError> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, DNS_PROXY_PORT));
    let sock = netns
        .run(home, || -> io::Result<Socket> {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.set_nonblocking(true)?;
            s.set_ip_transparent(true)?;
            s.set_mark(SKIP_MARK)?;
            nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv4OrigDstAddr, &true)
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

/// One datagram: its bytes, who sent it and where it was going.
struct Datagram {
    len: usize,
    from: SocketAddrV4,
    to: SocketAddrV4,
}

fn receive(fd: &impl AsRawFd, buf: &mut [u8]) -> io::Result<Datagram> {
    let mut iov = [IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(nix::libc::sockaddr_in);
    let msg = recvmsg::<SockaddrIn>(
        fd.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(io::Error::from)?;
    let from = msg
        .address
        .map(SocketAddrV4::from)
        .ok_or_else(|| io::Error::other("datagram without a source"))?;
    let mut to = None;
    for c in msg.cmsgs().map_err(io::Error::from)? {
        if let ControlMessageOwned::Ipv4OrigDstAddr(a) = c {
            to = Some(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            ));
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
    from: SocketAddrV4,
    to: SocketAddrV4,
    payload: &[u8],
) -> io::Result<()> {
    netns
        .run(home, || -> io::Result<()> {
            let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
            s.set_reuse_address(true)?;
            s.set_ip_transparent(true)?;
            s.set_mark(SKIP_MARK)?;
            s.bind(&SockAddr::from(SocketAddr::V4(from)))?;
            s.send_to(payload, &SockAddr::from(SocketAddr::V4(to)))?;
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
            Reply::Forward if !forwardable(SocketAddr::V4(d.to)) => {
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
                    let reply = match forward_udp(&pod, &pi, SocketAddr::V4(d.to), &query).await {
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

/// Sends `query` to `upstream` from inside the pod (marked: not captured again) and waits
/// for the answer with the same id.
async fn forward_udp(
    pod: &PodCtx,
    pi: &ProxyInputs,
    upstream: SocketAddr,
    query: &[u8],
) -> io::Result<Vec<u8>> {
    let sock = pod
        .netns
        .run(&pi.home, || -> io::Result<Socket> {
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
        assert!(forwardable("10.0.0.10:53".parse().expect("addr")));
        assert!(!forwardable("127.0.0.1:53".parse().expect("addr")));
        assert!(!forwardable("10.0.0.10:15053".parse().expect("addr")));
        assert!(!forwardable("0.0.0.0:53".parse().expect("addr")));
    }
}
