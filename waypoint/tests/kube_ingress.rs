//! The real `waypoint` binary as an ingress gateway in cluster mode (`--config-source kube
//! --ingress`) against a fake API server (`e2e::apiserver`, through a kubeconfig on
//! 127.0.0.1): it watches only `kubernetes.io/tls` Secrets (a field selector) and
//! ReferenceGrants, and writes its Gateway's status back (`gateways/status`): an HTTPS
//! listener whose Secret is missing is `ResolvedRefs=False` (`InvalidCertificateRef`) until
//! the Secret is created, the HTTP listener `Programmed=True` with its routes counted, each
//! condition with `observedGeneration`, a transition time that moves only when its status
//! does, `status.addresses` those of the gateway's LoadBalancer Service (`web-istio`) once
//! it has one (an address asked for in `spec.addresses` that it lacks: `Programmed=False`,
//! `AddressNotUsable`), a write only when something changed, and a failed write retried
//! without harm. Loopback only; no namespaces.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use e2e::apiserver::{FakeApiServer, WAIT};
use serde_json::{json, Value};

/// The ingress gateway process; killed on drop.
struct Gateway {
    child: Child,
    admin: SocketAddr,
    readiness: SocketAddr,
    log: std::path::PathBuf,
}

impl Gateway {
    fn start(dir: &Path, kubeconfig: &Path, hbone: SocketAddr) -> Result<Gateway> {
        let [admin, metrics, readiness] = free_ports()?;
        let log = dir.join("gateway.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_waypoint"))
            .args(["--name", "web", "--namespace", "shop"])
            .args(["--config-source", "kube", "--ingress"])
            .arg("--ca-dir")
            .arg(dir.join("ca"))
            .args(["--hbone-addr", &hbone.to_string()])
            .args(["--admin-addr", &admin.to_string()])
            .args(["--metrics-addr", &metrics.to_string()])
            .args(["--readiness-addr", &readiness.to_string()])
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info,mesh_kube=debug")
            .env_remove("WAYPOINT_CONFIG_DIR")
            .env_remove("WAYPOINT_CONFIG_SOURCE")
            .env_remove("WAYPOINT_INGRESS")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start waypoint")?;
        Ok(Gateway {
            child,
            admin,
            readiness,
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
        self.get(self.admin, "/config_dump")?.json()
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Polls `check` (bounded by [`WAIT`]); the log is attached to a failure.
    fn eventually(&self, what: &str, check: impl Fn(&Gateway) -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + WAIT;
        loop {
            if check(self).unwrap_or(false) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out waiting until {what}; log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_ports<const N: usize>() -> Result<[SocketAddr; N]> {
    let listeners = [(); N].map(|_| std::net::TcpListener::bind("127.0.0.1:0"));
    let mut addrs = [SocketAddr::from(([127, 0, 0, 1], 0)); N];
    for (addr, l) in addrs.iter_mut().zip(listeners) {
        *addr = l?.local_addr()?;
    }
    Ok(addrs)
}

/// Gateway `shop/web` of class `istio`: listener `http` on `http_port`, `https` on
/// `https_port` with the certificate of Secret `shop/web-cert`, and `extra` listeners.
fn gateway(http_port: u16, https_port: u16, extra: &[Value]) -> Value {
    let mut listeners = vec![
        json!({"name": "http", "port": http_port, "protocol": "HTTP"}),
        json!({"name": "https", "port": https_port, "protocol": "HTTPS",
               "tls": {"mode": "Terminate", "certificateRefs": [{"kind": "Secret", "name": "web-cert"}]}}),
    ];
    listeners.extend(extra.iter().cloned());
    json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
           "metadata": {"name": "web", "namespace": "shop"},
           "spec": {"gatewayClassName": "istio", "listeners": listeners}})
}

const GATEWAY: (&str, &str, &str) = ("Gateway", "shop", "web");

fn listener<'a>(gw: &'a Value, name: &str) -> Option<&'a Value> {
    gw["status"]["listeners"]
        .as_array()?
        .iter()
        .find(|l| l["name"] == name)
}

fn condition<'a>(conditions: &'a Value, type_: &str) -> Option<&'a Value> {
    conditions.as_array()?.iter().find(|c| c["type"] == type_)
}

/// `(status, reason)` of condition `type_` of listener `name` in the Gateway's status.
fn listener_state(gw: &Value, name: &str, type_: &str) -> Option<(String, String)> {
    let c = condition(&listener(gw, name)?["conditions"], type_)?;
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
    ))
}

fn since(gw: &Value, name: &str, type_: &str) -> Option<String> {
    let c = condition(&listener(gw, name)?["conditions"], type_)?;
    c["lastTransitionTime"].as_str().map(str::to_string)
}

/// Every condition of the status observes `generation`.
fn observes(gw: &Value, generation: i64) -> bool {
    let status = &gw["status"];
    let mut all: Vec<&Value> = status["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .collect();
    for l in status["listeners"].as_array().into_iter().flatten() {
        all.extend(l["conditions"].as_array().into_iter().flatten());
    }
    !all.is_empty() && all.iter().all(|c| c["observedGeneration"] == generation)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_ingress_gateway_reads_tls_secrets_and_writes_its_status() -> Result<()> {
    let server = FakeApiServer::start().await?;
    let [hbone, http, https] = free_ports()?;
    let dir = tempfile::tempdir()?;
    let ca = e2e::tls::TestCa::new(dir.path(), "ingress")?;
    let leaf = ca.issue(&["web.example.com"], false)?;
    let (cert_pem, key_pem) = (
        std::fs::read_to_string(&leaf.cert)?,
        std::fs::read_to_string(&leaf.key)?,
    );
    for obj in [
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}),
        gateway(http.port(), https.port(), &[]),
        json!({"apiVersion": "v1", "kind": "Service",
               "metadata": {"name": "echo", "namespace": "shop"},
               "spec": {"clusterIP": "10.96.0.20", "selector": {"app": "echo"},
                        "ports": [{"name": "http", "port": 80, "targetPort": 8080}]}}),
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
               "metadata": {"name": "echo", "namespace": "shop"},
               "spec": {"parentRefs": [{"name": "web", "sectionName": "http"}],
                        "rules": [{"backendRefs": [{"name": "echo", "port": 80}]}]}}),
        // Never sent to the gateway: not of type kubernetes.io/tls.
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": "db-password", "namespace": "shop"},
               "type": "Opaque", "stringData": {"password": "hunter2"}}),
    ] {
        server.apply(obj)?;
    }
    let kubeconfig = server.write_kubeconfig(dir.path())?;
    let gw = tokio::task::block_in_place(|| Gateway::start(dir.path(), &kubeconfig, hbone))?;

    // 1. The Secret is missing: the HTTPS listener's reference does not resolve; the HTTP
    //    listener is programmed with its one route.
    let first = server
        .wait_for_object("the first status", GATEWAY, |o| {
            listener_state(o, "https", "ResolvedRefs").is_some()
        })
        .await?;
    assert_eq!(
        listener_state(&first, "https", "ResolvedRefs"),
        Some(("False".into(), "InvalidCertificateRef".into())),
        "{first}"
    );
    let message = &condition(
        &listener(&first, "https").context("https")?["conditions"],
        "ResolvedRefs",
    )
    .context("ResolvedRefs")?["message"];
    assert!(
        message
            .as_str()
            .is_some_and(|m| m.contains("shop/web-cert")),
        "{message}"
    );
    assert_eq!(
        listener_state(&first, "https", "Programmed"),
        Some(("False".into(), "Invalid".into()))
    );
    assert_eq!(
        listener_state(&first, "http", "Programmed"),
        Some(("True".into(), "Programmed".into()))
    );
    assert_eq!(
        listener(&first, "http").context("http")?["attachedRoutes"],
        1
    );
    assert_eq!(
        listener(&first, "https").context("https")?["attachedRoutes"],
        0
    );
    assert_eq!(
        listener(&first, "http").context("http")?["supportedKinds"][0],
        json!({"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"})
    );
    let programmed =
        condition(&first["status"]["conditions"], "Programmed").context("Programmed")?;
    assert_eq!(programmed["status"], "True", "some listener is programmed");
    assert!(
        first["status"].get("addresses").is_none(),
        "no Service, no addresses: {first}"
    );
    assert_eq!(first["metadata"]["generation"], 1);
    assert!(observes(&first, 1), "{first}");
    let http_since = since(&first, "http", "Programmed").context("transition time")?;
    tokio::task::block_in_place(|| -> Result<()> {
        gw.eventually("ready", |g| Ok(g.ready()))?;
        let dump = gw.config_dump()?;
        let problems = dump["model"]["secret_problems"].to_string();
        assert!(
            !problems.contains("db-password") && !dump.to_string().contains("hunter2"),
            "an Opaque Secret reached the gateway: {problems}"
        );
        Ok(())
    })?;
    assert_eq!(server.status_patches("Gateway").len(), 1);
    let secrets = server.requests("Secret")?;
    assert!(secrets.lists >= 1 && secrets.watches >= 1, "{secrets:?}");
    assert!(server.requests("ReferenceGrant")?.lists >= 1);

    // 2. The Secret is created: the reference resolves, the HTTPS listener is programmed
    //    and served; what did not change keeps its transition time.
    server.apply(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "web-cert", "namespace": "shop"},
        "type": "kubernetes.io/tls",
        "stringData": {"tls.crt": cert_pem, "tls.key": key_pem}}))?;
    let resolved = server
        .wait_for_object("ResolvedRefs=True", GATEWAY, |o| {
            listener_state(o, "https", "ResolvedRefs")
                == Some(("True".into(), "ResolvedRefs".into()))
        })
        .await?;
    assert_eq!(
        listener_state(&resolved, "https", "Programmed"),
        Some(("True".into(), "Programmed".into()))
    );
    assert_eq!(
        since(&resolved, "http", "Programmed"),
        Some(http_since.clone())
    );
    assert!(
        since(&resolved, "https", "Programmed").is_some_and(|t| t >= http_since),
        "{resolved}"
    );
    tokio::task::block_in_place(|| -> Result<()> {
        gw.eventually("the HTTPS port is served", |_| {
            Ok(TcpStream::connect_timeout(&https, Duration::from_secs(1)).is_ok())
        })?;
        let dump = gw.config_dump()?.to_string();
        assert!(!dump.contains("PRIVATE KEY"), "the key is dumped");
        assert!(!gw.log().contains("PRIVATE KEY"), "the key is logged");
        Ok(())
    })?;
    // 2b. The gateway's LoadBalancer Service gets an address from the cloud: it becomes
    //     the Gateway's `status.addresses`; no condition moves.
    server.apply(json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web-istio", "namespace": "shop"},
        "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.30", "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": http.port()}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7", "ipMode": "VIP"}]}}}))?;
    let addressed = server
        .wait_for_object("status.addresses", GATEWAY, |o| {
            o["status"].get("addresses").is_some()
        })
        .await?;
    assert_eq!(
        addressed["status"]["addresses"],
        json!([{"type": "IPAddress", "value": "203.0.113.7"}])
    );
    assert_eq!(
        since(&addressed, "http", "Programmed"),
        Some(http_since.clone())
    );
    // The gateway's own status writes come back as Gateway events: they change no model,
    // so nothing more is written.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.status_patches("Gateway").len(), 3);

    // 3. A write that fails (RBAC, API server trouble) is logged and retried; the gateway
    //    keeps serving. The spec changes meanwhile (a UDP listener; an address the Service
    //    lacks asked for): the status then observes generation 2.
    server.fail_status_patches(Some(403));
    let failed_before = server.requests("Gateway")?.status_patches;
    let mut changed = gateway(
        http.port(),
        https.port(),
        &[json!({"name": "udp", "port": 5353, "protocol": "UDP"})],
    );
    changed["spec"]["addresses"] = json!([{"type": "IPAddress", "value": "198.51.100.1"}]);
    server.apply(changed)?;
    server
        .wait_for("a refused status write", |r| {
            r["Gateway"].status_patches > failed_before
        })
        .await?;
    tokio::task::block_in_place(|| {
        gw.eventually("the failure is logged", |g| {
            Ok(g.log().contains("gateway status not written"))
        })
    })?;
    assert!(tokio::task::block_in_place(|| gw.ready()), "still ready");
    server.fail_status_patches(None);
    let updated = server
        .wait_for_object("generation 2 observed", GATEWAY, |o| observes(o, 2))
        .await?;
    assert_eq!(
        listener_state(&updated, "udp", "Accepted"),
        Some(("False".into(), "UnsupportedProtocol".into()))
    );
    let programmed =
        condition(&updated["status"]["conditions"], "Programmed").context("Programmed")?;
    assert_eq!(
        (&programmed["status"], &programmed["reason"]),
        (&json!("False"), &json!("AddressNotUsable")),
        "{programmed}"
    );
    assert!(
        programmed["message"]
            .as_str()
            .is_some_and(|m| m.contains("198.51.100.1") && m.contains("shop/web-istio")),
        "{programmed}"
    );
    assert_eq!(
        updated["status"]["addresses"],
        json!([{"type": "IPAddress", "value": "203.0.113.7"}]),
        "the Service's address is still reported"
    );
    assert_eq!(
        since(&updated, "http", "Programmed"),
        Some(http_since),
        "{:#?}\n{}",
        server.status_patches("Gateway"),
        gw.log()
    );
    assert_eq!(server.status_patches("Gateway").len(), 4);
    Ok(())
}
