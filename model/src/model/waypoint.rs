//! Which waypoint a destination uses, and where that waypoint is. Pure queries over the
//! model, with Istio's semantics:
//!
//! - `istio.io/use-waypoint=<gateway>` on a Service (for traffic to its VIP) or a Pod (for
//!   traffic addressed to the pod's IP) wins over the same label on their namespace; the value
//!   `none` opts out (also when the namespace names a waypoint).
//!   `istio.io/use-waypoint-namespace` *on the same object* names the Gateway's namespace
//!   (default: the object's own namespace).
//! - The most specific label decides alone: when the Gateway it names does not exist, is not
//!   of class `istio-waypoint`, or is not for this kind of traffic (`istio.io/waypoint-for`:
//!   `service` (default) and `all` take Service traffic, `workload` and `all` take traffic to
//!   pods, `none` takes nothing), the destination uses no waypoint. istiod binds the same way.
//!   One difference, to fail closed: a Service whose label names a Gateway the model does not
//!   have as a waypoint (none by that name, or not of class `istio-waypoint`: a typo, a
//!   deleted or not yet created waypoint) is [`Model::missing_waypoint_for_service`], and
//!   the node agent refuses traffic to its VIP (`UH`, naming the Gateway) rather than send it
//!   around the waypoint and its L7 policy (RELIABILITY 18). Traffic to pod IPs is not held:
//!   a missing Gateway's `waypoint-for` is unknown and by default it takes none.
//! - A waypoint's address, in local mode (no control plane to allocate one): the first IP of
//!   the Gateway's `status.addresses` (else `spec.addresses`), else the IP of the first ready
//!   pod (by name) in the Gateway's namespace labelled
//!   `gateway.networking.k8s.io/gateway-name=<gateway>`, which is the label Istio puts on the
//!   waypoint Deployment's pods.
//! - A waypoint's identity is its pod's (service account); without a pod, Istio's default:
//!   service account `<gateway>` in the Gateway's namespace.

use std::net::IpAddr;

use serde::Serialize;

use super::{Gateway, Labels, Model, NamespacedName, Pod, Service, ServiceEntry};
use crate::identity::Identity;

/// Names the waypoint a namespace, Service or Pod uses (`none` opts out).
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// The namespace of the waypoint named by [`USE_WAYPOINT_LABEL`] on the same object.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// On a waypoint Gateway: which traffic it takes (`service`, `workload`, `all`, `none`).
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// On a waypoint's pods: the Gateway they implement.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The `GatewayClass` of waypoints.
pub const WAYPOINT_GATEWAY_CLASS: &str = "istio-waypoint";

const NONE: &str = "none";

/// `istio.io/waypoint-for`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub enum WaypointFor {
    #[default]
    Service,
    Workload,
    All,
    None,
}

impl WaypointFor {
    /// The label value as Istio spells it; `None` for anything else.
    pub fn parse(value: &str) -> Option<WaypointFor> {
        match value {
            "service" => Some(WaypointFor::Service),
            "workload" => Some(WaypointFor::Workload),
            "all" => Some(WaypointFor::All),
            "none" => Some(WaypointFor::None),
            _ => None,
        }
    }

    fn takes_services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }

    fn takes_workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }
}

/// Where a waypoint can be reached.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WaypointAddress<'a> {
    pub ip: IpAddr,
    /// The waypoint's pod, when the address belongs to one the model knows.
    pub pod: Option<&'a Pod>,
}

/// A destination's waypoint, resolved for a proxy that must send traffic to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WaypointTarget<'a> {
    pub gateway: &'a Gateway,
    /// `None`: the waypoint has no address yet (no ready pod): traffic cannot be steered and
    /// must fail rather than bypass it.
    pub address: Option<WaypointAddress<'a>>,
    /// Namespace and service account of the waypoint's identity; build it in the proxy's
    /// trust domain with [`WaypointTarget::identity`].
    pub service_account: NamespacedName,
}

/// The waypoint (Gateway namespace and name) named by the most specific of an object's
/// labels and its namespace's labels; `None` when neither names one or the most specific says
/// `none`. Pure: the Gateway need not exist.
pub fn use_waypoint(
    own_labels: &Labels,
    own_namespace: &str,
    namespace_labels: Option<&Labels>,
) -> Option<NamespacedName> {
    let named = |labels: &Labels, default_ns: &str| -> Option<Option<NamespacedName>> {
        let name = labels.get(USE_WAYPOINT_LABEL)?;
        if name.is_empty() || name == NONE {
            return Some(None);
        }
        let ns = labels
            .get(USE_WAYPOINT_NAMESPACE_LABEL)
            .filter(|ns| !ns.is_empty())
            .map_or(default_ns, String::as_str);
        Some(Some(NamespacedName::new(ns, name)))
    };
    if let Some(decided) = named(own_labels, own_namespace) {
        return decided;
    }
    named(namespace_labels?, own_namespace).flatten()
}

// === impl Model ===

impl Model {
    /// The waypoint traffic to `svc`'s VIP goes through, if any (see the module docs).
    pub fn waypoint_for_service(&self, svc: &Service) -> Option<WaypointTarget<'_>> {
        self.service_waypoint(&svc.labels, &svc.namespace)
    }

    /// The waypoint a service-like destination with `labels` in `namespace` uses (its
    /// labels, else its namespace's), when the model has it and it takes service traffic.
    fn service_waypoint(&self, labels: &Labels, namespace: &str) -> Option<WaypointTarget<'_>> {
        let ns_labels = self.namespace(namespace).map(|ns| &ns.labels);
        let key = use_waypoint(labels, namespace, ns_labels)?;
        let gw = self
            .gateways
            .get(&key)
            .filter(|g| g.is_waypoint() && g.waypoint_for.takes_services())?;
        Some(self.waypoint_target(gw))
    }

    /// The waypoint `labels` (or `namespace`'s) name when the model has no waypoint Gateway
    /// by that name.
    fn missing_waypoint(&self, labels: &Labels, namespace: &str) -> Option<NamespacedName> {
        let ns_labels = self.namespace(namespace).map(|ns| &ns.labels);
        let key = use_waypoint(labels, namespace, ns_labels)?;
        let known = self.gateways.get(&key).is_some_and(|g| g.is_waypoint());
        (!known).then_some(key)
    }

    /// The waypoint `svc`'s labels (or its namespace's) name when the model has no waypoint
    /// Gateway by that name: its VIP fails closed (see the module docs).
    pub fn missing_waypoint_for_service(&self, svc: &Service) -> Option<NamespacedName> {
        self.missing_waypoint(&svc.labels, &svc.namespace)
    }

    /// The waypoint traffic to `se`'s addresses goes through, if any (its labels, else its
    /// namespace's, as for a Service).
    pub fn waypoint_for_service_entry(&self, se: &ServiceEntry) -> Option<WaypointTarget<'_>> {
        self.service_waypoint(&se.labels, &se.namespace)
    }

    /// The waypoint `se` names when the model has no waypoint Gateway by that name: its
    /// addresses fail closed, as a Service's VIP does.
    pub fn missing_waypoint_for_service_entry(&self, se: &ServiceEntry) -> Option<NamespacedName> {
        self.missing_waypoint(&se.labels, &se.namespace)
    }

    /// The waypoint traffic addressed to `pod`'s own IP goes through, if any.
    pub fn waypoint_for_workload(&self, pod: &Pod) -> Option<WaypointTarget<'_>> {
        let ns_labels = self.namespace(&pod.namespace).map(|ns| &ns.labels);
        let key = use_waypoint(&pod.labels, &pod.namespace, ns_labels)?;
        let gw = self
            .gateways
            .get(&key)
            .filter(|g| g.is_waypoint() && g.waypoint_for.takes_workloads())?;
        // A waypoint never sends its own traffic to itself.
        if pod.labels.get(GATEWAY_NAME_LABEL) == Some(&gw.name) && pod.namespace == gw.namespace {
            return None;
        }
        Some(self.waypoint_target(gw))
    }

    /// Address and identity of the waypoint `gw`.
    pub fn waypoint_target<'a>(&'a self, gw: &'a Gateway) -> WaypointTarget<'a> {
        let address = match gw.addresses.first() {
            Some(ip) => Some(WaypointAddress {
                ip: *ip,
                pod: self.workload_by_ip(*ip),
            }),
            None => self.waypoint_pods(gw).find_map(|pod| {
                Some(WaypointAddress {
                    ip: *pod.ips.first()?,
                    pod: Some(pod),
                })
            }),
        };
        let service_account = match address.and_then(|a| a.pod) {
            Some(pod) => NamespacedName::new(&pod.namespace, &pod.service_account),
            None => NamespacedName::new(&gw.namespace, &gw.name),
        };
        WaypointTarget {
            gateway: gw,
            address,
            service_account,
        }
    }

    /// Ready pods implementing `gw`, in name order.
    pub fn waypoint_pods<'a>(&'a self, gw: &'a Gateway) -> impl Iterator<Item = &'a Pod> + 'a {
        self.index
            .namespaces
            .get(&gw.namespace)
            .and_then(|ns| ns.gateway_pods.get(&gw.name))
            .map_or(&[][..], Vec::as_slice)
            .iter()
            .map(|p| &**p)
    }

    /// Whether `pod` implements a waypoint Gateway of the model.
    pub fn is_waypoint_pod(&self, pod: &Pod) -> bool {
        pod.labels.get(GATEWAY_NAME_LABEL).is_some_and(|name| {
            self.gateways
                .get(&NamespacedName::new(&pod.namespace, name))
                .is_some_and(Gateway::is_waypoint)
        })
    }
}

impl WaypointTarget<'_> {
    /// The waypoint's identity in `trust_domain`.
    pub fn identity(&self, trust_domain: &str) -> Identity {
        Identity::new(
            trust_domain,
            &self.service_account.namespace,
            &self.service_account.name,
        )
    }
}

#[cfg(test)]
mod tests {
    //! Waypoint selection as a table: labels on namespace / service / pod → the waypoint.

    use super::*;
    use crate::k8s::load_docs;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// `use_waypoint` on (object labels, namespace labels) in namespace `app`.
    fn check(case: &str, own: &[(&str, &str)], ns: Option<&[(&str, &str)]>, want: Option<&str>) {
        let ns = ns.map(labels);
        let got = use_waypoint(&labels(own), "app", ns.as_ref()).map(|k| k.to_string());
        assert_eq!(got.as_deref(), want, "{case}");
    }

    const USE: &str = USE_WAYPOINT_LABEL;
    const USE_NS: &str = USE_WAYPOINT_NAMESPACE_LABEL;

    #[test]
    fn the_most_specific_label_wins() {
        check("nothing", &[], None, None);
        check("nothing, namespace unknown", &[], Some(&[]), None);
        check("namespace", &[], Some(&[(USE, "wp")]), Some("app/wp"));
        check("object", &[(USE, "wp")], None, Some("app/wp"));
        check(
            "object over namespace",
            &[(USE, "mine")],
            Some(&[(USE, "ns-wide")]),
            Some("app/mine"),
        );
        check(
            "object opts out",
            &[(USE, "none")],
            Some(&[(USE, "ns-wide")]),
            None,
        );
        check("namespace opts out", &[], Some(&[(USE, "none")]), None);
        check(
            "empty value opts out",
            &[(USE, "")],
            Some(&[(USE, "wp")]),
            None,
        );
        check(
            "waypoint in another namespace",
            &[(USE, "wp"), (USE_NS, "infra")],
            None,
            Some("infra/wp"),
        );
        check(
            "the namespace label goes with the label on the same object",
            &[(USE, "wp")],
            Some(&[(USE, "other"), (USE_NS, "infra")]),
            Some("app/wp"),
        );
        check(
            "namespace label with its own namespace",
            &[],
            Some(&[(USE, "wp"), (USE_NS, "infra")]),
            Some("infra/wp"),
        );
        check(
            "use-waypoint-namespace alone names nothing",
            &[(USE_NS, "infra")],
            None,
            None,
        );
    }

    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: app, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: ns-wp}}
---
apiVersion: v1
kind: Namespace
metadata: {name: infra, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ns-wp, namespace: app}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: all-wp, namespace: infra, labels: {istio.io/waypoint-for: all}}
spec: {gatewayClassName: istio-waypoint}
status: {addresses: [{type: IPAddress, value: 10.0.9.9}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: wl-wp, namespace: app, labels: {istio.io/waypoint-for: workload}}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: app}
spec: {gatewayClassName: istio, listeners: [{name: http, port: 80, protocol: HTTP}]}
---
apiVersion: v1
kind: Pod
metadata: {name: ns-wp-1, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: ns-wp}}
spec: {serviceAccountName: ns-wp-sa}
status: {podIP: 10.0.0.50}
---
apiVersion: v1
kind: Pod
metadata: {name: ns-wp-0, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: ns-wp}}
spec: {serviceAccountName: ns-wp-sa}
status: {podIP: 10.0.0.49, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: app, labels: {app: web}}
status: {podIP: 10.0.0.1}
---
apiVersion: v1
kind: Pod
metadata: {name: web-wl, namespace: app, labels: {app: web, istio.io/use-waypoint: wl-wp}}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-all
  namespace: app
  labels: {istio.io/use-waypoint: all-wp, istio.io/use-waypoint-namespace: infra}
status: {podIP: 10.0.0.3}
---
apiVersion: v1
kind: Service
metadata: {name: plain, namespace: app}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{name: http, port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: opted-out, namespace: app, labels: {istio.io/use-waypoint: none}}
spec: {clusterIP: 10.96.0.2, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: to-workload-wp, namespace: app, labels: {istio.io/use-waypoint: wl-wp}}
spec: {clusterIP: 10.96.0.3, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata:
  name: cross-ns
  namespace: app
  labels: {istio.io/use-waypoint: all-wp, istio.io/use-waypoint-namespace: infra}
spec: {clusterIP: 10.96.0.4, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: missing, namespace: app, labels: {istio.io/use-waypoint: nope}}
spec: {clusterIP: 10.96.0.5, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: not-a-waypoint, namespace: app, labels: {istio.io/use-waypoint: ingress}}
spec: {clusterIP: 10.96.0.6, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: elsewhere, namespace: infra}
spec: {clusterIP: 10.96.1.1, ports: [{port: 80}]}
"#;

    fn model() -> Model {
        load_docs(&[("mesh.yaml".to_string(), MESH.to_string())]).expect("valid mesh")
    }

    /// (waypoint key, address, identity principal) of a target, for compact assertions.
    fn summary(t: Option<WaypointTarget<'_>>) -> Option<(String, Option<String>, String)> {
        t.map(|t| {
            (
                t.gateway.key().to_string(),
                t.address.map(|a| a.ip.to_string()),
                t.identity("cluster.local").principal(),
            )
        })
    }

    fn s(key: &str, ip: Option<&str>, principal: &str) -> Option<(String, Option<String>, String)> {
        Some((key.into(), ip.map(str::to_string), principal.into()))
    }

    #[test]
    fn services_use_the_waypoint_their_labels_name_when_it_takes_service_traffic() {
        let m = model();
        let svc = |name: &str| {
            let (ns, name) = name.split_once('/').expect("ns/name");
            &*m.services[&NamespacedName::new(ns, name)]
        };
        let ns_wp = s(
            "app/ns-wp",
            Some("10.0.0.50"),
            "cluster.local/ns/app/sa/ns-wp-sa",
        );
        for (service, want) in [
            // Namespace label; the address is the ready waypoint pod's, the identity its SA.
            ("app/plain", ns_wp),
            ("app/opted-out", None),
            // The most specific label decides alone: a workload-only waypoint takes no
            // service traffic, and the namespace's waypoint is not used instead.
            ("app/to-workload-wp", None),
            // Address from the Gateway's status; no pod: identity `<gateway>` SA.
            (
                "app/cross-ns",
                s(
                    "infra/all-wp",
                    Some("10.0.9.9"),
                    "cluster.local/ns/infra/sa/all-wp",
                ),
            ),
            ("app/missing", None),
            ("app/not-a-waypoint", None),
            ("infra/elsewhere", None),
        ] {
            assert_eq!(
                summary(m.waypoint_for_service(svc(service))),
                want,
                "{service}"
            );
        }
        // Named but not a known waypoint: held closed. Opted out, unlabelled or steered
        // elsewhere by the labels' own rules: not.
        for (service, missing) in [
            ("app/missing", Some("app/nope")),
            ("app/not-a-waypoint", Some("app/ingress")),
            ("app/plain", None),
            ("app/opted-out", None),
            ("app/to-workload-wp", None),
            ("app/cross-ns", None),
            ("infra/elsewhere", None),
        ] {
            assert_eq!(
                m.missing_waypoint_for_service(svc(service))
                    .map(|k| k.to_string()),
                missing.map(str::to_string),
                "{service}"
            );
        }
    }

    #[test]
    fn pods_use_a_waypoint_only_when_it_takes_workload_traffic() {
        let m = model();
        for (pod, want) in [
            // The namespace's waypoint is `service`-only.
            ("web", None),
            (
                "web-wl",
                s("app/wl-wp", None, "cluster.local/ns/app/sa/wl-wp"),
            ),
            (
                "web-all",
                s(
                    "infra/all-wp",
                    Some("10.0.9.9"),
                    "cluster.local/ns/infra/sa/all-wp",
                ),
            ),
        ] {
            let p = m.pod("app", pod).expect("pod");
            assert_eq!(summary(m.waypoint_for_workload(p)), want, "{pod}");
        }
    }

    #[test]
    fn waypoint_pods_are_not_captured() {
        let m = model();
        let wp = m.pod("app", "ns-wp-1").expect("pod");
        assert!(m.is_waypoint_pod(wp));
        assert!(!m.is_ambient(wp), "a waypoint terminates HBONE itself");
        let web = m.pod("app", "web").expect("pod");
        assert!(!m.is_waypoint_pod(web));
        assert!(m.is_ambient(web));
    }

    #[test]
    fn identities_follow_the_proxy_trust_domain() {
        let m = model();
        let svc = &*m.services[&NamespacedName::new("app", "plain")];
        let t = m.waypoint_for_service(svc).expect("waypoint");
        assert_eq!(
            t.identity("example.org").uri(),
            "spiffe://example.org/ns/app/sa/ns-wp-sa"
        );
    }
}
