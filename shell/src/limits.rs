//! Bounds on what peers can make a process hold (RELIABILITY 7, 37, 38): open connections,
//! TLS handshakes in progress, time to the first byte, idle time, TCP keepalive; and a
//! budget for the log lines refusals write, so that a flood cannot fill the disk.
//!
//! A connection over a cap is closed at once (never queued), counted in
//! `mesh_refusals_total{reason="OM"}` and logged within [`LogBudget`]. Defaults are sized
//! for a 2-core node: each one below states why.

use std::sync::{Arc, Mutex};
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
/// A plaintext client that must speak first (SOCKS5 in loopback mode, protocol detection)
/// has this long to send its first byte.
pub const DEFAULT_FIRST_BYTE_TIMEOUT: &str = "10s";
/// An inbound HBONE connection without a stream is closed after this (GOAWAY).
pub const DEFAULT_HBONE_IDLE_TIMEOUT: &str = "2m";
pub const DEFAULT_TCP_KEEPALIVE_IDLE: &str = "60s";
pub const DEFAULT_TCP_KEEPALIVE_INTERVAL: &str = "10s";
pub const DEFAULT_TCP_KEEPALIVE_PROBES: &str = "6";
pub const DEFAULT_TCP_USER_TIMEOUT: &str = "2m";

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

    /// The server settings of inbound HBONE connections.
    pub fn hbone_server(&self) -> mesh_hbone::ServerConfig {
        mesh_hbone::ServerConfig {
            idle_timeout: self.hbone_idle_timeout,
            ..mesh_hbone::ServerConfig::default()
        }
    }
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
    tokens: f64,
    last: Option<Instant>,
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
                tokens: burst as f64,
                last: None,
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
        if let Some(last) = b.last {
            let refill = now.saturating_duration_since(last).as_secs_f64() * self.per_second as f64;
            b.tokens = (b.tokens + refill).min(self.burst as f64);
        }
        b.last = Some(now);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
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
        assert_eq!(p.l.first_byte_timeout, Duration::from_secs(10));
        assert_eq!(p.l.hbone_idle_timeout, Duration::from_secs(120));
        assert_eq!(p.l.keepalive(), mesh_hbone::tcp::Keepalive::default());
        assert!(<P as clap::Parser>::try_parse_from(["p", "--max-connections", "0"]).is_err());
    }
}
