//! Path normalisation, rule precedence, backends and filters, as tables.

use http::{HeaderMap, HeaderName, HeaderValue};

use super::*;
use crate::k8s::load_docs;
use crate::model::{Filters, Model};

// === normalisation ===

fn check_path(raw: &str, expected: Result<&str, PathError>) {
    let got = normalize_path(raw).map(|n| n.path_and_query());
    assert_eq!(got, expected.map(str::to_string), "{raw:?}");
}

#[test]
fn paths_are_normalised_once_for_policy_and_routing() {
    check_path("/", Ok("/"));
    check_path("/a/b", Ok("/a/b"));
    check_path("//admin", Ok("/admin"));
    check_path("/public//../admin", Ok("/admin"));
    check_path("/public/../admin", Ok("/admin"));
    check_path("/./admin/.", Ok("/admin/"));
    check_path("/a/b/..", Ok("/a/"));
    check_path("/../../admin", Ok("/admin"));
    check_path("/..", Ok("/"));
    check_path("/a/", Ok("/a/"));
    check_path("/%2e%2e/admin", Ok("/admin"));
    check_path("/public/%2E%2E/admin", Ok("/admin"));
    check_path("/%61dmin", Ok("/admin"));
    check_path("/a%7eb", Ok("/a~b"));
    check_path("/a%3fb", Ok("/a%3Fb"));
    check_path("/caf%C3%A9", Ok("/caf%C3%A9"));
    check_path("/\\admin", Ok("/admin"));
    check_path("/a\\..\\admin", Ok("/admin"));
    check_path("/admin?x=/../y", Ok("/admin?x=/../y"));
    check_path("/a/../admin?q", Ok("/admin?q"));
    check_path("/admin#frag", Ok("/admin"));
    check_path("/admin?q=1#frag", Ok("/admin?q=1"));
    check_path("/%2Fadmin", Err(PathError::EncodedSeparator));
    check_path("/a%2fb", Err(PathError::EncodedSeparator));
    check_path("/a%5Cb", Err(PathError::EncodedSeparator));
    check_path("/a%00", Err(PathError::EncodedNul));
    check_path("/a%zz", Err(PathError::BadEscape));
    check_path("/a%4", Err(PathError::BadEscape));
    check_path("/a%", Err(PathError::BadEscape));
    check_path("admin", Err(PathError::NotAbsolute("admin".to_string())));
    check_path("*", Err(PathError::NotAbsolute("*".to_string())));
}

// === rule selection ===

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.1
  selector: {app: web}
  ports: [{name: http, port: 80}, {name: http-admin, port: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: shop}
spec: {clusterIP: 10.96.0.2, selector: {app: other}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: elsewhere}
spec: {clusterIP: 10.96.0.3, selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: b-paths, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - name: prefix-api
    matches: [{path: {type: PathPrefix, value: /api}}]
    backendRefs: [{name: web, port: 80}]
  - name: prefix-api-v1
    matches: [{path: {type: PathPrefix, value: /api/v1/}}]
    backendRefs: [{name: web, port: 80}]
  - name: exact-api
    matches: [{path: {type: Exact, value: /api}}]
    backendRefs: [{name: web, port: 80}]
  - name: regex
    matches: [{path: {type: RegularExpression, value: "/api/v[0-9]+/items/.*"}}]
    backendRefs: [{name: web, port: 80}]
  - name: get-api
    matches: [{path: {type: PathPrefix, value: /api}, method: GET}]
    backendRefs: [{name: web, port: 80}]
  - name: headers
    matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: X-Version, value: v2}]
    - headers: [{name: x-canary, type: RegularExpression, value: "yes|true"}]
    backendRefs: [{name: other, port: 80}]
  - name: two-headers
    matches:
    - path: {type: PathPrefix, value: /api}
      headers: [{name: x-version, value: v2}, {name: x-env, value: prod}]
    backendRefs: [{name: other, port: 80}]
  - name: query
    matches: [{path: {type: PathPrefix, value: /api}, queryParams: [{name: debug, value: "on"}]}]
    backendRefs: [{name: other, port: 80}]
  - name: catch-all
    backendRefs: [{name: web, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: a-same-as-b, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: core, name: web}]
  rules:
  - name: a-static
    matches: [{path: {type: PathPrefix, value: /static}}]
    backendRefs: [{name: web, port: 80}]
  - name: a-catch-all
    backendRefs: [{name: web, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: z-older, namespace: shop, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  parentRefs: [{kind: Service, group: "", name: web, sectionName: http}]
  rules:
  - name: z-static
    matches: [{path: {type: PathPrefix, value: /static}}]
    backendRefs: [{name: web, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: admin-port, namespace: shop}
spec:
  parentRefs: [{kind: Service, group: "", name: web, port: 8080}]
  rules: [{name: admin-only, matches: [{path: {type: Exact, value: /only}}], backendRefs: [{name: web, port: 8080}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: foreign, namespace: elsewhere}
spec:
  parentRefs: [{kind: Service, group: "", name: web, namespace: shop}]
  rules: [{name: foreign-rule, backendRefs: [{name: web, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: waypoint-wide, namespace: shop}
spec:
  parentRefs: [{name: wp}]
  hostnames: ["*.shop.example", "api.shop.example"]
  rules:
  - {name: gw-wildcard, matches: [{path: {type: PathPrefix, value: /}}], backendRefs: [{name: other, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: waypoint-exact, namespace: shop}
spec:
  parentRefs: [{name: wp, kind: Gateway, group: gateway.networking.k8s.io, port: 80}]
  hostnames: ["api.shop.example"]
  rules:
  - {name: gw-exact, backendRefs: [{name: other, port: 80}]}
"#;

fn model() -> Model {
    load_docs(&[("mesh.yaml".to_string(), MESH.to_string())]).expect("valid routes")
}

/// A request as a table row: `"GET web:80 /path?query"` plus headers.
struct Req<'a> {
    line: &'a str,
    headers: &'a [(&'a str, &'a str)],
    /// The waypoint (in `shop`) the request goes through.
    waypoint: &'a str,
}

fn req(line: &str) -> Req<'_> {
    Req {
        line,
        headers: &[],
        waypoint: "wp",
    }
}

fn with<'a>(line: &'a str, headers: &'a [(&'a str, &'a str)]) -> Req<'a> {
    Req {
        line,
        headers,
        waypoint: "wp",
    }
}

/// Routes `input` and compares the rule name taken (`default`, `404`).
fn check(m: &Model, input: Req<'_>, expected: &str) {
    let mut parts = input.line.split(' ');
    let method = parts.next().expect("method");
    let host = parts.next().expect("host");
    let target = parts.next().expect("target");
    let (svc_ns_name, port) = host.rsplit_once(':').expect("svc:port");
    let (ns, name) = svc_ns_name.split_once('/').unwrap_or(("shop", svc_ns_name));
    let port: u16 = port.parse().expect("port");
    let svc = &m.services[&NamespacedName::new(ns, name)];
    let sp = svc.ports.iter().find(|p| p.port == port).expect("port");
    let mut headers = HeaderMap::new();
    for (k, v) in input.headers {
        headers.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    let host_header = headers
        .get("host")
        .and_then(|h| h.to_str().ok())
        .unwrap_or(host)
        .to_string();
    let n = normalize_path(target).expect("normal path");
    let r = RouteRequest {
        host: &host_header,
        method,
        path: &n.path,
        query: n.query.as_deref(),
        headers: &headers,
        source: None,
    };
    let wp = NamespacedName::new("shop", input.waypoint);
    let got = match route(m, &wp, svc, sp, &r) {
        Routing::Default => "default".to_string(),
        Routing::NoMatch => "404".to_string(),
        Routing::Matched(s) => s.rule.name.clone().unwrap_or_default(),
    };
    assert_eq!(got, expected, "{}", input.line);
}

#[test]
fn the_most_specific_match_wins_in_gateway_api_order() {
    let m = model();
    // Path kind first: exact, then the longest prefix, then regex.
    check(&m, req("POST web:80 /api"), "exact-api");
    check(&m, req("POST web:80 /api/"), "prefix-api");
    check(&m, req("POST web:80 /api/x"), "prefix-api");
    check(&m, req("POST web:80 /api/v1"), "prefix-api-v1");
    check(&m, req("POST web:80 /api/v1/items/3"), "prefix-api-v1");
    // Prefixes are element-wise.
    // (two routes catch all: the first by name, a-same-as-b, takes it)
    check(&m, req("POST web:80 /apix"), "a-catch-all");
    // A longer prefix outranks any regex.
    check(&m, req("POST web:80 /api/v2/items/3"), "prefix-api");
    // Then method, then the number of headers, then query parameters.
    check(&m, req("GET web:80 /api/x"), "get-api");
    check(
        &m,
        with("POST web:80 /api/x", &[("x-version", "v2")]),
        "headers",
    );
    check(
        &m,
        with(
            "POST web:80 /api/x",
            &[("x-version", "v2"), ("x-env", "prod")],
        ),
        "two-headers",
    );
    check(
        &m,
        with("GET web:80 /api/x", &[("x-version", "v2")]),
        "get-api",
    );
    check(&m, req("POST web:80 /api/x?debug=on"), "query");
    check(&m, req("POST web:80 /api/x?debug=%6Fn"), "query");
    check(
        &m,
        req("POST web:80 /api/x?debug=off&debug=on"),
        "prefix-api",
    );
    check(
        &m,
        with("POST web:80 /api/x", &[("x-version", "V2")]),
        "prefix-api",
    );
    // Header regexes match the whole value; any of a repeated header's values may match.
    check(
        &m,
        with("POST web:80 /x", &[("x-canary", "yes")]),
        "headers",
    );
    check(
        &m,
        with("POST web:80 /x", &[("x-canary", "yess")]),
        "a-catch-all",
    );
    check(
        &m,
        with(
            "POST web:80 /x",
            &[("x-canary", "no"), ("x-canary", "true")],
        ),
        "headers",
    );
    // Matching uses the normalised path.
    check(&m, req("POST web:80 //api/../api"), "exact-api");
    check(&m, req("POST web:80 /static/../api/v1/a"), "prefix-api-v1");
}

#[test]
fn equal_matches_go_to_the_oldest_route_then_by_name() {
    let m = model();
    // z-older has a creationTimestamp, so it is older than the others.
    check(&m, req("GET web:80 /static/app.js"), "z-static");
    // a-same-as-b and b-paths both catch all: the name decides.
    check(&m, req("GET web:80 /other"), "a-catch-all");
}

#[test]
fn attachment_follows_parent_refs() {
    let m = model();
    // Port 8080 of web: only routes for that port (by port or by no port at all).
    check(&m, req("GET web:8080 /only"), "admin-only");
    check(&m, req("GET web:8080 /static"), "a-static");
    // A route in another namespace does not attach to shop/web; that namespace's own Service
    // has no route, so the waypoint's routes apply (and its hostnames do not match), or, through
    // a waypoint without routes, none: the Service itself.
    check(&m, req("GET elsewhere/web:80 /x"), "404");
    let other_waypoint = Req {
        waypoint: "wp2",
        ..req("GET elsewhere/web:80 /x")
    };
    check(&m, other_waypoint, "default");
    // Gateway-attached routes apply to Services without their own routes, by hostname:
    // case-insensitive, without the port, the exact hostname before the wildcard.
    check(&m, req("GET other:80 /x"), "404");
    check(
        &m,
        with("GET other:80 /x", &[("host", "API.Shop.Example:80")]),
        "gw-exact",
    );
    check(
        &m,
        with("GET other:80 /x", &[("host", "www.shop.example")]),
        "gw-wildcard",
    );
    check(
        &m,
        with("GET other:80 /x", &[("host", "shop.example")]),
        "404",
    );
    check(
        &m,
        with("GET other:80 /x", &[("host", "evil.shop.example.com")]),
        "404",
    );
}

// === backends ===

fn backends(weights: &[u32]) -> Vec<BackendRef> {
    weights
        .iter()
        .enumerate()
        .map(|(i, w)| BackendRef {
            kind: BackendKind::Service,
            service: NamespacedName::new("ns", format!("b{i}")),
            host: None,
            port: 80,
            subset: None,
            weight: *w,
            filters: Filters::default(),
        })
        .collect()
}

fn check_pick(weights: &[u32], roll: u64, expected: Option<&str>) {
    let b = backends(weights);
    let got = pick_backend(&b, roll).map(|b| b.service.name.as_str());
    assert_eq!(got, expected, "{weights:?} roll {roll}");
}

#[test]
fn backends_are_picked_by_weight_and_weight_zero_never() {
    check_pick(&[80, 20], 0, Some("b0"));
    check_pick(&[80, 20], 79, Some("b0"));
    check_pick(&[80, 20], 80, Some("b1"));
    check_pick(&[80, 20], 99, Some("b1"));
    check_pick(&[80, 20], 100, Some("b0"));
    check_pick(&[0, 1], 0, Some("b1"));
    check_pick(&[0, 1], u64::MAX, Some("b1"));
    check_pick(&[1, 0, 1], 1, Some("b2"));
    check_pick(&[0, 0], 5, None);
    check_pick(&[], 5, None);
    // Over every roll of one period the shares are exact.
    let b = backends(&[3, 1]);
    let firsts = (0..400)
        .filter(|r| pick_backend(&b, *r).map(|b| b.service.name.as_str()) == Some("b0"))
        .count();
    assert_eq!(firsts, 300);
}

// === filters ===

fn check_rewrite(prefix: &str, replace: &str, path: &str, expected: &str) {
    let matched = RouteMatch {
        path: PathMatch::Prefix(prefix.to_string()),
        ..RouteMatch::default()
    };
    let got = modify_path(
        path,
        &matched,
        &PathModifier::ReplacePrefixMatch(replace.to_string()),
    );
    assert_eq!(
        got, expected,
        "prefix {prefix} replace {replace:?} path {path}"
    );
}

#[test]
fn replace_prefix_match_follows_the_gateway_api_table() {
    // The table of the Gateway API's HTTPPathModifier docs (prefixes are stored without a
    // trailing slash).
    check_rewrite("/foo", "/xyz", "/foo/bar", "/xyz/bar");
    check_rewrite("/foo", "/xyz/", "/foo/bar", "/xyz/bar");
    check_rewrite("/foo", "/xyz", "/foo", "/xyz");
    check_rewrite("/foo", "/xyz", "/foo/", "/xyz/");
    check_rewrite("/foo", "", "/foo/bar", "/bar");
    check_rewrite("/foo", "", "/foo/", "/");
    check_rewrite("/foo", "", "/foo", "/");
    check_rewrite("/foo", "/", "/foo/", "/");
    check_rewrite("/foo", "/", "/foo", "/");
    check_rewrite("/", "/v1", "/items", "/v1/items");
    let exact = RouteMatch {
        path: PathMatch::Exact("/a".to_string()),
        ..RouteMatch::default()
    };
    assert_eq!(
        modify_path("/a", &exact, &PathModifier::ReplaceFullPath("/b".into())),
        "/b"
    );
}

fn check_redirect(r: RequestRedirect, host: &str, target: &str, expected: &str) {
    let matched = RouteMatch {
        path: PathMatch::Prefix("/old".to_string()),
        ..RouteMatch::default()
    };
    let n = normalize_path(target).expect("path");
    let got = redirect_location(&r, host, 80, &n.path, n.query.as_deref(), &matched);
    assert_eq!(got, expected, "{r:?}");
}

#[test]
fn redirects_build_the_location_from_the_request_and_the_filter() {
    let plain = RequestRedirect {
        scheme: None,
        hostname: None,
        port: None,
        path: None,
        status_code: 302,
    };
    check_redirect(
        plain.clone(),
        "web:80",
        "/old/a?x=1",
        "http://web/old/a?x=1",
    );
    check_redirect(
        RequestRedirect {
            scheme: Some(Scheme::Https),
            ..plain.clone()
        },
        "web:80",
        "/old",
        "https://web/old",
    );
    check_redirect(
        RequestRedirect {
            scheme: Some(Scheme::Https),
            port: Some(8443),
            hostname: Some("new.example".into()),
            path: Some(PathModifier::ReplacePrefixMatch("/new".into())),
            status_code: 301,
        },
        "web",
        "/old/a",
        "https://new.example:8443/new/a",
    );
    check_redirect(
        RequestRedirect {
            port: Some(8080),
            path: Some(PathModifier::ReplaceFullPath("/x".into())),
            ..plain
        },
        "[fd00::1]:80",
        "/old/a",
        "http://[fd00::1]:8080/x",
    );
}

#[test]
fn header_modifiers_remove_then_set_then_add() {
    let name = |s: &str| HeaderName::from_bytes(s.as_bytes()).expect("name");
    let value = |s: &str| HeaderValue::from_str(s).expect("value");
    let m = HeaderModifier {
        set: vec![(name("x-set"), value("new"))],
        add: vec![(name("x-add"), value("2")), (name("x-gone"), value("back"))],
        remove: vec![name("x-gone")],
    };
    let mut h = HeaderMap::new();
    h.append(name("x-set"), value("old1"));
    h.append(name("x-set"), value("old2"));
    h.append(name("x-add"), value("1"));
    h.append(name("x-gone"), value("bye"));
    modify_headers(&mut h, &m);
    let all = |k: &str| -> Vec<String> {
        h.get_all(k)
            .iter()
            .map(|v| v.to_str().expect("ascii").to_string())
            .collect()
    };
    assert_eq!(all("x-set"), ["new"]);
    assert_eq!(all("x-add"), ["1", "2"]);
    assert_eq!(all("x-gone"), ["back"]);
}
