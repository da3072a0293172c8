//! VirtualService selection: which object applies for a Service, first-match-wins order,
//! the VirtualService-only match kinds, and `rewrite.uri`, as tables.

use http::{HeaderMap, HeaderName, HeaderValue};

use super::*;
use crate::k8s::load_docs;
use crate::model::{Labels, Model, Pod};

const MESH: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{name: http, port: 80}, {name: http-alt, port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.2, selector: {app: api}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: both, namespace: shop}
spec: {clusterIP: 10.96.0.3, selector: {app: both}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: wild, namespace: other}
spec: {clusterIP: 10.96.0.4, selector: {app: wild}, ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop, creationTimestamp: "2024-01-02T00:00:00Z"}
spec:
  hosts: [web]
  http:
  - name: header
    match: [{headers: {x-version: {exact: v2}}}]
    route: [{destination: {host: api}}]
  - name: str-prefix
    match: [{uri: {prefix: /api}}]
    route: [{destination: {host: api, port: {number: 80}}}]
  - name: ci
    match: [{uri: {exact: /Case}, ignoreUriCase: true}]
    directResponse: {status: 204}
  - name: authority
    match: [{authority: {prefix: web.shop}}]
    route: [{destination: {host: api}}]
  - name: without
    match: [{uri: {prefix: /w}, withoutHeaders: {x-skip: {}}}]
    route: [{destination: {host: api}}]
  - name: method-regex
    match: [{method: {regex: "PUT|PATCH"}}]
    route: [{destination: {host: api}}]
  - name: query
    match: [{queryParams: {q: {prefix: ab}}}]
    route: [{destination: {host: api}}]
  - name: alt-port
    match: [{port: 8080}]
    route: [{destination: {host: api}}]
  - name: from-ns
    match: [{sourceNamespace: batch}, {sourceLabels: {app: cron}}]
    route: [{destination: {host: api}}]
  - name: only-get
    match: [{method: {exact: GET}, uri: {prefix: /}}]
    route: [{destination: {host: web}}]
---
apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: web-newer, namespace: shop, creationTimestamp: "2024-06-01T00:00:00Z"}
spec:
  hosts: [web.shop.svc.cluster.local]
  http: [{name: newer, route: [{destination: {host: api}}]}]
---
apiVersion: networking.istio.io/v1alpha3
kind: VirtualService
metadata: {name: both, namespace: shop}
spec:
  hosts: [both]
  http: [{name: vs-both, route: [{destination: {host: api}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: gw-only, namespace: shop}
spec:
  hosts: [api]
  gateways: [shop/ingress]
  http: [{name: gw, route: [{destination: {host: web}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: wildcard, namespace: shop}
spec:
  hosts: ["*.other.svc.cluster.local"]
  gateways: [mesh, shop/ingress]
  http: [{name: wild, route: [{destination: {host: wild.other}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: both, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: both}]
  rules: [{name: httproute-both, backendRefs: [{name: api, port: 80}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: gw, namespace: shop}
spec:
  parentRefs: [{name: wp}]
  rules: [{name: gateway-route, backendRefs: [{name: api, port: 80}]}]
"#;

fn model() -> Model {
    load_docs(&[("mesh.yaml".to_string(), MESH.to_string())]).expect("valid mesh")
}

/// Routes `"METHOD ns/svc:port /target"` with `headers` from a pod in `src_ns` with
/// `src_labels`; the rule name taken, `default` or `404`.
fn route_of(
    m: &Model,
    line: &str,
    headers: &[(&str, &str)],
    source: Option<(&str, &[(&str, &str)])>,
) -> String {
    let mut parts = line.split(' ');
    let method = parts.next().expect("method");
    let host = parts.next().expect("host");
    let target = parts.next().expect("target");
    let (svc, port) = host.rsplit_once(':').expect("svc:port");
    let (ns, name) = svc.split_once('/').expect("ns/name");
    let svc = &m.services[&NamespacedName::new(ns, name)];
    let sp = svc
        .ports
        .iter()
        .find(|p| p.port.to_string() == port)
        .expect("port");
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    let authority = format!("{}:{port}", svc.hostname());
    let pod = source.map(|(ns, labels)| Pod {
        name: "src".to_string(),
        namespace: ns.to_string(),
        uid: None,
        service_account: "default".to_string(),
        node_name: None,
        ips: Vec::new(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Labels>(),
        annotations: Labels::new(),
        host_network: false,
        container_ports: Vec::new(),
        ready: true,
    });
    let n = normalize_path(target).expect("path");
    let r = RouteRequest {
        host: &authority,
        method,
        path: &n.path,
        query: n.query.as_deref(),
        headers: &h,
        source: pod.as_ref(),
    };
    match route(m, &NamespacedName::new("shop", "wp"), svc, sp, &r) {
        Routing::Default => "default".to_string(),
        Routing::NoMatch => "404".to_string(),
        Routing::Matched(s) => s.rule.name.clone().unwrap_or_default(),
    }
}

#[test]
fn the_first_matching_http_entry_of_the_oldest_virtual_service_wins() {
    let m = model();
    let check = |line: &str, headers: &[(&str, &str)], want: &str| {
        assert_eq!(
            route_of(&m, line, headers, None),
            want,
            "{line} {headers:?}"
        );
    };
    // In order: a header match listed first beats a longer path match listed later.
    check("GET shop/web:80 /api/x", &[("x-version", "v2")], "header");
    check("GET shop/web:80 /api/x", &[], "str-prefix");
    // A VirtualService prefix is a plain string prefix.
    check("GET shop/web:80 /apix", &[], "str-prefix");
    check("POST shop/web:80 /CASE", &[], "ci");
    check("POST shop/web:80 /case", &[], "ci");
    // authority: the request's host without port, prefix-matched.
    check("POST shop/web:80 /other", &[], "authority");
}

#[test]
fn virtual_service_match_kinds() {
    let mut m = model();
    // Drop the `authority` entry so later entries can be reached.
    let vs = &mut m.virtual_services[0];
    assert_eq!(vs.name, "web", "oldest first");
    vs.rules.retain(|r| r.name.as_deref() != Some("authority"));
    let check = |line: &str, headers: &[(&str, &str)], want: &str| {
        assert_eq!(
            route_of(&m, line, headers, None),
            want,
            "{line} {headers:?}"
        );
    };
    check("POST shop/web:80 /w", &[], "without");
    check("POST shop/web:80 /w", &[("x-skip", "1")], "404");
    check("PATCH shop/web:80 /x", &[], "method-regex");
    check("POST shop/web:80 /x?q=abc", &[], "query");
    check("POST shop/web:80 /x?q=b", &[], "404");
    check("POST shop/web:8080 /x", &[], "alt-port");
    check("GET shop/web:80 /x", &[], "only-get");
    check("DELETE shop/web:80 /x", &[], "404");
    let from = |ns: &str, labels: &[(&str, &str)]| {
        route_of(&m, "POST shop/web:80 /x", &[], Some((ns, labels)))
    };
    assert_eq!(from("batch", &[]), "from-ns");
    assert_eq!(from("shop", &[("app", "cron"), ("v", "1")]), "from-ns");
    assert_eq!(from("shop", &[("app", "web")]), "404");
}

#[test]
fn service_httproutes_then_virtual_services_then_gateway_routes() {
    let m = model();
    let check = |line: &str, want: &str| assert_eq!(route_of(&m, line, &[], None), want, "{line}");
    // `both` has an HTTPRoute and a VirtualService: the HTTPRoute wins.
    check("GET shop/both:80 /", "httproute-both");
    // `api`'s only VirtualService is for an ingress gateway, not mesh: the waypoint's own
    // HTTPRoute applies.
    check("GET shop/api:80 /", "gateway-route");
    // A wildcard host in another namespace.
    check("GET other/wild:80 /", "wild");
}

#[test]
fn virtual_service_destinations_and_rewrites() {
    let m = model();
    let vs = &m.virtual_services[0];
    let header = &vs.rules[0];
    assert_eq!(
        header.backends[0].service,
        NamespacedName::new("shop", "api")
    );
    assert_eq!(header.backends[0].port, 0, "no port: the request's");
    assert_eq!(vs.rules[1].backends[0].port, 80);
    let wild = m
        .virtual_services
        .iter()
        .find(|v| v.name == "wildcard")
        .expect("wildcard");
    assert_eq!(
        wild.rules[0].backends[0].service,
        NamespacedName::new("other", "wild")
    );
    // rewrite.uri replaces a matched prefix as a plain string, else the whole path.
    let prefix = RouteMatch {
        path: PathMatch::StringPrefix("/old".into()),
        ..RouteMatch::default()
    };
    let exact = RouteMatch {
        path: PathMatch::Exact("/old".into()),
        ..RouteMatch::default()
    };
    let ci = RouteMatch {
        path: PathMatch::StringPrefix("/old".into()),
        ignore_uri_case: true,
        ..RouteMatch::default()
    };
    let rw = |p: &str| PathModifier::ReplaceMatchedPrefixOrPath(p.to_string());
    for (path, matched, to, want) in [
        ("/old/x", &prefix, "/new", "/new/x"),
        ("/oldx", &prefix, "/new", "/newx"),
        ("/old/x", &prefix, "/", "//x"),
        ("/old", &prefix, "", "/"),
        ("/old", &exact, "/new", "/new"),
        ("/OLD/x", &ci, "/new", "/new/x"),
    ] {
        assert_eq!(modify_path(path, matched, &rw(to)), want, "{path} -> {to}");
    }
}

/// Two ingress Gateways (`edge/ingress`: `http` on 80 for every host, `shop` on 8080 for
/// `*.shop.example`; `edge/other`), an HTTPRoute for `books.example` and VirtualServices
/// bound to them (`new` and `mesh-web` to the mesh too).
const INGRESS: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: edge}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}
  - {name: shop, port: 8080, protocol: HTTP, hostname: "*.shop.example"}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: other, namespace: edge}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: books, namespace: edge}
spec:
  parentRefs: [{name: ingress, sectionName: http}]
  hostnames: [books.example]
  rules: [{name: books, matches: [{path: {type: PathPrefix, value: /b}}], backendRefs: [{name: web, namespace: shop, port: 80}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: old, namespace: shop, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  hosts: ["*.example.com"]
  gateways: [edge/ingress]
  http: [{name: old-api, match: [{uri: {prefix: /api}}], route: [{destination: {host: web}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: new, namespace: shop, creationTimestamp: "2024-06-01T00:00:00Z"}
spec:
  hosts: [ratings.example.com]
  gateways: [edge/ingress, mesh]
  http:
  - {name: ingress-only, match: [{gateways: [edge/ingress], headers: {x-v: {exact: "2"}}}], route: [{destination: {host: web}}]}
  - {name: port-9, match: [{port: 9}], route: [{destination: {host: web}}]}
  - {name: new-all, route: [{destination: {host: web}}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: star, namespace: shop, creationTimestamp: "2024-12-01T00:00:00Z"}
spec:
  hosts: ["*"]
  gateways: [edge/ingress]
  http: [{name: star, match: [{uri: {prefix: /star}}], route: [{destination: {host: web}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: elsewhere, namespace: shop}
spec:
  hosts: [other.example]
  gateways: [edge/other]
  http: [{name: other-gw, route: [{destination: {host: web}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mesh-web, namespace: shop}
spec:
  hosts: [web]
  gateways: [mesh, edge/ingress]
  http:
  - {name: web-ingress-only, match: [{gateways: [edge/ingress]}], route: [{destination: {host: web}}]}
  - {name: web-mesh, route: [{destination: {host: web}}]}
"#;

/// Routes `GET host/target` (with `headers`) at `listener` of the Gateway `gateway`: the
/// rule name taken, `default` (nothing for the host) or `404`.
fn at_listener(
    m: &Model,
    gateway: &str,
    listener: &str,
    line: &str,
    headers: &[(&str, &str)],
) -> String {
    let (ns, name) = gateway.split_once('/').expect("ns/name");
    let key = NamespacedName::new(ns, name);
    let l = m.gateways[&key]
        .listeners
        .iter()
        .find(|l| l.name == listener)
        .expect("listener");
    let (host, target) = line.split_once(' ').expect("host target");
    let mut h = HeaderMap::new();
    for (k, v) in headers {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    let n = normalize_path(target).expect("path");
    let r = RouteRequest {
        host,
        method: "GET",
        path: &n.path,
        query: n.query.as_deref(),
        headers: &h,
        source: None,
    };
    match route_listener(m, &key, l, &r) {
        Routing::Default => "default".to_string(),
        Routing::NoMatch => "404".to_string(),
        Routing::Matched(s) => s.rule.name.clone().unwrap_or_default(),
    }
}

#[test]
fn at_an_ingress_listener_its_routes_for_the_host_win_then_the_bound_virtual_services() {
    let m = load_docs(&[("ingress.yaml".to_string(), INGRESS.to_string())]).expect("valid");
    let bound: Vec<&str> = m
        .virtual_services_for_gateway(&NamespacedName::new("edge", "ingress"))
        .map(|vs| vs.name.as_str())
        .collect();
    assert_eq!(
        bound,
        ["old", "new", "star", "mesh-web"],
        "indexed, in model order"
    );
    let check =
        |gateway: &str, listener: &str, line: &str, headers: &[(&str, &str)], want: &str| {
            assert_eq!(
                at_listener(&m, gateway, listener, line, headers),
                want,
                "{gateway} {listener} {line} {headers:?}"
            );
        };
    let ingress = "edge/ingress";
    // The HTTPRoute for `books.example` decides its host, also where it has no rule.
    check(ingress, "http", "books.example /b", &[], "books");
    check(ingress, "http", "books.example:80 /star", &[], "404");
    // Other hosts: the VirtualServices' entries in model order (`old` is older than `new`),
    // each one's in order; a match for this Gateway; `port` against the listener's.
    check(
        ingress,
        "http",
        "Ratings.Example.com:80 /api",
        &[],
        "old-api",
    );
    check(
        ingress,
        "http",
        "ratings.example.com /x",
        &[("x-v", "2")],
        "ingress-only",
    );
    check(ingress, "http", "ratings.example.com /x", &[], "new-all");
    // `*.example.com` does not take `example.com`; `*` takes every host.
    check(ingress, "http", "example.com /api", &[], "404");
    check(ingress, "http", "any.host /star", &[], "star");
    check(
        ingress,
        "http",
        "web.shop.svc.cluster.local /",
        &[],
        "web-ingress-only",
    );
    // A listener for `*.shop.example`: only `*` is for its hosts.
    check(ingress, "shop", "a.shop.example /star", &[], "star");
    check(ingress, "shop", "a.shop.example /api", &[], "404");
    // `edge/other`: only its own VirtualService; none for a host: nothing applies.
    check("edge/other", "http", "other.example /x", &[], "other-gw");
    check(
        "edge/other",
        "http",
        "ratings.example.com /x",
        &[],
        "default",
    );
}

#[test]
fn a_match_for_an_ingress_gateway_is_skipped_for_mesh_traffic() {
    let m = load_docs(&[("ingress.yaml".to_string(), INGRESS.to_string())]).expect("valid");
    let svc = &m.services[&NamespacedName::new("shop", "web")];
    let h = HeaderMap::new();
    let r = RouteRequest {
        host: "web.shop.svc.cluster.local",
        method: "GET",
        path: "/",
        query: None,
        headers: &h,
        source: None,
    };
    let got = match route(
        &m,
        &NamespacedName::new("shop", "wp"),
        svc,
        &svc.ports[0],
        &r,
    ) {
        Routing::Matched(s) => s.rule.name.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(got.as_deref(), Some("web-mesh"));
    // `star` (`*`, bound to the ingress only) does not apply to mesh traffic.
    assert!(virtual_service_for(&m, svc).is_some_and(|vs| vs.name == "mesh-web"));
}
