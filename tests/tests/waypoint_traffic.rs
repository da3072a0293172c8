//! DestinationRule at the waypoint, end to end: three mesh-echo pods (`v1` on n1, `v2` and
//! `v3` on n2) serve several Services, each labelled `istio.io/use-waypoint` and each with
//! its own DestinationRule, so one waypoint (on n2) shows every policy without reloads:
//!
//! - `hash`: `consistentHash.httpHeaderName: x-user` (a user sticks to one pod, users spread);
//! - `sticky`: `consistentHash.httpCookie` with a `ttl` (the waypoint sets the cookie);
//! - `spread`: `LEAST_REQUEST` (sequential requests reach every pod);
//! - `outlier`: `consecutive5xxErrors: 3` (the pod answering 503 is ejected, the rest
//!   answer everything);
//! - `pool`: `http2MaxRequests: 1` (concurrent slow requests overflow with `503 UO`);
//! - `conns` (pod v1 only): `tcp.maxConnections: 1`, `http1MaxPendingRequests: 1` (one
//!   request waits for the one connection, the rest overflow);
//! - `perconn` (pod v1 only): `maxRequestsPerConnection: 2` (a new upstream connection every
//!   two requests, seen by mesh-echo as a new peer).
//!
//! - `tls-simple`, `tls-mutual`, `tls-nocert`: `tls` `SIMPLE` / `MUTUAL` / `SIMPLE` to
//!   mesh-echo pods outside the mesh (`istio.io/dataplane-mode: none`) that serve HTTPS
//!   (`tls` on n1; `mtls` on n1, requiring a client certificate): the waypoint originates
//!   TLS, the backend reports the SNI, ALPN and client certificate it saw; without a client
//!   certificate the backend refuses and the client gets `503 UF`;
//! - `subsets`: `tls: {mode: ISTIO_MUTUAL}` with subsets, a VirtualService routing to
//!   subset `v3` (the mode changes nothing, the subsets apply).
//!
//! A malformed DestinationRule is refused and the last good rules stay in force.
//! Requests come from a client pod on n1 over keep-alive HTTP/1.1 connections.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use e2e::prom;
use e2e::waypoint::{
    access_log_telemetry, log_tail, server, wait_for_rejection, waypoint_mesh, waypoint_service,
    Client, CLIENT, WAYPOINT,
};
use e2e::{scenarios, wait_until, ChildGuard, Mesh, Pod, Suite};

/// Each Service and its VIP (all select the three pods, `conns` and `perconn` only v1, the
/// `tls-*` Services the pods outside the mesh).
const SERVICES: [(&str, &str); 11] = [
    ("hash", "10.96.0.30"),
    ("sticky", "10.96.0.31"),
    ("spread", "10.96.0.32"),
    ("outlier", "10.96.0.33"),
    ("pool", "10.96.0.34"),
    ("conns", "10.96.0.35"),
    ("perconn", "10.96.0.36"),
    ("tls-simple", "10.96.0.37"),
    ("tls-mutual", "10.96.0.38"),
    ("tls-nocert", "10.96.0.39"),
    ("subsets", "10.96.0.40"),
];

/// The pods outside the mesh that serve HTTPS on 8080: `tls` (server only) and `mtls`
/// (client certificates of the backend CA required).
const TLS_PODS: [(&str, &str); 2] = [("tls", "n1"), ("mtls", "n1")];

/// The certificates of the `tls-*` scenarios, in a temp dir both the waypoint and the
/// backends read: the backend CA, the backends' server certificate (for every `tls-*`
/// Service name) and the waypoint's client certificate.
struct TlsFiles {
    _dir: tempfile::TempDir,
    ca: std::path::PathBuf,
    server: e2e::tls::Leaf,
    client: e2e::tls::Leaf,
}

impl TlsFiles {
    fn new() -> Result<TlsFiles> {
        let dir = tempfile::tempdir()?;
        let ca = e2e::tls::TestCa::new(dir.path(), "backend")?;
        let server = ca.issue(
            &[
                "tls-simple.default.svc.cluster.local",
                "tls-mutual.default.svc.cluster.local",
                "tls-nocert.default.svc.cluster.local",
            ],
            false,
        )?;
        let client = ca.issue(&["waypoint.client.test"], true)?;
        Ok(TlsFiles {
            ca: ca.cert.clone(),
            _dir: dir,
            server,
            client,
        })
    }

    /// The DestinationRules of the `tls-*` Services and `subsets`, and the VirtualService
    /// sending `subsets` to subset `v3`.
    fn rules(&self) -> String {
        let (ca, cert, key) = (
            self.ca.display(),
            self.client.cert.display(),
            self.client.key.display(),
        );
        format!(
            r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: tls-simple, namespace: default}}
spec:
  host: tls-simple
  trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: {ca}}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: tls-mutual, namespace: default}}
spec:
  host: tls-mutual
  trafficPolicy:
    tls: {{mode: MUTUAL, caCertificates: {ca}, clientCertificate: {cert}, privateKey: {key}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: tls-nocert, namespace: default}}
spec:
  host: tls-nocert
  trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: {ca}}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: subsets, namespace: default}}
spec:
  host: subsets
  trafficPolicy: {{tls: {{mode: ISTIO_MUTUAL}}}}
  subsets:
  - {{name: v1, labels: {{version: v1}}}}
  - {{name: v3, labels: {{version: v3}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: subsets, namespace: default}}
spec:
  hosts: [subsets.default.svc.cluster.local]
  http:
  - route: [{{destination: {{host: subsets.default.svc.cluster.local, subset: v3}}}}]
"#
        )
    }
}

const RULES: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hash, namespace: default}
spec:
  host: hash
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
---
apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata: {name: sticky, namespace: default}
spec:
  host: sticky.default.svc.cluster.local
  trafficPolicy:
    loadBalancer: {consistentHash: {httpCookie: {name: sticky, path: /, ttl: 60s}}}
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: spread, namespace: default}
spec:
  host: spread
  trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: outlier, namespace: default}
spec:
  host: outlier
  trafficPolicy:
    outlierDetection: {consecutive5xxErrors: 3, interval: 1s, baseEjectionTime: 5m}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: pool, namespace: default}
spec:
  host: pool
  trafficPolicy:
    connectionPool: {http: {http2MaxRequests: 1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: conns, namespace: default}
spec:
  host: conns
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: perconn, namespace: default}
spec:
  host: perconn
  trafficPolicy:
    connectionPool: {tcp: {maxConnections: 1}, http: {maxRequestsPerConnection: 2}}
"#;

fn mesh(test: &str, tls: &TlsFiles) -> Result<Mesh> {
    let mut b = waypoint_mesh(test);
    for (name, node) in TLS_PODS {
        b = b.pod(
            Pod::new("default", name)
                .on(node)
                .service_account("secure")
                .labels([("app", name), ("istio.io/dataplane-mode", "none")]),
        );
    }
    for (name, node) in [("v1", "n1"), ("v2", "n2"), ("v3", "n2")] {
        b = b.pod(
            Pod::new("default", name)
                .on(node)
                .service_account("echo")
                .labels([("app", "echo"), ("version", name)]),
        );
    }
    for (name, vip) in SERVICES {
        let selector = match name {
            "conns" | "perconn" => ("version", "v1"),
            "tls-simple" => ("app", "tls"),
            "tls-mutual" | "tls-nocert" => ("app", "mtls"),
            _ => ("app", "echo"),
        };
        b = b.service(waypoint_service(name, vip, selector));
    }
    b.yaml("rules.yaml", RULES)
        .yaml("tls-rules.yaml", &tls.rules())
        // The TLS scenario reads the waypoint's access-log lines.
        .yaml("telemetry.yaml", &access_log_telemetry("default", "logs"))
        .build()
}

fn vip(service: &str) -> Result<SocketAddr> {
    let (_, ip) = SERVICES
        .iter()
        .find(|(n, _)| *n == service)
        .context("unknown service")?;
    Ok(format!("{ip}:80").parse()?)
}

/// A keep-alive connection from the client pod to `service`.
fn connect(mesh: &Mesh, service: &str) -> Result<Client> {
    Client::connect(mesh, CLIENT, vip(service)?)
}

/// The mesh-echo server that answered `GET target` with 200.
fn server_of(c: &mut Client, target: &str, headers: &[(&str, &str)]) -> Result<String> {
    Ok(server(&c.echo(target, headers)?))
}

/// What the scenarios share: the mesh and its waypoint.
struct Traffic {
    wp: ChildGuard,
    _echo: Vec<ChildGuard>,
    /// Last: dropped once the processes in it are gone.
    mesh: Mesh,
    _tls: TlsFiles,
}

impl Traffic {
    fn build() -> Result<Self> {
        let tls = TlsFiles::new()?;
        let mesh = mesh("waypoint_traffic", &tls)?;
        let mut echo: Vec<ChildGuard> = ["v1", "v2", "v3"]
            .into_iter()
            .map(|n| mesh.spawn_echo(&format!("default/{n}"), 8080, n))
            .collect::<Result<_>>()?;
        let (cert, key, ca) = (
            tls.server.cert.to_string_lossy(),
            tls.server.key.to_string_lossy(),
            tls.ca.to_string_lossy(),
        );
        let server = ["--tls-cert", &*cert, "--tls-key", &*key];
        echo.push(mesh.spawn_echo_with("default/tls", 8080, "tls", &server)?);
        let mutual = [&server[..], &["--client-ca", &*ca]].concat();
        echo.push(mesh.spawn_echo_with("default/mtls", 8080, "mtls", &mutual)?);
        let wp = mesh.spawn_default_waypoint()?;
        Ok(Traffic {
            wp,
            _echo: echo,
            mesh,
            _tls: tls,
        })
    }
}

impl Suite for Traffic {
    fn explain(&self, err: anyhow::Error) -> anyhow::Error {
        log_tail(&self.wp, err)
    }
}

/// One mesh for all scenarios: each Service has its own DestinationRule, so no scenario
/// changes what another sees (the last adds a rule the waypoint refuses).
fn main() -> ExitCode {
    e2e::scenario::main(
        Traffic::build,
        &scenarios![
            consistent_hash_on_a_header,
            consistent_hash_on_a_generated_cookie,
            least_request_reaches_every_pod,
            outlier_detection_ejects_the_failing_pod,
            connection_pool_overflow_answers_503_uo,
            one_connection_per_endpoint_with_one_waiting,
            connections_are_replaced_after_max_requests,
            simple_tls_originates_to_a_backend_outside_the_mesh,
            mutual_tls_presents_the_waypoints_client_certificate,
            a_backend_refusing_the_tls_answers_503_uf,
            an_istio_mutual_rule_routes_by_subset,
            a_bad_rule_keeps_the_last_good_rules,
        ],
        &[],
    )
}

/// The same `x-user` reaches the same pod every time; different users spread.
fn consistent_hash_on_a_header(t: &mut Traffic) -> Result<()> {
    let mesh = &t.mesh;
    let mut c = connect(mesh, "hash")?;
    let first = server_of(&mut c, "/who", &[("x-user", "alice")])?;
    for i in 0..50 {
        let s = server_of(&mut c, &format!("/who/{i}"), &[("x-user", "alice")])?;
        assert_eq!(s, first, "request {i} of alice moved");
    }
    let mut by_user = BTreeMap::new();
    for u in 0..20 {
        let user = format!("user-{u}");
        by_user.insert(
            user.clone(),
            server_of(&mut c, "/who", &[("x-user", &user)])?,
        );
    }
    let pods: BTreeSet<&String> = by_user.values().collect();
    eprintln!("hash: 20 users on {pods:?}");
    assert!(pods.len() >= 2, "20 users all on one pod: {by_user:?}");
    // Asked again, each user is where it was.
    for (user, pod) in &by_user {
        assert_eq!(
            &server_of(&mut c, "/again", &[("x-user", user)])?,
            pod,
            "{user}"
        );
    }
    Ok(())
}

/// No cookie: the waypoint picks a pod and sets `sticky`; with it, the same pod answers.
fn consistent_hash_on_a_generated_cookie(t: &mut Traffic) -> Result<()> {
    let mesh = &t.mesh;
    let mut c = connect(mesh, "sticky")?;
    let r = c.get("/first", &[])?;
    assert_eq!(r.status, 200, "{}", r.text());
    let set = r
        .header("set-cookie")
        .context("a set-cookie for the generated cookie")?
        .to_string();
    assert!(set.starts_with("sticky=\""), "{set}");
    assert!(
        set.contains("Max-Age=60") && set.contains("Path=/"),
        "{set}"
    );
    let cookie = set.split(';').next().unwrap_or_default().to_string();
    let pinned = server_of(&mut c, "/pinned", &[("cookie", &cookie)])?;
    for i in 0..20 {
        let r = c.get(&format!("/pinned/{i}"), &[("cookie", &cookie)])?;
        assert_eq!(r.status, 200);
        assert!(r.header("set-cookie").is_none(), "no new cookie when sent");
        assert_eq!(server(&r.json()?), pinned, "request {i} moved");
    }
    Ok(())
}

/// LEAST_REQUEST over idle pods is two random choices: every pod gets requests.
fn least_request_reaches_every_pod(t: &mut Traffic) -> Result<()> {
    let mesh = &t.mesh;
    let mut c = connect(mesh, "spread")?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..60 {
        *counts
            .entry(server_of(&mut c, &format!("/spread/{i}"), &[])?)
            .or_default() += 1;
    }
    eprintln!("least request: {counts:?}");
    assert_eq!(
        counts.keys().map(String::as_str).collect::<Vec<_>>(),
        ["v1", "v2", "v3"],
        "{counts:?}"
    );
    Ok(())
}

/// v2 answers 503 (`?status=503&only=v2`); after 3 in a row it is ejected, and the next 30
/// requests all reach v1 or v3 and get 200. (Istio's default retry policy retries a 503 on
/// another endpoint, so clients may see 200 even before the ejection: the ejection is read
/// from the metric, and v2's own request count shows that nothing reaches it afterwards.)
fn outlier_detection_ejects_the_failing_pod(t: &mut Traffic) -> Result<()> {
    let mesh = &t.mesh;
    let mut c = connect(mesh, "outlier")?;
    let target = "/flaky?status=503&only=v2";
    let ejections = || -> Result<f64> {
        Ok(prom::sum(
            &mesh.waypoint_metrics(WAYPOINT)?,
            "waypoint_outlier_ejections_total",
            &[("cluster", "outbound|80||outlier.default.svc.cluster.local")],
        ))
    };
    let mut sent = 0;
    while ejections()? < 1.0 {
        anyhow::ensure!(sent < 30, "v2 not ejected after {sent} requests");
        let r = c.get(target, &[])?;
        sent += 1;
        if r.status == 503 {
            assert_eq!(server(&r.json()?), "v2", "only v2 fails");
        }
    }
    assert_eq!(ejections()?, 1.0);
    let v2_seen = || -> Result<f64> {
        let local: std::net::SocketAddr = "127.0.0.1:8080".parse()?;
        let r = mesh.http_get("default/v2", local, "/_requests")?;
        r.json()?["total"].as_f64().context("total")
    };
    let v2_before = v2_seen()?;
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..30 {
        let r = c.get(target, &[])?;
        assert_eq!(
            r.status,
            200,
            "request {i} after the ejection: {}",
            r.text()
        );
        *counts.entry(server(&r.json()?)).or_default() += 1;
    }
    eprintln!("outlier: after {sent} requests v2 was ejected; then {counts:?}");
    assert!(!counts.contains_key("v2"), "{counts:?}");
    assert_eq!(v2_seen()?, v2_before, "an ejected endpoint gets no request");
    assert_eq!(counts.len(), 2, "v1 and v3 share the load: {counts:?}");
    Ok(())
}

/// `http2MaxRequests: 1` and 6 concurrent requests that each take 500 ms: one at a time is
/// let through, the others are answered `503` with flag `UO`, and the waypoint's
/// `istio_requests_total{response_flags="UO"}` counts exactly those.
fn connection_pool_overflow_answers_503_uo(t: &mut Traffic) -> Result<()> {
    let mesh = &t.mesh;
    const CONCURRENT: usize = 6;
    let mut clients: Vec<Client> = (0..CONCURRENT)
        .map(|_| connect(mesh, "pool"))
        .collect::<Result<_>>()?;
    // One request on each connection first, so the tunnels are open before the race.
    for c in &mut clients {
        server_of(c, "/warm", &[])?;
    }
    let statuses: Vec<(u16, String)> = concurrently(&mut clients, "/slow?delay_ms=500")?
        .into_iter()
        .map(|(status, body, _)| (status, body))
        .collect();
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    let overflowed: Vec<&String> = statuses
        .iter()
        .filter(|(s, _)| *s == 503)
        .map(|(_, body)| body)
        .collect();
    eprintln!("pool: {ok} answered, {} overflowed", overflowed.len());
    assert_eq!(ok + overflowed.len(), CONCURRENT, "{statuses:?}");
    assert!(ok >= 1, "{statuses:?}");
    assert!(!overflowed.is_empty(), "{statuses:?}");
    for body in &overflowed {
        assert!(body.contains("overflow"), "{body}");
    }
    // The metric is written when the response ends: it matches once every response is in.
    let host = "pool.default.svc.cluster.local";
    wait_until(
        "istio_requests_total{response_flags=UO} to count the 503s",
        Duration::from_secs(5),
        || {
            let metrics = mesh.waypoint_metrics(WAYPOINT)?;
            let uo = prom::sum(
                &metrics,
                "istio_requests_total",
                &[
                    ("response_flags", "UO"),
                    ("response_code", "503"),
                    ("destination_service", host),
                ],
            );
            Ok(uo == overflowed.len() as f64)
        },
    )?;
    // Sequential requests fit in the limit.
    let c = &mut clients[0];
    for i in 0..5 {
        server_of(c, &format!("/after/{i}"), &[])?;
    }
    Ok(())
}

/// A DestinationRule the translator refuses leaves the last good rules in place.
fn a_bad_rule_keeps_the_last_good_rules(t: &mut Traffic) -> Result<()> {
    let mesh = &t.mesh;
    mesh.write_yaml(
        "rules-bad.yaml",
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {name: bad, namespace: default}\n\
         spec: {host: hash, trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}}\n",
    )?;
    wait_for_rejection(&t.wp, "rules-bad.yaml doc 1: DestinationRule default/bad")?;
    let mut c = connect(mesh, "hash")?;
    let first = server_of(&mut c, "/who", &[("x-user", "bob")])?;
    for _ in 0..10 {
        assert_eq!(server_of(&mut c, "/who", &[("x-user", "bob")])?, first);
    }
    Ok(())
}

/// `GET target` on every client at once: status, body and how long each took.
fn concurrently(clients: &mut [Client], target: &str) -> Result<Vec<(u16, String, Duration)>> {
    let start = Barrier::new(clients.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = clients
            .iter_mut()
            .map(|c| {
                let start = &start;
                s.spawn(move || -> Result<(u16, String, Duration)> {
                    start.wait();
                    let sent = Instant::now();
                    let r = c.get(target, &[])?;
                    Ok((r.status, r.text(), sent.elapsed()))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .map_err(|_| anyhow::anyhow!("client thread panicked"))?
            })
            .collect::<Result<Vec<_>>>()
    })
}

/// `tcp.maxConnections: 1` and `http1MaxPendingRequests: 1` to the one pod of `conns`, 4
/// concurrent requests of 400 ms: one goes out on the connection, one waits for it (and
/// so takes at least two delays), the others are answered `503 UO` at once.
fn one_connection_per_endpoint_with_one_waiting(t: &mut Traffic) -> Result<()> {
    let mesh = &t.mesh;
    const CONCURRENT: usize = 4;
    const DELAY: Duration = Duration::from_millis(400);
    let mut clients: Vec<Client> = (0..CONCURRENT)
        .map(|_| connect(mesh, "conns"))
        .collect::<Result<_>>()?;
    for c in &mut clients {
        assert_eq!(server_of(c, "/warm", &[])?, "v1");
    }
    let target = format!("/slow?delay_ms={}", DELAY.as_millis());
    let results = concurrently(&mut clients, &target)?;
    let ok: Vec<Duration> = results
        .iter()
        .filter(|(s, _, _)| *s == 200)
        .map(|(_, _, took)| *took)
        .collect();
    let overflowed: Vec<&(u16, String, Duration)> =
        results.iter().filter(|(s, _, _)| *s == 503).collect();
    eprintln!(
        "conns: answered after {ok:?}, {} overflowed",
        overflowed.len()
    );
    assert_eq!(ok.len() + overflowed.len(), CONCURRENT, "{results:?}");
    assert!(ok.len() >= 2, "one sent, one waiting: {results:?}");
    assert!(!overflowed.is_empty(), "{results:?}");
    for (_, body, took) in &overflowed {
        assert!(body.contains("overflow"), "{body}");
        assert!(
            *took < DELAY,
            "an overflow is answered at once, not after {took:?}"
        );
    }
    // One connection: the answered requests went out one after another, the n-th
    // answered after at least n delays.
    let mut ok = ok;
    ok.sort();
    for (i, took) in ok.iter().enumerate() {
        let least = DELAY * (i as u32 + 1) - Duration::from_millis(50);
        assert!(*took >= least, "answer {i} after {took:?}: {ok:?}");
    }
    Ok(())
}

/// `maxRequestsPerConnection: 2` (and one connection at a time, so each request waits for
/// the previous one's connection): 10 requests reach v1 over 5 upstream connections, each
/// a peer (source port) of its own at mesh-echo, each carrying exactly 2 requests.
fn connections_are_replaced_after_max_requests(t: &mut Traffic) -> Result<()> {
    let mesh = &t.mesh;
    let mut c = connect(mesh, "perconn")?;
    let mut peers: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..10 {
        let r = c.get(&format!("/conn/{i}"), &[])?;
        anyhow::ensure!(r.status == 200, "request {i}: {} {}", r.status, r.text());
        let reply = r.json()?;
        let peer = reply["peer"].as_str().context("peer")?.to_string();
        *peers.entry(peer).or_default() += 1;
    }
    eprintln!("perconn: {peers:?}");
    assert_eq!(peers.len(), 5, "{peers:?}");
    assert!(peers.values().all(|n| *n == 2), "{peers:?}");
    Ok(())
}

/// `tls-simple`: the client's plain HTTP request reaches the HTTPS pod outside the mesh
/// over TLS the waypoint originated (SNI the Service's host name, ALPN `http/1.1`, no
/// client certificate), from the waypoint's own address (plain TCP, not HBONE), on one
/// pooled connection.
fn simple_tls_originates_to_a_backend_outside_the_mesh(t: &mut Traffic) -> Result<()> {
    let mesh = &t.mesh;
    let mut c = connect(mesh, "tls-simple")?;
    let mut peers = BTreeSet::new();
    for i in 0..5 {
        let reply = c.echo(&format!("/tls/{i}"), &[])?;
        eprintln!("tls-simple: {reply}");
        assert_eq!(server(&reply), "tls");
        let tls = &reply["tls"];
        assert_eq!(
            tls["sni"], "tls-simple.default.svc.cluster.local",
            "{reply}"
        );
        assert_eq!(tls["alpn"], "http/1.1", "{reply}");
        assert_eq!(tls["client_names"], serde_json::json!([]), "{reply}");
        peers.insert(reply["peer"].as_str().context("peer")?.to_string());
    }
    assert_eq!(peers.len(), 1, "one pooled TLS connection: {peers:?}");
    let waypoint_ip = mesh.pod_ip(WAYPOINT)?.to_string();
    let peer = peers.first().context("a peer")?;
    assert!(
        peer.starts_with(&format!("{waypoint_ip}:")),
        "{peer} is not the waypoint ({waypoint_ip})"
    );
    Ok(())
}

/// `tls-mutual`: the backend requires a client certificate of its CA and sees the
/// waypoint's (`clientCertificate`).
fn mutual_tls_presents_the_waypoints_client_certificate(t: &mut Traffic) -> Result<()> {
    let mut c = connect(&t.mesh, "tls-mutual")?;
    let reply = c.echo("/mutual", &[])?;
    assert_eq!(server(&reply), "mtls");
    assert_eq!(
        reply["tls"]["client_names"],
        serde_json::json!(["waypoint.client.test"]),
        "{reply}"
    );
    Ok(())
}

/// `tls-nocert` (`SIMPLE` to the backend that requires a client certificate): the backend
/// refuses the TLS, the client gets `503` and the waypoint counts it with flag `UF`.
fn a_backend_refusing_the_tls_answers_503_uf(t: &mut Traffic) -> Result<()> {
    let mesh = &t.mesh;
    let mut c = connect(mesh, "tls-nocert")?;
    let r = c.get("/nocert", &[])?;
    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.text().contains("upstream connect error"), "{}", r.text());
    // The access log line of the request says why.
    t.wp.wait_for_stderr(
        "the access log of /nocert with its tls reason",
        Duration::from_secs(5),
        |log| {
            log.lines()
                .any(|l| l.contains("/nocert") && l.contains("UF") && l.contains("tls origination"))
        },
    )?;
    wait_until(
        "istio_requests_total{response_flags=UF} for tls-nocert",
        Duration::from_secs(5),
        || {
            let uf = prom::sum(
                &mesh.waypoint_metrics(WAYPOINT)?,
                "istio_requests_total",
                &[
                    ("response_flags", "UF"),
                    (
                        "destination_service",
                        "tls-nocert.default.svc.cluster.local",
                    ),
                ],
            );
            Ok(uf >= 1.0)
        },
    )
}

/// `subsets`: a rule with `tls: {mode: ISTIO_MUTUAL}` is applied, subsets included: every
/// request reaches subset `v3` (over HBONE, as without the mode).
fn an_istio_mutual_rule_routes_by_subset(t: &mut Traffic) -> Result<()> {
    let mut c = connect(&t.mesh, "subsets")?;
    for i in 0..10 {
        assert_eq!(server_of(&mut c, &format!("/subset/{i}"), &[])?, "v3");
    }
    Ok(())
}
