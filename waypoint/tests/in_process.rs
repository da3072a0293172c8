//! The waypoint's behaviours that need no capture, each test on a mesh of its own in this
//! process (see `support`): L7 authorization, path normalisation, HTTPRoute and
//! VirtualService routing, faults and retries, DestinationRule hashing, JWT authentication,
//! which tunnels and certificates the waypoint accepts, and the request metrics. No root, no
//! namespaces: `cargo test -p waypoint --test in_process`. The e2e suites
//! (`tests/tests/waypoint*.rs`) cover the same features with capture around them.

mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use e2e::jwt::Key;
use mesh_hbone::HboneError;
use serde_json::json;
use support::{accepts, identity, quit, Mesh, BYPASS, ECHO_H2, TRUST_DOMAIN};
use tracing::info;

/// Every request an L7 policy refuses gets this body (Envoy's).
const DENIED: &str = "RBAC: access denied";

/// A policy on Service `echo` (`action` and `rules` as YAML flow sequences).
fn policy(name: &str, action: &str, rules: &str) -> String {
    format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: {name}, namespace: app}}
spec:
  targetRefs: [{{kind: Service, group: "", name: echo}}]
  action: {action}
  rules: {rules}
"#
    )
}

/// An HTTPRoute on port 80 of Service `echo` with `rules` (YAML, indented by two).
fn route(rules: &str) -> String {
    format!(
        r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: echo, namespace: app}}
spec:
  parentRefs: [{{group: "", kind: Service, name: echo, port: 80}}]
  rules:
{rules}"#
    )
}

/// A VirtualService for `echo` with `http` entries (YAML, indented by two).
fn virtual_service(http: &str) -> String {
    format!(
        r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo, namespace: app}}
spec:
  hosts: [echo]
  http:
{http}"#
    )
}

/// Asserts `status` and `body` for each target, from `client`.
async fn expect(client: &support::Client, cases: &[(&str, u16, &str)]) -> Result<()> {
    for (target, status, body) in cases {
        let reply = client.get(target).await?;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (*status, *body),
            "{target}"
        );
    }
    Ok(())
}

/// Asserts that `target` reaches a backend (200) with the path the backend saw.
async fn expect_path(client: &support::Client, target: &str, path: &str) -> Result<()> {
    let reply = client.get(target).await?;
    assert_eq!(reply.status, 200, "{target}: {reply:?}");
    assert_eq!(reply.json()?["path"], path, "{target}");
    Ok(())
}

// --- threading ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_worker_threading_deals_hbone_connections_to_workers_with_their_own_pools() -> Result<()>
{
    // (threading, upstream HBONE pools)
    for (threading, pools) in [("per-worker", 2), ("shared", 1)] {
        let flags = [
            format!("--threading={threading}"),
            "--worker-threads=2".into(),
        ];
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let mesh = Mesh::start_with_flags("", &flags).await?;
        // Two identities: two HBONE connections to the waypoint, dealt one to each worker
        // (per-worker), each then calling the backend over its own worker's pool.
        for who in [identity("app", "sleep"), identity("app", "other")] {
            for _ in 0..3 {
                let reply = mesh.client(who.clone())?.get("/threads").await?;
                assert_eq!(reply.status, 200, "{threading} {who}: {reply:?}");
            }
        }
        let dump = mesh.config_dump().await?;
        let stats = dump["upstream_hbone_pools"]
            .as_array()
            .with_context(|| format!("no upstream_hbone_pools in {dump}"))?;
        let connections: Vec<u64> = stats
            .iter()
            .map(|p| p["connections"].as_u64().unwrap_or(u64::MAX))
            .collect();
        // Each pool holds a connection to each backend its requests were balanced to (one
        // or both of the two).
        assert_eq!(connections.len(), pools, "{threading}: {stats:?}");
        assert!(
            connections.iter().all(|c| (1..=2).contains(c)),
            "{threading}: {stats:?}"
        );
        mesh.stop().await?;
    }
    Ok(())
}

// --- authorization ---

/// Starts a mesh with `yaml`, then sends each request of `cases` (client `ns/sa`, method,
/// path) and checks its status: 403 must come with [`DENIED`], 200 from a backend that saw
/// the path as sent.
async fn check_policy(yaml: &str, cases: &[(&str, &str, &str, u16)]) -> Result<()> {
    let mesh = Mesh::start(yaml).await?;
    for (who, method, path, want) in cases {
        let (ns, sa) = who.split_once('/').context("ns/sa")?;
        let reply = mesh
            .client(identity(ns, sa))?
            .send(method, path, &[])
            .await?;
        let case = format!("{who} {method} {path}: {reply:?}");
        assert_eq!(reply.status, *want, "{case}");
        match want {
            403 => assert_eq!(reply.body, DENIED, "{case}"),
            200 => assert_eq!(reply.json()?["path"], *path, "{case}"),
            _ => {}
        }
    }
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_policy_on_paths_admits_them_and_denies_everything_else() -> Result<()> {
    let rules = r#"[{to: [{operation: {paths: ["/public/*"]}}]}]"#;
    let cases = [
        ("app/sleep", "GET", "/public/a", 200),
        ("app/sleep", "GET", "/private", 403),
        ("app/sleep", "GET", "/publicity", 403),
    ];
    check_policy(&policy("public", "ALLOW", rules), &cases).await
}

/// RELIABILITY 20: the CONNECT's `forwarded` header and a request's `x-forwarded-for` are
/// the peer's word: with no trusted proxy (the default) neither sets `source.ip` or
/// `remote.ip`, so naming the one allowed range opens nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_client_address_does_not_pass_ip_block_rules() -> Result<()> {
    let rules = r#"
  - from: [{source: {notIpBlocks: ["10.99.0.0/16"]}}]
    to: [{operation: {paths: ["/ip-only*"]}}]
  - from: [{source: {notRemoteIpBlocks: ["10.99.0.0/16"]}}]
    to: [{operation: {paths: ["/remote-only*"]}}]"#;
    let mesh = Mesh::start(&policy("forged", "DENY", rules)).await?;
    let forged = std::net::Ipv4Addr::new(10, 99, 0, 1);
    let liar = mesh.sleep()?.claiming(forged);
    let xff = [
        ("x-forwarded-for", "10.99.0.1"),
        ("forwarded", "for=10.99.0.1"),
    ];
    for path in ["/ip-only", "/remote-only"] {
        for headers in [&[][..], &xff[..]] {
            let reply = liar.get_with(path, headers).await?;
            assert_eq!(
                (reply.status, reply.body.as_str()),
                (403, DENIED),
                "{path} {headers:?}"
            );
        }
    }
    expect_path(&liar, "/public", "/public").await?;
    mesh.stop().await
}

/// RELIABILITY 20 on the waypoint's L4 path (a `tcp` port, bytes relayed): `ipBlocks` is
/// the tunnel's peer address, never the CONNECT's `forwarded` header. A client claiming the
/// one allowed range is refused at the CONNECT; the same client is admitted by a policy that
/// names the address it really comes from, whatever it claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_forwarded_header_does_not_pass_ip_blocks_at_l4() -> Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let forged = std::net::Ipv4Addr::new(10, 99, 0, 1);
    let only_forged = policy(
        "forged-range",
        "ALLOW",
        r#"[{from: [{source: {ipBlocks: ["10.99.0.0/16"]}}]}]"#,
    );
    let mesh = Mesh::start(&only_forged).await?;
    let liar = mesh.sleep()?.to(support::ECHO_TCP).claiming(forged);
    match liar.tunnel().await {
        Err(mesh_hbone::HboneError::Status(s)) => assert_eq!(s.as_u16(), 401),
        Err(e) => anyhow::bail!("refused, but not by policy: {e}"),
        Ok(_) => anyhow::bail!("a forged forwarded header passed an ipBlocks ALLOW at L4"),
    }
    mesh.stop().await?;

    let only_loopback = policy(
        "real-range",
        "ALLOW",
        r#"[{from: [{source: {ipBlocks: ["127.0.0.0/8"]}}]}]"#,
    );
    let mesh = Mesh::start(&only_loopback).await?;
    let liar = mesh.sleep()?.to(support::ECHO_TCP).claiming(forged);
    let mut tunnel = liar.tunnel().await?;
    tunnel
        .write_all(b"GET /l4 HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n")
        .await?;
    let mut answer = Vec::new();
    tokio::time::timeout(support::EVENTUALLY, tunnel.read_to_end(&mut answer)).await??;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deny_policy_on_a_principal_refuses_only_that_client() -> Result<()> {
    let rules = "[{from: [{source: {principals: [cluster.local/ns/app/sa/batch]}}]}]";
    let cases = [
        ("app/batch", "GET", "/x", 403),
        ("app/sleep", "GET", "/x", 200),
    ];
    check_policy(&policy("no-batch", "DENY", rules), &cases).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_policy_on_a_principal_admits_only_that_client() -> Result<()> {
    let rules = "[{from: [{source: {principals: [cluster.local/ns/app/sa/sleep]}}]}]";
    let cases = [
        ("app/sleep", "GET", "/x", 200),
        ("app/batch", "GET", "/x", 403),
    ];
    check_policy(&policy("only-sleep", "ALLOW", rules), &cases).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_policy_on_a_namespace_admits_its_clients_only() -> Result<()> {
    let rules = "[{from: [{source: {namespaces: [frontend]}}]}]";
    let cases = [
        ("frontend/web", "GET", "/api", 200),
        ("frontend/batch", "GET", "/api", 200),
        ("other/web", "GET", "/api", 403),
    ];
    check_policy(&policy("frontend", "ALLOW", rules), &cases).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_allow_policy_on_a_method_admits_get_and_denies_post() -> Result<()> {
    let rules = "[{to: [{operation: {methods: [GET, HEAD]}}]}]";
    let cases = [
        ("app/sleep", "GET", "/items", 200),
        ("app/sleep", "POST", "/items", 403),
        ("app/sleep", "DELETE", "/items", 403),
    ];
    check_policy(&policy("read-only", "ALLOW", rules), &cases).await
}

/// DENY on `/admin*`.
fn no_admin() -> String {
    policy(
        "no-admin",
        "DENY",
        r#"[{to: [{operation: {paths: ["/admin*"]}}]}]"#,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_applies_to_http2_clients_as_to_http1_ones() -> Result<()> {
    let mesh = Mesh::start(&no_admin()).await?;
    let h2 = mesh.sleep()?.http2();
    expect(&h2, &[("/admin", 403, DENIED)]).await?;
    expect_path(&h2, "/ok", "/ok").await?;
    mesh.stop().await
}

// --- path normalisation ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_denied_path_is_denied() -> Result<()> {
    let spellings = [
        "/admin",
        "/public/../admin",
        "//admin",
        "/public/%2e%2e/admin/users",
        "/%2E%2E/admin",
        "/%61dmin",
    ];
    let cases: Vec<_> = spellings
        .iter()
        .map(|path| ("app/sleep", "GET", *path, 403))
        .collect();
    check_policy(&no_admin(), &cases).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_encoded_slash_is_refused_and_dot_segments_are_resolved_before_forwarding() -> Result<()>
{
    let mesh = Mesh::start(&no_admin()).await?;
    let c = mesh.sleep()?;
    for target in ["/a%2Fb", "/admin%2fusers"] {
        assert_eq!(c.get(target).await?.status, 400, "{target}");
    }
    expect_path(&c, "/public/./x//y/../z", "/public/x/z").await?;
    mesh.stop().await
}

// --- HTTPRoute ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_header_match_picks_its_backend() -> Result<()> {
    let mesh = Mesh::start(&route(
        r#"  - matches: [{headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - backendRefs: [{name: echo-v1, port: 80}]
"#,
    ))
    .await?;
    let c = mesh.sleep()?;
    let v2 = c.spread(10, "/h", &[("x-version", "v2")]).await?;
    assert_eq!(v2.into_iter().collect::<Vec<_>>(), [("echo-v2".into(), 10)]);
    let rest = c.spread(10, "/h", &[("x-version", "v3")]).await?;
    assert_eq!(
        rest.into_iter().collect::<Vec<_>>(),
        [("echo-v1".into(), 10)]
    );
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_path_prefix_matches_whole_segments_and_outranks_a_header() -> Result<()> {
    let mesh = Mesh::start(&route(
        r#"  - matches: [{headers: [{name: x-version, value: v2}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /v1}}]
    backendRefs: [{name: echo-v1, port: 80}]
  - matches: [{path: {type: Exact, value: /exact}}]
    backendRefs: [{name: echo-v2, port: 80}]
"#,
    ))
    .await?;
    let c = mesh.sleep()?;
    for (target, headers, server) in [
        ("/v1/item", &[("x-version", "v2")][..], "echo-v1"),
        ("/v1", &[][..], "echo-v1"),
        ("/exact", &[][..], "echo-v2"),
    ] {
        let reply = c.get_with(target, headers).await?;
        assert_eq!(reply.server()?, server, "{target}");
    }
    // `/v1x` is not under the prefix `/v1`, and `/exact/more` is not `/exact`: no rule.
    for target in ["/v1x", "/exact/more"] {
        assert_eq!(c.get(target).await?.status, 404, "{target}");
    }
    mesh.stop().await
}

/// Requests of a weighted split, and how far (in points) echo-v1's share may stray from 80 %:
/// 10 points is five standard deviations at 400 requests, so this does not flake.
const SPLIT_REQUESTS: usize = 400;
const SPLIT_TOLERANCE: f64 = 0.10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_weighted_split_sends_about_80_percent_to_the_heavier_backend() -> Result<()> {
    let mesh = Mesh::start(&route(
        r#"  - backendRefs: [{name: echo-v1, port: 80, weight: 80}, {name: echo-v2, port: 80, weight: 20}]
"#,
    ))
    .await?;
    let counts = mesh.sleep()?.spread(SPLIT_REQUESTS, "/split", &[]).await?;
    let v1 = counts.get("echo-v1").copied().unwrap_or_default();
    let v2 = counts.get("echo-v2").copied().unwrap_or_default();
    assert_eq!(v1 + v2, SPLIT_REQUESTS, "{counts:?}");
    let share = v1 as f64 / SPLIT_REQUESTS as f64;
    assert!(
        (share - 0.8).abs() <= SPLIT_TOLERANCE,
        "echo-v1 got {share:.3}: {counts:?}"
    );
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_url_rewrite_replaces_the_prefix_and_keeps_the_query() -> Result<()> {
    let mesh = Mesh::start(&route(
        r#"  - matches: [{path: {type: PathPrefix, value: /old-api}}]
    filters:
    - type: URLRewrite
      urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /api/v2}}
    backendRefs: [{name: echo-v2, port: 80}]
"#,
    ))
    .await?;
    let reply = mesh.sleep()?.get("/old-api/users?page=2").await?;
    let echo = reply.json()?;
    assert_eq!(echo["server"], "echo-v2");
    assert_eq!(echo["path"], "/api/v2/users?page=2");
    assert_eq!(echo["headers"]["x-envoy-original-path"], "/old-api/users");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_request_redirect_is_answered_by_the_waypoint() -> Result<()> {
    let mesh = Mesh::start(&route(
        r#"  - matches: [{path: {type: Exact, value: /moved}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        hostname: new.example.com
        statusCode: 301
        path: {type: ReplaceFullPath, replaceFullPath: /here}
"#,
    ))
    .await?;
    let reply = mesh.sleep()?.get("/moved?from=test").await?;
    assert_eq!(reply.status, 301, "{reply:?}");
    assert_eq!(
        reply.header("location"),
        Some("http://new.example.com/here?from=test")
    );
    assert_eq!(mesh.requests(&[("response_code", "301")], 1.0).await?, 1.0);
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproute_header_modifiers_change_the_request_and_the_response() -> Result<()> {
    let mesh = Mesh::start(&route(
        r#"  - filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{name: x-route, value: headers}]
        add: [{name: x-added, value: "yes"}]
        remove: [x-remove-me]
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-from-route, value: headers}]}
    backendRefs: [{name: echo-v1, port: 80}]
"#,
    ))
    .await?;
    let reply = mesh
        .sleep()?
        .get_with("/h", &[("x-remove-me", "1"), ("x-route", "from-client")])
        .await?;
    assert_eq!(reply.header("x-from-route"), Some("headers"));
    let seen = &reply.json()?["headers"];
    assert_eq!(seen["x-route"], "headers", "{seen}");
    assert_eq!(seen["x-added"], "yes", "{seen}");
    assert!(seen.get("x-remove-me").is_none(), "{seen}");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_httproute_request_timeout_answers_504_flagged_ut() -> Result<()> {
    let mesh = Mesh::start(&route(
        r#"  - timeouts: {request: 200ms}
    backendRefs: [{name: echo-v1, port: 80}]
"#,
    ))
    .await?;
    let c = mesh.sleep()?;
    let before = Instant::now();
    expect(
        &c,
        &[("/slow?delay_ms=3000", 504, "upstream request timeout")],
    )
    .await?;
    let waited = before.elapsed();
    assert!(
        waited >= Duration::from_millis(190) && waited < Duration::from_millis(2500),
        "answered after {waited:?}"
    );
    expect_path(&c, "/fast?delay_ms=10", "/fast?delay_ms=10").await?;
    let timed_out = [("response_code", "504"), ("response_flags", "UT")];
    assert_eq!(mesh.requests(&timed_out, 1.0).await?, 1.0);
    mesh.stop().await
}

// --- VirtualService ---

/// `/retry*` with Istio's default retries, `/no-retry*` with none (both to echo-v1).
const RETRIES: &str = r#"  - match: [{uri: {prefix: /no-retry}}]
    retries: {attempts: 0}
    route: [{destination: {host: echo-v1}}]
  - match: [{uri: {prefix: /retry}}]
    route: [{destination: {host: echo-v1}}]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_service_retries_a_503_into_a_200() -> Result<()> {
    let mesh = Mesh::start(&virtual_service(RETRIES)).await?;
    let reply = mesh.sleep()?.get("/retry?fail_first=1&key=once").await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.server()?, "echo-v1");
    assert_eq!(
        mesh.counted(
            "waypoint_upstream_retries_total",
            &[("reason", "response")],
            1.0
        )
        .await?,
        1.0
    );
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_service_with_zero_attempts_passes_the_failure_on() -> Result<()> {
    let mesh = Mesh::start(&virtual_service(RETRIES)).await?;
    let c = mesh.sleep()?;
    assert_eq!(c.get("/no-retry?fail_first=1&key=k").await?.status, 503);
    // The backend's second answer for the key is a 200: the failure was not retried.
    assert_eq!(c.get("/no-retry?fail_first=1&key=k").await?.status, 200);
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_service_fault_abort_at_100_percent_answers_every_request() -> Result<()> {
    let mesh = Mesh::start(&virtual_service(
        r#"  - fault: {abort: {httpStatus: 503, percentage: {value: 100}}}
    route: [{destination: {host: echo-v1}}]
"#,
    ))
    .await?;
    let c = mesh.sleep()?;
    for i in 0..5 {
        expect(&c, &[(&format!("/abort/{i}"), 503, "fault filter abort")]).await?;
    }
    let aborted = [("response_code", "503"), ("response_flags", "FI")];
    assert_eq!(mesh.requests(&aborted, 5.0).await?, 5.0);
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_virtual_service_direct_response_is_answered_by_the_waypoint() -> Result<()> {
    let mesh = Mesh::start(&virtual_service(
        r#"  - match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: short and stout}}
  - route: [{destination: {host: echo-v2}}]
"#,
    ))
    .await?;
    let c = mesh.sleep()?;
    expect(&c, &[("/teapot", 418, "short and stout")]).await?;
    assert_eq!(c.get("/teapot/not").await?.server()?, "echo-v2");
    mesh.stop().await
}

// --- DestinationRule ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consistent_hash_on_a_header_keeps_a_user_on_one_endpoint() -> Result<()> {
    let mesh = Mesh::start(
        r#"apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: app}
spec:
  host: echo
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
"#,
    )
    .await?;
    let c = mesh.sleep()?;
    let mut pods = std::collections::BTreeSet::new();
    for u in 0..16 {
        let user = format!("user-{u}");
        let counts = c.spread(4, "/who", &[("x-user", &user)]).await?;
        assert_eq!(counts.len(), 1, "{user} moved: {counts:?}");
        pods.extend(counts.into_keys());
    }
    info!(?pods, "users spread over");
    // Sixteen users all on one of two pods by chance: one in 32768.
    assert_eq!(pods.len(), 2, "every user on {pods:?}");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_destination_rule_requests_are_balanced_over_both_endpoints() -> Result<()> {
    let mesh = Mesh::start("").await?;
    let counts = mesh.sleep()?.spread(6, "/rr", &[]).await?;
    assert_eq!(
        counts.into_iter().collect::<Vec<_>>(),
        [("echo-v1".into(), 3), ("echo-v2".into(), 3)],
        "round robin per request"
    );
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_port_is_served_over_http2_to_the_backend() -> Result<()> {
    let mesh = Mesh::start("").await?;
    let reply = mesh.sleep()?.to(ECHO_H2).get("/h2").await?;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.json()?["version"], "HTTP/2.0");
    let reply = mesh.sleep()?.get("/h1").await?;
    assert_eq!(reply.json()?["version"], "HTTP/1.1");
    mesh.stop().await
}

// --- RequestAuthentication ---

/// An inline JWKS for issuer `issuer` on Service `echo`; `/secure*` only for `issuer/alice`.
fn jwt_config(key: &Key) -> Result<String> {
    let jwks = serde_json::to_string(&key.jwks())?;
    let rules = r#"[{to: [{operation: {notPaths: ["/secure*"]}}]},
    {from: [{source: {requestPrincipals: [issuer/alice]}}], to: [{operation: {paths: ["/secure*"]}}]}]"#;
    Ok(format!(
        r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: app}}
spec:
  targetRefs: [{{kind: Service, group: "", name: echo}}]
  jwtRules: [{{issuer: issuer, audiences: [echo], jwks: {jwks}}}]
---
{}"#,
        policy("jwt", "ALLOW", rules)
    ))
}

/// `authorization: Bearer <a token for sub from iss, audience echo, valid ten minutes>`.
fn bearer(key: &Key, iss: &str, sub: &str) -> Result<(&'static str, String)> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let claims = json!({"iss": iss, "sub": sub, "aud": "echo", "iat": now, "exp": now + 600});
    Ok(("authorization", format!("Bearer {}", key.sign(&claims)?)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_valid_jwt_is_accepted_and_its_request_principal_allowed() -> Result<()> {
    let key = Key::new("k1")?;
    let mesh = Mesh::start(&jwt_config(&key)?).await?;
    let c = mesh.sleep()?;
    for (sub, status) in [("alice", 200), ("bob", 403)] {
        let (name, value) = bearer(&key, "issuer", sub)?;
        let reply = c.get_with("/secure/data", &[(name, &value)]).await?;
        assert_eq!(reply.status, status, "{sub}: {reply:?}");
    }
    expect(&c, &[("/secure", 403, DENIED)]).await?;
    expect_path(&c, "/public", "/public").await?;
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_jwt_is_refused_with_401_even_where_no_principal_is_needed() -> Result<()> {
    let key = Key::new("k1")?;
    let mesh = Mesh::start(&jwt_config(&key)?).await?;
    // Same kid, same claims, another key.
    let (name, value) = bearer(&Key::new("k1")?, "issuer", "alice")?;
    for target in ["/secure", "/public"] {
        let reply = mesh.sleep()?.get_with(target, &[(name, &value)]).await?;
        assert_eq!(
            (reply.status, reply.body.as_str()),
            (401, "Jwt verification fails"),
            "{target}"
        );
    }
    let refused = [("response_code", "401"), ("response_flags", "JWT")];
    assert_eq!(mesh.requests(&refused, 2.0).await?, 2.0);
    mesh.stop().await
}

// --- tunnels and certificates ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_to_a_service_that_does_not_use_the_waypoint_is_refused_401() -> Result<()> {
    let mesh = Mesh::start("").await?;
    match mesh.sleep()?.to(BYPASS).tunnel().await {
        Err(HboneError::Status(s)) => assert_eq!(s.as_u16(), 401),
        Err(e) => anyhow::bail!("expected a 401 CONNECT answer, got {e}"),
        Ok(_) => anyhow::bail!("the waypoint accepted a tunnel to {BYPASS:?}"),
    }
    let refused = [("reporter", "waypoint"), ("reason", "NR")];
    let n = mesh
        .counted("mesh_connections_refused_total", &refused, 1.0)
        .await?;
    assert_eq!(n, 1.0);
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_certificate_from_a_foreign_ca_is_refused_at_the_handshake() -> Result<()> {
    let mesh = Mesh::start("").await?;
    let sleep = identity("app", "sleep");
    let foreign =
        mesh_pki::ca::Ca::ephemeral(TRUST_DOMAIN)?.issue(&sleep, Duration::from_secs(600))?;
    // The client judges the waypoint as the mesh does; only its own certificate is foreign.
    let mut tls = rustls::ClientConfig::builder_with_provider(mesh_pki::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(mesh_pki::tls::server_verifier(
            mesh.roots(),
            vec![identity("app", "wp")],
        ))
        .with_client_auth_cert(foreign.chain, foreign.key)?;
    tls.alpn_protocols = vec![mesh_hbone::ALPN_H2.to_vec()];
    tls.enable_sni = false;
    let client = mesh.client_with_tls(sleep, std::sync::Arc::new(tls));
    let refused = client.tunnel().await;
    assert!(refused.is_err(), "a foreign certificate opened a tunnel");
    let tls_refused = [("reporter", "waypoint"), ("reason", "TLS")];
    let n = mesh
        .counted("mesh_connections_refused_total", &tls_refused, 1.0)
        .await?;
    assert_eq!(n, 1.0);
    mesh.stop().await
}

// --- metrics and lifecycle ---

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_is_counted_once_with_its_code_flags_and_identities() -> Result<()> {
    let mesh = Mesh::start(&no_admin()).await?;
    let c = mesh.sleep()?;
    for i in 0..7 {
        expect_path(&c, &format!("/ok/{i}"), &format!("/ok/{i}")).await?;
    }
    for _ in 0..3 {
        expect(&c, &[("/admin", 403, DENIED)]).await?;
    }
    assert_eq!(c.get("/?status=500").await?.status, 500);
    let who = [
        ("source_principal", "spiffe://cluster.local/ns/app/sa/sleep"),
        ("destination_service", "echo.app.svc.cluster.local"),
    ];
    for (code, flags, n) in [("200", "-", 7.0), ("403", "DENY", 3.0), ("500", "-", 1.0)] {
        let mut labels = vec![("response_code", code), ("response_flags", flags)];
        labels.extend_from_slice(&who);
        assert_eq!(mesh.requests(&labels, n).await?, n, "{code} {flags}");
    }
    assert_eq!(mesh.requests(&[], 11.0).await?, 11.0, "and nothing else");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waypoint_is_ready_and_quitquitquit_closes_its_listener() -> Result<()> {
    let mesh = Mesh::start("").await?;
    assert_eq!(mesh.ready().await?, 200);
    let hbone = mesh.hbone_addr();
    assert!(accepts(hbone).await, "hbone listener before the quit");
    assert_eq!(quit(&mesh).await?, 200);
    mesh.stop().await.context("drained after /quitquitquit")?;
    assert!(!accepts(hbone).await, "hbone listener after the quit");
    Ok(())
}

// --- bounded resources (RELIABILITY 7, 38) ---

/// Whether the waypoint closes `tcp` within `within` (EOF or reset on read).
async fn closed_within(tcp: &mut tokio::net::TcpStream, within: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 1];
    matches!(
        tokio::time::timeout(within, tcp.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_connection_cap_new_connections_are_closed_at_once_then_served_again() -> Result<()>
{
    let mesh = Mesh::start_with_flags("", &["--max-connections=3"]).await?;
    let hbone = mesh.hbone_addr();
    // A real client holds one connection (pooled, reused for every request).
    let c = mesh.sleep()?;
    expect_path(&c, "/before", "/before").await?;
    // Two that never say hello take the other two slots.
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(hbone).await?);
    }
    info!("the next connection is over the cap");
    let started = Instant::now();
    let mut over = tokio::net::TcpStream::connect(hbone).await?;
    assert!(
        closed_within(&mut over, Duration::from_millis(500)).await,
        "a fourth connection was kept"
    );
    info!(took = ?started.elapsed(), "closed");
    let refused = [("reporter", "waypoint"), ("reason", "OM")];
    let n = mesh
        .counted("mesh_connections_refused_total", &refused, 1.0)
        .await?;
    assert_eq!(n, 1.0);
    // The open ones keep working: the real client's requests still pass.
    expect_path(&c, "/during", "/during").await?;
    // One slot frees: a new connection is served (a new client dials its own).
    drop(silent.pop());
    // Another identity: another pooled connection, so this one is dialled afresh.
    let fresh = mesh.client(identity("app", "fresh"))?;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if fresh.get("/after").await.is_ok_and(|r| r.status == 200) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "never served again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_say_hello_are_closed_at_the_handshake_deadline() -> Result<()> {
    // Every client here dials from 127.0.0.1: the per-source share is lifted to the
    // process's cap, which is under test (the share: e2e `abuse_hbone`).
    let mesh = Mesh::start_with_flags(
        "",
        &[
            "--tls-handshake-timeout=1s",
            "--max-tls-handshakes-per-source=1024",
        ],
    )
    .await?;
    let hbone = mesh.hbone_addr();
    let before = e2e::held_sockets(hbone)?;
    let started = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(tokio::net::TcpStream::connect(hbone).await?);
    }
    // 128 of them in handshakes (the default cap), 72 closed at once (OM); a real client
    // dialling meanwhile may meet the full cap, so it tries until a slot is free.
    let real = mesh.client(identity("app", "fresh"))?;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        if real.get("/during").await.is_ok_and(|r| r.status == 200) {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "a real client was not served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut ends = tokio::task::JoinSet::new();
    for mut tcp in silent {
        ends.spawn(async move { closed_within(&mut tcp, Duration::from_secs(5)).await });
    }
    let ends = ends.join_all().await;
    let took = started.elapsed();
    assert!(ends.iter().all(|c| *c), "a silent connection stayed open");
    assert!(took < Duration::from_millis(2500), "closed after {took:?}");
    let refused = |reason| [("reporter", "waypoint"), ("reason", reason)];
    // The 128 that held a handshake slot timed out (TLS); the other 72 were refused at once
    // (OM), as were the real client's dials that met the full cap.
    let tls = mesh
        .counted("mesh_connections_refused_total", &refused("TLS"), 128.0)
        .await?;
    let metrics = mesh.metrics().await?;
    let om = e2e::prom::sum(&metrics, "mesh_connections_refused_total", &refused("OM"));
    assert_eq!(tls, 128.0);
    assert!(om >= 72.0, "{om} refused at once");
    // Every silent one is closed on the waypoint's side too (the real client's pooled
    // connection stays).
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        let after = e2e::held_sockets(hbone)?;
        if after <= before + 1 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{after} held, {before} before");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    mesh.stop().await
}
