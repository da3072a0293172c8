//! A running mesh: the namespaces, links and processes of one test, and the handles a test
//! uses to drive them.

use std::collections::hash_map::DefaultHasher;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, SocketAddrV4, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::bpffs::Bpffs;
use crate::capture::Capture;
use crate::http::{self, HttpResponse};
use crate::netns::{self, in_netns, write_sysctl, PREFIX_HEAD};
use crate::process::ChildGuard;
use crate::spec::{
    check_yaml_file_name, Ambient, CaMode, MeshBuilder, NodePlan, Plan, Pod, PodPlan, Redirect,
};
use crate::sys::{child_path, command_line, ip, netns_command, preflight, Binaries, MARKER_ENV};
use crate::wait::wait_until;
use crate::yaml::{render_topology, TOPOLOGY_FILE};

/// The bridge's own address on the wire: source of the capture sentinel.
const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 255, 0, 254);
/// Source of the node's own connections to its pods (kubelet probes), as Istio's CNI SNATs
/// them; ztunnel's pod rules let this source reach the app uncaptured.
pub const PROBE_SOURCE: Ipv4Addr = Ipv4Addr::new(169, 254, 7, 127);
/// Marks node-originated packets towards pods for that SNAT (cleared when crossing the veth).
const PROBE_MARK: u32 = 0x7127;

/// The node-level rules of the CNI-equivalent part of the installation (what Istio's CNI node
/// agent installs on the host; the node agent itself has no access to the node's namespace
/// in a cluster), in nft syntax:
/// - connections the node itself opens to its pods (kubelet probes) leave from the link-local
///   probe address, which the pods' capture rules let through. Only locally generated
///   packets are marked (output hook); forwarded pod traffic is not;
/// - anti-spoofing, which makes that exemption safe: a packet with the probe source that the
///   node forwards (from a pod, or from another node) is dropped, so no pod can claim to be
///   the node's probe (`tests/tests/bypass_capture.rs`). The node's own probes never pass the
///   forward hook, and neither do their replies.
fn node_probe_rules() -> String {
    format!(
        "add table ip kubelet; \
         add chain ip kubelet output {{ type filter hook output priority 0; policy accept; }}; \
         add rule ip kubelet output oifname \"pod*\" meta mark set {PROBE_MARK:#x}; \
         add chain ip kubelet postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}; \
         add rule ip kubelet postrouting meta mark {PROBE_MARK:#x} snat to {PROBE_SOURCE}; \
         add chain ip kubelet forward {{ type filter hook forward priority filter; policy accept; }}; \
         add rule ip kubelet forward ip saddr {PROBE_SOURCE} counter drop"
    )
}
/// The bridge device inside the wire namespace.
pub(crate) const BRIDGE: &str = "br0";
/// The node's side of its link to the bridge.
pub(crate) const NODE_WIRE_IF: &str = "wire";
/// The pod's side of its veth.
const POD_IF: &str = "eth0";

/// ztunnel's fixed ports inside its node namespace.
const READINESS_PORT: u16 = 15021;
const METRICS_PORT: u16 = 15020;
const ADMIN_PORT: u16 = 15000;
/// See [`Mesh::endpoint_offset`].
pub const UPGRADE_PORT_SHIFT: u16 = 100;

/// The agent an upgrade replaced ([`Mesh::start_next_ztunnel`]), still running until it has
/// drained; killed when dropped if it has not exited by then.
pub struct OldAgent {
    guard: ChildGuard,
    log: PathBuf,
}

impl OldAgent {
    pub fn pid(&self) -> u32 {
        self.guard.pid()
    }

    /// Sends `signal` (SIGTERM: what the kubelet sends once the new agent is ready).
    pub fn signal(&self, signal: Signal) -> Result<()> {
        self.guard.signal(signal)
    }

    pub fn is_running(&mut self) -> bool {
        self.guard.is_running()
    }

    /// Everything it logged.
    pub fn log(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }
}

/// Bounds on everything a test does through the harness.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const IO_TIMEOUT: Duration = Duration::from_secs(15);
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const STOP_GRACE: Duration = Duration::from_secs(10);
/// Log lines printed per ztunnel when a test fails.
pub(crate) const LOG_TAIL_LINES: usize = 60;

/// An object whose labels [`Mesh::set_labels`] replaces: a namespace by name, a pod or a
/// service as `namespace/name`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Labelled<'a> {
    Namespace(&'a str),
    Pod(&'a str),
    Service(&'a str),
}

/// Sends `msg` on an open connection to an echo server and checks the same bytes come back
/// (within the harness's I/O bound): proof that a long-lived connection still works.
pub fn echo_once(stream: &mut TcpStream, msg: &[u8]) -> Result<()> {
    stream.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.read_exact(&mut back)?;
    anyhow::ensure!(back == msg, "echo mismatch");
    Ok(())
}

/// A topology built by [`MeshBuilder::build`]. Dropping it kills every process it started and
/// deletes every namespace it created, also when the test panics (and then it first prints
/// the tail of each ztunnel log). Set `E2E_KEEP=1` to keep the work directory (config, CA,
/// logs, captures) of a failed test.
pub struct Mesh {
    pub(crate) prefix: String,
    test_name: String,
    pub(crate) spec: MeshBuilder,
    pub(crate) plan: Plan,
    pub(crate) binaries: Binaries,
    work_dir: Option<tempfile::TempDir>,
    work_path: PathBuf,
    ztunnels: Mutex<BTreeMap<String, ChildGuard>>,
    /// Per node, how many agents an upgrade started after the first (see
    /// [`Mesh::start_next_ztunnel`]); absent: 0.
    upgrades: Mutex<BTreeMap<String, u32>>,
    /// The CA service (with [`CaMode::Service`]); see `control.rs`.
    pub(crate) control: Mutex<Option<ChildGuard>>,
    /// The backend the harness asks for (`None`: the ztunnel arguments name one).
    redirect: Option<Redirect>,
    /// The nodes' bpffs, for the eBPF backend; unmounted after the ztunnels are gone.
    bpffs: Option<Bpffs>,
    counter: AtomicU64,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh")
            .field("test", &self.test_name)
            .field("prefix", &self.prefix)
            .field("work_dir", &self.work_path)
            .finish_non_exhaustive()
    }
}

impl Mesh {
    /// Starts declaring a mesh for the test `test_name` (used to derive the unique prefix).
    pub fn builder(test_name: &str) -> MeshBuilder {
        MeshBuilder::new(test_name)
    }

    /// The start most suites share: nodes `n1` and `n2`, the ambient namespace `default`, and
    /// pod `default/client` (service account `client`) on `n1`. Add what the suite needs.
    pub fn two_nodes(test_name: &str) -> MeshBuilder {
        MeshBuilder::new(test_name)
            .node("n1")
            .node("n2")
            .namespace("default", Ambient::Yes)
            .pod(
                Pod::new("default", "client")
                    .on("n1")
                    .service_account("client"),
            )
    }

    pub(crate) fn start(spec: MeshBuilder) -> Result<Mesh> {
        let plan = spec.plan()?;
        let runs_ztunnel = plan.nodes.iter().any(|n| n.ztunnel);
        preflight(runs_ztunnel)?;
        let binaries = Binaries::locate();
        if runs_ztunnel {
            match &spec.ztunnel_binary {
                Some(path) if !path.is_file() => {
                    bail!("ztunnel binary {} does not exist", path.display())
                }
                Some(_) => {}
                None => {
                    binaries.ztunnel()?;
                }
            }
        }
        let prefix = unique_prefix(&spec.test_name)?;
        let work_dir = tempfile::Builder::new()
            .prefix(&format!("e2e-{prefix}"))
            .tempdir()
            .context("create the mesh work directory")?;
        let work_path = work_dir.path().to_path_buf();
        for dir in ["config", "ca", "logs", "tokens"] {
            let path = work_path.join(dir);
            std::fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        }
        let redirect = if spec.ztunnel_args.iter().any(|a| a == "--redirect") {
            None
        } else {
            Some(spec.redirect.map_or_else(Redirect::from_env, Ok)?)
        };
        // From here on, Drop removes whatever exists, whichever step fails.
        let mut mesh = Mesh {
            prefix,
            test_name: spec.test_name.clone(),
            spec,
            plan,
            binaries,
            work_dir: Some(work_dir),
            work_path,
            ztunnels: Mutex::new(BTreeMap::new()),
            upgrades: Mutex::new(BTreeMap::new()),
            control: Mutex::new(None),
            redirect,
            bpffs: None,
            counter: AtomicU64::new(0),
        };
        if redirect == Some(Redirect::Ebpf) && runs_ztunnel {
            mesh.bpffs = Some(Bpffs::mount(&mesh.work_path.join("bpffs"))?);
        }
        mesh.create_topology()
            .with_context(|| format!("build the topology of {}", mesh.test_name))?;
        mesh.write_config()?;
        if runs_ztunnel && mesh.spec.ca_mode == CaMode::Service {
            mesh.create_control_netns()?;
            mesh.start_control()?;
        }
        mesh.start_all_ztunnels()?;
        Ok(mesh)
    }

    // === topology ===

    fn create_topology(&self) -> Result<()> {
        let wire = self.wire_netns();
        netns::create(&wire)?;
        ip(&[
            "-n",
            &wire,
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
            "mcast_snooping",
            "0",
        ])?;
        ip(&[
            "-n",
            &wire,
            "addr",
            "add",
            &format!("{BRIDGE_IP}/24"),
            "dev",
            BRIDGE,
        ])?;
        ip(&["-n", &wire, "link", "set", BRIDGE, "up"])?;

        for node in &self.plan.nodes {
            self.create_node(node, &wire)?;
        }
        for pod in &self.plan.pods {
            self.create_pod(pod)?;
        }
        Ok(())
    }

    fn create_node(&self, node: &NodePlan, wire: &str) -> Result<()> {
        let ns = self.netns_of_node(&node.name);
        netns::create(&ns)?;
        write_sysctl(&ns, "net/ipv4/ip_forward", "1")?;
        // Strict reverse-path filtering (inherited from the host) could drop redirected or
        // forwarded traffic in ways that depend on the machine; the nodes route statically.
        write_sysctl(&ns, "net/ipv4/conf/all/rp_filter", "0")?;
        write_sysctl(&ns, "net/ipv4/conf/default/rp_filter", "0")?;
        ip(&["netns", "exec", &ns, "nft", &node_probe_rules()])?;
        let bridge_port = format!("n{}", node.index);
        // Both ends are created directly inside their namespaces: nothing ever appears in
        // the root namespace.
        ip(&[
            "link",
            "add",
            NODE_WIRE_IF,
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            &bridge_port,
            "netns",
            wire,
        ])?;
        ip(&[
            "-n",
            wire,
            "link",
            "set",
            &bridge_port,
            "master",
            BRIDGE,
            "up",
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{}/24", node.wire_ip),
            "dev",
            NODE_WIRE_IF,
        ])?;
        ip(&["-n", &ns, "link", "set", NODE_WIRE_IF, "up"])?;
        for other in self.plan.nodes.iter().filter(|o| o.index != node.index) {
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                &format!("10.244.{}.0/24", other.index),
                "via",
                &other.wire_ip.to_string(),
                "dev",
                NODE_WIRE_IF,
            ])?;
        }
        Ok(())
    }

    fn create_pod(&self, pod: &PodPlan) -> Result<()> {
        let node_ns = self.netns_of_node(&pod.node);
        let pod_ns = self.netns_of_pod(&pod.pod.key());
        netns::create(&pod_ns)?;
        let ifname = pod.node_ifname.as_str();
        ip(&[
            "link", "add", ifname, "netns", &node_ns, "type", "veth", "peer", "name", POD_IF,
            "netns", &pod_ns,
        ])?;
        let gateway = pod.gateway.to_string();
        let pod_ip = pod.ip.to_string();
        ip(&[
            "-n",
            &node_ns,
            "addr",
            "add",
            &format!("{gateway}/32"),
            "dev",
            ifname,
        ])?;
        ip(&["-n", &node_ns, "link", "set", ifname, "up"])?;
        ip(&[
            "-n",
            &node_ns,
            "route",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            ifname,
        ])?;
        ip(&[
            "-n",
            &pod_ns,
            "addr",
            "add",
            &format!("{pod_ip}/32"),
            "dev",
            POD_IF,
        ])?;
        ip(&["-n", &pod_ns, "link", "set", POD_IF, "up"])?;
        ip(&[
            "-n",
            &pod_ns,
            "route",
            "add",
            &format!("{gateway}/32"),
            "dev",
            POD_IF,
            "scope",
            "link",
        ])?;
        ip(&[
            "-n", &pod_ns, "route", "add", "default", "via", &gateway, "dev", POD_IF,
        ])?;
        Ok(())
    }

    /// Replaces the labels of a declared namespace, pod or service and rewrites the topology
    /// file, so the agents see the change as a cluster's watch would (e.g. enrolling a
    /// namespace live). The labels given are all the object's labels.
    pub fn set_labels(
        &mut self,
        object: Labelled<'_>,
        labels: BTreeMap<String, String>,
    ) -> Result<()> {
        match object {
            Labelled::Namespace(name) => {
                let ns = self
                    .spec
                    .namespaces
                    .iter_mut()
                    .find(|ns| ns.name == name)
                    .with_context(|| format!("namespace {name} is not declared"))?;
                // The labels say whether it is ambient now.
                ns.ambient = crate::spec::Ambient::No;
                ns.labels = labels;
            }
            Labelled::Pod(key) => {
                let plan = self
                    .plan
                    .pods
                    .iter_mut()
                    .find(|p| p.pod.key() == key)
                    .with_context(|| format!("pod {key} is not declared"))?;
                plan.pod.labels = labels.clone();
                if let Some(pod) = self.spec.pods.iter_mut().find(|p| p.key() == key) {
                    pod.labels = labels;
                }
            }
            Labelled::Service(key) => {
                let svc = self
                    .spec
                    .services
                    .iter_mut()
                    .find(|s| format!("{}/{}", s.namespace, s.name) == key)
                    .with_context(|| format!("service {key} is not declared"))?;
                svc.labels = labels;
            }
        }
        self.write_yaml(TOPOLOGY_FILE, &render_topology(&self.spec, &self.plan)?)
    }

    fn write_config(&self) -> Result<()> {
        self.write_yaml(TOPOLOGY_FILE, &render_topology(&self.spec, &self.plan)?)?;
        for (file, content) in &self.spec.yaml {
            self.write_yaml(file, content)?;
        }
        Ok(())
    }

    // === names and addresses ===

    /// The unique prefix of every namespace of this mesh (e.g. `mt1a2b3c-`); ztunnel gets it
    /// as `--netns-prefix`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn netns_of_node(&self, node: &str) -> String {
        format!("{}{node}", self.prefix)
    }

    fn netns_of_pod(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key.replacen('/', ".", 1))
    }

    /// The namespace holding the bridge between nodes (`<prefix>_wire`).
    pub fn wire_netns(&self) -> String {
        format!("{}_wire", self.prefix)
    }

    /// The namespace of node `node` (`<prefix><node>`).
    pub fn node_netns(&self, node: &str) -> Result<String> {
        self.plan.node(node)?;
        Ok(self.netns_of_node(node))
    }

    /// The namespace of pod `ns/name` (`<prefix><ns>.<name>`).
    pub fn pod_netns(&self, pod: &str) -> Result<String> {
        self.plan.pod(pod)?;
        Ok(self.netns_of_pod(pod))
    }

    /// Ids of the `sk_lookup` BPF links attached to the pod's network namespace (the eBPF
    /// backend's capture), as `bpftool link show` reports them.
    pub fn capture_links(&self, pod: &str) -> Result<Vec<u64>> {
        use std::os::unix::fs::MetadataExt;
        let path = netns::netns_path(&self.pod_netns(pod)?);
        let ino = std::fs::metadata(&path)
            .with_context(|| format!("stat {}", path.display()))?
            .ino();
        let out = Command::new(crate::sys::tool("bpftool", "bpftool")?)
            .args(["-j", "link", "show"])
            .output()
            .context("run bpftool link show")?;
        if !out.status.success() {
            bail!(
                "bpftool link show: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let links: Vec<serde_json::Value> =
            serde_json::from_slice(&out.stdout).context("parse bpftool link show -j")?;
        Ok(links
            .iter()
            .filter(|l| l["netns_ino"].as_u64() == Some(ino) && l["attach_type"] == "sk_lookup")
            .filter_map(|l| l["id"].as_u64())
            .collect())
    }

    /// The pod's IP (`status.podIP`).
    pub fn pod_ip(&self, pod: &str) -> Result<Ipv4Addr> {
        Ok(self.plan.pod(pod)?.ip)
    }

    /// The node's address on the wire (10.255.0.i).
    pub fn node_ip(&self, node: &str) -> Result<Ipv4Addr> {
        Ok(self.plan.node(node)?.wire_ip)
    }

    /// Keys (`ns/name`) of all pods, in declaration order.
    pub fn pods(&self) -> Vec<String> {
        self.plan.pods.iter().map(|p| p.pod.key()).collect()
    }

    /// Names of all nodes, in declaration order.
    pub fn nodes(&self) -> Vec<String> {
        self.plan.nodes.iter().map(|n| n.name.clone()).collect()
    }

    /// The redirection backend the ztunnels were started with (`None`: the test's own
    /// `--redirect` argument decides).
    pub fn redirect(&self) -> Option<Redirect> {
        self.redirect
    }

    /// The nodes' bpffs (eBPF backend): the agents pin each pod's capture under `ztunnel/`.
    pub fn bpf_fs(&self) -> Option<&Path> {
        self.bpffs.as_ref().map(Bpffs::path)
    }

    /// The directory of the mesh's work files (config/, ca/, logs/).
    pub fn work_dir(&self) -> &Path {
        &self.work_path
    }

    /// The YAML directory every ztunnel watches (`--config-dir`).
    pub fn config_dir(&self) -> PathBuf {
        self.work_path.join("config")
    }

    /// The CA directory shared by every ztunnel (`--ca-dir`).
    pub fn ca_dir(&self) -> PathBuf {
        self.work_path.join("ca")
    }

    pub(crate) fn log_dir(&self) -> PathBuf {
        self.work_path.join("logs")
    }

    /// Where the binaries under test are taken from.
    pub fn binaries(&self) -> &Binaries {
        &self.binaries
    }

    fn next_label(&self, owner: &str, argv0: &str) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let program = Path::new(argv0)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "cmd".to_owned());
        format!("{}-{program}-{n}", owner.replace('/', "."))
    }

    // === running things inside pods and nodes ===

    /// Runs `f` on a thread inside the pod's namespace (see [`in_netns`]).
    pub fn in_pod<T: Send>(&self, pod: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.pod_netns(pod)?, f)
    }

    /// Runs `f` on a thread inside the node's namespace.
    pub fn in_node<T: Send>(&self, node: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        in_netns(&self.node_netns(node)?, f)
    }

    /// Runs a command inside the pod's namespace and returns its output, whatever its exit
    /// status; killed after 60 s.
    pub fn exec(&self, pod: &str, argv: &[&str]) -> Result<Output> {
        self.exec_timeout(pod, argv, EXEC_TIMEOUT)
    }

    /// [`Mesh::exec`] with an explicit time limit.
    pub fn exec_timeout(&self, pod: &str, argv: &[&str], timeout: Duration) -> Result<Output> {
        run_bounded(
            netns_command(&self.pod_netns(pod)?, &self.prefix, argv)?,
            timeout,
        )
    }

    /// Runs a command inside the pod's namespace and returns its stdout; a non-zero exit is
    /// an error quoting stderr.
    pub fn exec_ok(&self, pod: &str, argv: &[&str]) -> Result<String> {
        let out = self.exec(pod, argv)?;
        if !out.status.success() {
            bail!(
                "`{}` in {pod} failed ({}): {}",
                argv.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Makes `pod` vanish from the network without closing anything: every packet into or
    /// out of its namespace is dropped (an nftables table of its own, priority -400) until
    /// the guard drops. Its peers' connections turn half-open.
    pub fn blackhole<'a>(&'a self, pod: &'static str) -> Result<Blackhole<'a>> {
        let rules = format!(
            "add table inet {BLACKHOLE_TABLE}; \
             add chain inet {BLACKHOLE_TABLE} in {{ type filter hook input priority -400; policy drop; }}; \
             add chain inet {BLACKHOLE_TABLE} out {{ type filter hook output priority -400; policy drop; }}"
        );
        self.exec_ok(pod, &["nft", &rules])?;
        Ok(Blackhole { mesh: self, pod })
    }

    /// Runs a command inside the node's namespace; killed after 60 s.
    pub fn exec_node(&self, node: &str, argv: &[&str]) -> Result<Output> {
        run_bounded(
            netns_command(&self.node_netns(node)?, &self.prefix, argv)?,
            EXEC_TIMEOUT,
        )
    }

    /// Starts a long-running command inside the pod's namespace; it is killed when the guard
    /// drops (and in any case when the mesh drops).
    pub fn spawn(&self, pod: &str, argv: &[&str]) -> Result<ChildGuard> {
        let cmd = netns_command(&self.pod_netns(pod)?, &self.prefix, argv)?;
        let label = self.next_label(pod, argv.first().copied().unwrap_or("cmd"));
        ChildGuard::spawn(cmd, &label, &self.log_dir())
    }

    /// Starts a long-running command inside the node's namespace.
    pub fn spawn_node(&self, node: &str, argv: &[&str]) -> Result<ChildGuard> {
        let cmd = netns_command(&self.node_netns(node)?, &self.prefix, argv)?;
        let label = self.next_label(node, argv.first().copied().unwrap_or("cmd"));
        ChildGuard::spawn(cmd, &label, &self.log_dir())
    }

    /// Starts `mesh-echo --port <port> --name <name>` in the pod and returns once it listens.
    pub fn spawn_echo(&self, pod: &str, port: u16, name: &str) -> Result<ChildGuard> {
        self.spawn_echo_with(pod, port, name, &[])
    }

    /// [`Mesh::spawn_echo`] with more `mesh-echo` flags (e.g. `--tls-cert`).
    pub fn spawn_echo_with(
        &self,
        pod: &str,
        port: u16,
        name: &str,
        flags: &[&str],
    ) -> Result<ChildGuard> {
        let echo = self.binaries.mesh_echo()?;
        let echo = echo.to_string_lossy();
        let port = port.to_string();
        let mut argv = vec![&*echo, "--port", &port, "--name", name];
        argv.extend_from_slice(flags);
        let mut guard = self.spawn(pod, &argv)?;
        guard.wait_for_stdout("listening on", LISTEN_TIMEOUT)?;
        Ok(guard)
    }

    /// Opens a TCP connection from inside the pod (so it is subject to the pod's capture
    /// rules, exactly like the pod's own applications). Reads and writes time out after 15 s.
    /// For async code: `tokio::net::TcpStream::from_std` after `set_nonblocking(true)`.
    pub fn connect(&self, pod: &str, addr: SocketAddr) -> Result<TcpStream> {
        let stream = self
            .in_pod(pod, move || {
                TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            })?
            .with_context(|| format!("connect from {pod} to {addr}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        Ok(stream)
    }

    /// Sends `payload` from the pod to `addr`, shuts down writing, and returns everything
    /// read back until the server closes (against mesh-echo: the payload itself).
    pub fn echo_roundtrip(&self, pod: &str, addr: SocketAddr, payload: &[u8]) -> Result<Vec<u8>> {
        let mut stream = self.connect(pod, addr)?;
        stream
            .write_all(payload)
            .with_context(|| format!("send to {addr} from {pod}"))?;
        stream
            .shutdown(Shutdown::Write)
            .with_context(|| format!("shut down writing to {addr}"))?;
        let mut back = Vec::new();
        stream
            .read_to_end(&mut back)
            .with_context(|| format!("read the echo from {addr} in {pod}"))?;
        Ok(back)
    }

    /// `GET path` from the pod to `addr` over a fresh connection.
    pub fn http_get(&self, pod: &str, addr: SocketAddr, path: &str) -> Result<HttpResponse> {
        self.http_request(pod, addr, "GET", path, b"")
    }

    /// Any HTTP/1.1 request from the pod to `addr` over a fresh connection.
    pub fn http_request(
        &self,
        pod: &str,
        addr: SocketAddr,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> Result<HttpResponse> {
        let mut stream = self.connect(pod, addr)?;
        http::request(&mut stream, method, &addr.to_string(), path, body)
    }

    pub(crate) fn node_http(
        &self,
        node: &str,
        port: u16,
        method: &str,
        path: &str,
    ) -> Result<HttpResponse> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port + self.endpoint_offset(node)));
        let mut stream = self
            .in_node(node, move || {
                TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
            })?
            .with_context(|| format!("connect to {addr} in node {node}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        http::request(&mut stream, method, &addr.to_string(), path, b"")
    }

    fn node_http_ok(&self, node: &str, port: u16, method: &str, path: &str) -> Result<String> {
        let response = self.node_http(node, port, method, path)?;
        if !(200..300).contains(&response.status) {
            bail!(
                "{method} {path} on node {node} port {port}: status {}: {}",
                response.status,
                response.text()
            );
        }
        Ok(response.text())
    }

    // === configuration ===

    /// Writes (or replaces) a YAML file in the config directory. The write is atomic (temp
    /// file + rename), so a watching ztunnel never reads half a file.
    pub fn write_yaml(&self, file_name: &str, content: &str) -> Result<()> {
        check_yaml_file_name(file_name)?;
        let dir = self.config_dir();
        let tmp = dir.join(format!(".{file_name}.tmp"));
        let path = dir.join(file_name);
        std::fs::write(&tmp, content).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))
    }

    /// Removes a YAML file from the config directory.
    pub fn remove_yaml(&self, file_name: &str) -> Result<()> {
        check_yaml_file_name(file_name)?;
        let path = self.config_dir().join(file_name);
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))
    }

    // === ztunnel ===

    fn ztunnels(&self) -> MutexGuard<'_, BTreeMap<String, ChildGuard>> {
        // A panic elsewhere cannot leave the map inconsistent: every update is one call.
        self.ztunnels.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start_all_ztunnels(&self) -> Result<()> {
        let nodes: Vec<&NodePlan> = self.plan.nodes.iter().filter(|n| n.ztunnel).collect();
        // The first ztunnel starts alone: with `--ca-dir` it creates the shared CA, so no two
        // processes race to generate it; and the agents share one bpffs, where an agent's
        // startup sweep removes the pins of pods that are not its own, so a second agent
        // starting alongside could remove the first one's fresh pins (each node would have
        // its own bpffs in a cluster).
        let Some((first, rest)) = nodes.split_first() else {
            return Ok(());
        };
        self.spawn_ztunnel(&first.name)?;
        self.wait_started(&first.name)?;
        for node in rest {
            self.spawn_ztunnel(&node.name)?;
        }
        for node in rest {
            self.wait_started(&node.name)?;
        }
        Ok(())
    }

    /// Waits until a freshly started agent is ready, or, holding another node's token (its
    /// pods never get a certificate, so it never reports ready), until it answers at all.
    fn wait_started(&self, node: &str) -> Result<()> {
        if self.spec.token_nodes.contains_key(node) {
            self.wait_answering(node)
        } else {
            self.wait_ready(node)
        }
    }

    fn ztunnel_log_path(&self, node: &str) -> PathBuf {
        match self.upgrades_of(node) {
            0 => self.log_dir().join(format!("ztunnel-{node}.log")),
            n => self
                .log_dir()
                .join(format!("ztunnel-{node}.upgrade{n}.log")),
        }
    }

    fn upgrades_of(&self, node: &str) -> u32 {
        let upgrades = self.upgrades.lock().unwrap_or_else(|e| e.into_inner());
        upgrades.get(node).copied().unwrap_or(0)
    }

    /// Added to the node agent's admin, metrics and readiness ports: in the node's namespace
    /// two agents overlap during an upgrade (in a cluster each agent pod has its own), so
    /// generations alternate between the usual ports and these plus [`UPGRADE_PORT_SHIFT`].
    fn endpoint_offset(&self, node: &str) -> u16 {
        if self.upgrades_of(node) % 2 == 1 {
            UPGRADE_PORT_SHIFT
        } else {
            0
        }
    }

    /// The endpoint flags of an agent on the shifted ports (none on the usual ones).
    fn endpoint_args(&self, node: &str) -> Vec<String> {
        let offset = self.endpoint_offset(node);
        if offset == 0 {
            return Vec::new();
        }
        vec![
            "--admin-addr".to_owned(),
            format!("127.0.0.1:{}", ADMIN_PORT + offset),
            "--metrics-addr".to_owned(),
            format!("0.0.0.0:{}", METRICS_PORT + offset),
            "--readiness-addr".to_owned(),
            format!("0.0.0.0:{}", READINESS_PORT + offset),
        ]
    }

    /// An upgrade, as a DaemonSet rolling update with `maxSurge: 1` does it: starts the next
    /// agent on `node` beside the running one (same pod ports, `SO_REUSEPORT`; the admin,
    /// metrics and readiness ports of the other set, see [`Mesh::endpoint_offset`]; a log
    /// of its own) and waits until it is ready. From then on the node's agent in every
    /// other method is the new one; the old one, still running, is returned: SIGTERM it
    /// ([`OldAgent::signal`]) as the kubelet would. A third generation may start once the
    /// first has exited (it takes the first one's ports back).
    pub fn start_next_ztunnel(&self, node: &str) -> Result<OldAgent> {
        if self.ztunnel_pid(node).is_none() {
            bail!("no ztunnel running on {node} to upgrade");
        }
        let old_log = self.ztunnel_log_path(node);
        let generation = {
            let mut upgrades = self.upgrades.lock().unwrap_or_else(|e| e.into_inner());
            let n = upgrades.entry(node.to_owned()).or_insert(0);
            *n += 1;
            *n
        };
        let cmd = self.ztunnel_command(node)?;
        let guard = ChildGuard::spawn_logging_to(
            cmd,
            &format!("ztunnel-{node}-upgrade{generation}"),
            &self.ztunnel_log_path(node),
        )?;
        let old = self
            .ztunnels()
            .insert(node.to_owned(), guard)
            .with_context(|| format!("no ztunnel on {node}"))?;
        let old = OldAgent {
            guard: old,
            log: old_log,
        };
        self.wait_ready(node)?;
        Ok(old)
    }

    fn spawn_ztunnel(&self, node: &str) -> Result<()> {
        let plan = self.plan.node(node)?;
        if !plan.ztunnel {
            bail!("node {node} is bare: it runs no ztunnel");
        }
        let mut ztunnels = self.ztunnels();
        if let Some(running) = ztunnels.get_mut(node) {
            if running.is_running() {
                bail!(
                    "ztunnel on {node} is already running (pid {})",
                    running.pid()
                );
            }
        }
        let cmd = self.ztunnel_command(node)?;
        let guard = ChildGuard::spawn_logging_to(
            cmd,
            &format!("ztunnel-{node}"),
            &self.ztunnel_log_path(node),
        )?;
        ztunnels.insert(node.to_owned(), guard);
        Ok(())
    }

    /// The node's ztunnel command line as the harness runs it (netns, config, CA, backend,
    /// bpffs, the spec's extra arguments and environment).
    fn ztunnel_command(&self, node: &str) -> Result<Command> {
        let binary = match &self.spec.ztunnel_binary {
            Some(path) => path.clone(),
            None => self.binaries.ztunnel()?,
        };
        let ip = crate::sys::tool("ip", "iproute2")?;
        let ca_args = match self.spec.ca_mode {
            CaMode::LocalDir => vec!["--ca-dir".into(), self.ca_dir().into_os_string()],
            CaMode::Service => {
                let bound = self.spec.token_nodes.get(node).map_or(node, String::as_str);
                self.ca_client_args(&self.node_token(node, bound)?)
            }
        };
        let mut cmd = Command::new(ip);
        cmd.args(["netns", "exec", &self.netns_of_node(node)])
            .arg(&binary)
            .args(["--node-name", node, "--config-dir"])
            .arg(self.config_dir())
            .args(ca_args)
            .args(["--netns-prefix", &self.prefix])
            .args(
                self.redirect
                    .iter()
                    .flat_map(|r| ["--redirect", r.as_str()]),
            )
            .args(
                self.bpffs
                    .iter()
                    .flat_map(|fs| [std::ffi::OsStr::new("--bpf-fs"), fs.path().as_os_str()]),
            )
            .args(&self.spec.ztunnel_args)
            .args(self.endpoint_args(node))
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .env(MARKER_ENV, &self.prefix)
            .env("PATH", child_path());
        for (key, value) in &self.spec.ztunnel_env {
            cmd.env(key, value);
        }
        Ok(cmd)
    }

    /// Runs the node's ztunnel binary once with the agent's arguments plus `extra` (e.g.
    /// `--release-all`) in the node's namespace, to completion (killed after 60 s).
    pub fn run_ztunnel_once(&self, node: &str, extra: &[&str]) -> Result<Output> {
        let mut cmd = self.ztunnel_command(node)?;
        cmd.args(extra);
        run_bounded(cmd, Duration::from_secs(60))
    }

    /// Starts the node's ztunnel (again) and waits until it reports ready.
    pub fn start_ztunnel(&self, node: &str) -> Result<()> {
        self.spawn_ztunnel(node)?;
        self.wait_ready(node)
    }

    /// Starts the node's ztunnel (again) without waiting for it to be ready.
    pub fn start_ztunnel_unready(&self, node: &str) -> Result<()> {
        self.spawn_ztunnel(node)
    }

    /// Stops the node's ztunnel gracefully (SIGTERM; SIGKILL after 10 s).
    pub fn stop_ztunnel(&self, node: &str) -> Result<()> {
        let guard = self.ztunnels().remove(node);
        let Some(mut guard) = guard else {
            bail!("no ztunnel running on {node}");
        };
        guard.terminate(STOP_GRACE)?;
        Ok(())
    }

    /// Kills the node's ztunnel at once (SIGKILL), as a crash would.
    pub fn kill_ztunnel(&self, node: &str) -> Result<()> {
        let guard = self.ztunnels().remove(node);
        let Some(mut guard) = guard else {
            bail!("no ztunnel running on {node}");
        };
        guard.kill()?;
        Ok(())
    }

    /// Replaces the node's ztunnel the way a rolling upgrade does today: SIGTERM the running
    /// one (its listeners, admin ports and config source stop at once; its established
    /// connections drain until `--drain-timeout`), start a new one as soon as the node's
    /// readiness port is free, and wait until the new one is ready. Returns the old process,
    /// still draining: the caller keeps it until it exits (dropping the guard kills it).
    /// New connections fail between the SIGTERM and the new agent's listeners (the restart
    /// gap, which a hitless upgrade closes).
    pub fn restart_ztunnel_draining(&self, node: &str) -> Result<ChildGuard> {
        let old = self
            .ztunnels()
            .remove(node)
            .with_context(|| format!("no ztunnel running on {node}"))?;
        old.signal(Signal::SIGTERM)?;
        wait_until(
            &format!("the draining ztunnel on {node} to close its readiness port"),
            STOP_GRACE,
            || {
                Ok(self
                    .node_http(node, READINESS_PORT, "GET", "/healthz/ready")
                    .is_err())
            },
        )?;
        self.start_ztunnel(node)?;
        Ok(old)
    }

    /// Sends `signal` to the node's ztunnel (e.g. SIGTERM to test draining) without
    /// forgetting it: [`Mesh::ztunnel_pid`] turns `None` once it has exited.
    pub fn signal_ztunnel(&self, node: &str, signal: Signal) -> Result<()> {
        let ztunnels = self.ztunnels();
        let guard = ztunnels
            .get(node)
            .with_context(|| format!("no ztunnel running on {node}"))?;
        guard.signal(signal)
    }

    /// The pid of the node's ztunnel, if it runs.
    pub fn ztunnel_pid(&self, node: &str) -> Option<u32> {
        let mut ztunnels = self.ztunnels();
        let guard = ztunnels.get_mut(node)?;
        guard.is_running().then(|| guard.pid())
    }

    /// Everything the node's ztunnel has logged (stdout and stderr, across restarts).
    pub fn ztunnel_log(&self, node: &str) -> String {
        std::fs::read(self.ztunnel_log_path(node))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Waits until `GET /healthz/ready` on the node answers 200; fails early, quoting the
    /// log, if the ztunnel exits.
    pub fn wait_ready(&self, node: &str) -> Result<()> {
        let mut exited = None;
        let result = wait_until(
            &format!("ztunnel on {node} to report ready"),
            self.spec.ready_timeout,
            || {
                let mut ztunnels = self.ztunnels();
                let Some(guard) = ztunnels.get_mut(node) else {
                    exited = Some("it was never started or was stopped".to_owned());
                    return Ok(true);
                };
                if let Some(status) = guard.wait_timeout(Duration::ZERO)? {
                    // Waiting on would only burn the timeout: fail now.
                    exited = Some(format!("it exited ({status})"));
                    return Ok(true);
                }
                drop(ztunnels);
                let response = self.node_http(node, READINESS_PORT, "GET", "/healthz/ready")?;
                Ok(response.status == 200)
            },
        );
        let result = match exited {
            Some(why) => Err(anyhow!("ztunnel on {node} is not running: {why}")),
            None => result,
        };
        result.with_context(|| {
            format!(
                "ztunnel on {node} did not become ready; last lines of its log:\n{}",
                tail(&self.ztunnel_log(node), LOG_TAIL_LINES)
            )
        })
    }

    /// The status of the node's `GET /healthz/ready` (200 ready, 503 not yet).
    pub fn readiness_status(&self, node: &str) -> Result<u16> {
        Ok(self
            .node_http(node, READINESS_PORT, "GET", "/healthz/ready")?
            .status)
    }

    /// Waits until the node's `/healthz/ready` answers at all (ready or not); fails early if
    /// the ztunnel exits.
    pub fn wait_answering(&self, node: &str) -> Result<()> {
        wait_until(
            &format!("ztunnel on {node} to answer on its readiness port"),
            self.spec.ready_timeout,
            || {
                let mut ztunnels = self.ztunnels();
                let guard = ztunnels
                    .get_mut(node)
                    .with_context(|| format!("no ztunnel on {node}"))?;
                if let Some(status) = guard.wait_timeout(Duration::ZERO)? {
                    bail!("ztunnel on {node} exited ({status})");
                }
                drop(ztunnels);
                Ok(self
                    .node_http(node, READINESS_PORT, "GET", "/healthz/ready")
                    .is_ok())
            },
        )
        .with_context(|| tail(&self.ztunnel_log(node), LOG_TAIL_LINES))
    }

    /// The node's Prometheus metrics text (`:15020/metrics`); read it with [`crate::prom`].
    pub fn metrics(&self, node: &str) -> Result<String> {
        self.node_http_ok(node, METRICS_PORT, "GET", "/metrics")
    }

    /// `GET` on the node's metrics port (`:15020`): `/metrics`, the node dashboard's
    /// `/dashboard` page and its `/stats` JSON. The whole response, whatever its status.
    pub fn metrics_port_get(&self, node: &str, path: &str) -> Result<HttpResponse> {
        self.node_http(node, METRICS_PORT, "GET", path)
    }

    /// `GET` on the node's admin endpoint (`127.0.0.1:15000`), e.g. `/config_dump`.
    pub fn admin(&self, node: &str, path: &str) -> Result<String> {
        self.node_http_ok(node, ADMIN_PORT, "GET", path)
    }

    /// `POST` on the node's admin endpoint, e.g. `/logging?level=debug`.
    pub fn admin_post(&self, node: &str, path: &str) -> Result<String> {
        self.node_http_ok(node, ADMIN_PORT, "POST", path)
    }

    // === capture ===

    /// Starts capturing on the bridge between the nodes. Every packet between two nodes
    /// crosses it; nothing else does.
    pub fn capture_wire(&self) -> Result<Capture> {
        let first = self
            .plan
            .nodes
            .first()
            .context("a mesh has at least one node")?;
        Capture::start(
            &self.wire_netns(),
            BRIDGE,
            &self.prefix,
            &self.log_dir(),
            BRIDGE_IP,
            SocketAddrV4::new(first.wire_ip, 9),
        )
    }

    // === teardown ===

    fn report_failure(&self) {
        eprintln!(
            "e2e: test {} failed; mesh prefix {}, work dir {}",
            self.test_name,
            self.prefix,
            self.work_path.display()
        );
        for node in self.plan.nodes.iter().filter(|n| n.ztunnel) {
            eprintln!(
                "e2e: ---- ztunnel log of {} (last {LOG_TAIL_LINES} lines) ----\n{}",
                node.name,
                tail(&self.ztunnel_log(&node.name), LOG_TAIL_LINES)
            );
        }
        if self.spec.ca_mode == CaMode::Service {
            eprintln!(
                "e2e: ---- CA (control) log (last {LOG_TAIL_LINES} lines) ----\n{}",
                tail(&self.control_log(), LOG_TAIL_LINES)
            );
        }
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        if panicking {
            self.report_failure();
        }
        // Killing the ztunnels first stops them from reacting to the namespaces vanishing.
        let ztunnels = std::mem::take(&mut *self.ztunnels());
        drop(ztunnels);
        drop(self.control_guard().take());
        // After the agents: unmounting releases every pin they left (and so their programs).
        drop(self.bpffs.take());
        if let Err(e) = netns::cleanup_stale(&self.prefix) {
            eprintln!("e2e: cleaning up mesh {}: {e:#}", self.prefix);
        }
        if panicking && std::env::var_os("E2E_KEEP").is_some() {
            if let Some(dir) = self.work_dir.take() {
                let kept = dir.keep();
                eprintln!("e2e: kept work dir {}", kept.display());
            }
        }
    }
}

/// A prefix no existing namespace uses: `mt` + 6 hex digits of a hash of the test name, the
/// process and a counter, + `-`.
fn unique_prefix(test_name: &str) -> Result<String> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    for _ in 0..16 {
        let mut hasher = DefaultHasher::new();
        test_name.hash(&mut hasher);
        std::process::id().hash(&mut hasher);
        COUNTER.fetch_add(1, Ordering::Relaxed).hash(&mut hasher);
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default()
            .hash(&mut hasher);
        let prefix = format!("{PREFIX_HEAD}{:06x}-", hasher.finish() & 0xff_ffff);
        if netns::list(&prefix)?.is_empty() {
            return Ok(prefix);
        }
    }
    bail!("no free netns prefix for {test_name} after 16 tries")
}

/// Runs a command with a time limit, killing its process group when the limit passes.
fn run_bounded(mut cmd: Command, timeout: Duration) -> Result<Output> {
    let line = command_line(&cmd);
    cmd.process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = cmd.spawn().with_context(|| format!("spawn `{line}`"))?;
    let pgid = Pid::from_raw(i32::try_from(child.id()).context("pid out of range")?);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        // The receiver only goes away after a timeout, when nobody wants the output.
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(timeout) {
        Ok(output) => output.with_context(|| format!("wait for `{line}`")),
        Err(_) => {
            let _ = killpg(pgid, Signal::SIGKILL);
            let _ = rx.recv_timeout(Duration::from_secs(5));
            bail!("`{line}` did not finish within {timeout:?}; killed")
        }
    }
}

pub(crate) fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

const BLACKHOLE_TABLE: &str = "e2e_blackhole";

/// A pod cut off from the network by [`Mesh::blackhole`]; dropping it lets packets through
/// again.
pub struct Blackhole<'a> {
    mesh: &'a Mesh,
    pod: &'static str,
}

impl Drop for Blackhole<'_> {
    fn drop(&mut self) {
        let table = format!("delete table inet {BLACKHOLE_TABLE}");
        if let Err(e) = self.mesh.exec_ok(self.pod, &["nft", &table]) {
            eprintln!("remove the blackhole in {}: {e:#}", self.pod);
        }
    }
}
