//! Core Kubernetes kinds: Pod, Service and EndpointSlice (Namespace and ServiceAccount need
//! only metadata).

use std::net::IpAddr;

use tracing::debug;

use super::route::hostname as parse_hostname;
use super::yaml::{FieldResult, Node};
use super::{dns_subdomain, Meta};
use crate::model::{
    ContainerPort, EndpointSlice, HostAddress, NamespacedName, Pod, Service, ServicePort,
    SliceEndpoint, SlicePort, TargetPort, MAX_GATEWAY_ADDRESSES,
};

const DEFAULT_SERVICE_ACCOUNT: &str = "default";

pub(super) fn pod(obj: &Node<'_>, meta: Meta) -> FieldResult<Pod> {
    let spec = obj.get("spec")?;
    let status = obj.get("status")?;

    let mut service_account = DEFAULT_SERVICE_ACCOUNT.to_string();
    let mut node_name = None;
    let mut host_network = false;
    let mut container_ports = Vec::new();
    if let Some(spec) = &spec {
        // `serviceAccount` is the deprecated spelling; Kubernetes still fills it in.
        let sa = match spec.get("serviceAccountName")? {
            Some(node) => Some(node),
            None => spec.get("serviceAccount")?,
        };
        if let Some(node) = sa {
            let name = node.str()?;
            if !dns_subdomain(name) {
                return Err(node.err(format!("invalid service account name {name:?}")));
            }
            service_account = name.to_string();
        }
        node_name = spec.opt_str("nodeName")?.map(str::to_string);
        host_network = spec.opt_bool("hostNetwork")?.unwrap_or(false);
        for container in spec.opt_items("containers")? {
            for port in container.opt_items("ports")? {
                if let Some(cp) = container_port(&port)? {
                    container_ports.push(cp);
                }
            }
        }
    }

    let mut ips = Vec::new();
    let mut ready = true;
    if let Some(status) = &status {
        ips = pod_ips(status)?;
        for condition in status.opt_items("conditions")? {
            if condition.opt_str("type")? == Some("Ready") {
                let node = condition.required("status")?;
                ready = match node.str()? {
                    "True" => true,
                    "False" | "Unknown" => false,
                    other => return Err(node.err(format!("invalid condition status {other:?}"))),
                };
            }
        }
        // A finished pod is never ready, whatever its stale conditions say.
        if matches!(status.opt_str("phase")?, Some("Succeeded" | "Failed")) {
            ready = false;
        }
    }

    Ok(Pod {
        name: meta.name,
        namespace: meta.namespace,
        uid: meta.uid,
        service_account,
        node_name,
        ips,
        labels: meta.labels,
        annotations: meta.annotations,
        host_network,
        container_ports,
        ready,
    })
}

/// A container port; `None` for non-TCP ports, which nothing in the mesh carries.
fn container_port(port: &Node<'_>) -> FieldResult<Option<ContainerPort>> {
    let number = port.required("containerPort")?.port()?;
    let name = match port.get("name")? {
        None => None,
        Some(node) => Some(port_name(&node)?),
    };
    if !is_tcp(port)? {
        return Ok(None);
    }
    Ok(Some(ContainerPort { name, port: number }))
}

/// `status.podIPs` (or the older single `status.podIP`). When both are present Kubernetes
/// guarantees `podIP == podIPs[0]`; a file that breaks that is rejected.
fn pod_ips(status: &Node<'_>) -> FieldResult<Vec<IpAddr>> {
    let single = match status.get("podIP")? {
        Some(node) if node.str()?.is_empty() => None,
        Some(node) => Some((node.ip()?, node)),
        None => None,
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    for item in status.opt_items("podIPs")? {
        let node = item.required("ip")?;
        let ip = node.ip()?;
        if ips.contains(&ip) {
            return Err(node.err(format!("duplicate IP {ip}")));
        }
        if ips.iter().any(|other| other.is_ipv4() == ip.is_ipv4()) {
            return Err(node.err("at most one IP per address family"));
        }
        ips.push(ip);
    }
    match (single, ips.first()) {
        (Some((ip, _)), None) => Ok(vec![ip]),
        (Some((ip, node)), Some(first)) if ip != *first => {
            Err(node.err(format!("{ip} does not match status.podIPs[0] {first}")))
        }
        _ => Ok(ips),
    }
}

pub(super) fn service(obj: &Node<'_>, meta: Meta) -> FieldResult<Service> {
    let mut cluster_ips = Vec::new();
    let mut ports = Vec::new();
    let mut selector = None;
    if let Some(spec) = obj.get("spec")? {
        cluster_ips = cluster_ips_of(&spec)?;
        for port in spec.opt_items("ports")? {
            if let Some(sp) = service_port(&port)? {
                ports.push(sp);
            } else {
                debug!(service = %meta.key(), field = port.path(), "skipping non-TCP service port");
            }
        }
        // Kubernetes drops an empty selector, which then means "no selector" (endpoints
        // managed elsewhere), not "every pod".
        selector = Some(spec.opt_string_map("selector")?).filter(|s| !s.is_empty());
    }
    let load_balancer_ingress = match obj.get("status")? {
        Some(status) => load_balancer_ingress(&status)?,
        None => Vec::new(),
    };
    Ok(Service {
        name: meta.name,
        namespace: meta.namespace,
        labels: meta.labels,
        cluster_ips,
        ports,
        selector,
        load_balancer_ingress,
    })
}

/// `status.loadBalancer.ingress`: each entry's `ip`, else its `hostname` (as Istio reads
/// them; one with neither is skipped), each once, the first [`MAX_GATEWAY_ADDRESSES`] (all a
/// Gateway's `status.addresses` can hold). A value that is not an IP or a DNS name is
/// refused, as the API server refuses it.
fn load_balancer_ingress<'a>(status: &Node<'a>) -> FieldResult<Vec<HostAddress>> {
    let Some(lb) = status.get("loadBalancer")? else {
        return Ok(Vec::new());
    };
    // A field written empty is not there (a string of another type is refused).
    let written = |entry: &Node<'a>, key: &str| -> FieldResult<Option<Node<'a>>> {
        match entry.get(key)? {
            Some(node) if node.str()?.is_empty() => Ok(None),
            other => Ok(other),
        }
    };
    let mut out = Vec::new();
    for entry in lb.opt_items("ingress")? {
        let address = match (written(&entry, "ip")?, written(&entry, "hostname")?) {
            (Some(node), _) => HostAddress::Ip(node.ip()?),
            (None, Some(node)) => HostAddress::Hostname(parse_hostname(&node, false)?),
            (None, None) => continue,
        };
        if out.len() == MAX_GATEWAY_ADDRESSES {
            debug!(
                field = entry.path(),
                "skipping load balancer addresses past {MAX_GATEWAY_ADDRESSES}"
            );
            break;
        }
        if !out.contains(&address) {
            out.push(address);
        }
    }
    Ok(out)
}

/// The label that names an EndpointSlice's Service.
pub(super) const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// A `discovery.k8s.io/v1` EndpointSlice; `None` for one the mesh cannot use: without the
/// [`SERVICE_NAME_LABEL`] (it belongs to no Service) or of `addressType: FQDN` (names, not
/// addresses). Every address must be of the slice's type; a port without a number (any
/// port, in Kubernetes' words) and UDP/SCTP ports are skipped.
pub(super) fn endpoint_slice(obj: &Node<'_>, meta: Meta) -> FieldResult<Option<EndpointSlice>> {
    let key = meta.key();
    let address_type = obj.required("addressType")?;
    let v4 = match address_type.str()? {
        "IPv4" => true,
        "IPv6" => false,
        "FQDN" => {
            debug!(slice = %key, "skipping an EndpointSlice of FQDN addresses");
            return Ok(None);
        }
        other => return Err(address_type.err(format!("invalid address type {other:?}"))),
    };
    let Some(service) = meta.labels.get(SERVICE_NAME_LABEL).cloned() else {
        debug!(slice = %key, "skipping an EndpointSlice without {SERVICE_NAME_LABEL}");
        return Ok(None);
    };
    let mut ports = Vec::new();
    for port in obj.opt_items("ports")? {
        let Some(number) = port.get("port")? else {
            continue;
        };
        if !is_tcp(&port)? {
            continue;
        }
        let name = match port.get("name")? {
            Some(node) if node.str()?.is_empty() => None,
            Some(node) => Some(port_name(&node)?),
            None => None,
        };
        ports.push(SlicePort {
            name,
            port: number.port()?,
        });
    }
    let mut endpoints = Vec::new();
    for ep in obj.opt_items("endpoints")? {
        let addresses = ep.required("addresses")?.items()?;
        let Some(first) = addresses.first() else {
            return Err(ep.err("addresses: at least one address"));
        };
        for node in &addresses {
            if node.ip()?.is_ipv4() != v4 {
                return Err(node.err(format!("not an {} address", address_type.str()?)));
            }
        }
        let ready = match ep.get("conditions")? {
            Some(c) => c.opt_bool("ready")?.unwrap_or(true),
            None => true,
        };
        let pod = match ep.get("targetRef")? {
            Some(t) if t.opt_str("kind")? == Some("Pod") => Some(NamespacedName::new(
                t.opt_str("namespace")?.unwrap_or(&meta.namespace),
                t.required("name")?.str()?,
            )),
            _ => None,
        };
        endpoints.push(SliceEndpoint {
            ip: first.ip()?,
            ready,
            pod,
        });
    }
    Ok(Some(EndpointSlice {
        name: meta.name,
        namespace: meta.namespace,
        service,
        ports,
        endpoints,
    }))
}

/// `spec.clusterIPs` (or `spec.clusterIP`); `None` means headless, which has no VIP.
fn cluster_ips_of(spec: &Node<'_>) -> FieldResult<Vec<IpAddr>> {
    let single = match spec.get("clusterIP")? {
        Some(node) => match node.str()? {
            "" | "None" => None,
            _ => Some((node.ip()?, node)),
        },
        None => None,
    };
    let mut ips: Vec<IpAddr> = Vec::new();
    let items = spec.opt_items("clusterIPs")?;
    let headless = items.len() == 1 && items[0].str()? == "None";
    if !headless {
        for item in &items {
            let ip = item.ip()?;
            if ips.iter().any(|other| other.is_ipv4() == ip.is_ipv4()) {
                return Err(item.err("at most one IP per address family"));
            }
            ips.push(ip);
        }
    }
    match (single, ips.first()) {
        (Some((ip, _)), None) if !headless => Ok(vec![ip]),
        (Some((ip, node)), _) if headless => Err(node.err(format!(
            "{ip} contradicts spec.clusterIPs [None] (headless)"
        ))),
        (Some((ip, node)), Some(first)) if ip != *first => {
            Err(node.err(format!("{ip} does not match spec.clusterIPs[0] {first}")))
        }
        _ => Ok(ips),
    }
}

/// A service port; `None` for UDP/SCTP ports, which the mesh does not carry.
fn service_port(port: &Node<'_>) -> FieldResult<Option<ServicePort>> {
    let number = port.required("port")?.port()?;
    let name = port.opt_str("name")?.map(str::to_string);
    let app_protocol = port.opt_str("appProtocol")?.map(str::to_string);
    let target_port = match port.get("targetPort")? {
        None => TargetPort::Number(number),
        Some(node) => match node.str() {
            Ok(_) => TargetPort::Named(port_name(&node)?),
            Err(_) => TargetPort::Number(node.port()?),
        },
    };
    if !is_tcp(port)? {
        return Ok(None);
    }
    Ok(Some(ServicePort {
        name,
        app_protocol,
        port: number,
        target_port,
    }))
}

fn is_tcp(port: &Node<'_>) -> FieldResult<bool> {
    match port.get("protocol")? {
        None => Ok(true),
        Some(node) => match node.str()? {
            "TCP" => Ok(true),
            "UDP" | "SCTP" => Ok(false),
            other => Err(node.err(format!("invalid protocol {other:?}"))),
        },
    }
}

/// An IANA service name, as Kubernetes requires of port names: 1-15 lower-case letters,
/// digits and inner single dashes, at least one letter.
fn port_name(node: &Node<'_>) -> FieldResult<String> {
    let s = node.str()?;
    let b = s.as_bytes();
    let valid = !b.is_empty()
        && b.len() <= 15
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b.iter().any(u8::is_ascii_lowercase)
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
        && !s.contains("--");
    if valid {
        Ok(s.to_string())
    } else {
        Err(node.err(format!("invalid port name {s:?}")))
    }
}
