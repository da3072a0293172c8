//! [`relay`]: copy bytes both ways between two streams, propagating half-close.

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Per-direction buffer. 16 KiB matches one default HTTP/2 DATA frame and a typical TCP
/// receive chunk; allocated once per relay, reused for every chunk.
pub const RELAY_BUF_SIZE: usize = 16 * 1024;

/// Which way bytes moved, relative to `relay(a, b, ..)`'s arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Read from `a`, written to `b`.
    AToB,
    /// Read from `b`, written to `a`.
    BToA,
}

/// Copies bytes both ways until both directions have finished. EOF on one side becomes a
/// write shutdown (TCP FIN / END_STREAM) on the other while the opposite direction keeps
/// flowing. `on_bytes` runs as bytes are written, so metrics move on live connections.
/// Returns (bytes a→b, bytes b→a); an error in either direction ends both (the streams are
/// dropped, which resets them).
pub async fn relay<A, B>(
    mut a: A,
    mut b: B,
    mut on_bytes: impl FnMut(Direction, u64),
) -> io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a_to_b = Pipe::new(Direction::AToB);
    let mut b_to_a = Pipe::new(Direction::BToA);
    poll_fn(|cx| {
        let ab = a_to_b.poll_copy(cx, &mut a, &mut b, &mut on_bytes)?;
        let ba = b_to_a.poll_copy(cx, &mut b, &mut a, &mut on_bytes)?;
        match (ab, ba) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok((a_to_b.total, b_to_a.total))),
            _ => Poll::Pending,
        }
    })
    .await
}

/// One direction's copy state.
struct Pipe {
    dir: Direction,
    buf: Box<[u8]>,
    /// Bytes `buf[pos..filled]` are read but not yet written.
    pos: usize,
    filled: usize,
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
            // Allocated when there is something to read, freed when the reader goes idle:
            // an idle tunnel (the common case with many connections) holds no buffer.
            buf: Box::default(),
            pos: 0,
            filled: 0,
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
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.done {
            return Poll::Ready(Ok(()));
        }
        loop {
            if self.pos == self.filled && !self.read_eof {
                if self.buf.is_empty() {
                    self.buf = vec![0; RELAY_BUF_SIZE].into_boxed_slice();
                }
                let mut rb = ReadBuf::new(&mut self.buf);
                match Pin::new(&mut *reader).poll_read(cx, &mut rb) {
                    Poll::Ready(Ok(())) => {
                        let n = rb.filled().len();
                        if n == 0 {
                            self.read_eof = true;
                        } else {
                            self.pos = 0;
                            self.filled = n;
                        }
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {
                        // Nothing buffered and nothing to read: give the memory back.
                        self.buf = Box::default();
                        // Nothing more to read right now: push out what the writer holds
                        // before sleeping, or small messages would sit in its buffer.
                        if self.need_flush {
                            ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                            self.need_flush = false;
                        }
                        return Poll::Pending;
                    }
                }
            }

            while self.pos < self.filled {
                let n = ready!(
                    Pin::new(&mut *writer).poll_write(cx, &self.buf[self.pos..self.filled])
                )?;
                if n == 0 {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "relay: writer accepted zero bytes",
                    )));
                }
                self.pos += n;
                self.need_flush = true;
                let n = n as u64;
                self.total += n;
                on_bytes(self.dir, n);
            }

            if self.read_eof && self.pos == self.filled {
                ready!(Pin::new(&mut *writer).poll_flush(cx))?;
                self.need_flush = false;
                match ready!(Pin::new(&mut *writer).poll_shutdown(cx)) {
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
