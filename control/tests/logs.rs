//! What the CA writes to its log: refusals name the caller, the identity asked for and the
//! reason, and no line ever carries a token or a key (this file owns the process's log
//! subscriber, so it is a test binary of its own).
#![allow(clippy::unwrap_used)]

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use support::{id, Ca};

/// Every log line the process writes, kept for the test.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn refusals_are_logged_with_caller_and_identity_and_no_token_or_key_is_ever_logged() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("debug")
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .init();

    let ca = Ca::start(&[]).await;
    let ttl = Duration::from_secs(60);
    let agent = ca.token("istio-system", "ztunnel", Some("n1"));
    let waypoint = ca.token("demo", "waypoint", None);
    let wrong_audience = ca.token_file(&ca.mint("demo", "web", None, "kubernetes"));
    // Issued, refused by authorization, refused at authentication.
    ca.client(&agent)
        .fetch(&id("demo", "web"), true, ttl)
        .await
        .unwrap();
    assert!(ca
        .client(&agent)
        .fetch(&id("demo", "db"), true, ttl)
        .await
        .is_err());
    assert!(ca
        .client(&waypoint)
        .fetch(&id("demo", "web"), true, ttl)
        .await
        .is_err());
    assert!(ca
        .client(&wrong_audience)
        .fetch(&id("demo", "web"), false, ttl)
        .await
        .is_err());

    let log = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    let refused: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("certificate request refused"))
        .collect();
    assert_eq!(refused.len(), 3, "{log}");
    assert!(refused.iter().any(|l| l.contains("no_such_pod_on_node")
        && l.contains("istio-system/ztunnel @n1")
        && l.contains("spiffe://cluster.local/ns/demo/sa/db")));
    assert!(refused
        .iter()
        .any(|l| l.contains("not_a_node_agent") && l.contains("demo/waypoint")));
    assert!(refused.iter().any(|l| l.contains("token_audience")));
    assert!(log.contains("issued certificate"), "{log}");
    for token in [&agent, &waypoint, &wrong_audience] {
        let token = std::fs::read_to_string(token).unwrap();
        // Not the whole token, nor its signature or payload segment.
        for part in std::iter::once(token.as_str()).chain(token.split('.').skip(1)) {
            assert!(!log.contains(part), "a token reached the log");
        }
    }
    assert!(!log.contains("PRIVATE KEY"));
}
