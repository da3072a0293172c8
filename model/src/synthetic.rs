//! A synthetic mesh of any size, written as the Kubernetes YAML a config source reads: pods
//! on other nodes, one Service per few pods, and AuthorizationPolicies whose selectors match
//! nothing. For measuring how the proxies' costs grow with the mesh around the workloads a
//! benchmark measures (`benches/model_size.rs`, a model-size dimension of `cargo xtask
//! bench`): add [`BigMesh::files`] to the measured topology's own.
//!
//! Pure: it writes strings. Its names (`mesh-<n>` namespaces, `node-<n>` nodes with the
//! caller's prefix) and addresses (the caller's bases) are chosen so as not to meet the
//! measured topology's.

use std::fmt::Write;
use std::net::Ipv4Addr;

/// The shape of the mesh; [`BigMesh::new`] gives the proportions of the benchmark.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BigMesh {
    pub pods: u32,
    /// One Service per this many pods (the last may select fewer).
    pub pods_per_service: u32,
    /// AuthorizationPolicies, each with a selector no pod matches.
    pub policies: u32,
    /// Pods, Services and policies are spread over this many namespaces (`mesh-<n>`),
    /// labelled for ambient mode.
    pub namespaces: u32,
    /// Pods are spread over this many nodes, `<node_prefix><n>`.
    pub nodes: u32,
    pub node_prefix: String,
    /// Pod `i` has IP `pod_base + i`.
    pub pod_base: Ipv4Addr,
    /// Service `s` has cluster IP `vip_base + s`.
    pub vip_base: Ipv4Addr,
}

impl BigMesh {
    /// `pods` pods on 100 other nodes in 50 namespaces, one Service per 10 pods, 1,000
    /// policies that select nothing; pods in 10.128.0.0/9, Services in 10.112.0.0/12.
    pub fn new(pods: u32) -> BigMesh {
        BigMesh {
            pods,
            pods_per_service: 10,
            policies: 1_000,
            namespaces: 50,
            nodes: 100,
            node_prefix: "other-node-".to_string(),
            pod_base: Ipv4Addr::new(10, 128, 0, 0),
            vip_base: Ipv4Addr::new(10, 112, 0, 0),
        }
    }

    pub fn services(&self) -> u32 {
        self.pods.div_ceil(self.pods_per_service.max(1))
    }

    /// The IP of pod `i`.
    pub fn pod_ip(&self, i: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.pod_base).wrapping_add(i))
    }

    /// The cluster IP of Service `s`.
    pub fn service_vip(&self, s: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.vip_base).wrapping_add(s))
    }

    fn namespace(&self, n: u32) -> u32 {
        n % self.namespaces.max(1)
    }

    /// The mesh as YAML files, one per namespace (`mesh-<n>.yaml`: the namespace, its pods,
    /// Services and policies), each well under [`crate::k8s::MAX_FILE_BYTES`] up to ~10,000
    /// pods per namespace; what a directory source reads.
    pub fn files(&self) -> Vec<(String, String)> {
        let namespaces = self.namespaces.max(1);
        let mut files: Vec<String> = (0..namespaces)
            .map(|n| {
                format!(
                    "apiVersion: v1\nkind: Namespace\n\
                     metadata: {{name: mesh-{n}, labels: {{istio.io/dataplane-mode: ambient}}}}\n"
                )
            })
            .collect();
        let per = self.pods_per_service.max(1);
        for i in 0..self.pods {
            let s = i / per;
            let out = &mut files[self.namespace(s) as usize];
            let node = i % self.nodes.max(1);
            // Infallible: writing to a String.
            let _ = write!(
                out,
                "---\napiVersion: v1\nkind: Pod\n\
                 metadata:\n  name: app-{s}-{i}\n  namespace: mesh-{ns}\n  \
                 uid: 00000000-0000-4000-8000-{i:012}\n  \
                 labels: {{app: app-{s}, version: v1, pod-template-hash: h{s}}}\n\
                 spec:\n  nodeName: {prefix}{node}\n  serviceAccountName: app-{s}\n  \
                 containers: [{{name: app, ports: [{{name: http, containerPort: 8080}}]}}]\n\
                 status:\n  podIP: {ip}\n  conditions: [{{type: Ready, status: \"True\"}}]\n",
                ns = self.namespace(s),
                prefix = self.node_prefix,
                ip = self.pod_ip(i),
            );
        }
        for s in 0..self.services() {
            let ns = self.namespace(s);
            let _ = write!(
                files[ns as usize],
                "---\napiVersion: v1\nkind: Service\n\
                 metadata: {{name: app-{s}, namespace: mesh-{ns}}}\n\
                 spec:\n  clusterIP: {vip}\n  selector: {{app: app-{s}}}\n  \
                 ports: [{{name: http, port: 80, targetPort: http}}]\n",
                vip = self.service_vip(s),
            );
        }
        for p in 0..self.policies {
            let ns = self.namespace(p);
            let _ = write!(
                files[ns as usize],
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
                 metadata: {{name: unmatched-{p}, namespace: mesh-{ns}}}\n\
                 spec:\n  selector: {{matchLabels: {{app: unmatched-{p}}}}}\n  \
                 rules: [{{from: [{{source: {{principals: [\"cluster.local/ns/mesh-{ns}/sa/p{p}\"]}}}}]}}]\n"
            );
        }
        (0..namespaces)
            .zip(files)
            .map(|(n, yaml)| (format!("mesh-{n}.yaml"), yaml))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NamespacedName;

    #[test]
    fn the_mesh_loads_with_its_proportions_and_selects_as_described() {
        let mesh = BigMesh::new(95);
        let files = mesh.files();
        assert_eq!(files.len(), 50, "one file per namespace");
        let m = crate::k8s::load_docs(&files).expect("valid");
        assert_eq!(m.pods.len(), 95);
        assert_eq!(m.services.len(), 10, "one per 10 pods, the last with 5");
        assert_eq!(m.authorization_policies.len(), 1_000);
        let last = &*m.services[&NamespacedName::new("mesh-9", "app-9")];
        let eps = m.endpoints(last, &last.ports[0]);
        assert_eq!(eps.len(), 5);
        assert!(eps.iter().all(|e| e.port == 8080));
        let pod = m.workload_by_ip(mesh.pod_ip(94).into()).expect("pod");
        assert_eq!(pod.name, "app-9-94");
        assert!(m.is_ambient(pod));
        assert_eq!(m.services_for_pod(pod).len(), 1);
        assert!(
            crate::policy::policies_for(&m, pod).is_empty(),
            "no policy selects a pod"
        );
        let (svc, _) = m
            .service_by_vip(mesh.service_vip(3).into(), 80)
            .expect("service");
        assert_eq!(svc.name, "app-3");
    }
}
