//! nftables backend: redirection with NAT rules inside the pod's network namespace.
//!
//! Rules, per pod namespace (table `inet ztunnel`):
//! - outbound: TCP the application originates (not marked [`SKIP_MARK`], not to loopback) is
//!   redirected to the agent's 15001 listener of its family (`redirect` sends IPv4 to
//!   127.0.0.1, IPv6 to [::1]: the agent listens on both in a pod with an IPv6 address); the
//!   original destination is read back with `SO_ORIGINAL_DST` (`IP6T_SO_ORIGINAL_DST`).
//! - inbound: TCP arriving from outside the pod, except to 15008 (HBONE, served directly) and
//!   node probes (source [`PROBE_SOURCE_IP`]), is redirected to 15006.
//! - source-IP preservation: the agent delivers inbound connections from a transparent socket
//!   bound to the client's IP and marked [`SKIP_MARK`]; those packets cross `lo`, where the
//!   connection gets conntrack mark [`INBOUND_CONNMARK`]. The application's replies carry that
//!   mark and a policy-routing rule sends them to table [`INBOUND_ROUTE_TABLE`], whose `local`
//!   default route hands them back to the agent's socket instead of the pod's default route.
//! - DNS (with `--dns-capture`; IPv4, and IPv6 in a pod with an IPv6 address): TCP to port 53
//!   is redirected to the DNS proxy's 15053 like other TCP to 15001 (`127.0.0.1` or `::1`:
//!   the proxy listens on both). UDP to port 53 cannot be NATed and keep its original
//!   destination, which the proxy needs (it forwards to the resolver the pod asked, and
//!   answers from it): chain `dns_route` marks it [`INBOUND_CONNMARK`], so the reply rule's
//!   table routes it over `lo` (the rule and its `local` default route exist in both
//!   families' tables), where chain `dns_tproxy` hands it unchanged to the proxy's
//!   transparent socket of its family (`tproxy ip to 127.0.0.1:15053`, `tproxy ip6 to
//!   [::1]:15053`).
//! - IPv6 in a pod without an IPv6 address fails closed (see [`super::block_ipv6`]).

use std::net::IpAddr;
use std::path::Path;

use super::{block_ipv6, captures_ipv6, rule_exists, run_in, unblock_ipv6, RedirectError};
use crate::config::{
    DNS_PROXY_PORT, HBONE_PORT, INBOUND_CONNMARK, INBOUND_PLAINTEXT_PORT, INBOUND_ROUTE_TABLE,
    OUTBOUND_PORT, PROBE_SOURCE_IP, SKIP_MARK,
};

pub const TABLE: &str = "ztunnel";

/// An address family's names in a ruleset: `meta nfproto`, the address expression and
/// `tproxy` family, its loopback (a network, and the DNS proxy's address).
struct Family {
    nfproto: &'static str,
    ip: &'static str,
    loopback_net: &'static str,
    loopback: &'static str,
}

const IPV4: Family = Family {
    nfproto: "ipv4",
    ip: "ip",
    loopback_net: "127.0.0.0/8",
    loopback: "127.0.0.1",
};
const IPV6: Family = Family {
    nfproto: "ipv6",
    ip: "ip6",
    loopback_net: "::1",
    loopback: "[::1]",
};

/// The nftables ruleset for one pod namespace; `dns`: capture its DNS too, of IPv6 as well
/// with `v6`. The DNS chains exist either way (empty without `dns`), so that [`stop_capture`]
/// can always flush them.
pub fn ruleset(dns: bool, v6: bool) -> String {
    let families: &[Family] = match (dns, v6) {
        (false, _) => &[],
        (true, false) => &[IPV4],
        (true, true) => &[IPV4, IPV6],
    };
    let dns_tcp: String = families
        .iter()
        .map(|f| {
            format!(
                "meta nfproto {} tcp dport 53 redirect to :{DNS_PROXY_PORT}\n    ",
                f.nfproto
            )
        })
        .collect();
    let mut dns_route = match dns {
        true => vec![format!("meta mark & 0xfff == {SKIP_MARK:#x} return")],
        false => Vec::new(),
    };
    dns_route.extend(families.iter().map(|f| {
        format!(
            "meta nfproto {} udp dport 53 {} daddr != {} meta mark set {INBOUND_CONNMARK:#x}",
            f.nfproto, f.ip, f.loopback_net
        )
    }));
    let dns_tproxy: Vec<String> = families
        .iter()
        .map(|f| {
            format!(
                "iifname \"lo\" meta nfproto {} udp dport 53 meta mark & 0xfff == {INBOUND_CONNMARK:#x} \
                 tproxy {} to {}:{DNS_PROXY_PORT}",
                f.nfproto, f.ip, f.loopback
            )
        })
        .collect();
    let (dns_route, dns_tproxy) = (dns_route.join("\n    "), dns_tproxy.join("\n    "));
    format!(
        r#"table inet {TABLE} {{
  chain prerouting_mangle {{
    type filter hook prerouting priority mangle; policy accept;
    iifname "lo" meta mark & 0xfff == {SKIP_MARK:#x} ct mark set {INBOUND_CONNMARK:#x}
  }}
  chain prerouting_nat {{
    type nat hook prerouting priority dstnat; policy accept;
    iifname "lo" return
    ip saddr {PROBE_SOURCE_IP} return
    tcp dport {HBONE_PORT} return
    meta l4proto tcp redirect to :{INBOUND_PLAINTEXT_PORT}
  }}
  chain output_route {{
    type route hook output priority mangle; policy accept;
    ct mark & 0xfff == {INBOUND_CONNMARK:#x} meta mark set {INBOUND_CONNMARK:#x}
  }}
  chain output_nat {{
    type nat hook output priority -100; policy accept;
    meta mark & 0xfff == {SKIP_MARK:#x} return
    oifname "lo" return
    ip daddr 127.0.0.0/8 return
    ip6 daddr ::1 return
    {dns_tcp}meta l4proto tcp redirect to :{OUTBOUND_PORT}
  }}
  chain dns_route {{
    type route hook output priority mangle; policy accept;
    {dns_route}
  }}
  chain dns_tproxy {{
    type filter hook prerouting priority mangle; policy accept;
    {dns_tproxy}
  }}
}}
"#
    )
}

/// Policy-routing preference of the reply rule.
const PREF_REPLY: u32 = 32000;

/// Installs (idempotently: replaces an earlier agent's rules) redirection in `netns`, for a
/// pod with addresses `ips`; `dns`: its DNS too (IPv6 DNS only if [`captures_ipv6`]).
///
/// Hitless for an earlier agent still draining there (an upgrade): one nft transaction
/// creates the table if missing and replaces its rules (`flush table` empties the chains but
/// keeps them, so their NAT hooks stay registered and the conntrack entries of established
/// connections keep their translation; deleting the table would drop it), and the reply rule
/// is added only if missing.
pub fn install(netns: &Path, ips: &[IpAddr], dns: bool) -> Result<(), RedirectError> {
    let v6 = captures_ipv6(ips);
    let script = format!(
        "add table inet {TABLE}\nflush table inet {TABLE}\n{}",
        ruleset(dns, v6)
    );
    run_in(netns, &["nft", "-f", "-"], Some(&script))?;
    let mark = format!("{INBOUND_CONNMARK:#x}/0xfff");
    let table = INBOUND_ROUTE_TABLE.to_string();
    let families: &[(&str, &str)] = match v6 {
        true => &[("-4", "0.0.0.0/0"), ("-6", "::/0")],
        false => &[("-4", "0.0.0.0/0")],
    };
    for (family, default) in families {
        if !rule_exists(netns, family, PREF_REPLY) {
            let pref = PREF_REPLY.to_string();
            run_in(
                netns,
                &[
                    "ip", family, "rule", "add", "fwmark", &mark, "table", &table, "pref", &pref,
                ],
                None,
            )?;
        }
        run_in(
            netns,
            &[
                "ip", family, "route", "replace", "local", default, "dev", "lo", "table", &table,
            ],
            None,
        )?;
    }
    block_ipv6(netns, ips)
}

/// Stops capturing new connections in `netns` while established ones keep working: empties
/// only the two redirect chains. The table (and with it the mark chains), the policy-routing
/// rule and its route stay until [`remove`]: deleting the table would unregister its NAT
/// hooks, and the kernel then drops the address translation of connections in flight (the
/// app's next packet leaves untranslated and is reset), while removing the reply routing would
/// send the app's replies to inbound clients out of the pod instead of back to the agent.
pub fn stop_capture(netns: &Path) -> Result<(), RedirectError> {
    let script = format!(
        "flush chain inet {TABLE} output_nat\nflush chain inet {TABLE} prerouting_nat\n\
         flush chain inet {TABLE} dns_route\nflush chain inet {TABLE} dns_tproxy\n"
    );
    run_in(netns, &["nft", "-f", "-"], Some(&script))?;
    unblock_ipv6(netns);
    Ok(())
}

/// Removes what [`install`] added. Missing pieces are not an error (the pod may be gone).
pub fn remove(netns: &Path) -> Result<(), RedirectError> {
    let _ = run_in(netns, &["nft", "delete", "table", "inet", TABLE], None);
    let mark = format!("{INBOUND_CONNMARK:#x}/0xfff");
    let table = INBOUND_ROUTE_TABLE.to_string();
    for family in ["-4", "-6"] {
        delete_rules(netns, family, &mark, &table);
        let _ = run_in(
            netns,
            &["ip", family, "route", "flush", "table", &table],
            None,
        );
    }
    unblock_ipv6(netns);
    Ok(())
}

/// Deletes our policy-routing rule of `family` until none is left (bounded: a namespace holds
/// few rules).
fn delete_rules(netns: &Path, family: &str, mark: &str, table: &str) {
    for _ in 0..16 {
        if run_in(
            netns,
            &["ip", family, "rule", "del", "fwmark", mark, "table", table],
            None,
        )
        .is_err()
        {
            break;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::redirect::testing::{skip_unless_root, TestNs, TestPod, POD_IP4};

    /// `ruleset(dns, v6)` has each of `present` and none of `absent`.
    fn check(dns: bool, v6: bool, present: &[&str], absent: &[&str]) {
        let rules = ruleset(dns, v6);
        for line in present {
            assert!(
                rules.contains(line),
                "dns={dns} v6={v6}: no {line:?} in\n{rules}"
            );
        }
        for line in absent {
            assert!(
                !rules.contains(line),
                "dns={dns} v6={v6}: {line:?} in\n{rules}"
            );
        }
    }

    #[test]
    fn dns_is_captured_in_the_families_asked_for() {
        let v4 = [
            "meta nfproto ipv4 tcp dport 53 redirect to :15053",
            "meta nfproto ipv4 udp dport 53 ip daddr != 127.0.0.0/8 meta mark set 0x111",
            "meta nfproto ipv4 udp dport 53 meta mark & 0xfff == 0x111 tproxy ip to 127.0.0.1:15053",
        ];
        let v6 = [
            "meta nfproto ipv6 tcp dport 53 redirect to :15053",
            "meta nfproto ipv6 udp dport 53 ip6 daddr != ::1 meta mark set 0x111",
            "meta nfproto ipv6 udp dport 53 meta mark & 0xfff == 0x111 tproxy ip6 to [::1]:15053",
        ];
        let both: Vec<&str> = v4.iter().chain(&v6).copied().collect();
        check(false, false, &[], &both);
        check(false, true, &[], &both);
        check(true, false, &v4, &v6);
        check(true, true, &both, &[]);
        // The agent's own queries are never marked for the proxy, in either family.
        check(true, true, &["meta mark & 0xfff == 0x539 return"], &[]);
    }

    /// The ruleset loads, and the reply rule and its route exist in the IPv6 tables too for a
    /// pod with an IPv6 address (not for one without); [`remove`] takes both families' away.
    /// Needs root (creates namespaces); skipped otherwise.
    #[test]
    fn ipv6_dns_capture_is_installed_and_removed_with_its_routing() {
        if skip_unless_root() {
            return;
        }
        let t = TestPod::new("nft-dns");
        let path = t.pod.path();
        // The reply rule and the routes of table 133, in `family`.
        let routing = |family| {
            let rules = t
                .pod
                .output(&["ip", family, "rule", "show", "pref", "32000"]);
            let routes = t
                .pod
                .output(&["ip", family, "route", "show", "table", "all"]);
            let ours: Vec<&str> = routes.lines().filter(|l| l.contains("table 133")).collect();
            format!("{}{}", rules.trim(), ours.join("\n"))
        };
        install(&path, &t.ips(), true).expect("install");
        let table = t.pod.output(&["nft", "list", "table", "inet", TABLE]);
        assert!(table.contains("tproxy ip6 to [::1]:15053"), "{table}");
        assert!(table.contains("tproxy ip to 127.0.0.1:15053"), "{table}");
        for family in ["-4", "-6"] {
            let routing = routing(family);
            assert!(
                routing.contains("fwmark 0x111/0xfff lookup 133")
                    && routing.contains("local default dev lo table 133"),
                "{family}: {routing}"
            );
        }

        remove(&path).expect("remove");
        let tables = t.pod.output(&["nft", "list", "tables"]);
        assert!(!tables.contains(TABLE), "{tables}");
        for family in ["-4", "-6"] {
            assert_eq!(routing(family), "", "{family}");
        }

        let v4_only = TestNs::new("nft-dns-v4");
        install(&v4_only.path(), &[POD_IP4.into()], true).expect("install");
        let rules = v4_only.output(&["ip", "-6", "rule", "show", "pref", "32000"]);
        assert!(rules.trim().is_empty(), "{rules}");
        let table = v4_only.output(&["nft", "list", "table", "inet", TABLE]);
        assert!(!table.contains("ip6 to"), "{table}");
        remove(&v4_only.path()).expect("remove");
    }
}
