//! TLS a proxy originates to an application (DestinationRule `tls` `SIMPLE` / `MUTUAL`),
//! unlike HBONE an ordinary web PKI client: TLS 1.2 or 1.3 (ring's default suites), SNI,
//! ALPN as the caller asks, the server's chain verified against the given roots and its
//! name against `subjectAltNames` (one of them) or else the SNI name, optionally a client
//! certificate. Nothing here reads a file: the caller parses the PEM files it was given
//! (`mesh_l7::origin`).

use std::sync::{Arc, LazyLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, WebPkiServerVerifier};
use rustls::crypto::{ring, CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use x509_parser::extensions::GeneralName;

use super::{parse, TlsError};

/// ring with its default suites (TLS 1.2 and 1.3): an application is not a mesh peer and
/// may not speak TLS 1.3 with AES-GCM only.
static PROVIDER: LazyLock<Arc<CryptoProvider>> =
    LazyLock::new(|| Arc::new(ring::default_provider()));

/// What an originating client is built from.
pub struct OriginSettings {
    /// The roots the server's chain must verify against; `None`: no verification at all
    /// (`insecureSkipVerify`).
    pub roots: Option<RootCertStore>,
    /// The server certificate must be valid for one of these (DNS names and IP addresses
    /// as web PKI checks them, `scheme://` URIs against its URI SANs); empty: for the SNI
    /// name.
    pub subject_alt_names: Vec<String>,
    /// The client certificate chain and its key (`MUTUAL`).
    pub client: Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>,
    /// ALPN protocols offered, in order.
    pub alpn: Vec<Vec<u8>>,
}

/// A client config for [`OriginSettings`]. `Err` when a name is not a valid server name,
/// the client key does not match its certificate or rustls refuses the parts.
pub fn client_config(settings: OriginSettings) -> Result<Arc<ClientConfig>, TlsError> {
    let algorithms = PROVIDER.signature_verification_algorithms;
    let verifier = match settings.roots {
        None => OriginVerifier::Insecure { algorithms },
        Some(roots) => {
            let roots = Arc::new(roots);
            let webpki =
                WebPkiServerVerifier::builder_with_provider(roots.clone(), PROVIDER.clone())
                    .build()
                    .map_err(|e| TlsError::Parse(format!("server verifier: {e}")))?;
            let mut names = Vec::new();
            let mut uris = Vec::new();
            for san in settings.subject_alt_names {
                if san.contains("://") {
                    uris.push(san);
                } else {
                    let name = ServerName::try_from(san.clone())
                        .map_err(|_| TlsError::Parse(format!("{san:?} is not a server name")))?;
                    names.push(name);
                }
            }
            OriginVerifier::Verify {
                webpki,
                roots,
                names,
                uris,
                algorithms,
            }
        }
    };
    let builder = ClientConfig::builder_with_provider(PROVIDER.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config {
            side: "origination",
            source,
        })?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier));
    let mut config = match settings.client {
        None => builder.with_no_client_auth(),
        Some((chain, key)) => builder
            .with_client_auth_cert(chain, key)
            .map_err(|source| TlsError::Config {
                side: "origination client certificate",
                source,
            })?,
    };
    config.alpn_protocols = settings.alpn;
    Ok(Arc::new(config))
}

/// How an originating client judges the application's certificate.
#[derive(Debug)]
enum OriginVerifier {
    /// `insecureSkipVerify`: any certificate (the handshake signatures are still checked,
    /// so the peer holds the key of the certificate it sent).
    Insecure {
        algorithms: WebPkiSupportedAlgorithms,
    },
    Verify {
        webpki: Arc<WebPkiServerVerifier>,
        roots: Arc<RootCertStore>,
        /// `subjectAltNames` that are DNS names or IP addresses.
        names: Vec<ServerName<'static>>,
        /// `subjectAltNames` that are URIs.
        uris: Vec<String>,
        algorithms: WebPkiSupportedAlgorithms,
    },
}

impl OriginVerifier {
    fn algorithms(&self) -> &WebPkiSupportedAlgorithms {
        match self {
            OriginVerifier::Insecure { algorithms } | OriginVerifier::Verify { algorithms, .. } => {
                algorithms
            }
        }
    }
}

// === impl OriginVerifier ===

impl ServerCertVerifier for OriginVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let OriginVerifier::Verify {
            webpki,
            roots,
            names,
            uris,
            algorithms,
        } = self
        else {
            return Ok(ServerCertVerified::assertion());
        };
        if names.is_empty() && uris.is_empty() {
            return webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp, now);
        }
        let mut last = rustls::Error::InvalidCertificate(CertificateError::NotValidForName);
        for name in names {
            match webpki.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
                Ok(verified) => return Ok(verified),
                Err(e) => last = e,
            }
        }
        if !uris.is_empty() {
            let cert = ParsedCertificate::try_from(end_entity)?;
            verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                algorithms.all,
            )?;
            let has = uri_sans(end_entity)?;
            if uris.iter().any(|want| has.iter().any(|got| got == want)) {
                return Ok(ServerCertVerified::assertion());
            }
        }
        Err(last)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.algorithms())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.algorithms())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms().supported_schemes()
    }
}

/// The URI SANs of `cert` (none with a NUL byte).
fn uri_sans(cert: &CertificateDer<'_>) -> Result<Vec<String>, rustls::Error> {
    let bad = |e: TlsError| {
        rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
    };
    let x509 = parse(cert).map_err(bad)?;
    let san = x509
        .subject_alternative_name()
        .map_err(|e| bad(TlsError::Parse(format!("subject alternative name: {e}"))))?;
    let mut uris = Vec::new();
    for name in san.iter().flat_map(|s| s.value.general_names.iter()) {
        if let GeneralName::URI(uri) = name {
            if uri.contains('\0') {
                return Err(bad(TlsError::NulInSan));
            }
            uris.push(uri.to_string());
        }
    }
    Ok(uris)
}
