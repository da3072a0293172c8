//! eBPF backend: the `sk_lookup` capture program of the `ebpf` crate, plus the policy routing
//! that lets it see the application's outgoing connections.
//!
//! Per pod network namespace:
//! - the capture program, pinned under `<bpf-fs>/ztunnel/<netns file name>/` so that it
//!   outlives the agent (a restarted agent adopts it; while no agent listens the pod fails
//!   closed), with the pod's 15006 and 15001 listeners in its socket map (15001 one per
//!   address family the pod's outbound is captured in, see [`Outbound`]), and with DNS capture
//!   its 15053 UDP sockets and TCP listeners (one pair per address family the pod's DNS is
//!   captured in). In an upgrade the next agent adopts it while the old one still runs: its
//!   listeners replace the old one's in the map (one update each), and the old one leaves
//!   map and pins alone when it exits;
//! - policy routing, per address family the pod has (rules are ours by their preference):
//!   - [`PREF_PROBE`]: replies to the node's probe source leave normally (v4 only);
//!   - [`PREF_SKIP`]: anything the agent sends (socket mark [`SKIP_MARK`]) leaves normally;
//!   - [`PREF_HBONE_REPLIES`]: TCP the pod sends from its HBONE port leaves normally. Only
//!     the agent's marked connections and the kernel's resets use that port: while no agent
//!     listens (a restart), a peer's SYN to 15008 is answered with a reset that must reach
//!     it (the capture rule would deliver it locally, where it is lost, and the peer would
//!     wait a whole SYN retransmission, a second, instead of retrying at once). `iif lo`
//!     like the capture rule: a rule with ports and no `iif lo` makes the kernel dissect
//!     every received packet's ports for routing, and the capture rule then matches what
//!     comes back in over `lo` (measured: HBONE deliveries reset);
//!   - [`PREF_CAPTURE`]: every other TCP the pod sends (`iif lo`: locally generated) looks up
//!     table [`INBOUND_ROUTE_TABLE`], whose `local default dev lo src <pod address>` route
//!     delivers it locally, where the capture program hands new connections to the 15001
//!     listener of their family. The same rule brings the application's replies to inbound
//!     clients (whose addresses the agent borrows with transparent sockets) back to the
//!     agent.
//!   - [`PREF_DNS`] (with DNS capture, per family: IPv4, and IPv6 for a pod with an IPv6
//!     address): the UDP the pod sends to port 53 (`iif lo`, unmarked: the agent's own
//!     queries matched [`PREF_SKIP`] first) looks up the same table, so it is delivered
//!     locally too, where the capture program hands it to the agent's DNS socket of its
//!     family with its original destination intact. Its TCP to port 53 needs no rule of its
//!     own: the capture rule covers it, and the program picks the DNS listener of its family.
//!     Added in a family only once that family's DNS sockets are in the program's map (a
//!     datagram routed to `lo` with no DNS socket there is dropped), removed when the agent
//!     does not capture that family's DNS, and left out, with a warning, when the capture
//!     adopted from an earlier agent's program has no slots for it (a program from before
//!     DNS capture has none, one from before IPv6 DNS capture only IPv4's: that DNS then goes
//!     to its resolver directly until the pod is captured anew);
//!   - [`PREF_NO_IPV6`] (a pod without an IPv6 address only): its IPv6 TCP fails closed (see
//!     [`super::block_ipv6`]).
//!
//! Release without resets ([`stop_capture`]): replacing the broad capture rule by one exact
//! rule per connection still open ([`PREF_FLOW`]) keeps those connections routed to the agent
//! while every new connection leaves the pod directly. The DNS rule goes at once (the pod's
//! next query goes to its resolver; an answer the agent still sends is delivered, its
//! destination being the pod's own address). [`remove`] deletes the rest once the last one
//! has closed.
//!
//! Release without resets also covers connections the agent has not accepted yet: the pod's
//! sockets are listed ([`captured_flows`]) before the capture rule goes and once more after,
//! the application's segments other than SYNs held meanwhile ([`HoldSegments`]).
//!
//! Capture again without resets ([`install`] on a released pod): the connections the
//! application opened directly meanwhile (and those it accepted directly) would be routed to
//! the agent by the returning capture rule, which has no socket for them; one exact rule each
//! ([`PREF_DIRECT`], looked up before the capture rule) keeps them on the main table until
//! they close ([`sweep_direct`] removes the rules of closed ones). They are listed once the
//! capture rule is back, the application's segments other than SYNs held from just before it
//! returns until their rules are in ([`HoldSegments`]): none reaches the agent's listener,
//! which would reset it; a held segment is retransmitted a moment later.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use ::ebpf::{CaptureConfig, CaptureGuard};
use mesh_model::model::NamespacedName;

use super::{block_ipv6, rule_exists, run_in, unblock_ipv6, RedirectError, PREF_NO_IPV6};
use crate::config::{HBONE_PORT, INBOUND_ROUTE_TABLE, PROBE_SOURCE_IP, SKIP_MARK};
use crate::netns::Netns;

/// Rule preferences (lower is checked first); all below the kernel's `main` rule (32766).
pub const PREF_DIRECT: u32 = 31987;
pub const PREF_FLOW: u32 = 31989;
pub const PREF_PROBE: u32 = 31990;
pub const PREF_SKIP: u32 = 31991;
pub const PREF_HBONE_REPLIES: u32 = 31986;
pub const PREF_CAPTURE: u32 = 31992;
/// After [`PREF_SKIP`], so that the agent's own (marked) queries leave normally.
pub const PREF_DNS: u32 = 31993;
const OUR_PREFS: [u32; 8] = [
    PREF_HBONE_REPLIES,
    PREF_DIRECT,
    PREF_NO_IPV6,
    PREF_FLOW,
    PREF_PROBE,
    PREF_SKIP,
    PREF_CAPTURE,
    PREF_DNS,
];

/// The port whose UDP [`PREF_DNS`] routes to the capture.
const DNS_PORT: u16 = 53;

/// `f_type` of a bpffs mount (`BPF_FS_MAGIC` in linux/magic.h).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// One connection between the application and the agent that must keep being routed to the
/// agent while a released pod drains: `app` is the application's end (the pod's address),
/// `peer` the other end as the application sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Flow {
    pub app: SocketAddr,
    pub peer: SocketAddr,
}

/// Checks that the capture program loads and that `bpf_fs` is a bpffs (mounting one there if
/// nothing is mounted, as systemd does at boot).
pub fn available(bpf_fs: &Path) -> Result<(), RedirectError> {
    ensure_bpffs(bpf_fs)?;
    ::ebpf::probe().map_err(|source| RedirectError::Capture {
        netns: PathBuf::from("(probe)"),
        source: Box::new(source),
    })
}

fn ensure_bpffs(path: &Path) -> Result<(), RedirectError> {
    let err = |reason: String| RedirectError::Bpffs {
        path: path.to_path_buf(),
        reason,
    };
    let is_bpffs =
        |p: &Path| nix::sys::statfs::statfs(p).map(|s| s.filesystem_type().0 == BPF_FS_MAGIC);
    std::fs::create_dir_all(path).map_err(|e| err(format!("create: {e}")))?;
    if is_bpffs(path).map_err(|e| err(format!("statfs: {e}")))? {
        return Ok(());
    }
    let out = Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(path)
        .output()
        .map_err(|e| err(format!("run mount: {e}")))?;
    if !out.status.success() {
        return Err(err(format!(
            "not a bpffs, and mounting one failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    match is_bpffs(path) {
        Ok(true) => Ok(()),
        _ => Err(err("still not a bpffs after mounting".into())),
    }
}

/// Where a pod's capture is pinned: one directory per pod and network namespace,
/// `<namespace>_<pod>_<netns inode>`. bpffs refuses names containing `.` (reserved for the
/// kernel's own files), so dots in pod names become `_`, which Kubernetes names never contain,
/// so the mapping stays one-to-one. The inode tells a recreated pod (same name, new namespace)
/// from the one an earlier agent pinned: its capture is never adopted for the wrong namespace.
pub fn pin_dir(
    bpf_fs: &Path,
    pod: &NamespacedName,
    netns: &Netns,
) -> Result<PathBuf, RedirectError> {
    let inode = std::fs::metadata(netns.path())
        .map_err(|e| RedirectError::Bpffs {
            path: netns.path().to_path_buf(),
            reason: format!("stat the pod's netns: {e}"),
        })?
        .ino();
    Ok(pin_root(bpf_fs).join(format!("{}{inode}", pin_prefix(pod))))
}

/// The part of a pin directory's name that names the pod.
fn pin_prefix(pod: &NamespacedName) -> String {
    format!("{}_{}_", pod.namespace, pod.name).replace('.', "_")
}

/// The directory holding every pod's pins.
pub fn pin_root(bpf_fs: &Path) -> PathBuf {
    bpf_fs.join("ztunnel")
}

/// Whether `dir_name` is one of `pod`'s pin directories (any of its namespaces).
fn is_pin_of(dir_name: &str, pod: &NamespacedName) -> bool {
    dir_name
        .strip_prefix(&pin_prefix(pod))
        .is_some_and(|ino| !ino.is_empty() && ino.bytes().all(|b| b.is_ascii_digit()))
}

/// Removes every pin directory of `pods` (an uninstall): with no agent holding the link,
/// its program detaches. Returns what was removed; a failure is logged and skipped.
pub fn remove_pins_of(bpf_fs: &Path, pods: &[NamespacedName]) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(pin_root(bpf_fs)) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !pods.iter().any(|pod| is_pin_of(&name, pod)) {
            continue;
        }
        let path = entry.path();
        match std::fs::remove_dir_all(&path) {
            Ok(()) => removed.push(path),
            Err(e) => tracing::warn!(dir = %path.display(), error = %e, "remove capture pins"),
        }
    }
    removed
}

/// Removes the pins of captures no pod of `current` owns: pods deleted or released while no
/// agent ran (their programs detach once unpinned), and earlier namespaces of recreated pods.
/// A pod in `current` keeps only the directory `current` names for it. `wanted` pods that are
/// not enrolled yet (still pending) keep theirs, so they stay captured, failing closed, until
/// their enrollment adopts it.
pub fn sweep_pins(
    bpf_fs: &Path,
    current: &[(NamespacedName, PathBuf)],
    wanted: &[NamespacedName],
) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(pin_root(bpf_fs)) else {
        return Vec::new();
    };
    let mut removed = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let owner = |pod: &NamespacedName| is_pin_of(&name, pod);
        let keep = current.iter().any(|(pod, dir)| owner(pod) && *dir == path)
            || wanted
                .iter()
                .filter(|pod| !current.iter().any(|(c, _)| c == *pod))
                .any(owner);
        if !keep {
            match std::fs::remove_dir_all(&path) {
                Ok(()) => removed.push(path),
                Err(e) => {
                    tracing::warn!(dir = %path.display(), error = %e, "remove stale capture pins")
                }
            }
        }
    }
    removed
}

/// The pod's outbound (15001) listeners the capture hands the application's connections to,
/// one per address family: a listener bound to loopback takes no lookup of the other family
/// (the IPv6 one is v6-only), and nothing outside the pod may reach either.
#[derive(Clone, Copy, Debug)]
pub struct Outbound<'a> {
    /// On `127.0.0.1`.
    pub v4: &'a std::net::TcpListener,
    /// On `[::1]`, for a pod whose IPv6 is captured ([`super::captures_ipv6`]).
    pub v6: Option<&'a std::net::TcpListener>,
}

/// Installs (idempotently: adopts an earlier agent's attachment and replaces its rules) capture
/// in `netns` for a pod with addresses `ips`. `inbound` and `outbound` are the pod's 15006 and
/// 15001 listeners; the latter must be `IP_TRANSPARENT` (their connections' local address is
/// the original destination), and every agent socket in the pod must carry [`SKIP_MARK`]. If
/// the capture adopted from an earlier agent has one outbound slot for both families (its
/// program predates per-family outbound listeners), that slot takes `outbound.v6` as it did
/// then, and the pod's IPv4 connections out fail closed (a warning says so) until the pod is
/// captured anew.
///
/// `dns`: the pod's DNS sockets, to capture its DNS (UDP and TCP to port 53) of each family
/// they have a pair for to; see [`::ebpf::CaptureGuard::set_dns_listeners`] for what they
/// must be. `None` takes an earlier agent's DNS capture away. If the capture adopted from an
/// earlier agent cannot take them (its program predates DNS capture, or IPv6 DNS capture), a
/// warning is logged and that DNS goes to its resolver directly; the rest of the capture is
/// installed as usual.
pub fn install(
    netns: &Netns,
    ips: &[IpAddr],
    inbound: &impl AsRawFd,
    outbound: Outbound<'_>,
    pin_dir: &Path,
    dns: Option<&crate::dns::Sockets>,
) -> Result<CaptureGuard, RedirectError> {
    let config = CaptureConfig::new(HBONE_PORT).with_probe_source(PROBE_SOURCE_IP);
    // The program and the listeners first, so that the capture rule, once back, hands new
    // connections to this agent at once.
    let mut guard = ::ebpf::attach_capture_pinned(netns, inbound, &config, pin_dir)
        .map_err(|source| capture_err(netns.path(), source))?;
    if let Err(e) = register(&mut guard, netns.path(), ips, outbound, dns) {
        if guard.adopted() {
            // An earlier agent's capture, which it may still be serving: left as it was.
            guard.keep_pinned();
        }
        return Err(e);
    }
    Ok(guard)
}

fn capture_err(netns: &Path, source: ::ebpf::CaptureError) -> RedirectError {
    RedirectError::Capture {
        netns: netns.to_path_buf(),
        source: Box::new(source),
    }
}

/// The address families whose DNS the capture takes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct DnsFamilies {
    v4: bool,
    v6: bool,
}

impl DnsFamilies {
    /// Whether the DNS of `family` (`-4`/`-6`) is captured.
    fn has(self, family: &str) -> bool {
        match family {
            "-6" => self.v6,
            _ => self.v4,
        }
    }
}

/// Registers the outbound listeners and the DNS sockets, then installs the routing that sends
/// the pod's traffic to them.
fn register(
    guard: &mut CaptureGuard,
    netns: &Path,
    ips: &[IpAddr],
    outbound: Outbound<'_>,
    dns: Option<&crate::dns::Sockets>,
) -> Result<(), RedirectError> {
    register_outbound(guard, netns, outbound)?;
    // A family's DNS sockets that an adopted capture cannot take leave that family's DNS
    // alone (logged); any other failure fails the install.
    let taken = |guard: &CaptureGuard, set: Result<(), ::ebpf::CaptureError>, family: &str| {
        match set {
            Ok(()) => Ok(true),
            Err(e) if guard.adopted() => {
                tracing::warn!(netns = %netns.display(), family, error = %e, "the pod's DNS of this family is not captured: the capture adopted from an earlier agent cannot take its DNS sockets; that DNS goes to its resolver directly until the pod is captured anew");
                Ok(false)
            }
            Err(e) => Err(capture_err(netns, e)),
        }
    };
    let mut captured = DnsFamilies::default();
    if let Some(dns) = dns {
        let set = guard.set_dns_listeners(&dns.v4.udp, &dns.v4.tcp);
        captured.v4 = taken(guard, set, "IPv4")?;
        if let Some(v6) = &dns.v6 {
            let set = guard.set_dns6_listeners(&v6.udp, &v6.tcp);
            captured.v6 = taken(guard, set, "IPv6")?;
        }
    }
    install_routing(netns, ips, captured)?;
    // An earlier agent's DNS sockets of a family this agent does not capture, now that their
    // rule is gone: TCP to port 53 goes to this agent's outbound listener.
    match dns {
        None => guard.clear_dns_listeners(),
        Some(dns) if dns.v6.is_none() => guard.clear_dns6_listeners(),
        Some(_) => {}
    }
    Ok(())
}

/// Registers the outbound listener of each family, IPv6's first: a capture adopted from an
/// earlier agent may have no slot for it (see [`install`]), and then its one outbound slot
/// gets the IPv6 listener straight away (never the IPv4 one meanwhile, which would refuse
/// the pod's IPv6 connections out). Without an IPv6 listener, an earlier agent's is taken
/// out of its slot.
fn register_outbound(
    guard: &mut CaptureGuard,
    netns: &Path,
    outbound: Outbound<'_>,
) -> Result<(), RedirectError> {
    let err = |source| capture_err(netns, source);
    let Some(v6) = outbound.v6 else {
        guard.set_outbound_listener(outbound.v4).map_err(err)?;
        guard.clear_outbound6_listener();
        return Ok(());
    };
    match guard.set_outbound6_listener(v6) {
        Ok(()) => guard.set_outbound_listener(outbound.v4).map_err(err),
        Err(e @ ::ebpf::CaptureError::NoOutbound6Slot { .. }) if guard.adopted() => {
            tracing::warn!(netns = %netns.display(), error = %e, "the pod's IPv4 connections out fail closed: the capture adopted from an earlier agent has one outbound slot for both families, which keeps the IPv6 listener as that agent had it; the pod gets one per family once it is captured anew");
            guard.set_outbound_listener(v6).map_err(err)
        }
        Err(e) => Err(err(e)),
    }
}

/// Adds the rules that are missing and replaces the route (atomic), never deleting a rule
/// first (see [`super::rule_exists`]): an earlier agent's rules, which its established
/// connections use while it drains during an upgrade, stay in place throughout. `dns`: the
/// families whose UDP to port 53 goes to the capture too ([`PREF_DNS`]); in the others, an
/// earlier agent's DNS rule is removed.
fn install_routing(netns: &Path, ips: &[IpAddr], dns: DnsFamilies) -> Result<(), RedirectError> {
    let table = INBOUND_ROUTE_TABLE;
    // A released pod captured again: what it opened directly keeps going directly. Listed
    // once the capture rule is back (then nothing more opens directly), while its segments
    // are held (see [`HoldSegments`]) so that none reaches the agent's listener, which would
    // reset the connection, before its rule is in.
    let recapture = families(ips)
        .iter()
        .any(|(family, _, _)| !rule_exists(netns, family, PREF_CAPTURE));
    let held = recapture.then(|| HoldSegments::new(netns));
    for (family, default, src) in families(ips) {
        // `ip -batch` takes no per-line options: one batch per address family.
        let mut batch = String::new();
        let missing = |pref| !rule_exists(netns, family, pref);
        if family == "-4" && missing(PREF_PROBE) {
            batch += &format!("rule add pref {PREF_PROBE} to {PROBE_SOURCE_IP} lookup main\n");
        }
        if missing(PREF_SKIP) {
            batch +=
                &format!("rule add pref {PREF_SKIP} fwmark {SKIP_MARK:#x}/0xfff lookup main\n");
        }
        if missing(PREF_HBONE_REPLIES) {
            batch += &format!(
                "rule add pref {PREF_HBONE_REPLIES} iif lo ipproto tcp sport {HBONE_PORT} lookup main\n"
            );
        }
        if missing(PREF_CAPTURE) {
            batch += &format!("rule add pref {PREF_CAPTURE} iif lo ipproto tcp lookup {table}\n");
        }
        if dns.has(family) && missing(PREF_DNS) {
            batch += &format!(
                "rule add pref {PREF_DNS} iif lo ipproto udp dport {DNS_PORT} lookup {table}\n"
            );
        }
        batch += &format!("route replace local {default} dev lo src {src} table {table}\n");
        run_in(netns, &["ip", family, "-batch", "-"], Some(&batch))?;
    }
    if recapture {
        bypass_direct(netns);
    }
    drop(held);
    // What a release left for its draining flows is covered by the capture rule again.
    delete_rules(netns, &[PREF_FLOW]);
    for family in ["-4", "-6"] {
        if !dns.has(family) && rule_exists(netns, family, PREF_DNS) {
            delete_rules_in(netns, &[family], &[PREF_DNS]);
        }
    }
    block_ipv6(netns, ips)
}

/// Adds a [`PREF_DIRECT`] rule for each connection of the application that the agent is not
/// part of (see [`direct_flows`]). A failure is logged, not returned: the capture must come
/// back either way, and at worst those connections reset, as they did before this existed.
fn bypass_direct(netns: &Path) {
    let new: Vec<Flow> = match super::connected_tcp(netns) {
        Ok(sockets) => direct_flows(&sockets).into_iter().collect(),
        Err(e) => {
            tracing::warn!(netns = %netns.display(), error = %e, "listing the pod's connections failed: those it opened while released may reset");
            return;
        }
    };
    let add = |f: &Flow| {
        format!(
            "rule add pref {PREF_DIRECT} {} lookup main",
            flow_selector(f)
        )
    };
    if let Err(e) = per_flow_rules(netns, &new, add) {
        tracing::warn!(netns = %netns.display(), error = %e, "keeping the pod's direct connections direct failed: some may reset");
    }
    if !new.is_empty() {
        tracing::info!(netns = %netns.display(), direct = new.len(), "connections opened while released stay direct");
    }
}

/// While alive, the application's TCP segments other than SYNs towards addresses that are not
/// local are dropped in the pod (an nftables filter table of ours, no conntrack): held back,
/// to be retransmitted by their sender a moment later. Taken around the two moments when the
/// route of a live connection changes before its own rule is in: the capture rule returning
/// (a connection opened directly just before would reach the agent's listener, which resets
/// what it does not know) and the capture rule going (a captured connection not yet listed
/// would leave the pod, whose far end resets it). New connections (SYNs) pass meanwhile.
/// If the table cannot be added the moment goes unguarded, as before this existed.
struct HoldSegments<'a> {
    netns: &'a Path,
    held: bool,
}

const HOLD_TABLE: &str = "ztunnel_hold";

impl<'a> HoldSegments<'a> {
    fn new(netns: &'a Path) -> Self {
        let script = format!(
            "table inet {HOLD_TABLE} {{\n\
             chain out {{\n\
             type filter hook output priority raw; policy accept;\n\
             meta l4proto tcp tcp flags & syn == 0 meta mark & {mask:#x} != {mark:#x} \
             fib daddr type != local drop\n\
             }}\n\
             }}\n",
            mask = 0xfff,
            mark = SKIP_MARK & 0xfff,
        );
        let held = match run_in(netns, &["nft", "-f", "-"], Some(&script)) {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(netns = %netns.display(), error = %e, "holding the pod's segments failed: a connection at this moment may reset");
                false
            }
        };
        Self { netns, held }
    }
}

impl Drop for HoldSegments<'_> {
    fn drop(&mut self) {
        if self.held {
            remove_hold(self.netns);
        }
    }
}

/// Deletes the [`HoldSegments`] table (an agent that died holding it left it behind).
fn remove_hold(netns: &Path) {
    let table = format!("delete table inet {HOLD_TABLE}");
    if let Err(e) = run_in(netns, &["nft", &table], None) {
        tracing::debug!(netns = %netns.display(), error = %e, "no segment hold to remove");
    }
}

/// The connections of the application (unmarked sockets) whose other end is not a socket of
/// the same namespace (the agent's, for a captured connection): opened or accepted directly.
/// Loopback connections never leave the namespace and need no rule.
fn direct_flows(sockets: &[super::TcpSocket]) -> BTreeSet<Flow> {
    application_flows(sockets, false).collect()
}

/// The connections of the application (unmarked sockets, loopback left out) whose other end
/// is (`with_agent`) or is not a socket of the same namespace.
fn application_flows(
    sockets: &[super::TcpSocket],
    with_agent: bool,
) -> impl Iterator<Item = Flow> + '_ {
    let ends: BTreeSet<(SocketAddr, SocketAddr)> =
        sockets.iter().map(|s| (s.local, s.peer)).collect();
    sockets
        .iter()
        .filter(|s| s.mark & 0xfff != SKIP_MARK & 0xfff)
        .filter(|s| !s.local.ip().is_loopback() && !s.peer.ip().is_loopback())
        .filter(move |s| ends.contains(&(s.peer, s.local)) == with_agent)
        .map(|s| Flow {
            app: s.local,
            peer: s.peer,
        })
}

/// Runs `line(flow)` for each of `flows` as one `ip -batch` per address family; `-force`: a
/// line that fails (a rule already there, or already gone) does not stop the others.
fn per_flow_rules(
    netns: &Path,
    flows: &[Flow],
    line: impl Fn(&Flow) -> String,
) -> Result<(), RedirectError> {
    for (family, v4) in [("-4", true), ("-6", false)] {
        let batch: String = flows
            .iter()
            .filter(|f| f.app.is_ipv4() == v4)
            .map(|f| line(f) + "\n")
            .collect();
        if !batch.is_empty() {
            run_in(
                netns,
                &["ip", family, "-force", "-batch", "-"],
                Some(&batch),
            )?;
        }
    }
    Ok(())
}

/// The `ip rule` selector of exactly `flow`'s packets from the application.
fn flow_selector(f: &Flow) -> String {
    format!(
        "iif lo ipproto tcp from {} sport {} to {} dport {}",
        f.app.ip(),
        f.app.port(),
        f.peer.ip(),
        f.peer.port()
    )
}

/// Removes the [`PREF_DIRECT`] rules of connections that have closed. Returns how many are
/// left (0: nothing more to sweep).
pub fn sweep_direct(netns: &Path) -> Result<usize, RedirectError> {
    let mut rules = Vec::new();
    for family in ["-4", "-6"] {
        let pref = PREF_DIRECT.to_string();
        let out = super::output_in(netns, &["ip", "-j", family, "rule", "show", "pref", &pref])?;
        rules.extend(parse_rules(&out));
    }
    if rules.is_empty() {
        return Ok(0);
    }
    let rules_count = rules.len();
    let open: BTreeSet<(SocketAddr, SocketAddr)> = super::connected_tcp(netns)?
        .iter()
        .map(|s| (s.local, s.peer))
        .collect();
    let closed: Vec<Flow> = rules
        .into_iter()
        .filter(|f| !open.contains(&(f.app, f.peer)))
        .collect();
    let left = rules_count - closed.len();
    let del = |f: &Flow| {
        format!(
            "rule del pref {PREF_DIRECT} {} lookup main",
            flow_selector(f)
        )
    };
    per_flow_rules(netns, &closed, del)?;
    Ok(left)
}

/// The flows of `ip -j rule show` output (rules without full addresses and ports are not
/// ours and are skipped).
fn parse_rules(json: &str) -> Vec<Flow> {
    #[derive(serde::Deserialize)]
    struct Rule {
        src: Option<String>,
        dst: Option<String>,
        sport: Option<u16>,
        dport: Option<u16>,
    }
    let rules: Vec<Rule> = serde_json::from_str(json.trim()).unwrap_or_default();
    rules
        .into_iter()
        .filter_map(|r| {
            let app = SocketAddr::new(r.src?.parse().ok()?, r.sport?);
            let peer = SocketAddr::new(r.dst?.parse().ok()?, r.dport?);
            Some(Flow { app, peer })
        })
        .collect()
}

/// The address families of `ips`: `ip` flag, default prefix, and the pod's source address.
fn families(ips: &[IpAddr]) -> Vec<(&'static str, &'static str, IpAddr)> {
    let v4 = ips
        .iter()
        .find(|ip| ip.is_ipv4())
        .map(|ip| ("-4", "0.0.0.0/0", *ip));
    let v6 = ips
        .iter()
        .find(|ip| ip.is_ipv6())
        .map(|ip| ("-6", "::/0", *ip));
    v4.into_iter().chain(v6).collect()
}

/// Stops capturing new connections while established ones keep working (see the module docs):
/// `flows` (those the agent registered) and every connection between the application (at one
/// of `ips`) and the agent that the pod's sockets show, also those the agent has not accepted
/// yet (queued on its listener, or mid-handshake). The sockets are listed before the capture
/// rule goes and once more after, for connections the capture took in between, whose segments
/// are held ([`HoldSegments`]) until their rules are in. The caller
/// drops the pod's [`CaptureGuard`] too, so that inbound connections reach the application
/// directly.
pub fn stop_capture(netns: &Path, ips: &[IpAddr], flows: &[Flow]) -> Result<(), RedirectError> {
    let table = INBOUND_ROUTE_TABLE;
    // Rules an earlier release wrote for flows that are still open are written again below
    // (the caller passes every flow still open); the capture rule covers them meanwhile.
    delete_rules(netns, &[PREF_FLOW]);
    let add = |f: &Flow| {
        format!(
            "rule add pref {PREF_FLOW} {} lookup {table}",
            flow_selector(f)
        )
    };
    let mut kept: BTreeSet<Flow> = flows.iter().copied().collect();
    kept.extend(listed_captured_flows(netns, ips));
    let kept_vec: Vec<Flow> = kept.iter().copied().collect();
    // The capture stops even if some flow's rule failed: a released pod must never stay
    // captured with nothing listening.
    let written = per_flow_rules(netns, &kept_vec, add);
    // The pod's DNS goes straight to its resolver again (UDP: no connection to keep).
    delete_rules(netns, &[PREF_DNS]);
    let held = HoldSegments::new(netns);
    delete_rules(netns, &[PREF_CAPTURE]);
    let late: Vec<Flow> = listed_captured_flows(netns, ips)
        .into_iter()
        .filter(|f| !kept.contains(f))
        .collect();
    let written_late = per_flow_rules(netns, &late, add);
    drop(held);
    if !late.is_empty() {
        tracing::debug!(netns = %netns.display(), late = late.len(), "connections captured while the capture stopped keep their route");
    }
    // Direct connections need no rule of their own once nothing is captured.
    delete_rules(netns, &[PREF_DIRECT]);
    unblock_ipv6(netns);
    written.and(written_late)
}

/// [`captured_flows`] of the sockets `netns` has now; a listing that fails is logged and
/// gives nothing (the registered flows are still kept).
fn listed_captured_flows(netns: &Path, ips: &[IpAddr]) -> BTreeSet<Flow> {
    match super::connected_tcp(netns) {
        Ok(sockets) => captured_flows(&sockets, ips),
        Err(e) => {
            tracing::warn!(netns = %netns.display(), error = %e, "listing the pod's connections failed: a connection the agent has not accepted yet may reset");
            BTreeSet::new()
        }
    }
}

/// The connections of the application (unmarked sockets at one of `ips`) whose other end is
/// a socket of the same namespace, i.e. the agent's: an outbound connection the capture
/// handed to the agent (accepted, queued or mid-handshake) or an inbound one the agent
/// delivered. The pod's connections to itself are not captured and not listed.
fn captured_flows(sockets: &[super::TcpSocket], ips: &[IpAddr]) -> BTreeSet<Flow> {
    application_flows(sockets, true)
        .filter(|f| ips.contains(&f.app.ip()) && !ips.contains(&f.peer.ip()))
        .collect()
}

/// Removes the routing [`install`] and [`stop_capture`] added. Missing pieces are not an
/// error (the pod may be gone). The capture program goes with its guard.
pub fn remove(netns: &Path) -> Result<(), RedirectError> {
    delete_rules(netns, &OUR_PREFS);
    remove_hold(netns);
    let table = INBOUND_ROUTE_TABLE.to_string();
    for family in ["-4", "-6"] {
        let _ = run_in(
            netns,
            &["ip", family, "route", "flush", "table", &table],
            None,
        );
    }
    Ok(())
}

/// Deletes every rule with one of `prefs`, in both families (see [`delete_rules_in`]).
fn delete_rules(netns: &Path, prefs: &[u32]) {
    delete_rules_in(netns, &["-4", "-6"], prefs);
}

/// Deletes every rule with one of `prefs` in `families` (`-4`, `-6`). `ip rule del pref N`
/// removes one rule per call, so it repeats until it fails (bounded: flows are one rule each,
/// and a released pod has at most as many as it had connections).
fn delete_rules_in(netns: &Path, families: &[&str], prefs: &[u32]) {
    const MAX_RULES: usize = 100_000;
    for family in families {
        for pref in prefs {
            let pref = pref.to_string();
            // One batch of many deletions; `-force` keeps going past the first failure, and
            // the batch is repeated while it deleted something.
            let mut deleted = 0;
            while deleted < MAX_RULES {
                let line = format!("rule del pref {pref}\n");
                let chunk = 64;
                let batch = line.repeat(chunk);
                let out = run_in(
                    netns,
                    &["ip", family, "-force", "-batch", "-"],
                    Some(&batch),
                );
                deleted += chunk;
                // Any failure means a deletion found nothing: the pref is now empty.
                if out.is_err() {
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redirect::TcpSocket;
    use crate::socket::ListenFor;

    fn sock(local: &str, peer: &str, mark: u32) -> TcpSocket {
        TcpSocket {
            local: local.parse().unwrap(),
            peer: peer.parse().unwrap(),
            mark,
        }
    }

    #[test]
    fn only_the_applications_connections_without_the_agent_at_the_other_end_are_direct() {
        let sockets = [
            // Captured: the agent holds the other end (its socket is marked).
            sock("10.0.1.2:40000", "10.0.2.3:8080", 0),
            sock("10.0.2.3:8080", "10.0.1.2:40000", SKIP_MARK),
            // The agent's own HBONE connection out of the pod.
            sock("10.0.1.2:41000", "10.0.2.1:15008", SKIP_MARK),
            // Opened directly while the pod was released, and one accepted directly.
            sock("10.0.1.2:42000", "10.0.2.3:8080", 0),
            sock("10.0.1.2:8080", "10.0.3.4:50000", 0),
            // Loopback stays inside.
            sock("127.0.0.1:43000", "127.0.0.1:9000", 0),
        ];
        let direct: Vec<Flow> = direct_flows(&sockets).into_iter().collect();
        assert_eq!(
            direct,
            vec![
                Flow {
                    app: "10.0.1.2:8080".parse().unwrap(),
                    peer: "10.0.3.4:50000".parse().unwrap()
                },
                Flow {
                    app: "10.0.1.2:42000".parse().unwrap(),
                    peer: "10.0.2.3:8080".parse().unwrap()
                },
            ]
        );
    }

    #[test]
    fn the_captured_flows_are_the_applications_ends_of_pairs_with_the_agent() {
        let pod: IpAddr = "10.0.1.2".parse().unwrap();
        let sockets = [
            // Outbound, accepted by the agent (its end is marked).
            sock("10.0.1.2:40000", "10.0.2.3:8080", 0),
            sock("10.0.2.3:8080", "10.0.1.2:40000", SKIP_MARK),
            // Outbound, still mid-handshake on the agent's listener (a request socket
            // carries no mark).
            sock("10.0.1.2:40001", "10.0.2.3:8080", 0),
            sock("10.0.2.3:8080", "10.0.1.2:40001", 0),
            // Inbound, delivered by the agent from the client's address.
            sock("10.0.1.2:8080", "10.0.3.4:50000", 0),
            sock("10.0.3.4:50000", "10.0.1.2:8080", SKIP_MARK),
            // The agent's HBONE connection, one opened directly, the pod to itself, loopback.
            sock("10.0.1.2:41000", "10.0.2.1:15008", SKIP_MARK),
            sock("10.0.1.2:42000", "10.0.2.3:8080", 0),
            sock("10.0.1.2:43000", "10.0.1.2:9000", 0),
            sock("10.0.1.2:9000", "10.0.1.2:43000", 0),
            sock("127.0.0.1:43000", "127.0.0.1:9000", 0),
            sock("127.0.0.1:9000", "127.0.0.1:43000", 0),
        ];
        let flow = |app: &str, peer: &str| Flow {
            app: app.parse().unwrap(),
            peer: peer.parse().unwrap(),
        };
        let captured: Vec<Flow> = captured_flows(&sockets, &[pod]).into_iter().collect();
        assert_eq!(
            captured,
            vec![
                flow("10.0.1.2:8080", "10.0.3.4:50000"),
                flow("10.0.1.2:40000", "10.0.2.3:8080"),
                flow("10.0.1.2:40001", "10.0.2.3:8080"),
            ]
        );
    }

    #[test]
    fn rules_read_back_as_flows() {
        let json = r#"[{"priority":31987,"src":"10.0.1.2","dst":"10.0.2.3","iif":"lo","ipproto":"tcp","sport":42000,"dport":8080,"table":"main"},{"priority":31987,"src":"all","table":"main"}]"#;
        assert_eq!(
            parse_rules(json),
            vec![Flow {
                app: "10.0.1.2:42000".parse().unwrap(),
                peer: "10.0.2.3:8080".parse().unwrap()
            }]
        );
        assert!(parse_rules("not json").is_empty());
    }

    /// The pod's DNS rules (one per address family) come with `dns` and go without it and at
    /// release, and the UDP they route reaches the DNS socket of its family; a capture adopted
    /// from an agent that predates IPv6 DNS capture gets the IPv4 rule only. Needs root
    /// (creates namespaces and loads the capture program); skipped otherwise.
    #[test]
    fn dns_capture_is_routed_to_the_dns_socket_and_taken_away() {
        use crate::redirect::testing::nameserver;
        use std::net::{Ipv4Addr, Ipv6Addr, UdpSocket};

        let Some(Pinned {
            t,
            pin_dir,
            home,
            netns,
            ips,
            _fs,
        }) = Pinned::new("ebpf-dns")
        else {
            return;
        };
        let listen = |port| Pinned::listen(&netns, &home, Ipv4Addr::LOCALHOST.into(), port);
        let (inbound, outbound) = (listen(15006), listen(15001));
        let dns = crate::dns::bind(&netns, &home, &ips, ListenFor::Ebpf).expect("DNS sockets");
        let dns6 = dns
            .v6
            .as_ref()
            .expect("IPv6 DNS sockets for a pod with an IPv6 address");
        let pref = PREF_DNS.to_string();
        let rule = |family| t.pod.output(&["ip", family, "rule", "show", "pref", &pref]);
        let routed = |family| rule(family).contains("iif lo ipproto udp dport 53 lookup 133");
        let unrouted = |family| rule(family).trim().is_empty();
        let outbound = Outbound {
            v4: &outbound,
            v6: None,
        };
        let install =
            |dns| install(&netns, &ips, &inbound, outbound, &pin_dir, dns).expect("install");
        // The next install adopts the capture, as a restarted agent does.
        let restart = |guard: CaptureGuard| {
            guard.keep_pinned();
            drop(guard);
        };

        let guard = install(Some(&dns));
        assert!(routed("-4") && routed("-6"), "{}{}", rule("-4"), rule("-6"));
        // The application's queries of both families reach the DNS socket of their family.
        for (v6, udp) in [(false, &dns.v4.udp), (true, &dns6.udp)] {
            let (dst, any) = match v6 {
                false => (nameserver(false), IpAddr::from(Ipv4Addr::UNSPECIFIED)),
                true => (nameserver(true), IpAddr::from(Ipv6Addr::UNSPECIFIED)),
            };
            netns
                .run(&home, || UdpSocket::bind((any, 0))?.send_to(b"query", dst))
                .expect("enter netns")
                .expect("send");
            udp.set_nonblocking(false).expect("blocking");
            udp.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .expect("timeout");
            let (n, _) = udp
                .recv_from(&mut [0u8; 16])
                .unwrap_or_else(|e| panic!("{dst}: nothing reached the DNS socket: {e}"));
            assert_eq!(n, 5);
        }

        // An agent without DNS capture adopts the pod: both rules go.
        restart(guard);
        let guard = install(None);
        assert!(
            unrouted("-4") && unrouted("-6"),
            "{}{}",
            rule("-4"),
            rule("-6")
        );

        // Back with DNS; then released: the rules go with the capture rule.
        restart(guard);
        let guard = install(Some(&dns));
        assert!(routed("-4") && routed("-6"));
        stop_capture(&t.pod.path(), &ips, &[]).expect("stop capture");
        assert!(
            unrouted("-4") && unrouted("-6"),
            "{}{}",
            rule("-4"),
            rule("-6")
        );
        assert!(!rule_exists(&t.pod.path(), "-4", PREF_CAPTURE));
        drop(guard);
        remove(&t.pod.path()).expect("remove");

        // Captured anew by this agent, then adopted by one whose predecessor's program
        // predates IPv6 DNS capture (stood for by a four-slot socket map in its pins): the IPv4
        // rule stays, the IPv6 one goes, and the pod's IPv6 DNS goes to its resolver.
        restart(install(Some(&dns)));
        pin_older_map(&pin_dir, 4);
        let guard = install(Some(&dns));
        assert!(guard.adopted());
        assert!(
            routed("-4") && unrouted("-6"),
            "{}{}",
            rule("-4"),
            rule("-6")
        );
        drop(guard);
        remove(&t.pod.path()).expect("remove");
    }

    /// A dual-stack pod of its own, opened as the agent opens a pod's namespace, and a
    /// private bpffs for its pins (unmounted when `_fs` goes: bind it when destructuring);
    /// `None` (the test is skipped) without root.
    struct Pinned {
        t: crate::redirect::testing::TestPod,
        _fs: crate::redirect::testing::TestBpffs,
        pin_dir: PathBuf,
        home: Netns,
        netns: Netns,
        ips: Vec<IpAddr>,
    }

    impl Pinned {
        fn new(tag: &str) -> Option<Pinned> {
            use crate::redirect::testing::{skip_unless_root, TestBpffs, TestPod};
            if skip_unless_root() {
                return None;
            }
            let t = TestPod::new(tag);
            let fs = TestBpffs::mount();
            Some(Pinned {
                pin_dir: fs.path().join("pod"),
                home: Netns::current().expect("own netns"),
                netns: t.pod.open(),
                ips: t.ips(),
                t,
                _fs: fs,
            })
        }

        /// A listener of the agent's in the pod, on `ip`:`port`.
        fn listen(netns: &Netns, home: &Netns, ip: IpAddr, port: u16) -> std::net::TcpListener {
            let addr = SocketAddr::new(ip, port);
            crate::socket::listen_in(netns, home, addr, ListenFor::Ebpf).expect("listen")
        }
    }

    /// Stands for the pins of an earlier agent whose program's socket map had `slots` slots:
    /// the map pin under `pin_dir` replaced by one of that size (the loader reads the size of
    /// what it adopts from it).
    fn pin_older_map(pin_dir: &Path, slots: u32) {
        let map_pin = pin_dir.join("listeners");
        std::fs::remove_file(&map_pin).expect("remove the map pin");
        let create = format!(
            "bpftool map create {} type sockmap key 4 value 4 entries {slots} name listeners",
            map_pin.display()
        );
        crate::redirect::testing::sh(&create.split(' ').collect::<Vec<_>>());
    }

    /// A dual-stack pod's capture adopted from an agent that predates per-family outbound
    /// listeners (a six-slot socket map in its pins) is installed all the same: its one
    /// outbound slot takes the IPv6 listener, as that agent's did (with a warning that the
    /// pod's IPv4 connections out fail closed). Needs root; skipped otherwise.
    #[test]
    fn a_capture_without_an_ipv6_outbound_slot_is_adopted_all_the_same() {
        use std::net::{Ipv4Addr, Ipv6Addr};

        let Some(p) = Pinned::new("ebpf-out6") else {
            return;
        };
        let listen = |ip, port| Pinned::listen(&p.netns, &p.home, ip, port);
        let inbound = listen(Ipv4Addr::LOCALHOST.into(), 15006);
        let v4 = listen(Ipv4Addr::LOCALHOST.into(), 15001);
        let v6 = listen(Ipv6Addr::LOCALHOST.into(), 15001);
        let outbound = Outbound {
            v4: &v4,
            v6: Some(&v6),
        };
        let install = || install(&p.netns, &p.ips, &inbound, outbound, &p.pin_dir, None);
        let pod = p.t.pod.path();

        let first = install().expect("install");
        assert!(!first.adopted());
        first.keep_pinned();
        drop(first);
        pin_older_map(&p.pin_dir, 6);
        let adopted = install().expect("an older capture is adopted, not refused");
        assert!(adopted.adopted());
        assert!(rule_exists(&pod, "-4", PREF_CAPTURE));
        assert!(rule_exists(&pod, "-6", PREF_CAPTURE));
        drop(adopted);
        remove(&pod).expect("remove");
    }

    #[test]
    fn pins_are_named_by_pod_and_namespace_whichever_way_it_was_reached() {
        let fs = Path::new("/sys/fs/bpf");
        let pod = NamespacedName::new("default", "web.v1");
        let open = |p: &str| Netns::open(Path::new(p)).expect("open own netns");
        // Two paths to the same namespace (this process and this thread): one pin directory.
        let by_pid = pin_dir(fs, &pod, &open("/proc/self/ns/net")).expect("pin dir");
        let by_thread = pin_dir(fs, &pod, &open("/proc/thread-self/ns/net")).expect("pin dir");
        assert_eq!(by_pid, by_thread);
        let inode = std::fs::metadata("/proc/self/ns/net").expect("stat").ino();
        assert_eq!(
            by_pid,
            Path::new(&format!("/sys/fs/bpf/ztunnel/default_web_v1_{inode}")),
            "bpffs refuses dots in names"
        );
    }

    #[test]
    fn the_sweep_keeps_the_pins_of_enrolled_and_pending_pods_only() {
        let fs = tempfile::tempdir().expect("tempdir");
        let root = pin_root(fs.path());
        for dir in [
            "default_web_1",
            "default_web_2",
            "default_db_3",
            "gone_pod_4",
            "default_webapp_5",
        ] {
            std::fs::create_dir_all(root.join(dir)).expect("mkdir");
        }
        let web = NamespacedName::new("default", "web");
        let db = NamespacedName::new("default", "db");
        let current = [(web.clone(), root.join("default_web_1"))];
        let removed = sweep_pins(fs.path(), &current, &[web, db]);
        let mut removed: Vec<String> = removed
            .iter()
            .filter_map(|p| Some(p.file_name()?.to_string_lossy().into_owned()))
            .collect();
        removed.sort();
        // web's earlier namespace and the pod that left go; db (pending) keeps its capture;
        // `webapp` is another pod, not web's.
        assert_eq!(removed, ["default_web_2", "default_webapp_5", "gone_pod_4"]);
        assert!(root.join("default_web_1").exists() && root.join("default_db_3").exists());
    }
}
