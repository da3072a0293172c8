//! TLS an ingress gateway terminates for clients outside the mesh (Gateway API listeners of
//! protocol `HTTPS`, `tls.mode: Terminate`): web PKI certificates from Kubernetes TLS
//! Secrets (PEM chain and key), chosen by the client's SNI among the listeners of one port
//! (an exact hostname, else the longest wildcard covering it, else a listener without a
//! hostname), TLS 1.2 or 1.3 with ring's default suites, ALPN `h2` and `http/1.1`, no client
//! certificate asked. Nothing here reads a file: the caller hands the PEM it has.

use std::fmt;
use std::sync::{Arc, LazyLock};

use rustls::crypto::{ring, CryptoProvider};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;

use mesh_model::model::hostname_rank;

use super::TlsError;

/// ring with its default suites: clients outside the mesh may not speak TLS 1.3 only.
static PROVIDER: LazyLock<Arc<CryptoProvider>> =
    LazyLock::new(|| Arc::new(ring::default_provider()));

/// A certificate chain and its key, parsed from PEM (`tls.crt`, `tls.key` of a Secret).
pub fn certified_key(chain_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain: Vec<_> = rustls_pemfile::certs(&mut chain_pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Parse(format!("certificate PEM: {e}")))?;
    if chain.is_empty() {
        return Err(TlsError::Parse("no CERTIFICATE block".into()));
    }
    let key = rustls_pemfile::private_key(&mut key_pem.as_bytes())
        .map_err(|e| TlsError::Parse(format!("key PEM: {e}")))?
        .ok_or_else(|| TlsError::Parse("no PRIVATE KEY block".into()))?;
    let signer = PROVIDER
        .key_provider
        .load_private_key(key)
        .map_err(|e| TlsError::Parse(format!("key: {e}")))?;
    let certified = CertifiedKey::new(chain, signer);
    certified
        .keys_match()
        .map_err(|e| TlsError::Parse(format!("certificate and key: {e}")))?;
    Ok(Arc::new(certified))
}

/// The certificates of one port's HTTPS listeners, by the hostname each listener has.
#[derive(Default)]
pub struct SniCertificates {
    /// (listener hostname, lower case; `None`: any), certificate.
    by_hostname: Vec<(Option<String>, Arc<CertifiedKey>)>,
}

impl fmt::Debug for SniCertificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self
            .by_hostname
            .iter()
            .map(|(h, _)| h.as_deref().unwrap_or("*"))
            .collect();
        f.debug_struct("SniCertificates")
            .field("hostnames", &names)
            .finish()
    }
}

impl SniCertificates {
    /// Adds the certificate served for `hostname` (`None`: a listener without a hostname).
    pub fn add(&mut self, hostname: Option<&str>, key: Arc<CertifiedKey>) {
        self.by_hostname
            .push((hostname.map(str::to_ascii_lowercase), key));
    }

    pub fn is_empty(&self) -> bool {
        self.by_hostname.is_empty()
    }

    /// The certificate for a client that asked for `sni` (`None`: it sent no SNI).
    pub fn pick(&self, sni: Option<&str>) -> Option<&Arc<CertifiedKey>> {
        self.by_hostname
            .iter()
            .filter_map(|(hostname, key)| {
                let rank = match sni {
                    Some(name) => hostname_rank(hostname.as_deref(), name)?,
                    // Without SNI only a listener without a hostname is meant.
                    None if hostname.is_none() => (0, 0),
                    None => return None,
                };
                Some((rank, key))
            })
            // The first of equals (listener order).
            .fold(
                None,
                |best: Option<((u8, usize), &Arc<CertifiedKey>)>, (rank, key)| match best {
                    Some((b, _)) if b >= rank => best,
                    _ => Some((rank, key)),
                },
            )
            .map(|(_, key)| key)
            // No listener takes the name: the first certificate, as a server without SNI
            // support would send (the client's name check then fails, not the handshake).
            .or_else(|| self.by_hostname.first().map(|(_, k)| k))
    }

    /// A server configuration serving these certificates (ALPN `h2`, `http/1.1`).
    pub fn server_config(self) -> Result<Arc<ServerConfig>, TlsError> {
        let mut config = ServerConfig::builder_with_provider(PROVIDER.clone())
            .with_safe_default_protocol_versions()
            .map_err(|source| TlsError::Config {
                side: "ingress server",
                source,
            })?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(self));
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(Arc::new(config))
    }
}

impl ResolvesServerCert for SniCertificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name()).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(name: &str) -> (String, String) {
        let key = rcgen::KeyPair::generate().expect("key");
        let params = rcgen::CertificateParams::new(vec![name.to_string()]).expect("params");
        let cert = params.self_signed(&key).expect("cert");
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn the_sni_picks_exact_then_longest_wildcard_then_any() {
        let mut certs = SniCertificates::default();
        let mut ids = Vec::new();
        for host in [
            None,
            Some("*.example.com"),
            Some("*.api.example.com"),
            Some("www.example.com"),
        ] {
            let (chain, key) = leaf(host.unwrap_or("default.test"));
            let k = certified_key(&chain, &key).expect("parsed");
            ids.push(k.clone());
            certs.add(host, k);
        }
        let pick = |sni: Option<&str>| {
            let k = certs.pick(sni).expect("a certificate");
            ids.iter()
                .position(|i| Arc::ptr_eq(i, k))
                .expect("one of ours")
        };
        assert_eq!(pick(Some("www.example.com")), 3);
        assert_eq!(pick(Some("WWW.Example.com")), 3);
        assert_eq!(pick(Some("v1.api.example.com")), 2);
        assert_eq!(pick(Some("shop.example.com")), 1);
        assert_eq!(pick(Some("other.test")), 0);
        assert_eq!(pick(None), 0);
        assert!(certs.server_config().is_ok());
    }

    #[test]
    fn bad_pem_is_a_named_error() {
        let (chain, key) = leaf("a.test");
        let (_, other_key) = leaf("b.test");
        for (c, k, want) in [
            ("", key.as_str(), "no CERTIFICATE"),
            (chain.as_str(), "", "no PRIVATE KEY"),
            (chain.as_str(), other_key.as_str(), "certificate and key"),
        ] {
            let Err(err) = certified_key(c, k) else {
                panic!("accepted: {want}");
            };
            let err = err.to_string();
            assert!(err.contains(want), "{err}");
        }
    }
}
