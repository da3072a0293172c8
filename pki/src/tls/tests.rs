//! Real TLS over real loopback TCP: every scenario runs a tokio-rustls server and client.

use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::timeout;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_util::sync::CancellationToken;

use super::*;
use crate::ca::{Ca, WorkloadCert};

const HOUR: Duration = Duration::from_secs(3600);
/// Bound on every network step, so a broken scenario fails instead of hanging.
const STEP: Duration = Duration::from_secs(5);

fn id(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa)
}

/// One mesh: a CA and the certificate cache of a node.
struct Mesh {
    ca: Arc<Ca>,
    certs: Arc<CertManager>,
}

fn mesh() -> Mesh {
    mesh_with_ttl(HOUR)
}

fn mesh_with_ttl(ttl: Duration) -> Mesh {
    let ca = Arc::new(Ca::ephemeral("cluster.local").unwrap());
    let certs = CertManager::new(ca.clone(), ttl);
    Mesh { ca, certs }
}

impl Mesh {
    fn server(&self, local: &str) -> Arc<ServerConfig> {
        server_config(self.certs.clone(), id(local)).unwrap()
    }

    fn client(&self, src: &str, expected: &[&str]) -> Arc<ClientConfig> {
        client_config(
            self.certs.clone(),
            id(src),
            expected.iter().map(|s| id(s)).collect(),
        )
        .unwrap()
    }

    /// A mesh client that presents a fixed (possibly bad) certificate.
    fn client_presenting(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        expected: &str,
    ) -> Arc<ClientConfig> {
        let verifier = Arc::new(ServerIdentityVerifier::new(
            self.certs.root_store(),
            vec![id(expected)],
        ));
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(chain, key)
            .unwrap();
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        config.enable_sni = false;
        Arc::new(config)
    }

    /// A mesh server (verifying clients as usual) that presents a fixed certificate.
    fn server_presenting(
        &self,
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
    ) -> Arc<ServerConfig> {
        let signer = ring::sign::any_supported_type(&key).unwrap();
        let resolver = Arc::new(Fixed(Arc::new(CertifiedKey::new(chain, signer))));
        let verifier = client_verifier(self.certs.clone()).unwrap();
        Arc::new(build_server_config(verifier, resolver).unwrap())
    }

    fn issue(&self, sa: &str, not_before: SystemTime, not_after: SystemTime) -> WorkloadCert {
        self.ca
            .issue_with_validity(&id(sa), not_before, not_after)
            .unwrap()
    }

    /// A leaf signed by this mesh's CA from arbitrary parameters.
    fn craft(
        &self,
        params: CertificateParams,
    ) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let chain = self.ca.sign_params_for_test(&params, &key);
        (
            chain,
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Leaf parameters as the CA issues them; tests then break one property.
fn good_params(uri: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![san_uri(uri)];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.not_before = ::time::OffsetDateTime::now_utc() - ::time::Duration::minutes(5);
    params.not_after = ::time::OffsetDateTime::now_utc() + ::time::Duration::hours(1);
    params
}

fn san_uri(uri: &str) -> SanType {
    SanType::URI(uri.try_into().unwrap())
}

fn san_dns(name: &str) -> SanType {
    SanType::DnsName(name.try_into().unwrap())
}

/// What each side saw: the peer identity after the handshake and one byte each way, or why
/// it failed. (In TLS 1.3 the client finishes before the server has judged its certificate, so
/// only the exchange after the handshake shows a refusal on the client side.)
#[derive(Debug)]
struct Outcome {
    client: Result<Identity, String>,
    server: Result<Identity, String>,
}

impl Outcome {
    fn succeeded(&self) -> bool {
        self.client.is_ok() && self.server.is_ok()
    }
}

async fn handshake(server: Arc<ServerConfig>, client: Arc<ClientConfig>) -> Outcome {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server_side = async {
        let (tcp, _) = listener.accept().await.unwrap();
        let mut tls = TlsAcceptor::from(server)
            .accept(tcp)
            .await
            .map_err(|e| e.to_string())?;
        let peer = peer_identity(tls.get_ref().1).map_err(|e| e.to_string())?;
        exchange(&mut tls, b's').await?;
        Ok(peer)
    };
    let client_side = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let mut tls = TlsConnector::from(client)
            .connect(server_name(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let peer = peer_identity(tls.get_ref().1).map_err(|e| e.to_string())?;
        exchange(&mut tls, b'c').await?;
        Ok(peer)
    };
    let (server, client) = timeout(STEP, async { tokio::join!(server_side, client_side) })
        .await
        .expect("handshake scenario finished in time");
    Outcome { client, server }
}

/// Writes one byte and reads the peer's.
async fn exchange<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    tls: &mut S,
    byte: u8,
) -> Result<u8, String> {
    tls.write_all(&[byte]).await.map_err(|e| e.to_string())?;
    tls.flush().await.map_err(|e| e.to_string())?;
    let mut buf = [0u8; 1];
    tls.read_exact(&mut buf).await.map_err(|e| e.to_string())?;
    Ok(buf[0])
}

/// Asserts the scenario was refused and that the refusing side's error mentions `reason`.
#[track_caller]
fn assert_refused(outcome: &Outcome, reason: &str) {
    assert!(!outcome.succeeded(), "expected a refusal: {outcome:?}");
    let errors = format!("{:?} {:?}", outcome.client, outcome.server);
    assert!(
        errors.to_lowercase().contains(&reason.to_lowercase()),
        "refusal should mention {reason:?}: {outcome:?}"
    );
}

fn serial_of(cert: &CertificateDer<'_>) -> String {
    let (_, x) = x509_parser::parse_x509_certificate(cert).unwrap();
    x.raw_serial_as_string().replace(':', "")
}

// === handshakes ===

#[tokio::test]
async fn mutual_tls_succeeds_and_each_side_sees_the_other() {
    let m = mesh();
    let outcome = handshake(m.server("db"), m.client("web", &["db"])).await;
    assert_eq!(outcome.client.unwrap(), id("db"));
    assert_eq!(outcome.server.unwrap(), id("web"));
}

#[tokio::test]
async fn negotiates_tls13_h2_and_an_allowed_suite_without_sni() {
    let m = mesh();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = TlsAcceptor::from(m.server("db"));
    let accept = async {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = server.accept(tcp).await.unwrap();
        let conn = tls.get_ref().1;
        assert_eq!(conn.server_name(), None, "no sni");
        assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
        tls
    };
    let connect = async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        TlsConnector::from(m.client("web", &["db"]))
            .connect(server_name(), tcp)
            .await
            .unwrap()
    };
    let (_server, client) = timeout(STEP, async { tokio::join!(accept, connect) })
        .await
        .unwrap();
    let conn = client.get_ref().1;
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(conn.alpn_protocol(), Some(ALPN_H2));
    let suite = conn.negotiated_cipher_suite().unwrap().suite();
    assert!(
        [
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        ]
        .contains(&suite),
        "{suite:?}"
    );
}

#[tokio::test]
async fn client_accepts_any_of_several_expected_identities() {
    let m = mesh();
    let outcome = handshake(m.server("db-v2"), m.client("web", &["db", "db-v2"])).await;
    assert_eq!(outcome.client.unwrap(), id("db-v2"));
}

#[tokio::test]
async fn client_refuses_a_server_with_another_identity() {
    let m = mesh();
    let outcome = handshake(m.server("impostor"), m.client("web", &["db"])).await;
    assert_refused(&outcome, "not one of the expected");
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn server_refuses_an_expired_client_certificate() {
    let m = mesh();
    let now = SystemTime::now();
    let cert = m.issue("web", now - 2 * HOUR, now - HOUR);
    let outcome = handshake(
        m.server("db"),
        m.client_presenting(cert.chain, cert.key, "db"),
    )
    .await;
    assert_refused(&outcome, "expired");
}

#[tokio::test]
async fn server_refuses_a_not_yet_valid_client_certificate() {
    let m = mesh();
    let now = SystemTime::now();
    let cert = m.issue("web", now + HOUR, now + 2 * HOUR);
    let outcome = handshake(
        m.server("db"),
        m.client_presenting(cert.chain, cert.key, "db"),
    )
    .await;
    assert_refused(&outcome, "not valid yet");
}

#[tokio::test]
async fn client_refuses_an_expired_server_certificate() {
    let m = mesh();
    let now = SystemTime::now();
    let cert = m.issue("db", now - 2 * HOUR, now - HOUR);
    let outcome = handshake(
        m.server_presenting(cert.chain, cert.key),
        m.client("web", &["db"]),
    )
    .await;
    assert_refused(&outcome, "expired");
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn server_refuses_a_client_certificate_from_a_foreign_root() {
    let m = mesh();
    let foreign = Ca::ephemeral("cluster.local").unwrap();
    let cert = foreign.issue(&id("web"), HOUR).unwrap();
    let outcome = handshake(
        m.server("db"),
        m.client_presenting(cert.chain, cert.key, "db"),
    )
    .await;
    // Both generated roots have the same subject, so webpki picks the wrong anchor by name and
    // then fails on its signature.
    assert_refused(&outcome, "unknownissuer");
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn client_refuses_a_server_certificate_from_a_foreign_root() {
    let m = mesh();
    let foreign = Ca::ephemeral("cluster.local").unwrap();
    let cert = foreign.issue(&id("db"), HOUR).unwrap();
    let outcome = handshake(
        m.server_presenting(cert.chain, cert.key),
        m.client("web", &["db"]),
    )
    .await;
    assert_refused(&outcome, "unknownissuer");
    assert!(outcome.client.is_err());
}

#[tokio::test]
async fn server_refuses_another_trust_domain_even_from_the_same_root() {
    let m = mesh();
    let evil = Identity::new("evil.local", "default", "web");
    let cert = m.ca.issue_any_trust_domain_for_test(&evil, HOUR);
    let outcome = handshake(
        m.server("db"),
        m.client_presenting(cert.chain, cert.key, "db"),
    )
    .await;
    assert_refused(&outcome, "trust domain is not cluster.local");
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn server_refuses_a_tls12_only_client() {
    let m = mesh();
    let cert = m.ca.issue(&id("web"), HOUR).unwrap();
    let verifier = Arc::new(ServerIdentityVerifier::new(
        m.certs.root_store(),
        vec![id("db")],
    ));
    let mut config = ClientConfig::builder_with_provider(Arc::new(ring::default_provider()))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(cert.chain, cert.key)
        .unwrap();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let outcome = handshake(m.server("db"), Arc::new(config)).await;
    assert_refused(&outcome, "version");
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn server_requires_alpn_h2() {
    let m = mesh();
    let check = |alpn: Vec<Vec<u8>>| {
        let m = &m;
        async move {
            let mut config = (*m.client("web", &["db"])).clone();
            config.alpn_protocols = alpn.clone();
            let outcome = handshake(m.server("db"), Arc::new(config)).await;
            assert!(!outcome.succeeded(), "alpn {alpn:?}: {outcome:?}");
            assert!(outcome.server.is_err(), "alpn {alpn:?}: {outcome:?}");
        }
    };
    check(vec![]).await;
    check(vec![b"http/1.1".to_vec()]).await;
}

#[tokio::test]
async fn server_refuses_a_client_without_a_certificate() {
    let m = mesh();
    let verifier = Arc::new(ServerIdentityVerifier::new(
        m.certs.root_store(),
        vec![id("db")],
    ));
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    let outcome = handshake(m.server("db"), Arc::new(config)).await;
    assert_refused(&outcome, "certificate");
    assert!(outcome.server.is_err());
}

#[tokio::test]
async fn server_closes_plaintext_and_garbage_without_hanging() {
    let m = mesh();
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"[..],
        &[0x16, 0x03, 0x01, 0x00, 0x05, 0x01][..], // a truncated ClientHello, then EOF
    ] {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(m.server("db"));
        let server = async {
            let (tcp, _) = listener.accept().await.unwrap();
            acceptor.accept(tcp).await.map(|_| ())
        };
        let client = async {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(junk).await.unwrap();
            tcp.shutdown().await.unwrap();
            let mut rest = Vec::new();
            let _ = tcp.read_to_end(&mut rest).await;
        };
        let (result, ()) = timeout(STEP, async { tokio::join!(server, client) })
            .await
            .expect("server gave up on junk in time");
        assert!(result.is_err(), "{junk:?} accepted");
    }
}

/// RELIABILITY 6: a handshake cut into 32-byte records, relayed one byte per TCP write,
/// completes with both identities.
#[tokio::test]
async fn a_handshake_in_tiny_records_and_segments_completes() {
    let m = mesh();
    let mut client = (*m.client("web", &["db"])).clone();
    client.max_fragment_size = Some(32);
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let relay = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = relay.local_addr().unwrap();
    // One byte per write, both ways, until either side closes.
    async fn trickle(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
    ) {
        let mut byte = [0u8; 1];
        while let Ok(1) = from.read(&mut byte).await {
            if to.write_all(&byte).await.is_err() {
                break;
            }
            tokio::task::yield_now().await;
        }
        let _ = to.shutdown().await;
    }
    tokio::spawn(async move {
        let (a, _) = relay.accept().await.unwrap();
        let b = TcpStream::connect(addr).await.unwrap();
        a.set_nodelay(true).unwrap();
        b.set_nodelay(true).unwrap();
        let ((ar, aw), (br, bw)) = (a.into_split(), b.into_split());
        tokio::join!(trickle(ar, bw), trickle(br, aw));
    });
    let server = m.server("db");
    let server_side = async {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = TlsAcceptor::from(server).accept(tcp).await?;
        Ok::<_, std::io::Error>(peer_identity(tls.get_ref().1).unwrap())
    };
    let client_side = async {
        let tcp = TcpStream::connect(relay_addr).await.unwrap();
        let tls = TlsConnector::from(Arc::new(client))
            .connect(server_name(), tcp)
            .await?;
        Ok::<_, std::io::Error>(peer_identity(tls.get_ref().1).unwrap())
    };
    let (server, client) = timeout(STEP, async { tokio::join!(server_side, client_side) })
        .await
        .expect("a trickled handshake finished in time");
    assert_eq!(server.expect("server side"), id("web"));
    assert_eq!(client.expect("client side"), id("db"));
}

/// RELIABILITY 6: a client that sends its ClientHello and then a close_notify alert, keeping
/// the connection open, ends the server's handshake with an error at once (not at a
/// deadline, not with a panic).
#[tokio::test]
async fn an_alert_in_the_middle_of_a_handshake_ends_it() {
    let m = mesh();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = TlsAcceptor::from(m.server("db"));
    let server = async {
        let (tcp, _) = listener.accept().await.unwrap();
        acceptor.accept(tcp).await.map(|_| ())
    };
    let client = async {
        let mut hello = Vec::new();
        let mut conn =
            rustls::ClientConnection::new(m.client("web", &["db"]), server_name()).unwrap();
        conn.write_tls(&mut hello).unwrap();
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&hello).await.unwrap();
        // The server's first flight, then close_notify (alert level 1, description 0).
        let mut first = [0u8; 5];
        tcp.read_exact(&mut first).await.unwrap();
        tcp.write_all(&[0x15, 0x03, 0x03, 0x00, 0x02, 0x01, 0x00])
            .await
            .unwrap();
        tcp
    };
    let (result, _open) = timeout(Duration::from_secs(1), async {
        tokio::join!(server, client)
    })
    .await
    .expect("the server ended the handshake within 1 s");
    assert!(
        result.is_err(),
        "a handshake closed by the client succeeded"
    );
}

/// Leaves signed by the mesh CA (so the chain verifies) that break one of the mesh's rules.
#[tokio::test]
async fn server_refuses_client_leaves_that_break_the_rules() {
    let m = mesh();
    let web = "spiffe://cluster.local/ns/default/sa/web";
    // `refusal`: None when the handshake must succeed, else a word of the server's reason.
    let check = |name: &'static str, params: CertificateParams, refusal: Option<&'static str>| {
        let (chain, key) = m.craft(params);
        let (server, client) = (m.server("db"), m.client_presenting(chain, key, "db"));
        async move {
            let outcome = handshake(server, client).await;
            match refusal {
                None => assert!(outcome.succeeded(), "{name}: {outcome:?}"),
                Some(reason) => {
                    let err = outcome.server.expect_err(name).to_lowercase();
                    assert!(err.contains(reason), "{name}: {err}");
                }
            }
        }
    };

    check("control: a well-formed leaf", good_params(web), None).await;

    let mut p = good_params(web);
    p.subject_alt_names
        .push(san_uri("spiffe://cluster.local/ns/default/sa/admin"));
    check("two uri sans", p, Some("2 uri sans")).await;

    let mut p = good_params(web);
    p.subject_alt_names = vec![san_dns("web.default.svc")];
    check("no uri san", p, Some("0 uri sans")).await;

    let mut p = good_params(web);
    p.subject_alt_names
        .push(san_dns("spiffe://cluster.local/ns/default/sa/admin"));
    check("spiffe id in a dns san", p, Some("dns san")).await;

    let mut p = good_params(web);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    check("ca:true leaf", p, Some("ca")).await;

    let mut p = good_params(web);
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    check("server-only eku", p, Some("client authentication")).await;

    let mut p = good_params(web);
    p.extended_key_usages = vec![];
    check("no eku extension", p, Some("clientauth")).await;

    let mut p = good_params(web);
    p.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
    check(
        "key usage without digitalSignature",
        p,
        Some("digitalsignature"),
    )
    .await;

    let nul = "spiffe://cluster.local/ns/de\0fault/sa/web";
    check("nul byte in the uri san", good_params(nul), Some("nul")).await;

    let https = "https://web.default.svc";
    check(
        "non-spiffe uri",
        good_params(https),
        Some("not a spiffe id"),
    )
    .await;
}

#[tokio::test]
async fn client_refuses_a_server_leaf_without_server_auth() {
    let m = mesh();
    let mut p = good_params("spiffe://cluster.local/ns/default/sa/db");
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let (chain, key) = m.craft(p);
    let outcome = handshake(m.server_presenting(chain, key), m.client("web", &["db"])).await;
    assert!(outcome.client.is_err(), "{outcome:?}");
}

#[test]
fn configs_refuse_identities_outside_the_trust_domain_and_empty_expectations() {
    let m = mesh();
    let evil = Identity::new("evil.local", "default", "web");
    assert!(server_config(m.certs.clone(), evil.clone()).is_err());
    assert!(client_config(m.certs.clone(), evil, vec![id("db")]).is_err());
    let err = client_config(m.certs.clone(), id("web"), vec![]).unwrap_err();
    assert!(
        err.to_string().contains("no expected server identity"),
        "{err}"
    );
}

// === rotation ===

#[tokio::test]
async fn rotation_keeps_open_connections_and_new_handshakes_get_the_new_certificate() {
    let m = mesh_with_ttl(Duration::from_secs(2));
    let server = TlsAcceptor::from(m.server("db"));
    let client = TlsConnector::from(m.client("web", &["db"]));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let connect = || async {
        let accept = async {
            let (tcp, _) = listener.accept().await.unwrap();
            server.accept(tcp).await.unwrap()
        };
        let dial = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            client.connect(server_name(), tcp).await.unwrap()
        };
        timeout(STEP, async { tokio::join!(accept, dial) })
            .await
            .unwrap()
    };

    let (mut old_server, mut old_client) = connect().await;
    let old_serial = serial_of(&old_client.get_ref().1.peer_certificates().unwrap()[0]);

    let mut changes = m.certs.subscribe();
    changes.mark_unchanged();
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let rotation = tokio::spawn(m.certs.clone().run_rotation(shutdown.clone()));

    // Both cached certificates (web and db) are renewed at half of their 2 s lifetime.
    let renewed = |s: &str| {
        let uri = id(s).to_string();
        m.certs
            .dump()
            .iter()
            .any(|c| c.identity == uri && c.serial != old_serial)
    };
    timeout(Duration::from_millis(1500), async {
        while !renewed("db") {
            changes.changed().await.unwrap();
        }
    })
    .await
    .expect("db certificate renewed within 1.5 s");

    // The connection made before rotation still carries bytes both ways.
    let (s, c) = tokio::join!(
        exchange(&mut old_server, b's'),
        exchange(&mut old_client, b'c')
    );
    assert_eq!((s.unwrap(), c.unwrap()), (b'c', b's'));

    // A new handshake sees the new certificate.
    let (_new_server, new_client) = connect().await;
    let new_serial = serial_of(&new_client.get_ref().1.peer_certificates().unwrap()[0]);
    assert_ne!(new_serial, old_serial);
    let current = m
        .certs
        .dump()
        .into_iter()
        .find(|c| c.identity == id("db").to_string());
    assert_eq!(current.unwrap().serial, new_serial);

    shutdown.cancel();
    timeout(STEP, rotation).await.unwrap().unwrap();
}

// === identity_from_cert ===

#[test]
fn identity_from_cert_accepts_exactly_one_spiffe_uri_san() {
    let m = mesh();
    let web = "spiffe://cluster.local/ns/default/sa/web";
    let check = |sans: Vec<SanType>, want: Result<Identity, &str>| {
        let mut params = good_params(web);
        params.subject_alt_names = sans.clone();
        let (chain, _) = m.craft(params);
        match (identity_from_cert(&chain[0]), want) {
            (Ok(got), Ok(want)) => assert_eq!(got, want, "{sans:?}"),
            (Err(err), Err(reason)) => {
                assert!(err.to_string().contains(reason), "{sans:?}: {err}")
            }
            (got, want) => panic!("{sans:?}: got {got:?}, want {want:?}"),
        }
    };
    check(vec![san_uri(web)], Ok(id("web")));
    // Other names beside the one URI are fine, as long as none claims a SPIFFE ID.
    check(
        vec![san_dns("web.default.svc"), san_uri(web)],
        Ok(id("web")),
    );
    check(
        vec![
            san_uri(web),
            san_uri("spiffe://cluster.local/ns/default/sa/admin"),
        ],
        Err("2 uri sans"),
    );
    check(vec![san_uri(web), san_uri(web)], Err("2 uri sans"));
    check(vec![san_dns("web.default.svc")], Err("0 uri sans"));
    check(vec![], Err("0 uri sans"));
    check(
        vec![
            san_uri(web),
            san_dns("spiffe://cluster.local/ns/default/sa/admin"),
        ],
        Err("dns san"),
    );
    check(
        vec![san_uri(web), san_dns("SPIFFE://cluster.local")],
        Err("dns san"),
    );
    check(
        vec![san_uri("https://web.default.svc")],
        Err("not a spiffe id"),
    );
    check(
        vec![san_uri("SPIFFE://cluster.local/ns/default/sa/web")],
        Err("not a spiffe id"),
    );
    check(
        vec![san_uri("spiffe://cluster.local/ns/default/sa/web/extra")],
        Err("not a spiffe id"),
    );
    check(
        vec![san_uri("spiffe://cluster.local/ns/de\0fault/sa/web")],
        Err("nul"),
    );
    check(vec![san_uri(web), san_dns("web\0.evil")], Err("nul"));
}

#[test]
fn identity_from_cert_refuses_bytes_that_are_not_one_certificate() {
    let m = mesh();
    let (chain, _) = m.craft(good_params("spiffe://cluster.local/ns/default/sa/web"));
    let der = chain[0].as_ref();
    let check = |bytes: Vec<u8>| {
        let err = identity_from_cert(&CertificateDer::from(bytes.clone())).unwrap_err();
        assert!(
            matches!(err, TlsError::Parse(_)),
            "{} bytes: {err}",
            bytes.len()
        );
    };
    check(vec![]);
    check(der[..der.len() / 2].to_vec());
    check([der, &[0u8]].concat());
    check(b"-----BEGIN CERTIFICATE-----".to_vec());
}
