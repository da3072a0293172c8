//! `TokenReview`: the API server says whose a service-account token is (the CA's callers in
//! cluster mode).
//!
//! RBAC the CA's own service account needs in cluster mode (a ClusterRole bound to it with a
//! ClusterRoleBinding; the manifests are written elsewhere):
//! - `create` on `tokenreviews` in API group `authentication.k8s.io` (cluster-scoped): one
//!   review per certificate request. Without it every request is refused
//!   `token_review_unavailable` (the API server answers `403 Forbidden`).
//! - `list` and `watch` on what `mesh_kube::watch` reads for `Scope::Node`: `pods`,
//!   `namespaces`, `serviceaccounts`, `services` (core group), `peerauthentications` and
//!   `authorizationpolicies` (`security.istio.io`), `gateways`
//!   (`gateway.networking.k8s.io`). The CA uses only pods (node, service account, uid), but
//!   it is not ready until every kind was listed; a kind whose CRD is absent is skipped, one
//!   forbidden by RBAC is retried and keeps the CA not ready.
//! - Nothing on `serviceaccounts/token`: the CA never mints Kubernetes tokens.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};

/// `status.user` of an authenticated review.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReviewedUser {
    /// `system:serviceaccount:<ns>:<sa>` for a service-account token.
    pub username: String,
    /// `authentication.kubernetes.io/pod-name`, `.../pod-uid`, `.../node-name` for bound tokens.
    pub extra: BTreeMap<String, Vec<String>>,
    /// The audiences the token was found valid for.
    pub audiences: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ReviewError {
    /// The API server looked at the token and did not accept it.
    #[error("token not accepted by the api server: {0}")]
    Rejected(String),
    /// The review could not be made (API server down, RBAC): nothing is known about the token.
    #[error("token review failed: {0}")]
    Unavailable(String),
}

/// How long a review may take. The client's own timeouts are the kube client's (minutes,
/// sized for watches); a CA request must not hold its slot that long on a wedged API server.
pub const REVIEW_TIMEOUT: Duration = Duration::from_secs(5);

/// Asks the API server whether `token` is valid for `audience` (at most [`REVIEW_TIMEOUT`]).
pub async fn review_token(
    client: &Client,
    token: &str,
    audience: &str,
) -> Result<ReviewedUser, ReviewError> {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_string()),
            audiences: Some(vec![audience.to_string()]),
        },
        ..TokenReview::default()
    };
    let api: Api<TokenReview> = Api::all(client.clone());
    let reviewed =
        tokio::time::timeout(REVIEW_TIMEOUT, api.create(&PostParams::default(), &review))
            .await
            .map_err(|_| {
                ReviewError::Unavailable(format!("no answer within {}s", REVIEW_TIMEOUT.as_secs()))
            })?
            .map_err(|e| ReviewError::Unavailable(e.to_string()))?;
    let status = reviewed
        .status
        .ok_or_else(|| ReviewError::Unavailable("the review came back without a status".into()))?;
    if status.authenticated != Some(true) {
        return Err(ReviewError::Rejected(
            status.error.unwrap_or_else(|| "not authenticated".into()),
        ));
    }
    let audiences = status.audiences.unwrap_or_default();
    // An API server that ignores `spec.audiences` answers without `status.audiences`; the
    // token was then not checked for ours.
    if !audiences.iter().any(|a| a == audience) {
        return Err(ReviewError::Rejected(format!(
            "not valid for audience {audience}"
        )));
    }
    let user = status.user.unwrap_or_default();
    Ok(ReviewedUser {
        username: user.username.unwrap_or_default(),
        extra: user.extra.unwrap_or_default().into_iter().collect(),
        audiences,
    })
}
