//! Phase 7, body: a request body with `content-length` ≤ [`MAX_BUFFERED_BODY`] (or none) is
//! read whole so that retries can replay it and mirrors copy it; a larger one streams once.
//! Its bytes are counted for `istio_request_bytes` either way. Of a streamed body, what
//! already arrived with the head is read before anything goes upstream, so a body that is
//! malformed from its start (an absurd chunk size, RELIABILITY 25) is answered 400 and its
//! head never reaches a backend.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap};
use http::StatusCode;
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::LocalReply;
use crate::telemetry::ResponseFlag;
use crate::upstream::UpBody;

/// Largest request body buffered for retries and mirrors (by its `content-length`).
pub const MAX_BUFFERED_BODY: u64 = 64 * 1024;

/// The phase: the body as the attempts and mirrors will use it; `400` (`DC`) when the
/// client fails while a small body is read.
pub async fn run(
    body: Incoming,
    headers: &HeaderMap,
    counter: Arc<AtomicU64>,
) -> Result<RequestBody, LocalReply> {
    RequestBody::new(body, headers, counter).await.map_err(|e| {
        LocalReply::new(
            StatusCode::BAD_REQUEST,
            "bad request",
            Some(ResponseFlag::DownstreamClosed),
            format!("request body: {e}"),
        )
    })
}

/// The request body as the attempts and mirrors see it.
pub enum RequestBody {
    /// Small (`content-length` up to [`MAX_BUFFERED_BODY`], or none): read whole, sent again
    /// by each attempt and copied to mirrors.
    Buffered {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    /// Large or of unknown length: streamed once; `None` once an attempt took it.
    Streaming(Option<Counted>),
}

impl RequestBody {
    async fn new(
        body: Incoming,
        headers: &HeaderMap,
        counter: Arc<AtomicU64>,
    ) -> Result<RequestBody, hyper::Error> {
        let length = headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .or(body.size_hint().exact());
        let small = body.is_end_stream() || length.is_some_and(|l| l <= MAX_BUFFERED_BODY);
        let mut counted = Counted {
            inner: body,
            counter,
            first: None,
        };
        if !small {
            counted.read_arrived()?;
            return Ok(RequestBody::Streaming(Some(counted)));
        }
        let collected = counted.collect().await?;
        let trailers = collected.trailers().cloned();
        Ok(RequestBody::Buffered {
            data: collected.to_bytes(),
            trailers,
        })
    }

    /// Whether another attempt can still send the body.
    pub fn replayable(&self) -> bool {
        match self {
            RequestBody::Buffered { .. } => true,
            RequestBody::Streaming(b) => b.is_some(),
        }
    }

    /// The body for one attempt; `None` when a streamed body was already sent.
    pub fn take(&mut self) -> Option<UpBody> {
        match self {
            RequestBody::Buffered { .. } => self.replay(),
            RequestBody::Streaming(b) => b.take().map(BodyExt::boxed_unsync),
        }
    }

    /// A copy of a buffered body (for a mirror); `None` for a streamed one.
    pub fn replay(&self) -> Option<UpBody> {
        match self {
            RequestBody::Buffered { data, trailers } => Some(
                Replay {
                    data: (!data.is_empty()).then(|| data.clone()),
                    trailers: trailers.clone(),
                }
                .boxed_unsync(),
            ),
            RequestBody::Streaming(_) => None,
        }
    }
}

/// A buffered body sent again: its data, then its trailers.
pub struct Replay {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl Body for Replay {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(data) = this.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(data))));
        }
        Poll::Ready(this.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// The downstream request body, counting its bytes for `istio_request_bytes`.
pub struct Counted {
    inner: Incoming,
    counter: Arc<AtomicU64>,
    /// A frame read ahead by [`Counted::read_arrived`], returned first.
    first: Option<Frame<Bytes>>,
}

impl Counted {
    /// Reads the first frame if it is there without waiting (it came with the head), so
    /// that a body malformed from its start fails here, before the upstream request; a
    /// client that has sent nothing yet (it waits for `100 Continue`, or streams later) is
    /// not waited for.
    fn read_arrived(&mut self) -> Result<(), hyper::Error> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        if let Poll::Ready(Some(frame)) = Pin::new(&mut self.inner).poll_frame(&mut cx) {
            let frame = frame?;
            if let Some(data) = frame.data_ref() {
                self.counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
            self.first = Some(frame);
        }
        Ok(())
    }
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame {
            if let Some(data) = f.data_ref() {
                this.counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let inner = self.inner.size_hint();
        let ahead = self
            .first
            .as_ref()
            .and_then(Frame::data_ref)
            .map_or(0, |d| d.len() as u64);
        let mut hint = SizeHint::new();
        hint.set_lower(inner.lower().saturating_add(ahead));
        if let Some(upper) = inner.upper() {
            hint.set_upper(upper.saturating_add(ahead));
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[tokio::test]
    async fn a_buffered_body_is_replayed_whole_with_its_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-timeout", HeaderValue::from_static("1S"));
        let mut body = RequestBody::Buffered {
            data: Bytes::from_static(b"hello"),
            trailers: Some(trailers),
        };
        for _ in 0..2 {
            let replay = body.take().expect("buffered");
            assert_eq!(replay.size_hint().exact(), Some(5));
            let collected = replay.collect().await.expect("body");
            assert_eq!(
                collected
                    .trailers()
                    .and_then(|t| t.get("grpc-timeout"))
                    .map(|v| v.as_bytes()),
                Some(&b"1S"[..])
            );
            assert_eq!(collected.to_bytes(), Bytes::from_static(b"hello"));
        }
        assert!(body.replayable());
        let empty = RequestBody::Buffered {
            data: Bytes::new(),
            trailers: None,
        };
        assert!(empty.replay().expect("buffered").is_end_stream());
    }

    #[test]
    fn a_streamed_body_is_sent_once_and_never_mirrored() {
        let mut body = RequestBody::Streaming(None);
        assert!(!body.replayable(), "an attempt already took it");
        assert!(body.take().is_none());
        assert!(body.replay().is_none());
    }
}
