//! Property tests of the YAML translator: one valid document of every kind it knows,
//! round-tripped through YAML and JSON, and mutated (values of other types, keys dropped or
//! added, text edited) — never a panic, and every refusal names the file and the document.

use proptest::prelude::*;
use serde_yaml::Value;

use super::*;

/// One valid document of every kind the translator reads (and one it skips).
pub(super) const VALID: &[&str] = &[
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}\n",
    "apiVersion: v1\nkind: ServiceAccount\nmetadata: {name: web, namespace: shop}\n",
    "apiVersion: v1\nkind: Pod\nmetadata: {name: web-1, namespace: shop, labels: {app: web}}\n\
     spec: {nodeName: n1, serviceAccountName: web, containers: [{name: c, image: i, ports: [{name: http, containerPort: 8080}]}]}\n\
     status: {podIP: 10.0.0.5, podIPs: [{ip: 10.0.0.5}]}\n",
    "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\n\
     spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{name: http, port: 80, targetPort: 8080}, {name: grpc, port: 90, targetPort: http, appProtocol: grpc}]}\n",
    "apiVersion: v1\nkind: List\nitems:\n- {apiVersion: v1, kind: Namespace, metadata: {name: other}}\n- {apiVersion: v1, kind: ServiceAccount, metadata: {name: sa, namespace: other}}\n",
    "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: shop}\n\
     spec: {selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: PERMISSIVE}}}\n",
    "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: allow, namespace: shop}\n\
     spec:\n  selector: {matchLabels: {app: web}}\n  action: ALLOW\n  rules:\n  - from: [{source: {principals: [cluster.local/ns/shop/sa/web], ipBlocks: [10.0.0.0/8]}}]\n    \
     to: [{operation: {ports: ['8080'], methods: [GET], paths: [/api/*]}}]\n    when: [{key: 'request.headers[x-a]', values: [b]}]\n",
    "apiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: jwt, namespace: shop}\n\
     spec:\n  targetRefs: [{kind: Service, group: \"\", name: web}]\n  jwtRules:\n  - issuer: https://issuer\n    audiences: [web]\n    \
     jwks: '{\"keys\":[{\"kty\":\"EC\",\"crv\":\"P-256\",\"kid\":\"k1\",\"x\":\"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU\",\"y\":\"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0\"}]}'\n    \
     fromHeaders: [{name: X-Jwt, prefix: 'Token '}]\n    fromParams: [jwt]\n",
    "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {name: wp, namespace: shop, labels: {istio.io/waypoint-for: service}}\n\
     spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}\n",
    "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r, namespace: shop}\n\
     spec:\n  parentRefs: [{group: \"\", kind: Service, name: web, port: 80}]\n  rules:\n  \
     - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: x-v, value: '1'}], method: GET}]\n    \
     filters: [{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-a, value: b}]}}]\n    \
     backendRefs: [{name: web, port: 80, weight: 3}]\n    timeouts: {request: 2s}\n",
    "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata: {name: g, namespace: shop}\n\
     spec:\n  parentRefs: [{group: \"\", kind: Service, name: web}]\n  rules:\n  - matches: [{method: {service: pkg.Svc, method: Get}}]\n    backendRefs: [{name: web, port: 90}]\n",
    "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: dr, namespace: shop}\n\
     spec:\n  host: web\n  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}, connectionPool: {http: {http2MaxRequests: 10}}, \
     outlierDetection: {consecutive5xxErrors: 3, interval: 5s, baseEjectionTime: 30s}}\n  subsets: [{name: v1, labels: {version: v1}}]\n",
    "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: vs, namespace: shop}\n\
     spec:\n  hosts: [web]\n  http:\n  - match: [{uri: {prefix: /v1}}]\n    route: [{destination: {host: web, subset: v1}, weight: 100}]\n    \
     timeout: 1s\n    retries: {attempts: 2, perTryTimeout: 300ms}\n",
    "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: shop}\nspec: {replicas: 1}\n",
];

fn files(docs: &[&str]) -> Vec<(String, String)> {
    vec![("all.yaml".to_string(), docs.join("---\n"))]
}

/// The model as a YAML value (maps compare regardless of order; some keys are not strings).
fn model_value(files: &[(String, String)]) -> Result<Value, String> {
    let model = load_docs(files).map_err(|e| e.to_string())?;
    serde_yaml::to_value(&model).map_err(|e| e.to_string())
}

/// The document as a YAML value, for structural mutation.
fn value(doc: &str) -> Value {
    serde_yaml::from_str(doc).unwrap_or(Value::Null)
}

/// Values of every YAML type, some close to what fields expect.
fn any_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| Value::Number(n.into())),
        (-1e12f64..1e12).prop_map(|f| Value::Number(f.into())),
        "\\PC{0,12}".prop_map(Value::String),
        prop_oneof![
            Just("10.0.0.1"),
            Just("::1"),
            Just("10.0.0.0/33"),
            Just("1s"),
            Just("-1s"),
            Just("99999999999h"),
            Just("/a/../b"),
            Just("*"),
            Just("[a-"),
            Just("65536"),
            Just("0"),
            Just("PathPrefix"),
            Just("Exact"),
            Just("RegularExpression"),
        ]
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(2, 12, 4, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Sequence),
            proptest::collection::vec(("[a-zA-Z]{1,8}", inner), 0..3).prop_map(
                |kv| Value::Mapping(kv.into_iter().map(|(k, v)| (Value::String(k), v)).collect())
            ),
        ]
    })
}

/// One structural edit at the node `path` picks (each step indexes the children).
#[derive(Clone, Debug)]
enum Edit {
    Replace(Value),
    Remove,
    AddKey(String, Value),
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        3 => any_value().prop_map(Edit::Replace),
        1 => Just(Edit::Remove),
        1 => ("[a-zA-Z]{1,10}", any_value()).prop_map(|(k, v)| Edit::AddKey(k, v)),
    ]
}

/// Walks down `path` (each step picks a child modulo the number of children) and applies
/// `edit` there.
fn apply(v: &mut Value, path: &[usize], edit: Edit) {
    let children = match v {
        Value::Mapping(m) => m.len(),
        Value::Sequence(s) => s.len(),
        _ => 0,
    };
    match (path.split_first(), &mut *v) {
        (Some((i, rest)), Value::Mapping(m)) if children > 0 && !rest.is_empty() => {
            if let Some((_, child)) = m.iter_mut().nth(i % children) {
                apply(child, rest, edit);
            }
        }
        (Some((i, rest)), Value::Sequence(s)) if children > 0 && !rest.is_empty() => {
            let i = i % children;
            apply(&mut s[i], rest, edit);
        }
        (Some((i, _)), Value::Mapping(m)) if children > 0 => match edit {
            Edit::Replace(new) => {
                if let Some((_, child)) = m.iter_mut().nth(i % children) {
                    *child = new;
                }
            }
            Edit::Remove => {
                let key = m.keys().nth(i % children).cloned();
                if let Some(key) = key {
                    m.remove(&key);
                }
            }
            Edit::AddKey(k, new) => {
                m.insert(Value::String(k), new);
            }
        },
        (Some((i, _)), Value::Sequence(s)) if children > 0 => {
            let i = i % children;
            match edit {
                Edit::Replace(new) => s[i] = new,
                Edit::Remove => {
                    s.remove(i);
                }
                Edit::AddKey(_, new) => s.push(new),
            }
        }
        _ => {
            if let Edit::Replace(new) = edit {
                *v = new;
            }
        }
    }
}

/// A refusal names the file and the 1-based document number first.
fn names_file_and_doc(err: &ConfigError, file: &str, docs: usize) -> bool {
    let text = err.to_string();
    let Some(rest) = text.strip_prefix(&format!("{file} doc ")) else {
        return false;
    };
    let n: String = rest.chars().take_while(char::is_ascii_digit).collect();
    n.parse::<usize>()
        .is_ok_and(|n| (1..=docs.max(1)).contains(&n))
}

#[test]
fn every_valid_document_loads_and_round_trips() {
    let all = model_value(&files(VALID)).unwrap_or_else(|e| panic!("valid documents refused: {e}"));
    for doc in VALID {
        let direct = model_value(&files(&[doc])).unwrap_or_else(|e| panic!("{e}\n{doc}"));
        // Through a YAML value and back, as YAML and as JSON (YAML's flow subset).
        let v = value(doc);
        let yaml = serde_yaml::to_string(&v).unwrap_or_default();
        let json = serde_json::to_string(&v).unwrap_or_default();
        assert_eq!(
            model_value(&files(&[&yaml])),
            Ok(direct.clone()),
            "yaml {yaml}"
        );
        assert_eq!(
            model_value(&files(&[&json])),
            Ok(direct.clone()),
            "json {json}"
        );
        // Every kind but the skipped Deployment adds something to the model.
        let empty = serde_yaml::to_value(Model::default()).unwrap_or_default();
        assert_eq!(direct == empty, doc.contains("kind: Deployment"), "{doc}");
    }
    assert!(all.is_mapping());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Structural mutations of a valid document: no panic; a refusal names file and doc.
    #[test]
    fn mutated_documents_never_panic(
        which in 0..VALID.len(),
        edits in proptest::collection::vec((proptest::collection::vec(any::<usize>(), 1..6), edit()), 1..4),
    ) {
        let mut v = value(VALID[which]);
        for (path, e) in edits {
            apply(&mut v, &path, e);
        }
        let text = serde_yaml::to_string(&v).unwrap_or_default();
        // The mutated document second, after a valid one, so the number must be right.
        let docs = format!("{}---\n{text}", VALID[0]);
        if let Err(err) = load_docs(&[("m.yaml".to_string(), docs.clone())]) {
            prop_assert!(names_file_and_doc(&err, "m.yaml", 2), "{err}\n{docs}");
        }
    }

    /// Text edits of the concatenated valid documents (broken indentation, quotes, anchors,
    /// tags, truncation): no panic; a refusal names file and doc.
    #[test]
    fn edited_text_never_panics(
        edits in proptest::collection::vec((any::<usize>(), 0u8..3, "[ \\n:\\-\\[\\]{}'\"&*!|>#%@`,a0]{0,3}"), 1..6),
    ) {
        let mut text = files(VALID)[0].1.clone();
        for (at, op, s) in edits {
            let mut i = at % (text.len() + 1);
            while !text.is_char_boundary(i) {
                i -= 1;
            }
            match op {
                0 => text.insert_str(i, &s),
                1 => { let end = (i + s.len().max(1)).min(text.len()); if text.is_char_boundary(end) { text.replace_range(i..end, ""); } }
                _ => text.truncate(i),
            }
        }
        let docs = text.matches("---").count() + 1;
        if let Err(err) = load_docs(&[("t.yaml".to_string(), text.clone())]) {
            prop_assert!(names_file_and_doc(&err, "t.yaml", docs), "{err}\n{text}");
        }
    }

    /// Arbitrary text: no panic; a refusal names the file.
    #[test]
    fn any_text_never_panics(text in "\\PC{0,200}|[-:\\[\\]{}\\n a-z0-9]{0,80}") {
        if let Err(err) = load_docs(&[("x.yaml".to_string(), text.clone())]) {
            prop_assert!(err.to_string().starts_with("x.yaml doc "), "{err}\n{text:?}");
        }
    }

    /// Documents of every known kind with any spec: no panic; a refusal names file and doc.
    #[test]
    fn any_spec_of_a_known_kind_never_panics(which in 0..VALID.len(), spec in any_value(), metadata in any_value()) {
        let mut v = value(VALID[which]);
        if let Value::Mapping(m) = &mut v {
            m.insert(Value::String("spec".into()), spec);
            if which % 2 == 0 {
                m.insert(Value::String("metadata".into()), metadata);
            }
        }
        let text = serde_yaml::to_string(&v).unwrap_or_default();
        if let Err(err) = load_docs(&[("s.yaml".to_string(), text.clone())]) {
            prop_assert!(names_file_and_doc(&err, "s.yaml", 1), "{err}\n{text}");
        }
    }
}
