//! The waypoint's downstream checks on a request head: `derive_authority` and the framing
//! checks never panic; an authority that is accepted is a valid, userinfo-free authority.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_l7::engine::downstream::{derive_authority, framing_error};

fuzz_target!(|data: &[u8]| {
    // Lines: method, target, then `name: value` headers.
    let mut lines = data.split(|b| *b == b'\n');
    let method = lines.next().unwrap_or_default();
    let target = lines.next().unwrap_or_default();
    let mut builder = http::Request::builder()
        .method(http::Method::from_bytes(method).unwrap_or(http::Method::GET))
        .uri(http::Uri::try_from(target).unwrap_or_default());
    for line in lines {
        let mut kv = line.splitn(2, |b| *b == b':');
        let (Some(k), Some(v)) = (kv.next(), kv.next()) else {
            continue;
        };
        let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k),
            http::HeaderValue::from_bytes(v.trim_ascii()),
        ) else {
            continue;
        };
        builder = builder.header(k, v);
    }
    let Ok(req) = builder.body(()) else { return };
    let (parts, ()) = req.into_parts();
    for h2 in [false, true] {
        let _ = framing_error(&parts, h2);
        if let Ok(Some(a)) = derive_authority(&parts.uri, &parts.headers, h2) {
            assert!(!a.contains('@'), "{a:?}");
            if !a.is_empty() {
                assert!(http::uri::Authority::try_from(a.as_str()).is_ok(), "{a:?}");
            }
        }
    }
});
