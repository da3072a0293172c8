//! Writes an ingress Gateway's status back to the API server.
//!
//! The status is computed from the model alone ([`Model::gateway_status`], pure); this module
//! only renders it as the Gateway API's `status` and writes it, as a JSON merge patch of the
//! `gateways/status` subresource (`conditions`, `listeners` and `addresses`: the gateway's
//! Service's, as `{type: IPAddress|Hostname, value}`; with no such Service in the model the
//! patch removes `addresses`, which is left out rather than written empty):
//! - after each installed model, and only when the rendered status differs from the last one
//!   written (or, at start and after a failed write, from the one the API server holds, read
//!   once), so an unchanged Gateway costs no write and a restart no flap;
//! - every condition carries `observedGeneration` (the Gateway's `metadata.generation` the
//!   model was built from) and a `lastTransitionTime` kept from the previous status while the
//!   condition's `status` stays the same;
//! - a failed read or write is logged and retried at the next change, or after a backoff
//!   (1 s doubling to 1 min) if nothing changes; never fatal, and the proxy keeps serving.
//!
//! Nothing else of the Gateway is written, and writing the status changes nothing the model
//! reads (the watched Gateway keeps only `status.addresses`, and not an ingress Gateway's:
//! see `resources.rs`), so a write never feeds back.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::chrono::{SecondsFormat, Utc};
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::runtime::utils::Backoff;
use kube::Client;
use mesh_model::model::{
    ConditionType, GatewayStatus, HostAddress, ListenerStatus, Model, NamespacedName,
    StatusCondition, GATEWAY_API_GROUP,
};
use serde_json::{json, Map, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::Retry;

/// First retry delay after a failed read or write of the status.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// The Gateway API's `maxLength` of a condition's `message`.
const MAX_MESSAGE: usize = 32768;

/// Writes the status of the ingress Gateway `gateway` (class `istio`) after the model
/// `current` returns whenever `changed` fires (and once at start), until `stop` or until
/// `changed`'s sender is gone. A model without that Gateway (or where it is of another
/// class) writes nothing. See the module docs.
pub async fn write_gateway_status(
    client: Client,
    gateway: NamespacedName,
    mut changed: watch::Receiver<()>,
    current: impl Fn() -> Arc<Model> + Send,
    stop: CancellationToken,
) {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk(GATEWAY_API_GROUP, "v1", "Gateway"),
        "gateways",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(client, &gateway.namespace, &resource);
    let mut writer = Writer {
        api,
        gateway,
        known: None,
    };
    let mut retry = Retry::new(RETRY_MIN, RETRY_MAX);
    loop {
        changed.borrow_and_update();
        let model = current();
        let retry_in = match writer.sync(&model).await {
            Ok(()) => {
                retry.reset();
                None
            }
            Err(e) => {
                let delay = retry.next().unwrap_or(RETRY_MAX);
                warn!(gateway = %writer.gateway, error = %e, retry_in = ?delay, "gateway status not written; retrying at the next change or after the delay");
                Some(delay)
            }
        };
        let retry_due = async {
            match retry_in {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            r = changed.changed() => if r.is_err() { return },
            _ = retry_due => {}
        }
    }
}

/// The writer's state: what the API server holds, as far as it knows.
struct Writer {
    api: Api<DynamicObject>,
    gateway: NamespacedName,
    /// The status (`conditions`, `listeners`, `addresses`) last written or read; `None`:
    /// unknown, read it before writing (at start, after a failure, after the Gateway left the
    /// model).
    known: Option<Value>,
}

impl Writer {
    /// Writes the status `model` gives the Gateway if it differs from the known one.
    async fn sync(&mut self, model: &Model) -> Result<(), kube::Error> {
        let Some(status) = model.gateway_status(&self.gateway) else {
            // Deleted (or not an ingress Gateway): a Gateway created again under this name
            // starts without a status, so what was written before is no longer known.
            self.known = None;
            return Ok(());
        };
        let generation = model.gateways.get(&self.gateway).and_then(|g| g.generation);
        let known = match self.known.take() {
            Some(known) => known,
            None => {
                let obj = self.api.get(&self.gateway.name).await?;
                written_part(obj.data.get("status"))
            }
        };
        let next = render(&status, generation, Some(&known), &now());
        if next == known {
            debug!(gateway = %self.gateway, "gateway status unchanged");
            self.known = Some(known);
            return Ok(());
        }
        let patch = patch(&next);
        self.api
            .patch_status(
                &self.gateway.name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await?;
        info!(
            gateway = %self.gateway,
            generation = ?generation,
            summary = %summary(&status),
            "gateway status written"
        );
        self.known = Some(next);
        Ok(())
    }
}

/// `2025-01-01T00:00:00Z`: a Kubernetes `metav1.Time` (RFC 3339, seconds, UTC).
fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The merge patch that makes the API server's status `next`: `addresses` it lacks are
/// removed (`null`), not left as they were.
fn patch(next: &Value) -> Value {
    let mut status = next.clone();
    if let Some(fields) = status.as_object_mut() {
        fields.entry("addresses").or_insert(Value::Null);
    }
    json!({ "status": status })
}

/// `Accepted=True Programmed=True; http: ok, https: InvalidCertificateRef, Invalid;
/// addresses 203.0.113.7`: for the log.
fn summary(status: &GatewayStatus) -> String {
    let state =
        |c: &StatusCondition| format!("{:?}={}", c.type_, if c.status { "True" } else { "False" });
    let gateway: Vec<String> = status.conditions.iter().map(state).collect();
    let listeners: Vec<String> = status
        .listeners
        .iter()
        .map(|l| {
            let failing: Vec<String> = l
                .conditions
                .iter()
                // Conflicted is the one condition that fails when true.
                .filter(|c| c.status == (c.type_ == ConditionType::Conflicted))
                .map(|c| format!("{:?}", c.reason))
                .collect();
            if failing.is_empty() {
                format!("{}: ok", l.name)
            } else {
                format!("{}: {}", l.name, failing.join(", "))
            }
        })
        .collect();
    let addresses = match &status.addresses {
        Some(a) if !a.is_empty() => {
            let a: Vec<String> = a.iter().map(HostAddress::to_string).collect();
            format!("addresses {}", a.join(", "))
        }
        _ => "no addresses".to_string(),
    };
    format!(
        "{}; {}; {addresses}",
        gateway.join(" "),
        listeners.join(", ")
    )
}

/// The part of a Gateway's `status` this writer owns (`conditions`, `listeners`,
/// `addresses`), as the API server holds it; missing lists as empty ones, `addresses` only
/// when it lists some (as [`render`] leaves it out).
fn written_part(status: Option<&Value>) -> Value {
    let list = |key: &str| {
        status
            .and_then(|s| s.get(key))
            .filter(|v| v.is_array())
            .cloned()
            .unwrap_or_else(|| Value::Array(Vec::new()))
    };
    let mut out = json!({"conditions": list("conditions"), "listeners": list("listeners")});
    let addresses = list("addresses");
    if addresses.as_array().is_some_and(|a| !a.is_empty()) {
        out["addresses"] = addresses;
    }
    out
}

/// The Gateway API `status` (`conditions`, `listeners` and, when there are any,
/// `addresses`) of `status`, each condition with `observedGeneration` (when known) and a
/// `lastTransitionTime`: the one of the same condition (same type; for a listener, of the
/// listener of the same name) in `previous` when its `status` is unchanged, else `now`.
/// Pure.
pub(crate) fn render(
    status: &GatewayStatus,
    generation: Option<i64>,
    previous: Option<&Value>,
    now: &str,
) -> Value {
    let before = |path: Option<&Value>| path.and_then(Value::as_array).cloned();
    let previous_conditions = before(previous.and_then(|p| p.get("conditions")));
    let previous_listeners = before(previous.and_then(|p| p.get("listeners")));
    let conditions = conditions(
        &status.conditions,
        generation,
        previous_conditions.as_deref(),
        now,
    );
    let listeners: Vec<Value> = status
        .listeners
        .iter()
        .map(|l| {
            let old = previous_listeners
                .as_deref()
                .and_then(|ls| ls.iter().find(|p| p["name"] == l.name.as_str()))
                .and_then(|p| p.get("conditions"))
                .and_then(Value::as_array);
            listener(l, generation, old.map(Vec::as_slice), now)
        })
        .collect();
    let mut out = json!({"conditions": conditions, "listeners": listeners});
    if let Some(addresses) = status.addresses.as_ref().filter(|a| !a.is_empty()) {
        let addresses: Vec<Value> = addresses
            .iter()
            .map(|a| json!({"type": a.type_name(), "value": a.to_string()}))
            .collect();
        out["addresses"] = Value::Array(addresses);
    }
    out
}

fn listener(
    l: &ListenerStatus,
    generation: Option<i64>,
    previous: Option<&[Value]>,
    now: &str,
) -> Value {
    let kinds: Vec<Value> = l
        .supported_kinds
        .iter()
        .map(|k| json!({"group": GATEWAY_API_GROUP, "kind": k}))
        .collect();
    json!({
        "name": l.name,
        "supportedKinds": kinds,
        "attachedRoutes": l.attached_routes,
        "conditions": conditions(&l.conditions, generation, previous, now),
    })
}

fn conditions(
    conditions: &[StatusCondition],
    generation: Option<i64>,
    previous: Option<&[Value]>,
    now: &str,
) -> Vec<Value> {
    conditions
        .iter()
        .map(|c| {
            let type_ = format!("{:?}", c.type_);
            let status = if c.status { "True" } else { "False" };
            let since = previous
                .and_then(|p| p.iter().find(|old| old["type"] == type_.as_str()))
                .filter(|old| old["status"] == status)
                .and_then(|old| old["lastTransitionTime"].as_str())
                .unwrap_or(now);
            let mut out = Map::new();
            out.insert("type".into(), Value::String(type_));
            out.insert("status".into(), Value::String(status.into()));
            out.insert("reason".into(), Value::String(format!("{:?}", c.reason)));
            out.insert("message".into(), Value::String(bounded(&c.message)));
            out.insert("lastTransitionTime".into(), Value::String(since.into()));
            if let Some(g) = generation {
                out.insert("observedGeneration".into(), Value::from(g));
            }
            Value::Object(out)
        })
        .collect()
}

/// `message` cut to the Gateway API's limit, on a character boundary.
fn bounded(message: &str) -> String {
    if message.len() <= MAX_MESSAGE {
        return message.to_string();
    }
    let mut end = MAX_MESSAGE;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    message[..end].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: &str = "2025-01-01T00:00:00Z";
    const T1: &str = "2025-01-01T00:01:00Z";

    /// Gateway `shop/web` of class istio: an HTTP listener with a route, and an HTTPS one
    /// whose Secret `cert` exists when `with_secret`.
    fn model(with_secret: bool) -> Model {
        let mut yaml = String::from(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
             metadata: {name: web, namespace: shop, generation: 3}\n\
             spec:\n  gatewayClassName: istio\n  listeners:\n\
             \x20 - {name: http, port: 80, protocol: HTTP}\n\
             \x20 - {name: https, port: 443, protocol: HTTPS, tls: {certificateRefs: [{name: cert}]}}\n\
             ---\napiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\n\
             metadata: {name: r, namespace: shop}\n\
             spec:\n  parentRefs: [{name: web, sectionName: http}]\n",
        );
        if with_secret {
            yaml.push_str(
                "---\napiVersion: v1\nkind: Secret\nmetadata: {name: cert, namespace: shop}\n\
                 type: kubernetes.io/tls\nstringData:\n\
                 \x20 tls.crt: \"-----BEGIN CERTIFICATE-----\\nY2VydA==\\n-----END CERTIFICATE-----\\n\"\n\
                 \x20 tls.key: \"-----BEGIN PRIVATE KEY-----\\na2V5\\n-----END PRIVATE KEY-----\\n\"\n",
            );
        }
        mesh_model::k8s::load_docs(&[("m.yaml".to_string(), yaml)]).expect("model")
    }

    fn status(with_secret: bool) -> GatewayStatus {
        model(with_secret)
            .gateway_status(&NamespacedName::new("shop", "web"))
            .expect("ingress gateway")
    }

    /// The Gateway `shop/web` asking for `requested` (`spec.addresses` YAML) with its
    /// Service `web-istio` whose load balancer is at `lb` (`status.loadBalancer.ingress`
    /// YAML).
    fn status_with_service(requested: &str, lb: &str) -> GatewayStatus {
        let yaml = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\n\
             metadata: {{name: web, namespace: shop, generation: 3}}\n\
             spec:\n  gatewayClassName: istio\n  addresses: {requested}\n  listeners:\n\
             \x20 - {{name: http, port: 80, protocol: HTTP}}\n\
             ---\napiVersion: v1\nkind: Service\nmetadata: {{name: web-istio, namespace: shop}}\n\
             spec: {{type: LoadBalancer, clusterIP: 10.96.0.30}}\n\
             status: {{loadBalancer: {{ingress: {lb}}}}}\n"
        );
        mesh_model::k8s::load_docs(&[("m.yaml".to_string(), yaml)])
            .expect("model")
            .gateway_status(&NamespacedName::new("shop", "web"))
            .expect("ingress gateway")
    }

    /// `status.addresses` are the Service's, typed; a requested address it lacks turns
    /// Programmed False; without the Service there are none, and the patch removes any.
    #[test]
    fn the_addresses_are_the_services_and_a_missing_service_removes_them() {
        let lb = "[{ip: 203.0.113.7}, {hostname: lb.example.com}]";
        let s = render(&status_with_service("[]", lb), Some(3), None, T0);
        assert_eq!(
            s["addresses"],
            json!([{"type": "IPAddress", "value": "203.0.113.7"},
                   {"type": "Hostname", "value": "lb.example.com"}])
        );
        assert_eq!(written_part(Some(&s)), s, "read back as written");
        assert_eq!(patch(&s)["status"]["addresses"], s["addresses"]);
        assert!(summary(&status_with_service("[]", lb))
            .ends_with("; addresses 203.0.113.7, lb.example.com"));

        let unusable = status_with_service("[{value: 198.51.100.1}]", lb);
        let s = render(&unusable, Some(3), Some(&s), T1);
        let programmed = condition(&s["conditions"], "Programmed");
        assert_eq!(programmed["status"], "False");
        assert_eq!(programmed["reason"], "AddressNotUsable");
        assert_eq!(programmed["lastTransitionTime"], T1);
        assert_eq!(s["addresses"][0]["value"], "203.0.113.7", "still reported");

        let none = render(&status(false), Some(3), None, T0);
        assert!(none.get("addresses").is_none(), "{none}");
        assert_eq!(patch(&none)["status"]["addresses"], Value::Null);
        assert!(summary(&status(false)).ends_with("; no addresses"));
    }

    fn condition<'a>(conditions: &'a Value, type_: &str) -> &'a Value {
        conditions
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == type_))
            .unwrap_or_else(|| panic!("no {type_} in {conditions}"))
    }

    fn listener_condition<'a>(status: &'a Value, name: &str, type_: &str) -> &'a Value {
        let l = status["listeners"]
            .as_array()
            .and_then(|ls| ls.iter().find(|l| l["name"] == name))
            .unwrap_or_else(|| panic!("no listener {name} in {status}"));
        condition(&l["conditions"], type_)
    }

    #[test]
    fn the_status_is_the_gateway_apis_with_generation_and_transition_times() {
        let s = render(&status(false), Some(3), None, T0);
        assert_eq!(
            condition(&s["conditions"], "Accepted"),
            &json!({"type": "Accepted", "status": "True", "reason": "Accepted",
                    "message": "Resource accepted", "lastTransitionTime": T0,
                    "observedGeneration": 3})
        );
        assert_eq!(condition(&s["conditions"], "Programmed")["status"], "True");
        let http = &s["listeners"][0];
        assert_eq!(http["name"], "http");
        assert_eq!(http["attachedRoutes"], 1);
        assert_eq!(
            http["supportedKinds"],
            json!([{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"},
                   {"group": "gateway.networking.k8s.io", "kind": "GRPCRoute"}])
        );
        assert_eq!(
            listener_condition(&s, "http", "Programmed")["status"],
            "True"
        );
        let refs = listener_condition(&s, "https", "ResolvedRefs");
        assert_eq!(refs["status"], "False");
        assert_eq!(refs["reason"], "InvalidCertificateRef");
        assert!(
            refs["message"]
                .as_str()
                .is_some_and(|m| m.contains("shop/cert")),
            "{refs}"
        );
        assert_eq!(s["listeners"][1]["attachedRoutes"], 0);
        // Without a generation (a Gateway written without one) there is none to observe.
        let s = render(&status(false), None, None, T0);
        assert!(condition(&s["conditions"], "Accepted")
            .get("observedGeneration")
            .is_none());
    }

    #[test]
    fn a_condition_keeps_its_transition_time_until_its_status_changes() {
        let before = render(&status(false), Some(3), None, T0);
        // Nothing changed: the same status, to the byte (no write).
        assert_eq!(render(&status(false), Some(3), Some(&before), T1), before);
        // The Secret arrives: ResolvedRefs and Programmed of `https` turn True at T1; every
        // other condition keeps T0 (messages may change without a transition).
        let after = render(&status(true), Some(3), Some(&before), T1);
        assert_ne!(after, before);
        let https = |type_| listener_condition(&after, "https", type_);
        assert_eq!(https("ResolvedRefs")["status"], "True");
        assert_eq!(https("ResolvedRefs")["lastTransitionTime"], T1);
        assert_eq!(https("Programmed")["lastTransitionTime"], T1);
        assert_eq!(https("Accepted")["lastTransitionTime"], T0);
        assert_eq!(
            listener_condition(&after, "http", "Programmed")["lastTransitionTime"],
            T0
        );
        assert_eq!(
            condition(&after["conditions"], "Programmed")["lastTransitionTime"],
            T0
        );
        // A new generation is observed without a transition.
        let next = render(&status(true), Some(4), Some(&after), T1);
        assert_eq!(
            condition(&next["conditions"], "Accepted")["observedGeneration"],
            4
        );
        assert_eq!(
            condition(&next["conditions"], "Accepted")["lastTransitionTime"],
            T0
        );
    }

    /// The status the API server holds when the writer starts (another process wrote it, or
    /// none yet) is read into the same shape, so a restart keeps the transition times.
    #[test]
    fn a_status_read_back_is_compared_as_written() {
        let written = render(&status(false), Some(3), None, T0);
        let mut server = written.clone();
        assert_eq!(written_part(Some(&server)), written);
        // Addresses the model does not give (its Service is gone) differ: they are removed.
        server["addresses"] = json!([{"type": "IPAddress", "value": "10.0.0.1"}]);
        assert_ne!(written_part(Some(&server)), written);
        assert_eq!(patch(&written)["status"]["addresses"], Value::Null);
        server["addresses"] = json!([]);
        assert_eq!(
            written_part(Some(&server)),
            written,
            "an empty list is none"
        );
        assert_eq!(
            written_part(None),
            json!({"conditions": [], "listeners": []})
        );
        assert_eq!(
            written_part(Some(&json!({"conditions": "odd"}))),
            json!({"conditions": [], "listeners": []})
        );
    }

    #[test]
    fn long_messages_are_cut_on_a_character_boundary() {
        let long = "é".repeat(MAX_MESSAGE);
        let cut = bounded(&long);
        assert!(cut.len() <= MAX_MESSAGE && cut.len() >= MAX_MESSAGE - 1);
        assert_eq!(bounded("short"), "short");
    }

    #[test]
    fn the_log_summary_names_what_fails() {
        let s = summary(&status(false));
        assert!(
            s.starts_with("Accepted=True Programmed=True; http: ok, https: "),
            "{s}"
        );
        assert!(s.contains("InvalidCertificateRef"), "{s}");
    }
}
