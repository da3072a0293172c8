//! The kinds the agent watches and how an API object becomes a loader document.
//!
//! Pure functions, no IO. Objects arrive as [`DynamicObject`]s (only `metadata` is typed), so a
//! field the Kubernetes types would refuse to deserialize reaches the loader, which names the
//! object and field, instead of breaking the whole list for everyone.

use kube::api::{ApiResource, DynamicObject, GroupVersionKind};
use mesh_model::model::INGRESS_GATEWAY_CLASS;
use serde_json::{Map, Value};

/// Annotation `kubectl apply` stores the whole previous object in: often the largest field
/// of an object, never read by the mesh.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Which parts of an object's body (everything beside `metadata`) the loader is given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Body {
    /// Namespace and ServiceAccount: the loader reads only metadata.
    None,
    /// Pod: only the fields the loader reads (see [`pod_body`]); the rest of a pod (volumes,
    /// env, container statuses with restart counts and timestamps) is large and changes all
    /// the time, which would make every kubelet status update look like a config change.
    Pod,
    /// Service and the Istio policies: `spec` as it is. Policy specs must stay verbatim
    /// because the loader refuses unknown fields in them.
    Spec,
    /// Service for an ingress gateway ([`Scope::Gateway`]): `spec` as it is, and of `status`
    /// only `loadBalancer.ingress[].ip`/`hostname` (where clients reach the gateway behind
    /// its LoadBalancer Service, the Gateway's `status.addresses`). Other scopes read no
    /// Service status, so a load balancer's changes reach no agent or waypoint.
    ServiceWithLoadBalancer,
    /// Gateway: `spec` as it is, `metadata.generation` (the `observedGeneration` of the
    /// status an ingress gateway writes back; it changes only with `spec`), and of `status`
    /// only `addresses` (where a control plane put the waypoint, which wins over
    /// `spec.addresses`), except for an ingress Gateway (class `istio`), whose
    /// `status.addresses` this mesh writes itself: so a status written back changes nothing
    /// read. Conditions carry timestamps that change without changing the mesh, and an
    /// ingress gateway writes them itself.
    Gateway,
    /// EndpointSlice: `addressType`, `endpoints` and `ports` reduced to what the loader reads
    /// (see [`endpoint_slice_body`]). Node names, zones, hints, the `serving`/`terminating`
    /// conditions and `targetRef.uid`/`resourceVersion` change without changing the mesh.
    EndpointSlice,
    /// Secret (only `kubernetes.io/tls` ones are listed, see [`TLS_SECRET_SELECTOR`]): of the
    /// metadata only name, namespace and labels (annotations may carry anything, a copy of
    /// the whole Secret included), `type`, and of `data` only `tls.crt` and `tls.key`. The
    /// key stays in the store's accepted document and the model, neither of which is ever
    /// logged or dumped with it (`TlsSecret` redacts it).
    Secret,
}

/// The EndpointSlices watched: all but those the EndpointSlice controller derives from a
/// Service's selector. The model computes those endpoints from the pods themselves, and
/// watching them too would double every pod change (and in a large cluster, the pods'
/// slices are most of the slices). What passes is what cannot be computed from pods:
/// hand-written slices (Services without a selector, usually without this label at all, which
/// `!=` matches), the API server's own `default/kubernetes` slice (labelled with the service
/// name only) and slices the EndpointSliceMirroring controller copies from hand-written
/// Endpoints (`endpointslicemirroring-controller.k8s.io`).
pub(crate) const ENDPOINT_SLICE_SELECTOR: &str =
    "endpointslice.kubernetes.io/managed-by!=endpointslice-controller.k8s.io";

/// The Secrets watched: `kubernetes.io/tls` only, selected by the API server, so no other
/// Secret (service-account tokens, credentials of other applications) ever reaches the
/// process. An ingress gateway reads nothing else of Secrets.
pub(crate) const TLS_SECRET_SELECTOR: &str = "type=kubernetes.io/tls";

/// One watched kind.
#[derive(Clone, Debug)]
pub(crate) struct Kind {
    pub(crate) resource: ApiResource,
    /// A kind whose API may be absent (Istio or Gateway API CRDs not installed): a 404
    /// counts as an empty list, so a cluster without those CRDs still gets a model (without
    /// policies, without waypoints).
    pub(crate) optional: bool,
    pub(crate) body: Body,
    /// Only the objects matching this label selector are listed and watched (server side);
    /// `None`: all of them.
    pub(crate) label_selector: Option<&'static str>,
    /// Likewise a field selector (server side); `None`: all of them.
    pub(crate) field_selector: Option<&'static str>,
}

/// What a consumer of the model needs watched.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// What the node agent uses: core kinds (with the EndpointSlices of Services without a
    /// selector), PeerAuthentication, AuthorizationPolicy, Gateways, ServiceEntries.
    #[default]
    Node,
    /// Also what a waypoint applies: HTTPRoutes, GRPCRoutes, RequestAuthentications,
    /// VirtualServices, DestinationRules and Telemetries.
    Waypoint,
    /// Also what an ingress gateway (a Gateway of class `istio`) needs for its HTTPS
    /// listeners: Secrets of type `kubernetes.io/tls` (no other Secret is listed) and
    /// `gateway.networking.k8s.io/v1beta1` ReferenceGrants (optional, as every CRD kind).
    /// Only an ingress gateway's deployment may read Secrets: a waypoint keeps
    /// [`Scope::Waypoint`].
    Gateway,
}

/// The kinds `scope` needs, in the order the loader documents them.
pub(crate) fn kinds_for(scope: Scope) -> Vec<Kind> {
    use k8s_openapi::api::core::v1;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let core = |resource: ApiResource, body: Body| Kind {
        resource,
        optional: false,
        body,
        label_selector: None,
        field_selector: None,
    };
    // Both scopes balance over a Service's endpoints. Not optional: `discovery.k8s.io/v1` is
    // served by every Kubernetes since 1.21.
    let endpoint_slices = Kind {
        label_selector: Some(ENDPOINT_SLICE_SELECTOR),
        ..core(
            ApiResource::erase::<EndpointSlice>(&()),
            Body::EndpointSlice,
        )
    };
    // A CRD kind (Istio's, the Gateway API's): optional, as a cluster may not have it (then
    // no policies, no waypoints, no routes / JWT rules).
    let crd = |group: &str, version: &str, kind: &str, plural: &str| Kind {
        resource: ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, kind),
            plural,
        ),
        optional: true,
        body: Body::Spec,
        label_selector: None,
        field_selector: None,
    };
    // `security.istio.io/v1` is served by every Istio since 1.22; the loader also reads
    // v1beta1, but one version per kind keeps each object seen once.
    let istio = |kind: &str, plural: &str| crd("security.istio.io", "v1", kind, plural);
    // Waypoints are Gateways of class `istio-waypoint` (Gateway API v1, GA since 1.0); the
    // CRDs are installed separately from Kubernetes, so the kind is optional too.
    let gateway = Kind {
        body: Body::Gateway,
        ..crd("gateway.networking.k8s.io", "v1", "Gateway", "gateways")
    };
    let mut kinds = vec![
        core(ApiResource::erase::<v1::Namespace>(&()), Body::None),
        core(ApiResource::erase::<v1::ServiceAccount>(&()), Body::None),
        core(ApiResource::erase::<v1::Pod>(&()), Body::Pod),
        core(
            ApiResource::erase::<v1::Service>(&()),
            match scope {
                Scope::Gateway => Body::ServiceWithLoadBalancer,
                Scope::Node | Scope::Waypoint => Body::Spec,
            },
        ),
        endpoint_slices,
        istio("PeerAuthentication", "peerauthentications"),
        istio("AuthorizationPolicy", "authorizationpolicies"),
        gateway,
        // Destinations outside the registry (`networking.istio.io/v1`, Istio 1.22+).
        crd(
            "networking.istio.io",
            "v1",
            "ServiceEntry",
            "serviceentries",
        ),
    ];
    if matches!(scope, Scope::Waypoint | Scope::Gateway) {
        kinds.push(crd(
            "gateway.networking.k8s.io",
            "v1",
            "HTTPRoute",
            "httproutes",
        ));
        kinds.push(crd(
            "gateway.networking.k8s.io",
            "v1",
            "GRPCRoute",
            "grpcroutes",
        ));
        kinds.push(istio("RequestAuthentication", "requestauthentications"));
        kinds.push(crd(
            "networking.istio.io",
            "v1",
            "VirtualService",
            "virtualservices",
        ));
        kinds.push(crd(
            "networking.istio.io",
            "v1",
            "DestinationRule",
            "destinationrules",
        ));
        // The waypoint's access-log switch (`telemetry.istio.io/v1`, Istio 1.22+).
        kinds.push(crd("telemetry.istio.io", "v1", "Telemetry", "telemetries"));
    }
    if scope == Scope::Gateway {
        // Not optional: `v1` Secrets are served by every Kubernetes (a 403 for want of RBAC
        // is retried, and the gateway stays not ready, as for any core kind).
        kinds.push(Kind {
            field_selector: Some(TLS_SECRET_SELECTOR),
            ..core(ApiResource::erase::<v1::Secret>(&()), Body::Secret)
        });
        // `v1beta1`: served by every Gateway API release since 0.6 (`v1` only since 1.3,
        // and not by all); the loader reads both.
        kinds.push(crd(
            "gateway.networking.k8s.io",
            "v1beta1",
            "ReferenceGrant",
            "referencegrants",
        ));
    }
    kinds
}

/// Identifies an object within its kind.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ObjectKey {
    /// Empty for cluster-scoped kinds.
    pub(crate) namespace: String,
    pub(crate) name: String,
}

impl ObjectKey {
    pub(crate) fn of(obj: &DynamicObject) -> ObjectKey {
        ObjectKey {
            namespace: obj.metadata.namespace.clone().unwrap_or_default(),
            name: obj.metadata.name.clone().unwrap_or_default(),
        }
    }
}

/// `Pod default/web`, `Namespace prod`: how logs and rejections name an object.
pub(crate) fn describe(kind: &Kind, key: &ObjectKey) -> String {
    if key.namespace.is_empty() {
        format!("{} {}", kind.resource.kind, key.name)
    } else {
        format!("{} {}/{}", kind.resource.kind, key.namespace, key.name)
    }
}

/// The pseudo file name the loader's errors cite: the object's API path relative to its
/// group version, e.g. `pods/default/web`, unique across everything watched.
pub(crate) fn file_name(kind: &Kind, key: &ObjectKey) -> String {
    if key.namespace.is_empty() {
        format!("{}/{}", kind.resource.plural, key.name)
    } else {
        format!("{}/{}/{}", kind.resource.plural, key.namespace, key.name)
    }
}

/// The object as the loader reads it from a file: `apiVersion`, `kind`, `metadata` and the
/// body fields of [`Body`]. List items from the API server carry no `apiVersion`/`kind`, so
/// they come from the watched kind.
pub(crate) fn document(kind: &Kind, obj: &DynamicObject) -> Value {
    let mut doc = Map::new();
    doc.insert(
        "apiVersion".into(),
        Value::String(kind.resource.api_version.clone()),
    );
    doc.insert("kind".into(), Value::String(kind.resource.kind.clone()));
    doc.insert("metadata".into(), metadata(obj, kind.body));
    match kind.body {
        Body::None => {}
        Body::Pod => {
            for (field, value) in pod_body(&obj.data) {
                doc.insert(field.into(), value);
            }
        }
        Body::Spec => {
            if let Some(spec) = obj.data.get("spec") {
                doc.insert("spec".into(), spec.clone());
            }
        }
        Body::Secret => {
            for (field, value) in secret_body(&obj.data) {
                doc.insert(field.into(), value);
            }
        }
        Body::ServiceWithLoadBalancer => {
            if let Some(spec) = obj.data.get("spec") {
                doc.insert("spec".into(), spec.clone());
            }
            let ingress = obj
                .data
                .get("status")
                .and_then(|s| s.get("loadBalancer"))
                .and_then(|lb| lb.get("ingress"));
            if let Some(ingress) = ingress {
                let kept = each(ingress, |entry| only(entry, &["ip", "hostname"]));
                doc.insert(
                    "status".into(),
                    serde_json::json!({"loadBalancer": {"ingress": kept}}),
                );
            }
        }
        Body::Gateway => {
            let spec = obj.data.get("spec");
            if let Some(spec) = spec {
                doc.insert("spec".into(), spec.clone());
            }
            let class = spec.and_then(|s| s.get("gatewayClassName"));
            let ingress = class.and_then(Value::as_str) == Some(INGRESS_GATEWAY_CLASS);
            match obj.data.get("status") {
                Some(status) if !ingress => {
                    let kept = pick(status, &["addresses"]);
                    if !kept.is_empty() {
                        doc.insert("status".into(), Value::Object(kept));
                    }
                }
                _ => {}
            }
        }
        Body::EndpointSlice => {
            for (field, value) in endpoint_slice_body(&obj.data) {
                doc.insert(field.into(), value);
            }
        }
    }
    Value::Object(doc)
}

/// The metadata the loader reads; `resourceVersion`, `managedFields` and the like change on
/// every write and would make identical objects look different. A Secret's: name, namespace
/// and labels only; a Gateway's also its `generation`.
fn metadata(obj: &DynamicObject, body: Body) -> Value {
    let m = &obj.metadata;
    let mut out = Map::new();
    let mut put = |key: &str, value: Option<Value>| {
        if let Some(v) = value {
            out.insert(key.into(), v);
        }
    };
    put("name", m.name.clone().map(Value::String));
    put("namespace", m.namespace.clone().map(Value::String));
    let strings = |map: &std::collections::BTreeMap<String, String>| {
        let kept: Map<String, Value> = map
            .iter()
            .filter(|(k, _)| k.as_str() != LAST_APPLIED)
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        Some(Value::Object(kept)).filter(|v| v.as_object().is_some_and(|o| !o.is_empty()))
    };
    if body == Body::Secret {
        put("labels", m.labels.as_ref().and_then(strings));
        return Value::Object(out);
    }
    put("uid", m.uid.clone().map(Value::String));
    if body == Body::Gateway {
        put("generation", m.generation.map(Value::from));
    }
    put("labels", m.labels.as_ref().and_then(strings));
    put("annotations", m.annotations.as_ref().and_then(strings));
    Value::Object(out)
}

/// Pod `spec` and `status` reduced to what `mesh_model::k8s` reads: service account, node,
/// host networking, container ports, IPs, phase and the `Ready` condition's status.
/// (If the loader learns to read another Pod field, add it here.)
fn pod_body(data: &Value) -> Vec<(&'static str, Value)> {
    let mut body = Vec::new();
    if let Some(spec) = data.get("spec") {
        let mut out = pick(
            spec,
            &[
                "serviceAccountName",
                "serviceAccount",
                "nodeName",
                "hostNetwork",
            ],
        );
        if let Some(containers) = spec.get("containers") {
            // Not a list: passed on so the loader rejects it by field.
            let reduced = each(containers, |c| Value::Object(pick(c, &["name", "ports"])));
            out.insert("containers".into(), reduced);
        }
        body.push(("spec", Value::Object(out)));
    }
    if let Some(status) = data.get("status") {
        let mut out = pick(status, &["phase", "podIP", "podIPs"]);
        if let Some(conditions) = status.get("conditions") {
            let reduced = match conditions {
                // Timestamps and messages change on every probe; only type and status matter.
                Value::Array(items) => Value::Array(
                    items
                        .iter()
                        .map(|c| Value::Object(pick(c, &["type", "status"])))
                        .collect(),
                ),
                other => other.clone(),
            };
            out.insert("conditions".into(), reduced);
        }
        body.push(("status", Value::Object(out)));
    }
    body
}

/// An EndpointSlice's top-level `addressType`, `endpoints` and `ports` reduced to what
/// `mesh_model::k8s` reads: per endpoint its `addresses`, `conditions.ready` and
/// `targetRef` kind/namespace/name; per port its name, port and protocol. A field of
/// another shape than expected (`endpoints` not a list, an endpoint not an object, ...) is
/// passed on as it is, so the loader rejects it by field name. (If the loader learns to read
/// another EndpointSlice field, add it here.)
fn endpoint_slice_body(data: &Value) -> Vec<(&'static str, Value)> {
    let mut body = Vec::new();
    if let Some(address_type) = data.get("addressType") {
        body.push(("addressType", address_type.clone()));
    }
    if let Some(endpoints) = data.get("endpoints") {
        let reduced = each(endpoints, |endpoint| {
            let Value::Object(fields) = endpoint else {
                return endpoint.clone();
            };
            let mut out = pick(endpoint, &["addresses"]);
            if let Some(conditions) = fields.get("conditions") {
                out.insert("conditions".into(), only(conditions, &["ready"]));
            }
            if let Some(target) = fields.get("targetRef") {
                let kept = only(target, &["kind", "namespace", "name"]);
                out.insert("targetRef".into(), kept);
            }
            Value::Object(out)
        });
        body.push(("endpoints", reduced));
    }
    if let Some(ports) = data.get("ports") {
        let reduced = each(ports, |port| only(port, &["name", "port", "protocol"]));
        body.push(("ports", reduced));
    }
    body
}

/// A Secret's `type` and, of `data`, only `tls.crt` and `tls.key` (still base64, as the
/// API server sends them; the loader decodes and checks them). `data` of another shape than a
/// mapping is passed on as it is, for the loader to refuse by field. `stringData` is
/// write-only: the API server never sends it.
fn secret_body(data: &Value) -> Vec<(&'static str, Value)> {
    let mut body = Vec::new();
    if let Some(kind) = data.get("type") {
        body.push(("type", kind.clone()));
    }
    if let Some(fields) = data.get("data") {
        body.push(("data", only(fields, &["tls.crt", "tls.key"])));
    }
    body
}

/// `f` applied to every item of a list; anything else (also `null`) as it is.
fn each(value: &Value, f: impl Fn(&Value) -> Value) -> Value {
    match value {
        Value::Array(items) => Value::Array(items.iter().map(f).collect()),
        other => other.clone(),
    }
}

/// The listed fields of an object; anything else as it is (for the loader to reject).
fn only(value: &Value, fields: &[&str]) -> Value {
    match value {
        Value::Object(_) => Value::Object(pick(value, fields)),
        other => other.clone(),
    }
}

/// The listed fields of an object (nothing when `value` is not an object).
fn pick(value: &Value, fields: &[&str]) -> Map<String, Value> {
    fields
        .iter()
        .filter_map(|f| value.get(*f).map(|v| ((*f).to_string(), v.clone())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn object(value: Value) -> DynamicObject {
        serde_json::from_value(value).expect("dynamic object")
    }

    fn kind(name: &str) -> Kind {
        kinds_for(Scope::Node)
            .into_iter()
            .find(|k| k.resource.kind == name)
            .expect("watched kind")
    }

    fn check(kind_name: &str, input: Value, expected: Value) {
        let got = document(&kind(kind_name), &object(input));
        assert_eq!(got, expected, "{kind_name}");
    }

    #[test]
    fn list_items_get_their_type_and_lose_volatile_metadata() {
        check(
            "Namespace",
            json!({
                "metadata": {
                    "name": "prod",
                    "uid": "u1",
                    "resourceVersion": "42",
                    "managedFields": [{"manager": "kubectl"}],
                    "labels": {"istio.io/dataplane-mode": "ambient"},
                    "annotations": {LAST_APPLIED: "{...}"},
                },
                "spec": {"finalizers": ["kubernetes"]},
                "status": {"phase": "Active"},
            }),
            json!({
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {
                    "name": "prod",
                    "uid": "u1",
                    "labels": {"istio.io/dataplane-mode": "ambient"},
                },
            }),
        );
    }

    #[test]
    fn pods_keep_only_what_the_loader_reads() {
        check(
            "Pod",
            json!({
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {
                    "serviceAccountName": "web",
                    "nodeName": "n1",
                    "volumes": [{"name": "token"}],
                    "containers": [{
                        "name": "app",
                        "image": "echo",
                        "env": [{"name": "A", "value": "1"}],
                        "ports": [{"containerPort": 8080, "name": "http"}],
                    }],
                },
                "status": {
                    "phase": "Running",
                    "podIP": "10.0.0.5",
                    "podIPs": [{"ip": "10.0.0.5"}],
                    "conditions": [{"type": "Ready", "status": "True",
                                    "lastTransitionTime": "2025-01-01T00:00:00Z"}],
                    "containerStatuses": [{"restartCount": 3}],
                },
            }),
            json!({
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "web", "namespace": "default"},
                "spec": {
                    "serviceAccountName": "web",
                    "nodeName": "n1",
                    "containers": [{"name": "app",
                                    "ports": [{"containerPort": 8080, "name": "http"}]}],
                },
                "status": {
                    "phase": "Running",
                    "podIP": "10.0.0.5",
                    "podIPs": [{"ip": "10.0.0.5"}],
                    "conditions": [{"type": "Ready", "status": "True"}],
                },
            }),
        );
    }

    #[test]
    fn policy_specs_pass_verbatim_so_the_loader_can_refuse_unknown_fields() {
        check(
            "AuthorizationPolicy",
            json!({
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "deny", "namespace": "prod", "generation": 3},
                "spec": {"action": "DENY", "rulez": []},
                "status": {"conditions": []},
            }),
            json!({
                "apiVersion": "security.istio.io/v1",
                "kind": "AuthorizationPolicy",
                "metadata": {"name": "deny", "namespace": "prod"},
                "spec": {"action": "DENY", "rulez": []},
            }),
        );
    }

    /// The generation stays (an ingress gateway's `observedGeneration`), the rest of the
    /// volatile metadata and every status condition go: a status written back changes nothing.
    #[test]
    fn gateways_keep_their_spec_and_only_the_addresses_of_their_status() {
        let spec = json!({
            "gatewayClassName": "istio-waypoint",
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
        });
        check(
            "Gateway",
            json!({
                "metadata": {"name": "waypoint", "namespace": "demo", "generation": 4,
                             "resourceVersion": "77",
                             "labels": {"istio.io/waypoint-for": "service"}},
                "spec": spec,
                "status": {
                    "addresses": [{"type": "IPAddress", "value": "10.96.0.99"}],
                    "conditions": [{"type": "Programmed", "status": "True",
                                    "lastTransitionTime": "2025-01-01T00:00:00Z"}],
                },
            }),
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "waypoint", "namespace": "demo", "generation": 4,
                             "labels": {"istio.io/waypoint-for": "service"}},
                "spec": spec,
                "status": {"addresses": [{"type": "IPAddress", "value": "10.96.0.99"}]},
            }),
        );
        // No addresses yet (nothing assigned one): no status at all.
        check(
            "Gateway",
            json!({
                "metadata": {"name": "waypoint", "namespace": "demo"},
                "spec": spec,
                "status": {"conditions": []},
            }),
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "waypoint", "namespace": "demo"},
                "spec": spec,
            }),
        );
        assert!(
            kind("Gateway").optional,
            "clusters without the Gateway API CRDs"
        );
        // An ingress Gateway's addresses are the ones its own proxy writes: not read back.
        let ingress = json!({"gatewayClassName": "istio",
                             "listeners": [{"name": "http", "port": 80, "protocol": "HTTP"}]});
        check(
            "Gateway",
            json!({
                "metadata": {"name": "web", "namespace": "shop", "generation": 2},
                "spec": ingress,
                "status": {"addresses": [{"type": "IPAddress", "value": "203.0.113.7"}]},
            }),
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": "web", "namespace": "shop", "generation": 2},
                "spec": ingress,
            }),
        );
    }

    /// An ingress gateway reads the addresses of its LoadBalancer Service's status (and
    /// nothing else of it); the agent and waypoints read no Service status at all.
    #[test]
    fn only_an_ingress_gateway_reads_a_services_load_balancer() {
        let spec = json!({"type": "LoadBalancer", "clusterIP": "10.96.0.30",
                          "ports": [{"port": 80}]});
        let service = object(json!({
            "metadata": {"name": "web-istio", "namespace": "shop"},
            "spec": spec,
            "status": {"loadBalancer": {"ingress": [
                {"ip": "203.0.113.7", "ipMode": "VIP", "ports": [{"port": 80, "protocol": "TCP"}]},
                {"hostname": "lb.example.com"},
            ]}, "conditions": [{"type": "LoadBalancerReady"}]},
        }));
        let in_scope = |scope| {
            kinds_for(scope)
                .into_iter()
                .find(|k| k.resource.kind == "Service")
                .expect("Services watched")
        };
        let base = json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web-istio", "namespace": "shop"},
            "spec": spec,
        });
        let mut with_lb = base.clone();
        with_lb["status"] = json!({"loadBalancer": {"ingress": [
            {"ip": "203.0.113.7"}, {"hostname": "lb.example.com"},
        ]}});
        assert_eq!(document(&in_scope(Scope::Gateway), &service), with_lb);
        for scope in [Scope::Node, Scope::Waypoint] {
            assert_eq!(document(&in_scope(scope), &service), base, "{scope:?}");
        }
        // Not yet assigned: no status.
        let pending = object(json!({
            "metadata": {"name": "web-istio", "namespace": "shop"},
            "spec": spec,
            "status": {"loadBalancer": {}},
        }));
        assert_eq!(document(&in_scope(Scope::Gateway), &pending), base);
    }

    /// A slice as the API server sends it: every field the loader does not read is dropped,
    /// of the endpoints only addresses, readiness and the target's kind/namespace/name stay.
    #[test]
    fn endpoint_slices_keep_only_what_the_loader_reads() {
        check(
            "EndpointSlice",
            json!({
                "metadata": {
                    "name": "db-manual",
                    "namespace": "shop",
                    "resourceVersion": "7",
                    "generation": 2,
                    "labels": {"kubernetes.io/service-name": "db"},
                    "ownerReferences": [{"kind": "Service", "name": "db", "uid": "s1"}],
                },
                "addressType": "IPv4",
                "endpoints": [
                    {
                        "addresses": ["10.0.3.4"],
                        "conditions": {"ready": true, "serving": true, "terminating": false},
                        "hostname": "db-0",
                        "nodeName": "n1",
                        "zone": "eu-west-1a",
                        "hints": {"forZones": [{"name": "eu-west-1a"}]},
                        "deprecatedTopology": {"kubernetes.io/hostname": "n1"},
                        "targetRef": {
                            "kind": "Pod",
                            "namespace": "shop",
                            "name": "db-0",
                            "uid": "p1",
                            "resourceVersion": "99",
                        },
                    },
                    {
                        "addresses": ["10.0.3.5"],
                        "conditions": {"serving": true, "terminating": true},
                    },
                ],
                "ports": [
                    {"name": "sql", "port": 5432, "protocol": "TCP", "appProtocol": "postgresql"},
                ],
            }),
            json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": "db-manual",
                    "namespace": "shop",
                    "labels": {"kubernetes.io/service-name": "db"},
                },
                "addressType": "IPv4",
                "endpoints": [
                    {
                        "addresses": ["10.0.3.4"],
                        "conditions": {"ready": true},
                        "targetRef": {"kind": "Pod", "namespace": "shop", "name": "db-0"},
                    },
                    {"addresses": ["10.0.3.5"], "conditions": {}},
                ],
                "ports": [{"name": "sql", "port": 5432, "protocol": "TCP"}],
            }),
        );
    }

    /// Fields of the wrong shape reach the loader as they are, to be refused by name.
    #[test]
    fn malformed_endpoint_slice_fields_pass_through_unchanged() {
        let unchanged = |body: Value| {
            let mut expected = json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
            });
            if let (Some(e), Some(b)) = (expected.as_object_mut(), body.as_object()) {
                e.extend(b.clone());
            }
            check("EndpointSlice", body, expected);
        };
        unchanged(json!({
            "metadata": {"name": "bad", "namespace": "shop"},
            "addressType": "IPv4",
            "endpoints": "10.0.3.4",
            "ports": {"name": "sql", "port": 5432},
        }));
        unchanged(json!({
            "metadata": {"name": "bad", "namespace": "shop"},
            "addressType": "IPv4",
            "endpoints": [
                "10.0.3.4",
                {"addresses": "10.0.3.5", "conditions": "ready", "targetRef": "db-0"},
            ],
            "ports": [8080],
        }));
        // A slice without endpoints comes as `null` from the API server (Go's nil slice).
        unchanged(json!({
            "metadata": {"name": "empty", "namespace": "shop"},
            "addressType": "IPv6",
            "endpoints": null,
            "ports": null,
        }));
    }

    /// Both scopes watch EndpointSlices, right after Services, as a core (not optional) kind
    /// and only those the EndpointSlice controller does not derive from a Service selector.
    #[test]
    fn every_scope_watches_endpoint_slices_not_managed_by_the_controller() {
        for scope in [Scope::Node, Scope::Waypoint, Scope::Gateway] {
            let kinds = kinds_for(scope);
            let at = kinds
                .iter()
                .position(|k| k.resource.kind == "EndpointSlice")
                .expect("EndpointSlices watched");
            assert_eq!(kinds[at - 1].resource.kind, "Service", "{scope:?}");
            let slices = &kinds[at];
            assert_eq!(slices.resource.api_version, "discovery.k8s.io/v1");
            assert_eq!(slices.resource.group, "discovery.k8s.io");
            assert_eq!(slices.resource.plural, "endpointslices");
            assert!(!slices.optional, "core since Kubernetes 1.21");
            assert_eq!(slices.body, Body::EndpointSlice);
            assert_eq!(
                slices.label_selector,
                Some("endpointslice.kubernetes.io/managed-by!=endpointslice-controller.k8s.io")
            );
            let others: Vec<&str> = kinds
                .iter()
                .filter(|k| k.label_selector.is_some())
                .map(|k| k.resource.kind.as_str())
                .collect();
            assert_eq!(
                others,
                ["EndpointSlice"],
                "{scope:?}: every other kind is whole"
            );
        }
    }

    #[test]
    fn objects_are_named_by_kind_and_api_path() {
        let key = ObjectKey {
            namespace: "default".into(),
            name: "web".into(),
        };
        assert_eq!(describe(&kind("Pod"), &key), "Pod default/web");
        assert_eq!(file_name(&kind("Pod"), &key), "pods/default/web");
        let ns = ObjectKey {
            namespace: String::new(),
            name: "prod".into(),
        };
        assert_eq!(describe(&kind("Namespace"), &ns), "Namespace prod");
        assert_eq!(file_name(&kind("Namespace"), &ns), "namespaces/prod");
    }

    /// Telemetries (the waypoint's access-log switch) are a waypoint's, optional, and reach
    /// the loader with their spec verbatim.
    #[test]
    fn a_waypoint_watches_telemetries_and_an_agent_does_not() {
        let find = |scope| {
            kinds_for(scope)
                .into_iter()
                .find(|k| k.resource.kind == "Telemetry")
        };
        assert!(find(Scope::Node).is_none());
        let t = find(Scope::Waypoint).expect("a waypoint watches Telemetries");
        assert_eq!(t.resource.api_version, "telemetry.istio.io/v1");
        assert_eq!(t.resource.plural, "telemetries");
        assert!(t.optional, "clusters without Istio's CRDs");
        let spec =
            json!({"accessLogging": [{"providers": [{"name": "envoy"}], "disabled": false}]});
        let doc = document(
            &t,
            &object(json!({
                "metadata": {"name": "logs", "namespace": "shop", "resourceVersion": "3"},
                "spec": spec,
                "status": {"observedGeneration": 1},
            })),
        );
        assert_eq!(
            doc,
            json!({
                "apiVersion": "telemetry.istio.io/v1",
                "kind": "Telemetry",
                "metadata": {"name": "logs", "namespace": "shop"},
                "spec": spec,
            })
        );
    }

    fn kind_in(scope: Scope, name: &str) -> Option<Kind> {
        kinds_for(scope)
            .into_iter()
            .find(|k| k.resource.kind == name)
    }

    /// Only the gateway scope reads Secrets and ReferenceGrants, after everything a
    /// waypoint reads; Secrets only of type `kubernetes.io/tls`, selected by the API server.
    #[test]
    fn only_the_gateway_scope_reads_tls_secrets_and_reference_grants() {
        for scope in [Scope::Node, Scope::Waypoint] {
            assert!(kind_in(scope, "Secret").is_none(), "{scope:?}");
            assert!(kind_in(scope, "ReferenceGrant").is_none(), "{scope:?}");
        }
        let waypoint: Vec<String> = kinds_for(Scope::Waypoint)
            .into_iter()
            .map(|k| k.resource.kind)
            .collect();
        let gateway: Vec<String> = kinds_for(Scope::Gateway)
            .into_iter()
            .map(|k| k.resource.kind)
            .collect();
        assert_eq!(gateway[..waypoint.len()], waypoint[..]);
        assert_eq!(gateway[waypoint.len()..], ["Secret", "ReferenceGrant"]);

        let secrets = kind_in(Scope::Gateway, "Secret").expect("secrets");
        assert_eq!(secrets.resource.api_version, "v1");
        assert_eq!(secrets.resource.plural, "secrets");
        assert!(!secrets.optional);
        assert_eq!(secrets.body, Body::Secret);
        assert_eq!(secrets.label_selector, None);
        assert_eq!(
            secrets.field_selector.map(str::to_string),
            Some(format!("type={}", mesh_model::model::TLS_SECRET_TYPE))
        );
        let others: Vec<String> = kinds_for(Scope::Gateway)
            .into_iter()
            .filter(|k| k.field_selector.is_some())
            .map(|k| k.resource.kind)
            .collect();
        assert_eq!(others, ["Secret"]);

        let grants = kind_in(Scope::Gateway, "ReferenceGrant").expect("grants");
        assert_eq!(
            grants.resource.api_version,
            "gateway.networking.k8s.io/v1beta1"
        );
        assert_eq!(grants.resource.plural, "referencegrants");
        assert!(grants.optional, "clusters without the Gateway API CRDs");
        assert_eq!(grants.body, Body::Spec);
    }

    /// A TLS Secret as the API server sends it: of the metadata only name, namespace and
    /// labels, its type, and only the two keys the translator reads.
    #[test]
    fn tls_secrets_keep_only_their_type_labels_and_the_two_pem_keys() {
        let secrets = kind_in(Scope::Gateway, "Secret").expect("secrets");
        let doc = document(
            &secrets,
            &object(json!({
                "metadata": {
                    "name": "cert", "namespace": "shop", "uid": "u1",
                    "resourceVersion": "9", "creationTimestamp": "2025-01-01T00:00:00Z",
                    "labels": {"app": "web"},
                    "annotations": {LAST_APPLIED: "{\"data\": {\"tls.key\": \"...\"}}",
                                    "cert-manager.io/issuer-name": "letsencrypt"},
                    "managedFields": [{"manager": "cert-manager"}],
                },
                "type": "kubernetes.io/tls",
                "immutable": false,
                "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5", "ca.crt": "Y2E="},
            })),
        );
        assert_eq!(
            doc,
            json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": "cert", "namespace": "shop", "labels": {"app": "web"}},
                "type": "kubernetes.io/tls",
                "data": {"tls.crt": "Y2VydA==", "tls.key": "a2V5"},
            })
        );
        // `data` of another shape reaches the loader as it is, to be refused by field.
        let odd = document(
            &secrets,
            &object(json!({
                "metadata": {"name": "odd", "namespace": "shop"},
                "type": "kubernetes.io/tls",
                "data": "not a mapping",
            })),
        );
        assert_eq!(odd["data"], "not a mapping");
    }
}
