//! Where an enrolled pod's network namespace comes from, one answer per config source.
//!
//! - Local mode (`--config-source dir`): the harness (or an operator) creates a named
//!   namespace per pod, `<netns-dir>/<prefix><ns>.<name>`, and the agent opens that file.
//! - In a cluster (`--config-source kube`): nothing names the pod's namespace, so it is found
//!   by pod IP among the namespaces of the node's processes ([`crate::podns`], which needs the
//!   DaemonSet's `hostPID`).
//! - Without namespaces (`--redirect loopback`, tests and development): every pod is an
//!   address in the agent's own namespace, which is what "its namespace" is.
//!
//! Either way the result is an open [`Netns`] whose path the redirection backends can enter
//! with `nsenter` (for a found namespace: `/proc/<pid>/ns/net` of a process inside it).

use std::net::IpAddr;
use std::sync::Arc;

use mesh_model::model::{NamespacedName, Pod};

use crate::config::Config;
use crate::netns::{Netns, NetnsError};
use crate::podns::{PodNetnsFinder, PodNsError};

#[derive(Debug, thiserror::Error)]
pub enum PodNetnsError {
    #[error("open netns of pod {pod}: {source}")]
    Named {
        pod: NamespacedName,
        source: NetnsError,
    },
    #[error("pod {pod} has no IP to find its netns by")]
    NoIp { pod: NamespacedName },
    #[error(
        "find netns of pod {pod} by ip {ip}: {source} (the agent needs hostPID to see the \
         node's processes)"
    )]
    Find {
        pod: NamespacedName,
        ip: IpAddr,
        source: PodNsError,
    },
}

/// How [`PodNetnsSource::open`] finds a pod's namespace.
pub enum PodNetnsSource {
    /// [`Config::pod_netns_path`]: `<netns-dir>/<prefix><namespace>.<name>`.
    Named(Arc<Config>),
    /// By pod IP, among the namespaces of the node's processes.
    ByIp(Arc<PodNetnsFinder>),
    /// The agent's own namespace for every pod (`--redirect loopback`).
    Agent(Arc<Netns>),
}

// === impl PodNetnsSource ===

impl PodNetnsSource {
    /// The network namespace of `pod`, opened (the handle keeps it alive).
    ///
    /// [`PodNetnsSource::ByIp`] may scan `/proc` and enter many namespaces: on a
    /// multi-threaded runtime that runs under `block_in_place`, so the other tasks of this
    /// worker move on meanwhile.
    pub fn open(&self, pod: &Pod) -> Result<Arc<Netns>, PodNetnsError> {
        let key = || NamespacedName::new(&pod.namespace, &pod.name);
        match self {
            PodNetnsSource::Named(cfg) => {
                let path = cfg.pod_netns_path(&pod.namespace, &pod.name);
                let netns = Netns::open(&path)
                    .map_err(|source| PodNetnsError::Named { pod: key(), source })?;
                Ok(Arc::new(netns))
            }
            PodNetnsSource::Agent(home) => Ok(home.clone()),
            PodNetnsSource::ByIp(finder) => {
                let find = || find_by_ips(finder, &pod.ips);
                let found = match tokio::runtime::Handle::try_current() {
                    Ok(rt) if rt.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                        tokio::task::block_in_place(find)
                    }
                    _ => find(),
                };
                match found {
                    Ok(netns) => Ok(Arc::new(netns)),
                    Err(None) => Err(PodNetnsError::NoIp { pod: key() }),
                    Err(Some((ip, source))) => Err(PodNetnsError::Find {
                        pod: key(),
                        ip,
                        source,
                    }),
                }
            }
        }
    }
}

/// The namespace holding the first of `ips` that some namespace holds; `Err(None)` when there
/// is no IP, else the error for the first IP.
fn find_by_ips(
    finder: &PodNetnsFinder,
    ips: &[IpAddr],
) -> Result<Netns, Option<(IpAddr, PodNsError)>> {
    let mut first_err = None;
    for ip in ips {
        match finder.find(*ip) {
            Ok(found) => {
                tracing::debug!(%ip, pid = found.pid, cached = found.cached, "pod netns found");
                return Ok(found.netns);
            }
            Err(e) => {
                first_err.get_or_insert((*ip, e));
            }
        }
    }
    Err(first_err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn pod(ips: &[&str]) -> Pod {
        Pod {
            name: "web".into(),
            namespace: "default".into(),
            uid: None,
            service_account: "default".into(),
            node_name: Some("n1".into()),
            ips: ips.iter().map(|ip| ip.parse().expect("ip")).collect(),
            labels: Default::default(),
            annotations: Default::default(),
            host_network: false,
            container_ports: vec![],
            ready: true,
        }
    }

    #[test]
    fn a_named_namespace_is_the_pods_file_under_the_prefix() {
        let dir = tempfile::tempdir().expect("tempdir");
        let args = crate::config::Args::try_parse_from([
            "ztunnel",
            "--node-name=n1",
            "--config-dir=/cfg",
            "--ca-dir=/ca",
            "--netns-prefix=mesh-",
            &format!("--netns-dir={}", dir.path().display()),
        ])
        .expect("args");
        let source = PodNetnsSource::Named(Arc::new(Config::from(&args)));
        let err = source.open(&pod(&["10.0.0.5"])).expect_err("no such file");
        let msg = err.to_string();
        assert!(msg.contains("pod default/web"), "{msg}");
        assert!(msg.contains("mesh-default.web"), "{msg}");

        // Any file opens (only setns would tell a namespace from a plain file).
        std::fs::write(dir.path().join("mesh-default.web"), b"").expect("write");
        let netns = source.open(&pod(&["10.0.0.5"])).expect("opens");
        assert_eq!(netns.path(), dir.path().join("mesh-default.web"));
    }

    #[test]
    fn a_pod_without_ips_cannot_be_found_by_ip() {
        let home = Arc::new(Netns::current().expect("own netns"));
        let finder = PodNetnsFinder::new(home).expect("finder");
        let source = PodNetnsSource::ByIp(Arc::new(finder));
        let err = source.open(&pod(&[])).expect_err("no ip");
        assert!(matches!(err, PodNetnsError::NoIp { .. }), "{err}");
    }
}
