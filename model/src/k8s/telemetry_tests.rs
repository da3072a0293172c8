//! Telemetry translation: what loads, every refusal with its field, and the waypoint's
//! access-log decision from YAML (precedence, `disabled`, modes, providers).

use super::*;
use crate::model::{AccessLogDecision, TelemetryLevel, WorkloadMode, ROOT_NAMESPACE};

fn telemetry(version: &str, ns: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: telemetry.istio.io/{version}\nkind: Telemetry\n\
         metadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}"
    )
}

fn load(docs: &[String]) -> Result<Model, ConfigError> {
    load_docs(&[("t.yaml".to_string(), docs.join("---\n"))])
}

const ENVOY: &str = "  accessLogging: [{providers: [{name: envoy}]}]\n";
const DISABLED: &str = "  accessLogging: [{disabled: true}]\n";

/// The waypoint `shop/waypoint`, with one pod labelled `role: edge`.
fn waypoint() -> Vec<String> {
    vec![
        "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
         metadata: {name: waypoint, namespace: shop}\nspec: {gatewayClassName: istio-waypoint}\n"
            .to_string(),
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: waypoint-0\n  namespace: shop\n  \
         labels: {gateway.networking.k8s.io/gateway-name: waypoint, role: edge}\n\
         status: {podIP: 10.0.0.9}\n"
            .to_string(),
    ]
}

fn decide(telemetries: &[String]) -> AccessLogDecision {
    let mut docs = waypoint();
    docs.extend_from_slice(telemetries);
    load(&docs)
        .expect("loads")
        .waypoint_access_log(&NamespacedName::new("shop", "waypoint"))
}

fn decided_by(d: &AccessLogDecision) -> Option<String> {
    d.telemetry.as_ref().map(ToString::to_string)
}

#[test]
fn telemetries_load_with_both_versions() {
    let docs = [
        telemetry(
            "v1",
            "shop",
            "a",
            "  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  \
             metrics: [{providers: [{name: prometheus}]}]\n  \
             accessLogging:\n  - providers: [{name: envoy}, {name: otel}]\n    \
             match: {mode: SERVER}\n  - disabled: true\n    match: {mode: CLIENT}\n",
        ),
        telemetry("v1alpha1", "shop", "b", "  selector: {matchLabels: {role: edge}}\n"),
        "apiVersion: telemetry.istio.io/v1\nkind: Telemetry\nmetadata: {name: c, namespace: shop}\n"
            .to_string(),
    ];
    let m = load(&docs).expect("loads");
    let [a, b, c] = &m.telemetries[..] else {
        panic!("three telemetries: {:?}", m.telemetries)
    };
    assert_eq!(a.target_refs[0].name, "waypoint");
    assert_eq!(a.access_logging.len(), 2);
    assert_eq!(a.access_logging[0].providers, ["envoy", "otel"]);
    assert_eq!(a.access_logging[0].mode, WorkloadMode::Server);
    assert!(!a.access_logging[0].disabled);
    assert!(a.access_logging[1].disabled);
    assert_eq!(a.access_logging[1].mode, WorkloadMode::Client);
    assert_eq!(
        b.selector
            .as_ref()
            .and_then(|s| s.get("role"))
            .map(String::as_str),
        Some("edge")
    );
    assert!(b.access_logging.is_empty());
    assert!(c.selector.is_none() && c.target_refs.is_empty() && c.access_logging.is_empty());
    // The dump shows them.
    let dump = serde_json::to_value(m.dump()).expect("dump");
    assert_eq!(dump["telemetries"][0]["name"], "a");
}

#[test]
fn invalid_telemetries_are_refused_by_field() {
    let cases: Vec<(String, &str)> = vec![
        (
            telemetry(
                "v1",
                "shop",
                "t",
                "  accessLogging: [{filter: {expression: 'response.code >= 400'}}]\n",
            ),
            "spec.accessLogging[0].filter: CEL filters are not supported",
        ),
        (
            telemetry(
                "v1",
                "shop",
                "t",
                "  accessLogging: [{match: {mode: BOTH}}]\n",
            ),
            "spec.accessLogging[0].match.mode: unknown mode \"BOTH\"",
        ),
        (
            telemetry(
                "v1",
                "shop",
                "t",
                "  accessLogging: [{providers: [{name: ''}]}]\n",
            ),
            "spec.accessLogging[0].providers[0].name: must not be empty",
        ),
        (
            telemetry(
                "v1",
                "shop",
                "t",
                "  accessLogging: [{providers: [{nmae: envoy}]}]\n",
            ),
            "spec.accessLogging[0].providers[0].nmae: unknown field",
        ),
        (
            telemetry("v1", "shop", "t", "  accessLogging: [{disabled: maybe}]\n"),
            "spec.accessLogging[0].disabled: expected a boolean",
        ),
        (
            telemetry("v1", "shop", "t", "  acessLogging: []\n"),
            "spec.acessLogging: unknown field",
        ),
        (
            telemetry(
                "v1",
                "shop",
                "t",
                "  targetRefs: [{kind: Service, group: '', name: web}]\n",
            ),
            "spec.targetRefs[0]: targetRef /Service: only gateway.networking.k8s.io Gateways",
        ),
        (
            telemetry(
                "v1",
                "shop",
                "t",
                "  selector: {matchLabels: {a: b}}\n  \
                 targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: w}]\n",
            ),
            "spec: only one of targetRefs or selector can be set",
        ),
        (
            telemetry("v1beta1", "shop", "t", ENVOY),
            "apiVersion: unsupported version \"v1beta1\"",
        ),
    ];
    for (doc, want) in cases {
        let got = load(&[doc]).map(|_| ()).expect_err(want).to_string();
        assert!(got.contains(want), "{got:?} does not contain {want:?}");
        assert!(got.contains("Telemetry"), "{got}");
    }
}

#[test]
fn access_log_is_off_without_telemetry() {
    let d = decide(&[]);
    assert_eq!(d, AccessLogDecision::default());
    assert!(!d.enabled);
    // Telemetries that do not configure access logging (or not for this waypoint) change
    // nothing.
    let d = decide(&[
        telemetry("v1", "shop", "metrics-only", "  metrics: []\n"),
        telemetry("v1", "shop", "empty", "  accessLogging: []\n"),
        telemetry("v1", "shop", "client", "  accessLogging: [{providers: [{name: envoy}], match: {mode: CLIENT}}]\n"),
        telemetry("v1", "other", "ns", ENVOY),
        telemetry("v1", "shop", "other-gw", &format!(
            "  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: other}}]\n{ENVOY}"
        )),
        telemetry("v1", "shop", "other-pods", &format!("  selector: {{matchLabels: {{role: db}}}}\n{ENVOY}")),
        telemetry("v1", ROOT_NAMESPACE, "selected", &format!("  selector: {{matchLabels: {{role: edge}}}}\n{ENVOY}")),
    ]);
    assert!(!d.enabled, "{d:?}");
    assert_eq!(d.telemetry, None);
}

#[test]
fn each_level_turns_access_log_on() {
    let root = decide(&[telemetry("v1", ROOT_NAMESPACE, "mesh-default", ENVOY)]);
    assert!(root.enabled);
    assert_eq!(
        decided_by(&root).as_deref(),
        Some("istio-system/mesh-default")
    );
    assert_eq!(root.level, Some(TelemetryLevel::Root));
    assert_eq!(root.providers, ["envoy"]);

    let ns = decide(&[telemetry("v1", "shop", "ns", ENVOY)]);
    assert_eq!(
        (ns.enabled, ns.level),
        (true, Some(TelemetryLevel::Namespace))
    );

    let target = decide(&[telemetry(
        "v1",
        "shop",
        "gw",
        &format!(
        "  targetRef: {{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}}\n{ENVOY}"
    ),
    )]);
    assert_eq!(
        (target.enabled, target.level),
        (true, Some(TelemetryLevel::Workload))
    );

    // A selector matching the model's waypoint pod, or the label every waypoint pod has.
    for labels in [
        "role: edge",
        "gateway.networking.k8s.io/gateway-name: waypoint",
    ] {
        let sel = decide(&[telemetry("v1", "shop", "sel", &format!(
            "  selector: {{matchLabels: {{{labels}}}}}\n  accessLogging: [{{providers: [{{name: otel}}], match: {{mode: SERVER}}}}]\n"
        ))]);
        assert_eq!(
            (sel.enabled, sel.level),
            (true, Some(TelemetryLevel::Workload)),
            "{labels}"
        );
        assert_eq!(sel.providers, ["otel"]);
    }
}

#[test]
fn the_most_specific_configured_level_decides() {
    let gw_off = telemetry("v1", "shop", "gw-off", &format!(
        "  targetRefs: [{{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}}]\n{DISABLED}"
    ));
    let ns_on = telemetry("v1", "shop", "ns-on", ENVOY);
    let root_off = telemetry("v1", ROOT_NAMESPACE, "root-off", DISABLED);
    let root_on = telemetry("v1", ROOT_NAMESPACE, "root-on", ENVOY);

    // Namespace over root, both ways.
    let d = decide(&[root_off.clone(), ns_on.clone()]);
    assert!(d.enabled);
    assert_eq!(decided_by(&d).as_deref(), Some("shop/ns-on"));
    let ns_off = telemetry("v1", "shop", "ns-off", DISABLED);
    let d = decide(&[root_on.clone(), ns_off]);
    assert!(!d.enabled);
    assert_eq!(decided_by(&d).as_deref(), Some("shop/ns-off"));

    // The Gateway's own over the namespace's.
    let d = decide(&[root_on.clone(), ns_on.clone(), gw_off]);
    assert!(!d.enabled);
    assert_eq!(decided_by(&d).as_deref(), Some("shop/gw-off"));
    assert_eq!(d.level, Some(TelemetryLevel::Workload));

    // A level whose Telemetry does not configure access logging is skipped.
    let gw_metrics = telemetry("v1", "shop", "gw-metrics", 
        "  targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\n  metrics: []\n");
    let d = decide(&[root_off, ns_on, gw_metrics]);
    assert!(d.enabled);
    assert_eq!(decided_by(&d).as_deref(), Some("shop/ns-on"));

    // Within a level: the first by name.
    let d = decide(&[
        telemetry("v1", "shop", "b-off", DISABLED),
        telemetry("v1", "shop", "a-on", ENVOY),
    ]);
    assert!(d.enabled);
    assert_eq!(decided_by(&d).as_deref(), Some("shop/a-on"));
}

#[test]
fn disabled_and_providers_combine_within_one_telemetry() {
    let case = |entries: &str| {
        decide(&[telemetry(
            "v1",
            "shop",
            "t",
            &format!("  accessLogging:\n{entries}"),
        )])
    };
    // A disabled provider is taken out; another stays on.
    let d = case("  - providers: [{name: envoy}, {name: otel}]\n  - providers: [{name: envoy}]\n    disabled: true\n");
    assert_eq!(
        (d.enabled, d.providers.as_slice()),
        (true, &["otel".to_string()][..])
    );
    // Disabled without providers: all off.
    let d = case("  - providers: [{name: envoy}]\n  - disabled: true\n");
    assert!(!d.enabled);
    assert_eq!(decided_by(&d).as_deref(), Some("shop/t"));
    // No providers: the mesh default, which is none here; still configured at this level.
    let d = case("  - {}\n");
    assert!(!d.enabled);
    assert_eq!(decided_by(&d).as_deref(), Some("shop/t"));
    // A disabled CLIENT entry does not apply to the waypoint.
    let d = case("  - providers: [{name: envoy}]\n  - disabled: true\n    match: {mode: CLIENT}\n");
    assert!(d.enabled);
    // `disabled: false` is an ordinary entry.
    let d = case("  - providers: [{name: envoy}]\n    disabled: false\n    match: {mode: CLIENT_AND_SERVER}\n");
    assert!(d.enabled);
}

#[test]
fn a_waypoint_unknown_to_the_model_still_resolves() {
    let m = load(&[telemetry("v1", "shop", "t", ENVOY)]).expect("loads");
    let d = m.waypoint_access_log(&NamespacedName::new("shop", "ghost"));
    assert!(d.enabled);
    let d = m.waypoint_access_log(&NamespacedName::new("elsewhere", "ghost"));
    assert!(!d.enabled);
}
