//! The objects of a waypoint, as text: the `Gateway` both modes write, the `Pod` the local
//! mesh runs it in, the Deployment/Service/ServiceAccount of a cluster (from the template
//! `manifests/waypoint.yaml`), and the `kubectl` command lines of cluster mode. Pure.

use std::fmt;

use anyhow::{bail, Context, Result};
use serde_yaml::Value;

// The names Istio gives these labels and the class, as the agents' model reads them.
pub use mesh_model::model::{
    GATEWAY_NAME_LABEL, USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL, WAYPOINT_FOR_LABEL,
    WAYPOINT_GATEWAY_CLASS as WAYPOINT_CLASS,
};
/// The Gateway's one listener: HBONE on 15008, as Istio's waypoints declare it.
pub const HBONE_PORT: u16 = 15008;
/// The image the local pod names (informational: the local mesh runs the binary).
pub const LOCAL_IMAGE: &str = "ambient-waypoint";
/// The cluster template: a Deployment, Service and ServiceAccount for `default/waypoint`.
pub const TEMPLATE: &str = include_str!("../../../manifests/waypoint.yaml");
/// Longest Kubernetes object name / label value the waypoint's names must fit.
const MAX_NAME: usize = 63;

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
        format!(
            "spiffe://{trust_domain}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
}

/// A DNS-1123 label: 1 to 63 of `a-z`, `0-9`, `-`, starting and ending alphanumeric.
pub fn check_name(value: &str) -> Result<()> {
    let bytes = value.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if value.is_empty() || value.len() > MAX_NAME {
        bail!("must be 1 to {MAX_NAME} characters");
    }
    if !bytes.iter().all(|b| alnum(b) || *b == b'-') {
        bail!("may only contain lower-case letters, digits and '-'");
    }
    if !bytes.first().is_some_and(alnum) || !bytes.last().is_some_and(alnum) {
        bail!("must start and end with a letter or digit");
    }
    Ok(())
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
    let mut out = gateway(wp);
    for mut doc in template_documents()? {
        rename(&mut doc, wp)?;
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&doc).context("render the waypoint template")?);
    }
    Ok(out)
}

/// The template's documents (comments dropped).
fn template_documents() -> Result<Vec<Value>> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(TEMPLATE) {
        let value = Value::deserialize(doc).context("parse manifests/waypoint.yaml")?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Points one template document at `wp`: its namespace, its name (the ServiceAccount's is the
/// waypoint's service account), every `gateway-name` label and selector, the pod's service
/// account. Everything else (the waypoint's own flags) comes from the downward API, so the
/// template needs no other substitution.
fn rename(doc: &mut Value, wp: &Waypoint) -> Result<()> {
    let kind = doc
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let name = match kind.as_str() {
        "ServiceAccount" => wp.service_account.clone(),
        "Deployment" | "Service" => wp.name.clone(),
        "ClusterRoleBinding" => cluster_role_binding_name(&wp.namespace, &wp.name),
        other => bail!("manifests/waypoint.yaml: unexpected kind {other:?}"),
    };
    let metadata = doc
        .get_mut("metadata")
        .and_then(Value::as_mapping_mut)
        .with_context(|| format!("manifests/waypoint.yaml: {kind} without metadata"))?;
    metadata.insert("name".into(), name.into());
    if kind == "ClusterRoleBinding" {
        // Cluster-scoped: no namespace; it binds the waypoint's service account.
        let subjects = doc
            .get_mut("subjects")
            .and_then(Value::as_sequence_mut)
            .context("manifests/waypoint.yaml: ClusterRoleBinding without subjects")?;
        for subject in subjects.iter_mut().filter_map(Value::as_mapping_mut) {
            subject.insert("name".into(), wp.service_account.clone().into());
            subject.insert("namespace".into(), wp.namespace.clone().into());
        }
    } else {
        metadata.insert("namespace".into(), wp.namespace.clone().into());
    }
    set_gateway_name(doc, &wp.name);
    if kind == "Deployment" {
        let pod = doc
            .get_mut("spec")
            .and_then(|s| s.get_mut("template"))
            .and_then(|t| t.get_mut("spec"))
            .and_then(Value::as_mapping_mut)
            .context("manifests/waypoint.yaml: Deployment without spec.template.spec")?;
        pod.insert(
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

/// Sets every `gateway.networking.k8s.io/gateway-name` key (labels, selectors) to `name`.
fn set_gateway_name(value: &mut Value, name: &str) {
    match value {
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                if k.as_str() == Some(GATEWAY_NAME_LABEL) && v.is_string() {
                    *v = name.into();
                } else {
                    set_gateway_name(v, name);
                }
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(|v| set_gateway_name(v, name)),
        _ => {}
    }
}

// === kubectl ===

/// One `kubectl` invocation: its arguments and what it reads on stdin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kubectl {
    pub args: Vec<String>,
    pub stdin: Option<String>,
}

impl Kubectl {
    fn new(args: &[&str]) -> Kubectl {
        Kubectl {
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            stdin: None,
        }
    }

    /// The command line as a user would type it (the stdin noted).
    pub fn line(&self) -> String {
        let mut line = format!("kubectl {}", self.args.join(" "));
        if self.stdin.is_some() {
            line.push_str(" < (the YAML above)");
        }
        line
    }
}

/// `waypoint apply --kubectl`: apply the objects, then label the namespace if asked.
pub fn kubectl_apply(wp: &Waypoint, enroll_namespace: bool) -> Result<Vec<Kubectl>> {
    let mut apply = Kubectl::new(&["apply", "-f", "-"]);
    apply.stdin = Some(cluster_objects(wp)?);
    let mut commands = vec![apply];
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

    fn check_name_case(value: &str, ok: bool) {
        assert_eq!(check_name(value).is_ok(), ok, "{value:?}");
    }

    #[test]
    fn names_must_be_dns_labels() {
        check_name_case("waypoint", true);
        check_name_case("wp-1", true);
        check_name_case("1wp", true);
        check_name_case(&"a".repeat(63), true);
        check_name_case(&"a".repeat(64), false);
        check_name_case("", false);
        check_name_case("Waypoint", false);
        check_name_case("-wp", false);
        check_name_case("wp-", false);
        check_name_case("wp.demo", false);
        check_name_case("wp/demo", false);
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
        use serde::Deserialize;
        serde_yaml::Deserializer::from_str(text)
            .map(|d| Value::deserialize(d).expect("yaml"))
            .filter(|v| !v.is_null())
            .collect()
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
        assert_eq!(
            deployment["spec"]["selector"]["matchLabels"][GATEWAY_NAME_LABEL],
            "cart-wp"
        );
        let pod = &deployment["spec"]["template"];
        assert_eq!(pod["metadata"]["labels"][GATEWAY_NAME_LABEL], "cart-wp");
        assert_eq!(pod["spec"]["serviceAccountName"], "cart-l7");
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
