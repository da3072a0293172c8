//! `forwarded`, `baggage` and `traceparent` as a peer sends them: never panic; what we
//! write from what we read reads back the same.
#![no_main]

use std::net::{IpAddr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use mesh_hbone::{
    connect_request, parse_baggage, parse_forwarded_for, valid_traceparent, ConnectHeaders,
    BAGGAGE, FORWARDED, TRACEPARENT,
};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let forwarded = parse_forwarded_for(&text);
    let baggage = parse_baggage(&text);
    let tp_valid = valid_traceparent(&text);
    let h = ConnectHeaders {
        src_ip: forwarded.unwrap_or(IpAddr::from([10, 0, 0, 1])),
        service_host: Some(text.to_string()),
        baggage: baggage.clone(),
        traceparent: Some(text.to_string()),
    };
    let req = connect_request(SocketAddr::from(([10, 0, 0, 2], 80)), &h);
    let get = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &http::HeaderValue| v.to_str().ok())
    };
    assert_eq!(get(FORWARDED).and_then(parse_forwarded_for), Some(h.src_ip));
    let tp = get(TRACEPARENT).unwrap_or_default();
    assert!(valid_traceparent(tp));
    assert_eq!(tp == text, tp_valid);
    // Keys that are tokens survive a write and a read, values byte-exact.
    let written = get(BAGGAGE).map(parse_baggage).unwrap_or_default();
    let tokens: Vec<(String, String)> = baggage
        .into_iter()
        .filter(|(k, _)| {
            k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        })
        .collect();
    assert_eq!(written, tokens);
});
