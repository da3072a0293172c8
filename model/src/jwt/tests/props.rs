//! Property tests of token and key-set parsing (RELIABILITY 27): arbitrary and mutated input
//! never panics, and no change to a signed token keeps it valid.

use proptest::prelude::*;

use super::*;

fn config() -> ProptestConfig {
    ProptestConfig::with_cases(256)
}

/// JSON values a hostile issuer or client could put anywhere.
fn any_json() -> impl Strategy<Value = Json> {
    let leaf = prop_oneof![
        Just(Json::Null),
        any::<bool>().prop_map(Json::from),
        any::<i64>().prop_map(Json::from),
        any::<f64>().prop_map(|f| serde_json::Number::from_f64(f).map_or(Json::Null, Json::Number)),
        "\\PC{0,12}".prop_map(Json::from),
        prop_oneof![
            Just("RS256"),
            Just("ES256"),
            Just("RSA"),
            Just("EC"),
            Just("P-256"),
            Just("sig")
        ]
        .prop_map(Json::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..4).prop_map(Json::Array),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("alg".to_string()),
                    Just("kid".to_string()),
                    Just("kty".to_string()),
                    Just("n".to_string()),
                    Just("e".to_string()),
                    Just("x".to_string()),
                    Just("y".to_string()),
                    Just("crv".to_string()),
                    Just("use".to_string()),
                    Just("iss".to_string()),
                    Just("exp".to_string()),
                    Just("aud".to_string()),
                    "[a-z]{1,4}",
                ],
                inner,
                0..5,
            )
            .prop_map(|m| Json::Object(m.into_iter().collect())),
        ]
    })
}

fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        any_json().prop_map(|j| URL_SAFE_NO_PAD.encode(j.to_string())),
        "[A-Za-z0-9_=+/-]{0,16}",
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Any text as a token: no panic, and a decoded token has exactly three segments.
    #[test]
    fn decode_any_text(raw in "\\PC{0,200}|[A-Za-z0-9_.-]{0,80}") {
        if Token::decode(&raw).is_ok() {
            prop_assert_eq!(raw.split('.').count(), 3);
        }
    }

    /// Structurally plausible tokens (base64url JSON segments): decoding and verifying never
    /// panic, and nothing unsigned ever verifies.
    #[test]
    fn verify_any_structured_token(h in segment(), p in segment(), s in segment(), now in any::<u64>()) {
        let raw = format!("{h}.{p}.{s}");
        let Ok(token) = Token::decode(&raw) else { return Ok(()) };
        let keys = jwks(&[Signer::ec().jwk("k1")]);
        let _ = token.issuer();
        prop_assert!(token.verify(&keys, ISS, &[], now).is_err());
    }

    /// Any JWKS document: no panic; a parsed set is never empty and never over the limit.
    #[test]
    fn jwks_any_document(doc in any_json(), keys in proptest::collection::vec(any_json(), 0..6)) {
        for bytes in [doc.to_string(), json!({ "keys": keys }).to_string()] {
            if let Ok(set) = Jwks::parse(bytes.as_bytes()) {
                prop_assert!(!set.is_empty() && set.len() <= MAX_JWKS_KEYS);
            }
        }
    }

    /// JWKS bytes: no panic on anything (truncated, not UTF-8, deeply nested).
    #[test]
    fn jwks_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..256), depth in 0usize..200) {
        let _ = Jwks::parse(&bytes);
        let nested = format!("{{\"keys\":{}{}", "[".repeat(depth), "]".repeat(depth)) + "}";
        let _ = Jwks::parse(nested.as_bytes());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A valid token with any one byte changed (or cut short, or extended) never verifies.
    #[test]
    fn mutated_tokens_never_verify(at in any::<usize>(), byte in any::<u8>(), op in 0u8..3) {
        let signer = Signer::ec();
        let keys = jwks(&[signer.jwk("k1")]);
        let token = signer.token("k1", &claims());
        prop_assert!(verify(&token, &keys, &[]).is_ok());
        let mut bytes = token.clone().into_bytes();
        let i = at % bytes.len();
        match op {
            0 => bytes[i] = byte,
            1 => bytes.truncate(i),
            _ => bytes.insert(i, byte),
        }
        let Ok(mutated) = String::from_utf8(bytes) else { return Ok(()) };
        if mutated != token {
            prop_assert!(verify(&mutated, &keys, &[]).is_err(), "{mutated}");
        }
    }
}
