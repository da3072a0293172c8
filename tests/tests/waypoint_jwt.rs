//! RequestAuthentication through a waypoint, end to end: a client pod on n1 calls Service
//! `echo` (labelled `istio.io/use-waypoint`) with and without JWTs signed here (ES256, keys
//! generated per run); the waypoint on n2 verifies them (inline JWKS, and a `jwksUri` served
//! by a tiny HTTP server in pod `keys/jwks`, outside the mesh) and authorizes on
//! `requestPrincipals` and `request.auth.claims[groups]`.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use e2e::jwt::Key;
use e2e::prom;
use e2e::waypoint::{log_tail, waypoint_mesh, waypoint_service, CLIENT, WAYPOINT};
use e2e::{scenarios, wait_until, Ambient, ChildGuard, Mesh, Pod, Suite};
use nix::sys::socket::{shutdown, Shutdown};
use serde_json::{json, Value};

const JWKS_POD: &str = "keys/jwks";
const JWKS_PORT: u16 = 8000;
const ECHO_VIP: &str = "10.96.0.30";

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
    waypoint_mesh(test)
        .namespace("keys", Ambient::No)
        .pod(Pod::echo_server("server", "n2"))
        .pod(Pod::new("keys", "jwks").on("n1"))
        .service(waypoint_service("echo", ECHO_VIP, ("app", "echo")))
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
    /// The listening socket, shut down on drop to end the blocked `accept`.
    listener: TcpListener,
    thread: Option<JoinHandle<()>>,
}

impl JwksServer {
    fn start(mesh: &Mesh, pod: &str, body: String) -> Result<JwksServer> {
        let listener = mesh
            .in_pod(pod, || TcpListener::bind(("0.0.0.0", JWKS_PORT)))?
            .context("bind the jwks server")?;
        let accepting = listener.try_clone()?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            for conn in accepting.incoming() {
                if flag.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut s) = conn else { continue };
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
        });
        Ok(JwksServer {
            stop,
            listener,
            thread: Some(thread),
        })
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Shutting a listening socket down wakes the thread blocked in `accept` (EINVAL).
        let _ = shutdown(self.listener.as_raw_fd(), Shutdown::Read);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// What the scenarios share: the mesh, the local and remote signing keys, and tokens for
/// alice (no groups) and bob (group `admins`) signed by the local key.
struct Jwt {
    local: Key,
    remote: Key,
    alice: String,
    bob: String,
    wp: ChildGuard,
    _server: ChildGuard,
    /// Last: dropped once the processes in it are gone.
    mesh: Mesh,
}

impl Jwt {
    fn build() -> Result<Self> {
        let mesh = mesh("waypoint_jwt")?;
        let local = Key::new("local-1")?;
        let remote = Key::new("remote-1")?;
        let jwks_ip = mesh.pod_ip(JWKS_POD)?.to_string();
        mesh.write_yaml("jwt.yaml", &config(&local.jwks(), &jwks_ip))?;
        let server = mesh.spawn_echo("default/server", 8080, "server")?;
        let wp = mesh.spawn_default_waypoint()?;
        Ok(Jwt {
            alice: local.sign(&claims("issuer", "alice", &[]))?,
            bob: local.sign(&claims("issuer", "bob", &["admins"]))?,
            local,
            remote,
            wp,
            _server: server,
            mesh,
        })
    }
}

impl Suite for Jwt {
    fn explain(&self, err: anyhow::Error) -> anyhow::Error {
        log_tail(&self.wp, err)
    }
}

/// One mesh for all scenarios; they run in order, and the JWKS server is started only by the
/// last (the one that checks the remote keys are fetched once it answers).
fn main() -> ExitCode {
    e2e::scenario::main(
        Jwt::build,
        &scenarios![
            without_a_token_public_paths_pass_and_secure_ones_are_denied,
            an_allowed_principal_passes_and_only_the_token_payload_is_forwarded,
            a_groups_claim_opens_what_the_principal_alone_does_not,
            invalid_tokens_are_refused_with_401_everywhere_and_counted,
            jwks_uri_fails_closed_until_its_server_answers,
        ],
        &[],
    )
}

/// No token: unauthenticated, fine where no principal is required, 403 where one is; a
/// client's copy of the output header is dropped.
fn without_a_token_public_paths_pass_and_secure_ones_are_denied(j: &mut Jwt) -> Result<()> {
    let mesh = &j.mesh;
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
    Ok(())
}

/// Alice may; the token is not forwarded, its payload is.
fn an_allowed_principal_passes_and_only_the_token_payload_is_forwarded(j: &mut Jwt) -> Result<()> {
    let (status, body) = get(&j.mesh, "/secure/data", &bearer(&j.alice))?;
    assert_eq!(status, 200, "{body}");
    let reply: Value = serde_json::from_str(&body)?;
    assert!(reply["headers"]["authorization"].is_null(), "{reply}");
    let payload = j.alice.split('.').nth(1).context("payload")?;
    assert_eq!(reply["headers"]["x-jwt-payload"], payload, "{reply}");
    Ok(())
}

/// Bob is authenticated but not allowed on /secure; his groups claim opens /admins.
fn a_groups_claim_opens_what_the_principal_alone_does_not(j: &mut Jwt) -> Result<()> {
    let mesh = &j.mesh;
    assert_eq!(get(mesh, "/secure", &bearer(&j.bob))?.0, 403);
    assert_eq!(get(mesh, "/admins", &bearer(&j.bob))?.0, 200);
    assert_eq!(get(mesh, "/admins", &bearer(&j.alice))?.0, 403);
    assert_eq!(get(mesh, "/admins", &[])?.0, 403);
    Ok(())
}

/// Invalid tokens: 401 wherever they are sent, even to /public, counted by reason.
fn invalid_tokens_are_refused_with_401_everywhere_and_counted(j: &mut Jwt) -> Result<()> {
    let (mesh, local, alice) = (&j.mesh, &j.local, &j.alice);
    let payload = alice.split('.').nth(1).context("payload")?;
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

    Ok(())
}

/// jwksUri: while the server is down, remote tokens are refused (fail closed); once it is
/// up, the next retry fetches the keys and the token is accepted.
fn jwks_uri_fails_closed_until_its_server_answers(j: &mut Jwt) -> Result<()> {
    let (mesh, remote) = (&j.mesh, &j.remote);
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
