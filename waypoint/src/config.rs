//! Every setting of the waypoint, read once at startup into typed values. Each default is a
//! named constant so ARCHITECTURE.md and `--help` agree.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use mesh_model::identity::Identity;
use mesh_model::model::NamespacedName;

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
pub const DEFAULT_CERT_TTL: &str = "24h";
pub const DEFAULT_HBONE_ADDR: &str = "0.0.0.0:15008";
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";
/// `/config_dump` shows the whole mesh: loopback only by default (as Envoy's admin).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_CONFIG_POLL: &str = "500ms";
pub const DEFAULT_DRAIN_TIMEOUT: &str = "10s";
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: &str = "10s";
pub const DEFAULT_CONNECT_TIMEOUT: &str = "5s";
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

/// Where the model comes from (both feed the one translator, `mesh_model::k8s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ConfigSource {
    /// A directory of Kubernetes YAML (`--config-dir`), polled (local mode, tests).
    Dir,
    /// The Kubernetes API server, listed and watched (`mesh_kube`, in-cluster service
    /// account, else `$KUBECONFIG`): the waypoint's RBAC must allow list/watch of the kinds.
    Kube,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub enum LogFormat {
    Text,
    Json,
}

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
    /// Where the configuration comes from.
    #[arg(
        long,
        env = "WAYPOINT_CONFIG_SOURCE",
        value_enum,
        default_value = "dir"
    )]
    pub config_source: ConfigSource,
    /// Directory of Kubernetes YAML (the same one every ztunnel reads); watched. Needed with
    /// `--config-source dir`.
    #[arg(long, env = "WAYPOINT_CONFIG_DIR")]
    pub config_dir: Option<PathBuf>,
    /// CA directory: a plug-in CA in Istio's `cacerts` layout, or where the generated root lives.
    #[arg(long, env = "WAYPOINT_CA_DIR")]
    pub ca_dir: PathBuf,
    #[arg(long, env = "WAYPOINT_TRUST_DOMAIN", default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Certificate lifetime (renewed at half-life), e.g. 30s, 5m, 24h.
    #[arg(long, env = "WAYPOINT_CERT_TTL", default_value = DEFAULT_CERT_TTL, value_parser = parse_duration)]
    pub cert_ttl: Duration,
    /// HBONE listener (mTLS, HTTP/2 CONNECT).
    #[arg(long, env = "WAYPOINT_HBONE_ADDR", default_value = DEFAULT_HBONE_ADDR)]
    pub hbone_addr: SocketAddr,
    /// Prometheus `/metrics`.
    #[arg(long, env = "WAYPOINT_METRICS_ADDR", default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// `/healthz/ready`.
    #[arg(long, env = "WAYPOINT_READINESS_ADDR", default_value = DEFAULT_READINESS_ADDR)]
    pub readiness_addr: SocketAddr,
    /// `/config_dump` (and the public endpoints).
    #[arg(long, env = "WAYPOINT_ADMIN_ADDR", default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// How often the config directory is checked for changes.
    #[arg(long, env = "WAYPOINT_CONFIG_POLL", default_value = DEFAULT_CONFIG_POLL, value_parser = parse_duration)]
    pub config_poll: Duration,
    /// On SIGTERM, how long open connections may take to finish.
    #[arg(long, env = "WAYPOINT_DRAIN_TIMEOUT", default_value = DEFAULT_DRAIN_TIMEOUT, value_parser = parse_duration)]
    pub drain_timeout: Duration,
    #[arg(long, env = "WAYPOINT_TLS_HANDSHAKE_TIMEOUT", default_value = DEFAULT_TLS_HANDSHAKE_TIMEOUT, value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,
    /// Bound on opening an upstream connection (dial, TLS, HTTP/2, CONNECT).
    #[arg(long, env = "WAYPOINT_CONNECT_TIMEOUT", default_value = DEFAULT_CONNECT_TIMEOUT, value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Protocol detection on ports that declare none: silence this long means "not HTTP".
    #[arg(long, env = "WAYPOINT_DETECT_TIMEOUT", default_value = DEFAULT_DETECT_TIMEOUT, value_parser = parse_duration)]
    pub detect_timeout: Duration,
    #[arg(long, env = "WAYPOINT_UPSTREAM_IDLE_TIMEOUT", default_value = DEFAULT_UPSTREAM_IDLE_TIMEOUT, value_parser = parse_duration)]
    pub upstream_idle_timeout: Duration,
    #[arg(long, env = "WAYPOINT_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,
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
}

impl Args {
    /// Rules across flags that clap's attributes cannot state (`required_if_eq` ignores a
    /// defaulted `--config-source`).
    pub fn check(&self) -> Result<(), clap::Error> {
        if self.config_source == ConfigSource::Dir && self.config_dir.is_none() {
            return Err(<Args as clap::CommandFactory>::command().error(
                clap::error::ErrorKind::MissingRequiredArgument,
                "--config-source dir (the default) needs --config-dir <DIR> (or WAYPOINT_CONFIG_DIR)",
            ));
        }
        Ok(())
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
    pub ca_dir: PathBuf,
    pub trust_domain: String,
    pub cert_ttl: Duration,
    pub hbone_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub readiness_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub config_poll: Duration,
    pub drain_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub connect_timeout: Duration,
    pub detect_timeout: Duration,
    pub upstream_idle_timeout: Duration,
    pub max_idle_per_endpoint: usize,
    pub jwks: JwksSettings,
    pub jwks_ca_file: Option<PathBuf>,
}

/// How remote JWKS are fetched and cached (`crate::jwks`).
#[derive(Clone, Copy, Debug)]
pub struct JwksSettings {
    pub refresh: Duration,
    pub retry: Duration,
    pub max_stale: Duration,
    pub fetch_timeout: Duration,
}

impl From<&Args> for Config {
    fn from(a: &Args) -> Self {
        let sa = a.service_account.clone().unwrap_or_else(|| a.name.clone());
        Config {
            gateway: NamespacedName::new(&a.namespace, &a.name),
            identity: Identity::new(&a.trust_domain, &a.namespace, sa),
            config_source: a.config_source,
            config_dir: a.config_dir.clone(),
            ca_dir: a.ca_dir.clone(),
            trust_domain: a.trust_domain.clone(),
            cert_ttl: a.cert_ttl,
            hbone_addr: a.hbone_addr,
            metrics_addr: a.metrics_addr,
            readiness_addr: a.readiness_addr,
            admin_addr: a.admin_addr,
            config_poll: a.config_poll,
            drain_timeout: a.drain_timeout,
            tls_handshake_timeout: a.tls_handshake_timeout,
            connect_timeout: a.connect_timeout,
            detect_timeout: a.detect_timeout,
            upstream_idle_timeout: a.upstream_idle_timeout,
            max_idle_per_endpoint: DEFAULT_MAX_IDLE_PER_ENDPOINT,
            jwks: JwksSettings {
                refresh: a.jwks_refresh,
                retry: a.jwks_retry,
                max_stale: a.jwks_max_stale,
                fetch_timeout: a.jwks_fetch_timeout,
            },
            jwks_ca_file: a.jwks_ca_file.clone(),
        }
    }
}

pub use mesh_model::duration::parse_duration;

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
}
