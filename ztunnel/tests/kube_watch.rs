//! `mesh_kube::watch` against a fake API server that speaks the real list/watch
//! protocol, reached through a kubeconfig on 127.0.0.1: what the agent's model becomes as the
//! cluster changes.

mod support;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use mesh_model::model::{Model, NamespacedName};
use mesh_telemetry::Metrics;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::info;

use mesh_kube::{Options, Rejection, Scope};
use support::apiserver::{node_watches, FakeApiServer, WAIT};

const NODE: &str = "n1";

fn namespace(name: &str, ambient: bool) -> Value {
    let labels = if ambient {
        json!({"istio.io/dataplane-mode": "ambient"})
    } else {
        json!({})
    };
    json!({
        "apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": name, "uid": format!("uid-ns-{name}"), "labels": labels},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    })
}

fn pod(name: &str, ip: &str, labels: Value) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": name, "namespace": "default", "uid": format!("uid-{name}"),
            "labels": labels,
            "managedFields": [{"manager": "kubelet", "operation": "Update"}],
        },
        "spec": {
            "nodeName": NODE,
            "serviceAccountName": "default",
            "containers": [{"name": "app", "image": "echo",
                            "ports": [{"containerPort": 8080, "name": "http"}]}],
        },
        "status": {
            "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}],
            "conditions": [{"type": "Ready", "status": "True",
                            "lastTransitionTime": "2025-01-01T00:00:00Z"}],
        },
    })
}

fn deny_policy() -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-all", "namespace": "default"},
        "spec": {"action": "DENY", "rules": [{}]},
    })
}

fn strict() -> Value {
    json!({
        "apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
        "metadata": {"name": "default", "namespace": "istio-system"},
        "spec": {"mtls": {"mode": "STRICT"}},
    })
}

/// A waypoint as `cargo xtask waypoint apply --kubectl` applies it: a Gateway of class
/// `istio-waypoint` (no address: no control plane assigns one) ...
fn waypoint_gateway() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "default",
                     "labels": {"istio.io/waypoint-for": "service"}},
        "spec": {
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        },
        "status": {"conditions": [{"type": "Accepted", "status": "Unknown",
                                   "lastTransitionTime": "2025-01-01T00:00:00Z"}]},
    })
}

/// ... and a Service that uses it.
fn service_using_the_waypoint() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "echo", "namespace": "default",
                     "labels": {"istio.io/use-waypoint": "waypoint"}},
        "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "echo"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    })
}

/// The address and identity (`namespace/sa`) of the waypoint traffic to Service
/// `default/echo` is sent to, if it uses one.
fn echo_waypoint(m: &Model) -> Option<(Option<IpAddr>, String)> {
    let svc = m.services.get(&NamespacedName::new("default", "echo"))?;
    let target = m.waypoint_for_service(svc)?;
    Some((
        target.address.map(|a| a.ip),
        format!(
            "{}/{}",
            target.service_account.namespace, target.service_account.name
        ),
    ))
}

/// The waypoint the echo Service names that the model does not know (its VIP fails closed).
fn echo_missing_waypoint(m: &Model) -> Option<String> {
    let svc = m.services.get(&NamespacedName::new("default", "echo"))?;
    m.missing_waypoint_for_service(svc).map(|k| k.to_string())
}

/// The watch under test, with fast timings, and what it publishes.
struct Agent {
    models: watch::Receiver<Arc<Model>>,
    rejections: watch::Receiver<Vec<Rejection>>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Agent {
    async fn start(server: &FakeApiServer) -> Result<Agent> {
        Self::start_scoped(server, Scope::Node).await
    }

    async fn start_scoped(server: &FakeApiServer, scope: Scope) -> Result<Agent> {
        let dir = tempfile::tempdir()?;
        let client = server.client(dir.path()).await?;
        let (tx, models) = watch::channel(Arc::new(Model::default()));
        let (rejections_tx, rejections) = watch::channel(Vec::new());
        let metrics = Metrics::new();
        let opts = Options {
            debounce: Duration::from_millis(20),
            max_delay: Duration::from_millis(200),
            retry_min: Duration::from_millis(20),
            retry_max: Duration::from_millis(200),
            metrics: Some(metrics.clone()),
            rejections: Some(rejections_tx),
            scope,
        };
        let stop = CancellationToken::new();
        tokio::spawn(mesh_kube::watch(client, tx, opts, stop.clone()));
        Ok(Agent {
            models,
            rejections,
            metrics,
            stop,
            _dir: dir,
        })
    }

    /// Waits for a published model for which `done` holds.
    async fn model(&mut self, what: &str, done: impl Fn(&Model) -> bool) -> Result<Arc<Model>> {
        let found = tokio::time::timeout(WAIT, self.models.wait_for(|m| done(m)))
            .await
            .with_context(|| format!("timed out waiting for a model where {what}"))?
            .context("the watch stopped")?;
        Ok(found.clone())
    }

    fn rejections_total(&self) -> u64 {
        let text = self.metrics.encode_text();
        text.lines()
            .find(|l| l.starts_with("mesh_config_rejections_total{source=\"kube\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn has_pod(m: &Model, name: &str) -> bool {
    m.pods.contains_key(&NamespacedName::new("default", name))
}

fn enrolled(m: &Model, name: &str) -> bool {
    m.pods_on_node(NODE)
        .any(|p| p.name == name && p.namespace == "default" && m.is_ambient(p))
}

fn pod_ip(m: &Model, name: &str) -> Option<IpAddr> {
    m.pods
        .get(&NamespacedName::new("default", name))
        .and_then(|p| p.ips.first().copied())
}

#[tokio::test]
async fn the_first_model_waits_until_every_kind_is_listed() -> Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(namespace("default", true))?;
    server.apply(pod("web", "10.0.0.5", json!({})))?;
    server.apply(deny_policy())?;
    server.hold_list("AuthorizationPolicy")?;
    let mut agent = Agent::start(&server).await?;

    info!("every other kind is listed and watched; authorization policies are still listing");
    server
        .wait_for(
            "every kind but AuthorizationPolicy listed and watched",
            |r| {
                r.iter()
                    .filter(|(kind, _)| node_watches(kind))
                    .all(|(kind, r)| {
                        r.lists >= 1 && (*kind == "AuthorizationPolicy" || r.watches >= 1)
                    })
            },
        )
        .await?;
    // A model now would lack the DENY policy: nothing may be published. Bounded by several
    // times the longest publication delay (max_delay).
    let early = tokio::time::timeout(Duration::from_millis(1000), agent.models.changed()).await;
    assert!(
        early.is_err(),
        "a model was published before every kind was listed"
    );

    server.release_list("AuthorizationPolicy")?;
    let model = agent
        .model("the pod and the policy are in", |m| {
            has_pod(m, "web") && !m.authorization_policies.is_empty()
        })
        .await?;
    assert!(enrolled(&model, "web"));
    assert_eq!(model.authorization_policies.len(), 1);
    Ok(())
}

#[tokio::test]
async fn a_pod_added_labelled_and_removed_shows_in_the_model() -> Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(namespace("default", false))?;
    let mut agent = Agent::start(&server).await?;
    agent
        .model("the namespace is in", |m| {
            m.namespaces.contains_key("default")
        })
        .await?;

    info!("a pod is created, not in the mesh");
    server.apply(pod("web", "10.0.0.5", json!({"app": "web"})))?;
    let m = agent.model("web exists", |m| has_pod(m, "web")).await?;
    assert!(!enrolled(&m, "web"), "no ambient label yet");

    info!("the pod is labelled ambient");
    server.apply(pod(
        "web",
        "10.0.0.5",
        json!({"app": "web", "istio.io/dataplane-mode": "ambient"}),
    ))?;
    agent
        .model("web is enrolled", |m| enrolled(m, "web"))
        .await?;

    info!("the pod is deleted");
    server.delete("Pod", "default", "web")?;
    agent.model("web is gone", |m| !has_pod(m, "web")).await?;
    assert_eq!(agent.rejections_total(), 0);
    Ok(())
}

#[tokio::test]
async fn an_expired_watch_relists_and_drops_what_was_deleted_meanwhile() -> Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(namespace("default", true))?;
    server.apply(pod("a", "10.0.0.1", json!({})))?;
    server.apply(pod("b", "10.0.0.2", json!({})))?;
    let mut agent = Agent::start(&server).await?;
    agent
        .model("both pods are in", |m| has_pod(m, "a") && has_pod(m, "b"))
        .await?;
    server
        .wait_for("pods watched", |r| r["Pod"].watches >= 1)
        .await?;

    info!("b is deleted and the event lost to a compaction; the watch is told 410 Gone");
    server.delete_silently("Pod", "default", "b")?;
    server.expire_watches("Pod")?;
    let m = agent.model("b is gone", |m| !has_pod(m, "b")).await?;
    assert!(has_pod(&m, "a"), "a is still listed");
    assert_eq!(
        server.requests("Pod")?.lists,
        2,
        "one list at start, one after 410"
    );

    info!("the watch resumes from the new list: later changes still arrive");
    server.apply(pod("c", "10.0.0.3", json!({})))?;
    agent.model("c is in", |m| has_pod(m, "c")).await?;
    Ok(())
}

/// The API server goes away (every watch ends, lists and watches answer 503) while pods
/// change: the agent keeps its last model (no model without them is ever published), retries
/// with backoff rather than in a loop, counts no rejection, and once the server is back the
/// changes made meanwhile arrive.
#[tokio::test]
async fn through_an_api_server_outage_the_last_model_stays_and_changes_arrive_after() -> Result<()>
{
    let server = FakeApiServer::start().await?;
    server.apply(namespace("default", true))?;
    server.apply(pod("a", "10.0.0.1", json!({})))?;
    server.apply(pod("b", "10.0.0.2", json!({})))?;
    let mut agent = Agent::start(&server).await?;
    agent
        .model("a and b are enrolled", |m| {
            enrolled(m, "a") && enrolled(m, "b")
        })
        .await?;
    server
        .wait_for("pods watched", |r| r["Pod"].watches >= 1)
        .await?;

    // Every model published from here until the server is back.
    let mut published = agent.models.clone();
    published.mark_unchanged();
    let lost = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let recorder = {
        let lost = lost.clone();
        tokio::spawn(async move {
            while published.changed().await.is_ok() {
                let m = published.borrow_and_update().clone();
                if !(enrolled(&m, "a") && enrolled(&m, "b")) {
                    lost.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                }
            }
        })
    };

    info!("the API server goes away; b is deleted and c added meanwhile");
    let before = server.requests("Pod")?;
    server.outage(true);
    server.delete("Pod", "default", "b")?;
    server.apply(pod("c", "10.0.0.3", json!({})))?;
    let outage = Duration::from_secs(2);
    tokio::time::sleep(outage).await;
    let during = server.requests("Pod")?;
    let failed = during.failed - before.failed;
    eprintln!("outage: {failed} failed pod requests in {outage:?}");
    // Retries back off (20 ms doubling to 200 ms here): about 12 in 2 s, never a spin.
    assert!(
        (2..=30).contains(&failed),
        "{failed} failed requests for pods in {outage:?}: the watch should retry, with backoff"
    );
    recorder.abort();
    assert_eq!(
        lost.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "a model without a or b was published during the outage"
    );
    let m = agent.models.borrow().clone();
    assert!(enrolled(&m, "a") && enrolled(&m, "b") && !has_pod(&m, "c"));
    assert_eq!(agent.rejections_total(), 0, "an outage is not a rejection");

    info!("the API server is back: what changed meanwhile arrives");
    server.outage(false);
    let m = agent
        .model("b is gone and c is in", |m| {
            !has_pod(m, "b") && enrolled(m, "c")
        })
        .await?;
    assert!(enrolled(&m, "a"));
    assert_eq!(agent.rejections_total(), 0);
    Ok(())
}

#[tokio::test]
async fn a_malformed_object_is_refused_and_its_last_good_version_kept() -> Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(namespace("default", true))?;
    server.apply(pod("web", "10.0.0.5", json!({})))?;
    let mut agent = Agent::start(&server).await?;
    agent.model("web is in", |m| enrolled(m, "web")).await?;

    info!("web gets a status.podIP that is not an IP, then another pod is added");
    server.apply(pod("web", "10.0.0.999", json!({})))?;
    server.apply(pod("api", "10.0.0.6", json!({})))?;
    let m = agent.model("api is in", |m| has_pod(m, "api")).await?;
    assert_eq!(
        pod_ip(&m, "web"),
        Some("10.0.0.5".parse()?),
        "web stays at its last good version"
    );
    assert!(enrolled(&m, "web"));
    let rejections = tokio::time::timeout(WAIT, agent.rejections.wait_for(|r| !r.is_empty()))
        .await
        .context("timed out waiting for the rejection")??
        .clone();
    assert_eq!(rejections.len(), 1, "{rejections:?}");
    assert_eq!(rejections[0].object, "Pod default/web");
    assert!(
        rejections[0].error.contains("podIP"),
        "the error names the field: {}",
        rejections[0].error
    );
    assert_eq!(agent.rejections_total(), 1);

    info!("a good version clears the refusal");
    server.apply(pod("web", "10.0.0.7", json!({})))?;
    agent
        .model("web has its new IP", |m| {
            pod_ip(m, "web") == "10.0.0.7".parse().ok()
        })
        .await?;
    tokio::time::timeout(WAIT, agent.rejections.wait_for(|r| r.is_empty()))
        .await
        .context("timed out waiting for the rejection to clear")??;
    assert_eq!(agent.rejections_total(), 1, "counted once");
    Ok(())
}

#[tokio::test]
async fn without_istio_crds_the_model_has_no_policies() -> Result<()> {
    let server = FakeApiServer::without_istio_crds().await?;
    server.apply(namespace("default", true))?;
    server.apply(pod("web", "10.0.0.5", json!({})))?;
    let mut agent = Agent::start(&server).await?;
    let m = agent.model("web is in", |m| enrolled(m, "web")).await?;
    assert!(m.authorization_policies.is_empty());
    assert!(m.peer_authentications.is_empty());
    let r = server.requests("PeerAuthentication")?;
    assert!(r.lists >= 1 && r.watches == 0, "{r:?}");
    Ok(())
}

#[tokio::test]
async fn policies_follow_the_cluster() -> Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(namespace("default", true))?;
    let mut agent = Agent::start(&server).await?;
    agent
        .model("the namespace is in", |m| {
            m.namespaces.contains_key("default")
        })
        .await?;
    server.apply(strict())?;
    server.apply(deny_policy())?;
    agent
        .model("both policies are in", |m| {
            m.peer_authentications.len() == 1 && m.authorization_policies.len() == 1
        })
        .await?;
    server.delete("AuthorizationPolicy", "default", "deny-all")?;
    agent
        .model("the DENY policy is gone", |m| {
            m.authorization_policies.is_empty()
        })
        .await?;
    Ok(())
}

#[tokio::test]
async fn a_waypoint_gateway_steers_its_services_once_its_pod_is_up() -> Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(namespace("default", true))?;
    server.apply(service_using_the_waypoint())?;
    server.apply(pod("echo", "10.0.0.5", json!({"app": "echo"})))?;
    let mut agent = Agent::start(&server).await?;
    let m = agent
        .model("the service is in", |m| {
            m.services
                .contains_key(&NamespacedName::new("default", "echo"))
        })
        .await?;
    assert_eq!(echo_waypoint(&m), None, "no Gateway yet");
    assert_eq!(
        echo_missing_waypoint(&m),
        Some("default/waypoint".to_owned()),
        "named but unknown: its VIP fails closed rather than going around the waypoint"
    );

    info!("the waypoint's Gateway is created, its pod not yet: steered, but nowhere to go");
    server.apply(waypoint_gateway())?;
    let m = agent
        .model("the gateway is in", |m| !m.gateways.is_empty())
        .await?;
    assert_eq!(
        echo_waypoint(&m),
        Some((None, "default/waypoint".to_owned())),
        "a waypoint without an address fails connections rather than being bypassed"
    );

    info!("the waypoint's pod (labelled with the Gateway's name) comes up");
    let mut wp = pod(
        "waypoint",
        "10.0.0.9",
        json!({"gateway.networking.k8s.io/gateway-name": "waypoint"}),
    );
    wp["spec"]["serviceAccountName"] = json!("waypoint");
    server.apply(wp)?;
    let m = agent
        .model("the waypoint has an address", |m| {
            echo_waypoint(m).is_some_and(|(ip, _)| ip.is_some())
        })
        .await?;
    assert_eq!(
        echo_waypoint(&m),
        Some((Some("10.0.0.9".parse()?), "default/waypoint".to_owned()))
    );
    let waypoint_pod = m
        .pods
        .get(&NamespacedName::new("default", "waypoint"))
        .context("waypoint pod")?;
    assert!(m.is_waypoint_pod(waypoint_pod), "never captured");

    assert_eq!(echo_missing_waypoint(&m), None);

    info!("the Gateway is deleted: the service's traffic fails closed again");
    server.delete("Gateway", "default", "waypoint")?;
    let m = agent
        .model("the gateway is gone", |m| m.gateways.is_empty())
        .await?;
    assert_eq!(echo_waypoint(&m), None);
    assert_eq!(
        echo_missing_waypoint(&m),
        Some("default/waypoint".to_owned())
    );
    assert_eq!(agent.rejections_total(), 0);
    Ok(())
}

#[tokio::test]
async fn without_gateway_api_crds_the_model_has_no_waypoints() -> Result<()> {
    let server = FakeApiServer::without_gateway_api_crds().await?;
    server.apply(namespace("default", true))?;
    server.apply(service_using_the_waypoint())?;
    server.apply(pod("web", "10.0.0.5", json!({})))?;
    let mut agent = Agent::start(&server).await?;
    let m = agent.model("web is in", |m| enrolled(m, "web")).await?;
    assert!(m.gateways.is_empty());
    assert_eq!(
        echo_waypoint(&m),
        None,
        "the label names no Gateway: direct"
    );
    let r = server.requests("Gateway")?;
    assert!(r.lists >= 1 && r.watches == 0, "{r:?}");
    Ok(())
}

fn http_route(path: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": "echo", "namespace": "default"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": path}}]}]
        }
    })
}

fn route_prefix(m: &Model) -> Option<String> {
    let rule = m.http_routes.first()?.rules.first()?;
    match &rule.matches.first()?.path {
        mesh_model::model::PathMatch::Prefix(p) => Some(p.clone()),
        _ => None,
    }
}

#[tokio::test]
async fn a_waypoint_watch_also_follows_routes_and_jwt_rules_and_the_node_watch_does_not(
) -> Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(namespace("default", true))?;
    server.apply(http_route("/v1"))?;
    server.apply(json!({
        "apiVersion": "security.istio.io/v1",
        "kind": "RequestAuthentication",
        "metadata": {"name": "jwt", "namespace": "default"},
        "spec": {"jwtRules": [{"issuer": "https://issuer.example", "jwksUri": "http://127.0.0.1:1/keys"}]}
    }))?;
    let mut waypoint = Agent::start_scoped(&server, Scope::Waypoint).await?;
    let mut node = Agent::start(&server).await?;
    let m = waypoint
        .model("the route is in", |m| route_prefix(m).is_some())
        .await?;
    assert_eq!(route_prefix(&m).as_deref(), Some("/v1"));
    assert_eq!(m.request_authentications.len(), 1);
    let n = node
        .model("the namespace is in", |m| !m.namespaces.is_empty())
        .await?;
    assert!(n.http_routes.is_empty() && n.request_authentications.is_empty());
    assert_eq!(
        server.requests("HTTPRoute")?.lists,
        1,
        "only the waypoint lists routes"
    );

    info!("the route changes, then a malformed version keeps the last good one");
    server.apply(http_route("/v2"))?;
    waypoint
        .model("the route moved", |m| {
            route_prefix(m).as_deref() == Some("/v2")
        })
        .await?;
    server.apply(http_route("no-slash"))?;
    let rejections = tokio::time::timeout(WAIT, waypoint.rejections.wait_for(|r| !r.is_empty()))
        .await
        .context("timed out waiting for the rejection")??
        .clone();
    assert_eq!(
        rejections[0].object, "HTTPRoute default/echo",
        "{rejections:?}"
    );
    let m = waypoint.models.borrow().clone();
    assert_eq!(
        route_prefix(&m).as_deref(),
        Some("/v2"),
        "last good version kept"
    );
    Ok(())
}

/// Issue 16: ServiceEntries come from the API server like every other kind: one applied is
/// in the model by its address, and gone when deleted.
#[tokio::test]
async fn a_service_entry_from_the_api_server_is_in_the_model_by_its_address() -> Result<()> {
    let server = FakeApiServer::start().await?;
    server.apply(namespace("default", true))?;
    let mut agent = Agent::start(&server).await?;
    agent
        .model("the namespace is in", |m| {
            m.namespaces.contains_key("default")
        })
        .await?;
    server.apply(json!({
        "apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
        "metadata": {"name": "payments", "namespace": "default"},
        "spec": {"hosts": ["pay.example.com"], "addresses": ["240.0.0.1"],
                 "ports": [{"number": 443, "name": "https", "protocol": "TLS"}],
                 "resolution": "STATIC", "endpoints": [{"address": "192.0.2.10"}]},
    }))?;
    let dst = "240.0.0.1:443".parse()?;
    let m = agent
        .model("the entry is in", |m| {
            m.service_entry_for("default", dst).is_some()
        })
        .await?;
    let (se, port) = m.service_entry_for("default", dst).context("entry")?;
    let eps = m.service_entry_endpoints(se, port);
    assert_eq!(eps.len(), 1);
    assert_eq!(eps[0].ip.to_string(), "192.0.2.10");
    server.delete("ServiceEntry", "default", "payments")?;
    agent
        .model("the entry is gone", |m| {
            m.service_entry_for("default", dst).is_none()
        })
        .await?;
    Ok(())
}

/// A TLS Secret `shop/<name>` as the API server holds it (PEM as the translator checks it).
fn tls_secret(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name, "namespace": "shop",
                     "annotations": {"note": "annotations are not kept"}},
        "type": "kubernetes.io/tls",
        "stringData": {
            "tls.crt": "-----BEGIN CERTIFICATE-----\nY2VydA==\n-----END CERTIFICATE-----\n",
            "tls.key": "-----BEGIN PRIVATE KEY-----\na2V5\n-----END PRIVATE KEY-----\n",
        },
    })
}

/// The ingress gateway's watch (`Scope::Gateway`) has the TLS Secrets and ReferenceGrants
/// the waypoint's does not; Secrets of any other type never reach it (the API server
/// filters them: `fieldSelector=type=kubernetes.io/tls`), so not even their names are in
/// the model.
#[tokio::test]
async fn the_gateway_watch_has_tls_secrets_and_reference_grants_and_no_other_secret() -> Result<()>
{
    let server = FakeApiServer::start().await?;
    server.apply(namespace("shop", false))?;
    server.apply(tls_secret("web-cert"))?;
    server.apply(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "db-password", "namespace": "shop"},
        "type": "Opaque", "stringData": {"password": "hunter2"},
    }))?;
    server.apply(json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": {"name": "certs", "namespace": "shop"},
        "spec": {"from": [{"group": "gateway.networking.k8s.io", "kind": "Gateway",
                           "namespace": "ingress"}],
                 "to": [{"group": "", "kind": "Secret"}]},
    }))?;
    let mut gateway = Agent::start_scoped(&server, Scope::Gateway).await?;
    let mut waypoint = Agent::start_scoped(&server, Scope::Waypoint).await?;
    let m = gateway
        .model("the secret and the grant are in", |m| {
            m.tls_secret("shop", "web-cert").is_some() && !m.reference_grants.is_empty()
        })
        .await?;
    assert!(
        m.secret_problems.is_empty(),
        "another Secret was read: {:?}",
        m.secret_problems
    );
    assert!(m.reference_granted(
        "gateway.networking.k8s.io",
        "Gateway",
        "ingress",
        "",
        "Secret",
        "shop",
        "web-cert"
    ));
    let w = waypoint
        .model("the namespace is in", |m| m.namespaces.contains_key("shop"))
        .await?;
    assert!(w.tls_secrets.is_empty() && w.reference_grants.is_empty());
    assert_eq!(
        server.requests("Secret")?.lists,
        1,
        "only the gateway lists Secrets"
    );

    info!("a new TLS Secret follows, a new Opaque one does not, a deleted one goes");
    server.apply(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "api-token", "namespace": "shop"},
        "type": "Opaque", "stringData": {"token": "t"},
    }))?;
    server.apply(tls_secret("api-cert"))?;
    let m = gateway
        .model("the second TLS secret is in", |m| {
            m.tls_secret("shop", "api-cert").is_some()
        })
        .await?;
    assert!(m.secret_problems.is_empty(), "{:?}", m.secret_problems);
    server.delete("Secret", "shop", "web-cert")?;
    gateway
        .model("the deleted secret is gone", |m| {
            m.tls_secret("shop", "web-cert").is_none()
        })
        .await?;
    Ok(())
}

/// Without the Gateway API CRDs, ReferenceGrants are absent like Gateways (not an error):
/// the gateway's watch still publishes, with its TLS Secrets.
#[tokio::test]
async fn the_gateway_watch_works_without_the_gateway_api_crds() -> Result<()> {
    let server = FakeApiServer::without_gateway_api_crds().await?;
    server.apply(tls_secret("web-cert"))?;
    let mut gateway = Agent::start_scoped(&server, Scope::Gateway).await?;
    let m = gateway
        .model("the secret is in", |m| {
            m.tls_secret("shop", "web-cert").is_some()
        })
        .await?;
    assert!(m.reference_grants.is_empty() && m.gateways.is_empty());
    assert!(server.requests("ReferenceGrant")?.lists >= 1);
    Ok(())
}
