//! The internal mesh model: what the proxies query. Built from Kubernetes YAML by
//! [`crate::k8s`]; does no IO. Every field is already parsed (IPs, ports, CIDRs, identities).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use crate::identity::Identity;

pub type Labels = BTreeMap<String, String>;

/// The Istio root namespace: policies here apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";
/// Label that enrolls a namespace (or pod) in ambient mode.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct NamespacedName {
    pub namespace: String,
    pub name: String,
}

impl NamespacedName {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for NamespacedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Namespace {
    pub name: String,
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ContainerPort {
    pub name: Option<String>,
    pub port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Pod {
    pub name: String,
    pub namespace: String,
    pub uid: Option<String>,
    /// `spec.serviceAccountName`, `default` when absent.
    pub service_account: String,
    pub node_name: Option<String>,
    /// `status.podIPs` (or `status.podIP`), in order.
    pub ips: Vec<IpAddr>,
    pub labels: Labels,
    pub annotations: Labels,
    pub host_network: bool,
    pub container_ports: Vec<ContainerPort>,
    /// `status.conditions[type=Ready]`; true when the YAML does not say.
    pub ready: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum TargetPort {
    Number(u16),
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServicePort {
    pub name: Option<String>,
    pub app_protocol: Option<String>,
    pub port: u16,
    pub target_port: TargetPort,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Service {
    pub name: String,
    pub namespace: String,
    pub labels: Labels,
    pub cluster_ips: Vec<IpAddr>,
    pub ports: Vec<ServicePort>,
    /// `None`: no selector (endpoints managed elsewhere).
    pub selector: Option<Labels>,
}

impl Service {
    /// `<name>.<namespace>.svc.cluster.local`
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.cluster.local", self.name, self.namespace)
    }
}

/// A ready endpoint of a service port: the pod and the resolved target port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub pod: NamespacedName,
    pub ip: IpAddr,
    pub port: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum PeerAuthnMode {
    /// Inherit from the parent scope.
    Unset,
    Strict,
    Permissive,
    Disable,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PeerAuthentication {
    pub name: String,
    pub namespace: String,
    pub selector: Option<Labels>,
    pub mode: PeerAuthnMode,
    pub port_levels: BTreeMap<u16, PeerAuthnMode>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Action {
    Allow,
    Deny,
    Audit,
    Custom,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetRef {
    pub group: String,
    pub kind: String,
    pub name: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Source {
    pub principals: Vec<String>,
    pub not_principals: Vec<String>,
    pub request_principals: Vec<String>,
    pub not_request_principals: Vec<String>,
    pub namespaces: Vec<String>,
    pub not_namespaces: Vec<String>,
    pub ip_blocks: Vec<IpNet>,
    pub not_ip_blocks: Vec<IpNet>,
    pub remote_ip_blocks: Vec<IpNet>,
    pub not_remote_ip_blocks: Vec<IpNet>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Operation {
    pub hosts: Vec<String>,
    pub not_hosts: Vec<String>,
    pub ports: Vec<u16>,
    pub not_ports: Vec<u16>,
    pub methods: Vec<String>,
    pub not_methods: Vec<String>,
    pub paths: Vec<String>,
    pub not_paths: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Condition {
    pub key: String,
    pub values: Vec<String>,
    pub not_values: Vec<String>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Rule {
    /// Each entry is one `from` clause (`source`); entries are OR'ed.
    pub from: Vec<Source>,
    /// Each entry is one `to` clause (`operation`); entries are OR'ed.
    pub to: Vec<Operation>,
    /// Conditions are AND'ed.
    pub when: Vec<Condition>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AuthorizationPolicy {
    pub name: String,
    pub namespace: String,
    pub selector: Option<Labels>,
    pub target_refs: Vec<TargetRef>,
    pub action: Action,
    /// Empty with `Allow`: matches nothing, i.e. deny all.
    pub rules: Vec<Rule>,
    /// `istio.io/dry-run: "true"` annotation: evaluate and log only.
    pub dry_run: bool,
}

/// The whole mesh as the proxies see it. Construct with [`Model::new`], which builds the
/// indexes; treat as immutable afterwards (a new config builds a new `Model`).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Model {
    pub namespaces: BTreeMap<String, Namespace>,
    pub service_accounts: BTreeSet<NamespacedName>,
    pub pods: BTreeMap<NamespacedName, Pod>,
    pub services: BTreeMap<NamespacedName, Service>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    #[serde(skip)]
    index: Index,
}

#[derive(Clone, Debug, Default)]
struct Index {
    pod_by_ip: std::collections::HashMap<IpAddr, NamespacedName>,
    service_by_vip: std::collections::HashMap<IpAddr, NamespacedName>,
}

// === impl Model ===
//
// Queries the proxies make. All pure; `Model::new` builds the indexes once.

impl Model {
    /// Builds a model and its indexes from translated resources.
    pub fn new(
        namespaces: BTreeMap<String, Namespace>,
        service_accounts: BTreeSet<NamespacedName>,
        pods: BTreeMap<NamespacedName, Pod>,
        services: BTreeMap<NamespacedName, Service>,
        peer_authentications: Vec<PeerAuthentication>,
        authorization_policies: Vec<AuthorizationPolicy>,
    ) -> Self {
        let mut m = Model {
            namespaces,
            service_accounts,
            pods,
            services,
            peer_authentications,
            authorization_policies,
            index: Index::default(),
        };
        m.reindex();
        m
    }

    fn reindex(&mut self) {
        let mut index = Index::default();
        for (key, pod) in &self.pods {
            if pod.host_network {
                continue;
            }
            for ip in &pod.ips {
                index.pod_by_ip.insert(*ip, key.clone());
            }
        }
        for (key, svc) in &self.services {
            for ip in &svc.cluster_ips {
                index.service_by_vip.insert(*ip, key.clone());
            }
        }
        self.index = index;
    }

    /// The (non host-network) pod owning `ip`.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.index
            .pod_by_ip
            .get(&ip)
            .and_then(|key| self.pods.get(key))
    }

    /// The service with cluster IP `ip` and its port `port`.
    pub fn service_by_vip(&self, ip: IpAddr, port: u16) -> Option<(&Service, &ServicePort)> {
        let svc = self
            .index
            .service_by_vip
            .get(&ip)
            .and_then(|key| self.services.get(key))?;
        let sp = svc.ports.iter().find(|p| p.port == port)?;
        Some((svc, sp))
    }

    /// The SPIFFE identity of `pod` in `trust_domain`.
    pub fn identity_of(&self, pod: &Pod, trust_domain: &str) -> Identity {
        Identity::new(trust_domain, &pod.namespace, &pod.service_account)
    }
}
