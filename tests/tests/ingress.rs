//! The ingress gateway end to end: a `Gateway` of class `istio` (Istio's ingress class) served
//! by the proxy binary in a pod of its own (`istio-ingress/ingress`, outside the ambient
//! namespaces), reached by a client outside the mesh over HTTP and HTTPS (a certificate
//! made here, in a Kubernetes TLS Secret), routed by an `HTTPRoute` attached to its
//! listeners (by header and by weight) to Services in the mesh, whose pods are reached over
//! HBONE under the gateway's identity: an AuthorizationPolicy on them that allows only the
//! gateway's principal lets the gateway in and keeps a mesh client out. A Service that uses
//! a waypoint is reached through it, whose L7 policy sees the gateway's principal. A second
//! host, on a listener of its own, is routed by an Istio `VirtualService` bound to the
//! Gateway (`gateways: [istio-ingress/ingress]`), by header to a DestinationRule subset and
//! by path to a Service.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use e2e::waypoint::{gateway_yaml, http_service, waypoint_pod, waypoint_service};
use e2e::{wait_until, Ambient, Mesh, Pod};
use serde_json::Value;

const GATEWAY_POD: &str = "istio-ingress/ingress";
const OUTSIDER: &str = "legacy/outsider";
const HOST: &str = "bookinfo.example.com";
/// The host the VirtualService bound to the gateway serves.
const RATINGS_HOST: &str = "ratings.example.com";
const V1_VIP: &str = "10.96.0.61";
const V2_VIP: &str = "10.96.0.62";
/// `reviews`: a Service that uses the waypoint `default/waypoint`.
const REVIEWS_VIP: &str = "10.96.0.63";
/// `echo`: both versions (subsets `v1` and `v2` by a DestinationRule).
const ECHO_VIP: &str = "10.96.0.64";
const APPLY: Duration = Duration::from_secs(15);

fn mesh(name: &str) -> Result<Mesh> {
    let version = |name: &str, node: &str, version: &str| {
        Pod::new("default", name)
            .on(node)
            .service_account("echo")
            .labels([("app", "echo"), ("version", version)])
    };
    Mesh::two_nodes(name)
        .namespace("istio-ingress", Ambient::No)
        .namespace("legacy", Ambient::No)
        .pod(waypoint_pod("istio-ingress", "ingress", "n1"))
        .pod(Pod::new("legacy", "outsider").on("n2"))
        .pod(version("echo-v1", "n2", "v1"))
        .pod(version("echo-v2", "n1", "v2"))
        .service(http_service("echo-v1", V1_VIP, ("version", "v1")))
        .service(http_service("echo-v2", V2_VIP, ("version", "v2")))
        .service(http_service("echo", ECHO_VIP, ("app", "echo")))
        .pod(waypoint_pod("default", "waypoint", "n2"))
        .yaml(
            "waypoint.yaml",
            &gateway_yaml("default", "waypoint", "service"),
        )
        .pod(
            Pod::new("default", "reviews")
                .on("n2")
                .service_account("reviews")
                .labels([("app", "reviews")]),
        )
        .service(waypoint_service("reviews", REVIEWS_VIP, ("app", "reviews")))
        .build()
}

/// The Gateway, its certificate's Secret, the route, the VirtualService for
/// [`RATINGS_HOST`] with its DestinationRule, and the backends' policy.
fn config(cert_pem: &str, key_pem: &str) -> String {
    let indent = |pem: &str| {
        pem.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: ingress, namespace: istio-ingress}}
spec:
  gatewayClassName: istio
  listeners:
  - {{name: http, port: 80, protocol: HTTP, hostname: {HOST}, allowedRoutes: {{namespaces: {{from: All}}}}}}
  - name: https
    port: 443
    protocol: HTTPS
    hostname: {HOST}
    tls: {{mode: Terminate, certificateRefs: [{{kind: Secret, name: bookinfo-cert}}]}}
    allowedRoutes: {{namespaces: {{from: All}}}}
  - {{name: ratings, port: 80, protocol: HTTP, hostname: {RATINGS_HOST}}}
---
apiVersion: v1
kind: Secret
metadata: {{name: bookinfo-cert, namespace: istio-ingress}}
type: kubernetes.io/tls
stringData:
  tls.crt: |
{cert}  tls.key: |
{key}---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: bookinfo, namespace: default}}
spec:
  parentRefs: [{{name: ingress, namespace: istio-ingress}}]
  hostnames: [{HOST}]
  rules:
  - matches: [{{headers: [{{name: x-version, value: v2}}]}}]
    backendRefs: [{{name: echo-v2, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /reviews}}}}]
    backendRefs: [{{name: reviews, port: 80}}]
  - matches: [{{path: {{type: PathPrefix, value: /split}}}}]
    backendRefs: [{{name: echo-v1, port: 80, weight: 50}}, {{name: echo-v2, port: 80, weight: 50}}]
  - backendRefs: [{{name: echo-v1, port: 80}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ratings, namespace: default}}
spec:
  hosts: [{RATINGS_HOST}]
  gateways: [istio-ingress/ingress]
  http:
  - name: by-header
    match: [{{headers: {{x-version: {{exact: v2}}}}}}]
    route: [{{destination: {{host: echo, subset: v2}}}}]
  - name: by-path
    match: [{{uri: {{prefix: /v2}}}}]
    route: [{{destination: {{host: echo-v2.default.svc.cluster.local, port: {{number: 80}}}}}}]
  - name: default
    route: [{{destination: {{host: echo, subset: v1}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: echo, namespace: default}}
spec:
  host: echo
  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: only-the-gateway, namespace: default}}
spec:
  selector: {{matchLabels: {{app: echo}}}}
  action: ALLOW
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/istio-ingress/sa/ingress]}}}}]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: reviews-from-the-gateway, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: reviews}}]
  action: ALLOW
  rules: [{{from: [{{source: {{principals: [cluster.local/ns/istio-ingress/sa/ingress]}}}}]}}]
"#,
        cert = indent(cert_pem),
        key = indent(key_pem),
    )
}

/// `curl` from the client outside the mesh: (status, JSON body when there is one).
fn curl(mesh: &Mesh, args: &[&str]) -> Result<(u16, Value)> {
    let mut argv = vec!["curl", "-sS", "-m", "5", "-w", "\n%{http_code}"];
    argv.extend_from_slice(args);
    let out = mesh.exec_ok(OUTSIDER, &argv)?;
    let (body, status) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim()));
    let status = status.trim().parse().context("curl status")?;
    Ok((status, serde_json::from_str(body).unwrap_or(Value::Null)))
}

#[test]
fn a_client_outside_the_mesh_reaches_services_through_the_ingress_gateway() -> Result<()> {
    let mesh = mesh("ingress")?;
    let _v1 = mesh.spawn_echo("default/echo-v1", 8080, "v1")?;
    let _v2 = mesh.spawn_echo("default/echo-v2", 8080, "v2")?;
    let dir = tempfile::tempdir()?;
    let ca = e2e::tls::TestCa::new(dir.path(), "ingress")?;
    let leaf = ca.issue(&[HOST], false)?;
    let (cert, key) = (
        std::fs::read_to_string(&leaf.cert)?,
        std::fs::read_to_string(&leaf.key)?,
    );
    mesh.write_yaml("ingress.yaml", &config(&cert, &key))?;
    // Once the backends' policy is in force, a mesh client that is not the gateway is kept
    // out (what follows shows the gateway is let in).
    let direct = SocketAddr::new(V1_VIP.parse()?, 80);
    wait_until(
        "the backends' policy refuses other mesh clients",
        APPLY,
        || Ok(mesh.http_get("default/client", direct, "/direct").is_err()),
    )?;
    let _reviews = mesh.spawn_echo("default/reviews", 8080, "reviews")?;
    let _waypoint = mesh.spawn_default_waypoint()?;
    let _gateway = mesh.spawn_waypoint(GATEWAY_POD, "istio-ingress", "ingress", "ingress")?;
    let gateway_ip = mesh.pod_ip(GATEWAY_POD)?;
    let http = format!("http://{gateway_ip}/productpage");
    let host = format!("Host: {HOST}");

    // HTTP: the default rule; the gateway is the backend's caller, over HBONE (the policy
    // allows only its principal).
    let mut first = (0, Value::Null);
    wait_until("the HTTP listener answers", APPLY, || {
        first = curl(&mesh, &["-H", &host, &http]).unwrap_or((0, Value::Null));
        Ok(first.0 == 200)
    })?;
    let (_, body) = &first;
    ensure!(body["server"] == "v1", "default rule: {body}");
    let peer: SocketAddr = body["peer"].as_str().context("peer")?.parse()?;
    ensure!(
        peer.ip() == std::net::IpAddr::V4(gateway_ip),
        "the backend sees the gateway: {body}"
    );
    let (status, body) = curl(&mesh, &["-H", &host, "-H", "x-version: v2", &http])?;
    ensure!(
        status == 200 && body["server"] == "v2",
        "by header: {status} {body}"
    );
    let (status, _) = curl(&mesh, &["-H", "Host: other.example.com", &http])?;
    ensure!(status == 404, "a host no listener takes: {status}");

    // The VirtualService bound to the gateway routes its host (on the `ratings` listener):
    // by header to the DestinationRule subset `v2` of `echo`, by path to `echo-v2`, else
    // to the subset `v1` (several requests: round robin over both pods would alternate).
    let ratings = format!("Host: {RATINGS_HOST}");
    for (headers, path, want) in [
        (&[][..], "/ratings", "v1"),
        (&["-H", "x-version: v2"][..], "/ratings", "v2"),
        (&[][..], "/v2/ratings", "v2"),
    ] {
        for _ in 0..4 {
            let url = format!("http://{gateway_ip}{path}");
            let mut args = vec!["-H", ratings.as_str()];
            args.extend_from_slice(headers);
            args.push(&url);
            let (status, body) = curl(&mesh, &args)?;
            ensure!(
                status == 200 && body["server"] == want,
                "VirtualService {path} {headers:?}: {status} {body}"
            );
        }
    }

    // A Service that uses a waypoint is reached through it ("ingress → waypoint"): the
    // waypoint's policy sees the gateway's principal and lets it in, the pod sees the
    // waypoint; a mesh client the policy does not name is refused there.
    let reviews = format!("http://{gateway_ip}/reviews");
    let (status, body) = curl(&mesh, &["-H", &host, &reviews])?;
    ensure!(
        status == 200 && body["server"] == "reviews",
        "through the waypoint: {status} {body}"
    );
    let waypoint_ip = mesh.pod_ip("default/waypoint")?;
    let peer: SocketAddr = body["peer"].as_str().context("peer")?.parse()?;
    ensure!(
        peer.ip() == std::net::IpAddr::V4(waypoint_ip),
        "the pod is called by the waypoint: {body}"
    );
    let direct = mesh.http_get(
        "default/client",
        SocketAddr::new(REVIEWS_VIP.parse()?, 80),
        "/",
    )?;
    ensure!(
        direct.status == 403,
        "the waypoint's policy refuses a mesh client: {}",
        direct.status
    );

    // By weight: both versions answer.
    let mut seen = BTreeSet::new();
    let split = format!("http://{gateway_ip}/split");
    for _ in 0..40 {
        let (status, body) = curl(&mesh, &["-H", &host, &split])?;
        ensure!(status == 200, "split: {status}");
        seen.insert(body["server"].as_str().unwrap_or_default().to_string());
        if seen.len() == 2 {
            break;
        }
    }
    ensure!(seen.len() == 2, "50/50 split reached {seen:?}");

    // HTTPS with the certificate made here: verified by the client against its CA.
    let ca_file = ca.cert.to_string_lossy().into_owned();
    let resolve = format!("{HOST}:443:{gateway_ip}");
    let https = format!("https://{HOST}/productpage");
    let mut secure = (0, Value::Null);
    wait_until("the HTTPS listener answers", APPLY, || {
        secure = curl(
            &mesh,
            &["--cacert", &ca_file, "--resolve", &resolve, &https],
        )
        .unwrap_or((0, Value::Null));
        Ok(secure.0 == 200)
    })?;
    ensure!(secure.1["server"] == "v1", "HTTPS: {}", secure.1);
    let (status, body) = curl(
        &mesh,
        &[
            "--http2",
            "--cacert",
            &ca_file,
            "--resolve",
            &resolve,
            &https,
        ],
    )?;
    ensure!(
        status == 200 && body["server"] == "v1",
        "HTTP/2 over TLS: {status} {body}"
    );

    // A handshake flood from one source: silent connections to the HTTPS port hold TLS
    // handshake slots up to the source's share (32 by default); the rest are closed at once
    // and counted OM, like the HBONE listener's (one budget per process). Once they go, the
    // source is served again.
    let refused_om = || -> Result<f64> {
        Ok(e2e::prom::sum(
            &mesh.waypoint_metrics(GATEWAY_POD)?,
            "mesh_connections_refused_total",
            &[("reporter", "gateway"), ("reason", "OM")],
        ))
    };
    let before = refused_om()?;
    let tls_port = SocketAddr::new(gateway_ip.into(), 443);
    let silent = mesh.in_pod(OUTSIDER, || {
        (0..64)
            .map(|_| std::net::TcpStream::connect_timeout(&tls_port, Duration::from_secs(2)))
            .collect::<std::io::Result<Vec<_>>>()
    })??;
    wait_until(
        "the flood beyond the source's share is refused",
        APPLY,
        || Ok(refused_om()? - before >= 32.0),
    )?;
    drop(silent);
    let mut again = 0;
    wait_until(
        "the source is served again once its handshakes end",
        APPLY,
        || {
            again = curl(
                &mesh,
                &["--cacert", &ca_file, "--resolve", &resolve, &https],
            )
            .map_or(0, |(status, _)| status);
            Ok(again == 200)
        },
    )?;

    Ok(())
}
