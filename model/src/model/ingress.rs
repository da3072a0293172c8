//! A Gateway API ingress gateway (a `Gateway` of class [`INGRESS_GATEWAY_CLASS`], `istio`):
//! its listeners, the TLS Secrets and ReferenceGrants they use, which routes attach to each
//! listener and the Gateway's status. Typed, validated data built by [`crate::k8s`]; every
//! query here is pure and reads indexes [`Model`] builds once per model.
//!
//! ## Which routes attach to a listener ([`Model::routes_for_listener`])
//! An HTTPRoute or GRPCRoute attaches to listener `l` of Gateway `g` when, as the Gateway
//! API says:
//! 1. one of its `parentRefs` names `g` (kind `Gateway`; the namespace defaults to the
//!    route's), with `sectionName` = `l.name` and `port` = `l.port` when they are given;
//! 2. `l.allowedRoutes.namespaces` admits the route's namespace: `Same` (the default) the
//!    Gateway's own, `All` every one, `Selector` those whose labels the selector selects (a
//!    namespace the model lacks has no labels; `kubernetes.io/metadata.name`, which
//!    Kubernetes puts on every namespace, is taken as set to its name);
//! 3. `l.allowedRoutes.kinds` admits its kind (none written: the protocol's own,
//!    `HTTPRoute` and `GRPCRoute` for `HTTP` and `HTTPS`);
//! 4. its `hostnames` intersect the listener's `hostname` (no hostname on either side
//!    matches all; `*.example.com` covers `a.example.com`, not `example.com`).
//!
//! Those are the routes a listener's `attachedRoutes` counts. What the listener serves is
//! them less each route whose hostnames intersect an older one's of the other kind
//! (HTTPRoute vs GRPCRoute on one listener: the GRPCRoute spec keeps the older).
//!
//! ## Certificates ([`Model::listener_certificates`])
//! A `certificateRefs` entry names a Secret of type `kubernetes.io/tls` ([`TlsSecret`]). One
//! in another namespace than the Gateway's needs a ReferenceGrant in the Secret's namespace
//! from `gateway.networking.k8s.io` `Gateway` in the Gateway's namespace to core `Secret`
//! (all of them, or that name); else it is `RefNotPermitted`. A Secret that is missing, or
//! that is not a usable TLS Secret (wrong type, a key missing, no PEM certificate or key:
//! [`Model::secret_problem`] says which), is `InvalidCertificateRef`.
//!
//! ## Status ([`Model::gateway_status`])
//! Computed from the model alone, with the Gateway API's condition types and reasons. Per
//! listener: `Accepted` (false: `UnsupportedProtocol` for a protocol this gateway does not
//! serve, or the conflict's reason), `Conflicted` (`ProtocolConflict`: listeners on one port
//! whose protocols cannot share it, i.e. HTTP, TLS-based (HTTPS and TLS) and TCP are three
//! families; `HostnameConflict`: an HTTPS and a TLS listener on one port with the same
//! hostname; two listeners with the same port, protocol and hostname are refused by the
//! translator as the CRD refuses them), `ResolvedRefs` (`InvalidCertificateRef`,
//! `RefNotPermitted`, then `InvalidRouteKinds`) and `Programmed` (true when accepted, not
//! conflicted and its certificates resolve). The Gateway: `Accepted` (`Accepted`, or
//! `ListenersNotValid`: true while some listener is accepted) and `Programmed` (true while
//! some listener is programmed). "Programmed" here means the model gives the listener what
//! it needs to be served; whether a gateway process serves it is for that process to say.
//!
//! `addresses` are where clients reach the gateway: those of its Service, `<gateway>-istio`
//! in its namespace ([`INGRESS_SERVICE_SUFFIX`], the one `cargo xtask gateway render`
//! creates), i.e. its load balancer's `status.loadBalancer.ingress` (each entry's IP, else
//! its hostname) when it has one, else its cluster IPs; `None` (left out of the status, not
//! an empty list) when the model has no such Service. This gateway assigns no address, so
//! of `spec.addresses` it honours those its Service has: one it does not have makes the
//! Gateway `Programmed=False` (`AddressNotUsable`), and an address of a type other than
//! `IPAddress` and `Hostname` makes it `Accepted=False` (`UnsupportedAddress`). Without the
//! Service nothing is known to compare with, and `Programmed` stays as the listeners say.
//!
//! ## Subsets behind a waypoint ([`Model::subsets_through_waypoints`])
//! A backend Service that uses a waypoint is reached through the waypoint, as one endpoint
//! (its VIP), not its pods: the waypoint's own routes choose them. A VirtualService
//! destination `subset` of such a Service therefore selects no pod at the ingress; the
//! request goes to the waypoint as if it named no subset (Istio's ingress does the same: its
//! cluster for the subset has the waypoint as its one endpoint), with the subset's traffic
//! policy. These pure queries list such destinations so the gateway can say so once.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Serialize, Serializer};

use super::{Gateway, HttpRoute, Labels, Model, NamespacedName, Service, VirtualService};
use crate::model::{BackendRef, ParentKind};
use crate::route::{hostnames_intersect, without_kind_conflicts, BackendKind};

/// The `GatewayClass` of ingress gateways (Istio's).
pub const INGRESS_GATEWAY_CLASS: &str = "istio";
/// The Gateway API's group.
pub const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";
/// Istio's networking group (a `ServiceEntry` backend).
const ISTIO_NETWORKING_GROUP: &str = "networking.istio.io";
/// The label Kubernetes sets on every namespace to its name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";
/// The type of a Secret holding a certificate chain and its key.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";
/// An ingress Gateway's Service is named `<gateway><suffix>`, in the Gateway's namespace
/// (Istio's naming; `cargo xtask gateway render` creates it).
pub const INGRESS_SERVICE_SUFFIX: &str = "-istio";
/// Most `addresses` of a Gateway, in `spec` and in `status` (the Gateway API's `maxItems`).
pub const MAX_GATEWAY_ADDRESSES: usize = 16;

/// An address clients reach something at, of the Gateway API's `IPAddress` or `Hostname`
/// type: a Gateway's `spec`/`status.addresses` entry, or a Service's
/// `status.loadBalancer.ingress[]` (an IP, or a cloud load balancer's DNS name).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum HostAddress {
    Ip(IpAddr),
    /// A DNS name (no wildcard, not an IP), lower-case.
    Hostname(String),
}

impl HostAddress {
    /// The Gateway API's `type` of the address: `IPAddress` or `Hostname`.
    pub fn type_name(&self) -> &'static str {
        match self {
            HostAddress::Ip(_) => "IPAddress",
            HostAddress::Hostname(_) => "Hostname",
        }
    }
}

impl fmt::Display for HostAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostAddress::Ip(ip) => ip.fmt(f),
            HostAddress::Hostname(h) => f.write_str(h),
        }
    }
}

/// A `spec.addresses` entry of an ingress Gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum RequestedAddress {
    /// Of type `IPAddress` (the default) or `Hostname`.
    Host(HostAddress),
    /// Of another type (`NamedAddress`, a domain-prefixed one), as written: this gateway
    /// cannot honour it (`UnsupportedAddress`).
    Unsupported { type_: String, value: String },
}

/// A VirtualService destination of an ingress Gateway that names a DestinationRule subset of
/// a Service that uses a waypoint: the subset selects no pod here (see the module docs).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SubsetThroughWaypoint {
    /// The VirtualService.
    pub route: NamespacedName,
    pub service: NamespacedName,
    pub subset: String,
    pub waypoint: NamespacedName,
}

impl fmt::Display for SubsetThroughWaypoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "subset {} of {} (VirtualService {}): the Service uses waypoint {}, whose routes \
             choose its pods; route by subset there (the ingress sends to the waypoint without \
             the subset)",
            self.subset, self.service, self.route, self.waypoint
        )
    }
}

/// One `spec.listeners` entry of a Gateway.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Listener {
    /// Unique within the Gateway (a route's `sectionName`).
    pub name: String,
    /// Lower-case; `*.example.com` wildcards allowed; `None` matches every host.
    pub hostname: Option<String>,
    pub port: u16,
    pub protocol: ListenerProtocol,
    /// Required for `HTTPS` and `TLS`, absent for `HTTP` and `TCP`.
    pub tls: Option<ListenerTls>,
    pub allowed_routes: AllowedRoutes,
}

/// `protocol` of a listener.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ListenerProtocol {
    Http,
    Https,
    Tls,
    Tcp,
    /// Any other value as written (`UDP`, `HBONE` of a waypoint, `example.com/proto`): kept
    /// so that status can say `UnsupportedProtocol`, never served.
    Unsupported(String),
}

impl ListenerProtocol {
    /// Parses the Gateway API value (case-sensitive, as the API is).
    pub fn parse(s: &str) -> ListenerProtocol {
        match s {
            "HTTP" => ListenerProtocol::Http,
            "HTTPS" => ListenerProtocol::Https,
            "TLS" => ListenerProtocol::Tls,
            "TCP" => ListenerProtocol::Tcp,
            other => ListenerProtocol::Unsupported(other.to_string()),
        }
    }

    /// The value as the Gateway API spells it.
    pub fn as_str(&self) -> &str {
        match self {
            ListenerProtocol::Http => "HTTP",
            ListenerProtocol::Https => "HTTPS",
            ListenerProtocol::Tls => "TLS",
            ListenerProtocol::Tcp => "TCP",
            ListenerProtocol::Unsupported(p) => p,
        }
    }

    /// The route kinds a listener of this protocol takes: its `supportedKinds` when
    /// `allowedRoutes.kinds` is empty. (`TLSRoute` and `TCPRoute` are valid kinds; the model
    /// holds no such routes, so none attach.)
    pub fn route_kinds(&self) -> &'static [&'static str] {
        match self {
            ListenerProtocol::Http | ListenerProtocol::Https => &["HTTPRoute", "GRPCRoute"],
            ListenerProtocol::Tls => &["TLSRoute"],
            ListenerProtocol::Tcp => &["TCPRoute"],
            ListenerProtocol::Unsupported(_) => &[],
        }
    }

    /// Which listeners may share a port: those of one family (HTTP by `Host`, HTTPS and
    /// TLS by SNI, TCP alone); `None` for a protocol not served.
    fn family(&self) -> Option<u8> {
        match self {
            ListenerProtocol::Http => Some(0),
            ListenerProtocol::Https | ListenerProtocol::Tls => Some(1),
            ListenerProtocol::Tcp => Some(2),
            ListenerProtocol::Unsupported(_) => None,
        }
    }
}

impl fmt::Display for ListenerProtocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `tls` of a listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListenerTls {
    pub mode: ListenerTlsMode,
    /// In order; at least one with [`ListenerTlsMode::Terminate`], ignored with
    /// `Passthrough`.
    pub certificate_refs: Vec<SecretRef>,
}

/// `tls.mode` (default `Terminate`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ListenerTlsMode {
    Terminate,
    Passthrough,
}

/// A `certificateRefs` entry: a core `Secret` (the only kind the translator accepts).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct SecretRef {
    /// Defaulted to the Gateway's namespace.
    pub namespace: String,
    pub name: String,
}

/// `allowedRoutes` of a listener.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AllowedRoutes {
    pub from: RouteNamespaces,
    /// `kinds[].kind` as written (a kind of another group than `gateway.networking.k8s.io`
    /// as `group/Kind`, which no route has); empty = the protocol's own
    /// ([`ListenerProtocol::route_kinds`]).
    pub kinds: Vec<String>,
}

/// `allowedRoutes.namespaces.from`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub enum RouteNamespaces {
    /// The Gateway's own namespace (the default).
    #[default]
    Same,
    All,
    /// Namespaces whose labels `selector.matchLabels` selects (empty: every namespace).
    Selector(Labels),
}

/// A Secret of type `kubernetes.io/tls` whose `tls.crt` holds at least one PEM
/// `CERTIFICATE` and `tls.key` a PEM private key (checked as PEM only: the gateway parses
/// them). `Debug` and `Serialize` never show the key: the model is in `/config_dump`.
#[derive(Clone, PartialEq, Eq)]
pub struct TlsSecret {
    pub namespace: String,
    pub name: String,
    /// `tls.crt`: the certificate chain, leaf first.
    pub cert_chain_pem: String,
    /// `tls.key`.
    pub key_pem: String,
}

/// What `Debug` and `Serialize` show in place of the key.
pub const REDACTED: &str = "<redacted>";

impl TlsSecret {
    pub fn key(&self) -> NamespacedName {
        NamespacedName::new(&self.namespace, &self.name)
    }
}

impl fmt::Debug for TlsSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsSecret")
            .field("namespace", &self.namespace)
            .field("name", &self.name)
            .field("cert_chain_pem", &self.cert_chain_pem)
            .field("key_pem", &REDACTED)
            .finish()
    }
}

impl Serialize for TlsSecret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("TlsSecret", 4)?;
        st.serialize_field("namespace", &self.namespace)?;
        st.serialize_field("name", &self.name)?;
        st.serialize_field("cert_chain_pem", &self.cert_chain_pem)?;
        st.serialize_field("key_pem", REDACTED)?;
        st.end()
    }
}

/// A Secret kept out of the model's TLS secrets, and why (for status and `/config_dump`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SecretProblem {
    pub namespace: String,
    pub name: String,
    /// E.g. `type "Opaque" is not kubernetes.io/tls`, `tls.key: missing`.
    pub problem: String,
}

/// A `gateway.networking.k8s.io` `ReferenceGrant`: objects of the `from` kinds in the
/// `from` namespaces may refer to the `to` objects in the grant's own namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReferenceGrant {
    pub name: String,
    pub namespace: String,
    pub from: Vec<ReferenceGrantFrom>,
    pub to: Vec<ReferenceGrantTo>,
}

/// A `spec.from` entry. The core group is `""` (`core` is read as `""`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReferenceGrantFrom {
    pub group: String,
    pub kind: String,
    pub namespace: String,
}

/// A `spec.to` entry. The core group is `""`; `name` `None` = every object of the kind.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ReferenceGrantTo {
    pub group: String,
    pub kind: String,
    pub name: Option<String>,
}

/// Why a listener's certificates cannot be used: the first `certificateRefs` entry at
/// fault, with the Gateway API reason ([`ListenerRefError::reason`]). The message names the
/// entry and the Secret; the listener is in [`ListenerRefError::listener`], not repeated.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ListenerRefError {
    /// The Secret is missing or not a usable TLS Secret.
    #[error("tls.certificateRefs[{index}]: Secret {secret}: {problem}")]
    InvalidCertificateRef {
        listener: String,
        index: usize,
        secret: NamespacedName,
        problem: String,
    },
    /// The Secret is in another namespace and no ReferenceGrant there allows it.
    #[error(
        "tls.certificateRefs[{index}]: Secret {secret}: not permitted (no ReferenceGrant \
         in {} from Gateways of {from_namespace} to Secrets)",
        .secret.namespace
    )]
    RefNotPermitted {
        listener: String,
        index: usize,
        secret: NamespacedName,
        from_namespace: String,
    },
}

impl ListenerRefError {
    /// The listener's name.
    pub fn listener(&self) -> &str {
        match self {
            ListenerRefError::InvalidCertificateRef { listener, .. }
            | ListenerRefError::RefNotPermitted { listener, .. } => listener,
        }
    }

    /// `InvalidCertificateRef` or `RefNotPermitted`.
    pub fn reason(&self) -> ConditionReason {
        match self {
            ListenerRefError::InvalidCertificateRef { .. } => {
                ConditionReason::InvalidCertificateRef
            }
            ListenerRefError::RefNotPermitted { .. } => ConditionReason::RefNotPermitted,
        }
    }
}

/// A status condition type, as the Gateway API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ConditionType {
    Accepted,
    Programmed,
    Conflicted,
    ResolvedRefs,
}

/// A status condition reason, as the Gateway API names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum ConditionReason {
    Accepted,
    Programmed,
    ListenersNotValid,
    Invalid,
    UnsupportedProtocol,
    HostnameConflict,
    ProtocolConflict,
    NoConflicts,
    ResolvedRefs,
    InvalidCertificateRef,
    RefNotPermitted,
    InvalidRouteKinds,
    UnsupportedAddress,
    AddressNotUsable,
}

/// One condition (`lastTransitionTime` and `observedGeneration` are the writer's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct StatusCondition {
    #[serde(rename = "type")]
    pub type_: ConditionType,
    /// Serialized `"True"` / `"False"`.
    #[serde(serialize_with = "true_false")]
    pub status: bool,
    pub reason: ConditionReason,
    pub message: String,
}

/// How well a listener with `hostname` (`None`: any host) takes requests (or a TLS client's
/// SNI) for `host`: `None` when it does not; else, higher is more specific — an exact
/// hostname, then the longest `*.` wildcard covering `host` (which needs at least one label
/// in front of the suffix), then a listener without a hostname. Case-insensitive.
pub fn hostname_rank(hostname: Option<&str>, host: &str) -> Option<(u8, usize)> {
    let Some(h) = hostname else {
        return Some((0, 0));
    };
    match h.strip_prefix('*') {
        Some(suffix) => {
            let covered = host.len() > suffix.len()
                && host
                    .get(host.len() - suffix.len()..)
                    .is_some_and(|end| end.eq_ignore_ascii_case(suffix));
            covered.then_some((1, suffix.len()))
        }
        None => h.eq_ignore_ascii_case(host).then_some((2, h.len())),
    }
}

fn true_false<S: Serializer>(b: &bool, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(if *b { "True" } else { "False" })
}

impl StatusCondition {
    fn new(
        type_: ConditionType,
        status: bool,
        reason: ConditionReason,
        message: impl Into<String>,
    ) -> Self {
        StatusCondition {
            type_,
            status,
            reason,
            message: message.into(),
        }
    }
}

/// `status` of a Gateway, as computed from the model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GatewayStatus {
    /// Where clients reach the gateway: its Service's addresses (see the module docs), at
    /// most [`MAX_GATEWAY_ADDRESSES`], each once; `None` when the model has no such Service.
    pub addresses: Option<Vec<HostAddress>>,
    /// `Accepted`, `Programmed`.
    pub conditions: Vec<StatusCondition>,
    /// One per listener, in `spec.listeners` order.
    pub listeners: Vec<ListenerStatus>,
}

impl GatewayStatus {
    pub fn condition(&self, type_: ConditionType) -> Option<&StatusCondition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    pub fn listener(&self, name: &str) -> Option<&ListenerStatus> {
        self.listeners.iter().find(|l| l.name == name)
    }
}

/// `status.listeners[]`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ListenerStatus {
    pub name: String,
    /// The route kinds (group `gateway.networking.k8s.io`) the listener takes: those of
    /// `allowedRoutes.kinds` valid for its protocol, else the protocol's own.
    pub supported_kinds: Vec<String>,
    /// Routes attached (see the module docs).
    pub attached_routes: u32,
    /// `Accepted`, `Conflicted`, `ResolvedRefs`, `Programmed`.
    pub conditions: Vec<StatusCondition>,
}

impl ListenerStatus {
    pub fn condition(&self, type_: ConditionType) -> Option<&StatusCondition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }
}

/// Normalises the core group (`core` is how some write `""`).
fn core(group: &str) -> &str {
    if group == "core" {
        ""
    } else {
        group
    }
}

/// Whether `allowed` admits routes from `namespace` to a Gateway in `gateway_ns`, with
/// `labels` the namespace's labels.
fn namespace_allowed(
    allowed: &RouteNamespaces,
    gateway_ns: &str,
    namespace: &str,
    labels: Option<&Labels>,
) -> bool {
    match allowed {
        RouteNamespaces::Same => namespace == gateway_ns,
        RouteNamespaces::All => true,
        RouteNamespaces::Selector(selector) => {
            selector
                .iter()
                .all(|(k, v)| match labels.and_then(|l| l.get(k)) {
                    Some(have) => have == v,
                    None => k == NAMESPACE_NAME_LABEL && v == namespace,
                })
        }
    }
}

/// Whether `listener` takes routes of `kind` (see [`supported_kinds`]).
fn kind_allowed(listener: &Listener, kind: &str) -> bool {
    let valid = listener.protocol.route_kinds();
    valid.contains(&kind)
        && (listener.allowed_routes.kinds.is_empty()
            || listener.allowed_routes.kinds.iter().any(|k| k == kind))
}

/// The kinds `listener` takes: valid kinds of `allowedRoutes.kinds` in order, once each,
/// else its protocol's; and whether some written kind was not valid.
fn supported_kinds(listener: &Listener) -> (Vec<String>, bool) {
    let valid = listener.protocol.route_kinds();
    if listener.allowed_routes.kinds.is_empty() {
        return (valid.iter().map(|k| k.to_string()).collect(), false);
    }
    let mut out: Vec<String> = Vec::new();
    let mut invalid = false;
    for kind in &listener.allowed_routes.kinds {
        if !valid.contains(&kind.as_str()) {
            invalid = true;
        } else if !out.contains(kind) {
            out.push(kind.clone());
        }
    }
    (out, invalid)
}

// === impl Model ===

impl Model {
    /// The TLS Secret `namespace/name`, when it is a usable `kubernetes.io/tls` Secret.
    pub fn tls_secret(&self, namespace: &str, name: &str) -> Option<&Arc<TlsSecret>> {
        self.index.tls_secrets.get(namespace)?.get(name)
    }

    /// Why the Secret `namespace/name` is not among the TLS secrets, when the model read it
    /// (`None` for a usable TLS Secret or one the model never saw).
    pub fn secret_problem(&self, namespace: &str, name: &str) -> Option<&str> {
        self.secret_problems
            .get(&NamespacedName::new(namespace, name))
            .map(String::as_str)
    }

    /// Whether a ReferenceGrant in `to_namespace` lets objects of (`from_group`,
    /// `from_kind`) in `from_namespace` refer to (`to_group`, `to_kind`, `to_name`). A
    /// reference within one namespace needs no grant: true. The core group is `""` (or
    /// `core`).
    #[allow(clippy::too_many_arguments)]
    pub fn reference_granted(
        &self,
        from_group: &str,
        from_kind: &str,
        from_namespace: &str,
        to_group: &str,
        to_kind: &str,
        to_namespace: &str,
        to_name: &str,
    ) -> bool {
        if from_namespace == to_namespace {
            return true;
        }
        let (from_group, to_group) = (core(from_group), core(to_group));
        let Some(positions) = self.index.reference_grants.get(to_namespace) else {
            return false;
        };
        positions
            .iter()
            .filter_map(|i| self.reference_grants.get(*i as usize))
            .any(|g| {
                g.from.iter().any(|f| {
                    f.group == from_group && f.kind == from_kind && f.namespace == from_namespace
                }) && g.to.iter().any(|t| {
                    t.group == to_group
                        && t.kind == to_kind
                        && t.name.as_deref().is_none_or(|n| n == to_name)
                })
            })
    }

    /// Whether `route` may send to `backend`: a backend in the route's namespace always; one
    /// in another namespace when a ReferenceGrant there allows the route's kind from the
    /// route's namespace (to the `Service`, or Istio `ServiceEntry`). What an ingress
    /// gateway checks before forwarding (a backend it may not use is answered 500).
    pub fn backend_permitted(&self, route: &HttpRoute, backend: &BackendRef) -> bool {
        let (group, kind) = match backend.kind {
            BackendKind::Service => ("", "Service"),
            BackendKind::ServiceEntry => (ISTIO_NETWORKING_GROUP, "ServiceEntry"),
        };
        self.reference_granted(
            GATEWAY_API_GROUP,
            route.kind.as_str(),
            &route.namespace,
            group,
            kind,
            &backend.service.namespace,
            &backend.service.name,
        )
    }

    /// The certificates of `listener` of `gateway`, in `certificateRefs` order (empty
    /// without TLS termination): a ref in another namespace needs a ReferenceGrant (from
    /// Gateway to Secret); `Err` names the first ref that is not granted
    /// (`RefNotPermitted`), missing or not a usable TLS Secret (`InvalidCertificateRef`).
    pub fn listener_certificates(
        &self,
        gateway: &Gateway,
        listener: &Listener,
    ) -> Result<Vec<Arc<TlsSecret>>, ListenerRefError> {
        let Some(tls) = listener
            .tls
            .as_ref()
            .filter(|t| t.mode == ListenerTlsMode::Terminate)
        else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(tls.certificate_refs.len());
        for (index, r) in tls.certificate_refs.iter().enumerate() {
            let secret = NamespacedName::new(&r.namespace, &r.name);
            let granted = self.reference_granted(
                GATEWAY_API_GROUP,
                "Gateway",
                &gateway.namespace,
                "",
                "Secret",
                &r.namespace,
                &r.name,
            );
            if !granted {
                return Err(ListenerRefError::RefNotPermitted {
                    listener: listener.name.clone(),
                    index,
                    secret,
                    from_namespace: gateway.namespace.clone(),
                });
            }
            match self.tls_secret(&r.namespace, &r.name) {
                Some(s) => out.push(s.clone()),
                None => {
                    let problem = self
                        .secret_problem(&r.namespace, &r.name)
                        .unwrap_or("not found")
                        .to_string();
                    return Err(ListenerRefError::InvalidCertificateRef {
                        listener: listener.name.clone(),
                        index,
                        secret,
                        problem,
                    });
                }
            }
        }
        Ok(out)
    }

    /// The HTTPRoutes and GRPCRoutes `listener` of `gateway` serves, in model order (see
    /// the module docs); empty when either is unknown.
    pub fn routes_for_listener(&self, gateway: &NamespacedName, listener: &str) -> Vec<&HttpRoute> {
        let Some((gw, l)) = self.gateway_listener(gateway, listener) else {
            return Vec::new();
        };
        without_kind_conflicts(self.attached_routes(gw, l))
    }

    /// The VirtualServices whose `gateways` name `gateway`, in model order (oldest first,
    /// then namespace/name): read from the index, not a scan of every VirtualService.
    pub fn virtual_services_for_gateway<'m>(
        &'m self,
        gateway: &NamespacedName,
    ) -> impl Iterator<Item = &'m VirtualService> + 'm {
        let positions = self
            .index
            .virtual_services_by_gateway
            .get(&gateway.namespace)
            .and_then(|by_name| by_name.get(&gateway.name))
            .map_or(&[][..], Vec::as_slice);
        positions
            .iter()
            .filter_map(|i| self.virtual_services.get(*i as usize))
    }

    /// `gateway` and its listener named `listener`.
    fn gateway_listener(
        &self,
        gateway: &NamespacedName,
        listener: &str,
    ) -> Option<(&Gateway, &Listener)> {
        let gw = self.gateways.get(gateway)?;
        let l = gw.listeners.iter().find(|l| l.name == listener)?;
        Some((gw, l))
    }

    /// The routes attached to `listener` of `gw` (rules 1-4 of the module docs), in model
    /// order: read from the routes indexed under the Gateway, without allocating but for
    /// the answer (a request asks).
    fn attached_routes<'m>(&'m self, gw: &Gateway, listener: &Listener) -> Vec<&'m HttpRoute> {
        let hostname = listener.hostname.as_slice();
        self.routes_naming(ParentKind::Gateway, &gw.namespace, &gw.name)
            .filter(|r| {
                r.parents.iter().any(|p| {
                    p.kind == ParentKind::Gateway
                        && p.target.namespace == gw.namespace
                        && p.target.name == gw.name
                        && p.section_name.as_deref().is_none_or(|s| s == listener.name)
                        && p.port.is_none_or(|port| port == listener.port)
                })
            })
            .filter(|r| {
                let labels = self.namespace(&r.namespace).map(|ns| &ns.labels);
                namespace_allowed(
                    &listener.allowed_routes.from,
                    &gw.namespace,
                    &r.namespace,
                    labels,
                )
            })
            .filter(|r| kind_allowed(listener, r.kind.as_str()))
            .filter(|r| hostnames_intersect(hostname, &r.hostnames))
            .collect()
    }

    /// The Gateway API status of the ingress Gateway `gateway` (see the module docs);
    /// `None` when the model has no such Gateway of class [`INGRESS_GATEWAY_CLASS`] (other
    /// classes' status is their controllers').
    pub fn gateway_status(&self, gateway: &NamespacedName) -> Option<GatewayStatus> {
        let gw = self.gateways.get(gateway).filter(|g| g.is_ingress())?;
        let conflicts = listener_conflicts(&gw.listeners);
        let mut listeners = Vec::with_capacity(gw.listeners.len());
        let mut not_accepted = Vec::new();
        let mut not_programmed = Vec::new();
        for (l, conflict) in gw.listeners.iter().zip(conflicts) {
            let status = self.listener_status(gw, l, conflict);
            let ok = |t| status.condition(t).is_some_and(|c| c.status);
            if !ok(ConditionType::Accepted) {
                not_accepted.push(l.name.as_str());
            }
            if !ok(ConditionType::Programmed) {
                not_programmed.push(l.name.as_str());
            }
            listeners.push(status);
        }
        let total = gw.listeners.len();
        let service = self.ingress_service(gw);
        let addresses = service.map(service_addresses);
        let (unsupported, not_usable) =
            address_problems(&gw.requested_addresses, addresses.as_deref());
        let accepted = if !unsupported.is_empty() {
            StatusCondition::new(
                ConditionType::Accepted,
                false,
                ConditionReason::UnsupportedAddress,
                format!(
                    "spec.addresses: only types IPAddress and Hostname are supported, not {}",
                    unsupported.join(", ")
                ),
            )
        } else if not_accepted.is_empty() {
            StatusCondition::new(
                ConditionType::Accepted,
                true,
                ConditionReason::Accepted,
                "Resource accepted",
            )
        } else {
            StatusCondition::new(
                ConditionType::Accepted,
                not_accepted.len() < total,
                ConditionReason::ListenersNotValid,
                format!("listeners not accepted: {}", not_accepted.join(", ")),
            )
        };
        let programmed = if let (Some(svc), false) = (service, not_usable.is_empty()) {
            let have: Vec<String> = addresses
                .iter()
                .flatten()
                .map(HostAddress::to_string)
                .collect();
            StatusCondition::new(
                ConditionType::Programmed,
                false,
                ConditionReason::AddressNotUsable,
                format!(
                    "spec.addresses: {} not among the addresses of Service {}/{} ({}); this \
                     gateway assigns none",
                    not_usable.join(", "),
                    svc.namespace,
                    svc.name,
                    if have.is_empty() {
                        "none".to_string()
                    } else {
                        have.join(", ")
                    }
                ),
            )
        } else if not_programmed.len() < total {
            let mut message = "Resource programmed".to_string();
            if !not_programmed.is_empty() {
                message = format!(
                    "{message}; listeners not programmed: {}",
                    not_programmed.join(", ")
                );
            }
            StatusCondition::new(
                ConditionType::Programmed,
                true,
                ConditionReason::Programmed,
                message,
            )
        } else {
            StatusCondition::new(
                ConditionType::Programmed,
                false,
                ConditionReason::Invalid,
                "no listener can be programmed",
            )
        };
        Some(GatewayStatus {
            addresses,
            conditions: vec![accepted, programmed],
            listeners,
        })
    }

    /// The Service of the ingress Gateway `gw` (`<name>-istio` in its namespace), when the
    /// model has it.
    pub fn ingress_service(&self, gw: &Gateway) -> Option<&Service> {
        let name = format!("{}{INGRESS_SERVICE_SUFFIX}", gw.name);
        self.service(&NamespacedName::new(&gw.namespace, &name))
    }

    /// The destinations of the VirtualServices bound to the ingress Gateway `gateway` that
    /// name a subset of a Service that uses a waypoint (with a VIP: the ingress reaches it
    /// through the waypoint), each once, in model order (see the module docs). Empty for
    /// an unknown Gateway. HTTPRoutes and GRPCRoutes name no subsets.
    pub fn subsets_through_waypoints(
        &self,
        gateway: &NamespacedName,
    ) -> Vec<SubsetThroughWaypoint> {
        let mut out: Vec<SubsetThroughWaypoint> = Vec::new();
        for vs in self.virtual_services_for_gateway(gateway) {
            let backends = vs.rules.iter().flat_map(|r| &r.backends);
            for b in backends.filter(|b| b.kind == BackendKind::Service) {
                let Some(subset) = &b.subset else {
                    continue;
                };
                let Some(svc) = self.service(&b.service) else {
                    continue;
                };
                if svc.cluster_ips.is_empty() {
                    continue;
                }
                let Some(wp) = self.waypoint_for_service(svc) else {
                    continue;
                };
                let found = SubsetThroughWaypoint {
                    route: vs.key(),
                    service: b.service.clone(),
                    subset: subset.clone(),
                    waypoint: wp.gateway.key(),
                };
                if !out.contains(&found) {
                    out.push(found);
                }
            }
        }
        out
    }

    /// One listener's status; `conflict` from [`listener_conflicts`].
    fn listener_status(
        &self,
        gw: &Gateway,
        l: &Listener,
        conflict: Option<ConditionReason>,
    ) -> ListenerStatus {
        use ConditionReason as R;
        use ConditionType as T;
        let (supported, invalid_kinds) = supported_kinds(l);
        let attached = self.attached_routes(gw, l).len();
        let mut conditions = Vec::with_capacity(4);
        let unsupported = matches!(l.protocol, ListenerProtocol::Unsupported(_));
        conditions.push(match (unsupported, conflict) {
            (true, _) => StatusCondition::new(
                T::Accepted,
                false,
                R::UnsupportedProtocol,
                format!("protocol {} is not supported", l.protocol),
            ),
            (false, Some(reason)) => StatusCondition::new(
                T::Accepted,
                false,
                reason,
                "conflicts with another listener on the same port",
            ),
            (false, None) => StatusCondition::new(T::Accepted, true, R::Accepted, "accepted"),
        });
        conditions.push(match conflict {
            Some(R::ProtocolConflict) => StatusCondition::new(
                T::Conflicted,
                true,
                R::ProtocolConflict,
                format!(
                    "another listener on port {} has a protocol that cannot share it",
                    l.port
                ),
            ),
            Some(reason) => StatusCondition::new(
                T::Conflicted,
                true,
                reason,
                format!("another listener on port {} has the same hostname", l.port),
            ),
            None => StatusCondition::new(T::Conflicted, false, R::NoConflicts, "no conflicts"),
        });
        let certificates = self.listener_certificates(gw, l);
        conditions.push(match (&certificates, invalid_kinds) {
            (Err(e), _) => StatusCondition::new(T::ResolvedRefs, false, e.reason(), e.to_string()),
            (Ok(_), true) => StatusCondition::new(
                T::ResolvedRefs,
                false,
                R::InvalidRouteKinds,
                format!(
                    "allowedRoutes.kinds: only {} are valid for protocol {}",
                    l.protocol.route_kinds().join(", "),
                    l.protocol
                ),
            ),
            (Ok(_), false) => StatusCondition::new(
                T::ResolvedRefs,
                true,
                R::ResolvedRefs,
                "references resolved",
            ),
        });
        let programmed = !unsupported && conflict.is_none() && certificates.is_ok();
        conditions.push(if programmed {
            StatusCondition::new(T::Programmed, true, R::Programmed, "programmed")
        } else {
            StatusCondition::new(T::Programmed, false, R::Invalid, "not programmed")
        });
        ListenerStatus {
            name: l.name.clone(),
            supported_kinds: supported,
            attached_routes: u32::try_from(attached).unwrap_or(u32::MAX),
            conditions,
        }
    }

    /// The model with `secrets` (usable TLS Secrets) and `problems` (the other Secrets it
    /// read, and why they are not usable), indexed by namespace and name.
    pub fn with_tls_secrets(
        mut self,
        secrets: std::collections::BTreeMap<NamespacedName, TlsSecret>,
        problems: std::collections::BTreeMap<NamespacedName, String>,
    ) -> Self {
        self.tls_secrets = secrets.into_iter().map(|(k, s)| (k, Arc::new(s))).collect();
        let mut by: super::index::ByNamespaceAndName<Arc<TlsSecret>> = Default::default();
        for s in self.tls_secrets.values() {
            by.entry(s.namespace.clone())
                .or_default()
                .insert(s.name.clone(), s.clone());
        }
        self.index.tls_secrets = by;
        self.secret_problems = problems;
        self
    }

    /// The model with `grants` (in (namespace, name) order), indexed by namespace.
    pub fn with_reference_grants(mut self, grants: Vec<ReferenceGrant>) -> Self {
        let mut by: std::collections::HashMap<String, Vec<u32>> = Default::default();
        for (i, g) in (0u32..).zip(&grants) {
            by.entry(g.namespace.clone()).or_default().push(i);
        }
        self.index.reference_grants = by;
        self.reference_grants = grants;
        self
    }
}

/// Of the `requested` addresses: those of a type this gateway does not support, and those
/// not among `have`, the Service's (none when the Service is unknown: nothing to compare
/// with); each as a condition's message names it.
fn address_problems(
    requested: &[RequestedAddress],
    have: Option<&[HostAddress]>,
) -> (Vec<String>, Vec<String>) {
    let mut unsupported = Vec::new();
    let mut not_usable = Vec::new();
    for a in requested {
        match (a, have) {
            (RequestedAddress::Unsupported { type_, value }, _) => {
                unsupported.push(format!("{value:?} of type {type_}"));
            }
            (RequestedAddress::Host(h), Some(have)) if !have.contains(h) => {
                not_usable.push(h.to_string());
            }
            (RequestedAddress::Host(_), _) => {}
        }
    }
    (unsupported, not_usable)
}

/// Where clients reach the gateway behind `svc`: its load balancer's addresses when it has
/// any, else its cluster IPs; each once, at most [`MAX_GATEWAY_ADDRESSES`].
fn service_addresses(svc: &Service) -> Vec<HostAddress> {
    let all: Vec<HostAddress> = if svc.load_balancer_ingress.is_empty() {
        svc.cluster_ips
            .iter()
            .copied()
            .map(HostAddress::Ip)
            .collect()
    } else {
        svc.load_balancer_ingress.clone()
    };
    let mut out: Vec<HostAddress> = Vec::with_capacity(all.len());
    for a in all {
        if out.len() < MAX_GATEWAY_ADDRESSES && !out.contains(&a) {
            out.push(a);
        }
    }
    out
}

/// For each listener, the conflict it is in, if any: `ProtocolConflict` when another on its
/// port is of another family (HTTP; HTTPS and TLS; TCP), else `HostnameConflict` when
/// another on its port has the same hostname (both none included). Listeners of
/// unsupported protocols are in no conflict.
fn listener_conflicts(listeners: &[Listener]) -> Vec<Option<ConditionReason>> {
    let ports: HashSet<u16> = listeners.iter().map(|l| l.port).collect();
    let mut out = vec![None; listeners.len()];
    if ports.len() == listeners.len() {
        return out;
    }
    for (i, a) in listeners.iter().enumerate() {
        let Some(family) = a.protocol.family() else {
            continue;
        };
        let mut conflict = None;
        for (j, b) in listeners.iter().enumerate() {
            if i == j || a.port != b.port {
                continue;
            }
            let Some(other) = b.protocol.family() else {
                continue;
            };
            if other != family {
                conflict = Some(ConditionReason::ProtocolConflict);
                break;
            }
            if a.hostname == b.hostname {
                conflict = Some(ConditionReason::HostnameConflict);
            }
        }
        if let Some(slot) = out.get_mut(i) {
            *slot = conflict;
        }
    }
    out
}

#[cfg(test)]
mod tests;
