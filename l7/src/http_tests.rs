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
