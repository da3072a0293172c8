//! YAML → model translation, as a table: each case is a set of files and either a check on
//! the model or the error message it must produce.

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::*;
use crate::model::{
    Action, Condition, ContainerPort, Operation, PeerAuthnMode, Rule, ServicePort, Source,
    TargetPort,
};

enum Expect {
    /// Loads; the function asserts on the model.
    Model(fn(&Model)),
    /// Fails with a message containing this.
    Error(&'static str),
}

fn check(case: &str, files: &[(&str, &str)], expect: Expect) {
    let files: Vec<(String, String)> = files
        .iter()
        .map(|(name, text)| (name.to_string(), text.to_string()))
        .collect();
    match (load_docs(&files), expect) {
        (Ok(model), Expect::Model(assert)) => assert(&model),
        (Err(e), Expect::Error(want)) => {
            let got = e.to_string();
            assert!(
                got.contains(want),
                "{case}: error {got:?} does not contain {want:?}"
            );
        }
        (Ok(model), Expect::Error(want)) => {
            panic!("{case}: loaded, expected an error containing {want:?}: {model:#?}")
        }
        (Err(e), Expect::Model(_)) => panic!("{case}: {e}"),
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn pod<'m>(m: &'m Model, ns: &str, name: &str) -> &'m Pod {
    m.pod(ns, name)
        .unwrap_or_else(|| panic!("no pod {ns}/{name}"))
}

fn svc<'m>(m: &'m Model, ns: &str, name: &str) -> &'m Service {
    m.services
        .get(&NamespacedName::new(ns, name))
        .unwrap_or_else(|| panic!("no service {ns}/{name}"))
}

#[test]
fn core_kinds() {
    check(
        "namespace with labels",
        &[("ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: prod\n  labels:\n    istio.io/dataplane-mode: ambient\n")],
        Expect::Model(|m| {
            let ns = &m.namespaces["prod"];
            assert_eq!(ns.labels, labels(&[("istio.io/dataplane-mode", "ambient")]));
        }),
    );
    check(
        "service account, namespace defaults to default",
        &[(
            "sa.yaml",
            "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web}\n",
        )],
        Expect::Model(|m| {
            assert!(m
                .service_accounts
                .contains(&NamespacedName::new("default", "web")));
        }),
    );
    check(
        "pod with every field",
        &[(
            "pods.yaml",
            r#"
apiVersion: v1
kind: Pod
metadata:
  name: web-1
  namespace: shop
  uid: 0f0e-11
  labels: {app: web, version: v1}
  annotations: {note: "hello"}
spec:
  serviceAccountName: web-sa
  nodeName: node-a
  containers:
  - name: app
    ports:
    - {name: http, containerPort: 8080}
    - {containerPort: 9090, protocol: TCP}
    - {name: dns, containerPort: 53, protocol: UDP}
status:
  podIP: 10.1.0.5
  conditions:
  - {type: PodScheduled, status: "True"}
  - {type: Ready, status: "False"}
"#,
        )],
        Expect::Model(|m| {
            let p = pod(m, "shop", "web-1");
            assert_eq!(p.uid.as_deref(), Some("0f0e-11"));
            assert_eq!(p.service_account, "web-sa");
            assert_eq!(p.node_name.as_deref(), Some("node-a"));
            assert_eq!(p.ips, vec![ip("10.1.0.5")]);
            assert_eq!(p.labels, labels(&[("app", "web"), ("version", "v1")]));
            assert_eq!(p.annotations, labels(&[("note", "hello")]));
            assert!(!p.host_network);
            assert!(!p.ready);
            // The UDP port is not carried by the mesh.
            assert_eq!(
                p.container_ports,
                vec![
                    ContainerPort {
                        name: Some("http".into()),
                        port: 8080
                    },
                    ContainerPort {
                        name: None,
                        port: 9090
                    },
                ]
            );
        }),
    );
    check(
        "pod defaults: default service account, ready, no IP yet",
        &[("p.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: pending}\nspec: {containers: [{name: c}]}\n")],
        Expect::Model(|m| {
            let p = pod(m, "default", "pending");
            assert_eq!(p.service_account, "default");
            assert!(p.ready);
            assert!(p.ips.is_empty());
            assert_eq!(p.node_name, None);
        }),
    );
    check(
        "dual-stack pod, host network, finished pod is not ready",
        &[(
            "p.yaml",
            r#"
apiVersion: v1
kind: Pod
metadata: {name: dual}
spec: {hostNetwork: true}
status:
  phase: Succeeded
  podIP: 10.0.0.7
  podIPs: [{ip: 10.0.0.7}, {ip: "fd00::7"}]
"#,
        )],
        Expect::Model(|m| {
            let p = pod(m, "default", "dual");
            assert_eq!(p.ips, vec![ip("10.0.0.7"), ip("fd00::7")]);
            assert!(p.host_network);
            assert!(!p.ready);
        }),
    );
    check(
        "service with named and numbered target ports",
        &[(
            "svc.yaml",
            r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop, labels: {istio.io/use-waypoint: wp}}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports:
  - {name: http, port: 80, targetPort: http, appProtocol: http}
  - {name: admin, port: 9000, targetPort: 9090}
  - {name: plain, port: 7000}
  - {name: dns, port: 53, protocol: UDP}
"#,
        )],
        Expect::Model(|m| {
            let s = svc(m, "shop", "web");
            assert_eq!(s.cluster_ips, vec![ip("10.96.0.10")]);
            assert_eq!(s.selector, Some(labels(&[("app", "web")])));
            assert_eq!(s.labels, labels(&[("istio.io/use-waypoint", "wp")]));
            assert_eq!(s.hostname(), "web.shop.svc.cluster.local");
            assert_eq!(
                s.ports,
                vec![
                    ServicePort {
                        name: Some("http".into()),
                        app_protocol: Some("http".into()),
                        port: 80,
                        target_port: TargetPort::Named("http".into()),
                    },
                    ServicePort {
                        name: Some("admin".into()),
                        app_protocol: None,
                        port: 9000,
                        target_port: TargetPort::Number(9090),
                    },
                    ServicePort {
                        name: Some("plain".into()),
                        app_protocol: None,
                        port: 7000,
                        target_port: TargetPort::Number(7000),
                    },
                ]
            );
            assert!(m.service_by_vip(ip("10.96.0.10"), 9000).is_some());
        }),
    );
    check(
        "headless service and a service without selector",
        &[(
            "svc.yaml",
            r#"
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Service
metadata: {name: external}
spec: {clusterIPs: [10.96.0.20, "fd00::20"], selector: {}, ports: [{port: 443}]}
"#,
        )],
        Expect::Model(|m| {
            assert!(svc(m, "default", "db").cluster_ips.is_empty());
            let ext = svc(m, "default", "external");
            assert_eq!(ext.cluster_ips, vec![ip("10.96.0.20"), ip("fd00::20")]);
            assert_eq!(ext.selector, None, "an empty selector is no selector");
        }),
    );
}

/// A LoadBalancer Service's `status.loadBalancer.ingress` is kept (IP, else hostname; each
/// once; at most 16), for an ingress Gateway's `status.addresses`; a value the API server
/// would refuse is refused by field.
#[test]
fn a_services_load_balancer_ingress_is_read() {
    use crate::model::HostAddress;
    let many: String = (1..=20)
        .map(|i| format!("{{ip: 203.0.113.{i}}}, "))
        .collect();
    let many = format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: many}}\n\
         spec: {{type: LoadBalancer, clusterIP: 10.96.0.31}}\n\
         status: {{loadBalancer: {{ingress: [{many}]}}}}\n"
    );
    let docs = format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: web-istio, namespace: shop}}
spec: {{type: LoadBalancer, clusterIP: 10.96.0.30, ports: [{{port: 80}}]}}
status:
  loadBalancer:
    ingress:
    - {{ip: 203.0.113.7, hostname: ignored.example.com, ipMode: VIP}}
    - {{hostname: lb-1.elb.example.com}}
    - {{ip: "2001:db8::7"}}
    - {{ip: 203.0.113.7}}
    - {{ip: "", ports: [{{port: 80, protocol: TCP}}]}}
---
apiVersion: v1
kind: Service
metadata: {{name: pending, namespace: shop}}
spec: {{type: LoadBalancer, clusterIP: 10.96.0.32}}
status: {{loadBalancer: {{}}}}
---
{many}"#
    );
    let files = [("svc.yaml".to_string(), docs)];
    let m = load_docs(&files).expect("valid");
    assert_eq!(
        svc(&m, "shop", "web-istio").load_balancer_ingress,
        vec![
            HostAddress::Ip(ip("203.0.113.7")),
            HostAddress::Hostname("lb-1.elb.example.com".into()),
            HostAddress::Ip(ip("2001:db8::7")),
        ],
        "the IP wins over the hostname; each once; an entry with neither is skipped"
    );
    assert!(svc(&m, "shop", "pending").load_balancer_ingress.is_empty());
    let many = &svc(&m, "default", "many").load_balancer_ingress;
    assert_eq!(many.len(), 16);
    assert_eq!(many.last(), Some(&HostAddress::Ip(ip("203.0.113.16"))));
    for (case, status, want) in [
        (
            "not an IP",
            "{loadBalancer: {ingress: [{ip: 203.0.113.300}]}}",
            r#"Service default/s: status.loadBalancer.ingress[0].ip: invalid IP address "203.0.113.300""#,
        ),
        (
            "not a host name",
            "{loadBalancer: {ingress: [{ip: 203.0.113.1}, {hostname: \"Not A Name\"}]}}",
            r#"status.loadBalancer.ingress[1].hostname: invalid hostname "Not A Name""#,
        ),
        (
            "an IP as the host name",
            "{loadBalancer: {ingress: [{hostname: 203.0.113.1}]}}",
            "status.loadBalancer.ingress[0].hostname: invalid hostname",
        ),
        (
            "ingress not a list",
            "{loadBalancer: {ingress: 203.0.113.1}}",
            "status.loadBalancer.ingress",
        ),
        (
            "an IP that is not a string",
            "{loadBalancer: {ingress: [{ip: 1}]}}",
            "status.loadBalancer.ingress[0].ip: expected a string",
        ),
    ] {
        let doc =
            format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\nstatus: {status}\n");
        let files = [("svc.yaml".to_string(), doc)];
        match load_docs(&files) {
            Ok(_) => panic!("{case}: loaded"),
            Err(e) => assert!(e.to_string().contains(want), "{case}: {e}"),
        }
    }
}

#[test]
fn documents_and_files() {
    check(
        "kind: List, empty documents, comments",
        &[(
            "all.yaml",
            r#"
# nothing here
---
---
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: a}
- apiVersion: v1
  kind: Pod
  metadata: {name: p, namespace: a}
"#,
        )],
        Expect::Model(|m| {
            assert!(m.namespaces.contains_key("a"));
            assert!(m.pod("a", "p").is_some());
        }),
    );
    check(
        "unknown kinds are skipped",
        &[(
            "mixed.yaml",
            r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec: {replicas: "not even valid"}
---
apiVersion: gateway.networking.k8s.io/v1alpha2
kind: TLSRoute
metadata: {name: route}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: cm}
---
apiVersion: v1
kind: Namespace
metadata: {name: kept}
"#,
        )],
        Expect::Model(|m| {
            assert_eq!(m.namespaces.keys().collect::<Vec<_>>(), vec!["kept"]);
        }),
    );
    check(
        "several files",
        &[
            (
                "b.yml",
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n",
            ),
            (
                "a.yaml",
                "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n",
            ),
        ],
        Expect::Model(|m| assert_eq!(m.namespaces.len(), 2)),
    );
    check(
        "the same object twice",
        &[
            ("b.yaml", "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\n"),
            ("a.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: default}\n"),
        ],
        Expect::Error("b.yaml doc 1: Pod default/web: already defined in a.yaml doc 2"),
    );
    check(
        "bad yaml syntax names file and document",
        &[(
            "a.yaml",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [unclosed\n",
        )],
        Expect::Error("a.yaml doc 2: parse yaml: "),
    );
    check(
        "alias bomb",
        &[(
            "bomb.yaml",
            "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\nc: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\ne: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\ng: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f]\nh: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n",
        )],
        Expect::Error("bomb.yaml doc 1: parse yaml: repetition limit exceeded"),
    );
    check(
        "deep nesting",
        &[(
            "deep.yaml",
            &format!("{}{}", "[".repeat(10_000), "]".repeat(10_000)),
        )],
        Expect::Error("deep.yaml doc 1: parse yaml: recursion limit exceeded"),
    );
    check(
        "a leading --- does not start an extra document",
        &[(
            "d.yaml",
            "---\napiVersion: v1\nkind: Pod\nmetadata: {name: x}\nstatus: {podIP: bad}\n",
        )],
        Expect::Error("d.yaml doc 1: Pod default/x: status.podIP"),
    );
    check(
        "a document that is not a mapping",
        &[("s.yaml", "just a string\n")],
        Expect::Error("s.yaml doc 1: object: expected a mapping, found a string"),
    );
    check(
        "no kind",
        &[("k.yaml", "apiVersion: v1\nmetadata: {name: x}\n")],
        Expect::Error("k.yaml doc 1: object: kind: required"),
    );
    check(
        "nested List",
        &[(
            "l.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: List, items: []}\n",
        )],
        Expect::Error("l.yaml doc 1: object: items[0]: nested List is not supported"),
    );
    check(
        "error inside a List item names the item",
        &[(
            "l.yaml",
            "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Pod, metadata: {name: ok}}\n- {apiVersion: v1, kind: Pod, metadata: {name: bad}, status: {podIP: nope}}\n",
        )],
        Expect::Error("l.yaml doc 1: Pod default/bad: items[1].status.podIP: invalid IP address \"nope\""),
    );
    check(
        "unsupported version of a known kind",
        &[("p.yaml", "apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: x}\n")],
        Expect::Error("p.yaml doc 1: AuthorizationPolicy: apiVersion: unsupported version \"v1alpha1\""),
    );
    let huge = format!("# {}\n", "x".repeat(MAX_FILE_BYTES as usize));
    let files = vec![("huge.yaml".to_string(), huge)];
    let err = load_docs(&files).unwrap_err().to_string();
    assert!(err.contains("read huge.yaml: larger than"), "{err}");
}

#[test]
fn invalid_core_objects() {
    let cases: &[(&str, &str, &str)] = &[
        (
            "invalid pod IP",
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: web}\nstatus: {podIP: 10.0.0.x}\n",
            r#"pods.yaml doc 3: Pod default/web: status.podIP: invalid IP address "10.0.0.x""#,
        ),
        (
            "missing metadata.name",
            "apiVersion: v1\nkind: Pod\nmetadata: {namespace: a}\n",
            "pods.yaml doc 1: Pod: metadata.name: required",
        ),
        (
            "invalid name",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: Web_1}\n",
            r#"pods.yaml doc 1: Pod default/Web_1: metadata.name: invalid name "Web_1""#,
        ),
        (
            "invalid namespace",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: a.b}\n",
            r#"Pod a.b/web: metadata.namespace: invalid namespace "a.b""#,
        ),
        (
            "container port out of range",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {containers: [{name: c, ports: [{containerPort: 70000}]}]}\n",
            "Pod default/web: spec.containers[0].ports[0].containerPort: port 70000 out of range 1-65535",
        ),
        (
            "container port given as a string",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {containers: [{name: c, ports: [{containerPort: \"80\"}]}]}\n",
            "spec.containers[0].ports[0].containerPort: expected an integer port, found a string",
        ),
        (
            "service port zero",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 0}]}\n",
            "Service default/s: spec.ports[0].port: port 0 out of range 1-65535",
        ),
        (
            "target port out of range",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, targetPort: 65536}]}\n",
            "spec.ports[0].targetPort: port 65536 out of range 1-65535",
        ),
        (
            "target port name that is not a port name",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, targetPort: \"8080\"}]}\n",
            r#"spec.ports[0].targetPort: invalid port name "8080""#,
        ),
        (
            "bad protocol",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {ports: [{port: 80, protocol: HTTP}]}\n",
            r#"spec.ports[0].protocol: invalid protocol "HTTP""#,
        ),
        (
            "bad cluster IP",
            "apiVersion: v1\nkind: Service\nmetadata: {name: s}\nspec: {clusterIP: 10.96.0.300}\n",
            r#"spec.clusterIP: invalid IP address "10.96.0.300""#,
        ),
        (
            "podIP disagrees with podIPs",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nstatus: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.2}]}\n",
            "status.podIP: 10.0.0.1 does not match status.podIPs[0] 10.0.0.2",
        ),
        (
            "two IPv4 pod IPs",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nstatus: {podIPs: [{ip: 10.0.0.1}, {ip: 10.0.0.2}]}\n",
            "status.podIPs[1].ip: at most one IP per address family",
        ),
        (
            "label value that is not a string",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web, labels: {version: 2}}\n",
            "Pod default/web: metadata.labels.version: expected a string, found a number",
        ),
        (
            "hostNetwork that is not a boolean",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {hostNetwork: \"yes\"}\n",
            "spec.hostNetwork: expected a boolean, found a string",
        ),
        (
            "bad Ready status",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nstatus: {conditions: [{type: Ready, status: maybe}]}\n",
            r#"status.conditions[0].status: invalid condition status "maybe""#,
        ),
    ];
    for (case, yaml, want) in cases {
        check(case, &[("pods.yaml", yaml)], Expect::Error(want));
    }
}

#[test]
fn security_kinds() {
    check(
        "peer authentication with port levels",
        &[(
            "pa.yaml",
            r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: web, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  mtls: {mode: STRICT}
  portLevelMtls:
    8080: {mode: DISABLE}
    "9090": {mode: PERMISSIVE}
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: ns-wide, namespace: shop}
spec: {selector: {matchLabels: {}}}
"#,
        )],
        Expect::Model(|m| {
            let pa = &m.peer_authentications[1];
            assert_eq!(pa.name, "web");
            assert_eq!(pa.selector, Some(labels(&[("app", "web")])));
            assert_eq!(pa.mode, PeerAuthnMode::Strict);
            assert_eq!(
                pa.port_levels,
                BTreeMap::from([
                    (8080, PeerAuthnMode::Disable),
                    (9090, PeerAuthnMode::Permissive)
                ])
            );
            let ns_wide = &m.peer_authentications[0];
            assert_eq!(
                (ns_wide.selector.as_ref(), ns_wide.mode),
                (None, PeerAuthnMode::Unset)
            );
        }),
    );
    check(
        "authorization policy translation",
        &[(
            "ap.yaml",
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: web
  namespace: shop
  annotations: {istio.io/dry-run: "true"}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["spiffe://cluster.local/ns/a/sa/b", "cluster.local/ns/*"]
        notNamespaces: [kube-system]
        ipBlocks: [10.0.0.0/8, 192.168.1.1]
        notRemoteIpBlocks: ["fd00::/64"]
    - source: {serviceAccounts: [client, other/sa]}
    to:
    - operation: {ports: ["8080", 9090], notPorts: ["22"], methods: [GET]}
    when:
    - {key: destination.port, values: ["8080"]}
  - {}
"#,
        )],
        Expect::Model(|m| {
            let ap = &m.authorization_policies[0];
            assert_eq!((ap.action, ap.dry_run), (Action::Deny, true));
            assert_eq!(ap.selector, Some(labels(&[("app", "web")])));
            let net = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
            let want = Rule {
                from: vec![
                    Source {
                        // Kept literally: a spiffe:// principal simply never matches.
                        principals: vec![
                            "spiffe://cluster.local/ns/a/sa/b".into(),
                            "cluster.local/ns/*".into(),
                        ],
                        not_namespaces: vec!["kube-system".into()],
                        ip_blocks: vec![net("10.0.0.0/8"), net("192.168.1.1/32")],
                        not_remote_ip_blocks: vec![net("fd00::/64")],
                        ..Source::default()
                    },
                    Source {
                        service_accounts: vec!["shop/client".into(), "other/sa".into()],
                        ..Source::default()
                    },
                ],
                to: vec![Operation {
                    ports: vec![8080, 9090],
                    not_ports: vec![22],
                    methods: vec!["GET".into()],
                    ..Operation::default()
                }],
                when: vec![Condition {
                    key: "destination.port".into(),
                    values: vec!["8080".into()],
                    not_values: vec![],
                }],
            };
            assert_eq!(ap.rules, vec![want, Rule::default()]);
        }),
    );
    check(
        "deny-all and waypoint policies",
        &[(
            "ap.yaml",
            r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: shop}
spec: {}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: for-waypoint, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: "", name: web}]
  rules: [{to: [{operation: {methods: [GET]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: shop}
spec: {action: CUSTOM, provider: {name: opa}, rules: [{}]}
"#,
        )],
        Expect::Model(|m| {
            let [deny_all, ext, waypoint] = &m.authorization_policies[..] else {
                panic!("three policies expected");
            };
            assert_eq!((deny_all.action, deny_all.rules.len()), (Action::Allow, 0));
            assert_eq!(ext.action, Action::Custom);
            assert_eq!(waypoint.target_refs[0].name, "web");
        }),
    );
}

#[test]
fn invalid_policies() {
    let ap = |spec: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: shop}}\nspec: {spec}\n")
    };
    let pa = |spec: &str| {
        format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: shop}}\nspec: {spec}\n")
    };
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "bad CIDR in ipBlocks",
            ap("{rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}"),
            r#"policy.yaml doc 1: AuthorizationPolicy shop/p: spec.rules[0].from[0].source.ipBlocks[0]: invalid IP address or CIDR "10.0.0.0/33""#,
        ),
        (
            "unknown action",
            ap("{action: REJECT, rules: [{}]}"),
            r#"spec.action: unknown action "REJECT""#,
        ),
        (
            "unknown when key",
            ap("{rules: [{when: [{key: source.color, values: [red]}]}]}"),
            r#"spec.rules[0].when[0].values: unknown attribute "source.color""#,
        ),
        (
            "when without values",
            ap("{rules: [{when: [{key: source.ip}]}]}"),
            "spec.rules[0].when[0]: at least one of values or notValues must be set for key source.ip",
        ),
        (
            "bad IP in a when condition",
            ap("{rules: [{when: [{key: destination.ip, notValues: [nope]}]}]}"),
            r#"spec.rules[0].when[0].notValues: invalid IP address or CIDR "nope""#,
        ),
        (
            "bad header key",
            ap("{rules: [{when: [{key: \"request.headers\", values: [x]}]}]}"),
            "should have the form request.headers[name]",
        ),
        (
            "port out of range in an operation",
            ap("{rules: [{to: [{operation: {ports: [\"70000\"]}}]}]}"),
            "spec.rules[0].to[0].operation.ports[0]: port 70000 out of range 1-65535",
        ),
        (
            "misspelt source field",
            ap("{action: DENY, rules: [{from: [{source: {notPrincipal: [x]}}]}]}"),
            "spec.rules[0].from[0].source.notPrincipal: unknown field",
        ),
        (
            "empty source",
            ap("{rules: [{from: [{source: {}}]}]}"),
            "spec.rules[0].from[0].source: must not be empty",
        ),
        (
            "empty from",
            ap("{rules: [{from: []}]}"),
            "spec.rules[0].from: must not be empty",
        ),
        (
            "empty principal",
            ap("{rules: [{from: [{source: {principals: [\"\"]}}]}]}"),
            "source.principals[0]: empty value not allowed",
        ),
        (
            "DENY without rules",
            ap("{action: DENY}"),
            "spec: DENY action without `rules` is meaningless",
        ),
        (
            "CUSTOM without provider",
            ap("{action: CUSTOM, rules: [{}]}"),
            "provider.name: must not be empty with CUSTOM action",
        ),
        (
            "selector and targetRefs",
            ap("{selector: {matchLabels: {app: a}}, targetRefs: [{kind: Service, name: a}]}"),
            "spec: only one of targetRefs or selector can be set",
        ),
        (
            "serviceAccounts with principals",
            ap("{rules: [{from: [{source: {serviceAccounts: [a], principals: [b]}}]}]}"),
            "cannot set serviceAccounts with namespaces or principals",
        ),
        (
            "wildcard service account",
            ap("{rules: [{from: [{source: {serviceAccounts: [\"ns/*\"]}}]}]}"),
            r#"source.serviceAccounts[0]: invalid service account "ns/*""#,
        ),
        (
            "bad dry-run annotation",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop, annotations: {istio.io/dry-run: maybe}}\nspec: {}\n".to_string(),
            r#"metadata.annotations.istio.io/dry-run: invalid boolean "maybe""#,
        ),
        (
            "unknown mtls mode",
            pa("{mtls: {mode: OPTIONAL}}"),
            r#"PeerAuthentication shop/p: spec.mtls.mode: unknown mtls mode "OPTIONAL""#,
        ),
        (
            "port-level mTLS on a namespace-wide policy",
            pa("{mtls: {mode: STRICT}, portLevelMtls: {80: {mode: DISABLE}}}"),
            "spec.portLevelMtls: mesh/namespace peer authentication cannot have port level mTLS",
        ),
        (
            "port-level mTLS port out of range",
            pa("{selector: {matchLabels: {app: a}}, portLevelMtls: {0: {mode: DISABLE}}}"),
            "spec.portLevelMtls.0: port 0 out of range 1-65535",
        ),
        (
            "wildcard in a selector",
            pa("{selector: {matchLabels: {app: \"web-*\"}}}"),
            "spec.selector: invalid selector label app=web-*",
        ),
    ];
    for (case, yaml, want) in &cases {
        check(case, &[("policy.yaml", yaml)], Expect::Error(want));
    }
}

#[test]
fn load_dir_reads_yaml_files_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
    write(
        "10-ns.yaml",
        "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n",
    );
    write(
        "20-pods.yml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\n",
    );
    // Not configuration: wrong extension, editor lock file, subdirectory.
    write("notes.txt", "not yaml {");
    write(".#20-pods.yml", "not yaml {");
    std::fs::create_dir(dir.path().join("sub.yaml")).unwrap();

    let model = load_dir(dir.path()).unwrap();
    assert!(model.pod("shop", "web").is_some());

    let before = dir_fingerprint(dir.path()).unwrap();
    let stamp = dir_stamp(dir.path()).unwrap();
    assert_eq!(
        dir_fingerprint(dir.path()).unwrap(),
        before,
        "nothing changed"
    );
    assert_eq!(dir_stamp(dir.path()).unwrap(), stamp, "nothing changed");
    write("notes.txt", "still ignored");
    assert_eq!(
        dir_fingerprint(dir.path()).unwrap(),
        before,
        "ignored files do not count"
    );
    assert_eq!(
        dir_stamp(dir.path()).unwrap(),
        stamp,
        "ignored files do not count"
    );
    // Past the file clock's tick (a few ms), so the same-size rewrite below gets a new time.
    std::thread::sleep(std::time::Duration::from_millis(30));
    write(
        "20-pods.yml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web2, namespace: shop}\n",
    );
    assert_ne!(
        dir_fingerprint(dir.path()).unwrap(),
        before,
        "content changed"
    );
    let rewritten = dir_stamp(dir.path()).unwrap();
    assert_ne!(rewritten, stamp, "content changed");
    std::thread::sleep(std::time::Duration::from_millis(30));
    write(
        "20-pods.yml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: web3, namespace: shop}\n",
    );
    assert_ne!(
        dir_stamp(dir.path()).unwrap(),
        rewritten,
        "same size, new content: a new modification time"
    );

    write(
        "30-bad.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: x}\nstatus: {podIP: bad}\n",
    );
    let err = load_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.starts_with("30-bad.yaml doc 1: Pod default/x: status.podIP"),
        "{err}"
    );

    std::fs::write(dir.path().join("30-bad.yaml"), [0xff, 0xfe]).unwrap();
    let err = load_dir(dir.path()).unwrap_err().to_string();
    assert_eq!(err, "read 30-bad.yaml: not valid UTF-8");

    let missing = dir.path().join("missing");
    assert!(load_dir(&missing)
        .unwrap_err()
        .to_string()
        .starts_with("read "));
}

#[test]
fn gateways() {
    const GW: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop, labels: {istio.io/waypoint-for: all}}
spec:
  gatewayClassName: istio-waypoint
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
  addresses: [{type: IPAddress, value: 10.0.0.8}]
status:
  addresses: [{type: Hostname, value: wp.example}, {value: 10.0.0.9}]
---
apiVersion: gateway.networking.k8s.io/v1beta1
kind: Gateway
metadata: {name: default-for, namespace: shop}
spec: {gatewayClassName: istio-waypoint, addresses: [{type: IPAddress, value: "fd00::9"}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: skipped, namespace: shop}
spec: {}
"#;
    check(
        "waypoint gateways",
        &[("gw.yaml", GW)],
        Expect::Model(|m| {
            let gw = &m.gateways[&NamespacedName::new("shop", "waypoint")];
            assert!(gw.is_waypoint());
            assert_eq!(gw.waypoint_for, crate::model::WaypointFor::All);
            assert_eq!(gw.addresses, vec![ip("10.0.0.9")], "status wins over spec");
            let other = &m.gateways[&NamespacedName::new("shop", "default-for")];
            assert_eq!(other.waypoint_for, crate::model::WaypointFor::Service);
            assert_eq!(other.addresses, vec![ip("fd00::9")]);
            assert_eq!(m.gateways.len(), 2, "HTTPRoute is not a Gateway");
        }),
    );
    for (case, doc, want) in [
        (
            "bad waypoint-for",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: w, labels: {istio.io/waypoint-for: pods}}\nspec: {gatewayClassName: istio-waypoint}\n",
            "gw.yaml doc 1: Gateway default/w: metadata.labels.istio.io/waypoint-for: invalid value \"pods\"",
        ),
        (
            "no class",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: w}\nspec: {}\n",
            "spec.gatewayClassName",
        ),
        (
            "bad address",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: w}\nspec: {gatewayClassName: istio-waypoint, addresses: [{value: 10.0.0.x}]}\n",
            "spec.addresses[0].value",
        ),
        (
            "old version",
            "apiVersion: gateway.networking.k8s.io/v1alpha2\nkind: Gateway\nmetadata: {name: w}\nspec: {gatewayClassName: istio-waypoint}\n",
            "unsupported version \"v1alpha2\"",
        ),
    ] {
        check(case, &[("gw.yaml", doc)], Expect::Error(want));
    }
}
