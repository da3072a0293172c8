//! Bounds on what peers can make a process hold (RELIABILITY 7, 29-32, 37, 38): open
//! connections, TLS handshakes in progress, time to the first byte, idle time, TCP
//! keepalive, the HTTP/2 limits of HBONE (windows and the process's receive-buffer budget,
//! streams per connection, control-frame rates, PING liveness, pool connections per peer,
//! send stalls); and a budget for the log lines refusals write, so that a flood cannot fill
//! the disk.
//!
//! A connection over a cap is closed at once (never queued), counted in
//! `mesh_refusals_total{reason="OM"}` and logged within [`LogBudget`]. Defaults are sized
//! for a 2-core node: each one below states why.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use mesh_model::duration::parse_duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use mesh_hbone::tcp::Keepalive;

/// Open connections per process, every data-path listener together. A 2-core node
/// relays a few thousand busy connections; idle ones cost a few KiB each plus kernel
/// buffers, so 16 Ki stay within tens of MiB of userspace state (see ARCHITECTURE.md for
/// the worst case with full HTTP/2 windows).
pub const DEFAULT_MAX_CONNECTIONS: usize = 16 * 1024;
/// TLS handshakes in progress per process. One handshake costs ~1 ms of CPU on one core;
/// 128 in flight is ~60 ms of work for two cores, far more than honest clients reach, and
/// caps the memory of a slowloris handshake flood at 128 handshake states.
pub const DEFAULT_MAX_TLS_HANDSHAKES: usize = 128;
/// TLS handshakes in progress from one source address: a quarter of the process's, so one
/// peer holding its handshakes open (slowloris) leaves the rest to everyone else. Honest
/// sources rarely have more than a few in flight: the client pool shares one dial per peer
/// and a handshake takes about a millisecond.
pub const DEFAULT_MAX_TLS_HANDSHAKES_PER_SOURCE: usize = 32;
/// TLS handshakes one source address may start per second (bursts of twice as many). A
/// pooled client needs one per peer it talks to (and keeps it); 100/s from one address
/// costs the server about a tenth of a core, and more is refused before any cryptography.
pub const DEFAULT_TLS_HANDSHAKES_PER_SOURCE_PER_SEC: u32 = 100;
/// Sources whose handshake state is remembered; beyond this, idle entries are forgotten
/// first and a source that cannot be tracked is held by the process-wide cap only.
const MAX_TRACKED_SOURCES: usize = 65_536;
/// A plaintext client that must speak first (SOCKS5 in loopback mode, protocol detection)
/// has this long to send its first byte.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: &str = "10s";
/// An inbound HBONE connection without a stream is closed after this (GOAWAY).
pub const DEFAULT_HBONE_IDLE_TIMEOUT: &str = "2m";
pub const DEFAULT_TCP_KEEPALIVE_IDLE: &str = "60s";
pub const DEFAULT_TCP_KEEPALIVE_INTERVAL: &str = "10s";
pub const DEFAULT_TCP_KEEPALIVE_PROBES: &str = "6";
pub const DEFAULT_TCP_USER_TIMEOUT: &str = "2m";
/// Receive-window bytes all HTTP/2 connections of the process may promise their peers
/// (`mesh_hbone::ReceiveBudget`): 1 GiB, see `mesh_hbone::DEFAULT_RECEIVE_BUFFER_BUDGET`.
pub const DEFAULT_RECEIVE_BUFFER_BUDGET: &str = "1GiB";
/// HBONE receive windows asked for (`mesh_hbone::STREAM_WINDOW`, `CONNECTION_WINDOW`).
pub const DEFAULT_HBONE_STREAM_WINDOW: &str = "4MiB";
pub const DEFAULT_HBONE_CONNECTION_WINDOW: &str = "16MiB";
/// PING liveness of HBONE connections, both sides (`0s`: no PINGs).
pub const DEFAULT_HBONE_PING_INTERVAL: &str = "30s";
pub const DEFAULT_HBONE_PING_TIMEOUT: &str = "10s";
/// A tunnel whose peer keeps its window shut this long is reset (`0s`: never).
pub const DEFAULT_HBONE_SEND_STALL_TIMEOUT: &str = "5m";

/// Refusal log lines: a burst of this many, then this many per second.
pub const LOG_BURST: u32 = 20;
pub const LOG_PER_SECOND: u32 = 5;

/// The limit flags every binary has (flattened into [`crate::config::ProcessArgs`]).
#[derive(clap::Args, Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LimitArgs {
    /// Open connections per process over all data-path listeners; more are closed at once
    /// (counted with flag OM).
    #[arg(long, default_value_t = DEFAULT_MAX_CONNECTIONS, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections: usize,
    /// TLS handshakes in progress per process; more connections are closed at once (OM).
    #[arg(long, default_value_t = DEFAULT_MAX_TLS_HANDSHAKES, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_tls_handshakes: usize,
    /// TLS handshakes in progress from one source address; more are closed at once (OM).
    #[arg(long, default_value_t = DEFAULT_MAX_TLS_HANDSHAKES_PER_SOURCE, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_tls_handshakes_per_source: usize,
    /// TLS handshakes one source address may start per second (bursts of twice as many);
    /// more are closed at once (OM), before any cryptography.
    #[arg(long, default_value_t = DEFAULT_TLS_HANDSHAKES_PER_SOURCE_PER_SEC, value_parser = clap::value_parser!(u32).range(1..))]
    pub tls_handshakes_per_source_per_sec: u32,
    /// Time a plaintext client that must speak first has for its first byte.
    #[arg(long, default_value = DEFAULT_FIRST_BYTE_TIMEOUT, value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub first_byte_timeout: Duration,
    /// An inbound HBONE connection without streams for this long is closed (GOAWAY).
    #[arg(long, default_value = DEFAULT_HBONE_IDLE_TIMEOUT, value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub hbone_idle_timeout: Duration,
    /// TCP keepalive on every mesh socket: idle time before the first probe.
    #[arg(long, default_value = DEFAULT_TCP_KEEPALIVE_IDLE, value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub tcp_keepalive_idle: Duration,
    /// Time between keepalive probes.
    #[arg(long, default_value = DEFAULT_TCP_KEEPALIVE_INTERVAL, value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub tcp_keepalive_interval: Duration,
    /// Unanswered keepalive probes before the connection is dropped.
    #[arg(long, default_value = DEFAULT_TCP_KEEPALIVE_PROBES)]
    pub tcp_keepalive_probes: u32,
    /// `TCP_USER_TIMEOUT`: data unacknowledged this long drops the connection.
    #[arg(long, default_value = DEFAULT_TCP_USER_TIMEOUT, value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub tcp_user_timeout: Duration,
    /// Receive-window bytes all HTTP/2 connections of the process (HBONE in and out, the
    /// waypoint's HTTP/2) may promise their peers. A connection gets its full window while
    /// a quarter of this lasts, then 64 KiB; when not even that fits it is refused (OM).
    /// Bytes, or with a unit: KiB, MiB, GiB.
    #[arg(long, default_value = DEFAULT_RECEIVE_BUFFER_BUDGET, value_parser = parse_bytes)]
    pub receive_buffer_budget: u64,
    /// HTTP/2 receive window per HBONE stream (64 KiB to 1 GiB; never above the
    /// connection's).
    #[arg(long, default_value = DEFAULT_HBONE_STREAM_WINDOW, value_parser = parse_window)]
    pub hbone_stream_window: u32,
    /// HTTP/2 receive window per HBONE connection asked from the budget (64 KiB to 1 GiB).
    #[arg(long, default_value = DEFAULT_HBONE_CONNECTION_WINDOW, value_parser = parse_window)]
    pub hbone_connection_window: u32,
    /// Concurrent streams a peer may open on one inbound HBONE connection; more get
    /// REFUSED_STREAM.
    #[arg(long, default_value_t = mesh_hbone::DEFAULT_MAX_CONCURRENT_STREAMS, value_parser = clap::value_parser!(u32).range(1..))]
    pub hbone_max_concurrent_streams: u32,
    /// PING, SETTINGS, PRIORITY, RST_STREAM or empty DATA frames (each kind alone) a peer
    /// may send per second on an inbound HBONE connection before it is cut; WINDOW_UPDATE
    /// twice this.
    #[arg(long, default_value_t = mesh_hbone::DEFAULT_MAX_CONTROL_FRAMES_PER_SEC, value_parser = clap::value_parser!(u32).range(1..))]
    pub hbone_max_control_frames_per_sec: u32,
    /// A PING goes out on every HBONE connection (in and out) this often; `0s`: never.
    #[arg(long, default_value = DEFAULT_HBONE_PING_INTERVAL, value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub hbone_ping_interval: Duration,
    /// A peer that does not answer a PING within this is dead; its connection is closed.
    #[arg(long, default_value = DEFAULT_HBONE_PING_TIMEOUT, value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub hbone_ping_timeout: Duration,
    /// HBONE connections the client pool opens to one peer (per source and destination)
    /// that allows fewer streams per connection than we would carry (a peer advertising
    /// `MAX_CONCURRENT_STREAMS 0`); callers beyond wait for a stream, then fail. Connections
    /// to peers that take their full share are opened as demand needs them.
    #[arg(long, default_value_t = mesh_hbone::DEFAULT_MAX_CONNS_PER_KEY, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub hbone_pool_max_conns_per_peer: usize,
    /// A tunnel whose peer keeps its HTTP/2 window shut this long while we have bytes for it
    /// is reset (both sides); `0s`: never.
    #[arg(long, default_value = DEFAULT_HBONE_SEND_STALL_TIMEOUT, value_parser = parse_duration)]
    #[serde(with = "secs")]
    pub hbone_send_stall_timeout: Duration,
}

impl LimitArgs {
    pub fn keepalive(&self) -> Keepalive {
        Keepalive {
            idle: self.tcp_keepalive_idle,
            interval: self.tcp_keepalive_interval,
            probes: self.tcp_keepalive_probes,
            user_timeout: self.tcp_user_timeout,
        }
    }

    /// The cap on TLS handshakes of every TLS listener of the process.
    pub fn handshake_cap(&self) -> HandshakeCap {
        HandshakeCap::new(
            self.max_tls_handshakes,
            self.max_tls_handshakes_per_source,
            self.tls_handshakes_per_source_per_sec,
        )
    }

    /// The server settings of inbound HBONE connections.
    pub fn hbone_server(&self) -> mesh_hbone::ServerConfig {
        mesh_hbone::ServerConfig {
            idle_timeout: self.hbone_idle_timeout,
            max_concurrent_streams: self.hbone_max_concurrent_streams,
            max_control_frames_per_sec: self.hbone_max_control_frames_per_sec,
            ping_interval: nonzero(self.hbone_ping_interval),
            ping_timeout: self.hbone_ping_timeout,
            send_stall_timeout: nonzero(self.hbone_send_stall_timeout),
            stream_window: self.hbone_stream_window,
            connection_window: self.hbone_connection_window,
            receive_budget: self.receive_budget(),
            ..mesh_hbone::ServerConfig::default()
        }
    }

    /// The client pool's settings (the caller sets its connect timeout).
    pub fn hbone_pool(&self) -> mesh_hbone::PoolConfig {
        mesh_hbone::PoolConfig {
            ping_interval: nonzero(self.hbone_ping_interval),
            ping_timeout: self.hbone_ping_timeout,
            max_conns_per_key: self.hbone_pool_max_conns_per_peer,
            send_stall_timeout: nonzero(self.hbone_send_stall_timeout),
            stream_window: self.hbone_stream_window,
            connection_window: self.hbone_connection_window,
            receive_budget: self.receive_budget(),
            ..mesh_hbone::PoolConfig::default()
        }
    }

    /// The process's one receive-buffer budget, made from `--receive-buffer-budget` on first
    /// use (a process parses its flags once).
    pub fn receive_budget(&self) -> mesh_hbone::ReceiveBudget {
        static BUDGET: OnceLock<mesh_hbone::ReceiveBudget> = OnceLock::new();
        BUDGET
            .get_or_init(|| mesh_hbone::ReceiveBudget::new(self.receive_buffer_budget))
            .clone()
    }
}

/// `0s` turns a timer off.
fn nonzero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

/// A byte count: a whole number, optionally with a unit (`B`, `KiB`, `MiB`, `GiB`).
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?}: expected a whole number, then B, KiB, MiB or GiB"))?;
    let scale = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "size {s:?}: unknown unit {other:?} (B, KiB, MiB, GiB)"
            ))
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("size {s:?}: too large"))
}

/// An HTTP/2 window: [`parse_bytes`] within 64 KiB - 1 (HTTP/2's initial window) and 1 GiB.
fn parse_window(s: &str) -> Result<u32, String> {
    let n = parse_bytes(s)?;
    let range = u64::from(mesh_hbone::MIN_WINDOW)..=1 << 30;
    if !range.contains(&n) {
        return Err(format!("window {s:?}: must be within 65535 B and 1 GiB"));
    }
    u32::try_from(n).map_err(|_| format!("window {s:?}: too large"))
}

/// The budget every refusal log line of the process draws from.
pub static REFUSAL_LOG: LogBudget = LogBudget::new(LOG_BURST, LOG_PER_SECOND);

/// Closes nothing itself: counts a connection refused because `limit` (of `max`) was
/// reached (`mesh_refusals_total{reason="OM"}`, always) and logs it within [`REFUSAL_LOG`].
/// The caller drops the connection.
pub fn refused_over_limit(
    metrics: &mesh_telemetry::Metrics,
    reporter: &str,
    listener: &str,
    peer: std::net::SocketAddr,
    limit: &'static str,
    max: usize,
) {
    let flag = mesh_telemetry::ResponseFlag::Overload;
    metrics.refused(reporter, flag.as_str());
    if let Some(suppressed) = REFUSAL_LOG.allow() {
        tracing::warn!(
            target: "access",
            listener,
            src.addr = %peer,
            flags = flag.as_str(),
            reason = limit,
            max,
            suppressed,
            "connection refused: limit reached"
        );
    }
}

/// Counts how an inbound HBONE connection from `peer` ended: cut for crossing an HTTP/2
/// limit, under its reason (`H2_PING_FLOOD`, access log line); refused because the
/// receive-buffer budget had no room for its window, as `OM` (within [`REFUSAL_LOG`]).
pub fn hbone_conn_ended(
    metrics: &mesh_telemetry::Metrics,
    reporter: &str,
    listener: &str,
    peer: std::net::SocketAddr,
    cfg: &mesh_hbone::ServerConfig,
    result: Result<(), mesh_hbone::HboneError>,
) {
    match result {
        Err(mesh_hbone::HboneError::OverBudget) => {
            let budget = usize::try_from(cfg.receive_budget.limit()).unwrap_or(usize::MAX);
            refused_over_limit(
                metrics,
                reporter,
                listener,
                peer,
                "receive_buffer_budget",
                budget,
            );
        }
        Err(e) => {
            if let Some(reason) = e.log_inbound_end(peer) {
                metrics.refused(reporter, &reason);
            }
        }
        Ok(()) => {}
    }
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

/// A cap on things held at once (connections, handshakes): [`Cap::try_enter`] never waits.
#[derive(Debug, Clone)]
pub struct Cap {
    /// The flag that sets it (`max_connections`...), for the refusal's log line.
    name: &'static str,
    sem: Arc<Semaphore>,
    max: usize,
}

/// One slot of a [`Cap`], given back on drop.
#[derive(Debug)]
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

impl Cap {
    /// `name` is the flag that sets `max` (named in refusals).
    pub fn new(name: &'static str, max: usize) -> Self {
        let max = max.clamp(1, Semaphore::MAX_PERMITS);
        Cap {
            name,
            sem: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// A slot, or `None` when all are taken (the caller refuses; nothing waits).
    pub fn try_enter(&self) -> Option<Slot> {
        self.sem.clone().try_acquire_owned().ok().map(Slot)
    }

    /// [`Cap::try_enter`] for a connection from `peer` on `listener`; when full, counts and
    /// logs the refusal ([`refused_over_limit`]) and the caller drops the connection.
    pub fn admit(
        &self,
        metrics: &mesh_telemetry::Metrics,
        reporter: &str,
        listener: &str,
        peer: std::net::SocketAddr,
    ) -> Option<Slot> {
        let slot = self.try_enter();
        if slot.is_none() {
            refused_over_limit(metrics, reporter, listener, peer, self.name, self.max);
        }
        slot
    }

    pub fn max(&self) -> usize {
        self.max
    }

    /// Slots taken now.
    pub fn held(&self) -> usize {
        self.max - self.sem.available_permits()
    }
}

/// TLS handshakes in progress, per process ([`Cap`]) and per source address, and the rate
/// at which one source may start them. [`HandshakeCap::admit`] never waits: a connection
/// over any of the three is closed at once, before a byte of TLS is read.
#[derive(Debug, Clone)]
pub struct HandshakeCap {
    all: Cap,
    per_source: usize,
    per_sec: f64,
    sources: Sources,
}

/// Every tracked source address, shared by the cap and its slots.
type Sources = Arc<Mutex<HashMap<IpAddr, Source>>>;

/// What one source address holds: handshakes in progress and a token bucket of new ones.
#[derive(Debug)]
struct Source {
    in_progress: usize,
    bucket: Tokens,
}

/// A token bucket's state: tokens refill at `per_sec` up to `burst` (the caller's rate and
/// burst, the same at every call), from a full bucket.
#[derive(Debug, Clone, Copy)]
struct Tokens {
    tokens: f64,
    /// When they were last refilled; `None` before the first use.
    last: Option<Instant>,
}

impl Tokens {
    const fn full(burst: f64) -> Self {
        Tokens {
            tokens: burst,
            last: None,
        }
    }

    /// The tokens there are at `now`, without taking any.
    fn at(&self, now: Instant, per_sec: f64, burst: f64) -> f64 {
        let refill = self.last.map_or(0.0, |last| {
            now.saturating_duration_since(last).as_secs_f64() * per_sec
        });
        (self.tokens + refill).min(burst)
    }

    /// Brings the bucket to `now`.
    fn refill(&mut self, now: Instant, per_sec: f64, burst: f64) {
        self.tokens = self.at(now, per_sec, burst);
        self.last = Some(now);
    }
}

/// One handshake in progress, given back on drop.
#[derive(Debug)]
pub struct HandshakeSlot {
    _all: Slot,
    source: Option<(IpAddr, Sources)>,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        if let Some((ip, sources)) = self.source.take() {
            let mut map = sources.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = map.get_mut(&ip) {
                s.in_progress = s.in_progress.saturating_sub(1);
            }
        }
    }
}

impl HandshakeCap {
    pub fn new(max: usize, per_source: usize, per_sec: u32) -> Self {
        HandshakeCap {
            all: Cap::new("max_tls_handshakes", max),
            per_source: per_source.max(1),
            per_sec: f64::from(per_sec.max(1)),
            sources: Arc::default(),
        }
    }

    /// A handshake slot for a connection from `peer`, or `None` (counted and logged as
    /// [`refused_over_limit`]; the caller drops the connection).
    pub fn admit(
        &self,
        metrics: &mesh_telemetry::Metrics,
        reporter: &str,
        listener: &str,
        peer: std::net::SocketAddr,
    ) -> Option<HandshakeSlot> {
        match self.try_enter_at(peer.ip(), Instant::now()) {
            Ok(slot) => Some(slot),
            Err((limit, max)) => {
                refused_over_limit(metrics, reporter, listener, peer, limit, max);
                None
            }
        }
    }

    /// The slot, or the limit that refused it (flag name and value).
    fn try_enter_at(
        &self,
        ip: IpAddr,
        now: Instant,
    ) -> Result<HandshakeSlot, (&'static str, usize)> {
        let mut map = self.sources.lock().unwrap_or_else(|e| e.into_inner());
        let burst = 2.0 * self.per_sec;
        if map.len() >= MAX_TRACKED_SOURCES && !map.contains_key(&ip) {
            let per_sec = self.per_sec;
            // Forget the sources that hold nothing and would have a full bucket by now.
            map.retain(|_, s| s.in_progress > 0 || s.bucket.at(now, per_sec, burst) < burst);
        }
        let tracked = map.len() < MAX_TRACKED_SOURCES || map.contains_key(&ip);
        if tracked {
            let s = map.entry(ip).or_insert(Source {
                in_progress: 0,
                bucket: Tokens::full(burst),
            });
            s.bucket.refill(now, self.per_sec, burst);
            if s.in_progress >= self.per_source {
                return Err(("max_tls_handshakes_per_source", self.per_source));
            }
            if s.bucket.tokens < 1.0 {
                // The flag's value per second, as the operator set it.
                return Err(("tls_handshakes_per_source_per_sec", self.per_sec as usize));
            }
        }
        let all = self.all.try_enter().ok_or((self.all.name, self.all.max))?;
        let source = if tracked {
            if let Some(s) = map.get_mut(&ip) {
                s.bucket.tokens -= 1.0;
                s.in_progress += 1;
            }
            Some((ip, self.sources.clone()))
        } else {
            None
        };
        Ok(HandshakeSlot { _all: all, source })
    }

    /// Handshakes in progress now, all sources together.
    pub fn held(&self) -> usize {
        self.all.held()
    }
}

/// A token bucket for log lines: [`LogBudget::allow`] says whether a line may be written
/// now, and how many were suppressed since the last one written (to put in that line).
#[derive(Debug)]
pub struct LogBudget {
    burst: u32,
    per_second: u32,
    state: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: Tokens,
    suppressed: u64,
}

impl Default for LogBudget {
    fn default() -> Self {
        LogBudget::new(LOG_BURST, LOG_PER_SECOND)
    }
}

impl LogBudget {
    pub const fn new(burst: u32, per_second: u32) -> Self {
        LogBudget {
            burst,
            per_second,
            state: Mutex::new(Bucket {
                tokens: Tokens::full(burst as f64),
                suppressed: 0,
            }),
        }
    }

    /// `Some(suppressed)` when a line may be written now, `None` to drop it.
    pub fn allow(&self) -> Option<u64> {
        self.allow_at(Instant::now())
    }

    fn allow_at(&self, now: Instant) -> Option<u64> {
        let mut b = self.state.lock().unwrap_or_else(|e| e.into_inner());
        b.tokens
            .refill(now, f64::from(self.per_second), f64::from(self.burst));
        if b.tokens.tokens >= 1.0 {
            b.tokens.tokens -= 1.0;
            Some(std::mem::take(&mut b.suppressed))
        } else {
            b.suppressed += 1;
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_cap_refuses_at_once_and_a_freed_slot_is_taken_again() {
        let cap = Cap::new("test", 3);
        let slots: Vec<_> = (0..3).map(|_| cap.try_enter().expect("free")).collect();
        assert_eq!(cap.held(), 3);
        assert!(cap.try_enter().is_none());
        drop(slots);
        assert_eq!(cap.held(), 0);
        assert!(cap.try_enter().is_some());
        assert_eq!(Cap::new("test", 0).max(), 1);
    }

    #[test]
    fn one_source_gets_its_share_of_handshakes_and_others_keep_theirs() {
        let cap = HandshakeCap::new(10, 4, 1000);
        let (a, b): (IpAddr, IpAddr) = ([10, 0, 0, 1].into(), [10, 0, 0, 2].into());
        let t0 = Instant::now();
        let held: Vec<_> = (0..4)
            .map(|_| cap.try_enter_at(a, t0).expect("within a's share"))
            .collect();
        assert_eq!(
            cap.try_enter_at(a, t0).err(),
            Some(("max_tls_handshakes_per_source", 4))
        );
        // Another source is not held back by a's.
        let others: Vec<_> = (0..4)
            .map(|_| cap.try_enter_at(b, t0).expect("b has its own share"))
            .collect();
        assert_eq!(cap.held(), 8);
        drop(held);
        assert_eq!(cap.held(), 4);
        assert!(cap.try_enter_at(a, t0).is_ok());
        drop(others);
        assert_eq!(cap.held(), 0);
        // The process-wide cap holds over every source.
        let many: Vec<_> = (1..=10u8)
            .map(|i| cap.try_enter_at([10, 1, 0, i].into(), t0).expect("free"))
            .collect();
        assert_eq!(
            cap.try_enter_at([10, 2, 0, 1].into(), t0).err(),
            Some(("max_tls_handshakes", 10))
        );
        drop(many);
    }

    #[test]
    fn one_source_starts_a_burst_then_the_rate() {
        let cap = HandshakeCap::new(1000, 1000, 50);
        let ip: IpAddr = [10, 0, 0, 1].into();
        let t0 = Instant::now();
        // Each slot is given back at once: only the rate limits.
        let burst = (0..1000)
            .filter(|_| cap.try_enter_at(ip, t0).is_ok())
            .count();
        assert_eq!(burst, 100);
        assert_eq!(
            cap.try_enter_at(ip, t0).err(),
            Some(("tls_handshakes_per_source_per_sec", 50))
        );
        // Two seconds later: 100 more (50/s), and no more than that.
        let t2 = t0 + Duration::from_secs(2);
        let later = (0..1000)
            .filter(|_| cap.try_enter_at(ip, t2).is_ok())
            .count();
        assert_eq!(later, 100);
        // Another source still has its whole burst.
        assert!(cap.try_enter_at([10, 0, 0, 2].into(), t2).is_ok());
    }

    #[test]
    fn the_log_budget_allows_a_burst_then_the_rate_and_counts_what_it_dropped() {
        let budget = LogBudget::new(4, 2);
        let t0 = Instant::now();
        let first: Vec<_> = (0..10).map(|_| budget.allow_at(t0)).collect();
        assert_eq!(first.iter().filter(|a| a.is_some()).count(), 4);
        assert_eq!(first[0], Some(0));
        // One second later: two more lines, the first carrying the six dropped.
        let t1 = t0 + Duration::from_secs(1);
        let next: Vec<_> = (0..5).map(|_| budget.allow_at(t1)).collect();
        assert_eq!(next, vec![Some(6), Some(0), None, None, None]);
        // A flood of 100k lines over the next ten seconds, the bucket empty: 2/s × 10 s.
        let written = (0..100_000u32)
            .filter(|i| {
                let at = t1 + Duration::from_micros(u64::from(*i) * 100);
                budget.allow_at(at).is_some()
            })
            .count();
        assert!((19..=20).contains(&written), "{written}");
    }

    #[test]
    fn limits_have_their_documented_defaults() {
        #[derive(clap::Parser)]
        struct P {
            #[command(flatten)]
            l: LimitArgs,
        }
        let p = <P as clap::Parser>::try_parse_from(["p"]).expect("defaults parse");
        assert_eq!(p.l.max_connections, 16384);
        assert_eq!(p.l.max_tls_handshakes, 128);
        assert_eq!(p.l.max_tls_handshakes_per_source, 32);
        assert_eq!(p.l.tls_handshakes_per_source_per_sec, 100);
        assert_eq!(p.l.first_byte_timeout, Duration::from_secs(10));
        assert_eq!(p.l.hbone_idle_timeout, Duration::from_secs(120));
        assert_eq!(p.l.keepalive(), mesh_hbone::tcp::Keepalive::default());
        assert!(<P as clap::Parser>::try_parse_from(["p", "--max-connections", "0"]).is_err());
        // The HBONE limits: the library's defaults, unchanged.
        let (server, pool) = (p.l.hbone_server(), p.l.hbone_pool());
        let (ds, dp) = (
            mesh_hbone::ServerConfig::default(),
            mesh_hbone::PoolConfig::default(),
        );
        assert_eq!(
            p.l.receive_buffer_budget,
            mesh_hbone::DEFAULT_RECEIVE_BUFFER_BUDGET
        );
        assert_eq!(server.stream_window, mesh_hbone::STREAM_WINDOW);
        assert_eq!(server.connection_window, mesh_hbone::CONNECTION_WINDOW);
        assert_eq!(server.max_concurrent_streams, ds.max_concurrent_streams);
        assert_eq!(
            server.max_control_frames_per_sec,
            ds.max_control_frames_per_sec
        );
        assert_eq!(server.ping_interval, ds.ping_interval);
        assert_eq!(server.ping_timeout, ds.ping_timeout);
        assert_eq!(server.send_stall_timeout, ds.send_stall_timeout);
        assert_eq!(pool.ping_interval, dp.ping_interval);
        assert_eq!(pool.max_conns_per_key, dp.max_conns_per_key);
        assert_eq!(pool.send_stall_timeout, dp.send_stall_timeout);
        assert_eq!(pool.stream_window, dp.stream_window);
        let set = <P as clap::Parser>::try_parse_from([
            "p",
            "--hbone-ping-interval",
            "0s",
            "--hbone-send-stall-timeout",
            "0s",
            "--hbone-stream-window",
            "64KiB",
        ])
        .expect("parses");
        assert_eq!(set.l.hbone_server().ping_interval, None);
        assert_eq!(set.l.hbone_pool().send_stall_timeout, None);
        assert_eq!(set.l.hbone_stream_window, 65536);
        for bad in [
            ["--hbone-stream-window", "1KiB"],
            ["--receive-buffer-budget", "1TB"],
        ] {
            let args = ["p", bad[0], bad[1]];
            assert!(
                <P as clap::Parser>::try_parse_from(args).is_err(),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("64KiB"), Ok(65536));
        assert_eq!(parse_bytes("8MiB"), Ok(8 << 20));
        assert_eq!(parse_bytes("1GiB"), Ok(1 << 30));
        assert!(parse_bytes("1GB").is_err());
        assert!(parse_bytes("MiB").is_err());
        assert!(parse_bytes("99999999999999GiB").is_err());
    }
}
