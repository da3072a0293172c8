//! `RequestAuthentication` (`security.istio.io/v1`) as typed data: which JWTs a waypoint
//! accepts, where it finds them and what it does with them. Built by `k8s/jwt.rs`; evaluated
//! by [`crate::policy::authn`].

use std::sync::Arc;

use serde::Serialize;

use super::{Labels, TargetRef};
use crate::jwt::Jwks;

#[derive(Clone, Debug, Serialize)]
pub struct RequestAuthentication {
    pub name: String,
    pub namespace: String,
    /// Workload selector (for sidecars / ztunnel; a waypoint only looks at `target_refs`).
    pub selector: Option<Labels>,
    pub target_refs: Vec<TargetRef>,
    pub jwt_rules: Vec<JwtRule>,
}

/// One `jwtRules` entry.
#[derive(Clone, Debug, Serialize)]
pub struct JwtRule {
    pub issuer: String,
    /// Empty: any audience.
    pub audiences: Vec<String>,
    pub jwks: JwksSource,
    /// `fromHeaders`; with `from_params` empty too, the default locations apply
    /// (`Authorization: Bearer <token>`, `?access_token=`).
    pub from_headers: Vec<JwtHeader>,
    pub from_params: Vec<String>,
    /// Keep the token header on the forwarded request (default: removed once verified).
    pub forward_original_token: bool,
    /// Header that receives the verified payload (base64url), lowercase.
    pub output_payload_to_header: Option<String>,
}

/// Where the keys come from.
#[derive(Clone, Debug, Serialize)]
pub enum JwksSource {
    /// `jwks`: the JSON as written, parsed once at translation.
    Inline {
        json: String,
        #[serde(skip)]
        keys: Arc<Jwks>,
    },
    /// `jwksUri`: fetched (and refreshed) by the waypoint.
    Uri(String),
}

/// A `fromHeaders` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct JwtHeader {
    /// Lowercase header name.
    pub name: String,
    /// Stripped from the value before the token (e.g. `Bearer `); empty for none.
    pub prefix: String,
}
