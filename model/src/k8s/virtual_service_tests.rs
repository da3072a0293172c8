//! VirtualService translation: what a valid one becomes, and the named error of invalid ones.

use std::time::Duration;

use super::*;
use crate::model::{AbortStatus, PathMatch, PathModifier, ValueMatch, VirtualService, VsGateway};

fn load(spec: &str) -> Result<VirtualService, String> {
    let doc = format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {{name: vs, namespace: shop}}\nspec:\n{spec}"
    );
    load_docs(&[("vs.yaml".to_string(), doc)])
        .map(|m| m.virtual_services[0].clone())
        .map_err(|e| e.to_string())
}

#[test]
fn a_full_virtual_service_becomes_typed_rules() {
    let vs = load(
        r#"
  hosts: [web, api.other.svc.cluster.local, "*.example.com"]
  http:
  - name: main
    match: [{uri: {prefix: /api}, headers: {x-v: {regex: "v[0-9]"}}, method: {exact: GET}}]
    route:
    - {destination: {host: web, subset: v1, port: {number: 80}}, weight: 90, headers: {request: {set: {x-a: "1"}}}}
    - {destination: {host: api.other}, weight: 10}
    timeout: 1.5s
    retries: {attempts: 3, perTryTimeout: 300ms, retryOn: "5xx,reset,409,unavailable"}
    fault: {delay: {fixedDelay: 2s, percent: 12}, abort: {grpcStatus: UNAVAILABLE, percentage: {value: 5}}}
    headers: {request: {add: {x-b: "2"}, remove: [x-c]}, response: {set: {x-d: "3"}}}
    rewrite: {uri: /v2, authority: new.example.com}
    mirror: {host: shadow}
    mirrorPercentage: {value: 50}
    mirrors: [{destination: {host: other, port: {number: 81}}}]
  - redirect: {uri: /new, authority: a.example.com, redirectCode: 308, scheme: https}
  - directResponse: {status: 418, body: {string: teapot}}
"#,
    )
    .expect("valid");
    assert_eq!(
        vs.hosts,
        [
            "web.shop.svc.cluster.local",
            "api.other.svc.cluster.local",
            "*.example.com"
        ]
    );
    assert!(vs.mesh);
    let r = &vs.rules[0];
    assert_eq!(r.matches[0].path, PathMatch::StringPrefix("/api".into()));
    assert!(matches!(
        r.matches[0].headers[0].value,
        ValueMatch::RegularExpression(_)
    ));
    assert_eq!(r.matches[0].method.as_deref(), Some("GET"));
    assert_eq!(r.backends[0].subset.as_deref(), Some("v1"));
    assert_eq!((r.backends[0].weight, r.backends[1].weight), (90, 10));
    assert_eq!(r.backends[1].service, NamespacedName::new("other", "api"));
    assert_eq!(r.backends[1].port, 0);
    assert!(r.backends[0].filters.request_headers.is_some());
    assert_eq!(r.timeouts.request, Some(Duration::from_millis(1500)));
    let retries = r.retries.as_ref().expect("retries");
    assert_eq!(retries.attempts, 3);
    assert_eq!(retries.per_try_timeout, Some(Duration::from_millis(300)));
    assert!(retries.retry_on.five_xx && retries.retry_on.reset);
    assert_eq!(retries.retry_on.status_codes, [409]);
    assert_eq!(retries.retry_on.grpc_statuses, [14]);
    let fault = r.fault.as_ref().expect("fault");
    assert_eq!(fault.delay.as_ref().map(|d| d.percent), Some(12.0));
    let abort = fault.abort.as_ref().expect("abort");
    assert_eq!((abort.status, abort.percent), (AbortStatus::Grpc(14), 5.0));
    let f = &r.filters;
    assert_eq!(f.request_headers.as_ref().map(|h| h.add.len()), Some(1));
    assert_eq!(f.response_headers.as_ref().map(|h| h.set.len()), Some(1));
    let rw = f.url_rewrite.as_ref().expect("rewrite");
    assert_eq!(rw.hostname.as_deref(), Some("new.example.com"));
    assert_eq!(
        rw.path,
        Some(PathModifier::ReplaceMatchedPrefixOrPath("/v2".into()))
    );
    assert_eq!(f.mirrors.len(), 2);
    assert_eq!((f.mirrors[0].percent, f.mirrors[0].port), (50.0, None));
    assert_eq!((f.mirrors[1].percent, f.mirrors[1].port), (100.0, Some(81)));
    let redirect = vs.rules[1].filters.redirect.as_ref().expect("redirect");
    assert_eq!(redirect.status_code, 308);
    assert_eq!(redirect.hostname.as_deref(), Some("a.example.com"));
    let direct = vs.rules[2]
        .filters
        .direct_response
        .as_ref()
        .expect("direct");
    assert_eq!((direct.status, &direct.body[..]), (418, &b"teapot"[..]));
    assert_eq!(
        vs.rules[2].matches[0].path,
        PathMatch::StringPrefix("/".into())
    );
}

#[test]
fn invalid_virtual_services_are_refused_with_file_doc_and_field() {
    let bad = |spec: &str, want: &str| {
        let got = load(spec).expect_err(spec);
        assert!(got.contains(want), "{got:?} lacks {want:?}\n{spec}");
        assert!(
            got.starts_with("vs.yaml doc 1: VirtualService shop/vs: "),
            "{got}"
        );
    };
    bad(
        "  hosts: [web]\n  http: [{route: [{destination: {host: web}}], bogus: 1}]\n",
        "spec.http[0].bogus: unknown field",
    );
    bad(
        "  http: [{route: [{destination: {host: web}}]}]\n",
        "at least one host",
    );
    bad(
        "  hosts: [web]\n  http: [{}]\n",
        "exactly one of route, redirect or directResponse",
    );
    bad("  hosts: [web]\n  http: [{match: [{uri: {regex: '(x'}}], route: [{destination: {host: web}}]}]\n", "spec.http[0].match[0].uri.regex: invalid regular expression");
    bad("  hosts: [web]\n  http: [{match: [{uri: {exact: /a, prefix: /b}}], route: [{destination: {host: web}}]}]\n", "exactly one of exact, prefix or regex");
    bad("  hosts: [web]\n  http: [{route: [{destination: {host: web}}], retries: {attempts: 1, retryOn: 'sometimes'}}]\n", "spec.http[0].retries.retryOn: unknown retryOn condition \"sometimes\"");
    bad("  hosts: [web]\n  http: [{route: [{destination: {host: web}}], fault: {abort: {httpStatus: 700}}}]\n", "httpStatus 700 out of range");
    bad("  hosts: [web]\n  http: [{route: [{destination: {host: web}}], fault: {delay: {fixedDelay: soon}}}]\n", "spec.http[0].fault.delay.fixedDelay: invalid duration");
    bad("  hosts: [web]\n  http: [{route: [{destination: {host: web}}], mirrorPercentage: {value: 10}}]\n", "mirrorPercentage needs mirror");
    bad("  hosts: [web]\n  http: [{route: [{destination: {host: web}}], mirror: {host: m}, mirrorPercentage: {value: 101}}]\n", "out of range 0-100");
    bad(
        "  hosts: [web]\n  http: [{redirect: {uri: /x, redirectCode: 200}}]\n",
        "redirect code 200",
    );
    bad(
        "  hosts: [web]\n  tcp: [{route: [{destination: {host: web}}]}]\n",
        "spec.tcp: tcp routes are not supported",
    );
    bad(
        "  hosts: [web]\n  http: [{route: [{destination: {host: web}}], corsPolicy: {}}]\n",
        "spec.http[0].corsPolicy: unknown field",
    );
    let v2 = "apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: vs}\nspec: {hosts: [a]}\n";
    let e = load_docs(&[("vs.yaml".to_string(), v2.to_string())]).expect_err("v2");
    assert!(e.to_string().contains("unsupported version \"v2\""), "{e}");
}

/// `(mesh, gateways)` of a VirtualService with `gateways` as written (YAML flow list).
fn bound_to(gateways: &str) -> (bool, Vec<String>) {
    let spec = format!(
        "  hosts: [web]\n  gateways: {gateways}\n  http: [{{route: [{{destination: {{host: web}}}}]}}]\n"
    );
    let vs = load(&spec).expect(gateways);
    let names = vs.gateways.iter().map(ToString::to_string).collect();
    (vs.mesh, names)
}

#[test]
fn gateways_decide_whether_the_waypoint_and_which_ingress_gateways_apply_it() {
    let check = |gateways: &str, mesh: bool, want: &[&str]| {
        assert_eq!(
            bound_to(gateways),
            (mesh, want.iter().map(|s| s.to_string()).collect()),
            "{gateways}"
        );
    };
    check("[]", true, &[]);
    check("[mesh]", true, &[]);
    // Gateway-only: not for the waypoint.
    check("[istio-ingress/ingress]", false, &["istio-ingress/ingress"]);
    check(
        "[mesh, istio-ingress/ingress]",
        true,
        &["istio-ingress/ingress"],
    );
    // A bare name is in the VirtualService's namespace; Istio's old FQDN form names one too;
    // each Gateway is kept once, in the order written.
    check("[ingress]", false, &["shop/ingress"]);
    check(
        "[ingress.edge.svc.cluster.local, edge/ingress, b, a, b]",
        false,
        &["edge/ingress", "shop/b", "shop/a"],
    );
    let without =
        load("  hosts: [web]\n  http: [{route: [{destination: {host: web}}]}]\n").expect("valid");
    assert!(without.mesh && without.gateways.is_empty());
}

#[test]
fn a_match_may_name_the_virtual_services_own_gateways_or_mesh() {
    let vs = load(
        r#"
  hosts: [web]
  gateways: [mesh, istio-ingress/ingress, edge]
  http:
  - match: [{gateways: [istio-ingress/ingress], uri: {prefix: /a}}, {gateways: [mesh]}, {gateways: [edge, mesh]}, {uri: {prefix: /any}}]
    route: [{destination: {host: web}}]
"#,
    )
    .expect("valid");
    let gw = |ns: &str, name: &str| VsGateway::Gateway(NamespacedName::new(ns, name));
    let got: Vec<&[VsGateway]> = vs.rules[0]
        .matches
        .iter()
        .map(|m| m.gateways.as_slice())
        .collect();
    assert_eq!(
        got,
        [
            &[gw("istio-ingress", "ingress")][..],
            &[VsGateway::Mesh][..],
            &[gw("shop", "edge"), VsGateway::Mesh][..],
            &[][..],
        ]
    );
    // `mesh` in a gateway-only VirtualService is accepted (it never applies), as in Istio.
    let gw_only = load("  hosts: [web]\n  gateways: [ingress]\n  http: [{match: [{gateways: [mesh]}], route: [{destination: {host: web}}]}]\n").expect("valid");
    assert_eq!(gw_only.rules[0].matches[0].gateways, [VsGateway::Mesh]);
}

#[test]
fn the_model_dump_shows_the_bound_gateways() {
    let doc = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: vs, namespace: shop}
spec:
  hosts: [ratings.example.com]
  gateways: [istio-ingress/ingress]
  http: [{match: [{gateways: [istio-ingress/ingress]}], route: [{destination: {host: web}}]}]
"#;
    let m = load_docs(&[("vs.yaml".to_string(), doc.to_string())]).expect("valid");
    let dump = serde_json::to_value(m.dump()).expect("dump");
    let vs = &dump["virtual_services"][0];
    assert_eq!(vs["mesh"], false);
    assert_eq!(
        vs["gateways"],
        serde_json::json!([{"namespace": "istio-ingress", "name": "ingress"}])
    );
    assert_eq!(
        vs["rules"][0]["matches"][0]["gateways"],
        serde_json::json!(["istio-ingress/ingress"])
    );
}

#[test]
fn unknown_or_invalid_gateways_are_refused() {
    let bad = |spec: &str, want: &str| {
        let got = load(spec).expect_err(spec);
        assert!(got.contains(want), "{got:?} lacks {want:?}\n{spec}");
    };
    bad(
        "  hosts: [web]\n  http: [{match: [{gateways: [istio-ingress/ingress]}], route: [{destination: {host: web}}]}]\n",
        "spec.http[0].match[0].gateways[0]: gateway istio-ingress/ingress is not one of the VirtualService's gateways (mesh)",
    );
    bad(
        "  hosts: [web]\n  gateways: [istio-ingress/ingress]\n  http: [{match: [{gateways: [other]}], route: [{destination: {host: web}}]}]\n",
        "gateway shop/other is not one of the VirtualService's gateways (istio-ingress/ingress)",
    );
    bad(
        "  hosts: [web]\n  gateways: [Istio/Ingress]\n  http: [{route: [{destination: {host: web}}]}]\n",
        "spec.gateways[0]: invalid gateway \"Istio/Ingress\"",
    );
    bad(
        "  hosts: [web]\n  gateways: [istio-ingress/]\n  http: [{route: [{destination: {host: web}}]}]\n",
        "invalid gateway",
    );
}

#[test]
fn destination_hosts_are_kept_as_written_for_service_entries() {
    let vs = load(
        r#"
  hosts: [API.Example.com]
  http:
  - route:
    - {destination: {host: API.Example.com}}
    - {destination: {host: web, port: {number: 80}}}
"#,
    )
    .expect("valid");
    assert_eq!(vs.hosts, ["api.example.com"]);
    let b: Vec<(&str, &str, Option<&str>)> = vs.rules[0]
        .backends
        .iter()
        .map(|b| {
            (
                b.service.namespace.as_str(),
                b.service.name.as_str(),
                b.host.as_deref(),
            )
        })
        .collect();
    // A host that names no Service keeps an empty namespace; both keep their host, which
    // names a ServiceEntry when one of its hosts is it.
    assert_eq!(
        b,
        [
            ("", "api.example.com", Some("api.example.com")),
            ("shop", "web", Some("web")),
        ]
    );
}
