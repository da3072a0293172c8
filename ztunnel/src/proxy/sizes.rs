//! Per-connection memory is a product feature: every open connection holds its task's future
//! for its whole life, so these tests pin the size of each per-connection future (as Istio's
//! ztunnel does). A change that inlines a large state (a handshake, a dial, a label set) into
//! one of them fails here rather than in a benchmark. Raise a limit only on purpose, and say
//! why in the commit.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use clap::Parser;
use mesh_hbone::PoolConfig;
use mesh_model::identity::Identity;
use mesh_model::model::{Model, NamespacedName};
use mesh_pki::certs::CertManager;
use mesh_telemetry::Metrics;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{
    connection_task, inbound, inbound_passthrough, outbound, CaptureSlot, PodCtx, ProxyInputs,
};
use crate::config::{Args, Config};
use crate::conns::ConnTracker;
use crate::netns::Netns;
use crate::netns_source::PodNetnsSource;

// Budgets in bytes, as `cargo test` builds (debug; a release build's futures are smaller, so
// these hold there too). Measured: outbound 840 as spawned (with its guards and span),
// inbound connection 8,704, inbound stream 1,056, passthrough 752. The outbound one is what
// every idle tunnelled connection costs the client-side agent, the stream one the server side.
//
// How they got there (2,616 / 2,344 / 1,504 before; heaptrack on `mesh-bench --memory 10000`
// found 5,367 bytes per outbound task, twice what this test then measured):
// - an `async` block that awaits a future it captured stores that future twice (the capture
//   and the awaited copy): tasks are spawned with `mesh_hbone::holding`, the relay and its
//   revocation are combinators (`Revocable`, `FutureExt::map`);
// - an `async fn` stores its arguments twice (moved into locals): the per-connection
//   functions return an `async` block instead (`relay_counted`, `mesh_hbone::relay`,
//   `inbound::handle_stream`);
// - a local that lives to the end of its scope keeps its room even when moved out: what
//   only opening the upstream needs is scoped to a block, and the dials are boxed.

/// The task behind one captured outbound connection (15001), for its whole life.
const OUTBOUND_LIMIT: usize = 1_000;
/// One inbound HBONE connection (15008): TLS + HTTP/2, shared by up to 1,000 streams.
const INBOUND_CONN_LIMIT: usize = 8_800;
/// One CONNECT stream on an inbound HBONE connection: one per tunneled connection.
const INBOUND_STREAM_LIMIT: usize = 1_200;
/// One plaintext inbound connection (15006).
const PASSTHROUGH_LIMIT: usize = 900;

fn inputs() -> (Arc<ProxyInputs>, Arc<PodCtx>) {
    let ca = mesh_pki::ca::Ca::ephemeral("cluster.local").expect("ephemeral ca");
    let certs = CertManager::new(Arc::new(ca), Duration::from_secs(3600));
    let args = Args::try_parse_from([
        "ztunnel",
        "--node-name",
        "n1",
        "--ca-dir",
        "/nonexistent",
        "--config-dir",
        "/nonexistent",
    ])
    .expect("default arguments");
    let cfg = Arc::new(Config::from(&args));
    let home = Arc::new(Netns::current().expect("own netns"));
    let identity = Identity::new("cluster.local", "default", "client");
    let server_tls =
        mesh_pki::tls::server_config(certs.clone(), identity.clone()).expect("server config");
    let hold = certs.hold(&identity);
    let pi = Arc::new(ProxyInputs::new(
        cfg.clone(),
        Arc::new(ArcSwap::from_pointee(Model::default())),
        certs,
        PoolConfig::default(),
        mesh_shell::workers::Turns::default(),
        Metrics::new(),
        Arc::new(ConnTracker::default()),
        home.clone(),
        PodNetnsSource::Named(cfg),
        CancellationToken::new(),
    ));
    let pod = Arc::new(PodCtx {
        key: NamespacedName::new("default", "client"),
        ips: vec![Ipv4Addr::LOCALHOST.into()],
        identity,
        netns: home,
        server_tls,
        stop: CancellationToken::new(),
        outbound_stop: CancellationToken::new(),
        released: std::sync::atomic::AtomicBool::new(false),
        active: Arc::default(),
        capture: CaptureSlot::new(None),
        conn_cap: mesh_shell::limits::Cap::new("test", 1),
        cert: hold,
    });
    (pi, pod)
}

/// A connected loopback socket and its peer's address.
async fn accepted() -> (TcpStream, SocketAddr) {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("local addr");
    let client = TcpStream::connect(addr).await.expect("connect");
    let (server, peer) = listener.accept().await.expect("accept");
    // The client end must outlive the measurement only; the future is never polled.
    drop(client);
    (server, peer)
}

fn check(what: &str, size: usize, limit: usize) {
    println!("{what}: {size} bytes (limit {limit})");
    assert!(
        size <= limit,
        "the {what} future is {size} bytes, over its {limit}-byte budget: box the large, \
         short-lived part (a handshake, a dial) or keep it out of the connection's state"
    );
}

#[tokio::test]
async fn outbound_connection_future_stays_small() {
    let (pi, pod) = inputs();
    let (tcp, peer) = accepted().await;
    // What `accept_loop` spawns: the handler's future, its guards and its span.
    let held = (pod.active.enter(), pi.open.enter());
    let span = tracing::info_span!("conn");
    let fut = connection_task(outbound::handle(tcp, peer, pod, pi), held, span);
    check("outbound", std::mem::size_of_val(&fut), OUTBOUND_LIMIT);
}

#[tokio::test]
async fn passthrough_connection_future_stays_small() {
    let (pi, pod) = inputs();
    let (tcp, peer) = accepted().await;
    let fut = inbound_passthrough::handle(tcp, peer, pod, pi);
    check(
        "inbound passthrough",
        std::mem::size_of_val(&fut),
        PASSTHROUGH_LIMIT,
    );
}

#[tokio::test]
async fn inbound_connection_future_stays_small() {
    let (pi, pod) = inputs();
    let (tcp, peer) = accepted().await;
    let fut = inbound::handle_conn(tcp, peer, pod, pi);
    check(
        "inbound hbone connection",
        std::mem::size_of_val(&fut),
        INBOUND_CONN_LIMIT,
    );
}

/// The stream handler needs a real CONNECT: an HTTP/2 client sends one over an in-memory
/// pipe to the HBONE server, whose handler measures the future it would run.
#[tokio::test]
async fn inbound_stream_future_stays_small() {
    let (pi, pod) = inputs();
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let peer = SocketAddr::from((Ipv4Addr::LOCALHOST, 40_000));
    let local = SocketAddr::from((Ipv4Addr::LOCALHOST, 15_008));
    let peer_id = Arc::new(Identity::new("cluster.local", "default", "server"));
    let server = tokio::spawn(async move {
        let cfg = mesh_hbone::ServerConfig::default();
        let _ = mesh_hbone::serve(server_io, &cfg, move |req| {
            let fut =
                inbound::handle_stream(req, peer, local, peer_id.clone(), pod.clone(), pi.clone());
            let _ = tx.send(std::mem::size_of_val(&fut));
            async {}
        })
        .await;
    });
    let (send, conn) = h2::client::handshake(client_io)
        .await
        .expect("h2 handshake");
    let driver = tokio::spawn(conn);
    let mut send = send.ready().await.expect("h2 ready");
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri("127.0.0.1:8080")
        .body(())
        .expect("request");
    let (_response, _stream) = send.send_request(req, false).expect("send CONNECT");
    let size = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("the handler ran in time")
        .expect("a size");
    check("inbound hbone stream", size, INBOUND_STREAM_LIMIT);
    driver.abort();
    server.abort();
}
