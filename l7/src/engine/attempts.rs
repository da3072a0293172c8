//! Phase 9, attempts: per attempt one endpoint (`choose_endpoint`:
//! [`crate::balance::Cluster::choose`], round robin by default, per request, so one
//! long-lived HTTP/2 client is spread over all endpoints; endpoints not tried yet first,
//! ejected ones skipped), a pooled upstream connection within the cluster's limits
//! (`maxConnections`, `http1MaxPendingRequests` → `503 UO`), the request (HTTP/1.1 or
//! HTTP/2 as the backend port declares) within the per-try timeout (`perTryTimeout`, else
//! `timeouts.backendRequest`), the outcome reported to outlier detection
//! ([`crate::balance::Cluster::report`]). A connect failure moves on to another endpoint at
//! once (up to [`MAX_CONNECT_ATTEMPTS`] endpoints: nothing was sent); other retriable
//! outcomes ([`mesh_model::resilience::should_retry`]) are retried after a jittered backoff
//! while retries remain (and the cluster's `maxRetries` budget allows) and the request may
//! be sent again (its body buffered, and an idempotent method or an outcome the upstream
//! cannot have acted on: [`mesh_model::resilience::may_replay`]); the route's `timeout` (`timeouts.request`) bounds all attempts from the
//! request's arrival; retries running out on a retriable response pass it on with flag
//! `URX`. With DestinationRule `tls` `SIMPLE`/`MUTUAL` each new connection originates TLS
//! ([`crate::origin`]); settings whose files cannot be used answer `503 UF` before any
//! attempt, a failed handshake is a connect failure.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode, Uri, Version};
use mesh_model::model::RetryPolicy;
use mesh_model::resilience::{self, should_retry, AttemptOutcome};

use super::body::RequestBody;
use super::reply::GRPC_STATUS;
use super::route::RoutePlan;
use super::select::Selection;
use super::{LocalReply, RequestContext};
use crate::balance::{self, Active, Cluster, RetryGuard};
use crate::origin::Origin;
use crate::proxy::Inputs;
use crate::target::Target;
use crate::telemetry::ResponseFlag;
use crate::upstream::{Endpoint, ResponseBody, UpBody, UpstreamError, UpstreamProto};

/// Endpoints tried for one request before it fails with `UF`.
pub const MAX_CONNECT_ATTEMPTS: usize = 3;

/// Method and headers of the request as it goes upstream (cloned for each attempt).
pub struct RequestHead {
    pub method: http::Method,
    pub headers: HeaderMap,
}

/// What stays the same across the attempts of one request.
pub struct AttemptPlan<'a> {
    pub inputs: &'a Arc<Inputs>,
    pub local_ip: IpAddr,
    pub backend: &'a Target,
    /// The DestinationRule subset the route named for this backend, if any.
    pub subset: Option<&'a str>,
    pub eps: &'a [Endpoint],
    /// The TLS originated to the endpoints, if any.
    pub origin: Option<&'a Origin>,
    /// The cluster's balancer, outlier detection, limits and retry budget.
    pub cluster: &'a Cluster,
    /// The request's consistent-hash key, when the cluster balances by one.
    pub hash: Option<u64>,
    pub proto: UpstreamProto,
    pub host: Option<String>,
    /// One attempt's limit (connect and response headers).
    pub per_try: Option<Duration>,
    pub policy: &'a RetryPolicy,
    pub authority: &'a str,
    pub path: &'a str,
}

/// What the attempts got: the response to pass on.
pub struct Answered {
    pub response: Response<ResponseBody>,
    /// Retries ran out on a retriable response (`URX`).
    pub exhausted: bool,
    /// The request counted as in flight to its endpoint until the response ends.
    pub active: Option<Active>,
}

/// Where the attempts stand (kept when they fail or time out, for the labels and the log).
#[derive(Default)]
struct Progress {
    chosen: Option<Endpoint>,
    active: Option<Active>,
    attempts: u32,
}

/// The phase: attempts for the request `rq` as `route` and `sel` decided, within
/// `timeouts.request` (from the request's arrival). The labels and the log get the
/// endpoint and the number of attempts either way.
pub async fn run(
    inputs: &Arc<Inputs>,
    local_ip: IpAddr,
    rq: &mut RequestContext,
    route: &RoutePlan,
    sel: &Selection,
    head: &RequestHead,
    body: &mut RequestBody,
) -> Result<Answered, LocalReply> {
    let origin = match &sel.tls {
        None => None,
        Some(tls) => {
            let model = inputs.model.load_full();
            let host = sel.host.as_deref().unwrap_or_default();
            match inputs.upstreams.origins.get(&model, tls, host) {
                Ok(origin) => Some(origin),
                Err(e) => {
                    return Err(LocalReply::new(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "upstream connect error",
                        Some(ResponseFlag::UpstreamFailure),
                        format!("{}: tls origination settings: {e}", sel.cluster.name()),
                    ))
                }
            }
        }
    };
    let plan = AttemptPlan {
        inputs,
        local_ip,
        backend: &route.backend,
        subset: route.subset.as_deref(),
        eps: &sel.eps,
        origin: origin.as_deref(),
        cluster: &sel.cluster,
        hash: sel.hash.key,
        proto: sel.proto,
        host: sel.host.clone(),
        per_try: route
            .retry_policy
            .per_try_timeout
            .or(route.timeouts.backend_request),
        policy: &route.retry_policy,
        authority: &route.authority,
        path: &route.path,
    };
    let mut progress = Progress::default();
    let attempts = forward(&plan, head, body, &mut progress);
    let result = match route.timeouts.request {
        Some(limit) => {
            let deadline = tokio::time::Instant::from_std(rq.started) + limit;
            match tokio::time::timeout_at(deadline, attempts).await {
                Ok(r) => r,
                Err(_) => Err(LocalReply::timeout(format!("request timeout {limit:?}"))),
            }
        }
        None => attempts.await,
    };
    rq.log.attempts = progress.attempts;
    if let Some(ep) = &progress.chosen {
        rq.labels.dst_pod = ep.pod.clone();
        rq.labels.dst_identity = ep.identity.clone();
    }
    match result {
        Ok((response, exhausted)) => {
            rq.log.upstream = progress.chosen.as_ref().map(|ep| ep.addr);
            Ok(Answered {
                response,
                exhausted,
                active: progress.active,
            })
        }
        Err(reply) => {
            if reply.flag == Some(ResponseFlag::UpstreamOverflow) {
                tracing::info!(request_id = %rq.log.request_id, reason = %reply.reason, "connection pool overflow");
            }
            Err(reply)
        }
    }
}

/// Attempts, one endpoint each, until one gives a response that is not retried.
/// A connect failure moves to the next endpoint (nothing was sent, always safe) up to
/// [`MAX_CONNECT_ATTEMPTS`] endpoints, and beyond that counts as a retry; other failures
/// and responses are retried when the policy's `retryOn` says so, retries remain and the
/// request may be sent again (buffered body, `may_replay`), after a jittered exponential backoff. `Ok((response, true))`:
/// the response is retriable but the retries ran out (`URX`).
async fn forward(
    plan: &AttemptPlan<'_>,
    head: &RequestHead,
    body: &mut RequestBody,
    progress: &mut Progress,
) -> Result<(Response<ResponseBody>, bool), LocalReply> {
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
                return Err(LocalReply::unavailable(
                    ResponseFlag::NoHealthyUpstream,
                    format!("{}: {e}", plan.cluster.name()),
                ))
            }
        };
        tried.push(ep.addr);
        progress.chosen = Some(ep.clone());
        progress.active = Some(in_flight);
        progress.attempts += 1;
        // Boxed: the connect and send futures are most of a request's state, and only the
        // attempt in progress needs them.
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
        report_outcome(plan, &ep, &outcome);
        let retriable = should_retry(&plan.policy.retry_on, &outcome);
        let replayable = body.replayable()
            && resilience::may_replay(&head.method, &outcome, &plan.policy.retry_on);
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

/// Hook: the endpoint for the next attempt (its cluster's balancer: consistent hash, least
/// request, random or round robin; ejected endpoints skipped), given the endpoints `tried`
/// so far: one not tried yet when there is one, else any (a retry may go back to the only
/// endpoint). The [`Active`] counts the request as in flight to it.
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
fn report_outcome(plan: &AttemptPlan<'_>, ep: &Endpoint, outcome: &AttemptOutcome) {
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
    plan: &AttemptPlan<'_>,
    ep: &Endpoint,
    head: &RequestHead,
    body: &mut RequestBody,
) -> Result<Response<ResponseBody>, (Option<AttemptOutcome>, LocalReply)> {
    let limits = plan.cluster.conn_limits();
    // Boxed: a dial (HBONE, TLS) is most of an attempt's state and only a new connection
    // needs it.
    let connect = Box::pin(plan.inputs.upstreams.checkout_limited(
        ep,
        plan.proto,
        plan.local_ip,
        plan.host.clone(),
        limits,
        plan.origin,
    ));
    let connected = match plan.per_try {
        Some(limit) => match tokio::time::timeout(limit, connect).await {
            Ok(r) => r,
            Err(_) => {
                return Err((
                    Some(AttemptOutcome::Timeout),
                    LocalReply::timeout(format!(
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
                LocalReply::overflow(format!(
                    "{}: {} pending requests for a connection to {} (http1MaxPendingRequests)",
                    plan.cluster.name(),
                    limits.max_pending.unwrap_or(0),
                    ep.addr
                )),
            );
        }
        tracing::debug!(error = %e, "endpoint failed");
        (
            Some(AttemptOutcome::ConnectFailure),
            LocalReply::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream connect error",
                Some(ResponseFlag::UpstreamFailure),
                e.to_string(),
            ),
        )
    })?;
    let Some(up_body) = body.take() else {
        return Err((
            Some(AttemptOutcome::Reset),
            LocalReply::reset("the streamed request body was already sent"),
        ));
    };
    let mut req = Request::new(up_body);
    *req.method_mut() = head.method.clone();
    *req.headers_mut() = head.headers.clone();
    let req = upstream_request(req, plan.authority, plan.path, plan.proto)
        .map_err(|reason| (Some(AttemptOutcome::Reset), LocalReply::bad_request(reason)))?;
    let send = plan.inputs.upstreams.send(ep, sender, req);
    let sent = match plan.per_try {
        Some(limit) => tokio::time::timeout(limit, send).await.map_err(|_| {
            (
                Some(AttemptOutcome::Timeout),
                LocalReply::timeout(format!("per-try timeout {limit:?} at {}", ep.addr)),
            )
        })?,
        None => send.await,
    };
    sent.map_err(|e| {
        if let Some(tls) = plan.origin.and_then(|_| crate::origin::tls_failure(&e)) {
            // The server refused the TLS we originated (TLS 1.3: after our handshake, e.g.
            // for want of a client certificate): nothing reached the application.
            return (
                Some(AttemptOutcome::ConnectFailure),
                LocalReply::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "upstream connect error",
                    Some(ResponseFlag::UpstreamFailure),
                    format!("upstream {}: tls origination: {tls}", ep.addr),
                ),
            );
        }
        let refused = format!("{e:?}").contains("REFUSED_STREAM");
        (
            Some(if refused {
                AttemptOutcome::RefusedStream
            } else {
                AttemptOutcome::Reset
            }),
            LocalReply::reset(format!("upstream {}: {e}", ep.addr)),
        )
    })
}

/// The request as it goes upstream: origin-form URI and `Host` for HTTP/1.1, absolute URI
/// (`:scheme`/`:authority`) for HTTP/2, both from `authority` (the request's one authority,
/// or a route's rewrite of it): a `Host` header in `req` is replaced. `Err` when the result
/// is not a valid request.
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
            let host = HeaderValue::from_str(authority)
                .map_err(|e| format!("authority {authority:?}: {e}"))?;
            parts.headers.insert(header::HOST, host);
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

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Empty};

    fn endpoints(n: usize) -> Vec<Endpoint> {
        (0..n)
            .map(|i| Endpoint {
                pod: Some(std::sync::Arc::new(mesh_model::model::Pod {
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
                })),
                addr: SocketAddr::from(([10, 0, 0, i as u8 + 1], 8080)),
                identity: None,
                via: None,
            })
            .collect()
    }

    #[test]
    fn attempts_prefer_endpoints_not_tried_yet_and_may_go_back_to_the_only_one() {
        let clusters = balance::Clusters::new(Default::default());
        let key = |name: &str| balance::ClusterKey {
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

    fn request(host: Option<&'static str>) -> Request<UpBody> {
        let mut req = Request::new(
            Empty::new()
                .map_err(|never: std::convert::Infallible| match never {})
                .boxed_unsync(),
        );
        if let Some(h) = host {
            req.headers_mut()
                .insert(header::HOST, HeaderValue::from_static(h));
        }
        req
    }

    #[test]
    fn http1_goes_in_origin_form_with_host_and_http2_in_absolute_form_without() {
        let r = upstream_request(request(None), "api.app", "/v1?q=1", UpstreamProto::Http1)
            .expect("valid");
        assert_eq!(r.version(), Version::HTTP_11);
        assert_eq!(r.uri(), "/v1?q=1");
        assert_eq!(r.headers()["host"], "api.app");
        let r = upstream_request(
            request(Some("web.app")),
            "api.app",
            "/v1",
            UpstreamProto::Http1,
        )
        .expect("valid");
        assert_eq!(
            r.headers()["host"],
            "api.app",
            "a client's Host never goes upstream: the one authority does"
        );
        let r = upstream_request(
            request(Some("web.app")),
            "api.app:80",
            "/v1",
            UpstreamProto::Http2,
        )
        .expect("valid");
        assert_eq!(r.version(), Version::HTTP_2);
        assert_eq!(r.uri(), "http://api.app:80/v1");
        assert!(r.headers().get("host").is_none());
        assert!(upstream_request(request(None), "bad host", "/", UpstreamProto::Http2).is_err());
    }
}
