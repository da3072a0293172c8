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
/// Annotation listing the requests a pod sends once the mesh is up.
pub const ANNOTATION_SEND_TO: &str = "local-mesh/send-to";
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
    /// The waypoint Gateway (in the pod's namespace) this pod runs, if any.
    pub waypoint: Option<String>,
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
                    }
                    keep(&mut kept, object);
                }
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
            let waypoint = pod
                .gateway_name
                .clone()
                .filter(|gw| {
                    waypoints
                        .iter()
                        .any(|w| w.namespace == pod.namespace && &w.name == gw)
                })
                .filter(|_| pod.run.as_deref() != Some("none"));
            if waypoint.is_some() && pod.run.as_deref() == Some("echo") {
                bail!(
                    "{at}: Pod {}: runs waypoint {} (label {GATEWAY_NAME_LABEL}); it cannot also \
                     run echo",
                    pod.key(),
                    waypoint.as_deref().unwrap_or_default()
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
                echo_ports: if waypoint.is_some() {
                    Vec::new()
                } else {
                    pod.echo_ports
                },
                waypoint,
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

    /// Number of probes over all pods.
    pub fn probe_count(&self) -> usize {
        self.pods.iter().map(|p| p.probes.len()).sum()
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
        assert_eq!(ambient, [("demo", true), ("legacy", false)]);
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
        assert_eq!(
            sleep.probes,
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
                "PeerAuthentication",
                "AuthorizationPolicy",
                "AuthorizationPolicy",
                "Telemetry",
                "Gateway"
            ]
        );
        assert_eq!(mesh.probe_count(), 4);

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
            .filter_map(|p| Some((p.key(), p.waypoint.as_deref()?, p.service_account.as_str())))
            .collect();
        assert_eq!(runs, [("demo/waypoint".to_owned(), "waypoint", "waypoint")]);
        assert_eq!(mesh.services_using(&waypoint), ["demo/echo"]);
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
    fn pods_labelled_with_a_waypoint_gateway_run_it_and_nothing_else() {
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
                    p.waypoint.as_deref(),
                    p.echo_ports.is_empty(),
                )
            })
            .collect();
        assert_eq!(
            runs,
            [
                ("wp-1", Some("wp"), true),
                ("wp-2", None, true),
                ("in-1", None, false),
                ("nogw-1", None, false),
            ],
            "a waypoint pod runs no echo; `run: none` opts out; other classes are no waypoints"
        );
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
            "runs waypoint wp (label gateway.networking.k8s.io/gateway-name); it cannot also run echo",
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
