//! Ingress queries over a small mesh written as YAML: which routes attach to each listener,
//! certificates and ReferenceGrants, the Gateway's status, and that keys never show.

use super::*;
use crate::k8s::ingress_tests::{CERT_PEM, KEY_PEM};
use crate::k8s::load_docs;

/// `pem` as the lines of a YAML block scalar indented by four.
fn block(pem: &str) -> String {
    pem.lines().map(|l| format!("    {l}\n")).collect()
}

fn tls_secret(namespace: &str, name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {namespace}}}\n\
         type: kubernetes.io/tls\nstringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        block(CERT_PEM),
        block(KEY_PEM)
    )
}

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: istio-ingress}
---
apiVersion: v1
kind: Namespace
metadata: {name: bookinfo, labels: {shared-gateway-access: "true"}}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: istio-ingress}
spec:
  gatewayClassName: istio
  listeners:
  - {name: http, port: 80, protocol: HTTP, hostname: "*.example.com", allowedRoutes: {namespaces: {from: All}}}
  - name: https
    port: 443
    protocol: HTTPS
    hostname: bookinfo.example.com
    tls: {mode: Terminate, certificateRefs: [{kind: Secret, name: bookinfo-cert, namespace: bookinfo}]}
    allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {shared-gateway-access: "true"}}}}
  - {name: same, port: 8080, protocol: HTTP}
  - {name: grpc-only, port: 9090, protocol: HTTP, allowedRoutes: {namespaces: {from: All}, kinds: [{kind: GRPCRoute}]}}
  - {name: by-name, port: 8081, protocol: HTTP, allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {kubernetes.io/metadata.name: shop}}}}}
  - {name: mixed, port: 8082, protocol: HTTP, hostname: a.example.com, allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {kubernetes.io/metadata.name: bookinfo}}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: bookinfo}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {name: gateway-certs, namespace: bookinfo}
spec:
  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: istio-ingress}]
  to: [{group: "", kind: Secret}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: reviews, namespace: bookinfo}
spec:
  parentRefs: [{name: ingress, namespace: istio-ingress}]
  hostnames: [bookinfo.example.com]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: section, namespace: bookinfo}
spec:
  parentRefs: [{name: ingress, namespace: istio-ingress, sectionName: https}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: port-80, namespace: bookinfo}
spec:
  parentRefs: [{name: ingress, namespace: istio-ingress, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: apex, namespace: bookinfo}
spec:
  parentRefs: [{name: ingress, namespace: istio-ingress}]
  hostnames: [example.com]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: wrong-section, namespace: bookinfo}
spec:
  parentRefs: [{name: ingress, namespace: istio-ingress, sectionName: nope}, {name: ingress, namespace: istio-ingress, port: 8443}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: own-namespace, namespace: bookinfo}
spec:
  parentRefs: [{name: ingress}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc, namespace: bookinfo}
spec:
  parentRefs: [{name: ingress, namespace: istio-ingress, sectionName: grpc-only}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: http-on-grpc, namespace: bookinfo}
spec:
  parentRefs: [{name: ingress, namespace: istio-ingress, sectionName: grpc-only}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mixed-http, namespace: bookinfo, creationTimestamp: "2024-01-01T00:00:00Z"}
spec:
  parentRefs: [{name: ingress, namespace: istio-ingress, sectionName: mixed}]
  hostnames: [a.example.com]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: mixed-grpc, namespace: bookinfo, creationTimestamp: "2024-01-02T00:00:00Z"}
spec:
  parentRefs: [{name: ingress, namespace: istio-ingress, sectionName: mixed}]
  hostnames: ["*.example.com"]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: shop-route, namespace: shop}
spec:
  parentRefs: [{name: ingress, namespace: istio-ingress}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: local, namespace: istio-ingress}
spec:
  parentRefs: [{name: ingress}]
  hostnames: [other.org]
  rules:
  - backendRefs: [{name: reviews, namespace: bookinfo, port: 9080}]
"#;

/// The mesh, its certificates and `extra` documents.
fn model(extra: &str) -> Model {
    let secrets = format!(
        "{}---\n{}",
        tls_secret("bookinfo", "bookinfo-cert"),
        tls_secret("istio-ingress", "local-cert")
    );
    load_docs(&[
        ("mesh.yaml".to_string(), MESH.to_string()),
        ("secrets.yaml".to_string(), secrets),
        ("z-extra.yaml".to_string(), extra.to_string()),
    ])
    .unwrap_or_else(|e| panic!("{e}"))
}

fn ingress() -> NamespacedName {
    NamespacedName::new("istio-ingress", "ingress")
}

fn names(routes: &[&HttpRoute]) -> Vec<String> {
    routes
        .iter()
        .map(|r| format!("{}/{}", r.namespace, r.name))
        .collect()
}

#[test]
fn routes_attach_to_listeners_by_parent_namespace_kind_and_hostname() {
    let m = model("");
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "from All, a wildcard hostname: exact and no hostnames intersect, the apex does not",
            "http",
            &["bookinfo/port-80", "bookinfo/reviews", "shop/shop-route"],
        ),
        (
            "from Selector: labelled bookinfo only; sectionName; port 80 is not 443",
            "https",
            &["bookinfo/reviews", "bookinfo/section"],
        ),
        (
            "from Same (the default), no hostname: any route's hostnames",
            "same",
            &["istio-ingress/local"],
        ),
        ("kinds: GRPCRoute only", "grpc-only", &["bookinfo/grpc"]),
        (
            "Selector on kubernetes.io/metadata.name, which every namespace has",
            "by-name",
            &["shop/shop-route"],
        ),
        (
            "an HTTPRoute and a newer GRPCRoute with intersecting hostnames: the older serves",
            "mixed",
            &["bookinfo/mixed-http"],
        ),
        ("no such listener", "nope", &[]),
    ];
    for (case, listener, want) in cases {
        let got = names(&m.routes_for_listener(&ingress(), listener));
        assert_eq!(got, *want, "{case}");
    }
    assert!(
        m.routes_for_listener(&NamespacedName::new("bookinfo", "ingress"), "http")
            .is_empty(),
        "a parentRef without namespace names the route's own: no such Gateway"
    );
    assert!(m
        .routes_for_listener(&NamespacedName::new("bookinfo", "wp"), "mesh")
        .is_empty());
}

#[test]
fn a_waypoint_keeps_attaching_only_routes_of_its_namespace() {
    // Routes may now name a Gateway in another namespace (the ingress); the waypoint's own
    // rule is unchanged: only routes in its namespace attach to it.
    let m = model(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {name: wp-route, namespace: bookinfo}\nspec: {parentRefs: [{name: wp}]}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {name: foreign, namespace: shop}\n\
         spec: {parentRefs: [{name: wp, namespace: bookinfo}]}\n",
    );
    let svc = crate::model::Service {
        name: "reviews".into(),
        namespace: "bookinfo".into(),
        labels: Labels::new(),
        cluster_ips: vec![],
        ports: vec![],
        selector: None,
        load_balancer_ingress: vec![],
    };
    let port = crate::model::ServicePort {
        name: None,
        app_protocol: None,
        port: 80,
        target_port: crate::model::TargetPort::Number(80),
    };
    let (routes, kind) =
        crate::route::routes_for(&m, &NamespacedName::new("bookinfo", "wp"), &svc, &port);
    assert_eq!(names(&routes), ["bookinfo/wp-route"]);
    assert_eq!(kind, ParentKind::Gateway);
}

/// A ReferenceGrant in `namespace` (`from`/`to` YAML flow lists).
fn grant(namespace: &str, from: &str, to: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\n\
         metadata: {{name: extra-grant, namespace: {namespace}}}\n\
         spec:\n  from: {from}\n  to: {to}\n"
    )
}

#[test]
fn a_certificate_in_another_namespace_needs_a_reference_grant() {
    let gw_from = "[{group: gateway.networking.k8s.io, kind: Gateway, namespace: istio-ingress}]";
    // The https listener, with its ref pointed at `shop/shop-cert` (no grant in the base mesh).
    let cases: Vec<(&str, String, Result<(), ConditionReason>)> =
        vec![
        ("no grant in shop", String::new(), Err(ConditionReason::RefNotPermitted)),
        (
            "a grant for every Secret",
            grant("shop", gw_from, "[{group: \"\", kind: Secret}]"),
            Ok(()),
        ),
        (
            "a grant for that Secret, core group spelt core",
            grant("shop", gw_from, "[{group: core, kind: Secret, name: shop-cert}]"),
            Ok(()),
        ),
        (
            "a grant for another Secret",
            grant("shop", gw_from, "[{group: \"\", kind: Secret, name: other}]"),
            Err(ConditionReason::RefNotPermitted),
        ),
        (
            "a grant to Gateways of another namespace",
            grant(
                "shop",
                "[{group: gateway.networking.k8s.io, kind: Gateway, namespace: bookinfo}]",
                "[{group: \"\", kind: Secret}]",
            ),
            Err(ConditionReason::RefNotPermitted),
        ),
        (
            "a grant to HTTPRoutes",
            grant(
                "shop",
                "[{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: istio-ingress}]",
                "[{group: \"\", kind: Secret}]",
            ),
            Err(ConditionReason::RefNotPermitted),
        ),
        (
            "a grant in the Gateway's namespace does not count",
            grant("istio-ingress", gw_from, "[{group: \"\", kind: Secret}]"),
            Err(ConditionReason::RefNotPermitted),
        ),
    ];
    for (case, extra, want) in cases {
        let extra = format!("{}---\n{extra}", tls_secret("shop", "shop-cert"));
        let m = model(&extra);
        let gw = &m.gateways[&ingress()];
        let mut listener = gw.listener("https").cloned().expect("https");
        if let Some(tls) = &mut listener.tls {
            tls.certificate_refs[0] = SecretRef {
                namespace: "shop".into(),
                name: "shop-cert".into(),
            };
        }
        let got = m.listener_certificates(gw, &listener);
        match (got, want) {
            (Ok(certs), Ok(())) => {
                assert_eq!(certs.len(), 1, "{case}");
                assert_eq!(certs[0].key(), NamespacedName::new("shop", "shop-cert"));
            }
            (Err(e), Err(reason)) => {
                assert_eq!(e.reason(), reason, "{case}: {e}");
                assert_eq!(e.listener(), "https");
                assert!(
                    e.to_string().starts_with(
                        "tls.certificateRefs[0]: Secret shop/shop-cert: not permitted"
                    ),
                    "{case}: {e}"
                );
            }
            (got, want) => panic!("{case}: {got:?}, expected {want:?}"),
        }
    }
}

#[test]
fn listener_certificates_in_order_and_the_first_bad_ref_named() {
    let extra = format!(
        "{}---\napiVersion: v1\nkind: Secret\nmetadata: {{name: opaque, namespace: istio-ingress}}\ndata: {{a: Yg==}}\n",
        tls_secret("istio-ingress", "second")
    );
    let m = model(&extra);
    let gw = &m.gateways[&ingress()];
    let with_refs = |refs: &[(&str, &str)]| {
        let mut l = gw.listener("https").cloned().expect("https");
        if let Some(tls) = &mut l.tls {
            tls.certificate_refs = refs
                .iter()
                .map(|(ns, name)| SecretRef {
                    namespace: ns.to_string(),
                    name: name.to_string(),
                })
                .collect();
        }
        l
    };
    type Case<'a> = (
        &'a str,
        &'a [(&'a str, &'a str)],
        Result<&'a [&'a str], &'a str>,
    );
    let cases: &[Case<'_>] = &[
        (
            "granted, then local: in order",
            &[("bookinfo", "bookinfo-cert"), ("istio-ingress", "second")],
            Ok(&["bookinfo/bookinfo-cert", "istio-ingress/second"]),
        ),
        (
            "a missing Secret",
            &[("istio-ingress", "second"), ("istio-ingress", "gone")],
            Err("tls.certificateRefs[1]: Secret istio-ingress/gone: not found"),
        ),
        (
            "a Secret of another type",
            &[("istio-ingress", "opaque")],
            Err("tls.certificateRefs[0]: Secret istio-ingress/opaque: type \"Opaque\" is not kubernetes.io/tls"),
        ),
    ];
    for (case, refs, want) in cases {
        match (m.listener_certificates(gw, &with_refs(refs)), want) {
            (Ok(certs), Ok(want)) => {
                let got: Vec<String> = certs.iter().map(|c| c.key().to_string()).collect();
                assert_eq!(got, *want, "{case}");
            }
            (Err(e), Err(want)) => {
                assert_eq!(e.reason(), ConditionReason::InvalidCertificateRef, "{case}");
                assert_eq!(e.to_string(), *want, "{case}");
            }
            (got, want) => panic!("{case}: {got:?}, expected {want:?}"),
        }
    }
    let http = gw.listener("http").expect("http");
    assert_eq!(
        m.listener_certificates(gw, http).map(|c| c.len()),
        Ok(0),
        "no TLS: no certificates"
    );
}

#[test]
fn a_backend_in_another_namespace_needs_a_reference_grant() {
    let route_from =
        "[{group: gateway.networking.k8s.io, kind: HTTPRoute, namespace: istio-ingress}]";
    let cases: Vec<(&str, String, bool)> =
        vec![
        ("no grant", String::new(), false),
        (
            "a grant for Services",
            grant("bookinfo", route_from, "[{group: \"\", kind: Service}]"),
            true,
        ),
        (
            "a grant for that Service",
            grant("bookinfo", route_from, "[{group: \"\", kind: Service, name: reviews}]"),
            true,
        ),
        (
            "a grant for another Service",
            grant("bookinfo", route_from, "[{group: \"\", kind: Service, name: ratings}]"),
            false,
        ),
        (
            "a grant for GRPCRoutes",
            grant(
                "bookinfo",
                "[{group: gateway.networking.k8s.io, kind: GRPCRoute, namespace: istio-ingress}]",
                "[{group: \"\", kind: Service}]",
            ),
            false,
        ),
    ];
    for (case, extra, want) in cases {
        let m = model(&extra);
        let route = m
            .http_routes
            .iter()
            .find(|r| r.name == "local")
            .expect("local");
        let backend = &route.rules[0].backends[0];
        assert_eq!(m.backend_permitted(route, backend), want, "{case}");
    }
    let m = model("");
    assert!(
        m.reference_granted(
            "gateway.networking.k8s.io",
            "HTTPRoute",
            "bookinfo",
            "",
            "Service",
            "bookinfo",
            "x"
        ),
        "one namespace needs no grant"
    );
}

#[test]
fn tls_keys_never_show_in_the_dump_or_debug() {
    let m = model("");
    let secret = m.tls_secret("bookinfo", "bookinfo-cert").expect("secret");
    assert!(secret.key_pem.contains("PRIVATE KEY"));
    let key_body = "dGVzdCBrZXkgYnl0ZXMsIG5vdCBhIHJlYWwgcHJpdmF0ZSBrZXkh";
    let json = serde_json::to_string(&m.dump()).expect("json");
    assert!(
        !json.contains(key_body) && !json.contains("PRIVATE KEY"),
        "{json}"
    );
    assert!(json.contains(r#""key_pem":"<redacted>""#), "{json}");
    assert!(
        json.contains("BEGIN CERTIFICATE"),
        "certificates are public"
    );
    for shown in [format!("{secret:?}"), format!("{m:?}")] {
        assert!(!shown.contains(key_body) && !shown.contains("PRIVATE KEY"));
        assert!(shown.contains("<redacted>"));
    }
    let problems = model(
        "apiVersion: v1\nkind: Secret\nmetadata: {name: token, namespace: shop}\ndata: {t: dA==}\n",
    );
    let json = serde_json::to_value(problems.dump()).expect("json");
    assert_eq!(
        json["secret_problems"],
        serde_json::json!([{"namespace": "shop", "name": "token", "problem": "type \"Opaque\" is not kubernetes.io/tls"}])
    );
}

/// A second ingress Gateway for status, with `listeners` (YAML flow list items, one a line).
fn status_gateway(name: &str, listeners: &[&str]) -> String {
    let items: String = listeners.iter().map(|l| format!("  - {l}\n")).collect();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {{name: {name}, namespace: istio-ingress}}\n\
         spec:\n  gatewayClassName: istio\n  listeners:\n{items}"
    )
}

/// A condition as (type, status, reason).
type Cond = (ConditionType, bool, ConditionReason);

/// A listener's expected attachedRoutes and conditions.
type ListenerExpect = (u32, Vec<Cond>);

/// (type, status, reason) of each condition.
fn conditions(c: &[StatusCondition]) -> Vec<Cond> {
    c.iter().map(|c| (c.type_, c.status, c.reason)).collect()
}

#[test]
fn gateway_status_per_listener() {
    use ConditionReason as R;
    use ConditionType as T;
    let gw = status_gateway(
        "status",
        &[
            "{name: web, port: 80, protocol: HTTP}",
            "{name: good, port: 443, protocol: HTTPS, hostname: good.example.com, tls: {certificateRefs: [{name: local-cert}]}}",
            "{name: granted, port: 443, protocol: HTTPS, hostname: granted.example.com, tls: {certificateRefs: [{name: bookinfo-cert, namespace: bookinfo}]}}",
            "{name: missing, port: 443, protocol: HTTPS, hostname: missing.example.com, tls: {certificateRefs: [{name: nope}]}}",
            "{name: not-granted, port: 443, protocol: HTTPS, hostname: ng.example.com, tls: {certificateRefs: [{name: shop-cert, namespace: shop}]}}",
            "{name: opaque, port: 443, protocol: HTTPS, hostname: opaque.example.com, tls: {certificateRefs: [{name: opaque}]}}",
            "{name: tls-a, port: 8443, protocol: HTTPS, hostname: x.example.com, tls: {certificateRefs: [{name: local-cert}]}}",
            "{name: tls-b, port: 8443, protocol: TLS, hostname: x.example.com, tls: {mode: Passthrough}}",
            "{name: tls-c, port: 8443, protocol: TLS, hostname: y.example.com, tls: {mode: Passthrough}}",
            "{name: plain, port: 8000, protocol: HTTP}",
            "{name: secure, port: 8000, protocol: HTTPS, tls: {certificateRefs: [{name: local-cert}]}}",
            "{name: dns, port: 53, protocol: UDP}",
            "{name: kinds, port: 81, protocol: HTTP, allowedRoutes: {kinds: [{kind: HTTPRoute}, {kind: TCPRoute}, {group: example.com, kind: Foo}, {kind: HTTPRoute}]}}",
        ],
    );
    let extra = format!(
        "{gw}---\n{}---\n\
         apiVersion: v1\nkind: Secret\nmetadata: {{name: opaque, namespace: istio-ingress}}\ndata: {{a: Yg==}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: status-route, namespace: istio-ingress}}\n\
         spec: {{parentRefs: [{{name: status}}]}}\n---\n\
         apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: good-only, namespace: istio-ingress}}\n\
         spec: {{parentRefs: [{{name: status, sectionName: good}}], hostnames: [good.example.com]}}\n",
        tls_secret("shop", "shop-cert")
    );
    let m = model(&extra);
    let status = m
        .gateway_status(&NamespacedName::new("istio-ingress", "status"))
        .expect("status");
    let programmed = |attached: u32| -> ListenerExpect {
        (
            attached,
            vec![
                (T::Accepted, true, R::Accepted),
                (T::Conflicted, false, R::NoConflicts),
                (T::ResolvedRefs, true, R::ResolvedRefs),
                (T::Programmed, true, R::Programmed),
            ],
        )
    };
    let unresolved = |reason: R| -> ListenerExpect {
        (
            1,
            vec![
                (T::Accepted, true, R::Accepted),
                (T::Conflicted, false, R::NoConflicts),
                (T::ResolvedRefs, false, reason),
                (T::Programmed, false, R::Invalid),
            ],
        )
    };
    let conflicted = |reason: R, attached: u32| -> ListenerExpect {
        (
            attached,
            vec![
                (T::Accepted, false, reason),
                (T::Conflicted, true, reason),
                (T::ResolvedRefs, true, R::ResolvedRefs),
                (T::Programmed, false, R::Invalid),
            ],
        )
    };
    let cases: Vec<(&str, &str, ListenerExpect)> = vec![
        ("plain HTTP", "web", programmed(1)),
        ("a local certificate; two routes", "good", programmed(2)),
        ("a granted certificate", "granted", programmed(1)),
        (
            "a missing Secret",
            "missing",
            unresolved(R::InvalidCertificateRef),
        ),
        ("no grant", "not-granted", unresolved(R::RefNotPermitted)),
        (
            "not a TLS Secret",
            "opaque",
            unresolved(R::InvalidCertificateRef),
        ),
        (
            "HTTPS and TLS with one hostname on one port",
            "tls-a",
            conflicted(R::HostnameConflict, 1),
        ),
        (
            "the other of them",
            "tls-b",
            conflicted(R::HostnameConflict, 0),
        ),
        (
            "TLS on that port with another hostname",
            "tls-c",
            programmed(0),
        ),
        (
            "HTTP and HTTPS on one port",
            "plain",
            conflicted(R::ProtocolConflict, 1),
        ),
        (
            "the other of them",
            "secure",
            conflicted(R::ProtocolConflict, 1),
        ),
        (
            "UDP",
            "dns",
            (
                0,
                vec![
                    (T::Accepted, false, R::UnsupportedProtocol),
                    (T::Conflicted, false, R::NoConflicts),
                    (T::ResolvedRefs, true, R::ResolvedRefs),
                    (T::Programmed, false, R::Invalid),
                ],
            ),
        ),
        (
            "route kinds that do not fit HTTP",
            "kinds",
            (
                1,
                vec![
                    (T::Accepted, true, R::Accepted),
                    (T::Conflicted, false, R::NoConflicts),
                    (T::ResolvedRefs, false, R::InvalidRouteKinds),
                    (T::Programmed, true, R::Programmed),
                ],
            ),
        ),
    ];
    assert_eq!(status.listeners.len(), cases.len());
    for (case, listener, (attached, want)) in &cases {
        let l = status
            .listener(listener)
            .unwrap_or_else(|| panic!("{case}: no status for {listener}"));
        assert_eq!(conditions(&l.conditions), *want, "{case}");
        assert_eq!(l.attached_routes, *attached, "{case}: attachedRoutes");
    }
    let kinds = status.listener("kinds").expect("kinds");
    assert_eq!(kinds.supported_kinds, ["HTTPRoute"], "valid kinds, once");
    assert_eq!(
        status.listener("web").map(|l| l.supported_kinds.clone()),
        Some(vec!["HTTPRoute".to_string(), "GRPCRoute".to_string()])
    );
    assert!(status
        .listener("dns")
        .expect("dns")
        .supported_kinds
        .is_empty());
    let missing = status.listener("missing").expect("missing");
    let message = &missing
        .condition(T::ResolvedRefs)
        .expect("ResolvedRefs")
        .message;
    assert!(
        message.contains("Secret istio-ingress/nope: not found"),
        "{message}"
    );
    assert_eq!(
        conditions(&status.conditions),
        [
            (T::Accepted, true, R::ListenersNotValid),
            (T::Programmed, true, R::Programmed)
        ],
        "some listeners stay programmed"
    );
    let accepted = status.condition(T::Accepted).expect("Accepted");
    assert!(
        accepted.message.contains("tls-a") && accepted.message.contains("dns"),
        "{}",
        accepted.message
    );
    let json = serde_json::to_value(&status).expect("json");
    assert_eq!(
        json["conditions"][0],
        serde_json::json!({"type": "Accepted", "status": "True", "reason": "ListenersNotValid", "message": accepted.message})
    );
}

#[test]
fn gateway_status_as_a_whole() {
    use ConditionReason as R;
    use ConditionType as T;
    let cases: &[(&str, &[&str], [Cond; 2])] = &[
        (
            "every listener fine",
            &["{name: web, port: 80, protocol: HTTP}"],
            [
                (T::Accepted, true, R::Accepted),
                (T::Programmed, true, R::Programmed),
            ],
        ),
        (
            "accepted, but its only listener's certificate is missing",
            &["{name: s, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: nope}]}}"],
            [
                (T::Accepted, true, R::Accepted),
                (T::Programmed, false, R::Invalid),
            ],
        ),
        (
            "no listener accepted",
            &["{name: dns, port: 53, protocol: UDP}"],
            [
                (T::Accepted, false, R::ListenersNotValid),
                (T::Programmed, false, R::Invalid),
            ],
        ),
    ];
    for (case, listeners, want) in cases {
        let m = model(&status_gateway("whole", listeners));
        let status = m
            .gateway_status(&NamespacedName::new("istio-ingress", "whole"))
            .expect("status");
        assert_eq!(conditions(&status.conditions), *want, "{case}");
    }
    let m = model("");
    let status = m.gateway_status(&ingress()).expect("ingress");
    let attached: Vec<(&str, u32)> = status
        .listeners
        .iter()
        .map(|l| (l.name.as_str(), l.attached_routes))
        .collect();
    assert_eq!(
        attached,
        [
            ("http", 3),
            ("https", 2),
            ("same", 1),
            ("grpc-only", 1),
            ("by-name", 1),
            ("mixed", 2),
        ],
        "attachedRoutes counts a route the listener does not serve for a kind conflict \
         (mixed-grpc)"
    );
    assert_eq!(
        m.gateway_status(&NamespacedName::new("bookinfo", "wp")),
        None,
        "a waypoint's status is not the ingress's to say"
    );
    assert_eq!(m.gateway_status(&NamespacedName::new("shop", "none")), None);
}

#[test]
fn a_listener_hostname_ranks_exact_over_wildcard_over_none() {
    use crate::model::hostname_rank;
    for (hostname, host, want) in [
        (None, "a.example.com", Some((0, 0))),
        (Some("a.example.com"), "A.Example.com", Some((2, 13))),
        (Some("a.example.com"), "b.example.com", None),
        (Some("*.example.com"), "a.example.com", Some((1, 12))),
        (Some("*.example.com"), "a.b.example.com", Some((1, 12))),
        (Some("*.example.com"), "example.com", None),
        (Some("*.example.com"), ".example.com", None),
        (Some("*.b.example.com"), "a.b.example.com", Some((1, 14))),
    ] {
        assert_eq!(hostname_rank(hostname, host), want, "{hostname:?} {host}");
    }
}

/// `status.addresses` come from the Gateway's Service `<name>-istio` (its load balancer's,
/// else its cluster IPs; none without the Service); a requested address that Service lacks
/// is `AddressNotUsable`, a requested type other than IPAddress and Hostname
/// `UnsupportedAddress`.
#[test]
fn gateway_status_addresses_come_from_its_service() {
    use ConditionReason as R;
    use ConditionType as T;
    /// (case, `spec.addresses` YAML, the Service's `spec` and `status` YAML, expected
    /// addresses, expected Gateway conditions)
    type Case<'a> = (
        &'a str,
        &'a str,
        Option<(&'a str, &'a str)>,
        Option<&'a [&'a str]>,
        [Cond; 2],
    );
    let fine = [
        (T::Accepted, true, R::Accepted),
        (T::Programmed, true, R::Programmed),
    ];
    let not_usable = [
        (T::Accepted, true, R::Accepted),
        (T::Programmed, false, R::AddressNotUsable),
    ];
    let lb = "{type: LoadBalancer, clusterIP: 10.96.0.40}";
    let cases: &[Case<'_>] = &[
        ("no Service: no addresses", "[]", None, None, fine),
        (
            "no Service: nothing to compare a request with",
            "[{value: 198.51.100.1}]",
            None,
            None,
            fine,
        ),
        (
            "the load balancer's IP",
            "[]",
            Some((lb, "{loadBalancer: {ingress: [{ip: 203.0.113.7}]}}")),
            Some(&["IPAddress 203.0.113.7"]),
            fine,
        ),
        (
            "the load balancer's host name",
            "[]",
            Some((
                lb,
                "{loadBalancer: {ingress: [{hostname: lb.example.com}]}}",
            )),
            Some(&["Hostname lb.example.com"]),
            fine,
        ),
        (
            "no load balancer address yet: the cluster IPs",
            "[]",
            Some((
                "{type: LoadBalancer, clusterIPs: [10.96.0.40, \"fd00::40\"]}",
                "{loadBalancer: {}}",
            )),
            Some(&["IPAddress 10.96.0.40", "IPAddress fd00::40"]),
            fine,
        ),
        (
            "a ClusterIP Service",
            "[]",
            Some(("{clusterIP: 10.96.0.41}", "{}")),
            Some(&["IPAddress 10.96.0.41"]),
            fine,
        ),
        (
            "requested addresses the Service has",
            "[{value: 203.0.113.7}, {type: Hostname, value: lb.example.com}]",
            Some((
                lb,
                "{loadBalancer: {ingress: [{ip: 203.0.113.7}, {hostname: lb.example.com}]}}",
            )),
            Some(&["IPAddress 203.0.113.7", "Hostname lb.example.com"]),
            fine,
        ),
        (
            "a requested address the Service lacks",
            "[{value: 203.0.113.7}, {value: 198.51.100.1}]",
            Some((lb, "{loadBalancer: {ingress: [{ip: 203.0.113.7}]}}")),
            Some(&["IPAddress 203.0.113.7"]),
            not_usable,
        ),
        (
            "the cluster IP is not the load balancer's",
            "[{value: 10.96.0.40}]",
            Some((lb, "{loadBalancer: {ingress: [{ip: 203.0.113.7}]}}")),
            Some(&["IPAddress 203.0.113.7"]),
            not_usable,
        ),
        (
            "a headless Service has no address",
            "[{value: 10.96.0.40}]",
            Some(("{clusterIP: None}", "{}")),
            Some(&[]),
            not_usable,
        ),
        (
            "an address type this gateway does not support",
            "[{type: NamedAddress, value: my-pool}]",
            Some((lb, "{loadBalancer: {ingress: [{ip: 203.0.113.7}]}}")),
            Some(&["IPAddress 203.0.113.7"]),
            [
                (T::Accepted, false, R::UnsupportedAddress),
                (T::Programmed, true, R::Programmed),
            ],
        ),
    ];
    let key = NamespacedName::new("istio-ingress", "addr");
    for (case, requested, service, want_addresses, want) in cases {
        let mut docs = status_gateway("addr", &["{name: web, port: 80, protocol: HTTP}"]);
        docs.push_str(&format!("  addresses: {requested}\n"));
        if let Some((spec, status)) = service {
            docs.push_str(&format!(
                "---\napiVersion: v1\nkind: Service\n\
                 metadata: {{name: addr-istio, namespace: istio-ingress}}\n\
                 spec: {spec}\nstatus: {status}\n"
            ));
        }
        // A Service of another name is not the gateway's.
        docs.push_str(
            "---\napiVersion: v1\nkind: Service\n\
             metadata: {name: addr, namespace: istio-ingress}\nspec: {clusterIP: 10.96.0.99}\n",
        );
        let m = model(&docs);
        let status = m.gateway_status(&key).expect("status");
        let addresses: Option<Vec<String>> = status
            .addresses
            .as_ref()
            .map(|a| a.iter().map(|a| format!("{} {a}", a.type_name())).collect());
        let want_addresses: Option<Vec<String>> =
            want_addresses.map(|a| a.iter().map(|s| s.to_string()).collect());
        assert_eq!(addresses, want_addresses, "{case}");
        assert_eq!(conditions(&status.conditions), *want, "{case}");
    }
    // The messages name what is wrong.
    let docs = format!(
        "{}  addresses: [{{value: 198.51.100.1}}, {{type: example.com/pool, value: blue}}]\n\
         ---\napiVersion: v1\nkind: Service\n\
         metadata: {{name: addr-istio, namespace: istio-ingress}}\n\
         spec: {{clusterIP: 10.96.0.41}}\n",
        status_gateway("addr", &["{name: web, port: 80, protocol: HTTP}"])
    );
    let m = model(&docs);
    let status = m.gateway_status(&key).expect("status");
    let message = |t| {
        status
            .condition(t)
            .map(|c| c.message.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        message(T::Programmed),
        "spec.addresses: 198.51.100.1 not among the addresses of Service \
         istio-ingress/addr-istio (10.96.0.41); this gateway assigns none"
    );
    assert_eq!(
        message(T::Accepted),
        "spec.addresses: only types IPAddress and Hostname are supported, not \"blue\" of \
         type example.com/pool"
    );
}

/// The ingress's VirtualService destinations that name a subset of a Service behind a
/// waypoint are listed (each once), so the gateway can say once that the subset is the
/// waypoint's to apply; a Service without a waypoint (or without a VIP) keeps its subsets,
/// and VirtualServices not bound to the Gateway do not count.
#[test]
fn subsets_of_services_behind_a_waypoint_are_listed() {
    // (name, labels, clusterIP) of each Service of `bookinfo`.
    let services: String = [
        ("reviews", "{istio.io/use-waypoint: wp}", "10.96.1.1"),
        ("ratings", "{}", "10.96.1.2"),
        ("details", "{istio.io/use-waypoint: wp}", "None"),
    ]
    .iter()
    .map(|(name, labels, ip)| {
        format!(
            "apiVersion: v1\nkind: Service\n\
             metadata: {{name: {name}, namespace: bookinfo, labels: {labels}}}\n\
             spec: {{clusterIP: {ip}, selector: {{app: {name}}}, ports: [{{port: 9080}}]}}\n---\n"
        )
    })
    .collect();
    let m = model(&format!(
        "{services}{}",
        r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bookinfo, namespace: bookinfo}
spec:
  hosts: [bookinfo.example.com]
  gateways: [istio-ingress/ingress, mesh]
  http:
  - match: [{uri: {prefix: /reviews}}]
    route:
    - {destination: {host: reviews, subset: v1}, weight: 90}
    - {destination: {host: reviews.bookinfo.svc.cluster.local, subset: v2}, weight: 10}
  - match: [{uri: {prefix: /again}}]
    route: [{destination: {host: reviews, subset: v1}}]
  - route:
    - {destination: {host: reviews}, weight: 40}
    - {destination: {host: ratings, subset: v1}, weight: 30}
    - {destination: {host: details, subset: v1}, weight: 30}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: mesh-only, namespace: bookinfo}
spec:
  hosts: [reviews]
  http: [{route: [{destination: {host: reviews, subset: v3}}]}]
"#
    ));
    let found: Vec<String> = m
        .subsets_through_waypoints(&ingress())
        .iter()
        .map(|s| {
            format!(
                "{} {} via {} ({})",
                s.service, s.subset, s.waypoint, s.route
            )
        })
        .collect();
    assert_eq!(
        found,
        [
            "bookinfo/reviews v1 via bookinfo/wp (bookinfo/bookinfo)",
            "bookinfo/reviews v2 via bookinfo/wp (bookinfo/bookinfo)",
        ]
    );
    let first = &m.subsets_through_waypoints(&ingress())[0];
    assert_eq!(
        first.to_string(),
        "subset v1 of bookinfo/reviews (VirtualService bookinfo/bookinfo): the Service uses \
         waypoint bookinfo/wp, whose routes choose its pods; route by subset there (the \
         ingress sends to the waypoint without the subset)"
    );
    assert!(m
        .subsets_through_waypoints(&NamespacedName::new("istio-ingress", "none"))
        .is_empty());
}
