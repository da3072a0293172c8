//! [`H2Stream`]: one end of a tunnel, a CONNECT stream seen as a byte stream.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use h2::{Reason, RecvStream, SendStream};
use std::future::Future;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;

use super::pool::StreamSlot;
use super::relay::RelayIo;

/// Most bytes handed to h2 per `poll_write`, so one writer cannot queue unbounded data.
const MAX_WRITE_CHUNK: usize = 256 * 1024;

/// Outgoing chunks are carved out of one buffer of this size, so that a busy tunnel
/// allocates once per this many bytes rather than once per write.
const WRITE_BUF_SIZE: usize = 64 * 1024;

/// A tunnel end: `AsyncRead + AsyncWrite` over one CONNECT stream.
///
/// - Reading releases HTTP/2 receive window only as bytes are consumed, so a slow reader
///   slows the sender instead of making us buffer.
/// - Writing waits for send capacity (peer window), so a slow peer slows the writer; a peer
///   that keeps the window shut longer than the stall timeout gets the stream reset
///   (RELIABILITY 31: zero-window stalls hold memory and a task forever otherwise).
/// - `poll_shutdown` sends END_STREAM (half-close); reading continues.
/// - Dropping the stream before both directions finished resets it (RST_STREAM CANCEL).
pub struct H2Stream {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// Received bytes not yet read.
    pending: Bytes,
    read_eof: bool,
    write_closed: bool,
    write_buf: BytesMut,
    /// How long (ms) a write may wait for the peer's window before the stream is reset;
    /// 0: forever. Milliseconds in a `u32` keep the struct small (it is per tunnel).
    stall_ms: u32,
    /// Running while a write waits for window.
    stall: Option<Pin<Box<Sleep>>>,
    /// Keeps the pooled connection's stream count until the tunnel is gone.
    _slot: Option<StreamSlot>,
}

impl std::fmt::Debug for H2Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H2Stream")
            .field("stream_id", &self.send.stream_id())
            .field("read_eof", &self.read_eof)
            .field("write_closed", &self.write_closed)
            .finish()
    }
}

// === impl H2Stream ===

impl H2Stream {
    pub(crate) fn new(send: SendStream<Bytes>, recv: RecvStream, slot: Option<StreamSlot>) -> Self {
        H2Stream {
            send,
            recv,
            pending: Bytes::new(),
            read_eof: false,
            write_closed: false,
            write_buf: BytesMut::new(),
            stall_ms: 0,
            stall: None,
            _slot: slot,
        }
    }

    pub(crate) fn with_stall_timeout(mut self, timeout: Option<Duration>) -> Self {
        // At least 1 ms when set; beyond u32::MAX ms (49 days) is as good as forever.
        self.stall_ms = timeout.map_or(0, |t| {
            u32::try_from(t.as_millis()).map_or(0, |ms| ms.max(1))
        });
        self
    }

    /// Resets the stream (both directions) with `reason`, e.g. when policy revokes it.
    pub fn reset(&mut self, reason: Reason) {
        self.send.send_reset(reason);
    }
}

impl H2Stream {
    /// Fills `pending` with the next received bytes unless it holds some; `false` at the end
    /// of the stream. Releases no window: the caller does, as bytes are consumed.
    fn poll_pending(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<bool>> {
        while self.pending.is_empty() {
            if self.read_eof {
                return Poll::Ready(Ok(false));
            }
            match ready!(self.recv.poll_data(cx)) {
                // Empty DATA frames are legal; loop for the next one.
                Some(Ok(data)) => self.pending = data,
                // RST_STREAM(NO_ERROR) is how a peer says "done, stop sending" (RFC 9113
                // 8.1): for the read side that is an orderly end.
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => self.read_eof = true,
                Some(Err(e)) => return Poll::Ready(Err(h2_to_io(e))),
                None => self.read_eof = true,
            }
        }
        Poll::Ready(Ok(true))
    }

    /// Waits for send capacity (the peer's window) for up to `want` bytes; returns how many
    /// may be sent now.
    fn poll_send_capacity(&mut self, cx: &mut Context<'_>, want: usize) -> Poll<io::Result<usize>> {
        if self.write_closed {
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "hbone stream: write after shutdown",
            )));
        }
        let want = want.min(MAX_WRITE_CHUNK);
        self.send.reserve_capacity(want);
        loop {
            let cap = self.send.capacity();
            if cap > 0 {
                self.stall = None;
                return Poll::Ready(Ok(cap.min(want)));
            }
            match self.send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(h2_to_io(e))),
                // The stream can no longer send: reset by the peer or the connection is gone.
                Poll::Ready(None) => return Poll::Ready(Err(self.closed_error(cx))),
                Poll::Pending => return self.poll_stall(cx),
            }
        }
    }
}

impl H2Stream {
    /// Called while a write waits for window: `Pending` until the stall timeout, then the
    /// stream is reset and the write fails.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        if self.stall_ms == 0 {
            return Poll::Pending;
        }
        let limit = Duration::from_millis(u64::from(self.stall_ms));
        let stall = self
            .stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        ready!(stall.as_mut().poll(cx));
        self.stall = None;
        self.send.send_reset(Reason::CANCEL);
        tracing::debug!(
            stream = self.send.stream_id().as_u32(),
            ?limit,
            "hbone stream: peer window stayed shut; reset"
        );
        Poll::Ready(Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("hbone stream: peer window stayed shut for {limit:?}"),
        )))
    }
}

impl AsyncRead for H2Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() == 0 || !ready!(this.poll_pending(cx))? {
            return Poll::Ready(Ok(()));
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        this.recv
            .flow_control()
            .release_capacity(n)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(()))
    }
}

/// Zero-copy relaying: received DATA payloads are handed out as they are, and chunks to
/// send become DATA payloads without being copied.
impl RelayIo for H2Stream {
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        _scratch: &mut BytesMut,
    ) -> Poll<io::Result<Option<Bytes>>> {
        if !ready!(self.poll_pending(cx))? {
            return Poll::Ready(Ok(None));
        }
        let chunk = std::mem::take(&mut self.pending);
        // The window reopens as the relay takes the bytes: it holds at most this chunk on
        // top of what the window lets the peer send.
        self.recv
            .flow_control()
            .release_capacity(chunk.len())
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(Some(chunk)))
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>> {
        if chunk.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(self.poll_send_capacity(cx, chunk.len()))?;
        self.send
            .send_data(chunk.split_to(n), false)
            .map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush_io(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_flush(cx)
    }

    fn poll_shutdown_io(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self).poll_shutdown(cx)
    }
}

impl AsyncWrite for H2Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let n = ready!(this.poll_send_capacity(cx, buf.len()))?;
        if this.write_buf.capacity() < n {
            this.write_buf.reserve(n.max(WRITE_BUF_SIZE));
        }
        this.write_buf.extend_from_slice(&buf[..n]);
        let chunk = this.write_buf.split().freeze();
        this.send.send_data(chunk, false).map_err(h2_to_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // h2's connection task writes queued frames out by itself.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.write_closed {
            if this.send.send_data(Bytes::new(), true).is_err() {
                return Poll::Ready(Err(this.closed_error(cx)));
            }
            this.write_closed = true;
        }
        Poll::Ready(Ok(()))
    }
}

impl H2Stream {
    /// Why the send side is gone: the peer's reset reason when there is one.
    fn closed_error(&mut self, cx: &mut Context<'_>) -> io::Error {
        match self.send.poll_reset(cx) {
            Poll::Ready(Ok(reason)) => io::Error::new(
                io::ErrorKind::ConnectionReset,
                format!("hbone stream reset by peer: {reason}"),
            ),
            Poll::Ready(Err(e)) => h2_to_io(e),
            Poll::Pending => {
                io::Error::new(io::ErrorKind::BrokenPipe, "hbone stream: send side closed")
            }
        }
    }
}

/// Maps h2 errors to the io error kinds callers (and `relay`) act on.
pub(crate) fn h2_to_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("hbone: connection io error"));
    }
    let kind = if e.is_go_away() {
        io::ErrorKind::ConnectionAborted
    } else if e.is_reset() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::Other
    };
    io::Error::new(kind, e)
}
