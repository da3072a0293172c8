//! DNS answers and VIP auto-allocation over a small mesh written as YAML.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use super::{allocate, fnv1a64, service_name, vip_address, vip_slot, VIP_SLOTS};
use crate::k8s::load_docs;
use crate::model::{DnsRecords, Model};

const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
status: {podIPs: [{ip: 10.0.0.1}, {ip: "fd00::1"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
status: {podIP: 10.0.0.2}
---
apiVersion: v1
kind: Pod
metadata: {name: web-3, namespace: shop, labels: {app: web}}
status: {podIP: 10.0.0.3, conditions: [{type: Ready, status: "False"}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-9, namespace: other, labels: {app: web}}
status: {podIP: 10.0.9.9}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIPs: [10.96.0.1, "fd00:96::1"]
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: v1
kind: Service
metadata: {name: web-headless, namespace: shop}
spec: {clusterIP: None, selector: {app: web}, ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext, namespace: shop}
spec: {clusterIP: None, ports: [{name: https, port: 443}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-a, namespace: shop, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
ports: [{name: https, port: 8443}]
endpoints:
- addresses: [203.0.113.1]
- addresses: [203.0.113.2]
  conditions: {ready: false}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-b, namespace: shop, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
ports: [{name: https, port: 8443}]
endpoints: [{addresses: [203.0.113.1]}, {addresses: [203.0.113.3]}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: other}
spec: {clusterIP: 10.96.1.1, ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payments, namespace: shop}
spec:
  hosts: [pay.example.com]
  addresses: [240.0.0.1, "2001:db8::1", 198.51.100.0/24]
  ports: [{number: 443, name: https}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.10}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: external-api, namespace: shop}
spec:
  hosts: [api.example.com, db.example.com, api.example.com]
  ports: [{number: 443, name: https}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: passthrough, namespace: shop}
spec:
  hosts: [none.example.com]
  ports: [{number: 443, name: https}]
  resolution: NONE
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: cidr-only, namespace: shop}
spec:
  hosts: [cidr.example.com, shared.example.com]
  addresses: [198.51.100.0/24]
  ports: [{number: 5432, name: pg}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: private, namespace: shop}
spec:
  hosts: [shared.example.com, private.example.com]
  addresses: [240.0.0.6]
  ports: [{number: 80, name: http}]
  exportTo: ["."]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: public, namespace: shop}
spec:
  hosts: [shared.example.com]
  addresses: [240.0.0.7]
  ports: [{number: 80, name: http}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild, namespace: shop}
spec:
  hosts: ["*.example.org"]
  addresses: [240.0.0.10]
  ports: [{number: 443, name: https}]
  resolution: STATIC
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild-eu, namespace: shop}
spec:
  hosts: ["*.eu.example.org"]
  addresses: [240.0.0.11]
  ports: [{number: 443, name: https}]
  resolution: STATIC
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild-eu-private, namespace: shop}
spec:
  hosts: ["*.eu.example.org"]
  ports: [{number: 443, name: https}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.20}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: wild-dns, namespace: shop}
spec:
  hosts: ["*.example.net", exact.example.net]
  ports: [{number: 443, name: https}]
  resolution: DNS
  endpoints: [{address: lb.example.net}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: twin-a, namespace: other}
spec:
  hosts: [twin.example.com]
  ports: [{number: 443, name: https}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: twin-b, namespace: other}
spec:
  hosts: [twin.example.com]
  ports: [{number: 443, name: https}]
  resolution: DNS
"#;

fn model() -> Model {
    load_docs(&[("mesh.yaml".to_string(), MESH.to_string())]).unwrap()
}

fn ips(list: &[&str]) -> Vec<IpAddr> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

/// The VIP auto-allocated to `host` of entry `ns/name`, from the dump.
fn vip(m: &Model, entry: &str, host: &str) -> IpAddr {
    let vips = m.dump().service_entry_vips;
    vips.iter()
        .find(|v| v.entry == entry && v.host == host)
        .unwrap_or_else(|| panic!("no VIP for {entry} {host}: {vips:?}"))
        .address
}

#[test]
fn a_service_answers_by_each_name_form_from_any_namespace() {
    let m = model();
    let web = ips(&["10.96.0.1", "fd00:96::1"]);
    let api = ips(&["10.96.1.1"]);
    let cases: &[(&str, &str, Option<&[IpAddr]>)] = &[
        ("shop", "web.shop.svc.cluster.local", Some(&web)),
        ("shop", "web.shop.svc", Some(&web)),
        ("shop", "web.shop", Some(&web)),
        ("shop", "web", Some(&web)),
        ("other", "web.shop.svc.cluster.local", Some(&web)),
        ("other", "web.shop", Some(&web)),
        // Bare: the client's namespace, which has no `web`.
        ("other", "web", None),
        ("shop", "api", None),
        ("shop", "api.other", Some(&api)),
        ("other", "api", Some(&api)),
        // Case and the absolute form.
        ("shop", "WEB.Shop.SVC.Cluster.Local.", Some(&web)),
        ("shop", "web.", Some(&web)),
        // Unknown Services, and names of no Service form, are forwarded.
        ("shop", "nope.shop.svc.cluster.local", None),
        ("shop", "nope", None),
        ("shop", "web.shop.cluster.local", None),
        ("shop", "web.shop.svc.cluster", None),
        ("shop", "shop.svc.cluster.local", None),
        ("shop", "", None),
        ("shop", ".", None),
    ];
    for (ns, name, want) in cases {
        let got = m.dns_lookup(ns, name);
        assert_eq!(
            got,
            want.map(|a| DnsRecords { addrs: a.to_vec() }),
            "{ns} asks {name:?}"
        );
    }
}

#[test]
fn a_headless_service_answers_its_ready_endpoints() {
    let m = model();
    // The ready pods it selects in its namespace, every IP of each (web-3 is not ready,
    // web-9 is in another namespace).
    let want = ips(&["10.0.0.1", "fd00::1", "10.0.0.2"]);
    for (ns, name) in [
        ("shop", "web-headless"),
        ("other", "web-headless.shop.svc.cluster.local"),
    ] {
        assert_eq!(
            m.dns_lookup(ns, name).map(|r| r.addrs),
            Some(want.clone()),
            "{ns} {name}"
        );
    }
    // Without a selector: its slices' ready addresses, each once.
    assert_eq!(
        m.dns_lookup("shop", "ext.shop").map(|r| r.addrs),
        Some(ips(&["203.0.113.1", "203.0.113.3"]))
    );
}

#[test]
fn service_entry_hosts_answer_with_addresses_or_their_vip() {
    let m = model();
    let api = vip(&m, "shop/external-api", "api.example.com");
    let twin = vip(&m, "other/twin-a", "twin.example.com");
    let cases: &[(&str, &str, Option<Vec<IpAddr>>)] = &[
        // Its IP addresses (both families), not its CIDR.
        (
            "shop",
            "pay.example.com",
            Some(ips(&["240.0.0.1", "2001:db8::1"])),
        ),
        (
            "other",
            "Pay.Example.COM.",
            Some(ips(&["240.0.0.1", "2001:db8::1"])),
        ),
        // No addresses, resolution DNS: the VIP, in any case.
        ("shop", "api.example.com", Some(vec![api])),
        ("other", "API.EXAMPLE.COM.", Some(vec![api])),
        // NONE without addresses, CIDRs only: no answer.
        ("shop", "none.example.com", None),
        ("shop", "cidr.example.com", None),
        // cidr-only has no answer, private answers where it is seen, public elsewhere.
        ("shop", "shared.example.com", Some(ips(&["240.0.0.6"]))),
        ("other", "shared.example.com", Some(ips(&["240.0.0.7"]))),
        // exportTo hides an entry.
        ("shop", "private.example.com", Some(ips(&["240.0.0.6"]))),
        ("other", "private.example.com", None),
        // The same host in two entries: the first one's VIP.
        ("shop", "twin.example.com", Some(vec![twin])),
        // Wildcards: the longest suffix first, only with addresses.
        ("shop", "a.example.org", Some(ips(&["240.0.0.10"]))),
        ("shop", "a.b.example.org", Some(ips(&["240.0.0.10"]))),
        ("shop", "x.eu.example.org", Some(ips(&["240.0.0.11"]))),
        ("shop", "y.x.EU.example.org.", Some(ips(&["240.0.0.11"]))),
        ("shop", "eu.example.org", Some(ips(&["240.0.0.10"]))),
        ("shop", "example.org", None),
        // A wildcard without addresses has no answer (never a VIP); its exact host has one.
        ("shop", "a.example.net", None),
        (
            "shop",
            "exact.example.net",
            Some(vec![vip(&m, "shop/wild-dns", "exact.example.net")]),
        ),
        ("shop", "elsewhere.example.com", None),
    ];
    for (ns, name, want) in cases {
        assert_eq!(
            m.dns_lookup(ns, name).map(|r| r.addrs),
            *want,
            "{ns} asks {name:?}"
        );
    }
}

#[test]
fn auto_allocated_vips_are_deterministic_distinct_and_in_range() {
    let m = model();
    let dump = m.dump().service_entry_vips;
    let listed: Vec<(String, String)> = dump
        .iter()
        .map(|v| (v.entry.clone(), v.host.clone()))
        .collect();
    // Every host of each entry without addresses and not NONE, no wildcard, once, in model
    // order ((namespace, name): `other` before `shop`).
    let want = [
        ("other/twin-a", "twin.example.com"),
        ("other/twin-b", "twin.example.com"),
        ("shop/external-api", "api.example.com"),
        ("shop/external-api", "db.example.com"),
        ("shop/wild-dns", "exact.example.net"),
    ]
    .map(|(e, h)| (e.to_string(), h.to_string()));
    assert_eq!(listed, want);
    let range: ipnet::IpNet = "240.240.0.0/16".parse().unwrap();
    let addrs: HashSet<IpAddr> = dump.iter().map(|v| v.address).collect();
    assert_eq!(addrs.len(), dump.len(), "distinct: {dump:?}");
    for v in &dump {
        assert!(range.contains(&v.address), "{v:?}");
        assert!(!v.address.is_ipv6());
        let IpAddr::V4(v4) = v.address else {
            unreachable!()
        };
        assert!(
            !matches!(v4.octets(), [_, _, 0, 0] | [_, _, 255, 255]),
            "{v:?}"
        );
    }
    // Where nothing collides the hash picks it: `namespace/name/host` through FNV-1a.
    let slot = fnv1a64(b"shop/external-api/api.example.com") % u64::from(VIP_SLOTS) + 1;
    let slot = u32::try_from(slot).unwrap();
    assert_eq!(
        vip(&m, "shop/external-api", "api.example.com"),
        IpAddr::V4(vip_address(slot))
    );
    // Another build, and one with an unrelated entry more, give the same VIPs.
    let extra = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: zz-late, namespace: shop}
spec:
  hosts: [late.example.com]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  endpoints: [{address: 192.0.2.30}]
"#;
    let bigger = load_docs(&[
        ("mesh.yaml".to_string(), MESH.to_string()),
        ("extra.yaml".to_string(), extra.to_string()),
    ])
    .unwrap();
    for again in [model(), bigger] {
        for v in &dump {
            assert_eq!(vip(&again, &v.entry, &v.host), v.address, "{v:?}");
        }
    }
}

#[test]
fn a_vip_is_its_entry_at_its_ports() {
    let m = model();
    let at = |ip: IpAddr, port: u16| SocketAddr::new(ip, port);
    let api = vip(&m, "shop/external-api", "api.example.com");
    let db = vip(&m, "shop/external-api", "db.example.com");
    for ip in [api, db] {
        let (se, port) = m.service_entry_for("shop", at(ip, 443)).unwrap();
        assert_eq!((se.name.as_str(), port.number), ("external-api", 443));
        assert!(
            m.service_entry_for("shop", at(ip, 80)).is_none(),
            "not its port"
        );
    }
    assert_eq!(m.service_entry_host_at(api), Some("api.example.com"));
    assert_eq!(m.service_entry_host_at(db), Some("db.example.com"));
    // The same host in two entries: each entry at its own VIP.
    for entry in ["twin-a", "twin-b"] {
        let ip = vip(&m, &format!("other/{entry}"), "twin.example.com");
        let (se, _) = m.service_entry_for("other", at(ip, 443)).unwrap();
        assert_eq!(se.name, entry);
        assert_eq!(m.service_entry_host_at(ip), Some("twin.example.com"));
    }
    // Not a VIP: neither an entry's address nor an unallocated address of the range.
    assert_eq!(m.service_entry_host_at("240.0.0.1".parse().unwrap()), None);
    let free = (1..=VIP_SLOTS)
        .map(|s| IpAddr::V4(vip_address(s)))
        .find(|ip| m.service_entry_host_at(*ip).is_none())
        .unwrap();
    assert!(m.service_entry_for("shop", at(free, 443)).is_none());
    assert_eq!(m.service_entry_host_at("fd00::1".parse().unwrap()), None);
}

#[test]
fn the_allocator_probes_past_taken_slots_and_wraps() {
    let key = "ns/entry/host.example.com";
    let home = allocate(key, &HashSet::new()).unwrap();
    assert!((1..=VIP_SLOTS).contains(&home));
    assert_eq!(
        u64::from(home),
        fnv1a64(key.as_bytes()) % u64::from(VIP_SLOTS) + 1
    );
    // Taken: the next free slot after it.
    let next = |s: u32| s % VIP_SLOTS + 1;
    let taken: HashSet<u32> = [home, next(home)].into();
    assert_eq!(allocate(key, &taken), Some(next(next(home))));
    // From the last slot it wraps to the first (never 0 nor 65535).
    assert!(home > 2, "the key's slot leaves room below it: {home}");
    let mut top: HashSet<u32> = (home..=VIP_SLOTS).collect();
    assert_eq!(allocate(key, &top), Some(1));
    top.insert(1);
    assert_eq!(allocate(key, &top), Some(2));
    // Every slot taken: none.
    let full: HashSet<u32> = (1..=VIP_SLOTS).collect();
    assert_eq!(allocate(key, &full), None);
}

#[test]
fn allocation_keeps_clear_of_addresses_in_use() {
    // A Service cluster IP at the slot the hash picks moves the VIP to the next one.
    let home = vip_address(allocate("shop/ext/x.example.com", &HashSet::new()).unwrap());
    let mesh = format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: squatter, namespace: shop}}
spec: {{clusterIP: {home}, ports: [{{port: 80}}]}}
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ext, namespace: shop}}
spec:
  hosts: [x.example.com]
  ports: [{{number: 443, name: https}}]
  resolution: DNS
"#
    );
    let m = load_docs(&[("mesh.yaml".to_string(), mesh)]).unwrap();
    let got = vip(&m, "shop/ext", "x.example.com");
    let slot = vip_slot(IpAddr::V4(home)).unwrap();
    assert_eq!(got, IpAddr::V4(vip_address(slot % VIP_SLOTS + 1)));
}

#[test]
fn fnv1a64_matches_the_reference_vectors() {
    assert_eq!(fnv1a64(b""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c);
    assert_eq!(fnv1a64(b"foobar"), 0x8594_4171_f739_67e8);
}

#[test]
fn vip_slots_and_addresses() {
    for (ip, want) in [
        ("240.240.0.1", Some(1)),
        ("240.240.1.0", Some(256)),
        ("240.240.255.254", Some(VIP_SLOTS)),
        ("240.240.0.0", None),
        ("240.240.255.255", None),
        ("240.241.0.1", None),
        ("10.0.0.1", None),
        ("fd00::1", None),
    ] {
        let ip: IpAddr = ip.parse().unwrap();
        assert_eq!(vip_slot(ip), want, "{ip}");
        if let Some(slot) = want {
            assert_eq!(IpAddr::V4(vip_address(slot)), ip);
        }
    }
    assert_eq!(vip_address(1), Ipv4Addr::new(240, 240, 0, 1));
}

#[test]
fn service_name_forms() {
    for (host, want) in [
        ("web", Some(("client", "web"))),
        ("web.shop", Some(("shop", "web"))),
        ("web.shop.svc", Some(("shop", "web"))),
        ("web.shop.svc.cluster.local", Some(("shop", "web"))),
        // `<svc>.<ns>` where the namespace is called `svc`.
        ("web.svc", Some(("svc", "web"))),
        ("web.svc.cluster.local", None),
        ("web.shop.cluster.local", None),
        ("web.shop.svc.cluster", None),
        ("a.b.c", None),
    ] {
        assert_eq!(service_name("client", host), want, "{host}");
    }
}
