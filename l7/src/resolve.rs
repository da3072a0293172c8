//! Host names the proxy resolves itself: the hosts of a `DNS` ServiceEntry it serves (an
//! egress waypoint's `api.example.com`), looked up with the system resolver (the proxy pod's
//! `resolv.conf`) when a tunnel to the entry opens, and kept for [`TTL`] (a failure for
//! [`NEGATIVE_TTL`]) so that a burst of connections costs one lookup. Each tunnel uses the
//! addresses it started with (see [`crate::target::Target::lookup_with`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_model::model::Model;

use crate::target::{HostAddrs, Target};

/// How long a resolved host's addresses are used.
pub const TTL: Duration = Duration::from_secs(30);
/// How long a host that did not resolve stays unresolved before it is tried again.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);
/// Hosts kept at most (least recently resolved go first).
const MAX_HOSTS: usize = 4096;

/// Resolved hosts, shared by every tunnel of the process.
#[derive(Debug)]
pub struct HostCache {
    timeout: Duration,
    hosts: Mutex<HashMap<String, Cached>>,
}

#[derive(Clone, Debug)]
struct Cached {
    addrs: Arc<[IpAddr]>,
    until: Instant,
}

impl HostCache {
    /// A cache whose lookups give up after `timeout` (an unresolved host: no endpoint).
    pub fn new(timeout: Duration) -> HostCache {
        HostCache {
            timeout,
            hosts: Mutex::new(HashMap::new()),
        }
    }

    /// The addresses of each host `target` needs in `model` (none for most targets).
    pub async fn for_target(&self, model: &Model, target: &Target) -> Arc<[HostAddrs]> {
        let hosts = target.hosts_to_resolve(model);
        let mut out = Vec::with_capacity(hosts.len());
        for host in hosts {
            let addrs = self.resolve(&host).await;
            out.push((host, addrs));
        }
        out.into()
    }

    /// The addresses of `host`: cached, else looked up (within the timeout).
    pub async fn resolve(&self, host: &str) -> Arc<[IpAddr]> {
        let key = host.to_ascii_lowercase();
        let now = Instant::now();
        if let Some(c) = self.lock().get(&key).filter(|c| c.until > now) {
            return c.addrs.clone();
        }
        let looked_up =
            tokio::time::timeout(self.timeout, tokio::net::lookup_host(format!("{key}:0"))).await;
        let (addrs, ttl): (Arc<[IpAddr]>, _) = match looked_up {
            Ok(Ok(found)) => {
                let mut ips: Vec<IpAddr> = Vec::new();
                for a in found {
                    if !ips.contains(&a.ip()) {
                        ips.push(a.ip());
                    }
                }
                let ttl = if ips.is_empty() { NEGATIVE_TTL } else { TTL };
                (ips.into(), ttl)
            }
            Ok(Err(e)) => {
                tracing::info!(host = %key, error = %e, "host did not resolve");
                (Arc::from([]), NEGATIVE_TTL)
            }
            Err(_) => {
                tracing::info!(host = %key, timeout = ?self.timeout, "host resolution timed out");
                (Arc::from([]), NEGATIVE_TTL)
            }
        };
        let mut hosts = self.lock();
        if hosts.len() >= MAX_HOSTS && !hosts.contains_key(&key) {
            // Bounded: forget what expires first.
            if let Some(oldest) = hosts
                .iter()
                .min_by_key(|(_, c)| c.until)
                .map(|(k, _)| k.clone())
            {
                hosts.remove(&oldest);
            }
        }
        hosts.insert(
            key,
            Cached {
                addrs: addrs.clone(),
                until: now + ttl,
            },
        );
        addrs
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Cached>> {
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_host_resolves_once_per_ttl_and_a_failure_resolves_to_nothing() {
        let cache = HostCache::new(Duration::from_secs(2));
        let first = cache.resolve("localhost").await;
        assert!(first.iter().any(IpAddr::is_loopback), "{first:?}");
        let again = cache.resolve("LOCALHOST").await;
        assert!(
            Arc::ptr_eq(&first, &again),
            "served from the cache, by any case"
        );
        // `.invalid` never resolves (RFC 6761).
        assert!(cache.resolve("nothing.invalid").await.is_empty());
        assert!(cache
            .lock()
            .get("nothing.invalid")
            .is_some_and(|c| c.until <= Instant::now() + NEGATIVE_TTL));
    }
}
