//! The real `ztunnel` binary with `--config-source kube` against a fake API server (through a
//! kubeconfig on 127.0.0.1): not ready before every kind is listed, then it enrolls its
//! node's ambient pod, whose network namespace it finds by pod IP among the machine's
//! processes, as in a cluster with `hostPID`. The agent runs in this namespace on loopback
//! ports chosen here (`--redirect none`: no capture rules); the pod is a namespace this test
//! creates. Needs root.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tracing::info;

use support::apiserver::{FakeApiServer, WAIT, WAYPOINT_ONLY_KINDS};
use support::netns::{prefix, require_root, test_ip, TestNetns, MARKER_ENV};

const NODE: &str = "kn1";

/// The agent process; killed on drop.
struct Agent {
    child: std::sync::Mutex<Child>,
    admin: SocketAddr,
    readiness: SocketAddr,
    log: std::path::PathBuf,
}

impl Agent {
    fn start(dir: &Path, kubeconfig: &Path, marker: &str) -> Result<Agent> {
        let [admin, metrics, readiness] = free_ports()?;
        let log = dir.join("ztunnel.log");
        let out = std::fs::File::create(&log)?;
        let err = out.try_clone()?;
        let ca = dir.join("ca");
        let child = Command::new(env!("CARGO_BIN_EXE_ztunnel"))
            .args(["--node-name", NODE, "--config-source", "kube"])
            .arg("--ca-dir")
            .arg(&ca)
            .args(["--redirect", "none"])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--readiness-addr", &readiness.to_string()])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,ztunnel=debug")
            .env(MARKER_ENV, marker)
            .env_remove("ZTUNNEL_CONFIG_DIR")
            .env_remove("ZTUNNEL_CONFIG_SOURCE")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .context("start ztunnel")?;
        Ok(Agent {
            child: std::sync::Mutex::new(child),
            admin,
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
                .filter(|(kind, _)| !WAYPOINT_ONLY_KINDS.contains(kind))
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
