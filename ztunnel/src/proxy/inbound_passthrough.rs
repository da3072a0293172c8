//! Port 15006 inside a pod: plaintext TCP that arrived at the pod from outside the mesh (or
//! from a workload without an agent), redirected here by the pod's rules.
//!
//! Allowed only when the workload's PeerAuthentication for that port is not STRICT, and then
//! only if AuthorizationPolicy allows a connection without identity.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mesh::model::PeerAuthnMode;
use mesh::policy::{self, Decision, L4Request};
use tokio::net::{TcpListener, TcpStream};
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
                    tracing::warn!(error = %e, "inbound plaintext accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let span = tracing::info_span!("inbound_plaintext", pod = %pod.key, peer = %peer);
        tokio::spawn(handle(tcp, peer, pod.clone(), pi.clone()).instrument(span));
    }
}

async fn handle(tcp: TcpStream, peer: SocketAddr, pod: Arc<PodCtx>, pi: Arc<ProxyInputs>) {
    let started = Instant::now();
    let _ = tcp.set_nodelay(true);
    let model = pi.model.load_full();
    let dst_pod = model.pod(&pod.key.namespace, &pod.key.name);
    let mut log = AccessLog {
        direction: "inbound_plaintext",
        src: peer,
        dst: tcp.local_addr().unwrap_or(peer),
        src_identity: None,
        dst_identity: Some(&pod.identity),
        dst_workload: Some(&pod.key),
        flag: None,
        reason: None,
        bytes_sent: 0,
        bytes_received: 0,
        started,
    };
    let labels = |flag| {
        LabelInputs {
            reporter: REPORTER,
            src_pod: model.workload_by_ip(peer.ip()),
            src_identity: None,
            dst_pod,
            dst_identity: Some(&pod.identity),
            service: None,
            flag,
            mtls: false,
        }
        .build()
    };
    let refuse = |mut log: AccessLog<'_>, flag: ResponseFlag, reason: String| {
        pi.metrics.refused(REPORTER, flag.as_str());
        let l = labels(Some(flag));
        pi.metrics.tcp_opened(&l);
        pi.metrics.tcp_closed(&l);
        log.flag = Some(flag);
        log.reason = Some(reason);
        log.emit();
        // Dropping the stream closes it before any byte is read from or sent to the app.
    };

    let dst = match socket::original_dst(&tcp) {
        Ok(d) => d,
        Err(e) => {
            return refuse(
                log,
                ResponseFlag::NoOriginalDst,
                format!("SO_ORIGINAL_DST: {e}"),
            )
        }
    };
    log.dst = dst;
    if RESERVED_PORTS.contains(&dst.port()) || !pod.ips.contains(&dst.ip()) {
        return refuse(
            log,
            ResponseFlag::Loop,
            format!("{dst} is an agent port or not this pod"),
        );
    }
    let Some(dst_pod_model) = dst_pod else {
        return refuse(
            log,
            ResponseFlag::NotServed,
            format!("{} left the model", pod.key),
        );
    };
    let mode = policy::peer_authn_mode(&model, dst_pod_model, dst.port());
    if mode == PeerAuthnMode::Strict {
        return refuse(
            log,
            ResponseFlag::PeerAuthn,
            format!(
                "plaintext to port {} refused: PeerAuthentication STRICT",
                dst.port()
            ),
        );
    }
    let request = L4Request {
        src_identity: None,
        src_ip: peer.ip(),
        dst_ip: dst.ip(),
        dst_port: dst.port(),
    };
    let policies = policy::policies_for(&model, dst_pod_model);
    if let Decision::Deny { policy } = policy::evaluate_l4(&policies, &request).decision {
        let reason = format!(
            "denied by {}",
            policy.as_deref().unwrap_or("no matching ALLOW policy")
        );
        return refuse(log, ResponseFlag::Deny, reason);
    }
    let cancel = CancellationToken::new();
    let _guard = pi.conns.register(TrackedConn {
        pod: pod.key.clone(),
        request,
        mtls: false,
        cancel: cancel.clone(),
    });
    let src = (pi.cfg.redirect != crate::config::Redirect::None).then_some(peer.ip());
    let upstream =
        match socket::connect_in(&pod.netns, &pi.home, dst, src, pi.cfg.connect_timeout).await {
            Ok(s) => s,
            Err(e) => return refuse(log, ResponseFlag::UpstreamFailure, e.to_string()),
        };
    let l = labels(None);
    pi.metrics.tcp_opened(&l);
    let counters = pi.metrics.tcp_counters(&l);
    let relay = mesh::hbone::relay(tcp, upstream, |dir, n| match dir {
        mesh::hbone::Direction::AToB => counters.received(n),
        mesh::hbone::Direction::BToA => counters.sent(n),
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
