//! In-cluster configuration source: the API server, watched with kube-rs, becomes the model.
//!
//! The local mode reads a directory of YAML; in a cluster the same resources come from the
//! API server. This module only *fetches*: every object is turned into the document a YAML
//! file would hold ([`resources`]) and handed to the one translator, `mesh_model::k8s`, so both
//! sources mean exactly the same thing.
//!
//! - Watched, in all namespaces: Namespaces, ServiceAccounts, Pods and Services (a service's
//!   endpoints are pods on every node), `discovery.k8s.io/v1` EndpointSlices not managed by
//!   the EndpointSlice controller (the endpoints of Services without a selector, such as
//!   `default/kubernetes` or hand-written slices; the controller's slices are derived from
//!   pods, which the model already has), Istio's `security.istio.io/v1`
//!   PeerAuthentication and AuthorizationPolicy, and `gateway.networking.k8s.io/v1`
//!   Gateways (waypoints; as [`DynamicObject`]s: there are no generated types); for a
//!   waypoint ([`Scope::Waypoint`]) also HTTPRoutes, GRPCRoutes, RequestAuthentications,
//!   VirtualServices, DestinationRules and Telemetries; for an ingress gateway
//!   ([`Scope::Gateway`]) also Secrets, only of type `kubernetes.io/tls` (a field selector:
//!   no other Secret is ever sent; of each only labels, type, `tls.crt` and `tls.key` are
//!   kept, the key never logged or dumped) and `gateway.networking.k8s.io/v1beta1`
//!   ReferenceGrants. A cluster without Istio's CRDs gets a model without policies; one
//!   without the Gateway API CRDs a model without waypoints (services labelled
//!   `istio.io/use-waypoint` then go direct).
//! - [`status`] writes an ingress Gateway's status back (`gateways/status`), the one thing
//!   this crate writes besides TokenReviews.
//! - Each kind is listed, then watched from the list's `resourceVersion`; a dropped watch is
//!   resumed, an expired one (`410 Gone`) re-listed, failures retried with jittered
//!   exponential backoff ([`Options::retry_min`] .. [`Options::retry_max`]).
//! - Nothing is published until every kind has been listed once (a partial model would
//!   release pods that are merely not listed yet). Then every change publishes a new model,
//!   debounced: [`Options::debounce`] after the last change, and at most
//!   [`Options::max_delay`] after the first, so a busy cluster still converges.
//! - An object the translator refuses is left at its last accepted version (absent if it
//!   never had one), logged and counted once per refused version in
//!   `mesh_config_rejections_total{source="kube"}`, and listed in [`Options::rejections`];
//!   every other object still applies. Unlike a file, a cluster cannot be rolled back to its
//!   last good state as a whole, and one team's bad object must not freeze everyone's.
//! - Except that a refused AuthorizationPolicy or RequestAuthentication with no accepted
//!   version fails closed: the model carries it as a `RefusedPolicy` (deny all to what it
//!   selects / reject the tokens it would check) until it is fixed or deleted; each start
//!   and end is logged at warn, and the set is the gauge `mesh_policies_failed_closed`.
#![forbid(unsafe_code)]

mod resources;
pub mod status;
mod store;
pub mod token_review;

use std::collections::hash_map::RandomState;
use std::collections::BTreeSet;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::api::{Api, DynamicObject};
use kube::runtime::utils::Backoff;
use kube::runtime::{watcher, WatchStreamExt};
use mesh_model::model::Model;
use mesh_telemetry::Metrics;
use serde::Serialize;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

pub use kube::Client;
pub use resources::Scope;
use store::{Change, Store};

/// Default quiet period before a change is published.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(100);
/// Default longest delay between a change and its publication under continuous churn.
pub const DEFAULT_MAX_DELAY: Duration = Duration::from_secs(1);
/// Default first retry delay after a failed list or watch (client-go's reflector uses 800 ms).
pub const DEFAULT_RETRY_MIN: Duration = Duration::from_millis(800);
/// Default longest retry delay.
pub const DEFAULT_RETRY_MAX: Duration = Duration::from_secs(30);
/// `source` label of this module's config metrics.
pub const METRICS_SOURCE: &str = "kube";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("find the kubernetes api server (in-cluster service account or kubeconfig): {0}")]
    Config(#[from] kube::config::InferConfigError),
    #[error("create kubernetes client: {0}")]
    Client(#[from] kube::Error),
}

/// An object whose latest version the translator refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Rejection {
    /// `Pod default/web`.
    pub object: String,
    /// The translator's error, naming the field.
    pub error: String,
}

/// How the watch publishes and retries.
#[derive(Clone, Debug)]
pub struct Options {
    pub debounce: Duration,
    pub max_delay: Duration,
    pub retry_min: Duration,
    pub retry_max: Duration,
    /// Counts model publications and refused objects.
    pub metrics: Option<Arc<Metrics>>,
    /// Receives the refused objects whenever that set changes (for `/config_dump`).
    pub rejections: Option<watch::Sender<Vec<Rejection>>>,
    /// Which kinds are watched (the node agent's, the waypoint's, or the ingress gateway's).
    pub scope: Scope,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            debounce: DEFAULT_DEBOUNCE,
            max_delay: DEFAULT_MAX_DELAY,
            retry_min: DEFAULT_RETRY_MIN,
            retry_max: DEFAULT_RETRY_MAX,
            metrics: None,
            rejections: None,
            scope: Scope::Node,
        }
    }
}

/// A client for the cluster the agent runs in: the pod's service account when in a cluster,
/// else `$KUBECONFIG` / `~/.kube/config` (development).
pub async fn client() -> Result<Client, KubeError> {
    let config = kube::Config::infer().await?;
    Ok(Client::try_from(config)?)
}

/// Watches the API server and publishes a model on `tx` after the first complete list and on
/// every change, until `stop` or until every receiver of `tx` is gone. Failures are logged and
/// retried, never returned: the last published model stays in force meanwhile.
pub async fn watch(
    client: Client,
    tx: watch::Sender<Arc<Model>>,
    opts: Options,
    stop: CancellationToken,
) {
    let kinds = resources::kinds_for(opts.scope);
    let streams = kinds.iter().enumerate().map(|(i, kind)| {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &kind.resource);
        // `any_semantic`: the initial list is served from the API server's watch cache
        // (resourceVersion=0), as client-go informers do; one agent per node must not make
        // every restart a quorum read of all pods.
        let mut config = watcher::Config::default().any_semantic();
        // A kind's label selector filters on the API server, so what the mesh derives itself
        // is never sent: the EndpointSlices the EndpointSlice controller computes from a
        // Service's selector are the model's pods again (see
        // `resources::ENDPOINT_SLICE_SELECTOR`); only slices nothing else describes
        // (Services without a selector) are watched.
        if let Some(selector) = kind.label_selector {
            config = config.labels(selector);
        }
        // Likewise the Secrets: only `kubernetes.io/tls` ones are ever sent
        // (`resources::TLS_SECRET_SELECTOR`), never a token or another application's
        // credentials.
        if let Some(selector) = kind.field_selector {
            config = config.fields(selector);
        }
        watcher(api, config)
            .backoff(Retry::new(opts.retry_min, opts.retry_max))
            .map(move |event| (i, event))
            .boxed()
    });
    let mut events = futures::stream::select_all(streams);
    let mut store = Store::new(kinds);
    let mut pending = Pending::default();
    let mut announced = false;
    let mut failed_closed = FailedClosed::default();

    loop {
        let due = pending.due().filter(|_| store.listed());
        let publish_due = async {
            match due {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tx.closed() => return,
            next = events.next() => {
                // The watchers retry forever; an end of all streams cannot happen.
                let Some((i, event)) = next else { return };
                let change = handle(&mut store, i, event, &opts);
                pending.note(&change, &opts);
            }
            _ = publish_due => {
                if !announced {
                    info!("initial list of every watched kind complete");
                    announced = true;
                }
                publish(&store, &pending, &tx, &opts, &mut failed_closed);
                pending = Pending::default();
            }
        }
    }
}

/// Applies one watcher event to the store.
fn handle(
    store: &mut Store,
    i: usize,
    event: Result<watcher::Event<DynamicObject>, watcher::Error>,
    opts: &Options,
) -> Change {
    let kind = store
        .kind(i)
        .map(|k| k.resource.kind.clone())
        .unwrap_or_default();
    let change = match event {
        Ok(watcher::Event::Init) => {
            debug!(kind, "list started");
            store.relist_start(i);
            Change::default()
        }
        Ok(watcher::Event::InitApply(obj)) => Change {
            refused: store.relist_item(i, &obj),
            ..Change::default()
        },
        Ok(watcher::Event::InitDone) => {
            debug!(kind, "list complete");
            store.relist_done(i)
        }
        Ok(watcher::Event::Apply(obj)) => store.apply(i, &obj),
        Ok(watcher::Event::Delete(obj)) => store.delete(i, &obj),
        Err(e) => {
            let optional = store.kind(i).is_some_and(|k| k.optional);
            if optional && not_served(&e) {
                if !store.is_listed(i) {
                    info!(kind, "kind not served by the api server (CRD not installed); treating as empty until it is");
                }
                store.absent(i)
            } else {
                warn!(kind, error = %e, "watch failed; retrying with backoff");
                Change::default()
            }
        }
    };
    if let Some(r) = &change.refused {
        warn!(object = %r.object, error = %r.error, "object refused; its last accepted version stays (if it never had one: absent, or failing closed if it is a policy)");
        if let Some(m) = &opts.metrics {
            m.config_rejected(METRICS_SOURCE);
        }
    }
    change
}

/// A 404 on the list: the resource type does not exist in this cluster.
fn not_served(e: &watcher::Error) -> bool {
    matches!(
        e,
        watcher::Error::InitialListFailed(kube::Error::Api(resp)) if resp.code == 404
    )
}

fn publish(
    store: &Store,
    pending: &Pending,
    tx: &watch::Sender<Arc<Model>>,
    opts: &Options,
    failed_closed: &mut FailedClosed,
) {
    if pending.rejections {
        if let Some(r) = &opts.rejections {
            r.send_replace(store.rejections());
        }
    }
    if !pending.model {
        return;
    }
    match store.build() {
        Ok(model) => {
            failed_closed.update(&model, opts);
            tx.send_replace(Arc::new(model));
            if let Some(m) = &opts.metrics {
                m.config_loaded();
            }
            debug!("model published");
        }
        Err(e) => {
            if let Some(m) = &opts.metrics {
                m.config_rejected(METRICS_SOURCE);
            }
            error!(error = %e, "model build failed; keeping the last published model");
        }
    }
}

// === impl FailedClosed ===

/// The refused policies of the last published model, to log when each starts and ends
/// failing closed.
#[derive(Default)]
struct FailedClosed {
    /// `(kind, namespace, name)`.
    current: BTreeSet<(String, String, String)>,
}

impl FailedClosed {
    fn update(&mut self, model: &Model, opts: &Options) {
        let mut now = BTreeSet::new();
        for r in &model.refused_policies {
            let id = (
                r.kind.as_str().to_string(),
                r.namespace.clone(),
                r.name.clone(),
            );
            if !self.current.contains(&id) {
                warn!(
                    kind = r.kind.as_str(),
                    policy = %r.key(),
                    effect = r.effect(),
                    scope = ?r.scope,
                    reason = %r.reason,
                    "refused policy enforced fail closed until it is fixed or deleted"
                );
            }
            now.insert(id);
        }
        for (kind, namespace, name) in self.current.difference(&now) {
            warn!(kind, policy = %format!("{namespace}/{name}"), "refused policy no longer fails closed (fixed or deleted)");
        }
        if let Some(m) = &opts.metrics {
            m.set_failed_closed(
                now.iter()
                    .map(|(k, ns, n)| (k.as_str(), ns.as_str(), n.as_str())),
            );
        }
        self.current = now;
    }
}

// === impl Pending ===

/// Changes not yet published and when they are due.
#[derive(Default)]
struct Pending {
    model: bool,
    rejections: bool,
    /// Last change + debounce.
    quiet_at: Option<Instant>,
    /// First change + max delay.
    deadline: Option<Instant>,
}

impl Pending {
    fn note(&mut self, change: &Change, opts: &Options) {
        if !change.any() {
            return;
        }
        let now = Instant::now();
        self.model |= change.model;
        self.rejections |= change.rejections;
        self.quiet_at = Some(now + opts.debounce);
        self.deadline.get_or_insert(now + opts.max_delay);
    }

    fn due(&self) -> Option<Instant> {
        match (self.quiet_at, self.deadline) {
            (Some(q), Some(d)) => Some(q.min(d)),
            (q, d) => q.or(d),
        }
    }
}

// === impl Retry ===

/// Exponential backoff with jitter, reset by the watcher after any successful event. The
/// jitter spreads the retries of every node's agent after an API server outage.
struct Retry {
    min: Duration,
    max: Duration,
    next: Duration,
    random: RandomState,
}

impl Retry {
    fn new(min: Duration, max: Duration) -> Retry {
        Retry {
            min,
            max,
            next: min,
            random: RandomState::new(),
        }
    }
}

impl Iterator for Retry {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let base = self.next;
        self.next = (base * 2).min(self.max);
        // A uniformly random factor in [0.5, 1.0): `RandomState` is randomly keyed.
        let r = self.random.hash_one(Instant::now()) as f64 / u64::MAX as f64;
        Some(base.mul_f64(0.5 + r / 2.0))
    }
}

impl Backoff for Retry {
    fn reset(&mut self) {
        self.next = self.min;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_double_up_to_the_cap_with_jitter_and_reset() {
        let mut retry = Retry::new(Duration::from_millis(100), Duration::from_millis(350));
        let delays: Vec<Duration> = retry.by_ref().take(4).collect();
        let bases = [100, 200, 350, 350];
        for (d, base) in delays.iter().zip(bases) {
            let base = Duration::from_millis(base);
            assert!(
                *d >= base / 2 && *d <= base,
                "{d:?} not within [{:?}, {base:?}]",
                base / 2
            );
        }
        retry.reset();
        assert!(retry
            .next()
            .is_some_and(|d| d <= Duration::from_millis(100)));
    }
}
