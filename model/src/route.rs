//! HTTP routing as a waypoint does it: path normalisation, which `HTTPRoute` rule a request
//! takes, which weighted backend serves it, and what the filters change. Pure functions over
//! the model (no IO, no clock, randomness passed in), table-tested.
//!
//! ## Path normalisation ([`normalize_path`])
//! One normalised path is used for authorization, routing and forwarding, so a policy on
//! `/admin` cannot be walked around (RELIABILITY 21). In order:
//! 1. the fragment (`#...`) is dropped and the query (`?...`) split off, untouched;
//! 2. the path must be absolute (`/...`), else the request is refused;
//! 3. percent-escapes: an invalid one (`%zz`, `%4`) is refused; `%2F`/`%2f` (encoded `/`),
//!    `%5C`/`%5c` (encoded `\`) and `%00` are refused, as Envoy's
//!    `path_with_escaped_slashes_action: REJECT_REQUEST` does, because backends disagree on
//!    whether they are separators; escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`,
//!    RFC 3986 §6.2.2.2) are decoded, so `%2e%2e` is `..`; every other escape is kept, with
//!    upper-case hex;
//! 4. a literal `\` becomes `/` (as Envoy's `normalize_path`);
//! 5. runs of `/` are merged (`//admin` → `/admin`, Istio's `MERGE_SLASHES`);
//! 6. `.` segments are removed and `..` removes the segment before it, never above the root
//!    (RFC 3986 §5.2.4); a trailing `/` (or a final `.`/`..`) is kept as a trailing `/`.
//!
//! ## Which routes apply ([`routes_for_target`])
//! A request is for a Service port or, through an egress waypoint, a ServiceEntry port
//! ([`RouteTarget`]); a ServiceEntry is routed exactly as a Service is, with its own
//! `parentRefs` kind (`group: networking.istio.io`, `kind: ServiceEntry`) and its port
//! names for `sectionName`. Only routes in the namespace of what they attach to count (a
//! Service's producer routes, a waypoint's own routes: Istio's default `allowedRoutes:
//! Same`). Routes whose `parentRefs` name the destination Service (and its port by `port` or
//! `sectionName`, when given) win; only when there are none do routes attached to the
//! waypoint `Gateway` (with `port` = the Service port, when given) apply. With no route at
//! all, the request goes to the Service itself ([`Routing::Default`]); with routes but no
//! matching rule it is answered 404 ([`Routing::NoMatch`], Envoy's `NR`), as the Gateway API
//! requires.
//!
//! GRPCRoutes ([`RouteKind::Grpc`]) attach the same way, but the two kinds are never merged:
//! for a Service parent, GRPCRoutes win and its HTTPRoutes are ignored (GEP-1426, as the
//! GAMMA conformance expects); for the waypoint Gateway, an HTTPRoute and a GRPCRoute whose
//! hostnames intersect (no hostnames = every host) conflict and only the older one (then the
//! first by `namespace/name`) applies, as the GRPCRoute spec requires for one Listener.
//!
//! ## Which routing object applies ([`route_to`])
//! For a Service, in this order (first non-empty wins): HTTPRoutes attached to the Service;
//! else the first VirtualService ([`virtual_service_for_target`]) whose `hosts` name the
//! Service's FQDN (exactly, by a `*.suffix` wildcard, or `*`; for a ServiceEntry: one of its
//! hosts, the one the connection is for when known) and that applies to mesh traffic
//! (`gateways` empty or containing `mesh`), VirtualServices taken oldest first
//! (`creationTimestamp`, those without one last), then by namespace and name, in any
//! namespace (Istio exports them everywhere by default); else HTTPRoutes attached to the
//! waypoint Gateway; else the Service itself. A VirtualService's `http[]` entries are tried
//! in order and the first whose `match` (any of them; none = everything) holds wins
//! ([`select_virtual_service`]); none → 404 (`NR`). A match whose `gateways` name only
//! ingress Gateways is skipped for mesh traffic.
//!
//! ## At an ingress gateway's listener ([`route_listener`])
//! The HTTPRoutes and GRPCRoutes attached to the listener
//! ([`Model::routes_for_listener`]) decide when one of them is for the request's host (its
//! `hostnames` match it, or it has none): then no VirtualService is consulted, and no
//! matching rule is a 404, as the Gateway API requires. Otherwise (no route attached, or
//! none for this host) the VirtualServices whose `gateways` name the Gateway
//! ([`Model::virtual_services_for_gateway`], an index) and whose `hosts` match the host
//! (exactly, by a `*.suffix` wildcard, or `*`; the listener was chosen because its
//! `hostname` takes the host, so the two intersect) decide: their `http[]` entries are
//! tried in model order (oldest VirtualService first, then namespace/name; each one's
//! entries in order), skipping matches whose `gateways` do not name this Gateway and
//! matching `port` against the listener's, and the first that holds wins, as Istio merges
//! the VirtualServices of one host at a gateway. None holds → 404 (`NR`); no VirtualService
//! for the host → 404 too. HTTPRoutes win over VirtualServices for a host both name (Istio
//! would merge them); the listener's `allowedRoutes` does not apply to VirtualServices.
//!
//! ## Where the rule sends it ([`backend_target`])
//! A backend names a Service, or a ServiceEntry (`backendRefs` of kind `ServiceEntry`; a
//! VirtualService destination `host` that is one of the entry's hosts): for a request to that
//! entry, its own endpoints, so that a route on an entry can add headers, retries or
//! timeouts and still send the request where it was going. Another ServiceEntry is not a
//! backend this data plane can reach (answered 500 `NC`).
//!
//! ## Which rule ([`select`])
//! Across every match of every rule of those routes, the Gateway API's precedence (Istio's
//! `sortHTTPRoutes`): for Gateway-attached routes first the longest matching exact hostname,
//! then the longest matching wildcard hostname; then path Exact > PathPrefix >
//! RegularExpression, longer values first; then a method match; then more header matches; then
//! more query-parameter matches; then the oldest route (`creationTimestamp`), then
//! `namespace/name`, then rule and match order. The first match of that order wins.
//! GRPCRoute matches rank, after the hostnames, by the characters of the matching gRPC
//! service, then of the method, then the number of header matches (the GRPCRoute spec; the
//! match type, Exact or RegularExpression, does not count).
//!
//! Hostnames are compared case-insensitively without the request's port (RELIABILITY 22);
//! headers by name case-insensitively, any of their values may match; query parameters by
//! their percent-decoded name, the first occurrence counts (as Envoy does).

use std::cmp::Ordering;

use http::HeaderMap;
use serde::Serialize;

use crate::model::{
    BackendRef, HeaderModifier, HttpRoute, Listener, Model, NamespacedName, ParentKind, PathMatch,
    PathModifier, Pod, RequestRedirect, RouteKind, RouteMatch, RouteRule, Scheme, SePort, Service,
    ServiceEntry, ServicePort, ValueMatch, VirtualService, VsGateway,
};

// === path normalisation ===

/// Why a request path is refused (400).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("path {0:?} is not absolute")]
    NotAbsolute(String),
    #[error("path has an invalid percent-escape")]
    BadEscape,
    #[error("path has an encoded slash or backslash (%2F, %5C)")]
    EncodedSeparator,
    #[error("path has an encoded NUL (%00)")]
    EncodedNul,
}

/// A request target after [`normalize_path`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NormalizedPath {
    /// The normalised path, always starting with `/`.
    pub path: String,
    /// The query string as received (without `?`), when there was one.
    pub query: Option<String>,
}

impl NormalizedPath {
    /// `path?query`, what is authorized and forwarded.
    pub fn path_and_query(&self) -> String {
        match &self.query {
            Some(q) => format!("{}?{q}", self.path),
            None => self.path.clone(),
        }
    }
}

/// Normalises a request target (origin form: path and query); see the module docs.
pub fn normalize_path(target: &str) -> Result<NormalizedPath, PathError> {
    let target = target.split('#').next().unwrap_or_default();
    let (raw, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_string())),
        None => (target, None),
    };
    if !raw.starts_with('/') && !raw.starts_with('\\') {
        return Err(PathError::NotAbsolute(raw.to_string()));
    }
    let decoded = decode_path(raw)?;
    let trailing = decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
        || decoded == "."
        || decoded == "..";
    let mut segments: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    path.push('/');
    path.push_str(&segments.join("/"));
    if trailing && !segments.is_empty() {
        path.push('/');
    }
    Ok(NormalizedPath { path, query })
}

/// Step 3 and 4 of the normalisation: escapes and backslashes.
fn decode_path(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) else {
                    return Err(PathError::BadEscape);
                };
                let b = (hi * 16 + lo) as u8;
                match b {
                    b'/' | b'\\' => return Err(PathError::EncodedSeparator),
                    0 => return Err(PathError::EncodedNul),
                    b if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') => {
                        out.push(b as char)
                    }
                    b => out.push_str(&format!("%{b:02X}")),
                }
                i += 3;
            }
            b'\\' => {
                out.push('/');
                i += 1;
            }
            _ => {
                // Copy the run up to the next special byte (keeps multi-byte UTF-8 intact).
                let end = bytes[i..]
                    .iter()
                    .position(|b| matches!(b, b'%' | b'\\'))
                    .map_or(bytes.len(), |n| i + n);
                out.push_str(&raw[i..end]);
                i = end;
            }
        }
    }
    Ok(out)
}

// === which routes apply ===

/// What a request for a Service port looks like to routing.
#[derive(Clone, Copy, Debug)]
pub struct RouteRequest<'a> {
    /// `:authority` / `Host`, possibly with a port.
    pub host: &'a str,
    pub method: &'a str,
    /// Normalised path, without query.
    pub path: &'a str,
    pub query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    /// The calling pod, when known (VirtualService `sourceLabels` / `sourceNamespace`).
    pub source: Option<&'a Pod>,
}

/// The object a selected rule belongs to.
#[derive(Clone, Copy, Debug)]
pub enum RouteOwner<'m> {
    HttpRoute(&'m HttpRoute),
    VirtualService(&'m VirtualService),
}

impl RouteOwner<'_> {
    pub fn key(&self) -> NamespacedName {
        match self {
            RouteOwner::HttpRoute(r) => r.key(),
            RouteOwner::VirtualService(v) => v.key(),
        }
    }

    pub fn namespace(&self) -> &str {
        match self {
            RouteOwner::HttpRoute(r) => &r.namespace,
            RouteOwner::VirtualService(v) => &v.namespace,
        }
    }

    pub fn is_virtual_service(&self) -> bool {
        matches!(self, RouteOwner::VirtualService(_))
    }
}

/// The rule a request takes.
#[derive(Clone, Copy, Debug)]
pub struct Selected<'m> {
    pub route: RouteOwner<'m>,
    pub rule_index: usize,
    pub rule: &'m RouteRule,
    /// The match that selected the rule (for `ReplacePrefixMatch`).
    pub matched: &'m RouteMatch,
}

/// The outcome of routing.
#[derive(Clone, Copy, Debug)]
pub enum Routing<'m> {
    /// No HTTPRoute or VirtualService applies: the destination Service itself.
    Default,
    /// Routes apply but no rule matches: 404.
    NoMatch,
    Matched(Selected<'m>),
}

/// What a request through a waypoint is for, as routing sees it.
#[derive(Clone, Copy, Debug)]
pub enum RouteTarget<'a> {
    /// A port of a Service.
    Service {
        svc: &'a Service,
        port: &'a ServicePort,
    },
    /// A port of a ServiceEntry (egress through the waypoint). `host`: the one of its hosts
    /// the connection is for, when known (the host of the auto-allocated VIP it connected
    /// to); `None`: any of them.
    ServiceEntry {
        entry: &'a ServiceEntry,
        port: &'a SePort,
        host: Option<&'a str>,
    },
}

impl RouteTarget<'_> {
    /// The namespace and name of the Service or ServiceEntry.
    fn key(&self) -> (&str, &str) {
        match self {
            RouteTarget::Service { svc, .. } => (&svc.namespace, &svc.name),
            RouteTarget::ServiceEntry { entry, .. } => (&entry.namespace, &entry.name),
        }
    }

    /// The `parentRefs` kind that attaches a route to it.
    fn parent_kind(&self) -> ParentKind {
        match self {
            RouteTarget::Service { .. } => ParentKind::Service,
            RouteTarget::ServiceEntry { .. } => ParentKind::ServiceEntry,
        }
    }

    /// The port number the request is for.
    pub fn port(&self) -> u16 {
        match self {
            RouteTarget::Service { port, .. } => port.port,
            RouteTarget::ServiceEntry { port, .. } => port.number,
        }
    }

    /// The port's name (a `parentRefs` `sectionName`).
    fn port_name(&self) -> Option<&str> {
        match self {
            RouteTarget::Service { port, .. } => port.name.as_deref(),
            RouteTarget::ServiceEntry { port, .. } => Some(&port.name),
        }
    }

    /// The host names a VirtualService's `hosts` are matched against, lower-case: a
    /// Service's FQDN; a ServiceEntry's host the connection is for, else all its hosts.
    fn hostnames(&self) -> Vec<String> {
        match self {
            RouteTarget::Service { svc, .. } => vec![svc.hostname().to_ascii_lowercase()],
            RouteTarget::ServiceEntry {
                host: Some(host), ..
            } => vec![host.to_ascii_lowercase()],
            RouteTarget::ServiceEntry { entry, .. } => {
                entry.hosts.iter().map(|h| h.to_ascii_lowercase()).collect()
            }
        }
    }
}

/// The routes for traffic to `port` of `svc` through `waypoint` ([`routes_for_target`]).
pub fn routes_for<'m>(
    model: &'m Model,
    waypoint: &NamespacedName,
    svc: &Service,
    port: &ServicePort,
) -> (Vec<&'m HttpRoute>, ParentKind) {
    routes_for_target(model, waypoint, &RouteTarget::Service { svc, port })
}

/// The routes for traffic to `target` through `waypoint`, in model order, and which kind of
/// parent they were attached by ([`ParentKind::Gateway`] when none names the target itself);
/// see the module docs.
pub fn routes_for_target<'m>(
    model: &'m Model,
    waypoint: &NamespacedName,
    target: &RouteTarget<'_>,
) -> (Vec<&'m HttpRoute>, ParentKind) {
    let (namespace, name) = target.key();
    let kind = target.parent_kind();
    let port = target.port();
    let port_name = target.port_name();
    let own_routes: Vec<&HttpRoute> = model
        .routes_naming(kind, namespace, name)
        .filter(|r| {
            r.namespace == namespace
                && r.parents.iter().any(|p| {
                    p.kind == kind
                        && p.target.namespace == namespace
                        && p.target.name == name
                        && p.port.is_none_or(|n| n == port)
                        && p.section_name
                            .as_deref()
                            .is_none_or(|s| port_name == Some(s))
                })
        })
        .collect();
    if !own_routes.is_empty() {
        // GEP-1426: a GRPCRoute on the Service wins over its HTTPRoutes.
        let grpc = own_routes.iter().any(|r| r.kind == RouteKind::Grpc);
        let kept = own_routes
            .into_iter()
            .filter(|r| !grpc || r.kind == RouteKind::Grpc)
            .collect();
        return (kept, kind);
    }
    let gateway_routes: Vec<&HttpRoute> = model
        .routes_naming(ParentKind::Gateway, &waypoint.namespace, &waypoint.name)
        .filter(|r| {
            r.namespace == waypoint.namespace
                && r.parents.iter().any(|p| {
                    p.kind == ParentKind::Gateway
                        && &p.target == waypoint
                        && p.port.is_none_or(|n| n == port)
                })
        })
        .collect();
    (without_kind_conflicts(gateway_routes), ParentKind::Gateway)
}

/// `routes` (in model order, oldest first) without each route that shares a hostname with
/// an older, kept route of the other kind (HTTPRoute vs GRPCRoute on one Listener).
pub(crate) fn without_kind_conflicts(routes: Vec<&HttpRoute>) -> Vec<&HttpRoute> {
    let mut kept: Vec<&HttpRoute> = Vec::with_capacity(routes.len());
    for r in routes {
        let conflict = kept
            .iter()
            .any(|k| k.kind != r.kind && hostnames_intersect(&k.hostnames, &r.hostnames));
        if !conflict {
            kept.push(r);
        }
    }
    kept
}

/// Whether two routes' `hostnames` can both match one host (an empty list matches all).
pub fn hostnames_intersect(a: &[String], b: &[String]) -> bool {
    if a.is_empty() || b.is_empty() {
        return true;
    }
    a.iter()
        .any(|x| b.iter().any(|y| hostname_pair_intersects(x, y)))
}

fn hostname_pair_intersects(a: &str, b: &str) -> bool {
    // `*.s` covers every name with at least one label before `.s`.
    let covers = |wild: &str, name: &str| {
        wild.strip_prefix("*.").is_some_and(|suffix| {
            let name = name.strip_prefix("*.").unwrap_or(name);
            name.strip_suffix(suffix)
                .and_then(|label| label.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty())
        })
    };
    a == b || covers(a, b) || covers(b, a)
}

/// The rule for `req` to `port` of `svc` ([`route_to`]).
pub fn route<'m>(
    model: &'m Model,
    waypoint: &NamespacedName,
    svc: &Service,
    port: &ServicePort,
    req: &RouteRequest<'_>,
) -> Routing<'m> {
    route_to(model, waypoint, &RouteTarget::Service { svc, port }, req)
}

/// The rule for `req` to `target`: HTTPRoutes attached to the Service (or ServiceEntry),
/// else a VirtualService, else Gateway-attached HTTPRoutes (see the module docs).
pub fn route_to<'m>(
    model: &'m Model,
    waypoint: &NamespacedName,
    target: &RouteTarget<'_>,
    req: &RouteRequest<'_>,
) -> Routing<'m> {
    let (routes, kind) = routes_for_target(model, waypoint, target);
    if kind != ParentKind::Gateway && !routes.is_empty() {
        return select(&routes, kind, req);
    }
    if let Some(vs) = virtual_service_for_target(model, target) {
        return select_virtual_service(vs, VsTraffic::Mesh, target.port(), req);
    }
    select(&routes, kind, req)
}

/// The rule for `req` at `listener` of the ingress Gateway `gateway` (the listener that
/// takes the request's host): the HTTPRoutes and GRPCRoutes attached to it when one of them
/// is for the host, else the VirtualServices bound to the Gateway (see the module docs).
/// [`Routing::Default`]: nothing routes the host here (the ingress answers 404).
pub fn route_listener<'m>(
    model: &'m Model,
    gateway: &NamespacedName,
    listener: &Listener,
    req: &RouteRequest<'_>,
) -> Routing<'m> {
    let host = host_without_port(req.host).to_ascii_lowercase();
    let routes = model.routes_for_listener(gateway, &listener.name);
    if routes
        .iter()
        .any(|r| hostname_rank(&r.hostnames, &host).is_some())
    {
        return select(&routes, ParentKind::Gateway, req);
    }
    if crate::model::hostname_rank(listener.hostname.as_deref(), &host).is_none() {
        return Routing::Default;
    }
    let mut bound = false;
    for vs in model.virtual_services_for_gateway(gateway) {
        if !vs.hosts.iter().any(|h| vs_host_matches(h, &host)) {
            continue;
        }
        bound = true;
        let traffic = VsTraffic::Gateway(gateway);
        if let matched @ Routing::Matched(_) =
            select_virtual_service(vs, traffic, listener.port, req)
        {
            return matched;
        }
    }
    if bound {
        Routing::NoMatch
    } else {
        Routing::Default
    }
}

/// The VirtualService that applies to traffic for `svc` ([`virtual_service_for_target`]).
pub fn virtual_service_for<'m>(model: &'m Model, svc: &Service) -> Option<&'m VirtualService> {
    let fqdn = svc.hostname().to_ascii_lowercase();
    virtual_service_naming(model, &[fqdn])
}

/// The VirtualService that applies to traffic for `target` through a waypoint: the first in
/// model order (oldest, then namespace/name) that applies to mesh traffic and whose `hosts`
/// name the Service's FQDN (a ServiceEntry's host: [`RouteTarget::ServiceEntry`]).
pub fn virtual_service_for_target<'m>(
    model: &'m Model,
    target: &RouteTarget<'_>,
) -> Option<&'m VirtualService> {
    virtual_service_naming(model, &target.hostnames())
}

/// The first mesh VirtualService whose `hosts` name one of `names` (lower-case).
fn virtual_service_naming<'m>(model: &'m Model, names: &[String]) -> Option<&'m VirtualService> {
    model.mesh_virtual_services_for(names).find(|vs| {
        vs.mesh
            && vs
                .hosts
                .iter()
                .any(|h| names.iter().any(|n| vs_host_matches(h, n)))
    })
}

/// A VirtualService host (`*`, `*.suffix` or an FQDN) against a Service FQDN or a
/// ServiceEntry host (lower-case; an entry's own `*.suffix` host is matched by the same
/// wildcard, or one that covers it).
fn vs_host_matches(host: &str, fqdn: &str) -> bool {
    match host.strip_prefix('*') {
        Some("") => true,
        Some(suffix) if suffix.starts_with('.') => fqdn.ends_with(suffix),
        _ => host == fqdn,
    }
}

/// The traffic a VirtualService is applied to: a waypoint's, or an ingress Gateway's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VsTraffic<'a> {
    Mesh,
    Gateway(&'a NamespacedName),
}

impl VsTraffic<'_> {
    /// Whether the `gateways` of `m` (none: all of the VirtualService's) take this traffic.
    fn admits(self, m: &RouteMatch) -> bool {
        m.gateways.is_empty()
            || m.gateways.iter().any(|g| match (g, self) {
                (VsGateway::Mesh, VsTraffic::Mesh) => true,
                (VsGateway::Gateway(key), VsTraffic::Gateway(gateway)) => key == gateway,
                _ => false,
            })
    }
}

/// The first `http[]` entry of `vs` with a match that holds for `req` of `traffic` on port
/// `port` (a Service port; at an ingress gateway, the listener's).
pub fn select_virtual_service<'m>(
    vs: &'m VirtualService,
    traffic: VsTraffic<'_>,
    port: u16,
    req: &RouteRequest<'_>,
) -> Routing<'m> {
    let query = Query::parse(req.query);
    for (rule_index, rule) in vs.rules.iter().enumerate() {
        for m in &rule.matches {
            if traffic.admits(m) && m.port.is_none_or(|p| p == port) && matches(m, req, &query) {
                return Routing::Matched(Selected {
                    route: RouteOwner::VirtualService(vs),
                    rule_index,
                    rule,
                    matched: m,
                });
            }
        }
    }
    Routing::NoMatch
}

/// Precedence of one match; greater wins (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Rank {
    host_exact: usize,
    host_wildcard: usize,
    /// GRPCRoute only (0 for HTTPRoute; the two kinds never compete, see [`routes_for`]).
    grpc_service: usize,
    grpc_method: usize,
    /// HTTPRoute only (0 for GRPCRoute).
    path_kind: u8,
    path_len: usize,
    method: bool,
    headers: usize,
    query_params: usize,
}

/// The rule `req` takes among `routes` (already in model order), attached as `kind`.
pub fn select<'m>(
    routes: &[&'m HttpRoute],
    kind: ParentKind,
    req: &RouteRequest<'_>,
) -> Routing<'m> {
    if routes.is_empty() {
        return Routing::Default;
    }
    let host = host_without_port(req.host).to_ascii_lowercase();
    let query = Query::parse(req.query);
    let mut best: Option<(Rank, Selected<'m>)> = None;
    for route in routes {
        let host_rank = match kind {
            // The destination is already decided: GAMMA ignores `hostnames`.
            ParentKind::Service | ParentKind::ServiceEntry => Some((0, 0)),
            ParentKind::Gateway => hostname_rank(&route.hostnames, &host),
        };
        let Some((host_exact, host_wildcard)) = host_rank else {
            continue;
        };
        for (rule_index, rule) in route.rules.iter().enumerate() {
            for m in &rule.matches {
                if !matches(m, req, &query) {
                    continue;
                }
                let (path_kind, path_len) = match (&m.path, route.kind) {
                    (_, RouteKind::Grpc) => (0, 0),
                    (PathMatch::Exact(v), _) => (3, v.len()),
                    (PathMatch::Prefix(v) | PathMatch::StringPrefix(v), _) => (2, v.len()),
                    (PathMatch::RegularExpression(p), _) => (1, p.source.len()),
                };
                let grpc_len = |f: fn(&crate::model::GrpcMethodMatch) -> &Option<String>| {
                    m.grpc
                        .as_ref()
                        .and_then(|g| f(g).as_ref())
                        .map_or(0, String::len)
                };
                let rank = Rank {
                    host_exact,
                    host_wildcard,
                    grpc_service: grpc_len(|g| &g.service),
                    grpc_method: grpc_len(|g| &g.method),
                    path_kind,
                    path_len,
                    method: m.method.is_some(),
                    headers: m.headers.len(),
                    query_params: m.query_params.len(),
                };
                // Strictly greater: among equals, the first in model order stays.
                if best
                    .as_ref()
                    .is_none_or(|(b, _)| rank.cmp(b) == Ordering::Greater)
                {
                    best = Some((
                        rank,
                        Selected {
                            route: RouteOwner::HttpRoute(route),
                            rule_index,
                            rule,
                            matched: m,
                        },
                    ));
                }
            }
        }
    }
    best.map_or(Routing::NoMatch, |(_, s)| Routing::Matched(s))
}

/// `(exact length, wildcard length)` of the best of `hostnames` matching `host`
/// (lower-case, no port); `Some((0, 0))` when the route names none; `None` when none match.
fn hostname_rank(hostnames: &[String], host: &str) -> Option<(usize, usize)> {
    if hostnames.is_empty() {
        return Some((0, 0));
    }
    let mut best = None;
    for h in hostnames {
        let rank = match h.strip_prefix("*.") {
            Some(suffix) => host
                .strip_suffix(suffix)
                .and_then(|label| label.strip_suffix('.'))
                .filter(|label| !label.is_empty())
                .map(|_| (0, h.len())),
            None => (h == host).then_some((h.len(), 0)),
        };
        if rank > best {
            best = rank;
        }
    }
    best
}

/// `host:port` → `host`, `[v6]:port` → `[v6]`; anything else unchanged.
pub fn host_without_port(authority: &str) -> &str {
    match authority.rsplit_once(':') {
        Some((host, port))
            if !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && (!host.contains(':') || host.ends_with(']')) =>
        {
            host
        }
        _ => authority,
    }
}

fn matches(m: &RouteMatch, req: &RouteRequest<'_>, query: &Query) -> bool {
    let lowered;
    let path = if m.ignore_uri_case {
        lowered = req.path.to_ascii_lowercase();
        lowered.as_str()
    } else {
        req.path
    };
    // With `ignoreUriCase` the configured value was lower-cased at translation.
    let path_ok = match &m.path {
        PathMatch::Exact(v) => path == v,
        PathMatch::Prefix(v) => prefix_matches(v, path),
        PathMatch::StringPrefix(v) => path.starts_with(v.as_str()),
        PathMatch::RegularExpression(p) => p.is_match(path),
    };
    let header_matches = |h: &crate::model::HeaderMatch| {
        req.headers
            .get_all(&h.name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .any(|v| h.value.matches(v))
    };
    path_ok
        && m.method
            .as_deref()
            .is_none_or(|method| method == req.method)
        && m.method_match
            .as_ref()
            .is_none_or(|v| v.matches(req.method))
        && m.authority
            .as_ref()
            .is_none_or(|v| authority_matches(v, req.host))
        && m.headers.iter().all(header_matches)
        && !m.without_headers.iter().any(header_matches)
        && m.query_params
            .iter()
            .all(|q| query.first(&q.name).is_some_and(|v| q.value.matches(v)))
        && (m.source_labels.is_empty()
            || req.source.is_some_and(|p| {
                m.source_labels
                    .iter()
                    .all(|(k, v)| p.labels.get(k) == Some(v))
            }))
        && m.source_namespace
            .as_deref()
            .is_none_or(|ns| req.source.is_some_and(|p| p.namespace == ns))
}

/// A VirtualService `authority` match: against the host without its port (lower-case), or
/// the authority exactly as sent.
fn authority_matches(v: &ValueMatch, authority: &str) -> bool {
    let host = host_without_port(authority).to_ascii_lowercase();
    v.matches(&host) || v.matches(authority)
}

/// Element-wise prefix match; `prefix` has no trailing `/` unless it is `/`.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix == "/"
        || path
            .strip_prefix(prefix)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// Query parameters, percent-decoded, in order.
struct Query(Vec<(String, String)>);

impl Query {
    fn parse(query: Option<&str>) -> Query {
        let pairs = query
            .unwrap_or_default()
            .split('&')
            .filter(|p| !p.is_empty())
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap_or((p, ""));
                (percent_decode(k), percent_decode(v))
            })
            .collect();
        Query(pairs)
    }

    fn first(&self, name: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Lenient percent-decoding (invalid escapes stay as written; invalid UTF-8 is replaced).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: Option<&u8>| b.and_then(|b| (*b as char).to_digit(16));
        match (bytes[i], hex(bytes.get(i + 1)), hex(bytes.get(i + 2))) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

// === backends ===

/// What a [`BackendRef`] names (its `group`/`kind`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum BackendKind {
    /// A Service: a core-group `backendRef`, every VirtualService destination (see
    /// [`BackendRef::host`] for one that names a ServiceEntry's host).
    #[default]
    Service,
    /// A ServiceEntry (`group: networking.istio.io`, `kind: ServiceEntry`).
    ServiceEntry,
}

/// Where a chosen backend sends a request ([`backend_target`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendTarget<'a> {
    /// A Service, by key (one the model does not have is answered 500 `NC`).
    Service(&'a NamespacedName),
    /// The ServiceEntry the request is for: its own endpoints.
    OwnEntry,
    /// Another ServiceEntry, by key: not a backend this data plane reaches (500 `NC`).
    OtherEntry(&'a NamespacedName),
}

/// Where `backend` sends a request for `target`: a `ServiceEntry` backend that is the
/// request's own entry, or a VirtualService destination whose `host` is one of that entry's
/// hosts (case-insensitively), is the entry itself; anything else keeps its kind.
pub fn backend_target<'a>(backend: &'a BackendRef, target: &RouteTarget<'_>) -> BackendTarget<'a> {
    let own = match target {
        RouteTarget::ServiceEntry { entry, .. } => Some(*entry),
        RouteTarget::Service { .. } => None,
    };
    match backend.kind {
        BackendKind::ServiceEntry => match own {
            Some(se)
                if se.namespace == backend.service.namespace && se.name == backend.service.name =>
            {
                BackendTarget::OwnEntry
            }
            _ => BackendTarget::OtherEntry(&backend.service),
        },
        BackendKind::Service => {
            let names_own = own
                .zip(backend.host.as_deref())
                .is_some_and(|(se, host)| se.hosts.iter().any(|h| h.eq_ignore_ascii_case(host)));
            if names_own {
                BackendTarget::OwnEntry
            } else {
                BackendTarget::Service(&backend.service)
            }
        }
    }
}

/// The backend a roll of the dice picks, by weight: `roll` is any random number (reduced
/// modulo the total weight). `None` when every weight is 0 (or there is no backend).
pub fn pick_backend(backends: &[BackendRef], roll: u64) -> Option<&BackendRef> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = roll % total;
    for b in backends {
        let w = u64::from(b.weight);
        if point < w {
            return Some(b);
        }
        point -= w;
    }
    None
}

// === filters ===

/// The path after a `URLRewrite` or `RequestRedirect` path modifier. `ReplacePrefixMatch`
/// replaces what the `PathPrefix` of `matched` covered (validation only allows it with
/// prefix matches; with another match it leaves the path unchanged).
pub fn modify_path(path: &str, matched: &RouteMatch, modifier: &PathModifier) -> String {
    match modifier {
        PathModifier::ReplaceFullPath(p) => p.clone(),
        PathModifier::ReplaceMatchedPrefixOrPath(new) => {
            let prefix = match &matched.path {
                PathMatch::Prefix(p) | PathMatch::StringPrefix(p) => p,
                _ => return new.clone(),
            };
            let rest = if matched.ignore_uri_case {
                path.get(..prefix.len())
                    .filter(|head| head.eq_ignore_ascii_case(prefix))
                    .map(|_| &path[prefix.len()..])
            } else {
                path.strip_prefix(prefix.as_str())
            };
            match rest {
                Some(rest) => {
                    let joined = format!("{new}{rest}");
                    if joined.starts_with('/') {
                        joined
                    } else {
                        format!("/{joined}")
                    }
                }
                None => new.clone(),
            }
        }
        PathModifier::ReplacePrefixMatch(new) => {
            let PathMatch::Prefix(prefix) = &matched.path else {
                return path.to_string();
            };
            let rest = if prefix == "/" {
                path
            } else {
                path.strip_prefix(prefix.as_str()).unwrap_or(path)
            };
            let joined = format!("{}{rest}", new.trim_end_matches('/'));
            if joined.is_empty() {
                "/".to_string()
            } else if !joined.starts_with('/') {
                format!("/{joined}")
            } else {
                joined
            }
        }
    }
}

/// Applies a header modifier: `remove`, then `set`, then `add`.
pub fn modify_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    for name in &m.remove {
        headers.remove(name);
    }
    for (name, value) in &m.set {
        headers.insert(name.clone(), value.clone());
    }
    for (name, value) in &m.add {
        headers.append(name.clone(), value.clone());
    }
}

/// The `Location` of a `RequestRedirect`: the request's own scheme (`http` inside the mesh),
/// host (without port) and path unless the filter replaces them; the port is the filter's,
/// else the new scheme's well-known port, else `dst_port` (the Service port), and is left out
/// when it is the scheme's well-known port. The query is kept.
pub fn redirect_location(
    r: &RequestRedirect,
    host: &str,
    dst_port: u16,
    path: &str,
    query: Option<&str>,
    matched: &RouteMatch,
) -> String {
    let scheme = r.scheme.unwrap_or(Scheme::Http);
    let hostname = r
        .hostname
        .clone()
        .unwrap_or_else(|| host_without_port(host).to_string());
    let port = r
        .port
        .or(r.scheme.map(Scheme::default_port))
        .unwrap_or(dst_port);
    let path = match &r.path {
        Some(m) => modify_path(path, matched, m),
        None => path.to_string(),
    };
    let mut location = format!("{}://{hostname}", scheme.as_str());
    if port != scheme.default_port() {
        location.push_str(&format!(":{port}"));
    }
    location.push_str(&path);
    if let Some(q) = query {
        location.push('?');
        location.push_str(q);
    }
    location
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod vs_tests;

#[cfg(test)]
mod grpc_tests;

#[cfg(test)]
mod se_tests;

#[cfg(test)]
mod prop_tests;
