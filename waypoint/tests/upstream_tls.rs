//! DestinationRule `tls` at the waypoint, in process (see `support`): `SIMPLE` and `MUTUAL`
//! originate TLS to a backend that serves HTTPS — a pod outside the mesh (plain TCP, then
//! TLS) or in it (TLS inside the HBONE tunnel) — with the server checked against the rule's
//! CA and names; every failure is a `503 UF` that names its reason; `ISTIO_MUTUAL` changes
//! nothing and keeps the rule's subsets. The backends are real rustls servers on the mesh's
//! loopback addresses that report what each connection carried (`e2e::tls::describe`).
//! `cargo test -p waypoint --test upstream_tls`.

#[allow(dead_code)]
mod support;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use bytes::Bytes;
use e2e::tls::{server_config, Leaf, TestCa};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use support::{Mesh, Target, ECHO};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::info;

/// Service `secure` (port 443 `https`-free name `http`, 8443 on the pod), through the
/// waypoint; its one pod `secure-0` at `.10` is not in the mesh.
const SECURE: Target = Target {
    host: "secure.app.svc.cluster.local",
    vip: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 40)), 443),
};
/// Port 444 of `secure`: declared `http2`.
const SECURE_H2: Target = Target {
    host: "secure.app.svc.cluster.local",
    vip: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 40)), 444),
};
/// Port 445 of `secure`: declared `tcp`, so the waypoint relays the client's bytes.
const SECURE_TCP: Target = Target {
    host: "secure.app.svc.cluster.local",
    vip: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 40)), 445),
};
/// Service `inmesh`: port 443 of pod `echo-v1` (in the mesh), 8443 on the pod.
const IN_MESH: Target = Target {
    host: "inmesh.app.svc.cluster.local",
    vip: SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 41)), 443),
};
const SECURE_POD: u8 = 10;
/// `echo-v1`'s last octet (see `support`).
const ECHO_V1_POD: u8 = 2;
const TLS_PORT: u16 = 8443;

/// Pod `secure-0` (opted out of the mesh) and Services `secure` and `inmesh`, then `rule`.
fn topology(ip: &dyn Fn(u8) -> Ipv4Addr, rule: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: secure-0, namespace: app, labels: {{app: secure, istio.io/dataplane-mode: none}}}}
spec: {{serviceAccountName: secure}}
status: {{podIP: {pod}}}
---
apiVersion: v1
kind: Service
metadata: {{name: secure, namespace: app, labels: {{istio.io/use-waypoint: wp}}}}
spec:
  clusterIP: {secure}
  selector: {{app: secure}}
  ports:
  - {{name: http, port: 443, targetPort: {TLS_PORT}}}
  - {{name: http2, port: 444, targetPort: {TLS_PORT}}}
  - {{name: tcp, port: 445, targetPort: {TLS_PORT}}}
---
apiVersion: v1
kind: Service
metadata: {{name: inmesh, namespace: app, labels: {{istio.io/use-waypoint: wp}}}}
spec:
  clusterIP: {inmesh}
  selector: {{version: v1}}
  ports: [{{name: http, port: 443, targetPort: {TLS_PORT}}}]
---
{rule}"#,
        pod = ip(SECURE_POD),
        secure = SECURE.vip.ip(),
        inmesh = IN_MESH.vip.ip(),
    )
}

/// A DestinationRule for Service `host` with `tls` (a YAML flow mapping).
fn rule(host: &str, tls: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: {host}-tls, namespace: app}}
spec:
  host: {host}
  trafficPolicy:
    tls: {tls}
"#
    )
}

/// The certificates of a test: the backend's CA, a CA nobody trusts, the server's leaf and
/// the waypoint's client leaf, in a temp dir.
struct Pki {
    dir: tempfile::TempDir,
    ca: TestCa,
    server: Leaf,
    client: Leaf,
}

impl Pki {
    /// The server leaf names `names`.
    fn new(names: &[&str]) -> Result<Pki> {
        let dir = tempfile::tempdir()?;
        let ca = TestCa::new(dir.path(), "backend")?;
        let server = ca.issue(names, false)?;
        let client = ca.issue(&["waypoint.client.test"], true)?;
        Ok(Pki {
            dir,
            ca,
            server,
            client,
        })
    }

    fn ca(&self) -> String {
        self.ca.cert.display().to_string()
    }

    fn path(&self, file: &Path) -> String {
        file.display().to_string()
    }
}

/// An HTTPS server on `addr` (HTTP/1.1 or HTTP/2 as ALPN says) whose replies are
/// `{"server": "tls-backend", "tls": describe(...)}`; counts completed handshakes.
struct TlsBackend {
    handshakes: Arc<AtomicUsize>,
}

impl TlsBackend {
    async fn start(addr: SocketAddr, leaf: &Leaf, client_ca: Option<&Path>) -> Result<TlsBackend> {
        let config = server_config(leaf, client_ca, &[b"h2", b"http/1.1"])?;
        let acceptor = TlsAcceptor::from(config);
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind {addr}"))?;
        let handshakes = Arc::new(AtomicUsize::new(0));
        let counted = handshakes.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, counted) = (acceptor.clone(), counted.clone());
                tokio::spawn(async move {
                    let tls = match acceptor.accept(tcp).await {
                        Ok(tls) => tls,
                        Err(e) => {
                            info!(error = %e, "backend refused a tls handshake");
                            return;
                        }
                    };
                    counted.fetch_add(1, Ordering::Relaxed);
                    let info = e2e::tls::describe(tls.get_ref().1);
                    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
                    let svc = service_fn(move |_req: http::Request<hyper::body::Incoming>| {
                        let body = json!({"server": "tls-backend", "tls": info.clone()});
                        async move {
                            Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                                body.to_string(),
                            ))))
                        }
                    });
                    let io = TokioIo::new(tls);
                    if h2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .await;
                    }
                });
            }
        });
        Ok(TlsBackend { handshakes })
    }

    fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::Relaxed)
    }
}

/// A mesh with `rule` (given the PKI) and the backend of `secure-0` serving `pki.server`
/// (requiring a client certificate of the backend CA when `mutual_server`).
async fn mesh(pki: &Pki, rule: String, mutual_server: bool) -> Result<(Mesh, TlsBackend)> {
    let mesh = Mesh::start_with(|ip| topology(ip, &rule)).await?;
    let addr = SocketAddr::new(mesh.ip(SECURE_POD).into(), TLS_PORT);
    let client_ca = mutual_server.then_some(pki.ca.cert.as_path());
    let backend = TlsBackend::start(addr, &pki.server, client_ca).await?;
    Ok((mesh, backend))
}

/// The `tls` the backend reported.
fn tls_seen(body: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(body).with_context(|| format!("not json: {body}"))?;
    anyhow::ensure!(v["server"] == "tls-backend", "not the tls backend: {v}");
    Ok(v["tls"].clone())
}

/// One `503 UF` whose body is Envoy's and whose reason (in the metrics' flag) is `UF`.
async fn fails_with_uf(mesh: &Mesh, target: Target) -> Result<()> {
    let reply = mesh.sleep()?.to(target).get("/").await?;
    assert_eq!(reply.status, 503, "{reply:?}");
    assert!(reply.body.contains("upstream connect error"), "{reply:?}");
    let n = mesh
        .requests(&[("response_flags", "UF"), ("response_code", "503")], 1.0)
        .await?;
    assert_eq!(n, 1.0, "one request counted with UF");
    Ok(())
}

#[tokio::test]
async fn simple_reaches_an_https_backend_outside_the_mesh_and_reuses_the_connection() -> Result<()>
{
    let pki = Pki::new(&["secure.app.svc.cluster.local"])?;
    let rule = rule(
        "secure",
        &format!("{{mode: SIMPLE, caCertificates: {}}}", pki.ca()),
    );
    let (mesh, backend) = mesh(&pki, rule, false).await?;
    let client = mesh.sleep()?.to(SECURE);
    for _ in 0..3 {
        let reply = client.get("/").await?;
        assert_eq!(reply.status, 200, "{reply:?}");
        let tls = tls_seen(&reply.body)?;
        // No sni in the rule: the Service's host name; ALPN of an HTTP/1.1 port.
        assert_eq!(tls["sni"], "secure.app.svc.cluster.local", "{tls}");
        assert_eq!(tls["alpn"], "http/1.1", "{tls}");
        assert_eq!(tls["client_names"], json!([]), "{tls}");
    }
    assert_eq!(
        backend.handshakes(),
        1,
        "the pooled TLS connection is reused"
    );
    Ok(())
}

#[tokio::test]
async fn sni_and_subject_alt_names_come_from_the_rule() -> Result<()> {
    let pki = Pki::new(&["api.example.test"])?;
    let rule = rule(
        "secure",
        &format!(
            "{{mode: SIMPLE, sni: api.example.test, subjectAltNames: [other.example.test, api.example.test], caCertificates: {}}}",
            pki.ca()
        ),
    );
    let (mesh, _backend) = mesh(&pki, rule, false).await?;
    let reply = mesh.sleep()?.to(SECURE).get("/").await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(tls_seen(&reply.body)?["sni"], "api.example.test");
    Ok(())
}

#[tokio::test]
async fn a_server_certificate_without_the_expected_name_fails_with_uf() -> Result<()> {
    let pki = Pki::new(&["secure.app.svc.cluster.local"])?;
    let rule = rule(
        "secure",
        &format!(
            "{{mode: SIMPLE, subjectAltNames: [other.example.test], caCertificates: {}}}",
            pki.ca()
        ),
    );
    let (mesh, backend) = mesh(&pki, rule, false).await?;
    fails_with_uf(&mesh, SECURE).await?;
    assert_eq!(backend.handshakes(), 0);
    Ok(())
}

#[tokio::test]
async fn a_server_certificate_from_an_unknown_ca_fails_with_uf() -> Result<()> {
    let pki = Pki::new(&["secure.app.svc.cluster.local"])?;
    let stranger = TestCa::new(pki.dir.path(), "stranger")?;
    let rule = rule(
        "secure",
        &format!(
            "{{mode: SIMPLE, caCertificates: {}}}",
            stranger.cert.display()
        ),
    );
    let (mesh, _backend) = mesh(&pki, rule, false).await?;
    fails_with_uf(&mesh, SECURE).await
}

#[tokio::test]
async fn insecure_skip_verify_accepts_any_server_certificate() -> Result<()> {
    let pki = Pki::new(&["not-the-service.example.test"])?;
    let rule = rule("secure", "{mode: SIMPLE, insecureSkipVerify: true}");
    let (mesh, _backend) = mesh(&pki, rule, false).await?;
    let reply = mesh.sleep()?.to(SECURE).get("/").await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    tls_seen(&reply.body)?;
    Ok(())
}

#[tokio::test]
async fn without_ca_certificates_simple_fails_closed() -> Result<()> {
    let pki = Pki::new(&["secure.app.svc.cluster.local"])?;
    let rule = rule("secure", "{mode: SIMPLE}");
    let (mesh, backend) = mesh(&pki, rule, false).await?;
    fails_with_uf(&mesh, SECURE).await?;
    assert_eq!(backend.handshakes(), 0, "no connection without roots");
    Ok(())
}

#[tokio::test]
async fn mutual_presents_the_client_certificate_the_server_checks() -> Result<()> {
    let pki = Pki::new(&["secure.app.svc.cluster.local"])?;
    let rule = rule(
        "secure",
        &format!(
            "{{mode: MUTUAL, caCertificates: {}, clientCertificate: {}, privateKey: {}}}",
            pki.ca(),
            pki.path(&pki.client.cert),
            pki.path(&pki.client.key)
        ),
    );
    let (mesh, _backend) = mesh(&pki, rule, true).await?;
    let reply = mesh.sleep()?.to(SECURE).get("/").await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        tls_seen(&reply.body)?["client_names"],
        json!(["waypoint.client.test"])
    );
    Ok(())
}

#[tokio::test]
async fn a_server_that_requires_a_client_certificate_refuses_simple_with_uf() -> Result<()> {
    let pki = Pki::new(&["secure.app.svc.cluster.local"])?;
    let rule = rule(
        "secure",
        &format!("{{mode: SIMPLE, caCertificates: {}}}", pki.ca()),
    );
    let (mesh, backend) = mesh(&pki, rule, true).await?;
    fails_with_uf(&mesh, SECURE).await?;
    assert_eq!(backend.handshakes(), 0);
    Ok(())
}

#[tokio::test]
async fn unreadable_tls_files_fail_only_that_cluster() -> Result<()> {
    let pki = Pki::new(&["secure.app.svc.cluster.local"])?;
    let missing = pki.dir.path().join("missing-ca.pem");
    let rule = rule(
        "secure",
        &format!("{{mode: SIMPLE, caCertificates: {}}}", missing.display()),
    );
    let (mesh, backend) = mesh(&pki, rule, false).await?;
    fails_with_uf(&mesh, SECURE).await?;
    assert_eq!(backend.handshakes(), 0);
    // The rest of the model is in force.
    let reply = mesh.sleep()?.to(ECHO).get("/").await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    Ok(())
}

#[tokio::test]
async fn an_http2_port_offers_h2() -> Result<()> {
    let pki = Pki::new(&["secure.app.svc.cluster.local"])?;
    let rule = rule(
        "secure",
        &format!("{{mode: SIMPLE, caCertificates: {}}}", pki.ca()),
    );
    let (mesh, _backend) = mesh(&pki, rule, false).await?;
    let reply = mesh.sleep()?.to(SECURE_H2).get("/").await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(tls_seen(&reply.body)?["alpn"], "h2");
    Ok(())
}

#[tokio::test]
async fn simple_to_an_endpoint_in_the_mesh_runs_inside_the_hbone_tunnel() -> Result<()> {
    let pki = Pki::new(&["inmesh.app.svc.cluster.local"])?;
    let rule = rule(
        "inmesh",
        &format!("{{mode: SIMPLE, caCertificates: {}}}", pki.ca()),
    );
    let mesh = Mesh::start_with(|ip| topology(ip, &rule)).await?;
    // The in-mesh pod's HBONE server relays each tunnel to the address it names: the TLS
    // server listens beside the pod's plain echo servers.
    let addr = SocketAddr::new(mesh.ip(ECHO_V1_POD).into(), TLS_PORT);
    let backend = TlsBackend::start(addr, &pki.server, None).await?;
    let reply = mesh.sleep()?.to(IN_MESH).get("/").await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        tls_seen(&reply.body)?["sni"],
        "inmesh.app.svc.cluster.local"
    );
    assert_eq!(backend.handshakes(), 1);
    let n = mesh
        .requests(
            &[
                ("response_code", "200"),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/app/sa/echo",
                ),
            ],
            1.0,
        )
        .await?;
    assert_eq!(n, 1.0, "the request reached the pod over HBONE as app/echo");
    Ok(())
}

#[tokio::test]
async fn istio_mutual_changes_nothing_and_keeps_the_subsets() -> Result<()> {
    let yaml = r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: app}
spec:
  host: echo
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: app}
spec:
  hosts: [echo.app.svc.cluster.local]
  http:
  - route: [{destination: {host: echo.app.svc.cluster.local, subset: v2}}]
"#;
    let mesh = Mesh::start(yaml).await?;
    let spread = mesh.sleep()?.spread(6, "/", &[]).await?;
    assert_eq!(spread.keys().collect::<Vec<_>>(), ["echo-v2"], "{spread:?}");
    Ok(())
}

#[tokio::test]
async fn mirrored_copies_originate_the_mirror_services_tls() -> Result<()> {
    let pki = Pki::new(&["secure.app.svc.cluster.local"])?;
    let rules = format!(
        r#"{}---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: app}}
spec:
  hosts: [echo.app.svc.cluster.local]
  http:
  - route: [{{destination: {{host: echo.app.svc.cluster.local}}}}]
    mirror: {{host: secure.app.svc.cluster.local, port: {{number: 443}}}}
    mirrorPercentage: {{value: 100}}
"#,
        rule(
            "secure",
            &format!("{{mode: SIMPLE, caCertificates: {}}}", pki.ca())
        )
    );
    let (mesh, backend) = mesh(&pki, rules, false).await?;
    let reply = mesh.sleep()?.to(ECHO).get("/mirrored").await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    let sent = mesh
        .counted("waypoint_mirror_requests_total", &[("result", "sent")], 1.0)
        .await?;
    assert_eq!(sent, 1.0, "the copy was answered");
    assert_eq!(backend.handshakes(), 1, "the copy went over TLS");
    Ok(())
}

/// A port the waypoint relays as TCP originates TLS too, offering no ALPN (the bytes inside
/// are the client's own); a server certificate from an unknown CA refuses the CONNECT with
/// `503` before any byte is relayed.
#[tokio::test]
async fn a_tcp_port_originates_tls_without_alpn() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let pki = Pki::new(&["secure.app.svc.cluster.local"])?;
    let simple = rule(
        "secure",
        &format!("{{mode: SIMPLE, caCertificates: {}}}", pki.ca()),
    );
    let (first, backend) = mesh(&pki, simple, false).await?;
    let mut tunnel = first.sleep()?.to(SECURE_TCP).tunnel().await?;
    tunnel
        .write_all(b"GET / HTTP/1.1\r\nhost: secure\r\nconnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(support::EVENTUALLY, tunnel.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    let body = answer.split("\r\n\r\n").nth(1).context("no body")?;
    let tls = tls_seen(body)?;
    assert_eq!(tls["sni"], "secure.app.svc.cluster.local", "{tls}");
    assert!(tls["alpn"].is_null(), "no ALPN on a tcp port: {tls}");
    assert_eq!(backend.handshakes(), 1);
    drop(first);

    let stranger = TestCa::new(pki.dir.path(), "stranger")?;
    let untrusted = rule(
        "secure",
        &format!(
            "{{mode: SIMPLE, caCertificates: {}}}",
            stranger.cert.display()
        ),
    );
    let (mesh, backend) = mesh(&pki, untrusted, false).await?;
    match mesh.sleep()?.to(SECURE_TCP).tunnel().await {
        Err(mesh_hbone::HboneError::Status(s)) => assert_eq!(s.as_u16(), 503),
        Err(e) => anyhow::bail!("refused, but not with 503: {e}"),
        Ok(_) => anyhow::bail!("relayed to a server whose certificate nobody vouches for"),
    }
    assert_eq!(backend.handshakes(), 0);
    Ok(())
}
