//! Service-account tokens in local mode: the CA signs them itself (ES256, a key of its own
//! kept beside the CA key) and checks them as the API server's TokenReview would.
//!
//! A token looks like a Kubernetes projected service-account token, so the same
//! authentication path serves both modes and any CA client (Istio's ztunnel included) can be
//! handed one as a token file:
//!
//! ```json
//! {"iss": "mesh-control", "aud": ["istio-ca"], "sub": "system:serviceaccount:<ns>:<sa>",
//!  "iat": .., "nbf": .., "exp": ..,
//!  "kubernetes.io": {"namespace": "<ns>", "serviceaccount": {"name": "<sa>"},
//!                    "node": {"name": "<node>"}, "pod": {"name": "<pod>", "uid": "<uid>"}}}
//! ```
//!
//! `node` binds a node agent's token to its node; `pod` binds a token to one pod (a deleted
//! pod's token then stops working for anything but the caller's own identity).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use mesh_model::jwt::{Jwks, JwtError, Token};
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};

use crate::authz::{BoundPod, Caller};

/// `iss` of the tokens this CA signs.
pub const ISSUER: &str = "mesh-control";
/// The audience Istio's CA clients ask for.
pub const DEFAULT_AUDIENCE: &str = "istio-ca";
/// The token signing key, in the CA directory (PKCS#8 PEM, mode 0600).
pub const TOKEN_KEY_FILE: &str = "token-key.pem";
/// Longest lifetime [`TokenAuthority::mint`] gives a token.
pub const MAX_TOKEN_TTL: Duration = Duration::from_secs(365 * 24 * 60 * 60);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("token key {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("token: {0}")]
    Invalid(#[from] JwtError),
    #[error("token has no expiry")]
    NoExpiry,
    #[error("token does not name a service account: {0}")]
    Subject(String),
    #[error("sign token: {0}")]
    Sign(String),
}

impl TokenError {
    /// A short stable name (metric label).
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Key { .. } | TokenError::Sign(_) => "token_key",
            TokenError::Invalid(e) => match e {
                JwtError::Expired => "token_expired",
                JwtError::BadSignature | JwtError::UnknownKid | JwtError::UnknownIssuer => {
                    "token_forged"
                }
                JwtError::AudienceNotAllowed => "token_audience",
                _ => "token_malformed",
            },
            TokenError::NoExpiry => "token_malformed",
            TokenError::Subject(_) => "token_subject",
        }
    }
}

/// What a minted token says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenClaims {
    pub namespace: String,
    pub service_account: String,
    pub node: Option<String>,
    pub pod: Option<BoundPod>,
    pub audience: String,
    pub ttl: Duration,
}

/// Signs and checks local-mode tokens.
pub struct TokenAuthority {
    key: EcdsaKeyPair,
    jwks: Jwks,
    kid: String,
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("TokenAuthority")
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl TokenAuthority {
    /// Loads `dir/token-key.pem`, creating it on first use (a second process racing to create
    /// it loads the winner's).
    pub fn load_or_create(dir: &Path) -> Result<TokenAuthority, TokenError> {
        let path = dir.join(TOKEN_KEY_FILE);
        let bad = |reason: String| TokenError::Key {
            path: path.clone(),
            reason,
        };
        if !path.exists() {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &SystemRandom::new(),
            )
            .map_err(|_| bad("generate".into()))?;
            let pem = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref()));
            std::fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
            write_new(&path, pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        }
        let text = std::fs::read_to_string(&path).map_err(|e| bad(e.to_string()))?;
        let block = pem::parse(&text).map_err(|e| bad(e.to_string()))?;
        if block.tag() != "PRIVATE KEY" {
            return Err(bad(format!("holds a {:?}, not a PRIVATE KEY", block.tag())));
        }
        Self::from_pkcs8(block.contents()).map_err(bad)
    }

    /// An in-memory authority (tests).
    pub fn ephemeral() -> Result<TokenAuthority, TokenError> {
        let pkcs8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &SystemRandom::new())
                .map_err(|_| TokenError::Sign("generate".into()))?;
        Self::from_pkcs8(pkcs8.as_ref()).map_err(TokenError::Sign)
    }

    fn from_pkcs8(der: &[u8]) -> Result<TokenAuthority, String> {
        let key =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der, &SystemRandom::new())
                .map_err(|e| format!("not an ECDSA P-256 key: {e}"))?;
        let public = key.public_key().as_ref();
        let digest = ring::digest::digest(&ring::digest::SHA256, public);
        let kid = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..12]);
        let jwks = json!({"keys": [{"kty": "EC", "crv": "P-256", "alg": "ES256", "kid": kid,
            "x": URL_SAFE_NO_PAD.encode(&public[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&public[33..65])}]});
        let jwks = Jwks::parse(jwks.to_string().as_bytes()).map_err(|e| e.to_string())?;
        Ok(TokenAuthority { key, jwks, kid })
    }

    /// A signed token for `claims`, valid from now.
    pub fn mint(&self, claims: &TokenClaims) -> Result<String, TokenError> {
        self.mint_at(claims, unix_now())
    }

    /// A signed token for `claims`, valid from `now` (seconds since the Unix epoch).
    fn mint_at(&self, claims: &TokenClaims, now: u64) -> Result<String, TokenError> {
        if claims.namespace.is_empty() || claims.service_account.is_empty() {
            return Err(TokenError::Subject(
                "namespace and service account are required".into(),
            ));
        }
        let ttl = claims.ttl.min(MAX_TOKEN_TTL).as_secs().max(1);
        let mut k8s = json!({
            "namespace": claims.namespace,
            "serviceaccount": {"name": claims.service_account},
        });
        if let Some(node) = &claims.node {
            k8s["node"] = json!({"name": node});
        }
        if let Some(pod) = &claims.pod {
            k8s["pod"] = json!({"name": pod.name, "uid": pod.uid});
        }
        let body = json!({
            "iss": ISSUER,
            "aud": [claims.audience],
            "sub": format!("system:serviceaccount:{}:{}", claims.namespace, claims.service_account),
            "iat": now, "nbf": now, "exp": now + ttl,
            "kubernetes.io": k8s,
        });
        let header = json!({"alg": "ES256", "kid": self.kid, "typ": "JWT"});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(body.to_string())
        );
        let sig = self
            .key
            .sign(&SystemRandom::new(), input.as_bytes())
            .map_err(|_| TokenError::Sign("sign".into()))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref())))
    }

    /// Checks signature, expiry and audience; returns who the token speaks for.
    pub fn verify(&self, raw: &str, audience: &str) -> Result<Caller, TokenError> {
        let token = Token::decode(raw)?;
        let auth = token.verify(&self.jwks, ISSUER, &[audience.to_string()], unix_now())?;
        if auth.claims.get("exp").is_none() {
            return Err(TokenError::NoExpiry);
        }
        let (namespace, service_account) = service_account_of(&auth.subject)?;
        let k8s = auth.claims.get("kubernetes.io");
        let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        // The structured claims, when present, must agree with `sub`.
        if let Some(ns) = text(k8s.and_then(|k| k.get("namespace"))) {
            if ns != namespace {
                return Err(TokenError::Subject(
                    "namespace claim disagrees with sub".into(),
                ));
            }
        }
        let node = text(k8s.and_then(|k| k.get("node")).and_then(|n| n.get("name")));
        let pod = k8s.and_then(|k| k.get("pod")).and_then(|p| {
            Some(BoundPod {
                name: text(p.get("name"))?,
                uid: text(p.get("uid")),
            })
        });
        Ok(Caller {
            namespace,
            service_account,
            node,
            pod,
        })
    }
}

/// `system:serviceaccount:<ns>:<sa>` → (ns, sa).
pub fn service_account_of(username: &str) -> Result<(String, String), TokenError> {
    let rest = username
        .strip_prefix("system:serviceaccount:")
        .ok_or_else(|| TokenError::Subject(username.chars().take(80).collect()))?;
    match rest.split_once(':') {
        Some((ns, sa)) if !ns.is_empty() && !sa.is_empty() && !sa.contains(':') => {
            Ok((ns.to_string(), sa.to_string()))
        }
        _ => Err(TokenError::Subject(username.chars().take(80).collect())),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Creates `path` with mode 0600; an existing file (another process won the race) is kept.
fn write_new(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(mut f) => f.write_all(contents),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims() -> TokenClaims {
        TokenClaims {
            namespace: "istio-system".into(),
            service_account: "ztunnel".into(),
            node: Some("n1".into()),
            pod: None,
            audience: DEFAULT_AUDIENCE.into(),
            ttl: Duration::from_secs(600),
        }
    }

    #[test]
    fn a_minted_token_verifies_as_its_service_account_and_node() {
        let ta = TokenAuthority::ephemeral().unwrap();
        let token = ta.mint(&claims()).unwrap();
        let caller = ta.verify(&token, DEFAULT_AUDIENCE).unwrap();
        assert_eq!(caller.namespace, "istio-system");
        assert_eq!(caller.service_account, "ztunnel");
        assert_eq!(caller.node.as_deref(), Some("n1"));
        assert_eq!(caller.pod, None);
    }

    #[test]
    fn wrong_audience_forged_and_garbage_tokens_are_refused_by_reason() {
        let ta = TokenAuthority::ephemeral().unwrap();
        let other = TokenAuthority::ephemeral().unwrap();
        let token = ta.mint(&claims()).unwrap();
        let reason = |r: Result<Caller, TokenError>| r.map(|_| ()).map_err(|e| e.reason());
        assert_eq!(
            reason(ta.verify(&token, "kubernetes")),
            Err("token_audience")
        );
        assert_eq!(
            reason(other.verify(&token, DEFAULT_AUDIENCE)),
            Err("token_forged")
        );
        assert_eq!(
            reason(ta.verify("a.b.c", DEFAULT_AUDIENCE)),
            Err("token_malformed")
        );
        assert_eq!(
            reason(ta.verify("", DEFAULT_AUDIENCE)),
            Err("token_malformed")
        );
        // A token whose payload was swapped for another service account's.
        let evil = ta
            .mint(&TokenClaims {
                service_account: "admin".into(),
                ..claims()
            })
            .unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let evil_parts: Vec<&str> = evil.split('.').collect();
        let spliced = format!("{}.{}.{}", parts[0], evil_parts[1], parts[2]);
        assert_eq!(
            reason(ta.verify(&spliced, DEFAULT_AUDIENCE)),
            Err("token_forged")
        );
    }

    #[test]
    fn an_expired_token_is_refused_as_expired() {
        let ta = TokenAuthority::ephemeral().unwrap();
        // Issued two days ago for a day: well past any clock skew allowance.
        let day = 24 * 60 * 60;
        let old = ta
            .mint_at(
                &TokenClaims {
                    ttl: Duration::from_secs(day),
                    ..claims()
                },
                unix_now() - 2 * day,
            )
            .unwrap();
        let got = ta
            .verify(&old, DEFAULT_AUDIENCE)
            .map(|_| ())
            .map_err(|e| e.reason());
        assert_eq!(got, Err("token_expired"));
    }

    #[test]
    fn the_key_persists_across_loads_and_tokens_stay_valid() {
        let dir = tempfile::tempdir().unwrap();
        let first = TokenAuthority::load_or_create(dir.path()).unwrap();
        let token = first.mint(&claims()).unwrap();
        let second = TokenAuthority::load_or_create(dir.path()).unwrap();
        assert!(second.verify(&token, DEFAULT_AUDIENCE).is_ok());
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(TOKEN_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn usernames_name_a_service_account_or_are_refused() {
        assert_eq!(
            service_account_of("system:serviceaccount:demo:web").unwrap(),
            ("demo".into(), "web".into())
        );
        for bad in [
            "admin",
            "system:serviceaccount:demo",
            "system:serviceaccount::web",
            "system:serviceaccount:a:b:c",
        ] {
            assert!(service_account_of(bad).is_err(), "{bad}");
        }
    }
}

#[cfg(test)]
mod prop_tests;
