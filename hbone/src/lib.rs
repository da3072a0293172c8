//! HBONE: TCP connections tunnelled as HTTP/2 `CONNECT` streams over mutual TLS.
//!
//! On the wire this matches Istio's ztunnel: one `CONNECT` per tunnelled connection with
//! `:authority = <dst-ip>:<port>`, `forwarded`/`baggage`/`traceparent` headers, `200` opens the
//! tunnel, then raw bytes in DATA frames; END_STREAM is a half-close and RST_STREAM a reset.
//!
//! - [`connect_request`] builds the request; [`connect_authority`] checks its target and
//!   [`parse_forwarded_for`] / [`parse_baggage`] / [`valid_traceparent`] read the headers back
//!   on the server side (property tests in `prop_tests.rs`, fuzz targets in `fuzz/`).
//! - [`Pool`] (client) multiplexes streams over pooled connections per [`PoolKey`].
//! - [`serve`] (server) runs the HTTP/2 side of one accepted connection.
//! - [`ReceiveBudget`]: the per-process budget every connection reserves its receive window
//!   from (module `budget`).
//! - [`tcp`]: keepalive and `TCP_USER_TIMEOUT` for every socket the mesh opens or accepts.
//! - [`H2Stream`] is a tunnel end (`AsyncRead + AsyncWrite`), [`relay`] copies between two ends.
//! - [`holding`] spawns a connection's future with its guards without storing it twice.
//!
//! This module never builds TLS configurations: it is handed a `rustls::ClientConfig` or an
//! already-terminated stream, so it holds no keys.
#![forbid(unsafe_code)]

use std::fmt::Write as _;
use std::io;
use std::net::{IpAddr, SocketAddr};

use http::header::{HeaderName, HeaderValue};
use http::{Method, Request, Uri};

mod budget;
mod guard;
mod liveness;
mod pool;
mod relay;
mod server;
mod stream;
mod task;
pub mod tcp;

#[cfg(test)]
mod prop_tests;
#[cfg(test)]
mod tests;

pub use budget::{ReceiveBudget, Reservation, DEFAULT_RECEIVE_BUFFER_BUDGET, MIN_WINDOW};
pub use guard::AbuseReason;
pub use pool::{Pool, PoolConfig, PoolKey, PoolStats, DEFAULT_MAX_CONNS_PER_KEY};
pub use relay::{read_chunk, relay, write_chunk, AsyncIo, Direction, RelayIo};
pub use server::{
    connect_authority, serve, serve_with_drain, InboundRequest, ServerConfig,
    DEFAULT_MAX_CONCURRENT_STREAMS, DEFAULT_MAX_CONTROL_FRAMES_PER_SEC, MAX_SEND_BUFFER,
};
pub use stream::H2Stream;
pub use task::{holding, Holding};

/// TCP port of the HBONE listener on every mesh workload.
pub const HBONE_PORT: u16 = 15008;

/// ALPN protocol both sides must negotiate.
pub const ALPN_H2: &[u8] = b"h2";

/// Default per-stream receive window we advertise. HTTP/2's 64 KiB default caps one stream at
/// about window/RTT; 4 MiB lets a single tunnel fill a fast link, as Istio's ztunnel does.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;

/// Default connection receive window (each connection reserves it from the process's
/// [`ReceiveBudget`] and may get less): a few streams at full speed before one slow reader can starve
/// the others, and a bound on what one peer can make us buffer per connection.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// Largest header block we accept (RELIABILITY 30: HPACK bombs, CONTINUATION floods).
pub const MAX_HEADER_LIST_SIZE: u32 = 64 * 1024;

pub const BAGGAGE: HeaderName = HeaderName::from_static("baggage");
pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const FORWARDED: HeaderName = http::header::FORWARDED;

#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    #[error("hbone dial: {0}")]
    Dial(#[source] io::Error),
    #[error("hbone tls handshake: {0}")]
    Tls(#[source] io::Error),
    #[error("hbone tls handshake: peer did not negotiate alpn h2")]
    Alpn,
    #[error("hbone http/2: {0}")]
    H2(#[from] h2::Error),
    #[error("hbone connect: peer answered {0}")]
    Status(http::StatusCode),
    #[error("hbone connect authority {0:?}: expected <ip>:<port>")]
    Authority(String),
    #[error("hbone connection closed")]
    Closed,
    #[error("hbone connect: no tunnel within the connect timeout")]
    Timeout,
    #[error("hbone server: no http/2 preface within the handshake timeout")]
    HandshakeTimeout,
    #[error("hbone: peer did not answer a ping within the timeout")]
    PingTimeout,
    #[error("hbone: peer connection cut: {0}")]
    Abuse(AbuseReason),
    #[error("hbone connect: the peer takes no more streams and the pool holds its most connections to it")]
    PoolFull,
    #[error("hbone: the receive-buffer budget has no room for another connection's window")]
    OverBudget,
}

impl HboneError {
    /// A copy for the other callers that waited on the same dial (io and h2 errors are not
    /// `Clone`; kind, reason and message survive).
    fn duplicate(&self) -> HboneError {
        let io_copy = |e: &io::Error| io::Error::new(e.kind(), e.to_string());
        match self {
            HboneError::Dial(e) => HboneError::Dial(io_copy(e)),
            HboneError::Tls(e) => HboneError::Tls(io_copy(e)),
            HboneError::Alpn => HboneError::Alpn,
            HboneError::H2(e) => match (e.reason(), e.get_io()) {
                (Some(reason), _) => HboneError::H2(reason.into()),
                (None, Some(io)) => HboneError::Dial(io_copy(io)),
                (None, None) => HboneError::Closed,
            },
            HboneError::Status(s) => HboneError::Status(*s),
            HboneError::Authority(a) => HboneError::Authority(a.clone()),
            HboneError::Closed => HboneError::Closed,
            HboneError::Timeout => HboneError::Timeout,
            HboneError::HandshakeTimeout => HboneError::HandshakeTimeout,
            HboneError::PingTimeout => HboneError::PingTimeout,
            HboneError::Abuse(r) => HboneError::Abuse(r),
            HboneError::PoolFull => HboneError::PoolFull,
            HboneError::OverBudget => HboneError::OverBudget,
        }
    }

    /// For a connection the server cut because the peer crossed a limit (flood, rapid reset,
    /// oversized headers, no answer to PING): the reason, as a metric label.
    pub fn abuse_reason(&self) -> Option<AbuseReason> {
        match self {
            HboneError::Abuse(r) => Some(*r),
            HboneError::PingTimeout => Some("ping_timeout"),
            HboneError::HandshakeTimeout => Some("handshake_timeout"),
            _ => None,
        }
    }

    /// [`HboneError::abuse_reason`] as the reason label of a refusal: `H2_PING_FLOOD`.
    pub fn abuse_label(&self) -> Option<String> {
        self.abuse_reason()
            .map(|r| format!("H2_{}", r.to_ascii_uppercase()))
    }

    /// Logs how an inbound connection from `peer` ended with this error (an access-log line
    /// when the peer crossed a limit, else debug); returns the reason to count the cut under.
    pub fn log_inbound_end(&self, peer: SocketAddr) -> Option<String> {
        let label = self.abuse_label();
        match &label {
            Some(reason) => tracing::info!(
                target: "access", src_addr = %peer, flags = %reason, error = %self,
                "hbone connection cut"
            ),
            None => tracing::debug!(error = %self, "hbone connection ended with an error"),
        }
        label
    }
}

/// What the client tells the destination about the connection it tunnels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConnectHeaders {
    /// The original client's IP (`forwarded: for=`).
    pub src_ip: IpAddr,
    /// The service hostname the client addressed, when it addressed a service
    /// (`forwarded: host=`).
    pub service_host: Option<String>,
    /// Peer metadata, e.g. `k8s.namespace.name`, `k8s.pod.name`, `service.name`,
    /// `service.version`. Only known keys should be given.
    pub baggage: Vec<(String, String)>,
    /// A W3C `traceparent` to continue; a fresh one is made when absent or malformed.
    pub traceparent: Option<String>,
}

/// Builds the `CONNECT` request for a tunnel to `authority` (the destination pod's ip and the
/// target port, not 15008).
pub fn connect_request(authority: SocketAddr, h: &ConnectHeaders) -> Request<()> {
    let mut req = Request::new(());
    *req.method_mut() = Method::CONNECT;
    let target = authority_string(authority);
    match target.parse::<Uri>() {
        Ok(uri) => *req.uri_mut() = uri,
        // An ip:port always parses; if that ever changes, the server refuses the request
        // (empty authority) rather than us panicking here.
        Err(e) => tracing::error!(%target, error = %e, "connect authority does not parse"),
    }
    let headers = req.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&forwarded_value(h.src_ip, h.service_host.as_deref())) {
        headers.insert(FORWARDED, v);
    }
    let baggage = baggage_value(&h.baggage);
    if !baggage.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&baggage) {
            headers.insert(BAGGAGE, v);
        }
    }
    let traceparent = match h.traceparent.as_deref() {
        Some(tp) if valid_traceparent(tp) => tp.to_string(),
        _ => new_traceparent(),
    };
    if let Ok(v) = HeaderValue::from_str(&traceparent) {
        headers.insert(TRACEPARENT, v);
    }
    req
}

/// `ip:port`, with IPv6 in brackets and without a scope id (not valid in an authority).
fn authority_string(a: SocketAddr) -> String {
    match a {
        SocketAddr::V4(a) => format!("{}:{}", a.ip(), a.port()),
        SocketAddr::V6(a) => format!("[{}]:{}", a.ip(), a.port()),
    }
}

/// RFC 7239 `for="<ip>"` (IPv6 bracketed) and `host=` when the hostname is known.
fn forwarded_value(src: IpAddr, host: Option<&str>) -> String {
    let mut v = match src {
        IpAddr::V4(ip) => format!("for=\"{ip}\""),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\""),
    };
    match host {
        Some(host) if !host.is_empty() && host.bytes().all(is_tchar) => {
            let _ = write!(v, ";host={host}");
        }
        // A host with a port or other non-token characters must be a quoted-string; control
        // characters cannot be carried at all, so the host is left out rather than mangled.
        Some(host) if !host.is_empty() && host.bytes().all(|b| (0x20..0x7f).contains(&b)) => {
            let escaped = host.replace('\\', "\\\\").replace('"', "\\\"");
            let _ = write!(v, ";host=\"{escaped}\"");
        }
        _ => {}
    }
    v
}

/// RFC 7230 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// W3C baggage `baggage-octet`: printable ASCII except space, `"`, `,`, `;`, `\`.
fn is_baggage_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e)
}

/// `k=v,k=v` with values percent-encoded where the baggage grammar needs it; pairs whose key
/// is not a token are dropped (they would make the whole header invalid).
fn baggage_value(pairs: &[(String, String)]) -> String {
    let mut out = String::new();
    for (k, v) in pairs {
        if k.is_empty() || !k.bytes().all(is_tchar) {
            tracing::debug!(key = %k, "baggage key is not a token; left out");
            continue;
        }
        if !out.is_empty() {
            out.push(',');
        }
        out.push_str(k);
        out.push('=');
        for b in v.bytes() {
            if is_baggage_octet(b) && b != b'%' {
                out.push(char::from(b));
            } else {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// Reads a `baggage` header value back into pairs (percent-decoded). Members without `=` and
/// properties after `;` are ignored, as the W3C spec allows.
pub fn parse_baggage(value: &str) -> Vec<(String, String)> {
    value
        .split(',')
        .filter_map(|member| {
            let member = member.split(';').next().unwrap_or_default();
            let (k, v) = member.split_once('=')?;
            let k = k.trim();
            if k.is_empty() {
                return None;
            }
            Some((k.to_string(), percent_decode(v.trim())))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(hi), Some(lo)) => {
                // Both digits are < 16, so this fits a byte.
                out.push(u8::try_from(hi * 16 + lo).unwrap_or(b'?'));
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The first `for=` address of a `forwarded` header (`for="1.2.3.4"`, `for="[::1]:80"`,
/// `for=1.2.3.4`); `None` for obfuscated or unknown nodes.
pub fn parse_forwarded_for(value: &str) -> Option<IpAddr> {
    value
        .split([',', ';'])
        .filter_map(|pair| pair.trim().split_once('='))
        .filter(|(k, _)| k.trim().eq_ignore_ascii_case("for"))
        .find_map(|(_, v)| {
            let v = v.trim().trim_matches('"');
            if let Ok(ip) = v.parse::<IpAddr>() {
                return Some(ip);
            }
            if let Ok(sa) = v.parse::<SocketAddr>() {
                return Some(sa.ip());
            }
            v.strip_prefix('[')?.split(']').next()?.parse().ok()
        })
}

/// A fresh `traceparent` with random, non-zero trace and span ids, sampled.
pub fn new_traceparent() -> String {
    let trace_id = rand::random::<u128>().max(1);
    let span_id = rand::random::<u64>().max(1);
    format!("00-{trace_id:032x}-{span_id:016x}-01")
}

/// Whether `tp` is a `traceparent` we pass on: `00-<32 lower hex>-<16 lower hex>-<2 hex>`, ids
/// not all zero (W3C trace context).
pub fn valid_traceparent(tp: &str) -> bool {
    let parts: Vec<&str> = tp.split('-').collect();
    let hex = |s: &str, len: usize| {
        s.len() == len
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let nonzero = |s: &str| s.bytes().any(|b| b != b'0');
    matches!(parts.as_slice(), [v, t, s, f]
        if *v == "00" && hex(t, 32) && nonzero(t) && hex(s, 16) && nonzero(s) && hex(f, 2))
}
