//! Phase 6, select: the backend's ready endpoints in the current model and the cluster
//! (Service, port, subset) they form, with its DestinationRule policy
//! ([`mesh_model::model::effective_policy`]). A backend gone from the model → `500 NC`; an
//! unknown subset → `503 NC`; no endpoint (or none in the subset) → `503 UH`; then the
//! consistent-hash key of the request and one of the cluster's `http2MaxRequests` slots
//! (else `503 UO`), and the `tls` the proxy originates to the endpoints. The mirrors of the
//! rule are resolved in the same model.
//!
//! From an ingress listener, a Service that uses a waypoint is one endpoint, its VIP through
//! the waypoint ([`Endpoint::through_waypoint`]); a subset of it keeps its policy but selects
//! no pods (they are the waypoint's routes' to choose), so the request goes to the waypoint,
//! as Istio's ingress sends it.

use std::sync::Arc;

use mesh_model::model::{effective_policy, ClientTls, Model};
use mesh_model::route::NormalizedPath;

use super::route::RoutePlan;
use super::{LocalReply, RequestContext, Scope};
use crate::balance::{
    hash_key, new_cookie_value, Cluster, ClusterKey, Clusters, HashInput, RequestGuard,
};
use crate::mirror::{self, MirrorTarget};
use crate::protocol::Declared;
use crate::proxy::{upstream_proto, ConnCtx};
use crate::target::{Resolved, Target, Unselectable};
use crate::telemetry::ResponseFlag;
use crate::upstream::{Endpoint, UpstreamProto};

/// Where the request may go: what the attempts need.
pub struct Selection {
    pub cluster: Arc<Cluster>,
    /// The cluster's ready endpoints (never empty).
    pub eps: Vec<Endpoint>,
    pub proto: UpstreamProto,
    /// The backend Service's hostname (TLS server name of its endpoints).
    pub host: Option<String>,
    /// The DestinationRule `tls` the proxy originates to the endpoints (`SIMPLE`,
    /// `MUTUAL`), if any (boxed: the selection lives in every request's future, see
    /// `http_sizes.rs`).
    pub tls: Option<Box<ClientTls>>,
    pub hash: HashInput,
    /// The request's `http2MaxRequests` slot, held until its response ends.
    pub slot: RequestGuard,
    /// The rule's mirrors in the same model, with their percentages.
    pub mirrors: Vec<(Result<MirrorTarget, String>, f64)>,
}

/// The endpoint an ingress gateway reaches `svc`'s `port` by when the Service uses a
/// waypoint: its first VIP through the waypoint; `None` when it uses none (or has no VIP:
/// headless, its pods directly). A waypoint without an address, or one the Service names
/// that the model lacks, fails closed (`503 UH`) rather than skip the waypoint's policy.
fn via_waypoint(
    model: &Model,
    trust_domain: &str,
    svc: &mesh_model::model::Service,
    port: u16,
) -> Result<Option<Endpoint>, LocalReply> {
    let unavailable =
        |reason: String| LocalReply::unavailable(ResponseFlag::NoHealthyUpstream, reason);
    let Some(wp) = model.waypoint_for_service(svc) else {
        return match model.missing_waypoint_for_service(svc) {
            Some(name) => Err(unavailable(format!(
                "{} uses waypoint {name}, which is not in the model",
                svc.hostname()
            ))),
            None => Ok(None),
        };
    };
    let Some(vip) = svc.cluster_ips.first() else {
        return Ok(None);
    };
    let Some(addr) = wp.address else {
        return Err(unavailable(format!(
            "waypoint {} of {} has no address",
            wp.gateway.key(),
            svc.hostname()
        )));
    };
    Ok(Some(Endpoint::through_waypoint(
        std::net::SocketAddr::new(*vip, port),
        addr.ip,
        wp.identity(trust_domain),
    )))
}

/// The phase: the cluster of `plan.backend` (`resolved`: the tunnel's own target in `model`,
/// used when the route kept it).
#[allow(clippy::too_many_arguments)]
pub fn run(
    model: &Model,
    scope: Scope<'_>,
    clusters: &Clusters,
    ctx: &ConnCtx,
    rq: &mut RequestContext,
    resolved: Option<Resolved<'_>>,
    plan: &RoutePlan,
    normalized: &NormalizedPath,
) -> Result<Selection, LocalReply> {
    let routed = plan.backend != ctx.target;
    let (resolved, proto) = if routed {
        let r = plan
            .backend
            .lookup_with(model, scope.trust_domain, &ctx.hosts);
        // A Service port declares by its name or appProtocol, a ServiceEntry port by its
        // protocol.
        let declared = match r.as_ref().and_then(|r| r.port) {
            Some(port) => Declared::of(port),
            None => plan.backend.declared(model),
        };
        match &r {
            Some(r) => rq.labels.service = r.service.cloned(),
            None => {
                return Err(LocalReply::no_backend(format!(
                    "backend {} is not in the model",
                    rq.log.backend.as_deref().unwrap_or("-")
                )))
            }
        }
        (r, upstream_proto(declared, rq.downstream_h2))
    } else {
        (resolved, ctx.upstream_proto(rq.downstream_h2))
    };
    // An upgrade needs HTTP/1.1 upstream.
    let proto = if rq.upgrade.is_some() {
        UpstreamProto::Http1
    } else {
        proto
    };
    let Some(resolved) = resolved else {
        return Err(LocalReply::unavailable(
            ResponseFlag::NoHealthyUpstream,
            format!("no ready endpoint for {}: not in the model", ctx.authority),
        ));
    };
    let host = resolved.host();
    let cluster_port = match (resolved.port, resolved.entry) {
        (Some(p), _) => p.port,
        (None, Some(t)) => t.port,
        (None, None) => ctx.authority.port(),
    };
    // From an ingress listener, a Service that uses a waypoint is reached through it (its
    // policy and routes apply there): one endpoint, the Service's VIP behind the waypoint.
    let through_waypoint = match (&ctx.target, resolved.service) {
        (Target::Listener { .. }, Some(svc)) => {
            via_waypoint(model, scope.trust_domain, svc, cluster_port)?.map(|ep| (svc, ep))
        }
        _ => None,
    };
    let subset = plan.subset.as_deref();
    let selected = match through_waypoint {
        // A subset's labels cannot pick pods behind the waypoint (its own routes choose
        // them): the subset still has to exist and its policy applies, to that one
        // endpoint, as at Istio's ingress. The gateway says so once per config
        // (`Model::subsets_through_waypoints`), not per request.
        Some((svc, ep)) => {
            if let Some(s) = subset {
                tracing::debug!(
                    request_id = %rq.log.request_id,
                    subset = s,
                    service = %svc.hostname(),
                    "subset not applied here: the Service's waypoint routes to its pods"
                );
            }
            effective_policy(model, &scope.gateway.namespace, svc, cluster_port, subset)
                .map(|policy| (policy, vec![ep]))
                .map_err(Unselectable::from)
        }
        None => resolved.cluster(model, &scope.gateway.namespace, subset),
    };
    let (policy, eps) = match selected {
        Ok(selected) => selected,
        Err(Unselectable::NoCluster(e)) => {
            return Err(LocalReply::unavailable(
                ResponseFlag::NoCluster,
                e.to_string(),
            ))
        }
        Err(Unselectable::NoEndpoint) => {
            let what = match (&rq.log.backend, subset) {
                (Some(b), Some(s)) => format!("backend {b} subset {s}"),
                (Some(b), None) => format!("backend {b}"),
                (None, _) => ctx.authority.to_string(),
            };
            return Err(LocalReply::unavailable(
                ResponseFlag::NoHealthyUpstream,
                format!("no ready endpoint for {what}"),
            ));
        }
    };
    let mirrors = mirror::targets(
        model,
        scope.trust_domain,
        &scope.gateway.namespace,
        &plan.mirrors,
        plan.service_port,
    );
    let cluster = clusters.cluster(
        &ClusterKey {
            service: plan.backend.rr_key(),
            port: cluster_port,
            subset: plan.subset.clone(),
        },
        &policy,
    );
    let hash = hash_key(
        &policy.load_balancer,
        &rq.parts.headers,
        normalized.query.as_deref(),
        ctx.peer.ip(),
        new_cookie_value,
    );
    let slot = match cluster.admit() {
        Ok(slot) => slot,
        Err(e) => {
            tracing::info!(request_id = %rq.log.request_id, error = %e, "connection pool overflow");
            return Err(LocalReply::overflow(e.to_string()));
        }
    };
    Ok(Selection {
        tls: policy.origination().cloned().map(Box::new),
        cluster,
        eps,
        proto,
        host,
        hash,
        slot,
        mirrors,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{IpAddr, SocketAddr};

    use crate::engine::testing::{conn, model, request_context, waypoint};
    use crate::target::Target;
    use mesh_model::identity::Identity;
    use mesh_model::model::NamespacedName;
    use mesh_model::route::normalize_path;

    const RULE: &str = r#"
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: app}
spec:
  host: web
  trafficPolicy: {connectionPool: {http: {http2MaxRequests: 1}}}
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v9, labels: {version: v9}}
"#;

    fn plan(backend: &str, subset: Option<&str>) -> RoutePlan {
        RoutePlan {
            backend: Target::Service {
                svc: NamespacedName::new("app", backend),
                port: 80,
            },
            subset: subset.map(str::to_string),
            service_port: 80,
            path: "/".to_string(),
            authority: "web.app".to_string(),
            response_mods: Vec::new(),
            timeouts: Default::default(),
            retry_policy: Default::default(),
            fault: None,
            mirrors: Vec::new(),
        }
    }

    fn select(
        m: &Model,
        clusters: &Clusters,
        plan: &RoutePlan,
    ) -> (RequestContext, Result<Selection, LocalReply>) {
        let ctx = conn();
        let mut rq = request_context(false);
        let gateway = waypoint();
        let scope = Scope {
            gateway: &gateway,
            trust_domain: "cluster.local",
        };
        let resolved = ctx.target.lookup(m, scope.trust_domain);
        let path = normalize_path("/").expect("path");
        let got = run(m, scope, clusters, &ctx, &mut rq, resolved, plan, &path);
        (rq, got)
    }

    fn failure(got: Result<Selection, LocalReply>) -> (u16, Option<ResponseFlag>) {
        match got {
            Ok(_) => panic!("selected"),
            Err(r) => (r.status.as_u16(), r.flag),
        }
    }

    #[test]
    fn the_subset_gives_the_endpoints_and_an_unknown_or_empty_one_fails() {
        let m = model(&[RULE]);
        let clusters = Clusters::default();
        let (_, got) = select(&m, &clusters, &plan("web", Some("v1")));
        let s = got.map_err(|r| r.reason).expect("selected");
        let names: Vec<String> = s.eps.iter().map(|e| e.name()).collect();
        assert_eq!(names, ["web-1"]);
        assert_eq!(s.proto, UpstreamProto::Http1);
        assert_eq!(s.host.as_deref(), Some("web.app.svc.cluster.local"));
        drop(s);
        let (_, got) = select(&m, &clusters, &plan("web", Some("v2")));
        assert_eq!(failure(got), (503, Some(ResponseFlag::NoCluster)));
        let (_, got) = select(&m, &clusters, &plan("web", Some("v9")));
        assert_eq!(failure(got), (503, Some(ResponseFlag::NoHealthyUpstream)));
    }

    #[test]
    fn a_routed_backend_labels_the_request_or_is_no_cluster_when_missing() {
        let m = model(&[]);
        let clusters = Clusters::default();
        let (rq, got) = select(&m, &clusters, &plan("api", None));
        assert!(got.is_ok());
        assert_eq!(
            rq.labels.service.map(|s| s.name.clone()),
            Some("api".to_string())
        );
        let (_, got) = select(&m, &clusters, &plan("gone", None));
        assert_eq!(failure(got), (500, Some(ResponseFlag::NoCluster)));
    }

    #[test]
    fn http2_max_requests_bounds_the_requests_in_flight() {
        let m = model(&[RULE]);
        let clusters = Clusters::default();
        let (_, first) = select(&m, &clusters, &plan("web", None));
        let first = first.map_err(|r| r.reason).expect("one slot");
        let (_, second) = select(&m, &clusters, &plan("web", None));
        assert_eq!(failure(second), (503, Some(ResponseFlag::UpstreamOverflow)));
        drop(first);
        let (_, third) = select(&m, &clusters, &plan("web", None));
        assert!(third.is_ok(), "the slot is free again");
    }

    /// An ingress Gateway `edge/ingress` whose HTTP listener takes routes from every
    /// namespace.
    const INGRESS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: edge}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: ingress, namespace: edge}
spec:
  gatewayClassName: istio
  listeners: [{name: http, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: All}}}]
"#;

    /// A ready pod of the waypoint `app/wp` (its address: 10.0.0.50).
    const WP_POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: wp-1, namespace: app, labels: {gateway.networking.k8s.io/gateway-name: wp}}\nspec: {serviceAccountName: wp}\nstatus: {podIP: 10.0.0.50}\n";

    /// The select phase for `plan` as the ingress `edge/ingress` runs it on its port 80.
    fn from_ingress(
        m: &Model,
        clusters: &Clusters,
        plan: &RoutePlan,
    ) -> Result<Selection, LocalReply> {
        let mut ctx = conn();
        ctx.peer_identity = None;
        ctx.target = Target::Listener {
            gateway: NamespacedName::new("edge", "ingress"),
            port: 80,
        };
        let mut rq = request_context(false);
        let gateway = NamespacedName::new("edge", "ingress");
        let scope = Scope {
            gateway: &gateway,
            trust_domain: "cluster.local",
        };
        let resolved = ctx.target.lookup(m, scope.trust_domain);
        let path = normalize_path("/").expect("path");
        run(m, scope, clusters, &ctx, &mut rq, resolved, plan, &path)
    }

    /// `(address, via, identity)` of each endpoint selected.
    fn endpoints(sel: &Selection) -> Vec<(SocketAddr, Option<IpAddr>, Option<Identity>)> {
        sel.eps
            .iter()
            .map(|e| (e.addr, e.via, e.identity.clone()))
            .collect()
    }

    /// `app/web`'s VIP through the waypoint `app/wp`.
    fn web_through_waypoint() -> (SocketAddr, Option<IpAddr>, Option<Identity>) {
        (
            SocketAddr::from(([10, 96, 0, 1], 80)),
            Some(IpAddr::from([10, 0, 0, 50])),
            Some(Identity::new("cluster.local", "app", "wp")),
        )
    }

    /// From an ingress listener, a Service that uses a waypoint is one endpoint: its VIP
    /// through the waypoint (HBONE to the waypoint, CONNECT to the VIP); without a waypoint
    /// address it fails closed; a Service without a waypoint keeps its pods.
    #[test]
    fn an_ingress_reaches_a_service_with_a_waypoint_through_it() {
        let plain = "apiVersion: v1\nkind: Service\nmetadata: {name: plain, namespace: app}\nspec: {clusterIP: 10.96.0.9, selector: {app: api}, ports: [{name: http, port: 80}]}\n";
        let clusters = Clusters::default();
        let m = model(&[INGRESS, WP_POD, plain]);
        let Ok(sel) = from_ingress(&m, &clusters, &plan("web", None)) else {
            panic!("web: not selected");
        };
        assert_eq!(endpoints(&sel), [web_through_waypoint()]);
        let Ok(sel) = from_ingress(&m, &clusters, &plan("plain", None)) else {
            panic!("plain: not selected");
        };
        assert!(
            sel.eps.iter().all(|e| e.via.is_none() && e.pod.is_some()),
            "pods directly"
        );
        // The waypoint without a pod: no address, fail closed.
        let m = model(&[INGRESS]);
        let Err(reply) = from_ingress(&m, &clusters, &plan("web", None)) else {
            panic!("the waypoint was skipped");
        };
        assert_eq!(reply.flag, Some(ResponseFlag::NoHealthyUpstream));
    }

    /// A subset (or a weighted split over subsets) of a Service behind a waypoint, from an
    /// ingress: the subset's labels pick no pods here (the waypoint's routes choose them),
    /// so each subset is the one endpoint through the waypoint, with the subset's policy
    /// (its own `http2MaxRequests` slots); an undefined subset is still `503 NC`. Without
    /// the waypoint the same subsets pick their pods.
    #[test]
    fn an_ingress_sends_a_subset_of_a_service_behind_a_waypoint_to_the_waypoint() {
        let m = model(&[INGRESS, WP_POD, RULE]);
        let clusters = Clusters::default();
        let v1 = from_ingress(&m, &clusters, &plan("web", Some("v1")))
            .map_err(|r| r.reason)
            .expect("v1 through the waypoint");
        assert_eq!(endpoints(&v1), [web_through_waypoint()]);
        // v9 selects no pod, yet through the waypoint it is the same one endpoint.
        let v9 = from_ingress(&m, &clusters, &plan("web", Some("v9")))
            .map_err(|r| r.reason)
            .expect("v9 through the waypoint");
        assert_eq!(endpoints(&v9), [web_through_waypoint()]);
        // The subset's policy holds: its one slot is v1's request's, not v9's.
        let again = from_ingress(&m, &clusters, &plan("web", Some("v1")));
        assert_eq!(failure(again), (503, Some(ResponseFlag::UpstreamOverflow)));
        drop((v1, v9));
        let unknown = from_ingress(&m, &clusters, &plan("web", Some("v2")));
        assert_eq!(failure(unknown), (503, Some(ResponseFlag::NoCluster)));

        // A Service without a waypoint: its subsets pick its pods, at the ingress too.
        let plain = "apiVersion: v1\nkind: Service\nmetadata: {name: plain, namespace: app}\nspec: {clusterIP: 10.96.0.9, selector: {app: api}, ports: [{name: http, port: 80}]}\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: plain, namespace: app}\nspec: {host: plain, subsets: [{name: api, labels: {app: api}}, {name: v9, labels: {version: v9}}]}\n";
        let m = model(&[INGRESS, WP_POD, plain]);
        let Ok(api) = from_ingress(&m, &clusters, &plan("plain", Some("api"))) else {
            panic!("api: not selected");
        };
        let pods: Vec<String> = api.eps.iter().map(|e| e.name()).collect();
        assert_eq!(pods, ["api-1"], "the subset's pods");
        let v9 = from_ingress(&m, &clusters, &plan("plain", Some("v9")));
        assert_eq!(failure(v9), (503, Some(ResponseFlag::NoHealthyUpstream)));
    }
}
