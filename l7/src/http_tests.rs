//! The driver: phases run in their order, each one's local reply ends the request. A
//! request that several phases would refuse is answered by the first of them.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

use super::*;
use crate::engine::testing::{conn, inputs, model};

/// Every policy denies everything for `app/web`.
const DENY_ALL: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: app}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  action: DENY
  rules: [{}]
"#;

/// Routes only `/known` of `app/web` (to `app/api`, which has an endpoint).
const ONE_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: web, namespace: app}
spec:
  parentRefs: [{group: "", kind: Service, name: web, port: 80}]
  rules: [{matches: [{path: {type: Exact, value: /known}}], backendRefs: [{name: api, port: 80}]}]
"#;

/// A Service of the mesh without endpoints.
const EMPTY: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: app, labels: {istio.io/use-waypoint: wp}}
spec: {clusterIP: 10.96.0.9, selector: {app: none}, ports: [{name: http, port: 80}]}
"#;

/// Sends every request for `app/web` to [`EMPTY`].
const TO_EMPTY: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: app}
spec:
  hosts: [web]
  http: [{route: [{destination: {host: empty}}]}]
"#;

/// [`TO_EMPTY`], aborting every request with 418.
const ABORT_TO_EMPTY: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: app}
spec:
  hosts: [web]
  http: [{fault: {abort: {httpStatus: 418, percentage: {value: 100}}}, route: [{destination: {host: empty}}]}]
"#;

const JWT: &str = r#"
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: {name: jwt, namespace: app}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  jwtRules:
  - issuer: https://issuer
    jwks: '{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}'
"#;

/// What the waypoint answers to `req` on a tunnel to `app/web:80` with `docs` loaded:
/// status, `grpc-status` and body.
async fn answer(docs: &[&str], req: Request<Empty<Bytes>>) -> (u16, Option<String>, String) {
    let (client, server) = tokio::io::duplex(64 * 1024);
    let inputs = inputs(model(docs));
    tokio::spawn(serve(server, false, Arc::new(conn()), inputs));
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(client))
        .await
        .expect("handshake");
    tokio::spawn(connection);
    let rsp = sender.send_request(req).await.expect("a response");
    let status = rsp.status().as_u16();
    let grpc = rsp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let body = rsp.into_body().collect().await.expect("body").to_bytes();
    (status, grpc, String::from_utf8_lossy(&body).into_owned())
}

fn get(path: &str) -> http::request::Builder {
    Request::get(path).header("host", "web.app")
}

fn check(got: (u16, Option<String>, String), status: u16, body: &str) {
    assert_eq!((got.0, got.2.as_str()), (status, body), "{got:?}");
}

#[tokio::test]
async fn the_first_phase_that_refuses_a_request_answers_it() {
    let empty = || Empty::new();
    // downstream before authorization: a path that cannot be normalised.
    let got = answer(&[DENY_ALL], get("/a%2Fb").body(empty()).expect("request")).await;
    check(got, 400, "bad request");
    // authentication before authorization: an invalid token.
    let req = get("/")
        .header("authorization", "Bearer not.a.jwt")
        .body(empty())
        .expect("request");
    let got = answer(&[JWT, DENY_ALL], req).await;
    check(got, 401, "Jwt verification fails");
    // authorization before routing.
    let got = answer(
        &[DENY_ALL, ONE_ROUTE],
        get("/unknown").body(empty()).expect("request"),
    )
    .await;
    check(got, 403, "RBAC: access denied");
    // routing.
    let got = answer(
        &[ONE_ROUTE],
        get("/unknown").body(empty()).expect("request"),
    )
    .await;
    check(got, 404, "route not found");
    // fault before endpoint selection.
    let got = answer(
        &[EMPTY, ABORT_TO_EMPTY],
        get("/").body(empty()).expect("request"),
    )
    .await;
    check(got, 418, "fault filter abort");
    // endpoint selection.
    let got = answer(&[EMPTY, TO_EMPTY], get("/").body(empty()).expect("request")).await;
    check(got, 503, "no healthy upstream");
}

#[tokio::test]
async fn a_grpc_client_gets_local_replies_as_grpc_statuses() {
    let req = Request::post("/pkg.Svc/Method")
        .header("host", "web.app")
        .header("content-type", "application/grpc")
        .body(Empty::new())
        .expect("request");
    let got = answer(&[ONE_ROUTE], req).await;
    assert_eq!(got, (200, Some("12".to_string()), String::new()));
}

/// Denies host `secret.internal` and paths under `/admin` of `app/web`.
const GUARDS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: guards, namespace: app}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  action: DENY
  rules:
  - to: [{operation: {hosts: ["secret.internal"]}}]
  - to: [{operation: {paths: ["/admin*"]}}]
"#;

/// The status line's code the served HTTP/1.1 stack answers to the bytes `raw` (written as
/// they are: what a hostile client sends), with `docs` loaded.
async fn raw_status(docs: &[&str], raw: &[u8]) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    tokio::spawn(serve(server, false, Arc::new(conn()), inputs(model(docs))));
    client.write_all(raw).await.expect("write");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n") {
        let n = client.read(&mut byte).await.expect("read");
        assert!(n == 1, "closed without a status line after {head:?}");
        head.push(byte[0]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line {line:?}"))
}

#[tokio::test]
async fn raw_heads_a_backend_could_read_differently_are_refused_before_policy() {
    // (what, bytes, status): hyper answers some itself, the downstream phase the rest; the
    // policy (403) only sees requests with one authority, method and path.
    let cases: [(&str, &[u8], u16); 18] = [
        ("obs-fold", b"GET / HTTP/1.1\r\nhost: web.app\r\nx-a: 1\r\n 2\r\n\r\n", 400),
        ("space before the colon", b"GET / HTTP/1.1\r\nhost : secret.internal\r\n\r\n", 400),
        ("NUL in a value", b"GET / HTTP/1.1\r\nhost: web.app\r\nx-a: 1\x002\r\n\r\n", 400),
        ("bare CR in a value", b"GET / HTTP/1.1\r\nhost: web.app\r\nx-a: 1\r2\r\n\r\n", 400),
        ("two lengths", b"POST / HTTP/1.1\r\nhost: web.app\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab", 400),
        ("a listed length", b"POST / HTTP/1.1\r\nhost: web.app\r\ncontent-length: 1, 1\r\n\r\na", 400),
        ("gzip then chunked", b"POST / HTTP/1.1\r\nhost: web.app\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 400),
        ("not chunked", b"POST / HTTP/1.1\r\nhost: web.app\r\ntransfer-encoding: identity\r\n\r\n", 400),
        ("lowercase method", b"get / HTTP/1.1\r\nhost: web.app\r\n\r\n", 400),
        ("two hosts", b"GET / HTTP/1.1\r\nhost: web.app\r\nhost: secret.internal\r\n\r\n", 400),
        ("userinfo in host", b"GET / HTTP/1.1\r\nhost: a@secret.internal\r\n\r\n", 400),
        ("backslash", b"GET /public\\..\\admin HTTP/1.1\r\nhost: web.app\r\n\r\n", 400),
        ("encoded slash", b"GET /public%2F..%2Fadmin HTTP/1.1\r\nhost: web.app\r\n\r\n", 400),
        ("dot segments", b"GET /public/../admin HTTP/1.1\r\nhost: web.app\r\n\r\n", 403),
        ("denied host", b"GET / HTTP/1.1\r\nhost: secret.internal\r\n\r\n", 403),
        ("denied host, other case and port", b"GET / HTTP/1.1\r\nhost: Secret.INTERNAL:80\r\n\r\n", 403),
        ("absolute form names the denied host", b"GET http://secret.internal/ HTTP/1.1\r\nhost: web.app\r\n\r\n", 403),
        ("fragment cut before policy", b"GET /admin#x HTTP/1.1\r\nhost: web.app\r\n\r\n", 403),
    ];
    for (what, raw, status) in cases {
        assert_eq!(raw_status(&[GUARDS], raw).await, status, "{what}");
    }
}

#[tokio::test]
async fn heads_the_http_stack_refuses_itself_are_counted() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let inputs = inputs(model(&[]));
    for (raw, reason) in [
        (
            &b"GET / HTTP/1.1\r\nhost: web.app\r\nx-a: 1\r\n 2\r\n\r\n"[..],
            "malformed_request",
        ),
        (
            &b"GET / HTTP/1.1\r\nhost : web.app\r\n\r\n"[..],
            "malformed_request",
        ),
    ] {
        let before = inputs.http_metrics.downstream_errors(reason);
        let (mut client, server) = tokio::io::duplex(64 * 1024);
        let served = tokio::spawn(serve(server, false, Arc::new(conn()), inputs.clone()));
        client.write_all(raw).await.expect("write");
        let mut answer = Vec::new();
        client.read_to_end(&mut answer).await.expect("read");
        assert!(
            answer.starts_with(b"HTTP/1.1 400"),
            "{:?}",
            String::from_utf8_lossy(&answer)
        );
        served.await.expect("served");
        assert_eq!(
            inputs.http_metrics.downstream_errors(reason),
            before + 1,
            "{raw:?}"
        );
    }
    // A client that only goes away is not counted.
    let (client, server) = tokio::io::duplex(64 * 1024);
    let served = tokio::spawn(serve(server, false, Arc::new(conn()), inputs.clone()));
    drop(client);
    served.await.expect("served");
    assert_eq!(
        inputs.http_metrics.downstream_errors("malformed_request"),
        2
    );
}
