//! A JWT as a client sends it: decoding and verifying never panic, and nothing verifies
//! against a key nobody here holds the private half of.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use mesh_model::jwt::{Jwks, Token};

/// One P-256 public key (RFC 7515 A.3) and one RSA-2048-sized modulus of ones.
const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

fuzz_target!(|data: &[u8]| {
    static KEYS: OnceLock<Option<Jwks>> = OnceLock::new();
    let Some(keys) = KEYS.get_or_init(|| Jwks::parse(JWKS.as_bytes()).ok()) else {
        return;
    };
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(token) = Token::decode(raw) else {
        return;
    };
    let issuer = token.issuer().unwrap_or_default().to_string();
    assert!(token.verify(keys, &issuer, &[], 1_700_000_000).is_err());
});
