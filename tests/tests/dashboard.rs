//! The node dashboard end to end: `/stats` and `/dashboard` on each agent's metrics port,
//! after real traffic through the mesh, and the page rendered by a headless Chromium inside
//! the node's network namespace.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use e2e::{echo_once, eventually, wait_until, Mesh, Pod};
use serde_json::Value;

/// How long a counter or a config change may take to show in `/stats`.
const SETTLE: Duration = Duration::from_secs(10);
/// Successful connections from `client` to the server.
const ALLOWED: u64 = 3;

/// `client` and `intruder` on n1, `server` (app `echo`) on n2; a policy on the server denies
/// the `intruder` service account.
fn dashboard_mesh(name: &str) -> Result<Mesh> {
    Mesh::two_nodes(name)
        .pod(
            Pod::new("default", "intruder")
                .on("n1")
                .service_account("intruder"),
        )
        .pod(Pod::echo_server("server", "n2"))
        .yaml(
            "deny-intruder.yaml",
            "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-intruder\n  namespace: default\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/intruder\"]\n",
        )
        .build()
}

fn stats(mesh: &Mesh, node: &str) -> Result<Value> {
    let r = mesh.metrics_port_get(node, "/stats")?;
    ensure!(r.status == 200, "/stats on {node}: status {}", r.status);
    ensure!(
        r.header("content-type") == Some("application/json"),
        "/stats content type {:?}",
        r.header("content-type")
    );
    r.json()
}

fn direction<'a>(stats: &'a Value, dir: &str) -> Result<&'a Value> {
    stats["directions"]
        .as_array()
        .and_then(|d| d.iter().find(|d| d["direction"] == dir))
        .with_context(|| format!("no {dir} direction in {stats}"))
}

fn counter(stats: &Value, dir: &str, field: &str) -> Result<u64> {
    direction(stats, dir)?[field]
        .as_u64()
        .with_context(|| format!("{dir}.{field} in {stats}"))
}

fn pod<'a>(stats: &'a Value, name: &str) -> Option<&'a Value> {
    stats["pods"].as_array()?.iter().find(|p| p["name"] == name)
}

fn refusals(stats: &Value, dir: &str, reason: &str) -> u64 {
    stats["refusals"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["direction"] == dir && r["reason"] == reason)
        .filter_map(|r| r["count"].as_u64())
        .sum()
}

#[test]
fn stats_report_pods_connections_and_refusals_and_the_page_polls_them() -> Result<()> {
    let mesh = dashboard_mesh("dashboard")?;
    let _echo = mesh.spawn_echo("default/server", 8080, "server")?;
    let server = SocketAddr::new(mesh.pod_ip("default/server")?.into(), 8080);

    let n1 = stats(&mesh, "n1")?;
    ensure!(n1["node"] == "n1", "node {}", n1["node"]);
    ensure!(n1["ready"] == true, "n1 not ready: {n1}");
    let backend = n1["backend"].as_str().unwrap_or_default();
    ensure!(
        ["eBPF", "nftables"].contains(&backend),
        "backend {backend:?}"
    );
    for name in ["default/client", "default/intruder"] {
        let p = pod(&n1, name).with_context(|| format!("{name} not listed on n1: {n1}"))?;
        ensure!(p["state"] == "enrolled", "{name}: {p}");
        let ip = mesh.pod_ip(name)?.to_string();
        ensure!(
            p["ips"]
                .as_array()
                .is_some_and(|ips| ips.iter().any(|i| *i == *ip)),
            "{name}: ips {} (want {ip})",
            p["ips"]
        );
    }
    ensure!(
        pod(&n1, "default/server").is_none(),
        "n1 lists n2's pod: {n1}"
    );
    let client = pod(&n1, "default/client").context("client")?;
    ensure!(
        client["identity"] == "spiffe://cluster.local/ns/default/sa/client",
        "client identity {}",
        client["identity"]
    );

    tracing_note("sending allowed requests from client, one denied from intruder");
    for i in 0..ALLOWED {
        let r = mesh.http_get("default/client", server, &format!("/dash/{i}"))?;
        ensure!(r.status == 200, "request {i}: status {}", r.status);
    }
    let denied = mesh.echo_roundtrip("default/intruder", server, b"let me in");
    ensure!(
        !matches!(&denied, Ok(back) if back == b"let me in"),
        "intruder reached the server"
    );

    // Destination side: n2 counts the allowed connections inbound, the denial as DENY, and
    // the certificate it holds for the server.
    let n2 = settle("n2's /stats to count the traffic", || {
        let s = stats(&mesh, "n2")?;
        let done = counter(&s, "inbound", "opened")? > ALLOWED
            && counter(&s, "inbound", "open")? == 0
            && refusals(&s, "inbound", "DENY") >= 1;
        Ok((done, s))
    })?;
    ensure!(
        counter(&n2, "inbound", "opened")? == ALLOWED + 1,
        "n2 inbound opened (3 allowed + 1 denied): {n2}"
    );
    ensure!(
        counter(&n2, "inbound", "refused")? == 1,
        "n2 inbound refused: {n2}"
    );
    ensure!(
        counter(&n2, "inbound", "received_bytes")? > 0,
        "no bytes: {n2}"
    );
    let server_pod = pod(&n2, "default/server").context("server on n2")?;
    ensure!(server_pod["state"] == "enrolled", "server: {server_pod}");
    ensure!(
        n2["certificates"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c["identity"]
                == "spiffe://cluster.local/ns/default/sa/server"
                && c["expires_in_s"].as_i64().is_some_and(|s| s > 3600))),
        "server certificate: {}",
        n2["certificates"]
    );
    let talkers = n2["top_talkers"].as_array().context("top_talkers")?;
    ensure!(
        talkers
            .iter()
            .any(|t| t["source"] == "cluster.local/ns/default/sa/client"
                && t["destination"] == "cluster.local/ns/default/sa/server"
                && t["connections"] == ALLOWED
                && t["bytes"].as_u64().is_some_and(|b| b > 0)),
        "top talkers: {talkers:?}"
    );
    ensure!(
        n2["workloads"].as_array().is_some_and(|w| w
            .iter()
            .any(|w| w["workload"] == "default/echo" && w["direction"] == "inbound")),
        "workloads: {}",
        n2["workloads"]
    );
    ensure!(
        n2["process"]["rss_bytes"].as_u64().is_some_and(|r| r > 0),
        "process: {}",
        n2["process"]
    );

    // Source side: n1 counts the same connections outbound, the denial as UAEX.
    let n1 = settle("n1's /stats to count the traffic", || {
        let s = stats(&mesh, "n1")?;
        Ok((counter(&s, "outbound", "opened")? > ALLOWED, s))
    })?;
    ensure!(
        counter(&n1, "outbound", "opened")? == ALLOWED + 1,
        "n1 outbound opened: {n1}"
    );
    ensure!(
        refusals(&n1, "outbound", "UAEX") == 1,
        "n1 refusals: {}",
        n1["refusals"]
    );

    // An open connection shows as open, on the pod and in the direction's totals.
    let mut held = mesh.connect("default/client", server)?;
    echo_once(&mut held, b"held open")?;
    settle("the held connection to show as open", || {
        let s = stats(&mesh, "n2")?;
        let on_pod = pod(&s, "default/server").and_then(|p| p["open_connections"].as_u64());
        // The pod's count is of TCP connections on its listeners: the pooled HBONE
        // connection from n1 is one of them, however many streams it carries.
        let open = counter(&s, "inbound", "open")? == 1 && on_pod.is_some_and(|n| n >= 1);
        Ok((open, s))
    })?;
    drop(held);
    wait_until("the held connection to close", SETTLE, || {
        Ok(counter(&stats(&mesh, "n2")?, "inbound", "open")? == 0)
    })?;

    // The page: HTML, self-contained, polling /stats.
    let page = mesh.metrics_port_get("n1", "/dashboard")?;
    ensure!(page.status == 200, "/dashboard status {}", page.status);
    ensure!(
        page.header("content-type")
            .is_some_and(|c| c.starts_with("text/html")),
        "content type {:?}",
        page.header("content-type")
    );
    let html = page.text();
    ensure!(html.starts_with("<!doctype html>"), "not HTML");
    ensure!(
        html.contains("fetch(\"/stats\""),
        "page does not poll /stats"
    );
    ensure!(!html.contains("https://"), "page loads something external");

    // A pod the agent cannot enroll (no network namespace) is listed as pending and takes
    // readiness down.
    mesh.write_yaml(
        "ghost.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: ghost\n  namespace: default\nspec:\n  nodeName: n1\n  serviceAccountName: ghost\n  containers: [{name: app, image: none}]\nstatus:\n  podIP: 10.244.1.250\n",
    )?;
    let n1 = settle("the ghost pod to be pending", || {
        let s = stats(&mesh, "n1")?;
        let pending = pod(&s, "default/ghost")
            .and_then(|p| p["state"].as_str())
            .is_some_and(|st| st.starts_with("pending"));
        Ok((pending, s))
    })?;
    ensure!(n1["ready"] == false, "n1 ready with a pending pod: {n1}");
    mesh.remove_yaml("ghost.yaml")?;
    wait_until("n1 to be ready again", SETTLE, || {
        Ok(stats(&mesh, "n1")?["ready"] == true)
    })?;
    Ok(())
}

/// The page as a browser renders it: Chromium, headless, inside n2's namespace, loading
/// `/dashboard` from the agent; the DOM after the page's polls must hold the pods, the
/// counters `/stats` reports and the refusal.
#[test]
fn the_page_renders_the_stats_in_a_headless_browser() -> Result<()> {
    let Some(chromium) = chromium()? else {
        return Ok(());
    };
    let mesh = dashboard_mesh("dashboard_browser")?;
    let _echo = mesh.spawn_echo("default/server", 8080, "server")?;
    let server = SocketAddr::new(mesh.pod_ip("default/server")?.into(), 8080);
    for i in 0..ALLOWED {
        let r = mesh.http_get("default/client", server, &format!("/dom/{i}"))?;
        ensure!(r.status == 200, "request {i}: status {}", r.status);
    }
    let _ = mesh.echo_roundtrip("default/intruder", server, b"let me in");
    let stats = settle("n2 to count the traffic", || {
        let s = stats(&mesh, "n2")?;
        let done = counter(&s, "inbound", "opened")? == ALLOWED + 1
            && counter(&s, "inbound", "open")? == 0
            && refusals(&s, "inbound", "DENY") == 1;
        Ok((done, s))
    })?;
    let opened = counter(&stats, "inbound", "opened")?;

    let profile = mesh.work_dir().join("chromium-profile");
    std::fs::create_dir_all(&profile)?;
    let profile_arg = format!("--user-data-dir={}", profile.display());
    let out = mesh.exec_node(
        "n2",
        &[
            &chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--no-default-browser-check",
            &profile_arg,
            // Virtual time runs the page's timers (two polls) without waiting in real time,
            // and waits for each fetch to finish.
            "--virtual-time-budget=5000",
            "--dump-dom",
            "http://127.0.0.1:15020/dashboard",
        ],
    )?;
    let dom = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && !dom.is_empty(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let has = |needle: &str| dom.contains(needle);
    ensure!(
        !has("data-samples=\"0\""),
        "the page never rendered a sample:\n{dom}"
    );
    for needle in [
        "<b id=\"node\">n2</b>",
        "<td>default/server</td>",
        "<td>spiffe://cluster.local/ns/default/sa/server</td>",
        "<td>cluster.local/ns/default/sa/client</td>",
        "<td class=\"bad\">DENY</td>",
        "class=\"ok\">ready</b>",
    ] {
        ensure!(has(needle), "rendered page lacks {needle:?}:\n{dom}");
    }
    // The inbound row: direction, open, opened.
    let row = format!("<td>inbound</td><td class=\"n\">0</td><td class=\"n\">{opened}</td>");
    ensure!(has(&row), "rendered page lacks {row:?}:\n{dom}");
    ensure!(
        has("<span id=\"error\"></span>"),
        "the page failed to poll:\n{dom}"
    );
    Ok(())
}

/// The Chromium binary, if installed. CI (`CI` set) must have it: `.ci/run` installs it.
fn chromium() -> Result<Option<String>> {
    for name in ["chromium", "chromium-browser"] {
        let found = std::process::Command::new(name)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
        if found {
            return Ok(Some(name.to_owned()));
        }
    }
    if std::env::var_os("CI").is_some() {
        bail!("chromium not installed (apt-get install chromium; .ci/run does)");
    }
    eprintln!("chromium not installed: the rendered page is not checked");
    Ok(None)
}

/// Polls `/stats` through `check` until it says done; the error quotes the last stats.
fn settle(what: &str, mut check: impl FnMut() -> Result<(bool, Value)>) -> Result<Value> {
    eventually(what, SETTLE, || match check()? {
        (true, stats) => Ok(stats),
        (false, last) => Err(anyhow::anyhow!("not yet; last /stats: {last}")),
    })
}

fn tracing_note(what: &str) {
    eprintln!("dashboard test: {what}");
}
