//! The watched objects, each already checked by the loader on its own.
//!
//! Pure state, no IO: the watch loop feeds it events and asks it for a model. Every object
//! version is translated alone when it arrives (so a refusal names that object at once), and
//! the model is built from the accepted versions of all objects. A refused version never
//! replaces a good one: the object stays at its last accepted version (or absent, if it never
//! had one) until a good version or its deletion arrives. That keeps one bad write from
//! changing what others see, and in particular keeps a refused edit of a DENY policy from
//! silently removing the policy.
//!
//! An AuthorizationPolicy or RequestAuthentication refused with *no* accepted version fails
//! closed instead of being absent: the store keeps what can still be read of it
//! ([`mesh_model::k8s::refused_policy`]) and the model carries it as a
//! [`RefusedPolicy`], which the evaluations enforce (deny all / reject its tokens) until the
//! object is fixed or deleted. A refused edit of an accepted one keeps the accepted version.

use std::collections::BTreeMap;

use kube::api::DynamicObject;
use mesh_model::k8s::{load_docs, refused_policy, ConfigError};
use mesh_model::model::{Model, RefusedPolicy};

use super::resources::{describe, document, file_name, Kind, ObjectKey};
use super::Rejection;

/// One object: its last accepted document and, if its latest version was refused, why.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Entry {
    /// YAML text of the last version the loader accepted.
    accepted: Option<String>,
    refused: Option<Refused>,
}

impl Entry {
    /// The fail-closed policy this object stands for: its refusal, when no version of it
    /// was ever accepted.
    fn fail_closed(&self) -> Option<&RefusedPolicy> {
        match &self.accepted {
            Some(_) => None,
            None => self.refused.as_ref()?.fail_closed.as_ref(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Refused {
    /// The refused document, so that seeing the same version again (a re-list) is not
    /// counted as a new rejection.
    text: String,
    error: String,
    /// What of the refused version can be read, for the kinds that fail closed.
    fail_closed: Option<RefusedPolicy>,
}

type Objects = BTreeMap<ObjectKey, Entry>;

struct KindState {
    kind: Kind,
    /// Whether a complete list of this kind has arrived (or the kind is not served).
    listed: bool,
    objects: Objects,
    /// Objects of a list in progress; replaces `objects` when the list completes.
    relist: Option<Objects>,
}

/// What an event changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Change {
    /// The set of accepted documents changed: the model must be rebuilt.
    pub(crate) model: bool,
    /// The set of refused objects changed.
    pub(crate) rejections: bool,
    /// An object version refused for the first time (to be logged and counted once).
    pub(crate) refused: Option<Rejection>,
}

impl Change {
    pub(crate) fn any(&self) -> bool {
        self.model || self.rejections
    }
}

pub(crate) struct Store {
    kinds: Vec<KindState>,
}

// === impl Store ===

impl Store {
    pub(crate) fn new(kinds: Vec<Kind>) -> Store {
        Store {
            kinds: kinds
                .into_iter()
                .map(|kind| KindState {
                    kind,
                    listed: false,
                    objects: Objects::new(),
                    relist: None,
                })
                .collect(),
        }
    }

    pub(crate) fn kind(&self, i: usize) -> Option<&Kind> {
        self.kinds.get(i).map(|k| &k.kind)
    }

    /// Every kind has been listed once: before that a model would be missing objects (and
    /// e.g. release pods that are merely not listed yet).
    pub(crate) fn listed(&self) -> bool {
        self.kinds.iter().all(|k| k.listed)
    }

    pub(crate) fn is_listed(&self, i: usize) -> bool {
        self.kinds.get(i).is_some_and(|k| k.listed)
    }

    /// An object was added or modified.
    pub(crate) fn apply(&mut self, i: usize, obj: &DynamicObject) -> Change {
        let Some(state) = self.kinds.get_mut(i) else {
            return Change::default();
        };
        let key = ObjectKey::of(obj);
        let old = state.objects.get(&key).cloned().unwrap_or_default();
        let (entry, refused) = admit(&state.kind, &key, &old, obj);
        let change = Change {
            model: entry.accepted != old.accepted || entry.fail_closed() != old.fail_closed(),
            rejections: entry.refused.as_ref().map(|r| &r.error)
                != old.refused.as_ref().map(|r| &r.error),
            refused,
        };
        if entry.accepted.is_none() && entry.refused.is_none() {
            state.objects.remove(&key);
        } else {
            state.objects.insert(key, entry);
        }
        change
    }

    /// An object was deleted: its refusal goes with it.
    pub(crate) fn delete(&mut self, i: usize, obj: &DynamicObject) -> Change {
        let Some(state) = self.kinds.get_mut(i) else {
            return Change::default();
        };
        match state.objects.remove(&ObjectKey::of(obj)) {
            None => Change::default(),
            Some(old) => Change {
                model: old.accepted.is_some() || old.fail_closed().is_some(),
                rejections: old.refused.is_some(),
                refused: None,
            },
        }
    }

    /// A (re-)list starts: objects not listed again before [`Store::relist_done`] are gone.
    pub(crate) fn relist_start(&mut self, i: usize) {
        if let Some(state) = self.kinds.get_mut(i) {
            state.relist = Some(Objects::new());
        }
    }

    /// An object of the list in progress.
    pub(crate) fn relist_item(&mut self, i: usize, obj: &DynamicObject) -> Option<Rejection> {
        let state = self.kinds.get_mut(i)?;
        let key = ObjectKey::of(obj);
        let old = state.objects.get(&key).cloned().unwrap_or_default();
        let (entry, refused) = admit(&state.kind, &key, &old, obj);
        let relist = state.relist.get_or_insert_with(Objects::new);
        if entry.accepted.is_some() || entry.refused.is_some() {
            relist.insert(key, entry);
        }
        refused
    }

    /// The list is complete: it replaces what the kind had.
    pub(crate) fn relist_done(&mut self, i: usize) -> Change {
        let Some(state) = self.kinds.get_mut(i) else {
            return Change::default();
        };
        let new = state.relist.take().unwrap_or_default();
        let accepted = |o: &Objects| {
            o.iter()
                .filter_map(|(k, e)| e.accepted.as_ref().map(|t| (k.clone(), t.clone())))
                .collect::<Vec<_>>()
        };
        let fail_closed = |o: &Objects| {
            o.values()
                .filter_map(|e| e.fail_closed().cloned())
                .collect::<Vec<_>>()
        };
        let refused = |o: &Objects| {
            o.iter()
                .filter_map(|(k, e)| e.refused.as_ref().map(|r| (k.clone(), r.error.clone())))
                .collect::<Vec<_>>()
        };
        let change = Change {
            // The first list always produces a model, even an empty one.
            model: !state.listed
                || accepted(&new) != accepted(&state.objects)
                || fail_closed(&new) != fail_closed(&state.objects),
            rejections: refused(&new) != refused(&state.objects),
            refused: None,
        };
        state.objects = new;
        state.listed = true;
        change
    }

    /// The kind's API is not served (an optional CRD is not installed): it counts as listed
    /// and empty until a list succeeds.
    pub(crate) fn absent(&mut self, i: usize) -> Change {
        let Some(state) = self.kinds.get_mut(i) else {
            return Change::default();
        };
        if state.listed {
            return Change::default();
        }
        state.relist = Some(Objects::new());
        self.relist_done(i)
    }

    /// Objects whose latest version was refused, by kind then name.
    pub(crate) fn rejections(&self) -> Vec<Rejection> {
        self.kinds
            .iter()
            .flat_map(|state| {
                state.objects.iter().filter_map(|(key, entry)| {
                    entry.refused.as_ref().map(|r| Rejection {
                        object: describe(&state.kind, key),
                        error: r.error.clone(),
                    })
                })
            })
            .collect()
    }

    /// The model of every accepted object, with the refused policies that fail closed. Each
    /// was accepted alone and the loader checks nothing across objects but duplicates, which
    /// the keys rule out, so this only fails if that ever changes; the caller then keeps its
    /// last model.
    pub(crate) fn build(&self) -> Result<Model, ConfigError> {
        let refused: Vec<RefusedPolicy> = self
            .kinds
            .iter()
            .flat_map(|state| {
                state
                    .objects
                    .values()
                    .filter_map(|e| e.fail_closed().cloned())
            })
            .collect();
        let docs: Vec<(String, String)> = self
            .kinds
            .iter()
            .flat_map(|state| {
                state.objects.iter().filter_map(|(key, entry)| {
                    let text = entry.accepted.as_ref()?;
                    Some((file_name(&state.kind, key), text.clone()))
                })
            })
            .collect();
        Ok(load_docs(&docs)?.with_refused_policies(refused))
    }
}

/// Translates one object version alone. Returns the object's new entry, and the rejection if
/// this version is refused and was not already refused before.
fn admit(
    kind: &Kind,
    key: &ObjectKey,
    old: &Entry,
    obj: &DynamicObject,
) -> (Entry, Option<Rejection>) {
    let file = file_name(kind, key);
    let text = match serde_yaml::to_string(&document(kind, obj)) {
        Ok(text) => text,
        // A JSON value always serializes; kept as a refusal rather than a panic.
        Err(e) => format!("# {file}: serialize: {e}\n"),
    };
    if old.accepted.as_ref() == Some(&text) {
        return (
            Entry {
                accepted: Some(text),
                refused: None,
            },
            None,
        );
    }
    if let Some(refused) = old.refused.as_ref().filter(|r| r.text == text) {
        let entry = Entry {
            accepted: old.accepted.clone(),
            refused: Some(refused.clone()),
        };
        return (entry, None);
    }
    match load_docs(&[(file, text.clone())]) {
        Ok(_) => (
            Entry {
                accepted: Some(text),
                refused: None,
            },
            None,
        ),
        Err(e) => {
            let rejection = Rejection {
                object: describe(kind, key),
                error: e.to_string(),
            };
            let fail_closed = refused_policy(
                &kind.resource.kind,
                &key.namespace,
                &key.name,
                &text,
                &rejection.error,
            );
            let entry = Entry {
                accepted: old.accepted.clone(),
                refused: Some(Refused {
                    text,
                    error: rejection.error.clone(),
                    fail_closed,
                }),
            };
            (entry, Some(rejection))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{kinds_for, Scope};

    fn kinds() -> Vec<super::Kind> {
        kinds_for(Scope::Node)
    }
    use mesh_model::model::NamespacedName;
    use serde_json::json;

    /// The index of `kind` in [`kinds`] (the watch loop's stream index).
    fn index(kind: &str) -> usize {
        kinds()
            .iter()
            .position(|k| k.resource.kind == kind)
            .expect("watched kind")
    }

    const NAMESPACE: usize = 0;
    const POD: usize = 2;
    const AUTHZ: usize = 6;

    /// The constants above follow the order of [`kinds_for`]: Namespace, ServiceAccount, Pod,
    /// Service, EndpointSlice, PeerAuthentication, AuthorizationPolicy, Gateway, ServiceEntry.
    #[test]
    fn the_test_indices_are_those_of_the_watched_kinds() {
        assert_eq!(index("Namespace"), NAMESPACE);
        assert_eq!(index("Pod"), POD);
        assert_eq!(index("AuthorizationPolicy"), AUTHZ);
        let names: Vec<String> = kinds().into_iter().map(|k| k.resource.kind).collect();
        assert_eq!(
            names,
            [
                "Namespace",
                "ServiceAccount",
                "Pod",
                "Service",
                "EndpointSlice",
                "PeerAuthentication",
                "AuthorizationPolicy",
                "Gateway",
                "ServiceEntry",
            ]
        );
    }

    fn pod(ip: &str, mode: Option<&str>) -> DynamicObject {
        let labels = match mode {
            Some(m) => json!({"istio.io/dataplane-mode": m}),
            None => json!({}),
        };
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "labels": labels},
            "spec": {"nodeName": "n1"},
            "status": {"podIP": ip},
        }))
        .expect("pod")
    }

    fn namespace() -> DynamicObject {
        serde_json::from_value(json!({"metadata": {"name": "default"}})).expect("namespace")
    }

    fn listed_store() -> Store {
        let mut store = Store::new(kinds());
        for i in 0..kinds().len() {
            store.relist_start(i);
            store.relist_done(i);
        }
        store
    }

    fn enrolled(store: &Store) -> bool {
        let model = store.build().expect("model");
        let key = NamespacedName::new("default", "web");
        let found = model
            .pods_on_node("n1")
            .any(|p| NamespacedName::new(&p.namespace, &p.name) == key && model.is_ambient(p));
        found
    }

    #[test]
    fn no_model_until_every_kind_is_listed() {
        let kinds = kinds();
        let last = kinds.len() - 1;
        let mut store = Store::new(kinds);
        for i in 0..last {
            store.relist_start(i);
            store.relist_done(i);
        }
        assert!(!store.listed());
        assert!(
            store.absent(last).model,
            "an absent optional kind still completes the list"
        );
        assert!(store.listed());
    }

    /// A well-formed slice (as the kube source reduces it) is admitted by the loader.
    #[test]
    fn an_endpoint_slice_is_admitted() {
        let mut store = listed_store();
        let slice: DynamicObject = serde_json::from_value(json!({
            "metadata": {"name": "kubernetes", "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "kubernetes"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["172.18.0.2"], "conditions": {"ready": true}}],
            "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}],
        }))
        .expect("endpoint slice");
        let change = store.apply(index("EndpointSlice"), &slice);
        assert_eq!(change.refused, None);
        assert!(change.model);
        assert!(store.rejections().is_empty());
        store.build().expect("model");
    }

    #[test]
    fn a_refused_version_keeps_the_last_good_one_and_is_reported_once() {
        let mut store = listed_store();
        store.apply(NAMESPACE, &namespace());
        assert!(store.apply(POD, &pod("10.0.0.5", Some("ambient"))).model);
        assert!(enrolled(&store));

        let change = store.apply(POD, &pod("10.0.0.x", None));
        assert!(
            !change.model,
            "the refused version must not change the model"
        );
        assert!(change.rejections);
        let refused = change.refused.expect("refusal");
        assert_eq!(refused.object, "Pod default/web");
        assert!(refused.error.contains("status.podIP"), "{}", refused.error);
        assert!(enrolled(&store), "last good version stays");

        // The same bad version again (a re-list) is not a new rejection.
        assert_eq!(store.apply(POD, &pod("10.0.0.x", None)), Change::default());
        assert_eq!(store.rejections().len(), 1);

        // A good version clears the refusal.
        let change = store.apply(POD, &pod("10.0.0.5", None));
        assert!(change.model && change.rejections);
        assert!(!enrolled(&store));
        assert!(store.rejections().is_empty());
    }

    #[test]
    fn a_relist_drops_objects_it_no_longer_lists() {
        let mut store = listed_store();
        store.apply(NAMESPACE, &namespace());
        store.apply(POD, &pod("10.0.0.5", Some("ambient")));
        store.relist_start(POD);
        assert!(
            enrolled(&store),
            "objects stay while the list is in progress"
        );
        assert!(store.relist_done(POD).model);
        assert!(!enrolled(&store));
    }

    #[test]
    fn an_unchanged_relist_changes_nothing() {
        let mut store = listed_store();
        store.apply(POD, &pod("10.0.0.5", None));
        store.relist_start(POD);
        assert_eq!(store.relist_item(POD, &pod("10.0.0.5", None)), None);
        assert_eq!(store.relist_done(POD), Change::default());
    }

    /// AuthorizationPolicy `default/allow-web` selecting `app=web` with `rules`.
    fn policy(rules: serde_json::Value) -> DynamicObject {
        serde_json::from_value(json!({
            "metadata": {"name": "allow-web", "namespace": "default"},
            "spec": {"selector": {"matchLabels": {"app": "web"}}, "rules": rules},
        }))
        .expect("policy")
    }

    fn good() -> DynamicObject {
        policy(json!([{"from": [{"source": {"namespaces": ["default"]}}]}]))
    }

    /// `principal` is not a field (`principals` is): the translator refuses it.
    fn bad() -> DynamicObject {
        policy(json!([{"from": [{"source": {"principal": ["x"]}}]}]))
    }

    /// `(accepted policies, fail-closed policies)` of the model, by name.
    fn policies(store: &Store) -> (Vec<String>, Vec<String>) {
        let model = store.build().expect("model");
        (
            model
                .authorization_policies
                .iter()
                .map(|p| p.name.clone())
                .collect(),
            model.refused_policies.iter().map(|r| r.key()).collect(),
        )
    }

    #[test]
    fn a_new_refused_policy_fails_closed_until_fixed_or_deleted() {
        let mut store = listed_store();
        let change = store.apply(AUTHZ, &bad());
        assert!(change.model, "a fail-closed entry changes the model");
        assert!(change.rejections);
        assert!(change.refused.is_some());
        assert_eq!(
            policies(&store),
            (vec![], vec!["default/allow-web".to_string()])
        );
        let model = store.build().expect("model");
        let refused = &model.refused_policies[0];
        assert!(refused.deny.is_some());
        assert!(refused.reason.contains("principal"), "{}", refused.reason);
        assert_eq!(
            store.apply(AUTHZ, &bad()),
            Change::default(),
            "same version"
        );

        // Fixed: the accepted policy replaces the fail-closed entry.
        let change = store.apply(AUTHZ, &good());
        assert!(change.model && change.rejections);
        assert_eq!(policies(&store), (vec!["allow-web".to_string()], vec![]));

        // Refused again: now an edit of an accepted policy, which keeps that version.
        let change = store.apply(AUTHZ, &bad());
        assert!(!change.model, "the last accepted version stays");
        assert!(change.rejections);
        assert_eq!(policies(&store), (vec!["allow-web".to_string()], vec![]));

        // Deleted: the policy and its refusal are gone.
        let change = store.delete(AUTHZ, &bad());
        assert!(change.model && change.rejections);
        assert_eq!(policies(&store), (vec![], vec![]));

        // A new refused version after the delete fails closed again; deleting it opens.
        assert!(store.apply(AUTHZ, &bad()).model);
        assert_eq!(policies(&store).1.len(), 1);
        assert!(store.delete(AUTHZ, &bad()).model);
        assert_eq!(policies(&store), (vec![], vec![]));
    }

    #[test]
    fn a_relist_carries_refused_policies_and_drops_them_when_gone() {
        let mut store = listed_store();
        store.relist_start(AUTHZ);
        assert!(store.relist_item(AUTHZ, &bad()).is_some());
        assert!(store.relist_done(AUTHZ).model);
        assert_eq!(policies(&store).1, vec!["default/allow-web".to_string()]);
        store.relist_start(AUTHZ);
        assert!(store.relist_done(AUTHZ).model);
        assert_eq!(policies(&store), (vec![], vec![]));
    }

    /// A TLS Secret as the gateway scope watches it reaches the model's TLS secrets; one
    /// whose `data` Kubernetes itself would refuse is refused by field, and neither the
    /// refusal nor anything the store reports carries the key.
    #[test]
    fn a_tls_secret_reaches_the_model_and_a_refusal_never_shows_its_key() {
        use base64::Engine as _;
        let kinds = kinds_for(Scope::Gateway);
        let at = kinds
            .iter()
            .position(|k| k.resource.kind == "Secret")
            .expect("secrets watched");
        let mut store = Store::new(kinds.clone());
        for i in 0..kinds.len() {
            store.relist_start(i);
            store.relist_done(i);
        }
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let key =
            "-----BEGIN PRIVATE KEY-----\nc2VjcmV0LWtleS1ieXRlcw==\n-----END PRIVATE KEY-----\n";
        let cert = "-----BEGIN CERTIFICATE-----\nY2VydA==\n-----END CERTIFICATE-----\n";
        let secret = |data: serde_json::Value| -> DynamicObject {
            serde_json::from_value(json!({
                "metadata": {"name": "cert", "namespace": "shop"},
                "type": "kubernetes.io/tls",
                "data": data,
            }))
            .expect("secret")
        };
        let change = store.apply(
            at,
            &secret(json!({"tls.crt": b64(cert), "tls.key": b64(key)})),
        );
        assert!(change.model && change.refused.is_none());
        let model = store.build().expect("model");
        let tls = model.tls_secret("shop", "cert").expect("a TLS secret");
        assert_eq!(tls.key_pem, key);

        let change = store.apply(
            at,
            &secret(json!({"tls.crt": b64(cert), "tls.key": format!("{}!", b64(key))})),
        );
        let refused = change.refused.expect("refused");
        assert_eq!(refused.object, "Secret shop/cert");
        assert!(refused.error.contains("tls.key"), "{}", refused.error);
        let shown = format!("{refused:?} {:?}", store.rejections());
        assert!(
            !shown.contains("c2VjcmV0") && !shown.contains(&b64(key)),
            "{shown}"
        );
        assert!(
            store
                .build()
                .expect("model")
                .tls_secret("shop", "cert")
                .is_some(),
            "the last accepted version stays"
        );
    }
}
