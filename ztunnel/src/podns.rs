//! Pod → network namespace lookup by pod IP, for a cluster without our CNI plugin.
//!
//! To enroll a pod the agent must open sockets inside the pod's network namespace, so it
//! needs a handle on it. Istio's ztunnel is told: its CNI plugin runs when the kubelet creates
//! the pod sandbox and passes the namespace over a Unix socket. We ship no CNI plugin, so in a
//! cluster this module finds it: every pod's processes (the sandbox `pause` process at least)
//! live in the pod's namespace, and with `hostPID: true` the agent sees them in `/proc`.
//!
//! The lookup scans `/proc/<pid>/ns/net` of every process, keeps one candidate per namespace
//! (identified by the nsfs device and inode, so a namespace shared by many processes is
//! entered once), skips the agent's own and the host's namespace (`/proc/1`), enters each
//! candidate ([`Netns::run`]) and lists its interface addresses with `getifaddrs(3)`, whose
//! netlink socket belongs to the namespace the thread is in. The namespace holding the pod IP
//! is returned as an open [`Netns`], which keeps it alive even after every process left.
//! A named namespace (`/var/run/netns`) is not needed.
//!
//! A scan records the addresses of every namespace it entered, so enrolling all the pods of a
//! node costs one scan. A cached entry is only a hint: it is used after checking that the
//! process still exists and is still in the same namespace (pid reuse) and that the namespace
//! still has the IP (pod IPs are reused); otherwise it is dropped and `/proc` is scanned again.
//!
//! Everything here blocks and switches the calling thread's namespace: call it from
//! `tokio::task::spawn_blocking`, never directly on a runtime worker.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::netns::{Netns, NetnsError};

/// Where the kernel shows processes.
pub const PROC_ROOT: &str = "/proc";

#[derive(Debug, thiserror::Error)]
pub enum PodNsError {
    #[error("scan {}: {source}", path.display())]
    Scan {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("stat netns of the agent ({}): {source}", path.display())]
    Home {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Netns(#[from] NetnsError),
    #[error("list addresses in netns {}: getifaddrs: {source}", path.display())]
    Addresses { path: PathBuf, source: nix::Error },
    #[error(
        "no network namespace has address {ip} (scanned {scanned} namespaces of running processes)"
    )]
    NotFound { ip: IpAddr, scanned: usize },
}

/// A network namespace as the kernel identifies it: the nsfs device and inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NsId {
    pub dev: u64,
    pub inode: u64,
}

/// The namespace holding a pod IP.
#[derive(Debug)]
pub struct PodNetns {
    /// Open handle: keeps the namespace alive while held.
    pub netns: Netns,
    /// A process that was in the namespace when it was found.
    pub pid: u32,
    pub id: NsId,
    /// Found through the cache (checked) rather than a scan.
    pub cached: bool,
}

/// Where a scan saw an address.
#[derive(Clone, Copy, Debug)]
struct Seen {
    pid: u32,
    id: NsId,
}

/// Finds pod network namespaces by IP; shareable across threads.
pub struct PodNetnsFinder {
    proc_root: PathBuf,
    home: Arc<Netns>,
    /// The agent's own and the host's namespace: never a pod's.
    skip: HashSet<NsId>,
    cache: Mutex<HashMap<IpAddr, Seen>>,
}

// === impl PodNetnsFinder ===

impl PodNetnsFinder {
    /// `home` is the agent's namespace (where every switch returns to).
    pub fn new(home: Arc<Netns>) -> Result<PodNetnsFinder, PodNsError> {
        PodNetnsFinder::with_proc_root(home, Path::new(PROC_ROOT))
    }

    pub fn with_proc_root(
        home: Arc<Netns>,
        proc_root: &Path,
    ) -> Result<PodNetnsFinder, PodNsError> {
        let mut skip = HashSet::new();
        skip.insert(ns_id(home.path()).map_err(|source| PodNsError::Home {
            path: home.path().to_path_buf(),
            source,
        })?);
        // Without `hostPID` pid 1 is the agent's own init, already skipped; unreadable
        // means we could not enter it anyway.
        if let Ok(host) = ns_id(&proc_root.join("1/ns/net")) {
            skip.insert(host);
        }
        Ok(PodNetnsFinder {
            proc_root: proc_root.to_path_buf(),
            home,
            skip,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The network namespace whose interfaces carry `ip`.
    pub fn find(&self, ip: IpAddr) -> Result<PodNetns, PodNsError> {
        if let Some(seen) = self.cached(ip) {
            if let Some(found) = self.verify(seen, ip)? {
                return Ok(found);
            }
            tracing::debug!(%ip, pid = seen.pid, "cached netns is stale; rescanning");
        }
        self.scan(ip)
    }

    fn cached(&self, ip: IpAddr) -> Option<Seen> {
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        cache.get(&ip).copied()
    }

    /// Re-checks a cache entry: same process, same namespace, address still there.
    fn verify(&self, seen: Seen, ip: IpAddr) -> Result<Option<PodNetns>, PodNsError> {
        let Some(netns) = self.open(seen.pid, seen.id) else {
            return Ok(None);
        };
        if !self.addresses(&netns)?.contains(&ip) {
            return Ok(None);
        }
        Ok(Some(PodNetns {
            netns,
            pid: seen.pid,
            id: seen.id,
            cached: true,
        }))
    }

    /// Enters every process's namespace once, replacing the cache with what it saw.
    fn scan(&self, ip: IpAddr) -> Result<PodNetns, PodNsError> {
        let scan_err = |source| PodNsError::Scan {
            path: self.proc_root.clone(),
            source,
        };
        let mut visited = HashSet::new();
        let mut seen_ips = HashMap::new();
        let mut found = None;
        for entry in std::fs::read_dir(&self.proc_root).map_err(scan_err)? {
            let entry = entry.map_err(scan_err)?;
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            // Processes come and go during the scan; one that is gone or not ours to read
            // is simply not a candidate.
            let Ok(id) = ns_id(&self.netns_path(pid)) else {
                continue;
            };
            if self.skip.contains(&id) || !visited.insert(id) {
                continue;
            }
            let Some(netns) = self.open(pid, id) else {
                continue;
            };
            let addrs = self.addresses(&netns)?;
            for addr in &addrs {
                seen_ips.insert(*addr, Seen { pid, id });
            }
            if found.is_none() && addrs.contains(&ip) {
                found = Some(PodNetns {
                    netns,
                    pid,
                    id,
                    cached: false,
                });
            }
        }
        let scanned = visited.len();
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = seen_ips;
        tracing::debug!(%ip, scanned, found = found.is_some(), "scanned process netns");
        found.ok_or(PodNsError::NotFound { ip, scanned })
    }

    /// Opens `/proc/<pid>/ns/net` if the process still exists and is still in namespace
    /// `expect`. Checked on the open handle, so a pid reused since the caller's stat cannot
    /// slip another namespace in.
    fn open(&self, pid: u32, expect: NsId) -> Option<Netns> {
        let netns = Netns::open(&self.netns_path(pid)).ok()?;
        let st = nix::sys::stat::fstat(&netns).ok()?;
        let id = NsId {
            dev: st.st_dev,
            inode: st.st_ino,
        };
        (id == expect).then_some(netns)
    }

    /// Every address on every interface of `netns`, up or down.
    fn addresses(&self, netns: &Netns) -> Result<Vec<IpAddr>, PodNsError> {
        let listed = netns.run(&self.home, || {
            nix::ifaddrs::getifaddrs().map(|addrs| {
                addrs
                    .filter_map(|a| {
                        let addr = a.address?;
                        if let Some(v4) = addr.as_sockaddr_in() {
                            Some(IpAddr::V4(v4.ip()))
                        } else {
                            addr.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                        }
                    })
                    .collect::<Vec<_>>()
            })
        })?;
        listed.map_err(|source| PodNsError::Addresses {
            path: netns.path().to_path_buf(),
            source,
        })
    }

    fn netns_path(&self, pid: u32) -> PathBuf {
        self.proc_root.join(pid.to_string()).join("ns/net")
    }
}

/// Identity of the namespace a `/proc/<pid>/ns/net`-like path points to.
pub fn ns_id(path: &Path) -> std::io::Result<NsId> {
    let meta = std::fs::metadata(path)?;
    Ok(NsId {
        dev: meta.dev(),
        inode: meta.ino(),
    })
}
