//! Network namespaces for these tests, removed on drop with the processes started in them.
//!
//! Names follow the e2e harness (`mt<6 hex>-<tag>`) and every process carries its marker
//! variable, so `cargo xtask clean` sweeps whatever a killed test run leaves behind.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

/// The variable the e2e harness and `cargo xtask clean` recognise test processes by.
pub const MARKER_ENV: &str = "MESH_E2E_PREFIX";

/// A per-process prefix in the harness's shape, `mt<6 hex>-`.
pub fn prefix() -> String {
    static SALT: AtomicU32 = AtomicU32::new(0);
    let salt = SALT.fetch_add(1, Ordering::Relaxed);
    let mixed = std::process::id().wrapping_mul(2_654_435_761) ^ salt.wrapping_mul(40_503);
    format!("mt{:06x}-", mixed & 0x00ff_ffff)
}

/// An address in 198.18.0.0/15 (benchmarking range, never routed) unique to this process and
/// `n`, so that concurrent runs on one machine do not collide.
pub fn test_ip(n: u8) -> Ipv4Addr {
    let pid = std::process::id();
    Ipv4Addr::new(198, 18 + (pid & 1) as u8, (pid >> 1) as u8, n)
}

pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A named network namespace with loopback up, and the processes started in it.
pub struct TestNetns {
    pub name: String,
    prefix: String,
    children: Vec<Child>,
}

impl TestNetns {
    pub fn new(prefix: &str, tag: &str) -> Result<TestNetns> {
        let name = format!("{prefix}{tag}");
        ip(&["netns", "add", &name])?;
        // From here on, drop removes it.
        let ns = TestNetns {
            name,
            prefix: prefix.to_owned(),
            children: Vec::new(),
        };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        PathBuf::from("/var/run/netns").join(&self.name)
    }

    /// Gives the namespace `addr/32` on `eth0`, as a pod has (one end of a veth pair whose
    /// other end stays in the namespace too: nothing leaves it).
    pub fn add_address(&self, addr: Ipv4Addr) -> Result<()> {
        let n = &self.name;
        ip(&[
            "-n", n, "link", "add", "eth0", "type", "veth", "peer", "name", "eth1",
        ])?;
        ip(&["-n", n, "addr", "add", &format!("{addr}/32"), "dev", "eth0"])?;
        ip(&["-n", n, "link", "set", "eth0", "up"])
    }

    /// Runs `f` on this thread inside the namespace, then returns to the test's: the sockets
    /// `f` makes stay in the namespace.
    pub fn run<T>(&self, f: impl FnOnce() -> T) -> Result<T> {
        let netns = ztunnel::netns::Netns::open(&self.path())?;
        Ok(netns.run(&ztunnel::netns::Netns::current()?, f)?)
    }

    /// Joins this namespace to `peer` with a veth pair (`eth0` in each), `addrs` on this end
    /// and `peer_addrs` on the other (any family, with their prefix length), both up. Nothing
    /// leaves the two namespaces.
    pub fn link(&self, addrs: &[String], peer: &TestNetns, peer_addrs: &[String]) -> Result<()> {
        ip(&[
            "link", "add", "name", "eth0", "netns", &self.name, "type", "veth", "peer", "name",
            "eth0", "netns", &peer.name,
        ])?;
        for (ns, addrs) in [(self, addrs), (peer, peer_addrs)] {
            for addr in addrs {
                // `nodad`: usable at once (no one else is on the link).
                ip(&["-n", &ns.name, "addr", "add", addr, "dev", "eth0", "nodad"])?;
            }
            ip(&["-n", &ns.name, "link", "set", "eth0", "up"])?;
        }
        Ok(())
    }

    /// Starts a long sleep inside the namespace (a pod's sandbox process) and returns its pid.
    pub fn spawn_sleeper(&mut self) -> Result<u32> {
        let child = Command::new("ip")
            .args(["netns", "exec", &self.name, "sleep", "600"])
            .env(MARKER_ENV, &self.prefix)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("start a process in netns {}", self.name))?;
        let pid = child.id();
        self.children.push(child);
        // `ip netns exec` enters the namespace, then execs: wait until the pid is inside.
        let target = std::fs::metadata(self.path()).context("stat the namespace")?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            use std::os::unix::fs::MetadataExt;
            if let Ok(m) = std::fs::metadata(format!("/proc/{pid}/ns/net")) {
                if m.ino() == target.ino() && m.dev() == target.dev() {
                    return Ok(pid);
                }
            }
            if std::time::Instant::now() > deadline {
                bail!("process {pid} did not enter netns {}", self.name);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Kills the processes started in the namespace.
    pub fn kill_processes(&mut self) {
        for mut child in self.children.drain(..) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        self.kill_processes();
        if let Err(e) = ip(&["netns", "del", &self.name]) {
            eprintln!("cleanup: {e:#}");
        }
    }
}

/// Fails clearly when the tests cannot create namespaces.
pub fn require_root() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let uid = std::fs::metadata("/proc/self")
        .context("stat /proc/self")?
        .uid();
    if uid != 0 {
        bail!("this test creates network namespaces and needs root (run as root or with sudo -E)");
    }
    Ok(())
}
