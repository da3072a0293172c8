//! `gateway.networking.k8s.io` `HTTPRoute`, validated as the Gateway API's CRD schema and
//! CEL rules validate it (lists bounded by their `maxItems`, paths absolute, one filter of
//! each core type, `ReplacePrefixMatch` only with `PathPrefix`, no redirect together with
//! backends or a rewrite), plus what this data plane needs to stay bounded: regular
//! expressions are compiled once with a size limit (RELIABILITY 34) and at most
//! [`MAX_REGEXES_PER_ROUTE`] per route. `RequestMirror` (a Service `backendRef`, `percent`
//! or `fraction`) is understood and may be given several times. Unknown fields and
//! unsupported features (`ExtensionRef`, `CORS`, non-Service backends) are refused with a
//! named error rather than ignored, because ignoring them would route differently from what
//! the user wrote.
//!
//! Istio's egress waypoint kinds are understood besides the Gateway API's: a parent or a
//! backend of `group: networking.istio.io`, `kind: ServiceEntry` (a parent attaches the
//! route to the entry as a Service parent does; a backend is the entry's own endpoints, its
//! `port` optional: the request's).

use std::time::Duration;

use http::{HeaderName, HeaderValue};

use super::yaml::{FieldResult, Node};
use super::{dns_label, dns_subdomain, Meta};
use crate::model::{
    BackendRef, Filters, HeaderMatch, HeaderModifier, HttpRoute, Mirror, NamespacedName,
    ParentKind, ParentRef, PathMatch, PathModifier, Pattern, QueryMatch, RequestRedirect,
    RouteKind, RouteMatch, RouteRule, Scheme, Timeouts, UrlRewrite, ValueMatch,
};
use crate::route::{normalize_path, BackendKind};

const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
/// Istio's networking API group (`ServiceEntry`).
pub(super) const ISTIO_NETWORKING_GROUP: &str = "networking.istio.io";

/// The Gateway API's `maxItems`.
pub(super) const MAX_PARENT_REFS: usize = 32;
pub(super) const MAX_HOSTNAMES: usize = 16;
pub(super) const MAX_RULES: usize = 16;
const MAX_MATCHES: usize = 64;
pub(super) const MAX_HEADER_MATCHES: usize = 16;
const MAX_QUERY_MATCHES: usize = 16;
pub(super) const MAX_FILTERS: usize = 16;
pub(super) const MAX_BACKEND_REFS: usize = 16;
const MAX_HEADER_MODIFICATIONS: usize = 16;
/// Longest path value or regular expression accepted (the Gateway API's `maxLength`).
pub(super) const MAX_VALUE_LEN: usize = 1024;
/// Largest weight (the Gateway API's maximum).
const MAX_WEIGHT: i64 = 1_000_000;
/// Compiled size of one regular expression (program and lazy-DFA cache each).
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Regular expressions one route may hold, so a hostile route's memory stays bounded.
pub const MAX_REGEXES_PER_ROUTE: usize = 128;

pub(super) fn http_route(obj: &Node<'_>, meta: Meta) -> FieldResult<HttpRoute> {
    let (spec, parents, hostnames) = route_spec(obj, &meta)?;
    let mut regexes = 0;
    let mut rules = Vec::new();
    for node in bounded(&spec, "rules", MAX_RULES)? {
        rules.push(rule(&node, &meta.namespace, &mut regexes)?);
    }
    if rules.is_empty() {
        rules.push(RouteRule::without_backend());
    }
    Ok(HttpRoute {
        kind: RouteKind::Http,
        name: meta.name,
        namespace: meta.namespace,
        created: meta.created,
        parents,
        hostnames,
        rules,
    })
}

/// What HTTPRoute and GRPCRoute share: `spec` (only `parentRefs`, `hostnames`, `rules`), its
/// parents and hostnames.
pub(super) fn route_spec<'a>(
    obj: &Node<'a>,
    meta: &Meta,
) -> FieldResult<(Node<'a>, Vec<ParentRef>, Vec<String>)> {
    let spec = obj.required("spec")?;
    spec.only(&["parentRefs", "hostnames", "rules"])?;
    let mut parents = Vec::new();
    for node in bounded(&spec, "parentRefs", MAX_PARENT_REFS)? {
        parents.push(parent_ref(&node, &meta.namespace)?);
    }
    let mut hostnames = Vec::new();
    for node in bounded(&spec, "hostnames", MAX_HOSTNAMES)? {
        hostnames.push(hostname(&node, true)?);
    }
    Ok((spec, parents, hostnames))
}

/// The items of list `key`, refused when longer than `max`.
pub(super) fn bounded<'a>(node: &Node<'a>, key: &str, max: usize) -> FieldResult<Vec<Node<'a>>> {
    let items = node.opt_items(key)?;
    if items.len() > max {
        let list = node.required(key)?;
        return Err(list.err(format!(
            "at most {max} entries allowed, found {}",
            items.len()
        )));
    }
    Ok(items)
}

pub(super) fn parent_ref(node: &Node<'_>, route_ns: &str) -> FieldResult<ParentRef> {
    node.only(&["group", "kind", "namespace", "name", "sectionName", "port"])?;
    let group = node.opt_str("group")?.unwrap_or(GATEWAY_GROUP);
    let kind_name = node.opt_str("kind")?.unwrap_or("Gateway");
    let kind = match (group, kind_name) {
        ("" | "core", "Service") => ParentKind::Service,
        (GATEWAY_GROUP, "Gateway") => ParentKind::Gateway,
        (ISTIO_NETWORKING_GROUP, "ServiceEntry") => ParentKind::ServiceEntry,
        _ => {
            return Err(node.err(format!(
                "unsupported parent {group:?}/{kind_name} (expected a core Service, a \
                 {ISTIO_NETWORKING_GROUP} ServiceEntry or a Gateway)"
            )))
        }
    };
    let target = NamespacedName::new(
        namespace(node, route_ns)?,
        object_name(&node.required("name")?)?,
    );
    let section_name = node
        .get("sectionName")?
        .map(|n| object_name(&n))
        .transpose()?;
    let port = node.get("port")?.map(|n| n.port()).transpose()?;
    Ok(ParentRef {
        kind,
        target,
        section_name,
        port,
    })
}

pub(super) fn namespace(node: &Node<'_>, default: &str) -> FieldResult<String> {
    match node.get("namespace")? {
        None => Ok(default.to_string()),
        Some(n) => {
            let ns = n.str()?;
            if !dns_label(ns) {
                return Err(n.err(format!("invalid namespace {ns:?}")));
            }
            Ok(ns.to_string())
        }
    }
}

pub(super) fn object_name(node: &Node<'_>) -> FieldResult<String> {
    let name = node.str()?;
    if !dns_subdomain(name) {
        return Err(node.err(format!("invalid name {name:?}")));
    }
    Ok(name.to_string())
}

/// A hostname; `*.`-wildcards only where `wildcard`. Lower-case as the API requires.
pub(super) fn hostname(node: &Node<'_>, wildcard: bool) -> FieldResult<String> {
    let h = node.str()?;
    let bare = match h.strip_prefix("*.") {
        Some(rest) if wildcard => rest,
        _ => h,
    };
    if !dns_subdomain(bare) || bare.parse::<std::net::IpAddr>().is_ok() {
        return Err(node.err(format!("invalid hostname {h:?}")));
    }
    Ok(h.to_string())
}

fn rule(node: &Node<'_>, route_ns: &str, regexes: &mut usize) -> FieldResult<RouteRule> {
    node.only(&["name", "matches", "filters", "backendRefs", "timeouts"])?;
    let name = node.opt_str("name")?.map(str::to_string);
    let mut matches = Vec::new();
    for m in bounded(node, "matches", MAX_MATCHES)? {
        matches.push(route_match(&m, regexes)?);
    }
    if matches.is_empty() {
        matches.push(RouteMatch::default());
    }
    let filters_node = node.get("filters")?;
    let filters = filter_list(node, "filters", true, route_ns)?;
    if let (Some(rewrite), Some(f)) = (&filters.url_rewrite, &filters_node) {
        if matches!(rewrite.path, Some(PathModifier::ReplacePrefixMatch(_))) {
            prefix_only(&matches, f)?;
        }
    }
    if let (Some(redirect), Some(f)) = (&filters.redirect, &filters_node) {
        if matches!(redirect.path, Some(PathModifier::ReplacePrefixMatch(_))) {
            prefix_only(&matches, f)?;
        }
    }
    let mut backends = Vec::new();
    for b in bounded(node, "backendRefs", MAX_BACKEND_REFS)? {
        backends.push(backend_ref(&b, route_ns)?);
    }
    if filters.redirect.is_some() && !backends.is_empty() {
        return Err(node.err("RequestRedirect filter must not be used together with backendRefs"));
    }
    let timeouts = match node.get("timeouts")? {
        Some(t) => timeouts(&t)?,
        None => Timeouts::default(),
    };
    Ok(RouteRule {
        name,
        matches,
        filters,
        backends,
        timeouts,
        retries: None,
        fault: None,
    })
}

fn prefix_only(matches: &[RouteMatch], filters: &Node<'_>) -> FieldResult<()> {
    if matches
        .iter()
        .all(|m| matches!(m.path, PathMatch::Prefix(_)))
    {
        Ok(())
    } else {
        Err(filters.err("ReplacePrefixMatch is only compatible with PathPrefix matches"))
    }
}

fn route_match(node: &Node<'_>, regexes: &mut usize) -> FieldResult<RouteMatch> {
    node.only(&["path", "headers", "queryParams", "method"])?;
    let mut m = RouteMatch::default();
    if let Some(path) = node.get("path")? {
        path.only(&["type", "value"])?;
        let kind = path.opt_str("type")?.unwrap_or("PathPrefix");
        let value_node = path.get("value")?;
        let value = value_node
            .as_ref()
            .map(|n| n.str())
            .transpose()?
            .unwrap_or("/");
        let at = value_node.as_ref().unwrap_or(&path);
        m.path = match kind {
            "Exact" => PathMatch::Exact(match_path(at, value)?),
            "PathPrefix" => {
                let p = match_path(at, value)?;
                let trimmed = p.trim_end_matches('/');
                PathMatch::Prefix(if trimmed.is_empty() { "/" } else { trimmed }.to_string())
            }
            "RegularExpression" => PathMatch::RegularExpression(pattern(at, value, regexes)?),
            other => {
                return Err(path.err(format!(
                    "unknown path match type {other:?} (expected Exact, PathPrefix or RegularExpression)"
                )))
            }
        };
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
    for q in bounded(node, "queryParams", MAX_QUERY_MATCHES)? {
        q.only(&["type", "name", "value"])?;
        let name_node = q.required("name")?;
        let name = name_node.str()?;
        if name.is_empty() || name.len() > 256 {
            return Err(name_node.err("must be 1-256 characters"));
        }
        if m.query_params.iter().any(|x: &QueryMatch| x.name == name) {
            return Err(name_node.err(format!("query parameter {name:?} matched twice")));
        }
        let value = value_match(&q, regexes)?;
        m.query_params.push(QueryMatch {
            name: name.to_string(),
            value,
        });
    }
    if let Some(method) = node.get("method")? {
        let s = method.str()?;
        const METHODS: [&str; 9] = [
            "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
        ];
        if !METHODS.contains(&s) {
            return Err(method.err(format!("unknown method {s:?}")));
        }
        m.method = Some(s.to_string());
    }
    Ok(m)
}

/// An Exact/PathPrefix value: absolute, no fragment, no encoded slash, within bounds; stored
/// normalised so that it compares with normalised request paths.
pub(super) fn match_path(node: &Node<'_>, value: &str) -> FieldResult<String> {
    if value.len() > MAX_VALUE_LEN {
        return Err(node.err(format!("longer than {MAX_VALUE_LEN} characters")));
    }
    if !value.starts_with('/') || value.contains(['#', '?']) {
        return Err(node.err(format!(
            "path {value:?} must be absolute, without '?' or '#'"
        )));
    }
    normalize_path(value)
        .map(|n| n.path)
        .map_err(|e| node.err(e.to_string()))
}

pub(super) fn value_match(node: &Node<'_>, regexes: &mut usize) -> FieldResult<ValueMatch> {
    let kind = node.opt_str("type")?.unwrap_or("Exact");
    let value_node = node.required("value")?;
    let value = value_node.str()?;
    if value.len() > 4096 {
        return Err(value_node.err("longer than 4096 characters"));
    }
    match kind {
        "Exact" => Ok(ValueMatch::Exact(value.to_string())),
        "RegularExpression" => Ok(ValueMatch::RegularExpression(pattern(
            &value_node,
            value,
            regexes,
        )?)),
        other => Err(node.err(format!(
            "unknown match type {other:?} (expected Exact or RegularExpression)"
        ))),
    }
}

/// Compiles `source` anchored at both ends, bounded in length and compiled size.
pub(super) fn pattern(node: &Node<'_>, source: &str, regexes: &mut usize) -> FieldResult<Pattern> {
    *regexes += 1;
    if *regexes > MAX_REGEXES_PER_ROUTE {
        return Err(node.err(format!(
            "more than {MAX_REGEXES_PER_ROUTE} regular expressions in one route"
        )));
    }
    if source.len() > MAX_VALUE_LEN {
        return Err(node.err(format!(
            "regular expression longer than {MAX_VALUE_LEN} characters"
        )));
    }
    let regex = regex::RegexBuilder::new(&format!("^(?:{source})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| {
            let reason = match e {
                regex::Error::CompiledTooBig(limit) => {
                    format!("regular expression too large (compiled size over {limit} bytes)")
                }
                other => format!(
                    "invalid regular expression: {}",
                    first_line(&other.to_string())
                ),
            };
            node.err(reason)
        })?;
    Ok(Pattern {
        source: source.to_string(),
        regex,
    })
}

fn first_line(s: &str) -> String {
    s.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

pub(super) fn header_name(node: &Node<'_>) -> FieldResult<HeaderName> {
    let s = node.str()?;
    HeaderName::from_bytes(s.as_bytes()).map_err(|_| node.err(format!("invalid header name {s:?}")))
}

pub(super) fn header_value(node: &Node<'_>) -> FieldResult<HeaderValue> {
    let s = node.str()?;
    HeaderValue::from_str(s).map_err(|_| node.err(format!("invalid header value {s:?}")))
}

/// `filters` of a rule (`rule_level`) or of a backend (header modifiers only).
fn filter_list(node: &Node<'_>, key: &str, rule_level: bool, ns: &str) -> FieldResult<Filters> {
    let mut out = Filters::default();
    for f in bounded(node, key, MAX_FILTERS)? {
        let type_node = f.required("type")?;
        let kind = type_node.str()?;
        let (field, allowed) = match kind {
            "RequestHeaderModifier" => ("requestHeaderModifier", true),
            "ResponseHeaderModifier" => ("responseHeaderModifier", true),
            "URLRewrite" => ("urlRewrite", rule_level),
            "RequestRedirect" => ("requestRedirect", rule_level),
            "RequestMirror" => ("requestMirror", rule_level),
            "ExtensionRef" | "CORS" => {
                return Err(type_node.err(format!("filter type {kind} is not supported")))
            }
            other => return Err(type_node.err(format!("unknown filter type {other:?}"))),
        };
        if !allowed {
            return Err(type_node.err(format!("filter type {kind} is not supported on a backend")));
        }
        f.only(&["type", field])?;
        let body = f.required(field)?;
        let duplicate = || type_node.err(format!("filter type {kind} given more than once"));
        match kind {
            "RequestHeaderModifier" => {
                if out.request_headers.is_some() {
                    return Err(duplicate());
                }
                out.request_headers = Some(header_modifier(&body)?);
            }
            "ResponseHeaderModifier" => {
                if out.response_headers.is_some() {
                    return Err(duplicate());
                }
                out.response_headers = Some(header_modifier(&body)?);
            }
            "URLRewrite" => {
                if out.url_rewrite.is_some() {
                    return Err(duplicate());
                }
                out.url_rewrite = Some(url_rewrite(&body)?);
            }
            "RequestMirror" => out.mirrors.push(request_mirror(&body, ns)?),
            _ => {
                if out.redirect.is_some() {
                    return Err(duplicate());
                }
                out.redirect = Some(redirect(&body)?);
            }
        }
    }
    if out.url_rewrite.is_some() && out.redirect.is_some() {
        let list = node.required(key)?;
        return Err(list.err("URLRewrite and RequestRedirect cannot be used together"));
    }
    Ok(out)
}

pub(super) fn header_modifier(node: &Node<'_>) -> FieldResult<HeaderModifier> {
    node.only(&["set", "add", "remove"])?;
    let mut m = HeaderModifier::default();
    let pairs = |key: &str| -> FieldResult<Vec<(HeaderName, HeaderValue)>> {
        let mut out: Vec<(HeaderName, HeaderValue)> = Vec::new();
        for item in bounded(node, key, MAX_HEADER_MODIFICATIONS)? {
            item.only(&["name", "value"])?;
            let name_node = item.required("name")?;
            let name = header_name(&name_node)?;
            if out.iter().any(|(n, _)| *n == name) {
                return Err(name_node.err(format!("header {name} given twice")));
            }
            out.push((name, header_value(&item.required("value")?)?));
        }
        Ok(out)
    };
    m.set = pairs("set")?;
    m.add = pairs("add")?;
    for item in bounded(node, "remove", MAX_HEADER_MODIFICATIONS)? {
        m.remove.push(header_name(&item)?);
    }
    Ok(m)
}

/// A VirtualService `headers.request`/`response`: `set` and `add` as maps, `remove` a list.
pub(super) fn header_modifier_map(node: &Node<'_>) -> FieldResult<HeaderModifier> {
    node.only(&["set", "add", "remove"])?;
    let pairs = |key: &str| -> FieldResult<Vec<(HeaderName, HeaderValue)>> {
        let mut out = Vec::new();
        if let Some(map) = node.get(key)? {
            let entries = map.entries()?;
            if entries.len() > MAX_HEADER_MODIFICATIONS {
                return Err(map.err(format!(
                    "at most {MAX_HEADER_MODIFICATIONS} entries allowed"
                )));
            }
            for (name, v) in entries {
                let name = HeaderName::from_bytes(name.as_bytes())
                    .map_err(|_| v.err(format!("invalid header name {name:?}")))?;
                out.push((name, header_value(&v)?));
            }
        }
        Ok(out)
    };
    let mut m = HeaderModifier {
        set: pairs("set")?,
        add: pairs("add")?,
        remove: Vec::new(),
    };
    for item in bounded(node, "remove", MAX_HEADER_MODIFICATIONS)? {
        m.remove.push(header_name(&item)?);
    }
    Ok(m)
}

fn path_modifier(node: &Node<'_>) -> FieldResult<PathModifier> {
    node.only(&["type", "replaceFullPath", "replacePrefixMatch"])?;
    let type_node = node.required("type")?;
    let (field, full) = match type_node.str()? {
        "ReplaceFullPath" => ("replaceFullPath", true),
        "ReplacePrefixMatch" => ("replacePrefixMatch", false),
        other => {
            return Err(type_node.err(format!(
                "unknown path modifier {other:?} (expected ReplaceFullPath or ReplacePrefixMatch)"
            )))
        }
    };
    let value_node = node.required(field)?;
    let value = value_node.str()?;
    if !full && value.is_empty() {
        return Ok(PathModifier::ReplacePrefixMatch(String::new()));
    }
    let path = match_path(&value_node, value)?;
    Ok(if full {
        PathModifier::ReplaceFullPath(path)
    } else {
        PathModifier::ReplacePrefixMatch(path)
    })
}

fn url_rewrite(node: &Node<'_>) -> FieldResult<UrlRewrite> {
    node.only(&["hostname", "path"])?;
    Ok(UrlRewrite {
        hostname: node
            .get("hostname")?
            .map(|n| hostname(&n, false))
            .transpose()?,
        path: node.get("path")?.map(|n| path_modifier(&n)).transpose()?,
    })
}

/// A redirect's `scheme`: `http` or `https`.
pub(super) fn scheme(n: &Node<'_>) -> FieldResult<Scheme> {
    match n.str()? {
        "http" => Ok(Scheme::Http),
        "https" => Ok(Scheme::Https),
        other => Err(n.err(format!("unknown scheme {other:?} (expected http or https)"))),
    }
}

fn redirect(node: &Node<'_>) -> FieldResult<RequestRedirect> {
    node.only(&["scheme", "hostname", "path", "port", "statusCode"])?;
    let scheme = node.get("scheme")?.map(|n| scheme(&n)).transpose()?;
    let status_code = match node.get("statusCode")? {
        None => 302,
        Some(n) => match n.int()? {
            c @ (301 | 302) => c as u16,
            other => return Err(n.err(format!("status code {other} (expected 301 or 302)"))),
        },
    };
    Ok(RequestRedirect {
        scheme,
        hostname: node
            .get("hostname")?
            .map(|n| hostname(&n, false))
            .transpose()?,
        port: node.get("port")?.map(|n| n.port()).transpose()?,
        path: node.get("path")?.map(|n| path_modifier(&n)).transpose()?,
        status_code,
    })
}

pub(super) fn backend_ref(node: &Node<'_>, route_ns: &str) -> FieldResult<BackendRef> {
    node.only(&[
        "group",
        "kind",
        "name",
        "namespace",
        "port",
        "weight",
        "filters",
    ])?;
    let group = node.opt_str("group")?.unwrap_or("");
    let kind_name = node.opt_str("kind")?.unwrap_or("Service");
    let kind = match (group, kind_name) {
        ("" | "core", "Service") => BackendKind::Service,
        (ISTIO_NETWORKING_GROUP, "ServiceEntry") => BackendKind::ServiceEntry,
        _ => {
            return Err(node.err(format!(
                "unsupported backend {group:?}/{kind_name} (expected a core Service or a \
                 {ISTIO_NETWORKING_GROUP} ServiceEntry)"
            )))
        }
    };
    let service = NamespacedName::new(
        namespace(node, route_ns)?,
        object_name(&node.required("name")?)?,
    );
    // A Service's port must be given (the Gateway API's rule); an entry's defaults to the
    // port the request was for (0).
    let port = match (kind, node.get("port")?) {
        (_, Some(n)) => n.port()?,
        (BackendKind::ServiceEntry, None) => 0,
        (BackendKind::Service, None) => node.required("port")?.port()?,
    };
    let weight = match node.get("weight")? {
        None => 1,
        Some(n) => {
            let w = n.int()?;
            if !(0..=MAX_WEIGHT).contains(&w) {
                return Err(n.err(format!("weight {w} out of range 0-{MAX_WEIGHT}")));
            }
            w as u32
        }
    };
    Ok(BackendRef {
        kind,
        service,
        host: None,
        port,
        subset: None,
        weight,
        filters: filter_list(node, "filters", false, route_ns)?,
    })
}

/// `requestMirror`: a Service `backendRef` and the share mirrored (`percent` 0-100 or
/// `fraction` numerator/denominator; default everything).
pub(super) fn request_mirror(node: &Node<'_>, route_ns: &str) -> FieldResult<Mirror> {
    node.only(&["backendRef", "percent", "fraction"])?;
    let b = node.required("backendRef")?;
    b.only(&["group", "kind", "name", "namespace", "port"])?;
    let group = b.opt_str("group")?.unwrap_or("");
    let kind = b.opt_str("kind")?.unwrap_or("Service");
    if !matches!(group, "" | "core") || kind != "Service" {
        return Err(b.err(format!(
            "unsupported mirror backend {group:?}/{kind} (expected a core Service)"
        )));
    }
    let service = NamespacedName::new(namespace(&b, route_ns)?, object_name(&b.required("name")?)?);
    let port = Some(b.required("port")?.port()?);
    let percent = match (node.get("percent")?, node.get("fraction")?) {
        (Some(_), Some(_)) => return Err(node.err("percent and fraction are mutually exclusive")),
        (Some(p), None) => {
            let v = p.int()?;
            if !(0..=100).contains(&v) {
                return Err(p.err(format!("percent {v} out of range 0-100")));
            }
            v as f64
        }
        (None, Some(f)) => {
            f.only(&["numerator", "denominator"])?;
            let num = f.required("numerator")?.int()?;
            let den = match f.get("denominator")? {
                Some(d) => d.int()?,
                None => 100,
            };
            if den <= 0 || num < 0 || num > den {
                return Err(f.err(format!(
                    "fraction {num}/{den}: need 0 <= numerator <= denominator, denominator > 0"
                )));
            }
            num as f64 * 100.0 / den as f64
        }
        (None, None) => 100.0,
    };
    Ok(Mirror {
        service,
        port,
        subset: None,
        percent,
    })
}

fn timeouts(node: &Node<'_>) -> FieldResult<Timeouts> {
    node.only(&["request", "backendRequest"])?;
    let parse = |key: &str| -> FieldResult<Option<Duration>> {
        match node.get(key)? {
            None => Ok(None),
            Some(n) => {
                let s = n.str()?;
                let d = parse_duration(s).ok_or_else(|| {
                    n.err(format!(
                        "invalid duration {s:?} (expected e.g. 500ms, 10s, 1m30s)"
                    ))
                })?;
                // `0s` disables the timeout.
                Ok((!d.is_zero()).then_some(d))
            }
        }
    };
    let t = Timeouts {
        request: parse("request")?,
        backend_request: parse("backendRequest")?,
    };
    if let (Some(req), Some(backend)) = (t.request, t.backend_request) {
        if backend > req {
            let n = node.required("backendRequest")?;
            return Err(n.err("must not be longer than timeouts.request"));
        }
    }
    Ok(t)
}

/// The Gateway API's `Duration`: 1-4 groups of 1-5 digits with `h`, `m`, `s` or `ms`.
pub(crate) fn parse_duration(s: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    let mut rest = s;
    let mut groups = 0;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(n), 2)
        } else if rest.starts_with('h') {
            (Duration::from_secs(n * 3600), 1)
        } else if rest.starts_with('m') {
            (Duration::from_secs(n * 60), 1)
        } else if rest.starts_with('s') {
            (Duration::from_secs(n), 1)
        } else {
            return None;
        };
        total += unit;
        rest = &rest[len..];
        groups += 1;
    }
    (1..=4).contains(&groups).then_some(total)
}
