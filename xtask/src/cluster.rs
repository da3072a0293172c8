//! What the user CLIs (`cargo xtask waypoint`, `cargo xtask gateway`) share for a cluster:
//! the DNS-label check of the names they derive objects from, reading YAML documents (a user's
//! file, a template of `manifests/`), the edits every template needs (name, namespace,
//! `gateway-name` labels, the service account bound), and the `kubectl` commands they run or,
//! with `--print`, print. Everything but [`kubectl`] is pure.

use std::io::Write as _;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use serde_yaml::{Mapping, Value};

pub use mesh_model::model::GATEWAY_NAME_LABEL;

/// The trust domain identities are shown in (the mesh's default).
pub const TRUST_DOMAIN: &str = "cluster.local";
/// Longest Kubernetes object name / label value a DNS label may be.
pub const MAX_NAME: usize = 63;

/// A DNS-1123 label: 1 to 63 of `a-z`, `0-9`, `-`, starting and ending alphanumeric.
pub fn check_name(value: &str) -> Result<()> {
    let bytes = value.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if value.is_empty() || value.len() > MAX_NAME {
        bail!("must be 1 to {MAX_NAME} characters");
    }
    if !bytes.iter().all(|b| alnum(b) || *b == b'-') {
        bail!("may only contain lower-case letters, digits and '-'");
    }
    if !bytes.first().is_some_and(alnum) || !bytes.last().is_some_and(alnum) {
        bail!("must start and end with a letter or digit");
    }
    Ok(())
}

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

// === documents ===

/// The documents of a multi-document YAML text with their 1-based numbers, counted as the
/// agents' translator counts them (empty documents numbered, then left out). `what` names the
/// text in errors.
pub fn numbered_documents(text: &str, what: &str) -> Result<Vec<(usize, Value)>> {
    let mut docs = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc).with_context(|| format!("{what} doc {}", i + 1))?;
        if !value.is_null() {
            docs.push((i + 1, value));
        }
    }
    Ok(docs)
}

/// The documents of a multi-document YAML text (comments and empty documents dropped).
pub fn documents(text: &str, what: &str) -> Result<Vec<Value>> {
    Ok(numbered_documents(text, what)?
        .into_iter()
        .map(|(_, v)| v)
        .collect())
}

/// Documents as one multi-document YAML text, each after a `---` line.
pub fn to_yaml(docs: &[Value], what: &str) -> Result<String> {
    let mut out = String::new();
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(doc).with_context(|| format!("render {what}"))?);
    }
    Ok(out)
}

/// `kind` of a document (empty when it has none).
pub fn kind(doc: &Value) -> &str {
    doc.get("kind").and_then(Value::as_str).unwrap_or_default()
}

/// The value at `path` (mapping keys) of a template document; the error names the path and
/// `what` (the template).
pub fn field_mut<'a>(doc: &'a mut Value, path: &[&str], what: &str) -> Result<&'a mut Value> {
    let kind = kind(doc).to_owned();
    let mut at = doc;
    for key in path {
        at = at
            .get_mut(*key)
            .with_context(|| format!("{what}: {kind} without {}", path.join(".")))?;
    }
    Ok(at)
}

/// Like [`field_mut`], for a mapping.
pub fn mapping_mut<'a>(doc: &'a mut Value, path: &[&str], what: &str) -> Result<&'a mut Mapping> {
    let kind = kind(doc).to_owned();
    field_mut(doc, path, what)?
        .as_mapping_mut()
        .with_context(|| format!("{what}: {kind}: {} is not a mapping", path.join(".")))
}

/// Sets a template document's `metadata.name` and, when the template gives it one (a
/// namespaced kind), its `metadata.namespace`. `what` names the template in errors.
pub fn set_metadata(doc: &mut Value, name: &str, namespace: &str, what: &str) -> Result<()> {
    let metadata = mapping_mut(doc, &["metadata"], what)?;
    metadata.insert("name".into(), name.into());
    if metadata.contains_key("namespace") {
        metadata.insert("namespace".into(), namespace.into());
    }
    Ok(())
}

/// Points every `subjects` entry of a (Cluster)RoleBinding at service account
/// `namespace/name`.
pub fn set_subjects(doc: &mut Value, name: &str, namespace: &str, what: &str) -> Result<()> {
    let subjects = field_mut(doc, &["subjects"], what)?;
    for subject in subjects.as_sequence_mut().into_iter().flatten() {
        if let Some(subject) = subject.as_mapping_mut() {
            subject.insert("name".into(), name.into());
            subject.insert("namespace".into(), namespace.into());
        }
    }
    Ok(())
}

/// `spec.template.spec` of a Deployment.
pub fn pod_spec_mut<'a>(doc: &'a mut Value, what: &str) -> Result<&'a mut Mapping> {
    mapping_mut(doc, &["spec", "template", "spec"], what)
}

/// Sets every `gateway.networking.k8s.io/gateway-name` key (labels, selectors) to `name`.
pub fn set_gateway_name(value: &mut Value, name: &str) {
    match value {
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                if k.as_str() == Some(GATEWAY_NAME_LABEL) && v.is_string() {
                    *v = name.into();
                } else {
                    set_gateway_name(v, name);
                }
            }
        }
        Value::Sequence(items) => items.iter_mut().for_each(|v| set_gateway_name(v, name)),
        _ => {}
    }
}

// === kubectl ===

/// One `kubectl` invocation: its arguments and what it reads on stdin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kubectl {
    pub args: Vec<String>,
    pub stdin: Option<String>,
}

impl Kubectl {
    pub fn new(args: &[&str]) -> Kubectl {
        Kubectl {
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            stdin: None,
        }
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(yaml: String) -> Kubectl {
        Kubectl {
            stdin: Some(yaml),
            ..Kubectl::new(&["apply", "-f", "-"])
        }
    }

    /// The command line as a user would type it (the stdin noted).
    pub fn line(&self) -> String {
        let mut line = format!("kubectl {}", self.args.join(" "));
        if self.stdin.is_some() {
            line.push_str(" < (the YAML above)");
        }
        line
    }
}

/// Runs (or with `print`, prints) kubectl commands in order; the first failure stops.
pub fn kubectl(commands: &[Kubectl], print: bool) -> Result<()> {
    if print {
        for c in commands {
            if let Some(stdin) = &c.stdin {
                print!("{stdin}");
            }
            println!("# {}", c.line());
        }
        return Ok(());
    }
    let tool = crate::find_tool("kubectl")
        .context("`kubectl` not found on PATH (or use --print to see what would be applied)")?;
    for c in commands {
        let line = c.line();
        println!("$ {line}");
        let mut child = Command::new(&tool)
            .args(&c.args)
            .stdin(if c.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .spawn()
            .with_context(|| format!("run `{line}`"))?;
        if let (Some(text), Some(mut stdin)) = (&c.stdin, child.stdin.take()) {
            stdin
                .write_all(text.as_bytes())
                .with_context(|| format!("`{line}`: write its stdin"))?;
        }
        let status = child.wait().with_context(|| format!("wait for `{line}`"))?;
        if !status.success() {
            bail!("`{line}` failed ({status})");
        }
    }
    Ok(())
}

/// Asserts that a rendered Deployment selects and labels its pods as Gateway `gateway`'s, and
/// runs them as `service_account`.
#[cfg(test)]
pub fn assert_runs_gateway(deployment: &Value, gateway: &str, service_account: &str) {
    let spec = &deployment["spec"];
    assert_eq!(spec["selector"]["matchLabels"][GATEWAY_NAME_LABEL], gateway);
    let pod = &spec["template"];
    assert_eq!(pod["metadata"]["labels"][GATEWAY_NAME_LABEL], gateway);
    assert_eq!(pod["spec"]["serviceAccountName"], service_account);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_name_case(value: &str, ok: bool) {
        assert_eq!(check_name(value).is_ok(), ok, "{value:?}");
    }

    #[test]
    fn names_must_be_dns_labels() {
        check_name_case("waypoint", true);
        check_name_case("wp-1", true);
        check_name_case("1wp", true);
        check_name_case(&"a".repeat(63), true);
        check_name_case(&"a".repeat(64), false);
        check_name_case("", false);
        check_name_case("Waypoint", false);
        check_name_case("-wp", false);
        check_name_case("wp-", false);
        check_name_case("wp.demo", false);
        check_name_case("wp/demo", false);
    }

    #[test]
    fn documents_are_numbered_as_the_translator_numbers_them() {
        // A comment before the first `---` is no document; an empty one between two is.
        let text = "# only a comment\n---\nkind: A\n---\n---\nkind: B\n";
        let docs = numbered_documents(text, "f.yaml").expect("yaml");
        let numbers: Vec<(usize, &str)> = docs.iter().map(|(n, d)| (*n, kind(d))).collect();
        assert_eq!(numbers, [(1, "A"), (3, "B")]);
        let err = numbered_documents("kind: A\n---\nkind: [\n", "f.yaml").expect_err("bad");
        assert!(format!("{err:#}").starts_with("f.yaml doc 2: "), "{err:#}");
        assert_eq!(
            to_yaml(&documents(text, "f.yaml").expect("yaml"), "f").expect("yaml"),
            "---\nkind: A\n---\nkind: B\n"
        );
    }

    #[test]
    fn kubectl_lines_note_their_stdin() {
        assert_eq!(Kubectl::new(&["get", "pods"]).line(), "kubectl get pods");
        let apply = Kubectl::apply("kind: A\n".into());
        assert_eq!(apply.line(), "kubectl apply -f - < (the YAML above)");
        assert_eq!(apply.stdin.as_deref(), Some("kind: A\n"));
    }
}
