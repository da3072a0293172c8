//! Port 15008: HBONE from node agents (and other waypoints' clients).
//!
//! accept → TLS 1.3 (client certificate required; the caller's SPIFFE identity from its URI
//! SAN) → HTTP/2 → per CONNECT stream: method, `:authority` → is it a destination that uses
//! this waypoint (else 401: no open relay) → by the port's protocol:
//! - declared `tcp`-like: L4 policy, dial an endpoint, `200`, relay bytes (nothing is dialled
//!   before policy allowed it);
//! - otherwise `200`, then detect HTTP/1.1 or HTTP/2 from the first bytes (an undeclared port
//!   that stays silent or speaks something else falls back to the L4 path) and serve HTTP
//!   ([`mesh_l7::http`]).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use http::{Method, StatusCode};
use mesh_hbone::{self as hbone, InboundRequest};
use mesh_l7::io::{Io, Rewind};
use mesh_l7::protocol::{detect, Declared, Detected, SNIFF_LIMIT};
use mesh_l7::proxy::{ConnCtx, Inputs};
use mesh_l7::telemetry::{LabelInputs, REPORTER};
use mesh_l7::upstream::Endpoint;
use mesh_model::identity::Identity;
use mesh_model::model::{effective_policy, effective_policy_for_host};
use mesh_model::policy::{Decision, L4Request};
use mesh_shell::conns::Active;
use mesh_shell::limits::{Cap, HandshakeCap, LimitArgs};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use crate::destination;

/// How long a client on a port declared HTTP may take to send its first request bytes.
pub const HTTP_FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum InboundError {
    #[error("bind hbone listener {addr}: {source}")]
    Bind { addr: SocketAddr, source: io::Error },
    #[error("hbone server tls config for {identity}: {source}")]
    Tls {
        identity: Identity,
        source: mesh_pki::tls::TlsError,
    },
}

/// The listener's own settings (the engine's are in [`Inputs`]).
#[derive(Clone, Copy, Debug)]
pub struct InboundConfig {
    pub addr: SocketAddr,
    /// A client must finish its TLS handshake within this.
    pub tls_handshake_timeout: Duration,
    /// Protocol detection on ports that declare none: silence this long means "not HTTP".
    pub detect_timeout: Duration,
}

/// The bound HBONE listener: binding happens in `new`, so a taken port fails startup.
pub struct Inbound {
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    cfg: InboundConfig,
    inputs: Arc<Inputs>,
    /// Downstream connections still open.
    active: Arc<Active>,
    /// Open connections (`--max-connections`) and TLS handshakes in progress
    /// (`--max-tls-handshakes`): more are closed at once (flag OM).
    conn_cap: Cap,
    handshake_cap: HandshakeCap,
    keepalive: mesh_hbone::tcp::Keepalive,
    hbone: hbone::ServerConfig,
    /// `--threading per-worker`: the data workers' runtimes, to which accepted connections
    /// are dealt in turn (empty: they run on the shared runtime).
    workers: mesh_shell::workers::Turns,
}

/// Refusal of one CONNECT: status, `response_flags`/reason label, message.
type Refusal = (StatusCode, &'static str, String);

// === impl Inbound ===

impl Inbound {
    pub async fn new(
        cfg: InboundConfig,
        inputs: Arc<Inputs>,
        active: Arc<Active>,
        limits: &LimitArgs,
        workers: mesh_shell::workers::Turns,
    ) -> Result<Inbound, InboundError> {
        let addr = cfg.addr;
        let identity = inputs.cfg.identity.clone();
        let tls = mesh_pki::tls::server_config(inputs.certs.clone(), identity.clone())
            .map_err(|source| InboundError::Tls { identity, source })?;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| InboundError::Bind { addr, source })?;
        Ok(Inbound {
            listener,
            tls,
            cfg,
            inputs,
            active,
            conn_cap: Cap::new("max_connections", limits.max_connections),
            handshake_cap: limits.handshake_cap(),
            keepalive: limits.keepalive(),
            hbone: limits.hbone_server(),
            workers,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The process's caps on connections and TLS handshakes in progress, shared (one budget
    /// per process) with the ingress listeners of an ingress gateway.
    pub fn caps(&self) -> (Cap, HandshakeCap) {
        (self.conn_cap.clone(), self.handshake_cap.clone())
    }

    /// Accepts until the drain signal; each connection runs in its own task and span.
    /// Accept errors back off while descriptors are short (`mesh_shell::accept`) and never
    /// end the listener. Over the connection cap a connection is closed at once (flag OM).
    /// With data workers, each connection goes to the next worker in turn: an HBONE
    /// connection is long-lived and carries many requests, so dealing them (rather than
    /// `SO_REUSEPORT`'s hash, which can put an agent's two connections on one worker)
    /// keeps the workers' shares even.
    pub async fn run(self) {
        let Inbound {
            listener,
            tls,
            cfg,
            inputs,
            active,
            conn_cap,
            handshake_cap,
            keepalive,
            hbone,
            workers,
        } = self;
        let hbone = Arc::new(hbone);
        let drain = inputs.drain.clone();
        let accepted = |(tcp, peer): (TcpStream, SocketAddr)| {
            let Some(slot) = conn_cap.admit(&inputs.metrics, REPORTER, "hbone", peer) else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            if let Err(e) = keepalive.apply(&tcp) {
                tracing::debug!(error = %e, "tcp keepalive");
            }
            // Debug level: no per-connection span at info (the access log names the peer).
            let span = tracing::debug_span!("conn", peer = %peer);
            let guard = active.enter();
            let (tls, inputs, hbone) = (tls.clone(), inputs.clone(), hbone.clone());
            let handshake_cap = handshake_cap.clone();
            let serve = move |tcp| {
                async move {
                    let _held = (guard, slot);
                    handle_conn(tcp, peer, tls, cfg, &hbone, &handshake_cap, inputs).await;
                }
                .instrument(span)
            };
            match workers.next() {
                Some(worker) => drop(mesh_shell::workers::serve_on(worker, tcp, serve)),
                None => drop(tokio::spawn(serve(tcp))),
            }
        };
        mesh_shell::accept::serve("hbone", || listener.accept(), accepted, drain).await
    }
}

/// What bounds a listener's TLS handshakes, and the names its refusals are counted under.
pub(crate) struct HandshakeLimits<'a> {
    pub cap: &'a HandshakeCap,
    pub timeout: Duration,
    pub reporter: &'a str,
    pub listener: &'a str,
}

/// How a server-side TLS handshake ended.
pub(crate) enum Handshake {
    Done(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    /// Over the cap on handshakes in progress (or a source's share or rate): closed at once,
    /// never queued; counted and logged by the cap (flag OM).
    OverCap,
    /// The handshake failed or timed out: the reason, for the caller to count and log.
    Failed(String),
}

/// The TLS handshake of `tcp` from `peer` with `tls`, holding a slot of `limits.cap` until it
/// ends, within `limits.timeout`. Shared by the HBONE listener and an ingress gateway's.
pub(crate) async fn tls_handshake(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    limits: &HandshakeLimits<'_>,
    metrics: &mesh_telemetry::Metrics,
) -> Handshake {
    let Some(_slot) = limits
        .cap
        .admit(metrics, limits.reporter, limits.listener, peer)
    else {
        return Handshake::OverCap;
    };
    // Boxed: the handshake state is large and needed only until the connection is up.
    let handshake = Box::pin(tokio_rustls::TlsAcceptor::from(tls).accept(tcp));
    match tokio::time::timeout(limits.timeout, handshake).await {
        Ok(Ok(s)) => Handshake::Done(Box::new(s)),
        Ok(Err(e)) => Handshake::Failed(format!("tls handshake: {e}")),
        Err(_) => Handshake::Failed("tls handshake timed out".to_string()),
    }
}

async fn handle_conn(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Arc<rustls::ServerConfig>,
    cfg: InboundConfig,
    hbone_cfg: &hbone::ServerConfig,
    handshake_cap: &HandshakeCap,
    inputs: Arc<Inputs>,
) {
    let local = tcp.local_addr().unwrap_or(peer);
    let refuse = |reason: String| {
        inputs.metrics.refused(REPORTER, "TLS");
        // Within the process's budget: a handshake flood must not fill the disk.
        if let Some(suppressed) = mesh_shell::limits::REFUSAL_LOG.allow() {
            tracing::info!(target: "access", src_addr = %peer, flags = "TLS", %reason, suppressed, "connection refused");
        }
    };
    let limits = HandshakeLimits {
        cap: handshake_cap,
        timeout: cfg.tls_handshake_timeout,
        reporter: REPORTER,
        listener: "hbone",
    };
    let stream = match tls_handshake(tcp, peer, tls, &limits, &inputs.metrics).await {
        Handshake::Done(s) => s,
        Handshake::OverCap => return,
        Handshake::Failed(reason) => return refuse(reason),
    };
    let peer_id = match mesh_pki::tls::peer_identity(stream.get_ref().1) {
        Ok(id) => id,
        Err(e) => return refuse(format!("peer identity: {e}")),
    };
    let detect_timeout = cfg.detect_timeout;
    let drain = inputs.drain.clone();
    let metrics = inputs.metrics.clone();
    let result = hbone::serve_with_drain(
        stream,
        hbone_cfg,
        move |req| {
            handle_stream(
                req,
                peer,
                local,
                peer_id.clone(),
                detect_timeout,
                inputs.clone(),
            )
        },
        async move { drain.cancelled().await },
    )
    .await;
    // A peer that crossed a limit (flood, rapid reset, no answer to PING) is counted by
    // reason, e.g. `H2_PING_FLOOD`; no room for its receive window is `OM`.
    mesh_shell::limits::hbone_conn_ended(&metrics, REPORTER, "hbone", peer, hbone_cfg, result);
}

/// Validates one CONNECT and resolves what it is for.
fn check_connect(
    req: &InboundRequest,
    peer: SocketAddr,
    local: SocketAddr,
    peer_identity: Identity,
    inputs: &Inputs,
) -> Result<ConnCtx, Refusal> {
    if req.method() != Method::CONNECT {
        let reason = format!("method {} is not CONNECT", req.method());
        return Err((StatusCode::METHOD_NOT_ALLOWED, "BADREQ", reason));
    }
    let authority = req.authority().map_err(|e| {
        (
            StatusCode::BAD_REQUEST,
            "BADREQ",
            format!("bad :authority: {e}"),
        )
    })?;
    let model = inputs.model.load();
    let target = destination::resolve(&model, &inputs.cfg.gateway, authority)
        .map_err(|e| (StatusCode::UNAUTHORIZED, "NR", e.to_string()))?;
    // The source is the tunnel's TCP peer (the client pod's address: its agent dials from
    // inside the pod), never the CONNECT's `forwarded` header, which the peer writes.
    let declared = target.declared(&model);
    Ok(ConnCtx {
        peer,
        local,
        peer_identity: Some(peer_identity),
        authority,
        target,
        declared,
        hosts: Arc::from([]),
    })
}

async fn handle_stream(
    req: InboundRequest,
    peer: SocketAddr,
    local: SocketAddr,
    peer_identity: Identity,
    detect_timeout: Duration,
    inputs: Arc<Inputs>,
) {
    let authority = req.authority_str().unwrap_or("-").to_string();
    let refuse = |req: InboundRequest, (status, flag, reason): Refusal| {
        req.reject(status);
        inputs.metrics.refused(REPORTER, flag);
        tracing::info!(
            target: "access",
            src_addr = %peer,
            src_identity = %peer_identity,
            authority = %authority,
            flags = flag,
            %reason,
            "tunnel refused"
        );
    };
    let mut ctx = match check_connect(&req, peer, local, peer_identity.clone(), &inputs) {
        Ok(ctx) => ctx,
        Err(refusal) => return refuse(req, refusal),
    };
    // A `DNS` ServiceEntry's host names, resolved once for the tunnel (cached process-wide).
    let model = inputs.model.load_full();
    ctx.hosts = inputs.hosts.for_target(&model, &ctx.target).await;
    drop(model);
    let ctx = Arc::new(ctx);

    if ctx.declared == Declared::Tcp {
        // Decide and dial before answering: no byte reaches the destination before policy.
        let upstream = match open_l4(&ctx, &inputs).await {
            Ok(u) => u,
            Err(refusal) => return refuse(req, refusal),
        };
        let tunnel = match req.accept() {
            Ok(t) => t,
            Err(e) => {
                return tracing::debug!(error = %e, "client went away before the tunnel opened")
            }
        };
        return relay_l4(tunnel, upstream, &ctx, &inputs).await;
    }

    let mut tunnel = match req.accept() {
        Ok(t) => t,
        Err(e) => return tracing::debug!(error = %e, "client went away before the tunnel opened"),
    };
    let timeout = if ctx.declared.is_http() {
        HTTP_FIRST_BYTES_TIMEOUT
    } else {
        detect_timeout
    };
    let (first, detected) = sniff(&mut tunnel, timeout).await;
    let down = Rewind::new(first.freeze(), tunnel);
    match (ctx.declared.is_http(), detected) {
        (_, Detected::Http2) => mesh_l7::http::serve(down, true, ctx, inputs).await,
        // A declared HTTP port is served as HTTP/1.1 whatever arrives: hyper answers 400 to
        // bytes that are not HTTP.
        (true, _) | (false, Detected::Http1) => {
            mesh_l7::http::serve(down, false, ctx, inputs).await
        }
        (false, Detected::Opaque | Detected::NeedMore) => match open_l4(&ctx, &inputs).await {
            Ok(upstream) => relay_l4(down, upstream, &ctx, &inputs).await,
            Err((_, flag, reason)) => {
                inputs.metrics.refused(REPORTER, flag);
                tracing::info!(target: "access", src_addr = %peer, flags = flag, %reason, "tunnel closed");
            }
        },
    }
}

/// Reads the first bytes until they tell the protocol, `timeout` passes, the stream ends or
/// [`SNIFF_LIMIT`] bytes have arrived.
pub(crate) async fn sniff<T: Io>(stream: &mut T, timeout: Duration) -> (BytesMut, Detected) {
    let mut buf = BytesMut::with_capacity(1024);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match detect(&buf) {
            Detected::NeedMore if buf.len() < SNIFF_LIMIT => {}
            Detected::NeedMore => return (buf, Detected::Opaque),
            decided => return (buf, decided),
        }
        match tokio::time::timeout_at(deadline, stream.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => continue,
            // End of stream, error or silence: whatever arrived is all there is to judge.
            _ => {
                let decided = match detect(&buf) {
                    Detected::NeedMore => Detected::Opaque,
                    d => d,
                };
                return (buf, decided);
            }
        }
    }
}

/// L4 path: policy for the connection (L7 rules fail closed), then a connection to the first
/// endpoint (round robin) that answers, with TLS originated over it when the Service's
/// DestinationRule says `tls` `SIMPLE` / `MUTUAL` (no ALPN: the bytes are the client's).
async fn open_l4(ctx: &ConnCtx, inputs: &Inputs) -> Result<(Box<dyn Io>, Endpoint), Refusal> {
    let model = inputs.model.load_full();
    let policies = mesh_model::policy::l7::policies_for_destination(
        &model,
        &inputs.cfg.gateway,
        mesh_l7::engine::authz::destination(&ctx.target),
    );
    let eval = mesh_model::policy::evaluate_l4(
        &policies,
        &L4Request {
            src_identity: ctx.peer_identity.clone(),
            // At L4 `remoteIpBlocks` is this address too (`evaluate_l4`).
            src_ip: ctx.peer.ip(),
            dst_ip: ctx.authority.ip(),
            dst_port: ctx.authority.port(),
        },
    );
    if let Decision::Deny { policy } = eval.decision {
        let by = policy.map_or_else(
            || "no ALLOW policy matched".to_string(),
            |p| format!("denied by {p}"),
        );
        return Err((StatusCode::UNAUTHORIZED, "DENY", format!("rbac: {by}")));
    }
    let resolved = ctx
        .target
        .lookup_with(&model, &inputs.cfg.trust_domain, &ctx.hosts)
        .filter(|r| !r.endpoints.is_empty())
        .ok_or_else(|| {
            let reason = format!("no ready endpoint for {}", ctx.authority);
            (StatusCode::SERVICE_UNAVAILABLE, "UH", reason)
        })?;
    let rr_key = ctx.target.rr_key();
    let eps = &resolved.endpoints;
    let start = inputs.upstreams.next_index(&rr_key);
    let host = resolved.host();
    // DestinationRule `tls` SIMPLE / MUTUAL (of the Service, or of the ServiceEntry's host):
    // TLS originated over the relayed connection.
    let client_ns = &inputs.cfg.gateway.namespace;
    let policy = match (resolved.service.zip(resolved.port), resolved.entry) {
        (Some((svc, port)), _) => Some(effective_policy(&model, client_ns, svc, port.port, None)),
        (None, Some(t)) => Some(effective_policy_for_host(
            &model,
            client_ns,
            t.host,
            &t.entry.namespace,
            t.port,
            None,
        )),
        (None, None) => None,
    };
    let tls = policy.and_then(|p| p.ok()?.origination().cloned());
    let origin = match (&tls, &host) {
        (Some(tls), Some(host)) => match inputs.upstreams.origins.get(&model, tls, host) {
            Ok(origin) => Some(origin),
            Err(e) => {
                let reason = format!("tls origination settings: {e}");
                return Err((StatusCode::SERVICE_UNAVAILABLE, "UF", reason));
            }
        },
        _ => None,
    };
    let mut last = String::new();
    for i in 0..eps.len() {
        let ep = &eps[(start + i) % eps.len()];
        match inputs
            .upstreams
            .connect_tcp(ep, ctx.local.ip(), host.clone(), origin.as_deref())
            .await
        {
            Ok(io) => return Ok((io, ep.clone())),
            Err(e) => last = e.to_string(),
        }
    }
    Err((StatusCode::SERVICE_UNAVAILABLE, "UF", last))
}

/// Relays an opened L4 connection both ways with Istio's TCP metrics and an access line (when
/// the Telemetry API turns access logs on: [`Inputs::access_log`]).
async fn relay_l4<D: Io>(
    down: D,
    (up, ep): (Box<dyn Io>, Endpoint),
    ctx: &ConnCtx,
    inputs: &Inputs,
) {
    let started = Instant::now();
    let model = inputs.model.load();
    let labels = LabelInputs {
        src_pod: model.workload_by_ip_shared(ctx.peer.ip()).cloned(),
        src_identity: ctx.peer_identity.clone(),
        dst_pod: ep.pod.clone(),
        dst_identity: ep.identity.clone(),
        service: ctx
            .target
            .service_key()
            .and_then(|k| model.service_shared(k))
            .cloned(),
        protocol: "tcp",
        mtls: true,
    };
    drop(model);
    // Interned: the relay holds one pointer, not 23 strings (nor the label inputs' clones).
    let tcp = inputs.metrics.intern(labels.build_tcp());
    drop(labels);
    inputs.metrics.tcp_opened(&tcp);
    let counters = inputs.metrics.tcp_counters(&tcp);
    let result = hbone::relay(hbone::AsyncIo(down), up, |dir, n| match dir {
        hbone::Direction::AToB => counters.received(n),
        hbone::Direction::BToA => counters.sent(n),
    })
    .await;
    inputs.metrics.tcp_closed(&tcp);
    if !inputs.access_log.enabled() {
        return;
    }
    let (recv, sent) = result.as_ref().map_or((0, 0), |t| *t);
    tracing::info!(
        target: "access",
        src_addr = %ctx.peer,
        src_identity = ctx.peer_identity.as_ref().map_or_else(|| "-".to_string(), |i| i.to_string()),
        protocol = "tcp",
        authority = %ctx.authority,
        upstream = %ep.addr,
        bytes_recv = recv,
        bytes_sent = sent,
        error = result.err().map(|e| e.to_string()).as_deref().unwrap_or("-"),
        duration_ms = started.elapsed().as_millis() as u64,
        "connection complete"
    );
}
