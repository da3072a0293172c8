//! A certificate signing request as a CA client sends it: never panics, as PEM text or as
//! any DER inside a well-formed PEM block; an accepted one has a URI SAN.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_pki::csr::Csr;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(csr) = Csr::parse_pem(text) {
            assert!(!csr.uri_sans().is_empty());
        }
    }
    let block = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", data.to_vec()));
    if let Ok(csr) = Csr::parse_pem(&block) {
        assert!(!csr.uri_sans().is_empty());
    }
});
