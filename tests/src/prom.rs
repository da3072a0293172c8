//! Reading Prometheus text exposition (what `Mesh::metrics` returns) in assertions.

use std::collections::BTreeMap;

/// One sample line: `name{labels} value`.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    /// Metric name as exposed (counters end in `_total`).
    pub name: String,
    /// Label pairs, unescaped.
    pub labels: BTreeMap<String, String>,
    /// The value.
    pub value: f64,
}

/// Parses every sample line; comments and lines that do not parse are skipped.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(parse_line)
        .collect()
}

/// Sum of the samples named `name` whose labels include all of `labels`, e.g.
/// `sum(&text, "istio_tcp_connections_opened_total", &[("reporter", "destination")])`.
/// Zero when nothing matches, which is what a counter that was never incremented reads as.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    parse(text)
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            labels
                .iter()
                .all(|(k, v)| s.labels.get(*k).is_some_and(|have| have == v))
        })
        .map(|s| s.value)
        .sum()
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(inner) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(inner)?;
        labels = parsed;
        rest = after;
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",k2="v2"}` and returns the labels and what follows the closing brace.
fn parse_labels(mut s: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        s = s.trim_start_matches([' ', ',']);
        if let Some(after) = s.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = s.find('=')?;
        let key = s[..eq].trim().to_owned();
        s = s[eq + 1..].trim_start().strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => match chars.next()? {
                    (_, 'n') => value.push('\n'),
                    (_, other) => value.push(other),
                },
                c => value.push(c),
            }
        };
        labels.insert(key, value);
        s = &s[end + 1..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP istio_tcp_connections_opened_total Connections opened.
# TYPE istio_tcp_connections_opened_total counter
istio_tcp_connections_opened_total{reporter="source",source_workload="client"} 2
istio_tcp_connections_opened_total{reporter="destination",source_workload="client"} 3
istio_tcp_connections_opened_total{reporter="destination",source_workload="other"} 4
istio_tcp_sent_bytes_total{reporter="destination",note="a \"quoted\", value"} 10.5
up 1
not a sample line
"#;

    fn check(name: &str, labels: &[(&str, &str)], expected: f64) {
        assert_eq!(sum(TEXT, name, labels), expected, "{name} {labels:?}");
    }

    #[test]
    fn samples_are_summed_over_the_labels_not_named() {
        check("istio_tcp_connections_opened_total", &[], 9.0);
        check(
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination")],
            7.0,
        );
        check(
            "istio_tcp_connections_opened_total",
            &[("reporter", "destination"), ("source_workload", "client")],
            3.0,
        );
        check(
            "istio_tcp_connections_opened_total",
            &[("reporter", "x")],
            0.0,
        );
        check(
            "istio_tcp_sent_bytes_total",
            &[("note", "a \"quoted\", value")],
            10.5,
        );
        check("up", &[], 1.0);
        check("missing_total", &[], 0.0);
    }
}
