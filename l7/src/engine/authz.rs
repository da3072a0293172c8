//! Phase 3, authorize: L7 AuthorizationPolicy ([`mesh_model::policy::l7::authorize_l7_to`])
//! for the proxy's Gateway and the destination Service or ServiceEntry ([`destination`]), on
//! the normalised path and with the principal the authn phase found; a denial is answered
//! `403 RBAC: access denied` (flag `DENY`). Audit and dry-run matches are logged.

use http::StatusCode;
use mesh_model::jwt::RequestAuth;
use mesh_model::model::{Model, NamespacedName};
use mesh_model::policy::l7::{authorize_l7_to, Destination, L7Request, DENIED_BODY};
use mesh_model::policy::Decision;

use super::{LocalReply, RequestContext};
use crate::proxy::ConnCtx;
use crate::target::Target;
use crate::telemetry::ResponseFlag;

/// What `target` is to policy attachment (`targetRefs`): a Service, a ServiceEntry or a
/// workload.
pub fn destination(target: &Target) -> Destination<'_> {
    match target {
        Target::Service { svc, .. } => Destination::Service(svc),
        Target::ServiceEntry { entry, .. } => Destination::ServiceEntry(entry),
        // An ingress listener: the policies attached to its Gateway.
        Target::Workload { .. } | Target::Listener { .. } => Destination::Workload,
    }
}

/// The phase: `Err(403)` when policy denies the request `rq` for `path` (path and query,
/// normalised).
pub fn run(
    model: &Model,
    waypoint: &NamespacedName,
    ctx: &ConnCtx,
    rq: &RequestContext,
    path: &str,
    auth: Option<&RequestAuth>,
) -> Result<(), LocalReply> {
    let l7 = L7Request {
        src_identity: ctx.peer_identity.as_ref(),
        src_ip: ctx.peer.ip(),
        remote_ip: rq.remote_ip,
        dst_ip: ctx.authority.ip(),
        dst_port: ctx.authority.port(),
        host: &rq.authority,
        method: rq.parts.method.as_str(),
        path,
        headers: &rq.parts.headers,
        auth,
    };
    let eval = authorize_l7_to(model, waypoint, destination(&ctx.target), &l7);
    for policy in &eval.audited {
        tracing::info!(%policy, request_id = %rq.log.request_id, "audit policy matched");
    }
    for policy in &eval.dry_run_denied {
        tracing::info!(%policy, request_id = %rq.log.request_id, "dry-run policy would deny");
    }
    match eval.decision {
        Decision::Deny { policy } => {
            let reason = policy.map_or_else(
                || "no ALLOW policy matched".to_string(),
                |p| format!("denied by {p}"),
            );
            Err(LocalReply::new(
                StatusCode::FORBIDDEN,
                DENIED_BODY,
                Some(ResponseFlag::Deny),
                reason,
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{conn, entry_conn, model, request_context, waypoint, ENTRY};

    const ONLY_GET_PUBLIC: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: public, namespace: app}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  action: ALLOW
  rules: [{to: [{operation: {methods: [GET], paths: ["/public/*"]}}]}]
"#;

    fn check(m: &Model, path: &str) -> Result<(), (u16, String)> {
        run(m, &waypoint(), &conn(), &request_context(false), path, None)
            .map_err(|r| (r.status.as_u16(), r.reason))
    }

    #[test]
    fn an_allow_policy_admits_what_it_matches_and_denies_the_rest() {
        let m = model(&[ONLY_GET_PUBLIC]);
        assert_eq!(check(&m, "/public/a"), Ok(()));
        let (status, reason) = check(&m, "/private").expect_err("denied");
        assert_eq!(status, 403);
        assert_eq!(reason, "no ALLOW policy matched");
        let reply =
            run(&m, &waypoint(), &conn(), &request_context(false), "/", None).expect_err("denied");
        assert_eq!(reply.body, DENIED_BODY.as_bytes());
        assert_eq!(reply.flag, Some(ResponseFlag::Deny));
        // No policy: everything is allowed.
        assert_eq!(check(&model(&[]), "/private"), Ok(()));
    }

    #[test]
    fn a_policy_on_a_service_entry_guards_its_egress_requests() {
        let egress = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: egress, namespace: app}
spec:
  targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: httpbin}]
  action: ALLOW
  rules: [{to: [{operation: {methods: [GET], paths: ["/get"]}}]}]
"#;
        let m = model(&[ENTRY, egress]);
        let check = |ctx: &ConnCtx, path: &str| {
            run(&m, &waypoint(), ctx, &request_context(false), path, None)
                .map_err(|r| (r.status.as_u16(), r.flag))
        };
        let entry = entry_conn();
        assert_eq!(check(&entry, "/get"), Ok(()));
        assert_eq!(check(&entry, "/post"), Err((403, Some(ResponseFlag::Deny))));
        // Not the waypoint's other destinations.
        assert_eq!(check(&conn(), "/post"), Ok(()));
        assert_eq!(
            destination(&entry.target),
            Destination::ServiceEntry(&NamespacedName::new("app", "httpbin"))
        );
    }
}
