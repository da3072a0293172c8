//! Istio `VirtualService` at the waypoint, end to end: a client pod on n1 calls Service
//! `echo` (labelled `istio.io/use-waypoint`); the waypoint on n2 routes each request by the
//! VirtualService for `echo` (header, uri prefix, weighted split, rewrite, redirect, direct
//! response) to Service `echo-v1` (one pod, on n2) or `echo-v2` (one pod, on n1), retries
//! failed attempts (Istio's default policy, `attempts: 0`, `perTryTimeout`), injects faults
//! (abort and delay by percentage) and mirrors requests to `echo-mirror`, whose
//! `GET /_requests` counts what it received by `Host`. Service `web` has an HTTPRoute with a
//! `RequestMirror` filter to the same mirror.
//!
//! Requests go over one keep-alive HTTP/1.1 connection from the client pod (as in
//! `waypoint_routing.rs`); every wait is bounded (`wait_until`).

use std::collections::BTreeMap;
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use e2e::http::{read_response, HttpResponse};
use e2e::prom;
use e2e::waypoint::{gateway_yaml, waypoint_pod};
use e2e::{wait_until, Ambient, ChildGuard, Mesh, Pod, Service};
use serde_json::Value;

const CLIENT: &str = "default/client";
const WAYPOINT: &str = "default/waypoint";
const ECHO_VIP: &str = "10.96.0.30";
const MIRROR_VIP: &str = "10.96.0.33";
const WEB_VIP: &str = "10.96.0.34";
const V1_HOST: &str = "echo-v1.default.svc.cluster.local";
/// Weighted split: requests and the share echo-v1 must get (±5 points).
const SPLIT_REQUESTS: usize = 2000;
const V1_SHARE: f64 = 0.80;
const SHARE_TOLERANCE: f64 = 0.05;
/// Fault abort at 50 %: requests and tolerance (points).
const ABORT_REQUESTS: usize = 1000;
const ABORT_TOLERANCE: f64 = 0.05;
/// Fault delay of 100 ms on 50 %: requests, tolerance (±12 points: over 3 standard
/// deviations at 200 requests).
const DELAY_REQUESTS: usize = 200;
const DELAY: Duration = Duration::from_millis(100);
const DELAY_TOLERANCE: f64 = 0.12;
const MIRRORED_REQUESTS: usize = 50;
const ROUTE_MIRRORED_REQUESTS: usize = 10;

/// HTTPRoute `RequestMirror` for Service `web`.
const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules:
  - filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: echo-mirror, port: 80}, percent: 100}}
    backendRefs: [{name: echo-v2, port: 80}]
"#;

const VIRTUAL_SERVICE: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo]
  http:
  - name: header-v2
    match: [{headers: {x-version: {exact: v2}}}]
    route: [{destination: {host: echo-v2}}]
  - name: prefix-v1
    match: [{uri: {prefix: /v1}}]
    route: [{destination: {host: echo-v1, port: {number: 80}}}]
  - name: split
    match: [{uri: {prefix: /split}}]
    route:
    - {destination: {host: echo-v1}, weight: 80}
    - {destination: {host: echo-v2.default.svc.cluster.local}, weight: 20}
  - name: retry-default
    match: [{uri: {prefix: /retry-default}}]
    route: [{destination: {host: echo-v1}}]
  - name: no-retry
    match: [{uri: {prefix: /no-retry}}]
    retries: {attempts: 0}
    route: [{destination: {host: echo-v1}}]
  - name: per-try
    match: [{uri: {prefix: /per-try}}]
    retries: {attempts: 2, perTryTimeout: 300ms, retryOn: 5xx}
    route: [{destination: {host: echo-v1}}]
  - name: abort
    match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 50}}}
    route: [{destination: {host: echo-v1}}]
  - name: delay
    match: [{uri: {prefix: /delay}}]
    fault: {delay: {fixedDelay: 100ms, percentage: {value: 50}}}
    route: [{destination: {host: echo-v1}}]
  - name: mirror
    match: [{uri: {prefix: /mirror}}]
    route: [{destination: {host: echo-v1}}]
    mirror: {host: echo-mirror}
    mirrorPercentage: {value: 100}
  - name: moved
    match: [{uri: {exact: /moved}}]
    redirect: {uri: /here, authority: new.example.com}
  - name: rewrite
    match: [{uri: {prefix: /old-api}}]
    rewrite: {uri: /api/v2}
    route: [{destination: {host: echo-v2}}]
  - name: teapot
    match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: short and stout}}
"#;

fn mesh(test: &str) -> Result<Mesh> {
    Mesh::builder(test)
        .node("n1")
        .node("n2")
        .namespace("default", Ambient::Yes)
        .pod(
            Pod::new("default", "client")
                .on("n1")
                .service_account("client"),
        )
        .pod(waypoint_pod("default", "waypoint", "n2"))
        .pod(
            Pod::new("default", "echo-v1")
                .on("n2")
                .service_account("echo")
                .labels([("app", "echo"), ("version", "v1")]),
        )
        .pod(
            Pod::new("default", "echo-v2")
                .on("n1")
                .service_account("echo")
                .labels([("app", "echo"), ("version", "v2")]),
        )
        .pod(
            Pod::new("default", "echo-mirror")
                .on("n1")
                .service_account("mirror")
                .labels([("app", "mirror")]),
        )
        .service(
            Service::new("default", "echo")
                .vip(ECHO_VIP)
                .named_port("http", 80, 8080)
                .selector([("app", "echo")])
                .labels([("istio.io/use-waypoint", "waypoint")]),
        )
        .service(
            Service::new("default", "echo-v1")
                .vip("10.96.0.31")
                .named_port("http", 80, 8080)
                .selector([("version", "v1")]),
        )
        .service(
            Service::new("default", "echo-v2")
                .vip("10.96.0.32")
                .named_port("http", 80, 8080)
                .selector([("version", "v2")]),
        )
        .service(
            Service::new("default", "echo-mirror")
                .vip(MIRROR_VIP)
                .named_port("http", 80, 8080)
                .selector([("app", "mirror")]),
        )
        .yaml(
            "waypoint.yaml",
            &gateway_yaml("default", "waypoint", "service"),
        )
        .service(
            Service::new("default", "web")
                .vip(WEB_VIP)
                .named_port("http", 80, 8080)
                .selector([("version", "v2")])
                .labels([("istio.io/use-waypoint", "waypoint")]),
        )
        .yaml("virtual-service.yaml", VIRTUAL_SERVICE)
        .yaml("route.yaml", ROUTE)
        .build()
}

/// One keep-alive HTTP/1.1 connection from a pod.
struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    /// The `host` header sent.
    host: &'static str,
    /// Requests sent on this connection.
    sent: usize,
}

impl Client {
    fn connect(mesh: &Mesh, pod: &str, addr: SocketAddr, host: &'static str) -> Result<Client> {
        let stream = mesh.connect(pod, addr)?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Client {
            stream,
            reader,
            host,
            sent: 0,
        })
    }

    fn get(&mut self, target: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
        let mut head = format!(
            "GET {target} HTTP/1.1\r\nhost: {}\r\nuser-agent: e2e\r\n",
            self.host
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        self.stream
            .write_all(head.as_bytes())
            .with_context(|| format!("send GET {target}"))?;
        self.sent += 1;
        read_response(&mut self.reader).with_context(|| format!("response to GET {target}"))
    }

    /// `POST target` with `len` body bytes; mesh-echo's 200 JSON reply.
    fn post(&mut self, target: &str, len: usize) -> Result<Value> {
        let head = format!(
            "POST {target} HTTP/1.1\r\nhost: {}\r\ncontent-length: {len}\r\n\r\n",
            self.host
        );
        self.stream
            .write_all(head.as_bytes())
            .with_context(|| format!("send POST {target}"))?;
        self.stream.write_all(&vec![b'x'; len])?;
        self.sent += 1;
        let r = read_response(&mut self.reader)
            .with_context(|| format!("response to POST {target}"))?;
        anyhow::ensure!(r.status == 200, "POST {target}: {} {}", r.status, r.text());
        r.json()
    }

    fn echo(&mut self, target: &str, headers: &[(&str, &str)]) -> Result<Value> {
        let r = self.get(target, headers)?;
        anyhow::ensure!(r.status == 200, "GET {target}: {} {}", r.status, r.text());
        r.json()
    }
}

fn server(reply: &Value) -> String {
    reply["server"].as_str().unwrap_or_default().to_string()
}

#[test]
fn virtual_services_route_retry_inject_faults_and_mirror_at_the_waypoint() -> Result<()> {
    let mesh = mesh("waypoint_resilience")?;
    let _v1 = mesh.spawn_echo("default/echo-v1", 8080, "echo-v1")?;
    let _v2 = mesh.spawn_echo("default/echo-v2", 8080, "echo-v2")?;
    let _mirror = mesh.spawn_echo("default/echo-mirror", 8080, "echo-mirror")?;
    let wp = mesh.spawn_waypoint(WAYPOINT, "default", "waypoint", "waypoint")?;
    with_log(&wp, checks(&mesh, &wp))
}

/// `result`, with the end of the waypoint's log added to an error.
fn with_log(wp: &ChildGuard, result: Result<()>) -> Result<()> {
    result.map_err(|e| {
        let log = wp.stderr();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        e.context(format!("last lines of the waypoint's log:\n{tail}"))
    })
}

fn checks(mesh: &Mesh, wp: &ChildGuard) -> Result<()> {
    let vip: SocketAddr = format!("{ECHO_VIP}:80").parse()?;
    let mut c = Client::connect(mesh, CLIENT, vip, "echo")?;

    // Routing: the first matching http[] entry wins, in order (the header entry is listed
    // before the prefix one); a uri prefix is a plain string prefix.
    let reply = c.echo("/v1/x", &[("x-version", "v2")])?;
    assert_eq!(server(&reply), "echo-v2", "{reply}");
    for target in ["/v1/x", "/v1x"] {
        let reply = c.echo(target, &[])?;
        assert_eq!(server(&reply), "echo-v1", "{target}: {reply}");
    }
    let r = c.get("/nothing-matches", &[])?;
    assert_eq!(r.status, 404, "{}", r.text());

    // Weighted 80/20, chosen per request on one connection.
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..SPLIT_REQUESTS {
        let reply = c.echo(&format!("/split/{i}"), &[])?;
        *counts.entry(server(&reply)).or_default() += 1;
    }
    let v1 = counts.get("echo-v1").copied().unwrap_or_default();
    assert_eq!(
        v1 + counts.get("echo-v2").copied().unwrap_or_default(),
        SPLIT_REQUESTS
    );
    let share = v1 as f64 / SPLIT_REQUESTS as f64;
    assert!(
        (share - V1_SHARE).abs() <= SHARE_TOLERANCE,
        "echo-v1 got {share:.3}, want {V1_SHARE} ± {SHARE_TOLERANCE}: {counts:?}"
    );

    // Retries: Istio's default policy turns one 503 of the single endpoint into a 200;
    // with `attempts: 0` the 503 reaches the client; when every attempt fails the last 503
    // is passed on, flagged URX (1 attempt + 2 retries).
    let reply = c.echo("/retry-default?fail_first=1&key=default-1", &[])?;
    assert_eq!(server(&reply), "echo-v1");
    let r = c.get("/no-retry?fail_first=1&key=none-1", &[])?;
    assert_eq!(r.status, 503, "{}", r.text());
    let r = c.get("/retry-default?fail_first=3&key=default-3", &[])?;
    assert_eq!(r.status, 503, "{}", r.text());
    let r = c.get("/retry-default?fail_first=3&key=default-3", &[])?;
    assert_eq!(r.status, 200, "the fourth request with the key passes");

    // A small body is buffered and sent again by the retry; a large one (over 64 KiB) is
    // streamed, so a 503 after it was sent is not retried.
    let reply = c.post("/retry-default?fail_first=1&key=post-small", 1000)?;
    assert_eq!(reply["body_bytes"], 1000, "{reply}");
    let reply = c.post("/retry-default?key=post-large-ok", 200 * 1024)?;
    assert_eq!(reply["body_bytes"], 200 * 1024, "{reply}");
    let r = c.post("/retry-default?fail_first=1&key=post-large", 200 * 1024);
    let err = r.expect_err("the streamed body's 503 reaches the client");
    assert!(format!("{err:#}").contains("503"), "{err:#}");

    // perTryTimeout: the first attempt would answer after 2 s; the waypoint gives up on it
    // at 300 ms and the second attempt answers at once.
    let before = Instant::now();
    let reply = c.echo(
        "/per-try?fail_first=1&key=slow-1&delay_ms=2000&status=200",
        &[],
    )?;
    let waited = before.elapsed();
    assert_eq!(server(&reply), "echo-v1");
    assert!(
        waited >= Duration::from_millis(280) && waited < Duration::from_millis(1500),
        "answered after {waited:?}"
    );
    wait_until(
        "the access log to show 2 attempts for the per-try request",
        Duration::from_secs(10),
        || {
            Ok(wp
                .stderr()
                .lines()
                .any(|l| l.contains("slow-1") && l.contains("attempts=2")))
        },
    )?;

    // Fault abort on 50 %: answered by the waypoint with Envoy's body.
    let mut aborted = 0;
    for i in 0..ABORT_REQUESTS {
        let r = c.get(&format!("/abort/{i}"), &[])?;
        match r.status {
            503 => {
                assert_eq!(r.text(), "fault filter abort");
                aborted += 1;
            }
            200 => {}
            other => anyhow::bail!("abort: unexpected {other} {}", r.text()),
        }
    }
    let share = aborted as f64 / ABORT_REQUESTS as f64;
    assert!(
        (share - 0.5).abs() <= ABORT_TOLERANCE,
        "aborted {aborted} of {ABORT_REQUESTS}"
    );

    // Fault delay on 50 %: count requests slower than the delay.
    let mut slow = 0;
    for i in 0..DELAY_REQUESTS {
        let before = Instant::now();
        c.echo(&format!("/delay/{i}"), &[])?;
        if before.elapsed() >= DELAY {
            slow += 1;
        }
    }
    let share = slow as f64 / DELAY_REQUESTS as f64;
    assert!(
        (share - 0.5).abs() <= DELAY_TOLERANCE,
        "slower than the delay: {slow} of {DELAY_REQUESTS}"
    );

    // A streamed (large) body is not mirrored: skipped and counted.
    let reply = c.post("/mirror/large", 100 * 1024)?;
    assert_eq!(server(&reply), "echo-v1", "{reply}");

    // Mirroring: the client sees only the primary; the mirror gets a copy of each request
    // with `-shadow` appended to the host.
    for i in 0..MIRRORED_REQUESTS {
        let reply = c.echo(&format!("/mirror/{i}"), &[])?;
        assert_eq!(server(&reply), "echo-v1", "{reply}");
    }
    // The HTTPRoute RequestMirror filter does the same for Service `web`.
    let web_vip: SocketAddr = format!("{WEB_VIP}:80").parse()?;
    let mut w = Client::connect(mesh, CLIENT, web_vip, "web")?;
    for i in 0..ROUTE_MIRRORED_REQUESTS {
        let reply = w.echo(&format!("/web/{i}"), &[])?;
        assert_eq!(server(&reply), "echo-v2", "{reply}");
    }
    let mirror_vip: SocketAddr = format!("{MIRROR_VIP}:80").parse()?;
    let mut m = Client::connect(mesh, CLIENT, mirror_vip, "echo-mirror")?;
    let mut last = Value::Null;
    let counted = wait_until(
        "the mirror to count every mirrored request",
        Duration::from_secs(15),
        || {
            last = m.echo("/_requests", &[])?;
            Ok(
                last["hosts"]["echo-shadow"].as_u64() == Some(MIRRORED_REQUESTS as u64)
                    && last["hosts"]["web-shadow"].as_u64() == Some(ROUTE_MIRRORED_REQUESTS as u64),
            )
        },
    );
    counted.with_context(|| format!("mirror saw {last}"))?;
    assert_eq!(
        last["total"],
        MIRRORED_REQUESTS + ROUTE_MIRRORED_REQUESTS,
        "only shadow copies: {last}"
    );

    // Redirect, rewrite and direct response, once each.
    let r = c.get("/moved?from=test", &[])?;
    assert_eq!(r.status, 301, "{}", r.text());
    assert_eq!(
        r.header("location"),
        Some("http://new.example.com/here?from=test")
    );
    let reply = c.echo("/old-api/users?page=2", &[])?;
    assert_eq!(server(&reply), "echo-v2");
    assert_eq!(reply["path"], "/api/v2/users?page=2", "{reply}");
    let r = c.get("/teapot", &[])?;
    assert_eq!((r.status, r.text().as_str()), (418, "short and stout"));

    // Metrics: one istio_requests_total per client request (mirrors and retries are not
    // requests); flags for the faults, retries and their reasons.
    let sent = (c.sent + w.sent) as f64;
    let expected_aborts = aborted as f64;
    wait_until(
        "istio_requests_total to count every request, and every mirror copy its answer",
        Duration::from_secs(10),
        || {
            let metrics = mesh.waypoint_metrics(WAYPOINT)?;
            let mirrored = prom::sum(
                &metrics,
                "waypoint_mirror_requests_total",
                &[("result", "sent")],
            );
            Ok(prom::sum(&metrics, "istio_requests_total", &[]) == sent
                && mirrored == (MIRRORED_REQUESTS + ROUTE_MIRRORED_REQUESTS) as f64)
        },
    )?;
    let metrics = mesh.waypoint_metrics(WAYPOINT)?;
    let requests = |labels: &[(&str, &str)]| prom::sum(&metrics, "istio_requests_total", labels);
    assert_eq!(
        requests(&[("response_code", "503"), ("response_flags", "FI")]),
        expected_aborts,
        "{metrics}"
    );
    // Every delayed request is slow (a busy machine may make a few others slow too).
    let delayed = requests(&[("response_flags", "DI")]);
    assert!(
        delayed <= slow as f64 && (delayed / DELAY_REQUESTS as f64 - 0.5).abs() <= DELAY_TOLERANCE,
        "DI on {delayed}, {slow} slow, of {DELAY_REQUESTS}"
    );
    assert_eq!(
        requests(&[("response_code", "503"), ("response_flags", "URX")]),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        requests(&[
            ("response_code", "503"),
            ("response_flags", "-"),
            ("destination_service", V1_HOST)
        ]),
        2.0,
        "the attempts: 0 request and the streamed POST: {metrics}"
    );
    let retries = |reason: &str| {
        prom::sum(
            &metrics,
            "waypoint_upstream_retries_total",
            &[("reason", reason)],
        )
    };
    // 1 (default policy, one 503) + 2 (three 503s) + 1 (small POST) retried responses;
    // one per-try timeout.
    assert_eq!(retries("response"), 4.0, "{metrics}");
    assert_eq!(retries("per-try-timeout"), 1.0, "{metrics}");
    assert_eq!(
        prom::sum(
            &metrics,
            "waypoint_mirror_requests_total",
            &[("result", "skipped_body")]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        prom::sum(
            &metrics,
            "waypoint_mirror_requests_total",
            &[("result", "sent")]
        ),
        (MIRRORED_REQUESTS + ROUTE_MIRRORED_REQUESTS) as f64,
        "{metrics}"
    );

    // A VirtualService the translator refuses leaves the last good config in place.
    mesh.write_yaml(
        "vs-bad.yaml",
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
         metadata: {name: bad, namespace: default}\n\
         spec: {hosts: [echo], http: [{route: [{destination: {host: echo-v2}}], retries: {retryOn: sometimes}}]}\n",
    )?;
    wait_until(
        "the waypoint to reject the bad VirtualService",
        Duration::from_secs(10),
        || {
            let log = wp.stderr();
            Ok(log.contains("config rejected")
                && log.contains("vs-bad.yaml doc 1: VirtualService default/bad"))
        },
    )?;
    let reply = c.echo("/v1/still", &[])?;
    assert_eq!(server(&reply), "echo-v1", "{reply}");
    Ok(())
}
