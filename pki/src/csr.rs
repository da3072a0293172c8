//! Certificate signing requests: made by the CA's clients (the node agent, the waypoint),
//! checked by the CA before anything is signed.
//!
//! A request the CA accepts is small PEM (at most [`MAX_CSR_PEM`] bytes), correctly
//! self-signed, for an ECDSA P-256/P-384 or RSA 2048–4096 key, and names only URI SANs
//! (the CA then requires exactly one, the identity it authorized).

use rcgen::{
    string::Ia5String, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    KeyPair, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use mesh_model::identity::Identity;

/// Largest CSR accepted, PEM text. A P-256 request is ~450 bytes, an RSA 4096 one ~1.7 KiB.
pub const MAX_CSR_PEM: usize = 8 * 1024;
/// RSA modulus sizes accepted, in bits.
pub const RSA_BITS: std::ops::RangeInclusive<usize> = 2048..=4096;

const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_P384: &str = "1.3.132.0.34";

/// Why a CSR was refused. The names are the `reason` label of the CA's refusal metric.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("csr larger than {MAX_CSR_PEM} bytes")]
    TooLarge,
    #[error("csr is not a PEM certificate request: {0}")]
    NotPem(String),
    #[error("csr does not parse or its signature does not verify: {0}")]
    Malformed(String),
    #[error("csr key not accepted: {0}")]
    Key(String),
    #[error("csr subject alternative names not accepted: {0}")]
    San(String),
}

impl CsrError {
    /// A short stable name (metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            CsrError::TooLarge => "csr_too_large",
            CsrError::NotPem(_) => "csr_not_pem",
            CsrError::Malformed(_) => "csr_malformed",
            CsrError::Key(_) => "csr_key",
            CsrError::San(_) => "csr_san",
        }
    }
}

/// The key type of a checked request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    EcdsaP256,
    EcdsaP384,
    Rsa { bits: usize },
}

/// A parsed request whose signature verified and whose key and SANs are acceptable.
#[derive(Debug)]
pub struct Csr {
    public_key: rcgen::PublicKey,
    key: KeyKind,
    uri_sans: Vec<String>,
}

impl Csr {
    /// Parses and checks a PEM request (see the module doc for what is accepted).
    pub fn parse_pem(text: &str) -> Result<Csr, CsrError> {
        if text.len() > MAX_CSR_PEM {
            return Err(CsrError::TooLarge);
        }
        let block = pem::parse(text).map_err(|e| CsrError::NotPem(e.to_string()))?;
        if !matches!(
            block.tag(),
            "CERTIFICATE REQUEST" | "NEW CERTIFICATE REQUEST"
        ) {
            return Err(CsrError::NotPem(format!("block is {:?}", block.tag())));
        }
        Self::parse_der(block.contents())
    }

    fn parse_der(der: &[u8]) -> Result<Csr, CsrError> {
        let (rest, parsed) =
            x509_parser::certification_request::X509CertificationRequest::from_der(der)
                .map_err(|e| CsrError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(CsrError::Malformed("trailing bytes".into()));
        }
        let spki = &parsed.certification_request_info.subject_pki;
        let key = match spki.parsed() {
            Ok(PublicKey::EC(_)) => {
                let curve = spki
                    .algorithm
                    .parameters
                    .as_ref()
                    .and_then(|p| p.as_oid().ok())
                    .map(|oid| oid.to_id_string())
                    .unwrap_or_default();
                match curve.as_str() {
                    OID_P256 => KeyKind::EcdsaP256,
                    OID_P384 => KeyKind::EcdsaP384,
                    other => return Err(CsrError::Key(format!("elliptic curve {other:?}"))),
                }
            }
            Ok(PublicKey::RSA(rsa)) => {
                let bits = rsa.key_size();
                if !RSA_BITS.contains(&bits) {
                    return Err(CsrError::Key(format!("rsa {bits} bits")));
                }
                KeyKind::Rsa { bits }
            }
            Ok(other) => {
                return Err(CsrError::Key(
                    format!("{other:?}").chars().take(40).collect(),
                ))
            }
            Err(e) => return Err(CsrError::Key(e.to_string())),
        };
        // rcgen verifies the self-signature and reads the requested extensions (refusing
        // any it does not know).
        let params =
            CertificateSigningRequestParams::from_der(&CertificateSigningRequestDer::from(der))
                .map_err(|e| CsrError::Malformed(e.to_string()))?;
        let mut uri_sans = Vec::new();
        for san in &params.params.subject_alt_names {
            match san {
                SanType::URI(uri) => uri_sans.push(uri.as_str().to_string()),
                other => return Err(CsrError::San(format!("non-URI SAN {other:?}"))),
            }
        }
        if uri_sans.is_empty() {
            return Err(CsrError::San("no URI SAN".into()));
        }
        Ok(Csr {
            public_key: params.public_key,
            key,
            uri_sans,
        })
    }

    pub fn key_kind(&self) -> KeyKind {
        self.key
    }

    /// The URI SANs requested, in order.
    pub fn uri_sans(&self) -> &[String] {
        &self.uri_sans
    }

    pub(crate) fn public_key(&self) -> &rcgen::PublicKey {
        &self.public_key
    }
}

/// A fresh ECDSA P-256 key and a PEM request for `id` (one URI SAN, empty subject): what the
/// mesh's own CA clients send.
pub fn generate(id: &Identity) -> Result<(String, KeyPair), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(Ia5String::try_from(id.uri())?)];
    let csr = params.serialize_request(&key)?;
    Ok((csr.pem()?, key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{PKCS_ECDSA_P384_SHA384, PKCS_ED25519};

    fn id() -> Identity {
        Identity::new("cluster.local", "demo", "client")
    }

    fn request(key: &KeyPair, sans: Vec<SanType>) -> String {
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        params
            .serialize_request(key)
            .expect("serialize")
            .pem()
            .expect("pem")
    }

    fn uri(s: &str) -> SanType {
        SanType::URI(Ia5String::try_from(s).expect("ia5"))
    }

    #[test]
    fn a_generated_request_parses_with_its_identity_and_key() {
        let (pem, _key) = generate(&id()).expect("generate");
        let csr = Csr::parse_pem(&pem).expect("parse");
        assert_eq!(csr.uri_sans(), [id().uri()]);
        assert_eq!(csr.key_kind(), KeyKind::EcdsaP256);
    }

    #[test]
    fn requests_are_refused_by_named_reason() {
        let p256 = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).expect("key");
        let ed = KeyPair::generate_for(&PKCS_ED25519).expect("key");
        let good = request(&p256, vec![uri(&id().uri())]);
        // A valid request whose body was altered after signing.
        let block = pem::parse(&good).expect("pem");
        let mut der = block.contents().to_vec();
        let last = der.len() - 1;
        der[last] ^= 0x01;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));

        let cases: Vec<(&str, String, Result<KeyKind, &str>)> = vec![
            (
                "p384 is accepted",
                request(&p384, vec![uri(&id().uri())]),
                Ok(KeyKind::EcdsaP384),
            ),
            (
                "oversized",
                "x".repeat(MAX_CSR_PEM + 1),
                Err("csr_too_large"),
            ),
            ("garbage", "hello".into(), Err("csr_not_pem")),
            (
                "a certificate, not a request",
                pem::encode(&pem::Pem::new("CERTIFICATE", vec![1, 2, 3])),
                Err("csr_not_pem"),
            ),
            (
                "not der",
                pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", vec![1, 2, 3])),
                Err("csr_malformed"),
            ),
            ("bad signature", tampered, Err("csr_malformed")),
            (
                "ed25519 key",
                request(&ed, vec![uri(&id().uri())]),
                Err("csr_key"),
            ),
            ("no san", request(&p256, vec![]), Err("csr_san")),
            (
                "a dns san",
                request(
                    &p256,
                    vec![
                        uri(&id().uri()),
                        SanType::DnsName("x.example".try_into().expect("dns")),
                    ],
                ),
                Err("csr_san"),
            ),
        ];
        for (name, pem, want) in cases {
            let got = Csr::parse_pem(&pem)
                .map(|c| c.key_kind())
                .map_err(|e| e.reason());
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn two_uri_sans_parse_so_that_the_ca_can_refuse_them_by_name() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let other = Identity::new("cluster.local", "demo", "admin").uri();
        let csr =
            Csr::parse_pem(&request(&key, vec![uri(&id().uri()), uri(&other)])).expect("parse");
        assert_eq!(csr.uri_sans().len(), 2);
    }
}

#[cfg(test)]
mod prop_tests;
