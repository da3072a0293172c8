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
use tracing::Instrument;

use super::{AccessLog, LabelInputs, PodCtx, ProxyInputs, ResponseFlag};
use crate::config::{HBONE_PORT, RESERVED_PORTS};
use crate::socket;

const REPORTER: &str = "source";

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
                    tracing::warn!(error = %e, "outbound accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let span = tracing::info_span!("outbound", pod = %pod.key, peer = %peer);
        tokio::spawn(handle(tcp, peer, pod.clone(), pi.clone()).instrument(span));
    }
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
    let started = Instant::now();
    let _ = tcp.set_nodelay(true);
    let model = pi.model.load_full();
    let src_pod = model.pod(&pod.key.namespace, &pod.key.name);
    let mut log = AccessLog {
        direction: "outbound",
        src: peer,
        dst: peer,
        src_identity: Some(&pod.identity),
        dst_identity: None,
        dst_workload: None,
        flag: None,
        reason: None,
        bytes_sent: 0,
        bytes_received: 0,
        started,
    };
    // `hbone`: the in-mesh destination that refused or failed, for the labels.
    let refuse = |mut log: AccessLog<'_>,
                  flag: ResponseFlag,
                  reason: String,
                  svc: Option<&Service>,
                  hbone: Option<(&Pod, &Identity)>| {
        pi.metrics.refused(REPORTER, flag.as_str());
        let l = LabelInputs {
            reporter: REPORTER,
            src_pod,
            src_identity: Some(&pod.identity),
            dst_pod: hbone.map(|(p, _)| p),
            dst_identity: hbone.map(|(_, i)| i),
            service: svc,
            flag: Some(flag),
            mtls: hbone.is_some(),
        }
        .build();
        pi.metrics.tcp_opened(&l);
        pi.metrics.tcp_closed(&l);
        log.flag = Some(flag);
        log.reason = Some(reason);
        log.emit();
    };

    let dst = match socket::original_dst(&tcp) {
        Ok(d) => d,
        Err(e) => {
            return refuse(
                log,
                ResponseFlag::NoOriginalDst,
                format!("SO_ORIGINAL_DST: {e}"),
                None,
                None,
            )
        }
    };
    log.dst = dst;
    // A connection made straight to 127.0.0.1:15001 (not redirected) would loop forever.
    if dst.ip().is_loopback() && RESERVED_PORTS.contains(&dst.port()) {
        return refuse(
            log,
            ResponseFlag::Loop,
            format!("{dst} is the agent itself"),
            None,
            None,
        );
    }
    let (svc, hops) = match plan(&model, &pi, dst) {
        Ok(p) => p,
        Err(flag) => {
            return refuse(
                log,
                flag,
                format!("no ready endpoint for {dst}"),
                None,
                None,
            )
        }
    };

    let mut last_err = String::new();
    let mut last_flag = ResponseFlag::UpstreamFailure;
    let mut last_hbone = None;
    for hop in &hops {
        match hop {
            Hop::Hbone {
                pod: dst_pod,
                identity,
                target,
            } => {
                match open_hbone(&pi, &pod, identity, *target, svc).await {
                    Ok(tunnel) => {
                        log.dst = *target;
                        log.dst_identity = Some(identity);
                        let key = NamespacedName::new(&dst_pod.namespace, &dst_pod.name);
                        log.dst_workload = Some(&key);
                        let labels = LabelInputs {
                            reporter: REPORTER,
                            src_pod,
                            src_identity: Some(&pod.identity),
                            dst_pod: Some(dst_pod),
                            dst_identity: Some(identity),
                            service: svc,
                            flag: None,
                            mtls: true,
                        }
                        .build();
                        return relay(tcp, tunnel, &pi, &labels, log).await;
                    }
                    Err(e) => {
                        last_hbone = Some((*dst_pod, identity));
                        last_flag = match &e {
                            HboneError::Status(s) if s.as_u16() == 401 => {
                                ResponseFlag::UpstreamDenied
                            }
                            _ => ResponseFlag::UpstreamFailure,
                        };
                        last_err = format!("hbone to {target} ({identity}): {e}");
                        tracing::debug!(error = %last_err, "endpoint failed, trying the next");
                        // A denial is a decision, not a failure: another endpoint would be
                        // judged by the same policy, so stop here.
                        if last_flag == ResponseFlag::UpstreamDenied {
                            break;
                        }
                    }
                }
            }
            Hop::Plain {
                pod: dst_pod,
                target,
            } => {
                match socket::connect_in(
                    &pod.netns,
                    &pi.home,
                    *target,
                    None,
                    pi.cfg.connect_timeout,
                )
                .await
                {
                    Ok(up) => {
                        log.dst = *target;
                        let labels = LabelInputs {
                            reporter: REPORTER,
                            src_pod,
                            src_identity: Some(&pod.identity),
                            dst_pod: *dst_pod,
                            dst_identity: None,
                            service: svc,
                            flag: None,
                            mtls: false,
                        }
                        .build();
                        return relay(tcp, up, &pi, &labels, log).await;
                    }
                    Err(e) => {
                        last_hbone = None;
                        last_err = e.to_string();
                    }
                }
            }
        }
    }
    refuse(log, last_flag, last_err, svc, last_hbone);
}

async fn open_hbone(
    pi: &ProxyInputs,
    pod: &PodCtx,
    dst_identity: &Identity,
    target: SocketAddr,
    svc: Option<&Service>,
) -> Result<hbone::H2Stream, HboneError> {
    let tls = pi
        .client_tls(&pod.identity, dst_identity)
        .map_err(|e| HboneError::Tls(std::io::Error::other(e.to_string())))?;
    let src_ip = pod.ips.first().copied().unwrap_or(target.ip());
    let key = PoolKey {
        src: pod.identity.clone(),
        src_ip,
        dst: dst_identity.clone(),
        dst_addr: SocketAddr::new(target.ip(), HBONE_PORT),
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
        socket::connect_in(&netns, &home, key_addr(target), None, timeout)
            .await
            .map_err(std::io::Error::other)
    };
    pi.pool.connect(key, tls, dial, req).await
}

fn key_addr(target: SocketAddr) -> SocketAddr {
    SocketAddr::new(target.ip(), HBONE_PORT)
}

async fn relay<S>(
    tcp: TcpStream,
    upstream: S,
    pi: &ProxyInputs,
    labels: &mesh::metrics::TcpLabels,
    mut log: AccessLog<'_>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    pi.metrics.tcp_opened(labels);
    let counters = pi.metrics.tcp_counters(labels);
    let result = hbone::relay(tcp, upstream, |dir, n| match dir {
        hbone::Direction::AToB => counters.received(n),
        hbone::Direction::BToA => counters.sent(n),
    })
    .await;
    match result {
        Ok((up, down)) => {
            log.bytes_received = up;
            log.bytes_sent = down;
        }
        Err(e) => tracing::debug!(error = %e, "relay ended with an error"),
    }
    pi.metrics.tcp_closed(labels);
    log.emit();
}
