//! What the phase tests share: a small mesh, a request context, a response body's text.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use http::{HeaderMap, HeaderName, HeaderValue, Request, Response};
use http_body_util::BodyExt;
use mesh_model::identity::Identity;
use mesh_model::k8s::load_docs;
use mesh_model::model::{Model, NamespacedName};

use super::response::Observed;
use super::RequestContext;
use crate::protocol::Declared;
use crate::proxy::ConnCtx;
use crate::target::Target;
use crate::telemetry::{AccessLog, LabelInputs};

/// A waypoint `app/wp` for the Service `app/web` (VIP 10.96.0.1, ports 80 http and 9000
/// grpc) with two ready pods (`version: v1` and `v2`), and `app/api` (10.96.0.2:80, one
/// pod).
pub const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: app, labels: {istio.io/waypoint-for: all}}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: app, labels: {app: web, version: v1}}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: app, labels: {app: web, version: v2}}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: app, labels: {app: api}}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: app, labels: {istio.io/use-waypoint: wp}}
spec:
  clusterIP: 10.96.0.1
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: grpc, port: 9000}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: app, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.2, selector: {app: api}, ports: [{name: http, port: 80}]}
"#;

/// [`MESH`] and more documents.
pub fn model(more: &[&str]) -> Model {
    let mut files = vec![("0-mesh.yaml".to_string(), MESH.to_string())];
    for (i, doc) in more.iter().enumerate() {
        files.push((format!("{}-more.yaml", i + 1), doc.to_string()));
    }
    load_docs(&files).expect("valid mesh")
}

pub fn waypoint() -> NamespacedName {
    NamespacedName::new("app", "wp")
}

/// A tunnel from a client pod to `app/web:80`.
pub fn conn() -> ConnCtx {
    ConnCtx {
        peer: SocketAddr::from(([10, 0, 0, 9], 40000)),
        local: SocketAddr::from(([10, 0, 0, 100], 15008)),
        peer_identity: Some(Identity::new("cluster.local", "app", "client")),
        authority: SocketAddr::from(([10, 96, 0, 1], 80)),
        target: Target::Service {
            svc: NamespacedName::new("app", "web"),
            port: 80,
        },
        declared: Declared::Http,
        hosts: Arc::from([]),
    }
}

/// A `GET /` as the downstream phase leaves it (gRPC by content type when `grpc`).
pub fn request_context(grpc: bool) -> RequestContext {
    let mut builder = Request::get("/").header("host", "web.app");
    if grpc {
        builder = builder.header("content-type", "application/grpc");
    }
    let (parts, ()) = builder.body(()).expect("request").into_parts();
    let started = Instant::now();
    RequestContext {
        parts,
        authority: "web.app".to_string(),
        malformed: None,
        remote_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)),
        raw_target: "/".to_string(),
        grpc_request: grpc,
        downstream_h2: grpc,
        upgrade: None,
        downstream_upgrade: None,
        labels: LabelInputs::default(),
        log: AccessLog {
            enabled: true,
            started,
            src: SocketAddr::from(([10, 0, 0, 9], 40000)),
            src_identity: None,
            protocol: "HTTP/1.1",
            method: "GET".to_string(),
            authority: "web.app".to_string(),
            path: "/".to_string(),
            request_id: "r".to_string(),
            service: None,
            attempts: 0,
            route: None,
            backend: None,
            upstream: None,
            reason: None,
        },
        req_bytes: Arc::default(),
        started,
    }
}

/// Headers from `(name, value)` pairs, in order (a name may repeat).
pub fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

/// The whole body of a response, as text.
pub async fn body_of(rsp: Response<Observed>) -> String {
    let bytes = rsp.into_body().collect().await.expect("body").to_bytes();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Upstream pools with the waypoint's default settings, for `workers` data workers (the
/// caller's told by `worker`).
pub fn upstreams(
    identity: &Identity,
    http_metrics: &crate::telemetry::HttpMetrics,
    certs: Arc<mesh_pki::certs::CertManager>,
    workers: usize,
    worker: fn() -> Option<usize>,
) -> Arc<crate::upstream::Upstreams> {
    use std::time::Duration;

    use crate::upstream::{UpstreamConfig, Upstreams};
    Upstreams::new(
        UpstreamConfig {
            identity: identity.clone(),
            connect_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(60),
            max_idle: 32,
            keepalive: mesh_hbone::tcp::Keepalive::default(),
            outlier_ejections: http_metrics.outlier_ejections.clone(),
            hbone: mesh_hbone::PoolConfig::default(),
            worker,
        },
        certs,
        workers,
    )
}

/// The waypoint `app/wp`'s shared inputs with `model` (upstreams that are never dialled by
/// the tests that use this), with the waypoint's default settings.
pub fn inputs(model: Model) -> Arc<crate::proxy::Inputs> {
    use std::time::Duration;

    use crate::jwks::JwksSettings;
    use crate::proxy::EngineConfig;
    use crate::telemetry::HttpMetrics;
    let cfg = EngineConfig {
        gateway: NamespacedName::new("app", "wp"),
        identity: Identity::new("cluster.local", "app", "wp"),
        trust_domain: "cluster.local".to_string(),
        num_trusted_proxies: 0,
    };
    let ca = mesh_pki::ca::Ca::ephemeral("cluster.local").expect("ephemeral ca");
    let certs = mesh_pki::certs::CertManager::new(Arc::new(ca), Duration::from_secs(3600));
    let (metrics, http_metrics) = HttpMetrics::new();
    let upstreams = upstreams(&cfg.identity, &http_metrics, certs.clone(), 1, || None);
    let jwks_settings = JwksSettings {
        refresh: Duration::from_secs(20 * 60),
        retry: Duration::from_secs(5),
        max_stale: Duration::from_secs(3600),
        fetch_timeout: Duration::from_secs(5),
    };
    let jwks_tls = crate::jwks::tls_config(None).expect("webpki roots");
    let jwks = crate::jwks::JwksCache::new(jwks_settings, jwks_tls, http_metrics.clone());
    Arc::new(crate::proxy::Inputs {
        receive_budget: mesh_hbone::ReceiveBudget::default(),
        cfg,
        model: Arc::new(arc_swap::ArcSwap::from_pointee(model)),
        certs,
        metrics,
        http_metrics,
        upstreams,
        jwks,
        drain: tokio_util::sync::CancellationToken::new(),
        access_log: Arc::default(),
        hosts: Arc::new(crate::resolve::HostCache::new(
            std::time::Duration::from_secs(2),
        )),
    })
}

/// `app/httpbin`: a ServiceEntry for `httpbin.org` (address 240.1.0.1, ports 80 http and
/// 443 https, one static endpoint outside the mesh) whose traffic goes through `app/wp`: an
/// egress waypoint.
pub const ENTRY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: httpbin, namespace: app, labels: {istio.io/use-waypoint: wp}}
spec:
  hosts: [httpbin.org]
  addresses: [240.1.0.1]
  ports: [{number: 80, name: http, protocol: HTTP}, {number: 443, name: https, protocol: HTTPS}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.10}]
"#;

/// A tunnel from a client pod to the ServiceEntry [`ENTRY`] on port 80.
pub fn entry_conn() -> ConnCtx {
    let addr = SocketAddr::from(([240, 1, 0, 1], 80));
    ConnCtx {
        authority: addr,
        target: Target::ServiceEntry {
            entry: NamespacedName::new("app", "httpbin"),
            port: 80,
            addr,
        },
        ..conn()
    }
}
