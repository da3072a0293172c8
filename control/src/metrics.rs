//! The CA's metrics, in the same registry as the shell's (one scrape of `/metrics`).

use std::sync::Arc;

use mesh_telemetry::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;

/// Seconds: signing takes ~1 ms, a TokenReview a round trip to the API server.
const DURATION_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GrantLabels {
    /// `own` (the caller's identity) or `node` (a pod's, to its node's agent).
    pub grant: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `issued` or `refused`.
    pub result: &'static str,
}

/// `mesh_ca_*`.
#[derive(Clone)]
pub struct CaMetrics {
    pub issued: Family<GrantLabels, Counter>,
    pub refused: Family<ReasonLabels, Counter>,
    pub duration: Family<ResultLabels, Histogram, fn() -> Histogram>,
}

impl CaMetrics {
    /// The shell's metrics with the CA's registered beside them.
    pub fn new() -> (Arc<Metrics>, CaMetrics) {
        let ca = CaMetrics {
            issued: Family::default(),
            refused: Family::default(),
            duration: Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS)),
        };
        let metrics = Metrics::new_with(|r| {
            r.register(
                "mesh_ca_certificates_issued",
                "Certificates signed, by how the identity was granted",
                ca.issued.clone(),
            );
            r.register(
                "mesh_ca_requests_refused",
                "Certificate requests refused, by reason",
                ca.refused.clone(),
            );
            r.register(
                "mesh_ca_request_duration_seconds",
                "Time to answer a certificate request, by result",
                ca.duration.clone(),
            );
        });
        (metrics, ca)
    }
}
