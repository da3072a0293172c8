//! JSON Web Tokens as `RequestAuthentication` checks them (pure: no IO, no clock of its own).
//!
//! Only what Istio users need from a waypoint, and nothing that has broken JWT libraries
//! before (RELIABILITY 27):
//! - **Algorithms**: `RS256` (RSA PKCS#1 v1.5, 2048–8192 bit keys) and `ES256` (ECDSA P-256,
//!   fixed-size `r‖s` signatures), verified with `ring`, the workspace's one crypto backend.
//!   `alg: none`, every `HS*` (a public key used as an HMAC secret is the classic confusion
//!   attack) and every other algorithm are refused before any key is looked at. The key must
//!   be of the algorithm's type (an `EC` key never verifies an `RS256` token and the other
//!   way round), and a key whose `alg`/`use` says otherwise is never used.
//! - **Keys**: a JWKS (`{"keys": [...]}`) of `RSA` (`n`, `e`) and `EC` `P-256` (`x`, `y`)
//!   keys; `oct` (symmetric) keys and other curves are skipped, never used. A token with a
//!   `kid` only meets keys with that `kid` (none → [`JwtError::UnknownKid`], which lets the
//!   caller refresh a remote JWKS); without a `kid` every key of the right type is tried.
//! - **Structure**: at most [`MAX_TOKEN_BYTES`]; exactly three base64url segments (no
//!   padding, no other alphabet); header and payload JSON objects; `crit` refused (we
//!   understand no extension).
//! - **Claims**: `iss` equal to the rule's issuer; `exp` / `nbf` (when present) with
//!   [`CLOCK_SKEW_SECS`] leeway, as Envoy's `jwt_authn` does; `aud` (string or list) in the
//!   rule's audiences when it lists any; `sub` and `azp` strings when present.
//!
//! The error texts are Envoy's, so clients see the same 401 bodies as from an Istio waypoint.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value as Json};

/// Largest token accepted (Envoy's header limits make larger ones useless anyway).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Largest JWKS document accepted, inline or fetched.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;
/// Most keys kept from one JWKS.
pub const MAX_JWKS_KEYS: usize = 32;
/// Leeway for `exp` and `nbf` (Envoy's default `clock_skew_seconds`).
pub const CLOCK_SKEW_SECS: u64 = 60;

/// What a validated JWT contributes to authorization.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestAuth {
    /// `iss`
    pub issuer: String,
    /// `sub`
    pub subject: String,
    /// `aud` (a string claim becomes one entry).
    pub audiences: Vec<String>,
    /// `azp`
    pub presenter: Option<String>,
    /// The whole payload, for `request.auth.claims[..]`.
    pub claims: Json,
}

impl RequestAuth {
    /// `iss/sub`, the form `requestPrincipals` and `request.auth.principal` use.
    pub fn principal(&self) -> String {
        format!("{}/{}", self.issuer, self.subject)
    }
}

/// Body of the 401 an invalid token gets, as Envoy writes it.
pub const VERIFICATION_FAILED_BODY: &str = "Jwt verification fails";

/// Smallest and largest RSA modulus accepted, in bytes (`ring`'s 2048–8192 bits).
const RSA_MIN_MODULUS: usize = 256;
const RSA_MAX_MODULUS: usize = 1024;

/// Why a token was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("Jwt is too large (over {MAX_TOKEN_BYTES} bytes)")]
    TooLarge,
    #[error("Jwt is not in the form of Header.Payload.Signature")]
    Malformed,
    #[error("Jwt {0} is an invalid Base64url encoded")]
    Base64(Segment),
    #[error("Jwt {0} is an invalid JSON object")]
    Json(Segment),
    #[error("Jwt header [alg] is not supported: {0:?} (RS256 and ES256 only)")]
    UnsupportedAlg(String),
    #[error("Jwt header [crit] is not supported")]
    Crit,
    #[error("Jwt claim [{0}] has an invalid type")]
    ClaimType(&'static str),
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    #[error("Jwt is expired")]
    Expired,
    #[error("Jwt not yet valid")]
    NotYetValid,
    #[error("Audiences in Jwt are not allowed")]
    AudienceNotAllowed,
    #[error("Jwks doesn't have key to match kid or alg from Jwt")]
    UnknownKid,
    #[error("Jwt verification fails")]
    BadSignature,
    #[error("Jwks remote fetch is failed")]
    JwksUnavailable,
    /// The token is one a RequestAuthentication the translator refused would have checked
    /// (fail closed: `crate::policy::authn::refused_token`).
    #[error("Jwt would be checked by RequestAuthentication {0}, which was refused")]
    PolicyRefused(String),
}

impl JwtError {
    /// A short, stable name for logs and the `reason` label of metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            JwtError::TooLarge => "too_large",
            JwtError::Malformed | JwtError::Base64(_) | JwtError::Json(_) => "malformed",
            JwtError::UnsupportedAlg(_) => "unsupported_alg",
            JwtError::Crit => "crit",
            JwtError::ClaimType(_) => "bad_claim",
            JwtError::UnknownIssuer => "unknown_issuer",
            JwtError::Expired => "expired",
            JwtError::NotYetValid => "not_yet_valid",
            JwtError::AudienceNotAllowed => "audience",
            JwtError::UnknownKid => "unknown_kid",
            JwtError::BadSignature => "signature",
            JwtError::JwksUnavailable => "jwks_unavailable",
            JwtError::PolicyRefused(_) => "policy_refused",
        }
    }
}

/// Which part of a token an error is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Segment {
    Header,
    Payload,
    Signature,
}

impl std::fmt::Display for Segment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Segment::Header => "header",
            Segment::Payload => "payload",
            Segment::Signature => "signature",
        })
    }
}

/// Why a JWKS was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    #[error("jwks is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("jwks is not valid JSON: {0}")]
    Json(String),
    #[error("jwks has no [keys] list")]
    NoKeys,
    #[error("jwks key {index}: {reason}")]
    BadKey { index: usize, reason: String },
    #[error("jwks has no RS256 or ES256 key")]
    NoUsableKey,
}

/// The signing algorithms we accept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alg {
    Rs256,
    Es256,
}

impl Alg {
    fn parse(s: &str) -> Result<Alg, JwtError> {
        match s {
            "RS256" => Ok(Alg::Rs256),
            "ES256" => Ok(Alg::Es256),
            other => Err(JwtError::UnsupportedAlg(other.chars().take(32).collect())),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum PublicKey {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed SEC1 point `04 ‖ x ‖ y`.
    EcP256 {
        point: Vec<u8>,
    },
}

impl PublicKey {
    fn alg(&self) -> Alg {
        match self {
            PublicKey::Rsa { .. } => Alg::Rs256,
            PublicKey::EcP256 { .. } => Alg::Es256,
        }
    }

    fn verify(&self, message: &[u8], sig: &[u8]) -> bool {
        match self {
            PublicKey::Rsa { n, e } => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok(),
            PublicKey::EcP256 { point } => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Jwk {
    kid: Option<String>,
    key: PublicKey,
}

/// A parsed JSON Web Key Set: only the keys that can verify RS256 or ES256.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jwks {
    keys: Vec<Jwk>,
}

impl Jwks {
    /// Parses a JWKS document. Keys of other types, curves, algorithms or uses are skipped;
    /// a malformed RSA or P-256 key is an error, and so is a set with no usable key.
    pub fn parse(json: &[u8]) -> Result<Jwks, JwksError> {
        if json.len() > MAX_JWKS_BYTES {
            return Err(JwksError::TooLarge);
        }
        let doc: Json = serde_json::from_slice(json).map_err(|e| JwksError::Json(e.to_string()))?;
        let items = doc
            .get("keys")
            .and_then(Json::as_array)
            .ok_or(JwksError::NoKeys)?;
        let mut keys = Vec::new();
        for (index, item) in items.iter().enumerate() {
            let bad = |reason: &str| JwksError::BadKey {
                index,
                reason: reason.to_string(),
            };
            let Some(obj) = item.as_object() else {
                return Err(bad("not a JSON object"));
            };
            if let Some(key) = jwk(obj).map_err(|r| bad(&r))? {
                if keys.len() == MAX_JWKS_KEYS {
                    return Err(bad(&format!("more than {MAX_JWKS_KEYS} usable keys")));
                }
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKey);
        }
        Ok(Jwks { keys })
    }

    /// How many usable keys the set holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// One key: `Ok(None)` when it is of a kind we never use.
fn jwk(obj: &Map<String, Json>) -> Result<Option<Jwk>, String> {
    let text = |name: &str| -> Result<Option<&str>, String> {
        match obj.get(name) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(format!("[{name}] is not a string")),
        }
    };
    let bytes = |name: &str| -> Result<Vec<u8>, String> {
        let value = text(name)?.ok_or_else(|| format!("[{name}] is missing"))?;
        URL_SAFE_NO_PAD
            .decode(value.trim_end_matches('='))
            .map_err(|_| format!("[{name}] is not base64url"))
    };
    if text("use")?.is_some_and(|u| u != "sig") {
        return Ok(None);
    }
    let kid = text("kid")?.map(str::to_string);
    let alg = text("alg")?;
    let key = match text("kty")? {
        Some("RSA") => {
            if alg.is_some_and(|a| a != "RS256") {
                return Ok(None);
            }
            let n = strip_leading_zeros(bytes("n")?);
            let e = strip_leading_zeros(bytes("e")?);
            if !(RSA_MIN_MODULUS..=RSA_MAX_MODULUS).contains(&n.len()) {
                return Err(format!(
                    "RSA modulus of {} bits (2048 to 8192 accepted)",
                    n.len() * 8
                ));
            }
            if e.is_empty() || e.len() > 4 {
                return Err("RSA exponent out of range".to_string());
            }
            PublicKey::Rsa { n, e }
        }
        Some("EC") => {
            if text("crv")? != Some("P-256") || alg.is_some_and(|a| a != "ES256") {
                return Ok(None);
            }
            let (x, y) = (bytes("x")?, bytes("y")?);
            if x.len() != 32 || y.len() != 32 {
                return Err("P-256 coordinates must be 32 bytes".to_string());
            }
            let mut point = Vec::with_capacity(65);
            point.push(4);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            PublicKey::EcP256 { point }
        }
        Some(_) => return Ok(None),
        None => return Err("[kty] is missing".to_string()),
    };
    Ok(Some(Jwk { kid, key }))
}

fn strip_leading_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let zeros = v.iter().take_while(|b| **b == 0).count();
    v.drain(..zeros);
    v
}

/// A token split and decoded, not yet trusted.
#[derive(Clone, Debug)]
pub struct Token<'t> {
    alg: Alg,
    kid: Option<String>,
    payload: Map<String, Json>,
    /// `header.payload`, what the signature covers.
    signing_input: &'t str,
    /// The payload segment as sent (base64url), for `outputPayloadToHeader`.
    payload_b64: &'t str,
    signature: Vec<u8>,
}

impl<'t> Token<'t> {
    /// Splits and decodes `raw`; checks structure and algorithm only.
    pub fn decode(raw: &'t str) -> Result<Token<'t>, JwtError> {
        if raw.len() > MAX_TOKEN_BYTES {
            return Err(JwtError::TooLarge);
        }
        let mut parts = raw.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed);
        };
        if h.is_empty() || p.is_empty() || s.is_empty() {
            return Err(JwtError::Malformed);
        }
        let header = json_object(h, Segment::Header)?;
        let alg = match header.get("alg") {
            Some(Json::String(a)) => Alg::parse(a)?,
            Some(_) => return Err(JwtError::ClaimType("alg")),
            None => return Err(JwtError::UnsupportedAlg(String::new())),
        };
        if header.contains_key("crit") {
            return Err(JwtError::Crit);
        }
        let kid = match header.get("kid") {
            None | Some(Json::Null) => None,
            Some(Json::String(k)) => Some(k.clone()),
            Some(_) => return Err(JwtError::ClaimType("kid")),
        };
        let payload = json_object(p, Segment::Payload)?;
        let signature = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| JwtError::Base64(Segment::Signature))?;
        Ok(Token {
            alg,
            kid,
            payload,
            signing_input: &raw[..h.len() + 1 + p.len()],
            payload_b64: p,
            signature,
        })
    }

    /// The (unverified) `iss`, to pick the rule that should verify the token.
    pub fn issuer(&self) -> Option<&str> {
        self.payload.get("iss").and_then(Json::as_str)
    }

    /// The payload segment as received (base64url without padding).
    pub fn payload_b64(&self) -> &'t str {
        self.payload_b64
    }

    /// Verifies signature and claims against `keys` for a rule with `issuer` and
    /// `audiences` (empty: any), at `now` (seconds since the Unix epoch).
    pub fn verify(
        &self,
        keys: &Jwks,
        issuer: &str,
        audiences: &[String],
        now: u64,
    ) -> Result<RequestAuth, JwtError> {
        if self.issuer() != Some(issuer) {
            return Err(JwtError::UnknownIssuer);
        }
        self.verify_signature(keys)?;
        let time = |name: &'static str| -> Result<Option<u64>, JwtError> {
            match self.payload.get(name) {
                None | Some(Json::Null) => Ok(None),
                Some(Json::Number(n)) => n
                    .as_u64()
                    .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                    .map(Some)
                    .ok_or(JwtError::ClaimType(name)),
                Some(_) => Err(JwtError::ClaimType(name)),
            }
        };
        if let Some(exp) = time("exp")? {
            if now > exp.saturating_add(CLOCK_SKEW_SECS) {
                return Err(JwtError::Expired);
            }
        }
        if let Some(nbf) = time("nbf")? {
            if now.saturating_add(CLOCK_SKEW_SECS) < nbf {
                return Err(JwtError::NotYetValid);
            }
        }
        let token_audiences = match self.payload.get("aud") {
            None | Some(Json::Null) => Vec::new(),
            Some(Json::String(a)) => vec![a.clone()],
            Some(Json::Array(items)) => items
                .iter()
                .map(|a| a.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or(JwtError::ClaimType("aud"))?,
            Some(_) => return Err(JwtError::ClaimType("aud")),
        };
        if !audiences.is_empty() && !token_audiences.iter().any(|a| audiences.contains(a)) {
            return Err(JwtError::AudienceNotAllowed);
        }
        let opt_str = |name: &'static str| -> Result<Option<String>, JwtError> {
            match self.payload.get(name) {
                None | Some(Json::Null) => Ok(None),
                Some(Json::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(JwtError::ClaimType(name)),
            }
        };
        Ok(RequestAuth {
            issuer: issuer.to_string(),
            subject: opt_str("sub")?.unwrap_or_default(),
            audiences: token_audiences,
            presenter: opt_str("azp")?,
            claims: Json::Object(self.payload.clone()),
        })
    }

    fn verify_signature(&self, keys: &Jwks) -> Result<(), JwtError> {
        let mut candidates = keys
            .keys
            .iter()
            .filter(|k| self.kid.is_none() || k.kid == self.kid)
            .filter(|k| k.key.alg() == self.alg)
            .peekable();
        if candidates.peek().is_none() {
            return Err(JwtError::UnknownKid);
        }
        let message = self.signing_input.as_bytes();
        if candidates.any(|k| k.key.verify(message, &self.signature)) {
            Ok(())
        } else {
            Err(JwtError::BadSignature)
        }
    }
}

fn json_object(segment: &str, which: Segment) -> Result<Map<String, Json>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(segment)
        .map_err(|_| JwtError::Base64(which))?;
    match serde_json::from_slice::<Json>(&bytes) {
        Ok(Json::Object(map)) => Ok(map),
        _ => Err(JwtError::Json(which)),
    }
}

#[cfg(test)]
mod tests;
