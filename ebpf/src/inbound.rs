//! Inbound capture with `sk_lookup` (program `zt_inbound` in `inbound.bpf.c`).
//!
//! How it is attached: one program instance per pod, loaded with the pod's settings as
//! read-only globals, attached to the pod's network namespace with a BPF link
//! (`BPF_SK_LOOKUP` takes a netns fd; no cgroup is involved). The agent's 15006 listener is put
//! into the program's one-slot `SOCKMAP`; for every TCP SYN that arrives from outside the pod on
//! any port but the HBONE port, the kernel's listener lookup returns that socket instead. No
//! address is rewritten, so the accepted socket's `local_addr()` is the original destination.
//!
//! What is not steered: the HBONE port (the agent's own 15008 listener gets it by the normal
//! lookup), connections received on loopback (the pod talking to itself, and the agent handing
//! an inbound connection to the application), and connections from
//! [`InboundConfig::probe_source`] (the node's kubelet probes, which must reach the application
//! even while the agent is down, as with Istio's probe bypass).
//!
//! Failure mode: when the map holds no listener (the agent's listener closed, e.g. during an
//! agent restart) the program refuses the connection rather than let it reach the application
//! without policy: fail closed.
//!
//! Lifetimes: [`attach_inbound`] ties the attachment to the guard (and so to the agent's
//! process: a crash detaches it). [`attach_inbound_pinned`] also pins the link and the map in a
//! bpffs directory so the capture outlives the agent: a restarted agent calls it again with the
//! same directory, adopts the attachment and registers its new listener; dropping the guard
//! unpins and detaches (the pod is gone), [`InboundGuard::keep_pinned`] leaves it for the next
//! agent.

use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd};
use std::path::{Path, PathBuf};

use aya::maps::{Map, MapData, MapError, SockMap};
use aya::pin::PinError;
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::{ProgramError, SkLookup};
use aya::{include_bytes_aligned, Ebpf, EbpfError, EbpfLoader};
use tracing::{debug, warn};

/// The compiled `inbound.bpf.c` (see build.rs).
static OBJECT: &[u8] = include_bytes_aligned!(concat!(env!("OUT_DIR"), "/inbound.bpf.o"));

const PROGRAM: &str = "zt_inbound";
const LISTENER_MAP: &str = "inbound_listener";
/// The listener's slot in [`LISTENER_MAP`] (`INBOUND_LISTENER_KEY` in the C program).
const LISTENER_KEY: u32 = 0;
/// File names inside a pin directory.
const LINK_PIN: &str = "link";
const MAP_PIN: &str = "inbound_listener";

/// What the inbound program leaves alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundConfig {
    /// Connections to this port reach whoever listens on it (the agent's HBONE listener).
    pub hbone_port: u16,
    /// Connections from this address reach the application directly (node health probes).
    pub probe_source: Option<Ipv4Addr>,
}

impl InboundConfig {
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
pub enum InboundError {
    #[error("parse the embedded {PROGRAM} eBPF object: {0}")]
    Object(#[source] EbpfError),
    #[error("the embedded eBPF object has no {what} {name}")]
    Missing {
        what: &'static str,
        name: &'static str,
    },
    #[error("load program {PROGRAM} into the kernel: {0}")]
    Load(#[source] ProgramError),
    #[error("attach program {PROGRAM} to the network namespace: {0}")]
    Attach(#[source] ProgramError),
    #[error("put the inbound listener into map {LISTENER_MAP}: {0}")]
    Register(#[source] MapError),
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
    #[error("pinned link {link} has no map {map} beside it (not ours?)")]
    Incomplete { link: PathBuf, map: PathBuf },
}

/// Steers the pod's inbound TCP to `listener` until the guard is dropped.
///
/// `netns` is the pod's network namespace (e.g. `/var/run/netns/<pod>` opened read-only);
/// `listener` is a listening TCP socket created inside it (a `SOCKMAP` takes any TCP socket in
/// `LISTEN` state; it need not be bound to the destination port).
pub fn attach_inbound(
    netns: &impl AsFd,
    listener: &impl AsRawFd,
    config: &InboundConfig,
) -> Result<InboundGuard, InboundError> {
    let loaded = load(config)?;
    let map = sock_map(loaded.map)?;
    let mut guard = InboundGuard {
        link: Some(Attachment::Owned {
            _held: attach(loaded.ebpf, netns)?,
        }),
        map,
        pins: None,
        adopted: false,
    };
    guard.set_listener(listener)?;
    debug!(hbone_port = config.hbone_port, "attached inbound sk_lookup");
    Ok(guard)
}

/// Like [`attach_inbound`], but the link and the map are pinned under `pin_dir` (a directory on
/// a bpffs mount, one per pod, created if missing) so the capture survives the agent.
///
/// If `pin_dir` already holds a link (an earlier agent's), that attachment is adopted:
/// `listener` replaces the earlier one and `config` is NOT applied (the running program keeps
/// the settings it was loaded with; detach first to change them). [`InboundGuard::adopted`]
/// tells which happened.
pub fn attach_inbound_pinned(
    netns: &impl AsFd,
    listener: &impl AsRawFd,
    config: &InboundConfig,
    pin_dir: &Path,
) -> Result<InboundGuard, InboundError> {
    let link_path = pin_dir.join(LINK_PIN);
    let map_path = pin_dir.join(MAP_PIN);
    if link_path.exists() {
        if !map_path.exists() {
            return Err(InboundError::Incomplete {
                link: link_path,
                map: map_path,
            });
        }
        let link = PinnedLink::from_pin(&link_path).map_err(|source| InboundError::OpenLink {
            path: link_path.clone(),
            source,
        })?;
        let map = MapData::from_pin(&map_path)
            .and_then(|data| SockMap::try_from(Map::SockMap(data)))
            .map_err(|source| InboundError::OpenMap {
                path: map_path.clone(),
                source,
            })?;
        let mut guard = InboundGuard {
            link: Some(Attachment::Pinned(link)),
            map,
            pins: Some(pin_dir.to_path_buf()),
            adopted: true,
        };
        guard.set_listener(listener)?;
        debug!(pin_dir = %pin_dir.display(), "adopted pinned inbound sk_lookup");
        return Ok(guard);
    }

    std::fs::create_dir_all(pin_dir).map_err(|source| InboundError::PinDir {
        path: pin_dir.to_path_buf(),
        source,
    })?;
    // A map pin without a link is what an agent leaves when it dies between pinning the map
    // and pinning the link (the link died with it): stale, replace it.
    if map_path.exists() {
        let _ = std::fs::remove_file(&map_path);
    }
    let loaded = load(config)?;
    // Pin the map before the link: a link pin always has its map beside it.
    loaded.map.pin(&map_path).map_err(|source| InboundError::Pin {
        what: "map",
        path: map_path.clone(),
        source,
    })?;
    let map = sock_map(loaded.map)?;
    let link = match attach(loaded.ebpf, netns)
        .and_then(|link| pin_link(link, &link_path))
    {
        Ok(link) => link,
        Err(e) => {
            let _ = std::fs::remove_file(&map_path);
            return Err(e);
        }
    };
    let mut guard = InboundGuard {
        link: Some(Attachment::Pinned(link)),
        map,
        pins: Some(pin_dir.to_path_buf()),
        adopted: false,
    };
    guard.set_listener(listener)?;
    debug!(pin_dir = %pin_dir.display(), hbone_port = config.hbone_port, "attached pinned inbound sk_lookup");
    Ok(guard)
}

/// An attached inbound program. Dropping it detaches the program (and removes its pins, if
/// any); see [`InboundGuard::keep_pinned`] to hand a pinned attachment to the next agent.
pub struct InboundGuard {
    /// `None` only while dropping.
    link: Option<Attachment>,
    map: SockMap<MapData>,
    pins: Option<PathBuf>,
    adopted: bool,
}

#[derive(Debug)]
enum Attachment {
    /// The link, and the loaded object that owns the program, die with the guard.
    Owned { _held: OwnedLink },
    Pinned(PinnedLink),
}

/// Field order is drop order: the link goes (detaching the program) before the object.
#[derive(Debug)]
struct OwnedLink {
    _link: FdLink,
    _ebpf: Ebpf,
}

struct Loaded {
    ebpf: Ebpf,
    map: Map,
}

// === impl InboundGuard ===

impl InboundGuard {
    /// Steers to `listener` from now on (e.g. after rebinding 15006). Connections already
    /// queued on the previous listener stay there.
    pub fn set_listener(&mut self, listener: &impl AsRawFd) -> Result<(), InboundError> {
        self.map
            .set(LISTENER_KEY, listener, 0)
            .map_err(InboundError::Register)
    }

    /// Whether this guard took over an attachment pinned by an earlier agent.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// The pin directory, for a pinned attachment.
    pub fn pin_dir(&self) -> Option<&Path> {
        self.pins.as_deref()
    }

    /// Lets go of a pinned attachment without detaching it, so the pod stays captured (failing
    /// closed while no listener is registered) until an agent calls [`attach_inbound_pinned`]
    /// with the same directory. For an unpinned attachment this is the same as dropping.
    pub fn keep_pinned(mut self) {
        if self.pins.take().is_some() {
            debug!("left pinned inbound sk_lookup attached");
        }
    }
}

impl std::fmt::Debug for InboundGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InboundGuard")
            .field("link", &self.link)
            .field("pins", &self.pins)
            .field("adopted", &self.adopted)
            .finish_non_exhaustive()
    }
}

impl Drop for InboundGuard {
    fn drop(&mut self) {
        let Some(link) = self.link.take() else {
            return;
        };
        match (link, self.pins.take()) {
            (Attachment::Pinned(link), Some(dir)) => {
                // Removing the pin drops the kernel's reference; closing our fd then detaches.
                if let Err(e) = link.unpin() {
                    warn!(pin_dir = %dir.display(), error = %e, "unpin inbound sk_lookup link");
                }
                let map_pin = dir.join(MAP_PIN);
                if let Err(e) = std::fs::remove_file(&map_pin) {
                    warn!(path = %map_pin.display(), error = %e, "remove inbound map pin");
                }
                // Only empty: the directory is the caller's, and may hold other pins.
                let _ = std::fs::remove_dir(&dir);
                debug!(pin_dir = %dir.display(), "detached pinned inbound sk_lookup");
            }
            (link, _) => {
                drop(link);
                debug!("detached inbound sk_lookup");
            }
        }
    }
}

// === loading ===

fn load(config: &InboundConfig) -> Result<Loaded, InboundError> {
    let hbone_port = u32::from(config.hbone_port);
    // The C side compares against `remote_ip4`, which holds the address in network order.
    let probe_source = config
        .probe_source
        .map_or(0, |ip| u32::from_ne_bytes(ip.octets()));
    let mut ebpf = EbpfLoader::new()
        .set_global("hbone_port", &hbone_port, true)
        .set_global("probe_source_ip4", &probe_source, true)
        .load(OBJECT)
        .map_err(InboundError::Object)?;
    let program: &mut SkLookup = ebpf
        .program_mut(PROGRAM)
        .and_then(|p| p.try_into().ok())
        .ok_or(InboundError::Missing {
            what: "sk_lookup program",
            name: PROGRAM,
        })?;
    program.load().map_err(InboundError::Load)?;
    let map = ebpf.take_map(LISTENER_MAP).ok_or(InboundError::Missing {
        what: "map",
        name: LISTENER_MAP,
    })?;
    Ok(Loaded { ebpf, map })
}

fn sock_map(map: Map) -> Result<SockMap<MapData>, InboundError> {
    SockMap::try_from(map).map_err(InboundError::Register)
}

fn attach(mut ebpf: Ebpf, netns: &impl AsFd) -> Result<OwnedLink, InboundError> {
    let program: &mut SkLookup = ebpf
        .program_mut(PROGRAM)
        .and_then(|p| p.try_into().ok())
        .ok_or(InboundError::Missing {
            what: "sk_lookup program",
            name: PROGRAM,
        })?;
    let id = program.attach(netns).map_err(InboundError::Attach)?;
    let link = program.take_link(id).map_err(InboundError::Attach)?;
    Ok(OwnedLink {
        _link: link.into(),
        _ebpf: ebpf,
    })
}

/// The program stays loaded as long as the link references it, so the object can go.
fn pin_link(link: OwnedLink, path: &Path) -> Result<PinnedLink, InboundError> {
    let OwnedLink { _link, _ebpf } = link;
    _link.pin(path).map_err(|source| InboundError::Pin {
        what: "link",
        path: path.to_path_buf(),
        source,
    })
}
