//! HTTPRoute translation: what a valid route becomes, and the named error of each invalid one.

use std::time::Duration;

use super::*;
use crate::model::{ParentKind, PathMatch, PathModifier, Scheme, ValueMatch};
use crate::route::BackendKind;

/// Loads `route` (a YAML `spec` body, indented by two) as `default/r`; `Ok` the route, `Err`
/// the message.
fn load(spec: &str) -> Result<HttpRoute, String> {
    let doc = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {{name: r, namespace: default}}\nspec:\n{spec}"
    );
    load_docs(&[("routes.yaml".to_string(), doc)])
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

#[test]
fn a_full_route_becomes_typed_model_data() {
    check(
        r#"
  parentRefs:
  - {group: "", kind: Service, name: echo, port: 80}
  - {name: waypoint, sectionName: mesh}
  hostnames: ["*.example.com"]
  rules:
  - name: v2
    matches:
    - path: {type: PathPrefix, value: /api/}
      headers: [{name: X-Version, value: v2}, {type: RegularExpression, name: x-b, value: "a|b"}]
      queryParams: [{name: q, value: "1"}]
      method: GET
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-a, value: "1"}], add: [{name: x-b, value: "2"}], remove: [x-c]}
    - type: URLRewrite
      urlRewrite: {hostname: new.example.com, path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
    backendRefs:
    - {name: echo-v2, port: 80, weight: 80}
    - {name: echo-v1, namespace: other, port: 80, weight: 0}
    timeouts: {request: 1m30s, backendRequest: 500ms}
  - matches: [{path: {type: Exact, value: /old}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {scheme: https, hostname: new.example.com, port: 8443, statusCode: 301, path: {type: ReplaceFullPath, replaceFullPath: /new}}
"#,
        Ok(|r| {
            assert_eq!(r.parents.len(), 2);
            assert_eq!(r.parents[0].kind, ParentKind::Service);
            assert_eq!(r.parents[0].port, Some(80));
            assert_eq!(r.parents[1].kind, ParentKind::Gateway);
            assert_eq!(
                r.parents[1].target,
                NamespacedName::new("default", "waypoint")
            );
            let rule = &r.rules[0];
            let m = &rule.matches[0];
            assert_eq!(
                m.path,
                PathMatch::Prefix("/api".into()),
                "trailing slash dropped"
            );
            assert_eq!(m.headers[0].name.as_str(), "x-version");
            assert!(
                matches!(&m.headers[1].value, ValueMatch::RegularExpression(p) if p.is_match("b") && !p.is_match("ab"))
            );
            assert_eq!(m.method.as_deref(), Some("GET"));
            let headers = rule.filters.request_headers.as_ref().expect("modifier");
            assert_eq!(
                (headers.set.len(), headers.add.len(), headers.remove.len()),
                (1, 1, 1)
            );
            let rewrite = rule.filters.url_rewrite.as_ref().expect("rewrite");
            assert_eq!(
                rewrite.path,
                Some(PathModifier::ReplacePrefixMatch("/v2".into()))
            );
            assert_eq!(rule.backends[0].weight, 80);
            assert_eq!(
                rule.backends[1].service,
                NamespacedName::new("other", "echo-v1")
            );
            assert_eq!(rule.backends[1].weight, 0);
            assert_eq!(rule.timeouts.request, Some(Duration::from_secs(90)));
            assert_eq!(
                rule.timeouts.backend_request,
                Some(Duration::from_millis(500))
            );
            let redirect = r.rules[1].filters.redirect.as_ref().expect("redirect");
            assert_eq!(redirect.scheme, Some(Scheme::Https));
            assert_eq!(redirect.status_code, 301);
            assert!(r.rules[1].backends.is_empty());
        }),
    );
    // Defaults: no matches = PathPrefix /, weight 1, redirect 302, `0s` = no timeout.
    check(
        r#"
  parentRefs: [{kind: Service, group: "", name: echo}]
  rules:
  - backendRefs: [{name: echo, port: 80}]
    timeouts: {request: 0s}
  - matches: [{path: {value: /x}}]
    filters: [{type: RequestRedirect, requestRedirect: {}}]
"#,
        Ok(|r| {
            assert_eq!(r.rules[0].matches[0].path, PathMatch::Prefix("/".into()));
            assert_eq!(r.rules[0].backends[0].weight, 1);
            assert_eq!(r.rules[0].timeouts.request, None);
            assert_eq!(r.rules[1].matches[0].path, PathMatch::Prefix("/x".into()));
            assert_eq!(
                r.rules[1].filters.redirect.as_ref().map(|r| r.status_code),
                Some(302)
            );
        }),
    );
}

#[test]
fn invalid_routes_are_refused_with_file_doc_and_field() {
    let bad = |spec: &str, want: &str| check(spec, Err(want));
    bad(
        "  parentRefs: [{kind: Service, group: '', name: echo}]\n  rules: [{matches: [{path: {type: Exact, value: admin}}]}]\n",
        "routes.yaml doc 1: HTTPRoute default/r: spec.rules[0].matches[0].path.value: path \"admin\" must be absolute",
    );
    bad(
        "  rules: [{matches: [{path: {type: Exact, value: /a%2Fb}}]}]\n",
        "spec.rules[0].matches[0].path.value: path has an encoded slash",
    );
    bad(
        "  rules: [{matches: [{path: {type: Glob, value: /a}}]}]\n",
        "spec.rules[0].matches[0].path: unknown path match type \"Glob\"",
    );
    bad(
        "  rules: [{matches: [{path: {type: RegularExpression, value: '(unclosed'}}]}]\n",
        "spec.rules[0].matches[0].path.value: invalid regular expression",
    );
    bad(
        "  rules: [{matches: [{path: {type: RegularExpression, value: '\\w{1000}\\w{1000}\\w{1000}'}}]}]\n",
        "spec.rules[0].matches[0].path.value: regular expression too large",
    );
    bad(
        "  rules: [{matches: [{headers: [{name: 'bad header', value: x}]}]}]\n",
        "spec.rules[0].matches[0].headers[0].name: invalid header name",
    );
    bad(
        "  rules: [{matches: [{method: get}]}]\n",
        "spec.rules[0].matches[0].method: unknown method \"get\"",
    );
    bad(
        "  rules: [{backendRefs: [{name: echo, port: 80, weight: -1}]}]\n",
        "spec.rules[0].backendRefs[0].weight: weight -1 out of range",
    );
    bad(
        "  rules: [{backendRefs: [{name: echo}]}]\n",
        "spec.rules[0].backendRefs[0].port: required",
    );
    bad(
        "  rules: [{backendRefs: [{kind: ServiceImport, group: multicluster.x-k8s.io, name: echo, port: 80}]}]\n",
        "spec.rules[0].backendRefs[0]: unsupported backend",
    );
    bad(
        "  rules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}, percent: 101}}]}]\n",
        "spec.rules[0].filters[0].requestMirror.percent: percent 101 out of range 0-100",
    );
    bad(
        "  rules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}, fraction: {numerator: 3, denominator: 2}}}]}]\n",
        "spec.rules[0].filters[0].requestMirror.fraction: fraction 3/2",
    );
    bad(
        "  rules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {name: m}}}]}]\n",
        "spec.rules[0].filters[0].requestMirror.backendRef.port: required",
    );
    bad(
        "  rules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {kind: Pod, name: m, port: 80}}}]}]\n",
        "requestMirror.backendRef: unsupported mirror backend",
    );
    bad(
        "  rules: [{filters: [{type: RequestRedirect, requestRedirect: {statusCode: 307}}]}]\n",
        "spec.rules[0].filters[0].requestRedirect.statusCode: status code 307",
    );
    bad(
        "  rules: [{filters: [{type: RequestRedirect, requestRedirect: {}}], backendRefs: [{name: e, port: 80}]}]\n",
        "spec.rules[0]: RequestRedirect filter must not be used together with backendRefs",
    );
    bad(
        "  rules: [{matches: [{path: {type: Exact, value: /a}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /b}}}]}]\n",
        "spec.rules[0].filters: ReplacePrefixMatch is only compatible with PathPrefix",
    );
    bad(
        "  rules: [{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x, value: \"a\\r\\nb\"}]}}]}]\n",
        "spec.rules[0].filters[0].requestHeaderModifier.set[0].value: invalid header value",
    );
    bad(
        "  rules: [{timeouts: {request: 1s, backendRequest: 2s}}]\n",
        "spec.rules[0].timeouts.backendRequest: must not be longer than timeouts.request",
    );
    bad(
        "  rules: [{timeouts: {request: 1.5s}}]\n",
        "spec.rules[0].timeouts.request: invalid duration \"1.5s\"",
    );
    bad(
        "  rules: [{retry: {attempts: 2}}]\n",
        "spec.rules[0].retry: unknown field",
    );
    bad(
        "  parentRefs: [{kind: Ingress, name: x}]\n",
        "spec.parentRefs[0]: unsupported parent",
    );
    bad(
        "  hostnames: ['Upper.Example']\n",
        "spec.hostnames[0]: invalid hostname",
    );
    let many: Vec<String> = (0..17).map(|i| format!("{{name: r{i}}}")).collect();
    bad(
        &format!("  rules: [{}]\n", many.join(", ")),
        "spec.rules: at most 16 entries allowed, found 17",
    );
    // A hostile route cannot hold an unbounded number of regexes.
    let regex_match = "{path: {type: RegularExpression, value: '/a.*'}, headers: [{type: RegularExpression, name: x, value: 'b.*'}]}";
    let matches = vec![regex_match; 64].join(", ");
    let rules = vec![format!("{{matches: [{matches}]}}"); 2].join(", ");
    bad(
        &format!("  rules: [{rules}]\n"),
        "more than 128 regular expressions in one route",
    );
}

#[test]
fn a_bad_route_keeps_the_rest_of_the_directory_from_loading() {
    let good = "apiVersion: v1\nkind: Service\nmetadata: {name: echo}\nspec: {clusterIP: 10.96.0.1, ports: [{port: 80}]}\n";
    let bad = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\nspec: {rules: [{matches: [{method: BREW}]}]}\n";
    let got = load_docs(&[
        ("a.yaml".to_string(), good.to_string()),
        ("b.yaml".to_string(), bad.to_string()),
    ]);
    let err = got.expect_err("refused").to_string();
    assert!(
        err.starts_with("b.yaml doc 1: HTTPRoute default/r: spec.rules[0].matches[0].method"),
        "{err}"
    );
}

#[test]
fn gateway_api_durations() {
    for (s, want) in [
        ("1s", Some(Duration::from_secs(1))),
        ("500ms", Some(Duration::from_millis(500))),
        ("1h2m3s4ms", Some(Duration::from_millis(3_723_004))),
        ("0s", Some(Duration::ZERO)),
        ("99999s", Some(Duration::from_secs(99_999))),
        ("100000s", None),
        ("1h1h1h1h1h", None),
        ("", None),
        ("1", None),
        ("s", None),
        ("1d", None),
        ("-1s", None),
    ] {
        assert_eq!(route::parse_duration(s), want, "{s:?}");
    }
}

#[test]
fn request_mirrors_name_a_service_and_a_share() {
    check(
        r#"
  rules:
  - filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: m, port: 80}}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: n, namespace: other, port: 81}, percent: 25}}
    - {type: RequestMirror, requestMirror: {backendRef: {name: f, port: 80}, fraction: {numerator: 1, denominator: 8}}}
    backendRefs: [{name: echo, port: 80}]
"#,
        Ok(|r| {
            let m = &r.rules[0].filters.mirrors;
            let got: Vec<(String, Option<u16>, f64)> = m
                .iter()
                .map(|m| (m.service.to_string(), m.port, m.percent))
                .collect();
            assert_eq!(
                got,
                [
                    ("default/m".to_string(), Some(80), 100.0),
                    ("other/n".to_string(), Some(81), 25.0),
                    ("default/f".to_string(), Some(80), 12.5),
                ]
            );
        }),
    );
}

#[test]
fn a_service_entry_is_a_parent_and_a_backend_of_istio_networking() {
    // Istio's egress waypoint: a route on a ServiceEntry, its backend the entry itself (port
    // optional: the request's) or a Service.
    check(
        r#"
  parentRefs:
  - {group: networking.istio.io, kind: ServiceEntry, name: httpbin.org, port: 443}
  - {group: networking.istio.io, kind: ServiceEntry, name: api, namespace: other, sectionName: http}
  rules:
  - backendRefs:
    - {group: networking.istio.io, kind: ServiceEntry, name: httpbin.org}
    - {group: networking.istio.io, kind: ServiceEntry, name: httpbin.org, port: 8443, weight: 0}
    - {name: proxy, port: 3128}
"#,
        Ok(|r| {
            assert_eq!(r.parents[0].kind, ParentKind::ServiceEntry);
            assert_eq!(
                r.parents[0].target,
                NamespacedName::new("default", "httpbin.org")
            );
            assert_eq!(
                (r.parents[0].port, r.parents[0].section_name.as_deref()),
                (Some(443), None)
            );
            assert_eq!(r.parents[1].kind, ParentKind::ServiceEntry);
            assert_eq!(r.parents[1].target, NamespacedName::new("other", "api"));
            assert_eq!(r.parents[1].section_name.as_deref(), Some("http"));
            let b = &r.rules[0].backends;
            let kinds: Vec<(BackendKind, &str, u16)> = b
                .iter()
                .map(|b| (b.kind, b.service.name.as_str(), b.port))
                .collect();
            assert_eq!(
                kinds,
                [
                    (BackendKind::ServiceEntry, "httpbin.org", 0),
                    (BackendKind::ServiceEntry, "httpbin.org", 8443),
                    (BackendKind::Service, "proxy", 3128),
                ]
            );
            assert!(b.iter().all(|b| b.host.is_none()), "not a VirtualService");
        }),
    );
    let bad = |spec: &str, want: &str| check(spec, Err(want));
    // The kind is Istio's: another group (or none) is not a ServiceEntry.
    bad(
        "  parentRefs: [{group: '', kind: ServiceEntry, name: httpbin}]\n",
        "spec.parentRefs[0]: unsupported parent \"\"/ServiceEntry",
    );
    bad(
        "  parentRefs: [{kind: ServiceEntry, name: httpbin}]\n",
        "spec.parentRefs[0]: unsupported parent \"gateway.networking.k8s.io\"/ServiceEntry",
    );
    bad(
        "  rules: [{backendRefs: [{kind: ServiceEntry, name: httpbin}]}]\n",
        "spec.rules[0].backendRefs[0]: unsupported backend \"\"/ServiceEntry",
    );
    bad(
        "  rules: [{backendRefs: [{group: networking.istio.io, kind: VirtualService, name: x}]}]\n",
        "spec.rules[0].backendRefs[0]: unsupported backend",
    );
    // Mirrors still name Services only.
    bad(
        "  rules: [{filters: [{type: RequestMirror, requestMirror: {backendRef: {group: networking.istio.io, kind: ServiceEntry, name: m, port: 80}}}]}]\n",
        "requestMirror.backendRef: unsupported mirror backend",
    );
}
