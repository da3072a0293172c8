//! `cargo xtask gateway render|apply|delete`: the user CLI for ingress gateways.
//!
//! Istio users `kubectl apply` a `Gateway` of class `istio` and Istio deploys what runs it.
//! Here nothing watches Gateways, so this renders what Istio would deploy: for each Gateway of
//! class `istio` in a file, the objects of `manifests/ingress-gateway.yaml` renamed for it
//! (`<gateway>-istio`), its listener ports on the Deployment and the LoadBalancer Service, its
//! `infrastructure` labels and annotations on the pods and the Service ([`render`]).
//!
//! - `render -f FILE [-n NS]`: prints them (the Gateways themselves are not printed).
//! - `apply -f FILE [-n NS] --kubectl [--print]`: `kubectl apply -f -` of each Gateway (its
//!   namespace written in) and its objects; `--print` only prints the YAML and the command.
//! - `delete [-n NS] --name NAME --kubectl [--print]`: `kubectl delete` of the Gateway and
//!   of its objects, by name.
//!
//! A Gateway is read at the edge ([`read`]) through the agents' own translator
//! (`mesh_model::k8s::load_docs`: the listeners checked as the ingress gateway will read
//! them), then into an [`IngressGateway`]; other documents and Gateways of other classes are
//! left out with a note on stderr. Only [`run`] reads files and runs anything.

pub mod render;

use std::collections::BTreeMap;
use std::io::Read as _;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use mesh_model::k8s::{ConfigError, DEFAULT_NAMESPACE};
use mesh_model::model::INGRESS_GATEWAY_CLASS;
use serde_yaml::Value;

use crate::cluster::{kind, kubectl, mapping_mut, numbered_documents};
use render::{Infrastructure, IngressGateway, ListenerPort, PROXY_PORTS};

/// Gateway API's bound on `spec.infrastructure.labels` and `.annotations` (`maxProperties`).
const MAX_INFRASTRUCTURE_ENTRIES: usize = 8;
/// Longest `spec.infrastructure.annotations` value (Gateway API's `maxLength`).
const MAX_ANNOTATION_VALUE: usize = 4096;
/// Longest label value and name part of a label or annotation key.
const MAX_LABEL: usize = 63;
/// Longest DNS subdomain (a key's prefix).
const MAX_SUBDOMAIN: usize = 253;
/// The group of the Gateway API's kinds.
const GATEWAY_API_VERSION_PREFIX: &str = "gateway.networking.k8s.io/";

#[derive(Subcommand, Debug)]
pub enum GatewayCmd {
    /// Print the objects that run each Gateway of class istio in a file (ServiceAccount,
    /// RBAC, Deployment, LoadBalancer Service), renamed from manifests/ingress-gateway.yaml.
    Render(RenderArgs),
    /// Apply each Gateway of class istio in a file and the objects that run it.
    Apply(ApplyArgs),
    /// Delete a Gateway and the objects that run it.
    Delete(DeleteArgs),
}

/// The file with the Gateways, and the namespace of those that name none.
#[derive(Args, Debug)]
pub struct Input {
    /// YAML file holding the Gateway(s), `-` for stdin; documents that are not Gateways of
    /// class istio are left out.
    #[arg(
        short = 'f',
        long = "filename",
        visible_alias = "file",
        value_name = "FILE"
    )]
    pub file: PathBuf,
    /// Namespace of the Gateways that name none [default: default]; one naming another is
    /// refused, as `kubectl apply -n` refuses it.
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
}

/// Cluster mode, the only one: through `kubectl` (current context).
#[derive(Args, Debug)]
pub struct Cluster {
    /// Apply with `kubectl` (current context).
    #[arg(long, required = true)]
    pub kubectl: bool,
    /// Print the YAML and the kubectl commands, run nothing.
    #[arg(long)]
    pub print: bool,
}

#[derive(Args, Debug)]
pub struct RenderArgs {
    #[command(flatten)]
    pub input: Input,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    #[command(flatten)]
    pub input: Input,
    #[command(flatten)]
    pub mode: Cluster,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    /// Namespace of the Gateway.
    #[arg(short = 'n', long, default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Name of the Gateway.
    #[arg(long)]
    pub name: String,
    #[command(flatten)]
    pub mode: Cluster,
}

/// Gateways that use what `gateway render` does beyond the template's own Gateway: several
/// listeners on one port, listener names that are no port names (one the proxy's own port's),
/// addresses, `infrastructure`, no namespace. `cargo xtask manifests` validates what it renders.
pub const EXAMPLE: &str = "\
# Rendered and validated by `cargo xtask manifests` (xtask/src/gateway_cli/mod.rs).
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: public
  namespace: shop
spec:
  gatewayClassName: istio
  addresses:
    - value: 203.0.113.10
  infrastructure:
    labels: {team: shop, cost-center: \"42\"}
    annotations: {service.beta.kubernetes.io/aws-load-balancer-type: nlb}
  listeners:
    - {name: http, port: 80, protocol: HTTP}
    - name: api.example.com-https
      hostname: api.example.com
      port: 443
      protocol: HTTPS
      tls: {mode: Terminate, certificateRefs: [{name: api-cert}]}
    - name: www.example.com-https
      hostname: www.example.com
      port: 443
      protocol: HTTPS
      tls: {mode: Terminate, certificateRefs: [{name: www-cert}]}
    - {name: metrics, port: 9090, protocol: HTTP}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: internal}
spec:
  gatewayClassName: istio
  listeners:
    - {name: \"8080\", port: 8080, protocol: HTTP}
";
/// The file [`write_example`] writes.
const EXAMPLE_FILE: &str = "ingress-gateway-example.yaml";

/// What a file holds: its ingress gateways, and what was left out or ignored, and why.
#[derive(Debug, Default)]
pub struct Gateways {
    pub gateways: Vec<IngressGateway>,
    pub notes: Vec<String>,
}

// === commands ===

/// Runs a gateway command.
pub fn run(cmd: GatewayCmd) -> Result<()> {
    match cmd {
        GatewayCmd::Render(a) => {
            let mut out = String::new();
            for gw in read_input(&a.input)? {
                out.push_str(&render::objects_text(&gw)?);
            }
            print!("{out}");
            Ok(())
        }
        GatewayCmd::Apply(a) => {
            let gateways = read_input(&a.input)?;
            kubectl(&[render::kubectl_apply(&gateways)?], a.mode.print)
        }
        GatewayCmd::Delete(d) => kubectl(
            &render::kubectl_delete(&d.namespace, &d.name)?,
            d.mode.print,
        ),
    }
}

/// The ingress gateways of the input file; the notes go to stderr. None is an error.
fn read_input(input: &Input) -> Result<Vec<IngressGateway>> {
    let (name, text) = if input.file.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .context("read stdin")?;
        ("stdin".to_owned(), text)
    } else {
        let name = input.file.display().to_string();
        let text = std::fs::read_to_string(&input.file).with_context(|| format!("read {name}"))?;
        (name, text)
    };
    let read = read(&name, &text, input.namespace.as_deref())?;
    for note in &read.notes {
        eprintln!("note: {note}");
    }
    if read.gateways.is_empty() {
        bail!("{name}: no Gateway of class {INGRESS_GATEWAY_CLASS}");
    }
    Ok(read.gateways)
}

/// Writes what `gateway render` makes of [`EXAMPLE`] into `dir`, for `cargo xtask manifests`
/// to validate; returns the file's path.
pub fn write_example(dir: &std::path::Path) -> Result<PathBuf> {
    let mut out = String::new();
    for gw in read("EXAMPLE", EXAMPLE, None)?.gateways {
        out.push_str(&render::objects_text(&gw)?);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join(EXAMPLE_FILE);
    std::fs::write(&path, out).with_context(|| format!("write {}", path.display()))?;
    Ok(path)
}

// === reading (pure) ===

/// The Gateways of class `istio` in `text` (file `file`), each checked; `namespace` is that
/// of the Gateways that name none (else `default`). An invalid one is an error naming its
/// document.
pub fn read(file: &str, text: &str, namespace: Option<&str>) -> Result<Gateways> {
    if let Some(ns) = namespace {
        crate::cluster::check_name(ns).with_context(|| format!("--namespace {ns:?}"))?;
    }
    let mut out = Gateways::default();
    for (doc, value) in numbered_documents(text, file)? {
        let at = format!("{file} doc {doc}");
        let name = value["metadata"]["name"].as_str().unwrap_or("(no name)");
        let is_gateway = kind(&value) == "Gateway"
            && value["apiVersion"]
                .as_str()
                .is_some_and(|v| v.starts_with(GATEWAY_API_VERSION_PREFIX));
        if !is_gateway {
            let kind = Some(kind(&value))
                .filter(|k| !k.is_empty())
                .unwrap_or("object");
            out.notes
                .push(format!("{at}: {kind} {name} is not a Gateway: left out"));
            continue;
        }
        let class = value["spec"]["gatewayClassName"].as_str().unwrap_or("");
        if class != INGRESS_GATEWAY_CLASS {
            out.notes.push(format!(
                "{at}: Gateway {name} is of class {class:?}, not {INGRESS_GATEWAY_CLASS:?}: left \
                 out (waypoints: `cargo xtask waypoint`)"
            ));
            continue;
        }
        let gw = ingress_gateway(file, &value, namespace)
            .with_context(|| format!("{at}: Gateway {name}"))?;
        if out.gateways.iter().any(|g| g.key() == gw.key()) {
            bail!("{at}: Gateway {} is in {file} twice", gw.key());
        }
        let spec = &value["spec"];
        if spec["addresses"]
            .as_sequence()
            .is_some_and(|a| !a.is_empty())
        {
            out.notes.push(format!(
                "{at}: Gateway {}: spec.addresses ignored: the LoadBalancer Service {} gets \
                 its address from the cluster",
                gw.key(),
                gw.objects_name()
            ));
        }
        if !spec["infrastructure"]["parametersRef"].is_null() {
            out.notes.push(format!(
                "{at}: Gateway {}: spec.infrastructure.parametersRef ignored",
                gw.key()
            ));
        }
        out.gateways.push(gw);
    }
    Ok(out)
}

/// One Gateway of class `istio`: through the agents' translator (which checks its
/// listeners), then the names and ports the objects that run it need.
fn ingress_gateway(file: &str, value: &Value, namespace: Option<&str>) -> Result<IngressGateway> {
    let written = value["metadata"]["namespace"].as_str();
    if let (Some(written), Some(asked)) = (written, namespace) {
        if written != asked {
            bail!("metadata.namespace {written:?} is not --namespace {asked:?}");
        }
    }
    let ns = written.or(namespace).unwrap_or(DEFAULT_NAMESPACE);
    let mut object = value.clone();
    mapping_mut(&mut object, &["metadata"], "the Gateway")?.insert("namespace".into(), ns.into());

    let text = serde_yaml::to_string(&object).context("render the Gateway")?;
    let model = mesh_model::k8s::load_docs(&[(file.to_owned(), text)]).map_err(|e| match e {
        ConfigError::Invalid { field, reason, .. } if field.is_empty() => anyhow!("{reason}"),
        ConfigError::Invalid { field, reason, .. } => anyhow!("{field}: {reason}"),
        other => anyhow!("{other}"),
    })?;
    let translated = model
        .gateways
        .values()
        .next()
        .context("the agents' translator read no Gateway from it")?;

    let mut gw = IngressGateway::named(&translated.namespace, &translated.name)?;
    for (i, l) in translated.listeners.iter().enumerate() {
        if let Some((_, what)) = PROXY_PORTS.iter().find(|(p, _)| *p == l.port) {
            bail!(
                "spec.listeners[{i}].port: {} is the proxy's own {what} port",
                l.port
            );
        }
        if !gw.ports.iter().any(|p| p.port == l.port) {
            gw.ports.push(ListenerPort {
                listener: l.name.clone(),
                port: l.port,
            });
        }
    }
    gw.infrastructure = infrastructure(&value["spec"]["infrastructure"])?;
    gw.object = object;
    Ok(gw)
}

/// `spec.infrastructure`'s labels and annotations, checked as the Gateway API's schema checks
/// them (and as Kubernetes will check them on the objects).
fn infrastructure(infra: &Value) -> Result<Infrastructure> {
    Ok(Infrastructure {
        labels: string_map(infra, "labels", true)?,
        annotations: string_map(infra, "annotations", false)?,
    })
}

fn string_map(infra: &Value, field: &str, labels: bool) -> Result<BTreeMap<String, String>> {
    let at = format!("spec.infrastructure.{field}");
    let mut out = BTreeMap::new();
    let value = &infra[field];
    if value.is_null() {
        return Ok(out);
    }
    let map = value
        .as_mapping()
        .with_context(|| format!("{at}: expected a mapping"))?;
    if map.len() > MAX_INFRASTRUCTURE_ENTRIES {
        bail!("{at}: at most {MAX_INFRASTRUCTURE_ENTRIES} entries");
    }
    for (k, v) in map {
        let key = k
            .as_str()
            .with_context(|| format!("{at}: expected string keys, found {k:?}"))?;
        if !is_qualified_key(key) {
            bail!("{at}: invalid key {key:?} (expected [prefix/]name, name at most {MAX_LABEL} characters)");
        }
        let value = v
            .as_str()
            .with_context(|| format!("{at}.{key}: expected a string (quote it)"))?;
        if labels && !is_label_value(value) {
            bail!(
                "{at}.{key}: invalid label value {value:?} (at most {MAX_LABEL} of a-z, A-Z, \
                 0-9, '-', '_', '.', starting and ending alphanumeric)"
            );
        }
        if value.len() > MAX_ANNOTATION_VALUE {
            bail!("{at}.{key}: longer than {MAX_ANNOTATION_VALUE} characters");
        }
        out.insert(key.to_owned(), value.to_owned());
    }
    Ok(out)
}

/// A label or annotation key: `[prefix/]name`, the prefix a DNS subdomain, the name 1-63 of
/// alphanumerics, `-`, `_`, `.`, starting and ending alphanumeric.
fn is_qualified_key(key: &str) -> bool {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    let subdomain = |p: &str| {
        p.len() <= MAX_SUBDOMAIN && p.split('.').all(|l| crate::cluster::check_name(l).is_ok())
    };
    !name.is_empty() && is_label_value(name) && prefix.is_none_or(subdomain)
}

/// A label value: empty, or up to 63 alphanumerics, `-`, `_`, `.`, starting and ending
/// alphanumeric.
fn is_label_value(value: &str) -> bool {
    let b = value.as_bytes();
    b.len() <= MAX_LABEL
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_none_or(u8::is_ascii_alphanumeric)
        && b.last().is_none_or(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Gateway of class istio with these metadata and listeners (YAML flow mappings).
    fn gateway(metadata: &str, listeners: &[&str]) -> String {
        let listeners: String = listeners.iter().map(|l| format!("  - {l}\n")).collect();
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata: {metadata}\n\
             spec:\n  gatewayClassName: istio\n  listeners:\n{listeners}"
        )
    }

    const HTTP: &str = "{name: http, port: 80, protocol: HTTP}";

    fn check_refused(text: &str, namespace: Option<&str>, expected: &str) {
        let err = read("gw.yaml", text, namespace).expect_err("refused");
        assert_eq!(format!("{err:#}"), expected, "{text}");
    }

    #[test]
    fn only_gateways_of_class_istio_are_read_the_rest_is_noted() {
        let text = format!(
            "# routes and gateways\n{}---\n{}---\n{}---\n---\n{}",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n",
            gateway(
                "{name: wp}",
                &["{name: mesh, port: 15008, protocol: HBONE}"]
            )
            .replace("istio\n", "istio-waypoint\n"),
            gateway("{name: web, namespace: shop}", &[HTTP]),
            gateway(
                "{name: api}",
                &[HTTP, "{name: alt, port: 8080, protocol: HTTP}"]
            ),
        );
        let read = read("gw.yaml", &text, Some("shop")).expect("read");
        let keys: Vec<String> = read.gateways.iter().map(IngressGateway::key).collect();
        assert_eq!(keys, ["shop/web", "shop/api"], "-n for the one naming none");
        assert_eq!(
            read.notes,
            [
                "gw.yaml doc 1: HTTPRoute r is not a Gateway: left out",
                "gw.yaml doc 2: Gateway wp is of class \"istio-waypoint\", not \"istio\": left \
                 out (waypoints: `cargo xtask waypoint`)",
            ]
        );
        let api = &read.gateways[1];
        assert_eq!(
            api.ports,
            [
                ListenerPort {
                    listener: "http".into(),
                    port: 80
                },
                ListenerPort {
                    listener: "alt".into(),
                    port: 8080
                }
            ]
        );
        // Applied with the namespace it was rendered for.
        assert_eq!(api.object["metadata"]["namespace"], "shop");
        assert_eq!(
            api.object["spec"],
            serde_yaml::from_str::<Value>(&gateway(
                "{name: api}",
                &[HTTP, "{name: alt, port: 8080, protocol: HTTP}"]
            ))
            .expect("yaml")["spec"]
        );

        let default = super::read("gw.yaml", &gateway("{name: api}", &[HTTP]), None).expect("read");
        assert_eq!(default.gateways[0].key(), "default/api");
    }

    #[test]
    fn addresses_are_noted_and_infrastructure_is_read() {
        let text = gateway("{name: web, namespace: shop}", &[HTTP]).replace(
            "  listeners:\n",
            "  addresses: [{value: 192.0.2.1}]\n  infrastructure:\n    labels: {team: shop, \
             example.com/tier: \"1\"}\n    annotations: {example.com/note: \"any text: ok\"}\n    \
             parametersRef: {group: \"\", kind: ConfigMap, name: c}\n  listeners:\n",
        );
        let read = read("gw.yaml", &text, None).expect("read");
        assert_eq!(
            read.notes,
            [
                "gw.yaml doc 1: Gateway shop/web: spec.addresses ignored: the LoadBalancer \
                 Service web-istio gets its address from the cluster",
                "gw.yaml doc 1: Gateway shop/web: spec.infrastructure.parametersRef ignored",
            ]
        );
        let infra = &read.gateways[0].infrastructure;
        let entries = |m: &BTreeMap<String, String>| {
            m.iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
        };
        assert_eq!(entries(&infra.labels), ["example.com/tier=1", "team=shop"]);
        assert_eq!(
            entries(&infra.annotations),
            ["example.com/note=any text: ok"]
        );
    }

    #[test]
    fn invalid_gateways_are_refused_naming_the_document() {
        let second = |gw: String| format!("{}---\n{gw}", gateway("{name: ok}", &[HTTP]));
        check_refused(
            &second(gateway("{name: web}", &[]).replace("  listeners:\n", "  listeners: []\n")),
            None,
            "gw.yaml doc 2: Gateway web: spec.listeners: at least one listener is required",
        );
        check_refused(
            &gateway(
                "{name: web}",
                &["{name: http, port: 70000, protocol: HTTP}"],
            ),
            None,
            "gw.yaml doc 1: Gateway web: spec.listeners[0].port: port 70000 out of range 1-65535",
        );
        check_refused(
            &gateway(
                "{name: web}",
                &[HTTP, "{name: ready, port: 15021, protocol: HTTP}"],
            ),
            None,
            "gw.yaml doc 1: Gateway web: spec.listeners[1].port: 15021 is the proxy's own \
             readiness port",
        );
        check_refused(
            &gateway("{name: web.shop}", &[HTTP]),
            None,
            "gw.yaml doc 1: Gateway web.shop: Gateway name \"web.shop\": may only contain \
             lower-case letters, digits and '-'",
        );
        check_refused(
            &gateway("{name: 1web}", &[HTTP]),
            None,
            "gw.yaml doc 1: Gateway 1web: Gateway name \"1web\": must start with a letter \
             (its Service \"1web-istio\" is a DNS-1035 label)",
        );
        let long = "w".repeat(58);
        check_refused(
            &gateway(&format!("{{name: {long}}}"), &[HTTP]),
            None,
            &format!(
                "gw.yaml doc 1: Gateway {long}: Gateway name \"{long}\": the objects that run \
                 it are named \"{long}-istio\", longer than 63 characters"
            ),
        );
        check_refused(
            &gateway("{name: web, namespace: shop}", &[HTTP]),
            Some("prod"),
            "gw.yaml doc 1: Gateway web: metadata.namespace \"shop\" is not --namespace \"prod\"",
        );
        check_refused(
            &gateway("{name: web}", &[HTTP]),
            Some("Prod"),
            "--namespace \"Prod\": may only contain lower-case letters, digits and '-'",
        );
        check_refused(
            &second(gateway("{name: ok, namespace: default}", &[HTTP])),
            None,
            "gw.yaml doc 2: Gateway default/ok is in gw.yaml twice",
        );
        let infra = |yaml: &str| {
            gateway("{name: web}", &[HTTP]).replace(
                "  listeners:\n",
                &format!("  infrastructure: {yaml}\n  listeners:\n"),
            )
        };
        check_refused(
            &infra("{labels: {team: [a]}}"),
            None,
            "gw.yaml doc 1: Gateway web: spec.infrastructure.labels.team: expected a string \
             (quote it)",
        );
        check_refused(
            &infra("{labels: {team: \"a b\"}}"),
            None,
            "gw.yaml doc 1: Gateway web: spec.infrastructure.labels.team: invalid label value \
             \"a b\" (at most 63 of a-z, A-Z, 0-9, '-', '_', '.', starting and ending \
             alphanumeric)",
        );
        check_refused(
            &infra("{annotations: {\"Example.com/x\": y}}"),
            None,
            "gw.yaml doc 1: Gateway web: spec.infrastructure.annotations: invalid key \
             \"Example.com/x\" (expected [prefix/]name, name at most 63 characters)",
        );
        let many: Vec<String> = (0..9).map(|i| format!("k{i}: v")).collect();
        check_refused(
            &infra(&format!("{{labels: {{{}}}}}", many.join(", "))),
            None,
            "gw.yaml doc 1: Gateway web: spec.infrastructure.labels: at most 8 entries",
        );
        let err = read("gw.yaml", "kind: [\n", None).expect_err("not yaml");
        assert!(format!("{err:#}").starts_with("gw.yaml doc 1: "), "{err:#}");
    }

    #[test]
    fn label_keys_and_values_are_checked_as_kubernetes_checks_them() {
        for key in ["team", "example.com/team", "a.b-c/x_y.z", "A", "x9"] {
            assert!(is_qualified_key(key), "{key:?}");
        }
        for key in [
            "",
            "/x",
            "example.com/",
            "Example.com/x",
            "-x",
            "x/y/z",
            "a b",
        ] {
            assert!(!is_qualified_key(key), "{key:?}");
        }
        for value in ["", "v", "V_1.2-x", &"a".repeat(63)] {
            assert!(is_label_value(value), "{value:?}");
        }
        for value in ["-v", "v.", "a b", &"a".repeat(64)] {
            assert!(!is_label_value(value), "{value:?}");
        }
    }

    /// The example `cargo xtask manifests` validates renders (kubernetes-validate itself runs
    /// there, on this very file).
    #[test]
    fn the_example_renders_every_gateway_into_a_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = write_example(dir.path()).expect("written");
        let text = std::fs::read_to_string(&path).expect("read");
        let docs = crate::cluster::documents(&text, "example").expect("yaml");
        assert_eq!(docs.len(), 14, "two gateways, seven objects each");
        let services: Vec<&str> = docs
            .iter()
            .filter(|d| d["kind"] == "Service")
            .filter_map(|d| d["metadata"]["name"].as_str())
            .collect();
        assert_eq!(services, ["public-istio", "internal-istio"]);
    }
}
