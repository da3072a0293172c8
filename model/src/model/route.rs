//! Gateway API `HTTPRoute` (`gateway.networking.k8s.io/v1`) and Istio `VirtualService`
//! (`networking.istio.io/v1`) as the waypoint uses them: typed, validated data built by
//! [`crate::k8s`]; which route and rule a request takes is decided by the pure functions in
//! [`crate::route`]. Both APIs become the same rule and action types ([`RouteRule`],
//! [`RouteMatch`], [`Filters`], [`BackendRef`]), extended where a VirtualService says more
//! (plain string prefixes, `prefix` header matches, authority, `withoutHeaders`,
//! `ignoreUriCase`, source labels/namespace, direct responses, retries, faults, mirrors), so
//! the waypoint applies one action type for both.
//!
//! A `GRPCRoute` is translated into the same [`HttpRoute`] (with [`RouteKind::Grpc`]): its
//! method match becomes a path match on `/<service>/<method>` (kept as written in
//! [`RouteMatch::grpc`] for the GRPCRoute precedence), its header matches and filters are
//! the HTTPRoute ones, so the waypoint applies both kinds the same way.
//!
//! Everything here is already parsed: header names are [`http::HeaderName`], values
//! [`http::HeaderValue`], regular expressions compiled (with a size limit), durations
//! [`Duration`]s. Nothing is re-parsed per request.

use std::time::Duration;

use http::{HeaderName, HeaderValue};
use serde::{Serialize, Serializer};

use super::{Labels, NamespacedName};

/// What a route attaches to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum ParentKind {
    /// `kind: Service` (group `""`/`core`): traffic for that Service, through its waypoint.
    Service,
    /// `kind: Gateway` (group `gateway.networking.k8s.io`): the waypoint itself, for every
    /// Service it serves.
    Gateway,
    /// `kind: ServiceEntry` (group `networking.istio.io`): traffic for that ServiceEntry,
    /// through its waypoint (an egress waypoint), attached as to a Service.
    ServiceEntry,
}

/// One `parentRefs` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParentRef {
    pub kind: ParentKind,
    /// Namespace and name of the Service, ServiceEntry or Gateway (namespace defaults to the
    /// route's).
    pub target: NamespacedName,
    /// `sectionName`: the Service (or ServiceEntry) port's name (for a Gateway, a listener
    /// name: an ingress gateway's, see `Model::routes_for_listener`; not used for a
    /// waypoint, which has one listener).
    pub section_name: Option<String>,
    /// `port`: the Service (or ServiceEntry) port the route applies to (for a Gateway: the
    /// port of the destination the traffic is for); `None` = every port.
    pub port: Option<u16>,
}

/// A compiled regular expression that matches a whole value (`^(?:pattern)$`, as Envoy's
/// RE2 `safe_regex` does); compares and serializes as its source.
#[derive(Clone, Debug)]
pub struct Pattern {
    pub source: String,
    pub regex: regex::Regex,
}

impl Pattern {
    pub fn is_match(&self, value: &str) -> bool {
        self.regex.is_match(value)
    }
}

impl PartialEq for Pattern {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Pattern {}

impl Serialize for Pattern {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.source)
    }
}

/// `matches[].path`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PathMatch {
    /// The whole normalised path, case-sensitive.
    Exact(String),
    /// Element-wise prefix: `/foo` matches `/foo`, `/foo/`, `/foo/bar`, not `/foobar`. Stored
    /// without a trailing `/` (except the root `/`).
    Prefix(String),
    RegularExpression(Pattern),
    /// A VirtualService `uri.prefix`: a plain string prefix (`/foo` matches `/foobar`), as
    /// Envoy's `prefix` route match.
    StringPrefix(String),
}

/// A string value matched exactly, by a plain prefix (VirtualService only) or by a regular
/// expression (headers, query parameters, authority).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum ValueMatch {
    Exact(String),
    RegularExpression(Pattern),
    Prefix(String),
}

impl ValueMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => v == value,
            ValueMatch::RegularExpression(p) => p.is_match(value),
            ValueMatch::Prefix(v) => value.starts_with(v.as_str()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HeaderMatch {
    #[serde(serialize_with = "header_name")]
    pub name: HeaderName,
    pub value: ValueMatch,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QueryMatch {
    /// Compared exactly (case-sensitive), after percent-decoding the request's names.
    pub name: String,
    pub value: ValueMatch,
}

/// A GRPCRoute `matches[].method` as written (its [`RouteMatch::path`] is what is matched).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct GrpcMethodMatch {
    /// `None`: any service.
    pub service: Option<String>,
    /// `None`: any method.
    pub method: Option<String>,
    /// `type: RegularExpression` (else `Exact`).
    pub regex: bool,
}

/// One `matches[]` entry; every present condition must hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteMatch {
    /// `PathPrefix /` when the YAML says nothing, as the Gateway API defaults it.
    pub path: PathMatch,
    pub headers: Vec<HeaderMatch>,
    pub query_params: Vec<QueryMatch>,
    /// Upper-case method name.
    pub method: Option<String>,
    /// VirtualService `method` given as a prefix or regex (the Gateway API has exact only).
    pub method_match: Option<ValueMatch>,
    /// VirtualService `authority`: the request's host (without port, lower-case).
    pub authority: Option<ValueMatch>,
    /// VirtualService `withoutHeaders`: none of these may match.
    pub without_headers: Vec<HeaderMatch>,
    /// VirtualService `ignoreUriCase`: the path is compared case-insensitively.
    pub ignore_uri_case: bool,
    /// VirtualService `port`: the Service port the request is for.
    pub port: Option<u16>,
    /// VirtualService `sourceLabels`: every label must be on the calling pod.
    pub source_labels: Labels,
    /// VirtualService `sourceNamespace`: the calling pod's namespace.
    pub source_namespace: Option<String>,
    /// GRPCRoute only: the method match `path` was made from (ranks the match).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcMethodMatch>,
    /// VirtualService `gateways` of a match: the traffic it applies to (each one of the
    /// VirtualService's own, or `mesh`); empty = all the VirtualService applies to.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<VsGateway>,
}

impl Default for RouteMatch {
    fn default() -> Self {
        RouteMatch {
            path: PathMatch::Prefix("/".to_string()),
            headers: Vec::new(),
            query_params: Vec::new(),
            method: None,
            method_match: None,
            authority: None,
            without_headers: Vec::new(),
            ignore_uri_case: false,
            port: None,
            source_labels: Labels::new(),
            source_namespace: None,
            grpc: None,
            gateways: Vec::new(),
        }
    }
}

/// `RequestHeaderModifier` / `ResponseHeaderModifier`, applied as Envoy does: `remove`,
/// then `set` (replaces every value), then `add` (appends).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HeaderModifier {
    #[serde(serialize_with = "header_pairs")]
    pub set: Vec<(HeaderName, HeaderValue)>,
    #[serde(serialize_with = "header_pairs")]
    pub add: Vec<(HeaderName, HeaderValue)>,
    #[serde(serialize_with = "header_names")]
    pub remove: Vec<HeaderName>,
}

/// `URLRewrite.path` / `RequestRedirect.path`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum PathModifier {
    ReplaceFullPath(String),
    /// Replaces the part of the path the rule's `PathPrefix` matched.
    ReplacePrefixMatch(String),
    /// VirtualService `rewrite.uri`: replaces the matched prefix (plain string, as Envoy's
    /// `prefix_rewrite`) when the match was a prefix, else the whole path.
    ReplaceMatchedPrefixOrPath(String),
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct UrlRewrite {
    /// Replaces the `Host` / `:authority` sent upstream.
    pub hostname: Option<String>,
    pub path: Option<PathModifier>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RequestRedirect {
    pub scheme: Option<Scheme>,
    pub hostname: Option<String>,
    pub port: Option<u16>,
    pub path: Option<PathModifier>,
    /// 301 or 302 (default); a VirtualService also allows 303, 307 and 308.
    pub status_code: u16,
}

/// VirtualService `directResponse`: the waypoint answers with this status and body.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DirectResponse {
    pub status: u16,
    #[serde(serialize_with = "bytes_lossy")]
    pub body: bytes::Bytes,
}

/// A copy of the request sent to another backend, its response discarded (HTTPRoute
/// `RequestMirror`, VirtualService `mirror`/`mirrors`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Mirror {
    pub service: NamespacedName,
    /// `None`: the port of the request's own Service.
    pub port: Option<u16>,
    pub subset: Option<String>,
    /// Share of requests mirrored, 0.0-100.0.
    pub percent: f64,
}

/// The filters of a rule (or of one backend), by type. The Gateway API allows each core
/// filter type at most once per list.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Filters {
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    pub url_rewrite: Option<UrlRewrite>,
    pub redirect: Option<RequestRedirect>,
    pub direct_response: Option<DirectResponse>,
    pub mirrors: Vec<Mirror>,
}

/// One `backendRefs` entry (or VirtualService destination): a Service or ServiceEntry port
/// and its weight.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BackendRef {
    pub kind: crate::route::BackendKind,
    /// The Service or ServiceEntry. A VirtualService destination host that is not a Service
    /// name has an empty namespace (no Service has one): routing there answers 500 `NC`,
    /// unless [`BackendRef::host`] names the request's ServiceEntry.
    pub service: NamespacedName,
    /// A VirtualService destination's `host` as written (lower-case): when it is one of the
    /// hosts of the ServiceEntry the request is for, the destination is that entry (see
    /// [`crate::route::backend_target`]). `None` for `backendRefs`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// 0 = the port the request was for (a VirtualService destination without a port, a
    /// ServiceEntry `backendRef` without one).
    pub port: u16,
    /// A `DestinationRule` subset of the Service (only a VirtualService destination names
    /// one); `None` = every endpoint.
    pub subset: Option<String>,
    /// 0 = never chosen; default 1.
    pub weight: u32,
    /// Header modifiers applied only when this backend is chosen.
    pub filters: Filters,
}

/// `timeouts`; `None` = no timeout (also what `0s` means).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Timeouts {
    /// From the request's arrival until the upstream's response headers, across attempts.
    pub request: Option<Duration>,
    /// One attempt at the backend (connect and wait for response headers).
    pub backend_request: Option<Duration>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct RouteRule {
    /// `rules[].name` when given.
    pub name: Option<String>,
    /// Never empty: a rule without `matches` has one default match (`PathPrefix /`).
    pub matches: Vec<RouteMatch>,
    pub filters: Filters,
    /// Empty: nothing to forward to (only a redirect can answer; otherwise 500).
    pub backends: Vec<BackendRef>,
    pub timeouts: Timeouts,
    /// `None`: the default policy ([`RetryPolicy::default`]), as Istio gives every route.
    pub retries: Option<RetryPolicy>,
    pub fault: Option<Fault>,
}

/// What a failed attempt is retried on (Envoy's `retry_on`, as Istio's `retryOn` names it).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct RetryOn {
    /// `5xx`: any 5xx response, a reset, a connect failure or a per-try timeout.
    pub five_xx: bool,
    /// `gateway-error`: 502, 503, 504, a reset, a connect failure or a per-try timeout.
    pub gateway_error: bool,
    /// `reset`: no response (disconnect, reset, per-try timeout).
    pub reset: bool,
    pub connect_failure: bool,
    /// `retriable-4xx`: 409.
    pub retriable_4xx: bool,
    /// `refused-stream`: the upstream refused the HTTP/2 stream.
    pub refused_stream: bool,
    /// Responses with these statuses (`retriable-status-codes` with the listed codes).
    pub status_codes: Vec<u16>,
    /// gRPC statuses from the response's `grpc-status` header (`cancelled` 1,
    /// `deadline-exceeded` 4, `resource-exhausted` 8, `internal` 13, `unavailable` 14).
    pub grpc_statuses: Vec<u32>,
}

/// Retries of one route.
/// Which Gateway API kind a route was written as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum RouteKind {
    #[default]
    Http,
    Grpc,
}

impl RouteKind {
    /// The Kubernetes kind.
    pub fn as_str(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    /// Retries after the first attempt; 0 disables retries.
    pub attempts: u32,
    /// `None`: the rule's `backendRequest` timeout, else none.
    pub per_try_timeout: Option<Duration>,
    pub retry_on: RetryOn,
}

impl Default for RetryPolicy {
    /// Istio's default for every HTTP route: 2 retries on
    /// `connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes` (503).
    fn default() -> Self {
        RetryPolicy {
            attempts: 2,
            per_try_timeout: None,
            retry_on: RetryOn {
                connect_failure: true,
                refused_stream: true,
                status_codes: vec![503],
                grpc_statuses: vec![14, 1],
                ..RetryOn::default()
            },
        }
    }
}

/// VirtualService `fault`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Fault {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultDelay {
    pub fixed_delay: Duration,
    /// 0.0-100.0 (default 100).
    pub percent: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FaultAbort {
    pub status: AbortStatus,
    /// 0.0-100.0 (default 100).
    pub percent: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum AbortStatus {
    Http(u16),
    /// A gRPC status code, answered as HTTP 200 with `grpc-status`.
    Grpc(u32),
}

/// A name in a VirtualService's `gateways` (or in a match's): `mesh`, the waypoints' (mesh)
/// traffic, or a Gateway (`<namespace>/<name>`; a bare name is in the VirtualService's
/// namespace), the traffic of that ingress gateway. Serialized as `mesh` or `ns/name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VsGateway {
    Mesh,
    Gateway(NamespacedName),
}

impl Serialize for VsGateway {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            VsGateway::Mesh => s.serialize_str("mesh"),
            VsGateway::Gateway(key) => s.collect_str(key),
        }
    }
}

/// An Istio `VirtualService` as the waypoint and the ingress gateway apply it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct VirtualService {
    pub name: String,
    pub namespace: String,
    /// `metadata.creationTimestamp`, for "oldest first".
    pub created: Option<String>,
    /// Lower-case FQDNs (short names resolved against the VS namespace), `*.suffix`
    /// wildcards or `*`.
    pub hosts: Vec<String>,
    /// `gateways` is empty or names `mesh`: it applies to waypoint (mesh) traffic.
    pub mesh: bool,
    /// The ingress Gateways `gateways` names (without `mesh`), in the order written, each
    /// once: it applies to their traffic (see `Model::virtual_services_for_gateway`).
    pub gateways: Vec<NamespacedName>,
    /// `http[]`, in order: the first whose match holds wins.
    pub rules: Vec<RouteRule>,
}

impl VirtualService {
    pub fn key(&self) -> NamespacedName {
        NamespacedName::new(&self.namespace, &self.name)
    }
}

impl RouteRule {
    /// What a route without `rules` holds: it still attaches, with one rule that matches
    /// everything and has no backend (answered 500).
    pub fn without_backend() -> RouteRule {
        RouteRule {
            name: None,
            matches: vec![RouteMatch::default()],
            filters: Filters::default(),
            backends: Vec::new(),
            timeouts: Timeouts::default(),
            retries: None,
            fault: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct HttpRoute {
    /// `HTTPRoute` or `GRPCRoute` (see [`crate::route::routes_for`] for how they combine).
    pub kind: RouteKind,
    pub name: String,
    pub namespace: String,
    /// `metadata.creationTimestamp` (RFC 3339), for "oldest route wins" ties.
    pub created: Option<String>,
    pub parents: Vec<ParentRef>,
    /// Lower-case; `*.example.com` wildcards allowed. Only used for Gateway parents: with a
    /// Service parent the destination is already decided (GAMMA ignores hostnames).
    pub hostnames: Vec<String>,
    pub rules: Vec<RouteRule>,
}

impl HttpRoute {
    pub fn key(&self) -> NamespacedName {
        NamespacedName::new(&self.namespace, &self.name)
    }
}

fn header_name<S: Serializer>(name: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(name.as_str())
}

fn header_names<S: Serializer>(names: &[HeaderName], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(names.iter().map(HeaderName::as_str))
}

fn header_pairs<S: Serializer>(
    pairs: &[(HeaderName, HeaderValue)],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(
        pairs
            .iter()
            .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v.as_bytes()))),
    )
}

fn bytes_lossy<S: Serializer>(b: &bytes::Bytes, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(b))
}
