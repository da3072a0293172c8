//! Port 15006 inside a pod: plaintext TCP that arrived at the pod from outside the mesh (or
//! from a workload without an agent), redirected here by the pod's rules.
//!
//! With `--redirect loopback` the client names the destination with SOCKS5 instead.
//!
//! Allowed only when the workload's PeerAuthentication for that port is not STRICT, and then
//! only if AuthorizationPolicy allows a connection without identity.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mesh_model::policy::L4Request;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{
    accept_loop, record_refusal, relay_counted, AccessLog, LabelInputs, PodCtx, ProxyInputs,
    ResponseFlag,
};
use super::{with_original_dst, Accepted};
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
    let open = pi.open.clone();
    accept_loop(
        listener,
        stop,
        "inbound_plaintext",
        (&ctx, &open),
        |tcp, peer| handle(tcp, peer, pod.clone(), pi.clone()),
    )
    .await;
}

pub(crate) fn handle(
    tcp: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodCtx>,
    pi: Arc<ProxyInputs>,
) -> impl std::future::Future<Output = ()> + Send {
    with_original_dst(tcp, peer, pod, pi, serve)
}

async fn serve(accepted: Box<Accepted>) {
    let Accepted {
        tcp,
        dst,
        peer,
        pod,
        pi,
    } = *accepted;
    let model = pi.model.load_full();
    let local = tcp.local_addr().unwrap_or(peer);
    let mut log = AccessLog::new("inbound_plaintext", peer, local, Instant::now())
        .to(Some(&pod.key), Some(&pod.identity));
    let labels = LabelInputs {
        reporter: REPORTER,
        src_pod: model.workload_by_ip(peer.ip()),
        src_identity: None,
        dst_pod: model.pod(&pod.key.namespace, &pod.key.name),
        dst_identity: Some(&pod.identity),
        service: None,
        flag: None,
        mtls: false,
    };
    // Returning drops the stream: closed before any byte is read from or sent to the app.
    let refuse = |log, flag, reason| record_refusal(&pi, labels, log, flag, reason);

    let dst = match dst {
        Ok(d) => d,
        Err(e) => {
            let reason = format!("original destination: {e}");
            return refuse(log, ResponseFlag::NoOriginalDst, reason);
        }
    };
    log.dst = dst;
    if RESERVED_PORTS.contains(&dst.port()) || !pod.ips.contains(&dst.ip()) {
        let reason = format!("{dst} is an agent port or not this pod");
        return refuse(log, ResponseFlag::Loop, reason);
    }
    let admission = Admission {
        pod: pod.key.clone(),
        request: L4Request {
            src_identity: None,
            src_ip: peer.ip(),
            dst_ip: dst.ip(),
            dst_port: dst.port(),
        },
        mtls: false,
    };
    if let Err(why) = admit(&model, &admission) {
        return refuse(log, why.flag(), why.to_string());
    }
    let cancel = CancellationToken::new();
    let _tracked = pi.conns.register(TrackedConn {
        admission,
        cancel: cancel.clone(),
    });
    let (app, _flow) = match pod.deliver(&pi, dst, peer.ip()).await {
        Ok(x) => x,
        Err(e) => return refuse(log, ResponseFlag::UpstreamFailure, e.to_string()),
    };
    relay_counted(
        tcp,
        app,
        &pi,
        pi.metrics.intern(labels.build()),
        Some(&cancel),
        log,
    )
    .await;
}
