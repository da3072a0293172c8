//! Table tests for token verification and request authentication, with tokens signed here
//! (ES256 keys generated per run; RS256 with two fixed test-only RSAPrivateKey DER keys in `testdata/`).

use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use http::{HeaderMap, HeaderName, HeaderValue};
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, KeyPair, RsaKeyPair, RsaPublicKeyComponents, ECDSA_P256_SHA256_FIXED_SIGNING,
    RSA_PKCS1_SHA256,
};
use serde_json::{json, Value as Json};

use super::*;
use crate::model::{JwksSource, JwtHeader, JwtRule};
use crate::policy::authn::{authenticate, Outcome};

const RSA_DER: &[u8] = include_bytes!("testdata/rsa2048.der");
const RSA_OTHER_DER: &[u8] = include_bytes!("testdata/rsa2048-other.der");
const NOW: u64 = 1_700_000_000;
const ISS: &str = "https://issuer.example";

enum Signer {
    Rsa(RsaKeyPair),
    Ec(EcdsaKeyPair),
}

impl Signer {
    fn rsa(der: &[u8]) -> Signer {
        Signer::Rsa(RsaKeyPair::from_der(der).expect("rsa key"))
    }

    fn ec() -> Signer {
        let rng = SystemRandom::new();
        let pk8 =
            EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("generate");
        Signer::Ec(
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pk8.as_ref(), &rng)
                .expect("ec key"),
        )
    }

    fn jwk(&self, kid: &str) -> Json {
        match self {
            Signer::Rsa(k) => {
                let c: RsaPublicKeyComponents<Vec<u8>> = k.public().into();
                json!({"kty": "RSA", "kid": kid, "alg": "RS256", "use": "sig",
                       "n": URL_SAFE_NO_PAD.encode(&c.n), "e": URL_SAFE_NO_PAD.encode(&c.e)})
            }
            Signer::Ec(k) => {
                let p = k.public_key().as_ref();
                json!({"kty": "EC", "kid": kid, "crv": "P-256",
                       "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..65])})
            }
        }
    }

    fn alg(&self) -> &'static str {
        match self {
            Signer::Rsa(_) => "RS256",
            Signer::Ec(_) => "ES256",
        }
    }

    fn sign_raw(&self, input: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match self {
            Signer::Rsa(k) => {
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &rng, input, &mut sig)
                    .expect("sign");
                sig
            }
            Signer::Ec(k) => k.sign(&rng, input).expect("sign").as_ref().to_vec(),
        }
    }

    /// A compact token with `header` and `claims`.
    fn token_with(&self, header: &Json, claims: &Json) -> String {
        let h = URL_SAFE_NO_PAD.encode(header.to_string());
        let p = URL_SAFE_NO_PAD.encode(claims.to_string());
        let input = format!("{h}.{p}");
        let sig = URL_SAFE_NO_PAD.encode(self.sign_raw(input.as_bytes()));
        format!("{input}.{sig}")
    }

    fn token(&self, kid: &str, claims: &Json) -> String {
        self.token_with(
            &json!({"alg": self.alg(), "kid": kid, "typ": "JWT"}),
            claims,
        )
    }
}

fn jwks(keys: &[Json]) -> Jwks {
    Jwks::parse(json!({ "keys": keys }).to_string().as_bytes()).expect("jwks")
}

fn claims() -> Json {
    json!({"iss": ISS, "sub": "alice", "aud": ["web", "api"], "azp": "cli",
           "exp": NOW + 3600, "nbf": NOW - 10, "groups": ["admins"], "org": {"team": "a"}})
}

fn with(mut base: Json, key: &str, value: Json) -> Json {
    if value.is_null() {
        base.as_object_mut().expect("object").remove(key);
    } else {
        base[key] = value;
    }
    base
}

fn verify(token: &str, keys: &Jwks, audiences: &[&str]) -> Result<RequestAuth, JwtError> {
    let audiences: Vec<String> = audiences.iter().map(|a| a.to_string()).collect();
    Token::decode(token)?.verify(keys, ISS, &audiences, NOW)
}

#[test]
fn valid_rs256_and_es256_tokens_yield_the_request_auth() {
    for signer in [Signer::rsa(RSA_DER), Signer::ec()] {
        let keys = jwks(&[signer.jwk("k1")]);
        let auth = verify(&signer.token("k1", &claims()), &keys, &["api"]).expect("valid");
        assert_eq!(auth.principal(), format!("{ISS}/alice"));
        assert_eq!(auth.audiences, ["web", "api"]);
        assert_eq!(auth.presenter.as_deref(), Some("cli"));
        assert_eq!(auth.claims["org"]["team"], "a");
        // Without a kid, every key of the right type is tried.
        let no_kid = signer.token_with(&json!({"alg": signer.alg()}), &claims());
        let two = jwks(&[Signer::ec().jwk("other"), signer.jwk("k1")]);
        verify(&no_kid, &two, &[]).expect("no kid");
    }
}

#[test]
fn bad_tokens_are_refused_with_the_reason() {
    let rsa = Signer::rsa(RSA_DER);
    let ec = Signer::ec();
    let keys = jwks(&[rsa.jwk("rsa"), ec.jwk("ec")]);
    let good = rsa.token("rsa", &claims());
    let (h, rest) = good.split_once('.').expect("h");
    let (p, s) = rest.split_once('.').expect("p");
    let tampered_payload = URL_SAFE_NO_PAD.encode(with(claims(), "sub", json!("root")).to_string());
    let mut sig_bytes = URL_SAFE_NO_PAD.decode(s).expect("sig");
    sig_bytes[10] ^= 1;
    let b64 = |v: &Json| URL_SAFE_NO_PAD.encode(v.to_string());
    // An HS256 token whose "secret" is the RSA key's public JWK (the confusion attack).
    let hs_header = b64(&json!({"alg": "HS256", "kid": "rsa"}));
    let hs = format!("{hs_header}.{p}.{s}");
    let none = format!("{}.{p}.", b64(&json!({"alg": "none"})));
    let none_sig = format!("{}.{p}.{s}", b64(&json!({"alg": "none"})));
    let cases: Vec<(&str, String, JwtError)> = vec![
        ("alg none, empty signature", none, JwtError::Malformed),
        (
            "alg none",
            none_sig,
            JwtError::UnsupportedAlg("none".into()),
        ),
        ("HS256", hs, JwtError::UnsupportedAlg("HS256".into())),
        (
            "RS384",
            format!("{}.{p}.{s}", b64(&json!({"alg": "RS384"}))),
            JwtError::UnsupportedAlg("RS384".into()),
        ),
        (
            "no alg",
            format!("{}.{p}.{s}", b64(&json!({"kid": "rsa"}))),
            JwtError::UnsupportedAlg(String::new()),
        ),
        (
            "crit",
            format!("{}.{p}.{s}", b64(&json!({"alg": "RS256", "crit": ["exp"]}))),
            JwtError::Crit,
        ),
        (
            "ES256 header on an RSA key's kid",
            format!("{}.{p}.{s}", b64(&json!({"alg": "ES256", "kid": "rsa"}))),
            JwtError::UnknownKid,
        ),
        (
            "RS256 header on the EC key's kid",
            rsa.token("ec", &claims()),
            JwtError::UnknownKid,
        ),
        (
            "unknown kid",
            rsa.token("nope", &claims()),
            JwtError::UnknownKid,
        ),
        (
            "tampered payload",
            format!("{h}.{tampered_payload}.{s}"),
            JwtError::BadSignature,
        ),
        (
            "flipped signature bit",
            format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(&sig_bytes)),
            JwtError::BadSignature,
        ),
        (
            "signed by another key with the same kid",
            Signer::rsa(RSA_OTHER_DER).token("rsa", &claims()),
            JwtError::BadSignature,
        ),
        (
            "expired",
            rsa.token("rsa", &with(claims(), "exp", json!(NOW - 61))),
            JwtError::Expired,
        ),
        (
            "not yet valid",
            rsa.token("rsa", &with(claims(), "nbf", json!(NOW + 61))),
            JwtError::NotYetValid,
        ),
        (
            "wrong issuer",
            rsa.token("rsa", &with(claims(), "iss", json!("https://evil"))),
            JwtError::UnknownIssuer,
        ),
        (
            "no issuer",
            rsa.token("rsa", &with(claims(), "iss", Json::Null)),
            JwtError::UnknownIssuer,
        ),
        (
            "audience not listed",
            rsa.token("rsa", &with(claims(), "aud", json!("other"))),
            JwtError::AudienceNotAllowed,
        ),
        (
            "no audience",
            rsa.token("rsa", &with(claims(), "aud", Json::Null)),
            JwtError::AudienceNotAllowed,
        ),
        (
            "exp not a number",
            rsa.token("rsa", &with(claims(), "exp", json!("tomorrow"))),
            JwtError::ClaimType("exp"),
        ),
        (
            "aud list of numbers",
            rsa.token("rsa", &with(claims(), "aud", json!([1]))),
            JwtError::ClaimType("aud"),
        ),
        (
            "sub not a string",
            rsa.token("rsa", &with(claims(), "sub", json!(7))),
            JwtError::ClaimType("sub"),
        ),
    ];
    for (name, token, want) in cases {
        assert_eq!(verify(&token, &keys, &["api"]), Err(want), "{name}");
    }
    // Within the leeway, still valid.
    let edge = with(claims(), "exp", json!(NOW - 59));
    let edge = with(edge, "nbf", json!(NOW + 59));
    verify(&rsa.token("rsa", &edge), &keys, &["api"]).expect("leeway");
}

#[test]
fn malformed_tokens_never_panic() {
    let rsa = Signer::rsa(RSA_DER);
    let good = rsa.token("rsa", &claims());
    let keys = jwks(&[rsa.jwk("rsa")]);
    let huge_header = format!(
        "{}.e30.c2ln",
        URL_SAFE_NO_PAD.encode(format!(
            "{{\"alg\":\"RS256\",\"x\":\"{}\"}}",
            "a".repeat(9000)
        ))
    );
    let deep = format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode("[".repeat(5000)));
    let cases: Vec<(String, JwtError)> = vec![
        (String::new(), JwtError::Malformed),
        ("a".into(), JwtError::Malformed),
        ("a.b".into(), JwtError::Malformed),
        ("a.b.c.d".into(), JwtError::Malformed),
        ("..".into(), JwtError::Malformed),
        (format!("{good}."), JwtError::Malformed),
        ("!!!.e30.c2ln".into(), JwtError::Base64(Segment::Header)),
        ("e30=.e30.c2ln".into(), JwtError::Base64(Segment::Header)),
        (
            format!("{}.e30.c2ln", STANDARD.encode("{\"alg\":\"RS256\"}?>")),
            JwtError::Base64(Segment::Header),
        ),
        ("bnVsbA.e30.c2ln".into(), JwtError::Json(Segment::Header)),
        (
            format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode("{\"alg\":")),
            JwtError::Json(Segment::Header),
        ),
        (deep, JwtError::Json(Segment::Header)),
        (
            format!("{}.W10.c2ln", URL_SAFE_NO_PAD.encode("{\"alg\":\"RS256\"}")),
            JwtError::Json(Segment::Payload),
        ),
        (
            format!("{}.e30.%%", URL_SAFE_NO_PAD.encode("{\"alg\":\"RS256\"}")),
            JwtError::Base64(Segment::Signature),
        ),
        (
            format!("{}.e30.c2ln", URL_SAFE_NO_PAD.encode("{\"alg\":5}")),
            JwtError::ClaimType("alg"),
        ),
        (huge_header, JwtError::TooLarge),
        (
            "\u{1F600}.\u{0}.\u{7f}".into(),
            JwtError::Base64(Segment::Header),
        ),
    ];
    for (token, want) in cases {
        let got = Token::decode(&token).and_then(|t| t.verify(&keys, ISS, &[], NOW));
        assert_eq!(got.err(), Some(want), "{token:.80}");
    }
    // A well-formed token with a signature of the wrong length is just a bad signature.
    let (head, _) = good.rsplit_once('.').expect("sig");
    let short = format!("{head}.c2ln");
    assert_eq!(
        verify(&short, &keys, &[]).err(),
        Some(JwtError::BadSignature)
    );
}

#[test]
fn jwks_documents_are_checked() {
    let ec = Signer::ec().jwk("e");
    let rsa = Signer::rsa(RSA_DER).jwk("r");
    let parse = |v: Json| Jwks::parse(v.to_string().as_bytes()).map(|k| k.len());
    assert_eq!(parse(json!({"keys": [ec.clone(), rsa.clone()]})), Ok(2));
    // Symmetric keys, other curves and algorithms, encryption keys: skipped, never used.
    let oct = json!({"kty": "oct", "k": "c2VjcmV0"});
    let p384 = with(ec.clone(), "crv", json!("P-384"));
    let rs512 = with(rsa.clone(), "alg", json!("RS512"));
    let enc = with(rsa.clone(), "use", json!("enc"));
    assert_eq!(
        parse(json!({"keys": [oct.clone(), p384, rs512, enc, ec.clone()]})),
        Ok(1)
    );
    assert_eq!(parse(json!({"keys": [oct]})), Err(JwksError::NoUsableKey));
    assert_eq!(parse(json!({"keys": []})), Err(JwksError::NoUsableKey));
    assert_eq!(parse(json!({"nokeys": []})), Err(JwksError::NoKeys));
    assert!(matches!(
        parse(json!({"keys": [with(rsa.clone(), "n", json!("AQAB"))]})),
        Err(JwksError::BadKey { index: 0, .. })
    ));
    assert!(matches!(
        parse(json!({"keys": [ec.clone(), with(ec.clone(), "x", json!("!!"))]})),
        Err(JwksError::BadKey { index: 1, .. })
    ));
    assert!(matches!(
        parse(json!({"keys": [with(ec.clone(), "kty", Json::Null)]})),
        Err(JwksError::BadKey { .. })
    ));
    assert!(matches!(Jwks::parse(b"{"), Err(JwksError::Json(_))));
    assert_eq!(
        Jwks::parse(&vec![b' '; MAX_JWKS_BYTES + 1]),
        Err(JwksError::TooLarge)
    );
    let many: Vec<Json> = (0..=MAX_JWKS_KEYS).map(|_| ec.clone()).collect();
    assert!(matches!(
        parse(json!({ "keys": many })),
        Err(JwksError::BadKey { .. })
    ));
}

// === authn ===

fn rule(keys: Jwks) -> JwtRule {
    JwtRule {
        issuer: ISS.to_string(),
        audiences: Vec::new(),
        jwks: JwksSource::Inline {
            json: String::new(),
            keys: Arc::new(keys),
        },
        from_headers: Vec::new(),
        from_params: Vec::new(),
        forward_original_token: false,
        output_payload_to_header: None,
    }
}

fn inline_keys(rule: &JwtRule) -> Option<Arc<Jwks>> {
    match &rule.jwks {
        JwksSource::Inline { keys, .. } => Some(keys.clone()),
        JwksSource::Uri(_) => None,
    }
}

fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(
            HeaderName::from_bytes(k.as_bytes()).expect("name"),
            HeaderValue::from_str(v).expect("value"),
        );
    }
    h
}

fn run(rules: &[&JwtRule], h: &HeaderMap, query: Option<&str>) -> Outcome {
    authenticate(rules, h, query, NOW, inline_keys)
}

fn denied(o: &Outcome) -> Option<&JwtError> {
    match o {
        Outcome::Denied(d) => Some(&d.error),
        _ => None,
    }
}

#[test]
fn requests_are_authenticated_from_the_configured_locations() {
    let ec = Signer::ec();
    let default_rule = rule(jwks(&[ec.jwk("k")]));
    let token = ec.token("k", &claims());
    let bearer = format!("Bearer {token}");
    let lower = format!("bearer {token}");

    // No token: anonymous.
    assert_eq!(
        run(&[&default_rule], &headers(&[]), None),
        Outcome::Anonymous
    );
    // Not a bearer token: not ours to judge.
    let basic = headers(&[("authorization", "Basic dXNlcjpwYXNz")]);
    assert_eq!(run(&[&default_rule], &basic, None), Outcome::Anonymous);

    for (h, q) in [
        (headers(&[("authorization", &bearer)]), None),
        (headers(&[("authorization", &lower)]), None),
        (headers(&[]), Some(format!("a=1&access_token={token}"))),
    ] {
        let Outcome::Authenticated(a) = run(&[&default_rule], &h, q.as_deref()) else {
            panic!("not authenticated");
        };
        assert_eq!(a.auth.principal(), format!("{ISS}/alice"));
        let from_header = h.contains_key("authorization");
        assert_eq!(a.remove_headers.is_empty(), !from_header);
    }

    // A custom header and prefix; the default locations no longer apply.
    let mut custom = rule(jwks(&[ec.jwk("k")]));
    custom.from_headers = vec![JwtHeader {
        name: "x-jwt".into(),
        prefix: "Token ".into(),
    }];
    custom.from_params = vec!["jwt".into()];
    custom.forward_original_token = true;
    custom.output_payload_to_header = Some("x-jwt-payload".into());
    let h = headers(&[("x-jwt", &format!("Token {token}"))]);
    let Outcome::Authenticated(a) = run(&[&custom], &h, None) else {
        panic!("custom header");
    };
    assert!(a.remove_headers.is_empty(), "forwardOriginalToken");
    let payload = token.split('.').nth(1).expect("payload");
    assert_eq!(a.output_headers, [("x-jwt-payload".into(), payload.into())]);
    assert_eq!(
        run(&[&custom], &headers(&[("authorization", &bearer)]), None),
        Outcome::Anonymous
    );
    assert!(matches!(
        run(&[&custom], &headers(&[]), Some(&format!("jwt={token}"))),
        Outcome::Authenticated(_)
    ));
    // The prefix is exact for configured headers.
    assert_eq!(
        run(
            &[&custom],
            &headers(&[("x-jwt", &format!("token {token}"))]),
            None
        ),
        Outcome::Anonymous
    );
}

#[test]
fn invalid_tokens_deny_even_next_to_a_valid_one() {
    let ec = Signer::ec();
    let r = rule(jwks(&[ec.jwk("k")]));
    let good = format!("Bearer {}", ec.token("k", &claims()));
    let expired = format!(
        "Bearer {}",
        ec.token("k", &with(claims(), "exp", json!(NOW - 3600)))
    );
    let foreign = format!(
        "Bearer {}",
        ec.token("k", &with(claims(), "iss", json!("https://other")))
    );
    let cases = [
        (vec![("authorization", expired.as_str())], JwtError::Expired),
        (
            vec![("authorization", foreign.as_str())],
            JwtError::UnknownIssuer,
        ),
        (
            vec![("authorization", "Bearer not-a-jwt")],
            JwtError::Malformed,
        ),
        (
            vec![
                ("authorization", good.as_str()),
                ("authorization", expired.as_str()),
            ],
            JwtError::Expired,
        ),
    ];
    for (h, want) in cases {
        let o = run(&[&r], &headers(&h), None);
        assert_eq!(denied(&o), Some(&want), "{h:?}");
    }
    // Too many distinct tokens.
    let many: Vec<String> = (0..=crate::policy::authn::MAX_TOKENS)
        .map(|i| format!("Bearer t{i}"))
        .collect();
    let h: Vec<(&str, &str)> = many.iter().map(|v| ("authorization", v.as_str())).collect();
    assert_eq!(
        denied(&run(&[&r], &headers(&h), None)),
        Some(&JwtError::Malformed)
    );
}

#[test]
fn two_issuers_share_the_default_header_and_remote_keys_fail_closed() {
    let (a, b) = (Signer::ec(), Signer::rsa(RSA_DER));
    let rule_a = rule(jwks(&[a.jwk("a")]));
    let mut rule_b = rule(jwks(&[b.jwk("b")]));
    rule_b.issuer = "issuer-b".into();
    rule_b.audiences = vec!["api".into()];
    let token_b = b.token("b", &with(claims(), "iss", json!("issuer-b")));
    let h = headers(&[("authorization", &format!("Bearer {token_b}"))]);
    let Outcome::Authenticated(auth) = run(&[&rule_a, &rule_b], &h, None) else {
        panic!("issuer b");
    };
    assert_eq!(auth.auth.principal(), "issuer-b/alice");

    // Remote keys not fetched (or not fetchable): refused, and the caller learns the URI.
    let mut remote = rule_a.clone();
    remote.jwks = JwksSource::Uri("http://keys.example/jwks".into());
    let h = headers(&[(
        "authorization",
        &format!("Bearer {}", a.token("a", &claims())),
    )]);
    let Outcome::Denied(d) = run(&[&remote], &h, None) else {
        panic!("fail closed");
    };
    assert_eq!(d.error, JwtError::JwksUnavailable);
    assert_eq!(d.jwks_uri.as_deref(), Some("http://keys.example/jwks"));
    // Fetched keys that lack the token's kid: the URI comes back for a refresh.
    let fetched = Arc::new(jwks(&[a.jwk("old")]));
    let o = authenticate(&[&remote], &h, None, NOW, |_| Some(fetched.clone()));
    assert!(
        matches!(&o, Outcome::Denied(d) if d.error == JwtError::UnknownKid && d.jwks_uri.is_some()),
        "{o:?}"
    );
}

mod props;
