//! A dual-stack pod for the tests of the agent's binary: the e2e harness gives pods no IPv6
//! (its namespaces have IPv6 off), so these build their own namespaces: the node's, where the
//! agent runs (`--config-dir`, pods' namespaces by name); the pod `default/client`'s, with an
//! IPv4 and a ULA IPv6 address; and one outside the mesh on the other end of the pod's link,
//! with an address of each family. Nothing leaves them; all of it is removed on drop.

use std::net::{Ipv4Addr, Ipv6Addr};

use anyhow::Result;

use super::netns::{prefix, require_root, TestNetns};
use super::node_agent::Agent;

/// The namespaces, and the directory of the agent's config, CA and log.
pub struct DualStackPod {
    /// The pod `default/client` of node `n1`.
    pub pod: TestNetns,
    /// On the pod's link, outside the mesh.
    pub outside: TestNetns,
    node: TestNetns,
    prefix: String,
    pod_ips: (Ipv4Addr, Ipv6Addr),
    dir: tempfile::TempDir,
}

impl DualStackPod {
    /// The pod with addresses `pod_ips` (a /24 and a /64) on a link whose other end, in the
    /// namespace `outside_tag`, has `outside_ips`. Needs root.
    pub fn new(
        pod_ips: (Ipv4Addr, Ipv6Addr),
        outside_tag: &str,
        outside_ips: (Ipv4Addr, Ipv6Addr),
    ) -> Result<DualStackPod> {
        require_root()?;
        let prefix = prefix();
        let cidrs = |(v4, v6): (Ipv4Addr, Ipv6Addr)| [format!("{v4}/24"), format!("{v6}/64")];
        let node = TestNetns::new(&prefix, "node")?;
        // `<prefix><namespace>.<name>`: where the agent looks for pod default/client.
        let pod = TestNetns::new(&prefix, "default.client")?;
        let outside = TestNetns::new(&prefix, outside_tag)?;
        pod.link(&cidrs(pod_ips), &outside, &cidrs(outside_ips))?;
        Ok(DualStackPod {
            pod,
            outside,
            node,
            prefix,
            pod_ips,
            dir: tempfile::tempdir()?,
        })
    }

    /// Starts the agent capturing with `backend`, its config the pod (in an ambient
    /// namespace) and `more_yaml`. Drop it before `self`.
    pub fn start_agent(&self, backend: &str, more_yaml: &str) -> Result<Agent> {
        let (v4, v6) = self.pod_ips;
        let pod = format!(
            r#"
apiVersion: v1
kind: Namespace
metadata: {{name: default, labels: {{istio.io/dataplane-mode: ambient}}}}
---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: client, namespace: default}}
---
apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: default, labels: {{app: client}}}}
spec: {{nodeName: n1, serviceAccountName: client, containers: [{{name: app, image: app}}]}}
status: {{phase: Running, podIP: {v4}, podIPs: [{{ip: {v4}}}, {{ip: "{v6}"}}]}}
"#
        );
        let yaml = match more_yaml.trim() {
            "" => pod,
            more => format!("{pod}---\n{more}\n"),
        };
        let dir = self.dir.path();
        std::fs::write(dir.join("mesh.yaml"), yaml)?;
        Agent::start(&self.node, dir, &self.prefix, backend)
    }
}
