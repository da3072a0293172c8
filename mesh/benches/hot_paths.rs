//! Micro-benchmarks of the per-connection and per-request hot paths (`cargo bench -p mesh`):
//!
//! - `policy/l4/*`: AuthorizationPolicy at L4 (what ztunnel's inbound runs for every
//!   connection), with policy selection from the model and without;
//! - `policy/l7/*`: AuthorizationPolicy at L7 (what the waypoint will run per request);
//! - `certs/lookup`: the workload certificate a TLS handshake asks for (cached);
//! - `hbone/relay_1MiB`: the byte relay between two in-memory streams;
//! - `hbone/connect_roundtrip`: a new CONNECT stream on a pooled mTLS connection over
//!   loopback, 1 KiB echoed, stream closed (the per-connection cost of a warm pool);
//! - `hbone/tunnel_4MiB`: bulk bytes through one tunnel (DATA framing, windows, TLS).
//!
//! Route matching does not exist yet (waypoint, issue 5): it gets a group when it does.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark setup, like tests

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use http::HeaderMap;
use mesh::hbone::{
    connect_request, relay, serve, AsyncIo, ConnectHeaders, InboundRequest, Pool, PoolConfig,
    PoolKey, ServerConfig,
};
use mesh::model::NamespacedName;
use mesh::policy::l7::{authorize_l7, L7Request};
use mesh::policy::{authorize, evaluate_l4, policies_for, L4Request};
use mesh::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "cluster.local";

// === policy ===

/// The destination pod, 19 namespace policies that do not match the request and one
/// workload ALLOW that does (the usual shape: many rules, one that decides), plus a DENY.
fn l4_model() -> mesh::model::Model {
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
    mesh::k8s::load_docs(&[("policies.yaml".to_owned(), docs)]).expect("valid model")
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
        mesh::policy::Decision::Allow
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

fn l7_model() -> mesh::model::Model {
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
    mesh::k8s::load_docs(&[("policies.yaml".to_owned(), docs)]).expect("valid model")
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
        mesh::policy::Decision::Allow
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
fn route_model() -> mesh::model::Model {
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
    mesh::k8s::load_docs(&[("routes.yaml".to_owned(), docs)]).expect("valid routes")
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
    let normalized = mesh::route::normalize_path(target).expect("path");
    let req = mesh::route::RouteRequest {
        host: "web.shop.svc.cluster.local",
        method: "GET",
        path: &normalized.path,
        query: normalized.query.as_deref(),
        headers: &headers,
        source: None,
    };
    assert!(matches!(
        mesh::route::route(&model, &waypoint, svc, port, &req),
        mesh::route::Routing::Matched(_)
    ));
    c.bench_function("route/normalize_path", |b| {
        b.iter(|| mesh::route::normalize_path(black_box(target)).map(|p| p.path.len()))
    });
    c.bench_function("route/select_of_16_rules", |b| {
        b.iter(|| {
            let routing = mesh::route::route(black_box(&model), &waypoint, svc, port, &req);
            black_box(matches!(routing, mesh::route::Routing::Matched(_)))
        })
    });
}

// === certificates ===

fn certs(c: &mut Criterion) {
    let ca = Arc::new(mesh::ca::Ca::ephemeral(TD).expect("ca"));
    let certs = mesh::certs::CertManager::new(ca, Duration::from_secs(3600));
    let ids: Vec<Identity> = (0..100)
        .map(|i| Identity::new(TD, "default", format!("sa-{i}")))
        .collect();
    for id in &ids {
        certs.certified_key(id).expect("issue");
    }
    let id = &ids[42];
    c.bench_function("certs/lookup", |b| {
        b.iter(|| certs.certified_key(black_box(id)).expect("cached"))
    });
}

// === HBONE ===

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn relay_copy(c: &mut Criterion) {
    const SIZE: usize = 1 << 20;
    let rt = runtime();
    let payload = vec![7u8; SIZE];
    let mut g = c.benchmark_group("hbone");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("relay_1MiB", |b| {
        b.to_async(&rt).iter(|| async {
            // client ⇄ (a | relay | b) ⇄ sink
            let (mut client, a) = tokio::io::duplex(64 * 1024);
            let (b_end, mut sink) = tokio::io::duplex(64 * 1024);
            let relay = tokio::spawn(relay(AsyncIo(a), AsyncIo(b_end), |_, _| {}));
            let reader = tokio::spawn(async move {
                let mut got = Vec::with_capacity(SIZE);
                sink.read_to_end(&mut got).await.expect("read");
                got.len()
            });
            client.write_all(&payload).await.expect("write");
            client.shutdown().await.expect("shutdown");
            let got = reader.await.expect("reader");
            drop(client);
            let _ = relay.await;
            assert_eq!(got, SIZE);
        })
    });
    g.finish();
}

/// An HBONE echo server on loopback with the mesh's real TLS configs; returns its address
/// and the client's TLS config.
async fn hbone_echo() -> (SocketAddr, Arc<rustls::ClientConfig>) {
    let ca = Arc::new(mesh::ca::Ca::ephemeral(TD).expect("ca"));
    let certs = mesh::certs::CertManager::new(ca, Duration::from_secs(3600));
    let echo = Identity::new(TD, "default", "echo");
    let sleep = Identity::new(TD, "default", "sleep");
    let server_tls = mesh::tls::server_config(certs.clone(), echo.clone()).expect("server tls");
    let client_tls = mesh::tls::client_config(certs, sleep, vec![echo]).expect("client tls");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = serve(tls, &ServerConfig::default(), echo_tunnel).await;
            });
        }
    });
    (addr, client_tls)
}

async fn echo_tunnel(req: InboundRequest) {
    let Ok(stream) = req.accept() else { return };
    let (mut r, mut w) = tokio::io::split(stream);
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

fn pool_key(dst: SocketAddr) -> PoolKey {
    PoolKey {
        src: Identity::new(TD, "default", "sleep"),
        src_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        dst: Identity::new(TD, "default", "echo"),
        dst_addr: dst,
    }
}

fn connect_headers() -> ConnectHeaders {
    ConnectHeaders {
        src_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
        service_host: Some("echo.default.svc.cluster.local".into()),
        baggage: vec![("k8s.namespace.name".into(), "default".into())],
        traceparent: None,
    }
}

/// Opens a tunnel on the pool, sends `payload`, half-closes, reads the echo back.
async fn roundtrip(
    pool: &Pool,
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    payload: &[u8],
) -> usize {
    let target = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)), 8080);
    let mut tunnel = pool
        .connect(
            pool_key(addr),
            tls.clone(),
            move || TcpStream::connect(addr),
            connect_request(target, &connect_headers()),
        )
        .await
        .expect("tunnel");
    let (mut r, mut w) = tokio::io::split(&mut tunnel);
    let write = async {
        w.write_all(payload).await.expect("send");
        w.shutdown().await.expect("half-close");
    };
    let read = async {
        let mut back = Vec::with_capacity(payload.len());
        r.read_to_end(&mut back).await.expect("echo");
        back.len()
    };
    let ((), n) = tokio::join!(write, read);
    n
}

fn hbone_tunnel(c: &mut Criterion) {
    let rt = runtime();
    let (addr, tls) = rt.block_on(hbone_echo());
    let pool = Pool::new(PoolConfig::default());
    let small = vec![1u8; 1024];
    // Warm the pool: the benchmark measures streams on an established connection.
    assert_eq!(
        rt.block_on(roundtrip(&pool, addr, &tls, &small)),
        small.len()
    );
    let mut g = c.benchmark_group("hbone");
    g.bench_function("connect_roundtrip", |b| {
        b.to_async(&rt)
            .iter(|| async { roundtrip(&pool, addr, &tls, &small).await })
    });
    let big = vec![2u8; 4 << 20];
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.sample_size(20);
    g.bench_function("tunnel_4MiB", |b| {
        b.to_async(&rt)
            .iter(|| async { roundtrip(&pool, addr, &tls, &big).await })
    });
    g.finish();
}

criterion_group!(
    benches,
    policy_l4,
    policy_l7,
    route_matching,
    certs,
    relay_copy,
    hbone_tunnel
);
criterion_main!(benches);
