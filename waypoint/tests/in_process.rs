//! The whole waypoint in this process, on loopback, without root or namespaces: a CA in a
//! temp dir, a YAML config dir, `waypoint::app::start`, and the test playing both the node
//! agents around it: a client that tunnels into the waypoint over real HBONE (mTLS as
//! `app/sleep`), and the backends' HBONE servers (`<pod-ip>:15008`, mTLS as `app/echo`)
//! that relay each tunnel to an HTTP echo on the pod's IP. Each pod gets its own 127.x.y.z
//! address, so parallel runs do not collide.

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Empty, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_hbone::{connect_request, ConnectHeaders, Pool, PoolConfig, PoolKey, HBONE_PORT};
use mesh_model::identity::Identity;
use mesh_pki::ca::Ca;
use mesh_pki::certs::CertManager;
use mesh_shell::admin::Control;
use tokio::net::{TcpListener, TcpStream};
use tracing::info;

const TRUST_DOMAIN: &str = "cluster.local";
/// Bound on anything that should happen promptly.
const EVENTUALLY: Duration = Duration::from_secs(10);

/// The mesh: the waypoint `app/wp` serves Service `app/echo`, whose HTTPRoute sends
/// `/public/v2...` to Service `app/echo-v2` and the rest to `echo`; only `/public/*` is
/// allowed by L7 AuthorizationPolicy.
fn mesh_yaml(ip: impl Fn(u8) -> Ipv4Addr) -> String {
    let (wp, sleep, v1, v2) = (ip(WAYPOINT), ip(SLEEP), ip(ECHO_V1), ip(ECHO_V2));
    format!(
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
kind: Pod
metadata: {{name: echo-v1, namespace: app, labels: {{app: echo, version: v1}}}}
spec: {{serviceAccountName: echo}}
status: {{podIP: {v1}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: echo-v2, namespace: app, labels: {{app: echo-v2, version: v2}}}}
spec: {{serviceAccountName: echo}}
status: {{podIP: {v2}}}
---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: app, labels: {{istio.io/use-waypoint: wp}}}}
spec:
  clusterIP: 10.96.0.20
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: {ECHO_PORT}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: echo-v2, namespace: app}}
spec:
  clusterIP: 10.96.0.21
  selector: {{app: echo-v2}}
  ports: [{{name: http, port: 80, targetPort: {ECHO_PORT}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo, namespace: app}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo, port: 80}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /public/v2}}}}]
    backendRefs: [{{name: echo-v2, port: 80}}]
  - backendRefs: [{{name: echo, port: 80}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: public-only, namespace: app}}
spec:
  targetRefs: [{{kind: Service, group: "", name: echo}}]
  action: ALLOW
  rules: [{{to: [{{operation: {{paths: ["/public/*"]}}}}]}}]
"#
    )
}

/// The last octet of each pod's address.
const WAYPOINT: u8 = 100;
const SLEEP: u8 = 1;
const ECHO_V1: u8 = 2;
const ECHO_V2: u8 = 3;
const ECHO_PORT: u16 = 8080;
const ECHO_VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 20)), 80);

/// A /24 of loopback addresses for this run: 127.<pid>.<pid>.x.
fn pod_ip_fn() -> impl Fn(u8) -> Ipv4Addr + Copy {
    let pid = std::process::id();
    let (a, b) = (((pid >> 8) & 0xff) as u8, (pid & 0xff) as u8);
    // 127.0.0.x is what everything else on the host uses.
    let a = a.max(1);
    move |last| Ipv4Addr::new(127, a, b, last)
}

fn identity(sa: &str) -> Identity {
    Identity::new(TRUST_DOMAIN, "app", sa)
}

/// An HTTP/1.1 echo on `addr` answering `<name> <path>`.
async fn echo(addr: SocketAddr, name: &'static str) -> Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind echo {addr}"))?;
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = service_fn(
                move |req: http::Request<hyper::body::Incoming>| async move {
                    let body = format!("{name} {}", req.uri().path());
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
                },
            );
            tokio::spawn(
                hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    Ok(())
}

/// The node agent in front of a backend pod: HBONE on `<ip>:15008` as `app/echo`, each
/// tunnel relayed to the `:authority` it names.
async fn hbone_server(ip: Ipv4Addr, certs: Arc<CertManager>) -> Result<()> {
    let addr = SocketAddr::new(ip.into(), HBONE_PORT);
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("bind hbone {addr}"))?;
    let tls = mesh_pki::tls::server_config(certs, identity("echo"))?;
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let cfg = mesh_hbone::ServerConfig::default();
                let _ = mesh_hbone::serve(tls, &cfg, |req| async move {
                    let Ok(target) = req.authority() else {
                        return;
                    };
                    let Ok(mut upstream) = TcpStream::connect(target).await else {
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

/// The node agent in front of `app/sleep`: tunnels to the waypoint as the sleep pod.
struct Client {
    pool: Pool,
    tls: Arc<rustls::ClientConfig>,
    src_ip: Ipv4Addr,
    waypoint: SocketAddr,
}

impl Client {
    /// `GET <path>` to the echo Service through the waypoint: status and body.
    async fn get(&self, path: &str) -> Result<(u16, String)> {
        let key = PoolKey {
            src: identity("sleep"),
            src_ip: self.src_ip.into(),
            dst: identity("wp"),
            dst_addr: self.waypoint,
        };
        let headers = ConnectHeaders {
            src_ip: self.src_ip.into(),
            service_host: Some("echo.app.svc.cluster.local".into()),
            baggage: vec![],
            traceparent: None,
        };
        let waypoint = self.waypoint;
        let tunnel = self
            .pool
            .connect(
                key,
                self.tls.clone(),
                move || TcpStream::connect(waypoint),
                connect_request(ECHO_VIP, &headers),
            )
            .await
            .context("tunnel to the waypoint")?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tunnel)).await?;
        tokio::spawn(conn);
        let req = http::Request::get(path)
            .header(http::header::HOST, "echo.app.svc.cluster.local")
            .body(Empty::<Bytes>::new())?;
        let rsp = tokio::time::timeout(EVENTUALLY, send.send_request(req))
            .await
            .context("response in time")??;
        let status = rsp.status().as_u16();
        let body = rsp.into_body().collect().await?.to_bytes();
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

fn waypoint_config(config_dir: &Path, ca_dir: &Path, ip: Ipv4Addr) -> waypoint::config::Config {
    // Every listener on the waypoint pod's address, on a port the kernel picks.
    let any = format!("{ip}:0");
    let args = waypoint::config::Args::parse_from([
        "waypoint",
        "--name=wp",
        "--namespace=app",
        &format!("--config-dir={}", config_dir.display()),
        &format!("--ca-dir={}", ca_dir.display()),
        &format!("--hbone-addr={any}"),
        &format!("--admin-addr={any}"),
        &format!("--metrics-addr={any}"),
        &format!("--readiness-addr={any}"),
    ]);
    waypoint::config::Config::from(&args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_and_routes_apply_to_requests_through_the_waypoint_in_process() -> Result<()> {
    let ip = pod_ip_fn();
    let dir = tempfile::tempdir()?;
    let (config_dir, ca_dir) = (dir.path().join("config"), dir.path().join("ca"));
    std::fs::create_dir_all(&config_dir)?;
    std::fs::write(config_dir.join("mesh.yaml"), mesh_yaml(ip))?;
    // The CA the waypoint loads from `--ca-dir`, written first so both sides share it.
    let ca = Arc::new(Ca::load_or_create(&ca_dir, TRUST_DOMAIN)?);
    let certs = CertManager::new(ca, Duration::from_secs(3600));

    info!("backends: an echo per pod, behind an HBONE server on the pod's address");
    for (last, name) in [(ECHO_V1, "v1"), (ECHO_V2, "v2")] {
        echo(SocketAddr::new(ip(last).into(), ECHO_PORT), name).await?;
        hbone_server(ip(last), certs.clone()).await?;
    }

    info!("the waypoint, started in this process");
    let app = waypoint::app::start(
        waypoint_config(&config_dir, &ca_dir, ip(WAYPOINT)),
        Control::default(),
    )
    .await?;
    let client = Client {
        pool: Pool::new(PoolConfig::default()),
        tls: mesh_pki::tls::client_config(certs, identity("sleep"), vec![identity("wp")])?,
        src_ip: ip(SLEEP),
        waypoint: app.addrs.hbone,
    };

    info!("a path the AuthorizationPolicy allows reaches echo (the route's catch-all rule)");
    assert_eq!(client.get("/public/a").await?, (200, "v1 /public/a".into()));
    info!("a path it does not allow is denied by the waypoint");
    let (status, _) = client.get("/private").await?;
    assert_eq!(status, 403);
    info!("the HTTPRoute's /public/v2 rule sends the request to echo-v2");
    assert_eq!(
        client.get("/public/v2/b").await?,
        (200, "v2 /public/v2/b".into())
    );

    info!("the admin endpoints answer on the bound addresses; /quitquitquit drains the waypoint");
    let ready = admin(app.addrs.endpoints.readiness, "GET", "/healthz/ready").await?;
    assert_eq!(ready.0, 200, "{}", ready.1);
    let quit = admin(app.addrs.endpoints.admin, "POST", "/quitquitquit").await?;
    assert_eq!(quit.0, 200);
    tokio::time::timeout(EVENTUALLY, app.join())
        .await
        .context("the waypoint drains and ends")??;
    Ok(())
}

/// One HTTP/1.1 request to an admin listener.
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
    if status >= 500 {
        bail!("{path}: {status}");
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
