//! Port 15001 inside a pod (loopback): the pod's own outgoing TCP, captured by the pod's rules.
//!
//! original destination → Service VIP:port (round robin over ready endpoints, next one on
//! failure) or pod IP → in the mesh: HBONE to `<endpoint>:15008` presenting the source pod's
//! certificate and expecting the destination pod's identity; outside the mesh: plain TCP.
//!
//! A destination that uses a waypoint (`istio.io/use-waypoint` on the Service, or on the pod
//! for traffic to its IP; see `mesh_model::model::waypoint`) goes to the waypoint instead: HBONE to
//! `<waypoint-ip>:15008`, expecting the waypoint's identity, `:authority` = the original
//! destination (the VIP:port, not an endpoint): the waypoint picks the endpoint per request.
//! Traffic from the waypoint itself is never steered back to it.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_hbone::{self as hbone, ConnectHeaders, HboneError, PoolKey};
use mesh_model::identity::Identity;
use mesh_model::model::{
    DnsTarget, Endpoint, Model, NamespacedName, Pod, SePort, SeResolution, Service, ServiceEntry,
    WaypointTarget,
};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{
    accept_loop, record_refusal, relay_counted, AccessLog, LabelInputs, LoggedIdentity, PodCtx,
    ProxyInputs, ResponseFlag,
};
use super::{with_original_dst, Accepted};
use crate::config::{OutboundTrafficPolicy, HBONE_PORT, RESERVED_PORTS};
use crate::netns::Netns;
use crate::socket;
use mesh_telemetry::TcpLabels;

const REPORTER: &str = "source";

pub async fn run(
    listener: TcpListener,
    pod: Arc<PodCtx>,
    pi: Arc<ProxyInputs>,
    stop: CancellationToken,
) {
    let ctx = pod.clone();
    let inputs = pi.clone();
    accept_loop(listener, stop, "outbound", &ctx, &inputs, |tcp, peer| {
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
    /// A ServiceEntry's host name (`resolution: DNS`), resolved by the agent when dialed: each
    /// of its addresses in plain TCP.
    Resolve { host: String, port: u16 },
    /// Through the destination's waypoint.
    Waypoint {
        pod: Option<&'a Pod>,
        identity: Identity,
        /// The waypoint's IP (HBONE on 15008).
        ip: IpAddr,
        /// `:authority`: the original destination.
        authority: SocketAddr,
    },
}

impl Hop<'_> {
    /// The identity an mTLS hop expects, moved into what the access log keeps.
    fn into_logged_identity(self) -> Option<LoggedIdentity<'static>> {
        match self {
            Hop::Hbone { identity, .. } | Hop::Waypoint { identity, .. } => {
                Some(LoggedIdentity::Owned(Box::new(identity)))
            }
            Hop::Plain { .. } | Hop::Resolve { .. } => None,
        }
    }
}

/// Why no hop could be planned.
type NoPlan = (ResponseFlag, String);

/// The hop through `wp` for traffic from `src` to `dst`; `Ok(None)` when `src` is the
/// waypoint itself (it reaches destinations directly). A waypoint without an address fails
/// the connection: sending it around the waypoint would skip its policy.
fn waypoint_hop<'a>(
    wp: WaypointTarget<'a>,
    src: &PodCtx,
    dst: SocketAddr,
    td: &str,
) -> Result<Option<Hop<'a>>, NoPlan> {
    let Some(addr) = wp.address else {
        let reason = format!("waypoint {} has no address", wp.gateway.key());
        return Err((ResponseFlag::NoHealthyUpstream, reason));
    };
    let is_source = src.ips.contains(&addr.ip)
        || addr
            .pod
            .is_some_and(|p| p.namespace == src.key.namespace && p.name == src.key.name);
    if is_source {
        return Ok(None);
    }
    Ok(Some(Hop::Waypoint {
        pod: addr.pod,
        identity: wp.identity(td),
        ip: addr.ip,
        authority: dst,
    }))
}

/// The candidate hops for `dst`, in the order to try them.
fn plan<'a>(
    model: &'a Model,
    pi: &ProxyInputs,
    src: &PodCtx,
    dst: SocketAddr,
) -> Result<(Option<&'a Service>, Vec<Hop<'a>>), NoPlan> {
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
        if let Some(wp) = model.waypoint_for_service(svc) {
            if let Some(hop) = waypoint_hop(wp, src, dst, td)? {
                return Ok((Some(svc), vec![hop]));
            }
        } else if let Some(gw) = model.missing_waypoint_for_service(svc) {
            // Sending it direct would skip the waypoint's policy: fail closed until it exists.
            let reason = format!("waypoint {gw} named by the service is not known");
            return Err((ResponseFlag::NoHealthyUpstream, reason));
        }
        let eps = model.endpoints(svc, port);
        if eps.is_empty() {
            let reason = format!("no ready endpoint for {dst}");
            return Err((ResponseFlag::NoHealthyUpstream, reason));
        }
        let start = pi.next_index(&NamespacedName::new(&svc.namespace, &svc.name));
        return Ok((Some(svc), endpoint_hops(model, &eps, start, &hop_to)));
    }
    if let Some((se, port)) = model.service_entry_for(&src.key.namespace, dst) {
        if let Some(wp) = model.waypoint_for_service_entry(se) {
            if let Some(hop) = waypoint_hop(wp, src, dst, td)? {
                return Ok((None, vec![hop]));
            }
        } else if let Some(gw) = model.missing_waypoint_for_service_entry(se) {
            let reason = format!("waypoint {gw} named by the ServiceEntry is not known");
            return Err((ResponseFlag::NoHealthyUpstream, reason));
        }
        return service_entry_hops(model, pi, se, port, dst, &hop_to);
    }
    if let Some(p) = model.workload_by_ip(dst.ip()) {
        if let Some(wp) = model.waypoint_for_workload(p) {
            if let Some(hop) = waypoint_hop(wp, src, dst, td)? {
                return Ok((None, vec![hop]));
            }
        }
        return Ok((None, vec![hop_to(p, dst)]));
    }
    if pi.cfg.outbound_traffic_policy == OutboundTrafficPolicy::RegistryOnly {
        let reason = format!("{dst} is not in the mesh's registry (REGISTRY_ONLY)");
        return Err((ResponseFlag::BlackHole, reason));
    }
    Ok((
        None,
        vec![Hop::Plain {
            pod: None,
            target: dst,
        }],
    ))
}

/// The hops for `dst`, an address and port of the ServiceEntry `se`: with `STATIC`
/// resolution its endpoints in turn (a pod over HBONE when enrolled, any other address in
/// plain TCP); with `DNS` its endpoints, host names resolved by the agent when dialed (no
/// endpoints: its first host that is no wildcard); with `NONE` `dst` itself, a pod's or in
/// plain TCP.
fn service_entry_hops<'a>(
    model: &'a Model,
    pi: &ProxyInputs,
    se: &ServiceEntry,
    port: &SePort,
    dst: SocketAddr,
    hop_to: &impl Fn(&'a Pod, SocketAddr) -> Hop<'a>,
) -> Result<(Option<&'a Service>, Vec<Hop<'a>>), NoPlan> {
    if matches!(
        se.resolution,
        SeResolution::Dns | SeResolution::DnsRoundRobin
    ) {
        let hops = model
            .dns_entry_targets(se, port, dst.ip())
            .into_iter()
            .map(|target| match target {
                DnsTarget::Addr(target) => Hop::Plain { pod: None, target },
                DnsTarget::Host { host, port } => Hop::Resolve {
                    host: host.to_string(),
                    port,
                },
            })
            .collect();
        return Ok((None, hops));
    }
    if se.resolution != SeResolution::Static {
        let hop = match model.workload_by_ip(dst.ip()) {
            Some(p) => hop_to(p, dst),
            None => Hop::Plain {
                pod: None,
                target: dst,
            },
        };
        return Ok((None, vec![hop]));
    }
    let eps = model.service_entry_endpoints(se, port);
    if eps.is_empty() {
        let reason = format!(
            "no endpoint for {dst} (ServiceEntry {}/{})",
            se.namespace, se.name
        );
        return Err((ResponseFlag::NoHealthyUpstream, reason));
    }
    let start = pi.next_index(&NamespacedName::new(&se.namespace, &se.name));
    Ok((None, endpoint_hops(model, &eps, start, hop_to)))
}

/// A hop to each of `eps`, starting at `start` (round robin): a pod by `hop_to`, an
/// address that is no pod (an EndpointSlice's or ServiceEntry's outside the mesh) in plain
/// TCP, as Istio does; a pod gone from the model is left out.
fn endpoint_hops<'a>(
    model: &'a Model,
    eps: &[Endpoint],
    start: usize,
    hop_to: &impl Fn(&'a Pod, SocketAddr) -> Hop<'a>,
) -> Vec<Hop<'a>> {
    (0..eps.len())
        .filter_map(|i| {
            let Endpoint { pod, ip, port } = &eps[(start + i) % eps.len()];
            let target = SocketAddr::new(*ip, *port);
            match pod {
                Some(pod) => Some(hop_to(model.pod(&pod.namespace, &pod.name)?, target)),
                None => Some(Hop::Plain { pod: None, target }),
            }
        })
        .collect()
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
    let _flow = pod.track_flow(peer, tcp.local_addr());
    // Built in a block so that only what the relay needs outlives it: the block's locals
    // (labels, log, the plan) would otherwise keep their room in this future, which every
    // connection carries for its whole life (`sizes.rs`).
    let relay = {
        let log = AccessLog::new("outbound", peer, peer, Instant::now()).from(Some(&pod.identity));
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
        let dst = match dst {
            Ok(d) => d,
            Err(e) => {
                let reason = format!("original destination: {e}");
                return record_refusal(&pi, labels, log, ResponseFlag::NoOriginalDst, reason);
            }
        };
        // Boxed: planning and dialing hold far more state than the relay and are over once
        // the upstream is open.
        let opened = Box::pin(open_upstream(&model, &pi, &pod, dst, labels, log)).await;
        let Some((up, labels, log)) = opened else {
            return;
        };
        relay_counted(tcp, up, &pi, labels, None, log)
    };
    relay.await
}

/// An opened upstream: a tunnel (to the destination's agent or its waypoint) or a plain
/// socket (a destination outside the mesh). One type, so `serve` holds one relay state.
enum Upstream {
    Hbone(hbone::H2Stream),
    Plain(TcpStream),
}

impl hbone::RelayIo for Upstream {
    fn poll_read_chunk(
        &mut self,
        cx: &mut std::task::Context<'_>,
        scratch: &mut bytes::BytesMut,
    ) -> std::task::Poll<std::io::Result<Option<bytes::Bytes>>> {
        match self {
            Upstream::Hbone(s) => s.poll_read_chunk(cx, scratch),
            Upstream::Plain(s) => s.poll_read_chunk(cx, scratch),
        }
    }

    fn poll_write_chunk(
        &mut self,
        cx: &mut std::task::Context<'_>,
        chunk: &mut bytes::Bytes,
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self {
            Upstream::Hbone(s) => s.poll_write_chunk(cx, chunk),
            Upstream::Plain(s) => s.poll_write_chunk(cx, chunk),
        }
    }

    fn poll_flush_io(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self {
            Upstream::Hbone(s) => s.poll_flush_io(cx),
            Upstream::Plain(s) => s.poll_flush_io(cx),
        }
    }

    fn poll_shutdown_io(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self {
            Upstream::Hbone(s) => s.poll_shutdown_io(cx),
            Upstream::Plain(s) => s.poll_shutdown_io(cx),
        }
    }
}

/// The first candidate hop for `dst` that opens, with the labels and access log of the
/// relay over it; `None` when none does (refused, counted and logged here).
///
/// Before dialing, the loopback check: a connection made straight to 127.0.0.1:15001 (not
/// redirected) would loop forever.
async fn open_upstream<'a>(
    model: &'a Model,
    pi: &ProxyInputs,
    pod: &'a PodCtx,
    dst: SocketAddr,
    labels: LabelInputs<'a>,
    mut log: AccessLog<'a>,
) -> Option<(Upstream, Arc<TcpLabels>, AccessLog<'a>)> {
    log.dst = dst;
    let refuse = |labels, log, flag, reason| {
        record_refusal(pi, labels, log, flag, reason);
        None
    };
    if dst.ip().is_loopback() && RESERVED_PORTS.contains(&dst.port()) {
        let reason = format!("{dst} is the agent itself");
        return refuse(labels, log, ResponseFlag::Loop, reason);
    }
    let (svc, hops) = match plan(model, pi, pod, dst) {
        Ok(p) => p,
        Err((flag, reason)) => return refuse(labels, log, flag, reason),
    };
    let mut hops = match resolve_hops(hops, pi.cfg.connect_timeout).await {
        Ok(hops) => hops,
        Err(reason) => return refuse(labels, log, ResponseFlag::NoHealthyUpstream, reason),
    };
    let labels = LabelInputs {
        service: svc,
        ..labels
    };

    // Try each candidate in turn; the labels of a refusal name the last one tried.
    let mut failure = (labels, ResponseFlag::UpstreamFailure, String::new());
    let last = hops.len().saturating_sub(1);
    for (i, hop) in hops.iter().enumerate() {
        // A refusing peer agent is waited for (it restarts) only when no other candidate
        // is left; otherwise the next one is tried at once.
        let wait = if i == last {
            AgentRefusal::Wait
        } else {
            AgentRefusal::Final
        };
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
                // Without its certificate (the CA has not issued it yet, or refused it) the
                // pod cannot be a mesh client: fail closed, with the CA's reason.
                if let Err(e) = pi.certs.certified_key(&pod.identity) {
                    return refuse(labels, log, ResponseFlag::Tls, e.to_string());
                }
                let hbone = SocketAddr::new(target.ip(), HBONE_PORT);
                match open_hbone(pi, pod, identity, hbone, *target, svc, wait).await {
                    Ok(tunnel) => {
                        let labels = pi.metrics.intern(labels.build());
                        log.dst = *target;
                        log.dst_workload = Some((&dst_pod.namespace, &dst_pod.name));
                        log.dst_identity = hops.swap_remove(i).into_logged_identity();
                        return Some((Upstream::Hbone(tunnel), labels, log));
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
            Hop::Waypoint {
                pod: wp_pod,
                identity,
                ip,
                authority,
            } => {
                let labels = LabelInputs {
                    dst_pod: *wp_pod,
                    dst_identity: Some(identity),
                    mtls: true,
                    ..labels
                };
                let hbone = SocketAddr::new(*ip, HBONE_PORT);
                match open_hbone(pi, pod, identity, hbone, *authority, svc, wait).await {
                    Ok(tunnel) => {
                        let labels = pi.metrics.intern(labels.build());
                        log.dst = hbone;
                        log.dst_workload = wp_pod.map(|p| (p.namespace.as_str(), p.name.as_str()));
                        log.dst_identity = hops.swap_remove(i).into_logged_identity();
                        return Some((Upstream::Hbone(tunnel), labels, log));
                    }
                    Err(e) => {
                        let denied = matches!(&e, HboneError::Status(s) if s.as_u16() == 401);
                        let flag = if denied {
                            ResponseFlag::UpstreamDenied
                        } else {
                            ResponseFlag::UpstreamFailure
                        };
                        let reason = format!("hbone to waypoint {hbone} ({identity}): {e}");
                        return refuse(labels, log, flag, reason);
                    }
                }
            }
            // Replaced by its addresses before the loop (`resolve_hops`).
            Hop::Resolve { .. } => {}
            Hop::Plain {
                pod: dst_pod,
                target,
            } => {
                let labels = LabelInputs {
                    dst_pod: *dst_pod,
                    ..labels
                };
                let timeout = pi.cfg.connect_timeout;
                let keepalive = pi.cfg.limits.keepalive();
                let src = pod.dial_source();
                match socket::connect_in(
                    &pod.netns, &pi.home, *target, src, timeout, &keepalive, None,
                )
                .await
                {
                    Ok(up) => {
                        let labels = pi.metrics.intern(labels.build());
                        log.dst = *target;
                        return Some((Upstream::Plain(up), labels, log));
                    }
                    Err(e) => failure = (labels, ResponseFlag::UpstreamFailure, e.to_string()),
                }
            }
        }
    }
    let (labels, flag, reason) = failure;
    refuse(labels, log, flag, reason)
}

/// `hops` with each [`Hop::Resolve`] replaced by a plain hop to each address its host name
/// resolves to (the agent's resolver, within `timeout`); `Err` when nothing is left and a
/// name did not resolve.
async fn resolve_hops(hops: Vec<Hop<'_>>, timeout: Duration) -> Result<Vec<Hop<'_>>, String> {
    if !hops.iter().any(|h| matches!(h, Hop::Resolve { .. })) {
        return Ok(hops);
    }
    let mut out = Vec::with_capacity(hops.len());
    let mut failed = None;
    for hop in hops {
        let Hop::Resolve { host, port } = hop else {
            out.push(hop);
            continue;
        };
        let lookup = tokio::net::lookup_host(format!("{host}:{port}"));
        match tokio::time::timeout(timeout, lookup).await {
            Ok(Ok(addrs)) => out.extend(addrs.map(|target| Hop::Plain { pod: None, target })),
            Ok(Err(e)) => failed = Some(format!("resolve {host}: {e}")),
            Err(_) => failed = Some(format!("resolve {host}: timed out after {timeout:?}")),
        }
    }
    match (out.is_empty(), failed) {
        (true, Some(reason)) => Err(reason),
        _ => Ok(out),
    }
}

/// A CONNECT to `target` (the `:authority`) over HBONE to `hbone_addr`, whose certificate
/// must carry `dst_identity`: the destination pod's own 15008, or a waypoint's.
async fn open_hbone(
    pi: &ProxyInputs,
    pod: &PodCtx,
    dst_identity: &Identity,
    hbone_addr: SocketAddr,
    target: SocketAddr,
    svc: Option<&Service>,
    refusal: AgentRefusal,
) -> Result<hbone::H2Stream, HboneError> {
    // Built per connection (about 0.4 µs, and used only when the pool dials): no cache to keep
    // coherent; the certificate itself is resolved at each handshake, so rotation is picked up.
    let tls = mesh_pki::tls::client_config(
        pi.certs.clone(),
        pod.identity.clone(),
        vec![dst_identity.clone()],
    )
    .map_err(|e| HboneError::Tls(std::io::Error::other(e.to_string())))?;
    let src_ip = pod.ips.first().copied().unwrap_or(target.ip());
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
    let timeout = pi.cfg.connect_timeout;
    let keepalive = pi.cfg.limits.keepalive();
    let src = pod.dial_source();
    // The pool retries a stream its pooled connection refused on a fresh one, but takes a
    // fresh connection's answer as final. A peer agent that began draining between
    // accepting that connection and reading the stream (an upgrade's old agent, SIGTERMed)
    // refuses it unprocessed: one more fresh attempt reaches whoever listens now.
    let mut attempt = 0;
    loop {
        let (netns, home) = (pod.netns.clone(), pi.home.clone());
        let dial = move || async move {
            dial_agent(&netns, &home, hbone_addr, src, timeout, &keepalive, refusal)
                .await
                .map_err(std::io::Error::other)
        };
        let req = hbone::connect_request(target, &headers);
        match pi.pool().connect(key.clone(), tls.clone(), dial, req).await {
            Err(e) if attempt == 0 && never_processed(&e) => {
                tracing::debug!(error = %e, dst = %hbone_addr, "stream refused by a draining peer; trying again");
                attempt += 1;
            }
            result => return result,
        }
    }
}

/// The first pause before dialling a refusing peer agent again, doubled up to
/// [`REFUSED_PAUSE_MAX`].
const REFUSED_PAUSE: Duration = Duration::from_millis(10);
const REFUSED_PAUSE_MAX: Duration = Duration::from_millis(100);

/// What a refused dial to a peer agent's HBONE port means for a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AgentRefusal {
    /// The last candidate: wait for the agent ([`dial_agent`]).
    Wait,
    /// Another candidate is left: try it at once.
    Final,
}

/// Connects to a peer agent's HBONE port. A refusal there is an agent restarting (its pods
/// stay captured and their HBONE port answers with a reset until the next agent listens,
/// within a moment), so with [`AgentRefusal::Wait`] refused dials are tried again, after
/// 10 ms and at most every 100 ms, until `timeout` (`--connect-timeout`) is spent: a
/// connection opened meanwhile waits for the agent instead of failing.
async fn dial_agent(
    netns: &Netns,
    home: &Netns,
    addr: SocketAddr,
    src: Option<IpAddr>,
    timeout: Duration,
    keepalive: &mesh_hbone::tcp::Keepalive,
    refusal: AgentRefusal,
) -> Result<TcpStream, socket::SocketError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut pause = REFUSED_PAUSE;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match socket::connect_in(netns, home, addr, src, left, keepalive, None).await {
            Err(socket::SocketError::Connect { source, .. })
                if refusal == AgentRefusal::Wait
                    && source.kind() == std::io::ErrorKind::ConnectionRefused
                    && tokio::time::Instant::now() + pause < deadline =>
            {
                tracing::debug!(dst = %addr, "peer agent refused the connection; dialling again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(REFUSED_PAUSE_MAX);
            }
            result => return result,
        }
    }
}

/// Whether the peer refused the stream without processing it (RFC 9113 8.7): REFUSED_STREAM,
/// or a graceful GOAWAY that came before it.
fn never_processed(e: &HboneError) -> bool {
    match e {
        HboneError::H2(e) => {
            e.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (e.is_go_away() && e.reason() == Some(h2::Reason::NO_ERROR))
        }
        _ => false,
    }
}
