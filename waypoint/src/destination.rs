//! What a CONNECT to this waypoint asks for: the engine's [`Target`], if this waypoint
//! serves it. Pure over the model, table-tested.
//!
//! The `:authority` is a Service VIP:port (service traffic), a ServiceEntry address and
//! port (egress through the waypoint) or a pod IP:port (workload traffic). The waypoint serves it only when the model says that destination uses *this*
//! waypoint: anything else is refused, so the waypoint is never an open relay.

use std::net::SocketAddr;

pub use mesh_l7::target::Target;
use mesh_model::model::{Model, NamespacedName};

/// Why a CONNECT is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NotServed {
    #[error("{0} is not a service port or workload of the mesh")]
    Unknown(SocketAddr),
    #[error("{addr} ({what}) does not use waypoint {waypoint}")]
    OtherWaypoint {
        addr: SocketAddr,
        what: String,
        waypoint: NamespacedName,
    },
}

/// The destination `authority` names, if `waypoint` serves it.
pub fn resolve(
    model: &Model,
    waypoint: &NamespacedName,
    authority: SocketAddr,
) -> Result<Target, NotServed> {
    let ours = |gw: Option<NamespacedName>| gw.as_ref() == Some(waypoint);
    if let Some((svc, port)) = model.service_by_vip(authority.ip(), authority.port()) {
        let key = NamespacedName::new(&svc.namespace, &svc.name);
        if !ours(model.waypoint_for_service(svc).map(|t| t.gateway.key())) {
            return Err(NotServed::OtherWaypoint {
                addr: authority,
                what: format!("service {key}"),
                waypoint: waypoint.clone(),
            });
        }
        return Ok(Target::Service {
            svc: key,
            port: port.port,
        });
    }
    // ServiceEntries as the waypoint's own namespace sees them (`exportTo`).
    if let Some((se, port)) = model.service_entry_for(&waypoint.namespace, authority) {
        let key = NamespacedName::new(&se.namespace, &se.name);
        if !ours(
            model
                .waypoint_for_service_entry(se)
                .map(|t| t.gateway.key()),
        ) {
            return Err(NotServed::OtherWaypoint {
                addr: authority,
                what: format!("ServiceEntry {key}"),
                waypoint: waypoint.clone(),
            });
        }
        return Ok(Target::ServiceEntry {
            entry: key,
            port: port.number,
            addr: authority,
        });
    }
    if let Some(pod) = model.workload_by_ip(authority.ip()) {
        let key = NamespacedName::new(&pod.namespace, &pod.name);
        if !ours(model.waypoint_for_workload(pod).map(|t| t.gateway.key())) {
            return Err(NotServed::OtherWaypoint {
                addr: authority,
                what: format!("pod {key}"),
                waypoint: waypoint.clone(),
            });
        }
        return Ok(Target::Workload {
            pod: key,
            port: authority.port(),
        });
    }
    Err(NotServed::Unknown(authority))
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
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: other, namespace: app}
spec: {gatewayClassName: istio-waypoint}
---
apiVersion: v1
kind: Pod
metadata: {name: wp-pod, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: wp}}
spec: {serviceAccountName: wp}
status: {podIP: 10.0.0.100}
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
---
apiVersion: v1
kind: Service
metadata: {name: elsewhere, namespace: app, labels: {istio.io/use-waypoint: other}}
spec: {clusterIP: 10.96.0.2, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: direct, namespace: app}
spec: {clusterIP: 10.96.0.3, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: egress, namespace: app, labels: {istio.io/use-waypoint: wp}}
spec:
  hosts: [api.example.com]
  addresses: [240.0.0.1]
  ports: [{number: 443, name: tls, protocol: TLS}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: unwaypointed, namespace: app}
spec:
  hosts: [other.example.com]
  addresses: [240.0.0.2]
  ports: [{number: 80, name: http}]
"#;

    fn model() -> Model {
        load_docs(&[("mesh.yaml".to_string(), MESH.to_string())]).expect("valid mesh")
    }

    fn check(authority: &str, want: Result<&str, &str>) {
        let m = model();
        let wp = NamespacedName::new("app", "wp");
        let addr: SocketAddr = authority.parse().expect("addr");
        let got = match resolve(&m, &wp, addr) {
            Ok(Target::Service { svc, port }) => Ok(format!("service {svc}:{port}")),
            Ok(Target::Workload { pod, port }) => Ok(format!("pod {pod}:{port}")),
            Ok(Target::ServiceEntry { entry, port, addr }) => {
                Ok(format!("entry {entry}:{port} at {addr}"))
            }
            Ok(other) => Ok(format!("{other:?}")),
            Err(e) => Err(e.to_string()),
        };
        match (&got, want) {
            (Ok(g), Ok(w)) => assert_eq!(g, w, "{authority}"),
            (Err(g), Err(w)) => assert!(g.contains(w), "{authority}: {g:?} lacks {w:?}"),
            _ => panic!("{authority}: got {got:?}, want {want:?}"),
        }
    }

    #[test]
    fn only_destinations_that_use_this_waypoint_are_served() {
        check("10.96.0.1:80", Ok("service app/web:80"));
        check("10.96.0.1:9000", Ok("service app/web:9000"));
        check("10.96.0.1:81", Err("not a service port or workload"));
        check(
            "10.96.0.2:80",
            Err("service app/elsewhere) does not use waypoint app/wp"),
        );
        check("10.96.0.3:80", Err("does not use waypoint"));
        check("10.0.0.1:8080", Ok("pod app/web-1:8080"));
        check("10.0.0.2:8080", Err("pod app/web-2) does not use waypoint"));
        check("10.0.0.100:15008", Err("does not use waypoint"));
        check("192.168.1.1:80", Err("not a service port or workload"));
        check("240.0.0.1:443", Ok("entry app/egress:443 at 240.0.0.1:443"));
        check(
            "240.0.0.2:80",
            Err("(ServiceEntry app/unwaypointed) does not use waypoint"),
        );
        check("240.0.0.1:80", Err("not a service port or workload"));
    }
}
