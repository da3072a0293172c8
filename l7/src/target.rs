//! Where the requests of a tunnel go: its target (a Service port or a pod), the target's
//! endpoints and cluster in the current model. Pure over the model, table-tested.
//!
//! Which targets a proxy serves at all is its own decision (the waypoint's: the destinations
//! that use it); the engine takes the [`Target`] it was given.

use std::net::SocketAddr;
use std::sync::Arc;

use mesh_model::model::{
    effective_policy, EffectivePolicy, Model, NamespacedName, SeAddress, SeResolution, Service,
    ServicePort, SubsetError,
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
}

/// What the proxy needs to know about a target now (re-read from the current model on
/// every request, so endpoints follow config changes).
#[derive(Clone, Debug)]
pub struct Resolved<'m> {
    pub service: Option<&'m Arc<Service>>,
    pub port: Option<&'m ServicePort>,
    /// Ready endpoints, in the model's order (round robin starts from an offset).
    pub endpoints: Vec<Endpoint>,
}

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
    /// The cluster these endpoints form with `subset`, as a proxy in `client_ns` sees it:
    /// its DestinationRule policy ([`effective_policy`]; defaults for a pod addressed
    /// directly) and the endpoints in the subset (pod labels), never empty.
    pub fn cluster(
        self,
        model: &Model,
        client_ns: &str,
        subset: Option<&str>,
    ) -> Result<(EffectivePolicy, Vec<Endpoint>), Unselectable> {
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
        }
    }

    pub fn service_key(&self) -> Option<&NamespacedName> {
        match self {
            Target::Service { svc, .. } => Some(svc),
            Target::Workload { .. } | Target::ServiceEntry { .. } => None,
        }
    }

    /// The protocol the destination declares (workloads declare none; a ServiceEntry port
    /// by its `protocol`).
    pub fn declared(&self, model: &Model) -> Declared {
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

    /// The target in `model`; `None` when it has gone from the model.
    pub fn lookup<'m>(&self, model: &'m Model, trust_domain: &str) -> Option<Resolved<'m>> {
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
                    endpoints,
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
                    // Host names are resolved by the node agent, not here yet: its IP
                    // endpoints only.
                    SeResolution::Dns | SeResolution::DnsRoundRobin => se
                        .endpoints
                        .iter()
                        .filter_map(|ep| match ep.address {
                            SeAddress::Ip(ip) => {
                                Some(Endpoint::outside(SocketAddr::new(ip, ep.port_for(sp))))
                            }
                            SeAddress::Host(_) => None,
                        })
                        .collect(),
                };
                Some(Resolved {
                    service: None,
                    port: None,
                    endpoints,
                })
            }
        }
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
}
