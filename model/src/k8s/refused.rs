//! What a refused AuthorizationPolicy or RequestAuthentication would have selected, read as
//! leniently as possible so that it can fail closed ([`crate::model::RefusedPolicy`]).
//!
//! Everything here reads; nothing rejects. A part that cannot be read widens the result:
//! an unreadable `action` is a DENY, an unreadable selection the whole namespace, an
//! unreadable `jwtRules` any bearer token.

use serde_yaml::Value;

use super::security::{parse_go_bool, target_ref, workload_selector};
use super::yaml::Node;
use super::DRY_RUN_ANNOTATION;
use crate::model::{
    deny_all, Action, JwtHeader, RefusedJwtRule, RefusedKind, RefusedPolicy, RefusedScope,
};

/// The fail-closed entry for an object of kind `kind` (as the API names it) refused as
/// `namespace/name` because of `reason`, from its document `text` (YAML). `None` for kinds
/// that do not fail closed (everything but AuthorizationPolicy and RequestAuthentication).
pub fn refused_policy(
    kind: &str,
    namespace: &str,
    name: &str,
    text: &str,
    reason: &str,
) -> Option<RefusedPolicy> {
    let kind = match kind {
        "AuthorizationPolicy" => RefusedKind::AuthorizationPolicy,
        "RequestAuthentication" => RefusedKind::RequestAuthentication,
        _ => return None,
    };
    let value: Value = serde_yaml::from_str(text).unwrap_or(Value::Null);
    let root = Node::root(&value);
    // `Err`: the spec is not a mapping (or the document is not one); `Ok(None)`: no spec.
    let spec = root.get("spec").and_then(|s| {
        if let Some(s) = &s {
            s.get("selector")?;
        }
        Ok(s)
    });
    let scope = match &spec {
        Err(_) => RefusedScope::Namespace,
        Ok(None) => RefusedScope::Selector(None),
        Ok(Some(spec)) => scope(spec),
    };
    let mut refused = RefusedPolicy {
        kind,
        namespace: namespace.to_string(),
        name: name.to_string(),
        reason: reason.to_string(),
        scope,
        deny: None,
        tokens: Vec::new(),
    };
    match kind {
        RefusedKind::AuthorizationPolicy => {
            let action = match &spec {
                Err(_) => None,
                Ok(None) => Some("ALLOW"),
                Ok(Some(spec)) => match spec.get("action") {
                    Ok(None) => Some("ALLOW"),
                    Ok(Some(a)) => a.str().ok(),
                    Err(_) => None,
                },
            };
            // AUDIT never decides; every other action (or none readable) closes. CUSTOM
            // stays CUSTOM, so it is enforced where an accepted one is: by the waypoint
            // (which denies a CUSTOM it matches), not by the node agent (which ignores it).
            if action != Some("AUDIT") {
                let mut deny = deny_all(namespace, name, &refused.scope, dry_run(&root));
                if action == Some("CUSTOM") {
                    deny.action = Action::Custom;
                }
                refused.deny = Some(deny);
            }
        }
        RefusedKind::RequestAuthentication => {
            refused.tokens = match &spec {
                Err(_) => vec![any_token()],
                Ok(None) => Vec::new(),
                Ok(Some(spec)) => match spec.get("jwtRules").and_then(|r| match r {
                    None => Ok(Vec::new()),
                    Some(r) => r.items(),
                }) {
                    Ok(rules) => rules.iter().map(jwt_rule).collect(),
                    Err(_) => vec![any_token()],
                },
            };
        }
    }
    Some(refused)
}

/// `selector` or `targetRefs`/`targetRef`; the namespace when either cannot be read or both
/// are set.
fn scope(spec: &Node<'_>) -> RefusedScope {
    let Ok(selector) = workload_selector(spec) else {
        return RefusedScope::Namespace;
    };
    let mut refs = Vec::new();
    let single = match spec.get("targetRef") {
        Ok(node) => node,
        Err(_) => return RefusedScope::Namespace,
    };
    let Ok(many) = spec.opt_items("targetRefs") else {
        return RefusedScope::Namespace;
    };
    for node in single.into_iter().chain(many) {
        match target_ref(&node) {
            Ok(t) => refs.push(t),
            Err(_) => return RefusedScope::Namespace,
        }
    }
    match (selector, refs.is_empty()) {
        (None, false) => RefusedScope::TargetRefs(refs),
        (selector, true) => RefusedScope::Selector(selector.filter(|s| !s.is_empty())),
        (Some(_), false) => RefusedScope::Namespace,
    }
}

/// The dry-run annotation, when it can be read as true.
fn dry_run(root: &Node<'_>) -> bool {
    let annotations = root
        .get("metadata")
        .ok()
        .flatten()
        .and_then(|m| m.opt_string_map("annotations").ok());
    annotations
        .and_then(|a| a.get(DRY_RUN_ANNOTATION).and_then(|v| parse_go_bool(v)))
        .unwrap_or(false)
}

fn any_token() -> RefusedJwtRule {
    RefusedJwtRule {
        issuer: None,
        from_headers: Vec::new(),
        from_params: Vec::new(),
    }
}

/// One `jwtRules` entry: its issuer and token locations where readable.
fn jwt_rule(node: &Node<'_>) -> RefusedJwtRule {
    let issuer = node
        .get("issuer")
        .ok()
        .flatten()
        .and_then(|n| n.str().ok())
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let from_headers = node
        .opt_items("fromHeaders")
        .ok()
        .and_then(|items| {
            items
                .iter()
                .map(|h| {
                    let name = h.get("name").ok()??.str().ok()?.to_ascii_lowercase();
                    let prefix = h.opt_str("prefix").ok()?.unwrap_or_default().to_string();
                    Some(JwtHeader { name, prefix })
                })
                .collect::<Option<Vec<_>>>()
        })
        .unwrap_or_default();
    let from_params = node.opt_string_list("fromParams").unwrap_or_default();
    RefusedJwtRule {
        issuer,
        from_headers,
        from_params,
    }
}
