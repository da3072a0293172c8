//! The data path: listeners inside each enrolled pod's network namespace.
//!
//! - [`outbound`] (15001): the pod's own outgoing TCP, captured; sent over HBONE to in-mesh
//!   destinations, passed through otherwise.
//! - [`inbound`] (15008): HBONE from other workloads: mTLS, CONNECT, policy, then the app.
//! - [`inbound_passthrough`] (15006): plaintext arriving at the pod: PeerAuthentication and
//!   policy (no identity), then the app.
//!
//! The path of one connection: the outbound proxy resolves the original destination in the
//! model (Service VIP:port → a ready endpoint, round robin, next on failure; pod IP → that
//! pod; unknown → plain passthrough) and, for in-mesh destinations, opens an HTTP/2 CONNECT
//! stream (`:authority` = `<pod-ip>:<target-port>`) over mTLS to `<pod-ip>:15008`, pooled per
//! (source identity, source IP, destination identity, destination address)
//! ([`mesh_hbone::Pool`]). When the destination Service (or pod, for `workload`/`all`
//! waypoints) uses a waypoint ([`mesh_model::model::use_waypoint`], the most specific label
//! wins), the tunnel goes to `<waypoint-ip>:15008` instead, expecting the waypoint's
//! identity, with `:authority` = the original VIP:port. The destination agent terminates
//! TLS (client certificate required, SPIFFE identity from the URI SAN), checks the CONNECT
//! (method, an authority this pod serves, not an agent port), evaluates AuthorizationPolicy
//! ([`crate::conns`]), then dials the app from a transparent socket bound to the client's
//! IP, answers 200 and relays bytes; END_STREAM ⇄ FIN. Plaintext arriving at an enrolled pod
//! is redirected to 15006: PeerAuthentication (STRICT refuses), then AuthorizationPolicy
//! without identity.
//!
//! With `--redirect loopback` (tests and development, no root) nothing is captured and no pod
//! has a namespace: each pod's listeners bind on its address in the agent's own namespace,
//! clients name the destination of their connections to 15001 and 15006 with SOCKS5
//! ([`socks5`]), and the paths above run unchanged from there.

pub mod inbound;
pub mod inbound_passthrough;
pub mod outbound;
pub mod socks5;

#[cfg(test)]
mod sizes;

use std::collections::HashMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};

use mesh_shell::conns::{Active, ActiveGuard};
use mesh_shell::limits::{Cap, HandshakeCap};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use std::future::Future;

use arc_swap::ArcSwap;
use mesh_hbone::Pool;
use mesh_model::identity::Identity;
use mesh_model::model::{Model, NamespacedName};
use mesh_model::round_robin::RoundRobin;
use mesh_pki::certs::CertManager;
use mesh_telemetry::{Metrics, TcpLabels};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Config, Redirect};
use crate::conns::ConnTracker;
use crate::netns::Netns;
use crate::netns_source::PodNetnsSource;
use crate::redirect::ebpf::Flow;

/// Shared with the waypoint: one enum of causes for logs and `response_flags`, and one
/// builder of Istio's labels.
pub use mesh_telemetry::{LabelInputs, ResponseFlag};

/// Everything the proxies share; one per agent.
pub struct ProxyInputs {
    pub cfg: Arc<Config>,
    pub model: Arc<ArcSwap<Model>>,
    pub certs: Arc<CertManager>,
    /// The HBONE pools: one per data worker ([`ProxyInputs::pool`] picks the caller's), one
    /// when the runtime is shared.
    pools: Vec<Pool>,
    /// `--threading per-worker`: the data workers' runtimes, where each pod gets a set of
    /// listeners (empty: the listeners run on the shared runtime).
    pub workers: mesh_shell::workers::Turns,
    pub metrics: Arc<Metrics>,
    pub conns: Arc<ConnTracker>,
    /// The agent's own network namespace, to return to after opening a socket in a pod's.
    pub home: Arc<Netns>,
    /// How an enrolled pod's network namespace is found (named file, or by pod IP).
    pub pod_netns: PodNetnsSource,
    /// Cancelled on shutdown: HBONE servers send GOAWAY and stop taking new streams.
    pub drain: tokio_util::sync::CancellationToken,
    /// Every connection accepted on any pod's 15001, 15006 or 15008 that is still open,
    /// released pods' included: what shutdown waits for (both directions).
    pub open: Arc<Active>,
    /// Open connections of the process (`--max-connections`).
    pub conn_cap: Cap,
    /// TLS handshakes in progress on 15008 (`--max-tls-handshakes`).
    pub handshake_cap: HandshakeCap,
    /// The HTTP/2 settings of every inbound HBONE connection, built once from the flags
    /// (shared, so that each connection's future holds one pointer).
    pub hbone_server: Arc<mesh_hbone::ServerConfig>,
    round_robin: RoundRobin<NamespacedName>,
}

impl ProxyInputs {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: Arc<Config>,
        model: Arc<ArcSwap<Model>>,
        certs: Arc<CertManager>,
        pool: mesh_hbone::PoolConfig,
        workers: mesh_shell::workers::Turns,
        metrics: Arc<Metrics>,
        conns: Arc<ConnTracker>,
        home: Arc<Netns>,
        pod_netns: PodNetnsSource,
        drain: tokio_util::sync::CancellationToken,
    ) -> Self {
        let conn_cap = Cap::new("max_connections", cfg.limits.max_connections);
        let handshake_cap = cfg.limits.handshake_cap();
        ProxyInputs {
            conn_cap,
            handshake_cap,
            hbone_server: Arc::new(cfg.limits.hbone_server()),
            cfg,
            model,
            certs,
            pools: (0..workers.handles().len().max(1))
                .map(|_| Pool::new(pool.clone()))
                .collect(),
            workers,
            metrics,
            conns,
            home,
            pod_netns,
            drain,
            open: Arc::default(),
            round_robin: RoundRobin::default(),
        }
    }

    /// The HBONE pool of the data worker this runs on (the first one off the workers), so
    /// that a connection and the HTTP/2 connection carrying its stream share a thread.
    pub fn pool(&self) -> &Pool {
        let worker = mesh_shell::workers::current().unwrap_or(0);
        &self.pools[worker % self.pools.len()]
    }

    /// The HBONE pools, in worker order.
    pub fn pools(&self) -> &[Pool] {
        &self.pools
    }

    /// The pools' connections and streams added up (`/config_dump`).
    pub fn pool_stats(&self) -> mesh_hbone::PoolStats {
        self.pools
            .iter()
            .map(Pool::stats)
            .fold(mesh_hbone::PoolStats::default(), |sum, s| {
                mesh_hbone::PoolStats {
                    connections: sum.connections + s.connections,
                    streams: sum.streams + s.streams,
                }
            })
    }

    /// The next round-robin start index for a service.
    pub fn next_index(&self, svc: &NamespacedName) -> usize {
        self.round_robin.next(svc)
    }
}

/// A pod this agent serves: what its listeners need to know about it.
pub struct PodCtx {
    pub key: NamespacedName,
    pub ips: Vec<IpAddr>,
    pub identity: Identity,
    pub netns: Arc<Netns>,
    pub server_tls: Arc<rustls::ServerConfig>,
    /// Cancelled when the pod is released: listeners close, HBONE connections send GOAWAY.
    pub stop: CancellationToken,
    /// Closes the outbound (15001) listener. A release cancels it only after the capture has
    /// stopped, so that every connection the capture handed to the listener until then is
    /// accepted (what is queued when it closes too) and served, instead of reset.
    pub outbound_stop: CancellationToken,
    /// Set by a release (not a shutdown) before `outbound_stop`.
    pub released: std::sync::atomic::AtomicBool,
    /// Connections of this pod still open (all three listeners), so that its remaining
    /// redirection state is removed only once the last one has finished.
    pub active: Arc<ActiveConns>,
    /// The eBPF backend's capture (empty with nftables, and once the pod is released).
    pub capture: CaptureSlot,
    /// Open connections of this pod (`--max-connections-per-pod`).
    pub conn_cap: Cap,
    /// Keeps the pod's certificate while anything of this enrollment lives, including what
    /// a release leaves draining (its listener still accepts what was queued).
    pub cert: mesh_pki::certs::CertHold,
}

/// Holds a pod's eBPF capture while the pod is enrolled. Connections borrow it for the time
/// of a delivery (to exempt it); releasing the pod takes it out, so the program detaches as
/// soon as no delivery is in progress, while the pod's established connections drain.
#[derive(Default)]
pub struct CaptureSlot {
    guard: Mutex<Option<Arc<ebpf::CaptureGuard>>>,
    /// Set for the eBPF backend: its flows must be known to release without resets.
    tracks_flows: bool,
}

impl CaptureSlot {
    pub fn new(guard: Option<ebpf::CaptureGuard>) -> Self {
        Self {
            tracks_flows: guard.is_some(),
            guard: Mutex::new(guard.map(Arc::new)),
        }
    }

    /// The capture, while the pod is enrolled.
    pub fn get(&self) -> Option<Arc<ebpf::CaptureGuard>> {
        self.guard.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes the capture out (release; a shutdown leaves it in place for the drain).
    pub fn take(&self) -> Option<Arc<ebpf::CaptureGuard>> {
        self.guard.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

impl PodCtx {
    /// Connects to the application at `dst` on behalf of a client at `client`, from the
    /// client's address when redirection is on (the app sees who called), and records the
    /// connection as a flow for [`ActiveConns::flows`] while the returned guard lives.
    pub(crate) async fn deliver(
        &self,
        pi: &ProxyInputs,
        dst: SocketAddr,
        client: IpAddr,
    ) -> Result<(TcpStream, Option<FlowGuard>), crate::socket::SocketError> {
        let src = (pi.cfg.redirect != Redirect::None).then_some(client);
        let capture = self.capture.get();
        let app = crate::socket::connect_in(
            &self.netns,
            &pi.home,
            dst,
            src,
            pi.cfg.connect_timeout,
            &pi.cfg.limits.keepalive(),
            capture.as_deref(),
        )
        .await?;
        let flow = self.track_flow(dst, app.local_addr());
        Ok((app, flow))
    }

    /// The source address for the pod's outgoing connections: none inside the pod's
    /// namespace (its sockets have the pod's address); the pod's address when the pod is an
    /// address in the agent's own namespace (`--redirect loopback`), so that peers see who
    /// called there too.
    pub(crate) fn dial_source(&self) -> Option<IpAddr> {
        self.ips.first().copied().filter(|_| self.netns.is_own())
    }

    /// Records a flow between the application's `app` end and the agent's `peer` end, when the
    /// backend needs it (eBPF: see [`crate::redirect::ebpf::stop_capture`]).
    pub(crate) fn track_flow(
        &self,
        app: SocketAddr,
        peer: std::io::Result<SocketAddr>,
    ) -> Option<FlowGuard> {
        let peer = peer.ok().filter(|_| self.capture.tracks_flows)?;
        Some(self.active.flow(Flow { app, peer }))
    }
}

/// Counts a pod's open connections and tells when none is left. Also knows the TCP flows
/// between the application and the agent (see [`Flow`]), which the eBPF backend keeps routed
/// to the agent while a released pod drains.
#[derive(Default)]
pub struct ActiveConns {
    /// The count every binary's drain waits on.
    open: Arc<Active>,
    flows: Mutex<HashMap<u64, Flow>>,
    next_flow: AtomicU64,
}

impl fmt::Debug for ActiveConns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ActiveConns")
            .field("count", &self.len())
            .finish_non_exhaustive()
    }
}

/// One recorded flow; dropping it forgets the flow.
pub struct FlowGuard {
    conns: Arc<ActiveConns>,
    id: u64,
}

impl Drop for FlowGuard {
    fn drop(&mut self) {
        let mut flows = self.conns.flows.lock().unwrap_or_else(|e| e.into_inner());
        flows.remove(&self.id);
        crate::conns::shrink_after_burst(&mut flows);
    }
}

impl ActiveConns {
    /// Counts one open connection until the guard drops.
    pub fn enter(&self) -> ActiveGuard {
        self.open.enter()
    }

    pub fn len(&self) -> usize {
        self.open.len()
    }

    /// Records a flow between the application and the agent until the guard is dropped.
    pub fn flow(self: &Arc<Self>, flow: Flow) -> FlowGuard {
        let id = self.next_flow.fetch_add(1, Ordering::Relaxed);
        self.flows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, flow);
        FlowGuard {
            conns: self.clone(),
            id,
        }
    }

    /// The flows open now.
    pub fn flows(&self) -> Vec<Flow> {
        let flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        flows.values().copied().collect()
    }

    pub fn is_empty(&self) -> bool {
        self.open.is_empty()
    }

    /// Resolves once no connection is open.
    pub async fn idle(&self) {
        self.open.idle().await
    }
}

/// One structured access-log line per connection (target `access`).
pub struct AccessLog<'a> {
    pub direction: &'static str,
    pub src: SocketAddr,
    pub dst: SocketAddr,
    pub src_identity: Option<&'a Identity>,
    pub dst_identity: Option<LoggedIdentity<'a>>,
    /// The destination workload's namespace and name.
    pub dst_workload: Option<(&'a str, &'a str)>,
    pub flag: Option<ResponseFlag>,
    pub reason: Option<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub started: Instant,
}

/// An identity an access log names: borrowed from the model or the pod, or an outbound hop's
/// own (computed per connection; boxed, so that every log, and every connection's future
/// that holds one, stays small).
pub enum LoggedIdentity<'a> {
    Borrowed(&'a Identity),
    Owned(Box<Identity>),
}

impl LoggedIdentity<'_> {
    pub fn get(&self) -> &Identity {
        match self {
            LoggedIdentity::Borrowed(i) => i,
            LoggedIdentity::Owned(i) => i,
        }
    }
}

impl<'a> AccessLog<'a> {
    pub fn new(
        direction: &'static str,
        src: SocketAddr,
        dst: SocketAddr,
        started: Instant,
    ) -> Self {
        AccessLog {
            direction,
            src,
            dst,
            src_identity: None,
            dst_identity: None,
            dst_workload: None,
            flag: None,
            reason: None,
            bytes_sent: 0,
            bytes_received: 0,
            started,
        }
    }

    pub fn from(mut self, src_identity: Option<&'a Identity>) -> Self {
        self.src_identity = src_identity;
        self
    }

    pub fn to(
        mut self,
        workload: Option<(&'a str, &'a str)>,
        identity: Option<&'a Identity>,
    ) -> Self {
        self.dst_workload = workload;
        self.dst_identity = identity.map(LoggedIdentity::Borrowed);
        self
    }

    pub fn emit(&self) {
        let src_id = self.src_identity.map(|i| i.to_string());
        let dst_id = self.dst_identity.as_ref().map(|i| i.get().to_string());
        let dst_wl = self.dst_workload.map(|(ns, name)| format!("{ns}/{name}"));
        tracing::info!(
            target: "access",
            direction = self.direction,
            src.addr = %self.src,
            src.identity = src_id.as_deref().unwrap_or("-"),
            dst.addr = %self.dst,
            dst.workload = dst_wl.as_deref().unwrap_or("-"),
            dst.identity = dst_id.as_deref().unwrap_or("-"),
            flags = self.flag.map(ResponseFlag::as_str).unwrap_or("-"),
            reason = self.reason.as_deref().unwrap_or("-"),
            bytes_sent = self.bytes_sent,
            bytes_recv = self.bytes_received,
            duration_ms = self.started.elapsed().as_millis() as u64,
            "connection complete"
        );
    }
}

// === shared by the three listeners ===

/// How long a released pod's outbound listener stays open after the last connection it
/// accepted. Segments held while the capture stopped (`redirect::ebpf`) include the final
/// ACK of handshakes then under way: those complete when the application retransmits
/// (200 ms and up) or answers the listener's SYN-ACK retransmitted after 1 s.
const RELEASE_DRAIN_QUIET: std::time::Duration = std::time::Duration::from_millis(1500);

/// What `accept_loop` spawns for one connection: its future, the guards it holds for its life
/// and its span. Built without an `async` block, which would store `conn` twice (see
/// [`mesh_hbone::holding`]); `sizes.rs` measures this, not just `conn`.
pub(crate) fn connection_task<Fut: Future<Output = ()>, H>(
    conn: Fut,
    held: H,
    span: tracing::Span,
) -> tracing::instrument::Instrumented<mesh_hbone::Holding<Fut, H>> {
    mesh_hbone::holding(conn, held).instrument(span)
}

/// Accepts until `stop`; each connection runs in its own task inside a (debug-level) span
/// naming the listener, pod and peer, counted in the pod's and the agent's open connections
/// (`open`, what shutdown drains) until it ends. Accept errors back off while the process is
/// out of descriptors (EMFILE...) and serving resumes when some are freed
/// (`mesh_shell::accept`). A connection over the process's or the pod's connection cap is
/// closed at once and counted (flag OM); the others get TCP keepalive and `TCP_USER_TIMEOUT`.
pub(crate) async fn accept_loop<F, Fut>(
    listener: TcpListener,
    stop: CancellationToken,
    kind: &'static str,
    pod: &PodCtx,
    pi: &ProxyInputs,
    handle: F,
) where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let reporter = if kind == "outbound" {
        "source"
    } else {
        "destination"
    };
    let keepalive = pi.cfg.limits.keepalive();
    let accepted = |(tcp, peer): (TcpStream, SocketAddr)| {
        let Some(process_slot) = pi.conn_cap.admit(&pi.metrics, reporter, kind, peer) else {
            return;
        };
        let Some(pod_slot) = pod.conn_cap.admit(&pi.metrics, reporter, kind, peer) else {
            return;
        };
        let _ = tcp.set_nodelay(true);
        if let Err(e) = keepalive.apply(&tcp) {
            tracing::debug!(error = %e, "tcp keepalive");
        }
        // Debug level: at the default (info) a connection gets no span, which would cost
        // ~0.4 KiB while it is open and stay in tracing's slab after; its access log line
        // names the pod and the peer by itself.
        let span = tracing::debug_span!("conn", listener = kind, pod = %pod.key, peer = %peer);
        let active = (pod.active.enter(), pi.open.enter());
        let conn = handle(tcp, peer);
        tokio::spawn(connection_task(
            conn,
            (active, process_slot, pod_slot),
            span,
        ));
    };
    let mut accept = || listener.accept();
    mesh_shell::accept::serve(kind, &mut accept, &accepted, stop).await;
    if kind == "outbound" && pod.released.load(std::sync::atomic::Ordering::SeqCst) {
        // Released, after the capture stopped (see `PodCtx::outbound_stop`): what is queued
        // is the application's, routed here, and no other listener takes it. (On shutdown
        // the next agent's listener does: `tcp_migrate_req`.) Held open meanwhile, so that
        // a process exiting with the release waits for these too.
        let _open = pi.open.enter();
        mesh_shell::accept::drain_queued(kind, accept, &accepted, RELEASE_DRAIN_QUIET).await;
    }
}

/// Serves a connection accepted on 15001 or 15006 knowing where it was going: what the
/// capture backend left in the socket (its local address, or with NAT the conntrack
/// entry's), read at once; or with `--redirect loopback`, which captures nothing, what the
/// client asks for in a SOCKS5 CONNECT ([`socks5`]; names resolved in the model), in a box of
/// its own so that a captured connection's future never carries the handshake.
pub(crate) fn with_original_dst<Fut>(
    mut tcp: TcpStream,
    peer: SocketAddr,
    pod: Arc<PodCtx>,
    pi: Arc<ProxyInputs>,
    serve: fn(Box<Accepted>) -> Fut,
) -> futures::future::Either<Fut, Pin<Box<dyn Future<Output = ()> + Send>>>
where
    Fut: Future<Output = ()> + Send + 'static,
{
    use futures::future::Either;
    let redirect = pi.cfg.redirect;
    let first_byte = pi.cfg.limits.first_byte_timeout;
    let model = (redirect == Redirect::Loopback).then(|| pi.model.load_full());
    let accepted = move |tcp, dst| {
        Box::new(Accepted {
            tcp,
            dst,
            peer,
            pod,
            pi,
        })
    };
    let Some(model) = model else {
        // Captured: read from the socket now; the connection's future awaits nothing for it.
        let nat = redirect == Redirect::Nftables;
        let dst = crate::socket::original_dst(&tcp, nat).map_err(|e| e.to_string());
        return Either::Left(serve(accepted(tcp, dst)));
    };
    Either::Right(Box::pin(async move {
        // The client speaks first here: bounded by the first-byte timeout.
        let dst = tokio::time::timeout(first_byte, original_dst(&mut tcp, redirect, &model))
            .await
            .unwrap_or_else(|_| Err(format!("no socks5 request within {first_byte:?}")));
        drop(model);
        serve(accepted(tcp, dst)).await
    }))
}

/// A connection accepted on 15001 or 15006 with where it was going. Passed boxed to the
/// task that serves it: an async fn's arguments stay in its future for the connection's
/// whole life, locals only while they are used (here: until the relay). 1 KiB per idle
/// connection measured when the destination was an argument.
pub(crate) struct Accepted {
    pub tcp: TcpStream,
    pub dst: Result<SocketAddr, String>,
    pub peer: SocketAddr,
    pub pod: Arc<PodCtx>,
    pub pi: Arc<ProxyInputs>,
}

impl Accepted {
    /// Out of its box, which is freed now (destructuring `*boxed` in an async fn keeps the
    /// allocation until the end of the function: the connection's life).
    #[allow(clippy::boxed_local, reason = "the point is to free the box")]
    pub(crate) fn into_inner(self: Box<Self>) -> Accepted {
        *self
    }
}

/// Where a connection was going (see [`with_original_dst`]), as one awaitable step.
pub(crate) async fn original_dst(
    tcp: &mut TcpStream,
    redirect: Redirect,
    model: &Model,
) -> Result<SocketAddr, String> {
    if redirect != Redirect::Loopback {
        let nat = redirect == Redirect::Nftables;
        return crate::socket::original_dst(tcp, nat).map_err(|e| e.to_string());
    }
    socks5_dst(tcp, model).await
}

/// `--redirect loopback`: the SOCKS5 handshake, boxed so that its state never sits in a
/// captured connection's future.
fn socks5_dst<'a>(
    tcp: &'a mut TcpStream,
    model: &'a Model,
) -> Pin<Box<dyn Future<Output = Result<SocketAddr, String>> + Send + 'a>> {
    Box::pin(async move {
        let resolve = |name: &str| socks5::resolve(model, name);
        socks5::accept(tcp, resolve)
            .await
            .map_err(|e| e.to_string())
    })
}

/// The labels of a connection into `pod` (reporter `destination`) from `peer`, mTLS when the
/// peer presented `src_identity`.
pub(crate) fn inbound_labels<'a>(
    model: &'a Model,
    pod: &'a PodCtx,
    peer: SocketAddr,
    src_identity: Option<&'a Identity>,
) -> LabelInputs<'a> {
    LabelInputs {
        reporter: "destination",
        src_pod: model.workload_by_ip(peer.ip()),
        src_identity,
        dst_pod: model.pod(&pod.key.namespace, &pod.key.name),
        dst_identity: Some(&pod.identity),
        service: None,
        flag: None,
        mtls: src_identity.is_some(),
    }
}

/// Logs and counts a refused connection (one flag per cause).
pub(crate) fn record_refusal(
    pi: &ProxyInputs,
    mut labels: LabelInputs<'_>,
    mut log: AccessLog<'_>,
    flag: ResponseFlag,
    reason: String,
) {
    pi.metrics.refused(labels.reporter, flag.as_str());
    labels.flag = Some(flag);
    let l = labels.build();
    pi.metrics.tcp_opened(&l);
    pi.metrics.tcp_closed(&l);
    // Within the process's budget: a flood of refusals must not fill the disk.
    let Some(suppressed) = mesh_shell::limits::REFUSAL_LOG.allow() else {
        return;
    };
    if suppressed > 0 {
        tracing::warn!(target: "access", suppressed, "refusal log lines suppressed");
    }
    log.flag = Some(flag);
    log.reason = Some(reason);
    log.emit();
}

/// Relays an admitted connection both ways, counting bytes as they move, until both sides
/// finish or `cancel` fires (policy revoked it); then counts the close and logs the line.
/// `down` is the client side: its bytes are `received`, the upstream's are `sent`.
///
/// `labels` is the interned label set ([`mesh_telemetry::Metrics::intern`]): an open
/// connection holds one pointer to it, not its own copy of the 23 strings.
pub(crate) fn relay_counted<'a, A, B>(
    down: A,
    up: B,
    pi: &'a ProxyInputs,
    labels: Arc<TcpLabels>,
    cancel: Option<&'a CancellationToken>,
    mut log: AccessLog<'a>,
) -> impl Future<Output = ()> + Send + 'a
where
    A: mesh_hbone::RelayIo + Send + 'a,
    B: mesh_hbone::RelayIo + Send + 'a,
{
    pi.metrics.tcp_opened(&labels);
    let counters = pi.metrics.tcp_counters(&labels);
    // Totals for the access log, also when a revocation cuts the relay short. Shared with the
    // relay's callback (an `Arc`: the relay future is built here, outside the `async` block,
    // which would otherwise hold `down` and `up` twice, as captures and inside the relay).
    let totals = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let counted = totals.clone();
    let relay = mesh_hbone::relay(down, up, move |dir, n| match dir {
        mesh_hbone::Direction::AToB => {
            counters.received(n);
            counted.0.fetch_add(n, Ordering::Relaxed);
        }
        mesh_hbone::Direction::BToA => {
            counters.sent(n);
            counted.1.fetch_add(n, Ordering::Relaxed);
        }
    });
    // Combinators, not `async`: an `async fn` stores its arguments twice, and an `async`
    // block that awaits a future it captured stores that future twice; this future is held
    // for the connection's whole life (`sizes.rs`).
    let revocable = Revocable {
        relay,
        revoked: cancel.map(CancellationToken::cancelled),
    };
    futures::FutureExt::map(revocable, move |outcome| {
        match outcome {
            Some(Ok(_)) => {}
            Some(Err(e)) => tracing::debug!(error = %e, "relay ended with an error"),
            None => {
                log.flag = Some(ResponseFlag::Revoked);
                log.reason = Some("no longer allowed by policy".to_string());
            }
        }
        pi.metrics.tcp_closed(&labels);
        log.bytes_received = totals.0.load(Ordering::Relaxed);
        log.bytes_sent = totals.1.load(Ordering::Relaxed);
        log.emit();
    })
}

pin_project_lite::pin_project! {
    /// A relay that ends early (`None`) when `revoked` fires.
    struct Revocable<'a, F> {
        #[pin]
        relay: F,
        #[pin]
        revoked: Option<tokio_util::sync::WaitForCancellationFuture<'a>>,
    }
}

impl<F: Future> Future for Revocable<'_, F> {
    type Output = Option<F::Output>;

    fn poll(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        if let Some(revoked) = this.revoked.as_pin_mut() {
            if revoked.poll(cx).is_ready() {
                return std::task::Poll::Ready(None);
            }
        }
        this.relay.poll(cx).map(Some)
    }
}
