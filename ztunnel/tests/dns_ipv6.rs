//! The DNS proxy for a dual-stack pod, through the real `ztunnel` binary on each capture
//! backend: the pod's IPv6 DNS (UDP and TCP to `[fd00::53]:53`) is captured like its IPv4
//! DNS; a dual-stack Service's name is answered by the agent (AAAA from its IPv6 cluster IP),
//! any other name is forwarded from the pod's IPv6 address to the IPv6 resolver it asked.
//!
//! The e2e harness gives pods no IPv6 (its namespaces have IPv6 off), so this test builds its
//! own: a node namespace where the agent runs (`--config-dir`, pods' namespaces by name), a
//! pod namespace with an IPv4 and a ULA IPv6 address, and a resolver namespace on the pod's
//! link holding both resolvers. Nothing leaves these namespaces; all of it is removed on
//! drop. Needs root.

mod support;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::Path;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hickory_proto::op::{Message, MessageType, OpCode, Query};
use hickory_proto::rr::rdata::{A, AAAA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use support::netns::{ip, prefix, require_root, TestNetns};
use support::process::spawn_agent;
use ztunnel::netns::Netns;

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
    require_root()?;
    let prefix = prefix();
    let dir = tempfile::tempdir()?;
    let node = TestNetns::new(&prefix, "node")?;
    // `<prefix><namespace>.<name>`: where the agent looks for pod default/client.
    let pod = TestNetns::new(&prefix, "default.client")?;
    let dns = TestNetns::new(&prefix, "dns")?;
    link(&pod, &dns)?;
    let resolvers = Resolvers::start(&dns)?;
    std::fs::write(dir.path().join("mesh.yaml"), MESH)?;
    let bpffs = match backend {
        "ebpf" => Some(Bpffs::mount(dir.path())?),
        _ => None,
    };
    let mut agent = Agent::start(&node, dir.path(), &prefix, backend, bpffs.as_ref())?;
    let client = Client::new(&pod)?;
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

    let (udp, tcp) = (Client::udp as Ask, Client::tcp as Ask);
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

/// The node's config: an ambient namespace, the pod (dual-stack) and a dual-stack Service.
const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: default}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {app: client}}
spec: {nodeName: n1, serviceAccountName: client, containers: [{name: app, image: app}]}
status: {phase: Running, podIP: 10.79.0.2, podIPs: [{ip: 10.79.0.2}, {ip: "fd00::2"}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  clusterIPs: [10.96.0.10, "fd00:96::10"]
  selector: {app: echo}
  ports: [{port: 80}]
"#;

/// Joins the pod to the resolvers' namespace with a veth pair, both families on it.
fn link(pod: &TestNetns, dns: &TestNetns) -> Result<()> {
    ip(&[
        "link", "add", "name", "eth0", "netns", &pod.name, "type", "veth", "peer", "name", "eth0",
        "netns", &dns.name,
    ])?;
    let pod_addrs = [format!("{POD_IP4}/24"), format!("{POD_IP6}/64")];
    let dns_addrs = [format!("{RESOLVER4}/24"), format!("{RESOLVER6}/64")];
    for (ns, addrs) in [(pod, pod_addrs), (dns, dns_addrs)] {
        for addr in &addrs {
            // `nodad`: usable at once (no one else is on the link).
            ip(&["-n", &ns.name, "addr", "add", addr, "dev", "eth0", "nodad"])?;
        }
        ip(&["-n", &ns.name, "link", "set", "eth0", "up"])?;
    }
    Ok(())
}

/// Opens the namespace of `ns` for [`Netns::run`].
fn open(ns: &TestNetns) -> Result<Netns> {
    Ok(Netns::open(&ns.path())?)
}

// === the resolvers ===

/// One query a resolver got: the name, the sender's address and the resolver's.
type Asked = (String, IpAddr, IpAddr);

/// A resolver on each of [`RESOLVER4`] and [`RESOLVER6`], port 53, UDP and TCP, answering
/// every A query with [`UPSTREAM4`] and every AAAA query with [`UPSTREAM6`]; stopped on drop.
struct Resolvers {
    asked: Arc<Mutex<Vec<Asked>>>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Resolvers {
    fn start(ns: &TestNetns) -> Result<Resolvers> {
        let (netns, home) = (open(ns)?, Netns::current()?);
        let mut resolvers = Resolvers {
            asked: Arc::default(),
            stop: Arc::default(),
            threads: Vec::new(),
        };
        for addr in [IpAddr::from(RESOLVER4), RESOLVER6.into()] {
            let socket = netns.run(&home, || std::net::UdpSocket::bind((addr, 53)))??;
            socket.set_read_timeout(Some(Duration::from_millis(50)))?;
            let (asked, stop) = (resolvers.asked.clone(), resolvers.stop.clone());
            resolvers.threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 512];
                while !stop.load(Ordering::Relaxed) {
                    let Ok((n, from)) = socket.recv_from(&mut buf) else {
                        continue;
                    };
                    let Some((name, answer)) = answer(&buf[..n]) else {
                        continue;
                    };
                    lock(&asked).push((name, from.ip(), addr));
                    let _ = socket.send_to(&answer, from);
                }
            }));
            let listener = netns.run(&home, || std::net::TcpListener::bind((addr, 53)))??;
            listener.set_nonblocking(true)?;
            let (asked, stop) = (resolvers.asked.clone(), resolvers.stop.clone());
            resolvers.threads.push(std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((stream, from)) => {
                            if let Some(name) = answer_tcp(stream) {
                                lock(&asked).push((name, from.ip(), addr));
                            }
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(20)),
                    }
                }
            }));
        }
        Ok(resolvers)
    }

    fn asked(&self) -> Vec<Asked> {
        lock(&self.asked).clone()
    }

    /// Forgets the queries so far (those sent before the pod was captured).
    fn forget(&self) {
        lock(&self.asked).clear();
    }
}

impl Drop for Resolvers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
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
type Ask = fn(&Client, SocketAddr, &str, RecordType) -> Result<Vec<IpAddr>>;

/// Sends queries from the pod, as its resolver library would.
struct Client {
    netns: Netns,
    home: Netns,
}

impl Client {
    fn new(pod: &TestNetns) -> Result<Client> {
        Ok(Client {
            netns: open(pod)?,
            home: Netns::current()?,
        })
    }

    /// The addresses in the answer to `name`/`qtype` over UDP from `server`.
    fn udp(&self, server: SocketAddr, name: &str, qtype: RecordType) -> Result<Vec<IpAddr>> {
        let any = match server {
            SocketAddr::V4(_) => IpAddr::from(Ipv4Addr::UNSPECIFIED),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let socket = self
            .netns
            .run(&self.home, || std::net::UdpSocket::bind((any, 0)))??;
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
        let mut stream = self.netns.run(&self.home, || {
            std::net::TcpStream::connect_timeout(&server, timeout)
        })??;
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

// === the agent ===

/// The `ztunnel` binary in the node's namespace; killed on drop.
struct Agent {
    child: Child,
    log: std::path::PathBuf,
}

impl Agent {
    fn start(
        node: &TestNetns,
        dir: &Path,
        prefix: &str,
        backend: &str,
        bpffs: Option<&Bpffs>,
    ) -> Result<Agent> {
        let log = dir.join("ztunnel.log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.name, env!("CARGO_BIN_EXE_ztunnel")])
            .args(["--node-name", "n1", "--config-dir"])
            .arg(dir)
            .arg("--ca-dir")
            .arg(dir.join("ca"))
            .args(["--netns-prefix", prefix, "--redirect", backend]);
        if let Some(fs) = bpffs {
            cmd.arg("--bpf-fs").arg(&fs.path);
        }
        let child = spawn_agent(cmd, &log, prefix)?;
        Ok(Agent { child, log })
    }

    fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("ztunnel exited ({status}):\n{}", self.log());
        }
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private bpffs for the agent's pins, under `dir`; unmounted on drop.
struct Bpffs {
    path: std::path::PathBuf,
}

impl Bpffs {
    fn mount(dir: &Path) -> Result<Bpffs> {
        let path = dir.join("bpffs");
        std::fs::create_dir(&path)?;
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&path)
            .status()?;
        if !status.success() {
            bail!("mount a bpffs at {}: {status}", path.display());
        }
        Ok(Bpffs { path })
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}
