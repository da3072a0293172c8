//! The HBONE `CONNECT` target a peer sends: never panics; an accepted one is exactly an
//! `ip:port` with a port, and the request we build for it is accepted as the same address.
#![no_main]

use std::net::SocketAddr;

use libfuzzer_sys::fuzz_target;
use mesh_hbone::{connect_authority, connect_request, ConnectHeaders};

fuzz_target!(|data: &[u8]| {
    let Ok(uri) = http::Uri::try_from(data) else {
        return;
    };
    let Ok(addr) = connect_authority(&uri) else {
        return;
    };
    assert_ne!(addr.port(), 0);
    assert_eq!(
        std::str::from_utf8(data)
            .ok()
            .and_then(|s| s.parse::<SocketAddr>().ok()),
        Some(addr)
    );
    let h = ConnectHeaders {
        src_ip: addr.ip(),
        service_host: None,
        baggage: Vec::new(),
        traceparent: None,
    };
    let again = connect_authority(connect_request(addr, &h).uri()).map(|a| (a.ip(), a.port()));
    assert_eq!(again.ok(), Some((addr.ip(), addr.port())));
});
