//! RequestAuthentication through a waypoint, end to end: a client pod on n1 calls Service
//! `echo` (labelled `istio.io/use-waypoint`) with and without JWTs signed here (ES256, keys
//! generated per run); the waypoint on n2 verifies them (inline JWKS, and a `jwksUri` served
//! by a tiny HTTP server in pod `keys/jwks`, outside the mesh) and authorizes on
//! `requestPrincipals` and `request.auth.claims[groups]`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use e2e::prom;
use e2e::waypoint::{gateway_yaml, waypoint_pod};
use e2e::{wait_until, Ambient, ChildGuard, Mesh, Pod, Service};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};

const CLIENT: &str = "default/client";
const WAYPOINT: &str = "default/waypoint";
const JWKS_POD: &str = "keys/jwks";
const JWKS_PORT: u16 = 8000;
const ECHO_VIP: &str = "10.96.0.30";

struct Key {
    pair: EcdsaKeyPair,
    kid: &'static str,
}

impl Key {
    fn new(kid: &'static str) -> Result<Key> {
        let rng = SystemRandom::new();
        let pk8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .map_err(|_| anyhow::anyhow!("generate key"))?;
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pk8.as_ref(), &rng)
            .map_err(|_| anyhow::anyhow!("load key"))?;
        Ok(Key { pair, kid })
    }

    fn jwks(&self) -> String {
        let p = self.pair.public_key().as_ref();
        json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": self.kid, "use": "sig",
            "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65])}]})
        .to_string()
    }

    fn sign(&self, claims: &Value) -> Result<String> {
        let header = json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .map_err(|_| anyhow::anyhow!("sign"))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn claims(iss: &str, sub: &str, groups: &[&str]) -> Value {
    json!({"iss": iss, "sub": sub, "aud": "echo", "exp": now() + 600, "iat": now(),
           "groups": groups})
}

fn config(inline_jwks: &str, jwks_ip: &str) -> String {
    let inline = serde_json::to_string(inline_jwks).unwrap_or_default();
    format!(
        r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: echo}}]
  jwtRules:
  - issuer: issuer
    audiences: [echo]
    jwks: {inline}
    outputPayloadToHeader: x-jwt-payload
  - issuer: remote-issuer
    jwksUri: http://{jwks_ip}:{JWKS_PORT}/jwks.json
    fromHeaders: [{{name: x-token}}]
    forwardOriginalToken: true
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: jwt-rules, namespace: default}}
spec:
  targetRefs: [{{kind: Service, group: "", name: echo}}]
  action: ALLOW
  rules:
  - to: [{{operation: {{notPaths: ["/secure*", "/admins*"]}}}}]
  - from: [{{source: {{requestPrincipals: ["issuer/alice", "remote-issuer/alice"]}}}}]
    to: [{{operation: {{paths: ["/secure*"]}}}}]
  - to: [{{operation: {{paths: ["/admins*"]}}}}]
    when: [{{key: "request.auth.claims[groups]", values: ["admins"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: servers, namespace: default}}
spec:
  selector: {{matchLabels: {{app: echo}}}}
  action: ALLOW
  rules:
  - from: [{{source: {{principals: [cluster.local/ns/default/sa/waypoint]}}}}]
"#
    )
}

fn mesh(test: &str) -> Result<Mesh> {
    Mesh::builder(test)
        .node("n1")
        .node("n2")
        .namespace("default", Ambient::Yes)
        .namespace("keys", Ambient::No)
        .pod(
            Pod::new("default", "client")
                .on("n1")
                .service_account("client"),
        )
        .pod(waypoint_pod("default", "waypoint", "n2"))
        .pod(
            Pod::new("default", "server")
                .on("n2")
                .service_account("server")
                .labels([("app", "echo")]),
        )
        .pod(Pod::new("keys", "jwks").on("n1"))
        .service(
            Service::new("default", "echo")
                .vip(ECHO_VIP)
                .named_port("http", 80, 8080)
                .selector([("app", "echo")])
                .labels([("istio.io/use-waypoint", "waypoint")]),
        )
        .yaml(
            "waypoint.yaml",
            &gateway_yaml("default", "waypoint", "service"),
        )
        .build()
}

/// One curl from the client pod: status and body.
fn get(mesh: &Mesh, path: &str, headers: &[String]) -> Result<(u16, String)> {
    const MARK: &str = "\n--status--";
    let fmt = format!("{MARK}%{{http_code}}");
    let url = format!("http://{ECHO_VIP}{path}");
    let mut argv = vec!["curl", "-sS", "-m", "10", "-w", &fmt];
    for h in headers {
        argv.extend(["-H", h.as_str()]);
    }
    argv.push(&url);
    let out = mesh.exec_ok(CLIENT, &argv)?;
    let (body, status) = out.rsplit_once(MARK).context("curl output")?;
    Ok((status.trim().parse()?, body.to_string()))
}

fn bearer(token: &str) -> Vec<String> {
    vec![format!("authorization: Bearer {token}")]
}

/// A JWKS document served over HTTP/1.1 from inside a pod's network namespace until dropped.
struct JwksServer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl JwksServer {
    fn start(mesh: &Mesh, pod: &str, body: String) -> Result<JwksServer> {
        let listener = mesh
            .in_pod(pod, || TcpListener::bind(("0.0.0.0", JWKS_PORT)))?
            .context("bind the jwks server")?;
        listener.set_nonblocking(true)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut s, _)) => {
                        let _ = s.set_nonblocking(false);
                        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
                        let mut buf = [0u8; 4096];
                        let _ = s.read(&mut buf);
                        let rsp = format!(
                            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\
                             content-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        );
                        let _ = s.write_all(rsp.as_bytes());
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(JwksServer {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
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

#[test]
fn jwt_authentication_and_request_principals_at_the_waypoint() -> Result<()> {
    let mesh = mesh("waypoint_jwt")?;
    let local = Key::new("local-1")?;
    let remote = Key::new("remote-1")?;
    let jwks_ip = mesh.pod_ip(JWKS_POD)?.to_string();
    mesh.write_yaml("jwt.yaml", &config(&local.jwks(), &jwks_ip))?;
    let _server = mesh.spawn_echo("default/server", 8080, "server")?;
    let wp = mesh.spawn_waypoint(WAYPOINT, "default", "waypoint", "waypoint")?;
    with_log(&wp, checks(&mesh, &local, &remote))
}

fn checks(mesh: &Mesh, local: &Key, remote: &Key) -> Result<()> {
    let alice = local.sign(&claims("issuer", "alice", &[]))?;
    let bob = local.sign(&claims("issuer", "bob", &["admins"]))?;

    // No token: unauthenticated, fine where no principal is required, 403 where one is.
    let forged = vec!["x-jwt-payload: forged".to_string()];
    let (status, body) = get(mesh, "/public", &forged)?;
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body)?;
    assert!(
        reply["headers"]["x-jwt-payload"].is_null(),
        "a client's copy of the output header is dropped: {reply}"
    );
    assert_eq!(
        get(mesh, "/secure", &[])?,
        (403, "RBAC: access denied".into())
    );

    // Alice may; the token is not forwarded, its payload is.
    let (status, body) = get(mesh, "/secure/data", &bearer(&alice))?;
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body)?;
    assert!(reply["headers"]["authorization"].is_null(), "{reply}");
    let payload = alice.split('.').nth(1).context("payload")?;
    assert_eq!(reply["headers"]["x-jwt-payload"], payload, "{reply}");

    // Bob is authenticated but not allowed on /secure; his groups claim opens /admins.
    assert_eq!(get(mesh, "/secure", &bearer(&bob))?.0, 403);
    assert_eq!(get(mesh, "/admins", &bearer(&bob))?.0, 200);
    assert_eq!(get(mesh, "/admins", &bearer(&alice))?.0, 403);
    assert_eq!(get(mesh, "/admins", &[])?.0, 403);

    // Invalid tokens: 401 wherever they are sent, even to /public.
    let (h, rest) = alice.split_once('.').context("token")?;
    let (_, sig) = rest.split_once('.').context("token")?;
    let as_root = URL_SAFE_NO_PAD.encode(claims("issuer", "root", &[]).to_string());
    let tampered = format!("{h}.{as_root}.{sig}");
    let mut expired = claims("issuer", "alice", &[]);
    expired["exp"] = json!(now() - 3600);
    let expired = local.sign(&expired)?;
    let none = format!("{}.{payload}.", URL_SAFE_NO_PAD.encode(r#"{"alg":"none"}"#));
    let mut wrong_aud = claims("issuer", "alice", &[]);
    wrong_aud["aud"] = json!("other");
    let wrong_aud = local.sign(&wrong_aud)?;
    let foreign = Key::new("local-1")?.sign(&claims("issuer", "alice", &[]))?;
    for (what, token) in [
        ("tampered", &tampered),
        ("expired", &expired),
        ("alg none", &none),
        ("wrong audience", &wrong_aud),
        ("signed by another key", &foreign),
    ] {
        for path in ["/secure", "/public"] {
            let (status, body) = get(mesh, path, &bearer(token))?;
            assert_eq!(
                (status, body.as_str()),
                (401, "Jwt verification fails"),
                "{what} on {path}"
            );
        }
    }
    let metrics = mesh.waypoint_metrics(WAYPOINT)?;
    for reason in ["signature", "expired", "malformed", "audience"] {
        assert!(
            prom::sum(
                &metrics,
                "waypoint_jwt_rejected_total",
                &[("reason", reason)]
            ) >= 1.0,
            "{reason}: {metrics}"
        );
    }
    assert_eq!(
        prom::sum(
            &metrics,
            "istio_requests_total",
            &[("response_code", "401"), ("response_flags", "JWT")]
        ),
        10.0,
        "{metrics}"
    );

    // jwksUri: while the server is down, remote tokens are refused (fail closed).
    let remote_alice = remote.sign(&claims("remote-issuer", "alice", &[]))?;
    let x_token = vec![format!("x-token: {remote_alice}")];
    assert_eq!(get(mesh, "/secure", &x_token)?.0, 401);
    wait_until(
        "the waypoint to count a failed jwks fetch",
        Duration::from_secs(15),
        || {
            let m = mesh.waypoint_metrics(WAYPOINT)?;
            Ok(prom::sum(&m, "waypoint_jwks_fetches_total", &[("result", "connect")]) >= 1.0)
        },
    )?;
    // The server comes up: the next retry fetches the keys and the token is accepted (and,
    // with forwardOriginalToken, forwarded).
    let _jwks = JwksServer::start(mesh, JWKS_POD, remote.jwks())?;
    wait_until(
        "remote tokens to be accepted",
        Duration::from_secs(30),
        || Ok(get(mesh, "/secure", &x_token)?.0 == 200),
    )?;
    let (status, body) = get(mesh, "/secure", &x_token)?;
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body)?;
    assert_eq!(
        reply["headers"]["x-token"],
        remote_alice.as_str(),
        "{reply}"
    );
    // A remote token signed by a key the JWKS lacks is still refused.
    let rotated = Key::new("remote-2")?.sign(&claims("remote-issuer", "alice", &[]))?;
    assert_eq!(
        get(mesh, "/secure", &[format!("x-token: {rotated}")])?.0,
        401
    );
    let metrics = mesh.waypoint_metrics(WAYPOINT)?;
    if prom::sum(&metrics, "waypoint_jwks_fetches_total", &[("result", "ok")]) < 1.0 {
        bail!("no successful jwks fetch counted: {metrics}");
    }
    Ok(())
}
