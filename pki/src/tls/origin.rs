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
    let verifier = verifier(settings.roots, settings.subject_alt_names)?;
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

/// The verifier of `roots` (`None`: none) and `subject_alt_names`.
fn verifier(
    roots: Option<RootCertStore>,
    subject_alt_names: Vec<String>,
) -> Result<OriginVerifier, TlsError> {
    let algorithms = PROVIDER.signature_verification_algorithms;
    let Some(roots) = roots else {
        return Ok(OriginVerifier::Insecure { algorithms });
    };
    let roots = Arc::new(roots);
    let webpki = WebPkiServerVerifier::builder_with_provider(roots.clone(), PROVIDER.clone())
        .build()
        .map_err(|e| TlsError::Parse(format!("server verifier: {e}")))?;
    let mut names = Vec::new();
    let mut uris = Vec::new();
    for san in subject_alt_names {
        if san.contains("://") {
            uris.push(san);
        } else {
            let name = ServerName::try_from(san.clone())
                .map_err(|_| TlsError::Parse(format!("{san:?} is not a server name")))?;
            names.push(name);
        }
    }
    Ok(OriginVerifier::Verify {
        webpki,
        roots,
        names,
        uris,
        algorithms,
    })
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

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};

    use super::*;

    /// A CA and a leaf it signed for DNS `api.test` and URI `spiffe://td/ns/a/sa/b`.
    fn pki() -> (CertificateDer<'static>, CertificateDer<'static>) {
        let ca_key = KeyPair::generate().expect("key");
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca_cert = ca.self_signed(&ca_key).expect("ca");
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().expect("key");
        let mut leaf = CertificateParams::default();
        leaf.subject_alt_names = vec![
            SanType::DnsName("api.test".try_into().expect("dns")),
            SanType::URI("spiffe://td/ns/a/sa/b".try_into().expect("uri")),
        ];
        let leaf = leaf.signed_by(&key, &issuer).expect("leaf");
        (ca_cert.der().clone(), leaf.der().clone())
    }

    #[test]
    fn the_server_is_checked_against_the_roots_and_one_of_the_names() {
        let (ca, leaf) = pki();
        let (stranger, _) = pki();
        let roots = |ca: &CertificateDer<'static>| {
            let mut r = RootCertStore::empty();
            r.add(ca.clone()).expect("root");
            Some(r)
        };
        let sni = ServerName::try_from("api.test").expect("name");
        let other = ServerName::try_from("web.test").expect("name");
        let check = |roots: Option<RootCertStore>, sans: &[&str], sni: &ServerName<'_>| {
            let v =
                verifier(roots, sans.iter().map(|s| s.to_string()).collect()).expect("verifier");
            v.verify_server_cert(&leaf, &[], sni, &[], UnixTime::now())
                .is_ok()
        };
        for (roots, sans, name, want) in [
            // No subjectAltNames: the SNI name.
            (roots(&ca), &[][..], &sni, true),
            (roots(&ca), &[], &other, false),
            // subjectAltNames replace the SNI name; one match is enough.
            (roots(&ca), &["web.test"], &sni, false),
            (roots(&ca), &["web.test", "api.test"], &other, true),
            (roots(&ca), &["spiffe://td/ns/a/sa/b"], &other, true),
            (roots(&ca), &["spiffe://td/ns/a/sa/c"], &sni, false),
            // Not our roots: no name helps.
            (roots(&stranger), &["api.test"], &sni, false),
            (roots(&stranger), &["spiffe://td/ns/a/sa/b"], &sni, false),
            // insecureSkipVerify.
            (None, &[], &other, true),
        ] {
            assert_eq!(check(roots, sans, name), want, "{sans:?} {name:?}");
        }
    }
}
