//! The HBONE server: the HTTP/2 side of one accepted (already TLS-terminated) connection.
//!
//! Every request stream goes to the caller's handler in its own task; the handler checks
//! the method and authority itself (so it can log and count refusals) and then either
//! [`InboundRequest::accept`]s the tunnel or [`InboundRequest::reject`]s it.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream};
use http::{HeaderMap, Method, Response, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

use super::budget::{ReceiveBudget, Reservation};
use super::guard::{AbuseReason, FrameGuard, Tripped};
use super::liveness::Liveness;
use super::stream::H2Stream;
use super::{HboneError, CONNECTION_WINDOW, MAX_HEADER_LIST_SIZE, STREAM_WINDOW};

/// Default cap on concurrent CONNECT streams per inbound connection (RELIABILITY 32: more
/// get REFUSED_STREAM, the client pool opens another connection).
pub const DEFAULT_MAX_CONCURRENT_STREAMS: u32 = 1000;

/// Default time for the peer to send the HTTP/2 preface after TLS is up.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Default time an inbound connection may stay open without a stream (the client pool
/// closes its idle connections after `pool::DEFAULT_IDLE_TIMEOUT`, 60 s; this reaps clients
/// that never do, twice as late so that a well-behaved pool closes first).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(120);

/// Streams the peer may reset before we accepted them (rapid reset, CVE-2023-44487): past
/// this h2 answers with GOAWAY(ENHANCE_YOUR_CALM).
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// Streams we may reset because of the peer's protocol errors before h2 sends GOAWAY
/// (CVE-2024-27316-style floods of bad frames).
const MAX_LOCAL_ERROR_RESET_STREAMS: usize = 1024;

/// Recently reset streams remembered, so late frames for them are not connection errors.
const MAX_CONCURRENT_RESET_STREAMS: usize = 50;

/// Bytes h2 may queue per stream beyond what the socket took. Writers wait for the peer's
/// window first (`H2Stream`), so this is reached only when the socket itself is stuck; the
/// send side of a connection thus holds at most `max_concurrent_streams` × this (and a
/// socket stuck that long stops PONGs, so liveness closes it).
pub const MAX_SEND_BUFFER: usize = 256 * 1024;

/// Default time a tunnel may wait for the peer's window before it is reset: long enough
/// for a paused reader (Envoy's stream idle timeout has the same default).
pub const DEFAULT_SEND_STALL_TIMEOUT: Duration = Duration::from_secs(300);

/// Default interval between liveness PINGs on an inbound connection.
pub const DEFAULT_PING_INTERVAL: Duration = Duration::from_secs(30);
/// Default time the peer has to answer a PING before the connection is closed.
pub const DEFAULT_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// Default most PING, SETTINGS, PRIORITY, RST_STREAM or empty DATA frames (each kind
/// counted alone) a peer may send within one second; WINDOW_UPDATE gets twice that. A
/// client reading 10 Gbit/s sends about 600 WINDOW_UPDATEs a second with 4 MiB windows
/// (ours, Istio's ztunnel's); a flood sends hundreds of thousands of frames a second, and
/// each costs a reply or a wake-up.
pub const DEFAULT_MAX_CONTROL_FRAMES_PER_SEC: u32 = 1_000;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Most concurrent streams one peer may open on one connection.
    pub max_concurrent_streams: u32,
    /// Largest request header block (bytes, HPACK-decoded size).
    pub max_header_list_size: u32,
    /// Time for the HTTP/2 preface; the TLS handshake deadline is the caller's.
    pub handshake_timeout: Duration,
    /// A connection without open streams for this long gets GOAWAY and is closed.
    pub idle_timeout: Duration,
    /// A PING goes out this often (`None`: never); a peer that does not answer within
    /// `ping_timeout` is dead (half-open, or it stopped reading) and its connection closed.
    pub ping_interval: Option<Duration>,
    pub ping_timeout: Duration,
    /// Most control frames of one kind per second before the connection is cut
    /// (WINDOW_UPDATE: twice this).
    pub max_control_frames_per_sec: u32,
    /// A tunnel whose peer keeps its window shut this long while we have bytes to send is
    /// reset (`None`: wait forever).
    pub send_stall_timeout: Option<Duration>,
    /// Receive window per stream (never above the connection's).
    pub stream_window: u32,
    /// Receive window per connection we ask `receive_budget` for; we may get less.
    pub connection_window: u32,
    /// Where the connection window is reserved; a connection it has no room for is closed
    /// at once with [`HboneError::OverBudget`].
    pub receive_budget: ReceiveBudget,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_header_list_size: MAX_HEADER_LIST_SIZE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            ping_interval: Some(DEFAULT_PING_INTERVAL),
            ping_timeout: DEFAULT_PING_TIMEOUT,
            max_control_frames_per_sec: DEFAULT_MAX_CONTROL_FRAMES_PER_SEC,
            send_stall_timeout: Some(DEFAULT_SEND_STALL_TIMEOUT),
            stream_window: STREAM_WINDOW,
            connection_window: CONNECTION_WINDOW,
            receive_budget: ReceiveBudget::default(),
        }
    }
}

/// One CONNECT (or other) request on an inbound HBONE connection, not yet answered.
/// Dropping it without answering resets the stream.
pub struct InboundRequest {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: RecvStream,
    respond: SendResponse<Bytes>,
    stall_timeout: Option<Duration>,
}

impl std::fmt::Debug for InboundRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundRequest")
            .field("method", &self.method)
            .field("uri", &self.uri)
            .field("stream_id", &self.respond.stream_id())
            .finish()
    }
}

/// A `CONNECT` request target as HBONE accepts it: `ip:port` (IPv6 bracketed, port not 0),
/// or why not.
pub fn connect_authority(uri: &Uri) -> Result<SocketAddr, HboneError> {
    let raw = uri.authority().map(|a| a.as_str()).unwrap_or_default();
    // A CONNECT target has no scheme or path (h2 enforces that too); anything else means
    // the request was not a plain CONNECT.
    if uri.scheme().is_some() || uri.path_and_query().is_some() {
        return Err(HboneError::Authority(uri.to_string()));
    }
    match raw.parse::<SocketAddr>() {
        Ok(addr) if addr.port() != 0 => Ok(addr),
        _ => Err(HboneError::Authority(raw.to_string())),
    }
}

// === impl InboundRequest ===

impl InboundRequest {
    pub fn method(&self) -> &Method {
        &self.method
    }

    pub fn headers(&self) -> &HeaderMap {
        &self.headers
    }

    /// The raw `:authority`, if any.
    pub fn authority_str(&self) -> Option<&str> {
        self.uri.authority().map(|a| a.as_str())
    }

    /// `:authority` parsed as `ip:port` (IPv6 bracketed), or why not.
    pub fn authority(&self) -> Result<SocketAddr, HboneError> {
        connect_authority(&self.uri)
    }

    /// Answers `status` with END_STREAM; the tunnel is never opened.
    pub fn reject(mut self, status: StatusCode) {
        let mut rsp = Response::new(());
        *rsp.status_mut() = status;
        if let Err(e) = self.respond.send_response(rsp, true) {
            tracing::debug!(error = %e, %status, "hbone reject: peer already gone");
        }
    }

    /// Answers 200 and returns the tunnel.
    pub fn accept(mut self) -> Result<H2Stream, HboneError> {
        let send = self.respond.send_response(Response::new(()), false)?;
        Ok(H2Stream::new(send, self.body, None).with_stall_timeout(self.stall_timeout))
    }
}

/// Serves HBONE on one accepted connection until the peer closes it. Each request goes to
/// `handler` in its own task.
pub async fn serve<IO, H, Fut>(io: IO, cfg: &ServerConfig, handler: H) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(InboundRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_with_drain(io, cfg, handler, std::future::pending()).await
}

/// [`serve`], plus a drain signal: when `drain` completes the server sends GOAWAY, refuses
/// every stream opened after it with REFUSED_STREAM (the client pool retries those on a
/// fresh connection), and returns once the open ones have finished. The same happens after
/// `cfg.idle_timeout` without an open stream.
///
/// A peer that crosses a limit (control-frame flood, rapid reset, too many small DATA
/// frames, oversized or endless header blocks, no answer to PING) ends the connection at
/// once with an error whose [`HboneError::abuse_reason`] names the limit. A connection whose
/// window `cfg.receive_budget` has no room for ends before the HTTP/2 handshake with
/// [`HboneError::OverBudget`].
pub async fn serve_with_drain<IO, H, Fut, S>(
    io: IO,
    cfg: &ServerConfig,
    handler: H,
    drain: S,
) -> Result<(), HboneError>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Fn(InboundRequest) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
    S: Future<Output = ()>,
{
    // One async fn, no nested one: the connection's future (alive as long as the
    // connection) then holds the io once, not once per level.
    let tripped = Tripped::default();
    // Held by the connection and every stream task: the window's bytes may sit in a
    // stream's receive buffer until its task drops it.
    let Some(window) = cfg.receive_budget.reserve(cfg.connection_window) else {
        return Err(HboneError::OverBudget);
    };
    let window = Arc::new(window);
    let result = 'serve: {
        let handshake = h2::server::Builder::new()
            .initial_window_size(window.stream_window(cfg.stream_window))
            .initial_connection_window_size(window.window())
            .max_concurrent_streams(cfg.max_concurrent_streams)
            .max_header_list_size(cfg.max_header_list_size)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
            .max_concurrent_reset_streams(MAX_CONCURRENT_RESET_STREAMS)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .handshake::<_, Bytes>(FrameGuard::new(
                io,
                cfg.max_control_frames_per_sec,
                tripped.clone(),
            ));
        let mut conn = match tokio::time::timeout(cfg.handshake_timeout, handshake).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(e)) => break 'serve Err(HboneError::H2(e)),
            Err(_) => break 'serve Err(HboneError::HandshakeTimeout),
        };
        let mut liveness = Liveness::new(conn.ping_pong(), cfg.ping_interval, cfg.ping_timeout);

        tokio::pin!(drain);
        let mut draining = false;
        // Streams whose handler still runs; idle time counts from the last one's end.
        let open = Arc::new(AtomicUsize::new(0));
        let ended = Arc::new(tokio::sync::Notify::new());
        let idle = tokio::time::sleep(cfg.idle_timeout);
        tokio::pin!(idle);
        loop {
            let next = tokio::select! {
                next = conn.accept() => next,
                () = &mut drain, if !draining => {
                    draining = true;
                    conn.graceful_shutdown();
                    continue;
                }
                () = ended.notified(), if !draining => {
                    if open.load(Ordering::SeqCst) == 0 {
                        idle.as_mut().reset(tokio::time::Instant::now() + cfg.idle_timeout);
                    }
                    continue;
                }
                () = &mut idle, if !draining => {
                    if open.load(Ordering::SeqCst) == 0 {
                        tracing::debug!(idle_timeout = ?cfg.idle_timeout, "hbone connection idle: closing");
                        draining = true;
                        conn.graceful_shutdown();
                    } else {
                        // Busy: the deadline is set again when the last stream ends.
                        idle.as_mut().reset(tokio::time::Instant::now() + cfg.idle_timeout);
                    }
                    continue;
                }
                res = liveness.check() => {
                    if let Err(e) = res {
                        break 'serve Err(e);
                    }
                    continue;
                }
            };
            let (req, respond) = match next {
                None => break 'serve Ok(()),
                // After our GOAWAY the peer may close the socket before h2 wrote its last
                // frame.
                Some(Err(e)) if draining && e.is_io() => break 'serve Ok(()),
                Some(Err(e)) => break 'serve Err(HboneError::H2(e)),
                Some(Ok(next)) => next,
            };
            if draining {
                // A stream the peer opened before it saw our GOAWAY: never processed, so the
                // client retries it on another connection (RFC 9113 8.7). Taking it would
                // keep a draining process serving new work.
                let mut respond = respond;
                respond.send_reset(Reason::REFUSED_STREAM);
                continue;
            }
            let (parts, body) = req.into_parts();
            // Child of the caller's connection span (pod, peer), so the handler's logs carry
            // both. Debug level, like the connection's: no per-stream span at info.
            let span = tracing::debug_span!(
                parent: tracing::Span::current(),
                "hbone_stream",
                id = %respond.stream_id().as_u32(),
                authority = parts.uri.authority().map(|a| a.as_str()).unwrap_or_default(),
            );
            let req = InboundRequest {
                method: parts.method,
                uri: parts.uri,
                headers: parts.headers,
                body,
                respond,
                stall_timeout: cfg.send_stall_timeout,
            };
            open.fetch_add(1, Ordering::SeqCst);
            let stream = StreamGuard {
                open: open.clone(),
                ended: ended.clone(),
                _window: window.clone(),
            };
            let handled = handler(req);
            tokio::spawn(crate::holding(handled, stream).instrument(span));
        }
    };
    match (result, tripped.get()) {
        (Err(_), Some(reason)) => Err(HboneError::Abuse(reason)),
        // h2 found a protocol violation or crossed one of its own limits and sent GOAWAY.
        (Err(HboneError::H2(e)), None) if e.is_go_away() && e.is_library() => {
            Err(HboneError::Abuse(go_away_label(e.reason())))
        }
        (result, _) => result,
    }
}

/// One stream's handler running; dropping it tells the connection loop.
struct StreamGuard {
    open: Arc<AtomicUsize>,
    ended: Arc<tokio::sync::Notify>,
    _window: Arc<Reservation>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        self.ended.notify_one();
    }
}

fn go_away_label(reason: Option<Reason>) -> AbuseReason {
    match reason {
        // Rapid reset, CONTINUATION floods, too many small DATA frames or local resets.
        Some(Reason::ENHANCE_YOUR_CALM) => "enhance_your_calm",
        Some(Reason::FRAME_SIZE_ERROR) => "frame_size",
        Some(Reason::COMPRESSION_ERROR) => "compression",
        Some(Reason::FLOW_CONTROL_ERROR) => "flow_control",
        _ => "protocol_error",
    }
}
