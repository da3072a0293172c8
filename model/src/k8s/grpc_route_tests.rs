//! GRPCRoute translation: what a valid route becomes in the model, and the named error of
//! each invalid one.

use super::*;
use crate::model::{GrpcMethodMatch, ParentKind, PathMatch, RouteKind, ValueMatch};

/// Loads a GRPCRoute with `spec` (indented by two) as `default/g`; `Ok` the route, `Err` the
/// message.
fn load(spec: &str) -> Result<HttpRoute, String> {
    let doc = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\n\
         metadata: {{name: g, namespace: default}}\nspec:\n{spec}"
    );
    load_docs(&[("grpc.yaml".to_string(), doc)])
        .map(|m| m.http_routes[0].clone())
        .map_err(|e| e.to_string())
}

fn check(spec: &str, expected: Result<fn(&HttpRoute), &str>) {
    match (load(spec), expected) {
        (Ok(route), Ok(assert)) => assert(&route),
        (Err(got), Err(want)) => assert!(got.contains(want), "{got:?} lacks {want:?}\n{spec}"),
        (got, _) => panic!("unexpected {got:?} for\n{spec}"),
    }
}

/// The path match of the first match of the first rule, for a `method:` body.
fn method_path(method: &str) -> Result<(PathMatch, GrpcMethodMatch), String> {
    let r = load(&format!(
        "  parentRefs: [{{group: \"\", kind: Service, name: echo}}]\n  rules:\n  - matches: [{{method: {method}}}]\n"
    ))?;
    let m = &r.rules[0].matches[0];
    Ok((m.path.clone(), m.grpc.clone().expect("grpc match")))
}

fn check_method(method: &str, path_ok: fn(&PathMatch) -> bool) {
    let (path, _) = method_path(method).unwrap_or_else(|e| panic!("{method}: {e}"));
    assert!(path_ok(&path), "{method}: {path:?}");
}

#[test]
fn a_full_grpc_route_becomes_a_model_route_of_kind_grpc() {
    check(
        r#"
  parentRefs:
  - {group: "", kind: Service, name: echo, port: 9000}
  - {name: waypoint}
  hostnames: ["grpc.example.com"]
  rules:
  - name: unary-v2
    matches:
    - method: {service: echo.v1.Echo, method: Unary}
      headers: [{name: X-Version, value: v2}, {type: RegularExpression, name: x-b, value: "a|b"}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-a, value: "1"}]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-r, value: "2"}]}
    backendRefs:
    - {name: echo-v2, port: 9000, weight: 80}
    - name: echo-v1
      port: 9000
      weight: 20
      filters: [{type: RequestHeaderModifier, requestHeaderModifier: {add: [{name: x-v1, value: "1"}]}}]
  - backendRefs: [{name: echo, port: 9000}]
"#,
        Ok(|r| {
            assert_eq!(r.kind, RouteKind::Grpc);
            assert_eq!(r.parents[0].kind, ParentKind::Service);
            assert_eq!(r.parents[0].port, Some(9000));
            assert_eq!(r.parents[1].kind, ParentKind::Gateway);
            assert_eq!(r.hostnames, ["grpc.example.com"]);
            let rule = &r.rules[0];
            assert_eq!(rule.name.as_deref(), Some("unary-v2"));
            let m = &rule.matches[0];
            assert_eq!(m.path, PathMatch::Exact("/echo.v1.Echo/Unary".into()));
            assert_eq!(
                m.grpc,
                Some(GrpcMethodMatch {
                    service: Some("echo.v1.Echo".into()),
                    method: Some("Unary".into()),
                    regex: false
                })
            );
            assert_eq!(m.headers[0].name.as_str(), "x-version");
            assert!(
                matches!(&m.headers[1].value, ValueMatch::RegularExpression(p) if p.is_match("a") && !p.is_match("ab"))
            );
            assert!(rule.filters.request_headers.is_some());
            assert!(rule.filters.response_headers.is_some());
            assert_eq!(rule.backends.len(), 2);
            assert_eq!(rule.backends[0].weight, 80);
            assert_eq!(rule.backends[0].subset, None);
            assert!(rule.backends[1].filters.request_headers.is_some());
            // A rule without matches matches every request.
            assert_eq!(r.rules[1].matches[0].path, PathMatch::Prefix("/".into()));
            assert_eq!(r.rules[1].matches[0].grpc, None);
            assert!(r.rules[1].timeouts.request.is_none());
        }),
    );
}

#[test]
fn method_matches_become_path_matches() {
    check_method("{service: echo.v1.Echo, method: Unary}", |p| {
        *p == PathMatch::Exact("/echo.v1.Echo/Unary".into())
    });
    check_method("{type: Exact, service: echo.v1.Echo}", |p| {
        *p == PathMatch::Prefix("/echo.v1.Echo".into())
    });
    check_method("{method: Unary}", |p| {
        matches!(p, PathMatch::RegularExpression(r)
            if r.is_match("/a.B/Unary") && !r.is_match("/a/b/Unary") && !r.is_match("/a/Unary2"))
    });
    check_method(
        r#"{type: RegularExpression, service: "echo\\.v[0-9]+\\.Echo", method: "Server.*"}"#,
        |p| {
            matches!(p, PathMatch::RegularExpression(r)
            if r.is_match("/echo.v12.Echo/ServerStream") && !r.is_match("/echo.v1.Echo/Unary")
                && !r.is_match("/x/echo.v1.Echo/ServerStream"))
        },
    );
    check_method(r#"{type: RegularExpression, method: "Bidi|Unary"}"#, |p| {
        matches!(p, PathMatch::RegularExpression(r)
            if r.is_match("/any.Svc/Bidi") && r.is_match("/x/Unary") && !r.is_match("/x/y/Bidi"))
    });
    check_method("{service: .leading.Dot}", |p| {
        *p == PathMatch::Prefix("/.leading.Dot".into())
    });
    let (_, grpc) = method_path("{type: RegularExpression, service: a.b}").expect("valid");
    assert!(grpc.regex);
    assert_eq!(grpc.method, None);
}

#[test]
fn invalid_grpc_routes_are_refused_by_name() {
    let parent = "  parentRefs: [{group: \"\", kind: Service, name: echo}]\n";
    let bad = |body: &str, want: &str| {
        let spec = format!("{parent}{body}");
        match load(&spec) {
            Err(e) => {
                assert!(e.contains(want), "{e:?} lacks {want:?}\n{spec}");
                assert!(
                    e.contains("grpc.yaml doc 1: GRPCRoute default/g"),
                    "names file, doc and object: {e}"
                );
            }
            Ok(r) => panic!("accepted {r:?}\n{spec}"),
        }
    };
    bad(
        "  rules: [{matches: [{method: {type: Exact}}]}]\n",
        "one or both of service and method",
    );
    bad(
        "  rules: [{matches: [{method: {service: \"\", method: \"\"}}]}]\n",
        "one or both of service and method",
    );
    bad(
        "  rules: [{matches: [{method: {service: \"echo/v1\", method: Unary}}]}]\n",
        "rules[0].matches[0].method.service: invalid service name",
    );
    bad(
        "  rules: [{matches: [{method: {service: a.b, method: \"Un-ary\"}}]}]\n",
        "method.method: invalid method name",
    );
    bad(
        "  rules: [{matches: [{method: {type: Prefix, service: a}}]}]\n",
        "unknown method match type \"Prefix\"",
    );
    bad(
        "  rules: [{matches: [{method: {type: RegularExpression, service: \"(open\"}}]}]\n",
        "invalid regular expression",
    );
    bad(
        "  rules: [{matches: [{method: {service: a}, path: {value: /x}}]}]\n",
        "matches[0].path: unknown field",
    );
    bad(
        "  rules: [{matches: [{headers: [{name: a, value: \"1\"}, {name: A, value: \"2\"}]}]}]\n",
        "header a matched twice",
    );
    bad(
        "  rules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: x}}}]}]\n",
        "port",
    );
    bad(
        "  rules: [{filters: [{type: URLRewrite, urlRewrite: {hostname: a}}]}]\n",
        "unknown GRPCRoute filter type \"URLRewrite\"",
    );
    bad(
        "  rules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {}}, {type: RequestHeaderModifier, requestHeaderModifier: {}}]}]\n",
        "given more than once",
    );
    bad(
        "  rules: [{backendRefs: [{name: x, port: 1, filters: [{type: RequestMirror, requestMirror: {}}]}]}]\n",
        "filter type RequestMirror is not supported",
    );
    bad(
        "  rules: [{timeouts: {request: 1s}}]\n",
        "rules[0].timeouts: unknown field",
    );
    bad(
        "  rules: [{sessionPersistence: {type: Cookie}}]\n",
        "sessionPersistence is not supported",
    );
    bad(
        "  rules: [{name: a}, {name: a}]\n",
        "rule name \"a\" is not unique",
    );
    bad(
        "  rules: [{backendRefs: [{name: x, port: 1, weight: -1}]}]\n",
        "out of range",
    );
    bad(
        "  rules: [{backendRefs: [{kind: ServiceImport, name: x, port: 1}]}]\n",
        "unsupported backend",
    );
    let nine = ["{method: {service: a}}"; 9].join(", ");
    bad(
        &format!("  rules: [{{matches: [{nine}]}}]\n"),
        "at most 8 entries allowed",
    );
    bad(
        &format!("  rules: [{}]\n", ["{}"; 17].join(", ")),
        "at most 16 entries allowed",
    );
    bad("  hostnames: [\"10.0.0.1\"]\n", "invalid hostname");
    bad("  unknown: 1\n", "spec.unknown: unknown field");
    // Only v1 is read.
    let doc = "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: GRPCRoute\n\
               metadata: {name: g, namespace: default}\nspec: {}\n";
    let e = load_docs(&[("grpc.yaml".to_string(), doc.to_string())]).expect_err("v1alpha2");
    assert!(e.to_string().contains("unsupported version"), "{e}");
}

#[test]
fn an_httproute_and_a_grpcroute_may_share_a_name() {
    let docs = "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\n\
                metadata: {name: r, namespace: default}\nspec: {}\n---\n\
                apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
                metadata: {name: r, namespace: default}\nspec: {}\n";
    let m = load_docs(&[("r.yaml".to_string(), docs.to_string())]).expect("both load");
    let kinds: Vec<RouteKind> = m.http_routes.iter().map(|r| r.kind).collect();
    assert_eq!(kinds, [RouteKind::Http, RouteKind::Grpc]);
}

#[test]
fn a_rule_level_request_mirror_is_read_as_httproute_s() {
    let r = load(
        "  parentRefs: [{group: \"\", kind: Service, name: echo}]\n  rules:\n  - filters: [{type: RequestMirror, requestMirror: {backendRef: {name: shadow, port: 9000}, percent: 25}}]\n    backendRefs: [{name: echo, port: 9000}]\n",
    )
    .expect("valid");
    let mirrors = &r.rules[0].filters.mirrors;
    assert_eq!(mirrors.len(), 1, "{mirrors:?}");
    assert_eq!(mirrors[0].service.name, "shadow");
    assert_eq!(mirrors[0].percent, 25.0);
    assert_eq!(mirrors[0].port, Some(9000));
}

#[test]
fn a_grpcroute_attaches_to_a_service_entry_and_sends_to_it() {
    check(
        r#"
  parentRefs: [{group: networking.istio.io, kind: ServiceEntry, name: grpc-api, sectionName: grpc}]
  rules:
  - backendRefs: [{group: networking.istio.io, kind: ServiceEntry, name: grpc-api, port: 9000}]
"#,
        Ok(|r| {
            assert_eq!(r.kind, RouteKind::Grpc);
            assert_eq!(r.parents[0].kind, ParentKind::ServiceEntry);
            assert_eq!(r.parents[0].section_name.as_deref(), Some("grpc"));
            let b = &r.rules[0].backends[0];
            assert_eq!(
                (b.kind, b.service.name.as_str(), b.port),
                (crate::route::BackendKind::ServiceEntry, "grpc-api", 9000)
            );
        }),
    );
    check(
        "  parentRefs: [{group: networking.istio.io, kind: WorkloadEntry, name: x}]\n",
        Err("spec.parentRefs[0]: unsupported parent"),
    );
}
