//! `podns`: a pod's network namespace is found by its IP among the namespaces of running
//! processes, as the agent does in a cluster (hostPID). Needs root: creates namespaces.

mod support;

use std::net::IpAddr;
use std::sync::Arc;

use anyhow::Result;
use support::netns::{prefix, require_root, test_ip, TestNetns};
use ztunnel::netns::Netns;
use ztunnel::podns::{ns_id, PodNetnsFinder, PodNsError};

fn finder() -> Result<PodNetnsFinder> {
    let home = Arc::new(Netns::current()?);
    Ok(PodNetnsFinder::new(home)?)
}

#[test]
fn a_pod_ip_leads_to_the_namespace_of_the_process_that_has_it() -> Result<()> {
    require_root()?;
    let prefix = prefix();
    let (ip_a, ip_b) = (test_ip(11), test_ip(12));
    let mut a = TestNetns::new(&prefix, "pod-a")?;
    a.add_address(ip_a)?;
    let pid_a = a.spawn_sleeper()?;
    let mut b = TestNetns::new(&prefix, "pod-b")?;
    b.add_address(ip_b)?;
    let pid_b = b.spawn_sleeper()?;
    let finder = finder()?;

    // The first lookup scans every process's namespace.
    let found = finder.find(IpAddr::V4(ip_a))?;
    assert_eq!(found.id, ns_id(&a.path())?, "pod a's namespace");
    assert_eq!(found.pid, pid_a);
    assert!(!found.cached);
    assert_eq!(
        found.netns.path(),
        std::path::Path::new(&format!("/proc/{pid_a}/ns/net"))
    );

    // That scan saw pod b too: its lookup is answered from the cache, after checking it.
    let found = finder.find(IpAddr::V4(ip_b))?;
    assert_eq!(found.id, ns_id(&b.path())?, "pod b's namespace");
    assert_eq!(found.pid, pid_b);
    assert!(found.cached, "the first scan recorded pod b");

    // An IP no namespace has.
    let missing = IpAddr::V4(test_ip(13));
    match finder.find(missing) {
        Err(PodNsError::NotFound { ip, scanned }) => {
            assert_eq!(ip, missing);
            assert!(scanned >= 2, "scanned {scanned} namespaces");
        }
        other => panic!("expected NotFound, got {other:?}"),
    }
    Ok(())
}

#[test]
fn a_stale_cache_entry_is_checked_and_replaced_by_a_new_scan() -> Result<()> {
    require_root()?;
    let prefix = prefix();
    let ip = test_ip(21);
    let mut old = TestNetns::new(&prefix, "old")?;
    old.add_address(ip)?;
    old.spawn_sleeper()?;
    let finder = finder()?;
    let first = finder.find(IpAddr::V4(ip))?;
    assert_eq!(first.id, ns_id(&old.path())?);
    drop(first);

    // The pod is gone and its IP reused by a new pod: the cached pid no longer exists.
    drop(old);
    let mut new = TestNetns::new(&prefix, "new")?;
    new.add_address(ip)?;
    let pid = new.spawn_sleeper()?;
    let found = finder.find(IpAddr::V4(ip))?;
    assert_eq!(found.id, ns_id(&new.path())?, "the new pod's namespace");
    assert_eq!(found.pid, pid);
    assert!(!found.cached, "the stale entry must not be used");
    Ok(())
}

#[test]
fn a_namespace_without_processes_is_not_found() -> Result<()> {
    require_root()?;
    let prefix = prefix();
    let ip = test_ip(31);
    // Named, with the IP, but no process in it: the finder only sees processes' namespaces.
    let ns = TestNetns::new(&prefix, "empty")?;
    ns.add_address(ip)?;
    let finder = finder()?;
    assert!(matches!(
        finder.find(IpAddr::V4(ip)),
        Err(PodNsError::NotFound { .. })
    ));
    Ok(())
}
