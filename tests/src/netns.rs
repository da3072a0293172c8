//! Named network namespaces: create, enter (from a throwaway thread), sweep.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::sys::{ip, MARKER_ENV};
use crate::wait::wait_until;

/// Where `ip netns` keeps its bind mounts.
const NETNS_DIR: &str = "/var/run/netns";

/// Every prefix the harness generates starts with this; sweeps refuse anything else so they
/// can never delete a namespace that is not ours.
pub(crate) const PREFIX_HEAD: &str = "mt";

pub(crate) fn netns_path(name: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(name)
}

/// Runs `f` on a fresh thread that has entered network namespace `netns`.
///
/// A network namespace belongs to a thread, so the harness never switches the calling thread:
/// a socket created inside `f` stays in `netns` for its whole life and can be returned and used
/// from any thread (e.g. a `TcpStream` connected from inside a pod).
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    let path = netns_path(netns);
    let handle = File::open(&path).with_context(|| format!("open netns {}", path.display()))?;
    std::thread::scope(|scope| {
        let worker = std::thread::Builder::new()
            .name(format!("netns-{netns}"))
            .spawn_scoped(scope, move || -> Result<T> {
                setns(&handle, CloneFlags::CLONE_NEWNET)
                    .with_context(|| format!("setns into netns {netns}"))?;
                Ok(f())
            })
            .with_context(|| format!("spawn a thread for netns {netns}"))?;
        worker
            .join()
            .map_err(|_| anyhow!("closure panicked inside netns {netns}"))?
    })
}

/// Creates a named network namespace with loopback up and IPv6 off. IPv6 is off because its
/// autoconfiguration chatter (router solicitations, MLD) would otherwise cross the wire and
/// make captures noisy; the mesh under test is IPv4.
pub(crate) fn create(name: &str) -> Result<()> {
    ip(&["netns", "add", name])?;
    write_sysctl(name, "net/ipv6/conf/all/disable_ipv6", "1")?;
    write_sysctl(name, "net/ipv6/conf/default/disable_ipv6", "1")?;
    ip(&["-n", name, "link", "set", "lo", "up"])?;
    Ok(())
}

/// Writes `/proc/sys/<key>` as seen from inside `netns` (net sysctls are per namespace and
/// resolved against the opening thread's namespace).
pub(crate) fn write_sysctl(netns: &str, key: &str, value: &str) -> Result<()> {
    let path = Path::new("/proc/sys").join(key);
    in_netns(netns, || std::fs::write(&path, value))?
        .with_context(|| format!("write sysctl {} = {value} in netns {netns}", path.display()))
}

/// Names of the namespaces under `/var/run/netns` starting with `prefix`.
pub(crate) fn list(prefix: &str) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read {NETNS_DIR}")),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.with_context(|| format!("read {NETNS_DIR}"))?;
        if let Some(name) = entry.file_name().to_str() {
            if name.starts_with(prefix) {
                names.push(name.to_owned());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// Pids of the processes living in `netns`.
fn pids_in(netns: &str) -> Result<Vec<i32>> {
    let out = ip(&["netns", "pids", netns])?;
    let own = std::process::id();
    // Belt and braces: whatever `ip` reports, never touch a process that shares the test
    // runner's own namespace (the host's, normally).
    let own_netns = std::fs::read_link("/proc/self/ns/net").ok();
    Ok(out
        .split_whitespace()
        .filter_map(|p| p.parse::<i32>().ok())
        .filter(|&pid| u32::try_from(pid).is_ok_and(|p| p != own))
        .filter(|pid| {
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
            theirs.is_some() && theirs != own_netns
        })
        .collect())
}

/// Pids whose environment carries the harness marker with a value starting with `prefix`.
/// Processes vanish while we scan; an unreadable entry is simply not ours.
fn marked_pids(prefix: &str) -> Vec<i32> {
    let own = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let needle = format!("{MARKER_ENV}={prefix}");
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<i32>().ok())
        .filter(|&pid| u32::try_from(pid).is_ok_and(|p| p != own))
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/environ")).is_ok_and(|env| {
                env.split(|&b| b == 0)
                    .any(|var| var.starts_with(needle.as_bytes()))
            })
        })
        .collect()
}

/// A process is gone once /proc forgets it, or it is a zombie waiting for its parent (our own
/// children are reaped by their [`crate::ChildGuard`]).
fn is_gone(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// What a sweep removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct StaleCleanup {
    /// Namespaces deleted.
    pub netns: Vec<String>,
    /// Processes killed.
    pub killed: Vec<i32>,
    /// bpffs mounts (the eBPF backend's pins) unmounted.
    pub bpffs: Vec<PathBuf>,
}

/// Kills every process inside a namespace whose name starts with `prefix` or carrying the
/// harness marker for it, then deletes those namespaces.
///
/// `prefix` must start with `mt` (all harness prefixes do), so a sweep can never touch
/// somebody else's namespaces. `cleanup_stale("mt")` removes the leftovers of every test run;
/// do not call it while other meshes of the same run are alive.
pub fn cleanup_stale(prefix: &str) -> Result<StaleCleanup> {
    if !prefix.starts_with(PREFIX_HEAD) {
        bail!("refusing to sweep prefix {prefix:?}: harness prefixes start with {PREFIX_HEAD:?}");
    }
    let names = list(prefix)?;
    let mut victims = marked_pids(prefix);
    for name in &names {
        victims.extend(pids_in(name)?);
    }
    victims.sort_unstable();
    victims.dedup();
    for &pid in &victims {
        // ESRCH just means it already exited.
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    wait_until(
        &format!("processes of prefix {prefix} to exit"),
        Duration::from_secs(10),
        || Ok(victims.iter().all(|&pid| is_gone(pid))),
    )?;
    for name in &names {
        ip(&["netns", "del", name])?;
    }
    let bpffs = crate::bpffs::unmount_stale(prefix)?;
    Ok(StaleCleanup {
        netns: names,
        killed: victims,
        bpffs,
    })
}
