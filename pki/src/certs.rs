//! The certificates of the workloads on this node: issued on first use, cached, renewed at half
//! of their lifetime.
//!
//! TLS configurations never hold a certificate themselves: they ask [`CertManager`] for the
//! *current* [`CertifiedKey`] on every handshake. Renewal therefore only swaps the cache entry;
//! established connections keep the keys they were negotiated with and are never disturbed.
//! When renewal fails the old certificate stays in use until it expires, and renewal is retried
//! with exponential backoff and jitter.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use arc_swap::ArcSwap;

use crate::ca::{certs_to_pem, Ca, CaError, WorkloadCert};
use crate::ca_client::{CaClient, CaClientError, Fetched};
use mesh_model::identity::Identity;

/// Shorter lifetimes cannot be honoured: X.509 times have a resolution of one second, and the
/// cache needs room to renew before expiry.
pub const MIN_TTL: Duration = Duration::from_secs(2);
/// First retry delay after a failed renewal; doubled per failure up to [`RETRY_MAX`].
pub const RETRY_BASE: Duration = Duration::from_millis(500);
pub const RETRY_MAX: Duration = Duration::from_secs(30);
/// The rotation task re-reads the wall clock at least this often, so a clock jump cannot
/// postpone renewal indefinitely.
const MAX_IDLE: Duration = Duration::from_secs(60);

/// Per-workload certificate cache with rotation. Cheap to share as `Arc`.
pub struct CertManager {
    issuer: Issuer,
    ttl: Duration,
    entries: Mutex<HashMap<Identity, Entry>>,
    /// Remote mode: identities wanted but not (yet) issued, with why.
    pending: Mutex<HashMap<Identity, Pending>>,
    /// Wakes the rotation task when an entry is added (its schedule may now be earlier).
    wake: Notify,
    /// Bumped whenever [`CertManager::dump`] would change.
    generation: watch::Sender<u64>,
    /// How many [`CertHold`]s each identity has.
    holds: Mutex<HashMap<Identity, usize>>,
    #[cfg(test)]
    inject_failures: std::sync::atomic::AtomicU32,
}

struct Entry {
    key: Arc<CertifiedKey>,
    chain: Vec<CertificateDer<'static>>,
    serial: String,
    not_before: SystemTime,
    not_after: SystemTime,
    /// When to try renewing: half-life at first, then backoff after failures.
    next_attempt: SystemTime,
    failures: u32,
}

/// Where certificates come from.
enum Issuer {
    /// A signing key in this process (single-process setups and tests).
    Local(Arc<Ca>),
    /// A CA service (`control`, or istiod): no key here; certificates are fetched.
    Remote(Box<Remote>),
}

struct Remote {
    client: CaClient,
    trust_domain: String,
    /// Ask with `ImpersonatedIdentity` (a node agent asking for its pods' identities).
    impersonate: bool,
    /// Roots given at startup (the file the CA's serving certificate chains to).
    configured_roots: Vec<CertificateDer<'static>>,
    /// Configured roots plus every root the CA sent; swapped whole.
    roots: ArcSwap<(Vec<CertificateDer<'static>>, Arc<rustls::RootCertStore>)>,
}

/// Requests in flight at once to a remote CA.
const FETCH_CONCURRENCY: usize = 8;

/// A wanted identity without a certificate yet.
#[derive(Clone, Debug)]
struct Pending {
    since: SystemTime,
    next_attempt: SystemTime,
    failures: u32,
    last_error: Option<String>,
}

/// An identity waiting for its first certificate, for `/config_dump` and the dashboard.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PendingSummary {
    pub identity: String,
    /// RFC 3339.
    pub since: String,
    pub attempts: u32,
    /// The CA's reason for the last refusal (`no_such_pod_on_node`, `unavailable`, ...).
    pub last_error: Option<String>,
}

/// One cached certificate, for `/config_dump`. Never includes the key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct CertSummary {
    pub identity: String,
    pub serial: String,
    /// RFC 3339.
    pub not_before: String,
    pub not_after: String,
    pub next_renewal: String,
    pub renewal_failures: u32,
    /// Leaf then intermediates.
    pub chain_pem: String,
}

/// The validity of one cached certificate, for the node dashboard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertExpiry {
    pub identity: Identity,
    pub not_after: SystemTime,
    pub next_renewal: SystemTime,
    pub renewal_failures: u32,
}

/// Keeps one identity's certificate ([`CertManager::hold`]); dropping the last one forgets it.
pub struct CertHold {
    certs: Arc<CertManager>,
    id: Identity,
}

impl Drop for CertHold {
    fn drop(&mut self) {
        self.certs.unhold(&self.id);
    }
}

impl std::fmt::Debug for CertHold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("CertHold")
            .field(&self.id.to_string())
            .finish()
    }
}

// === impl CertManager ===

impl CertManager {
    pub fn new(ca: Arc<Ca>, ttl: Duration) -> Arc<Self> {
        Self::build(Issuer::Local(ca), ttl)
    }

    /// Certificates from a CA service: no signing key in this process. `impersonate`: ask
    /// for identities on others' behalf (a node agent); `roots`: trusted from the start (the
    /// CA's own trust bundle file), extended with every root the CA sends.
    pub fn remote(
        client: CaClient,
        trust_domain: &str,
        ttl: Duration,
        impersonate: bool,
        roots: Vec<CertificateDer<'static>>,
    ) -> Arc<Self> {
        let store = root_store_of(&roots);
        Self::build(
            Issuer::Remote(Box::new(Remote {
                client,
                trust_domain: trust_domain.to_string(),
                impersonate,
                configured_roots: roots.clone(),
                roots: ArcSwap::from_pointee((roots, store)),
            })),
            ttl,
        )
    }

    fn build(issuer: Issuer, ttl: Duration) -> Arc<Self> {
        let ttl = if ttl < MIN_TTL {
            warn!(?ttl, min = ?MIN_TTL, "workload certificate ttl too short, using the minimum");
            MIN_TTL
        } else {
            ttl
        };
        Arc::new(CertManager {
            issuer,
            ttl,
            entries: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            generation: watch::Sender::new(0),
            holds: Mutex::new(HashMap::new()),
            #[cfg(test)]
            inject_failures: std::sync::atomic::AtomicU32::new(0),
        })
    }

    pub fn trust_domain(&self) -> &str {
        match &self.issuer {
            Issuer::Local(ca) => ca.trust_domain(),
            Issuer::Remote(r) => &r.trust_domain,
        }
    }

    /// True when certificates come from a CA service (no key in this process).
    pub fn is_remote(&self) -> bool {
        matches!(self.issuer, Issuer::Remote(_))
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// Every trusted root (DER).
    pub fn roots(&self) -> Vec<CertificateDer<'static>> {
        match &self.issuer {
            Issuer::Local(ca) => ca.roots(),
            Issuer::Remote(r) => r.roots.load().0.clone(),
        }
    }

    /// The trusted roots as rustls trust anchors, parsed once.
    pub fn root_store(&self) -> Arc<rustls::RootCertStore> {
        match &self.issuer {
            Issuer::Local(ca) => ca.root_store(),
            Issuer::Remote(r) => r.roots.load().1.clone(),
        }
    }

    /// Cached; issued on first request. Returns the *current* key (after rotation, the new one).
    /// An expired entry (rotation not running, or failing for a whole lifetime) is re-issued
    /// here; an expired certificate is never handed out.
    pub fn certified_key(&self, id: &Identity) -> Result<Arc<CertifiedKey>, CaError> {
        if let Some(key) = self.current(id, SystemTime::now()) {
            return Ok(key);
        }
        if self.is_remote() {
            // Nothing to sign with here: ask the CA (in the background) and refuse this one.
            let reason = self.want(id);
            return Err(CaError::Pending {
                id: id.clone(),
                reason: reason.unwrap_or_else(|| "requested".into()),
            });
        }
        // Issue outside the lock: handshakes for other workloads must not wait on signing.
        let fresh = self.issue(id)?;
        let key = {
            let mut entries = self.lock();
            match entries.get(id) {
                // Someone else issued one meanwhile: keep theirs, one certificate per identity.
                Some(e) if SystemTime::now() < e.not_after => e.key.clone(),
                _ => {
                    let key = fresh.key.clone();
                    info!(identity = %id, serial = %fresh.serial, "issued workload certificate");
                    entries.insert(id.clone(), fresh);
                    key
                }
            }
        };
        self.wake.notify_one();
        self.bump();
        Ok(key)
    }

    /// Keeps `id`'s certificate (cached, renewed, or still being asked for) while the hold
    /// lives; the last hold dropped forgets it ([`CertManager::forget`]). A node agent's
    /// enrollment holds its pod's identity, and so does what a release leaves draining: the
    /// connections the pod's listener still accepts then need the certificate too.
    pub fn hold(self: &Arc<Self>, id: &Identity) -> CertHold {
        *self.lock_holds().entry(id.clone()).or_default() += 1;
        CertHold {
            certs: self.clone(),
            id: id.clone(),
        }
    }

    fn unhold(&self, id: &Identity) {
        // Forgotten under the lock: a hold taken meanwhile either comes first (and keeps it)
        // or after (and asks again).
        let mut holds = self.lock_holds();
        match holds.get_mut(id) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                holds.remove(id);
                self.forget(id);
            }
            None => {}
        }
    }

    /// Stop renewing an identity no longer on this node (drops its key).
    pub fn forget(&self, id: &Identity) {
        let was_pending = self.lock_pending().remove(id).is_some();
        if self.lock().remove(id).is_some() || was_pending {
            debug!(identity = %id, "forgot workload certificate");
            self.bump();
        }
    }

    /// Renews every cached certificate at half of its lifetime (retry with backoff on failure,
    /// keep the old one until it expires). Returns when `shutdown` is cancelled.
    pub async fn run_rotation(self: Arc<Self>, shutdown: CancellationToken) {
        let span = tracing::info_span!("cert_rotation");
        async move {
            loop {
                let wait = self.next_wait(SystemTime::now());
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return,
                    _ = self.wake.notified() => continue,
                    _ = tokio::time::sleep(wait) => {}
                }
                if let Issuer::Remote(remote) = &self.issuer {
                    self.fetch_due(remote, SystemTime::now()).await;
                    continue;
                }
                // Key generation and signing are CPU work: keep them off the reactor threads.
                let this = self.clone();
                let span = tracing::Span::current();
                let renew = tokio::task::spawn_blocking(move || {
                    span.in_scope(|| this.renew_due(SystemTime::now()))
                });
                if let Err(e) = renew.await {
                    warn!(error = %e, "certificate renewal task failed");
                }
            }
        }
        .instrument(span)
        .await
    }

    /// Asks for `id`'s certificate ahead of its first use (a pod enrolled on this node).
    /// Local mode: issued now. Remote mode: queued for the CA, fetched in the background by
    /// [`CertManager::run_rotation`]. Returns the last refusal while it is pending.
    pub fn want(&self, id: &Identity) -> Option<String> {
        if !self.is_remote() {
            return self.certified_key(id).err().map(|e| e.to_string());
        }
        if self.current(id, SystemTime::now()).is_some() {
            return None;
        }
        let mut pending = self.lock_pending();
        if let Some(p) = pending.get(id) {
            return p.last_error.clone();
        }
        let now = SystemTime::now();
        pending.insert(
            id.clone(),
            Pending {
                since: now,
                next_attempt: now,
                failures: 0,
                last_error: None,
            },
        );
        drop(pending);
        self.wake.notify_one();
        self.bump();
        None
    }

    /// True when every identity in `ids` has a valid certificate.
    pub fn has_all<'a>(&self, ids: impl IntoIterator<Item = &'a Identity>) -> bool {
        let now = SystemTime::now();
        let entries = self.lock();
        ids.into_iter()
            .all(|id| entries.get(id).is_some_and(|e| now < e.not_after))
    }

    /// Identities waiting for their first certificate (remote mode), by identity.
    pub fn pending(&self) -> Vec<PendingSummary> {
        let pending = self.lock_pending();
        let mut out: Vec<PendingSummary> = pending
            .iter()
            .map(|(id, p)| PendingSummary {
                identity: id.to_string(),
                since: rfc3339(p.since),
                attempts: p.failures,
                last_error: p.last_error.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// Remote mode: fetches what is pending or due for renewal, at most
    /// [`FETCH_CONCURRENCY`] at once.
    async fn fetch_due(&self, remote: &Remote, now: SystemTime) {
        use futures::stream::{self, StreamExt};
        let mut due: Vec<Identity> = self
            .lock()
            .iter()
            .filter(|(_, e)| e.next_attempt <= now)
            .map(|(id, _)| id.clone())
            .collect();
        due.extend(
            self.lock_pending()
                .iter()
                .filter(|(_, p)| p.next_attempt <= now)
                .map(|(id, _)| id.clone()),
        );
        let results: Vec<(Identity, Result<Fetched, CaClientError>)> = stream::iter(due)
            .map(|id| async move {
                let r = remote.client.fetch(&id, remote.impersonate, self.ttl).await;
                (id, r)
            })
            .buffer_unordered(FETCH_CONCURRENCY)
            .collect()
            .await;
        for (id, result) in results {
            self.apply_fetch(remote, id, result);
        }
    }

    fn apply_fetch(&self, remote: &Remote, id: Identity, result: Result<Fetched, CaClientError>) {
        let now = SystemTime::now();
        match result {
            Ok(fetched) => {
                self.learn_roots(remote, &fetched.roots);
                let cert = WorkloadCert {
                    identity: fetched.identity,
                    chain: fetched.chain,
                    key: fetched.key,
                    not_before: fetched.not_before,
                    not_after: fetched.not_after,
                    serial: fetched.serial,
                };
                let entry = match Entry::new(cert, now) {
                    Ok(e) => e,
                    Err(e) => {
                        warn!(identity = %id, error = %e, "the certificate the ca sent is unusable");
                        return;
                    }
                };
                let was_pending = self.lock_pending().remove(&id).is_some();
                let mut entries = self.lock();
                // Forgotten while we were asking: do not bring it back.
                if !was_pending && !entries.contains_key(&id) {
                    return;
                }
                info!(identity = %id, serial = %entry.serial, "certificate from the ca");
                entries.insert(id, entry);
            }
            Err(error) => {
                let reason = error.reason();
                let mut pending = self.lock_pending();
                if let Some(p) = pending.get_mut(&id) {
                    p.failures = p.failures.saturating_add(1);
                    p.next_attempt = now + backoff(p.failures);
                    p.last_error = Some(reason.clone());
                    warn!(identity = %id, %error, attempts = p.failures, "no certificate yet; the workload waits");
                } else {
                    drop(pending);
                    let mut entries = self.lock();
                    let Some(entry) = entries.get_mut(&id) else {
                        return;
                    };
                    entry.failures = entry.failures.saturating_add(1);
                    let delay = backoff(entry.failures);
                    entry.next_attempt = now + delay;
                    warn!(identity = %id, %error, failures = entry.failures, retry_in = ?delay,
                        expires = %rfc3339(entry.not_after),
                        "renewing from the ca failed, keeping the current certificate");
                }
            }
        }
        self.bump();
    }

    /// Adds roots the CA sent to the trust bundle (old and new roots are trusted together
    /// during a root rotation).
    fn learn_roots(&self, remote: &Remote, sent: &[CertificateDer<'static>]) {
        let current = remote.roots.load();
        if sent.iter().all(|r| current.0.contains(r)) {
            return;
        }
        let mut roots = remote.configured_roots.clone();
        for r in current.0.iter().chain(sent) {
            if !roots.contains(r) {
                roots.push(r.clone());
            }
        }
        info!(roots = roots.len(), "trust bundle updated from the ca");
        let store = root_store_of(&roots);
        remote.client.trust(store.clone());
        remote.roots.store(Arc::new((roots, store)));
    }

    /// For /config_dump: identity, serial, validity (RFC 3339), chain PEM. No keys.
    pub fn dump(&self) -> Vec<CertSummary> {
        let entries = self.lock();
        let mut out: Vec<CertSummary> = entries
            .iter()
            .map(|(id, e)| CertSummary {
                identity: id.to_string(),
                serial: e.serial.clone(),
                not_before: rfc3339(e.not_before),
                not_after: rfc3339(e.not_after),
                next_renewal: rfc3339(e.next_attempt),
                renewal_failures: e.failures,
                chain_pem: certs_to_pem(&e.chain),
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// When each cached certificate expires and is next renewed, by identity (for the node
    /// dashboard; cheaper than [`CertManager::dump`], which renders the chains).
    pub fn expiries(&self) -> Vec<CertExpiry> {
        let entries = self.lock();
        let mut out: Vec<CertExpiry> = entries
            .iter()
            .map(|(id, e)| CertExpiry {
                identity: id.clone(),
                not_after: e.not_after,
                next_renewal: e.next_attempt,
                renewal_failures: e.failures,
            })
            .collect();
        out.sort_by(|a, b| a.identity.cmp(&b.identity));
        out
    }

    /// A receiver that sees a change whenever [`CertManager::dump`] would: a certificate issued,
    /// renewed or forgotten, or a renewal attempt failed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    fn current(&self, id: &Identity, now: SystemTime) -> Option<Arc<CertifiedKey>> {
        let entries = self.lock();
        let entry = entries.get(id)?;
        (now < entry.not_after).then(|| entry.key.clone())
    }

    fn issue(&self, id: &Identity) -> Result<Entry, CaError> {
        #[cfg(test)]
        if self
            .inject_failures
            .fetch_update(
                std::sync::atomic::Ordering::SeqCst,
                std::sync::atomic::Ordering::SeqCst,
                |n| n.checked_sub(1),
            )
            .is_ok()
        {
            return Err(CaError::Validity {
                id: id.clone(),
                reason: "injected failure".into(),
            });
        }
        let Issuer::Local(ca) = &self.issuer else {
            return Err(CaError::Pending {
                id: id.clone(),
                reason: "certificates come from the ca service".into(),
            });
        };
        let cert = ca.issue(id, self.ttl)?;
        Entry::new(cert, SystemTime::now())
    }

    fn renew_due(&self, now: SystemTime) {
        let due: Vec<Identity> = self
            .lock()
            .iter()
            .filter(|(_, e)| e.next_attempt <= now)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let result = self.issue(&id);
            let mut entries = self.lock();
            // Forgotten while we were signing: do not bring it back.
            let Some(entry) = entries.get_mut(&id) else {
                continue;
            };
            match result {
                Ok(fresh) => {
                    debug!(identity = %id, old = %entry.serial, new = %fresh.serial, "renewed workload certificate");
                    *entry = fresh;
                }
                Err(error) => {
                    entry.failures = entry.failures.saturating_add(1);
                    let delay = backoff(entry.failures);
                    entry.next_attempt = SystemTime::now() + delay;
                    warn!(
                        identity = %id,
                        %error,
                        failures = entry.failures,
                        retry_in = ?delay,
                        expires = %rfc3339(entry.not_after),
                        "renewing workload certificate failed, keeping the current one"
                    );
                }
            }
            drop(entries);
            self.bump();
        }
    }

    fn next_wait(&self, now: SystemTime) -> Duration {
        let until = |t: SystemTime| t.duration_since(now).unwrap_or(Duration::ZERO);
        let entries = self.lock().values().map(|e| until(e.next_attempt)).min();
        let pending = self
            .lock_pending()
            .values()
            .map(|p| until(p.next_attempt))
            .min();
        entries
            .into_iter()
            .chain(pending)
            .min()
            .unwrap_or(MAX_IDLE)
            .min(MAX_IDLE)
    }

    fn lock_holds(&self) -> MutexGuard<'_, HashMap<Identity, usize>> {
        self.holds.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_pending(&self) -> MutexGuard<'_, HashMap<Identity, Pending>> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Identity, Entry>> {
        // The map stays consistent even if a holder panicked: every update is a single insert,
        // remove or field assignment.
        self.entries.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn bump(&self) {
        self.generation.send_modify(|g| *g = g.wrapping_add(1));
    }
}

impl std::fmt::Debug for CertManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print keys.
        f.debug_struct("CertManager")
            .field("trust_domain", &self.trust_domain())
            .field("ttl", &self.ttl)
            .field("cached", &self.lock().len())
            .finish_non_exhaustive()
    }
}

// === impl Entry ===

impl Entry {
    fn new(cert: WorkloadCert, now: SystemTime) -> Result<Entry, CaError> {
        let WorkloadCert {
            identity,
            chain,
            key,
            not_before,
            not_after,
            serial,
        } = cert;
        let signer = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|source| {
            CaError::Key {
                id: identity.clone(),
                source: Box::new(source),
            }
        })?;
        let lifetime = not_after
            .duration_since(not_before)
            .unwrap_or(Duration::ZERO);
        // Half-life, but never sooner than a quarter lifetime from now: `not_before` is rounded
        // down to the second, which for very short lifetimes could otherwise put the half-life
        // in the past and renew in a loop.
        let next_attempt = (not_before + lifetime / 2).max(now + lifetime / 4);
        Ok(Entry {
            key: Arc::new(CertifiedKey::new(chain.clone(), signer)),
            chain,
            serial,
            not_before,
            not_after,
            next_attempt,
            failures: 0,
        })
    }
}

fn root_store_of(roots: &[CertificateDer<'static>]) -> Arc<rustls::RootCertStore> {
    let mut store = rustls::RootCertStore::empty();
    let (added, ignored) = store.add_parsable_certificates(roots.iter().cloned());
    if ignored > 0 {
        warn!(added, ignored, "some trust roots could not be parsed");
    }
    Arc::new(store)
}

/// Exponential backoff with "equal jitter": half the delay fixed, half random, so node agents
/// that lost the CA at the same moment do not come back in lockstep.
fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let full = RETRY_BASE.saturating_mul(1 << exp).min(RETRY_MAX);
    let half = full / 2;
    half + half.mul_f64(rand::random::<f64>())
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "invalid".to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use tokio::time::timeout;

    use super::*;

    fn web() -> Identity {
        Identity::new("cluster.local", "default", "web")
    }

    fn manager(ttl: Duration) -> Arc<CertManager> {
        CertManager::new(Arc::new(Ca::ephemeral("cluster.local").unwrap()), ttl)
    }

    fn serial_of(certs: &CertManager, id: &Identity) -> String {
        let uri = id.to_string();
        certs
            .dump()
            .into_iter()
            .find(|s| s.identity == uri)
            .map(|s| s.serial)
            .unwrap_or_default()
    }

    /// Waits for the next change of the manager's state, bounded.
    async fn next_change(rx: &mut watch::Receiver<u64>, within: Duration) {
        timeout(within, rx.changed())
            .await
            .expect("no certificate change in time")
            .unwrap();
    }

    struct Rotation {
        shutdown: CancellationToken,
        task: Option<tokio::task::JoinHandle<()>>,
    }

    impl Rotation {
        fn start(certs: &Arc<CertManager>) -> Rotation {
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(certs.clone().run_rotation(shutdown.clone()));
            Rotation {
                shutdown,
                task: Some(task),
            }
        }

        async fn stop(mut self) {
            self.shutdown.cancel();
            let task = self.task.take().unwrap();
            timeout(Duration::from_secs(1), task)
                .await
                .expect("rotation task stops on shutdown")
                .unwrap();
        }
    }

    impl Drop for Rotation {
        fn drop(&mut self) {
            // A failed assertion must not leave the task running into the next test.
            self.shutdown.cancel();
        }
    }

    #[test]
    fn keys_are_cached_per_identity() {
        let certs = manager(Duration::from_secs(3600));
        let db = Identity::new("cluster.local", "default", "db");
        let a = certs.certified_key(&web()).unwrap();
        let b = certs.certified_key(&web()).unwrap();
        let c = certs.certified_key(&db).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "second request hits the cache");
        assert!(!Arc::ptr_eq(&a, &c));
        let dump = certs.dump();
        assert_eq!(
            dump.iter().map(|s| s.identity.as_str()).collect::<Vec<_>>(),
            [
                "spiffe://cluster.local/ns/default/sa/db",
                "spiffe://cluster.local/ns/default/sa/web"
            ]
        );
        assert!(dump[0].chain_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(!dump[0].chain_pem.contains("PRIVATE"));
        assert!(dump[0].not_before.ends_with('Z'), "{}", dump[0].not_before);
    }

    #[test]
    fn expiries_name_each_cached_identity_and_its_validity() {
        let certs = manager(Duration::from_secs(3600));
        let before = SystemTime::now();
        certs.certified_key(&web()).unwrap();
        let e = certs.expiries();
        assert_eq!(e.len(), 1);
        assert_eq!(e[0].identity, web());
        assert!(e[0].not_after > before + Duration::from_secs(3000));
        assert!(e[0].next_renewal < e[0].not_after);
        assert_eq!(e[0].renewal_failures, 0);
    }

    #[test]
    fn foreign_trust_domain_is_not_issued() {
        let certs = manager(Duration::from_secs(3600));
        let evil = Identity::new("evil.local", "default", "web");
        assert!(certs.certified_key(&evil).is_err());
        assert!(certs.dump().is_empty());
    }

    #[test]
    fn forget_drops_the_key_and_a_later_request_issues_a_new_one() {
        let certs = manager(Duration::from_secs(3600));
        let first = certs.certified_key(&web()).unwrap();
        let serial = serial_of(&certs, &web());
        certs.forget(&web());
        assert!(certs.dump().is_empty());
        let second = certs.certified_key(&web()).unwrap();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_ne!(serial_of(&certs, &web()), serial);
    }

    #[test]
    fn a_certificate_stays_until_its_last_hold_is_dropped() {
        let certs = manager(Duration::from_secs(3600));
        // A pod enrolled, then released while its drain still runs, then enrolled again.
        let enrolled = certs.hold(&web());
        certs.certified_key(&web()).unwrap();
        let serial = serial_of(&certs, &web());
        let again = certs.hold(&web());
        drop(enrolled);
        assert_eq!(serial_of(&certs, &web()), serial, "still held: kept");
        drop(again);
        assert!(certs.dump().is_empty(), "the last hold gone: forgotten");
    }

    #[test]
    fn an_expired_entry_is_reissued_on_request() {
        let certs = manager(Duration::from_secs(3600));
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let Issuer::Local(ca) = &certs.issuer else {
            unreachable!("a local manager")
        };
        let expired = ca
            .issue_with_validity(&web(), now - 2 * hour, now - hour)
            .unwrap();
        let stale_serial = expired.serial.clone();
        certs
            .lock()
            .insert(web(), Entry::new(expired, now - 2 * hour).unwrap());
        certs.certified_key(&web()).unwrap();
        assert_ne!(serial_of(&certs, &web()), stale_serial);
    }

    #[test]
    fn ttl_below_the_minimum_is_raised() {
        assert_eq!(manager(Duration::from_millis(10)).ttl(), MIN_TTL);
    }

    #[test]
    fn backoff_doubles_with_jitter_up_to_the_cap() {
        let check = |failures: u32, full: Duration| {
            for _ in 0..20 {
                let d = backoff(failures);
                assert!(d >= full / 2 && d <= full, "{failures}: {d:?}");
            }
        };
        check(1, RETRY_BASE);
        check(2, RETRY_BASE * 2);
        check(3, RETRY_BASE * 4);
        check(40, RETRY_MAX);
    }

    #[tokio::test]
    async fn rotation_renews_at_half_life() {
        let certs = manager(Duration::from_secs(2));
        let mut changes = certs.subscribe();
        let old_key = certs.certified_key(&web()).unwrap();
        let old_serial = serial_of(&certs, &web());
        changes.mark_unchanged();
        let rotation = Rotation::start(&certs);

        next_change(&mut changes, Duration::from_millis(1500)).await;
        assert_ne!(serial_of(&certs, &web()), old_serial);
        let new_key = certs.certified_key(&web()).unwrap();
        assert!(!Arc::ptr_eq(&old_key, &new_key), "requests get the new key");
        rotation.stop().await;
    }

    #[tokio::test]
    async fn failed_renewal_keeps_the_current_certificate_and_retries() {
        let certs = manager(Duration::from_secs(2));
        let mut changes = certs.subscribe();
        let old_key = certs.certified_key(&web()).unwrap();
        let old_serial = serial_of(&certs, &web());
        changes.mark_unchanged();
        certs.inject_failures.store(1, Ordering::SeqCst);
        let rotation = Rotation::start(&certs);

        // First attempt fails: the current certificate stays.
        next_change(&mut changes, Duration::from_millis(1500)).await;
        let summary = certs.dump().remove(0);
        assert_eq!(
            (summary.serial.as_str(), summary.renewal_failures),
            (old_serial.as_str(), 1)
        );
        assert!(Arc::ptr_eq(&old_key, &certs.certified_key(&web()).unwrap()));

        // The retry (after at most RETRY_BASE) succeeds before the old one expires.
        next_change(&mut changes, RETRY_BASE + Duration::from_millis(200)).await;
        let summary = certs.dump().remove(0);
        assert_ne!(summary.serial, old_serial);
        assert_eq!(summary.renewal_failures, 0);
        rotation.stop().await;
    }

    #[tokio::test]
    async fn forgotten_identities_are_not_renewed() {
        let certs = manager(Duration::from_secs(2));
        certs.certified_key(&web()).unwrap();
        let rotation = Rotation::start(&certs);
        certs.forget(&web());
        // Nothing left to renew: the task idles until shutdown, which it honours at once.
        assert_eq!(certs.next_wait(SystemTime::now()), MAX_IDLE);
        rotation.stop().await;
        assert!(certs.dump().is_empty());
    }
}
