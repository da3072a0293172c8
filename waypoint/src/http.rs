//! HTTP on a tunnel: hyper serves HTTP/1.1 or HTTP/2 on the decrypted CONNECT stream, and
//! every request passes the same fixed sequence of phases (as pingora structures a proxy):
//!
//! 1. **downstream**: read method, authority and path; drop hop-by-hop headers and
//!    client-supplied internal control headers (`x-envoy-*`, `x-istio-*`, `x-mesh-*`,
//!    `x-forwarded-client-cert`); add `x-request-id` when absent (`traceparent` and the other
//!    headers pass unchanged); normalise the path once ([`mesh::route::normalize_path`]; a
//!    path it refuses is answered 400) — policy, routing and the upstream all see that path;
//! 2. **authenticate**: the RequestAuthentication rules for this waypoint and the
//!    destination Service ([`mesh::jwt::authn`]): client copies of their
//!    `outputPayloadToHeader` headers dropped; no token → unauthenticated; an invalid token
//!    (or one whose `jwksUri` keys are not available: fail closed) → `401 Jwt verification
//!    fails` (flag `JWT`, `waypoint_jwt_rejected_total{reason}`); a valid one gives
//!    `request.auth.*` to the next phase, its header removed unless `forwardOriginalToken`,
//!    its payload written to `outputPayloadToHeader`;
//! 3. **authorize**: L7 AuthorizationPolicy ([`mesh::policy::l7::authorize_l7`]) for this
//!    waypoint and the destination Service; a denial is answered `403 RBAC: access denied`;
//! 4. **route**: the HTTPRoute or GRPCRoute rule for the request ([`mesh::route::route`]):
//!    none attached → the Service itself; attached but no rule matches → 404; a
//!    `RequestRedirect` is answered here (301/302 + `Location`, nothing sent upstream);
//!    otherwise a backend picked by weight for this request, request-header modifiers and
//!    `URLRewrite` applied, response-header modifiers and timeouts kept for later;
//! 5. **select**: the backend's ready endpoints from the current model, round robin per
//!    request (so one long-lived HTTP/2 client is spread over all endpoints);
//! 6. **connect**: a pooled upstream connection to the endpoint, the next endpoint when one
//!    cannot be reached (the request has not been sent, so this is always safe);
//! 7. **upstream**: send the request (HTTP/1.1 or HTTP/2 as the backend port declares),
//!    within `timeouts.backendRequest` for the attempt and `timeouts.request` from the
//!    request's arrival (both until the response headers);
//! 8. **respond**: hop-by-hop headers dropped, response-header modifiers applied; metrics
//!    (`destination_service` = the backend used) and the access-log line (with the rule and
//!    backend) are written when the response body ends (or the client goes away).
//!
//! Errors are classified by where they come from ([`ResponseFlag`]): JWT (`JWT`, 401),
//! policy (`DENY`, 403),
//! no matching rule (`NR`, 404), no usable backend (`NC`, 500), no endpoint (`UH`, 503),
//! connect failure (`UF`, 503), upstream reset before a response (`UC`, 503), timeout (`UT`,
//! 504), a request that cannot be forwarded (`BADREQ`, 400), downstream gone (`DC`).
//! A gRPC request (`content-type: application/grpc[+codec|;...]`) gets these local replies as
//! Envoy sends them to gRPC clients (`local_reply`): HTTP 200, trailers-only, `grpc-status`
//! by [`grpc_status_for`] (403 → 7 PERMISSION_DENIED, 401 → 16 UNAUTHENTICATED, 404 → 12
//! UNIMPLEMENTED, 503/504 → 14 UNAVAILABLE, 400 → 13 INTERNAL, `NC` → 14) and `grpc-message`
//! the text; `response_code` is the 200 sent, `grpc_response_status` that status.

use std::convert::Infallible;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh::jwt::authn::{authenticate, output_headers, rules_for_waypoint, Outcome};
use mesh::jwt::{JwtError, VERIFICATION_FAILED_BODY};
use mesh::model::{HeaderModifier, JwksSource, Timeouts};
use mesh::policy::l7::{authorize_l7, L7Request, DENIED_BODY};
use mesh::policy::Decision;
use mesh::route::{
    self, modify_headers, modify_path, normalize_path, pick_backend, redirect_location,
    NormalizedPath, RouteRequest, Routing, Selected,
};

use crate::destination::Target;
use crate::inbound::rr_key;
use crate::io::Io;
use crate::protocol::Declared;
use crate::proxy::{upstream_proto, ConnCtx, Inputs};
use crate::telemetry::{AccessLog, HttpMetrics, LabelInputs, ResponseFlag};
use crate::upstream::{Endpoint, UpBody, UpstreamProto};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
/// Set on a request whose path a `URLRewrite` changed: the path before (as Envoy does).
pub const X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");

/// Headers that steer proxies or carry identity inside the mesh: a client never sets them
/// (RELIABILITY 26), whatever it sends is dropped before policy and routing. Envoy's
/// (`x-envoy-*`: retry/timeout overrides, upstream info), Istio's (`x-istio-*`), ours
/// (`x-mesh-*`, reserved for internal use) and the client-certificate header.
const INTERNAL_HEADER_PREFIXES: [&str; 3] = ["x-envoy-", "x-istio-", "x-mesh-"];
const INTERNAL_HEADERS: [&str; 1] = ["x-forwarded-client-cert"];

/// Endpoints tried for one request before it fails with `UF`.
pub const MAX_CONNECT_ATTEMPTS: usize = 3;
/// Largest request head accepted (HTTP/1.1 buffer, HTTP/2 header list).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Concurrent requests on one downstream HTTP/2 connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// Rapid-reset bound (CVE-2023-44487): streams reset before we answered.
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

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

/// Serves HTTP on one tunnel until the client closes it or the waypoint drains.
pub async fn serve<I: Io>(io: I, h2: bool, ctx: Arc<ConnCtx>, inputs: Arc<Inputs>) {
    let drain = inputs.drain.clone();
    let svc = service_fn(move |req| {
        let (ctx, inputs) = (ctx.clone(), inputs.clone());
        async move { Ok::<_, Infallible>(handle(req, &ctx, &inputs, h2).await) }
    });
    let io = TokioIo::new(io);
    let result = if h2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
            .initial_stream_window_size(mesh::hbone::STREAM_WINDOW)
            .initial_connection_window_size(mesh::hbone::CONNECTION_WINDOW);
        let conn = builder.serve_connection(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = drain.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .max_buf_size(MAX_HEADER_BYTES.max(8192));
        let conn = builder.serve_connection(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = drain.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, h2, "downstream http connection ended with an error");
    }
}

/// One request through the phases; always answers.
async fn handle(
    req: Request<Incoming>,
    ctx: &ConnCtx,
    inputs: &Arc<Inputs>,
    downstream_h2: bool,
) -> Response<Observed> {
    let started = Instant::now();
    let model = inputs.model.load_full();

    // 1. downstream
    let (mut parts, body) = req.into_parts();
    let authority =
        request_authority(&parts.uri, &parts.headers).unwrap_or_else(|| ctx.authority.to_string());
    let raw_target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "/".to_string());
    strip_hop_by_hop(&mut parts.headers, !downstream_h2);
    let stripped = strip_internal(&mut parts.headers);
    if stripped > 0 {
        tracing::debug!(stripped, "dropped client-supplied internal headers");
    }
    let request_id = match parts
        .headers
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
    {
        Some(id) if !id.is_empty() => id.to_string(),
        _ => {
            let id = new_request_id();
            if let Ok(v) = HeaderValue::from_str(&id) {
                parts.headers.insert(X_REQUEST_ID, v);
            }
            id
        }
    };
    let resolved = ctx.target.lookup(&model, &inputs.cfg.trust_domain);
    // A gRPC request gets its local replies as gRPC statuses (see `local_reply`).
    let grpc_request = is_grpc_request(&parts.headers);
    let grpc = ctx.declared == Declared::Grpc || grpc_request;
    let mut labels = LabelInputs {
        src_pod: model.workload_by_ip(ctx.remote_ip).cloned(),
        src_identity: Some(ctx.peer_identity.clone()),
        dst_pod: None,
        dst_identity: None,
        service: resolved.as_ref().and_then(|r| r.service).cloned(),
        protocol: if grpc { "grpc" } else { "http" },
        mtls: true,
    };
    let mut log = AccessLog {
        started,
        src: ctx.peer,
        src_identity: Some(ctx.peer_identity.clone()),
        protocol: if downstream_h2 { "HTTP/2" } else { "HTTP/1.1" },
        method: parts.method.to_string(),
        authority: authority.clone(),
        path: raw_target.clone(),
        request_id,
        service: ctx.target.service_key().map(|k| k.to_string()),
        route: None,
        backend: None,
        upstream: None,
        reason: None,
    };
    let req_bytes = Arc::new(AtomicU64::new(0));
    let local = |status: StatusCode,
                 body: &'static str,
                 flag: Option<ResponseFlag>,
                 labels,
                 log: AccessLog,
                 reason: String| {
        let log = AccessLog {
            reason: Some(reason),
            ..log
        };
        local_reply(
            status,
            body,
            flag,
            grpc_request,
            labels,
            log,
            &inputs.http_metrics,
            &req_bytes,
        )
    };
    // One normalised path for policy, routing and the upstream (RELIABILITY 21).
    let normalized = match normalize_path(&raw_target) {
        Ok(n) => n,
        Err(e) => {
            return local(
                StatusCode::BAD_REQUEST,
                "bad request",
                Some(ResponseFlag::BadRequest),
                labels,
                log,
                format!("path: {e}"),
            )
        }
    };
    let path = normalized.path_and_query();

    // 2. authenticate: RequestAuthentication (JWT) for this waypoint and destination.
    let jwt_rules = rules_for_waypoint(&model, &inputs.cfg.gateway, ctx.target.service_key());
    for name in output_headers(&jwt_rules) {
        // Only the waypoint writes these (RELIABILITY 26).
        parts.headers.remove(name);
    }
    let outcome = if jwt_rules.is_empty() {
        Outcome::Anonymous
    } else {
        authenticate(
            &jwt_rules,
            &parts.headers,
            normalized.query.as_deref(),
            unix_now(),
            |rule| match &rule.jwks {
                JwksSource::Inline { keys, .. } => Some(keys.clone()),
                JwksSource::Uri(uri) => inputs.jwks.keys(uri),
            },
        )
    };
    let request_auth = match outcome {
        Outcome::Anonymous => None,
        Outcome::Authenticated(a) => {
            for name in &a.remove_headers {
                parts.headers.remove(name.as_str());
            }
            for (name, value) in &a.output_headers {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    parts.headers.insert(n, v);
                }
            }
            Some(a.auth)
        }
        Outcome::Denied(d) => {
            if let (JwtError::UnknownKid, Some(uri)) = (&d.error, &d.jwks_uri) {
                inputs.jwks.request_refresh(uri);
            }
            inputs.http_metrics.jwt_rejected(d.error.reason());
            tracing::info!(request_id = %log.request_id, reason = d.error.reason(), error = %d.error, "jwt rejected");
            let mut rsp = local(
                StatusCode::UNAUTHORIZED,
                VERIFICATION_FAILED_BODY,
                Some(ResponseFlag::JwtDenied),
                labels,
                log,
                format!("jwt: {}", d.error),
            );
            rsp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\""),
            );
            return rsp;
        }
    };

    // 3. authorize
    let l7 = L7Request {
        src_identity: Some(&ctx.peer_identity),
        src_ip: ctx.peer.ip(),
        remote_ip: ctx.remote_ip,
        dst_ip: ctx.authority.ip(),
        dst_port: ctx.authority.port(),
        host: &authority,
        method: parts.method.as_str(),
        path: &path,
        headers: &parts.headers,
        auth: request_auth.as_ref(),
    };
    let eval = authorize_l7(&model, &inputs.cfg.gateway, ctx.target.service_key(), &l7);
    for policy in &eval.audited {
        tracing::info!(%policy, request_id = %log.request_id, "audit policy matched");
    }
    for policy in &eval.dry_run_denied {
        tracing::info!(%policy, request_id = %log.request_id, "dry-run policy would deny");
    }
    if let Decision::Deny { policy } = eval.decision {
        let reason = policy.map_or_else(
            || "no ALLOW policy matched".to_string(),
            |p| format!("denied by {p}"),
        );
        return local(
            StatusCode::FORBIDDEN,
            DENIED_BODY,
            Some(ResponseFlag::Deny),
            labels,
            log,
            reason,
        );
    }

    // 4. route: which backend Service, with which filters and timeouts.
    let mut backend = ctx.target.clone();
    let mut upstream_path = path.clone();
    let mut upstream_authority = authority.clone();
    let mut response_mods: Vec<HeaderModifier> = Vec::new();
    let mut timeouts = Timeouts::default();
    if let Some((svc, port)) = resolved.as_ref().and_then(|r| r.service.zip(r.port)) {
        let request = RouteRequest {
            host: &authority,
            method: parts.method.as_str(),
            path: &normalized.path,
            query: normalized.query.as_deref(),
            headers: &parts.headers,
        };
        match route::route(&model, &inputs.cfg.gateway, svc, port, &request) {
            Routing::Default => {}
            Routing::NoMatch => {
                return local(
                    StatusCode::NOT_FOUND,
                    "route not found",
                    Some(ResponseFlag::NoRoute),
                    labels,
                    log,
                    "no HTTPRoute rule matches".to_string(),
                )
            }
            Routing::Matched(sel) => {
                let rule = sel.rule;
                log.route = Some(rule_label(&sel));
                if let Some(redirect) = &rule.filters.redirect {
                    let location = redirect_location(
                        redirect,
                        &authority,
                        ctx.authority.port(),
                        &normalized.path,
                        normalized.query.as_deref(),
                        sel.matched,
                    );
                    let status =
                        StatusCode::from_u16(redirect.status_code).unwrap_or(StatusCode::FOUND);
                    let reason = format!("redirect to {location}");
                    let mut rsp = local(status, "", None, labels, log, reason);
                    if let Ok(v) = HeaderValue::from_str(&location) {
                        rsp.headers_mut().insert(header::LOCATION, v);
                    }
                    return rsp;
                }
                let Some(chosen) = pick_backend(&rule.backends, rand::random()) else {
                    return local(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "no backend",
                        Some(ResponseFlag::NoCluster),
                        labels,
                        log,
                        "the rule has no backend with a weight above 0".to_string(),
                    );
                };
                log.backend = Some(format!("{}:{}", chosen.service, chosen.port));
                if chosen.service.namespace != sel.route.namespace {
                    // The Gateway API needs a ReferenceGrant for this; without support for
                    // them, refuse rather than let a route reach into any namespace.
                    return local(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "no backend",
                        Some(ResponseFlag::NoCluster),
                        labels,
                        log,
                        "cross-namespace backendRef needs a ReferenceGrant (not supported)"
                            .to_string(),
                    );
                }
                backend = Target::Service {
                    svc: chosen.service.clone(),
                    port: chosen.port,
                };
                timeouts = rule.timeouts;
                for filters in [&rule.filters, &chosen.filters] {
                    if let Some(m) = &filters.request_headers {
                        modify_headers(&mut parts.headers, m);
                    }
                    if let Some(m) = &filters.response_headers {
                        response_mods.push(m.clone());
                    }
                }
                if let Some(rewrite) = &rule.filters.url_rewrite {
                    if let Some(host) = &rewrite.hostname {
                        upstream_authority = host.clone();
                        if let Ok(v) = HeaderValue::from_str(host) {
                            parts.headers.insert(header::HOST, v);
                        }
                    }
                    if let Some(modifier) = &rewrite.path {
                        let new_path = modify_path(&normalized.path, sel.matched, modifier);
                        if new_path != normalized.path {
                            if let Ok(v) = HeaderValue::from_str(&normalized.path) {
                                parts.headers.insert(X_ENVOY_ORIGINAL_PATH, v);
                            }
                        }
                        upstream_path = NormalizedPath {
                            path: new_path,
                            query: normalized.query.clone(),
                        }
                        .path_and_query();
                    }
                }
            }
        }
    }

    // 5. select: the ready endpoints of the backend.
    let routed = backend != ctx.target;
    let (backend_resolved, proto) = if routed {
        let r = backend.lookup(&model, &inputs.cfg.trust_domain);
        let declared = r
            .as_ref()
            .and_then(|r| r.port)
            .map_or(Declared::Unknown, Declared::of);
        (r, upstream_proto(declared, downstream_h2))
    } else {
        (resolved, ctx.upstream_proto(downstream_h2))
    };
    if routed {
        match &backend_resolved {
            Some(r) => labels.service = r.service.cloned(),
            None => {
                let reason = format!(
                    "backend {} is not in the model",
                    log.backend.as_deref().unwrap_or("-")
                );
                return local(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "no backend",
                    Some(ResponseFlag::NoCluster),
                    labels,
                    log,
                    reason,
                );
            }
        }
    }
    let Some(resolved) = backend_resolved.filter(|r| !r.endpoints.is_empty()) else {
        let reason = match &log.backend {
            Some(b) => format!("no ready endpoint for backend {b}"),
            None => format!("no ready endpoint for {}", ctx.authority),
        };
        return local(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream",
            Some(ResponseFlag::NoHealthyUpstream),
            labels,
            log,
            reason,
        );
    };
    let eps = resolved.endpoints;
    let host = resolved.service.map(|s| s.hostname());
    drop(model);
    let start = inputs.upstreams.next_index(&rr_key(&backend));

    // 6.-7. connect and send, within `timeouts.request` (from the request's arrival) and
    // `timeouts.backendRequest` (the attempt).
    let mut chosen = None;
    let build = || {
        upstream_request(
            parts,
            body,
            &upstream_authority,
            &upstream_path,
            proto,
            req_bytes.clone(),
        )
    };
    let attempt = forward(
        inputs,
        ctx.local.ip(),
        &eps,
        start,
        proto,
        host,
        timeouts.backend_request,
        build,
        &mut chosen,
    );
    let result = match timeouts.request {
        Some(limit) => {
            let deadline = tokio::time::Instant::from_std(started) + limit;
            match tokio::time::timeout_at(deadline, attempt).await {
                Ok(r) => r,
                Err(_) => Err(Failure::timeout(format!("request timeout {limit:?}"))),
            }
        }
        None => attempt.await,
    };
    if let Some(ep) = &chosen {
        labels.dst_pod = Some(ep.pod.clone());
        labels.dst_identity = ep.identity.clone();
    }
    let response = match result {
        Ok(r) => r,
        Err(f) => return local(f.status, f.body, Some(f.flag), labels, log, f.reason),
    };
    log.upstream = chosen.as_ref().map(|ep| ep.addr);

    // 8. respond
    let (mut rsp, body) = response.into_parts();
    strip_hop_by_hop(&mut rsp.headers, false);
    for m in &response_mods {
        modify_headers(&mut rsp.headers, m);
    }
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
            metrics: inputs.http_metrics.clone(),
            labels,
            code: status,
            flag: None,
            grpc_status,
            log,
            req_bytes,
        },
    );
    Response::from_parts(rsp, body)
}

/// Why a request got no upstream response: status, body and flag of the local reply.
struct Failure {
    status: StatusCode,
    body: &'static str,
    flag: ResponseFlag,
    reason: String,
}

impl Failure {
    fn timeout(reason: String) -> Failure {
        Failure {
            status: StatusCode::GATEWAY_TIMEOUT,
            body: "upstream request timeout",
            flag: ResponseFlag::UpstreamTimeout,
            reason,
        }
    }
}

/// Phases 4 and 5: a connection to one of `eps` (from `start`, the next endpoint when one
/// cannot be reached: nothing has been sent yet, so this is always safe), then the request
/// built by `request`, waiting at most `attempt_timeout` for the response headers. `chosen`
/// is the endpoint last tried.
#[allow(clippy::too_many_arguments)]
async fn forward(
    inputs: &Arc<Inputs>,
    local_ip: IpAddr,
    eps: &[Endpoint],
    start: usize,
    proto: UpstreamProto,
    host: Option<String>,
    attempt_timeout: Option<Duration>,
    request: impl FnOnce() -> Result<Request<UpBody>, String>,
    chosen: &mut Option<Endpoint>,
) -> Result<Response<Incoming>, Failure> {
    let mut connected = None;
    let mut last = String::new();
    for i in 0..eps.len().min(MAX_CONNECT_ATTEMPTS) {
        let ep = &eps[(start + i) % eps.len()];
        *chosen = Some(ep.clone());
        match inputs
            .upstreams
            .checkout(ep, proto, local_ip, host.clone())
            .await
        {
            Ok(sender) => {
                connected = Some((ep, sender));
                break;
            }
            Err(e) => {
                tracing::debug!(error = %e, "endpoint failed");
                last = e.to_string();
            }
        }
    }
    let Some((ep, sender)) = connected else {
        return Err(Failure {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: "upstream connect error",
            flag: ResponseFlag::UpstreamFailure,
            reason: last,
        });
    };
    let req = request().map_err(|reason| Failure {
        status: StatusCode::BAD_REQUEST,
        body: "bad request",
        flag: ResponseFlag::BadRequest,
        reason,
    })?;
    let send = inputs.upstreams.send(ep, sender, req);
    let sent = match attempt_timeout {
        Some(limit) => tokio::time::timeout(limit, send).await.map_err(|_| {
            Failure::timeout(format!("backendRequest timeout {limit:?} at {}", ep.addr))
        })?,
        None => send.await,
    };
    sent.map_err(|e| Failure {
        status: StatusCode::SERVICE_UNAVAILABLE,
        body: "upstream connect error or disconnect/reset before headers",
        flag: ResponseFlag::UpstreamReset,
        reason: format!("upstream {}: {e}", ep.addr),
    })
}

/// `ns/route/rule` for the access log (the rule's index when it has no name).
fn rule_label(sel: &Selected<'_>) -> String {
    let rule = sel
        .rule
        .name
        .clone()
        .unwrap_or_else(|| sel.rule_index.to_string());
    format!("{}/{}", sel.route.key(), rule)
}

/// The request as it goes upstream: origin-form URI and `Host` for HTTP/1.1, absolute URI
/// (`:scheme`/`:authority`) for HTTP/2. `Err` when the result is not a valid request.
fn upstream_request(
    mut parts: http::request::Parts,
    body: Incoming,
    authority: &str,
    path: &str,
    proto: UpstreamProto,
    counter: Arc<AtomicU64>,
) -> Result<Request<UpBody>, String> {
    match proto {
        UpstreamProto::Http1 => {
            parts.version = Version::HTTP_11;
            parts.uri = path
                .parse::<Uri>()
                .map_err(|e| format!("path {path:?}: {e}"))?;
            if !parts.headers.contains_key(header::HOST) {
                let host = HeaderValue::from_str(authority)
                    .map_err(|e| format!("authority {authority:?}: {e}"))?;
                parts.headers.insert(header::HOST, host);
            }
        }
        UpstreamProto::Http2 => {
            parts.version = Version::HTTP_2;
            let uri = format!("http://{authority}{path}");
            parts.uri = uri
                .parse::<Uri>()
                .map_err(|e| format!("uri {uri:?}: {e}"))?;
            parts.headers.remove(header::HOST);
        }
    }
    let body = Counted {
        inner: body,
        counter,
    }
    .boxed_unsync();
    Ok(Request::from_parts(parts, body))
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
fn strip_hop_by_hop(headers: &mut HeaderMap, http1_only: bool) {
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

/// Seconds since the Unix epoch (0 if the clock is before it: every `exp` then passes,
/// but signatures still have to verify).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
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

/// A reply the waypoint makes itself. For a gRPC request (`grpc`) it is what a gRPC client
/// understands, as Envoy answers: HTTP 200, `content-type: application/grpc`, no body, and
/// the status in the headers ("trailers-only": `grpc-status` from [`grpc_status_for`],
/// `grpc-message` the text the HTTP reply would have had); the metrics record
/// `response_code` 200 (what was sent) and `grpc_response_status` that status. Otherwise
/// `status` with `body` as `text/plain`.
#[allow(clippy::too_many_arguments)]
fn local_reply(
    status: StatusCode,
    body: &'static str,
    flag: Option<ResponseFlag>,
    grpc: bool,
    labels: LabelInputs,
    log: AccessLog,
    metrics: &HttpMetrics,
    req_bytes: &Arc<AtomicU64>,
) -> Response<Observed> {
    let flag_name = flag.map_or("-", ResponseFlag::as_str);
    let grpc_status = grpc.then(|| grpc_status_for(status, flag));
    tracing::debug!(%status, ?grpc_status, flag = flag_name, reason = log.reason.as_deref().unwrap_or("-"), "local reply");
    let text = body;
    let content = if grpc { "" } else { text };
    let full = Full::new(Bytes::from_static(content.as_bytes()))
        .map_err(|never: Infallible| match never {})
        .boxed_unsync();
    let sent = if grpc { StatusCode::OK } else { status };
    let body = Observed::new(
        full,
        Finish {
            metrics: metrics.clone(),
            labels,
            code: sent.as_u16(),
            flag,
            grpc_status: grpc_status.map(|s| s.to_string()),
            log,
            req_bytes: req_bytes.clone(),
        },
    );
    let mut rsp = Response::new(body);
    *rsp.status_mut() = sent;
    let headers = rsp.headers_mut();
    match grpc_status {
        Some(code) => {
            headers.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            headers.insert(GRPC_STATUS, HeaderValue::from(code));
            if let Ok(v) = HeaderValue::from_str(&grpc_message(text)) {
                if !v.is_empty() {
                    headers.insert(GRPC_MESSAGE, v);
                }
            }
        }
        None => {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        }
    }
    rsp
}

// === bodies ===

/// The downstream request body, counting its bytes for `istio_request_bytes`.
struct Counted {
    inner: Incoming,
    counter: Arc<AtomicU64>,
}

impl Body for Counted {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if let Some(Ok(f)) = &frame {
            if let Some(data) = f.data_ref() {
                this.counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
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

/// What is recorded once a response has been sent.
struct Finish {
    metrics: HttpMetrics,
    labels: LabelInputs,
    code: u16,
    flag: Option<ResponseFlag>,
    grpc_status: Option<String>,
    log: AccessLog,
    req_bytes: Arc<AtomicU64>,
}

impl Finish {
    fn record(self, rsp_bytes: u64, downstream_gone: bool) {
        let flag = match self.flag {
            None if downstream_gone => Some(ResponseFlag::DownstreamClosed),
            f => f,
        };
        let l = self
            .labels
            .build(self.code, flag, self.grpc_status.as_deref());
        let req_bytes = self.req_bytes.load(Ordering::Relaxed);
        let ms = self.log.started.elapsed().as_secs_f64() * 1000.0;
        self.metrics.record(&l, ms, req_bytes, rsp_bytes);
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
    fn new(inner: UpBody, finish: Finish) -> Self {
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
        let mut h = HeaderMap::new();
        for (k, v) in [
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
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
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
        let mut h = HeaderMap::new();
        for (k, v) in [
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
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
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
}
