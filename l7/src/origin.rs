//! TLS the proxy originates to an application: DestinationRule `tls` modes `SIMPLE` and
//! `MUTUAL` ([`mesh_model::model::ClientTls`]). The application's endpoint may be outside
//! the mesh (TLS over plain TCP) or in it (TLS inside the HBONE tunnel, as Envoy does:
//! the tunnel authenticates the workload, the inner TLS the application).
//!
//! - The server name sent (SNI) is `sni`, else the Service's host name; the server's chain
//!   must verify against `caCertificates` (there are no default roots: without the file a
//!   request fails closed) unless `insecureSkipVerify: true`, and the certificate must be
//!   valid for one of `subjectAltNames`, else for the SNI name. `MUTUAL` presents
//!   `clientCertificate` with `privateKey`. ALPN: `h2` when the port speaks HTTP/2 or gRPC,
//!   `http/1.1` for other HTTP, none for a port relayed as TCP. TLS 1.2 or 1.3 ([`mesh_pki::tls::origin`]).
//! - Files are read, and the rustls configs built, once per (settings, host) per model
//!   ([`Origins`]): the first request of a cluster under a new model reads them, later
//!   ones reuse the result. A file that is missing or unusable fails that cluster's
//!   requests (`503 UF`, the reason in the access log, a warning once per model) and
//!   nothing else: the model with every other rule stays in force, and the next model
//!   (any config change) reads the files again.
//! - A failed handshake is a connect failure (`503 UF`), and so is a TLS alert in answer
//!   to the first request on a new connection ([`tls_failure`]: with TLS 1.3 a server
//!   refuses a missing or unknown client certificate only after the client has finished
//!   its handshake).

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use mesh_model::model::{ClientTls, Model};
use mesh_pki::tls::origin::{client_config, OriginSettings};
use mesh_pki::tls::TlsError;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::io::Io;
use crate::upstream::UpstreamProto;

/// (settings, host) pairs kept per model; beyond, the cache starts afresh.
const MAX_ORIGINS: usize = 1024;
/// Largest PEM file read (certificates and keys are a few KiB).
const MAX_PEM_BYTES: u64 = 1 << 20;

/// Why a `tls` block cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("read {field} {path}: {source}")]
    Read {
        field: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("{field} {path}: larger than {MAX_PEM_BYTES} bytes")]
    TooLarge { field: &'static str, path: String },
    #[error("{field} {path}: no PEM certificate")]
    NoCertificate { field: &'static str, path: String },
    #[error("caCertificates {path}: {source}")]
    BadRoot { path: String, source: rustls::Error },
    #[error("privateKey {path}: no PEM private key")]
    NoKey { path: String },
    #[error(
        "no caCertificates to verify the server with (no default roots are used): set \
         caCertificates, or insecureSkipVerify: true"
    )]
    NoRoots,
    #[error("server name {0:?} is not a valid SNI name")]
    BadServerName(String),
    #[error("{0}")]
    Config(#[from] TlsError),
}

/// One usable `tls` block: a client config per ALPN and the server name.
pub struct Origin {
    /// Unique per build: pooled connections made with one origin are not reused by another.
    pub id: u64,
    http1: Arc<ClientConfig>,
    http2: Arc<ClientConfig>,
    /// For a port relayed as TCP: no ALPN offered (the bytes are the client's own).
    tcp: Arc<ClientConfig>,
    server_name: ServerName<'static>,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

impl std::fmt::Debug for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Origin")
            .field("id", &self.id)
            .field("server_name", &self.server_name)
            .finish()
    }
}

// === impl Origin ===

impl Origin {
    /// Reads the files of `tls` and builds its configs; `host` is the SNI when `tls` sets
    /// none.
    pub fn build(tls: &ClientTls, host: &str) -> Result<Origin, OriginError> {
        let sni = tls.sni.as_deref().unwrap_or(host);
        let server_name = ServerName::try_from(sni.to_string())
            .map_err(|_| OriginError::BadServerName(sni.to_string()))?;
        let roots = match (&tls.ca_certificates, tls.insecure_skip_verify) {
            (_, true) => None,
            (Some(path), false) => Some(roots(path)?),
            (None, false) => return Err(OriginError::NoRoots),
        };
        let client = match (&tls.client_certificate, &tls.private_key) {
            (Some(cert), Some(key)) => Some((certs("clientCertificate", cert)?, private_key(key)?)),
            _ => None,
        };
        let config = |alpn: &[u8]| {
            client_config(OriginSettings {
                roots: roots.clone(),
                subject_alt_names: tls.subject_alt_names.clone(),
                client: client
                    .as_ref()
                    .map(|(chain, key)| (chain.clone(), key.clone_key())),
                alpn: if alpn.is_empty() {
                    Vec::new()
                } else {
                    vec![alpn.to_vec()]
                },
            })
        };
        Ok(Origin {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            http1: config(b"http/1.1")?,
            http2: config(b"h2")?,
            tcp: config(b"")?,
            server_name,
        })
    }

    /// The server name sent (SNI), for logs.
    pub fn server_name(&self) -> String {
        self.server_name.to_str().into_owned()
    }

    /// The TLS handshake over `io`, within `timeout`, offering the ALPN of `proto` (none
    /// for a port relayed as TCP).
    pub async fn connect<S: Io>(
        &self,
        io: S,
        proto: Option<UpstreamProto>,
        timeout: Duration,
    ) -> io::Result<TlsStream<S>> {
        let config = match proto {
            Some(UpstreamProto::Http1) => &self.http1,
            Some(UpstreamProto::Http2) => &self.http2,
            None => &self.tcp,
        };
        let handshake = TlsConnector::from(config.clone()).connect(self.server_name.clone(), io);
        tokio::time::timeout(timeout, handshake)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "tls handshake timed out"))?
    }
}

fn read(field: &'static str, path: &str) -> Result<Vec<u8>, OriginError> {
    let err = |source| OriginError::Read {
        field,
        path: path.to_string(),
        source,
    };
    let len = std::fs::metadata(Path::new(path)).map_err(err)?.len();
    if len > MAX_PEM_BYTES {
        return Err(OriginError::TooLarge {
            field,
            path: path.to_string(),
        });
    }
    std::fs::read(path).map_err(err)
}

/// Every PEM certificate of the file at `path` (at least one).
fn certs(field: &'static str, path: &str) -> Result<Vec<CertificateDer<'static>>, OriginError> {
    let pem = read(field, path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| OriginError::Read {
            field,
            path: path.to_string(),
            source,
        })?;
    if certs.is_empty() {
        return Err(OriginError::NoCertificate {
            field,
            path: path.to_string(),
        });
    }
    Ok(certs)
}

fn roots(path: &str) -> Result<RootCertStore, OriginError> {
    let mut roots = RootCertStore::empty();
    for cert in certs("caCertificates", path)? {
        roots.add(cert).map_err(|source| OriginError::BadRoot {
            path: path.to_string(),
            source,
        })?;
    }
    Ok(roots)
}

fn private_key(path: &str) -> Result<PrivateKeyDer<'static>, OriginError> {
    let pem = read("privateKey", path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| OriginError::Read {
            field: "privateKey",
            path: path.to_string(),
            source,
        })?
        .ok_or_else(|| OriginError::NoKey {
            path: path.to_string(),
        })
}

/// The TLS failure in `error`'s chain, if a TLS error is why it failed. With TLS 1.3 a
/// server judges the client's certificate after the client's handshake has finished, so its
/// refusal (an alert) arrives with the first response instead of at connect time.
pub fn tls_failure<'e>(error: &'e (dyn std::error::Error + 'static)) -> Option<&'e rustls::Error> {
    let mut cur = Some(error);
    while let Some(e) = cur {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = e.downcast_ref::<io::Error>() {
            if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return Some(tls);
            }
        }
        cur = e.source();
    }
    None
}

/// The [`Origin`] (or why there is none) of each (settings, host), built once per model.
#[derive(Default)]
pub struct Origins {
    state: Mutex<State>,
}

type Built = Result<Arc<Origin>, Arc<OriginError>>;

#[derive(Default)]
struct State {
    /// The model the entries were built under (held weakly: only its identity matters).
    model: Weak<Model>,
    built: HashMap<(ClientTls, String), Built>,
}

// === impl Origins ===

impl Origins {
    /// The origin of `tls` towards `host` under `model`: built on first use under this
    /// model (reading its files), the same `Arc` afterwards.
    pub fn get(&self, model: &Arc<Model>, tls: &ClientTls, host: &str) -> Built {
        // An entry is a finished build: a panic cannot leave the map inconsistent.
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.model.as_ptr() != Arc::as_ptr(model) {
            st.model = Arc::downgrade(model);
            st.built.clear();
        }
        let key = (tls.clone(), host.to_string());
        if let Some(built) = st.built.get(&key) {
            return built.clone();
        }
        if st.built.len() >= MAX_ORIGINS {
            st.built.clear();
        }
        let built = Origin::build(tls, host).map(Arc::new).map_err(Arc::new);
        if let Err(error) = &built {
            tracing::warn!(%host, %error, "upstream tls settings unusable: requests to this cluster fail (503 UF) until the next config");
        }
        st.built.insert(key, built.clone());
        built
    }
}

#[cfg(test)]
mod tests {
    use mesh_model::model::TlsMode;

    use super::*;

    fn simple(ca: Option<&str>) -> ClientTls {
        ClientTls {
            mode: TlsMode::Simple,
            ca_certificates: ca.map(str::to_string),
            ..ClientTls::default()
        }
    }

    /// A CA certificate and a client certificate with its key, as PEM files in `dir`.
    fn files(dir: &Path) -> (String, String, String) {
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&ca_key).expect("ca");
        let leaf_key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["client.test".to_string()])
            .expect("params")
            .self_signed(&leaf_key)
            .expect("leaf");
        let write = |name: &str, pem: String| {
            let path = dir.join(name);
            std::fs::write(&path, pem).expect("write");
            path.display().to_string()
        };
        (
            write("ca.pem", ca.pem()),
            write("client.pem", leaf.pem()),
            write("client.key", leaf_key.serialize_pem()),
        )
    }

    #[test]
    fn unusable_settings_are_named() {
        let dir = tempfile::tempdir().expect("dir");
        let (ca, cert, key) = files(dir.path());
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem").expect("write");
        let junk = junk.display().to_string();
        let missing = dir.path().join("missing.pem").display().to_string();
        let mutual = |cert: &str, key: &str| ClientTls {
            mode: TlsMode::Mutual,
            client_certificate: Some(cert.to_string()),
            private_key: Some(key.to_string()),
            ..simple(Some(&ca))
        };
        for (tls, want) in [
            (
                simple(None),
                "no caCertificates to verify the server with".to_string(),
            ),
            (
                simple(Some(&missing)),
                format!("read caCertificates {missing}: "),
            ),
            (
                simple(Some(&junk)),
                format!("caCertificates {junk}: no PEM certificate"),
            ),
            (
                mutual(&junk, &key),
                format!("clientCertificate {junk}: no PEM certificate"),
            ),
            (
                mutual(&cert, &junk),
                format!("privateKey {junk}: no PEM private key"),
            ),
            // A key that is not the certificate's.
            (
                mutual(&cert, &{
                    let other = rcgen::KeyPair::generate().expect("key");
                    let p = dir.path().join("other.key");
                    std::fs::write(&p, other.serialize_pem()).expect("write");
                    p.display().to_string()
                }),
                "origination client certificate".to_string(),
            ),
        ] {
            match Origin::build(&tls, "web.app.svc.cluster.local") {
                Ok(_) => panic!("{tls:?} built"),
                Err(e) => assert!(e.to_string().contains(&want), "{e} lacks {want:?}"),
            }
        }
        assert!(Origin::build(&simple(Some(&ca)), "web.app.svc.cluster.local").is_ok());
        assert!(Origin::build(&mutual(&cert, &key), "web.app.svc.cluster.local").is_ok());
        let skip = ClientTls {
            insecure_skip_verify: true,
            ..simple(None)
        };
        assert!(Origin::build(&skip, "web.app.svc.cluster.local").is_ok());
    }

    #[test]
    fn settings_are_built_once_per_model() {
        let dir = tempfile::tempdir().expect("dir");
        let (ca, _, _) = files(dir.path());
        let origins = Origins::default();
        let model = Arc::new(Model::default());
        let tls = simple(Some(&ca));
        let first = origins.get(&model, &tls, "a.test").expect("built");
        let again = origins.get(&model, &tls, "a.test").expect("built");
        assert!(Arc::ptr_eq(&first, &again), "same model: the same build");
        let other_host = origins.get(&model, &tls, "b.test").expect("built");
        assert_ne!(first.id, other_host.id, "the host is the default SNI");
        // The file goes away: this model keeps its build, the next one reads again.
        std::fs::remove_file(&ca).expect("remove");
        assert!(origins.get(&model, &tls, "a.test").is_ok());
        let next = Arc::new(Model::default());
        let err = origins.get(&next, &tls, "a.test").expect_err("file gone");
        assert!(err.to_string().contains("read caCertificates"), "{err}");
        assert!(Arc::ptr_eq(
            &err,
            &origins.get(&next, &tls, "a.test").expect_err("cached")
        ));
    }
}
