//! The CA in cluster mode (`--config-source kube`) against the fake API server
//! (`e2e::apiserver`, through a kubeconfig on 127.0.0.1): callers are authenticated by the
//! API server's `TokenReview` (audience `istio-ca`), pods (node, service account, uid) come
//! from its watch. Called through the real listener with the mesh's own CA client.
//!
//! `KUBECONFIG` is process-wide: each test sets it and starts the CA under one lock (the
//! kube client reads it once, at startup), so the tests still run in parallel afterwards.

#![allow(clippy::unwrap_used)]

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use control::app::Addrs;
use control::config::Args;
use e2e::apiserver::{FakeApiServer, ReviewFailure, TokenUser, WAIT};
use mesh_model::identity::Identity;
use mesh_pki::ca_client::{CaClient, CaClientConfig, CaClientError, Fetched};
use mesh_shell::admin::Control;
use mesh_shell::process::AppHandle;
use rustls::RootCertStore;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SERVER_NAME: &str = "istiod.istio-system.svc";
const AUDIENCE: &str = "istio-ca";
const TTL: Duration = Duration::from_secs(600);

/// Held while a test points `KUBECONFIG` at its fake and starts its CA.
static KUBECONFIG: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A fake cluster and the CA watching it.
struct Cluster {
    fake: FakeApiServer,
    dir: tempfile::TempDir,
    app: AppHandle<Addrs>,
    roots: Arc<RootCertStore>,
}

fn pod(ns: &str, name: &str, uid: &str, node: &str, sa: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": name, "namespace": ns, "uid": uid},
           "spec": {"nodeName": node, "serviceAccountName": sa},
           "status": {"podIP": "10.0.0.1", "phase": "Running"}})
}

/// Two nodes: on n1 the agent `ztunnel-a`, `web-1` (demo/web) and the waypoint; on n2 the
/// agent `ztunnel-b` and `db-1` (demo/db).
fn populate(fake: &FakeApiServer) {
    for obj in [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "demo"}}),
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "istio-system"}}),
        pod("istio-system", "ztunnel-a", "u-zt-a", "n1", "ztunnel"),
        pod("istio-system", "ztunnel-b", "u-zt-b", "n2", "ztunnel"),
        pod("demo", "web-1", "u-web-1", "n1", "web"),
        pod("demo", "db-1", "u-db-1", "n2", "db"),
        pod("demo", "waypoint-1", "u-wp-1", "n1", "waypoint"),
    ] {
        fake.apply(obj).unwrap();
    }
}

impl Cluster {
    /// The CA, started against a populated fake.
    async fn start() -> Cluster {
        Self::start_with(populate).await
    }

    /// `before` runs on the fake before the CA starts.
    async fn start_with(before: impl FnOnce(&FakeApiServer)) -> Cluster {
        let fake = FakeApiServer::start().await.unwrap();
        before(&fake);
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = fake.write_kubeconfig(dir.path()).unwrap();
        let ca_dir = dir.path().join("ca");
        let argv = [
            "control",
            "--config-source",
            "kube",
            "--ca-dir",
            &ca_dir.display().to_string(),
            "--grpc-addr",
            "127.0.0.1:0",
            "--admin-addr",
            "127.0.0.1:0",
            "--metrics-addr",
            "127.0.0.1:0",
            "--readiness-addr",
            "127.0.0.1:0",
        ];
        let args = Args::try_parse_from(argv).unwrap();
        let app = {
            let _env = KUBECONFIG.lock().await;
            std::env::set_var("KUBECONFIG", &kubeconfig);
            control::app::start(args, Control::default()).await.unwrap()
        };
        let ca = mesh_pki::ca::Ca::load_or_create(&ca_dir, "cluster.local").unwrap();
        Cluster {
            fake,
            dir,
            app,
            roots: ca.root_store(),
        }
    }

    /// Registers `token` for `user` with the fake and writes it to a token file.
    fn token(&self, token: &str, user: TokenUser) -> PathBuf {
        self.fake.add_token(token, user);
        self.token_file(token)
    }

    fn token_file(&self, token: &str) -> PathBuf {
        let path = self.dir.path().join(format!("token-{token}"));
        std::fs::write(&path, token).unwrap();
        path
    }

    fn client(&self, token: &Path) -> CaClient {
        self.client_with_timeout(token, Duration::from_secs(5))
    }

    fn client_with_timeout(&self, token: &Path, timeout: Duration) -> CaClient {
        CaClient::new(CaClientConfig {
            address: format!("https://127.0.0.1:{}", self.app.addrs.grpc.port()),
            server_name: Some(SERVER_NAME.into()),
            roots: self.roots.clone(),
            token_path: token.to_path_buf(),
            timeout,
        })
        .unwrap()
    }

    async fn metrics(&self) -> String {
        get(self.app.addrs.endpoints.admin, "/metrics").await.1
    }

    async fn refused(&self, reason: &str) -> f64 {
        e2e::prom::sum(
            &self.metrics().await,
            "mesh_ca_requests_refused_total",
            &[("reason", reason)],
        )
    }

    async fn ready(&self) -> bool {
        get(self.app.addrs.endpoints.readiness, "/healthz/ready")
            .await
            .0
            == 200
    }

    /// Waits until the CA has a model from the API server.
    async fn wait_ready(&self) {
        eventually("the ca is ready", || self.ready()).await;
    }
}

/// `GET path` over HTTP/1.0 (no chunking): status and body.
async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut raw = String::new();
    tcp.read_to_string(&mut raw).await.unwrap();
    let code = raw
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = raw
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (code, body)
}

/// Polls `check` every 20 ms until it holds, failing after [`WAIT`].
async fn eventually<F, Fut>(what: &str, check: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn id(ns: &str, sa: &str) -> Identity {
    Identity::new("cluster.local", ns, sa)
}

/// The reason a refusal carries, or "issued".
fn outcome(r: &Result<Fetched, CaClientError>) -> String {
    match r {
        Ok(_) => "issued".into(),
        Err(e) => e.reason(),
    }
}

fn code(r: &Result<Fetched, CaClientError>) -> Option<tonic::Code> {
    match r {
        Err(CaClientError::Refused { code, .. }) => Some(*code),
        _ => None,
    }
}

/// The node agent of n1, its token bound to its pod (and naming its node), as the kubelet
/// projects it.
fn agent_n1() -> TokenUser {
    TokenUser::service_account("istio-system", "ztunnel", AUDIENCE)
        .bound_to_pod("ztunnel-a", "u-zt-a")
        .on_node("n1")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_agent_gets_identities_of_pods_on_its_own_node_only() {
    let cluster = Cluster::start().await;
    cluster.wait_ready().await;
    let n1 = cluster.client(&cluster.token("agent-n1", agent_n1()));
    let got = n1.fetch(&id("demo", "web"), true, TTL).await.unwrap();
    assert_eq!(got.identity, id("demo", "web"));
    assert!(
        cluster.fake.token_reviews() >= 1,
        "the ca asked the api server"
    );
    let db = n1.fetch(&id("demo", "db"), true, TTL).await;
    assert_eq!(outcome(&db), "no_such_pod_on_node", "db runs on n2");
    assert_eq!(code(&db), Some(tonic::Code::PermissionDenied));
    assert!(db.unwrap_err().is_permanent());

    // A token bound to the pod alone: the node is the pod's, as the CA learnt it.
    let pod_only = TokenUser::service_account("istio-system", "ztunnel", AUDIENCE)
        .bound_to_pod("ztunnel-b", "u-zt-b");
    let n2 = cluster.client(&cluster.token("agent-n2", pod_only));
    assert_eq!(
        outcome(&n2.fetch(&id("demo", "db"), true, TTL).await),
        "issued"
    );
    assert_eq!(
        outcome(&n2.fetch(&id("demo", "web"), true, TTL).await),
        "no_such_pod_on_node"
    );
    // A token naming only a node.
    let node_only = TokenUser::service_account("istio-system", "ztunnel", AUDIENCE).on_node("n2");
    let n2 = cluster.client(&cluster.token("agent-n2-node", node_only));
    assert_eq!(
        outcome(&n2.fetch(&id("demo", "db"), true, TTL).await),
        "issued"
    );
    assert_eq!(cluster.refused("no_such_pod_on_node").await, 2.0);
    let metrics = cluster.metrics().await;
    assert_eq!(
        e2e::prom::sum(
            &metrics,
            "mesh_ca_certificates_issued_total",
            &[("grant", "node")]
        ),
        3.0,
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_scheduled_and_deleted_at_run_time_change_what_the_agent_may_get() {
    let cluster = Cluster::start().await;
    cluster.wait_ready().await;
    let n1 = cluster.client(&cluster.token("agent-n1", agent_n1()));
    let late = id("demo", "late");
    assert_eq!(
        outcome(&n1.fetch(&late, true, TTL).await),
        "no_such_pod_on_node"
    );

    cluster
        .fake
        .apply(pod("demo", "late-1", "u-late-1", "n1", "late"))
        .unwrap();
    eventually("a pod scheduled on n1 is issuable", || async {
        outcome(&n1.fetch(&late, true, TTL).await) == "issued"
    })
    .await;

    cluster.fake.delete("Pod", "demo", "late-1").unwrap();
    eventually("a deleted pod is no longer issuable", || async {
        outcome(&n1.fetch(&late, true, TTL).await) == "no_such_pod_on_node"
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_of_a_deleted_or_recreated_agent_pod_is_rejected() {
    let cluster = Cluster::start().await;
    cluster.wait_ready().await;
    let n1 = cluster.client(&cluster.token("agent-n1", agent_n1()));
    assert_eq!(
        outcome(&n1.fetch(&id("demo", "web"), true, TTL).await),
        "issued"
    );

    // Recreated under the same name: the token was bound to the old pod's uid.
    cluster
        .fake
        .apply(pod("istio-system", "ztunnel-a", "u-zt-a2", "n1", "ztunnel"))
        .unwrap();
    let recreated = n1.fetch(&id("demo", "web"), true, TTL).await;
    assert_eq!(outcome(&recreated), "token_rejected");
    assert_eq!(code(&recreated), Some(tonic::Code::Unauthenticated));

    cluster
        .fake
        .delete("Pod", "istio-system", "ztunnel-a")
        .unwrap();
    for asked in [Some(id("demo", "web")), None] {
        let impersonate = asked.is_some();
        let asked = asked.unwrap_or_else(|| id("istio-system", "ztunnel"));
        let got = n1.fetch(&asked, impersonate, TTL).await;
        assert_eq!(outcome(&got), "token_rejected", "{asked}");
        assert_eq!(code(&got), Some(tonic::Code::Unauthenticated));
    }
    assert_eq!(cluster.refused("token_rejected").await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_tokens_and_tokens_for_another_audience_are_rejected() {
    let cluster = Cluster::start().await;
    cluster.wait_ready().await;
    let api_audience = TokenUser::service_account(
        "istio-system",
        "ztunnel",
        "https://kubernetes.default.svc.cluster.local",
    )
    .on_node("n1");
    let tokens = [
        cluster.token("for-the-api-server", api_audience),
        cluster.token_file("never-issued"),
    ];
    for token in tokens {
        let got = cluster
            .client(&token)
            .fetch(&id("istio-system", "ztunnel"), false, TTL)
            .await;
        assert_eq!(outcome(&got), "token_rejected", "{}", token.display());
        assert_eq!(code(&got), Some(tonic::Code::Unauthenticated));
    }
    assert_eq!(cluster.fake.token_reviews(), 2);
    assert_eq!(cluster.refused("token_rejected").await, 2.0);
    let metrics = cluster.metrics().await;
    assert!(
        !metrics.contains("mesh_ca_certificates_issued_total{"),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_token_review_is_unavailable_and_worth_a_retry() {
    let cluster = Cluster::start().await;
    cluster.wait_ready().await;
    let n1 = cluster.client(&cluster.token("agent-n1", agent_n1()));
    for failure in [ReviewFailure::Forbidden, ReviewFailure::Internal] {
        cluster.fake.fail_token_reviews(Some(failure));
        let got = n1.fetch(&id("demo", "web"), true, TTL).await;
        assert_eq!(outcome(&got), "token_review_unavailable", "{failure:?}");
        assert_eq!(code(&got), Some(tonic::Code::Unavailable), "{failure:?}");
        assert!(!got.unwrap_err().is_permanent(), "{failure:?}");
    }
    assert_eq!(cluster.refused("token_review_unavailable").await, 2.0);

    cluster.fake.fail_token_reviews(None);
    assert_eq!(
        outcome(&n1.fetch(&id("demo", "web"), true, TTL).await),
        "issued",
        "served again once the api server answers"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_api_server_fails_the_request_after_the_review_timeout() {
    let cluster = Cluster::start().await;
    cluster.wait_ready().await;
    let limit = mesh_kube::token_review::REVIEW_TIMEOUT;
    let token = cluster.token("agent-n1", agent_n1());
    let n1 = cluster.client_with_timeout(&token, limit * 3);
    cluster.fake.fail_token_reviews(Some(ReviewFailure::Hang));
    let started = Instant::now();
    let got = n1.fetch(&id("demo", "web"), true, TTL).await;
    assert_eq!(outcome(&got), "token_review_unavailable");
    assert_eq!(code(&got), Some(tonic::Code::Unavailable));
    assert!(started.elapsed() < limit * 2, "{:?}", started.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_token_gets_only_the_waypoints_own_identity() {
    let cluster = Cluster::start().await;
    cluster.wait_ready().await;
    let user = TokenUser::service_account("demo", "waypoint", AUDIENCE)
        .bound_to_pod("waypoint-1", "u-wp-1")
        .on_node("n1");
    let waypoint = cluster.client(&cluster.token("waypoint", user));
    let me = id("demo", "waypoint");
    let got = waypoint.fetch(&me, false, TTL).await.unwrap();
    assert_eq!(got.identity, me);
    assert_eq!(outcome(&waypoint.fetch(&me, true, TTL).await), "issued");
    // Though its pod runs on n1 beside web-1.
    let web = waypoint.fetch(&id("demo", "web"), true, TTL).await;
    assert_eq!(outcome(&web), "not_a_node_agent");
    assert_eq!(code(&web), Some(tonic::Code::PermissionDenied));
    let metrics = cluster.metrics().await;
    assert_eq!(
        e2e::prom::sum(
            &metrics,
            "mesh_ca_certificates_issued_total",
            &[("grant", "own")]
        ),
        2.0,
        "{metrics}"
    );
    assert_eq!(cluster.refused("not_a_node_agent").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_is_not_ready_until_the_api_server_listed_every_pod() {
    let cluster = Cluster::start_with(|fake| {
        populate(fake);
        fake.hold_list("Pod").unwrap();
    })
    .await;
    let n1 = cluster.client(&cluster.token("agent-n1", agent_n1()));
    cluster
        .fake
        .wait_for("the ca lists pods", |r| r["Pod"].lists >= 1)
        .await
        .unwrap();
    assert!(!cluster.ready().await);
    let early = n1.fetch(&id("demo", "web"), true, TTL).await;
    assert_eq!(outcome(&early), "not_ready");
    assert_eq!(code(&early), Some(tonic::Code::Unavailable));
    assert!(!early.unwrap_err().is_permanent());

    cluster.fake.release_list("Pod").unwrap();
    cluster.wait_ready().await;
    assert_eq!(
        outcome(&n1.fetch(&id("demo", "web"), true, TTL).await),
        "issued"
    );
    assert_eq!(cluster.refused("not_ready").await, 1.0);
}
