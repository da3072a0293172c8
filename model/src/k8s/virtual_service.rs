//! `networking.istio.io` `VirtualService` (`v1`, `v1beta1`, `v1alpha3`) for waypoint (mesh)
//! and ingress gateway traffic, translated into the same rule types as HTTPRoute
//! ([`crate::model::RouteRule`]).
//!
//! Understood: `hosts` (short names resolved against the VirtualService's namespace as
//! `<name>.<ns>.svc.cluster.local`, FQDNs and `*`/`*.suffix` kept, lower-cased), `gateways`
//! (the VirtualService applies to waypoint traffic when it is empty or names `mesh`, and to
//! the traffic of each ingress Gateway it names: `<namespace>/<name>`, a bare `<name>` in the
//! VirtualService's namespace, or Istio's deprecated `<name>.<namespace>[.svc...]`; kept in
//! [`VirtualService::gateways`]), `exportTo` (accepted; visibility is not enforced: every
//! namespace sees every VirtualService, Istio's default), and `http[]` with `name`,
//! `match[]` (`uri`, `method`, `authority`, `headers`, `queryParams` as
//! `exact`/`prefix`/`regex`, `withoutHeaders`, `ignoreUriCase`, `port`, `sourceLabels`,
//! `sourceNamespace`, `gateways`: `mesh` or one of the VirtualService's own Gateways, the
//! match then applies to that traffic only; any other Gateway is refused), `route[]`
//! (destination `host`/`subset`/`port.number`, `weight`, per-destination `headers`), `redirect`,
//! `rewrite` (`uri`, `authority`), `directResponse`, `timeout`, `retries`, `fault`, `headers`,
//! `mirror`/`mirrorPercentage`/`mirrors[]`. Everything else (`tcp`, `tls`, `delegate`,
//! `corsPolicy`, `uriRegexRewrite`, ...) is refused with a named error, as are unknown
//! fields. Regular expressions are compiled with the same size limit as HTTPRoute's
//! (RELIABILITY 34).
//!
//! A destination host becomes a Service key: `name` → (VS namespace, name), `name.ns`,
//! `name.ns.svc` and `name.ns.svc.cluster.local` → (ns, name). Any other host becomes a key
//! with an empty namespace that no Service has, so a request routed there is answered 500
//! `NC`. The host is kept as written ([`BackendRef::host`]): for a request to a ServiceEntry
//! (an egress waypoint), a destination that is one of the entry's hosts is the entry itself
//! ([`crate::route::backend_target`]). A destination without `port` goes to the port the
//! request was for (port 0 in the model; from an ingress listener: the Service's port when
//! it has one only, else the listener's).

use std::time::Duration;

use bytes::Bytes;

use super::route::{bounded, header_modifier_map, match_path, object_name, pattern};
use super::yaml::{FieldResult, Node};
use super::{dns_label, dns_subdomain, Meta};
use crate::model::{
    service_name, AbortStatus, BackendRef, DirectResponse, Fault, FaultAbort, FaultDelay, Filters,
    HeaderMatch, Mirror, NamespacedName, PathMatch, PathModifier, QueryMatch, RequestRedirect,
    RetryOn, RetryPolicy, RouteMatch, RouteRule, Timeouts, UrlRewrite, ValueMatch, VirtualService,
    VsGateway, CLUSTER_DOMAIN,
};
use crate::route::BackendKind;

const MAX_HOSTS: usize = 64;
const MAX_GATEWAYS: usize = 64;
const MAX_HTTP: usize = 256;
const MAX_MATCHES: usize = 64;
const MAX_ROUTES: usize = 64;
const MAX_HEADER_MATCHES: usize = 32;
const MAX_MIRRORS: usize = 16;
/// Largest direct-response body (Envoy's default `max_direct_response_body_size_bytes`).
pub const MAX_DIRECT_BODY: usize = 4096;

pub(super) fn virtual_service(obj: &Node<'_>, meta: Meta) -> FieldResult<VirtualService> {
    let created = meta.created.clone();
    let spec = obj.required("spec")?;
    spec.only(&["hosts", "gateways", "http", "exportTo", "tcp", "tls"])?;
    for unsupported in ["tcp", "tls"] {
        if let Some(n) = spec.get(unsupported)? {
            if !n.items()?.is_empty() {
                return Err(n.err(format!("{unsupported} routes are not supported")));
            }
        }
    }
    let _export_to = spec.opt_string_list("exportTo")?;
    let mut hosts = Vec::new();
    for h in bounded(&spec, "hosts", MAX_HOSTS)? {
        hosts.push(vs_host(&h, &meta.namespace)?);
    }
    if hosts.is_empty() {
        return Err(spec.err("hosts: at least one host is required"));
    }
    let mut mesh = false;
    let mut gateways = Vec::new();
    let gateway_nodes = bounded(&spec, "gateways", MAX_GATEWAYS)?;
    for g in &gateway_nodes {
        match gateway_name(g, &meta.namespace)? {
            VsGateway::Mesh => mesh = true,
            VsGateway::Gateway(key) => {
                if !gateways.contains(&key) {
                    gateways.push(key);
                }
            }
        }
    }
    let mesh = mesh || gateway_nodes.is_empty();
    let bound = Bound {
        namespace: &meta.namespace,
        mesh,
        gateways: &gateways,
    };
    let mut regexes = 0;
    let mut rules = Vec::new();
    for node in bounded(&spec, "http", MAX_HTTP)? {
        rules.push(http_route(&node, &bound, &mut regexes)?);
    }
    Ok(VirtualService {
        name: meta.name,
        namespace: meta.namespace,
        created,
        hosts,
        mesh,
        gateways,
        rules,
    })
}

/// What a VirtualService is bound to, as its matches' `gateways` are checked against.
struct Bound<'a> {
    /// The VirtualService's namespace (a bare gateway name's).
    namespace: &'a str,
    mesh: bool,
    gateways: &'a [NamespacedName],
}

/// A `gateways` entry: `mesh`, `<namespace>/<name>`, a bare `<name>` (in the VirtualService's
/// namespace `ns`), or Istio's deprecated `<name>.<namespace>[.svc.cluster.local]`.
fn gateway_name(node: &Node<'_>, ns: &str) -> FieldResult<VsGateway> {
    let g = node.str()?;
    if g == "mesh" {
        return Ok(VsGateway::Mesh);
    }
    let key = match g.split_once('/') {
        Some((gw_ns, name)) => NamespacedName::new(gw_ns, name),
        None => match g.split_once('.') {
            Some((name, rest)) => {
                let gw_ns = rest.split('.').next().unwrap_or_default();
                NamespacedName::new(gw_ns, name)
            }
            None => NamespacedName::new(ns, g),
        },
    };
    if !dns_label(&key.namespace) || !dns_subdomain(&key.name) {
        return Err(node.err(format!(
            "invalid gateway {g:?} (expected mesh, <namespace>/<name> or <name>)"
        )));
    }
    Ok(VsGateway::Gateway(key))
}

/// A `hosts` entry, lower-case: `*`, `*.suffix`, an FQDN, or a short name made an FQDN.
fn vs_host(node: &Node<'_>, ns: &str) -> FieldResult<String> {
    let h = node.str()?.to_ascii_lowercase();
    if h == "*" {
        return Ok(h);
    }
    let bare = h.strip_prefix("*.").unwrap_or(&h);
    if !dns_subdomain(bare) {
        return Err(node.err(format!("invalid host {h:?}")));
    }
    if h.starts_with('*') || h.contains('.') {
        Ok(h)
    } else {
        Ok(format!("{h}.{ns}.svc.{CLUSTER_DOMAIN}"))
    }
}

/// A destination host → the Service key it names (see the module docs) and the host,
/// lower-case.
fn destination_service(node: &Node<'_>, vs_ns: &str) -> FieldResult<(NamespacedName, String)> {
    let host = node.str()?.to_ascii_lowercase();
    if !dns_subdomain(&host) {
        return Err(node.err(format!("invalid destination host {host:?}")));
    }
    let key = match service_name(vs_ns, &host) {
        Some((ns, name)) if dns_label(ns) => NamespacedName::new(ns, name),
        _ => NamespacedName::new("", &host),
    };
    Ok((key, host))
}

/// A destination: the Service key, the host as written (lower-case), port and subset.
struct Destination {
    service: NamespacedName,
    host: String,
    port: u16,
    subset: Option<String>,
}

fn http_route(node: &Node<'_>, bound: &Bound<'_>, regexes: &mut usize) -> FieldResult<RouteRule> {
    let ns = bound.namespace;
    node.only(&[
        "name",
        "match",
        "route",
        "redirect",
        "directResponse",
        "rewrite",
        "timeout",
        "retries",
        "fault",
        "mirror",
        "mirrorPercentage",
        "mirrors",
        "headers",
    ])?;
    let name = node.opt_str("name")?.map(str::to_string);
    let mut matches = Vec::new();
    for m in bounded(node, "match", MAX_MATCHES)? {
        matches.push(http_match(&m, bound, regexes)?);
    }
    if matches.is_empty() {
        // No match: every request (Istio's catch-all), as a plain "/" prefix.
        matches.push(RouteMatch {
            path: PathMatch::StringPrefix("/".to_string()),
            ..RouteMatch::default()
        });
    }
    let mut filters = Filters::default();
    let mut backends = Vec::new();
    let routes = bounded(node, "route", MAX_ROUTES)?;
    let any_weight = routes
        .iter()
        .map(|r| r.get("weight"))
        .collect::<FieldResult<Vec<_>>>()?
        .iter()
        .any(Option::is_some);
    for r in &routes {
        backends.push(destination(r, ns, any_weight)?);
    }
    let (redirect, direct) = (node.get("redirect")?, node.get("directResponse")?);
    let actions = [!backends.is_empty(), redirect.is_some(), direct.is_some()];
    if actions.iter().filter(|a| **a).count() != 1 {
        return Err(node.err("exactly one of route, redirect or directResponse is required"));
    }
    if let Some(r) = redirect {
        filters.redirect = Some(vs_redirect(&r)?);
    }
    if let Some(d) = direct {
        filters.direct_response = Some(direct_response(&d)?);
    }
    if let Some(rw) = node.get("rewrite")? {
        if filters.redirect.is_some() {
            return Err(rw.err("rewrite cannot be used together with redirect"));
        }
        filters.url_rewrite = Some(vs_rewrite(&rw)?);
    }
    if let Some(h) = node.get("headers")? {
        let (request, response) = headers(&h)?;
        filters.request_headers = request;
        filters.response_headers = response;
    }
    filters.mirrors = mirrors(node, ns)?;
    let timeouts = Timeouts {
        request: node
            .get("timeout")?
            .map(|t| duration(&t))
            .transpose()?
            .filter(|d| !d.is_zero()),
        backend_request: None,
    };
    let retries = node.get("retries")?.map(|r| retries(&r)).transpose()?;
    let fault = node.get("fault")?.map(|f| fault(&f)).transpose()?;
    Ok(RouteRule {
        name,
        matches,
        filters,
        backends,
        timeouts,
        retries,
        fault,
    })
}

fn http_match(node: &Node<'_>, bound: &Bound<'_>, regexes: &mut usize) -> FieldResult<RouteMatch> {
    node.only(&[
        "name",
        "uri",
        "method",
        "authority",
        "headers",
        "queryParams",
        "withoutHeaders",
        "ignoreUriCase",
        "port",
        "sourceLabels",
        "sourceNamespace",
        "gateways",
        "scheme",
        "statPrefix",
    ])?;
    let gateways = match_gateways(node, bound)?;
    if let Some(s) = node.get("scheme")? {
        return Err(s.err("scheme matches are not supported"));
    }
    let ignore_uri_case = node.opt_bool("ignoreUriCase")?.unwrap_or(false);
    let mut m = RouteMatch {
        path: PathMatch::StringPrefix("/".to_string()),
        ignore_uri_case,
        gateways,
        ..RouteMatch::default()
    };
    if let Some(uri) = node.get("uri")? {
        let (kind, value_node) = string_match_parts(&uri)?;
        let value = value_node.str()?;
        let lower = |v: String| {
            if ignore_uri_case {
                v.to_ascii_lowercase()
            } else {
                v
            }
        };
        m.path = match kind {
            "exact" => PathMatch::Exact(lower(match_path(&value_node, value)?)),
            "prefix" => {
                if !value.starts_with('/') {
                    return Err(value_node.err(format!("uri prefix {value:?} must start with /")));
                }
                PathMatch::StringPrefix(lower(value.to_string()))
            }
            _ => {
                let source = if ignore_uri_case {
                    format!("(?i:{value})")
                } else {
                    value.to_string()
                };
                PathMatch::RegularExpression(pattern(&value_node, &source, regexes)?)
            }
        };
    }
    if let Some(method) = node.get("method")? {
        let v = string_match(&method, regexes)?;
        match v {
            ValueMatch::Exact(s) => m.method = Some(s),
            other => m.method_match = Some(other),
        }
    }
    if let Some(a) = node.get("authority")? {
        m.authority = Some(string_match(&a, regexes)?);
    }
    m.headers = header_matches(node, "headers", regexes)?;
    m.without_headers = header_matches(node, "withoutHeaders", regexes)?;
    if let Some(q) = node.get("queryParams")? {
        for (name, v) in q.entries()? {
            if name.is_empty() || name.len() > 256 {
                return Err(v.err("query parameter names must be 1-256 characters"));
            }
            m.query_params.push(QueryMatch {
                name: name.to_string(),
                value: string_match(&v, regexes)?,
            });
        }
    }
    m.port = node.get("port")?.map(|p| p.port()).transpose()?;
    m.source_labels = node.opt_string_map("sourceLabels")?;
    if let Some(ns) = node.get("sourceNamespace")? {
        let s = ns.str()?;
        if !dns_label(s) {
            return Err(ns.err(format!("invalid namespace {s:?}")));
        }
        m.source_namespace = Some(s.to_string());
    }
    Ok(m)
}

/// A match's `gateways`: each a Gateway the VirtualService is bound to, or `mesh` (taken
/// as always: a match for mesh traffic in a VirtualService that is not never applies, as
/// in Istio); another Gateway is refused.
fn match_gateways(node: &Node<'_>, bound: &Bound<'_>) -> FieldResult<Vec<VsGateway>> {
    let mut out = Vec::new();
    for g in bounded(node, "gateways", MAX_GATEWAYS)? {
        let gateway = gateway_name(&g, bound.namespace)?;
        if let VsGateway::Gateway(key) = &gateway {
            if !bound.gateways.contains(key) {
                let mut of = bound
                    .gateways
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>();
                if bound.mesh {
                    of.insert(0, "mesh".to_string());
                }
                return Err(g.err(format!(
                    "gateway {key} is not one of the VirtualService's gateways ({})",
                    of.join(", ")
                )));
            }
        }
        if !out.contains(&gateway) {
            out.push(gateway);
        }
    }
    Ok(out)
}

/// `{exact|prefix|regex: value}`: exactly one of them.
fn string_match_parts<'a>(node: &Node<'a>) -> FieldResult<(&'static str, Node<'a>)> {
    node.only(&["exact", "prefix", "regex"])?;
    let mut found = None;
    for kind in ["exact", "prefix", "regex"] {
        if let Some(v) = node.get(kind)? {
            if found.is_some() {
                return Err(node.err("exactly one of exact, prefix or regex is allowed"));
            }
            found = Some((kind, v));
        }
    }
    found.ok_or_else(|| node.err("one of exact, prefix or regex is required"))
}

fn string_match(node: &Node<'_>, regexes: &mut usize) -> FieldResult<ValueMatch> {
    let (kind, value_node) = string_match_parts(node)?;
    let value = value_node.str()?;
    if value.len() > 4096 {
        return Err(value_node.err("longer than 4096 characters"));
    }
    Ok(match kind {
        "exact" => ValueMatch::Exact(value.to_string()),
        "prefix" => ValueMatch::Prefix(value.to_string()),
        _ => ValueMatch::RegularExpression(pattern(&value_node, value, regexes)?),
    })
}

fn header_matches(
    node: &Node<'_>,
    key: &str,
    regexes: &mut usize,
) -> FieldResult<Vec<HeaderMatch>> {
    let Some(h) = node.get(key)? else {
        return Ok(Vec::new());
    };
    let entries = h.entries()?;
    if entries.len() > MAX_HEADER_MATCHES {
        return Err(h.err(format!("at most {MAX_HEADER_MATCHES} headers allowed")));
    }
    let mut out = Vec::new();
    for (name, v) in entries {
        let name = http::HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| v.err(format!("invalid header name {name:?}")))?;
        // `{}` (no value) matches the header's presence.
        let value = if v.entries()?.is_empty() {
            ValueMatch::Prefix(String::new())
        } else {
            string_match(&v, regexes)?
        };
        out.push(HeaderMatch { name, value });
    }
    Ok(out)
}

/// `{host, subset, port: {number}}`.
fn destination_parts(node: &Node<'_>, ns: &str) -> FieldResult<Destination> {
    node.only(&["host", "subset", "port"])?;
    let (service, host) = destination_service(&node.required("host")?, ns)?;
    let port = match node.get("port")? {
        None => 0,
        Some(p) => {
            p.only(&["number"])?;
            p.required("number")?.port()?
        }
    };
    let subset = node.get("subset")?.map(|s| object_name(&s)).transpose()?;
    Ok(Destination {
        service,
        host,
        port,
        subset,
    })
}

fn destination(node: &Node<'_>, ns: &str, any_weight: bool) -> FieldResult<BackendRef> {
    node.only(&["destination", "weight", "headers"])?;
    let Destination {
        service,
        host,
        port,
        subset,
    } = destination_parts(&node.required("destination")?, ns)?;
    let weight = match node.get("weight")? {
        Some(w) => {
            let v = w.int()?;
            if !(0..=i64::from(u32::MAX)).contains(&v) {
                return Err(w.err(format!("weight {v} out of range")));
            }
            v as u32
        }
        // Only weights given: the others get nothing; none given: equal shares.
        None if any_weight => 0,
        None => 1,
    };
    let mut filters = Filters::default();
    if let Some(h) = node.get("headers")? {
        let (request, response) = headers(&h)?;
        filters.request_headers = request;
        filters.response_headers = response;
    }
    Ok(BackendRef {
        kind: BackendKind::Service,
        service,
        host: Some(host),
        port,
        subset,
        weight,
        filters,
    })
}

/// `headers: {request: {set, add, remove}, response: {...}}`.
fn headers(
    node: &Node<'_>,
) -> FieldResult<(
    Option<crate::model::HeaderModifier>,
    Option<crate::model::HeaderModifier>,
)> {
    node.only(&["request", "response"])?;
    let request = node
        .get("request")?
        .map(|n| header_modifier_map(&n))
        .transpose()?;
    let response = node
        .get("response")?
        .map(|n| header_modifier_map(&n))
        .transpose()?;
    Ok((request, response))
}

fn vs_redirect(node: &Node<'_>) -> FieldResult<RequestRedirect> {
    node.only(&["uri", "authority", "port", "scheme", "redirectCode"])?;
    let scheme = node
        .get("scheme")?
        .map(|n| super::route::scheme(&n))
        .transpose()?;
    let status_code = match node.get("redirectCode")? {
        None => 301,
        Some(n) => match n.int()? {
            c @ (301 | 302 | 303 | 307 | 308) => c as u16,
            other => {
                return Err(n.err(format!(
                    "redirect code {other} (expected 301, 302, 303, 307 or 308)"
                )))
            }
        },
    };
    let path = match node.get("uri")? {
        Some(u) => Some(PathModifier::ReplaceFullPath(match_path(&u, u.str()?)?)),
        None => None,
    };
    Ok(RequestRedirect {
        scheme,
        hostname: node.get("authority")?.map(|a| authority(&a)).transpose()?,
        port: node.get("port")?.map(|p| p.port()).transpose()?,
        path,
        status_code,
    })
}

fn authority(node: &Node<'_>) -> FieldResult<String> {
    let a = node.str()?;
    if a.is_empty() || http::uri::Authority::try_from(a).is_err() {
        return Err(node.err(format!("invalid authority {a:?}")));
    }
    Ok(a.to_string())
}

fn vs_rewrite(node: &Node<'_>) -> FieldResult<UrlRewrite> {
    node.only(&["uri", "authority", "uriRegexRewrite"])?;
    if let Some(r) = node.get("uriRegexRewrite")? {
        return Err(r.err("uriRegexRewrite is not supported"));
    }
    let path = match node.get("uri")? {
        Some(u) => {
            let v = u.str()?;
            if v.contains(['?', '#']) {
                return Err(u.err("rewrite uri must not contain '?' or '#'"));
            }
            Some(PathModifier::ReplaceMatchedPrefixOrPath(v.to_string()))
        }
        None => None,
    };
    Ok(UrlRewrite {
        hostname: node.get("authority")?.map(|a| authority(&a)).transpose()?,
        path,
    })
}

fn direct_response(node: &Node<'_>) -> FieldResult<DirectResponse> {
    node.only(&["status", "body"])?;
    let status_node = node.required("status")?;
    let status = status_node.int()?;
    if !(200..=599).contains(&status) {
        return Err(status_node.err(format!("status {status} out of range 200-599")));
    }
    let body = match node.get("body")? {
        None => Bytes::new(),
        Some(b) => {
            b.only(&["string", "bytes"])?;
            match (b.get("string")?, b.get("bytes")?) {
                (Some(s), None) => Bytes::copy_from_slice(s.str()?.as_bytes()),
                (None, Some(raw)) => {
                    use base64::Engine;
                    let decoded = base64::engine::general_purpose::STANDARD
                        .decode(raw.str()?)
                        .map_err(|e| raw.err(format!("invalid base64: {e}")))?;
                    Bytes::from(decoded)
                }
                _ => return Err(b.err("exactly one of string or bytes is required")),
            }
        }
    };
    if body.len() > MAX_DIRECT_BODY {
        return Err(node.err(format!("body longer than {MAX_DIRECT_BODY} bytes")));
    }
    Ok(DirectResponse {
        status: status as u16,
        body,
    })
}

/// `{value: 0-100}`.
fn percentage(node: &Node<'_>) -> FieldResult<f64> {
    node.only(&["value"])?;
    let v = node.required("value")?;
    let p = v.float()?;
    if !(0.0..=100.0).contains(&p) {
        return Err(v.err(format!("percentage {p} out of range 0-100")));
    }
    Ok(p)
}

fn mirrors(node: &Node<'_>, ns: &str) -> FieldResult<Vec<Mirror>> {
    let mut out = Vec::new();
    if let Some(m) = node.get("mirror")? {
        out.push(mirror(&m, node.get("mirrorPercentage")?, ns)?);
    } else if let Some(p) = node.get("mirrorPercentage")? {
        return Err(p.err("mirrorPercentage needs mirror"));
    }
    for m in bounded(node, "mirrors", MAX_MIRRORS)? {
        m.only(&["destination", "percentage"])?;
        out.push(mirror(
            &m.required("destination")?,
            m.get("percentage")?,
            ns,
        )?);
    }
    Ok(out)
}

/// One mirror: its destination, and the share of requests it gets (default all).
fn mirror(destination: &Node<'_>, share: Option<Node<'_>>, ns: &str) -> FieldResult<Mirror> {
    let Destination {
        service,
        port,
        subset,
        ..
    } = destination_parts(destination, ns)?;
    let percent = share.map(|p| percentage(&p)).transpose()?.unwrap_or(100.0);
    Ok(Mirror {
        service,
        port: (port != 0).then_some(port),
        subset,
        percent,
    })
}

/// A protobuf-JSON duration (`1.5s`, `300ms`, `2m`, `1h`).
fn duration(node: &Node<'_>) -> FieldResult<Duration> {
    let s = node.str()?;
    parse_proto_duration(s).ok_or_else(|| {
        node.err(format!(
            "invalid duration {s:?} (expected e.g. 300ms, 1.5s, 2m, 1h)"
        ))
    })
}

/// `N[.N](h|m|s|ms|us|ns)`, at most 10 days.
pub(crate) fn parse_proto_duration(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.')?;
    let (num, unit) = s.split_at(split);
    if num.is_empty() || num.len() > 20 {
        return None;
    }
    let n: f64 = num.parse().ok()?;
    let secs = match unit {
        "h" => n * 3600.0,
        "m" => n * 60.0,
        "s" => n,
        "ms" => n / 1e3,
        "us" => n / 1e6,
        "ns" => n / 1e9,
        _ => return None,
    };
    (secs.is_finite() && (0.0..=864_000.0).contains(&secs)).then(|| Duration::from_secs_f64(secs))
}

fn retries(node: &Node<'_>) -> FieldResult<RetryPolicy> {
    node.only(&[
        "attempts",
        "perTryTimeout",
        "retryOn",
        "retryRemoteLocalities",
    ])?;
    let attempts = match node.get("attempts")? {
        None => 2,
        Some(a) => {
            let v = a.int()?;
            if !(0..=100).contains(&v) {
                return Err(a.err(format!("attempts {v} out of range 0-100")));
            }
            v as u32
        }
    };
    let per_try_timeout = node
        .get("perTryTimeout")?
        .map(|t| duration(&t))
        .transpose()?
        .filter(|d| !d.is_zero());
    let retry_on = match node.get("retryOn")? {
        None => RetryPolicy::default().retry_on,
        Some(r) => retry_on(&r)?,
    };
    Ok(RetryPolicy {
        attempts,
        per_try_timeout,
        retry_on,
    })
}

/// A comma-separated `retryOn` list.
fn retry_on(node: &Node<'_>) -> FieldResult<RetryOn> {
    let mut on = RetryOn::default();
    for item in node
        .str()?
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
    {
        match item {
            "5xx" => on.five_xx = true,
            "gateway-error" => on.gateway_error = true,
            "reset" => on.reset = true,
            "connect-failure" => on.connect_failure = true,
            "retriable-4xx" => on.retriable_4xx = true,
            "refused-stream" => on.refused_stream = true,
            // The codes come as numbers in the same list (Istio's translation).
            "retriable-status-codes" => {}
            "cancelled" => on.grpc_statuses.push(1),
            "deadline-exceeded" => on.grpc_statuses.push(4),
            "resource-exhausted" => on.grpc_statuses.push(8),
            "internal" => on.grpc_statuses.push(13),
            "unavailable" => on.grpc_statuses.push(14),
            code => match code.parse::<u16>() {
                Ok(c) if (100..=599).contains(&c) => on.status_codes.push(c),
                _ => return Err(node.err(format!("unknown retryOn condition {code:?}"))),
            },
        }
    }
    Ok(on)
}

fn fault(node: &Node<'_>) -> FieldResult<Fault> {
    node.only(&["delay", "abort"])?;
    let delay = match node.get("delay")? {
        None => None,
        Some(d) => {
            d.only(&["fixedDelay", "percentage", "percent", "exponentialDelay"])?;
            if let Some(e) = d.get("exponentialDelay")? {
                return Err(e.err("exponentialDelay is not supported"));
            }
            Some(FaultDelay {
                fixed_delay: duration(&d.required("fixedDelay")?)?,
                percent: fault_percent(&d)?,
            })
        }
    };
    let abort = match node.get("abort")? {
        None => None,
        Some(a) => {
            a.only(&["httpStatus", "grpcStatus", "http2Error", "percentage"])?;
            if let Some(e) = a.get("http2Error")? {
                return Err(e.err("http2Error is not supported"));
            }
            let status = match (a.get("httpStatus")?, a.get("grpcStatus")?) {
                (Some(h), None) => {
                    let v = h.int()?;
                    if !(200..=599).contains(&v) {
                        return Err(h.err(format!("httpStatus {v} out of range 200-599")));
                    }
                    AbortStatus::Http(v as u16)
                }
                (None, Some(g)) => AbortStatus::Grpc(grpc_code(&g)?),
                _ => return Err(a.err("exactly one of httpStatus or grpcStatus is required")),
            };
            Some(FaultAbort {
                status,
                percent: fault_percent(&a)?,
            })
        }
    };
    if delay.is_none() && abort.is_none() {
        return Err(node.err("one of delay or abort is required"));
    }
    Ok(Fault { delay, abort })
}

/// `percentage.value`, else the deprecated integer `percent`, else 100.
fn fault_percent(node: &Node<'_>) -> FieldResult<f64> {
    if let Some(p) = node.get("percentage")? {
        return percentage(&p);
    }
    if let Some(p) = node.get("percent")? {
        let v = p.int()?;
        if !(0..=100).contains(&v) {
            return Err(p.err(format!("percent {v} out of range 0-100")));
        }
        return Ok(v as f64);
    }
    Ok(100.0)
}

/// A gRPC status by name (`UNAVAILABLE`, as Istio documents it) or number.
fn grpc_code(node: &Node<'_>) -> FieldResult<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    let s = match node.str() {
        Ok(s) => s.to_string(),
        Err(_) => node.int()?.to_string(),
    };
    if let Some(i) = NAMES.iter().position(|n| *n == s) {
        return Ok(i as u32);
    }
    match s.parse::<u32>() {
        Ok(n) if (n as usize) < NAMES.len() => Ok(n),
        _ => Err(node.err(format!("unknown gRPC status {s:?}"))),
    }
}
