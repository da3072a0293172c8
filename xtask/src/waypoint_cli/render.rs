//! The objects of a waypoint, as text: the `Gateway` both modes write, the `Pod` the local
//! mesh runs it in, the Deployment/Service/ServiceAccount of a cluster (from the template
//! `manifests/waypoint.yaml`), and the `kubectl` command lines of cluster mode. Pure.

use std::fmt;

use anyhow::{bail, Context, Result};
use serde_yaml::Value;

pub use crate::cluster::{check_name, Kubectl, GATEWAY_NAME_LABEL};
use crate::cluster::{documents, kind, set_gateway_name, set_metadata, set_subjects, to_yaml};
// The names Istio gives these labels and the class, as the agents' model reads them.
pub use mesh_model::model::{
    USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL, WAYPOINT_FOR_LABEL,
    WAYPOINT_GATEWAY_CLASS as WAYPOINT_CLASS,
};
/// The Gateway's one listener: HBONE on 15008, as Istio's waypoints declare it.
pub const HBONE_PORT: u16 = 15008;
/// The image the local pod names (informational: the local mesh runs the binary).
pub const LOCAL_IMAGE: &str = "ambient-waypoint";
/// The cluster template: a Deployment, Service and ServiceAccount for `default/waypoint`.
pub const TEMPLATE: &str = include_str!("../../../manifests/waypoint.yaml");
/// How errors name the template.
const TEMPLATE_PATH: &str = "manifests/waypoint.yaml";

/// `istio.io/waypoint-for`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum WaypointFor {
    /// Traffic to Services that use the waypoint (Istio's default).
    #[default]
    Service,
    /// Traffic addressed to pods that use it.
    Workload,
    /// Both.
    All,
}

impl WaypointFor {
    pub fn as_str(self) -> &'static str {
        match self {
            WaypointFor::Service => "service",
            WaypointFor::Workload => "workload",
            WaypointFor::All => "all",
        }
    }
}

impl fmt::Display for WaypointFor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One waypoint: Gateway `namespace/name`, identity `namespace/service_account`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waypoint {
    pub namespace: String,
    pub name: String,
    pub service_account: String,
    pub waypoint_for: WaypointFor,
}

impl Waypoint {
    /// Checks every name is a DNS-1123 label (what Kubernetes requires of namespaces,
    /// service accounts and, here, the Gateway, whose name is also a label value).
    pub fn new(
        namespace: &str,
        name: &str,
        service_account: Option<&str>,
        waypoint_for: WaypointFor,
    ) -> Result<Waypoint> {
        // Istio's default: the waypoint's service account is named after its Gateway.
        let service_account = service_account.unwrap_or(name);
        for (what, value) in [
            ("namespace", namespace),
            ("name", name),
            ("service account", service_account),
        ] {
            check_name(value).with_context(|| format!("waypoint {what} {value:?}"))?;
        }
        Ok(Waypoint {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            service_account: service_account.to_owned(),
            waypoint_for,
        })
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub fn spiffe_id(&self, trust_domain: &str) -> String {
        crate::cluster::spiffe_id(trust_domain, &self.namespace, &self.service_account)
    }
}

/// The waypoint's `Gateway`, as `waypoint apply` writes it in both modes.
pub fn gateway(wp: &Waypoint) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\n\
         kind: Gateway\n\
         metadata:\n\
         \x20 name: {name}\n\
         \x20 namespace: {namespace}\n\
         \x20 labels:\n\
         \x20   {WAYPOINT_FOR_LABEL}: {waypoint_for}\n\
         spec:\n\
         \x20 gatewayClassName: {WAYPOINT_CLASS}\n\
         \x20 listeners:\n\
         \x20 - name: mesh\n\
         \x20   port: {HBONE_PORT}\n\
         \x20   protocol: HBONE\n",
        name = wp.name,
        namespace = wp.namespace,
        waypoint_for = wp.waypoint_for,
    )
}

/// The local mesh's file for a waypoint: its Gateway and the pod `cargo xtask up` runs the
/// `waypoint` process in (on `node`): the pod's IP is the waypoint's address and its service
/// account the waypoint's identity (see `mesh_model::model::waypoint`).
pub fn local_file(wp: &Waypoint, node: &str) -> String {
    format!(
        "# Written by `cargo xtask waypoint apply -n {namespace} --name {name}`; \
         `cargo xtask waypoint delete` removes it.\n\
         # The waypoint {namespace}/{name}: Services (or, for `workload`/`all`, pods) labelled\n\
         # `{USE_WAYPOINT_LABEL}: {name}` (or in a namespace so labelled) are reached through it.\n\
         ---\n\
         {gateway}\
         ---\n\
         # The pod `cargo xtask up` runs the `waypoint` process in (its own network namespace):\n\
         # its IP is the waypoint's address, its service account the waypoint's identity\n\
         # (spiffe://cluster.local/ns/{namespace}/sa/{sa}). The node agents never capture it.\n\
         apiVersion: v1\n\
         kind: Pod\n\
         metadata:\n\
         \x20 name: {name}\n\
         \x20 namespace: {namespace}\n\
         \x20 labels:\n\
         \x20   {GATEWAY_NAME_LABEL}: {name}\n\
         spec:\n\
         \x20 nodeName: {node}\n\
         \x20 serviceAccountName: {sa}\n\
         \x20 containers:\n\
         \x20 - name: waypoint\n\
         \x20   image: {LOCAL_IMAGE}\n\
         \x20   ports:\n\
         \x20   - {{name: hbone, containerPort: 15008}}\n\
         \x20   - {{name: metrics, containerPort: 15020}}\n\
         \x20   - {{name: readiness, containerPort: 15021}}\n",
        namespace = wp.namespace,
        name = wp.name,
        sa = wp.service_account,
        gateway = gateway(wp),
    )
}

/// The file name `waypoint apply` writes in a local config directory.
pub fn local_file_name(wp: &Waypoint) -> String {
    format!("waypoint-{}-{}.yaml", wp.namespace, wp.name)
}

/// The cluster objects of a waypoint: its Gateway, then the template's ServiceAccount,
/// Deployment and Service renamed for it, as one multi-document YAML for `kubectl apply -f -`.
pub fn cluster_objects(wp: &Waypoint) -> Result<String> {
    let mut docs = documents(TEMPLATE, TEMPLATE_PATH)?;
    for doc in &mut docs {
        rename(doc, wp)?;
    }
    Ok(gateway(wp) + &to_yaml(&docs, TEMPLATE_PATH)?)
}

/// Points one template document at `wp`: its namespace, its name (the ServiceAccount's is the
/// waypoint's service account), every `gateway-name` label and selector, the pod's service
/// account. Everything else (the waypoint's own flags) comes from the downward API, so the
/// template needs no other substitution.
fn rename(doc: &mut Value, wp: &Waypoint) -> Result<()> {
    let name = match kind(doc) {
        "ServiceAccount" => wp.service_account.clone(),
        "Deployment" | "Service" => wp.name.clone(),
        "ClusterRoleBinding" => cluster_role_binding_name(&wp.namespace, &wp.name),
        other => bail!("{TEMPLATE_PATH}: unexpected kind {other:?}"),
    };
    set_metadata(doc, &name, &wp.namespace, TEMPLATE_PATH)?;
    if kind(doc) == "ClusterRoleBinding" {
        // Cluster-scoped: it binds the waypoint's service account.
        set_subjects(doc, &wp.service_account, &wp.namespace, TEMPLATE_PATH)?;
    }
    set_gateway_name(doc, &wp.name);
    if kind(doc) == "Deployment" {
        crate::cluster::pod_spec_mut(doc, TEMPLATE_PATH)?.insert(
            "serviceAccountName".into(),
            wp.service_account.clone().into(),
        );
    }
    Ok(())
}

/// The (cluster-scoped) binding of waypoint `namespace/name` to the `ambient-waypoint` role.
fn cluster_role_binding_name(namespace: &str, name: &str) -> String {
    format!("ambient-waypoint-{namespace}-{name}")
}

// === kubectl ===

/// `waypoint apply --kubectl`: apply the objects, then label the namespace if asked.
pub fn kubectl_apply(wp: &Waypoint, enroll_namespace: bool) -> Result<Vec<Kubectl>> {
    let mut commands = vec![Kubectl::apply(cluster_objects(wp)?)];
    if enroll_namespace {
        let label = format!("{USE_WAYPOINT_LABEL}={}", wp.name);
        // The waypoint is in the namespace itself: a leftover pointer elsewhere must go.
        let unset = format!("{USE_WAYPOINT_NAMESPACE_LABEL}-");
        commands.push(Kubectl::new(&[
            "label",
            "namespace",
            &wp.namespace,
            &label,
            &unset,
            "--overwrite",
        ]));
    }
    Ok(commands)
}

/// `waypoint delete --kubectl`: the Gateway, then what carries its `gateway-name` label.
pub fn kubectl_delete(namespace: &str, name: &str) -> Vec<Kubectl> {
    let gateway = format!("gateways.gateway.networking.k8s.io/{name}");
    let selector = format!("{GATEWAY_NAME_LABEL}={name}");
    vec![
        Kubectl::new(&["delete", "-n", namespace, &gateway, "--ignore-not-found"]),
        Kubectl::new(&[
            "delete",
            "-n",
            namespace,
            "deployments,services,serviceaccounts",
            "-l",
            &selector,
            "--ignore-not-found",
        ]),
        Kubectl::new(&[
            "delete",
            &format!(
                "clusterrolebindings.rbac.authorization.k8s.io/{}",
                cluster_role_binding_name(namespace, name)
            ),
            "--ignore-not-found",
        ]),
    ]
}

/// `waypoint list --kubectl`: Gateways with their class and `waypoint-for`.
pub fn kubectl_list(namespace: Option<&str>) -> Kubectl {
    let columns = "custom-columns=NAMESPACE:.metadata.namespace,NAME:.metadata.name,\
                   CLASS:.spec.gatewayClassName,FOR:.metadata.labels.istio\\.io/waypoint-for,\
                   ADDRESS:.status.addresses[0].value";
    let mut args = vec!["get", "gateways.gateway.networking.k8s.io"];
    match namespace {
        Some(ns) => args.extend(["-n", ns]),
        None => args.push("-A"),
    }
    args.extend(["-o", columns]);
    Kubectl::new(&args)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Namespace and name the template is written for.
    const TEMPLATE_NAMESPACE: &str = "default";
    const TEMPLATE_NAME: &str = "waypoint";

    fn wp(namespace: &str, name: &str, sa: Option<&str>, waypoint_for: WaypointFor) -> Waypoint {
        Waypoint::new(namespace, name, sa, waypoint_for).expect("valid names")
    }

    #[test]
    fn names_must_be_dns_labels() {
        let err =
            Waypoint::new("demo", "wp", Some("Bad_SA"), WaypointFor::Service).expect_err("refused");
        assert!(
            format!("{err:#}").contains("waypoint service account \"Bad_SA\""),
            "{err:#}"
        );
    }

    #[test]
    fn the_service_account_defaults_to_the_gateway_name() {
        let w = wp("demo", "waypoint", None, WaypointFor::Service);
        assert_eq!(w.service_account, "waypoint");
        assert_eq!(
            w.spiffe_id("cluster.local"),
            "spiffe://cluster.local/ns/demo/sa/waypoint"
        );
        let w = wp("demo", "wp", Some("l7"), WaypointFor::All);
        assert_eq!(w.spiffe_id("td"), "spiffe://td/ns/demo/sa/l7");
    }

    /// The local file goes through the agents' translator: a waypoint Gateway for the
    /// given traffic, and a pod that is its address and identity once it has an IP.
    #[test]
    fn the_local_file_is_a_waypoint_gateway_and_its_pod_for_the_translator() {
        for waypoint_for in [
            WaypointFor::Service,
            WaypointFor::Workload,
            WaypointFor::All,
        ] {
            let w = wp("demo", "wp", Some("l7"), waypoint_for);
            let text = local_file(&w, "n2");
            let model = mesh_model::k8s::load_docs(&[(local_file_name(&w), text.clone())])
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
            let gw = model
                .gateways
                .get(&mesh_model::model::NamespacedName::new("demo", "wp"))
                .expect("gateway");
            assert!(gw.is_waypoint());
            assert_eq!(
                gw.labels.get(WAYPOINT_FOR_LABEL).map(String::as_str),
                Some(waypoint_for.as_str())
            );
            let pod = model
                .pods
                .get(&mesh_model::model::NamespacedName::new("demo", "wp"))
                .expect("pod");
            assert_eq!(pod.service_account, "l7");
            assert_eq!(pod.node_name.as_deref(), Some("n2"));
            assert!(model.is_waypoint_pod(pod), "never captured");
            let target = model.waypoint_target(gw);
            assert_eq!(
                (
                    target.service_account.namespace.as_str(),
                    target.service_account.name.as_str()
                ),
                ("demo", "wp"),
                "no IP yet (no status): Istio's default identity until the mesh runs it"
            );
        }
        assert_eq!(
            local_file_name(&wp("demo", "wp", None, WaypointFor::Service)),
            "waypoint-demo-wp.yaml"
        );
    }

    #[test]
    fn the_gateway_has_the_class_label_and_hbone_listener_istio_expects() {
        let text = gateway(&wp("demo", "waypoint", None, WaypointFor::Workload));
        let doc: Value = serde_yaml::from_str(&text).expect("yaml");
        assert_eq!(doc["apiVersion"], "gateway.networking.k8s.io/v1");
        assert_eq!(doc["kind"], "Gateway");
        assert_eq!(doc["metadata"]["labels"][WAYPOINT_FOR_LABEL], "workload");
        assert_eq!(doc["spec"]["gatewayClassName"], "istio-waypoint");
        let listeners = doc["spec"]["listeners"].as_sequence().expect("listeners");
        assert_eq!(listeners.len(), 1);
        assert_eq!(listeners[0]["name"], "mesh");
        assert_eq!(listeners[0]["port"], 15008);
        assert_eq!(listeners[0]["protocol"], "HBONE");
    }

    fn docs(text: &str) -> Vec<Value> {
        documents(text, "rendered").expect("yaml")
    }

    #[test]
    fn the_template_renders_unchanged_for_its_own_names() {
        let w = wp(
            TEMPLATE_NAMESPACE,
            TEMPLATE_NAME,
            None,
            WaypointFor::Service,
        );
        let rendered = docs(&cluster_objects(&w).expect("render"));
        assert_eq!(rendered[0]["kind"], "Gateway");
        assert_eq!(&rendered[1..], docs(TEMPLATE).as_slice());
    }

    #[test]
    fn cluster_objects_are_renamed_for_the_waypoint_everywhere() {
        let w = wp("shop", "cart-wp", Some("cart-l7"), WaypointFor::Service);
        let rendered = docs(&cluster_objects(&w).expect("render"));
        let kinds: Vec<&str> = rendered.iter().filter_map(|d| d["kind"].as_str()).collect();
        assert_eq!(
            kinds,
            [
                "Gateway",
                "ServiceAccount",
                "ClusterRoleBinding",
                "Deployment",
                "Service"
            ]
        );
        for doc in rendered
            .iter()
            .filter(|d| d["kind"] != "ClusterRoleBinding")
        {
            assert_eq!(doc["metadata"]["namespace"], "shop", "{doc:?}");
        }
        let by_kind = |k: &str| {
            rendered
                .iter()
                .find(|d| d["kind"] == k)
                .expect("kind present")
        };
        assert_eq!(by_kind("ServiceAccount")["metadata"]["name"], "cart-l7");
        let binding = by_kind("ClusterRoleBinding");
        assert_eq!(binding["metadata"]["name"], "ambient-waypoint-shop-cart-wp");
        assert!(binding["metadata"]["namespace"].is_null(), "{binding:?}");
        assert_eq!(binding["roleRef"]["name"], "ambient-waypoint");
        assert_eq!(binding["subjects"][0]["name"], "cart-l7");
        assert_eq!(binding["subjects"][0]["namespace"], "shop");
        let deployment = by_kind("Deployment");
        assert_eq!(deployment["metadata"]["name"], "cart-wp");
        crate::cluster::assert_runs_gateway(deployment, "cart-wp", "cart-l7");
        let service = by_kind("Service");
        assert_eq!(service["metadata"]["name"], "cart-wp");
        assert_eq!(service["spec"]["selector"][GATEWAY_NAME_LABEL], "cart-wp");
        // Nothing of the template's own names is left.
        let text = serde_yaml::to_string(&rendered[1..]).expect("yaml");
        assert!(!text.contains("namespace: default"), "{text}");
        assert!(!text.contains(": waypoint\n"), "{text}");
    }

    #[test]
    fn cluster_mode_runs_these_kubectl_commands() {
        let w = wp("demo", "waypoint", None, WaypointFor::Service);
        let apply = kubectl_apply(&w, true).expect("render");
        let lines: Vec<String> = apply.iter().map(Kubectl::line).collect();
        assert_eq!(
            lines,
            [
                "kubectl apply -f - < (the YAML above)",
                "kubectl label namespace demo istio.io/use-waypoint=waypoint \
                 istio.io/use-waypoint-namespace- --overwrite",
            ]
        );
        assert_eq!(
            apply[0].stdin.as_deref(),
            Some(cluster_objects(&w).expect("render").as_str())
        );
        assert_eq!(kubectl_apply(&w, false).expect("render").len(), 1);
        let delete: Vec<String> = kubectl_delete("demo", "waypoint")
            .iter()
            .map(Kubectl::line)
            .collect();
        assert_eq!(
            delete,
            [
                "kubectl delete -n demo gateways.gateway.networking.k8s.io/waypoint \
                 --ignore-not-found",
                "kubectl delete -n demo deployments,services,serviceaccounts \
                 -l gateway.networking.k8s.io/gateway-name=waypoint --ignore-not-found",
                "kubectl delete clusterrolebindings.rbac.authorization.k8s.io/\
                 ambient-waypoint-demo-waypoint --ignore-not-found",
            ]
        );
        let list = kubectl_list(Some("demo"));
        assert_eq!(
            &list.args[..4],
            ["get", "gateways.gateway.networking.k8s.io", "-n", "demo"]
        );
        assert!(kubectl_list(None).args.contains(&"-A".to_owned()));
    }
}
