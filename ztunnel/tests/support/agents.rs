//! The in-process harness: node agents in this process, on loopback, without root or
//! namespaces. [`Cluster::start`] takes the topology the e2e suites declare
//! (`e2e::Mesh::two_nodes(..)`, the same builder and YAML), gives every pod an address on a
//! 127.x.y.0/24 of its own, writes the YAML to a config directory and a CA to a temp dir, then
//! starts one `ztunnel::app::start` per node with `--redirect loopback`: each agent binds its
//! pods' 15001/15006/15008 on the pods' addresses. Tests play the applications: echo servers
//! on pod addresses, clients that name their destination over SOCKS5 (the pod's 15001, or
//! 15006 for plaintext from outside the mesh), and HBONE peers written with `h2` and rustls.
//!
//! Only the agent's public entry points (`app::start`, `config::{Args, Config}`) and its
//! endpoints (`/metrics`, `/healthz/ready`, `/config_dump`) are used.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use e2e::MeshBuilder;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mesh_model::identity::Identity;
use mesh_pki::ca::{Ca, WorkloadCert};
use mesh_pki::certs::CertManager;
use mesh_shell::admin::Control;
use mesh_shell::process::AppHandle;
use rustls::ClientConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use ztunnel::app::Addrs;

pub const TRUST_DOMAIN: &str = "cluster.local";
/// Bound on anything that should happen promptly (a reload, a counter, a close).
pub const EVENTUALLY: Duration = Duration::from_secs(10);
/// The agents' ports on each pod address.
pub const OUTBOUND: u16 = 15001;
pub const PLAINTEXT: u16 = 15006;
pub const HBONE: u16 = 15008;
/// How often the agents look at the config directory (the binaries' default is 500 ms).
const CONFIG_POLL: &str = "50ms";
/// Pods per node: node `n`'s pod `h` is `127.a.b.(n * PODS_PER_NODE + h)`.
const PODS_PER_NODE: u8 = 50;
const CERT_TTL: Duration = Duration::from_secs(3600);

pub fn identity(namespace: &str, sa: &str) -> Identity {
    Identity::new(TRUST_DOMAIN, namespace, sa)
}

/// A /24 of loopback addresses of its own per cluster: 127.<pid>.<n>.x, n counting the
/// clusters of this process, so the tests of a file run in parallel.
fn next_subnet() -> impl Fn(u8) -> Ipv4Addr + Copy {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let a = (std::process::id() % 254) as u8 + 1;
    let b = NEXT.fetch_add(1, Ordering::Relaxed);
    move |last| Ipv4Addr::new(127, a, b, last)
}

/// What a client asks its pod's agent for over SOCKS5.
#[derive(Clone, Debug)]
pub enum Dest {
    Addr(SocketAddr),
    Name(String, u16),
}

impl From<SocketAddr> for Dest {
    fn from(a: SocketAddr) -> Self {
        Dest::Addr(a)
    }
}

impl From<(&str, u16)> for Dest {
    fn from((name, port): (&str, u16)) -> Self {
        Dest::Name(name.to_owned(), port)
    }
}

// === impl Cluster ===

/// Running agents (one per node), their shared config directory and CA.
pub struct Cluster {
    agents: BTreeMap<String, AppHandle<Addrs>>,
    /// The CA service, when the agents get their certificates from it.
    ca_service: Option<AppHandle<control::app::Addrs>>,
    pods: BTreeMap<String, (String, Ipv4Addr)>,
    config_dir: PathBuf,
    ca_dir: PathBuf,
    certs: Arc<CertManager>,
    _dir: tempfile::TempDir,
}

impl Cluster {
    /// The declared topology on loopback, and one ready agent per node.
    pub async fn start(spec: MeshBuilder) -> Result<Cluster> {
        Self::start_with(spec, None, &[]).await
    }

    /// [`Cluster::start`] with extra flags for every agent (limits, timeouts).
    pub async fn start_with_flags(spec: MeshBuilder, flags: &[&str]) -> Result<Cluster> {
        Self::start_with(spec, None, flags).await
    }

    /// Like [`Cluster::start`], but the agents hold no signing key: the CA service
    /// (`control`, in this process, on the same config directory) issues their pods'
    /// certificates. `token_node(node)` is the node the agent's token is bound to (its own,
    /// or another's to play a stolen token). Only agents whose token names their own node
    /// are waited for.
    pub async fn start_with_ca(
        spec: MeshBuilder,
        token_node: impl Fn(&str) -> String,
    ) -> Result<Cluster> {
        Self::start_with(spec, Some(&token_node), &[]).await
    }

    async fn start_with(
        spec: MeshBuilder,
        token_node: Option<&dyn Fn(&str) -> String>,
        flags: &[&str],
    ) -> Result<Cluster> {
        init_logging();
        let ip = next_subnet();
        let rendered = spec.render(|node, host| {
            assert!(
                host < PODS_PER_NODE,
                "at most {PODS_PER_NODE} pods per node"
            );
            ip(node * PODS_PER_NODE + host)
        })?;
        let dir = tempfile::tempdir()?;
        let (config_dir, ca_dir) = (dir.path().join("config"), dir.path().join("ca"));
        std::fs::create_dir_all(&config_dir)?;
        for (file, content) in &rendered.files {
            std::fs::write(config_dir.join(file), content)?;
        }
        // Written before any agent starts, so the agents and the test's peers share it.
        let ca = Arc::new(Ca::load_or_create(&ca_dir, TRUST_DOMAIN)?);
        let certs = CertManager::new(ca, CERT_TTL);
        let ca_service = match token_node {
            Some(_) => Some(start_ca(&config_dir, &ca_dir, ip(0)).await?),
            None => None,
        };
        let mut agents = BTreeMap::new();
        let mut wait = Vec::new();
        for (i, node) in rendered.nodes.iter().enumerate() {
            let endpoints = ip(u8::try_from(i + 1)?);
            let source = match (token_node, &ca_service) {
                (Some(token_node), Some(ca)) => {
                    let bound = token_node(node);
                    if bound == *node {
                        wait.push(node.clone());
                    }
                    CertSource::Service {
                        grpc: ca.addrs.grpc,
                        token: node_token(&ca_dir, dir.path(), &bound)?,
                    }
                }
                _ => {
                    wait.push(node.clone());
                    CertSource::Dir
                }
            };
            let cfg = agent_config(node, &config_dir, &ca_dir, &source, endpoints, flags)?;
            let app = ztunnel::app::start(cfg, Control::default())
                .await
                .with_context(|| format!("start the agent of {node}"))?;
            agents.insert(node.clone(), app);
        }
        let cluster = Cluster {
            agents,
            ca_service,
            pods: rendered.pods,
            config_dir,
            ca_dir,
            certs,
            _dir: dir,
        };
        for node in &wait {
            cluster.wait_ready(node).await?;
        }
        Ok(cluster)
    }

    fn agent(&self, node: &str) -> Result<&AppHandle<Addrs>> {
        self.agents
            .get(node)
            .with_context(|| format!("no agent on {node}"))
    }

    /// Takes a node's agent out of the cluster (to shut it down through its handle).
    pub fn take_agent(&mut self, node: &str) -> Result<AppHandle<Addrs>> {
        self.agents
            .remove(node)
            .with_context(|| format!("no agent on {node}"))
    }

    pub fn ip(&self, pod: &str) -> Result<Ipv4Addr> {
        Ok(self
            .pods
            .get(pod)
            .with_context(|| format!("no pod {pod} (pods are \"ns/name\")"))?
            .1)
    }

    pub fn addr(&self, pod: &str, port: u16) -> Result<SocketAddr> {
        Ok(SocketAddr::new(self.ip(pod)?.into(), port))
    }

    /// An echo server on `pod`'s address (the application), recording who connected.
    pub async fn echo(&self, pod: &str, port: u16) -> Result<Echo> {
        Echo::start(self.addr(pod, port)?).await
    }

    /// `from`'s application opening a connection to `to` through its agent: SOCKS5 on the
    /// pod's 15001, where capture would have sent it.
    pub async fn connect(&self, from: &str, to: impl Into<Dest>) -> Result<TcpStream> {
        let ip = self.ip(from)?;
        let tcp = dial(ip.into(), SocketAddr::new(ip.into(), OUTBOUND)).await?;
        socks5_connect(tcp, &to.into()).await
    }

    /// Plaintext from `src` (an address outside the mesh, or a pod's) to `to`'s application
    /// port: SOCKS5 on `to`'s 15006, where capture would have sent it.
    pub async fn plaintext(&self, src: Ipv4Addr, to: &str, port: u16) -> Result<TcpStream> {
        let ip = self.ip(to)?;
        let tcp = dial(src.into(), SocketAddr::new(ip.into(), PLAINTEXT)).await?;
        socks5_connect(tcp, &Dest::Addr(SocketAddr::new(ip.into(), port))).await
    }

    /// Whether a connection from `from` to `to` echoes a payload intact (a refusal is a
    /// connection the agent closes).
    pub async fn reaches(&self, from: &str, to: impl Into<Dest>) -> bool {
        let payload = format!("ping from {from}");
        match self.connect(from, to).await {
            Ok(mut tcp) => roundtrip(&mut tcp, payload.as_bytes())
                .await
                .is_ok_and(|back| back == payload.as_bytes()),
            Err(_) => false,
        }
    }

    // === the agents' endpoints ===

    pub async fn metrics(&self, node: &str) -> Result<String> {
        let addr = self.agent(node)?.addrs.metrics;
        let (status, body) = http_get(addr, "/metrics").await?;
        ensure!(status == 200, "{node} /metrics: {status} {body}");
        Ok(body)
    }

    /// The sum of metric `name` over the samples with `labels` on `node`, once it reads `want`,
    /// or whatever it reads after [`EVENTUALLY`] (a connection is counted as it closes, which
    /// may be just after the client saw it end).
    pub async fn counted(
        &self,
        node: &str,
        name: &str,
        labels: &[(&str, &str)],
        want: f64,
    ) -> Result<f64> {
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            let n = e2e::prom::sum(&self.metrics(node).await?, name, labels);
            if n == want || Instant::now() >= deadline {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// `mesh_connections_refused_total{reporter, reason}` on `node` (see [`Cluster::counted`]).
    pub async fn refused(
        &self,
        node: &str,
        reporter: &str,
        reason: &str,
        want: f64,
    ) -> Result<f64> {
        let labels = [("reporter", reporter), ("reason", reason)];
        self.counted(node, "mesh_connections_refused_total", &labels, want)
            .await
    }

    pub async fn config_dump(&self, node: &str) -> Result<serde_json::Value> {
        let addr = self.agent(node)?.addrs.admin;
        let (status, body) = http_get(addr, "/config_dump").await?;
        ensure!(status == 200, "{node} /config_dump: {status} {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// Whether the node's agent says it is ready.
    pub async fn is_ready(&self, node: &str) -> Result<bool> {
        let (status, _) = http_get(self.agent(node)?.addrs.readiness, "/healthz/ready").await?;
        Ok(status == 200)
    }

    /// The CA service's `/config_dump` (with [`Cluster::start_with_ca`]).
    pub async fn ca_dump(&self) -> Result<serde_json::Value> {
        let ca = self.ca_service.as_ref().context("no CA service")?;
        let (status, body) = http_get(ca.addrs.endpoints.admin, "/config_dump").await?;
        ensure!(status == 200, "ca /config_dump: {status}");
        Ok(serde_json::from_str(&body)?)
    }

    async fn wait_ready(&self, node: &str) -> Result<()> {
        let addr = self.agent(node)?.addrs.readiness;
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            let (status, body) = http_get(addr, "/healthz/ready").await?;
            if status == 200 {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("{node} not ready: {status} {body}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // === configuration ===

    /// Writes (or replaces) a YAML file in the config directory, atomically (a dot-prefixed
    /// temp file, then a rename), and waits until every agent has taken it: loaded
    /// (`mesh_config_reloads_total`) or, with `rejected`, refused
    /// (`mesh_config_rejections_total`).
    pub async fn apply(&self, file: &str, content: &str, rejected: bool) -> Result<()> {
        let (name, labels): (_, &[(&str, &str)]) = if rejected {
            ("mesh_config_rejections_total", &[("source", "local")])
        } else {
            ("mesh_config_reloads_total", &[])
        };
        let mut before = BTreeMap::new();
        for node in self.agents.keys() {
            before.insert(
                node,
                e2e::prom::sum(&self.metrics(node).await?, name, labels),
            );
        }
        let tmp = self.config_dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, content)?;
        std::fs::rename(&tmp, self.config_dir.join(file))?;
        for (node, n) in before {
            let now = self.counted(node, name, labels, n + 1.0).await?;
            ensure!(
                now > n,
                "{node} did not take {file} ({name} stayed at {now})"
            );
        }
        Ok(())
    }

    pub fn ca_dir(&self) -> &Path {
        &self.ca_dir
    }

    /// An HBONE client's TLS as the mesh issues it: certificate for `who`, expecting `server`.
    pub fn mesh_tls(&self, who: &Identity, server: &Identity) -> Result<Arc<ClientConfig>> {
        Ok(mesh_pki::tls::client_config(
            self.certs.clone(),
            who.clone(),
            vec![server.clone()],
        )?)
    }

    /// An HBONE client's TLS presenting `cert` (or none) but judging the server as the mesh
    /// does (`server`'s identity under the mesh's roots).
    pub fn tls_with(
        &self,
        cert: Option<&WorkloadCert>,
        server: &Identity,
    ) -> Result<Arc<ClientConfig>> {
        let verifier =
            mesh_pki::tls::server_verifier(self.certs.root_store(), vec![server.clone()]);
        let builder = ClientConfig::builder_with_provider(mesh_pki::tls::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match cert {
            Some(c) => builder.with_client_auth_cert(c.chain.clone(), c.key.clone_key())?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        config.enable_sni = false;
        Ok(Arc::new(config))
    }

    /// Shuts every agent down through its handle and waits for each to drain and end.
    pub async fn stop(mut self) -> Result<()> {
        for (node, app) in std::mem::take(&mut self.agents) {
            app.shutdown();
            tokio::time::timeout(EVENTUALLY, app.join())
                .await
                .with_context(|| format!("the agent of {node} drains and ends"))??;
        }
        Ok(())
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(ca) = &self.ca_service {
            ca.shutdown();
        }
        for app in self.agents.values() {
            app.shutdown();
        }
    }
}

/// Where an agent's certificates come from.
enum CertSource {
    /// It signs them itself (`--ca-dir`).
    Dir,
    /// The CA service, with a node token.
    Service { grpc: SocketAddr, token: PathBuf },
}

/// The CA service on `ip`, reading the agents' config directory and holding the CA.
async fn start_ca(
    config_dir: &Path,
    ca_dir: &Path,
    ip: Ipv4Addr,
) -> Result<AppHandle<control::app::Addrs>> {
    let any = format!("{ip}:0");
    let args = control::config::Args::try_parse_from([
        "control",
        &format!("--ca-dir={}", ca_dir.display()),
        &format!("--config-dir={}", config_dir.display()),
        &format!("--config-poll={CONFIG_POLL}"),
        &format!("--grpc-addr={any}"),
        &format!("--admin-addr={any}"),
        &format!("--metrics-addr={any}"),
        &format!("--readiness-addr={any}"),
    ])?;
    control::app::start(args, Control::default())
        .await
        .context("start the CA service")
}

/// A node agent's token (`istio-system/ztunnel` bound to `node`), in a file.
fn node_token(ca_dir: &Path, dir: &Path, node: &str) -> Result<PathBuf> {
    let tokens = control::token::TokenAuthority::load_or_create(ca_dir)?;
    let token = tokens.mint(&control::token::TokenClaims {
        namespace: "istio-system".into(),
        service_account: "ztunnel".into(),
        node: Some(node.into()),
        pod: None,
        audience: control::token::DEFAULT_AUDIENCE.into(),
        ttl: Duration::from_secs(3600),
    })?;
    let path = dir.join(format!("token-{node}-{}", rand::random::<u32>()));
    std::fs::write(&path, token)?;
    Ok(path)
}

fn agent_config(
    node: &str,
    config_dir: &Path,
    ca_dir: &Path,
    certs: &CertSource,
    endpoints: Ipv4Addr,
    flags: &[&str],
) -> Result<ztunnel::config::Config> {
    // The endpoint listeners on an address of the node's own, on ports the kernel picks.
    let any = format!("{endpoints}:0");
    let ca_flags = match certs {
        CertSource::Dir => vec![format!("--ca-dir={}", ca_dir.display())],
        CertSource::Service { grpc, token } => vec![
            format!("--ca-address=https://{grpc}"),
            format!("--ca-root-file={}", ca_dir.join("root-cert.pem").display()),
            format!("--ca-token-file={}", token.display()),
            "--ca-server-name=istiod.istio-system.svc".to_string(),
        ],
    };
    let args = <ztunnel::config::Args as clap::Parser>::try_parse_from(
        [
            "ztunnel".to_string(),
            format!("--node-name={node}"),
            "--redirect=loopback".to_string(),
            format!("--config-dir={}", config_dir.display()),
        ]
        .into_iter()
        .chain(ca_flags)
        .chain([
            format!("--admin-addr={any}"),
            format!("--metrics-addr={any}"),
            format!("--readiness-addr={any}"),
            format!("--config-poll={CONFIG_POLL}"),
            "--drain-timeout=5s".to_string(),
            "--connect-timeout=2s".to_string(),
        ])
        .chain(flags.iter().map(|f| f.to_string())),
    )?;
    Ok(ztunnel::config::Config::from(&args))
}

/// `RUST_LOG=ztunnel=debug cargo test -p ztunnel --test in_process -- --nocapture` shows the
/// agents' logs (access lines are target `access`).
fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

// === clients ===

/// A TCP connection from `src` to `dst`.
pub async fn dial(src: IpAddr, dst: SocketAddr) -> Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    sock.bind(SocketAddr::new(src, 0))?;
    let tcp = tokio::time::timeout(EVENTUALLY, sock.connect(dst))
        .await
        .with_context(|| format!("connect {dst}: timed out"))?
        .with_context(|| format!("connect {dst} from {src}"))?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}

/// The client side of RFC 1928: no authentication, CONNECT to `dst`.
pub async fn socks5_connect(mut tcp: TcpStream, dst: &Dest) -> Result<TcpStream> {
    tcp.write_all(&[5, 1, 0]).await?;
    let mut chosen = [0u8; 2];
    tcp.read_exact(&mut chosen).await.context("socks5 method")?;
    ensure!(chosen == [5, 0], "socks5 method answer {chosen:?}");
    let mut req = vec![5, 1, 0];
    let port = match dst {
        Dest::Addr(SocketAddr::V4(a)) => {
            req.push(1);
            req.extend(a.ip().octets());
            a.port()
        }
        Dest::Addr(SocketAddr::V6(a)) => {
            req.push(4);
            req.extend(a.ip().octets());
            a.port()
        }
        Dest::Name(name, port) => {
            req.push(3);
            req.push(u8::try_from(name.len())?);
            req.extend(name.as_bytes());
            *port
        }
    };
    req.extend(port.to_be_bytes());
    tcp.write_all(&req).await?;
    let mut reply = [0u8; 10];
    tcp.read_exact(&mut reply).await.context("socks5 reply")?;
    ensure!(
        reply[1] == 0,
        "socks5 CONNECT {dst:?}: reply code {}",
        reply[1]
    );
    Ok(tcp)
}

/// Sends `payload`, half-closes, and returns everything read until the other side's end.
pub async fn roundtrip(tcp: &mut TcpStream, payload: &[u8]) -> Result<Vec<u8>> {
    tcp.write_all(payload).await?;
    tcp.shutdown().await?;
    let mut back = Vec::new();
    tokio::time::timeout(EVENTUALLY, tcp.read_to_end(&mut back))
        .await
        .context("no end of stream")??;
    Ok(back)
}

/// Sends `payload` on a connection that stays open and reads its echo.
pub async fn exchange(tcp: &mut TcpStream, payload: &[u8]) -> Result<Vec<u8>> {
    tcp.write_all(payload).await?;
    let mut back = vec![0; payload.len()];
    tokio::time::timeout(EVENTUALLY, tcp.read_exact(&mut back))
        .await
        .context("no echo")??;
    Ok(back)
}

/// Whether the other side closes (or resets) `tcp` within [`EVENTUALLY`], reading whatever
/// arrives meanwhile.
pub async fn closed(tcp: &mut TcpStream) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = Instant::now() + EVENTUALLY;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, tcp.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
            Err(_) => return false,
        }
    }
}

/// One HTTP/1.1 GET to an agent endpoint: status and body.
async fn http_get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())?;
    let rsp = send.send_request(req).await?;
    let status = rsp.status().as_u16();
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

// === impl Echo ===

/// An application: echoes every connection and records its peer.
pub struct Echo {
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    pub async fn start(addr: SocketAddr) -> Result<Echo> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind echo {addr}"))?;
        let peers: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let seen = peers.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, peer)) = listener.accept().await {
                seen.lock().unwrap_or_else(|e| e.into_inner()).push(peer);
                tokio::spawn(async move {
                    let (mut rd, mut wr) = tcp.split();
                    let _ = tokio::io::copy(&mut rd, &mut wr).await;
                    let _ = wr.shutdown().await;
                });
            }
        });
        Ok(Echo { peers, task })
    }

    /// The addresses connections came from, in order.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === HBONE peers ===

/// What a TLS handshake with a pod's 15008 came to, as the client sees it: in TLS 1.3 the
/// server judges the client's certificate after the client has finished, so the verdict is
/// the first read (the server's HTTP/2 SETTINGS, or an alert).
#[derive(Debug, PartialEq)]
pub enum Handshake {
    Accepted,
    Alert(rustls::AlertDescription),
    Failed(String),
}

pub async fn handshake(
    src: Ipv4Addr,
    dst: SocketAddr,
    tls: Arc<ClientConfig>,
) -> Result<Handshake> {
    let tcp = dial(src.into(), dst).await?;
    let connector = tokio_rustls::TlsConnector::from(tls);
    let mut stream = match connector.connect(mesh_pki::tls::server_name(), tcp).await {
        Ok(s) => s,
        Err(e) => return Ok(outcome_of_io(&e)),
    };
    let mut first = [0u8; 256];
    let read = tokio::time::timeout(EVENTUALLY, stream.read(&mut first))
        .await
        .context("the server said nothing after the handshake")?;
    Ok(match read {
        Ok(0) => Handshake::Failed("closed without an alert".to_owned()),
        Ok(_) => Handshake::Accepted,
        Err(e) => outcome_of_io(&e),
    })
}

fn outcome_of_io(e: &std::io::Error) -> Handshake {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::AlertReceived(alert)) => Handshake::Alert(*alert),
        _ => Handshake::Failed(e.to_string()),
    }
}

/// An HTTP/2 connection over mTLS to a pod's 15008.
pub struct Hbone {
    send: h2::client::SendRequest<Bytes>,
    /// Drives the connection; ends when the server closes it.
    driver: tokio::task::JoinHandle<Result<(), h2::Error>>,
}

impl Hbone {
    pub async fn open(src: Ipv4Addr, dst: SocketAddr, tls: Arc<ClientConfig>) -> Result<Hbone> {
        let tcp = dial(src.into(), dst).await?;
        let connector = tokio_rustls::TlsConnector::from(tls);
        let stream = connector
            .connect(mesh_pki::tls::server_name(), tcp)
            .await
            .context("tls handshake")?;
        let (send, conn) = h2::client::handshake(stream).await?;
        let driver = tokio::spawn(conn);
        Ok(Hbone { send, driver })
    }

    /// Whether the connection has ended (the server closed it).
    pub fn is_closed(&self) -> bool {
        self.driver.is_finished()
    }

    /// Opens a CONNECT to `authority`: the response's status, and when it is 200 the echo of
    /// `payload` through the tunnel.
    pub async fn connect(
        &mut self,
        authority: SocketAddr,
        payload: &'static [u8],
    ) -> Result<(http::StatusCode, Vec<u8>)> {
        self.connect_with(authority, &[], payload).await
    }

    /// [`Hbone::connect`] with extra CONNECT headers (what a hostile peer may write).
    pub async fn connect_with(
        &mut self,
        authority: SocketAddr,
        headers: &[(&str, &str)],
        payload: &'static [u8],
    ) -> Result<(http::StatusCode, Vec<u8>)> {
        let mut req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority.to_string());
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let req = req.body(())?;
        let mut send = self.send.clone().ready().await?;
        let (response, mut body) = send.send_request(req, false)?;
        let response = tokio::time::timeout(EVENTUALLY, response)
            .await
            .context("no response to CONNECT")??;
        let status = response.status();
        if status != http::StatusCode::OK {
            return Ok((status, Vec::new()));
        }
        body.send_data(Bytes::from_static(payload), true)?;
        let mut recv = response.into_body();
        let mut back = Vec::new();
        while let Some(chunk) = tokio::time::timeout(EVENTUALLY, recv.data())
            .await
            .context("waiting for the echo")?
        {
            let chunk = chunk?;
            recv.flow_control().release_capacity(chunk.len())?;
            back.extend_from_slice(&chunk);
        }
        Ok((status, back))
    }
}
