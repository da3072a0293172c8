//! The node agent end to end: real `ztunnel` processes (one per node namespace), real pods
//! (network namespaces), real TLS, real clients.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use e2e::{eventually, prom, Ambient, Mesh, Pod, Service};

const VIP: &str = "10.96.0.10";

/// Two nodes, two pods each; `echo` service over the two servers on n2.
fn two_node_mesh(name: &str) -> Result<Mesh> {
    Mesh::builder(name)
        .node("n1")
        .node("n2")
        .namespace("default", Ambient::Yes)
        .namespace("legacy", Ambient::No)
        .pod(Pod::new("default", "client").on("n1").service_account("client"))
        .pod(Pod::new("default", "client2").on("n1").service_account("client2"))
        .pod(Pod::new("legacy", "outsider").on("n1"))
        .pod(Pod::new("default", "server").on("n2").service_account("server").labels([("app", "echo")]))
        .pod(Pod::new("default", "server2").on("n2").service_account("server").labels([("app", "echo")]))
        .service(Service::new("default", "echo").vip(VIP).port(80, 8080).selector([("app", "echo")]))
        .build()
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP.parse().expect("vip"), port)
}

#[test]
fn pod_to_pod_across_nodes_over_hbone_only() -> Result<()> {
    let mesh = two_node_mesh("hbone_only")?;
    let _s1 = mesh.spawn_echo("default/server", 8080, "server")?;
    let _s2 = mesh.spawn_echo("default/server2", 8080, "server2")?;
    let server_ip = mesh.pod_ip("default/server")?;
    let client_ip = mesh.pod_ip("default/client")?;
    let capture = mesh.capture_wire()?;

    // By pod IP: the echo server sees the client's own pod IP (source preserved).
    let reply = mesh.http_get("default/client", SocketAddr::new(server_ip.into(), 8080), "/by-ip")?;
    ensure!(reply.status == 200, "status {}", reply.status);
    let body = reply.json()?;
    ensure!(body["server"] == "server", "answered by {}", body["server"]);
    let peer = body["peer"].as_str().context("peer")?;
    ensure!(peer.starts_with(&format!("{client_ip}:")), "server saw {peer}, client is {client_ip}");

    // By VIP: both endpoints answer (round robin).
    let mut servers = std::collections::BTreeSet::new();
    for _ in 0..4 {
        let r = mesh.http_get("default/client", vip(80), "/by-vip")?;
        ensure!(r.status == 200, "status {}", r.status);
        servers.insert(r.json()?["server"].as_str().unwrap_or_default().to_string());
    }
    ensure!(servers.len() == 2, "VIP answered by {servers:?}");

    // A raw TCP echo with a marker that must never appear in clear on the wire.
    let marker = b"SECRET-MARKER-hbone-only-0123456789";
    let back = mesh.echo_roundtrip("default/client", vip(80), marker)?;
    ensure!(back == marker, "echo returned {:?}", String::from_utf8_lossy(&back));

    let summary = capture.stop()?;
    let ports = summary.tcp_server_ports();
    ensure!(ports == [15008].into_iter().collect(), "wire carried TCP to ports {ports:?}");
    ensure!(!summary.contains(marker), "application bytes in clear on the wire");
    ensure!(!summary.contains(b"GET /by-ip"), "HTTP request in clear on the wire");
    Ok(())
}
