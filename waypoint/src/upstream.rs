//! Upstreams: the endpoints of a destination, opening tunnels to them, and the pool of
//! HTTP connections kept open over those tunnels.
//!
//! - An endpoint in the mesh is reached over HBONE, as ztunnel's outbound does it: mTLS with
//!   the waypoint's own certificate, the endpoint's identity expected, `CONNECT
//!   <pod-ip>:<target-port>` to `<pod-ip>:15008`, multiplexed on pooled connections
//!   ([`mesh::hbone::Pool`]). An endpoint outside the mesh gets plain TCP.
//! - HTTP/1.1 upstream connections (one tunnel each) return to an idle list when their
//!   exchange has finished, at most `max_idle` per endpoint, closed after `idle_timeout`.
//!   HTTP/2 upstream connections are shared by all requests to the endpoint.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh::certs::CertManager;
use mesh::hbone::{self, ConnectHeaders, HboneError, PoolKey, HBONE_PORT};
use mesh::identity::Identity;
use mesh::model::{Model, NamespacedName, Pod};
use tokio::net::TcpStream;
use tracing::Instrument;

use crate::io::Io;

/// The body of a request sent upstream.
pub type UpBody = UnsyncBoxBody<Bytes, hyper::Error>;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {addr}: tls config: {source}")]
    Tls {
        addr: SocketAddr,
        source: mesh::tls::TlsError,
    },
    #[error("upstream {addr}: {source}")]
    Hbone {
        addr: SocketAddr,
        source: HboneError,
    },
    #[error("upstream {addr}: connect: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("upstream {addr}: connect: timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("upstream {addr}: http handshake: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
}

/// One endpoint of a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub pod: Pod,
    /// `<pod-ip>:<target-port>`.
    pub addr: SocketAddr,
    /// `Some`: in the mesh, reached over HBONE expecting this identity. `None`: plain TCP.
    pub identity: Option<Identity>,
}

impl Endpoint {
    /// `pod` at `addr`, in the mesh (HBONE) when it is enrolled.
    pub fn of(model: &Model, pod: &Pod, addr: SocketAddr, trust_domain: &str) -> Endpoint {
        let identity = model
            .is_ambient(pod)
            .then(|| model.identity_of(pod, trust_domain));
        Endpoint {
            pod: pod.clone(),
            addr,
            identity,
        }
    }
}

/// The HTTP version spoken to the upstream.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UpstreamProto {
    Http1,
    Http2,
}

/// A connection to send one request on.
pub enum Sender {
    Http1(http1::SendRequest<UpBody>),
    Http2(http2::SendRequest<UpBody>),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    identity: Option<Identity>,
}

struct Idle {
    sender: http1::SendRequest<UpBody>,
    since: Instant,
}

#[derive(Default)]
struct Conns {
    http1: HashMap<Key, Vec<Idle>>,
    http2: HashMap<Key, http2::SendRequest<UpBody>>,
}

/// Settings of [`Upstreams`].
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// The identity the waypoint presents.
    pub identity: Identity,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
}

/// Opens and pools upstream connections. Shared as `Arc<Upstreams>`.
pub struct Upstreams {
    cfg: UpstreamConfig,
    certs: Arc<CertManager>,
    hbone: hbone::Pool,
    conns: Mutex<Conns>,
    round_robin: Mutex<HashMap<NamespacedName, Arc<AtomicUsize>>>,
}

// === impl Upstreams ===

impl Upstreams {
    pub fn new(cfg: UpstreamConfig, certs: Arc<CertManager>) -> Arc<Upstreams> {
        let hbone = hbone::Pool::new(hbone::PoolConfig {
            connect_timeout: cfg.connect_timeout,
            ..hbone::PoolConfig::default()
        });
        Arc::new(Upstreams {
            cfg,
            certs,
            hbone,
            conns: Mutex::default(),
            round_robin: Mutex::default(),
        })
    }

    /// The next round-robin start index for `svc`.
    pub fn next_index(&self, svc: &NamespacedName) -> usize {
        let counter = {
            let mut rr = self.round_robin.lock().unwrap_or_else(|e| e.into_inner());
            rr.entry(svc.clone()).or_default().clone()
        };
        counter.fetch_add(1, Ordering::Relaxed)
    }

    pub fn hbone_stats(&self) -> hbone::PoolStats {
        self.hbone.stats()
    }

    fn conns(&self) -> MutexGuard<'_, Conns> {
        // Every update is a single insert or remove: a panic cannot leave it inconsistent.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A byte stream to `ep`: an HBONE tunnel (from `local_ip`, the waypoint's address, for
    /// the `forwarded` header) or plain TCP.
    pub async fn connect(
        &self,
        ep: &Endpoint,
        local_ip: IpAddr,
        service_host: Option<String>,
    ) -> Result<Box<dyn Io>, UpstreamError> {
        let addr = ep.addr;
        let timeout = self.cfg.connect_timeout;
        let Some(dst) = &ep.identity else {
            let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| UpstreamError::Timeout { addr, timeout })?
                .map_err(|source| UpstreamError::Connect { addr, source })?;
            let _ = tcp.set_nodelay(true);
            return Ok(Box::new(tcp));
        };
        let tls = mesh::tls::client_config(
            self.certs.clone(),
            self.cfg.identity.clone(),
            vec![dst.clone()],
        )
        .map_err(|source| UpstreamError::Tls { addr, source })?;
        let hbone_addr = SocketAddr::new(addr.ip(), HBONE_PORT);
        let key = PoolKey {
            src: self.cfg.identity.clone(),
            src_ip: local_ip,
            dst: dst.clone(),
            dst_addr: hbone_addr,
        };
        let headers = ConnectHeaders {
            src_ip: local_ip,
            service_host,
            baggage: vec![(
                "k8s.namespace.name".to_string(),
                self.cfg.identity.namespace.clone(),
            )],
            traceparent: None,
        };
        let req = hbone::connect_request(addr, &headers);
        let dial = move || async move {
            let tcp = tokio::time::timeout(timeout, TcpStream::connect(hbone_addr))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            let _ = tcp.set_nodelay(true);
            Ok(tcp)
        };
        let stream = self
            .hbone
            .connect(key, tls, dial, req)
            .await
            .map_err(|source| UpstreamError::Hbone { addr, source })?;
        Ok(Box::new(stream))
    }

    /// A connection to send a request to `ep` on: pooled if one is idle, else new.
    pub async fn checkout(
        self: &Arc<Self>,
        ep: &Endpoint,
        proto: UpstreamProto,
        local_ip: IpAddr,
        service_host: Option<String>,
    ) -> Result<Sender, UpstreamError> {
        let key = Key {
            addr: ep.addr,
            identity: ep.identity.clone(),
        };
        if let Some(sender) = self.pooled(&key, proto) {
            return Ok(sender);
        }
        let io = TokioIo::new(self.connect(ep, local_ip, service_host).await?);
        let addr = ep.addr;
        let span = tracing::debug_span!("upstream_conn", %addr, ?proto);
        match proto {
            UpstreamProto::Http1 => {
                let (sender, conn) = http1::Builder::new()
                    .handshake(io)
                    .await
                    .map_err(|source| UpstreamError::Handshake { addr, source })?;
                tokio::spawn(
                    async move {
                        // `with_upgrades`: a `101` hands the connection to `crate::upgrade`.
                        if let Err(e) = conn.with_upgrades().await {
                            tracing::debug!(error = %e, "upstream connection ended");
                        }
                    }
                    .instrument(span),
                );
                Ok(Sender::Http1(sender))
            }
            UpstreamProto::Http2 => {
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .initial_stream_window_size(hbone::STREAM_WINDOW)
                    .initial_connection_window_size(hbone::CONNECTION_WINDOW)
                    .max_header_list_size(hbone::MAX_HEADER_LIST_SIZE)
                    .handshake(io)
                    .await
                    .map_err(|source| UpstreamError::Handshake { addr, source })?;
                tokio::spawn(
                    async move {
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "upstream connection ended");
                        }
                    }
                    .instrument(span),
                );
                self.conns().http2.insert(key, sender.clone());
                Ok(Sender::Http2(sender))
            }
        }
    }

    fn pooled(&self, key: &Key, proto: UpstreamProto) -> Option<Sender> {
        let mut conns = self.conns();
        match proto {
            UpstreamProto::Http2 => {
                let sender = conns.http2.get(key)?;
                if sender.is_closed() {
                    conns.http2.remove(key);
                    return None;
                }
                Some(Sender::Http2(sender.clone()))
            }
            UpstreamProto::Http1 => {
                let idle = conns.http1.get_mut(key)?;
                while let Some(entry) = idle.pop() {
                    if entry.since.elapsed() < self.cfg.idle_timeout
                        && !entry.sender.is_closed()
                        && entry.sender.is_ready()
                    {
                        return Some(Sender::Http1(entry.sender));
                    }
                }
                None
            }
        }
    }

    /// Sends `req` on `sender`; an HTTP/1.1 connection goes back to the idle list once the
    /// exchange (including the response body) has finished.
    pub async fn send(
        self: &Arc<Self>,
        ep: &Endpoint,
        sender: Sender,
        req: Request<UpBody>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        match sender {
            Sender::Http2(mut s) => s.send_request(req).await,
            Sender::Http1(mut s) => {
                let response = s.send_request(req);
                let key = Key {
                    addr: ep.addr,
                    identity: ep.identity.clone(),
                };
                let this = self.clone();
                tokio::spawn(async move {
                    // Resolves once the response body has been read to its end; an error
                    // means the connection is gone and is simply dropped.
                    if s.ready().await.is_ok() {
                        this.checkin(key, s);
                    }
                });
                response.await
            }
        }
    }

    fn checkin(&self, key: Key, sender: http1::SendRequest<UpBody>) {
        let mut conns = self.conns();
        let idle = conns.http1.entry(key).or_default();
        idle.retain(|e| e.since.elapsed() < self.cfg.idle_timeout && !e.sender.is_closed());
        if idle.len() < self.cfg.max_idle {
            idle.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Idle HTTP/1.1 connections and shared HTTP/2 connections, for tests and dumps.
    pub fn pooled_counts(&self) -> (usize, usize) {
        let conns = self.conns();
        (conns.http1.values().map(Vec::len).sum(), conns.http2.len())
    }
}
