//! How a new connection's lookups and the model's memory grow with the mesh
//! (`cargo bench -p mesh-model --bench model_size`): the measured pair (a client, a Service
//! of three pods, one waypoint, an ALLOW policy and a STRICT PeerAuthentication in
//! namespace `bench`) alone, then with [`BigMesh`] around it: 10,000 and 50,000 pods on
//! other nodes, one Service per 10 pods, 1,000 AuthorizationPolicies that select nothing.
//!
//! First it prints, per size, the model's heap (jemalloc's `stats.allocated`, the allocator
//! the proxies run with) and resident growth, per pod, and the time to translate the YAML.
//! Then criterion measures, per size, the lookups of
//! - `outbound`: the agent's plan for client → Service VIP (Service by VIP, its waypoint,
//!   its endpoints, each endpoint's pod, enrollment and identity);
//! - `inbound`: the destination agent's admission (source pod by IP, destination pod,
//!   PeerAuthentication mode, the AuthorizationPolicies that apply, their evaluation);
//! - `waypoint`: the waypoint's (CONNECT target by VIP and its waypoint, the policies
//!   attached to it, the endpoints, the destination pod's Services).
//!
//! Flat is the goal: the 50k/empty ratio of each should be ~1.
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark setup, like tests

use std::hint::black_box;
use std::net::IpAddr;
use std::time::Instant;

use criterion::{criterion_group, BenchmarkId, Criterion};
use mesh_model::model::{Model, NamespacedName};
use mesh_model::policy::l7::policies_for_waypoint;
use mesh_model::policy::{authorize, peer_authn_mode, L4Request};
use mesh_model::synthetic::BigMesh;
use mesh_model::Identity;

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const TD: &str = "cluster.local";

/// The measured pair and what its connections look up.
const PAIR: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: bench, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: bench, labels: {app: client}}
spec: {nodeName: n1, serviceAccountName: client}
status: {podIP: 10.0.1.1}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-0, namespace: bench, labels: {app: echo}}
spec: {nodeName: n2, serviceAccountName: echo, containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.2.1}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-1, namespace: bench, labels: {app: echo}}
spec: {nodeName: n2, serviceAccountName: echo, containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.2.2}
---
apiVersion: v1
kind: Pod
metadata: {name: echo-2, namespace: bench, labels: {app: echo}}
spec: {nodeName: n2, serviceAccountName: echo, containers: [{name: app, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.2.3}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: bench}
spec: {clusterIP: 10.0.3.1, selector: {app: echo}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-l7, namespace: bench, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 10.0.3.2, selector: {app: echo}, ports: [{name: http, port: 80, targetPort: http}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: bench}
spec: {gatewayClassName: istio-waypoint}
status: {addresses: [{type: IPAddress, value: 10.0.9.9}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: bench}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: bench}
spec:
  selector: {matchLabels: {app: echo}}
  rules: [{from: [{source: {principals: ["cluster.local/ns/bench/sa/client"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: bench}
spec:
  targetRefs: [{kind: Service, group: "", name: echo-l7}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
"#;

/// (label, pods around the pair); 0 is the pair alone.
const SIZES: [(&str, u32); 3] = [("empty", 0), ("10k", 10_000), ("50k", 50_000)];

fn yaml(pods: u32) -> Vec<(String, String)> {
    let mut files = vec![("pair.yaml".to_string(), PAIR.to_string())];
    if pods > 0 {
        files.extend(BigMesh::new(pods).files());
    }
    files
}

fn load(files: &[(String, String)]) -> Model {
    mesh_model::k8s::load_docs(files).expect("valid mesh")
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Heap and resident bytes now, as jemalloc counts them.
fn heap() -> (usize, usize) {
    tikv_jemalloc_ctl::epoch::advance().unwrap();
    (
        tikv_jemalloc_ctl::stats::allocated::read().unwrap(),
        tikv_jemalloc_ctl::stats::resident::read().unwrap(),
    )
}

fn memory() {
    for (label, pods) in SIZES {
        let docs = yaml(pods);
        let (heap0, resident0) = heap();
        let started = Instant::now();
        let model = load(&docs);
        let took = started.elapsed();
        // The documents are still alive: what grew is the model alone.
        let (heap1, resident1) = heap();
        drop(docs);
        // Per pod of the mesh around the pair (everything it brings counted).
        let per_pod = |bytes: usize| match pods {
            0 => "-".to_string(),
            n => format!("{:.0}", bytes as f64 / f64::from(n)),
        };
        let heap = heap1.saturating_sub(heap0);
        let resident = resident1.saturating_sub(resident0);
        println!(
            "model_size/{label}: {} pods, {} services, {} policies: heap +{:.1} MiB \
             ({} B/pod), resident +{:.1} MiB ({} B/pod), translated in {:.2} s",
            model.pods.len(),
            model.services.len(),
            model.authorization_policies.len(),
            heap as f64 / 1048576.0,
            per_pod(heap),
            resident as f64 / 1048576.0,
            per_pod(resident),
            took.as_secs_f64(),
        );
        drop(model);
    }
}

fn outbound(model: &Model) -> usize {
    let (svc, port) = model.service_by_vip(ip("10.0.3.1"), 80).expect("VIP");
    assert!(model.waypoint_for_service(svc).is_none());
    assert!(model.missing_waypoint_for_service(svc).is_none());
    let eps = model.endpoints(svc, port);
    let mut hops = 0;
    for ep in &eps {
        let name = ep.pod.as_ref().expect("a selector's endpoints are pods");
        let pod = model.pod(&name.namespace, &name.name).expect("pod");
        if model.is_ambient(pod) {
            black_box(model.identity_of(pod, TD));
            hops += 1;
        }
    }
    hops
}

fn inbound(model: &Model, req: &L4Request) -> bool {
    let src = model.workload_by_ip(req.src_ip).expect("client");
    let dst = model.pod("bench", "echo-1").expect("echo");
    black_box(src);
    let strict = peer_authn_mode(model, dst, req.dst_port);
    let eval = authorize(model, dst, req);
    black_box(strict);
    matches!(eval.decision, mesh_model::policy::Decision::Allow)
}

fn waypoint(model: &Model, wp: &NamespacedName) -> usize {
    let (svc, port) = model.service_by_vip(ip("10.0.3.2"), 80).expect("VIP");
    let target = model.waypoint_for_service(svc).expect("waypoint");
    assert_eq!(&target.gateway.key(), wp);
    let key = NamespacedName::new(&svc.namespace, &svc.name);
    let policies = policies_for_waypoint(model, wp, Some(&key));
    let eps = model.endpoints(svc, port);
    let dst = model.pod("bench", "echo-2").expect("echo");
    policies.len() + eps.len() + model.services_for_pod(dst).len()
}

fn lookups(c: &mut Criterion) {
    let req = L4Request {
        src_identity: Some(Identity::new(TD, "bench", "client")),
        src_ip: ip("10.0.1.1"),
        dst_ip: ip("10.0.2.2"),
        dst_port: 8080,
    };
    let wp = NamespacedName::new("bench", "wp");
    let mut g = c.benchmark_group("model_size");
    for (label, pods) in SIZES {
        let model = load(&yaml(pods));
        // The answers do not depend on the mesh around the pair.
        assert_eq!(outbound(&model), 3);
        assert!(inbound(&model, &req));
        assert_eq!(waypoint(&model, &wp), 1 + 3 + 2);
        g.bench_with_input(BenchmarkId::new("outbound", label), &model, |b, m| {
            b.iter(|| outbound(black_box(m)))
        });
        g.bench_with_input(BenchmarkId::new("inbound", label), &model, |b, m| {
            b.iter(|| inbound(black_box(m), black_box(&req)))
        });
        g.bench_with_input(BenchmarkId::new("waypoint", label), &model, |b, m| {
            b.iter(|| waypoint(black_box(m), black_box(&wp)))
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(std::time::Duration::from_millis(500))
        .measurement_time(std::time::Duration::from_secs(2));
    targets = lookups
}

fn main() {
    memory();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
