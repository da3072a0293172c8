//! Port 15008 inside a pod: HBONE from other workloads.
//!
//! accept → TLS 1.3 (client certificate required) → HTTP/2 → per CONNECT stream:
//! validate method and `:authority` → policy → dial the app with the client's source IP → 200 →
//! relay. Nothing is dialled and no byte reaches the app before policy has allowed it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::{Method, StatusCode};
use mesh::hbone::{self, InboundRequest};
use mesh::identity::Identity;
use mesh::policy::{self, Decision, L4Request};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{AccessLog, LabelInputs, PodCtx, ProxyInputs, ResponseFlag};
use crate::config::RESERVED_PORTS;
use crate::conns::TrackedConn;
use crate::socket;

const REPORTER: &str = "destination";

pub async fn run(
    listener: TcpListener,
    pod: Arc<PodCtx>,
    pi: Arc<ProxyInputs>,
    stop: CancellationToken,
) {
    loop {
        let (tcp, peer) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: shed this one, keep serving.
                    tracing::warn!(error = %e, "hbone accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let span = tracing::info_span!("inbound", pod = %pod.key, peer = %peer);
        tokio::spawn(handle_conn(tcp, peer, pod.clone(), pi.clone()).instrument(span));
    }
}

async fn handle_conn(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    pod: Arc<PodCtx>,
    pi: Arc<ProxyInputs>,
) {
    let _ = tcp.set_nodelay(true);
    let local = tcp.local_addr().unwrap_or(peer);
    let acceptor = tokio_rustls::TlsAcceptor::from(pod.server_tls.clone());
    let refuse = |reason: String| {
        pi.metrics.refused(REPORTER, ResponseFlag::Tls.as_str());
        AccessLog {
            direction: "inbound",
            src: peer,
            dst: local,
            src_identity: None,
            dst_identity: Some(&pod.identity),
            dst_workload: Some(&pod.key),
            flag: Some(ResponseFlag::Tls),
            reason: Some(reason),
            bytes_sent: 0,
            bytes_received: 0,
            started: Instant::now(),
        }
        .emit();
    };
    let tls = match tokio::time::timeout(pi.cfg.tls_handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return refuse(format!("tls handshake: {e}")),
        Err(_) => return refuse("tls handshake timed out".to_string()),
    };
    let peer_id = match mesh::tls::peer_identity(tls.get_ref().1) {
        Ok(id) => id,
        Err(e) => return refuse(format!("peer identity: {e}")),
    };
    let cfg = hbone::ServerConfig::default();
    let peer_id = Arc::new(peer_id);
    let drain = pi.drain.clone().cancelled_owned();
    let result = hbone::serve_with_drain(
        tls,
        &cfg,
        move |req| handle_stream(req, peer, local, peer_id.clone(), pod.clone(), pi.clone()),
        drain,
    )
    .await;
    if let Err(e) = result {
        tracing::debug!(error = %e, "hbone connection ended with an error");
    }
}

async fn handle_stream(
    req: InboundRequest,
    peer: SocketAddr,
    local: SocketAddr,
    peer_id: Arc<Identity>,
    pod: Arc<PodCtx>,
    pi: Arc<ProxyInputs>,
) {
    let started = Instant::now();
    let model = pi.model.load_full();
    let dst_pod = model.pod(&pod.key.namespace, &pod.key.name);
    let mut log = AccessLog {
        direction: "inbound",
        src: peer,
        dst: local,
        src_identity: Some(&peer_id),
        dst_identity: Some(&pod.identity),
        dst_workload: Some(&pod.key),
        flag: None,
        reason: None,
        bytes_sent: 0,
        bytes_received: 0,
        started,
    };
    let labels = |flag: Option<ResponseFlag>| {
        LabelInputs {
            reporter: REPORTER,
            src_pod: model.workload_by_ip(peer.ip()),
            src_identity: Some(&peer_id),
            dst_pod,
            dst_identity: Some(&pod.identity),
            service: None,
            flag,
            mtls: true,
        }
        .build()
    };
    // Refusals are answered, logged and counted the same way whatever the cause.
    let refuse = |req: InboundRequest,
                  mut log: AccessLog<'_>,
                  status: StatusCode,
                  flag: ResponseFlag,
                  reason: String| {
        req.reject(status);
        pi.metrics.refused(REPORTER, flag.as_str());
        let l = labels(Some(flag));
        pi.metrics.tcp_opened(&l);
        pi.metrics.tcp_closed(&l);
        log.flag = Some(flag);
        log.reason = Some(reason);
        log.emit();
    };

    if req.method() != Method::CONNECT {
        let reason = format!("method {} is not CONNECT", req.method());
        return refuse(
            req,
            log,
            StatusCode::METHOD_NOT_ALLOWED,
            ResponseFlag::BadRequest,
            reason,
        );
    }
    let dst = match req.authority() {
        Ok(a) => a,
        Err(e) => {
            let reason = format!("bad :authority: {e}");
            return refuse(
                req,
                log,
                StatusCode::BAD_REQUEST,
                ResponseFlag::BadRequest,
                reason,
            );
        }
    };
    log.dst = dst;
    if !pod.ips.contains(&dst.ip()) {
        let reason = format!("{dst} is not served by {}", pod.key);
        return refuse(
            req,
            log,
            StatusCode::UNAUTHORIZED,
            ResponseFlag::NotServed,
            reason,
        );
    }
    if RESERVED_PORTS.contains(&dst.port()) {
        let reason = format!("{dst} is an agent port");
        return refuse(
            req,
            log,
            StatusCode::UNAUTHORIZED,
            ResponseFlag::Loop,
            reason,
        );
    }
    let Some(dst_pod_model) = dst_pod else {
        let reason = format!("{} is no longer in the model", pod.key);
        return refuse(
            req,
            log,
            StatusCode::SERVICE_UNAVAILABLE,
            ResponseFlag::NotServed,
            reason,
        );
    };
    let request = L4Request {
        src_identity: Some((*peer_id).clone()),
        src_ip: peer.ip(),
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    let policies = policy::policies_for(&model, dst_pod_model);
    let eval = policy::evaluate_l4(&policies, &request);
    if let Decision::Deny { policy } = eval.decision {
        let reason = format!(
            "denied by {}",
            policy.as_deref().unwrap_or("no matching ALLOW policy")
        );
        return refuse(
            req,
            log,
            StatusCode::UNAUTHORIZED,
            ResponseFlag::Deny,
            reason,
        );
    }

    let cancel = CancellationToken::new();
    let _guard = pi.conns.register(TrackedConn {
        pod: pod.key.clone(),
        request,
        mtls: true,
        cancel: cancel.clone(),
    });
    let src = (pi.cfg.redirect != crate::config::Redirect::None).then_some(peer.ip());
    let upstream =
        match socket::connect_in(&pod.netns, &pi.home, dst, src, pi.cfg.connect_timeout).await {
            Ok(s) => s,
            Err(e) => {
                let reason = e.to_string();
                return refuse(
                    req,
                    log,
                    StatusCode::SERVICE_UNAVAILABLE,
                    ResponseFlag::UpstreamFailure,
                    reason,
                );
            }
        };
    let tunnel = match req.accept() {
        Ok(t) => t,
        Err(e) => {
            tracing::debug!(error = %e, "client went away before the tunnel opened");
            return;
        }
    };
    let l = labels(None);
    pi.metrics.tcp_opened(&l);
    let counters = pi.metrics.tcp_counters(&l);
    let relay = hbone::relay(tunnel, upstream, |dir, n| match dir {
        hbone::Direction::AToB => counters.received(n),
        hbone::Direction::BToA => counters.sent(n),
    });
    let (up, down) = tokio::select! {
        r = relay => r.unwrap_or((0, 0)),
        _ = cancel.cancelled() => {
            log.flag = Some(ResponseFlag::Revoked);
            log.reason = Some("policy changed".to_string());
            (0, 0)
        }
    };
    pi.metrics.tcp_closed(&l);
    log.bytes_received = up;
    log.bytes_sent = down;
    log.emit();
}
