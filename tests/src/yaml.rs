//! Kubernetes YAML for a declared topology: what ztunnel reads from its config directory.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use serde_json::{json, Map, Value};

use crate::spec::{Ambient, MeshBuilder, Plan};

/// The file the declared topology is written to in the config directory.
pub(crate) const TOPOLOGY_FILE: &str = "topology.yaml";

/// The label that enrolls a namespace or pod.
const DATAPLANE_MODE: &str = "istio.io/dataplane-mode";

/// Renders Namespaces, ServiceAccounts, Pods and Services as one multi-document YAML file.
pub(crate) fn render_topology(spec: &MeshBuilder, plan: &Plan) -> Result<String> {
    let mut docs: Vec<Value> = Vec::new();

    for ns in &spec.namespaces {
        let mut labels = ns.labels.clone();
        if ns.ambient == Ambient::Yes {
            labels.insert(DATAPLANE_MODE.to_owned(), "ambient".to_owned());
        }
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": { "name": ns.name, "labels": labels },
        }));
    }

    let accounts: BTreeSet<(&str, &str)> = plan
        .pods
        .iter()
        .filter(|p| p.pod.listed)
        .map(|p| (p.pod.namespace.as_str(), p.pod.service_account.as_str()))
        .collect();
    for (namespace, name) in accounts {
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": { "name": name, "namespace": namespace },
        }));
    }

    for p in plan.pods.iter().filter(|p| p.pod.listed) {
        let ip = p.ip.to_string();
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": p.pod.name,
                "namespace": p.pod.namespace,
                "labels": p.pod.labels,
            },
            "spec": {
                "nodeName": p.node,
                "serviceAccountName": p.pod.service_account,
                "containers": [{ "name": "app", "image": "mesh-echo" }],
            },
            "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{ "ip": ip }],
            },
        }));
    }

    for svc in &spec.services {
        let ports: Vec<Value> = svc
            .ports
            .iter()
            .map(|p| {
                json!({
                    "name": p.name,
                    "protocol": "TCP",
                    "port": p.port,
                    "targetPort": p.target_port,
                })
            })
            .collect();
        let mut spec_map = Map::new();
        if let Some(vip) = &svc.vip {
            spec_map.insert("clusterIP".into(), json!(vip));
            spec_map.insert("clusterIPs".into(), json!([vip]));
        }
        spec_map.insert("ports".into(), Value::Array(ports));
        if !svc.selector.is_empty() {
            spec_map.insert("selector".into(), json!(svc.selector));
        }
        docs.push(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": svc.name,
                "namespace": svc.namespace,
                "labels": svc.labels,
            },
            "spec": spec_map,
        }));
    }

    join_documents(&docs)
}

/// A declared topology as the files of a config directory, for a harness that runs the agents
/// itself (in one process, pods as loopback addresses: `ztunnel/tests/support/agents.rs`).
#[derive(Clone, Debug)]
pub struct Rendered {
    /// `topology.yaml` (what [`MeshBuilder::build`] writes), then the [`MeshBuilder::yaml`]
    /// files, as (file name, content).
    pub files: Vec<(String, String)>,
    /// The nodes that run an agent, in declaration order.
    pub nodes: Vec<String>,
    /// Each pod (`"ns/name"`) and its node and address.
    pub pods: BTreeMap<String, (String, Ipv4Addr)>,
}

impl MeshBuilder {
    /// The topology and its files as `build()` would write them, except that pod `host` of
    /// node `node` (both counted from 1, as in 10.244.`node`.`host + 1`) gets address
    /// `ip(node, host)`. Nothing is created.
    pub fn render(&self, ip: impl Fn(u8, u8) -> Ipv4Addr) -> Result<Rendered> {
        let mut plan = self.plan()?;
        for pod in &mut plan.pods {
            let [_, _, node, host] = pod.ip.octets();
            pod.ip = ip(node, host - 1);
        }
        let mut files = vec![(TOPOLOGY_FILE.to_owned(), render_topology(self, &plan)?)];
        files.extend(self.yaml.iter().cloned());
        Ok(Rendered {
            files,
            nodes: plan
                .nodes
                .iter()
                .filter(|n| n.ztunnel)
                .map(|n| n.name.clone())
                .collect(),
            pods: plan
                .pods
                .iter()
                .map(|p| (p.pod.key(), (p.node.clone(), p.ip)))
                .collect(),
        })
    }
}

fn join_documents(docs: &[Value]) -> Result<String> {
    let mut out = String::from("# Written by the e2e harness: the declared topology.\n");
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(doc).context("render yaml document")?);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Pod, Service};

    #[test]
    fn the_topology_renders_as_kubernetes_objects_ztunnel_can_read() {
        let spec = MeshBuilder::new("yaml")
            .node("n1")
            .namespace("default", Ambient::Yes)
            .namespace("legacy", Ambient::No)
            .pod(
                Pod::new("default", "server")
                    .on("n1")
                    .service_account("echo")
                    .labels([("app", "echo")]),
            )
            .pod(Pod::new("legacy", "raw").on("n1").unlisted())
            .service(
                Service::new("default", "echo")
                    .vip("10.96.0.10")
                    .port(80, 8080)
                    .selector([("app", "echo")]),
            );
        let plan = spec.plan().expect("valid");
        let text = render_topology(&spec, &plan).expect("renders");
        let docs: Vec<Value> = text
            .split("\n---\n")
            .skip(1)
            .map(|doc| serde_yaml::from_str(doc).expect("valid yaml"))
            .collect();
        let kinds: Vec<&str> = docs.iter().filter_map(|d| d["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            ["Namespace", "Namespace", "ServiceAccount", "Pod", "Service"]
        );
        assert_eq!(
            docs[0]["metadata"]["labels"][DATAPLANE_MODE],
            json!("ambient")
        );
        assert_eq!(docs[1]["metadata"]["labels"], json!({}));
        let pod = &docs[3];
        assert_eq!(pod["spec"]["nodeName"], json!("n1"));
        assert_eq!(pod["spec"]["serviceAccountName"], json!("echo"));
        assert_eq!(pod["status"]["podIP"], json!("10.244.1.2"));
        let svc = &docs[4];
        assert_eq!(svc["spec"]["clusterIP"], json!("10.96.0.10"));
        assert_eq!(svc["spec"]["ports"][0]["port"], json!(80));
        assert_eq!(svc["spec"]["ports"][0]["targetPort"], json!(8080));
        assert_eq!(svc["spec"]["selector"], json!({"app": "echo"}));
    }
}
