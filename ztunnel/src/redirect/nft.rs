//! nftables backend: redirection with NAT rules inside the pod's network namespace.
//!
//! Rules, per pod namespace (table `inet ztunnel`):
//! - outbound: TCP the application originates (not marked [`SKIP_MARK`], not to loopback) is
//!   redirected to the agent's 15001 listener; the original destination is read back with
//!   `SO_ORIGINAL_DST`.
//! - inbound: TCP arriving from outside the pod, except to 15008 (HBONE, served directly) and
//!   node probes (source [`PROBE_SOURCE_IP`]), is redirected to 15006.
//! - source-IP preservation: the agent delivers inbound connections from a transparent socket
//!   bound to the client's IP and marked [`SKIP_MARK`]; those packets cross `lo`, where the
//!   connection gets conntrack mark [`INBOUND_CONNMARK`]. The application's replies carry that
//!   mark and a policy-routing rule sends them to table [`INBOUND_ROUTE_TABLE`], whose `local`
//!   default route hands them back to the agent's socket instead of the pod's default route.
//! - DNS (with `--dns-capture`, IPv4): TCP to port 53 is redirected to the DNS proxy's
//!   15053 like other TCP to 15001. UDP to port 53 cannot be NATed and keep its original
//!   destination, which the proxy needs (it forwards to the resolver the pod asked, and
//!   answers from it): chain `dns_route` marks it [`INBOUND_CONNMARK`], so the reply rule's
//!   table routes it over `lo`, where chain `dns_tproxy` hands it unchanged to the proxy's
//!   transparent socket (`tproxy`).
//! - IPv6 in a pod without an IPv6 address fails closed (see [`super::block_ipv6`]).

use std::net::IpAddr;
use std::path::Path;

use super::{block_ipv6, rule_exists, run_in, unblock_ipv6, RedirectError};
use crate::config::{
    DNS_PROXY_PORT, HBONE_PORT, INBOUND_CONNMARK, INBOUND_PLAINTEXT_PORT, INBOUND_ROUTE_TABLE,
    OUTBOUND_PORT, PROBE_SOURCE_IP, SKIP_MARK,
};

pub const TABLE: &str = "ztunnel";

/// The nftables ruleset for one pod namespace; `dns`: capture its DNS too. The DNS chains
/// exist either way (empty without `dns`), so that [`stop_capture`] can always flush them.
pub fn ruleset(dns: bool) -> String {
    let (dns_tcp, dns_route, dns_tproxy) = if dns {
        (
            format!("meta nfproto ipv4 tcp dport 53 redirect to :{DNS_PROXY_PORT}\n    "),
            format!(
                "meta mark & 0xfff == {SKIP_MARK:#x} return\n    \
                 meta nfproto ipv4 udp dport 53 ip daddr != 127.0.0.0/8 meta mark set {INBOUND_CONNMARK:#x}"
            ),
            format!(
                "iifname \"lo\" meta nfproto ipv4 udp dport 53 meta mark & 0xfff == {INBOUND_CONNMARK:#x} \
                 tproxy ip to 127.0.0.1:{DNS_PROXY_PORT}"
            ),
        )
    } else {
        Default::default()
    };
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
/// pod with addresses `ips`.
///
/// Hitless for an earlier agent still draining there (an upgrade): one nft transaction
/// creates the table if missing and replaces its rules (`flush table` empties the chains but
/// keeps them, so their NAT hooks stay registered and the conntrack entries of established
/// connections keep their translation; deleting the table would drop it), and the reply rule
/// is added only if missing.
pub fn install(netns: &Path, ips: &[IpAddr], dns: bool) -> Result<(), RedirectError> {
    let script = format!(
        "add table inet {TABLE}\nflush table inet {TABLE}\n{}",
        ruleset(dns)
    );
    run_in(netns, &["nft", "-f", "-"], Some(&script))?;
    let mark = format!("{INBOUND_CONNMARK:#x}/0xfff");
    let table = INBOUND_ROUTE_TABLE.to_string();
    if !rule_exists(netns, "-4", PREF_REPLY) {
        let pref = PREF_REPLY.to_string();
        run_in(
            netns,
            &[
                "ip", "rule", "add", "fwmark", &mark, "table", &table, "pref", &pref,
            ],
            None,
        )?;
    }
    run_in(
        netns,
        &[
            "ip",
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            &table,
        ],
        None,
    )?;
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
    delete_rules(netns, &mark, &table);
    let _ = run_in(netns, &["ip", "route", "flush", "table", &table], None);
    unblock_ipv6(netns);
    Ok(())
}

/// Deletes our policy-routing rule until none is left (bounded: a namespace holds few rules).
fn delete_rules(netns: &Path, mark: &str, table: &str) {
    for _ in 0..16 {
        if run_in(
            netns,
            &["ip", "rule", "del", "fwmark", mark, "table", table],
            None,
        )
        .is_err()
        {
            break;
        }
    }
}
