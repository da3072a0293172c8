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
use h2::RecvStream;
use http::{HeaderMap, Method, Response, StatusCode, Uri};
use tokio::io::{AsyncRead, AsyncWrite};
use tracing::Instrument;

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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_concurrent_streams: DEFAULT_MAX_CONCURRENT_STREAMS,
            max_header_list_size: MAX_HEADER_LIST_SIZE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
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
        Ok(H2Stream::new(send, self.body, None))
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

/// [`serve`], plus a drain signal: when `drain` completes the server sends GOAWAY, takes no
/// new streams, and returns once the open ones have finished. The same happens after
/// `cfg.idle_timeout` without an open stream.
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
    let handshake = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(cfg.max_concurrent_streams)
        .max_header_list_size(cfg.max_header_list_size)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
        .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESET_STREAMS))
        .max_concurrent_reset_streams(MAX_CONCURRENT_RESET_STREAMS)
        .handshake::<_, Bytes>(io);
    let mut conn = tokio::time::timeout(cfg.handshake_timeout, handshake)
        .await
        .map_err(|_| HboneError::HandshakeTimeout)??;

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
        };
        let Some(next) = next else {
            return Ok(());
        };
        let (req, respond) = match next {
            Ok(next) => next,
            // After our GOAWAY the peer may close the socket before h2 wrote its last frame.
            Err(e) if draining && e.is_io() => return Ok(()),
            Err(e) => return Err(e.into()),
        };
        let (parts, body) = req.into_parts();
        // Child of the caller's connection span (pod, peer), so the handler's logs carry both.
        let span = tracing::info_span!(
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
        };
        open.fetch_add(1, Ordering::SeqCst);
        let stream = StreamGuard {
            open: open.clone(),
            ended: ended.clone(),
        };
        let handled = handler(req);
        tokio::spawn(
            async move {
                let _stream = stream;
                handled.await
            }
            .instrument(span),
        );
    }
}

/// One stream's handler running; dropping it tells the connection loop.
struct StreamGuard {
    open: Arc<AtomicUsize>,
    ended: Arc<tokio::sync::Notify>,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        self.ended.notify_one();
    }
}
