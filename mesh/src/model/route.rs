//! Gateway API `HTTPRoute` (`gateway.networking.k8s.io/v1`) as the waypoint uses it: typed,
//! validated data built by [`crate::k8s`]; which route and rule a request takes is decided by
//! the pure functions in [`crate::route`].
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

use super::NamespacedName;

/// What a route attaches to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum ParentKind {
    /// `kind: Service` (group `""`/`core`): traffic for that Service, through its waypoint.
    Service,
    /// `kind: Gateway` (group `gateway.networking.k8s.io`): the waypoint itself, for every
    /// Service it serves.
    Gateway,
}

/// One `parentRefs` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ParentRef {
    pub kind: ParentKind,
    /// Namespace and name of the Service or Gateway (namespace defaults to the route's).
    pub target: NamespacedName,
    /// `sectionName`: the Service port's name (for a Gateway, a listener name: not used,
    /// a waypoint has one listener).
    pub section_name: Option<String>,
    /// `port`: the Service port the route applies to (for a Gateway: the port of the
    /// Service the traffic is for); `None` = every port.
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
}

/// A string value matched exactly or by a regular expression (headers, query parameters).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum ValueMatch {
    Exact(String),
    RegularExpression(Pattern),
}

impl ValueMatch {
    pub fn matches(&self, value: &str) -> bool {
        match self {
            ValueMatch::Exact(v) => v == value,
            ValueMatch::RegularExpression(p) => p.is_match(value),
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
    /// GRPCRoute only: the method match `path` was made from (ranks the match).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grpc: Option<GrpcMethodMatch>,
}

impl Default for RouteMatch {
    fn default() -> Self {
        RouteMatch {
            path: PathMatch::Prefix("/".to_string()),
            headers: Vec::new(),
            query_params: Vec::new(),
            method: None,
            grpc: None,
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
    /// 301 or 302 (default).
    pub status_code: u16,
}

/// The filters of a rule (or of one backend), by type. The Gateway API allows each core
/// filter type at most once per list.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Filters {
    pub request_headers: Option<HeaderModifier>,
    pub response_headers: Option<HeaderModifier>,
    pub url_rewrite: Option<UrlRewrite>,
    pub redirect: Option<RequestRedirect>,
}

/// One `backendRefs` entry: a Service port and its weight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BackendRef {
    pub service: NamespacedName,
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

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RouteRule {
    /// `rules[].name` when given.
    pub name: Option<String>,
    /// Never empty: a rule without `matches` has one default match (`PathPrefix /`).
    pub matches: Vec<RouteMatch>,
    pub filters: Filters,
    /// Empty: nothing to forward to (only a redirect can answer; otherwise 500).
    pub backends: Vec<BackendRef>,
    pub timeouts: Timeouts,
}

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
