//! The measuring run: builds the worlds (harness meshes) every data path lives in, starts the
//! servers and the baseline proxies, runs every measure on every path with repetitions
//! interleaved across paths, and returns the [`Results`].
//!
//! Worlds, all up at once (each a harness mesh with its own prefix, so nothing is shared):
//! - `plain`: two bare nodes (no ztunnel); holds **direct** (client → server pod IP), the
//!   **haproxy** pair (client → node 1's wire address, where haproxy listens on the
//!   application ports) and **nginx** (client → node 1:8081);
//! - `nftables` and `ebpf`: two nodes running the release `ztunnel` with that redirection
//!   backend, the server pod STRICT; the client reaches the server pod IP and is captured.
//!   Extra pods declared `unlisted` are enrolled one by one to time first connections.
//!   The eBPF world also holds the two L7 paths: the **waypoint** (a Service that uses the
//!   waypoint pod on n2) and the **ingress** gateway (Gateway `istio-ingress/ingress` of
//!   class `istio`, its pod on n1 in a namespace outside the mesh, an HTTPRoute to the
//!   server's Service, reached from `outside/client` on n1, a pod no agent captures).
//!
//! Every world's server pod runs iperf3 (5201), nginx `return 200` (HTTP/1.1 on 8080, h2c on
//! 8082) and mesh-echo in raw mode (9000). The eBPF world's waypoint Service declares both
//! HTTP ports (`http` and `http2`), so the waypoint speaks HTTP/2 upstream on the second.
//! Every guard (meshes, processes, the bpffs mount) is dropped on error and on Ctrl-C
//! ([`Stop`]), which removes what it created.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use super::baselines::{self, TunnelPki};
use super::load::{self, FixedRate};
use super::machine;
use super::model::{DataPath, Meta, Metric, Quantile, Results, Side};
use super::pki;
use super::procstat::{group_usage, Usage};
use super::report::{FIXED_RATES, H2_STREAMS, SATURATION_CONNS, STREAMS};
use super::signals::Stop;
use super::sizes::SizePlan;
use super::stats::percentiles_us;
use super::tools::{parse_h2load, parse_iperf3, parse_wrk};
use crate::waypoint::{gateway_yaml, http_service, waypoint_pod};
use crate::{in_netns, wait_until, Ambient, ChildGuard, Mesh, MeshBuilder, Pod, Redirect, Service};

pub(super) const CLIENT: &str = "default/client";
/// The ingress path's client: a pod on n1 in a namespace outside the mesh.
const OUTSIDE_NS: &str = "outside";
const OUTSIDE_CLIENT: &str = "outside/client";
const WAYPOINT: &str = "default/waypoint";
/// The ingress gateway: Gateway `<INGRESS_NS>/<INGRESS_GATEWAY>` (class `istio`), served by
/// the `waypoint` binary in its pod [`INGRESS_POD`] (service account named after it) on n1.
const INGRESS_NS: &str = "istio-ingress";
const INGRESS_GATEWAY: &str = "ingress";
const INGRESS_POD: &str = "istio-ingress/ingress";
/// The gateway's HTTP listener, on its pod's address.
const INGRESS_PORT: u16 = 80;
/// The server's own Service (no waypoint), the ingress route's backend: its VIP and port.
const SERVER_SERVICE: &str = "server";
const SERVER_VIP: &str = "10.96.0.51";
const SERVER_SERVICE_PORT: u16 = 80;
/// The VIP of the Service that uses the waypoint, its HTTP/1.1 port and its HTTP/2 port.
const WAYPOINT_VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const WAYPOINT_PORT: u16 = 80;
const WAYPOINT_H2_PORT: u16 = 82;
const SERVER: &str = "default/server";
const IPERF_PORT: u16 = 5201;
pub(super) const HTTP_PORT: u16 = 8080;
/// The origin's h2c (HTTP/2 prior knowledge) port.
const H2C_PORT: u16 = 8082;
const ECHO_PORT: u16 = 9000;
/// Where the nginx L7 baseline listens on node 1.
const L7_PORT: u16 = 8081;
/// Ports the haproxy pair tunnels.
const TUNNELED_PORTS: [u16; 3] = [IPERF_PORT, HTTP_PORT, ECHO_PORT];
/// Threads of the connection-rate client and of the idle-connection opener.
pub(super) const CONN_WORKERS: usize = 4;
const IDLE_WORKERS: usize = 8;
/// File-descriptor limit wanted for this process and its children (proxies, servers); a
/// container may cap the hard limit lower, and then everything is sized to what it allows.
const NOFILE: u64 = 200_000;
/// Descriptors a process needs besides its connections.
const FD_RESERVE: u64 = 500;
/// Bound on a server or proxy becoming ready.
const READY: Duration = Duration::from_secs(15);
/// How long enrollment may take before the first connection is declared failed.
const ENROLL_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between first-connection attempts.
const ENROLL_RETRY: Duration = Duration::from_millis(5);
/// Bound on one first-connection attempt.
const ENROLL_ATTEMPT: Duration = Duration::from_millis(2_000);
/// Most first-connection attempts in flight at once.
const ENROLL_IN_FLIGHT: usize = 64;
/// As many attempts in flight as can be: a new one every [`ENROLL_RETRY`] however long the
/// others wait.
pub(super) const EVERY_ATTEMPT: usize =
    (ENROLL_ATTEMPT.as_millis() / ENROLL_RETRY.as_millis()) as usize + 1;
/// How long closed idle connections may take to be released by the proxies.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(20);
/// Settling time before memory is sampled.
pub(super) const SETTLE: Duration = Duration::from_secs(1);
/// Memory "after close" is sampled no sooner than this after the idle connections close
/// (issue 15: RSS back near idle 15 s after a burst).
const AFTER_CLOSE: Duration = Duration::from_secs(15);
pub(super) const MIB: f64 = 1024.0 * 1024.0;

const STRICT_YAML: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
metadata:\n  name: default\n  namespace: default\nspec:\n  mtls:\n    mode: STRICT\n";

/// What to run and where to write.
#[derive(Clone, Debug)]
pub struct Options {
    pub quick: bool,
    /// The git work tree whose commit the report names.
    pub repo: PathBuf,
}

/// Sizes of a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Plan {
    pub reps: usize,
    /// Seconds per throughput / HTTP run (whole seconds: iperf3 and wrk take those).
    pub run_secs: u64,
    /// Requests due in this first part of a fixed-rate run are not counted.
    pub warmup: Duration,
    pub idle_connections: usize,
    /// Freshly enrolled pods timed per ztunnel world.
    pub fresh_pods: usize,
}

impl Plan {
    /// `--quick`: under 4 minutes of measuring, for development.
    pub const QUICK: Plan = Plan {
        reps: 3,
        run_secs: 1,
        warmup: Duration::from_millis(200),
        idle_connections: 10_000,
        fresh_pods: 3,
    };
    /// The full run: under 20 minutes.
    pub const FULL: Plan = Plan {
        reps: 4,
        run_secs: 5,
        warmup: Duration::from_millis(500),
        idle_connections: 10_000,
        fresh_pods: 5,
    };

    pub fn of(quick: bool) -> Plan {
        if quick {
            Plan::QUICK
        } else {
            Plan::FULL
        }
    }

    fn run(&self) -> Duration {
        Duration::from_secs(self.run_secs)
    }
}

// === worlds ===

/// One harness mesh with its servers and proxies. Fields drop in order: processes, then
/// the mesh (namespaces, and the nodes' bpffs for eBPF).
pub(super) struct World {
    name: &'static str,
    children: Vec<ChildGuard>,
    haproxy: Option<(u32, u32)>,
    nginx: Option<u32>,
    /// The waypoint's pid (the eBPF world runs one for the L7 path).
    waypoint: Option<u32>,
    /// The ingress gateway's pid (the eBPF world runs one for the ingress path).
    ingress: Option<u32>,
    fresh: Vec<String>,
    mesh: Mesh,
}

impl World {
    /// The bare world: direct, haproxy pair, nginx proxy.
    fn plain(stop: &Stop, nofile: u64) -> Result<World> {
        let mesh = Mesh::builder("bench-plain")
            .node("n1")
            .node("n2")
            .without_ztunnel()
            .namespace("default", Ambient::No)
            .pod(Pod::new("default", "client").on("n1"))
            .pod(Pod::new("default", "server").on("n2"))
            .build()
            .context("build the plain topology")?;
        let mut world = World {
            name: "plain",
            children: Vec::new(),
            haproxy: None,
            nginx: None,
            waypoint: None,
            ingress: None,
            fresh: Vec::new(),
            mesh,
        };
        // The kubelet-probe SNAT exists for enrolled pods; the baselines' upstream hops to
        // the server pod should not pay a NAT.
        for node in ["n1", "n2"] {
            let out = world
                .mesh
                .exec_node(node, &["nft", "delete", "table", "ip", "kubelet"])?;
            if !out.status.success() {
                bail!(
                    "remove the probe SNAT on {node}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
        }
        world.tune()?;
        world.start_servers(nofile)?;
        stop.check()?;
        world.start_haproxy(haproxy_maxconn(nofile))?;
        world.start_nginx_proxy(nofile)?;
        Ok(world)
    }

    /// A world running ztunnel with redirection `backend` (`nftables` or `ebpf`).
    fn ztunnel(backend: Redirect, fresh_pods: usize, nofile: u64) -> Result<World> {
        let name = backend.as_str();
        let mut builder = measured_pair(&format!("bench-{name}"));
        // The memory measure holds its idle connections from one pod, past the agents'
        // default per-pod cap (4 Ki): the caps are raised to what the descriptors allow, so
        // that the run measures what connections cost, not where they are refused.
        let cap = conns_for(nofile, 1).to_string();
        builder = builder
            .ztunnel_env("ZTUNNEL_MAX_CONNECTIONS_PER_POD", &cap)
            .ztunnel_env("ZTUNNEL_MAX_CONNECTIONS", &cap);
        if backend == Redirect::Ebpf {
            // The L7 path: the same server behind a Service that uses a waypoint on n2.
            builder = builder
                .pod(waypoint_pod("default", "waypoint", "n2"))
                .service(
                    Service::new("default", "server-l7")
                        .vip(&WAYPOINT_VIP.to_string())
                        .named_port("http", WAYPOINT_PORT, HTTP_PORT)
                        .named_port("http2", WAYPOINT_H2_PORT, H2C_PORT)
                        .selector([("app", "server")])
                        .labels([("istio.io/use-waypoint", "waypoint")]),
                )
                .yaml(
                    "waypoint.yaml",
                    &gateway_yaml("default", "waypoint", "service"),
                )
                // The ingress path: the gateway and its client, both outside the mesh, and
                // the server's own Service for the route.
                .namespace(INGRESS_NS, Ambient::No)
                .namespace(OUTSIDE_NS, Ambient::No)
                .pod(waypoint_pod(INGRESS_NS, INGRESS_GATEWAY, "n1"))
                .pod(Pod::new(OUTSIDE_NS, "client").on("n1"))
                .service(http_service(SERVER_SERVICE, SERVER_VIP, ("app", "server")))
                .yaml("ingress.yaml", &ingress_yaml());
        }
        let fresh: Vec<String> = (1..=fresh_pods).map(|i| format!("fresh-{i}")).collect();
        for name in &fresh {
            builder = builder.pod(Pod::new("default", name).on("n1").unlisted());
        }
        // The harness gives the eBPF world its nodes' bpffs (outliving agent restarts).
        let mut world = World::started(name, builder.redirect(backend), fresh, nofile)?;
        if backend == Redirect::Ebpf {
            let guard = world
                .mesh
                .spawn_waypoint(WAYPOINT, "default", "waypoint", "waypoint")?;
            world.waypoint = Some(guard.pid());
            world.children.push(guard);
            let addr = SocketAddr::from((WAYPOINT_VIP, WAYPOINT_PORT));
            world.wait_http_from(CLIENT, addr, "the waypoint to carry client → server")?;
            // The same binary serves the Gateway as an ingress: its class says so.
            let guard = world.mesh.spawn_waypoint(
                INGRESS_POD,
                INGRESS_NS,
                INGRESS_GATEWAY,
                INGRESS_GATEWAY,
            )?;
            world.ingress = Some(guard.pid());
            world.children.push(guard);
            let addr = SocketAddr::from((world.mesh.pod_ip(INGRESS_POD)?, INGRESS_PORT));
            world.wait_http_from(
                OUTSIDE_CLIENT,
                addr,
                "the ingress gateway to carry outside client → server",
            )?;
        }
        // The client must reach the server through the mesh before anything is measured.
        let addr = SocketAddr::from((world.server_ip()?, HTTP_PORT));
        world.wait_http_from(
            CLIENT,
            addr,
            &format!("the {name} mesh to carry client → server"),
        )?;
        Ok(world)
    }

    /// A ztunnel world of the caller's topology ([`super::sizes`]), built, its namespaces
    /// tuned and its servers started.
    pub(super) fn custom(name: &'static str, builder: MeshBuilder, nofile: u64) -> Result<World> {
        World::started(name, builder, Vec::new(), nofile)
    }

    /// `builder`'s mesh built, its namespaces tuned and its servers started; `fresh` are
    /// its pods left for the enrollment measure.
    fn started(
        name: &'static str,
        builder: MeshBuilder,
        fresh: Vec<String>,
        nofile: u64,
    ) -> Result<World> {
        let mesh = builder
            .build()
            .with_context(|| format!("build the {name} topology"))?;
        let mut world = World {
            name,
            children: Vec::new(),
            haproxy: None,
            nginx: None,
            waypoint: None,
            ingress: None,
            fresh,
            mesh,
        };
        world.tune()?;
        world.start_servers(nofile)?;
        Ok(world)
    }

    pub(super) fn mesh(&self) -> &Mesh {
        &self.mesh
    }

    fn server_ip(&self) -> Result<Ipv4Addr> {
        self.mesh.pod_ip(SERVER)
    }

    /// The pid of the agent on `node`.
    fn ztunnel_pid(&self, node: &str) -> Result<u32> {
        self.mesh
            .ztunnel_pid(node)
            .with_context(|| format!("ztunnel on {node} ({}) is not running", self.name))
    }

    /// Many short connections from one address: a wide port range and reuse of TIME_WAIT
    /// ports, in every namespace of the world.
    fn tune(&self) -> Result<()> {
        let mut netns: Vec<String> = Vec::new();
        for pod in self.mesh.pods() {
            netns.push(self.mesh.pod_netns(&pod)?);
        }
        for node in self.mesh.nodes() {
            netns.push(self.mesh.node_netns(&node)?);
        }
        for ns in netns {
            in_netns(&ns, || -> Result<()> {
                for (key, value) in [
                    ("net/ipv4/ip_local_port_range", "1024 65000"),
                    ("net/ipv4/tcp_tw_reuse", "1"),
                    ("net/core/somaxconn", "8192"),
                ] {
                    let path = Path::new("/proc/sys").join(key);
                    std::fs::write(&path, value)
                        .with_context(|| format!("write {} = {value}", path.display()))?;
                }
                Ok(())
            })?
            .with_context(|| format!("tune netns {ns}"))?;
        }
        Ok(())
    }

    fn dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.mesh.work_dir().join(name);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        Ok(dir)
    }

    fn start_servers(&mut self, nofile: u64) -> Result<()> {
        let port = IPERF_PORT.to_string();
        let mut iperf = self
            .mesh
            .spawn(SERVER, &["iperf3", "-s", "-p", &port, "--forceflush"])?;
        iperf.wait_for_stdout("Server listening", READY)?;
        self.children.push(iperf);

        let dir = self.dir("nginx-origin")?;
        let conf = dir.join("nginx.conf");
        write(
            &conf,
            &baselines::nginx_origin(HTTP_PORT, H2C_PORT, &dir, conns_for(nofile, 1)),
        )?;
        let argv = nginx_argv(&dir, &conf);
        let nginx = self
            .mesh
            .spawn(SERVER, &argv.each_ref().map(String::as_str))?;
        self.children.push(nginx);
        let addr = SocketAddr::from((self.server_ip()?, HTTP_PORT));
        // From the server's own node: a probe, never captured.
        self.wait_http("n2", addr, "the nginx origin")?;

        let echo = self.mesh.spawn_echo(SERVER, ECHO_PORT, "bench")?;
        self.children.push(echo);
        Ok(())
    }

    fn start_haproxy(&mut self, maxconn: u32) -> Result<()> {
        let dir = self.dir("haproxy")?;
        let n2 = self.mesh.node_ip("n2")?;
        let files = pki::write_tunnel_pki(&dir, n2)?;
        let tunnel = TunnelPki {
            ca: &files.ca,
            client_crt: &files.client,
            server_crt: &files.server,
        };
        let server_conf = dir.join("server-side.cfg");
        write(
            &server_conf,
            &baselines::haproxy_server_side(
                &TUNNELED_PORTS,
                n2,
                self.server_ip()?,
                tunnel,
                maxconn,
            ),
        )?;
        let client_conf = dir.join("client-side.cfg");
        write(
            &client_conf,
            &baselines::haproxy_client_side(&TUNNELED_PORTS, n2, tunnel, maxconn),
        )?;
        let b = self
            .mesh
            .spawn_node("n2", &["haproxy", "-db", "-f", &path_str(&server_conf)])?;
        let a = self
            .mesh
            .spawn_node("n1", &["haproxy", "-db", "-f", &path_str(&client_conf)])?;
        self.haproxy = Some((a.pid(), b.pid()));
        self.children.push(a);
        self.children.push(b);
        // End to end through both: one echoed byte from the client pod.
        let target = SocketAddr::from((self.mesh.node_ip("n1")?, ECHO_PORT));
        let netns = self.mesh.pod_netns(CLIENT)?;
        wait_until("the haproxy tunnel to echo", READY, || {
            Ok(load::open_idle(&netns, target, 1, 1).is_ok())
        })
        .with_context(|| {
            format!(
                "haproxy did not come up; see the logs in {}",
                self.mesh.work_dir().join("logs").display()
            )
        })?;
        Ok(())
    }

    fn start_nginx_proxy(&mut self, nofile: u64) -> Result<()> {
        let dir = self.dir("nginx-l7")?;
        let conf = dir.join("nginx.conf");
        let upstream = SocketAddrV4::new(self.server_ip()?, HTTP_PORT);
        write(
            &conf,
            &baselines::nginx_proxy(L7_PORT, upstream, &dir, conns_for(nofile, 2)),
        )?;
        let argv = nginx_argv(&dir, &conf);
        let nginx = self
            .mesh
            .spawn_node("n1", &argv.each_ref().map(String::as_str))?;
        self.nginx = Some(nginx.pid());
        self.children.push(nginx);
        let addr = SocketAddr::from((self.mesh.node_ip("n1")?, L7_PORT));
        self.wait_http_from(CLIENT, addr, "the nginx proxy to answer")
    }

    /// Waits for `addr` to answer an HTTP request from node `node`'s namespace.
    fn wait_http(&self, node: &str, addr: SocketAddr, what: &str) -> Result<()> {
        wait_answered(
            &self.mesh.node_netns(node)?,
            addr,
            &format!("{what} to answer"),
        )
    }

    /// Waits for `addr` to answer an HTTP request from pod `pod`.
    fn wait_http_from(&self, pod: &str, addr: SocketAddr, what: &str) -> Result<()> {
        wait_answered(&self.mesh.pod_netns(pod)?, addr, what)
    }
}

/// Waits (up to [`READY`]) for `addr` to answer a request sent from `netns`.
fn wait_answered(netns: &str, addr: SocketAddr, what: &str) -> Result<()> {
    wait_until(what, READY, || {
        Ok(in_netns(netns, || load::try_request(addr, ENROLL_ATTEMPT))?.is_some())
    })
}

/// The ingress path's config: Gateway `istio-ingress/ingress` of class `istio` with one
/// HTTP listener for any host, and an HTTPRoute attached to it that sends every request to
/// the server's Service.
fn ingress_yaml() -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: {INGRESS_GATEWAY}, namespace: {INGRESS_NS}}}
spec:
  gatewayClassName: istio
  listeners:
  - {{name: http, port: {INGRESS_PORT}, protocol: HTTP, allowedRoutes: {{namespaces: {{from: All}}}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {SERVER_SERVICE}, namespace: default}}
spec:
  parentRefs: [{{name: {INGRESS_GATEWAY}, namespace: {INGRESS_NS}}}]
  rules:
  - backendRefs: [{{name: {SERVER_SERVICE}, port: {SERVER_SERVICE_PORT}}}]
"#
    )
}

/// The measured pair every ztunnel world has: `default/client` on n1 (the harness's
/// `two_nodes`), `default/server` (`app: server`) on n2, both in the mesh, the server STRICT.
pub(super) fn measured_pair(prefix: &str) -> MeshBuilder {
    Mesh::two_nodes(prefix)
        .pod(
            Pod::new("default", "server")
                .on("n2")
                .service_account("server")
                .labels([("app", "server")]),
        )
        .yaml("peerauthn.yaml", STRICT_YAML)
}

/// Connections a process may hold with `fds_per_conn` descriptors each under `nofile`.
fn conns_for(nofile: u64, fds_per_conn: u64) -> u32 {
    u32::try_from(nofile.saturating_sub(FD_RESERVE) / fds_per_conn).unwrap_or(u32::MAX)
}

/// haproxy holds two descriptors per tunneled connection.
fn haproxy_maxconn(nofile: u64) -> u32 {
    conns_for(nofile, 2)
}

/// Idle connections the memory test can hold on `path`: the plan's, unless the
/// descriptor limit is lower (haproxy needs two per connection, ztunnel and the client one).
fn idle_connections(plan: usize, path: DataPath, nofile: u64) -> usize {
    let cap = match path {
        DataPath::HaproxyTls => haproxy_maxconn(nofile).saturating_sub(100),
        _ => conns_for(nofile, 1).saturating_sub(100),
    };
    plan.min(cap as usize)
}

fn nginx_argv(dir: &Path, conf: &Path) -> [String; 5] {
    [
        "nginx".to_owned(),
        "-p".to_owned(),
        path_str(dir),
        "-c".to_owned(),
        path_str(conf),
    ]
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

fn write(path: &Path, content: &str) -> Result<()> {
    std::fs::write(path, content).with_context(|| format!("write {}", path.display()))
}

/// Where a data path's traffic goes and which processes carry it.
struct Route<'w> {
    world: &'w World,
    /// The pod the load comes from.
    client: &'static str,
    /// The address the client connects to (the server pod, or the proxy in front of it).
    host: Ipv4Addr,
    http_port: u16,
    /// Where the same origin speaks h2c, on paths that carry HTTP/2 to it.
    h2c: Option<SocketAddr>,
    proxies: Vec<(Side, u32)>,
}

impl Route<'_> {
    fn client_netns(&self) -> Result<String> {
        self.world.mesh.pod_netns(self.client)
    }

    fn addr(&self, port: u16) -> SocketAddr {
        SocketAddr::from((self.host, port))
    }

    fn http(&self) -> SocketAddr {
        self.addr(self.http_port)
    }

    fn usage(&self) -> Result<Vec<(Side, Usage)>> {
        self.proxies
            .iter()
            .map(|&(side, pgid)| Ok((side, group_usage(pgid)?)))
            .collect()
    }
}

/// CPU seconds per side between two snapshots.
fn cpu_delta(before: &[(Side, Usage)], after: &[(Side, Usage)]) -> Vec<(Side, f64)> {
    before
        .iter()
        .zip(after)
        .map(|((side, b), (_, a))| (*side, a.cpu_seconds - b.cpu_seconds))
        .collect()
}

struct Worlds {
    plain: World,
    nftables: Option<World>,
    ebpf: Option<World>,
}

impl Worlds {
    fn route(&self, path: DataPath) -> Result<Option<Route<'_>>> {
        let plain = &self.plain;
        Ok(match path {
            DataPath::Direct => Some(Route {
                world: plain,
                client: CLIENT,
                host: plain.server_ip()?,
                http_port: HTTP_PORT,
                h2c: None,
                proxies: Vec::new(),
            }),
            DataPath::HaproxyTls => plain
                .haproxy
                .map(|(a, b)| -> Result<Route<'_>> {
                    Ok(Route {
                        world: plain,
                        client: CLIENT,
                        host: plain.mesh.node_ip("n1")?,
                        http_port: HTTP_PORT,
                        h2c: None,
                        proxies: vec![(Side::Client, a), (Side::Server, b)],
                    })
                })
                .transpose()?,
            DataPath::NginxHttp => plain
                .nginx
                .map(|pid| -> Result<Route<'_>> {
                    Ok(Route {
                        world: plain,
                        client: CLIENT,
                        host: plain.mesh.node_ip("n1")?,
                        http_port: L7_PORT,
                        h2c: None,
                        proxies: vec![(Side::Client, pid)],
                    })
                })
                .transpose()?,
            DataPath::ZtunnelNftables => self.nftables.as_ref().map(ztunnel_route).transpose()?,
            DataPath::ZtunnelEbpf => self.ebpf.as_ref().map(ztunnel_route).transpose()?,
            DataPath::Waypoint => self
                .ebpf
                .as_ref()
                .map(waypoint_route)
                .transpose()?
                .flatten(),
            DataPath::Ingress => self.ebpf.as_ref().map(ingress_route).transpose()?.flatten(),
        })
    }
}

/// client → ztunnel (n1) → waypoint (n2) → ztunnel (n2) → server, by the Service's VIP; the
/// waypoint's CPU and memory are its own ([`Side::Waypoint`]). `None` when the world runs none.
fn waypoint_route(w: &World) -> Result<Option<Route<'_>>> {
    let Some(waypoint) = w.waypoint else {
        return Ok(None);
    };
    let mut route = ztunnel_route(w)?;
    route.host = WAYPOINT_VIP;
    route.http_port = WAYPOINT_PORT;
    route.h2c = Some(SocketAddr::from((WAYPOINT_VIP, WAYPOINT_H2_PORT)));
    route.proxies.push((Side::Waypoint, waypoint));
    Ok(Some(route))
}

/// outside client → ingress gateway (n1) → HBONE → ztunnel (n2) → server, by the gateway
/// pod's address. Its processes: the gateway ([`Side::Ingress`]) and node 2's agent
/// ([`Side::Server`]); node 1's agent carries none of it. `None` when the world runs none.
fn ingress_route(w: &World) -> Result<Option<Route<'_>>> {
    let Some(gateway) = w.ingress else {
        return Ok(None);
    };
    let n2 = w.ztunnel_pid("n2")?;
    Ok(Some(Route {
        world: w,
        client: OUTSIDE_CLIENT,
        host: w.mesh.pod_ip(INGRESS_POD)?,
        http_port: INGRESS_PORT,
        h2c: None,
        proxies: vec![(Side::Ingress, gateway), (Side::Server, n2)],
    }))
}

fn ztunnel_route(w: &World) -> Result<Route<'_>> {
    Ok(Route {
        world: w,
        client: CLIENT,
        host: w.server_ip()?,
        http_port: HTTP_PORT,
        // The HTTP/2 measure compares the waypoint with the L4 path under it: it runs in
        // the world that has both.
        h2c: w
            .waypoint
            .map(|_| -> Result<SocketAddr> { Ok(SocketAddr::from((w.server_ip()?, H2C_PORT))) })
            .transpose()?,
        proxies: vec![
            (Side::Client, w.ztunnel_pid("n1")?),
            (Side::Server, w.ztunnel_pid("n2")?),
        ],
    })
}

// === the run ===

/// When the run started, for the progress lines.
static STARTED: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

/// Progress on stderr, with the seconds since the start.
macro_rules! say {
    ($($arg:tt)*) => {
        eprintln!(
            "mesh-bench [{:5.1}s] {}",
            STARTED.get_or_init(Instant::now).elapsed().as_secs_f64(),
            format!($($arg)*)
        )
    };
}

/// Runs everything; returns what was measured. Paths that cannot be set up (e.g. no eBPF on
/// this kernel) are skipped with a note; measures that fail on one path are noted and the
/// rest goes on.
pub fn run(opts: &Options, stop: &Stop) -> Result<Results> {
    let plan = Plan::of(opts.quick);
    let started = *STARTED.get_or_init(Instant::now);
    let nofile = raise_nofile()?;
    let mut results = Results {
        meta: Meta {
            machine: machine::describe(),
            date: now_rfc3339(),
            commit: machine::commit(&opts.repo),
            quick: opts.quick,
            reps: plan.reps,
            run_secs: plan.run_secs as f64,
            idle_connections: plan.idle_connections,
            tools: tool_versions(),
            notes: Vec::new(),
        },
        samples: Vec::new(),
    };

    say!("building the plain world (direct, haproxy, nginx)");
    let plain = World::plain(stop, nofile)?;
    stop.check()?;
    say!("building the ztunnel world (nftables)");
    let nftables = World::ztunnel(Redirect::Nftables, plan.fresh_pods, nofile)?;
    stop.check()?;
    say!("building the ztunnel world (eBPF)");
    let ebpf = match World::ztunnel(Redirect::Ebpf, plan.fresh_pods, nofile) {
        Ok(w) => Some(w),
        Err(e) => {
            say!("eBPF world unavailable: {e:#}");
            results.meta.notes.push(format!(
                "ztunnel with eBPF redirection was not measured: {e:#}"
            ));
            None
        }
    };
    stop.check()?;
    let worlds = Worlds {
        plain,
        nftables: Some(nftables),
        ebpf,
    };
    say!("worlds up after {:.1} s", started.elapsed().as_secs_f64());

    let mut runner = Runner {
        worlds: &worlds,
        plan,
        nofile,
        stop,
        results: &mut results,
    };
    runner.start_memory()?;
    for rep in 0..plan.reps {
        say!("repetition {}/{}", rep + 1, plan.reps);
        runner.repetition(rep)?;
    }
    runner.memory()?;
    runner.enrollment()?;
    drop(worlds);
    // One world per model size at a time, after the others are gone.
    super::sizes::measure(
        &mut results,
        &SizePlan::of(opts.quick),
        Redirect::Ebpf,
        nofile,
        stop,
    )?;
    say!("measured in {:.0} s", started.elapsed().as_secs_f64());
    Ok(results)
}

/// `mesh-bench --sizes-only`: only the model-size dimension, on `backend`.
pub fn sizes_only(quick: bool, backend: Redirect, repo: &Path, stop: &Stop) -> Result<Results> {
    let plan = SizePlan::of(quick);
    let nofile = raise_nofile()?;
    let mut results = Results {
        meta: Meta {
            machine: machine::describe(),
            date: now_rfc3339(),
            commit: machine::commit(repo),
            quick,
            reps: plan.reps,
            run_secs: plan.run_secs as f64,
            ..Meta::default()
        },
        samples: Vec::new(),
    };
    super::sizes::measure(&mut results, &plan, backend, nofile, stop)?;
    Ok(results)
}

/// A progress line (as [`say!`] prints them) for the other modules of the run.
pub(super) fn say_line(line: &str) {
    say!("{line}");
}

struct Runner<'a> {
    worlds: &'a Worlds,
    plan: Plan,
    nofile: u64,
    stop: &'a Stop,
    results: &'a mut Results,
}

impl Runner<'_> {
    /// Runs `f`, turning a failure into a note so the other paths and measures go on.
    fn attempt(&mut self, what: String, f: impl FnOnce(&mut Results) -> Result<()>) -> Result<()> {
        self.stop.check()?;
        if let Err(e) = f(self.results) {
            say!("{what}: {e:#}");
            self.results
                .meta
                .notes
                .push(format!("{what} failed: {e:#}"));
        }
        Ok(())
    }

    /// Every proxy's RSS before any traffic (the HTTP-only paths' too).
    fn start_memory(&mut self) -> Result<()> {
        for (path, route) in worlds_paths(self.worlds, false)? {
            record_rss(self.results, path, &route, |side| Metric::RssStart { side })?;
        }
        Ok(())
    }

    fn repetition(&mut self, rep: usize) -> Result<()> {
        let run = self.plan.run();
        let worlds = self.worlds;
        // Throughput, with CPU per GB over both stream counts.
        let mut cpu_gb: BTreeMap<(DataPath, Side), (f64, f64)> = BTreeMap::new();
        for streams in STREAMS {
            for (path, route) in worlds_paths(worlds, true)? {
                self.attempt(format!("{}: iperf3 -P {streams}", path.short()), |r| {
                    let before = route.usage()?;
                    let iperf = iperf3(&route, streams, run)?;
                    let after = route.usage()?;
                    r.record(path, Metric::Throughput { streams }, rep, iperf.1 / 1e9);
                    for (side, cpu) in cpu_delta(&before, &after) {
                        let acc = cpu_gb.entry((path, side)).or_default();
                        acc.0 += cpu;
                        acc.1 += iperf.0;
                    }
                    say!(
                        "  {} iperf3 -P {streams}: {:.2} Gbit/s",
                        path.short(),
                        iperf.1 / 1e9
                    );
                    Ok(())
                })?;
            }
        }
        for ((path, side), (cpu, bytes)) in cpu_gb {
            if bytes > 0.0 {
                self.results
                    .record(path, Metric::CpuPerGb { side }, rep, cpu / (bytes / 1e9));
            }
        }

        for (rate, conns) in FIXED_RATES {
            for (path, route) in worlds_paths(worlds, false)? {
                let warmup = self.plan.warmup;
                self.attempt(format!("{}: {rate} req/s", path.short()), |r| {
                    fixed_rate(r, path, &route, rep, rate, conns, run, warmup)
                })?;
            }
        }

        for conns in SATURATION_CONNS {
            for (path, route) in worlds_paths(worlds, false)? {
                self.attempt(format!("{}: wrk -c {conns}", path.short()), |r| {
                    let threads = conns.min(2);
                    let url = format!("http://{}/", route.http());
                    let argv = [
                        "wrk".to_owned(),
                        "-t".into(),
                        threads.to_string(),
                        "-c".into(),
                        conns.to_string(),
                        "-d".into(),
                        format!("{}s", run.as_secs()),
                        "--latency".into(),
                        "--timeout".into(),
                        "3s".into(),
                        url,
                    ];
                    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
                    let before = route.usage()?;
                    let out = route.world.mesh.exec_timeout(
                        route.client,
                        &argv,
                        run + Duration::from_secs(30),
                    )?;
                    let after = route.usage()?;
                    let text = String::from_utf8_lossy(&out.stdout);
                    let wrk = parse_wrk(&text).with_context(|| {
                        format!(
                            "wrk stderr: {}",
                            String::from_utf8_lossy(&out.stderr).trim()
                        )
                    })?;
                    if wrk.errors > 0 {
                        bail!("wrk reported {} errors", wrk.errors);
                    }
                    r.record(
                        path,
                        Metric::SaturationRate { conns },
                        rep,
                        wrk.requests_per_second,
                    );
                    if wrk.requests > 0.0 {
                        for (side, cpu) in cpu_delta(&before, &after) {
                            r.record(
                                path,
                                Metric::SaturationCpuPer10k { conns, side },
                                rep,
                                cpu / wrk.requests * 10_000.0,
                            );
                        }
                    }
                    for q in Quantile::ALL {
                        r.record(
                            path,
                            Metric::SaturationLatency { conns, q },
                            rep,
                            q.of(&wrk.latency),
                        );
                    }
                    say!(
                        "  {} wrk -c {conns}: {:.0} req/s",
                        path.short(),
                        wrk.requests_per_second
                    );
                    Ok(())
                })?;
            }
        }

        for (path, route) in worlds_paths(worlds, false)? {
            let Some(target) = route.h2c else { continue };
            let warmup = self.plan.warmup;
            self.attempt(
                format!("{}: h2load -c 1 -m {H2_STREAMS}", path.short()),
                |r| {
                    let rps = h2load(&route, target, run, warmup)?;
                    r.record(
                        path,
                        Metric::Http2Streams {
                            streams: H2_STREAMS,
                        },
                        rep,
                        rps,
                    );
                    say!(
                        "  {} h2load -c 1 -m {H2_STREAMS}: {rps:.0} req/s",
                        path.short()
                    );
                    Ok(())
                },
            )?;
        }

        for (path, route) in worlds_paths(worlds, false)? {
            self.attempt(format!("{}: connection rate", path.short()), |r| {
                let c =
                    load::connection_rate(&route.client_netns()?, route.http(), CONN_WORKERS, run)?;
                if c.completed == 0 {
                    bail!("no connection completed ({} errors)", c.errors);
                }
                r.record(path, Metric::ConnectionRate, rep, c.per_second());
                if c.errors > 0 {
                    r.meta.notes.push(format!(
                        "{}: connection rate, repetition {}: {} failed connections",
                        path.short(),
                        rep + 1,
                        c.errors
                    ));
                }
                say!("  {} connections: {:.0}/s", path.short(), c.per_second());
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Idle, loaded with idle connections, and after they close. The HTTP-only paths carry
    /// no raw TCP for idle connections: their proxies' idle RSS after the HTTP runs only.
    fn memory(&mut self) -> Result<()> {
        let worlds = self.worlds;
        std::thread::sleep(SETTLE);
        for (path, route) in worlds_paths(worlds, false)? {
            if path.carries_tcp() {
                continue;
            }
            self.attempt(format!("{}: idle RSS", path.short()), |r| {
                record_rss(r, path, &route, |side| Metric::RssIdle { side })
            })?;
        }
        for (path, route) in worlds_paths(worlds, true)? {
            if !path.has_proxy() {
                continue;
            }
            let n = idle_connections(self.plan.idle_connections, path, self.nofile);
            if n < self.plan.idle_connections {
                self.results.meta.notes.push(format!(
                    "{}: the open-file limit ({}) allows {n} idle connections, not {}",
                    path.short(),
                    self.nofile,
                    self.plan.idle_connections
                ));
            }
            self.attempt(format!("{}: {n} idle connections", path.short()), |r| {
                std::thread::sleep(SETTLE);
                let idle = route.usage()?;
                let t = Instant::now();
                let conns = load::open_idle(&route.client_netns()?, route.addr(ECHO_PORT), n, IDLE_WORKERS)?;
                let opened_in = t.elapsed();
                std::thread::sleep(SETTLE);
                let loaded = route.usage()?;
                drop(conns);
                let closed = Instant::now();
                r.record(path, Metric::IdleConnections, 0, n as f64);
                for ((side, i), (_, l)) in idle.iter().zip(&loaded) {
                    let side = *side;
                    r.record(path, Metric::RssIdle { side }, 0, i.rss_bytes as f64 / MIB);
                    r.record(path, Metric::RssLoaded { side }, 0, l.rss_bytes as f64 / MIB);
                    let per = (l.rss_bytes as f64 - i.rss_bytes as f64) / n as f64 / 1024.0;
                    r.record(path, Metric::BytesPerConnection { side }, 0, per);
                }
                // Released when every proxy is back to about its idle descriptor count; a
                // pool may keep a few upstream connections (ztunnel: one HBONE connection
                // per 100 streams, closed after 60 s idle), hence the slack.
                let slack = 64 + n / 20;
                let released = wait_until(
                    &format!("{} to release the idle connections", path.short()),
                    RELEASE_TIMEOUT,
                    || {
                        let now = route.usage()?;
                        Ok(now
                            .iter()
                            .zip(&idle)
                            .all(|((_, u), (_, i))| u.fds <= i.fds + slack))
                    },
                );
                std::thread::sleep(SETTLE);
                if let Some(left) = AFTER_CLOSE.checked_sub(closed.elapsed()) {
                    std::thread::sleep(left);
                }
                let after = route.usage()?;
                for (side, a) in &after {
                    r.record(path, Metric::RssAfterClose { side: *side }, 0, a.rss_bytes as f64 / MIB);
                }
                if let Err(e) = released {
                    let fds: Vec<String> = after.iter().map(|(s, u)| format!("{s:?} {} fds", u.fds)).collect();
                    r.meta.notes.push(format!(
                        "{}: the closed idle connections were not all released within {RELEASE_TIMEOUT:?} ({}): {e:#}",
                        path.short(),
                        fds.join(", ")
                    ));
                }
                say!(
                    "  {}: {n} idle connections opened in {:.1} s; {}",
                    path.short(),
                    opened_in.as_secs_f64(),
                    idle.iter()
                        .zip(&loaded)
                        .map(|((s, i), (_, l))| format!(
                            "{:?} {:.1} → {:.1} MiB",
                            s,
                            i.rss_bytes as f64 / MIB,
                            l.rss_bytes as f64 / MIB
                        ))
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Enrolls each world's fresh pods one by one and times their first connections.
    fn enrollment(&mut self) -> Result<()> {
        let worlds = self.worlds;
        for (path, world) in [
            (DataPath::ZtunnelEbpf, worlds.ebpf.as_ref()),
            (DataPath::ZtunnelNftables, worlds.nftables.as_ref()),
        ] {
            let Some(world) = world else { continue };
            for (rep, name) in world.fresh.iter().enumerate() {
                self.attempt(format!("{}: first connection of {name}", path.short()), |r| {
                    let (enroll, first, warm) = first_connection(world, name)?;
                    r.record(path, Metric::EnrollToFirstRequest, rep, ms(enroll));
                    r.record(path, Metric::FirstConnection, rep, ms(first));
                    r.record(path, Metric::WarmConnection, rep, ms(warm));
                    say!(
                        "  {} {name}: first request {:.0} ms after its YAML ({:.1} ms itself, warm {:.1} ms)",
                        path.short(),
                        ms(enroll),
                        ms(first),
                        ms(warm)
                    );
                    Ok(())
                })?;
            }
        }
        Ok(())
    }
}

/// The RSS of each of `route`'s proxies now, as `metric` of its side, in MiB.
fn record_rss(
    r: &mut Results,
    path: DataPath,
    route: &Route<'_>,
    metric: fn(Side) -> Metric,
) -> Result<()> {
    for (side, usage) in route.usage()? {
        r.record(path, metric(side), 0, usage.rss_bytes as f64 / MIB);
    }
    Ok(())
}

fn worlds_paths(worlds: &Worlds, tcp: bool) -> Result<Vec<(DataPath, Route<'_>)>> {
    let mut out = Vec::new();
    for path in DataPath::ALL {
        if tcp && !path.carries_tcp() {
            continue;
        }
        if let Some(route) = worlds.route(path)? {
            out.push((path, route));
        }
    }
    Ok(out)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

/// (bytes received, bits per second) of one iperf3 run; retried while the server is still
/// busy with the previous test.
fn iperf3(route: &Route<'_>, streams: u16, run: Duration) -> Result<(f64, f64)> {
    let host = route.host.to_string();
    let (port, secs, parallel) = (
        IPERF_PORT.to_string(),
        run.as_secs().to_string(),
        streams.to_string(),
    );
    let argv = [
        "iperf3", "-c", &host, "-p", &port, "-t", &secs, "-P", &parallel, "-J",
    ];
    let mut last = None;
    for _ in 0..5 {
        let out =
            route
                .world
                .mesh
                .exec_timeout(route.client, &argv, run + Duration::from_secs(30))?;
        match parse_iperf3(&String::from_utf8_lossy(&out.stdout)) {
            Ok(run) => return Ok((run.bytes, run.bits_per_second)),
            Err(e) if format!("{e:#}").contains("busy") => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("iperf3 never ran")))
}

/// Requests per second of one h2c connection with [`H2_STREAMS`] concurrent streams to
/// `target` (h2load, prior knowledge), timed over `run` after `warmup`. A run with any failed
/// or non-2xx request is an error.
fn h2load(route: &Route<'_>, target: SocketAddr, run: Duration, warmup: Duration) -> Result<f64> {
    let argv = [
        "h2load".to_owned(),
        "-c".into(),
        "1".into(),
        "-m".into(),
        H2_STREAMS.to_string(),
        "-D".into(),
        run.as_secs().to_string(),
        format!("--warm-up-time={}ms", warmup.as_millis()),
        format!("http://{target}/"),
    ];
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let out = route.world.mesh.exec_timeout(
        route.client,
        &argv,
        run + warmup + Duration::from_secs(30),
    )?;
    let run = parse_h2load(&String::from_utf8_lossy(&out.stdout)).with_context(|| {
        format!(
            "h2load stderr: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    Ok(run.requests_per_second)
}

#[allow(clippy::too_many_arguments)]
fn fixed_rate(
    r: &mut Results,
    path: DataPath,
    route: &Route<'_>,
    rep: usize,
    rate: u32,
    conns: usize,
    run: Duration,
    warmup: Duration,
) -> Result<()> {
    let streams = (0..conns)
        .map(|_| route.world.mesh.connect(route.client, route.http()))
        .collect::<Result<Vec<_>>>()?;
    let before = route.usage()?;
    let t = Instant::now();
    let mut out = load::fixed_rate(
        streams,
        FixedRate {
            rate: f64::from(rate),
            duration: run,
            warmup,
        },
    )?;
    let wall = t.elapsed();
    let after = route.usage()?;
    if out.errors > 0 || out.non_200 > 0 {
        bail!(
            "{} broken connections, {} non-200 responses",
            out.errors,
            out.non_200
        );
    }
    let achieved = out.achieved();
    let requests = out.sent_total;
    let p = percentiles_us(&mut out.latencies_ns).context("no request completed")?;
    for q in Quantile::ALL {
        r.record(path, Metric::FixedRateLatency { rate, q }, rep, q.of(&p));
    }
    r.record(path, Metric::FixedRateAchieved { rate }, rep, achieved);
    if rate == FIXED_RATES[0].0 && requests > 0 {
        for (side, cpu) in cpu_delta(&before, &after) {
            r.record(
                path,
                Metric::CpuPer10kRequests { side },
                rep,
                cpu / requests as f64 * 10_000.0,
            );
            r.record(
                path,
                Metric::CpuCoresAt1k { side },
                rep,
                cpu / wall.as_secs_f64(),
            );
        }
    }
    say!(
        "  {} {rate} req/s: p50 {:.0} µs, p99 {:.0} µs ({achieved:.0} req/s)",
        path.short(),
        p.p50,
        p.p99
    );
    Ok(())
}

/// Writes the fresh pod's YAML, then retries a request from it to the server until one
/// succeeds (only tunneled connections can: the server is STRICT). Returns (YAML → first
/// success, that attempt alone, the next connection).
fn first_connection(world: &World, name: &str) -> Result<(Duration, Duration, Duration)> {
    let key = format!("default/{name}");
    let ip = world.mesh.pod_ip(&key)?;
    let netns = world.mesh.pod_netns(&key)?;
    let target = SocketAddr::from((world.server_ip()?, HTTP_PORT));
    let yaml = format!(
        "apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {name}, namespace: default}}\n\
         ---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\n\
         spec:\n  nodeName: n1\n  serviceAccountName: {name}\n  containers: [{{name: app, image: mesh-echo}}]\n\
         status:\n  phase: Running\n  podIP: {ip}\n  podIPs: [{{ip: {ip}}}]\n"
    );
    // Before enrollment the pod's plaintext is refused by the STRICT server.
    if in_netns(&netns, || load::try_request(target, ENROLL_ATTEMPT))?.is_some() {
        bail!("{key} reached the STRICT server before it was enrolled");
    }
    let t0 = Instant::now();
    world.mesh.write_yaml(&format!("{name}.yaml"), &yaml)?;
    let found = first_success(&netns, target, t0, ENROLL_IN_FLIGHT)?;
    let (enroll, first) =
        found.with_context(|| format!("{key}: no request succeeded within {ENROLL_TIMEOUT:?}"))?;
    let warm = in_netns(&netns, || load::try_request(target, ENROLL_ATTEMPT))?
        .with_context(|| format!("{key}: the second request failed"))?;
    Ok((enroll, first, warm))
}

/// Starts a request from `netns` to `target` every few ms, each on its own thread (at most
/// `in_flight` at once), so that an attempt caught half-way through a switch (to capture,
/// to a new agent) cannot hold up the measurement, until one succeeds or [`ENROLL_TIMEOUT`]
/// after `t0`: (`t0` → the first success, that attempt alone). Attempts whose SYN was
/// dropped wait for its retransmission (1 s): with fewer than [`EVERY_ATTEMPT`] in flight,
/// a run of those stops new attempts and the result jumps to about 1 s.
pub(super) fn first_success(
    netns: &str,
    target: SocketAddr,
    t0: Instant,
    in_flight_max: usize,
) -> Result<Option<(Duration, Duration)>> {
    in_netns(netns, || {
        let winner: std::sync::Mutex<Option<(Duration, Duration)>> = std::sync::Mutex::new(None);
        let in_flight = std::sync::atomic::AtomicUsize::new(0);
        std::thread::scope(|scope| {
            let done = || winner.lock().map(|w| w.is_some()).unwrap_or(true);
            while !done() && t0.elapsed() < ENROLL_TIMEOUT {
                if in_flight.load(std::sync::atomic::Ordering::SeqCst) < in_flight_max {
                    in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let (winner, in_flight) = (&winner, &in_flight);
                    scope.spawn(move || {
                        if let Some(took) = load::try_request(target, ENROLL_ATTEMPT) {
                            let at = t0.elapsed();
                            if let Ok(mut w) = winner.lock() {
                                if w.is_none() {
                                    *w = Some((at, took));
                                }
                            }
                        }
                        in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                    });
                }
                std::thread::sleep(ENROLL_RETRY);
            }
        });
        winner.into_inner().ok().flatten()
    })
}

// === the memory probe ===

/// What [`memory_probe`] measures, and when.
#[derive(Clone, Debug)]
pub struct ProbePlan {
    /// Idle connections held at once.
    pub connections: usize,
    pub backend: Redirect,
    /// Delays after the close at which memory is sampled (from the moment the client closed).
    pub after_close: Vec<Duration>,
}

/// One labelled snapshot of both ztunnels.
#[derive(Clone, Debug)]
pub struct ProbeSample {
    pub label: String,
    pub usage: Vec<(Side, Usage)>,
}

/// The probe's result: `idle`, `loaded`, then one sample per `after_close` delay.
#[derive(Clone, Debug)]
pub struct ProbeReport {
    pub connections: usize,
    pub backend: Redirect,
    pub opened_in: Duration,
    pub samples: Vec<ProbeSample>,
}

impl ProbeReport {
    /// KiB of resident memory per idle connection on `side` (loaded − idle, over N).
    pub fn kib_per_connection(&self, side: Side) -> Option<f64> {
        let rss = |label: &str| {
            self.samples
                .iter()
                .find(|s| s.label == label)?
                .usage
                .iter()
                .find(|(s, _)| *s == side)
                .map(|(_, u)| u.rss_bytes as f64)
        };
        Some((rss("loaded")? - rss("idle")?) / self.connections as f64 / 1024.0)
    }

    /// A Markdown table: one row per sample, RSS and descriptors of each side.
    pub fn render(&self) -> String {
        let mut out = format!(
            "ztunnel ({}), {} idle connections (opened in {:.1} s)\n\n\
             | when | RSS MiB n1 | fds n1 | RSS MiB n2 | fds n2 |\n|---|---:|---:|---:|---:|\n",
            self.backend.as_str(),
            self.connections,
            self.opened_in.as_secs_f64()
        );
        for s in &self.samples {
            let cell = |side: Side| {
                s.usage
                    .iter()
                    .find(|(x, _)| *x == side)
                    .map(|(_, u)| (u.rss_bytes as f64 / MIB, u.fds))
                    .unwrap_or_default()
            };
            let ((r1, f1), (r2, f2)) = (cell(Side::Client), cell(Side::Server));
            out.push_str(&format!(
                "| {} | {r1:.1} | {f1} | {r2:.1} | {f2} |\n",
                s.label
            ));
        }
        for side in Side::BOTH {
            if let Some(k) = self.kib_per_connection(side) {
                out.push_str(&format!("\nKiB per idle connection, {side:?}: {k:.2}"));
            }
        }
        out.push('\n');
        out
    }
}

/// Only the idle-connection memory measure, on one ztunnel world (`mesh-bench --memory N`):
/// RSS of both ztunnels idle, with `connections` idle tunneled connections open (one byte
/// echoed on each, so every hop is established), and at each `after_close` delay once the
/// client has closed them. Fast enough to run before and after a change in the same session.
pub fn memory_probe(plan: &ProbePlan, stop: &Stop) -> Result<ProbeReport> {
    let nofile = raise_nofile()?;
    let n = plan
        .connections
        .min(conns_for(nofile, 1).saturating_sub(100) as usize);
    let world = World::ztunnel(plan.backend, 0, nofile)?;
    stop.check()?;
    let route = ztunnel_route(&world)?;
    let mut samples = Vec::new();
    std::thread::sleep(SETTLE);
    samples.push(ProbeSample {
        label: "idle".into(),
        usage: route.usage()?,
    });
    let t = Instant::now();
    let conns = load::open_idle(
        &route.client_netns()?,
        route.addr(ECHO_PORT),
        n,
        IDLE_WORKERS,
    )?;
    let opened_in = t.elapsed();
    std::thread::sleep(SETTLE);
    samples.push(ProbeSample {
        label: "loaded".into(),
        usage: route.usage()?,
    });
    stop.check()?;
    drop(conns);
    let closed = Instant::now();
    let mut delays = plan.after_close.clone();
    delays.sort();
    for d in delays {
        if let Some(left) = d.checked_sub(closed.elapsed()) {
            std::thread::sleep(left);
        }
        samples.push(ProbeSample {
            label: format!("{:.0} s after close", d.as_secs_f64()),
            usage: route.usage()?,
        });
        stop.check()?;
    }
    Ok(ProbeReport {
        connections: n,
        backend: plan.backend,
        opened_in,
        samples,
    })
}

/// `mesh-bench --hold`: the plain world and the eBPF world (L4, waypoint and ingress paths)
/// kept up until a stop signal, their addresses and proxy pids printed, for profiling by hand
/// (`perf record -p <pid>` while `ip netns exec <client netns> wrk ...` runs). Nothing is
/// measured.
pub fn hold(stop: &Stop) -> Result<()> {
    let nofile = raise_nofile()?;
    let plain = World::plain(stop, nofile)?;
    stop.check()?;
    let ebpf = World::ztunnel(Redirect::Ebpf, 0, nofile)?;
    let worlds = Worlds {
        plain,
        nftables: None,
        ebpf: Some(ebpf),
    };
    for path in DataPath::ALL {
        let Some(route) = worlds.route(path)? else {
            continue;
        };
        let pids: Vec<String> = route
            .proxies
            .iter()
            .map(|(side, pid)| format!("{side:?}={pid}"))
            .collect();
        println!(
            "{:<10} client netns {}  http://{}/  proxies [{}]",
            path.short(),
            route.client_netns()?,
            route.http(),
            pids.join(" ")
        );
    }
    eprintln!("mesh-bench: holding; Ctrl-C removes everything");
    while !stop.requested() {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}

/// Raises the open-file limit for us and every child (10,000 idle connections cost haproxy
/// two descriptors each): to [`NOFILE`] where allowed, else to the hard limit. Returns the
/// soft limit now in force.
pub(super) fn raise_nofile() -> Result<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit NOFILE")?;
    if soft >= NOFILE {
        return Ok(soft);
    }
    if hard < NOFILE && setrlimit(Resource::RLIMIT_NOFILE, NOFILE, NOFILE).is_ok() {
        return Ok(NOFILE);
    }
    // Raising the hard limit needs CAP_SYS_RESOURCE, which a container may not grant.
    let want = NOFILE.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, want, hard)
        .with_context(|| format!("setrlimit NOFILE {want} (was {soft}/{hard})"))?;
    Ok(want)
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "unknown date".into())
}

fn tool_versions() -> Vec<String> {
    [
        ("iperf3", "--version"),
        ("wrk", "-v"),
        ("haproxy", "-v"),
        ("nginx", "-v"),
        ("h2load", "--version"),
    ]
    .into_iter()
    .filter_map(|(tool, flag)| machine::tool_version(tool, flag))
    .map(|v| v.replace(" - https://haproxy.org/", ""))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quick_runs_are_smaller_but_still_repeated() {
        let (q, f) = (Plan::of(true), Plan::of(false));
        assert!(q.reps >= 3 && f.reps >= 3);
        assert!(q.run_secs < f.run_secs);
        assert!(q.idle_connections <= f.idle_connections);
        // Rough budget: every path × measure × repetition must fit the promised time.
        let tcp = DataPath::ALL.iter().filter(|p| p.carries_tcp()).count() as f64;
        let http_only = DataPath::ALL.len() as f64 - tcp;
        let budget = |p: Plan| {
            let run = p.run_secs as f64 + 0.4;
            // iperf3 ×2, fixed rate ×2, wrk ×2, connection rate.
            let per_rep = tcp * 7.0 * run
                // fixed rate ×2, wrk ×2, connection rate.
                + http_only * 5.0 * run
                // h2load on the L4 eBPF and waypoint paths.
                + 2.0 * (run + p.warmup.as_secs_f64());
            per_rep * p.reps as f64
        };
        assert!(budget(q) < 4.0 * 60.0, "quick: {} s", budget(q));
        assert!(budget(f) < 20.0 * 60.0, "full: {} s", budget(f));
    }

    #[test]
    fn idle_connections_fit_the_descriptor_limit() {
        assert_eq!(
            idle_connections(10_000, DataPath::ZtunnelEbpf, 200_000),
            10_000
        );
        assert_eq!(
            idle_connections(10_000, DataPath::HaproxyTls, 200_000),
            10_000
        );
        // 20,000 descriptors: haproxy holds two per connection.
        assert_eq!(
            idle_connections(10_000, DataPath::HaproxyTls, 20_000),
            9_650
        );
        assert_eq!(
            idle_connections(10_000, DataPath::ZtunnelEbpf, 20_000),
            10_000
        );
        assert_eq!(haproxy_maxconn(20_000), 9_750);
    }

    #[test]
    fn the_ingress_config_attaches_the_route_to_an_accepted_listener() {
        use mesh_model::model::{ConditionType, NamespacedName};
        let model = mesh_model::k8s::load_docs(&[("ingress.yaml".into(), ingress_yaml())])
            .expect("the model takes the ingress config");
        let gateway = NamespacedName::new(INGRESS_NS, INGRESS_GATEWAY);
        // Class `istio`: an ingress Gateway (only those get a status computed here).
        let status = model.gateway_status(&gateway).expect("an ingress Gateway");
        let accepted = status.condition(ConditionType::Accepted).expect("Accepted");
        assert!(accepted.status, "{accepted:?}");
        let routes = model.routes_for_listener(&gateway, "http");
        assert_eq!(routes.len(), 1, "the HTTPRoute is attached to the listener");
    }

    #[test]
    fn cpu_is_attributed_per_side() {
        let u = |cpu| Usage {
            cpu_seconds: cpu,
            ..Usage::default()
        };
        let before = [(Side::Client, u(1.0)), (Side::Server, u(2.0))];
        let after = [(Side::Client, u(1.5)), (Side::Server, u(4.0))];
        assert_eq!(
            cpu_delta(&before, &after),
            vec![(Side::Client, 0.5), (Side::Server, 2.0)]
        );
    }
}
