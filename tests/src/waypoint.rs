//! Running the real `waypoint` binary inside a pod's network namespace, as the local mode
//! runs a waypoint: a pod labelled `gateway.networking.k8s.io/gateway-name=<gateway>` whose
//! IP is the waypoint's address (see `mesh_model::model::waypoint`).
//!
//! Also what the waypoint suites share: the mesh they start from ([`waypoint_mesh`]), the
//! small keep-alive HTTP/1.1 [`Client`] they send requests with, [`with_log`] to show the
//! waypoint's log when a check fails and [`wait_for_rejection`] to wait for a bad config
//! file to be refused.
//!
//! Kept out of `harness.rs` on purpose: only the public `Mesh` API is used, so the harness
//! can start waypoints itself later by calling [`Mesh::spawn_waypoint`].

use std::io::{BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::harness::Mesh;
use crate::http::{self, read_response, HttpResponse};
use crate::process::ChildGuard;
use crate::spec::{MeshBuilder, Pod, Service};
use crate::wait::wait_until;

/// The label that makes a pod a Gateway's waypoint.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The waypoint's fixed ports inside its pod.
pub const WAYPOINT_METRICS_PORT: u16 = 15020;
pub const WAYPOINT_READINESS_PORT: u16 = 15021;

/// The client pod of [`waypoint_mesh`] and its waypoint's pod (Gateway `default/waypoint`).
pub const CLIENT: &str = "default/client";
pub const WAYPOINT: &str = "default/waypoint";
/// The label that sends a Service's traffic through a waypoint.
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// The waypoint's admin port (`/config_dump`), on its pod's loopback.
pub const WAYPOINT_ADMIN_PORT: u16 = 15000;

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the waypoint may take to notice a changed config file (it polls the directory).
const RELOAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Lines of the waypoint's log [`with_log`] adds to an error.
const LOG_TAIL_LINES: usize = 40;

/// The mesh every waypoint suite starts from: [`Mesh::two_nodes`] (nodes n1 and n2, ambient
/// namespace `default`, [`CLIENT`] on n1) plus Gateway `default/waypoint` (a waypoint for
/// Services) and its pod [`WAYPOINT`] on n2. Start the waypoint with
/// [`Mesh::spawn_default_waypoint`] once the mesh is built.
pub fn waypoint_mesh(test: &str) -> MeshBuilder {
    Mesh::two_nodes(test)
        .pod(waypoint_pod("default", "waypoint", "n2"))
        .yaml(
            "waypoint.yaml",
            &gateway_yaml("default", "waypoint", "service"),
        )
}

/// Service `default/<name>` at `vip` with port `http` 80 → 8080, selecting `selector`.
pub fn http_service(name: &str, vip: &str, selector: (&str, &str)) -> Service {
    Service::new("default", name)
        .vip(vip)
        .named_port("http", 80, 8080)
        .selector([selector])
}

/// [`http_service`] whose traffic goes through the waypoint of [`waypoint_mesh`].
pub fn waypoint_service(name: &str, vip: &str, selector: (&str, &str)) -> Service {
    http_service(name, vip, selector).labels([(USE_WAYPOINT_LABEL, "waypoint")])
}

/// Two versions of an echo app behind the waypoint: pods `echo-v1` on n2 and `echo-v2` on n1
/// (service account `echo`, labels `app: echo` and `version`), Service `echo` over both (through
/// the waypoint) and Services `echo-v1` and `echo-v2` over one each. `vips`: of `echo`,
/// `echo-v1` and `echo-v2`.
pub fn with_two_versions(mesh: MeshBuilder, vips: [&str; 3]) -> MeshBuilder {
    let [echo, v1, v2] = vips;
    let version = |name: &str, node: &str, version: &str| {
        Pod::new("default", name)
            .on(node)
            .service_account("echo")
            .labels([("app", "echo"), ("version", version)])
    };
    mesh.pod(version("echo-v1", "n2", "v1"))
        .pod(version("echo-v2", "n1", "v2"))
        .service(waypoint_service("echo", echo, ("app", "echo")))
        .service(http_service("echo-v1", v1, ("version", "v1")))
        .service(http_service("echo-v2", v2, ("version", "v2")))
}

/// The pod that runs Gateway `<namespace>/<gateway>`'s waypoint on `node`: labelled with the
/// Gateway's name, its service account named after the Gateway (the waypoint's identity).
pub fn waypoint_pod(namespace: &str, gateway: &str, node: &str) -> Pod {
    Pod::new(namespace, gateway)
        .on(node)
        .service_account(gateway)
        .labels([(GATEWAY_NAME_LABEL, gateway)])
}

/// A `Telemetry` named `name` in `namespace` that turns access logs on with Istio's built-in
/// `envoy` provider: a waypoint writes its `request complete` lines only with one.
pub fn access_log_telemetry(namespace: &str, name: &str) -> String {
    format!(
        "apiVersion: telemetry.istio.io/v1\n\
         kind: Telemetry\n\
         metadata: {{name: {name}, namespace: {namespace}}}\n\
         spec:\n  accessLogging: [{{providers: [{{name: envoy}}]}}]\n"
    )
}

/// The `Gateway` of a waypoint for `namespace`, as `waypoint apply` writes it.
pub fn gateway_yaml(namespace: &str, name: &str, waypoint_for: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\n\
         kind: Gateway\n\
         metadata:\n  name: {name}\n  namespace: {namespace}\n  labels: {{istio.io/waypoint-for: {waypoint_for}}}\n\
         spec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - {{name: mesh, port: 15008, protocol: HBONE}}\n"
    )
}

impl Mesh {
    /// Path of the `waypoint` binary next to the other binaries under test.
    pub fn waypoint_binary(&self) -> Result<PathBuf> {
        let path = self.binaries().dir().join("waypoint");
        if !path.is_file() {
            bail!(
                "waypoint binary not found at {}: run `cargo build --workspace --bins` first",
                path.display()
            );
        }
        Ok(path)
    }

    /// Starts the waypoint for Gateway `<namespace>/<gateway>` with identity
    /// `<namespace>/<service_account>` inside pod `pod` (`ns/name`), reading the mesh's config
    /// directory and getting its certificate from the mesh's CA (a token for its service
    /// account; with [`crate::CaMode::LocalDir`], signing itself from the CA directory), and
    /// returns once it reports ready. Killed when the guard drops.
    pub fn spawn_waypoint(
        &self,
        pod: &str,
        namespace: &str,
        gateway: &str,
        service_account: &str,
    ) -> Result<ChildGuard> {
        let mut guard =
            self.start_waypoint(pod, namespace, gateway, service_account, service_account)?;
        let ready = wait_until(
            &format!("waypoint in {pod} to report ready"),
            READY_TIMEOUT,
            || {
                if !guard.is_running() {
                    bail!("the waypoint exited");
                }
                Ok(self.waypoint_ready(pod))
            },
        );
        if let Err(e) = ready {
            bail!("{e:#}; its log:\n{}", guard.stderr());
        }
        Ok(guard)
    }

    /// Starts the waypoint as [`Mesh::spawn_waypoint`] does, without waiting for it to be
    /// ready. `token_account`: the service account (in `namespace`) its CA token is for,
    /// normally `service_account`; another one plays a waypoint configured to claim an
    /// identity its credentials do not give it.
    pub fn start_waypoint(
        &self,
        pod: &str,
        namespace: &str,
        gateway: &str,
        service_account: &str,
        token_account: &str,
    ) -> Result<ChildGuard> {
        let binary = self.waypoint_binary()?;
        let mut argv: Vec<std::ffi::OsString> = vec![
            binary.into_os_string(),
            "--name".into(),
            gateway.into(),
            "--namespace".into(),
            namespace.into(),
            "--service-account".into(),
            service_account.into(),
            "--config-dir".into(),
            self.config_dir().into_os_string(),
        ];
        match self.ca_mode() {
            crate::CaMode::LocalDir => {
                argv.extend(["--ca-dir".into(), self.ca_dir().into_os_string()]);
            }
            crate::CaMode::Service => {
                let token = self.mint_token(
                    &format!("waypoint-{}.token", pod.replacen('/', ".", 1)),
                    namespace,
                    token_account,
                    None,
                )?;
                argv.extend(self.ca_client_args(&token));
            }
        }
        let argv: Vec<String> = argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        self.spawn(pod, &argv)
    }

    /// Whether the waypoint in `pod` answers 200 on `/healthz/ready`.
    pub fn waypoint_ready(&self, pod: &str) -> bool {
        self.waypoint_http(pod, WAYPOINT_READINESS_PORT, "/healthz/ready")
            .is_ok_and(|r| r.status == 200)
    }

    /// Starts the waypoint of [`waypoint_mesh`] (Gateway `default/waypoint`, identity
    /// `default/waypoint`) in [`WAYPOINT`].
    pub fn spawn_default_waypoint(&self) -> Result<ChildGuard> {
        self.spawn_waypoint(WAYPOINT, "default", "waypoint", "waypoint")
    }

    /// The waypoint's Prometheus text (`:15020/metrics` inside its pod).
    pub fn waypoint_metrics(&self, pod: &str) -> Result<String> {
        let r = self.waypoint_http(pod, WAYPOINT_METRICS_PORT, "/metrics")?;
        if r.status != 200 {
            bail!("waypoint metrics in {pod}: status {}", r.status);
        }
        Ok(r.text())
    }

    /// The waypoint's `/config_dump` (admin port, loopback of its pod), parsed.
    pub fn waypoint_config_dump(&self, pod: &str) -> Result<serde_json::Value> {
        let r = self.waypoint_http(pod, WAYPOINT_ADMIN_PORT, "/config_dump")?;
        if r.status != 200 {
            bail!("waypoint config_dump in {pod}: status {}", r.status);
        }
        serde_json::from_slice(&r.body).context("config_dump is JSON")
    }

    fn waypoint_http(&self, pod: &str, port: u16, path: &str) -> Result<HttpResponse> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut stream = self
            .in_pod(pod, move || TcpStream::connect_timeout(&addr, IO_TIMEOUT))?
            .with_context(|| format!("connect to {addr} in {pod}"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        http::request(&mut stream, "GET", &addr.to_string(), path, b"")
    }
}

/// One keep-alive HTTP/1.1 connection from a pod, for requests through a waypoint: the
/// request target is sent exactly as written (so un-normalised paths reach the waypoint).
pub struct Client {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    /// The `host` header sent.
    host: String,
    /// Requests sent on this connection.
    sent: usize,
}

impl Client {
    /// A connection from `pod` to `addr` that sends `host: echo`.
    pub fn connect(mesh: &Mesh, pod: &str, addr: SocketAddr) -> Result<Client> {
        Client::connect_as(mesh, pod, addr, "echo")
    }

    /// A connection from `pod` to `addr` that sends `host: <host>`.
    pub fn connect_as(mesh: &Mesh, pod: &str, addr: SocketAddr, host: &str) -> Result<Client> {
        let stream = mesh.connect(pod, addr)?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Client {
            stream,
            reader,
            host: host.to_owned(),
            sent: 0,
        })
    }

    /// Requests sent on this connection so far.
    pub fn sent(&self) -> usize {
        self.sent
    }

    /// `GET target` with extra headers.
    pub fn get(&mut self, target: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
        let mut head = format!(
            "GET {target} HTTP/1.1\r\nhost: {}\r\nuser-agent: e2e\r\n",
            self.host
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        self.stream
            .write_all(head.as_bytes())
            .with_context(|| format!("send GET {target}"))?;
        self.sent += 1;
        read_response(&mut self.reader).with_context(|| format!("response to GET {target}"))
    }

    /// `POST target` with `len` body bytes, which must be answered 200 by mesh-echo: its JSON
    /// reply.
    pub fn post(&mut self, target: &str, len: usize) -> Result<serde_json::Value> {
        let r = self.send_body("POST", target, len)?;
        anyhow::ensure!(r.status == 200, "POST {target}: {} {}", r.status, r.text());
        r.json()
    }

    /// `method target` with `len` body bytes: the response, whatever its status.
    pub fn send_body(&mut self, method: &str, target: &str, len: usize) -> Result<HttpResponse> {
        let head = format!(
            "{method} {target} HTTP/1.1\r\nhost: {}\r\ncontent-length: {len}\r\n\r\n",
            self.host
        );
        self.stream
            .write_all(head.as_bytes())
            .with_context(|| format!("send {method} {target}"))?;
        self.stream.write_all(&vec![b'x'; len])?;
        self.sent += 1;
        read_response(&mut self.reader).with_context(|| format!("response to {method} {target}"))
    }

    /// `GET target`, which must be answered 200 by mesh-echo: its JSON reply.
    pub fn echo(&mut self, target: &str, headers: &[(&str, &str)]) -> Result<serde_json::Value> {
        let r = self.get(target, headers)?;
        anyhow::ensure!(r.status == 200, "GET {target}: {} {}", r.status, r.text());
        r.json()
    }
}

/// The `server` mesh-echo names itself with in a JSON reply.
pub fn server(reply: &serde_json::Value) -> String {
    reply["server"].as_str().unwrap_or_default().to_string()
}

/// `result`, with the last lines of the waypoint's log added to an error.
pub fn with_log<T>(wp: &ChildGuard, result: Result<T>) -> Result<T> {
    result.map_err(|e| log_tail(wp, e))
}

/// `err` with the last lines of the waypoint's log added (a scenario suite's
/// [`Suite::explain`](crate::Suite::explain)).
pub fn log_tail(wp: &ChildGuard, err: anyhow::Error) -> anyhow::Error {
    let tail = wp.stderr_tail(LOG_TAIL_LINES);
    err.context(format!("last lines of the waypoint's log:\n{tail}"))
}

/// Waits until the waypoint logs that it rejected a config document, `what` being how the log
/// names it (`route-bad.yaml doc 1: HTTPRoute default/bad`).
pub fn wait_for_rejection(wp: &ChildGuard, what: &str) -> Result<()> {
    wp.wait_for_stderr(&format!("{what} rejected"), RELOAD_TIMEOUT, |log| {
        log.contains("config rejected") && log.contains(what)
    })
}
