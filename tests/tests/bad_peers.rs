//! Hostile and broken peers against the real ztunnel: clients that must be refused at a pod's
//! HBONE port (15008), and a rogue HBONE server that a client's ztunnel must refuse to talk to.
//!
//! Every scenario checks three things: the refusal itself (what the peer sees), that it was
//! counted with its reason in `mesh_connections_refused_total`, and that no byte of the refused
//! attempt reached an application, while legitimate traffic keeps flowing afterwards.
//!
//! The hostile peers are written here with `tokio-rustls` and `h2` directly, using the mesh's
//! own CA (from the mesh's CA directory) to mint legitimate or crafted certificates. Their async
//! code runs on one runtime per test; sockets are created inside pods with [`Mesh::connect`] or
//! [`Mesh::in_pod`], so they belong to the pod's network namespace.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use anyhow::{bail, ensure, Context, Result};
use bytes::Bytes;
use e2e::{eventually, prom, wait_until, Ambient, Mesh, Pod};
use http::{Method, Request, StatusCode};
use mesh_model::identity::Identity;
use mesh_pki::ca::{Ca, WorkloadCert};
use rustls::client::danger::ServerCertVerifier;
use rustls::crypto::ring;
use rustls::{AlertDescription, ClientConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::runtime::Runtime;

const TRUST_DOMAIN: &str = "cluster.local";
const HBONE_PORT: u16 = 15008;
const OUTBOUND_PORT: u16 = 15001;
const APP_PORT: u16 = 8080;
/// A second port of the server's app, which an AuthorizationPolicy denies to everyone.
const DENIED_PORT: u16 = 8081;
const REFUSED: &str = "mesh_connections_refused_total";

/// Bound on every wait for an effect in another process (a counter, a log entry).
const WAIT: Duration = Duration::from_secs(10);
/// Bound on every read or response a peer written here waits for.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime of the certificates minted for the test peers.
const CERT_TTL: Duration = Duration::from_secs(3600);

// === scenarios ===

/// Plain TCP, bad certificates, wrong TLS versions and ALPN, then bad CONNECTs from a valid
/// client: all refused and counted by n2, while the server pod's "app" on 8080 (which records
/// every connection) sees only the legitimate ones. The hostile clients run in a pod outside
/// the mesh on n1, so nothing captures their traffic on the way.
#[test]
fn hostile_clients_are_refused_at_15008_and_the_app_sees_nothing() -> Result<()> {
    let mesh = Mesh::two_nodes("bad_clients")
        .namespace("legacy", Ambient::No)
        .pod(Pod::new("legacy", "outsider").on("n1"))
        .pod(
            Pod::new("default", "server")
                .on("n2")
                .service_account("server"),
        )
        .pod(
            Pod::new("default", "neighbour")
                .on("n2")
                .service_account("neighbour"),
        )
        .build()?;
    let rt = runtime()?;
    let server_ip = mesh.pod_ip("default/server")?;
    let app = Recorder::start(&mesh, &rt, "default/server", APP_PORT)?;
    let denied_app = Recorder::start(&mesh, &rt, "default/server", DENIED_PORT)?;
    mesh.write_yaml(
        "deny-port.yaml",
        &format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-port\n  namespace: default\nspec:\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        ports: [\"{DENIED_PORT}\"]\n"
        ),
    )?;
    let denied = SocketAddr::from((server_ip, DENIED_PORT));
    wait_until("the DENY policy applies", WAIT, || {
        Ok(mesh
            .echo_roundtrip("default/client", denied, b"probe")
            .is_err())
    })?;
    // The probes that went through before the policy applied.
    let probes = denied_app.seen().len();

    let mesh_ca = Ca::load_or_create(&mesh.ca_dir(), TRUST_DOMAIN).context("load the mesh ca")?;
    let server_id = Identity::new(TRUST_DOMAIN, "default", "server");
    let ctx = HostileCtx {
        mesh: &mesh,
        rt: &rt,
        target: SocketAddr::from((server_ip, HBONE_PORT)),
        authority: SocketAddr::from((server_ip, APP_PORT)),
        verifier: mesh_pki::tls::server_verifier(mesh_ca.root_store(), vec![server_id]),
        tls_refusals: Cell::new(0.0),
    };

    // 1. Not TLS at all.
    ctx.plain_http_is_closed_without_a_response(
        b"GET / HTTP/1.1\r\nHost: server\r\nX-Marker: HOSTILE-plain\r\n\r\n",
    )?;

    // 2-5. TLS clients the server must refuse during the handshake.
    let outsider_id = Identity::new(TRUST_DOMAIN, "legacy", "default");
    let valid = mesh_ca.issue(&outsider_id, CERT_TTL)?;
    // Another generated root for the same trust domain (a second cluster's CA), and one for
    // another trust domain: both are unknown issuers here.
    let lookalike = Ca::ephemeral(TRUST_DOMAIN)?.issue(&outsider_id, CERT_TTL)?;
    let unrelated = Ca::ephemeral("other.local")?
        .issue(&Identity::new("other.local", "legacy", "default"), CERT_TTL)?;
    // The mesh's own root and key, told that its trust domain is another one: a certificate a
    // sloppy verifier would accept because the chain is fine.
    let evil_ca = Ca::load_or_create(&mesh.ca_dir(), "evil.local").context("load the mesh ca")?;
    let evil = evil_ca.issue(&Identity::new("evil.local", "default", "x"), CERT_TTL)?;
    let hour = Duration::from_secs(3600);
    let now = SystemTime::now();
    let expired = mesh_ca.issue_with_validity(&outsider_id, now - 2 * hour, now - hour)?;
    let cases = [
        (
            "a certificate from another cluster's root (same trust domain)",
            Some(&lookalike),
            Flavour::Hbone,
            AlertDescription::UnknownCA,
        ),
        (
            "a certificate from an unrelated root",
            Some(&unrelated),
            Flavour::Hbone,
            AlertDescription::UnknownCA,
        ),
        (
            "a mesh-root certificate for spiffe://evil.local",
            Some(&evil),
            Flavour::Hbone,
            AlertDescription::CertificateUnknown,
        ),
        (
            "an expired mesh certificate",
            Some(&expired),
            Flavour::Hbone,
            AlertDescription::CertificateExpired,
        ),
        (
            "no client certificate",
            None,
            Flavour::Hbone,
            AlertDescription::CertificateRequired,
        ),
        (
            "TLS 1.2 only",
            Some(&valid),
            Flavour::Tls12Only,
            AlertDescription::ProtocolVersion,
        ),
        (
            "no ALPN",
            Some(&valid),
            Flavour::NoAlpn,
            AlertDescription::AccessDenied,
        ),
        (
            "ALPN http/1.1 only",
            Some(&valid),
            Flavour::Http11Alpn,
            AlertDescription::AccessDenied,
        ),
    ];
    for (name, cert, flavour, alert) in cases {
        ctx.check(name, cert, flavour, alert)?;
    }

    // 6. A valid client that asks for things it may not have, then for something it may.
    ctx.bad_requests_on_one_connection_then_a_good_one(&mesh.pod_ip("default/neighbour")?, &valid)?;

    // Legitimate mesh traffic is unaffected by all of the above.
    let marker = b"LEGIT-mesh-client";
    let back = mesh.echo_roundtrip(
        "default/client",
        SocketAddr::from((server_ip, APP_PORT)),
        marker,
    )?;
    ensure!(
        back == marker,
        "mesh client got {:?} back",
        String::from_utf8_lossy(&back)
    );

    // 7. The app saw exactly the two legitimate connections, and not one hostile byte.
    let client_ip = mesh.pod_ip("default/client")?;
    let outsider_ip = mesh.pod_ip("legacy/outsider")?;
    let seen = app.seen();
    let summary: Vec<(Ipv4Addr, String)> = seen
        .iter()
        .map(|c| {
            (
                ipv4(c.peer),
                String::from_utf8_lossy(&c.received).into_owned(),
            )
        })
        .collect();
    let want = vec![
        (outsider_ip, "LEGIT-h2-connect".to_owned()),
        (client_ip, "LEGIT-mesh-client".to_owned()),
    ];
    ensure!(
        summary == want,
        "the app saw {summary:?}, expected only {want:?}"
    );
    ensure!(
        !seen.iter().any(|c| contains(&c.received, b"HOSTILE")),
        "hostile bytes reached the app"
    );
    // Early data on a CONNECT that policy denies goes nowhere: the denied port was not even
    // connected to once the policy applied.
    let denied_seen = denied_app.seen();
    ensure!(
        denied_seen.len() == probes,
        "the denied port saw {} connections after the policy applied: {:?}",
        denied_seen.len() - probes,
        denied_seen[probes..]
            .iter()
            .map(|c| String::from_utf8_lossy(&c.received).into_owned())
            .collect::<Vec<_>>()
    );
    // Nothing was counted twice or late.
    let tls_refusals = refused(&mesh, "n2", "destination", "TLS")?;
    ensure!(
        tls_refusals == ctx.tls_count(),
        "n2 counted {tls_refusals} TLS refusals"
    );
    Ok(())
}

/// `default/imposter` is a mesh pod on a node without ztunnel, so whoever
/// listens on its 15008 is trusted only as far as its certificate goes. A rogue server there
/// presents wrong certificates; the client's ztunnel must refuse each one, and then talk to
/// the same address once it presents the right one.
#[test]
fn a_rogue_hbone_server_is_refused_by_the_client_ztunnel() -> Result<()> {
    let mesh = Mesh::builder("rogue_server")
        .node("n1")
        .bare_node("n3")
        .namespace("default", Ambient::Yes)
        .pod(
            Pod::new("default", "client")
                .on("n1")
                .service_account("client"),
        )
        .pod(
            Pod::new("default", "imposter")
                .on("n3")
                .service_account("imposter"),
        )
        .build()?;
    let rt = runtime()?;
    let imposter_ip = mesh.pod_ip("default/imposter")?;
    let target = SocketAddr::from((imposter_ip, APP_PORT));

    let mesh_ca = Ca::load_or_create(&mesh.ca_dir(), TRUST_DOMAIN).context("load the mesh ca")?;
    let right_id = Identity::new(TRUST_DOMAIN, "default", "imposter");
    let hour = Duration::from_secs(3600);
    let now = SystemTime::now();
    let other_identity =
        mesh_ca.issue(&Identity::new(TRUST_DOMAIN, "default", "client"), CERT_TTL)?;
    let expired = mesh_ca.issue_with_validity(&right_id, now - 2 * hour, now - hour)?;
    let foreign = Ca::ephemeral(TRUST_DOMAIN)?.issue(&right_id, CERT_TTL)?;
    let genuine = mesh_ca.issue(&right_id, CERT_TTL)?;

    let rogue = RogueServer::start(&mesh, &rt, "default/imposter", &other_identity)?;
    // Should the client ever fall back to plaintext, this is where it would land.
    let trap = Recorder::start(&mesh, &rt, "default/imposter", APP_PORT)?;

    let ctx = RogueCtx {
        mesh: &mesh,
        rogue: &rogue,
        target,
        failures: Cell::new(refused(&mesh, "n1", "source", "UF")?),
    };
    ctx.check(
        "another workload's certificate",
        &other_identity,
        AlertDescription::CertificateUnknown,
    )?;
    ctx.check(
        "an expired certificate for the right identity",
        &expired,
        AlertDescription::CertificateExpired,
    )?;
    // Every generated root has its own name, so the chain is refused as an unknown issuer.
    ctx.check(
        "the right identity from a foreign root",
        &foreign,
        AlertDescription::UnknownCA,
    )?;
    // The same address with a genuine certificate works: the refusals were about the
    // certificates, and the client's pool was not left broken.
    rogue.present(&genuine)?;
    let back = mesh.echo_roundtrip("default/client", target, b"LEGIT-to-genuine")?;
    ensure!(
        back == b"LEGIT-to-genuine",
        "genuine server echoed {:?}",
        String::from_utf8_lossy(&back)
    );
    ensure!(
        rogue.tunnels() == [target.to_string()],
        "tunnels: {:?}",
        rogue.tunnels()
    );
    let failures = refused(&mesh, "n1", "source", "UF")?;
    ensure!(
        failures == ctx.failures(),
        "n1 counted {failures} upstream failures"
    );
    ensure!(
        trap.seen().is_empty(),
        "plaintext reached the imposter's port {APP_PORT}: {:?}",
        trap.seen()
    );
    Ok(())
}

// === the rogue server's victims ===

/// The fixtures of the rogue-server scenario.
struct RogueCtx<'a> {
    mesh: &'a Mesh,
    rogue: &'a RogueServer,
    /// The imposter's app address, as the client dials it.
    target: SocketAddr,
    /// Upstream failures n1 has counted so far.
    failures: Cell<f64>,
}

impl RogueCtx<'_> {
    const CLIENT_POD: &'static str = "default/client";

    fn failures(&self) -> f64 {
        self.failures.get()
    }

    /// The rogue presents `cert`; a mesh client's connection through its ztunnel must be
    /// closed without data, counted as an upstream failure on n1, and the rogue must see the
    /// client's ztunnel abort the handshake with `alert` (and no tunnel).
    fn check(&self, name: &str, cert: &WorkloadCert, alert: AlertDescription) -> Result<()> {
        self.rogue.present(cert)?;
        let before = self.rogue.handshakes().len();
        let back = closed_without_data(self.mesh, Self::CLIENT_POD, self.target, b"HOSTILE-rogue")
            .with_context(|| format!("rogue server with {name}"))?;
        ensure!(
            back.is_empty(),
            "rogue server with {name}: the client got {back:?}"
        );
        self.failures.set(self.failures() + 1.0);
        wait_for_count(self.mesh, "n1", "source", "UF", self.failures())
            .with_context(|| format!("rogue server with {name}"))?;
        let what = format!("the rogue server with {name} to see the handshake end");
        let new = eventually(&what, WAIT, || {
            let new = self.rogue.handshakes().split_off(before);
            ensure!(!new.is_empty(), "no handshake yet");
            Ok(new)
        })?;
        ensure!(
            new.iter().all(|h| *h == Handshake::Alert(alert)),
            "rogue server with {name}: the client's ztunnel should abort with {alert:?}; \
             the rogue saw {new:?}"
        );
        ensure!(
            self.rogue.tunnels().is_empty(),
            "rogue server with {name}: tunnels opened {:?}",
            self.rogue.tunnels()
        );
        Ok(())
    }
}

// === hostile clients ===

/// What a hostile TLS client offers besides its certificate.
#[derive(Clone, Copy, Debug)]
enum Flavour {
    /// What a mesh client offers: TLS 1.3, ALPN h2.
    Hbone,
    /// TLS 1.2 only (with ALPN h2).
    Tls12Only,
    /// TLS 1.3 without any ALPN.
    NoAlpn,
    /// TLS 1.3 offering only `http/1.1`.
    Http11Alpn,
}

/// What a TLS client heard from the server right after its side of the handshake.
#[derive(Debug, PartialEq)]
enum Outcome {
    /// The server sent this TLS alert: the handshake was refused.
    Alert(AlertDescription),
    /// The connection failed some other way (the text says how).
    Failed(String),
    /// The server accepted the handshake and sent this many bytes of HTTP/2.
    Accepted(usize),
}

/// The fixtures of the hostile-client scenario.
struct HostileCtx<'a> {
    mesh: &'a Mesh,
    rt: &'a Runtime,
    /// The server pod's HBONE address.
    target: SocketAddr,
    /// The server pod's app, as a CONNECT authority.
    authority: SocketAddr,
    verifier: Arc<dyn ServerCertVerifier>,
    /// TLS refusals n2 has counted so far.
    tls_refusals: Cell<f64>,
}

impl HostileCtx<'_> {
    const CLIENT_POD: &'static str = "legacy/outsider";

    fn tls_count(&self) -> f64 {
        self.tls_refusals.get()
    }

    /// Waits until n2 has counted one more TLS refusal.
    fn expect_one_more_tls_refusal(&self) -> Result<()> {
        self.tls_refusals.set(self.tls_refusals.get() + 1.0);
        wait_for_count(self.mesh, "n2", "destination", "TLS", self.tls_count())
    }

    fn plain_http_is_closed_without_a_response(&self, request: &[u8]) -> Result<()> {
        let reply = closed_without_data(self.mesh, Self::CLIENT_POD, self.target, request);
        let reply = reply.context("plain http to 15008")?;
        // rustls may send one fatal alert (content type 21) before closing; anything else
        // would be an answer.
        ensure!(
            reply.is_empty() || is_tls_alert_record(&reply),
            "plain http to 15008 got an answer: {:?}",
            String::from_utf8_lossy(&reply)
        );
        self.expect_one_more_tls_refusal()
            .context("plain http to 15008")
    }

    /// One hostile TLS client: it must get `alert` during the handshake and the refusal must be
    /// counted.
    fn check(
        &self,
        name: &str,
        cert: Option<&WorkloadCert>,
        flavour: Flavour,
        alert: AlertDescription,
    ) -> Result<()> {
        let config = client_config(self.verifier.clone(), cert, flavour)?;
        let tcp = self.mesh.connect(Self::CLIENT_POD, self.target)?;
        let outcome = self
            .rt
            .block_on(handshake_verdict(tcp, config))
            .with_context(|| format!("client with {name}"))?;
        ensure!(
            outcome == Outcome::Alert(alert),
            "client with {name}: expected the server to refuse with {alert:?}, got {outcome:?}"
        );
        self.expect_one_more_tls_refusal()
            .with_context(|| format!("client with {name}"))
    }

    /// Refused requests on one HTTP/2 connection, each answered and counted, and a
    /// valid CONNECT on the same connection afterwards.
    fn bad_requests_on_one_connection_then_a_good_one(
        &self,
        other_pod: &Ipv4Addr,
        cert: &WorkloadCert,
    ) -> Result<()> {
        let server_ip = self.authority.ip();
        let config = client_config(self.verifier.clone(), Some(cert), Flavour::Hbone)?;
        let tcp = self.mesh.connect(Self::CLIENT_POD, self.target)?;
        // What the client asks for, what it must be answered, and the reason n2 counts.
        let bad = [
            (
                Method::GET,
                format!("http://{server_ip}:{APP_PORT}/"),
                StatusCode::METHOD_NOT_ALLOWED,
                "BADREQ",
            ),
            (
                Method::CONNECT,
                "nonsense".to_owned(),
                StatusCode::BAD_REQUEST,
                "BADREQ",
            ),
            (
                Method::CONNECT,
                format!("{other_pod}:{APP_PORT}"),
                StatusCode::UNAUTHORIZED,
                "NR",
            ),
            // Allowed by peer authentication, refused by an AuthorizationPolicy DENY.
            (
                Method::CONNECT,
                format!("{server_ip}:{DENIED_PORT}"),
                StatusCode::UNAUTHORIZED,
                "DENY",
            ),
            (
                Method::CONNECT,
                format!("{server_ip}:{OUTBOUND_PORT}"),
                StatusCode::UNAUTHORIZED,
                "LOOP",
            ),
            (
                Method::CONNECT,
                format!("{server_ip}:{HBONE_PORT}"),
                StatusCode::UNAUTHORIZED,
                "LOOP",
            ),
        ];
        let mut want_counts: BTreeMap<&str, f64> = BTreeMap::new();
        for (.., reason) in &bad {
            if !want_counts.contains_key(reason) {
                want_counts.insert(reason, refused(self.mesh, "n2", "destination", reason)?);
            }
            *want_counts.entry(reason).or_default() += 1.0;
        }
        let authority = self.authority;
        self.rt.block_on(async move {
            let tcp = async_tcp(tcp)?;
            let tls = tokio_rustls::TlsConnector::from(config)
                .connect(mesh_pki::tls::server_name(), tcp)
                .await
                .context("tls handshake with a valid certificate")?;
            let (mut h2, conn) = h2::client::handshake(tls)
                .await
                .context("http/2 handshake")?;
            let conn = tokio::spawn(conn);
            for (method, uri, want, _) in bad {
                let req = Request::builder()
                    .method(method.clone())
                    .uri(&uri)
                    .body(())?;
                h2 = h2.ready().await.context("http/2 connection ready")?;
                let (response, mut body) = h2.send_request(req, false)?;
                // Bytes sent before any answer must not leak anywhere either. The agent may
                // have answered and closed the stream already (then h2 refuses to send on
                // it: "inactive stream"), which leaves nothing to leak.
                let _ = body.send_data(Bytes::from_static(b"HOSTILE-early-data"), false);
                let response = tokio::time::timeout(IO_TIMEOUT, response)
                    .await
                    .with_context(|| format!("{method} {uri}: no response"))??;
                ensure!(
                    response.status() == want,
                    "{method} {uri}: got {}, want {want}",
                    response.status()
                );
            }
            h2 = h2
                .ready()
                .await
                .context("http/2 connection ready after the refusals")?;
            let echoed = connect_and_echo(&mut h2, authority, b"LEGIT-h2-connect").await?;
            ensure!(
                echoed == b"LEGIT-h2-connect",
                "valid CONNECT echoed {:?}",
                String::from_utf8_lossy(&echoed)
            );
            drop(h2);
            conn.abort();
            Ok(())
        })?;
        for (reason, want) in want_counts {
            wait_for_count(self.mesh, "n2", "destination", reason, want)?;
        }
        Ok(())
    }
}

/// TCP (from the pod) → TLS handshake → the server's first word: an alert (refused) or its
/// HTTP/2 SETTINGS (accepted: an HBONE server speaks first once TLS is up).
///
/// In TLS 1.3 the client has finished its handshake before the server has looked at the
/// client's certificate, so the verdict arrives on the first read. The client sends nothing
/// more until it has it: bytes the server never reads would make its close a reset, which can
/// destroy the alert before it is read.
async fn handshake_verdict(tcp: std::net::TcpStream, config: Arc<ClientConfig>) -> Result<Outcome> {
    let tcp = async_tcp(tcp)?;
    let mut tls = match tokio_rustls::TlsConnector::from(config)
        .connect(mesh_pki::tls::server_name(), tcp)
        .await
    {
        Ok(tls) => tls,
        Err(e) => return Ok(outcome_of_io(&e)),
    };
    let mut first = [0u8; 256];
    let read = tokio::time::timeout(IO_TIMEOUT, tls.read(&mut first))
        .await
        .context("the server said nothing after the handshake")?;
    Ok(match read {
        Ok(0) => Outcome::Failed("closed without an alert".to_owned()),
        Ok(n) => Outcome::Accepted(n),
        Err(e) => outcome_of_io(&e),
    })
}

/// Opens a CONNECT to `authority` on `h2`, sends `payload`, half-closes and returns what came
/// back until the server's end of stream.
async fn connect_and_echo(
    h2: &mut h2::client::SendRequest<Bytes>,
    authority: SocketAddr,
    payload: &'static [u8],
) -> Result<Vec<u8>> {
    let req = Request::builder()
        .method(Method::CONNECT)
        .uri(authority.to_string())
        .body(())?;
    let (response, mut body) = h2.send_request(req, false)?;
    let response = tokio::time::timeout(IO_TIMEOUT, response)
        .await
        .context("valid CONNECT: no response")??;
    ensure!(
        response.status() == StatusCode::OK,
        "valid CONNECT: {}",
        response.status()
    );
    body.send_data(Bytes::from_static(payload), true)?;
    let mut recv = response.into_body();
    let mut back = Vec::new();
    loop {
        let chunk = tokio::time::timeout(IO_TIMEOUT, recv.data())
            .await
            .context("valid CONNECT: waiting for the echo")?;
        let Some(chunk) = chunk else { break };
        let chunk = chunk?;
        recv.flow_control().release_capacity(chunk.len())?;
        back.extend_from_slice(&chunk);
    }
    Ok(back)
}

fn outcome_of_io(e: &io::Error) -> Outcome {
    match e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
    {
        Some(rustls::Error::AlertReceived(alert)) => Outcome::Alert(*alert),
        _ => Outcome::Failed(e.to_string()),
    }
}

/// A TLS client config presenting `cert` (or none), verifying the server as a mesh client
/// would, and offering what `flavour` says.
fn client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    cert: Option<&WorkloadCert>,
    flavour: Flavour,
) -> Result<Arc<ClientConfig>> {
    let (provider, version) = match flavour {
        // The mesh provider has TLS 1.3 suites only; a TLS 1.2 client needs ring's full set.
        Flavour::Tls12Only => (Arc::new(ring::default_provider()), &rustls::version::TLS12),
        _ => (mesh_pki::tls::provider(), &rustls::version::TLS13),
    };
    let builder = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[version])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    let mut config = match cert {
        Some(c) => builder.with_client_auth_cert(c.chain.clone(), c.key.clone_key())?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = match flavour {
        Flavour::Hbone | Flavour::Tls12Only => vec![b"h2".to_vec()],
        Flavour::NoAlpn => Vec::new(),
        Flavour::Http11Alpn => vec![b"http/1.1".to_vec()],
    };
    config.enable_sni = false;
    Ok(Arc::new(config))
}

/// A TLS record header of content type alert (21) with a 2-byte body: what rustls sends when
/// it gives up on a peer.
fn is_tls_alert_record(bytes: &[u8]) -> bool {
    matches!(bytes, [21, 3, _, 0, 2, _, _])
}

// === the rogue server ===

/// What the rogue server saw of one TLS handshake.
#[derive(Clone, Debug, PartialEq)]
enum Handshake {
    Completed,
    /// The client aborted with this alert.
    Alert(AlertDescription),
    Failed(String),
}

/// A TLS + HTTP/2 server on a pod's 15008 that presents whatever certificate it is told to,
/// records every handshake and every CONNECT, and echoes the tunnels it opens.
struct RogueServer {
    persona: Arc<Mutex<Arc<rustls::ServerConfig>>>,
    handshakes: Arc<Mutex<Vec<Handshake>>>,
    tunnels: Arc<Mutex<Vec<String>>>,
}

impl RogueServer {
    fn start(mesh: &Mesh, rt: &Runtime, pod: &str, cert: &WorkloadCert) -> Result<RogueServer> {
        let listener = listen_in(mesh, rt, pod, HBONE_PORT)?;
        let server = RogueServer {
            persona: Arc::new(Mutex::new(server_config(cert)?)),
            handshakes: Arc::default(),
            tunnels: Arc::default(),
        };
        let (persona, handshakes, tunnels) = (
            server.persona.clone(),
            server.handshakes.clone(),
            server.tunnels.clone(),
        );
        rt.spawn(async move {
            // An accept error ends the server (and fails the test) rather than spinning.
            while let Ok((tcp, _)) = listener.accept().await {
                let config = lock(&persona).clone();
                let (handshakes, tunnels) = (handshakes.clone(), tunnels.clone());
                tokio::spawn(async move {
                    let tls = match tokio_rustls::TlsAcceptor::from(config).accept(tcp).await {
                        Ok(tls) => tls,
                        Err(e) => {
                            let seen = match outcome_of_io(&e) {
                                Outcome::Alert(a) => Handshake::Alert(a),
                                _ => Handshake::Failed(e.to_string()),
                            };
                            lock(&handshakes).push(seen);
                            return;
                        }
                    };
                    lock(&handshakes).push(Handshake::Completed);
                    let _ =
                        mesh_hbone::serve(tls, &mesh_hbone::ServerConfig::default(), move |req| {
                            lock(&tunnels).push(req.authority_str().unwrap_or_default().to_owned());
                            async move {
                                let Ok(stream) = req.accept() else { return };
                                let (mut r, mut w) = tokio::io::split(stream);
                                let _ = tokio::io::copy(&mut r, &mut w).await;
                                let _ = w.shutdown().await;
                            }
                        })
                        .await;
                });
            }
        });
        Ok(server)
    }

    /// From the next connection on, present `cert`.
    fn present(&self, cert: &WorkloadCert) -> Result<()> {
        *lock(&self.persona) = server_config(cert)?;
        Ok(())
    }

    fn handshakes(&self) -> Vec<Handshake> {
        lock(&self.handshakes).clone()
    }

    fn tunnels(&self) -> Vec<String> {
        lock(&self.tunnels).clone()
    }
}

/// What an HBONE server offers: TLS 1.3, ALPN h2; no client authentication (the rogue does
/// not care who calls).
fn server_config(cert: &WorkloadCert) -> Result<Arc<rustls::ServerConfig>> {
    let mut config = rustls::ServerConfig::builder_with_provider(mesh_pki::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(cert.chain.clone(), cert.key.clone_key())?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

// === the recording app ===

/// One connection an app accepted.
#[derive(Clone, Debug)]
struct Seen {
    peer: SocketAddr,
    received: Vec<u8>,
}

/// An echo server inside a pod that records every connection it accepts and every byte it
/// receives: the ground truth for "the app saw nothing".
struct Recorder {
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Recorder {
    fn start(mesh: &Mesh, rt: &Runtime, pod: &str, port: u16) -> Result<Recorder> {
        let listener = listen_in(mesh, rt, pod, port)?;
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = seen.clone();
        rt.spawn(async move {
            // An accept error ends the recorder (and fails the test) rather than spinning.
            while let Ok((mut tcp, peer)) = listener.accept().await {
                let index = {
                    let mut all = lock(&record);
                    all.push(Seen {
                        peer,
                        received: Vec::new(),
                    });
                    all.len() - 1
                };
                let record = record.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while let Ok(n @ 1..) = tcp.read(&mut buf).await {
                        lock(&record)[index].received.extend_from_slice(&buf[..n]);
                        if tcp.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                    let _ = tcp.shutdown().await;
                });
            }
        });
        Ok(Recorder { seen })
    }

    fn seen(&self) -> Vec<Seen> {
        lock(&self.seen).clone()
    }
}

// === helpers ===

fn runtime() -> Result<Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("build the test runtime")
}

/// A listener on `0.0.0.0:port` inside the pod's network namespace, served by `rt`.
fn listen_in(mesh: &Mesh, rt: &Runtime, pod: &str, port: u16) -> Result<tokio::net::TcpListener> {
    let listener = mesh
        .in_pod(pod, move || {
            std::net::TcpListener::bind((Ipv4Addr::UNSPECIFIED, port))
        })?
        .with_context(|| format!("bind :{port} in {pod}"))?;
    listener.set_nonblocking(true)?;
    let _runtime = rt.enter();
    tokio::net::TcpListener::from_std(listener)
        .with_context(|| format!("register :{port} in {pod}"))
}

fn async_tcp(tcp: std::net::TcpStream) -> Result<tokio::net::TcpStream> {
    tcp.set_nonblocking(true)?;
    Ok(tokio::net::TcpStream::from_std(tcp)?)
}

/// Sends `payload` from the pod to `addr` and half-closes; returns whatever came back before
/// the peer closed. A reset counts as closed (with nothing received); a hang is an error.
fn closed_without_data(
    mesh: &Mesh,
    pod: &str,
    addr: SocketAddr,
    payload: &[u8],
) -> Result<Vec<u8>> {
    let mut tcp = mesh.connect(pod, addr)?;
    tcp.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut back = Vec::new();
    let result = tcp
        .write_all(payload)
        .and_then(|()| tcp.shutdown(Shutdown::Write))
        .and_then(|()| tcp.read_to_end(&mut back));
    match result {
        Ok(_) => Ok(back),
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::BrokenPipe
                    // The agent closed before our half-close reached it.
                    | io::ErrorKind::NotConnected
            ) =>
        {
            Ok(back)
        }
        Err(e) => bail!("{pod} → {addr}: neither answered nor closed: {e}"),
    }
}

fn refused(mesh: &Mesh, node: &str, reporter: &str, reason: &str) -> Result<f64> {
    let text = mesh.metrics(node)?;
    Ok(prom::sum(
        &text,
        REFUSED,
        &[("reporter", reporter), ("reason", reason)],
    ))
}

/// Waits until `node` has counted exactly `want` refusals for (`reporter`, `reason`).
fn wait_for_count(mesh: &Mesh, node: &str, reporter: &str, reason: &str, want: f64) -> Result<()> {
    let what =
        format!("{REFUSED}{{reporter={reporter},reason={reason}}} on {node} to reach {want}");
    eventually(&what, WAIT, || {
        let got = refused(mesh, node, reporter, reason)?;
        ensure!(got <= want, "{got} refusals: more than expected");
        ensure!(got == want, "{got} refusals so far");
        Ok(())
    })?;
    Ok(())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn ipv4(addr: SocketAddr) -> Ipv4Addr {
    match addr.ip() {
        std::net::IpAddr::V4(ip) => ip,
        std::net::IpAddr::V6(ip) => ip.to_ipv4_mapped().unwrap_or(Ipv4Addr::UNSPECIFIED),
    }
}

/// The state behind these locks is appended to in single steps, so a panic elsewhere cannot
/// leave it half-updated.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
