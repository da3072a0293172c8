//! `gateway.networking.k8s.io` `GRPCRoute`, validated as the Gateway API's CRD schema and CEL
//! rules validate it, and translated into the model's [`HttpRoute`] (kind
//! [`RouteKind::Grpc`]) so that the waypoint applies it like an HTTPRoute:
//!
//! | `matches[].method` | path match |
//! |---|---|
//! | `Exact`, service and method | `Exact /<service>/<method>` |
//! | `Exact`, service only | `PathPrefix /<service>` (every method) |
//! | `Exact`, method only | `RegularExpression /[^/]+/<method>` |
//! | `RegularExpression` | `RegularExpression /(?:<service>)/(?:<method>)`, a missing one `[^/]+` |
//! | none | `PathPrefix /` (every request) |
//!
//! The method match as written is kept in [`RouteMatch::grpc`]: precedence among GRPCRoute
//! rules counts the characters of the matching service, then of the method, then header
//! matches (see [`crate::route`]). `parentRefs`, `hostnames`, header matches, the
//! `RequestHeaderModifier` / `ResponseHeaderModifier` / `RequestMirror` (rule level) filters
//! and weighted `backendRefs` (with their own header-modifier filters) are those of HTTPRoute
//! (`k8s/route.rs`), with GRPCRoute's bounds (at most 8 matches per rule). Unknown fields,
//! and `ExtensionRef`, `sessionPersistence` and a backend-level `RequestMirror` (not
//! supported here), are refused with a named error rather than ignored.

use super::route::{
    backend_ref, bounded, header_modifier, header_name, pattern, request_mirror, route_spec,
    value_match, MAX_BACKEND_REFS, MAX_FILTERS, MAX_HEADER_MATCHES, MAX_RULES, MAX_VALUE_LEN,
};
use super::yaml::{FieldResult, Node};
use super::Meta;
use crate::model::{
    Filters, GrpcMethodMatch, HeaderMatch, HttpRoute, PathMatch, RouteKind, RouteMatch, RouteRule,
    Timeouts,
};

/// GRPCRoute's `maxItems` for `rules[].matches` (with 16 rules, the CEL bound of 128 matches
/// per route always holds).
const MAX_MATCHES: usize = 8;

pub(super) fn grpc_route(obj: &Node<'_>, meta: Meta) -> FieldResult<HttpRoute> {
    let (spec, parents, hostnames) = route_spec(obj, &meta)?;
    let created = meta.created.clone();
    let mut regexes = 0;
    let mut rules = Vec::new();
    for node in bounded(&spec, "rules", MAX_RULES)? {
        let rule = rule(&node, &meta.namespace, &mut regexes)?;
        if let Some(name) = &rule.name {
            if rules
                .iter()
                .any(|r: &RouteRule| r.name.as_ref() == Some(name))
            {
                return Err(node.err(format!("rule name {name:?} is not unique in the route")));
            }
        }
        rules.push(rule);
    }
    if rules.is_empty() {
        rules.push(RouteRule::without_backend());
    }
    Ok(HttpRoute {
        kind: RouteKind::Grpc,
        name: meta.name,
        namespace: meta.namespace,
        created,
        parents,
        hostnames,
        rules,
    })
}

fn rule(node: &Node<'_>, route_ns: &str, regexes: &mut usize) -> FieldResult<RouteRule> {
    if let Some(sp) = node.get("sessionPersistence")? {
        return Err(sp.err("sessionPersistence is not supported"));
    }
    node.only(&["name", "matches", "filters", "backendRefs"])?;
    let name = match node.get("name")? {
        Some(n) => {
            let s = n.str()?;
            if !super::dns_label(s) {
                return Err(n.err(format!("invalid rule name {s:?}")));
            }
            Some(s.to_string())
        }
        None => None,
    };
    let mut matches = Vec::new();
    for m in bounded(node, "matches", MAX_MATCHES)? {
        matches.push(route_match(&m, regexes)?);
    }
    if matches.is_empty() {
        matches.push(RouteMatch::default());
    }
    let filters = filters(node, Some(route_ns))?;
    let mut backends = Vec::new();
    for b in bounded(node, "backendRefs", MAX_BACKEND_REFS)? {
        backends.push(backend_ref(&b, route_ns)?);
    }
    Ok(RouteRule {
        name,
        matches,
        filters,
        backends,
        timeouts: Timeouts::default(),
        retries: None,
        fault: None,
    })
}

fn route_match(node: &Node<'_>, regexes: &mut usize) -> FieldResult<RouteMatch> {
    node.only(&["method", "headers"])?;
    let mut m = RouteMatch::default();
    if let Some(method) = node.get("method")? {
        let (path, grpc) = method_match(&method, regexes)?;
        m.path = path;
        m.grpc = Some(grpc);
    }
    for h in bounded(node, "headers", MAX_HEADER_MATCHES)? {
        h.only(&["type", "name", "value"])?;
        let name_node = h.required("name")?;
        let name = header_name(&name_node)?;
        if m.headers.iter().any(|x: &HeaderMatch| x.name == name) {
            return Err(name_node.err(format!("header {name} matched twice")));
        }
        let value = value_match(&h, regexes)?;
        m.headers.push(HeaderMatch { name, value });
    }
    Ok(m)
}

/// `matches[].method` → the path match (see the module docs) and the match as written.
fn method_match(node: &Node<'_>, regexes: &mut usize) -> FieldResult<(PathMatch, GrpcMethodMatch)> {
    node.only(&["type", "service", "method"])?;
    let regex = match node.opt_str("type")?.unwrap_or("Exact") {
        "Exact" => false,
        "RegularExpression" => true,
        other => {
            return Err(node.err(format!(
                "unknown method match type {other:?} (expected Exact or RegularExpression)"
            )))
        }
    };
    let part = |key: &str, valid: fn(&str) -> bool| -> FieldResult<Option<String>> {
        let Some(n) = node.get(key)? else {
            return Ok(None);
        };
        let s = n.str()?;
        if s.is_empty() {
            return Ok(None);
        }
        if s.len() > MAX_VALUE_LEN {
            return Err(n.err(format!("longer than {MAX_VALUE_LEN} characters")));
        }
        if !regex && !valid(s) {
            return Err(n.err(format!("invalid {key} name {s:?}")));
        }
        Ok(Some(s.to_string()))
    };
    let service = part("service", valid_service)?;
    let method = part("method", valid_method)?;
    let path = match (&service, &method, regex) {
        (None, None, _) => return Err(node.err("one or both of service and method must be given")),
        (Some(s), Some(m), false) => PathMatch::Exact(format!("/{s}/{m}")),
        (Some(s), None, false) => PathMatch::Prefix(format!("/{s}")),
        (None, Some(m), false) => {
            PathMatch::RegularExpression(pattern(node, &format!("/[^/]+/{m}"), regexes)?)
        }
        (s, m, true) => {
            let s = s.as_deref().unwrap_or("[^/]+");
            let m = m.as_deref().unwrap_or("[^/]+");
            PathMatch::RegularExpression(pattern(node, &format!("/(?:{s})/(?:{m})"), regexes)?)
        }
    };
    Ok((
        path,
        GrpcMethodMatch {
            service,
            method,
            regex,
        },
    ))
}

/// The CEL rule's `^(?i)\.?[a-z_][a-z_0-9]*(\.[a-z_][a-z_0-9]*)*$`.
fn valid_service(s: &str) -> bool {
    let s = s.strip_prefix('.').unwrap_or(s);
    s.split('.').all(valid_method)
}

/// The CEL rule's `^[A-Za-z_][A-Za-z_0-9]*$`.
fn valid_method(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A rule's `filters` (`mirror_ns`: the route's namespace, where a rule-level mirror may
/// point; `None` for a backend's filters): the two header modifiers, each at most once, and
/// mirrors.
fn filters(node: &Node<'_>, mirror_ns: Option<&str>) -> FieldResult<Filters> {
    let mut out = Filters::default();
    for f in bounded(node, "filters", MAX_FILTERS)? {
        let type_node = f.required("type")?;
        let kind = type_node.str()?;
        let field = match kind {
            "RequestHeaderModifier" => "requestHeaderModifier",
            "ResponseHeaderModifier" => "responseHeaderModifier",
            "RequestMirror" if mirror_ns.is_some() => {
                f.only(&["type", "requestMirror"])?;
                let ns = mirror_ns.unwrap_or_default();
                out.mirrors
                    .push(request_mirror(&f.required("requestMirror")?, ns)?);
                continue;
            }
            "RequestMirror" | "ExtensionRef" => {
                return Err(type_node.err(format!("filter type {kind} is not supported")))
            }
            other => {
                return Err(type_node.err(format!(
                    "unknown GRPCRoute filter type {other:?} (expected RequestHeaderModifier, \
                     ResponseHeaderModifier, RequestMirror or ExtensionRef)"
                )))
            }
        };
        f.only(&["type", field])?;
        let body = header_modifier(&f.required(field)?)?;
        let slot = if field == "requestHeaderModifier" {
            &mut out.request_headers
        } else {
            &mut out.response_headers
        };
        if slot.is_some() {
            return Err(type_node.err(format!("filter type {kind} given more than once")));
        }
        *slot = Some(body);
    }
    Ok(out)
}
