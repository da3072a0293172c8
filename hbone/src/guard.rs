//! [`FrameGuard`]: counts the HTTP/2 control frames a peer sends and cuts the connection when
//! it sends too many (RELIABILITY 29, 31: PING, SETTINGS, WINDOW_UPDATE, PRIORITY,
//! RST_STREAM and empty-DATA floods).
//!
//! h2 itself bounds the memory such frames cost (one pending PONG / SETTINGS ACK at a time,
//! a budget for small and empty DATA frames, rapid-reset and CONTINUATION limits), but not
//! the CPU: a peer that keeps reading can make us answer millions of PINGs per second. This
//! layer sits between TLS and h2, reads only the 9-byte frame headers of what h2 reads, and
//! fails the read once the peer sent more than `max_per_sec` control frames of one kind
//! within one second (WINDOW_UPDATE: [`WINDOW_UPDATE_FACTOR`] times that). The failed read ends h2's connection, so the socket closes at once.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The client connection preface (RFC 9113 3.4) precedes the first frame.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const WINDOW: Duration = Duration::from_secs(1);
/// A busy reader legitimately sends many WINDOW_UPDATEs (one per half window it consumed, per
/// stream and for the connection): they get this many times the limit of the other kinds.
pub(crate) const WINDOW_UPDATE_FACTOR: u32 = 2;

const DATA: u8 = 0x0;
const PRIORITY: u8 = 0x2;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const WINDOW_UPDATE: u8 = 0x8;
const END_STREAM: u8 = 0x1;

/// Why a connection was cut, as a metric label.
pub type AbuseReason = &'static str;

/// Set when the guard trips; read by the server after h2 reports the failed read.
#[derive(Clone, Default)]
pub(crate) struct Tripped(Arc<Mutex<Option<AbuseReason>>>);

impl Tripped {
    pub(crate) fn get(&self) -> Option<AbuseReason> {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn set(&self, reason: AbuseReason) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(reason);
    }
}

/// Counts control frames in the byte stream read from `io`; writes pass through.
pub(crate) struct FrameGuard<IO> {
    io: IO,
    max_per_sec: u32,
    /// Preface bytes still to skip.
    preface_left: usize,
    /// Payload bytes of the current frame still to skip.
    payload_left: usize,
    header: [u8; FRAME_HEADER_LEN],
    header_len: usize,
    window_start: Instant,
    /// Control frames per kind within the current window, in the order of [`KINDS`].
    counts: [u32; 6],
    tripped: Tripped,
}

const KINDS: [AbuseReason; 6] = [
    "ping_flood",
    "settings_flood",
    "window_update_flood",
    "priority_flood",
    "empty_data_flood",
    "rst_stream_flood",
];

impl<IO> FrameGuard<IO> {
    pub(crate) fn new(io: IO, max_per_sec: u32, tripped: Tripped) -> Self {
        FrameGuard {
            io,
            max_per_sec,
            preface_left: PREFACE_LEN,
            payload_left: 0,
            header: [0; FRAME_HEADER_LEN],
            header_len: 0,
            window_start: Instant::now(),
            counts: [0; 6],
            tripped,
        }
    }

    /// Walks the bytes h2 just read; `Err` names the flood once a limit is crossed.
    fn scan(&mut self, mut buf: &[u8]) -> Result<(), AbuseReason> {
        while !buf.is_empty() {
            if self.preface_left > 0 {
                let n = self.preface_left.min(buf.len());
                self.preface_left -= n;
                buf = &buf[n..];
            } else if self.payload_left > 0 {
                let n = self.payload_left.min(buf.len());
                self.payload_left -= n;
                buf = &buf[n..];
            } else {
                let n = (FRAME_HEADER_LEN - self.header_len).min(buf.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&buf[..n]);
                self.header_len += n;
                buf = &buf[n..];
                if self.header_len == FRAME_HEADER_LEN {
                    self.header_len = 0;
                    let [l0, l1, l2, kind, flags, ..] = self.header;
                    let len = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
                    self.payload_left = len;
                    self.count(kind, flags, len)?;
                }
            }
        }
        Ok(())
    }

    fn count(&mut self, kind: u8, flags: u8, len: usize) -> Result<(), AbuseReason> {
        let slot = match kind {
            PING => 0,
            SETTINGS => 1,
            WINDOW_UPDATE => 2,
            PRIORITY => 3,
            DATA if len == 0 && flags & END_STREAM == 0 => 4,
            // Rapid reset (CVE-2023-44487) also trips h2's own limit on streams reset
            // before they were accepted; this catches the ones reset just after.
            RST_STREAM => 5,
            _ => return Ok(()),
        };
        let now = Instant::now();
        if now.duration_since(self.window_start) >= WINDOW {
            self.window_start = now;
            self.counts = [0; 6];
        }
        self.counts[slot] += 1;
        let max = if kind == WINDOW_UPDATE {
            self.max_per_sec.saturating_mul(WINDOW_UPDATE_FACTOR)
        } else {
            self.max_per_sec
        };
        if self.counts[slot] > max {
            return Err(KINDS[slot]);
        }
        Ok(())
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for FrameGuard<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if let Some(reason) = this.tripped.get() {
            return Poll::Ready(Err(flood_error(reason)));
        }
        let before = buf.filled().len();
        let res = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = res {
            if let Err(reason) = this.scan(&buf.filled()[before..]) {
                this.tripped.set(reason);
                return Poll::Ready(Err(flood_error(reason)));
            }
        }
        res
    }
}

fn flood_error(reason: AbuseReason) -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        format!("hbone peer flood: {reason}"),
    )
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for FrameGuard<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&[0, 0, 0, 1]);
        f.extend_from_slice(payload);
        f
    }

    fn guard(max: u32) -> FrameGuard<()> {
        FrameGuard::new((), max, Tripped::default())
    }

    #[test]
    fn frames_split_anywhere_are_counted_once() {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        for _ in 0..3 {
            bytes.extend(frame(PING, 0, &[7; 8]));
            bytes.extend(frame(DATA, 0, &[1; 100]));
            bytes.extend(frame(DATA, END_STREAM, &[]));
        }
        for split in [1, 2, 5, 9, 17, 64] {
            let mut g = guard(3);
            for chunk in bytes.chunks(split) {
                assert_eq!(g.scan(chunk), Ok(()), "split {split}");
            }
            assert_eq!(g.counts, [3, 0, 0, 0, 0, 0], "split {split}");
            let mut g = guard(2);
            let res: Result<Vec<()>, _> = bytes.chunks(split).map(|c| g.scan(c)).collect();
            assert_eq!(res, Err("ping_flood"), "split {split}");
        }
    }

    #[test]
    fn each_kind_is_named() {
        for (kind, flags, reason) in [
            (SETTINGS, 0, "settings_flood"),
            (WINDOW_UPDATE, 0, "window_update_flood"),
            (PRIORITY, 0, "priority_flood"),
            (DATA, 0, "empty_data_flood"),
            (RST_STREAM, 0, "rst_stream_flood"),
        ] {
            let mut g = guard(10);
            g.preface_left = 0;
            let payload = if kind == DATA { vec![] } else { vec![0; 4] };
            let f = frame(kind, flags, &payload);
            let max = if kind == WINDOW_UPDATE { 20 } else { 10 };
            let res: Result<Vec<()>, _> = (0..max).map(|_| g.scan(&f)).collect();
            assert_eq!(res, Ok(vec![(); max]), "{reason}");
            assert_eq!(g.scan(&f), Err(reason));
        }
    }
}
