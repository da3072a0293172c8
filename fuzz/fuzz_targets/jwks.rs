//! A JWKS document (inline or fetched): never panics; a parsed set is non-empty and bounded.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_model::jwt::{Jwks, MAX_JWKS_KEYS};

fuzz_target!(|data: &[u8]| {
    if let Ok(set) = Jwks::parse(data) {
        assert!(!set.is_empty() && set.len() <= MAX_JWKS_KEYS);
    }
});
