//! Traffic redirection inside a pod's network namespace, with two backends that behave the
//! same from the outside:
//! - [`ebpf`] (the default where the kernel allows it): an `sk_lookup` program hands new
//!   connections to the agent's listeners without rewriting addresses, plus policy routing
//!   that makes the application's outgoing TCP visible to it;
//! - [`nft`]: nftables NAT rules and conntrack.
//!
//! [`resolve`] picks the backend at startup (`--redirect auto` tries eBPF, then falls back to
//! nftables, saying why).
//!
//! How a connection is captured:
//! - **eBPF**: policy routing sends the pod's own TCP (`iif lo ipproto tcp`, unmarked) to
//!   table 133, whose `local default dev lo` route delivers it locally, where the `sk_lookup`
//!   program `ebpf/src/capture.bpf.c` hands the SYN to the agent's 15001 listener of its
//!   family (`IP_TRANSPARENT`); inbound SYNs from outside the pod (except to 15008, from the probe
//!   source, or the agent's own announced deliveries) go to 15006. No address is rewritten:
//!   the accepted socket's `local_addr()` is the original destination. The link and maps are
//!   pinned under `<bpf-fs>/ztunnel/<ns>_<pod>_<netns inode>/` so they outlive the agent,
//!   which adopts them when it restarts (the pod fails closed meanwhile).
//! - **nftables**: NAT redirects to 127.0.0.1:15001 (IPv6: [::1]:15001) / :15006; the
//!   original destination is `SO_ORIGINAL_DST`.
//!
//! Either way a connection reaches a listener of its own address family: a pod with an IPv6
//! address gets a 15001 listener on 127.0.0.1 and one on [::1] (a socket bound to [::1] is
//! v6-only), and its 15006 and 15008 on [::] take both families (`workloads.rs`).
//!
//! Node probes (kubelet) are not captured: the node SNATs its own connections to pods to
//! `169.254.7.127` (as Istio's CNI does) and the pod's rules let that source through. That
//! exemption is only safe where the node also drops every packet with that source which it
//! *forwards* (from a pod, or from another node), so no pod can pose as the probe: both rules
//! belong to the node-level, CNI-equivalent part of an installation (the agent has no access
//! to the node's namespace in a cluster); in the local mesh the harness installs both on each
//! node (`tests/src/harness.rs`, `node_probe_rules`). Every socket the agent opens in a pod
//! carries `SO_MARK 0x539`, which both backends let through, so the agent never captures
//! itself; a pod that sets the mark itself (it needs `NET_ADMIN`) only skips its own
//! outbound capture: marks do not cross namespaces, so every destination still captures it.
//!
//! IPv6 in a pod the mesh knows only IPv4 addresses of fails closed on both backends
//! ([`block_ipv6`]: a `prohibit` policy-routing rule for the pod's own IPv6 TCP; inbound IPv6
//! finds no agent listener and is refused); a pod with an IPv6 address gets its IPv6 captured
//! like its IPv4 ([`captures_ipv6`]), DNS included. UDP other than the pod's DNS (with
//! `--dns-capture`, see `dns.rs`) and other protocols are not captured. What this leaves
//! open, and the Kubernetes settings that close it, is README's "What the mesh does not
//! protect against"; `tests/tests/bypass_capture.rs` tries each escape.

pub mod ebpf;
pub mod nft;
#[cfg(test)]
pub(crate) mod testing;

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::Redirect;

/// Policy-routing preference of the IPv6 block ([`block_ipv6`]), the same in both backends and
/// checked before every other rule of theirs (all are below the kernel's `main` rule, 32766).
pub const PREF_NO_IPV6: u32 = 31988;

#[derive(Debug, thiserror::Error)]
pub enum RedirectError {
    #[error("run {cmd} in netns {netns}: {source}")]
    Spawn {
        cmd: String,
        netns: PathBuf,
        source: std::io::Error,
    },
    #[error("{cmd} in netns {netns} failed: {stderr}")]
    Failed {
        cmd: String,
        netns: PathBuf,
        stderr: String,
    },
    #[error("bpffs at {path}: {reason}")]
    Bpffs { path: PathBuf, reason: String },
    #[error("ebpf capture in netns {netns}: {source}")]
    Capture {
        netns: PathBuf,
        // Boxed: aya's errors are large, and this enum travels on every enrollment path.
        source: Box<::ebpf::CaptureError>,
    },
}

/// Turns the configured backend into the one the agent runs: `auto` becomes `ebpf` when the
/// kernel loads the capture program and a bpffs is (or can be) mounted at `bpf_fs`, else
/// `nftables`; an explicit `ebpf` that cannot work is an error (the operator asked for it).
pub fn resolve(requested: Redirect, bpf_fs: &Path) -> Result<Redirect, RedirectError> {
    match requested {
        Redirect::Auto => match ebpf::available(bpf_fs) {
            Ok(()) => Ok(Redirect::Ebpf),
            Err(e) => {
                tracing::warn!(error = %e, "eBPF redirection unavailable; using nftables");
                Ok(Redirect::Nftables)
            }
        },
        Redirect::Ebpf => ebpf::available(bpf_fs).map(|()| Redirect::Ebpf),
        other => Ok(other),
    }
}

/// Whether the capture takes the IPv6 of a pod with addresses `ips` (TCP, and DNS with
/// `--dns-capture`): when the mesh knows an IPv6 address of it. Otherwise its IPv6 TCP fails
/// closed ([`block_ipv6`]) and its IPv6 DNS is left alone.
pub fn captures_ipv6(ips: &[IpAddr]) -> bool {
    ips.iter().any(IpAddr::is_ipv6)
}

/// Whether `netns` holds redirection state an agent installed (either backend): a policy
/// routing rule to the agent's table, or the nftables table. Two cheap commands, so that a
/// restarted agent can look at every pod of its node and only clean where needed.
pub fn has_leftovers(netns: &Path) -> bool {
    let table = format!("lookup {}", crate::config::INBOUND_ROUTE_TABLE);
    let rules = output_in(netns, &["ip", "rule", "show"]).unwrap_or_default();
    let tables = output_in(netns, &["nft", "list", "tables"]).unwrap_or_default();
    rules.contains(&table)
        || tables
            .lines()
            .any(|l| l.trim() == format!("table inet {}", nft::TABLE))
}

/// Fails closed for IPv6 TCP in a pod the mesh knows no IPv6 address of (an IPv4-only mesh
/// whose pods still have IPv6, e.g. link-local addresses): a policy-routing rule whose action
/// is `prohibit` makes the pod's own IPv6 TCP to anything but its local addresses (`::1`, its
/// link-local ones: the kernel's `local` table comes first) fail at `connect()` with
/// `EACCES`, marked or not. (A `prohibit` route in a table would not do: a link-local
/// destination is looked up for its interface only, and a route without that interface is
/// skipped.) Inbound IPv6 TCP is refused by each backend's capture on its own: no IPv6
/// listener takes it. A pod with an IPv6 address gets none of this: its IPv6 is captured like
/// its IPv4. Idempotent; a kernel without IPv6 needs nothing.
fn block_ipv6(netns: &Path, ips: &[IpAddr]) -> Result<(), RedirectError> {
    if captures_ipv6(ips) || !Path::new("/proc/net/if_inet6").exists() {
        unblock_ipv6(netns);
        return Ok(());
    }
    // Kept if there (an earlier agent's, or this one's before an upgrade): never a moment
    // without it.
    if rule_exists(netns, "-6", PREF_NO_IPV6) {
        return Ok(());
    }
    let pref = PREF_NO_IPV6.to_string();
    run_in(
        netns,
        &[
            "ip", "-6", "rule", "add", "pref", &pref, "iif", "lo", "ipproto", "tcp", "prohibit",
        ],
        None,
    )
}

/// Whether `netns` has a policy-routing rule at preference `pref` (`family`: `-4`/`-6`).
/// Each of the agent's preferences holds one kind of rule, so installing adds only what is
/// missing and never deletes first: a rule deleted and added again, even within
/// milliseconds, lets the packets of established connections (an upgrade's old agent's)
/// leave the pod unrouted in between, and their peers reset them.
fn rule_exists(netns: &Path, family: &str, pref: u32) -> bool {
    let pref = pref.to_string();
    output_in(netns, &["ip", family, "rule", "show", "pref", &pref])
        .is_ok_and(|out| !out.trim().is_empty())
}

/// Removes what [`block_ipv6`] added; a missing rule is not an error.
fn unblock_ipv6(netns: &Path) {
    let pref = PREF_NO_IPV6.to_string();
    // One rule per `del`; a namespace holds at most the one we added (bounded anyway).
    for _ in 0..16 {
        if run_in(netns, &["ip", "-6", "rule", "del", "pref", &pref], None).is_err() {
            break;
        }
    }
}

/// One TCP socket of a namespace, as `ss` lists it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpSocket {
    pub local: SocketAddr,
    pub peer: SocketAddr,
    /// `SO_MARK` (0 when unset).
    pub mark: u32,
}

/// Every TCP socket of `netns` whose application may still send: connected states but
/// `TIME-WAIT` (closed on both sides; at most a last ACK is resent).
pub fn connected_tcp(netns: &Path) -> Result<Vec<TcpSocket>, RedirectError> {
    let out = output_in(
        netns,
        &[
            "ss",
            "-H",
            "-t",
            "-n",
            "-e",
            "state",
            "connected",
            "exclude",
            "time-wait",
        ],
    )?;
    Ok(out.lines().filter_map(parse_ss_line).collect())
}

/// One line of `ss -H -t -n -e state connected`: state, queues, local and peer address, then
/// `key:value` details among which `fwmark:0x...` when a mark is set.
fn parse_ss_line(line: &str) -> Option<TcpSocket> {
    let mut fields = line.split_whitespace();
    let _state = fields.next()?;
    let (_recv_q, _send_q) = (fields.next()?, fields.next()?);
    let local = parse_ss_addr(fields.next()?)?;
    let peer = parse_ss_addr(fields.next()?)?;
    let mark = fields
        .find_map(|f| f.strip_prefix("fwmark:"))
        .and_then(|m| u32::from_str_radix(m.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0);
    Some(TcpSocket { local, peer, mark })
}

/// `10.0.0.1:80`, `[fd00::1]:80`, `[::ffff:10.0.0.1]:80` (as the IPv4 address it maps) or
/// `[fe80::1%eth0]:22` (scope dropped).
fn parse_ss_addr(field: &str) -> Option<SocketAddr> {
    let (host, port) = field.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let host = host.split('%').next()?;
    let ip: IpAddr = host.parse().ok()?;
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    Some(SocketAddr::new(ip, port.parse().ok()?))
}

/// Runs `args` inside `netns` and returns what it printed.
fn output_in(netns: &Path, args: &[&str]) -> Result<String, RedirectError> {
    let cmd = args.join(" ");
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| RedirectError::Spawn {
            cmd: cmd.clone(),
            netns: netns.to_path_buf(),
            source,
        })?;
    if !out.status.success() {
        return Err(RedirectError::Failed {
            cmd,
            netns: netns.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `args` inside `netns` (with `nsenter`), feeding `stdin` if given.
fn run_in(netns: &Path, args: &[&str], stdin: Option<&str>) -> Result<(), RedirectError> {
    let cmd = args.join(" ");
    let spawn_err = |source| RedirectError::Spawn {
        cmd: cmd.clone(),
        netns: netns.to_path_buf(),
        source,
    };
    let mut child = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .arg("--")
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(input.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(RedirectError::Failed {
            cmd,
            netns: netns.to_path_buf(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ss_lines_give_both_ends_and_the_mark() {
        let marked = "ESTAB 0      0      10.0.1.2:58458 10.0.2.3:9000  ino:15902107 sk:1302 fwmark:0x539 cgroup:unreachable:1 <->";
        assert_eq!(
            parse_ss_line(marked),
            Some(TcpSocket {
                local: "10.0.1.2:58458".parse().unwrap(),
                peer: "10.0.2.3:9000".parse().unwrap(),
                mark: 0x539,
            })
        );
        let v6 = "SYN-SENT 0 1 [fd00::2]:40000 [fe80::1%eth0]:22 ino:1 sk:2 <->";
        let s = parse_ss_line(v6).unwrap();
        assert_eq!(s.local, "[fd00::2]:40000".parse().unwrap());
        assert_eq!(s.peer, "[fe80::1]:22".parse().unwrap());
        assert_eq!(s.mark, 0);
        let mapped = "ESTAB 0 0 [::ffff:10.0.1.2]:8080 [::ffff:10.0.2.3]:5000";
        let s = parse_ss_line(mapped).unwrap();
        assert_eq!(s.local, "10.0.1.2:8080".parse().unwrap());
        assert_eq!(parse_ss_line("garbage"), None);
        assert_eq!(parse_ss_line("ESTAB 0 0 *:* 10.0.0.1:1"), None);
    }
}
