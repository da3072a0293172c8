//! `security.istio.io` kinds: PeerAuthentication and AuthorizationPolicy, validated the way
//! Istio's admission webhook validates them, so a file that `kubectl apply` would refuse in
//! a cluster is refused here too.

use super::yaml::{parse_port, FieldError, FieldResult, Node};
use super::{dns_label, dns_subdomain, Meta, DRY_RUN_ANNOTATION};
use crate::model::{
    parse_ip_or_cidr, Action, AuthorizationPolicy, Condition, Labels, Operation,
    PeerAuthentication, PeerAuthnMode, Rule, Source, TargetRef,
};

// === PeerAuthentication ===

pub(super) fn peer_authentication(obj: &Node<'_>, meta: Meta) -> FieldResult<PeerAuthentication> {
    let mut selector = None;
    let mut mode = PeerAuthnMode::Unset;
    let mut port_levels = std::collections::BTreeMap::new();
    if let Some(spec) = obj.get("spec")? {
        spec.only(&["selector", "mtls", "portLevelMtls"])?;
        // An empty `matchLabels` is a namespace-wide policy for Istio too.
        selector = workload_selector(&spec)?.filter(|s| !s.is_empty());
        if let Some(mtls) = spec.get("mtls")? {
            mode = mtls_mode(&mtls)?;
        }
        if let Some(levels) = spec.get("portLevelMtls")? {
            if selector.is_none() {
                return Err(
                    levels.err("mesh/namespace peer authentication cannot have port level mTLS")
                );
            }
            let entries = levels.port_entries()?;
            if entries.is_empty() {
                return Err(
                    levels.err("port level mTLS, if defined, must have at least one element")
                );
            }
            for (port, node) in entries {
                port_levels.insert(port, mtls_mode(&node)?);
            }
        }
    }
    Ok(PeerAuthentication {
        name: meta.name,
        namespace: meta.namespace,
        selector,
        mode,
        port_levels,
    })
}

fn mtls_mode(mtls: &Node<'_>) -> FieldResult<PeerAuthnMode> {
    mtls.only(&["mode"])?;
    let Some(node) = mtls.get("mode")? else {
        return Ok(PeerAuthnMode::Unset);
    };
    match node.str()? {
        "UNSET" => Ok(PeerAuthnMode::Unset),
        "STRICT" => Ok(PeerAuthnMode::Strict),
        "PERMISSIVE" => Ok(PeerAuthnMode::Permissive),
        "DISABLE" => Ok(PeerAuthnMode::Disable),
        other => Err(node.err(format!(
            "unknown mtls mode {other:?} (expected UNSET, STRICT, PERMISSIVE or DISABLE)"
        ))),
    }
}

/// `spec.selector.matchLabels`; `Some` (possibly empty) when `selector` is present.
pub(super) fn workload_selector(spec: &Node<'_>) -> FieldResult<Option<Labels>> {
    let Some(selector) = spec.get("selector")? else {
        return Ok(None);
    };
    selector.only(&["matchLabels"])?;
    let labels = selector.opt_string_map("matchLabels")?;
    for (k, v) in &labels {
        if k.is_empty() || k.contains('*') || v.contains('*') {
            return Err(selector.err(format!(
                "invalid selector label {k}={v}: empty key or wildcard"
            )));
        }
    }
    Ok(Some(labels))
}

// === AuthorizationPolicy ===

pub(super) fn authorization_policy(obj: &Node<'_>, meta: Meta) -> FieldResult<AuthorizationPolicy> {
    let dry_run = match meta.annotations.get(DRY_RUN_ANNOTATION) {
        None => false,
        Some(v) => parse_go_bool(v).ok_or_else(|| FieldError {
            field: format!("metadata.annotations.{DRY_RUN_ANNOTATION}"),
            reason: format!("invalid boolean {v:?}"),
        })?,
    };
    let mut policy = AuthorizationPolicy {
        name: meta.name,
        namespace: meta.namespace,
        selector: None,
        target_refs: Vec::new(),
        action: Action::Allow,
        rules: Vec::new(),
        dry_run,
    };
    let Some(spec) = obj.get("spec")? else {
        // `spec: {}` or no spec at all: an ALLOW that matches nothing, i.e. deny all.
        return Ok(policy);
    };
    spec.only(&[
        "selector",
        "targetRef",
        "targetRefs",
        "action",
        "provider",
        "rules",
    ])?;

    let selector = workload_selector(&spec)?;
    if let Some(node) = spec.get("targetRef")? {
        policy.target_refs.push(target_ref(&node)?);
    }
    for node in spec.opt_items("targetRefs")? {
        policy.target_refs.push(target_ref(&node)?);
    }
    if selector.is_some() && !policy.target_refs.is_empty() {
        return Err(spec.err("only one of targetRefs or selector can be set"));
    }
    // An empty `matchLabels` selects every workload in scope, which is what no selector
    // means, so both are stored as `None`.
    policy.selector = selector.filter(|s| !s.is_empty());

    if let Some(node) = spec.get("action")? {
        policy.action = match node.str()? {
            "ALLOW" => Action::Allow,
            "DENY" => Action::Deny,
            "AUDIT" => Action::Audit,
            "CUSTOM" => Action::Custom,
            other => {
                return Err(node.err(format!(
                    "unknown action {other:?} (expected ALLOW, DENY, AUDIT or CUSTOM)"
                )))
            }
        };
    }

    let rules = spec.get("rules")?;
    match (policy.action, spec.get("provider")?) {
        (Action::Custom, provider) => {
            if rules.is_none() {
                return Err(spec.err(
                    "CUSTOM action without `rules` is meaningless as it will never be triggered",
                ));
            }
            let name = match &provider {
                Some(p) => {
                    p.only(&["name"])?;
                    p.opt_str("name")?
                }
                None => None,
            };
            if name.unwrap_or_default().is_empty() {
                return Err(spec.err("provider.name: must not be empty with CUSTOM action"));
            }
        }
        (_, Some(provider)) => {
            return Err(provider.err("must not be set with a non-CUSTOM action"));
        }
        (_, None) => {}
    }

    let rule_nodes = match &rules {
        Some(node) => node.items()?,
        None => Vec::new(),
    };
    if policy.action == Action::Deny && rule_nodes.is_empty() {
        return Err(spec.err(
            "DENY action without `rules` is meaningless as it will never be triggered; \
             add an empty rule `{}` to deny every request",
        ));
    }
    for node in rule_nodes {
        policy.rules.push(rule(&node, &policy.namespace)?);
    }
    Ok(policy)
}

/// Go's `strconv.ParseBool`, which Istio uses for the dry-run annotation.
pub(super) fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

pub(super) fn target_ref(node: &Node<'_>) -> FieldResult<TargetRef> {
    node.only(&["group", "kind", "name", "namespace"])?;
    if node.get("namespace")?.is_some() {
        return Err(node.err(
            "targetRef namespace must not be set; cross namespace referencing is not supported",
        ));
    }
    let kind = node.required("kind")?.str()?;
    let name_node = node.required("name")?;
    let name = name_node.str()?;
    if name.is_empty() {
        return Err(name_node.err("must not be empty"));
    }
    Ok(TargetRef {
        group: node.opt_str("group")?.unwrap_or_default().to_string(),
        kind: kind.to_string(),
        name: name.to_string(),
    })
}

fn rule(node: &Node<'_>, policy_namespace: &str) -> FieldResult<Rule> {
    node.only(&["from", "to", "when"])?;
    let mut rule = Rule::default();
    if let Some(from) = node.get("from")? {
        let items = from.items()?;
        if items.is_empty() {
            return Err(from.err("must not be empty"));
        }
        for item in items {
            item.only(&["source"])?;
            rule.from
                .push(source(&item.required("source")?, policy_namespace)?);
        }
    }
    if let Some(to) = node.get("to")? {
        let items = to.items()?;
        if items.is_empty() {
            return Err(to.err("must not be empty"));
        }
        for item in items {
            item.only(&["operation"])?;
            rule.to.push(operation(&item.required("operation")?)?);
        }
    }
    for item in node.opt_items("when")? {
        rule.when.push(condition(&item)?);
    }
    Ok(rule)
}

fn source(node: &Node<'_>, policy_namespace: &str) -> FieldResult<Source> {
    node.only(&[
        "principals",
        "notPrincipals",
        "requestPrincipals",
        "notRequestPrincipals",
        "namespaces",
        "notNamespaces",
        "ipBlocks",
        "notIpBlocks",
        "remoteIpBlocks",
        "notRemoteIpBlocks",
        "serviceAccounts",
        "notServiceAccounts",
    ])?;
    let ip_blocks = |key: &str| -> FieldResult<_> {
        Ok(node
            .get(key)?
            .map(|n| n.ip_block_list())
            .transpose()?
            .unwrap_or_default())
    };
    let service_accounts = |key: &str| -> FieldResult<Vec<String>> {
        let Some(list) = node.get(key)? else {
            return Ok(Vec::new());
        };
        let items = list.items()?;
        if items.len() > 16 {
            return Err(list.err("may not have more than 16 values"));
        }
        items
            .iter()
            .map(|item| service_account(item, policy_namespace))
            .collect()
    };
    // Principals and namespaces stay literal: `spiffe://...` or regex metacharacters are
    // plain characters to Istio, they just never match anything.
    let src = Source {
        principals: node.opt_string_list("principals")?,
        not_principals: node.opt_string_list("notPrincipals")?,
        request_principals: node.opt_string_list("requestPrincipals")?,
        not_request_principals: node.opt_string_list("notRequestPrincipals")?,
        namespaces: node.opt_string_list("namespaces")?,
        not_namespaces: node.opt_string_list("notNamespaces")?,
        ip_blocks: ip_blocks("ipBlocks")?,
        not_ip_blocks: ip_blocks("notIpBlocks")?,
        remote_ip_blocks: ip_blocks("remoteIpBlocks")?,
        not_remote_ip_blocks: ip_blocks("notRemoteIpBlocks")?,
        service_accounts: service_accounts("serviceAccounts")?,
        not_service_accounts: service_accounts("notServiceAccounts")?,
    };
    let identity_fields = src.principals.len()
        + src.not_principals.len()
        + src.namespaces.len()
        + src.not_namespaces.len();
    if identity_fields > 0 && src.service_accounts.len() + src.not_service_accounts.len() > 0 {
        return Err(node.err("cannot set serviceAccounts with namespaces or principals"));
    }
    if src == Source::default() {
        return Err(node.err("must not be empty"));
    }
    Ok(src)
}

/// `serviceAccounts` entry: `name` (in the policy's namespace) or `namespace/name`;
/// stored as `namespace/name`.
fn service_account(node: &Node<'_>, policy_namespace: &str) -> FieldResult<String> {
    let value = node.str()?;
    let (ns, sa) = value.split_once('/').unwrap_or((policy_namespace, value));
    if value.contains('*') || !dns_label(ns) || !dns_subdomain(sa) {
        return Err(node.err(format!(
            "invalid service account {value:?} (expected 'name' or 'namespace/name', no wildcards)"
        )));
    }
    Ok(format!("{ns}/{sa}"))
}

fn operation(node: &Node<'_>) -> FieldResult<Operation> {
    node.only(&[
        "hosts",
        "notHosts",
        "ports",
        "notPorts",
        "methods",
        "notMethods",
        "paths",
        "notPaths",
    ])?;
    let ports = |key: &str| -> FieldResult<Vec<u16>> {
        Ok(node
            .get(key)?
            .map(|n| n.port_list())
            .transpose()?
            .unwrap_or_default())
    };
    let op = Operation {
        hosts: node.opt_string_list("hosts")?,
        not_hosts: node.opt_string_list("notHosts")?,
        ports: ports("ports")?,
        not_ports: ports("notPorts")?,
        methods: node.opt_string_list("methods")?,
        not_methods: node.opt_string_list("notMethods")?,
        paths: node.opt_string_list("paths")?,
        not_paths: node.opt_string_list("notPaths")?,
    };
    if op == Operation::default() {
        return Err(node.err("must not be empty"));
    }
    Ok(op)
}

fn condition(node: &Node<'_>) -> FieldResult<Condition> {
    node.only(&["key", "values", "notValues"])?;
    let key_node = node.required("key")?;
    let key = key_node.str()?;
    if key.is_empty() {
        return Err(key_node.err("must not be empty"));
    }
    let values = node.opt_string_list("values")?;
    let not_values = node.opt_string_list("notValues")?;
    if values.is_empty() && not_values.is_empty() {
        return Err(node.err(format!(
            "at least one of values or notValues must be set for key {key}"
        )));
    }
    for (field, list) in [("values", &values), ("notValues", &not_values)] {
        if let Err(reason) = validate_attribute(key, list) {
            let at = node.get(field)?.unwrap_or_else(|| key_node.clone());
            return Err(at.err(reason));
        }
    }
    Ok(Condition {
        key: key.to_string(),
        values,
        not_values,
    })
}

/// The `when` keys Istio knows, with the value checks its validation applies.
fn validate_attribute(key: &str, values: &[String]) -> Result<(), String> {
    let map_key = |prefix: &str| {
        let rest = &key[prefix.len()..];
        let ok = rest.len() > 2 && rest.starts_with('[') && rest.ends_with(']');
        if ok {
            Ok(())
        } else {
            Err(format!(
                "bad key {key:?}: should have the form {prefix}[name]"
            ))
        }
    };
    match key {
        "source.ip" | "remote.ip" | "destination.ip" => {
            for v in values {
                if parse_ip_or_cidr(v).is_none() {
                    return Err(format!("invalid IP address or CIDR {v:?}"));
                }
            }
            Ok(())
        }
        "destination.port" => {
            for v in values {
                parse_port(v)?;
            }
            Ok(())
        }
        "source.namespace"
        | "source.principal"
        | "request.auth.principal"
        | "request.auth.audiences"
        | "request.auth.presenter"
        | "connection.sni" => Ok(()),
        "source.serviceAccount" => {
            for v in values {
                let (ns, sa) = v.split_once('/').unwrap_or(("default", v));
                if v.contains('*') || !dns_label(ns) || !dns_subdomain(sa) {
                    return Err(format!("invalid service account {v:?}"));
                }
            }
            Ok(())
        }
        "destination.namespace" => Err(format!(
            "attribute {key} is replaced by the metadata.namespace"
        )),
        "destination.name" | "destination.user" => Err(format!(
            "deprecated attribute {key}: only supported in v1alpha1"
        )),
        _ if key.starts_with("destination.labels") => Err(format!(
            "attribute {key} is replaced by the workload selector"
        )),
        _ if key.starts_with("request.headers") => map_key("request.headers"),
        _ if key.starts_with("request.experimental.inline.headers") => {
            map_key("request.experimental.inline.headers")
        }
        _ if key.starts_with("request.auth.claims") => map_key("request.auth.claims"),
        _ if key.starts_with("experimental.envoy.filters.") => {
            if key.contains('[') && key.ends_with(']') {
                Ok(())
            } else {
                Err(format!("bad key {key:?}: should have the form a[b]"))
            }
        }
        _ => Err(format!("unknown attribute {key:?}")),
    }
}
