//! The agent binary under a low open-file limit (`prlimit`): out of descriptors, the accept
//! loop of a pod's 15008 backs off instead of spinning or dying, and once descriptors are
//! free again the agent serves a real client (RELIABILITY 38). A tunnel established before
//! keeps relaying while descriptors are out and after; readiness answers again once they
//! are back. The agent runs as a process of its own (`--redirect loopback`, no root), so the
//! limit touches nothing else.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_pki::ca::Ca;
use mesh_pki::certs::CertManager;
use support::agents::{dial, handshake, identity, Handshake, HBONE, TRUST_DOMAIN};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

/// The agent's open-file limit: a few dozen for its own sockets and files, the rest for
/// connections.
const NOFILE: usize = 128;

/// The child's stderr lines, collected as they come.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn contains(&self, needle: &str) -> bool {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().any(|l| l.contains(needle))
    }
}

async fn eventually_accepted(
    src: Ipv4Addr,
    dst: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    within: Duration,
) -> Result<Duration> {
    let started = Instant::now();
    loop {
        let attempt =
            tokio::time::timeout(Duration::from_secs(1), handshake(src, dst, tls.clone())).await;
        if let Ok(Ok(Handshake::Accepted)) = attempt {
            return Ok(started.elapsed());
        }
        ensure!(
            started.elapsed() < within,
            "not served within {within:?}: {attempt:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An echo server on `addr` (the server pod's app), for the tunnel.
async fn echo_app(addr: SocketAddr) -> Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    Ok(())
}

/// A tunnel to the app through the agent's 15008: HBONE CONNECT over mutual TLS.
struct Tunnel {
    send: h2::SendStream<bytes::Bytes>,
    recv: h2::RecvStream,
}

impl Tunnel {
    async fn open(
        src: Ipv4Addr,
        hbone: SocketAddr,
        app: SocketAddr,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Tunnel> {
        let tcp = dial(src.into(), hbone).await?;
        let tls = tokio_rustls::TlsConnector::from(tls)
            .connect(mesh_pki::tls::server_name(), tcp)
            .await?;
        let (client, conn) = h2::client::handshake(tls).await?;
        tokio::spawn(conn);
        let mut client = client.ready().await?;
        let request = mesh_hbone::connect_request(
            app,
            &mesh_hbone::ConnectHeaders {
                src_ip: src.into(),
                service_host: None,
                baggage: Vec::new(),
                traceparent: None,
            },
        );
        let (response, send) = client.send_request(request, false)?;
        let response = response.await?;
        ensure!(response.status() == 200, "CONNECT: {}", response.status());
        Ok(Tunnel {
            send,
            recv: response.into_body(),
        })
    }

    /// Sends `payload` and reads as many bytes back, within 5 s.
    async fn echo(&mut self, payload: &'static [u8]) -> Result<()> {
        self.send
            .send_data(bytes::Bytes::from_static(payload), false)?;
        let mut back = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), async {
            while back.len() < payload.len() {
                let chunk = self.recv.data().await.context("tunnel ended")??;
                let _ = self.recv.flow_control().release_capacity(chunk.len());
                back.extend_from_slice(&chunk);
            }
            Ok::<_, anyhow::Error>(())
        })
        .await
        .context("no echo within 5 s")??;
        ensure!(back == payload, "echoed {back:?}");
        Ok(())
    }
}

/// `GET /healthz/ready` on the agent's readiness listener: its status, or an error.
async fn readiness(addr: SocketAddr) -> Result<u16> {
    let mut tcp =
        tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr))
            .await??;
    tcp.write_all(b"GET /healthz/ready HTTP/1.1\r\nhost: agent\r\nconnection: close\r\n\r\n")
        .await?;
    let mut reply = String::new();
    tokio::time::timeout(Duration::from_secs(1), tcp.read_to_string(&mut reply)).await??;
    let status = reply
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("no status line")?;
    Ok(status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_descriptors_the_agent_backs_off_then_serves_again() -> Result<()> {
    let prlimit = std::process::Command::new("prlimit")
        .arg("--version")
        .output();
    ensure!(
        prlimit.is_ok_and(|o| o.status.success()),
        "needs prlimit (util-linux)"
    );
    // A /24 of loopback of its own: 127.213.<pid>.x.
    let third = (std::process::id() % 250) as u8;
    let ip = move |last: u8| Ipv4Addr::new(127, 213, third, last);
    let rendered = e2e::Mesh::two_nodes("fd")
        .pod(e2e::Pod::echo_server("server", "n2"))
        .render(|node, host| ip(node * 50 + host + 2))?;
    let dir = tempfile::tempdir()?;
    let (config_dir, ca_dir) = (dir.path().join("config"), dir.path().join("ca"));
    std::fs::create_dir_all(&config_dir)?;
    for (file, content) in &rendered.files {
        std::fs::write(config_dir.join(file), content)?;
    }
    let ca = Arc::new(Ca::load_or_create(&ca_dir, TRUST_DOMAIN)?);
    let certs = CertManager::new(ca, Duration::from_secs(3600));
    let (_, server_ip) = rendered.pods.get("default/server").context("server pod")?;
    let (_, client_ip) = rendered.pods.get("default/client").context("client pod")?;
    let hbone = SocketAddr::new((*server_ip).into(), HBONE);
    let tls = mesh_pki::tls::client_config(
        certs,
        identity("default", "client"),
        vec![identity("default", "server")],
    )?;

    let endpoints = ip(1);
    let mut agent = tokio::process::Command::new("prlimit")
        .arg(format!("--nofile={NOFILE}:{NOFILE}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_ztunnel"))
        .args([
            "--node-name=n2".to_string(),
            "--redirect=loopback".to_string(),
            format!("--config-dir={}", config_dir.display()),
            format!("--ca-dir={}", ca_dir.display()),
            format!("--admin-addr={endpoints}:15000"),
            format!("--metrics-addr={endpoints}:15020"),
            format!("--readiness-addr={endpoints}:15021"),
            "--tls-handshake-timeout=2s".to_string(),
            // The silent connections all come from the client's address: its share of
            // handshakes lifted, so that descriptors run out before it does.
            "--max-tls-handshakes-per-source=1024".to_string(),
        ])
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("start the agent under prlimit")?;
    let log = Log::default();
    let stderr = agent.stderr.take().context("stderr")?;
    tokio::spawn({
        let log = log.clone();
        async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                log.0.lock().unwrap_or_else(|e| e.into_inner()).push(line);
            }
        }
    });
    eventually_accepted(*client_ip, hbone, tls.clone(), Duration::from_secs(20)).await?;
    let app = SocketAddr::new((*server_ip).into(), 8080);
    echo_app(app).await?;
    let mut tunnel = Tunnel::open(*client_ip, hbone, app, tls.clone()).await?;
    tunnel.echo(b"before").await?;
    let ready = SocketAddr::new(endpoints.into(), 15021);
    ensure!(readiness(ready).await? == 200, "ready before");

    // More silent connections than the agent has descriptors: the kernel completes them
    // all (the listener's backlog), the agent accepts until EMFILE and then backs off.
    let mut silent = Vec::new();
    for _ in 0..NOFILE + 40 {
        silent.push(dial((*client_ip).into(), hbone).await?);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !log.contains("backing off") {
        ensure!(
            Instant::now() < deadline,
            "the agent never ran out of descriptors"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ensure!(
        agent.try_wait()?.is_none(),
        "the agent died out of descriptors"
    );
    // The established tunnel needs no new descriptor: it keeps relaying.
    tunnel.echo(b"while out of descriptors").await?;

    // Free them: the agent's ends close, and the next real client is served.
    drop(silent);
    let took = eventually_accepted(*client_ip, hbone, tls, Duration::from_secs(10)).await?;
    ensure!(agent.try_wait()?.is_none(), "the agent died");
    tunnel.echo(b"after").await?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !readiness(ready).await.is_ok_and(|s| s == 200) {
        ensure!(Instant::now() < deadline, "not ready again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !log.contains("accepting again") {
        ensure!(Instant::now() < deadline, "no recovery logged");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tracing::info!(?took, "served again");
    agent.start_kill()?;
    let _ = agent.wait().await;
    Ok(())
}
