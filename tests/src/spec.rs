//! What a test declares (nodes, namespaces, pods, services) and the address plan derived from
//! it. Pure: nothing here touches the system, so the plan is unit-tested.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::harness::Mesh;

/// Most nodes a mesh may have (node `i` owns 10.244.`i`.0/24 and 10.255.0.`i`).
const MAX_NODES: usize = 250;
/// Most pods per node: 10.244.i.2 ..= 10.244.i.254 (.1 is the node's side of every pod veth).
const MAX_PODS_PER_NODE: usize = 253;
/// How long `build()` and `start_ztunnel` wait for a ztunnel to report ready.
const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether a namespace is enrolled in the mesh (`istio.io/dataplane-mode: ambient`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ambient {
    /// The namespace carries `istio.io/dataplane-mode: ambient`.
    Yes,
    /// The namespace has no dataplane-mode label: its pods are outside the mesh.
    No,
}

/// A pod to create: its own network namespace `<prefix><namespace>.<name>` on a node.
#[derive(Clone, Debug)]
pub struct Pod {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) node: Option<String>,
    pub(crate) service_account: String,
    pub(crate) labels: BTreeMap<String, String>,
    pub(crate) listed: bool,
}

impl Pod {
    /// A pod `namespace/name` with service account `default` and no labels.
    pub fn new(namespace: &str, name: &str) -> Self {
        Pod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            node: None,
            service_account: "default".to_owned(),
            labels: BTreeMap::new(),
            listed: true,
        }
    }

    /// Pod `default/name` on `node` with service account `server` and label `app: echo`: one
    /// of the echo servers behind the suites' `echo` Service.
    pub fn echo_server(name: &str, node: &str) -> Self {
        Pod::new("default", name)
            .on(node)
            .service_account("server")
            .labels([("app", "echo")])
    }

    /// Places the pod on `node` (required).
    pub fn on(mut self, node: &str) -> Self {
        self.node = Some(node.to_owned());
        self
    }

    /// Sets `spec.serviceAccountName` (default `default`).
    pub fn service_account(mut self, sa: &str) -> Self {
        self.service_account = sa.to_owned();
        self
    }

    /// Adds labels (e.g. `[("app", "echo")]`, or `[("istio.io/dataplane-mode", "none")]` to
    /// opt one pod out).
    pub fn labels<K: Into<String>, V: Into<String>>(
        mut self,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.labels
            .extend(labels.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Creates the pod's namespace and addresses but writes no Pod YAML: a workload the mesh
    /// does not know about (e.g. a raw client whose traffic the mesh must treat as unknown).
    pub fn unlisted(mut self) -> Self {
        self.listed = false;
        self
    }

    /// `namespace/name`, the key every [`Mesh`] method takes.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// A Kubernetes Service, written to the config directory only: ztunnel resolves its VIP.
#[derive(Clone, Debug)]
pub struct Service {
    pub(crate) namespace: String,
    pub(crate) name: String,
    pub(crate) vip: Option<String>,
    pub(crate) ports: Vec<ServicePort>,
    pub(crate) selector: BTreeMap<String, String>,
    pub(crate) labels: BTreeMap<String, String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServicePort {
    pub(crate) name: String,
    pub(crate) port: u16,
    pub(crate) target_port: u16,
}

impl Service {
    /// A service `namespace/name` with no VIP, ports or selector yet.
    pub fn new(namespace: &str, name: &str) -> Self {
        Service {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            vip: None,
            ports: Vec::new(),
            selector: BTreeMap::new(),
            labels: BTreeMap::new(),
        }
    }

    /// Sets `spec.clusterIP` (an IPv4 address; checked by `build()`).
    pub fn vip(mut self, ip: &str) -> Self {
        self.vip = Some(ip.to_owned());
        self
    }

    /// Adds a TCP port `port` → `target_port`, named `port-<port>`.
    pub fn port(self, port: u16, target_port: u16) -> Self {
        let name = format!("port-{port}");
        self.named_port(&name, port, target_port)
    }

    /// Adds a TCP port with an explicit name (e.g. `http`, `tcp-db`).
    pub fn named_port(mut self, name: &str, port: u16, target_port: u16) -> Self {
        self.ports.push(ServicePort {
            name: name.to_owned(),
            port,
            target_port,
        });
        self
    }

    /// Adds selector entries.
    pub fn selector<K: Into<String>, V: Into<String>>(
        mut self,
        selector: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.selector
            .extend(selector.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }

    /// Adds labels on the Service itself (e.g. `istio.io/use-waypoint`).
    pub fn labels<K: Into<String>, V: Into<String>>(
        mut self,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        self.labels
            .extend(labels.into_iter().map(|(k, v)| (k.into(), v.into())));
        self
    }
}

#[derive(Clone, Debug)]
pub(crate) struct NodeSpec {
    pub(crate) name: String,
    pub(crate) ztunnel: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct NamespaceSpec {
    pub(crate) name: String,
    pub(crate) ambient: Ambient,
    pub(crate) labels: BTreeMap<String, String>,
}

/// Declares a topology; [`MeshBuilder::build`] makes it real. Start with [`Mesh::builder`].
#[derive(Clone, Debug)]
pub struct MeshBuilder {
    pub(crate) test_name: String,
    pub(crate) nodes: Vec<NodeSpec>,
    pub(crate) namespaces: Vec<NamespaceSpec>,
    pub(crate) pods: Vec<Pod>,
    pub(crate) services: Vec<Service>,
    pub(crate) yaml: Vec<(String, String)>,
    pub(crate) ztunnel_args: Vec<String>,
    pub(crate) ztunnel_env: Vec<(String, String)>,
    pub(crate) ready_timeout: Duration,
    pub(crate) without_ztunnel: bool,
    pub(crate) ztunnel_binary: Option<PathBuf>,
    pub(crate) redirect: Option<Redirect>,
    pub(crate) ca_mode: CaMode,
    /// Node → the node its agent's token is bound to, when not its own (a stolen token).
    pub(crate) token_nodes: BTreeMap<String, String>,
    pub(crate) control_args: Vec<String>,
}

/// Where the mesh's agents and waypoints get their certificates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum CaMode {
    /// The CA service: the `control` binary in a namespace of its own (`<prefix>_control`,
    /// on the wire at [`CONTROL_IP`]), the only process holding the signing key. Each agent
    /// presents a token bound to its node, each waypoint one for its service account.
    #[default]
    Service,
    /// Every agent and waypoint signs for itself with `--ca-dir` (the shared CA directory):
    /// no CA process, the key in every process. For tests that are about something else and
    /// need the old single-process setup.
    LocalDir,
}

/// The CA's address on the wire (the bridge is .254; nodes are .1 up to .250).
pub const CONTROL_IP: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 253);
/// The CA's gRPC port (Istio's).
pub const CONTROL_GRPC_PORT: u16 = 15012;

/// How the mesh's ztunnels capture pod traffic (`ztunnel --redirect`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Redirect {
    /// The `sk_lookup` program and policy routing; the harness gives every ztunnel of the
    /// mesh one bpffs for its pins (as a node's `/sys/fs/bpf`), which outlives restarts.
    Ebpf,
    Nftables,
}

/// Environment variable choosing the backend of meshes that do not set one.
pub const REDIRECT_ENV: &str = "E2E_REDIRECT";

impl Redirect {
    /// The flag value.
    pub fn as_str(self) -> &'static str {
        match self {
            Redirect::Ebpf => "ebpf",
            Redirect::Nftables => "nftables",
        }
    }

    /// From [`REDIRECT_ENV`] (`ebpf` or `nftables`); eBPF when unset.
    pub fn from_env() -> Result<Self> {
        match std::env::var(REDIRECT_ENV) {
            Err(_) => Ok(Redirect::Ebpf),
            Ok(v) => match v.as_str() {
                "ebpf" => Ok(Redirect::Ebpf),
                "nftables" => Ok(Redirect::Nftables),
                other => bail!("{REDIRECT_ENV}={other:?}: expected ebpf or nftables"),
            },
        }
    }
}

impl MeshBuilder {
    pub(crate) fn new(test_name: &str) -> Self {
        MeshBuilder {
            test_name: test_name.to_owned(),
            nodes: Vec::new(),
            namespaces: Vec::new(),
            pods: Vec::new(),
            services: Vec::new(),
            yaml: Vec::new(),
            ztunnel_args: Vec::new(),
            ztunnel_env: Vec::new(),
            ready_timeout: DEFAULT_READY_TIMEOUT,
            without_ztunnel: false,
            ztunnel_binary: None,
            redirect: None,
            ca_mode: CaMode::default(),
            token_nodes: BTreeMap::new(),
            control_args: Vec::new(),
        }
    }

    /// Where certificates come from (default: [`CaMode::Service`], the CA as its own process).
    pub fn ca_mode(mut self, mode: CaMode) -> Self {
        self.ca_mode = mode;
        self
    }

    /// Gives `node`'s agent a token bound to `bound_to` instead of its own node (a stolen
    /// token): the CA refuses it its pods' identities, so the harness does not wait for that
    /// agent to be ready, only for it to answer.
    pub fn node_token(mut self, node: &str, bound_to: &str) -> Self {
        self.token_nodes
            .insert(node.to_owned(), bound_to.to_owned());
        self
    }

    /// Extra command-line arguments for the CA (e.g. `["--max-cert-ttl", "4s"]`).
    pub fn control_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.control_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The redirection backend (default: [`Redirect::from_env`]). Ignored when the ztunnel
    /// arguments name one (`--redirect none`).
    pub fn redirect(mut self, backend: Redirect) -> Self {
        self.redirect = Some(backend);
        self
    }

    /// Adds a node running a ztunnel. Nodes are numbered from 1 in declaration order.
    pub fn node(mut self, name: &str) -> Self {
        self.nodes.push(NodeSpec {
            name: name.to_owned(),
            ztunnel: true,
        });
        self
    }

    /// Adds a node with no node agent: its pods send and receive plain traffic.
    pub fn bare_node(mut self, name: &str) -> Self {
        self.nodes.push(NodeSpec {
            name: name.to_owned(),
            ztunnel: false,
        });
        self
    }

    /// Makes every node bare (no ztunnel anywhere): for testing the harness itself.
    /// May be called before or after the nodes are declared.
    pub fn without_ztunnel(mut self) -> Self {
        self.without_ztunnel = true;
        self
    }

    /// Declares a namespace.
    pub fn namespace(mut self, name: &str, ambient: Ambient) -> Self {
        self.namespaces.push(NamespaceSpec {
            name: name.to_owned(),
            ambient,
            labels: BTreeMap::new(),
        });
        self
    }

    /// Adds labels to a declared namespace (e.g. `istio.io/use-waypoint`).
    pub fn namespace_labels<K: Into<String>, V: Into<String>>(
        mut self,
        name: &str,
        labels: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let labels: Vec<(String, String)> = labels
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect();
        match self.namespaces.iter_mut().find(|ns| ns.name == name) {
            Some(ns) => ns.labels.extend(labels),
            None => self.namespaces.push(NamespaceSpec {
                name: name.to_owned(),
                ambient: Ambient::No,
                labels: labels.into_iter().collect(),
            }),
        }
        self
    }

    /// Adds a pod.
    pub fn pod(mut self, pod: Pod) -> Self {
        self.pods.push(pod);
        self
    }

    /// Adds a service.
    pub fn service(mut self, service: Service) -> Self {
        self.services.push(service);
        self
    }

    /// Writes an extra YAML file (policies, …) into the config directory before any ztunnel
    /// starts.
    pub fn yaml(mut self, file_name: &str, content: &str) -> Self {
        self.yaml.push((file_name.to_owned(), content.to_owned()));
        self
    }

    /// Extra command-line arguments for every ztunnel (e.g. `["--cert-ttl", "30s"]`).
    pub fn ztunnel_args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.ztunnel_args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Runs this binary as ztunnel instead of the workspace's build (e.g. a release build, or
    /// a stand-in when testing the harness).
    pub fn ztunnel_binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.ztunnel_binary = Some(path.into());
        self
    }

    /// An environment variable for every ztunnel (e.g. `RUST_LOG=debug`).
    pub fn ztunnel_env(mut self, key: &str, value: &str) -> Self {
        self.ztunnel_env.push((key.to_owned(), value.to_owned()));
        self
    }

    /// How long to wait for each ztunnel to report ready (default 30 s).
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.ready_timeout = timeout;
        self
    }

    /// Creates the namespaces, links, addresses and routes, writes the YAML, starts the
    /// ztunnels and waits until each reports ready. On error everything created so far is
    /// removed again.
    pub fn build(self) -> Result<Mesh> {
        Mesh::start(self)
    }

    /// Checks the declaration and assigns addresses.
    pub(crate) fn plan(&self) -> Result<Plan> {
        if self.nodes.is_empty() {
            bail!("mesh {}: declare at least one node", self.test_name);
        }
        if self.nodes.len() > MAX_NODES {
            bail!("mesh {}: at most {MAX_NODES} nodes", self.test_name);
        }
        let mut seen = BTreeSet::new();
        for node in &self.nodes {
            check_name("node", &node.name)?;
            if !seen.insert(node.name.as_str()) {
                bail!("node {} declared twice", node.name);
            }
        }
        let mut seen = BTreeSet::new();
        for ns in &self.namespaces {
            check_name("namespace", &ns.name)?;
            if !seen.insert(ns.name.as_str()) {
                bail!("namespace {} declared twice", ns.name);
            }
        }

        let mut nodes: Vec<NodePlan> = Vec::new();
        for (i, node) in self.nodes.iter().enumerate() {
            let index = u8::try_from(i + 1).context("node index")?;
            nodes.push(NodePlan {
                name: node.name.clone(),
                index,
                wire_ip: Ipv4Addr::new(10, 255, 0, index),
                ztunnel: node.ztunnel && !self.without_ztunnel,
            });
        }

        let mut pods: Vec<PodPlan> = Vec::new();
        let mut per_node: BTreeMap<u8, u8> = BTreeMap::new();
        let mut seen = BTreeSet::new();
        for pod in &self.pods {
            check_name("pod namespace", &pod.namespace)?;
            check_name("pod", &pod.name)?;
            check_name("service account", &pod.service_account)?;
            let key = pod.key();
            if !seen.insert(key.clone()) {
                bail!("pod {key} declared twice");
            }
            if !self.namespaces.iter().any(|ns| ns.name == pod.namespace) {
                bail!(
                    "pod {key}: namespace {} is not declared (use .namespace(..))",
                    pod.namespace
                );
            }
            let Some(node_name) = &pod.node else {
                bail!("pod {key}: no node (use .on(\"n1\"))");
            };
            let Some(node) = nodes.iter().find(|n| &n.name == node_name) else {
                bail!("pod {key}: node {node_name} is not declared");
            };
            let count = per_node.entry(node.index).or_insert(0);
            if usize::from(*count) >= MAX_PODS_PER_NODE {
                bail!("node {node_name}: at most {MAX_PODS_PER_NODE} pods");
            }
            *count += 1;
            let host = *count + 1;
            pods.push(PodPlan {
                pod: pod.clone(),
                node: node.name.clone(),
                ip: Ipv4Addr::new(10, 244, node.index, host),
                gateway: Ipv4Addr::new(10, 244, node.index, 1),
                node_ifname: format!("pod{host}"),
            });
        }

        for svc in &self.services {
            check_name("service namespace", &svc.namespace)?;
            check_name("service", &svc.name)?;
            if let Some(vip) = &svc.vip {
                vip.parse::<Ipv4Addr>().with_context(|| {
                    format!("service {}/{}: vip {vip:?}", svc.namespace, svc.name)
                })?;
            }
        }
        for (file, _) in &self.yaml {
            check_yaml_file_name(file)?;
        }
        for (node, bound) in &self.token_nodes {
            for name in [node, bound] {
                check_name("node", name)?;
            }
            if !nodes.iter().any(|n| &n.name == node) {
                bail!("node_token: node {node} is not declared");
            }
            if self.ca_mode != CaMode::Service {
                bail!("node_token({node}, {bound}): tokens need CaMode::Service");
            }
        }
        Ok(Plan { nodes, pods })
    }
}

/// Where everything goes.
#[derive(Clone, Debug)]
pub(crate) struct Plan {
    pub(crate) nodes: Vec<NodePlan>,
    pub(crate) pods: Vec<PodPlan>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct NodePlan {
    pub(crate) name: String,
    /// 1-based; the third octet of the node's pod range and the last octet of its wire IP.
    pub(crate) index: u8,
    pub(crate) wire_ip: Ipv4Addr,
    pub(crate) ztunnel: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct PodPlan {
    pub(crate) pod: Pod,
    pub(crate) node: String,
    pub(crate) ip: Ipv4Addr,
    /// The node's side of the pod's veth.
    pub(crate) gateway: Ipv4Addr,
    /// Name of the node's side of the veth, unique within the node netns.
    pub(crate) node_ifname: String,
}

impl Plan {
    pub(crate) fn node(&self, name: &str) -> Result<&NodePlan> {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .with_context(|| format!("no node {name} in this mesh"))
    }

    pub(crate) fn pod(&self, key: &str) -> Result<&PodPlan> {
        self.pods
            .iter()
            .find(|p| p.pod.key() == key)
            .with_context(|| format!("no pod {key} in this mesh (pods are named \"ns/name\")"))
    }
}

/// Kubernetes object names used here must be DNS labels; that also guarantees that netns
/// names (`<prefix><ns>.<pod>`, `<prefix><node>`, `<prefix>_wire`) cannot collide.
fn check_name(what: &str, name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if !ok {
        bail!("{what} name {name:?} is not a DNS label (lower-case letters, digits, '-')");
    }
    Ok(())
}

/// YAML files live flat in the config directory and must end in `.yaml`/`.yml`, so that the
/// harness's temporary files (dot-prefixed) are never taken for configuration.
pub(crate) fn check_yaml_file_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && !name.starts_with('.')
        && !name.contains('/')
        && (name.ends_with(".yaml") || name.ends_with(".yml"));
    if !ok {
        bail!("yaml file name {name:?} must be a plain file name ending in .yaml or .yml");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn two_nodes() -> MeshBuilder {
        MeshBuilder::new("plan")
            .node("n1")
            .node("n2")
            .namespace("default", Ambient::Yes)
    }

    #[test]
    fn pods_get_addresses_in_their_nodes_range_in_declaration_order() {
        let plan = two_nodes()
            .pod(Pod::new("default", "a").on("n1"))
            .pod(Pod::new("default", "b").on("n2"))
            .pod(Pod::new("default", "c").on("n1"))
            .plan()
            .expect("valid");
        let got: Vec<(String, String, Ipv4Addr, Ipv4Addr, String)> = plan
            .pods
            .iter()
            .map(|p| {
                (
                    p.pod.key(),
                    p.node.clone(),
                    p.ip,
                    p.gateway,
                    p.node_ifname.clone(),
                )
            })
            .collect();
        let want = [
            ("default/a", "n1", [10, 244, 1, 2], [10, 244, 1, 1], "pod2"),
            ("default/b", "n2", [10, 244, 2, 2], [10, 244, 2, 1], "pod2"),
            ("default/c", "n1", [10, 244, 1, 3], [10, 244, 1, 1], "pod3"),
        ]
        .map(|(k, n, ip, gw, ifn)| {
            (
                k.to_owned(),
                n.to_owned(),
                Ipv4Addr::from(ip),
                Ipv4Addr::from(gw),
                ifn.to_owned(),
            )
        });
        assert_eq!(got, want);
        assert_eq!(plan.nodes[1].wire_ip, Ipv4Addr::new(10, 255, 0, 2));
    }

    fn check(builder: MeshBuilder, expected_error: &str) {
        let err = builder.plan().expect_err("declaration must be refused");
        let text = format!("{err:#}");
        assert!(
            text.contains(expected_error),
            "expected error containing {expected_error:?}, got {text:?}"
        );
    }

    #[test]
    fn bad_declarations_are_refused_with_a_reason() {
        check(MeshBuilder::new("t"), "at least one node");
        check(two_nodes().node("n1"), "node n1 declared twice");
        check(MeshBuilder::new("t").node("N1"), "not a DNS label");
        check(MeshBuilder::new("t").node("a.b"), "not a DNS label");
        check(
            two_nodes().pod(Pod::new("default", "a")),
            "pod default/a: no node",
        );
        check(
            two_nodes().pod(Pod::new("default", "a").on("n9")),
            "node n9 is not declared",
        );
        check(
            two_nodes().pod(Pod::new("other", "a").on("n1")),
            "namespace other is not declared",
        );
        check(
            two_nodes()
                .pod(Pod::new("default", "a").on("n1"))
                .pod(Pod::new("default", "a").on("n2")),
            "pod default/a declared twice",
        );
        check(
            two_nodes().service(Service::new("default", "s").vip("10.96.0.300")),
            "vip \"10.96.0.300\"",
        );
        check(two_nodes().yaml("../x.yaml", ""), "plain file name");
        check(two_nodes().yaml("policy.json", ""), "ending in .yaml");
    }

    #[test]
    fn without_ztunnel_makes_every_node_bare() {
        let plan = MeshBuilder::new("t")
            .node("n1")
            .without_ztunnel()
            .node("n2")
            .plan()
            .expect("valid");
        assert!(plan.nodes.iter().all(|n| !n.ztunnel));
        let plan = two_nodes().bare_node("n3").plan().expect("valid");
        let running: Vec<bool> = plan.nodes.iter().map(|n| n.ztunnel).collect();
        assert_eq!(running, [true, true, false]);
    }
}
