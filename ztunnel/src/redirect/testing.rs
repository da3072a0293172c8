//! For the tests that install capture in namespaces of their own (these modules' and
//! `dns.rs`'): a pod namespace and a node namespace joined by a veth pair, each with an IPv4
//! and an IPv6 (ULA) address, the node's side also holding the pod's IPv6 resolver; and a
//! private bpffs. Everything is removed on drop; nothing is sent outside these namespaces.
//! They need root: [`skip_unless_root`] tells the tests to skip otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::netns::Netns;

/// The pod's addresses.
pub const POD_IP4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 2);
pub const POD_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 2);
/// The node's IPv4 address, which is also the pod's IPv4 resolver.
pub const NODE_IP4: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 1);
/// The pod's IPv6 resolver, an address of the node's.
pub const NAMESERVER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x53);

/// The pod's resolver, IPv6 if `v6` else IPv4, port 53.
pub fn nameserver(v6: bool) -> SocketAddr {
    match v6 {
        false => SocketAddr::from((NODE_IP4, 53)),
        true => SocketAddr::from((NAMESERVER_IP6, 53)),
    }
}

/// Whether a test that creates namespaces must be skipped (it says so): not root.
pub fn skip_unless_root() -> bool {
    let skip = !nix::unistd::geteuid().is_root();
    if skip {
        eprintln!("skipped: needs root");
    }
    skip
}

/// A named network namespace (`ip netns add`) with loopback up; deleted on drop.
pub struct TestNs(pub String);

impl TestNs {
    pub fn new(tag: &str) -> TestNs {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let ns = TestNs(format!("zt-{tag}-{}-{n}", std::process::id()));
        sh(&["ip", "netns", "add", &ns.0]);
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.0)
    }

    /// Opens it as the agent does a pod's.
    pub fn open(&self) -> Netns {
        Netns::open(&self.path()).expect("open the test netns")
    }

    /// Runs `ip -n <this> <args>`; panics if it fails.
    pub fn ip(&self, args: &[&str]) {
        sh(&[&["ip", "-n", &self.0][..], args].concat());
    }

    /// What `args` print, run inside this namespace.
    pub fn output(&self, args: &[&str]) -> String {
        super::output_in(&self.path(), args).expect("run in the test netns")
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A pod namespace and a node namespace joined by a veth pair (`eth0` on both sides).
pub struct TestPod {
    pub pod: TestNs,
    pub node: TestNs,
}

impl TestPod {
    pub fn new(tag: &str) -> TestPod {
        let pod = TestNs::new(&format!("{tag}-pod"));
        let node = TestNs::new(&format!("{tag}-node"));
        // Created directly inside the two namespaces: nothing appears in this one.
        sh(&[
            "ip", "link", "add", "name", "eth0", "netns", &node.0, "type", "veth", "peer", "name",
            "eth0", "netns", &pod.0,
        ]);
        let node_addrs = [
            format!("{NODE_IP4}/24"),
            format!("{}/64", Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
            format!("{NAMESERVER_IP6}/64"),
        ];
        let pod_addrs = [format!("{POD_IP4}/24"), format!("{POD_IP6}/64")];
        for (ns, addrs) in [(&node, &node_addrs[..]), (&pod, &pod_addrs[..])] {
            for addr in addrs {
                // `nodad`: usable at once (no one else is on the link).
                ns.ip(&["addr", "add", addr, "dev", "eth0", "nodad"]);
            }
            ns.ip(&["link", "set", "eth0", "up"]);
        }
        TestPod { pod, node }
    }

    /// The pod's addresses, as the mesh knows them.
    pub fn ips(&self) -> Vec<IpAddr> {
        vec![POD_IP4.into(), POD_IP6.into()]
    }
}

/// A private bpffs on a fresh directory, unmounted on drop.
pub struct TestBpffs(pub tempfile::TempDir);

impl TestBpffs {
    pub fn mount() -> TestBpffs {
        let fs = TestBpffs(tempfile::tempdir().expect("tempdir"));
        sh(&["mount", "-t", "bpf", "bpf", &fs.0.path().to_string_lossy()]);
        fs
    }

    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for TestBpffs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// Runs `args`; panics with its stderr if it fails.
pub fn sh(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("spawn");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
