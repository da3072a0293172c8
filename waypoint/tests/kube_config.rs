//! The real `waypoint` binary with `--config-source kube` against a fake API server (through
//! a kubeconfig on 127.0.0.1, `e2e::apiserver`): not ready before every kind it watches is
//! listed; then its `/config_dump` (admin, loopback) follows the cluster's HTTPRoutes, and a
//! malformed route is refused (counted in `mesh_config_rejections_total{source="kube"}`) with
//! its last good version kept. Loopback only; no namespaces.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use e2e::apiserver::{FakeApiServer, WAIT};
use serde_json::{json, Value};

/// The waypoint process; killed on drop.
struct Waypoint {
    child: Child,
    admin: SocketAddr,
    readiness: SocketAddr,
    metrics: SocketAddr,
    log: std::path::PathBuf,
}

impl Waypoint {
    fn start(dir: &Path, kubeconfig: &Path) -> Result<Waypoint> {
        let [hbone, admin, metrics, readiness] = free_ports()?;
        let log = dir.join("waypoint.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_waypoint"))
            .args(["--name", "waypoint", "--namespace", "default"])
            .args(["--config-source", "kube"])
            .arg("--ca-dir")
            .arg(dir.join("ca"))
            .args(["--hbone-addr", &hbone.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--readiness-addr", &readiness.to_string()])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,waypoint=debug,mesh=debug")
            .env_remove("WAYPOINT_CONFIG_DIR")
            .env_remove("WAYPOINT_CONFIG_SOURCE")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start waypoint")?;
        Ok(Waypoint {
            child,
            admin,
            readiness,
            metrics,
            log,
        })
    }

    fn get(&self, addr: SocketAddr, path: &str) -> Result<e2e::http::HttpResponse> {
        let mut tcp = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        e2e::http::request(&mut tcp, "GET", &addr.to_string(), path, b"")
    }

    fn ready(&self) -> bool {
        self.get(self.readiness, "/healthz/ready")
            .is_ok_and(|r| r.status == 200)
    }

    fn config_dump(&self) -> Result<Value> {
        let r = self.get(self.admin, "/config_dump")?;
        if r.status != 200 {
            bail!("config_dump answered {}: {}", r.status, r.text());
        }
        r.json()
    }

    fn rejections(&self) -> Result<f64> {
        let text = self.get(self.metrics, "/metrics")?.text();
        Ok(e2e::prom::sum(
            &text,
            "mesh_config_rejections_total",
            &[("source", "kube")],
        ))
    }

    /// Polls `check` (bounded by [`WAIT`]); the log is attached to a failure.
    fn eventually(&self, what: &str, check: impl Fn(&Waypoint) -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            if check(self).unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                bail!("timed out waiting until {what}; waypoint log:\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Waypoint {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_ports() -> Result<[SocketAddr; 4]> {
    let listeners = [(); 4].map(|_| std::net::TcpListener::bind("127.0.0.1:0"));
    let mut addrs = [SocketAddr::from(([127, 0, 0, 1], 0)); 4];
    for (addr, l) in addrs.iter_mut().zip(listeners) {
        *addr = l?.local_addr()?;
    }
    Ok(addrs)
}

fn http_route(prefix: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": "echo", "namespace": "default"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "echo", "port": 80}],
            "rules": [{"matches": [{"path": {"type": "PathPrefix", "value": prefix}}],
                       "backendRefs": [{"name": "echo", "port": 80}]}]
        }
    })
}

/// The path prefix of the first rule of the first HTTPRoute in a config dump.
fn dumped_prefix(dump: &Value) -> Option<String> {
    dump["model"]["http_routes"][0]["rules"][0]["matches"][0]["path"]["Prefix"]
        .as_str()
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_waypoint_reads_its_routes_from_the_api_server() -> Result<()> {
    let server = FakeApiServer::start().await?;
    for obj in [
        json!({"apiVersion": "v1", "kind": "Namespace",
               "metadata": {"name": "default", "labels": {"istio.io/dataplane-mode": "ambient"}}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "waypoint", "namespace": "default",
                            "labels": {"istio.io/waypoint-for": "service"}},
               "spec": {"gatewayClassName": "istio-waypoint",
                        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]}}),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "echo", "namespace": "default",
                            "labels": {"istio.io/use-waypoint": "waypoint"}},
               "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "echo"},
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
        http_route("/v1"),
    ] {
        server.apply(obj)?;
    }
    server.hold_list("HTTPRoute")?;
    let dir = tempfile::tempdir()?;
    let kubeconfig = server.write_kubeconfig(dir.path())?;
    let wp = tokio::task::block_in_place(|| Waypoint::start(dir.path(), &kubeconfig))?;

    // Everything but the routes is listed: the waypoint must not be ready yet.
    server
        .wait_for("every kind but HTTPRoute listed", |r| {
            r.iter()
                .filter(|(kind, _)| e2e::apiserver::waypoint_watches(kind))
                .all(|(kind, r)| *kind == "HTTPRoute" || r.lists >= 1)
        })
        .await?;
    tokio::task::block_in_place(|| -> Result<()> {
        wp.eventually("the admin endpoint answers", |w| {
            Ok(w.config_dump().is_ok())
        })?;
        assert!(!wp.ready(), "ready before HTTPRoutes were listed");
        Ok(())
    })?;
    server.release_list("HTTPRoute")?;
    tokio::task::block_in_place(|| -> Result<()> {
        wp.eventually("ready", |w| Ok(w.ready()))?;
        let dump = wp.config_dump()?;
        assert_eq!(dumped_prefix(&dump).as_deref(), Some("/v1"), "{dump}");
        assert_eq!(dump["model"]["gateways"][0]["name"], "waypoint", "{dump}");
        Ok(())
    })?;
    // Without `--ingress` a waypoint reads no Secret and no ReferenceGrant.
    for kind in e2e::apiserver::INGRESS_ONLY_KINDS {
        let asked = server.requests(kind)?;
        assert_eq!((asked.lists, asked.watches), (0, 0), "{kind}");
    }

    // A change follows; a malformed version is refused and the last good one stays.
    server.apply(http_route("/v2"))?;
    tokio::task::block_in_place(|| {
        wp.eventually("the route moved to /v2", |w| {
            Ok(dumped_prefix(&w.config_dump()?).as_deref() == Some("/v2"))
        })
    })?;
    let before = tokio::task::block_in_place(|| wp.rejections())?;
    server.apply(http_route("no-leading-slash"))?;
    tokio::task::block_in_place(|| -> Result<()> {
        wp.eventually("the bad route is counted", |w| Ok(w.rejections()? > before))?;
        let dump = wp.config_dump()?;
        assert_eq!(
            dumped_prefix(&dump).as_deref(),
            Some("/v2"),
            "last good kept"
        );
        assert!(wp.ready(), "still ready");
        Ok(())
    })?;
    Ok(())
}
