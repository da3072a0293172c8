//! The model's indexes, built once by [`Model::new`](super::Model::new) (a config change
//! builds a new model). Every query a new connection or request makes — the destination by IP
//! or VIP, a Service's endpoints, a pod's Services, the AuthorizationPolicies and
//! PeerAuthentications that apply to a workload, a waypoint's pods, the policies attached to a
//! waypoint — reads the entries of one namespace, one label or one attachment point, never
//! the whole mesh: its cost does not grow with the number of pods, Services and policies.
//!
//! Pods and Services are shared (`Arc`) between the model's maps and the indexes, so an
//! index entry costs a pointer. Policies are named by their position in the model's list, so
//! that sorting positions restores model order.
//!
//! Selectors are indexed by their first `(key, value)`: an entry whose selector is not empty
//! can only select labels that contain that pair, so the candidates for a set of labels are
//! the entries under each of its pairs (plus those that select everything), each checked with
//! the full selector afterwards. The answers are the naive scans' (`index/tests.rs` compares
//! them on random models).

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::sync::Arc;

use super::{
    selector_matches, Action, AuthorizationPolicy, EndpointSlice, HttpRoute, Labels, Namespace,
    NamespacedName, ParentKind, PeerAuthentication, Pod, Service, TlsSecret, VirtualService,
    GATEWAY_NAME_LABEL,
};
use crate::policy::l7::{attach_point, AttachPoint, Destination};

#[derive(Clone, Debug, Default)]
pub(super) struct Index {
    /// Pods and Services by namespace and name, hashed: the maps' own lookups compare
    /// O(log n) keys and need an owned key.
    pub(super) pods_by_name: HashSet<ByName<Pod>>,
    pub(super) services_by_name: HashSet<ByName<Service>>,
    pub(super) pod_by_ip: HashMap<IpAddr, Arc<Pod>>,
    pub(super) service_by_vip: HashMap<IpAddr, Arc<Service>>,
    /// Services in key order: a position in this list orders Services as the model does.
    pub(super) services: Vec<Arc<Service>>,
    pub(super) namespaces: HashMap<String, NsIndex>,
    /// AuthorizationPolicies with `targetRefs` (for waypoints), by what they attach to.
    pub(super) waypoint_policies: Attachments,
    /// RequestAuthentications (positions in their list), by what they attach to.
    pub(super) request_authentications: Attachments,
    /// ServiceEntries (positions in their list) by address, auto-allocated VIPs included.
    pub(super) service_entries: SeAddresses,
    /// ServiceEntry hosts for DNS and the VIPs auto-allocated to them.
    pub(super) se_dns: super::dns::SeDns,
    /// The pods each ServiceEntry's `workloadSelector` selects, by namespace and name (entries
    /// without one are absent).
    pub(super) service_entry_pods: ByNamespaceAndName<Box<[Arc<Pod>]>>,
    /// ServiceEntries (positions in their list) by namespace and name.
    pub(super) service_entry_positions: ByNamespaceAndName<usize>,
    /// EndpointSlices by namespace, then Service name, in slice name order.
    pub(super) slices: ByNamespaceAndName<Vec<Arc<EndpointSlice>>>,
    /// Routes (positions in the model's list, ascending) by each parent their `parentRefs`
    /// name, so that a listener's, a Service's or a waypoint's routes are read without
    /// scanning every route (a request asks).
    pub(super) routes_by_parent: RoutesByParent,
    /// Mesh VirtualServices (positions, ascending) by the hosts they name, so that the one
    /// for a destination is found without scanning them (a request asks).
    pub(super) mesh_virtual_services: VsByHost,
    /// DestinationRules (positions, ascending) by namespace and host, so that the one for a
    /// destination is found without scanning them (a connection or request asks).
    pub(super) destination_rules: DrByHost,
    /// VirtualServices (positions in the model's list, ascending) by namespace and name of
    /// each Gateway their `gateways` name, so that an ingress gateway reads its own.
    pub(super) virtual_services_by_gateway: ByNamespaceAndName<Vec<u32>>,
    /// ReferenceGrants (positions in their list) by namespace.
    pub(super) reference_grants: HashMap<String, Vec<u32>>,
    /// TLS Secrets by namespace and name.
    pub(super) tls_secrets: ByNamespaceAndName<Arc<TlsSecret>>,
}

/// Values by namespace, then name (looked up with borrowed strings).
pub(super) type ByNamespaceAndName<T> = HashMap<String, HashMap<String, T>>;

/// ServiceEntries by address: single addresses and auto-allocated VIPs hashed, CIDRs (few)
/// listed.
#[derive(Clone, Debug, Default)]
pub(super) struct SeAddresses {
    by_ip: HashMap<IpAddr, Vec<usize>>,
    cidrs: Vec<usize>,
}

impl SeAddresses {
    /// `vips`: each auto-allocated VIP and its entry's position.
    pub(super) fn build(
        entries: &[super::ServiceEntry],
        vips: impl Iterator<Item = (IpAddr, usize)>,
    ) -> SeAddresses {
        let mut a = SeAddresses::default();
        for (ip, i) in vips {
            a.by_ip.entry(ip).or_default().push(i);
        }
        for (i, se) in entries.iter().enumerate() {
            for net in &se.addresses {
                if net.prefix_len() == net.max_prefix_len() {
                    a.by_ip.entry(net.addr()).or_default().push(i);
                } else if a.cidrs.last() != Some(&i) {
                    a.cidrs.push(i);
                }
            }
        }
        a
    }

    /// Positions of the entries that may have `ip`, in order (the caller checks).
    pub(super) fn candidates(&self, ip: IpAddr) -> impl Iterator<Item = usize> + '_ {
        let mut all: Vec<usize> = self
            .by_ip
            .get(&ip)
            .into_iter()
            .flatten()
            .chain(self.cidrs.iter())
            .copied()
            .collect();
        all.sort_unstable();
        all.dedup();
        all.into_iter()
    }
}

/// `slices` (in name order) grouped by namespace and Service.
pub(super) fn slices_by_service<'a>(
    slices: impl Iterator<Item = &'a Arc<EndpointSlice>>,
) -> ByNamespaceAndName<Vec<Arc<EndpointSlice>>> {
    let mut by: ByNamespaceAndName<Vec<Arc<EndpointSlice>>> = HashMap::new();
    for slice in slices {
        by.entry(slice.namespace.clone())
            .or_default()
            .entry(slice.service.clone())
            .or_default()
            .push(slice.clone());
    }
    by
}

/// Routes by parent: per parent kind, namespace and name, their positions in model order.
#[derive(Clone, Debug, Default)]
pub(super) struct RoutesByParent {
    gateway: ByNamespaceAndName<Vec<u32>>,
    service: ByNamespaceAndName<Vec<u32>>,
    service_entry: ByNamespaceAndName<Vec<u32>>,
}

impl RoutesByParent {
    /// `routes` (in model order) under each parent their `parentRefs` name, each route once
    /// per parent.
    pub(super) fn build(routes: &[HttpRoute]) -> RoutesByParent {
        let mut by = RoutesByParent::default();
        for (position, r) in (0u32..).zip(routes) {
            for p in &r.parents {
                let bucket = by
                    .kind_mut(p.kind)
                    .entry(p.target.namespace.clone())
                    .or_default()
                    .entry(p.target.name.clone())
                    .or_default();
                if bucket.last() != Some(&position) {
                    bucket.push(position);
                }
            }
        }
        by
    }

    /// The positions of the routes naming the `kind` parent `namespace/name`, ascending.
    pub(super) fn get(&self, kind: ParentKind, namespace: &str, name: &str) -> &[u32] {
        let by = match kind {
            ParentKind::Gateway => &self.gateway,
            ParentKind::Service => &self.service,
            ParentKind::ServiceEntry => &self.service_entry,
        };
        by.get(namespace)
            .and_then(|by_name| by_name.get(name))
            .map_or(&[], Vec::as_slice)
    }

    fn kind_mut(&mut self, kind: ParentKind) -> &mut ByNamespaceAndName<Vec<u32>> {
        match kind {
            ParentKind::Gateway => &mut self.gateway,
            ParentKind::Service => &mut self.service,
            ParentKind::ServiceEntry => &mut self.service_entry,
        }
    }
}

/// DestinationRules by namespace: exact hosts (lower-case) hashed to the first rule for
/// each, rules with a wildcard host listed; positions in model order.
#[derive(Clone, Debug, Default)]
pub(super) struct DrByHost {
    namespaces: HashMap<String, DrNamespace>,
}

#[derive(Clone, Debug, Default)]
struct DrNamespace {
    exact: HashMap<String, u32>,
    wildcard: Vec<u32>,
}

impl DrByHost {
    pub(super) fn build(rules: &[super::DestinationRule]) -> DrByHost {
        let mut by = DrByHost::default();
        for (position, dr) in (0u32..).zip(rules) {
            let ns = by.namespaces.entry(dr.namespace.clone()).or_default();
            if dr.host.starts_with('*') {
                ns.wildcard.push(position);
            } else {
                ns.exact
                    .entry(dr.host.to_ascii_lowercase())
                    .or_insert(position);
            }
        }
        by
    }

    /// The first rule in `namespace` whose host is `host` (any case).
    pub(super) fn exact(&self, namespace: &str, host: &str) -> Option<u32> {
        let ns = self.namespaces.get(namespace)?;
        match ns.exact.get(host) {
            Some(p) => Some(*p),
            None if host.bytes().any(|b| b.is_ascii_uppercase()) => {
                ns.exact.get(&host.to_ascii_lowercase()).copied()
            }
            None => None,
        }
    }

    /// The rules in `namespace` with a wildcard host, in model order.
    pub(super) fn wildcards(&self, namespace: &str) -> &[u32] {
        self.namespaces
            .get(namespace)
            .map_or(&[], |ns| ns.wildcard.as_slice())
    }
}

/// The VirtualServices that apply to mesh traffic (`mesh`), by host: exact hosts hashed,
/// those with a wildcard host (`*`, `*.suffix`: few) listed; positions in model order.
#[derive(Clone, Debug, Default)]
pub(super) struct VsByHost {
    exact: HashMap<String, Vec<u32>>,
    wildcard: Vec<u32>,
}

impl VsByHost {
    pub(super) fn build(virtual_services: &[VirtualService]) -> VsByHost {
        let mut by = VsByHost::default();
        for (position, vs) in (0u32..).zip(virtual_services).filter(|(_, vs)| vs.mesh) {
            for host in &vs.hosts {
                let bucket = if host.starts_with('*') {
                    &mut by.wildcard
                } else {
                    by.exact.entry(host.clone()).or_default()
                };
                if bucket.last() != Some(&position) {
                    bucket.push(position);
                }
            }
        }
        by
    }

    /// The positions of the mesh VirtualServices that may name one of `names`: those with
    /// one of them as an exact host, and every one with a wildcard host (the caller matches),
    /// ascending, each once.
    pub(super) fn candidates(&self, names: &[String]) -> Vec<u32> {
        let mut out: Vec<u32> = self.wildcard.clone();
        for name in names {
            if let Some(positions) = self.exact.get(name) {
                out.extend_from_slice(positions);
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// `virtual_services` (in model order) by each Gateway their `gateways` name (each listed
/// once per VirtualService by the translator).
pub(super) fn virtual_services_by_gateway(
    virtual_services: &[VirtualService],
) -> ByNamespaceAndName<Vec<u32>> {
    let mut by: ByNamespaceAndName<Vec<u32>> = HashMap::new();
    for (position, vs) in (0u32..).zip(virtual_services) {
        for g in &vs.gateways {
            let bucket = by
                .entry(g.namespace.clone())
                .or_default()
                .entry(g.name.clone())
                .or_default();
            if bucket.last() != Some(&position) {
                bucket.push(position);
            }
        }
    }
    by
}

/// An object named by namespace and name, shared with the model's map, hashed and compared
/// by its name so that a set of them is looked up with a borrowed `(namespace, name)`.
#[derive(Debug)]
pub(super) struct ByName<T>(pub(super) Arc<T>);

impl<T> Clone for ByName<T> {
    fn clone(&self) -> Self {
        ByName(self.0.clone())
    }
}

/// What has a namespace and a name.
pub(super) trait Named {
    fn names(&self) -> (&str, &str);
}

impl Named for Pod {
    fn names(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl Named for Service {
    fn names(&self) -> (&str, &str) {
        (&self.namespace, &self.name)
    }
}

impl Named for (&str, &str) {
    fn names(&self) -> (&str, &str) {
        *self
    }
}

impl Hash for dyn Named + '_ {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.names().hash(state);
    }
}

impl PartialEq for dyn Named + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.names() == other.names()
    }
}

impl Eq for dyn Named + '_ {}

impl<T: Named> Hash for ByName<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.names().hash(state);
    }
}

impl<T: Named> PartialEq for ByName<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.names() == other.0.names()
    }
}

impl<T: Named> Eq for ByName<T> {}

impl<'a, T: Named + 'a> Borrow<dyn Named + 'a> for ByName<T> {
    fn borrow(&self) -> &(dyn Named + 'a) {
        &*self.0
    }
}

/// The object named `namespace/name` in `set`.
pub(super) fn by_name<'s, T: Named>(
    set: &'s HashSet<ByName<T>>,
    namespace: &str,
    name: &str,
) -> Option<&'s Arc<T>> {
    set.get(&(namespace, name) as &dyn Named).map(|b| &b.0)
}

/// What one namespace's queries read.
#[derive(Clone, Debug, Default)]
pub(super) struct NsIndex {
    /// The namespace itself, when the model has it.
    pub(super) namespace: Option<Namespace>,
    /// Services with a selector (positions in [`Index::services`]).
    pub(super) services: BySelector,
    /// Each selecting Service's selected pods (ready or not), in name order, by Service name.
    pub(super) selected: HashMap<String, Selected>,
    /// AuthorizationPolicies ztunnel enforces (no `targetRefs`, not CUSTOM), by selector.
    pub(super) l4_policies: BySelector,
    /// PeerAuthentications (positions), in model order.
    pub(super) peer_authentications: Vec<u32>,
    /// Ready, non host-network pods labelled with a Gateway's name, in name order.
    pub(super) gateway_pods: HashMap<String, Vec<Arc<Pod>>>,
}

/// A Service as indexed, and the pods its selector selects.
#[derive(Clone, Debug)]
pub(super) struct Selected {
    pub(super) service: Arc<Service>,
    pub(super) pods: Box<[Arc<Pod>]>,
}

/// Entries with a label selector, by the selector's first `(key, value)`.
#[derive(Clone, Debug, Default)]
pub(super) struct BySelector {
    /// Entries whose selector is empty (or absent where that selects everything).
    every: Vec<u32>,
    by_label: HashMap<String, HashMap<String, Vec<u32>>>,
}

impl BySelector {
    fn insert(&mut self, position: u32, selector: Option<&Labels>) {
        match selector.and_then(|s| s.iter().next()) {
            None => self.every.push(position),
            Some((k, v)) => self
                .by_label
                .entry(k.clone())
                .or_default()
                .entry(v.clone())
                .or_default()
                .push(position),
        }
    }

    /// Adds to `out` every entry that may select `labels` (a superset: check each), in no
    /// particular order. Reads at most one bucket per label.
    pub(super) fn candidates(&self, labels: &Labels, out: &mut Vec<u32>) {
        out.extend_from_slice(&self.every);
        // Whichever is shorter: the selectors' keys or the labels.
        if self.by_label.len() < labels.len() {
            for (k, values) in &self.by_label {
                if let Some(bucket) = labels.get(k).and_then(|v| values.get(v)) {
                    out.extend_from_slice(bucket);
                }
            }
        } else {
            for (k, v) in labels {
                if let Some(bucket) = self.by_label.get(k).and_then(|values| values.get(v)) {
                    out.extend_from_slice(bucket);
                }
            }
        }
    }
}

/// Entries attached to waypoints by `targetRefs`, by what they name.
#[derive(Clone, Debug, Default)]
pub(super) struct Attachments {
    gateways: Buckets,
    services: Buckets,
    service_entries: Buckets,
    gateway_class: Vec<u32>,
}

impl Attachments {
    pub(super) fn build<'a>(
        entries: impl Iterator<Item = (&'a str, &'a [super::TargetRef])>,
    ) -> Self {
        let mut a = Attachments::default();
        for (position, (namespace, refs)) in (0u32..).zip(entries) {
            for target in refs {
                let bucket = match attach_point(namespace, target) {
                    Some(AttachPoint::Gateway { namespace, name }) => a
                        .gateways
                        .entry(namespace.to_string())
                        .or_default()
                        .entry(name.to_string())
                        .or_default(),
                    Some(AttachPoint::Service { namespace, name }) => a
                        .services
                        .entry(namespace.to_string())
                        .or_default()
                        .entry(name.to_string())
                        .or_default(),
                    Some(AttachPoint::ServiceEntry { namespace, name }) => a
                        .service_entries
                        .entry(namespace.to_string())
                        .or_default()
                        .entry(name.to_string())
                        .or_default(),
                    Some(AttachPoint::GatewayClass) => &mut a.gateway_class,
                    None => continue,
                };
                // Two refs of one entry to the same point: listed once.
                if bucket.last() != Some(&position) {
                    bucket.push(position);
                }
            }
        }
        a
    }

    /// Positions of the entries attached to `waypoint` for a request to `dest`, ascending
    /// and without repeats.
    pub(super) fn attached(&self, waypoint: &NamespacedName, dest: Destination<'_>) -> Vec<u32> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.gateway_class);
        out.extend_from_slice(get(&self.gateways, waypoint));
        match dest {
            Destination::Service(svc) => out.extend_from_slice(get(&self.services, svc)),
            Destination::ServiceEntry(se) => out.extend_from_slice(get(&self.service_entries, se)),
            Destination::Workload => {}
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

type Buckets = HashMap<String, HashMap<String, Vec<u32>>>;

/// One namespace's pods by `(key, value)` label, while the index is built.
type PodsByLabel<'a> = HashMap<(&'a str, &'a str), Vec<&'a Arc<Pod>>>;

fn get<'a>(map: &'a Buckets, key: &NamespacedName) -> &'a [u32] {
    map.get(&key.namespace)
        .and_then(|names| names.get(&key.name))
        .map_or(&[], Vec::as_slice)
}

// === building ===

impl Index {
    pub(super) fn build(
        namespaces: &std::collections::BTreeMap<String, Namespace>,
        pods: &std::collections::BTreeMap<NamespacedName, Arc<Pod>>,
        services: &std::collections::BTreeMap<NamespacedName, Arc<Service>>,
        peer_authentications: &[PeerAuthentication],
        authorization_policies: &[AuthorizationPolicy],
    ) -> Index {
        let mut index = Index {
            pods_by_name: pods.values().map(|p| ByName(p.clone())).collect(),
            services_by_name: services.values().map(|s| ByName(s.clone())).collect(),
            ..Index::default()
        };
        for ns in namespaces.values() {
            index.ns(&ns.name).namespace = Some(ns.clone());
        }
        // Pods by namespace and label, for selecting: dropped once the Services have theirs.
        let mut labelled: HashMap<&str, PodsByLabel<'_>> = HashMap::new();
        let mut in_namespace: HashMap<&str, Vec<&Arc<Pod>>> = HashMap::new();
        for pod in pods.values() {
            let by_label = labelled.entry(pod.namespace.as_str()).or_default();
            for (k, v) in &pod.labels {
                by_label
                    .entry((k.as_str(), v.as_str()))
                    .or_default()
                    .push(pod);
            }
            in_namespace
                .entry(pod.namespace.as_str())
                .or_default()
                .push(pod);
            if !pod.host_network {
                for ip in &pod.ips {
                    // A finished pod keeps its IP in `status` while the IP may already belong
                    // to a new pod: the ready claimant wins, otherwise the first by name.
                    let replace = match index.pod_by_ip.get(ip) {
                        None => true,
                        Some(current) => pod.ready && !current.ready,
                    };
                    if replace {
                        index.pod_by_ip.insert(*ip, pod.clone());
                    }
                }
                if pod.ready {
                    if let Some(gw) = pod.labels.get(GATEWAY_NAME_LABEL) {
                        index
                            .ns(&pod.namespace)
                            .gateway_pods
                            .entry(gw.clone())
                            .or_default()
                            .push(pod.clone());
                    }
                }
            }
        }
        for (position, svc) in (0u32..).zip(services.values()) {
            index.services.push(svc.clone());
            for ip in &svc.cluster_ips {
                index.service_by_vip.insert(*ip, svc.clone());
            }
            let Some(selector) = &svc.selector else {
                continue;
            };
            // The smallest of the selector's label sets, checked against the whole selector.
            let candidates: &[&Arc<Pod>] = if selector.is_empty() {
                in_namespace
                    .get(svc.namespace.as_str())
                    .map_or(&[], Vec::as_slice)
            } else {
                let by_label = labelled.get(svc.namespace.as_str());
                selector
                    .iter()
                    .map(|(k, v)| {
                        by_label
                            .and_then(|m| m.get(&(k.as_str(), v.as_str())))
                            .map_or(&[][..], Vec::as_slice)
                    })
                    .min_by_key(|pods| pods.len())
                    .unwrap_or(&[])
            };
            let selected: Box<[Arc<Pod>]> = candidates
                .iter()
                .filter(|pod| selector_matches(selector, &pod.labels))
                .map(|pod| Arc::clone(pod))
                .collect();
            let ns = index.ns(&svc.namespace);
            ns.services.insert(position, Some(selector));
            ns.selected.insert(
                svc.name.clone(),
                Selected {
                    service: svc.clone(),
                    pods: selected,
                },
            );
        }
        for (position, pa) in (0u32..).zip(peer_authentications) {
            index.ns(&pa.namespace).peer_authentications.push(position);
        }
        for (position, p) in (0u32..).zip(authorization_policies) {
            if p.target_refs.is_empty() && p.action != Action::Custom {
                index
                    .ns(&p.namespace)
                    .l4_policies
                    .insert(position, p.selector.as_ref());
            }
        }
        index.waypoint_policies = Attachments::build(
            authorization_policies
                .iter()
                .map(|p| (p.namespace.as_str(), p.target_refs.as_slice())),
        );
        index
    }

    fn ns(&mut self, namespace: &str) -> &mut NsIndex {
        self.namespaces.entry(namespace.to_string()).or_default()
    }
}

#[cfg(test)]
mod tests;
