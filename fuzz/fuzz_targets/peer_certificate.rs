//! A peer's end-entity certificate as it arrives in a handshake (RELIABILITY 3): any DER
//! never panics the SAN/SPIFFE reading or the leaf rules; an identity read from it is
//! always a well-formed SPIFFE ID, and both roles read the same one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_pki::tls::{identity_from_cert, verify_leaf, Role};
use rustls_pki_types::CertificateDer;

fuzz_target!(|data: &[u8]| {
    let cert = CertificateDer::from(data);
    let id = identity_from_cert(&cert);
    if let Ok(id) = &id {
        assert!(id.uri().starts_with("spiffe://"));
    }
    for role in [Role::Client, Role::Server] {
        if let Ok(leaf) = verify_leaf(&cert, role) {
            assert_eq!(Some(&leaf), id.as_ref().ok());
        }
    }
});
