//! Istio's standard labels from what the model knows of both ends: the one builder behind
//! every [`TcpLabels`] the agent reports and every request label set the waypoint reports.
//!
//! What Istio derives from Kubernetes objects, derived here from [`Pod`] labels:
//! - `*_workload`: the `app` label, else the pod name (there is no workload object here;
//!   Istio too falls back to the pod name for a bare pod);
//! - `*_app`, `*_version`: `app` / `version`, else `app.kubernetes.io/name` / `version`;
//! - `*_canonical_service`, `*_canonical_revision`: `service.istio.io/canonical-name` /
//!   `-revision`, else `app.kubernetes.io/name` / `version`, else `app` / `version`;
//! - `destination_service*`: the Service addressed (a pod addressed directly has none);
//! - `*_cluster`: always `Kubernetes`.
//!
//! Anything not known is [`UNKNOWN`].

use mesh_model::identity::Identity;
use mesh_model::model::{Pod, Service};

use crate::{ResponseFlag, TcpLabels, UNKNOWN};

/// `source_cluster` and `destination_cluster`: one cluster, named as Istio names it.
pub const CLUSTER: &str = "Kubernetes";

/// `request_protocol` of a connection relayed as bytes.
pub const TCP: &str = "tcp";

const APP: [&str; 2] = ["app", "app.kubernetes.io/name"];
const VERSION: [&str; 2] = ["version", "app.kubernetes.io/version"];
const CANONICAL_NAME: [&str; 3] = [
    "service.istio.io/canonical-name",
    "app.kubernetes.io/name",
    "app",
];
const CANONICAL_REVISION: [&str; 3] = [
    "service.istio.io/canonical-revision",
    "app.kubernetes.io/version",
    "version",
];

/// What one label set is made of: who reports, both ends as far as they are known, and how
/// the connection or request ended. Borrowed: build it where the model is at hand.
#[derive(Clone, Copy, Debug)]
pub struct LabelInputs<'a> {
    /// `source`, `destination` (the agent) or `waypoint`.
    pub reporter: &'static str,
    pub src_pod: Option<&'a Pod>,
    pub src_identity: Option<&'a Identity>,
    pub dst_pod: Option<&'a Pod>,
    pub dst_identity: Option<&'a Identity>,
    /// The Service addressed; `None` for a pod addressed directly.
    pub service: Option<&'a Service>,
    /// Why it was refused or failed; `None`: `-`.
    pub flag: Option<ResponseFlag>,
    /// Whether the hop is mTLS (HBONE): `mutual_tls`, else `unknown`.
    pub mtls: bool,
}

// === impl LabelInputs ===

impl LabelInputs<'_> {
    /// The labels of a TCP connection (`request_protocol="tcp"`).
    pub fn build(&self) -> TcpLabels {
        self.build_for(TCP)
    }

    /// The labels with `request_protocol` = `protocol` (`http`, `grpc`, `tcp`).
    pub fn build_for(&self, protocol: &str) -> TcpLabels {
        let (src, dst, svc) = (self.src_pod, self.dst_pod, self.service);
        TcpLabels {
            reporter: self.reporter.to_string(),
            source_workload: or_unknown(src.map(workload_name)),
            source_workload_namespace: or_unknown(src.map(|p| p.namespace.clone())),
            source_principal: or_unknown(self.src_identity.map(Identity::uri)),
            source_app: first_label(src, &APP),
            source_version: first_label(src, &VERSION),
            source_canonical_service: first_label(src, &CANONICAL_NAME),
            source_canonical_revision: first_label(src, &CANONICAL_REVISION),
            source_cluster: CLUSTER.to_string(),
            destination_workload: or_unknown(dst.map(workload_name)),
            destination_workload_namespace: or_unknown(dst.map(|p| p.namespace.clone())),
            destination_principal: or_unknown(self.dst_identity.map(Identity::uri)),
            destination_app: first_label(dst, &APP),
            destination_version: first_label(dst, &VERSION),
            destination_service: or_unknown(svc.map(Service::hostname)),
            destination_service_name: or_unknown(svc.map(|s| s.name.clone())),
            destination_service_namespace: or_unknown(svc.map(|s| s.namespace.clone())),
            destination_canonical_service: first_label(dst, &CANONICAL_NAME),
            destination_canonical_revision: first_label(dst, &CANONICAL_REVISION),
            destination_cluster: CLUSTER.to_string(),
            request_protocol: protocol.to_string(),
            response_flags: self.flag.map_or("-", ResponseFlag::as_str).to_string(),
            connection_security_policy: if self.mtls { "mutual_tls" } else { UNKNOWN }.to_string(),
        }
    }
}

/// The `app` label, else the pod name.
fn workload_name(p: &Pod) -> String {
    p.labels
        .get("app")
        .cloned()
        .unwrap_or_else(|| p.name.clone())
}

/// The value of the first of `keys` the pod has.
fn first_label(p: Option<&Pod>, keys: &[&str]) -> String {
    or_unknown(p.and_then(|p| keys.iter().find_map(|k| p.labels.get(k)).cloned()))
}

fn or_unknown(value: Option<String>) -> String {
    value.unwrap_or_else(|| UNKNOWN.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str, namespace: &str, labels: &[(&str, &str)]) -> Pod {
        Pod {
            name: name.into(),
            namespace: namespace.into(),
            uid: None,
            service_account: "default".into(),
            node_name: None,
            ips: vec![],
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: Default::default(),
            host_network: false,
            container_ports: vec![],
            ready: true,
        }
    }

    fn service(name: &str, namespace: &str) -> Service {
        Service {
            name: name.into(),
            namespace: namespace.into(),
            labels: Default::default(),
            cluster_ips: vec![],
            ports: vec![],
            selector: None,
            load_balancer_ingress: vec![],
        }
    }

    /// Every label of `got` that differs from `want`, as `name: got != want`.
    fn diff(got: &TcpLabels, want: &[(&str, &str)]) -> Vec<String> {
        let mut expected = TcpLabels::default();
        for (k, v) in want {
            assert!(expected.set(k, v.to_string()), "no label {k}");
        }
        let (got, expected) = (format!("{got:#?}"), format!("{expected:#?}"));
        got.lines()
            .zip(expected.lines())
            .filter(|(g, e)| g != e)
            .map(|(g, e)| format!("{} != {}", g.trim(), e.trim()))
            .collect()
    }

    /// `inputs` built as `protocol` gives exactly `want`; every label not in `want` is
    /// `unknown`.
    fn check(case: &str, inputs: LabelInputs<'_>, protocol: &str, want: &[(&str, &str)]) {
        let differences = diff(&inputs.build_for(protocol), want);
        assert!(
            differences.is_empty(),
            "{case}:\n  {}",
            differences.join("\n  ")
        );
    }

    /// Labels every set has: the clusters and what the inputs say of the hop.
    const COMMON: [(&str, &str); 2] = [
        ("source_cluster", CLUSTER),
        ("destination_cluster", CLUSTER),
    ];

    fn with<'a>(extra: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
        COMMON.iter().chain(extra).copied().collect()
    }

    #[test]
    fn label_sets_from_the_model() {
        let sleep = pod("sleep-6d4f", "apps", &[("app", "sleep"), ("version", "v1")]);
        let canonical = pod(
            "reviews-v2-abc",
            "shop",
            &[
                ("app", "reviews"),
                ("version", "v2"),
                ("service.istio.io/canonical-name", "reviews-canonical"),
                ("service.istio.io/canonical-revision", "r2"),
            ],
        );
        let k8s_labels = pod(
            "ratings-0",
            "shop",
            &[
                ("app.kubernetes.io/name", "ratings"),
                ("app.kubernetes.io/version", "1.2"),
            ],
        );
        let bare = pod("bare", "shop", &[]);
        let reviews = service("reviews", "shop");
        let sleep_id = Identity::new("cluster.local", "apps", "sleep");
        let reviews_id = Identity::new("cluster.local", "shop", "reviews");
        let none = LabelInputs {
            reporter: "source",
            src_pod: None,
            src_identity: None,
            dst_pod: None,
            dst_identity: None,
            service: None,
            flag: None,
            mtls: false,
        };

        check(
            "nothing known: an unknown peer to an unknown destination",
            none,
            TCP,
            &with(&[
                ("reporter", "source"),
                ("request_protocol", "tcp"),
                ("response_flags", "-"),
            ]),
        );

        check(
            "a Service destination: canonical labels win over app/version, service labels set",
            LabelInputs {
                reporter: "source",
                src_pod: Some(&sleep),
                src_identity: Some(&sleep_id),
                dst_pod: Some(&canonical),
                dst_identity: Some(&reviews_id),
                service: Some(&reviews),
                mtls: true,
                ..none
            },
            TCP,
            &with(&[
                ("reporter", "source"),
                ("source_workload", "sleep"),
                ("source_workload_namespace", "apps"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/apps/sa/sleep",
                ),
                ("source_app", "sleep"),
                ("source_version", "v1"),
                ("source_canonical_service", "sleep"),
                ("source_canonical_revision", "v1"),
                ("destination_workload", "reviews"),
                ("destination_workload_namespace", "shop"),
                (
                    "destination_principal",
                    "spiffe://cluster.local/ns/shop/sa/reviews",
                ),
                ("destination_app", "reviews"),
                ("destination_version", "v2"),
                ("destination_service", "reviews.shop.svc.cluster.local"),
                ("destination_service_name", "reviews"),
                ("destination_service_namespace", "shop"),
                ("destination_canonical_service", "reviews-canonical"),
                ("destination_canonical_revision", "r2"),
                ("request_protocol", "tcp"),
                ("response_flags", "-"),
                ("connection_security_policy", "mutual_tls"),
            ]),
        );

        check(
            "a pod addressed directly (no Service), app.kubernetes.io labels, a refusal",
            LabelInputs {
                reporter: "destination",
                src_identity: Some(&sleep_id),
                dst_pod: Some(&k8s_labels),
                flag: Some(ResponseFlag::Deny),
                mtls: true,
                ..none
            },
            TCP,
            &with(&[
                ("reporter", "destination"),
                (
                    "source_principal",
                    "spiffe://cluster.local/ns/apps/sa/sleep",
                ),
                // No `app` label: the pod name is the workload.
                ("destination_workload", "ratings-0"),
                ("destination_workload_namespace", "shop"),
                ("destination_app", "ratings"),
                ("destination_version", "1.2"),
                ("destination_canonical_service", "ratings"),
                ("destination_canonical_revision", "1.2"),
                ("request_protocol", "tcp"),
                ("response_flags", ResponseFlag::Deny.as_str()),
                ("connection_security_policy", "mutual_tls"),
            ]),
        );

        check(
            "a pod without labels, seen by the waypoint over HTTP from a plaintext peer",
            LabelInputs {
                reporter: "waypoint",
                src_pod: Some(&bare),
                dst_pod: Some(&bare),
                service: Some(&reviews),
                ..none
            },
            "http",
            &with(&[
                ("reporter", "waypoint"),
                ("source_workload", "bare"),
                ("source_workload_namespace", "shop"),
                ("destination_workload", "bare"),
                ("destination_workload_namespace", "shop"),
                ("destination_service", "reviews.shop.svc.cluster.local"),
                ("destination_service_name", "reviews"),
                ("destination_service_namespace", "shop"),
                ("request_protocol", "http"),
                ("response_flags", "-"),
            ]),
        );
    }

    #[test]
    fn build_is_build_for_tcp() {
        let p = pod("p", "ns", &[("app", "a")]);
        let inputs = LabelInputs {
            reporter: "destination",
            src_pod: Some(&p),
            src_identity: None,
            dst_pod: None,
            dst_identity: None,
            service: None,
            flag: None,
            mtls: true,
        };
        assert_eq!(inputs.build(), inputs.build_for("tcp"));
    }
}
