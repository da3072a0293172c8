//! The node dashboard: `GET /dashboard` (one self-contained HTML page, no external assets) and
//! `GET /stats` (the JSON it polls), on the metrics port.
//!
//! Nothing here counts anything: [`stats`] is a pure function from what the agent already
//! keeps — the workload manager's pod status (with each pod's open-connection count), the
//! certificate cache and a [`Snapshot`] of the metrics registry — to the view model. Totals
//! are cumulative; the page turns two successive samples into rates (`time_ms` is when the
//! sample was taken).

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use mesh_pki::certs::CertExpiry;
use mesh_telemetry::{Snapshot, TcpSample, UNKNOWN};
use serde::Serialize;

use crate::config::Redirect;
use crate::workloads::PodStatus;
use mesh_kube::Rejection;

/// The page, served as is.
pub const PAGE: &str = include_str!("dashboard.html");

/// How many source → destination pairs the dashboard lists.
pub const TOP_TALKERS: usize = 10;

/// What the view is computed from (borrowed from the agent's state at one moment).
pub struct NodeState<'a> {
    pub node: &'a str,
    /// The redirection backend in use (resolved at startup, never `Auto`).
    pub backend: Redirect,
    pub ready: bool,
    pub pods: &'a [PodStatus],
    pub certs: &'a [CertExpiry],
    pub metrics: &'a Snapshot,
    /// Objects the API server watch refused (empty with a config directory).
    pub rejected_objects: &'a [Rejection],
    pub now: SystemTime,
}

/// The JSON behind the page (`GET /stats`).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Stats {
    pub node: String,
    /// `eBPF`, `nftables` or `none`.
    pub backend: &'static str,
    pub ready: bool,
    /// When the sample was taken, milliseconds since the epoch.
    pub time_ms: u64,
    pub pods: Vec<PodView>,
    /// Always `inbound` then `outbound`.
    pub directions: Vec<DirectionView>,
    pub workloads: Vec<WorkloadView>,
    pub refusals: Vec<RefusalView>,
    pub top_talkers: Vec<TalkerView>,
    pub certificates: Vec<CertView>,
    pub process: ProcessView,
    pub config: ConfigView,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PodView {
    /// `namespace/name`.
    pub name: String,
    /// SPIFFE ID; empty while pending.
    pub identity: String,
    pub ips: Vec<String>,
    /// `enrolled`, or `pending: <why>`.
    pub state: String,
    /// TCP connections open now on the pod's listeners (15001/15006/15008; a pooled HBONE
    /// connection counts once, whatever its streams); `None` while pending.
    pub open_connections: Option<usize>,
}

/// Cumulative counters of one direction (`inbound` = `reporter="destination"`, `outbound` =
/// `reporter="source"`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct DirectionView {
    pub direction: &'static str,
    /// Opened minus closed: connections open now.
    pub open: u64,
    pub opened: u64,
    pub closed: u64,
    pub refused: u64,
    /// Bytes to the client.
    pub sent_bytes: u64,
    /// Bytes from the client.
    pub received_bytes: u64,
}

/// One workload of this node in one direction (outbound: the source; inbound: the
/// destination). The workload is the `app` label, else the pod name, as in the metrics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WorkloadView {
    /// `namespace/workload`.
    pub workload: String,
    pub direction: &'static str,
    pub open: u64,
    pub opened: u64,
    pub sent_bytes: u64,
    pub received_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RefusalView {
    pub direction: String,
    /// The response flag (`DENY`, `TLS`, ...).
    pub reason: String,
    pub count: u64,
}

/// A source → destination pair, by identity where there is one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TalkerView {
    pub direction: &'static str,
    /// `trust-domain/ns/<ns>/sa/<sa>` (as policies write principals), else `ns/workload`.
    pub source: String,
    /// The same, else the destination service.
    pub destination: String,
    pub connections: u64,
    pub open: u64,
    pub bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CertView {
    pub identity: String,
    /// Seconds from now; negative once expired.
    pub expires_in_s: i64,
    pub renews_in_s: i64,
    pub renewal_failures: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ProcessView {
    pub rss_bytes: Option<u64>,
    pub cpu_seconds: Option<f64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub threads: Option<u64>,
    pub uptime_s: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConfigView {
    pub reloads: u64,
    /// `mesh_config_rejections_total`, all sources.
    pub rejections: u64,
    pub rejections_by_source: Vec<SourceCount>,
    /// Objects refused one by one (API server source), with the translator's error.
    pub rejected_objects: Vec<Rejection>,
    /// `mesh_policies_failed_closed`: refused policies enforced fail closed (deny all).
    pub failed_closed: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SourceCount {
    pub source: String,
    pub count: u64,
}

// === the view ===

/// The dashboard's view of the node at `s.now`.
pub fn stats(s: &NodeState<'_>) -> Stats {
    let tcp = &s.metrics.tcp;
    let mut inbound = DirectionView {
        direction: INBOUND,
        ..DirectionView::default()
    };
    let mut outbound = DirectionView {
        direction: OUTBOUND,
        ..DirectionView::default()
    };
    let mut workloads: BTreeMap<(String, &'static str), WorkloadView> = BTreeMap::new();
    let mut talkers: BTreeMap<(&'static str, String, String), TalkerView> = BTreeMap::new();
    for sample in tcp {
        let Some(direction) = direction(&sample.labels.reporter) else {
            continue;
        };
        let totals = if direction == INBOUND {
            &mut inbound
        } else {
            &mut outbound
        };
        let open = sample.opened.saturating_sub(sample.closed);
        totals.open = totals.open.saturating_add(open);
        totals.opened = totals.opened.saturating_add(sample.opened);
        totals.closed = totals.closed.saturating_add(sample.closed);
        totals.sent_bytes = totals.sent_bytes.saturating_add(sample.sent_bytes);
        totals.received_bytes = totals.received_bytes.saturating_add(sample.received_bytes);

        let workload = local_workload(sample, direction);
        let w = workloads
            .entry((workload.clone(), direction))
            .or_insert_with(|| WorkloadView {
                workload,
                direction,
                open: 0,
                opened: 0,
                sent_bytes: 0,
                received_bytes: 0,
            });
        w.open = w.open.saturating_add(open);
        w.opened = w.opened.saturating_add(sample.opened);
        w.sent_bytes = w.sent_bytes.saturating_add(sample.sent_bytes);
        w.received_bytes = w.received_bytes.saturating_add(sample.received_bytes);

        let (source, destination) = (source_name(sample), destination_name(sample));
        let t = talkers
            .entry((direction, source.clone(), destination.clone()))
            .or_insert_with(|| TalkerView {
                direction,
                source,
                destination,
                connections: 0,
                open: 0,
                bytes: 0,
            });
        t.connections = t.connections.saturating_add(sample.opened);
        t.open = t.open.saturating_add(open);
        t.bytes = t
            .bytes
            .saturating_add(sample.sent_bytes)
            .saturating_add(sample.received_bytes);
    }

    let mut refusals: Vec<RefusalView> = Vec::new();
    for r in &s.metrics.refused {
        let dir = direction(&r.reporter);
        match dir {
            Some(INBOUND) => inbound.refused = inbound.refused.saturating_add(r.count),
            Some(_) => outbound.refused = outbound.refused.saturating_add(r.count),
            None => {}
        }
        let direction = dir.map_or_else(|| r.reporter.clone(), str::to_string);
        match refusals
            .iter_mut()
            .find(|v| v.direction == direction && v.reason == r.reason)
        {
            Some(v) => v.count = v.count.saturating_add(r.count),
            None => refusals.push(RefusalView {
                direction,
                reason: r.reason.clone(),
                count: r.count,
            }),
        }
    }
    refusals.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| (&a.direction, &a.reason).cmp(&(&b.direction, &b.reason)))
    });

    let mut top_talkers: Vec<TalkerView> = talkers.into_values().collect();
    top_talkers.sort_by(|a, b| {
        (b.bytes, b.connections)
            .cmp(&(a.bytes, a.connections))
            .then_with(|| {
                (a.direction, &a.source, &a.destination).cmp(&(
                    b.direction,
                    &b.source,
                    &b.destination,
                ))
            })
    });
    top_talkers.truncate(TOP_TALKERS);

    let pods = s
        .pods
        .iter()
        .map(|p| PodView {
            name: p.pod.clone(),
            identity: p.identity.clone(),
            ips: p.ips.iter().map(ToString::to_string).collect(),
            state: p.state.clone(),
            open_connections: p.active.as_ref().map(|a| a.len()),
        })
        .collect();

    let certificates = s
        .certs
        .iter()
        .map(|c| CertView {
            identity: c.identity.uri(),
            expires_in_s: seconds_between(s.now, c.not_after),
            renews_in_s: seconds_between(s.now, c.next_renewal),
            renewal_failures: c.renewal_failures,
        })
        .collect();

    let p = &s.metrics.process;
    let now_s = s
        .now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let process = ProcessView {
        rss_bytes: p.rss_bytes,
        cpu_seconds: p.cpu_seconds,
        open_fds: p.open_fds,
        max_fds: p.max_fds,
        threads: p.threads,
        uptime_s: p
            .start_time_seconds
            .filter(|start| start.is_finite() && *start <= now_s)
            .map(|start| (now_s - start) as u64),
    };

    let rejections_by_source: Vec<SourceCount> = s
        .metrics
        .config_rejections
        .iter()
        .map(|(source, count)| SourceCount {
            source: source.clone(),
            count: *count,
        })
        .collect();
    let config = ConfigView {
        reloads: s.metrics.config_reloads,
        rejections: rejections_by_source
            .iter()
            .fold(0u64, |n, r| n.saturating_add(r.count)),
        rejections_by_source,
        rejected_objects: s.rejected_objects.to_vec(),
        failed_closed: s.metrics.failed_closed,
    };

    Stats {
        node: s.node.to_string(),
        backend: backend_name(s.backend),
        ready: s.ready,
        time_ms: s
            .now
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0),
        pods,
        directions: vec![inbound, outbound],
        workloads: workloads.into_values().collect(),
        refusals,
        top_talkers,
        certificates,
        process,
        config,
    }
}

const INBOUND: &str = "inbound";
const OUTBOUND: &str = "outbound";

/// The agent reports outbound connections as `source`, inbound as `destination`.
fn direction(reporter: &str) -> Option<&'static str> {
    match reporter {
        "destination" => Some(INBOUND),
        "source" => Some(OUTBOUND),
        _ => None,
    }
}

fn backend_name(r: Redirect) -> &'static str {
    match r {
        Redirect::Ebpf => "eBPF",
        Redirect::Nftables => "nftables",
        Redirect::None => "none",
        Redirect::Loopback => "loopback",
        Redirect::Auto => "auto",
    }
}

fn known(v: &str) -> Option<&str> {
    (!v.is_empty() && v != UNKNOWN).then_some(v)
}

fn join(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// This node's side of the connection: the source of outbound, the destination of inbound.
fn local_workload(s: &TcpSample, direction: &str) -> String {
    let l = &s.labels;
    if direction == OUTBOUND {
        join(&l.source_workload_namespace, &l.source_workload)
    } else {
        join(&l.destination_workload_namespace, &l.destination_workload)
    }
}

/// A principal as AuthorizationPolicy writes it (no `spiffe://`).
fn principal(uri: &str) -> Option<String> {
    known(uri).map(|u| u.strip_prefix("spiffe://").unwrap_or(u).to_string())
}

fn source_name(s: &TcpSample) -> String {
    let l = &s.labels;
    principal(&l.source_principal)
        .or_else(|| known(&l.source_workload).map(|w| join(&l.source_workload_namespace, w)))
        .unwrap_or_else(|| UNKNOWN.to_string())
}

fn destination_name(s: &TcpSample) -> String {
    let l = &s.labels;
    principal(&l.destination_principal)
        .or_else(|| known(&l.destination_service).map(str::to_string))
        .or_else(|| {
            known(&l.destination_workload).map(|w| join(&l.destination_workload_namespace, w))
        })
        .unwrap_or_else(|| UNKNOWN.to_string())
}

/// `to - from` in whole seconds, negative when `to` is earlier.
fn seconds_between(from: SystemTime, to: SystemTime) -> i64 {
    match to.duration_since(from) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => i64::try_from(e.duration().as_secs()).map_or(i64::MIN, |s| -s),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use mesh_model::identity::Identity;
    use mesh_telemetry::{ProcessSample, RefusedSample, TcpLabels};

    use super::*;
    use crate::proxy::ActiveConns;

    const T0: u64 = 1_700_000_000;

    fn now() -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(T0)
    }

    fn tcp(
        reporter: &str,
        src: (&str, &str),
        dst: (&str, &str),
        counts: [u64; 4],
        flags: &str,
    ) -> TcpSample {
        let id = |sa: &str| format!("spiffe://cluster.local/ns/default/sa/{sa}");
        TcpSample {
            labels: TcpLabels {
                reporter: reporter.into(),
                source_workload: src.0.into(),
                source_workload_namespace: "default".into(),
                source_principal: if src.1.is_empty() {
                    UNKNOWN.into()
                } else {
                    id(src.1)
                },
                destination_workload: dst.0.into(),
                destination_workload_namespace: "default".into(),
                destination_principal: if dst.1.is_empty() {
                    UNKNOWN.into()
                } else {
                    id(dst.1)
                },
                destination_service: "echo.default.svc.cluster.local".into(),
                response_flags: flags.into(),
                ..TcpLabels::default()
            },
            opened: counts[0],
            closed: counts[1],
            sent_bytes: counts[2],
            received_bytes: counts[3],
        }
    }

    fn pod(name: &str, state: &str, active: Option<Arc<ActiveConns>>) -> PodStatus {
        PodStatus {
            pod: name.into(),
            identity: if active.is_some() {
                "spiffe://cluster.local/ns/default/sa/client".into()
            } else {
                String::new()
            },
            ips: if active.is_some() {
                vec!["10.244.1.2".parse().expect("ip")]
            } else {
                vec![]
            },
            netns: "/var/run/netns/x".into(),
            state: state.into(),
            active,
        }
    }

    fn view(pods: &[PodStatus], certs: &[CertExpiry], metrics: &Snapshot) -> Stats {
        stats(&NodeState {
            node: "n1",
            backend: Redirect::Ebpf,
            ready: true,
            pods,
            certs,
            metrics,
            rejected_objects: &[],
            now: now(),
        })
    }

    /// The scenario every test starts from: client (n1) → echo on this node and elsewhere,
    /// a refused connection, a pod with two open connections, a pending pod.
    fn metrics() -> Snapshot {
        Snapshot {
            tcp: vec![
                // Outbound from client: 5 opened, 1 open, 1000 bytes.
                tcp(
                    "source",
                    ("client", "client"),
                    ("echo", "echo"),
                    [5, 4, 600, 400],
                    "-",
                ),
                // Outbound refused by the destination (counted as opened and closed).
                tcp(
                    "source",
                    ("client", "client"),
                    ("echo", "echo"),
                    [1, 1, 0, 0],
                    "UAEX",
                ),
                // Inbound to echo from web: 3 opened, all closed, 90 bytes.
                tcp(
                    "destination",
                    ("web", "web"),
                    ("echo", "echo"),
                    [3, 3, 60, 30],
                    "-",
                ),
                // Inbound plaintext from outside the mesh: no principal.
                tcp(
                    "destination",
                    ("legacy", ""),
                    ("echo", "echo"),
                    [2, 0, 5, 5],
                    "-",
                ),
                // A reporter the agent does not use is ignored.
                tcp("waypoint", ("x", "x"), ("y", "y"), [100, 0, 0, 0], "-"),
            ],
            refused: vec![
                RefusedSample {
                    reporter: "source".into(),
                    reason: "UAEX".into(),
                    count: 1,
                },
                RefusedSample {
                    reporter: "destination".into(),
                    reason: "DENY".into(),
                    count: 4,
                },
            ],
            config_rejections: vec![("local".into(), 2)],
            config_reloads: 3,
            failed_closed: 1,
            process: ProcessSample {
                rss_bytes: Some(12 << 20),
                cpu_seconds: Some(1.25),
                open_fds: Some(40),
                max_fds: Some(1024),
                threads: Some(3),
                start_time_seconds: Some((T0 - 60) as f64),
            },
        }
    }

    #[test]
    fn directions_add_up_the_counters_of_their_reporter() {
        let s = view(&[], &[], &metrics());
        assert_eq!(
            s.directions,
            vec![
                DirectionView {
                    direction: "inbound",
                    open: 2,
                    opened: 5,
                    closed: 3,
                    refused: 4,
                    sent_bytes: 65,
                    received_bytes: 35,
                },
                DirectionView {
                    direction: "outbound",
                    open: 1,
                    opened: 6,
                    closed: 5,
                    refused: 1,
                    sent_bytes: 600,
                    received_bytes: 400,
                },
            ]
        );
        assert_eq!(s.node, "n1");
        assert_eq!(s.backend, "eBPF");
        assert_eq!(s.time_ms, T0 * 1000);
    }

    #[test]
    fn workloads_are_this_nodes_side_of_each_connection() {
        let s = view(&[], &[], &metrics());
        let rows: Vec<(&str, &str, u64, u64)> = s
            .workloads
            .iter()
            .map(|w| (w.workload.as_str(), w.direction, w.opened, w.open))
            .collect();
        assert_eq!(
            rows,
            [
                ("default/client", "outbound", 6, 1),
                ("default/echo", "inbound", 5, 2),
            ]
        );
    }

    #[test]
    fn top_talkers_are_ranked_by_bytes_with_identities_as_principals() {
        let s = view(&[], &[], &metrics());
        let rows: Vec<(&str, &str, &str, u64, u64)> = s
            .top_talkers
            .iter()
            .map(|t| {
                (
                    t.direction,
                    t.source.as_str(),
                    t.destination.as_str(),
                    t.connections,
                    t.bytes,
                )
            })
            .collect();
        assert_eq!(
            rows,
            [
                (
                    "outbound",
                    "cluster.local/ns/default/sa/client",
                    "cluster.local/ns/default/sa/echo",
                    6,
                    1000
                ),
                (
                    "inbound",
                    "cluster.local/ns/default/sa/web",
                    "cluster.local/ns/default/sa/echo",
                    3,
                    90
                ),
                // No principal: the workload stands in.
                (
                    "inbound",
                    "default/legacy",
                    "cluster.local/ns/default/sa/echo",
                    2,
                    10
                ),
            ]
        );
    }

    #[test]
    fn top_talkers_are_capped() {
        let mut m = Snapshot::default();
        for i in 0..(TOP_TALKERS as u64 + 5) {
            let name = format!("c{i}");
            m.tcp.push(tcp(
                "source",
                (&name, &name),
                ("echo", "echo"),
                [1, 1, i, 0],
                "-",
            ));
        }
        let s = view(&[], &[], &m);
        assert_eq!(s.top_talkers.len(), TOP_TALKERS);
        assert_eq!(s.top_talkers[0].bytes, TOP_TALKERS as u64 + 4);
    }

    #[test]
    fn refusals_are_listed_by_direction_and_reason_most_first() {
        let s = view(&[], &[], &metrics());
        let rows: Vec<(&str, &str, u64)> = s
            .refusals
            .iter()
            .map(|r| (r.direction.as_str(), r.reason.as_str(), r.count))
            .collect();
        assert_eq!(rows, [("inbound", "DENY", 4), ("outbound", "UAEX", 1)]);
    }

    #[test]
    fn pods_show_identity_ips_state_and_open_connections() {
        let active = Arc::new(ActiveConns::default());
        let _a = active.enter();
        let _b = active.enter();
        let pods = [
            pod("default/client", "enrolled", Some(active.clone())),
            pod(
                "default/late",
                "pending: open /var/run/netns/late: not found",
                None,
            ),
        ];
        let s = view(&pods, &[], &Snapshot::default());
        assert_eq!(
            s.pods,
            vec![
                PodView {
                    name: "default/client".into(),
                    identity: "spiffe://cluster.local/ns/default/sa/client".into(),
                    ips: vec!["10.244.1.2".into()],
                    state: "enrolled".into(),
                    open_connections: Some(2),
                },
                PodView {
                    name: "default/late".into(),
                    identity: String::new(),
                    ips: vec![],
                    state: "pending: open /var/run/netns/late: not found".into(),
                    open_connections: None,
                },
            ]
        );
        // The netns path stays in /config_dump (admin, localhost), out of the metrics port.
        let json = serde_json::to_string(&s).expect("serialize");
        assert!(!json.contains("/var/run/netns/x"), "{json}");
    }

    #[test]
    fn certificates_count_down_to_expiry_and_renewal() {
        let certs = [
            CertExpiry {
                identity: Identity::new("cluster.local", "default", "client"),
                not_after: now() + Duration::from_secs(86_400),
                next_renewal: now() + Duration::from_secs(43_200),
                renewal_failures: 0,
            },
            CertExpiry {
                identity: Identity::new("cluster.local", "default", "old"),
                not_after: now() - Duration::from_secs(10),
                next_renewal: now() - Duration::from_secs(20),
                renewal_failures: 3,
            },
        ];
        let s = view(&[], &certs, &Snapshot::default());
        assert_eq!(
            s.certificates,
            vec![
                CertView {
                    identity: "spiffe://cluster.local/ns/default/sa/client".into(),
                    expires_in_s: 86_400,
                    renews_in_s: 43_200,
                    renewal_failures: 0,
                },
                CertView {
                    identity: "spiffe://cluster.local/ns/default/sa/old".into(),
                    expires_in_s: -10,
                    renews_in_s: -20,
                    renewal_failures: 3,
                },
            ]
        );
    }

    #[test]
    fn process_and_config_come_from_the_registry() {
        let s = view(&[], &[], &metrics());
        assert_eq!(
            s.process,
            ProcessView {
                rss_bytes: Some(12 << 20),
                cpu_seconds: Some(1.25),
                open_fds: Some(40),
                max_fds: Some(1024),
                threads: Some(3),
                uptime_s: Some(60),
            }
        );
        assert_eq!(s.config.reloads, 3);
        assert_eq!(s.config.rejections, 2);
        assert_eq!(s.config.failed_closed, 1);

        // A start time in the future (clock step) gives no uptime rather than a huge one.
        let mut m = metrics();
        m.process.start_time_seconds = Some((T0 + 60) as f64);
        assert_eq!(view(&[], &[], &m).process.uptime_s, None);
    }

    #[test]
    fn an_empty_node_has_both_directions_at_zero() {
        let s = view(&[], &[], &Snapshot::default());
        assert_eq!(s.directions.len(), 2);
        assert!(s.directions.iter().all(|d| d.opened == 0 && d.open == 0));
        assert!(s.pods.is_empty() && s.workloads.is_empty() && s.top_talkers.is_empty());
    }

    #[test]
    fn counters_that_disagree_never_underflow() {
        // A scrape can catch `closed` ahead of `opened` across two label sets' reads.
        let m = Snapshot {
            tcp: vec![tcp(
                "source",
                ("c", "c"),
                ("e", "e"),
                [1, 2, u64::MAX, u64::MAX],
                "-",
            )],
            ..Snapshot::default()
        };
        let s = view(&[], &[], &m);
        assert_eq!(s.directions[1].open, 0);
        assert_eq!(s.top_talkers[0].bytes, u64::MAX);
    }

    #[test]
    fn the_page_is_self_contained_and_polls_stats() {
        assert!(PAGE.starts_with("<!doctype html>"));
        assert!(PAGE.contains("fetch(\"/stats\""));
        for external in ["http://", "https://", "//cdn", "<link", "src=\""] {
            assert!(!PAGE.contains(external), "page references {external}");
        }
        // Data goes into the page as text, never as markup.
        assert!(!PAGE.contains("innerHTML"));
        assert!(PAGE.len() < 32 * 1024, "page is {} bytes", PAGE.len());
    }
}
