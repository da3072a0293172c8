//! Upstreams: the endpoints of a destination, opening tunnels to them, and the pool of
//! HTTP connections kept open over those tunnels.
//!
//! - An endpoint in the mesh is reached over HBONE, as ztunnel's outbound does it: mTLS with
//!   the proxy's own certificate, the endpoint's identity expected, `CONNECT
//!   <pod-ip>:<target-port>` to `<pod-ip>:15008`, multiplexed on pooled connections
//!   ([`mesh_hbone::Pool`]). An endpoint outside the mesh gets plain TCP.
//! - When the cluster's DestinationRule says `tls` `SIMPLE` or `MUTUAL`, the proxy
//!   originates TLS to the application over that stream ([`crate::origin`]); connections
//!   are pooled per origin, so a changed `tls` block never reuses a connection made under
//!   the old one. A failed handshake is a connect failure (`503 UF`, its reason logged).
//! - HTTP/1.1 upstream connections (one tunnel each) return to an idle list when their
//!   exchange has finished, at most `max_idle` per endpoint, closed after `idle_timeout`.
//!   Such a connection has no task of its own: the request that holds it drives it (hyper's
//!   dispatcher is polled by [`Upstreams::send`] while the response head is awaited, then by
//!   the response body, [`ResponseBody`]), so a request crosses no task boundary on its way
//!   to the tunnel and back. Idle, it is not polled at all; a checkout polls it once, which
//!   finds a connection the other side closed meanwhile. Only what outlives the response
//!   (a request body still streaming, a protocol switch) moves it onto a task.
//!   HTTP/2 upstream connections are shared by all requests to the endpoint.
//! - Each cluster (Service, port, subset) has a pool of its own, as in Envoy.
//! - DestinationRule connection-pool limits ([`ConnLimits`], per endpoint): at most
//!   `tcp.maxConnections` HTTP/1.1 connections open (idle or busy); a request that finds
//!   none free waits for one (at most [`MAX_PENDING_WAIT`]), with at most
//!   `http1MaxPendingRequests` waiting, beyond that [`UpstreamError::Overflow`] (`503 UO`).
//!   `maxRequestsPerConnection`: an HTTP/1.1 connection is closed after that many requests,
//!   a shared HTTP/2 connection gets no new streams after that many (a fresh one is opened;
//!   the old one closes when its streams end, so for a moment two may be open).
//!   `tcp.connectTimeout` and `http.idleTimeout` replace the waypoint's defaults.
//! - The balancer state of every cluster ([`Clusters`]) lives here too, beside the pool.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_hbone::{self as hbone, ConnectHeaders, HboneError, PoolKey, HBONE_PORT};
use mesh_model::identity::Identity;
use mesh_model::model::{Model, NamespacedName, Pod};
use mesh_model::round_robin::RoundRobin;
use mesh_pki::certs::CertManager;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::Instrument;

use crate::balance::{ClusterLabels, Clusters, ConnLimits};
use crate::io::Io;
use crate::origin::{Origin, Origins};

/// Per-endpoint limit counters kept before idle ones are forgotten.
const MAX_SLOT_ENTRIES: usize = 4096;

/// Longest a request waits for a free HTTP/1.1 connection when `tcp.maxConnections` are
/// open, before it is answered `503 UO`.
pub const MAX_PENDING_WAIT: Duration = Duration::from_secs(30);

/// The body of a request sent upstream.
pub type UpBody = UnsyncBoxBody<Bytes, hyper::Error>;

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("upstream {addr}: tls config: {source}")]
    Tls {
        addr: SocketAddr,
        source: mesh_pki::tls::TlsError,
    },
    #[error("upstream {addr}: {source}")]
    Hbone {
        addr: SocketAddr,
        source: HboneError,
    },
    #[error("upstream {addr}: connect: {source}")]
    Connect { addr: SocketAddr, source: io::Error },
    #[error("upstream {addr}: tls origination to {server}: {source}")]
    Origin {
        addr: SocketAddr,
        server: String,
        source: io::Error,
    },
    #[error("upstream {addr}: connect: timed out after {timeout:?}")]
    Timeout { addr: SocketAddr, timeout: Duration },
    #[error("upstream {addr}: http handshake: {source}")]
    Handshake {
        addr: SocketAddr,
        source: hyper::Error,
    },
    /// `http1MaxPendingRequests` already wait for a connection, or none became free within
    /// [`MAX_PENDING_WAIT`], or the receive-buffer budget has no room for a new HTTP/2
    /// connection's window.
    #[error("upstream {addr}: connection pool overflow ({why})")]
    Overflow { addr: SocketAddr, why: &'static str },
}

/// One endpoint of a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    /// Shared with the model: a request's endpoint list and labels copy no pod. `None`: an
    /// EndpointSlice address that is no pod (outside the mesh, reached in plain TCP).
    pub pod: Option<Arc<Pod>>,
    /// `<pod-ip>:<target-port>`.
    pub addr: SocketAddr,
    /// `Some`: in the mesh, reached over HBONE expecting this identity. `None`: plain TCP.
    pub identity: Option<Identity>,
    /// Through a waypoint: the HBONE tunnel goes to this waypoint's address (port 15008)
    /// and asks for `addr` (a Service's VIP and port), as a node agent does for a client
    /// pod — how an ingress gateway reaches a Service that uses a waypoint.
    pub via: Option<IpAddr>,
}

impl Endpoint {
    /// `pod` at `addr`, in the mesh (HBONE) when it is enrolled.
    pub fn of(model: &Model, pod: &Arc<Pod>, addr: SocketAddr, trust_domain: &str) -> Endpoint {
        let identity = model
            .is_ambient(pod)
            .then(|| model.identity_of(pod, trust_domain));
        Endpoint {
            pod: Some(pod.clone()),
            addr,
            identity,
            via: None,
        }
    }

    /// An address outside the mesh (an EndpointSlice address that is no pod): plain TCP.
    pub fn outside(addr: SocketAddr) -> Endpoint {
        Endpoint {
            pod: None,
            addr,
            identity: None,
            via: None,
        }
    }

    /// `authority` (a Service VIP and port) through the waypoint at `waypoint` with
    /// `identity`: HBONE to the waypoint, CONNECT `authority`.
    pub fn through_waypoint(
        authority: SocketAddr,
        waypoint: IpAddr,
        identity: Identity,
    ) -> Endpoint {
        Endpoint {
            pod: None,
            addr: authority,
            identity: Some(identity),
            via: Some(waypoint),
        }
    }

    /// The pod's name, or the address when there is no pod (logs and tests).
    pub fn name(&self) -> String {
        self.pod
            .as_ref()
            .map_or_else(|| self.addr.to_string(), |p| p.name.clone())
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
    Http1(Http1Conn),
    Http2(http2::SendRequest<UpBody>),
}

/// hyper's HTTP/1.1 client dispatcher for one connection: whoever holds the connection
/// polls it (see the module docs).
/// (hyper does not name the type of `with_upgrades`.)
type Driver = Pin<Box<dyn Future<Output = hyper::Result<()>> + Send>>;

/// An HTTP/1.1 upstream connection and what its limits need.
pub struct Http1Conn {
    key: Key,
    sender: http1::SendRequest<UpBody>,
    /// `None` once the connection has ended (closed by either side, or failed).
    driver: Option<Driver>,
    /// Holds one of `tcp.maxConnections` while the connection lives.
    slot: Option<ConnSlot>,
    /// Requests sent on it so far.
    served: u32,
    max_requests: Option<u32>,
    idle_timeout: Duration,
}

/// Open-connection and waiting-request counts of one endpoint.
#[derive(Default)]
struct Slots {
    open: AtomicU32,
    pending: AtomicU32,
    /// Woken when a connection closes or becomes idle.
    freed: Notify,
}

/// One open connection of `tcp.maxConnections`.
struct ConnSlot(Arc<Slots>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.freed.notify_one();
    }
}

/// One request waiting for a connection.
struct Pending(Arc<Slots>);

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Key {
    addr: SocketAddr,
    identity: Option<Identity>,
    /// The cluster's pool ([`ConnLimits::pool`]): clusters do not share connections, so
    /// one cluster's limits count only its own.
    pool: u64,
    /// The [`Origin`] the connection's TLS was made with (0: none).
    origin: u64,
}

struct Idle {
    conn: Http1Conn,
    since: Instant,
}

/// A shared HTTP/2 connection and the streams opened on it.
struct Shared {
    sender: http2::SendRequest<UpBody>,
    streams: u32,
}

/// One worker's pooled connections (see [`Upstreams::new`]).
#[derive(Default)]
struct Conns {
    http1: HashMap<Key, Vec<Idle>>,
    http2: HashMap<Key, Shared>,
}

/// Settings of [`Upstreams`].
#[derive(Clone, Debug)]
pub struct UpstreamConfig {
    /// The identity the proxy presents.
    pub identity: Identity,
    pub connect_timeout: Duration,
    pub idle_timeout: Duration,
    pub max_idle: usize,
    /// TCP keepalive and `TCP_USER_TIMEOUT` on every upstream socket (plain and HBONE).
    pub keepalive: hbone::tcp::Keepalive,
    /// Where outlier-detection ejections are counted.
    pub outlier_ejections: Family<ClusterLabels, Counter>,
    /// The HBONE pool's settings (windows, receive-buffer budget, PING liveness, connections
    /// per peer, send stalls); `connect_timeout` above replaces its own.
    pub hbone: hbone::PoolConfig,
    /// Which data worker the caller runs on (the process shell's `workers::current`;
    /// `|| None` on a shared runtime): it picks that worker's pools.
    pub worker: fn() -> Option<usize>,
}

/// Opens and pools upstream connections. Shared as `Arc<Upstreams>`.
pub struct Upstreams {
    cfg: UpstreamConfig,
    certs: Arc<CertManager>,
    /// Per data worker (`--threading per-worker`; one when the runtime is shared): a
    /// request and the connections it uses stay on one thread.
    hbone: Vec<hbone::Pool>,
    conns: Vec<Mutex<Conns>>,
    /// `tcp.maxConnections` slots per endpoint: shared by the workers, so that the limit is
    /// the DestinationRule's for the whole proxy.
    slots: Mutex<HashMap<Key, Arc<Slots>>>,
    round_robin: RoundRobin<NamespacedName>,
    /// Balancer state per (service, port, subset).
    pub clusters: Clusters,
    /// The TLS origination settings in use, built once per model.
    pub origins: Origins,
}

// === impl Upstreams ===

impl Upstreams {
    /// `workers`: how many data workers pick their own pools (by `cfg.worker`); 1 on a
    /// shared runtime. Balancing, outlier detection, connection limits and TLS origination
    /// settings are shared by all.
    pub fn new(cfg: UpstreamConfig, certs: Arc<CertManager>, workers: usize) -> Arc<Upstreams> {
        let workers = workers.max(1);
        let hbone = (0..workers)
            .map(|_| {
                hbone::Pool::new(hbone::PoolConfig {
                    connect_timeout: cfg.connect_timeout,
                    ..cfg.hbone.clone()
                })
            })
            .collect();
        let clusters = Clusters::new(cfg.outlier_ejections.clone());
        Arc::new(Upstreams {
            cfg,
            certs,
            hbone,
            conns: (0..workers).map(|_| Mutex::default()).collect(),
            slots: Mutex::default(),
            round_robin: RoundRobin::default(),
            clusters,
            origins: Origins::default(),
        })
    }

    /// The next round-robin start index for `svc`.
    pub fn next_index(&self, svc: &NamespacedName) -> usize {
        self.round_robin.next(svc)
    }

    /// The HBONE pools' connections and streams, per data worker (`/config_dump`).
    pub fn hbone_stats(&self) -> Vec<hbone::PoolStats> {
        self.hbone.iter().map(hbone::Pool::stats).collect()
    }

    /// This data worker's index into the per-worker pools (0 off the workers).
    fn worker(&self) -> usize {
        (self.cfg.worker)().unwrap_or(0) % self.conns.len()
    }

    /// This worker's pooled connections.
    fn conns(&self) -> MutexGuard<'_, Conns> {
        // Every update is a single insert or remove: a panic cannot leave it inconsistent.
        self.conns[self.worker()]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// A byte stream to `ep`: an HBONE tunnel (from `local_ip`, the waypoint's address, for
    /// the `forwarded` header) or plain TCP.
    pub async fn connect(
        &self,
        ep: &Endpoint,
        local_ip: IpAddr,
        service_host: Option<String>,
    ) -> Result<Box<dyn Io>, UpstreamError> {
        self.connect_within(ep, local_ip, service_host, self.cfg.connect_timeout)
            .await
    }

    /// A connection for a port the proxy relays as TCP: [`Upstreams::connect`], then TLS
    /// originated over it (no ALPN) when `origin` is given (DestinationRule `tls` `SIMPLE` /
    /// `MUTUAL`), the handshake within the connect timeout too.
    pub async fn connect_tcp(
        &self,
        ep: &Endpoint,
        local_ip: IpAddr,
        service_host: Option<String>,
        origin: Option<&Origin>,
    ) -> Result<Box<dyn Io>, UpstreamError> {
        let timeout = self.cfg.connect_timeout;
        let origin = origin.map(|o| (o, None));
        self.connect_app(ep, local_ip, service_host, timeout, origin)
            .await
    }

    /// [`Upstreams::connect_within`], then TLS originated over the stream when `origin`
    /// is given (offering the ALPN of the HTTP protocol, none for TCP; the handshake within
    /// `timeout` too).
    async fn connect_app(
        &self,
        ep: &Endpoint,
        local_ip: IpAddr,
        service_host: Option<String>,
        timeout: Duration,
        origin: Option<(&Origin, Option<UpstreamProto>)>,
    ) -> Result<Box<dyn Io>, UpstreamError> {
        let stream = self
            .connect_within(ep, local_ip, service_host, timeout)
            .await?;
        let Some((origin, proto)) = origin else {
            return Ok(stream);
        };
        let tls = origin
            .connect(stream, proto, timeout)
            .await
            .map_err(|source| UpstreamError::Origin {
                addr: ep.addr,
                server: origin.server_name(),
                source,
            })?;
        Ok(Box::new(tls))
    }

    /// [`Upstreams::connect`] with its own connect timeout (`tcp.connectTimeout`).
    async fn connect_within(
        &self,
        ep: &Endpoint,
        local_ip: IpAddr,
        service_host: Option<String>,
        timeout: Duration,
    ) -> Result<Box<dyn Io>, UpstreamError> {
        let addr = ep.addr;
        let Some(dst) = &ep.identity else {
            let tcp = tokio::time::timeout(timeout, TcpStream::connect(addr))
                .await
                .map_err(|_| UpstreamError::Timeout { addr, timeout })?
                .map_err(|source| UpstreamError::Connect { addr, source })?;
            let _ = tcp.set_nodelay(true);
            let _ = self.cfg.keepalive.apply(&tcp);
            return Ok(Box::new(tcp));
        };
        let tls = mesh_pki::tls::client_config(
            self.certs.clone(),
            self.cfg.identity.clone(),
            vec![dst.clone()],
        )
        .map_err(|source| UpstreamError::Tls { addr, source })?;
        let hbone_addr = SocketAddr::new(ep.via.unwrap_or(addr.ip()), HBONE_PORT);
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
        let keepalive = self.cfg.keepalive;
        let dial = move || async move {
            let tcp = tokio::time::timeout(timeout, TcpStream::connect(hbone_addr))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
            let _ = tcp.set_nodelay(true);
            keepalive.apply(&tcp)?;
            Ok(tcp)
        };
        let stream = self.hbone[self.worker()]
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
        self.checkout_limited(
            ep,
            proto,
            local_ip,
            service_host,
            ConnLimits::default(),
            None,
        )
        .await
    }

    /// [`Upstreams::checkout`] within a DestinationRule's connection-pool `limits` (see the
    /// module docs), originating TLS with `origin` when given.
    pub async fn checkout_limited(
        self: &Arc<Self>,
        ep: &Endpoint,
        proto: UpstreamProto,
        local_ip: IpAddr,
        service_host: Option<String>,
        limits: ConnLimits,
        origin: Option<&Origin>,
    ) -> Result<Sender, UpstreamError> {
        let key = Key {
            addr: ep.addr,
            identity: ep.identity.clone(),
            pool: limits.pool,
            origin: origin.map_or(0, |o| o.id),
        };
        let idle_timeout = limits.idle_timeout.unwrap_or(self.cfg.idle_timeout);
        let slot = match proto {
            UpstreamProto::Http2 => {
                if let Some(sender) = self.pooled_h2(&key, limits.max_requests_per_connection) {
                    return Ok(Sender::Http2(sender));
                }
                None
            }
            UpstreamProto::Http1 => match self.http1_slot(&key, limits).await? {
                Ok(conn) => return Ok(Sender::Http1(conn)),
                Err(slot) => slot,
            },
        };
        let timeout = limits.connect_timeout.unwrap_or(self.cfg.connect_timeout);
        // HTTP/2 buffers responses ahead of the handlers: its window comes from the process's
        // receive-buffer budget (held by the connection task), and no room is an overflow.
        let window = match proto {
            UpstreamProto::Http2 => Some(
                self.cfg
                    .hbone
                    .receive_budget
                    .reserve(hbone::CONNECTION_WINDOW)
                    .ok_or(UpstreamError::Overflow {
                        addr: ep.addr,
                        why: "receive-buffer budget spent",
                    })?,
            ),
            UpstreamProto::Http1 => None,
        };
        let io = TokioIo::new(
            self.connect_app(
                ep,
                local_ip,
                service_host,
                timeout,
                origin.map(|o| (o, Some(proto))),
            )
            .await?,
        );
        let addr = ep.addr;
        let span = tracing::debug_span!("upstream_conn", %addr, ?proto);
        match proto {
            UpstreamProto::Http1 => {
                let (sender, conn) = http1::Builder::new()
                    .handshake(io)
                    .await
                    .map_err(|source| UpstreamError::Handshake { addr, source })?;
                drop(span);
                Ok(Sender::Http1(Http1Conn {
                    key: key.clone(),
                    sender,
                    // `with_upgrades`: a `101` hands the connection to `crate::upgrade`.
                    driver: Some(Box::pin(conn.with_upgrades())),
                    slot,
                    served: 0,
                    max_requests: limits.max_requests_per_connection,
                    idle_timeout,
                }))
            }
            UpstreamProto::Http2 => {
                let (stream_window, conn_window) = window
                    .as_ref()
                    .map_or((hbone::STREAM_WINDOW, hbone::CONNECTION_WINDOW), |w| {
                        (w.stream_window(hbone::STREAM_WINDOW), w.window())
                    });
                let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                    .timer(TokioTimer::new())
                    .initial_stream_window_size(stream_window)
                    .initial_connection_window_size(conn_window)
                    .max_header_list_size(hbone::MAX_HEADER_LIST_SIZE)
                    .handshake(io)
                    .await
                    .map_err(|source| UpstreamError::Handshake { addr, source })?;
                tokio::spawn(
                    async move {
                        let _window = window;
                        if let Err(e) = conn.await {
                            tracing::debug!(error = %e, "upstream connection ended");
                        }
                    }
                    .instrument(span),
                );
                self.conns().http2.insert(
                    key,
                    Shared {
                        sender: sender.clone(),
                        streams: 1,
                    },
                );
                Ok(Sender::Http2(sender))
            }
        }
    }

    /// An idle HTTP/1.1 connection (`Ok(Ok)`), or leave to open a new one (`Ok(Err)`, with
    /// its `tcp.maxConnections` slot when limited), waiting while the limit is reached.
    async fn http1_slot(
        &self,
        key: &Key,
        limits: ConnLimits,
    ) -> Result<Result<Http1Conn, Option<ConnSlot>>, UpstreamError> {
        let Some(max) = limits.max_connections else {
            return Ok(self.pooled_h1(key).ok_or(None));
        };
        let slots = {
            let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
            if slots.len() >= MAX_SLOT_ENTRIES {
                // Endpoints come and go: forget those without a connection or a waiter.
                slots.retain(|_, s| Arc::strong_count(s) > 1);
            }
            slots.entry(key.clone()).or_default().clone()
        };
        let deadline = tokio::time::Instant::now() + MAX_PENDING_WAIT;
        let mut waiting: Option<Pending> = None;
        loop {
            let freed = slots.freed.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            if let Some(conn) = self.pooled_h1(key) {
                return Ok(Ok(conn));
            }
            let took = slots
                .open
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < max).then_some(n + 1)
                })
                .is_ok();
            if took {
                return Ok(Err(Some(ConnSlot(slots.clone()))));
            }
            if self.evict_idle_elsewhere(key) {
                // Its slot is free now: take it (or, raced, wait like the rest).
                continue;
            }
            if waiting.is_none() {
                let limit = limits.max_pending.unwrap_or(u32::MAX);
                let queued = slots
                    .pending
                    .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                        (n < limit).then_some(n + 1)
                    })
                    .is_ok();
                if !queued {
                    return Err(UpstreamError::Overflow {
                        addr: key.addr,
                        why: "http1MaxPendingRequests requests already wait",
                    });
                }
                waiting = Some(Pending(slots.clone()));
            }
            if tokio::time::timeout_at(deadline, freed).await.is_err() {
                return Err(UpstreamError::Overflow {
                    addr: key.addr,
                    why: "no connection became free in time",
                });
            }
        }
    }

    /// Closes one idle HTTP/1.1 connection to `key` that another worker keeps, so that its
    /// `tcp.maxConnections` slot can be taken by this one: the limit is the proxy's while the
    /// idle lists are per worker, and a worker must not wait on a connection no request of
    /// its own can use. Whether one was closed.
    fn evict_idle_elsewhere(&self, key: &Key) -> bool {
        let own = self.worker();
        for (worker, conns) in self.conns.iter().enumerate() {
            if worker == own {
                continue;
            }
            let idle = {
                let mut conns = conns.lock().unwrap_or_else(|e| e.into_inner());
                conns.http1.get_mut(key).and_then(Vec::pop)
            };
            // Dropped outside the lock: closing it releases its slot.
            if let Some(idle) = idle {
                drop(idle);
                return true;
            }
        }
        false
    }

    fn pooled_h2(&self, key: &Key, max_streams: Option<u32>) -> Option<http2::SendRequest<UpBody>> {
        let mut conns = self.conns();
        let shared = conns.http2.get_mut(key)?;
        let spent = max_streams.is_some_and(|max| shared.streams >= max);
        if shared.sender.is_closed() || spent {
            // Spent: new streams go to a fresh connection; this one closes when its
            // streams end and the last sender is dropped.
            conns.http2.remove(key);
            return None;
        }
        shared.streams = shared.streams.saturating_add(1);
        Some(shared.sender.clone())
    }

    fn pooled_h1(&self, key: &Key) -> Option<Http1Conn> {
        loop {
            // Taken out of the list first: polling it may close its socket, not under the lock.
            let mut entry = {
                let mut conns = self.conns();
                conns.http1.get_mut(key)?.pop()?
            };
            if entry.since.elapsed() >= entry.conn.idle_timeout {
                continue;
            }
            // Nothing polled it while it was idle: one poll reads what arrived meanwhile (the
            // other side's close, most often).
            entry.conn.poll_once();
            if entry.conn.reusable() {
                return Some(entry.conn);
            }
        }
    }

    /// Sends `req` on `sender`. An HTTP/1.1 connection is driven by this future until the
    /// response head arrives, then by the response body, and goes back to the idle list once
    /// the exchange (including the response body) has finished.
    pub async fn send(
        self: &Arc<Self>,
        // The connection knows its endpoint; kept so callers read the same.
        _ep: &Endpoint,
        sender: Sender,
        req: Request<UpBody>,
    ) -> Result<Response<ResponseBody>, hyper::Error> {
        match sender {
            Sender::Http2(mut s) => Ok(s.send_request(req).await?.map(ResponseBody::plain)),
            Sender::Http1(mut conn) => {
                let mut response = std::pin::pin!(conn.sender.send_request(req));
                conn.served = conn.served.saturating_add(1);
                let response = std::future::poll_fn(|cx| {
                    // The dispatcher first: it writes the request and reads the response.
                    // When it ends, `response` resolves too (with an error if no response
                    // came).
                    conn.poll_driver(cx);
                    response.as_mut().poll(cx)
                })
                .await?;
                if response.status() == StatusCode::SWITCHING_PROTOCOLS {
                    // The dispatcher must run on to hand the connection to the upgrade.
                    conn.spawn_driver();
                    return Ok(response.map(ResponseBody::plain));
                }
                let pool = self.clone();
                Ok(response.map(|inner| ResponseBody {
                    inner,
                    conn: Some((conn, pool)),
                }))
            }
        }
    }

    /// The exchange on `conn` has finished (its response body ended): back to the idle list
    /// when it can take another request now, else once it can (a request body still
    /// streaming), on a task of its own.
    fn finish(self: Arc<Self>, mut conn: Http1Conn) {
        conn.poll_once();
        if conn.reusable() {
            return self.checkin(conn.key.clone(), conn);
        }
        let Some(runtime) = conn
            .driver
            .as_ref()
            .and_then(|_| tokio::runtime::Handle::try_current().ok())
        else {
            return;
        };
        runtime.spawn(async move {
            let ready = std::future::poll_fn(|cx| {
                conn.poll_driver(cx);
                if conn.driver.is_none() {
                    return Poll::Ready(false);
                }
                conn.sender.poll_ready(cx).map(|r| r.is_ok())
            })
            .await;
            if ready {
                self.checkin(conn.key.clone(), conn);
            }
        });
    }

    fn checkin(&self, key: Key, conn: Http1Conn) {
        if conn.max_requests.is_some_and(|max| conn.served >= max) {
            // maxRequestsPerConnection: dropping it closes the connection (and frees its
            // slot).
            return;
        }
        let freed = conn.slot.as_ref().map(|s| s.0.clone());
        {
            let mut conns = self.conns();
            let idle = conns.http1.entry(key).or_default();
            idle.retain(|e| e.since.elapsed() < e.conn.idle_timeout && !e.conn.sender.is_closed());
            if idle.len() < self.cfg.max_idle {
                idle.push(Idle {
                    conn,
                    since: Instant::now(),
                });
            }
        }
        // A request waiting for a connection may take this one.
        if let Some(slots) = freed {
            slots.freed.notify_one();
        }
    }

    /// Idle HTTP/1.1 connections and shared HTTP/2 connections, for tests and dumps.
    pub fn pooled_counts(&self) -> (usize, usize) {
        let conns = self.conns();
        (conns.http1.values().map(Vec::len).sum(), conns.http2.len())
    }
}

// === impl Http1Conn ===

impl Http1Conn {
    /// Polls the dispatcher (writes what is queued, reads what arrived); `driver` becomes
    /// `None` when the connection has ended.
    fn poll_driver(&mut self, cx: &mut Context<'_>) {
        let Some(driver) = self.driver.as_mut() else {
            return;
        };
        if let Poll::Ready(result) = driver.as_mut().poll(cx) {
            if let Err(e) = result {
                tracing::debug!(addr = %self.key.addr, error = %e, "upstream connection ended");
            }
            self.driver = None;
        }
    }

    /// [`Http1Conn::poll_driver`] once, outside any task's wakeups: whoever holds the
    /// connection next polls it with its own.
    fn poll_once(&mut self) {
        self.poll_driver(&mut Context::from_waker(std::task::Waker::noop()));
    }

    /// Open and ready for the next request.
    fn reusable(&self) -> bool {
        self.driver.is_some() && !self.sender.is_closed() && self.sender.is_ready()
    }

    /// Hands the dispatcher to a task of its own (a protocol switch completes there).
    fn spawn_driver(&mut self) {
        if let Some(driver) = self.driver.take() {
            let addr = self.key.addr;
            tokio::spawn(
                async move {
                    if let Err(e) = driver.await {
                        tracing::debug!(error = %e, "upstream connection ended");
                    }
                }
                .instrument(tracing::debug_span!("upstream_conn", %addr)),
            );
        }
    }
}

/// The body of an upstream response. On an HTTP/1.1 connection it drives the connection
/// while it is read (the data arrive through the dispatcher) and returns the connection to
/// the pool when it ends; dropped before its end, the connection is closed with it (its
/// unread rest could not be told from the next response).
pub struct ResponseBody {
    inner: Incoming,
    conn: Option<(Http1Conn, Arc<Upstreams>)>,
}

impl ResponseBody {
    fn plain(inner: Incoming) -> ResponseBody {
        ResponseBody { inner, conn: None }
    }

    fn finish(&mut self) {
        if let Some((conn, pool)) = self.conn.take() {
            pool.finish(conn);
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some((conn, _)) = this.conn.as_mut() {
            conn.poll_driver(cx);
        }
        let frame = std::task::ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            None => this.finish(),
            Some(Err(_)) => this.conn = None,
            Some(Ok(_)) if this.inner.is_end_stream() => this.finish(),
            Some(Ok(_)) => {}
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // A body with nothing to read (`Content-Length: 0`, `204`, `304`) may never be
        // polled: its exchange is over all the same.
        if self.inner.is_end_stream() {
            self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;

    use http_body_util::{BodyExt, Empty};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;
    use crate::engine::testing;

    /// How the test origin treats a connection after each response.
    #[derive(Clone, Copy)]
    enum After {
        KeepOpen,
        /// Closes it 20 ms after the response is written (as an idle timeout would, with
        /// no `Connection: close`).
        CloseIdle,
    }

    /// A plain HTTP/1.1 origin on loopback answering every request with `body`; counts the
    /// connections it accepted.
    async fn origin(body: &'static str, after: After) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let rsp = format!(
                                "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                                body.len()
                            );
                            if tcp.write_all(rsp.as_bytes()).await.is_err() {
                                return;
                            }
                            if let After::CloseIdle = after {
                                tokio::time::sleep(Duration::from_millis(20)).await;
                                return;
                            }
                        }
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        (addr, accepted)
    }

    fn endpoint(addr: SocketAddr) -> Endpoint {
        let model = testing::model(&[]);
        let pod = model.pod("app", "web-1").expect("pod").clone();
        Endpoint {
            pod: Some(pod.into()),
            addr,
            identity: None,
            via: None,
        }
    }

    fn get() -> Request<UpBody> {
        let mut req = Request::new(Empty::<Bytes>::new().map_err(|e| match e {}).boxed_unsync());
        *req.uri_mut() = "/".parse().expect("uri");
        req
    }

    /// One request on a pooled (or new) connection; the response body read to its end
    /// unless `read_body` is false (the response dropped after its head).
    async fn exchange(up: &Arc<Upstreams>, ep: &Endpoint, read_body: bool) -> (u16, String) {
        let local = IpAddr::from([127, 0, 0, 1]);
        let sender = up
            .checkout(ep, UpstreamProto::Http1, local, None)
            .await
            .expect("checkout");
        let rsp = up.send(ep, sender, get()).await.expect("response");
        let status = rsp.status().as_u16();
        if !read_body {
            return (status, String::new());
        }
        let body = rsp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    thread_local! {
        /// The data worker the test pretends to run on.
        static WORKER: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
    }

    fn test_worker() -> Option<usize> {
        WORKER.with(std::cell::Cell::get)
    }

    #[tokio::test]
    async fn a_worker_at_the_connection_limit_closes_another_workers_idle_connection() {
        let (addr, accepted) = origin("ok", After::KeepOpen).await;
        let ca = mesh_pki::ca::Ca::ephemeral("cluster.local").expect("ephemeral ca");
        let certs = CertManager::new(Arc::new(ca), Duration::from_secs(3600));
        let (_, http_metrics) = crate::telemetry::HttpMetrics::new();
        let wp = Identity::new("cluster.local", "app", "wp");
        let up = testing::upstreams(&wp, &http_metrics, certs, 2, test_worker);
        let ep = endpoint(addr);
        let limits = ConnLimits {
            max_connections: Some(1),
            ..ConnLimits::default()
        };
        let local = IpAddr::from([127, 0, 0, 1]);
        for worker in [0, 1, 0] {
            WORKER.with(|w| w.set(Some(worker)));
            let checkout =
                up.checkout_limited(&ep, UpstreamProto::Http1, local, None, limits, None);
            let sender = tokio::time::timeout(Duration::from_secs(2), checkout)
                .await
                .expect("not left waiting for the other worker's idle connection")
                .expect("checkout");
            let rsp = up.send(&ep, sender, get()).await.expect("response");
            let body = rsp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(&body[..], b"ok");
            assert_eq!(up.pooled_counts(), (1, 0), "worker {worker} keeps it idle");
        }
        // The limit held throughout: each worker closed the other's idle connection first.
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn a_connection_is_driven_by_its_requests_and_reused() {
        let (addr, accepted) = origin("ok", After::KeepOpen).await;
        let up = testing::inputs(testing::model(&[])).upstreams.clone();
        let ep = endpoint(addr);
        for _ in 0..3 {
            assert_eq!(exchange(&up, &ep, true).await, (200, "ok".to_string()));
            // Back in the idle list as soon as the body ended: no task had to run first.
            assert_eq!(up.pooled_counts(), (1, 0));
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "one connection for all three"
        );
    }

    #[tokio::test]
    async fn an_empty_body_that_is_never_read_still_returns_its_connection() {
        let (addr, accepted) = origin("", After::KeepOpen).await;
        let up = testing::inputs(testing::model(&[])).upstreams.clone();
        let ep = endpoint(addr);
        for _ in 0..2 {
            assert_eq!(exchange(&up, &ep, false).await.0, 200);
            assert_eq!(up.pooled_counts(), (1, 0));
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_closes_its_connection() {
        let (addr, accepted) = origin("not read", After::KeepOpen).await;
        let up = testing::inputs(testing::model(&[])).upstreams.clone();
        let ep = endpoint(addr);
        assert_eq!(exchange(&up, &ep, false).await.0, 200);
        assert_eq!(
            up.pooled_counts(),
            (0, 0),
            "its unread rest would poison the next"
        );
        assert_eq!(exchange(&up, &ep, true).await.1, "not read");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn an_idle_connection_the_origin_closed_is_not_reused() {
        let (addr, accepted) = origin("ok", After::CloseIdle).await;
        let up = testing::inputs(testing::model(&[])).upstreams.clone();
        let ep = endpoint(addr);
        for _ in 0..3 {
            assert_eq!(exchange(&up, &ep, true).await, (200, "ok".to_string()));
            assert_eq!(up.pooled_counts(), (1, 0), "idle, open");
            // The origin's FIN reaches the idle connection, which nothing polls.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Each checkout found the last connection closed and opened a new one; no request
        // failed on a dead one.
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }
}
