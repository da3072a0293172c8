//! Checks the Grafana dashboards in `manifests/dashboards/`: valid JSON of the shape Grafana
//! imports, every panel on the `${datasource}` variable, only the variables the dashboard
//! defines (plus Grafana's `$__rate_interval` and `$__range`), only metric names the agent's
//! registry exports, and every query valid PromQL by `promtool check rules` (each `expr`, with
//! the variables substituted, becomes a recording rule).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

/// What Grafana's own variables are replaced with for promtool.
const GRAFANA_VARIABLES: [(&str, &str); 2] = [("$__rate_interval", "1m"), ("$__range", "1h")];

/// One query of one panel.
#[derive(Debug, PartialEq, Eq)]
pub struct Query {
    pub panel: String,
    pub ref_id: String,
    pub expr: String,
}

/// Checks every `*.json` in `dir`; returns how many queries were checked.
pub fn check_dir(dir: &Path) -> Result<usize> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    ensure!(
        !files.is_empty(),
        "no dashboards (*.json) in {}",
        dir.display()
    );
    let known = exported_metrics();
    let mut all = Vec::new();
    for file in &files {
        let text =
            std::fs::read_to_string(file).with_context(|| format!("read {}", file.display()))?;
        let queries = check_dashboard(&text, &known)
            .with_context(|| format!("dashboard {}", file.display()))?;
        all.extend(queries);
    }
    promtool_check(&all)?;
    Ok(all.len())
}

/// The metric names (as scraped) of the agent's registry.
fn exported_metrics() -> BTreeSet<String> {
    mesh_telemetry::Metrics::new()
        .encode_text()
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// The structural checks of one dashboard; returns its queries with variables substituted.
pub fn check_dashboard(text: &str, known_metrics: &BTreeSet<String>) -> Result<Vec<Query>> {
    let d: Value = serde_json::from_str(text).context("not valid JSON")?;
    for key in ["uid", "title"] {
        ensure!(
            d[key].as_str().is_some_and(|s| !s.is_empty()),
            "missing {key}"
        );
    }
    ensure!(
        d["schemaVersion"].as_u64().is_some(),
        "missing schemaVersion"
    );
    let vars = d["templating"]["list"]
        .as_array()
        .context("no templating.list")?;
    let mut substitutions: Vec<(String, String)> = Vec::new();
    for v in vars {
        let name = v["name"].as_str().context("a variable without a name")?;
        // A query variable's "all" is a regex of its values; `.*` stands in for promtool.
        substitutions.push((format!("${name}"), ".*".to_owned()));
        substitutions.push((format!("${{{name}}}"), ".*".to_owned()));
    }
    ensure!(
        vars.iter()
            .any(|v| v["name"] == "datasource" && v["type"] == "datasource"),
        "no `datasource` variable"
    );
    ensure!(
        vars.iter()
            .any(|v| v["name"] == "node" || v["name"] == "instance"),
        "no `node` or `instance` variable"
    );
    for (k, v) in GRAFANA_VARIABLES {
        substitutions.push((k.to_owned(), v.to_owned()));
    }
    // Longest first, so `$node` does not eat the start of `$nodes`.
    substitutions.sort_by_key(|s| std::cmp::Reverse(s.0.len()));

    let panels = d["panels"].as_array().context("no panels")?;
    let mut ids = BTreeSet::new();
    let mut queries = Vec::new();
    for p in panels {
        let title = p["title"].as_str().unwrap_or_default().to_owned();
        let id = p["id"]
            .as_u64()
            .with_context(|| format!("panel {title:?}: no id"))?;
        ensure!(ids.insert(id), "panel id {id} used twice");
        let grid = &p["gridPos"];
        let (x, w) = (grid["x"].as_u64(), grid["w"].as_u64());
        ensure!(
            matches!((x, w), (Some(x), Some(w)) if w > 0 && x + w <= 24),
            "panel {title:?}: gridPos {grid} outside the 24 columns"
        );
        if p["type"] == "row" {
            continue;
        }
        ensure!(
            p["datasource"]["uid"] == "${datasource}",
            "panel {title:?}: datasource is not the `datasource` variable"
        );
        let targets = p["targets"]
            .as_array()
            .filter(|t| !t.is_empty())
            .with_context(|| format!("panel {title:?}: no queries"))?;
        for t in targets {
            let ref_id = t["refId"].as_str().unwrap_or("?").to_owned();
            let raw = t["expr"]
                .as_str()
                .with_context(|| format!("panel {title:?} query {ref_id}: no expr"))?;
            let mut expr = raw.to_owned();
            for (k, v) in &substitutions {
                expr = expr.replace(k.as_str(), v);
            }
            ensure!(
                !expr.contains('$'),
                "panel {title:?} query {ref_id}: undefined variable in {raw:?}"
            );
            for metric in metric_names(&expr) {
                ensure!(
                    known_metrics.contains(&metric),
                    "panel {title:?} query {ref_id}: {metric} is not exported by the agent"
                );
            }
            queries.push(Query {
                panel: title.clone(),
                ref_id,
                expr,
            });
        }
    }
    ensure!(!queries.is_empty(), "no queries");
    Ok(queries)
}

/// Identifiers directly followed by a selector (`name{`): the metrics a query reads. Every
/// query here selects with labels, so this finds them all without a PromQL parser.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = expr.as_bytes();
    for (i, _) in expr.match_indices('{') {
        let start = bytes[..i]
            .iter()
            .rposition(|b| !(b.is_ascii_alphanumeric() || *b == b'_' || *b == b':'))
            .map_or(0, |p| p + 1);
        if start < i {
            out.insert(expr[start..i].to_owned());
        }
    }
    out
}

/// `promtool check rules` over one recording rule per query. Without promtool the queries are
/// not parsed, which CI (`CI` set; `.ci/run` installs it) does not accept.
fn promtool_check(queries: &[Query]) -> Result<()> {
    if Command::new("promtool").arg("--version").output().is_err() {
        if std::env::var_os("CI").is_some() {
            bail!("promtool not found (Debian package prometheus; .ci/run installs it)");
        }
        eprintln!("xtask: promtool not found; dashboard queries not parsed");
        return Ok(());
    }
    let rules: Vec<Value> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| serde_json::json!({ "record": format!("dashboard:query_{i}"), "expr": q.expr }))
        .collect();
    let file = serde_json::json!({ "groups": [{ "name": "dashboards", "rules": rules }] });
    // One directory per check: tests run checks concurrently in one process.
    static CHECKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = CHECKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("xtask-dashboards-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = dir.join("rules.yaml");
    // JSON is YAML.
    std::fs::write(&path, serde_json::to_vec_pretty(&file)?)
        .with_context(|| format!("write {}", path.display()))?;
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&path)
        .output()
        .context("run promtool");
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    if !out.status.success() {
        let report = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        let listing: Vec<String> = queries
            .iter()
            .enumerate()
            .map(|(i, q)| format!("  query_{i}: {} / {}: {}", q.panel, q.ref_id, q.expr))
            .collect();
        bail!(
            "promtool check rules failed:\n{report}\n{}",
            listing.join("\n")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> BTreeSet<String> {
        exported_metrics()
    }

    #[test]
    fn the_shipped_dashboards_pass() {
        let dir = crate::workspace_root().join("manifests/dashboards");
        let n = check_dir(&dir).expect("dashboards");
        assert!(n >= 10, "only {n} queries");
    }

    #[test]
    fn the_registry_names_the_metrics_the_dashboard_uses() {
        let k = known();
        for name in [
            "istio_tcp_connections_opened_total",
            "istio_tcp_sent_bytes_total",
            "mesh_connections_refused_total",
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
        ] {
            assert!(k.contains(name), "{name} not in {k:?}");
        }
    }

    fn dashboard(expr: &str) -> String {
        serde_json::json!({
            "uid": "u", "title": "t", "schemaVersion": 39,
            "templating": {"list": [
                {"name": "datasource", "type": "datasource"},
                {"name": "node", "type": "query"}
            ]},
            "panels": [{
                "id": 1, "type": "timeseries", "title": "p",
                "datasource": {"uid": "${datasource}"},
                "gridPos": {"x": 0, "y": 0, "w": 12, "h": 8},
                "targets": [{"refId": "A", "expr": expr}]
            }]
        })
        .to_string()
    }

    fn check(expr: &str, want_error: Option<&str>) {
        let got = check_dashboard(&dashboard(expr), &known());
        match (want_error, got) {
            (None, Ok(q)) => assert!(!q[0].expr.contains('$'), "{q:?}"),
            (Some(want), Err(e)) => {
                let e = format!("{e:#}");
                assert!(e.contains(want), "{expr}: {e}");
            }
            (want, got) => panic!("{expr}: want {want:?}, got {got:?}"),
        }
    }

    #[test]
    fn queries_are_checked_for_variables_and_metric_names() {
        check(
            r#"sum(rate(istio_tcp_connections_opened_total{node=~"$node"}[$__rate_interval]))"#,
            None,
        );
        check(
            r#"istio_tcp_connections_opened_total{node=~"${node}"}"#,
            None,
        );
        check(
            r#"istio_tcp_connections_opened_total{pod=~"$pod"}"#,
            Some("undefined variable"),
        );
        check(
            r#"istio_tcp_conections_opened_total{node=~"$node"}"#,
            Some("is not exported"),
        );
        assert!(check_dashboard("{not json", &known()).is_err());
    }

    #[test]
    fn promtool_refuses_a_query_that_does_not_parse() {
        if Command::new("promtool").arg("--version").output().is_err() {
            eprintln!("promtool not installed");
            return;
        }
        let bad = Query {
            panel: "p".into(),
            ref_id: "A".into(),
            expr: "sum(rate(x_total[1m])".into(),
        };
        let e = promtool_check(&[bad]).expect_err("unbalanced parenthesis");
        assert!(format!("{e:#}").contains("query_0: p / A"), "{e:#}");
    }

    #[test]
    fn metric_names_are_the_identifiers_before_selectors() {
        let names = metric_names(
            r#"sum by (a) (rate(x_total{a="1"}[1m])) - ns:rule{b="{"} + label_replace(y{}, "d", "e", "f", "g")"#,
        );
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            ["ns:rule", "x_total", "y"]
        );
    }
}
