//! gRPC through a waypoint, end to end: a client pod on n1 calls Service `grpc`
//! (`appProtocol: grpc`, labelled `istio.io/use-waypoint`) with the repo's `mesh-grpc`
//! client, which opens ONE channel (one HTTP/2 connection) per run; the waypoint on n2
//! balances each call over the three `mesh-grpc` servers (one on n1, two on n2), routes by a
//! GRPCRoute, refuses by AuthorizationPolicy and RequestAuthentication (a JWT signed here,
//! ES256, key made per run) with gRPC statuses, and counts every call in
//! `istio_requests_total{grpc_response_status}`.

use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, ensure, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use e2e::grpc::SERVER_HEADER;
use e2e::prom;
use e2e::waypoint::{log_tail, waypoint_mesh, CLIENT, WAYPOINT};
use e2e::{scenarios, wait_until, ChildGuard, Mesh, Pod, Suite};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};

const WAYPOINT_SA: &str = "spiffe://cluster.local/ns/default/sa/waypoint";
const GRPC: &str = "10.96.0.30:9000";
const EMPTY: &str = "10.96.0.33:9000";
const SLOW: &str = "10.96.0.34:9000";
const SERVERS: [(&str, &str, &str); 3] = [
    ("default/grpc-a", "n1", "a"),
    ("default/grpc-b", "n2", "b"),
    ("default/grpc-c", "n2", "c"),
];
/// Calls on one channel that must reach every endpoint (round robin per request: 10 each).
const BALANCED_CALLS: usize = 30;
const ROUTE_WAIT: Duration = Duration::from_secs(15);

/// The Services, declared gRPC by `appProtocol` (the port name says nothing).
const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: grpc, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.30
  selector: {app: grpc}
  ports: [{name: rpc, port: 9000, targetPort: 9000, appProtocol: grpc}]
---
apiVersion: v1
kind: Service
metadata: {name: grpc-a, namespace: default}
spec:
  clusterIP: 10.96.0.31
  selector: {app: grpc, version: a}
  ports: [{name: rpc, port: 9000, targetPort: 9000, appProtocol: grpc}]
---
apiVersion: v1
kind: Service
metadata: {name: grpc-bc, namespace: default}
spec:
  clusterIP: 10.96.0.32
  selector: {app: grpc, tier: bc}
  ports: [{name: rpc, port: 9000, targetPort: 9000, appProtocol: grpc}]
---
# Behind the waypoint, but no pod matches: UNAVAILABLE.
apiVersion: v1
kind: Service
metadata: {name: grpc-empty, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.33
  selector: {app: nothing}
  ports: [{name: rpc, port: 9000, targetPort: 9000, appProtocol: grpc}]
---
# The same pods; an HTTPRoute with a request timeout applies to its gRPC calls.
apiVersion: v1
kind: Service
metadata: {name: grpc-slow, namespace: default, labels: {istio.io/use-waypoint: waypoint}}
spec:
  clusterIP: 10.96.0.34
  selector: {app: grpc}
  ports: [{name: rpc, port: 9000, targetPort: 9000, appProtocol: grpc}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: grpc-slow, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc-slow}]
  rules:
  - timeouts: {request: 300ms}
    backendRefs: [{name: grpc-slow, port: 9000}]
"#;

/// DENY `Unary` calls that carry `x-deny: yes` (other methods with it pass).
const POLICY: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-denied-unary, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: grpc}]
  action: DENY
  rules:
  - to: [{operation: {paths: ["/echo.v1.Echo/Unary"]}}]
    when: [{key: "request.headers[x-deny]", values: ["yes"]}]
"#;

/// Written once the unrouted checks are done.
const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc, port: 9000}]
  rules:
  - name: server-stream-to-a
    matches: [{method: {service: echo.v1.Echo, method: ServerStream}}]
    backendRefs: [{name: grpc-a, port: 9000}]
  - name: canary
    matches: [{method: {service: echo.v1.Echo}, headers: [{name: x-canary, value: "yes"}]}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {set: [{name: x-routed, value: canary}]}
    - type: ResponseHeaderModifier
      responseHeaderModifier: {add: [{name: x-route, value: canary}]}
    backendRefs: [{name: grpc-a, port: 9000}]
  - name: rest
    backendRefs: [{name: grpc-bc, port: 9000}]
---
# grpc-empty (no endpoints) gets one method, served by grpc-a; its other methods find no rule.
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: grpc-empty, namespace: default}
spec:
  parentRefs: [{group: "", kind: Service, name: grpc-empty}]
  rules:
  - matches: [{method: {service: echo.v1.Echo, method: ServerStream}}]
    backendRefs: [{name: grpc-a, port: 9000}]
"#;

/// An ES256 signing key (kid `k1`), made per run.
fn key() -> Result<EcdsaKeyPair> {
    let rng = SystemRandom::new();
    let pk8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| anyhow!("generate key"))?;
    EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pk8.as_ref(), &rng)
        .map_err(|_| anyhow!("load key"))
}

/// RequestAuthentication for Service `grpc` with `key`'s public half as inline JWKS.
fn jwt_yaml(key: &EcdsaKeyPair) -> String {
    let p = key.public_key().as_ref();
    let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "use": "sig",
        "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65])}]})
    .to_string();
    let jwks = serde_json::to_string(&jwks).unwrap_or_default();
    format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: grpc}}]
  jwtRules: [{{issuer: grpc-issuer, jwks: {jwks}}}]
"#
    )
}

/// A token from `grpc-issuer` for `alice`, signed by `key`, valid for 10 minutes.
fn token(key: &EcdsaKeyPair) -> Result<String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let header = json!({"alg": "ES256", "kid": "k1", "typ": "JWT"});
    let claims = json!({"iss": "grpc-issuer", "sub": "alice", "exp": now + 600, "iat": now});
    let input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let sig = key
        .sign(&SystemRandom::new(), input.as_bytes())
        .map_err(|_| anyhow!("sign"))?;
    Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
}

fn mesh(test: &str, jwt: &str) -> Result<Mesh> {
    let mut b = waypoint_mesh(test);
    for (pod, node, version) in SERVERS {
        let name = pod.trim_start_matches("default/");
        let tier = if version == "a" { "a" } else { "bc" };
        b = b.pod(
            Pod::new("default", name)
                .on(node)
                .service_account("grpc")
                .labels([("app", "grpc"), ("version", version), ("tier", tier)]),
        );
    }
    b.yaml("services.yaml", SERVICES)
        .yaml("policy.yaml", POLICY)
        .yaml("jwt.yaml", jwt)
        .build()
}

/// Every call the tests made, by the gRPC status the client saw (for the metrics check).
#[derive(Default)]
struct Tally(BTreeMap<i64, usize>);

/// Runs `mesh-grpc client` in the client pod: one channel, `calls` calls with `args`; the
/// JSON line of each call.
fn client(
    mesh: &Mesh,
    tally: &mut Tally,
    addr: &str,
    calls: usize,
    args: &[&str],
) -> Result<Vec<Value>> {
    let lines = mesh.grpc_calls(CLIENT, addr, calls, args)?;
    for l in &lines {
        *tally.0.entry(l["code"].as_i64().unwrap_or(-1)).or_default() += 1;
    }
    Ok(lines)
}

fn servers(lines: &[Value]) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for l in lines {
        *seen
            .entry(l["server"].as_str().unwrap_or_default().to_string())
            .or_default() += 1;
    }
    seen
}

fn all_ok(lines: &[Value]) -> Result<()> {
    for l in lines {
        ensure!(l["code"] == 0, "call failed: {l}");
    }
    Ok(())
}

/// What the scenarios share: the mesh, the two tokens, and every call's status (for the
/// metrics scenario).
struct Grpc {
    tally: Tally,
    good_token: String,
    forged_token: String,
    wp: ChildGuard,
    _servers: Vec<ChildGuard>,
    /// Last: dropped once the processes in it are gone.
    mesh: Mesh,
}

impl Grpc {
    fn build() -> Result<Self> {
        let signer = key()?;
        let mesh = mesh("waypoint_grpc", &jwt_yaml(&signer))?;
        let mut servers = Vec::new();
        for (pod, _, version) in SERVERS {
            servers.push(mesh.spawn_grpc(pod, 9000, version)?);
        }
        let wp = mesh.spawn_default_waypoint()?;
        Ok(Grpc {
            tally: Tally::default(),
            good_token: token(&signer)?,
            forged_token: token(&key()?)?,
            wp,
            _servers: servers,
            mesh,
        })
    }
}

impl Suite for Grpc {
    fn explain(&self, err: anyhow::Error) -> anyhow::Error {
        log_tail(&self.wp, err)
    }
}

/// One mesh for all scenarios; they run in order. The GRPCRoute scenario attaches a route to
/// Service `grpc` and `grpc-empty` that the scenarios after it rely on, and the metrics
/// scenario counts the calls of all before it.
fn main() -> ExitCode {
    e2e::scenario::main(
        Grpc::build,
        &scenarios![
            unary_calls_on_one_channel_are_balanced_over_every_endpoint,
            a_server_stream_stays_on_one_server_and_streams_are_balanced,
            a_client_stream_delivers_every_message,
            a_bidi_stream_answers_every_message_in_order,
            a_status_the_server_chooses_passes_through_with_its_trailer,
            an_authorization_policy_denies_one_method_with_permission_denied,
            a_valid_jwt_passes_and_a_forged_one_is_unauthenticated,
            a_route_timeout_is_unavailable_and_a_faster_call_passes,
            no_endpoint_behind_the_waypoint_is_unavailable,
            a_grpc_route_routes_by_method_and_header,
            a_method_no_grpc_route_matches_is_unimplemented,
            metrics_count_every_call_by_grpc_status,
        ],
        &[],
    )
}

/// Unary: one channel's 30 calls (one connection: the client's agent opens one to the
/// waypoint) are spread over all three endpoints (per request, not per connection), each
/// reply names its server and echoes the metadata the server saw.
fn unary_calls_on_one_channel_are_balanced_over_every_endpoint(g: &mut Grpc) -> Result<()> {
    let mesh = &g.mesh;
    let tally = &mut g.tally;
    let to_waypoint = || -> Result<f64> {
        Ok(prom::sum(
            &mesh.metrics("n1")?,
            "istio_tcp_connections_opened_total",
            &[
                ("reporter", "source"),
                ("destination_principal", WAYPOINT_SA),
            ],
        ))
    };
    let before = to_waypoint()?;
    let lines = client(
        mesh,
        tally,
        GRPC,
        BALANCED_CALLS,
        &["--kind", "unary", "--metadata", "x-test=1"],
    )?;
    all_ok(&lines)?;
    let seen = servers(&lines);
    assert_eq!(
        seen.keys().map(String::as_str).collect::<Vec<_>>(),
        ["a", "b", "c"],
        "one channel reaches every endpoint: {seen:?}"
    );
    for l in &lines {
        assert_eq!(l["echoed"]["x-test"], "1", "{l}");
        assert!(
            l["echoed"]["x-request-id"].is_string(),
            "the waypoint adds x-request-id: {l}"
        );
        assert_eq!(l["echoed"]["content-type"], "application/grpc", "{l}");
        assert_eq!(l["headers"][SERVER_HEADER], l["server"], "{l}");
        assert_eq!(l["trailers"]["grpc-status"], "0", "trailers intact: {l}");
    }
    assert_eq!(
        to_waypoint()? - before,
        1.0,
        "one connection for the 30 calls"
    );
    eprintln!("unary over one channel: {seen:?}");
    Ok(())
}

/// Server streaming: every reply of a call comes from one server, the trailers end it.
fn a_server_stream_stays_on_one_server_and_streams_are_balanced(g: &mut Grpc) -> Result<()> {
    let mesh = &g.mesh;
    let tally = &mut g.tally;
    let lines = client(
        mesh,
        tally,
        GRPC,
        6,
        &["--kind", "server-stream", "--count", "5"],
    )?;
    all_ok(&lines)?;
    for l in &lines {
        assert_eq!(l["replies"], 5, "{l}");
        let names: BTreeSet<&str> = l["servers"]
            .as_array()
            .context("servers")?
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(names.len(), 1, "one stream, one server: {l}");
        assert_eq!(l["trailers"]["grpc-status"], "0", "{l}");
    }
    assert!(
        servers(&lines).len() >= 2,
        "streams balanced: {:?}",
        servers(&lines)
    );
    Ok(())
}

/// Client streaming: the server counted every message.
fn a_client_stream_delivers_every_message(g: &mut Grpc) -> Result<()> {
    let mesh = &g.mesh;
    let tally = &mut g.tally;
    let lines = client(
        mesh,
        tally,
        GRPC,
        3,
        &["--kind", "client-stream", "--count", "7"],
    )?;
    all_ok(&lines)?;
    for l in &lines {
        assert_eq!(l["received"], 7, "{l}");
        assert_eq!(l["trailers"]["grpc-status"], "0", "{l}");
    }
    Ok(())
}

/// Bidi: one reply per message, in order, from one server.
fn a_bidi_stream_answers_every_message_in_order(g: &mut Grpc) -> Result<()> {
    let mesh = &g.mesh;
    let tally = &mut g.tally;
    let lines = client(mesh, tally, GRPC, 3, &["--kind", "bidi", "--count", "4"])?;
    all_ok(&lines)?;
    for l in &lines {
        assert_eq!(l["replies"], 4, "{l}");
        assert_eq!(l["trailers"]["grpc-status"], "0", "{l}");
    }
    Ok(())
}

/// A status the server chooses passes through, with the server's own trailer: as a
/// trailers-only response (unary) and after data (server streaming).
fn a_status_the_server_chooses_passes_through_with_its_trailer(g: &mut Grpc) -> Result<()> {
    let mesh = &g.mesh;
    let tally = &mut g.tally;
    let lines = client(mesh, tally, GRPC, 3, &["--kind", "unary", "--status", "9"])?;
    for l in &lines {
        assert_eq!(l["code"], 9, "{l}");
        assert!(
            l["trailers"][SERVER_HEADER].is_string(),
            "server trailer: {l}"
        );
    }
    let lines = client(
        mesh,
        tally,
        GRPC,
        2,
        &["--kind", "server-stream", "--count", "3", "--status", "5"],
    )?;
    for l in &lines {
        assert_eq!(l["code"], 5, "{l}");
        assert_eq!(l["replies"], 3, "data before the status: {l}");
        assert!(
            l["trailers"][SERVER_HEADER].is_string(),
            "server trailer: {l}"
        );
    }
    Ok(())
}

/// AuthorizationPolicy DENY on the Unary method path: the client sees PERMISSION_DENIED
/// (HTTP 200, trailers-only, as Envoy answers gRPC); other methods with the same header
/// pass.
fn an_authorization_policy_denies_one_method_with_permission_denied(g: &mut Grpc) -> Result<()> {
    let mesh = &g.mesh;
    let tally = &mut g.tally;
    let lines = client(
        mesh,
        tally,
        GRPC,
        4,
        &["--kind", "unary", "--metadata", "x-deny=yes"],
    )?;
    for l in &lines {
        assert_eq!(l["code"], 7, "{l}");
        assert_eq!(l["message"], "RBAC: access denied", "{l}");
        assert_eq!(l["trailers"]["content-type"], "application/grpc", "{l}");
    }
    let lines = client(
        mesh,
        tally,
        GRPC,
        2,
        &["--kind", "server-stream", "--metadata", "x-deny=yes"],
    )?;
    all_ok(&lines)?;
    Ok(())
}

/// RequestAuthentication: a valid token passes (and is not forwarded), one signed by
/// another key is UNAUTHENTICATED.
fn a_valid_jwt_passes_and_a_forged_one_is_unauthenticated(g: &mut Grpc) -> Result<()> {
    let mesh = &g.mesh;
    let tally = &mut g.tally;
    let bearer = format!("authorization=Bearer {}", g.good_token);
    let lines = client(
        mesh,
        tally,
        GRPC,
        2,
        &["--kind", "unary", "--metadata", &bearer],
    )?;
    all_ok(&lines)?;
    for l in &lines {
        assert!(
            l["echoed"].get("authorization").is_none(),
            "token removed: {l}"
        );
    }
    let bearer = format!("authorization=Bearer {}", g.forged_token);
    let lines = client(
        mesh,
        tally,
        GRPC,
        3,
        &["--kind", "bidi", "--metadata", &bearer],
    )?;
    for l in &lines {
        assert_eq!(l["code"], 16, "{l}");
        assert_eq!(l["message"], "Jwt verification fails", "{l}");
    }
    Ok(())
}

/// An HTTPRoute's request timeout on a gRPC call: UNAVAILABLE, as Envoy maps its 504 (`UT`);
/// a call within the timeout passes.
fn a_route_timeout_is_unavailable_and_a_faster_call_passes(g: &mut Grpc) -> Result<()> {
    let mesh = &g.mesh;
    let tally = &mut g.tally;
    let lines = client(
        mesh,
        tally,
        SLOW,
        2,
        &["--kind", "unary", "--delay-ms", "3000"],
    )?;
    for l in &lines {
        assert_eq!(l["code"], 14, "{l}");
        assert_eq!(l["message"], "upstream request timeout", "{l}");
    }
    let lines = client(
        mesh,
        tally,
        SLOW,
        2,
        &["--kind", "unary", "--delay-ms", "10"],
    )?;
    all_ok(&lines)?;
    Ok(())
}

/// No endpoint behind the waypoint: UNAVAILABLE.
fn no_endpoint_behind_the_waypoint_is_unavailable(g: &mut Grpc) -> Result<()> {
    let mesh = &g.mesh;
    let tally = &mut g.tally;
    let lines = client(mesh, tally, EMPTY, 2, &["--kind", "unary"])?;
    for l in &lines {
        assert_eq!(l["code"], 14, "{l}");
        assert_eq!(l["message"], "no healthy upstream", "{l}");
    }
    Ok(())
}

/// GRPCRoute: ServerStream to grpc-a, `x-canary: yes` to grpc-a (with header filters),
/// everything else to grpc-bc.
fn a_grpc_route_routes_by_method_and_header(g: &mut Grpc) -> Result<()> {
    let mesh = &g.mesh;
    let tally = &mut g.tally;
    mesh.write_yaml("route.yaml", ROUTE)?;
    wait_until("the GRPCRoute to apply", ROUTE_WAIT, || {
        let lines = client(mesh, tally, GRPC, 6, &["--kind", "unary"])?;
        Ok(servers(&lines).keys().all(|s| s == "b" || s == "c"))
    })?;
    let lines = client(mesh, tally, GRPC, 10, &["--kind", "unary"])?;
    all_ok(&lines)?;
    let seen = servers(&lines);
    assert_eq!(
        seen.keys().map(String::as_str).collect::<Vec<_>>(),
        ["b", "c"],
        "the rest goes to grpc-bc, balanced: {seen:?}"
    );
    let lines = client(
        mesh,
        tally,
        GRPC,
        6,
        &["--kind", "server-stream", "--count", "2"],
    )?;
    all_ok(&lines)?;
    assert_eq!(
        servers(&lines).keys().collect::<Vec<_>>(),
        ["a"],
        "method match"
    );
    let lines = client(
        mesh,
        tally,
        GRPC,
        6,
        &[
            "--kind",
            "bidi",
            "--count",
            "2",
            "--metadata",
            "x-canary=yes",
        ],
    )?;
    all_ok(&lines)?;
    assert_eq!(
        servers(&lines).keys().collect::<Vec<_>>(),
        ["a"],
        "header match"
    );
    for l in &lines {
        assert_eq!(
            l["echoed"]["x-routed"], "canary",
            "request header filter: {l}"
        );
        assert_eq!(
            l["headers"]["x-route"], "canary",
            "response header filter: {l}"
        );
    }
    let lines = client(
        mesh,
        tally,
        GRPC,
        4,
        &["--kind", "client-stream", "--metadata", "x-canary=no"],
    )?;
    all_ok(&lines)?;
    assert!(
        servers(&lines).keys().all(|s| s == "b" || s == "c"),
        "{:?}",
        servers(&lines)
    );
    Ok(())
}

/// A method no rule of the attached GRPCRoute matches: UNIMPLEMENTED (the 404 `NR`);
/// the method it routes is served by grpc-a although grpc-empty has no endpoint.
fn a_method_no_grpc_route_matches_is_unimplemented(g: &mut Grpc) -> Result<()> {
    let mesh = &g.mesh;
    let tally = &mut g.tally;
    let lines = client(mesh, tally, EMPTY, 2, &["--kind", "unary"])?;
    for l in &lines {
        assert_eq!(l["code"], 12, "{l}");
        assert_eq!(l["message"], "route not found", "{l}");
    }
    let lines = client(mesh, tally, EMPTY, 2, &["--kind", "server-stream"])?;
    all_ok(&lines)?;
    assert_eq!(servers(&lines).keys().collect::<Vec<_>>(), ["a"]);
    Ok(())
}

/// Metrics: one istio_requests_total sample per call, by the gRPC status the client saw;
/// the waypoint's own replies are HTTP 200 with their gRPC status and flag.
fn metrics_count_every_call_by_grpc_status(g: &mut Grpc) -> Result<()> {
    let mesh = &g.mesh;
    let tally = &mut g.tally;
    let metrics = mesh.waypoint_metrics(WAYPOINT)?;
    let requests = |labels: &[(&str, &str)]| prom::sum(&metrics, "istio_requests_total", labels);
    for (code, calls) in &tally.0 {
        let code = code.to_string();
        assert_eq!(
            requests(&[
                ("grpc_response_status", &code),
                ("request_protocol", "grpc")
            ]),
            *calls as f64,
            "grpc_response_status {code}: {metrics}"
        );
    }
    let total: usize = tally.0.values().sum();
    assert_eq!(
        requests(&[("request_protocol", "grpc")]),
        total as f64,
        "{metrics}"
    );
    // The waypoint's own replies: HTTP 200 with the gRPC status, the flag names the cause.
    for (status, flag, calls) in [
        ("7", "DENY", 4.0),
        ("16", "JWT", 3.0),
        ("14", "UT", 2.0),
        ("14", "UH", 2.0),
        ("12", "NR", 2.0),
    ] {
        let labels = [
            ("grpc_response_status", status),
            ("response_code", "200"),
            ("response_flags", flag),
        ];
        assert_eq!(requests(&labels), calls, "{labels:?}: {metrics}");
    }
    eprintln!("calls by gRPC status: {:?}", tally.0);
    Ok(())
}
