//! This machine's way into the mesh: a TCP forward from `127.0.0.1:<port>` in the root
//! namespace to an address inside a node's namespace, for as long as `up` runs — a node
//! agent's metrics port (`127.0.0.1:15020`, where the dashboard is) for a browser, an ingress
//! gateway's listener (the pod's IP and the listener's port, as a load balancer would reach
//! it) for `curl`. The root namespace's end is loopback only: no namespace is linked to a
//! real interface. It lives in the `up` process, so a crashed `up` leaves nothing.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};

/// The agent's metrics port inside the node (where `/dashboard` and `/stats` are).
pub const NODE_METRICS_PORT: u16 = 15020;
/// The first node's forward listens here, the next on the port after, and so on; a taken
/// port falls back to one the kernel picks.
pub const FIRST_LOCAL_PORT: u16 = 15120;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

type Open = Arc<Mutex<HashMap<u64, TcpStream>>>;

/// One forward; dropping it closes the listener and every forwarded connection.
pub struct Forward {
    /// What it forwards to (a node's name for a dashboard).
    pub name: String,
    /// Where to point a browser or `curl` (root namespace).
    pub local: SocketAddr,
    stop: Arc<AtomicBool>,
    open: Open,
    accept: Option<JoinHandle<()>>,
}

impl Forward {
    /// A node's dashboard: `127.0.0.1:preferred` (else any free port) to `127.0.0.1:15020`
    /// in the node's namespace `netns`.
    pub fn dashboard(node: &str, netns: &str, preferred: u16) -> Result<Forward> {
        let target = SocketAddr::from((Ipv4Addr::LOCALHOST, NODE_METRICS_PORT));
        Forward::start(node, netns, target, preferred)
    }

    /// Listens on `127.0.0.1:preferred` (else any free port) and forwards each connection
    /// into `netns` (a named network namespace) to `target`.
    pub fn start(name: &str, netns: &str, target: SocketAddr, preferred: u16) -> Result<Forward> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, preferred))
            .or_else(|_| TcpListener::bind((Ipv4Addr::LOCALHOST, 0)))
            .with_context(|| format!("bind a local port to forward to {target} ({name})"))?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let open: Open = Arc::default();
        let accept = {
            let (stop, open, netns) = (stop.clone(), open.clone(), netns.to_owned());
            std::thread::Builder::new()
                .name(format!("forward-{name}"))
                .spawn(move || accept_loop(listener, &netns, target, &stop, &open))
                .with_context(|| format!("spawn the forward to {target} ({name})"))?
        };
        Ok(Forward {
            name: name.to_owned(),
            local,
            stop,
            open,
            accept: Some(accept),
        })
    }

    pub fn dashboard_url(&self) -> String {
        format!("http://{}/dashboard", self.local)
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the blocking accept, which then sees `stop`.
        let _ = TcpStream::connect_timeout(&self.local, CONNECT_TIMEOUT);
        if let Some(t) = self.accept.take() {
            let _ = t.join();
        }
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        for s in open.values() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    netns: &str,
    target: SocketAddr,
    stop: &AtomicBool,
    open: &Open,
) {
    let ids = AtomicU64::new(0);
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        let upstream = e2e::in_netns(netns, || {
            TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
        });
        let Ok(Ok(upstream)) = upstream else {
            let _ = client.shutdown(Shutdown::Both);
            continue;
        };
        let id = ids.fetch_add(1, Ordering::Relaxed);
        if let (Ok(a), Ok(b)) = (client.try_clone(), upstream.try_clone()) {
            let mut o = open.lock().unwrap_or_else(|e| e.into_inner());
            o.insert(id * 2, a);
            o.insert(id * 2 + 1, b);
        }
        let open = open.clone();
        let _ = std::thread::Builder::new()
            .name("forward-conn".to_owned())
            .spawn(move || {
                relay(client, upstream);
                let mut o = open.lock().unwrap_or_else(|e| e.into_inner());
                o.remove(&(id * 2));
                o.remove(&(id * 2 + 1));
            });
    }
}

/// Copies both ways until both directions end.
fn relay(a: TcpStream, b: TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let back = std::thread::spawn(move || copy(b2, a2));
    copy(a, b);
    let _ = back.join();
}

fn copy(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if to.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
