//! L7 policy tables. Policies are YAML loaded through `k8s::load_docs`, so translation and
//! evaluation are tested together. Requests go through the waypoint `shop/waypoint` to the
//! service `shop/web` (port 8080) unless a case says otherwise; the default client is
//! `cluster.local/ns/client/sa/client` at 10.1.0.5 sending `GET /` with no JWT.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::json;

use super::*;
use crate::k8s::load_docs;
use crate::policy::Decision;

/// One AuthorizationPolicy document; `spec` is YAML flow style.
fn ap(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
         metadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n"
    )
}

const ON_WAYPOINT: &str =
    "targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: waypoint}]";

/// A policy in `shop` attached to the waypoint; `rest` continues the spec mapping.
fn wp(name: &str, rest: &str) -> String {
    let spec = if rest.is_empty() {
        format!("{{{ON_WAYPOINT}}}")
    } else {
        format!("{{{ON_WAYPOINT}, {rest}}}")
    };
    ap("shop", name, &spec)
}

/// An ALLOW policy on the waypoint with one rule.
fn allow_rule(rule: &str) -> String {
    wp("p", &format!("rules: [{rule}]"))
}

/// A request as the waypoint sees it, owned so cases can be built fluently.
#[derive(Clone)]
struct Req {
    identity: Option<Identity>,
    src_ip: IpAddr,
    remote_ip: IpAddr,
    dst_port: u16,
    host: String,
    method: String,
    path: String,
    headers: HeaderMap,
    auth: Option<RequestAuth>,
    service: Option<NamespacedName>,
    /// A ServiceEntry destination (egress), instead of `service`.
    entry: Option<NamespacedName>,
}

fn req() -> Req {
    Req {
        identity: Some(Identity::new("cluster.local", "client", "client")),
        src_ip: "10.1.0.5".parse().unwrap(),
        remote_ip: "10.1.0.5".parse().unwrap(),
        dst_port: 8080,
        host: "web.shop.svc.cluster.local:8080".into(),
        method: "GET".into(),
        path: "/".into(),
        headers: HeaderMap::new(),
        auth: None,
        service: Some(NamespacedName::new("shop", "web")),
        entry: None,
    }
}

impl Req {
    fn from(mut self, ns: &str, sa: &str) -> Self {
        self.identity = Some(Identity::new("cluster.local", ns, sa));
        self
    }
    fn plaintext(mut self) -> Self {
        self.identity = None;
        self
    }
    fn remote(mut self, ip: &str) -> Self {
        self.remote_ip = ip.parse().unwrap();
        self
    }
    fn method(mut self, m: &str) -> Self {
        self.method = m.into();
        self
    }
    fn path(mut self, p: &str) -> Self {
        self.path = p.into();
        self
    }
    fn host(mut self, h: &str) -> Self {
        self.host = h.into();
        self
    }
    fn port(mut self, p: u16) -> Self {
        self.dst_port = p;
        self
    }
    fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.append(
            HeaderName::from_bytes(name.as_bytes()).unwrap(),
            HeaderValue::from_str(value).unwrap(),
        );
        self
    }
    fn for_service(mut self, svc: Option<(&str, &str)>) -> Self {
        self.service = svc.map(|(ns, n)| NamespacedName::new(ns, n));
        self
    }
    fn for_entry(mut self, ns: &str, name: &str) -> Self {
        self.service = None;
        self.entry = Some(NamespacedName::new(ns, name));
        self
    }
    /// A validated JWT from `issuer` for `subject`; `claims` is the whole payload.
    fn jwt(mut self, issuer: &str, subject: &str, claims: serde_json::Value) -> Self {
        let audiences = match claims.get("aud") {
            Some(serde_json::Value::String(s)) => vec![s.clone()],
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect(),
            _ => vec![],
        };
        self.auth = Some(RequestAuth {
            issuer: issuer.into(),
            subject: subject.into(),
            audiences,
            presenter: claims.get("azp").and_then(|v| v.as_str()).map(String::from),
            claims,
        });
        self
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

fn check(case: &str, policies: &[String], r: Req, want: Evaluation) {
    let files = vec![("policies.yaml".to_string(), policies.concat())];
    let model = load_docs(&files).unwrap_or_else(|e| panic!("{case}: {e}"));
    let l7 = L7Request {
        src_identity: r.identity.as_ref(),
        src_ip: r.src_ip,
        remote_ip: r.remote_ip,
        dst_ip: "10.0.0.10".parse().unwrap(),
        dst_port: r.dst_port,
        host: &r.host,
        method: &r.method,
        path: &r.path,
        headers: &r.headers,
        auth: r.auth.as_ref(),
    };
    let waypoint = NamespacedName::new("shop", "waypoint");
    let got = match &r.entry {
        Some(entry) => authorize_l7_to(&model, &waypoint, Destination::ServiceEntry(entry), &l7),
        None => authorize_l7(&model, &waypoint, r.service.as_ref(), &l7),
    };
    assert_eq!(got, want, "{case}");
}

#[test]
fn evaluation_order() {
    check("no policy allows", &[], req(), allow());
    check(
        "a waypoint policy with no rules denies all",
        &[wp("deny-all", "")],
        req(),
        not_allowed(),
    );
    check(
        "DENY beats a matching ALLOW",
        &[
            wp(
                "allow-get",
                "rules: [{to: [{operation: {methods: [GET]}}]}]",
            ),
            wp(
                "deny-admin",
                "action: DENY, rules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]",
            ),
        ],
        req().path("/admin/users"),
        denied_by("shop/deny-admin"),
    );
    check(
        "ALLOW that does not match denies without naming a policy",
        &[wp(
            "allow-post",
            "rules: [{to: [{operation: {methods: [POST]}}]}]",
        )],
        req(),
        not_allowed(),
    );
    check(
        "a matching CUSTOM policy denies (external authorization is not supported)",
        &[wp(
            "ext",
            "action: CUSTOM, provider: {name: opa}, rules: [{}]",
        )],
        req(),
        denied_by("shop/ext"),
    );
    check(
        "CUSTOM is named before a DENY that also matches",
        &[
            wp("a-deny", "action: DENY, rules: [{}]"),
            wp(
                "z-ext",
                "action: CUSTOM, provider: {name: opa}, rules: [{}]",
            ),
        ],
        req(),
        denied_by("shop/z-ext"),
    );
    check(
        "AUDIT records and does not decide",
        &[wp(
            "audit-get",
            "action: AUDIT, rules: [{to: [{operation: {methods: [GET]}}]}]",
        )],
        req(),
        Evaluation {
            audited: vec!["shop/audit-get".into()],
            ..allow()
        },
    );
    check(
        "dry-run DENY is reported, not enforced",
        &[format!(
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n\
             metadata: {{name: would-deny, namespace: shop, annotations: {{istio.io/dry-run: \"true\"}}}}\n\
             spec: {{{ON_WAYPOINT}, action: DENY, rules: [{{}}]}}\n"
        )],
        req(),
        Evaluation {
            dry_run_denied: vec!["shop/would-deny".into()],
            ..allow()
        },
    );
}

#[test]
fn which_policies_apply() {
    let deny_all = "action: DENY, rules: [{}]";
    let cases: Vec<(&str, String, Req, Evaluation)> = vec![
        (
            "namespace-wide policies are for ztunnel",
            ap("shop", "ns", &format!("{{{deny_all}}}")),
            req(),
            allow(),
        ),
        (
            "selector policies are for ztunnel",
            ap(
                "shop",
                "sel",
                &format!("{{selector: {{matchLabels: {{app: web}}}}, {deny_all}}}"),
            ),
            req(),
            allow(),
        ),
        (
            "a policy on the destination service applies",
            ap(
                "shop",
                "svc",
                &format!("{{targetRefs: [{{kind: Service, name: web}}], {deny_all}}}"),
            ),
            req(),
            denied_by("shop/svc"),
        ),
        (
            "group core names the core API group",
            ap(
                "shop",
                "svc",
                &format!("{{targetRefs: [{{kind: Service, group: core, name: web}}], {deny_all}}}"),
            ),
            req(),
            denied_by("shop/svc"),
        ),
        (
            "a policy on another service does not",
            ap(
                "shop",
                "svc",
                &format!("{{targetRefs: [{{kind: Service, name: db}}], {deny_all}}}"),
            ),
            req(),
            allow(),
        ),
        (
            "a service policy does not apply to traffic addressed to a workload",
            ap(
                "shop",
                "svc",
                &format!("{{targetRefs: [{{kind: Service, name: web}}], {deny_all}}}"),
            ),
            req().for_service(None),
            allow(),
        ),
        (
            "a service policy must live in the service's namespace",
            ap(
                "other",
                "svc",
                &format!("{{targetRefs: [{{kind: Service, name: web}}], {deny_all}}}"),
            ),
            req(),
            allow(),
        ),
        (
            "a policy on another Gateway does not apply",
            ap(
                "shop",
                "gw",
                &format!(
                    "{{targetRefs: [{{kind: Gateway, group: gateway.networking.k8s.io, name: other}}], {deny_all}}}"
                ),
            ),
            req(),
            allow(),
        ),
        (
            "the istio-waypoint GatewayClass from the root namespace applies to every waypoint",
            ap(
                "istio-system",
                "all-waypoints",
                &format!(
                    "{{targetRefs: [{{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}}], {deny_all}}}"
                ),
            ),
            req(),
            denied_by("istio-system/all-waypoints"),
        ),
        (
            "the GatewayClass outside the root namespace does not",
            ap(
                "shop",
                "class",
                &format!(
                    "{{targetRefs: [{{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}}], {deny_all}}}"
                ),
            ),
            req(),
            allow(),
        ),
    ];
    for (case, policy, r, want) in cases {
        check(case, &[policy], r, want);
    }
}

#[test]
fn a_policy_targeting_a_service_entry_applies_to_its_egress_requests() {
    let deny_all = "action: DENY, rules: [{}]";
    let on_entry = |ns: &str, group: &str, name: &str| {
        ap(
            ns,
            "egress",
            &format!(
                "{{targetRefs: [{{group: {group}, kind: ServiceEntry, name: {name}}}], {deny_all}}}"
            ),
        )
    };
    let istio = "networking.istio.io";
    let cases: Vec<(&str, String, Req, Evaluation)> = vec![
        (
            "a policy on the destination ServiceEntry applies",
            on_entry("shop", istio, "httpbin"),
            req().for_entry("shop", "httpbin"),
            denied_by("shop/egress"),
        ),
        (
            "not to a Service of the same name",
            on_entry("shop", istio, "httpbin"),
            req().for_service(Some(("shop", "httpbin"))),
            allow(),
        ),
        (
            "not to a ServiceEntry of the same name in another namespace",
            on_entry("shop", istio, "httpbin"),
            req().for_entry("other", "httpbin"),
            allow(),
        ),
        (
            "it must live in the entry's namespace",
            on_entry("other", istio, "httpbin"),
            req().for_entry("shop", "httpbin"),
            allow(),
        ),
        (
            "not to another entry",
            on_entry("shop", istio, "api"),
            req().for_entry("shop", "httpbin"),
            allow(),
        ),
        (
            "not to traffic addressed to a workload",
            on_entry("shop", istio, "httpbin"),
            req().for_service(None),
            allow(),
        ),
        (
            "the kind is Istio's: another group names nothing",
            on_entry("shop", "\"\"", "httpbin"),
            req().for_entry("shop", "httpbin"),
            allow(),
        ),
        (
            "a Service policy of the entry's name does not apply to the entry",
            ap(
                "shop",
                "svc",
                &format!("{{targetRefs: [{{kind: Service, name: httpbin}}], {deny_all}}}"),
            ),
            req().for_entry("shop", "httpbin"),
            allow(),
        ),
        (
            "the waypoint's own policies apply to egress too",
            wp("deny-all", ""),
            req().for_entry("shop", "httpbin"),
            not_allowed(),
        ),
        (
            "as do the root namespace's on the istio-waypoint GatewayClass",
            ap(
                "istio-system",
                "all-waypoints",
                &format!(
                    "{{targetRefs: [{{kind: GatewayClass, group: gateway.networking.k8s.io, name: istio-waypoint}}], {deny_all}}}"
                ),
            ),
            req().for_entry("shop", "httpbin"),
            denied_by("istio-system/all-waypoints"),
        ),
    ];
    for (case, policy, r, want) in cases {
        check(case, &[policy], r, want);
    }
    // ALLOW on the entry next to one on a same-named entry elsewhere (one index bucket):
    // only the entry's own decides, in model order with the waypoint's.
    let policies = [
        ap(
            "other",
            "allow-post",
            "{targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: httpbin}], rules: [{to: [{operation: {methods: [POST]}}]}]}",
        ),
        ap(
            "shop",
            "allow-get",
            "{targetRefs: [{group: networking.istio.io, kind: ServiceEntry, name: httpbin}], rules: [{to: [{operation: {methods: [GET]}}]}]}",
        ),
    ];
    check(
        "GET allowed",
        &policies,
        req().for_entry("shop", "httpbin"),
        allow(),
    );
    check(
        "POST not allowed",
        &policies,
        req().for_entry("shop", "httpbin").method("POST"),
        not_allowed(),
    );
    let model = load_docs(&[("p.yaml".to_string(), policies.concat())]).expect("valid");
    let entry = NamespacedName::new("other", "httpbin");
    let waypoint = NamespacedName::new("shop", "waypoint");
    let names: Vec<String> =
        policies_for_destination(&model, &waypoint, Destination::ServiceEntry(&entry))
            .iter()
            .map(|p| crate::policy::policy_key(p))
            .collect();
    assert_eq!(names, ["other/allow-post"]);
}

#[test]
fn source_fields() {
    let from = |source: &str| allow_rule(&format!("{{from: [{{source: {source}}}]}}"));
    let jwt = || req().jwt("https://idp.example", "alice", json!({"aud": "web"}));
    let cases: Vec<(&str, &str, Req, Evaluation)> = vec![
        (
            "principal",
            "{principals: [cluster.local/ns/client/sa/client]}",
            req(),
            allow(),
        ),
        (
            "principal, other client",
            "{principals: [cluster.local/ns/client/sa/client]}",
            req().from("client", "other"),
            not_allowed(),
        ),
        (
            "principal, plaintext",
            "{principals: [\"*\"]}",
            req().plaintext(),
            not_allowed(),
        ),
        (
            "the waypoint's caller across namespaces",
            "{principals: [cluster.local/ns/frontend/sa/web]}",
            req().from("frontend", "web"),
            allow(),
        ),
        ("namespace", "{namespaces: [client]}", req(), allow()),
        (
            "notNamespaces",
            "{notNamespaces: [client]}",
            req(),
            not_allowed(),
        ),
        (
            "ipBlocks is the peer address",
            "{ipBlocks: [10.1.0.0/24]}",
            req().remote("192.0.2.7"),
            allow(),
        ),
        (
            "remoteIpBlocks is the original client",
            "{remoteIpBlocks: [192.0.2.0/24]}",
            req().remote("192.0.2.7"),
            allow(),
        ),
        (
            "remoteIpBlocks does not look at the peer",
            "{remoteIpBlocks: [10.1.0.0/24]}",
            req().remote("192.0.2.7"),
            not_allowed(),
        ),
        (
            "requestPrincipals exact iss/sub",
            "{requestPrincipals: [https://idp.example/alice]}",
            jwt(),
            allow(),
        ),
        (
            "requestPrincipals, other subject",
            "{requestPrincipals: [https://idp.example/bob]}",
            jwt(),
            not_allowed(),
        ),
        (
            "requestPrincipals * needs a token",
            "{requestPrincipals: [\"*\"]}",
            req(),
            not_allowed(),
        ),
        (
            "requestPrincipals * with a token",
            "{requestPrincipals: [\"*\"]}",
            jwt(),
            allow(),
        ),
        (
            "requestPrincipals by issuer prefix",
            "{requestPrincipals: [\"https://idp.example/*\"]}",
            jwt(),
            allow(),
        ),
        (
            "notRequestPrincipals * matches requests without a token",
            "{notRequestPrincipals: [\"*\"]}",
            req(),
            allow(),
        ),
        (
            "principal and request principal are AND'ed",
            "{principals: [cluster.local/ns/client/sa/client], requestPrincipals: [\"*\"]}",
            req(),
            not_allowed(),
        ),
    ];
    for (case, source, r, want) in cases {
        check(case, &[from(source)], r, want);
    }
    check(
        "DENY notRequestPrincipals * rejects unauthenticated requests",
        &[wp(
            "require-jwt",
            "action: DENY, rules: [{from: [{source: {notRequestPrincipals: [\"*\"]}}]}]",
        )],
        req(),
        denied_by("shop/require-jwt"),
    );
    check(
        "DENY notRequestPrincipals * lets a token through",
        &[wp(
            "require-jwt",
            "action: DENY, rules: [{from: [{source: {notRequestPrincipals: [\"*\"]}}]}]",
        )],
        jwt(),
        allow(),
    );
}

#[test]
fn operation_fields() {
    let to = |op: &str| allow_rule(&format!("{{to: [{{operation: {op}}}]}}"));
    let cases: Vec<(&str, &str, Req, Evaluation)> = vec![
        (
            "host ignores case and the port",
            "{hosts: [Web.Shop.svc.cluster.local]}",
            req(),
            allow(),
        ),
        (
            "host with the port",
            "{hosts: [\"web.shop.svc.cluster.local:8080\"]}",
            req(),
            allow(),
        ),
        (
            "host suffix wildcard",
            "{hosts: [\"*.shop.svc.cluster.local\"]}",
            req(),
            allow(),
        ),
        (
            "other host",
            "{hosts: [db.shop.svc.cluster.local]}",
            req(),
            not_allowed(),
        ),
        ("notHosts", "{notHosts: [\"web.*\"]}", req(), not_allowed()),
        (
            "notHosts passes a host it does not name",
            "{notHosts: [\"web.*\"]}",
            req().host("web"),
            allow(),
        ),
        ("method", "{methods: [GET, HEAD]}", req(), allow()),
        (
            "method is case-sensitive",
            "{methods: [get]}",
            req(),
            not_allowed(),
        ),
        (
            "notMethods",
            "{notMethods: [DELETE]}",
            req().method("DELETE"),
            not_allowed(),
        ),
        (
            "exact path ignores the query",
            "{paths: [/api]}",
            req().path("/api?page=2"),
            allow(),
        ),
        (
            "exact path is exact",
            "{paths: [/api]}",
            req().path("/api/"),
            not_allowed(),
        ),
        (
            "path prefix",
            "{paths: [\"/api/*\"]}",
            req().path("/api/v1/items"),
            allow(),
        ),
        (
            "path suffix",
            "{paths: [\"*.png\"]}",
            req().path("/img/logo.png"),
            allow(),
        ),
        (
            "path * matches any path",
            "{paths: [\"*\"]}",
            req().path("/x"),
            allow(),
        ),
        (
            "path template {*} is one segment",
            "{paths: [\"/users/{*}/profile\"]}",
            req().path("/users/42/profile"),
            allow(),
        ),
        (
            "path template {*} is not two",
            "{paths: [\"/users/{*}/profile\"]}",
            req().path("/users/4/2/profile"),
            not_allowed(),
        ),
        (
            "path template {**} is the rest",
            "{paths: [\"/files/{**}\"]}",
            req().path("/files/a/b/c.txt"),
            allow(),
        ),
        (
            "notPaths",
            "{notPaths: [\"/admin*\"]}",
            req().path("/admin"),
            not_allowed(),
        ),
        ("ports", "{ports: [\"8080\"]}", req(), allow()),
        (
            "other port",
            "{ports: [\"8080\"]}",
            req().port(9090),
            not_allowed(),
        ),
        (
            "fields in one operation are AND'ed",
            "{methods: [GET], paths: [/api]}",
            req().path("/other"),
            not_allowed(),
        ),
    ];
    for (case, op, r, want) in cases {
        check(case, &[to(op)], r, want);
    }
}

#[test]
fn conditions() {
    let when =
        |key: &str, values: &str| allow_rule(&format!("{{when: [{{key: \"{key}\", {values}}}]}}"));
    let claims = json!({
        "aud": ["web", "api"],
        "azp": "frontend",
        "groups": ["dev", "ops"],
        "org": {"team": {"name": "payments"}},
        "admin": true,
    });
    let jwt = || req().jwt("https://idp.example", "alice", claims.clone());
    let cases: Vec<(&str, &str, &str, Req, Evaluation)> = vec![
        (
            "header exact",
            "request.headers[x-user]",
            "values: [alice]",
            req().header("x-user", "alice"),
            allow(),
        ),
        (
            "header names ignore case",
            "request.headers[X-User]",
            "values: [alice]",
            req().header("x-user", "alice"),
            allow(),
        ),
        (
            "header prefix",
            "request.headers[user-agent]",
            "values: [\"curl/*\"]",
            req().header("user-agent", "curl/8.5"),
            allow(),
        ),
        (
            "header * is presence, even empty",
            "request.headers[x-debug]",
            "values: [\"*\"]",
            req().header("x-debug", ""),
            allow(),
        ),
        (
            "absent header never matches values",
            "request.headers[x-user]",
            "values: [\"*\"]",
            req(),
            not_allowed(),
        ),
        (
            "absent header matches notValues",
            "request.headers[x-user]",
            "notValues: [mallory]",
            req(),
            allow(),
        ),
        (
            "repeated header: any element",
            "request.headers[x-tag]",
            "values: [b]",
            req().header("x-tag", "a").header("x-tag", "b"),
            allow(),
        ),
        (
            "claim list element",
            "request.auth.claims[groups]",
            "values: [ops]",
            jwt(),
            allow(),
        ),
        (
            "nested claim",
            "request.auth.claims[org][team][name]",
            "values: [payments]",
            jwt(),
            allow(),
        ),
        (
            "nested claim that is an object does not match",
            "request.auth.claims[org][team]",
            "values: [\"*\"]",
            jwt(),
            not_allowed(),
        ),
        (
            "boolean claim",
            "request.auth.claims[admin]",
            "values: [\"true\"]",
            jwt(),
            allow(),
        ),
        (
            "claims without a token",
            "request.auth.claims[groups]",
            "values: [ops]",
            req(),
            not_allowed(),
        ),
        (
            "audiences",
            "request.auth.audiences",
            "values: [api]",
            jwt(),
            allow(),
        ),
        (
            "presenter",
            "request.auth.presenter",
            "values: [frontend]",
            jwt(),
            allow(),
        ),
        (
            "request principal",
            "request.auth.principal",
            "values: [https://idp.example/alice]",
            jwt(),
            allow(),
        ),
        (
            "source.ip",
            "source.ip",
            "values: [10.1.0.0/16]",
            req(),
            allow(),
        ),
        (
            "remote.ip is the original client",
            "remote.ip",
            "values: [192.0.2.7]",
            req().remote("192.0.2.7"),
            allow(),
        ),
        (
            "source.namespace",
            "source.namespace",
            "values: [client]",
            req(),
            allow(),
        ),
        (
            "source.principal",
            "source.principal",
            "values: [\"cluster.local/ns/client/*\"]",
            req(),
            allow(),
        ),
        (
            "source.serviceAccount",
            "source.serviceAccount",
            "values: [client/client]",
            req(),
            allow(),
        ),
        (
            "destination.port",
            "destination.port",
            "values: [\"9090\"]",
            req(),
            not_allowed(),
        ),
        (
            "connection.sni has no value over HBONE",
            "connection.sni",
            "values: [\"*\"]",
            req(),
            not_allowed(),
        ),
        (
            "an Envoy filter attribute never matches in ALLOW",
            "experimental.envoy.filters.network.mysql_proxy[db.table]",
            "values: [\"*\"]",
            req(),
            not_allowed(),
        ),
    ];
    for (case, key, values, r, want) in cases {
        check(case, &[when(key, values)], r, want);
    }
    check(
        "an Envoy filter attribute makes a DENY match (fail closed)",
        &[wp(
            "deny",
            "action: DENY, rules: [{when: [{key: \"experimental.envoy.filters.network.mysql_proxy[db.table]\", values: [x]}]}]",
        )],
        req(),
        denied_by("shop/deny"),
    );
    check(
        "when conditions are AND'ed",
        &[allow_rule(
            "{when: [{key: \"request.headers[x-user]\", values: [alice]}, {key: source.namespace, values: [other]}]}",
        )],
        req().header("x-user", "alice"),
        not_allowed(),
    );
}

#[test]
fn istio_task_deny_all_then_allow_by_principal_and_method() {
    // The shape of Istio's L7 authorization task: deny everything on the waypoint, then let
    // one service account GET, and nobody else do anything.
    let policies = [
        wp("deny-all", ""),
        wp(
            "allow-frontend-get",
            "rules: [{from: [{source: {principals: [cluster.local/ns/frontend/sa/web]}}], to: [{operation: {methods: [GET]}}]}]",
        ),
    ];
    check(
        "frontend may GET",
        &policies,
        req().from("frontend", "web"),
        allow(),
    );
    check(
        "frontend may not DELETE",
        &policies,
        req().from("frontend", "web").method("DELETE"),
        not_allowed(),
    );
    check("others may not GET", &policies, req(), not_allowed());
}

#[test]
fn helpers() {
    assert_eq!(crate::route::host_without_port("web:8080"), "web");
    assert_eq!(crate::route::host_without_port("[fd00::1]:80"), "[fd00::1]");
    assert_eq!(crate::route::host_without_port("fd00::1"), "fd00::1");
    assert_eq!(crate::route::host_without_port("web"), "web");
    assert_eq!(
        bracketed("request.headers[x]", "request.headers"),
        Some("x")
    );
    assert_eq!(bracketed("request.headers[]", "request.headers"), None);
    assert_eq!(bracketed("request.headersx", "request.headers"), None);
}
