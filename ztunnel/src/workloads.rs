//! Which pods this agent serves, and their in-pod listeners and redirection.
//!
//! On every model change (and on a retry tick while something is pending) the manager
//! compares the enrolled pods on this node with what it runs: a new pod gets its three
//! listeners opened inside its network namespace and redirection installed; a pod that left
//! (deleted, label removed, moved) gets its listeners closed and redirection removed, while its
//! established connections run to completion (they are separate tasks).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mesh_model::model::{Model, NamespacedName, Pod};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::{Redirect, HBONE_PORT, INBOUND_PLAINTEXT_PORT, OUTBOUND_PORT};
use crate::proxy::{self, PodCtx, ProxyInputs};
use crate::socket::ListenFor;
use crate::{redirect, socket};

#[derive(Debug, thiserror::Error)]
pub enum EnrollError {
    #[error(transparent)]
    Socket(#[from] socket::SocketError),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error(transparent)]
    PodNetns(#[from] crate::netns_source::PodNetnsError),
    #[error(transparent)]
    Redirect(#[from] redirect::RedirectError),
    #[error("tls for {pod}: {source}")]
    Tls {
        pod: NamespacedName,
        source: Box<mesh_pki::tls::TlsError>,
    },
    #[error("already captured; taking over once its certificate is here")]
    AwaitingCert { pod: NamespacedName },
    #[error("certificate for {pod}: {source}")]
    Cert {
        pod: NamespacedName,
        source: Box<mesh_pki::ca::CaError>,
    },
}

/// What must match for a running pod to be kept as is (an IP change means re-enrolling).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
struct Fingerprint {
    uid: Option<String>,
    ips: Vec<IpAddr>,
    service_account: String,
}

/// One data worker's captured listeners for a pod (15008 has one listener, whose
/// connections are dealt to the workers: `proxy::inbound`).
struct Listeners {
    outbound: std::net::TcpListener,
    /// The IPv6 outbound listener ([`ListenIps::outbound6`]).
    outbound6: Option<std::net::TcpListener>,
    plaintext: std::net::TcpListener,
}

/// Spawns the task serving one of a pod's listeners on its data worker (or on the shared
/// runtime); the listener is registered with the runtime of the task, so that its wake-ups
/// come from the thread that serves it.
fn spawn_on<S, F>(
    worker: Option<&tokio::runtime::Handle>,
    span: tracing::Span,
    listener: std::net::TcpListener,
    serve: S,
) where
    S: FnOnce(TcpListener) -> F + Send + 'static,
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let task = async move {
        match TcpListener::from_std(listener) {
            Ok(listener) => serve(listener).await,
            Err(e) => tracing::error!(error = %e, "a pod listener could not be registered"),
        }
    }
    .instrument(span);
    match worker {
        Some(handle) => drop(handle.spawn(task)),
        None => drop(tokio::spawn(task)),
    }
}

fn fingerprint(p: &Pod) -> Fingerprint {
    Fingerprint {
        uid: p.uid.clone(),
        ips: p.ips.clone(),
        service_account: p.service_account.clone(),
    }
}

/// Where a pod's listeners bind (see [`listen_ips`]).
#[derive(Debug, PartialEq, Eq)]
struct ListenIps {
    /// Outbound (15001): the pod's IPv4 loopback (its first address with `--redirect
    /// loopback`).
    outbound: IpAddr,
    /// A second outbound listener, on the pod's IPv6 loopback, when its IPv6 is captured.
    outbound6: Option<IpAddr>,
    /// Inbound (15006, 15008).
    inbound: IpAddr,
}

/// Where a pod's listeners bind. In the pod's own namespace outbound listens on its loopback,
/// so that only the pod's own connections reach it: on `127.0.0.1`, and for a pod whose IPv6
/// is captured ([`redirect::captures_ipv6`]) on `[::1]` too, as each capture hands a
/// connection to the listener of its family (a socket on `[::1]` is v6-only); inbound listens
/// on every address (`[::]` takes both families). With `--redirect loopback` the pod is an
/// address in the agent's namespace, and all its listeners bind on its first address.
fn listen_ips(redirect: Redirect, ips: &[IpAddr]) -> ListenIps {
    let v6 = redirect::captures_ipv6(ips);
    match ips.first() {
        Some(ip) if redirect == Redirect::Loopback => ListenIps {
            outbound: *ip,
            outbound6: None,
            inbound: *ip,
        },
        _ => ListenIps {
            outbound: Ipv4Addr::LOCALHOST.into(),
            outbound6: v6.then_some(Ipv6Addr::LOCALHOST.into()),
            inbound: match v6 {
                true => Ipv6Addr::UNSPECIFIED.into(),
                false => Ipv4Addr::UNSPECIFIED.into(),
            },
        },
    }
}

struct Running {
    fp: Fingerprint,
    ctx: Arc<PodCtx>,
}

/// What holds a pod's redirection in place: its current enrollment, and the released ones
/// whose connections still run (a pod released, enrolled and released again has two). The
/// redirection goes when neither is left.
#[derive(Default)]
struct Holders {
    enrolled: bool,
    draining: Vec<Arc<PodCtx>>,
}

/// [`Holders`] per pod, shared with the cleanups that wait for a released pod's connections
/// to finish. Changes to a pod's redirection happen under this lock, so a cleanup never
/// removes what an enrollment has just installed.
type Redirections = Arc<std::sync::Mutex<BTreeMap<NamespacedName, Holders>>>;

fn lock(r: &Redirections) -> std::sync::MutexGuard<'_, BTreeMap<NamespacedName, Holders>> {
    r.lock().unwrap_or_else(|e| e.into_inner())
}

/// Status of one pod, for `/config_dump` and readiness.
#[derive(Clone, Debug, Serialize)]
pub struct PodStatus {
    pub pod: String,
    pub identity: String,
    pub ips: Vec<IpAddr>,
    pub netns: String,
    pub state: String,
    /// The pod's open connections (all three listeners) while it is enrolled; read by the
    /// node dashboard, not dumped.
    #[serde(skip)]
    pub active: Option<Arc<proxy::ActiveConns>>,
}

pub struct Manager {
    pi: Arc<ProxyInputs>,
    running: BTreeMap<NamespacedName, Running>,
    failed: BTreeMap<NamespacedName, String>,
    redirections: Redirections,
    ready: Arc<AtomicBool>,
    status: Arc<std::sync::Mutex<Vec<PodStatus>>>,
    /// Whether the first reconcile has removed what an earlier agent left in pods that are no
    /// longer enrolled.
    swept_leftovers: bool,
}

impl Manager {
    pub fn new(
        pi: Arc<ProxyInputs>,
        ready: Arc<AtomicBool>,
        status: Arc<std::sync::Mutex<Vec<PodStatus>>>,
    ) -> Self {
        Manager {
            pi,
            running: BTreeMap::new(),
            failed: BTreeMap::new(),
            redirections: Redirections::default(),
            ready,
            status,
            swept_leftovers: false,
        }
    }

    /// Brings the running set in line with `model`. Returns true when nothing is pending.
    pub fn reconcile(&mut self, model: &Model) -> bool {
        let node = self.pi.cfg.node_name.clone();
        let desired: BTreeMap<NamespacedName, &Pod> = model
            .pods_on_node(&node)
            .filter(|p| model.is_ambient(p) && !p.ips.is_empty() && !p.host_network)
            .map(|p| (NamespacedName::new(&p.namespace, &p.name), p))
            .collect();

        // Release pods that left, or changed in a way that needs new sockets.
        let leaving: Vec<NamespacedName> = self
            .running
            .iter()
            .filter(|(k, r)| desired.get(*k).is_none_or(|p| fingerprint(p) != r.fp))
            .map(|(k, _)| k.clone())
            .collect();
        for key in leaving {
            if let Some(r) = self.running.remove(&key) {
                self.release(&key, r);
            }
        }
        if !self.swept_leftovers {
            self.swept_leftovers = true;
            self.remove_leftovers(model, &desired);
        }
        self.failed.clear();
        for (key, pod) in &desired {
            if self.running.contains_key(key) {
                continue;
            }
            match self.enroll(model, pod) {
                Ok(r) => {
                    tracing::info!(pod = %key, identity = %r.ctx.identity, "pod enrolled");
                    self.running.insert(key.clone(), r);
                }
                Err(e @ EnrollError::AwaitingCert { .. }) => {
                    tracing::info!(pod = %key, "{e}");
                    self.failed.insert(key.clone(), e.to_string());
                }
                Err(e) => {
                    tracing::warn!(pod = %key, error = %e, "enrolling pod failed; will retry");
                    self.failed.insert(key.clone(), e.to_string());
                }
            }
        }
        if self.pi.cfg.redirect == Redirect::Ebpf {
            self.sweep_pins(model, &desired);
        }
        let done = self.failed.is_empty();
        self.refresh();
        done
    }

    /// Readiness and the pods' states after a certificate arrived or was refused: ready once
    /// every pod is enrolled and holds its certificate.
    pub fn refresh(&self) {
        let certified = self
            .pi
            .certs
            .has_all(self.running.values().map(|r| &r.ctx.identity));
        self.ready
            .store(self.failed.is_empty() && certified, Ordering::SeqCst);
        self.publish_status();
    }

    fn enroll(&mut self, model: &Model, pod: &Pod) -> Result<Running, EnrollError> {
        let key = NamespacedName::new(&pod.namespace, &pod.name);
        let cfg = &self.pi.cfg;
        let netns = self.pi.pod_netns.open(pod)?;
        let identity = model.identity_of(pod, &cfg.trust_domain);
        if self.pi.certs.is_remote() {
            // Asked of the CA service now; until it answers, the pod is captured but its
            // connections fail closed (no certificate to present), and the pod shows as
            // waiting with the CA's reason.
            self.pi.certs.want(&identity);
            // Already captured (an upgrade: the old agent still serves it; or a restart: it
            // fails closed meanwhile): this agent's listeners would share the pod's ports
            // with the old one's and fail what they took, so it takes over only once it can
            // serve. A pod never captured is captured at once (failing closed) instead.
            let captured = matches!(cfg.redirect, Redirect::Ebpf | Redirect::Nftables)
                && redirect::has_leftovers(netns.path());
            if captured && !self.pi.certs.has_all([&identity]) {
                return Err(EnrollError::AwaitingCert { pod: key });
            }
        } else {
            // Issue the certificate now so the first connection does not wait for it.
            self.pi
                .certs
                .certified_key(&identity)
                .map_err(|source| EnrollError::Cert {
                    pod: key.clone(),
                    source: Box::new(source),
                })?;
        }
        let server_tls = mesh_pki::tls::server_config(self.pi.certs.clone(), identity.clone())
            .map_err(|source| EnrollError::Tls {
                pod: key.clone(),
                source: Box::new(source),
            })?;
        let home = &self.pi.home;
        let at = listen_ips(cfg.redirect, &pod.ips);
        let setup = match cfg.redirect {
            Redirect::Ebpf => ListenFor::Ebpf,
            _ => ListenFor::Nat,
        };
        if !netns.is_own() {
            // An upgrade closes the old agent's listeners while the new one's share their
            // ports: what was queued on the old ones moves over instead of being reset.
            match socket::migrate_requests_in(&netns, home) {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(pod = %key, "kernel without tcp_migrate_req (< 5.14): an upgrade may reset connections queued on the old agent's listeners")
                }
                Err(e) => {
                    tracing::warn!(pod = %key, error = %e, "an upgrade may reset connections queued on the old agent's listeners")
                }
            }
        }
        let listen = |ip, port| socket::listen_in(&netns, home, SocketAddr::new(ip, port), setup);
        // The captured ports get a listener per data worker (one on the shared runtime):
        // each port's listeners form one `SO_REUSEPORT` group, over which the kernel spreads
        // the many short connections an application opens. HBONE gets one listener: its few
        // long-lived connections are dealt to the workers in turn instead (a hash could put
        // a peer's two on one worker).
        let sets = (0..self.pi.workers.handles().len().max(1))
            .map(|_| {
                Ok::<_, EnrollError>(Listeners {
                    outbound: listen(at.outbound, OUTBOUND_PORT)?,
                    outbound6: at
                        .outbound6
                        .map(|ip| listen(ip, OUTBOUND_PORT))
                        .transpose()?,
                    plaintext: listen(at.inbound, INBOUND_PLAINTEXT_PORT)?,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let hbone = listen(at.inbound, HBONE_PORT)?;
        // The DNS proxy's sockets, where port-53 traffic is captured to (IPv4, and IPv6 for a
        // pod with an IPv6 address).
        let dns = match cfg.dns_capture && !netns.is_own() {
            true => Some(crate::dns::bind(&netns, home, &pod.ips, setup)?),
            false => None,
        };
        let mut redirections = lock(&self.redirections);
        let capture = match cfg.redirect {
            Redirect::Nftables => {
                redirect::nft::install(netns.path(), &pod.ips, dns.is_some())?;
                None
            }
            Redirect::Ebpf => {
                let pins = redirect::ebpf::pin_dir(&cfg.bpf_fs, &key, &netns)?;
                // The capture hands a connection to one listener of each group; the
                // kernel's reuseport selection then picks among the group.
                let first = &sets[0];
                let outbound = redirect::ebpf::Outbound {
                    v4: &first.outbound,
                    v6: first.outbound6.as_ref(),
                };
                Some(redirect::ebpf::install(
                    &netns,
                    &pod.ips,
                    &first.plaintext,
                    outbound,
                    &pins,
                    dns.as_ref(),
                )?)
            }
            Redirect::Auto | Redirect::None | Redirect::Loopback => None,
        };
        redirections.entry(key.clone()).or_default().enrolled = true;
        drop(redirections);
        let stop = CancellationToken::new();
        let cert = self.pi.certs.hold(&identity);
        let ctx = Arc::new(PodCtx {
            key: key.clone(),
            ips: pod.ips.clone(),
            identity,
            netns,
            server_tls,
            stop: stop.clone(),
            outbound_stop: CancellationToken::new(),
            released: std::sync::atomic::AtomicBool::new(false),
            active: Arc::default(),
            capture: proxy::CaptureSlot::new(capture),
            conn_cap: mesh_shell::limits::Cap::new(
                "max_connections_per_pod",
                self.pi.cfg.max_connections_per_pod,
            ),
            cert,
        });
        let pi = &self.pi;
        if ctx.capture.get().is_some_and(|c| c.adopted()) {
            tracing::info!(pod = %key, "adopted the capture an earlier agent pinned");
            // The earlier agent may still run (an upgrade) and be delivering: its exemptions
            // go once any delivery it had under way has connected or timed out.
            let (pod, wait) = (Arc::downgrade(&ctx), pi.cfg.connect_timeout * 2);
            tokio::spawn(async move {
                tokio::time::sleep(wait).await;
                let capture = pod.upgrade().and_then(|p| p.capture.get());
                if let Some(cleared) = capture.map(|c| c.clear_stale_exemptions()) {
                    tracing::debug!(cleared, "stale capture exemptions removed");
                }
            });
        }
        let span = |name: &'static str| tracing::info_span!("listener", kind = name, pod = %key);
        spawn_on(pi.workers.next(), span("inbound_hbone"), hbone, {
            let (pod, pi, stop) = (ctx.clone(), pi.clone(), stop.clone());
            move |l| proxy::inbound::run(l, pod, pi, stop)
        });
        for (worker, set) in sets.into_iter().enumerate() {
            let on = pi.workers.handles().get(worker);
            let (pod, pi, out_stop, stop) = (&ctx, pi, &ctx.outbound_stop, &stop);
            for outbound in std::iter::once(set.outbound).chain(set.outbound6) {
                spawn_on(on, span("outbound"), outbound, {
                    let (pod, pi, stop) = (pod.clone(), pi.clone(), out_stop.clone());
                    move |l| proxy::outbound::run(l, pod, pi, stop)
                });
            }
            spawn_on(on, span("inbound_plaintext"), set.plaintext, {
                let (pod, pi, stop) = (pod.clone(), pi.clone(), stop.clone());
                move |l| proxy::inbound_passthrough::run(l, pod, pi, stop)
            });
        }
        for crate::dns::FamilySockets { udp, tcp } in
            dns.into_iter().flat_map(|d| d.into_families())
        {
            // Stopped with the outbound listener: after the capture, so nothing captured
            // meanwhile finds no socket.
            let stop = &ctx.outbound_stop;
            let udp_task = crate::dns::run_udp(udp, ctx.clone(), pi.clone(), stop.clone());
            drop(tokio::spawn(udp_task.instrument(span("dns_udp"))));
            spawn_on(None, span("dns_tcp"), tcp, {
                let (pod, pi, stop) = (ctx.clone(), pi.clone(), stop.clone());
                move |l| crate::dns::run_tcp(l, pod, pi, stop)
            });
        }
        if cfg.redirect == Redirect::Ebpf {
            tokio::spawn(sweep_direct(ctx.clone()));
        }
        Ok(Running {
            fp: fingerprint(pod),
            ctx,
        })
    }

    /// Releases a pod: its listeners close and new connections are no longer captured at once;
    /// established ones finish, and the rest of the pod's redirection state (mark handling and
    /// reply routing they still depend on) is removed after the last one has closed.
    fn release(&self, key: &NamespacedName, r: Running) {
        r.ctx
            .released
            .store(true, std::sync::atomic::Ordering::SeqCst);
        r.ctx.stop.cancel();
        let backend = self.pi.cfg.redirect;
        if matches!(backend, Redirect::Nftables | Redirect::Ebpf) && r.ctx.netns.path().exists() {
            let netns = r.ctx.netns.path();
            let mut redirections = lock(&self.redirections);
            let holders = redirections.entry(key.clone()).or_default();
            holders.enrolled = false;
            holders.draining.retain(|c| !c.active.is_empty());
            holders.draining.push(r.ctx.clone());
            let stopped = match backend {
                // Every flow still open keeps its route, also those of earlier enrollments
                // still draining.
                Redirect::Ebpf => {
                    let flows: Vec<_> = holders
                        .draining
                        .iter()
                        .flat_map(|c| c.active.flows())
                        .collect();
                    redirect::ebpf::stop_capture(netns, &r.ctx.ips, &flows)
                }
                _ => redirect::nft::stop_capture(netns),
            };
            if let Err(e) = stopped {
                tracing::warn!(pod = %key, error = %e, "stopping capture failed");
            }
            // Detaches the program (and removes its pins) once no delivery holds it: new
            // inbound connections then reach the application directly.
            drop(r.ctx.capture.take());
            // Nothing new is captured now: the outbound listener takes what it was handed
            // (listed above, so their routes stay) and closes.
            r.ctx.outbound_stop.cancel();
            drop(redirections);
            let (ctx, redirections, key) = (r.ctx.clone(), self.redirections.clone(), key.clone());
            tokio::spawn(async move {
                ctx.active.idle().await;
                let remove = move || remove_when_unheld(&redirections, &key, &ctx, backend);
                if let Err(e) = tokio::task::spawn_blocking(remove).await {
                    tracing::warn!(error = %e, "removing redirection panicked");
                }
            });
        }
        // Without a capture (or its namespace gone) there is nothing to wait for.
        r.ctx.outbound_stop.cancel();
        // The certificate goes with the last holder of this identity (`PodCtx::cert`): not
        // before the connections the listener still takes have been served.
        tracing::info!(pod = %key, open = r.ctx.active.len(), "pod released; established connections drain");
    }

    /// Closes every listener (shutdown); connections keep running until they finish. The
    /// pods stay captured (eBPF: the pinned programs stay attached; nftables: the rules stay),
    /// failing closed until the next agent takes over.
    /// The agent is shutting down: with `--release-on-exit` every pod is released
    /// ([`Manager::release_all`]), else stopped with its capture kept ([`Manager::stop_all`]).
    pub fn shut_down(&mut self) {
        if self.pi.cfg.release_on_exit {
            self.release_all();
        } else {
            self.stop_all();
        }
    }

    /// Releases every pod as if it left the mesh, so new connections go directly at once
    /// while established ones drain (the caller removes what they keep once the drain is
    /// over).
    pub fn release_all(&mut self) {
        for (key, r) in std::mem::take(&mut self.running) {
            self.release(&key, r);
        }
    }

    /// The capture stays in each pod's slot while its connections drain: a stream the old
    /// agent still accepts on an established HBONE connection (sent before the peer saw the
    /// GOAWAY) is delivered with an exemption like any other; without one its SYN would be
    /// steered to the next agent's listener, whose reply leaves the pod for the spoofed client
    /// address, and the delivery would time out.
    pub fn stop_all(&mut self) {
        for (_, r) in std::mem::take(&mut self.running) {
            if let Some(capture) = r.ctx.capture.get() {
                capture.keep_pinned();
            }
            r.ctx.stop.cancel();
            r.ctx.outbound_stop.cancel();
        }
    }

    /// Once, at the first reconcile: pods of this node that are not (or no longer) enrolled may
    /// still hold the redirection an earlier agent installed (released while no agent ran);
    /// it is removed, so they reach the network directly instead of failing closed forever.
    /// Pods whose namespace cannot be found are gone, and their redirection with them.
    fn remove_leftovers(&self, model: &Model, desired: &BTreeMap<NamespacedName, &Pod>) {
        let backend = self.pi.cfg.redirect;
        if !matches!(backend, Redirect::Nftables | Redirect::Ebpf) {
            return;
        }
        let node = &self.pi.cfg.node_name;
        for pod in model.pods_on_node(node).filter(|p| !p.host_network) {
            let key = NamespacedName::new(&pod.namespace, &pod.name);
            if desired.contains_key(&key) {
                continue;
            }
            // Not found: the pod is gone, and its redirection with its namespace.
            let Ok(netns) = self.pi.pod_netns.open(pod) else {
                continue;
            };
            let netns = netns.path().to_path_buf();
            if !redirect::has_leftovers(&netns) {
                continue;
            }
            let removed = match backend {
                Redirect::Ebpf => redirect::ebpf::remove(&netns),
                _ => redirect::nft::remove(&netns),
            };
            if let Err(e) = removed {
                tracing::warn!(pod = %key, error = %e, "removing an earlier agent's redirection failed");
            }
        }
    }

    /// Unpins captures that no pod of this node owns any more (see
    /// [`redirect::ebpf::sweep_pins`]): what pods deleted while no agent ran left behind.
    fn sweep_pins(&self, model: &Model, desired: &BTreeMap<NamespacedName, &Pod>) {
        let current: Vec<(NamespacedName, std::path::PathBuf)> = self
            .running
            .iter()
            .filter_map(|(k, r)| {
                let dir = r.ctx.capture.get()?.pin_dir()?.to_path_buf();
                Some((k.clone(), dir))
            })
            .collect();
        // Pods on other nodes are never this agent's to touch (a bpffs shared between
        // nodes, as in the netns harness, holds theirs too).
        let node = &self.pi.cfg.node_name;
        let elsewhere = model
            .pods
            .iter()
            .filter(|(_, p)| p.node_name.as_deref().is_some_and(|n| n != node))
            .map(|(k, _)| k.clone());
        let wanted: Vec<NamespacedName> = desired.keys().cloned().chain(elsewhere).collect();
        for dir in redirect::ebpf::sweep_pins(&self.pi.cfg.bpf_fs, &current, &wanted) {
            tracing::info!(dir = %dir.display(), "removed the capture of a pod no longer here");
        }
    }

    fn publish_status(&self) {
        let pending: BTreeMap<String, Option<String>> = self
            .pi
            .certs
            .pending()
            .into_iter()
            .map(|p| (p.identity, p.last_error))
            .collect();
        let mut out: Vec<PodStatus> = self
            .running
            .iter()
            .map(|(k, r)| {
                let identity = r.ctx.identity.to_string();
                let state = match pending.get(&identity) {
                    None => "enrolled".to_string(),
                    Some(reason) => format!(
                        "pending: waiting for its certificate from the ca ({})",
                        reason.as_deref().unwrap_or("requested")
                    ),
                };
                PodStatus {
                    pod: k.to_string(),
                    identity,
                    ips: r.ctx.ips.clone(),
                    netns: r.ctx.netns.path().display().to_string(),
                    state,
                    active: Some(r.ctx.active.clone()),
                }
            })
            .collect();
        out.extend(self.failed.iter().map(|(k, e)| PodStatus {
            pod: k.to_string(),
            identity: String::new(),
            ips: vec![],
            netns: String::new(),
            state: format!("pending: {e}"),
            active: None,
        }));
        *self.status.lock().unwrap_or_else(|e| e.into_inner()) = out;
    }
}

/// `ctx`, released, has no connection left: it no longer holds the pod's redirection, which
/// is removed when nothing else holds it (not enrolled again, no other release draining).
fn remove_when_unheld(
    redirections: &Redirections,
    key: &NamespacedName,
    ctx: &Arc<PodCtx>,
    backend: Redirect,
) {
    let mut redirections = lock(redirections);
    let Some(holders) = redirections.get_mut(key) else {
        return;
    };
    holders.draining.retain(|c| !Arc::ptr_eq(c, ctx));
    if holders.enrolled || !holders.draining.is_empty() {
        return;
    }
    redirections.remove(key);
    let netns = ctx.netns.path();
    if !netns.exists() {
        return;
    }
    let removed = match backend {
        Redirect::Ebpf => redirect::ebpf::remove(netns),
        _ => redirect::nft::remove(netns),
    };
    match removed {
        Ok(()) => tracing::info!(pod = %key, "released pod drained; redirection removed"),
        Err(e) => tracing::warn!(pod = %key, error = %e, "removing redirection failed"),
    }
}

/// How often an enrolled pod's rules for connections it opened while released are checked
/// for ones that have closed.
const DIRECT_SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_secs(5);

/// While `ctx` is enrolled, removes the rules that keep its direct connections direct (see
/// [`redirect::ebpf::sweep_direct`]) as those connections close; stops once none is left. A
/// stale rule would let a later connection with the same addresses and ports escape capture.
async fn sweep_direct(ctx: Arc<PodCtx>) {
    loop {
        tokio::select! {
            () = ctx.stop.cancelled() => return,
            () = tokio::time::sleep(DIRECT_SWEEP_INTERVAL) => {}
        }
        let netns = ctx.netns.path().to_path_buf();
        match tokio::task::spawn_blocking(move || redirect::ebpf::sweep_direct(&netns)).await {
            Ok(Ok(0)) => return,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::warn!(pod = %ctx.key, error = %e, "sweeping the rules of closed direct connections failed");
            }
            Err(_) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `listen_ips(redirect, ips)` binds outbound on `outbound` (one listener each) and
    /// inbound on `inbound`.
    fn check(redirect: Redirect, ips: &[&str], outbound: &[&str], inbound: &str) {
        let parse = |ip: &str| -> IpAddr { ip.parse().expect("ip") };
        let ips: Vec<IpAddr> = ips.iter().copied().map(parse).collect();
        let got = listen_ips(redirect, &ips);
        let got_outbound: Vec<IpAddr> =
            std::iter::once(got.outbound).chain(got.outbound6).collect();
        let want: Vec<IpAddr> = outbound.iter().copied().map(parse).collect();
        assert_eq!(got_outbound, want, "{redirect:?} {ips:?}: outbound");
        assert_eq!(got.inbound, parse(inbound), "{redirect:?} {ips:?}: inbound");
        // Outbound is never reachable from outside the pod.
        if redirect != Redirect::Loopback {
            assert!(
                got_outbound.iter().all(IpAddr::is_loopback),
                "{got_outbound:?}"
            );
        }
    }

    #[test]
    fn listeners_bind_in_the_pod_namespace_or_on_the_pods_address() {
        let v4 = ["10.244.1.2"];
        for redirect in [Redirect::Ebpf, Redirect::Nftables, Redirect::None] {
            check(redirect, &v4, &["127.0.0.1"], "0.0.0.0");
        }
        check(
            Redirect::Loopback,
            &["127.3.4.5"],
            &["127.3.4.5"],
            "127.3.4.5",
        );
        check(
            Redirect::Loopback,
            &["127.3.4.5", "::1"],
            &["127.3.4.5"],
            "127.3.4.5",
        );
    }

    /// A dual-stack pod's IPv4 connections out are captured to an IPv4 listener and its IPv6
    /// ones to an IPv6 listener: the one on `[::1]` is v6-only, and neither capture hands a
    /// connection to a listener of the other family.
    #[test]
    fn a_pod_with_an_ipv6_address_gets_an_outbound_listener_per_family() {
        let dual = ["10.244.1.2", "fd00::2"];
        for redirect in [Redirect::Ebpf, Redirect::Nftables, Redirect::None] {
            check(redirect, &dual, &["127.0.0.1", "::1"], "::");
        }
        // IPv6 first, or IPv6 only: IPv4 still has its listener (loopback, harmless).
        check(
            Redirect::Nftables,
            &["fd00::2", "10.244.1.2"],
            &["127.0.0.1", "::1"],
            "::",
        );
        check(Redirect::Ebpf, &["fd00::2"], &["127.0.0.1", "::1"], "::");
    }
}
