//! `cargo xtask layers`: the dependency graph is the architecture, so it is checked.
//!
//! Two rules, both over *normal* dependencies (dev-dependencies may reach anything; tests
//! are allowed to wire layers together):
//!
//! 1. `mesh-model` does no IO: nothing in its normal dependency tree may be one of
//!    [`NO_IO_FORBIDDEN`] (an async runtime, sockets, TLS, HTTP, the Kubernetes client).
//! 2. Each workspace crate depends directly only on the workspace crates [`LAYERS`] allows.
//!    A crate missing from the table fails the check: adding a crate means adding its row.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::cargo;

/// The crate that must stay pure.
const NO_IO_CRATE: &str = "mesh-model";

/// Packages that must not appear in [`NO_IO_CRATE`]'s normal dependency tree.
const NO_IO_FORBIDDEN: [&str; 8] = [
    "tokio",
    "mio",
    "rustls",
    "tokio-rustls",
    "hyper",
    "h2",
    "socket2",
    "kube",
];

/// Workspace crate → the workspace crates it may depend on (normal dependencies). The
/// layers, bottom up; a new crate gets a row here, and the crates above it list it.
const LAYERS: &[(&str, &[&str])] = &[
    // The mesh model and the YAML translator: pure, no IO.
    ("mesh-model", &[]),
    // Metrics and Istio's labels (built from the model's pods, Services and identities):
    // below everything that reports.
    ("mesh-telemetry", &["mesh-model"]),
    // The eBPF capture programs and their loader.
    ("ebpf", &[]),
    // Certificates, CA client, identity.
    ("mesh-pki", &["mesh-model"]),
    // HBONE: HTTP/2 CONNECT over mTLS.
    ("mesh-hbone", &["mesh-model", "mesh-pki"]),
    // The API-server config source.
    ("mesh-kube", &["mesh-model", "mesh-telemetry"]),
    // The process shell every binary shares: flags, config source (a directory or the API
    // server), logging, admin server, signals and drain, accept loops, listener limits
    // (which name HBONE's server settings and TCP keepalive).
    (
        "mesh-shell",
        &[
            "mesh-model",
            "mesh-pki",
            "mesh-hbone",
            "mesh-telemetry",
            "mesh-kube",
        ],
    ),
    // The proxies' L7 engine (request phases: policy, routing, retries over HTTP; the
    // upstream pool): the waypoint's, and the ingress gateway's to come. No shell, no kube.
    (
        "mesh-l7",
        &["mesh-model", "mesh-pki", "mesh-hbone", "mesh-telemetry"],
    ),
    // The binaries: wiring only.
    (
        "ztunnel",
        &[
            "mesh-model",
            "mesh-pki",
            "mesh-hbone",
            "mesh-telemetry",
            "mesh-kube",
            "mesh-shell",
            "ebpf",
        ],
    ),
    // The control plane (the CA service): holds the only signing key.
    (
        "control",
        &[
            "mesh-model",
            "mesh-pki",
            "mesh-telemetry",
            "mesh-kube",
            "mesh-shell",
        ],
    ),
    (
        "waypoint",
        &[
            "mesh-model",
            "mesh-pki",
            "mesh-hbone",
            "mesh-telemetry",
            "mesh-kube",
            "mesh-shell",
            "mesh-l7",
        ],
    ),
    // The e2e harness runs the binaries as processes; its tests (dev-dependencies) may use
    // the libraries. Its benchmark writes the model-size dimension's YAML with the model's
    // synthetic mesh generator (`mesh_model::synthetic`), the one the model's own benches use.
    ("e2e", &["mesh-model"]),
    // Automation: YAML is read through mesh-model's translator only.
    ("xtask", &["mesh-model", "mesh-telemetry", "e2e"]),
];

/// What the check looks at, gathered from cargo.
#[derive(Debug, Default)]
pub struct Graph {
    /// Package names in [`NO_IO_CRATE`]'s normal dependency tree.
    pub no_io_tree: BTreeSet<String>,
    /// Workspace crate → its direct normal dependencies that are workspace crates.
    pub workspace_deps: BTreeMap<String, BTreeSet<String>>,
}

/// Runs the check on this workspace; fails naming every violation.
pub fn check_workspace() -> Result<()> {
    let graph = gather()?;
    let violations = check(&graph);
    if !violations.is_empty() {
        bail!(
            "layering violated:\n  {}\n(the rules are in xtask/src/layers.rs)",
            violations.join("\n  ")
        );
    }
    println!(
        "xtask: layers ok ({} crates; {NO_IO_CRATE}'s {} normal dependencies do no IO)",
        graph.workspace_deps.len(),
        graph.no_io_tree.len().saturating_sub(1)
    );
    Ok(())
}

/// Every violation of the two rules in `graph`, one line each.
pub fn check(graph: &Graph) -> Vec<String> {
    let mut violations = Vec::new();
    for forbidden in NO_IO_FORBIDDEN {
        if graph.no_io_tree.contains(forbidden) {
            violations.push(format!(
                "{NO_IO_CRATE} must do no IO, but `{forbidden}` is in its normal dependency tree \
                 (`cargo tree -p {NO_IO_CRATE} -e normal -i {forbidden}` shows why)"
            ));
        }
    }
    let rules: BTreeMap<&str, &[&str]> = LAYERS.iter().copied().collect();
    for (krate, deps) in &graph.workspace_deps {
        let Some(allowed) = rules.get(krate.as_str()) else {
            violations.push(format!(
                "workspace crate `{krate}` has no row in LAYERS: say which crates it may use"
            ));
            continue;
        };
        for dep in deps {
            if !allowed.contains(&dep.as_str()) {
                violations.push(format!(
                    "`{krate}` depends on `{dep}`, which its layer does not allow \
                     (allowed: {})",
                    if allowed.is_empty() {
                        "none of ours".to_owned()
                    } else {
                        allowed.join(", ")
                    }
                ));
            }
        }
    }
    violations
}

/// Reads the graph from `cargo tree` and `cargo metadata` (both offline: the lock file and
/// the manifests are enough).
fn gather() -> Result<Graph> {
    let tree = output(cargo().args([
        "tree",
        "-p",
        NO_IO_CRATE,
        "-e",
        "normal",
        "--prefix",
        "none",
        "-f",
        "{p}",
    ]))?;
    let no_io_tree = parse_tree(&tree);
    let metadata = output(cargo().args(["metadata", "--no-deps", "--format-version", "1"]))?;
    let workspace_deps = parse_metadata(&metadata)?;
    Ok(Graph {
        no_io_tree,
        workspace_deps,
    })
}

fn output(cmd: &mut Command) -> Result<String> {
    let line = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("run {line}"))?;
    if !out.status.success() {
        bail!(
            "{line} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8(out.stdout).with_context(|| format!("{line}: output is not UTF-8"))
}

/// Package names in `cargo tree --prefix none -f {p}` output (`name vX.Y.Z (...)` a line).
fn parse_tree(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Workspace crate → its direct normal dependencies on workspace crates, from
/// `cargo metadata --no-deps` (which lists exactly the workspace's packages).
fn parse_metadata(json: &str) -> Result<BTreeMap<String, BTreeSet<String>>> {
    #[derive(serde::Deserialize)]
    struct Metadata {
        packages: Vec<Package>,
    }
    #[derive(serde::Deserialize)]
    struct Package {
        name: String,
        dependencies: Vec<Dependency>,
    }
    #[derive(serde::Deserialize)]
    struct Dependency {
        name: String,
        /// `null` for normal, `"dev"` or `"build"`.
        kind: Option<String>,
    }
    let metadata: Metadata = serde_json::from_str(json).context("parse cargo metadata")?;
    let ours: BTreeSet<&str> = metadata.packages.iter().map(|p| p.name.as_str()).collect();
    Ok(metadata
        .packages
        .iter()
        .map(|p| {
            let deps = p
                .dependencies
                .iter()
                .filter(|d| d.kind.is_none() && ours.contains(d.name.as_str()))
                .map(|d| d.name.clone())
                .collect();
            (p.name.clone(), deps)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(tree: &str, deps: &[(&str, &[&str])]) -> Graph {
        Graph {
            no_io_tree: parse_tree(tree),
            workspace_deps: deps
                .iter()
                .map(|(k, d)| (k.to_string(), d.iter().map(|s| s.to_string()).collect()))
                .collect(),
        }
    }

    fn check_graph(g: &Graph, expected: &[&str]) {
        let found = check(g);
        assert_eq!(found.len(), expected.len(), "{found:#?}");
        for (line, want) in found.iter().zip(expected) {
            assert!(line.contains(want), "{line:?} should mention {want:?}");
        }
    }

    const PURE_TREE: &str = "mesh-model v0.1.0 (/w/model)\nbytes v1.12.1\n\
                             serde_derive v1.0.229 (proc-macro)\nproc-macro2 v1.0.107 (*)\n";

    #[test]
    fn the_intended_graph_passes() {
        check_graph(
            &graph(
                PURE_TREE,
                &[
                    ("mesh-model", &[]),
                    ("mesh-pki", &["mesh-model"]),
                    ("mesh-hbone", &["mesh-model", "mesh-pki"]),
                    ("mesh-kube", &["mesh-model", "mesh-telemetry"]),
                    ("xtask", &["mesh-model", "e2e"]),
                    ("e2e", &[]),
                ],
            ),
            &[],
        );
    }

    #[test]
    fn io_in_the_model_tree_fails() {
        let tree = format!("{PURE_TREE}tokio v1.48.0\nmio v1.0.4\ntokio-util v0.7.1\n");
        // tokio-util is not on the list: only exact names count.
        check_graph(&graph(&tree, &[]), &["`tokio`", "`mio`"]);
    }

    #[test]
    fn an_upward_or_unlisted_dependency_fails() {
        check_graph(
            &graph(
                PURE_TREE,
                &[
                    ("mesh-model", &["mesh-pki"]),
                    ("mesh-telemetry", &[]),
                    ("xtask", &["mesh-kube"]),
                    ("mesh-new", &[]),
                ],
            ),
            &[
                "`mesh-model` depends on `mesh-pki`",
                "no row in LAYERS",
                "`xtask` depends on `mesh-kube`",
            ],
        );
    }

    #[test]
    fn metadata_keeps_only_normal_dependencies_on_workspace_crates() {
        let json = r#"{"packages": [
            {"name": "mesh-pki", "dependencies": [
                {"name": "mesh-model", "kind": null},
                {"name": "ring", "kind": null},
                {"name": "mesh-hbone", "kind": "dev"}]},
            {"name": "mesh-model", "dependencies": []},
            {"name": "mesh-hbone", "dependencies": [{"name": "mesh-pki", "kind": "build"}]}
        ]}"#;
        let deps = parse_metadata(json).expect("parses");
        let names = |k: &str| deps[k].iter().cloned().collect::<Vec<_>>();
        assert_eq!(names("mesh-pki"), ["mesh-model"]);
        assert!(names("mesh-model").is_empty());
        assert!(names("mesh-hbone").is_empty());
    }

    #[test]
    fn every_row_names_known_crates() {
        let crates: BTreeSet<&str> = LAYERS.iter().map(|(k, _)| *k).collect();
        for (krate, allowed) in LAYERS {
            for dep in *allowed {
                assert!(crates.contains(dep), "{krate} allows unknown {dep}");
            }
        }
    }
}
