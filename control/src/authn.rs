//! Who is calling: a Kubernetes service-account token, checked by the CA itself in local
//! mode ([`crate::token`]) or by the API server's `TokenReview` in cluster mode.

use mesh_kube::token_review::{review_token, ReviewError};

use crate::authz::{BoundPod, Caller};
use crate::token::{service_account_of, TokenAuthority, TokenError};

/// `status.user.extra` keys of a bound service-account token.
const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

#[derive(Debug, thiserror::Error)]
pub enum AuthnError {
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("{0}")]
    Rejected(String),
    #[error("{0}")]
    Unavailable(String),
}

impl AuthnError {
    pub fn reason(&self) -> &'static str {
        match self {
            AuthnError::Token(e) => e.reason(),
            AuthnError::Rejected(_) => "token_rejected",
            AuthnError::Unavailable(_) => "token_review_unavailable",
        }
    }
}

/// How tokens are checked.
pub enum Authenticator {
    /// Tokens this CA signed (local mode).
    Local {
        tokens: TokenAuthority,
        audience: String,
    },
    /// `TokenReview` against the API server (cluster mode).
    Kube {
        client: mesh_kube::Client,
        audience: String,
    },
}

impl Authenticator {
    pub fn describe(&self) -> &'static str {
        match self {
            Authenticator::Local { .. } => "local tokens",
            Authenticator::Kube { .. } => "kubernetes tokenreview",
        }
    }

    pub fn audience(&self) -> &str {
        match self {
            Authenticator::Local { audience, .. } | Authenticator::Kube { audience, .. } => {
                audience
            }
        }
    }

    pub async fn authenticate(&self, token: &str) -> Result<Caller, AuthnError> {
        match self {
            Authenticator::Local { tokens, audience } => Ok(tokens.verify(token, audience)?),
            Authenticator::Kube { client, audience } => {
                let user = review_token(client, token, audience)
                    .await
                    .map_err(|e| match e {
                        ReviewError::Rejected(m) => AuthnError::Rejected(m),
                        ReviewError::Unavailable(m) => AuthnError::Unavailable(m),
                    })?;
                let (namespace, service_account) = service_account_of(&user.username)?;
                let first = |key: &str| user.extra.get(key).and_then(|v| v.first()).cloned();
                Ok(Caller {
                    namespace,
                    service_account,
                    node: first(EXTRA_NODE_NAME),
                    pod: first(EXTRA_POD_NAME).map(|name| BoundPod {
                        name,
                        uid: first(EXTRA_POD_UID),
                    }),
                })
            }
        }
    }
}
