//! `TokenReview`: the API server says whose a service-account token is (the CA's callers in
//! cluster mode). The CA's own service account needs `create` on `tokenreviews`.

use std::collections::BTreeMap;

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

/// Asks the API server whether `token` is valid for `audience`.
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
    let reviewed = api
        .create(&PostParams::default(), &review)
        .await
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
