//! The flags every mesh binary has, read once at startup into typed values. Each default is
//! a named constant so ARCHITECTURE.md and `--help` agree.
//!
//! A binary flattens [`ProcessArgs`] into its own `clap::Parser` and parses with
//! [`parse`], which names each shared flag's env var after the binary
//! (`--ca-dir` is `ZTUNNEL_CA_DIR` for the node agent, `WAYPOINT_CA_DIR` for the waypoint).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches, ValueEnum};

pub use mesh_model::duration::parse_duration;

pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// Where the model comes from unless told otherwise: a directory of YAML (local mode).
pub const DEFAULT_CONFIG_SOURCE: &str = "dir";
pub const DEFAULT_CERT_TTL: &str = "24h";
/// `/config_dump` and `/logging` show and change the whole process: loopback only by default
/// (as Envoy's admin).
pub const DEFAULT_ADMIN_ADDR: &str = "127.0.0.1:15000";
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:15020";
pub const DEFAULT_READINESS_ADDR: &str = "0.0.0.0:15021";
pub const DEFAULT_CONFIG_POLL: &str = "500ms";
pub const DEFAULT_DRAIN_TIMEOUT: &str = "10s";
pub const DEFAULT_TLS_HANDSHAKE_TIMEOUT: &str = "10s";
pub const DEFAULT_CONNECT_TIMEOUT: &str = "5s";
pub const DEFAULT_LOG_FORMAT: &str = "text";
pub const DEFAULT_THREADING: &str = "per-worker";

/// Where the mesh model comes from (both feed the one translator, `mesh_model::k8s`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ConfigSource {
    /// A directory of Kubernetes YAML (`--config-dir`), polled for changes (local mode, tests).
    Dir,
    /// The Kubernetes API server, listed and watched (`mesh_kube`: in-cluster service
    /// account, else `$KUBECONFIG`); RBAC must allow list/watch of the kinds the binary reads.
    Kube,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub enum LogFormat {
    Text,
    Json,
}

/// How the worker threads share the work ([`crate::workers`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Threading {
    /// One multi-threaded runtime: any worker runs any task (work stealing).
    Shared,
    /// A runtime per worker thread, each with its own listeners and pools: a connection's
    /// tasks stay on the thread that accepted it. The control work (config source,
    /// certificates, admin endpoints) runs on one more thread of its own.
    PerWorker,
}

impl Threading {
    /// Workers of the process's main runtime: `--worker-threads` when it is shared, one
    /// (the control thread) with a runtime per worker.
    pub fn runtime_workers(self, worker_threads: Option<u16>) -> Option<u16> {
        match self {
            Threading::Shared => worker_threads,
            Threading::PerWorker => Some(1),
        }
    }

    /// With a runtime per worker, how many data-path workers to start (`--worker-threads`,
    /// default one per CPU the process may use); `None` when shared.
    pub fn data_workers(self, worker_threads: Option<u16>) -> Option<usize> {
        match self {
            Threading::Shared => None,
            Threading::PerWorker => Some(worker_threads.map_or_else(
                || std::thread::available_parallelism().map_or(1, usize::from),
                usize::from,
            )),
        }
    }
}

/// Istio's path of the projected service-account token a CA client presents.
pub const DEFAULT_CA_TOKEN_FILE: &str = "/var/run/secrets/tokens/istio-token";

/// Where a process's certificates come from: the CA service (`--ca-address`, the normal
/// case: no signing key here) or a CA directory signing in this process (`--ca-dir`: the CA
/// service itself, and single-process tests). Exactly one of the two.
#[derive(clap::Args, Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CaArgs {
    /// CA directory (a plug-in CA in Istio's `cacerts` layout, or where a generated root
    /// lives): this process signs. For the CA service; elsewhere only for single-process tests.
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// The CA service, e.g. `https://control.istio-system.svc:15012` (Istio's `CA_ADDRESS`):
    /// certificates are requested from it, no signing key is held here.
    #[arg(long)]
    pub ca_address: Option<String>,
    /// Service-account token presented to the CA (audience `istio-ca`), read on every request.
    #[arg(long, default_value = DEFAULT_CA_TOKEN_FILE)]
    pub ca_token_file: PathBuf,
    /// PEM roots the CA service's certificate must chain to (the mesh root; public). Needed
    /// with `--ca-address`.
    #[arg(long)]
    pub ca_root_file: Option<PathBuf>,
    /// Name the CA's certificate is checked against; default: `--ca-address`'s host.
    #[arg(long)]
    pub ca_server_name: Option<String>,
}

/// The flags every binary has. No `env` here: [`parse`] names them after the binary.
#[derive(clap::Args, Debug, Clone)]
pub struct ProcessArgs {
    /// Where the model comes from: `dir` (`--config-dir`) or `kube` (the API server).
    #[arg(long, value_enum, default_value = DEFAULT_CONFIG_SOURCE)]
    pub config_source: ConfigSource,
    /// Directory of Kubernetes YAML (the same one every node agent and waypoint reads);
    /// watched. Needed with `--config-source dir`.
    #[arg(long)]
    pub config_dir: Option<PathBuf>,
    /// Where certificates come from: these flags, flattened.
    #[command(flatten)]
    pub ca: CaArgs,
    #[arg(long, default_value = DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: String,
    /// Certificate lifetime (renewed at half-life), e.g. 30s, 5m, 24h.
    #[arg(long, default_value = DEFAULT_CERT_TTL, value_parser = parse_duration)]
    pub cert_ttl: Duration,
    /// Admin endpoints: `/config_dump`, `/logging`, `/quitquitquit` (and `/metrics`).
    #[arg(long, default_value = DEFAULT_ADMIN_ADDR)]
    pub admin_addr: SocketAddr,
    /// Prometheus `/metrics`.
    #[arg(long, default_value = DEFAULT_METRICS_ADDR)]
    pub metrics_addr: SocketAddr,
    /// `/healthz/ready`.
    #[arg(long, default_value = DEFAULT_READINESS_ADDR)]
    pub readiness_addr: SocketAddr,
    /// How often the config directory is checked for changes.
    #[arg(long, default_value = DEFAULT_CONFIG_POLL, value_parser = parse_duration)]
    pub config_poll: Duration,
    /// On SIGTERM, how long open connections may take to finish.
    #[arg(long, default_value = DEFAULT_DRAIN_TIMEOUT, value_parser = parse_duration)]
    pub drain_timeout: Duration,
    #[arg(long, default_value = DEFAULT_TLS_HANDSHAKE_TIMEOUT, value_parser = parse_duration)]
    pub tls_handshake_timeout: Duration,
    /// Bound on opening an upstream connection.
    #[arg(long, default_value = DEFAULT_CONNECT_TIMEOUT, value_parser = parse_duration)]
    pub connect_timeout: Duration,
    #[arg(long, value_enum, default_value = DEFAULT_LOG_FORMAT)]
    pub log_format: LogFormat,
    /// Runtime worker threads (Istio's `ZTUNNEL_WORKER_THREADS`); default: one per CPU the
    /// process may use. Fewer workers hand a connection's tasks between threads less often
    /// (less CPU per request) but cap the process at that many cores.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// Caps, timeouts and TCP keepalive ([`crate::limits`]).
    #[command(flatten)]
    pub limits: crate::limits::LimitArgs,
}

impl ProcessArgs {
    /// Where the endpoint listeners bind (`--admin-addr`, `--metrics-addr`,
    /// `--readiness-addr`): what [`crate::admin::start`] takes.
    pub fn endpoints(&self) -> crate::admin::Addrs {
        crate::admin::Addrs {
            admin: self.admin_addr,
            metrics: self.metrics_addr,
            readiness: self.readiness_addr,
        }
    }

    /// Rules across flags that clap's attributes cannot state (`required_if_eq` ignores a
    /// defaulted `--config-source`). `A` is the binary's parser, for the usage in the error.
    pub fn check<A: CommandFactory>(&self, env_prefix: &str) -> Result<(), clap::Error> {
        let usage = |kind, msg: String| Err(command::<A>(env_prefix).error(kind, msg));
        match (&self.ca.ca_dir, &self.ca.ca_address, &self.ca.ca_root_file) {
            (Some(_), Some(_), _) => {
                return usage(
                    clap::error::ErrorKind::ArgumentConflict,
                    "--ca-dir (sign here) and --ca-address (ask the CA service) exclude each other".into(),
                )
            }
            (None, None, _) => {
                return usage(
                    clap::error::ErrorKind::MissingRequiredArgument,
                    format!(
                        "certificates need --ca-address <URL> (the CA service) or --ca-dir <DIR> (or {} / {})",
                        env_name(env_prefix, "ca_address"),
                        env_name(env_prefix, "ca_dir")
                    ),
                )
            }
            (None, Some(_), None) => {
                return usage(
                    clap::error::ErrorKind::MissingRequiredArgument,
                    "--ca-address needs --ca-root-file <PEM> (the roots its certificate chains to)".into(),
                )
            }
            _ => {}
        }
        if self.config_source == ConfigSource::Dir && self.config_dir.is_none() {
            return Err(command::<A>(env_prefix).error(
                clap::error::ErrorKind::MissingRequiredArgument,
                format!(
                    "--config-source dir (the default) needs --config-dir <DIR> (or {})",
                    env_name(env_prefix, "config_dir")
                ),
            ));
        }
        Ok(())
    }
}

/// The binary's command with an env var for every flag that does not name one:
/// `<prefix>_<FLAG>` (`ZTUNNEL` + `--ca-dir` = `ZTUNNEL_CA_DIR`).
pub fn command<A: CommandFactory>(env_prefix: &str) -> clap::Command {
    A::command().mut_args(|arg| {
        let named = arg.get_long().is_some() && arg.get_env().is_none();
        let builtin = matches!(arg.get_id().as_str(), "help" | "version");
        if named && !builtin {
            let name = env_name(env_prefix, arg.get_id().as_str());
            // Startup only, once per flag: clap keeps env names as `&'static str`.
            arg.env(&*Box::leak(name.into_boxed_str()))
        } else {
            arg
        }
    })
}

/// Parses the process's arguments and environment (exits with usage on error, as
/// `clap::Parser::parse`).
pub fn parse<A: CommandFactory + FromArgMatches>(env_prefix: &str) -> A {
    parse_from(env_prefix, std::env::args_os())
}

/// [`parse`] of the given arguments (the first is the program name).
pub fn parse_from<A, I, T>(env_prefix: &str, args: I) -> A
where
    A: CommandFactory + FromArgMatches,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    match try_parse_from(env_prefix, args) {
        Ok(a) => a,
        Err(e) => e.exit(),
    }
}

/// [`parse_from`] that returns the error instead of exiting.
pub fn try_parse_from<A, I, T>(env_prefix: &str, args: I) -> Result<A, clap::Error>
where
    A: CommandFactory + FromArgMatches,
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut cmd = command::<A>(env_prefix);
    let matches = cmd.try_get_matches_from_mut(args)?;
    A::from_arg_matches(&matches).map_err(|e| e.format(&mut cmd))
}

/// Every env var the binary reads, sorted (to check that none was renamed or lost).
pub fn env_names<A: CommandFactory>(env_prefix: &str) -> Vec<String> {
    let mut names: Vec<String> = command::<A>(env_prefix)
        .get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn env_name(prefix: &str, id: &str) -> String {
    format!("{prefix}_{}", id.replace('-', "_").to_ascii_uppercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(clap::Parser, Debug)]
    #[command(name = "probe")]
    struct Probe {
        #[arg(long, env = "PROBE_OWN_NAME")]
        name: String,
        #[command(flatten)]
        process: ProcessArgs,
    }

    fn check(args: &[&str], expected: Result<(), ()>) {
        let base = ["probe", "--name", "n", "--ca-dir", "/ca"];
        let parsed = try_parse_from::<Probe, _, _>("PROBE", base.iter().chain(args))
            .and_then(|p| p.process.check::<Probe>("PROBE"));
        assert_eq!(parsed.map_err(|_| ()), expected, "{args:?}");
    }

    #[test]
    fn the_config_source_decides_whether_a_directory_is_needed() {
        check(&["--config-dir", "/cfg"], Ok(()));
        check(&[], Err(()));
        check(&["--config-source", "kube"], Ok(()));
        check(&["--config-source", "etcd"], Err(()));
        check(&["--cert-ttl", "5"], Err(()));
    }

    #[test]
    fn certificates_come_from_exactly_one_place() {
        use clap::error::ErrorKind::{ArgumentConflict, MissingRequiredArgument};
        let parse = |args: &[&str]| {
            let base = ["probe", "--name", "n", "--config-source", "kube"];
            try_parse_from::<Probe, _, _>("PROBE", base.iter().chain(args))
                .and_then(|p| p.process.check::<Probe>("PROBE"))
                .map_err(|e| e.kind())
        };
        let remote = [
            "--ca-address",
            "https://ca:15012",
            "--ca-root-file",
            "/r.pem",
        ];
        assert_eq!(parse(&["--ca-dir", "/ca"]), Ok(()));
        assert_eq!(parse(&remote), Ok(()));
        assert_eq!(parse(&[]), Err(MissingRequiredArgument));
        assert_eq!(parse(&remote[..2]), Err(MissingRequiredArgument));
        let both = [&remote[..], &["--ca-dir", "/ca"]].concat();
        assert_eq!(parse(&both), Err(ArgumentConflict));
    }

    #[test]
    fn every_shared_flag_is_named_after_the_binary_and_explicit_names_stay() {
        let cmd = command::<Probe>("PROBE");
        let env = |id: &str| {
            cmd.get_arguments()
                .find(|a| a.get_id() == id)
                .and_then(|a| a.get_env())
                .map(|e| e.to_string_lossy().into_owned())
        };
        assert_eq!(env("ca_dir").as_deref(), Some("PROBE_CA_DIR"));
        assert_eq!(
            env("tls_handshake_timeout").as_deref(),
            Some("PROBE_TLS_HANDSHAKE_TIMEOUT")
        );
        assert_eq!(env("name").as_deref(), Some("PROBE_OWN_NAME"));
        assert_eq!(env("help"), None);
    }

    #[test]
    fn the_defaults_are_the_documented_ones() {
        let p: Probe = parse_from("PROBE", ["probe", "--name", "n", "--ca-dir", "/ca"]);
        assert_eq!(
            p.process.ca.ca_token_file,
            PathBuf::from("/var/run/secrets/tokens/istio-token")
        );
        let a = p.process;
        assert_eq!(
            a.endpoints(),
            crate::admin::Addrs {
                admin: "127.0.0.1:15000".parse().expect("addr"),
                metrics: "0.0.0.0:15020".parse().expect("addr"),
                readiness: "0.0.0.0:15021".parse().expect("addr"),
            }
        );
        assert_eq!(a.config_poll, Duration::from_millis(500));
        assert_eq!(a.cert_ttl, Duration::from_secs(24 * 3600));
        assert_eq!(a.log_format, LogFormat::Text);
        assert_eq!(a.config_source, ConfigSource::Dir);
        assert_eq!(a.worker_threads, None, "one per CPU");
    }

    #[test]
    fn worker_threads_are_one_or_more() {
        let workers = |args: &[&str]| {
            let base = ["probe", "--name", "n", "--ca-dir", "/ca"];
            try_parse_from::<Probe, _, _>("PROBE", base.iter().chain(args))
                .map(|p| p.process.worker_threads)
                .map_err(|_| ())
        };
        assert_eq!(workers(&["--worker-threads", "1"]), Ok(Some(1)));
        assert_eq!(workers(&["--worker-threads", "0"]), Err(()));
        assert_eq!(workers(&["--worker-threads", "two"]), Err(()));
    }

    #[test]
    fn per_worker_threading_gives_the_main_runtime_one_thread_and_the_data_path_the_rest() {
        let shared = Threading::Shared;
        assert_eq!(
            (
                shared.runtime_workers(Some(3)),
                shared.data_workers(Some(3))
            ),
            (Some(3), None)
        );
        let per = Threading::PerWorker;
        assert_eq!(
            (per.runtime_workers(Some(3)), per.data_workers(Some(3))),
            (Some(1), Some(3))
        );
        assert!(
            per.data_workers(None).is_some_and(|n| n >= 1),
            "one per CPU"
        );
    }
}
