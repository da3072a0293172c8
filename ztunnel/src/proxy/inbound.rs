//! Port 15008 inside a pod: HBONE from other workloads.
//!
//! accept → TLS 1.3 (client certificate required) → HTTP/2 → per CONNECT stream:
//! validate method and `:authority` → admission (policy) → dial the app with the client's
//! source IP → 200 → relay. Nothing is dialled and no byte reaches the app before policy has
//! allowed it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, StatusCode};
use mesh_hbone::{self as hbone, InboundRequest};
use mesh_model::identity::Identity;
use mesh_model::policy::L4Request;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{
    accept_loop, inbound_labels, record_refusal, relay_counted, AccessLog, PodCtx, ProxyInputs,
    ResponseFlag,
};
use crate::config::RESERVED_PORTS;
use crate::conns::{admit, Admission, TrackedConn};

const REPORTER: &str = "destination";

pub async fn run(
    listener: TcpListener,
    pod: Arc<PodCtx>,
    pi: Arc<ProxyInputs>,
    stop: CancellationToken,
) {
    let ctx = pod.clone();
    let inputs = pi.clone();
    accept_loop(
        listener,
        stop,
        "inbound_hbone",
        &ctx,
        &inputs,
        |tcp, peer| on_next_worker(tcp, peer, pod.clone(), pi.clone()),
    )
    .await;
}

/// Serves an accepted HBONE connection on the next data worker in turn (where its streams,
/// their deliveries to the app and their relays then stay), or here on a shared runtime.
/// The accepting task keeps the connection's place in the counts and caps until it ends.
async fn on_next_worker(tcp: TcpStream, peer: SocketAddr, pod: Arc<PodCtx>, pi: Arc<ProxyInputs>) {
    let Some(worker) = pi.workers.next().cloned() else {
        return handle_conn(tcp, peer, pod, pi).await;
    };
    let span = tracing::Span::current();
    let serve = move |tcp| handle_conn(tcp, peer, pod, pi).instrument(span);
    if let Some(served) = mesh_shell::workers::serve_on(&worker, tcp, serve) {
        let _ = served.await;
    }
}

pub(crate) async fn handle_conn(
    tcp: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodCtx>,
    pi: Arc<ProxyInputs>,
) {
    let local = tcp.local_addr().unwrap_or(peer);
    let acceptor = tokio_rustls::TlsAcceptor::from(pod.server_tls.clone());
    let refuse = |reason: String| {
        let model = pi.model.load();
        let labels = inbound_labels(&model, &pod, peer, None);
        let log = AccessLog::new("inbound", peer, local, Instant::now())
            .to(Some(pod.key.parts()), Some(&pod.identity));
        record_refusal(&pi, labels, log, ResponseFlag::Tls, reason);
    };
    // Over the cap on handshakes in progress: closed at once, never queued.
    let Some(handshake_slot) = pi
        .handshake_cap
        .admit(&pi.metrics, REPORTER, "inbound_hbone", peer)
    else {
        return;
    };
    // Boxed: the handshake state is large and needed only until the connection is up.
    let handshake = Box::pin(acceptor.accept(tcp));
    let tls = match tokio::time::timeout(pi.cfg.tls_handshake_timeout, handshake).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return refuse(format!("tls handshake: {e}")),
        Err(_) => return refuse("tls handshake timed out".to_string()),
    };
    drop(handshake_slot);
    let peer_id = match mesh_pki::tls::peer_identity(tls.get_ref().1) {
        Ok(id) => Arc::new(id),
        Err(e) => return refuse(format!("peer identity: {e}")),
    };
    let cfg = pi.hbone_server.clone();
    // GOAWAY when the agent shuts down or the pod is released: no new streams, open ones finish.
    let (agent_drain, pod_released) = (pi.drain.clone(), pod.stop.clone());
    let drain = async move {
        tokio::select! {
            _ = agent_drain.cancelled() => {}
            _ = pod_released.cancelled() => {}
        }
    };
    let metrics = pi.metrics.clone();
    let result = hbone::serve_with_drain(
        tls,
        &cfg,
        move |req| handle_stream(req, peer, local, peer_id.clone(), pod.clone(), pi.clone()),
        drain,
    )
    .await;
    // A peer that crossed a limit (flood, rapid reset, no answer to PING) is counted by
    // reason, e.g. `H2_PING_FLOOD`; no room for its receive window is `OM`.
    mesh_shell::limits::hbone_conn_ended(&metrics, REPORTER, "inbound_hbone", peer, &cfg, result);
}

/// Validates one CONNECT stream; `Err` is the answer, flag and reason of a refusal.
fn check_connect(
    req: &InboundRequest,
    pod: &PodCtx,
) -> Result<SocketAddr, (StatusCode, ResponseFlag, String)> {
    if req.method() != Method::CONNECT {
        return Err((
            StatusCode::METHOD_NOT_ALLOWED,
            ResponseFlag::BadRequest,
            format!("method {} is not CONNECT", req.method()),
        ));
    }
    let dst = req.authority().map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            ResponseFlag::BadRequest,
            format!("bad :authority: {e}"),
        )
    })?;
    if !pod.ips.contains(&dst.ip()) {
        return Err((
            StatusCode::UNAUTHORIZED,
            ResponseFlag::NotServed,
            format!("{dst} is not served by {}", pod.key),
        ));
    }
    if RESERVED_PORTS.contains(&dst.port()) {
        return Err((
            StatusCode::UNAUTHORIZED,
            ResponseFlag::Loop,
            format!("{dst} is an agent port"),
        ));
    }
    Ok(dst)
}

#[allow(
    clippy::manual_async_fn,
    reason = "an async fn stores its arguments twice"
)]
pub(crate) fn handle_stream(
    req: InboundRequest,
    peer: SocketAddr,
    local: SocketAddr,
    peer_id: Arc<Identity>,
    pod: Arc<PodCtx>,
    pi: Arc<ProxyInputs>,
) -> impl std::future::Future<Output = ()> + Send {
    // An `async` block, not an `async fn` (whose arguments take room twice), and what only
    // opening the stream needs is scoped to the inner block: this future is held for the
    // tunnel's whole life (`sizes.rs`).
    async move {
        let model = pi.model.load_full();
        let cancel = CancellationToken::new();
        let (relay, _tracked, _flow) = {
            let mut log = AccessLog::new("inbound", peer, local, Instant::now())
                .from(Some(&peer_id))
                .to(Some(pod.key.parts()), Some(&pod.identity));
            let labels = inbound_labels(&model, &pod, peer, Some(&peer_id));
            let refuse = |req: InboundRequest, log, (status, flag, reason)| {
                req.reject(status);
                record_refusal(&pi, labels, log, flag, reason);
            };

            let dst = match check_connect(&req, &pod) {
                Ok(dst) => dst,
                Err(refusal) => return refuse(req, log, refusal),
            };
            log.dst = dst;
            let admission = Admission {
                pod: pod.key.clone(),
                request: L4Request {
                    src_identity: Some((*peer_id).clone()),
                    src_ip: peer.ip(),
                    dst_ip: dst.ip(),
                    dst_port: dst.port(),
                },
                mtls: true,
            };
            if let Err(why) = admit(&model, &admission) {
                let status = match why {
                    crate::conns::NotAllowed::PodGone => StatusCode::SERVICE_UNAVAILABLE,
                    _ => StatusCode::UNAUTHORIZED,
                };
                return refuse(req, log, (status, why.flag(), why.to_string()));
            }
            let tracked = pi.conns.register(TrackedConn {
                admission,
                cancel: cancel.clone(),
            });
            // Boxed: the dial's state is over once the application's socket is connected.
            let (app, flow) = match Box::pin(pod.deliver(&pi, dst, peer.ip())).await {
                Ok(x) => x,
                Err(e) => {
                    let refusal = (
                        StatusCode::SERVICE_UNAVAILABLE,
                        ResponseFlag::UpstreamFailure,
                        e.to_string(),
                    );
                    return refuse(req, log, refusal);
                }
            };
            let tunnel = match req.accept() {
                Ok(t) => t,
                Err(e) => {
                    tracing::debug!(error = %e, "client went away before the tunnel opened");
                    return;
                }
            };
            let labels = pi.metrics.intern(labels.build());
            let relay = relay_counted(tunnel, app, &pi, labels, Some(&cancel), log);
            (relay, tracked, flow)
        };
        relay.await
    }
}
