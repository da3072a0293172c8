//! Policies the translator refused, kept so that they fail closed.
//!
//! With the API-server source an object is translated alone, and a refused version of an
//! object that was never accepted would otherwise simply be absent: a workload whose only
//! ALLOW policy was refused would be open to all. Instead the source records a
//! [`RefusedPolicy`] (built by [`crate::k8s::refused_policy`] from whatever of the object
//! can still be read) and the evaluations treat it as what it is: a policy whose rules are
//! not known.
//!
//! - An AuthorizationPolicy (ALLOW, DENY, or an action that cannot be read) denies
//!   everything to what it selects ([`RefusedPolicy::deny`]: a DENY with one empty rule,
//!   named after the refused object), enforced where an accepted policy of the same shape
//!   would be (selector: the node agent; `targetRefs`: the waypoint). AUDIT changes nothing.
//!   CUSTOM stays a CUSTOM with one empty rule: the waypoint denies everything for it, and
//!   the node agent ignores it, as it ignores an accepted CUSTOM.
//! - A RequestAuthentication rejects the tokens it would have checked
//!   ([`RefusedPolicy::tokens`], see [`crate::policy::authn::refused_token`]).
//! - When even the selection cannot be read, the whole namespace ([`RefusedScope::Namespace`];
//!   the root namespace makes that mesh-wide).
//!
//! The directory source never builds these: a bad file keeps the whole last good model.

use serde::Serialize;

use super::{
    selector_matches, AuthorizationPolicy, JwtHeader, Labels, NamespacedName, Pod, TargetRef,
    ROOT_NAMESPACE,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum RefusedKind {
    AuthorizationPolicy,
    RequestAuthentication,
}

impl RefusedKind {
    pub fn as_str(self) -> &'static str {
        match self {
            RefusedKind::AuthorizationPolicy => "AuthorizationPolicy",
            RefusedKind::RequestAuthentication => "RequestAuthentication",
        }
    }
}

/// What a refused policy would have selected, as far as it can be read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RefusedScope {
    /// `spec.selector.matchLabels` (`None`: no selector, every workload of the namespace),
    /// enforced by the node agent.
    Selector(Option<Labels>),
    /// `spec.targetRefs` / `targetRef`, enforced by the waypoint.
    TargetRefs(Vec<TargetRef>),
    /// The selection itself could not be read: every workload of the namespace, by the node
    /// agent and by the waypoint for the namespace's Services.
    Namespace,
}

/// One `jwtRules` entry of a refused RequestAuthentication, as far as it can be read.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RefusedJwtRule {
    /// `None`: unreadable, so a token of any issuer.
    pub issuer: Option<String>,
    /// Where the token is looked for; both empty: the defaults (`Authorization: Bearer`,
    /// `?access_token=`).
    pub from_headers: Vec<JwtHeader>,
    pub from_params: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RefusedPolicy {
    pub kind: RefusedKind,
    /// From the object's key, not its (possibly unreadable) metadata.
    pub namespace: String,
    pub name: String,
    /// The translator's error.
    pub reason: String,
    pub scope: RefusedScope,
    /// AuthorizationPolicy: what it is enforced as, a DENY matching everything in
    /// [`RefusedPolicy::scope`]; `None` when it changes nothing (AUDIT).
    #[serde(skip)]
    pub deny: Option<AuthorizationPolicy>,
    /// RequestAuthentication: the tokens it rejects (empty for an AuthorizationPolicy).
    pub tokens: Vec<RefusedJwtRule>,
}

impl RefusedPolicy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// What it does, for `/config_dump`.
    pub fn effect(&self) -> &'static str {
        match (self.kind, &self.deny) {
            (RefusedKind::AuthorizationPolicy, Some(_)) => "deny_all",
            (RefusedKind::AuthorizationPolicy, None) => "none",
            (RefusedKind::RequestAuthentication, _) if self.tokens.is_empty() => "none",
            (RefusedKind::RequestAuthentication, _) => "reject_tokens",
        }
    }

    /// Whether its selection could not be read and `service` is in its namespace (any
    /// namespace, from the root namespace): a waypoint then enforces it for that Service.
    pub fn covers_service(&self, service: Option<&NamespacedName>) -> bool {
        self.scope == RefusedScope::Namespace
            && service
                .is_some_and(|s| self.namespace == ROOT_NAMESPACE || s.namespace == self.namespace)
    }

    /// Whether the node agent enforces it for `pod` (selector or namespace scope).
    pub fn selects_pod(&self, pod: &Pod) -> bool {
        let in_scope = self.namespace == ROOT_NAMESPACE || self.namespace == pod.namespace;
        in_scope
            && match &self.scope {
                RefusedScope::Selector(s) => {
                    s.as_ref().is_none_or(|s| selector_matches(s, &pod.labels))
                }
                RefusedScope::Namespace => true,
                RefusedScope::TargetRefs(_) => false,
            }
    }
}

/// The [`RefusedPolicy::deny`] of an AuthorizationPolicy refused in `namespace` as `name`:
/// one empty rule, which matches every connection and request.
pub fn deny_all(
    namespace: &str,
    name: &str,
    scope: &RefusedScope,
    dry_run: bool,
) -> AuthorizationPolicy {
    let (selector, target_refs) = match scope {
        RefusedScope::Selector(s) => (s.clone(), Vec::new()),
        RefusedScope::TargetRefs(t) => (None, t.clone()),
        RefusedScope::Namespace => (None, Vec::new()),
    };
    AuthorizationPolicy {
        name: name.to_string(),
        namespace: namespace.to_string(),
        selector,
        target_refs,
        action: super::Action::Deny,
        rules: vec![super::Rule::default()],
        dry_run,
    }
}
