//! `telemetry.istio.io` `Telemetry` as typed data, and the one decision a waypoint takes from
//! it: whether it writes an access-log line per request (and per relayed L4 connection).
//! Built by `k8s/telemetry.rs`.
//!
//! Resolution ([`Model::waypoint_access_log`]), Istio's precedence, most specific first:
//! 1. **workload**: a Telemetry in the waypoint's namespace whose `targetRefs` name its
//!    Gateway (`gateway.networking.k8s.io` `Gateway`), or whose `selector` matches the labels
//!    of one of its pods (the model's pods of the Gateway, and the
//!    `gateway.networking.k8s.io/gateway-name` label every waypoint pod carries);
//! 2. **namespace**: one in the waypoint's namespace without selector or targetRefs;
//! 3. **root**: one in [`ROOT_NAMESPACE`] without selector or targetRefs.
//!
//! Only Telemetries with `accessLogging` entries that apply to the waypoint count (an empty
//! list is "not configured here"); a waypoint is the server side of the requests it
//! receives, so entries of mode `CLIENT` do not apply to it. The first counting level
//! decides; within a level the first Telemetry by namespace and name. Its decision: the
//! providers named by entries that are not `disabled`, minus those named by `disabled`
//! entries (a `disabled` entry without providers turns off all); logging is on when a
//! provider is left. Any provider name means "log" (`envoy`, Istio's built-in one, and any
//! extension provider: this waypoint has one log, its stderr). An entry without providers
//! means the mesh's default providers, and this data plane's mesh default is none (Istio's
//! stock `defaultProviders` is empty too). Nothing configured: **off**.

use serde::Serialize;

use super::{selector_matches, Labels, Model, NamespacedName, TargetRef};
use super::{GATEWAY_NAME_LABEL, ROOT_NAMESPACE};

/// A `Telemetry` resource: where it applies and its access-logging entries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Telemetry {
    pub name: String,
    pub namespace: String,
    /// `spec.selector.matchLabels` (`None`: absent or empty).
    pub selector: Option<Labels>,
    pub target_refs: Vec<TargetRef>,
    pub access_logging: Vec<AccessLogging>,
}

/// One `spec.accessLogging` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AccessLogging {
    /// `providers[].name`; empty: the mesh's default providers (none here).
    pub providers: Vec<String>,
    pub disabled: bool,
    pub mode: WorkloadMode,
}

/// `match.mode`: which side of a request an entry configures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum WorkloadMode {
    Client,
    Server,
    ClientAndServer,
}

impl WorkloadMode {
    fn server(self) -> bool {
        self != WorkloadMode::Client
    }
}

/// How specific the Telemetry that decided is.
/// Ordered most specific first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum TelemetryLevel {
    Workload,
    Namespace,
    Root,
}

/// Whether a waypoint writes access-log lines, and which Telemetry said so (`/config_dump`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct AccessLogDecision {
    pub enabled: bool,
    /// `None`: no Telemetry configures access logging for the waypoint (default: off).
    pub telemetry: Option<NamespacedName>,
    pub level: Option<TelemetryLevel>,
    /// The providers left on (sorted, deduplicated).
    pub providers: Vec<String>,
}

impl Telemetry {
    fn key(&self) -> NamespacedName {
        NamespacedName::new(&self.namespace, &self.name)
    }

    /// The providers it leaves on for a server-side proxy; `None` when none of its entries
    /// applies there (not configured at this level).
    fn server_providers(&self) -> Option<Vec<String>> {
        let entries: Vec<&AccessLogging> = self
            .access_logging
            .iter()
            .filter(|e| e.mode.server())
            .collect();
        if entries.is_empty() {
            return None;
        }
        if entries.iter().any(|e| e.disabled && e.providers.is_empty()) {
            return Some(Vec::new());
        }
        let mut on: Vec<String> = entries
            .iter()
            .filter(|e| !e.disabled)
            .flat_map(|e| e.providers.iter().cloned())
            .filter(|p| {
                !entries
                    .iter()
                    .any(|e| e.disabled && e.providers.contains(p))
            })
            .collect();
        on.sort();
        on.dedup();
        Some(on)
    }

    fn unscoped(&self) -> bool {
        self.selector.is_none() && self.target_refs.is_empty()
    }
}

impl Model {
    /// Whether the waypoint implementing Gateway `gateway` writes access-log lines (see the
    /// module docs). Scans the Telemetries: call once per model, not per request.
    pub fn waypoint_access_log(&self, gateway: &NamespacedName) -> AccessLogDecision {
        let own_label = Labels::from_iter([(GATEWAY_NAME_LABEL.to_string(), gateway.name.clone())]);
        let pods: Vec<&Labels> = match self.gateways.get(gateway) {
            Some(gw) => self.waypoint_pods(gw).map(|p| &p.labels).collect(),
            None => Vec::new(),
        };
        let targets = |t: &Telemetry| {
            t.target_refs.iter().any(|r| {
                r.group == "gateway.networking.k8s.io"
                    && r.kind == "Gateway"
                    && r.name == gateway.name
            })
        };
        let selects = |t: &Telemetry| {
            t.selector.as_ref().is_some_and(|s| {
                selector_matches(s, &own_label) || pods.iter().any(|l| selector_matches(s, l))
            })
        };
        let level = |t: &Telemetry| {
            if t.namespace == gateway.namespace {
                if targets(t) || selects(t) {
                    return Some(TelemetryLevel::Workload);
                }
                if t.unscoped() {
                    return Some(TelemetryLevel::Namespace);
                }
            } else if t.namespace == ROOT_NAMESPACE && t.unscoped() {
                return Some(TelemetryLevel::Root);
            }
            None
        };
        // The most specific level wins; within one, the first in (namespace, name) order.
        let mut best: Option<(TelemetryLevel, &Telemetry, Vec<String>)> = None;
        for t in &self.telemetries {
            let Some(l) = level(t) else { continue };
            if best.as_ref().is_some_and(|(b, _, _)| *b <= l) {
                continue;
            }
            if let Some(providers) = t.server_providers() {
                best = Some((l, t, providers));
            }
        }
        if let Some((level, t, providers)) = best {
            return AccessLogDecision {
                enabled: !providers.is_empty(),
                telemetry: Some(t.key()),
                level: Some(level),
                providers,
            };
        }
        AccessLogDecision::default()
    }
}
