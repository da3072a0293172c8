//! Load balancing, request limits and outlier detection per upstream *cluster* — one
//! (Service, port, subset), as Envoy names them `outbound|<port>|<subset>|<host>` — as a
//! `DestinationRule` asks for ([`mesh_model::model::EffectivePolicy`]).
//!
//! The request path calls two hooks per attempt:
//! 1. [`Cluster::choose`]: an endpoint for this attempt, skipping those already tried and
//!    those outlier detection ejected; `ROUND_ROBIN` (per cluster), `RANDOM`,
//!    `LEAST_REQUEST` (power of two random choices over requests in flight, as Envoy
//!    does), or `consistentHash` (rendezvous hashing: a key keeps its endpoint, and adding
//!    or removing an endpoint moves only the keys that endpoint wins or held; no key in
//!    the request falls back to round robin);
//! 2. [`Cluster::report`]: the attempt's [`Outcome`]. Connect failures and resets count as
//!    a 503, timeouts as a 504 (Envoy's default, non-split mode). `consecutive5xxErrors`
//!    5xx in a row, or `consecutiveGatewayErrors` 502/503/504 in a row, eject the endpoint
//!    at once for `baseEjectionTime × times ejected` (at most 300 s, Envoy's
//!    `max_ejection_time`); at most `maxEjectionPercent` of the endpoints are ejected at a
//!    time, but at least one may be. When fewer than `minHealthPercent` are healthy,
//!    ejections are ignored (Envoy's panic mode). Each ejection is logged and counted in
//!    `waypoint_outlier_ejections_total{cluster}`.
//!
//! Limits: [`Cluster::admit`] holds one of `http2MaxRequests` request slots for the whole
//! exchange (to the end of the response body); beyond that the request is answered `503`
//! with flag `UO`. [`Cluster::try_retry`] holds one of `maxRetries` retry slots (Envoy's
//! default 3 when unset) for a retry attempt. The per-endpoint connection limits
//! (`tcp.maxConnections`, `http1MaxPendingRequests`, `maxRequestsPerConnection`) are kept
//! by the connection pool ([`crate::upstream`]), from [`Cluster::conn_limits`].
//!
//! The state lives in [`Clusters`] (one per waypoint, in [`crate::upstream::Upstreams`]),
//! keyed by cluster and endpoint address, so it survives model updates. The decisions are
//! pure over that state, a clock (`now`) and a random source passed in, and table-tested.
//!
//! Only HTTP requests are balanced here; connections relayed at L4 (TCP ports) keep plain
//! round robin ([`crate::upstream::Upstreams::next_index`]). Requests to a pod addressed
//! directly form a cluster keyed by the pod, with the default policy.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap};
use mesh_model::model::{EffectivePolicy, Ejection, HashKey, LoadBalancer, NamespacedName};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rand::Rng;

use crate::upstream::Endpoint;

/// One upstream cluster.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClusterKey {
    pub service: NamespacedName,
    pub port: u16,
    pub subset: Option<String>,
}

impl ClusterKey {
    /// Envoy's name: `outbound|80|v1|web.shop.svc.cluster.local`.
    pub fn name(&self) -> String {
        format!(
            "outbound|{}|{}|{}.{}.svc.cluster.local",
            self.port,
            self.subset.as_deref().unwrap_or(""),
            self.service.name,
            self.service.namespace
        )
    }
}

/// What an attempt ended with, for outlier detection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers with this status.
    Status(u16),
    /// No connection could be opened.
    ConnectFailure,
    /// The upstream reset or closed before answering.
    Reset,
    /// No response headers in time.
    Timeout,
}

impl Outcome {
    /// The status Envoy counts a locally originated error as.
    fn status(self) -> u16 {
        match self {
            Outcome::Status(s) => s,
            Outcome::ConnectFailure | Outcome::Reset => 503,
            Outcome::Timeout => 504,
        }
    }
}

/// Why no endpoint was chosen.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NoEndpoint {
    #[error("no ready endpoint")]
    Empty,
    #[error("every endpoint has been tried")]
    AllTried,
    #[error("every remaining endpoint is ejected by outlier detection")]
    AllEjected,
}

/// `http2MaxRequests` reached.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{cluster}: {max} requests in flight (http2MaxRequests)")]
pub struct Overflow {
    pub cluster: String,
    pub max: u32,
}

/// The per-endpoint connection limits the pool keeps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnLimits {
    /// Which connection pool: each cluster has its own (0: the pool of requests outside
    /// any cluster).
    pub pool: u64,
    /// `tcp.maxConnections` per endpoint.
    pub max_connections: Option<u32>,
    /// `http1MaxPendingRequests`: requests waiting for an HTTP/1.1 connection.
    pub max_pending: Option<u32>,
    /// `maxRequestsPerConnection` (`None` or 0: unlimited).
    pub max_requests_per_connection: Option<u32>,
    /// `tcp.connectTimeout` (else the waypoint's `--connect-timeout`).
    pub connect_timeout: Option<Duration>,
    /// `http.idleTimeout` of idle HTTP/1.1 connections (else the waypoint's default).
    pub idle_timeout: Option<Duration>,
}

/// `cluster` label of `waypoint_outlier_ejections_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub cluster: String,
}

/// Clusters kept before idle ones are forgotten.
const MAX_CLUSTERS: usize = 4096;

/// Pool ids, from 1 (0 is [`ConnLimits::default`]'s).
static NEXT_POOL: AtomicU64 = AtomicU64::new(1);

/// Every cluster's state.
#[derive(Default)]
pub struct Clusters {
    map: Mutex<HashMap<ClusterKey, Arc<Cluster>>>,
    ejections: Family<ClusterLabels, Counter>,
}

impl Clusters {
    pub fn new(ejections: Family<ClusterLabels, Counter>) -> Clusters {
        Clusters {
            map: Mutex::default(),
            ejections,
        }
    }

    /// The cluster `key`, created on first use, with `policy` (the current model's) in force.
    pub fn cluster(&self, key: &ClusterKey, policy: &EffectivePolicy) -> Arc<Cluster> {
        let cluster = {
            let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() >= MAX_CLUSTERS && !map.contains_key(key) {
                // Bounded: forget the clusters no request is using now (their round-robin
                // position and ejections start afresh if they come back).
                map.retain(|_, c| Arc::strong_count(c) > 1);
            }
            map.entry(key.clone())
                .or_insert_with(|| {
                    Arc::new(Cluster {
                        name: key.name(),
                        pool: NEXT_POOL.fetch_add(1, Ordering::Relaxed),
                        state: Mutex::new(State::default()),
                        in_flight: Arc::new(AtomicU32::new(0)),
                        retries: Arc::new(AtomicU32::new(0)),
                        ejections: self
                            .ejections
                            .get_or_create(&ClusterLabels {
                                cluster: key.name(),
                            })
                            .clone(),
                    })
                })
                .clone()
        };
        cluster.configure(policy);
        cluster
    }
}

/// One cluster's balancer state.
pub struct Cluster {
    name: String,
    /// Unique per cluster: its connection pool ([`ConnLimits::pool`]).
    pool: u64,
    state: Mutex<State>,
    in_flight: Arc<AtomicU32>,
    retries: Arc<AtomicU32>,
    ejections: Counter,
}

#[derive(Default)]
struct State {
    policy: EffectivePolicy,
    round_robin: usize,
    endpoints: HashMap<SocketAddr, EndpointState>,
}

#[derive(Debug, Default)]
struct EndpointState {
    /// Requests in flight (for LEAST_REQUEST), shared with [`Active`] guards.
    active: Arc<AtomicU32>,
    consecutive_5xx: u32,
    consecutive_gateway: u32,
    ejected_until: Option<Instant>,
    times_ejected: u32,
    /// When the last ejection ended (for the decay of `times_ejected`).
    healthy_since: Option<Instant>,
}

impl EndpointState {
    fn ejected(&self, now: Instant) -> bool {
        self.ejected_until.is_some_and(|until| now < until)
    }
}

/// One endpoint picked for an attempt.
#[derive(Debug)]
pub struct Chosen {
    pub index: usize,
    /// Counts the attempt as in flight to the endpoint until dropped.
    pub active: Active,
}

/// An attempt in flight to an endpoint.
#[derive(Debug)]
pub struct Active(Arc<AtomicU32>);

impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A request slot of `http2MaxRequests`; released on drop.
#[derive(Debug)]
pub struct RequestGuard(Arc<AtomicU32>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A retry slot of `maxRetries`; released on drop.
#[derive(Debug)]
pub struct RetryGuard(Arc<AtomicU32>);

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An ejection [`Cluster::report`] made.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ejected {
    pub addr: SocketAddr,
    pub duration: Duration,
    pub times: u32,
    pub reason: &'static str,
}

/// Takes `slot` when it is below `max`.
fn take_slot(slot: &AtomicU32, max: u32) -> bool {
    slot.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
        (n < max).then_some(n + 1)
    })
    .is_ok()
}

// === impl Cluster ===

impl Cluster {
    fn state(&self) -> MutexGuard<'_, State> {
        // Updates are small and complete; a panic cannot leave the state inconsistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn configure(&self, policy: &EffectivePolicy) {
        let mut st = self.state();
        if st.policy != *policy {
            st.policy = policy.clone();
        }
    }

    pub fn policy(&self) -> EffectivePolicy {
        self.state().policy.clone()
    }

    pub fn conn_limits(&self) -> ConnLimits {
        let st = self.state();
        let cp = &st.policy.connection_pool;
        ConnLimits {
            pool: self.pool,
            max_connections: cp.max_connections,
            max_pending: cp.http1_max_pending_requests,
            max_requests_per_connection: cp.max_requests_per_connection.filter(|n| *n > 0),
            connect_timeout: cp.connect_timeout,
            idle_timeout: cp.idle_timeout,
        }
    }

    /// A request slot, or [`Overflow`] when `http2MaxRequests` are in flight.
    pub fn admit(&self) -> Result<RequestGuard, Overflow> {
        let max = self.state().policy.connection_pool.http2_max_requests;
        match max {
            None => {
                self.in_flight.fetch_add(1, Ordering::AcqRel);
            }
            Some(max) => {
                if !take_slot(&self.in_flight, max) {
                    return Err(Overflow {
                        cluster: self.name.clone(),
                        max,
                    });
                }
            }
        }
        Ok(RequestGuard(self.in_flight.clone()))
    }

    /// A retry slot, unless `maxRetries` retries are already outstanding (for the retry
    /// loop: a `None` means "do not retry", Envoy's `upstream_rq_retry_overflow`).
    pub fn try_retry(&self) -> Option<RetryGuard> {
        let max = self.state().policy.max_retries();
        take_slot(&self.retries, max).then(|| RetryGuard(self.retries.clone()))
    }

    /// The endpoint of `eps` for this attempt (see the module docs), skipping `tried`.
    /// `hash` is the request's consistent-hash key ([`hash_key`]), if the policy has one
    /// and the request carries it.
    pub fn choose(
        &self,
        eps: &[Endpoint],
        hash: Option<u64>,
        tried: &[SocketAddr],
        now: Instant,
        rng: &mut impl Rng,
    ) -> Result<Chosen, NoEndpoint> {
        let mut st = self.state();
        let index = st.choose(eps, hash, tried, now, rng)?;
        let active = st
            .endpoints
            .entry(eps[index].addr)
            .or_default()
            .active
            .clone();
        active.fetch_add(1, Ordering::Relaxed);
        Ok(Chosen {
            index,
            active: Active(active),
        })
    }

    /// Records an attempt's outcome at `addr`; `Some` when it ejected the endpoint (already
    /// logged and counted). `total` is the number of endpoints in the cluster now.
    pub fn report(
        &self,
        addr: SocketAddr,
        outcome: Outcome,
        total: usize,
        now: Instant,
    ) -> Option<Ejected> {
        let ejected = self.state().report(addr, outcome, total, now);
        if let Some(e) = &ejected {
            self.ejections.inc();
            tracing::warn!(
                cluster = %self.name,
                endpoint = %e.addr,
                reason = e.reason,
                times = e.times,
                ejected_for = ?e.duration,
                "outlier detection ejected an endpoint"
            );
        }
        ejected
    }

    /// Whether outlier detection has `addr` ejected at `now`.
    pub fn is_ejected(&self, addr: SocketAddr, now: Instant) -> bool {
        self.state()
            .endpoints
            .get(&addr)
            .is_some_and(|e| e.ejected(now))
    }
}

// === impl State ===

impl State {
    fn choose(
        &mut self,
        eps: &[Endpoint],
        hash: Option<u64>,
        tried: &[SocketAddr],
        now: Instant,
        rng: &mut impl Rng,
    ) -> Result<usize, NoEndpoint> {
        if eps.is_empty() {
            return Err(NoEndpoint::Empty);
        }
        self.prune(eps);
        let untried: Vec<usize> = (0..eps.len())
            .filter(|i| !tried.contains(&eps[*i].addr))
            .collect();
        if untried.is_empty() {
            return Err(NoEndpoint::AllTried);
        }
        let ejected = |i: &usize| {
            self.endpoints
                .get(&eps[*i].addr)
                .is_some_and(|e| e.ejected(now))
        };
        let panic = self.policy.outlier.as_ref().is_some_and(|o| {
            let healthy = eps.iter().enumerate().filter(|(i, _)| !ejected(i)).count();
            healthy * 100 < o.min_health_percent as usize * eps.len()
        });
        let candidates: Vec<usize> = if panic {
            untried
        } else {
            untried.into_iter().filter(|i| !ejected(i)).collect()
        };
        if candidates.is_empty() {
            return Err(NoEndpoint::AllEjected);
        }
        let pick = match (&self.policy.load_balancer, hash) {
            (LoadBalancer::ConsistentHash(_), Some(key)) => candidates
                .iter()
                .copied()
                .max_by_key(|i| rendezvous(key, eps[*i].addr))
                .unwrap_or(candidates[0]),
            (LoadBalancer::Random, _) => candidates[rng.random_range(0..candidates.len())],
            (LoadBalancer::LeastRequest, _) if candidates.len() > 1 => {
                let a = rng.random_range(0..candidates.len());
                let mut b = rng.random_range(0..candidates.len() - 1);
                if b >= a {
                    b += 1;
                }
                let load = |i: usize| {
                    self.endpoints
                        .get(&eps[candidates[i]].addr)
                        .map_or(0, |e| e.active.load(Ordering::Relaxed))
                };
                if load(b) < load(a) {
                    candidates[b]
                } else {
                    candidates[a]
                }
            }
            _ => {
                let n = self.round_robin;
                self.round_robin = self.round_robin.wrapping_add(1);
                candidates[n % candidates.len()]
            }
        };
        Ok(pick)
    }

    /// Forgets endpoints that left the cluster (unless attempts to them are in flight).
    fn prune(&mut self, eps: &[Endpoint]) {
        if self.endpoints.len() > eps.len() {
            self.endpoints.retain(|addr, e| {
                eps.iter().any(|ep| ep.addr == *addr) || e.active.load(Ordering::Relaxed) > 0
            });
        }
    }

    fn report(
        &mut self,
        addr: SocketAddr,
        outcome: Outcome,
        total: usize,
        now: Instant,
    ) -> Option<Ejected> {
        let outlier = self.policy.outlier.clone()?;
        let currently_ejected = self.endpoints.values().filter(|e| e.ejected(now)).count();
        let ep = self.endpoints.entry(addr).or_default();
        if let Some(until) = ep.ejected_until {
            if now >= until {
                // The ejection has ended: start counting afresh.
                ep.ejected_until = None;
                ep.healthy_since = Some(until);
                ep.consecutive_5xx = 0;
                ep.consecutive_gateway = 0;
            } else {
                // Still ejected (an attempt that started before): nothing more to learn.
                return None;
            }
        }
        let status = outcome.status();
        if status >= 500 {
            ep.consecutive_5xx += 1;
        } else {
            ep.consecutive_5xx = 0;
        }
        if matches!(status, 502..=504) {
            ep.consecutive_gateway += 1;
        } else {
            ep.consecutive_gateway = 0;
        }
        let reason = if outlier.consecutive_5xx > 0 && ep.consecutive_5xx >= outlier.consecutive_5xx
        {
            "consecutive_5xx"
        } else if outlier.consecutive_gateway > 0
            && ep.consecutive_gateway >= outlier.consecutive_gateway
        {
            "consecutive_gateway_errors"
        } else {
            return None;
        };
        if currently_ejected >= max_ejected(&outlier, total) {
            return None;
        }
        // `times_ejected` decays by one for every interval spent healthy (Envoy's interval
        // timer), then grows by this ejection.
        let decay = ep.healthy_since.map_or(0, |since| {
            let healthy = now.saturating_duration_since(since);
            (healthy.as_millis() / outlier.interval.as_millis().max(1)).min(u32::MAX as u128) as u32
        });
        ep.times_ejected = ep.times_ejected.saturating_sub(decay) + 1;
        let duration = ejection_time(&outlier, ep.times_ejected);
        ep.ejected_until = Some(now + duration);
        ep.healthy_since = None;
        ep.consecutive_5xx = 0;
        ep.consecutive_gateway = 0;
        Some(Ejected {
            addr,
            duration,
            times: ep.times_ejected,
            reason,
        })
    }
}

/// How many of `total` endpoints may be ejected at once: `maxEjectionPercent` of them,
/// but at least one (unless the percentage is 0).
fn max_ejected(o: &Ejection, total: usize) -> usize {
    if o.max_ejection_percent == 0 {
        return 0;
    }
    (total * o.max_ejection_percent as usize / 100).max(1)
}

/// `baseEjectionTime × times`, capped at Envoy's 300 s `max_ejection_time` (or the base
/// itself when that is longer).
fn ejection_time(o: &Ejection, times: u32) -> Duration {
    let cap = mesh_model::model::MAX_EJECTION_TIME.max(o.base_ejection_time);
    o.base_ejection_time.saturating_mul(times).min(cap)
}

/// The rendezvous (highest random weight) score of `addr` for `key`.
fn rendezvous(key: u64, addr: SocketAddr) -> u64 {
    mix(key ^ hash_bytes(addr.to_string().as_bytes()))
}

/// FNV-1a over `bytes`, finished with a 64-bit mixer: stable across processes and builds
/// (std's hasher is not promised to be), so every waypoint replica maps a key alike.
pub fn hash_bytes(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    mix(h)
}

/// splitmix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// What a request hashes by, from its `consistentHash` key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HashInput {
    pub key: Option<u64>,
    /// A `set-cookie` value to add to the response (an `httpCookie` with a `ttl` that the
    /// request did not carry: generated, as Envoy does).
    pub set_cookie: Option<String>,
}

/// The request's consistent-hash key under `lb` (`None` for other balancers, or when the
/// request lacks the header, cookie or query parameter). `cookie_value` makes the value of
/// a generated cookie (random in production).
pub fn hash_key(
    lb: &LoadBalancer,
    headers: &HeaderMap,
    query: Option<&str>,
    source_ip: IpAddr,
    cookie_value: impl FnOnce() -> String,
) -> HashInput {
    let none = HashInput {
        key: None,
        set_cookie: None,
    };
    let LoadBalancer::ConsistentHash(how) = lb else {
        return none;
    };
    let key = |bytes: &[u8]| HashInput {
        key: Some(hash_bytes(bytes)),
        set_cookie: None,
    };
    match how {
        HashKey::Header(name) => {
            let values: Vec<&[u8]> = headers.get_all(name).iter().map(|v| v.as_bytes()).collect();
            if values.is_empty() {
                none
            } else {
                key(&values.join(&b","[..]))
            }
        }
        HashKey::SourceIp => key(source_ip.to_string().as_bytes()),
        HashKey::QueryParameter(name) => query
            .into_iter()
            .flat_map(|q| q.split('&'))
            .find_map(|pair| {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                (k == name).then_some(v)
            })
            .map_or(none.clone(), |v| key(v.as_bytes())),
        HashKey::Cookie { name, path, ttl } => {
            if let Some(v) = cookie(headers, name) {
                return key(v.as_bytes());
            }
            let Some(ttl) = ttl else {
                return none;
            };
            let value = cookie_value();
            let mut set = format!("{name}=\"{value}\"; Max-Age={}", ttl.as_secs());
            if let Some(p) = path {
                set.push_str(&format!("; Path={p}"));
            }
            set.push_str("; HttpOnly");
            HashInput {
                key: Some(hash_bytes(value.as_bytes())),
                set_cookie: Some(set),
            }
        }
    }
}

/// The value of cookie `name` (quotes removed), from every `cookie` header.
fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| {
            let (k, v) = pair.trim().split_once('=')?;
            (k == name).then(|| v.trim_matches('"'))
        })
}

/// A fresh value for a generated cookie: 16 hex digits.
pub fn new_cookie_value() -> String {
    format!("{:016x}", rand::random::<u64>())
}

/// The endpoints of `eps` in subset `labels` (all of them when `None`).
pub fn subset_endpoints(
    eps: Vec<Endpoint>,
    labels: Option<&mesh_model::model::Labels>,
) -> Vec<Endpoint> {
    match labels {
        None => eps,
        Some(l) => eps
            .into_iter()
            // An address outside the mesh has no labels: no subset selects it.
            .filter(|e| {
                e.pod
                    .as_ref()
                    .is_some_and(|p| mesh_model::model::selector_matches(l, &p.labels))
            })
            .collect(),
    }
}

#[cfg(test)]
#[path = "balance_tests.rs"]
mod tests;
