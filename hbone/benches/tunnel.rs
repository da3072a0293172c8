//! Micro-benchmarks of the tunnel's hot paths (`cargo bench -p mesh-hbone`):
//!
//! - `certs/lookup`: the workload certificate a TLS handshake asks for (cached);
//! - `hbone/relay_1MiB`: the byte relay between two in-memory streams;
//! - `hbone/connect_roundtrip`: a new CONNECT stream on a pooled mTLS connection over
//!   loopback, 1 KiB echoed, stream closed (the per-connection cost of a warm pool);
//! - `hbone/tunnel_4MiB`: bulk bytes through one tunnel (DATA framing, windows, TLS).
#![forbid(unsafe_code)]
#![allow(clippy::unwrap_used, clippy::expect_used)] // benchmark setup, like tests

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use mesh_hbone::{
    connect_request, relay, serve, AsyncIo, ConnectHeaders, InboundRequest, Pool, PoolConfig,
    PoolKey, ServerConfig,
};
use mesh_model::Identity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TD: &str = "cluster.local";

// === certificates ===

fn certs(c: &mut Criterion) {
    let ca = Arc::new(mesh_pki::ca::Ca::ephemeral(TD).expect("ca"));
    let certs = mesh_pki::certs::CertManager::new(ca, Duration::from_secs(3600));
    let ids: Vec<Identity> = (0..100)
        .map(|i| Identity::new(TD, "default", format!("sa-{i}")))
        .collect();
    for id in &ids {
        certs.certified_key(id).expect("issue");
    }
    let id = &ids[42];
    c.bench_function("certs/lookup", |b| {
        b.iter(|| certs.certified_key(black_box(id)).expect("cached"))
    });
}

// === HBONE ===

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn relay_copy(c: &mut Criterion) {
    const SIZE: usize = 1 << 20;
    let rt = runtime();
    let payload = vec![7u8; SIZE];
    let mut g = c.benchmark_group("hbone");
    g.throughput(Throughput::Bytes(SIZE as u64));
    g.bench_function("relay_1MiB", |b| {
        b.to_async(&rt).iter(|| async {
            // client ⇄ (a | relay | b) ⇄ sink
            let (mut client, a) = tokio::io::duplex(64 * 1024);
            let (b_end, mut sink) = tokio::io::duplex(64 * 1024);
            let relay = tokio::spawn(relay(AsyncIo(a), AsyncIo(b_end), |_, _| {}));
            let reader = tokio::spawn(async move {
                let mut got = Vec::with_capacity(SIZE);
                sink.read_to_end(&mut got).await.expect("read");
                got.len()
            });
            client.write_all(&payload).await.expect("write");
            client.shutdown().await.expect("shutdown");
            let got = reader.await.expect("reader");
            drop(client);
            let _ = relay.await;
            assert_eq!(got, SIZE);
        })
    });
    g.finish();
}

/// An HBONE echo server on loopback with the mesh's real TLS configs; returns its address
/// and the client's TLS config.
async fn hbone_echo() -> (SocketAddr, Arc<rustls::ClientConfig>) {
    let ca = Arc::new(mesh_pki::ca::Ca::ephemeral(TD).expect("ca"));
    let certs = mesh_pki::certs::CertManager::new(ca, Duration::from_secs(3600));
    let echo = Identity::new(TD, "default", "echo");
    let sleep = Identity::new(TD, "default", "sleep");
    let server_tls = mesh_pki::tls::server_config(certs.clone(), echo.clone()).expect("server tls");
    let client_tls = mesh_pki::tls::client_config(certs, sleep, vec![echo]).expect("client tls");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let _ = serve(tls, &ServerConfig::default(), echo_tunnel).await;
            });
        }
    });
    (addr, client_tls)
}

async fn echo_tunnel(req: InboundRequest) {
    let Ok(stream) = req.accept() else { return };
    let (mut r, mut w) = tokio::io::split(stream);
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

fn pool_key(dst: SocketAddr) -> PoolKey {
    PoolKey {
        src: Identity::new(TD, "default", "sleep"),
        src_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        dst: Identity::new(TD, "default", "echo"),
        dst_addr: dst,
    }
}

fn connect_headers() -> ConnectHeaders {
    ConnectHeaders {
        src_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
        service_host: Some("echo.default.svc.cluster.local".into()),
        baggage: vec![("k8s.namespace.name".into(), "default".into())],
        traceparent: None,
    }
}

/// Opens a tunnel on the pool, sends `payload`, half-closes, reads the echo back.
async fn roundtrip(
    pool: &Pool,
    addr: SocketAddr,
    tls: &Arc<rustls::ClientConfig>,
    payload: &[u8],
) -> usize {
    let target = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)), 8080);
    let mut tunnel = pool
        .connect(
            pool_key(addr),
            tls.clone(),
            move || TcpStream::connect(addr),
            connect_request(target, &connect_headers()),
        )
        .await
        .expect("tunnel");
    let (mut r, mut w) = tokio::io::split(&mut tunnel);
    let write = async {
        w.write_all(payload).await.expect("send");
        w.shutdown().await.expect("half-close");
    };
    let read = async {
        let mut back = Vec::with_capacity(payload.len());
        r.read_to_end(&mut back).await.expect("echo");
        back.len()
    };
    let ((), n) = tokio::join!(write, read);
    n
}

fn hbone_tunnel(c: &mut Criterion) {
    let rt = runtime();
    let (addr, tls) = rt.block_on(hbone_echo());
    let pool = Pool::new(PoolConfig::default());
    let small = vec![1u8; 1024];
    // Warm the pool: the benchmark measures streams on an established connection.
    assert_eq!(
        rt.block_on(roundtrip(&pool, addr, &tls, &small)),
        small.len()
    );
    let mut g = c.benchmark_group("hbone");
    g.bench_function("connect_roundtrip", |b| {
        b.to_async(&rt)
            .iter(|| async { roundtrip(&pool, addr, &tls, &small).await })
    });
    let big = vec![2u8; 4 << 20];
    g.throughput(Throughput::Bytes(big.len() as u64));
    g.sample_size(20);
    g.bench_function("tunnel_4MiB", |b| {
        b.to_async(&rt)
            .iter(|| async { roundtrip(&pool, addr, &tls, &big).await })
    });
    g.finish();
}

criterion_group!(benches, certs, relay_copy, hbone_tunnel);
criterion_main!(benches);
