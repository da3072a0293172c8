//! "Only the CA process holds a signing key", checked on the manifests: no manifest but the
//! CA's own ([`KEY_HOLDER`]) references the `cacerts` secret, a `ca-key` file or a CA
//! directory (`--ca-dir`, `*_CA_DIR`: a process given one signs certificates itself).
//!
//! YAML is checked on its parsed keys and values, so comments may explain what is not there;
//! Dockerfiles line by line, comment lines skipped. `manifests/README.md` is not checked: its
//! operator commands create the secret.

use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_yaml::Value;

/// The one manifest that mounts the signing key: the CA service's.
pub const KEY_HOLDER: &str = "control.yaml";

/// What gives a process a signing key (compared lower-case).
const KEY_MARKERS: [&str; 4] = ["cacerts", "ca-key", "ca-dir", "ca_dir"];

/// Checks every manifest (`*.yaml`, `*.yml`) and Dockerfile in `dir`.
pub fn check_dir(dir: &Path) -> Result<()> {
    let mut offences = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("read {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let checked =
            name.ends_with(".yaml") || name.ends_with(".yml") || name.starts_with("Dockerfile");
        if !checked || name == KEY_HOLDER {
            continue;
        }
        let text =
            std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
        for found in key_references(name, &text)? {
            offences.push(format!("{name}: {found:?}"));
        }
    }
    if !offences.is_empty() {
        offences.sort();
        bail!(
            "only the CA process holds a signing key: the `cacerts` secret, `ca-key` and CA \
             directories belong in manifests/{KEY_HOLDER} alone, but\n  {}",
            offences.join("\n  ")
        );
    }
    Ok(())
}

/// The strings of one file that reference a signing key. `name` says how to read it.
pub fn key_references(name: &str, text: &str) -> Result<Vec<String>> {
    let mut found = Vec::new();
    if name.starts_with("Dockerfile") {
        let lines = text.lines().map(str::trim);
        found.extend(
            lines
                .filter(|l| !l.starts_with('#') && is_key_reference(l))
                .map(str::to_owned),
        );
    } else {
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value = Value::deserialize(doc).with_context(|| format!("parse {name}"))?;
            walk(&value, &mut found);
        }
    }
    Ok(found)
}

fn walk(value: &Value, found: &mut Vec<String>) {
    match value {
        Value::String(s) if is_key_reference(s) => found.push(s.clone()),
        Value::Mapping(map) => map.iter().for_each(|(k, v)| {
            walk(k, found);
            walk(v, found);
        }),
        Value::Sequence(items) => items.iter().for_each(|v| walk(v, found)),
        Value::Tagged(tagged) => walk(&tagged.value, found),
        _ => {}
    }
}

fn is_key_reference(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    KEY_MARKERS.iter().any(|m| s.contains(m))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(name: &str, text: &str, expected: &[&str]) {
        let found = key_references(name, text).expect("parses");
        assert_eq!(found, expected, "{name}:\n{text}");
    }

    #[test]
    fn only_the_ca_manifest_references_the_signing_key() {
        check_dir(&crate::workspace_root().join("manifests")).expect("the repository's manifests");
    }

    #[test]
    fn a_key_in_any_other_manifest_is_found() {
        // A secret volume, its mount, a CA directory in the environment or a ConfigMap.
        check(
            "daemonset.yaml",
            "spec:\n  volumes:\n    - name: ca\n      secret:\n        secretName: cacerts\n",
            &["cacerts"],
        );
        check(
            "waypoint.yaml",
            "env:\n  - name: WAYPOINT_CA_DIR\n    value: /etc/ca\n",
            &["WAYPOINT_CA_DIR"],
        );
        check(
            "configmap.yaml",
            "data:\n  ZTUNNEL_CA_DIR: /etc/ca\n",
            &["ZTUNNEL_CA_DIR"],
        );
        check(
            "job.yaml",
            "args: [--ca-dir, /ca]\n---\nfiles: [/x/ca-key.pem]\n",
            &["--ca-dir", "/x/ca-key.pem"],
        );
        check(
            "Dockerfile.agent",
            "# no ca-key.pem here\nCOPY ca-key.pem /ca/\n",
            &["COPY ca-key.pem /ca/"],
        );
    }

    #[test]
    fn comments_and_public_roots_are_not_keys() {
        check(
            "daemonset.yaml",
            "# no cacerts here: the CA holds ca-key.pem\nvolumes:\n  - name: root\n    \
             configMap:\n      name: istio-ca-root-cert\n",
            &[],
        );
        check(
            "configmap.yaml",
            "data:\n  ZTUNNEL_CA_ADDRESS: https://control.istio-system.svc:15012\n  \
             ZTUNNEL_CA_ROOT_FILE: /var/run/secrets/istio/root-cert.pem\n",
            &[],
        );
    }
}
