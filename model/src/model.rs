//! The internal mesh model: what the proxies query. Built from Kubernetes YAML by
//! [`crate::k8s`]; does no IO. Every field is already parsed (IPs, ports, CIDRs, identities).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use serde::Serialize;

use crate::identity::Identity;
use index::Index;

mod dns;
mod index;
mod ingress;
mod jwt;
mod labels;
mod refused;
mod route;
mod service_entry;
mod telemetry;
mod traffic;
mod waypoint;

pub(crate) use dns::service_name;
pub use dns::{DnsRecords, SeVip};

pub use labels::Labels;

pub use ingress::{
    hostname_rank, AllowedRoutes, ConditionReason, ConditionType, GatewayStatus, HostAddress,
    Listener, ListenerProtocol, ListenerRefError, ListenerStatus, ListenerTls, ListenerTlsMode,
    ReferenceGrant, ReferenceGrantFrom, ReferenceGrantTo, RequestedAddress, RouteNamespaces,
    SecretProblem, SecretRef, StatusCondition, SubsetThroughWaypoint, TlsSecret, GATEWAY_API_GROUP,
    INGRESS_GATEWAY_CLASS, INGRESS_SERVICE_SUFFIX, MAX_GATEWAY_ADDRESSES, NAMESPACE_NAME_LABEL,
    REDACTED, TLS_SECRET_TYPE,
};

pub use jwt::{JwksSource, JwtHeader, JwtRule, RequestAuthentication};

pub use refused::{deny_all, RefusedJwtRule, RefusedKind, RefusedPolicy, RefusedScope};

pub use route::{
    AbortStatus, BackendRef, DirectResponse, Fault, FaultAbort, FaultDelay, Filters,
    GrpcMethodMatch, HeaderMatch, HeaderModifier, HttpRoute, Mirror, ParentKind, ParentRef,
    PathMatch, PathModifier, Pattern, QueryMatch, RequestRedirect, RetryOn, RetryPolicy, RouteKind,
    RouteMatch, RouteRule, Scheme, Timeouts, UrlRewrite, ValueMatch, VirtualService, VsGateway,
};

pub use service_entry::{
    DnsTarget, SeAddress, SeConflict, SeEndpoint, SeLocation, SePort, SeResolution, ServiceEntry,
};

pub use telemetry::{AccessLogDecision, AccessLogging, Telemetry, TelemetryLevel, WorkloadMode};

pub use traffic::{
    effective_policy, effective_policy_for_host, ClientTls, ConnectionPool, DestinationRule,
    EffectivePolicy, Ejection, HashKey, LoadBalancer, OutlierDetection, PortTrafficPolicy, Subset,
    SubsetError, TlsMode, TrafficPolicy, DEFAULT_MAX_RETRIES, MAX_EJECTION_TIME,
};

pub use waypoint::{
    use_waypoint, WaypointAddress, WaypointFor, WaypointTarget, GATEWAY_NAME_LABEL,
    USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL, WAYPOINT_FOR_LABEL, WAYPOINT_GATEWAY_CLASS,
};

/// The Istio root namespace: policies here apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";
/// The cluster's DNS domain: a Service is `<name>.<namespace>.svc.<CLUSTER_DOMAIN>`.
pub const CLUSTER_DOMAIN: &str = "cluster.local";
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

    /// (namespace, name), borrowed.
    pub fn parts(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
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
    /// `status.loadBalancer.ingress`, in order: where a load balancer takes the Service's
    /// traffic (each entry's IP, else its hostname); empty when none is assigned (or the
    /// Service is no `LoadBalancer`). Read for an ingress Gateway's `status.addresses`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_ingress: Vec<HostAddress>,
}

impl Service {
    /// `<name>.<namespace>.svc.cluster.local` (see [`CLUSTER_DOMAIN`]).
    pub fn hostname(&self) -> String {
        format!("{}.{}.svc.{CLUSTER_DOMAIN}", self.name, self.namespace)
    }
}

/// A ready endpoint of a service port: its address, the resolved target port and the pod
/// behind it. `pod` is `None` only for an EndpointSlice address that is no pod the model
/// knows (the API server behind the `kubernetes` Service, a VM, an external host): the agent
/// reaches it in plain TCP.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Endpoint {
    pub pod: Option<NamespacedName>,
    pub ip: IpAddr,
    pub port: u16,
}

/// A `discovery.k8s.io/v1` EndpointSlice: endpoints of a Service without a selector
/// (Kubernetes' own slices of a selector's pods are not read: the model derives those from
/// the pods, see [`Model::endpoints`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EndpointSlice {
    pub name: String,
    pub namespace: String,
    /// The Service it belongs to (label `kubernetes.io/service-name`), in its namespace.
    pub service: String,
    /// Its TCP ports (UDP and SCTP ports are not carried by the mesh).
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<SliceEndpoint>,
}

/// A port of an [`EndpointSlice`]: a Service port with the same name (or both unnamed)
/// reaches the endpoints on `port`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SlicePort {
    pub name: Option<String>,
    pub port: u16,
}

/// An endpoint of an [`EndpointSlice`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SliceEndpoint {
    /// The first of `addresses` (Kubernetes: the rest are fungible and may be ignored).
    pub ip: IpAddr,
    /// `conditions.ready`; true when unset, as Kubernetes reads it.
    pub ready: bool,
    /// `targetRef` when it names a Pod.
    pub pod: Option<NamespacedName>,
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
    /// `serviceAccounts`, normalised to `<namespace>/<name>` (a bare name means the policy's
    /// namespace).
    pub service_accounts: Vec<String>,
    pub not_service_accounts: Vec<String>,
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

/// A Gateway API `Gateway` (`gateway.networking.k8s.io/v1`): a waypoint (class
/// [`WAYPOINT_GATEWAY_CLASS`]), an ingress gateway (class [`INGRESS_GATEWAY_CLASS`], see
/// `model/ingress.rs`), or another controller's (kept, not used).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Gateway {
    pub name: String,
    pub namespace: String,
    /// `spec.gatewayClassName`.
    pub class: String,
    pub labels: Labels,
    /// `istio.io/waypoint-for` (waypoints only; `service` when absent).
    pub waypoint_for: WaypointFor,
    /// IP addresses from `status.addresses`, else `spec.addresses` (type `IPAddress`).
    pub addresses: Vec<IpAddr>,
    /// `spec.addresses` of an ingress Gateway (class [`INGRESS_GATEWAY_CLASS`]), validated
    /// (at most [`MAX_GATEWAY_ADDRESSES`], each once): what its status reports as honoured or
    /// not. Empty for other classes (their addresses are [`Gateway::addresses`]).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub requested_addresses: Vec<RequestedAddress>,
    /// `metadata.generation` (`None` when not written, as in a hand-written file): the
    /// `observedGeneration` of the status an ingress gateway writes back.
    pub generation: Option<i64>,
    /// `spec.listeners`, in order. Validated for an ingress gateway (at least one, names
    /// unique, TLS as its protocol needs); for other classes read as far as they read (a
    /// waypoint's `HBONE` listener is [`ListenerProtocol::Unsupported`]; one without a
    /// name, port or protocol is left out), as nothing uses them.
    pub listeners: Vec<Listener>,
}

impl Gateway {
    pub fn key(&self) -> NamespacedName {
        NamespacedName::new(&self.namespace, &self.name)
    }

    pub fn is_waypoint(&self) -> bool {
        self.class == WAYPOINT_GATEWAY_CLASS
    }

    /// Of class [`INGRESS_GATEWAY_CLASS`] (`istio`).
    pub fn is_ingress(&self) -> bool {
        self.class == INGRESS_GATEWAY_CLASS
    }

    /// The listener named `name`.
    pub fn listener(&self, name: &str) -> Option<&Listener> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

/// The whole mesh as the proxies see it. Construct with [`Model::new`], which builds the
/// indexes (see `model/index.rs`: no per-connection query scans the mesh); treat as immutable
/// afterwards (a new config builds a new `Model`). Pods and Services are shared with the
/// indexes.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Model {
    pub namespaces: BTreeMap<String, Namespace>,
    pub service_accounts: BTreeSet<NamespacedName>,
    #[serde(serialize_with = "shared_values")]
    pub pods: BTreeMap<NamespacedName, Arc<Pod>>,
    #[serde(serialize_with = "shared_values")]
    pub services: BTreeMap<NamespacedName, Arc<Service>>,
    pub peer_authentications: Vec<PeerAuthentication>,
    pub authorization_policies: Vec<AuthorizationPolicy>,
    /// Gateways of every class; see [`Model::waypoint_for_service`].
    pub gateways: BTreeMap<NamespacedName, Gateway>,
    /// HTTPRoutes and GRPCRoutes ([`HttpRoute::kind`]), oldest first (`creationTimestamp`,
    /// routes without one last), then by namespace and name: the order the Gateway API
    /// settles equal matches (and HTTPRoute/GRPCRoute conflicts) by.
    pub http_routes: Vec<HttpRoute>,
    /// VirtualServices, oldest first (`creationTimestamp`, those without one last), then by
    /// namespace and name: for one Service host the first that names it applies; at an
    /// ingress gateway, the rules of those bound to it are tried in this order.
    pub virtual_services: Vec<VirtualService>,
    /// RequestAuthentications in (namespace, name) order.
    pub request_authentications: Vec<RequestAuthentication>,
    /// DestinationRules, oldest first, then by namespace and name (see
    /// [`Model::destination_rule_for`]).
    pub destination_rules: Vec<DestinationRule>,
    /// Policies the API-server source refused and never accepted, enforced fail closed
    /// (see [`RefusedPolicy`]); always empty with the directory source.
    pub refused_policies: Vec<RefusedPolicy>,
    /// Telemetries in (namespace, name) order (see [`Model::waypoint_access_log`]).
    pub telemetries: Vec<Telemetry>,
    /// EndpointSlices (of Services without a selector; see [`Model::endpoints`]).
    #[serde(serialize_with = "shared_values")]
    pub endpoint_slices: BTreeMap<NamespacedName, Arc<EndpointSlice>>,
    /// ServiceEntries in (namespace, name) order (see [`Model::service_entry_for`]).
    pub service_entries: Vec<ServiceEntry>,
    /// Address and port claims of a ServiceEntry an earlier one already makes (not used).
    pub service_entry_conflicts: Vec<SeConflict>,
    /// Secrets of type `kubernetes.io/tls` with a PEM certificate and key (see
    /// [`Model::tls_secret`]); the keys never show in `Debug` or JSON.
    #[serde(serialize_with = "shared_values")]
    pub tls_secrets: BTreeMap<NamespacedName, Arc<TlsSecret>>,
    /// Every other Secret read, and why it is not a TLS secret (see
    /// [`Model::secret_problem`]).
    pub secret_problems: BTreeMap<NamespacedName, String>,
    /// ReferenceGrants in (namespace, name) order (see [`Model::reference_granted`]).
    pub reference_grants: Vec<ReferenceGrant>,
    #[serde(skip)]
    index: Index,
}

/// The model as JSON can show it (`/config_dump` of both proxies): maps keyed by
/// [`NamespacedName`] become lists of their values (each value names itself).
#[derive(Debug, Serialize)]
pub struct ModelDump<'a> {
    pub namespaces: Vec<&'a Namespace>,
    pub service_accounts: Vec<&'a NamespacedName>,
    pub pods: Vec<&'a Pod>,
    pub services: Vec<&'a Service>,
    pub peer_authentications: &'a [PeerAuthentication],
    pub authorization_policies: &'a [AuthorizationPolicy],
    pub gateways: Vec<&'a Gateway>,
    pub http_routes: &'a [HttpRoute],
    pub request_authentications: &'a [RequestAuthentication],
    pub virtual_services: &'a [VirtualService],
    pub destination_rules: &'a [DestinationRule],
    pub refused_policies: Vec<RefusedDump<'a>>,
    pub telemetries: &'a [Telemetry],
    pub endpoint_slices: Vec<&'a EndpointSlice>,
    pub service_entries: &'a [ServiceEntry],
    pub service_entry_conflicts: &'a [SeConflict],
    /// The VIPs auto-allocated to ServiceEntries without `addresses` (see
    /// [`Model::service_entry_host_at`]).
    pub service_entry_vips: Vec<SeVip>,
    /// TLS Secrets, keys redacted.
    pub tls_secrets: Vec<&'a TlsSecret>,
    /// Secrets that are not usable TLS Secrets, and why.
    pub secret_problems: Vec<SecretProblem>,
    pub reference_grants: &'a [ReferenceGrant],
}

/// A refused policy in `/config_dump`: the entry, what it does, and the workloads the node
/// agent closes for it (`namespace/name`; targets are in its `scope`).
#[derive(Debug, Serialize)]
pub struct RefusedDump<'a> {
    #[serde(flatten)]
    pub policy: &'a RefusedPolicy,
    pub effect: &'static str,
    pub workloads: Vec<String>,
}

/// A map of shared values serialized as the map of the values.
fn shared_values<S: serde::Serializer, K: Serialize, V: Serialize>(
    map: &BTreeMap<K, Arc<V>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_map(map.iter().map(|(k, v)| (k, &**v)))
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
            pods: pods.into_iter().map(|(k, p)| (k, Arc::new(p))).collect(),
            services: services
                .into_iter()
                .map(|(k, s)| (k, Arc::new(s)))
                .collect(),
            peer_authentications,
            authorization_policies,
            gateways: BTreeMap::new(),
            http_routes: Vec::new(),
            virtual_services: Vec::new(),
            request_authentications: Vec::new(),
            destination_rules: Vec::new(),
            refused_policies: Vec::new(),
            telemetries: Vec::new(),
            endpoint_slices: BTreeMap::new(),
            service_entries: Vec::new(),
            service_entry_conflicts: Vec::new(),
            tls_secrets: BTreeMap::new(),
            secret_problems: BTreeMap::new(),
            reference_grants: Vec::new(),
            index: Index::default(),
        };
        m.reindex();
        m
    }

    /// A view of the model that serializes to JSON.
    pub fn dump(&self) -> ModelDump<'_> {
        ModelDump {
            namespaces: self.namespaces.values().collect(),
            service_accounts: self.service_accounts.iter().collect(),
            pods: self.pods.values().map(|p| &**p).collect(),
            services: self.services.values().map(|s| &**s).collect(),
            peer_authentications: &self.peer_authentications,
            authorization_policies: &self.authorization_policies,
            gateways: self.gateways.values().collect(),
            http_routes: &self.http_routes,
            request_authentications: &self.request_authentications,
            virtual_services: &self.virtual_services,
            destination_rules: &self.destination_rules,
            refused_policies: self
                .refused_policies
                .iter()
                .map(|r| RefusedDump {
                    policy: r,
                    effect: r.effect(),
                    workloads: match (r.kind, &r.deny) {
                        // A CUSTOM is the waypoint's: the agent closes no workload for it.
                        (RefusedKind::AuthorizationPolicy, Some(d))
                            if d.action != Action::Custom =>
                        {
                            self.pods
                                .values()
                                .filter(|p| r.selects_pod(p))
                                .map(|p| format!("{}/{}", p.namespace, p.name))
                                .collect()
                        }
                        _ => Vec::new(),
                    },
                })
                .collect(),
            telemetries: &self.telemetries,
            endpoint_slices: self.endpoint_slices.values().map(|s| &**s).collect(),
            service_entries: &self.service_entries,
            service_entry_conflicts: &self.service_entry_conflicts,
            service_entry_vips: self.service_entry_vips(),
            tls_secrets: self.tls_secrets.values().map(|s| &**s).collect(),
            secret_problems: self
                .secret_problems
                .iter()
                .map(|(k, problem)| SecretProblem {
                    namespace: k.namespace.clone(),
                    name: k.name.clone(),
                    problem: problem.clone(),
                })
                .collect(),
            reference_grants: &self.reference_grants,
        }
    }

    /// The model with `refused` (policies the API-server source refused; see
    /// [`RefusedPolicy`]), in the order given.
    pub fn with_refused_policies(mut self, refused: Vec<RefusedPolicy>) -> Self {
        self.refused_policies = refused;
        self
    }

    /// The model with `gateways` (kept apart from [`Model::new`] so that its callers need
    /// not know about Gateways).
    pub fn with_gateways(mut self, gateways: BTreeMap<NamespacedName, Gateway>) -> Self {
        self.gateways = gateways;
        self
    }

    /// The model with `routes`, put in precedence order (see [`Model::http_routes`]).
    pub fn with_http_routes(mut self, mut routes: Vec<HttpRoute>) -> Self {
        routes.sort_by(|a, b| {
            (
                a.created.is_none(),
                &a.created,
                &a.namespace,
                &a.name,
                a.kind,
            )
                .cmp(&(
                    b.created.is_none(),
                    &b.created,
                    &b.namespace,
                    &b.name,
                    b.kind,
                ))
        });
        self.index.routes_by_parent = index::RoutesByParent::build(&routes);
        self.http_routes = routes;
        self
    }

    /// The model with `vs`, put in precedence order (see [`Model::virtual_services`]) and
    /// indexed by the Gateways they name.
    pub fn with_virtual_services(mut self, mut vs: Vec<VirtualService>) -> Self {
        vs.sort_by(|a, b| {
            (a.created.is_none(), &a.created, &a.namespace, &a.name).cmp(&(
                b.created.is_none(),
                &b.created,
                &b.namespace,
                &b.name,
            ))
        });
        self.index.virtual_services_by_gateway = index::virtual_services_by_gateway(&vs);
        self.index.mesh_virtual_services = index::VsByHost::build(&vs);
        self.virtual_services = vs;
        self
    }

    /// The routes whose `parentRefs` name the `kind` parent `namespace/name`, in model
    /// order, read from the index (each route once, whatever else it names).
    pub fn routes_naming<'m>(
        &'m self,
        kind: ParentKind,
        namespace: &str,
        name: &str,
    ) -> impl Iterator<Item = &'m HttpRoute> + 'm {
        self.index
            .routes_by_parent
            .get(kind, namespace, name)
            .iter()
            .filter_map(|i| self.http_routes.get(*i as usize))
    }

    /// The mesh VirtualServices (`mesh`) that may name one of `names` (lower-case): each one
    /// with one of them as an exact host and each one with a wildcard host, in model order,
    /// read from the index (the caller matches the wildcards).
    pub fn mesh_virtual_services_for<'m>(
        &'m self,
        names: &[String],
    ) -> impl Iterator<Item = &'m VirtualService> + 'm {
        self.index
            .mesh_virtual_services
            .candidates(names)
            .into_iter()
            .filter_map(|i| self.virtual_services.get(i as usize))
    }

    /// The model with `request_authentications` (in the order given).
    pub fn with_request_authentications(
        mut self,
        request_authentications: Vec<RequestAuthentication>,
    ) -> Self {
        self.index.request_authentications = index::Attachments::build(
            request_authentications
                .iter()
                .map(|ra| (ra.namespace.as_str(), ra.target_refs.as_slice())),
        );
        self.request_authentications = request_authentications;
        self
    }

    /// The model with `slices`, indexed by the Service they belong to.
    pub fn with_endpoint_slices(mut self, slices: BTreeMap<NamespacedName, EndpointSlice>) -> Self {
        self.endpoint_slices = slices.into_iter().map(|(k, s)| (k, Arc::new(s))).collect();
        self.index.slices = index::slices_by_service(self.endpoint_slices.values());
        self
    }

    /// The model with `entries` (in (namespace, name) order): their addresses indexed, VIPs
    /// auto-allocated to those without addresses and their hosts indexed for DNS (see
    /// `model/dns.rs`). Call after [`Model::new`]: allocation avoids the Services' cluster IPs.
    pub fn with_service_entries(mut self, entries: Vec<ServiceEntry>) -> Self {
        let in_use = self
            .services
            .values()
            .flat_map(|svc| svc.cluster_ips.iter().copied())
            .chain(
                entries
                    .iter()
                    .flat_map(|se| se.addresses.iter())
                    .filter(|net| net.prefix_len() == net.max_prefix_len())
                    .map(|net| net.addr()),
            );
        self.index.se_dns = dns::SeDns::build(&entries, in_use);
        self.index.service_entries = index::SeAddresses::build(&entries, self.index.se_dns.vips());
        let mut positions: index::ByNamespaceAndName<usize> = HashMap::new();
        let mut selected: index::ByNamespaceAndName<Box<[Arc<Pod>]>> = HashMap::new();
        for (i, se) in entries.iter().enumerate() {
            positions
                .entry(se.namespace.clone())
                .or_default()
                .insert(se.name.clone(), i);
            // A selecting entry's pods, from its namespace's range of the pod map.
            let Some(selector) = &se.workload_selector else {
                continue;
            };
            let pods = self
                .pods
                .range(NamespacedName::new(&se.namespace, "")..)
                .take_while(|(k, _)| k.namespace == se.namespace)
                .map(|(_, p)| p)
                .filter(|p| selector_matches(selector, &p.labels))
                .cloned()
                .collect();
            selected
                .entry(se.namespace.clone())
                .or_default()
                .insert(se.name.clone(), pods);
        }
        self.index.service_entry_positions = positions;
        self.index.service_entry_pods = selected;
        self.service_entry_conflicts = entries
            .iter()
            .enumerate()
            .flat_map(|(i, later)| entries[..i].iter().flat_map(|e| later.conflicts_with(e)))
            .collect();
        self.service_entries = entries;
        self
    }

    /// The ServiceEntry `namespace/name`.
    pub fn service_entry(&self, namespace: &str, name: &str) -> Option<&ServiceEntry> {
        let position = self
            .index
            .service_entry_positions
            .get(namespace)?
            .get(name)?;
        self.service_entries.get(*position)
    }

    /// The ServiceEntry a workload in `namespace` reaches by connecting to `dst`: the first
    /// (in (namespace, name) order) that is exported to `namespace`, has `dst`'s IP among
    /// its addresses (an IP, or inside a CIDR) or as the VIP auto-allocated to one of its
    /// hosts (an entry without addresses; see [`Model::service_entry_host_at`]), and has
    /// `dst`'s port; and that port.
    pub fn service_entry_for(
        &self,
        namespace: &str,
        dst: std::net::SocketAddr,
    ) -> Option<(&ServiceEntry, &SePort)> {
        let ip = dst.ip();
        self.index
            .service_entries
            .candidates(ip)
            .filter_map(|i| Some((i, self.service_entries.get(i)?)))
            .filter(|(i, se)| {
                se.visible_in(namespace)
                    && (se.has_address(ip) || self.index.se_dns.is_vip_of(ip, *i))
            })
            .find_map(|(_, se)| Some((se, se.port(dst.port())?)))
    }

    /// The endpoints of `port` of `se` with `STATIC` resolution: its listed IP endpoints
    /// (the pod owning an address, when there is one), or the ready pods its
    /// `workloadSelector` selects in its namespace (their first IP, on the port's
    /// `targetPort` or number). Empty for other resolutions.
    pub fn service_entry_endpoints(&self, se: &ServiceEntry, port: &SePort) -> Vec<Endpoint> {
        if se.resolution != SeResolution::Static {
            return Vec::new();
        }
        if se.workload_selector.is_some() {
            let selected = self
                .index
                .service_entry_pods
                .get(&se.namespace)
                .and_then(|by_name| by_name.get(&se.name));
            return selected
                .into_iter()
                .flatten()
                .filter(|p| p.ready)
                .filter_map(|p| {
                    Some(Endpoint {
                        pod: Some(NamespacedName::new(&p.namespace, &p.name)),
                        ip: *p.ips.first()?,
                        port: port.target_port.unwrap_or(port.number),
                    })
                })
                .collect();
        }
        se.endpoints
            .iter()
            .filter_map(|ep| {
                let SeAddress::Ip(ip) = ep.address else {
                    return None;
                };
                Some(Endpoint {
                    pod: self.pod_name_at(ip),
                    ip,
                    port: ep.port_for(port),
                })
            })
            .collect()
    }

    /// Where a connection to `port` of `se`, a `DNS` or `DNS_ROUND_ROBIN` entry, sent to
    /// `dst`, goes: each endpoint (an address as it is, a host name to resolve), on its port
    /// for `port`; without endpoints, the host the connection is for ([`Model::service_entry_host`];
    /// a wildcard host cannot be resolved: none) on the port's `targetPort` or number. Empty
    /// for other resolutions.
    pub fn dns_entry_targets<'m>(
        &'m self,
        se: &'m ServiceEntry,
        port: &SePort,
        dst: IpAddr,
    ) -> Vec<DnsTarget<'m>> {
        if !matches!(
            se.resolution,
            SeResolution::Dns | SeResolution::DnsRoundRobin
        ) {
            return Vec::new();
        }
        if se.endpoints.is_empty() {
            return self
                .service_entry_host(se, dst)
                .filter(|h| !h.starts_with('*'))
                .map(|host| DnsTarget::Host {
                    host,
                    port: port.target_port.unwrap_or(port.number),
                })
                .into_iter()
                .collect();
        }
        se.endpoints
            .iter()
            .map(|ep| match &ep.address {
                SeAddress::Ip(ip) => DnsTarget::Addr(SocketAddr::new(*ip, ep.port_for(port))),
                SeAddress::Host(host) => DnsTarget::Host {
                    host,
                    port: ep.port_for(port),
                },
            })
            .collect()
    }

    /// Sets the Telemetries (in (namespace, name) order).
    pub fn with_telemetries(mut self, telemetries: Vec<Telemetry>) -> Self {
        self.telemetries = telemetries;
        self
    }

    fn reindex(&mut self) {
        self.index = Index::build(
            &self.namespaces,
            &self.pods,
            &self.services,
            &self.peer_authentications,
            &self.authorization_policies,
        );
    }

    /// The name of the (non host-network) pod owning `ip`: the pod behind an endpoint address
    /// (an EndpointSlice's, a ServiceEntry's).
    fn pod_name_at(&self, ip: IpAddr) -> Option<NamespacedName> {
        let p = self.workload_by_ip(ip)?;
        Some(NamespacedName::new(&p.namespace, &p.name))
    }

    /// The (non host-network) pod owning `ip`.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Pod> {
        self.workload_by_ip_shared(ip).map(|p| &**p)
    }

    /// [`Model::workload_by_ip`], shared: for holders that outlive the borrow (a request's
    /// labels) without copying the pod.
    pub fn workload_by_ip_shared(&self, ip: IpAddr) -> Option<&Arc<Pod>> {
        self.index.pod_by_ip.get(&ip)
    }

    /// The service with cluster IP `ip` and its port `port`.
    pub fn service_by_vip(&self, ip: IpAddr, port: u16) -> Option<(&Service, &ServicePort)> {
        let svc = self.index.service_by_vip.get(&ip)?;
        let sp = svc.ports.iter().find(|p| p.port == port)?;
        Some((svc, sp))
    }

    /// The service named `key`.
    pub fn service(&self, key: &NamespacedName) -> Option<&Service> {
        self.service_shared(key).map(|s| &**s)
    }

    /// [`Model::service`], shared (see [`Model::workload_by_ip_shared`]).
    pub fn service_shared(&self, key: &NamespacedName) -> Option<&Arc<Service>> {
        index::by_name(&self.index.services_by_name, &key.namespace, &key.name)
    }

    /// The L4 AuthorizationPolicies (no `targetRefs`, not CUSTOM) of the root namespace and
    /// of `pod`'s namespace whose selector selects `pod`, in model order.
    pub(crate) fn l4_policies_for(&self, pod: &Pod) -> Vec<&AuthorizationPolicy> {
        let mut positions = Vec::new();
        for ns in [ROOT_NAMESPACE, pod.namespace.as_str()] {
            if let Some(i) = self.index.namespaces.get(ns) {
                i.l4_policies.candidates(&pod.labels, &mut positions);
            }
            if pod.namespace == ROOT_NAMESPACE {
                break;
            }
        }
        positions.sort_unstable();
        positions
            .into_iter()
            .filter_map(|i| self.authorization_policies.get(i as usize))
            .filter(|p| crate::policy::applies_at_l4(p, pod))
            .collect()
    }

    /// The AuthorizationPolicies whose `targetRefs` attach them to `waypoint` for a request
    /// to `dest`, in model order.
    pub(crate) fn waypoint_policies(
        &self,
        waypoint: &NamespacedName,
        dest: crate::policy::l7::Destination<'_>,
    ) -> impl Iterator<Item = &AuthorizationPolicy> + '_ {
        let positions = self.index.waypoint_policies.attached(waypoint, dest);
        positions
            .into_iter()
            .filter_map(|i| self.authorization_policies.get(i as usize))
    }

    /// The RequestAuthentications whose `targetRefs` attach them to `waypoint` for a request
    /// to `dest`, in model order.
    pub(crate) fn waypoint_request_authentications(
        &self,
        waypoint: &NamespacedName,
        dest: crate::policy::l7::Destination<'_>,
    ) -> impl Iterator<Item = &RequestAuthentication> + '_ {
        let positions = self.index.request_authentications.attached(waypoint, dest);
        positions
            .into_iter()
            .filter_map(|i| self.request_authentications.get(i as usize))
    }

    /// The PeerAuthentications of `namespace`, in model order.
    pub(crate) fn peer_authentications_in<'a>(
        &'a self,
        namespace: &str,
    ) -> impl Iterator<Item = &'a PeerAuthentication> + 'a {
        self.index
            .namespaces
            .get(namespace)
            .map_or(&[][..], |i| i.peer_authentications.as_slice())
            .iter()
            .filter_map(|i| self.peer_authentications.get(*i as usize))
    }

    /// The SPIFFE identity of `pod` in `trust_domain`.
    pub fn identity_of(&self, pod: &Pod, trust_domain: &str) -> Identity {
        Identity::new(trust_domain, &pod.namespace, &pod.service_account)
    }

    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        self.pod_shared(namespace, name).map(|p| &**p)
    }

    /// [`Model::pod`], shared (see [`Model::workload_by_ip_shared`]).
    pub fn pod_shared(&self, namespace: &str, name: &str) -> Option<&Arc<Pod>> {
        index::by_name(&self.index.pods_by_name, namespace, name)
    }

    pub fn namespace(&self, name: &str) -> Option<&Namespace> {
        self.index
            .namespaces
            .get(name)
            .and_then(|ns| ns.namespace.as_ref())
    }

    /// Pods scheduled on `node` (`spec.nodeName`), in name order.
    pub fn pods_on_node<'a>(&'a self, node: &'a str) -> impl Iterator<Item = &'a Pod> + 'a {
        self.pods
            .values()
            .map(|p| &**p)
            .filter(move |p| p.node_name.as_deref() == Some(node))
    }

    /// Whether `pod` is enrolled in ambient mode: its own `istio.io/dataplane-mode` label
    /// decides (`ambient` enrolls, `none` opts out); otherwise its namespace's label does.
    /// Host-network pods share the node's network namespace, so there is nothing to capture.
    /// A waypoint's own pod is never captured: it terminates HBONE on 15008 itself.
    pub fn is_ambient(&self, pod: &Pod) -> bool {
        if pod.host_network || self.is_waypoint_pod(pod) {
            return false;
        }
        match pod.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) {
            Some(AMBIENT) => true,
            Some(NONE) => false,
            _ => self
                .namespace(&pod.namespace)
                .and_then(|ns| ns.labels.get(DATAPLANE_MODE_LABEL))
                .is_some_and(|mode| mode == AMBIENT),
        }
    }

    /// Services in the pod's namespace whose selector matches its labels, in name order.
    /// Services without a selector never match (their endpoints are managed elsewhere).
    pub fn services_for_pod(&self, pod: &Pod) -> Vec<&Service> {
        let Some(ns) = self.index.namespaces.get(&pod.namespace) else {
            return Vec::new();
        };
        let mut positions = Vec::new();
        ns.services.candidates(&pod.labels, &mut positions);
        positions.sort_unstable();
        positions
            .into_iter()
            .filter_map(|i| self.index.services.get(i as usize))
            .filter(|svc| {
                svc.selector
                    .as_ref()
                    .is_some_and(|sel| selector_matches(sel, &pod.labels))
            })
            .map(|svc| &**svc)
            .collect()
    }

    /// The ready endpoints of `port` of `svc`, in pod name order: ready pods with an IP,
    /// selected by the service, with the target port resolved. A named target port is looked
    /// up in the pod's container ports; pods without such a port are skipped (as Kubernetes
    /// does). When the service has a cluster IP, the pod IP of the same family is used and
    /// pods without one are skipped (a single-stack service gets single-stack endpoints);
    /// headless services use the pod's primary IP.
    pub fn endpoints(&self, svc: &Service, port: &ServicePort) -> Vec<Endpoint> {
        let Some(selector) = &svc.selector else {
            return self.slice_endpoints(svc, port);
        };
        self.selected_pods(svc, selector)
            .filter(|pod| pod.ready)
            .filter_map(|pod| endpoint_of(svc, port, pod))
            .collect()
    }

    /// The pods `selector` (`svc`'s) selects in `svc`'s namespace, in name order: from the
    /// index when `svc` is the model's Service of that name, else by a scan (a Service the
    /// caller made or kept from another model).
    fn selected_pods<'a>(
        &'a self,
        svc: &'a Service,
        selector: &'a Labels,
    ) -> Box<dyn Iterator<Item = &'a Pod> + 'a> {
        let indexed = self
            .index
            .namespaces
            .get(&svc.namespace)
            .and_then(|ns| ns.selected.get(&svc.name))
            .filter(|s| std::ptr::eq(&*s.service, svc) || s.service.selector == svc.selector);
        match indexed {
            Some(s) => Box::new(s.pods.iter().map(|p| &**p)),
            None => Box::new(
                self.pods
                    .values()
                    .map(|p| &**p)
                    .filter(move |pod| pod.namespace == svc.namespace)
                    .filter(move |pod| selector_matches(selector, &pod.labels)),
            ),
        }
    }
}

impl Model {
    /// The ready endpoints of `port` of `svc`, a Service without a selector, from its
    /// EndpointSlices (in slice name order, each address once): the slice port named as the
    /// Service port (both unnamed is a match) gives the target port, an address of the other
    /// family than the Service's cluster IP is skipped. The pod behind an address is the
    /// slice's `targetRef` when the model has that pod, else the pod owning the address.
    fn slice_endpoints(&self, svc: &Service, port: &ServicePort) -> Vec<Endpoint> {
        let Some(slices) = self
            .index
            .slices
            .get(&svc.namespace)
            .and_then(|by_svc| by_svc.get(&svc.name))
        else {
            return Vec::new();
        };
        let family = svc.cluster_ips.first().map(IpAddr::is_ipv4);
        let mut seen = BTreeSet::new();
        let mut eps = Vec::new();
        for slice in slices {
            let Some(sp) = slice.ports.iter().find(|p| p.name == port.name) else {
                continue;
            };
            for ep in &slice.endpoints {
                let family_ok = family.is_none_or(|v4| ep.ip.is_ipv4() == v4);
                if !ep.ready || !family_ok || !seen.insert((ep.ip, sp.port)) {
                    continue;
                }
                let pod = ep
                    .pod
                    .as_ref()
                    .filter(|p| self.pod(&p.namespace, &p.name).is_some())
                    .cloned()
                    .or_else(|| self.pod_name_at(ep.ip));
                eps.push(Endpoint {
                    pod,
                    ip: ep.ip,
                    port: sp.port,
                });
            }
        }
        eps
    }
}

/// `pod` as an endpoint of `port` of `svc` (see [`Model::endpoints`]), if it has the address
/// family and the named port it needs; readiness and selection are the caller's.
fn endpoint_of(svc: &Service, port: &ServicePort, pod: &Pod) -> Option<Endpoint> {
    let ip = match svc.cluster_ips.first().map(IpAddr::is_ipv4) {
        Some(v4) => pod.ips.iter().find(|ip| ip.is_ipv4() == v4),
        None => pod.ips.first(),
    }?;
    let target = match &port.target_port {
        TargetPort::Number(n) => *n,
        TargetPort::Named(name) => {
            pod.container_ports
                .iter()
                .find(|cp| cp.name.as_deref() == Some(name.as_str()))?
                .port
        }
    };
    Some(Endpoint {
        pod: Some(NamespacedName::new(&pod.namespace, &pod.name)),
        ip: *ip,
        port: target,
    })
}

const AMBIENT: &str = "ambient";
const NONE: &str = "none";

/// Kubernetes equality-based selection: every selector label is present with the same value.
/// An empty selector selects everything.
pub fn selector_matches(selector: &Labels, labels: &Labels) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// An IP address (`10.0.0.1`, taken as a /32 or /128) or a CIDR (`10.0.0.0/8`), the forms
/// Istio accepts in `ipBlocks` and in `source.ip`-like conditions.
pub fn parse_ip_or_cidr(s: &str) -> Option<IpNet> {
    if s.contains('/') {
        s.parse::<IpNet>().ok()
    } else {
        s.parse::<IpAddr>().ok().map(IpNet::from)
    }
}

#[cfg(test)]
mod tests {
    //! Model queries over a small mesh written as YAML.

    use super::*;
    use crate::k8s::load_docs;

    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-a
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]
status: {podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-b
  containers: [{name: app, ports: [{name: http, containerPort: 8081}]}]
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-3, namespace: shop, labels: {app: web, istio.io/dataplane-mode: none}}
spec: {nodeName: node-a, containers: [{name: app}]}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Pod
metadata: {name: web-4, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-a
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.0.0.4, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-v6, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-b
  containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: "fd00::6"}
---
apiVersion: v1
kind: Pod
metadata: {name: agent, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-a
  hostNetwork: true
  containers: [{name: app, ports: [{name: http, containerPort: 9100}]}]
status: {podIP: 192.168.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: old, namespace: legacy, labels: {istio.io/dataplane-mode: ambient}}
status: {podIP: 10.0.0.9, phase: Succeeded}
---
apiVersion: v1
kind: Pod
metadata: {name: new, namespace: legacy}
status: {podIP: 10.0.0.9}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: legacy, labels: {app: web}}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.1
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}, {name: metrics, port: 9100, targetPort: 9100}]
---
apiVersion: v1
kind: Service
metadata: {name: web-headless, namespace: shop}
spec: {clusterIP: None, selector: {app: web}, ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: manual, namespace: shop}
spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}
"#;

    fn model() -> Model {
        load_docs(&[("mesh.yaml".to_string(), MESH.to_string())]).unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn endpoints(m: &Model, svc: &str, port: u16) -> Vec<(String, IpAddr, u16)> {
        let svc = &*m.services[&NamespacedName::new("shop", svc)];
        let port = svc.ports.iter().find(|p| p.port == port).unwrap();
        m.endpoints(svc, port)
            .into_iter()
            .map(|e| {
                (
                    e.pod.map_or_else(|| "-".to_string(), |p| p.name),
                    e.ip,
                    e.port,
                )
            })
            .collect()
    }

    #[test]
    fn endpoints_resolve_named_ports_and_skip_unready_pods() {
        let m = model();
        // web-3 has no `http` port, web-4 is not ready, web-v6 has no IPv4 address, and the
        // legacy pod is in another namespace.
        assert_eq!(
            endpoints(&m, "web", 80),
            vec![
                ("agent".to_string(), ip("192.168.0.10"), 9100),
                ("web-1".to_string(), ip("10.0.0.1"), 8080),
                ("web-2".to_string(), ip("10.0.0.2"), 8081),
            ]
        );
        let numbered: Vec<String> = endpoints(&m, "web", 9100)
            .into_iter()
            .map(|(name, _, port)| format!("{name}:{port}"))
            .collect();
        assert_eq!(
            numbered,
            ["agent:9100", "web-1:9100", "web-2:9100", "web-3:9100"],
            "a numbered target port needs no container port"
        );
        let headless: Vec<_> = endpoints(&m, "web-headless", 8080)
            .into_iter()
            .map(|(name, ip, _)| (name, ip))
            .collect();
        assert!(
            headless.contains(&("web-v6".to_string(), ip("fd00::6"))),
            "{headless:?}"
        );
        assert_eq!(
            endpoints(&m, "manual", 80),
            vec![],
            "no selector, no endpoints"
        );
    }

    const SLICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.9, ports: [{name: https, port: 443}, {name: admin, port: 9000}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-b, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: https, port: 6443}, {name: dns, port: 53, protocol: UDP}]
endpoints:
- addresses: [203.0.113.7]
- addresses: [10.0.0.2]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-a, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: https, port: 6443}, {name: admin, port: 9001}]
endpoints:
- addresses: [10.0.0.1]
  targetRef: {kind: Pod, name: web-1}
- addresses: [203.0.113.7, 203.0.113.8]
  conditions: {ready: true, serving: true}
- addresses: [10.0.0.3]
  conditions: {ready: false}
- addresses: [10.0.0.44]
  targetRef: {kind: Pod, name: gone}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-v6, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv6
ports: [{name: https, port: 6443}]
endpoints: [{addresses: ["fd00::9"]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-names, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: FQDN
ports: [{name: https, port: 6443}]
endpoints: [{addresses: [api.example.com]}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: web-x, namespace: shop, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 7777}]
endpoints: [{addresses: [203.0.113.50]}]
"#;

    fn sliced(extra: &str) -> Result<Model, crate::k8s::ConfigError> {
        load_docs(&[
            ("mesh.yaml".to_string(), MESH.to_string()),
            ("slices.yaml".to_string(), extra.to_string()),
        ])
    }

    #[test]
    fn a_service_without_a_selector_has_the_ready_addresses_of_its_slices() {
        let m = sliced(SLICES).unwrap();
        // Slices in name order, each address once; the targetRef's pod, else the pod owning
        // the address, else none (203.0.113.7: outside the mesh); not ready, IPv6 (the
        // Service is IPv4) and FQDN slices skipped; a targetRef to a pod the model lacks
        // falls back to the address (10.0.0.44 is nobody's).
        assert_eq!(
            endpoints(&m, "api", 443),
            vec![
                ("web-1".to_string(), ip("10.0.0.1"), 6443),
                ("-".to_string(), ip("203.0.113.7"), 6443),
                ("-".to_string(), ip("10.0.0.44"), 6443),
                ("web-2".to_string(), ip("10.0.0.2"), 6443),
            ]
        );
        // The port named as the Service port: only api-a has `admin`.
        assert_eq!(
            endpoints(&m, "api", 9000),
            vec![
                ("web-1".to_string(), ip("10.0.0.1"), 9001),
                ("-".to_string(), ip("203.0.113.7"), 9001),
                ("-".to_string(), ip("10.0.0.44"), 9001),
            ]
        );
        // A Service with a selector keeps its pods: a slice naming it is not read.
        assert!(endpoints(&m, "web", 80)
            .iter()
            .all(|(_, ip, _)| *ip != "203.0.113.50".parse::<IpAddr>().unwrap()));
        assert_eq!(
            endpoints(&m, "manual", 80),
            vec![],
            "no slice, no endpoints"
        );
        assert_eq!(
            m.dump().endpoint_slices.len(),
            4,
            "the FQDN slice is skipped"
        );
    }

    #[test]
    fn a_malformed_endpoint_slice_is_refused_by_field() {
        let slice = |body: &str| {
            format!(
                "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s, namespace: shop, labels: {{kubernetes.io/service-name: api}}}}\n{body}\n"
            )
        };
        let refused = |body: &str| sliced(&slice(body)).unwrap_err().to_string();
        let e = refused("addressType: IPv4\nendpoints: [{addresses: [\"fd00::1\"]}]");
        assert!(
            e.contains("endpoints[0].addresses[0]") && e.contains("not an IPv4"),
            "{e}"
        );
        let e = refused("addressType: IPv5\nendpoints: []");
        assert!(e.contains("addressType") && e.contains("IPv5"), "{e}");
        let e = refused("addressType: IPv4\nendpoints: [{addresses: []}]");
        assert!(e.contains("at least one address"), "{e}");
        let e = refused("addressType: IPv4\nports: [{name: https, port: 70000}]");
        assert!(e.contains("ports[0].port"), "{e}");
        let e = refused("endpoints: []");
        assert!(e.contains("addressType"), "{e}");
        // Without the Service label it belongs to nothing: skipped, not refused.
        let orphan = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: o, namespace: shop}\naddressType: IPv4\n";
        assert!(sliced(orphan).unwrap().endpoint_slices.is_empty());
    }

    #[test]
    fn services_for_pod_match_selectors_in_the_pod_namespace() {
        let m = model();
        let names = |ns: &str, pod: &str| -> Vec<String> {
            let pod = m.pod(ns, pod).unwrap();
            m.services_for_pod(pod)
                .into_iter()
                .map(|s| s.name.clone())
                .collect()
        };
        assert_eq!(names("shop", "web-1"), ["web", "web-headless"]);
        assert_eq!(names("legacy", "web-1"), Vec::<String>::new());
    }

    #[test]
    fn ambient_enrollment() {
        let m = model();
        for (ns, pod, want) in [
            ("shop", "web-1", true),  // namespace label
            ("shop", "web-3", false), // pod opts out
            ("shop", "agent", false), // host network
            ("legacy", "old", true),  // pod label in a plain namespace
            ("legacy", "new", false), // neither
        ] {
            assert_eq!(m.is_ambient(m.pod(ns, pod).unwrap()), want, "{ns}/{pod}");
        }
    }

    #[test]
    fn lookups() {
        let m = model();
        let on_a: Vec<&str> = m.pods_on_node("node-a").map(|p| p.name.as_str()).collect();
        assert_eq!(on_a, ["agent", "web-1", "web-3", "web-4"]);
        assert_eq!(
            m.workload_by_ip(ip("fd00::1")).map(|p| p.name.as_str()),
            Some("web-1")
        );
        assert_eq!(
            m.workload_by_ip(ip("192.168.0.10")),
            None,
            "host network is not a workload"
        );
        // A finished pod's stale IP belongs to the running pod that reuses it.
        assert_eq!(
            m.workload_by_ip(ip("10.0.0.9")).map(|p| p.name.as_str()),
            Some("new")
        );
        let (svc, port) = m.service_by_vip(ip("10.96.0.1"), 80).unwrap();
        assert_eq!(
            (svc.name.as_str(), port.target_port.clone()),
            ("web", TargetPort::Named("http".into()))
        );
        assert!(m.service_by_vip(ip("10.96.0.1"), 81).is_none());
        assert!(m.pod("shop", "nope").is_none());
    }
}
