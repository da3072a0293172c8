//! The real `ztunnel` binary serving the pods of namespaces a test built: started in the
//! test's node namespace with `--config-dir` and one capture backend, its endpoints read from
//! inside that namespace. Killed on drop (then its private bpffs, if any, is unmounted).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ztunnel::netns::Netns;

use super::netns::TestNetns;
use super::process::spawn_agent;

/// The agent's readiness and metrics listeners (their defaults, in the node namespace).
const READINESS_PORT: u16 = 15021;
const METRICS_PORT: u16 = 15020;

/// The agent, its log file and the namespace it runs in.
pub struct Agent {
    child: Child,
    log: PathBuf,
    node: Netns,
    home: Netns,
    /// After `child` (fields drop in order): unmounted once the agent is gone.
    _bpffs: Option<Bpffs>,
}

impl Agent {
    /// Starts the agent of node `n1` in `node`, reading its config from `dir` (its CA and log
    /// go there too), finding pods' namespaces by `prefix`, capturing with `backend`
    /// (`ebpf` pins in a bpffs of its own under `dir`).
    pub fn start(node: &TestNetns, dir: &Path, prefix: &str, backend: &str) -> Result<Agent> {
        let bpffs = match backend {
            "ebpf" => Some(Bpffs::mount(dir)?),
            _ => None,
        };
        let log = dir.join("ztunnel.log");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &node.name, env!("CARGO_BIN_EXE_ztunnel")])
            .args(["--node-name", "n1", "--config-dir"])
            .arg(dir)
            .arg("--ca-dir")
            .arg(dir.join("ca"))
            .args(["--netns-prefix", prefix, "--redirect", backend]);
        if let Some(fs) = &bpffs {
            cmd.arg("--bpf-fs").arg(&fs.path);
        }
        let child = spawn_agent(cmd, &log, prefix)?;
        Ok(Agent {
            child,
            log,
            node: Netns::open(&node.path())?,
            home: Netns::current()?,
            _bpffs: bpffs,
        })
    }

    pub fn check_running(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("ztunnel exited ({status}):\n{}", self.log());
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until `/healthz/ready` answers 200: every pod enrolled (its listeners bound and
    /// its capture installed) and certified.
    pub fn wait_ready(&mut self, within: Duration) -> Result<()> {
        let deadline = Instant::now() + within;
        loop {
            self.check_running()?;
            if self
                .get(READINESS_PORT, "/healthz/ready")
                .is_ok_and(|reply| reply.starts_with("HTTP/1.1 200"))
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not ready within {within:?}; agent log:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The body of `/metrics`.
    pub fn metrics(&self) -> Result<String> {
        let reply = self.get(METRICS_PORT, "/metrics")?;
        let (head, body) = reply.split_once("\r\n\r\n").context("no end of headers")?;
        if !head.starts_with("HTTP/1.1 200") {
            bail!("/metrics: {head}");
        }
        Ok(body.to_owned())
    }

    /// `GET path` on the agent's `port` (HTTP/1.1, closed after the answer): the whole reply.
    fn get(&self, port: u16, path: &str) -> Result<String> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let timeout = Duration::from_secs(2);
        let mut tcp = self
            .node
            .run(&self.home, || TcpStream::connect_timeout(&addr, timeout))??;
        tcp.set_read_timeout(Some(timeout))?;
        write!(
            tcp,
            "GET {path} HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n"
        )?;
        let mut reply = String::new();
        tcp.read_to_string(&mut reply)?;
        Ok(reply)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A private bpffs for the agent's pins, under a test's directory; unmounted on drop.
struct Bpffs {
    path: PathBuf,
}

impl Bpffs {
    fn mount(dir: &Path) -> Result<Bpffs> {
        let path = dir.join("bpffs");
        std::fs::create_dir(&path)?;
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&path)
            .status()?;
        if !status.success() {
            bail!("mount a bpffs at {}: {status}", path.display());
        }
        Ok(Bpffs { path })
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
    }
}
