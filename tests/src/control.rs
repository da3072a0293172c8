//! The CA service of a mesh ([`CaMode::Service`], the default): the real `control` binary in
//! a network namespace of its own (`<prefix>_control`), joined to the nodes' bridge like a
//! node (`wire` 10.255.0.253/24, routes to each node's pod range via that node, nothing else:
//! no route out). It is the only process given the CA directory; the agents and the
//! waypoints get the public root, a token and the CA's address.
//!
//! ```text
//!   <prefix>_control                                      <prefix>_wire
//!   wire 10.255.0.253/24  ── veth ──  ca ─── br0 (10.255.0.254) ─── n<i> ── node <i>
//!   control --grpc-addr 10.255.0.253:15012 --ca-dir <work>/ca --config-dir <work>/config
//! ```
//!
//! Tokens are minted with `control token` (the CA's own local-mode tokens) into
//! `<work>/tokens/`: a node agent's bound to its node, a waypoint's for its service account.

use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{anyhow, bail, Context, Result};

use crate::harness::{
    tail, Mesh, BRIDGE, CONNECT_TIMEOUT, IO_TIMEOUT, LOG_TAIL_LINES, NODE_WIRE_IF, STOP_GRACE,
};
use crate::http::{self, HttpResponse};
use crate::netns::{self, in_netns, write_sysctl};
use crate::process::ChildGuard;
use crate::spec::{CaMode, CONTROL_GRPC_PORT, CONTROL_IP};
use crate::sys::{child_path, ip, run, MARKER_ENV};
use crate::wait::wait_until;

/// The name the CA's serving certificate carries and its clients check (Istio's istiod).
pub const CA_SERVER_NAME: &str = "istiod.istio-system.svc";
/// The node agents' service account (`control --node-accounts` default).
pub const NODE_AGENT_NAMESPACE: &str = "istio-system";
pub const NODE_AGENT_ACCOUNT: &str = "ztunnel";
/// The CA's endpoints inside its namespace (the shell's defaults).
const CONTROL_ADMIN_PORT: u16 = 15000;
const CONTROL_METRICS_PORT: u16 = 15020;
const CONTROL_READINESS_PORT: u16 = 15021;
/// The bridge port of the CA's veth, in the wire namespace.
const CONTROL_BRIDGE_PORT: &str = "ca";
/// The CA's public root, in the CA directory (`mesh_pki::ca::ROOT_CERT_FILE`).
const ROOT_CERT_FILE: &str = "root-cert.pem";

impl Mesh {
    /// The namespace of the CA service (`<prefix>_control`).
    pub fn control_netns(&self) -> String {
        format!("{}_control", self.prefix)
    }

    /// Where certificates come from in this mesh.
    pub fn ca_mode(&self) -> CaMode {
        self.spec.ca_mode
    }

    /// `https://10.255.0.253:15012`: what agents and waypoints get as `--ca-address`.
    pub fn ca_address(&self) -> String {
        format!("https://{CONTROL_IP}:{CONTROL_GRPC_PORT}")
    }

    /// The CA's public root (what clients get as `--ca-root-file`).
    pub fn ca_root_file(&self) -> PathBuf {
        self.ca_dir().join(ROOT_CERT_FILE)
    }

    fn control_log_path(&self) -> PathBuf {
        self.log_dir().join("control.log")
    }

    /// Everything the CA has logged (across restarts).
    pub fn control_log(&self) -> String {
        std::fs::read(self.control_log_path())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    pub(crate) fn control_guard(&self) -> std::sync::MutexGuard<'_, Option<ChildGuard>> {
        self.control.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn create_control_netns(&self) -> Result<()> {
        let ns = self.control_netns();
        let wire = self.wire_netns();
        netns::create(&ns)?;
        write_sysctl(&ns, "net/ipv4/conf/all/rp_filter", "0")?;
        write_sysctl(&ns, "net/ipv4/conf/default/rp_filter", "0")?;
        // Both ends created inside their namespaces, as for a node: nothing in the root one.
        ip(&[
            "link",
            "add",
            NODE_WIRE_IF,
            "netns",
            &ns,
            "type",
            "veth",
            "peer",
            "name",
            CONTROL_BRIDGE_PORT,
            "netns",
            &wire,
        ])?;
        ip(&[
            "-n",
            &wire,
            "link",
            "set",
            CONTROL_BRIDGE_PORT,
            "master",
            BRIDGE,
            "up",
        ])?;
        ip(&[
            "-n",
            &ns,
            "addr",
            "add",
            &format!("{CONTROL_IP}/24"),
            "dev",
            NODE_WIRE_IF,
        ])?;
        ip(&["-n", &ns, "link", "set", NODE_WIRE_IF, "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        // Pods (waypoints) reach the CA through their node; the answers go back the same way.
        for node in &self.plan.nodes {
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                &format!("10.244.{}.0/24", node.index),
                "via",
                &node.wire_ip.to_string(),
                "dev",
                NODE_WIRE_IF,
            ])?;
        }
        Ok(())
    }

    /// Starts the CA service (again: same CA directory, so the same root and token key) and
    /// waits until it reports ready (its config loaded: it knows the pods).
    pub fn start_control(&self) -> Result<()> {
        if self.spec.ca_mode != CaMode::Service {
            bail!("this mesh signs with --ca-dir: it has no CA service");
        }
        let mut control = self.control_guard();
        if let Some(running) = control.as_mut() {
            if running.is_running() {
                bail!("the CA is already running (pid {})", running.pid());
            }
        }
        let binary = self.binaries.control()?;
        let mut cmd = Command::new(crate::sys::tool("ip", "iproute2")?);
        cmd.args(["netns", "exec", &self.control_netns()])
            .arg(&binary)
            .arg("--ca-dir")
            .arg(self.ca_dir())
            .arg("--config-dir")
            .arg(self.config_dir())
            .arg("--grpc-addr")
            .arg(format!("{CONTROL_IP}:{CONTROL_GRPC_PORT}"))
            .args(&self.spec.control_args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .env(MARKER_ENV, &self.prefix)
            .env("PATH", child_path());
        *control = Some(ChildGuard::spawn_logging_to(
            cmd,
            "control",
            &self.control_log_path(),
        )?);
        drop(control);
        self.wait_control_ready()
    }

    /// Waits until the CA's `/healthz/ready` answers 200; fails early if it exits.
    pub fn wait_control_ready(&self) -> Result<()> {
        wait_until("the CA to report ready", self.spec.ready_timeout, || {
            let mut control = self.control_guard();
            let guard = control.as_mut().context("the CA is not running")?;
            if let Some(status) = guard.wait_timeout(std::time::Duration::ZERO)? {
                return Err(anyhow!("the CA exited ({status})"));
            }
            drop(control);
            Ok(self
                .control_http(CONTROL_READINESS_PORT, "GET", "/healthz/ready")
                .is_ok_and(|r| r.status == 200))
        })
        .with_context(|| {
            format!(
                "the CA did not become ready; last lines of its log:\n{}",
                tail(&self.control_log(), LOG_TAIL_LINES)
            )
        })
    }

    /// Stops the CA gracefully (SIGTERM; SIGKILL after 10 s).
    pub fn stop_control(&self) -> Result<()> {
        let mut guard = self
            .control_guard()
            .take()
            .context("the CA is not running")?;
        guard.terminate(STOP_GRACE)?;
        Ok(())
    }

    /// Kills the CA at once (SIGKILL), as a crash would.
    pub fn kill_control(&self) -> Result<()> {
        let mut guard = self
            .control_guard()
            .take()
            .context("the CA is not running")?;
        guard.kill()?;
        Ok(())
    }

    /// The CA's pid, if it runs.
    pub fn control_pid(&self) -> Option<u32> {
        let mut control = self.control_guard();
        let guard = control.as_mut()?;
        guard.is_running().then(|| guard.pid())
    }

    /// The CA's admin `/config_dump` (roots, pods by node, the last issuances), parsed.
    pub fn control_dump(&self) -> Result<serde_json::Value> {
        let r = self.control_http(CONTROL_ADMIN_PORT, "GET", "/config_dump")?;
        if r.status != 200 {
            bail!("CA /config_dump: status {}: {}", r.status, r.text());
        }
        serde_json::from_str(&r.text()).context("parse the CA's /config_dump")
    }

    /// The CA's Prometheus text (`:15020/metrics`, `mesh_ca_*`).
    pub fn control_metrics(&self) -> Result<String> {
        let r = self.control_http(CONTROL_METRICS_PORT, "GET", "/metrics")?;
        if r.status != 200 {
            bail!("CA /metrics: status {}", r.status);
        }
        Ok(r.text())
    }

    fn control_http(&self, port: u16, method: &str, path: &str) -> Result<HttpResponse> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut stream = in_netns(&self.control_netns(), move || {
            TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT)
        })?
        .with_context(|| format!("connect to {addr} in the CA's namespace"))?;
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        http::request(&mut stream, method, &addr.to_string(), path, b"")
    }

    // === tokens ===

    /// Mints a token the CA accepts for `<namespace>/<service_account>` (bound to `node`, for
    /// a node agent) into `<work>/tokens/<file>`, with `control token`.
    pub fn mint_token(
        &self,
        file: &str,
        namespace: &str,
        service_account: &str,
        node: Option<&str>,
    ) -> Result<PathBuf> {
        if file.contains('/') || file.starts_with('.') {
            bail!("token file name {file:?} must be a plain file name");
        }
        let out = self.work_dir().join("tokens").join(file);
        let mut cmd = Command::new(self.binaries.control()?);
        cmd.arg("token")
            .arg("--ca-dir")
            .arg(self.ca_dir())
            .args([
                "--namespace",
                namespace,
                "--service-account",
                service_account,
            ])
            .args(node.iter().flat_map(|n| ["--node", n]))
            .arg("--out")
            .arg(&out)
            .env(MARKER_ENV, &self.prefix);
        run(&mut cmd)?;
        Ok(out)
    }

    /// The token of `node`'s agent, bound to `bound_to` (its own node, unless stolen).
    pub(crate) fn node_token(&self, node: &str, bound_to: &str) -> Result<PathBuf> {
        self.mint_token(
            &format!("node-{node}.token"),
            NODE_AGENT_NAMESPACE,
            NODE_AGENT_ACCOUNT,
            Some(bound_to),
        )
    }

    /// The flags of a CA client (agent or waypoint) presenting `token`.
    pub(crate) fn ca_client_args(&self, token: &Path) -> Vec<std::ffi::OsString> {
        vec![
            "--ca-address".into(),
            self.ca_address().into(),
            "--ca-root-file".into(),
            self.ca_root_file().into_os_string(),
            "--ca-token-file".into(),
            token.as_os_str().to_owned(),
            "--ca-server-name".into(),
            CA_SERVER_NAME.into(),
        ]
    }
}
