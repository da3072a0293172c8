//! Port 15001 inside a pod (loopback): the pod's own outgoing TCP, captured by the pod's rules.
//!
//! original destination → Service VIP:port (round robin over ready endpoints, next one on
//! failure) or pod IP → in the mesh: HBONE to `<endpoint>:15008` presenting the source pod's
//! certificate and expecting the destination pod's identity; outside the mesh: plain TCP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use mesh::hbone::{self, ConnectHeaders, HboneError, PoolKey};
use mesh::identity::Identity;
use mesh::model::{Endpoint, Model, NamespacedName, Pod, Service};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{
    accept_loop, record_refusal, relay_counted, AccessLog, LabelInputs, PodCtx, ProxyInputs,
    ResponseFlag,
};
use crate::config::{Redirect, HBONE_PORT, RESERVED_PORTS};
use crate::socket;

const REPORTER: &str = "source";

pub async fn run(
    listener: TcpListener,
    pod: Arc<PodCtx>,
    pi: Arc<ProxyInputs>,
    stop: CancellationToken,
) {
    let ctx = pod.clone();
    accept_loop(listener, stop, "outbound", &ctx, |tcp, peer| {
        handle(tcp, peer, pod.clone(), pi.clone())
    })
    .await;
}

/// Where one attempt goes.
enum Hop<'a> {
    Hbone {
        pod: &'a Pod,
        identity: Identity,
        target: SocketAddr,
    },
    Plain {
        pod: Option<&'a Pod>,
        target: SocketAddr,
    },
}

/// The candidate hops for `dst`, in the order to try them.
fn plan<'a>(
    model: &'a Model,
    pi: &ProxyInputs,
    dst: SocketAddr,
) -> Result<(Option<&'a Service>, Vec<Hop<'a>>), ResponseFlag> {
    let td = &pi.cfg.trust_domain;
    let hop_to = |pod: &'a Pod, target: SocketAddr| {
        if model.is_ambient(pod) {
            Hop::Hbone {
                pod,
                identity: model.identity_of(pod, td),
                target,
            }
        } else {
            Hop::Plain {
                pod: Some(pod),
                target,
            }
        }
    };
    if let Some((svc, port)) = model.service_by_vip(dst.ip(), dst.port()) {
        let eps = model.endpoints(svc, port);
        if eps.is_empty() {
            return Err(ResponseFlag::NoHealthyUpstream);
        }
        let start = pi.next_index(&NamespacedName::new(&svc.namespace, &svc.name));
        let hops = (0..eps.len())
            .filter_map(|i| {
                let Endpoint { pod, ip, port } = &eps[(start + i) % eps.len()];
                let p = model.pod(&pod.namespace, &pod.name)?;
                Some(hop_to(p, SocketAddr::new(*ip, *port)))
            })
            .collect();
        return Ok((Some(svc), hops));
    }
    if let Some(p) = model.workload_by_ip(dst.ip()) {
        return Ok((None, vec![hop_to(p, dst)]));
    }
    Ok((
        None,
        vec![Hop::Plain {
            pod: None,
            target: dst,
        }],
    ))
}

async fn handle(tcp: TcpStream, peer: SocketAddr, pod: Arc<PodCtx>, pi: Arc<ProxyInputs>) {
    let model = pi.model.load_full();
    let mut log = AccessLog::new("outbound", peer, peer, Instant::now()).from(Some(&pod.identity));
    let labels = LabelInputs {
        reporter: REPORTER,
        src_pod: model.pod(&pod.key.namespace, &pod.key.name),
        src_identity: Some(&pod.identity),
        dst_pod: None,
        dst_identity: None,
        service: None,
        flag: None,
        mtls: false,
    };
    let refuse = |labels, log, flag, reason| record_refusal(&pi, labels, log, flag, reason);

    let dst = match socket::original_dst(&tcp, pi.cfg.redirect == Redirect::Nftables) {
        Ok(d) => d,
        Err(e) => {
            let reason = format!("original destination: {e}");
            return refuse(labels, log, ResponseFlag::NoOriginalDst, reason);
        }
    };
    log.dst = dst;
    let _flow = pod.track_flow(peer, tcp.local_addr());
    // A connection made straight to 127.0.0.1:15001 (not redirected) would loop forever.
    if dst.ip().is_loopback() && RESERVED_PORTS.contains(&dst.port()) {
        let reason = format!("{dst} is the agent itself");
        return refuse(labels, log, ResponseFlag::Loop, reason);
    }
    let (svc, hops) = match plan(&model, &pi, dst) {
        Ok(p) => p,
        Err(flag) => return refuse(labels, log, flag, format!("no ready endpoint for {dst}")),
    };
    let labels = LabelInputs {
        service: svc,
        ..labels
    };

    // Try each candidate in turn; the labels of a refusal name the last one tried.
    let mut failure = (labels, ResponseFlag::UpstreamFailure, String::new());
    for hop in &hops {
        match hop {
            Hop::Hbone {
                pod: dst_pod,
                identity,
                target,
            } => {
                let labels = LabelInputs {
                    dst_pod: Some(dst_pod),
                    dst_identity: Some(identity),
                    mtls: true,
                    ..labels
                };
                // Boxed: the dial + handshake state is large and only needed until the tunnel
                // opens; inline it would be carried by every connection for its whole life.
                match Box::pin(open_hbone(&pi, &pod, identity, *target, svc)).await {
                    Ok(tunnel) => {
                        let key = NamespacedName::new(&dst_pod.namespace, &dst_pod.name);
                        let mut log = log.to(Some(&key), Some(identity));
                        log.dst = *target;
                        return relay_counted(tcp, tunnel, &pi, &labels.build(), None, log).await;
                    }
                    Err(e) => {
                        let denied = matches!(&e, HboneError::Status(s) if s.as_u16() == 401);
                        let reason = format!("hbone to {target} ({identity}): {e}");
                        tracing::debug!(error = %reason, "endpoint failed");
                        if denied {
                            // A denial is a decision, not a failure: another endpoint would be
                            // judged by the same policy, so stop here.
                            return refuse(labels, log, ResponseFlag::UpstreamDenied, reason);
                        }
                        failure = (labels, ResponseFlag::UpstreamFailure, reason);
                    }
                }
            }
            Hop::Plain {
                pod: dst_pod,
                target,
            } => {
                let labels = LabelInputs {
                    dst_pod: *dst_pod,
                    ..labels
                };
                let timeout = pi.cfg.connect_timeout;
                match socket::connect_in(&pod.netns, &pi.home, *target, None, timeout, None).await {
                    Ok(up) => {
                        log.dst = *target;
                        return relay_counted(tcp, up, &pi, &labels.build(), None, log).await;
                    }
                    Err(e) => failure = (labels, ResponseFlag::UpstreamFailure, e.to_string()),
                }
            }
        }
    }
    let (labels, flag, reason) = failure;
    refuse(labels, log, flag, reason);
}

async fn open_hbone(
    pi: &ProxyInputs,
    pod: &PodCtx,
    dst_identity: &Identity,
    target: SocketAddr,
    svc: Option<&Service>,
) -> Result<hbone::H2Stream, HboneError> {
    // Built per connection (about 0.4 µs, and used only when the pool dials): no cache to keep
    // coherent; the certificate itself is resolved at each handshake, so rotation is picked up.
    let tls = mesh::tls::client_config(
        pi.certs.clone(),
        pod.identity.clone(),
        vec![dst_identity.clone()],
    )
    .map_err(|e| HboneError::Tls(std::io::Error::other(e.to_string())))?;
    let src_ip = pod.ips.first().copied().unwrap_or(target.ip());
    let hbone_addr = SocketAddr::new(target.ip(), HBONE_PORT);
    let key = PoolKey {
        src: pod.identity.clone(),
        src_ip,
        dst: dst_identity.clone(),
        dst_addr: hbone_addr,
    };
    let headers = ConnectHeaders {
        src_ip,
        service_host: svc.map(|s| s.hostname()),
        baggage: vec![
            ("k8s.namespace.name".to_string(), pod.key.namespace.clone()),
            ("k8s.pod.name".to_string(), pod.key.name.clone()),
        ],
        traceparent: None,
    };
    let req = hbone::connect_request(target, &headers);
    let netns = pod.netns.clone();
    let home = pi.home.clone();
    let timeout = pi.cfg.connect_timeout;
    let dial = move || async move {
        socket::connect_in(&netns, &home, hbone_addr, None, timeout, None)
            .await
            .map_err(std::io::Error::other)
    };
    pi.pool.connect(key, tls, dial, req).await
}
