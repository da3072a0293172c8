//! Kubernetes YAML → [`Model`].
//!
//! Local mode keeps the mesh's configuration as a directory of multi-document YAML files,
//! the same resources a user would `kubectl apply`. This module turns them into the model
//! once, at the edge: every IP, port, CIDR and enum is parsed and checked here, and a
//! document that Kubernetes or Istio would reject is rejected with the file, document number
//! (1-based, counting `---` separated documents), object and field, e.g.
//! `pods.yaml doc 3: Pod default/web: status.podIP: invalid IP address "10.0.0.x"`.
//! The caller keeps its previous model when loading fails.
//!
//! Understood kinds: `v1` `Namespace`, `ServiceAccount`, `Pod`, `Service` (and `List` of
//! them), `discovery.k8s.io/v1` `EndpointSlice` (endpoints of Services without a selector), `security.istio.io/v1` or `v1beta1` `PeerAuthentication`,
//! `AuthorizationPolicy` and `RequestAuthentication` (JWT rules: `k8s/jwt.rs`), `gateway.networking.k8s.io/v1` or `v1beta1` `Gateway` (waypoints:
//! class `istio-waypoint`, label `istio.io/waypoint-for`, addresses; ingress gateways: class
//! `istio`, listeners validated: `k8s/gateway.rs`), `ReferenceGrant` (`v1beta1` or `v1`:
//! `k8s/reference_grant.rs`), `v1` `Secret` (type `kubernetes.io/tls` with PEM certificate
//! and key become TLS secrets; others are kept out, with the reason, never refused:
//! `k8s/secret.rs`) and `HTTPRoute`
//! (parents, matches, filters, weighted backends, timeouts, mirrors: `k8s/route.rs`), and
//! `networking.istio.io/v1` (or `v1beta1`, `v1alpha3`) `DestinationRule` (subsets, load
//! balancing, connection pool, outlier detection: `k8s/destination_rule.rs`) and
//! `VirtualService` (mesh HTTP routes, retries, faults, mirrors: `k8s/virtual_service.rs`),
//! `ServiceEntry` (destinations outside the registry: `k8s/service_entry.rs`),
//! and `GRPCRoute` (`v1`; translated into the same model route: `k8s/grpc_route.rs`), and
//! `telemetry.istio.io/v1` (or `v1alpha1`) `Telemetry` (the waypoint's access-log switch:
//! `k8s/telemetry.rs`).
//! Every other kind
//! is skipped with a debug log, so the same files can also carry Deployments and the like for
//! other consumers.
//!
//! Core kinds ignore fields they do not use (real manifests carry many); policy specs reject
//! unknown fields, because a misspelt field silently changes what a policy matches.

mod core;
mod destination_rule;
mod gateway;
mod grpc_route;
mod jwt;
mod reference_grant;
mod refused;
mod route;
mod secret;
mod security;
mod service_entry;
mod telemetry;
mod virtual_service;
mod yaml;

use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_yaml::Value;
use tracing::debug;

use crate::model::{
    AuthorizationPolicy, DestinationRule, EndpointSlice, Gateway, HttpRoute, Labels, Model,
    Namespace, NamespacedName, PeerAuthentication, Pod, ReferenceGrant, RequestAuthentication,
    Service, ServiceEntry, Telemetry, TlsSecret, VirtualService,
};
use yaml::{FieldError, FieldResult, Node};

pub use refused::refused_policy;

/// Files larger than this are refused rather than parsed: the whole mesh configuration of a
/// local cluster is a few hundred KiB, and a runaway file must not exhaust memory.
pub const MAX_FILE_BYTES: u64 = 8 * 1024 * 1024;

/// Namespace of namespaced objects that do not name one, as `kubectl apply` would default it.
pub const DEFAULT_NAMESPACE: &str = "default";

/// `metadata.annotations` key that makes an AuthorizationPolicy dry-run.
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("read {file}: larger than the {limit} byte limit")]
    TooLarge { file: String, limit: u64 },
    #[error("read {file}: not valid UTF-8")]
    NotUtf8 { file: String },
    #[error("{file} doc {doc}: parse yaml: {source}")]
    Yaml {
        file: String,
        doc: usize,
        source: serde_yaml::Error,
    },
    #[error("{file} doc {doc}: {object}: {}", field_reason(.field, .reason))]
    Invalid {
        file: String,
        /// 1-based document number within the file.
        doc: usize,
        object: Box<ObjectRef>,
        /// Dotted path from the document root, e.g. `spec.ports[1].targetPort`.
        field: String,
        reason: String,
    },
    #[error("{file} doc {doc}: {object}: already defined in {first_file} doc {first_doc}")]
    Duplicate {
        file: String,
        doc: usize,
        object: Box<ObjectRef>,
        first_file: String,
        first_doc: usize,
    },
}

/// `field: reason`, or just the reason when it is about the whole document.
fn field_reason(field: &str, reason: &str) -> String {
    if field.is_empty() {
        reason.to_string()
    } else {
        format!("{field}: {reason}")
    }
}

/// The object an error is about: `Pod default/web`, `Namespace prod`, or just the kind when
/// the name itself is what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectRef {
    pub kind: String,
    /// `namespace/name` for namespaced kinds, `name` otherwise.
    pub name: Option<String>,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(name) => write!(f, "{} {name}", self.kind),
            None => f.write_str(&self.kind),
        }
    }
}

/// Parses every `*.yaml` / `*.yml` file directly in `dir`, in file-name order, into a model.
/// Hidden files (editor lock files such as `.#pods.yaml`) and subdirectories are ignored.
pub fn load_dir(dir: &Path) -> Result<Model, ConfigError> {
    load_docs(&read_dir(dir)?)
}

/// The `(file name, contents)` pairs [`load_dir`] reads from `dir`, in file-name order, each
/// within [`MAX_FILE_BYTES`].
pub fn read_dir(dir: &Path) -> Result<Vec<(String, String)>, ConfigError> {
    let mut files = Vec::new();
    for path in config_files(dir).map_err(|source| ConfigError::Read {
        path: dir.to_path_buf(),
        source,
    })? {
        let name = file_name(&path);
        let bytes = read_limited(&path, &name)?;
        let text =
            String::from_utf8(bytes).map_err(|_| ConfigError::NotUtf8 { file: name.clone() })?;
        files.push((name, text));
    }
    Ok(files)
}

/// Like [`load_dir`], from `(file name, contents)` pairs.
pub fn load_docs(files: &[(String, String)]) -> Result<Model, ConfigError> {
    let mut loader = Loader::default();
    loader.files(files)?;
    Ok(loader.finish())
}

/// One object as written, and where: a document, or an item of a `v1` `List`.
#[derive(Clone, Debug)]
pub struct SourceObject {
    pub file: String,
    /// 1-based document number within the file (a `List`'s items share its number).
    pub doc: usize,
    pub api_version: String,
    pub kind: String,
    /// The object's key in the [`Model`] for the kinds this module translates (namespace
    /// empty for a `Namespace`); `None` for kinds it skips.
    pub key: Option<NamespacedName>,
    pub value: Value,
}

/// Like [`load_docs`], also returning every object read (empty documents left out), in file
/// then document order: for consumers that need the order or the fields the model drops.
pub fn load_docs_with_sources(
    files: &[(String, String)],
) -> Result<(Model, Vec<SourceObject>), ConfigError> {
    let mut loader = Loader {
        sources: Some(Vec::new()),
        ..Loader::default()
    };
    loader.files(files)?;
    let sources = loader.sources.take().unwrap_or_default();
    Ok((loader.finish(), sources))
}

/// A fingerprint of the names and contents of the files [`load_dir`] would read, so a
/// watcher can skip reloading when nothing changed. Stable within one process.
pub fn dir_fingerprint(dir: &Path) -> std::io::Result<u64> {
    let mut hasher = DefaultHasher::new();
    for path in config_files(dir)? {
        file_name(&path).hash(&mut hasher);
        let mut bytes = Vec::new();
        std::fs::File::open(&path)?
            .take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)?;
        bytes.hash(&mut hasher);
    }
    Ok(hasher.finish())
}

/// What `stat` says of one config file: name, device and inode (a ConfigMap update or an
/// atomic rename makes a new file), size, and change and modification times.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileStamp {
    name: String,
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

/// The [`FileStamp`]s of the files [`load_dir`] would read, in its order: a watcher reads and
/// hashes the files ([`dir_fingerprint`]) only when these changed. File times come from a
/// coarse clock (a few ms), so a same-size rewrite within one tick keeps its stamp: the
/// watcher also compares contents now and then.
pub fn dir_stamp(dir: &Path) -> std::io::Result<Vec<FileStamp>> {
    use std::os::unix::fs::MetadataExt;
    config_files(dir)?
        .into_iter()
        .map(|path| {
            let m = std::fs::metadata(&path)?;
            Ok(FileStamp {
                name: file_name(&path),
                dev: m.dev(),
                ino: m.ino(),
                len: m.len(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
            })
        })
        .collect()
}

fn config_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let yaml = name.ends_with(".yaml") || name.ends_with(".yml");
        // `metadata` follows symlinks, as ConfigMap mounts are symlinks into `..data/`.
        if yaml && !name.starts_with('.') && std::fs::metadata(&path)?.is_file() {
            files.push(path);
        }
    }
    files.sort_by_key(|p| p.file_name().map(|n| n.to_os_string()));
    Ok(files)
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

fn read_limited(path: &Path, name: &str) -> Result<Vec<u8>, ConfigError> {
    let read_err = |source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .map_err(read_err)?
        .take(MAX_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(read_err)?;
    if bytes.len() as u64 > MAX_FILE_BYTES {
        return Err(ConfigError::TooLarge {
            file: name.to_string(),
            limit: MAX_FILE_BYTES,
        });
    }
    Ok(bytes)
}

// === impl Loader ===

/// Where a document sits, for error messages.
#[derive(Clone, Copy)]
struct Origin<'f> {
    file: &'f str,
    doc: usize,
}

impl Origin<'_> {
    fn invalid(&self, object: ObjectRef, e: FieldError) -> ConfigError {
        ConfigError::Invalid {
            file: self.file.to_string(),
            doc: self.doc,
            object: Box::new(object),
            field: e.field,
            reason: e.reason,
        }
    }
}

#[derive(Default)]
struct Loader {
    namespaces: BTreeMap<String, Namespace>,
    service_accounts: BTreeSet<NamespacedName>,
    pods: BTreeMap<NamespacedName, Pod>,
    services: BTreeMap<NamespacedName, Service>,
    peer_authentications: BTreeMap<NamespacedName, PeerAuthentication>,
    authorization_policies: BTreeMap<NamespacedName, AuthorizationPolicy>,
    request_authentications: BTreeMap<NamespacedName, RequestAuthentication>,
    gateways: BTreeMap<NamespacedName, Gateway>,
    http_routes: Vec<HttpRoute>,
    destination_rules: Vec<DestinationRule>,
    virtual_services: Vec<VirtualService>,
    telemetries: BTreeMap<NamespacedName, Telemetry>,
    endpoint_slices: BTreeMap<NamespacedName, EndpointSlice>,
    service_entries: BTreeMap<NamespacedName, ServiceEntry>,
    /// Usable `kubernetes.io/tls` Secrets.
    tls_secrets: BTreeMap<NamespacedName, TlsSecret>,
    /// Every other Secret, and why it is not a TLS secret.
    secret_problems: BTreeMap<NamespacedName, String>,
    reference_grants: BTreeMap<NamespacedName, ReferenceGrant>,
    /// First definition of each object, to report duplicates.
    seen: HashMap<ObjectRef, (String, usize)>,
    /// Every object read, when the caller asked for them.
    sources: Option<Vec<SourceObject>>,
}

/// The kinds this module translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Namespace,
    ServiceAccount,
    Pod,
    Service,
    EndpointSlice,
    PeerAuthentication,
    AuthorizationPolicy,
    RequestAuthentication,
    Gateway,
    HttpRoute,
    DestinationRule,
    VirtualService,
    ServiceEntry,
    GrpcRoute,
    Telemetry,
    Secret,
    ReferenceGrant,
}

impl Kind {
    /// Recognises a kind by its API group; `Err` when the group is ours but the version is
    /// not one we read, `Ok(None)` for kinds owned by someone else.
    fn of(api_version: &str, kind: &str) -> Result<Option<Kind>, String> {
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        let (found, versions): (Kind, &[&str]) = match (group, kind) {
            ("", "Namespace") => (Kind::Namespace, &["v1"]),
            ("", "ServiceAccount") => (Kind::ServiceAccount, &["v1"]),
            ("", "Pod") => (Kind::Pod, &["v1"]),
            ("", "Service") => (Kind::Service, &["v1"]),
            ("", "Secret") => (Kind::Secret, &["v1"]),
            ("discovery.k8s.io", "EndpointSlice") => (Kind::EndpointSlice, &["v1"]),
            ("security.istio.io", "PeerAuthentication") => {
                (Kind::PeerAuthentication, &["v1", "v1beta1"])
            }
            ("security.istio.io", "AuthorizationPolicy") => {
                (Kind::AuthorizationPolicy, &["v1", "v1beta1"])
            }
            ("security.istio.io", "RequestAuthentication") => {
                (Kind::RequestAuthentication, &["v1", "v1beta1"])
            }
            ("gateway.networking.k8s.io", "Gateway") => (Kind::Gateway, &["v1", "v1beta1"]),
            ("gateway.networking.k8s.io", "HTTPRoute") => (Kind::HttpRoute, &["v1", "v1beta1"]),
            ("networking.istio.io", "DestinationRule") => {
                (Kind::DestinationRule, &["v1", "v1beta1", "v1alpha3"])
            }
            ("networking.istio.io", "ServiceEntry") => {
                (Kind::ServiceEntry, &["v1", "v1beta1", "v1alpha3"])
            }
            ("networking.istio.io", "VirtualService") => {
                (Kind::VirtualService, &["v1", "v1beta1", "v1alpha3"])
            }
            ("gateway.networking.k8s.io", "GRPCRoute") => (Kind::GrpcRoute, &["v1"]),
            ("gateway.networking.k8s.io", "ReferenceGrant") => {
                (Kind::ReferenceGrant, &["v1beta1", "v1"])
            }
            ("telemetry.istio.io", "Telemetry") => (Kind::Telemetry, &["v1", "v1alpha1"]),
            _ => return Ok(None),
        };
        if versions.contains(&version) {
            Ok(Some(found))
        } else {
            Err(format!(
                "unsupported version {version:?} (expected {})",
                versions.join(" or ")
            ))
        }
    }

    fn namespaced(self) -> bool {
        self != Kind::Namespace
    }
}

/// What every object carries in `metadata`.
struct Meta {
    name: String,
    /// Empty for cluster-scoped kinds.
    namespace: String,
    uid: Option<String>,
    labels: Labels,
    annotations: Labels,
    /// `creationTimestamp` (RFC 3339, so it orders as a string): the tie-breaker of routes
    /// and DestinationRules.
    created: Option<String>,
}

impl Meta {
    fn key(&self) -> NamespacedName {
        NamespacedName::new(&self.namespace, &self.name)
    }
}

impl Loader {
    /// Reads `files` in file-name order.
    fn files(&mut self, files: &[(String, String)]) -> Result<(), ConfigError> {
        let mut sorted: Vec<&(String, String)> = files.iter().collect();
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        for (file, text) in sorted {
            if text.len() as u64 > MAX_FILE_BYTES {
                return Err(ConfigError::TooLarge {
                    file: file.clone(),
                    limit: MAX_FILE_BYTES,
                });
            }
            for (i, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
                let doc = i + 1;
                // serde_yaml bounds nesting depth and alias expansion ("repetition limit
                // exceeded"), so a billion-laughs document fails here instead of exhausting
                // memory.
                let value = Value::deserialize(document).map_err(|source| ConfigError::Yaml {
                    file: file.clone(),
                    doc,
                    source,
                })?;
                self.document(file, doc, &value)?;
            }
        }
        Ok(())
    }

    fn document(&mut self, file: &str, doc: usize, value: &Value) -> Result<(), ConfigError> {
        if matches!(value, Value::Null) {
            // An empty document (a trailing `---`, or comments only).
            return Ok(());
        }
        let origin = Origin { file, doc };
        let root = Node::root(value);
        let unnamed = ObjectRef {
            kind: "object".to_string(),
            name: None,
        };
        let (api_version, kind) =
            type_meta(&root).map_err(|e| origin.invalid(unnamed.clone(), e))?;
        if kind == "List" && api_version == "v1" {
            let items = root
                .required("items")
                .and_then(|n| n.items())
                .map_err(|e| origin.invalid(unnamed.clone(), e))?;
            for item in items {
                let (api_version, kind) =
                    type_meta(&item).map_err(|e| origin.invalid(unnamed.clone(), e))?;
                if kind == "List" {
                    let e = item.err("nested List is not supported");
                    return Err(origin.invalid(unnamed.clone(), e));
                }
                self.object(origin, &item, api_version, kind)?;
            }
            return Ok(());
        }
        self.object(origin, &root, api_version, kind)
    }

    fn object(
        &mut self,
        origin: Origin<'_>,
        obj: &Node<'_>,
        api_version: &str,
        kind_name: &str,
    ) -> Result<(), ConfigError> {
        let kind = match Kind::of(api_version, kind_name) {
            Ok(Some(kind)) => kind,
            Ok(None) => {
                debug!(
                    file = origin.file,
                    doc = origin.doc,
                    api_version,
                    kind = kind_name,
                    "skipping unknown kind"
                );
                self.source(origin, obj, api_version, kind_name, None);
                return Ok(());
            }
            Err(reason) => {
                let object = ObjectRef {
                    kind: kind_name.to_string(),
                    name: None,
                };
                let e = FieldError {
                    field: child(obj, "apiVersion"),
                    reason,
                };
                return Err(origin.invalid(object, e));
            }
        };
        let object = object_ref(obj, kind_name, kind.namespaced());
        let invalid = |e: FieldError| origin.invalid(object.clone(), e);
        let meta = metadata(obj, kind).map_err(invalid)?;
        let key = meta.key();
        self.source(origin, obj, api_version, kind_name, Some(key.clone()));
        match kind {
            Kind::Namespace => {
                let ns = Namespace {
                    name: meta.name,
                    labels: meta.labels,
                };
                self.remember(origin, &object)?;
                self.namespaces.insert(ns.name.clone(), ns);
            }
            Kind::ServiceAccount => {
                self.remember(origin, &object)?;
                self.service_accounts.insert(key);
            }
            Kind::Pod => {
                let pod = core::pod(obj, meta).map_err(invalid)?;
                self.remember(origin, &object)?;
                self.pods.insert(key, pod);
            }
            Kind::Service => {
                let svc = core::service(obj, meta).map_err(invalid)?;
                self.remember(origin, &object)?;
                self.services.insert(key, svc);
            }
            Kind::EndpointSlice => {
                let slice = core::endpoint_slice(obj, meta).map_err(invalid)?;
                self.remember(origin, &object)?;
                if let Some(slice) = slice {
                    self.endpoint_slices.insert(key, slice);
                }
            }
            Kind::PeerAuthentication => {
                let pa = security::peer_authentication(obj, meta).map_err(invalid)?;
                self.remember(origin, &object)?;
                self.peer_authentications.insert(key, pa);
            }
            Kind::AuthorizationPolicy => {
                let ap = security::authorization_policy(obj, meta).map_err(invalid)?;
                self.remember(origin, &object)?;
                self.authorization_policies.insert(key, ap);
            }
            Kind::RequestAuthentication => {
                let ra = jwt::request_authentication(obj, meta).map_err(invalid)?;
                self.remember(origin, &object)?;
                self.request_authentications.insert(key, ra);
            }
            Kind::Gateway => {
                let gw = gateway::gateway(obj, meta).map_err(invalid)?;
                self.remember(origin, &object)?;
                self.gateways.insert(key, gw);
            }
            Kind::HttpRoute => {
                let route = route::http_route(obj, meta).map_err(invalid)?;
                self.remember(origin, &object)?;
                self.http_routes.push(route);
            }
            Kind::DestinationRule => {
                let dr = destination_rule::destination_rule(obj, meta).map_err(invalid)?;
                self.remember(origin, &object)?;
                self.destination_rules.push(dr);
            }
            Kind::VirtualService => {
                let vs = virtual_service::virtual_service(obj, meta).map_err(invalid)?;
                self.remember(origin, &object)?;
                self.virtual_services.push(vs);
            }
            Kind::ServiceEntry => {
                let se = service_entry::service_entry(obj, meta).map_err(invalid)?;
                self.remember(origin, &object)?;
                self.service_entries.insert(key, se);
            }
            Kind::GrpcRoute => {
                let route = grpc_route::grpc_route(obj, meta).map_err(invalid)?;
                self.remember(origin, &object)?;
                self.http_routes.push(route);
            }
            Kind::Telemetry => {
                let t = telemetry::telemetry(obj, meta).map_err(invalid)?;
                self.remember(origin, &object)?;
                self.telemetries.insert(key, t);
            }
            Kind::Secret => {
                let outcome = secret::secret(obj, meta).map_err(invalid)?;
                self.remember(origin, &object)?;
                match outcome {
                    Ok(tls) => {
                        self.tls_secrets.insert(key, tls);
                    }
                    Err(problem) => {
                        debug!(file = origin.file, doc = origin.doc, secret = %key, problem, "not a TLS secret");
                        self.secret_problems.insert(key, problem);
                    }
                }
            }
            Kind::ReferenceGrant => {
                let grant = reference_grant::reference_grant(obj, meta).map_err(invalid)?;
                self.remember(origin, &object)?;
                self.reference_grants.insert(key, grant);
            }
        }
        Ok(())
    }

    /// Keeps `obj` for [`load_docs_with_sources`]; an error later fails the whole load, so
    /// recording before translating is safe.
    fn source(
        &mut self,
        origin: Origin<'_>,
        obj: &Node<'_>,
        api_version: &str,
        kind: &str,
        key: Option<NamespacedName>,
    ) {
        if let Some(sources) = &mut self.sources {
            sources.push(SourceObject {
                file: origin.file.to_string(),
                doc: origin.doc,
                api_version: api_version.to_string(),
                kind: kind.to_string(),
                key,
                value: obj.value().clone(),
            });
        }
    }

    /// Records where `object` was defined; a second definition is an error because which one
    /// should win would depend on file order.
    fn remember(&mut self, origin: Origin<'_>, object: &ObjectRef) -> Result<(), ConfigError> {
        if let Some((first_file, first_doc)) = self.seen.get(object) {
            return Err(ConfigError::Duplicate {
                file: origin.file.to_string(),
                doc: origin.doc,
                object: Box::new(object.clone()),
                first_file: first_file.clone(),
                first_doc: *first_doc,
            });
        }
        self.seen
            .insert(object.clone(), (origin.file.to_string(), origin.doc));
        Ok(())
    }

    fn finish(self) -> Model {
        // Policies in (namespace, name) order: "first by name" is how conflicts between
        // equally specific PeerAuthentications are settled.
        Model::new(
            self.namespaces,
            self.service_accounts,
            self.pods,
            self.services,
            self.peer_authentications.into_values().collect(),
            self.authorization_policies.into_values().collect(),
        )
        .with_gateways(self.gateways)
        .with_http_routes(self.http_routes)
        .with_destination_rules(self.destination_rules)
        .with_virtual_services(self.virtual_services)
        .with_request_authentications(self.request_authentications.into_values().collect())
        .with_telemetries(self.telemetries.into_values().collect())
        .with_endpoint_slices(self.endpoint_slices)
        .with_service_entries(self.service_entries.into_values().collect())
        .with_tls_secrets(self.tls_secrets, self.secret_problems)
        .with_reference_grants(self.reference_grants.into_values().collect())
    }
}

fn child(node: &Node<'_>, key: &str) -> String {
    if node.path().is_empty() {
        key.to_string()
    } else {
        format!("{}.{key}", node.path())
    }
}

fn type_meta<'a>(obj: &Node<'a>) -> FieldResult<(&'a str, &'a str)> {
    let api_version = obj.required("apiVersion")?.str()?;
    let kind = obj.required("kind")?.str()?;
    Ok((api_version, kind))
}

/// Names the object for error messages before its metadata is validated, so that even an
/// error in `metadata.namespace` says which object it is about.
fn object_ref(obj: &Node<'_>, kind: &str, namespaced: bool) -> ObjectRef {
    let field = |key: &str| {
        obj.get("metadata")
            .ok()
            .flatten()
            .and_then(|m| m.opt_str(key).ok().flatten())
            .map(str::to_string)
    };
    let name = field("name").map(|name| {
        if namespaced {
            let ns = field("namespace").unwrap_or_else(|| DEFAULT_NAMESPACE.to_string());
            format!("{ns}/{name}")
        } else {
            name
        }
    });
    ObjectRef {
        kind: kind.to_string(),
        name,
    }
}

fn metadata(obj: &Node<'_>, kind: Kind) -> FieldResult<Meta> {
    let meta = obj.required("metadata")?;
    let name_node = meta.required("name")?;
    let name = name_node.str()?;
    // Namespace names become SPIFFE path segments and DNS labels; other names are DNS
    // subdomains.
    let valid = if kind == Kind::Namespace {
        dns_label(name)
    } else {
        dns_subdomain(name)
    };
    if !valid {
        return Err(name_node.err(format!("invalid name {name:?}")));
    }
    let namespace = if kind.namespaced() {
        match meta.get("namespace")? {
            None => DEFAULT_NAMESPACE.to_string(),
            Some(node) => {
                let ns = node.str()?;
                if !dns_label(ns) {
                    return Err(node.err(format!("invalid namespace {ns:?}")));
                }
                ns.to_string()
            }
        }
    } else {
        String::new()
    };
    Ok(Meta {
        name: name.to_string(),
        namespace,
        uid: meta.opt_str("uid")?.map(str::to_string),
        labels: meta.opt_string_map("labels")?,
        annotations: meta.opt_string_map("annotations")?,
        // Read only where it decides something (core kinds ignore what they do not use).
        created: match kind {
            Kind::HttpRoute | Kind::GrpcRoute | Kind::DestinationRule | Kind::VirtualService => {
                meta.opt_str("creationTimestamp")?.map(str::to_string)
            }
            _ => None,
        },
    })
}

/// RFC 1123 label: what Kubernetes requires of namespace names.
pub(crate) fn dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// RFC 1123 subdomain: what Kubernetes requires of most object names.
pub(crate) fn dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(dns_label)
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod route_tests;

#[cfg(test)]
mod jwt_tests;

#[cfg(test)]
mod destination_rule_tests;

#[cfg(test)]
mod virtual_service_tests;

#[cfg(test)]
mod grpc_route_tests;

#[cfg(test)]
mod refused_tests;

#[cfg(test)]
mod prop_tests;

#[cfg(test)]
mod telemetry_tests;

#[cfg(test)]
pub(crate) mod ingress_tests;
