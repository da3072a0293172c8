//! Istio `DestinationRule` (`networking.istio.io/v1`) as the waypoint uses it: subsets,
//! load balancing, connection-pool limits, outlier detection and upstream `tls` for
//! traffic to one host.
//! Typed, validated data built by [`crate::k8s`]; [`Model::destination_rule_for`] finds the
//! rule that applies and [`DestinationRule::policy_for`] merges it for one (port, subset)
//! into an [`EffectivePolicy`] with every default filled in, the one value the waypoint's
//! balancer reads.
//!
//! Defaults are Istio's and Envoy's: unset connection-pool limits are unlimited (Istio sets
//! them to 2^32-1), except `maxRetries` whose default is Envoy's 3 outstanding retries; an
//! `outlierDetection` block with fields unset means `consecutive5xxErrors: 5`,
//! `interval: 10s`, `baseEjectionTime: 30s`, `maxEjectionPercent: 10` (at least one host
//! may still be ejected), `minHealthPercent: 0`; no `outlierDetection` means no ejection.
//!
//! `tls` ([`ClientTls`]) is held as written (file paths, names); the model reads no file.
//! Only `SIMPLE` and `MUTUAL` change what the waypoint does ([`EffectivePolicy::origination`]):
//! it originates TLS to the application (inside the HBONE tunnel for an endpoint in the
//! mesh, over TCP for one outside it). `ISTIO_MUTUAL` and `DISABLE` change nothing: in
//! ambient the tunnel to an endpoint in the mesh is always mTLS (HBONE), and an endpoint
//! outside the mesh has no mesh certificate to speak mTLS with, so it gets plain TCP.

use std::time::Duration;

use http::HeaderName;
use serde::Serialize;

use super::{Labels, Model, Service, ROOT_NAMESPACE};

/// Envoy's default `max_retries` circuit breaker: retries outstanding at once per cluster.
pub const DEFAULT_MAX_RETRIES: u32 = 3;
/// Outlier detection defaults (Istio's documented values).
pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
pub const DEFAULT_OUTLIER_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;
/// Envoy's `max_ejection_time`: the cap of `baseEjectionTime × times ejected`.
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// One `DestinationRule`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DestinationRule {
    pub name: String,
    pub namespace: String,
    /// `metadata.creationTimestamp` (RFC 3339, so it orders as a string).
    pub created: Option<String>,
    /// The host, fully qualified: a short name is `<name>.<rule namespace>.svc.cluster.local`.
    /// May start with `*.` (a wildcard).
    pub host: String,
    pub traffic_policy: TrafficPolicy,
    pub subsets: Vec<Subset>,
}

/// `trafficPolicy`: every part optional, so that a subset or port overrides only what it
/// sets.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTls>,
    pub port_level: Vec<PortTrafficPolicy>,
}

/// One `portLevelSettings` entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PortTrafficPolicy {
    /// `port.number`: a Service port.
    pub port: u16,
    pub load_balancer: Option<LoadBalancer>,
    pub connection_pool: Option<ConnectionPool>,
    pub outlier_detection: Option<OutlierDetection>,
    pub tls: Option<ClientTls>,
}

/// One `subsets` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Subset {
    pub name: String,
    /// Endpoints whose pod has all these labels belong to the subset.
    pub labels: Labels,
    pub traffic_policy: Option<TrafficPolicy>,
}

/// `loadBalancer`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub enum LoadBalancer {
    #[default]
    RoundRobin,
    /// Power of two random choices over requests in flight.
    LeastRequest,
    Random,
    ConsistentHash(HashKey),
}

/// What `consistentHash` hashes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum HashKey {
    Header(#[serde(serialize_with = "header_name")] HeaderName),
    /// `httpCookie`: with `ttl`, a request without the cookie gets one generated and set on
    /// the response (Envoy's behaviour).
    Cookie {
        name: String,
        path: Option<String>,
        ttl: Option<Duration>,
    },
    SourceIp,
    QueryParameter(String),
}

fn header_name<S: serde::Serializer>(h: &HeaderName, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(h.as_str())
}

/// `tls` (Istio's `ClientTLSSettings`): how the waypoint speaks to the endpoints.
/// Validated by [`crate::k8s`]: `MUTUAL` has a client certificate and key, file fields are
/// absolute paths and set only for `SIMPLE`/`MUTUAL`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct ClientTls {
    pub mode: TlsMode,
    /// The SNI sent (else the Service's host name).
    pub sni: Option<String>,
    /// The names the server certificate must carry one of (else the SNI name).
    pub subject_alt_names: Vec<String>,
    /// PEM file of the roots the server certificate must chain to.
    pub ca_certificates: Option<String>,
    /// PEM files of the client certificate (chain) and its key (`MUTUAL`).
    pub client_certificate: Option<String>,
    pub private_key: Option<String>,
    /// Accept any server certificate (chain and name unchecked).
    pub insecure_skip_verify: bool,
}

/// `tls.mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub enum TlsMode {
    /// Plain text to the application (HBONE still carries it for an endpoint in the mesh).
    #[default]
    Disable,
    /// TLS originated by the waypoint, server verified.
    Simple,
    /// [`TlsMode::Simple`] plus a client certificate.
    Mutual,
    /// The mesh's mTLS: HBONE, as without `tls`.
    IstioMutual,
}

impl ClientTls {
    /// Whether the waypoint originates TLS to the application (`SIMPLE`, `MUTUAL`).
    pub fn originates(&self) -> bool {
        matches!(self.mode, TlsMode::Simple | TlsMode::Mutual)
    }
}

/// `connectionPool`; `None` = not set (unlimited, or the default).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConnectionPool {
    /// `tcp.maxConnections`: upstream connections per endpoint.
    pub max_connections: Option<u32>,
    /// `tcp.connectTimeout`.
    pub connect_timeout: Option<Duration>,
    /// `http.http1MaxPendingRequests`: requests waiting for an HTTP/1.1 connection.
    pub http1_max_pending_requests: Option<u32>,
    /// `http.http2MaxRequests`: requests in flight to the cluster.
    pub http2_max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection` (0 = unlimited).
    pub max_requests_per_connection: Option<u32>,
    /// `http.maxRetries`: retries outstanding at once.
    pub max_retries: Option<u32>,
    /// `http.idleTimeout`.
    pub idle_timeout: Option<Duration>,
}

/// `outlierDetection` as written; see [`Ejection`] for the values in force.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    pub interval: Option<Duration>,
    pub base_ejection_time: Option<Duration>,
    pub max_ejection_percent: Option<u32>,
    pub min_health_percent: Option<u32>,
}

/// Outlier detection with the defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Ejection {
    /// 0 = this trigger is off.
    pub consecutive_5xx: u32,
    /// 0 = this trigger is off.
    pub consecutive_gateway: u32,
    pub interval: Duration,
    pub base_ejection_time: Duration,
    pub max_ejection_percent: u32,
    pub min_health_percent: u32,
}

impl OutlierDetection {
    pub fn resolve(&self) -> Ejection {
        Ejection {
            consecutive_5xx: self
                .consecutive_5xx_errors
                .unwrap_or(DEFAULT_CONSECUTIVE_5XX),
            consecutive_gateway: self.consecutive_gateway_errors.unwrap_or(0),
            interval: self.interval.unwrap_or(DEFAULT_OUTLIER_INTERVAL),
            base_ejection_time: self.base_ejection_time.unwrap_or(DEFAULT_BASE_EJECTION),
            max_ejection_percent: self
                .max_ejection_percent
                .unwrap_or(DEFAULT_MAX_EJECTION_PERCENT),
            min_health_percent: self.min_health_percent.unwrap_or(0),
        }
    }
}

/// What applies to one cluster (service, port, subset), every default filled in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct EffectivePolicy {
    pub load_balancer: LoadBalancer,
    pub connection_pool: ConnectionPool,
    /// `None`: no outlier detection.
    pub outlier: Option<Ejection>,
    /// `tls` as merged (`None`: not set, i.e. `DISABLE`).
    pub tls: Option<ClientTls>,
}

impl EffectivePolicy {
    /// The TLS the waypoint originates to the application, if any (`SIMPLE`, `MUTUAL`).
    pub fn origination(&self) -> Option<&ClientTls> {
        self.tls.as_ref().filter(|t| t.originates())
    }

    /// `maxRetries`, defaulted.
    pub fn max_retries(&self) -> u32 {
        self.connection_pool
            .max_retries
            .unwrap_or(DEFAULT_MAX_RETRIES)
    }
}

/// Why no policy could be found for a subset.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SubsetError {
    #[error("subset {subset:?} is not defined (no DestinationRule for {host} has it)")]
    Unknown { subset: String, host: String },
}

/// The four overridable parts, while merging.
#[derive(Clone, Default)]
struct Parts {
    load_balancer: Option<LoadBalancer>,
    connection_pool: Option<ConnectionPool>,
    outlier_detection: Option<OutlierDetection>,
    tls: Option<ClientTls>,
}

impl Parts {
    /// `policy` at `port`: a matching `portLevelSettings` entry replaces all four parts
    /// (port-level settings do not inherit, as Istio documents).
    fn of(policy: &TrafficPolicy, port: u16) -> Parts {
        match policy.port_level.iter().find(|p| p.port == port) {
            Some(p) => Parts {
                load_balancer: p.load_balancer.clone(),
                connection_pool: p.connection_pool.clone(),
                outlier_detection: p.outlier_detection.clone(),
                tls: p.tls.clone(),
            },
            None => Parts {
                load_balancer: policy.load_balancer.clone(),
                connection_pool: policy.connection_pool.clone(),
                outlier_detection: policy.outlier_detection.clone(),
                tls: policy.tls.clone(),
            },
        }
    }
}

// === impl DestinationRule ===

impl DestinationRule {
    pub fn subset(&self, name: &str) -> Option<&Subset> {
        self.subsets.iter().find(|s| s.name == name)
    }

    /// Whether this rule's host names `svc` (exactly, or by a `*.` wildcard).
    pub fn matches(&self, svc: &Service) -> bool {
        host_matches(&self.host, &svc.hostname())
    }

    /// The policy for `port` of the host and `subset`, merged as Istio's
    /// `MergeTrafficPolicy` does: the rule's port-level settings for the port (else its
    /// top-level policy), then each part the subset's policy sets, then the subset's own
    /// port-level settings for the port.
    pub fn policy_for(
        &self,
        port: u16,
        subset: Option<&str>,
    ) -> Result<EffectivePolicy, SubsetError> {
        let mut parts = Parts::of(&self.traffic_policy, port);
        if let Some(name) = subset {
            let s = self.subset(name).ok_or_else(|| SubsetError::Unknown {
                subset: name.to_string(),
                host: self.host.clone(),
            })?;
            if let Some(sp) = &s.traffic_policy {
                if let Some(lb) = &sp.load_balancer {
                    parts.load_balancer = Some(lb.clone());
                }
                if let Some(cp) = &sp.connection_pool {
                    parts.connection_pool = Some(cp.clone());
                }
                if let Some(od) = &sp.outlier_detection {
                    parts.outlier_detection = Some(od.clone());
                }
                if let Some(tls) = &sp.tls {
                    parts.tls = Some(tls.clone());
                }
                if sp.port_level.iter().any(|p| p.port == port) {
                    parts = Parts::of(sp, port);
                }
            }
        }
        Ok(EffectivePolicy {
            load_balancer: parts.load_balancer.unwrap_or_default(),
            connection_pool: parts.connection_pool.unwrap_or_default(),
            outlier: parts
                .outlier_detection
                .as_ref()
                .map(OutlierDetection::resolve),
            tls: parts.tls,
        })
    }
}

/// `pattern` (a host, or `*.suffix`) against a fully qualified `host`, case-insensitively.
fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix('*') {
        Some(suffix) => host
            .to_ascii_lowercase()
            .ends_with(&suffix.to_ascii_lowercase()),
        None => pattern.eq_ignore_ascii_case(host),
    }
}

/// The policy for (`svc`, `port`, `subset`) seen from `client_ns`: the rule's merged policy,
/// or the defaults (round robin, no limits) when no rule applies and no subset is asked for.
pub fn effective_policy(
    model: &Model,
    client_ns: &str,
    svc: &Service,
    port: u16,
    subset: Option<&str>,
) -> Result<EffectivePolicy, SubsetError> {
    effective_policy_for_host(
        model,
        client_ns,
        &svc.hostname(),
        &svc.namespace,
        port,
        subset,
    )
}

/// [`effective_policy`] for any host: a Service's, or a ServiceEntry host (`host_ns`: the
/// namespace that declares it), as egress through a waypoint needs (a rule with `host:
/// api.example.com` and `tls.mode: SIMPLE` originates TLS to the entry's endpoints).
pub fn effective_policy_for_host(
    model: &Model,
    client_ns: &str,
    host: &str,
    host_ns: &str,
    port: u16,
    subset: Option<&str>,
) -> Result<EffectivePolicy, SubsetError> {
    match (
        model.destination_rule_for_host(client_ns, host, host_ns),
        subset,
    ) {
        (Some(dr), subset) => dr.policy_for(port, subset),
        (None, None) => Ok(EffectivePolicy::default()),
        (None, Some(name)) => Err(SubsetError::Unknown {
            subset: name.to_string(),
            host: host.to_string(),
        }),
    }
}

impl Model {
    /// The DestinationRule for `svc` as a waypoint in `client_ns` sees it, in Istio's lookup
    /// order: a rule in `client_ns`, then in the Service's namespace, then in the root
    /// namespace. Within a namespace an exact host beats a wildcard; among equals the
    /// oldest rule wins, then the first by name ([`Model::destination_rules`] is kept in
    /// that order).
    pub fn destination_rule_for(&self, client_ns: &str, svc: &Service) -> Option<&DestinationRule> {
        self.destination_rule_for_host(client_ns, &svc.hostname(), &svc.namespace)
    }

    /// [`Model::destination_rule_for`] by host: a Service's fully qualified name, or a
    /// ServiceEntry host declared in `host_ns`.
    pub fn destination_rule_for_host(
        &self,
        client_ns: &str,
        host: &str,
        host_ns: &str,
    ) -> Option<&DestinationRule> {
        let index = &self.index.destination_rules;
        let rule = |position: u32| self.destination_rules.get(position as usize);
        for ns in [client_ns, host_ns, ROOT_NAMESPACE] {
            if let Some(dr) = index.exact(ns, host).and_then(rule) {
                return Some(dr);
            }
            let wildcard = index
                .wildcards(ns)
                .iter()
                .filter_map(|p| rule(*p))
                .find(|d| host_matches(&d.host, host));
            if wildcard.is_some() {
                return wildcard;
            }
        }
        None
    }

    /// The model with `rules`, oldest first (rules without a `creationTimestamp` last), then
    /// by namespace and name.
    pub fn with_destination_rules(mut self, mut rules: Vec<DestinationRule>) -> Self {
        rules.sort_by(|a, b| {
            (a.created.is_none(), &a.created, &a.namespace, &a.name).cmp(&(
                b.created.is_none(),
                &b.created,
                &b.namespace,
                &b.name,
            ))
        });
        self.index.destination_rules = super::index::DrByHost::build(&rules);
        self.destination_rules = rules;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(lb: LoadBalancer, max: u32) -> TrafficPolicy {
        TrafficPolicy {
            load_balancer: Some(lb),
            connection_pool: Some(ConnectionPool {
                http2_max_requests: Some(max),
                ..ConnectionPool::default()
            }),
            ..TrafficPolicy::default()
        }
    }

    fn rule() -> DestinationRule {
        let mut top = policy(LoadBalancer::Random, 10);
        top.outlier_detection = Some(OutlierDetection::default());
        top.port_level = vec![PortTrafficPolicy {
            port: 9090,
            load_balancer: Some(LoadBalancer::LeastRequest),
            ..PortTrafficPolicy::default()
        }];
        let mut v2 = policy(LoadBalancer::RoundRobin, 2);
        v2.connection_pool = None;
        v2.port_level = vec![PortTrafficPolicy {
            port: 8443,
            connection_pool: Some(ConnectionPool {
                max_connections: Some(1),
                ..ConnectionPool::default()
            }),
            ..PortTrafficPolicy::default()
        }];
        DestinationRule {
            name: "r".into(),
            namespace: "app".into(),
            created: None,
            host: "web.app.svc.cluster.local".into(),
            traffic_policy: top,
            subsets: vec![
                Subset {
                    name: "v1".into(),
                    labels: Labels::new(),
                    traffic_policy: None,
                },
                Subset {
                    name: "v2".into(),
                    labels: Labels::new(),
                    traffic_policy: Some(v2),
                },
            ],
        }
    }

    #[test]
    fn subsets_and_ports_override_part_by_part() {
        let r = rule();
        let summary = |port, subset| {
            r.policy_for(port, subset).map(|p| {
                (
                    p.load_balancer,
                    p.connection_pool.http2_max_requests,
                    p.connection_pool.max_connections,
                    p.outlier.is_some(),
                )
            })
        };
        use LoadBalancer::*;
        for (port, subset, want) in [
            (80, None, (Random, Some(10), None, true)),
            // Port level replaces all three parts: no pool limit, no outlier detection.
            (9090, None, (LeastRequest, None, None, false)),
            (80, Some("v1"), (Random, Some(10), None, true)),
            // The subset sets the balancer only: the pool and outlier detection stay.
            (80, Some("v2"), (RoundRobin, Some(10), None, true)),
            (9090, Some("v2"), (RoundRobin, None, None, false)),
            // The subset's port level replaces everything, unset parts are defaults.
            (8443, Some("v2"), (RoundRobin, None, Some(1), false)),
        ] {
            assert_eq!(summary(port, subset), Ok(want), "{port} {subset:?}");
        }
        assert!(matches!(
            r.policy_for(80, Some("v3")),
            Err(SubsetError::Unknown { .. })
        ));
    }

    #[test]
    fn outlier_detection_defaults_are_istios() {
        let e = OutlierDetection::default().resolve();
        assert_eq!(e.consecutive_5xx, 5);
        assert_eq!(e.consecutive_gateway, 0);
        assert_eq!(e.interval, Duration::from_secs(10));
        assert_eq!(e.base_ejection_time, Duration::from_secs(30));
        assert_eq!(e.max_ejection_percent, 10);
        assert_eq!(e.min_health_percent, 0);
        assert_eq!(EffectivePolicy::default().max_retries(), 3);
    }

    #[test]
    fn wildcard_hosts() {
        for (pattern, host, want) in [
            (
                "web.app.svc.cluster.local",
                "WEB.app.svc.cluster.local",
                true,
            ),
            ("*.app.svc.cluster.local", "web.app.svc.cluster.local", true),
            ("*.svc.cluster.local", "web.app.svc.cluster.local", true),
            (
                "*.other.svc.cluster.local",
                "web.app.svc.cluster.local",
                false,
            ),
            ("web.app", "web.app.svc.cluster.local", false),
        ] {
            assert_eq!(host_matches(pattern, host), want, "{pattern} {host}");
        }
    }
}
