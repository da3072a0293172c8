//! A process's own HTTP endpoints. Every binary binds three listeners (see [`Role`]) and
//! decides which of the shared endpoints each answers ([`Endpoints`]):
//!
//! - `/metrics` (OpenMetrics when asked for, else Prometheus text) and `/healthz/ready`;
//! - on the admin listener (loopback by default): `/config_dump` (the binary's dump),
//!   `GET /logging` (the filter) and `POST /logging?level=<filter>`, `POST /quitquitquit`
//!   (drain and exit, as Envoy's), `GET /debug/pprof/profile?seconds=N` (a CPU profile,
//!   [`crate::profile`]), and `/` (the list).
//!
//! A binary implements [`AdminApp`] for its dump, its readiness, and its own routes
//! (the node agent's `/dashboard` and `/stats`), which are tried first.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_telemetry::Metrics;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::logging::LogHandle;
use crate::process::Shutdown;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

pub type Body = Full<Bytes>;

/// Which of a process's three listeners a request came in on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Loopback by default: may show and change the whole process.
    Admin,
    /// `/metrics` for scrapers (:15020).
    Metrics,
    /// `/healthz/ready` for the kubelet (:15021).
    Readiness,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Metrics => "metrics",
            Role::Readiness => "readiness",
        }
    }
}

/// Which shared endpoints a listener answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Endpoints {
    /// `/metrics`.
    pub metrics: bool,
    /// `/healthz/ready`.
    pub ready: bool,
    /// `/config_dump`, `/logging`, `/quitquitquit`, `/`.
    pub admin: bool,
}

impl Endpoints {
    pub const METRICS: Endpoints = Endpoints {
        metrics: true,
        ready: false,
        admin: false,
    };
    pub const READY: Endpoints = Endpoints {
        metrics: false,
        ready: true,
        admin: false,
    };
    pub const PUBLIC: Endpoints = Endpoints {
        metrics: true,
        ready: true,
        admin: false,
    };
    pub const ALL: Endpoints = Endpoints {
        metrics: true,
        ready: true,
        admin: true,
    };
}

/// What a binary plugs into its endpoints.
pub trait AdminApp: Send + Sync + 'static {
    /// The registry `/metrics` encodes.
    fn metrics(&self) -> &Metrics;
    /// What `/healthz/ready` says.
    fn ready(&self) -> bool;
    /// The body of `/config_dump` (JSON).
    fn config_dump(&self) -> Result<Vec<u8>, serde_json::Error>;
    /// The binary's own endpoints, tried before the shared ones (`None`: not one of them).
    fn route(&self, _role: Role, _req: &Request<Incoming>) -> Option<Response<Body>> {
        None
    }
    /// The binary's own endpoints on the admin listener, for the list at `/`.
    fn index(&self) -> &'static [&'static str] {
        &[]
    }
}

/// What the shell itself controls through the admin listener.
#[derive(Clone, Default)]
pub struct Control {
    /// `None` when the process does not own the global subscriber (an in-process test).
    pub log: Option<LogHandle>,
    /// Triggered by `POST /quitquitquit`.
    pub shutdown: Shutdown,
}

/// A bound endpoint server: binding happens in `bind`, so a taken port fails startup.
pub struct AdminServer {
    listener: TcpListener,
    role: Role,
    endpoints: Endpoints,
}

// === impl AdminServer ===

impl AdminServer {
    pub async fn bind(
        addr: SocketAddr,
        role: Role,
        endpoints: Endpoints,
    ) -> Result<Self, AdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind {
                what: role.as_str(),
                addr,
                source,
            })?;
        Ok(AdminServer {
            listener,
            role,
            endpoints,
        })
    }

    /// The bound address (the port chosen for `:0`).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub async fn run<A: AdminApp>(self, app: Arc<A>, ctl: Control, stop: CancellationToken) {
        let AdminServer {
            listener,
            role,
            endpoints,
        } = self;
        let ctl = Arc::new(ctl);
        let span = tracing::Span::current();
        crate::accept::serve(
            role.as_str(),
            || listener.accept(),
            |(tcp, _)| {
                let app = app.clone();
                let ctl = ctl.clone();
                let svc = service_fn(move |req: Request<Incoming>| {
                    // A CPU profile takes seconds: the one answer that is not immediate.
                    let now = match is_profile(endpoints, &req) {
                        true => Err(req.uri().query().map(str::to_owned)),
                        false => Ok(route(&*app, &ctl, role, endpoints, &req)),
                    };
                    async move {
                        Ok::<_, Infallible>(match now {
                            Ok(resp) => resp,
                            Err(query) => crate::profile::serve(query).await,
                        })
                    }
                });
                crate::process::spawn(span.clone(), async move {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            },
            stop,
        )
        .await
    }
}

/// The three listeners' addresses: as configured ([`crate::config::ProcessArgs::endpoints`]),
/// and as bound (the ports chosen for `:0`). Serialized under the flags' names
/// (`admin_addr`, ...), as a binary's config dump shows them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Addrs {
    #[serde(rename = "admin_addr")]
    pub admin: SocketAddr,
    #[serde(rename = "metrics_addr")]
    pub metrics: SocketAddr,
    #[serde(rename = "readiness_addr")]
    pub readiness: SocketAddr,
}

impl Addrs {
    fn slot(&mut self, role: Role) -> &mut SocketAddr {
        match role {
            Role::Admin => &mut self.admin,
            Role::Metrics => &mut self.metrics,
            Role::Readiness => &mut self.readiness,
        }
    }
}

/// Binds the three listeners (a taken port fails startup) and serves each, with the
/// endpoints `listeners` gives its role, until `stop`. Returns the bound addresses.
pub async fn start<A: AdminApp>(
    mut addrs: Addrs,
    listeners: [(Role, Endpoints); 3],
    app: Arc<A>,
    ctl: Control,
    stop: CancellationToken,
) -> Result<Addrs, AdminError> {
    for (role, endpoints) in listeners {
        let slot = addrs.slot(role);
        let srv = AdminServer::bind(*slot, role, endpoints).await?;
        *slot = srv.local_addr().unwrap_or(*slot);
        crate::process::spawn(
            tracing::info_span!("admin", listener = role.as_str()),
            srv.run(app.clone(), ctl.clone(), stop.clone()),
        );
    }
    Ok(addrs)
}

/// A response with a body and its content type.
pub fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

/// A JSON body, or 500 naming what could not be serialized.
pub fn json(what: &str, body: Result<Vec<u8>, serde_json::Error>) -> Response<Body> {
    match body {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("{what}: {e}\n"),
        ),
    }
}

/// `GET /debug/pprof/profile` on a listener with the admin endpoints.
fn is_profile(endpoints: Endpoints, req: &Request<Incoming>) -> bool {
    endpoints.admin && req.method() == Method::GET && req.uri().path() == crate::profile::PATH
}

fn route<A: AdminApp>(
    app: &A,
    ctl: &Control,
    role: Role,
    endpoints: Endpoints,
    req: &Request<Incoming>,
) -> Response<Body> {
    if let Some(r) = app.route(role, req) {
        return r;
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz/ready") if endpoints.ready => {
            if app.ready() {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        (&Method::GET, "/metrics") if endpoints.metrics => metrics(app.metrics(), req),
        (&Method::GET, "/config_dump") if endpoints.admin => json("config_dump", app.config_dump()),
        (_, "/logging") if endpoints.admin => logging(ctl.log.as_ref(), req),
        (&Method::POST, "/quitquitquit") if endpoints.admin => {
            tracing::info!("shutdown requested through /quitquitquit");
            ctl.shutdown.trigger();
            reply(StatusCode::OK, "text/plain", "OK\n")
        }
        (&Method::GET, "/") if endpoints.admin => {
            let mut list = vec![
                "/config_dump",
                "/logging?level=<filter>",
                "/quitquitquit",
                "/metrics",
                "/debug/pprof/profile?seconds=<1-60>",
            ];
            if endpoints.ready {
                list.push("/healthz/ready");
            }
            list.extend(app.index());
            reply(
                StatusCode::OK,
                "text/plain",
                format!("endpoints: {}\n", list.join(" ")),
            )
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// OpenMetrics for scrapers that ask for it (Prometheus does), the classic text format for
/// everyone else (curl, promtool).
fn metrics(metrics: &Metrics, req: &Request<Incoming>) -> Response<Body> {
    let wants_openmetrics = req
        .headers()
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("application/openmetrics-text"));
    if wants_openmetrics {
        reply(
            StatusCode::OK,
            mesh_telemetry::CONTENT_TYPE,
            metrics.encode(),
        )
    } else {
        reply(
            StatusCode::OK,
            mesh_telemetry::TEXT_CONTENT_TYPE,
            metrics.encode_text(),
        )
    }
}

/// `GET /logging` shows the filter; `POST /logging?level=<filter>` replaces it
/// (`level=debug`, or full directives like `level=info,ztunnel::proxy=debug`).
fn logging(log: Option<&LogHandle>, req: &Request<Incoming>) -> Response<Body> {
    let Some(log) = log else {
        return reply(
            StatusCode::NOT_IMPLEMENTED,
            "text/plain",
            "this process does not own its log subscriber\n",
        );
    };
    let level = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("level="))
            .map(percent_decode)
    });
    match (req.method(), level) {
        (&Method::POST, Some(level)) => match log.set(&level) {
            Ok(()) => reply(
                StatusCode::OK,
                "text/plain",
                format!("log level set to {level}\n"),
            ),
            Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
        },
        (&Method::GET, _) => reply(StatusCode::OK, "text/plain", format!("{}\n", log.current())),
        _ => reply(
            StatusCode::BAD_REQUEST,
            "text/plain",
            "use POST /logging?level=<filter>\n",
        ),
    }
}

/// Decodes `%XX` escapes and `+` in a query value; invalid escapes are kept as they are.
fn percent_decode(v: &str) -> String {
    let bytes = v.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                    }
                    None => {
                        out.push(b'%');
                        i += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        let check = |input: &str, expected: &str| assert_eq!(percent_decode(input), expected);
        check("info%2Cztunnel%3Ddebug", "info,ztunnel=debug");
        check("a+b", "a b");
        check("bad%zz", "bad%zz");
        check("trailing%2", "trailing%2");
        check("%", "%");
    }

    struct App {
        metrics: Arc<Metrics>,
    }

    impl AdminApp for App {
        fn metrics(&self) -> &Metrics {
            &self.metrics
        }
        fn ready(&self) -> bool {
            true
        }
        fn config_dump(&self) -> Result<Vec<u8>, serde_json::Error> {
            serde_json::to_vec(&serde_json::json!({"dump": 1}))
        }
        fn route(&self, role: Role, req: &Request<Incoming>) -> Option<Response<Body>> {
            (role == Role::Metrics && req.uri().path() == "/extra")
                .then(|| reply(StatusCode::OK, "text/plain", "extra\n"))
        }
    }

    /// One HTTP/1.1 request over a fresh connection; returns the status and body.
    async fn call(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        let (status, body) = call_bytes(addr, method, path).await;
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    async fn call_bytes(addr: SocketAddr, method: &str, path: &str) -> (u16, Vec<u8>) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\ncontent-length: 0\r\n\r\n"
        );
        tcp.write_all(req.as_bytes()).await.expect("write");
        let mut buf = Vec::new();
        tcp.read_to_end(&mut buf).await.expect("read");
        let head_end = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("a complete head");
        let head = String::from_utf8_lossy(&buf[..head_end]);
        let status = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        (status, buf[head_end + 4..].to_vec())
    }

    /// The three listeners of a test app on loopback ports the kernel picks.
    async fn start_app(ctl: Control, stop: CancellationToken) -> Addrs {
        let app = Arc::new(App {
            metrics: Metrics::new(),
        });
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let listeners = [
            (Role::Admin, Endpoints::ALL),
            (Role::Metrics, Endpoints::METRICS),
            (Role::Readiness, Endpoints::READY),
        ];
        let addrs = Addrs {
            admin: any,
            metrics: any,
            readiness: any,
        };
        start(addrs, listeners, app, ctl, stop).await.expect("bind")
    }

    #[tokio::test]
    async fn each_listener_answers_its_endpoints_and_quitquitquit_triggers_shutdown() {
        let ctl = Control::default();
        let stop = CancellationToken::new();
        let Addrs {
            admin,
            metrics,
            readiness,
        } = start_app(ctl.clone(), stop.clone()).await;
        assert_eq!(call(readiness, "GET", "/healthz/ready").await.0, 200);
        assert_eq!(call(readiness, "GET", "/metrics").await.0, 404);
        assert_eq!(call(metrics, "GET", "/metrics").await.0, 200);
        assert_eq!(
            call(metrics, "GET", "/extra").await,
            (200, "extra\n".into())
        );
        assert_eq!(call(metrics, "GET", "/config_dump").await.0, 404);
        assert_eq!(
            call(admin, "GET", "/config_dump").await,
            (200, "{\"dump\":1}".into())
        );
        assert_eq!(call(admin, "GET", "/logging").await.0, 501);
        assert_eq!(call(metrics, "POST", "/quitquitquit").await.0, 404);
        assert!(!ctl.shutdown.is_triggered());
        assert_eq!(call(admin, "POST", "/quitquitquit").await.0, 200);
        assert!(ctl.shutdown.is_triggered());
        stop.cancel();
    }

    /// Spins until `running` is cleared: CPU time for the profiler to sample.
    fn burn_cpu(running: &std::sync::atomic::AtomicBool) -> u64 {
        let mut x = 0u64;
        while running.load(std::sync::atomic::Ordering::Relaxed) {
            x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
        }
        x
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_admin_listener_takes_one_cpu_profile_at_a_time() {
        use crate::profile::{check_well_formed, proto, Busy};
        use prost::Message;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::time::Duration;

        let stop = CancellationToken::new();
        let Addrs { admin, metrics, .. } = start_app(Control::default(), stop.clone()).await;
        let path = |q: &str| format!("{}?{q}", crate::profile::PATH);
        assert_eq!(call(admin, "GET", &path("seconds=0")).await.0, 400);
        assert_eq!(call(admin, "GET", &path("seconds=61")).await.0, 400);
        assert_eq!(call(metrics, "GET", &path("seconds=1")).await.0, 404);

        let running = Arc::new(AtomicBool::new(true));
        let burner = std::thread::spawn({
            let running = running.clone();
            move || burn_cpu(&running)
        });
        let first = tokio::spawn({
            let p = path("seconds=1");
            async move { call_bytes(admin, "GET", &p).await }
        });
        // Once the first profile is under way, a second request is refused.
        tokio::time::timeout(Duration::from_secs(5), async {
            while !Busy::in_progress() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the first profile starts");
        let (status, body) = call(admin, "GET", &path("seconds=1")).await;
        assert_eq!(status, 409, "{body}");

        let (status, body) = first.await.expect("first request");
        running.store(false, Ordering::Relaxed);
        burner.join().expect("burner");
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        assert!(!Busy::in_progress(), "the slot is free again");
        let profile = proto::Profile::decode(body.as_slice()).expect("a pprof protobuf");
        check_well_formed(&profile).expect("well formed");
        assert!(!profile.sample.is_empty(), "no samples in a busy second");
        assert!(
            profile.string_table.iter().any(|s| s.contains("burn_cpu")),
            "the busy function is named: {:?}",
            profile.string_table
        );
        stop.cancel();
    }
}
