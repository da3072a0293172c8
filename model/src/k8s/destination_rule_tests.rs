//! DestinationRule translation: what a valid rule becomes, the named error of each invalid
//! one, and which rule applies to a Service.

use std::time::Duration;

use http::HeaderName;

use super::*;
use crate::model::{ClientTls, HashKey, LoadBalancer, TlsMode};

/// Loads a DestinationRule `spec` (YAML indented by two) as `shop/r`; `Ok` the rule, `Err`
/// the message.
fn load(spec: &str) -> Result<DestinationRule, String> {
    let doc = format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: {{name: r, namespace: shop}}\nspec:\n{spec}"
    );
    load_docs(&[("dr.yaml".to_string(), doc)])
        .map(|m| m.destination_rules[0].clone())
        .map_err(|e| e.to_string())
}

fn check(spec: &str, expected: Result<fn(&DestinationRule), &str>) {
    match (load(spec), expected) {
        (Ok(dr), Ok(assert)) => assert(&dr),
        (Err(got), Err(want)) => assert!(got.contains(want), "{got:?} lacks {want:?}\n{spec}"),
        (got, _) => panic!("unexpected {got:?} for\n{spec}"),
    }
}

#[test]
fn a_full_rule_becomes_typed_model_data() {
    check(
        r#"
  host: web
  trafficPolicy:
    loadBalancer:
      consistentHash: {httpCookie: {name: session, path: /, ttl: 60s}}
    connectionPool:
      tcp: {maxConnections: 10, connectTimeout: 500ms}
      http: {http1MaxPendingRequests: 5, http2MaxRequests: 100, maxRequestsPerConnection: 3, maxRetries: 2, idleTimeout: 30s}
    outlierDetection: {consecutive5xxErrors: 3, consecutiveGatewayErrors: 2, interval: 1s, baseEjectionTime: 2m, maxEjectionPercent: 50, minHealthPercent: 20}
    portLevelSettings:
    - port: {number: 9090}
      loadBalancer: {simple: LEAST_REQUEST}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy: {loadBalancer: {simple: RANDOM}}
"#,
        Ok(|dr| {
            assert_eq!(dr.host, "web.shop.svc.cluster.local");
            let p = &dr.traffic_policy;
            assert_eq!(
                p.load_balancer,
                Some(LoadBalancer::ConsistentHash(HashKey::Cookie {
                    name: "session".into(),
                    path: Some("/".into()),
                    ttl: Some(Duration::from_secs(60)),
                }))
            );
            let cp = p.connection_pool.as_ref().expect("pool");
            assert_eq!(cp.max_connections, Some(10));
            assert_eq!(cp.connect_timeout, Some(Duration::from_millis(500)));
            assert_eq!(cp.http1_max_pending_requests, Some(5));
            assert_eq!(cp.http2_max_requests, Some(100));
            assert_eq!(cp.max_requests_per_connection, Some(3));
            assert_eq!(cp.max_retries, Some(2));
            assert_eq!(cp.idle_timeout, Some(Duration::from_secs(30)));
            let od = p.outlier_detection.as_ref().expect("outlier").resolve();
            assert_eq!(
                (od.consecutive_5xx, od.consecutive_gateway),
                (3, 2),
                "{od:?}"
            );
            assert_eq!(od.interval, Duration::from_secs(1));
            assert_eq!(od.base_ejection_time, Duration::from_secs(120));
            assert_eq!((od.max_ejection_percent, od.min_health_percent), (50, 20));
            assert_eq!(p.port_level[0].port, 9090);
            assert_eq!(
                p.port_level[0].load_balancer,
                Some(LoadBalancer::LeastRequest)
            );
            assert_eq!(dr.subsets.len(), 2);
            assert_eq!(
                dr.subsets[1].labels.get("version").map(String::as_str),
                Some("v2")
            );
            let v2 = dr.policy_for(80, Some("v2")).expect("v2");
            assert_eq!(v2.load_balancer, LoadBalancer::Random);
            assert_eq!(v2.connection_pool.http2_max_requests, Some(100));
        }),
    );
}

#[test]
fn each_hash_key_and_simple_balancer() {
    let lb = |spec: &str| -> Result<Option<LoadBalancer>, String> {
        load(&format!(
            "  host: web.shop.svc.cluster.local\n  trafficPolicy: {{loadBalancer: {spec}}}\n"
        ))
        .map(|d| d.traffic_policy.load_balancer)
    };
    let hash = |k| Ok(Some(LoadBalancer::ConsistentHash(k)));
    assert_eq!(
        lb("{simple: ROUND_ROBIN}"),
        Ok(Some(LoadBalancer::RoundRobin))
    );
    assert_eq!(lb("{simple: RANDOM}"), Ok(Some(LoadBalancer::Random)));
    assert_eq!(
        lb("{simple: LEAST_REQUEST}"),
        Ok(Some(LoadBalancer::LeastRequest))
    );
    assert_eq!(
        lb("{consistentHash: {httpHeaderName: X-User}}"),
        hash(HashKey::Header(HeaderName::from_static("x-user")))
    );
    assert_eq!(
        lb("{consistentHash: {useSourceIp: true}}"),
        hash(HashKey::SourceIp)
    );
    assert_eq!(
        lb("{consistentHash: {httpQueryParameterName: user, ringHash: {minimumRingSize: 1024}}}"),
        hash(HashKey::QueryParameter("user".into()))
    );
}

#[test]
fn hosts_are_qualified_with_the_rule_namespace() {
    for (host, want) in [
        ("web", "web.shop.svc.cluster.local"),
        ("web.other.svc.cluster.local", "web.other.svc.cluster.local"),
        ("Web.Other.svc.cluster.local", "web.other.svc.cluster.local"),
        ("*.shop.svc.cluster.local", "*.shop.svc.cluster.local"),
    ] {
        let dr = load(&format!("  host: \"{host}\"\n")).expect(host);
        assert_eq!(dr.host, want);
    }
}

#[test]
fn invalid_rules_are_refused_with_the_field() {
    for (spec, want) in [
        ("  subsets: []\n", "spec.host: required"),
        ("  host: \"web/x\"\n", "spec.host: invalid host"),
        ("  host: web\n  hosts: [a]\n", "spec.hosts: unknown field"),
        (
            "  host: web\n  exportTo: [\".\"]\n",
            "spec.exportTo: not supported",
        ),
        (
            "  host: web\n  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}\n",
            "spec.trafficPolicy.loadBalancer.simple: PASSTHROUGH is not supported",
        ),
        (
            "  host: web\n  trafficPolicy: {loadBalancer: {simple: FASTEST}}\n",
            "unknown load balancer \"FASTEST\"",
        ),
        (
            "  host: web\n  trafficPolicy: {loadBalancer: {simple: RANDOM, consistentHash: {useSourceIp: true}}}\n",
            "spec.trafficPolicy.loadBalancer.consistentHash: set either simple or consistentHash",
        ),
        (
            "  host: web\n  trafficPolicy: {loadBalancer: {consistentHash: {}}}\n",
            "consistentHash needs one of",
        ),
        (
            "  host: web\n  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: a, useSourceIp: true}}}\n",
            "spec.trafficPolicy.loadBalancer.consistentHash.useSourceIp: consistentHash takes exactly one",
        ),
        (
            "  host: web\n  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: \"bad header\"}}}\n",
            "invalid header name",
        ),
        (
            "  host: web\n  trafficPolicy: {loadBalancer: {consistentHash: {httpCookie: {name: \"a;b\"}}}}\n",
            "httpCookie.name: invalid cookie name",
        ),
        (
            "  host: web\n  trafficPolicy: {loadBalancer: {localityLbSetting: {enabled: true}}}\n",
            "loadBalancer.localityLbSetting: not supported",
        ),
        (
            "  host: web\n  trafficPolicy: {connectionPool: {tcp: {maxConnections: 0}}}\n",
            "connectionPool.tcp.maxConnections: must be at least 1",
        ),
        (
            "  host: web\n  trafficPolicy: {connectionPool: {http: {http2MaxRequests: -1}}}\n",
            "http.http2MaxRequests: -1 is out of range",
        ),
        (
            "  host: web\n  trafficPolicy: {connectionPool: {http: {h2UpgradePolicy: UPGRADE}}}\n",
            "http.h2UpgradePolicy: unknown field",
        ),
        (
            "  host: web\n  trafficPolicy: {connectionPool: {tcp: {connectTimeout: 5 seconds}}}\n",
            "tcp.connectTimeout: invalid duration",
        ),
        (
            "  host: web\n  trafficPolicy: {outlierDetection: {maxEjectionPercent: 101}}\n",
            "maxEjectionPercent: 101 is not a percentage",
        ),
        (
            "  host: web\n  trafficPolicy: {outlierDetection: {interval: 0s}}\n",
            "outlierDetection.interval: must be at least 1ms",
        ),
        (
            "  host: web\n  trafficPolicy: {outlierDetection: {consecutiveErrors: 1}}\n",
            "outlierDetection.consecutiveErrors: unknown field",
        ),
        (
            "  host: web\n  trafficPolicy: {portLevelSettings: [{port: {number: 80}}, {port: {number: 80}}]}\n",
            "portLevelSettings[1].port: port 80 listed twice",
        ),
        (
            "  host: web\n  trafficPolicy: {portLevelSettings: [{port: {number: 80}, portLevelSettings: []}]}\n",
            "portLevelSettings[0].portLevelSettings: unknown field",
        ),
        (
            "  host: web\n  subsets: [{name: v1}, {name: v1}]\n",
            "spec.subsets[1].name: duplicate subset name",
        ),
        (
            "  host: web\n  subsets: [{name: V_1}]\n",
            "spec.subsets[0].name: invalid subset name",
        ),
        (
            "  host: web\n  subsets: [{name: v1, selector: {a: b}}]\n",
            "spec.subsets[0].selector: unknown field",
        ),
    ] {
        check(spec, Err(want));
    }
    // The error names file, document and object.
    let e = load("  host: web\n  trafficPolicy: {loadBalancer: {simple: PASSTHROUGH}}\n")
        .expect_err("refused");
    assert!(
        e.starts_with("dr.yaml doc 1: DestinationRule shop/r: "),
        "{e}"
    );
}

#[test]
fn every_api_version_is_read() {
    for version in ["v1", "v1beta1", "v1alpha3"] {
        let doc = format!(
            "apiVersion: networking.istio.io/{version}\nkind: DestinationRule\n\
             metadata: {{name: r}}\nspec: {{host: web}}\n"
        );
        let m = load_docs(&[("dr.yaml".to_string(), doc)]).expect(version);
        assert_eq!(m.destination_rules[0].host, "web.default.svc.cluster.local");
    }
    let doc = "apiVersion: networking.istio.io/v2\nkind: DestinationRule\n\
               metadata: {name: r}\nspec: {host: web}\n";
    let e = load_docs(&[("dr.yaml".to_string(), doc.to_string())]).expect_err("v2");
    assert!(e.to_string().contains("unsupported version"), "{e}");
}

const LOOKUP: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.1, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.2, selector: {app: api}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: data}
spec: {clusterIP: 10.96.0.3, selector: {app: db}, ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: b-newer, namespace: shop, creationTimestamp: "2024-02-01T00:00:00Z"}
spec: {host: web, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: z-older, namespace: shop, creationTimestamp: "2024-01-01T00:00:00Z"}
spec: {host: web, trafficPolicy: {loadBalancer: {simple: LEAST_REQUEST}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: from-client, namespace: client}
spec: {host: web.shop.svc.cluster.local}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: all-shop, namespace: istio-system}
spec: {host: "*.shop.svc.cluster.local"}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: db-wild, namespace: data}
spec: {host: "*.data.svc.cluster.local"}
"#;

#[test]
fn the_rule_for_a_service_follows_istios_lookup_order() {
    let m = load_docs(&[("m.yaml".to_string(), LOOKUP.to_string())]).expect("valid");
    let svc = |ns: &str, name: &str| m.services[&NamespacedName::new(ns, name)].clone();
    let rule = |client: &str, s: &Service| {
        m.destination_rule_for(client, s)
            .map(|d| format!("{}/{}", d.namespace, d.name))
    };
    let (web, api, db) = (svc("shop", "web"), svc("shop", "api"), svc("data", "db"));
    for (client, s, want) in [
        // The client's (waypoint's) namespace first.
        ("client", &web, Some("client/from-client")),
        // Then the Service's namespace: the oldest of two for the same host.
        ("shop", &web, Some("shop/z-older")),
        ("elsewhere", &web, Some("shop/z-older")),
        // Then the root namespace.
        ("elsewhere", &api, Some("istio-system/all-shop")),
        ("elsewhere", &db, Some("data/db-wild")),
    ] {
        assert_eq!(rule(client, s).as_deref(), want, "{client} {}", s.name);
    }
    let p = crate::model::effective_policy(&m, "shop", &web, 80, None).expect("policy");
    assert_eq!(p.load_balancer, LoadBalancer::LeastRequest);
    assert!(crate::model::effective_policy(&m, "shop", &web, 80, Some("v9")).is_err());
}

/// The merged `tls` of (`port`, `subset`) of the rule `spec`.
fn tls_at(spec: &str, port: u16, subset: Option<&str>) -> Option<ClientTls> {
    let dr = load(spec).unwrap_or_else(|e| panic!("{e}\n{spec}"));
    dr.policy_for(port, subset).expect("policy").tls
}

#[test]
fn each_tls_mode_and_its_fields() {
    let tls = |spec: &str| -> Result<Option<ClientTls>, String> {
        load(&format!("  host: web\n  trafficPolicy: {{tls: {spec}}}\n"))
            .map(|d| d.traffic_policy.tls)
    };
    let mode = |m| {
        Ok(Some(ClientTls {
            mode: m,
            ..ClientTls::default()
        }))
    };
    assert_eq!(tls("{mode: ISTIO_MUTUAL}"), mode(TlsMode::IstioMutual));
    assert_eq!(tls("{mode: DISABLE}"), mode(TlsMode::Disable));
    assert_eq!(
        tls("{}"),
        mode(TlsMode::Disable),
        "mode defaults to DISABLE"
    );
    assert_eq!(tls("{mode: SIMPLE}"), mode(TlsMode::Simple));
    assert_eq!(
        tls("{mode: SIMPLE, sni: API.example.com, subjectAltNames: [api.example.com, \"spiffe://td/ns/a/sa/b\"], caCertificates: /etc/certs/ca.pem, insecureSkipVerify: false}"),
        Ok(Some(ClientTls {
            mode: TlsMode::Simple,
            sni: Some("api.example.com".into()),
            subject_alt_names: vec!["api.example.com".into(), "spiffe://td/ns/a/sa/b".into()],
            ca_certificates: Some("/etc/certs/ca.pem".into()),
            ..ClientTls::default()
        }))
    );
    assert_eq!(
        tls("{mode: MUTUAL, clientCertificate: /c/cert.pem, privateKey: /c/key.pem, insecureSkipVerify: true}"),
        Ok(Some(ClientTls {
            mode: TlsMode::Mutual,
            client_certificate: Some("/c/cert.pem".into()),
            private_key: Some("/c/key.pem".into()),
            insecure_skip_verify: true,
            ..ClientTls::default()
        }))
    );
    for (m, originates) in [
        (TlsMode::Disable, false),
        (TlsMode::IstioMutual, false),
        (TlsMode::Simple, true),
        (TlsMode::Mutual, true),
    ] {
        let t = ClientTls {
            mode: m,
            ..ClientTls::default()
        };
        assert_eq!(t.originates(), originates, "{m:?}");
    }
}

#[test]
fn an_istio_mutual_rule_keeps_its_subsets() {
    // What Istio users write for ambient: the rule (and its subsets) applies, the mode
    // changes nothing.
    let spec = r#"
  host: web
  trafficPolicy:
    tls: {mode: ISTIO_MUTUAL}
  subsets:
  - name: v1
    labels: {version: v1}
"#;
    let dr = load(spec).expect("accepted");
    assert_eq!(
        dr.subsets[0].labels.get("version").map(String::as_str),
        Some("v1")
    );
    let p = dr.policy_for(80, Some("v1")).expect("v1");
    assert_eq!(p.tls.map(|t| t.mode), Some(TlsMode::IstioMutual));
    assert!(dr
        .policy_for(80, Some("v1"))
        .expect("v1")
        .origination()
        .is_none());
}

#[test]
fn tls_merges_like_the_other_parts() {
    let spec = r#"
  host: web
  trafficPolicy:
    tls: {mode: SIMPLE, sni: top.example}
    portLevelSettings:
    - port: {number: 9443}
      tls: {mode: SIMPLE, sni: port.example}
    - port: {number: 9000}
      loadBalancer: {simple: RANDOM}
  subsets:
  - name: plain
    labels: {version: v1}
    trafficPolicy:
      tls: {mode: DISABLE}
  - name: keeps
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {simple: RANDOM}
  - name: ported
    labels: {version: v3}
    trafficPolicy:
      portLevelSettings:
      - port: {number: 8443}
        tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem, sni: sub.example}
"#;
    let sni =
        |port, subset| tls_at(spec, port, subset).map(|t| (t.mode, t.sni.unwrap_or_default()));
    use TlsMode::*;
    for (port, subset, want) in [
        (80, None, Some((Simple, "top.example"))),
        (9443, None, Some((Simple, "port.example"))),
        // A port-level entry replaces every part: no tls on 9000.
        (9000, None, None),
        (80, Some("plain"), Some((Disable, ""))),
        // A subset that does not set tls keeps the rule's.
        (80, Some("keeps"), Some((Simple, "top.example"))),
        (9443, Some("keeps"), Some((Simple, "port.example"))),
        (80, Some("ported"), Some((Simple, "top.example"))),
        (8443, Some("ported"), Some((Mutual, "sub.example"))),
    ] {
        let got = sni(port, subset);
        assert_eq!(
            got,
            want.map(|(m, s)| (m, s.to_string())),
            "{port} {subset:?}"
        );
    }
}

#[test]
fn bad_tls_is_refused_with_the_field() {
    for (tls, want) in [
        ("{mode: STRICT}", "spec.trafficPolicy.tls.mode: unknown tls mode \"STRICT\""),
        ("{mode: simple}", "unknown tls mode \"simple\""),
        ("{mode: SIMPLE, credentialName: my-secret}", "spec.trafficPolicy.tls.credentialName: not supported: this data plane reads no Kubernetes Secret"),
        ("{mode: SIMPLE, caCrl: /crl.pem}", "spec.trafficPolicy.tls.caCrl: not supported"),
        ("{mode: MUTUAL}", "spec.trafficPolicy.tls: mode MUTUAL needs clientCertificate and privateKey"),
        ("{mode: MUTUAL, clientCertificate: /c.pem}", "needs clientCertificate and privateKey"),
        ("{mode: SIMPLE, caCertificates: ca.pem}", "spec.trafficPolicy.tls.caCertificates: \"ca.pem\" is not an absolute path"),
        ("{mode: ISTIO_MUTUAL, caCertificates: /ca.pem}", "tls.caCertificates: applies only to mode SIMPLE and MUTUAL"),
        ("{mode: DISABLE, clientCertificate: /c.pem}", "tls.clientCertificate: applies only to mode MUTUAL"),
        ("{mode: SIMPLE, privateKey: /k.pem}", "tls.privateKey: applies only to mode MUTUAL"),
        ("{mode: SIMPLE, sni: \"a b\"}", "tls.sni: sni \"a b\" is not a DNS name"),
        ("{mode: SIMPLE, subjectAltNames: [\"\"]}", "tls.subjectAltNames[0]: invalid tls name"),
        ("{mode: SIMPLE, subjectAltNames: a.example}", "tls.subjectAltNames: expected a sequence"),
        ("{mode: SIMPLE, insecureSkipVerify: maybe}", "tls.insecureSkipVerify"),
        ("{mode: SIMPLE, verify: true}", "tls.verify: unknown field"),
    ] {
        check(
            &format!("  host: web\n  trafficPolicy: {{tls: {tls}}}\n"),
            Err(want),
        );
    }
    // The same checks at every level, named by where the field is.
    for (spec, want) in [
        (
            "  host: web\n  trafficPolicy: {portLevelSettings: [{port: {number: 443}, tls: {mode: NOPE}}]}\n",
            "spec.trafficPolicy.portLevelSettings[0].tls.mode: unknown tls mode",
        ),
        (
            "  host: web\n  subsets: [{name: v1, trafficPolicy: {tls: {mode: MUTUAL}}}]\n",
            "spec.subsets[0].trafficPolicy.tls: mode MUTUAL needs",
        ),
        (
            "  host: web\n  subsets: [{name: v1, trafficPolicy: {portLevelSettings: [{port: {number: 443}, tls: {credentialName: s}}]}}]\n",
            "spec.subsets[0].trafficPolicy.portLevelSettings[0].tls.credentialName: not supported",
        ),
    ] {
        check(spec, Err(want));
    }
}
