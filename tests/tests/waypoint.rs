//! Waypoints end to end: a client pod on n1 calls a Service labelled
//! `istio.io/use-waypoint`; its ztunnel sends the connection to the waypoint (a real
//! `waypoint` process in its own pod namespace on n2), which authorizes each request at L7
//! and forwards it over HBONE, under its own identity, to the server pods (one per node).

use std::net::Ipv4Addr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use e2e::prom;
use e2e::waypoint::{
    access_log_telemetry, gateway_yaml, http_service, log_tail, waypoint_mesh, waypoint_pod,
    waypoint_service, with_log, CLIENT, USE_WAYPOINT_LABEL, WAYPOINT,
};
use e2e::{scenarios, tests, Ambient, ChildGuard, Mesh, Pod, Service, Suite};
use serde_json::Value;

/// Through the waypoint.
const ECHO_VIP: &str = "10.96.0.10";
/// Same pods, through the waypoint, ports that are not declared HTTP.
const TCP_VIP: &str = "10.96.0.12";
/// Same pods, no waypoint.
const DIRECT_VIP: &str = "10.96.0.11";
/// Service `orphan`: its `istio.io/use-waypoint` names a Gateway the mesh does not have.
const ORPHAN_VIP: &str = "10.96.0.13";
const WAYPOINT_SA: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
const CLIENT_SA: &str = "spiffe://cluster.local/ns/default/sa/client";
/// How long the waypoint may take to apply a changed config file (it polls the directory).
const RELOAD: Duration = Duration::from_secs(10);

/// An L7 DENY on the waypoint for `/admin*` (attached to the Service), and at the servers an
/// L4 ALLOW for the identities that may reach them: the waypoint's, and the client's for the
/// Service that has no waypoint.
const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: servers, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: [cluster.local/ns/default/sa/waypoint, cluster.local/ns/default/sa/client]}
"#;

fn mesh(test: &str) -> Result<Mesh> {
    waypoint_mesh(test)
        .pod(Pod::echo_server("server-1", "n2"))
        .pod(Pod::echo_server("server-2", "n1"))
        .service(waypoint_service("echo", ECHO_VIP, ("app", "echo")))
        .service(
            // Not covered by the `/admin` DENY: at L4 its path rule would deny everything
            // (an L7 rule fails closed where only bytes are seen).
            Service::new("default", "echo-tcp")
                .vip(TCP_VIP)
                .named_port("tcp-echo", 9000, 8080)
                .named_port("web", 9100, 8080)
                .selector([("app", "echo")])
                .labels([(USE_WAYPOINT_LABEL, "waypoint")]),
        )
        .service(http_service("direct", DIRECT_VIP, ("app", "echo")))
        .service(
            http_service("orphan", ORPHAN_VIP, ("app", "echo"))
                .labels([(USE_WAYPOINT_LABEL, "no-such-waypoint")]),
        )
        .yaml("policies.yaml", POLICIES)
        .build()
}

/// One curl from the client pod: (status, HTTP version, body) of each URL, in order (several
/// URLs share one connection).
fn curl(mesh: &Mesh, extra: &[&str], urls: &[String]) -> Result<Vec<(u16, String, String)>> {
    const MARK: &str = "\n--curl-end--";
    let fmt = format!("{MARK} %{{http_code}} %{{http_version}}\n");
    let mut argv = vec!["curl", "-sS", "-m", "10", "-w", &fmt];
    argv.extend_from_slice(extra);
    argv.extend(urls.iter().map(String::as_str));
    let out = mesh.exec_ok(CLIENT, &argv)?;
    let mut results = Vec::new();
    let mut rest = out.as_str();
    while let Some(at) = rest.find(MARK) {
        let body = rest[..at].to_string();
        let after = &rest[at + MARK.len()..];
        let line_end = after.find('\n').unwrap_or(after.len());
        let mut fields = after[..line_end].split_whitespace();
        let status = fields.next().context("status")?.parse()?;
        let version = fields.next().context("version")?.to_string();
        results.push((status, version, body));
        rest = after.get(line_end + 1..).unwrap_or_default();
    }
    if results.len() != urls.len() {
        bail!(
            "curl printed {} results for {} urls: {out:?}",
            results.len(),
            urls.len()
        );
    }
    Ok(results)
}

fn json(body: &str) -> Result<Value> {
    serde_json::from_str(body).with_context(|| format!("echo reply is not json: {body:?}"))
}

/// The IP the echo server saw the request come from.
fn peer_ip(reply: &Value) -> Result<Ipv4Addr> {
    let peer = reply["peer"].as_str().context("peer")?;
    let ip = peer.rsplit_once(':').context("peer ip:port")?.0;
    Ok(ip.parse()?)
}

fn url(vip: &str, path: &str) -> String {
    format!("http://{vip}{path}")
}

/// What the L7 scenarios share: the mesh and the addresses the servers see callers by.
struct L7 {
    waypoint_ip: Ipv4Addr,
    client_ip: Ipv4Addr,
    wp: ChildGuard,
    _servers: [ChildGuard; 2],
    /// Last: dropped once the processes in it are gone.
    mesh: Mesh,
}

impl L7 {
    fn build() -> Result<Self> {
        let mesh = mesh("waypoint_l7")?;
        let s1 = mesh.spawn_echo("default/server-1", 8080, "server-1")?;
        let s2 = mesh.spawn_echo("default/server-2", 8080, "server-2")?;
        let wp = mesh.spawn_default_waypoint()?;
        Ok(L7 {
            waypoint_ip: mesh.pod_ip(WAYPOINT)?,
            client_ip: mesh.pod_ip(CLIENT)?,
            wp,
            _servers: [s1, s2],
            mesh,
        })
    }
}

impl Suite for L7 {
    fn explain(&self, err: anyhow::Error) -> anyhow::Error {
        log_tail(&self.wp, err)
    }
}

/// One mesh for the L7 scenarios (requests to a Service with a waypoint are authorized per
/// request and balanced); they run in order, and the metrics scenarios count the requests of
/// the scenarios before them. The other tests build meshes of their own, and run first.
fn main() -> ExitCode {
    e2e::scenario::main(
        L7::build,
        &scenarios![
            the_server_is_called_by_the_waypoint_which_adds_a_request_id,
            an_l7_policy_denies_one_path_and_allows_another_on_one_connection,
            requests_on_one_connection_are_balanced_over_both_servers,
            http2_from_the_client_is_served_and_authorized,
            the_waypoint_counts_every_request_with_both_identities,
            the_agents_see_the_waypoint_between_client_and_server,
            a_service_without_a_waypoint_is_reached_directly,
            tcp_ports_are_relayed_and_undeclared_ports_detected,
            a_service_naming_an_unknown_waypoint_fails_closed,
            access_log_lines_follow_the_telemetry_api,
            a_service_without_a_selector_is_served_from_its_endpoint_slices,
            a_service_entry_that_uses_the_waypoint_is_served_through_it,
            egress_by_name_through_the_waypoint_originates_tls,
        ],
        &tests![
            plain_tcp_to_the_waypoint_hbone_port_is_refused,
            websocket_and_other_upgrades_pass_through_the_waypoint,
            deny_all_with_allow_by_principal_across_namespaces_through_the_waypoint,
        ],
    )
}

/// Through the waypoint: the server sees the waypoint as its caller; the waypoint added a
/// request id and passed the client's traceparent on.
fn the_server_is_called_by_the_waypoint_which_adds_a_request_id(l: &mut L7) -> Result<()> {
    let mesh = &l.mesh;
    let waypoint_ip = l.waypoint_ip;
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let tp_header = format!("traceparent: {traceparent}");
    let replies = curl(mesh, &["-H", &tp_header], &[url(ECHO_VIP, "/hello")])?;
    let (status, _, body) = &replies[0];
    assert_eq!(*status, 200, "{body}");
    let reply = json(body)?;
    assert_eq!(
        peer_ip(&reply)?,
        waypoint_ip,
        "the server is called by the waypoint: {reply}"
    );
    assert_eq!(reply["path"], "/hello");
    assert_eq!(reply["headers"]["traceparent"], traceparent, "{reply}");
    let request_id = reply["headers"]["x-request-id"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(request_id.len(), 36, "a generated x-request-id: {reply}");
    Ok(())
}

/// L7 policy: one path denied, others allowed, on the same connection.
fn an_l7_policy_denies_one_path_and_allows_another_on_one_connection(l: &mut L7) -> Result<()> {
    let mesh = &l.mesh;
    let replies = curl(
        mesh,
        &[],
        &[url(ECHO_VIP, "/admin/users"), url(ECHO_VIP, "/public")],
    )?;
    assert_eq!(replies[0].0, 403, "{:?}", replies[0]);
    assert_eq!(replies[0].2, "RBAC: access denied");
    assert_eq!(replies[1].0, 200, "{:?}", replies[1]);
    Ok(())
}

/// Balanced per request: six requests on one client connection reach both servers.
fn requests_on_one_connection_are_balanced_over_both_servers(l: &mut L7) -> Result<()> {
    let mesh = &l.mesh;
    let urls: Vec<String> = (0..6).map(|i| url(ECHO_VIP, &format!("/rr/{i}"))).collect();
    let mut servers = std::collections::BTreeSet::new();
    for (status, _, body) in curl(mesh, &[], &urls)? {
        assert_eq!(status, 200, "{body}");
        servers.insert(
            json(&body)?["server"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        );
    }
    assert_eq!(
        servers.into_iter().collect::<Vec<_>>(),
        ["server-1", "server-2"],
        "round robin per request over one connection"
    );
    Ok(())
}

/// HTTP/2 from the client (prior knowledge); HTTP/1.1 to the `http` port's backends.
/// (One URL per curl: curl 7.88 fails to reuse a prior-knowledge HTTP/2 connection.)
fn http2_from_the_client_is_served_and_authorized(l: &mut L7) -> Result<()> {
    let mesh = &l.mesh;
    let waypoint_ip = l.waypoint_ip;
    let h2 = ["--http2-prior-knowledge"];
    let ok = curl(mesh, &h2, &[url(ECHO_VIP, "/h2")])?.remove(0);
    assert_eq!((ok.0, ok.1.as_str()), (200, "2"), "{ok:?}");
    assert_eq!(peer_ip(&json(&ok.2)?)?, waypoint_ip);
    let denied = curl(mesh, &h2, &[url(ECHO_VIP, "/admin")])?.remove(0);
    assert_eq!(
        (denied.0, denied.1.as_str(), denied.2.as_str()),
        (403, "2", "RBAC: access denied")
    );
    Ok(())
}

/// The waypoint counted every request: 1 + 2 + 6 + 2 = 11, three of them denied.
fn the_waypoint_counts_every_request_with_both_identities(l: &mut L7) -> Result<()> {
    let mesh = &l.mesh;
    let metrics = mesh.waypoint_metrics(WAYPOINT)?;
    let requests = |code: &str| {
        prom::sum(
            &metrics,
            "istio_requests_total",
            &[
                ("reporter", "waypoint"),
                ("response_code", code),
                ("source_principal", CLIENT_SA),
                ("destination_service", "echo.default.svc.cluster.local"),
            ],
        )
    };
    assert_eq!(requests("200"), 9.0, "{metrics}");
    assert_eq!(requests("403"), 2.0, "{metrics}");
    assert_eq!(
        prom::sum(
            &metrics,
            "istio_request_duration_milliseconds_count",
            &[("reporter", "waypoint")]
        ),
        11.0
    );
    assert_eq!(
        prom::sum(
            &metrics,
            "istio_requests_total",
            &[
                ("response_code", "200"),
                ("destination_workload", "echo"),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/default/sa/server"
                ),
                ("request_protocol", "http"),
                ("connection_security_policy", "mutual_tls"),
            ]
        ),
        9.0,
        "{metrics}"
    );
    Ok(())
}

/// The destination ztunnel saw the waypoint's identity (L4 policy allowed it as such).
fn the_agents_see_the_waypoint_between_client_and_server(l: &mut L7) -> Result<()> {
    let mesh = &l.mesh;
    let n2 = mesh.metrics("n2")?;
    let from_waypoint = prom::sum(
        &n2,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("source_principal", WAYPOINT_SA),
        ],
    );
    assert!(from_waypoint >= 1.0, "{n2}");
    let client_to_waypoint = prom::sum(
        &mesh.metrics("n1")?,
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("destination_principal", WAYPOINT_SA),
        ],
    );
    assert!(
        client_to_waypoint >= 1.0,
        "the client's ztunnel steered to the waypoint"
    );
    Ok(())
}

/// A Service without a waypoint is unchanged: straight from the client, /admin allowed,
/// and the waypoint sees none of it.
fn a_service_without_a_waypoint_is_reached_directly(l: &mut L7) -> Result<()> {
    let mesh = &l.mesh;
    let client_ip = l.client_ip;
    let replies = curl(mesh, &[], &[url(DIRECT_VIP, "/admin")])?;
    assert_eq!(replies[0].0, 200, "{:?}", replies[0]);
    assert_eq!(peer_ip(&json(&replies[0].2)?)?, client_ip);
    let after = mesh.waypoint_metrics(WAYPOINT)?;
    assert_eq!(
        prom::sum(&after, "istio_requests_total", &[("reporter", "waypoint")]),
        11.0
    );
    Ok(())
}

/// A Service without a selector, through the waypoint: its EndpointSlice's pod is reached
/// over HBONE and its address outside the mesh (the n2 node) in plain TCP, both balanced.
fn a_service_without_a_selector_is_served_from_its_endpoint_slices(l: &mut L7) -> Result<()> {
    const EXT_VIP: &str = "10.96.0.14";
    let mesh = &l.mesh;
    let echo = mesh.binaries().mesh_echo()?;
    let echo = echo.to_string_lossy();
    let mut node = mesh.spawn_node("n2", &[&echo, "--port", "8080", "--name", "node-2"])?;
    node.wait_for_stdout("listening on", Duration::from_secs(10))?;
    let server = mesh.pod_ip("default/server-1")?;
    let node_ip = mesh.node_ip("n2")?;
    let yaml = format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: ext, namespace: default, labels: {{{USE_WAYPOINT_LABEL}: waypoint}}}}
spec: {{clusterIP: {EXT_VIP}, ports: [{{name: http, port: 80}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: ext-1, namespace: default, labels: {{kubernetes.io/service-name: ext}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
- addresses: [{server}]
  targetRef: {{kind: Pod, namespace: default, name: server-1}}
- addresses: [{node_ip}]
"#
    );
    mesh.write_yaml("ext.yaml", &yaml)?;
    let mut seen = std::collections::BTreeMap::new();
    let deadline = std::time::Instant::now() + RELOAD;
    while seen.len() < 2 && std::time::Instant::now() < deadline {
        let urls: Vec<String> = (0..4).map(|i| url(EXT_VIP, &format!("/ext-{i}"))).collect();
        for (status, _, body) in curl(mesh, &[], &urls).unwrap_or_default() {
            if status == 200 {
                let reply = json(&body)?;
                let by = reply["server"].as_str().unwrap_or_default().to_string();
                seen.insert(by, peer_ip(&reply)?);
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    ensure!(
        seen.get("server-1") == Some(&l.waypoint_ip) && seen.get("node-2") == Some(&l.waypoint_ip),
        "both slice endpoints answer the waypoint: {seen:?}"
    );
    mesh.remove_yaml("ext.yaml")?;
    Ok(())
}

/// Issue 16 (egress through a waypoint): a ServiceEntry labelled `istio.io/use-waypoint` is
/// reached through the waypoint, which applies L7 (an HTTP port: a request id is added) and
/// connects to the entry's endpoint outside the mesh (the n2 node) in plain TCP; an entry
/// without the label is reached straight from the client's agent.
fn a_service_entry_that_uses_the_waypoint_is_served_through_it(l: &mut L7) -> Result<()> {
    let mesh = &l.mesh;
    let echo = mesh.binaries().mesh_echo()?;
    let echo = echo.to_string_lossy();
    let mut node = mesh.spawn_node("n2", &[&echo, "--port", "8090", "--name", "egress"])?;
    node.wait_for_stdout("listening on", Duration::from_secs(10))?;
    let node_ip = mesh.node_ip("n2")?;
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: egress, namespace: default, labels: {{{USE_WAYPOINT_LABEL}: waypoint}}}}
spec:
  hosts: [egress.example.com]
  addresses: [240.240.1.1]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {node_ip}, ports: {{http: 8090}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: direct-egress, namespace: default}}
spec:
  hosts: [direct.example.com]
  addresses: [240.240.1.2]
  ports: [{{number: 80, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: {node_ip}, ports: {{http: 8090}}}}]
"#
    );
    mesh.write_yaml("egress.yaml", &yaml)?;
    let answered = |vip: &str| -> Option<Value> {
        let replies = curl(mesh, &[], &[url(vip, "/egress")]).ok()?;
        let (status, _, body) = replies.into_iter().next()?;
        (status == 200).then(|| json(&body).ok())?
    };
    let deadline = std::time::Instant::now() + RELOAD;
    let mut through = None;
    while through.is_none() && std::time::Instant::now() < deadline {
        through = answered("240.240.1.1");
        std::thread::sleep(Duration::from_millis(200));
    }
    let through = through.context("the entry through the waypoint never answered")?;
    assert_eq!(through["server"], "egress", "{through}");
    assert_eq!(
        peer_ip(&through)?,
        l.waypoint_ip,
        "called by the waypoint: {through}"
    );
    let request_id = through["headers"]["x-request-id"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(
        request_id.len(),
        36,
        "the waypoint's L7 added a request id: {through}"
    );
    let direct = answered("240.240.1.2").context("the entry without a waypoint")?;
    assert_eq!(
        peer_ip(&direct)?,
        l.client_ip,
        "straight from the client: {direct}"
    );
    mesh.remove_yaml("egress.yaml")?;
    Ok(())
}

/// Istio's ambient egress, by name: a `DNS` ServiceEntry without `addresses` that uses the
/// waypoint, and a DestinationRule for its host with `tls` `SIMPLE`. The client resolves the
/// host through its agent's DNS proxy (an auto-allocated VIP) and sends plain HTTP to it;
/// the agent tunnels it to the waypoint, which resolves the entry's endpoint host name
/// (`localhost`: an HTTPS echo on the waypoint pod's loopback) and originates TLS with the
/// entry's host as SNI. An HTTPRoute attached to the entry adds a header, and an
/// AuthorizationPolicy targeting it denies one path.
fn egress_by_name_through_the_waypoint_originates_tls(l: &mut L7) -> Result<()> {
    let mesh = &l.mesh;
    let dir = tempfile::tempdir()?;
    let ca = e2e::tls::TestCa::new(dir.path(), "egress")?;
    let leaf = ca.issue(&["secure.egress.test"], false)?;
    let echo = mesh.binaries().mesh_echo()?;
    let (cert, key) = (leaf.cert.to_string_lossy(), leaf.key.to_string_lossy());
    let mut https = mesh.spawn(
        WAYPOINT,
        &[
            &echo.to_string_lossy(),
            "--listen",
            "::",
            "--port",
            "8443",
            "--name",
            "secure",
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
        ],
    )?;
    https.wait_for_stdout("listening on", Duration::from_secs(10))?;
    let ca_file = ca.cert.display();
    let yaml = format!(
        r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: secure, namespace: default, labels: {{{USE_WAYPOINT_LABEL}: waypoint}}}}
spec:
  hosts: [secure.egress.test]
  ports: [{{number: 80, name: http, protocol: HTTP, targetPort: 8443}}]
  resolution: DNS
  endpoints: [{{address: localhost}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: secure, namespace: default}}
spec:
  host: secure.egress.test
  trafficPolicy: {{tls: {{mode: SIMPLE, caCertificates: {ca_file}}}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: secure, namespace: default}}
spec:
  parentRefs: [{{group: networking.istio.io, kind: ServiceEntry, name: secure}}]
  rules:
  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {{add: [{{name: x-egress, value: routed}}]}}
    backendRefs: [{{group: networking.istio.io, kind: ServiceEntry, name: secure, port: 80}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: secure, namespace: default}}
spec:
  targetRefs: [{{group: networking.istio.io, kind: ServiceEntry, name: secure}}]
  action: DENY
  rules: [{{to: [{{operation: {{paths: [/forbidden]}}}}]}}]
"#
    );
    mesh.write_yaml("secure-egress.yaml", &yaml)?;
    let deadline = std::time::Instant::now() + RELOAD;
    let mut reply = None;
    while reply.is_none() && std::time::Instant::now() < deadline {
        reply = curl(
            mesh,
            &[],
            &["http://secure.egress.test/by-name".to_string()],
        )
        .ok()
        .and_then(|r| r.into_iter().next())
        .filter(|(status, _, _)| *status == 200)
        .and_then(|(_, _, body)| json(&body).ok());
        std::thread::sleep(Duration::from_millis(200));
    }
    let reply = reply.context("secure.egress.test never answered through the waypoint")?;
    assert_eq!(reply["server"], "secure", "{reply}");
    assert_eq!(reply["tls"]["sni"], "secure.egress.test", "{reply}");
    assert_eq!(reply["tls"]["alpn"], "http/1.1", "{reply}");
    let request_id = reply["headers"]["x-request-id"]
        .as_str()
        .unwrap_or_default();
    assert_eq!(request_id.len(), 36, "through the waypoint's L7: {reply}");
    assert_eq!(
        reply["headers"]["x-egress"], "routed",
        "the HTTPRoute on the entry: {reply}"
    );
    let denied = curl(
        mesh,
        &[],
        &["http://secure.egress.test/forbidden".to_string()],
    )?;
    assert_eq!(
        denied.first().map(|r| r.0),
        Some(403),
        "the AuthorizationPolicy on the entry: {denied:?}"
    );
    let vip = mesh.exec_ok(CLIENT, &["dig", "+short", "secure.egress.test"])?;
    assert!(
        vip.trim().starts_with("240.240."),
        "an auto-allocated VIP: {vip}"
    );
    mesh.remove_yaml("secure-egress.yaml")?;
    Ok(())
}

/// RELIABILITY 18: a Service whose `istio.io/use-waypoint` names a Gateway the mesh does not
/// have (a typo, a waypoint deleted or not created yet) fails closed: the client's agent
/// refuses its connections (`UH`, naming the Gateway) rather than send them around the
/// waypoint, whose L7 policy would then be skipped. The same servers answer through other
/// Services.
fn a_service_naming_an_unknown_waypoint_fails_closed(l: &mut L7) -> Result<()> {
    let mesh = &l.mesh;
    let refused = || -> Result<f64> {
        Ok(prom::sum(
            &mesh.metrics("n1")?,
            "mesh_connections_refused_total",
            &[("reporter", "source"), ("reason", "UH")],
        ))
    };
    let before = refused()?;
    let orphan = format!("{ORPHAN_VIP}:80").parse()?;
    for _ in 0..3 {
        if let Ok(r) = mesh.http_get(CLIENT, orphan, "/orphan") {
            bail!("answered {} around the unknown waypoint", r.status);
        }
    }
    e2e::eventually(
        "3 refusals counted UH",
        std::time::Duration::from_secs(10),
        || {
            let got = refused()? - before;
            anyhow::ensure!(got == 3.0, "{got} counted");
            Ok(())
        },
    )?;
    let direct = mesh.http_get(CLIENT, format!("{DIRECT_VIP}:80").parse()?, "/direct")?;
    anyhow::ensure!(
        direct.status == 200,
        "the servers answer: {}",
        direct.status
    );
    Ok(())
}

/// A `tcp-` port is relayed at L4 by the waypoint (bytes in, same bytes out), counted as
/// TCP; a port that declares nothing is detected: HTTP is served at L7, other bytes at L4.
fn tcp_ports_are_relayed_and_undeclared_ports_detected(l: &mut L7) -> Result<()> {
    let mesh = &l.mesh;
    let tcp_vip = format!("{TCP_VIP}:9000").parse()?;
    let back = mesh.echo_roundtrip(CLIENT, tcp_vip, b"MARKER-tcp-through-waypoint")?;
    assert_eq!(back, b"MARKER-tcp-through-waypoint");
    let undeclared = format!("{TCP_VIP}:9100").parse()?;
    let back = mesh.echo_roundtrip(CLIENT, undeclared, b"MARKER-detected-opaque")?;
    assert_eq!(back, b"MARKER-detected-opaque");
    let detected = curl(mesh, &[], &[format!("http://{TCP_VIP}:9100/detected")])?.remove(0);
    assert_eq!(detected.0, 200, "{detected:?}");
    let metrics = mesh.waypoint_metrics(WAYPOINT)?;
    let tcp = prom::sum(
        &metrics,
        "istio_tcp_connections_closed_total",
        &[
            ("reporter", "waypoint"),
            ("request_protocol", "tcp"),
            ("source_principal", CLIENT_SA),
        ],
    );
    assert_eq!(tcp, 2.0, "{metrics}");
    assert_eq!(
        prom::sum(
            &metrics,
            "istio_requests_total",
            &[("reporter", "waypoint")]
        ),
        12.0
    );
    Ok(())
}

/// The waypoint's access-log lines follow Istio's Telemetry API: none without a Telemetry
/// (the scenarios before sent HTTP requests and relayed TCP), on with one in the waypoint's
/// namespace (a line per request with its code and flags, and per relayed connection), off
/// again with a `disabled` one that targets the waypoint's Gateway (more specific).
fn access_log_lines_follow_the_telemetry_api(l: &mut L7) -> Result<()> {
    let requests = |log: &str| {
        log.lines()
            .filter(|l| l.contains("request complete"))
            .count()
    };
    let relayed = |log: &str| {
        log.lines()
            .filter(|l| l.contains("connection complete"))
            .count()
    };
    let log = l.wp.stderr();
    ensure!(
        requests(&log) == 0 && relayed(&log) == 0,
        "no access-log line without a Telemetry"
    );
    let dump = l.mesh.waypoint_config_dump(WAYPOINT)?;
    assert_eq!(
        dump["access_log"]["enabled"], false,
        "{}",
        dump["access_log"]
    );

    let mesh = &l.mesh;
    mesh.write_yaml("telemetry.yaml", &access_log_telemetry("default", "logs"))?;
    l.wp.wait_for_stderr("access log on", RELOAD, |log| log.contains("access log on"))?;
    let dump = mesh.waypoint_config_dump(WAYPOINT)?;
    assert_eq!(
        dump["access_log"]["enabled"], true,
        "{}",
        dump["access_log"]
    );
    assert_eq!(dump["access_log"]["telemetry"]["name"], "logs");
    assert_eq!(dump["access_log"]["level"], "namespace");
    let replies = curl(
        mesh,
        &[],
        &[url(ECHO_VIP, "/logged/ok"), url(ECHO_VIP, "/admin/logged")],
    )?;
    assert_eq!((replies[0].0, replies[1].0), (200, 403), "{replies:?}");
    let tcp = format!("{TCP_VIP}:9000").parse()?;
    assert_eq!(mesh.echo_roundtrip(CLIENT, tcp, b"logged")?, b"logged");
    l.wp.wait_for_stderr("both request lines and the relay line", RELOAD, |log| {
        let line = |path: &str, code: &str, flag: &str| {
            log.lines().any(|l| {
                l.contains("request complete")
                    && l.contains(path)
                    && l.contains(code)
                    && (l.contains(&format!("flags=\"{flag}\""))
                        || l.contains(&format!("flags={flag} ")))
            })
        };
        line("/logged/ok", "code=200", "-")
            && line("/admin/logged", "code=403", "DENY")
            && relayed(log) == 1
    })?;

    mesh.write_yaml(
        "telemetry-gateway.yaml",
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\n\
         metadata: {name: quiet, namespace: default}\n\
         spec:\n  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  \
         accessLogging: [{disabled: true}]\n",
    )?;
    l.wp.wait_for_stderr("access log off", RELOAD, |log| {
        log.contains("access log off")
    })?;
    let dump = mesh.waypoint_config_dump(WAYPOINT)?;
    assert_eq!(
        dump["access_log"]["enabled"], false,
        "{}",
        dump["access_log"]
    );
    assert_eq!(dump["access_log"]["telemetry"]["name"], "quiet");
    let before = l.wp.stderr();
    let replies = curl(mesh, &[], &[url(ECHO_VIP, "/quiet")])?;
    assert_eq!(replies[0].0, 200, "{replies:?}");
    assert_eq!(mesh.echo_roundtrip(CLIENT, tcp, b"quiet")?, b"quiet");
    // The request and the relay are answered; their lines would be written by now.
    std::thread::sleep(Duration::from_millis(500));
    let after = l.wp.stderr();
    assert_eq!(
        requests(&after),
        requests(&before),
        "no request line once disabled"
    );
    assert_eq!(
        relayed(&after),
        relayed(&before),
        "no relay line once disabled"
    );
    ensure!(
        !after.contains("path=/quiet"),
        "the /quiet request was not logged"
    );
    mesh.remove_yaml("telemetry-gateway.yaml")?;
    mesh.remove_yaml("telemetry.yaml")?;
    Ok(())
}

fn plain_tcp_to_the_waypoint_hbone_port_is_refused() -> Result<()> {
    let mesh = mesh("waypoint_relay")?;
    let _s1 = mesh.spawn_echo("default/server-1", 8080, "server-1")?;
    let _wp = mesh.spawn_default_waypoint()?;
    // Straight to the waypoint's 15008 without mTLS (the client's ztunnel passes it through:
    // the waypoint pod is not captured).
    let waypoint_ip = mesh.pod_ip(WAYPOINT)?;
    let out = mesh.exec(
        CLIENT,
        &[
            "curl",
            "-sS",
            "-m",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &format!("http://{waypoint_ip}:15008/"),
        ],
    )?;
    // Plain HTTP to 15008 is not TLS: the waypoint closes it (curl reports 000).
    assert_eq!(String::from_utf8_lossy(&out.stdout), "000");
    let metrics = mesh.waypoint_metrics(WAYPOINT)?;
    assert!(
        prom::sum(
            &metrics,
            "mesh_connections_refused_total",
            &[("reporter", "waypoint"), ("reason", "TLS")]
        ) >= 1.0,
        "{metrics}"
    );
    Ok(())
}

fn websocket_and_other_upgrades_pass_through_the_waypoint() -> Result<()> {
    let mesh = mesh("waypoint_upgrade")?;
    let _s1 = mesh.spawn_echo("default/server-1", 8080, "server-1")?;
    let _s2 = mesh.spawn_echo("default/server-2", 8080, "server-2")?;
    let wp = mesh.spawn_default_waypoint()?;
    with_log(&wp, upgrade_checks(&mesh))
}

fn upgrade_checks(mesh: &Mesh) -> Result<()> {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::TcpStream;
    use tungstenite::Message;

    let addr = format!("{ECHO_VIP}:80");
    // A WebSocket session: one server answers every message of the connection.
    let mut servers = mesh.in_pod(CLIENT, || -> Result<Vec<String>> {
        let tcp = TcpStream::connect(&addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let (mut ws, rsp) = tungstenite::client(format!("ws://{addr}/chat"), tcp)
            .map_err(|e| anyhow::anyhow!("websocket handshake: {e}"))?;
        anyhow::ensure!(rsp.status() == 101, "handshake status {}", rsp.status());
        let mut servers = Vec::new();
        for i in 0..5 {
            ws.send(Message::text(format!("hello {i}")))?;
            let reply = ws.read()?;
            let text = reply.to_text()?.to_string();
            let (server, echoed) = text.split_once(": ").context("reply shape")?;
            anyhow::ensure!(echoed == format!("hello {i}"), "echo {text:?}");
            servers.push(server.to_string());
        }
        ws.close(None)?;
        Ok(servers)
    })??;
    servers.dedup();
    assert_eq!(
        servers.len(),
        1,
        "one upgraded connection, one server: {servers:?}"
    );

    // Policy still applies to the upgrade request: `/admin*` is denied before anything opens.
    let denied = mesh.in_pod(CLIENT, || -> Result<u16> {
        let tcp = TcpStream::connect(&addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        match tungstenite::client(format!("ws://{addr}/admin/ws"), tcp) {
            Err(tungstenite::HandshakeError::Failure(tungstenite::Error::Http(rsp))) => {
                Ok(rsp.status().as_u16())
            }
            Err(e) => Err(anyhow::anyhow!("unexpected handshake error: {e}")),
            Ok(_) => Ok(101),
        }
    })??;
    assert_eq!(denied, 403);

    // Any other protocol: the bytes after `101` are spliced both ways.
    let echoed = mesh.in_pod(CLIENT, || -> Result<(String, Vec<u8>)> {
        let mut tcp = TcpStream::connect(&addr)?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        tcp.write_all(
            b"GET /raw HTTP/1.1\r\nhost: echo\r\nconnection: upgrade\r\nupgrade: mesh-raw\r\n\r\n",
        )?;
        let mut reader = BufReader::new(tcp.try_clone()?);
        let mut status = String::new();
        reader.read_line(&mut status)?;
        loop {
            let mut line = String::new();
            reader.read_line(&mut line)?;
            if line.trim().is_empty() {
                break;
            }
        }
        tcp.write_all(b"RAW-BYTES-AFTER-UPGRADE")?;
        tcp.shutdown(std::net::Shutdown::Write)?;
        let mut back = Vec::new();
        reader.read_to_end(&mut back)?;
        Ok((status.trim().to_string(), back))
    })??;
    assert_eq!(echoed.0, "HTTP/1.1 101 Switching Protocols");
    assert_eq!(echoed.1, b"RAW-BYTES-AFTER-UPGRADE");

    let metrics = mesh.waypoint_metrics(WAYPOINT)?;
    for (code, n) in [("101", 2.0), ("403", 1.0)] {
        assert_eq!(
            prom::sum(
                &metrics,
                "istio_requests_total",
                &[("reporter", "waypoint"), ("response_code", code)]
            ),
            n,
            "{code}: {metrics}"
        );
    }
    Ok(())
}

/// Zero trust across namespaces: `backend` denies everything at L4 except its own waypoint's
/// identity; the waypoint allows `GET /api*` only to `frontend/web`, and `/status` to the
/// whole `frontend` namespace. `other/intruder` gets nothing, and `frontend/web` cannot
/// bypass the waypoint by dialling a server pod directly.
const ZERO_TRUST: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: backend}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-the-waypoint, namespace: backend}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules: [{from: [{source: {principals: [cluster.local/ns/backend/sa/waypoint]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: api-callers, namespace: backend}
spec:
  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]
  action: ALLOW
  rules:
  - from: [{source: {principals: [cluster.local/ns/frontend/sa/web]}}]
    to: [{operation: {methods: [GET], paths: ["/api*"]}}]
  - from: [{source: {namespaces: [frontend]}}]
    to: [{operation: {paths: [/status]}}]
"#;

const API_VIP: &str = "10.96.1.10";

fn deny_all_with_allow_by_principal_across_namespaces_through_the_waypoint() -> Result<()> {
    let mesh = Mesh::builder("waypoint_zero_trust")
        .node("n1")
        .node("n2")
        .namespace("frontend", Ambient::Yes)
        .namespace("other", Ambient::Yes)
        .namespace("backend", Ambient::Yes)
        .pod(Pod::new("frontend", "web").on("n1").service_account("web"))
        .pod(
            Pod::new("frontend", "batch")
                .on("n1")
                .service_account("batch"),
        )
        .pod(
            Pod::new("other", "intruder")
                .on("n2")
                .service_account("intruder"),
        )
        .pod(waypoint_pod("backend", "waypoint", "n2"))
        .pod(
            Pod::new("backend", "api-1")
                .on("n1")
                .service_account("api")
                .labels([("app", "api")]),
        )
        .pod(
            Pod::new("backend", "api-2")
                .on("n2")
                .service_account("api")
                .labels([("app", "api")]),
        )
        .pod(
            Pod::new("backend", "api-3")
                .on("n1")
                .service_account("api")
                .labels([("app", "api")]),
        )
        .service(
            Service::new("backend", "api")
                .vip(API_VIP)
                .named_port("http", 80, 8080)
                .selector([("app", "api")])
                .labels([("istio.io/use-waypoint", "waypoint")]),
        )
        .yaml(
            "waypoint.yaml",
            &gateway_yaml("backend", "waypoint", "service"),
        )
        .yaml("zero-trust.yaml", ZERO_TRUST)
        .build()?;
    let _a1 = mesh.spawn_echo("backend/api-1", 8080, "api-1")?;
    let _a2 = mesh.spawn_echo("backend/api-2", 8080, "api-2")?;
    let _a3 = mesh.spawn_echo("backend/api-3", 8080, "api-3")?;
    let wp = mesh.spawn_waypoint("backend/waypoint", "backend", "waypoint", "waypoint")?;
    with_log(&wp, zero_trust_checks(&mesh))
}

fn zero_trust_checks(mesh: &Mesh) -> Result<()> {
    let vip: std::net::SocketAddr = format!("{API_VIP}:80").parse()?;
    let status =
        |pod: &str, path: &str| -> Result<u16> { Ok(mesh.http_get(pod, vip, path)?.status) };
    let mut servers = std::collections::BTreeSet::new();
    for i in 0..6 {
        let r = mesh.http_get("frontend/web", vip, &format!("/api/items/{i}"))?;
        assert_eq!(r.status, 200, "web GET /api: {}", r.text());
        let reply = json(&r.text())?;
        servers.insert(reply["server"].as_str().unwrap_or_default().to_string());
        // The server sees the waypoint, never the client, as its peer (L4 allows only it).
        assert_eq!(
            peer_ip(&reply)?,
            mesh.pod_ip("backend/waypoint")?,
            "{reply}"
        );
    }
    assert!(servers.len() >= 2, "api pods that served web: {servers:?}");
    assert_eq!(status("frontend/web", "/admin")?, 403, "web outside /api");
    assert_eq!(
        mesh.http_request("frontend/web", vip, "POST", "/api/items", b"{}")?
            .status,
        403,
        "web POST"
    );
    assert_eq!(status("frontend/web", "/status")?, 200, "namespace rule");
    assert_eq!(status("frontend/batch", "/status")?, 200, "namespace rule");
    assert_eq!(
        status("frontend/batch", "/api/items/1")?,
        403,
        "batch is not web"
    );
    assert_eq!(
        status("other/intruder", "/api/items/1")?,
        403,
        "other namespace"
    );
    assert_eq!(status("other/intruder", "/status")?, 403, "other namespace");

    // Bypassing the waypoint: straight to a server pod, the destination's L4 policy (only the
    // waypoint's identity) refuses the connection before any byte reaches the server.
    let pod: std::net::SocketAddr = format!("{}:8080", mesh.pod_ip("backend/api-2")?).parse()?;
    for who in ["frontend/web", "other/intruder"] {
        match mesh.http_get(who, pod, "/api/items/1") {
            Ok(r) => bail!(
                "{who} reached the server directly: {} {}",
                r.status,
                r.text()
            ),
            Err(e) => eprintln!("{who} direct to {pod}: refused ({e:#})"),
        }
    }
    h2_connection_is_balanced(mesh)?;

    let refused = prom::sum(
        &mesh.metrics("n2")?,
        "mesh_connections_refused_total",
        &[("reason", "DENY")],
    );
    assert!(refused >= 2.0, "policy refusals on n2: {refused}");
    Ok(())
}

/// One HTTP/2 connection (h2load, prior knowledge, one client, one stream at a time): its
/// requests are balanced per request, so every endpoint serves some of them (counted by each
/// server's `GET /_requests`, asked inside its pod).
fn h2_connection_is_balanced(mesh: &Mesh) -> Result<()> {
    const REQUESTS: usize = 30;
    let pods = ["backend/api-1", "backend/api-2", "backend/api-3"];
    let seen = || -> Result<Vec<f64>> {
        pods.iter()
            .map(|pod| {
                let local: std::net::SocketAddr = "127.0.0.1:8080".parse()?;
                let r = mesh.http_get(pod, local, "/_requests")?;
                json(&r.text())?["total"].as_f64().context("total")
            })
            .collect()
    };
    let before = seen()?;
    let out = mesh.exec_ok(
        "frontend/web",
        &[
            "h2load",
            "-n",
            &REQUESTS.to_string(),
            "-c",
            "1",
            "-m",
            "1",
            &format!("http://{API_VIP}/api/h2"),
        ],
    )?;
    assert!(out.contains("Application protocol: h2c"), "{out}");
    assert!(
        out.contains(&format!(
            "requests: {REQUESTS} total, {REQUESTS} started, {REQUESTS} done, {REQUESTS} succeeded"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("status codes: {REQUESTS} 2xx")),
        "{out}"
    );
    let after = seen()?;
    let counts: Vec<f64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    assert_eq!(counts.iter().sum::<f64>(), REQUESTS as f64, "{counts:?}");
    assert!(
        counts.iter().all(|&n| n >= 1.0),
        "one HTTP/2 connection reached every endpoint: {counts:?}"
    );
    Ok(())
}
