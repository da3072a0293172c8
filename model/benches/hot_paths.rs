//! Micro-benchmarks of the model's per-connection and per-request decisions
//! (`cargo bench -p mesh-model`):
//!
//! - `policy/l4/*`: AuthorizationPolicy at L4 (what ztunnel's inbound runs for every
//!   connection), with policy selection from the model and without;
//! - `policy/l7/*`: AuthorizationPolicy at L7 (what the waypoint runs per request);
//! - `route/*`: path normalisation and route selection.
//!
//! The tunnel's own hot paths are in `hbone/benches/tunnel.rs`.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark setup, like tests

use std::hint::black_box;
use std::net::IpAddr;

use criterion::{criterion_group, criterion_main, Criterion};
use http::HeaderMap;
use mesh_model::model::NamespacedName;
use mesh_model::policy::l7::{authorize_l7, L7Request};
use mesh_model::policy::{authorize, evaluate_l4, policies_for, L4Request};
use mesh_model::Identity;

const TD: &str = "cluster.local";

// === policy ===

/// The destination pod, 19 namespace policies that do not match the request and one
/// workload ALLOW that does (the usual shape: many rules, one that decides), plus a DENY.
fn l4_model() -> mesh_model::model::Model {
    let mut docs = String::from(
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop, labels: {app: web}}\n\
         status: {podIP: 10.0.0.10}\n",
    );
    for i in 0..19 {
        docs += &format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: other-{i}, namespace: shop}}\n\
             spec: {{selector: {{matchLabels: {{app: other-{i}}}}}, rules: [{{from: [{{source: \
             {{principals: [\"cluster.local/ns/x/sa/y{i}\"]}}}}]}}]}}\n"
        );
    }
    docs += "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {name: deny-legacy, namespace: shop}\n\
             spec: {action: DENY, rules: [{from: [{source: {namespaces: [\"legacy\"]}}]}]}\n\
             ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {name: allow-client, namespace: shop}\n\
             spec: {selector: {matchLabels: {app: web}}, rules: [{from: [{source: \
             {principals: [\"cluster.local/ns/other/sa/*\", \"cluster.local/ns/client/sa/client\"]}}], \
             to: [{operation: {ports: [\"8080\", \"9090\"]}}], \
             when: [{key: source.ip, values: [\"10.1.0.0/16\"]}]}]}\n";
    mesh_model::k8s::load_docs(&[("policies.yaml".to_owned(), docs)]).expect("valid model")
}

fn l4_request() -> L4Request {
    L4Request {
        src_identity: Some(Identity::new(TD, "client", "client")),
        src_ip: "10.1.0.5".parse().unwrap(),
        dst_ip: "10.0.0.10".parse().unwrap(),
        dst_port: 8080,
    }
}

fn policy_l4(c: &mut Criterion) {
    let model = l4_model();
    let pod = model.pod("shop", "web").expect("pod").clone();
    let req = l4_request();
    let policies = policies_for(&model, &pod);
    assert!(matches!(
        evaluate_l4(&policies, &req).decision,
        mesh_model::policy::Decision::Allow
    ));
    let mut g = c.benchmark_group("policy/l4");
    g.bench_function("authorize", |b| {
        b.iter(|| authorize(black_box(&model), black_box(&pod), black_box(&req)))
    });
    g.bench_function("evaluate_selected", |b| {
        b.iter(|| evaluate_l4(black_box(&policies), black_box(&req)))
    });
    g.finish();
}

fn l7_model() -> mesh_model::model::Model {
    let on = "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]";
    let mut docs = String::new();
    for i in 0..10 {
        docs += &format!(
            "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: allow-{i}, namespace: shop}}\n\
             spec: {{{on}, rules: [{{to: [{{operation: {{methods: [\"POST\"], \
             paths: [\"/api/v{i}/*\"]}}}}]}}]}}\n"
        );
    }
    docs += &format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: deny-admin, namespace: shop}}\n\
         spec: {{{on}, action: DENY, rules: [{{to: [{{operation: {{paths: [\"/admin/{{**}}\"]}}}}]}}]}}\n\
         ---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: allow-get, namespace: shop}}\n\
         spec: {{{on}, rules: [{{from: [{{source: {{namespaces: [\"client\"]}}}}], \
         to: [{{operation: {{methods: [\"GET\"], hosts: [\"web.shop.svc.cluster.local\"], \
         paths: [\"/products/{{*}}/reviews\"]}}}}], \
         when: [{{key: \"request.headers[x-tenant]\", values: [\"acme\", \"globex\"]}}]}}]}}\n"
    );
    mesh_model::k8s::load_docs(&[("policies.yaml".to_owned(), docs)]).expect("valid model")
}

fn policy_l7(c: &mut Criterion) {
    let model = l7_model();
    let waypoint = NamespacedName::new("shop", "waypoint");
    let service = NamespacedName::new("shop", "web");
    let identity = Identity::new(TD, "client", "client");
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", "acme".parse().unwrap());
    headers.insert("user-agent", "bench/1".parse().unwrap());
    let ip: IpAddr = "10.1.0.5".parse().unwrap();
    let req = L7Request {
        src_identity: Some(&identity),
        src_ip: ip,
        remote_ip: ip,
        dst_ip: "10.0.0.10".parse().unwrap(),
        dst_port: 8080,
        host: "web.shop.svc.cluster.local:8080",
        method: "GET",
        path: "/products/42/reviews?page=2",
        headers: &headers,
        auth: None,
    };
    assert!(matches!(
        authorize_l7(&model, &waypoint, Some(&service), &req).decision,
        mesh_model::policy::Decision::Allow
    ));
    c.bench_function("policy/l7/authorize", |b| {
        b.iter(|| {
            authorize_l7(
                black_box(&model),
                black_box(&waypoint),
                Some(black_box(&service)),
                black_box(&req),
            )
        })
    });
}

// === route matching ===

/// A Service with 16 HTTPRoute rules (the Gateway API's limit) of every match kind; the request matches a header rule
/// near the end, so every rule is looked at.
fn route_model() -> mesh_model::model::Model {
    let mut docs = String::from(
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.3, selector: {app: web}, ports: [{name: http, port: 80}]}\n\
         ---\napiVersion: v1\nkind: Service\nmetadata: {name: web-v2, namespace: shop}\n\
         spec: {clusterIP: 10.96.0.4, selector: {app: web}, ports: [{name: http, port: 80}]}\n\
         ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {name: web, namespace: shop}\nspec:\n\
         \x20 parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n",
    );
    for i in 0..4 {
        docs += &format!(
            "  - matches: [{{path: {{type: Exact, value: /exact/{i}}}}}]\n    backendRefs: [{{name: web, port: 80}}]\n\
             \x20 - matches: [{{path: {{type: PathPrefix, value: /prefix/{i}}}}}]\n    backendRefs: [{{name: web, port: 80}}]\n\
             \x20 - matches: [{{path: {{type: RegularExpression, value: \"/re/{i}/[a-z]+/[0-9]+\"}}}}]\n    backendRefs: [{{name: web, port: 80}}]\n\
             \x20 - matches: [{{path: {{type: PathPrefix, value: /api}}, headers: [{{name: x-version, value: v{i}}}], queryParams: [{{name: tenant, value: t{i}}}]}}]\n    \
             backendRefs: [{{name: web, port: 80, weight: 80}}, {{name: web-v2, port: 80, weight: 20}}]\n"
        );
    }
    mesh_model::k8s::load_docs(&[("routes.yaml".to_owned(), docs)]).expect("valid routes")
}

fn route_matching(c: &mut Criterion) {
    let model = route_model();
    let waypoint = NamespacedName::new("shop", "waypoint");
    let svc = model
        .services
        .get(&NamespacedName::new("shop", "web"))
        .expect("service");
    let port = &svc.ports[0];
    let mut headers = HeaderMap::new();
    headers.insert("x-version", "v3".parse().unwrap());
    let target = "/api/items/42?tenant=t3&page=2";
    let normalized = mesh_model::route::normalize_path(target).expect("path");
    let req = mesh_model::route::RouteRequest {
        host: "web.shop.svc.cluster.local",
        method: "GET",
        path: &normalized.path,
        query: normalized.query.as_deref(),
        headers: &headers,
        source: None,
    };
    assert!(matches!(
        mesh_model::route::route(&model, &waypoint, svc, port, &req),
        mesh_model::route::Routing::Matched(_)
    ));
    c.bench_function("route/normalize_path", |b| {
        b.iter(|| mesh_model::route::normalize_path(black_box(target)).map(|p| p.path.len()))
    });
    c.bench_function("route/select_of_16_rules", |b| {
        b.iter(|| {
            let routing = mesh_model::route::route(black_box(&model), &waypoint, svc, port, &req);
            black_box(matches!(routing, mesh_model::route::Routing::Matched(_)))
        })
    });
}

criterion_group!(benches, policy_l4, policy_l7, route_matching);
criterion_main!(benches);
