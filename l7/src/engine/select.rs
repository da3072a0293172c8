//! Phase 6, select: the backend's ready endpoints in the current model and the cluster
//! (Service, port, subset) they form, with its DestinationRule policy
//! ([`mesh_model::model::effective_policy`]). A backend gone from the model → `500 NC`; an
//! unknown subset → `503 NC`; no endpoint (or none in the subset) → `503 UH`; then the
//! consistent-hash key of the request and one of the cluster's `http2MaxRequests` slots
//! (else `503 UO`), and the `tls` the proxy originates to the endpoints. The mirrors of the
//! rule are resolved in the same model.

use std::sync::Arc;

use mesh_model::model::{ClientTls, Model};
use mesh_model::route::NormalizedPath;

use super::route::RoutePlan;
use super::{LocalReply, RequestContext, Scope};
use crate::balance::{
    hash_key, new_cookie_value, Cluster, ClusterKey, Clusters, HashInput, RequestGuard,
};
use crate::mirror::{self, MirrorTarget};
use crate::protocol::Declared;
use crate::proxy::{upstream_proto, ConnCtx};
use crate::target::{Resolved, Unselectable};
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
    let subset = plan.subset.as_deref();
    let (policy, eps) = match resolved.cluster(model, &scope.gateway.namespace, subset) {
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
    use crate::engine::testing::{conn, model, request_context, waypoint};
    use crate::target::Target;
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
}
