//! Phase 4, route: the HTTPRoute, GRPCRoute or VirtualService rule for the request
//! ([`mesh_model::route::route_to`]) to a Service or, through an egress waypoint, a
//! ServiceEntry ([`route_target`]); at an ingress listener, the rule of the routes attached
//! to it for the request's host, else of the VirtualServices bound to its Gateway
//! ([`mesh_model::route::route_listener`]; nothing for the host → `404 NR`). None applies
//! → the Service (or entry) itself; one applies but no rule matches → `404 NR`; a redirect
//! or a VirtualService `directResponse` is answered here (nothing sent upstream); otherwise
//! a backend is picked by weight for this
//! request (a Service, or the request's own ServiceEntry:
//! [`mesh_model::route::backend_target`]), request-header modifiers and rewrites are
//! applied, and the rest of the rule is kept for later phases in the [`RoutePlan`]:
//! response-header modifiers, timeouts, the retry policy (Istio's default when the rule has
//! none), fault and mirrors.

use std::net::SocketAddr;

use http::header::{self, HeaderName, HeaderValue};
use http::StatusCode;
use mesh_model::model::{
    hostname_rank, Fault, Gateway, HeaderModifier, Listener, ListenerProtocol, Mirror, Model,
    NamespacedName, RetryPolicy, Timeouts,
};
use mesh_model::route::{
    self, modify_headers, modify_path, pick_backend, redirect_location, BackendTarget,
    NormalizedPath, RouteOwner, RouteRequest, RouteTarget, Routing, Selected,
};

use super::reply::Shape;
use super::{LocalReply, RequestContext};
use crate::proxy::ConnCtx;
use crate::target::{Resolved, Target};
use crate::telemetry::ResponseFlag;

/// Set on a request whose path a `URLRewrite` changed: the path before (as Envoy does).
pub const X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");

/// What routing decided for one request.
#[derive(Clone, Debug, PartialEq)]
pub struct RoutePlan {
    /// Where the request goes: the backend the rule picked, else the tunnel's target.
    pub backend: Target,
    /// The DestinationRule subset the rule named for that backend.
    pub subset: Option<String>,
    /// The request's Service port (a VirtualService destination or mirror without a port
    /// uses it).
    pub service_port: u16,
    /// Path and query as they go upstream (rewritten or not).
    pub path: String,
    /// Authority as it goes upstream (rewritten or not).
    pub authority: String,
    /// The rule's and then the backend's response-header modifiers.
    pub response_mods: Vec<HeaderModifier>,
    pub timeouts: Timeouts,
    pub retry_policy: RetryPolicy,
    pub fault: Option<Fault>,
    pub mirrors: Vec<Mirror>,
}

/// What routing sees of `target` in `model` (`resolved`: the target as looked up there): a
/// Service port, a ServiceEntry port (with the host of the VIP the connection named, when it
/// is one of the entry's), or `None`: nothing to route (a pod addressed directly, or a
/// destination gone from the model), the request goes to the target itself.
pub fn route_target<'m>(
    model: &'m Model,
    target: &Target,
    resolved: Option<&Resolved<'m>>,
) -> Option<RouteTarget<'m>> {
    match target {
        Target::Service { .. } => {
            let (svc, port) = resolved.and_then(|r| r.service.zip(r.port))?;
            Some(RouteTarget::Service { svc, port })
        }
        Target::ServiceEntry { entry, port, addr } => {
            let entry = model.service_entry(&entry.namespace, &entry.name)?;
            let port = entry.port(*port)?;
            let host = model
                .service_entry_host_at(addr.ip())
                .filter(|h| entry.hosts.iter().any(|x| x.eq_ignore_ascii_case(h)));
            Some(RouteTarget::ServiceEntry { entry, port, host })
        }
        // A pod addressed directly, or an ingress listener (routed by its own routes).
        Target::Workload { .. } | Target::Listener { .. } => None,
    }
}

/// The HTTP or HTTPS listener of `gw` on `port` that takes requests for `host` (lower case,
/// no port): the one whose hostname is `host`, else the longest wildcard covering it, else
/// one without a hostname (Gateway API listener precedence).
pub fn listener_for<'g>(gw: &'g Gateway, port: u16, host: &str) -> Option<&'g Listener> {
    gw.listeners
        .iter()
        .filter(|l| l.port == port)
        .filter(|l| matches!(l.protocol, ListenerProtocol::Http | ListenerProtocol::Https))
        .filter_map(|l| Some((hostname_rank(l.hostname.as_deref(), host)?, l)))
        .max_by_key(|(rank, _)| *rank)
        .map(|(_, l)| l)
}

/// The phase: the plan for the request `rq` to `ctx`'s target (as `resolved` in `model`),
/// its headers edited by the rule; `roll` picks among weighted backends.
pub fn run(
    model: &Model,
    waypoint: &NamespacedName,
    ctx: &ConnCtx,
    rq: &mut RequestContext,
    resolved: Option<&Resolved<'_>>,
    normalized: &NormalizedPath,
    roll: u64,
) -> Result<RoutePlan, LocalReply> {
    let service_port = resolved
        .and_then(|r| r.port)
        .map_or(ctx.authority.port(), |p| p.port);
    let mut plan = RoutePlan {
        backend: ctx.target.clone(),
        subset: None,
        service_port,
        path: normalized.path_and_query(),
        authority: rq.authority.clone(),
        response_mods: Vec::new(),
        timeouts: Timeouts::default(),
        // Istio gives every HTTP route a retry policy; a rule's own replaces it.
        retry_policy: RetryPolicy::default(),
        fault: None,
        mirrors: Vec::new(),
    };
    let request = RouteRequest {
        host: &rq.authority,
        method: rq.parts.method.as_str(),
        path: &normalized.path,
        query: normalized.query.as_deref(),
        headers: &rq.parts.headers,
        source: rq.labels.src_pod.as_deref(),
    };
    let no_route = |why: String| {
        LocalReply::new(
            StatusCode::NOT_FOUND,
            "route not found",
            Some(ResponseFlag::NoRoute),
            why,
        )
    };
    // An ingress listener: its attached routes for the host, else the VirtualServices bound
    // to its Gateway for the host, decide (nothing matching: 404); anything else: the routes
    // of its Service or ServiceEntry, else the destination itself.
    let (sel, dest) = match &ctx.target {
        Target::Listener { gateway, port } => {
            let host = route::host_without_port(&rq.authority).to_ascii_lowercase();
            let Some(listener) = model
                .gateways
                .get(gateway)
                .and_then(|gw| listener_for(gw, *port, &host))
            else {
                return Err(no_route(format!(
                    "no listener of {gateway} on port {port} takes host {host}"
                )));
            };
            match route::route_listener(model, gateway, listener, &request) {
                Routing::Matched(sel) => (sel, None),
                Routing::NoMatch => {
                    return Err(no_route(format!(
                        "no route or VirtualService rule for host {host} at listener {} matches",
                        listener.name
                    )))
                }
                Routing::Default => {
                    return Err(no_route(format!(
                        "no route attached to listener {} nor VirtualService bound to \
                         {gateway} is for host {host}",
                        listener.name
                    )))
                }
            }
        }
        _ => {
            let Some(dest) = route_target(model, &ctx.target, resolved) else {
                return Ok(plan);
            };
            match route::route_to(model, waypoint, &dest, &request) {
                Routing::Default => return Ok(plan),
                Routing::NoMatch => {
                    return Err(no_route(
                        "no HTTPRoute or VirtualService rule matches".to_string(),
                    ))
                }
                Routing::Matched(sel) => (sel, Some(dest)),
            }
        }
    };
    let rule = sel.rule;
    rq.log.route = Some(rule_label(&sel));
    if let Some(direct) = &rule.filters.direct_response {
        // A direct response is sent as written, also to a gRPC client.
        return Err(LocalReply {
            status: StatusCode::from_u16(direct.status)
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            flag: None,
            body: direct.body.clone(),
            shape: Shape::Plain,
            reason: "direct response".to_string(),
            headers: Vec::new(),
            modifier: rule.filters.response_headers.clone().map(Box::new),
        });
    }
    if let Some(redirect) = &rule.filters.redirect {
        let location = redirect_location(
            redirect,
            &rq.authority,
            ctx.authority.port(),
            &normalized.path,
            normalized.query.as_deref(),
            sel.matched,
        );
        let status = StatusCode::from_u16(redirect.status_code).unwrap_or(StatusCode::FOUND);
        let mut reply = LocalReply::new(status, "", None, format!("redirect to {location}"));
        if let Ok(v) = HeaderValue::from_str(&location) {
            reply = reply.with_header(header::LOCATION, v);
        }
        return Err(reply);
    }
    let Some(chosen) = pick_backend(&rule.backends, roll) else {
        return Err(LocalReply::no_backend(
            "the rule has no backend with a weight above 0",
        ));
    };
    rq.log.backend = Some(format!("{}:{}", chosen.service, chosen.port));
    // VirtualService destinations may name any namespace (Istio allows it); a route's
    // backendRef in another namespace needs a ReferenceGrant there (Gateway API).
    if let RouteOwner::HttpRoute(r) = sel.route {
        if !model.backend_permitted(r, chosen) {
            return Err(LocalReply::no_backend(format!(
                "backendRef {} in another namespace: no ReferenceGrant there allows it",
                chosen.service
            )));
        }
    }
    // Port 0: a VirtualService destination (or ServiceEntry backendRef) without a port, the
    // request's own; from an ingress listener, the Service's port when it has only one (as
    // Istio), else the listener's.
    let backend_port = match chosen.port {
        0 if dest.is_none() => model
            .service_shared(&chosen.service)
            .and_then(|svc| match svc.ports.as_slice() {
                [only] => Some(only.port),
                _ => None,
            })
            .unwrap_or(service_port),
        0 => service_port,
        port => port,
    };
    let backend = match &dest {
        Some(dest) => route::backend_target(chosen, dest),
        // From an ingress listener: a Service, or a ServiceEntry (which is no request's own).
        None => match chosen.kind {
            route::BackendKind::Service => BackendTarget::Service(&chosen.service),
            route::BackendKind::ServiceEntry => BackendTarget::OtherEntry(&chosen.service),
        },
    };
    plan.backend = match backend {
        BackendTarget::Service(svc) => Target::Service {
            svc: svc.clone(),
            port: backend_port,
        },
        BackendTarget::OwnEntry => match &ctx.target {
            Target::ServiceEntry { entry, addr, .. } => Target::ServiceEntry {
                entry: entry.clone(),
                port: backend_port,
                addr: SocketAddr::new(addr.ip(), backend_port),
            },
            // Only a ServiceEntry target has an entry of its own.
            other => other.clone(),
        },
        BackendTarget::OtherEntry(entry) => {
            return Err(LocalReply::no_backend(format!(
                "ServiceEntry backend {entry}: only the entry the request is for can be one"
            )))
        }
    };
    rq.log.backend = Some(format!("{}:{backend_port}", plan.backend.rr_key()));
    plan.timeouts = rule.timeouts;
    if let Some(r) = &rule.retries {
        plan.retry_policy = r.clone();
    }
    plan.fault = rule.fault.clone();
    plan.subset = chosen.subset.clone();
    plan.mirrors = rule.filters.mirrors.clone();
    for filters in [&rule.filters, &chosen.filters] {
        if let Some(m) = &filters.request_headers {
            modify_headers(&mut rq.parts.headers, m);
        }
        if let Some(m) = &filters.response_headers {
            plan.response_mods.push(m.clone());
        }
    }
    // A `Host` the rule's header modifiers set is its authority for the upstream; the
    // header itself never goes on (the upstream request carries `plan.authority`).
    if let Some(host) = rq.parts.headers.remove(header::HOST) {
        if let Ok(host) = host.to_str() {
            plan.authority = host.to_string();
        }
    }
    if let Some(rewrite) = &rule.filters.url_rewrite {
        if let Some(host) = &rewrite.hostname {
            plan.authority = host.clone();
        }
        if let Some(modifier) = &rewrite.path {
            let new_path = modify_path(&normalized.path, sel.matched, modifier);
            if new_path != normalized.path {
                if let Ok(v) = HeaderValue::from_str(&normalized.path) {
                    rq.parts.headers.insert(X_ENVOY_ORIGINAL_PATH, v);
                }
            }
            plan.path = NormalizedPath {
                path: new_path,
                query: normalized.query.clone(),
            }
            .path_and_query();
        }
    }
    Ok(plan)
}

/// `ns/route/rule` for the access log (the rule's index when it has no name).
fn rule_label(sel: &Selected<'_>) -> String {
    let rule = sel
        .rule
        .name
        .clone()
        .unwrap_or_else(|| sel.rule_index.to_string());
    format!("{}/{}", sel.route.key(), rule)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{conn, entry_conn, model, request_context, waypoint, ENTRY};
    use mesh_model::route::normalize_path;

    const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - name: to-api
    matches: [{path: {type: PathPrefix, value: /api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {hostname: api.app, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v1}}
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-routed, value: api}]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-served-by, value: api}]}
    backendRefs: [{name: api, port: 80}]
  - name: moved
    matches: [{path: {type: Exact, value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {path: {type: ReplaceFullPath, replaceFullPath: /new}, statusCode: 301}}]
  - name: nowhere
    matches: [{path: {type: Exact, value: /zero}}]
    backendRefs: [{name: api, port: 80, weight: 0}]
  - name: foreign
    matches: [{path: {type: Exact, value: /foreign}}]
    backendRefs: [{name: api, namespace: other, port: 80}]
  - name: home
    matches: [{path: {type: Exact, value: /}}]
    backendRefs: [{name: web, port: 80}]
"#;

    fn plan(m: &Model, target: &str) -> (RequestContext, Result<RoutePlan, LocalReply>) {
        plan_to(m, &conn(), target)
    }

    /// [`plan`] for a tunnel `ctx`.
    fn plan_to(
        m: &Model,
        ctx: &ConnCtx,
        target: &str,
    ) -> (RequestContext, Result<RoutePlan, LocalReply>) {
        plan_request(m, ctx, request_context(false), target)
    }

    /// The route phase for the request `rq` (its target set to `target`) in tunnel `ctx`.
    fn plan_request(
        m: &Model,
        ctx: &ConnCtx,
        mut rq: RequestContext,
        target: &str,
    ) -> (RequestContext, Result<RoutePlan, LocalReply>) {
        rq.raw_target = target.to_string();
        let normalized = normalize_path(target).expect("path");
        let resolved = ctx.target.lookup(m, "cluster.local");
        let got = run(
            m,
            &waypoint(),
            ctx,
            &mut rq,
            resolved.as_ref(),
            &normalized,
            7,
        );
        (rq, got)
    }

    fn api() -> Target {
        Target::Service {
            svc: NamespacedName::new("app", "api"),
            port: 80,
        }
    }

    #[test]
    fn without_a_route_the_request_goes_to_its_service_with_the_default_retries() {
        let (rq, got) = plan(&model(&[]), "/a?b=1");
        let p = got.expect("default");
        assert_eq!(p.backend, conn().target);
        assert_eq!(
            (p.path.as_str(), p.authority.as_str()),
            ("/a?b=1", "web.app")
        );
        assert_eq!(p.retry_policy, RetryPolicy::default());
        assert_eq!(rq.log.route, None);
    }

    #[test]
    fn a_matched_rule_picks_the_backend_and_rewrites_the_request() {
        let (rq, got) = plan(&model(&[ROUTES]), "/api/items?q=1");
        let p = got.expect("routed");
        assert_eq!(p.backend, api());
        assert_eq!(p.path, "/v1/items?q=1");
        assert_eq!(p.authority, "api.app");
        assert_eq!(p.service_port, 80);
        assert_eq!(p.response_mods.len(), 1);
        let h = &rq.parts.headers;
        assert!(
            h.get("host").is_none(),
            "the upstream carries `p.authority`"
        );
        assert_eq!(h["x-routed"], "api");
        assert_eq!(h[X_ENVOY_ORIGINAL_PATH], "/api/items");
        assert_eq!(rq.log.route.as_deref(), Some("app/web/to-api"));
        assert_eq!(rq.log.backend.as_deref(), Some("app/api:80"));
    }

    #[test]
    fn unmatched_redirected_and_backendless_requests_are_answered_here() {
        let m = model(&[ROUTES]);
        let reply = |target: &str| plan(&m, target).1.expect_err("a local reply");
        let r = reply("/nothing");
        assert_eq!(
            (r.status.as_u16(), r.flag),
            (404, Some(ResponseFlag::NoRoute))
        );
        let r = reply("/old");
        assert_eq!((r.status.as_u16(), r.flag), (301, None));
        assert_eq!(r.headers[0].0, header::LOCATION);
        assert_eq!(r.headers[0].1, "http://web.app/new");
        let r = reply("/zero");
        assert_eq!(
            (r.status.as_u16(), r.flag),
            (500, Some(ResponseFlag::NoCluster))
        );
        let r = reply("/foreign");
        assert_eq!(
            (r.status.as_u16(), r.flag),
            (500, Some(ResponseFlag::NoCluster))
        );
        assert!(r.reason.contains("ReferenceGrant"), "{}", r.reason);
        assert!(plan(&m, "/").1.is_ok());
    }

    const EGRESS_ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: httpbin, namespace: app}
spec:
  parentRefs: [{group: networking.istio.io, kind: ServiceEntry, name: httpbin, port: 80}]
  rules:
  - name: decorate
    matches: [{path: {value: /get}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-egress, value: "1"}]}
    backendRefs: [{group: networking.istio.io, kind: ServiceEntry, name: httpbin}]
    timeouts: {request: 3s}
  - name: tls-port
    matches: [{path: {value: /tls}}]
    backendRefs: [{group: networking.istio.io, kind: ServiceEntry, name: httpbin, port: 443}]
  - name: to-service
    matches: [{path: {value: /api}}]
    backendRefs: [{name: api, port: 80}]
  - name: other-entry
    matches: [{path: {value: /other}}]
    backendRefs: [{group: networking.istio.io, kind: ServiceEntry, name: other}]
"#;

    fn entry_on(port: u16) -> Target {
        Target::ServiceEntry {
            entry: NamespacedName::new("app", "httpbin"),
            port,
            addr: std::net::SocketAddr::from(([240, 1, 0, 1], port)),
        }
    }

    #[test]
    fn a_route_on_a_service_entry_decorates_requests_to_its_own_endpoints() {
        let m = model(&[ENTRY, EGRESS_ROUTES]);
        let ctx = entry_conn();
        let (rq, got) = plan_to(&m, &ctx, "/get?a=1");
        let p = got.map_err(|r| r.reason).expect("routed");
        assert_eq!(
            p.backend, ctx.target,
            "the entry itself, as the tunnel named it"
        );
        assert_eq!(p.timeouts.request, Some(std::time::Duration::from_secs(3)));
        assert_eq!(p.path, "/get?a=1");
        assert_eq!(rq.parts.headers["x-egress"], "1");
        assert_eq!(rq.log.route.as_deref(), Some("app/httpbin/decorate"));
        assert_eq!(rq.log.backend.as_deref(), Some("app/httpbin:80"));
        // The entry on another of its ports; a Service; not another entry; no rule: 404.
        let (_, got) = plan_to(&m, &ctx, "/tls");
        assert_eq!(
            got.map(|p| p.backend).map_err(|r| r.reason),
            Ok(entry_on(443))
        );
        let (_, got) = plan_to(&m, &ctx, "/api");
        assert_eq!(got.map(|p| p.backend).map_err(|r| r.reason), Ok(api()));
        let r = plan_to(&m, &ctx, "/other").1.expect_err("no backend");
        assert_eq!(
            (r.status.as_u16(), r.flag),
            (500, Some(ResponseFlag::NoCluster))
        );
        assert!(r.reason.contains("app/other"), "{}", r.reason);
        let r = plan_to(&m, &ctx, "/nothing").1.expect_err("no rule");
        assert_eq!(
            (r.status.as_u16(), r.flag),
            (404, Some(ResponseFlag::NoRoute))
        );
        // Without routes the request goes to the entry with Istio's default retries.
        let (_, got) = plan_to(&model(&[ENTRY]), &ctx, "/get");
        let p = got.map_err(|r| r.reason).expect("default");
        assert_eq!(
            (p.backend, p.retry_policy),
            (ctx.target, RetryPolicy::default())
        );
    }

    #[test]
    fn a_virtual_service_for_an_entry_host_routes_to_the_entry() {
        let vs = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: client}
spec:
  hosts: [HTTPBIN.org]
  http:
  - name: to-entry
    match: [{uri: {prefix: /status}}]
    headers: {request: {set: {x-vs: "1"}}}
    retries: {attempts: 5, retryOn: 5xx}
    route: [{destination: {host: httpbin.org, port: {number: 443}}}]
  - name: to-service
    route: [{destination: {host: api.app.svc.cluster.local}}]
"#;
        let m = model(&[ENTRY, vs]);
        let ctx = entry_conn();
        let (rq, got) = plan_to(&m, &ctx, "/status/200");
        let p = got.map_err(|r| r.reason).expect("routed");
        assert_eq!(p.backend, entry_on(443));
        assert_eq!(p.retry_policy.attempts, 5);
        assert_eq!(rq.parts.headers["x-vs"], "1");
        assert_eq!(rq.log.route.as_deref(), Some("client/httpbin/to-entry"));
        // A destination without a port takes the request's (80), here on the Service `api`.
        let (_, got) = plan_to(&m, &ctx, "/x");
        assert_eq!(got.map(|p| p.backend).map_err(|r| r.reason), Ok(api()));
        // The VirtualService is for the entry's host, not for the Service `web`.
        let (_, got) = plan(&m, "/status/200");
        assert_eq!(
            got.map(|p| p.backend).map_err(|r| r.reason),
            Ok(conn().target)
        );
    }

    /// `edge/ingress`, an ingress Gateway with one HTTP listener on 8080 for every host
    /// (routes from every namespace), and `edge/other`; subsets `v1`/`v2` of `app/web`.
    const INGRESS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: edge}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: edge}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: other, namespace: edge}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 8080, protocol: HTTP}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: app}
spec:
  host: web
  subsets: [{name: v1, labels: {version: v1}}, {name: v2, labels: {version: v2}}]
"#;

    /// `ratings.example.com` and `*.wild.example` at `edge/ingress`: `x-version: v2` to
    /// `web` subset `v2`, `/api` to `api` (no port), the rest to `web` subset `v1`.
    const RATINGS: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ratings, namespace: app}
spec:
  hosts: [ratings.example.com, "*.wild.example"]
  gateways: [edge/ingress]
  http:
  - name: v2
    match: [{headers: {x-version: {exact: v2}}}]
    route: [{destination: {host: web, subset: v2, port: {number: 80}}}]
  - name: api
    match: [{uri: {prefix: /api}}]
    route: [{destination: {host: api.app.svc.cluster.local}}]
  - name: v1
    route: [{destination: {host: web, subset: v1, port: {number: 80}}}]
"#;

    /// A plain HTTP request for `host` to `target` (with `headers`) at `edge/ingress:8080`.
    fn at_ingress(
        m: &Model,
        host: &str,
        target: &str,
        headers: &[(&'static str, &'static str)],
    ) -> (RequestContext, Result<RoutePlan, LocalReply>) {
        let mut ctx = conn();
        ctx.peer_identity = None;
        ctx.authority = std::net::SocketAddr::from(([10, 0, 0, 200], 8080));
        ctx.target = Target::Listener {
            gateway: NamespacedName::new("edge", "ingress"),
            port: 8080,
        };
        let mut rq = request_context(false);
        rq.authority = host.to_string();
        rq.parts.headers = crate::engine::testing::headers(headers);
        plan_request(m, &ctx, rq, target)
    }

    fn web_subset(subset: &str) -> (Target, Option<String>) {
        let web = Target::Service {
            svc: NamespacedName::new("app", "web"),
            port: 80,
        };
        (web, Some(subset.to_string()))
    }

    fn not_found(got: Result<RoutePlan, LocalReply>) -> (u16, Option<ResponseFlag>) {
        match got {
            Ok(p) => panic!("routed to {:?}", p.backend),
            Err(r) => (r.status.as_u16(), r.flag),
        }
    }

    #[test]
    fn a_virtual_service_bound_to_the_ingress_gateway_routes_its_hosts_there() {
        let m = model(&[INGRESS, RATINGS]);
        let route = |host: &str, target: &str, headers: &[(&'static str, &'static str)]| {
            let (rq, got) = at_ingress(&m, host, target, headers);
            let p = got.map_err(|r| r.reason).expect("routed");
            (rq.log.route, p.backend, p.subset)
        };
        let (rule, backend, subset) = route("ratings.example.com", "/", &[]);
        assert_eq!(rule.as_deref(), Some("app/ratings/v1"));
        assert_eq!((backend, subset), web_subset("v1"));
        // The host without its port, case-insensitively; the first matching entry wins.
        let (rule, backend, subset) =
            route("Ratings.Example.COM:8080", "/api", &[("x-version", "v2")]);
        assert_eq!(rule.as_deref(), Some("app/ratings/v2"));
        assert_eq!((backend, subset), web_subset("v2"));
        // A destination without a port: the Service's only port (80), not the listener's.
        let (rule, backend, subset) = route("a.wild.example", "/api/x", &[]);
        assert_eq!(rule.as_deref(), Some("app/ratings/api"));
        assert_eq!((backend, subset), (api(), None));
        // `*.wild.example` does not take `wild.example`; nor any other host.
        for host in ["wild.example", "details.example.com"] {
            let (rq, got) = at_ingress(&m, host, "/", &[]);
            assert_eq!(not_found(got), (404, Some(ResponseFlag::NoRoute)), "{host}");
            assert_eq!(rq.log.route, None);
        }
    }

    #[test]
    fn a_virtual_service_for_another_gateway_or_only_the_mesh_is_not_applied_at_the_ingress() {
        let elsewhere = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: elsewhere, namespace: app}
spec:
  hosts: [ratings.example.com]
  gateways: [edge/other]
  http: [{route: [{destination: {host: web}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mesh-only, namespace: app}
spec:
  hosts: [ratings.example.com, web]
  gateways: [mesh]
  http: [{route: [{destination: {host: api}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: same-name, namespace: edge}
spec:
  hosts: [ratings.example.com]
  gateways: [ingress-two]
  http: [{route: [{destination: {host: web.app}}]}]
"#;
        let m = model(&[INGRESS, elsewhere]);
        let (_, got) = at_ingress(&m, "ratings.example.com", "/", &[]);
        assert_eq!(not_found(got), (404, Some(ResponseFlag::NoRoute)));
        // The mesh-only one still routes the waypoint's traffic for `web`.
        let (rq, got) = plan(&m, "/");
        assert_eq!(got.map(|p| p.backend).map_err(|r| r.reason), Ok(api()));
        assert_eq!(rq.log.route.as_deref(), Some("app/mesh-only/0"));
    }

    #[test]
    fn a_virtual_service_bound_only_to_the_ingress_does_not_route_waypoint_traffic() {
        let web_at_ingress = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web-edge, namespace: app}
spec:
  hosts: [web]
  gateways: [edge/ingress]
  http: [{route: [{destination: {host: api}}]}]
"#;
        let m = model(&[INGRESS, web_at_ingress]);
        let (rq, got) = plan(&m, "/");
        let p = got.map_err(|r| r.reason).expect("default");
        assert_eq!((p.backend, rq.log.route), (conn().target, None));
        // At the ingress, its host (the short name made an FQDN) is routed by it.
        let (rq, got) = at_ingress(&m, "web.app.svc.cluster.local", "/", &[]);
        assert_eq!(got.map(|p| p.backend).map_err(|r| r.reason), Ok(api()));
        assert_eq!(rq.log.route.as_deref(), Some("app/web-edge/0"));
    }

    #[test]
    fn routes_attached_to_the_listener_win_for_their_hosts_over_virtual_services() {
        let route = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ratings-route, namespace: app}
spec:
  parentRefs: [{name: ingress, namespace: edge}]
  hostnames: [ratings.example.com]
  rules: [{name: only, matches: [{path: {type: Exact, value: /only}}], backendRefs: [{name: api, port: 80}]}]
"#;
        let m = model(&[INGRESS, RATINGS, route]);
        let (rq, got) = at_ingress(&m, "ratings.example.com", "/only", &[]);
        assert_eq!(got.map(|p| p.backend).map_err(|r| r.reason), Ok(api()));
        assert_eq!(rq.log.route.as_deref(), Some("app/ratings-route/only"));
        // The route decides its host even where no rule matches: no VirtualService rule.
        let (_, got) = at_ingress(&m, "ratings.example.com", "/", &[]);
        assert_eq!(not_found(got), (404, Some(ResponseFlag::NoRoute)));
        // A host no route is for: the VirtualService.
        let (rq, got) = at_ingress(&m, "a.wild.example", "/", &[]);
        let p = got.map_err(|r| r.reason).expect("routed");
        assert_eq!((p.backend, p.subset), web_subset("v1"));
        assert_eq!(rq.log.route.as_deref(), Some("app/ratings/v1"));
    }
}
