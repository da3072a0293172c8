//! Balancer decisions with a seeded random source and an explicit clock.

use std::collections::BTreeMap;

use http::HeaderValue;
use mesh_model::model::{ConnectionPool, Labels, OutlierDetection, Pod};
use rand::rngs::StdRng;
use rand::SeedableRng;

use super::*;

fn endpoint(name: &str, ip: &str, version: &str) -> Endpoint {
    let labels: Labels = [("app", "web"), ("version", version)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let ip: IpAddr = ip.parse().expect("ip");
    Endpoint {
        pod: Some(std::sync::Arc::new(Pod {
            name: name.to_string(),
            namespace: "shop".to_string(),
            uid: None,
            service_account: "default".to_string(),
            node_name: None,
            ips: vec![ip],
            labels,
            annotations: Labels::new(),
            host_network: false,
            container_ports: Vec::new(),
            ready: true,
        })),
        addr: SocketAddr::new(ip, 8080),
        identity: None,
        via: None,
    }
}

fn three() -> Vec<Endpoint> {
    vec![
        endpoint("v1", "10.0.0.1", "v1"),
        endpoint("v2", "10.0.0.2", "v2"),
        endpoint("v3", "10.0.0.3", "v3"),
    ]
}

fn key() -> ClusterKey {
    ClusterKey {
        service: NamespacedName::new("shop", "web"),
        port: 80,
        subset: None,
    }
}

fn cluster(policy: EffectivePolicy) -> Arc<Cluster> {
    Clusters::default().cluster(&key(), &policy)
}

fn lb(lb: LoadBalancer) -> EffectivePolicy {
    EffectivePolicy {
        load_balancer: lb,
        ..EffectivePolicy::default()
    }
}

fn outlier(consecutive_5xx: u32, gateway: u32, max_percent: u32) -> EffectivePolicy {
    EffectivePolicy {
        outlier: Some(
            OutlierDetection {
                consecutive_5xx_errors: Some(consecutive_5xx),
                consecutive_gateway_errors: Some(gateway),
                max_ejection_percent: Some(max_percent),
                ..OutlierDetection::default()
            }
            .resolve(),
        ),
        ..EffectivePolicy::default()
    }
}

/// Names of the endpoints `n` attempts pick (each attempt's guard dropped at once unless
/// `hold`).
fn picks(
    c: &Cluster,
    eps: &[Endpoint],
    hash: Option<u64>,
    n: usize,
    now: Instant,
    rng: &mut StdRng,
) -> Vec<String> {
    (0..n)
        .map(|_| {
            let chosen = c.choose(eps, hash, &[], now, rng).expect("endpoint");
            eps[chosen.index].name()
        })
        .collect()
}

fn counts(names: &[String]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for n in names {
        *m.entry(n.clone()).or_default() += 1;
    }
    m
}

#[test]
fn round_robin_cycles_and_skips_tried_endpoints() {
    let c = cluster(EffectivePolicy::default());
    let eps = three();
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(1);
    assert_eq!(
        picks(&c, &eps, None, 6, now, &mut rng),
        ["v1", "v2", "v3", "v1", "v2", "v3"]
    );
    let tried = [eps[0].addr, eps[1].addr];
    let chosen = c.choose(&eps, None, &tried, now, &mut rng).expect("v3");
    assert_eq!(chosen.index, 2);
    let all = [eps[0].addr, eps[1].addr, eps[2].addr];
    assert_eq!(
        c.choose(&eps, None, &all, now, &mut rng).err(),
        Some(NoEndpoint::AllTried)
    );
    assert_eq!(
        c.choose(&[], None, &[], now, &mut rng).err(),
        Some(NoEndpoint::Empty)
    );
}

#[test]
fn random_spreads_over_every_endpoint() {
    let c = cluster(lb(LoadBalancer::Random));
    let mut rng = StdRng::seed_from_u64(7);
    let got = counts(&picks(&c, &three(), None, 300, Instant::now(), &mut rng));
    assert_eq!(got.len(), 3, "{got:?}");
    assert!(got.values().all(|n| *n > 60), "{got:?}");
}

#[test]
fn least_request_prefers_idle_endpoints() {
    let c = cluster(lb(LoadBalancer::LeastRequest));
    let eps = three();
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(3);
    // v1 and v2 busy with 5 requests each: with two random choices, v3 wins every pair it
    // is in, and the pair (v1, v2) never reaches it.
    let mut held = Vec::new();
    for i in [0usize, 1] {
        for _ in 0..5 {
            let tried: Vec<SocketAddr> = eps
                .iter()
                .filter(|e| e.addr != eps[i].addr)
                .map(|e| e.addr)
                .collect();
            held.push(c.choose(&eps, None, &tried, now, &mut rng).expect("held"));
        }
    }
    let got = counts(&picks(&c, &eps, None, 300, now, &mut rng));
    let v3 = got.get("v3").copied().unwrap_or(0);
    // P(v3 in a random pair of 3) = 2/3.
    assert!((170..=230).contains(&v3), "{got:?}");
    drop(held);
    // All idle again: spread over all three.
    let got = counts(&picks(&c, &eps, None, 300, now, &mut rng));
    assert_eq!(got.len(), 3, "{got:?}");
}

#[test]
fn consistent_hash_keeps_keys_and_moves_few_when_endpoints_change() {
    let c = cluster(lb(LoadBalancer::ConsistentHash(HashKey::SourceIp)));
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(0);
    let mut eps = three();
    eps.push(endpoint("v4", "10.0.0.4", "v4"));
    let place = |eps: &[Endpoint], rng: &mut StdRng| -> Vec<String> {
        (0..200u64)
            .map(|k| {
                let h = hash_bytes(format!("user-{k}").as_bytes());
                let chosen = c.choose(eps, Some(h), &[], now, rng).expect("ep");
                eps[chosen.index].name()
            })
            .collect()
    };
    let before = place(&eps, &mut rng);
    assert_eq!(before, place(&eps, &mut rng), "stable");
    assert_eq!(counts(&before).len(), 4, "{:?}", counts(&before));
    // Remove v4: only the keys it held move.
    let fewer: Vec<Endpoint> = eps[..3].to_vec();
    let after = place(&fewer, &mut rng);
    for (b, a) in before.iter().zip(&after) {
        if b != "v4" {
            assert_eq!(a, b);
        }
    }
    // Add v5: keys move only to v5.
    let mut more = eps.clone();
    more.push(endpoint("v5", "10.0.0.5", "v5"));
    let after = place(&more, &mut rng);
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    assert!(before.iter().zip(&after).all(|(b, a)| a == b || a == "v5"));
    assert!((10..=80).contains(&moved), "moved {moved} of 200");
    // No key: round robin.
    assert_eq!(
        picks(&c, &fewer, None, 3, now, &mut rng),
        ["v1", "v2", "v3"]
    );
}

#[test]
fn hash_keys_come_from_the_request() {
    let mut h = HeaderMap::new();
    h.insert("x-user", HeaderValue::from_static("alice"));
    h.insert(
        header::COOKIE,
        HeaderValue::from_static("a=1; session=\"abc\""),
    );
    let ip: IpAddr = "10.1.0.1".parse().expect("ip");
    let hk = |k: HashKey, h: &HeaderMap, q: Option<&str>| {
        hash_key(&LoadBalancer::ConsistentHash(k), h, q, ip, || {
            "gen".to_string()
        })
    };
    let header = HashKey::Header(http::HeaderName::from_static("x-user"));
    assert_eq!(hk(header.clone(), &h, None).key, Some(hash_bytes(b"alice")));
    assert_eq!(hk(header, &HeaderMap::new(), None).key, None);
    assert_eq!(
        hk(HashKey::SourceIp, &h, None).key,
        Some(hash_bytes(b"10.1.0.1"))
    );
    let q = HashKey::QueryParameter("user".into());
    assert_eq!(
        hk(q.clone(), &h, Some("a=1&user=bob")).key,
        Some(hash_bytes(b"bob"))
    );
    assert_eq!(hk(q, &h, Some("users=bob")).key, None);
    let cookie = |ttl| HashKey::Cookie {
        name: "session".into(),
        path: Some("/".into()),
        ttl,
    };
    let present = hk(cookie(Some(Duration::from_secs(60))), &h, None);
    assert_eq!(present.key, Some(hash_bytes(b"abc")));
    assert_eq!(present.set_cookie, None);
    // Absent with a ttl: generated and set, hashed by the generated value.
    let generated = hk(
        cookie(Some(Duration::from_secs(60))),
        &HeaderMap::new(),
        None,
    );
    assert_eq!(generated.key, Some(hash_bytes(b"gen")));
    assert_eq!(
        generated.set_cookie.as_deref(),
        Some("session=\"gen\"; Max-Age=60; Path=/; HttpOnly")
    );
    // Absent without a ttl: no key.
    assert_eq!(hk(cookie(None), &HeaderMap::new(), None).key, None);
    assert_eq!(
        hash_key(&LoadBalancer::Random, &h, None, ip, String::new).key,
        None
    );
}

#[test]
fn consecutive_errors_eject_until_the_time_ends() {
    let c = cluster(outlier(3, 0, 100));
    let eps = three();
    let t0 = Instant::now();
    let mut rng = StdRng::seed_from_u64(0);
    let v2 = eps[1].addr;
    // 2 failures, a success (resets), then 3 in a row: ejected at the third.
    for (outcome, ejects) in [
        (Outcome::Status(503), false),
        (Outcome::ConnectFailure, false),
        (Outcome::Status(200), false),
        (Outcome::Status(500), false),
        (Outcome::Reset, false),
        (Outcome::Timeout, true),
    ] {
        let e = c.report(v2, outcome, eps.len(), t0);
        assert_eq!(e.is_some(), ejects, "{outcome:?}");
    }
    assert!(c.is_ejected(v2, t0));
    let names = picks(&c, &eps, None, 30, t0, &mut rng);
    assert!(!names.contains(&"v2".to_string()), "{names:?}");
    // Consistent hash skips it too.
    let ch = Clusters::default().cluster(&key(), &{
        let mut p = outlier(1, 0, 100);
        p.load_balancer = LoadBalancer::ConsistentHash(HashKey::SourceIp);
        p
    });
    let hashed = |ch: &Cluster, rng: &mut StdRng| -> Vec<String> {
        (0..60u64)
            .map(|k| {
                let chosen = ch.choose(&eps, Some(hash_bytes(&k.to_be_bytes())), &[], t0, rng);
                eps[chosen.expect("ep").index].name()
            })
            .collect()
    };
    assert!(hashed(&ch, &mut rng).contains(&"v2".to_string()));
    ch.report(v2, Outcome::Status(503), 3, t0);
    assert!(!hashed(&ch, &mut rng).contains(&"v2".to_string()));
    // baseEjectionTime 30 s: back after it.
    let t1 = t0 + Duration::from_secs(30);
    assert!(!c.is_ejected(v2, t1));
    assert!(picks(&c, &eps, None, 3, t1, &mut rng).contains(&"v2".to_string()));
    // Ejected again right away: twice as long.
    for _ in 0..3 {
        c.report(v2, Outcome::Status(503), eps.len(), t1);
    }
    assert!(c.is_ejected(v2, t1 + Duration::from_secs(59)));
    assert!(!c.is_ejected(v2, t1 + Duration::from_secs(60)));
}

#[test]
fn ejection_time_grows_and_is_capped() {
    let o = OutlierDetection::default().resolve();
    for (times, secs) in [(1, 30), (2, 60), (10, 300), (100, 300)] {
        assert_eq!(
            ejection_time(&o, times),
            Duration::from_secs(secs),
            "{times}"
        );
    }
    let long = OutlierDetection {
        base_ejection_time: Some(Duration::from_secs(600)),
        ..OutlierDetection::default()
    }
    .resolve();
    assert_eq!(ejection_time(&long, 3), Duration::from_secs(600));
}

#[test]
fn gateway_errors_count_only_502_to_504() {
    let c = cluster(outlier(0, 2, 100));
    let ep = three()[0].addr;
    let now = Instant::now();
    assert!(c.report(ep, Outcome::Status(502), 3, now).is_none());
    assert!(
        c.report(ep, Outcome::Status(500), 3, now).is_none(),
        "500 resets"
    );
    assert!(c.report(ep, Outcome::Status(504), 3, now).is_none());
    let e = c
        .report(ep, Outcome::ConnectFailure, 3, now)
        .expect("ejected");
    assert_eq!(e.reason, "consecutive_gateway_errors");
    // No outlier detection: never ejects.
    let plain = cluster(EffectivePolicy::default());
    for _ in 0..10 {
        assert!(plain.report(ep, Outcome::Status(503), 3, now).is_none());
    }
}

#[test]
fn max_ejection_percent_allows_at_least_one() {
    let eps = three();
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(0);
    for (percent, want_ejected) in [(10, 1), (50, 1), (67, 2), (100, 3), (0, 0)] {
        let c = cluster(outlier(1, 0, percent));
        for ep in &eps {
            c.report(ep.addr, Outcome::Status(503), eps.len(), now);
        }
        let ejected = eps.iter().filter(|e| c.is_ejected(e.addr, now)).count();
        assert_eq!(ejected, want_ejected, "{percent}%");
        let chosen = c.choose(&eps, None, &[], now, &mut rng);
        if want_ejected == 3 {
            assert_eq!(chosen.err(), Some(NoEndpoint::AllEjected));
        } else {
            assert!(chosen.is_ok());
        }
    }
}

#[test]
fn min_health_percent_ignores_ejections_below_it() {
    let mut p = outlier(1, 0, 100);
    if let Some(o) = p.outlier.as_mut() {
        o.min_health_percent = 50;
    }
    let c = cluster(p);
    let eps = three();
    let now = Instant::now();
    let mut rng = StdRng::seed_from_u64(0);
    c.report(eps[0].addr, Outcome::Status(503), 3, now);
    // 2 of 3 healthy (67% ≥ 50%): v1 skipped.
    assert!(!picks(&c, &eps, None, 6, now, &mut rng).contains(&"v1".to_string()));
    c.report(eps[1].addr, Outcome::Status(503), 3, now);
    // 1 of 3 healthy (33% < 50%): panic mode, every endpoint used.
    assert_eq!(counts(&picks(&c, &eps, None, 6, now, &mut rng)).len(), 3);
}

#[test]
fn request_and_retry_slots_are_bounded() {
    let c = cluster(EffectivePolicy {
        connection_pool: ConnectionPool {
            http2_max_requests: Some(2),
            max_retries: Some(1),
            ..ConnectionPool::default()
        },
        ..EffectivePolicy::default()
    });
    let a = c.admit().expect("first");
    let _b = c.admit().expect("second");
    let e = c.admit().expect_err("third overflows");
    assert_eq!(e.max, 2);
    assert!(e
        .to_string()
        .contains("outbound|80||web.shop.svc.cluster.local"));
    drop(a);
    assert!(c.admit().is_ok(), "a slot came back");
    let r = c.try_retry().expect("one retry");
    assert!(c.try_retry().is_none());
    drop(r);
    assert!(c.try_retry().is_some());
    // Unset: Envoy's default of 3 outstanding retries; requests unlimited.
    let d = cluster(EffectivePolicy::default());
    let held: Vec<RetryGuard> = (0..3).filter_map(|_| d.try_retry()).collect();
    assert_eq!(held.len(), 3);
    assert!(d.try_retry().is_none());
    let many: Vec<RequestGuard> = (0..1000).filter_map(|_| d.admit().ok()).collect();
    assert_eq!(many.len(), 1000);
}

#[test]
fn state_survives_a_policy_update() {
    let clusters = Clusters::default();
    let c = clusters.cluster(&key(), &outlier(1, 0, 100));
    let ep = three()[0].addr;
    let now = Instant::now();
    c.report(ep, Outcome::Status(503), 3, now);
    // The model changes (another balancer): the same cluster, still ejected.
    let again = clusters.cluster(&key(), &{
        let mut p = outlier(1, 0, 100);
        p.load_balancer = LoadBalancer::Random;
        p
    });
    assert!(Arc::ptr_eq(&c, &again));
    assert!(again.is_ejected(ep, now));
    assert_eq!(again.policy().load_balancer, LoadBalancer::Random);
}

#[test]
fn subsets_filter_endpoints_by_pod_labels() {
    let names = |labels: Option<&Labels>| -> Vec<String> {
        subset_endpoints(three(), labels)
            .into_iter()
            .map(|e| e.name())
            .collect()
    };
    let v2: Labels = [("version".to_string(), "v2".to_string())].into();
    let none: Labels = [("version".to_string(), "v9".to_string())].into();
    assert_eq!(names(None), ["v1", "v2", "v3"]);
    assert_eq!(names(Some(&v2)), ["v2"]);
    assert!(names(Some(&none)).is_empty());
    assert_eq!(names(Some(&Labels::new())).len(), 3);
}

#[test]
fn cluster_names_are_envoys() {
    let mut k = key();
    assert_eq!(k.name(), "outbound|80||web.shop.svc.cluster.local");
    k.subset = Some("v1".into());
    assert_eq!(k.name(), "outbound|80|v1|web.shop.svc.cluster.local");
}
