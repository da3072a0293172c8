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
