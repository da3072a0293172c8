//! Ingress translation: the listeners of a Gateway of class `istio` (strict) and of other
//! classes (lenient), `kubernetes.io/tls` Secrets and ReferenceGrants; what each becomes,
//! and the named error of each invalid one.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use super::*;
use crate::model::{
    AllowedRoutes, ListenerProtocol, ListenerTls, ListenerTlsMode, ReferenceGrantFrom,
    ReferenceGrantTo, RouteNamespaces, SecretRef,
};

/// A PEM certificate as far as the translator checks one (the body is not a certificate).
pub(crate) const CERT_PEM: &str = "-----BEGIN CERTIFICATE-----\n\
    dGVzdCBjZXJ0aWZpY2F0ZSBieXRlcywgbm90IGEgcmVhbCBjZXJ0aWZpY2F0ZQ==\n\
    -----END CERTIFICATE-----\n";
/// A PEM private key as far as the translator checks one (not a key).
pub(crate) const KEY_PEM: &str = "-----BEGIN PRIVATE KEY-----\n\
    dGVzdCBrZXkgYnl0ZXMsIG5vdCBhIHJlYWwgcHJpdmF0ZSBrZXkh\n\
    -----END PRIVATE KEY-----\n";

fn load(file: &str, text: &str) -> Result<Model, String> {
    load_docs(&[(file.to_string(), text.to_string())]).map_err(|e| e.to_string())
}

/// The Gateway `istio-ingress/ingress` of class `class` with `listeners` (YAML, indented
/// by two under `spec`).
fn gateway_doc(class: &str, listeners: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {{name: ingress, namespace: istio-ingress}}\n\
         spec:\n  gatewayClassName: {class}\n{listeners}"
    )
}

#[test]
fn ingress_listeners_become_typed_model_data() {
    let doc = gateway_doc(
        "istio",
        r#"  listeners:
  - {name: http, port: 80, protocol: HTTP, hostname: "*.example.com", allowedRoutes: {namespaces: {from: All}}}
  - name: https
    port: 443
    protocol: HTTPS
    hostname: bookinfo.example.com
    tls: {mode: Terminate, certificateRefs: [{kind: Secret, name: bookinfo-cert, namespace: bookinfo}, {group: "", name: local}]}
    allowedRoutes: {namespaces: {from: Selector, selector: {matchLabels: {shared-gateway-access: "true"}}}}
  - {name: pass, port: 8443, protocol: TLS, tls: {mode: Passthrough}, allowedRoutes: {kinds: [{kind: TLSRoute}, {group: example.com, kind: Foo}]}}
  - {name: tcp, port: 9000, protocol: TCP}
  - {name: dns, port: 53, protocol: UDP}
  - {name: same, port: 8080, protocol: HTTP, allowedRoutes: {namespaces: {from: Same, selector: {matchLabels: {ignored: "yes"}}}}}
"#,
    );
    let m = load("gw.yaml", &doc).expect("valid gateway");
    let gw = &m.gateways[&NamespacedName::new("istio-ingress", "ingress")];
    assert!(gw.is_ingress() && !gw.is_waypoint());
    let names: Vec<&str> = gw.listeners.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names, ["http", "https", "pass", "tcp", "dns", "same"]);

    let http = gw.listener("http").expect("http");
    assert_eq!(
        (
            http.port,
            &http.protocol,
            http.hostname.as_deref(),
            &http.tls
        ),
        (80, &ListenerProtocol::Http, Some("*.example.com"), &None)
    );
    assert_eq!(
        http.allowed_routes,
        AllowedRoutes {
            from: RouteNamespaces::All,
            kinds: vec![]
        }
    );

    let https = gw.listener("https").expect("https");
    assert_eq!(
        https.tls,
        Some(ListenerTls {
            mode: ListenerTlsMode::Terminate,
            certificate_refs: vec![
                SecretRef {
                    namespace: "bookinfo".into(),
                    name: "bookinfo-cert".into()
                },
                SecretRef {
                    namespace: "istio-ingress".into(),
                    name: "local".into()
                },
            ],
        }),
        "a ref's namespace defaults to the Gateway's"
    );
    let mut selector = Labels::new();
    selector.insert("shared-gateway-access".into(), "true".into());
    assert_eq!(
        https.allowed_routes.from,
        RouteNamespaces::Selector(selector)
    );

    let pass = gw.listener("pass").expect("pass");
    assert_eq!(
        pass.tls
            .as_ref()
            .map(|t| (t.mode, t.certificate_refs.len())),
        Some((ListenerTlsMode::Passthrough, 0))
    );
    assert_eq!(
        pass.allowed_routes.kinds,
        ["TLSRoute", "example.com/Foo"],
        "kinds as written, another group's prefixed"
    );
    assert_eq!(
        gw.listener("tcp").map(|l| &l.protocol),
        Some(&ListenerProtocol::Tcp)
    );
    assert_eq!(
        gw.listener("dns").map(|l| &l.protocol),
        Some(&ListenerProtocol::Unsupported("UDP".into())),
        "kept for status to call unsupported"
    );
    assert_eq!(
        gw.listener("same").map(|l| &l.allowed_routes.from),
        Some(&RouteNamespaces::Same),
        "a selector is ignored unless from is Selector"
    );
}

#[test]
fn malformed_ingress_listeners_are_refused_by_field() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "missing name, with file, document and object",
            "  listeners: [{port: 80, protocol: HTTP}]\n",
            "gw.yaml doc 1: Gateway istio-ingress/ingress: spec.listeners[0].name: required",
        ),
        (
            "missing port",
            "  listeners: [{name: a, protocol: HTTP}]\n",
            "spec.listeners[0].port: required",
        ),
        (
            "missing protocol",
            "  listeners: [{name: a, port: 80}]\n",
            "spec.listeners[0].protocol: required",
        ),
        (
            "port out of range",
            "  listeners: [{name: a, port: 70000, protocol: HTTP}]\n",
            "spec.listeners[0].port: port 70000 out of range 1-65535",
        ),
        (
            "port zero",
            "  listeners: [{name: a, port: 0, protocol: HTTP}]\n",
            "spec.listeners[0].port: port 0 out of range",
        ),
        (
            "no listeners",
            "  addresses: []\n",
            "spec.listeners: required",
        ),
        (
            "empty listeners",
            "  listeners: []\n",
            "spec.listeners: at least one listener is required",
        ),
        (
            "duplicate names",
            "  listeners: [{name: a, port: 80, protocol: HTTP}, {name: a, port: 81, protocol: HTTP}]\n",
            "spec.listeners[1].name: listener name \"a\" used twice",
        ),
        (
            "same port, protocol and hostname",
            "  listeners: [{name: a, port: 80, protocol: HTTP, hostname: x.example.com}, {name: b, port: 80, protocol: HTTP, hostname: x.example.com}]\n",
            "spec.listeners[1]: port, protocol and hostname already used by listener \"a\"",
        ),
        (
            "invalid name",
            "  listeners: [{name: Bad_Name, port: 80, protocol: HTTP}]\n",
            "spec.listeners[0].name: invalid name",
        ),
        (
            "invalid hostname",
            "  listeners: [{name: a, port: 80, protocol: HTTP, hostname: 10.0.0.1}]\n",
            "spec.listeners[0].hostname: invalid hostname",
        ),
        (
            "empty protocol",
            "  listeners: [{name: a, port: 80, protocol: \"\"}]\n",
            "spec.listeners[0].protocol: must be 1-255 characters",
        ),
        (
            "unknown listener field",
            "  listeners: [{name: a, port: 80, protocol: HTTP, hostnames: [x.example.com]}]\n",
            "spec.listeners[0].hostnames: unknown field",
        ),
        (
            "HTTPS without tls",
            "  listeners: [{name: a, port: 443, protocol: HTTPS}]\n",
            "spec.listeners[0].tls: required for protocol HTTPS",
        ),
        (
            "TLS without tls",
            "  listeners: [{name: a, port: 443, protocol: TLS}]\n",
            "spec.listeners[0].tls: required for protocol TLS",
        ),
        (
            "Terminate without certificateRefs",
            "  listeners: [{name: a, port: 443, protocol: HTTPS, tls: {mode: Terminate}}]\n",
            "spec.listeners[0].tls.certificateRefs: at least one is required with mode Terminate",
        ),
        (
            "Terminate (the default) with no certificateRefs",
            "  listeners: [{name: a, port: 443, protocol: TLS, tls: {certificateRefs: []}}]\n",
            "spec.listeners[0].tls.certificateRefs: at least one is required with mode Terminate",
        ),
        (
            "HTTPS passthrough",
            "  listeners: [{name: a, port: 443, protocol: HTTPS, tls: {mode: Passthrough}}]\n",
            "spec.listeners[0].tls.mode: must be Terminate for protocol HTTPS",
        ),
        (
            "unknown TLS mode",
            "  listeners: [{name: a, port: 443, protocol: TLS, tls: {mode: Mutual}}]\n",
            "spec.listeners[0].tls.mode: unknown TLS mode \"Mutual\"",
        ),
        (
            "tls on HTTP",
            "  listeners: [{name: a, port: 80, protocol: HTTP, tls: {certificateRefs: [{name: c}]}}]\n",
            "spec.listeners[0].tls: must not be specified for protocol HTTP",
        ),
        (
            "tls on TCP",
            "  listeners: [{name: a, port: 80, protocol: TCP, tls: {mode: Passthrough}}]\n",
            "spec.listeners[0].tls: must not be specified for protocol TCP",
        ),
        (
            "hostname on TCP",
            "  listeners: [{name: a, port: 9000, protocol: TCP, hostname: x.example.com}]\n",
            "spec.listeners[0].hostname: must not be specified for protocol TCP",
        ),
        (
            "a certificate in a ConfigMap",
            "  listeners: [{name: a, port: 443, protocol: HTTPS, tls: {certificateRefs: [{kind: ConfigMap, name: c}]}}]\n",
            "spec.listeners[0].tls.certificateRefs[0]: unsupported certificate reference \"\"/ConfigMap",
        ),
        (
            "a certificate ref without a name",
            "  listeners: [{name: a, port: 443, protocol: HTTPS, tls: {certificateRefs: [{kind: Secret}]}}]\n",
            "spec.listeners[0].tls.certificateRefs[0].name: required",
        ),
        (
            "TLS options",
            "  listeners: [{name: a, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: c}], options: {x: y}}}]\n",
            "spec.listeners[0].tls.options: not supported",
        ),
        (
            "frontendValidation",
            "  listeners: [{name: a, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: c}], frontendValidation: {}}}]\n",
            "spec.listeners[0].tls.frontendValidation: not supported",
        ),
        (
            "Selector without selector",
            "  listeners: [{name: a, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Selector}}}]\n",
            "spec.listeners[0].allowedRoutes.namespaces.selector: required with from: Selector",
        ),
        (
            "unknown from",
            "  listeners: [{name: a, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Others}}}]\n",
            "spec.listeners[0].allowedRoutes.namespaces.from: unknown value \"Others\"",
        ),
        (
            "matchExpressions",
            "  listeners: [{name: a, port: 80, protocol: HTTP, allowedRoutes: {namespaces: {from: Selector, selector: {matchExpressions: [{key: a, operator: Exists}]}}}}]\n",
            "spec.listeners[0].allowedRoutes.namespaces.selector.matchExpressions: not supported",
        ),
        (
            "a route kind without kind",
            "  listeners: [{name: a, port: 80, protocol: HTTP, allowedRoutes: {kinds: [{group: gateway.networking.k8s.io}]}}]\n",
            "spec.listeners[0].allowedRoutes.kinds[0].kind: required",
        ),
        (
            "too many route kinds",
            "  listeners: [{name: a, port: 80, protocol: HTTP, allowedRoutes: {kinds: [{kind: A}, {kind: B}, {kind: C}, {kind: D}, {kind: E}, {kind: F}, {kind: G}, {kind: H}, {kind: I}]}}]\n",
            "spec.listeners[0].allowedRoutes.kinds: at most 8 entries allowed",
        ),
    ];
    for (case, listeners, want) in cases {
        let got = load("gw.yaml", &gateway_doc("istio", listeners));
        match got {
            Err(e) => assert!(e.contains(want), "{case}: {e:?} lacks {want:?}"),
            Ok(_) => panic!("{case}: loaded, expected {want:?}"),
        }
    }
}

#[test]
fn other_classes_keep_the_listeners_that_read_and_refuse_none() {
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "a waypoint's HBONE listener",
            "  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n",
            &["mesh"],
        ),
        (
            "unknown fields tolerated, unreadable listeners left out",
            "  listeners:\n  - {name: mesh, port: 15008, protocol: HBONE, extra: 1}\n  - {port: 15009}\n  - {name: big, port: 70000, protocol: HTTP}\n  - {name: https, port: 443, protocol: HTTPS}\n",
            &["mesh", "https"],
        ),
        ("no listeners", "  addresses: []\n", &[]),
        ("listeners not a list", "  listeners: mesh\n", &[]),
    ];
    for (case, listeners, want) in cases {
        let m = load("gw.yaml", &gateway_doc("istio-waypoint", listeners))
            .unwrap_or_else(|e| panic!("{case}: {e}"));
        let gw = &m.gateways[&NamespacedName::new("istio-ingress", "ingress")];
        let names: Vec<&str> = gw.listeners.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, *want, "{case}");
    }
    let m = load(
        "gw.yaml",
        &gateway_doc(
            "istio-waypoint",
            "  listeners: [{name: mesh, port: 15008, protocol: HBONE}]\n",
        ),
    )
    .expect("waypoint");
    let gw = &m.gateways[&NamespacedName::new("istio-ingress", "ingress")];
    assert_eq!(
        gw.listeners[0].protocol,
        ListenerProtocol::Unsupported("HBONE".into())
    );
}

/// How a Secret document is taken.
enum SecretIs {
    /// A TLS secret with this certificate chain.
    Tls(String),
    /// Kept out, the reason containing this.
    Problem(&'static str),
    /// The document is refused with this.
    Refused(&'static str),
}

fn secret_doc(kind: Option<&str>, body: &str) -> String {
    let kind = kind.map(|k| format!("type: {k}\n")).unwrap_or_default();
    format!("apiVersion: v1\nkind: Secret\nmetadata: {{name: cert, namespace: web}}\n{kind}{body}")
}

/// `data` with `tls.crt` and `tls.key` base64-encoded.
fn data(cert: &str, key: &str) -> String {
    format!(
        "data:\n  tls.crt: {}\n  tls.key: {}\n",
        STANDARD.encode(cert),
        STANDARD.encode(key)
    )
}

/// `stringData` with `tls.crt` and `tls.key` as block scalars.
fn string_data(cert: &str, key: &str) -> String {
    let block = |pem: &str| {
        pem.lines()
            .map(|l| format!("    {l}\n"))
            .collect::<String>()
    };
    format!(
        "stringData:\n  tls.crt: |\n{}  tls.key: |\n{}",
        block(cert),
        block(key)
    )
}

#[test]
fn secrets_become_tls_secrets_or_say_why_not() {
    let tls = Some("kubernetes.io/tls");
    let encrypted = "-----BEGIN ENCRYPTED PRIVATE KEY-----\nZW5jcnlwdGVk\n-----END ENCRYPTED PRIVATE KEY-----\n";
    let legacy_encrypted = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nZW5jcnlwdGVk\n-----END RSA PRIVATE KEY-----\n";
    let unterminated = "-----BEGIN CERTIFICATE-----\nZW5jcnlwdGVk\n";
    let mismatched = "-----BEGIN CERTIFICATE-----\nZW5jcnlwdGVk\n-----END PRIVATE KEY-----\n";
    let not_base64 = "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n";
    let chain = format!("{CERT_PEM}{CERT_PEM}");
    let ec_key = KEY_PEM.replace("PRIVATE KEY", "EC PRIVATE KEY");
    let cases: Vec<(&str, String, SecretIs)> = vec![
        (
            "base64 data",
            secret_doc(tls, &data(CERT_PEM, KEY_PEM)),
            SecretIs::Tls(CERT_PEM.to_string()),
        ),
        (
            "stringData",
            secret_doc(tls, &string_data(CERT_PEM, KEY_PEM)),
            SecretIs::Tls(CERT_PEM.to_string()),
        ),
        (
            "stringData wins over data",
            secret_doc(
                tls,
                &format!(
                    "{}{}",
                    data("not pem", "not pem"),
                    string_data(CERT_PEM, KEY_PEM)
                ),
            ),
            SecretIs::Tls(CERT_PEM.to_string()),
        ),
        (
            "a chain and an EC key",
            secret_doc(tls, &data(&chain, &ec_key)),
            SecretIs::Tls(chain.clone()),
        ),
        (
            "another type",
            secret_doc(Some("Opaque"), &data(CERT_PEM, KEY_PEM)),
            SecretIs::Problem("type \"Opaque\" is not kubernetes.io/tls"),
        ),
        (
            "no type is Opaque",
            secret_doc(None, "data: {token: dG9rZW4=}\n"),
            SecretIs::Problem("type \"Opaque\" is not kubernetes.io/tls"),
        ),
        (
            "no key",
            secret_doc(
                tls,
                &format!("data: {{tls.crt: {}}}\n", STANDARD.encode(CERT_PEM)),
            ),
            SecretIs::Problem("tls.key: missing"),
        ),
        (
            "no data at all",
            secret_doc(tls, ""),
            SecretIs::Problem("tls.crt: missing"),
        ),
        (
            "empty certificate",
            secret_doc(
                tls,
                &format!(
                    "data: {{tls.crt: \"\", tls.key: {}}}\n",
                    STANDARD.encode(KEY_PEM)
                ),
            ),
            SecretIs::Problem("tls.crt: missing"),
        ),
        (
            "certificate not PEM",
            secret_doc(tls, &data("hello", KEY_PEM)),
            SecretIs::Problem("tls.crt: no PEM CERTIFICATE block"),
        ),
        (
            "certificate not text",
            secret_doc(tls, "data: {tls.crt: //79/A==, tls.key: //79/A==}\n"),
            SecretIs::Problem("tls.crt: not PEM (not text)"),
        ),
        (
            "certificate block without its end",
            secret_doc(tls, &data(unterminated, KEY_PEM)),
            SecretIs::Problem("tls.crt: no PEM CERTIFICATE block"),
        ),
        (
            "certificate block with another end",
            secret_doc(tls, &data(mismatched, KEY_PEM)),
            SecretIs::Problem("tls.crt: no PEM CERTIFICATE block"),
        ),
        (
            "certificate body not base64",
            secret_doc(tls, &data(not_base64, KEY_PEM)),
            SecretIs::Problem("tls.crt: no PEM CERTIFICATE block"),
        ),
        (
            "a certificate for a key",
            secret_doc(tls, &data(CERT_PEM, CERT_PEM)),
            SecretIs::Problem("tls.key: no PEM PRIVATE KEY block"),
        ),
        (
            "an encrypted key",
            secret_doc(tls, &data(CERT_PEM, encrypted)),
            SecretIs::Problem("tls.key: encrypted private keys are not supported"),
        ),
        (
            "a legacy encrypted key",
            secret_doc(tls, &data(CERT_PEM, legacy_encrypted)),
            SecretIs::Problem("tls.key: encrypted private keys are not supported"),
        ),
        (
            "data not base64",
            secret_doc(tls, "data: {tls.crt: \"%%%\", tls.key: \"%%%\"}\n"),
            SecretIs::Refused("secrets.yaml doc 1: Secret web/cert: data.tls.crt: invalid base64"),
        ),
        (
            "data not a mapping",
            secret_doc(tls, "data: [a, b]\n"),
            SecretIs::Refused("Secret web/cert: data: expected a mapping"),
        ),
        (
            "type not a string",
            secret_doc(Some("[a]"), ""),
            SecretIs::Refused("Secret web/cert: type: expected a string"),
        ),
    ];
    for (case, doc, want) in cases {
        let got = load("secrets.yaml", &doc);
        match (got, want) {
            (Ok(m), SecretIs::Tls(chain)) => {
                let s = m.tls_secret("web", "cert").unwrap_or_else(|| {
                    panic!(
                        "{case}: no TLS secret: {:?}",
                        m.secret_problem("web", "cert")
                    )
                });
                assert_eq!(s.cert_chain_pem, chain, "{case}");
                assert!(s.key_pem.contains("PRIVATE KEY"), "{case}");
                assert_eq!(m.secret_problem("web", "cert"), None, "{case}");
            }
            (Ok(m), SecretIs::Problem(want)) => {
                assert!(m.tls_secret("web", "cert").is_none(), "{case}");
                let problem = m.secret_problem("web", "cert").unwrap_or_default();
                assert!(problem.contains(want), "{case}: {problem:?} lacks {want:?}");
            }
            (Err(e), SecretIs::Refused(want)) => {
                assert!(e.contains(want), "{case}: {e:?} lacks {want:?}");
            }
            (Ok(_), SecretIs::Refused(want)) => panic!("{case}: loaded, expected {want:?}"),
            (Err(e), _) => panic!("{case}: {e}"),
        }
    }
}

#[test]
fn pem_blocks_are_read_by_label() {
    let text = format!("junk before\n{CERT_PEM}between\n{KEY_PEM}");
    let labels: Vec<&str> = secret::pem_blocks(&text).iter().map(|b| b.label).collect();
    assert_eq!(labels, ["CERTIFICATE", "PRIVATE KEY"]);
    assert!(
        secret::pem_blocks("-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n").is_empty(),
        "an empty body is no block"
    );
}

#[test]
fn reference_grants_translate_and_malformed_ones_are_refused() {
    let grant = |version: &str, spec: &str| {
        format!(
            "apiVersion: gateway.networking.k8s.io/{version}\nkind: ReferenceGrant\n\
             metadata: {{name: g, namespace: bookinfo}}\nspec:\n{spec}"
        )
    };
    for version in ["v1beta1", "v1"] {
        let doc = grant(
            version,
            "  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: istio-ingress}]\n  \
             to: [{group: \"\", kind: Secret}, {group: core, kind: Service, name: reviews}]\n",
        );
        let m = load("grants.yaml", &doc).unwrap_or_else(|e| panic!("{version}: {e}"));
        let g = &m.reference_grants[0];
        assert_eq!((g.namespace.as_str(), g.name.as_str()), ("bookinfo", "g"));
        assert_eq!(
            g.from,
            [ReferenceGrantFrom {
                group: "gateway.networking.k8s.io".into(),
                kind: "Gateway".into(),
                namespace: "istio-ingress".into()
            }]
        );
        assert_eq!(
            g.to,
            [
                ReferenceGrantTo {
                    group: "".into(),
                    kind: "Secret".into(),
                    name: None
                },
                ReferenceGrantTo {
                    group: "".into(),
                    kind: "Service".into(),
                    name: Some("reviews".into())
                },
            ],
            "core is the empty group"
        );
    }
    let from =
        "  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: istio-ingress}]\n";
    let to = "  to: [{group: \"\", kind: Secret}]\n";
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "no from",
            grant("v1beta1", to),
            "grants.yaml doc 1: ReferenceGrant bookinfo/g: spec.from: required",
        ),
        (
            "empty from",
            grant("v1beta1", &format!("  from: []\n{to}")),
            "spec.from: at least one entry is required",
        ),
        ("no to", grant("v1beta1", from), "spec.to: required"),
        (
            "from without namespace",
            grant(
                "v1beta1",
                &format!("  from: [{{group: \"\", kind: Gateway}}]\n{to}"),
            ),
            "spec.from[0].namespace: required",
        ),
        (
            "from without group",
            grant(
                "v1beta1",
                &format!("  from: [{{kind: Gateway, namespace: a}}]\n{to}"),
            ),
            "spec.from[0].group: required",
        ),
        (
            "to without kind",
            grant("v1beta1", &format!("{from}  to: [{{group: \"\"}}]\n")),
            "spec.to[0].kind: required",
        ),
        (
            "a misspelt name would grant every Secret",
            grant(
                "v1beta1",
                &format!("{from}  to: [{{group: \"\", kind: Secret, nmae: x}}]\n"),
            ),
            "spec.to[0].nmae: unknown field",
        ),
        (
            "invalid namespace",
            grant(
                "v1beta1",
                &format!("  from: [{{group: \"\", kind: Gateway, namespace: Bad_NS}}]\n{to}"),
            ),
            "spec.from[0].namespace: invalid namespace",
        ),
        (
            "old version",
            grant("v1alpha2", &format!("{from}{to}")),
            "unsupported version \"v1alpha2\"",
        ),
    ];
    for (case, doc, want) in cases {
        match load("grants.yaml", &doc) {
            Err(e) => assert!(e.contains(want), "{case}: {e:?} lacks {want:?}"),
            Ok(_) => panic!("{case}: loaded, expected {want:?}"),
        }
    }
}

#[test]
fn a_route_keeps_its_parent_gateway_in_another_namespace() {
    let doc = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
               metadata: {name: r, namespace: bookinfo}\n\
               spec:\n  parentRefs: [{name: ingress, namespace: istio-ingress, sectionName: https, port: 443}]\n";
    let m = load("routes.yaml", doc).expect("route");
    let p = &m.http_routes[0].parents[0];
    assert_eq!(p.target, NamespacedName::new("istio-ingress", "ingress"));
    assert_eq!(
        (p.section_name.as_deref(), p.port),
        (Some("https"), Some(443))
    );
}

/// `metadata.generation` is kept (the `observedGeneration` of the status written back);
/// absent or unreadable, there is none, and the Gateway is not refused for it.
#[test]
fn a_gateway_keeps_its_generation() {
    let listeners = "  listeners:\n  - {name: http, port: 80, protocol: HTTP}\n";
    let key = NamespacedName::new("istio-ingress", "ingress");
    let generation = |doc: &str| load("gw.yaml", doc).expect("valid").gateways[&key].generation;
    let doc = gateway_doc("istio", listeners);
    assert_eq!(generation(&doc), None);
    let with = |g: &str| {
        doc.replace(
            "namespace: istio-ingress}",
            &format!("namespace: istio-ingress, generation: {g}}}"),
        )
    };
    assert_eq!(generation(&with("7")), Some(7));
    assert_eq!(generation(&with("\"7\"")), None);
    assert_eq!(generation(&with("-1")), None);
}

/// An ingress Gateway's `spec.addresses` become typed requests (an unsupported type kept
/// for status); the CRD's limits are refused by field; other classes keep none.
#[test]
fn ingress_gateway_addresses_are_validated() {
    use crate::model::{HostAddress, RequestedAddress};
    let listeners = "  listeners:\n  - {name: http, port: 80, protocol: HTTP}\n";
    let key = NamespacedName::new("istio-ingress", "ingress");
    let with = |class: &str, addresses: &str| {
        gateway_doc(class, &format!("{listeners}  addresses: {addresses}\n"))
    };
    let doc = with(
        "istio",
        "[{value: 203.0.113.7}, {type: Hostname, value: gw.example.com}, \
         {type: NamedAddress, value: my-pool}]",
    );
    let m = load("gw.yaml", &doc).expect("valid");
    assert_eq!(
        m.gateways[&key].requested_addresses,
        vec![
            RequestedAddress::Host(HostAddress::Ip("203.0.113.7".parse().expect("ip"))),
            RequestedAddress::Host(HostAddress::Hostname("gw.example.com".into())),
            RequestedAddress::Unsupported {
                type_: "NamedAddress".into(),
                value: "my-pool".into()
            },
        ]
    );
    let waypoint = with(
        "istio-waypoint",
        "[{type: Hostname, value: wp.example.com}]",
    );
    let m = load("gw.yaml", &waypoint).expect("valid");
    assert!(m.gateways[&key].requested_addresses.is_empty());

    let seventeen: Vec<String> = (1..=17).map(|i| format!("{{value: 10.0.0.{i}}}")).collect();
    let seventeen = format!("[{}]", seventeen.join(", "));
    let cases: &[(&str, &str, &str)] = &[
        (
            "more than 16",
            &seventeen,
            "spec.addresses: at most 16 entries allowed, found 17",
        ),
        (
            "an IPAddress that is no IP",
            "[{type: IPAddress, value: gw.example.com}]",
            "spec.addresses[0].value: invalid IP address",
        ),
        (
            "a Hostname that is no host name",
            "[{type: Hostname, value: \"*.example.com\"}]",
            "spec.addresses[0].value: invalid hostname",
        ),
        (
            "an IP twice",
            "[{value: 10.0.0.1}, {type: IPAddress, value: 10.0.0.1}]",
            "spec.addresses[1].value: IPAddress \"10.0.0.1\" listed twice",
        ),
        (
            "an empty value",
            "[{type: NamedAddress, value: \"\"}]",
            "spec.addresses[0].value: must be 1-253 characters",
        ),
        (
            "no value",
            "[{type: NamedAddress}]",
            "spec.addresses[0].value: required",
        ),
        (
            "an unknown field",
            "[{value: 10.0.0.1, port: 80}]",
            "spec.addresses[0].port: unknown field",
        ),
    ];
    for (case, addresses, want) in cases {
        match load("gw.yaml", &with("istio", addresses)) {
            Ok(_) => panic!("{case}: loaded"),
            Err(e) => assert!(e.contains(want), "{case}: {e}"),
        }
    }
}
