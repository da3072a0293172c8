//! RequestAuthentication translation: what loads, and every refusal with its field.

use super::*;
use crate::model::JwksSource;

/// One P-256 key (public, from RFC 7515 A.3).
const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","kid":"k1","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0"}]}"#;

fn ra(rules: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\n\
         metadata: {{name: jwt, namespace: shop}}\n\
         spec:\n  targetRefs: [{{kind: Service, group: \"\", name: web}}]\n  jwtRules:\n{rules}"
    )
}

fn load(doc: &str) -> Result<Model, ConfigError> {
    load_docs(&[("ra.yaml".to_string(), doc.to_string())])
}

#[test]
fn request_authentications_load() {
    let doc = ra(&format!(
        "  - issuer: https://issuer\n    audiences: [web]\n    jwks: '{JWKS}'\n    \
         fromHeaders: [{{name: X-Jwt, prefix: 'Token '}}]\n    fromParams: [jwt]\n    \
         forwardOriginalToken: true\n    outputPayloadToHeader: X-Payload\n  \
         - issuer: other\n    jwksUri: http://10.0.0.9:8000/jwks.json\n"
    ));
    let m = load(&doc).expect("loads");
    let ra = &m.request_authentications[0];
    assert_eq!((ra.namespace.as_str(), ra.name.as_str()), ("shop", "jwt"));
    assert_eq!(ra.target_refs[0].name, "web");
    let [a, b] = &ra.jwt_rules[..] else {
        panic!("two rules")
    };
    assert_eq!(a.audiences, ["web"]);
    assert!(matches!(&a.jwks, JwksSource::Inline { keys, .. } if keys.len() == 1));
    assert_eq!(a.from_headers[0].name, "x-jwt");
    assert_eq!(a.from_headers[0].prefix, "Token ");
    assert_eq!(a.from_params, ["jwt"]);
    assert!(a.forward_original_token);
    assert_eq!(a.output_payload_to_header.as_deref(), Some("x-payload"));
    assert!(matches!(&b.jwks, JwksSource::Uri(u) if u == "http://10.0.0.9:8000/jwks.json"));
    assert!(!b.forward_original_token);
    // No spec: no rules (accepts only tokenless requests... and every token is foreign).
    let empty =
        "apiVersion: security.istio.io/v1beta1\nkind: RequestAuthentication\nmetadata: {name: e}\n";
    assert!(load(empty).expect("empty").request_authentications[0]
        .jwt_rules
        .is_empty());
}

#[test]
fn invalid_request_authentications_are_refused_by_field() {
    let inline = format!("    jwks: '{JWKS}'\n");
    let cases: Vec<(String, &str)> = vec![
        (ra("  - {}\n"), "spec.jwtRules[0].issuer: required"),
        (ra(&format!("  - issuer: ''\n{inline}")), "spec.jwtRules[0].issuer: must not be empty"),
        (ra("  - issuer: a\n"), "spec.jwtRules[0]: one of jwks or jwksUri is required"),
        (
            ra(&format!("  - issuer: a\n{inline}    jwksUri: http://x/\n")),
            "spec.jwtRules[0].jwksUri: only one of jwks or jwksUri",
        ),
        (ra("  - issuer: a\n    jwks: '{\"keys\":[]}'\n"), "spec.jwtRules[0].jwks: jwks has no RS256 or ES256 key"),
        (ra("  - issuer: a\n    jwks: 'not json'\n"), "spec.jwtRules[0].jwks: jwks is not valid JSON"),
        (
            ra("  - issuer: a\n    jwks: '{\"keys\":[{\"kty\":\"oct\",\"k\":\"c2VjcmV0\"}]}'\n"),
            "jwks has no RS256 or ES256 key",
        ),
        (ra("  - issuer: a\n    jwksUri: ftp://x/jwks\n"), "spec.jwtRules[0].jwksUri: URL \"ftp://x/jwks\" must be http or https"),
        (ra("  - issuer: a\n    jwksUri: /jwks\n"), "spec.jwtRules[0].jwksUri"),
        (
            ra(&format!("  - issuer: a\n{inline}    fromHeaders: [{{prefix: x}}]\n")),
            "spec.jwtRules[0].fromHeaders[0].name: required",
        ),
        (
            ra(&format!("  - issuer: a\n{inline}    fromHeaders: [{{name: 'bad header'}}]\n")),
            "invalid header name",
        ),
        (
            ra(&format!("  - issuer: a\n{inline}    outputPayloadToHeader: host\n")),
            "spec.jwtRules[0].outputPayloadToHeader: header \"host\" cannot be used",
        ),
        (
            ra(&format!("  - issuer: a\n{inline}    fromParams: ['a=b']\n")),
            "spec.jwtRules[0].fromParams[0]: invalid query parameter name",
        ),
        (
            ra(&format!("  - issuer: a\n{inline}    fromCookies: [session]\n")),
            "spec.jwtRules[0].fromCookies: not supported",
        ),
        (
            ra(&format!("  - issuer: a\n{inline}    jwks_uri: http://x/\n")),
            "spec.jwtRules[0].jwks_uri: unknown field",
        ),
        (
            ra(&format!("  - issuer: a\n{inline}  - issuer: a\n{inline}")),
            "spec.jwtRules[1]: duplicate issuer",
        ),
        (
            ra(&format!("  - issuer: a\n{inline}    forwardOriginalToken: yes-please\n")),
            "spec.jwtRules[0].forwardOriginalToken: expected a boolean",
        ),
        (
            "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: x}\n\
             spec:\n  selector: {matchLabels: {app: a}}\n  targetRefs: [{kind: Service, name: a}]\n"
                .to_string(),
            "only one of targetRefs or selector",
        ),
    ];
    for (doc, want) in cases {
        let got = load(&doc).map(|_| ()).expect_err(want).to_string();
        assert!(got.contains(want), "{got:?} does not contain {want:?}");
        assert!(got.contains("RequestAuthentication"), "{got}");
    }
}
