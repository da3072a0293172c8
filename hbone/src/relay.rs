//! [`relay`]: copy bytes both ways between two streams, propagating half-close.
//!
//! Bytes move as [`Bytes`] chunks rather than through a borrowed buffer, so that an HBONE
//! tunnel end ([`super::H2Stream`]) hands the frames HTTP/2 received straight to the socket
//! write, and sends what a socket read filled as the DATA payload, without copying either
//! (see [`RelayIo`]). A plain socket reads into memory it does not zero first.

use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// Most bytes one read takes from a socket. 64 KiB lets one read drain a burst from the
/// kernel (four default HTTP/2 DATA frames) while an idle tunnel holds nothing (below).
pub const RELAY_BUF_SIZE: usize = 64 * 1024;
/// A read buffer with less room than this left is replaced rather than topped up.
const MIN_READ_ROOM: usize = 4 * 1024;

/// Which way bytes moved, relative to `relay(a, b, ..)`'s arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Read from `a`, written to `b`.
    AToB,
    /// Read from `b`, written to `a`.
    BToA,
}

/// One end of a relay: a byte stream read and written in [`Bytes`] chunks.
///
/// Implemented natively by [`super::H2Stream`] (no copy), and for sockets and other
/// `AsyncRead + AsyncWrite` types through [`read_chunk`] / [`write_chunk`] (one copy each,
/// as any read or write does); wrap another such type in [`AsyncIo`].
pub trait RelayIo: Unpin {
    /// The next bytes read, `None` at end of stream. `scratch` is the caller's buffer for
    /// ends that must read into memory; the returned bytes may be split off it.
    fn poll_read_chunk(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut BytesMut,
    ) -> Poll<io::Result<Option<Bytes>>>;

    /// Writes a prefix of `chunk`, advancing it past what was taken; returns how much.
    fn poll_write_chunk(
        &mut self,
        cx: &mut Context<'_>,
        chunk: &mut Bytes,
    ) -> Poll<io::Result<usize>>;

    fn poll_flush_io(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Half-close: no more writes (TCP FIN, END_STREAM).
    fn poll_shutdown_io(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

/// Reads from an `AsyncRead` into `scratch` (grown to [`RELAY_BUF_SIZE`] when short of room,
/// never zeroed) and splits off what arrived.
pub fn read_chunk<R: AsyncRead + Unpin + ?Sized>(
    reader: &mut R,
    cx: &mut Context<'_>,
    scratch: &mut BytesMut,
) -> Poll<io::Result<Option<Bytes>>> {
    if scratch.capacity() - scratch.len() < MIN_READ_ROOM {
        *scratch = BytesMut::with_capacity(RELAY_BUF_SIZE);
    }
    let n = ready!(tokio_util::io::poll_read_buf(Pin::new(reader), cx, scratch))?;
    if n == 0 {
        return Poll::Ready(Ok(None));
    }
    Poll::Ready(Ok(Some(scratch.split().freeze())))
}

/// Writes a prefix of `chunk` to an `AsyncWrite`.
pub fn write_chunk<W: AsyncWrite + Unpin + ?Sized>(
    writer: &mut W,
    cx: &mut Context<'_>,
    chunk: &mut Bytes,
) -> Poll<io::Result<usize>> {
    let n = ready!(Pin::new(writer).poll_write(cx, chunk))?;
    chunk.advance(n);
    Poll::Ready(Ok(n))
}

/// Any `AsyncRead + AsyncWrite` stream as a relay end.
#[derive(Debug)]
pub struct AsyncIo<T>(pub T);

macro_rules! relay_io_via_async {
    ($($(#[$doc:meta])* [$($generics:tt)*] $ty:ty),* $(,)?) => {$(
        $(#[$doc])*
        impl<$($generics)*> RelayIo for $ty {
            fn poll_read_chunk(
                &mut self,
                cx: &mut Context<'_>,
                scratch: &mut BytesMut,
            ) -> Poll<io::Result<Option<Bytes>>> {
                read_chunk(self.as_io(), cx, scratch)
            }

            fn poll_write_chunk(
                &mut self,
                cx: &mut Context<'_>,
                chunk: &mut Bytes,
            ) -> Poll<io::Result<usize>> {
                write_chunk(self.as_io(), cx, chunk)
            }

            fn poll_flush_io(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(self.as_io()).poll_flush(cx)
            }

            fn poll_shutdown_io(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
                Pin::new(self.as_io()).poll_shutdown(cx)
            }
        }
    )*};
}

/// The stream a [`relay_io_via_async!`] type reads and writes.
trait AsIo {
    type Io: AsyncRead + AsyncWrite + Unpin + ?Sized;
    fn as_io(&mut self) -> &mut Self::Io;
}

impl AsIo for TcpStream {
    type Io = TcpStream;
    fn as_io(&mut self) -> &mut TcpStream {
        self
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsIo for AsyncIo<T> {
    type Io = T;
    fn as_io(&mut self) -> &mut T {
        &mut self.0
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + ?Sized> AsIo for Box<T> {
    type Io = T;
    fn as_io(&mut self) -> &mut T {
        self
    }
}

relay_io_via_async!(
    [] TcpStream,
    [T: AsyncRead + AsyncWrite + Unpin] AsyncIo<T>,
    /// A boxed stream (e.g. `Box<dyn AsyncRead + AsyncWrite + Unpin>`).
    [T: AsyncRead + AsyncWrite + Unpin + ?Sized] Box<T>,
);

/// Copies bytes both ways until both directions have finished. EOF on one side becomes a
/// write shutdown (TCP FIN / END_STREAM) on the other while the opposite direction keeps
/// flowing. `on_bytes` runs as bytes are written, so metrics move on live connections.
/// Returns (bytes a→b, bytes b→a); an error in either direction ends both (the streams are
/// dropped, which resets them).
///
/// A plain function returning a future (not an `async fn`, whose arguments would be stored
/// twice in its state): every open tunnel holds this future for its whole life.
pub fn relay<A, B, F>(
    mut a: A,
    mut b: B,
    mut on_bytes: F,
) -> impl Future<Output = io::Result<(u64, u64)>>
where
    A: RelayIo,
    B: RelayIo,
    F: FnMut(Direction, u64),
{
    let mut a_to_b = Pipe::new(Direction::AToB);
    let mut b_to_a = Pipe::new(Direction::BToA);
    poll_fn(move |cx| {
        let ab = a_to_b.poll_copy(cx, &mut a, &mut b, &mut on_bytes)?;
        let ba = b_to_a.poll_copy(cx, &mut b, &mut a, &mut on_bytes)?;
        match (ab, ba) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok((a_to_b.total, b_to_a.total))),
            _ => Poll::Pending,
        }
    })
}

/// One direction's copy state.
struct Pipe {
    dir: Direction,
    /// Read memory for socket ends; empty (no allocation) while the reader is idle.
    scratch: BytesMut,
    /// Read but not yet written.
    chunk: Bytes,
    read_eof: bool,
    /// Written bytes the writer may still buffer.
    need_flush: bool,
    done: bool,
    total: u64,
}

// === impl Pipe ===

impl Pipe {
    fn new(dir: Direction) -> Self {
        Pipe {
            dir,
            scratch: BytesMut::new(),
            chunk: Bytes::new(),
            read_eof: false,
            need_flush: false,
            done: false,
            total: 0,
        }
    }

    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        reader: &mut R,
        writer: &mut W,
        on_bytes: &mut impl FnMut(Direction, u64),
    ) -> Poll<io::Result<()>>
    where
        R: RelayIo,
        W: RelayIo,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.chunk.is_empty() && !self.read_eof {
                match reader.poll_read_chunk(cx, &mut self.scratch) {
                    Poll::Ready(Ok(Some(chunk))) => self.chunk = chunk,
                    Poll::Ready(Ok(None)) => {
                        self.read_eof = true;
                        // Nothing more will be read: the buffer the last read allocated
                        // (64 KiB, for a read that found the end) must not wait for the
                        // other direction to finish.
                        self.scratch = BytesMut::new();
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing buffered and nothing to read: give the memory back (an
                        // idle tunnel, the common case with many connections, holds none).
                        self.scratch = BytesMut::new();
                        // Push out what the writer holds before sleeping, or small messages
                        // would sit in its buffer.
                        if self.need_flush {
                            ready!(writer.poll_flush_io(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }

            while !self.chunk.is_empty() {
                let n = ready!(writer.poll_write_chunk(cx, &mut self.chunk))?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "relay: writer accepted zero bytes",
                    )));
                }
                self.need_flush = true;
                let n = n as u64;
                self.total += n;
                on_bytes(self.dir, n);
            }
            // A written-out chunk is empty but may still share the memory it came from (a
            // socket read's 64 KiB buffer, or the HTTP/2 connection's read buffer); drop it so
            // an idle tunnel pins neither.
            self.chunk = Bytes::new();

            if self.read_eof {
                ready!(writer.poll_flush_io(cx))?;
                self.need_flush = false;
                match ready!(writer.poll_shutdown_io(cx)) {
                    Ok(()) => {}
                    // The other side is already fully closed: the half-close has nowhere to
                    // go, which is not an error for the relay.
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => {}
                    Err(e) => return Poll::Ready(Err(e)),
                }
                self.done = true;
                return Poll::Ready(Ok(()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Hands out one prepared chunk, then has nothing more (pending, or the end).
    struct OneChunk {
        chunk: Option<Bytes>,
        then_eof: bool,
    }

    impl RelayIo for OneChunk {
        fn poll_read_chunk(
            &mut self,
            _cx: &mut Context<'_>,
            _scratch: &mut BytesMut,
        ) -> Poll<io::Result<Option<Bytes>>> {
            match self.chunk.take() {
                Some(c) => Poll::Ready(Ok(Some(c))),
                None if self.then_eof => Poll::Ready(Ok(None)),
                None => Poll::Pending,
            }
        }

        fn poll_write_chunk(
            &mut self,
            _cx: &mut Context<'_>,
            chunk: &mut Bytes,
        ) -> Poll<io::Result<usize>> {
            Poll::Ready(Ok(chunk.len()))
        }

        fn poll_flush_io(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown_io(&mut self, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn an_idle_pipe_pins_no_buffer_it_has_written_out() {
        // The writer is a socket end, which advances the chunk it wrote rather than splitting
        // it: the empty remainder must not keep the reader's buffer alive.
        let (mut writer, mut peer) = tokio::io::duplex(1024);
        let buffer = Bytes::from(vec![7u8; 100]);
        let mut reader = OneChunk {
            chunk: Some(buffer.slice(..10)),
            then_eof: false,
        };
        let mut pipe = Pipe::new(Direction::AToB);
        let mut on_bytes = |_: Direction, _: u64| {};
        let polled = poll_fn(|cx| {
            Poll::Ready(pipe.poll_copy(cx, &mut reader, &mut AsyncIo(&mut writer), &mut on_bytes))
        })
        .await;
        assert!(polled.is_pending(), "idle after one chunk");
        assert_eq!(pipe.total, 10);
        assert_eq!(pipe.scratch.capacity(), 0);
        assert!(
            buffer.is_unique(),
            "the written chunk still shares the read buffer"
        );
        let mut got = [0u8; 10];
        tokio::io::AsyncReadExt::read_exact(&mut peer, &mut got)
            .await
            .expect("the bytes reached the writer's peer");
    }

    #[tokio::test]
    async fn a_finished_direction_holds_no_read_buffer() {
        // The other end is gone at once: the first read finds the end of the stream.
        let (a, other) = tokio::io::duplex(1024);
        drop(other);
        let mut reader = AsyncIo(a);
        let mut writer = OneChunk {
            chunk: None,
            then_eof: true,
        };
        let mut pipe = Pipe::new(Direction::AToB);
        let mut on_bytes = |_: Direction, _: u64| {};
        let done =
            poll_fn(|cx| Poll::Ready(pipe.poll_copy(cx, &mut reader, &mut writer, &mut on_bytes)))
                .await;
        assert!(matches!(done, Poll::Ready(Ok(()))));
        assert!(pipe.done);
        assert_eq!(
            pipe.scratch.capacity(),
            0,
            "the read that found the end kept its buffer"
        );
    }
}
