//! Phase 4, route: the HTTPRoute, GRPCRoute or VirtualService rule for the request
//! ([`mesh_model::route::route`]). None applies → the Service itself; one applies but no rule
//! matches → `404 NR`; a redirect or a VirtualService `directResponse` is answered here
//! (nothing sent upstream); otherwise a backend is picked by weight for this request,
//! request-header modifiers and rewrites are applied, and the rest of the rule is kept for
//! later phases in the [`RoutePlan`]: response-header modifiers, timeouts, the retry policy
//! (Istio's default when the rule has none), fault and mirrors.

use http::header::{self, HeaderName, HeaderValue};
use http::StatusCode;
use mesh_model::model::{
    Fault, HeaderModifier, Mirror, Model, NamespacedName, RetryPolicy, Timeouts,
};
use mesh_model::route::{
    self, modify_headers, modify_path, pick_backend, redirect_location, NormalizedPath,
    RouteRequest, Routing, Selected,
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
    let Some((svc, port)) = resolved.and_then(|r| r.service.zip(r.port)) else {
        return Ok(plan);
    };
    let request = RouteRequest {
        host: &rq.authority,
        method: rq.parts.method.as_str(),
        path: &normalized.path,
        query: normalized.query.as_deref(),
        headers: &rq.parts.headers,
        source: rq.labels.src_pod.as_deref(),
    };
    let sel = match route::route(model, waypoint, svc, port, &request) {
        Routing::Default => return Ok(plan),
        Routing::NoMatch => {
            return Err(LocalReply::new(
                StatusCode::NOT_FOUND,
                "route not found",
                Some(ResponseFlag::NoRoute),
                "no HTTPRoute or VirtualService rule matches",
            ))
        }
        Routing::Matched(sel) => sel,
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
    // VirtualService destinations may name any namespace (Istio allows it).
    if !sel.route.is_virtual_service() && chosen.service.namespace != sel.route.namespace() {
        // The Gateway API needs a ReferenceGrant for this; without support for them,
        // refuse rather than let a route reach into any namespace.
        return Err(LocalReply::no_backend(
            "cross-namespace backendRef needs a ReferenceGrant (not supported)",
        ));
    }
    // Port 0: a VirtualService destination without a port, the request's own.
    let backend_port = if chosen.port == 0 {
        service_port
    } else {
        chosen.port
    };
    rq.log.backend = Some(format!("{}:{backend_port}", chosen.service));
    plan.backend = Target::Service {
        svc: chosen.service.clone(),
        port: backend_port,
    };
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
    use crate::engine::testing::{conn, model, request_context, waypoint};
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
        let ctx = conn();
        let mut rq = request_context(false);
        rq.raw_target = target.to_string();
        let normalized = normalize_path(target).expect("path");
        let resolved = ctx.target.lookup(m, "cluster.local");
        let got = run(
            m,
            &waypoint(),
            &ctx,
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
}
