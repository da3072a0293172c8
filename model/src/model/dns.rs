//! The mesh's DNS names, for the node agent's DNS proxy (Istio ambient's ztunnel DNS proxy:
//! a captured pod's queries are answered here for mesh names and forwarded upstream for
//! every other name), and Istio's DNS auto-allocation of virtual IPs for ServiceEntries
//! without `addresses`.
//!
//! [`Model::dns_lookup`] normalises the asked name (lower case, one trailing dot dropped)
//! and answers from, in order:
//! 1. a Kubernetes Service the model has, by `<svc>.<ns>.svc.cluster.local`,
//!    `<svc>.<ns>.svc`, `<svc>.<ns>` or a bare `<svc>` (the asking pod's namespace): its
//!    cluster IPs, or for a headless Service the addresses of its ready endpoints. Services
//!    are seen from every namespace.
//! 2. the exact hosts of the ServiceEntries exported to the asking namespace, in model
//!    order: the first entry with an answer gives it, its IP `addresses` (a CIDR names no
//!    address to answer with), else the VIP allocated for that host.
//! 3. their wildcard hosts (`*.example.com` covers `a.example.com` and `a.b.example.com`,
//!    not `example.com`), the longest suffix first, answered only with IP `addresses`.
//!
//! Anything else is not a mesh name (`None`): the agent forwards it. Every step is a hash
//! lookup (Services by namespace and name, exact hosts by name, wildcards by suffix: one
//! probe per label of the asked name), whatever the size of the mesh.
//!
//! Auto-allocation: an entry without `addresses` whose resolution is not `NONE` gets, for
//! each of its hosts that is no wildcard, one IPv4 VIP in `240.240.0.0/16` (Istio's range
//! for it). An application that resolves the host connects to the VIP; the agent knows the
//! entry by that address ([`Model::service_entry_for`]) and, for a `DNS` entry, which host
//! to resolve ([`Model::service_entry_host_at`]). `NONE` gets none: it connects to the
//! address the application resolved itself, so a VIP would hide the real destination. A
//! wildcard gets none: it is not one host, and one address cannot stand for every name it
//! covers. Allocation is IPv4 only (as Istio's `ISTIO_META_DNS_AUTO_ALLOCATE`): the answer
//! to an AAAA query for such a host is empty (NODATA), and applications fall back to IPv4.
//!
//! The VIP is deterministic, so that it survives config changes and agent restarts while
//! the entry stays: a 64-bit FNV-1a hash of `<namespace>/<name>/<host>` (not std's hasher,
//! whose keys are random per process) picks one of the 65534 addresses `.0.1` to `.255.254`
//! (never `.0.0` nor `.255.255`); a taken one moves it to the next free address (linear
//! probing, in model order, so the entries before it keep theirs). Taken are the VIPs given
//! before and any Service cluster IP or entry address in the range. The same host in two
//! entries gets two VIPs, one each: each entry is its own destination (ports, endpoints,
//! `exportTo`), and a lookup answers with the first visible one's.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use serde::Serialize;

use super::index::by_name;
use super::{Model, SeResolution, Service, ServiceEntry, CLUSTER_DOMAIN};

/// What the mesh answers for a name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsRecords {
    /// Its addresses, both families, in the order of the Service or entry (the agent picks
    /// those of the asked family; none of it means NODATA).
    pub addrs: Vec<IpAddr>,
}

/// An auto-allocated ServiceEntry VIP, as `/config_dump` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SeVip {
    /// `namespace/name` of the entry.
    pub entry: String,
    /// The host it stands for.
    pub host: String,
    pub address: IpAddr,
}

/// The first two octets of the auto-allocation range, `240.240.0.0/16`.
const VIP_NET: [u8; 2] = [240, 240];
/// The addresses of the range that may be given: offsets `1..=VIP_SLOTS` (not `.0.0`,
/// not `.255.255`).
const VIP_SLOTS: u32 = 65534;

/// The ServiceEntry hosts indexed for DNS and the VIPs allocated for them. Built by
/// [`Model::with_service_entries`]; entries are named by their position in the model's list.
#[derive(Clone, Debug, Default)]
pub(super) struct SeDns {
    /// Exact hosts (lower case): the entries that have each, in model order, with the VIP
    /// allocated for it (if any).
    exact: HashMap<String, Vec<HostClaim>>,
    /// Wildcard hosts by suffix (`example.com` for `*.example.com`): the entries, in order.
    wildcards: HashMap<String, Vec<usize>>,
    /// Allocated VIPs, in allocation (model) order.
    vips: Vec<Allocated>,
    /// Positions in `vips` by address.
    by_vip: HashMap<Ipv4Addr, usize>,
}

/// One entry's claim on an exact host.
#[derive(Clone, Copy, Debug)]
struct HostClaim {
    entry: usize,
    vip: Option<Ipv4Addr>,
}

/// A VIP given to host `host` (its position in the entry's `hosts`) of entry `entry`.
#[derive(Clone, Copy, Debug)]
struct Allocated {
    entry: usize,
    host: usize,
    address: Ipv4Addr,
}

impl SeDns {
    /// Indexes the hosts of `entries` and allocates their VIPs; no VIP takes an address in
    /// `reserved` (addresses already in use: cluster IPs, entries' own addresses).
    pub(super) fn build(
        entries: &[ServiceEntry],
        reserved: impl IntoIterator<Item = IpAddr>,
    ) -> SeDns {
        let mut taken: HashSet<u32> = reserved.into_iter().filter_map(vip_slot).collect();
        let mut dns = SeDns::default();
        for (i, se) in entries.iter().enumerate() {
            let allocates = se.addresses.is_empty() && se.resolution != SeResolution::None;
            for (h, host) in se.hosts.iter().enumerate() {
                let host = host.to_ascii_lowercase();
                if let Some(suffix) = host.strip_prefix('*') {
                    let suffix = suffix.trim_start_matches('.');
                    if suffix.is_empty() {
                        continue;
                    }
                    let list = dns.wildcards.entry(suffix.to_string()).or_default();
                    if list.last() != Some(&i) {
                        list.push(i);
                    }
                    continue;
                }
                let vip = if allocates {
                    let already = dns
                        .exact
                        .get(&host)
                        .and_then(|claims| claims.last())
                        .is_some_and(|c| c.entry == i);
                    if already {
                        // The same host listed twice in one entry: one VIP.
                        continue;
                    }
                    let key = format!("{}/{}/{host}", se.namespace, se.name);
                    allocate(&key, &taken).map(|slot| {
                        taken.insert(slot);
                        let address = vip_address(slot);
                        dns.by_vip.insert(address, dns.vips.len());
                        dns.vips.push(Allocated {
                            entry: i,
                            host: h,
                            address,
                        });
                        address
                    })
                } else {
                    None
                };
                let claims = dns.exact.entry(host).or_default();
                if claims.last().is_none_or(|c| c.entry != i) {
                    claims.push(HostClaim { entry: i, vip });
                }
            }
        }
        dns
    }

    /// Each VIP and the position of its entry, in allocation order.
    pub(super) fn vips(&self) -> impl Iterator<Item = (IpAddr, usize)> + '_ {
        self.vips.iter().map(|a| (IpAddr::V4(a.address), a.entry))
    }

    /// The allocation at `ip`, if it is a VIP.
    fn at(&self, ip: IpAddr) -> Option<&Allocated> {
        let IpAddr::V4(v4) = ip else {
            return None;
        };
        self.vips.get(*self.by_vip.get(&v4)?)
    }

    /// Whether `ip` is the VIP of a host of entry `entry`.
    pub(super) fn is_vip_of(&self, ip: IpAddr, entry: usize) -> bool {
        self.at(ip).is_some_and(|a| a.entry == entry)
    }
}

/// The 64-bit FNV-1a hash of `bytes`: stable across processes and releases, unlike std's
/// randomly keyed hasher.
fn fnv1a64(bytes: &[u8]) -> u64 {
    const OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes
        .iter()
        .fold(OFFSET_BASIS, |h, b| (h ^ u64::from(*b)).wrapping_mul(PRIME))
}

/// The slot (offset in `240.240.0.0/16`, `1..=VIP_SLOTS`) for `key`: the one its hash picks,
/// else the next one not `taken` (wrapping from the last to the first); `None` when every
/// slot is taken.
fn allocate(key: &str, taken: &HashSet<u32>) -> Option<u32> {
    if taken.len() >= VIP_SLOTS as usize {
        return None;
    }
    // The remainder is below VIP_SLOTS, so it fits.
    let start = (fnv1a64(key.as_bytes()) % u64::from(VIP_SLOTS)) as u32;
    (0..VIP_SLOTS)
        .map(|i| (start + i) % VIP_SLOTS + 1)
        .find(|slot| !taken.contains(slot))
}

/// The address of `slot` in `240.240.0.0/16`.
fn vip_address(slot: u32) -> Ipv4Addr {
    let [_, _, hi, lo] = slot.to_be_bytes();
    Ipv4Addr::new(VIP_NET[0], VIP_NET[1], hi, lo)
}

/// The slot of `ip` when it is an address of `240.240.0.0/16` a VIP could have.
fn vip_slot(ip: IpAddr) -> Option<u32> {
    let IpAddr::V4(v4) = ip else {
        return None;
    };
    let [a, b, hi, lo] = v4.octets();
    let slot = (u32::from(hi) << 8) | u32::from(lo);
    ([a, b] == VIP_NET && (1..=VIP_SLOTS).contains(&slot)).then_some(slot)
}

/// `name` as looked up: lower case (DNS names compare ASCII case-insensitively), without
/// one trailing dot (the absolute form).
fn normalise(name: &str) -> Cow<'_, str> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase())
    } else {
        Cow::Borrowed(name)
    }
}

/// The (namespace, name) of the Service that `host` names for a client in
/// `client_namespace`, as Kubernetes' DNS search path reads it: `<svc>.<ns>.svc.<cluster
/// domain>`, `<svc>.<ns>.svc`, `<svc>.<ns>` or a bare `<svc>` (in `client_namespace`).
/// `None`: no Service name form. `host` is lower case, without trailing dot. (Also how a
/// VirtualService destination host names a Service.)
pub(crate) fn service_name<'a>(
    client_namespace: &'a str,
    host: &'a str,
) -> Option<(&'a str, &'a str)> {
    let pair = |s: &'a str| {
        s.split_once('.')
            .filter(|(_, ns)| !ns.contains('.'))
            .map(|(svc, ns)| (ns, svc))
    };
    if !host.contains('.') {
        return Some((client_namespace, host));
    }
    if let Some(found) = pair(host) {
        return Some(found);
    }
    let rest = host
        .strip_suffix(CLUSTER_DOMAIN)
        .and_then(|r| r.strip_suffix('.'))
        .unwrap_or(host);
    rest.strip_suffix(".svc").and_then(pair)
}

/// The single addresses among `se`'s `addresses` (CIDRs are left out).
fn entry_ips(se: &ServiceEntry) -> Vec<IpAddr> {
    se.addresses
        .iter()
        .filter(|net| net.prefix_len() == net.max_prefix_len())
        .map(|net| net.addr())
        .collect()
}

impl Model {
    /// The mesh's addresses for `name` asked by a pod in `client_namespace`; `None`: not a
    /// mesh name (the agent forwards the query upstream). `Some` with no address of the
    /// asked family means the agent answers NODATA. `name` may have a trailing dot and any
    /// case. See the module documentation for the order names are looked up in.
    pub fn dns_lookup(&self, client_namespace: &str, name: &str) -> Option<DnsRecords> {
        let name = normalise(name);
        let name = name.as_ref();
        if name.is_empty() {
            return None;
        }
        let addrs = self
            .dns_service(client_namespace, name)
            .or_else(|| self.dns_exact_host(client_namespace, name))
            .or_else(|| self.dns_wildcard(client_namespace, name))?;
        Some(DnsRecords { addrs })
    }

    /// The host an auto-allocated ServiceEntry VIP stands for (the agent resolves that host
    /// when a connection to the VIP uses a DNS-resolution entry).
    pub fn service_entry_host_at(&self, ip: IpAddr) -> Option<&str> {
        let a = self.index.se_dns.at(ip)?;
        self.service_entries
            .get(a.entry)?
            .hosts
            .get(a.host)
            .map(String::as_str)
    }

    /// The host of `se` a connection to `ip` is for: the host of the VIP allocated to it,
    /// else its first host that is no wildcard, else its first (what a `DNS` entry without
    /// endpoints resolves, and the host whose DestinationRule applies).
    pub fn service_entry_host<'a>(&'a self, se: &'a ServiceEntry, ip: IpAddr) -> Option<&'a str> {
        self.service_entry_host_at(ip)
            .filter(|h| se.hosts.iter().any(|x| x == h))
            .or_else(|| {
                se.hosts
                    .iter()
                    .map(String::as_str)
                    .find(|h| !h.starts_with('*'))
            })
            .or_else(|| se.hosts.first().map(String::as_str))
    }

    /// The auto-allocated VIPs, in allocation order (for `/config_dump`).
    pub(super) fn service_entry_vips(&self) -> Vec<SeVip> {
        self.index
            .se_dns
            .vips
            .iter()
            .filter_map(|a| {
                let se = self.service_entries.get(a.entry)?;
                Some(SeVip {
                    entry: format!("{}/{}", se.namespace, se.name),
                    host: se.hosts.get(a.host)?.clone(),
                    address: IpAddr::V4(a.address),
                })
            })
            .collect()
    }

    /// Step 1: the addresses of the Service `name` names, when the model has it.
    fn dns_service(&self, client_namespace: &str, name: &str) -> Option<Vec<IpAddr>> {
        let (namespace, svc) = service_name(client_namespace, name)?;
        let svc = by_name(&self.index.services_by_name, namespace, svc)?;
        Some(self.service_dns_addresses(svc))
    }

    /// A Service's DNS answer: its cluster IPs; headless, each address of its ready endpoints
    /// once (every IP of each ready pod it selects, or the ready addresses of its
    /// EndpointSlices when it has no selector), whatever their ports.
    fn service_dns_addresses(&self, svc: &Service) -> Vec<IpAddr> {
        if !svc.cluster_ips.is_empty() {
            return svc.cluster_ips.clone();
        }
        let mut seen = BTreeSet::new();
        let ips: Vec<IpAddr> = match &svc.selector {
            Some(selector) => self
                .selected_pods(svc, selector)
                .filter(|pod| pod.ready)
                .flat_map(|pod| pod.ips.iter().copied())
                .collect(),
            None => self
                .index
                .slices
                .get(&svc.namespace)
                .and_then(|by_svc| by_svc.get(&svc.name))
                .into_iter()
                .flatten()
                .flat_map(|slice| slice.endpoints.iter())
                .filter(|ep| ep.ready)
                .map(|ep| ep.ip)
                .collect(),
        };
        ips.into_iter().filter(|ip| seen.insert(*ip)).collect()
    }

    /// Step 2: the answer of the first entry exported to `client_namespace` that has `name`
    /// among its hosts and has one.
    fn dns_exact_host(&self, client_namespace: &str, name: &str) -> Option<Vec<IpAddr>> {
        self.index
            .se_dns
            .exact
            .get(name)?
            .iter()
            .filter_map(|claim| Some((claim, self.service_entries.get(claim.entry)?)))
            .filter(|(_, se)| se.visible_in(client_namespace))
            .find_map(|(claim, se)| {
                let ips = entry_ips(se);
                if !ips.is_empty() {
                    return Some(ips);
                }
                claim.vip.map(|vip| vec![IpAddr::V4(vip)])
            })
    }

    /// Step 3: the addresses of the first entry exported to `client_namespace` with a
    /// wildcard covering `name`, the longest suffix first.
    fn dns_wildcard(&self, client_namespace: &str, name: &str) -> Option<Vec<IpAddr>> {
        let wildcards = &self.index.se_dns.wildcards;
        if wildcards.is_empty() {
            return None;
        }
        name.match_indices('.')
            .filter_map(|(dot, _)| wildcards.get(&name[dot + 1..]))
            .flatten()
            .filter_map(|i| self.service_entries.get(*i))
            .filter(|se| se.visible_in(client_namespace))
            .map(entry_ips)
            .find(|ips| !ips.is_empty())
    }
}

#[cfg(test)]
mod tests;
