//! The local mesh's input: a directory of Kubernetes YAML, translated once into the topology
//! the e2e harness builds, the traffic to send, and the documents handed to the node agents
//! unchanged. The YAML is read once, by the agents' own translator
//! (`mesh_model::k8s::load_docs_with_sources`: its checks, its size limit, its file order);
//! the declarations come from the typed model, in the order the objects are written. Only
//! [`LocalMesh::load`] reads files; the translation works on strings, so it is unit-tested.
//!
//! - `Namespace` → a harness namespace (ambient when labelled `istio.io/dataplane-mode:
//!   ambient`), with its labels;
//! - `Pod` → a harness pod on `spec.nodeName` (nodes are created from these names), with its
//!   labels and `spec.serviceAccountName`; any `status` is ignored (the harness assigns IPs);
//! - `Service` → a harness service (`clusterIP`, numeric `targetPort`s, selector, labels);
//! - `ServiceAccount` → dropped: the harness declares one for every pod's account;
//! - `Gateway` of class `istio-waypoint` → a waypoint: passed through (the agents steer to
//!   it), and every pod of its namespace labelled `gateway.networking.k8s.io/gateway-name:
//!   <gateway>` runs the `waypoint` process (identity: the pod's service account);
//! - `Gateway` of class `istio` → an ingress gateway: passed through, run like a waypoint by
//!   the pods labelled with its name, its listeners forwarded to `127.0.0.1` on this machine
//!   (see [`IngressDecl`]);
//! - `Secret` of type `kubernetes.io/tls` annotated `local-mesh/generate-certificate: "<host>,
//!   …"` → a certificate for those hosts made by `up` (from a CA of its own) in place of the
//!   document (see [`CertificateDecl`]);
//! - anything else (policies, …) → passed through unchanged, one output file per input file.
//!
//! Two annotations on Pods drive the local mesh:
//! - `local-mesh/run: echo` runs `mesh-echo` on the pod's container ports (8080 if none); a
//!   pod labelled `app: echo` gets it too unless annotated `local-mesh/run: none`;
//! - `local-mesh/send-to: "echo.demo:80=200, demo/echo-v1:8080=refused"` makes the pod send
//!   HTTP requests to each target once the mesh is up. A target is `<service>[.<namespace>
//!   [.svc[.cluster.local]]]:<port>` (a Service port, sent to its clusterIP), `<namespace>/
//!   <pod>:<port>` (the pod's IP) or `<ipv4>:<port>`; `=200` (any status) or `=refused`
//!   states what should happen, which `up --once` checks.
//!
//! The same `local-mesh/send-to` on an ingress `Gateway` sends requests from this machine,
//! outside the mesh, to its listeners: `"http://bookinfo.example/=200, https://bookinfo.example/
//! end-user:jason=200"` (a URL whose port, 80/443 by default, is a listener's, then request
//! headers as `name:value`; see [`IngressProbe`]).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use e2e::{Ambient, MeshBuilder, Pod, Service};
use mesh_model::k8s::{ConfigError, SourceObject};
use mesh_model::model::{Labels, NamespacedName, TargetPort, WaypointFor};
use serde_yaml::Value;

/// Annotation choosing what runs in a pod (`echo` or `none`).
pub const ANNOTATION_RUN: &str = "local-mesh/run";
/// Annotation listing the requests a pod (or, from outside, an ingress Gateway) gets sent
/// once the mesh is up.
pub const ANNOTATION_SEND_TO: &str = "local-mesh/send-to";
/// On a `kubernetes.io/tls` Secret: the host names `up` makes its certificate for.
pub const ANNOTATION_GENERATE_CERTIFICATE: &str = "local-mesh/generate-certificate";
/// The label that enrolls a namespace in the mesh.
const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";
/// On a pod: the Gateway (waypoint) it runs.
const GATEWAY_NAME_LABEL: &str = mesh_model::model::GATEWAY_NAME_LABEL;
/// The port `mesh-echo` listens on when an echo pod declares no container port.
const DEFAULT_ECHO_PORT: u16 = 8080;
/// The file the harness writes the topology to; an input file of that name is renamed.
const HARNESS_TOPOLOGY_FILE: &str = "topology.yaml";

/// Everything `cargo xtask up` needs from the YAML directory.
#[derive(Clone, Debug, PartialEq)]
pub struct LocalMesh {
    /// Node names, sorted (so `n1` is node 1 and owns 10.244.1.0/24).
    pub nodes: Vec<String>,
    /// Declared namespaces in file order, then namespaces only pods mention.
    pub namespaces: Vec<NamespaceDecl>,
    /// Pods in file order.
    pub pods: Vec<PodDecl>,
    /// Services in file order.
    pub services: Vec<ServiceDecl>,
    /// Waypoint Gateways (class `istio-waypoint`) in file order.
    pub waypoints: Vec<WaypointDecl>,
    /// Ingress Gateways (class `istio`) in file order.
    pub ingresses: Vec<IngressDecl>,
    /// TLS Secrets whose certificate `up` makes, in file order (not in `passthrough`).
    pub certificates: Vec<CertificateDecl>,
    /// Documents for the node agents as they are: (file name, multi-document YAML).
    pub passthrough: Vec<(String, String)>,
}

/// A namespace to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NamespaceDecl {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// False when no Namespace document declares it (pods in it still run, outside the mesh
    /// unless they carry the ambient label themselves).
    pub declared: bool,
}

impl NamespaceDecl {
    /// Whether its pods are enrolled.
    pub fn ambient(&self) -> bool {
        self.labels.get(DATAPLANE_MODE).map(String::as_str) == Some("ambient")
    }
}

/// A pod to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodDecl {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub service_account: String,
    pub labels: BTreeMap<String, String>,
    /// Ports `mesh-echo` listens on; empty when the pod runs nothing.
    pub echo_ports: Vec<u16>,
    /// The Gateway (in the pod's namespace; a waypoint or an ingress gateway) whose proxy
    /// this pod runs, if any.
    pub gateway: Option<String>,
    /// Requests it sends once the mesh is up.
    pub probes: Vec<Probe>,
}

impl PodDecl {
    /// `namespace/name`, as the harness names pods.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A Service to declare.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceDecl {
    pub namespace: String,
    pub name: String,
    pub vip: Option<Ipv4Addr>,
    pub ports: Vec<ServicePortDecl>,
    pub selector: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
}

/// A waypoint: a `Gateway` of class `istio-waypoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointDecl {
    pub namespace: String,
    pub name: String,
    /// `istio.io/waypoint-for` (`service` when absent).
    pub waypoint_for: String,
}

impl WaypointDecl {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// An ingress gateway: a `Gateway` of class `istio`, run by the pods labelled with its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressDecl {
    pub namespace: String,
    pub name: String,
    /// Its HTTP and HTTPS listeners (the ones `up` forwards), in order.
    pub listeners: Vec<ListenerDecl>,
    /// Requests sent to it from this machine once the mesh is up.
    pub probes: Vec<IngressProbe>,
}

impl IngressDecl {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Its listener ports, each once, in listener order.
    pub fn ports(&self) -> Vec<(u16, Scheme)> {
        let mut out: Vec<(u16, Scheme)> = Vec::new();
        for l in &self.listeners {
            if !out.iter().any(|(p, _)| *p == l.port) {
                out.push((l.port, l.scheme));
            }
        }
        out
    }
}

/// An HTTP or HTTPS listener of an ingress gateway.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerDecl {
    pub name: String,
    pub port: u16,
    pub scheme: Scheme,
    pub hostname: Option<String>,
}

/// How a client speaks to a listener (the model's redirect scheme: `http` or `https`).
pub use mesh_model::model::Scheme;

/// One `local-mesh/send-to` entry of an ingress Gateway: a request from outside the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IngressProbe {
    /// The entry as written, without the expectation.
    pub text: String,
    pub scheme: Scheme,
    /// The URL's host (lower case): the `Host` header and, over HTTPS, the SNI.
    pub host: String,
    /// The listener port it is for.
    pub port: u16,
    /// Path and query, from `/`.
    pub path: String,
    /// Extra request headers, in order.
    pub headers: Vec<(String, String)>,
    pub expect: Option<Expect>,
}

/// A `kubernetes.io/tls` Secret whose certificate and key `up` makes (for `hosts`, signed by
/// a CA of its own whose certificate it writes to its work directory), so that no key has
/// to be kept in the YAML.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificateDecl {
    pub namespace: String,
    pub name: String,
    pub hosts: Vec<String>,
}

/// One Service port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortDecl {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
}

/// One `local-mesh/send-to` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// The entry as written, without the expectation (`echo.demo:80`).
    pub text: String,
    pub target: Target,
    pub expect: Option<Expect>,
}

/// Where a probe goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A Service port, resolved to its clusterIP.
    Service {
        namespace: String,
        name: String,
        addr: SocketAddrV4,
    },
    /// A pod (`namespace/name`); its IP is known once the mesh is built.
    Pod { key: String, port: u16 },
    /// A literal address.
    Addr(SocketAddrV4),
}

/// What a probe should see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// Every request answered with this HTTP status.
    Status(u16),
    /// No HTTP answer: the connection is refused, reset or closed.
    Refused,
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Status(code) => write!(f, "{code}"),
            Expect::Refused => f.write_str("refused"),
        }
    }
}

// === impl LocalMesh ===

impl LocalMesh {
    /// Reads every `*.yaml`/`*.yml` file of `dir` (not dot-files, not subdirectories), in
    /// name order.
    pub fn load(dir: &Path) -> Result<Self> {
        Self::from_files(&read_yaml_dir(dir)?)
            .with_context(|| format!("local mesh config {}", dir.display()))
    }

    /// Translates (file name, content) pairs, read in file-name order by the agents'
    /// translator (`mesh_model::k8s`): what it refuses, the local mesh refuses too.
    pub fn from_files(files: &[(String, String)]) -> Result<Self> {
        let (model, objects) =
            mesh_model::k8s::load_docs_with_sources(files).map_err(config_error)?;
        let mut namespaces: Vec<NamespaceDecl> = Vec::new();
        let mut raw_pods: Vec<(String, RawPod)> = Vec::new();
        let mut services: Vec<ServiceDecl> = Vec::new();
        let mut waypoints: Vec<WaypointDecl> = Vec::new();
        let mut ingresses: Vec<IngressDecl> = Vec::new();
        let mut certificates: Vec<CertificateDecl> = Vec::new();
        // Objects for the agents as they are, grouped by file (objects come in file order).
        let mut kept: Vec<(&str, Vec<&Value>)> = Vec::new();

        for object in &objects {
            let at = format!("{} doc {}", object.file, object.doc);
            // Only the kinds the translator read carry a key: a `Pod` of another API group
            // is passed through like any other object.
            let translated = object.key.as_ref().map(|key| (object.kind.as_str(), key));
            match translated {
                Some(("Namespace", key)) => {
                    let ns = model
                        .namespace(&key.name)
                        .with_context(|| missing(&at, key))?;
                    namespaces.push(NamespaceDecl {
                        name: ns.name.clone(),
                        labels: ns.labels.clone().into(),
                        declared: true,
                    });
                }
                Some(("Pod", key)) => {
                    let pod = model.pods.get(key).with_context(|| missing(&at, key))?;
                    raw_pods.push((at.clone(), raw_pod(pod).with_context(|| at.clone())?));
                }
                Some(("Service", key)) => {
                    let svc = model.services.get(key).with_context(|| missing(&at, key))?;
                    services.push(service(svc).with_context(|| at.clone())?);
                }
                // The harness declares every pod's service account; a second declaration
                // would be a duplicate object for the agents.
                Some(("ServiceAccount", _)) => {}
                Some(("Gateway", key)) => {
                    let gw = model.gateways.get(key).with_context(|| missing(&at, key))?;
                    if gw.is_waypoint() {
                        waypoints.push(WaypointDecl {
                            namespace: gw.namespace.clone(),
                            name: gw.name.clone(),
                            waypoint_for: waypoint_for_name(gw.waypoint_for).to_owned(),
                        });
                    } else if gw.is_ingress() {
                        ingresses.push(ingress(gw, &object.value).with_context(|| at.clone())?);
                    }
                    keep(&mut kept, object);
                }
                Some(("Secret", key)) => match certificate_request(&object.value) {
                    Some(hosts) => certificates.push(CertificateDecl {
                        namespace: key.namespace.clone(),
                        name: key.name.clone(),
                        hosts: hosts.with_context(|| format!("{at}: Secret {key}"))?,
                    }),
                    None => keep(&mut kept, object),
                },
                _ => keep(&mut kept, object),
            }
        }
        let passthrough = kept
            .into_iter()
            .map(|(file, docs)| Ok((passthrough_name(file), render_documents(file, &docs)?)))
            .collect::<Result<Vec<_>>>()?;

        let keys: BTreeSet<String> = raw_pods.iter().map(|(_, pod)| pod.key()).collect();
        for (_, pod) in &raw_pods {
            if !namespaces.iter().any(|n| n.name == pod.namespace) {
                namespaces.push(NamespaceDecl {
                    name: pod.namespace.clone(),
                    labels: BTreeMap::new(),
                    declared: false,
                });
            }
        }
        let mut pods = Vec::new();
        for (at, pod) in raw_pods {
            let gateway = pod
                .gateway_name
                .clone()
                .filter(|gw| {
                    let ours = |ns: &str, name: &str| ns == pod.namespace && name == gw;
                    waypoints.iter().any(|w| ours(&w.namespace, &w.name))
                        || ingresses.iter().any(|i| ours(&i.namespace, &i.name))
                })
                .filter(|_| pod.run.as_deref() != Some("none"));
            if gateway.is_some() && pod.run.as_deref() == Some("echo") {
                bail!(
                    "{at}: Pod {}: runs gateway {} (label {GATEWAY_NAME_LABEL}); it cannot also \
                     run echo",
                    pod.key(),
                    gateway.as_deref().unwrap_or_default()
                );
            }
            let probes = parse_probes(&pod, &keys, &services).with_context(|| {
                format!("{at}: Pod {}: annotation {ANNOTATION_SEND_TO}", pod.key())
            })?;
            pods.push(PodDecl {
                namespace: pod.namespace,
                name: pod.name,
                node: pod.node,
                service_account: pod.service_account,
                labels: pod.labels,
                echo_ports: if gateway.is_some() {
                    Vec::new()
                } else {
                    pod.echo_ports
                },
                gateway,
                probes,
            });
        }
        let nodes: BTreeSet<String> = pods.iter().map(|p| p.node.clone()).collect();
        if nodes.is_empty() {
            bail!("no Pods: the local mesh creates its nodes from the pods' spec.nodeName");
        }
        Ok(LocalMesh {
            nodes: nodes.into_iter().collect(),
            namespaces,
            pods,
            services,
            waypoints,
            ingresses,
            certificates,
            passthrough,
        })
    }

    /// The harness declaration of this mesh (topology and pass-through documents).
    pub fn builder(&self, name: &str) -> MeshBuilder {
        let mut builder = e2e::Mesh::builder(name);
        for node in &self.nodes {
            builder = builder.node(node);
        }
        for ns in &self.namespaces {
            let ambient = if ns.ambient() {
                Ambient::Yes
            } else {
                Ambient::No
            };
            builder = builder
                .namespace(&ns.name, ambient)
                .namespace_labels(&ns.name, ns.labels.clone());
        }
        for pod in &self.pods {
            builder = builder.pod(
                Pod::new(&pod.namespace, &pod.name)
                    .on(&pod.node)
                    .service_account(&pod.service_account)
                    .labels(pod.labels.clone()),
            );
        }
        for svc in &self.services {
            let mut service = Service::new(&svc.namespace, &svc.name)
                .selector(svc.selector.clone())
                .labels(svc.labels.clone());
            if let Some(vip) = svc.vip {
                service = service.vip(&vip.to_string());
            }
            for port in &svc.ports {
                service = service.named_port(&port.name, port.port, port.target_port);
            }
            builder = builder.service(service);
        }
        for (file, content) in &self.passthrough {
            builder = builder.yaml(file, content);
        }
        builder
    }

    /// Whether `other` differs only in the pass-through documents (which can be re-applied
    /// to a running mesh; anything else needs a new one).
    pub fn same_topology(&self, other: &LocalMesh) -> bool {
        self.nodes == other.nodes
            && self.namespaces == other.namespaces
            && self.pods == other.pods
            && self.services == other.services
            && self.waypoints == other.waypoints
            && self.ingresses == other.ingresses
    }

    /// The same topology with every namespace, pod and service label removed: two meshes that
    /// are equal this way differ only in labels, which a running mesh can take.
    pub fn without_labels(&self) -> LocalMesh {
        let mut bare = self.clone();
        bare.passthrough.clear();
        bare.namespaces.iter_mut().for_each(|n| n.labels.clear());
        bare.pods.iter_mut().for_each(|p| p.labels.clear());
        bare.services.iter_mut().for_each(|s| s.labels.clear());
        bare
    }

    /// Services whose traffic goes through waypoint `wp`: labelled `istio.io/use-waypoint`
    /// (or in a namespace so labelled, the most specific label deciding), when `wp` takes
    /// Service traffic. Same rule as the agents' (`mesh_model::model::use_waypoint`).
    pub fn services_using(&self, wp: &WaypointDecl) -> Vec<String> {
        if !matches!(wp.waypoint_for.as_str(), "service" | "all") {
            return Vec::new();
        }
        let key = mesh_model::model::NamespacedName::new(&wp.namespace, &wp.name);
        self.services
            .iter()
            .filter(|svc| {
                let ns_labels = self
                    .namespaces
                    .iter()
                    .find(|n| n.name == svc.namespace)
                    .map(|n| Labels::from_iter(n.labels.clone()));
                let own = Labels::from_iter(svc.labels.clone());
                mesh_model::model::use_waypoint(&own, &svc.namespace, ns_labels.as_ref()).as_ref()
                    == Some(&key)
            })
            .map(|svc| format!("{}/{}", svc.namespace, svc.name))
            .collect()
    }

    /// Number of probes over all pods and ingress gateways.
    pub fn probe_count(&self) -> usize {
        self.pods.iter().map(|p| p.probes.len()).sum::<usize>()
            + self.ingresses.iter().map(|i| i.probes.len()).sum::<usize>()
    }

    /// The ingress Gateway `namespace/name`.
    pub fn ingress(&self, namespace: &str, name: &str) -> Option<&IngressDecl> {
        self.ingresses
            .iter()
            .find(|i| i.namespace == namespace && i.name == name)
    }

    /// The waypoint Gateway `namespace/name`.
    pub fn waypoint(&self, namespace: &str, name: &str) -> Option<&WaypointDecl> {
        self.waypoints
            .iter()
            .find(|w| w.namespace == namespace && w.name == name)
    }
}

/// The files of `dir` the local mesh reads, with their content: what the agents read
/// (`mesh_model::k8s::read_dir`, its size limit), and at least one.
pub fn read_yaml_dir(dir: &Path) -> Result<Vec<(String, String)>> {
    let files = mesh_model::k8s::read_dir(dir)?;
    if files.is_empty() {
        bail!("no .yaml files in {}", dir.display());
    }
    Ok(files)
}

// === documents ===

/// The translator's errors, with the local mesh's words for the two a user meets most.
fn config_error(e: ConfigError) -> anyhow::Error {
    match e {
        ConfigError::Yaml { file, doc, source } => {
            anyhow!("{file}: not valid YAML (doc {doc}): {source}")
        }
        ConfigError::Duplicate {
            file,
            doc,
            object,
            first_file,
            first_doc,
        } => anyhow!(
            "{file} doc {doc}: {object} declared twice (first in {first_file} doc {first_doc})"
        ),
        other => other.into(),
    }
}

/// The translator keys every object it keeps in the model, so a miss is a bug.
fn missing(at: &str, key: &NamespacedName) -> String {
    format!("{at}: {key:?} missing from the translated model")
}

/// Adds `object` to its file's group.
fn keep<'a>(kept: &mut Vec<(&'a str, Vec<&'a Value>)>, object: &'a SourceObject) {
    match kept.last_mut() {
        Some((file, docs)) if *file == object.file => docs.push(&object.value),
        _ => kept.push((&object.file, vec![&object.value])),
    }
}

fn passthrough_name(file: &str) -> String {
    if file == HARNESS_TOPOLOGY_FILE {
        format!("user-{file}")
    } else {
        file.to_owned()
    }
}

fn render_documents(file: &str, docs: &[&Value]) -> Result<String> {
    let mut out = format!(
        "# From {file}, as written (its Namespaces, Pods, Services and ServiceAccounts are in \
         {HARNESS_TOPOLOGY_FILE}).\n"
    );
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(doc).with_context(|| format!("render {file}"))?);
    }
    Ok(out)
}

// === objects ===

/// `istio.io/waypoint-for` as written.
fn waypoint_for_name(wf: WaypointFor) -> &'static str {
    match wf {
        WaypointFor::Service => "service",
        WaypointFor::Workload => "workload",
        WaypointFor::All => "all",
        WaypointFor::None => "none",
    }
}

/// A Pod before its annotations are resolved against the other objects.
struct RawPod {
    namespace: String,
    name: String,
    node: String,
    service_account: String,
    labels: BTreeMap<String, String>,
    echo_ports: Vec<u16>,
    send_to: Option<String>,
    /// `local-mesh/run`, as written.
    run: Option<String>,
    /// Label `gateway.networking.k8s.io/gateway-name`.
    gateway_name: Option<String>,
}

impl RawPod {
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

fn raw_pod(pod: &mesh_model::model::Pod) -> Result<RawPod> {
    let what = format!("Pod {}/{}", pod.namespace, pod.name);
    let node = pod.node_name.as_deref().with_context(|| {
        format!("{what}: spec.nodeName is required (it places the pod on a node, e.g. n1)")
    })?;
    let annotations = &pod.annotations;
    let runs_echo = match annotations.get(ANNOTATION_RUN).map(String::as_str) {
        Some("echo") => true,
        Some("none") => false,
        Some(other) => {
            bail!("{what}: annotation {ANNOTATION_RUN}: {other:?} is neither \"echo\" nor \"none\"")
        }
        None => pod.labels.get("app").map(String::as_str) == Some("echo"),
    };
    let mut echo_ports = Vec::new();
    if runs_echo {
        // The TCP container ports of all containers, deduplicated, in order.
        for port in &pod.container_ports {
            if !echo_ports.contains(&port.port) {
                echo_ports.push(port.port);
            }
        }
        if echo_ports.is_empty() {
            echo_ports.push(DEFAULT_ECHO_PORT);
        }
    }
    Ok(RawPod {
        namespace: pod.namespace.clone(),
        name: pod.name.clone(),
        node: node.to_owned(),
        service_account: pod.service_account.clone(),
        labels: pod.labels.clone().into(),
        echo_ports,
        send_to: annotations.get(ANNOTATION_SEND_TO).cloned(),
        run: annotations.get(ANNOTATION_RUN).cloned(),
        gateway_name: pod.labels.get(GATEWAY_NAME_LABEL).cloned(),
    })
}

fn service(svc: &mesh_model::model::Service) -> Result<ServiceDecl> {
    let what = format!("Service {}/{}", svc.namespace, svc.name);
    let vip = match svc.cluster_ips.first() {
        None => None,
        Some(IpAddr::V4(ip)) => Some(*ip),
        Some(ip) => bail!("{what}: spec.clusterIP {ip} is not an IPv4 address"),
    };
    let ports = svc
        .ports
        .iter()
        .map(|port| {
            let target_port = match &port.target_port {
                TargetPort::Number(n) => *n,
                TargetPort::Named(name) => bail!(
                    "{what}: port {}: named target ports ({name:?}) are not supported by the \
                     local mesh; use the container port number",
                    port.port
                ),
            };
            Ok(ServicePortDecl {
                name: port
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("port-{}", port.port)),
                port: port.port,
                target_port,
            })
        })
        .collect::<Result<_>>()?;
    Ok(ServiceDecl {
        namespace: svc.namespace.clone(),
        name: svc.name.clone(),
        vip,
        ports,
        selector: svc.selector.clone().unwrap_or_default().into(),
        labels: svc.labels.clone().into(),
    })
}

/// An ingress Gateway's forwardable listeners and its probes (annotation on the document).
fn ingress(gw: &mesh_model::model::Gateway, doc: &Value) -> Result<IngressDecl> {
    use mesh_model::model::ListenerProtocol;
    let listeners: Vec<ListenerDecl> = gw
        .listeners
        .iter()
        .filter_map(|l| {
            let scheme = match l.protocol {
                ListenerProtocol::Http => Scheme::Http,
                ListenerProtocol::Https => Scheme::Https,
                _ => return None,
            };
            Some(ListenerDecl {
                name: l.name.clone(),
                port: l.port,
                scheme,
                hostname: l.hostname.clone(),
            })
        })
        .collect();
    let mut decl = IngressDecl {
        namespace: gw.namespace.clone(),
        name: gw.name.clone(),
        listeners,
        probes: Vec::new(),
    };
    if let Some(list) = annotation(doc, ANNOTATION_SEND_TO) {
        decl.probes = list
            .split([',', '\n'])
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| parse_ingress_probe(entry, &decl))
            .collect::<Result<_>>()
            .with_context(|| format!("Gateway {}: annotation {ANNOTATION_SEND_TO}", decl.key()))?;
    }
    Ok(decl)
}

/// `Some(hosts)` for a `kubernetes.io/tls` Secret annotated
/// [`ANNOTATION_GENERATE_CERTIFICATE`] (an error when it also holds a certificate or names
/// no valid host), `None` for any other Secret.
fn certificate_request(doc: &Value) -> Option<Result<Vec<String>>> {
    let list = annotation(doc, ANNOTATION_GENERATE_CERTIFICATE)?;
    Some((|| {
        if doc["type"].as_str() != Some(mesh_model::model::TLS_SECRET_TYPE) {
            bail!(
                "annotation {ANNOTATION_GENERATE_CERTIFICATE} needs type: {}",
                mesh_model::model::TLS_SECRET_TYPE
            );
        }
        if !doc["data"].is_null() || !doc["stringData"].is_null() {
            bail!(
                "annotation {ANNOTATION_GENERATE_CERTIFICATE}: `up` makes the certificate; \
                 remove data/stringData (or the annotation)"
            );
        }
        let hosts: Vec<String> = list
            .split(',')
            .map(|h| h.trim().to_ascii_lowercase())
            .filter(|h| !h.is_empty())
            .collect();
        if hosts.is_empty() {
            bail!("annotation {ANNOTATION_GENERATE_CERTIFICATE}: no host name");
        }
        for host in &hosts {
            let bare = host.strip_prefix("*.").unwrap_or(host);
            let valid = !bare.is_empty()
                && bare.split('.').all(|label| {
                    !label.is_empty()
                        && label.len() <= 63
                        && label
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                        && !label.starts_with('-')
                        && !label.ends_with('-')
                });
            if !valid {
                bail!("annotation {ANNOTATION_GENERATE_CERTIFICATE}: {host:?} is not a host name");
            }
        }
        Ok(hosts)
    })())
}

/// `metadata.annotations[name]` of a document, when it is a string.
fn annotation<'a>(doc: &'a Value, name: &str) -> Option<&'a str> {
    doc["metadata"]["annotations"][name].as_str()
}

/// `<scheme>://<host>[:<port>][/<path>] [<header>:<value> …][=<expect>]`.
fn parse_ingress_probe(entry: &str, gw: &IngressDecl) -> Result<IngressProbe> {
    let (text, expect) = match entry.rsplit_once('=') {
        Some((text, expect)) if parse_expect(expect.trim()).is_ok() => {
            (text.trim(), Some(parse_expect(expect.trim())?))
        }
        _ => (entry, None),
    };
    let mut words = text.split_whitespace();
    let url = words.next().context("empty entry")?;
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else {
        bail!("{url:?}: expected an http:// or https:// URL");
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) => (
            host,
            port.parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .with_context(|| format!("{url:?}: {port:?} is not a port number"))?,
        ),
        None => (authority, scheme.default_port()),
    };
    if host.is_empty() {
        bail!("{url:?}: no host");
    }
    if !gw
        .listeners
        .iter()
        .any(|l| l.port == port && l.scheme == scheme)
    {
        bail!(
            "{url:?}: Gateway {} has no {} listener on port {port}",
            gw.key(),
            scheme.as_str().to_ascii_uppercase()
        );
    }
    let headers = words
        .map(|word| {
            let (name, value) = word
                .split_once(':')
                .filter(|(name, _)| !name.is_empty())
                .with_context(|| format!("{word:?}: expected a header as <name>:<value>"))?;
            Ok((name.to_ascii_lowercase(), value.to_owned()))
        })
        .collect::<Result<_>>()?;
    Ok(IngressProbe {
        text: text.to_owned(),
        scheme,
        host: host.to_ascii_lowercase(),
        port,
        path: path.to_owned(),
        headers,
        expect,
    })
}

// === probes ===

fn parse_probes(
    pod: &RawPod,
    pods: &BTreeSet<String>,
    services: &[ServiceDecl],
) -> Result<Vec<Probe>> {
    let Some(list) = &pod.send_to else {
        return Ok(Vec::new());
    };
    list.split([',', '\n'])
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| parse_probe(entry, &pod.namespace, pods, services))
        .collect()
}

fn parse_probe(
    entry: &str,
    client_namespace: &str,
    pods: &BTreeSet<String>,
    services: &[ServiceDecl],
) -> Result<Probe> {
    let (text, expect) = match entry.split_once('=') {
        None => (entry, None),
        Some((text, expect)) => (text.trim(), Some(parse_expect(expect.trim())?)),
    };
    let (host, port) = text
        .rsplit_once(':')
        .with_context(|| format!("{text:?}: expected <host>:<port>"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|&p| p != 0)
        .with_context(|| format!("{text:?}: {port:?} is not a port number"))?;
    let target = if let Ok(ip) = host.parse::<Ipv4Addr>() {
        Target::Addr(SocketAddrV4::new(ip, port))
    } else if let Some((namespace, name)) = host.split_once('/') {
        let key = format!("{namespace}/{name}");
        if !pods.contains(&key) {
            bail!("{text:?}: no Pod {key}");
        }
        Target::Pod { key, port }
    } else {
        let short = host
            .strip_suffix(".svc.cluster.local")
            .or_else(|| host.strip_suffix(".svc"))
            .unwrap_or(host);
        // Like cluster DNS: a bare name is a Service in the client's own namespace.
        let (name, namespace) = short.split_once('.').unwrap_or((short, client_namespace));
        let svc = services
            .iter()
            .find(|s| s.name == name && s.namespace == namespace)
            .with_context(|| format!("{text:?}: no Service {namespace}/{name}"))?;
        let vip = svc
            .vip
            .with_context(|| format!("{text:?}: Service {namespace}/{name} has no clusterIP"))?;
        if !svc.ports.iter().any(|p| p.port == port) {
            bail!("{text:?}: Service {namespace}/{name} has no port {port}");
        }
        Target::Service {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            addr: SocketAddrV4::new(vip, port),
        }
    };
    Ok(Probe {
        text: text.to_owned(),
        target,
        expect,
    })
}

fn parse_expect(text: &str) -> Result<Expect> {
    if text == "refused" {
        return Ok(Expect::Refused);
    }
    match text.parse::<u16>() {
        Ok(code) if (100..=599).contains(&code) => Ok(Expect::Status(code)),
        _ => bail!("expectation {text:?}: expected an HTTP status (e.g. 200) or \"refused\""),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(docs: &[(&str, &str)]) -> Vec<(String, String)> {
        docs.iter()
            .map(|(f, c)| ((*f).to_owned(), (*c).to_owned()))
            .collect()
    }

    const NAMESPACES: &str = "\
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
";

    const SERVICE: &str = "\
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  clusterIP: 10.96.0.20
  selector: {app: echo}
  ports:
  - {name: http, port: 80, targetPort: 8080}
";

    fn pod(namespace: &str, name: &str, extra: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n{extra}"
        )
    }

    #[test]
    fn the_sample_translates_to_two_nodes_and_its_probes() {
        let dir = crate::workspace_root().join("examples/local-mesh");
        let mesh = LocalMesh::load(&dir).expect("the sample loads");
        assert_eq!(mesh.nodes, ["n1", "n2"]);
        let ambient: Vec<(&str, bool)> = mesh
            .namespaces
            .iter()
            .map(|n| (n.name.as_str(), n.ambient()))
            .collect();
        assert_eq!(
            ambient,
            [("istio-ingress", false), ("demo", true), ("legacy", false)]
        );
        let echo: Vec<(String, &str, Vec<u16>)> = mesh
            .pods
            .iter()
            .filter(|p| !p.echo_ports.is_empty())
            .map(|p| (p.key(), p.node.as_str(), p.echo_ports.clone()))
            .collect();
        assert_eq!(
            echo,
            [
                ("demo/echo-v1".to_owned(), "n2", vec![8080]),
                ("demo/echo-v2".to_owned(), "n2", vec![8080]),
            ]
        );
        let sleep = mesh
            .pods
            .iter()
            .find(|p| p.key() == "demo/sleep")
            .expect("sleep");
        assert_eq!(
            (sleep.node.as_str(), sleep.service_account.as_str()),
            ("n1", "sleep")
        );
        let sleep_targets: Vec<(&str, Option<Expect>)> = sleep
            .probes
            .iter()
            .map(|p| (p.text.as_str(), p.expect))
            .collect();
        assert_eq!(
            sleep_targets,
            [
                ("echo.demo:80", Some(Expect::Status(200))),
                ("demo/echo-v1:8080", Some(Expect::Refused)),
                ("echo-v1.demo:80", Some(Expect::Status(403))),
            ]
        );
        assert_eq!(
            sleep.probes[..2],
            [
                Probe {
                    text: "echo.demo:80".into(),
                    target: Target::Service {
                        namespace: "demo".into(),
                        name: "echo".into(),
                        addr: "10.96.0.20:80".parse().expect("addr"),
                    },
                    expect: Some(Expect::Status(200)),
                },
                Probe {
                    text: "demo/echo-v1:8080".into(),
                    target: Target::Pod {
                        key: "demo/echo-v1".into(),
                        port: 8080,
                    },
                    expect: Some(Expect::Refused),
                },
            ]
        );
        let kinds: Vec<&str> = mesh
            .passthrough
            .iter()
            .flat_map(|(_, text)| text.lines())
            .filter_map(|l| l.strip_prefix("kind: "))
            .collect();
        assert_eq!(
            kinds,
            [
                "Gateway",
                "HTTPRoute",
                "PeerAuthentication",
                "AuthorizationPolicy",
                "AuthorizationPolicy",
                "AuthorizationPolicy",
                "Telemetry",
                "Gateway"
            ],
            "the generated Secret is not passed through"
        );
        assert_eq!(mesh.probe_count(), 8);

        // The ingress gateway: its two listeners, its probes from outside, its certificate.
        let ingress = mesh.ingress("istio-ingress", "ingress").expect("ingress");
        assert_eq!(ingress.ports(), [(80, Scheme::Http), (443, Scheme::Https)]);
        type Row<'a> = (&'a str, Scheme, u16, &'a [(String, String)], Option<Expect>);
        let probes: Vec<Row<'_>> = ingress
            .probes
            .iter()
            .map(|p| (p.host.as_str(), p.scheme, p.port, &p.headers[..], p.expect))
            .collect();
        let jason = [("end-user".to_owned(), "jason".to_owned())];
        assert_eq!(
            probes,
            [
                (
                    "bookinfo.example",
                    Scheme::Http,
                    80,
                    &[][..],
                    Some(Expect::Status(200))
                ),
                (
                    "bookinfo.example",
                    Scheme::Https,
                    443,
                    &jason[..],
                    Some(Expect::Status(200))
                ),
                (
                    "unknown.example",
                    Scheme::Http,
                    80,
                    &[][..],
                    Some(Expect::Status(404))
                ),
            ]
        );
        assert_eq!(
            mesh.certificates,
            [CertificateDecl {
                namespace: "istio-ingress".into(),
                name: "bookinfo-cert".into(),
                hosts: vec!["bookinfo.example".into()],
            }]
        );

        // The waypoint of `demo`, run in its own pod, and the Service that uses it.
        let waypoint = WaypointDecl {
            namespace: "demo".into(),
            name: "waypoint".into(),
            waypoint_for: "service".into(),
        };
        assert_eq!(mesh.waypoints, std::slice::from_ref(&waypoint));
        let runs: Vec<(String, &str, &str)> = mesh
            .pods
            .iter()
            .filter_map(|p| Some((p.key(), p.gateway.as_deref()?, p.service_account.as_str())))
            .collect();
        assert_eq!(
            runs,
            [
                ("istio-ingress/ingress".to_owned(), "ingress", "ingress"),
                ("demo/waypoint".to_owned(), "waypoint", "waypoint")
            ]
        );
        assert_eq!(
            mesh.services_using(&waypoint),
            ["demo/echo", "demo/echo-v1", "demo/echo-v2"]
        );
    }

    const INGRESS: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: ingress
  namespace: demo
  annotations:
    local-mesh/send-to: PROBES
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP}
  - {name: alt, port: 8000, protocol: HTTP, hostname: alt.example}
  - name: https
    port: 443
    protocol: HTTPS
    tls: {certificateRefs: [{name: cert}]}
";

    fn ingress_mesh(probes: &str, secret: &str) -> Result<LocalMesh> {
        let gw = INGRESS.replace("PROBES", &format!("{probes:?}"));
        let runner = pod(
            "demo",
            "ingress",
            "  labels: {gateway.networking.k8s.io/gateway-name: ingress}\nspec:\n  nodeName: n1\n",
        );
        LocalMesh::from_files(&files(&[
            ("a.yaml", NAMESPACES),
            ("b.yaml", &gw),
            ("c.yaml", &runner),
            ("d.yaml", secret),
        ]))
    }

    #[test]
    fn an_ingress_gateway_is_run_by_its_pod_and_probed_from_outside() {
        let mesh = ingress_mesh(
            "http://a.example/x?y=1 end-user:jason X-Two:a:b=503, https://b.example=refused, \
             http://alt.example:8000/",
            "",
        )
        .expect("loads");
        assert_eq!(mesh.pods[0].gateway.as_deref(), Some("ingress"));
        assert!(mesh.pods[0].echo_ports.is_empty());
        let gw = &mesh.ingresses[0];
        assert_eq!(
            gw.ports(),
            [
                (80, Scheme::Http),
                (8000, Scheme::Http),
                (443, Scheme::Https)
            ]
        );
        assert_eq!(
            gw.probes[0],
            IngressProbe {
                text: "http://a.example/x?y=1 end-user:jason X-Two:a:b".into(),
                scheme: Scheme::Http,
                host: "a.example".into(),
                port: 80,
                path: "/x?y=1".into(),
                headers: vec![
                    ("end-user".into(), "jason".into()),
                    ("x-two".into(), "a:b".into())
                ],
                expect: Some(Expect::Status(503)),
            }
        );
        assert_eq!(
            (
                gw.probes[1].port,
                gw.probes[1].path.as_str(),
                gw.probes[1].expect
            ),
            (443, "/", Some(Expect::Refused))
        );
        assert_eq!((gw.probes[2].port, gw.probes[2].expect), (8000, None));
        assert_eq!(mesh.probe_count(), 3);
    }

    #[test]
    fn bad_ingress_probes_say_why() {
        for (probes, needle) in [
            ("ftp://a.example/", "expected an http:// or https:// URL"),
            ("https://a.example:80/", "has no HTTPS listener on port 80"),
            ("http://a.example:9/", "has no HTTP listener on port 9"),
            ("http://a.example:x/", "is not a port number"),
            ("http:///", "no host"),
            (
                "http://a.example/ nocolon",
                "expected a header as <name>:<value>",
            ),
        ] {
            let e = ingress_mesh(probes, "").expect_err(probes);
            let text = format!("{e:#}");
            assert!(text.contains(needle), "{probes}: {text}");
            assert!(
                text.contains("Gateway demo/ingress: annotation local-mesh/send-to"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_tls_secret_can_ask_up_for_its_certificate() {
        let secret = |extra: &str| {
            format!(
                "apiVersion: v1\nkind: Secret\nmetadata:\n  name: cert\n  namespace: demo\n  \
                 annotations: {{local-mesh/generate-certificate: \"A.example, *.b.example\"}}\n\
                 {extra}"
            )
        };
        let mesh = ingress_mesh("", &secret("type: kubernetes.io/tls\n")).expect("loads");
        assert_eq!(
            mesh.certificates,
            [CertificateDecl {
                namespace: "demo".into(),
                name: "cert".into(),
                hosts: vec!["a.example".into(), "*.b.example".into()],
            }]
        );
        assert!(
            !mesh
                .passthrough
                .iter()
                .any(|(_, t)| t.contains("kind: Secret")),
            "made by `up`, not passed through"
        );
        for (extra, needle) in [
            ("type: Opaque\n", "needs type: kubernetes.io/tls"),
            (
                "type: kubernetes.io/tls\nstringData: {tls.crt: x}\n",
                "remove data/stringData",
            ),
        ] {
            let e = ingress_mesh("", &secret(extra)).expect_err(extra);
            assert!(format!("{e:#}").contains(needle), "{e:#}");
        }
        let bad = secret("type: kubernetes.io/tls\n").replace("*.b.example", "b..example");
        let e = ingress_mesh("", &bad).expect_err("bad host");
        assert!(
            format!("{e:#}").contains("\"b..example\" is not a host name"),
            "{e:#}"
        );
        // Without the annotation a Secret is the user's, passed through as written.
        let plain = "apiVersion: v1\nkind: Secret\nmetadata: {name: other, namespace: demo}\n";
        let mesh = ingress_mesh("", plain).expect("loads");
        assert!(mesh.certificates.is_empty());
        assert!(mesh
            .passthrough
            .iter()
            .any(|(_, t)| t.contains("kind: Secret")));
    }

    fn check_probe(entry: &str, expected: Result<(Target, Option<Expect>), &str>) {
        let sleep = pod(
            "demo",
            "sleep",
            &format!(
                "  annotations:\n    local-mesh/send-to: \"{entry}\"\nspec:\n  nodeName: n1\n"
            ),
        );
        let echo = pod("demo", "echo-v1", "spec:\n  nodeName: n2\n");
        let got = LocalMesh::from_files(&files(&[
            ("a.yaml", NAMESPACES),
            ("b.yaml", &sleep),
            ("c.yaml", &echo),
            ("d.yaml", SERVICE),
        ]));
        match (got, expected) {
            (Ok(mesh), Ok((target, expect))) => {
                let probe = &mesh.pods[0].probes[0];
                assert_eq!((&probe.target, probe.expect), (&target, expect), "{entry}");
            }
            (Err(e), Err(needle)) => {
                let text = format!("{e:#}");
                assert!(text.contains(needle), "{entry}: {text:?} lacks {needle:?}");
            }
            (got, want) => panic!("{entry}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn probe_targets_resolve_like_cluster_dns_and_bad_ones_say_why() {
        let service = Target::Service {
            namespace: "demo".into(),
            name: "echo".into(),
            addr: "10.96.0.20:80".parse().expect("addr"),
        };
        check_probe(
            "echo.demo:80=200",
            Ok((service.clone(), Some(Expect::Status(200)))),
        );
        check_probe("echo:80", Ok((service.clone(), None)));
        check_probe(
            "echo.demo.svc.cluster.local:80",
            Ok((service.clone(), None)),
        );
        check_probe(
            "demo/echo-v1:8080 = refused",
            Ok((
                Target::Pod {
                    key: "demo/echo-v1".into(),
                    port: 8080,
                },
                Some(Expect::Refused),
            )),
        );
        check_probe(
            "10.1.2.3:9=503",
            Ok((
                Target::Addr("10.1.2.3:9".parse().expect("addr")),
                Some(Expect::Status(503)),
            )),
        );
        check_probe("echo.demo:81", Err("has no port 81"));
        check_probe("echo.other:80", Err("no Service other/echo"));
        check_probe("demo/nope:8080", Err("no Pod demo/nope"));
        check_probe("echo.demo", Err("expected <host>:<port>"));
        check_probe("echo.demo:http", Err("not a port number"));
        check_probe("echo.demo:80=ok", Err("expected an HTTP status"));
    }

    fn check_error(docs: &[(&str, &str)], needle: &str) {
        let err = LocalMesh::from_files(&files(docs)).expect_err("must be refused");
        let text = format!("{err:#}");
        assert!(text.contains(needle), "{text:?} lacks {needle:?}");
    }

    #[test]
    fn bad_input_is_refused_naming_the_file_and_object() {
        check_error(&[("a.yaml", "key: [unclosed")], "a.yaml: not valid YAML");
        check_error(&[("a.yaml", NAMESPACES)], "no Pods");
        check_error(
            &[("a.yaml", &pod("demo", "x", "spec: {}\n"))],
            "a.yaml doc 1: Pod demo/x: spec.nodeName is required",
        );
        let twice = format!(
            "{}---\n{}",
            pod("demo", "x", "spec: {nodeName: n1}\n"),
            pod("demo", "x", "spec: {nodeName: n2}\n")
        );
        check_error(
            &[("a.yaml", &twice)],
            "a.yaml doc 2: Pod demo/x declared twice",
        );
        check_error(
            &[(
                "a.yaml",
                &pod(
                    "demo",
                    "x",
                    "  annotations: {local-mesh/run: nginx}\nspec: {nodeName: n1}\n",
                ),
            )],
            "neither \"echo\" nor \"none\"",
        );
        let named_target = SERVICE.replace("targetPort: 8080", "targetPort: http");
        check_error(
            &[("a.yaml", &named_target)],
            "named target ports (\"http\") are not supported",
        );
        let bad_vip = SERVICE.replace("10.96.0.20", "fd00::20");
        check_error(&[("a.yaml", &bad_vip)], "is not an IPv4 address");
    }

    #[test]
    fn echo_pods_listen_on_their_container_ports_or_8080() {
        let docs = [
            pod(
                "demo",
                "labelled",
                "  labels: {app: echo}\nspec:\n  nodeName: n1\n  containers:\n  - name: a\n    \
                 ports: [{containerPort: 9000}, {containerPort: 53, protocol: UDP}]\n  - name: b\n    \
                 ports: [{containerPort: 9001}, {containerPort: 9000}]\n",
            ),
            pod(
                "demo",
                "annotated",
                "  annotations: {local-mesh/run: echo}\nspec: {nodeName: n1}\n",
            ),
            pod(
                "demo",
                "opted-out",
                "  labels: {app: echo}\n  annotations: {local-mesh/run: none}\nspec: {nodeName: n1}\n",
            ),
            pod("demo", "plain", "spec: {nodeName: n1}\n"),
        ]
        .join("---\n");
        let mesh = LocalMesh::from_files(&files(&[("p.yaml", &docs)])).expect("valid");
        let ports: Vec<(&str, Vec<u16>)> = mesh
            .pods
            .iter()
            .map(|p| (p.name.as_str(), p.echo_ports.clone()))
            .collect();
        assert_eq!(
            ports,
            [
                ("labelled", vec![9000, 9001]),
                ("annotated", vec![8080]),
                ("opted-out", vec![]),
                ("plain", vec![]),
            ]
        );
        // No Namespace document: the namespace exists, outside the mesh.
        assert_eq!(
            mesh.namespaces,
            [NamespaceDecl {
                name: "demo".into(),
                labels: BTreeMap::new(),
                declared: false,
            }]
        );
    }

    #[test]
    fn pods_labelled_with_a_gateway_run_its_proxy_and_nothing_else() {
        let gateway = |name: &str, class: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {{name: {name}, \
                 namespace: demo, labels: {{istio.io/waypoint-for: all}}}}\nspec: {{gatewayClassName: {class}, \
                 listeners: [{{name: http, port: 80, protocol: HTTP}}]}}\n"
            )
        };
        let labelled = |pod_name: &str, gw: &str, extra: &str| {
            pod(
                "demo",
                pod_name,
                &format!(
                    "  labels: {{gateway.networking.k8s.io/gateway-name: {gw}, app: echo}}\n{extra}\
                     spec: {{nodeName: n1, serviceAccountName: wp-sa}}\n"
                ),
            )
        };
        let docs = [
            gateway("wp", "istio-waypoint"),
            gateway("ingress", "istio"),
            labelled("wp-1", "wp", ""),
            labelled("wp-2", "wp", "  annotations: {local-mesh/run: none}\n"),
            labelled("in-1", "ingress", ""),
            labelled("nogw-1", "missing", ""),
        ]
        .join("---\n");
        let mesh = LocalMesh::from_files(&files(&[("a.yaml", &docs)])).expect("valid");
        assert_eq!(
            mesh.waypoints,
            [WaypointDecl {
                namespace: "demo".into(),
                name: "wp".into(),
                waypoint_for: "all".into(),
            }]
        );
        let runs: Vec<(&str, Option<&str>, bool)> = mesh
            .pods
            .iter()
            .map(|p| {
                (
                    p.name.as_str(),
                    p.gateway.as_deref(),
                    p.echo_ports.is_empty(),
                )
            })
            .collect();
        assert_eq!(
            runs,
            [
                ("wp-1", Some("wp"), true),
                ("wp-2", None, true),
                ("in-1", Some("ingress"), true),
                ("nogw-1", None, false),
            ],
            "a waypoint's or an ingress gateway's pod runs no echo; `run: none` opts out; a \
             missing Gateway runs nothing"
        );
        let ingresses: Vec<String> = mesh.ingresses.iter().map(IngressDecl::key).collect();
        assert_eq!(ingresses, ["demo/ingress"]);
        // The Gateways go to the agents as they are.
        let passed: usize = mesh
            .passthrough
            .iter()
            .map(|(_, t)| t.matches("kind: Gateway").count())
            .sum();
        assert_eq!(passed, 2);
        check_error(
            &[(
                "a.yaml",
                &[
                    gateway("wp", "istio-waypoint"),
                    labelled("wp-1", "wp", "  annotations: {local-mesh/run: echo}\n"),
                ]
                .join("---\n"),
            )],
            "runs gateway wp (label gateway.networking.k8s.io/gateway-name); it cannot also run echo",
        );
    }

    #[test]
    fn everything_but_the_topology_is_passed_through_per_file() {
        let policy = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: demo}
spec: {mtls: {mode: STRICT}}
";
        let list = format!(
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: ServiceAccount\n  \
             metadata: {{name: sleep, namespace: demo}}\n- {}",
            policy.replace('\n', "\n  ")
        );
        // A second policy of its own name: the agents refuse one object defined twice.
        let mixed = format!(
            "{}---\n{}---\n",
            pod("demo", "a", "spec: {nodeName: n1}\n"),
            policy.replace("name: default", "name: strict")
        );
        let mesh = LocalMesh::from_files(&files(&[
            ("list.yaml", &list),
            ("topology.yaml", &mixed),
            (
                "pods-only.yaml",
                &pod("demo", "b", "spec: {nodeName: n2}\n"),
            ),
        ]))
        .expect("valid");
        let names: Vec<&str> = mesh.passthrough.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(names, ["list.yaml", "user-topology.yaml"]);
        for (file, text) in &mesh.passthrough {
            let (_, objects) =
                mesh_model::k8s::load_docs_with_sources(&[(file.clone(), text.clone())])
                    .expect("rendered YAML parses");
            let docs: Vec<&Value> = objects.iter().map(|o| &o.value).collect();
            assert_eq!(docs.len(), 1, "{file}: {text}");
            assert_eq!(docs[0]["kind"], Value::from("PeerAuthentication"), "{file}");
            assert_eq!(docs[0]["spec"]["mtls"]["mode"], Value::from("STRICT"));
        }
        assert_eq!(mesh.nodes, ["n1", "n2"]);
    }

    #[test]
    fn only_passthrough_edits_keep_the_topology() {
        let base = files(&[
            ("a.yaml", NAMESPACES),
            ("b.yaml", &pod("demo", "a", "spec: {nodeName: n1}\n")),
        ]);
        let mesh = LocalMesh::from_files(&base).expect("valid");
        let mut with_policy = base.clone();
        with_policy.push((
            "p.yaml".into(),
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x, namespace: demo}\nspec: {}\n".into(),
        ));
        let policy_added = LocalMesh::from_files(&with_policy).expect("valid");
        assert!(mesh.same_topology(&policy_added));
        assert_ne!(mesh, policy_added);
        let moved = LocalMesh::from_files(&files(&[
            ("a.yaml", NAMESPACES),
            ("b.yaml", &pod("demo", "a", "spec: {nodeName: n2}\n")),
        ]))
        .expect("valid");
        assert!(!mesh.same_topology(&moved));
    }
}
