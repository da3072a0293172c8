//! The agent binary under a low open-file limit (`prlimit`): out of descriptors, the accept
//! loop of a pod's 15008 backs off instead of spinning or dying, and once descriptors are
//! free again the agent serves a real client (RELIABILITY 38). The agent runs as a process
//! of its own (`--redirect loopback`, no root), so the limit touches nothing else.

mod support;

use std::net::{Ipv4Addr, SocketAddr};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_pki::ca::Ca;
use mesh_pki::certs::CertManager;
use support::agents::{dial, handshake, identity, Handshake, HBONE, TRUST_DOMAIN};
use tokio::io::AsyncBufReadExt;

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

    // Free them: the agent's ends close, and the next real client is served.
    drop(silent);
    let took = eventually_accepted(*client_ip, hbone, tls, Duration::from_secs(10)).await?;
    ensure!(agent.try_wait()?.is_none(), "the agent died");
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
