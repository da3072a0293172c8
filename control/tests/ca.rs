//! The CA in process, on loopback, through its real gRPC listener (TLS, HTTP/2) with the
//! mesh's own CA client: who gets which identity, and every refusal by its reason.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use control::token::{TokenAuthority, TokenClaims};
use mesh_pki::ca_client::{CaClientError, Fetched};
use mesh_pki::proto::istio_certificate_service_client::IstioCertificateServiceClient;
use mesh_pki::proto::IstioCertificateRequest;
use rustls::RootCertStore;

mod support;
use support::{id, Ca, SERVER_NAME};

/// A raw request, as a client that is not ours might send it.
async fn raw(ca: &Ca, token: Option<&Path>, csr: String) -> tonic::Status {
    let mut tls = rustls::ClientConfig::builder_with_provider(mesh_pki::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(ca.roots.clone())
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    let port = ca.app.addrs.grpc.port();
    let channel = tonic::transport::Endpoint::from_static("https://istiod.istio-system.svc")
        .connect_with_connector(tower::service_fn(move |_| {
            let connector = connector.clone();
            async move {
                let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
                let name = rustls_pki_types::ServerName::try_from(SERVER_NAME).unwrap();
                let tls = connector.connect(name, tcp).await?;
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(tls))
            }
        }))
        .await
        .unwrap();
    let mut req = tonic::Request::new(IstioCertificateRequest {
        csr,
        validity_duration: 60,
        metadata: None,
    });
    if let Some(path) = token {
        let t = std::fs::read_to_string(path).unwrap();
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    IstioCertificateServiceClient::new(channel)
        .create_certificate(req)
        .await
        .expect_err("refused")
}

/// The reason a refusal carries, or "issued".
fn outcome(r: &Result<Fetched, CaClientError>) -> String {
    match r {
        Ok(_) => "issued".into(),
        Err(e) => e.reason(),
    }
}

fn verifies(
    chain: &[rustls_pki_types::CertificateDer<'static>],
    roots: &[rustls_pki_types::CertificateDer<'static>],
) -> bool {
    let mut store = RootCertStore::empty();
    for r in roots {
        store.add(r.clone()).unwrap();
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        mesh_pki::tls::provider(),
    )
    .build()
    .unwrap();
    verifier
        .verify_client_cert(&chain[0], &chain[1..], rustls_pki_types::UnixTime::now())
        .is_ok()
}

#[tokio::test]
async fn a_caller_gets_its_own_identity_with_a_chain_to_the_root() {
    let ca = Ca::start(&[]).await;
    let client = ca.client(&ca.token("demo", "waypoint", None));
    let me = id("demo", "waypoint");
    let got = client
        .fetch(&me, false, Duration::from_secs(3600))
        .await
        .unwrap();
    assert_eq!(got.identity, me);
    assert_eq!(got.roots.len(), 1, "the trust bundle comes with the answer");
    assert_eq!(got.chain.len(), 1, "a generated root signs leaves directly");
    let lifetime = got.not_after.duration_since(got.not_before).unwrap();
    assert_eq!(lifetime, Duration::from_secs(3600));
    assert!(verifies(&got.chain, &got.roots));
    // Naming one's own identity explicitly is the same.
    let again = client.fetch(&me, true, Duration::from_secs(60)).await;
    assert_eq!(outcome(&again), "issued");
}

#[tokio::test]
async fn a_node_agent_gets_only_identities_of_pods_on_its_node() {
    let ca = Ca::start(&[]).await;
    let n1 = ca.client(&ca.token("istio-system", "ztunnel", Some("n1")));
    let n2 = ca.client(&ca.token("istio-system", "ztunnel", Some("n2")));
    let ttl = Duration::from_secs(600);
    assert_eq!(
        outcome(&n1.fetch(&id("demo", "web"), true, ttl).await),
        "issued"
    );
    assert_eq!(
        outcome(&n1.fetch(&id("demo", "db"), true, ttl).await),
        "no_such_pod_on_node",
        "db runs on n2"
    );
    assert_eq!(
        outcome(&n2.fetch(&id("demo", "db"), true, ttl).await),
        "issued"
    );
    assert_eq!(
        outcome(&n1.fetch(&id("kube-system", "admin"), true, ttl).await),
        "no_such_pod_on_node"
    );
    // A workload's (or a waypoint's) token cannot impersonate anyone.
    let web = ca.client(&ca.token("demo", "web", None));
    let refused = web.fetch(&id("demo", "db"), true, ttl).await;
    assert_eq!(outcome(&refused), "not_a_node_agent");
    assert!(refused.unwrap_err().is_permanent());
    let metrics = ca.admin("/metrics").await;
    for line in [
        r#"mesh_ca_certificates_issued_total{grant="node"} 2"#,
        r#"mesh_ca_requests_refused_total{reason="no_such_pod_on_node"} 2"#,
        r#"mesh_ca_requests_refused_total{reason="not_a_node_agent"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in {metrics}");
    }
}

#[tokio::test]
async fn bad_tokens_are_refused_by_reason() {
    let ca = Ca::start(&[]).await;
    let ttl = Duration::from_secs(600);
    let me = id("istio-system", "ztunnel");
    let stranger = TokenAuthority::ephemeral().unwrap();
    let forged = stranger
        .mint(&TokenClaims {
            namespace: "istio-system".into(),
            service_account: "ztunnel".into(),
            node: Some("n2".into()),
            pod: None,
            audience: "istio-ca".into(),
            ttl,
        })
        .unwrap();
    let cases = [
        (forged, "token_forged"),
        ("not-a-jwt".to_string(), "token_malformed"),
        (
            ca.mint("istio-system", "ztunnel", None, "kubernetes"),
            "token_audience",
        ),
    ];
    for (token, want) in cases {
        let got = ca
            .client(&ca.token_file(&token))
            .fetch(&me, false, ttl)
            .await;
        assert_eq!(outcome(&got), want);
        assert!(matches!(
            got,
            Err(CaClientError::Refused {
                code: tonic::Code::Unauthenticated,
                ..
            })
        ));
    }
    let missing = ca.dir.path().join("no-such-token");
    let got = ca.client(&missing).fetch(&me, false, ttl).await;
    assert_eq!(outcome(&got), "token_unreadable");
}

#[tokio::test]
async fn bad_requests_are_refused_and_nothing_is_signed() {
    let ca = Ca::start(&[]).await;
    let token = ca.token("demo", "web", None);
    let (good_csr, _) = mesh_pki::csr::generate(&id("demo", "web")).unwrap();
    let (other_csr, _) = mesh_pki::csr::generate(&id("demo", "db")).unwrap();
    let with = Some(token.as_path());
    let cases = [
        (None, good_csr, tonic::Code::Unauthenticated, "no_token"),
        (
            with,
            "garbage".into(),
            tonic::Code::InvalidArgument,
            "csr_not_pem",
        ),
        (
            with,
            "x".repeat(100_000),
            tonic::Code::InvalidArgument,
            "csr_too_large",
        ),
        (
            with,
            other_csr,
            tonic::Code::PermissionDenied,
            "csr_identity",
        ),
    ];
    for (token, csr, code, reason) in cases {
        let status = raw(&ca, token, csr).await;
        assert_eq!(status.code(), code, "{reason}: {status:?}");
        assert!(status.message().starts_with(reason), "{reason}: {status:?}");
    }
    let metrics = ca.admin("/metrics").await;
    assert!(
        !metrics.contains("mesh_ca_certificates_issued_total{"),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_lifetime_asked_for_is_capped() {
    let ca = Ca::start(&["--max-cert-ttl", "1h"]).await;
    let client = ca.client(&ca.token("demo", "web", None));
    let got = client
        .fetch(
            &id("demo", "web"),
            false,
            Duration::from_secs(30 * 24 * 3600),
        )
        .await
        .unwrap();
    let lifetime = got.not_after.duration_since(got.not_before).unwrap();
    assert_eq!(lifetime, Duration::from_secs(3600));
}

#[tokio::test]
async fn a_caller_over_its_rate_is_refused_while_others_are_served() {
    let ca = Ca::start(&["--per-caller-burst", "3", "--per-caller-rate", "0.01"]).await;
    let greedy = ca.client(&ca.token("demo", "web", None));
    let ttl = Duration::from_secs(60);
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        outcomes.push(outcome(&greedy.fetch(&id("demo", "web"), false, ttl).await));
    }
    assert_eq!(
        outcomes,
        ["issued", "issued", "issued", "rate_limited", "rate_limited"]
    );
    let other = ca.client(&ca.token("demo", "db", None));
    assert_eq!(
        outcome(&other.fetch(&id("demo", "db"), false, ttl).await),
        "issued"
    );
}

#[tokio::test]
async fn the_dump_lists_who_got_what_and_never_a_key_or_token() {
    let ca = Ca::start(&[]).await;
    let token_path = ca.token("istio-system", "ztunnel", Some("n1"));
    let token = std::fs::read_to_string(&token_path).unwrap();
    ca.client(&token_path)
        .fetch(&id("demo", "web"), true, Duration::from_secs(60))
        .await
        .unwrap();
    let dump = ca.admin("/config_dump").await;
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let issued = &v["issued"][0];
    assert_eq!(issued["identity"], "spiffe://cluster.local/ns/demo/sa/web");
    assert_eq!(issued["caller"], "istio-system/ztunnel @n1");
    assert_eq!(issued["grant"], "node");
    assert!(!dump.contains("PRIVATE KEY"));
    assert!(!dump.contains(&token));
    assert_eq!(v["pods"].as_array().unwrap().len(), 2);
}
