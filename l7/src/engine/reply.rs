//! Replies the proxy makes itself, classified and rendered in one place.
//!
//! Every phase that answers a request returns a [`LocalReply`]: its status, its
//! [`ResponseFlag`] (where the error came from: JWT, policy, routing, upstream...), the text,
//! and its [`Shape`]. [`LocalReply::render`] turns it into the response, with the metrics and
//! the access-log line every response has. A gRPC request (`content-type:
//! application/grpc[+codec|;...]`) gets these replies as Envoy sends them to gRPC clients:
//! HTTP 200, trailers-only, `grpc-status` by [`grpc_status_for`] (403 → 7 PERMISSION_DENIED,
//! 401 → 16 UNAUTHENTICATED, 404 → 12 UNIMPLEMENTED, 503/504 → 14 UNAVAILABLE, 400 → 13
//! INTERNAL, `NC` → 14) and `grpc-message` the text; `response_code` is the 200 sent,
//! `grpc_response_status` that status.

use std::convert::Infallible;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use mesh_model::model::HeaderModifier;
use mesh_model::route::modify_headers;

use super::response::{Finish, Observed};
use super::RequestContext;
use crate::telemetry::{HttpMetrics, ResponseFlag};

pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

/// The body of a `503 UO` (connection pool overflow), as Envoy writes it.
pub const OVERFLOW_BODY: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";
/// The body of a `503 UC` (the upstream reset before answering).
pub const RESET_BODY: &str = "upstream connect error or disconnect/reset before headers";

/// How a local reply is sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// gRPC-shaped (trailers-only) for a gRPC request, else `text/plain`.
    AsClient,
    /// As written, also to a gRPC client (a VirtualService `directResponse`).
    Plain,
    /// HTTP 200 with this `grpc-status` and the text as `grpc-message` (a fault abort with a
    /// gRPC status); recorded with `response_code` 200 and no `grpc_response_status`.
    Grpc(u32),
}

/// A reply the proxy makes itself instead of forwarding the request.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalReply {
    pub status: StatusCode,
    /// Why: `None` for replies a rule asked for (redirects, direct responses).
    pub flag: Option<ResponseFlag>,
    pub body: Bytes,
    pub shape: Shape,
    /// For the access log and the debug log.
    pub reason: String,
    /// Set on the rendered reply (`location`, `www-authenticate`).
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// The rule's response-header modifier, applied last (direct responses).
    pub modifier: Option<Box<HeaderModifier>>,
}

// === impl LocalReply ===

impl LocalReply {
    pub fn new(
        status: StatusCode,
        body: &'static str,
        flag: Option<ResponseFlag>,
        reason: impl Into<String>,
    ) -> LocalReply {
        LocalReply {
            status,
            flag,
            body: Bytes::from_static(body.as_bytes()),
            shape: Shape::AsClient,
            reason: reason.into(),
            headers: Vec::new(),
            modifier: None,
        }
    }

    /// `400 bad request` (`BADREQ`): the request cannot be forwarded as it is.
    pub fn bad_request(reason: impl Into<String>) -> LocalReply {
        Self::new(
            StatusCode::BAD_REQUEST,
            "bad request",
            Some(ResponseFlag::BadRequest),
            reason,
        )
    }

    /// `500 no backend` (`NC`): the rule has no usable backend.
    pub fn no_backend(reason: impl Into<String>) -> LocalReply {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "no backend",
            Some(ResponseFlag::NoCluster),
            reason,
        )
    }

    /// `503 no healthy upstream` with `flag` (`UH`, or `NC` for an unknown subset).
    pub fn unavailable(flag: ResponseFlag, reason: impl Into<String>) -> LocalReply {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream",
            Some(flag),
            reason,
        )
    }

    /// `503` (`UO`): a DestinationRule connection-pool limit.
    pub fn overflow(reason: impl Into<String>) -> LocalReply {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            OVERFLOW_BODY,
            Some(ResponseFlag::UpstreamOverflow),
            reason,
        )
    }

    /// `504 upstream request timeout` (`UT`).
    pub fn timeout(reason: impl Into<String>) -> LocalReply {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "upstream request timeout",
            Some(ResponseFlag::UpstreamTimeout),
            reason,
        )
    }

    /// `503` (`UC`): the upstream reset or closed before answering.
    pub fn reset(reason: impl Into<String>) -> LocalReply {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            RESET_BODY,
            Some(ResponseFlag::UpstreamReset),
            reason,
        )
    }

    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> LocalReply {
        self.headers.push((name, value));
        self
    }

    /// The response, with the metrics and access log of the request `rq` (recorded when
    /// its body has been sent).
    pub fn render(self, rq: RequestContext, metrics: &HttpMetrics) -> Response<Observed> {
        let LocalReply {
            status,
            flag,
            body,
            shape,
            reason,
            headers,
            modifier,
        } = self;
        let grpc = match shape {
            Shape::AsClient if rq.grpc_request => Some(u32::from(grpc_status_for(status, flag))),
            Shape::AsClient | Shape::Plain => None,
            Shape::Grpc(code) => Some(code),
        };
        let flag_name = flag.map_or("-", ResponseFlag::as_str);
        tracing::debug!(%status, grpc_status = ?grpc, flag = flag_name, %reason, "local reply");
        let text = String::from_utf8_lossy(&body).into_owned();
        let content = if grpc.is_some() { Bytes::new() } else { body };
        let full = Full::new(content)
            .map_err(|never: Infallible| match never {})
            .boxed_unsync();
        let sent = if grpc.is_some() {
            StatusCode::OK
        } else {
            status
        };
        // A fault's own gRPC status is not a local reply's: not recorded as one.
        let recorded = match shape {
            Shape::Grpc(_) => None,
            _ => grpc.map(|s| s.to_string()),
        };
        let log = crate::telemetry::AccessLog {
            reason: Some(reason),
            ..rq.log
        };
        let body = Observed::new(
            full,
            Finish {
                metrics: metrics.clone(),
                labels: rq.labels,
                code: sent.as_u16(),
                flag,
                grpc_status: recorded,
                log,
                req_bytes: rq.req_bytes,
                _held: None,
            },
        );
        let mut rsp = Response::new(body);
        *rsp.status_mut() = sent;
        let h = rsp.headers_mut();
        match grpc {
            Some(code) => {
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/grpc"),
                );
                h.insert(GRPC_STATUS, HeaderValue::from(code));
                if let Ok(v) = HeaderValue::from_str(&grpc_message(&text)) {
                    if !v.is_empty() {
                        h.insert(GRPC_MESSAGE, v);
                    }
                }
            }
            None => {
                h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
            }
        }
        for (name, value) in headers {
            h.insert(name, value);
        }
        if let Some(m) = modifier {
            modify_headers(h, &m);
        }
        rsp
    }
}

/// The gRPC status of a local reply that would have had HTTP `status`: Envoy's mapping (the
/// one in gRPC's `http-grpc-status-mapping.md`): 400 → INTERNAL (13), 401 → UNAUTHENTICATED
/// (16), 403 → PERMISSION_DENIED (7), 404 → UNIMPLEMENTED (12), 429/502/503/504 →
/// UNAVAILABLE (14), anything else UNKNOWN (2); except that no usable backend (`NC`) is
/// UNAVAILABLE, as the GRPCRoute spec requires for invalid `backendRefs`.
pub fn grpc_status_for(status: StatusCode, flag: Option<ResponseFlag>) -> u16 {
    if flag == Some(ResponseFlag::NoCluster) {
        return 14;
    }
    match status.as_u16() {
        400 => 13,
        401 => 16,
        403 => 7,
        404 => 12,
        429 | 502 | 503 | 504 => 14,
        _ => 2,
    }
}

/// `grpc-message`: percent-encoded outside printable ASCII, and `%` itself (gRPC's HTTP/2
/// protocol spec).
fn grpc_message(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{body_of, request_context};

    #[test]
    fn local_replies_map_to_grpc_statuses_as_envoy_maps_them() {
        let check = |status: u16, flag: Option<ResponseFlag>, expected: u16| {
            let s = StatusCode::from_u16(status).expect("status");
            assert_eq!(grpc_status_for(s, flag), expected, "{status} {flag:?}");
        };
        check(403, Some(ResponseFlag::Deny), 7);
        check(401, Some(ResponseFlag::JwtDenied), 16);
        check(404, Some(ResponseFlag::NoRoute), 12);
        check(503, Some(ResponseFlag::NoHealthyUpstream), 14);
        check(503, Some(ResponseFlag::UpstreamFailure), 14);
        check(503, Some(ResponseFlag::UpstreamReset), 14);
        check(504, Some(ResponseFlag::UpstreamTimeout), 14);
        check(400, Some(ResponseFlag::BadRequest), 13);
        check(500, Some(ResponseFlag::NoCluster), 14);
        check(429, None, 14);
        check(502, None, 14);
        check(302, None, 2);
        check(500, None, 2);
    }

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(grpc_message("RBAC: access denied"), "RBAC: access denied");
        assert_eq!(grpc_message("100% done"), "100%25 done");
        assert_eq!(grpc_message("caf\u{e9}\n"), "caf%C3%A9%0A");
    }

    #[tokio::test]
    async fn a_reply_is_plain_text_to_http_clients_and_trailers_only_to_grpc_ones() {
        let (_registry, metrics) = HttpMetrics::new();
        let reply = || {
            LocalReply::unavailable(ResponseFlag::NoHealthyUpstream, "no endpoint")
                .with_header(header::RETRY_AFTER, HeaderValue::from_static("1"))
        };
        let rsp = reply().render(request_context(false), &metrics);
        assert_eq!(rsp.status(), 503);
        assert_eq!(rsp.headers()["content-type"], "text/plain");
        assert_eq!(rsp.headers()["retry-after"], "1");
        assert_eq!(body_of(rsp).await, "no healthy upstream");

        let rsp = reply().render(request_context(true), &metrics);
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.headers()["content-type"], "application/grpc");
        assert_eq!(rsp.headers()["grpc-status"], "14");
        assert_eq!(rsp.headers()["grpc-message"], "no healthy upstream");
        assert_eq!(rsp.headers()["retry-after"], "1");
        assert_eq!(body_of(rsp).await, "");
    }

    #[tokio::test]
    async fn a_plain_reply_is_sent_as_written_even_to_a_grpc_client() {
        let (_registry, metrics) = HttpMetrics::new();
        let mut reply = LocalReply::new(StatusCode::IM_A_TEAPOT, "short and stout", None, "r");
        reply.shape = Shape::Plain;
        reply.modifier = Some(Box::new(HeaderModifier {
            set: vec![(
                HeaderName::from_static("content-type"),
                HeaderValue::from_static("text/teapot"),
            )],
            add: Vec::new(),
            remove: Vec::new(),
        }));
        let rsp = reply.render(request_context(true), &metrics);
        assert_eq!(rsp.status(), 418);
        assert_eq!(rsp.headers()["content-type"], "text/teapot");
        assert!(rsp.headers().get("grpc-status").is_none());
        assert_eq!(body_of(rsp).await, "short and stout");
    }
}
