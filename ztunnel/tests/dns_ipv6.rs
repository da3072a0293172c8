//! The DNS proxy for a dual-stack pod, through the real `ztunnel` binary on each capture
//! backend: the pod's IPv6 DNS (UDP and TCP to `[fd00::53]:53`) is captured like its IPv4
//! DNS; a dual-stack Service's name is answered by the agent (AAAA from its IPv6 cluster IP),
//! any other name is forwarded from the pod's IPv6 address to the IPv6 resolver it asked.
//!
//! The namespaces are `support::dual_stack`'s, both resolvers in the one outside the mesh.
//! Needs root.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use support::background::{lock, Background};
use support::dual_stack::DualStackPod;
use support::netns::TestNetns;

const POD_IP4: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 2);
const POD_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// The pod's resolvers, on the other end of its link.
const RESOLVER4: Ipv4Addr = Ipv4Addr::new(10, 79, 0, 1);
const RESOLVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x53);
/// What the resolvers answer every query with.
const UPSTREAM4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 53);
const UPSTREAM6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0xbad);
/// The dual-stack Service's cluster IPs.
const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const SERVICE: &str = "echo.default.svc.cluster.local.";
/// How long the agent may take to capture the pod.
const CAPTURED_WITHIN: Duration = Duration::from_secs(30);

#[test]
fn ipv6_dns_is_captured_answered_and_forwarded_with_nftables() -> Result<()> {
    ipv6_dns("nftables")
}

#[test]
fn ipv6_dns_is_captured_answered_and_forwarded_with_ebpf() -> Result<()> {
    ipv6_dns("ebpf")
}

fn ipv6_dns(backend: &str) -> Result<()> {
    let ns = DualStackPod::new((POD_IP4, POD_IP6), "dns", (RESOLVER4, RESOLVER6))?;
    let resolvers = Resolvers::start(&ns.outside)?;
    let mut agent = ns.start_agent(backend, SERVICE_YAML)?;
    let client = Client(&ns.pod);
    let v6 = SocketAddr::from((RESOLVER6, 53));
    let v4 = SocketAddr::from((RESOLVER4, 53));

    // Until the agent captures the pod, the resolver answers the Service's name too.
    let deadline = Instant::now() + CAPTURED_WITHIN;
    loop {
        agent.check_running()?;
        if client.udp(v6, SERVICE, RecordType::AAAA).ok() == Some(vec![VIP6.into()]) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "the pod's IPv6 DNS was not captured within {CAPTURED_WITHIN:?}; agent log:\n{}",
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    resolvers.forget();

    let (udp, tcp) = (Client::udp as Ask<'_>, Client::tcp as Ask<'_>);
    let (a, aaaa) = (RecordType::A, RecordType::AAAA);
    let [vip4, vip6, up4, up6]: [IpAddr; 4] =
        [VIP4.into(), VIP6.into(), UPSTREAM4.into(), UPSTREAM6.into()];
    for (ask, server, name, qtype, expected, why) in [
        (udp, v6, SERVICE, a, vip4, "a mesh name's A record"),
        (tcp, v6, SERVICE, aaaa, vip6, "a mesh name over TCP"),
        (udp, v6, "other.example.org.", aaaa, up6, "another name"),
        (tcp, v6, "tcp.example.org.", aaaa, up6, "over TCP"),
        (udp, v4, SERVICE, aaaa, vip6, "IPv4 is captured as before"),
        (udp, v4, "v4.example.org.", a, up4, "and forwarded"),
    ] {
        let answer = ask(&client, server, name, qtype)?;
        assert_eq!(answer, [expected], "{why}: {name} {qtype} at {server}");
    }
    // The other names went on to the resolver of their family, from the pod's address.
    let asked = resolvers.asked();
    for (name, from, resolver) in [
        (
            "other.example.org.",
            IpAddr::from(POD_IP6),
            IpAddr::from(RESOLVER6),
        ),
        ("tcp.example.org.", POD_IP6.into(), RESOLVER6.into()),
        ("v4.example.org.", POD_IP4.into(), RESOLVER4.into()),
    ] {
        assert!(
            asked.contains(&(name.to_owned(), from, resolver)),
            "{name} from {from} at {resolver}: {asked:?}"
        );
    }
    assert!(
        !asked.iter().any(|(name, _, _)| name == SERVICE),
        "a mesh name reached a resolver: {asked:?}"
    );
    drop(agent);
    Ok(())
}

/// Beside the pod, the node's config has a dual-stack Service.
const SERVICE_YAML: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  selector: {app: echo}
  ports: [{port: 80}]
"#;

// === the resolvers ===

/// One query a resolver got: the name, the sender's address and the resolver's.
type Asked = (String, IpAddr, IpAddr);

/// A resolver on each of [`RESOLVER4`] and [`RESOLVER6`], port 53, UDP and TCP, answering
/// every A query with [`UPSTREAM4`] and every AAAA query with [`UPSTREAM6`]; stopped on drop.
struct Resolvers {
    asked: Arc<Mutex<Vec<Asked>>>,
    _threads: Background,
}

impl Resolvers {
    fn start(ns: &TestNetns) -> Result<Resolvers> {
        let asked: Arc<Mutex<Vec<Asked>>> = Arc::default();
        let mut threads = Background::default();
        for addr in [IpAddr::from(RESOLVER4), RESOLVER6.into()] {
            let socket = ns.run(|| std::net::UdpSocket::bind((addr, 53)))??;
            socket.set_read_timeout(Some(Duration::from_millis(50)))?;
            let udp_asked = asked.clone();
            threads.spawn(move |stop| {
                let mut buf = [0u8; 512];
                while !Background::stopped(stop) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let Some((name, answer)) = answer(&buf[..n]) else {
                        continue;
                    };
                    lock(&udp_asked).push((name, from.ip(), addr));
                    let _ = socket.send_to(&answer, from);
                }
            });
            let listener = ns.run(|| std::net::TcpListener::bind((addr, 53)))??;
            let tcp_asked = asked.clone();
            threads.serve_tcp(listener, move |stream, from| {
                if let Some(name) = answer_tcp(stream) {
                    lock(&tcp_asked).push((name, from.ip(), addr));
                }
            })?;
        }
        Ok(Resolvers {
            asked,
            _threads: threads,
        })
    }

    fn asked(&self) -> Vec<Asked> {
        lock(&self.asked).clone()
    }

    /// Forgets the queries so far (those sent before the pod was captured).
    fn forget(&self) {
        lock(&self.asked).clear();
    }
}

/// The resolvers' answer to `query`, and the name it asked.
fn answer(query: &[u8]) -> Option<(String, Vec<u8>)> {
    let msg = Message::from_vec(query).ok()?;
    let q = msg.queries.first()?.clone();
    let mut answer = Message::response(msg.metadata.id, OpCode::Query);
    let rdata = match q.query_type() {
        RecordType::A => Some(RData::A(A(UPSTREAM4))),
        RecordType::AAAA => Some(RData::AAAA(AAAA(UPSTREAM6))),
        _ => None,
    };
    if let Some(rdata) = rdata {
        answer.add_answer(Record::from_rdata(q.name().clone(), 30, rdata));
    }
    answer.add_query(q.clone());
    Some((q.name().to_ascii(), answer.to_vec().ok()?))
}

/// Answers the one query of a TCP connection; the name it asked.
fn answer_tcp(mut stream: std::net::TcpStream) -> Option<String> {
    stream.set_nonblocking(false).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let query = read_frame(&mut stream).ok()?;
    let (name, answer) = answer(&query)?;
    write_frame(&mut stream, &answer).ok()?;
    Some(name)
}

fn read_frame(stream: &mut std::net::TcpStream) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut len = [0u8; 2];
    stream.read_exact(&mut len)?;
    let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
    stream.read_exact(&mut msg)?;
    Ok(msg)
}

fn write_frame(stream: &mut std::net::TcpStream, msg: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut frame = u16::try_from(msg.len())?.to_be_bytes().to_vec();
    frame.extend_from_slice(msg);
    Ok(stream.write_all(&frame)?)
}

// === the pod's DNS client ===

/// One query from the pod: [`Client::udp`] or [`Client::tcp`].
type Ask<'a> = fn(&Client<'a>, SocketAddr, &str, RecordType) -> Result<Vec<IpAddr>>;

/// Sends queries from the pod, as its resolver library would.
struct Client<'a>(&'a TestNetns);

impl Client<'_> {
    /// The addresses in the answer to `name`/`qtype` over UDP from `server`.
    fn udp(&self, server: SocketAddr, name: &str, qtype: RecordType) -> Result<Vec<IpAddr>> {
        let any = match server {
            SocketAddr::V4(_) => IpAddr::from(Ipv4Addr::UNSPECIFIED),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let socket = self.0.run(|| std::net::UdpSocket::bind((any, 0)))??;
        socket.connect(server)?;
        socket.set_read_timeout(Some(Duration::from_secs(2)))?;
        socket.send(&query(name, qtype)?)?;
        let mut buf = [0u8; 512];
        let n = socket.recv(&mut buf).context("no answer")?;
        addresses(&buf[..n])
    }

    /// The same over TCP.
    fn tcp(&self, server: SocketAddr, name: &str, qtype: RecordType) -> Result<Vec<IpAddr>> {
        let timeout = Duration::from_secs(2);
        let mut stream = self
            .0
            .run(|| std::net::TcpStream::connect_timeout(&server, timeout))??;
        stream.set_read_timeout(Some(timeout))?;
        write_frame(&mut stream, &query(name, qtype)?)?;
        addresses(&read_frame(&mut stream)?)
    }
}

fn query(name: &str, qtype: RecordType) -> Result<Vec<u8>> {
    let mut m = Message::new(0x5353, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(Name::from_ascii(name)?, qtype));
    Ok(m.to_vec()?)
}

fn addresses(answer: &[u8]) -> Result<Vec<IpAddr>> {
    let m = Message::from_vec(answer)?;
    Ok(m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::from(a.0)),
            RData::AAAA(a) => Some(IpAddr::from(a.0)),
            _ => None,
        })
        .collect())
}
