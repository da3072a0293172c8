//! Who may hold which identity: the CA's authorization decision, a pure function of the
//! authenticated caller, the identity it asks for and the pods the CA knows.
//!
//! - Any authenticated caller may obtain the identity its own token names (a waypoint, or a
//!   proxy dedicated to one workload).
//! - A node agent (a service account listed in [`Rules::node_accounts`], Istio's
//!   `istio-system/ztunnel`) may also obtain the identity of a pod scheduled on *its own
//!   node*: one whose `spec.nodeName` is the caller's node and whose namespace and service
//!   account make up the identity asked for. The caller's node comes from its token (bound to
//!   a node, or to a pod whose node the CA looks up).
//! - Everything else is refused with a named [`Refusal`].

use mesh_model::identity::Identity;
use mesh_model::model::{Model, NamespacedName};

/// The pod a token is bound to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BoundPod {
    pub name: String,
    pub uid: Option<String>,
}

/// An authenticated caller: what its token (or the API server's TokenReview) says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub namespace: String,
    pub service_account: String,
    /// The node the token is bound to.
    pub node: Option<String>,
    /// The pod the token is bound to.
    pub pod: Option<BoundPod>,
}

impl Caller {
    /// `ns/sa`, plus `@node` when bound to one: how logs and the dump name callers.
    pub fn describe(&self) -> String {
        let mut s = format!("{}/{}", self.namespace, self.service_account);
        if let Some(pod) = &self.pod {
            s.push_str(&format!(" pod {}", pod.name));
        }
        if let Some(node) = &self.node {
            s.push_str(&format!(" @{node}"));
        }
        s
    }
}

/// The CA's authorization settings.
#[derive(Clone, Debug)]
pub struct Rules {
    pub trust_domain: String,
    /// Service accounts of node agents (`istio-system/ztunnel`).
    pub node_accounts: Vec<NamespacedName>,
}

/// Why an identity was refused. [`Refusal::reason`] is the metric label.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("ImpersonatedIdentity {0:?} is not a spiffe identity")]
    BadImpersonation(String),
    #[error("{0} is not in trust domain {1}")]
    ForeignTrustDomain(String, String),
    #[error("caller may hold only its own identity, not {0}")]
    NotANodeAgent(String),
    #[error("the node agent's token is bound to no node")]
    CallerNodeUnknown,
    #[error("the pod the token is bound to ({0}) no longer exists")]
    CallerPodGone(String),
    #[error("no pod on node {node} runs as {identity}")]
    NoSuchPodOnNode { node: String, identity: String },
}

impl Refusal {
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::BadImpersonation(_) => "bad_impersonation",
            Refusal::ForeignTrustDomain(..) => "foreign_trust_domain",
            Refusal::NotANodeAgent(_) => "not_a_node_agent",
            Refusal::CallerNodeUnknown => "caller_node_unknown",
            Refusal::CallerPodGone(_) => "caller_pod_gone",
            Refusal::NoSuchPodOnNode { .. } => "no_such_pod_on_node",
        }
    }
}

/// How an identity was granted (a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Grant {
    /// The caller's own identity.
    Own,
    /// A pod's identity, to the node agent of the pod's node.
    Node,
}

impl Grant {
    pub fn as_str(self) -> &'static str {
        match self {
            Grant::Own => "own",
            Grant::Node => "node",
        }
    }
}

/// The identity `caller` may be issued when it asks for `requested` (the
/// `ImpersonatedIdentity` metadata; `None`: its own).
pub fn authorize(
    rules: &Rules,
    caller: &Caller,
    requested: Option<&str>,
    model: &Model,
) -> Result<(Identity, Grant), Refusal> {
    let own = Identity::new(
        &rules.trust_domain,
        &caller.namespace,
        &caller.service_account,
    );
    let Some(requested) = requested else {
        return Ok((own, Grant::Own));
    };
    let wanted: Identity = requested
        .parse()
        .map_err(|_| Refusal::BadImpersonation(requested.chars().take(200).collect()))?;
    if wanted.trust_domain != rules.trust_domain {
        return Err(Refusal::ForeignTrustDomain(
            wanted.uri(),
            rules.trust_domain.clone(),
        ));
    }
    if wanted == own {
        return Ok((own, Grant::Own));
    }
    let account = NamespacedName {
        namespace: caller.namespace.clone(),
        name: caller.service_account.clone(),
    };
    if !rules.node_accounts.contains(&account) {
        return Err(Refusal::NotANodeAgent(wanted.uri()));
    }
    let node = caller_node(caller, model)?;
    let on_node = model.pods.values().any(|p| {
        p.node_name.as_deref() == Some(node.as_str())
            && p.namespace == wanted.namespace
            && p.service_account == wanted.service_account
    });
    if on_node {
        Ok((wanted, Grant::Node))
    } else {
        Err(Refusal::NoSuchPodOnNode {
            node,
            identity: wanted.uri(),
        })
    }
}

/// The node a node agent's token speaks for: the pod it is bound to must still exist (same
/// uid) and its node is the caller's; else the node the token names.
fn caller_node(caller: &Caller, model: &Model) -> Result<String, Refusal> {
    if let Some(bound) = &caller.pod {
        let key = NamespacedName {
            namespace: caller.namespace.clone(),
            name: bound.name.clone(),
        };
        let gone = || Refusal::CallerPodGone(format!("{}/{}", key.namespace, key.name));
        let pod = model.pods.get(&key).ok_or_else(gone)?;
        if bound.uid.is_some() && pod.uid.is_some() && bound.uid != pod.uid {
            return Err(gone());
        }
        let node = pod.node_name.clone().ok_or(Refusal::CallerNodeUnknown)?;
        // A token naming both must agree with where the pod actually runs.
        if caller.node.as_ref().is_some_and(|n| *n != node) {
            return Err(Refusal::CallerNodeUnknown);
        }
        return Ok(node);
    }
    caller.node.clone().ok_or(Refusal::CallerNodeUnknown)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: demo, uid: u-web-1}
spec: {nodeName: n1, serviceAccountName: web}
status: {podIP: 10.0.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: demo, uid: u-db-1}
spec: {nodeName: n2, serviceAccountName: db}
status: {podIP: 10.0.2.10}
---
apiVersion: v1
kind: Pod
metadata: {name: ztunnel-a, namespace: istio-system, uid: u-zt-a}
spec: {nodeName: n1, serviceAccountName: ztunnel}
status: {podIP: 10.0.1.2}
"#;

    fn model() -> Model {
        mesh_model::k8s::load_docs(&[("model.yaml".to_string(), MODEL.to_string())]).expect("model")
    }

    fn rules() -> Rules {
        Rules {
            trust_domain: "cluster.local".into(),
            node_accounts: vec![NamespacedName {
                namespace: "istio-system".into(),
                name: "ztunnel".into(),
            }],
        }
    }

    fn caller(ns: &str, sa: &str, node: Option<&str>, pod: Option<(&str, &str)>) -> Caller {
        Caller {
            namespace: ns.into(),
            service_account: sa.into(),
            node: node.map(str::to_string),
            pod: pod.map(|(name, uid)| BoundPod {
                name: name.into(),
                uid: Some(uid.into()),
            }),
        }
    }

    fn id(ns: &str, sa: &str) -> String {
        format!("spiffe://cluster.local/ns/{ns}/sa/{sa}")
    }

    #[test]
    fn the_decision_table() {
        let agent_n1 = caller("istio-system", "ztunnel", Some("n1"), None);
        let agent_pod = caller(
            "istio-system",
            "ztunnel",
            None,
            Some(("ztunnel-a", "u-zt-a")),
        );
        let agent_gone = caller(
            "istio-system",
            "ztunnel",
            None,
            Some(("ztunnel-b", "u-zt-b")),
        );
        let agent_stale_uid = caller(
            "istio-system",
            "ztunnel",
            None,
            Some(("ztunnel-a", "u-old")),
        );
        let agent_unbound = caller("istio-system", "ztunnel", None, None);
        let agent_lying = caller(
            "istio-system",
            "ztunnel",
            Some("n2"),
            Some(("ztunnel-a", "u-zt-a")),
        );
        let waypoint = caller("demo", "waypoint", None, None);
        let web = id("demo", "web");
        let db = id("demo", "db");
        type Case<'a> = (
            &'a str,
            &'a Caller,
            Option<String>,
            Result<(String, Grant), &'a str>,
        );
        let cases: Vec<Case<'_>> = vec![
            (
                "own identity, implicit",
                &waypoint,
                None,
                Ok((id("demo", "waypoint"), Grant::Own)),
            ),
            (
                "own identity, named",
                &waypoint,
                Some(id("demo", "waypoint")),
                Ok((id("demo", "waypoint"), Grant::Own)),
            ),
            (
                "a waypoint asking for a workload",
                &waypoint,
                Some(web.clone()),
                Err("not_a_node_agent"),
            ),
            (
                "agent, pod on its node",
                &agent_n1,
                Some(web.clone()),
                Ok((web.clone(), Grant::Node)),
            ),
            (
                "agent, pod on another node",
                &agent_n1,
                Some(db.clone()),
                Err("no_such_pod_on_node"),
            ),
            (
                "agent, no pod runs as it",
                &agent_n1,
                Some(id("demo", "nobody")),
                Err("no_such_pod_on_node"),
            ),
            (
                "agent bound to a pod on n1",
                &agent_pod,
                Some(web.clone()),
                Ok((web.clone(), Grant::Node)),
            ),
            (
                "agent bound to a pod on n1, asking n2's",
                &agent_pod,
                Some(db.clone()),
                Err("no_such_pod_on_node"),
            ),
            (
                "agent bound to a deleted pod",
                &agent_gone,
                Some(web.clone()),
                Err("caller_pod_gone"),
            ),
            (
                "agent bound to a pod since recreated",
                &agent_stale_uid,
                Some(web.clone()),
                Err("caller_pod_gone"),
            ),
            (
                "agent bound to nothing",
                &agent_unbound,
                Some(web.clone()),
                Err("caller_node_unknown"),
            ),
            (
                "agent claiming another node than its pod's",
                &agent_lying,
                Some(db.clone()),
                Err("caller_node_unknown"),
            ),
            (
                "agent, own identity",
                &agent_unbound,
                None,
                Ok((id("istio-system", "ztunnel"), Grant::Own)),
            ),
            (
                "foreign trust domain",
                &agent_n1,
                Some("spiffe://evil.example/ns/demo/sa/web".into()),
                Err("foreign_trust_domain"),
            ),
            (
                "not a spiffe uri",
                &agent_n1,
                Some("demo/web".into()),
                Err("bad_impersonation"),
            ),
        ];
        let model = model();
        for (name, who, asked, want) in cases {
            let got = authorize(&rules(), who, asked.as_deref(), &model)
                .map(|(i, g)| (i.uri(), g))
                .map_err(|r| r.reason());
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn a_node_account_is_only_what_the_rules_list() {
        let mut r = rules();
        r.node_accounts.clear();
        let agent = caller("istio-system", "ztunnel", Some("n1"), None);
        let got = authorize(&r, &agent, Some(&id("demo", "web")), &model());
        assert_eq!(got.map_err(|e| e.reason()), Err("not_a_node_agent"));
    }
}
