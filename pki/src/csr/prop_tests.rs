//! Property tests of CSR parsing (what any CA client can send): generated requests for any
//! identity parse back to it; any change to one, or any bytes at all, never panic and are
//! never accepted with a SAN that was not signed.

use proptest::prelude::*;

use super::*;

fn identity() -> impl Strategy<Value = Identity> {
    (
        "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?",
        "[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?",
    )
        .prop_map(|(ns, sa)| Identity::new("cluster.local", &ns, &sa))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A request for any identity parses back to exactly that identity; any byte of its DER
    /// changed gives a refusal or the same SANs (never another identity: the signature
    /// covers them).
    #[test]
    fn generated_requests_round_trip_and_resist_mutation(id in identity(), at in any::<usize>(), byte in any::<u8>()) {
        let (text, _key) = generate(&id).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let csr = Csr::parse_pem(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(csr.uri_sans(), [id.uri()]);
        let block = pem::parse(&text).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut der = block.contents().to_vec();
        let i = at % der.len();
        if der[i] == byte {
            return Ok(());
        }
        der[i] = byte;
        let mutated = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        if let Ok(csr) = Csr::parse_pem(&mutated) {
            prop_assert_eq!(csr.uri_sans(), [id.uri()]);
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Any text, and any bytes as the DER of a well-formed PEM block: no panic, and nothing
    /// unsigned is accepted.
    #[test]
    fn any_input_never_panics(text in "\\PC{0,200}", der in proptest::collection::vec(any::<u8>(), 0..300)) {
        prop_assert!(Csr::parse_pem(&text).is_err());
        let block = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", der));
        prop_assert!(Csr::parse_pem(&block).is_err());
    }
}
