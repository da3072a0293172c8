//! Property tests of the CA's token handling: any bearer token, any subject, and any change
//! to a minted token never panic and never verify.

use proptest::prelude::*;

use super::*;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// `service_account_of` on any username: no panic; an accepted one is exactly the
    /// canonical form of what it returns.
    #[test]
    fn service_account_of_any_username(name in "(system:serviceaccount:)?[a-z:-]{0,16}|\\PC{0,40}") {
        match service_account_of(&name) {
            Ok((ns, sa)) => prop_assert_eq!(format!("system:serviceaccount:{ns}:{sa}"), name),
            Err(e) => prop_assert_eq!(e.reason(), "token_subject"),
        }
    }

    /// Any text as a token: refused with a reason, never a panic.
    #[test]
    fn any_text_is_refused(raw in "\\PC{0,120}|[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}\\.[A-Za-z0-9_-]{0,40}") {
        let ta = authority();
        let err = ta.verify(&raw, DEFAULT_AUDIENCE).err();
        prop_assert!(err.is_some());
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// A minted token with any one byte changed, cut or added never verifies.
    #[test]
    fn mutated_tokens_never_verify(ns in "[a-z]{1,8}", sa in "[a-z]{1,8}", at in any::<usize>(), byte in any::<u8>(), op in 0u8..3) {
        let ta = authority();
        let claims = TokenClaims {
            namespace: ns.clone(),
            service_account: sa.clone(),
            node: None,
            pod: None,
            audience: DEFAULT_AUDIENCE.into(),
            ttl: Duration::from_secs(600),
        };
        let token = ta.mint(&claims).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let caller = ta.verify(&token, DEFAULT_AUDIENCE).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!((caller.namespace, caller.service_account), (ns, sa));
        let mut bytes = token.clone().into_bytes();
        let i = at % bytes.len();
        match op {
            0 => bytes[i] = byte,
            1 => bytes.truncate(i),
            _ => bytes.insert(i, byte),
        }
        let Ok(mutated) = String::from_utf8(bytes) else { return Ok(()) };
        if mutated != token {
            prop_assert!(ta.verify(&mutated, DEFAULT_AUDIENCE).is_err(), "{mutated}");
        }
    }
}

/// One authority per test thread (key generation is the slow part).
fn authority() -> std::sync::Arc<TokenAuthority> {
    thread_local! {
        static TA: std::sync::Arc<TokenAuthority> =
            std::sync::Arc::new(TokenAuthority::ephemeral().expect("token key"));
    }
    TA.with(std::sync::Arc::clone)
}
