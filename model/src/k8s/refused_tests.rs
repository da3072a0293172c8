//! What a refused policy would have selected ([`super::refused_policy`]). Every input is
//! first checked to be refused by the translator, so the table tests real refusals.

use super::{load_docs, refused_policy};
use crate::model::{Action, JwtHeader, Labels, RefusedJwtRule, RefusedScope, TargetRef};

/// A policy document of `kind` in namespace `app` named `p`, with `spec` (YAML flow style).
fn doc(kind: &str, annotations: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: {kind}\n\
         metadata: {{name: p, namespace: app, annotations: {{{annotations}}}}}\nspec: {spec}\n"
    )
}

fn labels(k: &str, v: &str) -> Labels {
    Labels::from([(k.to_string(), v.to_string())])
}

/// `Some((scope, dry_run))`: enforced as a DENY of everything; `None`: changes nothing.
type Deny = Option<(RefusedScope, bool)>;

fn check_ap(case: &str, annotations: &str, spec: &str, want: Deny) {
    let text = doc("AuthorizationPolicy", annotations, spec);
    let err = load_docs(&[("p.yaml".into(), text.clone())]).expect_err(case);
    let got = refused_policy("AuthorizationPolicy", "app", "p", &text, &err.to_string())
        .unwrap_or_else(|| panic!("{case}: no entry"));
    assert_eq!((got.namespace.as_str(), got.name.as_str()), ("app", "p"));
    assert!(got.reason.contains("spec"), "{case}: {}", got.reason);
    assert!(got.tokens.is_empty(), "{case}");
    let deny = got.deny.as_ref().map(|d| {
        let custom = spec.contains("CUSTOM");
        let action = if custom { Action::Custom } else { Action::Deny };
        assert_eq!(d.action, action, "{case}");
        assert_eq!(d.rules.len(), 1, "{case}: one empty rule");
        assert!(
            d.rules[0].from.is_empty() && d.rules[0].to.is_empty() && d.rules[0].when.is_empty()
        );
        assert_eq!((d.namespace.as_str(), d.name.as_str()), ("app", "p"));
        (got.scope.clone(), d.dry_run)
    });
    assert_eq!(deny, want, "{case}");
    if let Some((scope, _)) = &want {
        assert_eq!(&got.scope, scope, "{case}");
    }
}

#[test]
fn refused_authorization_policies_deny_what_they_would_select() {
    const BAD_RULES: &str = "rules: [{from: [{source: {principal: [a]}}]}]";
    let web = || RefusedScope::Selector(Some(labels("app", "web")));
    check_ap(
        "good selector, bad rules",
        "",
        &format!("{{selector: {{matchLabels: {{app: web}}}}, {BAD_RULES}}}"),
        Some((web(), false)),
    );
    check_ap(
        "no selector: the namespace's workloads, as an accepted one",
        "",
        &format!("{{action: DENY, {BAD_RULES}}}"),
        Some((RefusedScope::Selector(None), false)),
    );
    check_ap(
        "empty matchLabels is no selector",
        "",
        &format!("{{selector: {{matchLabels: {{}}}}, {BAD_RULES}}}"),
        Some((RefusedScope::Selector(None), false)),
    );
    check_ap(
        "selector of the wrong type: the whole namespace",
        "",
        "{selector: [app, web], rules: [{}]}",
        Some((RefusedScope::Namespace, false)),
    );
    check_ap(
        "matchLabels values of the wrong type: the whole namespace",
        "",
        "{selector: {matchLabels: {app: [web]}}}",
        Some((RefusedScope::Namespace, false)),
    );
    check_ap(
        "spec of the wrong type: the whole namespace",
        "",
        "[ALLOW]",
        Some((RefusedScope::Namespace, false)),
    );
    check_ap(
        "targetRefs with bad rules: the waypoint's target",
        "",
        &format!("{{targetRefs: [{{kind: Service, group: \"\", name: web}}], {BAD_RULES}}}"),
        Some((
            RefusedScope::TargetRefs(vec![TargetRef {
                group: String::new(),
                kind: "Service".into(),
                name: "web".into(),
            }]),
            false,
        )),
    );
    check_ap(
        "targetRefs of the wrong type: the whole namespace",
        "",
        "{targetRefs: web, rules: [{}]}",
        Some((RefusedScope::Namespace, false)),
    );
    check_ap(
        "both selector and targetRefs: the whole namespace",
        "",
        "{selector: {matchLabels: {app: web}}, targetRef: {kind: Service, name: web}}",
        Some((RefusedScope::Namespace, false)),
    );
    check_ap(
        "AUDIT changes nothing",
        "",
        &format!("{{action: AUDIT, selector: {{matchLabels: {{app: web}}}}, {BAD_RULES}}}"),
        None,
    );
    check_ap(
        "CUSTOM stays CUSTOM: denies where a CUSTOM is enforced (the waypoint)",
        "",
        &format!("{{action: CUSTOM, selector: {{matchLabels: {{app: web}}}}, {BAD_RULES}}}"),
        Some((web(), false)),
    );
    check_ap(
        "unknown action: deny",
        "",
        "{action: ALOW, selector: {matchLabels: {app: web}}}",
        Some((web(), false)),
    );
    check_ap(
        "unreadable action: deny",
        "",
        "{action: [AUDIT], selector: {matchLabels: {app: web}}}",
        Some((web(), false)),
    );
    check_ap(
        "dry-run stays dry-run",
        "istio.io/dry-run: \"true\"",
        &format!("{{selector: {{matchLabels: {{app: web}}}}, {BAD_RULES}}}"),
        Some((web(), true)),
    );
}

fn check_ra(case: &str, spec: &str, scope: RefusedScope, tokens: Vec<RefusedJwtRule>) {
    let text = doc("RequestAuthentication", "", spec);
    let err = load_docs(&[("p.yaml".into(), text.clone())]).expect_err(case);
    let got = refused_policy("RequestAuthentication", "app", "p", &text, &err.to_string())
        .unwrap_or_else(|| panic!("{case}: no entry"));
    assert!(got.deny.is_none(), "{case}");
    assert_eq!(got.scope, scope, "{case}");
    assert_eq!(got.tokens, tokens, "{case}");
}

#[test]
fn refused_request_authentications_reject_the_tokens_they_would_check() {
    let svc = || {
        RefusedScope::TargetRefs(vec![TargetRef {
            group: String::new(),
            kind: "Service".into(),
            name: "web".into(),
        }])
    };
    let rule = |issuer: Option<&str>, headers: Vec<JwtHeader>, params: &[&str]| RefusedJwtRule {
        issuer: issuer.map(str::to_string),
        from_headers: headers,
        from_params: params.iter().map(|p| p.to_string()).collect(),
    };
    check_ra(
        "unsupported field: issuers and locations still read",
        "{targetRefs: [{kind: Service, name: web}], jwtRules: [\
         {issuer: https://a, jwksUri: https://a/keys, timeout: 5s, \
          fromHeaders: [{name: X-Token, prefix: \"T \"}], fromParams: [tok]}, \
         {issuer: https://b, jwks: not-json}]}",
        svc(),
        vec![
            rule(
                Some("https://a"),
                vec![JwtHeader {
                    name: "x-token".into(),
                    prefix: "T ".into(),
                }],
                &["tok"],
            ),
            rule(Some("https://b"), vec![], &[]),
        ],
    );
    check_ra(
        "issuer of the wrong type: any token",
        "{targetRefs: [{kind: Service, name: web}], jwtRules: [{issuer: [x], jwksUri: https://a}]}",
        svc(),
        vec![rule(None, vec![], &[])],
    );
    check_ra(
        "jwtRules of the wrong type: any token",
        "{targetRefs: [{kind: Service, name: web}], jwtRules: https://a}",
        svc(),
        vec![rule(None, vec![], &[])],
    );
    check_ra(
        "targetRefs of the wrong type: the whole namespace",
        "{targetRefs: 7, jwtRules: [{issuer: https://a, jwksUri: https://a/keys}]}",
        RefusedScope::Namespace,
        vec![rule(Some("https://a"), vec![], &[])],
    );
}

#[test]
fn other_kinds_do_not_fail_closed() {
    let text =
        "apiVersion: v1\nkind: Pod\nmetadata: {name: p, namespace: app}\nstatus: {podIP: x}\n";
    assert_eq!(refused_policy("Pod", "app", "p", text, "bad ip"), None);
    assert_eq!(
        refused_policy("PeerAuthentication", "app", "p", text, "bad"),
        None
    );
}
