//! `cargo xtask waypoint apply|delete|list`: the user CLI for waypoints.
//!
//! - Local mode (default): edits a local mesh's YAML directory (`--config DIR`; default the
//!   source directory of the running `cargo xtask up`, else `examples/local-mesh`). `apply`
//!   writes `waypoint-<ns>-<name>.yaml` with the `Gateway` (class `istio-waypoint`, label
//!   `istio.io/waypoint-for`, listener `mesh` 15008 HBONE) and the pod `cargo xtask up` runs
//!   the `waypoint` process in (labelled `gateway.networking.k8s.io/gateway-name=<name>`,
//!   with the waypoint's service account); `--enroll-namespace` labels the namespace's
//!   document `istio.io/use-waypoint=<name>` in place. `delete` removes the Gateway and its
//!   pods from whichever file holds them; `list` shows each waypoint and what uses it.
//! - Cluster mode (`--kubectl`): the Gateway plus the Deployment, Service and ServiceAccount
//!   of `manifests/waypoint.yaml` renamed for it, piped to `kubectl apply -f -`, then
//!   `kubectl label namespace`; `--print` only prints them.
//!
//! [`render`] and [`edit`] are pure; [`plan_apply`], [`plan_delete`] and [`list`] decide on
//! file contents given as strings and check the result loads through the agents' translator
//! (`mesh_model::k8s::load_docs`) and the local mesh's own reader, so nothing is written that the
//! mesh would refuse. Only [`run`] reads, writes and runs anything.

pub mod edit;
pub mod render;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use mesh_model::k8s::SourceObject;
use serde_yaml::Value;

use crate::cluster::{kubectl, TRUST_DOMAIN};
use crate::local_mesh::config::{read_yaml_dir, LocalMesh};
use edit::{EditKind, Segments};
use render::{
    Waypoint, WaypointFor, GATEWAY_NAME_LABEL, USE_WAYPOINT_LABEL, USE_WAYPOINT_NAMESPACE_LABEL,
    WAYPOINT_CLASS,
};

/// The Gateway's name when `--name` is not given (Istio's default too).
pub const DEFAULT_NAME: &str = "waypoint";

#[derive(Subcommand, Debug)]
pub enum WaypointCmd {
    /// Deploy a waypoint for a namespace: its Gateway and what runs it.
    Apply(ApplyArgs),
    /// Remove a waypoint (its Gateway and what runs it).
    Delete(DeleteArgs),
    /// List the waypoints and what uses them.
    List(ListArgs),
}

/// Where the waypoint lives: a local YAML directory, or a cluster through kubectl.
#[derive(Args, Debug, Clone)]
pub struct Mode {
    /// Local mode: the YAML directory to edit [default: the source directory of the running
    /// `cargo xtask up`, else examples/local-mesh].
    #[arg(long, value_name = "DIR", conflicts_with = "kubectl")]
    pub config: Option<PathBuf>,
    /// Cluster mode: apply with `kubectl` (current context) instead of editing YAML files.
    #[arg(long)]
    pub kubectl: bool,
    /// With --kubectl: print the YAML and the kubectl commands, run nothing.
    #[arg(long, requires = "kubectl")]
    pub print: bool,
}

#[derive(Args, Debug)]
pub struct ApplyArgs {
    /// Namespace of the waypoint (and of its Gateway and identity).
    #[arg(short = 'n', long)]
    pub namespace: String,
    /// Name of the Gateway.
    #[arg(long, default_value = DEFAULT_NAME)]
    pub name: String,
    /// Service account of the waypoint's identity [default: the Gateway's name].
    #[arg(long)]
    pub service_account: Option<String>,
    /// Which traffic it takes (label `istio.io/waypoint-for`).
    #[arg(long = "for", value_enum, default_value_t = WaypointFor::Service)]
    pub waypoint_for: WaypointFor,
    /// Label the namespace `istio.io/use-waypoint=<name>`: its Services use the waypoint.
    #[arg(long)]
    pub enroll_namespace: bool,
    /// Local mode: the node the waypoint's pod runs on [default: as before, else the first
    /// node of the directory's pods].
    #[arg(long, conflicts_with = "kubectl")]
    pub node: Option<String>,
    #[command(flatten)]
    pub mode: Mode,
}

#[derive(Args, Debug)]
pub struct DeleteArgs {
    #[arg(short = 'n', long)]
    pub namespace: String,
    #[arg(long, default_value = DEFAULT_NAME)]
    pub name: String,
    #[command(flatten)]
    pub mode: Mode,
}

#[derive(Args, Debug)]
pub struct ListArgs {
    /// Only this namespace [default: all].
    #[arg(short = 'n', long)]
    pub namespace: Option<String>,
    #[command(flatten)]
    pub mode: Mode,
}

/// What a local command writes: whole files, and files to remove, plus what to tell the user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub writes: Vec<(String, String)>,
    pub removes: Vec<String>,
    pub notes: Vec<String>,
    /// Whether pods were added or removed (a running mesh needs rebuilding for that).
    pub topology_changed: bool,
}

// === commands ===

/// Runs a waypoint command.
pub fn run(cmd: WaypointCmd) -> Result<()> {
    match cmd {
        WaypointCmd::Apply(a) => {
            let wp = Waypoint::new(
                &a.namespace,
                &a.name,
                a.service_account.as_deref(),
                a.waypoint_for,
            )?;
            if a.mode.kubectl {
                return kubectl(
                    &render::kubectl_apply(&wp, a.enroll_namespace)?,
                    a.mode.print,
                );
            }
            let (dir, live) = config_dir(a.mode.config.as_deref())?;
            let files = read_yaml_dir(&dir)?;
            let plan = plan_apply(&files, &wp, a.node.as_deref(), a.enroll_namespace)
                .with_context(|| format!("waypoint apply in {}", dir.display()))?;
            println!(
                "waypoint {} ({}, identity {}) in {}",
                wp.key(),
                wp.waypoint_for,
                wp.spiffe_id(TRUST_DOMAIN),
                dir.display()
            );
            write_plan(&dir, &plan)?;
            report(&plan, live, "runs it");
            Ok(())
        }
        WaypointCmd::Delete(d) => {
            render::check_name(&d.namespace).context("namespace")?;
            render::check_name(&d.name).context("name")?;
            if d.mode.kubectl {
                return kubectl(&render::kubectl_delete(&d.namespace, &d.name), d.mode.print);
            }
            let (dir, live) = config_dir(d.mode.config.as_deref())?;
            let files = read_yaml_dir(&dir)?;
            let plan = plan_delete(&files, &d.namespace, &d.name)
                .with_context(|| format!("waypoint delete in {}", dir.display()))?;
            println!(
                "waypoint {}/{} deleted from {}",
                d.namespace,
                d.name,
                dir.display()
            );
            write_plan(&dir, &plan)?;
            report(&plan, live, "starts without it");
            Ok(())
        }
        WaypointCmd::List(l) => {
            if l.mode.kubectl {
                return kubectl(
                    &[render::kubectl_list(l.namespace.as_deref())],
                    l.mode.print,
                );
            }
            let (dir, _) = config_dir(l.mode.config.as_deref())?;
            let files = read_yaml_dir(&dir)?;
            print!(
                "{}",
                list(&files, l.namespace.as_deref(), &dir.display().to_string())?
            );
            Ok(())
        }
    }
}

/// The directory local mode edits, and whether a running `up` reads it.
fn config_dir(explicit: Option<&Path>) -> Result<(PathBuf, bool)> {
    let live = crate::local_mesh::running_source();
    let dir = match (explicit, &live) {
        (Some(dir), _) => dir.to_path_buf(),
        (None, Some(source)) => {
            println!(
                "(editing {}, the source of the running `cargo xtask up`)",
                source.display()
            );
            source.clone()
        }
        (None, None) => crate::workspace_root().join(crate::local_mesh::SAMPLE_DIR),
    };
    let dir = dir
        .canonicalize()
        .with_context(|| format!("config directory {}", dir.display()))?;
    let is_live = live.is_some_and(|l| l.canonicalize().is_ok_and(|l| l == dir));
    Ok((dir, is_live))
}

fn write_plan(dir: &Path, plan: &Plan) -> Result<()> {
    for (file, content) in &plan.writes {
        let path = dir.join(file);
        // Written beside and renamed: a running mesh never reads half a file. The dot hides
        // the temporary file from every YAML reader.
        let tmp = dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, content).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path)
            .with_context(|| format!("rename {} to {}", tmp.display(), path.display()))?;
        println!("  wrote {}", path.display());
    }
    for file in &plan.removes {
        let path = dir.join(file);
        std::fs::remove_file(&path).with_context(|| format!("remove {}", path.display()))?;
        println!("  removed {}", path.display());
    }
    Ok(())
}

/// The notes, then what happens next (`next`: what a new `up` does with the change).
fn report(plan: &Plan, live: bool, next: &str) {
    for note in &plan.notes {
        println!("  {note}");
    }
    if plan.writes.is_empty() && plan.removes.is_empty() {
        println!("  nothing to change");
    } else if live && plan.topology_changed {
        println!(
            "  the running `cargo xtask up` reads this directory, but cannot add or remove pods \
             while it runs: `cargo xtask down && cargo xtask up` starts the mesh with it \
             (labels and policies apply live)"
        );
    } else if live {
        println!("  the running `cargo xtask up` applies this within a second or two");
    } else {
        println!("  `cargo xtask up` {next} (`--config <dir>` for another directory)");
    }
}

// === plans (pure) ===

/// The objects of the directory as the agents' translator reads them (file, 1-based document
/// number, the object; list items flattened, so that conflicts are found there too).
fn objects(files: &[(String, String)]) -> Result<Vec<SourceObject>> {
    let (_, objects) = mesh_model::k8s::load_docs_with_sources(files)?;
    Ok(objects)
}

fn namespace_of(v: &Value) -> &str {
    v["metadata"]["namespace"]
        .as_str()
        .unwrap_or(mesh_model::k8s::DEFAULT_NAMESPACE)
}

fn is_kind(v: &Value, api_version: &str, kind: &str) -> bool {
    v["kind"] == kind && v["apiVersion"].as_str() == Some(api_version)
}

fn is_gateway(v: &Value, namespace: &str, name: &str) -> bool {
    v["kind"] == "Gateway"
        && v["apiVersion"]
            .as_str()
            .is_some_and(|a| a.starts_with("gateway.networking.k8s.io/"))
        && v["metadata"]["name"] == name
        && namespace_of(v) == namespace
}

fn is_pod(v: &Value, namespace: &str, name: &str) -> bool {
    is_kind(v, "v1", "Pod") && v["metadata"]["name"] == name && namespace_of(v) == namespace
}

fn is_waypoint_pod(v: &Value, namespace: &str, gateway: &str) -> bool {
    is_kind(v, "v1", "Pod")
        && namespace_of(v) == namespace
        && v["metadata"]["labels"][GATEWAY_NAME_LABEL] == gateway
}

fn is_namespace(v: &Value, name: &str) -> bool {
    is_kind(v, "v1", "Namespace") && v["metadata"]["name"] == name
}

/// `waypoint apply` in local mode.
pub fn plan_apply(
    files: &[(String, String)],
    wp: &Waypoint,
    node: Option<&str>,
    enroll_namespace: bool,
) -> Result<Plan> {
    let own = render::local_file_name(wp);
    let objects = objects(files)?;
    let elsewhere = |m: &dyn Fn(&Value) -> bool| {
        objects
            .iter()
            .find(|o| o.file != own && m(&o.value))
            .map(|o| format!("{} doc {}", o.file, o.doc))
    };
    if let Some(at) = elsewhere(&|v| is_gateway(v, &wp.namespace, &wp.name)) {
        bail!(
            "Gateway {} is already declared in {at}: edit it there, or `cargo xtask waypoint \
             delete -n {} --name {}` first",
            wp.key(),
            wp.namespace,
            wp.name
        );
    }
    if let Some(at) = elsewhere(&|v| is_pod(v, &wp.namespace, &wp.name)) {
        bail!(
            "Pod {} already exists ({at}); the waypoint's pod is named after its Gateway: \
             choose another --name",
            wp.key()
        );
    }
    if let Some(n) = node {
        render::check_name(n).with_context(|| format!("node {n:?}"))?;
    }
    let previous = files
        .iter()
        .find(|(f, _)| *f == own)
        .map(|(_, t)| t.as_str());
    let previous_node = objects
        .iter()
        .filter(|o| o.file == own && is_pod(&o.value, &wp.namespace, &wp.name))
        .find_map(|o| o.value["spec"]["nodeName"].as_str().map(str::to_owned));
    let first_node = objects
        .iter()
        .filter(|o| is_kind(&o.value, "v1", "Pod"))
        .filter_map(|o| o.value["spec"]["nodeName"].as_str().map(str::to_owned))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .next();
    let node = node
        .map(str::to_owned)
        .or(previous_node)
        .or(first_node)
        .context("no Pod in the directory names a spec.nodeName: pass --node")?;

    let mut plan = Plan::default();
    let content = render::local_file(wp, &node);
    if previous != Some(content.as_str()) {
        // A new file means a new pod; a changed one may move it (or change its identity).
        plan.topology_changed = true;
        plan.notes.push(format!(
            "{} on node {node}: Gateway {} ({}) and its pod (service account {})",
            if previous.is_some() {
                "updated"
            } else {
                "created"
            },
            wp.key(),
            wp.waypoint_for,
            wp.service_account
        ));
        plan.writes.push((own.clone(), content));
    }

    if enroll_namespace {
        let (file, text) = enroll(files, &wp.namespace, &wp.name, &mut plan.notes)?;
        if let Some(text) = text {
            plan.writes.push((file, text));
        }
    }
    check_loads(files, &plan)?;
    Ok(plan)
}

/// Labels the namespace's document: (file, new text if it changed).
fn enroll(
    files: &[(String, String)],
    namespace: &str,
    name: &str,
    notes: &mut Vec<String>,
) -> Result<(String, Option<String>)> {
    let what = format!("Namespace {namespace}");
    let mut found: Vec<(Segments, usize)> = Vec::new();
    for (file, text) in files {
        // Only files that mention the namespace's document need to split cleanly.
        let mentions = objects(&[(file.clone(), text.clone())])?
            .iter()
            .any(|o| is_namespace(&o.value, namespace));
        if !mentions {
            continue;
        }
        let segments = Segments::split(file, text)?;
        for i in segments.find(&what, |v| is_namespace(v, namespace))? {
            found.push((segments.clone(), i));
        }
    }
    let (mut segments, index) = match found.len() {
        0 => bail!(
            "--enroll-namespace: no `kind: Namespace` document named {namespace} to label; add \
             one (see namespaces.yaml) or leave the flag out and label Services instead"
        ),
        1 => found.remove(0),
        n => bail!("--enroll-namespace: {what} is declared {n} times"),
    };
    let previous = segments.segments[index]
        .value
        .as_ref()
        .and_then(|v| v["metadata"]["labels"][USE_WAYPOINT_LABEL].as_str())
        .map(str::to_owned);
    let how = segments.set_label(
        index,
        USE_WAYPOINT_LABEL,
        name,
        &[USE_WAYPOINT_NAMESPACE_LABEL],
    )?;
    let at = format!("{} doc {}", segments.file, index + 1);
    let label = format!("{USE_WAYPOINT_LABEL}={name}");
    notes.push(match (how, previous) {
        (EditKind::Unchanged, _) => format!("namespace {namespace} already labelled {label}"),
        (_, Some(old)) if old != name => {
            format!("labelled namespace {namespace} {label} (was {old}) in {at}")
        }
        (EditKind::Rewritten, _) => format!(
            "labelled namespace {namespace} {label}: rewrote {at} (its layout could not be \
             edited line by line; comments inside it are not kept)"
        ),
        _ => format!("labelled namespace {namespace} {label} in {at}"),
    });
    let text = (how != EditKind::Unchanged).then(|| segments.render());
    Ok((segments.file, text))
}

/// `waypoint delete` in local mode: the Gateway's documents and its pods' go, wherever they
/// are; a file left with nothing but comments is removed.
pub fn plan_delete(files: &[(String, String)], namespace: &str, name: &str) -> Result<Plan> {
    let mut plan = Plan::default();
    let mut gateways = 0;
    for (file, text) in files {
        let mentions = objects(&[(file.clone(), text.clone())])?.iter().any(|o| {
            is_gateway(&o.value, namespace, name) || is_waypoint_pod(&o.value, namespace, name)
        });
        if !mentions {
            continue;
        }
        let mut segments = Segments::split(file, text)?;
        let gw = segments.find(&format!("Gateway {namespace}/{name}"), |v| {
            is_gateway(v, namespace, name)
        })?;
        let pods = segments.find(&format!("the pod of waypoint {namespace}/{name}"), |v| {
            is_waypoint_pod(v, namespace, name)
        })?;
        gateways += gw.len();
        if !pods.is_empty() {
            plan.topology_changed = true;
        }
        let mut gone: Vec<usize> = gw.into_iter().chain(pods).collect();
        gone.sort_unstable();
        gone.dedup();
        for &i in &gone {
            let what = segments.segments[i]
                .value
                .as_ref()
                .map(|v| {
                    format!(
                        "{} {}/{}",
                        v["kind"].as_str().unwrap_or("object"),
                        namespace_of(v),
                        v["metadata"]["name"].as_str().unwrap_or("?")
                    )
                })
                .unwrap_or_default();
            plan.notes
                .push(format!("removed {what} ({file} doc {})", i + 1));
        }
        // Last first, so the indexes of the others stay valid.
        for &i in gone.iter().rev() {
            segments.remove(i);
        }
        if segments.is_empty() {
            plan.removes.push(file.clone());
        } else {
            plan.writes.push((file.clone(), segments.render()));
        }
    }
    if gateways == 0 {
        bail!(
            "no Gateway {namespace}/{name} here (`cargo xtask waypoint list` shows the waypoints)"
        );
    }
    // Labels that still name it: the most specific label decides alone, so their traffic
    // now goes direct rather than falling back to another waypoint.
    for o in objects(files)? {
        let v = &o.value;
        let labels = &v["metadata"]["labels"];
        let own_ns = if is_kind(v, "v1", "Namespace") {
            v["metadata"]["name"].as_str().unwrap_or_default()
        } else {
            namespace_of(v)
        };
        let target_ns = labels[USE_WAYPOINT_NAMESPACE_LABEL]
            .as_str()
            .unwrap_or(own_ns);
        if labels[USE_WAYPOINT_LABEL] == name && target_ns == namespace {
            plan.notes.push(format!(
                "{} {} ({} doc {}) is still labelled {USE_WAYPOINT_LABEL}={name}: its traffic \
                 now goes direct (destination policies see the client's identity again)",
                v["kind"].as_str().unwrap_or("object"),
                v["metadata"]["name"].as_str().unwrap_or("?"),
                o.file,
                o.doc
            ));
        }
    }
    check_loads(files, &plan)?;
    Ok(plan)
}

/// The directory after `plan`.
fn after(files: &[(String, String)], plan: &Plan) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = files
        .iter()
        .filter(|(f, _)| !plan.removes.contains(f))
        .filter(|(f, _)| !plan.writes.iter().any(|(w, _)| w == f))
        .cloned()
        .collect();
    out.extend(plan.writes.iter().cloned());
    out.sort();
    out
}

/// The directory after `plan` must load in the agents' translator and in the local mesh.
fn check_loads(files: &[(String, String)], plan: &Plan) -> Result<()> {
    let new = after(files, plan);
    mesh_model::k8s::load_docs(&new)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("the result would not load in the node agents (nothing written)")?;
    LocalMesh::from_files(&new)
        .context("the result would not load as a local mesh (nothing written)")?;
    Ok(())
}

/// `waypoint list` in local mode: each waypoint Gateway with its file, traffic, pods,
/// identity and what uses it.
pub fn list(files: &[(String, String)], namespace: Option<&str>, dir: &str) -> Result<String> {
    use std::fmt::Write as _;
    let model = mesh_model::k8s::load_docs(files).map_err(|e| anyhow::anyhow!("{dir}: {e}"))?;
    let objects = objects(files)?;
    let mut out = String::new();
    let gateways: Vec<&mesh_model::model::Gateway> = model
        .gateways
        .values()
        .filter(|g| g.is_waypoint())
        .filter(|g| namespace.is_none_or(|ns| g.namespace == ns))
        .collect();
    if gateways.is_empty() {
        let _ = writeln!(
            out,
            "no waypoints (Gateways of class {WAYPOINT_CLASS}){} in {dir}",
            namespace
                .map(|n| format!(" in namespace {n}"))
                .unwrap_or_default()
        );
        return Ok(out);
    }
    for gw in gateways {
        let file = objects
            .iter()
            .find(|o| is_gateway(&o.value, &gw.namespace, &gw.name))
            .map(|o| o.file.as_str())
            .unwrap_or("?");
        let waypoint_for = gw
            .labels
            .get(render::WAYPOINT_FOR_LABEL)
            .map_or("service", String::as_str);
        let _ = writeln!(
            out,
            "{}/{}  for {waypoint_for}  ({file})",
            gw.namespace, gw.name
        );
        let pods: Vec<&mesh_model::model::Pod> = model
            .pods
            .values()
            .map(|p| &**p)
            .filter(|p| {
                p.namespace == gw.namespace && p.labels.get(GATEWAY_NAME_LABEL) == Some(&gw.name)
            })
            .collect();
        // The identity is the first pod's service account; without a pod, Istio's default.
        let sa = pods
            .first()
            .map_or(gw.name.as_str(), |p| p.service_account.as_str());
        let _ = writeln!(
            out,
            "  identity  spiffe://{TRUST_DOMAIN}/ns/{}/sa/{sa}",
            gw.namespace
        );
        if pods.is_empty() {
            let _ = writeln!(
                out,
                "  pods      none: nothing runs it, and traffic for what uses it fails (UH)"
            );
        }
        for p in &pods {
            let _ = writeln!(
                out,
                "  pod       {}/{} on {}",
                p.namespace,
                p.name,
                p.node_name.as_deref().unwrap_or("?")
            );
        }
        let key = mesh_model::model::NamespacedName::new(&gw.namespace, &gw.name);
        let namespaces: Vec<&str> = model
            .namespaces
            .values()
            .filter(|ns| {
                mesh_model::model::use_waypoint(&ns.labels, &ns.name, None).as_ref() == Some(&key)
            })
            .map(|ns| ns.name.as_str())
            .collect();
        let services: Vec<String> = model
            .services
            .values()
            .filter(|s| {
                model
                    .waypoint_for_service(s)
                    .is_some_and(|t| std::ptr::eq(t.gateway, gw))
            })
            .map(|s| format!("{}/{}", s.namespace, s.name))
            .collect();
        let workloads: Vec<String> = model
            .pods
            .values()
            .filter(|p| {
                model
                    .waypoint_for_workload(p)
                    .is_some_and(|t| std::ptr::eq(t.gateway, gw))
            })
            .map(|p| format!("{}/{}", p.namespace, p.name))
            .collect();
        let none = || "none".to_owned();
        let join = |v: &[String]| Some(v.join(", ")).filter(|s| !s.is_empty());
        let _ = writeln!(
            out,
            "  enrolled  namespaces: {}",
            Some(namespaces.join(", "))
                .filter(|s| !s.is_empty())
                .unwrap_or_else(none)
        );
        let _ = writeln!(
            out,
            "  used by   services: {}",
            join(&services).unwrap_or_else(none)
        );
        if waypoint_for != "service" {
            let _ = writeln!(
                out,
                "            workloads: {}",
                join(&workloads).unwrap_or_else(none)
            );
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<(String, String)> {
        let dir = crate::workspace_root().join(crate::local_mesh::SAMPLE_DIR);
        read_yaml_dir(&dir).expect("the sample reads")
    }

    /// The sample without its waypoint: what `waypoint apply` starts from.
    fn sample_without_waypoint() -> Vec<(String, String)> {
        let files = sample();
        let plan = plan_delete(&files, "demo", "waypoint").expect("the sample has a waypoint");
        let mut files = after(&files, &plan);
        // Its namespace label and policies name the waypoint: drop those too.
        for (file, text) in &mut files {
            if file == "namespaces.yaml" {
                *text = text.replace("    istio.io/use-waypoint: waypoint\n", "");
            }
        }
        files.retain(|(f, _)| f != "policy.yaml");
        files
    }

    fn wp(ns: &str, name: &str) -> Waypoint {
        Waypoint::new(ns, name, None, WaypointFor::Service).expect("valid")
    }

    fn file<'a>(files: &'a [(String, String)], name: &str) -> &'a str {
        files
            .iter()
            .find(|(f, _)| f == name)
            .map(|(_, t)| t.as_str())
            .unwrap_or_else(|| {
                panic!(
                    "no {name} in {:?}",
                    files.iter().map(|f| &f.0).collect::<Vec<_>>()
                )
            })
    }

    #[test]
    fn apply_with_enroll_writes_a_waypoint_the_translator_steers_to() {
        let files = sample_without_waypoint();
        let plan = plan_apply(&files, &wp("demo", "waypoint"), None, true).expect("plan");
        assert!(plan.topology_changed);
        assert!(plan.removes.is_empty());
        let written: Vec<&str> = plan.writes.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(written, ["waypoint-demo-waypoint.yaml", "namespaces.yaml"]);
        let new = after(&files, &plan);

        // Only the label line was added to namespaces.yaml.
        let before = file(&files, "namespaces.yaml");
        let edited = file(&new, "namespaces.yaml");
        assert_eq!(
            edited.lines().count(),
            before.lines().count() + 1,
            "{edited}"
        );
        assert!(edited.starts_with("# Two namespaces"), "comments kept");

        let model = mesh_model::k8s::load_docs(&new).expect("loads in the agents");
        let echo = model
            .services
            .get(&mesh_model::model::NamespacedName::new("demo", "echo"))
            .expect("echo");
        let target = model.waypoint_for_service(echo).expect("steered");
        assert_eq!(target.gateway.name, "waypoint");
        // The pod is on the first node of the sample and is the waypoint's pod.
        let local = LocalMesh::from_files(&new).expect("loads as a local mesh");
        let pod = local
            .pods
            .iter()
            .find(|p| p.key() == "demo/waypoint")
            .expect("pod");
        assert_eq!(
            (pod.node.as_str(), pod.service_account.as_str()),
            ("n1", "waypoint")
        );
        assert_eq!(local.waypoints.len(), 1);

        // Applying again changes nothing.
        let again = plan_apply(&new, &wp("demo", "waypoint"), None, true).expect("plan");
        assert!(again.writes.is_empty(), "{again:?}");
        assert!(!again.topology_changed);
        assert!(
            again.notes.iter().any(|n| n.contains("already labelled")),
            "{:?}",
            again.notes
        );
    }

    #[test]
    fn apply_keeps_the_node_moves_it_when_asked_and_checks_its_names() {
        let files = sample_without_waypoint();
        let plan = plan_apply(&files, &wp("demo", "waypoint"), Some("n2"), false).expect("plan");
        let new = after(&files, &plan);
        assert!(file(&new, "waypoint-demo-waypoint.yaml").contains("nodeName: n2"));
        let again = plan_apply(&new, &wp("demo", "waypoint"), None, false).expect("plan");
        assert!(again.writes.is_empty(), "stays on n2: {again:?}");
        let err =
            plan_apply(&files, &wp("demo", "waypoint"), Some("N 2"), false).expect_err("bad node");
        assert!(format!("{err:#}").contains("node \"N 2\""), "{err:#}");
    }

    fn check_apply_refused(files: &[(String, String)], w: &Waypoint, enroll: bool, needle: &str) {
        let err = plan_apply(files, w, None, enroll).expect_err("refused");
        let text = format!("{err:#}");
        assert!(text.contains(needle), "{text:?} lacks {needle:?}");
    }

    #[test]
    fn apply_refuses_what_it_cannot_do_cleanly() {
        let files = sample_without_waypoint();
        // A Gateway of that name written by hand elsewhere.
        let mut by_hand = files.clone();
        by_hand.push(("mine.yaml".into(), render::gateway(&wp("demo", "waypoint"))));
        check_apply_refused(
            &by_hand,
            &wp("demo", "waypoint"),
            false,
            "Gateway demo/waypoint is already declared in mine.yaml doc 1",
        );
        // A pod already has the name.
        check_apply_refused(
            &files,
            &wp("demo", "sleep"),
            false,
            "Pod demo/sleep already exists (workloads.yaml doc 1)",
        );
        // No Namespace document to label.
        check_apply_refused(
            &files,
            &wp("shop", "waypoint"),
            true,
            "no `kind: Namespace` document named shop",
        );
        // The Namespace is an item of a List.
        let mut listed: Vec<(String, String)> = files
            .iter()
            .filter(|(f, _)| f != "namespaces.yaml")
            .cloned()
            .collect();
        listed.push((
            "namespaces.yaml".into(),
            "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  \
             metadata: {name: demo, labels: {istio.io/dataplane-mode: ambient}}\n"
                .into(),
        ));
        check_apply_refused(
            &listed,
            &wp("demo", "waypoint"),
            true,
            "namespaces.yaml doc 1: Namespace demo is an item of a List",
        );
        // A file with directives cannot be split reliably.
        let mut directive = files.clone();
        for (f, t) in &mut directive {
            if f == "namespaces.yaml" {
                *t = format!("%YAML 1.2\n---\n{t}");
            }
        }
        check_apply_refused(
            &directive,
            &wp("demo", "waypoint"),
            true,
            "uses YAML directives",
        );
        // No pods, so no node to put it on.
        let bare = vec![(
            "ns.yaml".to_owned(),
            "apiVersion: v1\nkind: Namespace\nmetadata: {name: demo}\n".to_owned(),
        )];
        check_apply_refused(&bare, &wp("demo", "waypoint"), false, "pass --node");
    }

    #[test]
    fn delete_removes_the_gateway_and_its_pod_wherever_they_are_and_names_leftover_labels() {
        let files = sample();
        let plan = plan_delete(&files, "demo", "waypoint").expect("plan");
        assert_eq!(plan.removes, ["waypoint-demo-waypoint.yaml"]);
        assert!(plan.topology_changed);
        assert!(
            plan.notes
                .iter()
                .any(|n| n.starts_with("Namespace demo (namespaces.yaml doc 1) is still labelled")),
            "{:?}",
            plan.notes
        );
        let new = after(&files, &plan);
        let model = mesh_model::k8s::load_docs(&new).expect("loads");
        assert!(
            !model.gateways.values().any(|g| g.is_waypoint()),
            "the sample's ingress Gateway stays, its waypoint goes"
        );

        // Written by hand amid other documents: only those documents go.
        let mixed = format!(
            "# mine\n{}---\n{}---\n# keep me\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: x, namespace: demo}}\n",
            render::gateway(&wp("demo", "wp")),
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: wp-1\n  namespace: demo\n  labels: \
             {gateway.networking.k8s.io/gateway-name: wp}\nspec: {nodeName: n1}\n"
        );
        let mut files = sample_without_waypoint();
        files.push(("mine.yaml".into(), mixed));
        let plan = plan_delete(&files, "demo", "wp").expect("plan");
        assert_eq!(plan.writes.len(), 1);
        assert_eq!(
            plan.writes[0].1,
            "---\n# keep me\napiVersion: v1\nkind: ServiceAccount\nmetadata: {name: x, namespace: demo}\n"
        );

        let err = plan_delete(&files, "demo", "nope").expect_err("refused");
        assert!(
            format!("{err:#}").contains("no Gateway demo/nope here"),
            "{err:#}"
        );
    }

    #[test]
    fn list_shows_each_waypoint_its_identity_pods_and_users() {
        let text = list(&sample(), None, "examples/local-mesh").expect("list");
        assert_eq!(
            text,
            "demo/waypoint  for service  (waypoint-demo-waypoint.yaml)\n\
             \x20 identity  spiffe://cluster.local/ns/demo/sa/waypoint\n\
             \x20 pod       demo/waypoint on n1\n\
             \x20 enrolled  namespaces: demo\n\
             \x20 used by   services: demo/echo, demo/echo-v1, demo/echo-v2\n"
        );
        let none = list(&sample(), Some("legacy"), "x").expect("list");
        assert_eq!(
            none,
            "no waypoints (Gateways of class istio-waypoint) in namespace legacy in x\n"
        );
    }
}
