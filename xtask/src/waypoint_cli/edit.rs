//! Editing a user's multi-document YAML file without disturbing what it does not change:
//! the file is split into its documents as text ([`Segments`]), one document is replaced or
//! removed, every other byte stays as it was. Pure.
//!
//! A label is added by a textual edit of the document (comments and layout kept) that must
//! parse back to exactly the intended object; when it does not (flow-style metadata, a label
//! to remove, a value YAML would read as a number), the document alone is re-rendered from
//! the intended object, keeping its leading comments. Files this cannot split reliably
//! (YAML directives, `...` document ends) and objects it cannot reach (items of a `List`)
//! are refused with the reason.

use anyhow::{bail, Context, Result};
use serde_yaml::{Mapping, Value};

/// One document of a file: its exact text (from its `---` line, or the file's start, to the
/// next `---` line) and what it parses to (`None`: only comments or nothing).
#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub text: String,
    pub value: Option<Value>,
}

/// A file as documents, in order; concatenating the texts gives the file back.
#[derive(Clone, Debug, PartialEq)]
pub struct Segments {
    pub file: String,
    pub segments: Vec<Segment>,
}

/// How a label edit was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EditKind {
    /// Already so: nothing written.
    Unchanged,
    /// A line edited or inserted; everything else as it was.
    InPlace,
    /// The document re-rendered (its inner comments are not kept).
    Rewritten,
}

// === impl Segments ===

impl Segments {
    pub fn split(file: &str, text: &str) -> Result<Segments> {
        let mut segments: Vec<String> = vec![String::new()];
        for line in text.split_inclusive('\n') {
            let bare = line.trim_end_matches(['\n', '\r']);
            if bare.starts_with('%') {
                bail!("{file}: uses YAML directives (`{bare}`); cannot edit it safely");
            }
            if bare == "..." || bare.starts_with("... ") {
                bail!("{file}: uses `...` document end markers; cannot edit it safely");
            }
            let marker = bare == "---" || bare.starts_with("--- ") || bare.starts_with("---\t");
            if marker && !segments.last().is_some_and(String::is_empty) {
                segments.push(String::new());
            }
            if let Some(last) = segments.last_mut() {
                last.push_str(line);
            }
        }
        let mut out = Vec::new();
        for (i, text) in segments.into_iter().enumerate() {
            let value: Value = serde_yaml::from_str(&text)
                .with_context(|| format!("{file} doc {}: not valid YAML", i + 1))?;
            out.push(Segment {
                value: (!value.is_null()).then_some(value),
                text,
            });
        }
        // The split must see the same documents a YAML parser does.
        let parsed = crate::cluster::documents(text, file)?;
        let split: Vec<&Value> = out.iter().filter_map(|s| s.value.as_ref()).collect();
        if split.len() != parsed.len() || split.iter().zip(&parsed).any(|(a, b)| *a != b) {
            bail!("{file}: its documents cannot be told apart line by line; cannot edit it safely");
        }
        Ok(Segments {
            file: file.to_owned(),
            segments: out,
        })
    }

    pub fn render(&self) -> String {
        self.segments.iter().map(|s| s.text.as_str()).collect()
    }

    /// Whether nothing but comments is left.
    pub fn is_empty(&self) -> bool {
        self.segments.iter().all(|s| s.value.is_none())
    }

    /// Indexes of the documents for which `matches` holds. An object inside a `v1 List`
    /// that matches is an error: it cannot be edited on its own.
    pub fn find(&self, what: &str, matches: impl Fn(&Value) -> bool) -> Result<Vec<usize>> {
        let mut found = Vec::new();
        for (i, segment) in self.segments.iter().enumerate() {
            let Some(value) = &segment.value else {
                continue;
            };
            if matches(value) {
                found.push(i);
            } else if is_list(value) && list_items(value).iter().any(&matches) {
                bail!(
                    "{} doc {}: {what} is an item of a List; cannot edit it there (move it to a \
                     document of its own, or edit it by hand)",
                    self.file,
                    i + 1
                );
            }
        }
        Ok(found)
    }

    /// Removes document `index` (its comments go with it).
    pub fn remove(&mut self, index: usize) {
        if index < self.segments.len() {
            self.segments.remove(index);
        }
    }

    /// Sets `metadata.labels[key] = value` on document `index`, and removes the labels in
    /// `unset`; says how.
    pub fn set_label(
        &mut self,
        index: usize,
        key: &str,
        value: &str,
        unset: &[&str],
    ) -> Result<EditKind> {
        let at = format!("{} doc {}", self.file, index + 1);
        let segment = self
            .segments
            .get_mut(index)
            .with_context(|| format!("{at}: no such document"))?;
        let current = segment
            .value
            .clone()
            .with_context(|| format!("{at}: empty document"))?;
        let wanted = with_label(&current, key, value, unset).with_context(|| at.clone())?;
        if wanted == current {
            return Ok(EditKind::Unchanged);
        }
        if let Some(text) = insert_label_line(&segment.text, key, value) {
            if serde_yaml::from_str::<Value>(&text).ok().as_ref() == Some(&wanted) {
                segment.text = text;
                segment.value = Some(wanted);
                return Ok(EditKind::InPlace);
            }
        }
        let text = rerender(&segment.text, &wanted).with_context(|| at.clone())?;
        if serde_yaml::from_str::<Value>(&text).ok().as_ref() != Some(&wanted) {
            bail!("{at}: could not re-render the document");
        }
        segment.text = text;
        segment.value = Some(wanted);
        Ok(EditKind::Rewritten)
    }
}

fn is_list(value: &Value) -> bool {
    value.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && value.get("kind").and_then(Value::as_str) == Some("List")
}

fn list_items(value: &Value) -> Vec<Value> {
    value
        .get("items")
        .and_then(Value::as_sequence)
        .cloned()
        .unwrap_or_default()
}

/// `object` with the label set and the `unset` labels removed.
fn with_label(object: &Value, key: &str, value: &str, unset: &[&str]) -> Result<Value> {
    let mut object = object.clone();
    let metadata = object
        .as_mapping_mut()
        .context("not a mapping")?
        .entry("metadata".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if metadata.is_null() {
        *metadata = Value::Mapping(Mapping::new());
    }
    let metadata = metadata
        .as_mapping_mut()
        .context("metadata: expected a mapping")?;
    let labels = metadata
        .entry("labels".into())
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if labels.is_null() {
        *labels = Value::Mapping(Mapping::new());
    }
    let labels = labels
        .as_mapping_mut()
        .context("metadata.labels: expected a mapping")?;
    labels.insert(key.into(), value.into());
    for k in unset {
        labels.remove(*k);
    }
    Ok(object)
}

/// Leading indentation in spaces, `None` for blank and comment lines (and tabs, which YAML
/// forbids for indentation).
fn indent(line: &str) -> Option<usize> {
    let trimmed = line.trim_start_matches(' ');
    if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.trim().is_empty() {
        return None;
    }
    Some(line.len() - trimmed.len())
}

/// Whether `line` is `<key>:` opening a block (nothing but a comment after the colon).
fn opens_block(line: &str, key: &str) -> bool {
    let Some(rest) = line.trim_start().strip_prefix(key) else {
        return false;
    };
    let Some(rest) = rest.trim_start().strip_prefix(':') else {
        return false;
    };
    let rest = rest.trim();
    rest.is_empty() || rest.starts_with('#')
}

/// The document with `key: value` written into a block-style `metadata.labels` (replacing
/// the key's line, or as the first label, or adding `labels:` at the end of `metadata`).
/// `None` when the layout is not the simple block style this understands; the caller
/// verifies the result parses to what it wants either way.
fn insert_label_line(text: &str, key: &str, value: &str) -> Option<String> {
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let meta = lines
        .iter()
        .position(|l| indent(l) == Some(0) && opens_block(l, "metadata"))?;
    // The metadata block: every line after it until the next line at indent 0.
    let end = lines[meta + 1..]
        .iter()
        .position(|l| indent(l) == Some(0))
        .map_or(lines.len(), |p| meta + 1 + p);
    let child = lines[meta + 1..end].iter().find_map(|l| indent(l))?;
    let newline = if text.contains("\r\n") { "\r\n" } else { "\n" };
    let mut out: Vec<String> = lines.iter().map(|l| (*l).to_owned()).collect();
    let labels = (meta + 1..end)
        .find(|&i| indent(lines[i]) == Some(child) && lines[i].trim_start().starts_with("labels"));
    match labels {
        Some(i) if opens_block(lines[i], "labels") => {
            let block_end = lines[i + 1..end]
                .iter()
                .position(|l| indent(l).is_some_and(|n| n <= child))
                .map_or(end, |p| i + 1 + p);
            let label_indent = lines[i + 1..block_end]
                .iter()
                .find_map(|l| indent(l))
                .unwrap_or(child + 2);
            let line = format!("{}{key}: {value}{newline}", " ".repeat(label_indent));
            let existing = (i + 1..block_end).find(|&j| {
                indent(lines[j]) == Some(label_indent)
                    && lines[j]
                        .trim_start()
                        .strip_prefix(key)
                        .is_some_and(|r| r.trim_start().starts_with(':'))
            });
            match existing {
                Some(j) => out[j] = line,
                None => out.insert(i + 1, line),
            }
        }
        // `labels: {...}` (flow style) or something else: not edited by line.
        Some(_) => return None,
        None => {
            let last = (meta + 1..end)
                .rev()
                .find(|&i| indent(lines[i]).is_some())?;
            let pad = " ".repeat(child);
            let block = format!("{pad}labels:{newline}{pad}  {key}: {value}{newline}");
            if !out[last].ends_with('\n') {
                out[last].push_str(newline);
            }
            out.insert(last + 1, block);
        }
    }
    Some(out.concat())
}

/// The document rendered from `value`, after the segment's leading `---` and comment lines.
fn rerender(text: &str, value: &Value) -> Result<String> {
    let mut out = String::new();
    for line in text.split_inclusive('\n') {
        let bare = line.trim();
        if bare == "---" || bare.starts_with('#') || bare.is_empty() {
            out.push_str(line);
        } else {
            break;
        }
    }
    if !out.is_empty() && !out.ends_with('\n') {
        out.push('\n');
    }
    out.push_str(&serde_yaml::to_string(value).context("render YAML")?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NAMESPACES: &str = "\
# Two namespaces: `demo` is in the mesh (ambient), `legacy` is not.
apiVersion: v1
kind: Namespace
metadata:
  name: demo
  labels:
    istio.io/dataplane-mode: ambient
---
apiVersion: v1
kind: Namespace
metadata:
  name: legacy
";

    fn is_namespace(name: &'static str) -> impl Fn(&Value) -> bool {
        move |v| v["kind"] == "Namespace" && v["metadata"]["name"] == name
    }

    #[test]
    fn a_file_splits_into_its_documents_and_joins_back_byte_for_byte() {
        let text = format!("---\n{NAMESPACES}---\n# trailing comment only\n");
        let segments = Segments::split("ns.yaml", &text).expect("split");
        assert_eq!(segments.render(), text);
        let values: Vec<bool> = segments
            .segments
            .iter()
            .map(|s| s.value.is_some())
            .collect();
        assert_eq!(values, [true, true, false]);
    }

    fn check_refused(text: &str, needle: &str) {
        let err = Segments::split("x.yaml", text).expect_err("refused");
        assert!(format!("{err:#}").contains(needle), "{err:#}");
    }

    #[test]
    fn files_it_cannot_split_reliably_are_refused() {
        check_refused("%YAML 1.2\n---\na: 1\n", "uses YAML directives");
        check_refused("a: 1\n...\n---\nb: 2\n", "document end markers");
        check_refused("a: [1\n", "x.yaml doc 1: not valid YAML");
    }

    /// Labels the namespace and returns (how, the file after).
    fn label(text: &str, name: &'static str, unset: &[&str]) -> (EditKind, String) {
        let mut segments = Segments::split("ns.yaml", text).expect("split");
        let found = segments
            .find("Namespace", is_namespace(name))
            .expect("find");
        assert_eq!(found.len(), 1, "{found:?}");
        let how = segments
            .set_label(found[0], "istio.io/use-waypoint", "waypoint", unset)
            .expect("label");
        let out = segments.render();
        let docs = Segments::split("ns.yaml", &out).expect("the result splits");
        let ns = docs
            .segments
            .iter()
            .filter_map(|s| s.value.as_ref())
            .find(|v| is_namespace(name)(v))
            .expect("namespace still there");
        assert_eq!(
            ns["metadata"]["labels"]["istio.io/use-waypoint"],
            "waypoint"
        );
        (how, out)
    }

    #[test]
    fn a_label_is_added_in_place_keeping_comments_and_other_documents() {
        let (how, out) = label(NAMESPACES, "demo", &[]);
        assert_eq!(how, EditKind::InPlace);
        assert_eq!(
            out,
            NAMESPACES.replace(
                "  labels:\n",
                "  labels:\n    istio.io/use-waypoint: waypoint\n"
            )
        );
        // A namespace without labels gets a labels block at the end of its metadata.
        let (how, out) = label(NAMESPACES, "legacy", &[]);
        assert_eq!(how, EditKind::InPlace);
        assert_eq!(
            out,
            format!("{NAMESPACES}  labels:\n    istio.io/use-waypoint: waypoint\n")
        );
        // Again: nothing to do.
        let (how, again) = label(&out, "legacy", &[]);
        assert_eq!((how, again.as_str()), (EditKind::Unchanged, out.as_str()));
    }

    #[test]
    fn an_existing_value_is_replaced_on_its_line() {
        let text = NAMESPACES.replace(
            "    istio.io/dataplane-mode: ambient\n",
            "    istio.io/dataplane-mode: ambient\n    istio.io/use-waypoint: old # was\n",
        );
        let (how, out) = label(&text, "demo", &[]);
        assert_eq!(how, EditKind::InPlace);
        assert!(
            out.contains("    istio.io/use-waypoint: waypoint\n"),
            "{out}"
        );
        assert!(!out.contains("old"), "{out}");
    }

    #[test]
    fn layouts_it_cannot_edit_by_line_are_rewritten_keeping_leading_comments() {
        let flow =
            "# legacy\napiVersion: v1\nkind: Namespace\nmetadata: {name: legacy, labels: {a: b}}\n";
        let (how, out) = label(flow, "legacy", &[]);
        assert_eq!(how, EditKind::Rewritten);
        assert!(out.starts_with("# legacy\napiVersion: v1\n"), "{out}");
        let value: Value = serde_yaml::from_str(&out).expect("yaml");
        assert_eq!(value["metadata"]["labels"]["a"], "b");

        let pointed = NAMESPACES.replace(
            "    istio.io/dataplane-mode: ambient\n",
            "    istio.io/dataplane-mode: ambient\n    istio.io/use-waypoint-namespace: other\n",
        );
        let (how, out) = label(&pointed, "demo", &["istio.io/use-waypoint-namespace"]);
        assert_eq!(how, EditKind::Rewritten);
        assert!(!out.contains("use-waypoint-namespace"), "{out}");
        assert!(out.ends_with("---\napiVersion: v1\nkind: Namespace\nmetadata:\n  name: legacy\n"));
    }

    #[test]
    fn an_object_inside_a_list_is_refused() {
        let list = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Namespace\n  metadata: {name: demo}\n";
        let segments = Segments::split("l.yaml", list).expect("split");
        let err = segments
            .find("Namespace demo", is_namespace("demo"))
            .expect_err("refused");
        assert!(
            format!("{err:#}").contains("l.yaml doc 1: Namespace demo is an item of a List"),
            "{err:#}"
        );
    }

    #[test]
    fn a_removed_document_takes_its_comments_and_leaves_the_rest() {
        let mut segments = Segments::split("ns.yaml", NAMESPACES).expect("split");
        segments.remove(1);
        assert_eq!(
            segments.render(),
            NAMESPACES.split("---\n").next().expect("first")
        );
        segments.remove(0);
        assert!(segments.is_empty());
    }
}
