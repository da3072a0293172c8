//! `security.istio.io` `RequestAuthentication`, validated as Istio's webhook does (plus what
//! this data plane cannot do, refused by name rather than ignored): `selector` or
//! `targetRefs`; `jwtRules` with `issuer`, `audiences`, exactly one of `jwks` (inline JSON,
//! parsed here) or `jwksUri` (`http`/`https` URL), `fromHeaders`, `fromParams`,
//! `forwardOriginalToken`, `outputPayloadToHeader`.

use std::sync::Arc;

use http::header::HeaderName;

use super::security::{target_ref, workload_selector};
use super::yaml::{FieldResult, Node};
use super::Meta;
use crate::jwt::Jwks;
use crate::model::{JwksSource, JwtHeader, JwtRule, RequestAuthentication};

/// Most `jwtRules` in one resource.
const MAX_RULES: usize = 64;

pub(super) fn request_authentication(
    obj: &Node<'_>,
    meta: Meta,
) -> FieldResult<RequestAuthentication> {
    let mut ra = RequestAuthentication {
        name: meta.name,
        namespace: meta.namespace,
        selector: None,
        target_refs: Vec::new(),
        jwt_rules: Vec::new(),
    };
    let Some(spec) = obj.get("spec")? else {
        return Ok(ra);
    };
    spec.only(&["selector", "targetRef", "targetRefs", "jwtRules"])?;
    let selector = workload_selector(&spec)?;
    if let Some(node) = spec.get("targetRef")? {
        ra.target_refs.push(target_ref(&node)?);
    }
    for node in spec.opt_items("targetRefs")? {
        ra.target_refs.push(target_ref(&node)?);
    }
    if selector.is_some() && !ra.target_refs.is_empty() {
        return Err(spec.err("only one of targetRefs or selector can be set"));
    }
    ra.selector = selector.filter(|s| !s.is_empty());
    let rules = spec.opt_items("jwtRules")?;
    if rules.len() > MAX_RULES {
        return Err(spec.err(format!("jwtRules: more than {MAX_RULES} rules")));
    }
    for node in rules {
        let rule = jwt_rule(&node)?;
        if ra.jwt_rules.iter().any(|r| r.issuer == rule.issuer) {
            return Err(node.err(format!("duplicate issuer {:?}", rule.issuer)));
        }
        ra.jwt_rules.push(rule);
    }
    Ok(ra)
}

fn jwt_rule(node: &Node<'_>) -> FieldResult<JwtRule> {
    node.only(&[
        "issuer",
        "audiences",
        "jwksUri",
        "jwks",
        "fromHeaders",
        "fromParams",
        "fromCookies",
        "outputPayloadToHeader",
        "outputClaimToHeaders",
        "forwardOriginalToken",
        "timeout",
    ])?;
    for unsupported in ["fromCookies", "outputClaimToHeaders", "timeout"] {
        if let Some(n) = node.get(unsupported)? {
            return Err(n.err("not supported by this waypoint"));
        }
    }
    let issuer_node = node.required("issuer")?;
    let issuer = issuer_node.str()?;
    if issuer.is_empty() {
        return Err(issuer_node.err("must not be empty"));
    }
    let audiences = node.opt_string_list("audiences")?;
    let jwks = match (node.get("jwks")?, node.get("jwksUri")?) {
        (Some(_), Some(uri)) => return Err(uri.err("only one of jwks or jwksUri can be set")),
        (Some(inline), None) => {
            let json = inline.str()?;
            let keys = Jwks::parse(json.as_bytes()).map_err(|e| inline.err(e.to_string()))?;
            JwksSource::Inline {
                json: json.to_string(),
                keys: Arc::new(keys),
            }
        }
        (None, Some(uri)) => JwksSource::Uri(jwks_uri(&uri)?),
        (None, None) => {
            return Err(node.err(
                "one of jwks or jwksUri is required (OpenID discovery from the issuer is not \
                 supported)",
            ))
        }
    };
    let mut from_headers = Vec::new();
    for h in node.opt_items("fromHeaders")? {
        h.only(&["name", "prefix"])?;
        let name_node = h.required("name")?;
        let name = header_name(&name_node)?;
        let prefix = h.opt_str("prefix")?.unwrap_or_default().to_string();
        from_headers.push(JwtHeader { name, prefix });
    }
    let from_params = node.opt_string_list("fromParams")?;
    for (i, p) in from_params.iter().enumerate() {
        if p.contains(['&', '=', '#', '?']) {
            let at = node.required("fromParams")?.items()?;
            return Err(at[i].err(format!("invalid query parameter name {p:?}")));
        }
    }
    let output_payload_to_header = node
        .get("outputPayloadToHeader")?
        .map(|n| header_name(&n))
        .transpose()?;
    Ok(JwtRule {
        issuer: issuer.to_string(),
        audiences,
        jwks,
        from_headers,
        from_params,
        forward_original_token: node.opt_bool("forwardOriginalToken")?.unwrap_or(false),
        output_payload_to_header,
    })
}

/// A header name we may read or set: valid, not a pseudo-header, not hop-by-hop, not one
/// the waypoint owns. Stored lowercase.
fn header_name(node: &Node<'_>) -> FieldResult<String> {
    let raw = node.str()?;
    let name = HeaderName::from_bytes(raw.as_bytes())
        .map_err(|_| node.err(format!("invalid header name {raw:?}")))?;
    let name = name.as_str();
    const RESERVED: [&str; 6] = [
        "host",
        "connection",
        "transfer-encoding",
        "content-length",
        "te",
        "upgrade",
    ];
    if RESERVED.contains(&name) {
        return Err(node.err(format!("header {name:?} cannot be used")));
    }
    Ok(name.to_string())
}

/// An absolute `http` or `https` URL with a host.
fn jwks_uri(node: &Node<'_>) -> FieldResult<String> {
    let raw = node.str()?;
    let uri: http::Uri = raw
        .parse()
        .map_err(|_| node.err(format!("invalid URL {raw:?}")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(node.err(format!("URL {raw:?} must be http or https"))),
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(node.err(format!("URL {raw:?} has no host")));
    }
    Ok(raw.to_string())
}
