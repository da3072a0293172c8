//! The in-process harness: the whole waypoint in this process, on loopback, without root or
//! namespaces. [`Mesh::start`] writes a CA to a temp dir and a YAML config dir (a fixed
//! topology plus the test's own policies and routes), starts `waypoint::app::start`, and
//! plays the node agents around it: [`Client`] tunnels into the waypoint over real HBONE
//! (mTLS as whatever identity the test chooses), and each backend pod has an HBONE server on
//! `<pod-ip>:15008` (mTLS as `app/echo`) that relays each tunnel to the pod's echo servers
//! (HTTP/1.1 on 8080, HTTP/2 on 8082). Every mesh gets its own 127.x.y.0/24, so the tests of
//! a file run in parallel.
//!
//! Only the waypoint's public entry points (`app::start`, `config::{Args, Config}`) are used,
//! so these tests do not depend on how the waypoint is built inside.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_hbone::{
    connect_request, ConnectHeaders, H2Stream, HboneError, Pool, PoolConfig, PoolKey, HBONE_PORT,
};
use mesh_model::identity::Identity;
use mesh_pki::ca::Ca;
use mesh_pki::certs::CertManager;
use mesh_shell::admin::Control;
use mesh_shell::process::AppHandle;
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use waypoint::app::Addrs;

pub const TRUST_DOMAIN: &str = "cluster.local";
/// Bound on anything that should happen promptly.
pub const EVENTUALLY: Duration = Duration::from_secs(10);
/// The Service every test calls unless it says otherwise (`istio.io/use-waypoint: wp`).
pub const ECHO: Target = Target {
    host: "echo.app.svc.cluster.local",
    vip: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20)), 80),
};
/// Port 81 of `echo`: declared `http2`, so the waypoint speaks HTTP/2 to the pods.
pub const ECHO_H2: Target = Target {
    host: "echo.app.svc.cluster.local",
    vip: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20)), 81),
};
/// Port 82 of `echo`: declared `tcp`, so the waypoint relays bytes (its L4 path).
pub const ECHO_TCP: Target = Target {
    host: "echo.app.svc.cluster.local",
    vip: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20)), 82),
};
/// The same pods through a Service that does not use the waypoint.
pub const BYPASS: Target = Target {
    host: "bypass.app.svc.cluster.local",
    vip: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 29)), 80),
};

/// The last octet of each pod's address.
const WAYPOINT: u8 = 100;
const SLEEP: u8 = 1;
/// The backend pods: (last octet, name = `version` label).
const BACKENDS: [(u8, &str); 2] = [(2, "echo-v1"), (3, "echo-v2")];
const HTTP1_PORT: u16 = 8080;
const HTTP2_PORT: u16 = 8082;

/// The topology every mesh shares: Gateway `app/wp` and its pod, the client pod `app/sleep`,
/// pods `echo-v1` and `echo-v2` (labels `app: echo`, `version: v1|v2`), Service `echo` (both
/// pods, through the waypoint; port 80 `http`, port 81 `http2`, port 82 `tcp`), Services `echo-v1` and
/// `echo-v2` (one pod each) and `bypass` (both pods, no waypoint).
fn topology(ip: impl Fn(u8) -> Ipv4Addr) -> String {
    let (wp, sleep) = (ip(WAYPOINT), ip(SLEEP));
    let mut yaml = format!(
        r#"
apiVersion: v1
kind: Namespace
metadata: {{name: app, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: wp, namespace: app, labels: {{istio.io/waypoint-for: service}}}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{{name: mesh, port: 15008, protocol: HBONE}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: wp-0, namespace: app, labels: {{gateway.networking.k8s.io/gateway-name: wp}}}}
spec: {{serviceAccountName: wp}}
status: {{podIP: {wp}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: sleep, namespace: app, labels: {{app: sleep}}}}
spec: {{serviceAccountName: sleep}}
status: {{podIP: {sleep}}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: app, labels: {{istio.io/use-waypoint: wp}}}}
spec:
  clusterIP: {echo}
  selector: {{app: echo}}
  ports:
  - {{name: http, port: 80, targetPort: {HTTP1_PORT}}}
  - {{name: http2, port: 81, targetPort: {HTTP2_PORT}}}
  - {{name: tcp, port: 82, targetPort: {HTTP1_PORT}}}
---
apiVersion: v1
kind: Service
metadata: {{name: bypass, namespace: app}}
spec:
  clusterIP: {bypass}
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: {HTTP1_PORT}}}]
"#,
        echo = ECHO.vip.ip(),
        bypass = BYPASS.vip.ip(),
    );
    for (i, (last, name)) in BACKENDS.into_iter().enumerate() {
        let version = name.trim_start_matches("echo-");
        yaml.push_str(&format!(
            r#"---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: app, labels: {{app: echo, version: {version}}}}}
spec: {{serviceAccountName: echo}}
status: {{podIP: {ip}}}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: app}}
spec:
  clusterIP: 10.96.0.{vip}
  selector: {{version: {version}}}
  ports: [{{name: http, port: 80, targetPort: {HTTP1_PORT}}}]
"#,
            ip = ip(last),
            vip = 21 + i,
        ));
    }
    yaml
}

/// A Service as a client addresses it.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    pub host: &'static str,
    pub vip: SocketAddr,
}

pub fn identity(namespace: &str, sa: &str) -> Identity {
    Identity::new(TRUST_DOMAIN, namespace, sa)
}

/// A /24 of loopback addresses of its own per mesh: 127.<pid>.<n>.x, n counting the meshes
/// of this process (127.0.0.x is what everything else on the host uses).
fn next_subnet() -> impl Fn(u8) -> Ipv4Addr + Copy {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let a = (std::process::id() % 254) as u8 + 1;
    let b = NEXT.fetch_add(1, Ordering::Relaxed);
    move |last| Ipv4Addr::new(127, a, b, last)
}

// === impl Mesh ===

/// A running waypoint, its backends and its CA.
pub struct Mesh {
    app: AppHandle<Addrs>,
    certs: Arc<CertManager>,
    sleep_ip: Ipv4Addr,
    /// The mesh's /24: `subnet(last)` is its address ending in `last`.
    #[allow(dead_code)] // read by `upstream_tls.rs` only
    subnet: Box<dyn Fn(u8) -> Ipv4Addr + Send + Sync>,
    pool: Pool,
    _dir: tempfile::TempDir,
}

impl Mesh {
    /// The shared topology plus `yaml` (the test's policies, routes...), the backends, and
    /// the waypoint, ready.
    pub async fn start(yaml: &str) -> Result<Mesh> {
        Mesh::start_with(|_| yaml.to_string()).await
    }

    /// [`Mesh::start`] with YAML that names addresses of the mesh's own /24 (`ip(last)`),
    /// e.g. pods whose servers the test runs itself (free last octets: 10-99).
    #[allow(dead_code)] // used by `upstream_tls.rs` only
    pub async fn start_with(yaml: impl FnOnce(&dyn Fn(u8) -> Ipv4Addr) -> String) -> Result<Mesh> {
        Self::start_from(yaml, None, &[]).await
    }

    /// [`Mesh::start`] with extra waypoint flags (limits, timeouts).
    #[allow(dead_code)] // used by `in_process.rs` only
    pub async fn start_with_flags(yaml: &str, flags: &[&str]) -> Result<Mesh> {
        Self::start_from(|_| yaml.to_string(), None, flags).await
    }

    /// Like [`Mesh::start`], with the waypoint reading the same objects from `server` (a fake
    /// API server; `--config-source kube`), and ready. Sets `KUBECONFIG` for the whole
    /// process: one such mesh per test binary (`kube_policy.rs`).
    #[allow(dead_code)]
    pub async fn start_kube(server: &e2e::apiserver::FakeApiServer, yaml: &str) -> Result<Mesh> {
        let mesh = Self::start_from(|_| yaml.to_string(), Some(server), &[]).await?;
        let deadline = Instant::now() + EVENTUALLY;
        while mesh.ready().await? != 200 {
            anyhow::ensure!(Instant::now() < deadline, "the waypoint never got ready");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(mesh)
    }

    async fn start_from(
        yaml: impl FnOnce(&dyn Fn(u8) -> Ipv4Addr) -> String,
        server: Option<&e2e::apiserver::FakeApiServer>,
        flags: &[&str],
    ) -> Result<Mesh> {
        let ip = next_subnet();
        let yaml = &yaml(&ip);
        let dir = tempfile::tempdir()?;
        let (config_dir, ca_dir) = (dir.path().join("config"), dir.path().join("ca"));
        std::fs::create_dir_all(&config_dir)?;
        let mut docs = topology(ip);
        if !yaml.trim().is_empty() {
            docs.push_str("---\n");
            docs.push_str(yaml);
        }
        let kube = match server {
            None => {
                std::fs::write(config_dir.join("mesh.yaml"), docs)?;
                None
            }
            Some(server) => {
                let files = [("mesh.yaml".to_string(), docs)];
                let (_, objects) = mesh_model::k8s::load_docs_with_sources(&files)?;
                for obj in objects {
                    server.apply(serde_json::to_value(&obj.value)?)?;
                }
                Some(server.write_kubeconfig(dir.path())?)
            }
        };
        if let Some(kubeconfig) = &kube {
            std::env::set_var("KUBECONFIG", kubeconfig);
        }
        // The CA the waypoint loads from `--ca-dir`, written first so both sides share it.
        let ca = Arc::new(Ca::load_or_create(&ca_dir, TRUST_DOMAIN)?);
        let certs = CertManager::new(ca, Duration::from_secs(3600));
        for (last, name) in BACKENDS {
            Backend::start(ip(last), name).await?;
            hbone_server(ip(last), certs.clone()).await?;
        }
        let app = waypoint::app::start(
            waypoint_config(&config_dir, &ca_dir, ip(WAYPOINT), kube.is_some(), flags),
            Control::default(),
        )
        .await?;
        Ok(Mesh {
            app,
            certs,
            sleep_ip: ip(SLEEP),
            subnet: Box::new(ip),
            pool: Pool::new(PoolConfig::default()),
            _dir: dir,
        })
    }

    /// The mesh's address ending in `last` (as [`Mesh::start_with`] gave it).
    #[allow(dead_code)] // used by `upstream_tls.rs` only
    pub fn ip(&self, last: u8) -> Ipv4Addr {
        (self.subnet)(last)
    }

    /// The client pod `app/sleep` calling Service `echo`.
    pub fn sleep(&self) -> Result<Client> {
        self.client(identity("app", "sleep"))
    }

    /// A client with identity `who` (a certificate from the mesh CA), calling `echo` over
    /// HTTP/1.1.
    pub fn client(&self, who: Identity) -> Result<Client> {
        let tls = mesh_pki::tls::client_config(
            self.certs.clone(),
            who.clone(),
            vec![identity("app", "wp")],
        )?;
        Ok(self.client_with_tls(who, tls))
    }

    /// A client whose TLS the test built itself (e.g. with a foreign certificate).
    pub fn client_with_tls(&self, who: Identity, tls: Arc<rustls::ClientConfig>) -> Client {
        Client {
            pool: self.pool.clone(),
            tls,
            identity: who,
            src_ip: self.sleep_ip,
            claimed_ip: None,
            waypoint: self.app.addrs.hbone,
            target: ECHO,
            http2: false,
        }
    }

    /// The mesh's CA roots (to judge the waypoint as the mesh does).
    pub fn roots(&self) -> Arc<rustls::RootCertStore> {
        self.certs.root_store()
    }

    /// The waypoint's `/metrics`.
    pub async fn metrics(&self) -> Result<String> {
        let (status, body) = admin(self.app.addrs.endpoints.metrics, "GET", "/metrics").await?;
        anyhow::ensure!(status == 200, "/metrics: {status} {body}");
        Ok(body)
    }

    /// The sum of metric `name` over the samples with `labels`, once it reads `want` (a
    /// request is counted as its stream ends, just after the client has its response), or
    /// whatever it reads after [`EVENTUALLY`].
    pub async fn counted(&self, name: &str, labels: &[(&str, &str)], want: f64) -> Result<f64> {
        let deadline = Instant::now() + EVENTUALLY;
        loop {
            let n = e2e::prom::sum(&self.metrics().await?, name, labels);
            if n == want || Instant::now() >= deadline {
                return Ok(n);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `istio_requests_total` reported by the waypoint with `labels` (see [`Mesh::counted`]).
    pub async fn requests(&self, labels: &[(&str, &str)], want: f64) -> Result<f64> {
        let mut all = vec![("reporter", "waypoint")];
        all.extend_from_slice(labels);
        self.counted("istio_requests_total", &all, want).await
    }

    /// The waypoint's `/config_dump`.
    #[allow(dead_code)]
    pub async fn config_dump(&self) -> Result<Value> {
        let (status, body) = admin(self.app.addrs.endpoints.admin, "GET", "/config_dump").await?;
        anyhow::ensure!(status == 200, "/config_dump: {status} {body}");
        Ok(serde_json::from_str(&body)?)
    }

    /// The readiness listener's answer to `GET /healthz/ready`.
    pub async fn ready(&self) -> Result<u16> {
        Ok(
            admin(self.app.addrs.endpoints.readiness, "GET", "/healthz/ready")
                .await?
                .0,
        )
    }

    /// Stops the waypoint through its handle and waits for it to drain and end.
    pub async fn stop(self) -> Result<()> {
        drop(self.pool);
        self.app.shutdown();
        tokio::time::timeout(EVENTUALLY, self.app.join())
            .await
            .context("the waypoint drains and ends")??;
        Ok(())
    }

    pub fn hbone_addr(&self) -> SocketAddr {
        self.app.addrs.hbone
    }
}

fn waypoint_config(
    config_dir: &std::path::Path,
    ca_dir: &std::path::Path,
    ip: Ipv4Addr,
    kube: bool,
    flags: &[&str],
) -> waypoint::config::Config {
    // Every listener on the waypoint pod's address, on a port the kernel picks.
    let any = format!("{ip}:0");
    let source = if kube {
        "--config-source=kube".to_string()
    } else {
        format!("--config-dir={}", config_dir.display())
    };
    let args = waypoint::config::Args::parse_from(
        [
            "waypoint".to_string(),
            "--name=wp".to_string(),
            "--namespace=app".to_string(),
            source,
            format!("--ca-dir={}", ca_dir.display()),
            format!("--hbone-addr={any}"),
            format!("--admin-addr={any}"),
            format!("--metrics-addr={any}"),
            format!("--readiness-addr={any}"),
            "--drain-timeout=2s".to_string(),
        ]
        .into_iter()
        .chain(flags.iter().map(|f| f.to_string())),
    );
    waypoint::config::Config::from(&args)
}

/// One HTTP/1.1 request to an admin listener: status and body.
async fn admin(addr: SocketAddr, method: &str, path: &str) -> Result<(u16, String)> {
    let tcp = TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "localhost")
        .body(Empty::<Bytes>::new())?;
    let rsp = send.send_request(req).await?;
    let status = rsp.status().as_u16();
    let body = rsp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// Whether something still accepts TCP connections on `addr`.
pub async fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect(addr).await.is_ok()
}

/// `/quitquitquit` on the admin listener (the other way to stop than the handle).
pub async fn quit(mesh: &Mesh) -> Result<u16> {
    Ok(
        admin(mesh.app.addrs.endpoints.admin, "POST", "/quitquitquit")
            .await?
            .0,
    )
}

// === impl Backend ===

/// A backend pod's echo servers (HTTP/1.1 and HTTP/2). Each answers with JSON naming the
/// server, the method, path and query as received, the HTTP version and the headers. The
/// query steers the answer: `status=N`, `delay_ms=N`, and `fail_first=N&key=K` (503 for the
/// first N requests with key K at this server).
#[derive(Clone)]
struct Backend {
    name: &'static str,
    failures: Arc<Mutex<HashMap<String, u32>>>,
}

impl Backend {
    async fn start(ip: Ipv4Addr, name: &'static str) -> Result<()> {
        let backend = Backend {
            name,
            failures: Arc::default(),
        };
        for (port, http2) in [(HTTP1_PORT, false), (HTTP2_PORT, true)] {
            let addr = SocketAddr::new(ip.into(), port);
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind echo {addr}"))?;
            tokio::spawn(backend.clone().serve(listener, http2));
        }
        Ok(())
    }

    async fn serve(self, listener: TcpListener, http2: bool) {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let this = self.clone();
            let svc = service_fn(move |req| {
                let this = this.clone();
                async move { Ok::<_, Infallible>(this.answer(req).await) }
            });
            let io = TokioIo::new(tcp);
            if http2 {
                let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(io, svc);
                tokio::spawn(conn);
            } else {
                let conn = hyper::server::conn::http1::Builder::new().serve_connection(io, svc);
                tokio::spawn(conn);
            }
        }
    }

    async fn answer(
        &self,
        req: http::Request<hyper::body::Incoming>,
    ) -> http::Response<Full<Bytes>> {
        let query: BTreeMap<&str, &str> = req
            .uri()
            .query()
            .unwrap_or_default()
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .collect();
        let number = |k: &str| query.get(k).and_then(|v| v.parse::<u64>().ok());
        if let Some(ms) = number("delay_ms") {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        let mut status = number("status").unwrap_or(200) as u16;
        if let (Some(n), Some(key)) = (number("fail_first"), query.get("key")) {
            let mut failures = self.failures.lock().unwrap_or_else(|e| e.into_inner());
            let seen = failures.entry(key.to_string()).or_default();
            *seen += 1;
            if u64::from(*seen) <= n {
                status = 503;
            }
        }
        let headers: BTreeMap<&str, &str> = req
            .headers()
            .iter()
            .map(|(k, v)| (k.as_str(), v.to_str().unwrap_or("<binary>")))
            .collect();
        let body = json!({
            "server": self.name,
            "method": req.method().as_str(),
            "path": req.uri().path_and_query().map_or("", |p| p.as_str()),
            "version": format!("{:?}", req.version()),
            "headers": headers,
        });
        let mut rsp = http::Response::new(Full::new(Bytes::from(body.to_string())));
        *rsp.status_mut() = http::StatusCode::from_u16(status).unwrap_or_default();
        rsp
    }
}

/// The node agent in front of a backend pod: HBONE on `<ip>:15008` as `app/echo`, each
/// tunnel relayed to the `:authority` it names.
async fn hbone_server(ip: Ipv4Addr, certs: Arc<CertManager>) -> Result<()> {
    let addr = SocketAddr::new(ip.into(), HBONE_PORT);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind hbone {addr}"))?;
    let tls = mesh_pki::tls::server_config(certs, identity("app", "echo"))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let cfg = mesh_hbone::ServerConfig::default();
                let _ = mesh_hbone::serve(tls, &cfg, |req| async move {
                    let Ok(target) = req.authority() else {
                        return;
                    };
                    let Ok(mut upstream) = dial(target).await else {
                        req.reject(http::StatusCode::SERVICE_UNAVAILABLE);
                        return;
                    };
                    if let Ok(mut tunnel) = req.accept() {
                        let _ = tokio::io::copy_bidirectional(&mut tunnel, &mut upstream).await;
                    }
                })
                .await;
            });
        }
    });
    Ok(())
}

// === impl Client ===

/// The node agent in front of a client pod: each request goes in a tunnel of its own (one
/// pooled HBONE connection per identity) to a Service through the waypoint.
#[derive(Clone)]
pub struct Client {
    pool: Pool,
    tls: Arc<rustls::ClientConfig>,
    identity: Identity,
    src_ip: Ipv4Addr,
    /// The address the CONNECT's `forwarded` header claims, when not `src_ip` (a peer
    /// lying about its client).
    claimed_ip: Option<Ipv4Addr>,
    waypoint: SocketAddr,
    target: Target,
    http2: bool,
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: String,
}

impl Reply {
    /// The echo's JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body)
            .with_context(|| format!("{}: not an echo reply: {:?}", self.status, self.body))
    }

    /// The backend pod that answered (`echo-v1`, `echo-v2`).
    pub fn server(&self) -> Result<String> {
        let reply = self.json()?;
        reply["server"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no server in {reply}"))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

impl Client {
    /// The same client calling `target` instead.
    pub fn to(mut self, target: Target) -> Client {
        self.target = target;
        self
    }

    /// The same client, its CONNECTs claiming (`forwarded: for=`) to come from `ip`.
    pub fn claiming(mut self, ip: Ipv4Addr) -> Client {
        self.claimed_ip = Some(ip);
        self
    }

    /// The same client speaking HTTP/2 (prior knowledge) in its tunnels.
    pub fn http2(mut self) -> Client {
        self.http2 = true;
        self
    }

    /// A CONNECT to the target's VIP through the waypoint.
    pub async fn tunnel(&self) -> Result<H2Stream, HboneError> {
        let key = PoolKey {
            src: self.identity.clone(),
            src_ip: self.src_ip.into(),
            dst: identity("app", "wp"),
            dst_addr: self.waypoint,
        };
        let headers = ConnectHeaders {
            src_ip: self.claimed_ip.unwrap_or(self.src_ip).into(),
            service_host: Some(self.target.host.into()),
            baggage: vec![],
            traceparent: None,
        };
        let waypoint = self.waypoint;
        self.pool
            .connect(
                key,
                self.tls.clone(),
                move || dial(waypoint),
                connect_request(self.target.vip, &headers),
            )
            .await
    }

    /// `GET <target>`.
    pub async fn get(&self, target: &str) -> Result<Reply> {
        self.send("GET", target, &[]).await
    }

    /// `GET <target>` with `headers`.
    pub async fn get_with(&self, target: &str, headers: &[(&str, &str)]) -> Result<Reply> {
        self.send("GET", target, headers).await
    }

    /// One request in a tunnel of its own; `target` is sent exactly as written.
    pub async fn send(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Result<Reply> {
        let tunnel = self
            .tunnel()
            .await
            .with_context(|| format!("tunnel to {:?} through the waypoint", self.target))?;
        let io = TokioIo::new(tunnel);
        let uri = if self.http2 {
            format!("http://{}{target}", self.target.host)
        } else {
            target.to_string()
        };
        let mut req = http::Request::builder().method(method).uri(uri);
        if !self.http2 {
            req = req.header(http::header::HOST, self.target.host);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req.body(Empty::<Bytes>::new())?;
        let rsp = if self.http2 {
            let (mut send, conn) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(conn);
            tokio::time::timeout(EVENTUALLY, send.send_request(req)).await
        } else {
            let (mut send, conn) = hyper::client::conn::http1::handshake(io).await?;
            tokio::spawn(conn);
            tokio::time::timeout(EVENTUALLY, send.send_request(req)).await
        };
        let rsp = rsp.context("response in time")??;
        let (parts, body) = rsp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }

    /// `GET <target>` `n` times: how many each backend answered (a request that is not a 200
    /// from a backend fails).
    pub async fn spread(
        &self,
        n: usize,
        target: &str,
        headers: &[(&str, &str)],
    ) -> Result<BTreeMap<String, usize>> {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let reply = self.get_with(target, headers).await?;
            anyhow::ensure!(reply.status == 200, "{target}: {reply:?}");
            *counts.entry(reply.server()?).or_default() += 1;
        }
        Ok(counts)
    }
}

/// A TCP connection without Nagle's delay (request-response traffic in small writes).
async fn dial(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
}
