//! Every setting of the CA, read once at startup. Each default is a named constant so
//! ARCHITECTURE.md and `--help` agree.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use mesh_model::model::NamespacedName;
pub use mesh_shell::config::{parse_duration, ConfigSource, ProcessArgs};

/// Every flag without an explicit env var is read from `CONTROL_<FLAG>` too.
pub const ENV_PREFIX: &str = "CONTROL";
/// Istio's CA port.
pub const DEFAULT_GRPC_ADDR: &str = "0.0.0.0:15012";
/// Longest certificate lifetime granted, whatever a request asks for.
pub const DEFAULT_MAX_CERT_TTL: &str = "48h";
/// The names the CA's serving certificate carries (what clients dial).
pub const DEFAULT_SERVING_NAMES: &str =
    "istiod.istio-system.svc,control.istio-system.svc,localhost,127.0.0.1";
pub const DEFAULT_NODE_ACCOUNTS: &str = "istio-system/ztunnel";
pub const DEFAULT_AUDIENCE: &str = crate::token::DEFAULT_AUDIENCE;
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;
/// A node agent enrolling 100 pods at once asks 100 times in a burst.
pub const DEFAULT_PER_CALLER_BURST: u32 = 200;
pub const DEFAULT_PER_CALLER_RATE: f64 = 50.0;
/// Lifetime of the CA's serving certificate (re-issued at half-life).
pub const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 60 * 60);

/// `control [serve flags]`: command line and environment (`CONTROL_*`).
#[derive(Parser, Debug, Clone)]
#[command(
    name = "control",
    version,
    about = "Mesh control plane: the CA service (Istio's CreateCertificate on :15012)",
    after_help = "Mint a local-mode token: control token --help"
)]
pub struct Args {
    /// The CA's gRPC listener (TLS, `istio.v1.auth.IstioCertificateService`).
    #[arg(long, default_value = DEFAULT_GRPC_ADDR)]
    pub grpc_addr: SocketAddr,
    /// Longest lifetime granted (`--cert-ttl` is the lifetime when a request asks none).
    #[arg(long, default_value = DEFAULT_MAX_CERT_TTL, value_parser = parse_duration)]
    pub max_cert_ttl: Duration,
    /// DNS names and IP addresses of the serving certificate (comma-separated).
    #[arg(long, default_value = DEFAULT_SERVING_NAMES, value_delimiter = ',')]
    pub serving_names: Vec<String>,
    /// Service accounts of node agents (`namespace/name`, comma-separated): they may obtain
    /// the identities of pods on their own node.
    #[arg(long, default_value = DEFAULT_NODE_ACCOUNTS, value_delimiter = ',', value_parser = parse_account)]
    pub node_accounts: Vec<NamespacedName>,
    /// Audience callers' tokens must carry.
    #[arg(long, default_value = DEFAULT_AUDIENCE)]
    pub token_audience: String,
    /// Requests served at once; more are refused (`RESOURCE_EXHAUSTED`, reason `overloaded`).
    #[arg(long, default_value_t = DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,
    /// Requests one caller may make in a burst (`rate_limited` beyond).
    #[arg(long, default_value_t = DEFAULT_PER_CALLER_BURST)]
    pub per_caller_burst: u32,
    /// Sustained requests per second per caller.
    #[arg(long, default_value_t = DEFAULT_PER_CALLER_RATE)]
    pub per_caller_rate: f64,
    /// Config source (pods: who runs where), CA directory (the only place the signing key
    /// lives), trust domain, default certificate lifetime, admin/metrics/readiness addresses,
    /// timeouts, log format. With `--config-source dir` callers' tokens are checked by the CA
    /// itself (`control token` mints them); with `kube`, by the API server's TokenReview.
    #[command(flatten)]
    pub process: ProcessArgs,
}

/// `control token`: mint a local-mode service-account token.
#[derive(Parser, Debug, Clone)]
#[command(
    name = "control token",
    about = "Mint a service-account token the local-mode CA accepts (printed, or written to --out with mode 0600)"
)]
pub struct TokenArgs {
    /// The CA directory (its token key is created there on first use).
    #[arg(long, env = "CONTROL_CA_DIR")]
    pub ca_dir: PathBuf,
    #[arg(long)]
    pub namespace: String,
    #[arg(long)]
    pub service_account: String,
    /// Bind the token to a node (a node agent's token).
    #[arg(long)]
    pub node: Option<String>,
    /// Bind the token to a pod (`--pod-uid` too, to tell it from a namesake recreated later).
    #[arg(long)]
    pub pod: Option<String>,
    #[arg(long, requires = "pod")]
    pub pod_uid: Option<String>,
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub ttl: Duration,
    #[arg(long, default_value = DEFAULT_AUDIENCE)]
    pub audience: String,
    #[arg(long)]
    pub out: Option<PathBuf>,
}

fn parse_account(s: &str) -> Result<NamespacedName, String> {
    match s.trim().split_once('/') {
        Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
            Ok(NamespacedName {
                namespace: ns.to_string(),
                name: name.to_string(),
            })
        }
        _ => Err(format!("{s:?} is not namespace/name")),
    }
}

impl Args {
    pub fn from_env() -> Args {
        mesh_shell::config::parse::<Args>(ENV_PREFIX)
    }

    pub fn try_parse_from<I, T>(args: I) -> Result<Args, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        mesh_shell::config::try_parse_from::<Args, _, _>(ENV_PREFIX, args)
    }

    pub fn check(&self) -> Result<(), clap::Error> {
        if self.process.ca.ca_address.is_some() {
            return Err(mesh_shell::config::command::<Args>(ENV_PREFIX).error(
                clap::error::ErrorKind::ArgumentConflict,
                "the CA service signs with --ca-dir; --ca-address is for its clients",
            ));
        }
        self.process.check::<Args>(ENV_PREFIX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_lists_parse() {
        let args =
            Args::try_parse_from(["control", "--ca-dir", "/tmp/ca", "--config-dir", "/tmp/cfg"])
                .expect("parse");
        assert_eq!(args.grpc_addr.port(), 15012);
        assert_eq!(args.node_accounts.len(), 1);
        assert_eq!(args.node_accounts[0].name, "ztunnel");
        assert!(args
            .serving_names
            .contains(&"istiod.istio-system.svc".to_string()));
        let args = Args::try_parse_from([
            "control",
            "--ca-dir",
            "/tmp/ca",
            "--config-dir",
            "/tmp/cfg",
            "--node-accounts",
            "kube-system/agent,istio-system/ztunnel",
        ])
        .expect("parse");
        assert_eq!(args.node_accounts.len(), 2);
        assert!(
            Args::try_parse_from(["control", "--ca-dir", "/x", "--node-accounts", "nope"]).is_err()
        );
    }
}
