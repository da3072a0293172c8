//! The indexed queries against the scans they replace, on random models: same answers, same
//! order. The scans below are the model's queries as they were written before the index.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};

use proptest::prelude::*;

use crate::model::endpoint_of;
use crate::model::{
    selector_matches, Action, AuthorizationPolicy, ContainerPort, Endpoint, Gateway, Labels, Model,
    Namespace, NamespacedName, PeerAuthentication, PeerAuthnMode, Pod, RequestAuthentication,
    Service, ServicePort, TargetPort, TargetRef, VirtualService, WaypointFor, GATEWAY_NAME_LABEL,
    ROOT_NAMESPACE,
};
use crate::policy::l7::{attached, policies_for_waypoint};
use crate::policy::{applies_at_l4, peer_authn_mode, policies_for};

const NAMESPACES: [&str; 3] = ["a", "b", ROOT_NAMESPACE];
const KEYS: [&str; 3] = ["app", "tier", GATEWAY_NAME_LABEL];
const VALUES: [&str; 3] = ["x", "y", "wp"];

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

fn labels() -> impl Strategy<Value = Labels> {
    proptest::collection::btree_map(
        (0..KEYS.len()).prop_map(|k| KEYS[k].to_string()),
        (0..VALUES.len()).prop_map(|v| VALUES[v].to_string()),
        0..3,
    )
    .prop_map(|m| m.into_iter().collect())
}

/// `None`, `{}` or one or two labels.
fn selector() -> impl Strategy<Value = Option<Labels>> {
    prop_oneof![
        1 => Just(None),
        1 => Just(Some(Labels::new())),
        4 => labels().prop_map(Some),
    ]
}

fn namespace() -> impl Strategy<Value = String> {
    (0..NAMESPACES.len()).prop_map(|n| NAMESPACES[n].to_string())
}

fn pod() -> impl Strategy<Value = Pod> {
    (
        namespace(),
        0u8..12,
        labels(),
        any::<bool>(),
        0u8..8,
        prop_oneof![4 => Just(true), 1 => Just(false)],
        any::<bool>(),
    )
        .prop_map(
            |(namespace, n, labels, host_network, ip, ready, named_port)| Pod {
                name: format!("p{n}"),
                namespace,
                uid: None,
                service_account: "default".to_string(),
                node_name: None,
                // Few addresses, so that pods claim the same IP.
                ips: vec![IpAddr::V4(Ipv4Addr::new(10, 0, 0, ip))],
                labels,
                annotations: Labels::new(),
                host_network,
                container_ports: vec![ContainerPort {
                    name: named_port.then(|| "http".to_string()),
                    port: 8080,
                }],
                ready,
            },
        )
}

fn service() -> impl Strategy<Value = Service> {
    (namespace(), 0u8..6, selector(), any::<bool>()).prop_map(|(namespace, n, selector, named)| {
        Service {
            name: format!("s{n}"),
            namespace,
            labels: Labels::new(),
            cluster_ips: vec![IpAddr::V4(Ipv4Addr::new(10, 96, 0, n))],
            ports: vec![ServicePort {
                name: None,
                app_protocol: None,
                port: 80,
                target_port: if named {
                    TargetPort::Named("http".to_string())
                } else {
                    TargetPort::Number(9090)
                },
            }],
            selector,
            load_balancer_ingress: Vec::new(),
        }
    })
}

fn target_ref() -> impl Strategy<Value = TargetRef> {
    let gw = "gateway.networking.k8s.io";
    prop_oneof![
        (0u8..6).prop_map(|n| TargetRef {
            group: String::new(),
            kind: "Service".into(),
            name: format!("s{n}")
        }),
        (0u8..6).prop_map(|n| TargetRef {
            group: "core".into(),
            kind: "Service".into(),
            name: format!("s{n}")
        }),
        Just(TargetRef {
            group: gw.into(),
            kind: "Gateway".into(),
            name: "wp".into()
        }),
        Just(TargetRef {
            group: gw.into(),
            kind: "GatewayClass".into(),
            name: "istio-waypoint".into()
        }),
        Just(TargetRef {
            group: gw.into(),
            kind: "GatewayClass".into(),
            name: "other".into()
        }),
        Just(TargetRef {
            group: "x".into(),
            kind: "Service".into(),
            name: "s1".into()
        }),
    ]
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        Just(Action::Allow),
        Just(Action::Deny),
        Just(Action::Audit),
        Just(Action::Custom)
    ]
}

fn authorization_policy() -> impl Strategy<Value = AuthorizationPolicy> {
    (
        namespace(),
        0u8..20,
        selector(),
        prop_oneof![2 => Just(Vec::new()), 1 => proptest::collection::vec(target_ref(), 1..3)],
        action(),
    )
        .prop_map(
            |(namespace, n, selector, target_refs, action)| AuthorizationPolicy {
                name: format!("ap{n}"),
                namespace,
                selector,
                target_refs,
                action,
                rules: Vec::new(),
                dry_run: false,
            },
        )
}

fn mode() -> impl Strategy<Value = PeerAuthnMode> {
    prop_oneof![
        Just(PeerAuthnMode::Unset),
        Just(PeerAuthnMode::Strict),
        Just(PeerAuthnMode::Permissive),
        Just(PeerAuthnMode::Disable)
    ]
}

fn peer_authentication() -> impl Strategy<Value = PeerAuthentication> {
    (namespace(), 0u8..6, selector(), mode(), mode()).prop_map(
        |(namespace, n, selector, mode, port_mode)| PeerAuthentication {
            name: format!("pa{n}"),
            namespace,
            selector,
            mode,
            port_levels: BTreeMap::from([(8080, port_mode)]),
        },
    )
}

fn request_authentication() -> impl Strategy<Value = RequestAuthentication> {
    (
        namespace(),
        0u8..6,
        proptest::collection::vec(target_ref(), 0..3),
    )
        .prop_map(|(namespace, n, target_refs)| RequestAuthentication {
            name: format!("ra{n}"),
            namespace,
            selector: None,
            target_refs,
            jwt_rules: Vec::new(),
        })
}

fn model() -> impl Strategy<Value = Model> {
    (
        proptest::collection::vec(pod(), 0..24),
        proptest::collection::vec(service(), 0..8),
        proptest::collection::vec(authorization_policy(), 0..16),
        proptest::collection::vec(peer_authentication(), 0..6),
        proptest::collection::vec(request_authentication(), 0..4),
    )
        .prop_map(|(pods, services, mut policies, peer_authns, ras)| {
            let pods = pods
                .into_iter()
                .map(|p| (NamespacedName::new(&p.namespace, &p.name), p))
                .collect();
            let services = services
                .into_iter()
                .map(|s| (NamespacedName::new(&s.namespace, &s.name), s))
                .collect();
            // The translator's order: by namespace and name, one of each.
            policies.sort_by(|x, y| (&x.namespace, &x.name).cmp(&(&y.namespace, &y.name)));
            policies.dedup_by(|x, y| (&x.namespace, &x.name) == (&y.namespace, &y.name));
            let namespaces = NAMESPACES
                .iter()
                .map(|n| {
                    (
                        n.to_string(),
                        Namespace {
                            name: n.to_string(),
                            labels: Labels::new(),
                        },
                    )
                })
                .collect();
            let gateways = NAMESPACES
                .iter()
                .map(|ns| {
                    let gw = Gateway {
                        name: "wp".to_string(),
                        namespace: ns.to_string(),
                        class: crate::model::WAYPOINT_GATEWAY_CLASS.to_string(),
                        labels: Labels::new(),
                        waypoint_for: WaypointFor::All,
                        addresses: Vec::new(),
                        requested_addresses: Vec::new(),
                        generation: None,
                        listeners: Vec::new(),
                    };
                    (gw.key(), gw)
                })
                .collect();
            Model::new(
                namespaces,
                BTreeSet::new(),
                pods,
                services,
                peer_authns,
                policies,
            )
            .with_gateways(gateways)
            .with_request_authentications(ras)
        })
}

/// A VirtualService in namespace `a` bound to up to four of the Gateways `ingress` and
/// `other` of [`NAMESPACES`] (a Gateway may repeat, as the translator never gives it).
fn virtual_service() -> impl Strategy<Value = VirtualService> {
    (
        0..6u32,
        proptest::option::of(1..4u32),
        proptest::collection::vec((0..NAMESPACES.len(), 0..2usize), 0..4),
    )
        .prop_map(|(n, created, gateways)| VirtualService {
            name: format!("vs{n}"),
            namespace: "a".to_string(),
            created: created.map(|day| format!("2024-01-0{day}T00:00:00Z")),
            hosts: vec!["*".to_string()],
            mesh: gateways.is_empty(),
            gateways: gateways
                .into_iter()
                .map(|(ns, name)| NamespacedName::new(NAMESPACES[ns], ["ingress", "other"][name]))
                .collect(),
            rules: Vec::new(),
        })
}

/// A route in one of [`NAMESPACES`] naming up to four parents of any kind among a few
/// names (a parent may repeat).
fn http_route() -> impl Strategy<Value = crate::model::HttpRoute> {
    (
        0..6u32,
        0..NAMESPACES.len(),
        proptest::collection::vec((0..3usize, 0..NAMESPACES.len(), 0..3usize), 0..4),
    )
        .prop_map(|(n, ns, parents)| crate::model::HttpRoute {
            kind: crate::model::RouteKind::Http,
            name: format!("r{n}"),
            namespace: NAMESPACES[ns].to_string(),
            created: None,
            parents: parents
                .into_iter()
                .map(|(kind, ns, name)| crate::model::ParentRef {
                    kind: PARENT_KINDS[kind],
                    target: NamespacedName::new(NAMESPACES[ns], PARENT_NAMES[name]),
                    section_name: None,
                    port: None,
                })
                .collect(),
            hostnames: Vec::new(),
            rules: Vec::new(),
        })
}

const PARENT_KINDS: [crate::model::ParentKind; 3] = [
    crate::model::ParentKind::Gateway,
    crate::model::ParentKind::Service,
    crate::model::ParentKind::ServiceEntry,
];
const PARENT_NAMES: [&str; 3] = ["wp", "web", "ingress"];
/// Hosts a VirtualService may name and destinations asked for.
const VS_HOSTS: [&str; 5] = ["a.example", "b.example", "*.example", "*", "c.other"];
const DESTINATIONS: [&str; 4] = ["a.example", "b.example", "c.other", "z.example"];

/// A VirtualService for up to three hosts of [`VS_HOSTS`], for mesh traffic or not.
fn mesh_virtual_service() -> impl Strategy<Value = VirtualService> {
    (
        0..6u32,
        proptest::collection::vec(0..VS_HOSTS.len(), 1..4),
        any::<bool>(),
    )
        .prop_map(|(n, hosts, mesh)| VirtualService {
            name: format!("vs{n}"),
            namespace: "a".to_string(),
            created: None,
            hosts: hosts.into_iter().map(|h| VS_HOSTS[h].to_string()).collect(),
            mesh,
            gateways: Vec::new(),
            rules: Vec::new(),
        })
}

/// DestinationRule hosts (cases and wildcards mixed) and the hosts asked for.
const DR_HOSTS: [&str; 5] = [
    "web.a.svc.cluster.local",
    "WEB.a.svc.cluster.local",
    "*.a.svc.cluster.local",
    "*.cluster.local",
    "api.b.svc.cluster.local",
];
const DR_ASKED: [&str; 3] = [
    "web.a.svc.cluster.local",
    "Api.b.svc.cluster.local",
    "db.a.svc.cluster.local",
];

fn destination_rule() -> impl Strategy<Value = crate::model::DestinationRule> {
    (
        0..6u32,
        0..NAMESPACES.len(),
        0..DR_HOSTS.len(),
        proptest::option::of(1..4u32),
    )
        .prop_map(|(n, ns, host, created)| crate::model::DestinationRule {
            name: format!("dr{n}"),
            namespace: NAMESPACES[ns].to_string(),
            created: created.map(|day| format!("2024-01-0{day}T00:00:00Z")),
            host: DR_HOSTS[host].to_string(),
            traffic_policy: Default::default(),
            subsets: Vec::new(),
        })
}

// === the scans ===

fn scan_services_for_pod<'a>(m: &'a Model, pod: &Pod) -> Vec<&'a Service> {
    m.services
        .values()
        .filter(|svc| svc.namespace == pod.namespace)
        .filter(|svc| {
            svc.selector
                .as_ref()
                .is_some_and(|sel| selector_matches(sel, &pod.labels))
        })
        .map(|s| &**s)
        .collect()
}

fn scan_endpoints(m: &Model, svc: &Service, port: &ServicePort) -> Vec<Endpoint> {
    let Some(selector) = &svc.selector else {
        return Vec::new();
    };
    m.pods
        .values()
        .filter(|pod| pod.namespace == svc.namespace && pod.ready)
        .filter(|pod| selector_matches(selector, &pod.labels))
        .filter_map(|pod| endpoint_of(svc, port, pod))
        .collect()
}

fn scan_policies_for<'a>(m: &'a Model, pod: &Pod) -> Vec<&'a AuthorizationPolicy> {
    m.authorization_policies
        .iter()
        .filter(|p| applies_at_l4(p, pod))
        .collect()
}

fn scan_peer_authn_mode(m: &Model, pod: &Pod, port: u16) -> PeerAuthnMode {
    let workload_policy =
        |pa: &PeerAuthentication| pa.selector.as_ref().is_some_and(|s| !s.is_empty());
    let first = |keep: &dyn Fn(&PeerAuthentication) -> bool| {
        m.peer_authentications
            .iter()
            .filter(|pa| keep(pa))
            .min_by(|a, b| a.name.cmp(&b.name))
    };
    let mesh = first(&|pa| pa.namespace == ROOT_NAMESPACE && !workload_policy(pa));
    let namespace = first(&|pa| pa.namespace == pod.namespace && !workload_policy(pa));
    let workload = first(&|pa| {
        pa.namespace == pod.namespace
            && pa.namespace != ROOT_NAMESPACE
            && pa
                .selector
                .as_ref()
                .is_some_and(|s| !s.is_empty() && selector_matches(s, &pod.labels))
    });
    [
        mesh.map(|pa| pa.mode),
        namespace.map(|pa| pa.mode),
        workload.map(|pa| pa.mode),
        workload.and_then(|pa| pa.port_levels.get(&port).copied()),
    ]
    .into_iter()
    .flatten()
    .rfind(|mode| *mode != PeerAuthnMode::Unset)
    .unwrap_or(PeerAuthnMode::Permissive)
}

fn scan_waypoint_pods<'a>(m: &'a Model, gw: &'a Gateway) -> Vec<&'a Pod> {
    m.pods
        .values()
        .filter(|p| {
            p.namespace == gw.namespace
                && p.ready
                && !p.host_network
                && p.labels.get(GATEWAY_NAME_LABEL) == Some(&gw.name)
        })
        .map(|p| &**p)
        .collect()
}

fn scan_workload_by_ip(m: &Model, ip: IpAddr) -> Option<&Pod> {
    let mut owner: Option<&Pod> = None;
    for pod in m
        .pods
        .values()
        .filter(|p| !p.host_network && p.ips.contains(&ip))
    {
        if owner.is_none_or(|current| pod.ready && !current.ready) {
            owner = Some(pod);
        }
    }
    owner
}

fn names<'a>(items: impl IntoIterator<Item = (&'a str, &'a str)>) -> Vec<String> {
    items
        .into_iter()
        .map(|(ns, n)| format!("{ns}/{n}"))
        .collect()
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn indexed_queries_answer_as_the_scans_do(m in model()) {
        for ns in NAMESPACES.iter().chain(&["nope"]) {
            prop_assert_eq!(m.namespace(ns), m.namespaces.get(*ns));
            for n in 0..12 {
                let name = format!("p{n}");
                let key = NamespacedName::new(*ns, &name);
                prop_assert_eq!(m.pod(ns, &name), m.pods.get(&key).map(|p| &**p));
                let key = NamespacedName::new(*ns, format!("s{n}"));
                prop_assert_eq!(m.service(&key), m.services.get(&key).map(|s| &**s));
            }
        }
        for pod in m.pods.values() {
            let pod: &Pod = pod;
            prop_assert_eq!(m.services_for_pod(pod), scan_services_for_pod(&m, pod));
            prop_assert_eq!(policies_for(&m, pod), scan_policies_for(&m, pod));
            for port in [8080, 9090] {
                prop_assert_eq!(peer_authn_mode(&m, pod, port), scan_peer_authn_mode(&m, pod, port));
            }
            for ip in &pod.ips {
                prop_assert_eq!(m.workload_by_ip(*ip), scan_workload_by_ip(&m, *ip));
            }
        }
        for svc in m.services.values() {
            for port in &svc.ports {
                prop_assert_eq!(m.endpoints(svc, port), scan_endpoints(&m, svc, port));
                // A Service that is not the model's own (here: another selector) is scanned.
                let other = Service { selector: Some(Labels::from([("app".into(), "x".into())])), ..(**svc).clone() };
                prop_assert_eq!(m.endpoints(&other, port), scan_endpoints(&m, &other, port));
            }
        }
        for gw in m.gateways.values() {
            prop_assert_eq!(m.waypoint_pods(gw).collect::<Vec<_>>(), scan_waypoint_pods(&m, gw));
            let services = m.services.keys().map(Some).chain([None]);
            for svc in services {
                let wp = gw.key();
                let got = policies_for_waypoint(&m, &wp, svc);
                let want: Vec<&AuthorizationPolicy> = m
                    .authorization_policies
                    .iter()
                    .filter(|p| attached(&p.namespace, &p.target_refs, &wp, svc))
                    .collect();
                prop_assert_eq!(got, want);
                let got = names(m.waypoint_request_authentications(&wp, crate::policy::l7::Destination::of_service(svc)).map(|r| (r.namespace.as_str(), r.name.as_str())));
                let want = names(
                    m.request_authentications
                        .iter()
                        .filter(|r| attached(&r.namespace, &r.target_refs, &wp, svc))
                        .map(|r| (r.namespace.as_str(), r.name.as_str())),
                );
                prop_assert_eq!(got, want);
            }
        }
    }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_virtual_services_bound_to_a_gateway_are_the_scans(
        virtual_services in proptest::collection::vec(virtual_service(), 0..12),
    ) {
        let m = Model::default().with_virtual_services(virtual_services);
        for ns in NAMESPACES {
            for name in ["ingress", "other", "none"] {
                let gw = NamespacedName::new(ns, name);
                let got: Vec<&VirtualService> = m.virtual_services_for_gateway(&gw).collect();
                let want: Vec<&VirtualService> = m
                    .virtual_services
                    .iter()
                    .filter(|vs| vs.gateways.contains(&gw))
                    .collect();
                prop_assert_eq!(got, want);
            }
        }
    }

    #[test]
    fn the_routes_naming_a_parent_are_the_scans(
        routes in proptest::collection::vec(http_route(), 0..12),
    ) {
        let m = Model::default().with_http_routes(routes);
        for kind in PARENT_KINDS {
            for ns in NAMESPACES {
                for name in PARENT_NAMES {
                    let key = NamespacedName::new(ns, name);
                    let got: Vec<_> = m.routes_naming(kind, ns, name).collect();
                    let want: Vec<_> = m
                        .http_routes
                        .iter()
                        .filter(|r| r.parents.iter().any(|p| p.kind == kind && p.target == key))
                        .collect();
                    prop_assert_eq!(got, want);
                }
            }
        }
    }

    #[test]
    fn the_mesh_virtual_service_for_a_host_is_the_scans(
        virtual_services in proptest::collection::vec(mesh_virtual_service(), 0..10),
        asked in proptest::collection::vec(0..DESTINATIONS.len(), 1..3),
    ) {
        let m = Model::default().with_virtual_services(virtual_services);
        let names: Vec<String> = asked.into_iter().map(|d| DESTINATIONS[d].to_string()).collect();
        // The scan as `route::virtual_service_naming` was written before the index.
        let host_matches = |host: &str, name: &str| match host.strip_prefix('*') {
            Some("") => true,
            Some(suffix) => name.ends_with(suffix),
            None => host == name,
        };
        let naming = |vs: &&VirtualService| {
            vs.mesh && vs.hosts.iter().any(|h| names.iter().any(|n| host_matches(h, n)))
        };
        let want = m.virtual_services.iter().find(naming);
        let got = m.mesh_virtual_services_for(&names).find(naming);
        prop_assert_eq!(got, want);
    }

    #[test]
    fn the_destination_rule_for_a_host_is_the_scans(
        rules in proptest::collection::vec(destination_rule(), 0..10),
    ) {
        let m = Model::default().with_destination_rules(rules);
        // The lookup as it was written before the index.
        let matches = |pattern: &str, host: &str| match pattern.strip_prefix('*') {
            Some(suffix) => host.to_ascii_lowercase().ends_with(&suffix.to_ascii_lowercase()),
            None => pattern.eq_ignore_ascii_case(host),
        };
        let scan = |client_ns: &str, host: &str, host_ns: &str| {
            for ns in [client_ns, host_ns, ROOT_NAMESPACE] {
                let in_ns = || m.destination_rules.iter().filter(move |d| d.namespace == ns);
                if let Some(dr) = in_ns().find(|d| d.host.eq_ignore_ascii_case(host)) {
                    return Some(dr);
                }
                if let Some(dr) = in_ns().find(|d| d.host.starts_with('*') && matches(&d.host, host)) {
                    return Some(dr);
                }
            }
            None
        };
        for client in NAMESPACES {
            for host_ns in NAMESPACES {
                for host in DR_ASKED {
                    prop_assert_eq!(
                        m.destination_rule_for_host(client, host, host_ns),
                        scan(client, host, host_ns)
                    );
                }
            }
        }
    }
}
