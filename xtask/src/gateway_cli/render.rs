//! The objects that run an ingress gateway, as text: the ServiceAccount, RBAC, Deployment and
//! LoadBalancer Service of the template `manifests/ingress-gateway.yaml` (written for Gateway
//! `default/gateway`) renamed for one [`IngressGateway`], with its listener ports and its
//! `infrastructure` labels and annotations; and the `kubectl` commands of `gateway apply` and
//! `gateway delete`. Pure.
//!
//! Names follow Istio's: the objects are `<gateway>-istio` (`<gateway>-istio-status` for the
//! status Role and its binding), the cluster-scoped bindings
//! `ambient-ingress-gateway-<namespace>-<gateway>[-mesh]`.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{bail, Context, Result};
use serde_yaml::{Mapping, Value};

use crate::cluster::{
    documents, field_mut, kind, mapping_mut, pod_spec_mut, set_gateway_name, set_metadata,
    set_subjects, to_yaml, Kubectl, MAX_NAME, TRUST_DOMAIN,
};

/// The template: the objects that run Gateway `default/gateway`.
pub const TEMPLATE: &str = include_str!("../../../manifests/ingress-gateway.yaml");
/// How errors and comments name the template.
pub const TEMPLATE_PATH: &str = "manifests/ingress-gateway.yaml";
/// The Gateway the template is written for.
pub const TEMPLATE_NAMESPACE: &str = "default";
pub const TEMPLATE_NAME: &str = "gateway";
/// What Istio appends to a Gateway's name to name the objects that run it.
const OBJECT_SUFFIX: &str = "-istio";
/// The cluster-scoped bindings are `<prefix>-<namespace>-<gateway>[-...]`.
const CLUSTER_BINDING_PREFIX: &str = "ambient-ingress-gateway";
/// The proxy's own ports (`DEFAULT_*_ADDR` in shell/src/config.rs and waypoint/src/config.rs):
/// the template's entries for them stay, and no listener may take them.
pub const PROXY_PORTS: [(u16, &str); 4] = [
    (15000, "admin"),
    (15008, "HBONE"),
    (15020, "metrics"),
    (15021, "readiness"),
];
/// Longest port name (an IANA_SVC_NAME).
const MAX_PORT_NAME: usize = 15;
/// The Service's type: clients outside the cluster reach the listeners.
const SERVICE_TYPE: &str = "LoadBalancer";

/// One listener port of a Gateway: the first listener on it names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListenerPort {
    pub listener: String,
    pub port: u16,
}

/// Gateway API `spec.infrastructure`: labels and annotations for what runs the Gateway (here
/// the Deployment's pods and the Service).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Infrastructure {
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// One `Gateway` of class `istio`, read and checked (see `super::read`).
#[derive(Clone, Debug, PartialEq)]
pub struct IngressGateway {
    pub namespace: String,
    pub name: String,
    /// Unique port numbers, in the order of the listeners.
    pub ports: Vec<ListenerPort>,
    pub infrastructure: Infrastructure,
    /// The Gateway as `gateway apply` applies it (its namespace written in).
    pub object: Value,
}

impl IngressGateway {
    /// A Gateway with only its names (what `gateway delete` needs); checks the names: DNS
    /// labels, and `<name>-istio` a valid Service name (a DNS-1035 label: at most 63
    /// characters, starting with a letter).
    pub fn named(namespace: &str, name: &str) -> Result<IngressGateway> {
        crate::cluster::check_name(namespace)
            .with_context(|| format!("namespace {namespace:?}"))?;
        crate::cluster::check_name(name).with_context(|| format!("Gateway name {name:?}"))?;
        let objects = object_name(name);
        if objects.len() > MAX_NAME {
            bail!(
                "Gateway name {name:?}: the objects that run it are named {objects:?}, longer \
                 than {MAX_NAME} characters"
            );
        }
        if !name.starts_with(|c: char| c.is_ascii_lowercase()) {
            bail!(
                "Gateway name {name:?}: must start with a letter (its Service {objects:?} is \
                 a DNS-1035 label)"
            );
        }
        Ok(IngressGateway {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            ports: Vec::new(),
            infrastructure: Infrastructure::default(),
            object: Value::Null,
        })
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// `<name>-istio`: its ServiceAccount, Deployment and Service.
    pub fn objects_name(&self) -> String {
        object_name(&self.name)
    }

    /// The service account of its pods, and so its identity.
    pub fn service_account(&self) -> String {
        self.objects_name()
    }
}

/// `<gateway>-istio`: the ServiceAccount, Deployment and Service.
fn object_name(gateway: &str) -> String {
    format!("{gateway}{OBJECT_SUFFIX}")
}

/// `ambient-ingress-gateway-<namespace>-<gateway>`: the cluster-scoped bindings.
fn cluster_binding_name(namespace: &str, gateway: &str) -> String {
    format!("{CLUSTER_BINDING_PREFIX}-{namespace}-{gateway}")
}

// === rendering ===

/// The template's objects renamed for `gw`, in the template's order.
pub fn objects(gw: &IngressGateway) -> Result<Vec<Value>> {
    let mut docs = documents(TEMPLATE, TEMPLATE_PATH)?;
    let ports = port_entries(gw, &kept_port_names(&docs))?;
    for doc in &mut docs {
        rename(doc, gw, &ports)?;
    }
    Ok(docs)
}

/// What `gateway render` prints for `gw`: a comment naming it and its identity, then
/// [`objects`].
pub fn objects_text(gw: &IngressGateway) -> Result<String> {
    Ok(format!(
        "# Ingress gateway {key} (class istio): {TEMPLATE_PATH} rendered by\n\
         # `cargo xtask gateway`. Its identity: {identity}.\n{objects}",
        key = gw.key(),
        identity = crate::cluster::spiffe_id(TRUST_DOMAIN, &gw.namespace, &gw.service_account()),
        objects = to_yaml(&objects(gw)?, TEMPLATE_PATH)?,
    ))
}

/// The listener ports as named entries: names from the listeners' names, valid and unique,
/// none of `taken` (the names of the template's own ports).
fn port_entries(gw: &IngressGateway, taken: &BTreeSet<String>) -> Result<Vec<(String, u16)>> {
    let mut taken = taken.clone();
    let mut out = Vec::with_capacity(gw.ports.len());
    for p in &gw.ports {
        let name = port_name(&p.listener, p.port, &taken).with_context(|| {
            format!("no port name for listener {:?} of {}", p.listener, gw.key())
        })?;
        taken.insert(name.clone());
        out.push((name, p.port));
    }
    Ok(out)
}

/// A valid IANA_SVC_NAME (1-15 of `a-z`, `0-9`, `-`, a letter among them, no `-` at either end
/// nor two in a row) from `listener`, not in `taken`: the listener's name lower-cased, every
/// other character a `-`, cut to 15; `port-<port>` when that has no letter; `-2`, `-3`...
/// appended while taken.
pub fn port_name(listener: &str, port: u16, taken: &BTreeSet<String>) -> Option<String> {
    let mut base = String::new();
    for c in listener.chars().map(|c| c.to_ascii_lowercase()) {
        if c.is_ascii_lowercase() || c.is_ascii_digit() {
            base.push(c);
        } else if !base.is_empty() && !base.ends_with('-') {
            base.push('-');
        }
    }
    let fallback = format!("port-{port}");
    let bases = [fit(&base, ""), fallback];
    // Each base gives as many candidates as there are names taken, plus one: one is free.
    bases
        .iter()
        .flat_map(|base| {
            (1..=taken.len() + 1).map(move |n| match n {
                1 => base.clone(),
                n => fit(base, &format!("-{n}")),
            })
        })
        .find(|name| is_port_name(name) && !taken.contains(name))
}

/// `base` cut so that `base + suffix` fits a port name (no `-` left at the cut), `+ suffix`.
fn fit(base: &str, suffix: &str) -> String {
    let keep = MAX_PORT_NAME.saturating_sub(suffix.len()).min(base.len());
    format!("{}{suffix}", base[..keep].trim_end_matches('-'))
}

/// A valid IANA_SVC_NAME, as Kubernetes checks a port's name.
pub fn is_port_name(name: &str) -> bool {
    let b = name.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_PORT_NAME
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(u8::is_ascii_lowercase)
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !name.contains("--")
}

/// Whether a port entry of the template is one of the proxy's own (kept as it is).
fn is_proxy_port(entry: &Value, key: &str) -> bool {
    entry[key]
        .as_u64()
        .is_some_and(|p| PROXY_PORTS.iter().any(|(own, _)| u64::from(*own) == p))
}

/// The names of the template's kept ports (Deployment and Service).
fn kept_port_names(docs: &[Value]) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for doc in docs {
        let (ports, key) = match kind(doc) {
            "Deployment" => (
                &doc["spec"]["template"]["spec"]["containers"][0]["ports"],
                "containerPort",
            ),
            "Service" => (&doc["spec"]["ports"], "port"),
            _ => continue,
        };
        for entry in ports.as_sequence().into_iter().flatten() {
            if let Some(name) = entry["name"].as_str().filter(|_| is_proxy_port(entry, key)) {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// Points one template document at `gw` (see the module docs for the names).
fn rename(doc: &mut Value, gw: &IngressGateway, ports: &[(String, u16)]) -> Result<()> {
    let kind = kind(doc).to_owned();
    let name = doc["metadata"]["name"]
        .as_str()
        .with_context(|| format!("{TEMPLATE_PATH}: {kind} without a name"))?;
    let name = rename_name(name, gw)?;
    set_metadata(doc, &name, &gw.namespace, TEMPLATE_PATH)?;
    set_gateway_name(doc, &gw.name);
    match kind.as_str() {
        "ServiceAccount" => {}
        "ClusterRoleBinding" | "RoleBinding" => {
            set_subjects(doc, &gw.service_account(), &gw.namespace, TEMPLATE_PATH)?;
            let role = mapping_mut(doc, &["roleRef"], TEMPLATE_PATH)?;
            if role.get("kind").and_then(Value::as_str) == Some("Role") {
                let own = role.get("name").and_then(Value::as_str).unwrap_or_default();
                let renamed = rename_name(own, gw)?;
                role.insert("name".into(), renamed.into());
            }
        }
        "Role" => {
            // Only its own Gateway's status: `resourceNames` names it.
            let rules = field_mut(doc, &["rules"], TEMPLATE_PATH)?;
            for rule in rules.as_sequence_mut().into_iter().flatten() {
                let names = rule
                    .get_mut("resourceNames")
                    .and_then(Value::as_sequence_mut);
                for n in names.into_iter().flatten().filter(|n| *n == TEMPLATE_NAME) {
                    *n = gw.name.clone().into();
                }
            }
        }
        "Deployment" => {
            let pod = pod_spec_mut(doc, TEMPLATE_PATH)?;
            pod.insert("serviceAccountName".into(), gw.service_account().into());
            // The template's one container is the proxy.
            let container = pod
                .get_mut("containers")
                .and_then(|c| c.get_mut(0))
                .with_context(|| format!("{TEMPLATE_PATH}: Deployment without containers"))?;
            set_ports(container, "containerPort", ports, |name, port| {
                entry(&[("name", name.into()), ("containerPort", port.into())])
            })?;
            let pods = field_mut(doc, &["spec", "template"], TEMPLATE_PATH)?;
            infrastructure(pods, &gw.infrastructure, "the Deployment's pods")?;
        }
        "Service" => {
            let spec = mapping_mut(doc, &["spec"], TEMPLATE_PATH)?;
            spec.insert("type".into(), SERVICE_TYPE.into());
            set_ports(
                field_mut(doc, &["spec"], TEMPLATE_PATH)?,
                "port",
                ports,
                |name, port| {
                    entry(&[
                        ("name", name.into()),
                        ("port", port.into()),
                        ("targetPort", port.into()),
                    ])
                },
            )?;
            infrastructure(doc, &gw.infrastructure, "the Service")?;
        }
        other => bail!("{TEMPLATE_PATH}: unexpected kind {other:?}"),
    }
    Ok(())
}

/// A template object's name for `gw`: derived from `<template gateway>-istio` or from the
/// cluster-scoped prefix for `default/gateway`, with the same suffix.
fn rename_name(name: &str, gw: &IngressGateway) -> Result<String> {
    let derived = [
        (object_name(TEMPLATE_NAME), object_name(&gw.name)),
        (
            cluster_binding_name(TEMPLATE_NAMESPACE, TEMPLATE_NAME),
            cluster_binding_name(&gw.namespace, &gw.name),
        ),
    ];
    for (from, to) in derived {
        if let Some(rest) = name.strip_prefix(from.as_str()) {
            if rest.is_empty() || rest.starts_with('-') {
                return Ok(format!("{to}{rest}"));
            }
        }
    }
    bail!("{TEMPLATE_PATH}: object name {name:?} is not derived from Gateway {TEMPLATE_NAMESPACE}/{TEMPLATE_NAME}")
}

/// A mapping of `pairs`, then `protocol: TCP` (the listeners of an ingress gateway are TCP).
fn entry(pairs: &[(&str, Value)]) -> Value {
    let mut map: Mapping = pairs
        .iter()
        .map(|(k, v)| (Value::from(*k), v.clone()))
        .collect();
    map.insert("protocol".into(), "TCP".into());
    Value::Mapping(map)
}

/// `parent.ports` = an entry per listener port (`make(name, port)`), then the template's
/// entries for the proxy's own ports (those whose `port_key` is one of [`PROXY_PORTS`]).
fn set_ports(
    parent: &mut Value,
    port_key: &str,
    ports: &[(String, u16)],
    make: impl Fn(&str, u16) -> Value,
) -> Result<()> {
    let entries = field_mut(parent, &["ports"], TEMPLATE_PATH)?;
    let mut out: Vec<Value> = ports.iter().map(|(n, p)| make(n, *p)).collect();
    let own = entries.as_sequence().into_iter().flatten();
    out.extend(own.filter(|e| is_proxy_port(e, port_key)).cloned());
    *entries = Value::Sequence(out);
    Ok(())
}

/// Adds the Gateway's `infrastructure` labels and annotations to `object`'s metadata. One may
/// add a key, not change the template's (the `gateway-name` label selects the pods; the
/// others keep the pods out of capture and the Service off waypoints).
fn infrastructure(object: &mut Value, infra: &Infrastructure, what: &str) -> Result<()> {
    for (field, entries) in [
        ("labels", &infra.labels),
        ("annotations", &infra.annotations),
    ] {
        if entries.is_empty() {
            continue;
        }
        let metadata = mapping_mut(object, &["metadata"], TEMPLATE_PATH)?;
        let map = metadata
            .entry(field.into())
            .or_insert_with(|| Value::Mapping(Mapping::new()))
            .as_mapping_mut()
            .with_context(|| format!("{TEMPLATE_PATH}: {what}: {field} is not a mapping"))?;
        for (key, value) in entries {
            match map.get(key.as_str()).and_then(Value::as_str) {
                Some(own) if own != value => bail!(
                    "spec.infrastructure.{field}.{key}: {value:?} would replace {own:?} on \
                     {what} (the ingress gateway needs it)"
                ),
                _ => {
                    map.insert(key.as_str().into(), value.as_str().into());
                }
            }
        }
    }
    Ok(())
}

// === kubectl ===

/// `gateway apply --kubectl`: each Gateway as given (its namespace written in), then the
/// objects that run it, in one `kubectl apply -f -`.
pub fn kubectl_apply(gateways: &[IngressGateway]) -> Result<Kubectl> {
    let mut yaml = String::new();
    for gw in gateways {
        yaml.push_str(&to_yaml(std::slice::from_ref(&gw.object), "the Gateway")?);
        yaml.push_str(&objects_text(gw)?);
    }
    Ok(Kubectl::apply(yaml))
}

/// `gateway delete --kubectl`: the Gateway, then the namespaced objects that run it, then the
/// cluster-scoped bindings, each by name (`--ignore-not-found`: deleting twice is fine).
pub fn kubectl_delete(namespace: &str, name: &str) -> Result<Vec<Kubectl>> {
    let gw = IngressGateway::named(namespace, name)?;
    let mut namespaced = Vec::new();
    let mut cluster = Vec::new();
    for doc in objects(&gw)? {
        let resource = resource(&doc)?;
        if doc["metadata"]["namespace"].is_null() {
            cluster.push(resource);
        } else {
            namespaced.push(resource);
        }
    }
    let gateway = format!("gateways.gateway.networking.k8s.io/{name}");
    let mut commands = vec![Kubectl::new(&[
        "delete",
        "-n",
        namespace,
        &gateway,
        "--ignore-not-found",
    ])];
    for (scope, resources) in [(Some(namespace), namespaced), (None, cluster)] {
        let mut args = vec!["delete"];
        if let Some(ns) = scope {
            args.extend(["-n", ns]);
        }
        args.extend(resources.iter().map(String::as_str));
        args.push("--ignore-not-found");
        commands.push(Kubectl::new(&args));
    }
    Ok(commands)
}

/// `<plural>[.<group>]/<name>` of an object, as `kubectl delete` takes it (every kind of the
/// template makes its plural with an `s`).
fn resource(doc: &Value) -> Result<String> {
    let kind = kind(doc);
    let name = doc["metadata"]["name"]
        .as_str()
        .with_context(|| format!("{TEMPLATE_PATH}: {kind} without a name"))?;
    let group = doc["apiVersion"]
        .as_str()
        .and_then(|v| v.split_once('/'))
        .map(|(group, _)| format!(".{group}"))
        .unwrap_or_default();
    Ok(format!("{}s{group}/{name}", kind.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::GATEWAY_NAME_LABEL;

    /// The Gateway the template's header comment shows (the `#   ` lines from its
    /// `apiVersion`).
    fn template_gateway() -> String {
        TEMPLATE
            .lines()
            .skip_while(|l| !l.starts_with("#   apiVersion: gateway.networking.k8s.io/"))
            .take_while(|l| l.starts_with("#   "))
            .map(|l| format!("{}\n", &l[4..]))
            .collect()
    }

    /// The one ingress gateway of `yaml`.
    fn gateway(yaml: &str) -> IngressGateway {
        let mut read = super::super::read("gw.yaml", yaml, None).expect("a valid Gateway");
        assert_eq!(read.gateways.len(), 1, "{yaml}");
        read.gateways.remove(0)
    }

    fn by_kind<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in {docs:#?}"))
    }

    /// `(name, number)` of each entry of a ports list.
    fn ports(list: &Value, key: &str) -> Vec<(String, u64)> {
        list.as_sequence()
            .expect("ports")
            .iter()
            .map(|p| {
                let name = p["name"].as_str().expect("named").to_owned();
                (name, p[key].as_u64().expect("a number"))
            })
            .collect()
    }

    const WEB: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: web, namespace: shop}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP}
  - name: https
    port: 443
    protocol: HTTPS
    tls: {mode: Terminate, certificateRefs: [{name: web-cert}]}
";

    #[test]
    fn the_template_renders_unchanged_for_its_own_gateway() {
        let own = template_gateway();
        assert!(own.contains("name: https"), "{own}");
        let gw = gateway(&own);
        assert_eq!(gw.key(), format!("{TEMPLATE_NAMESPACE}/{TEMPLATE_NAME}"));
        let rendered = objects(&gw).expect("render");
        assert_eq!(
            rendered,
            documents(TEMPLATE, TEMPLATE_PATH).expect("template")
        );
        // Its text too, but for the comments and the quoting.
        let text = objects_text(&gw).expect("render");
        assert!(text.starts_with(
            "# Ingress gateway default/gateway (class istio): manifests/ingress-gateway.yaml"
        ));
        assert!(text.contains("spiffe://cluster.local/ns/default/sa/gateway-istio"));
        assert_eq!(documents(&text, "rendered").expect("yaml"), rendered);
    }

    #[test]
    fn a_two_listener_gateway_is_renamed_everywhere_with_its_ports() {
        let gw = gateway(WEB);
        let docs = objects(&gw).expect("render");
        let kinds: Vec<(&str, &str)> = docs
            .iter()
            .map(|d| (kind(d), d["metadata"]["name"].as_str().expect("named")))
            .collect();
        assert_eq!(
            kinds,
            [
                ("ServiceAccount", "web-istio"),
                (
                    "ClusterRoleBinding",
                    "ambient-ingress-gateway-shop-web-mesh"
                ),
                ("ClusterRoleBinding", "ambient-ingress-gateway-shop-web"),
                ("Role", "web-istio-status"),
                ("RoleBinding", "web-istio-status"),
                ("Deployment", "web-istio"),
                ("Service", "web-istio"),
            ]
        );
        for doc in &docs {
            let namespace = &doc["metadata"]["namespace"];
            if kind(doc) == "ClusterRoleBinding" {
                assert!(namespace.is_null(), "cluster-scoped: {doc:?}");
            } else {
                assert_eq!(namespace, "shop", "{doc:?}");
            }
            assert_eq!(doc["metadata"]["labels"][GATEWAY_NAME_LABEL], "web");
            for subject in doc["subjects"].as_sequence().into_iter().flatten() {
                assert_eq!(
                    (&subject["name"], &subject["namespace"]),
                    (&"web-istio".into(), &"shop".into())
                );
            }
        }
        assert_eq!(
            by_kind(
                &docs,
                "ClusterRoleBinding",
                "ambient-ingress-gateway-shop-web-mesh"
            )["roleRef"]["name"],
            "ambient-waypoint",
            "ClusterRoles keep their names"
        );
        let role = by_kind(&docs, "Role", "web-istio-status");
        assert_eq!(role["rules"][0]["resourceNames"][0], "web");
        assert_eq!(role["rules"].as_sequence().map(Vec::len), Some(1));
        let binding = by_kind(&docs, "RoleBinding", "web-istio-status");
        assert_eq!(binding["roleRef"]["name"], "web-istio-status");

        let deployment = by_kind(&docs, "Deployment", "web-istio");
        crate::cluster::assert_runs_gateway(deployment, "web", "web-istio");
        let container = &deployment["spec"]["template"]["spec"]["containers"][0];
        let named = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
            v.iter().map(|(n, p)| ((*n).to_owned(), *p)).collect()
        };
        assert_eq!(
            ports(&container["ports"], "containerPort"),
            named(&[
                ("http", 80),
                ("https", 443),
                ("metrics", 15020),
                ("readiness", 15021)
            ])
        );
        assert_eq!(container["readinessProbe"]["httpGet"]["port"], 15021);

        let service = by_kind(&docs, "Service", "web-istio");
        assert_eq!(service["spec"]["type"], "LoadBalancer");
        assert_eq!(service["spec"]["selector"][GATEWAY_NAME_LABEL], "web");
        assert_eq!(
            ports(&service["spec"]["ports"], "port"),
            named(&[("http", 80), ("https", 443), ("status-port", 15021)])
        );
        for port in service["spec"]["ports"].as_sequence().expect("ports") {
            assert_eq!(port["targetPort"], port["port"]);
            assert_eq!(port["protocol"], "TCP");
        }
        // Nothing of the template's own Gateway is left.
        let text = to_yaml(&docs, "rendered").expect("yaml");
        for left in [
            "namespace: default",
            ": gateway\n",
            "- gateway\n",
            "gateway-istio",
        ] {
            assert!(!text.contains(left), "{left:?} in {text}");
        }
    }

    #[test]
    fn listeners_sharing_a_port_give_one_port_named_after_the_first() {
        let gw = gateway(
            "apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: edge}
spec:
  gatewayClassName: istio
  listeners:
  - {name: a.example.com, hostname: a.example.com, port: 8443, protocol: HTTPS, tls: {certificateRefs: [{name: a}]}}
  - {name: b.example.com, hostname: b.example.com, port: 8443, protocol: HTTPS, tls: {certificateRefs: [{name: b}]}}
  - {name: metrics, port: 9000, protocol: HTTP}
  - {name: http, port: 8080, protocol: HTTP}
",
        );
        let docs = objects(&gw).expect("render");
        let service = by_kind(&docs, "Service", "edge-istio");
        let got: Vec<(String, u64)> = ports(&service["spec"]["ports"], "port");
        assert_eq!(
            got,
            [
                ("a-example-com".to_owned(), 8443),
                ("metrics-2".to_owned(), 9000),
                ("http".to_owned(), 8080),
                ("status-port".to_owned(), 15021)
            ]
        );
    }

    fn check(listener: &str, taken: &[&str], expected: &str) {
        let taken: BTreeSet<String> = taken.iter().map(|t| (*t).to_owned()).collect();
        let got = port_name(listener, 8080, &taken).expect("a name");
        assert_eq!(got, expected, "{listener:?} with {taken:?} taken");
        assert!(is_port_name(&got), "{got:?}");
    }

    #[test]
    fn port_names_are_valid_unique_iana_service_names() {
        check("http", &[], "http");
        check("HTTPS", &[], "https");
        check("api.example.com", &[], "api-example-com");
        check("api.example.com-https", &[], "api-example-com");
        check("a--b..c", &[], "a-b-c");
        check("shop-public-listener", &[], "shop-public-lis");
        check("x-2345678901234-y", &[], "x-2345678901234");
        // No letter: a port name needs one.
        check("8080", &[], "port-8080");
        check("1.2", &[], "port-8080");
        // Taken (by the proxy's ports or an earlier listener): numbered.
        check("metrics", &["metrics"], "metrics-2");
        check("metrics", &["metrics", "metrics-2"], "metrics-3");
        check(
            "shop-public-listener",
            &["shop-public-lis"],
            "shop-public-l-2",
        );
        check("abcdefghijklm-x", &["abcdefghijklm-x"], "abcdefghijklm-2");
        check("port-8080", &["port-8080"], "port-8080-2");
        for bad in ["", "-a", "a-", "a--b", "1234", "abcdefghijklmnop", "A"] {
            assert!(!is_port_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn infrastructure_labels_and_annotations_go_on_the_pods_and_the_service() {
        let mut gw = gateway(WEB);
        gw.infrastructure
            .labels
            .insert("team".into(), "shop".into());
        gw.infrastructure
            .annotations
            .insert("example.com/lb".into(), "internal".into());
        let docs = objects(&gw).expect("render");
        let pods = &by_kind(&docs, "Deployment", "web-istio")["spec"]["template"]["metadata"];
        let service = &by_kind(&docs, "Service", "web-istio")["metadata"];
        for meta in [pods, service] {
            assert_eq!(meta["labels"]["team"], "shop");
            assert_eq!(meta["annotations"]["example.com/lb"], "internal");
            assert_eq!(meta["labels"][GATEWAY_NAME_LABEL], "web");
        }
        assert_eq!(pods["annotations"]["prometheus.io/port"], "15020");
        // Not on the Deployment itself nor the other objects.
        let account = &by_kind(&docs, "ServiceAccount", "web-istio")["metadata"];
        assert!(account["labels"]["team"].is_null());

        // A label the gateway needs cannot be changed; set to the same value it may be.
        gw.infrastructure
            .labels
            .insert("istio.io/dataplane-mode".into(), "none".into());
        assert!(objects(&gw).is_ok());
        gw.infrastructure
            .labels
            .insert("istio.io/dataplane-mode".into(), "ambient".into());
        let err = objects(&gw).expect_err("refused");
        assert_eq!(
            format!("{err:#}"),
            "spec.infrastructure.labels.istio.io/dataplane-mode: \"ambient\" would replace \
             \"none\" on the Deployment's pods (the ingress gateway needs it)"
        );
    }

    #[test]
    fn cluster_mode_applies_the_gateways_then_their_objects_and_deletes_by_name() {
        let gw = gateway(WEB);
        let apply = kubectl_apply(std::slice::from_ref(&gw)).expect("render");
        assert_eq!(apply.line(), "kubectl apply -f - < (the YAML above)");
        let stdin = apply.stdin.as_deref().expect("yaml");
        let docs = documents(stdin, "stdin").expect("yaml");
        assert_eq!(docs.len(), 8);
        assert_eq!(docs[0]["kind"], "Gateway");
        assert_eq!(docs[0], documents(WEB, "web").expect("yaml")[0]);
        assert_eq!(&docs[1..], objects(&gw).expect("render").as_slice());

        let delete: Vec<String> = kubectl_delete("shop", "web")
            .expect("valid names")
            .iter()
            .map(Kubectl::line)
            .collect();
        assert_eq!(
            delete,
            [
                "kubectl delete -n shop gateways.gateway.networking.k8s.io/web --ignore-not-found",
                "kubectl delete -n shop serviceaccounts/web-istio \
                 roles.rbac.authorization.k8s.io/web-istio-status \
                 rolebindings.rbac.authorization.k8s.io/web-istio-status \
                 deployments.apps/web-istio services/web-istio --ignore-not-found",
                "kubectl delete \
                 clusterrolebindings.rbac.authorization.k8s.io/ambient-ingress-gateway-shop-web-mesh \
                 clusterrolebindings.rbac.authorization.k8s.io/ambient-ingress-gateway-shop-web \
                 --ignore-not-found",
            ]
        );
        let err = kubectl_delete("shop", "Web").expect_err("refused");
        assert!(
            format!("{err:#}").starts_with("Gateway name \"Web\": "),
            "{err:#}"
        );
    }

    /// The ports this module keeps out of listeners are those the proxy binds by default.
    #[test]
    fn the_proxy_ports_are_the_proxys_defaults() {
        let shell = include_str!("../../../shell/src/config.rs");
        let waypoint = include_str!("../../../waypoint/src/config.rs");
        for (port, what) in PROXY_PORTS {
            let addr = format!(":{port}\";");
            assert!(
                shell.contains(&addr) || waypoint.contains(&addr),
                "the proxy's {what} port {port} is no default address of its"
            );
        }
    }
}
