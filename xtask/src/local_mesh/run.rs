//! A [`LocalMesh`] made real: the harness mesh (namespaces, one ztunnel per node), the echo
//! servers, and the traffic its pods are annotated to send, observed three ways: what the
//! client got, what the node agents counted (metrics and access log), and what crossed the
//! wire between the nodes. The result is a [`Report`] of facts; `report.rs` renders it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use e2e::prom::{self, Sample};
use e2e::{eventually, ChildGuard, Labelled, Mesh, Proto};

use super::config::{
    CertificateDecl, Expect, IngressDecl, IngressProbe, LocalMesh, PodDecl, Probe, Scheme, Target,
    WaypointDecl,
};
use super::forward::{Forward, FIRST_LOCAL_PORT};

/// The harness "test name" of the local mesh (it seeds the namespace prefix).
const MESH_NAME: &str = "local-mesh";
/// Requests per probe: enough to see a Service's endpoints take turns.
const REQUESTS_PER_PROBE: usize = 4;
/// How long `mesh-echo` may take to listen.
const ECHO_LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the agents' counters may take to reflect a probe. The counters are updated
/// before a connection is answered, so this only bounds a wait that normally ends at once;
/// it runs out only when no agent sees the traffic (a destination outside the mesh).
const METRICS_SETTLE: Duration = Duration::from_secs(2);
/// The HBONE port: the only one in-mesh traffic uses between nodes.
const HBONE_PORT: u16 = 15008;
const OPENED: &str = "istio_tcp_connections_opened_total";
const REFUSED: &str = "mesh_connections_refused_total";
/// What the CA counts per refused request, by reason.
const CA_REFUSED: &str = "mesh_ca_requests_refused_total";
/// What a waypoint counts per request.
const REQUESTS: &str = "istio_requests_total";
/// The file (in the mesh's config directory) holding the TLS Secrets `up` made.
pub const CERTIFICATES_FILE: &str = "local-mesh-certificates.yaml";
/// Where the ingress probes come from, as the report names it.
const OUTSIDE: &str = "this machine";
/// The request header that carries an ingress probe's marker (its path is the route's).
const MARKER_HEADER: &str = "x-local-mesh-probe";
/// How long one `curl` of an ingress probe may take.
const CURL_TIMEOUT_SECS: &str = "5";
/// Log lines of the node agents that describe one finished connection.
const ACCESS_LOG_MARK: &str = "connection complete";
/// The access-log fields worth a line in the report (the log file has them all).
const ACCESS_LOG_FIELDS: [&str; 5] = [
    "direction",
    "src.identity",
    "dst.workload",
    "flags",
    "reason",
];

/// A running local mesh. Dropping it stops every process and removes every namespace.
pub struct Running {
    // Declared before `mesh`: the forwards, gateways and echo servers stop before the
    // namespaces go.
    forwards: Vec<Forward>,
    ingresses: Vec<IngressRun>,
    waypoints: Vec<WaypointRun>,
    echoes: Vec<(String, ChildGuard)>,
    /// The CA of the certificates `up` made for TLS Secrets (see [`CertificateDecl`]).
    ingress_ca: Option<e2e::tls::TestCa>,
    mesh: Mesh,
    /// What the mesh runs (topology as built, pass-through documents as last applied).
    config: LocalMesh,
    config_source: Option<PathBuf>,
    /// The YAML directory as last read, so each edit is reported once.
    last_read: Option<LocalMesh>,
}

/// The proxy process (the `waypoint` binary) of a Gateway, in the pod labelled with the
/// Gateway's name: a waypoint or an ingress gateway, as the Gateway's class says.
pub struct ProxyRun {
    /// `namespace/name` of its pod.
    pub pod: String,
    pub namespace: String,
    pub service_account: String,
    guard: ChildGuard,
}

impl ProxyRun {
    /// Its SPIFFE identity.
    pub fn identity(&self) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }

    /// The name of its output files in the log directory (`<label>.err` is its log).
    pub fn log_label(&self) -> &str {
        self.guard.label()
    }
}

/// A waypoint the mesh runs.
pub struct WaypointRun {
    pub gateway: WaypointDecl,
    pub proxy: ProxyRun,
}

/// An ingress gateway the mesh runs, its listeners forwarded to this machine.
pub struct IngressRun {
    pub gateway: IngressDecl,
    pub proxy: ProxyRun,
    /// Per listener port (each once): its scheme and the forward from `127.0.0.1`.
    pub forwards: Vec<(u16, Scheme, Forward)>,
}

impl IngressRun {
    /// The local address forwarded to listener port `port`.
    pub fn local(&self, port: u16) -> Option<SocketAddr> {
        self.forwards
            .iter()
            .find(|(p, _, _)| *p == port)
            .map(|(_, _, f)| f.local)
    }
}

/// The local port a listener port is forwarded from, when free: `8000 + port` below 1024
/// (80 → 8080, 443 → 8443, as the course's port-forwards do), else the same port.
pub fn preferred_local_port(port: u16) -> u16 {
    if port < 1024 {
        8000 + port
    } else {
        port
    }
}

/// The trust domain of the local mesh's identities.
const TRUST_DOMAIN: &str = "cluster.local";

/// What the traffic did.
#[derive(Clone, Debug)]
pub struct Report {
    pub probes: Vec<ProbeReport>,
    /// `istio_tcp_connections_opened_total` per node, by reporter, after all probes.
    pub opened: BTreeMap<String, BTreeMap<String, u64>>,
    /// Who the CA issued what, after all probes.
    pub ca: CaReport,
}

/// The CA service's side of the run: its `/config_dump` and `/metrics`, and what the node
/// agents say about where their certificates come from.
#[derive(Clone, Debug, Default)]
pub struct CaReport {
    /// The address the agents and waypoints dial; `None` when the mesh signs in process
    /// (`--ca-dir` everywhere, no CA service).
    pub address: Option<String>,
    /// The CA's network namespace.
    pub netns: String,
    /// `/config_dump` `issued`, oldest first (the CA keeps the last 256).
    pub issued: Vec<Issuance>,
    /// `mesh_ca_requests_refused_total` by reason.
    pub refused: BTreeMap<String, u64>,
    /// Node agents whose `/config_dump` names a CA directory (a signing key): none expected.
    pub agents_with_ca_dir: Vec<String>,
    /// Node agents whose `/config_dump` names the CA's address.
    pub agents_with_ca_address: Vec<String>,
}

/// One certificate the CA signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Issuance {
    /// Who asked (`istio-system/ztunnel @n1`: a node agent and its node; `ns/sa`).
    pub caller: String,
    pub identity: String,
    /// `own` (the caller's identity) or `node` (a pod's, on the agent's node).
    pub grant: String,
    pub serial: String,
    pub not_after: String,
}

/// The CA's ledger from its `/config_dump`.
pub fn issuances(dump: &serde_json::Value) -> Vec<Issuance> {
    let field = |i: &serde_json::Value, k: &str| i[k].as_str().unwrap_or_default().to_owned();
    dump["issued"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| Issuance {
                    caller: field(i, "caller"),
                    identity: field(i, "identity"),
                    grant: field(i, "grant"),
                    serial: field(i, "serial"),
                    not_after: field(i, "not_after"),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// One `local-mesh/send-to` entry, sent.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    /// `namespace/name` of the sending pod, or this machine for an ingress probe.
    pub client: String,
    pub client_in_mesh: bool,
    /// The target as written (`echo.demo:80`).
    pub target: String,
    pub addr: SocketAddrV4,
    pub expect: Option<Expect>,
    /// One entry per request, in order; the first failure ends the probe.
    pub responses: Vec<Response>,
    /// Connections the agents counted as opened during the probe.
    pub flows: Vec<Flow>,
    /// Connections the agents counted as refused during the probe.
    pub refusals: Vec<Refusal>,
    /// The agents' access-log lines about the refusals.
    pub access_log: Vec<(String, String)>,
    /// Requests the waypoints handled during the probe.
    pub waypoint_requests: Vec<WaypointRequests>,
    pub wire: Wire,
}

/// Requests one waypoint counted (`istio_requests_total`), by outcome.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct WaypointRequests {
    /// The gateway process: `waypoint <namespace>/<name> in <pod>` or `ingress …`.
    pub waypoint: String,
    pub source_principal: String,
    pub destination_service: String,
    pub response_code: String,
    /// `-` when nothing went wrong, else `DENY`, `UH`, …
    pub response_flags: String,
    pub count: u64,
}

/// What one request got.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Response {
    /// An HTTP answer, and the echo server that sent it (`server` in its JSON).
    Http { status: u16, server: Option<String> },
    /// No HTTP answer; the innermost error.
    Failed(String),
}

/// Connections opened, as counted by one node's agent.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow {
    pub node: String,
    pub reporter: String,
    pub source_principal: String,
    pub destination_principal: String,
    /// `connection_security_policy`: `mutual_tls` for HBONE.
    pub security: String,
    pub count: u64,
}

/// Connections refused, as counted by one node's agent.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Refusal {
    pub node: String,
    pub reporter: String,
    /// The response flag (`PEERAUTHN`, `DENY`, …).
    pub reason: String,
    pub count: u64,
}

/// What crossed the wire between the nodes during one probe.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wire {
    /// IPv4 packets seen.
    pub packets: usize,
    /// Server ports of the TCP connections opened across the wire.
    pub server_ports: BTreeSet<u16>,
    /// TCP payload bytes outside HBONE (neither end on port 15008), i.e. readable by anyone
    /// on the wire.
    pub clear_bytes: usize,
    /// Whether the probe's own request or the echo's answer appeared in clear.
    pub request_in_clear: bool,
}

impl Wire {
    /// Only HBONE crossed (new connections to 15008, or packets of pooled ones), and no
    /// application byte was readable.
    pub fn only_hbone(&self) -> bool {
        self.packets > 0
            && self.server_ports.iter().all(|&p| p == HBONE_PORT)
            && self.clear_bytes == 0
            && !self.request_in_clear
    }
}

impl ProbeReport {
    /// Whether the probe went as its annotation says (`None`: it says nothing).
    pub fn met(&self) -> Option<bool> {
        let expect = self.expect?;
        Some(
            !self.responses.is_empty()
                && self.responses.iter().all(|r| match (expect, r) {
                    (Expect::Status(want), Response::Http { status, .. }) => *status == want,
                    (Expect::Refused, Response::Failed(_)) => true,
                    _ => false,
                }),
        )
    }
}

/// Per node, the samples of the two counters the report reads.
type Snapshot = BTreeMap<String, Vec<Sample>>;

// === impl Running ===

impl Running {
    /// Builds the mesh with the binaries in `bin_dir` and starts the echo servers.
    /// `config_source` is the YAML directory it came from (shown to the user, re-read by
    /// [`Running::reapply`]).
    pub fn start(
        config: LocalMesh,
        bin_dir: &Path,
        config_source: Option<PathBuf>,
    ) -> Result<Self> {
        let ztunnel = bin_dir.join("ztunnel");
        let echo = bin_dir.join("mesh-echo");
        let waypoint = bin_dir.join("waypoint");
        // The CA service: the harness runs it from its binary directory (`E2E_BIN_DIR`).
        let control = bin_dir.join("control");
        let mut binaries = vec![&ztunnel, &echo, &control];
        if config.pods.iter().any(|p| p.gateway.is_some()) {
            binaries.push(&waypoint);
        }
        for binary in binaries {
            if !binary.is_file() {
                bail!(
                    "{} not found: build it with `cargo build --workspace --bins`",
                    binary.display()
                );
            }
        }
        let mesh = config
            .builder(MESH_NAME)
            .ztunnel_binary(&ztunnel)
            .build()
            .context("build the local mesh")?;
        let mut running = Running {
            forwards: Vec::new(),
            ingresses: Vec::new(),
            waypoints: Vec::new(),
            echoes: Vec::new(),
            ingress_ca: None,
            mesh,
            config,
            config_source,
            last_read: None,
        };
        let echo = echo.to_string_lossy().into_owned();
        for pod in running.config.pods.clone() {
            if pod.echo_ports.is_empty() {
                continue;
            }
            let mut argv: Vec<String> = vec![echo.clone()];
            for port in &pod.echo_ports {
                argv.extend(["--port".to_owned(), port.to_string()]);
            }
            argv.extend(["--name".to_owned(), pod.name.clone()]);
            let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
            let mut guard = running.mesh.spawn(&pod.key(), &argv)?;
            for port in &pod.echo_ports {
                guard
                    .wait_for_stdout(&format!("listening on 0.0.0.0:{port}"), ECHO_LISTEN_TIMEOUT)
                    .with_context(|| format!("mesh-echo in {}", pod.key()))?;
            }
            running.echoes.push((pod.key(), guard));
        }
        // Each node's dashboard, reachable from a browser on this machine.
        for (i, node) in running.config.nodes.clone().iter().enumerate() {
            let netns = running.mesh.node_netns(node)?;
            let port = u16::try_from(i)
                .ok()
                .and_then(|i| FIRST_LOCAL_PORT.checked_add(i))
                .unwrap_or(0);
            let forward = Forward::dashboard(node, &netns, port)
                .with_context(|| format!("forward the dashboard of {node}"))?;
            running.forwards.push(forward);
        }
        // The certificates of TLS Secrets `up` makes, before the gateways that read them.
        running.write_certificates()?;
        // The gateways last: each reports ready once it has loaded the mesh's config.
        for pod in running.config.pods.clone() {
            let Some(gateway) = &pod.gateway else {
                continue;
            };
            let found = running.mesh.waypoint_binary()?;
            if found != waypoint {
                bail!(
                    "the harness would run {} instead of {}: set E2E_BIN_DIR={}",
                    found.display(),
                    waypoint.display(),
                    bin_dir.display()
                );
            }
            let waypoint_decl = running.config.waypoint(&pod.namespace, gateway).cloned();
            let ingress_decl = running.config.ingress(&pod.namespace, gateway).cloned();
            let key = format!("{}/{gateway}", pod.namespace);
            let guard = running
                .mesh
                .spawn_waypoint(&pod.key(), &pod.namespace, gateway, &pod.service_account)
                .with_context(|| format!("start the proxy of Gateway {key} in {}", pod.key()))?;
            let proxy = ProxyRun {
                pod: pod.key(),
                namespace: pod.namespace.clone(),
                service_account: pod.service_account.clone(),
                guard,
            };
            match (waypoint_decl, ingress_decl) {
                (Some(decl), _) => running.waypoints.push(WaypointRun {
                    gateway: decl,
                    proxy,
                }),
                (None, Some(decl)) => {
                    let forwards = running.forward_listeners(&decl, &pod)?;
                    running.ingresses.push(IngressRun {
                        gateway: decl,
                        proxy,
                        forwards,
                    });
                }
                (None, None) => bail!("no Gateway {key}"),
            }
        }
        Ok(running)
    }

    /// Forwards each listener port of an ingress gateway from `127.0.0.1` here to the pod's
    /// IP, from its node's namespace (where a load balancer's traffic would come from).
    fn forward_listeners(
        &self,
        decl: &IngressDecl,
        pod: &PodDecl,
    ) -> Result<Vec<(u16, Scheme, Forward)>> {
        let netns = self.mesh.node_netns(&pod.node)?;
        let ip = self.mesh.pod_ip(&pod.key())?;
        decl.ports()
            .into_iter()
            .map(|(port, scheme)| {
                let target = SocketAddr::from((ip, port));
                let name = format!("{}:{port}", decl.key());
                let forward = Forward::start(&name, &netns, target, preferred_local_port(port))
                    .with_context(|| format!("forward listener port {port} of {}", decl.key()))?;
                Ok((port, scheme, forward))
            })
            .collect()
    }

    /// Makes the certificates of the TLS Secrets the YAML asks `up` for (the CA made once)
    /// and writes them as Secrets into the mesh's config directory.
    fn write_certificates(&mut self) -> Result<()> {
        if self.config.certificates.is_empty() {
            if self.ingress_ca.is_some() {
                self.mesh.remove_yaml(CERTIFICATES_FILE)?;
            }
            return Ok(());
        }
        let ca = match self.ingress_ca.take() {
            Some(ca) => ca,
            None => {
                let dir = self.mesh.work_dir().join("ingress-certificates");
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("create {}", dir.display()))?;
                e2e::tls::TestCa::new(&dir, "local-mesh-ingress")?
            }
        };
        let yaml = certificate_secrets(&ca, &self.config.certificates);
        self.ingress_ca = Some(ca);
        self.mesh.write_yaml(CERTIFICATES_FILE, &yaml?)
    }

    /// The CA certificate (PEM file) of the certificates `up` made, if it made any.
    pub fn ingress_ca(&self) -> Option<&Path> {
        self.ingress_ca.as_ref().map(|ca| ca.cert.as_path())
    }

    /// The ingress gateways, in pod order.
    pub fn ingresses(&self) -> &[IngressRun] {
        &self.ingresses
    }

    /// The local forwards to each node's dashboard, in node order.
    pub fn forwards(&self) -> &[Forward] {
        &self.forwards
    }

    /// The waypoint processes, in pod order.
    pub fn waypoints(&self) -> &[WaypointRun] {
        &self.waypoints
    }

    pub fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    pub fn config(&self) -> &LocalMesh {
        &self.config
    }

    pub fn config_source(&self) -> Option<&Path> {
        self.config_source.as_deref()
    }

    /// Pods running `mesh-echo`, with the name its output files carry in the log
    /// directory (`<label>.out`, `<label>.err`).
    pub fn echo_servers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.echoes.iter().map(|(pod, g)| (pod.as_str(), g.label()))
    }

    /// Sends every probe, one after the other; `stop` is asked between probes so that a
    /// Ctrl-C does not wait for the rest.
    pub fn exercise(&self, stop: &dyn Fn() -> bool) -> Result<Report> {
        let mut probes = Vec::new();
        let mut index = 0;
        for pod in &self.config.pods {
            for probe in &pod.probes {
                if stop() {
                    bail!("stopped by a signal before every probe was sent");
                }
                index += 1;
                probes.push(
                    self.probe(pod, probe, index)
                        .with_context(|| format!("{} -> {}", pod.key(), probe.text))?,
                );
            }
        }
        for ingress in &self.ingresses {
            for probe in &ingress.gateway.probes {
                if stop() {
                    bail!("stopped by a signal before every probe was sent");
                }
                index += 1;
                probes.push(
                    self.ingress_probe(ingress, probe, index)
                        .with_context(|| format!("{OUTSIDE} -> {}", probe.text))?,
                );
            }
        }
        let mut opened = BTreeMap::new();
        for (node, samples) in self.snapshot()? {
            let mut by_reporter: BTreeMap<String, u64> = BTreeMap::new();
            for sample in samples.iter().filter(|s| s.name == OPENED) {
                let reporter = sample.labels.get("reporter").cloned().unwrap_or_default();
                *by_reporter.entry(reporter).or_default() += count(sample.value);
            }
            opened.insert(node, by_reporter);
        }
        let ca = self.ca_report()?;
        Ok(Report { probes, opened, ca })
    }

    /// What the CA issued and refused, and where each agent's certificates come from.
    fn ca_report(&self) -> Result<CaReport> {
        let mut report = CaReport::default();
        for node in &self.config.nodes {
            let dump: serde_json::Value =
                serde_json::from_str(&self.mesh.admin(node, "/config_dump")?)
                    .with_context(|| format!("parse the /config_dump of {node}"))?;
            if !dump["config"]["ca_dir"].is_null() {
                report.agents_with_ca_dir.push(node.clone());
            }
            if dump["config"]["ca_address"].is_string() {
                report.agents_with_ca_address.push(node.clone());
            }
        }
        if self.mesh.ca_mode() != e2e::CaMode::Service {
            return Ok(report);
        }
        report.address = Some(self.mesh.ca_address());
        report.netns = self.mesh.control_netns();
        report.issued = issuances(&self.mesh.control_dump()?);
        for sample in prom::parse(&self.mesh.control_metrics()?)
            .into_iter()
            .filter(|s| s.name == CA_REFUSED)
        {
            let reason = sample.labels.get("reason").cloned().unwrap_or_default();
            *report.refused.entry(reason).or_default() += count(sample.value);
        }
        Ok(report)
    }

    fn probe(&self, pod: &PodDecl, probe: &Probe, index: usize) -> Result<ProbeReport> {
        let client = pod.key();
        let addr = self.resolve(&probe.target)?;
        let sent = Sent {
            client: client.clone(),
            client_in_mesh: self.in_mesh(pod),
            target: probe.text.clone(),
            addr,
            expect: probe.expect,
        };
        // The marker goes in the path: a pod's probe is any path on the target.
        self.observe(sent, index, &|marker| match self.mesh.http_get(
            &client,
            SocketAddr::V4(addr),
            &format!("/{marker}"),
        ) {
            Ok(reply) => Response::Http {
                status: reply.status,
                server: reply
                    .json()
                    .ok()
                    .and_then(|body| body["server"].as_str().map(str::to_owned)),
            },
            Err(e) => Response::Failed(e.root_cause().to_string()),
        })
    }

    /// An ingress probe: `curl` from this machine to the listener's forward, the URL's host
    /// resolved to it (Host header and SNI as written), the CA of `up`'s certificates
    /// trusted over HTTPS (or, for a certificate from the YAML, not checked).
    fn ingress_probe(
        &self,
        ingress: &IngressRun,
        probe: &IngressProbe,
        index: usize,
    ) -> Result<ProbeReport> {
        let local = ingress
            .local(probe.port)
            .with_context(|| format!("no forward to listener port {}", probe.port))?;
        let SocketAddr::V4(addr) = local else {
            bail!("the forward listens on {local}, not IPv4");
        };
        let sent = Sent {
            client: OUTSIDE.to_owned(),
            client_in_mesh: false,
            target: probe.text.clone(),
            addr,
            expect: probe.expect,
        };
        // The path is the route's to match: the marker goes in a header.
        self.observe(sent, index, &|marker| {
            let argv = curl_argv(probe, local, self.ingress_ca(), Some(marker));
            curl(&argv)
        })
    }

    /// Sends `REQUESTS_PER_PROBE` requests with `send` (given each request's marker; the
    /// first failure ends the probe) and reports what the agents, the gateways and the wire
    /// saw of them.
    fn observe(
        &self,
        sent: Sent,
        index: usize,
        send: &dyn Fn(&str) -> Response,
    ) -> Result<ProbeReport> {
        let Sent {
            client,
            client_in_mesh,
            target,
            addr,
            expect,
        } = sent;
        let before = self.snapshot()?;
        let waypoints_before = self.waypoint_snapshot()?;
        let log_marks: BTreeMap<String, usize> = self
            .config
            .nodes
            .iter()
            .map(|n| (n.clone(), self.mesh.ztunnel_log(n).len()))
            .collect();
        let capture = self.mesh.capture_wire()?;

        // A marker in every request: if it shows up in the capture, the request crossed the
        // wire in clear.
        let marker = format!("local-mesh-probe-{index}-");
        let mut responses = Vec::new();
        for i in 0..REQUESTS_PER_PROBE {
            let response = send(&format!("{marker}{i}"));
            let failed = matches!(response, Response::Failed(_));
            responses.push(response);
            if failed {
                break;
            }
        }

        let answered = responses
            .iter()
            .filter(|r| matches!(r, Response::Http { .. }))
            .count() as u64;
        let failed = responses.len() as u64 - answered;
        let after = eventually("the node agents to count the probe", METRICS_SETTLE, || {
            let after = self.snapshot()?;
            let opened = deltas(&before, &after, OPENED);
            let refused = deltas(&before, &after, REFUSED);
            let counted_opened: u64 = opened
                .iter()
                .filter(|(_, labels, _)| {
                    labels.get("reporter").map(String::as_str) == Some("destination")
                })
                .map(|(_, _, n)| n)
                .sum();
            let counted_refused: u64 = refused.iter().map(|(_, _, n)| n).sum();
            // A waypoint answers requests itself (a 403) and pools its upstream
            // connections: its request count accounts for answers too.
            let through_waypoints: u64 =
                deltas(&waypoints_before, &self.waypoint_snapshot()?, REQUESTS)
                    .iter()
                    .map(|(_, _, n)| n)
                    .sum();
            if counted_opened + through_waypoints >= answered
                && (failed == 0 || counted_refused > 0)
            {
                Ok(after)
            } else {
                bail!(
                    "opened {counted_opened} + {through_waypoints} through waypoints of \
                     {answered}, refused {counted_refused}"
                )
            }
        });
        // No agent seeing the traffic is a fact to report, not an error.
        let after = match after {
            Ok(after) => after,
            Err(_) => self.snapshot()?,
        };
        let summary = capture.stop()?;
        let waypoints_after = self.waypoint_snapshot()?;
        let mut waypoint_requests: BTreeMap<(String, String, String, String, String), u64> =
            BTreeMap::new();
        for (waypoint, labels, n) in deltas(&waypoints_before, &waypoints_after, REQUESTS) {
            let label = |k: &str| labels.get(k).cloned().unwrap_or_else(|| "unknown".into());
            *waypoint_requests
                .entry((
                    waypoint,
                    label("source_principal"),
                    label("destination_service"),
                    label("response_code"),
                    label("response_flags"),
                ))
                .or_default() += n;
        }
        let waypoint_requests = waypoint_requests
            .into_iter()
            .map(
                |(
                    (
                        waypoint,
                        source_principal,
                        destination_service,
                        response_code,
                        response_flags,
                    ),
                    count,
                )| {
                    WaypointRequests {
                        waypoint,
                        source_principal,
                        destination_service,
                        response_code,
                        response_flags,
                        count,
                    }
                },
            )
            .collect();

        let mut flows: BTreeMap<(String, String, String, String, String), u64> = BTreeMap::new();
        for (node, labels, n) in deltas(&before, &after, OPENED) {
            let label = |k: &str| labels.get(k).cloned().unwrap_or_else(|| "unknown".into());
            *flows
                .entry((
                    node,
                    label("reporter"),
                    label("source_principal"),
                    label("destination_principal"),
                    label("connection_security_policy"),
                ))
                .or_default() += n;
        }
        let flows = flows
            .into_iter()
            .map(
                |((node, reporter, source_principal, destination_principal, security), count)| {
                    Flow {
                        node,
                        reporter,
                        source_principal,
                        destination_principal,
                        security,
                        count,
                    }
                },
            )
            .collect();
        let mut refusals: BTreeMap<(String, String, String), u64> = BTreeMap::new();
        for (node, labels, n) in deltas(&before, &after, REFUSED) {
            let label = |k: &str| labels.get(k).cloned().unwrap_or_default();
            *refusals
                .entry((node, label("reporter"), label("reason")))
                .or_default() += n;
        }
        let refusals: Vec<Refusal> = refusals
            .into_iter()
            .map(|((node, reporter, reason), count)| Refusal {
                node,
                reporter,
                reason,
                count,
            })
            .collect();

        let mut access_log = Vec::new();
        for (node, mark) in &log_marks {
            let log = self.mesh.ztunnel_log(node);
            let new = log.get(*mark..).unwrap_or_default();
            for line in new.lines().filter(|l| l.contains(ACCESS_LOG_MARK)) {
                let line = strip_ansi(line);
                if refusals
                    .iter()
                    .any(|r| &r.node == node && line.contains(&r.reason))
                {
                    access_log.push((node.clone(), access_fields(&line)));
                }
            }
        }

        let clear_bytes = summary
            .packets
            .iter()
            .filter(|p| {
                p.proto == Proto::Tcp && p.src.port() != HBONE_PORT && p.dst.port() != HBONE_PORT
            })
            .map(|p| p.payload_len)
            .sum();
        let wire = Wire {
            packets: summary.packets.len(),
            server_ports: summary.tcp_server_ports(),
            clear_bytes,
            request_in_clear: summary.contains(marker.as_bytes())
                || summary.contains(b"\"server\":"),
        };

        Ok(ProbeReport {
            client,
            client_in_mesh,
            target,
            addr,
            expect,
            responses,
            flows,
            refusals,
            access_log,
            waypoint_requests,
            wire,
        })
    }

    fn resolve(&self, target: &Target) -> Result<SocketAddrV4> {
        Ok(match target {
            Target::Service { addr, .. } | Target::Addr(addr) => *addr,
            Target::Pod { key, port } => SocketAddrV4::new(self.mesh.pod_ip(key)?, *port),
        })
    }

    /// Whether the pod is enrolled: its namespace is ambient and the pod does not opt out,
    /// or the pod opts in itself.
    pub fn in_mesh(&self, pod: &PodDecl) -> bool {
        match pod
            .labels
            .get("istio.io/dataplane-mode")
            .map(String::as_str)
        {
            Some("ambient") => true,
            Some(_) => false,
            None => self
                .config
                .namespaces
                .iter()
                .any(|n| n.name == pod.namespace && n.ambient()),
        }
    }

    /// Per gateway process, waypoint or ingress (`<gateway> in <pod>`), the samples of
    /// `istio_requests_total`.
    fn waypoint_snapshot(&self) -> Result<Snapshot> {
        let mut out = Snapshot::new();
        let proxies = self
            .waypoints
            .iter()
            .map(|w| (format!("waypoint {}", w.gateway.key()), &w.proxy))
            .chain(
                self.ingresses
                    .iter()
                    .map(|i| (format!("ingress {}", i.gateway.key()), &i.proxy)),
            );
        for (key, proxy) in proxies {
            let text = self
                .mesh
                .waypoint_metrics(&proxy.pod)
                .with_context(|| format!("metrics of gateway {key}"))?;
            out.entry(format!("{key} in {}", proxy.pod))
                .or_default()
                .extend(
                    prom::parse(&text)
                        .into_iter()
                        .filter(|s| s.name == REQUESTS),
                );
        }
        Ok(out)
    }

    fn snapshot(&self) -> Result<Snapshot> {
        self.config
            .nodes
            .iter()
            .map(|node| {
                let text = self.mesh.metrics(node)?;
                let samples = prom::parse(&text)
                    .into_iter()
                    .filter(|s| s.name == OPENED || s.name == REFUSED)
                    .collect();
                Ok((node.clone(), samples))
            })
            .collect()
    }

    /// Applies label changes (only when labels are all that changed in the topology) to the
    /// running mesh, e.g. `istio.io/dataplane-mode` on a namespace: the harness rewrites its
    /// topology file, which the agents reload. Returns what changed.
    fn relabel(&mut self, fresh: &LocalMesh) -> Result<Vec<String>> {
        if self.config.same_topology(fresh)
            || self.config.without_labels() != fresh.without_labels()
        {
            return Ok(Vec::new());
        }
        let mut changed = Vec::new();
        for (old, new) in self.config.namespaces.iter().zip(&fresh.namespaces) {
            if old.labels != new.labels {
                self.mesh
                    .set_labels(Labelled::Namespace(&new.name), new.labels.clone())?;
                changed.push(format!("namespace {}", new.name));
            }
        }
        for (old, new) in self.config.pods.iter().zip(&fresh.pods) {
            if old.labels != new.labels {
                self.mesh
                    .set_labels(Labelled::Pod(&new.key()), new.labels.clone())?;
                changed.push(format!("pod {}", new.key()));
            }
        }
        for (old, new) in self.config.services.iter().zip(&fresh.services) {
            if old.labels != new.labels {
                let key = format!("{}/{}", new.namespace, new.name);
                self.mesh
                    .set_labels(Labelled::Service(&key), new.labels.clone())?;
                changed.push(format!("service {key}"));
            }
        }
        self.config.namespaces = fresh.namespaces.clone();
        self.config.pods = fresh.pods.clone();
        self.config.services = fresh.services.clone();
        Ok(changed)
    }

    /// Re-reads the YAML directory and writes changed pass-through documents (policies) into
    /// the running mesh's config directory, where the agents pick them up. Topology changes
    /// cannot apply to a running mesh; they are reported. Returns what it did, for the user
    /// (nothing when the directory is as last read).
    pub fn reapply(&mut self) -> Result<Vec<String>> {
        let Some(source) = self.config_source.clone() else {
            return Ok(Vec::new());
        };
        let fresh = LocalMesh::load(&source)?;
        if self.last_read.as_ref().unwrap_or(&self.config) == &fresh {
            return Ok(Vec::new());
        }
        let mut changed = Vec::new();
        for (file, content) in &fresh.passthrough {
            let old = self.config.passthrough.iter().find(|(f, _)| f == file);
            if old.map(|(_, c)| c) != Some(content) {
                self.mesh.write_yaml(file, content)?;
                changed.push(format!("wrote {file}"));
            }
        }
        for (file, _) in &self.config.passthrough {
            if !fresh.passthrough.iter().any(|(f, _)| f == file) {
                self.mesh.remove_yaml(file)?;
                changed.push(format!("removed {file}"));
            }
        }
        let mut messages = Vec::new();
        if !changed.is_empty() {
            messages.push(format!(
                "{}: re-applied ({}); the agents reload within 1 s",
                source.display(),
                changed.join(", ")
            ));
        }
        let relabelled = self.relabel(&fresh)?;
        if !relabelled.is_empty() {
            messages.push(format!(
                "{}: relabelled {}; the agents reload within 1 s",
                source.display(),
                relabelled.join(", ")
            ));
        }
        let topology_changed = !self.config.same_topology(&fresh);
        let was_reported = self
            .last_read
            .as_ref()
            .is_some_and(|last| last.same_topology(&fresh));
        if topology_changed && !was_reported {
            messages.push(format!(
                "{}: namespaces, pods or services changed; they apply to a new mesh only \
                 (`cargo xtask down && cargo xtask up`)",
                source.display()
            ));
        }
        if fresh.certificates != self.config.certificates {
            self.config.certificates = fresh.certificates.clone();
            self.write_certificates()?;
            changed.push(format!("made the certificates of {CERTIFICATES_FILE}"));
        }
        self.config.passthrough = fresh.passthrough.clone();
        self.last_read = Some(fresh);
        Ok(messages)
    }
}

/// What a probe sends, and to where.
struct Sent {
    client: String,
    client_in_mesh: bool,
    target: String,
    addr: SocketAddrV4,
    expect: Option<Expect>,
}

/// The TLS Secrets of `decls`, each with a new certificate from `ca`, as YAML.
fn certificate_secrets(ca: &e2e::tls::TestCa, decls: &[CertificateDecl]) -> Result<String> {
    let mut out = format!(
        "# Made by `cargo xtask up` for the Secrets annotated {} (CA: {}).\n",
        super::config::ANNOTATION_GENERATE_CERTIFICATE,
        ca.cert.display()
    );
    for decl in decls {
        let hosts: Vec<&str> = decl.hosts.iter().map(String::as_str).collect();
        let leaf = ca.issue(&hosts, false).with_context(|| {
            format!("a certificate for Secret {}/{}", decl.namespace, decl.name)
        })?;
        let read = |path: &Path| {
            std::fs::read_to_string(path).with_context(|| format!("read {}", path.display()))
        };
        let secret = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": decl.name, "namespace": decl.namespace},
            "type": mesh_model::model::TLS_SECRET_TYPE,
            "stringData": {"tls.crt": read(&leaf.cert)?, "tls.key": read(&leaf.key)?},
        });
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&secret).context("render a Secret")?);
    }
    Ok(out)
}

/// The `curl` command line of an ingress probe sent to `local` (the listener's forward):
/// the URL with the forward's port, its host resolved to the forward, `-H` per header (and
/// the marker's), `--cacert` with `up`'s CA over HTTPS (`--insecure` without one). It
/// prints the body, then the status on a line of its own.
pub fn curl_argv(
    probe: &IngressProbe,
    local: SocketAddr,
    ca: Option<&Path>,
    marker: Option<&str>,
) -> Vec<String> {
    let port = local.port();
    let mut argv: Vec<String> = vec!["curl".into(), "-sS".into()];
    argv.extend([
        "--resolve".into(),
        format!("{}:{port}:{}", probe.host, local.ip()),
    ]);
    if probe.scheme == Scheme::Https {
        match ca {
            Some(ca) => argv.extend(["--cacert".into(), ca.display().to_string()]),
            None => argv.push("--insecure".into()),
        }
    }
    for (name, value) in &probe.headers {
        argv.extend(["-H".into(), format!("{name}: {value}")]);
    }
    if let Some(marker) = marker {
        argv.extend(["-H".into(), format!("{MARKER_HEADER}: {marker}")]);
        argv.extend([
            "--max-time".into(),
            CURL_TIMEOUT_SECS.into(),
            "-w".into(),
            "\n%{http_code}".into(),
        ]);
    }
    argv.push(format!(
        "{}://{}:{port}{}",
        probe.scheme.as_str(),
        probe.host,
        probe.path
    ));
    argv
}

/// Runs an ingress probe's `curl`: its status and the echo server named in the body, or why
/// no HTTP answer came.
fn curl(argv: &[String]) -> Response {
    let Some((program, args)) = argv.split_first() else {
        return Response::Failed("no command".into());
    };
    match std::process::Command::new(program).args(args).output() {
        Ok(output) => curl_response(
            output.status.success(),
            &String::from_utf8_lossy(&output.stdout),
            &String::from_utf8_lossy(&output.stderr),
        ),
        Err(e) => Response::Failed(format!("run {program}: {e}")),
    }
}

/// What `curl` printed (see [`curl_argv`]), as a response.
fn curl_response(success: bool, stdout: &str, stderr: &str) -> Response {
    if !success {
        return Response::Failed(stderr.trim().trim_start_matches("curl: ").to_owned());
    }
    let (body, status) = stdout.rsplit_once('\n').unwrap_or(("", stdout));
    match status.trim().parse::<u16>() {
        Ok(status) if status != 0 => Response::Http {
            status,
            server: serde_json::from_str::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["server"].as_str().map(str::to_owned)),
        },
        _ => Response::Failed(format!("no HTTP status in curl's output: {status:?}")),
    }
}

/// Positive changes of counter `name` between two snapshots: (node, labels, increase).
fn deltas(
    before: &Snapshot,
    after: &Snapshot,
    name: &str,
) -> Vec<(String, BTreeMap<String, String>, u64)> {
    let mut out = Vec::new();
    for (node, samples) in after {
        let old = before.get(node).map(Vec::as_slice).unwrap_or_default();
        for sample in samples.iter().filter(|s| s.name == name) {
            let was = old
                .iter()
                .find(|o| o.name == name && o.labels == sample.labels)
                .map_or(0, |o| count(o.value));
            let now = count(sample.value);
            if now > was {
                out.push((node.clone(), sample.labels.clone(), now - was));
            }
        }
    }
    out
}

/// A counter's value as a count (counters are whole numbers, exposed as floats).
fn count(value: f64) -> u64 {
    if value.is_finite() && value > 0.0 {
        value.round() as u64
    } else {
        0
    }
}

/// The interesting `key=value` fields of a text access-log line, or the line itself when it
/// has none of them (another log format).
fn access_fields(line: &str) -> String {
    let fields: Vec<String> = ACCESS_LOG_FIELDS
        .iter()
        .filter_map(|key| {
            let needle = format!(" {key}=");
            let start = line.find(&needle)? + needle.len();
            let rest = &line[start..];
            let value = match rest.strip_prefix('"') {
                // Quoted values escape their quotes; find the closing one.
                Some(quoted) => {
                    let mut close = None;
                    let mut escaped = false;
                    for (i, c) in quoted.char_indices() {
                        match c {
                            '\\' if !escaped => escaped = true,
                            '"' if !escaped => {
                                close = Some(i);
                                break;
                            }
                            _ => escaped = false,
                        }
                    }
                    // Opening quote, the value, closing quote; all of it if unterminated.
                    close.map_or(rest, |i| &rest[..i + 2])
                }
                None => rest.split_whitespace().next().unwrap_or_default(),
            };
            Some(format!("{key}={value}"))
        })
        .collect();
    if fields.is_empty() {
        line.trim().to_owned()
    } else {
        fields.join(" ")
    }
}

/// Removes terminal colour sequences (`ESC [ … m`), which log files may carry.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local_mesh::report;

    fn sample(name: &str, labels: &[(&str, &str)], value: f64) -> Sample {
        Sample {
            name: name.to_owned(),
            labels: labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            value,
        }
    }

    #[test]
    fn an_ingress_probe_is_a_curl_to_the_forward_with_the_host_resolved_to_it() {
        let probe = IngressProbe {
            text: String::new(),
            scheme: Scheme::Https,
            host: "bookinfo.example".into(),
            port: 443,
            path: "/p?q=1".into(),
            headers: vec![("end-user".into(), "jason".into())],
            expect: None,
        };
        let local: SocketAddr = "127.0.0.1:8443".parse().expect("addr");
        let ca = Path::new("/w/ca.pem");
        assert_eq!(
            curl_argv(&probe, local, Some(ca), Some("m-1")).join(" "),
            "curl -sS --resolve bookinfo.example:8443:127.0.0.1 --cacert /w/ca.pem \
             -H end-user: jason -H x-local-mesh-probe: m-1 --max-time 5 -w \n%{http_code} \
             https://bookinfo.example:8443/p?q=1"
        );
        // What `up` prints to paste: no marker, and without a CA of its own, not checked.
        assert_eq!(
            curl_argv(&probe, local, None, None).join(" "),
            "curl -sS --resolve bookinfo.example:8443:127.0.0.1 --insecure -H end-user: jason \
             https://bookinfo.example:8443/p?q=1"
        );
        let http = IngressProbe {
            scheme: Scheme::Http,
            ..probe
        };
        assert!(!curl_argv(&http, local, Some(ca), None).contains(&"--cacert".to_owned()));

        assert_eq!(
            curl_response(true, "{\"server\":\"echo-v2\"}\n200", ""),
            Response::Http {
                status: 200,
                server: Some("echo-v2".into())
            }
        );
        assert_eq!(
            curl_response(true, "route not found\n404", ""),
            Response::Http {
                status: 404,
                server: None
            }
        );
        assert_eq!(
            curl_response(false, "", "curl: (7) Failed to connect\n"),
            Response::Failed("(7) Failed to connect".into())
        );
        assert!(matches!(
            curl_response(true, "\n000", ""),
            Response::Failed(_)
        ));
    }

    #[test]
    fn deltas_count_only_increases_and_new_label_sets() {
        let before = Snapshot::from([(
            "n2".to_owned(),
            vec![
                sample(REFUSED, &[("reason", "DENY")], 2.0),
                sample(REFUSED, &[("reason", "TLS")], 1.0),
            ],
        )]);
        let after = Snapshot::from([(
            "n2".to_owned(),
            vec![
                sample(REFUSED, &[("reason", "DENY")], 3.0),
                sample(REFUSED, &[("reason", "TLS")], 1.0),
                sample(REFUSED, &[("reason", "PEERAUTHN")], 1.0),
                sample(OPENED, &[("reporter", "destination")], 5.0),
            ],
        )]);
        let got: Vec<(String, u64)> = deltas(&before, &after, REFUSED)
            .into_iter()
            .map(|(_, labels, n)| (labels["reason"].clone(), n))
            .collect();
        assert_eq!(got, [("DENY".to_owned(), 1), ("PEERAUTHN".to_owned(), 1)]);
    }

    #[test]
    fn access_log_lines_are_cut_to_the_fields_that_explain_a_refusal() {
        let line = r#"2026-01-01T00:00:00Z  INFO access: connection complete direction="inbound" src.addr=10.244.1.3:1 src.identity="spiffe://cluster.local/ns/demo/sa/other" dst.workload="demo/echo-v1" flags="DENY" reason="denied by \"demo/allow\"" bytes_sent=0"#;
        assert_eq!(
            access_fields(line),
            r#"direction="inbound" src.identity="spiffe://cluster.local/ns/demo/sa/other" dst.workload="demo/echo-v1" flags="DENY" reason="denied by \"demo/allow\"""#
        );
        assert_eq!(
            access_fields(r#" {"flags":"DENY"} "#),
            r#"{"flags":"DENY"}"#
        );
        assert_eq!(access_fields("x flags=DENY"), "flags=DENY");
        assert_eq!(
            access_fields(r#"x reason="unterminated"#),
            r#"reason="unterminated"#
        );
    }

    #[test]
    fn colour_codes_are_stripped_from_log_lines() {
        assert_eq!(
            strip_ansi("\u{1b}[32m INFO\u{1b}[0m \u{1b}[2maccess\u{1b}[0m: flags=DENY"),
            " INFO access: flags=DENY"
        );
    }

    fn probe<'a>(report: &'a Report, client: &str, target: &str) -> &'a ProbeReport {
        report
            .probes
            .iter()
            .find(|p| p.client == client && p.target == target)
            .unwrap_or_else(|| panic!("no probe {client} -> {target}: {report:#?}"))
    }

    const SLEEP: &str = "spiffe://cluster.local/ns/demo/sa/sleep";
    const OTHER: &str = "spiffe://cluster.local/ns/demo/sa/other";
    const ECHO: &str = "spiffe://cluster.local/ns/demo/sa/echo";
    const WAYPOINT: &str = "spiffe://cluster.local/ns/demo/sa/waypoint";

    /// What `cargo xtask up --once` does with the sample, minus the state file and signals:
    /// the facts the README promises must hold.
    #[test]
    fn the_sample_mesh_serves_the_vip_over_hbone_and_refuses_what_its_policies_refuse() -> Result<()>
    {
        let dir = crate::workspace_root().join("examples/local-mesh");
        let config = LocalMesh::load(&dir)?;
        let bin_dir = e2e::Binaries::locate().dir().to_path_buf();
        let running = Running::start(config, &bin_dir, Some(dir))?;
        let report = running.exercise(&|| false)?;
        let text = report::render(&report);
        println!("{text}");
        let whereabouts = report::whereabouts(&running, None);
        println!("{whereabouts}");

        // Each node's dashboard is named, and its forward reaches the node's agent.
        assert_eq!(running.forwards().len(), running.config().nodes.len());
        for f in running.forwards() {
            assert!(whereabouts.contains(&f.dashboard_url()), "{whereabouts}");
            let mut s = std::net::TcpStream::connect(f.local)?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let stats = e2e::http::request(&mut s, "GET", &f.local.to_string(), "/stats", b"")?;
            assert_eq!(stats.status, 200);
            assert_eq!(stats.json()?["node"], f.name.as_str());
        }
        assert!(whereabouts.contains("127.0.0.1:15020/dashboard"));

        // Certificates came from the CA process, each identity to the agent of its pod's node
        // (the waypoint's to itself); no agent holds a signing key.
        let ca = &report.ca;
        assert_eq!(ca.address.as_deref(), Some("https://10.255.0.253:15012"));
        assert!(ca.agents_with_ca_dir.is_empty(), "{ca:#?}");
        assert_eq!(ca.agents_with_ca_address, running.config().nodes);
        let issued = |caller: &str, identity: &str, grant: &str| {
            ca.issued
                .iter()
                .any(|i| i.caller == caller && i.identity == identity && i.grant == grant)
        };
        assert!(issued("istio-system/ztunnel @n1", SLEEP, "node"), "{ca:#?}");
        assert!(issued("demo/waypoint", WAYPOINT, "own"), "{ca:#?}");
        assert!(text.contains("Certificates issued by the CA"), "{text}");
        assert!(whereabouts.contains("control.log"), "{whereabouts}");

        // The waypoint of `demo` runs in its own pod, with its own identity.
        let waypoints = running.waypoints();
        assert_eq!(waypoints.len(), 1);
        assert_eq!(waypoints[0].gateway.key(), "demo/waypoint");
        assert_eq!(waypoints[0].proxy.identity(), WAYPOINT);
        let waypoint_ip = running.mesh().pod_ip("demo/waypoint")?;
        assert!(
            whereabouts.lines().any(|l| l.contains("demo/waypoint")
                && l.contains(&waypoint_ip.to_string())
                && l.contains("used by demo/echo")),
            "{whereabouts}"
        );
        assert!(whereabouts.contains(&format!("identity {WAYPOINT}")));

        // demo/sleep -> echo.demo:80: through the waypoint (sleep's identity to the
        // waypoint's), which answers from both replicas in turn, calling them under its own
        // identity; nothing readable on the wire.
        let sleep = probe(&report, "demo/sleep", "echo.demo:80");
        assert_eq!(sleep.met(), Some(true), "{sleep:#?}");
        let servers: BTreeSet<&str> = sleep
            .responses
            .iter()
            .filter_map(|r| match r {
                Response::Http { server, .. } => server.as_deref(),
                Response::Failed(_) => None,
            })
            .collect();
        assert_eq!(servers, BTreeSet::from(["echo-v1", "echo-v2"]));
        assert!(
            sleep.flows.iter().any(|f| f.node == "n1"
                && f.reporter == "source"
                && f.source_principal == SLEEP
                && f.destination_principal == WAYPOINT
                && f.security == "mutual_tls"
                && f.count == REQUESTS_PER_PROBE as u64),
            "sleep's agent sends every connection to the waypoint: {:#?}",
            sleep.flows
        );
        // The waypoint pools its upstream connections: at most one per request.
        let upstream: u64 = sleep
            .flows
            .iter()
            .filter(|f| {
                f.node == "n2"
                    && f.reporter == "destination"
                    && f.source_principal == WAYPOINT
                    && f.destination_principal == ECHO
                    && f.security == "mutual_tls"
            })
            .map(|f| f.count)
            .sum();
        assert!(
            (1..=REQUESTS_PER_PROBE as u64).contains(&upstream),
            "{:#?}",
            sleep.flows
        );
        assert!(
            !sleep
                .flows
                .iter()
                .any(|f| f.node == "n2" && f.source_principal == SLEEP),
            "the echo pods never see sleep itself: {:#?}",
            sleep.flows
        );
        assert_eq!(
            sleep
                .waypoint_requests
                .iter()
                .filter(|w| w.response_code == "200" && w.source_principal == SLEEP)
                .map(|w| w.count)
                .sum::<u64>(),
            REQUESTS_PER_PROBE as u64,
            "{:#?}",
            sleep.waypoint_requests
        );
        assert!(sleep.wire.only_hbone(), "{:?}", sleep.wire);
        assert!(text.contains(
            "wire carried only TCP to 15008 (TLS); 0 bytes of application data in clear"
        ));

        // demo/sleep -> echo-v1's IP: around the waypoint, refused by the pod's agent (its
        // L4 policy admits only the waypoint).
        let direct = probe(&report, "demo/sleep", "demo/echo-v1:8080");
        assert_eq!(direct.met(), Some(true), "{direct:#?}");
        assert!(
            direct
                .refusals
                .iter()
                .any(|r| r.node == "n2" && r.reason == "DENY"),
            "{:#?}",
            direct.refusals
        );

        // legacy/curl -> echo-v1's IP: plaintext from outside the mesh, refused by STRICT.
        let curl = probe(&report, "legacy/curl", "demo/echo-v1:8080");
        assert_eq!(curl.met(), Some(true), "{curl:#?}");
        assert!(
            curl.refusals
                .iter()
                .any(|r| r.node == "n2" && r.reason == "PEERAUTHN"),
            "{:#?}",
            curl.refusals
        );
        assert!(text.contains("mesh_connections_refused_total{reason=\"PEERAUTHN\"}"));

        // demo/other: in the mesh, but not the identity the waypoint's L7 policy allows: 403
        // from the waypoint, nothing reaches the echo pods.
        let other = probe(&report, "demo/other", "echo.demo:80");
        assert_eq!(other.met(), Some(true), "{other:#?}");
        assert!(
            other
                .waypoint_requests
                .iter()
                .any(|w| w.response_code == "403"
                    && w.response_flags == "DENY"
                    && w.source_principal == OTHER
                    && w.count == REQUESTS_PER_PROBE as u64),
            "{:#?}",
            other.waypoint_requests
        );
        assert!(
            !other.flows.iter().any(|f| f.node == "n2"),
            "denied at the waypoint, before any upstream: {:#?}",
            other.flows
        );
        assert!(text.contains("istio_requests_total{response_code=\"403\"}"));

        // From this machine, outside the mesh, through the ingress gateway's forwarded
        // listeners: routed by the HTTPRoute, through the waypoint (whose policy admits the
        // gateway's identity only), over HBONE to the pods.
        const INGRESS: &str = "spiffe://cluster.local/ns/istio-ingress/sa/ingress";
        let through_ingress = |target: &str| {
            report
                .probes
                .iter()
                .find(|p| p.client == OUTSIDE && p.target == target)
                .unwrap_or_else(|| panic!("no probe to {target}: {report:#?}"))
        };
        for target in [
            "http://bookinfo.example/",
            "https://bookinfo.example/ end-user:jason",
            "http://unknown.example/",
        ] {
            let probe = through_ingress(target);
            assert_eq!(probe.met(), Some(true), "{probe:#?}");
        }
        let jason = through_ingress("https://bookinfo.example/ end-user:jason");
        assert!(
            jason.responses.iter().all(|r| matches!(r,
                Response::Http { status: 200, server: Some(s) } if s == "echo-v2")),
            "the header's rule: v2 only: {jason:#?}"
        );
        let at_waypoint = |probe: &ProbeReport, code: &str| -> u64 {
            probe
                .waypoint_requests
                .iter()
                .filter(|w| {
                    w.waypoint.starts_with("waypoint demo/waypoint")
                        && w.source_principal == INGRESS
                        && w.response_code == code
                })
                .map(|w| w.count)
                .sum()
        };
        assert_eq!(
            at_waypoint(jason, "200"),
            REQUESTS_PER_PROBE as u64,
            "{jason:#?}"
        );
        let weighted = through_ingress("http://bookinfo.example/");
        assert_eq!(
            at_waypoint(weighted, "200"),
            REQUESTS_PER_PROBE as u64,
            "{weighted:#?}"
        );
        let unknown = through_ingress("http://unknown.example/");
        assert!(
            unknown
                .waypoint_requests
                .iter()
                .all(|w| w.waypoint.starts_with("ingress ") && w.response_flags == "NR"),
            "answered 404 by the gateway itself: {unknown:#?}"
        );
        // sleep, allowed to call echo, is not the identity the per-version Services admit.
        let versions = probe(&report, "demo/sleep", "echo-v1.demo:80");
        assert_eq!(versions.met(), Some(true), "{versions:#?}");
        assert!(
            whereabouts.contains("--cacert") && whereabouts.contains("listener https HTTPS :443"),
            "{whereabouts}"
        );
        assert!(issued("istio-ingress/ingress", INGRESS, "own"), "{ca:#?}");

        let n1 = report.opened.get("n1").and_then(|r| r.get("source"));
        assert!(
            n1.is_some_and(|&n| n >= REQUESTS_PER_PROBE as u64),
            "{report:#?}"
        );
        Ok(())
    }

    /// Labelling `legacy` ambient in the source directory of a running mesh enrolls its pod
    /// live: `reapply` rewrites the harness topology and n1's agent picks `legacy/curl` up.
    #[test]
    fn a_namespace_label_edited_in_the_source_enrolls_its_pods_live() -> Result<()> {
        let sample = crate::workspace_root().join("examples/local-mesh");
        let dir = tempfile::tempdir()?;
        for (name, content) in super::super::config::read_yaml_dir(&sample)? {
            std::fs::write(dir.path().join(name), content)?;
        }
        let config = LocalMesh::load(dir.path())?;
        let bin_dir = e2e::Binaries::locate().dir().to_path_buf();
        let mut running = Running::start(config, &bin_dir, Some(dir.path().to_path_buf()))?;
        let enrolled = |running: &Running| -> Result<bool> {
            let dump: serde_json::Value =
                serde_json::from_str(&running.mesh().admin("n1", "/config_dump")?)?;
            Ok(dump["workloads"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|w| w["pod"] == "legacy/curl" && w["state"] == "enrolled"))
        };
        assert!(!enrolled(&running)?, "legacy/curl starts outside the mesh");
        assert!(running.reapply()?.is_empty(), "nothing changed yet");

        let namespaces = dir.path().join("namespaces.yaml");
        let text = std::fs::read_to_string(&namespaces)?;
        let labelled = text.replacen(
            "  name: legacy\n",
            "  name: legacy\n  labels:\n    istio.io/dataplane-mode: ambient\n",
            1,
        );
        assert_ne!(
            text, labelled,
            "the sample declares namespace legacy without labels"
        );
        std::fs::write(&namespaces, labelled)?;
        let messages = running.reapply()?;
        assert!(
            messages
                .iter()
                .any(|m| m.contains("relabelled namespace legacy")),
            "{messages:?}"
        );
        assert!(
            !messages
                .iter()
                .any(|m| m.contains("apply to a new mesh only")),
            "{messages:?}"
        );
        e2e::wait_until("legacy/curl enrolled", Duration::from_secs(10), || {
            enrolled(&running)
        })?;
        Ok(())
    }
}
