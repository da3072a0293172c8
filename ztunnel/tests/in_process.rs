//! The node agent's in-process tier: the behaviours that need no capture (HBONE between
//! nodes, L4 policy, PeerAuthentication, Service routing, hostile HBONE peers, config changes,
//! drain), each on a cluster of its own: two agents (`ztunnel::app::start` with
//! `--redirect loopback`) in this process, pods as 127.x addresses, applications as echo
//! servers, clients over SOCKS5 (see `support/agents.rs`). No root, no namespaces; the file
//! runs in a few seconds. What needs capture (redirection, source preservation through the
//! kernel, what is on the wire, enrollment of namespaces) stays in the e2e suites.

mod support;

use std::net::{IpAddr, SocketAddr};

use anyhow::{ensure, Context, Result};
use e2e::{Ambient, Mesh, Pod, Service};
use mesh_pki::ca::Ca;
use rustls::AlertDescription;
use support::agents::{
    closed, exchange, handshake, identity, roundtrip, Cluster, Dest, Handshake, Hbone, EVENTUALLY,
    HBONE, PLAINTEXT, TRUST_DOMAIN,
};
use tokio::io::AsyncReadExt;

const VIP: &str = "10.96.0.10";
const APP: u16 = 8080;
const CLIENT: &str = "spiffe://cluster.local/ns/default/sa/client";
const SERVER: &str = "spiffe://cluster.local/ns/default/sa/server";

/// The e2e suites' two nodes: `default/client` and `default/client2` (own service accounts),
/// `other/stranger` (an enrolled namespace of its own) and `legacy/outsider` (outside the
/// mesh) on n1; the echo servers `default/server` and `default/server2` behind Service `echo`
/// on n2, and `default/late` on n2, declared but not in the config until a test adds it.
fn two_nodes(name: &str) -> e2e::MeshBuilder {
    Mesh::two_nodes(name)
        .namespace("legacy", Ambient::No)
        .namespace("other", Ambient::Yes)
        .pod(
            Pod::new("default", "client2")
                .on("n1")
                .service_account("client2"),
        )
        .pod(Pod::new("other", "stranger").on("n1"))
        .pod(Pod::new("legacy", "outsider").on("n1"))
        .pod(Pod::echo_server("server", "n2"))
        .pod(Pod::echo_server("server2", "n2"))
        .pod(Pod::new("default", "late").on("n2").unlisted())
        .service(
            Service::new("default", "echo")
                .vip(VIP)
                .port(80, APP)
                .selector([("app", "echo")]),
        )
}

fn vip(port: u16) -> SocketAddr {
    SocketAddr::new(VIP.parse().expect("vip"), port)
}

fn policy(name: &str, body: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: default\nspec:\n{body}"
    )
}

fn strict(namespace: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: {namespace}\nspec:\n  mtls:\n    mode: STRICT\n"
    )
}

// === HBONE between nodes ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pod_to_pod_across_nodes_goes_over_hbone_with_both_identities() -> Result<()> {
    let mesh = Cluster::start(two_nodes("hbone")).await?;
    let app = mesh.echo("default/server", APP).await?;
    let payload = b"pod to pod across nodes, byte for byte \x00\xff".repeat(100);

    let mut conn = mesh
        .connect("default/client", mesh.addr("default/server", APP)?)
        .await?;
    let back = roundtrip(&mut conn, &payload).await?;
    ensure!(
        back == payload,
        "echo returned {} of {} bytes",
        back.len(),
        payload.len()
    );
    // The application sees the client pod's address.
    let client_ip = IpAddr::from(mesh.ip("default/client")?);
    ensure!(
        app.peers().iter().all(|p| p.ip() == client_ip),
        "app saw {:?}",
        app.peers()
    );

    // Each side counts the connection with both SPIFFE identities, over mutual TLS.
    let both = [
        ("source_principal", CLIENT),
        ("destination_principal", SERVER),
        ("connection_security_policy", "mutual_tls"),
        ("response_flags", "-"),
    ];
    for (node, reporter) in [("n1", "source"), ("n2", "destination")] {
        let mut labels = vec![("reporter", reporter)];
        labels.extend(both);
        let closed = mesh
            .counted(node, "istio_tcp_connections_closed_total", &labels, 1.0)
            .await?;
        ensure!(
            closed == 1.0,
            "{node}: {closed} connections closed with {labels:?}"
        );
        let sent = mesh
            .counted(
                node,
                "istio_tcp_received_bytes_total",
                &labels,
                payload.len() as f64,
            )
            .await?;
        ensure!(
            sent == payload.len() as f64,
            "{node} counted {sent} bytes received"
        );
    }
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_worker_threading_serves_each_workers_share_over_its_own_pool() -> Result<()> {
    // (threading, workers, HBONE connections each pool should hold)
    for (threading, workers, per_pool) in [("per-worker", 2, 1), ("shared", 2, 1)] {
        let flags = [
            format!("--threading={threading}"),
            format!("--worker-threads={workers}"),
        ];
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let mesh = Cluster::start_with_flags(two_nodes(&format!("t_{threading}")), &flags).await?;
        let _app = mesh.echo("default/server", APP).await?;
        let mut open = Vec::new();
        for i in 0..24 {
            let mut conn = mesh
                .connect("default/client", mesh.addr("default/server", APP)?)
                .await?;
            let payload = format!("connection #{i}");
            let back = exchange(&mut conn, payload.as_bytes()).await?;
            ensure!(back == payload.as_bytes(), "{threading}: echo #{i}");
            open.push(conn);
        }
        // The kernel spread the 24 connections over the workers' listeners (by a hash of
        // each one's addresses: all on one of two has odds of 2^-23), and each worker sent
        // its share over an HBONE connection of its own pool.
        let dump = mesh.config_dump("n1").await?;
        let pools = dump["pool_per_worker"]
            .as_array()
            .ok_or_else(|| anyhow::anyhow!("no pool_per_worker in {dump}"))?;
        let count = |p: &serde_json::Value, k: &str| p[k].as_u64().unwrap_or(u64::MAX);
        let expected_pools = if threading == "shared" { 1 } else { workers };
        ensure!(
            pools.len() == expected_pools
                && pools.iter().all(|p| count(p, "connections") == per_pool
                    && (1..=24).contains(&count(p, "streams"))),
            "{threading}: pools {pools:?}"
        );
        let streams: u64 = pools.iter().map(|p| count(p, "streams")).sum();
        ensure!(
            streams == 24,
            "{threading}: {streams} streams for 24 connections"
        );
        ensure!(
            dump["pool"]["streams"] == 24,
            "{threading}: {}",
            dump["pool"]
        );
        drop(open);
        mesh.stop().await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_vip_is_balanced_round_robin_over_its_two_endpoints() -> Result<()> {
    let mesh = Cluster::start(two_nodes("vip")).await?;
    let (one, two) = (
        mesh.echo("default/server", APP).await?,
        mesh.echo("default/server2", APP).await?,
    );
    for i in 0..4 {
        let mut conn = mesh.connect("default/client", vip(80)).await?;
        let payload = format!("to the vip, #{i}");
        let back = roundtrip(&mut conn, payload.as_bytes()).await?;
        ensure!(
            back == payload.as_bytes(),
            "echo {:?}",
            String::from_utf8_lossy(&back)
        );
    }
    ensure!(
        one.peers().len() == 2 && two.peers().len() == 2,
        "endpoints got {} and {} connections",
        one.peers().len(),
        two.peers().len()
    );
    let labels = [
        ("reporter", "source"),
        ("destination_service", "echo.default.svc.cluster.local"),
    ];
    let n = mesh
        .counted("n1", "istio_tcp_connections_closed_total", &labels, 4.0)
        .await?;
    ensure!(n == 4.0, "{n} connections labelled with the service");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_is_reached_by_its_name_through_socks5() -> Result<()> {
    let mesh = Cluster::start(two_nodes("by_name")).await?;
    let _one = mesh.echo("default/server", APP).await?;
    let _two = mesh.echo("default/server2", APP).await?;
    for name in ["echo.default.svc.cluster.local", "echo.default"] {
        ensure!(
            mesh.reaches("default/client", (name, 80)).await,
            "{name}:80 not reached"
        );
    }
    // A name the mesh does not know is answered "host unreachable" and counted.
    let err = mesh
        .connect("default/client", ("nowhere.default", 80))
        .await
        .expect_err("unknown name");
    ensure!(format!("{err:#}").contains("reply code 4"), "{err:#}");
    let n = mesh.refused("n1", "source", "NOORIGDST", 1.0).await?;
    ensure!(n == 1.0, "{n} NOORIGDST refusals");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_ready_endpoints_is_refused_as_no_healthy_upstream() -> Result<()> {
    let spec = two_nodes("no_endpoints").service(
        Service::new("default", "empty")
            .vip("10.96.0.11")
            .port(80, APP)
            .selector([("app", "none")]),
    );
    let mesh = Cluster::start(spec).await?;
    let mut conn = mesh
        .connect("default/client", Dest::Addr("10.96.0.11:80".parse()?))
        .await?;
    ensure!(
        closed(&mut conn).await,
        "connection to an empty service stays open"
    );
    let n = mesh.refused("n1", "source", "UH", 1.0).await?;
    ensure!(n == 1.0, "{n} UH refusals");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_destination_outside_the_mesh_is_reached_in_plaintext() -> Result<()> {
    let mesh = Cluster::start(two_nodes("passthrough")).await?;
    let app = mesh.echo("legacy/outsider", APP).await?;
    ensure!(
        mesh.reaches("default/client", mesh.addr("legacy/outsider", APP)?)
            .await,
        "outsider not reached"
    );
    ensure!(app.peers().len() == 1, "outsider saw {:?}", app.peers());
    let labels = [
        ("reporter", "source"),
        ("source_principal", CLIENT),
        ("destination_workload", "outsider"),
        ("connection_security_policy", "unknown"),
    ];
    let n = mesh
        .counted("n1", "istio_tcp_connections_closed_total", &labels, 1.0)
        .await?;
    ensure!(n == 1.0, "{n} plaintext connections counted");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socks5_destination_that_is_the_agent_itself_is_refused_as_a_loop() -> Result<()> {
    let mesh = Cluster::start(two_nodes("loop")).await?;
    let own = mesh.addr("default/client", HBONE)?;
    let mut conn = mesh.connect("default/client", own).await?;
    ensure!(
        closed(&mut conn).await,
        "a connection to the agent's own port stays open"
    );
    let n = mesh.refused("n1", "source", "LOOP", 1.0).await?;
    ensure!(n == 1.0, "{n} LOOP refusals");
    mesh.stop().await
}

// === L4 AuthorizationPolicy ===

/// Who reaches `default/server:port` under the cluster's policy: each client in turn.
async fn reach(mesh: &Cluster, clients: &[&str], port: u16) -> Result<Vec<bool>> {
    let to = mesh.addr("default/server", port)?;
    let mut out = Vec::new();
    for c in clients {
        out.push(mesh.reaches(c, to).await);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_by_principal_admits_only_that_client() -> Result<()> {
    let body = "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/client\"]\n";
    let mesh = Cluster::start(two_nodes("allow_principal").yaml("policy.yaml", &policy("p", body)))
        .await?;
    let app = mesh.echo("default/server", APP).await?;
    let got = reach(&mesh, &["default/client", "default/client2"], APP).await?;
    ensure!(got == [true, false], "client, client2 reached: {got:?}");
    ensure!(
        app.peers().len() == 1,
        "the app saw the denied client: {:?}",
        app.peers()
    );
    // Refused by the destination's agent (DENY), seen as a denial by the source's (UAEX).
    let n = mesh.refused("n2", "destination", "DENY", 1.0).await?;
    ensure!(n == 1.0, "{n} DENY refusals on n2");
    let n = mesh.refused("n1", "source", "UAEX", 1.0).await?;
    ensure!(n == 1.0, "{n} UAEX refusals on n1");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_by_namespace_refuses_the_pods_of_that_namespace() -> Result<()> {
    let body =
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [\"other\"]\n";
    let mesh =
        Cluster::start(two_nodes("deny_namespace").yaml("policy.yaml", &policy("p", body))).await?;
    let _app = mesh.echo("default/server", APP).await?;
    let got = reach(&mesh, &["default/client", "other/stranger"], APP).await?;
    ensure!(got == [true, false], "client, stranger reached: {got:?}");
    let n = mesh.refused("n2", "destination", "DENY", 1.0).await?;
    ensure!(n == 1.0, "{n} DENY refusals on n2");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allow_by_port_refuses_the_other_ports() -> Result<()> {
    let body = "  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        ports: [\"8080\"]\n";
    let mesh =
        Cluster::start(two_nodes("allow_port").yaml("policy.yaml", &policy("p", body))).await?;
    let _app = mesh.echo("default/server", APP).await?;
    let other = mesh.echo("default/server", 9090).await?;
    ensure!(
        reach(&mesh, &["default/client"], APP).await? == [true],
        "8080 refused"
    );
    ensure!(
        reach(&mesh, &["default/client"], 9090).await? == [false],
        "9090 allowed"
    );
    ensure!(
        other.peers().is_empty(),
        "9090's app saw {:?}",
        other.peers()
    );
    let n = mesh.refused("n2", "destination", "DENY", 1.0).await?;
    ensure!(n == 1.0, "{n} DENY refusals on n2");
    mesh.stop().await
}

// === PeerAuthentication and plaintext on 15006 ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permissive_lets_plaintext_in_through_15006() -> Result<()> {
    let mesh = Cluster::start(two_nodes("permissive")).await?;
    let app = mesh.echo("default/server", APP).await?;
    let outsider = mesh.ip("legacy/outsider")?;
    let mut conn = mesh.plaintext(outsider, "default/server", APP).await?;
    let back = roundtrip(&mut conn, b"plaintext, permissive").await?;
    ensure!(
        back == b"plaintext, permissive",
        "echo {:?}",
        String::from_utf8_lossy(&back)
    );
    ensure!(
        app.peers().iter().all(|p| p.ip() == IpAddr::from(outsider)),
        "app saw {:?}",
        app.peers()
    );
    let labels = [
        ("reporter", "destination"),
        ("destination_principal", SERVER),
        ("source_workload", "outsider"),
        ("connection_security_policy", "unknown"),
    ];
    let n = mesh
        .counted("n2", "istio_tcp_connections_closed_total", &labels, 1.0)
        .await?;
    ensure!(n == 1.0, "{n} plaintext connections counted on n2");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_refuses_plaintext_on_15006_but_not_mtls() -> Result<()> {
    let mesh =
        Cluster::start(two_nodes("strict").yaml("peerauthn.yaml", &strict("default"))).await?;
    let app = mesh.echo("default/server", APP).await?;
    let outsider = mesh.ip("legacy/outsider")?;
    let mut conn = mesh.plaintext(outsider, "default/server", APP).await?;
    let back = roundtrip(&mut conn, b"plaintext, strict")
        .await
        .unwrap_or_default();
    ensure!(back.is_empty(), "plaintext under STRICT echoed {back:?}");
    ensure!(app.peers().is_empty(), "the app saw {:?}", app.peers());
    let n = mesh.refused("n2", "destination", "PEERAUTHN", 1.0).await?;
    ensure!(n == 1.0, "{n} PEERAUTHN refusals on n2");
    ensure!(
        mesh.reaches("default/client", mesh.addr("default/server", APP)?)
            .await,
        "mTLS refused under STRICT"
    );
    mesh.stop().await
}

// === hostile HBONE peers ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_certificates_the_mesh_did_not_issue_are_refused_at_the_handshake() -> Result<()> {
    let mesh = Cluster::start(two_nodes("bad_certs")).await?;
    let _app = mesh.echo("default/server", APP).await?;
    let server = mesh.addr("default/server", HBONE)?;
    let server_id = identity("default", "server");
    let outsider = mesh.ip("legacy/outsider")?;
    let id = identity("legacy", "default");
    let ttl = std::time::Duration::from_secs(3600);
    let lookalike = Ca::ephemeral(TRUST_DOMAIN)?.issue(&id, ttl)?;
    let unrelated = Ca::ephemeral("other.local")?.issue(
        &mesh_model::identity::Identity::new("other.local", "legacy", "default"),
        ttl,
    )?;
    // The mesh's own root told that its trust domain is another one.
    let evil = Ca::load_or_create(mesh.ca_dir(), "evil.local")?.issue(
        &mesh_model::identity::Identity::new("evil.local", "default", "x"),
        ttl,
    )?;
    let cases = [
        (
            "another root, same trust domain",
            Some(&lookalike),
            AlertDescription::UnknownCA,
        ),
        (
            "an unrelated root",
            Some(&unrelated),
            AlertDescription::UnknownCA,
        ),
        (
            "the mesh root, another trust domain",
            Some(&evil),
            AlertDescription::CertificateUnknown,
        ),
        (
            "no certificate",
            None,
            AlertDescription::CertificateRequired,
        ),
    ];
    for (i, (what, cert, alert)) in cases.into_iter().enumerate() {
        let tls = mesh.tls_with(cert, &server_id)?;
        let got = handshake(outsider, server, tls).await?;
        ensure!(got == Handshake::Alert(alert), "{what}: {got:?}");
        let want = (i + 1) as f64;
        let n = mesh.refused("n2", "destination", "TLS", want).await?;
        ensure!(n == want, "{what}: {n} TLS refusals");
    }
    // A certificate the mesh issued is accepted.
    let tls = mesh.mesh_tls(&id, &server_id)?;
    let got = handshake(outsider, server, tls).await?;
    ensure!(got == Handshake::Accepted, "a mesh certificate: {got:?}");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_to_a_pod_not_served_here_or_to_an_agent_port_is_refused() -> Result<()> {
    let mesh = Cluster::start(two_nodes("bad_connect")).await?;
    let app = mesh.echo("default/server", APP).await?;
    let client_ip = mesh.ip("default/client")?;
    let tls = mesh.mesh_tls(
        &identity("default", "client"),
        &identity("default", "server"),
    )?;
    let mut h2 = Hbone::open(client_ip, mesh.addr("default/server", HBONE)?, tls).await?;
    // (what, authority, flag, how many refusals with that flag so far)
    let cases = [
        (
            "a pod on another node",
            mesh.addr("default/client", APP)?,
            "NR",
            1.0,
        ),
        (
            "another pod of this node",
            mesh.addr("default/server2", APP)?,
            "NR",
            2.0,
        ),
        (
            "the agent's plaintext port",
            mesh.addr("default/server", PLAINTEXT)?,
            "LOOP",
            1.0,
        ),
    ];
    for (what, authority, flag, want) in cases {
        let (status, _) = h2.connect(authority, b"refused").await?;
        ensure!(status == http::StatusCode::UNAUTHORIZED, "{what}: {status}");
        let n = mesh.refused("n2", "destination", flag, want).await?;
        ensure!(n == want, "{what}: {n} {flag} refusals");
    }
    ensure!(app.peers().is_empty(), "the app saw {:?}", app.peers());
    // The same HBONE connection still carries a valid CONNECT.
    let (status, back) = h2
        .connect(mesh.addr("default/server", APP)?, b"valid")
        .await?;
    ensure!(
        status == http::StatusCode::OK && back == b"valid",
        "valid CONNECT: {status} {back:?}"
    );
    ensure!(app.peers().len() == 1, "the app saw {:?}", app.peers());
    mesh.stop().await
}

/// RELIABILITY 20: `ipBlocks` sees the address the connection came from; a CONNECT whose
/// `forwarded` header names the one allowed address opens nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_forwarded_header_does_not_pass_an_ip_blocks_policy() -> Result<()> {
    let mesh = Cluster::start(two_nodes("forged_forwarded")).await?;
    let app = mesh.echo("default/server", APP).await?;
    let (client, client2) = (mesh.ip("default/client")?, mesh.ip("default/client2")?);
    let body = format!(
        "  action: ALLOW\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{client2}/32\"]\n"
    );
    mesh.apply("policy.yaml", &policy("only-client2", &body), false)
        .await?;
    let server = identity("default", "server");
    let target = mesh.addr("default/server", APP)?;
    let forged = format!("for={client2}");
    let tls = mesh.mesh_tls(&identity("default", "client"), &server)?;
    let mut h2 = Hbone::open(client, mesh.addr("default/server", HBONE)?, tls).await?;
    for headers in [
        vec![("forwarded", forged.as_str())],
        vec![
            ("forwarded", forged.as_str()),
            ("x-forwarded-for", forged.as_str()),
        ],
    ] {
        let (status, _) = h2.connect_with(target, &headers, b"forged").await?;
        ensure!(status != http::StatusCode::OK, "{headers:?}: {status}");
    }
    let n = mesh.refused("n2", "destination", "DENY", 2.0).await?;
    ensure!(n == 2.0, "{n} DENY refusals on n2");
    ensure!(app.peers().is_empty(), "the app saw {:?}", app.peers());
    // From the allowed address, whatever `forwarded` claims, the policy admits it.
    let tls = mesh.mesh_tls(&identity("default", "client2"), &server)?;
    let mut h2 = Hbone::open(client2, mesh.addr("default/server", HBONE)?, tls).await?;
    let claim = format!("for={client}");
    let (status, back) = h2
        .connect_with(target, &[("forwarded", claim.as_str())], b"allowed")
        .await?;
    ensure!(
        status == http::StatusCode::OK && back == b"allowed",
        "from the allowed address: {status} {back:?}"
    );
    mesh.stop().await
}

// === config changes at run time ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_added_at_run_time_refuses_the_next_connection() -> Result<()> {
    let mesh = Cluster::start(two_nodes("policy_added")).await?;
    let _app = mesh.echo("default/server", APP).await?;
    ensure!(
        reach(&mesh, &["default/client"], APP).await? == [true],
        "refused before"
    );
    let body = "  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/client\"]\n";
    mesh.apply("policy.yaml", &policy("deny-client", body), false)
        .await?;
    let got = reach(&mesh, &["default/client", "default/client2"], APP).await?;
    ensure!(got == [false, true], "after the policy: {got:?}");
    let n = mesh.refused("n2", "destination", "DENY", 1.0).await?;
    ensure!(n == 1.0, "{n} DENY refusals on n2");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_change_closes_an_open_connection_it_no_longer_allows() -> Result<()> {
    let mesh = Cluster::start(two_nodes("revoked")).await?;
    let _app = mesh.echo("default/server", APP).await?;
    let mut conn = mesh
        .connect("default/client", mesh.addr("default/server", APP)?)
        .await?;
    ensure!(
        exchange(&mut conn, b"before").await? == b"before",
        "no echo before"
    );
    mesh.apply("policy.yaml", &policy("deny-all", "  {}\n"), false)
        .await?;
    ensure!(closed(&mut conn).await, "the revoked connection stays open");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_config_is_rejected_and_the_last_good_state_stays() -> Result<()> {
    let body = "  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/default/sa/client2\"]\n";
    let mesh =
        Cluster::start(two_nodes("malformed").yaml("policy.yaml", &policy("p", body))).await?;
    let _app = mesh.echo("default/server", APP).await?;
    let broken = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: bad\n  namespace: default\nstatus:\n  podIP: 10.0.0.x\n";
    mesh.apply("broken.yaml", broken, true).await?;
    // Removing the policy in the same (rejected) state changes nothing either.
    mesh.apply("policy.yaml", "", true).await?;
    let got = reach(&mesh, &["default/client", "default/client2"], APP).await?;
    ensure!(got == [true, false], "after the rejection: {got:?}");
    let dump = mesh.config_dump("n2").await?;
    ensure!(
        dump.to_string()
            .contains("cluster.local/ns/default/sa/client2"),
        "the last good policy is gone from /config_dump"
    );
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_added_at_run_time_is_served_and_released_when_removed() -> Result<()> {
    let mesh = Cluster::start(two_nodes("late_pod")).await?;
    let late = mesh.addr("default/late", APP)?;
    let _app = mesh.echo("default/late", APP).await?;
    let hbone = SocketAddr::new(late.ip(), HBONE);
    ensure!(!accepts(hbone).await, "late has listeners before it exists");
    let pod = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: late, namespace: default}}\nspec: {{nodeName: n2, serviceAccountName: late}}\nstatus: {{podIP: {}}}\n",
        late.ip()
    );
    mesh.apply("late.yaml", &pod, false).await?;
    // Enrollment follows the reload: wait for the pod's HBONE listener.
    eventually_accepts(hbone, true).await?;
    ensure!(
        mesh.reaches("default/client", late).await,
        "late not reached once added"
    );
    let labels = [
        ("reporter", "destination"),
        (
            "destination_principal",
            "spiffe://cluster.local/ns/default/sa/late",
        ),
        ("connection_security_policy", "mutual_tls"),
    ];
    let n = mesh
        .counted("n2", "istio_tcp_connections_closed_total", &labels, 1.0)
        .await?;
    ensure!(n == 1.0, "{n} connections to late over HBONE");
    mesh.apply("late.yaml", "", false).await?;
    eventually_accepts(hbone, false).await?;
    mesh.stop().await
}

async fn accepts(addr: SocketAddr) -> bool {
    tokio::net::TcpStream::connect(addr).await.is_ok()
}

async fn eventually_accepts(addr: SocketAddr, want: bool) -> Result<()> {
    let deadline = std::time::Instant::now() + EVENTUALLY;
    loop {
        let accepts = accepts(addr).await;
        if accepts == want {
            return Ok(());
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{addr} accepts: {accepts}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}

// === shutdown ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_through_the_handle_waits_for_open_connections() -> Result<()> {
    let mut mesh = Cluster::start(two_nodes("drain")).await?;
    let _app = mesh.echo("default/server", APP).await?;
    let server = mesh.addr("default/server", APP)?;
    let mut conn = mesh.connect("default/client", server).await?;
    ensure!(
        exchange(&mut conn, b"before").await? == b"before",
        "no echo before"
    );

    let n2 = mesh.take_agent("n2")?;
    n2.shutdown();
    // Listeners close at once; the open connection keeps working while the agent drains.
    eventually_accepts(SocketAddr::new(server.ip(), HBONE), false).await?;
    ensure!(
        exchange(&mut conn, b"draining").await? == b"draining",
        "no echo while draining"
    );
    let mut join = Box::pin(n2.join());
    ensure!(
        tokio::time::timeout(std::time::Duration::from_millis(300), &mut join)
            .await
            .is_err(),
        "the agent ended with a connection open"
    );
    // The last connection closes: the agent ends well before its drain deadline (5 s).
    let back = roundtrip(&mut conn, b"last").await?;
    ensure!(back == b"last", "last echo {back:?}");
    tokio::time::timeout(std::time::Duration::from_secs(3), join)
        .await
        .context("the agent ends once drained")??;
    mesh.stop().await
}

// === bounded resources (RELIABILITY 7, 37, 38) ===

/// `ss -o` of the sockets on `addr`: the timer column says `keepalive` when SO_KEEPALIVE is
/// on and the socket is idle.
fn ss_timers(addr: SocketAddr) -> Result<String> {
    let out = std::process::Command::new("ss")
        .args(["-tno", "state", "established", "src"])
        .arg(addr.to_string())
        .output()
        .context("run ss")?;
    ensure!(out.status.success(), "ss failed");
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_pod_connection_cap_new_connections_are_closed_at_once_and_counted() -> Result<()>
{
    let mesh =
        Cluster::start_with_flags(two_nodes("conn_cap"), &["--max-connections-per-pod=3"]).await?;
    let _app = mesh.echo("default/server", APP).await?;
    let server = mesh.addr("default/server", APP)?;
    let mut open = Vec::new();
    for i in 0..3 {
        let mut conn = mesh.connect("default/client", server).await?;
        ensure!(exchange(&mut conn, b"in").await? == b"in", "connection {i}");
        open.push(conn);
    }
    // The fourth: accepted by the kernel, closed by the agent before any SOCKS5 answer.
    let started = std::time::Instant::now();
    let fourth = mesh.connect("default/client", server).await;
    ensure!(fourth.is_err(), "a fourth connection was served");
    ensure!(
        started.elapsed() < std::time::Duration::from_millis(500),
        "not closed at once: {:?}",
        started.elapsed()
    );
    let refused = mesh.refused("n1", "source", "OM", 1.0).await?;
    ensure!(refused == 1.0, "{refused} refusals counted with OM");
    // The open ones keep working.
    for conn in &mut open {
        ensure!(
            exchange(conn, b"still").await? == b"still",
            "an open one broke"
        );
    }
    // Another pod of the node has slots of its own.
    ensure!(
        mesh.reaches("default/client2", server).await,
        "the cap of one pod refused another"
    );
    // One closes: a new one is served again.
    drop(open.pop());
    let deadline = std::time::Instant::now() + EVENTUALLY;
    loop {
        if mesh.reaches("default/client", server).await {
            break;
        }
        ensure!(std::time::Instant::now() < deadline, "never served again");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_that_never_say_hello_are_closed_at_the_handshake_deadline() -> Result<()> {
    let mesh = Cluster::start_with_flags(
        two_nodes("hello_flood"),
        &[
            "--tls-handshake-timeout=1s",
            "--max-tls-handshakes=256",
            // 200 silent connections from one source: its share lifted to the whole cap.
            "--max-tls-handshakes-per-source=256",
        ],
    )
    .await?;
    let _app = mesh.echo("default/server", APP).await?;
    let hbone = mesh.addr("default/server", HBONE)?;
    let outsider = mesh.ip("legacy/outsider")?;
    let before = e2e::held_sockets(hbone)?;
    let started = std::time::Instant::now();
    let mut silent = Vec::new();
    for _ in 0..200 {
        silent.push(support::agents::dial(outsider.into(), hbone).await?);
    }
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let held = e2e::held_sockets(hbone)?;
    ensure!(held >= before + 200, "{held} sockets held, {before} before");
    // A real client's handshake is served meanwhile.
    let tls = mesh.mesh_tls(
        &identity("default", "client"),
        &identity("default", "server"),
    )?;
    let client_ip = mesh.ip("default/client")?;
    let real = handshake(client_ip, hbone, tls).await?;
    ensure!(
        real == Handshake::Accepted,
        "a real client during the flood: {real:?}"
    );
    // Every silent one is closed by the agent within the deadline (1 s) + 1 s.
    let closes = silent.iter_mut().map(|tcp| async move {
        let mut b = [0u8; 1];
        let r = tokio::time::timeout(EVENTUALLY, tcp.read(&mut b)).await;
        (
            matches!(r, Ok(Ok(0)) | Ok(Err(_))),
            std::time::Instant::now(),
        )
    });
    let ends = futures::future::join_all(closes).await;
    ensure!(
        ends.iter().all(|(c, _)| *c),
        "a silent connection stayed open"
    );
    let last = ends.iter().map(|(_, t)| *t).max().context("none")?;
    let took = last - started;
    ensure!(
        took < std::time::Duration::from_secs(2) + std::time::Duration::from_millis(500),
        "the last silent connection closed after {took:?}"
    );
    ensure!(
        took >= std::time::Duration::from_millis(900),
        "closed before the deadline: {took:?}"
    );
    // The agent's side of each is closed: back to what it held before.
    drop(silent);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
    loop {
        let after = e2e::held_sockets(hbone)?;
        if after <= before {
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "{after} sockets held after, {before} before"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let tls = mesh.refused("n2", "destination", "TLS", 200.0).await?;
    ensure!(tls == 200.0, "{tls} handshake refusals counted");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_the_handshake_cap_connections_are_closed_at_once() -> Result<()> {
    let mesh = Cluster::start_with_flags(
        two_nodes("handshake_cap"),
        &["--tls-handshake-timeout=3s", "--max-tls-handshakes=8"],
    )
    .await?;
    let hbone = mesh.addr("default/server", HBONE)?;
    let outsider = mesh.ip("legacy/outsider")?;
    let mut silent = Vec::new();
    for _ in 0..20 {
        silent.push(support::agents::dial(outsider.into(), hbone).await?);
    }
    // 12 over the cap are closed at once (well before the 3 s deadline); 8 wait for it.
    let reads = silent.iter_mut().map(|tcp| async move {
        let mut b = [0u8; 1];
        let wait = std::time::Duration::from_millis(500);
        let r = tokio::time::timeout(wait, tcp.read(&mut b)).await;
        matches!(r, Ok(Ok(0)) | Ok(Err(_)))
    });
    let closed_at_once = futures::future::join_all(reads)
        .await
        .into_iter()
        .filter(|closed| *closed)
        .count();
    ensure!(closed_at_once == 12, "{closed_at_once} closed at once");
    let om = mesh.refused("n2", "destination", "OM", 12.0).await?;
    ensure!(om == 12.0, "{om} refusals counted with OM");
    mesh.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_inbound_hbone_connection_without_streams_is_closed_after_the_idle_timeout() -> Result<()>
{
    let mesh =
        Cluster::start_with_flags(two_nodes("hbone_idle"), &["--hbone-idle-timeout=500ms"]).await?;
    let _app = mesh.echo("default/server", APP).await?;
    let client_ip = mesh.ip("default/client")?;
    let tls = mesh.mesh_tls(
        &identity("default", "client"),
        &identity("default", "server"),
    )?;
    let hbone = mesh.addr("default/server", HBONE)?;
    let mut h2 = Hbone::open(client_ip, hbone, tls).await?;
    let (status, back) = h2.connect(mesh.addr("default/server", APP)?, b"hi").await?;
    ensure!(status == 200 && back == b"hi", "{status} {back:?}");
    let idle_from = std::time::Instant::now();
    // Keepalive on the agent's accepted socket (read back by ss, once no data is in
    // flight: the retransmission timer shows until then).
    let mut timers = ss_timers(hbone)?;
    while !timers.contains("timer:(keepalive") {
        ensure!(
            idle_from.elapsed() < std::time::Duration::from_millis(300),
            "no keepalive: {timers}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        timers = ss_timers(hbone)?;
    }
    let deadline = idle_from + std::time::Duration::from_millis(1500);
    while !h2.is_closed() {
        ensure!(
            std::time::Instant::now() < deadline,
            "still open after 1.5 s"
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let took = idle_from.elapsed();
    ensure!(
        took >= std::time::Duration::from_millis(400),
        "closed before the idle timeout: {took:?}"
    );
    mesh.stop().await
}
