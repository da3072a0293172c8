//! rustls configurations for HBONE and SPIFFE verification, wire-compatible with Istio's
//! ztunnel: TLS 1.3 only, AES-GCM suites only, ALPN `h2`, no SNI, mutual authentication with
//! leaf + chain on both sides, verified against the mesh roots.
//!
//! - Server (port 15008): requires a client certificate chaining to a mesh root, in this trust
//!   domain, and reads the peer identity from its URI SAN.
//! - Client: presents the source workload's certificate and accepts only a server whose URI SAN
//!   is one of the expected destination identities.
//!
//! Neither side holds a certificate: both ask [`CertManager`] for the current one on every
//! handshake, so rotation never touches live connections. Session resumption is disabled on
//! both sides: a resumed session skips certificate verification, so an identity (and its
//! expiry) would no longer be checked on every connection.

use std::fmt;
use std::sync::{Arc, LazyLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, ResolvesClientCert, Resumption};
use rustls::crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ParsedCertificate, ResolvesServerCert,
    WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName,
    OtherError, RootCertStore, ServerConfig, SignatureScheme,
};
use tracing::{info, warn};
use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;

use crate::certs::CertManager;
use mesh_model::identity::{Identity, IdentityError};

pub mod ingress;
pub mod origin;

/// The only application protocol spoken on HBONE connections.
pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("build {side} tls config: {source}")]
    Config {
        side: &'static str,
        source: rustls::Error,
    },
    #[error("build client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("{side} tls config for {id}: trust domain is not {trust_domain}")]
    ForeignLocalIdentity {
        side: &'static str,
        id: Identity,
        trust_domain: String,
    },
    #[error("client tls config for {0}: no expected server identity")]
    NoExpectedIdentity(Identity),
    #[error("parse certificate: {0}")]
    Parse(String),
    #[error("certificate has {0} uri sans, expected exactly one spiffe id")]
    UriSanCount(usize),
    #[error("certificate uri san is not a spiffe id: {0}")]
    NotSpiffe(IdentityError),
    #[error("certificate has a spiffe id in a dns san: {0:?}")]
    SpiffeInDnsSan(String),
    #[error("certificate has a nul byte in a san")]
    NulInSan,
    #[error("end-entity certificate is a ca")]
    LeafIsCa,
    #[error("certificate lacks the {0} extended key usage")]
    MissingEku(&'static str),
    #[error("certificate key usage lacks digitalSignature")]
    MissingDigitalSignature,
    #[error("peer identity {got}: trust domain is not {want}")]
    ForeignTrustDomain { got: Identity, want: String },
    #[error("server identity {got} is not one of the expected {expected:?}")]
    UnexpectedIdentity {
        got: Identity,
        expected: Vec<String>,
    },
    #[error("peer presented no certificate")]
    NoPeerCertificate,
}

/// Which end of a connection a certificate authenticates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Client,
    Server,
}

/// The crypto provider for every mesh connection: ring, TLS 1.3 AES-GCM suites only.
/// Chosen explicitly, never the process default, so another library cannot change it.
static PROVIDER: LazyLock<Arc<CryptoProvider>> = LazyLock::new(|| {
    Arc::new(CryptoProvider {
        cipher_suites: vec![
            ring::cipher_suite::TLS13_AES_128_GCM_SHA256,
            ring::cipher_suite::TLS13_AES_256_GCM_SHA384,
        ],
        ..ring::default_provider()
    })
});

pub fn provider() -> Arc<CryptoProvider> {
    PROVIDER.clone()
}

/// HBONE server (port 15008) for the local workload `local`: requires a client certificate
/// chaining to a mesh root in this trust domain; presents `local`'s *current* cert through a
/// `ResolvesServerCert` that asks the CertManager on each handshake (so rotation never touches
/// live connections). Clients that do not offer ALPN `h2` are refused.
pub fn server_config(
    certs: Arc<CertManager>,
    local: Identity,
) -> Result<Arc<ServerConfig>, TlsError> {
    if local.trust_domain != certs.trust_domain() {
        return Err(TlsError::ForeignLocalIdentity {
            side: "server",
            id: local,
            trust_domain: certs.trust_domain().to_string(),
        });
    }
    let verifier = client_verifier(certs.clone())?;
    let resolver = Arc::new(ServerCertResolver { certs, local });
    Ok(Arc::new(build_server_config(verifier, resolver)?))
}

/// HBONE client presenting `src`'s current certificate and accepting only a server whose URI
/// SAN is one of `expected` and whose chain verifies against the mesh roots.
///
/// Cheap enough to build per outbound destination: the provider and the parsed roots are
/// shared, so this is a handful of small allocations.
pub fn client_config(
    certs: Arc<CertManager>,
    src: Identity,
    expected: Vec<Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    if src.trust_domain != certs.trust_domain() {
        return Err(TlsError::ForeignLocalIdentity {
            side: "client",
            id: src,
            trust_domain: certs.trust_domain().to_string(),
        });
    }
    if expected.is_empty() {
        return Err(TlsError::NoExpectedIdentity(src));
    }
    let verifier = server_verifier(certs.root_store(), expected);
    let resolver = Arc::new(ClientCertResolver { certs, src });
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            side: "client",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // The server is identified by its SPIFFE ID, not a host name; nothing to send.
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// How an HBONE client judges a server: the chain verifies against `roots` (no DNS name
/// check), the leaf passes the mesh's rules and its identity is one of `expected`. Public so
/// that tests building unusual clients judge servers exactly as the mesh does.
pub fn server_verifier(
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
) -> Arc<dyn ServerCertVerifier> {
    Arc::new(ServerIdentityVerifier::new(roots, expected))
}

/// The SPIFFE identity of an end-entity certificate: exactly one URI SAN, `spiffe://` form, no
/// `spiffe://` DNS SAN, no NUL byte in any SAN.
pub fn identity_from_cert(cert: &CertificateDer<'_>) -> Result<Identity, TlsError> {
    identity_of(&parse(cert)?)
}

/// Everything the mesh requires of a peer's leaf beyond chain verification: its identity
/// ([`identity_from_cert`]), not a CA, the extended key usage for `role` present (webpki
/// accepts a leaf without any EKU extension; we do not), and digitalSignature if key usage is
/// restricted.
pub fn verify_leaf(cert: &CertificateDer<'_>, role: Role) -> Result<Identity, TlsError> {
    let x509 = parse(cert)?;
    let id = identity_of(&x509)?;
    let bc = x509
        .basic_constraints()
        .map_err(|e| TlsError::Parse(format!("basic constraints: {e}")))?;
    if bc.is_some_and(|bc| bc.value.ca) {
        return Err(TlsError::LeafIsCa);
    }
    let eku = x509
        .extended_key_usage()
        .map_err(|e| TlsError::Parse(format!("extended key usage: {e}")))?;
    let (has_usage, name) = match role {
        Role::Client => (
            eku.as_ref().is_some_and(|e| e.value.client_auth),
            "clientAuth",
        ),
        Role::Server => (
            eku.as_ref().is_some_and(|e| e.value.server_auth),
            "serverAuth",
        ),
    };
    if !has_usage {
        return Err(TlsError::MissingEku(name));
    }
    let ku = x509
        .key_usage()
        .map_err(|e| TlsError::Parse(format!("key usage: {e}")))?;
    if ku.is_some_and(|ku| !ku.value.digital_signature()) {
        return Err(TlsError::MissingDigitalSignature);
    }
    Ok(id)
}

/// After a handshake: the peer's identity (server side: the client's; client side: the
/// server's). The certificate was verified during the handshake; this only reads it.
pub fn peer_identity(conn: &CommonState) -> Result<Identity, TlsError> {
    let leaf = conn
        .peer_certificates()
        .and_then(|certs| certs.first())
        .ok_or(TlsError::NoPeerCertificate)?;
    identity_from_cert(leaf)
}

/// The rustls server name to pass to `TlsConnector::connect` (any fixed value; SNI is disabled
/// and the server is verified by its SPIFFE ID, never by this name).
pub fn server_name() -> ServerName<'static> {
    ServerName::IpAddress(std::net::IpAddr::from([0, 0, 0, 0]).into())
}

// === helpers ===

fn build_server_config(
    verifier: Arc<dyn ClientCertVerifier>,
    resolver: Arc<dyn ResolvesServerCert>,
) -> Result<ServerConfig, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|source| TlsError::Config {
            side: "server",
            source,
        })?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

fn client_verifier(certs: Arc<CertManager>) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    let roots = certs.root_store();
    let inner = webpki_client_verifier(roots.clone())?;
    Ok(Arc::new(ClientIdentityVerifier {
        trust_domain: certs.trust_domain().to_string(),
        current: PerRoots::new("client verifier", roots, inner),
        certs,
    }))
}

/// A verifier built for one set of roots, rebuilt when the roots in force change (a trust
/// bundle learned from the CA: root rotation). One pointer comparison per handshake when they
/// did not. Used by the 15008 client-certificate verifier and the CA client's.
pub(crate) struct PerRoots<V: ?Sized> {
    what: &'static str,
    current: std::sync::Mutex<(Arc<RootCertStore>, Arc<V>)>,
}

impl<V: ?Sized> PerRoots<V> {
    pub(crate) fn new(what: &'static str, roots: Arc<RootCertStore>, verifier: Arc<V>) -> Self {
        PerRoots {
            what,
            current: std::sync::Mutex::new((roots, verifier)),
        }
    }

    /// The verifier of `roots`: the cached one, or a new one from `build`.
    pub(crate) fn get<E: fmt::Display>(
        &self,
        roots: Arc<RootCertStore>,
        build: impl FnOnce(Arc<RootCertStore>) -> Result<Arc<V>, E>,
    ) -> Result<Arc<V>, rustls::Error> {
        let mut current = self
            .current
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !Arc::ptr_eq(&current.0, &roots) {
            let verifier = build(roots.clone())
                .map_err(|e| rustls::Error::General(format!("{}: {e}", self.what)))?;
            info!(
                roots = roots.roots.len(),
                "trust bundle changed: {} rebuilt", self.what
            );
            *current = (roots, verifier);
        }
        Ok(current.1.clone())
    }
}

fn webpki_client_verifier(
    roots: Arc<RootCertStore>,
) -> Result<Arc<dyn ClientCertVerifier>, rustls::server::VerifierBuilderError> {
    // No root hints: they only lengthen every CertificateRequest, and a mesh client has one
    // certificate to offer anyway.
    WebPkiClientVerifier::builder_with_provider(roots, provider())
        .clear_root_hint_subjects()
        .build()
}

fn parse<'a>(cert: &'a CertificateDer<'_>) -> Result<X509Certificate<'a>, TlsError> {
    let (rest, x509) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| TlsError::Parse(e.to_string()))?;
    if !rest.is_empty() {
        return Err(TlsError::Parse(
            "trailing data after the certificate".into(),
        ));
    }
    Ok(x509)
}

fn identity_of(x509: &X509Certificate<'_>) -> Result<Identity, TlsError> {
    // `subject_alternative_name` refuses a certificate with two SAN extensions.
    let san = x509
        .subject_alternative_name()
        .map_err(|e| TlsError::Parse(format!("subject alternative name: {e}")))?
        .ok_or(TlsError::UriSanCount(0))?;
    let mut uris = Vec::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::URI(uri) => {
                if uri.contains('\0') {
                    return Err(TlsError::NulInSan);
                }
                uris.push(*uri);
            }
            GeneralName::DNSName(dns) | GeneralName::RFC822Name(dns) => {
                if dns.contains('\0') {
                    return Err(TlsError::NulInSan);
                }
                // Some verifiers read identities from DNS SANs; a SPIFFE ID there is an attempt
                // to be two workloads at once.
                if dns.to_ascii_lowercase().contains("spiffe:") {
                    return Err(TlsError::SpiffeInDnsSan(dns.to_string()));
                }
            }
            _ => {}
        }
    }
    match uris.as_slice() {
        [uri] => uri.parse::<Identity>().map_err(TlsError::NotSpiffe),
        _ => Err(TlsError::UriSanCount(uris.len())),
    }
}

/// A verification failure as rustls reports it, keeping our reason for logs and metrics
/// (see [`refusal`]).
fn reject(error: TlsError) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Refusal(
        error,
    )))))
}

/// The mesh rule a peer certificate broke, if that is why a handshake failed (as opposed to
/// the chain not verifying, which rustls reports with its own `CertificateError`s).
pub fn refusal(error: &rustls::Error) -> Option<&TlsError> {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(other))) => {
            other.downcast_ref::<Refusal>().map(|r| &r.0)
        }
        _ => None,
    }
}

/// Carries a [`TlsError`] through rustls. rustls prints the inner error with `Debug`, so this
/// `Debug` is the readable message.
struct Refusal(TlsError);

impl fmt::Debug for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for Refusal {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

// === impl ServerCertResolver ===

/// Presents the local workload's current certificate, to clients that offer `h2`.
#[derive(Debug)]
struct ServerCertResolver {
    certs: Arc<CertManager>,
    local: Identity,
}

impl ResolvesServerCert for ServerCertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls continues without ALPN when the client offers none; HBONE is HTTP/2 only, so
        // refuse here (no certificate = handshake failure) instead of in the HTTP layer.
        let offers_h2 = hello
            .alpn()
            .is_some_and(|mut protocols| protocols.any(|p| p == ALPN_H2));
        if !offers_h2 {
            info!(local = %self.local, "refusing tls client: it does not offer alpn h2 (HBONE is HTTP/2 only)");
            return None;
        }
        match self.certs.certified_key(&self.local) {
            Ok(key) => Some(key),
            Err(error) => {
                warn!(local = %self.local, %error, "no certificate to present");
                None
            }
        }
    }
}

// === impl ClientCertResolver ===

/// Presents the source workload's current certificate.
#[derive(Debug)]
struct ClientCertResolver {
    certs: Arc<CertManager>,
    src: Identity,
}

impl ResolvesClientCert for ClientCertResolver {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        match self.certs.certified_key(&self.src) {
            Ok(key) => Some(key),
            Err(error) => {
                warn!(src = %self.src, %error, "no client certificate to present");
                None
            }
        }
    }

    fn has_certs(&self) -> bool {
        true
    }
}

// === impl ClientIdentityVerifier ===

/// Server side: webpki chain verification (client usage) against the roots in force *now*
/// (a trust bundle learned from the CA can change: root rotation), then the mesh's leaf rules
/// and the trust domain.
struct ClientIdentityVerifier {
    certs: Arc<CertManager>,
    /// The webpki verifier of the roots it was built for; rebuilt when they change.
    current: PerRoots<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl fmt::Debug for ClientIdentityVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientIdentityVerifier")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl ClientIdentityVerifier {
    /// The verifier of the current roots (one pointer comparison when they did not change).
    fn inner(&self) -> Result<Arc<dyn ClientCertVerifier>, rustls::Error> {
        self.current
            .get(self.certs.root_store(), webpki_client_verifier)
    }
}

impl ClientCertVerifier for ClientIdentityVerifier {
    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // Cleared (see `webpki_client_verifier`).
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner()?
            .verify_client_cert(end_entity, intermediates, now)?;
        let id = verify_leaf(end_entity, Role::Client).map_err(reject)?;
        if id.trust_domain != self.trust_domain {
            return Err(reject(TlsError::ForeignTrustDomain {
                got: id,
                want: self.trust_domain.clone(),
            }));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner()?.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        PROVIDER
            .signature_verification_algorithms
            .supported_schemes()
    }
}

// === impl ServerIdentityVerifier ===

/// Client side: webpki chain verification (server usage) against the mesh roots, no DNS name
/// check, then the mesh's leaf rules and the expected identities.
#[derive(Debug)]
struct ServerIdentityVerifier {
    roots: Arc<RootCertStore>,
    expected: Vec<Identity>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerIdentityVerifier {
    fn new(roots: Arc<RootCertStore>, expected: Vec<Identity>) -> Self {
        ServerIdentityVerifier {
            roots,
            expected,
            algorithms: PROVIDER.signature_verification_algorithms,
        }
    }
}

impl ServerCertVerifier for ServerIdentityVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        let id = verify_leaf(end_entity, Role::Server).map_err(reject)?;
        if !self.expected.contains(&id) {
            return Err(reject(TlsError::UnexpectedIdentity {
                got: id,
                expected: self.expected.iter().map(Identity::to_string).collect(),
            }));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests;
