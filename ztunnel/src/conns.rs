//! Open connections the agent is responsible for, so a policy change can re-check them and
//! close the ones that are no longer allowed, and so shutdown can wait for them to drain.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mesh_model::model::{Model, NamespacedName, PeerAuthnMode};
use mesh_model::policy::{self, Decision, L4Request};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::proxy::ResponseFlag;

/// What admitting an inbound connection depends on (checked at accept and on every change).
#[derive(Clone, Debug)]
pub struct Admission {
    /// The destination workload: its policies decide.
    pub pod: NamespacedName,
    pub request: L4Request,
    /// Arrived over mTLS (HBONE) rather than plaintext.
    pub mtls: bool,
}

/// An admitted connection: cancelled when a new model no longer admits it.
#[derive(Clone, Debug)]
pub struct TrackedConn {
    pub admission: Admission,
    pub cancel: CancellationToken,
}

#[derive(Default)]
pub struct ConnTracker {
    next_id: AtomicU64,
    conns: Mutex<HashMap<u64, TrackedConn>>,
    drained: Notify,
}

/// Removes its connection from the tracker when dropped.
pub struct ConnGuard {
    tracker: Arc<ConnTracker>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let empty = {
            let mut conns = self.tracker.lock();
            conns.remove(&self.id);
            shrink_after_burst(&mut conns);
            conns.is_empty()
        };
        if empty {
            self.tracker.drained.notify_waiters();
        }
    }
}

/// Tables below this many slots are left alone.
const MIN_SHRINK_CAPACITY: usize = 64;

/// Gives a per-connection table's memory back once most of a burst has closed: a `HashMap`
/// never shrinks by itself, so 10,000 connections that came and went would otherwise keep
/// their slots for the life of the agent. Shrinking to twice the length when it falls under a
/// quarter of the capacity keeps the cost amortised O(1) per removal.
pub(crate) fn shrink_after_burst<K: std::hash::Hash + Eq, V>(map: &mut HashMap<K, V>) {
    let cap = map.capacity();
    if cap > MIN_SHRINK_CAPACITY && map.len() * 4 < cap {
        map.shrink_to(map.len() * 2);
    }
}

/// Why a connection is not (or no longer) allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotAllowed {
    /// The destination pod left the model.
    PodGone,
    /// Plaintext to a port whose PeerAuthentication is STRICT.
    PlaintextNotAllowed { port: u16 },
    /// AuthorizationPolicy: the deciding DENY policy, or `None` when no ALLOW policy matched.
    Denied(Option<String>),
}

impl NotAllowed {
    pub fn flag(&self) -> ResponseFlag {
        match self {
            NotAllowed::PodGone => ResponseFlag::NotServed,
            NotAllowed::PlaintextNotAllowed { .. } => ResponseFlag::PeerAuthn,
            NotAllowed::Denied(_) => ResponseFlag::Deny,
        }
    }
}

impl std::fmt::Display for NotAllowed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotAllowed::PodGone => f.write_str("destination pod is no longer in the model"),
            NotAllowed::PlaintextNotAllowed { port } => {
                write!(
                    f,
                    "plaintext to port {port} refused: PeerAuthentication STRICT"
                )
            }
            NotAllowed::Denied(Some(p)) => write!(f, "denied by {p}"),
            NotAllowed::Denied(None) => f.write_str("denied: no ALLOW policy matched"),
        }
    }
}

impl ConnTracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, TrackedConn>> {
        // A panic while holding this lock cannot leave the map inconsistent (single inserts and
        // removes), so a poisoned lock is still usable.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(self: &Arc<Self>, conn: TrackedConn) -> ConnGuard {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(id, conn);
        ConnGuard {
            tracker: self.clone(),
            id,
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Re-evaluates every open connection against `model`; cancels those no longer allowed.
    /// Returns how many were closed.
    pub fn recheck(&self, model: &Model) -> usize {
        let conns: Vec<TrackedConn> = self.lock().values().cloned().collect();
        let mut closed = 0;
        for c in conns {
            if let Err(why) = admit(model, &c.admission) {
                let a = &c.admission;
                tracing::info!(
                    pod = %a.pod,
                    src = %a.request.src_ip,
                    dst = %format!("{}:{}", a.request.dst_ip, a.request.dst_port),
                    reason = %why,
                    "closing connection no longer allowed by policy"
                );
                c.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }

    /// Waits until no tracked connection is left.
    pub async fn drained(&self) {
        loop {
            let notified = self.drained.notified();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

/// The inbound admission decision, the same at accept time and on every re-check:
/// PeerAuthentication (plaintext only), then AuthorizationPolicy.
pub fn admit(model: &Model, a: &Admission) -> Result<(), NotAllowed> {
    let pod = model
        .pod(&a.pod.namespace, &a.pod.name)
        .ok_or(NotAllowed::PodGone)?;
    let port = a.request.dst_port;
    if !a.mtls && policy::peer_authn_mode(model, pod, port) == PeerAuthnMode::Strict {
        return Err(NotAllowed::PlaintextNotAllowed { port });
    }
    let policies = policy::policies_for(model, pod);
    match policy::evaluate_l4(&policies, &a.request).decision {
        Decision::Allow => Ok(()),
        Decision::Deny { policy } => Err(NotAllowed::Denied(policy)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_shrinks_once_a_burst_has_closed() {
        let mut map: HashMap<u64, [u8; 64]> = HashMap::new();
        for i in 0..10_000 {
            map.insert(i, [0; 64]);
        }
        let peak = map.capacity();
        for i in 0..10_000 {
            map.remove(&i);
            shrink_after_burst(&mut map);
            assert!(map.capacity() >= map.len());
        }
        assert!(
            map.capacity() <= MIN_SHRINK_CAPACITY * 2,
            "{} of {peak}",
            map.capacity()
        );
    }
}
