//! Refused policies fail closed at the waypoint: the whole waypoint in process with
//! `--config-source kube` against a fake API server (`e2e::apiserver`), the shared topology
//! of the in-process tier, and real HBONE clients. A *new* AuthorizationPolicy targeting
//! the `echo` Service that the translator refuses makes `echo` answer 403 until it is fixed
//! or deleted; a refused RequestAuthentication makes requests carrying a token it would have
//! checked 401, and leaves requests without one alone. One test: the mesh sets `KUBECONFIG`
//! for the process.

// This binary uses only part of the shared harness.
#[allow(dead_code)]
mod support;

use anyhow::{bail, Result};
use e2e::apiserver::FakeApiServer;
use e2e::jwt::Key;
use serde_json::{json, Value};
use support::{identity, Mesh, EVENTUALLY};
use tracing::info;

fn echo_policy(rules: Value) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "echo-allow", "namespace": "app"},
        "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "echo"}],
                 "action": "ALLOW", "rules": rules}})
}

/// Polls until `status` is what `GET path` (as `app/sleep`, with `headers`) answers.
async fn answers(mesh: &Mesh, path: &str, headers: &[(&str, &str)], status: u16) -> Result<()> {
    let deadline = std::time::Instant::now() + EVENTUALLY;
    loop {
        let reply = mesh.sleep()?.get_with(path, headers).await?;
        if reply.status == status {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!("{path} still answers {}: {reply:?}", reply.status);
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

fn failed_closed(metrics: &str) -> f64 {
    e2e::prom::sum(metrics, "mesh_policies_failed_closed", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_policies_fail_closed_at_the_waypoint_until_fixed_or_deleted() -> Result<()> {
    let server = FakeApiServer::start().await?;
    let mesh = Mesh::start_kube(&server, "").await?;
    let other = || mesh.client(identity("app", "other"));
    assert_eq!(mesh.sleep()?.get("/open").await?.status, 200);

    info!("a new ALLOW policy on echo with a misspelt field: echo denies all");
    server.apply(echo_policy(
        json!([{"from": [{"source": {"principal": ["cluster.local/ns/app/sa/sleep"]}}]}]),
    ))?;
    answers(&mesh, "/closed", &[], 403).await?;
    assert_eq!(other()?.get("/closed").await?.status, 403);
    let dump = mesh.config_dump().await?;
    let entry = &dump["model"]["refused_policies"][0];
    assert_eq!(entry["name"], "echo-allow", "{dump}");
    assert_eq!(entry["effect"], "deny_all");
    assert_eq!(entry["scope"]["target_refs"][0]["name"], "echo");
    assert!(entry["reason"]
        .as_str()
        .is_some_and(|r| r.contains("principal")));
    assert_eq!(failed_closed(&mesh.metrics().await?), 1.0);

    info!("fixed: it allows sleep only");
    server.apply(echo_policy(
        json!([{"from": [{"source": {"principals": ["cluster.local/ns/app/sa/sleep"]}}]}]),
    ))?;
    answers(&mesh, "/fixed", &[], 200).await?;
    assert_eq!(other()?.get("/fixed").await?.status, 403);
    assert_eq!(failed_closed(&mesh.metrics().await?), 0.0);

    info!("deleted: open again");
    server.delete("AuthorizationPolicy", "app", "echo-allow")?;
    let deadline = std::time::Instant::now() + EVENTUALLY;
    while other()?.get("/deleted").await?.status != 200 {
        anyhow::ensure!(std::time::Instant::now() < deadline, "still denied");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }

    info!("a refused RequestAuthentication: its issuer's tokens are 401, no token is fine");
    let key = Key::new("k1")?;
    server.apply(
        json!({"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": "app"},
        "spec": {"targetRefs": [{"kind": "Service", "group": "", "name": "echo"}],
                 "jwtRules": [{"issuer": "issuer", "jwks": serde_json::to_string(&key.jwks())?,
                               "fromCookies": ["session"]}]}}),
    )?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let token = |iss: &str| -> Result<String> {
        let claims =
            json!({"iss": iss, "sub": "alice", "aud": "echo", "iat": now, "exp": now + 600});
        Ok(format!("Bearer {}", key.sign(&claims)?))
    };
    let (mine, foreign) = (token("issuer")?, token("someone-else")?);
    answers(&mesh, "/jwt", &[("authorization", &mine)], 401).await?;
    assert_eq!(mesh.sleep()?.get("/jwt").await?.status, 200, "no token");
    let reply = mesh
        .sleep()?
        .get_with("/jwt", &[("authorization", &foreign)])
        .await?;
    assert_eq!(reply.status, 200, "another issuer's token: {reply:?}");
    let refused = [("response_code", "401"), ("response_flags", "JWT")];
    assert!(mesh.requests(&refused, 1.0).await? >= 1.0);
    let dump = mesh.config_dump().await?;
    assert_eq!(
        dump["model"]["refused_policies"][0]["effect"], "reject_tokens",
        "{dump}"
    );

    server.delete("RequestAuthentication", "app", "jwt")?;
    answers(&mesh, "/jwt", &[("authorization", &mine)], 200).await?;
    mesh.stop().await
}
