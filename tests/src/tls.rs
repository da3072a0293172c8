//! TLS for test backends outside the mesh (DestinationRule `tls` `SIMPLE`/`MUTUAL`): a
//! throwaway CA issuing server and client certificates as PEM files, the rustls server
//! config `mesh-echo --tls-cert` serves with, and what a server reports of a TLS connection
//! (SNI, ALPN, version, the client certificate's DNS names).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig, ServerConnection};
use serde_json::{json, Value};
use x509_parser::extensions::GeneralName;

/// A certificate and its key, as PEM files.
#[derive(Clone, Debug)]
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A throwaway CA whose certificate is `<dir>/<name>-ca.pem`.
pub struct TestCa {
    name: String,
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate file (what `caCertificates` / `--client-ca` name).
    pub cert: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its certificate written in `dir`.
    pub fn new(dir: &Path, name: &str) -> Result<TestCa> {
        let key = KeyPair::generate().context("generate a CA key")?;
        let mut params = CertificateParams::default();
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).context("self-sign the CA")?;
        let path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&path, cert.pem()).with_context(|| format!("write {}", path.display()))?;
        Ok(TestCa {
            name: name.to_string(),
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
            cert: path,
        })
    }

    /// A leaf for `dns_names` (the first is also its common name), for server
    /// authentication, or client authentication when `client`; written as
    /// `<dir>/<ca>-<first name>.{crt,key}`.
    pub fn issue(&self, dns_names: &[&str], client: bool) -> Result<Leaf> {
        let first = dns_names.first().context("a leaf needs a name")?;
        let key = KeyPair::generate().context("generate a leaf key")?;
        let mut params = CertificateParams::default();
        params.distinguished_name.push(DnType::CommonName, *first);
        params.subject_alt_names = dns_names
            .iter()
            .map(|n| Ok(SanType::DnsName((*n).try_into()?)))
            .collect::<Result<_, rcgen::Error>>()
            .context("dns names")?;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("sign {first}"))?;
        let stem = self.dir.join(format!("{}-{first}", self.name));
        let leaf = Leaf {
            cert: stem.with_extension("crt"),
            key: stem.with_extension("key"),
        };
        std::fs::write(&leaf.cert, cert.pem())?;
        std::fs::write(&leaf.key, key.serialize_pem())?;
        Ok(leaf)
    }
}

/// A server presenting `leaf`, offering `alpn`, and requiring a client certificate from
/// the CA in `client_ca` when given. TLS 1.2 and 1.3.
pub fn server_config(
    leaf: &Leaf,
    client_ca: Option<&Path>,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>> {
    let chain = CertificateDer::pem_file_iter(&leaf.cert)
        .with_context(|| format!("read {}", leaf.cert.display()))?
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("parse {}", leaf.cert.display()))?;
    let key = PrivateKeyDer::from_pem_file(&leaf.key)
        .with_context(|| format!("read {}", leaf.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("tls versions")?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(path)
                .with_context(|| format!("read {}", path.display()))?
            {
                roots.add(cert.with_context(|| format!("parse {}", path.display()))?)?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .context("client verifier")?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .context("server certificate")?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(Arc::new(config))
}

/// What a server saw of a TLS connection:
/// `{"sni","alpn","version","client_names"}` (the DNS names of the client certificate,
/// empty without one).
pub fn describe(conn: &ServerConnection) -> Value {
    let client_names: Vec<String> = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|der| x509_parser::parse_x509_certificate(der).ok())
        .and_then(|(_, cert)| {
            let san = cert.subject_alternative_name().ok().flatten()?;
            Some(
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::DNSName(d) => Some(d.to_string()),
                        _ => None,
                    })
                    .collect(),
            )
        })
        .unwrap_or_default();
    json!({
        "sni": conn.server_name(),
        "alpn": conn.alpn_protocol().map(|p| String::from_utf8_lossy(p).into_owned()),
        "version": conn.protocol_version().map(|v| format!("{v:?}")),
        "client_names": client_names,
    })
}
