//! AuthorizationPolicy at L7, as a waypoint enforces it. Pure functions over the model, like
//! the L4 evaluation next to it, and with the same structure: a matching `DENY` denies; with
//! no `ALLOW` policy the request is allowed; a matching `ALLOW` allows; otherwise it is denied
//! (403, body [`DENIED_BODY`]). Rules, clauses and lists combine exactly as at L4; what is new
//! is that every HTTP attribute can be seen.
//!
//! Which policies apply ([`policies_for_destination`]) follows istiod's attachment rules for
//! waypoints: only `targetRefs` count. A policy applies when it targets
//! - the waypoint's `Gateway` (same namespace, same name),
//! - the destination `Service` (same namespace as the policy, same name),
//! - the destination `ServiceEntry` (`group: networking.istio.io`; same namespace as the
//!   policy, same name): egress through the waypoint, or
//! - the `GatewayClass` `istio-waypoint`, from the root namespace.
//!
//! Selector-based and namespace-wide policies (no `targetRefs`) are for ztunnel; a waypoint
//! ignores them, as Istio's does. A policy with `targetRefs` is never ztunnel's
//! ([`crate::policy::policies_for`]), whatever it targets.
//!
//! Refused policies that fail closed ([`crate::model::RefusedPolicy`]) follow the accepted
//! ones: one with `targetRefs` attaches as above; one whose selection could not be read at
//! all applies to every Service and ServiceEntry of its namespace (of the mesh, from the
//! root namespace). Each is a DENY matching every request.
//!
//! Attribute semantics, where Istio's translation to Envoy RBAC defines them:
//! - **Wildcards.** Principals, namespaces, request principals, hosts, methods, paths and
//!   `when` values match exactly, `*` (any non-empty value), `prefix*` or `*suffix`. Paths
//!   also take Istio's templates: `{*}` is one path segment, `{**}` (last) the rest.
//! - **Hosts** match the `:authority` case-insensitively, with or without its port.
//! - **Paths** match the request path without its query string.
//! - **Missing attributes** (no peer identity, no JWT, no such header): a positive value never
//!   matches, a `not` value always does.
//! - **`request.headers[name]`**: values of repeated headers are joined with `,` (as Envoy
//!   does) and the pattern may match the whole or any comma-separated element.
//! - **`request.auth.claims[a][b]`** walks nested objects; a string claim, a boolean claim
//!   (`"true"`/`"false"`) or any string of a list claim may match.
//! - **`source.ip`** is the downstream peer address and **`remote.ip`** (with
//!   `remoteIpBlocks`) the original client address the caller derived (the waypoint: from
//!   `X-Forwarded-For` only when it trusts proxies in front of it, never from the HBONE
//!   `forwarded` header); they are equal when it knows no better.
//! - **Attributes we cannot evaluate** (`connection.sni` has no value over HBONE;
//!   `experimental.envoy.filters.*` needs Envoy metadata) behave as missing, except that an
//!   unknown *kind* of attribute makes a DENY or AUDIT condition match (fail closed) and an
//!   ALLOW condition not match.
//! - **`CUSTOM`** (external authorization) is not supported: a matching CUSTOM policy denies,
//!   because silently skipping a check the user asked for would fail open. Its rules are
//!   evaluated like a DENY's.
//! - **Dry-run** and **`AUDIT`** are reported in [`Evaluation`] as at L4.

use std::net::IpAddr;

use http::HeaderMap;
use serde_json::Value as Json;

use super::{one_of, wildcard, Evaluation, Tally};
use crate::identity::Identity;
use crate::jwt::RequestAuth;
use crate::model::{
    parse_ip_or_cidr, Action, AuthorizationPolicy, Condition, Model, NamespacedName, Operation,
    Rule, Source, TargetRef, ROOT_NAMESPACE,
};

/// Status a denied request is answered with.
pub const DENIED_STATUS: u16 = 403;
/// Body of that answer, as Envoy's RBAC filter writes it.
pub const DENIED_BODY: &str = "RBAC: access denied";

/// The `GatewayClass` of waypoints; root-namespace policies targeting it apply to all.
pub const WAYPOINT_GATEWAY_CLASS: &str = crate::model::WAYPOINT_GATEWAY_CLASS;

const GATEWAY_API_GROUP: &str = "gateway.networking.k8s.io";
const ISTIO_NETWORKING_GROUP: &str = "networking.istio.io";

/// What a request through a waypoint is for, as policy attachment sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Destination<'a> {
    /// A Service (namespace and name).
    Service(&'a NamespacedName),
    /// A ServiceEntry (namespace and name): egress through the waypoint.
    ServiceEntry(&'a NamespacedName),
    /// A workload addressed directly.
    Workload,
}

impl<'a> Destination<'a> {
    /// A Service, or a workload when `None` (what the `service` arguments below mean).
    pub fn of_service(service: Option<&'a NamespacedName>) -> Self {
        service.map_or(Destination::Workload, Destination::Service)
    }

    /// The Service or ServiceEntry, `None` for a workload.
    pub fn key(&self) -> Option<&'a NamespacedName> {
        match *self {
            Destination::Service(k) | Destination::ServiceEntry(k) => Some(k),
            Destination::Workload => None,
        }
    }
}

/// What a waypoint knows about a request when it authorizes it.
#[derive(Clone, Copy, Debug)]
pub struct L7Request<'a> {
    /// The peer's certificate identity (the source workload over HBONE); `None` for
    /// plaintext.
    pub src_identity: Option<&'a Identity>,
    /// The downstream peer address (`source.ip`, `ipBlocks`).
    pub src_ip: IpAddr,
    /// The original client address (`remote.ip`, `remoteIpBlocks`).
    pub remote_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
    /// `:authority` (or `Host`), possibly with a port.
    pub host: &'a str,
    pub method: &'a str,
    /// Path and query, as received.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    /// The validated JWT, when the request carried one (`RequestAuthentication`).
    pub auth: Option<&'a RequestAuth>,
}

// === policy selection ===

/// The policies a waypoint `waypoint` (its Gateway's namespace and name) enforces for a
/// request to `service` (`None`: addressed to a workload, not a service), in model order
/// ([`policies_for_destination`]).
pub fn policies_for_waypoint<'a>(
    model: &'a Model,
    waypoint: &NamespacedName,
    service: Option<&NamespacedName>,
) -> Vec<&'a AuthorizationPolicy> {
    policies_for_destination(model, waypoint, Destination::of_service(service))
}

/// The policies a waypoint `waypoint` (its Gateway's namespace and name) enforces for a
/// request to `dest`, in model order.
pub fn policies_for_destination<'a>(
    model: &'a Model,
    waypoint: &NamespacedName,
    dest: Destination<'_>,
) -> Vec<&'a AuthorizationPolicy> {
    let targeted =
        |p: &&AuthorizationPolicy| attached_to(&p.namespace, &p.target_refs, waypoint, dest);
    let refused = model.refused_policies.iter().filter_map(|r| {
        let deny = r.deny.as_ref()?;
        (r.covers_service(dest.key()) || targeted(&deny)).then_some(deny)
    });
    // Accepted policies from the model's index of attachments.
    model
        .waypoint_policies(waypoint, dest)
        .chain(refused)
        .collect()
}

/// What a `targetRef` of an object in `namespace` attaches it to, if anything a waypoint
/// serves: [`target_applies_to`] compares it with a waypoint and a destination, the model
/// indexes policies by it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AttachPoint<'a> {
    /// A Service of the object's own namespace.
    Service { namespace: &'a str, name: &'a str },
    /// A ServiceEntry of the object's own namespace (egress through the waypoint).
    ServiceEntry { namespace: &'a str, name: &'a str },
    /// A waypoint's Gateway of the object's own namespace.
    Gateway { namespace: &'a str, name: &'a str },
    /// Every waypoint (`GatewayClass` `istio-waypoint`, from the root namespace).
    GatewayClass,
}

pub(crate) fn attach_point<'a>(
    namespace: &'a str,
    target: &'a TargetRef,
) -> Option<AttachPoint<'a>> {
    let name = target.name.as_str();
    if service_entry_ref(target) {
        return Some(AttachPoint::ServiceEntry { namespace, name });
    }
    match (canonical_group(&target.group), target.kind.as_str()) {
        ("", "Service") => Some(AttachPoint::Service { namespace, name }),
        (GATEWAY_API_GROUP, "Gateway") => Some(AttachPoint::Gateway { namespace, name }),
        (GATEWAY_API_GROUP, "GatewayClass") => (namespace == ROOT_NAMESPACE
            && name == WAYPOINT_GATEWAY_CLASS)
            .then_some(AttachPoint::GatewayClass),
        _ => None,
    }
}

/// Whether `target` names a ServiceEntry (`group: networking.istio.io`).
fn service_entry_ref(target: &TargetRef) -> bool {
    target.group == ISTIO_NETWORKING_GROUP && target.kind == "ServiceEntry"
}

/// Whether `target`, in an object of namespace `namespace`, attaches it to waypoint
/// `waypoint` for a request to `service` ([`target_applies_to`]).
pub fn target_applies(
    namespace: &str,
    target: &TargetRef,
    waypoint: &NamespacedName,
    service: Option<&NamespacedName>,
) -> bool {
    target_applies_to(
        namespace,
        target,
        waypoint,
        Destination::of_service(service),
    )
}

/// Whether `target`, in an object of namespace `namespace`, attaches it to waypoint
/// `waypoint` for a request to `dest` (also used for RequestAuthentication).
pub fn target_applies_to(
    namespace: &str,
    target: &TargetRef,
    waypoint: &NamespacedName,
    dest: Destination<'_>,
) -> bool {
    match attach_point(namespace, target) {
        Some(AttachPoint::Service { namespace, name }) => matches!(dest, Destination::Service(svc)
            if svc.namespace == namespace && svc.name == name),
        Some(AttachPoint::ServiceEntry { namespace, name }) => {
            matches!(dest, Destination::ServiceEntry(se)
                if se.namespace == namespace && se.name == name)
        }
        Some(AttachPoint::Gateway { namespace, name }) => {
            waypoint.namespace == namespace && waypoint.name == name
        }
        Some(AttachPoint::GatewayClass) => true,
        None => false,
    }
}

/// Whether any of `refs`, in an object of namespace `namespace`, attaches it to waypoint
/// `waypoint` for a request to `service` ([`target_applies`]).
pub fn attached(
    namespace: &str,
    refs: &[TargetRef],
    waypoint: &NamespacedName,
    service: Option<&NamespacedName>,
) -> bool {
    attached_to(namespace, refs, waypoint, Destination::of_service(service))
}

/// Whether any of `refs`, in an object of namespace `namespace`, attaches it to waypoint
/// `waypoint` for a request to `dest` ([`target_applies_to`]).
pub fn attached_to(
    namespace: &str,
    refs: &[TargetRef],
    waypoint: &NamespacedName,
    dest: Destination<'_>,
) -> bool {
    refs.iter()
        .any(|t| target_applies_to(namespace, t, waypoint, dest))
}

/// The core API group may be written `""` or `core`.
fn canonical_group(group: &str) -> &str {
    if group == "core" {
        ""
    } else {
        group
    }
}

// === evaluation ===

/// Decides a request against `policies` (normally [`policies_for_waypoint`]).
pub fn evaluate_l7(policies: &[&AuthorizationPolicy], req: &L7Request<'_>) -> Evaluation {
    let attrs = Attributes::of(req);
    let mut tally = Tally::default();
    for policy in policies {
        match policy.action {
            Action::Audit => tally.audit(policy, matches_policy(policy, &attrs, FailClosed::Yes)),
            // Envoy runs the CUSTOM filter before RBAC; rank it first so that it names the
            // denial when both would deny.
            Action::Custom | Action::Deny => {
                let rank = u8::from(policy.action != Action::Custom);
                tally.deny(
                    policy,
                    rank,
                    matches_policy(policy, &attrs, FailClosed::Yes),
                )
            }
            Action::Allow => tally.allow(policy, matches_policy(policy, &attrs, FailClosed::No)),
        }
    }
    tally.finish()
}

/// [`evaluate_l7`] over [`policies_for_waypoint`].
pub fn authorize_l7(
    model: &Model,
    waypoint: &NamespacedName,
    service: Option<&NamespacedName>,
    req: &L7Request<'_>,
) -> Evaluation {
    authorize_l7_to(model, waypoint, Destination::of_service(service), req)
}

/// [`evaluate_l7`] over [`policies_for_destination`].
pub fn authorize_l7_to(
    model: &Model,
    waypoint: &NamespacedName,
    dest: Destination<'_>,
    req: &L7Request<'_>,
) -> Evaluation {
    evaluate_l7(&policies_for_destination(model, waypoint, dest), req)
}

/// What an attribute we cannot evaluate does to a condition.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FailClosed {
    /// ALLOW: it does not match.
    No,
    /// DENY, CUSTOM, AUDIT: it matches.
    Yes,
}

/// The request with derived values computed once per evaluation.
struct Attributes<'r> {
    req: &'r L7Request<'r>,
    principal: Option<String>,
    request_principal: Option<String>,
    /// The path without query string.
    path: &'r str,
}

impl<'r> Attributes<'r> {
    fn of(req: &'r L7Request<'r>) -> Self {
        Attributes {
            req,
            principal: req.src_identity.map(Identity::principal),
            request_principal: req.auth.map(RequestAuth::principal),
            path: req.path.split(['?', '#']).next().unwrap_or_default(),
        }
    }

    fn namespace(&self) -> Option<&str> {
        self.req.src_identity.map(|i| i.namespace.as_str())
    }

    fn service_account_is(&self, ns_sa: &str) -> bool {
        let (ns, sa) = ns_sa.split_once('/').unwrap_or(("default", ns_sa));
        self.req
            .src_identity
            .is_some_and(|id| id.namespace == ns && id.service_account == sa)
    }
}

fn matches_policy(policy: &AuthorizationPolicy, attrs: &Attributes<'_>, fc: FailClosed) -> bool {
    policy
        .rules
        .iter()
        .any(|rule| matches_rule(rule, attrs, fc))
}

fn matches_rule(rule: &Rule, attrs: &Attributes<'_>, fc: FailClosed) -> bool {
    (rule.from.is_empty() || rule.from.iter().any(|s| matches_source(s, attrs)))
        && (rule.to.is_empty() || rule.to.iter().any(|op| matches_operation(op, attrs)))
        && rule.when.iter().all(|c| matches_condition(c, attrs, fc))
}

fn matches_source(s: &Source, attrs: &Attributes<'_>) -> bool {
    let (src_ip, remote_ip) = (attrs.req.src_ip, attrs.req.remote_ip);
    one_of(&s.principals, &s.not_principals, |p| {
        wildcard(p, attrs.principal.as_deref())
    }) && one_of(&s.request_principals, &s.not_request_principals, |p| {
        wildcard(p, attrs.request_principal.as_deref())
    }) && one_of(&s.namespaces, &s.not_namespaces, |n| {
        wildcard(n, attrs.namespace())
    }) && one_of(&s.service_accounts, &s.not_service_accounts, |sa| {
        attrs.service_account_is(sa)
    }) && one_of(&s.ip_blocks, &s.not_ip_blocks, |n| n.contains(&src_ip))
        && one_of(&s.remote_ip_blocks, &s.not_remote_ip_blocks, |n| {
            n.contains(&remote_ip)
        })
}

fn matches_operation(op: &Operation, attrs: &Attributes<'_>) -> bool {
    let req = attrs.req;
    one_of(&op.hosts, &op.not_hosts, |h| host_matches(h, req.host))
        && one_of(&op.ports, &op.not_ports, |p| *p == req.dst_port)
        && one_of(&op.methods, &op.not_methods, |m| {
            wildcard(m, Some(req.method))
        })
        && one_of(&op.paths, &op.not_paths, |p| path_matches(p, attrs.path))
}

/// Case-insensitive wildcard match against the authority with and without its port.
fn host_matches(pattern: &str, authority: &str) -> bool {
    let pattern = pattern.to_ascii_lowercase();
    let authority = authority.to_ascii_lowercase();
    wildcard(&pattern, Some(&authority))
        || wildcard(&pattern, Some(crate::route::host_without_port(&authority)))
}

pub(crate) fn path_matches(pattern: &str, path: &str) -> bool {
    if pattern.contains("{*}") || pattern.contains("{**}") {
        let pattern: Vec<&str> = pattern.split('/').collect();
        let path: Vec<&str> = path.split('/').collect();
        template_matches(&pattern, &path)
    } else {
        wildcard(pattern, Some(path))
    }
}

/// Istio path templates, segment by segment: `{*}` is exactly one non-empty segment, `{**}`
/// one or more segments up to the end (Istio only accepts it last).
fn template_matches(pattern: &[&str], path: &[&str]) -> bool {
    match (pattern.split_first(), path.split_first()) {
        (None, None) => true,
        (Some((&"{**}", _)), Some(_)) => path.iter().any(|s| !s.is_empty()),
        (Some((&"{*}", rest)), Some((seg, path_rest))) => {
            !seg.is_empty() && template_matches(rest, path_rest)
        }
        (Some((lit, rest)), Some((seg, path_rest))) => {
            lit == seg && template_matches(rest, path_rest)
        }
        _ => false,
    }
}

fn matches_condition(c: &Condition, attrs: &Attributes<'_>, fc: FailClosed) -> bool {
    let req = attrs.req;
    let ip_in = |ip: IpAddr| move |v: &String| parse_ip_or_cidr(v).is_some_and(|n| n.contains(&ip));
    let text = |value: Option<&str>| one_of(&c.values, &c.not_values, |v| wildcard(v, value));
    let key = c.key.as_str();
    match key {
        "source.ip" => one_of(&c.values, &c.not_values, ip_in(req.src_ip)),
        "remote.ip" => one_of(&c.values, &c.not_values, ip_in(req.remote_ip)),
        "destination.ip" => one_of(&c.values, &c.not_values, ip_in(req.dst_ip)),
        "destination.port" => one_of(&c.values, &c.not_values, |v| {
            v.parse::<u16>() == Ok(req.dst_port)
        }),
        "source.namespace" => text(attrs.namespace()),
        "source.principal" => text(attrs.principal.as_deref()),
        "source.serviceAccount" => {
            one_of(&c.values, &c.not_values, |v| attrs.service_account_is(v))
        }
        "request.auth.principal" => text(attrs.request_principal.as_deref()),
        "request.auth.presenter" => text(req.auth.and_then(|a| a.presenter.as_deref())),
        "request.auth.audiences" => one_of(&c.values, &c.not_values, |v| {
            req.auth
                .is_some_and(|a| a.audiences.iter().any(|aud| wildcard(v, Some(aud))))
        }),
        // No SNI inside an HBONE tunnel: the attribute is always missing.
        "connection.sni" => text(None),
        _ => {
            if let Some(name) = bracketed(key, "request.headers")
                .or_else(|| bracketed(key, "request.experimental.inline.headers"))
            {
                one_of(&c.values, &c.not_values, |v| {
                    header_matches(req.headers, name, v)
                })
            } else if let Some(path) = key.strip_prefix("request.auth.claims") {
                let claim = claim_at(req.auth.map(|a| &a.claims), path);
                one_of(&c.values, &c.not_values, |v| claim_matches(claim, v))
            } else {
                fc == FailClosed::Yes
            }
        }
    }
}

/// `prefix[name]` → `name`.
fn bracketed<'k>(key: &'k str, prefix: &str) -> Option<&'k str> {
    key.strip_prefix(prefix)?
        .strip_prefix('[')?
        .strip_suffix(']')
        .filter(|name| !name.is_empty() && !name.contains(['[', ']']))
}

fn header_matches(headers: &HeaderMap, name: &str, pattern: &str) -> bool {
    let mut values = headers.get_all(name).iter().peekable();
    if values.peek().is_none() {
        return false;
    }
    // Non-UTF-8 bytes cannot match a YAML string pattern; keep the rest comparable.
    let joined = values
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .collect::<Vec<_>>()
        .join(",");
    if pattern == "*" {
        // Presence, even of an empty value.
        return true;
    }
    wildcard(pattern, Some(&joined))
        || (joined.contains(',') && joined.split(',').any(|e| wildcard(pattern, Some(e))))
}

/// Follows `[a][b]...` into the JWT payload.
fn claim_at<'j>(claims: Option<&'j Json>, path: &str) -> Option<&'j Json> {
    let mut node = claims?;
    let mut rest = path;
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let (name, after) = inner.split_once(']')?;
        node = node.as_object()?.get(name)?;
        rest = after;
    }
    Some(node)
}

fn claim_matches(claim: Option<&Json>, pattern: &str) -> bool {
    match claim {
        Some(Json::String(s)) => wildcard(pattern, Some(s)),
        Some(Json::Bool(b)) => wildcard(pattern, Some(if *b { "true" } else { "false" })),
        Some(Json::Array(items)) => items
            .iter()
            .any(|i| i.as_str().is_some_and(|s| wildcard(pattern, Some(s)))),
        _ => false,
    }
}

#[cfg(test)]
mod tests;
