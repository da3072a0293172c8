//! Istio PeerAuthentication and L4 AuthorizationPolicy, as the destination's ztunnel
//! enforces them. Pure functions over the model: no IO, no clock, table-tested.
//!
//! # AuthorizationPolicy at L4
//!
//! For the policies that apply to a workload ([`policies_for`]): 1. a matching `DENY`
//! denies; 2. with no `ALLOW` policy, the connection is allowed; 3. a matching `ALLOW`
//! allows; 4. otherwise it is denied. A policy matches when any rule matches; a rule matches
//! when its `from`, `to` and `when` all match; `from`/`to` match when any entry matches; an
//! entry matches when every field it sets matches (any value of a list; none of a `notX`
//! list). A rule with nothing in it matches everything; a policy with no rules matches
//! nothing (so `spec: {}`, an ALLOW without rules, denies all).
//!
//! Principals and namespaces match exactly, `*` (any non-empty value), `prefix*` or
//! `*suffix`; anything else, regex metacharacters included, is literal. Principals carry no
//! `spiffe://` prefix.
//!
//! What ztunnel sees of a connection is [`L4Request`]. Decisions this module makes where
//! Istio's ztunnel defines the behaviour (istiod's ambient translation plus ztunnel's RBAC):
//!
//! - **No identity (plaintext).** Positive `principals`/`namespaces`/`serviceAccounts` (and
//!   the `source.principal`/`source.namespace` conditions) never match; their `not` forms
//!   always do. `notPrincipals: ["*"]` therefore matches exactly the plaintext connections,
//!   which is how "require mTLS" is written.
//! - **HTTP attributes** (`requestPrincipals`, `hosts`, `methods`, `paths`, their `not`
//!   forms, and `when` keys other than the L4 ones below): ztunnel cannot see them. In an
//!   `ALLOW` policy a rule that uses any of them is omitted (it never matches, so traffic is
//!   denied unless another rule allows it). In a `DENY` policy they are dropped and the rest
//!   of the rule applies, so the policy denies more than asked (fail closed); a clause left
//!   with nothing in it matches everything, as Istio documents ("DENY policy with HTTP
//!   attributes is enforced without the HTTP rules").
//! - **L4 `when` keys:** `source.ip`, `remote.ip`, `source.namespace`, `source.principal`,
//!   `destination.ip`, `destination.port`. `connection.sni` and `source.serviceAccount` count
//!   as HTTP attributes, as in Istio's ambient translation.
//! - **`remoteIpBlocks` / `remote.ip`** are enforced against the connection's source IP,
//!   which is the remote address at L4 (Istio's sidecar behaviour on TCP).
//! - **`AUDIT`** policies never decide; a matching one is listed in
//!   [`Evaluation::audited`]. HTTP attributes are dropped as for DENY, so audit over-reports
//!   rather than misses.
//! - **`CUSTOM`** (external authorization) needs a waypoint; ztunnel ignores it, and so do we.
//! - **Dry-run** (`istio.io/dry-run: "true"`) policies never decide. As Envoy's shadow rules
//!   do, they are evaluated on their own and reported in [`Evaluation::dry_run_denied`]: each
//!   matching dry-run DENY, and every dry-run ALLOW when none of them matches.
//! - Policies with `targetRefs` are for waypoints and do not apply at L4.
//! - **Refused policies** (API-server source; [`crate::model::RefusedPolicy`]): an
//!   AuthorizationPolicy the translator refused and that was never accepted is enforced as
//!   a DENY of everything for the workloads it would select (the whole namespace when even
//!   its selector cannot be read), until it is fixed or deleted. A refused AUDIT changes
//!   nothing.

use std::net::IpAddr;

use crate::identity::Identity;
use crate::model::{
    parse_ip_or_cidr, selector_matches, Action, AuthorizationPolicy, Condition, Model, Operation,
    PeerAuthentication, PeerAuthnMode, Pod, Rule, Source, ROOT_NAMESPACE,
};

/// What ztunnel knows about a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L4Request {
    /// The peer's certificate identity; `None` for plaintext.
    pub src_identity: Option<Identity>,
    pub src_ip: IpAddr,
    pub dst_ip: IpAddr,
    pub dst_port: u16,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Deny {
        /// `namespace/name` of the DENY policy that matched; `None` when ALLOW policies
        /// apply and none matched.
        policy: Option<String>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Evaluation {
    pub decision: Decision,
    /// AUDIT policies that matched (`namespace/name`).
    pub audited: Vec<String>,
    /// Dry-run policies that would have denied the connection (`namespace/name`).
    pub dry_run_denied: Vec<String>,
}

/// `namespace/name`, how policies are named in decisions and logs.
pub fn policy_key(policy: &AuthorizationPolicy) -> String {
    format!("{}/{}", policy.namespace, policy.name)
}

// === PeerAuthentication ===

/// The effective PeerAuthentication mode of `pod` on `port` (a container port). The most
/// specific setting wins: the workload policy's port-level mode, its workload-wide mode, the
/// namespace-wide policy, the mesh-wide policy (root namespace, no selector), and PERMISSIVE
/// when nothing is set. `UNSET` at any level inherits from the next one. When several
/// policies of one level match, Istio takes the oldest; we take the first by name.
/// Workload-selector policies in the root namespace are ignored, as istiod does for ambient.
pub fn peer_authn_mode(model: &Model, pod: &Pod, port: u16) -> PeerAuthnMode {
    // Only the root namespace's and the pod's own are read (indexed by namespace).
    let first = |ns: &str, keep: &dyn Fn(&PeerAuthentication) -> bool| {
        model
            .peer_authentications_in(ns)
            .filter(|pa| keep(pa))
            .min_by(|a, b| a.name.cmp(&b.name))
    };
    let mesh = first(ROOT_NAMESPACE, &|pa| !is_workload_policy(pa));
    let namespace = first(&pod.namespace, &|pa| !is_workload_policy(pa));
    let workload = first(&pod.namespace, &|pa| {
        pa.namespace != ROOT_NAMESPACE
            && pa
                .selector
                .as_ref()
                .is_some_and(|s| !s.is_empty() && selector_matches(s, &pod.labels))
    });
    let levels = [
        mesh.map(|pa| pa.mode),
        namespace.map(|pa| pa.mode),
        workload.map(|pa| pa.mode),
        workload.and_then(|pa| pa.port_levels.get(&port).copied()),
    ];
    levels
        .into_iter()
        .flatten()
        .rfind(|mode| *mode != PeerAuthnMode::Unset)
        .unwrap_or(PeerAuthnMode::Permissive)
}

fn is_workload_policy(pa: &PeerAuthentication) -> bool {
    pa.selector.as_ref().is_some_and(|s| !s.is_empty())
}

// === AuthorizationPolicy ===

/// The AuthorizationPolicies ztunnel enforces for `pod`, in model order: those in the root
/// namespace or the pod's namespace, without a selector or with one matching the pod's
/// labels (a root-namespace selector selects in every namespace). Policies with `targetRefs`
/// (waypoint policies) and CUSTOM policies are left out.
///
/// Refused policies that fail closed ([`crate::model::RefusedPolicy`]) come last, as the
/// DENY matching everything they are enforced as, named after the refused object.
pub fn policies_for<'a>(model: &'a Model, pod: &Pod) -> Vec<&'a AuthorizationPolicy> {
    // Accepted policies from the model's index (the root namespace's and the pod's, by
    // selector); refused ones (few, API-server source only) by a scan.
    let mut policies = model.l4_policies_for(pod);
    let refused = model
        .refused_policies
        .iter()
        .filter_map(|r| r.deny.as_ref())
        .filter(|p| applies_at_l4(p, pod));
    policies.extend(refused);
    policies
}

/// Whether ztunnel enforces `p` for `pod` (see [`policies_for`]).
pub(crate) fn applies_at_l4(p: &AuthorizationPolicy, pod: &Pod) -> bool {
    p.target_refs.is_empty()
        && p.action != Action::Custom
        && (p.namespace == ROOT_NAMESPACE || p.namespace == pod.namespace)
        && p.selector
            .as_ref()
            .is_none_or(|s| selector_matches(s, &pod.labels))
}

/// Decides a connection against `policies` (normally [`policies_for`] the destination).
pub fn evaluate_l4(policies: &[&AuthorizationPolicy], req: &L4Request) -> Evaluation {
    let peer = Peer::of(req);
    let mut tally = Tally::default();
    for policy in policies {
        match policy.action {
            // External authorization needs a waypoint; ztunnel ignores it.
            Action::Custom => {}
            Action::Audit => tally.audit(policy, matches_policy(policy, &peer, L7::Dropped)),
            Action::Deny => tally.deny(policy, 0, matches_policy(policy, &peer, L7::Dropped)),
            Action::Allow => {
                tally.allow(policy, matches_policy(policy, &peer, L7::RuleNeverMatches))
            }
        }
    }
    tally.finish()
}

/// Istio's order of AuthorizationPolicy actions over the policies that matched, shared by
/// the L4 and L7 evaluations: any (non-dry-run) DENY denies, naming the one of lowest rank
/// (the first among equals); otherwise ALLOW policies, when there are any, must match one;
/// dry-run policies only report what they would have done.
#[derive(Default)]
pub(crate) struct Tally {
    audited: Vec<String>,
    dry_run_denied: Vec<String>,
    denied_by: Option<(u8, String)>,
    allow_exists: bool,
    allowed: bool,
    dry_allows: Vec<String>,
    dry_allowed: bool,
}

impl Tally {
    pub(crate) fn audit(&mut self, policy: &AuthorizationPolicy, matched: bool) {
        if matched {
            self.audited.push(policy_key(policy));
        }
    }

    /// A DENY (or CUSTOM) policy; `rank` orders which one names the denial (lower first).
    pub(crate) fn deny(&mut self, policy: &AuthorizationPolicy, rank: u8, matched: bool) {
        if !matched {
            return;
        }
        if policy.dry_run {
            self.dry_run_denied.push(policy_key(policy));
        } else if self.denied_by.as_ref().is_none_or(|(r, _)| rank < *r) {
            self.denied_by = Some((rank, policy_key(policy)));
        }
    }

    pub(crate) fn allow(&mut self, policy: &AuthorizationPolicy, matched: bool) {
        if policy.dry_run {
            self.dry_allows.push(policy_key(policy));
            self.dry_allowed |= matched;
        } else {
            self.allow_exists = true;
            self.allowed |= matched;
        }
    }

    pub(crate) fn finish(mut self) -> Evaluation {
        if !self.dry_allowed {
            self.dry_run_denied.append(&mut self.dry_allows);
        }
        let decision = match self.denied_by {
            Some((_, policy)) => Decision::Deny {
                policy: Some(policy),
            },
            None if !self.allow_exists || self.allowed => Decision::Allow,
            None => Decision::Deny { policy: None },
        };
        Evaluation {
            decision,
            audited: self.audited,
            dry_run_denied: self.dry_run_denied,
        }
    }
}

/// [`evaluate_l4`] over [`policies_for`] the destination pod.
pub fn authorize(model: &Model, dst: &Pod, req: &L4Request) -> Evaluation {
    evaluate_l4(&policies_for(model, dst), req)
}

/// What rule parts that need HTTP (invisible to ztunnel) do to a match.
#[derive(Clone, Copy, PartialEq, Eq)]
enum L7 {
    /// ALLOW: a rule that needs them is omitted.
    RuleNeverMatches,
    /// DENY and AUDIT: they are dropped and the rest of the rule applies.
    Dropped,
}

/// The request with the identity pre-formatted, once per evaluation.
struct Peer<'r> {
    req: &'r L4Request,
    principal: Option<String>,
}

impl<'r> Peer<'r> {
    fn of(req: &'r L4Request) -> Self {
        Peer {
            req,
            principal: req.src_identity.as_ref().map(Identity::principal),
        }
    }

    fn principal(&self) -> Option<&str> {
        self.principal.as_deref()
    }

    fn namespace(&self) -> Option<&str> {
        self.req.src_identity.as_ref().map(|i| i.namespace.as_str())
    }

    /// `namespace/name` of the peer's service account.
    fn service_account_is(&self, ns_sa: &str) -> bool {
        match (&self.req.src_identity, ns_sa.split_once('/')) {
            (Some(id), Some((ns, sa))) => id.namespace == ns && id.service_account == sa,
            _ => false,
        }
    }
}

fn matches_policy(policy: &AuthorizationPolicy, peer: &Peer<'_>, l7: L7) -> bool {
    policy.rules.iter().any(|rule| matches_rule(rule, peer, l7))
}

fn matches_rule(rule: &Rule, peer: &Peer<'_>, l7: L7) -> bool {
    if l7 == L7::RuleNeverMatches && needs_l7(rule) {
        return false;
    }
    // From here on HTTP attributes are ignored: either there are none, or they are dropped.
    (rule.from.is_empty() || rule.from.iter().any(|s| matches_source(s, peer)))
        && (rule.to.is_empty() || rule.to.iter().any(|op| matches_operation(op, peer.req)))
        && rule.when.iter().all(|c| matches_condition(c, peer))
}

fn needs_l7(rule: &Rule) -> bool {
    let source =
        |s: &Source| !s.request_principals.is_empty() || !s.not_request_principals.is_empty();
    let operation = |op: &Operation| {
        !(op.hosts.is_empty()
            && op.not_hosts.is_empty()
            && op.methods.is_empty()
            && op.not_methods.is_empty()
            && op.paths.is_empty()
            && op.not_paths.is_empty())
    };
    rule.from.iter().any(source)
        || rule.to.iter().any(operation)
        || rule.when.iter().any(|c| !is_l4_key(&c.key))
}

const L4_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
];

fn is_l4_key(key: &str) -> bool {
    L4_KEYS.contains(&key)
}

fn matches_source(s: &Source, peer: &Peer<'_>) -> bool {
    let src_ip = peer.req.src_ip;
    let in_block = |net: &ipnet::IpNet| net.contains(&src_ip);
    one_of(&s.principals, &s.not_principals, |p| {
        wildcard(p, peer.principal())
    }) && one_of(&s.namespaces, &s.not_namespaces, |n| {
        wildcard(n, peer.namespace())
    }) && one_of(&s.service_accounts, &s.not_service_accounts, |sa| {
        peer.service_account_is(sa)
    }) && one_of(&s.ip_blocks, &s.not_ip_blocks, in_block)
        && one_of(&s.remote_ip_blocks, &s.not_remote_ip_blocks, in_block)
}

fn matches_operation(op: &Operation, req: &L4Request) -> bool {
    one_of(&op.ports, &op.not_ports, |p| *p == req.dst_port)
}

fn matches_condition(c: &Condition, peer: &Peer<'_>) -> bool {
    let req = peer.req;
    // Values were validated at load time; one that does not parse matches nothing.
    let ip_in = |ip: IpAddr| move |v: &String| parse_ip_or_cidr(v).is_some_and(|n| n.contains(&ip));
    match c.key.as_str() {
        "source.ip" | "remote.ip" => one_of(&c.values, &c.not_values, ip_in(req.src_ip)),
        "destination.ip" => one_of(&c.values, &c.not_values, ip_in(req.dst_ip)),
        "destination.port" => one_of(&c.values, &c.not_values, |v| {
            v.parse::<u16>() == Ok(req.dst_port)
        }),
        "source.namespace" => one_of(&c.values, &c.not_values, |v| wildcard(v, peer.namespace())),
        "source.principal" => one_of(&c.values, &c.not_values, |v| wildcard(v, peer.principal())),
        // An HTTP attribute in a DENY or AUDIT rule: dropped (ALLOW rules never get here).
        _ => true,
    }
}

/// A field with positive and negative values: any positive one matches (or there are
/// none), and no negative one does.
fn one_of<T>(positive: &[T], negative: &[T], matches: impl Fn(&T) -> bool) -> bool {
    (positive.is_empty() || positive.iter().any(&matches)) && !negative.iter().any(&matches)
}

/// Istio's string match: `*` is any non-empty value, `*suffix`, `prefix*`, otherwise exact.
/// There is nothing to match without an identity.
fn wildcard(pattern: &str, value: Option<&str>) -> bool {
    let Some(value) = value else {
        return false;
    };
    if pattern == "*" {
        !value.is_empty()
    } else if let Some(suffix) = pattern.strip_prefix('*') {
        value.ends_with(suffix)
    } else if let Some(prefix) = pattern.strip_suffix('*') {
        value.starts_with(prefix)
    } else {
        pattern == value
    }
}

pub mod authn;
pub mod l7;

#[cfg(test)]
mod tests;

#[cfg(test)]
mod refused_tests;
