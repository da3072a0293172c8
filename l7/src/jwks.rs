//! Keys of RequestAuthentication rules that name a `jwksUri`: fetched by the proxy over
//! HTTP, cached, refreshed every [`JwksSettings::refresh`] (the waypoint's `--jwks-refresh`),
//! retried every [`JwksSettings::retry`] while they fail, and refreshed early (at most once
//! per `retry`) when a token names a `kid` the cached set lacks (key rotation at the issuer).
//!
//! Fail closed: until a URI has been fetched once, and after its last good keys are older
//! than `refresh` + [`JwksSettings::max_stale`], [`JwksCache::keys`] has nothing, so tokens of
//! that issuer are refused (401, reason `jwks_unavailable`). Every fetch is logged on failure
//! and counted in `waypoint_jwks_fetches_total{uri,result}`. Responses are bounded
//! ([`mesh_model::jwt::MAX_JWKS_BYTES`]) and must be `200` with a valid JWKS.
//!
//! `https` URIs are fetched over TLS (rustls, HTTP/1.1), the server's certificate checked
//! against the Mozilla roots (`webpki-roots`, compiled in) plus the PEM roots of a file the
//! proxy names ([`tls_config`]; the waypoint's `--jwks-ca-file`: a private issuer's CA); a
//! certificate that does not verify fails the fetch (result `tls`) and so fails closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use mesh_model::jwt::{Jwks, JwksError, MAX_JWKS_BYTES};
use mesh_model::model::Model;
use mesh_model::policy::authn::jwks_uri;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::telemetry::HttpMetrics;

/// How remote JWKS are fetched and cached (filled by the binary from its flags).
#[derive(Clone, Copy, Debug)]
pub struct JwksSettings {
    /// Refresh period of keys fetched from a `jwksUri`.
    pub refresh: Duration,
    /// Retry period of a `jwksUri` that failed, and rate limit of unknown-`kid` refreshes.
    pub retry: Duration,
    /// Keep using the last good keys of a failing `jwksUri` this long, then fail closed.
    pub max_stale: Duration,
    pub fetch_timeout: Duration,
}

/// Why a fetch failed; [`FetchError::result`] is the metric label.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("invalid jwksUri")]
    BadUri,
    #[error("tls: {0}")]
    Tls(std::io::Error),
    #[error("resolve {host}: {source}")]
    Resolve {
        host: String,
        source: std::io::Error,
    },
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    #[error("status {0}")]
    Status(StatusCode),
    #[error("response larger than {MAX_JWKS_BYTES} bytes or broken")]
    Body,
    #[error("{0}")]
    Invalid(#[from] JwksError),
    #[error("timed out")]
    Timeout,
}

impl FetchError {
    pub fn result(&self) -> &'static str {
        match self {
            FetchError::BadUri => "bad_uri",
            FetchError::Tls(_) => "tls",
            FetchError::Resolve { .. } | FetchError::Connect(_) => "connect",
            FetchError::Http(_) => "http",
            FetchError::Status(_) => "status",
            FetchError::Body => "body",
            FetchError::Invalid(_) => "invalid",
            FetchError::Timeout => "timeout",
        }
    }
}

#[derive(Debug, Default)]
struct Entry {
    keys: Option<Arc<Jwks>>,
    /// When `keys` were fetched.
    fetched_at: Option<Instant>,
    last_attempt: Option<Instant>,
    failing: bool,
    /// A token named a `kid` the keys lack.
    refresh_wanted: bool,
}

/// The remote key sets, shared by the request path (reads) and [`JwksCache::run`] (fetches).
pub struct JwksCache {
    settings: JwksSettings,
    tls: Arc<rustls::ClientConfig>,
    entries: Mutex<HashMap<String, Entry>>,
    wake: Notify,
    metrics: HttpMetrics,
}

impl JwksCache {
    /// `tls` verifies `https` jwksUri servers ([`tls_config`]).
    pub fn new(
        settings: JwksSettings,
        tls: Arc<rustls::ClientConfig>,
        metrics: HttpMetrics,
    ) -> Arc<Self> {
        Arc::new(JwksCache {
            settings,
            tls,
            entries: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            metrics,
        })
    }

    fn entries(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // The map holds plain data: a panic elsewhere cannot leave it inconsistent.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The usable keys of `uri`, `None` (fail closed) when never fetched or too stale.
    pub fn keys(&self, uri: &str) -> Option<Arc<Jwks>> {
        let max_age = self.settings.refresh + self.settings.max_stale;
        let entries = self.entries();
        let e = entries.get(uri)?;
        match (&e.keys, e.fetched_at) {
            (Some(keys), Some(at)) if at.elapsed() <= max_age => Some(keys.clone()),
            _ => None,
        }
    }

    /// Asks for an early refresh of `uri` (rate limited by [`JwksSettings::retry`]).
    pub fn request_refresh(&self, uri: &str) {
        let mut entries = self.entries();
        if let Some(e) = entries.get_mut(uri) {
            if !e.refresh_wanted {
                e.refresh_wanted = true;
                self.wake.notify_one();
            }
        }
    }

    /// Keeps the cache in step with the model until `stop`.
    pub async fn run(self: Arc<Self>, model: Arc<ArcSwap<Model>>, stop: CancellationToken) {
        let tick = self.settings.retry.min(Duration::from_secs(1));
        loop {
            let uris = uris_in(&model.load());
            let due = self.due(&uris);
            for uri in due {
                let result = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = tokio::time::timeout(self.settings.fetch_timeout, fetch(&uri, &self.tls)) => {
                        r.unwrap_or(Err(FetchError::Timeout))
                    }
                };
                self.record(&uri, result);
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(tick) => {}
                _ = self.wake.notified() => {}
            }
        }
    }

    /// Drops entries the model no longer names; returns the URIs to fetch now.
    fn due(&self, uris: &[String]) -> Vec<String> {
        let s = self.settings;
        let mut entries = self.entries();
        entries.retain(|uri, _| uris.contains(uri));
        let mut due = Vec::new();
        for uri in uris {
            let e = entries.entry(uri.clone()).or_default();
            let since_attempt = e.last_attempt.map(|t| t.elapsed());
            let is_due = match (since_attempt, e.fetched_at) {
                (None, _) => true,
                (Some(since), _) if e.failing || e.refresh_wanted => since >= s.retry,
                (Some(_), Some(at)) => at.elapsed() >= s.refresh,
                (Some(since), None) => since >= s.retry,
            };
            if is_due {
                due.push(uri.clone());
            }
        }
        due
    }

    fn record(&self, uri: &str, result: Result<Jwks, FetchError>) {
        let mut entries = self.entries();
        let Some(e) = entries.get_mut(uri) else {
            return;
        };
        e.last_attempt = Some(Instant::now());
        e.refresh_wanted = false;
        match result {
            Ok(keys) => {
                if e.failing || e.keys.is_none() {
                    tracing::info!(uri, keys = keys.len(), "jwks fetched");
                }
                e.keys = Some(Arc::new(keys));
                e.fetched_at = Some(Instant::now());
                e.failing = false;
                self.metrics.jwks_fetched(uri, "ok");
            }
            Err(err) => {
                let usable = e.fetched_at.is_some_and(|at| {
                    at.elapsed() <= self.settings.refresh + self.settings.max_stale
                });
                tracing::warn!(
                    uri,
                    error = %err,
                    keeping_last_keys = usable,
                    "jwks fetch failed; tokens of this issuer are refused while no keys are usable"
                );
                e.failing = true;
                self.metrics.jwks_fetched(uri, err.result());
            }
        }
    }
}

/// Every `jwksUri` in the model, without duplicates.
fn uris_in(model: &Model) -> Vec<String> {
    let mut uris: Vec<String> = Vec::new();
    for ra in &model.request_authentications {
        for rule in &ra.jwt_rules {
            if let Some(uri) = jwks_uri(rule) {
                if !uris.iter().any(|u| u == uri) {
                    uris.push(uri.to_string());
                }
            }
        }
    }
    uris
}

/// Why the roots for `https` jwksUri could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    #[error("read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate")]
    Empty { path: String },
    #[error("{path}: {source}")]
    BadCert { path: String, source: rustls::Error },
}

/// The client config of `https` jwksUri fetches: the Mozilla roots, plus every PEM
/// certificate of `extra_roots` when given.
pub fn tls_config(
    extra_roots: Option<&std::path::Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsSetupError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = extra_roots {
        let shown = path.display().to_string();
        let pem = std::fs::read(path).map_err(|source| TlsSetupError::Read {
            path: shown.clone(),
            source,
        })?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|source| TlsSetupError::Read {
                path: shown.clone(),
                source,
            })?;
            roots.add(cert).map_err(|source| TlsSetupError::BadCert {
                path: shown.clone(),
                source,
            })?;
            added += 1;
        }
        if added == 0 {
            return Err(TlsSetupError::Empty { path: shown });
        }
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|source| TlsSetupError::BadCert {
        path: "-".to_string(),
        source,
    })?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// One GET of `uri` (HTTP/1.1 over TCP, or TLS for `https`; one connection), the body
/// bounded and parsed.
pub async fn fetch(uri: &str, tls: &Arc<rustls::ClientConfig>) -> Result<Jwks, FetchError> {
    let parsed: Uri = uri.parse().map_err(|_| FetchError::BadUri)?;
    let https = match parsed.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => return Err(FetchError::BadUri),
    };
    let authority = parsed.authority().ok_or(FetchError::BadUri)?.clone();
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|source| FetchError::Resolve {
            host: host.clone(),
            source,
        })?
        .next()
        .ok_or_else(|| FetchError::Resolve {
            host: host.clone(),
            source: std::io::Error::other("no address"),
        })?;
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(FetchError::Connect)?;
    let stream: Box<dyn crate::io::Io> = if https {
        let name = rustls::pki_types::ServerName::try_from(host.clone())
            .map_err(|_| FetchError::BadUri)?;
        let tls = tokio_rustls::TlsConnector::from(tls.clone())
            .connect(name, tcp)
            .await
            .map_err(FetchError::Tls)?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let conn = tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "jwks connection ended with an error");
        }
    });
    let path = parsed
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let req = Request::get(path)
        .header(header::HOST, authority.as_str())
        .header(header::ACCEPT, "application/json")
        .body(Empty::<Bytes>::new())
        .map_err(|_| FetchError::BadUri)?;
    let rsp = sender.send_request(req).await?;
    if rsp.status() != StatusCode::OK {
        conn.abort();
        return Err(FetchError::Status(rsp.status()));
    }
    let body = Limited::new(rsp.into_body(), MAX_JWKS_BYTES)
        .collect()
        .await
        .map_err(|_| FetchError::Body)?
        .to_bytes();
    conn.abort();
    Ok(Jwks::parse(&body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

    /// A one-shot HTTP server answering every connection with `status` and `body`.
    async fn serve(status: &'static str, body: String) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let body = body.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 2048];
                    let _ = s.read(&mut buf).await;
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(body.as_bytes()).await;
                });
            }
        });
        format!("http://{addr}/jwks.json")
    }

    #[tokio::test]
    async fn fetches_are_bounded_and_checked() {
        let tls = tls_config(None).expect("roots");
        let fetch = |uri: String| {
            let tls = tls.clone();
            async move { fetch(&uri, &tls).await }
        };
        let ok = serve("200 OK", JWKS.to_string()).await;
        assert_eq!(fetch(ok).await.expect("jwks").len(), 1);
        let missing = serve("404 Not Found", String::new()).await;
        assert_eq!(
            fetch(missing).await.err().map(|e| e.result()),
            Some("status")
        );
        let huge = serve("200 OK", " ".repeat(MAX_JWKS_BYTES + 1)).await;
        assert_eq!(fetch(huge).await.err().map(|e| e.result()), Some("body"));
        let junk = serve("200 OK", "<html>".to_string()).await;
        assert_eq!(fetch(junk).await.err().map(|e| e.result()), Some("invalid"));
        // Nothing listens there.
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
            l.local_addr().expect("addr")
        };
        let down = format!("http://{closed}/jwks");
        assert_eq!(fetch(down).await.err().map(|e| e.result()), Some("connect"));
        assert_eq!(
            fetch("ftp://example.com/jwks".to_string())
                .await
                .err()
                .map(|e| e.result()),
            Some("bad_uri")
        );
    }

    /// A TLS server for `localhost` with a certificate from a CA made here; returns the
    /// `https` URI and the CA's PEM.
    async fn serve_tls(body: String) -> (String, String) {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("ca key"))
            .expect("ca");
        let key = KeyPair::generate().expect("key");
        let cert = CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .signed_by(&key, &ca)
            .expect("cert");
        let server = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("addr").port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, body) = (acceptor.clone(), body.clone());
                tokio::spawn(async move {
                    let Ok(mut s) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 2048];
                    let _ = s.read(&mut buf).await;
                    let head = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncontent-type: application/json\r\n\r\n",
                        body.len()
                    );
                    let _ = s.write_all(head.as_bytes()).await;
                    let _ = s.write_all(body.as_bytes()).await;
                    let _ = s.shutdown().await;
                });
            }
        });
        (format!("https://localhost:{port}/jwks.json"), ca.pem())
    }

    #[tokio::test]
    async fn https_jwks_are_fetched_only_from_servers_the_roots_vouch_for() {
        let (uri, ca_pem) = serve_tls(JWKS.to_string()).await;
        // The Mozilla roots alone do not know this CA: the fetch fails (and fails closed).
        let public = tls_config(None).expect("roots");
        assert_eq!(
            fetch(&uri, &public).await.err().map(|e| e.result()),
            Some("tls")
        );
        let dir = tempfile::tempdir().expect("dir");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca_pem).expect("write ca");
        let private = tls_config(Some(&ca_file)).expect("roots");
        assert_eq!(fetch(&uri, &private).await.expect("jwks").len(), 1);
        // A root file without certificates is a startup error, not an empty trust store.
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate").expect("write");
        assert!(matches!(
            tls_config(Some(&empty)),
            Err(TlsSetupError::Empty { .. })
        ));
    }

    #[test]
    fn keys_fail_closed_until_fetched_and_after_going_stale() {
        let (_, metrics) = HttpMetrics::new();
        let settings = JwksSettings {
            refresh: Duration::from_millis(20),
            retry: Duration::from_millis(10),
            max_stale: Duration::from_millis(30),
            fetch_timeout: Duration::from_secs(1),
        };
        let cache = JwksCache::new(settings, tls_config(None).expect("roots"), metrics);
        let uri = "http://keys/jwks".to_string();
        let uris = std::slice::from_ref(&uri);
        assert_eq!(cache.due(uris), uris);
        assert!(cache.keys(&uri).is_none(), "not fetched yet");
        cache.record(&uri, Err(FetchError::Timeout));
        assert!(cache.keys(&uri).is_none(), "failed");
        assert!(
            cache.due(std::slice::from_ref(&uri)).is_empty(),
            "retry later"
        );
        std::thread::sleep(Duration::from_millis(15));
        assert_eq!(cache.due(uris).len(), 1, "retry now");
        cache.record(&uri, Ok(Jwks::parse(JWKS.as_bytes()).expect("jwks")));
        assert!(cache.keys(&uri).is_some());
        // Refresh failing: the last keys stay usable until refresh + max_stale, then not.
        cache.record(&uri, Err(FetchError::Timeout));
        assert!(cache.keys(&uri).is_some(), "stale but usable");
        std::thread::sleep(Duration::from_millis(60));
        assert!(cache.keys(&uri).is_none(), "too stale: fail closed");
        // Gone from the model: forgotten.
        assert!(cache.due(&[]).is_empty());
        assert!(cache.keys(&uri).is_none());
    }
}
