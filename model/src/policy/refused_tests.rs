//! Refused policies fail closed: at L4 (the node agent), at L7 (the waypoint) and in
//! request authentication. Each refused entry is built the way the API-server source builds
//! it, from a document the translator refuses.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::HeaderMap;

use super::authn::{refused_for_waypoint, refused_token};
use super::l7::{authorize_l7, L7Request};
use super::*;
use crate::jwt::JwtError;
use crate::k8s::{load_docs, refused_policy};
use crate::model::{NamespacedName, RefusedPolicy};

/// `shop/web` (app=web, 10.0.0.10) behind Service `shop/web`.
const MESH: &str = "
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, labels: {app: web}}
status: {podIP: 10.0.0.10}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
";

/// The fail-closed entry of a `kind` document refused in `namespace` as `bad`.
fn refused_doc(kind: &str, namespace: &str, spec: &str) -> RefusedPolicy {
    let text = format!(
        "apiVersion: security.istio.io/v1\nkind: {kind}\n\
         metadata: {{name: bad, namespace: {namespace}}}\nspec: {spec}\n"
    );
    let err = load_docs(&[("bad.yaml".into(), text.clone())]).expect_err("refused");
    refused_policy(kind, namespace, "bad", &text, &err.to_string()).expect("fails closed")
}

fn model(refused: Vec<RefusedPolicy>) -> Model {
    load_docs(&[("mesh.yaml".into(), MESH.into())])
        .expect("mesh")
        .with_refused_policies(refused)
}

fn l4(model: &Model) -> Decision {
    let pod = model.pod("shop", "web").expect("pod");
    let req = L4Request {
        src_identity: Some(Identity::new("cluster.local", "client", "client")),
        src_ip: "10.1.0.5".parse().expect("ip"),
        dst_ip: "10.0.0.10".parse().expect("ip"),
        dst_port: 8080,
    };
    authorize(model, pod, &req).decision
}

fn l7(model: &Model) -> Decision {
    let id = Identity::new("cluster.local", "client", "client");
    let headers = HeaderMap::new();
    let req = L7Request {
        src_identity: Some(&id),
        src_ip: "10.1.0.5".parse().expect("ip"),
        remote_ip: "10.1.0.5".parse().expect("ip"),
        dst_ip: "10.96.0.10".parse().expect("ip"),
        dst_port: 80,
        host: "web.shop.svc.cluster.local",
        method: "GET",
        path: "/",
        headers: &headers,
        auth: None,
    };
    let waypoint = NamespacedName::new("shop", "waypoint");
    let service = NamespacedName::new("shop", "web");
    authorize_l7(model, &waypoint, Some(&service), &req).decision
}

fn denied(policy: &str) -> Decision {
    Decision::Deny {
        policy: Some(policy.to_string()),
    }
}

const BAD_RULES: &str = "rules: [{to: [{operation: {method: [GET]}}]}]";

#[test]
fn a_refused_policy_denies_what_it_would_select_where_an_accepted_one_is_enforced() {
    let open = model(vec![]);
    assert_eq!((l4(&open), l7(&open)), (Decision::Allow, Decision::Allow));

    // (case, namespace, spec, L4 decision, L7 decision)
    let cases: Vec<(&str, &str, String, Decision, Decision)> = vec![
        (
            "selector matching the pod: the agent denies",
            "shop",
            format!("{{selector: {{matchLabels: {{app: web}}}}, {BAD_RULES}}}"),
            denied("shop/bad"),
            Decision::Allow,
        ),
        (
            "selector matching another workload: nothing",
            "shop",
            format!("{{selector: {{matchLabels: {{app: db}}}}, {BAD_RULES}}}"),
            Decision::Allow,
            Decision::Allow,
        ),
        (
            "another namespace: nothing",
            "other",
            format!("{{{BAD_RULES}}}"),
            Decision::Allow,
            Decision::Allow,
        ),
        (
            "root namespace, no selector: mesh-wide at the agent",
            "istio-system",
            format!("{{action: DENY, {BAD_RULES}}}"),
            denied("istio-system/bad"),
            Decision::Allow,
        ),
        (
            "targetRefs the Service: the waypoint denies, the agent does not",
            "shop",
            format!("{{targetRefs: [{{kind: Service, group: \"\", name: web}}], {BAD_RULES}}}"),
            Decision::Allow,
            denied("shop/bad"),
        ),
        (
            "targetRefs another Service: nothing",
            "shop",
            format!("{{targetRefs: [{{kind: Service, group: \"\", name: api}}], {BAD_RULES}}}"),
            Decision::Allow,
            Decision::Allow,
        ),
        (
            "unreadable selection: the whole namespace, at both",
            "shop",
            "{selector: web, rules: [{}]}".to_string(),
            denied("shop/bad"),
            denied("shop/bad"),
        ),
        (
            "unreadable selection in the root namespace: the whole mesh",
            "istio-system",
            "{targetRefs: 3}".to_string(),
            denied("istio-system/bad"),
            denied("istio-system/bad"),
        ),
        (
            "CUSTOM with a selector: ignored by the agent, as an accepted one",
            "shop",
            format!("{{action: CUSTOM, selector: {{matchLabels: {{app: web}}}}, {BAD_RULES}}}"),
            Decision::Allow,
            Decision::Allow,
        ),
        (
            "CUSTOM on the Service: the waypoint denies",
            "shop",
            format!("{{action: CUSTOM, targetRefs: [{{kind: Service, name: web}}], {BAD_RULES}}}"),
            Decision::Allow,
            denied("shop/bad"),
        ),
        (
            "AUDIT: nothing",
            "shop",
            format!("{{action: AUDIT, {BAD_RULES}}}"),
            Decision::Allow,
            Decision::Allow,
        ),
        (
            "unreadable action: deny",
            "shop",
            "{action: {allow: true}}".to_string(),
            denied("shop/bad"),
            Decision::Allow,
        ),
    ];
    for (case, ns, spec, want_l4, want_l7) in cases {
        let m = model(vec![refused_doc("AuthorizationPolicy", ns, &spec)]);
        assert_eq!((l4(&m), l7(&m)), (want_l4, want_l7), "{case}");
    }
}

#[test]
fn the_dump_lists_the_workloads_a_refused_policy_closes() {
    let m = model(vec![refused_doc(
        "AuthorizationPolicy",
        "shop",
        &format!("{{selector: {{matchLabels: {{app: web}}}}, {BAD_RULES}}}"),
    )]);
    let dump = serde_json::to_value(m.dump()).expect("json");
    let entry = &dump["refused_policies"][0];
    assert_eq!(entry["kind"], "AuthorizationPolicy");
    assert_eq!(entry["name"], "bad");
    assert_eq!(entry["effect"], "deny_all");
    assert_eq!(entry["workloads"], serde_json::json!(["shop/web"]));
    assert!(
        entry["reason"]
            .as_str()
            .is_some_and(|r| r.contains("method")),
        "{entry}"
    );
}

/// An unsigned token with `iss` (signature bytes present: decoding does not verify).
fn token(iss: &str) -> String {
    let part = |json: &str| URL_SAFE_NO_PAD.encode(json);
    format!(
        "{}.{}.{}",
        part(r#"{"alg":"RS256"}"#),
        part(&format!(r#"{{"iss":"{iss}"}}"#)),
        part("sig")
    )
}

fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.append(*k, v.parse().expect("value"));
    }
    h
}

#[test]
fn a_refused_request_authentication_rejects_the_tokens_it_would_check() {
    let svc_rule = "{targetRefs: [{kind: Service, group: \"\", name: web}], jwtRules: [\
                    {issuer: https://a, jwksUri: https://a/keys, timeout: 5s}, \
                    {issuer: https://b, jwksUri: https://b/keys, fromHeaders: [{name: x-token}]}]}";
    let m = model(vec![refused_doc("RequestAuthentication", "shop", svc_rule)]);
    let waypoint = NamespacedName::new("shop", "waypoint");
    let web = NamespacedName::new("shop", "web");
    let api = NamespacedName::new("shop", "api");
    let refused = refused_for_waypoint(&m, &waypoint, Some(&web));
    assert_eq!(refused.len(), 1);
    assert!(refused_for_waypoint(&m, &waypoint, Some(&api)).is_empty());

    let rejected = |h: HeaderMap, q: Option<&str>| refused_token(&refused, &h, q).map(|d| d.error);
    let bearer = |iss: &str| ("authorization", format!("Bearer {}", token(iss)));
    let policy = Some(JwtError::PolicyRefused("shop/bad".into()));
    assert_eq!(rejected(headers(&[]), None), None, "no token: unaffected");
    assert_eq!(rejected(headers(&[bearer("https://a")]), None), policy);
    assert_eq!(
        rejected(
            headers(&[]),
            Some(&format!("access_token={}", token("https://a")))
        ),
        policy,
        "default query parameter"
    );
    assert_eq!(
        rejected(headers(&[bearer("https://other")]), None),
        None,
        "another issuer is not its business"
    );
    assert_eq!(
        rejected(headers(&[bearer("https://b")]), None),
        None,
        "https://b is looked for in x-token only"
    );
    assert_eq!(
        rejected(headers(&[("x-token", token("https://b"))]), None),
        policy
    );
    assert_eq!(
        rejected(
            headers(&[("authorization", "Bearer not-a-jwt".into())]),
            None
        ),
        policy,
        "a token that cannot be decoded would have been refused too"
    );

    // Issuers unreadable: any bearer token.
    let m = model(vec![refused_doc(
        "RequestAuthentication",
        "shop",
        "{targetRefs: [{kind: Service, name: web}], jwtRules: 7}",
    )]);
    let refused = refused_for_waypoint(&m, &waypoint, Some(&web));
    let h = headers(&[bearer("https://other")]);
    assert!(refused_token(&refused, &h, None).is_some());
    assert!(refused_token(&refused, &HeaderMap::new(), None).is_none());

    // A selector is for sidecars: the waypoint ignores it, as it does an accepted one.
    let m = model(vec![refused_doc(
        "RequestAuthentication",
        "shop",
        "{selector: {matchLabels: {app: web}}, jwtRules: 7}",
    )]);
    assert!(refused_for_waypoint(&m, &waypoint, Some(&web)).is_empty());
}
