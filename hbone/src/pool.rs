//! The HBONE client: CONNECT streams multiplexed over pooled mTLS HTTP/2 connections.
//!
//! Connections are pooled per [`PoolKey`] (source identity and IP, destination identity and
//! address). A connection carries at most `max_streams_per_conn` streams (and never more than
//! the peer's SETTINGS_MAX_CONCURRENT_STREAMS); when all are full another one is dialed.
//! A connection closes after `idle_timeout` without streams, or after `spare_idle_timeout`
//! while another connection to its key is open (a burst's extra connections do not outlive it
//! by a minute: 10,000 tunnels take 100 connections, and one carries what follows); one that
//! failed or got a
//! GOAWAY is never handed out again. Concurrent callers that find no room wait for a dial
//! already under way for their key instead of each dialing their own.
//!
//! Hostile or broken peers (RELIABILITY 12, 32, 37): at most `max_conns_per_key`
//! connections whose peer allows fewer streams than we would carry (its SETTINGS
//! MAX_CONCURRENT_STREAMS below `max_streams_per_conn`, e.g. 0) are open to one key, so such
//! a peer cannot make us dial once per request; callers beyond that wait for a stream to free
//! up, within the connect timeout, then fail with [`HboneError::PoolFull`]. Connections that
//! take their full share are dialed as demand needs them: demand is the agent's accepted
//! connections, themselves capped per pod and per process, so one source may hold as many
//! tunnels to one destination as its connection cap allows (4,096 per pod by default: 41
//! connections of 100 streams). Every connection is PINGed every `ping_interval`; one that does
//! not answer within `ping_timeout` is dropped from the pool and its streams fail.
//!
//! Responses are buffered too: each connection reserves its receive window from
//! `receive_budget` before it dials, holds it until the last of its streams is gone, and is
//! not dialed ([`HboneError::OverBudget`]) when the budget has no room.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::Reason;
use http::{Request, StatusCode};
use tokio::net::TcpStream;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tracing::Instrument;

use super::budget::{ReceiveBudget, Reservation};
use super::liveness::Liveness;
use super::stream::H2Stream;
use super::{HboneError, ALPN_H2, CONNECTION_WINDOW, MAX_HEADER_LIST_SIZE, STREAM_WINDOW};
use mesh_model::identity::Identity;

/// Default cap on streams per pooled connection.
pub const DEFAULT_MAX_STREAMS_PER_CONN: u32 = 100;
/// Default time a connection stays open without streams.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default time a connection stays open without streams while its key has another one open.
pub const DEFAULT_SPARE_IDLE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default bound on dial + TLS + HTTP/2 handshake + CONNECT response.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Default interval between liveness PINGs on a pooled connection.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);
/// Default time a peer has to answer a PING.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Default most connections open to one pool key whose peer allows fewer streams than
/// we would carry.
pub const DEFAULT_MAX_CONNS_PER_KEY: usize = 4;

/// How often one `connect` may move on from a pooled connection that turned out to be dead
/// (GOAWAY, reset) before giving up; each retry ends in a fresh dial at the latest.
const MAX_STALE_RETRIES: usize = 3;

/// How long an idle-expired connection may take to send its GOAWAY and close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// What a pooled connection is shared by: nothing else may ride on it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub src: Identity,
    pub src_ip: IpAddr,
    pub dst: Identity,
    /// The destination's HBONE address (`ip:15008`).
    pub dst_addr: SocketAddr,
}

#[derive(Clone, Debug)]
pub struct PoolConfig {
    /// Most concurrent streams per connection (the peer's own limit applies too).
    pub max_streams_per_conn: u32,
    /// A connection without streams for this long is closed.
    pub idle_timeout: Duration,
    /// ... or for this long (if shorter) while another connection to its key is open.
    pub spare_idle_timeout: Duration,
    /// Bound on one `connect`: dial, TLS and HTTP/2 handshakes and the CONNECT response.
    pub connect_timeout: Duration,
    /// A PING goes out this often on every connection (`None`: never); a peer that does
    /// not answer within `ping_timeout` is dead and its connection dropped.
    pub ping_interval: Option<Duration>,
    pub ping_timeout: Duration,
    /// Most connections open at once to one key whose peer allows fewer streams than
    /// `max_streams_per_conn` (at least 1); connections that take their full share are not
    /// capped here (see the module docs).
    pub max_conns_per_key: usize,
    /// A tunnel whose peer keeps its window shut this long while we have bytes to send is
    /// reset (`None`: wait forever).
    pub send_stall_timeout: Option<Duration>,
    /// Receive window per stream (never above the connection's).
    pub stream_window: u32,
    /// Receive window per connection we ask `receive_budget` for; we may get less.
    pub connection_window: u32,
    /// Where each connection's window is reserved.
    pub receive_budget: ReceiveBudget,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            max_streams_per_conn: DEFAULT_MAX_STREAMS_PER_CONN,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            spare_idle_timeout: DEFAULT_SPARE_IDLE_TIMEOUT,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            ping_interval: Some(DEFAULT_PING_INTERVAL),
            ping_timeout: DEFAULT_PING_TIMEOUT,
            max_conns_per_key: DEFAULT_MAX_CONNS_PER_KEY,
            send_stall_timeout: Some(super::server::DEFAULT_SEND_STALL_TIMEOUT),
            stream_window: STREAM_WINDOW,
            connection_window: CONNECTION_WINDOW,
            receive_budget: ReceiveBudget::default(),
        }
    }
}

/// A snapshot for `/config_dump` and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    /// Open connections that may still take streams or carry some.
    pub connections: usize,
    /// Open CONNECT streams (and ones being opened) over all connections.
    pub streams: usize,
}

/// The HBONE connection pool. Cheap to clone; clones share the pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<PoolInner>,
}

struct PoolInner {
    cfg: PoolConfig,
    entries: Mutex<HashMap<PoolKey, Entry>>,
    next_id: AtomicU64,
    /// Woken when a stream or a connection goes away, for callers waiting on a full key.
    capacity: Arc<Notify>,
}

#[derive(Default)]
struct Entry {
    conns: Vec<Arc<PooledConn>>,
    /// Set while one caller dials for this key; others wait on it.
    dialing: Option<watch::Receiver<DialOutcome>>,
}

/// `None` while the dial runs; then whether it produced a connection.
type DialOutcome = Option<Result<(), Arc<HboneError>>>;

/// The pool's handle on one connection. Dropping the last one (with no streams left) lets
/// h2 close the connection with a GOAWAY.
struct PooledConn {
    send: SendRequest<Bytes>,
    state: Arc<ConnState>,
}

/// Per-connection accounting shared by the pool, the streams and the connection task.
pub(crate) struct ConnState {
    id: u64,
    /// Streams open or being opened on this connection.
    active: AtomicUsize,
    /// Failed, got GOAWAY, or expired: never hand it out again.
    closed: AtomicBool,
    /// When a stream was last added or removed; idle expiry counts from here.
    last_activity: Mutex<Instant>,
    /// Wakes the connection task when the stream count drops to zero.
    idle: Notify,
    /// The pool's [`PoolInner::capacity`].
    capacity: Arc<Notify>,
    /// The receive window, given back once the connection task and every stream are gone.
    _window: Reservation,
}

/// One reserved stream on a pooled connection; released on drop.
pub(crate) struct StreamSlot {
    state: Arc<ConnState>,
}

/// What happened to one attempt at a CONNECT on a chosen connection.
struct OpenError {
    error: HboneError,
    /// The connection is unusable (GOAWAY, io error): mark it closed.
    conn_broken: bool,
    /// The request never reached the application: it may be tried on another connection.
    retryable: bool,
}

enum Step {
    Reuse(Arc<PooledConn>, StreamSlot),
    Wait(watch::Receiver<DialOutcome>),
    /// The key has its most connections and none has room: wait for a stream to end.
    Full,
    // Boxed: the key makes the guard large, and this is the rare step.
    Dial(Box<DialGuard>),
}

/// Held by the one caller dialing for a key; clears the "dialing" mark even if that
/// caller is cancelled, so waiters move on.
struct DialGuard {
    pool: Arc<PoolInner>,
    key: PoolKey,
    tx: watch::Sender<DialOutcome>,
    finished: bool,
}

// === impl Pool ===

impl Pool {
    pub fn new(cfg: PoolConfig) -> Pool {
        Pool {
            inner: Arc::new(PoolInner {
                cfg,
                entries: Mutex::new(HashMap::new()),
                next_id: AtomicU64::new(1),
                capacity: Arc::new(Notify::new()),
            }),
        }
    }

    /// Opens a CONNECT stream for `req` on a pooled connection for `key`, dialing a new one
    /// with `dial()` + TLS (`tls`, ALPN h2) + HTTP/2 handshake when none has room.
    /// A response other than 200 is `Err(HboneError::Status(code))`.
    pub async fn connect<D, F>(
        &self,
        key: PoolKey,
        tls: Arc<rustls::ClientConfig>,
        dial: D,
        req: http::Request<()>,
    ) -> Result<H2Stream, HboneError>
    where
        D: FnOnce() -> F,
        F: Future<Output = io::Result<TcpStream>>,
    {
        // A waiter on a full key gives up a little before the overall deadline, so that it
        // can say why.
        let timeout = self.inner.cfg.connect_timeout;
        let deadline = Instant::now() + timeout.mul_f32(0.95);
        tokio::time::timeout(timeout, self.connect_inner(key, tls, dial, req, deadline))
            .await
            .unwrap_or(Err(HboneError::Timeout))
    }

    async fn connect_inner<D, F>(
        &self,
        key: PoolKey,
        tls: Arc<rustls::ClientConfig>,
        dial: D,
        req: http::Request<()>,
        deadline: Instant,
    ) -> Result<H2Stream, HboneError>
    where
        D: FnOnce() -> F,
        F: Future<Output = io::Result<TcpStream>>,
    {
        let mut dial = Some(dial);
        let mut stale = 0;
        loop {
            let (conn, slot, fresh) = self.checkout(&key, &tls, &mut dial, deadline).await?;
            match open_stream(&conn, slot, clone_request(&req)).await {
                Ok(stream) => {
                    return Ok(stream.with_stall_timeout(self.inner.cfg.send_stall_timeout))
                }
                Err(e) => {
                    if e.conn_broken {
                        conn.state.closed.store(true, Ordering::Release);
                    }
                    // A fresh connection failing is an answer about the destination, not a
                    // stale pool entry: report it.
                    if fresh || !e.retryable || stale >= MAX_STALE_RETRIES {
                        return Err(e.error);
                    }
                    stale += 1;
                    tracing::debug!(error = %e.error, dst = %key.dst_addr, "pooled connection unusable; retrying");
                }
            }
        }
    }

    pub fn stats(&self) -> PoolStats {
        let entries = self.inner.lock();
        let mut stats = PoolStats::default();
        for conn in entries.values().flat_map(|e| e.conns.iter()) {
            if !conn.state.closed.load(Ordering::Acquire) {
                stats.connections += 1;
            }
            stats.streams += conn.state.active.load(Ordering::Acquire);
        }
        stats
    }

    /// A connection with a reserved stream: pooled (`false`) or freshly dialed (`true`).
    async fn checkout<D, F>(
        &self,
        key: &PoolKey,
        tls: &Arc<rustls::ClientConfig>,
        dial: &mut Option<D>,
        deadline: Instant,
    ) -> Result<(Arc<PooledConn>, StreamSlot, bool), HboneError>
    where
        D: FnOnce() -> F,
        F: Future<Output = io::Result<TcpStream>>,
    {
        loop {
            // Registered before looking, so a stream ending in between is not missed.
            let freed = self.inner.capacity.notified();
            tokio::pin!(freed);
            freed.as_mut().enable();
            let step = self.inner.step(key);
            match step {
                Step::Reuse(conn, slot) => return Ok((conn, slot, false)),
                Step::Full => {
                    if tokio::time::timeout_at(deadline, freed).await.is_err() {
                        return Err(HboneError::PoolFull);
                    }
                }
                Step::Wait(mut rx) => {
                    let failed = match rx.wait_for(Option::is_some).await {
                        Ok(outcome) => match &*outcome {
                            Some(Err(e)) => Some(e.duplicate()),
                            _ => None,
                        },
                        // The dialer was cancelled: look again (and maybe dial ourselves).
                        Err(_) => None,
                    };
                    if let Some(e) = failed {
                        return Err(e);
                    }
                }
                Step::Dial(guard) => {
                    // Only reachable once: a freshly dialed connection's failure is final.
                    let Some(dial) = dial.take() else {
                        return Err(HboneError::Closed);
                    };
                    return match self.establish(key, tls, dial).await {
                        Ok(conn) => {
                            let slot = conn.state.reserve();
                            guard.succeed(conn.clone());
                            Ok((conn, slot, true))
                        }
                        Err(e) => {
                            let shared = Arc::new(e.duplicate());
                            guard.fail(shared);
                            Err(e)
                        }
                    };
                }
            }
        }
    }

    /// Dial, TLS, HTTP/2 handshake; spawns the task that drives the connection.
    async fn establish<D, F>(
        &self,
        key: &PoolKey,
        tls: &Arc<rustls::ClientConfig>,
        dial: D,
    ) -> Result<Arc<PooledConn>, HboneError>
    where
        D: FnOnce() -> F,
        F: Future<Output = io::Result<TcpStream>>,
    {
        let cfg = &self.inner.cfg;
        let window = cfg
            .receive_budget
            .reserve(cfg.connection_window)
            .ok_or(HboneError::OverBudget)?;
        let tcp = dial().await.map_err(HboneError::Dial)?;
        // HBONE peers are verified by SPIFFE identity, not by name; SNI is off.
        let tls = tokio_rustls::TlsConnector::from(with_h2_alpn(tls))
            .connect(mesh_pki::tls::server_name(), tcp)
            .await
            .map_err(HboneError::Tls)?;
        if tls.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
            return Err(HboneError::Alpn);
        }
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(window.stream_window(cfg.stream_window))
            .initial_connection_window_size(window.window())
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .enable_push(false)
            .handshake::<_, Bytes>(tls)
            .await?;
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState::new(id, self.inner.capacity.clone(), window));
        let liveness = Liveness::new(conn.ping_pong(), cfg.ping_interval, cfg.ping_timeout);
        let span = tracing::debug_span!("hbone_client_conn", id, dst = %key.dst_addr);
        tokio::spawn(
            drive(
                conn,
                state.clone(),
                Arc::downgrade(&self.inner),
                key.clone(),
                IdleTimeouts {
                    alone: cfg.idle_timeout,
                    spare: cfg.spare_idle_timeout.min(cfg.idle_timeout),
                },
                liveness,
            )
            .instrument(span),
        );
        tracing::debug!(id, dst = %key.dst_addr, src = %key.src, "hbone connection established");
        Ok(Arc::new(PooledConn { send, state }))
    }
}

impl std::fmt::Debug for Pool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pool")
            .field("cfg", &self.inner.cfg)
            .field("stats", &self.stats())
            .finish()
    }
}

/// Sends the CONNECT on `conn` and waits for the answer.
async fn open_stream(
    conn: &PooledConn,
    slot: StreamSlot,
    req: Request<()>,
) -> Result<H2Stream, OpenError> {
    // Errors before the request is on the wire mean the connection is gone (GOAWAY, io).
    let before_send = |e: h2::Error| OpenError {
        conn_broken: e.is_go_away() || e.is_io() || e.reason().is_some(),
        retryable: true,
        error: HboneError::H2(e),
    };
    let mut send = conn.send.clone().ready().await.map_err(before_send)?;
    let (response, send_stream) = send.send_request(req, false).map_err(before_send)?;
    let response = response.await.map_err(|e| {
        let conn_broken = e.is_go_away() || e.is_io();
        // REFUSED_STREAM and streams above a GOAWAY's last id were never processed
        // (RFC 9113 8.7); an io error means the connection died under a request that had
        // no tunnel bytes yet.
        let retryable = conn_broken || e.reason() == Some(Reason::REFUSED_STREAM);
        OpenError {
            error: HboneError::H2(e),
            conn_broken,
            retryable,
        }
    })?;
    let status = response.status();
    if status != StatusCode::OK {
        return Err(OpenError {
            error: HboneError::Status(status),
            conn_broken: false,
            retryable: false,
        });
    }
    Ok(H2Stream::new(send_stream, response.into_body(), Some(slot)))
}

fn clone_request(req: &Request<()>) -> Request<()> {
    let mut r = Request::new(());
    *r.method_mut() = req.method().clone();
    *r.uri_mut() = req.uri().clone();
    *r.version_mut() = req.version();
    *r.headers_mut() = req.headers().clone();
    r
}

/// The caller's config with ALPN `h2` if it lacks it (HBONE requires it; a config built
/// for HBONE already has it, and then nothing is copied).
fn with_h2_alpn(tls: &Arc<rustls::ClientConfig>) -> Arc<rustls::ClientConfig> {
    if tls.alpn_protocols.iter().any(|p| p == ALPN_H2) {
        return tls.clone();
    }
    let mut cfg = (**tls).clone();
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Arc::new(cfg)
}

/// How long a connection without streams stays open.
#[derive(Clone, Copy)]
struct IdleTimeouts {
    /// As the only open connection to its key.
    alone: Duration,
    /// While its key has another open connection (never longer than `alone`).
    spare: Duration,
}

/// What an idle connection's expiry check found.
enum Expiry {
    Expired,
    /// It carries streams again.
    Busy,
    /// Idle, but not for long enough: look again then.
    NotBefore(Instant),
}

/// Runs one client connection until it fails, the peer closes it, or it has been idle for
/// its timeout (see [`IdleTimeouts`]); then takes it out of the pool.
async fn drive(
    conn: h2::client::Connection<TlsStream<TcpStream>, Bytes>,
    state: Arc<ConnState>,
    pool: Weak<PoolInner>,
    key: PoolKey,
    timeouts: IdleTimeouts,
    mut liveness: Liveness,
) {
    tokio::pin!(conn);
    // Set when the last check found it idle but the only connection to its key.
    let mut not_before = None;
    let expired = loop {
        let deadline = state
            .idle_deadline(timeouts.spare)
            .map(|d| not_before.map_or(d, |n: Instant| n.max(d)));
        tokio::select! {
            res = &mut conn => {
                match res {
                    Ok(()) => tracing::debug!("hbone connection closed"),
                    Err(e) => tracing::debug!(error = %e, "hbone connection failed"),
                }
                break false;
            }
            () = state.idle.notified() => not_before = None,
            res = liveness.check() => {
                if let Err(e) = res {
                    // Dropping the connection below fails its streams at once.
                    tracing::info!(error = %e, dst = %key.dst_addr, "hbone connection dead; dropping it");
                    break false;
                }
            }
            () = sleep_until_opt(deadline) => {
                let Some(pool) = pool.upgrade() else { break true };
                match pool.expire_if_idle(&key, &state, timeouts) {
                    Expiry::Expired => break true,
                    Expiry::Busy => not_before = None,
                    Expiry::NotBefore(t) => not_before = Some(t),
                }
            }
        }
    };
    state.closed.store(true, Ordering::Release);
    if let Some(pool) = pool.upgrade() {
        pool.remove(&key, state.id);
    }
    state.capacity.notify_waiters();
    if expired {
        tracing::debug!("hbone connection idle; closing");
        // The pool's request handle is gone, so h2 sends GOAWAY and finishes by itself.
        let _ = tokio::time::timeout(CLOSE_GRACE, conn).await;
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

// === impl PoolInner ===

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, HashMap<PoolKey, Entry>> {
        // The map stays consistent under every panic point (single inserts and removals),
        // so a poisoned lock is still usable.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Decides, under the lock, whether to reuse, wait for a dial, or dial.
    fn step(self: &Arc<Self>, key: &PoolKey) -> Step {
        let mut entries = self.lock();
        let entry = entries.entry(key.clone()).or_default();
        entry
            .conns
            .retain(|c| !c.state.closed.load(Ordering::Acquire));
        for conn in &entry.conns {
            if let Some(slot) = conn.try_reserve(self.cfg.max_streams_per_conn) {
                return Step::Reuse(conn.clone(), slot);
            }
        }
        if let Some(rx) = &entry.dialing {
            return Step::Wait(rx.clone());
        }
        let short = entry
            .conns
            .iter()
            .filter(|c| c.is_short(self.cfg.max_streams_per_conn))
            .count();
        if short >= self.cfg.max_conns_per_key.max(1) {
            return Step::Full;
        }
        let (tx, rx) = watch::channel(None);
        entry.dialing = Some(rx);
        Step::Dial(Box::new(DialGuard {
            pool: self.clone(),
            key: key.clone(),
            tx,
            finished: false,
        }))
    }

    /// Removes the connection if it still has no streams and has been idle long enough: the
    /// spare timeout while its key has another open connection, else the full one. Under the
    /// pool lock, so no caller can be reserving a stream on it meanwhile, and of several idle
    /// connections to one key exactly one stays.
    fn expire_if_idle(&self, key: &PoolKey, state: &ConnState, timeouts: IdleTimeouts) -> Expiry {
        let mut entries = self.lock();
        if state.active.load(Ordering::Acquire) != 0 {
            return Expiry::Busy;
        }
        let has_company = entries.get(key).is_some_and(|e| {
            e.conns
                .iter()
                .any(|c| c.state.id != state.id && !c.state.closed.load(Ordering::Acquire))
        });
        let timeout = if has_company {
            timeouts.spare
        } else {
            timeouts.alone
        };
        let at = state.last_activity() + timeout;
        if at > Instant::now() {
            return Expiry::NotBefore(at);
        }
        state.closed.store(true, Ordering::Release);
        Self::remove_locked(&mut entries, key, state.id);
        Expiry::Expired
    }

    fn remove(&self, key: &PoolKey, id: u64) {
        let mut entries = self.lock();
        Self::remove_locked(&mut entries, key, id);
    }

    fn remove_locked(entries: &mut HashMap<PoolKey, Entry>, key: &PoolKey, id: u64) {
        if let Some(entry) = entries.get_mut(key) {
            entry.conns.retain(|c| c.state.id != id);
            if entry.conns.is_empty() && entry.dialing.is_none() {
                entries.remove(key);
            }
        }
    }
}

// === impl DialGuard ===

impl DialGuard {
    fn succeed(mut self: Box<Self>, conn: Arc<PooledConn>) {
        {
            let mut entries = self.pool.lock();
            let entry = entries.entry(self.key.clone()).or_default();
            entry.conns.push(conn);
            entry.dialing = None;
        }
        self.finished = true;
        self.tx.send_replace(Some(Ok(())));
    }

    fn fail(mut self: Box<Self>, error: Arc<HboneError>) {
        self.clear();
        self.finished = true;
        self.tx.send_replace(Some(Err(error)));
    }

    fn clear(&self) {
        let mut entries = self.pool.lock();
        if let Some(entry) = entries.get_mut(&self.key) {
            entry.dialing = None;
            if entry.conns.is_empty() {
                entries.remove(&self.key);
            }
        }
    }
}

impl Drop for DialGuard {
    fn drop(&mut self) {
        // Cancelled mid-dial: unmark before `tx` drops, so woken waiters do not find the
        // stale mark and wait on it again.
        if !self.finished {
            self.clear();
        }
    }
}

// === impl PooledConn / ConnState / StreamSlot ===

impl PooledConn {
    /// Whether the peer allows fewer streams on this connection than we would carry.
    fn is_short(&self, max_streams: u32) -> bool {
        let ours = usize::try_from(max_streams).unwrap_or(usize::MAX);
        self.send.current_max_send_streams() < ours
    }

    /// A stream slot if the connection is open and below both our cap and the peer's.
    /// Called under the pool lock.
    fn try_reserve(&self, max_streams: u32) -> Option<StreamSlot> {
        if self.state.closed.load(Ordering::Acquire) {
            return None;
        }
        let ours = usize::try_from(max_streams).unwrap_or(usize::MAX);
        let cap = ours.min(self.send.current_max_send_streams());
        if self.state.active.load(Ordering::Acquire) >= cap {
            return None;
        }
        Some(self.state.reserve())
    }
}

impl ConnState {
    fn new(id: u64, capacity: Arc<Notify>, window: Reservation) -> Self {
        ConnState {
            id,
            capacity,
            _window: window,
            active: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            last_activity: Mutex::new(Instant::now()),
            idle: Notify::new(),
        }
    }

    fn reserve(self: &Arc<Self>) -> StreamSlot {
        self.touch();
        self.active.fetch_add(1, Ordering::AcqRel);
        StreamSlot {
            state: self.clone(),
        }
    }

    fn touch(&self) {
        *self
            .last_activity
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
    }

    fn last_activity(&self) -> Instant {
        *self
            .last_activity
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn idle_deadline(&self, idle_timeout: Duration) -> Option<Instant> {
        (self.active.load(Ordering::Acquire) == 0).then(|| self.last_activity() + idle_timeout)
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        // Touch first: an expiry check that sees zero streams also sees a fresh timestamp.
        self.state.touch();
        if self.state.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.state.idle.notify_one();
        }
        self.state.capacity.notify_waiters();
    }
}
