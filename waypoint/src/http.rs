//! HTTP on a tunnel: hyper serves HTTP/1.1 or HTTP/2 on the decrypted CONNECT stream, and
//! every request passes the same fixed sequence of phases (as pingora structures a proxy):
//!
//! 1. **downstream**: read method, authority and path; drop hop-by-hop headers and
//!    client-supplied internal control headers (`x-envoy-*`, `x-istio-*`, `x-mesh-*`,
//!    `x-forwarded-client-cert`); add `x-request-id` when absent (`traceparent` and the other
//!    headers pass unchanged); normalise the path once ([`mesh_model::route::normalize_path`]; a
//!    path it refuses is answered 400) — policy, routing and the upstream all see that path;
//! 2. **authenticate**: the RequestAuthentication rules for this waypoint and the
//!    destination Service ([`mesh_model::policy::authn`]): client copies of their
//!    `outputPayloadToHeader` headers dropped; no token → unauthenticated; an invalid token
//!    (or one whose `jwksUri` keys are not available: fail closed) → `401 Jwt verification
//!    fails` (flag `JWT`, `waypoint_jwt_rejected_total{reason}`); a valid one gives
//!    `request.auth.*` to the next phase, its header removed unless `forwardOriginalToken`,
//!    its payload written to `outputPayloadToHeader`;
//! 3. **authorize**: L7 AuthorizationPolicy ([`mesh_model::policy::l7::authorize_l7`]) for this
//!    waypoint and the destination Service; a denial is answered `403 RBAC: access denied`;
//! 4. **route**: the HTTPRoute, GRPCRoute or VirtualService rule for the request
//!    ([`mesh_model::route::route`]): none applies → the Service itself; one applies but no rule
//!    matches → 404; a redirect or a VirtualService `directResponse` is answered here
//!    (nothing sent upstream); otherwise a backend picked by weight for this request,
//!    request-header modifiers and rewrites applied, response-header modifiers, timeouts,
//!    the retry policy (Istio's default when the rule has none), fault and mirrors kept for
//!    later;
//! 5. **fault**: a VirtualService `fault` delay (flag `DI` on the response), then maybe an
//!    abort (`FI`, body `fault filter abort`; a gRPC status as HTTP 200 + `grpc-status`),
//!    decided by [`mesh_model::resilience::fault`];
//! 6. **select**: the backend's ready endpoints from the current model and the cluster
//!    (Service, port, subset) they form, with its DestinationRule policy
//!    ([`mesh_model::model::effective_policy`]): an unknown subset → `503 NC`, the subset's
//!    endpoints (pod labels; none → `503 UH`), the consistent-hash key of the request,
//!    one of `http2MaxRequests` slots (else `503 UO`);
//! 7. **body**: a request body with `content-length` ≤ [`MAX_BUFFERED_BODY`] (or none) is
//!    read whole so that retries can replay it and mirrors copy it; a larger one streams
//!    once;
//! 8. **mirror**: copies sent in the background ([`crate::mirror`]), never waited for;
//! 9. **attempts** (`forward`): per attempt one endpoint (`choose_endpoint`:
//!    [`crate::balance::Cluster::choose`], round robin by default, per request, so one
//!    long-lived HTTP/2 client is spread over all endpoints; endpoints not tried yet first,
//!    ejected ones skipped), a pooled upstream connection within the cluster's limits
//!    (`maxConnections`, `http1MaxPendingRequests` → `503 UO`), the request
//!    (HTTP/1.1 or HTTP/2 as the backend port declares) within the per-try timeout
//!    (`perTryTimeout`, else `timeouts.backendRequest`), the outcome reported to outlier
//!    detection (`report_outcome`: [`crate::balance::Cluster::report`]); a connect failure moves on to another endpoint at once (up to
//!    [`MAX_CONNECT_ATTEMPTS`] endpoints: nothing was sent); other retriable outcomes
//!    ([`mesh_model::resilience::should_retry`]) are retried after a jittered backoff while
//!    retries remain (and the cluster's `maxRetries` budget allows) and the body can be sent
//!    again; the route's `timeout`
//!    (`timeouts.request`) bounds all attempts from the request's arrival; retries running
//!    out on a retriable response pass it on with flag `URX`;
//! 10. **respond**: hop-by-hop headers dropped, response-header modifiers applied (and a
//!     generated consistent-hash cookie set; a `101 Switching Protocols` to an upgrade
//!     request keeps `Upgrade`/`Connection` and the two connections are spliced from then
//!     on: [`crate::upgrade`]); metrics
//!     (`destination_service` = the backend used) and the access-log line (with the rule,
//!     backend and attempts) are written when the response body ends (or the client goes
//!     away).
//!
//! Errors are classified by where they come from ([`ResponseFlag`]): JWT (`JWT`, 401),
//! policy (`DENY`, 403),
//! no matching rule (`NR`, 404), no usable backend (`NC`, 500), no endpoint (`UH`, 503),
//! connect failure (`UF`, 503), upstream reset before a response (`UC`, 503), timeout (`UT`,
//! 504), connection-pool overflow (`UO`, 503), a request that cannot be forwarded
//! (`BADREQ`, 400), downstream gone (`DC`), retries exhausted (`URX`), fault delay (`DI`)
//! and abort (`FI`).
//! A gRPC request (`content-type: application/grpc[+codec|;...]`) gets these local replies as
//! Envoy sends them to gRPC clients (`local_reply`): HTTP 200, trailers-only, `grpc-status`
//! by [`grpc_status_for`] (403 → 7 PERMISSION_DENIED, 401 → 16 UNAUTHENTICATED, 404 → 12
//! UNIMPLEMENTED, 503/504 → 14 UNAVAILABLE, 400 → 13 INTERNAL, `NC` → 14) and `grpc-message`
//! the text; `response_code` is the 200 sent, `grpc_response_status` that status.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
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
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_model::jwt::{JwtError, VERIFICATION_FAILED_BODY};
use mesh_model::model::{AbortStatus, HeaderModifier, JwksSource, Mirror, RetryPolicy, Timeouts};
use mesh_model::policy::authn::{authenticate, output_headers, rules_for_waypoint, Outcome};
use mesh_model::policy::l7::{authorize_l7, L7Request, DENIED_BODY};
use mesh_model::policy::Decision;
use mesh_model::resilience::{self, should_retry, AttemptOutcome};
use mesh_model::route::{
    self, modify_headers, modify_path, normalize_path, pick_backend, redirect_location,
    NormalizedPath, RouteRequest, Routing, Selected,
};

use crate::balance::{
    self, hash_key, new_cookie_value, Active, Cluster, ClusterKey, RequestGuard, RetryGuard,
};
use crate::destination::{Target, Unselectable};
use crate::inbound::rr_key;
use crate::io::Io;
use crate::mirror;
use crate::protocol::Declared;
use crate::proxy::{upstream_proto, ConnCtx, Inputs};
use crate::telemetry::{AccessLog, HttpMetrics, LabelInputs, ResponseFlag};
use crate::upgrade;
use crate::upstream::{Endpoint, UpBody, UpstreamError, UpstreamProto};

/// The body of a fault-injected abort (Envoy's).
pub const FAULT_ABORT_BODY: &str = "fault filter abort";
/// Largest request body buffered for retries and mirrors (by its `content-length`).
pub const MAX_BUFFERED_BODY: u64 = 64 * 1024;

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

/// The body of a `503 UO` (connection pool overflow), as Envoy writes it.
const OVERFLOW_BODY: &str =
    "upstream connect error or disconnect/reset before headers. reset reason: overflow";

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
            .initial_stream_window_size(mesh_hbone::STREAM_WINDOW)
            .initial_connection_window_size(mesh_hbone::CONNECTION_WINDOW);
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
        let conn = builder.serve_connection(io, svc).with_upgrades();
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
        attempts: 0,
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
            Bytes::from_static(body.as_bytes()),
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
    // Istio gives every HTTP route a retry policy; a rule's own replaces it.
    let mut retry_policy = RetryPolicy::default();
    let mut fault = None;
    let mut mirrors: Vec<Mirror> = Vec::new();
    let mut backend_subset: Option<String> = None;
    let service_port = resolved
        .as_ref()
        .and_then(|r| r.port)
        .map_or(ctx.authority.port(), |p| p.port);
    if let Some((svc, port)) = resolved.as_ref().and_then(|r| r.service.zip(r.port)) {
        let request = RouteRequest {
            host: &authority,
            method: parts.method.as_str(),
            path: &normalized.path,
            query: normalized.query.as_deref(),
            headers: &parts.headers,
            source: labels.src_pod.as_ref(),
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
                    "no HTTPRoute or VirtualService rule matches".to_string(),
                )
            }
            Routing::Matched(sel) => {
                let rule = sel.rule;
                log.route = Some(rule_label(&sel));
                if let Some(direct) = &rule.filters.direct_response {
                    let status = StatusCode::from_u16(direct.status)
                        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                    let log = AccessLog {
                        reason: Some("direct response".to_string()),
                        ..log
                    };
                    // A direct response is sent as written, also to a gRPC client.
                    let mut rsp = local_reply(
                        status,
                        direct.body.clone(),
                        None,
                        false,
                        labels,
                        log,
                        &inputs.http_metrics,
                        &req_bytes,
                    );
                    if let Some(m) = &rule.filters.response_headers {
                        modify_headers(rsp.headers_mut(), m);
                    }
                    return rsp;
                }
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
                // VirtualService destinations may name any namespace (Istio allows it).
                if !sel.route.is_virtual_service()
                    && chosen.service.namespace != sel.route.namespace()
                {
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
                // Port 0: a VirtualService destination without a port, the request's own.
                let backend_port = if chosen.port == 0 {
                    service_port
                } else {
                    chosen.port
                };
                log.backend = Some(format!("{}:{backend_port}", chosen.service));
                backend = Target::Service {
                    svc: chosen.service.clone(),
                    port: backend_port,
                };
                timeouts = rule.timeouts;
                if let Some(r) = &rule.retries {
                    retry_policy = r.clone();
                }
                fault = rule.fault.clone();
                backend_subset = chosen.subset.clone();
                mirrors = rule.filters.mirrors.clone();
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

    // 5. fault (VirtualService `fault`): a delay, then maybe an abort.
    let mut delayed = false;
    if let Some(f) = &fault {
        let decision = resilience::fault(
            f,
            rand::random::<f64>() * 100.0,
            rand::random::<f64>() * 100.0,
        );
        if let Some(d) = decision.delay {
            tokio::time::sleep(d).await;
            delayed = true;
        }
        if let Some(abort) = decision.abort {
            return fault_abort(
                abort,
                grpc_request,
                labels,
                log,
                &inputs.http_metrics,
                &req_bytes,
            );
        }
    }

    // 6. select: the ready endpoints of the backend.
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
    // An upgrade needs HTTP/1.1 upstream.
    let proto = if upgrade.is_some() {
        UpstreamProto::Http1
    } else {
        proto
    };
    let Some(resolved) = backend_resolved else {
        let reason = format!("no ready endpoint for {}: not in the model", ctx.authority);
        return local(
            StatusCode::SERVICE_UNAVAILABLE,
            "no healthy upstream",
            Some(ResponseFlag::NoHealthyUpstream),
            labels,
            log,
            reason,
        );
    };
    // The cluster (service, port, subset): its DestinationRule policy and endpoints.
    let host = resolved.service.map(|s| s.hostname());
    let cluster_port = resolved.port.map_or(ctx.authority.port(), |p| p.port);
    let (policy, eps) = match resolved.cluster(
        &model,
        &inputs.cfg.gateway.namespace,
        backend_subset.as_deref(),
    ) {
        Ok(selected) => selected,
        Err(Unselectable::NoCluster(e)) => {
            return local(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream",
                Some(ResponseFlag::NoCluster),
                labels,
                log,
                e.to_string(),
            )
        }
        Err(Unselectable::NoEndpoint) => {
            let what = match (&log.backend, &backend_subset) {
                (Some(b), Some(s)) => format!("backend {b} subset {s}"),
                (Some(b), None) => format!("backend {b}"),
                (None, _) => ctx.authority.to_string(),
            };
            return local(
                StatusCode::SERVICE_UNAVAILABLE,
                "no healthy upstream",
                Some(ResponseFlag::NoHealthyUpstream),
                labels,
                log,
                format!("no ready endpoint for {what}"),
            );
        }
    };
    let mirror_targets = mirror::targets(&model, &inputs.cfg.trust_domain, &mirrors, service_port);
    drop(model);
    let cluster = inputs.upstreams.clusters.cluster(
        &ClusterKey {
            service: rr_key(&backend),
            port: cluster_port,
            subset: backend_subset.clone(),
        },
        &policy,
    );
    let hash = hash_key(
        &policy.load_balancer,
        &parts.headers,
        normalized.query.as_deref(),
        ctx.remote_ip,
        new_cookie_value,
    );
    let request_slot = match cluster.admit() {
        Ok(slot) => slot,
        Err(e) => {
            tracing::info!(request_id = %log.request_id, error = %e, "connection pool overflow");
            return local(
                StatusCode::SERVICE_UNAVAILABLE,
                OVERFLOW_BODY,
                Some(ResponseFlag::UpstreamOverflow),
                labels,
                log,
                e.to_string(),
            );
        }
    };

    // 7. body: buffered when small, so that it can be replayed by a retry and
    // copied to mirrors; otherwise streamed once.
    let mut body = match RequestBody::new(body, &parts.headers, req_bytes.clone()).await {
        Ok(b) => b,
        Err(e) => {
            return local(
                StatusCode::BAD_REQUEST,
                "bad request",
                Some(ResponseFlag::DownstreamClosed),
                labels,
                log,
                format!("request body: {e}"),
            )
        }
    };
    let head = RequestHead {
        method: parts.method.clone(),
        headers: parts.headers.clone(),
    };
    // 8. mirror: copies in the background.
    for (target, percent) in mirror_targets {
        if !resilience::selected(percent, rand::random::<f64>() * 100.0) {
            continue;
        }
        mirror::spawn(
            inputs,
            ctx.local.ip(),
            target,
            &head,
            body.replay(),
            &upstream_authority,
            &upstream_path,
        );
    }

    // 9. attempts: connect and send, attempt by attempt (retries), within `timeouts.request` (from
    // the request's arrival).
    let mut chosen = None;
    let mut active = None;
    let mut attempts = 0;
    let per_try = retry_policy.per_try_timeout.or(timeouts.backend_request);
    let plan = Attempts {
        inputs,
        local_ip: ctx.local.ip(),
        backend: &backend,
        subset: backend_subset.as_deref(),
        eps: &eps,
        cluster: &cluster,
        hash: hash.key,
        proto,
        host,
        per_try,
        policy: &retry_policy,
        authority: &upstream_authority,
        path: &upstream_path,
    };
    let attempt = forward(
        &plan,
        &head,
        &mut body,
        &mut chosen,
        &mut active,
        &mut attempts,
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
    log.attempts = attempts;
    if let Some(ep) = &chosen {
        labels.dst_pod = Some(ep.pod.clone());
        labels.dst_identity = ep.identity.clone();
    }
    let (mut response, exhausted) = match result {
        Ok(r) => r,
        Err(f) => {
            if f.flag == ResponseFlag::UpstreamOverflow {
                tracing::info!(request_id = %log.request_id, reason = %f.reason, "connection pool overflow");
            }
            return local(f.status, f.body, Some(f.flag), labels, log, f.reason);
        }
    };
    log.upstream = chosen.as_ref().map(|ep| ep.addr);

    // 10. respond
    let switched = match (downstream_upgrade, &upgrade) {
        (Some(down), Some(_)) if response.status() == StatusCode::SWITCHING_PROTOCOLS => {
            let up = hyper::upgrade::on(&mut response);
            let what = format!(
                "{} -> {}",
                ctx.peer,
                log.upstream.map_or_else(String::new, |a| a.to_string())
            );
            upgrade::splice(down, up, what);
            response.headers().get(header::UPGRADE).cloned()
        }
        _ => None,
    };
    let (mut rsp, body) = response.into_parts();
    strip_hop_by_hop(&mut rsp.headers, false);
    if let Some(u) = switched {
        upgrade::restore(&mut rsp.headers, u);
    }
    for m in &response_mods {
        modify_headers(&mut rsp.headers, m);
    }
    if let Some(cookie) = hash.set_cookie.and_then(|c| HeaderValue::from_str(&c).ok()) {
        rsp.headers.append(header::SET_COOKIE, cookie);
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
            // URX: retries ran out on a retriable response; DI: a fault delay was injected.
            flag: if exhausted {
                Some(ResponseFlag::RetryLimitExceeded)
            } else if delayed {
                Some(ResponseFlag::DelayInjected)
            } else {
                None
            },
            grpc_status,
            log,
            req_bytes,
            _held: Some(Held {
                _request: request_slot,
                _endpoint: active,
            }),
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

/// What stays the same across the attempts of one request.
struct Attempts<'a> {
    inputs: &'a Arc<Inputs>,
    local_ip: IpAddr,
    backend: &'a Target,
    /// The DestinationRule subset the route named for this backend, if any.
    subset: Option<&'a str>,
    eps: &'a [Endpoint],
    /// The cluster's balancer, outlier detection, limits and retry budget.
    cluster: &'a Cluster,
    /// The request's consistent-hash key, when the cluster balances by one.
    hash: Option<u64>,
    proto: UpstreamProto,
    host: Option<String>,
    /// One attempt's limit (connect and response headers).
    per_try: Option<Duration>,
    policy: &'a RetryPolicy,
    authority: &'a str,
    path: &'a str,
}

/// Method and headers of the request as it goes upstream (cloned for each attempt).
pub struct RequestHead {
    pub method: http::Method,
    pub headers: HeaderMap,
}

/// Phase 7: attempts, one endpoint each, until one gives a response that is not retried.
/// A connect failure moves to the next endpoint (nothing was sent, always safe) up to
/// [`MAX_CONNECT_ATTEMPTS`] endpoints, and beyond that counts as a retry; other failures
/// and responses are retried when the policy's `retryOn` says so, retries remain and the
/// body can be sent again, after a jittered exponential backoff. `Ok((response, true))`:
/// the response is retriable but the retries ran out (`URX`).
async fn forward(
    plan: &Attempts<'_>,
    head: &RequestHead,
    body: &mut RequestBody,
    chosen: &mut Option<Endpoint>,
    active: &mut Option<Active>,
    attempts: &mut u32,
) -> Result<(Response<Incoming>, bool), Failure> {
    let mut tried: Vec<SocketAddr> = Vec::new();
    let mut retries = 0u32;
    let mut free_connect_retries = MAX_CONNECT_ATTEMPTS.saturating_sub(1);
    // A slot of the cluster's `maxRetries` budget, held while its retry runs (replaced by
    // the next retry's).
    let mut retry_slot: Option<RetryGuard>;
    loop {
        let (ep, in_flight) = match choose_endpoint(plan.cluster, plan.eps, plan.hash, &tried) {
            Ok((ep, in_flight)) => (ep.clone(), in_flight),
            Err(e) => {
                return Err(Failure {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    body: "no healthy upstream",
                    flag: ResponseFlag::NoHealthyUpstream,
                    reason: format!("{}: {e}", plan.cluster.name()),
                })
            }
        };
        tried.push(ep.addr);
        *chosen = Some(ep.clone());
        *active = Some(in_flight);
        *attempts += 1;
        let result = attempt(plan, &ep, head, body).await;
        let outcome = match &result {
            Ok(rsp) => AttemptOutcome::Response {
                status: rsp.status().as_u16(),
                grpc_status: rsp
                    .headers()
                    .get(GRPC_STATUS)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok()),
            },
            // Not the endpoint's doing (connection pool overflow): no report, no retry.
            Err((None, _)) => return result.map(|r| (r, false)).map_err(|(_, f)| f),
            Err((Some(outcome), _)) => *outcome,
        };
        report_outcome(plan.inputs, plan, &ep, &outcome);
        let retriable = should_retry(&plan.policy.retry_on, &outcome);
        let replayable = body.replayable();
        if outcome == AttemptOutcome::ConnectFailure
            && free_connect_retries > 0
            && tried.len() < plan.eps.len().max(1)
        {
            // Today's behaviour, independent of the policy: another endpoint at once.
            free_connect_retries -= 1;
            continue;
        }
        let mut again = retriable && replayable && retries < plan.policy.attempts;
        if again {
            retry_slot = plan.cluster.try_retry();
            if retry_slot.is_none() {
                tracing::debug!(cluster = %plan.cluster.name(), "retry budget (maxRetries) exhausted");
                again = false;
            }
        }
        if !again {
            return match result {
                Ok(rsp) => {
                    let exhausted =
                        retriable && plan.policy.attempts > 0 && retries >= plan.policy.attempts;
                    Ok((rsp, exhausted))
                }
                Err((_, f)) => Err(f),
            };
        }
        retries += 1;
        plan.inputs.http_metrics.retried(outcome.as_str());
        tracing::debug!(retry = retries, outcome = outcome.as_str(), endpoint = %ep.addr, "retrying");
        drop(result);
        tokio::time::sleep(resilience::backoff(retries, rand::random::<f64>())).await;
    }
}

/// Hook: the endpoint for the next attempt of the request `plan` describes (its cluster's
/// balancer: consistent hash, least request, random or round robin; ejected endpoints
/// skipped), given the endpoints `tried` so far: one not tried yet when there is one, else
/// any (a retry may go back to the only endpoint). The [`Active`] counts the request as in
/// flight to it.
fn choose_endpoint<'e>(
    cluster: &Cluster,
    eps: &'e [Endpoint],
    hash: Option<u64>,
    tried: &[SocketAddr],
) -> Result<(&'e Endpoint, Active), balance::NoEndpoint> {
    let mut rng = rand::rng();
    let pick = match cluster.choose(eps, hash, tried, Instant::now(), &mut rng) {
        Err(balance::NoEndpoint::AllTried) => {
            cluster.choose(eps, hash, &[], Instant::now(), &mut rng)?
        }
        other => other?,
    };
    Ok((&eps[pick.index], pick.active))
}

/// Hook: what one attempt at `ep` came to, for the cluster's outlier detection
/// ([`Cluster::report`]: connect failures, resets and timeouts count as 5xx).
fn report_outcome(_inputs: &Inputs, plan: &Attempts<'_>, ep: &Endpoint, outcome: &AttemptOutcome) {
    tracing::debug!(backend = ?plan.backend, subset = plan.subset.unwrap_or("-"), endpoint = %ep.addr, outcome = ?outcome, "upstream attempt");
    let outcome = match outcome {
        AttemptOutcome::ConnectFailure => balance::Outcome::ConnectFailure,
        AttemptOutcome::RefusedStream | AttemptOutcome::Reset => balance::Outcome::Reset,
        AttemptOutcome::Timeout => balance::Outcome::Timeout,
        AttemptOutcome::Response { status, .. } => balance::Outcome::Status(*status),
    };
    plan.cluster
        .report(ep.addr, outcome, plan.eps.len(), Instant::now());
}

/// One attempt at one endpoint: a pooled connection, then the request, waiting at most the
/// per-try timeout for the response headers.
/// `Err((None, _))`: the cluster's connection pool is full (`UO`), which says nothing
/// about the endpoint.
async fn attempt(
    plan: &Attempts<'_>,
    ep: &Endpoint,
    head: &RequestHead,
    body: &mut RequestBody,
) -> Result<Response<Incoming>, (Option<AttemptOutcome>, Failure)> {
    let limits = plan.cluster.conn_limits();
    let connect = plan.inputs.upstreams.checkout_limited(
        ep,
        plan.proto,
        plan.local_ip,
        plan.host.clone(),
        limits,
    );
    let connected = match plan.per_try {
        Some(limit) => match tokio::time::timeout(limit, connect).await {
            Ok(r) => r,
            Err(_) => {
                return Err((
                    Some(AttemptOutcome::Timeout),
                    Failure::timeout(format!(
                        "per-try timeout {limit:?} connecting to {}",
                        ep.addr
                    )),
                ))
            }
        },
        None => connect.await,
    };
    let sender = connected.map_err(|e| {
        if let UpstreamError::Overflow { .. } = e {
            return (
                None,
                Failure {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    body: OVERFLOW_BODY,
                    flag: ResponseFlag::UpstreamOverflow,
                    reason: format!(
                        "{}: {} pending requests for a connection to {} (http1MaxPendingRequests)",
                        plan.cluster.name(),
                        limits.max_pending.unwrap_or(0),
                        ep.addr
                    ),
                },
            );
        }
        tracing::debug!(error = %e, "endpoint failed");
        (
            Some(AttemptOutcome::ConnectFailure),
            Failure {
                status: StatusCode::SERVICE_UNAVAILABLE,
                body: "upstream connect error",
                flag: ResponseFlag::UpstreamFailure,
                reason: e.to_string(),
            },
        )
    })?;
    let Some(up_body) = body.take() else {
        return Err((
            Some(AttemptOutcome::Reset),
            Failure {
                status: StatusCode::SERVICE_UNAVAILABLE,
                body: "upstream connect error or disconnect/reset before headers",
                flag: ResponseFlag::UpstreamReset,
                reason: "the streamed request body was already sent".to_string(),
            },
        ));
    };
    let mut req = Request::new(up_body);
    *req.method_mut() = head.method.clone();
    *req.headers_mut() = head.headers.clone();
    let req = upstream_request(req, plan.authority, plan.path, plan.proto).map_err(|reason| {
        (
            Some(AttemptOutcome::Reset),
            Failure {
                status: StatusCode::BAD_REQUEST,
                body: "bad request",
                flag: ResponseFlag::BadRequest,
                reason,
            },
        )
    })?;
    let send = plan.inputs.upstreams.send(ep, sender, req);
    let sent = match plan.per_try {
        Some(limit) => tokio::time::timeout(limit, send).await.map_err(|_| {
            (
                Some(AttemptOutcome::Timeout),
                Failure::timeout(format!("per-try timeout {limit:?} at {}", ep.addr)),
            )
        })?,
        None => send.await,
    };
    sent.map_err(|e| {
        let refused = format!("{e:?}").contains("REFUSED_STREAM");
        (
            Some(if refused {
                AttemptOutcome::RefusedStream
            } else {
                AttemptOutcome::Reset
            }),
            Failure {
                status: StatusCode::SERVICE_UNAVAILABLE,
                body: "upstream connect error or disconnect/reset before headers",
                flag: ResponseFlag::UpstreamReset,
                reason: format!("upstream {}: {e}", ep.addr),
            },
        )
    })
}

/// A fault abort: the HTTP status, or for a gRPC status HTTP 200 with `grpc-status`.
fn fault_abort(
    abort: AbortStatus,
    grpc: bool,
    labels: LabelInputs,
    log: AccessLog,
    metrics: &HttpMetrics,
    req_bytes: &Arc<AtomicU64>,
) -> Response<Observed> {
    let log = AccessLog {
        reason: Some("fault injected: abort".to_string()),
        ..log
    };
    let body = Bytes::from_static(FAULT_ABORT_BODY.as_bytes());
    match abort {
        AbortStatus::Http(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            local_reply(
                status,
                body,
                Some(ResponseFlag::FaultInjected),
                grpc,
                labels,
                log,
                metrics,
                req_bytes,
            )
        }
        AbortStatus::Grpc(code) => {
            let mut rsp = local_reply(
                StatusCode::OK,
                Bytes::new(),
                Some(ResponseFlag::FaultInjected),
                false,
                labels,
                log,
                metrics,
                req_bytes,
            );
            let h = rsp.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert(GRPC_STATUS, HeaderValue::from(code));
            h.insert(
                HeaderName::from_static("grpc-message"),
                HeaderValue::from_static(FAULT_ABORT_BODY),
            );
            rsp
        }
    }
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
pub(crate) fn upstream_request(
    req: Request<UpBody>,
    authority: &str,
    path: &str,
    proto: UpstreamProto,
) -> Result<Request<UpBody>, String> {
    let (mut parts, body) = req.into_parts();
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
    body: Bytes,
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
    let text = String::from_utf8_lossy(&body).into_owned();
    let content = if grpc { Bytes::new() } else { body };
    let full = Full::new(content)
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
            _held: None,
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
            if let Ok(v) = HeaderValue::from_str(&grpc_message(&text)) {
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

/// The request body as the attempts and mirrors see it.
enum RequestBody {
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
        let counted = Counted {
            inner: body,
            counter,
        };
        if !small {
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
    fn replayable(&self) -> bool {
        match self {
            RequestBody::Buffered { .. } => true,
            RequestBody::Streaming(b) => b.is_some(),
        }
    }

    /// The body for one attempt; `None` when a streamed body was already sent.
    fn take(&mut self) -> Option<UpBody> {
        match self {
            RequestBody::Buffered { .. } => self.replay(),
            RequestBody::Streaming(b) => b.take().map(BodyExt::boxed_unsync),
        }
    }

    /// A copy of a buffered body (for a mirror); `None` for a streamed one.
    fn replay(&self) -> Option<UpBody> {
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
    /// Counted as in flight (cluster and endpoint) until the response ends.
    _held: Option<Held>,
}

/// What a forwarded request holds until its response body ends.
struct Held {
    _request: RequestGuard,
    _endpoint: Option<Active>,
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

    fn endpoints(n: usize) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint {
                pod: mesh_model::model::Pod {
                    name: format!("p{i}"),
                    namespace: "ns".to_string(),
                    uid: None,
                    service_account: "default".to_string(),
                    node_name: None,
                    ips: Vec::new(),
                    labels: Default::default(),
                    annotations: Default::default(),
                    host_network: false,
                    container_ports: Vec::new(),
                    ready: true,
                },
                addr: SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)),
                identity: None,
            })
            .collect()
    }

    #[test]
    fn attempts_prefer_endpoints_not_tried_yet_and_may_go_back_to_the_only_one() {
        let clusters = balance::Clusters::new(Default::default());
        let key = |name: &str| ClusterKey {
            service: mesh_model::model::NamespacedName::new("ns", name),
            port: 80,
            subset: None,
        };
        let policy = mesh_model::model::EffectivePolicy::default();
        let eps = endpoints(3);
        let cluster = clusters.cluster(&key("three"), &policy);
        let pick = |tried: &[SocketAddr]| {
            choose_endpoint(&cluster, &eps, None, tried).map(|(ep, _)| ep.addr)
        };
        // Round robin across requests, untried endpoints first within one.
        let first = pick(&[]).expect("an endpoint");
        let second = pick(&[first]).expect("an endpoint");
        let third = pick(&[first, second]).expect("an endpoint");
        let mut all = vec![first, second, third];
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 3, "three attempts, three endpoints");
        // All tried: any of them again (a retry of a one-endpoint service).
        assert!(pick(&[first, second, third]).is_ok());
        let one = endpoints(1);
        let single = clusters.cluster(&key("one"), &policy);
        assert_eq!(
            choose_endpoint(&single, &one, None, &[one[0].addr]).map(|(ep, _)| ep.addr),
            Ok(one[0].addr),
            "a single endpoint is retried"
        );
        assert!(choose_endpoint(&single, &[], None, &[]).is_err());
    }

    #[tokio::test]
    async fn a_buffered_body_is_replayed_whole_with_its_trailers() {
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-timeout", HeaderValue::from_static("1S"));
        let body = RequestBody::Buffered {
            data: Bytes::from_static(b"hello"),
            trailers: Some(trailers),
        };
        for _ in 0..2 {
            let replay = body.replay().expect("buffered");
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

    fn access_log() -> AccessLog {
        AccessLog {
            started: Instant::now(),
            src: SocketAddr::from(([10, 0, 0, 9], 40000)),
            src_identity: None,
            protocol: "HTTP/1.1",
            method: "GET".to_string(),
            authority: "echo".to_string(),
            path: "/".to_string(),
            request_id: "r".to_string(),
            service: None,
            attempts: 0,
            route: None,
            backend: None,
            upstream: None,
            reason: None,
        }
    }

    #[tokio::test]
    async fn fault_aborts_answer_the_http_or_grpc_status() {
        let (_registry, metrics) = HttpMetrics::new();
        let bytes = Arc::new(AtomicU64::new(0));
        let rsp = fault_abort(
            AbortStatus::Http(418),
            false,
            LabelInputs::default(),
            access_log(),
            &metrics,
            &bytes,
        );
        assert_eq!(rsp.status(), 418);
        let body = rsp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(body, FAULT_ABORT_BODY.as_bytes());
        let rsp = fault_abort(
            AbortStatus::Grpc(14),
            true,
            LabelInputs::default(),
            access_log(),
            &metrics,
            &bytes,
        );
        assert_eq!(rsp.status(), 200);
        assert_eq!(rsp.headers()["grpc-status"], "14");
        assert_eq!(rsp.headers()["content-type"], "application/grpc");
        assert_eq!(rsp.headers()["grpc-message"], FAULT_ABORT_BODY);
    }

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
