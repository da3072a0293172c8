//! Turning a [`Report`] and a running mesh into the text `cargo xtask up` prints. Pure string
//! building, so the wording the README quotes is tested.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use super::config::{IngressProbe, Target};
use super::run::{curl_argv, CaReport, ProbeReport, Report, Response, Running, Wire};

/// Longest access-log line shown (the full line is in the log file).
const MAX_LOG_LINE: usize = 240;

/// What each probe did, then the per-node connection counters.
pub fn render(report: &Report) -> String {
    let mut out = String::new();
    if report.probes.is_empty() {
        out.push_str(
            "No traffic declared: annotate a pod with local-mesh/send-to (see \
             examples/local-mesh/README.md).\n",
        );
    }
    for probe in &report.probes {
        render_probe(&mut out, probe);
        out.push('\n');
    }
    out.push_str("istio_tcp_connections_opened_total per node:\n");
    for (node, by_reporter) in &report.opened {
        let total: u64 = by_reporter.values().sum();
        let parts: Vec<String> = by_reporter
            .iter()
            .map(|(reporter, n)| format!("{reporter} {n}"))
            .collect();
        let _ = writeln!(out, "  {node}: {total} ({})", parts.join(", "));
    }
    out.push('\n');
    render_ca(&mut out, &report.ca);
    out
}

/// "Certificates issued": who asked the CA for which identity and on what grounds, what it
/// refused, and whether any agent holds a signing key.
fn render_ca(out: &mut String, ca: &CaReport) {
    let Some(address) = &ca.address else {
        let _ = writeln!(
            out,
            "Certificates: no CA service; every agent signs with the CA directory (--ca-dir)"
        );
        return;
    };
    let _ = writeln!(
        out,
        "Certificates issued by the CA (control at {address}, netns {}; the only process with \
         the signing key):",
        ca.netns
    );
    if ca.issued.is_empty() {
        out.push_str("  none\n");
    }
    for i in &ca.issued {
        let grant = match i.grant.as_str() {
            "node" => "node: a pod on the agent's node",
            "own" => "own: the caller's identity",
            other => other,
        };
        let _ = writeln!(
            out,
            "  {} asked for {} -> issued (grant {grant}), serial {}, until {}",
            i.caller, i.identity, i.serial, i.not_after
        );
    }
    if ca.refused.is_empty() {
        out.push_str("  refused: none\n");
    } else {
        let parts: Vec<String> = ca
            .refused
            .iter()
            .map(|(reason, n)| format!("{reason} {n}"))
            .collect();
        let _ = writeln!(
            out,
            "  refused: {} (mesh_ca_requests_refused_total by reason)",
            parts.join(", ")
        );
    }
    if ca.agents_with_ca_dir.is_empty() {
        let _ = writeln!(
            out,
            "  the node agents ({}) and the waypoints hold no signing key: they present a token \
             to the CA (--ca-address, no --ca-dir); workload keys stay in their memory",
            ca.agents_with_ca_address.join(", ")
        );
    } else {
        let _ = writeln!(
            out,
            "  NOT AS EXPECTED: the agents of {} run with a CA directory (a signing key)",
            ca.agents_with_ca_dir.join(", ")
        );
    }
}

fn render_probe(out: &mut String, probe: &ProbeReport) {
    let _ = writeln!(out, "{} -> {} ({})", probe.client, probe.target, probe.addr);

    let answers: Vec<String> = probe
        .responses
        .iter()
        .map(|r| match r {
            Response::Http {
                status,
                server: Some(server),
            } => format!("{status} from {server}"),
            Response::Http {
                status,
                server: None,
            } => status.to_string(),
            Response::Failed(why) => format!("refused ({why})"),
        })
        .collect();
    let servers: std::collections::BTreeSet<&str> = probe
        .responses
        .iter()
        .filter_map(|r| match r {
            Response::Http { server, .. } => server.as_deref(),
            Response::Failed(_) => None,
        })
        .collect();
    let round_robin = if servers.len() > 1 {
        " (round robin)"
    } else {
        ""
    };
    let _ = writeln!(out, "  {}{round_robin}", answers.join(", "));

    // One line per (source, destination, security), with each node's count.
    let mut flows: BTreeMap<(&str, &str, &str), Vec<String>> = BTreeMap::new();
    for f in &probe.flows {
        flows
            .entry((&f.source_principal, &f.destination_principal, &f.security))
            .or_default()
            .push(format!("{} opened {} ({})", f.node, f.count, f.reporter));
    }
    for ((src, dst, security), counts) in &flows {
        // The agents label a connection `unknown` unless it completed mTLS (a refused
        // tunnel, plaintext from outside the mesh).
        let how = if *security == "mutual_tls" {
            "over HBONE"
        } else {
            "without mTLS"
        };
        let _ = writeln!(
            out,
            "  {how} {src} -> {dst} ({security}): {}",
            counts.join(", ")
        );
    }
    for r in &probe.refusals {
        let _ = writeln!(
            out,
            "  {}: mesh_connections_refused_total{{reason=\"{}\"}} +{} (reporter={})",
            r.node, r.reason, r.count, r.reporter
        );
    }
    for w in &probe.waypoint_requests {
        let flags = if w.response_flags == "-" {
            String::new()
        } else {
            format!(", flags {}", w.response_flags)
        };
        let _ = writeln!(
            out,
            "  {}: istio_requests_total{{response_code=\"{}\"}} +{} ({} -> {}{flags})",
            w.waypoint, w.response_code, w.count, w.source_principal, w.destination_service
        );
    }
    for (node, line) in &probe.access_log {
        let _ = writeln!(
            out,
            "  {node} access log: {}",
            shorten(line.trim(), MAX_LOG_LINE)
        );
    }
    if probe.flows.is_empty() && probe.refusals.is_empty() && probe.waypoint_requests.is_empty() {
        out.push_str("  no node agent counted this traffic\n");
    }
    let _ = writeln!(out, "  {}", describe_wire(&probe.wire, probe));
    match (probe.met(), probe.expect) {
        (Some(true), Some(expect)) => {
            let _ = writeln!(out, "  as expected ({expect})");
        }
        (Some(false), Some(expect)) => {
            let _ = writeln!(out, "  NOT AS EXPECTED: the YAML expects {expect}");
        }
        _ => {}
    }
}

fn describe_wire(wire: &Wire, probe: &ProbeReport) -> String {
    if wire.packets == 0 {
        return "nothing crossed the wire between the nodes".to_owned();
    }
    if wire.only_hbone() {
        return "wire carried only TCP to 15008 (TLS); 0 bytes of application data in clear"
            .to_owned();
    }
    let ports: Vec<String> = wire.server_ports.iter().map(u16::to_string).collect();
    let mut text = format!(
        "wire carried TCP to port(s) {}; {} bytes of application data in clear",
        ports.join(", "),
        wire.clear_bytes
    );
    if wire.request_in_clear {
        text.push_str(", the request readable on the wire");
    }
    if !probe.client_in_mesh {
        let _ = write!(text, " ({} is outside the mesh)", probe.client);
    }
    text
}

fn shorten(line: &str, max: usize) -> String {
    if line.chars().count() <= max {
        return line.to_owned();
    }
    let cut: String = line.chars().take(max).collect();
    format!("{cut}…")
}

/// Where everything is, and how to look at it.
pub fn whereabouts(running: &Running, state_file: Option<&Path>) -> String {
    let mesh = running.mesh();
    let config = running.config();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "The mesh (network namespaces prefixed {}):",
        mesh.prefix()
    );
    let capture = match (mesh.redirect(), mesh.bpf_fs()) {
        (Some(e2e::Redirect::Ebpf), Some(fs)) => format!(
            "eBPF sk_lookup + policy routing per pod (pins under {}/ztunnel; \
             E2E_REDIRECT=nftables for the fallback)",
            fs.display()
        ),
        (Some(e2e::Redirect::Nftables), _) => "nftables rules per pod".to_owned(),
        _ => "as the ztunnel arguments say".to_owned(),
    };
    let _ = writeln!(out, "  capture     {capture}");
    let _ = writeln!(
        out,
        "  config dir  {}  <- live: edit or add YAML here, the agents reload within 1 s",
        mesh.config_dir().display()
    );
    if let Some(source) = running.config_source() {
        let _ = writeln!(
            out,
            "  source      {}  <- policy edits here are copied to the config dir while `up` runs",
            source.display()
        );
    }
    let logs = mesh.work_dir().join("logs");
    let _ = writeln!(out, "  logs        {}", logs.display());
    for node in &config.nodes {
        let _ = writeln!(
            out,
            "                ztunnel-{node}.log  (node agent {node}, access log included)"
        );
    }
    for (pod, label) in running.echo_servers() {
        let _ = writeln!(out, "                {label}.out  (mesh-echo in {pod})");
    }
    for wp in running.waypoints() {
        let _ = writeln!(
            out,
            "                {}.err  (waypoint {} in {}; access log if a Telemetry turns it on)",
            wp.proxy.log_label(),
            wp.gateway.key(),
            wp.proxy.pod
        );
    }
    for ingress in running.ingresses() {
        let _ = writeln!(
            out,
            "                {}.err  (ingress gateway {} in {}; access log if a Telemetry turns it on)",
            ingress.proxy.log_label(),
            ingress.gateway.key(),
            ingress.proxy.pod
        );
    }
    if let Some(state) = state_file {
        let _ = writeln!(out, "  state       {}", state.display());
    }
    for node in &config.nodes {
        let (Ok(netns), Ok(ip)) = (mesh.node_netns(node), mesh.node_ip(node)) else {
            continue;
        };
        let _ = writeln!(out, "  node {node}     netns {netns}, wire address {ip}");
        let _ = writeln!(
            out,
            "     admin    ip netns exec {netns} curl -s 127.0.0.1:15000/config_dump"
        );
        let _ = writeln!(
            out,
            "     metrics  ip netns exec {netns} curl -s 127.0.0.1:15020/metrics"
        );
        if let Some(f) = running.forwards().iter().find(|f| f.name == *node) {
            let _ = writeln!(
                out,
                "     dashboard {}  <- open in a browser on this machine (forwarded into the node while `up` runs)",
                f.dashboard_url()
            );
        }
        let _ = writeln!(
            out,
            "               ip netns exec {netns} curl -s 127.0.0.1:15020/dashboard  (its data: /stats)"
        );
    }
    if let Some(address) = report_ca_address(mesh) {
        let netns = mesh.control_netns();
        let _ = writeln!(
            out,
            "  CA          netns {netns}, {address} (gRPC CreateCertificate); log {}",
            logs.join("control.log").display()
        );
        let _ = writeln!(
            out,
            "     admin    ip netns exec {netns} curl -s 127.0.0.1:15000/config_dump  (what it issued, to whom)"
        );
        let _ = writeln!(
            out,
            "     metrics  ip netns exec {netns} curl -s 127.0.0.1:15020/metrics  (mesh_ca_*)"
        );
    }
    if !config.waypoints.is_empty() {
        out.push_str("  waypoints\n");
    }
    for decl in &config.waypoints {
        let services = config.services_using(decl);
        let used_by = if services.is_empty() {
            "no service uses it".to_owned()
        } else {
            format!("used by {}", services.join(", "))
        };
        let runs: Vec<_> = running
            .waypoints()
            .iter()
            .filter(|w| w.gateway == *decl)
            .collect();
        if runs.is_empty() {
            let _ = writeln!(
                out,
                "     {:<20} for {}, not running: no pod labelled {}={} ({used_by}; their \
                 connections fail)",
                decl.key(),
                decl.waypoint_for,
                mesh_model::model::GATEWAY_NAME_LABEL,
                decl.name
            );
        }
        for wp in runs {
            let Some((ip, netns, node)) = placed(running, &wp.proxy.pod) else {
                continue;
            };
            let _ = writeln!(
                out,
                "     {:<20} {ip:<12} on {node}  for {}, {used_by}",
                decl.key(),
                decl.waypoint_for
            );
            let _ = writeln!(out, "       identity {}", wp.proxy.identity());
            let _ = writeln!(
                out,
                "       metrics  ip netns exec {netns} curl -s 127.0.0.1:15020/metrics"
            );
        }
    }
    ingress_whereabouts(&mut out, running);
    out.push_str("  pods\n");
    for pod in &config.pods {
        let key = pod.key();
        let (Ok(ip), Ok(netns)) = (mesh.pod_ip(&key), mesh.pod_netns(&key)) else {
            continue;
        };
        let mut notes = vec![if let Some(gw) = &pod.gateway {
            let role = if config.ingress(&pod.namespace, gw).is_some() {
                "ingress gateway"
            } else {
                "waypoint"
            };
            format!("runs {role} {}/{gw}", pod.namespace)
        } else if running.in_mesh(pod) {
            "in the mesh".to_owned()
        } else {
            "outside the mesh".to_owned()
        }];
        if !pod.echo_ports.is_empty() {
            let ports: Vec<String> = pod.echo_ports.iter().map(|p| format!(":{p}")).collect();
            notes.push(format!("mesh-echo {}", ports.join(" ")));
        }
        let _ = writeln!(
            out,
            "     {key:<20} {ip:<12} on {}  netns {netns}  ({})",
            pod.node,
            notes.join(", ")
        );
    }
    if !config.services.is_empty() {
        out.push_str("  services\n");
        for svc in &config.services {
            let vip = svc
                .vip
                .map(|v| v.to_string())
                .unwrap_or_else(|| "no clusterIP".to_owned());
            let ports: Vec<String> = svc
                .ports
                .iter()
                .map(|p| format!("{}->{}", p.port, p.target_port))
                .collect();
            let _ = writeln!(
                out,
                "     {:<20} {vip:<12} ports {}",
                format!("{}/{}", svc.namespace, svc.name),
                ports.join(" ")
            );
        }
    }
    // A command to paste: the first probe that goes to a Service, from its pod.
    let first = config.pods.iter().find_map(|pod| {
        pod.probes.iter().find_map(|probe| match &probe.target {
            Target::Service { addr, .. } => Some((pod.key(), *addr)),
            _ => None,
        })
    });
    if let Some((pod, addr)) = first {
        if let Ok(netns) = mesh.pod_netns(&pod) {
            let _ = writeln!(
                out,
                "  try         ip netns exec {netns} curl -s http://{addr}/hello"
            );
        }
    }
    out
}

/// Each ingress gateway: where it runs, its identity, and per listener the local address it
/// is forwarded to with a `curl` to paste (the first probe for that port, else `/`).
fn ingress_whereabouts(out: &mut String, running: &Running) {
    let config = running.config();
    if config.ingresses.is_empty() {
        return;
    }
    out.push_str("  ingress gateways (Gateway class istio)\n");
    for decl in &config.ingresses {
        let Some(run) = running.ingresses().iter().find(|i| i.gateway == *decl) else {
            let _ = writeln!(
                out,
                "     {:<20} not running: no pod labelled {}={}",
                decl.key(),
                mesh_model::model::GATEWAY_NAME_LABEL,
                decl.name
            );
            continue;
        };
        let Some((ip, netns, node)) = placed(running, &run.proxy.pod) else {
            continue;
        };
        let _ = writeln!(out, "     {:<20} {ip:<12} on {node}", decl.key());
        let _ = writeln!(out, "       identity {}", run.proxy.identity());
        for listener in &decl.listeners {
            let Some(local) = run.local(listener.port) else {
                continue;
            };
            let host = listener.hostname.as_deref().map_or("any host", |h| h);
            let _ = writeln!(
                out,
                "       listener {} {} :{} ({host})  <- forwarded from {local}",
                listener.name,
                listener.scheme.as_str().to_ascii_uppercase(),
                listener.port
            );
        }
        for (port, scheme, forward) in &run.forwards {
            let probe = decl
                .probes
                .iter()
                .find(|p| p.port == *port)
                .cloned()
                .unwrap_or_else(|| IngressProbe {
                    text: String::new(),
                    scheme: *scheme,
                    host: decl
                        .listeners
                        .iter()
                        .find(|l| l.port == *port)
                        .and_then(|l| l.hostname.clone())
                        .filter(|h| !h.starts_with('*'))
                        .unwrap_or_else(|| "localhost".to_owned()),
                    port: *port,
                    path: "/".to_owned(),
                    headers: Vec::new(),
                    expect: None,
                });
            let argv = curl_argv(&probe, forward.local, running.ingress_ca(), None);
            let _ = writeln!(out, "       try      {}", shell_line(&argv));
        }
        let _ = writeln!(
            out,
            "       metrics  ip netns exec {netns} curl -s 127.0.0.1:15020/metrics"
        );
    }
    if let Some(ca) = running.ingress_ca() {
        let _ = writeln!(
            out,
            "     certificates made by `up` ({}) are signed by {}",
            super::run::CERTIFICATES_FILE,
            ca.display()
        );
    }
}

/// Where pod `pod` is: its IP, its network namespace and its node's name.
fn placed<'r>(running: &'r Running, pod: &str) -> Option<(std::net::Ipv4Addr, String, &'r str)> {
    let mesh = running.mesh();
    let (ip, netns) = (mesh.pod_ip(pod).ok()?, mesh.pod_netns(pod).ok()?);
    let node = running
        .config()
        .pods
        .iter()
        .find(|p| p.key() == pod)
        .map_or("?", |p| p.node.as_str());
    Some((ip, netns, node))
}

/// A command line as it would be typed: words with spaces or quotes single-quoted.
fn shell_line(argv: &[String]) -> String {
    argv.iter()
        .map(|word| {
            if word
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c))
            {
                word.clone()
            } else {
                format!("'{}'", word.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// The CA's address, when the mesh runs the CA service.
fn report_ca_address(mesh: &e2e::Mesh) -> Option<String> {
    (mesh.ca_mode() == e2e::CaMode::Service).then(|| mesh.ca_address())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local_mesh::config::Expect;
    use crate::local_mesh::run::{Flow, Refusal};

    fn probe(responses: Vec<Response>, expect: Expect, wire: Wire) -> ProbeReport {
        ProbeReport {
            client: "demo/sleep".into(),
            client_in_mesh: true,
            target: "echo.demo:80".into(),
            addr: "10.96.0.20:80".parse().expect("addr"),
            expect: Some(expect),
            responses,
            flows: Vec::new(),
            refusals: Vec::new(),
            access_log: Vec::new(),
            waypoint_requests: Vec::new(),
            wire,
        }
    }

    fn ok(server: &str) -> Response {
        Response::Http {
            status: 200,
            server: Some(server.into()),
        }
    }

    fn hbone_wire() -> Wire {
        Wire {
            packets: 20,
            server_ports: [15008].into(),
            clear_bytes: 0,
            request_in_clear: false,
        }
    }

    fn check(probe: ProbeReport, expected_lines: &[&str]) {
        let mut text = String::new();
        render_probe(&mut text, &probe);
        for line in expected_lines {
            assert!(
                text.lines().any(|l| l.trim() == *line),
                "missing line {line:?} in:\n{text}"
            );
        }
    }

    #[test]
    fn an_allowed_probe_names_the_replicas_the_identities_and_the_clean_wire() {
        let mut p = probe(
            vec![ok("echo-v1"), ok("echo-v2"), ok("echo-v1")],
            Expect::Status(200),
            hbone_wire(),
        );
        p.flows = vec![Flow {
            node: "n2".into(),
            reporter: "destination".into(),
            source_principal: "spiffe://cluster.local/ns/demo/sa/sleep".into(),
            destination_principal: "spiffe://cluster.local/ns/demo/sa/echo".into(),
            security: "mutual_tls".into(),
            count: 3,
        }];
        check(
            p,
            &[
                "demo/sleep -> echo.demo:80 (10.96.0.20:80)",
                "200 from echo-v1, 200 from echo-v2, 200 from echo-v1 (round robin)",
                "over HBONE spiffe://cluster.local/ns/demo/sa/sleep -> \
                 spiffe://cluster.local/ns/demo/sa/echo (mutual_tls): n2 opened 3 (destination)",
                "wire carried only TCP to 15008 (TLS); 0 bytes of application data in clear",
                "as expected (200)",
            ],
        );
    }

    #[test]
    fn a_refused_probe_shows_the_flag_and_the_plaintext_it_sent() {
        let mut p = probe(
            vec![Response::Failed("connection reset by peer".into())],
            Expect::Refused,
            Wire {
                packets: 8,
                server_ports: [8080].into(),
                clear_bytes: 95,
                request_in_clear: true,
            },
        );
        p.client = "legacy/curl".into();
        p.client_in_mesh = false;
        p.refusals = vec![Refusal {
            node: "n2".into(),
            reporter: "destination".into(),
            reason: "PEERAUTHN".into(),
            count: 1,
        }];
        check(
            p,
            &[
                "refused (connection reset by peer)",
                "n2: mesh_connections_refused_total{reason=\"PEERAUTHN\"} +1 (reporter=destination)",
                "wire carried TCP to port(s) 8080; 95 bytes of application data in clear, the \
                 request readable on the wire (legacy/curl is outside the mesh)",
                "as expected (refused)",
            ],
        );
    }

    #[test]
    fn the_ca_section_names_who_asked_for_what_and_that_agents_hold_no_key() {
        use crate::local_mesh::run::Issuance;
        let ca = CaReport {
            address: Some("https://10.255.0.253:15012".into()),
            netns: "mt123456-_control".into(),
            issued: vec![Issuance {
                caller: "istio-system/ztunnel @n1".into(),
                identity: "spiffe://cluster.local/ns/demo/sa/sleep".into(),
                grant: "node".into(),
                serial: "1a2b".into(),
                not_after: "2030-01-01T00:00:00Z".into(),
            }],
            refused: [("no_such_pod_on_node".to_owned(), 2)].into(),
            agents_with_ca_dir: Vec::new(),
            agents_with_ca_address: vec!["n1".into(), "n2".into()],
        };
        let mut text = String::new();
        render_ca(&mut text, &ca);
        for line in [
            "Certificates issued by the CA (control at https://10.255.0.253:15012, netns \
             mt123456-_control; the only process with the signing key):",
            "istio-system/ztunnel @n1 asked for spiffe://cluster.local/ns/demo/sa/sleep -> \
             issued (grant node: a pod on the agent's node), serial 1a2b, until 2030-01-01T00:00:00Z",
            "refused: no_such_pod_on_node 2 (mesh_ca_requests_refused_total by reason)",
            "the node agents (n1, n2) and the waypoints hold no signing key: they present a \
             token to the CA (--ca-address, no --ca-dir); workload keys stay in their memory",
        ] {
            assert!(
                text.lines().any(|l| l.trim() == line),
                "missing {line:?} in:\n{text}"
            );
        }
        let with_key = CaReport {
            agents_with_ca_dir: vec!["n2".into()],
            ..ca
        };
        let mut text = String::new();
        render_ca(&mut text, &with_key);
        assert!(text.contains("NOT AS EXPECTED: the agents of n2"), "{text}");
    }

    #[test]
    fn an_unmet_expectation_is_loud() {
        let p = probe(vec![ok("echo-v1")], Expect::Refused, hbone_wire());
        check(p, &["NOT AS EXPECTED: the YAML expects refused"]);
    }
}
