//! The CA's gRPC listener: TLS 1.3 (serving certificate from the CA itself, so every agent
//! already trusts it; re-issued at half-life), ALPN `h2`, then tonic's generated service on
//! hyper's HTTP/2 server. No client certificate: callers authenticate with their token.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use mesh_pki::ca::Ca;
use mesh_pki::proto::istio_certificate_service_server::IstioCertificateServiceServer;
use mesh_shell::conns::Active;
use mesh_shell::limits::{Cap, HandshakeCap, Keepalive};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tower::Service;

use crate::service::{CaService, PeerAddr};

/// Streams one caller may have open at once on one connection.
const MAX_CONCURRENT_STREAMS: u32 = 100;

/// The serving certificate in force; swapped by [`ServingCert::run_rotation`].
pub struct ServingCert {
    ca: Arc<Ca>,
    names: Vec<String>,
    ttl: Duration,
    current: ArcSwap<CertifiedKey>,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert")
            .field("names", &self.names)
            .finish_non_exhaustive()
    }
}

impl ServingCert {
    pub fn new(ca: Arc<Ca>, names: Vec<String>, ttl: Duration) -> anyhow::Result<Arc<Self>> {
        let current = ArcSwap::from(Self::issue(&ca, &names, ttl)?);
        Ok(Arc::new(ServingCert {
            ca,
            names,
            ttl,
            current,
        }))
    }

    fn issue(ca: &Ca, names: &[String], ttl: Duration) -> anyhow::Result<Arc<CertifiedKey>> {
        let (chain, key) = ca.issue_server(names, ttl)?;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key)?;
        Ok(Arc::new(CertifiedKey::new(chain, signer)))
    }

    /// Re-issues at half-life until `stop` (a failure is retried a minute later; the old
    /// certificate serves meanwhile).
    pub async fn run_rotation(self: Arc<Self>, stop: CancellationToken) {
        let mut wait = self.ttl / 2;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            match Self::issue(&self.ca, &self.names, self.ttl) {
                Ok(key) => {
                    self.current.store(key);
                    wait = self.ttl / 2;
                    tracing::info!("serving certificate renewed");
                }
                Err(e) => {
                    wait = Duration::from_secs(60);
                    tracing::warn!(error = %e, "renew the serving certificate; retrying in 60s");
                }
            }
        }
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

fn tls_config(cert: Arc<ServingCert>) -> anyhow::Result<Arc<ServerConfig>> {
    let mut cfg = ServerConfig::builder_with_provider(mesh_pki::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// The bound gRPC listener.
pub struct GrpcServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    service: CaService,
    handshake_timeout: Duration,
    /// Open connections and TLS handshakes in progress (`--max-connections`,
    /// `--max-tls-handshakes`): more are closed at once (flag OM).
    conn_cap: Cap,
    handshake_cap: HandshakeCap,
    keepalive: Keepalive,
    metrics: Arc<mesh_telemetry::Metrics>,
}

impl GrpcServer {
    pub async fn bind(
        addr: SocketAddr,
        cert: Arc<ServingCert>,
        service: CaService,
        handshake_timeout: Duration,
        limits: &mesh_shell::limits::LimitArgs,
        metrics: Arc<mesh_telemetry::Metrics>,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("bind the grpc listener on {addr}: {e}"))?;
        Ok(GrpcServer {
            listener,
            acceptor: TlsAcceptor::from(tls_config(cert)?),
            service,
            handshake_timeout,
            conn_cap: Cap::new("max_connections", limits.max_connections),
            handshake_cap: limits.handshake_cap(),
            keepalive: limits.keepalive(),
            metrics,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop`; then open connections are told to go away (HTTP/2 GOAWAY) and
    /// finish the requests they have in flight.
    pub async fn run(self, active: Arc<Active>, stop: CancellationToken) {
        let GrpcServer {
            listener,
            acceptor,
            service,
            handshake_timeout,
            conn_cap,
            handshake_cap,
            keepalive,
            metrics,
        } = self;
        let span = tracing::Span::current();
        mesh_shell::accept::serve(
            "grpc",
            || listener.accept(),
            |(tcp, peer): (tokio::net::TcpStream, SocketAddr)| {
                let Some(slot) = conn_cap.admit(&metrics, "ca", "grpc", peer) else {
                    return;
                };
                let Some(handshake) = handshake_cap.admit(&metrics, "ca", "grpc", peer) else {
                    return;
                };
                let _ = tcp.set_nodelay(true);
                let _ = keepalive.apply(&tcp);
                let acceptor = acceptor.clone();
                let grpc = IstioCertificateServiceServer::new(service.clone());
                let stop = stop.clone();
                let guard = active.enter();
                mesh_shell::process::spawn(span.clone(), async move {
                    let _guard = (guard, slot);
                    let tls =
                        match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                            Ok(Ok(tls)) => tls,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "tls handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "tls handshake timed out");
                                return;
                            }
                        };
                    drop(handshake);
                    let svc =
                        tower::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                            req.extensions_mut().insert(PeerAddr(peer));
                            let mut grpc = grpc.clone();
                            async move { grpc.call(req).await }
                        });
                    let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
                        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(svc));
                    tokio::pin!(conn);
                    tokio::select! {
                        r = conn.as_mut() => {
                            if let Err(e) = r {
                                tracing::debug!(%peer, error = %e, "grpc connection ended");
                            }
                        }
                        _ = stop.cancelled() => {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                });
            },
            stop.clone(),
        )
        .await
    }
}
