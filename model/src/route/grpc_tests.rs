//! GRPCRoute selection: method/header precedence, how GRPCRoutes and HTTPRoutes on one parent
//! combine, as tables.

use http::{HeaderMap, HeaderName, HeaderValue};

use super::*;
use crate::k8s::load_docs;
use crate::model::Model;

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: shop}
spec: {clusterIP: 10.96.0.1, selector: {app: grpc}, ports: [{name: grpc, port: 9000}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.2, selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: shop}
spec: {clusterIP: 10.96.0.3, selector: {app: plain}, ports: [{name: grpc, port: 9000}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: echo, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc}]
  rules:
  - name: svc-method
    matches: [{method: {service: echo.v1.Echo, method: Unary}}]
    backendRefs: [{name: grpc, port: 9000}]
  - name: svc
    matches: [{method: {service: echo.v1.Echo}}]
    backendRefs: [{name: grpc, port: 9000}]
  - name: svc-header
    matches: [{method: {service: echo.v1.Echo}, headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: grpc, port: 9000}]
  - name: method-only
    matches: [{method: {method: Bidi}}]
    backendRefs: [{name: grpc, port: 9000}]
  - name: regex-longer-service
    matches: [{method: {type: RegularExpression, service: "echo\\.v1\\.Ech.", method: "Server.*"}}]
    backendRefs: [{name: grpc, port: 9000}]
  - name: catch-all
    backendRefs: [{name: grpc, port: 9000}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: newer-same-match, namespace: shop, creationTimestamp: "2024-02-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc}]
  rules:
  - name: newer-health
    matches: [{method: {service: grpc.health.v1.Health}}]
    backendRefs: [{name: grpc, port: 9000}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: older-same-match, namespace: shop, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc}]
  rules:
  - name: older-health
    matches: [{method: {service: grpc.health.v1.Health}}]
    backendRefs: [{name: grpc, port: 9000}]
---
# Ignored: the Service has GRPCRoutes (GEP-1426).
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: http-on-grpc, namespace: shop, creationTimestamp: "2000-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc}]
  rules:
  - name: http-exact
    matches: [{path: {type: Exact, value: /echo.v1.Echo/Unary}}]
    backendRefs: [{name: grpc, port: 9000}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web}]
  rules:
  - {name: web-all, backendRefs: [{name: web, port: 80}]}
---
# On the waypoint: the GRPCRoute is older than the HTTPRoute whose hostnames intersect its
# own, so only the GRPCRoute applies; the HTTPRoute for other hostnames still does.
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: gw-grpc, namespace: shop, creationTimestamp: "2023-01-01T00:00:00Z"}
spec:
  parentRefs: [{name: wp}]
  hostnames: [grpc.example.com]
  rules:
  - {name: gw-grpc-all, backendRefs: [{name: grpc, port: 9000}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: gw-http-conflicting, namespace: shop, creationTimestamp: "2023-06-01T00:00:00Z"}
spec:
  parentRefs: [{name: wp}]
  hostnames: ["*.example.com"]
  rules:
  - {name: gw-http-wildcard, backendRefs: [{name: web, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: gw-http-other, namespace: shop, creationTimestamp: "2023-06-01T00:00:00Z"}
spec:
  parentRefs: [{name: wp}]
  hostnames: ["other.test"]
  rules:
  - {name: gw-http-other, backendRefs: [{name: web, port: 80}]}
"#;

fn model() -> Model {
    load_docs(&[("mesh.yaml".to_string(), MESH.to_string())]).expect("valid routes")
}

/// Routes a gRPC call `path` to `svc` (port 9000, or 80 for `web`) with `:authority`
/// `host` and `headers`, and compares the rule name taken (`default`, `404`).
fn check(m: &Model, svc: &str, host: &str, path: &str, headers: &[(&str, &str)], expected: &str) {
    let svc = &m.services[&NamespacedName::new("shop", svc)];
    let sp = &svc.ports[0];
    let mut map = HeaderMap::new();
    map.insert("content-type", HeaderValue::from_static("application/grpc"));
    for (k, v) in headers {
        map.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    let r = RouteRequest {
        host,
        method: "POST",
        path,
        query: None,
        headers: &map,
        source: None,
    };
    let wp = NamespacedName::new("shop", "wp");
    let got = match route(m, &wp, svc, sp, &r) {
        Routing::Default => "default".to_string(),
        Routing::NoMatch => "404".to_string(),
        Routing::Matched(s) => s.rule.name.clone().unwrap_or_default(),
    };
    assert_eq!(got, expected, "{path} {headers:?} via {host}");
}

#[test]
fn grpc_rules_rank_by_service_then_method_then_headers() {
    let m = model();
    let h = "grpc:9000";
    check(&m, "grpc", h, "/echo.v1.Echo/Unary", &[], "svc-method");
    // The method outranks a header match; without one the header decides.
    let v2 = [("x-version", "v2")];
    check(&m, "grpc", h, "/echo.v1.Echo/Unary", &v2, "svc-method");
    check(
        &m,
        "grpc",
        h,
        "/echo.v1.Echo/ClientStream",
        &v2,
        "svc-header",
    );
    check(&m, "grpc", h, "/echo.v1.Echo/ClientStream", &[], "svc");
    // A service-only match outranks a method-only one (service characters count first).
    check(&m, "grpc", h, "/echo.v1.Echo/Bidi", &[], "svc");
    check(&m, "grpc", h, "/other.Svc/Bidi", &[], "method-only");
    // The match type does not count, the length of the service does: the regex's service
    // (15 characters) outranks `echo.v1.Echo` (12).
    check(
        &m,
        "grpc",
        h,
        "/echo.v1.Echo/ServerStream",
        &[],
        "regex-longer-service",
    );
    check(
        &m,
        "grpc",
        h,
        "/echo.v1.EchX/ServerStream",
        &[],
        "regex-longer-service",
    );
    // A service prefix is element-wise; anything else falls to the rule without matches.
    check(&m, "grpc", h, "/echo.v1.EchoX/Unary", &[], "catch-all");
    check(&m, "grpc", h, "/", &[], "catch-all");
    // Equal matches in two routes: the older route wins.
    check(
        &m,
        "grpc",
        h,
        "/grpc.health.v1.Health/Check",
        &[],
        "older-health",
    );
}

#[test]
fn grpcroutes_and_httproutes_on_one_parent_are_never_merged() {
    let m = model();
    // Service parent: the (older) HTTPRoute on `grpc` is ignored, its exact path included.
    let svc = &m.services[&NamespacedName::new("shop", "grpc")];
    let (routes, _) = routes_for(&m, &NamespacedName::new("shop", "wp"), svc, &svc.ports[0]);
    assert!(
        routes.iter().all(|r| r.kind == RouteKind::Grpc),
        "{routes:?}"
    );
    assert_eq!(routes.len(), 3);
    // A Service with only HTTPRoutes keeps them.
    check(&m, "web", "web:80", "/echo.v1.Echo/Unary", &[], "web-all");
    // Gateway parent (`plain` has no route of its own): the newer HTTPRoute whose hostnames
    // intersect the GRPCRoute's is dropped, so a host only it matched finds no rule.
    check(
        &m,
        "plain",
        "grpc.example.com",
        "/a.B/C",
        &[],
        "gw-grpc-all",
    );
    check(&m, "plain", "www.example.com", "/a.B/C", &[], "404");
    check(
        &m,
        "plain",
        "other.test:9000",
        "/a.B/C",
        &[],
        "gw-http-other",
    );
}

fn check_intersect(a: &[&str], b: &[&str], expected: bool) {
    let a: Vec<String> = a.iter().map(|s| s.to_string()).collect();
    let b: Vec<String> = b.iter().map(|s| s.to_string()).collect();
    assert_eq!(hostnames_intersect(&a, &b), expected, "{a:?} ∩ {b:?}");
    assert_eq!(hostnames_intersect(&b, &a), expected, "{b:?} ∩ {a:?}");
}

#[test]
fn route_hostnames_intersect_as_the_gateway_api_matches_them() {
    check_intersect(&[], &["a.example.com"], true);
    check_intersect(&[], &[], true);
    check_intersect(&["a.example.com"], &["a.example.com"], true);
    check_intersect(&["a.example.com"], &["b.example.com"], false);
    check_intersect(&["*.example.com"], &["a.example.com"], true);
    check_intersect(&["*.example.com"], &["a.b.example.com"], true);
    check_intersect(&["*.example.com"], &["example.com"], false);
    check_intersect(&["*.example.com"], &["*.b.example.com"], true);
    check_intersect(&["*.example.com"], &["*.example.org"], false);
    check_intersect(&["x.test", "a.example.com"], &["*.example.com"], true);
}
