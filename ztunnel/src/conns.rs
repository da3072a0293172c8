//! Open connections the agent is responsible for, so a policy change can re-check them and
//! close the ones that are no longer allowed, and so shutdown can wait for them to drain.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use mesh::model::{Model, NamespacedName, PeerAuthnMode};
use mesh::policy::{self, Decision, L4Request};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// What re-checking a connection needs.
#[derive(Clone, Debug)]
pub struct TrackedConn {
    /// The destination workload (inbound connections are checked against its policies).
    pub pod: NamespacedName,
    pub request: L4Request,
    /// Arrived over mTLS (HBONE) rather than plaintext.
    pub mtls: bool,
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
            conns.is_empty()
        };
        if empty {
            self.tracker.drained.notify_waiters();
        }
    }
}

/// Why an open connection is no longer allowed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revoked {
    PodGone,
    PlaintextNotAllowed,
    Denied(Option<String>),
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
            if let Err(why) = still_allowed(model, &c) {
                tracing::info!(
                    pod = %c.pod,
                    src = %c.request.src_ip,
                    dst = %format!("{}:{}", c.request.dst_ip, c.request.dst_port),
                    reason = ?why,
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

/// The inbound admission decision, shared by first admission and re-checks.
pub fn still_allowed(model: &Model, c: &TrackedConn) -> Result<(), Revoked> {
    let pod = model
        .pod(&c.pod.namespace, &c.pod.name)
        .ok_or(Revoked::PodGone)?;
    if !c.mtls && policy::peer_authn_mode(model, pod, c.request.dst_port) == PeerAuthnMode::Strict {
        return Err(Revoked::PlaintextNotAllowed);
    }
    let policies = policy::policies_for(model, pod);
    match policy::evaluate_l4(&policies, &c.request).decision {
        Decision::Allow => Ok(()),
        Decision::Deny { policy } => Err(Revoked::Denied(policy)),
    }
}
