//! `gateway.networking.k8s.io` `Gateway`: only what the data plane needs of a waypoint — its
//! class, `istio.io/waypoint-for` and its addresses. Listeners, TLS and the many other fields
//! of the Gateway API are for other consumers and are not validated here.

use std::net::IpAddr;

use super::yaml::{FieldResult, Node};
use super::Meta;
use crate::model::{Gateway, WaypointFor, WAYPOINT_FOR_LABEL};

/// `addresses[].type` naming an IP address (the default when the type is left out).
const IP_ADDRESS_TYPE: &str = "IPAddress";

pub(super) fn gateway(obj: &Node<'_>, meta: Meta) -> FieldResult<Gateway> {
    let spec = obj.required("spec")?;
    let class_node = spec.required("gatewayClassName")?;
    let class = class_node.str()?;
    if class.is_empty() {
        return Err(class_node.err("must not be empty"));
    }
    let mut waypoint_for = WaypointFor::default();
    if let Some(value) = meta.labels.get(WAYPOINT_FOR_LABEL) {
        waypoint_for = WaypointFor::parse(value).ok_or_else(|| {
            let labels = obj
                .required("metadata")
                .and_then(|m| m.required("labels"))
                .and_then(|l| l.required(WAYPOINT_FOR_LABEL));
            match labels {
                Ok(node) => node.err(format!(
                    "invalid value {value:?} (expected service, workload, all or none)"
                )),
                Err(e) => e,
            }
        })?;
    }
    // The address the control plane assigned wins over the one asked for.
    let mut addresses = match obj.get("status")? {
        Some(status) => ip_addresses(&status)?,
        None => Vec::new(),
    };
    if addresses.is_empty() {
        addresses = ip_addresses(&spec)?;
    }
    Ok(Gateway {
        name: meta.name,
        namespace: meta.namespace,
        class: class.to_string(),
        labels: meta.labels,
        waypoint_for,
        addresses,
    })
}

/// The `IPAddress` entries of `node.addresses`, in order; other types (`Hostname`, named
/// addresses) are skipped.
fn ip_addresses(node: &Node<'_>) -> FieldResult<Vec<IpAddr>> {
    let mut out = Vec::new();
    for item in node.opt_items("addresses")? {
        let kind = item.opt_str("type")?.unwrap_or(IP_ADDRESS_TYPE);
        if kind == IP_ADDRESS_TYPE {
            out.push(item.required("value")?.ip()?);
        }
    }
    Ok(out)
}
