//! Property tests of what an HBONE server reads from a peer: the `CONNECT` authority and the
//! `forwarded` / `baggage` / `traceparent` headers (the cargo-fuzz targets in `fuzz/` run the
//! same parsers on raw bytes for longer).

use std::net::{IpAddr, SocketAddr};

use http::Uri;
use proptest::prelude::*;

use super::*;

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(512)
}

fn any_ip() -> impl Strategy<Value = IpAddr> {
    prop_oneof![
        any::<[u8; 4]>().prop_map(IpAddr::from),
        any::<[u8; 16]>().prop_map(IpAddr::from),
    ]
}

fn headers(src_ip: IpAddr, host: Option<String>, baggage: Vec<(String, String)>) -> ConnectHeaders {
    ConnectHeaders {
        src_ip,
        service_host: host,
        baggage,
        traceparent: None,
    }
}

proptest! {
    #![proptest_config(config())]

    /// Every request we build is one we accept, for the address it was built for.
    #[test]
    fn connect_authority_round_trips(ip in any_ip(), port in 1u16.., scope in any::<u32>()) {
        let addr = match ip {
            IpAddr::V4(ip) => SocketAddr::from((ip, port)),
            // The scope id is never sent (not valid in an authority).
            IpAddr::V6(ip) => SocketAddr::V6(std::net::SocketAddrV6::new(ip, port, 0, scope)),
        };
        let req = connect_request(addr, &headers(ip, None, Vec::new()));
        let got = connect_authority(req.uri()).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!((got.ip(), got.port()), (addr.ip(), addr.port()));
    }

    /// Any target a peer sends: no panic; what is accepted is a real `ip:port` with a port,
    /// written the way we would write it (no scheme, no path, nothing left over).
    #[test]
    fn connect_authority_of_any_target(raw in "\\PC{0,60}") {
        let Ok(uri) = raw.parse::<Uri>() else { return Ok(()) };
        if let Ok(addr) = connect_authority(&uri) {
            prop_assert_ne!(addr.port(), 0);
            prop_assert!(uri.scheme().is_none() && uri.path_and_query().is_none());
            prop_assert_eq!(raw.parse::<SocketAddr>().ok(), Some(addr));
        }
    }

    /// Target-shaped inputs: hosts and ports near the edge of what parses.
    #[test]
    fn connect_authority_of_near_misses(
        host in "(\\[[0-9a-fA-F:.%]{0,12}\\]|[0-9.]{0,16}|[a-z0-9.-]{0,10})",
        port in "[0-9]{0,7}",
        colon in any::<bool>(),
    ) {
        let raw = if colon { format!("{host}:{port}") } else { format!("{host}{port}") };
        let Ok(uri) = raw.parse::<Uri>() else { return Ok(()) };
        match connect_authority(&uri) {
            Ok(addr) => {
                prop_assert_eq!(raw.parse::<SocketAddr>().ok(), Some(addr));
                prop_assert_ne!(addr.port(), 0);
            }
            Err(HboneError::Authority(shown)) => prop_assert!(shown.len() <= raw.len() + 16),
            Err(other) => prop_assert!(false, "unexpected error kind {other}"),
        }
    }

    /// `forwarded` as we write it reads back as the source address, whatever the host.
    #[test]
    fn forwarded_round_trips(ip in any_ip(), host in proptest::option::of("\\PC{0,40}")) {
        let req = connect_request(SocketAddr::from(([10, 0, 0, 1], 80)), &headers(ip, host, Vec::new()));
        let value = req.headers().get(FORWARDED).and_then(|v| v.to_str().ok());
        prop_assert!(value.is_some(), "no forwarded header");
        prop_assert_eq!(value.and_then(parse_forwarded_for), Some(ip));
    }

    /// Any `forwarded` a peer sends: no panic, and an address is only taken from a `for`.
    #[test]
    fn forwarded_of_any_value(value in "\\PC{0,80}") {
        if let Some(ip) = parse_forwarded_for(&value) {
            prop_assert!(value.to_ascii_lowercase().contains("for"), "{ip} from {value:?}");
        }
    }

    /// Baggage as we write it reads back as the pairs with token keys, values byte-exact.
    #[test]
    fn baggage_round_trips(pairs in proptest::collection::vec(("[!-~]{0,8}", "\\PC{0,16}"), 0..6)) {
        let written = baggage_value(&pairs);
        let expected: Vec<(String, String)> = pairs
            .iter()
            .filter(|(k, _)| !k.is_empty() && k.bytes().all(is_tchar))
            .cloned()
            .collect();
        prop_assert!(written.bytes().all(|b| b == b',' || b == b'=' || is_baggage_octet(b)));
        prop_assert_eq!(parse_baggage(&written), expected);
    }

    /// Any `baggage` a peer sends: no panic; keys are never empty and never hold a separator.
    #[test]
    fn baggage_of_any_value(value in "\\PC{0,120}") {
        for (k, _) in parse_baggage(&value) {
            prop_assert!(!k.is_empty());
            prop_assert!(!k.contains(',') && !k.contains(';') && !k.contains('='));
        }
    }

    /// A valid `traceparent` is passed on unchanged; anything else is replaced by a valid one.
    #[test]
    fn traceparent_is_kept_only_when_valid(tp in "(00|01|0g)-[0-9a-fA-F]{31,33}-[0-9a-f]{15,17}-[0-9a-f]{2}|\\PC{0,60}") {
        let mut h = headers(IpAddr::from([10, 0, 0, 2]), None, Vec::new());
        h.traceparent = Some(tp.clone());
        let req = connect_request(SocketAddr::from(([10, 0, 0, 1], 80)), &h);
        let sent = req.headers().get(TRACEPARENT).and_then(|v| v.to_str().ok()).unwrap_or_default();
        prop_assert!(valid_traceparent(sent), "{sent:?} sent");
        prop_assert_eq!(sent == tp, valid_traceparent(&tp));
    }
}

#[test]
fn new_traceparents_are_valid() {
    for _ in 0..1000 {
        let tp = new_traceparent();
        assert!(valid_traceparent(&tp), "{tp}");
    }
}
