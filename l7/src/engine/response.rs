//! Phase 10, respond: the upstream response goes back with its hop-by-hop headers dropped,
//! the rule's response-header modifiers applied and a generated consistent-hash cookie set;
//! a `101 Switching Protocols` to an upgrade request keeps `Upgrade`/`Connection` and the
//! two connections are spliced from then on ([`crate::upgrade`]). Metrics
//! (`destination_service` = the backend used) and the access-log line (when on:
//! [`crate::telemetry::AccessLogSwitch`]; with the rule,
//! backend and attempts) are written when the response body ends, or the client goes away
//! ([`Observed`]), for forwarded and local replies alike.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, SizeHint};
use mesh_model::model::HeaderModifier;
use mesh_model::route::modify_headers;

use super::downstream::strip_hop_by_hop;
use super::reply::GRPC_STATUS;
use super::RequestContext;
use crate::balance::{Active, RequestGuard};
use crate::telemetry::{AccessLog, HttpMetrics, LabelInputs, ResponseFlag};
use crate::upgrade;
use crate::upstream::{ResponseBody, UpBody};

/// What the attempts phase got from upstream, and what the response phase needs with it.
pub struct Forwarded {
    pub response: Response<ResponseBody>,
    /// Retries ran out on a retriable response.
    pub exhausted: bool,
    /// A fault delay was injected.
    pub delayed: bool,
    /// The rule's and the backend's response-header modifiers, in order.
    pub response_mods: Vec<HeaderModifier>,
    /// A generated consistent-hash cookie to set.
    pub set_cookie: Option<String>,
    pub held: Held,
}

/// What a forwarded request holds until its response body ends.
pub struct Held {
    pub request: RequestGuard,
    pub endpoint: Option<Active>,
}

/// The response to a forwarded request.
pub fn respond(
    mut rq: RequestContext,
    fwd: Forwarded,
    metrics: &HttpMetrics,
) -> Response<Observed> {
    let Forwarded {
        mut response,
        exhausted,
        delayed,
        response_mods,
        set_cookie,
        held,
    } = fwd;
    let switched = match (rq.downstream_upgrade.take(), &rq.upgrade) {
        (Some(down), Some(_)) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let up = hyper::upgrade::on(&mut response);
            let what = format!(
                "{} -> {}",
                rq.log.src,
                rq.log.upstream.map_or_else(String::new, |a| a.to_string())
            );
            upgrade::splice(down, up, what);
            response.headers().get(header::UPGRADE).cloned()
        }
        _ => None,
    };
    let (mut rsp, body) = response.into_parts();
    edit_headers(&mut rsp.headers, switched, &response_mods, set_cookie);
    rsp.version = Version::default();
    let status = rsp.status.as_u16();
    let grpc_status = rsp
        .headers
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = Observed::new(
        body.boxed_unsync(),
        Finish {
            metrics: metrics.clone(),
            labels: rq.labels,
            code: status,
            flag: flag(exhausted, delayed),
            grpc_status,
            log: rq.log,
            req_bytes: rq.req_bytes,
            _held: Some(held),
        },
    );
    Response::from_parts(rsp, body)
}

/// The response headers as they go downstream: hop-by-hop ones dropped (but the
/// `Upgrade` of a protocol switch), the modifiers applied in order, the cookie appended.
fn edit_headers(
    headers: &mut HeaderMap,
    switched: Option<HeaderValue>,
    mods: &[HeaderModifier],
    set_cookie: Option<String>,
) {
    strip_hop_by_hop(headers, false);
    if let Some(u) = switched {
        upgrade::restore(headers, u);
    }
    for m in mods {
        modify_headers(headers, m);
    }
    if let Some(cookie) = set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        headers.append(header::SET_COOKIE, cookie);
    }
}

/// The flag of a forwarded response: `URX` when retries ran out on a retriable response,
/// else `DI` when a fault delay was injected.
fn flag(exhausted: bool, delayed: bool) -> Option<ResponseFlag> {
    if exhausted {
        Some(ResponseFlag::RetryLimitExceeded)
    } else if delayed {
        Some(ResponseFlag::DelayInjected)
    } else {
        None
    }
}

/// What is recorded once a response has been sent.
pub struct Finish {
    pub metrics: HttpMetrics,
    pub labels: LabelInputs,
    pub code: u16,
    pub flag: Option<ResponseFlag>,
    pub grpc_status: Option<String>,
    pub log: AccessLog,
    pub req_bytes: Arc<AtomicU64>,
    /// Counted as in flight (cluster and endpoint) until the response ends.
    pub _held: Option<Held>,
}

impl Finish {
    fn record(self, rsp_bytes: u64, downstream_gone: bool) {
        let flag = match self.flag {
            None if downstream_gone => Some(ResponseFlag::DownstreamClosed),
            f => f,
        };
        let req_bytes = self.req_bytes.load(Ordering::Relaxed);
        let ms = self.log.started.elapsed().as_secs_f64() * 1000.0;
        self.metrics.record(
            &self.labels,
            self.code,
            flag,
            self.grpc_status.as_deref(),
            ms,
            req_bytes,
            rsp_bytes,
        );
        self.log.emit(self.code, flag, req_bytes, rsp_bytes);
    }
}

/// The response body: passes frames through, counts bytes, picks up `grpc-status` from
/// trailers, and records metrics and the access log when it ends or is dropped.
pub struct Observed {
    inner: UpBody,
    finish: Option<Box<Finish>>,
    bytes: u64,
}

impl Observed {
    pub fn new(inner: UpBody, finish: Finish) -> Self {
        Observed {
            inner,
            finish: Some(Box::new(finish)),
            bytes: 0,
        }
    }

    fn done(&mut self, downstream_gone: bool) {
        if let Some(f) = self.finish.take() {
            f.record(self.bytes, downstream_gone);
        }
    }
}

impl Body for Observed {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        match &frame {
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    this.bytes += data.len() as u64;
                }
                if let (Some(trailers), Some(finish)) = (f.trailers_ref(), this.finish.as_mut()) {
                    if let Some(s) = trailers.get(GRPC_STATUS).and_then(|v| v.to_str().ok()) {
                        finish.grpc_status = Some(s.to_string());
                    }
                }
            }
            Some(Err(_)) => {
                if let Some(finish) = this.finish.as_mut() {
                    finish.flag.get_or_insert(ResponseFlag::UpstreamReset);
                }
                this.done(false);
            }
            None => this.done(false),
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        let gone = !self.inner.is_end_stream();
        self.done(gone);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::headers;
    use http::HeaderName;

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut names: Vec<String> = h.keys().map(|k| k.to_string()).collect();
        names.sort_unstable();
        names
    }

    #[test]
    fn response_headers_lose_hop_by_hop_ones_and_get_the_rules_modifiers_and_cookie() {
        let mut h = headers(&[
            ("connection", "close"),
            ("keep-alive", "timeout=5"),
            ("x-backend", "v1"),
            ("set-cookie", "a=1"),
        ]);
        let mods = [
            HeaderModifier {
                set: vec![(
                    HeaderName::from_static("x-route"),
                    HeaderValue::from_static("r1"),
                )],
                add: Vec::new(),
                remove: vec![HeaderName::from_static("x-backend")],
            },
            HeaderModifier {
                set: vec![(
                    HeaderName::from_static("x-route"),
                    HeaderValue::from_static("r2"),
                )],
                add: Vec::new(),
                remove: Vec::new(),
            },
        ];
        edit_headers(&mut h, None, &mods, Some("session=xyz".to_string()));
        assert_eq!(names(&h), ["set-cookie", "x-route"]);
        assert_eq!(
            h["x-route"], "r2",
            "the backend's modifier runs after the rule's"
        );
        let cookies: Vec<&str> = h
            .get_all("set-cookie")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        assert_eq!(cookies, ["a=1", "session=xyz"]);
    }

    #[test]
    fn a_protocol_switch_keeps_upgrade_and_connection() {
        let mut h = headers(&[("connection", "upgrade"), ("upgrade", "websocket")]);
        edit_headers(
            &mut h,
            Some(HeaderValue::from_static("websocket")),
            &[],
            None,
        );
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn retries_running_out_outrank_an_injected_delay() {
        assert_eq!(flag(true, true), Some(ResponseFlag::RetryLimitExceeded));
        assert_eq!(flag(false, true), Some(ResponseFlag::DelayInjected));
        assert_eq!(flag(false, false), None);
    }
}
