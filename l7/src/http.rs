//! HTTP on a tunnel: hyper serves HTTP/1.1 or HTTP/2 on the decrypted CONNECT stream, and
//! every request is driven through the phases of [`crate::engine`] in order: downstream,
//! authenticate, authorize, route, fault, select, body, mirror, attempts, respond. A phase
//! that answers the request itself returns a [`LocalReply`], rendered in one place.
//!
//! Errors are classified by where they come from ([`ResponseFlag`]): JWT (`JWT`, 401),
//! policy (`DENY`, 403), no matching rule (`NR`, 404), no usable backend (`NC`, 500), no
//! endpoint (`UH`, 503), connect failure (`UF`, 503), upstream reset before a response (`UC`,
//! 503), timeout (`UT`, 504), connection-pool overflow (`UO`, 503), a request that cannot be
//! forwarded (`BADREQ`, 400), downstream gone (`DC`), retries exhausted (`URX`), fault delay
//! (`DI`) and abort (`FI`); a gRPC request gets them gRPC-shaped ([`crate::engine::reply`]).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use crate::engine::attempts::RequestHead;
use crate::engine::response::{Forwarded, Held, Observed};
use crate::engine::{
    attempts, authn, authz, body, downstream, fault, mirrors, response, route, select, LocalReply,
    RequestContext, Scope,
};
use crate::io::Io;
use crate::proxy::{ConnCtx, Inputs};
#[cfg(doc)]
use crate::telemetry::ResponseFlag;

/// Largest request head accepted (HTTP/1.1 buffer, HTTP/2 header list).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;
/// Concurrent requests on one downstream HTTP/2 connection.
pub const MAX_CONCURRENT_STREAMS: u32 = 1000;
/// Rapid-reset bound (CVE-2023-44487): streams reset before we answered.
const MAX_PENDING_ACCEPT_RESET_STREAMS: usize = 20;

/// Serves HTTP on one tunnel until the client closes it or the proxy drains.
pub async fn serve<I: Io>(io: I, h2: bool, ctx: Arc<ConnCtx>, inputs: Arc<Inputs>) {
    let drain = inputs.drain.clone();
    let metrics = inputs.http_metrics.clone();
    let (budget, refused) = (inputs.receive_budget.clone(), inputs.metrics.clone());
    let svc = service_fn(move |req| {
        let (ctx, inputs) = (ctx.clone(), inputs.clone());
        async move { Ok::<_, Infallible>(handle(req, &ctx, &inputs, h2).await) }
    });
    let io = TokioIo::new(io);
    let result = if h2 {
        // HTTP/2 buffers what the client sends ahead of the handlers: the window comes from
        // the process's budget and is held until the connection is gone.
        let Some(window) = budget.reserve(mesh_hbone::CONNECTION_WINDOW) else {
            // Counted (OM); logged at debug only: a flood must not fill the disk.
            refused.refused(crate::telemetry::REPORTER, "OM");
            tracing::debug!("downstream http/2 refused: the receive-buffer budget is spent");
            return;
        };
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
            .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESET_STREAMS)
            .initial_stream_window_size(window.stream_window(mesh_hbone::STREAM_WINDOW))
            .initial_connection_window_size(window.window());
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
        let reason = protocol_error(&e);
        if let Some(reason) = reason {
            metrics.downstream_error(reason);
        }
        // Debug: a flood of malformed requests must not flood the log; the metric counts.
        tracing::debug!(error = %e, h2, ?reason, "downstream http connection ended with an error");
    }
}

/// What a downstream connection's error says about the client, when it is the client's
/// fault: hyper answered a malformed HTTP/1.1 head with its own `400` (obs-fold, whitespace
/// before the colon, CR/LF/NUL in a header, conflicting lengths, a bad chunk size...) or a
/// head too large with `431`, or the HTTP/2 peer broke the protocol. `None` for a client
/// that just went away, a timeout or a drain.
fn protocol_error(e: &hyper::Error) -> Option<&'static str> {
    if e.is_parse_too_large() {
        Some("head_too_large")
    } else if e.is_parse() || e.is_parse_status() {
        Some("malformed_request")
    } else if std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<h2::Error>())
        .and_then(h2::Error::reason)
        .is_some_and(|r| {
            [
                h2::Reason::PROTOCOL_ERROR,
                h2::Reason::FRAME_SIZE_ERROR,
                h2::Reason::COMPRESSION_ERROR,
                h2::Reason::FLOW_CONTROL_ERROR,
                h2::Reason::ENHANCE_YOUR_CALM,
            ]
            .contains(&r)
        })
    {
        Some("http2_protocol")
    } else {
        None
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
    let (parts, body) = req.into_parts();
    let model = inputs.model.load_full();
    let mut rq = downstream::accept(
        parts,
        ctx,
        &model,
        downstream_h2,
        started,
        inputs.cfg.num_trusted_proxies,
        inputs.access_log.enabled(),
    );
    match phases(&mut rq, body, model, ctx, inputs).await {
        Ok(fwd) => response::respond(rq, fwd, &inputs.http_metrics),
        Err(reply) => reply.render(rq, &inputs.http_metrics),
    }
}

/// Phases 1 to 9 for the request `rq`: what came back from upstream, or the local reply.
async fn phases(
    rq: &mut RequestContext,
    body: Incoming,
    model: Arc<mesh_model::model::Model>,
    ctx: &ConnCtx,
    inputs: &Arc<Inputs>,
) -> Result<Forwarded, LocalReply> {
    let scope = Scope {
        gateway: &inputs.cfg.gateway,
        trust_domain: &inputs.cfg.trust_domain,
    };
    let resolved = ctx
        .target
        .lookup_with(&model, scope.trust_domain, &ctx.hosts);
    rq.labels.service = resolved.as_ref().and_then(|r| r.service).cloned();
    downstream::verdict(rq)?;
    let path = downstream::normalize(rq)?;
    let auth = authn::run(&model, scope.gateway, inputs, ctx, rq, &path)?;
    authz::run(
        &model,
        scope.gateway,
        ctx,
        rq,
        &path.path_and_query(),
        auth.as_ref(),
    )?;
    let plan = route::run(
        &model,
        scope.gateway,
        ctx,
        rq,
        resolved.as_ref(),
        &path,
        rand::random(),
    )?;
    let delayed = fault::run(plan.fault.as_ref()).await?;
    let mut sel = select::run(
        &model,
        scope,
        &inputs.upstreams.clusters,
        ctx,
        rq,
        resolved,
        &plan,
        &path,
    )?;
    // Endpoints and policy are chosen: the attempts do not keep this model alive.
    drop(model);
    let mut body = body::run(body, &rq.parts.headers, rq.req_bytes.clone()).await?;
    let head = RequestHead {
        method: rq.parts.method.clone(),
        headers: rq.parts.headers.clone(),
    };
    let targets = std::mem::take(&mut sel.mirrors);
    mirrors::run(inputs, ctx.local.ip(), targets, &head, &body, &plan);
    // Boxed: only a forwarded request needs the attempts' state (see `sizes`).
    let answered = Box::pin(attempts::run(
        inputs,
        ctx.local.ip(),
        rq,
        &plan,
        &sel,
        &head,
        &mut body,
    ))
    .await?;
    Ok(Forwarded {
        response: answered.response,
        exhausted: answered.exhausted,
        delayed,
        response_mods: plan.response_mods,
        set_cookie: sel.hash.set_cookie,
        held: Held {
            request: sel.slot,
            endpoint: answered.active,
        },
    })
}

#[cfg(test)]
#[path = "http_sizes.rs"]
mod sizes;

#[cfg(test)]
#[path = "http_tests.rs"]
mod tests;
