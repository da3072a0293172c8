//! `telemetry.istio.io` `Telemetry` (`v1`, `v1alpha1`): `selector` or `targetRefs`
//! (Gateways only), and `accessLogging` entries (`providers[].name`, `disabled`,
//! `match.mode`). `tracing` and `metrics` are accepted and not applied (metrics are always
//! on). Refused by name rather than ignored: a `filter` (CEL expressions are not evaluated
//! here, and logging everything or nothing would both differ from what was asked), a
//! `targetRef` to anything but a Gateway (a per-Service log switch is not supported), and
//! unknown fields.

use super::security::{target_ref, workload_selector};
use super::yaml::{FieldResult, Node};
use super::Meta;
use crate::model::{AccessLogging, Telemetry, WorkloadMode};

/// Most `accessLogging` entries (and providers per entry) in one resource.
const MAX_ENTRIES: usize = 64;

pub(super) fn telemetry(obj: &Node<'_>, meta: Meta) -> FieldResult<Telemetry> {
    let mut t = Telemetry {
        name: meta.name,
        namespace: meta.namespace,
        selector: None,
        target_refs: Vec::new(),
        access_logging: Vec::new(),
    };
    let Some(spec) = obj.get("spec")? else {
        return Ok(t);
    };
    spec.only(&[
        "selector",
        "targetRef",
        "targetRefs",
        "tracing",
        "metrics",
        "accessLogging",
    ])?;
    let selector = workload_selector(&spec)?;
    let mut refs = Vec::new();
    if let Some(node) = spec.get("targetRef")? {
        refs.push(node);
    }
    refs.extend(spec.opt_items("targetRefs")?);
    for node in refs {
        let r = target_ref(&node)?;
        if r.kind != "Gateway" || r.group != "gateway.networking.k8s.io" {
            return Err(node.err(format!(
                "targetRef {}/{}: only gateway.networking.k8s.io Gateways are supported by \
                 this waypoint",
                r.group, r.kind
            )));
        }
        t.target_refs.push(r);
    }
    if selector.is_some() && !t.target_refs.is_empty() {
        return Err(spec.err("only one of targetRefs or selector can be set"));
    }
    t.selector = selector.filter(|s| !s.is_empty());
    let entries = spec.opt_items("accessLogging")?;
    if entries.len() > MAX_ENTRIES {
        return Err(spec.err(format!("accessLogging: more than {MAX_ENTRIES} entries")));
    }
    for node in entries {
        t.access_logging.push(access_logging(&node)?);
    }
    Ok(t)
}

fn access_logging(node: &Node<'_>) -> FieldResult<AccessLogging> {
    node.only(&["match", "providers", "disabled", "filter"])?;
    if let Some(filter) = node.get("filter")? {
        return Err(filter.err(
            "CEL filters are not supported by this waypoint (remove the filter to log every \
             request, or disable the entry)",
        ));
    }
    let providers_items = node.opt_items("providers")?;
    if providers_items.len() > MAX_ENTRIES {
        return Err(node.err(format!("providers: more than {MAX_ENTRIES} entries")));
    }
    let mut providers = Vec::new();
    for p in providers_items {
        p.only(&["name"])?;
        let name_node = p.required("name")?;
        let name = name_node.str()?;
        if name.is_empty() {
            return Err(name_node.err("must not be empty"));
        }
        providers.push(name.to_string());
    }
    let mode = match node.get("match")? {
        None => WorkloadMode::ClientAndServer,
        Some(m) => {
            m.only(&["mode"])?;
            match m.get("mode")? {
                None => WorkloadMode::ClientAndServer,
                Some(mode) => match mode.str()? {
                    "CLIENT_AND_SERVER" => WorkloadMode::ClientAndServer,
                    "CLIENT" => WorkloadMode::Client,
                    "SERVER" => WorkloadMode::Server,
                    other => {
                        return Err(mode.err(format!(
                            "unknown mode {other:?} (expected CLIENT_AND_SERVER, CLIENT or SERVER)"
                        )))
                    }
                },
            }
        }
    };
    Ok(AccessLogging {
        providers,
        disabled: node.opt_bool("disabled")?.unwrap_or(false),
        mode,
    })
}
