//! Every setting of the waypoint, read once at startup into typed values. Each default is a
//! named constant so ARCHITECTURE.md and `--help` agree.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mesh_l7::EngineConfig;
use mesh_model::identity::Identity;
use mesh_model::model::NamespacedName;

/// The shared flags, defaults and types (`mesh_shell::config`), as the waypoint's own.
pub use mesh_shell::config::{
    parse_duration, ConfigSource, LogFormat, ProcessArgs, Threading, DEFAULT_ADMIN_ADDR,
    DEFAULT_CERT_TTL, DEFAULT_CONFIG_POLL, DEFAULT_CONNECT_TIMEOUT, DEFAULT_DRAIN_TIMEOUT,
    DEFAULT_METRICS_ADDR, DEFAULT_READINESS_ADDR, DEFAULT_TLS_HANDSHAKE_TIMEOUT,
    DEFAULT_TRUST_DOMAIN,
};

/// Every flag without an explicit env var is read from `WAYPOINT_<FLAG>` too.
pub const ENV_PREFIX: &str = "WAYPOINT";
pub const DEFAULT_HBONE_ADDR: &str = "0.0.0.0:15008";
/// How long a connection on a port that declares no protocol may stay silent before it is
/// relayed as bytes (server-first protocols never speak first).
pub const DEFAULT_DETECT_TIMEOUT: &str = "1s";
/// Idle upstream HTTP/1.1 connections kept per endpoint.
pub const DEFAULT_MAX_IDLE_PER_ENDPOINT: usize = 32;
/// An idle pooled upstream HTTP connection is closed after this long.
pub const DEFAULT_UPSTREAM_IDLE_TIMEOUT: &str = "60s";
/// How often a fetched `jwksUri` is fetched again (Envoy's default cache duration is 5m,
/// istiod's refresh 20m).
pub const DEFAULT_JWKS_REFRESH: &str = "20m";
/// Wait before retrying a `jwksUri` that could not be fetched, and the least time between
/// two refreshes triggered by tokens with an unknown `kid`.
pub const DEFAULT_JWKS_RETRY: &str = "5s";
/// How long the last good keys of a `jwksUri` are used while it cannot be fetched; after
/// that its tokens are refused.
pub const DEFAULT_JWKS_MAX_STALE: &str = "1h";
pub const DEFAULT_JWKS_FETCH_TIMEOUT: &str = "5s";
/// No proxy in front of the mesh is trusted: `x-forwarded-for` never sets `remote.ip`.
pub const DEFAULT_NUM_TRUSTED_PROXIES: u32 = 0;

/// Command line and environment (`WAYPOINT_*`).
#[derive(Parser, Debug, Clone)]
#[command(name = "waypoint", version, about = "Ambient mesh waypoint (L7 proxy)")]
pub struct Args {
    /// Name of the waypoint's `Gateway` (class `istio-waypoint`).
    #[arg(long, env = "WAYPOINT_NAME")]
    pub name: String,
    /// Namespace of the Gateway (and of the waypoint's identity).
    #[arg(long, env = "WAYPOINT_NAMESPACE")]
    pub namespace: String,
    /// Service account of the waypoint's identity; default: the Gateway's name (as Istio's
    /// waypoint Deployment does).
    #[arg(long, env = "WAYPOINT_SERVICE_ACCOUNT")]
    pub service_account: Option<String>,
    /// HBONE listener (mTLS, HTTP/2 CONNECT).
    #[arg(long, env = "WAYPOINT_HBONE_ADDR", default_value = DEFAULT_HBONE_ADDR)]
    pub hbone_addr: SocketAddr,
    /// `shared`: one runtime whose `--worker-threads` workers take any task. `per-worker`:
    /// each worker thread runs its own runtime and upstream pools; accepted HBONE
    /// connections are dealt to the workers in turn, and each stays, with every request it
    /// carries and the upstream connections they use, on its worker. Balancing, outlier
    /// detection and connection limits stay shared.
    #[arg(long, env = "WAYPOINT_THREADING", value_enum, default_value = mesh_shell::config::DEFAULT_THREADING)]
    pub threading: Threading,
    // The flags every mesh binary has (`WAYPOINT_<FLAG>`): config source and directory (the
    // same one every node agent reads), CA, trust domain, certificate lifetime, the admin
    // (`/config_dump`, `/logging`, `/quitquitquit`), metrics and readiness addresses,
    // timeouts, log format.
    #[command(flatten)]
    pub process: ProcessArgs,
    /// Protocol detection on ports that declare none: silence this long means "not HTTP".
    #[arg(long, env = "WAYPOINT_DETECT_TIMEOUT", default_value = DEFAULT_DETECT_TIMEOUT, value_parser = parse_duration)]
    pub detect_timeout: Duration,
    #[arg(long, env = "WAYPOINT_UPSTREAM_IDLE_TIMEOUT", default_value = DEFAULT_UPSTREAM_IDLE_TIMEOUT, value_parser = parse_duration)]
    pub upstream_idle_timeout: Duration,
    /// Refresh period of keys fetched from a RequestAuthentication `jwksUri`.
    #[arg(long, env = "WAYPOINT_JWKS_REFRESH", default_value = DEFAULT_JWKS_REFRESH, value_parser = parse_duration)]
    pub jwks_refresh: Duration,
    /// Retry period of a `jwksUri` that failed, and rate limit of unknown-`kid` refreshes.
    #[arg(long, env = "WAYPOINT_JWKS_RETRY", default_value = DEFAULT_JWKS_RETRY, value_parser = parse_duration)]
    pub jwks_retry: Duration,
    /// Keep using the last good keys of a failing `jwksUri` this long, then fail closed.
    #[arg(long, env = "WAYPOINT_JWKS_MAX_STALE", default_value = DEFAULT_JWKS_MAX_STALE, value_parser = parse_duration)]
    pub jwks_max_stale: Duration,
    #[arg(long, env = "WAYPOINT_JWKS_FETCH_TIMEOUT", default_value = DEFAULT_JWKS_FETCH_TIMEOUT, value_parser = parse_duration)]
    pub jwks_fetch_timeout: Duration,
    /// PEM roots trusted for `https` jwksUri besides the Mozilla roots (a private issuer).
    #[arg(long, env = "WAYPOINT_JWKS_CA_FILE")]
    pub jwks_ca_file: Option<PathBuf>,
    /// Serve an ingress Gateway (class `istio`) in cluster mode: with `--config-source kube`
    /// the API server is also watched for Secrets of type `kubernetes.io/tls` (no other
    /// Secret is ever listed) and ReferenceGrants, which the certificates of `HTTPS`
    /// listeners come from, and the Gateway's status is written back (`gateways/status`).
    /// Without it a Gateway of class `istio` still has its `HTTP` listeners served, but no
    /// `HTTPS` one (no certificate is ever read), and no status is written: a waypoint reads
    /// no Secrets, and its RBAC grants none. With `--config-source dir` everything in the
    /// directory is read anyway; this flag changes nothing there.
    #[arg(long, env = "WAYPOINT_INGRESS", default_value_t = false)]
    pub ingress: bool,
    /// Proxies in front of the mesh whose `x-forwarded-for` entries are trusted for
    /// `remote.ip` / `remoteIpBlocks` (Istio's `gatewayTopology.numTrustedProxies`): the
    /// N-th address from the right. 0: the client address the mesh carried.
    #[arg(long, env = "WAYPOINT_NUM_TRUSTED_PROXIES", default_value_t = DEFAULT_NUM_TRUSTED_PROXIES)]
    pub num_trusted_proxies: u32,
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

/// The settings as the rest of the waypoint sees them.
#[derive(Clone, Debug)]
pub struct Config {
    /// The waypoint's Gateway.
    pub gateway: NamespacedName,
    /// The identity it presents and is expected to have.
    pub identity: Identity,
    pub config_source: ConfigSource,
    /// Set when `config_source` is `dir`.
    pub config_dir: Option<PathBuf>,
    /// Where certificates come from.
    pub ca: mesh_shell::config::CaArgs,
    pub trust_domain: String,
    pub cert_ttl: Duration,
    pub hbone_addr: SocketAddr,
    /// `--threading per-worker`: how many data workers serve the HBONE connections
    /// (`None`: the shared runtime does).
    pub data_workers: Option<usize>,
    /// Admin, metrics and readiness listeners.
    pub endpoints: mesh_shell::admin::Addrs,
    pub config_poll: Duration,
    pub drain_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub detect_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    pub max_idle_per_endpoint: usize,
    pub jwks: JwksSettings,
    pub jwks_ca_file: Option<PathBuf>,
    /// See [`Args::num_trusted_proxies`].
    pub num_trusted_proxies: u32,
    /// See [`Args::ingress`].
    pub ingress: bool,
    /// Caps, timeouts, keepalive (`mesh_shell::limits`).
    pub limits: mesh_shell::limits::LimitArgs,
}

/// How remote JWKS are fetched and cached (`mesh_l7::jwks`).
pub use mesh_l7::JwksSettings;

impl Config {
    /// Who the L7 engine runs as: this waypoint's Gateway and identity.
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            gateway: self.gateway.clone(),
            identity: self.identity.clone(),
            trust_domain: self.trust_domain.clone(),
            num_trusted_proxies: self.num_trusted_proxies,
        }
    }
}

impl From<&Args> for Config {
    fn from(args: &Args) -> Self {
        let a = &args.process;
        let sa = args
            .service_account
            .clone()
            .unwrap_or_else(|| args.name.clone());
        Config {
            gateway: NamespacedName::new(&args.namespace, &args.name),
            identity: Identity::new(&a.trust_domain, &args.namespace, sa),
            config_source: a.config_source,
            config_dir: a.config_dir.clone(),
            ca: a.ca.clone(),
            trust_domain: a.trust_domain.clone(),
            cert_ttl: a.cert_ttl,
            hbone_addr: args.hbone_addr,
            data_workers: args.threading.data_workers(a.worker_threads),
            endpoints: a.endpoints(),
            config_poll: a.config_poll,
            drain_timeout: a.drain_timeout,
            tls_handshake_timeout: a.tls_handshake_timeout,
            connect_timeout: a.connect_timeout,
            detect_timeout: args.detect_timeout,
            upstream_idle_timeout: args.upstream_idle_timeout,
            max_idle_per_endpoint: DEFAULT_MAX_IDLE_PER_ENDPOINT,
            jwks: JwksSettings {
                refresh: args.jwks_refresh,
                retry: args.jwks_retry,
                max_stale: args.jwks_max_stale,
                fetch_timeout: args.jwks_fetch_timeout,
            },
            jwks_ca_file: args.jwks_ca_file.clone(),
            num_trusted_proxies: args.num_trusted_proxies,
            ingress: args.ingress,
            limits: a.limits.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_identity_defaults_to_the_gateway_name_as_service_account() {
        let args = Args::parse_from([
            "waypoint",
            "--name",
            "wp",
            "--namespace",
            "shop",
            "--config-dir",
            "/c",
            "--ca-dir",
            "/ca",
        ]);
        let cfg = Config::from(&args);
        assert_eq!(cfg.identity.uri(), "spiffe://cluster.local/ns/shop/sa/wp");
        assert_eq!(cfg.gateway, NamespacedName::new("shop", "wp"));
        assert_eq!(cfg.hbone_addr.port(), 15008);
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("5").is_err());
        assert_eq!(
            cfg.engine().num_trusted_proxies,
            0,
            "x-forwarded-for is not trusted"
        );
    }

    #[test]
    fn trusted_proxies_reach_the_engine() {
        let args = Args::parse_from([
            "waypoint",
            "--name=wp",
            "--namespace=shop",
            "--config-dir=/c",
            "--ca-dir=/ca",
            "--num-trusted-proxies=2",
        ]);
        assert_eq!(Config::from(&args).engine().num_trusted_proxies, 2);
    }

    #[test]
    fn ingress_is_off_unless_asked() {
        let base = ["waypoint", "--name=gw", "--namespace=shop", "--ca-dir=/ca"];
        let off = Args::parse_from(base.iter().copied().chain(["--config-source=kube"]));
        assert!(!Config::from(&off).ingress);
        let on = Args::parse_from(
            base.iter()
                .copied()
                .chain(["--config-source=kube", "--ingress"]),
        );
        assert!(Config::from(&on).ingress);
    }

    #[test]
    fn a_directory_is_needed_only_for_the_dir_source() {
        let base = [
            "waypoint",
            "--name",
            "wp",
            "--namespace",
            "shop",
            "--ca-dir",
            "/ca",
        ];
        let dir = Args::try_parse_from(base).expect("parses");
        assert!(dir.check().is_err(), "dir without --config-dir");
        let kube = Args::try_parse_from(base.iter().copied().chain(["--config-source", "kube"]))
            .expect("kube needs no directory");
        assert_eq!(Config::from(&kube).config_source, ConfigSource::Kube);
        assert_eq!(Config::from(&kube).config_dir, None);
    }

    #[test]
    fn every_setting_keeps_its_env_var() {
        let expected = [
            "WAYPOINT_ADMIN_ADDR",
            "WAYPOINT_CA_ADDRESS",
            "WAYPOINT_CA_DIR",
            "WAYPOINT_CA_ROOT_FILE",
            "WAYPOINT_CA_SERVER_NAME",
            "WAYPOINT_CA_TOKEN_FILE",
            "WAYPOINT_CERT_TTL",
            "WAYPOINT_CONFIG_DIR",
            "WAYPOINT_CONFIG_POLL",
            "WAYPOINT_CONFIG_SOURCE",
            "WAYPOINT_CONNECT_TIMEOUT",
            "WAYPOINT_DETECT_TIMEOUT",
            "WAYPOINT_DRAIN_TIMEOUT",
            "WAYPOINT_FIRST_BYTE_TIMEOUT",
            "WAYPOINT_HBONE_ADDR",
            "WAYPOINT_HBONE_CONNECTION_WINDOW",
            "WAYPOINT_HBONE_IDLE_TIMEOUT",
            "WAYPOINT_HBONE_MAX_CONCURRENT_STREAMS",
            "WAYPOINT_HBONE_MAX_CONTROL_FRAMES_PER_SEC",
            "WAYPOINT_HBONE_PING_INTERVAL",
            "WAYPOINT_HBONE_PING_TIMEOUT",
            "WAYPOINT_HBONE_POOL_MAX_CONNS_PER_PEER",
            "WAYPOINT_HBONE_SEND_STALL_TIMEOUT",
            "WAYPOINT_HBONE_STREAM_WINDOW",
            "WAYPOINT_INGRESS",
            "WAYPOINT_JWKS_CA_FILE",
            "WAYPOINT_JWKS_FETCH_TIMEOUT",
            "WAYPOINT_JWKS_MAX_STALE",
            "WAYPOINT_JWKS_REFRESH",
            "WAYPOINT_JWKS_RETRY",
            "WAYPOINT_LOG_FORMAT",
            "WAYPOINT_MAX_CONNECTIONS",
            "WAYPOINT_MAX_TLS_HANDSHAKES",
            "WAYPOINT_MAX_TLS_HANDSHAKES_PER_SOURCE",
            "WAYPOINT_METRICS_ADDR",
            "WAYPOINT_NAME",
            "WAYPOINT_NAMESPACE",
            "WAYPOINT_NUM_TRUSTED_PROXIES",
            "WAYPOINT_READINESS_ADDR",
            "WAYPOINT_RECEIVE_BUFFER_BUDGET",
            "WAYPOINT_SERVICE_ACCOUNT",
            "WAYPOINT_TCP_KEEPALIVE_IDLE",
            "WAYPOINT_TCP_KEEPALIVE_INTERVAL",
            "WAYPOINT_TCP_KEEPALIVE_PROBES",
            "WAYPOINT_TCP_USER_TIMEOUT",
            "WAYPOINT_THREADING",
            "WAYPOINT_TLS_HANDSHAKES_PER_SOURCE_PER_SEC",
            "WAYPOINT_TLS_HANDSHAKE_TIMEOUT",
            "WAYPOINT_TRUST_DOMAIN",
            "WAYPOINT_UPSTREAM_IDLE_TIMEOUT",
            "WAYPOINT_WORKER_THREADS",
        ];
        assert_eq!(mesh_shell::config::env_names::<Args>(ENV_PREFIX), expected);
    }
}
