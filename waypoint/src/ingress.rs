//! Ingress: when the Gateway this proxy implements is of class `istio` (Istio's ingress
//! gateway; a waypoint's is `istio-waypoint`), each of its `HTTP` and `HTTPS` listeners is
//! served on its port, for clients outside the mesh: no HBONE and no client certificate.
//! An `HTTPS` listener (`tls.mode: Terminate`) terminates TLS with the certificates of its
//! `certificateRefs` (Kubernetes TLS Secrets; another namespace's need a ReferenceGrant),
//! chosen by the client's SNI among the port's listeners (`mesh_pki::tls::ingress`). Each
//! request then takes the L7 engine's phases with a [`Target::Listener`]: the routes
//! attached to the listener that takes its host (else the VirtualServices whose `gateways`
//! name this Gateway and whose `hosts` match) choose the backend, which the upstream
//! reaches over HBONE under the gateway's own identity (so the backend's policies see the
//! gateway's principal), and AuthorizationPolicies targeting the Gateway apply first.
//!
//! A VirtualService destination that names a subset of a backend Service behind a waypoint
//! goes to the waypoint without the subset (its routes choose the Service's pods; see
//! `mesh_l7::engine::select`): the log says so once when such a destination appears in the
//! config (`Model::subsets_through_waypoints`), not per request.
//!
//! The ports follow the model: on every change the wanted set is computed again; a port no
//! listener uses any more closes (its connections finish), a new one opens, an HTTPS port
//! gets the certificates of the new model (connections already up keep theirs). A port that
//! cannot be bound, or an HTTPS port without one usable certificate, is logged and tried
//! again at the next change; the other ports are unaffected.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_l7::io::Rewind;
use mesh_l7::protocol::{Declared, Detected};
use mesh_l7::proxy::{ConnCtx, Inputs};
use mesh_l7::target::Target;
use mesh_model::model::{
    Gateway, ListenerProtocol, ListenerTlsMode, Model, NamespacedName, INGRESS_GATEWAY_CLASS,
};
use mesh_shell::conns::Active;
use mesh_shell::limits::{Cap, HandshakeCap};

use crate::inbound::Handshake;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How long a client has to send its first bytes (plain ports: to tell HTTP/1.1 from h2c).
const FIRST_BYTES_TIMEOUT: Duration = Duration::from_secs(10);
/// Metrics reporter of refusals at the ingress listeners.
const REPORTER: &str = "gateway";

/// What one port serves.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PortKind {
    Http,
    /// TLS terminated with the listeners' certificates (swapped on model changes).
    Https,
}

struct Port {
    kind: PortKind,
    /// Current TLS configuration (HTTPS), swapped on model changes.
    tls: Arc<Mutex<Option<Arc<rustls::ServerConfig>>>>,
    stop: CancellationToken,
}

/// What bounds the ingress listeners' connections: the process's caps (shared with its
/// HBONE listener) and the TLS handshake timeout.
pub struct IngressLimits {
    /// Connections open (`max_connections`): over it, closed at once (flag OM).
    pub conn_cap: Cap,
    /// TLS handshakes in progress, per process and per source, and their rate per source:
    /// over any, closed before a byte of TLS is read (flag OM).
    pub handshake_cap: HandshakeCap,
    pub handshake_timeout: Duration,
}

/// The ingress listeners of one Gateway.
pub struct Ingress {
    gateway: NamespacedName,
    inputs: Arc<Inputs>,
    active: Arc<Active>,
    limits: IngressLimits,
    /// The address listeners bind (the pod's; port 0 replaced by each listener's port).
    bind: std::net::IpAddr,
    ports: Mutex<BTreeMap<u16, Port>>,
    /// The subsets behind waypoints last said in the log (see the module docs).
    subsets_said: Mutex<BTreeSet<String>>,
    stop: CancellationToken,
}

impl Ingress {
    pub fn new(
        gateway: NamespacedName,
        inputs: Arc<Inputs>,
        active: Arc<Active>,
        limits: IngressLimits,
        bind: std::net::IpAddr,
        stop: CancellationToken,
    ) -> Arc<Ingress> {
        Arc::new(Ingress {
            gateway,
            inputs,
            active,
            limits,
            bind,
            ports: Mutex::new(BTreeMap::new()),
            subsets_said: Mutex::new(BTreeSet::new()),
            stop,
        })
    }

    /// Follows the model until stopped: `changed` fires on every installed model.
    pub async fn run(self: Arc<Self>, mut changed: watch::Receiver<()>) {
        loop {
            let model = self.inputs.model.load_full();
            self.reconcile(&model).await;
            tokio::select! {
                _ = self.stop.cancelled() => break,
                r = changed.changed() => if r.is_err() { break },
            }
        }
        for (_, port) in std::mem::take(&mut *self.lock()) {
            port.stop.cancel();
        }
    }

    /// The bound ingress ports (for tests and the log).
    pub fn ports(&self) -> Vec<u16> {
        self.lock().keys().copied().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u16, Port>> {
        self.ports.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn reconcile(self: &Arc<Self>, model: &Model) {
        let wanted = match model.gateways.get(&self.gateway) {
            Some(gw) if gw.class == INGRESS_GATEWAY_CLASS => wanted_ports(gw),
            _ => BTreeMap::new(),
        };
        self.say_subsets(model);
        // Closed: ports no listener wants any more, or whose kind changed.
        let mut closed = Vec::new();
        {
            let mut ports = self.lock();
            ports.retain(|port, p| {
                let keep = wanted.get(port) == Some(&p.kind);
                if !keep {
                    p.stop.cancel();
                    closed.push(*port);
                }
                keep
            });
        }
        if !closed.is_empty() {
            tracing::info!(ports = ?closed, "ingress ports closed");
        }
        for (port, kind) in wanted {
            let tls = match kind {
                PortKind::Https => match self.tls_config(model, port) {
                    Ok(config) => Some(config),
                    Err(reason) => {
                        tracing::warn!(port, %reason, "HTTPS ingress port not served");
                        if let Some(p) = self.lock().remove(&port) {
                            p.stop.cancel();
                        }
                        continue;
                    }
                },
                PortKind::Http => None,
            };
            if let Some(p) = self.lock().get(&port) {
                *p.tls.lock().unwrap_or_else(|e| e.into_inner()) = tls;
                continue;
            }
            let addr = SocketAddr::new(self.bind, port);
            let listener = match TcpListener::bind(addr).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(%addr, error = %e, "ingress port not bound; trying again at the next config change");
                    continue;
                }
            };
            let p = Port {
                kind,
                tls: Arc::new(Mutex::new(tls)),
                stop: self.stop.child_token(),
            };
            let serve = self
                .clone()
                .serve(listener, port, p.tls.clone(), p.stop.clone());
            tokio::spawn(serve.instrument(tracing::info_span!("ingress", port)));
            tracing::info!(%addr, kind = ?p.kind, "ingress port open");
            self.lock().insert(port, p);
        }
    }

    /// Logs each VirtualService destination whose subset is not applied here (a Service
    /// behind a waypoint) once, when it appears in the config.
    fn say_subsets(&self, model: &Model) {
        let now: BTreeSet<String> = model
            .subsets_through_waypoints(&self.gateway)
            .iter()
            .map(ToString::to_string)
            .collect();
        let mut said = self.subsets_said.lock().unwrap_or_else(|e| e.into_inner());
        for reason in newly(&mut said, now) {
            tracing::warn!(%reason, "VirtualService subset not applied at the ingress");
        }
    }

    /// The TLS configuration of HTTPS port `port`: the certificates of its listeners.
    fn tls_config(&self, model: &Model, port: u16) -> Result<Arc<rustls::ServerConfig>, String> {
        let gw = model
            .gateways
            .get(&self.gateway)
            .ok_or_else(|| "no Gateway".to_string())?;
        let mut certs = mesh_pki::tls::ingress::SniCertificates::default();
        let mut problems = Vec::new();
        for l in gw.listeners.iter().filter(|l| l.port == port) {
            if l.protocol != ListenerProtocol::Https {
                continue;
            }
            match model.listener_certificates(gw, l) {
                Ok(secrets) => {
                    for s in secrets {
                        match mesh_pki::tls::ingress::certified_key(&s.cert_chain_pem, &s.key_pem) {
                            Ok(key) => certs.add(l.hostname.as_deref(), key),
                            Err(e) => problems.push(format!(
                                "listener {}: Secret {}/{}: {e}",
                                l.name, s.namespace, s.name
                            )),
                        }
                    }
                }
                Err(e) => problems.push(format!("listener {}: {e}", l.name)),
            }
        }
        for p in &problems {
            tracing::warn!(port, problem = %p, "ingress certificate not served");
        }
        if certs.is_empty() {
            return Err(format!("no usable certificate ({})", problems.join("; ")));
        }
        certs.server_config().map_err(|e| e.to_string())
    }

    async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        port: u16,
        tls: Arc<Mutex<Option<Arc<rustls::ServerConfig>>>>,
        stop: CancellationToken,
    ) {
        let accepted = |(tcp, peer): (TcpStream, SocketAddr)| {
            let Some(slot) =
                self.limits
                    .conn_cap
                    .admit(&self.inputs.metrics, REPORTER, "ingress", peer)
            else {
                return;
            };
            let _ = tcp.set_nodelay(true);
            let config = tls.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let guard = self.active.enter();
            let this = self.clone();
            tokio::spawn(
                async move {
                    let _held = (guard, slot);
                    this.serve_conn(tcp, peer, port, config).await;
                }
                .instrument(tracing::debug_span!("conn", %peer)),
            );
        };
        mesh_shell::accept::serve("ingress", || listener.accept(), accepted, stop).await
    }

    async fn serve_conn(
        &self,
        tcp: TcpStream,
        peer: SocketAddr,
        port: u16,
        tls: Option<Arc<rustls::ServerConfig>>,
    ) {
        let local = tcp.local_addr().unwrap_or(SocketAddr::new(self.bind, port));
        let ctx = Arc::new(ConnCtx {
            peer,
            local,
            peer_identity: None,
            authority: local,
            target: Target::Listener {
                gateway: self.gateway.clone(),
                port,
            },
            declared: Declared::Http,
            hosts: Arc::from([]),
        });
        let inputs = self.inputs.clone();
        match tls {
            Some(config) => {
                let limits = crate::inbound::HandshakeLimits {
                    cap: &self.limits.handshake_cap,
                    timeout: self.limits.handshake_timeout,
                    reporter: REPORTER,
                    listener: "ingress",
                };
                let metrics = &self.inputs.metrics;
                let stream = match crate::inbound::tls_handshake(
                    tcp, peer, config, &limits, metrics,
                )
                .await
                {
                    Handshake::Done(s) => s,
                    Handshake::OverCap => return,
                    Handshake::Failed(reason) => {
                        metrics.refused(REPORTER, "TLS");
                        return tracing::debug!(%reason, "ingress TLS handshake failed");
                    }
                };
                let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
                mesh_l7::http::serve(stream, h2, ctx, inputs).await
            }
            None => {
                // Plain: HTTP/1.1, or h2c with prior knowledge.
                let mut tcp = tcp;
                let (buf, detected) = crate::inbound::sniff(&mut tcp, FIRST_BYTES_TIMEOUT).await;
                let h2 = detected == Detected::Http2;
                let down = Rewind::new(buf.freeze(), tcp);
                mesh_l7::http::serve(down, h2, ctx, inputs).await
            }
        }
    }
}

/// What is in `now` and was not in `said`, which becomes `now` (a note that leaves the
/// config and comes back is said again).
fn newly(said: &mut BTreeSet<String>, now: BTreeSet<String>) -> Vec<String> {
    let new = now.difference(said).cloned().collect();
    *said = now;
    new
}

/// The ports `gw`'s listeners want served: `HTTP`, or `HTTPS` terminated here. A port that
/// two protocols claim is not served (the Gateway's status says Conflicted); `TLS`
/// passthrough and `TCP` listeners are not served yet.
fn wanted_ports(gw: &Gateway) -> BTreeMap<u16, PortKind> {
    let mut wanted: BTreeMap<u16, Option<PortKind>> = BTreeMap::new();
    for l in &gw.listeners {
        let kind = match (&l.protocol, l.tls.as_ref().map(|t| &t.mode)) {
            (ListenerProtocol::Http, _) => PortKind::Http,
            (ListenerProtocol::Https, Some(ListenerTlsMode::Terminate)) => PortKind::Https,
            _ => continue,
        };
        wanted
            .entry(l.port)
            .and_modify(|k| {
                if k.as_ref() != Some(&kind) {
                    *k = None;
                }
            })
            .or_insert(Some(kind));
    }
    wanted
        .into_iter()
        .filter_map(|(port, kind)| Some((port, kind?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(notes: &[&str]) -> BTreeSet<String> {
        notes.iter().map(|n| n.to_string()).collect()
    }

    /// A note is said when it appears, not again while the config keeps it (a model change
    /// of something else), and again after it left and came back.
    #[test]
    fn a_note_is_said_once_while_the_config_has_it() {
        let mut said = BTreeSet::new();
        assert_eq!(newly(&mut said, set(&["a"])), ["a"]);
        assert!(newly(&mut said, set(&["a"])).is_empty());
        assert_eq!(newly(&mut said, set(&["a", "b"])), ["b"]);
        assert!(newly(&mut said, set(&["b"])).is_empty());
        assert_eq!(newly(&mut said, set(&["a", "b"])), ["a"]);
    }
}
