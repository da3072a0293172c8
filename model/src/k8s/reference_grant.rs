//! `gateway.networking.k8s.io` `ReferenceGrant` (`v1beta1`, `v1`) → [`ReferenceGrant`],
//! validated as the CRD schema does: 1-16 `from` entries (`group`, `kind`, `namespace`, all
//! required; `group` may be `""`, the core group), 1-16 `to` entries (`group`, `kind`
//! required, `name` optional: every object of the kind). Unknown fields are refused: a
//! misspelt `name` would grant every object of the kind.

use super::route::{bounded, object_name};
use super::yaml::{FieldResult, Node};
use super::{dns_label, Meta};
use crate::model::{ReferenceGrant, ReferenceGrantFrom, ReferenceGrantTo};

/// The CRD's `maxItems` of `from` and `to`.
const MAX_ENTRIES: usize = 16;

pub(super) fn reference_grant(obj: &Node<'_>, meta: Meta) -> FieldResult<ReferenceGrant> {
    let spec = obj.required("spec")?;
    spec.only(&["from", "to"])?;
    let mut from = Vec::new();
    for node in entries(&spec, "from")? {
        node.only(&["group", "kind", "namespace"])?;
        let ns_node = node.required("namespace")?;
        let namespace = ns_node.str()?;
        if !dns_label(namespace) {
            return Err(ns_node.err(format!("invalid namespace {namespace:?}")));
        }
        from.push(ReferenceGrantFrom {
            group: group(&node)?,
            kind: kind(&node)?,
            namespace: namespace.to_string(),
        });
    }
    let mut to = Vec::new();
    for node in entries(&spec, "to")? {
        node.only(&["group", "kind", "name"])?;
        to.push(ReferenceGrantTo {
            group: group(&node)?,
            kind: kind(&node)?,
            name: node.get("name")?.map(|n| object_name(&n)).transpose()?,
        });
    }
    Ok(ReferenceGrant {
        name: meta.name,
        namespace: meta.namespace,
        from,
        to,
    })
}

/// The 1-16 items of `spec.key`.
fn entries<'a>(spec: &Node<'a>, key: &str) -> FieldResult<Vec<Node<'a>>> {
    let list = spec.required(key)?;
    let items = bounded(spec, key, MAX_ENTRIES)?;
    if items.is_empty() {
        return Err(list.err("at least one entry is required"));
    }
    Ok(items)
}

/// `group` (required; `core` read as `""`).
fn group(node: &Node<'_>) -> FieldResult<String> {
    let g = node.required("group")?.str()?;
    Ok(if g == "core" { "" } else { g }.to_string())
}

/// `kind` (required, not empty).
fn kind(node: &Node<'_>) -> FieldResult<String> {
    let n = node.required("kind")?;
    let k = n.str()?;
    if k.is_empty() {
        return Err(n.err("must not be empty"));
    }
    Ok(k.to_string())
}
