//! Request authentication at a waypoint: which `RequestAuthentication` rules apply, where
//! their tokens are, and the outcome for one request (pure; keys and time come from the
//! caller).
//!
//! Semantics, as Istio configures Envoy's `jwt_authn` for a waypoint:
//! - The rules of every RequestAuthentication whose `targetRefs` name the waypoint's
//!   `Gateway`, the destination `Service` or `ServiceEntry`, or (from the root namespace) the
//!   `istio-waypoint` `GatewayClass` apply, in model order (the attachment of AuthorizationPolicy,
//!   [`crate::policy::l7`]).
//! - Each rule looks for its token in `fromHeaders` (value after `prefix`) and `fromParams`;
//!   with neither, in `Authorization: Bearer <token>` and `?access_token=`.
//! - **No token** anywhere → [`Outcome::Anonymous`]: authentication passes and the request
//!   has no `request.auth.*` (a policy may then require `requestPrincipals`).
//! - **A token** is verified by the rules that found it whose `issuer` is the token's `iss`
//!   (any one of them may accept it). A token no such rule accepts — malformed, unknown
//!   issuer, bad signature, expired, wrong audience, keys unavailable — makes the request
//!   [`Outcome::Denied`] (401), even when another token was valid.
//! - A valid token yields [`RequestAuth`] (`iss/sub`, audiences, `azp`, claims); unless its
//!   rule says `forwardOriginalToken`, the header it came in is removed, and
//!   `outputPayloadToHeader` receives its payload.
//! - **Refused RequestAuthentications** ([`crate::model::RefusedPolicy`], API-server source)
//!   fail closed ([`refused_token`]): a request carrying a token one of them would have
//!   checked (its issuer, where it would have looked; any token when the rules cannot be
//!   read) is [`JwtError::PolicyRefused`] (401). Requests without such a token are unaffected.

use std::sync::Arc;

use http::HeaderMap;

use crate::jwt::{Jwks, JwtError, RequestAuth, Token};
use crate::model::{
    JwksSource, JwtRule, Model, NamespacedName, RefusedKind, RefusedPolicy, RefusedScope,
};
use crate::policy::l7::{attached_to, Destination};

/// Default token header and prefix (matched case-insensitively), and query parameter.
pub const DEFAULT_HEADER: &str = "authorization";
pub const DEFAULT_PREFIX: &str = "Bearer ";
pub const DEFAULT_PARAM: &str = "access_token";

/// Distinct tokens looked at in one request; a request carrying more is refused.
pub const MAX_TOKENS: usize = 4;

/// The rules a waypoint `waypoint` applies to a request for `service` (`None`: a
/// workload), in model order ([`rules_for_destination`]).
pub fn rules_for_waypoint<'a>(
    model: &'a Model,
    waypoint: &NamespacedName,
    service: Option<&NamespacedName>,
) -> Vec<&'a JwtRule> {
    rules_for_destination(model, waypoint, Destination::of_service(service))
}

/// The rules a waypoint `waypoint` applies to a request for `dest`, in model order.
pub fn rules_for_destination<'a>(
    model: &'a Model,
    waypoint: &NamespacedName,
    dest: Destination<'_>,
) -> Vec<&'a JwtRule> {
    model
        .waypoint_request_authentications(waypoint, dest)
        .flat_map(|ra| ra.jwt_rules.iter())
        .collect()
}

/// The refused RequestAuthentications a waypoint `waypoint` applies to a request for
/// `service` ([`refused_for_destination`]).
pub fn refused_for_waypoint<'a>(
    model: &'a Model,
    waypoint: &NamespacedName,
    service: Option<&NamespacedName>,
) -> Vec<&'a RefusedPolicy> {
    refused_for_destination(model, waypoint, Destination::of_service(service))
}

/// The refused RequestAuthentications a waypoint `waypoint` applies to a request for `dest`:
/// those whose `targetRefs` attach as an accepted one's would, and those whose selection
/// could not be read, for every Service and ServiceEntry of their namespace (of the mesh,
/// from the root namespace).
pub fn refused_for_destination<'a>(
    model: &'a Model,
    waypoint: &NamespacedName,
    dest: Destination<'_>,
) -> Vec<&'a RefusedPolicy> {
    model
        .refused_policies
        .iter()
        .filter(|r| r.kind == RefusedKind::RequestAuthentication)
        .filter(|r| match &r.scope {
            RefusedScope::TargetRefs(refs) => attached_to(&r.namespace, refs, waypoint, dest),
            RefusedScope::Namespace => r.covers_service(dest.key()),
            RefusedScope::Selector(_) => false,
        })
        .collect()
}

/// The denial for a request that carries a token one of `refused` would have checked: a
/// token found where a rule looks (its `fromHeaders`/`fromParams`, else the defaults)
/// whose `iss` is the rule's issuer, or any token when the issuer cannot be read or the
/// token cannot be decoded (a valid policy would have refused it too).
pub fn refused_token(
    refused: &[&RefusedPolicy],
    headers: &HeaderMap,
    query: Option<&str>,
) -> Option<Denial> {
    for policy in refused {
        for rule in &policy.tokens {
            let defaults = rule.from_headers.is_empty() && rule.from_params.is_empty();
            let mut tokens = Vec::new();
            if defaults {
                tokens.extend(header_tokens(headers, DEFAULT_HEADER, DEFAULT_PREFIX, true));
                tokens.extend(param_tokens(query, DEFAULT_PARAM));
            }
            for h in &rule.from_headers {
                tokens.extend(header_tokens(headers, &h.name, &h.prefix, false));
            }
            for p in &rule.from_params {
                tokens.extend(param_tokens(query, p));
            }
            let checked = |raw: &&str| match (&rule.issuer, Token::decode(raw)) {
                (Some(issuer), Ok(token)) => token.issuer() == Some(issuer.as_str()),
                _ => true,
            };
            if tokens.iter().any(checked) {
                return Some(Denial {
                    error: JwtError::PolicyRefused(policy.key()),
                    jwks_uri: None,
                });
            }
        }
    }
    None
}

/// The `outputPayloadToHeader` names of `rules`: a client must never set them itself.
pub fn output_headers<'r>(rules: &'r [&'r JwtRule]) -> impl Iterator<Item = &'r str> + 'r {
    rules
        .iter()
        .filter_map(|r| r.output_payload_to_header.as_deref())
}

/// The `jwksUri` a rule's keys come from, if remote.
pub fn jwks_uri(rule: &JwtRule) -> Option<&str> {
    match &rule.jwks {
        JwksSource::Uri(uri) => Some(uri),
        JwksSource::Inline { .. } => None,
    }
}

/// What authentication decided for one request.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    /// No token where any rule looks.
    Anonymous,
    Authenticated(Authenticated),
    /// 401.
    Denied(Denial),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Authenticated {
    pub auth: RequestAuth,
    /// Headers to remove before forwarding (tokens not to be forwarded), lowercase.
    pub remove_headers: Vec<String>,
    /// `(header, base64url payload)` to set before forwarding.
    pub output_headers: Vec<(String, String)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Denial {
    pub error: JwtError,
    /// The remote JWKS involved, when refreshing it might help (unknown `kid`) or it is
    /// what failed (unavailable).
    pub jwks_uri: Option<String>,
}

/// Where a token was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place<'r> {
    Header(&'r str),
    Param,
}

struct Found<'q, 'r> {
    raw: &'q str,
    /// Every (rule, place) that found this token.
    finders: Vec<(&'r JwtRule, Place<'r>)>,
}

/// Authenticates a request with `headers` and query string `query` against `rules` at
/// `now` (Unix seconds). `keys` gives a rule's current keys (`None`: not available, e.g. a
/// `jwksUri` not fetched yet — its tokens are refused, fail closed).
pub fn authenticate(
    rules: &[&JwtRule],
    headers: &HeaderMap,
    query: Option<&str>,
    now: u64,
    keys: impl Fn(&JwtRule) -> Option<Arc<Jwks>>,
) -> Outcome {
    let mut found: Vec<Found<'_, '_>> = Vec::new();
    let mut add = |raw, rule, place| {
        if let Some(f) = found.iter_mut().find(|f| f.raw == raw) {
            f.finders.push((rule, place));
            return true;
        }
        if found.len() == MAX_TOKENS {
            return false;
        }
        found.push(Found {
            raw,
            finders: vec![(rule, place)],
        });
        true
    };
    for rule in rules {
        let defaults = rule.from_headers.is_empty() && rule.from_params.is_empty();
        let mut too_many = false;
        if defaults {
            for raw in header_tokens(headers, DEFAULT_HEADER, DEFAULT_PREFIX, true) {
                too_many |= !add(raw, rule, Place::Header(DEFAULT_HEADER));
            }
            for raw in param_tokens(query, DEFAULT_PARAM) {
                too_many |= !add(raw, rule, Place::Param);
            }
        }
        for h in &rule.from_headers {
            for raw in header_tokens(headers, &h.name, &h.prefix, false) {
                too_many |= !add(raw, rule, Place::Header(&h.name));
            }
        }
        for p in &rule.from_params {
            for raw in param_tokens(query, p) {
                too_many |= !add(raw, rule, Place::Param);
            }
        }
        if too_many {
            return Outcome::Denied(Denial {
                error: JwtError::Malformed,
                jwks_uri: None,
            });
        }
    }
    if found.is_empty() {
        return Outcome::Anonymous;
    }
    let mut accepted: Option<Authenticated> = None;
    let mut remove_headers = Vec::new();
    let mut output = Vec::new();
    for f in &found {
        match verify_found(f, now, &keys) {
            Ok((auth, token, rule)) => {
                for (finder, place) in &f.finders {
                    if let Place::Header(name) = place {
                        if std::ptr::eq(*finder, rule)
                            && !rule.forward_original_token
                            && !remove_headers.iter().any(|h| h == name)
                        {
                            remove_headers.push(name.to_string());
                        }
                    }
                }
                if let Some(name) = &rule.output_payload_to_header {
                    output.push((name.clone(), token.to_string()));
                }
                accepted.get_or_insert(Authenticated {
                    auth,
                    remove_headers: Vec::new(),
                    output_headers: Vec::new(),
                });
            }
            Err(denial) => return Outcome::Denied(denial),
        }
    }
    match accepted {
        Some(mut a) => {
            a.remove_headers = remove_headers;
            a.output_headers = output;
            Outcome::Authenticated(a)
        }
        None => Outcome::Anonymous,
    }
}

/// Verifies one token with the rules that found it: the verified claims, the payload
/// segment and the rule that accepted it.
fn verify_found<'q, 'r>(
    f: &Found<'q, 'r>,
    now: u64,
    keys: &impl Fn(&JwtRule) -> Option<Arc<Jwks>>,
) -> Result<(RequestAuth, &'q str, &'r JwtRule), Denial> {
    let deny = |error, jwks_uri: Option<&str>| Denial {
        error,
        jwks_uri: jwks_uri.map(str::to_string),
    };
    let token = Token::decode(f.raw).map_err(|e| deny(e, None))?;
    let issuer = token.issuer();
    let mut first_error = None;
    let mut tried: Vec<*const JwtRule> = Vec::new();
    for (rule, _) in &f.finders {
        if Some(rule.issuer.as_str()) != issuer || tried.contains(&(*rule as *const JwtRule)) {
            continue;
        }
        tried.push(*rule);
        let uri = jwks_uri(rule);
        let result = match keys(rule) {
            None => Err(JwtError::JwksUnavailable),
            Some(k) => token.verify(&k, &rule.issuer, &rule.audiences, now),
        };
        match result {
            Ok(auth) => return Ok((auth, token.payload_b64(), rule)),
            Err(e) => {
                first_error.get_or_insert_with(|| {
                    let refresh = matches!(e, JwtError::UnknownKid | JwtError::JwksUnavailable);
                    deny(e, uri.filter(|_| refresh))
                });
            }
        }
    }
    Err(first_error.unwrap_or_else(|| deny(JwtError::UnknownIssuer, None)))
}

/// The tokens in the values of header `name` that start with `prefix`.
fn header_tokens<'h>(
    headers: &'h HeaderMap,
    name: &str,
    prefix: &str,
    ignore_case: bool,
) -> Vec<&'h str> {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter_map(|v| {
            let head = v.get(..prefix.len())?;
            let matches = if ignore_case {
                head.eq_ignore_ascii_case(prefix)
            } else {
                head == prefix
            };
            matches.then(|| v[prefix.len()..].trim())
        })
        .filter(|t| !t.is_empty())
        .collect()
}

/// The values of query parameter `name` (tokens are base64url and dots: no decoding).
fn param_tokens<'q>(query: Option<&'q str>, name: &str) -> Vec<&'q str> {
    query
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .filter(|(k, v)| *k == name && !v.is_empty())
        .map(|(_, v)| v)
        .collect()
}
