//! A fake Kubernetes API server: plain HTTP/1.1 on 127.0.0.1, reached through a kubeconfig,
//! speaking the real list/watch protocol for the kinds the agent watches.
//!
//! - `GET <collection>` answers a `<Kind>List` whose `metadata.resourceVersion` is the
//!   server's current version; every object carries its own `metadata.resourceVersion`.
//! - `GET <collection>?watch=true&resourceVersion=N` (also `watch=1`) streams newline-delimited
//!   watch events: every change after `N` (`ADDED`, `MODIFIED`, `DELETED`), then a `BOOKMARK`
//!   at the current version, then changes as they happen. A version older than the last
//!   compaction gets one `ERROR` event with a `410 Gone` Status, as a real API server does, and
//!   [`FakeApiServer::expire_watches`] sends that to open watches (forcing a re-list).
//! - `labelSelector` (`key=value`, `key==value`, `key!=value`, `key`, `!key`, comma-separated)
//!   and `fieldSelector` (`field=value`, `field==value`, `field!=value`; `metadata.name`,
//!   `metadata.namespace` and the fields the API server supports for the kind, e.g. a
//!   Secret's `type`; any other field is a `400`, as there) filter lists and watches as the
//!   API server does; an object that stops matching is not turned into a `DELETED` event
//!   (tests do not relabel objects across a selector).
//! - Objects get `metadata.generation` as the API server gives it: 1 when created, one more
//!   on each change of anything but `metadata` and `status`. A Secret's `stringData` is
//!   merged into its `data` (base64), as the API server does (it never returns `stringData`).
//!   Replacing an object with one that has no `status` keeps the status it had, as an
//!   update of the main resource does; one with a `status` sets it (the test playing the
//!   controller or kubelet that would write it).
//! - `GET` of one namespaced object (`.../namespaces/<ns>/<plural>/<name>`, also its
//!   `/status`), and `PATCH` of its `status` subresource with a JSON merge patch
//!   (`application/merge-patch+json`: only `status` changes, a `MODIFIED` event follows, the
//!   generation stays), as a controller writes status; every patch is recorded
//!   ([`FakeApiServer::status_patches`]) and the object can be read back
//!   ([`FakeApiServer::object`]). [`FakeApiServer::fail_status_patches`] makes them fail.
//! - A kind whose CRD is not installed answers `404` with a `NotFound` Status.
//! - A kind's list can be held back ([`FakeApiServer::hold_list`]) to see what the client
//!   does before it has everything.
//! - `POST /apis/authentication.k8s.io/v1/tokenreviews` answers as a real API server does for
//!   the tokens a test registered ([`FakeApiServer::add_token`]): authenticated with the
//!   user and the audiences both sides share; else `authenticated: false` with an error (an
//!   unknown token, no audience in common, or a token bound to a pod that is gone or was
//!   recreated with another uid). [`FakeApiServer::fail_token_reviews`] makes it answer an
//!   error Status instead (RBAC missing, API server failing).
//!
//! One global resource version, like etcd's revision. History is kept whole (tests are small).

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::channel::mpsc;
use futures::SinkExt;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch, Notify};
use tokio::task::JoinHandle;

/// How long [`FakeApiServer::wait_for`] waits for the client to do something.
pub const WAIT: Duration = Duration::from_secs(20);

/// The kinds the agents watch (ztunnel the first 9, a waypoint the first 15, an ingress
/// gateway all): collection path (all namespaces), apiVersion, kind.
pub const KINDS: [(&str, &str, &str); 17] = [
    ("/api/v1/namespaces", "v1", "Namespace"),
    ("/api/v1/serviceaccounts", "v1", "ServiceAccount"),
    ("/api/v1/pods", "v1", "Pod"),
    ("/api/v1/services", "v1", "Service"),
    (
        "/apis/discovery.k8s.io/v1/endpointslices",
        "discovery.k8s.io/v1",
        "EndpointSlice",
    ),
    (
        "/apis/security.istio.io/v1/peerauthentications",
        "security.istio.io/v1",
        "PeerAuthentication",
    ),
    (
        "/apis/security.istio.io/v1/authorizationpolicies",
        "security.istio.io/v1",
        "AuthorizationPolicy",
    ),
    (
        "/apis/gateway.networking.k8s.io/v1/gateways",
        "gateway.networking.k8s.io/v1",
        "Gateway",
    ),
    (
        "/apis/networking.istio.io/v1/serviceentries",
        "networking.istio.io/v1",
        "ServiceEntry",
    ),
    // What a waypoint also watches.
    (
        "/apis/gateway.networking.k8s.io/v1/httproutes",
        "gateway.networking.k8s.io/v1",
        "HTTPRoute",
    ),
    (
        "/apis/gateway.networking.k8s.io/v1/grpcroutes",
        "gateway.networking.k8s.io/v1",
        "GRPCRoute",
    ),
    (
        "/apis/security.istio.io/v1/requestauthentications",
        "security.istio.io/v1",
        "RequestAuthentication",
    ),
    (
        "/apis/networking.istio.io/v1/virtualservices",
        "networking.istio.io/v1",
        "VirtualService",
    ),
    (
        "/apis/networking.istio.io/v1/destinationrules",
        "networking.istio.io/v1",
        "DestinationRule",
    ),
    (
        "/apis/telemetry.istio.io/v1/telemetries",
        "telemetry.istio.io/v1",
        "Telemetry",
    ),
    // What an ingress gateway also watches.
    ("/api/v1/secrets", "v1", "Secret"),
    (
        "/apis/gateway.networking.k8s.io/v1beta1/referencegrants",
        "gateway.networking.k8s.io/v1beta1",
        "ReferenceGrant",
    ),
];

/// The kinds of [`KINDS`] only a waypoint watches (`mesh_kube::Scope::Waypoint`).
pub const WAYPOINT_ONLY_KINDS: [&str; 6] = [
    "HTTPRoute",
    "GRPCRoute",
    "RequestAuthentication",
    "VirtualService",
    "DestinationRule",
    "Telemetry",
];

/// The kinds of [`KINDS`] only an ingress gateway watches (`mesh_kube::Scope::Gateway`).
pub const INGRESS_ONLY_KINDS: [&str; 2] = ["Secret", "ReferenceGrant"];

/// Whether a node agent (`mesh_kube::Scope::Node`) watches `kind`.
pub fn node_watches(kind: &str) -> bool {
    !WAYPOINT_ONLY_KINDS.contains(&kind) && !INGRESS_ONLY_KINDS.contains(&kind)
}

/// Whether a waypoint (`mesh_kube::Scope::Waypoint`) watches `kind`.
pub fn waypoint_watches(kind: &str) -> bool {
    !INGRESS_ONLY_KINDS.contains(&kind)
}

/// Where `TokenReview`s are created.
pub const TOKEN_REVIEWS: &str = "/apis/authentication.k8s.io/v1/tokenreviews";
/// The audience a review asks for when its `spec.audiences` is empty: the API server's own.
pub const API_SERVER_AUDIENCE: &str = "https://kubernetes.default.svc.cluster.local";

/// `status.user.extra` keys of a token bound to a pod (and, since Kubernetes 1.30, its node).
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// Collections served only when Istio's CRDs are installed.
const ISTIO_CRDS: &str = "/apis/security.istio.io/";
/// Collections served only when the Gateway API CRDs are installed.
const GATEWAY_API_CRDS: &str = "/apis/gateway.networking.k8s.io/";

type Body = BoxBody<Bytes, Infallible>;

/// What clients asked for one kind so far.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    pub lists: usize,
    pub watches: usize,
    /// Lists and watches answered `503` during an [`FakeApiServer::outage`].
    pub failed: usize,
    /// `PATCH`es of an object's status (answered or failed).
    pub status_patches: usize,
}

/// Who a registered token belongs to, as `TokenReview` reports it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TokenUser {
    /// `system:serviceaccount:<ns>:<sa>` for a service-account token.
    pub username: String,
    pub uid: String,
    /// Defaults to what the API server gives a service account (see [`TokenUser::service_account`]).
    pub groups: Vec<String>,
    /// The audiences the token was issued for (`aud`).
    pub audiences: Vec<String>,
    /// `authentication.kubernetes.io/pod-name` and the like.
    pub extra: BTreeMap<String, Vec<String>>,
}

impl TokenUser {
    /// A projected token of service account `ns/sa` for `audience`, bound to nothing.
    pub fn service_account(ns: &str, sa: &str, audience: &str) -> TokenUser {
        TokenUser {
            username: format!("system:serviceaccount:{ns}:{sa}"),
            uid: format!("uid-sa-{ns}-{sa}"),
            groups: vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{ns}"),
                "system:authenticated".into(),
            ],
            audiences: vec![audience.into()],
            extra: BTreeMap::new(),
        }
    }

    /// Bound to pod `name` (in the service account's namespace) with `uid`: valid only while
    /// that pod exists with that uid.
    pub fn bound_to_pod(mut self, name: &str, uid: &str) -> TokenUser {
        self.extra.insert(EXTRA_POD_NAME.into(), vec![name.into()]);
        self.extra.insert(EXTRA_POD_UID.into(), vec![uid.into()]);
        self
    }

    /// Naming the node its pod runs on.
    pub fn on_node(mut self, node: &str) -> TokenUser {
        self.extra.insert(EXTRA_NODE_NAME.into(), vec![node.into()]);
        self
    }

    /// The namespace of a service-account username.
    fn namespace(&self) -> Option<&str> {
        let rest = self.username.strip_prefix("system:serviceaccount:")?;
        rest.split_once(':').map(|(ns, _)| ns)
    }
}

/// How [`FakeApiServer::fail_token_reviews`] makes reviews fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReviewFailure {
    /// `403 Forbidden`, as when the reviewer's RBAC lacks `create` on `tokenreviews`.
    Forbidden,
    /// `500 InternalError`, as when the API server cannot reach its authenticator.
    Internal,
    /// No answer at all (an API server wedged, or a network partition).
    Hang,
}

/// Registered tokens and what reviews saw.
#[derive(Default)]
struct Reviews {
    tokens: HashMap<String, TokenUser>,
    failure: Option<ReviewFailure>,
    count: usize,
}

struct Collection {
    api_version: &'static str,
    kind: &'static str,
    installed: bool,
    objects: BTreeMap<(String, String), Value>,
    /// Every change: (resource version, event type, object).
    history: Vec<(u64, &'static str, Value)>,
    /// Watches from a version below this get `410 Gone`.
    compacted: u64,
    requests: Requests,
    /// `true` while lists of this kind are held back.
    hold: watch::Sender<bool>,
}

struct Inner {
    version: u64,
    collections: HashMap<&'static str, Collection>,
    reviews: Reviews,
    /// Lists and watches answer `503` (see [`FakeApiServer::outage`]).
    outage: bool,
    /// Status patches applied, in order.
    patches: Vec<StatusPatch>,
    /// `Some`: status patches answer this error (see [`FakeApiServer::fail_status_patches`]).
    patch_failure: Option<u16>,
}

/// One status `PATCH` the server applied.
#[derive(Clone, Debug, PartialEq)]
pub struct StatusPatch {
    pub kind: String,
    pub namespace: String,
    pub name: String,
    /// The patch as sent (`{"status": ...}`).
    pub patch: Value,
}

#[derive(Clone, Debug)]
enum Broadcast {
    Event {
        path: &'static str,
        version: u64,
        line: Bytes,
        /// The object, for watches with a label or field selector.
        object: Arc<Value>,
    },
    /// Every open watch of `path` gets `410 Gone` and ends.
    Expire { path: &'static str },
    /// Every open watch ends without a word, as when the API server goes away.
    Outage,
}

struct Shared {
    inner: Mutex<Inner>,
    events: broadcast::Sender<Broadcast>,
    /// Woken on every request, for [`FakeApiServer::wait_for`].
    requested: Notify,
}

pub struct FakeApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

// === impl FakeApiServer ===

impl FakeApiServer {
    /// Serves every watched kind (Istio's and the Gateway API's CRDs installed).
    pub async fn start() -> Result<FakeApiServer> {
        Self::start_with(true, true).await
    }

    /// The Istio kinds answer 404, as without Istio's CRDs.
    pub async fn without_istio_crds() -> Result<FakeApiServer> {
        Self::start_with(false, true).await
    }

    /// Gateways answer 404, as in a cluster without the Gateway API CRDs.
    pub async fn without_gateway_api_crds() -> Result<FakeApiServer> {
        Self::start_with(true, false).await
    }

    async fn start_with(istio_crds: bool, gateway_api_crds: bool) -> Result<FakeApiServer> {
        let collections = KINDS
            .iter()
            .map(|&(path, api_version, kind)| {
                let collection = Collection {
                    api_version,
                    kind,
                    installed: (istio_crds || !path.starts_with(ISTIO_CRDS))
                        && (gateway_api_crds || !path.starts_with(GATEWAY_API_CRDS)),
                    objects: BTreeMap::new(),
                    history: Vec::new(),
                    compacted: 0,
                    requests: Requests::default(),
                    hold: watch::channel(false).0,
                };
                (path, collection)
            })
            .collect();
        let shared = Arc::new(Shared {
            inner: Mutex::new(Inner {
                version: 1,
                collections,
                reviews: Reviews::default(),
                outage: false,
                patches: Vec::new(),
                patch_failure: None,
            }),
            events: broadcast::channel(1024).0,
            requested: Notify::new(),
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .context("bind the fake api server")?;
        let addr = listener.local_addr()?;
        let task = tokio::spawn(serve(listener, shared.clone()));
        Ok(FakeApiServer { addr, shared, task })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig for this server into `dir` and returns its path.
    pub fn write_kubeconfig(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             users:\n\
             - name: agent\n  user:\n    token: not-checked\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: agent\n\
             current-context: fake\n",
            url = self.url()
        );
        std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    }

    /// A client for this server, configured from a kubeconfig file as an operator's would be.
    pub async fn client(&self, dir: &Path) -> Result<kube::Client> {
        let path = self.write_kubeconfig(dir)?;
        let kubeconfig = kube::config::Kubeconfig::read_from(&path)?;
        let config = kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?;
        Ok(kube::Client::try_from(config)?)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates or replaces an object (an `ADDED` or `MODIFIED` event). `obj` names its `kind`.
    pub fn apply(&self, mut obj: Value) -> Result<()> {
        let kind = obj["kind"]
            .as_str()
            .context("object without kind")?
            .to_owned();
        let key = key_of(&obj)?;
        let mut inner = self.lock();
        inner.version += 1;
        let version = inner.version;
        let (path, c) = inner.collection(&kind)?;
        obj["metadata"]["resourceVersion"] = json!(version.to_string());
        if kind == "Secret" {
            string_data_into_data(&mut obj);
        }
        if obj.get("status").is_none() {
            if let Some(status) = c.objects.get(&key).and_then(|old| old.get("status")) {
                obj["status"] = status.clone();
            }
        }
        let generation = match c.objects.get(&key) {
            None => 1,
            Some(old) => {
                let old_generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
                if without_metadata_and_status(old) == without_metadata_and_status(&obj) {
                    old_generation
                } else {
                    old_generation + 1
                }
            }
        };
        obj["metadata"]["generation"] = json!(generation);
        let event = if c.objects.insert(key, obj.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        c.history.push((version, event, obj.clone()));
        let _ = self.shared.events.send(Broadcast::Event {
            path,
            version,
            line: event_line(event, &obj),
            object: Arc::new(obj),
        });
        Ok(())
    }

    /// The object as the server holds it now (with its resource version, generation and
    /// status), if it exists.
    pub fn object(&self, kind: &str, namespace: &str, name: &str) -> Result<Option<Value>> {
        let mut inner = self.lock();
        let (_, c) = inner.collection(kind)?;
        Ok(c.objects
            .get(&(namespace.to_owned(), name.to_owned()))
            .cloned())
    }

    /// The status patches applied to objects of `kind`, in order.
    pub fn status_patches(&self, kind: &str) -> Vec<StatusPatch> {
        self.lock()
            .patches
            .iter()
            .filter(|p| p.kind == kind)
            .cloned()
            .collect()
    }

    /// `Some(code)`: every status `PATCH` answers that error Status (`403`: RBAC without
    /// `patch` on the status subresource; `500`); `None`: they apply again.
    pub fn fail_status_patches(&self, code: Option<u16>) {
        self.lock().patch_failure = code;
    }

    /// Waits until `done` holds for object `kind` `namespace/name` as the server holds it
    /// (checked after every request the server answers) and returns it.
    pub async fn wait_for_object(
        &self,
        what: &str,
        (kind, namespace, name): (&str, &str, &str),
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let wait = async {
            loop {
                let notified = self.shared.requested.notified();
                if let Some(obj) = self.object(kind, namespace, name)? {
                    if done(&obj) {
                        return Ok::<Value, anyhow::Error>(obj);
                    }
                }
                notified.await;
            }
        };
        let last = || self.object(kind, namespace, name).ok().flatten();
        match tokio::time::timeout(WAIT, wait).await {
            Ok(found) => found,
            Err(_) => {
                bail!(
                "fake api server: timed out waiting for {what}; {kind} {namespace}/{name} is {}",
                last().map(|o| o.to_string()).unwrap_or_else(|| "absent".into())
            )
            }
        }
    }

    /// Deletes an object (a `DELETED` event).
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<()> {
        let mut inner = self.lock();
        inner.version += 1;
        let version = inner.version;
        let (path, c) = inner.collection(kind)?;
        let Some(mut obj) = c.objects.remove(&(namespace.to_owned(), name.to_owned())) else {
            bail!("delete {kind} {namespace}/{name}: no such object");
        };
        obj["metadata"]["resourceVersion"] = json!(version.to_string());
        c.history.push((version, "DELETED", obj.clone()));
        let _ = self.shared.events.send(Broadcast::Event {
            path,
            version,
            line: event_line("DELETED", &obj),
            object: Arc::new(obj),
        });
        Ok(())
    }

    /// Deletes an object without telling any watch, as when the event is lost to a
    /// compaction: only a re-list shows the object is gone.
    pub fn delete_silently(&self, kind: &str, namespace: &str, name: &str) -> Result<()> {
        let mut inner = self.lock();
        inner.version += 1;
        let (_, c) = inner.collection(kind)?;
        c.objects
            .remove(&(namespace.to_owned(), name.to_owned()))
            .with_context(|| format!("delete {kind} {namespace}/{name}: no such object"))?;
        Ok(())
    }

    /// Compacts history: every version so far is too old to watch from, and open watches of
    /// `kind` get `410 Gone`.
    pub fn expire_watches(&self, kind: &str) -> Result<()> {
        let mut inner = self.lock();
        inner.version += 1;
        let version = inner.version;
        let (path, c) = inner.collection(kind)?;
        c.compacted = version;
        let _ = self.shared.events.send(Broadcast::Expire { path });
        Ok(())
    }

    /// `true`: the API server is unavailable, as in an upgrade of the control plane or a
    /// partition: every open watch ends, and lists and watches answer `503
    /// ServiceUnavailable` (counted in [`Requests::failed`]) until called with `false`.
    /// Changes applied meanwhile are kept and served afterwards.
    pub fn outage(&self, down: bool) {
        self.lock().outage = down;
        if down {
            let _ = self.shared.events.send(Broadcast::Outage);
        }
    }

    /// Lists of `kind` wait until [`FakeApiServer::release_list`].
    pub fn hold_list(&self, kind: &str) -> Result<()> {
        let mut inner = self.lock();
        let (_, c) = inner.collection(kind)?;
        c.hold.send_replace(true);
        Ok(())
    }

    pub fn release_list(&self, kind: &str) -> Result<()> {
        let mut inner = self.lock();
        let (_, c) = inner.collection(kind)?;
        c.hold.send_replace(false);
        Ok(())
    }

    /// Registers a token: reviews of it answer `user` (while its audiences and bound pod
    /// hold). Registering it again replaces the user.
    pub fn add_token(&self, token: &str, user: TokenUser) {
        self.lock().reviews.tokens.insert(token.to_owned(), user);
    }

    /// Forgets a token (as when it expired): reviews answer not authenticated.
    pub fn remove_token(&self, token: &str) {
        self.lock().reviews.tokens.remove(token);
    }

    /// `Some`: every review answers that error Status; `None`: reviews are answered again.
    pub fn fail_token_reviews(&self, failure: Option<ReviewFailure>) {
        self.lock().reviews.failure = failure;
    }

    /// How many `TokenReview`s were asked for (answered or failed).
    pub fn token_reviews(&self) -> usize {
        self.lock().reviews.count
    }

    /// What clients asked for `kind` so far.
    pub fn requests(&self, kind: &str) -> Result<Requests> {
        let mut inner = self.lock();
        Ok(inner.collection(kind)?.1.requests)
    }

    /// Waits until `done` holds for the request counts of every kind, by kind name.
    pub async fn wait_for(
        &self,
        what: &str,
        done: impl Fn(&HashMap<&'static str, Requests>) -> bool,
    ) -> Result<()> {
        let wait = async {
            loop {
                let notified = self.shared.requested.notified();
                let counts: HashMap<&'static str, Requests> = self
                    .lock()
                    .collections
                    .values()
                    .map(|c| (c.kind, c.requests))
                    .collect();
                if done(&counts) {
                    return counts;
                }
                notified.await;
            }
        };
        tokio::time::timeout(WAIT, wait)
            .await
            .map(|_| ())
            .with_context(|| format!("fake api server: timed out waiting for {what}"))
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === impl Inner ===

impl Inner {
    fn collection(&mut self, kind: &str) -> Result<(&'static str, &mut Collection)> {
        self.collections
            .iter_mut()
            .find(|(_, c)| c.kind == kind)
            .map(|(path, c)| (*path, c))
            .with_context(|| format!("the fake api server does not serve kind {kind}"))
    }
}

/// A Secret's `stringData` written into its `data`, base64-encoded (winning over a `data`
/// entry of the same key), and dropped.
fn string_data_into_data(secret: &mut Value) {
    use base64::Engine as _;
    let Some(fields) = secret.as_object_mut() else {
        return;
    };
    let Some(Value::Object(strings)) = fields.remove("stringData") else {
        return;
    };
    let data = fields.entry("data").or_insert_with(|| json!({}));
    if !data.is_object() {
        *data = json!({});
    }
    for (key, value) in strings {
        let text = value.as_str().unwrap_or_default();
        let encoded = base64::engine::general_purpose::STANDARD.encode(text);
        data[key.as_str()] = Value::String(encoded);
    }
}

/// The object without `metadata` and `status`: what a change of bumps the generation.
fn without_metadata_and_status(obj: &Value) -> Value {
    let mut rest = obj.clone();
    if let Some(fields) = rest.as_object_mut() {
        fields.remove("metadata");
        fields.remove("status");
    }
    rest
}

fn key_of(obj: &Value) -> Result<(String, String)> {
    let meta = &obj["metadata"];
    let name = meta["name"]
        .as_str()
        .context("object without metadata.name")?;
    let namespace = meta["namespace"].as_str().unwrap_or_default();
    Ok((namespace.to_owned(), name.to_owned()))
}

fn event_line(event: &str, obj: &Value) -> Bytes {
    let mut line = json!({"type": event, "object": obj}).to_string();
    line.push('\n');
    Bytes::from(line)
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    })
}

// === the HTTP side ===

async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(route(&shared, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn full(code: StatusCode, body: &Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *resp.status_mut() = code;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

async fn route(shared: &Arc<Shared>, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if path == TOKEN_REVIEWS {
        if req.method() != http::Method::POST {
            return full(
                StatusCode::METHOD_NOT_ALLOWED,
                &status(405, "MethodNotAllowed", "tokenreviews can only be created"),
            );
        }
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(e) => {
                return full(
                    StatusCode::BAD_REQUEST,
                    &status(400, "BadRequest", &format!("read the body: {e}")),
                )
            }
        };
        let hang = {
            let mut inner = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
            let hang = inner.reviews.failure == Some(ReviewFailure::Hang);
            if hang {
                inner.reviews.count += 1;
            }
            hang
        };
        if hang {
            shared.requested.notify_waiters();
            std::future::pending::<()>().await;
        }
        let (code, answer) = token_review(shared, &body);
        shared.requested.notify_waiters();
        return full(code, &answer);
    }
    let query: HashMap<String, String> = req
        .uri()
        .query()
        .unwrap_or_default()
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
    let watching = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let bad_request =
        |message: &str| full(StatusCode::BAD_REQUEST, &status(400, "BadRequest", message));
    let labels = match query
        .get("labelSelector")
        .map(|s| Selector::parse(&percent_decode(s)))
    {
        None => Selector::default(),
        Some(Ok(selector)) => selector,
        Some(Err(e)) => return bad_request(&format!("unable to parse requirement: {e}")),
    };
    let fields = match query
        .get("fieldSelector")
        .map(|s| Selector::parse_fields(&percent_decode(s)))
    {
        None => Selector::default(),
        Some(Ok(selector)) => selector,
        Some(Err(e)) => return bad_request(&e),
    };
    if let Some(object) = ObjectPath::parse(&path) {
        return object_request(shared, req, object).await;
    }
    let not_found = || {
        full(
            StatusCode::NOT_FOUND,
            &status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        )
    };
    let hold = {
        let mut inner = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        let outage = inner.outage;
        let Some(c) = inner.collections.get_mut(path.as_str()) else {
            return not_found();
        };
        if watching {
            c.requests.watches += 1;
        } else {
            c.requests.lists += 1;
        }
        shared.requested.notify_waiters();
        if !c.installed {
            return not_found();
        }
        if let Some(field) = fields.unsupported(c.kind) {
            return bad_request(&format!("field label not supported: {field}"));
        }
        if outage {
            c.requests.failed += 1;
            return full(
                StatusCode::SERVICE_UNAVAILABLE,
                &status(
                    503,
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request",
                ),
            );
        }
        c.hold.subscribe()
    };
    if watching {
        let version = query
            .get("resourceVersion")
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        watch_response(shared, &path, version, Filter { labels, fields })
    } else {
        // Held lists wait; a dropped sender (server gone) ends the wait.
        let mut hold = hold;
        let _ = hold.wait_for(|held| !held).await;
        list_response(shared, &path, &Filter { labels, fields })
    }
}

/// `<collection prefix>/namespaces/<ns>/<plural>/<name>[/<subresource>]`: one namespaced
/// object (or its subresource), and the all-namespaces collection it is served from.
#[derive(Debug, PartialEq, Eq)]
struct ObjectPath {
    /// The all-namespaces collection path, as in [`KINDS`].
    collection: String,
    namespace: String,
    name: String,
    subresource: Option<String>,
}

impl ObjectPath {
    fn parse(path: &str) -> Option<ObjectPath> {
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        // `api/v1` or `apis/<group>/<version>`.
        let prefix_len = match segments.first() {
            Some(&"api") => 2,
            Some(&"apis") => 3,
            _ => return None,
        };
        let rest = segments.get(prefix_len..)?;
        let (namespace, plural, name, subresource) = match rest {
            ["namespaces", ns, plural, name] => (ns, plural, name, None),
            ["namespaces", ns, plural, name, sub] => (ns, plural, name, Some(sub.to_string())),
            _ => return None,
        };
        if [namespace, plural, name].iter().any(|s| s.is_empty()) {
            return None;
        }
        let prefix = segments.get(..prefix_len)?.join("/");
        Some(ObjectPath {
            collection: format!("/{prefix}/{plural}"),
            namespace: namespace.to_string(),
            name: name.to_string(),
            subresource,
        })
    }
}

/// `GET` of one object (or its `status`), `PATCH` of its `status` with a JSON merge patch.
async fn object_request(
    shared: &Arc<Shared>,
    req: Request<Incoming>,
    at: ObjectPath,
) -> Response<Body> {
    let not_found = |what: &str| full(StatusCode::NOT_FOUND, &status(404, "NotFound", what));
    let method = req.method().clone();
    let patch_type = req
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return full(
                StatusCode::BAD_REQUEST,
                &status(400, "BadRequest", &format!("read the body: {e}")),
            )
        }
    };
    let answer = {
        let mut guard = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        let inner = &mut *guard;
        let outage = inner.outage;
        let failure = inner.patch_failure;
        let found = inner
            .collections
            .iter_mut()
            .find(|(p, _)| **p == at.collection);
        let Some((&path, c)) = found else {
            return not_found("the server could not find the requested resource");
        };
        let key = (at.namespace.clone(), at.name.clone());
        let described = format!("{} {:?} not found", c.kind, at.name);
        match (&method, at.subresource.as_deref()) {
            _ if !c.installed => not_found("the server could not find the requested resource"),
            _ if outage => full(
                StatusCode::SERVICE_UNAVAILABLE,
                &status(
                    503,
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request",
                ),
            ),
            (&http::Method::GET, None | Some("status")) => match c.objects.get(&key) {
                Some(obj) => full(StatusCode::OK, obj),
                None => not_found(&described),
            },
            (&http::Method::PATCH, Some("status")) => {
                c.requests.status_patches += 1;
                let kind = c.kind;
                if patch_type.as_deref() != Some("application/merge-patch+json") {
                    full(
                        StatusCode::UNSUPPORTED_MEDIA_TYPE,
                        &status(
                            415,
                            "UnsupportedMediaType",
                            "only JSON merge patches are served",
                        ),
                    )
                } else if let Some(code) = failure {
                    let reason = if code == 403 {
                        "Forbidden"
                    } else {
                        "InternalError"
                    };
                    let message = format!(
                        "{} \"{}\" is forbidden or failing (the test said {code})",
                        c.kind, at.name
                    );
                    full(
                        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                        &status(code, reason, &message),
                    )
                } else {
                    match (
                        serde_json::from_slice::<Value>(&body),
                        c.objects.get(&key).cloned(),
                    ) {
                        (Ok(patch), Some(mut obj)) if patch.is_object() => {
                            merge_patch(&mut obj["status"], &patch["status"]);
                            inner.version += 1;
                            let version = inner.version;
                            obj["metadata"]["resourceVersion"] = json!(version.to_string());
                            c.objects.insert(key, obj.clone());
                            c.history.push((version, "MODIFIED", obj.clone()));
                            inner.patches.push(StatusPatch {
                                kind: kind.to_string(),
                                namespace: at.namespace.clone(),
                                name: at.name.clone(),
                                patch,
                            });
                            let _ = shared.events.send(Broadcast::Event {
                                path,
                                version,
                                line: event_line("MODIFIED", &obj),
                                object: Arc::new(obj.clone()),
                            });
                            full(StatusCode::OK, &obj)
                        }
                        (_, None) => not_found(&described),
                        _ => full(
                            StatusCode::BAD_REQUEST,
                            &status(400, "BadRequest", "the body is not a JSON object"),
                        ),
                    }
                }
            }
            _ => full(
                StatusCode::METHOD_NOT_ALLOWED,
                &status(
                    405,
                    "MethodNotAllowed",
                    "the fake serves GET of objects and PATCH of their status",
                ),
            ),
        }
    };
    shared.requested.notify_waiters();
    answer
}

/// RFC 7386: `patch` merged into `target` (an object's members recursively, `null` removes a
/// member, anything else replaces the target, lists included).
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(fields) = target {
        for (key, value) in members {
            if value.is_null() {
                fields.remove(key);
            } else {
                merge_patch(fields.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// Answers one `TokenReview` (the request body): `201 Created` with the review and its
/// status, `400` for a body that is not one, or the failure set by the test.
fn token_review(shared: &Shared, body: &[u8]) -> (StatusCode, Value) {
    let mut inner = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
    inner.reviews.count += 1;
    match inner.reviews.failure {
        Some(ReviewFailure::Forbidden) => {
            return (
                StatusCode::FORBIDDEN,
                status(
                    403,
                    "Forbidden",
                    "tokenreviews.authentication.k8s.io is forbidden: User \"system:serviceaccount:istio-system:control\" cannot create resource \"tokenreviews\" in API group \"authentication.k8s.io\" at the cluster scope",
                ),
            )
        }
        Some(ReviewFailure::Internal) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                status(500, "InternalError", "Internal error occurred: authenticator unavailable"),
            )
        }
        Some(ReviewFailure::Hang) | None => {}
    }
    let review: Value = match serde_json::from_slice(body) {
        Ok(v @ Value::Object(_)) if v["kind"] == "TokenReview" => v,
        _ => {
            return (
                StatusCode::BAD_REQUEST,
                status(400, "BadRequest", "the body is not a TokenReview"),
            )
        }
    };
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let mut wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if wanted.is_empty() {
        wanted.push(API_SERVER_AUDIENCE.to_owned());
    }
    let outcome = check_token(&inner, token, &wanted);
    let status = match outcome {
        Ok((user, audiences)) => json!({
            "authenticated": true,
            "user": {
                "username": user.username,
                "uid": user.uid,
                "groups": user.groups,
                "extra": user.extra,
            },
            "audiences": audiences,
        }),
        // A real API server leaves `authenticated` out when false, and the user empty.
        Err(error) => json!({"user": {}, "error": error}),
    };
    let answer = json!({
        "kind": "TokenReview",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"creationTimestamp": null},
        "spec": review["spec"],
        "status": status,
    });
    (StatusCode::CREATED, answer)
}

/// The user of `token` and the audiences of `wanted` it is valid for, or why it is not valid.
fn check_token(
    inner: &Inner,
    token: &str,
    wanted: &[String],
) -> std::result::Result<(TokenUser, Vec<String>), String> {
    let invalid = |why: &str| format!("[invalid bearer token, {why}]");
    let user = inner
        .reviews
        .tokens
        .get(token)
        .ok_or_else(|| invalid("token lookup failed"))?;
    let audiences: Vec<String> = wanted
        .iter()
        .filter(|a| user.audiences.contains(a))
        .cloned()
        .collect();
    if audiences.is_empty() {
        return Err(invalid(
            "token audiences is invalid for the target audiences",
        ));
    }
    if let Some(pod) = user.extra.get(EXTRA_POD_NAME).and_then(|v| v.first()) {
        let namespace = user.namespace().unwrap_or_default();
        let found = inner
            .collections
            .values()
            .find(|c| c.kind == "Pod")
            .and_then(|c| c.objects.get(&(namespace.to_owned(), pod.clone())));
        let Some(found) = found else {
            return Err(invalid(&format!(
                "pods \"{pod}\" not found: the bound object was deleted"
            )));
        };
        let bound_uid = user.extra.get(EXTRA_POD_UID).and_then(|v| v.first());
        if let Some(uid) = bound_uid {
            if found["metadata"]["uid"].as_str() != Some(uid.as_str()) {
                return Err(invalid(&format!(
                    "the UID in the bound object reference ({uid}) does not match the UID in record; the object might have been deleted and then recreated"
                )));
            }
        }
    }
    Ok((user.clone(), audiences))
}

/// A parsed `labelSelector`: every requirement must hold.
#[derive(Clone, Debug, Default)]
struct Selector(Vec<Requirement>);

#[derive(Clone, Debug)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    Exists(String),
    NotExists(String),
}

/// A list's or watch's `labelSelector` and `fieldSelector`.
#[derive(Clone, Debug, Default)]
struct Filter {
    labels: Selector,
    fields: Selector,
}

impl Filter {
    fn matches(&self, obj: &Value) -> bool {
        self.labels.matches(&obj["metadata"]["labels"]) && self.fields.matches_fields(obj)
    }
}

/// The fields every kind can be selected by, as the API server allows them.
const COMMON_FIELDS: [&str; 2] = ["metadata.name", "metadata.namespace"];

/// The other fields the API server lets a list of `kind` be selected by (those the tests
/// may use; a field the real server would refuse is refused).
fn kind_fields(kind: &str) -> &'static [&'static str] {
    match kind {
        "Secret" => &["type"],
        "Pod" => &[
            "spec.nodeName",
            "spec.serviceAccountName",
            "status.phase",
            "status.podIP",
        ],
        "Namespace" => &["status.phase"],
        _ => &[],
    }
}

impl Selector {
    /// A `fieldSelector`: only `=`, `==` and `!=`.
    fn parse_fields(text: &str) -> std::result::Result<Selector, String> {
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let requirement = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==") {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once('=') {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else {
                return Err(format!(
                    "invalid selector: '{text}'; can't understand '{part}'"
                ));
            };
            requirements.push(requirement);
        }
        Ok(Selector(requirements))
    }

    /// The first field of a field selector the API server does not support for `kind`.
    fn unsupported(&self, kind: &str) -> Option<&str> {
        self.0.iter().find_map(|r| {
            let field = match r {
                Requirement::Equals(f, _) | Requirement::NotEquals(f, _) => f.as_str(),
                Requirement::Exists(f) | Requirement::NotExists(f) => f.as_str(),
            };
            let known = COMMON_FIELDS.contains(&field) || kind_fields(kind).contains(&field);
            (!known).then_some(field)
        })
    }

    /// Whether `obj` matches as a field selector: a missing field is the empty string.
    fn matches_fields(&self, obj: &Value) -> bool {
        let get = |path: &str| {
            let mut v = obj;
            for part in path.split('.') {
                v = &v[part];
            }
            match v {
                Value::String(s) => s.clone(),
                Value::Null => String::new(),
                other => other.to_string(),
            }
        };
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => get(k) == *v,
            Requirement::NotEquals(k, v) => get(k) != *v,
            Requirement::Exists(_) | Requirement::NotExists(_) => false,
        })
    }

    fn parse(text: &str) -> std::result::Result<Selector, String> {
        let mut requirements = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let requirement = if let Some((k, v)) = part.split_once("!=") {
                Requirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once("==") {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = part.split_once('=') {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some(k) = part.strip_prefix('!') {
                Requirement::NotExists(k.trim().into())
            } else if part.contains(' ') {
                return Err(format!("{part:?}: set-based selectors are not supported"));
            } else {
                Requirement::Exists(part.into())
            };
            requirements.push(requirement);
        }
        Ok(Selector(requirements))
    }

    /// Whether an object with these `metadata.labels` (`null` when it has none) matches.
    fn matches(&self, labels: &Value) -> bool {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => get(k) == Some(v.as_str()),
            // As the API server: a missing label is "not equal".
            Requirement::NotEquals(k, v) => get(k) != Some(v.as_str()),
            Requirement::Exists(k) => get(k).is_some(),
            Requirement::NotExists(k) => get(k).is_none(),
        })
    }
}

/// `%XX` escapes and `+` of a query value decoded (kube-rs form-encodes its parameters).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escaped = match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) => hex(h).zip(hex(l)).map(|(h, l)| (h * 16 + l) as u8),
            _ => None,
        };
        match escaped {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(if bytes[i] == b'+' { b' ' } else { bytes[i] });
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn list_response(shared: &Shared, path: &str, filter: &Filter) -> Response<Body> {
    let inner = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
    let Some(c) = inner.collections.get(path) else {
        return full(StatusCode::NOT_FOUND, &status(404, "NotFound", "gone"));
    };
    let list = json!({
        "kind": format!("{}List", c.kind),
        "apiVersion": c.api_version,
        "metadata": {"resourceVersion": inner.version.to_string()},
        "items": c
            .objects
            .values()
            .filter(|o| filter.matches(o))
            .collect::<Vec<_>>(),
    });
    full(StatusCode::OK, &list)
}

fn watch_response(shared: &Shared, path: &str, from: u64, filter: Filter) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(64);
    let body = StreamBody::new(rx).boxed();
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );

    // Subscribed under the lock that orders changes, so that nothing falls between the
    // replayed history and the live events.
    let (backlog, live, current, key) = {
        let inner = shared.inner.lock().unwrap_or_else(|e| e.into_inner());
        let Some((key, c)) = inner.collections.get_key_value(path) else {
            return full(StatusCode::NOT_FOUND, &status(404, "NotFound", "gone"));
        };
        if from < c.compacted {
            let gone = status(
                410,
                "Expired",
                &format!("too old resource version: {from} ({})", c.compacted),
            );
            let line = event_line("ERROR", &gone);
            tokio::spawn(async move {
                let mut tx = tx;
                let _ = tx.send(Ok(Frame::data(line))).await;
            });
            return resp;
        }
        let backlog: Vec<Bytes> = c
            .history
            .iter()
            .filter(|(v, _, obj)| *v > from && filter.matches(obj))
            .map(|(_, event, obj)| event_line(event, obj))
            .collect();
        let bookmark = json!({
            "kind": c.kind,
            "apiVersion": c.api_version,
            "metadata": {"resourceVersion": inner.version.to_string()},
        });
        let mut backlog = backlog;
        backlog.push(event_line("BOOKMARK", &bookmark));
        (backlog, shared.events.subscribe(), inner.version, *key)
    };
    tokio::spawn(async move {
        let mut tx = tx;
        let mut live = live;
        for line in backlog {
            if tx.send(Ok(Frame::data(line))).await.is_err() {
                return;
            }
        }
        loop {
            match live.recv().await {
                Ok(Broadcast::Event {
                    path,
                    version,
                    line,
                    object,
                }) if path == key && version > current && filter.matches(&object) => {
                    if tx.send(Ok(Frame::data(line))).await.is_err() {
                        return;
                    }
                }
                Ok(Broadcast::Outage) => return,
                Ok(Broadcast::Expire { path }) if path == key => {
                    let gone = status(410, "Expired", "too old resource version");
                    let _ = tx.send(Ok(Frame::data(event_line("ERROR", &gone)))).await;
                    return;
                }
                Ok(_) => {}
                // Lagged or closed: end the watch; the client resumes from its last version.
                Err(_) => return,
            }
        }
    });
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use mesh_kube::token_review::{review_token, ReviewError};

    fn pod(name: &str, uid: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": "istio-system", "uid": uid},
               "spec": {"nodeName": "n1", "serviceAccountName": "ztunnel"}})
    }

    /// `Ok(username)` or the rejection's message; `Unavailable` panics.
    async fn review(client: &kube::Client, token: &str, audience: &str) -> Result<String, String> {
        match review_token(client, token, audience).await {
            Ok(user) => Ok(user.username),
            Err(ReviewError::Rejected(m)) => Err(m),
            Err(e @ ReviewError::Unavailable(_)) => panic!("{e}"),
        }
    }

    /// Lists and watches honour `labelSelector` as the API server does (a missing label is
    /// "not equal"), as the agents' EndpointSlice watch relies on.
    #[tokio::test]
    async fn lists_and_watches_filter_by_label_selector() {
        use futures::{StreamExt, TryStreamExt};
        use kube::api::{Api, DynamicObject, ListParams, WatchParams};
        use kube::discovery::ApiResource;

        let slice = |name: &str, managed_by: Option<&str>| {
            let labels = match managed_by {
                Some(m) => json!({"kubernetes.io/service-name": "db",
                                  "endpointslice.kubernetes.io/managed-by": m}),
                None => json!({"kubernetes.io/service-name": "db"}),
            };
            json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                   "metadata": {"name": name, "namespace": "shop", "labels": labels},
                   "addressType": "IPv4", "endpoints": [], "ports": []})
        };
        let fake = FakeApiServer::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let client = fake.client(dir.path()).await.unwrap();
        fake.apply(slice("manual", None)).unwrap();
        fake.apply(slice("derived", Some("endpointslice-controller.k8s.io")))
            .unwrap();
        fake.apply(slice(
            "mirrored",
            Some("endpointslicemirroring-controller.k8s.io"),
        ))
        .unwrap();
        let selector = "endpointslice.kubernetes.io/managed-by!=endpointslice-controller.k8s.io";
        let resource = ApiResource::erase::<k8s_openapi::api::discovery::v1::EndpointSlice>(&());
        let api: Api<DynamicObject> = Api::all_with(client, &resource);
        let names = |items: Vec<DynamicObject>| {
            let mut n: Vec<String> = items.into_iter().filter_map(|o| o.metadata.name).collect();
            n.sort();
            n
        };
        let list = api
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap();
        let version = list.metadata.resource_version.clone().unwrap();
        assert_eq!(names(list.items), ["manual", "mirrored"]);

        let mut events = api
            .watch(&WatchParams::default().labels(selector), &version)
            .await
            .unwrap()
            .boxed();
        fake.apply(slice("derived-2", Some("endpointslice-controller.k8s.io")))
            .unwrap();
        fake.apply(slice("manual-2", None)).unwrap();
        let first = async {
            loop {
                match events.try_next().await.unwrap() {
                    Some(kube::api::WatchEvent::Bookmark(_)) => continue,
                    other => return other,
                }
            }
        };
        match tokio::time::timeout(WAIT, first).await.unwrap() {
            Some(kube::api::WatchEvent::Added(o)) => {
                assert_eq!(o.metadata.name.as_deref(), Some("manual-2"))
            }
            other => panic!("{other:?}"),
        }
    }

    fn secret(name: &str, type_: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": name, "namespace": "shop"},
               "type": type_, "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5"}})
    }

    #[test]
    fn a_secrets_string_data_is_stored_as_data() {
        let fake = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(FakeApiServer::start())
            .unwrap();
        let mut s = secret("cert", "kubernetes.io/tls");
        s["stringData"] = json!({"tls.key": "key", "extra": "x"});
        fake.apply(s).unwrap();
        let stored = fake.object("Secret", "shop", "cert").unwrap().unwrap();
        assert_eq!(
            stored["data"],
            json!({"tls.crt": "Y2VydA==", "tls.key": "a2V5", "extra": "eA=="})
        );
        assert!(stored.get("stringData").is_none());
    }

    /// Lists and watches honour `fieldSelector` (`=`, `!=`) as the API server does, as the
    /// ingress gateway's Secret watch relies on; a field it does not support is a 400.
    #[tokio::test]
    async fn lists_and_watches_filter_by_field_selector() {
        use futures::{StreamExt, TryStreamExt};
        use kube::api::{Api, ListParams, WatchParams};

        let fake = FakeApiServer::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let client = fake.client(dir.path()).await.unwrap();
        fake.apply(secret("cert", "kubernetes.io/tls")).unwrap();
        fake.apply(secret("token", "kubernetes.io/service-account-token"))
            .unwrap();
        fake.apply(secret("creds", "Opaque")).unwrap();
        let api: Api<k8s_openapi::api::core::v1::Secret> = Api::all(client);
        let names = |items: Vec<k8s_openapi::api::core::v1::Secret>| {
            let mut n: Vec<String> = items.into_iter().filter_map(|o| o.metadata.name).collect();
            n.sort();
            n
        };
        let tls = "type=kubernetes.io/tls";
        let list = api.list(&ListParams::default().fields(tls)).await.unwrap();
        let version = list.metadata.resource_version.clone().unwrap();
        assert_eq!(names(list.items), ["cert"]);
        let others = api
            .list(&ListParams::default().fields("type!=kubernetes.io/tls"))
            .await
            .unwrap();
        assert_eq!(names(others.items), ["creds", "token"]);
        let both = api
            .list(&ListParams::default().fields("type=Opaque,metadata.name!=creds"))
            .await
            .unwrap();
        assert!(both.items.is_empty());
        let bad = api
            .list(&ListParams::default().fields("data.tls.key=a2V5"))
            .await
            .unwrap_err();
        assert!(
            bad.to_string().contains("field label not supported"),
            "{bad}"
        );

        let mut events = api
            .watch(&WatchParams::default().fields(tls), &version)
            .await
            .unwrap()
            .boxed();
        fake.apply(secret("creds-2", "Opaque")).unwrap();
        fake.apply(secret("cert-2", "kubernetes.io/tls")).unwrap();
        let first = async {
            loop {
                match events.try_next().await.unwrap() {
                    Some(kube::api::WatchEvent::Bookmark(_)) => continue,
                    other => return other,
                }
            }
        };
        match tokio::time::timeout(WAIT, first).await.unwrap() {
            Some(kube::api::WatchEvent::Added(o)) => {
                assert_eq!(o.metadata.name.as_deref(), Some("cert-2"))
            }
            other => panic!("{other:?}"),
        }
    }

    fn gateway(listener_port: u16) -> Value {
        json!({"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
               "metadata": {"name": "web", "namespace": "shop"},
               "spec": {"gatewayClassName": "istio",
                        "listeners": [{"name": "http", "port": listener_port, "protocol": "HTTP"}]}})
    }

    /// A status merge patch changes only the status (not the generation), is recorded, is
    /// read back, and reaches watches; the generation counts spec changes only.
    #[tokio::test]
    async fn a_status_patch_is_applied_recorded_and_watched() {
        use futures::{StreamExt, TryStreamExt};
        use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};

        let fake = FakeApiServer::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let client = fake.client(dir.path()).await.unwrap();
        fake.apply(gateway(80)).unwrap();
        let key = ("Gateway", "shop", "web");
        let generation = |o: &Value| o["metadata"]["generation"].as_i64();
        assert_eq!(
            fake.object(key.0, key.1, key.2)
                .unwrap()
                .as_ref()
                .and_then(generation),
            Some(1)
        );
        fake.apply(gateway(80)).unwrap();
        assert_eq!(
            fake.object(key.0, key.1, key.2)
                .unwrap()
                .as_ref()
                .and_then(generation),
            Some(1)
        );
        fake.apply(gateway(8080)).unwrap();
        assert_eq!(
            fake.object(key.0, key.1, key.2)
                .unwrap()
                .as_ref()
                .and_then(generation),
            Some(2)
        );
        // The spec applied again without a status keeps the status written before.
        let mut with_status = gateway(8080);
        with_status["status"] = json!({"addresses": [{"value": "10.0.0.1"}]});
        fake.apply(with_status).unwrap();
        fake.apply(gateway(8080)).unwrap();
        let kept = fake.object(key.0, key.1, key.2).unwrap().unwrap();
        assert_eq!(kept["status"]["addresses"][0]["value"], "10.0.0.1");
        assert_eq!(kept["metadata"]["generation"], 2);

        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk("gateway.networking.k8s.io", "v1", "Gateway"),
            "gateways",
        );
        let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "shop", &resource);
        let all: Api<DynamicObject> = Api::all_with(client, &resource);
        let got = api.get("web").await.unwrap();
        assert_eq!(got.metadata.generation, Some(2));
        let version = got.metadata.resource_version.clone().unwrap();
        let mut events = all
            .watch(&kube::api::WatchParams::default(), &version)
            .await
            .unwrap()
            .boxed();

        let patch = json!({"status": {"conditions": [{"type": "Accepted", "status": "True"}]}});
        let patched = api
            .patch_status("web", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap();
        assert_eq!(patched.data["status"]["conditions"][0]["type"], "Accepted");
        assert_eq!(
            patched.metadata.generation,
            Some(2),
            "status is no spec change"
        );
        let next = json!({"status": {"conditions": [{"type": "Programmed", "status": "False"}],
                                     "listeners": []}});
        api.patch_status("web", &PatchParams::default(), &Patch::Merge(&next))
            .await
            .unwrap();
        let now = fake.object(key.0, key.1, key.2).unwrap().unwrap();
        assert_eq!(
            now["status"],
            json!({"conditions": [{"type": "Programmed", "status": "False"}], "listeners": [],
                   "addresses": [{"value": "10.0.0.1"}]}),
            "lists are replaced, not merged; what the patch does not name stays"
        );
        assert_eq!(
            now["spec"]["listeners"][0]["port"], 8080,
            "the spec is untouched"
        );
        let patches = fake.status_patches("Gateway");
        assert_eq!(patches.len(), 2);
        assert_eq!(patches[0].patch, patch);
        assert_eq!(
            (patches[1].namespace.as_str(), patches[1].name.as_str()),
            ("shop", "web")
        );
        assert_eq!(fake.requests("Gateway").unwrap().status_patches, 2);
        let first = async {
            loop {
                match events.try_next().await.unwrap() {
                    Some(kube::api::WatchEvent::Bookmark(_)) => continue,
                    other => return other,
                }
            }
        };
        match tokio::time::timeout(WAIT, first).await.unwrap() {
            Some(kube::api::WatchEvent::Modified(o)) => {
                assert_eq!(o.data["status"]["conditions"][0]["type"], "Accepted")
            }
            other => panic!("{other:?}"),
        }

        // Failing patches answer the error and change nothing; a missing object is a 404.
        fake.fail_status_patches(Some(403));
        let refused = api
            .patch_status("web", &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .unwrap_err();
        assert!(
            refused.to_string().contains("403") || refused.to_string().contains("forbidden"),
            "{refused}"
        );
        assert_eq!(fake.status_patches("Gateway").len(), 2);
        assert_eq!(fake.requests("Gateway").unwrap().status_patches, 3);
        fake.fail_status_patches(None);
        let missing = api.get("nope").await.unwrap_err();
        assert!(missing.to_string().contains("not found"), "{missing}");
    }

    #[test]
    fn object_paths_name_the_collection_they_are_served_from() {
        assert_eq!(
            ObjectPath::parse(
                "/apis/gateway.networking.k8s.io/v1/namespaces/shop/gateways/web/status"
            ),
            Some(ObjectPath {
                collection: "/apis/gateway.networking.k8s.io/v1/gateways".into(),
                namespace: "shop".into(),
                name: "web".into(),
                subresource: Some("status".into()),
            })
        );
        assert_eq!(
            ObjectPath::parse("/api/v1/namespaces/shop/secrets/cert").map(|p| p.collection),
            Some("/api/v1/secrets".into())
        );
        for collection in [
            "/api/v1/pods",
            "/api/v1/namespaces",
            "/api/v1/namespaces/shop",
            "/apis/discovery.k8s.io/v1/endpointslices",
            TOKEN_REVIEWS,
        ] {
            assert_eq!(ObjectPath::parse(collection), None, "{collection}");
        }
        let mut target = json!({"a": {"b": 1, "c": [1, 2]}, "d": 1});
        merge_patch(
            &mut target,
            &json!({"a": {"c": [3], "e": null}, "d": null, "f": "x"}),
        );
        assert_eq!(target, json!({"a": {"b": 1, "c": [3]}, "f": "x"}));
    }

    #[tokio::test]
    async fn a_registered_token_is_reviewed_as_a_real_api_server_would() {
        let fake = FakeApiServer::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let client = fake.client(dir.path()).await.unwrap();
        let user = TokenUser::service_account("istio-system", "ztunnel", "istio-ca")
            .bound_to_pod("ztunnel-a", "u-a")
            .on_node("n1");
        fake.add_token("agent", user);
        fake.apply(pod("ztunnel-a", "u-a")).unwrap();

        let got = review_token(&client, "agent", "istio-ca").await.unwrap();
        assert_eq!(got.username, "system:serviceaccount:istio-system:ztunnel");
        assert_eq!(got.audiences, ["istio-ca"]);
        assert_eq!(got.extra[EXTRA_POD_NAME], ["ztunnel-a"]);
        assert_eq!(got.extra[EXTRA_POD_UID], ["u-a"]);
        assert_eq!(got.extra[EXTRA_NODE_NAME], ["n1"]);

        let unknown = review(&client, "nobody", "istio-ca").await.unwrap_err();
        assert!(unknown.contains("invalid bearer token"), "{unknown}");
        let audience = review(&client, "agent", "vault").await.unwrap_err();
        assert!(audience.contains("audiences"), "{audience}");

        // Recreated with another uid: the token was bound to the old pod.
        fake.apply(pod("ztunnel-a", "u-other")).unwrap();
        let recreated = review(&client, "agent", "istio-ca").await.unwrap_err();
        assert!(recreated.contains("(u-a) does not match"), "{recreated}");
        fake.delete("Pod", "istio-system", "ztunnel-a").unwrap();
        let deleted = review(&client, "agent", "istio-ca").await.unwrap_err();
        assert!(deleted.contains("not found"), "{deleted}");
        assert_eq!(fake.token_reviews(), 5);
    }

    #[tokio::test]
    async fn a_failing_review_endpoint_leaves_the_token_unknown() {
        let fake = FakeApiServer::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let client = fake.client(dir.path()).await.unwrap();
        fake.add_token(
            "waypoint",
            TokenUser::service_account("demo", "waypoint", "istio-ca"),
        );
        for (failure, code) in [
            (ReviewFailure::Forbidden, "403"),
            (ReviewFailure::Internal, "500"),
        ] {
            fake.fail_token_reviews(Some(failure));
            match review_token(&client, "waypoint", "istio-ca").await {
                Err(ReviewError::Unavailable(m)) => assert!(m.contains(code), "{m}"),
                other => panic!("{failure:?}: {other:?}"),
            }
        }
        fake.fail_token_reviews(None);
        assert_eq!(
            review(&client, "waypoint", "istio-ca").await,
            Ok("system:serviceaccount:demo:waypoint".to_string())
        );
        assert_eq!(fake.token_reviews(), 3);
    }

    #[tokio::test]
    async fn a_review_without_an_answer_gives_up_after_its_timeout() {
        let fake = FakeApiServer::start().await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let client = fake.client(dir.path()).await.unwrap();
        fake.fail_token_reviews(Some(ReviewFailure::Hang));
        let started = std::time::Instant::now();
        match review_token(&client, "anything", "istio-ca").await {
            Err(ReviewError::Unavailable(m)) => assert!(m.contains("no answer"), "{m}"),
            other => panic!("{other:?}"),
        }
        let took = started.elapsed();
        let limit = mesh_kube::token_review::REVIEW_TIMEOUT;
        assert!(took >= limit && took < limit * 2, "{took:?}");
        assert_eq!(fake.token_reviews(), 1);
    }
}
