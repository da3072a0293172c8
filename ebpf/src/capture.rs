//! Capture with `sk_lookup` (program `zt_capture` in `capture.bpf.c`).
//!
//! How it is attached: one program instance per pod, loaded with the pod's settings as
//! read-only globals, attached to the pod's network namespace with a BPF link
//! (`BPF_SK_LOOKUP` takes a netns fd; no cgroup is involved). The agent's sockets go into the
//! program's seven-slot `SOCKMAP`:
//! - inbound (15006): for every TCP SYN that arrives from outside the pod on any port but the
//!   HBONE port, the kernel's listener lookup returns that socket instead;
//! - outbound (15001, optional; IPv4 with [`CaptureGuard::set_outbound_listener`], IPv6 with
//!   [`CaptureGuard::set_outbound6_listener`]): for every TCP SYN the application sends to a
//!   destination outside the pod, to the listener of its family (an IPv6 SYN to the IPv4 slot
//!   while the IPv6 one is empty: see that method). Those only reach a listener lookup because
//!   the agent's policy routing delivers the pod's own outgoing TCP locally over `lo` (a `local
//!   default dev lo` route in a separate table, selected for `iif lo ipproto tcp` unless the
//!   agent's mark is set): the program recognises them as "arrived on lo, to an address that is
//!   not loopback". The outbound listeners must be `IP_TRANSPARENT`, because their connections'
//!   local address is the (non-local) original destination. One per family for the reason
//!   given for DNS below: a listener on `[::1]` is v6-only (the kernel makes every IPv6
//!   socket bound to an address other than the wildcard one v6-only) and takes no IPv4 lookup.
//! - DNS (optional; IPv4 with [`CaptureGuard::set_dns_listeners`], IPv6 with
//!   [`CaptureGuard::set_dns6_listeners`]): per address family, a UDP socket for every
//!   datagram the application sends to port 53 of an address outside the pod, and a TCP
//!   listener for its connections to port 53 (while there is none, those go to the outbound
//!   listener). One pair per family because `bpf_sk_assign` hands a lookup only to a socket of
//!   its family (or to a dual-stack IPv6 socket, which must be bound to the wildcard address:
//!   the agent's DNS sockets are bound to loopback instead, so as not to serve the pod's
//!   addresses). The datagrams only reach a socket lookup once the agent's policy routing
//!   delivers the pod's UDP to port 53 locally over `lo` (`iif lo ipproto udp dport 53`, as
//!   for TCP, per family). With no DNS socket of its family registered such a datagram is
//!   dropped (fail closed, see below).
//!
//! No address is rewritten, so the accepted socket's `local_addr()` is the original
//! destination in both directions, and a datagram steered to the DNS socket keeps its original
//! destination, which `recvmsg` reports with `IP_RECVORIGDSTADDR` (`IPV6_RECVORIGDSTADDR`).
//!
//! What is not steered: the HBONE port (the agent's own 15008 listener gets it by the normal
//! lookup); loopback destinations and the pod connecting to its own address; connections from
//! [`CaptureConfig::probe_source`] (the node's kubelet probes, which must reach the application
//! even while the agent is down, as with Istio's probe bypass); and the agent's own delivery
//! of an inbound connection to the application, which it announces with
//! [`CaptureGuard::exempt`] before connecting (sk_lookup cannot see the socket mark, and the
//! delivery comes from the client's address, so only its exact source tells it apart).
//!
//! Failure mode: when the map holds no listener for a direction (the agent's listener closed,
//! e.g. during an agent restart) the program refuses the connection rather than let it reach
//! the application, or leave the pod, without policy: fail closed. A DNS datagram routed to
//! `lo` while no DNS socket is registered is dropped: UDP has no refusal here (the kernel
//! sends "port unreachable" only from a local address, and the nameserver's is not one, so
//! the resolver waits for its timeout and retries), and the normal lookup would hand it to any
//! socket of the pod bound to the wildcard address and port 53. The agent routes DNS to `lo`
//! only while it serves it (`ztunnel/src/redirect/ebpf.rs`).
//!
//! Where programs load: in this process, on one thread; or, once [`load_in_child_processes`]
//! has been called (the agent does), pinned captures and [`probe`] load in a short-lived child
//! process of the caller's binary, so that aya's parse of the kernel's BTF never raises the
//! caller's memory.
//!
//! Lifetimes: [`attach_capture`] ties the attachment to the guard (and so to the agent's
//! process: a crash detaches it). [`attach_capture_pinned`] also pins the link and the maps in
//! a bpffs directory so the capture outlives the agent: a restarted agent calls it again with
//! the same directory, adopts the attachment and registers its new listeners; dropping the
//! guard unpins and detaches (the pod is gone), unless [`CaptureGuard::keep_pinned`] was
//! called, which leaves it for the next agent.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use aya::maps::{HashMap, Map, MapData, MapError, SockMap};
use aya::pin::PinError;
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::{ProgramError, SkLookup};
use aya::{include_bytes_aligned, Ebpf, EbpfError, EbpfLoader};
use tracing::{debug, warn};

/// The compiled `capture.bpf.c` (see build.rs).
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/capture.bpf.o"));

const PROGRAM: &str = "zt_capture";
const LISTENER_MAP: &str = "listeners";
const DELIVERY_MAP: &str = "agent_delivery";
/// The sockets' slots in [`LISTENER_MAP`] (`*_KEY` in the C program).
const INBOUND_KEY: u32 = 0;
const OUTBOUND_KEY: u32 = 1;
const DNS_UDP_KEY: u32 = 2;
const DNS_TCP_KEY: u32 = 3;
const DNS6_UDP_KEY: u32 = 4;
const DNS6_TCP_KEY: u32 = 5;
const OUTBOUND6_KEY: u32 = 6;

/// One address family's DNS slots in [`LISTENER_MAP`], and what a map without them (an older
/// program's) is reported as: `missing(slots it has, slots needed)`.
struct DnsSlots {
    udp: u32,
    tcp: u32,
    missing: fn(u32, u32) -> CaptureError,
}

const DNS4_SLOTS: DnsSlots = DnsSlots {
    udp: DNS_UDP_KEY,
    tcp: DNS_TCP_KEY,
    missing: |slots, needed| CaptureError::NoDnsSlots { slots, needed },
};
const DNS6_SLOTS: DnsSlots = DnsSlots {
    udp: DNS6_UDP_KEY,
    tcp: DNS6_TCP_KEY,
    missing: |slots, needed| CaptureError::NoDns6Slots { slots, needed },
};
/// File names inside a pin directory. The maps are pinned before the link, so a link pin
/// always has its maps beside it.
const LINK_PIN: &str = "link";
const MAP_PINS: [&str; 2] = [LISTENER_MAP, DELIVERY_MAP];

/// What the program leaves alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureConfig {
    /// Connections to this port reach whoever listens on it (the agent's HBONE listener).
    pub hbone_port: u16,
    /// Connections from this address reach the application directly (node health probes).
    pub probe_source: Option<Ipv4Addr>,
}

impl CaptureConfig {
    pub const fn new(hbone_port: u16) -> Self {
        Self {
            hbone_port,
            probe_source: None,
        }
    }

    pub const fn with_probe_source(self, probe_source: Ipv4Addr) -> Self {
        Self {
            probe_source: Some(probe_source),
            ..self
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("parse the embedded {PROGRAM} eBPF object: {0}")]
    Object(#[source] EbpfError),
    #[error("the embedded eBPF object has no {what} {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("the thread that loads eBPF programs is gone (could it not be started?)")]
    LoaderGone,
    #[error("load program {PROGRAM} into the kernel: {0}")]
    Load(#[source] ProgramError),
    #[error("attach program {PROGRAM} to the network namespace: {0}")]
    Attach(#[source] ProgramError),
    #[error("use map {map}: {source}")]
    Map { map: &'static str, source: MapError },
    #[error("exempt {source_addr} in map {DELIVERY_MAP}: {source}")]
    Exempt {
        source_addr: SocketAddrV4,
        source: MapError,
    },
    #[error("create pin directory {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pin {what} at {path}: {source}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        source: PinError,
    },
    #[error("open pinned link {path}: {source}")]
    OpenLink { path: PathBuf, source: LinkError },
    #[error("open pinned map {path}: {source}")]
    OpenMap { path: PathBuf, source: MapError },
    #[error("load in a child process: {detail}")]
    Child { detail: String },
    #[error("open network namespace {path}: {source}")]
    OpenNetns {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("pinned link {link} has no map {map} beside it (not ours?)")]
    Incomplete { link: PathBuf, map: PathBuf },
    #[error(
        "the attached capture program predates DNS capture (its map {LISTENER_MAP} has \
         {slots} slots, DNS needs {needed}); it keeps the settings it was loaded with until \
         the pod is released and captured again"
    )]
    NoDnsSlots { slots: u32, needed: u32 },
    #[error(
        "the attached capture program predates IPv6 DNS capture (its map {LISTENER_MAP} has \
         {slots} slots, IPv6 DNS needs {needed}); it keeps the settings it was loaded with \
         until the pod is released and captured again"
    )]
    NoDns6Slots { slots: u32, needed: u32 },
    #[error(
        "the attached capture program predates per-family outbound listeners (its map \
         {LISTENER_MAP} has {slots} slots, an IPv6 outbound listener needs {needed}): it steers \
         both families to its one outbound slot until the pod is released and captured again"
    )]
    NoOutbound6Slot { slots: u32, needed: u32 },
}

/// Steers the pod's inbound TCP to `listener` until the guard is dropped (outbound too, once
/// [`CaptureGuard::set_outbound_listener`] has registered a listener for it).
///
/// `netns` is the pod's network namespace (e.g. `/var/run/netns/<pod>` opened read-only);
/// `listener` is a listening TCP socket created inside it (a `SOCKMAP` takes any TCP socket in
/// `LISTEN` state; it need not be bound to the destination port).
pub fn attach_capture(
    netns: &impl AsFd,
    listener: &impl AsRawFd,
    config: &CaptureConfig,
) -> Result<CaptureGuard, CaptureError> {
    let loaded = load(config)?;
    let maps = Maps::new(loaded.listener, loaded.delivery)?;
    let mut guard = CaptureGuard {
        link: Some(Attachment::Owned {
            _held: attach(loaded.ebpf, netns)?,
        }),
        maps,
        pins: None,
        keep: AtomicBool::new(false),
        adopted: false,
        stale: Mutex::default(),
    };
    guard.set_inbound_listener(listener)?;
    debug!(hbone_port = config.hbone_port, "attached capture sk_lookup");
    Ok(guard)
}

/// Like [`attach_capture`], but the link and the maps are pinned under `pin_dir` (a directory
/// on a bpffs mount, one per pod, created if missing) so the capture survives the agent.
///
/// If `pin_dir` already holds a link (an earlier agent's), that attachment is adopted:
/// `listener` replaces the earlier one, the earlier agent's exemptions are noted as stale
/// (removed by [`CaptureGuard::clear_stale_exemptions`]: not at once, because during an
/// upgrade the earlier agent still runs and may be in the middle of a delivery), and
/// `config` is NOT applied (the running program keeps the
/// settings it was loaded with; detach first to change them). [`CaptureGuard::adopted`] tells
/// which happened.
pub fn attach_capture_pinned(
    netns: &impl AsFd,
    listener: &impl AsRawFd,
    config: &CaptureConfig,
    pin_dir: &Path,
) -> Result<CaptureGuard, CaptureError> {
    if pin_dir.join(LINK_PIN).exists() {
        let guard = open_pins(pin_dir, listener, true)?;
        debug!(pin_dir = %pin_dir.display(), "adopted pinned capture sk_lookup");
        return Ok(guard);
    }
    std::fs::create_dir_all(pin_dir).map_err(|source| CaptureError::PinDir {
        path: pin_dir.to_path_buf(),
        source,
    })?;
    // Map pins without a link are what an agent leaves when it dies between pinning the maps
    // and pinning the link (the link died with it): stale, replace them.
    remove_map_pins(pin_dir);
    match child_loader() {
        Some(exe) => load_in_child(
            exe,
            &ChildJob::Pin {
                netns: proc_fd_path(netns),
                pin_dir: pin_dir.to_path_buf(),
                config: *config,
            },
        )?,
        None => load_and_pin(netns, load(config)?, pin_dir)?,
    }
    let guard = open_pins(pin_dir, listener, false)?;
    debug!(pin_dir = %pin_dir.display(), hbone_port = config.hbone_port, "attached pinned capture sk_lookup");
    Ok(guard)
}

/// Pins `loaded`'s maps under `pin_dir`, attaches its program to `netns` and pins the link
/// (maps first, so that a link pin always has its maps beside it). On an error nothing is left
/// pinned.
fn load_and_pin(netns: &impl AsFd, loaded: Loaded, pin_dir: &Path) -> Result<(), CaptureError> {
    let pinned = [
        (&loaded.listener, LISTENER_MAP),
        (&loaded.delivery, DELIVERY_MAP),
    ]
    .into_iter()
    .try_for_each(|(map, name)| {
        let path = pin_dir.join(name);
        map.pin(&path).map_err(|source| CaptureError::Pin {
            what: "map",
            path,
            source,
        })
    });
    let link = pinned
        .and_then(|()| attach(loaded.ebpf, netns))
        .and_then(|link| pin_link(link, &pin_dir.join(LINK_PIN)));
    match link {
        // The pin holds the link (and so the program and its maps) from now on.
        Ok(_pinned) => Ok(()),
        Err(e) => {
            remove_map_pins(pin_dir);
            Err(e)
        }
    }
}

/// A guard over the capture pinned under `pin_dir`, steering inbound connections to
/// `listener`. `adopted`: the pins are an earlier agent's, whose exemptions are noted as stale.
fn open_pins(
    pin_dir: &Path,
    listener: &impl AsRawFd,
    adopted: bool,
) -> Result<CaptureGuard, CaptureError> {
    let link_path = pin_dir.join(LINK_PIN);
    let link = PinnedLink::from_pin(&link_path).map_err(|source| CaptureError::OpenLink {
        path: link_path.clone(),
        source,
    })?;
    let [listener_map, delivery_map] = MAP_PINS.map(|name| open_pinned(pin_dir, name));
    let maps = Maps::new(listener_map?, delivery_map?)?;
    let stale = if adopted {
        maps.exemption_keys()
    } else {
        Vec::new()
    };
    let mut guard = CaptureGuard {
        link: Some(Attachment::Pinned(link)),
        maps,
        pins: Some(pin_dir.to_path_buf()),
        keep: AtomicBool::new(false),
        adopted,
        stale: Mutex::new(stale),
    };
    guard.set_inbound_listener(listener)?;
    Ok(guard)
}

/// An attached capture program. Dropping it detaches the program (and removes its pins, if
/// any); see [`CaptureGuard::keep_pinned`] to hand a pinned attachment to the next agent.
pub struct CaptureGuard {
    /// `None` only while dropping.
    link: Option<Attachment>,
    maps: Maps,
    pins: Option<PathBuf>,
    /// Set by [`CaptureGuard::keep_pinned`]: dropping leaves a pinned attachment in place.
    keep: AtomicBool,
    adopted: bool,
    /// The exemptions found when adopting an earlier agent's attachment.
    stale: Mutex<Vec<u64>>,
}

/// While alive, a new connection from `source` to the pod is not steered: the agent holds one
/// while it connects to the application on behalf of a client. Dropping it removes the entry;
/// drop it once the connection is established (only the SYN is looked up).
#[must_use = "the exemption ends when this is dropped"]
pub struct Exemption {
    delivery: Arc<Mutex<HashMap<MapData, u64, u8>>>,
    key: u64,
    source: SocketAddrV4,
}

#[derive(Debug)]
enum Attachment {
    /// The link, and the loaded object that owns the program, die with the guard.
    Owned {
        _held: OwnedLink,
    },
    Pinned(PinnedLink),
}

/// Field order is drop order: the link goes (detaching the program) before the object.
#[derive(Debug)]
struct OwnedLink {
    _link: FdLink,
    _ebpf: Ebpf,
}

struct Maps {
    listener: SockMap<MapData>,
    /// Shared with the [`Exemption`]s handed out, which may outlive a borrow of the guard.
    delivery: Arc<Mutex<HashMap<MapData, u64, u8>>>,
}

struct Loaded {
    ebpf: Ebpf,
    listener: Map,
    delivery: Map,
}

// === impl CaptureGuard ===

impl CaptureGuard {
    /// Steers inbound connections to `listener` from now on (e.g. after rebinding 15006).
    /// Connections already queued on the previous listener stay there.
    pub fn set_inbound_listener(&mut self, listener: &impl AsRawFd) -> Result<(), CaptureError> {
        self.set(INBOUND_KEY, listener)
    }

    /// Steers the application's outgoing IPv4 connections to `listener` (15001,
    /// `IP_TRANSPARENT`) from now on, and its IPv6 ones too while no IPv6 listener is
    /// registered ([`CaptureGuard::set_outbound6_listener`]; they need a listener that takes
    /// IPv6, then). A capture adopted from an agent that predates per-family outbound
    /// listeners steers both families here whatever is registered. Only connections that the
    /// pod's routing delivers over `lo` are seen; see the module docs.
    pub fn set_outbound_listener(&mut self, listener: &impl AsRawFd) -> Result<(), CaptureError> {
        self.set(OUTBOUND_KEY, listener)
    }

    /// Steers the application's outgoing IPv6 connections to `listener` (a listening
    /// `IP_TRANSPARENT` IPv6 socket) from now on. A capture adopted from an agent that
    /// predates per-family outbound listeners has no slot for it:
    /// [`CaptureError::NoOutbound6Slot`], and its one outbound slot
    /// ([`CaptureGuard::set_outbound_listener`]) keeps serving both families.
    pub fn set_outbound6_listener(&mut self, listener: &impl AsRawFd) -> Result<(), CaptureError> {
        let missing = |slots, needed| CaptureError::NoOutbound6Slot { slots, needed };
        self.set(OUTBOUND6_KEY, listener)
            .map_err(older_map(missing, OUTBOUND6_KEY + 1))
    }

    /// Takes the IPv6 outbound listener out of the map (an earlier agent's, when this one
    /// has none): IPv6 connections out go to the IPv4 slot's listener, which refuses them
    /// unless it takes IPv6. A map without the slot needs nothing.
    pub fn clear_outbound6_listener(&mut self) {
        self.clear(OUTBOUND6_KEY);
    }

    /// Steers the application's IPv4 DNS to the agent from now on: its UDP datagrams to port
    /// 53 to `udp`, its TCP connections to port 53 to `tcp`.
    ///
    /// `udp` is a bound, unconnected IPv4 UDP socket (a socket map takes UDP sockets from Linux
    /// 5.7, and only bound ones); the datagrams keep their original destination, which
    /// `recvmsg` reports with `IP_RECVORIGDSTADDR`. `tcp` is a listening IPv4 socket, which
    /// must be `IP_TRANSPARENT` like the outbound listener (its connections' local address is
    /// the original destination). The datagrams are only seen once the pod's routing delivers
    /// them over `lo`; see the module docs.
    ///
    /// Both or neither: if `tcp` cannot be registered, `udp` is taken out again. A capture
    /// adopted from an agent that predates DNS capture has no slots for them:
    /// [`CaptureError::NoDnsSlots`], and the capture goes on as before.
    pub fn set_dns_listeners(
        &mut self,
        udp: &impl AsRawFd,
        tcp: &impl AsRawFd,
    ) -> Result<(), CaptureError> {
        self.set_dns(&DNS4_SLOTS, udp, tcp)
    }

    /// [`CaptureGuard::set_dns_listeners`] for IPv6: `udp` a bound, unconnected IPv6 UDP
    /// socket reporting `IPV6_RECVORIGDSTADDR`, `tcp` a listening `IP_TRANSPARENT` IPv6
    /// socket (an IPv4 socket cannot take an IPv6 lookup). A capture adopted from an agent
    /// that predates IPv6 DNS capture has no slots for them: [`CaptureError::NoDns6Slots`],
    /// and the capture goes on as before (its IPv4 DNS slots, if any, still work).
    pub fn set_dns6_listeners(
        &mut self,
        udp: &impl AsRawFd,
        tcp: &impl AsRawFd,
    ) -> Result<(), CaptureError> {
        self.set_dns(&DNS6_SLOTS, udp, tcp)
    }

    /// Registers `udp` and `tcp` in one family's DNS slots, both or neither.
    fn set_dns(
        &mut self,
        slots: &DnsSlots,
        udp: &impl AsRawFd,
        tcp: &impl AsRawFd,
    ) -> Result<(), CaptureError> {
        let too_old = older_map(slots.missing, slots.tcp + 1);
        self.set(slots.udp, udp).map_err(&too_old)?;
        if let Err(e) = self.set(slots.tcp, tcp) {
            self.clear(slots.udp);
            return Err(too_old(e));
        }
        Ok(())
    }

    /// Takes the DNS sockets of both families out of the map (an earlier agent's, when this
    /// one does not capture DNS): the application's TCP to port 53 goes to the outbound
    /// listener again, and its UDP to port 53, should it still be routed to `lo`, is dropped.
    /// Slots the map does not have (a capture from before DNS capture) need nothing.
    pub fn clear_dns_listeners(&mut self) {
        for slots in [&DNS4_SLOTS, &DNS6_SLOTS] {
            self.clear(slots.udp);
            self.clear(slots.tcp);
        }
    }

    /// Takes the IPv6 DNS sockets out of the map (an earlier agent's, when this one does not
    /// capture the pod's IPv6 DNS).
    pub fn clear_dns6_listeners(&mut self) {
        self.clear(DNS6_SLOTS.udp);
        self.clear(DNS6_SLOTS.tcp);
    }

    fn set(&mut self, key: u32, listener: &impl AsRawFd) -> Result<(), CaptureError> {
        self.maps
            .listener
            .set(key, listener, 0)
            .map_err(|source| CaptureError::Map {
                map: LISTENER_MAP,
                source,
            })
    }

    /// Empties `key`'s slot; an empty slot, or one the map does not have, is no error.
    fn clear(&mut self, key: u32) {
        match self.maps.listener.clear_index(&key) {
            Ok(()) | Err(MapError::OutOfBounds { .. }) => {}
            Err(MapError::SyscallError(e)) if e.io_error.kind() == std::io::ErrorKind::NotFound => {
            }
            Err(e) => warn!(slot = key, error = %e, "clear capture socket map slot"),
        }
    }

    /// Lets the next connection from `source` (the address the agent's delivery socket is
    /// bound to) reach the application instead of the agent.
    pub fn exempt(&self, source: SocketAddrV4) -> Result<Exemption, CaptureError> {
        let key = delivery_key(source);
        lock(&self.maps.delivery)
            .insert(key, 1, 0)
            .map_err(|e| CaptureError::Exempt {
                source_addr: source,
                source: e,
            })?;
        Ok(Exemption {
            delivery: Arc::clone(&self.maps.delivery),
            key,
            source,
        })
    }

    /// Removes the exemptions an earlier agent held when this guard adopted its attachment
    /// (an agent that died mid-delivery leaves its entry behind). Call it once the earlier
    /// agent's deliveries in progress then are surely over (each is bounded by its connect
    /// timeout). Returns how many were still there.
    pub fn clear_stale_exemptions(&self) -> usize {
        let stale = std::mem::take(&mut *lock(&self.stale));
        let mut delivery = lock(&self.maps.delivery);
        stale
            .into_iter()
            .filter(|key| delivery.remove(key).is_ok())
            .count()
    }

    /// Whether this guard took over an attachment pinned by an earlier agent.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The pin directory, for a pinned attachment.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_deref()
    }

    /// Lets go of a pinned attachment without detaching it when the guard is dropped, so the
    /// pod stays captured (failing closed while no listener is registered) until an agent calls
    /// [`attach_capture_pinned`] with the same directory. For an unpinned attachment this
    /// changes nothing. Takes `&self` because the guard is shared with the connections that
    /// use [`CaptureGuard::exempt`].
    pub fn keep_pinned(&self) {
        self.keep.store(true, Ordering::SeqCst);
    }
}

impl std::fmt::Debug for CaptureGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureGuard")
            .field("link", &self.link)
            .field("pins", &self.pins)
            .field("adopted", &self.adopted)
            .finish_non_exhaustive()
    }
}

impl Drop for CaptureGuard {
    fn drop(&mut self) {
        let Some(link) = self.link.take() else {
            return;
        };
        let keep = self.keep.load(Ordering::SeqCst);
        match (link, self.pins.take()) {
            (Attachment::Pinned(_), Some(dir)) if keep => {
                debug!(pin_dir = %dir.display(), "left pinned capture sk_lookup attached");
            }
            (Attachment::Pinned(link), Some(dir)) => {
                // Removing the pin drops the kernel's reference; closing our fd then detaches.
                if let Err(e) = link.unpin() {
                    warn!(pin_dir = %dir.display(), error = %e, "unpin capture sk_lookup link");
                }
                remove_map_pins(&dir);
                // Only if empty: the directory is the caller's, and may hold other pins.
                let _ = std::fs::remove_dir(&dir);
                debug!(pin_dir = %dir.display(), "detached pinned capture sk_lookup");
            }
            (link, _) => {
                drop(link);
                debug!("detached capture sk_lookup");
            }
        }
    }
}

// === impl Exemption ===

impl std::fmt::Debug for Exemption {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exemption")
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl Drop for Exemption {
    fn drop(&mut self) {
        if let Err(e) = lock(&self.delivery).remove(&self.key) {
            warn!(source = %self.source, error = %e, "remove capture exemption");
        }
    }
}

// === impl Maps ===

impl Maps {
    fn new(listener: Map, delivery: Map) -> Result<Self, CaptureError> {
        Ok(Self {
            listener: SockMap::try_from(listener).map_err(|source| CaptureError::Map {
                map: LISTENER_MAP,
                source,
            })?,
            delivery: Arc::new(Mutex::new(HashMap::try_from(delivery).map_err(
                |source| CaptureError::Map {
                    map: DELIVERY_MAP,
                    source,
                },
            )?)),
        })
    }

    fn exemption_keys(&self) -> Vec<u64> {
        lock(&self.delivery).keys().filter_map(Result::ok).collect()
    }
}

/// What a slot beyond the end of [`LISTENER_MAP`] means: the map (and so the program) is an
/// older one's, reported as `missing(slots it has, needed)`; other errors are kept.
fn older_map(
    missing: fn(u32, u32) -> CaptureError,
    needed: u32,
) -> impl Fn(CaptureError) -> CaptureError {
    move |e| match e {
        CaptureError::Map {
            source: MapError::OutOfBounds { max_entries, .. },
            ..
        } => missing(max_entries, needed),
        e => e,
    }
}

/// The map is only ever updated with single syscalls, so a poisoned lock holds nothing torn.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// `struct delivery_key` of the C program: address and port in network order, 2 bytes padding.
fn delivery_key(source: SocketAddrV4) -> u64 {
    let [a, b, c, d] = source.ip().octets();
    let [p, q] = source.port().to_be_bytes();
    u64::from_ne_bytes([a, b, c, d, p, q, 0, 0])
}

// === loading ===

/// Whether this kernel accepts the capture program: loads it (and its maps) without
/// attaching anything, then unloads it. The agent's automatic backend choice calls this and
/// falls back to nftables on an error, which says why (no BPF, no BTF, no sk_lookup, no
/// privilege).
pub fn probe() -> Result<(), CaptureError> {
    match child_loader() {
        Some(exe) => load_in_child(exe, &ChildJob::Probe),
        None => load(&CaptureConfig::new(0)).map(drop),
    }
}

/// Loads the program and its maps on the one thread that loads programs (see [`loader`]).
fn load(config: &CaptureConfig) -> Result<Loaded, CaptureError> {
    let (reply, answer) = std::sync::mpsc::sync_channel(1);
    let job: LoadJob = (*config, reply);
    loader()
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .send(job)
        .map_err(|_| CaptureError::LoaderGone)?;
    answer.recv().map_err(|_| CaptureError::LoaderGone)?
}

type LoadJob = (
    CaptureConfig,
    std::sync::mpsc::SyncSender<Result<Loaded, CaptureError>>,
);

/// The thread every in-process program load runs on (the agent loads in child processes, see
/// [`load_in_child_processes`]; the unpinned [`attach_capture`] and this crate's tests load
/// here). A load makes aya parse the kernel's BTF (~16 MiB at its peak) and free it again;
/// an allocator keeps part of what a thread frees for that thread, so loads spread over a
/// runtime's worker and blocking threads would leave some resident per thread that ever
/// loaded (measured with glibc: 3 pods, 41 MiB of anonymous memory where nftables needs 2.7).
/// On one thread the retention is that of one thread, whatever the number of loads.
fn loader() -> &'static std::sync::Mutex<std::sync::mpsc::Sender<LoadJob>> {
    static LOADER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<LoadJob>>> =
        std::sync::OnceLock::new();
    LOADER.get_or_init(|| {
        let (jobs, queue) = std::sync::mpsc::channel::<LoadJob>();
        // Lives as long as the process; a failed spawn shows as `LoaderGone` on each load.
        let _ = std::thread::Builder::new()
            .name("ebpf-loader".to_owned())
            .spawn(move || {
                for (config, reply) in queue {
                    let _ = reply.send(load_here(&config));
                }
            });
        std::sync::Mutex::new(jobs)
    })
}

fn load_here(config: &CaptureConfig) -> Result<Loaded, CaptureError> {
    let hbone_port = u32::from(config.hbone_port);
    // The C side compares against `remote_ip4`, which holds the address in network order.
    let probe_source = config
        .probe_source
        .map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
    let mut ebpf = EbpfLoader::new()
        .set_global("hbone_port", &hbone_port, true)
        .set_global("probe_source_ip4", &probe_source, true)
        .load(OBJECT)
        .map_err(CaptureError::Object)?;
    program(&mut ebpf)?.load().map_err(CaptureError::Load)?;
    let listener = take_map(&mut ebpf, LISTENER_MAP)?;
    let delivery = take_map(&mut ebpf, DELIVERY_MAP)?;
    Ok(Loaded {
        ebpf,
        listener,
        delivery,
    })
}

fn program(ebpf: &mut Ebpf) -> Result<&mut SkLookup, CaptureError> {
    ebpf.program_mut(PROGRAM)
        .and_then(|p| p.try_into().ok())
        .ok_or(CaptureError::Missing {
            what: "sk_lookup program",
            name: PROGRAM,
        })
}

fn take_map(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, CaptureError> {
    ebpf.take_map(name)
        .ok_or(CaptureError::Missing { what: "map", name })
}

fn attach(mut ebpf: Ebpf, netns: &impl AsFd) -> Result<OwnedLink, CaptureError> {
    let program = program(&mut ebpf)?;
    let id = program.attach(netns).map_err(CaptureError::Attach)?;
    let link = program.take_link(id).map_err(CaptureError::Attach)?;
    Ok(OwnedLink {
        _link: link.into(),
        _ebpf: ebpf,
    })
}

/// The program stays loaded as long as the link references it, so the object can go.
fn pin_link(link: OwnedLink, path: &Path) -> Result<PinnedLink, CaptureError> {
    link._link.pin(path).map_err(|source| CaptureError::Pin {
        what: "link",
        path: path.to_path_buf(),
        source,
    })
}

fn open_pinned(dir: &Path, name: &str) -> Result<Map, CaptureError> {
    let path = dir.join(name);
    if !path.exists() {
        return Err(CaptureError::Incomplete {
            link: dir.join(LINK_PIN),
            map: path,
        });
    }
    let data = MapData::from_pin(&path).map_err(|source| CaptureError::OpenMap {
        path: path.clone(),
        source,
    })?;
    // The map's type decides the variant the typed wrappers accept.
    Ok(if name == LISTENER_MAP {
        Map::SockMap(data)
    } else {
        Map::HashMap(data)
    })
}

fn remove_map_pins(dir: &Path) {
    for name in MAP_PINS {
        let path = dir.join(name);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %path.display(), error = %e, "remove capture map pin"),
        }
    }
}

// === loading in a child process ===

/// Makes the agent's binary run one [`ChildJob`] and exit (see [`serve_load_job`]).
const CHILD_JOB_ENV: &str = "ZTUNNEL_EBPF_LOAD_JOB";
/// How long a child may take before it is killed and its load fails.
const CHILD_DEADLINE: Duration = Duration::from_secs(30);

static CHILD_LOADER: OnceLock<PathBuf> = OnceLock::new();

/// From now on, [`attach_capture_pinned`] and [`probe`] load programs in a short-lived child
/// process running `exe` (the caller's own binary, e.g. `/proc/self/exe`, whose `main` must
/// begin with [`serve_load_job`]): the child loads, pins and attaches, then exits, and this
/// process opens the pins. A load makes aya parse the kernel's BTF (~16 MiB at its peak,
/// measured); in the child that memory is gone with the process, where in the agent it would
/// raise its peak at every enrollment and leave ~1.3 MiB behind in the allocator per load.
/// [`attach_capture`] (unpinned: the program must stay with this process) still loads here.
pub fn load_in_child_processes(exe: PathBuf) {
    let _ = CHILD_LOADER.set(exe);
}

fn child_loader() -> Option<&'static Path> {
    CHILD_LOADER.get().map(PathBuf::as_path)
}

/// What a child process is started to do.
#[derive(Debug, Clone, PartialEq, Eq)]
enum ChildJob {
    /// [`probe`].
    Probe,
    /// Load with `config`, pin under `pin_dir`, attach to the network namespace at `netns`.
    Pin {
        netns: PathBuf,
        pin_dir: PathBuf,
        config: CaptureConfig,
    },
}

impl ChildJob {
    /// Tab-separated (paths with a tab or a newline are refused at decoding).
    fn encode(&self) -> String {
        match self {
            Self::Probe => "probe".to_owned(),
            Self::Pin {
                netns,
                pin_dir,
                config,
            } => format!(
                "pin\t{}\t{}\t{}\t{}",
                netns.display(),
                pin_dir.display(),
                config.hbone_port,
                config
                    .probe_source
                    .map_or_else(|| "-".to_owned(), |ip| ip.to_string())
            ),
        }
    }

    fn decode(job: &str) -> Option<Self> {
        let fields: Vec<&str> = job.split('\t').collect();
        match fields.as_slice() {
            ["probe"] => Some(Self::Probe),
            ["pin", netns, pin_dir, port, probe] => {
                let mut config = CaptureConfig::new(port.parse().ok()?);
                if *probe != "-" {
                    config = config.with_probe_source(probe.parse().ok()?);
                }
                Some(Self::Pin {
                    netns: PathBuf::from(netns),
                    pin_dir: PathBuf::from(pin_dir),
                    config,
                })
            }
            _ => None,
        }
    }

    fn run(&self) -> Result<(), CaptureError> {
        match self {
            Self::Probe => load_here(&CaptureConfig::new(0)).map(drop),
            Self::Pin {
                netns,
                pin_dir,
                config,
            } => {
                let ns = std::fs::File::open(netns).map_err(|source| CaptureError::OpenNetns {
                    path: netns.clone(),
                    source,
                })?;
                load_and_pin(&ns, load_here(config)?, pin_dir)
            }
        }
    }
}

/// In a child started by [`load_in_child_processes`]' loader: runs its job and returns the
/// process's exit code (0: done; 1: failed, the error on stderr; 2: a job this version does
/// not understand). In any other process: `None`, at no cost. Call it first in `main`.
pub fn serve_load_job() -> Option<i32> {
    let job = std::env::var_os(CHILD_JOB_ENV)?;
    let Some(job) = job.to_str().and_then(ChildJob::decode) else {
        eprintln!("{CHILD_JOB_ENV}: not a job: {job:?}");
        return Some(2);
    };
    match job.run() {
        Ok(()) => Some(0),
        Err(e) => {
            eprintln!("{e}");
            Some(1)
        }
    }
}

/// Runs `job` in a child process of `exe` and waits for it (at most [`CHILD_DEADLINE`]).
fn load_in_child(exe: &Path, job: &ChildJob) -> Result<(), CaptureError> {
    use std::io::Read;
    let failed = |detail: String| CaptureError::Child { detail };
    let mut child = std::process::Command::new(exe)
        .env(CHILD_JOB_ENV, job.encode())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| failed(format!("start {}: {e}", exe.display())))?;
    let deadline = Instant::now() + CHILD_DEADLINE;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(failed(format!("no answer within {CHILD_DEADLINE:?}")));
            }
            Err(e) => return Err(failed(format!("wait: {e}"))),
        }
    };
    if status.success() {
        return Ok(());
    }
    let mut stderr = String::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_string(&mut stderr);
    }
    Err(failed(format!("{status}: {}", stderr.trim())))
}

/// A path this process's children can open `fd` by (the file stays open here meanwhile).
fn proc_fd_path(fd: &impl AsFd) -> PathBuf {
    PathBuf::from(format!(
        "/proc/{}/fd/{}",
        std::process::id(),
        fd.as_fd().as_raw_fd()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_key_has_the_c_struct_layout() {
        // struct delivery_key { __u32 ip4; __u16 port; __u16 pad; }, both in network order.
        let key = delivery_key(SocketAddrV4::new(Ipv4Addr::new(10, 99, 0, 7), 0x1f90));
        assert_eq!(key.to_ne_bytes(), [10, 99, 0, 7, 0x1f, 0x90, 0, 0]);
    }

    #[test]
    fn child_jobs_read_back_as_written() {
        let pin = ChildJob::Pin {
            netns: PathBuf::from("/proc/42/fd/7"),
            pin_dir: PathBuf::from("/sys/fs/bpf/ztunnel/default.server-4026532"),
            config: CaptureConfig::new(15008).with_probe_source(Ipv4Addr::new(169, 254, 7, 127)),
        };
        for job in [ChildJob::Probe, pin] {
            assert_eq!(ChildJob::decode(&job.encode()), Some(job));
        }
        for bad in [
            "",
            "pin",
            "pin\ta\tb\tnot-a-port\t-",
            "pin\ta\tb\t1\tnot-an-ip",
            "load",
        ] {
            assert_eq!(ChildJob::decode(bad), None, "{bad:?}");
        }
    }
}

#[cfg(test)]
mod prop_tests;
