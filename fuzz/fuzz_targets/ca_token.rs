//! The CA's token check on a bearer token a client sends: never panics, and nothing the
//! fuzzer writes verifies (it never sees the signing key).
#![no_main]

use std::sync::OnceLock;

use control::token::{service_account_of, TokenAuthority, DEFAULT_AUDIENCE};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    static CA: OnceLock<Option<TokenAuthority>> = OnceLock::new();
    let Some(ca) = CA.get_or_init(|| TokenAuthority::ephemeral().ok()) else {
        return;
    };
    let text = String::from_utf8_lossy(data);
    if let Ok((ns, sa)) = service_account_of(&text) {
        assert_eq!(format!("system:serviceaccount:{ns}:{sa}"), text);
    }
    assert!(ca.verify(&text, DEFAULT_AUDIENCE).is_err());
});
