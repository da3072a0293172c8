//! Istio `ServiceEntry` (`networking.istio.io`): destinations the Kubernetes registry does
//! not have (an external API, a database on a VM, a CIDR of them), given hosts, addresses,
//! ports and endpoints, so that the mesh knows them (routes, policy, `REGISTRY_ONLY`).
//!
//! What the node agent does with one (`ztunnel/src/proxy/outbound.rs`): a connection to one
//! of its `addresses` on one of its ports goes to its endpoints: `STATIC` the listed
//! endpoints (an address that is an enrolled pod over HBONE, any other in plain TCP) or the
//! pods its `workloadSelector` selects; `DNS` what its endpoints' host names (else its first
//! host that is no wildcard) resolve to, by the agent's resolver when it dials; `NONE` the
//! address the application connected to (what it resolved), in plain TCP for
//! `MESH_EXTERNAL`.
//!
//! An entry without `addresses` (resolution not `NONE`) gets a VIP per host that is no
//! wildcard, auto-allocated in `240.240.0.0/16` as Istio's DNS auto-allocation does
//! (`model/dns.rs`): the agent's DNS proxy answers the host with it, a connection to it is
//! the entry's as if it were one of its addresses ([`Model::service_entry_for`]), and a
//! `DNS` entry reached there resolves that host ([`Model::service_entry_host_at`]). The
//! agent's DNS proxy also answers an entry's hosts with its IP `addresses`
//! ([`Model::dns_lookup`]), for the namespaces it is exported to.
//!
//! [`Model::service_entry_for`]: super::Model::service_entry_for
//! [`Model::service_entry_host_at`]: super::Model::service_entry_host_at
//! [`Model::dns_lookup`]: super::Model::dns_lookup

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Serialize;

use super::Labels;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceEntry {
    pub name: String,
    pub namespace: String,
    /// `metadata.labels` (`istio.io/use-waypoint` sends its traffic through a waypoint).
    pub labels: Labels,
    /// Host names (`api.example.com`, `*.example.com`, a short name), at least one.
    pub hosts: Vec<String>,
    /// Virtual addresses or CIDRs a connection may name; empty: none.
    pub addresses: Vec<IpNet>,
    pub ports: Vec<SePort>,
    pub location: SeLocation,
    pub resolution: SeResolution,
    pub endpoints: Vec<SeEndpoint>,
    /// `workloadSelector.labels`: the pods in its namespace that are its endpoints.
    pub workload_selector: Option<Labels>,
    /// `exportTo`; empty: every namespace (`*`).
    pub export_to: Vec<String>,
}

/// A port of a [`ServiceEntry`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SePort {
    pub number: u16,
    pub name: String,
    /// `protocol` as written (`HTTP`, `HTTPS`, `TCP`, `TLS`, `GRPC`, `HTTP2`, `MONGO`...).
    pub protocol: Option<String>,
    /// `targetPort`: the endpoints' port when they do not name one.
    pub target_port: Option<u16>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum SeLocation {
    MeshExternal,
    MeshInternal,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum SeResolution {
    /// The address the application connected to.
    None,
    /// The listed endpoints (or the selected pods).
    Static,
    /// The hosts (or endpoint host names) resolved by DNS.
    Dns,
    DnsRoundRobin,
}

/// An endpoint of a [`ServiceEntry`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SeEndpoint {
    pub address: SeAddress,
    /// Port by [`SePort::name`]; absent: the port's `targetPort`, else its number.
    pub ports: BTreeMap<String, u16>,
    pub labels: Labels,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum SeAddress {
    Ip(IpAddr),
    /// A host name (only with `DNS` resolution).
    Host(String),
}

impl ServiceEntry {
    /// The port `port` of this entry, when it has it.
    pub fn port(&self, port: u16) -> Option<&SePort> {
        self.ports.iter().find(|p| p.number == port)
    }

    /// Whether `ip` is one of its addresses (or inside one of its CIDRs).
    pub fn has_address(&self, ip: IpAddr) -> bool {
        self.addresses.iter().any(|a| a.contains(&ip))
    }

    /// Whether a workload in `namespace` sees this entry (`exportTo`).
    pub fn visible_in(&self, namespace: &str) -> bool {
        self.export_to.is_empty()
            || self
                .export_to
                .iter()
                .any(|e| e == "*" || e == namespace || (e == "." && self.namespace == namespace))
    }
}

/// Two ServiceEntries that claim the same address and port for a namespace that sees both:
/// connections go to `kept` (the first in (namespace, name) order); `entry`'s claim on
/// `address`:`port` is not used. Shown in `/config_dump` and logged at each config change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SeConflict {
    /// `namespace/name` of the entry whose claim is not used.
    pub entry: String,
    /// `namespace/name` of the entry connections go to.
    pub kept: String,
    /// The overlapping address (the narrower of the two).
    pub address: IpNet,
    pub port: u16,
}

impl ServiceEntry {
    /// Whether a namespace could see both `self` and `other` (`exportTo`).
    fn seen_together(&self, other: &ServiceEntry) -> bool {
        let everywhere =
            |se: &ServiceEntry| se.export_to.is_empty() || se.export_to.iter().any(|e| e == "*");
        let names = |se: &ServiceEntry| -> Vec<String> {
            se.export_to
                .iter()
                .map(|e| {
                    if e == "." {
                        se.namespace.clone()
                    } else {
                        e.clone()
                    }
                })
                .collect()
        };
        everywhere(self)
            || everywhere(other)
            || names(self).iter().any(|n| names(other).contains(n))
    }

    /// Where `self` (later) overlaps `earlier`: each shared port with the narrower address.
    pub fn conflicts_with(&self, earlier: &ServiceEntry) -> Vec<SeConflict> {
        if !self.seen_together(earlier) {
            return Vec::new();
        }
        let mut out = Vec::new();
        for a in &self.addresses {
            for b in &earlier.addresses {
                let narrower = if b.contains(a) {
                    *a
                } else if a.contains(b) {
                    *b
                } else {
                    continue;
                };
                for p in &self.ports {
                    if earlier.port(p.number).is_some() {
                        out.push(SeConflict {
                            entry: format!("{}/{}", self.namespace, self.name),
                            kept: format!("{}/{}", earlier.namespace, earlier.name),
                            address: narrower,
                            port: p.number,
                        });
                    }
                }
            }
        }
        out
    }
}

/// One place a connection to a `DNS` ServiceEntry goes ([`super::Model::dns_entry_targets`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsTarget<'m> {
    /// An IP endpoint, as listed.
    Addr(std::net::SocketAddr),
    /// A host name, resolved when the connection is made, and the port.
    Host { host: &'m str, port: u16 },
}

impl SeEndpoint {
    /// The port this endpoint is reached on for `port` of its entry.
    pub fn port_for(&self, port: &SePort) -> u16 {
        self.ports
            .get(&port.name)
            .copied()
            .or(port.target_port)
            .unwrap_or(port.number)
    }
}
