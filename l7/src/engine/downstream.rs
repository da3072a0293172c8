//! Phase 1, downstream: what the request is and what of it may go on. Method, authority
//! and path are read; hop-by-hop headers and client-supplied internal control headers
//! (`x-envoy-*`, `x-istio-*`, `x-mesh-*`, `x-forwarded-client-cert`) are dropped;
//! `x-request-id` is added when absent (`traceparent` and the other headers pass
//! unchanged); the path is normalised once ([`mesh_model::route::normalize_path`]; a path it
//! refuses is answered 400) and policy, routing and the upstream all see that path.

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::Uri;
use hyper::upgrade::OnUpgrade;
use mesh_model::model::Model;
use mesh_model::route::{normalize_path, NormalizedPath};

use super::{LocalReply, RequestContext};
use crate::protocol::Declared;
use crate::proxy::ConnCtx;
use crate::telemetry::{AccessLog, LabelInputs};
use crate::upgrade;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Headers that steer proxies or carry identity inside the mesh: a client never sets them
/// (RELIABILITY 26), whatever it sends is dropped before policy and routing. Envoy's
/// (`x-envoy-*`: retry/timeout overrides, upstream info), Istio's (`x-istio-*`), ours
/// (`x-mesh-*`, reserved for internal use) and the client-certificate header.
const INTERNAL_HEADER_PREFIXES: [&str; 3] = ["x-envoy-", "x-istio-", "x-mesh-"];
const INTERNAL_HEADERS: [&str; 1] = ["x-forwarded-client-cert"];

/// Headers that describe one hop, never forwarded (RFC 9110 §7.6.1).
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
];

/// The request's context from its head, as received on the tunnel `ctx`: headers cleaned,
/// request id set, labels and access-log line started. Never fails.
pub fn accept(
    mut parts: Parts,
    ctx: &ConnCtx,
    model: &Model,
    downstream_h2: bool,
    started: Instant,
) -> RequestContext {
    let authority =
        request_authority(&parts.uri, &parts.headers).unwrap_or_else(|| ctx.authority.to_string());
    let raw_target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    // A protocol switch keeps its two hop-by-hop headers (see `crate::upgrade`).
    let upgrade = upgrade::requested(&parts.headers, downstream_h2);
    let downstream_upgrade = upgrade
        .as_ref()
        .and_then(|_| parts.extensions.remove::<OnUpgrade>());
    strip_hop_by_hop(&mut parts.headers, !downstream_h2);
    if let Some(u) = &upgrade {
        upgrade::restore(&mut parts.headers, u.clone());
    }
    let stripped = strip_internal(&mut parts.headers);
    if stripped > 0 {
        tracing::debug!(stripped, "dropped client-supplied internal headers");
    }
    let request_id = request_id(&mut parts.headers);
    // A gRPC request gets its local replies as gRPC statuses (see `super::reply`).
    let grpc_request = is_grpc_request(&parts.headers);
    let grpc = ctx.declared == Declared::Grpc || grpc_request;
    let labels = LabelInputs {
        src_pod: model.workload_by_ip(ctx.remote_ip).cloned(),
        src_identity: Some(ctx.peer_identity.clone()),
        dst_pod: None,
        dst_identity: None,
        service: None,
        protocol: if grpc { "grpc" } else { "http" },
        mtls: true,
    };
    let log = AccessLog {
        started,
        src: ctx.peer,
        src_identity: Some(ctx.peer_identity.clone()),
        protocol: if downstream_h2 { "HTTP/2" } else { "HTTP/1.1" },
        method: parts.method.to_string(),
        authority: authority.clone(),
        path: raw_target.clone(),
        request_id,
        service: ctx.target.service_key().map(|k| k.to_string()),
        attempts: 0,
        route: None,
        backend: None,
        upstream: None,
        reason: None,
    };
    RequestContext {
        parts,
        authority,
        raw_target,
        grpc_request,
        downstream_h2,
        upgrade,
        downstream_upgrade,
        labels,
        log,
        req_bytes: Arc::default(),
        started,
    }
}

/// The one normalised path for policy, routing and the upstream (RELIABILITY 21); `400`
/// for a path [`normalize_path`] refuses.
pub fn normalize(rq: &RequestContext) -> Result<NormalizedPath, LocalReply> {
    normalize_path(&rq.raw_target).map_err(|e| LocalReply::bad_request(format!("path: {e}")))
}

/// The request's `x-request-id`, set to a new one when absent or empty.
fn request_id(headers: &mut HeaderMap) -> String {
    match headers.get(X_REQUEST_ID).and_then(|v| v.to_str().ok()) {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => {
            let id = new_request_id();
            if let Ok(v) = HeaderValue::from_str(&id) {
                headers.insert(X_REQUEST_ID, v);
            }
            id
        }
    }
}

/// `:authority` (HTTP/2, absolute-form) or `Host`.
fn request_authority(uri: &Uri, headers: &HeaderMap) -> Option<String> {
    if let Some(a) = uri.authority() {
        return Some(a.as_str().to_string());
    }
    headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .filter(|h| !h.is_empty())
        .map(str::to_string)
}

/// Drops hop-by-hop headers and those the `Connection` header names. `te: trailers` is
/// end-to-end in HTTP/2 (gRPC needs it) and kept unless `http1_only`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, http1_only: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    let trailers = headers
        .get(header::TE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("trailers"));
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
    if trailers && !http1_only {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Drops the client's copies of [`INTERNAL_HEADER_PREFIXES`] and [`INTERNAL_HEADERS`];
/// returns how many names were dropped.
fn strip_internal(headers: &mut HeaderMap) -> usize {
    let internal: Vec<HeaderName> = headers
        .keys()
        .filter(|name| {
            let name = name.as_str();
            INTERNAL_HEADERS.contains(&name)
                || INTERNAL_HEADER_PREFIXES.iter().any(|p| name.starts_with(p))
        })
        .cloned()
        .collect();
    for name in &internal {
        headers.remove(name);
    }
    internal.len()
}

/// A random version-4 UUID, as Envoy generates request ids.
pub fn new_request_id() -> String {
    let r = rand::random::<u128>();
    let r = (r & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    let hex = format!("{r:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

/// Whether a request is gRPC as Envoy decides it for local replies: `content-type`
/// `application/grpc`, or `application/grpc+<codec>` / `application/grpc;...` (not gRPC-Web).
pub fn is_grpc_request(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| {
            let ct = ct.trim();
            ct == "application/grpc"
                || ct.starts_with("application/grpc+")
                || ct.starts_with("application/grpc;")
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{conn, headers, model};
    use crate::telemetry::ResponseFlag;
    use http::Request;

    #[test]
    fn request_ids_are_version_4_uuids() {
        let id = new_request_id();
        let parts: Vec<&str> = id.split('-').collect();
        assert_eq!(
            parts.iter().map(|p| p.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(parts[2].starts_with('4'), "{id}");
        assert!(
            matches!(parts[3].as_bytes()[0], b'8' | b'9' | b'a' | b'b'),
            "{id}"
        );
        assert_ne!(new_request_id(), id);
    }

    #[test]
    fn hop_by_hop_headers_are_not_forwarded() {
        let mut h = headers(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
            ("x-request-id", "abc"),
        ]);
        let mut h2 = h.clone();
        strip_hop_by_hop(&mut h, true);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["traceparent", "x-request-id"]);
        strip_hop_by_hop(&mut h2, false);
        assert_eq!(h2.get("te").map(|v| v.as_bytes()), Some(&b"trailers"[..]));
    }

    #[test]
    fn internal_control_headers_from_the_client_are_dropped() {
        let mut h = headers(&[
            ("x-envoy-upstream-rq-timeout-ms", "1"),
            ("x-envoy-retry-on", "5xx"),
            ("x-envoy-original-path", "/admin"),
            ("x-istio-attributes", "x"),
            ("x-mesh-internal", "1"),
            (
                "x-forwarded-client-cert",
                "By=spiffe://cluster.local/ns/a/sa/b",
            ),
            ("x-envoyish", "kept"),
            ("x-request-id", "abc"),
        ]);
        assert_eq!(strip_internal(&mut h), 6);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["x-envoyish", "x-request-id"]);
    }

    #[test]
    fn grpc_requests_are_recognised_by_content_type_as_envoy_does() {
        let check = |ct: Option<&str>, expected: bool| {
            let mut h = HeaderMap::new();
            if let Some(ct) = ct {
                h.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_str(ct).expect("value"),
                );
            }
            assert_eq!(is_grpc_request(&h), expected, "{ct:?}");
        };
        check(Some("application/grpc"), true);
        check(Some("application/grpc+proto"), true);
        check(Some("application/grpc;charset=utf-8"), true);
        check(Some("application/grpc-web"), false);
        check(Some("application/grpcx"), false);
        check(Some("application/json"), false);
        check(None, false);
    }

    #[test]
    fn the_authority_comes_from_the_uri_else_host() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("web.shop:80"));
        let origin: Uri = "/a?b".parse().expect("uri");
        let absolute: Uri = "http://api.shop/a".parse().expect("uri");
        assert_eq!(
            request_authority(&origin, &h).as_deref(),
            Some("web.shop:80")
        );
        assert_eq!(
            request_authority(&absolute, &h).as_deref(),
            Some("api.shop")
        );
        assert_eq!(request_authority(&origin, &HeaderMap::new()), None);
    }

    fn accepted(req: Request<()>) -> RequestContext {
        let (parts, ()) = req.into_parts();
        accept(parts, &conn(), &model(&[]), false, Instant::now())
    }

    #[test]
    fn an_accepted_request_keeps_its_id_or_gets_one_and_loses_internal_headers() {
        let rq = accepted(
            Request::get("/a/../b?x=1")
                .header("x-request-id", "abc")
                .header("x-envoy-retry-on", "5xx")
                .header("connection", "close")
                .body(())
                .expect("request"),
        );
        assert_eq!(rq.log.request_id, "abc");
        assert_eq!(
            rq.authority, "10.96.0.1:80",
            "no Host: the CONNECT authority"
        );
        assert_eq!(rq.raw_target, "/a/../b?x=1");
        assert!(rq.parts.headers.get("x-envoy-retry-on").is_none());
        assert!(rq.parts.headers.get("connection").is_none());
        assert_eq!(rq.labels.protocol, "http");
        assert_eq!(
            normalize(&rq).map(|p| p.path_and_query()),
            Ok("/b?x=1".to_string())
        );

        let rq = accepted(
            Request::post("/svc/Method")
                .header("host", "web.app")
                .header("content-type", "application/grpc")
                .body(())
                .expect("request"),
        );
        assert_eq!(rq.authority, "web.app");
        assert!(rq.grpc_request);
        assert_eq!(rq.labels.protocol, "grpc");
        let id = rq.parts.headers.get(X_REQUEST_ID).expect("an id was added");
        assert_eq!(id.to_str().ok(), Some(rq.log.request_id.as_str()));
    }

    #[test]
    fn a_path_that_cannot_be_normalised_is_a_bad_request() {
        let mut rq = accepted(Request::get("/").body(()).expect("request"));
        rq.raw_target = "/a%2Fb".to_string();
        let reply = normalize(&rq).expect_err("refused");
        assert_eq!(reply.status, 400);
        assert_eq!(reply.flag, Some(ResponseFlag::BadRequest));
        assert!(reply.reason.starts_with("path: "), "{}", reply.reason);
    }
}
