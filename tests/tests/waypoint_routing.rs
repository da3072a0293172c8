//! HTTPRoute routing through a waypoint, end to end: a client pod on n1 calls Service `echo`
//! (labelled `istio.io/use-waypoint`); the waypoint on n2 routes each request by the route
//! attached to `echo` to Service `echo-v1` (pod on n2) or `echo-v2` (pod on n1), each a
//! mesh-echo naming itself, or answers itself (redirect, timeout, 404, policy).
//!
//! Requests go over one keep-alive HTTP/1.1 connection from the client pod with a small
//! client (paths are sent exactly as written, so `/public/../admin` reaches the waypoint
//! un-normalised).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use e2e::prom;
use e2e::waypoint::{
    log_tail, server, wait_for_rejection, waypoint_mesh, with_log, with_two_versions, Client,
    CLIENT, WAYPOINT,
};
use e2e::{scenarios, ChildGuard, Mesh, Suite};

const ECHO_VIP: &str = "10.96.0.20";
const V1_HOST: &str = "echo-v1.default.svc.cluster.local";
const V2_HOST: &str = "echo-v2.default.svc.cluster.local";
/// Requests of the weighted split, and the share of echo-v1 they must show (±5 points).
const SPLIT_REQUESTS: usize = 2000;
const V1_SHARE: f64 = 0.80;
const SHARE_TOLERANCE: f64 = 0.05;

const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - name: header-v2
    matches: [{headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - name: path-v1
    matches: [{path: {type: PathPrefix, value: /v1}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - name: split
    matches: [{path: {type: PathPrefix, value: /split}}]
    backendRefs: [{name: echo-v1, port: 80, weight: 80}, {name: echo-v2, port: 80, weight: 20}]
  - name: rewrite
    matches: [{path: {type: PathPrefix, value: /old-api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /api/v2}}
    backendRefs: [{name: echo-v2, port: 80}]
  - name: moved
    matches: [{path: {type: Exact, value: /moved}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        hostname: new.example.com
        statusCode: 301
        path: {type: ReplaceFullPath, replaceFullPath: /here}
  - name: headers
    matches: [{path: {type: PathPrefix, value: /headers}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-route, value: headers}]
        add: [{name: x-added, value: "yes"}]
        remove: [x-remove-me]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-from-route, value: headers}]}
    backendRefs: [{name: echo-v1, port: 80}]
  - name: slow
    matches: [{path: {type: PathPrefix, value: /slow}}]
    timeouts: {request: 500ms}
    backendRefs: [{name: echo-v1, port: 80}]
  - name: everything-else
    backendRefs: [{name: echo, port: 80}]
"#;

/// L7 DENY on `/admin*` at the waypoint for Service `echo`.
const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
"#;

fn mesh(test: &str) -> Result<Mesh> {
    with_two_versions(waypoint_mesh(test), [ECHO_VIP, "10.96.0.21", "10.96.0.22"])
        .yaml("route.yaml", ROUTE)
        .yaml("policy.yaml", POLICY)
        .build()
}

/// What the scenarios share: the mesh, the waypoint, one keep-alive connection to `echo`, and
/// the requests the waypoint sent to each backend Service (for the metrics scenario).
struct Routing {
    c: Client,
    to_v1: f64,
    to_v2: f64,
    wp: ChildGuard,
    _backends: [ChildGuard; 2],
    /// Last: dropped once the processes in it are gone.
    mesh: Mesh,
}

impl Routing {
    fn build() -> Result<Self> {
        let mesh = mesh("waypoint_routing")?;
        let v1 = mesh.spawn_echo("default/echo-v1", 8080, "echo-v1")?;
        let v2 = mesh.spawn_echo("default/echo-v2", 8080, "echo-v2")?;
        let wp = mesh.spawn_default_waypoint()?;
        let vip: SocketAddr = format!("{ECHO_VIP}:80").parse()?;
        let c = with_log(&wp, Client::connect(&mesh, CLIENT, vip))?;
        Ok(Routing {
            c,
            to_v1: 0.0,
            to_v2: 0.0,
            wp,
            _backends: [v1, v2],
            mesh,
        })
    }
}

impl Suite for Routing {
    fn explain(&self, err: anyhow::Error) -> anyhow::Error {
        log_tail(&self.wp, err)
    }
}

/// One mesh for all scenarios (building it is most of the suite's time); they run in order on
/// one connection, and the metrics scenario counts what the ones before it sent.
fn main() -> ExitCode {
    e2e::scenario::main(
        Routing::build,
        &scenarios![
            a_header_match_picks_its_backend_and_the_catch_all_balances_over_both,
            a_longer_path_prefix_outranks_a_header_and_internal_headers_are_stripped,
            a_weighted_split_is_chosen_per_request,
            url_rewrite_replaces_the_prefix_and_keeps_the_original_path,
            request_redirect_is_answered_by_the_waypoint,
            header_modifiers_apply_to_request_and_response,
            policy_and_routing_see_one_normalised_path,
            a_request_timeout_answers_504_and_keeps_the_connection,
            metrics_name_the_backend_actually_used,
            a_rejected_route_keeps_the_last_good_routes,
        ],
        &[],
    )
}

/// `x-version: v2` goes to echo-v2; without it, the catch-all rule sends it to `echo` itself,
/// balanced over both pods.
fn a_header_match_picks_its_backend_and_the_catch_all_balances_over_both(
    r: &mut Routing,
) -> Result<()> {
    let c = &mut r.c;
    for _ in 0..4 {
        let reply = c.echo("/hdr", &[("x-version", "v2")])?;
        assert_eq!(server(&reply), "echo-v2", "{reply}");
        r.to_v2 += 1.0;
    }
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..4 {
        seen.insert(server(&c.echo("/hdr", &[])?));
    }
    assert_eq!(seen.into_iter().collect::<Vec<_>>(), ["echo-v1", "echo-v2"]);
    Ok(())
}

/// A longer path prefix outranks a header match; client-supplied internal control headers do
/// not reach the backend.
fn a_longer_path_prefix_outranks_a_header_and_internal_headers_are_stripped(
    r: &mut Routing,
) -> Result<()> {
    for i in 0..4 {
        let reply = r.c.echo(
            &format!("/v1/item/{i}"),
            &[
                ("x-version", "v2"),
                ("x-envoy-upstream-rq-timeout-ms", "1"),
                ("x-envoy-original-path", "/forged"),
            ],
        )?;
        assert_eq!(server(&reply), "echo-v1", "{reply}");
        assert_eq!(reply["path"], format!("/v1/item/{i}"));
        let headers = reply["headers"].as_object().context("headers")?;
        assert!(
            !headers.keys().any(|k| k.starts_with("x-envoy-")),
            "internal headers stripped: {reply}"
        );
        r.to_v1 += 1.0;
    }
    Ok(())
}

/// Weighted 80/20, chosen per request on one connection.
fn a_weighted_split_is_chosen_per_request(r: &mut Routing) -> Result<()> {
    let started = Instant::now();
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..SPLIT_REQUESTS {
        let reply = r.c.echo(&format!("/split/{i}"), &[])?;
        *counts.entry(server(&reply)).or_default() += 1;
    }
    let v1 = counts.get("echo-v1").copied().unwrap_or_default();
    let v2 = counts.get("echo-v2").copied().unwrap_or_default();
    assert_eq!(v1 + v2, SPLIT_REQUESTS, "{counts:?}");
    let share = v1 as f64 / SPLIT_REQUESTS as f64;
    assert!(
        (share - V1_SHARE).abs() <= SHARE_TOLERANCE,
        "echo-v1 got {share:.3} of the split, want {V1_SHARE} ± {SHARE_TOLERANCE}: {counts:?}"
    );
    eprintln!(
        "split: {counts:?} in {:?} over one connection",
        started.elapsed()
    );
    r.to_v1 += v1 as f64;
    r.to_v2 += v2 as f64;
    Ok(())
}

/// URLRewrite: the matched prefix is replaced, the rest and the query kept; the original path
/// travels in `x-envoy-original-path` as Envoy sends it.
fn url_rewrite_replaces_the_prefix_and_keeps_the_original_path(r: &mut Routing) -> Result<()> {
    let reply = r.c.echo("/old-api/users?page=2", &[])?;
    assert_eq!(server(&reply), "echo-v2");
    assert_eq!(reply["path"], "/api/v2/users?page=2", "{reply}");
    assert_eq!(reply["headers"]["x-envoy-original-path"], "/old-api/users");
    r.to_v2 += 1.0;
    Ok(())
}

/// RequestRedirect: answered by the waypoint, nothing sent upstream.
fn request_redirect_is_answered_by_the_waypoint(r: &mut Routing) -> Result<()> {
    let rsp = r.c.get("/moved?from=test", &[])?;
    assert_eq!(rsp.status, 301, "{}", rsp.text());
    assert_eq!(
        rsp.header("location"),
        Some("http://new.example.com/here?from=test")
    );
    Ok(())
}

/// RequestHeaderModifier at the backend, ResponseHeaderModifier at the client.
fn header_modifiers_apply_to_request_and_response(r: &mut Routing) -> Result<()> {
    let rsp = r.c.get(
        "/headers",
        &[("x-remove-me", "1"), ("x-route", "from-client")],
    )?;
    assert_eq!(rsp.status, 200, "{}", rsp.text());
    assert_eq!(rsp.header("x-from-route"), Some("headers"));
    let reply = rsp.json()?;
    assert_eq!(reply["headers"]["x-route"], "headers", "{reply}");
    assert_eq!(reply["headers"]["x-added"], "yes", "{reply}");
    assert!(reply["headers"].get("x-remove-me").is_none(), "{reply}");
    r.to_v1 += 1.0;
    Ok(())
}

/// Path normalisation: one path for policy and routing. Every spelling of /admin is denied;
/// encoded slashes are refused; dot segments are resolved before forwarding.
fn policy_and_routing_see_one_normalised_path(r: &mut Routing) -> Result<()> {
    let c = &mut r.c;
    for target in [
        "/admin",
        "/public/../admin",
        "//admin",
        "/public/%2e%2e/admin/users",
        "/%61dmin",
        "/public/..%5Cadmin",
    ] {
        let rsp = c.get(target, &[])?;
        let want = if target.contains("%5C") { 400 } else { 403 };
        assert_eq!(rsp.status, want, "{target}: {}", rsp.text());
    }
    assert_eq!(c.get("/a%2Fb", &[])?.status, 400);
    let reply = c.echo("/public/./x//y/../z", &[])?;
    assert_eq!(reply["path"], "/public/x/z", "{reply}");
    Ok(())
}

/// timeouts.request: the backend answers after 3 s, the waypoint gives up at 500 ms; the
/// connection is still usable afterwards.
fn a_request_timeout_answers_504_and_keeps_the_connection(r: &mut Routing) -> Result<()> {
    let before = Instant::now();
    let rsp = r.c.get("/slow?delay_ms=3000", &[])?;
    let waited = before.elapsed();
    assert_eq!(rsp.status, 504, "{}", rsp.text());
    assert_eq!(rsp.text(), "upstream request timeout");
    assert!(
        waited >= Duration::from_millis(450) && waited < Duration::from_millis(2500),
        "answered after {waited:?}"
    );
    let reply = r.c.echo("/slow?delay_ms=10", &[])?;
    assert_eq!(server(&reply), "echo-v1");
    r.to_v1 += 1.0;
    Ok(())
}

/// `destination_service` is the backend actually used, counted over the scenarios before.
fn metrics_name_the_backend_actually_used(r: &mut Routing) -> Result<()> {
    let metrics = r.mesh.waypoint_metrics(WAYPOINT)?;
    let requests = |labels: &[(&str, &str)]| prom::sum(&metrics, "istio_requests_total", labels);
    let ok_to = |host: &str| requests(&[("response_code", "200"), ("destination_service", host)]);
    assert_eq!(ok_to(V1_HOST), r.to_v1, "{metrics}");
    assert_eq!(ok_to(V2_HOST), r.to_v2, "{metrics}");
    assert_eq!(
        requests(&[("response_code", "504"), ("response_flags", "UT")]),
        1.0
    );
    assert_eq!(
        requests(&[("response_code", "403"), ("response_flags", "DENY")]),
        5.0
    );
    assert_eq!(
        requests(&[("response_code", "301"), ("response_flags", "-")]),
        1.0
    );
    Ok(())
}

/// A route the translator refuses leaves the last good routes in place.
fn a_rejected_route_keeps_the_last_good_routes(r: &mut Routing) -> Result<()> {
    r.mesh.write_yaml(
        "route-bad.yaml",
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
         metadata: {name: bad, namespace: default}\n\
         spec: {rules: [{matches: [{path: {type: RegularExpression, value: '(unclosed'}}]}]}\n",
    )?;
    wait_for_rejection(&r.wp, "route-bad.yaml doc 1: HTTPRoute default/bad")?;
    let reply = r.c.echo("/v1/still", &[])?;
    assert_eq!(server(&reply), "echo-v1", "{reply}");
    Ok(())
}
