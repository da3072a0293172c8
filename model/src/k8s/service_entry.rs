//! `networking.istio.io` `ServiceEntry` (`v1`, `v1beta1`, `v1alpha3`) → [`ServiceEntry`], with
//! Istio's validation: at least one host (no bare `*`), at least one port (numbers unique),
//! `addresses` IPs or CIDRs (CIDRs only with `NONE` or `STATIC`), `endpoints` and
//! `workloadSelector` not both, no endpoints with `NONE`, IP endpoints with `STATIC`, host
//! names or IPs with `DNS`, and with `DNS` and no endpoints no wildcard host. Unknown fields
//! are refused, as in every Istio spec here; `subjectAltNames` is accepted and not used.

use std::collections::{BTreeMap, BTreeSet};

use super::yaml::{FieldResult, Node};
use super::{dns_subdomain, Meta};
use crate::model::{
    parse_ip_or_cidr, SeAddress, SeEndpoint, SeLocation, SePort, SeResolution, ServiceEntry,
};

/// Most hosts, addresses, ports or endpoints in one ServiceEntry.
const MAX_ITEMS: usize = 1024;

pub(super) fn service_entry(obj: &Node<'_>, meta: Meta) -> FieldResult<ServiceEntry> {
    let spec = obj.required("spec")?;
    spec.only(&[
        "hosts",
        "addresses",
        "ports",
        "location",
        "resolution",
        "endpoints",
        "workloadSelector",
        "exportTo",
        "subjectAltNames",
    ])?;
    let hosts_node = spec.required("hosts")?;
    let hosts = bounded(&hosts_node)?
        .iter()
        .map(host)
        .collect::<FieldResult<Vec<String>>>()?;
    if hosts.is_empty() {
        return Err(hosts_node.err("at least one host"));
    }
    let resolution = match spec.opt_str("resolution")? {
        None | Some("NONE") => SeResolution::None,
        Some("STATIC") => SeResolution::Static,
        Some("DNS") => SeResolution::Dns,
        Some("DNS_ROUND_ROBIN") => SeResolution::DnsRoundRobin,
        Some(other) => {
            return Err(field(&spec, "resolution").err(format!("invalid resolution {other:?}")))
        }
    };
    let location = match spec.opt_str("location")? {
        None | Some("MESH_EXTERNAL") => SeLocation::MeshExternal,
        Some("MESH_INTERNAL") => SeLocation::MeshInternal,
        Some(other) => {
            return Err(field(&spec, "location").err(format!("invalid location {other:?}")))
        }
    };
    let mut addresses = Vec::new();
    if let Some(node) = spec.get("addresses")? {
        for item in bounded(&node)? {
            let s = item.str()?;
            let net = parse_ip_or_cidr(s)
                .ok_or_else(|| item.err(format!("invalid IP address or CIDR {s:?}")))?;
            let cidr = net.prefix_len() < net.max_prefix_len();
            if cidr && !matches!(resolution, SeResolution::None | SeResolution::Static) {
                return Err(item.err("a CIDR needs resolution NONE or STATIC"));
            }
            addresses.push(net);
        }
    }
    let ports_node = spec.required("ports")?;
    let mut ports: Vec<SePort> = Vec::new();
    let mut names = BTreeSet::new();
    for item in bounded(&ports_node)? {
        item.only(&["number", "protocol", "name", "targetPort"])?;
        let number_node = item.required("number")?;
        let number = number_node.port()?;
        if ports.iter().any(|p| p.number == number) {
            return Err(number_node.err(format!("port {number} listed twice")));
        }
        let name = item.opt_str("name")?.unwrap_or_default().to_string();
        if !name.is_empty() && !names.insert(name.clone()) {
            return Err(field(&item, "name").err(format!("port name {name:?} listed twice")));
        }
        let target_port = item.get("targetPort")?.map(|n| n.port()).transpose()?;
        ports.push(SePort {
            number,
            name,
            protocol: item.opt_str("protocol")?.map(str::to_string),
            target_port,
        });
    }
    if ports.is_empty() {
        return Err(ports_node.err("at least one port"));
    }
    let workload_selector = match spec.get("workloadSelector")? {
        Some(node) => {
            node.only(&["labels"])?;
            Some(node.opt_string_map("labels")?)
        }
        None => None,
    };
    let mut endpoints = Vec::new();
    if let Some(node) = spec.get("endpoints")? {
        for item in bounded(&node)? {
            endpoints.push(endpoint(&item, resolution)?);
        }
    }
    if workload_selector.is_some() && !endpoints.is_empty() {
        return Err(spec.err("only one of workloadSelector or endpoints can be set"));
    }
    match resolution {
        SeResolution::None if !endpoints.is_empty() => {
            return Err(field(&spec, "endpoints").err("no endpoints with resolution NONE"));
        }
        SeResolution::Dns | SeResolution::DnsRoundRobin if endpoints.is_empty() => {
            if let Some(h) = hosts.iter().find(|h| h.starts_with('*')) {
                return Err(hosts_node.err(format!(
                    "wildcard host {h:?} needs endpoints with resolution DNS"
                )));
            }
        }
        _ => {}
    }
    // `*` anywhere in the list exports everywhere (kept as the empty list).
    let mut export_to = spec.opt_string_list("exportTo")?;
    if export_to.iter().any(|e| e == "*") {
        export_to.clear();
    }
    Ok(ServiceEntry {
        name: meta.name,
        namespace: meta.namespace,
        labels: meta.labels,
        hosts,
        addresses,
        ports,
        location,
        resolution,
        endpoints,
        workload_selector,
        export_to,
    })
}

/// The items of a list, at most [`MAX_ITEMS`].
fn bounded<'a>(node: &Node<'a>) -> FieldResult<Vec<Node<'a>>> {
    let items = node.items()?;
    if items.len() > MAX_ITEMS {
        return Err(node.err(format!("more than {MAX_ITEMS} items")));
    }
    Ok(items)
}

/// `key` of `node` for an error about it (the node itself when absent).
fn field<'a>(node: &Node<'a>, key: &str) -> Node<'a> {
    node.get(key).ok().flatten().unwrap_or_else(|| node.clone())
}

/// A host: a DNS name, optionally with a leading `*.` (a bare `*` is refused).
fn host(node: &Node<'_>) -> FieldResult<String> {
    let h = node.str()?;
    let name = h.strip_prefix("*.").unwrap_or(h);
    if !dns_subdomain(name) {
        return Err(node.err(format!("invalid host {h:?}")));
    }
    Ok(h.to_ascii_lowercase())
}

fn endpoint(item: &Node<'_>, resolution: SeResolution) -> FieldResult<SeEndpoint> {
    item.only(&[
        "address",
        "ports",
        "labels",
        "network",
        "locality",
        "weight",
        "serviceAccount",
    ])?;
    let node = item.required("address")?;
    let raw = node.str()?;
    let address = match raw.parse() {
        Ok(ip) => SeAddress::Ip(ip),
        Err(_) if matches!(resolution, SeResolution::Dns | SeResolution::DnsRoundRobin) => {
            if !dns_subdomain(raw) {
                return Err(node.err(format!("invalid host {raw:?}")));
            }
            SeAddress::Host(raw.to_ascii_lowercase())
        }
        Err(_) => {
            return Err(node.err(format!(
                "{raw:?} is not an IP address (host names need resolution DNS)"
            )))
        }
    };
    let mut ports = BTreeMap::new();
    if let Some(p) = item.get("ports")? {
        for (name, n) in p.entries()? {
            ports.insert(name.to_string(), n.port()?);
        }
    }
    Ok(SeEndpoint {
        address,
        ports,
        labels: item.opt_string_map("labels")?,
    })
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use crate::k8s::load_docs;
    use crate::model::{Model, SeResolution};

    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Pod
metadata: {name: db-0, namespace: shop, labels: {app: db}}
status: {podIP: 10.0.0.7}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, labels: {app: db}}
status: {podIP: 10.0.0.8, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [pay.example.com]
  addresses: [240.0.0.1]
  ports: [{number: 443, name: https, protocol: TLS}, {number: 80, name: http, targetPort: 8080}]
  resolution: STATIC
  endpoints:
  - address: 192.0.2.10
    ports: {https: 8443}
  - address: 10.0.0.7
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: legacy-dbs, namespace: shop}
spec:
  hosts: [db.legacy.internal]
  addresses: [198.51.100.0/24]
  ports: [{number: 5432, name: pg}]
  location: MESH_INTERNAL
  exportTo: ["."]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: selected, namespace: shop}
spec:
  hosts: [db.shop.internal]
  addresses: [240.0.0.2]
  ports: [{number: 5432, name: pg, targetPort: 15432}]
  resolution: STATIC
  workloadSelector: {labels: {app: db}}
"#;

    fn model(extra: &str) -> Result<Model, crate::k8s::ConfigError> {
        load_docs(&[
            ("mesh.yaml".to_string(), MESH.to_string()),
            ("extra.yaml".to_string(), extra.to_string()),
        ])
    }

    fn at(s: &str) -> SocketAddr {
        s.parse().expect("socket address")
    }

    /// (name, address, pod) of each endpoint of `dst` for a workload in `ns`.
    fn endpoints(m: &Model, ns: &str, dst: &str) -> Option<Vec<(String, String)>> {
        let (se, port) = m.service_entry_for(ns, at(dst))?;
        Some(
            m.service_entry_endpoints(se, port)
                .into_iter()
                .map(|e| {
                    let pod = e.pod.map(|p| p.name).unwrap_or_default();
                    (format!("{}:{}", e.ip, e.port), pod)
                })
                .collect(),
        )
    }

    #[test]
    fn an_address_and_port_of_an_entry_give_its_endpoints() {
        let m = model("").unwrap();
        // Ports by name, else targetPort, else the number; an address that is a pod keeps it.
        assert_eq!(
            endpoints(&m, "shop", "240.0.0.1:443"),
            Some(vec![
                ("192.0.2.10:8443".to_string(), String::new()),
                ("10.0.0.7:443".to_string(), "db-0".to_string()),
            ])
        );
        assert_eq!(
            endpoints(&m, "other", "240.0.0.1:80"),
            Some(vec![
                ("192.0.2.10:8080".to_string(), String::new()),
                ("10.0.0.7:8080".to_string(), "db-0".to_string()),
            ])
        );
        assert_eq!(
            endpoints(&m, "shop", "240.0.0.1:8443"),
            None,
            "not its port"
        );
        // A CIDR with resolution NONE: no endpoints (the address itself is the destination),
        // and exported to its own namespace only.
        let (se, _) = m
            .service_entry_for("shop", at("198.51.100.77:5432"))
            .unwrap();
        assert_eq!(
            (se.name.as_str(), se.resolution),
            ("legacy-dbs", SeResolution::None)
        );
        assert_eq!(endpoints(&m, "shop", "198.51.100.77:5432"), Some(vec![]));
        assert!(m
            .service_entry_for("other", at("198.51.100.77:5432"))
            .is_none());
        // workloadSelector: the ready pods it selects, on the targetPort.
        assert_eq!(
            endpoints(&m, "shop", "240.0.0.2:5432"),
            Some(vec![("10.0.0.7:15432".to_string(), "db-0".to_string())])
        );
        assert!(m.service_entry_for("shop", at("240.0.0.3:443")).is_none());
    }

    #[test]
    fn a_dns_entry_goes_to_its_endpoints_or_to_the_host_the_connection_is_for() {
        use crate::model::DnsTarget;
        let m = model(
            r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: shop}
spec:
  hosts: [api.example.com]
  addresses: [240.0.0.9]
  ports: [{number: 443, name: https, targetPort: 8443}]
  resolution: DNS
  endpoints:
  - address: backend.example.net
    ports: {https: 9443}
  - address: 192.0.2.30
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: bare, namespace: shop}
spec:
  hosts: [bare.example.com]
  addresses: [240.0.0.10]
  ports: [{number: 80, name: http}]
  resolution: DNS_ROUND_ROBIN
"#,
        )
        .unwrap();
        let targets = |dst: &str| {
            let (se, port) = m.service_entry_for("shop", at(dst)).expect("entry");
            m.dns_entry_targets(se, port, at(dst).ip())
        };
        assert_eq!(
            targets("240.0.0.9:443"),
            [
                DnsTarget::Host {
                    host: "backend.example.net",
                    port: 9443
                },
                DnsTarget::Addr(at("192.0.2.30:8443")),
            ],
            "each endpoint on its port for the entry's port, else the targetPort"
        );
        assert_eq!(
            targets("240.0.0.10:80"),
            [DnsTarget::Host {
                host: "bare.example.com",
                port: 80
            }],
            "no endpoints: the host the connection is for, on the port's number"
        );
        // STATIC and NONE entries have no DNS targets.
        let (se, port) = m.service_entry_for("shop", at("240.0.0.1:443")).unwrap();
        assert!(m
            .dns_entry_targets(se, port, at("240.0.0.1:443").ip())
            .is_empty());
    }

    #[test]
    fn an_overlapping_claim_is_named_and_the_first_entry_keeps_the_address() {
        let later = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: zz-overlap, namespace: shop}
spec:
  hosts: [other.example.com]
  addresses: [198.51.100.20, 240.0.0.1]
  ports: [{number: 5432, name: pg}, {number: 9000, name: other}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: elsewhere, namespace: other}
spec:
  hosts: [x.example.com]
  addresses: [198.51.100.30]
  ports: [{number: 5432, name: pg}]
  exportTo: ["."]
"#;
        let m = model(later).unwrap();
        let conflicts: Vec<String> = m
            .service_entry_conflicts
            .iter()
            .map(|c| format!("{} -> {} {}:{}", c.entry, c.kept, c.address, c.port))
            .collect();
        // 198.51.100.20:5432 is inside legacy-dbs's CIDR (seen in `shop`, like zz-overlap);
        // 240.0.0.1 shares no port with payments; `other/elsewhere` is seen only in `other`,
        // where legacy-dbs is not.
        assert_eq!(
            conflicts,
            ["shop/zz-overlap -> shop/legacy-dbs 198.51.100.20/32:5432"]
        );
        let (se, _) = m
            .service_entry_for("shop", at("198.51.100.20:5432"))
            .unwrap();
        assert_eq!(se.name, "legacy-dbs", "the first entry keeps it");
        let (se, _) = m
            .service_entry_for("shop", at("198.51.100.20:9000"))
            .unwrap();
        assert_eq!(se.name, "zz-overlap", "its other port is its own");
        let (se, _) = m
            .service_entry_for("other", at("198.51.100.30:5432"))
            .unwrap();
        assert_eq!(se.name, "elsewhere");
    }

    #[test]
    fn a_malformed_entry_is_refused_by_field() {
        let entry = |spec: &str| {
            format!(
                "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: bad, namespace: shop}}\nspec:\n{spec}\n"
            )
        };
        let refused = |spec: &str| model(&entry(spec)).unwrap_err().to_string();
        let cases = [
            ("  hosts: []\n  ports: [{number: 80, name: http}]", "at least one host"),
            ("  hosts: ['*']\n  ports: [{number: 80, name: http}]", "invalid host"),
            ("  hosts: [a.example]\n  ports: []", "at least one port"),
            ("  hosts: [a.example]\n  ports: [{number: 80}, {number: 80}]", "listed twice"),
            ("  hosts: [a.example]\n  ports: [{number: 80}]\n  resolution: MAGIC", "invalid resolution"),
            ("  hosts: [a.example]\n  ports: [{number: 80}]\n  addresses: [10.0.0.0/8]\n  resolution: DNS", "CIDR needs resolution"),
            ("  hosts: [a.example]\n  ports: [{number: 80}]\n  endpoints: [{address: 10.1.1.1}]", "no endpoints with resolution NONE"),
            ("  hosts: [a.example]\n  ports: [{number: 80}]\n  resolution: STATIC\n  endpoints: [{address: db.example}]", "not an IP address"),
            ("  hosts: ['*.example']\n  ports: [{number: 80}]\n  resolution: DNS", "wildcard host"),
            ("  hosts: [a.example]\n  ports: [{number: 80}]\n  resolution: STATIC\n  workloadSelector: {labels: {app: db}}\n  endpoints: [{address: 10.1.1.1}]", "only one of workloadSelector or endpoints"),
            ("  hosts: [a.example]\n  ports: [{number: 80}]\n  resolutions: STATIC", "unknown field"),
            ("  hosts: [a.example]\n  ports: [{number: 80}]\n  addresses: [10.0.0.300]", "invalid IP address"),
        ];
        for (spec, want) in cases {
            let e = refused(spec);
            assert!(e.contains(want), "{spec:?}: {e}");
        }
        // `*` beside `.` exports everywhere; `~` nowhere.
        let exported = |list: &str| {
            let m = model(&entry(&format!(
                "  hosts: [a.example]\n  addresses: [240.1.1.1]\n  ports: [{{number: 80}}]\n  exportTo: {list}"
            )))
            .unwrap();
            ["shop", "other"].map(|ns| m.service_entry_for(ns, at("240.1.1.1:80")).is_some())
        };
        assert_eq!(exported("['.', '*']"), [true, true]);
        assert_eq!(exported("['.']"), [true, false]);
        assert_eq!(exported("['~']"), [false, false]);
        assert_eq!(exported("[other]"), [false, true]);
        // DNS with host-name endpoints is fine.
        let dns = entry("  hosts: ['*.example']\n  ports: [{number: 80}]\n  resolution: DNS\n  endpoints: [{address: lb.example}]");
        assert_eq!(model(&dns).unwrap().service_entries.len(), 4);
    }
}
