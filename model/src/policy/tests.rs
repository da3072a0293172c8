//! Policy tables. Policies are written as YAML and loaded through `k8s::load_docs`, so the
//! translation and the evaluation are tested together. Every request goes to the pod
//! `shop/web` (labels `app=web`, IP 10.0.0.10).

use super::*;
use crate::k8s::load_docs;

const DESTINATION: &str = "
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
status: {podIP: 10.0.0.10}
";

const DST_IP: &str = "10.0.0.10";

/// One AuthorizationPolicy document; `spec` is YAML flow style.
fn ap(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )
}

/// A dry-run AuthorizationPolicy.
fn dry_ap(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {namespace}, annotations: {{istio.io/dry-run: \"true\"}}}}\n\
         spec: {spec}\n"
    )
}

/// An mTLS connection from `cluster.local/ns/<ns>/sa/<sa>` at `src_ip`.
fn mtls(ns: &str, sa: &str, src_ip: &str, port: u16) -> L4Request {
    L4Request {
        src_identity: Some(Identity::new("cluster.local", ns, sa)),
        src_ip: src_ip.parse().unwrap(),
        dst_ip: DST_IP.parse().unwrap(),
        dst_port: port,
    }
}

/// From the usual client: `client/client` at 10.1.0.5, to port 8080.
fn client() -> L4Request {
    mtls("client", "client", "10.1.0.5", 8080)
}

fn plaintext(src_ip: &str, port: u16) -> L4Request {
    L4Request {
        src_identity: None,
        src_ip: src_ip.parse().unwrap(),
        dst_ip: DST_IP.parse().unwrap(),
        dst_port: port,
    }
}

fn allow() -> Evaluation {
    Evaluation {
        decision: Decision::Allow,
        audited: vec![],
        dry_run_denied: vec![],
    }
}

fn denied_by(policy: &str) -> Evaluation {
    Evaluation {
        decision: Decision::Deny {
            policy: Some(policy.to_string()),
        },
        ..allow()
    }
}

/// Denied because ALLOW policies apply and none matched.
fn not_allowed() -> Evaluation {
    Evaluation {
        decision: Decision::Deny { policy: None },
        ..allow()
    }
}

fn check(case: &str, policies: &[String], req: L4Request, want: Evaluation) {
    let files = vec![
        ("destination.yaml".to_string(), DESTINATION.to_string()),
        ("policies.yaml".to_string(), policies.concat()),
    ];
    let model = load_docs(&files).unwrap_or_else(|e| panic!("{case}: {e}"));
    let pod = model.pod("shop", "web").unwrap();
    let got = authorize(&model, pod, &req);
    assert_eq!(got, want, "{case}");
}

#[test]
fn evaluation_order() {
    check("no policy allows", &[], client(), allow());
    check(
        "spec: {} denies all",
        &[ap("shop", "deny-all", "{}")],
        client(),
        not_allowed(),
    );
    check(
        "an empty rule allows all",
        &[ap("shop", "allow-all", "{rules: [{}]}")],
        plaintext("192.0.2.1", 1),
        allow(),
    );
    check(
        "DENY with an empty rule denies all",
        &[ap("shop", "deny", "{action: DENY, rules: [{}]}")],
        client(),
        denied_by("shop/deny"),
    );
    check(
        "DENY beats a matching ALLOW",
        &[
            ap(
                "shop",
                "allow-client",
                "{rules: [{from: [{source: {namespaces: [client]}}]}]}",
            ),
            ap(
                "shop",
                "deny-client",
                "{action: DENY, rules: [{from: [{source: {namespaces: [client]}}]}]}",
            ),
        ],
        client(),
        denied_by("shop/deny-client"),
    );
    check(
        "only a DENY that does not match: allowed",
        &[ap(
            "shop",
            "deny-other",
            "{action: DENY, rules: [{from: [{source: {namespaces: [other]}}]}]}",
        )],
        client(),
        allow(),
    );
    check(
        "ALLOW policies that do not match: denied without a policy name",
        &[
            ap(
                "shop",
                "allow-a",
                "{rules: [{from: [{source: {namespaces: [a]}}]}]}",
            ),
            ap(
                "shop",
                "allow-b",
                "{rules: [{from: [{source: {namespaces: [b]}}]}]}",
            ),
        ],
        client(),
        not_allowed(),
    );
    check(
        "one of several ALLOW policies matches",
        &[
            ap(
                "shop",
                "allow-a",
                "{rules: [{from: [{source: {namespaces: [a]}}]}]}",
            ),
            ap(
                "shop",
                "allow-client",
                "{rules: [{from: [{source: {namespaces: [client]}}]}]}",
            ),
        ],
        client(),
        allow(),
    );
}

#[test]
fn rule_structure() {
    check(
        "rules are OR'ed",
        &[ap("shop", "p", "{rules: [{to: [{operation: {ports: [\"1\"]}}]}, {from: [{source: {namespaces: [client]}}]}]}")],
        client(),
        allow(),
    );
    check(
        "from and to are AND'ed",
        &[ap("shop", "p", "{rules: [{from: [{source: {namespaces: [client]}}], to: [{operation: {ports: [\"9090\"]}}]}]}")],
        client(),
        not_allowed(),
    );
    check(
        "from entries are OR'ed",
        &[ap("shop", "p", "{rules: [{from: [{source: {namespaces: [a]}}, {source: {principals: [cluster.local/ns/client/sa/client]}}]}]}")],
        client(),
        allow(),
    );
    check(
        "fields within one source are AND'ed",
        &[ap(
            "shop",
            "p",
            "{rules: [{from: [{source: {namespaces: [client], ipBlocks: [192.168.0.0/16]}}]}]}",
        )],
        client(),
        not_allowed(),
    );
    check(
        "when conditions are AND'ed",
        &[ap("shop", "p", "{rules: [{when: [{key: destination.port, values: [\"8080\"]}, {key: source.ip, values: [10.9.0.0/16]}]}]}")],
        client(),
        not_allowed(),
    );
}

#[test]
fn source_fields() {
    let allow_from = |source: &str| {
        ap(
            "shop",
            "p",
            &format!("{{rules: [{{from: [{{source: {source}}}]}}]}}"),
        )
    };
    let cases: Vec<(&str, &str, L4Request, Evaluation)> = vec![
        (
            "exact principal",
            "{principals: [cluster.local/ns/client/sa/client]}",
            client(),
            allow(),
        ),
        (
            "exact principal, other client",
            "{principals: [cluster.local/ns/client/sa/client]}",
            mtls("client", "other", "10.1.0.5", 8080),
            not_allowed(),
        ),
        (
            "principal prefix",
            "{principals: [\"cluster.local/ns/client/*\"]}",
            client(),
            allow(),
        ),
        (
            "principal suffix",
            "{principals: [\"*/sa/client\"]}",
            client(),
            allow(),
        ),
        (
            "principal suffix, no match",
            "{principals: [\"*/sa/web\"]}",
            client(),
            not_allowed(),
        ),
        (
            "principal *, mTLS",
            "{principals: [\"*\"]}",
            client(),
            allow(),
        ),
        (
            "principal *, plaintext",
            "{principals: [\"*\"]}",
            plaintext("10.1.0.5", 8080),
            not_allowed(),
        ),
        (
            "regex metacharacters are literal",
            "{principals: [\"cluster.local/ns/client/sa/.*\"]}",
            client(),
            not_allowed(),
        ),
        (
            "regex class is literal",
            "{principals: [\"cluster.local/ns/[a-z]+/sa/client\"]}",
            client(),
            not_allowed(),
        ),
        (
            "a middle * is literal",
            "{principals: [\"cluster.local/ns/*/sa/client\"]}",
            client(),
            not_allowed(),
        ),
        (
            "spiffe:// principals never match",
            "{principals: [\"spiffe://cluster.local/ns/client/sa/client\"]}",
            client(),
            not_allowed(),
        ),
        (
            "notPrincipals excludes",
            "{notPrincipals: [cluster.local/ns/client/sa/client]}",
            client(),
            not_allowed(),
        ),
        (
            "notPrincipals lets others in",
            "{notPrincipals: [cluster.local/ns/client/sa/client]}",
            mtls("client", "other", "10.1.0.5", 8080),
            allow(),
        ),
        (
            "notPrincipals matches plaintext",
            "{notPrincipals: [\"*\"]}",
            plaintext("10.1.0.5", 8080),
            allow(),
        ),
        (
            "notPrincipals * excludes mTLS",
            "{notPrincipals: [\"*\"]}",
            client(),
            not_allowed(),
        ),
        (
            "namespace exact",
            "{namespaces: [client]}",
            client(),
            allow(),
        ),
        (
            "namespace prefix",
            "{namespaces: [\"cli*\"]}",
            client(),
            allow(),
        ),
        (
            "namespace, plaintext",
            "{namespaces: [client]}",
            plaintext("10.1.0.5", 8080),
            not_allowed(),
        ),
        (
            "notNamespaces excludes",
            "{notNamespaces: [client]}",
            client(),
            not_allowed(),
        ),
        (
            "notNamespaces matches plaintext",
            "{notNamespaces: [client]}",
            plaintext("10.1.0.5", 8080),
            allow(),
        ),
        (
            "serviceAccounts, bare name is the policy's namespace",
            "{serviceAccounts: [client]}",
            mtls("shop", "client", "10.1.0.5", 8080),
            allow(),
        ),
        (
            "serviceAccounts, bare name elsewhere",
            "{serviceAccounts: [client]}",
            client(),
            not_allowed(),
        ),
        (
            "serviceAccounts, namespace/name",
            "{serviceAccounts: [client/client]}",
            client(),
            allow(),
        ),
        (
            "serviceAccounts, plaintext",
            "{serviceAccounts: [client/client]}",
            plaintext("10.1.0.5", 8080),
            not_allowed(),
        ),
        (
            "notServiceAccounts",
            "{notServiceAccounts: [client/client]}",
            client(),
            not_allowed(),
        ),
        (
            "ipBlocks CIDR",
            "{ipBlocks: [10.1.0.0/16]}",
            plaintext("10.1.0.5", 8080),
            allow(),
        ),
        (
            "ipBlocks single address",
            "{ipBlocks: [10.1.0.6]}",
            plaintext("10.1.0.5", 8080),
            not_allowed(),
        ),
        (
            "ipBlocks IPv6",
            "{ipBlocks: [\"fd00::/8\"]}",
            plaintext("fd00::5", 8080),
            allow(),
        ),
        (
            "notIpBlocks",
            "{notIpBlocks: [10.1.0.0/24]}",
            plaintext("10.1.0.5", 8080),
            not_allowed(),
        ),
        (
            "remoteIpBlocks is the source IP at L4",
            "{remoteIpBlocks: [10.1.0.0/24]}",
            plaintext("10.1.0.5", 8080),
            allow(),
        ),
        (
            "notRemoteIpBlocks",
            "{notRemoteIpBlocks: [10.1.0.5]}",
            plaintext("10.1.0.5", 8080),
            not_allowed(),
        ),
    ];
    for (case, source, req, want) in cases {
        check(case, &[allow_from(source)], req, want);
    }
}

#[test]
fn operation_and_conditions() {
    let allow_to = |op: &str| {
        ap(
            "shop",
            "p",
            &format!("{{rules: [{{to: [{{operation: {op}}}]}}]}}"),
        )
    };
    let allow_when = |key: &str, field: &str, values: &str| {
        ap(
            "shop",
            "p",
            &format!("{{rules: [{{when: [{{key: {key}, {field}: {values}}}]}}]}}"),
        )
    };
    check(
        "ports",
        &[allow_to("{ports: [\"80\", \"8080\"]}")],
        client(),
        allow(),
    );
    check(
        "ports, other port",
        &[allow_to("{ports: [\"80\"]}")],
        client(),
        not_allowed(),
    );
    check(
        "notPorts",
        &[allow_to("{notPorts: [\"8080\"]}")],
        client(),
        not_allowed(),
    );
    check(
        "notPorts, other port",
        &[allow_to("{notPorts: [\"22\"]}")],
        client(),
        allow(),
    );
    let cases: Vec<(&str, &str, &str, &str, L4Request, Evaluation)> = vec![
        (
            "source.ip",
            "source.ip",
            "values",
            "[10.1.0.0/24]",
            client(),
            allow(),
        ),
        (
            "source.ip notValues",
            "source.ip",
            "notValues",
            "[10.1.0.5]",
            client(),
            not_allowed(),
        ),
        (
            "remote.ip",
            "remote.ip",
            "values",
            "[10.1.0.5]",
            client(),
            allow(),
        ),
        (
            "destination.ip",
            "destination.ip",
            "values",
            "[10.0.0.10]",
            client(),
            allow(),
        ),
        (
            "destination.ip, other",
            "destination.ip",
            "values",
            "[10.0.0.11]",
            client(),
            not_allowed(),
        ),
        (
            "destination.port",
            "destination.port",
            "values",
            "[\"8080\"]",
            client(),
            allow(),
        ),
        (
            "destination.port notValues",
            "destination.port",
            "notValues",
            "[\"8080\"]",
            client(),
            not_allowed(),
        ),
        (
            "source.namespace wildcard",
            "source.namespace",
            "values",
            "[\"*ent\"]",
            client(),
            allow(),
        ),
        (
            "source.namespace, plaintext",
            "source.namespace",
            "values",
            "[client]",
            plaintext("10.1.0.5", 8080),
            not_allowed(),
        ),
        (
            "source.principal",
            "source.principal",
            "values",
            "[cluster.local/ns/client/sa/client]",
            client(),
            allow(),
        ),
        (
            "source.principal notValues, plaintext",
            "source.principal",
            "notValues",
            "[\"*\"]",
            plaintext("10.1.0.5", 8080),
            allow(),
        ),
    ];
    for (case, key, field, values, req, want) in cases {
        check(case, &[allow_when(key, field, values)], req, want);
    }
}

#[test]
fn plaintext_and_deny_on_identity() {
    check(
        "DENY on a principal is bypassed by plaintext (Istio: pair it with STRICT mTLS)",
        &[ap(
            "shop",
            "deny",
            "{action: DENY, rules: [{from: [{source: {principals: [\"*\"]}}]}]}",
        )],
        plaintext("10.1.0.5", 8080),
        allow(),
    );
    check(
        "DENY notPrincipals * requires mTLS",
        &[ap(
            "shop",
            "require-mtls",
            "{action: DENY, rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]}",
        )],
        plaintext("10.1.0.5", 8080),
        denied_by("shop/require-mtls"),
    );
    check(
        "DENY notPrincipals * lets mTLS through",
        &[ap(
            "shop",
            "require-mtls",
            "{action: DENY, rules: [{from: [{source: {notPrincipals: [\"*\"]}}]}]}",
        )],
        client(),
        allow(),
    );
}

#[test]
fn http_attributes_at_l4() {
    check(
        "ALLOW rule with methods never matches",
        &[ap("shop", "get-only", "{rules: [{from: [{source: {namespaces: [client]}}], to: [{operation: {methods: [GET]}}]}]}")],
        client(),
        not_allowed(),
    );
    check(
        "ALLOW: the L7 rule is omitted, an L4 rule still allows",
        &[ap("shop", "p", "{rules: [{to: [{operation: {paths: [/admin]}}]}, {from: [{source: {namespaces: [client]}}]}]}")],
        client(),
        allow(),
    );
    check(
        "ALLOW with requestPrincipals never matches",
        &[ap(
            "shop",
            "jwt",
            "{rules: [{from: [{source: {requestPrincipals: [\"*\"]}}]}]}",
        )],
        client(),
        not_allowed(),
    );
    check(
        "ALLOW with a header condition never matches",
        &[ap(
            "shop",
            "hdr",
            "{rules: [{when: [{key: \"request.headers[x-user]\", values: [alice]}]}]}",
        )],
        client(),
        not_allowed(),
    );
    check(
        "ALLOW with connection.sni fails closed",
        &[ap(
            "shop",
            "sni",
            "{rules: [{when: [{key: connection.sni, values: [web.shop]}]}]}",
        )],
        client(),
        not_allowed(),
    );
    check(
        "DENY keeps the port when it drops the method",
        &[ap(
            "shop",
            "no-post",
            "{action: DENY, rules: [{to: [{operation: {methods: [POST], ports: [\"8080\"]}}]}]}",
        )],
        client(),
        denied_by("shop/no-post"),
    );
    check(
        "DENY on another port, method dropped: not denied",
        &[ap(
            "shop",
            "no-post",
            "{action: DENY, rules: [{to: [{operation: {methods: [POST], ports: [\"9090\"]}}]}]}",
        )],
        client(),
        allow(),
    );
    check(
        "DENY with only paths denies everything",
        &[ap(
            "shop",
            "no-admin",
            "{action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}",
        )],
        plaintext("192.0.2.1", 1234),
        denied_by("shop/no-admin"),
    );
    check(
        "DENY with a header condition denies",
        &[ap("shop", "hdr", "{action: DENY, rules: [{when: [{key: \"request.headers[x-user]\", values: [mallory]}]}]}")],
        client(),
        denied_by("shop/hdr"),
    );
    check(
        "DENY keeps the principal when it drops requestPrincipals: other clients pass",
        &[ap("shop", "p", "{action: DENY, rules: [{from: [{source: {principals: [cluster.local/ns/bad/sa/bad], requestPrincipals: [\"*\"]}}]}]}")],
        client(),
        allow(),
    );
}

#[test]
fn audit_and_dry_run() {
    check(
        "AUDIT records and does not decide",
        &[
            ap(
                "shop",
                "audit-client",
                "{action: AUDIT, rules: [{from: [{source: {namespaces: [client]}}]}]}",
            ),
            ap(
                "shop",
                "audit-other",
                "{action: AUDIT, rules: [{from: [{source: {namespaces: [other]}}]}]}",
            ),
        ],
        client(),
        Evaluation {
            audited: vec!["shop/audit-client".into()],
            ..allow()
        },
    );
    check(
        "dry-run DENY is reported, not enforced",
        &[dry_ap(
            "shop",
            "would-deny",
            "{action: DENY, rules: [{from: [{source: {namespaces: [client]}}]}]}",
        )],
        client(),
        Evaluation {
            dry_run_denied: vec!["shop/would-deny".into()],
            ..allow()
        },
    );
    check(
        "dry-run ALLOW that does not match: reported, and no ALLOW is in force",
        &[dry_ap(
            "shop",
            "would-allow-a",
            "{rules: [{from: [{source: {namespaces: [a]}}]}]}",
        )],
        client(),
        Evaluation {
            dry_run_denied: vec!["shop/would-allow-a".into()],
            ..allow()
        },
    );
    check(
        "dry-run ALLOW that matches: nothing to report",
        &[dry_ap(
            "shop",
            "would-allow",
            "{rules: [{from: [{source: {namespaces: [client]}}]}]}",
        )],
        client(),
        allow(),
    );
    check(
        "a dry-run ALLOW does not rescue a connection the real policies deny",
        &[
            ap(
                "shop",
                "allow-a",
                "{rules: [{from: [{source: {namespaces: [a]}}]}]}",
            ),
            dry_ap(
                "shop",
                "would-allow",
                "{rules: [{from: [{source: {namespaces: [client]}}]}]}",
            ),
        ],
        client(),
        not_allowed(),
    );
    check(
        "CUSTOM is not enforced at L4",
        &[ap(
            "shop",
            "ext",
            "{action: CUSTOM, provider: {name: opa}, rules: [{}]}",
        )],
        client(),
        allow(),
    );
}

#[test]
fn scope() {
    let deny_all = "{action: DENY, rules: [{}]}";
    check(
        "selector matching the pod applies",
        &[ap(
            "shop",
            "p",
            "{selector: {matchLabels: {app: web}}, action: DENY, rules: [{}]}",
        )],
        client(),
        denied_by("shop/p"),
    );
    check(
        "selector for other pods does not apply",
        &[ap(
            "shop",
            "p",
            "{selector: {matchLabels: {app: db}}, action: DENY, rules: [{}]}",
        )],
        client(),
        allow(),
    );
    check(
        "mesh-wide policy in the root namespace applies",
        &[ap("istio-system", "mesh", deny_all)],
        client(),
        denied_by("istio-system/mesh"),
    );
    check(
        "root-namespace selector selects in every namespace",
        &[ap(
            "istio-system",
            "web-everywhere",
            "{selector: {matchLabels: {app: web}}, rules: [{from: [{source: {namespaces: [a]}}]}]}",
        )],
        client(),
        not_allowed(),
    );
    check(
        "policies in other namespaces do not apply",
        &[ap("client", "p", deny_all), ap("default", "p", deny_all)],
        client(),
        allow(),
    );
    check(
        "waypoint policies (targetRefs) do not apply at L4",
        &[ap(
            "shop",
            "wp",
            "{targetRefs: [{kind: Service, name: web}], action: DENY, rules: [{}]}",
        )],
        client(),
        allow(),
    );
}

// === PeerAuthentication ===

fn pa(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )
}

fn check_mode(case: &str, policies: &[String], port: u16, want: PeerAuthnMode) {
    let files = vec![
        ("destination.yaml".to_string(), DESTINATION.to_string()),
        ("policies.yaml".to_string(), policies.concat()),
    ];
    let model = load_docs(&files).unwrap_or_else(|e| panic!("{case}: {e}"));
    let pod = model.pod("shop", "web").unwrap();
    assert_eq!(peer_authn_mode(&model, pod, port), want, "{case}");
}

#[test]
fn peer_authentication() {
    use PeerAuthnMode::*;
    let web = "selector: {matchLabels: {app: web}}";
    let cases: Vec<(&str, Vec<String>, u16, PeerAuthnMode)> = vec![
        ("nothing set: PERMISSIVE", vec![], 8080, Permissive),
        (
            "mesh STRICT",
            vec![pa("istio-system", "mesh", "{mtls: {mode: STRICT}}")],
            8080,
            Strict,
        ),
        (
            "mesh UNSET: PERMISSIVE",
            vec![pa("istio-system", "mesh", "{}")],
            8080,
            Permissive,
        ),
        (
            "namespace overrides mesh",
            vec![
                pa("istio-system", "mesh", "{mtls: {mode: STRICT}}"),
                pa("shop", "ns", "{mtls: {mode: PERMISSIVE}}"),
            ],
            8080,
            Permissive,
        ),
        (
            "namespace UNSET inherits mesh",
            vec![
                pa("istio-system", "mesh", "{mtls: {mode: STRICT}}"),
                pa("shop", "ns", "{mtls: {mode: UNSET}}"),
            ],
            8080,
            Strict,
        ),
        (
            "namespace DISABLE",
            vec![pa("shop", "ns", "{mtls: {mode: DISABLE}}")],
            8080,
            Disable,
        ),
        (
            "workload overrides namespace",
            vec![
                pa("shop", "ns", "{mtls: {mode: PERMISSIVE}}"),
                pa("shop", "web", &format!("{{{web}, mtls: {{mode: STRICT}}}}")),
            ],
            8080,
            Strict,
        ),
        (
            "workload UNSET inherits namespace",
            vec![
                pa("shop", "ns", "{mtls: {mode: STRICT}}"),
                pa("shop", "web", &format!("{{{web}}}")),
            ],
            8080,
            Strict,
        ),
        (
            "port level beats workload",
            vec![pa(
                "shop",
                "web",
                &format!(
                    "{{{web}, mtls: {{mode: STRICT}}, portLevelMtls: {{8080: {{mode: DISABLE}}}}}}"
                ),
            )],
            8080,
            Disable,
        ),
        (
            "port level only for its port",
            vec![pa(
                "shop",
                "web",
                &format!(
                    "{{{web}, mtls: {{mode: STRICT}}, portLevelMtls: {{8080: {{mode: DISABLE}}}}}}"
                ),
            )],
            9090,
            Strict,
        ),
        (
            "port level UNSET inherits all the way to mesh",
            vec![
                pa("istio-system", "mesh", "{mtls: {mode: STRICT}}"),
                pa(
                    "shop",
                    "web",
                    &format!("{{{web}, portLevelMtls: {{8080: {{mode: UNSET}}}}}}"),
                ),
            ],
            8080,
            Strict,
        ),
        (
            "selector for other pods does not apply",
            vec![
                pa("shop", "ns", "{mtls: {mode: STRICT}}"),
                pa(
                    "shop",
                    "db",
                    "{selector: {matchLabels: {app: db}}, mtls: {mode: DISABLE}}",
                ),
            ],
            8080,
            Strict,
        ),
        (
            "two matching workload policies: first by name wins",
            vec![
                pa(
                    "shop",
                    "b-strict",
                    &format!("{{{web}, mtls: {{mode: STRICT}}}}"),
                ),
                pa(
                    "shop",
                    "a-disable",
                    &format!("{{{web}, mtls: {{mode: DISABLE}}}}"),
                ),
            ],
            8080,
            Disable,
        ),
        (
            "root-namespace selector policies are ignored (as istiod does for ambient)",
            vec![pa(
                "istio-system",
                "web",
                &format!("{{{web}, mtls: {{mode: STRICT}}}}"),
            )],
            8080,
            Permissive,
        ),
        (
            "another namespace's policy does not apply",
            vec![pa("client", "ns", "{mtls: {mode: STRICT}}")],
            8080,
            Permissive,
        ),
    ];
    for (case, policies, port, want) in cases {
        check_mode(case, &policies, port, want);
    }
}

#[test]
fn policies_for_lists_what_applies_in_model_order() {
    let files = vec![
        ("destination.yaml".to_string(), DESTINATION.to_string()),
        (
            "policies.yaml".to_string(),
            [
                ap("shop", "b", "{}"),
                ap("shop", "a", "{selector: {matchLabels: {app: web}}}"),
                ap("istio-system", "mesh", "{}"),
                ap("shop", "other", "{selector: {matchLabels: {app: db}}}"),
                ap(
                    "shop",
                    "waypoint",
                    "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]}",
                ),
                ap("client", "elsewhere", "{}"),
            ]
            .concat(),
        ),
    ];
    let model = load_docs(&files).unwrap();
    let pod = model.pod("shop", "web").unwrap();
    let keys: Vec<String> = policies_for(&model, pod)
        .into_iter()
        .map(policy_key)
        .collect();
    assert_eq!(keys, ["istio-system/mesh", "shop/a", "shop/b"]);
}

#[test]
fn a_policy_on_a_service_entry_is_its_waypoints_never_a_pods() {
    // The entry's endpoints are the pod `shop/web` itself (`workloadSelector`): still the
    // policy is the egress waypoint's, for requests to the entry, never ztunnel's.
    let entry = "---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web-ext, namespace: shop, labels: {istio.io/use-waypoint: wp}}
spec:
  hosts: [web.example.com]
  addresses: [240.1.0.1]
  ports: [{number: 80, name: http}]
  resolution: STATIC
  workloadSelector: {labels: {app: web}}
";
    let policies = [
        ap(
            "shop",
            "egress-deny",
            "{targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: web-ext}], action: DENY, rules: [{}]}",
        ),
        ap(
            "shop",
            "egress-allow",
            "{targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: web-ext}], rules: [{from: [{source: {namespaces: [nobody]}}]}]}",
        ),
    ]
    .concat();
    let files = vec![
        ("destination.yaml".to_string(), DESTINATION.to_string()),
        ("entry.yaml".to_string(), entry.to_string()),
        ("policies.yaml".to_string(), policies),
    ];
    let model = load_docs(&files).unwrap();
    let pod = model.pod("shop", "web").unwrap();
    assert!(policies_for(&model, pod).is_empty());
    assert_eq!(authorize(&model, pod, &client()), allow());
    assert_eq!(
        authorize(&model, pod, &plaintext("10.1.0.5", 80)),
        allow(),
        "the entry's port on the pod too"
    );
    let key = crate::model::NamespacedName::new("shop", "web-ext");
    let wp = crate::model::NamespacedName::new("shop", "wp");
    let keys: Vec<String> =
        l7::policies_for_destination(&model, &wp, l7::Destination::ServiceEntry(&key))
            .into_iter()
            .map(policy_key)
            .collect();
    assert_eq!(keys, ["shop/egress-allow", "shop/egress-deny"]);
}
