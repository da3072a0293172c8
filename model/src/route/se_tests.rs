//! Routing to a ServiceEntry (an egress waypoint): routes attached by a ServiceEntry parent
//! (port, `sectionName`, namespace), GRPCRoute precedence, a route on the entry before the
//! waypoint's, VirtualService hosts naming an entry's host, and where a backend sends the
//! request, as tables.

use http::HeaderMap;

use super::*;
use crate::k8s::load_docs;
use crate::model::Model;

const MESH: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: egress, labels: {istio.io/use-waypoint: wp}}
spec:
  hosts: [httpbin.org]
  ports:
  - {number: 80, name: http, protocol: HTTP}
  - {number: 443, name: https, protocol: HTTPS}
  - {number: 8080, name: http-alt, protocol: HTTP}
  resolution: DNS
---
# Same name, another namespace: routes of `egress` never attach to it.
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: elsewhere}
spec:
  hosts: [httpbin.elsewhere.example]
  ports: [{number: 80, name: http}]
  resolution: DNS
---
# Same name, a Service: routes on one never attach to the other.
apiVersion: v1
kind: Service
metadata: {name: httpbin, namespace: egress}
spec: {clusterIP: 10.96.0.1, ports: [{name: http, port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: plain, namespace: egress}
spec:
  hosts: [plain.example.com]
  ports: [{number: 80, name: http}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: grpc, namespace: egress}
spec:
  hosts: [grpc.example.com]
  ports: [{number: 9000, name: grpc, protocol: GRPC}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: egress}
spec:
  hosts: [api.example.com]
  ports: [{number: 443, name: https}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: egress}
spec:
  hosts: [eu.wild.example]
  ports: [{number: 80, name: http}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: twins, namespace: egress}
spec:
  hosts: [a.twins.example, b.twins.example]
  ports: [{number: 80, name: http}]
  resolution: DNS
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: on-entry, namespace: egress}
spec:
  parentRefs: [{group: networking.istio.io, kind: ServiceEntry, name: httpbin}]
  rules:
  - name: entry-all
    backendRefs: [{group: networking.istio.io, kind: ServiceEntry, name: httpbin}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: on-entry-port, namespace: egress}
spec:
  parentRefs: [{group: networking.istio.io, kind: ServiceEntry, name: httpbin, port: 443}]
  rules: [{name: entry-443, matches: [{path: {value: /port}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: on-entry-section, namespace: egress}
spec:
  parentRefs: [{group: networking.istio.io, kind: ServiceEntry, name: httpbin, sectionName: http-alt}]
  rules: [{name: entry-alt, matches: [{path: {value: /section}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: on-service, namespace: egress}
spec:
  parentRefs: [{group: "", kind: Service, name: httpbin}]
  rules: [{name: service-all, matches: [{path: {value: /service}}]}]
---
# A route in another namespace than the entry it names: ignored.
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: foreign, namespace: elsewhere}
spec:
  parentRefs: [{group: networking.istio.io, kind: ServiceEntry, name: httpbin, namespace: egress}]
  rules: [{name: foreign, matches: [{path: {value: /foreign}}]}]
---
# A parent in another namespace than the route: ignored.
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: cross-parent, namespace: egress}
spec:
  parentRefs: [{group: networking.istio.io, kind: ServiceEntry, name: httpbin, namespace: elsewhere}]
  rules: [{name: cross-parent}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: gw, namespace: egress}
spec:
  parentRefs: [{name: wp}]
  rules: [{name: gw-all}]
---
# The entry's GRPCRoute wins over its (older) HTTPRoute, whose exact path would win.
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: http-on-grpc, namespace: egress, creationTimestamp: "2000-01-01T00:00:00Z"}
spec:
  parentRefs: [{group: networking.istio.io, kind: ServiceEntry, name: grpc}]
  rules: [{name: http-exact, matches: [{path: {type: Exact, value: /pkg.Echo/Unary}}]}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc-on-entry, namespace: egress}
spec:
  parentRefs: [{group: networking.istio.io, kind: ServiceEntry, name: grpc, port: 9000}]
  rules: [{name: grpc-echo, matches: [{method: {service: pkg.Echo}}]}]
---
# Loses to the entry's own HTTPRoutes.
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: httpbin, namespace: egress}
spec:
  hosts: [httpbin.org]
  http: [{name: vs-httpbin, route: [{destination: {host: httpbin.org}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: api, namespace: client}
spec:
  hosts: [API.example.com]
  http:
  - name: vs-api
    route: [{destination: {host: api.example.com}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: wild, namespace: client}
spec:
  hosts: ["*.wild.example"]
  http: [{name: vs-wild, route: [{destination: {host: eu.wild.example}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: twin-b, namespace: client}
spec:
  hosts: [b.twins.example]
  http: [{name: vs-twin-b, route: [{destination: {host: b.twins.example}}]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: not-mesh, namespace: client}
spec:
  hosts: [plain.example.com]
  gateways: [client/ingress]
  http: [{name: vs-not-mesh, route: [{destination: {host: plain.example.com}}]}]
"#;

fn model() -> Model {
    load_docs(&[("mesh.yaml".to_string(), MESH.to_string())]).expect("valid mesh")
}

/// The target `"ns/name:port"` (a ServiceEntry, or a Service with `svc:` before it), with
/// the host the connection is for.
fn target<'m>(m: &'m Model, what: &str, host: Option<&'m str>) -> RouteTarget<'m> {
    let (key, port) = what.rsplit_once(':').expect("name:port");
    let port: u16 = port.parse().expect("port");
    match key.strip_prefix("svc:") {
        Some(key) => {
            let (ns, name) = key.split_once('/').expect("ns/name");
            let svc = &m.services[&NamespacedName::new(ns, name)];
            let port = svc.ports.iter().find(|p| p.port == port).expect("port");
            RouteTarget::Service { svc, port }
        }
        None => {
            let (ns, name) = key.split_once('/').expect("ns/name");
            let entry = m.service_entry(ns, name).expect("entry");
            let port = entry.port(port).expect("entry port");
            RouteTarget::ServiceEntry { entry, port, host }
        }
    }
}

/// The rule `POST path` to `what` (see [`target`]) takes through `egress/wp`: its name,
/// `default` or `404`.
fn rule_of(m: &Model, what: &str, host: Option<&str>, path: &str) -> String {
    let headers = HeaderMap::new();
    let req = RouteRequest {
        host: "whatever.example:80",
        method: "POST",
        path,
        query: None,
        headers: &headers,
        source: None,
    };
    let wp = NamespacedName::new("egress", "wp");
    match route_to(m, &wp, &target(m, what, host), &req) {
        Routing::Default => "default".to_string(),
        Routing::NoMatch => "404".to_string(),
        Routing::Matched(s) => s.rule.name.clone().unwrap_or_default(),
    }
}

#[test]
fn routes_attach_to_a_service_entry_by_its_parent_refs() {
    let m = model();
    for (what, path, want) in [
        // Every port; `port: 443` and `sectionName: http-alt` only theirs, where the longer
        // prefix of their rule wins.
        ("egress/httpbin:80", "/port", "entry-all"),
        ("egress/httpbin:443", "/port", "entry-443"),
        ("egress/httpbin:443", "/section", "entry-all"),
        ("egress/httpbin:8080", "/section", "entry-alt"),
        ("egress/httpbin:8080", "/port", "entry-all"),
        // A Service parent of the same name is not the entry, nor the other way round.
        ("egress/httpbin:80", "/service", "entry-all"),
        ("svc:egress/httpbin:80", "/service", "service-all"),
        ("svc:egress/httpbin:80", "/port", "404"),
        // Routes of another namespace do not attach (`foreign`), nor do routes to an entry
        // of another namespace (`cross-parent`): the waypoint's routes apply there.
        ("egress/httpbin:80", "/foreign", "entry-all"),
        ("elsewhere/httpbin:80", "/", "gw-all"),
        // An entry without routes of its own gets the waypoint's.
        ("egress/plain:80", "/", "gw-all"),
    ] {
        assert_eq!(rule_of(&m, what, None, path), want, "{what} {path}");
    }
    // A route on the entry wins over the waypoint's; `kind` says which attached it.
    let entry = target(&m, "egress/httpbin:80", None);
    let (routes, kind) = routes_for_target(&m, &NamespacedName::new("egress", "wp"), &entry);
    let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!((names, kind), (vec!["on-entry"], ParentKind::ServiceEntry));
    let plain = target(&m, "egress/plain:80", None);
    let (routes, kind) = routes_for_target(&m, &NamespacedName::new("egress", "wp"), &plain);
    let names: Vec<&str> = routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!((names, kind), (vec!["gw"], ParentKind::Gateway));
}

#[test]
fn a_grpcroute_on_a_service_entry_wins_over_its_httproutes() {
    let m = model();
    assert_eq!(
        rule_of(&m, "egress/grpc:9000", None, "/pkg.Echo/Unary"),
        "grpc-echo"
    );
    assert_eq!(rule_of(&m, "egress/grpc:9000", None, "/other.S/M"), "404");
    let entry = target(&m, "egress/grpc:9000", None);
    let (routes, _) = routes_for_target(&m, &NamespacedName::new("egress", "wp"), &entry);
    assert!(
        routes.iter().all(|r| r.kind == RouteKind::Grpc),
        "{routes:?}"
    );
}

#[test]
fn virtual_service_hosts_name_a_service_entry_host() {
    let m = model();
    for (what, host, want) in [
        // Case-insensitive host of any namespace's VirtualService.
        ("egress/api:443", None, "vs-api"),
        // A wildcard VirtualService host covers the entry's host.
        ("egress/wild:80", None, "vs-wild"),
        // An entry's routes win over a VirtualService for its host.
        ("egress/httpbin:80", None, "entry-all"),
        // Without a mesh VirtualService or a route: the entry itself, then the waypoint's.
        ("egress/plain:80", None, "gw-all"),
        // Any of its hosts, or the one the connection is for when known.
        ("egress/twins:80", None, "vs-twin-b"),
        ("egress/twins:80", Some("b.twins.example"), "vs-twin-b"),
        ("egress/twins:80", Some("a.twins.example"), "gw-all"),
    ] {
        assert_eq!(rule_of(&m, what, host, "/"), want, "{what} {host:?}");
    }
    let api = target(&m, "egress/api:443", None);
    assert_eq!(
        virtual_service_for_target(&m, &api).map(|vs| vs.name.as_str()),
        Some("api")
    );
    let plain = target(&m, "egress/plain:80", None);
    assert!(virtual_service_for_target(&m, &plain).is_none(), "not mesh");
}

#[test]
fn a_backend_naming_the_entry_or_one_of_its_hosts_is_the_entry() {
    let m = model();
    let rule_backends = |kind: &str, name: &str| -> Vec<BackendRef> {
        match kind {
            "route" => m
                .http_routes
                .iter()
                .find(|r| r.name == name)
                .map(|r| r.rules[0].backends.clone()),
            _ => m
                .virtual_services
                .iter()
                .find(|v| v.name == name)
                .map(|v| v.rules[0].backends.clone()),
        }
        .expect("object")
    };
    let own_route = rule_backends("route", "on-entry");
    let own_vs = rule_backends("vs", "api");
    let service_key = NamespacedName::new("egress", "httpbin");
    let host_key = NamespacedName::new("", "api.example.com");
    for (what, backend, want) in [
        // `kind: ServiceEntry` naming the request's entry.
        ("egress/httpbin:80", &own_route[0], BackendTarget::OwnEntry),
        // The same backend for another entry of that name, or a Service.
        (
            "elsewhere/httpbin:80",
            &own_route[0],
            BackendTarget::OtherEntry(&service_key),
        ),
        (
            "svc:egress/httpbin:80",
            &own_route[0],
            BackendTarget::OtherEntry(&service_key),
        ),
        // A VirtualService destination host that is the entry's host.
        ("egress/api:443", &own_vs[0], BackendTarget::OwnEntry),
        // For another destination it stays a host no Service has.
        (
            "egress/plain:80",
            &own_vs[0],
            BackendTarget::Service(&host_key),
        ),
    ] {
        assert_eq!(
            backend_target(backend, &target(&m, what, None)),
            want,
            "{what}"
        );
    }
}
