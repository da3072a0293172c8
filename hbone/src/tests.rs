//! Scenario tests over real loopback sockets: pool → mTLS → server → handler → tunnel.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};
use http::{Method, StatusCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Notify};
use tokio::task::JoinHandle;
use tracing::info;

use super::*;
use mesh_model::identity::Identity;

/// Upper bound for waiting on an event that should happen promptly; never a sync sleep.
const EVENTUALLY: Duration = Duration::from_secs(5);

// === fixtures ===

/// A throwaway mesh CA with a client ("sleep") and a server ("echo") workload certificate.
struct Pki {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

fn pki() -> Pki {
    pki_with_server_alpn(true)
}

/// The mesh's real TLS configurations (`crate::tls`) over an in-memory CA: a server for
/// `default/echo` and a client for `default/sleep` expecting it.
fn pki_with_server_alpn(server_alpn: bool) -> Pki {
    let ca = Arc::new(mesh_pki::ca::Ca::ephemeral("cluster.local").unwrap());
    let certs = mesh_pki::certs::CertManager::new(ca, std::time::Duration::from_secs(3600));
    let echo = Identity::new("cluster.local", "default", "echo");
    let sleep = Identity::new("cluster.local", "default", "sleep");
    let server = mesh_pki::tls::server_config(certs.clone(), echo.clone()).unwrap();
    let server = if server_alpn {
        server
    } else {
        let mut s = (*server).clone();
        s.alpn_protocols.clear();
        Arc::new(s)
    };
    let client = mesh_pki::tls::client_config(certs, sleep, vec![echo]).unwrap();
    Pki { client, server }
}

/// An HBONE server on 127.0.0.1: TLS accept + `serve` per connection. Connections are
/// driven inside the server task, so `kill` closes their sockets before it returns.
struct TestServer {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    ended: mpsc::UnboundedReceiver<Result<(), HboneError>>,
    task: Option<JoinHandle<()>>,
}

impl TestServer {
    async fn start<H, Fut>(tls: Arc<rustls::ServerConfig>, cfg: ServerConfig, handler: H) -> Self
    where
        H: Fn(InboundRequest) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let (ended_tx, ended) = mpsc::unbounded_channel();
        let handler = Arc::new(handler);
        let count = accepted.clone();
        let task = tokio::spawn(async move {
            let acceptor = tokio_rustls::TlsAcceptor::from(tls);
            let mut conns = FuturesUnordered::new();
            loop {
                tokio::select! {
                    Ok((tcp, _)) = listener.accept() => {
                        count.fetch_add(1, Ordering::SeqCst);
                        let (acceptor, handler, cfg) = (acceptor.clone(), handler.clone(), cfg.clone());
                        conns.push(async move {
                            let tls = acceptor.accept(tcp).await.map_err(HboneError::Tls)?;
                            serve(tls, &cfg, move |req| (*handler)(req)).await
                        });
                    }
                    Some(res) = conns.next(), if !conns.is_empty() => {
                        let _ = ended_tx.send(res);
                    }
                }
            }
        });
        TestServer {
            addr,
            accepted,
            ended,
            task: Some(task),
        }
    }

    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Waits until one served connection has ended and returns how.
    async fn connection_end(&mut self) -> Result<(), HboneError> {
        tokio::time::timeout(EVENTUALLY, self.ended.recv())
            .await
            .expect("a server connection ends")
            .expect("server task alive")
    }

    /// Stops the server; its connections' sockets are closed when this returns.
    async fn kill(mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
            let _ = task.await;
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

/// Counts how often the pool dials.
#[derive(Clone)]
struct Dialer {
    addr: SocketAddr,
    count: Arc<AtomicUsize>,
}

impl Dialer {
    fn new(addr: SocketAddr) -> Self {
        Dialer {
            addr,
            count: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn dial(&self) -> impl FnOnce() -> DialFuture {
        let (addr, count) = (self.addr, self.count.clone());
        move || {
            count.fetch_add(1, Ordering::SeqCst);
            Box::pin(TcpStream::connect(addr))
        }
    }

    /// A dial that only starts once `gate` is notified, so concurrent callers pile up.
    fn gated(&self, gate: Arc<Notify>) -> impl FnOnce() -> DialFuture {
        let (addr, count) = (self.addr, self.count.clone());
        move || {
            count.fetch_add(1, Ordering::SeqCst);
            Box::pin(async move {
                gate.notified().await;
                TcpStream::connect(addr).await
            })
        }
    }

    fn dials(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }
}

type DialFuture = std::pin::Pin<Box<dyn Future<Output = io::Result<TcpStream>> + Send>>;

fn identity(sa: &str) -> Identity {
    Identity::new("cluster.local", "default", sa)
}

fn key_for(src_sa: &str, dst: SocketAddr) -> PoolKey {
    PoolKey {
        src: identity(src_sa),
        src_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
        dst: identity("echo"),
        dst_addr: dst,
    }
}

fn key(dst: SocketAddr) -> PoolKey {
    key_for("sleep", dst)
}

fn headers() -> ConnectHeaders {
    ConnectHeaders {
        src_ip: IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7)),
        service_host: Some("echo.default.svc.cluster.local".to_string()),
        baggage: vec![
            ("k8s.namespace.name".into(), "default".into()),
            ("k8s.pod.name".into(), "sleep-1".into()),
            ("service.name".into(), "sleep".into()),
            ("service.version".into(), "v1".into()),
        ],
        traceparent: None,
    }
}

/// The application the tunnel is for (never dialed in these tests).
fn target() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 9)), 8080)
}

fn request() -> http::Request<()> {
    connect_request(target(), &headers())
}

/// Accepts every tunnel and echoes it, half-close included.
async fn echo(req: InboundRequest) {
    let Ok(stream) = req.accept() else { return };
    let (mut r, mut w) = tokio::io::split(stream);
    let _ = tokio::io::copy(&mut r, &mut w).await;
    let _ = w.shutdown().await;
}

async fn echo_server() -> (Pki, TestServer) {
    let pki = pki();
    let server = TestServer::start(pki.server.clone(), ServerConfig::default(), echo).await;
    (pki, server)
}

/// Sends one byte through and back, proving the tunnel is up end to end.
async fn ping(tunnel: &mut H2Stream) {
    tunnel.write_all(b"?").await.unwrap();
    let mut b = [0u8; 1];
    tunnel.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"?");
}

// === tunnel ===

#[tokio::test]
async fn a_tunnel_carries_a_mebibyte_each_way_intact() {
    let (pki, server) = echo_server().await;
    let pool = Pool::new(PoolConfig::default());
    let dialer = Dialer::new(server.addr);
    let tunnel = pool
        .connect(
            key(server.addr),
            pki.client.clone(),
            dialer.dial(),
            request(),
        )
        .await
        .unwrap();

    info!("writing 1 MiB while reading the echo, so both directions are busy at once");
    let data: Vec<u8> = (0..1usize << 20).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = tokio::io::split(tunnel);
    let write = async {
        w.write_all(&data).await.unwrap();
        w.shutdown().await.unwrap();
    };
    let read = async {
        let mut got = Vec::new();
        r.read_to_end(&mut got).await.unwrap();
        got
    };
    let ((), got) = tokio::join!(write, read);
    assert_eq!(got.len(), data.len());
    assert!(got == data, "echoed bytes differ");
}

#[tokio::test]
async fn half_close_lets_the_other_direction_finish() {
    let pki = pki();
    // The server reads until the client's END_STREAM, then still answers.
    let server = TestServer::start(pki.server.clone(), ServerConfig::default(), |req| async {
        let mut tunnel = req.accept().unwrap();
        let mut got = Vec::new();
        tunnel.read_to_end(&mut got).await.unwrap();
        let reply = format!("got {} bytes: {}", got.len(), String::from_utf8_lossy(&got));
        tunnel.write_all(reply.as_bytes()).await.unwrap();
        tunnel.shutdown().await.unwrap();
    })
    .await;
    let pool = Pool::new(PoolConfig::default());
    let mut tunnel = pool
        .connect(
            key(server.addr),
            pki.client.clone(),
            Dialer::new(server.addr).dial(),
            request(),
        )
        .await
        .unwrap();

    tunnel.write_all(b"hello").await.unwrap();
    tunnel.shutdown().await.unwrap();
    let mut reply = String::new();
    tunnel.read_to_string(&mut reply).await.unwrap();
    assert_eq!(reply, "got 5 bytes: hello");
    assert_eq!(
        tunnel.read(&mut [0u8; 8]).await.unwrap(),
        0,
        "EOF stays EOF"
    );
}

#[tokio::test]
async fn dropping_a_tunnel_end_resets_it_for_the_peer() {
    let pki = pki();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let server = TestServer::start(pki.server.clone(), ServerConfig::default(), move |req| {
        let seen_tx = seen_tx.clone();
        async move {
            let mut tunnel = req.accept().unwrap();
            let mut b = [0u8; 1];
            tunnel.read_exact(&mut b).await.unwrap();
            tunnel.write_all(&b).await.unwrap();
            let after = tunnel.read(&mut b).await;
            let _ = seen_tx.send(after.map_err(|e| e.kind()));
        }
    })
    .await;
    let pool = Pool::new(PoolConfig::default());
    let mut tunnel = pool
        .connect(
            key(server.addr),
            pki.client.clone(),
            Dialer::new(server.addr).dial(),
            request(),
        )
        .await
        .unwrap();
    // A round trip first: data still queued when a stream is reset is discarded.
    ping(&mut tunnel).await;
    info!("dropping the tunnel without a shutdown");
    drop(tunnel);
    let after = tokio::time::timeout(EVENTUALLY, seen.recv())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after, Err(io::ErrorKind::ConnectionReset));
}

// === CONNECT answers ===

async fn check_refusal(status: StatusCode) {
    let pki = pki();
    let server = TestServer::start(
        pki.server.clone(),
        ServerConfig::default(),
        move |req| async move { req.reject(status) },
    )
    .await;
    let pool = Pool::new(PoolConfig::default());
    let res = pool
        .connect(
            key(server.addr),
            pki.client.clone(),
            Dialer::new(server.addr).dial(),
            request(),
        )
        .await;
    match res {
        Err(HboneError::Status(got)) => assert_eq!(got, status),
        other => panic!("{status}: expected Status error, got {other:?}"),
    }
    // A refusal is an answer, not a broken connection: the next stream reuses it.
    assert_eq!(
        pool.stats(),
        PoolStats {
            connections: 1,
            streams: 0
        }
    );
}

#[tokio::test]
async fn refusals_come_back_as_their_status() {
    for status in [
        StatusCode::UNAUTHORIZED,
        StatusCode::SERVICE_UNAVAILABLE,
        StatusCode::BAD_REQUEST,
    ] {
        check_refusal(status).await;
    }
}

#[tokio::test]
async fn the_server_sees_forwarded_baggage_and_traceparent() {
    let pki = pki();
    let (seen_tx, mut seen) = mpsc::unbounded_channel();
    let server = TestServer::start(pki.server.clone(), ServerConfig::default(), move |req| {
        let seen_tx = seen_tx.clone();
        async move {
            let _ = seen_tx.send((
                req.method().clone(),
                req.authority().ok(),
                req.headers().clone(),
            ));
            req.reject(StatusCode::UNAUTHORIZED);
        }
    })
    .await;
    let pool = Pool::new(PoolConfig::default());
    let given = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    for traceparent in [None, Some(given)] {
        let h = ConnectHeaders {
            traceparent: traceparent.map(str::to_string),
            ..headers()
        };
        let dial = Dialer::new(server.addr).dial();
        let req = connect_request(target(), &h);
        let _ = pool
            .connect(key(server.addr), pki.client.clone(), dial, req)
            .await;
        let (method, authority, got) = seen.recv().await.unwrap();
        assert_eq!(method, Method::CONNECT);
        assert_eq!(authority, Some(target()));
        let header = |name: &str| {
            got.get(name)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(
            header("forwarded"),
            r#"for="10.0.0.7";host=echo.default.svc.cluster.local"#
        );
        assert_eq!(
            header("baggage"),
            "k8s.namespace.name=default,k8s.pod.name=sleep-1,service.name=sleep,service.version=v1"
        );
        let tp = header("traceparent");
        assert!(valid_traceparent(&tp), "traceparent {tp:?}");
        if let Some(given) = traceparent {
            assert_eq!(tp, given);
        }
    }
}

/// A raw HTTP/2 client over plain TCP, to send what our own client never would.
async fn raw_h2(addr: SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    send
}

/// What the handler made of a request: its method and `authority()`.
type Seen = (Method, Result<SocketAddr, String>);

async fn plain_server(
    cfg: ServerConfig,
) -> (
    SocketAddr,
    mpsc::UnboundedReceiver<Seen>,
    JoinHandle<Result<(), HboneError>>,
) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        serve(tcp, &cfg, move |req| {
            let tx = tx.clone();
            async move {
                let authority = req.authority().map_err(|e| e.to_string());
                let ok = authority.is_ok() && req.method() == Method::CONNECT;
                let _ = tx.send((req.method().clone(), authority));
                if ok {
                    echo(req).await;
                } else {
                    req.reject(StatusCode::BAD_REQUEST);
                }
            }
        })
        .await
    });
    (addr, rx, task)
}

#[tokio::test]
async fn the_handler_sees_malformed_authorities_as_errors() {
    let (addr, mut seen, _server) = plain_server(ServerConfig::default()).await;
    let client = raw_h2(addr).await;

    async fn check_raw(
        client: &h2::client::SendRequest<bytes::Bytes>,
        seen: &mut mpsc::UnboundedReceiver<Seen>,
        method: Method,
        uri: &str,
        want: Result<&str, &str>,
    ) {
        let req = http::Request::builder()
            .method(method.clone())
            .uri(uri)
            .body(())
            .unwrap();
        let (rsp, _send) = client
            .clone()
            .ready()
            .await
            .unwrap()
            .send_request(req, false)
            .unwrap();
        let (got_method, authority) = seen.recv().await.unwrap();
        assert_eq!(got_method, method, "{uri}");
        match (want, &authority) {
            (Ok(addr), Ok(got)) => assert_eq!(got, &addr.parse::<SocketAddr>().unwrap(), "{uri}"),
            (Err(fragment), Err(msg)) => assert!(msg.contains(fragment), "{uri}: {msg}"),
            _ => panic!("{uri}: want {want:?}, handler saw {authority:?}"),
        }
        let status = rsp.await.unwrap().status();
        let want_status = if want.is_ok() && method == Method::CONNECT {
            200
        } else {
            400
        };
        assert_eq!(status.as_u16(), want_status, "{uri}");
    }

    check_raw(
        &client,
        &mut seen,
        Method::CONNECT,
        "nonsense",
        Err("\"nonsense\""),
    )
    .await;
    check_raw(
        &client,
        &mut seen,
        Method::CONNECT,
        "10.1.2.3",
        Err("10.1.2.3"),
    )
    .await;
    check_raw(
        &client,
        &mut seen,
        Method::CONNECT,
        "10.1.2.3:0",
        Err("10.1.2.3:0"),
    )
    .await;
    check_raw(
        &client,
        &mut seen,
        Method::CONNECT,
        "echo.default:80",
        Err("echo.default:80"),
    )
    .await;
    check_raw(
        &client,
        &mut seen,
        Method::CONNECT,
        "10.1.2.3:8080",
        Ok("10.1.2.3:8080"),
    )
    .await;
    check_raw(
        &client,
        &mut seen,
        Method::CONNECT,
        "[fd00::1]:8080",
        Ok("[fd00::1]:8080"),
    )
    .await;
    // Not a CONNECT: the handler sees the method (and no bare authority) and refuses.
    check_raw(
        &client,
        &mut seen,
        Method::GET,
        "http://10.1.2.3:80/",
        Err("http://10.1.2.3:80/"),
    )
    .await;
}

#[tokio::test]
async fn a_silent_peer_is_cut_off_at_the_handshake_deadline() {
    let cfg = ServerConfig {
        handshake_timeout: Duration::from_millis(100),
        ..ServerConfig::default()
    };
    let (addr, _seen, server) = plain_server(cfg).await;
    info!("connecting without ever sending the HTTP/2 preface");
    let _silent = TcpStream::connect(addr).await.unwrap();
    let res = tokio::time::timeout(EVENTUALLY, server)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(res, Err(HboneError::HandshakeTimeout)), "{res:?}");
}

#[tokio::test]
async fn draining_finishes_open_tunnels_then_closes() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let drain = async move {
            let _ = drain_rx.await;
        };
        serve_with_drain(tcp, &ServerConfig::default(), echo, drain).await
    });
    let client = raw_h2(addr).await;
    let (rsp, send) = client
        .ready()
        .await
        .unwrap()
        .send_request(request(), false)
        .unwrap();
    let rsp = rsp.await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    let mut tunnel = H2Stream::new(send, rsp.into_body(), None);

    drain_tx.send(()).unwrap();
    info!("the tunnel opened before the drain keeps working");
    ping(&mut tunnel).await;
    tunnel.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tunnel.read_to_end(&mut rest).await.unwrap();
    drop(tunnel);
    let res = tokio::time::timeout(EVENTUALLY, server)
        .await
        .unwrap()
        .unwrap();
    assert!(res.is_ok(), "{res:?}");
}

#[tokio::test]
async fn an_idle_pooled_connection_lets_its_draining_server_finish_at_once() {
    // A peer agent shutting down (SIGTERM) drains its HBONE server: the idle connection our
    // pool keeps to it must not hold that drain up until the pool's idle timeout.
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let tls = pki.server.clone();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = tokio_rustls::TlsAcceptor::from(tls)
            .accept(tcp)
            .await
            .unwrap();
        let drain = async move {
            let _ = drain_rx.await;
        };
        serve_with_drain(tls, &ServerConfig::default(), echo, drain).await
    });
    let pool = Pool::new(PoolConfig::default());
    let dialer = Dialer::new(addr);
    let mut tunnel = pool
        .connect(key(addr), pki.client.clone(), dialer.dial(), request())
        .await
        .unwrap();
    ping(&mut tunnel).await;
    drop(tunnel);
    info!("the pool keeps the connection idle; the server starts draining");
    let started = Instant::now();
    drain_tx.send(()).unwrap();
    let res = tokio::time::timeout(EVENTUALLY, server)
        .await
        .expect("the drain ends before the pool's idle timeout")
        .unwrap();
    assert!(res.is_ok(), "{res:?}");
    info!(waited = ?started.elapsed(), "drained");
    // The pool sees the connection go and does not hand it out again.
    let deadline = Instant::now() + EVENTUALLY;
    while pool.stats().connections > 0 {
        assert!(
            Instant::now() < deadline,
            "the closed connection leaves the pool"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// === pool ===

#[tokio::test]
async fn sequential_streams_for_one_key_share_one_connection() {
    let (pki, server) = echo_server().await;
    let pool = Pool::new(PoolConfig::default());
    let dialer = Dialer::new(server.addr);
    for _ in 0..3 {
        let mut tunnel = pool
            .connect(
                key(server.addr),
                pki.client.clone(),
                dialer.dial(),
                request(),
            )
            .await
            .unwrap();
        ping(&mut tunnel).await;
        assert_eq!(
            pool.stats(),
            PoolStats {
                connections: 1,
                streams: 1
            }
        );
    }
    assert_eq!(dialer.dials(), 1);
    assert_eq!(server.accepted(), 1);
    assert_eq!(
        pool.stats(),
        PoolStats {
            connections: 1,
            streams: 0
        }
    );
}

#[tokio::test]
async fn a_full_connection_makes_the_pool_open_another() {
    let (pki, server) = echo_server().await;
    // The connection cap is for peers that take fewer streams than we would carry; this one
    // takes its full share, so it gets as many connections as the tunnels need.
    let pool = Pool::new(PoolConfig {
        max_streams_per_conn: 2,
        max_conns_per_key: 1,
        ..PoolConfig::default()
    });
    let dialer = Dialer::new(server.addr);
    let mut open = Vec::new();
    for _ in 0..3 {
        let mut tunnel = pool
            .connect(
                key(server.addr),
                pki.client.clone(),
                dialer.dial(),
                request(),
            )
            .await
            .unwrap();
        ping(&mut tunnel).await;
        open.push(tunnel);
    }
    assert_eq!(dialer.dials(), 2);
    assert_eq!(
        pool.stats(),
        PoolStats {
            connections: 2,
            streams: 3
        }
    );
    drop(open);
    assert_eq!(
        pool.stats(),
        PoolStats {
            connections: 2,
            streams: 0
        }
    );
}

/// Waits until `budget` has exactly `bytes` reserved.
async fn budget_settles_at(budget: &ReceiveBudget, bytes: u64) {
    tokio::time::timeout(EVENTUALLY, async {
        while budget.used() != bytes {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("budget used {} never became {bytes}", budget.used()));
}

/// A tunnel from `pool` to `server` for the source service account `sa` (its own pool key,
/// so its own connection).
async fn tunnel_as(
    pool: &Pool,
    sa: &str,
    server: &TestServer,
    pki: &Pki,
    dialer: &Dialer,
) -> Result<H2Stream, HboneError> {
    let key = key_for(sa, server.addr);
    pool.connect(key, pki.client.clone(), dialer.dial(), request())
        .await
}

#[tokio::test]
async fn server_connections_reserve_their_window_and_a_spent_budget_refuses_more() {
    let pki = pki();
    // Room for two minimum windows: the third connection finds none.
    let budget = ReceiveBudget::new(3 * u64::from(MIN_WINDOW) - 1);
    let cfg = ServerConfig {
        receive_budget: budget.clone(),
        ..ServerConfig::default()
    };
    let mut server = TestServer::start(pki.server.clone(), cfg, echo).await;
    let pool = Pool::new(PoolConfig::default());
    let dialer = Dialer::new(server.addr);
    let mut open = Vec::new();
    for sa in ["a", "b"] {
        let mut tunnel = tunnel_as(&pool, sa, &server, &pki, &dialer).await.unwrap();
        ping(&mut tunnel).await;
        open.push(tunnel);
    }
    assert_eq!(budget.used(), 2 * u64::from(MIN_WINDOW));
    info!("a third connection: no room left for its window");
    let third = tunnel_as(&pool, "c", &server, &pki, &dialer).await;
    assert!(third.is_err(), "{third:?}");
    let end = server.connection_end().await;
    assert!(matches!(end, Err(HboneError::OverBudget)), "{end:?}");
    info!("the windows come back when the connections end");
    drop(open);
    drop(pool);
    budget_settles_at(&budget, 0).await;
}

#[tokio::test]
async fn the_pool_reserves_before_it_dials_and_gives_the_window_back() {
    let (pki, server) = echo_server().await;
    let budget = ReceiveBudget::new(u64::from(MIN_WINDOW));
    let pool = Pool::new(PoolConfig {
        receive_budget: budget.clone(),
        idle_timeout: Duration::from_millis(100),
        ..PoolConfig::default()
    });
    let dialer = Dialer::new(server.addr);
    let mut tunnel = tunnel_as(&pool, "a", &server, &pki, &dialer).await.unwrap();
    ping(&mut tunnel).await;
    assert_eq!(budget.used(), u64::from(MIN_WINDOW));
    let refused = tunnel_as(&pool, "b", &server, &pki, &dialer).await;
    assert!(
        matches!(refused, Err(HboneError::OverBudget)),
        "{refused:?}"
    );
    assert_eq!(dialer.dials(), 1, "no dial without a window");
    drop(tunnel);
    info!("idle expiry closes the connection and returns its window");
    budget_settles_at(&budget, 0).await;
    let mut again = tunnel_as(&pool, "b", &server, &pki, &dialer).await.unwrap();
    ping(&mut again).await;
}

#[tokio::test]
async fn the_peers_stream_limit_is_honoured() {
    let pki = pki();
    let cfg = ServerConfig {
        max_concurrent_streams: 1,
        ..ServerConfig::default()
    };
    let server = TestServer::start(pki.server.clone(), cfg, echo).await;
    let pool = Pool::new(PoolConfig::default());
    let dialer = Dialer::new(server.addr);
    let mut first = pool
        .connect(
            key(server.addr),
            pki.client.clone(),
            dialer.dial(),
            request(),
        )
        .await
        .unwrap();
    // The server's SETTINGS arrived before the first 200, so the pool knows the limit.
    let mut second = pool
        .connect(
            key(server.addr),
            pki.client.clone(),
            dialer.dial(),
            request(),
        )
        .await
        .unwrap();
    ping(&mut first).await;
    ping(&mut second).await;
    assert_eq!(dialer.dials(), 2);
    assert_eq!(
        pool.stats(),
        PoolStats {
            connections: 2,
            streams: 2
        }
    );
}

#[tokio::test]
async fn different_keys_never_share_a_connection() {
    let (pki, server) = echo_server().await;
    let pool = Pool::new(PoolConfig::default());
    let dialer = Dialer::new(server.addr);
    let mut a = pool
        .connect(
            key_for("sleep", server.addr),
            pki.client.clone(),
            dialer.dial(),
            request(),
        )
        .await
        .unwrap();
    let mut b = pool
        .connect(
            key_for("other", server.addr),
            pki.client.clone(),
            dialer.dial(),
            request(),
        )
        .await
        .unwrap();
    ping(&mut a).await;
    ping(&mut b).await;
    assert_eq!(dialer.dials(), 2);
    assert_eq!(
        pool.stats(),
        PoolStats {
            connections: 2,
            streams: 2
        }
    );
}

#[tokio::test]
async fn an_idle_connection_is_closed() {
    let (pki, mut server) = echo_server().await;
    let pool = Pool::new(PoolConfig {
        idle_timeout: Duration::from_millis(100),
        ..PoolConfig::default()
    });
    let mut tunnel = pool
        .connect(
            key(server.addr),
            pki.client.clone(),
            Dialer::new(server.addr).dial(),
            request(),
        )
        .await
        .unwrap();
    ping(&mut tunnel).await;
    drop(tunnel);
    info!("waiting for the client to close the idle connection (GOAWAY, then EOF)");
    let end = server.connection_end().await;
    assert!(end.is_ok(), "clean close expected: {end:?}");
    assert_eq!(pool.stats(), PoolStats::default());
}

#[tokio::test]
async fn of_idle_connections_to_one_key_the_spares_close_soon_and_one_stays() {
    let (pki, mut server) = echo_server().await;
    let spare = Duration::from_millis(200);
    let pool = Pool::new(PoolConfig {
        max_streams_per_conn: 1,
        idle_timeout: Duration::from_secs(3600),
        spare_idle_timeout: spare,
        ..PoolConfig::default()
    });
    let dialer = Dialer::new(server.addr);
    let mut tunnels = Vec::new();
    for _ in 0..3 {
        let mut t = pool
            .connect(
                key(server.addr),
                pki.client.clone(),
                dialer.dial(),
                request(),
            )
            .await
            .unwrap();
        ping(&mut t).await;
        tunnels.push(t);
    }
    assert_eq!(dialer.dials(), 3);
    let closed_at = Instant::now();
    drop(tunnels);
    info!("two of the three close after the spare timeout (GOAWAY, then EOF)");
    for _ in 0..2 {
        let end = server.connection_end().await;
        assert!(end.is_ok(), "clean close expected: {end:?}");
    }
    let took = closed_at.elapsed();
    assert!(
        took >= spare - Duration::from_millis(50),
        "closed after {took:?}"
    );
    assert!(
        took < spare + Duration::from_secs(2),
        "closed after {took:?}"
    );
    info!("the last one stays for the full idle timeout, and carries the next tunnel");
    tokio::time::sleep(spare * 3).await;
    assert_eq!(
        pool.stats(),
        PoolStats {
            connections: 1,
            streams: 0
        }
    );
    let mut again = pool
        .connect(
            key(server.addr),
            pki.client.clone(),
            dialer.dial(),
            request(),
        )
        .await
        .unwrap();
    ping(&mut again).await;
    assert_eq!(dialer.dials(), 3);
}

#[tokio::test]
async fn after_the_server_dies_the_next_connect_dials_afresh() {
    let (pki, first) = echo_server().await;
    let pool = Pool::new(PoolConfig::default());
    let dialer = Dialer::new(first.addr);
    let mut tunnel = pool
        .connect(
            key(first.addr),
            pki.client.clone(),
            dialer.dial(),
            request(),
        )
        .await
        .unwrap();
    ping(&mut tunnel).await;
    drop(tunnel);
    first.kill().await;

    info!("same key, the destination came back elsewhere; the dead connection must not be used");
    let second = TestServer::start(pki.server.clone(), ServerConfig::default(), echo).await;
    let redial = Dialer::new(second.addr);
    let mut tunnel = pool
        .connect(
            key(dialer.addr),
            pki.client.clone(),
            redial.dial(),
            request(),
        )
        .await
        .unwrap();
    ping(&mut tunnel).await;
    assert_eq!(redial.dials(), 1);
    assert_eq!(second.accepted(), 1);
    assert_eq!(
        pool.stats(),
        PoolStats {
            connections: 1,
            streams: 1
        }
    );
}

#[tokio::test]
async fn after_a_goaway_the_pool_dials_afresh() {
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
    let _server = AbortOnDrop(tokio::spawn(async move {
        info!("first connection: GOAWAY is queued before the 200, so the client sees it first");
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let mut conn = h2::server::handshake(tls).await.unwrap();
        let (_req, mut respond) = conn.accept().await.unwrap().unwrap();
        conn.graceful_shutdown();
        let open = respond
            .send_response(http::Response::new(()), false)
            .unwrap();
        let first = AbortOnDrop(tokio::spawn(async move {
            let _open = open;
            while conn.accept().await.is_some() {}
        }));
        info!("second connection: a normal server");
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let _ = serve(tls, &ServerConfig::default(), echo).await;
        drop(first);
    }));
    let pool = Pool::new(PoolConfig::default());
    let dialer = Dialer::new(addr);
    let _first = pool
        .connect(key(addr), pki.client.clone(), dialer.dial(), request())
        .await
        .unwrap();
    let mut second = pool
        .connect(key(addr), pki.client.clone(), dialer.dial(), request())
        .await
        .unwrap();
    ping(&mut second).await;
    assert_eq!(dialer.dials(), 2);
}

/// Aborts a spawned task when the test ends, whatever way it ends.
struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[tokio::test]
async fn concurrent_first_connects_share_one_dial() {
    let (pki, server) = echo_server().await;
    let pool = Pool::new(PoolConfig::default());
    let dialer = Dialer::new(server.addr);
    let gate = Arc::new(Notify::new());
    let connects = (0..5).map(|_| {
        pool.connect(
            key(server.addr),
            pki.client.clone(),
            dialer.gated(gate.clone()),
            request(),
        )
    });
    let all = futures::future::join_all(connects);
    tokio::pin!(all);
    info!("one poll brings every connect to the pool; only the first may dial");
    assert!(futures::poll!(&mut all).is_pending());
    gate.notify_one();
    let mut tunnels = tokio::time::timeout(EVENTUALLY, all).await.unwrap();
    for t in &mut tunnels {
        ping(t.as_mut().unwrap()).await;
    }
    assert_eq!(dialer.dials(), 1);
    assert_eq!(
        pool.stats(),
        PoolStats {
            connections: 1,
            streams: 5
        }
    );
}

#[tokio::test]
async fn a_failed_dial_fails_everyone_waiting_on_it_then_clears() {
    let (pki, server) = echo_server().await;
    let pool = Pool::new(PoolConfig::default());
    let attempts = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Notify::new());
    let refused = |attempts: Arc<AtomicUsize>, gate: Arc<Notify>| {
        move || {
            attempts.fetch_add(1, Ordering::SeqCst);
            async move {
                gate.notified().await;
                Err::<TcpStream, _>(io::Error::new(io::ErrorKind::ConnectionRefused, "refused"))
            }
        }
    };
    let connects = (0..3).map(|_| {
        pool.connect(
            key(server.addr),
            pki.client.clone(),
            refused(attempts.clone(), gate.clone()),
            request(),
        )
    });
    let all = futures::future::join_all(connects);
    tokio::pin!(all);
    assert!(futures::poll!(&mut all).is_pending());
    gate.notify_one();
    for res in tokio::time::timeout(EVENTUALLY, all).await.unwrap() {
        match res {
            Err(HboneError::Dial(e)) => assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused),
            other => panic!("expected a dial error, got {other:?}"),
        }
    }
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert_eq!(pool.stats(), PoolStats::default());

    info!("the failure is not remembered: the next connect dials again");
    let mut tunnel = pool
        .connect(
            key(server.addr),
            pki.client.clone(),
            Dialer::new(server.addr).dial(),
            request(),
        )
        .await
        .unwrap();
    ping(&mut tunnel).await;
}

#[tokio::test]
async fn a_dial_that_never_answers_times_out_and_leaves_no_trace() {
    let (pki, server) = echo_server().await;
    let pool = Pool::new(PoolConfig {
        connect_timeout: Duration::from_millis(100),
        ..PoolConfig::default()
    });
    let hang = || std::future::pending::<io::Result<TcpStream>>();
    let res = pool
        .connect(key(server.addr), pki.client.clone(), hang, request())
        .await;
    assert!(matches!(res, Err(HboneError::Timeout)), "{res:?}");
    assert_eq!(pool.stats(), PoolStats::default());
    let mut tunnel = pool
        .connect(
            key(server.addr),
            pki.client.clone(),
            Dialer::new(server.addr).dial(),
            request(),
        )
        .await
        .unwrap();
    ping(&mut tunnel).await;
}

#[tokio::test]
async fn a_server_without_h2_alpn_is_refused() {
    let pki = pki_with_server_alpn(false);
    let server = TestServer::start(pki.server.clone(), ServerConfig::default(), echo).await;
    let pool = Pool::new(PoolConfig::default());
    let res = pool
        .connect(
            key(server.addr),
            pki.client.clone(),
            Dialer::new(server.addr).dial(),
            request(),
        )
        .await;
    assert!(matches!(res, Err(HboneError::Alpn)), "{res:?}");
    assert_eq!(pool.stats(), PoolStats::default());
}

// === relay ===

/// A connected loopback pair: (client end, server end).
async fn tcp_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (client, server) = tokio::join!(
        TcpStream::connect(listener.local_addr().unwrap()),
        listener.accept()
    );
    (client.unwrap(), server.unwrap().0)
}

/// `left ⇄ relay(a, b) ⇄ right`, counting what `on_bytes` reports.
struct Relayed {
    left: TcpStream,
    right: TcpStream,
    relay: JoinHandle<io::Result<(u64, u64)>>,
    reported: Arc<[AtomicUsize; 2]>,
}

async fn relayed() -> Relayed {
    let (left, a) = tcp_pair().await;
    let (b, right) = tcp_pair().await;
    let reported = Arc::new([AtomicUsize::new(0), AtomicUsize::new(0)]);
    let r = reported.clone();
    let relay = tokio::spawn(relay(a, b, move |dir, n| {
        let i = match dir {
            Direction::AToB => 0,
            Direction::BToA => 1,
        };
        r[i].fetch_add(n as usize, Ordering::SeqCst);
    }));
    Relayed {
        left,
        right,
        relay,
        reported,
    }
}

impl Relayed {
    async fn finish(self) -> (u64, u64) {
        let totals = tokio::time::timeout(EVENTUALLY, self.relay)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let reported = (
            self.reported[0].load(Ordering::SeqCst) as u64,
            self.reported[1].load(Ordering::SeqCst) as u64,
        );
        assert_eq!(totals, reported, "on_bytes must add up to the totals");
        totals
    }
}

#[tokio::test]
async fn relay_counts_what_it_moves_when_a_closes_first() {
    let mut r = relayed().await;
    let big = vec![7u8; 300_000];
    r.left.write_all(&big).await.unwrap();
    r.left.shutdown().await.unwrap();
    let mut got = Vec::new();
    r.right.read_to_end(&mut got).await.unwrap();
    assert_eq!(got.len(), big.len(), "right sees all bytes, then EOF");

    info!("after a's FIN, b → a still flows");
    r.right.write_all(b"late reply").await.unwrap();
    r.right.shutdown().await.unwrap();
    let mut reply = Vec::new();
    r.left.read_to_end(&mut reply).await.unwrap();
    assert_eq!(reply, b"late reply");
    assert_eq!(r.finish().await, (300_000, 10));
}

#[tokio::test]
async fn relay_counts_what_it_moves_when_b_closes_first() {
    let mut r = relayed().await;
    r.right.write_all(b"banner").await.unwrap();
    r.right.shutdown().await.unwrap();
    let mut banner = Vec::new();
    r.left.read_to_end(&mut banner).await.unwrap();
    assert_eq!(banner, b"banner");

    r.left
        .write_all(b"request after the server's FIN")
        .await
        .unwrap();
    r.left.shutdown().await.unwrap();
    let mut got = Vec::new();
    r.right.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"request after the server's FIN");
    assert_eq!(r.finish().await, (30, 6));
}

#[tokio::test]
async fn relay_ends_with_an_error_when_one_side_resets() {
    let r = relayed().await;
    // Linger 0: close sends RST instead of FIN (and does not block, as it would with a timeout).
    socket2::SockRef::from(&r.left)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(r.left);
    let res = tokio::time::timeout(EVENTUALLY, r.relay)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        res.map_err(|e| e.kind()).err(),
        Some(io::ErrorKind::ConnectionReset)
    );
}

// === headers ===

fn check<I: std::fmt::Debug + ?Sized, T: PartialEq + std::fmt::Debug>(
    f: impl Fn(&I) -> T,
    input: &I,
    want: T,
) {
    assert_eq!(f(input), want, "input {input:?}");
}

#[test]
fn forwarded_names_the_source_and_the_service_host() {
    let v4 = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
    let v6 = IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 7));
    let f = |(ip, host): &(IpAddr, Option<&str>)| forwarded_value(*ip, *host);
    check(f, &(v4, None), r#"for="10.0.0.7""#.to_string());
    check(f, &(v6, None), r#"for="[fd00::7]""#.to_string());
    check(
        f,
        &(v4, Some("echo.default.svc.cluster.local")),
        r#"for="10.0.0.7";host=echo.default.svc.cluster.local"#.to_string(),
    );
    check(
        f,
        &(v4, Some("echo:80")),
        r#"for="10.0.0.7";host="echo:80""#.to_string(),
    );
    check(
        f,
        &(v4, Some("bad\r\nhost")),
        r#"for="10.0.0.7""#.to_string(),
    );
    check(f, &(v4, Some("")), r#"for="10.0.0.7""#.to_string());
}

#[test]
fn forwarded_for_parses_back() {
    check(
        parse_forwarded_for,
        r#"for="10.0.0.7";host=echo"#,
        Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))),
    );
    check(
        parse_forwarded_for,
        r#"host=echo;for="[fd00::7]""#,
        Some("fd00::7".parse().unwrap()),
    );
    check(
        parse_forwarded_for,
        r#"For="[fd00::7]:443""#,
        Some("fd00::7".parse().unwrap()),
    );
    check(
        parse_forwarded_for,
        "for=10.0.0.7:8080, for=10.0.0.8",
        Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7))),
    );
    check(parse_forwarded_for, r#"for="_hidden";host=echo"#, None);
    check(parse_forwarded_for, "", None);
}

#[test]
fn baggage_round_trips_and_escapes_what_it_must() {
    let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let enc = |v: &[(&str, &str)]| baggage_value(&pairs(v));
    check(
        enc,
        &[("k8s.namespace.name", "default"), ("service.version", "v1")][..],
        "k8s.namespace.name=default,service.version=v1".into(),
    );
    check(
        enc,
        &[("k", "a b,c;d\"%")][..],
        "k=a%20b%2Cc%3Bd%22%25".into(),
    );
    check(enc, &[("bad key", "x"), ("ok", "y")][..], "ok=y".into());
    check(enc, &[][..], String::new());

    check(
        parse_baggage,
        "k=a%20b%2Cc%3Bd%22%25,x=1",
        pairs(&[("k", "a b,c;d\"%"), ("x", "1")]),
    );
    check(
        parse_baggage,
        " a = 1 ;prop=2, junk ,b=%zz",
        pairs(&[("a", "1"), ("b", "%zz")]),
    );
}

#[test]
fn traceparent_is_continued_only_when_well_formed() {
    check(
        valid_traceparent,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        true,
    );
    check(
        valid_traceparent,
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        false,
    );
    check(
        valid_traceparent,
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        false,
    );
    check(
        valid_traceparent,
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        false,
    );
    check(valid_traceparent, "00-4bf92f35-00f067aa0ba902b7-01", false);
    check(valid_traceparent, "garbage", false);
    for _ in 0..32 {
        let fresh = new_traceparent();
        assert!(valid_traceparent(&fresh), "{fresh}");
    }
}

#[test]
fn connect_requests_carry_an_authority_only() {
    let authority = |a: &SocketAddr| {
        let req = connect_request(*a, &headers());
        assert_eq!(req.method(), Method::CONNECT);
        assert!(req.uri().scheme().is_none() && req.uri().path_and_query().is_none());
        req.uri().to_string()
    };
    check(
        authority,
        &"10.0.0.9:8080".parse().unwrap(),
        "10.0.0.9:8080".to_string(),
    );
    check(
        authority,
        &"[fd00::9]:80".parse().unwrap(),
        "[fd00::9]:80".to_string(),
    );
    // A scope id has no place in an authority.
    check(
        authority,
        &"[fe80::1%2]:80".parse().unwrap(),
        "[fe80::1]:80".to_string(),
    );

    let mut h = headers();
    h.baggage.clear();
    assert!(connect_request(target(), &h)
        .headers()
        .get(BAGGAGE)
        .is_none());
}

/// The H2Stream is moved into per-connection tasks: it must stay Send, and small.
#[test]
fn tunnel_ends_are_send_and_small() {
    fn send<T: Send + Unpin>() {}
    send::<H2Stream>();
    send::<InboundRequest>();
    assert!(
        std::mem::size_of::<H2Stream>() <= 128,
        "{}",
        std::mem::size_of::<H2Stream>()
    );
}

// === hostile peers: the client pool ===

#[tokio::test]
async fn a_peer_that_takes_no_streams_gets_a_bounded_number_of_dials() {
    let pki = pki();
    let cfg = ServerConfig {
        max_concurrent_streams: 0,
        ..ServerConfig::default()
    };
    let server = TestServer::start(pki.server.clone(), cfg, echo).await;
    let pool = Pool::new(PoolConfig {
        connect_timeout: Duration::from_millis(500),
        max_conns_per_key: 2,
        ..PoolConfig::default()
    });
    let dialer = Dialer::new(server.addr);
    info!("20 concurrent connects to a peer advertising MAX_CONCURRENT_STREAMS 0");
    let attempts: FuturesUnordered<_> = (0..20)
        .map(|_| {
            pool.connect(
                key(server.addr),
                pki.client.clone(),
                dialer.dial(),
                request(),
            )
        })
        .collect();
    let results: Vec<_> = attempts.collect().await;
    assert!(results.iter().all(Result::is_err));
    let full = results
        .iter()
        .filter(|r| matches!(r, Err(HboneError::PoolFull)))
        .count();
    assert!(full > 0, "waiters on the full key say why: {results:?}");
    assert!(dialer.dials() <= 2, "dials: {}", dialer.dials());
    assert!(server.accepted() <= 2, "accepted: {}", server.accepted());
}

#[tokio::test]
async fn callers_beyond_the_connection_cap_wait_for_a_free_stream() {
    let pki = pki();
    let cfg = ServerConfig {
        max_concurrent_streams: 1,
        ..ServerConfig::default()
    };
    let server = TestServer::start(pki.server.clone(), cfg, echo).await;
    let pool = Pool::new(PoolConfig {
        max_conns_per_key: 1,
        ..PoolConfig::default()
    });
    let dialer = Dialer::new(server.addr);
    let mut first = pool
        .connect(
            key(server.addr),
            pki.client.clone(),
            dialer.dial(),
            request(),
        )
        .await
        .unwrap();
    ping(&mut first).await;
    let second = pool.connect(
        key(server.addr),
        pki.client.clone(),
        dialer.dial(),
        request(),
    );
    tokio::pin!(second);
    info!("the only connection is full: the second caller waits instead of dialing");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut second)
            .await
            .is_err()
    );
    drop(first);
    let mut second = tokio::time::timeout(EVENTUALLY, second)
        .await
        .unwrap()
        .unwrap();
    ping(&mut second).await;
    assert_eq!(dialer.dials(), 1);
}

#[tokio::test]
async fn a_peer_that_stops_answering_pings_is_dropped_with_its_streams() {
    let pki = pki();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server.clone());
    let freeze = Arc::new(Notify::new());
    let frozen = freeze.clone();
    let _server = AbortOnDrop(tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let tls = acceptor.accept(tcp).await.unwrap();
        let mut conn = h2::server::handshake(tls).await.unwrap();
        let mut open = Vec::new();
        loop {
            tokio::select! {
                Some(Ok((_req, mut respond))) = conn.accept() => {
                    open.push(respond.send_response(http::Response::new(()), false).unwrap());
                }
                () = frozen.notified() => break,
            }
        }
        info!("the peer's node vanished: the connection is held but nothing is answered");
        std::future::pending::<()>().await;
        drop((conn, open));
    }));
    let (interval, timeout) = (Duration::from_millis(200), Duration::from_millis(300));
    let pool = Pool::new(PoolConfig {
        ping_interval: Some(interval),
        ping_timeout: timeout,
        ..PoolConfig::default()
    });
    let dialer = Dialer::new(addr);
    let mut tunnel = pool
        .connect(key(addr), pki.client.clone(), dialer.dial(), request())
        .await
        .unwrap();
    info!("a few pings are answered while the peer is alive");
    tokio::time::sleep(interval * 3).await;
    assert_eq!(pool.stats().connections, 1);
    freeze.notify_one();
    let frozen_at = tokio::time::Instant::now();
    let mut b = [0u8; 1];
    let read = tokio::time::timeout(EVENTUALLY, tunnel.read(&mut b))
        .await
        .expect("the stream fails once the connection is declared dead");
    let took = frozen_at.elapsed();
    assert!(read.is_err(), "{read:?}");
    assert!(
        took <= interval + timeout + Duration::from_millis(300),
        "dead peer noticed after {took:?}"
    );
    assert_eq!(pool.stats().connections, 0);
    drop(tunnel);
}

// === hostile peers: the server ===

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const GOAWAY_FRAME: u8 = 0x7;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const WINDOW_UPDATE: u8 = 0x8;
const CONTINUATION: u8 = 0x9;
const END_HEADERS: u8 = 0x4;

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut f = vec![len[1], len[2], len[3], kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK for `CONNECT 127.0.0.1:9`: literal fields with indexed names (:authority is
/// static entry 1, :method entry 2), no Huffman.
fn connect_headers() -> Vec<u8> {
    let mut b = vec![0x02, 7];
    b.extend_from_slice(b"CONNECT");
    b.extend_from_slice(&[0x01, 11]);
    b.extend_from_slice(b"127.0.0.1:9");
    b
}

/// A hostile HTTP/2 client writing raw frames. A task reads and discards what the server
/// sends (the attacker keeps reading, so backpressure alone does not stop it) and notes
/// when the server closed the connection.
struct RawPeer {
    w: tokio::net::tcp::OwnedWriteHalf,
    closed: JoinHandle<tokio::time::Instant>,
}

impl RawPeer {
    async fn connect(addr: SocketAddr) -> RawPeer {
        let (mut r, mut w) = TcpStream::connect(addr).await.unwrap().into_split();
        w.write_all(PREFACE).await.unwrap();
        w.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
        let closed = tokio::spawn(async move {
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n) = r.read(&mut buf).await {
                if n == 0 {
                    break;
                }
            }
            tokio::time::Instant::now()
        });
        RawPeer { w, closed }
    }

    /// Writes `unit` (one or more frames, `per_unit` of them counted by the limit) until the
    /// server closes the connection; returns how long after the limit was crossed it did.
    async fn flood(mut self, unit: &[u8], per_unit: u32, limit: u32) -> Duration {
        const BATCH: usize = 100;
        let batch: Vec<u8> = unit.repeat(BATCH);
        let mut sent = 0u32;
        let mut crossed = None;
        // Bounded: 2000 batches is far beyond any limit under test.
        for _ in 0..2000 {
            if self.w.write_all(&batch).await.is_err() {
                break;
            }
            sent += per_unit * u32::try_from(BATCH).unwrap();
            if sent > limit && crossed.is_none() {
                crossed = Some(tokio::time::Instant::now());
            }
            if self.closed.is_finished() {
                break;
            }
        }
        let crossed = crossed.expect("the flood crossed the limit");
        let closed = tokio::time::timeout(EVENTUALLY, self.closed)
            .await
            .expect("the server closes a flooding connection")
            .unwrap();
        closed.saturating_duration_since(crossed)
    }
}

/// Runs one flood against a plain-TCP `serve` and checks the connection was cut within a
/// second of crossing the limit, for one of `reasons`.
async fn check_flood(
    setup: &[Vec<u8>],
    unit: Vec<u8>,
    per_unit: u32,
    limit: u32,
    reasons: &[&str],
) {
    let (addr, _seen, server) = plain_server(ServerConfig::default()).await;
    let mut peer = RawPeer::connect(addr).await;
    for f in setup {
        peer.w.write_all(f).await.unwrap();
    }
    let cut_after = peer.flood(&unit, per_unit, limit).await;
    let res = tokio::time::timeout(EVENTUALLY, server)
        .await
        .unwrap()
        .unwrap();
    let reason = res.as_ref().err().and_then(HboneError::abuse_reason);
    info!(?reason, ?cut_after, "flood cut off");
    assert!(
        reason.is_some_and(|r| reasons.contains(&r)),
        "expected one of {reasons:?}: {res:?}"
    );
    assert!(
        cut_after < Duration::from_secs(1),
        "cut {cut_after:?} after the limit"
    );
}

const LIMIT: u32 = crate::server::DEFAULT_MAX_CONTROL_FRAMES_PER_SEC;

#[tokio::test]
async fn a_ping_flood_is_cut_off() {
    check_flood(&[], frame(PING, 0, 0, &[7; 8]), 1, LIMIT, &["ping_flood"]).await;
}

#[tokio::test]
async fn a_settings_flood_is_cut_off() {
    check_flood(
        &[],
        frame(SETTINGS, 0, 0, &[]),
        1,
        LIMIT,
        &["settings_flood"],
    )
    .await;
}

#[tokio::test]
async fn a_window_update_flood_is_cut_off() {
    let unit = frame(WINDOW_UPDATE, 0, 0, &1u32.to_be_bytes());
    // Increments of 1 would overflow the window only after 2^31 frames; the count trips first.
    let limit = LIMIT * crate::guard::WINDOW_UPDATE_FACTOR;
    check_flood(&[], unit, 1, limit, &["window_update_flood"]).await;
}

#[tokio::test]
async fn an_empty_data_flood_is_cut_off() {
    let open = frame(HEADERS, END_HEADERS, 1, &connect_headers());
    // h2 allows 100 empty DATA frames per connection; our own count is the backstop.
    check_flood(
        &[open],
        frame(DATA, 0, 1, &[]),
        1,
        100,
        &["enhance_your_calm", "empty_data_flood"],
    )
    .await;
}

#[tokio::test]
async fn rapid_reset_is_cut_off() {
    // Each unit opens a stream and resets it at once (CVE-2023-44487). Stream ids must
    // grow, so the units are built one by one rather than repeated.
    let (addr, _seen, server) = plain_server(ServerConfig::default()).await;
    let mut peer = RawPeer::connect(addr).await;
    let mut crossed = None;
    let limit = LIMIT;
    for i in 0..50_000u32 {
        let id = 2 * i + 1;
        let mut unit = frame(HEADERS, END_HEADERS, id, &connect_headers());
        unit.extend(frame(RST_STREAM, 0, id, &8u32.to_be_bytes()));
        if peer.w.write_all(&unit).await.is_err() || peer.closed.is_finished() {
            break;
        }
        if i == limit && crossed.is_none() {
            crossed = Some(tokio::time::Instant::now());
        }
    }
    let closed = tokio::time::timeout(EVENTUALLY, peer.closed)
        .await
        .expect("the server closes a rapid-reset connection")
        .unwrap();
    let res = tokio::time::timeout(EVENTUALLY, server)
        .await
        .unwrap()
        .unwrap();
    let reason = res.as_ref().err().and_then(HboneError::abuse_reason);
    assert!(
        matches!(reason, Some("enhance_your_calm" | "rst_stream_flood")),
        "{res:?}"
    );
    // Cut before our limit of resets (h2's own counter), or within 1 s after it.
    if let Some(crossed) = crossed {
        assert!(closed.saturating_duration_since(crossed) < Duration::from_secs(1));
    }
}

#[tokio::test]
async fn a_continuation_flood_is_cut_off() {
    let (addr, _seen, server) = plain_server(ServerConfig::default()).await;
    let mut peer = RawPeer::connect(addr).await;
    info!("HEADERS without END_HEADERS, then endless CONTINUATION frames");
    peer.w
        .write_all(&frame(HEADERS, 0, 1, &connect_headers()))
        .await
        .unwrap();
    // h2 takes at most max_header_list_size / max_frame_size CONTINUATIONs (+25 %, at
    // least 5) per header block, however small they are.
    let cut_after = peer.flood(&frame(CONTINUATION, 0, 1, &[]), 1, 5).await;
    let res = tokio::time::timeout(EVENTUALLY, server)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        res.as_ref().err().and_then(HboneError::abuse_reason),
        Some("enhance_your_calm"),
        "{res:?}"
    );
    assert!(cut_after < Duration::from_secs(1), "{cut_after:?}");
}

#[tokio::test]
async fn a_peer_that_never_answers_pings_is_cut_off() {
    let (interval, timeout) = (Duration::from_millis(100), Duration::from_millis(200));
    let cfg = ServerConfig {
        ping_interval: Some(interval),
        ping_timeout: timeout,
        ..ServerConfig::default()
    };
    let (addr, _seen, server) = plain_server(cfg).await;
    info!("a peer that sends the preface, then never reads again (node gone, stalled)");
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(PREFACE).await.unwrap();
    tcp.write_all(&frame(SETTINGS, 0, 0, &[])).await.unwrap();
    let started = tokio::time::Instant::now();
    let res = tokio::time::timeout(EVENTUALLY, server)
        .await
        .unwrap()
        .unwrap();
    let took = started.elapsed();
    assert!(matches!(res, Err(HboneError::PingTimeout)), "{res:?}");
    assert!(
        took <= interval + timeout + Duration::from_millis(300),
        "{took:?}"
    );
    drop(tcp);
}

#[tokio::test]
async fn a_live_peer_keeps_its_connection_through_many_pings() {
    let cfg = ServerConfig {
        ping_interval: Some(Duration::from_millis(50)),
        ping_timeout: Duration::from_millis(200),
        ..ServerConfig::default()
    };
    let (addr, _seen, server) = plain_server(cfg).await;
    let client = raw_h2(addr).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(
        !server.is_finished(),
        "a peer answering pings stays connected"
    );
    let (rsp, send) = client
        .ready()
        .await
        .unwrap()
        .send_request(request(), false)
        .unwrap();
    let rsp = rsp.await.unwrap();
    let mut tunnel = H2Stream::new(send, rsp.into_body(), None);
    ping(&mut tunnel).await;
}

#[tokio::test]
async fn a_tunnel_whose_peer_never_opens_its_window_is_reset() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stall = Duration::from_millis(300);
    let cfg = ServerConfig {
        send_stall_timeout: Some(stall),
        ..ServerConfig::default()
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let _server = AbortOnDrop(tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let _ = serve(tcp, &cfg, move |req| {
            let tx = tx.clone();
            async move {
                let mut tunnel = req.accept().unwrap();
                let chunk = vec![0u8; 16 * 1024];
                // Bounded: 1 MiB is far more than the client's 64 KiB window.
                let mut res = Ok(());
                let mut last_progress = tokio::time::Instant::now();
                for _ in 0..64 {
                    res = tunnel.write_all(&chunk).await;
                    if res.is_err() {
                        break;
                    }
                    last_progress = tokio::time::Instant::now();
                }
                let _ = tx.send((res, last_progress.elapsed()));
            }
        })
        .await;
    }));
    info!("a client that opens a tunnel and never reads from it");
    let client = raw_h2(addr).await;
    let (rsp, _send) = client
        .ready()
        .await
        .unwrap()
        .send_request(request(), false)
        .unwrap();
    let rsp = rsp.await.unwrap();
    assert_eq!(rsp.status(), StatusCode::OK);
    let (res, stalled_for) = tokio::time::timeout(EVENTUALLY, rx.recv())
        .await
        .unwrap()
        .unwrap();
    let err = res.expect_err("the write into a shut window fails");
    assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
    assert!(
        stalled_for >= stall && stalled_for < stall + Duration::from_millis(500),
        "{stalled_for:?}"
    );
    drop(rsp);
}

#[tokio::test]
async fn the_server_closes_a_connection_without_streams_after_its_idle_timeout() {
    let pki = pki();
    let idle = Duration::from_millis(300);
    let cfg = ServerConfig {
        idle_timeout: idle,
        ..ServerConfig::default()
    };
    let mut server = TestServer::start(pki.server.clone(), cfg, echo).await;
    // A client pool that would keep the connection for an hour: only the server closes it.
    let pool = Pool::new(PoolConfig {
        idle_timeout: Duration::from_secs(3600),
        ..PoolConfig::default()
    });
    let mut tunnel = pool
        .connect(
            key(server.addr),
            pki.client.clone(),
            Dialer::new(server.addr).dial(),
            request(),
        )
        .await
        .unwrap();
    info!("a stream open for three idle timeouts keeps the connection");
    for _ in 0..3 {
        tokio::time::sleep(idle).await;
        ping(&mut tunnel).await;
    }
    assert_eq!(server.accepted(), 1);
    drop(tunnel);
    let closed_at = std::time::Instant::now();
    let end = server.connection_end().await;
    let took = closed_at.elapsed();
    assert!(end.is_ok(), "GOAWAY and a clean close: {end:?}");
    assert!(
        took >= idle - Duration::from_millis(50),
        "closed early: {took:?}"
    );
    assert!(
        took < idle + Duration::from_secs(1),
        "closed late: {took:?}"
    );
}

/// Reads frames until one of `kind` on `stream` arrives; returns its payload.
async fn read_frame_until(tcp: &mut TcpStream, kind: u8, stream: u32) -> Vec<u8> {
    for _ in 0..64 {
        let mut head = [0u8; 9];
        tcp.read_exact(&mut head).await.unwrap();
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        tcp.read_exact(&mut payload).await.unwrap();
        if head[3] == kind && id == stream {
            return payload;
        }
    }
    panic!("no frame of type {kind} on stream {stream}");
}

#[tokio::test]
async fn a_stream_opened_after_the_drain_is_refused_for_a_retry_elsewhere() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let served = Arc::new(AtomicUsize::new(0));
    let count = served.clone();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let drain = async move {
            let _ = drain_rx.await;
        };
        let handler = move |req: InboundRequest| {
            count.fetch_add(1, Ordering::SeqCst);
            echo(req)
        };
        serve_with_drain(tcp, &ServerConfig::default(), handler, drain).await
    });
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(SETTINGS, 0, 0, &[]));
    hello.extend(frame(SETTINGS, 0x1, 0, &[]));
    hello.extend(frame(HEADERS, END_HEADERS, 1, &connect_headers()));
    tcp.write_all(&hello).await.unwrap();
    info!("stream 1, opened before the drain, is answered");
    read_frame_until(&mut tcp, HEADERS, 1).await;

    drain_tx.send(()).unwrap();
    let goaway = read_frame_until(&mut tcp, GOAWAY_FRAME, 0).await;
    info!(
        ?goaway,
        "GOAWAY at once; stream 3 was sent before the client read it"
    );
    tcp.write_all(&frame(HEADERS, END_HEADERS, 3, &connect_headers()))
        .await
        .unwrap();
    let reset = read_frame_until(&mut tcp, RST_STREAM, 3).await;
    assert_eq!(
        u32::from_be_bytes([reset[0], reset[1], reset[2], reset[3]]),
        u32::from(h2::Reason::REFUSED_STREAM),
        "stream 3 must be refused (retryable), not served"
    );
    assert_eq!(
        served.load(Ordering::SeqCst),
        1,
        "only stream 1 reached the handler"
    );
    drop(tcp);
    let res = tokio::time::timeout(EVENTUALLY, server)
        .await
        .unwrap()
        .unwrap();
    assert!(
        res.is_ok() || matches!(res, Err(HboneError::H2(_))),
        "{res:?}"
    );
}
