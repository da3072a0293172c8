//! The real `ztunnel` binary with `--config-source kube` against a fake API server (through a
//! kubeconfig on 127.0.0.1): not ready before every kind is listed, then it enrolls its
//! node's ambient pod, whose network namespace it finds by pod IP among the machine's
//! processes, as in a cluster with `hostPID`. The agent runs in this namespace on loopback
//! ports chosen here (`--redirect none`: no capture rules); the pod is a namespace this test
//! creates. Needs root.
//!
//! The fail-closed test runs the agent with `--redirect loopback` instead (no root): the pod
//! is an address here, and plaintext reaches it over SOCKS5 on its 15006 through the agent's
//! real policy path: a refused new policy closes it (open connections too) until fixed or
//! deleted.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tracing::info;

use support::apiserver::{node_watches, FakeApiServer, WAIT};
use support::netns::{prefix, require_root, test_ip, TestNetns};
use support::process::spawn_agent;

const NODE: &str = "kn1";

/// The agent process; killed on drop.
struct Agent {
    child: std::sync::Mutex<Child>,
    admin: SocketAddr,
    metrics: SocketAddr,
    readiness: SocketAddr,
    log: std::path::PathBuf,
}

impl Agent {
    fn start(dir: &Path, kubeconfig: &Path, marker: &str) -> Result<Agent> {
        Self::start_with(dir, kubeconfig, marker, "none")
    }

    /// With `--redirect <redirect>` (`none`: pods in namespaces; `loopback`: pods are
    /// addresses here, clients name their destination over SOCKS5).
    fn start_with(dir: &Path, kubeconfig: &Path, marker: &str, redirect: &str) -> Result<Agent> {
        let [admin, metrics, readiness] = free_ports()?;
        let log = dir.join("ztunnel.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ztunnel"));
        cmd.args(["--node-name", NODE, "--config-source", "kube"])
            .arg("--ca-dir")
            .arg(dir.join("ca"))
            .args(["--redirect", redirect])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--readiness-addr", &readiness.to_string()])
            .env("KUBECONFIG", kubeconfig);
        let child = spawn_agent(cmd, &log, marker)?;
        Ok(Agent {
            child: std::sync::Mutex::new(child),
            admin,
            metrics,
            readiness,
            log,
        })
    }

    async fn ready(&self) -> Result<bool> {
        Ok(get(self.readiness, "/healthz/ready").await?.0 == 200)
    }

    async fn config_dump(&self) -> Result<Value> {
        let (code, body) = get(self.admin, "/config_dump").await?;
        if code != 200 {
            bail!("config_dump answered {code}: {body}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// Polls `check` until it holds (the agent's endpoints are the only way to see its state).
    async fn eventually<F, Fut>(&self, what: &str, check: F) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<bool>>,
    {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let exited = self.child().try_wait()?;
            if let Some(status) = exited {
                bail!("ztunnel exited ({status}):\n{}", self.log_text());
            }
            if check().await.unwrap_or(false) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "timed out waiting until {what}; agent log:\n{}",
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn child(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let mut child = self.child();
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// Three ports free on 127.0.0.1 right now.
fn free_ports() -> Result<[SocketAddr; 3]> {
    let listeners = [(); 3].map(|_| std::net::TcpListener::bind("127.0.0.1:0"));
    let mut addrs = [SocketAddr::from(([127, 0, 0, 1], 0)); 3];
    for (addr, l) in addrs.iter_mut().zip(listeners) {
        *addr = l?.local_addr()?;
    }
    Ok(addrs)
}

/// `GET http://<addr><path>`: status and body.
async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = send.send_request(req).await?;
    let code = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((code, String::from_utf8_lossy(&body).into_owned()))
}

/// Ports listening inside the namespace, as `ss` shows them (`addr:port`).
fn listening_in(netns: &str) -> Result<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "ss", "-Hltn"])
        .output()
        .context("run ss in the pod namespace")?;
    if !out.status.success() {
        bail!("ss failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn pod(name: &str, node: &str, ip: &str, mode: Option<&str>) -> Value {
    let labels = match mode {
        Some(m) => json!({"app": name, "istio.io/dataplane-mode": m}),
        None => json!({"app": name}),
    };
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                     "labels": labels},
        "spec": {"nodeName": node, "serviceAccountName": "web",
                 "containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn workloads(dump: &Value) -> Vec<Value> {
    dump["workloads"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_its_nodes_pods_from_the_api_server() -> Result<()> {
    require_root()?;
    let marker = prefix();
    let dir = tempfile::tempdir()?;
    let ip = test_ip(41);
    let mut pod_ns = TestNetns::new(&marker, "kube-web")?;
    pod_ns.add_address(ip)?;
    let sandbox = pod_ns.spawn_sleeper()?;

    let server = FakeApiServer::start().await?;
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}}}))?;
    server.apply(json!({"apiVersion": "v1", "kind": "ServiceAccount",
        "metadata": {"name": "web", "namespace": "default"}}))?;
    server.apply(pod("web", NODE, &ip.to_string(), None))?;
    server.apply(pod("other", "kn2", "10.0.9.9", None))?;
    server.apply(json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-web", "namespace": "default"},
        "spec": {"action": "ALLOW",
                 "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/default/sa/web"]}}]}]}}))?;
    server.hold_list("Pod")?;
    let kubeconfig = server.write_kubeconfig(dir.path())?;
    let agent = Agent::start(dir.path(), &kubeconfig, &marker)?;

    info!("every kind but pods is listed and watched: the agent must not be ready yet");
    server
        .wait_for("every kind but Pod listed and watched", |r| {
            r.iter()
                .filter(|(kind, _)| node_watches(kind))
                .all(|(kind, r)| r.lists >= 1 && (*kind == "Pod" || r.watches >= 1))
        })
        .await?;
    agent
        .eventually("the admin endpoint answers", || async {
            Ok(agent.config_dump().await.is_ok())
        })
        .await?;
    assert!(!agent.ready().await?, "ready before the pods were listed");
    let dump = agent.config_dump().await?;
    assert_eq!(dump["config"]["config_source"], "kube");
    assert!(workloads(&dump).is_empty(), "{dump}");

    info!("pods are listed: the agent enrolls web, found by its IP");
    server.release_list("Pod")?;
    agent
        .eventually("the agent is ready", || agent.ready())
        .await?;
    let dump = agent.config_dump().await?;
    let enrolled = workloads(&dump);
    assert_eq!(enrolled.len(), 1, "only this node's pod: {enrolled:?}");
    assert_eq!(enrolled[0]["pod"], "default/web");
    assert_eq!(enrolled[0]["state"], "enrolled");
    assert_eq!(
        enrolled[0]["identity"],
        "spiffe://cluster.local/ns/default/sa/web"
    );
    assert_eq!(enrolled[0]["netns"], format!("/proc/{sandbox}/ns/net"));
    assert_eq!(dump["model"]["pods"].as_array().map(Vec::len), Some(2));
    assert_eq!(
        dump["model"]["authorization_policies"]
            .as_array()
            .map(Vec::len),
        Some(1)
    );
    let ports = listening_in(&pod_ns.name)?;
    for port in ["127.0.0.1:15001", ":15006", ":15008"] {
        assert!(
            ports.contains(port),
            "{port} not listening in the pod:\n{ports}"
        );
    }

    info!("a malformed service is refused and shown; the rest still applies");
    server.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "bad", "namespace": "default"},
        "spec": {"clusterIP": "not-an-ip", "ports": [{"port": 80}]}}))?;
    agent
        .eventually("the refusal shows in config_dump", || async {
            let dump = agent.config_dump().await?;
            Ok(dump["config_rejections"][0]["object"] == "Service default/bad")
        })
        .await?;

    info!("web opts out: its listeners close");
    server.apply(pod("web", NODE, &ip.to_string(), Some("none")))?;
    agent
        .eventually("web is released", || async {
            Ok(workloads(&agent.config_dump().await?).is_empty())
        })
        .await?;
    agent
        .eventually("15008 closed in the pod", || async {
            Ok(!listening_in(&pod_ns.name)?.contains(":15008"))
        })
        .await?;
    assert!(agent.ready().await?, "nothing pending: still ready");
    drop(agent);
    pod_ns.kill_processes();
    Ok(())
}

/// The agent's `mesh_policies_failed_closed` samples (`name{labels} value` lines).
async fn failed_closed_metric(agent: &Agent) -> Result<Vec<String>> {
    let (code, body) = get(agent.metrics, "/metrics").await?;
    if code != 200 {
        bail!("/metrics answered {code}");
    }
    Ok(body
        .lines()
        .filter(|l| l.starts_with("mesh_policies_failed_closed{"))
        .map(str::to_string)
        .collect())
}

/// An AuthorizationPolicy `default/allow-web` for `app=web` with `action` and `rules`.
fn web_policy(action: &str, rules: Value) -> Value {
    json!({"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "allow-web", "namespace": "default"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "action": action, "rules": rules}})
}

/// Whether plaintext from `src` reaches `web`'s application through its agent (SOCKS5 on
/// its 15006, where capture would send it) and echoes intact.
async fn reaches(src: std::net::Ipv4Addr, web: SocketAddr) -> bool {
    use support::agents::roundtrip;
    let payload = format!("ping from {src}");
    match socks5_connect_plain(src, web).await {
        Ok(mut tcp) => roundtrip(&mut tcp, payload.as_bytes())
            .await
            .is_ok_and(|back| back == payload.as_bytes()),
        Err(_) => false,
    }
}

/// A *new* AuthorizationPolicy the translator refuses must not leave its workloads open:
/// they deny all until the policy is fixed (then it applies) or deleted (then they are open
/// again). Real TCP through the agent (`--redirect loopback`: the pod is an address here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_new_policy_closes_its_workloads_until_fixed_or_deleted() -> Result<()> {
    use support::agents::{closed, exchange, Echo};
    let marker = prefix();
    let dir = tempfile::tempdir()?;
    let net = |last| std::net::Ipv4Addr::new(127, (std::process::id() % 254) as u8 + 1, 250, last);
    let web = SocketAddr::new(net(10).into(), 8080);
    let (client, stranger) = (net(20), net(21));
    let _echo = Echo::start(web).await?;

    let server = FakeApiServer::start().await?;
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}}}))?;
    server.apply(pod("web", NODE, &web.ip().to_string(), None))?;
    let kubeconfig = server.write_kubeconfig(dir.path())?;
    let agent = Agent::start_with(dir.path(), &kubeconfig, &marker, "loopback")?;
    agent
        .eventually("the agent is ready", || agent.ready())
        .await?;

    info!("no policy: web is open");
    assert!(reaches(client, web).await, "{}", agent.log_text());
    assert!(reaches(stranger, web).await);
    let mut open = socks5_connect_plain(client, web).await?;
    assert_eq!(exchange(&mut open, b"before").await?, b"before");

    info!("a new ALLOW policy with a misspelt field is refused: web denies all");
    let misspelt = json!([{"from": [{"source": {"ipBlock": [client.to_string()]}}]}]);
    server.apply(web_policy("ALLOW", misspelt))?;
    agent
        .eventually("the refused policy shows in config_dump", || async {
            let dump = agent.config_dump().await?;
            let r = &dump["model"]["refused_policies"][0];
            Ok(r["name"] == "allow-web"
                && r["effect"] == "deny_all"
                && r["workloads"] == json!(["default/web"])
                && r["reason"].as_str().is_some_and(|e| e.contains("ipBlock")))
        })
        .await?;
    assert!(
        closed(&mut open).await,
        "the open connection is closed by the re-check"
    );
    assert!(
        !reaches(client, web).await,
        "denied while the policy is refused"
    );
    assert!(!reaches(stranger, web).await);
    assert_eq!(
        failed_closed_metric(&agent).await?,
        [
            r#"mesh_policies_failed_closed{kind="AuthorizationPolicy",namespace="default",name="allow-web"} 1"#
        ]
    );
    assert!(agent
        .log_text()
        .contains("refused policy enforced fail closed"));

    info!("fixed: the policy applies as written");
    let fixed = json!([{"from": [{"source": {"ipBlocks": [client.to_string()]}}]}]);
    server.apply(web_policy("ALLOW", fixed))?;
    agent
        .eventually("client is allowed", || async {
            Ok(reaches(client, web).await)
        })
        .await?;
    assert!(
        !reaches(stranger, web).await,
        "the fixed ALLOW does not name it"
    );
    assert!(failed_closed_metric(&agent).await?.is_empty());
    let dump = agent.config_dump().await?;
    assert_eq!(dump["model"]["refused_policies"], json!([]));

    info!("refused again: an edit of an accepted policy keeps the accepted version");
    let misspelt = json!([{"from": [{"source": {"ipBlock": [stranger.to_string()]}}]}]);
    server.apply(web_policy("ALLOW", misspelt))?;
    agent
        .eventually("the refusal shows", || async {
            let dump = agent.config_dump().await?;
            Ok(dump["config_rejections"][0]["object"] == "AuthorizationPolicy default/allow-web")
        })
        .await?;
    assert!(reaches(client, web).await);
    assert!(!reaches(stranger, web).await);

    info!("deleted: web is open again");
    server.delete("AuthorizationPolicy", "default", "allow-web")?;
    agent
        .eventually("stranger is allowed", || async {
            Ok(reaches(stranger, web).await)
        })
        .await?;
    assert!(agent
        .log_text()
        .contains("refused policy no longer fails closed"));

    info!("a refused AUDIT policy changes nothing");
    let misspelt = json!([{"from": [{"source": {"ipBlock": [client.to_string()]}}]}]);
    server.apply(web_policy("AUDIT", misspelt))?;
    agent
        .eventually("the AUDIT refusal shows", || async {
            let dump = agent.config_dump().await?;
            Ok(dump["model"]["refused_policies"][0]["effect"] == "none")
        })
        .await?;
    assert!(reaches(client, web).await);
    assert!(reaches(stranger, web).await);
    Ok(())
}

/// A plaintext connection from `src` to `web` through its agent, left open.
async fn socks5_connect_plain(
    src: std::net::Ipv4Addr,
    web: SocketAddr,
) -> Result<tokio::net::TcpStream> {
    use support::agents::{dial, socks5_connect, Dest};
    let tcp = dial(src.into(), SocketAddr::new(web.ip(), 15006)).await?;
    socks5_connect(tcp, &Dest::Addr(web)).await
}

/// Issue 16: a pod in an ambient namespace reaches the API server through the `kubernetes`
/// Service, which has no selector: its endpoints are the EndpointSlice the API server
/// writes (no `managed-by` label; the address is no pod, so the agent connects in plain
/// TCP). A slice the EndpointSlice controller manages is not watched (the agent derives a
/// selector's endpoints from pods itself). Real TCP through the agent (`--redirect
/// loopback`: the client pod is an address here, naming its destination over SOCKS5 on its
/// 15001).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_service_reaches_the_api_server_by_its_endpoint_slice() -> Result<()> {
    use support::agents::{dial, roundtrip, socks5_connect, Dest, Echo, OUTBOUND};
    let marker = prefix();
    let dir = tempfile::tempdir()?;
    let net = |last| std::net::Ipv4Addr::new(127, (std::process::id() % 254) as u8 + 1, 251, last);
    let client = net(20);
    // The "API server" behind the Service: an echo on an address that is no pod.
    let api = SocketAddr::new(net(30).into(), 6443);
    let _api = Echo::start(api).await?;

    let server = FakeApiServer::start().await?;
    server.apply(json!({"apiVersion": "v1", "kind": "Namespace",
        "metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}}}))?;
    server.apply(pod("client", NODE, &client.to_string(), None))?;
    server.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "kubernetes", "namespace": "default"},
        "spec": {"clusterIP": "10.96.0.1", "clusterIPs": ["10.96.0.1"],
                 "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]}}))?;
    server.apply(
        json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [api.ip().to_string()], "conditions": {"ready": true}}],
        "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]}),
    )?;
    server.apply(json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": "kubernetes-managed", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes",
                                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}},
        "addressType": "IPv4",
        "endpoints": [{"addresses": [net(31).to_string()]}],
        "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]}))?;
    let kubeconfig = server.write_kubeconfig(dir.path())?;
    let agent = Agent::start_with(dir.path(), &kubeconfig, &marker, "loopback")?;
    agent
        .eventually("the agent is ready", || agent.ready())
        .await?;
    let dump = agent.config_dump().await?;
    let slices: Vec<&str> = dump["model"]["endpoint_slices"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s["name"].as_str()).collect())
        .unwrap_or_default();
    assert_eq!(
        slices,
        ["kubernetes"],
        "only the API server's own slice is watched"
    );

    let vip = SocketAddr::from(([10, 96, 0, 1], 443));
    for i in 0..3 {
        let tcp = dial(client.into(), SocketAddr::new(client.into(), OUTBOUND)).await?;
        let mut tcp = socks5_connect(tcp, &Dest::Addr(vip)).await?;
        let payload = format!("GET /version {i}");
        let back = roundtrip(&mut tcp, payload.as_bytes()).await?;
        assert_eq!(back, payload.as_bytes(), "{}", agent.log_text());
    }
    Ok(())
}
