//! Where the requests of a tunnel go: its target (a Service port or a pod), the target's
//! endpoints and cluster in the current model. Pure over the model, table-tested.
//!
//! Which targets a proxy serves at all is its own decision (the waypoint's: the destinations
//! that use it); the engine takes the [`Target`] it was given.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_model::model::{
    effective_policy, effective_policy_for_host, DnsTarget, EffectivePolicy, Model, NamespacedName,
    SeResolution, Service, ServiceEntry, ServicePort, SubsetError,
};

use crate::protocol::Declared;
use crate::upstream::Endpoint;

/// A destination the proxy serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A Service (by key) and one of its ports.
    Service { svc: NamespacedName, port: u16 },
    /// A pod addressed directly, and the port asked for.
    Workload { pod: NamespacedName, port: u16 },
    /// A ServiceEntry (by key), one of its ports, and the address the client connected to
    /// (the destination itself for `resolution: NONE`).
    ServiceEntry {
        entry: NamespacedName,
        port: u16,
        addr: SocketAddr,
    },
    /// A port of an ingress Gateway (class `istio`): each request goes where the routes
    /// attached to the port's listener for its host decide, else the VirtualServices bound
    /// to the Gateway for its host ([`mesh_model::route::route_listener`]); with none
    /// matching, nowhere (404).
    Listener { gateway: NamespacedName, port: u16 },
}

/// What the proxy needs to know about a target now (re-read from the current model on
/// every request, so endpoints follow config changes).
#[derive(Clone, Debug)]
pub struct Resolved<'m> {
    pub service: Option<&'m Arc<Service>>,
    pub port: Option<&'m ServicePort>,
    /// A ServiceEntry target.
    pub entry: Option<EntryTarget<'m>>,
    /// Ready endpoints, in the model's order (round robin starts from an offset).
    pub endpoints: Vec<Endpoint>,
}

/// A ServiceEntry as a target: the entry, the host the connection is for (the host of the
/// auto-allocated VIP it connected to, else the entry's first host that is no wildcard: its
/// DestinationRule's host, and the TLS server name of TLS originated to it) and the port.
#[derive(Clone, Copy, Debug)]
pub struct EntryTarget<'m> {
    pub entry: &'m ServiceEntry,
    pub host: &'m str,
    pub port: u16,
}

/// A host name and the addresses it resolved to (a `DNS` ServiceEntry's host or endpoint,
/// resolved by the proxy: [`crate::resolve::HostCache`]).
pub type HostAddrs = (String, Arc<[IpAddr]>);

/// Why a resolved target has nothing to send a request to.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unselectable {
    /// The subset is not defined (`503 NC`).
    #[error(transparent)]
    NoCluster(#[from] SubsetError),
    /// No ready endpoint, or none in the subset (`503 UH`).
    #[error("no ready endpoint")]
    NoEndpoint,
}

impl Resolved<'_> {
    /// The destination's host name: a Service's fully qualified name, a ServiceEntry's host
    /// (the TLS server name of TLS originated to its endpoints); none for a pod.
    pub fn host(&self) -> Option<String> {
        match (self.service, self.entry) {
            (Some(svc), _) => Some(svc.hostname()),
            (None, Some(t)) => Some(t.host.to_string()),
            (None, None) => None,
        }
    }

    /// The cluster these endpoints form with `subset`, as a proxy in `client_ns` sees it:
    /// its DestinationRule policy ([`effective_policy`]; defaults for a pod addressed
    /// directly) and the endpoints in the subset (pod labels), never empty.
    pub fn cluster(
        self,
        model: &Model,
        client_ns: &str,
        subset: Option<&str>,
    ) -> Result<(EffectivePolicy, Vec<Endpoint>), Unselectable> {
        if let Some(t) = self.entry {
            let ns = &t.entry.namespace;
            let policy = effective_policy_for_host(model, client_ns, t.host, ns, t.port, subset)?;
            // A subset selects endpoints by their pods' labels (an address outside the mesh
            // has none, so no subset selects it).
            let labels = subset.and_then(|name| {
                let dr = model.destination_rule_for_host(client_ns, t.host, ns)?;
                Some(dr.subset(name)?.labels.clone())
            });
            let eps = crate::balance::subset_endpoints(self.endpoints, labels.as_ref());
            if eps.is_empty() {
                return Err(Unselectable::NoEndpoint);
            }
            return Ok((policy, eps));
        }
        let Some((svc, port)) = self.service.zip(self.port) else {
            return match self.endpoints.is_empty() {
                true => Err(Unselectable::NoEndpoint),
                false => Ok((EffectivePolicy::default(), self.endpoints)),
            };
        };
        let policy = effective_policy(model, client_ns, svc, port.port, subset)?;
        let labels = subset.and_then(|name| {
            let dr = model.destination_rule_for(client_ns, svc)?;
            Some(dr.subset(name)?.labels.clone())
        });
        let eps = crate::balance::subset_endpoints(self.endpoints, labels.as_ref());
        if eps.is_empty() {
            return Err(Unselectable::NoEndpoint);
        }
        Ok((policy, eps))
    }
}

impl Target {
    /// The key of the round-robin counter and the cluster the target's requests share.
    pub fn rr_key(&self) -> NamespacedName {
        match self {
            Target::Service { svc, .. } => svc.clone(),
            Target::Workload { pod, .. } => pod.clone(),
            Target::ServiceEntry { entry, .. } => entry.clone(),
            Target::Listener { gateway, .. } => gateway.clone(),
        }
    }

    pub fn service_key(&self) -> Option<&NamespacedName> {
        match self {
            Target::Service { svc, .. } => Some(svc),
            Target::Workload { .. } | Target::ServiceEntry { .. } | Target::Listener { .. } => None,
        }
    }

    /// The protocol the destination declares (workloads declare none; a ServiceEntry port
    /// by its `protocol`).
    pub fn declared(&self, model: &Model) -> Declared {
        if let Target::Listener { .. } = self {
            return Declared::Http;
        }
        if let Target::ServiceEntry { entry, port, .. } = self {
            let protocol = model
                .service_entry(&entry.namespace, &entry.name)
                .and_then(|se| se.port(*port))
                .and_then(|p| p.protocol.as_deref());
            return protocol.map_or(Declared::Unknown, Declared::of_protocol);
        }
        match self.lookup(model, "") {
            Some(Resolved {
                port: Some(port), ..
            }) => Declared::of(port),
            _ => Declared::Unknown,
        }
    }

    /// The target in `model`; `None` when it has gone from the model. A `DNS` ServiceEntry's
    /// host names resolve to nothing here: see [`Target::lookup_with`].
    pub fn lookup<'m>(&self, model: &'m Model, trust_domain: &str) -> Option<Resolved<'m>> {
        self.lookup_with(model, trust_domain, &[])
    }

    /// [`Target::lookup`] with the addresses of the host names a `DNS` ServiceEntry target
    /// needs ([`Target::hosts_to_resolve`], resolved by the caller).
    pub fn lookup_with<'m>(
        &self,
        model: &'m Model,
        trust_domain: &str,
        hosts: &[HostAddrs],
    ) -> Option<Resolved<'m>> {
        match self {
            Target::Service { svc, port } => {
                let service = model.service_shared(svc)?;
                let sp = service.ports.iter().find(|p| p.port == *port)?;
                let endpoints = model
                    .endpoints(service, sp)
                    .iter()
                    .filter_map(|ep| upstream_endpoint(model, ep, trust_domain))
                    .collect();
                Some(Resolved {
                    service: Some(service),
                    port: Some(sp),
                    entry: None,
                    endpoints,
                })
            }
            Target::Workload { pod, port } => {
                let p = model.pod_shared(&pod.namespace, &pod.name)?;
                let ip = *p.ips.first()?;
                let endpoints = if p.ready {
                    vec![Endpoint::of(
                        model,
                        p,
                        SocketAddr::new(ip, *port),
                        trust_domain,
                    )]
                } else {
                    Vec::new()
                };
                Some(Resolved {
                    service: None,
                    port: None,
                    entry: None,
                    endpoints,
                })
            }
            // Nothing of its own to send to: its routes name the backends.
            Target::Listener { gateway, .. } => {
                model.gateways.get(gateway)?;
                Some(Resolved {
                    service: None,
                    port: None,
                    entry: None,
                    endpoints: Vec::new(),
                })
            }
            Target::ServiceEntry { entry, port, addr } => {
                let se = model.service_entry(&entry.namespace, &entry.name)?;
                let sp = se.port(*port)?;
                let endpoints = match se.resolution {
                    SeResolution::Static => model
                        .service_entry_endpoints(se, sp)
                        .iter()
                        .filter_map(|ep| upstream_endpoint(model, ep, trust_domain))
                        .collect(),
                    // The address the client connected to.
                    SeResolution::None => vec![match model.workload_by_ip_shared(addr.ip()) {
                        Some(pod) => Endpoint::of(model, pod, *addr, trust_domain),
                        None => Endpoint::outside(*addr),
                    }],
                    // Host names as resolved (all their addresses for `DNS`, Envoy's
                    // STRICT_DNS; the first for `DNS_ROUND_ROBIN`, its LOGICAL_DNS), IP
                    // endpoints as they are; all in plain TCP.
                    SeResolution::Dns | SeResolution::DnsRoundRobin => {
                        let first_only = se.resolution == SeResolution::DnsRoundRobin;
                        let resolved = |host: &str, port: u16| {
                            let addrs = hosts
                                .iter()
                                .find(|(h, _)| h.eq_ignore_ascii_case(host))
                                .map(|(_, a)| &a[..])
                                .unwrap_or_default();
                            let addrs = if first_only {
                                &addrs[..addrs.len().min(1)]
                            } else {
                                addrs
                            };
                            addrs
                                .iter()
                                .map(move |ip| Endpoint::outside(SocketAddr::new(*ip, port)))
                                .collect::<Vec<_>>()
                        };
                        model
                            .dns_entry_targets(se, sp, addr.ip())
                            .into_iter()
                            .flat_map(|target| match target {
                                DnsTarget::Addr(addr) => vec![Endpoint::outside(addr)],
                                DnsTarget::Host { host, port } => resolved(host, port),
                            })
                            .collect()
                    }
                };
                Some(Resolved {
                    service: None,
                    port: None,
                    entry: model
                        .service_entry_host(se, addr.ip())
                        .map(|host| EntryTarget {
                            entry: se,
                            host,
                            port: *port,
                        }),
                    endpoints,
                })
            }
        }
    }

    /// The host names to resolve before [`Target::lookup_with`]: a `DNS` ServiceEntry's
    /// endpoint host names, or without endpoints the host the connection is for; none for
    /// any other target.
    pub fn hosts_to_resolve(&self, model: &Model) -> Vec<String> {
        let Target::ServiceEntry { entry, port, addr } = self else {
            return Vec::new();
        };
        let Some(se) = model.service_entry(&entry.namespace, &entry.name) else {
            return Vec::new();
        };
        let Some(sp) = se.port(*port) else {
            return Vec::new();
        };
        model
            .dns_entry_targets(se, sp, addr.ip())
            .into_iter()
            .filter_map(|target| match target {
                DnsTarget::Host { host, .. } => Some(host.to_string()),
                DnsTarget::Addr(_) => None,
            })
            .collect()
    }
}

/// The model's endpoint `ep` as the upstream reaches it: its pod (over HBONE when enrolled),
/// or, for an address that is no pod (an EndpointSlice's or ServiceEntry's), plain TCP;
/// `None` when its pod has gone from the model.
fn upstream_endpoint(
    model: &Model,
    ep: &mesh_model::model::Endpoint,
    trust_domain: &str,
) -> Option<Endpoint> {
    let addr = SocketAddr::new(ep.ip, ep.port);
    match &ep.pod {
        Some(pod) => {
            let pod = model.pod_shared(&pod.namespace, &pod.name)?;
            Some(Endpoint::of(model, pod, addr, trust_domain))
        }
        None => Some(Endpoint::outside(addr)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_model::k8s::load_docs;

    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wp, namespace: app, labels: {istio.io/waypoint-for: all}}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: app, labels: {app: web, istio.io/use-waypoint: wp}}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: app, labels: {app: web, istio.io/dataplane-mode: none}}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: app, labels: {istio.io/use-waypoint: wp}}
spec:
  clusterIP: 10.96.0.1
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}, {name: tcp-raw, port: 9000}]
"#;

    fn model() -> Model {
        load_docs(&[("mesh.yaml".to_string(), MESH.to_string())]).expect("valid mesh")
    }

    const RULE: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: app}
spec:
  host: web
  trafficPolicy: {loadBalancer: {simple: RANDOM}}
  subsets:
  - {name: meshed, labels: {istio.io/use-waypoint: wp}}
  - name: off
    labels: {istio.io/dataplane-mode: none}
    trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}
  - {name: empty, labels: {app: nothing}}
"#;

    #[test]
    fn subsets_pick_endpoints_by_pod_labels_and_their_policy() {
        use mesh_model::model::LoadBalancer;
        let m = load_docs(&[
            ("mesh.yaml".to_string(), MESH.to_string()),
            ("dr.yaml".to_string(), RULE.to_string()),
        ])
        .expect("valid mesh");
        let web = Target::Service {
            svc: NamespacedName::new("app", "web"),
            port: 80,
        };
        let check = |subset: Option<&str>, want: Result<(LoadBalancer, Vec<&str>), &str>| {
            let r = web.lookup(&m, "cluster.local").expect("web");
            let got = r
                .cluster(&m, "app", subset)
                .map(|(p, eps)| {
                    let names: Vec<String> = eps.into_iter().map(|e| e.name()).collect();
                    (p.load_balancer, names)
                })
                .map_err(|e| e.to_string());
            match (got, want) {
                (Ok((lb, names)), Ok((want_lb, want_names))) => {
                    assert_eq!(
                        (lb, names),
                        (
                            want_lb,
                            want_names.iter().map(|n| n.to_string()).collect::<Vec<_>>()
                        ),
                        "{subset:?}"
                    )
                }
                (Err(e), Err(w)) => assert!(e.contains(w), "{subset:?}: {e}"),
                (got, want) => panic!("{subset:?}: got {got:?}, want {want:?}"),
            }
        };
        check(None, Ok((LoadBalancer::Random, vec!["web-1", "web-2"])));
        check(Some("meshed"), Ok((LoadBalancer::Random, vec!["web-1"])));
        check(Some("off"), Ok((LoadBalancer::LeastRequest, vec!["web-2"])));
        check(Some("empty"), Err("no ready endpoint"));
        check(Some("v9"), Err("subset \"v9\" is not defined"));
        // No rule for the Service: defaults, and every subset is unknown.
        let plain = model();
        let r = web.lookup(&plain, "cluster.local").expect("web");
        let (p, eps) = r.clone().cluster(&plain, "app", None).expect("default");
        assert_eq!((p, eps.len()), (EffectivePolicy::default(), 2));
        assert!(matches!(
            r.cluster(&plain, "app", Some("v1")),
            Err(Unselectable::NoCluster(_))
        ));
        // A pod addressed directly: its one endpoint, default policy.
        let pod = Target::Workload {
            pod: NamespacedName::new("app", "web-1"),
            port: 8080,
        };
        let r = pod.lookup(&m, "cluster.local").expect("pod");
        assert_eq!(r.cluster(&m, "app", None).map(|(_, e)| e.len()), Ok(1));
    }

    #[test]
    fn a_slice_address_that_is_no_pod_is_an_endpoint_outside_the_mesh() {
        let m = crate::engine::testing::model(&[
            "apiVersion: v1\nkind: Service\nmetadata: {name: ext, namespace: app}\nspec: {clusterIP: 10.96.0.77, ports: [{name: http, port: 80}]}\n",
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {name: ext-1, namespace: app, labels: {kubernetes.io/service-name: ext}}\naddressType: IPv4\nports: [{name: http, port: 8080}]\nendpoints: [{addresses: [10.0.0.1]}, {addresses: [192.0.2.10]}]\n",
        ]);
        let target = Target::Service {
            svc: NamespacedName::new("app", "ext"),
            port: 80,
        };
        let r = target.lookup(&m, "cluster.local").expect("in the model");
        let eps: Vec<(String, bool, bool)> = r
            .endpoints
            .iter()
            .map(|e| (e.name(), e.pod.is_some(), e.identity.is_some()))
            .collect();
        assert_eq!(
            eps,
            [
                ("web-1".to_string(), true, true),
                ("192.0.2.10:8080".to_string(), false, false),
            ],
            "the pod's address keeps its pod and identity; the other is plain TCP"
        );
    }

    #[test]
    fn endpoints_carry_the_identity_to_expect_or_none_outside_the_mesh() {
        let m = model();
        let target = Target::Service {
            svc: NamespacedName::new("app", "web"),
            port: 80,
        };
        assert_eq!(target.declared(&m), Declared::Http);
        let r = target.lookup(&m, "cluster.local").expect("in the model");
        let eps: Vec<(String, String, Option<String>)> = r
            .endpoints
            .iter()
            .map(|e| {
                (
                    e.name(),
                    e.addr.to_string(),
                    e.identity.as_ref().map(|i| i.principal()),
                )
            })
            .collect();
        assert_eq!(
            eps,
            [
                (
                    "web-1".to_string(),
                    "10.0.0.1:8080".to_string(),
                    Some("cluster.local/ns/app/sa/default".to_string())
                ),
                ("web-2".to_string(), "10.0.0.2:8080".to_string(), None),
            ]
        );
        let tcp = Target::Service {
            svc: NamespacedName::new("app", "web"),
            port: 9000,
        };
        assert_eq!(tcp.declared(&m), Declared::Tcp);
        let pod = Target::Workload {
            pod: NamespacedName::new("app", "web-1"),
            port: 8080,
        };
        assert_eq!(pod.declared(&m), Declared::Unknown);
        assert_eq!(
            pod.lookup(&m, "cluster.local")
                .expect("pod")
                .endpoints
                .len(),
            1
        );
    }

    /// A `DNS` entry's host names get the addresses the proxy resolved (all of them for
    /// `DNS`, the first for `DNS_ROUND_ROBIN`), on the port's `targetPort`; the host of an
    /// auto-allocated VIP is the one resolved, and the DestinationRule of that host applies
    /// (its `tls` originates TLS to the entry).
    #[test]
    fn a_dns_entry_uses_the_resolved_addresses_and_the_rule_of_its_host() {
        let entries = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: app}
spec:
  hosts: [api.example.com, other.example.com]
  ports: [{number: 443, name: tls, protocol: TLS, targetPort: 8443}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: one, namespace: app}
spec:
  hosts: [one.example.com]
  ports: [{number: 80, name: http}]
  resolution: DNS_ROUND_ROBIN
  endpoints: [{address: backend.example.net}, {address: 192.0.2.9}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: other, namespace: app}
spec:
  host: other.example.com
  trafficPolicy: {tls: {mode: SIMPLE}}
"#;
        let m = crate::engine::testing::model(&[entries]);
        let se = m.service_entry("app", "api").expect("api");
        // The VIP of the entry's second host.
        let vip = (0..=255u8)
            .flat_map(|hi| (0..=255u8).map(move |lo| IpAddr::from([240, 240, hi, lo])))
            .find(|ip| m.service_entry_host_at(*ip) == Some("other.example.com"))
            .expect("a VIP for other.example.com");
        let target = Target::ServiceEntry {
            entry: NamespacedName::new("app", "api"),
            port: 443,
            addr: SocketAddr::new(vip, 443),
        };
        assert_eq!(target.hosts_to_resolve(&m), ["other.example.com"]);
        let addrs: Arc<[IpAddr]> = Arc::from([
            "192.0.2.1".parse().expect("ip"),
            "192.0.2.2".parse().expect("ip"),
        ]);
        let hosts = [("other.example.com".to_string(), addrs)];
        assert!(target
            .lookup(&m, "cluster.local")
            .expect("api")
            .endpoints
            .is_empty());
        let r = target
            .lookup_with(&m, "cluster.local", &hosts)
            .expect("api");
        let eps: Vec<String> = r.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(eps, ["192.0.2.1:8443", "192.0.2.2:8443"]);
        assert_eq!(r.host().as_deref(), Some("other.example.com"));
        let (policy, _) = r.cluster(&m, "app", None).expect("cluster");
        assert!(
            policy.origination().is_some(),
            "the rule of the VIP's host: tls SIMPLE"
        );
        // Another address of the entry: its first host, which no rule names.
        let first = Target::ServiceEntry {
            entry: NamespacedName::new("app", "api"),
            port: 443,
            addr: SocketAddr::from(([240, 240, 0, 0], 443)),
        };
        assert_eq!(first.hosts_to_resolve(&m), ["api.example.com"]);
        let r = first.lookup_with(&m, "cluster.local", &hosts).expect("api");
        assert!(
            r.endpoints.is_empty(),
            "other.example.com's addresses are not api's"
        );
        assert!(se.port(443).is_some());
        // DNS_ROUND_ROBIN: the first address of each host name, IP endpoints as they are.
        let one = Target::ServiceEntry {
            entry: NamespacedName::new("app", "one"),
            port: 80,
            addr: SocketAddr::from(([240, 240, 0, 0], 80)),
        };
        assert_eq!(one.hosts_to_resolve(&m), ["backend.example.net"]);
        let hosts = [(
            "backend.example.net".to_string(),
            Arc::from([
                "198.51.100.1".parse::<IpAddr>().expect("ip"),
                "198.51.100.2".parse().expect("ip"),
            ]),
        )];
        let r = one.lookup_with(&m, "cluster.local", &hosts).expect("one");
        let eps: Vec<String> = r.endpoints.iter().map(|e| e.addr.to_string()).collect();
        assert_eq!(eps, ["198.51.100.1:80", "192.0.2.9:80"]);
        // Other targets need no resolution.
        let web = Target::Service {
            svc: NamespacedName::new("app", "web"),
            port: 80,
        };
        assert!(web.hosts_to_resolve(&m).is_empty());
    }
}
