//! Every setting of the node agent, read once at startup into typed values.
//! Each default is a named constant so ARCHITECTURE.md and `--help` agree.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// The shared flags, defaults and types (`mesh_shell::config`), as the agent's own.
pub use mesh_shell::config::{
    parse_duration, ConfigSource, LogFormat, ProcessArgs, Threading, DEFAULT_ADMIN_ADDR,
    DEFAULT_CERT_TTL, DEFAULT_CONFIG_POLL, DEFAULT_CONFIG_SOURCE, DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DRAIN_TIMEOUT, DEFAULT_METRICS_ADDR, DEFAULT_READINESS_ADDR,
    DEFAULT_TLS_HANDSHAKE_TIMEOUT, DEFAULT_TRUST_DOMAIN,
};

/// Every flag without an explicit env var is read from `ZTUNNEL_<FLAG>` too.
pub const ENV_PREFIX: &str = "ZTUNNEL";
pub const DEFAULT_NETNS_DIR: &str = "/var/run/netns";
/// Where the eBPF backend pins each pod's capture (under `ztunnel/`), so it survives restarts.
pub const DEFAULT_BPF_FS: &str = "/sys/fs/bpf";

/// Open connections per pod (its three listeners together), within the process-wide
/// `--max-connections`: one pod under a flood cannot take every slot of the node's others
/// (a node runs up to ~110 pods; 4 Ki is a busy server pod's worth).
pub const DEFAULT_MAX_CONNECTIONS_PER_POD: usize = 4096;

/// Ports bound inside every enrolled pod's network namespace.
pub const OUTBOUND_PORT: u16 = 15001;
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
pub const HBONE_PORT: u16 = 15008;
/// The DNS proxy (UDP and TCP) in every enrolled pod, where its port-53 traffic is captured.
pub const DNS_PROXY_PORT: u16 = 15053;
/// Ports that must never be the original destination of a captured connection (loops).
pub const RESERVED_PORTS: [u16; 7] = [15000, 15001, 15006, 15008, 15020, 15021, 15053];

/// SO_MARK on every socket the agent opens inside a pod namespace: the redirection rules skip
/// marked packets, so the agent never captures its own traffic.
pub const SKIP_MARK: u32 = 0x539;
/// Conntrack mark for inbound connections the agent delivers with the client's source IP; the
/// application's replies carry it and are routed back to the agent's transparent socket.
pub const INBOUND_CONNMARK: u32 = 0x111;
/// Source address of probes from the node (kubelet): the node SNATs its own connections to pods
/// to this link-local address (as Istio's CNI does), and the pod's rules let it reach the app
/// directly, so health checks keep working whatever the pod's PeerAuthentication says.
pub const PROBE_SOURCE_IP: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 7, 127);
/// Policy-routing table that sends marked replies to the local stack.
pub const INBOUND_ROUTE_TABLE: u32 = 133;

/// Istio's `outboundTrafficPolicy.mode` (see `--outbound-traffic-policy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OutboundTrafficPolicy {
    /// `ALLOW_ANY`: unknown destinations pass through (Istio's default).
    AllowAny,
    /// `REGISTRY_ONLY`: only pods, Services and ServiceEntries are reachable.
    RegistryOnly,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Redirect {
    /// eBPF where the kernel allows it (checked at startup), else nftables.
    Auto,
    /// An `sk_lookup` program per pod namespace plus policy routing (see redirect/ebpf.rs).
    Ebpf,
    /// nftables rules inside each pod namespace.
    Nftables,
    /// No redirection: only explicit connections to the pod's 15001/15006/15008 (tests).
    None,
    /// Tests and development, without root: no pod namespaces and no capture. Each local pod
    /// is an address in the agent's own namespace (e.g. in 127.0.0.0/8, which needs no
    /// setup) and its listeners bind on that address; a client names the destination of a
    /// connection to 15001 (outbound) or 15006 (inbound plaintext) with a SOCKS5 CONNECT.
    Loopback,
}

/// The agent's `--drain-timeout` (the other binaries keep the shared
/// [`DEFAULT_DRAIN_TIMEOUT`]): on SIGTERM, established connections (both directions) may run
/// this long. An upgrade (the next agent already serves new connections) must not cut them,
/// so this is long; the DaemonSet's `terminationGracePeriodSeconds` is a little longer.
pub const DEFAULT_AGENT_DRAIN_TIMEOUT: &str = "1h";

/// Command line and environment (`ZTUNNEL_*`).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "ztunnel",
    version,
    about = "Ambient mesh node agent",
    mut_arg("drain_timeout", |a| a.default_value(DEFAULT_AGENT_DRAIN_TIMEOUT))
)]
pub struct Args {
    /// Name of this node: the agent serves pods whose `spec.nodeName` equals it.
    #[arg(long, env = "ZTUNNEL_NODE_NAME")]
    pub node_name: String,
    /// Pod `<ns>/<name>` lives in the network namespace `<netns-dir>/<prefix><ns>.<name>`
    /// (`--config-source dir` only).
    #[arg(long, env = "ZTUNNEL_NETNS_PREFIX", default_value = "")]
    pub netns_prefix: String,
    #[arg(long, env = "ZTUNNEL_NETNS_DIR", default_value = DEFAULT_NETNS_DIR)]
    pub netns_dir: PathBuf,
    /// How pod traffic is captured: `auto` (eBPF if the kernel allows, else nftables).
    /// `loopback` (tests, no root): pods are addresses on this host, and clients tell 15001
    /// and 15006 where to connect with SOCKS5 (see ARCHITECTURE.md).
    #[arg(long, env = "ZTUNNEL_REDIRECT", value_enum, default_value = "auto")]
    pub redirect: Redirect,
    /// A bpffs mount (mounted there if missing) for the eBPF backend's pins.
    #[arg(long, env = "ZTUNNEL_BPF_FS", default_value = DEFAULT_BPF_FS)]
    pub bpf_fs: PathBuf,
    /// Take the mesh off this node and exit: release every capture the agent installs
    /// (either backend) in the namespaces of this node's pods, and their eBPF pins, so the
    /// pods talk directly again. Idempotent; run it with no agent running on the node.
    #[arg(long, env = "ZTUNNEL_RELEASE_ALL")]
    pub release_all: bool,
    /// On SIGTERM or `/quitquitquit`, release every pod's capture (new connections go
    /// directly at once), drain, then remove what is left: an uninstall. Without it the
    /// pods stay captured (failing closed) for the next agent to adopt: a restart.
    #[arg(long, env = "ZTUNNEL_RELEASE_ON_EXIT")]
    pub release_on_exit: bool,
    /// Open connections per pod (15001, 15006 and 15008 together); more are closed at once
    /// (counted with flag OM). `--max-connections` bounds the whole process.
    #[arg(long, env = "ZTUNNEL_MAX_CONNECTIONS_PER_POD", default_value_t = DEFAULT_MAX_CONNECTIONS_PER_POD, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections_per_pod: usize,
    /// Istio's mesh `outboundTrafficPolicy.mode`: what a connection from an enrolled pod to
    /// a destination the mesh does not know (no pod, Service VIP or ServiceEntry address)
    /// gets: `allow-any` passes it through in plain TCP, `registry-only` refuses it
    /// (counted with flag BLACKHOLE).
    #[arg(long, env = "ZTUNNEL_OUTBOUND_TRAFFIC_POLICY", value_enum, default_value_t = OutboundTrafficPolicy::AllowAny)]
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// Capture each enrolled pod's DNS (UDP and TCP port 53; IPv4, and IPv6 in a pod with an
    /// IPv6 address) to the agent's DNS proxy on 15053 in the pod (127.0.0.1 and [::1]):
    /// Service and ServiceEntry names are answered from the model (ServiceEntries without
    /// addresses get an auto-allocated VIP), every other query goes on to the resolver the pod
    /// asked. `false`: pod DNS is left alone.
    #[arg(long, env = "ZTUNNEL_DNS_CAPTURE", default_value_t = true, action = clap::ArgAction::Set)]
    pub dns_capture: bool,
    /// `shared`: one runtime whose `--worker-threads` workers take any task. `per-worker`:
    /// each worker thread runs its own runtime with its own listeners for every pod
    /// (`SO_REUSEPORT`: the kernel spreads connections over them) and its own HBONE pool,
    /// so a connection's tasks stay on the thread that accepted it; the config source,
    /// certificates and admin endpoints run on one more thread.
    #[arg(long, env = "ZTUNNEL_THREADING", value_enum, default_value = mesh_shell::config::DEFAULT_THREADING)]
    pub threading: Threading,
    // The flags every mesh binary has (`ZTUNNEL_<FLAG>`): config source, CA, addresses,
    // timeouts, log format. Pods' network namespaces are named files under `--netns-dir`
    // with `--config-source dir`, and found by pod IP among the node's processes with
    // `kube` (see `podns.rs`; the DaemonSet runs with `hostPID`).
    #[command(flatten)]
    pub process: ProcessArgs,
}

impl Args {
    /// Rules across flags that clap's attributes cannot state (`required_if_eq` ignores a
    /// defaulted `--config-source`).
    pub fn check(&self) -> Result<(), clap::Error> {
        self.process.check::<Args>(ENV_PREFIX)
    }

    /// The process's arguments and environment (exits with usage on error).
    pub fn from_env() -> Self {
        mesh_shell::config::parse(ENV_PREFIX)
    }
}

/// The settings as the rest of the agent sees them (and `/config_dump` shows).
#[derive(Clone, Debug, serde::Serialize)]
pub struct Config {
    pub node_name: String,
    pub config_source: ConfigSource,
    /// Set when `config_source` is `dir`.
    pub config_dir: Option<PathBuf>,
    /// Where certificates come from (`ca_dir`, `ca_address`, `ca_token_file`,
    /// `ca_root_file`, `ca_server_name` in the dump).
    #[serde(flatten)]
    pub ca: mesh_shell::config::CaArgs,
    pub netns_dir: PathBuf,
    pub netns_prefix: String,
    pub trust_domain: String,
    #[serde(with = "secs")]
    pub cert_ttl: Duration,
    /// The backend in use: never `auto` once the agent runs (startup resolves it).
    pub redirect: Redirect,
    pub bpf_fs: PathBuf,
    /// Release every pod's capture on shutdown (`--release-on-exit`).
    pub release_on_exit: bool,
    /// The endpoint listeners (`admin_addr`, `metrics_addr`, `readiness_addr` in the dump).
    #[serde(flatten)]
    pub endpoints: mesh_shell::admin::Addrs,
    #[serde(with = "secs")]
    pub config_poll: Duration,
    #[serde(with = "secs")]
    pub drain_timeout: Duration,
    #[serde(with = "secs")]
    pub tls_handshake_timeout: Duration,
    #[serde(with = "secs")]
    pub connect_timeout: Duration,
    pub max_connections_per_pod: usize,
    pub outbound_traffic_policy: OutboundTrafficPolicy,
    /// `--dns-capture` (never with `--redirect none` or `loopback`: nothing is captured).
    pub dns_capture: bool,
    /// `--threading`; with `per-worker`, `data_workers` runtimes of their own serve the
    /// pods' listeners (each pod gets a listener per worker) with one HBONE pool each.
    pub threading: mesh_shell::config::Threading,
    pub data_workers: Option<usize>,
    /// Caps, timeouts, keepalive (`max_connections`, `max_tls_handshakes`, ... in the dump).
    #[serde(flatten)]
    pub limits: mesh_shell::limits::LimitArgs,
}

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }
}

impl From<&Args> for Config {
    fn from(args: &Args) -> Self {
        let a = &args.process;
        Config {
            node_name: args.node_name.clone(),
            config_source: a.config_source,
            config_dir: a.config_dir.clone(),
            ca: a.ca.clone(),
            netns_dir: args.netns_dir.clone(),
            netns_prefix: args.netns_prefix.clone(),
            trust_domain: a.trust_domain.clone(),
            cert_ttl: a.cert_ttl,
            redirect: args.redirect,
            bpf_fs: args.bpf_fs.clone(),
            release_on_exit: args.release_on_exit,
            endpoints: a.endpoints(),
            config_poll: a.config_poll,
            drain_timeout: a.drain_timeout,
            tls_handshake_timeout: a.tls_handshake_timeout,
            connect_timeout: a.connect_timeout,
            max_connections_per_pod: args.max_connections_per_pod,
            outbound_traffic_policy: args.outbound_traffic_policy,
            dns_capture: args.dns_capture
                && matches!(
                    args.redirect,
                    Redirect::Auto | Redirect::Ebpf | Redirect::Nftables
                ),
            threading: args.threading,
            data_workers: args.threading.data_workers(a.worker_threads),
            limits: a.limits.clone(),
        }
    }
}

impl Config {
    /// The network namespace file of pod `<namespace>/<name>`.
    pub fn pod_netns_path(&self, namespace: &str, name: &str) -> PathBuf {
        self.netns_dir
            .join(format!("{}{}.{}", self.netns_prefix, namespace, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        let base = ["ztunnel", "--node-name", "n1", "--ca-dir", "/ca"];
        let args = Args::try_parse_from(base.iter().chain(args))?;
        args.check()?;
        Ok(args)
    }

    #[test]
    fn the_config_source_decides_whether_a_directory_is_needed() {
        let dir = parse(&["--config-dir", "/cfg"]).expect("dir mode with a directory");
        assert_eq!(dir.process.config_source, ConfigSource::Dir);
        assert!(
            parse(&[]).is_err(),
            "the default source (dir) needs --config-dir"
        );
        let kube = parse(&["--config-source", "kube"]).expect("kube mode needs no directory");
        assert_eq!(kube.process.config_source, ConfigSource::Kube);
        assert_eq!(kube.process.config_dir, None);
        assert!(parse(&["--config-source", "etcd"]).is_err());
    }

    #[test]
    fn the_agent_drains_for_an_hour_unless_told_otherwise() {
        let args = parse(&["--config-dir", "/cfg"]).expect("parses");
        assert_eq!(args.process.drain_timeout, Duration::from_secs(3600));
        let args = parse(&["--config-dir", "/cfg", "--drain-timeout", "25s"]).expect("parses");
        assert_eq!(args.process.drain_timeout, Duration::from_secs(25));
    }

    /// `/config_dump` shows the settings under these names; tools and tests read them.
    #[test]
    fn the_dump_keeps_every_setting_name() {
        let args =
            parse(&["--config-dir", "/cfg", "--metrics-addr", "0.0.0.0:9020"]).expect("parses");
        let dump = serde_json::to_value(Config::from(&args)).expect("serializes");
        let mut keys: Vec<&str> = dump
            .as_object()
            .expect("an object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        let mut expected = [
            "node_name",
            "config_source",
            "config_dir",
            "ca_dir",
            "ca_address",
            "ca_token_file",
            "ca_root_file",
            "ca_server_name",
            "netns_dir",
            "netns_prefix",
            "trust_domain",
            "cert_ttl",
            "redirect",
            "bpf_fs",
            "release_on_exit",
            "admin_addr",
            "metrics_addr",
            "readiness_addr",
            "config_poll",
            "drain_timeout",
            "tls_handshake_timeout",
            "connect_timeout",
            "max_connections_per_pod",
            "outbound_traffic_policy",
            "dns_capture",
            "threading",
            "data_workers",
            "max_connections",
            "max_tls_handshakes",
            "max_tls_handshakes_per_source",
            "tls_handshakes_per_source_per_sec",
            "first_byte_timeout",
            "hbone_idle_timeout",
            "tcp_keepalive_idle",
            "tcp_keepalive_interval",
            "tcp_keepalive_probes",
            "tcp_user_timeout",
            "receive_buffer_budget",
            "hbone_stream_window",
            "hbone_connection_window",
            "hbone_max_concurrent_streams",
            "hbone_max_control_frames_per_sec",
            "hbone_ping_interval",
            "hbone_ping_timeout",
            "hbone_pool_max_conns_per_peer",
            "hbone_send_stall_timeout",
        ];
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(dump["admin_addr"], "127.0.0.1:15000");
        assert_eq!(dump["metrics_addr"], "0.0.0.0:9020");
        assert_eq!(dump["readiness_addr"], "0.0.0.0:15021");
    }

    #[test]
    fn every_setting_keeps_its_env_var() {
        let expected = [
            "ZTUNNEL_ADMIN_ADDR",
            "ZTUNNEL_BPF_FS",
            "ZTUNNEL_CA_ADDRESS",
            "ZTUNNEL_CA_DIR",
            "ZTUNNEL_CA_ROOT_FILE",
            "ZTUNNEL_CA_SERVER_NAME",
            "ZTUNNEL_CA_TOKEN_FILE",
            "ZTUNNEL_CERT_TTL",
            "ZTUNNEL_CONFIG_DIR",
            "ZTUNNEL_CONFIG_POLL",
            "ZTUNNEL_CONFIG_SOURCE",
            "ZTUNNEL_CONNECT_TIMEOUT",
            "ZTUNNEL_DNS_CAPTURE",
            "ZTUNNEL_DRAIN_TIMEOUT",
            "ZTUNNEL_FIRST_BYTE_TIMEOUT",
            "ZTUNNEL_HBONE_CONNECTION_WINDOW",
            "ZTUNNEL_HBONE_IDLE_TIMEOUT",
            "ZTUNNEL_HBONE_MAX_CONCURRENT_STREAMS",
            "ZTUNNEL_HBONE_MAX_CONTROL_FRAMES_PER_SEC",
            "ZTUNNEL_HBONE_PING_INTERVAL",
            "ZTUNNEL_HBONE_PING_TIMEOUT",
            "ZTUNNEL_HBONE_POOL_MAX_CONNS_PER_PEER",
            "ZTUNNEL_HBONE_SEND_STALL_TIMEOUT",
            "ZTUNNEL_HBONE_STREAM_WINDOW",
            "ZTUNNEL_LOG_FORMAT",
            "ZTUNNEL_MAX_CONNECTIONS",
            "ZTUNNEL_MAX_CONNECTIONS_PER_POD",
            "ZTUNNEL_MAX_TLS_HANDSHAKES",
            "ZTUNNEL_MAX_TLS_HANDSHAKES_PER_SOURCE",
            "ZTUNNEL_METRICS_ADDR",
            "ZTUNNEL_NETNS_DIR",
            "ZTUNNEL_NETNS_PREFIX",
            "ZTUNNEL_NODE_NAME",
            "ZTUNNEL_OUTBOUND_TRAFFIC_POLICY",
            "ZTUNNEL_READINESS_ADDR",
            "ZTUNNEL_RECEIVE_BUFFER_BUDGET",
            "ZTUNNEL_REDIRECT",
            "ZTUNNEL_RELEASE_ALL",
            "ZTUNNEL_RELEASE_ON_EXIT",
            "ZTUNNEL_TCP_KEEPALIVE_IDLE",
            "ZTUNNEL_TCP_KEEPALIVE_INTERVAL",
            "ZTUNNEL_TCP_KEEPALIVE_PROBES",
            "ZTUNNEL_TCP_USER_TIMEOUT",
            "ZTUNNEL_THREADING",
            "ZTUNNEL_TLS_HANDSHAKES_PER_SOURCE_PER_SEC",
            "ZTUNNEL_TLS_HANDSHAKE_TIMEOUT",
            "ZTUNNEL_TRUST_DOMAIN",
            "ZTUNNEL_WORKER_THREADS",
        ];
        assert_eq!(mesh_shell::config::env_names::<Args>(ENV_PREFIX), expected);
    }
}
