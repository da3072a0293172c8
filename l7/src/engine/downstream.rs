//! Phase 1, downstream: what the request is and what of it may go on. Method, authority
//! and path are read; hop-by-hop headers and client-supplied internal control headers
//! (`x-envoy-*`, `x-istio-*`, `x-mesh-*`, `x-forwarded-client-cert`) are dropped;
//! `x-request-id` is added when absent (`traceparent` and the other headers pass
//! unchanged); the path is normalised once ([`mesh_model::route::normalize_path`]; a path it
//! refuses is answered 400) and policy, routing and the upstream all see that path.
//!
//! **One authority** (RELIABILITY 22): derived here once ([`derive_authority`]) and used by
//! policy, routing, telemetry and the upstream request, whose `Host` / `:authority` is
//! rewritten to it (the client's `Host` header is removed here). HTTP/1.1: the
//! absolute-form target's authority wins over `Host` (RFC 9112 §3.2.2), else `Host`;
//! HTTP/2: `:authority`, and a `host` header that disagrees with it is refused; neither →
//! the CONNECT authority. Several `Host` headers, or one that is not a valid authority
//! (userinfo included), are refused.
//!
//! **Nothing a backend could read differently** (RELIABILITY 21, 23, 25): a request is
//! refused `400 BADREQ` before policy ([`verdict`]) when its method is a case variant of a
//! standard method (`get`, `Post`: methods are case-sensitive tokens and policy compares
//! them exactly, a backend might not), it has several `content-length` headers (even
//! equal) or one that is not digits, `transfer-encoding` other than exactly one `chunked`,
//! or together with `content-length`, a header value with NUL, CR or LF, or a `\` in the
//! path. What hyper refuses itself with its own 400 before this phase (HTTP/1: obs-fold,
//! whitespace before the colon, CR/LF/NUL in a header, unequal or listed
//! `content-length`s, a final encoding that is not `chunked`, an unparsable chunk size;
//! HTTP/2: malformed header blocks, connection-specific headers) never reaches it. Two
//! forms hyper settles one way before this phase, so nothing ambiguous goes on: equal
//! duplicate `content-length`s become one (RFC 9110 §8.6), and with both
//! `transfer-encoding: chunked` and `content-length` the length is dropped, the body read as
//! chunked and the connection closed after the response (RFC 9112 §6.1); the checks here
//! still refuse both should they arrive (HTTP/2, another server stack). A `#fragment` is
//! cut off by the request-target parser (`http::Uri`) before this phase, so policy and
//! the upstream see the same path without it.
//!
//! **The client's address** (RELIABILITY 20): `source.ip` / `ipBlocks` is the address the
//! mesh carried (the tunnel's TCP peer, never a header); `remote.ip` / `remoteIpBlocks` is
//! that address too unless the proxy trusts `N` proxies in front of it
//! (`EngineConfig::num_trusted_proxies`, Istio's `numTrustedProxies`): then the `N`-th
//! address from the right of `x-forwarded-for` ([`remote_ip`], Envoy's
//! `xff_num_trusted_hops`).

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::Authority;
use http::{Method, Uri};
use hyper::upgrade::OnUpgrade;
use mesh_model::model::Model;
use mesh_model::route::{normalize_path, NormalizedPath};

use super::{LocalReply, RequestContext};
use crate::protocol::Declared;
use crate::proxy::ConnCtx;
use crate::telemetry::{AccessLog, LabelInputs};
use crate::upgrade;

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

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

/// Methods of RFC 9110 and RFC 5789: a case variant of one of them is refused.
const STANDARD_METHODS: [Method; 9] = [
    Method::GET,
    Method::HEAD,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::CONNECT,
    Method::OPTIONS,
    Method::TRACE,
    Method::PATCH,
];

/// The request's context from its head, as received on the tunnel `ctx`: headers cleaned,
/// request id set, labels and access-log line started; `trusted_proxies` is the number of
/// proxies in front of the mesh whose `x-forwarded-for` entries are trusted; `access_log`
/// whether its access-log line is written ([`crate::telemetry::AccessLogSwitch`]). Never fails:
/// a request that must be refused is marked ([`RequestContext::malformed`]) and refused by
/// [`verdict`], with its metrics and access log like any other.
pub fn accept(
    mut parts: Parts,
    ctx: &ConnCtx,
    model: &Model,
    downstream_h2: bool,
    started: Instant,
    trusted_proxies: u32,
    access_log: bool,
) -> RequestContext {
    let derived = framing_error(&parts, downstream_h2)
        .and_then(|()| derive_authority(&parts.uri, &parts.headers, downstream_h2));
    let (authority, malformed) = match derived {
        Ok(Some(a)) => (a, None),
        Ok(None) => (ctx.authority.to_string(), None),
        Err(reason) => (ctx.authority.to_string(), Some(reason)),
    };
    // The upstream request carries the one authority (`attempts::upstream_request`).
    parts.headers.remove(header::HOST);
    let remote_ip = remote_ip(&parts.headers, ctx.peer.ip(), trusted_proxies);
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
        src_pod: model.workload_by_ip_shared(ctx.peer.ip()).cloned(),
        src_identity: ctx.peer_identity.clone(),
        dst_pod: None,
        dst_identity: None,
        service: None,
        protocol: if grpc { "grpc" } else { "http" },
        mtls: ctx.peer_identity.is_some(),
    };
    let log = AccessLog {
        enabled: access_log,
        started,
        src: ctx.peer,
        src_identity: ctx.peer_identity.clone(),
        protocol: if downstream_h2 { "HTTP/2" } else { "HTTP/1.1" },
        // What only the access log line shows is copied only when it is written.
        method: logged(access_log, || parts.method.to_string()),
        authority: logged(access_log, || authority.clone()),
        path: logged(access_log, || raw_target.clone()),
        request_id,
        service: access_log
            .then(|| ctx.target.service_key().map(|k| k.to_string()))
            .flatten(),
        attempts: 0,
        route: None,
        backend: None,
        upstream: None,
        reason: None,
    };
    RequestContext {
        parts,
        authority,
        malformed,
        remote_ip,
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

/// `400` for a request [`accept`] found malformed (see the module docs), before anything
/// else looks at it.
pub fn verdict(rq: &RequestContext) -> Result<(), LocalReply> {
    match &rq.malformed {
        Some(reason) => {
            tracing::debug!(%reason, request_id = %rq.log.request_id, "malformed request refused");
            Err(LocalReply::bad_request(reason.clone()))
        }
        None => Ok(()),
    }
}

/// The one normalised path for policy, routing and the upstream (RELIABILITY 21); `400`
/// for a path [`normalize_path`] refuses, and for a `\` in the path (which backends
/// read as `/` or as a name character: neither is what policy would see).
pub fn normalize(rq: &RequestContext) -> Result<NormalizedPath, LocalReply> {
    let path = rq.raw_target.split('?').next().unwrap_or_default();
    if path.contains('\\') {
        return Err(LocalReply::bad_request("path: backslash"));
    }
    normalize_path(&rq.raw_target).map_err(|e| LocalReply::bad_request(format!("path: {e}")))
}

/// The request's one authority (see the module docs): `Ok(None)` when it names none (the
/// CONNECT authority applies), `Err` with the reason to refuse it.
pub fn derive_authority(
    uri: &Uri,
    headers: &HeaderMap,
    h2: bool,
) -> Result<Option<String>, String> {
    let mut hosts = headers.get_all(header::HOST).iter();
    let host = match (hosts.next(), hosts.next()) {
        (Some(_), Some(_)) => return Err("several host headers".to_string()),
        (Some(v), None) => Some(valid_authority(v.as_bytes()).map_err(|e| format!("host: {e}"))?),
        (None, _) => None,
    };
    let target = match uri.authority() {
        Some(a) => {
            Some(valid_authority(a.as_str().as_bytes()).map_err(|e| format!("authority: {e}"))?)
        }
        None => None,
    };
    match (target, host) {
        (Some(t), Some(h)) if h2 && !t.eq_ignore_ascii_case(&h) => {
            Err(format!(":authority {t:?} and host {h:?} disagree"))
        }
        // HTTP/1.1 absolute form: the target's authority, `Host` is ignored (RFC 9112 §3.2.2).
        (Some(t), _) => Ok(Some(t)),
        (None, Some(h)) if h.is_empty() => Ok(None),
        (None, h) => Ok(h),
    }
}

/// `raw` as an authority (`host[:port]`, no userinfo); empty is allowed (an HTTP/1.1
/// `Host` with no authority to name).
fn valid_authority(raw: &[u8]) -> Result<String, String> {
    if raw.is_empty() {
        return Ok(String::new());
    }
    let shown = String::from_utf8_lossy(raw);
    if raw.contains(&b'@') {
        return Err(format!("{shown:?} has userinfo"));
    }
    let a = Authority::try_from(raw).map_err(|e| format!("{shown:?}: {e}"))?;
    if a.host().is_empty() {
        return Err(format!("{shown:?} has no host"));
    }
    // `http` keeps a port it cannot read (`a.shop:port`, `a.shop:`); a backend might not.
    if a.as_str().len() > a.host().len() && a.port_u16().is_none() {
        return Err(format!("{shown:?} has a bad port"));
    }
    Ok(a.as_str().to_string())
}

/// Why the head `parts` could be framed or read differently by a backend than by us (see
/// the module docs), if it could.
pub fn framing_error(parts: &Parts, h2: bool) -> Result<(), String> {
    let method = parts.method.as_str();
    if let Some(m) = STANDARD_METHODS
        .iter()
        .find(|m| m.as_str() != method && m.as_str().eq_ignore_ascii_case(method))
    {
        return Err(format!("method {method:?} is a case variant of {m}"));
    }
    let headers = &parts.headers;
    let lengths = headers.get_all(header::CONTENT_LENGTH).iter().count();
    if lengths > 1 {
        return Err(format!("{lengths} content-length headers"));
    }
    if let Some(v) = headers.get(header::CONTENT_LENGTH) {
        if v.is_empty() || !v.as_bytes().iter().all(u8::is_ascii_digit) {
            return Err(format!("content-length {v:?} is not a number"));
        }
    }
    let encodings: Vec<&HeaderValue> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    if !encodings.is_empty() {
        if h2 {
            return Err("transfer-encoding in HTTP/2".to_string());
        }
        if encodings.len() > 1 || encodings[0].as_bytes() != b"chunked" {
            return Err(format!(
                "transfer-encoding {encodings:?} is not exactly chunked"
            ));
        }
        if lengths > 0 {
            return Err("transfer-encoding and content-length".to_string());
        }
    }
    if let Some((name, _)) = headers
        .iter()
        .find(|(_, v)| v.as_bytes().iter().any(|b| matches!(b, 0 | b'\r' | b'\n')))
    {
        return Err(format!("header {name}: NUL, CR or LF in the value"));
    }
    Ok(())
}

/// `make()` when the access log is on, else an empty string (which allocates nothing).
fn logged(access_log: bool, make: impl FnOnce() -> String) -> String {
    if access_log {
        make()
    } else {
        String::new()
    }
}

/// The client address for `remote.ip` / `remoteIpBlocks`: `source` (the address the mesh
/// carried) unless `trusted_proxies` is above 0; then the `trusted_proxies`-th address from
/// the right of `x-forwarded-for` (all its headers in order), else `source` when the list
/// is shorter or that entry is not an address (Envoy's `xff_num_trusted_hops`).
pub fn remote_ip(headers: &HeaderMap, source: IpAddr, trusted_proxies: u32) -> IpAddr {
    if trusted_proxies == 0 {
        return source;
    }
    let entries: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .collect();
    let from_right = trusted_proxies as usize;
    entries
        .len()
        .checked_sub(from_right)
        .and_then(|i| entries.get(i))
        .and_then(|e| e.parse::<IpAddr>().ok())
        .unwrap_or(source)
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
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let r = rand::random::<u128>();
    let r = (r & !(0xf << 76) | (0x4 << 76)) & !(0x3 << 62) | (0x2 << 62);
    // Written digit by digit into one allocation (no intermediate hex string).
    let mut id = String::with_capacity(36);
    for i in 0..32 {
        if matches!(i, 8 | 12 | 16 | 20) {
            id.push('-');
        }
        id.push(char::from(HEX[((r >> (124 - 4 * i)) & 0xf) as usize]));
    }
    id
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

    /// `(h2, target, host headers)` → the authority, `None` for the CONNECT authority, or
    /// `Err` with the start of the reason.
    fn check_authority(
        h2: bool,
        target: &str,
        hosts: &[&'static str],
        expected: Result<Option<&str>, &str>,
    ) {
        let uri: Uri = target.parse().expect("uri");
        let mut h = HeaderMap::new();
        for host in hosts {
            h.append(header::HOST, HeaderValue::from_static(host));
        }
        let got = derive_authority(&uri, &h, h2);
        outcome(
            got.as_ref().map(Option::as_deref),
            expected,
            &format!("{target} {hosts:?}"),
        );
    }

    /// `got` is `expected`, an error when its reason starts with the expected one.
    fn outcome<T: PartialEq + std::fmt::Debug>(
        got: Result<T, &String>,
        expected: Result<T, &str>,
        what: &str,
    ) {
        match (&got, &expected) {
            (Ok(a), Ok(e)) => assert_eq!(a, e, "{what}"),
            (Err(reason), Err(e)) => assert!(reason.starts_with(e), "{what}: {reason}"),
            _ => panic!("{what}: got {got:?}, expected {expected:?}"),
        }
    }

    #[test]
    fn one_authority_is_derived_from_the_target_host_or_the_tunnel() {
        // HTTP/1.1: origin form uses Host; absolute form wins over Host (RFC 9112 §3.2.2).
        check_authority(false, "/a?b", &["web.shop:80"], Ok(Some("web.shop:80")));
        check_authority(
            false,
            "http://api.shop/a",
            &["web.shop"],
            Ok(Some("api.shop")),
        );
        check_authority(
            false,
            "http://echo.demo.svc.cluster.local/abs",
            &["secret.internal"],
            Ok(Some("echo.demo.svc.cluster.local")),
        );
        check_authority(false, "/a", &[], Ok(None));
        check_authority(false, "/a", &[""], Ok(None));
        check_authority(
            false,
            "/a",
            &["Secret.Internal:8080"],
            Ok(Some("Secret.Internal:8080")),
        );
        check_authority(
            false,
            "/a",
            &["a.shop", "b.shop"],
            Err("several host headers"),
        );
        check_authority(
            false,
            "/a",
            &["a.shop", "a.shop"],
            Err("several host headers"),
        );
        check_authority(false, "/a", &["user@a.shop"], Err("host: "));
        check_authority(false, "/a", &["a shop"], Err("host: "));
        check_authority(false, "/a", &["a.shop/x"], Err("host: "));
        check_authority(false, "/a", &["a.shop:port"], Err("host: "));
        check_authority(false, "/a", &["a.shop:"], Err("host: "));
        check_authority(false, "/a", &["a.shop:99999"], Err("host: "));
        check_authority(false, "/a", &["[::1]:8080"], Ok(Some("[::1]:8080")));
        check_authority(false, "/a", &[":80"], Err("host: "));
        check_authority(false, "http://u@a.shop/", &[], Err("authority: "));
        // A Host that is not an authority is refused even when the target names one.
        check_authority(false, "http://a.shop/", &["b shop"], Err("host: "));
        // HTTP/2: :authority; a host header must agree (case-insensitively).
        check_authority(true, "http://web.shop/a", &[], Ok(Some("web.shop")));
        check_authority(
            true,
            "http://web.shop/a",
            &["WEB.shop"],
            Ok(Some("web.shop")),
        );
        check_authority(
            true,
            "http://web.shop/a",
            &["secret.internal"],
            Err(":authority "),
        );
        check_authority(
            true,
            "http://web.shop/a",
            &["web.shop:80"],
            Err(":authority "),
        );
        check_authority(true, "/a", &["web.shop"], Ok(Some("web.shop")));
        check_authority(true, "/a", &[], Ok(None));
    }

    /// `req` (HTTP/2 when `h2`) → `Ok` or the start of the reason it is refused.
    fn check_framing(h2: bool, req: http::request::Builder, expected: Result<(), &str>) {
        let (parts, ()) = req.body(()).expect("request").into_parts();
        let what = format!("{} {:?}", parts.method, parts.headers);
        outcome(framing_error(&parts, h2).as_ref().copied(), expected, &what);
    }

    #[test]
    fn heads_a_backend_could_read_differently_are_refused() {
        let req = |m: &str| Request::builder().method(m).uri("/");
        for m in ["GET", "POST", "PURGE", "purge", "M-SEARCH", "PROPFIND"] {
            check_framing(false, req(m), Ok(()));
            check_framing(true, req(m), Ok(()));
        }
        for m in [
            "get", "Get", "post", "Post", "dElEtE", "options", "patch", "connect",
        ] {
            check_framing(false, req(m), Err("method "));
            check_framing(true, req(m), Err("method "));
        }
        let post = || req("POST");
        check_framing(false, post().header("content-length", "5"), Ok(()));
        check_framing(
            false,
            post()
                .header("content-length", "5")
                .header("content-length", "5"),
            Err("2 content-length headers"),
        );
        check_framing(
            false,
            post().header("content-length", "5, 5"),
            Err("content-length "),
        );
        check_framing(
            false,
            post().header("content-length", "+5"),
            Err("content-length "),
        );
        check_framing(
            false,
            post().header("content-length", ""),
            Err("content-length "),
        );
        check_framing(false, post().header("transfer-encoding", "chunked"), Ok(()));
        check_framing(
            false,
            post()
                .header("transfer-encoding", "chunked")
                .header("content-length", "5"),
            Err("transfer-encoding and content-length"),
        );
        for te in [
            "gzip, chunked",
            "Chunked",
            "chunked, chunked",
            "identity",
            " chunked",
        ] {
            check_framing(
                false,
                post().header("transfer-encoding", te),
                Err("transfer-encoding "),
            );
        }
        check_framing(
            false,
            post()
                .header("transfer-encoding", "chunked")
                .header("transfer-encoding", "chunked"),
            Err("transfer-encoding "),
        );
        check_framing(
            true,
            post().header("transfer-encoding", "chunked"),
            Err("transfer-encoding in HTTP/2"),
        );
        check_framing(true, post().header("content-length", "0"), Ok(()));
        // `http`'s header values cannot hold CR, LF or NUL (hyper and h2 refuse them before
        // this phase); the check stays as a second line. A tab is a valid value byte.
        let mut parts = post().body(()).expect("request").into_parts().0;
        parts.headers.insert(
            "x-a",
            HeaderValue::from_maybe_shared(bytes::Bytes::from_static(b"a\tb"))
                .expect("tab is allowed"),
        );
        assert_eq!(framing_error(&parts, false), Ok(()));
        assert!(HeaderValue::from_bytes(b"a\r\nb").is_err());
        assert!(HeaderValue::from_bytes(b"a\0b").is_err());
    }

    #[test]
    fn the_remote_address_is_the_meshs_unless_proxies_in_front_are_trusted() {
        let source: IpAddr = "10.0.0.9".parse().expect("ip");
        let check = |xff: &[&'static str], trusted: u32, expected: &str| {
            let h = headers(
                &xff.iter()
                    .map(|v| ("x-forwarded-for", *v))
                    .collect::<Vec<_>>(),
            );
            assert_eq!(
                remote_ip(&h, source, trusted),
                expected.parse::<IpAddr>().expect("ip"),
                "{xff:?} trusting {trusted}"
            );
        };
        // No trusted proxy: whatever the client wrote is ignored.
        check(&["203.0.113.7"], 0, "10.0.0.9");
        check(&[], 0, "10.0.0.9");
        // One: the rightmost entry (what the trusted proxy appended).
        check(&["192.0.2.10, 203.0.113.1"], 1, "203.0.113.1");
        // Two: the second from the right, across repeated headers.
        check(&["192.0.2.10", "203.0.113.1"], 2, "192.0.2.10");
        check(
            &["192.0.2.10,203.0.113.1", "198.51.100.4"],
            2,
            "203.0.113.1",
        );
        // Fewer entries than trusted proxies, or a bad entry: the mesh's address.
        check(&["192.0.2.10"], 2, "10.0.0.9");
        check(&[], 1, "10.0.0.9");
        check(&["unknown"], 1, "10.0.0.9");
        check(&["2001:db8::1"], 1, "2001:db8::1");
    }

    fn accepted(req: Request<()>) -> RequestContext {
        let (parts, ()) = req.into_parts();
        accept(parts, &conn(), &model(&[]), false, Instant::now(), 0, true)
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
    fn the_one_authority_replaces_the_clients_host_and_a_malformed_head_is_marked() {
        let rq = accepted(
            Request::get("http://web.app/abs")
                .header("host", "secret.internal")
                .body(())
                .expect("request"),
        );
        assert_eq!(rq.authority, "web.app");
        assert_eq!(rq.log.authority, "web.app");
        assert!(rq.parts.headers.get("host").is_none(), "never forwarded");
        assert_eq!(verdict(&rq), Ok(()));
        assert_eq!(rq.remote_ip, conn().peer.ip());

        let rq = accepted(
            Request::get("/")
                .header("host", "a.app")
                .header("host", "b.app")
                .body(())
                .expect("request"),
        );
        assert_eq!(rq.authority, "10.96.0.1:80", "the tunnel's, for the log");
        let reply = verdict(&rq).expect_err("refused");
        assert_eq!(
            (reply.status.as_u16(), reply.flag),
            (400, Some(ResponseFlag::BadRequest))
        );
        assert_eq!(reply.reason, "several host headers");
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

#[cfg(test)]
mod prop_tests;
