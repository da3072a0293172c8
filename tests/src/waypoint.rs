//! Running the real `waypoint` binary inside a pod's network namespace, as the local mode
//! runs a waypoint: a pod labelled `gateway.networking.k8s.io/gateway-name=<gateway>` whose
//! IP is the waypoint's address (see `mesh_model::model::waypoint`).
//!
//! Also the small keep-alive HTTP/1.1 [`Client`] the waypoint suites send requests with,
//! and [`with_log`] to show the waypoint's log when a check fails.
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
use crate::spec::Pod;
use crate::wait::wait_until;

/// The label that makes a pod a Gateway's waypoint.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The waypoint's fixed ports inside its pod.
pub const WAYPOINT_METRICS_PORT: u16 = 15020;
pub const WAYPOINT_READINESS_PORT: u16 = 15021;

const READY_TIMEOUT: Duration = Duration::from_secs(30);
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The pod that runs Gateway `<namespace>/<gateway>`'s waypoint on `node`: labelled with the
/// Gateway's name, its service account named after the Gateway (the waypoint's identity).
pub fn waypoint_pod(namespace: &str, gateway: &str, node: &str) -> Pod {
    Pod::new(namespace, gateway)
        .on(node)
        .service_account(gateway)
        .labels([(GATEWAY_NAME_LABEL, gateway)])
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
    /// and CA directories, and returns once it reports ready. Killed when the guard drops.
    pub fn spawn_waypoint(
        &self,
        pod: &str,
        namespace: &str,
        gateway: &str,
        service_account: &str,
    ) -> Result<ChildGuard> {
        let binary = self.waypoint_binary()?;
        let binary = binary.to_string_lossy();
        let config = self.config_dir();
        let ca = self.ca_dir();
        let mut guard = self.spawn(
            pod,
            &[
                &binary,
                "--name",
                gateway,
                "--namespace",
                namespace,
                "--service-account",
                service_account,
                "--config-dir",
                &config.to_string_lossy(),
                "--ca-dir",
                &ca.to_string_lossy(),
            ],
        )?;
        let ready = wait_until(
            &format!("waypoint in {pod} to report ready"),
            READY_TIMEOUT,
            || {
                if !guard.is_running() {
                    bail!("the waypoint exited");
                }
                Ok(self
                    .waypoint_http(pod, WAYPOINT_READINESS_PORT, "/healthz/ready")
                    .is_ok_and(|r| r.status == 200))
            },
        );
        if let Err(e) = ready {
            bail!("{e:#}; its log:\n{}", guard.stderr());
        }
        Ok(guard)
    }

    /// The waypoint's Prometheus text (`:15020/metrics` inside its pod).
    pub fn waypoint_metrics(&self, pod: &str) -> Result<String> {
        let r = self.waypoint_http(pod, WAYPOINT_METRICS_PORT, "/metrics")?;
        if r.status != 200 {
            bail!("waypoint metrics in {pod}: status {}", r.status);
        }
        Ok(r.text())
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
}

impl Client {
    pub fn connect(mesh: &Mesh, pod: &str, addr: SocketAddr) -> Result<Client> {
        let stream = mesh.connect(pod, addr)?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Client { stream, reader })
    }

    /// `GET target` with extra headers.
    pub fn get(&mut self, target: &str, headers: &[(&str, &str)]) -> Result<HttpResponse> {
        let mut head = format!("GET {target} HTTP/1.1\r\nhost: echo\r\nuser-agent: e2e\r\n");
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        self.stream
            .write_all(head.as_bytes())
            .with_context(|| format!("send GET {target}"))?;
        read_response(&mut self.reader).with_context(|| format!("response to GET {target}"))
    }

    /// `GET target`, which must be answered 200 by mesh-echo: its JSON reply.
    pub fn echo(&mut self, target: &str, headers: &[(&str, &str)]) -> Result<serde_json::Value> {
        let r = self.get(target, headers)?;
        anyhow::ensure!(r.status == 200, "GET {target}: {} {}", r.status, r.text());
        r.json()
    }
}

/// `result`, with the last 40 lines of the waypoint's log added to an error.
pub fn with_log(wp: &ChildGuard, result: Result<()>) -> Result<()> {
    result.map_err(|e| {
        let log = wp.stderr();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n");
        e.context(format!("last lines of the waypoint's log:\n{tail}"))
    })
}
