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
    accept_loop, inbound_labels, record_refusal, relay_counted, AccessLog, PodCtx, ProxyInputs,
    ResponseFlag,
};
use super::{with_original_dst, Accepted};
use crate::config::RESERVED_PORTS;
use crate::conns::{admit, Admission, TrackedConn};

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
        "inbound_plaintext",
        &ctx,
        &inputs,
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
    } = accepted.into_inner();
    let model = pi.model.load_full();
    let cancel = CancellationToken::new();
    // What only opening the connection needs is scoped to this block: this future is held for
    // the connection's whole life (`sizes.rs`).
    let (relay, _tracked, _flow) = {
        let local = tcp.local_addr().unwrap_or(peer);
        let mut log = AccessLog::new("inbound_plaintext", peer, local, Instant::now())
            .to(Some(pod.key.parts()), Some(&pod.identity));
        let labels = inbound_labels(&model, &pod, peer, None);
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
        let tracked = pi.conns.register(TrackedConn {
            admission,
            cancel: cancel.clone(),
        });
        // Boxed: the dial's state is over once the application's socket is connected.
        let (app, flow) = match Box::pin(pod.deliver(&pi, dst, peer.ip())).await {
            Ok(x) => x,
            Err(e) => return refuse(log, ResponseFlag::UpstreamFailure, e.to_string()),
        };
        let labels = pi.metrics.intern(labels.build());
        let relay = relay_counted(tcp, app, &pi, labels, Some(&cancel), log);
        (relay, tracked, flow)
    };
    relay.await
}
