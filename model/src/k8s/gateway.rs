//! `gateway.networking.k8s.io` `Gateway`: its class, `istio.io/waypoint-for`, its addresses
//! and its listeners.
//!
//! The listeners of an ingress gateway (class `istio`) are validated as the Gateway API's CRD
//! schema and CEL rules validate them, and strictly (unknown fields refused): 1-64 listeners,
//! names unique, no two with the same port, protocol and hostname; `tls` required for
//! `HTTPS` and `TLS` and refused for `HTTP` and `TCP`, mode `Terminate` only for `HTTPS`,
//! at least one `certificateRefs` entry with `Terminate`, each a core `Secret` (another kind
//! is refused rather than reported later: nothing here could read it); no hostname for
//! `TCP`; `allowedRoutes.namespaces.from` one of `Same`, `All`, `Selector`, the last with a
//! `selector` (`matchLabels` only: `matchExpressions` is refused rather than ignored, as
//! ignoring it would admit more namespaces than written). TLS `options` and
//! `frontendValidation` are refused: ignoring them would serve TLS other than asked. A
//! protocol other than `HTTP`, `HTTPS`, `TLS`, `TCP` is kept, for status to call unsupported.
//! Its `spec.addresses` likewise: at most 16, an `IPAddress` an IP, a `Hostname` a DNS
//! name, neither twice; another type kept for status (`UnsupportedAddress`).
//!
//! Listeners of other classes (waypoints: `HBONE` on 15008) are read leniently, as before
//! they were not read at all: a listener that does not read is left out, never refused.
//! The other fields of the Gateway API are for other consumers and are not validated here.

use std::net::IpAddr;

use super::route::{bounded, hostname as parse_hostname, namespace, object_name};
use super::yaml::{FieldError, FieldResult, Node};
use super::Meta;
use crate::model::{
    AllowedRoutes, Gateway, HostAddress, Listener, ListenerProtocol, ListenerTls, ListenerTlsMode,
    RequestedAddress, RouteNamespaces, SecretRef, WaypointFor, GATEWAY_API_GROUP,
    INGRESS_GATEWAY_CLASS, MAX_GATEWAY_ADDRESSES, WAYPOINT_FOR_LABEL,
};

/// Most listeners in one Gateway (the Gateway API's `maxItems`).
const MAX_LISTENERS: usize = 64;
/// Most `certificateRefs` of one listener.
const MAX_CERTIFICATE_REFS: usize = 64;
/// Most `allowedRoutes.kinds` of one listener.
const MAX_ROUTE_KINDS: usize = 8;
/// Longest `protocol` value.
const MAX_PROTOCOL_LEN: usize = 255;

/// `addresses[].type` naming an IP address (the default when the type is left out).
const IP_ADDRESS_TYPE: &str = "IPAddress";
/// `addresses[].type` naming a DNS name.
const HOSTNAME_TYPE: &str = "Hostname";
/// Longest `addresses[].type` and `addresses[].value`.
const MAX_ADDRESS_LEN: usize = 253;

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
    let (listeners, requested_addresses) = if class == INGRESS_GATEWAY_CLASS {
        (
            strict_listeners(&spec, &meta.namespace)?,
            requested_addresses(&spec)?,
        )
    } else {
        (lenient_listeners(&spec, &meta.namespace), Vec::new())
    };
    // Set by the API server (an integer from 1); a file may leave it out. Read leniently,
    // as metadata the mesh only reports back: anything else is no generation.
    let generation = obj
        .get("metadata")?
        .and_then(|m| m.get("generation").ok().flatten())
        .and_then(|g| g.value().as_i64())
        .filter(|g| *g >= 0);
    Ok(Gateway {
        name: meta.name,
        namespace: meta.namespace,
        class: class.to_string(),
        labels: meta.labels,
        waypoint_for,
        addresses,
        requested_addresses,
        generation,
        listeners,
    })
}

/// An ingress Gateway's `spec.addresses`, validated as the CRD validates them: at most
/// [`MAX_GATEWAY_ADDRESSES`]; `type` (default `IPAddress`) and `value` 1-253 characters; an
/// `IPAddress` value an IP, a `Hostname` value a DNS name; no `IPAddress` or `Hostname`
/// value twice. Another type is kept as written, for status to call unsupported.
fn requested_addresses(spec: &Node<'_>) -> FieldResult<Vec<RequestedAddress>> {
    let mut out: Vec<RequestedAddress> = Vec::new();
    for item in bounded(spec, "addresses", MAX_GATEWAY_ADDRESSES)? {
        item.only(&["type", "value"])?;
        let type_ = match item.get("type")? {
            Some(node) => {
                let t = node.str()?;
                if t.is_empty() || t.len() > MAX_ADDRESS_LEN {
                    return Err(node.err(format!("must be 1-{MAX_ADDRESS_LEN} characters")));
                }
                t
            }
            None => IP_ADDRESS_TYPE,
        };
        let value_node = item.required("value")?;
        let value = value_node.str()?;
        if value.is_empty() || value.len() > MAX_ADDRESS_LEN {
            return Err(value_node.err(format!("must be 1-{MAX_ADDRESS_LEN} characters")));
        }
        let address = match type_ {
            IP_ADDRESS_TYPE => RequestedAddress::Host(HostAddress::Ip(value_node.ip()?)),
            HOSTNAME_TYPE => {
                RequestedAddress::Host(HostAddress::Hostname(parse_hostname(&value_node, false)?))
            }
            other => RequestedAddress::Unsupported {
                type_: other.to_string(),
                value: value.to_string(),
            },
        };
        if matches!(address, RequestedAddress::Host(_)) && out.contains(&address) {
            return Err(value_node.err(format!("{type_} {value:?} listed twice")));
        }
        out.push(address);
    }
    Ok(out)
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

/// An ingress gateway's listeners, validated (see the module docs).
fn strict_listeners(spec: &Node<'_>, gateway_ns: &str) -> FieldResult<Vec<Listener>> {
    let list = spec.required("listeners")?;
    let items = bounded(spec, "listeners", MAX_LISTENERS)?;
    if items.is_empty() {
        return Err(list.err("at least one listener is required"));
    }
    let mut out: Vec<Listener> = Vec::with_capacity(items.len());
    for node in items {
        let l = listener(&node, gateway_ns, true)?;
        if out.iter().any(|o| o.name == l.name) {
            let name = node.required("name")?;
            return Err(name.err(format!("listener name {:?} used twice", l.name)));
        }
        if let Some(o) = out
            .iter()
            .find(|o| o.port == l.port && o.protocol == l.protocol && o.hostname == l.hostname)
        {
            return Err(node.err(format!(
                "port, protocol and hostname already used by listener {:?}",
                o.name
            )));
        }
        out.push(l);
    }
    Ok(out)
}

/// Another class's listeners: those that read (see the module docs).
fn lenient_listeners(spec: &Node<'_>, gateway_ns: &str) -> Vec<Listener> {
    let items = spec
        .get("listeners")
        .ok()
        .flatten()
        .and_then(|n| n.items().ok())
        .unwrap_or_default();
    items
        .iter()
        .take(MAX_LISTENERS)
        .filter_map(|node| listener(node, gateway_ns, false).ok())
        .collect()
}

/// One `listeners` entry; `strict` for an ingress gateway.
fn listener(node: &Node<'_>, gateway_ns: &str, strict: bool) -> FieldResult<Listener> {
    if strict {
        node.only(&[
            "name",
            "hostname",
            "port",
            "protocol",
            "tls",
            "allowedRoutes",
        ])?;
    }
    let name = object_name(&node.required("name")?)?;
    let port = node.required("port")?.port()?;
    let protocol_node = node.required("protocol")?;
    let written = protocol_node.str()?;
    if written.is_empty() || written.len() > MAX_PROTOCOL_LEN {
        return Err(protocol_node.err(format!("must be 1-{MAX_PROTOCOL_LEN} characters")));
    }
    let protocol = ListenerProtocol::parse(written);
    let hostname_node = node.get("hostname")?;
    let hostname = hostname_node
        .as_ref()
        .map(|n| parse_hostname(n, true))
        .transpose()?;
    let tls_node = node.get("tls")?;
    let tls = tls_node
        .as_ref()
        .map(|n| listener_tls(n, gateway_ns, strict))
        .transpose()?;
    let allowed_routes = match node.get("allowedRoutes")? {
        Some(n) => allowed_routes(&n, strict)?,
        None => AllowedRoutes::default(),
    };
    if strict {
        let no_tls =
            matches!(protocol, ListenerProtocol::Http | ListenerProtocol::Tcp) || written == "UDP";
        match (&tls_node, &tls) {
            (Some(n), Some(_)) if no_tls => {
                return Err(n.err(format!("must not be specified for protocol {written}")));
            }
            (None, _) if matches!(protocol, ListenerProtocol::Https | ListenerProtocol::Tls) => {
                return Err(required_because(
                    node,
                    "tls",
                    &format!("required for protocol {written}"),
                ));
            }
            (Some(n), Some(t)) => tls_fits(n, t, &protocol)?,
            _ => {}
        }
        if let Some(n) = &hostname_node {
            if protocol == ListenerProtocol::Tcp || written == "UDP" {
                return Err(n.err(format!("must not be specified for protocol {written}")));
            }
        }
    }
    Ok(Listener {
        name,
        hostname,
        port,
        protocol,
        tls,
        allowed_routes,
    })
}

/// The error `node.required(key)` gives, with `reason` instead of `required`.
fn required_because(node: &Node<'_>, key: &str, reason: &str) -> FieldError {
    match node.required(key) {
        Ok(n) => n.err(reason),
        Err(mut e) => {
            e.reason = reason.to_string();
            e
        }
    }
}

/// The CEL rules tying `tls` to the protocol: `Terminate` only for `HTTPS`, certificates
/// with `Terminate`.
fn tls_fits(node: &Node<'_>, tls: &ListenerTls, protocol: &ListenerProtocol) -> FieldResult<()> {
    if *protocol == ListenerProtocol::Https && tls.mode != ListenerTlsMode::Terminate {
        let mode = node.required("mode")?;
        return Err(mode.err("must be Terminate for protocol HTTPS"));
    }
    if tls.mode == ListenerTlsMode::Terminate && tls.certificate_refs.is_empty() {
        return Err(match node.get("certificateRefs")? {
            Some(n) => n.err("at least one is required with mode Terminate"),
            None => required_because(
                node,
                "certificateRefs",
                "at least one is required with mode Terminate",
            ),
        });
    }
    Ok(())
}

/// A listener's `tls`.
fn listener_tls(node: &Node<'_>, gateway_ns: &str, strict: bool) -> FieldResult<ListenerTls> {
    if strict {
        for unsupported in ["options", "frontendValidation"] {
            if let Some(n) = node.get(unsupported)? {
                return Err(n.err("not supported"));
            }
        }
        node.only(&["mode", "certificateRefs"])?;
    }
    let mode = match node.get("mode")? {
        None => ListenerTlsMode::Terminate,
        Some(n) => match n.str()? {
            "Terminate" => ListenerTlsMode::Terminate,
            "Passthrough" => ListenerTlsMode::Passthrough,
            other => {
                return Err(n.err(format!(
                    "unknown TLS mode {other:?} (expected Terminate or Passthrough)"
                )))
            }
        },
    };
    let mut certificate_refs = Vec::new();
    for r in bounded(node, "certificateRefs", MAX_CERTIFICATE_REFS)? {
        if strict {
            r.only(&["group", "kind", "name", "namespace"])?;
        }
        let group = r.opt_str("group")?.unwrap_or("");
        let kind = r.opt_str("kind")?.unwrap_or("Secret");
        if !matches!(group, "" | "core") || kind != "Secret" {
            return Err(r.err(format!(
                "unsupported certificate reference {group:?}/{kind} (expected a core Secret)"
            )));
        }
        certificate_refs.push(SecretRef {
            namespace: namespace(&r, gateway_ns)?,
            name: object_name(&r.required("name")?)?,
        });
    }
    Ok(ListenerTls {
        mode,
        certificate_refs,
    })
}

/// A listener's `allowedRoutes`.
fn allowed_routes(node: &Node<'_>, strict: bool) -> FieldResult<AllowedRoutes> {
    if strict {
        node.only(&["namespaces", "kinds"])?;
    }
    let from = match node.get("namespaces")? {
        None => RouteNamespaces::Same,
        Some(ns) => {
            if strict {
                ns.only(&["from", "selector"])?;
            }
            match ns.get("from")? {
                None => RouteNamespaces::Same,
                Some(from) => match from.str()? {
                    "Same" => RouteNamespaces::Same,
                    "All" => RouteNamespaces::All,
                    "Selector" => {
                        let Some(selector) = ns.get("selector")? else {
                            return Err(required_because(
                                &ns,
                                "selector",
                                "required with from: Selector",
                            ));
                        };
                        selector.only(&["matchLabels", "matchExpressions"])?;
                        if let Some(e) = selector.get("matchExpressions")? {
                            if !e.items()?.is_empty() {
                                return Err(e.err("not supported (use matchLabels)"));
                            }
                        }
                        RouteNamespaces::Selector(selector.opt_string_map("matchLabels")?)
                    }
                    other => {
                        return Err(from.err(format!(
                            "unknown value {other:?} (expected Same, All or Selector)"
                        )))
                    }
                },
            }
        }
    };
    let mut kinds = Vec::new();
    for k in bounded(node, "kinds", MAX_ROUTE_KINDS)? {
        if strict {
            k.only(&["group", "kind"])?;
        }
        let kind_node = k.required("kind")?;
        let kind = kind_node.str()?;
        if kind.is_empty() {
            return Err(kind_node.err("must not be empty"));
        }
        let group = k.opt_str("group")?.unwrap_or(GATEWAY_API_GROUP);
        kinds.push(if group == GATEWAY_API_GROUP {
            kind.to_string()
        } else {
            format!("{group}/{kind}")
        });
    }
    Ok(AllowedRoutes { from, kinds })
}
