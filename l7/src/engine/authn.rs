//! Phase 2, authenticate: the RequestAuthentication rules for the proxy's Gateway and the
//! destination Service or ServiceEntry ([`mesh_model::policy::authn`]). Client copies of their
//! `outputPayloadToHeader` headers are dropped; no token → unauthenticated; an invalid token
//! (or one whose `jwksUri` keys are not available: fail closed) → `401 Jwt verification
//! fails` (flag `JWT`, `waypoint_jwt_rejected_total{reason}`); a valid one gives
//! `request.auth.*` to the next phase, its header removed unless `forwardOriginalToken`, its
//! payload written to `outputPayloadToHeader`. A token a refused RequestAuthentication
//! would have checked is a `401` too (fail closed, reason `policy_refused`).

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::StatusCode;
use mesh_model::jwt::{Jwks, JwtError, RequestAuth, VERIFICATION_FAILED_BODY};
use mesh_model::model::{JwksSource, Model, NamespacedName};
use mesh_model::policy::authn::{
    self, output_headers, refused_for_destination, rules_for_destination, Denial, Outcome,
};
use mesh_model::policy::l7::Destination;
use mesh_model::route::NormalizedPath;

use super::{LocalReply, RequestContext};
use crate::proxy::{ConnCtx, Inputs};
use crate::telemetry::ResponseFlag;

/// The phase: the principal of the request `rq` (`None`: no token), or the `401`.
pub fn run(
    model: &Model,
    gateway: &NamespacedName,
    inputs: &Inputs,
    ctx: &ConnCtx,
    rq: &mut RequestContext,
    path: &NormalizedPath,
) -> Result<Option<RequestAuth>, LocalReply> {
    let outcome = authenticate(
        model,
        gateway,
        super::authz::destination(&ctx.target),
        &mut rq.parts.headers,
        path.query.as_deref(),
        unix_now(),
        |uri| inputs.jwks.keys(uri),
    );
    outcome.map_err(|d| {
        if let (JwtError::UnknownKid, Some(uri)) = (&d.error, &d.jwks_uri) {
            inputs.jwks.request_refresh(uri);
        }
        inputs.http_metrics.jwt_rejected(d.error.reason());
        tracing::info!(request_id = %rq.log.request_id, reason = d.error.reason(), error = %d.error, "jwt rejected");
        rejection(&d)
    })
}

/// Authenticates a request for `dest` at `now` (Unix seconds) with the rules `waypoint`
/// applies, editing its `headers` as the rules say; `remote` gives a `jwksUri`'s current
/// keys.
pub fn authenticate(
    model: &Model,
    waypoint: &NamespacedName,
    dest: Destination<'_>,
    headers: &mut HeaderMap,
    query: Option<&str>,
    now: u64,
    remote: impl Fn(&str) -> Option<Arc<Jwks>>,
) -> Result<Option<RequestAuth>, Denial> {
    let rules = rules_for_destination(model, waypoint, dest);
    for name in output_headers(&rules) {
        // Only the waypoint writes these (RELIABILITY 26).
        headers.remove(name);
    }
    let refused = refused_for_destination(model, waypoint, dest);
    if let Some(denial) = authn::refused_token(&refused, headers, query) {
        return Err(denial);
    }
    if rules.is_empty() {
        return Ok(None);
    }
    let outcome = authn::authenticate(&rules, headers, query, now, |rule| match &rule.jwks {
        JwksSource::Inline { keys, .. } => Some(keys.clone()),
        JwksSource::Uri(uri) => remote(uri),
    });
    match outcome {
        Outcome::Anonymous => Ok(None),
        Outcome::Authenticated(a) => {
            for name in &a.remove_headers {
                headers.remove(name.as_str());
            }
            for (name, value) in &a.output_headers {
                if let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    headers.insert(n, v);
                }
            }
            Ok(Some(a.auth))
        }
        Outcome::Denied(d) => Err(d),
    }
}

/// The `401` of a refused token.
fn rejection(d: &Denial) -> LocalReply {
    LocalReply::new(
        StatusCode::UNAUTHORIZED,
        VERIFICATION_FAILED_BODY,
        Some(ResponseFlag::JwtDenied),
        format!("jwt: {}", d.error),
    )
    .with_header(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer error=\"invalid_token\""),
    )
}

/// Seconds since the Unix epoch (0 if the clock is before it: every `exp` then passes,
/// but signatures still have to verify).
fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::testing::{model, waypoint};

    /// One P-256 key (public, from RFC 7515 A.3).
    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

    fn rules() -> String {
        format!(
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
             metadata: {{name: jwt, namespace: app}}\n\
             spec:\n  targetRefs: [{{kind: Service, group: \"\", name: web}}]\n  jwtRules:\n  \
             - issuer: https://issuer\n    jwks: '{JWKS}'\n    outputPayloadToHeader: X-Payload\n"
        )
    }

    fn check(
        model: &Model,
        service: &str,
        headers: &[(&'static str, &'static str)],
    ) -> (Result<Option<RequestAuth>, Denial>, HeaderMap) {
        let mut h = crate::engine::testing::headers(headers);
        let svc = NamespacedName::new("app", service);
        let dest = Destination::Service(&svc);
        let got = authenticate(model, &waypoint(), dest, &mut h, None, 1, |_| None);
        (got, h)
    }

    #[test]
    fn rules_on_a_service_entry_authenticate_its_egress_requests() {
        let on_entry = rules().replace(
            "{kind: Service, group: \"\", name: web}",
            "{kind: ServiceEntry, group: networking.istio.io, name: httpbin}",
        );
        let m = model(&[crate::engine::testing::ENTRY, &on_entry]);
        let entry = NamespacedName::new("app", "httpbin");
        let mut h = crate::engine::testing::headers(&[("x-payload", "forged")]);
        let dest = Destination::ServiceEntry(&entry);
        let got = authenticate(&m, &waypoint(), dest, &mut h, None, 1, |_| None);
        assert_eq!(got, Ok(None));
        assert!(h.get("x-payload").is_none(), "the entry's rules apply");
        let mut h = crate::engine::testing::headers(&[("authorization", "Bearer not-a-jwt")]);
        let got = authenticate(&m, &waypoint(), dest, &mut h, None, 1, |_| None);
        assert!(got.is_err(), "an invalid token is refused");
        // Not a Service of that name, nor the Service `web` the rules named before.
        let (_, h) = check(&m, "httpbin", &[("x-payload", "kept")]);
        assert!(h.get("x-payload").is_some());
        let (_, h) = check(&m, "web", &[("x-payload", "kept")]);
        assert!(h.get("x-payload").is_some());
    }

    #[test]
    fn no_token_is_anonymous_and_client_copies_of_output_headers_are_dropped() {
        let m = model(&[&rules()]);
        let (got, h) = check(&m, "web", &[("x-payload", "forged"), ("x-other", "1")]);
        assert_eq!(got, Ok(None));
        assert!(h.get("x-payload").is_none(), "only the waypoint sets it");
        assert!(h.get("x-other").is_some());
        // A Service no rule targets: its headers are its own.
        let (got, h) = check(&m, "api", &[("x-payload", "kept")]);
        assert_eq!(got, Ok(None));
        assert_eq!(h["x-payload"], "kept");
    }

    #[test]
    fn an_invalid_token_is_a_401_with_the_bearer_challenge() {
        let m = model(&[&rules()]);
        let (got, _) = check(&m, "web", &[("authorization", "Bearer not.a.jwt")]);
        let denial = got.expect_err("refused");
        let reply = rejection(&denial);
        assert_eq!(reply.status, 401);
        assert_eq!(reply.body, VERIFICATION_FAILED_BODY.as_bytes());
        assert_eq!(reply.flag, Some(ResponseFlag::JwtDenied));
        assert_eq!(
            reply.headers,
            [(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer error=\"invalid_token\"")
            )]
        );
        // Without rules the same token is not looked at.
        let (got, h) = check(&model(&[]), "web", &[("authorization", "Bearer not.a.jwt")]);
        assert_eq!(got, Ok(None));
        assert!(h.get("authorization").is_some());
    }

    #[test]
    fn a_refused_request_authentication_401s_the_tokens_it_would_check() {
        // `timeout` is not supported: the translator refuses the whole object.
        let text = "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
                    metadata: {name: jwt, namespace: app}\n\
                    spec:\n  targetRefs: [{kind: Service, name: web}]\n  \
                    jwtRules: [{issuer: \"https://issuer\", jwksUri: \"https://k\", timeout: 5s}]\n";
        let refused = mesh_model::k8s::refused_policy(
            "RequestAuthentication",
            "app",
            "jwt",
            text,
            "jwtRules[0].timeout: not supported",
        )
        .expect("fails closed");
        let m = model(&[]).with_refused_policies(vec![refused]);
        // {"alg":"RS256"} . {"iss":"https://issuer"} . "sig"
        const TOKEN: &str = "Bearer eyJhbGciOiJSUzI1NiJ9.eyJpc3MiOiJodHRwczovL2lzc3VlciJ9.c2ln";
        let (got, _) = check(&m, "web", &[("authorization", TOKEN)]);
        let denial = got.expect_err("refused");
        assert_eq!(denial.error.reason(), "policy_refused");
        assert_eq!(rejection(&denial).status, 401);
        assert_eq!(check(&m, "web", &[]).0, Ok(None), "no token: unaffected");
        assert_eq!(
            check(&m, "api", &[("authorization", TOKEN)]).0,
            Ok(None),
            "another Service"
        );
    }
}
