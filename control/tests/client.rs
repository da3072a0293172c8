//! The agents' side of the CA: `mesh_pki::certs::CertManager` in remote mode against the real
//! CA in process. No signing key on the client; identities wait (with the CA's reason) until
//! their certificate arrives; renewals go through the CA; a CA that is down delays, never
//! breaks, what already works.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_pki::certs::CertManager;
use support::{id, Ca};
use tokio_util::sync::CancellationToken;

/// Polls `cond` every 50 ms until it holds or `within` passes.
async fn eventually(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

fn manager(ca: &Ca, token: &std::path::Path, ttl: Duration, impersonate: bool) -> Arc<CertManager> {
    let roots = ca.roots.roots.len();
    assert_eq!(roots, 1);
    let root_ders = mesh_pki::ca::Ca::load_or_create(&ca.dir.path().join("ca"), "cluster.local")
        .unwrap()
        .roots();
    CertManager::remote(
        ca.client(token),
        "cluster.local",
        ttl,
        impersonate,
        root_ders,
    )
}

#[tokio::test]
async fn an_identity_is_pending_until_the_ca_issues_it() {
    let ca = Ca::start(&[]).await;
    let certs = manager(
        &ca,
        &ca.token("istio-system", "ztunnel", Some("n1")),
        Duration::from_secs(3600),
        true,
    );
    let stop = CancellationToken::new();
    tokio::spawn(certs.clone().run_rotation(stop.clone()));
    let web = id("demo", "web");
    // Before the CA answered, a handshake for it is refused (nothing to sign with here).
    assert!(certs.certified_key(&web).is_err());
    assert!(eventually(Duration::from_secs(5), || certs.has_all([&web])).await);
    assert!(certs.certified_key(&web).is_ok());
    assert!(certs.pending().is_empty());
    stop.cancel();
}

#[tokio::test]
async fn a_pod_on_another_node_stays_pending_with_the_cas_reason() {
    let ca = Ca::start(&[]).await;
    let certs = manager(
        &ca,
        &ca.token("istio-system", "ztunnel", Some("n1")),
        Duration::from_secs(3600),
        true,
    );
    let stop = CancellationToken::new();
    tokio::spawn(certs.clone().run_rotation(stop.clone()));
    let db = id("demo", "db");
    certs.want(&db);
    let reason = || {
        certs
            .pending()
            .first()
            .and_then(|p| p.last_error.clone())
            .unwrap_or_default()
    };
    assert!(
        eventually(Duration::from_secs(5), || reason() == "no_such_pod_on_node").await,
        "{:?}",
        certs.pending()
    );
    assert!(certs.certified_key(&db).is_err());
    // Forgetting it (the pod left) clears it.
    certs.forget(&db);
    assert!(certs.pending().is_empty());
    stop.cancel();
}

#[tokio::test]
async fn certificates_renew_through_the_ca_and_survive_a_ca_outage() {
    // A port for the CA, chosen now so that the CA can come back on it.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let ca = Ca::start(&["--grpc-addr", &addr]).await;
    let token = ca.token("demo", "web", None);
    let certs = manager(&ca, &token, Duration::from_secs(4), false);
    let stop = CancellationToken::new();
    tokio::spawn(certs.clone().run_rotation(stop.clone()));
    let web = id("demo", "web");
    certs.want(&web);
    assert!(eventually(Duration::from_secs(5), || certs.has_all([&web])).await);
    let serial = |c: &CertManager| {
        c.dump()
            .first()
            .map(|s| s.serial.clone())
            .unwrap_or_default()
    };
    let first = serial(&certs);
    // Renewed at half-life (2 s), through the CA.
    assert!(eventually(Duration::from_secs(6), || serial(&certs) != first).await);

    // The CA goes away: the current certificate keeps serving while renewals fail.
    let dir = ca.dir;
    ca.app.shutdown();
    ca.app.join().await.unwrap();
    let before = serial(&certs);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        certs.certified_key(&web).is_ok(),
        "the current certificate still serves"
    );
    assert_eq!(serial(&certs), before);
    assert!(
        certs.dump().first().is_some_and(|s| s.renewal_failures > 0),
        "{:?}",
        certs.dump()
    );

    // It comes back on the same address and directory: renewal resumes.
    let again = support::Ca::start_in(dir, &["--grpc-addr", &addr]).await;
    assert!(
        eventually(Duration::from_secs(10), || certs
            .dump()
            .first()
            .is_some_and(|s| s.serial != before && s.renewal_failures == 0))
        .await,
        "{:?}",
        certs.dump()
    );
    assert!(certs.certified_key(&web).is_ok());
    drop(again);
    stop.cancel();
}

/// One mesh TLS handshake over loopback: `client` (presenting `src`) to `server` (as `dst`).
async fn handshake(
    server: &Arc<CertManager>,
    dst: &mesh_model::identity::Identity,
    client: &Arc<CertManager>,
    src: &mesh_model::identity::Identity,
    server_cfg: Arc<rustls::ServerConfig>,
) -> Result<(), String> {
    let _ = server;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_cfg);
    let accept = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor
            .accept(tcp)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    });
    let client_cfg =
        mesh_pki::tls::client_config(client.clone(), src.clone(), vec![dst.clone()]).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connected = tokio_rustls::TlsConnector::from(client_cfg)
        .connect(mesh_pki::tls::server_name(), tcp)
        .await
        .map(|_| ())
        .map_err(|e| e.to_string());
    let accepted = accept.await.unwrap();
    connected.and(accepted)
}

#[tokio::test]
async fn a_root_rotation_through_the_ca_keeps_every_handshake_working() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let flags = ["--grpc-addr", addr.as_str()];
    let ca = Ca::start(&flags).await;
    let ca_dir = ca.dir.path().join("ca");
    let ttl = Duration::from_secs(4);
    let (web, db) = (id("demo", "web"), id("demo", "db"));
    let server = manager(&ca, &ca.token("demo", "web", None), ttl, false);
    let client = manager(&ca, &ca.token("demo", "db", None), ttl, false);
    let stop = CancellationToken::new();
    for m in [&server, &client] {
        tokio::spawn(m.clone().run_rotation(stop.clone()));
    }
    server.want(&web);
    client.want(&db);
    assert!(
        eventually(Duration::from_secs(5), || server.has_all([&web])
            && client.has_all([&db]))
        .await
    );
    // The server's TLS config is built once, with the first root only (as at enrollment).
    let server_cfg = mesh_pki::tls::server_config(server.clone(), web.clone()).unwrap();
    handshake(&server, &web, &client, &db, server_cfg.clone())
        .await
        .unwrap();

    // A new root R2, made elsewhere.
    let other = tempfile::tempdir().unwrap();
    mesh_pki::ca::Ca::load_or_create(other.path(), "cluster.local").unwrap();
    let r2 = std::fs::read_to_string(other.path().join("root-cert.pem")).unwrap();
    let r1 = std::fs::read_to_string(ca_dir.join("root-cert.pem")).unwrap();

    // Step 1: the CA trusts R1 and R2 (still signing with R1); clients learn R2 from it.
    let restart = |ca: Ca| async move {
        let dir = ca.dir;
        ca.app.shutdown();
        ca.app.join().await.unwrap();
        dir
    };
    let dir = restart(ca).await;
    std::fs::write(ca_dir.join("root-cert.pem"), format!("{r1}{r2}")).unwrap();
    let ca = support::Ca::start_in(dir, &flags).await;
    assert!(
        eventually(Duration::from_secs(10), || server.roots().len() == 2
            && client.roots().len() == 2)
        .await,
        "both learned the new root"
    );

    // Step 2: the CA signs with R2 (and still trusts R1).
    let dir = restart(ca).await;
    std::fs::copy(
        other.path().join("root-key.pem"),
        ca_dir.join("root-key.pem"),
    )
    .unwrap();
    std::fs::write(ca_dir.join("root-cert.pem"), format!("{r2}{r1}")).unwrap();
    let before = client.dump()[0].serial.clone();
    let ca = support::Ca::start_in(dir, &flags).await;
    assert!(
        eventually(Duration::from_secs(10), || {
            client.dump()[0].serial != before && client.dump()[0].renewal_failures == 0
        })
        .await,
        "the client renewed under R2: {:?}",
        client.dump()
    );
    // The server's config from before the rotation accepts the R2 leaf: its verifier
    // follows the trust bundle.
    handshake(&server, &web, &client, &db, server_cfg)
        .await
        .unwrap();
    drop(ca);
    stop.cancel();
}
