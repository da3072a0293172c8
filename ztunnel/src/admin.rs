//! The agent's own HTTP endpoints, in the node's network namespace:
//! admin (`/config_dump`, `/logging`) on 127.0.0.1:15000, `/metrics` and the node dashboard
//! (`/dashboard`, `/stats`: see [`crate::dashboard`]) on :15020, `/healthz/ready` on :15021.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::logging::LogHandle;
use crate::proxy::ProxyInputs;
use crate::workloads::PodStatus;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the endpoints read.
pub struct AdminState {
    pub pi: Arc<ProxyInputs>,
    /// True once the first config loaded and every enrolled pod has listeners + redirection.
    pub ready: Arc<AtomicBool>,
    pub config_loaded: Arc<AtomicBool>,
    pub pods: Arc<std::sync::Mutex<Vec<PodStatus>>>,
    /// Objects the API server watch refused (kept at their last accepted version); always
    /// empty with a config directory, whose refusals are whole-directory.
    pub rejections: tokio::sync::watch::Receiver<Vec<mesh_kube::Rejection>>,
    pub log: LogHandle,
}

#[derive(Clone, Copy)]
enum Kind {
    Admin,
    Metrics,
    Readiness,
}

/// A bound endpoint server: binding happens in `new`, so a taken port fails startup.
pub struct Server {
    listener: TcpListener,
    kind: Kind,
}

impl Server {
    async fn bind(addr: SocketAddr, what: &'static str, kind: Kind) -> Result<Self, AdminError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| AdminError::Bind { what, addr, source })?;
        Ok(Server { listener, kind })
    }
    pub async fn admin(addr: SocketAddr) -> Result<Self, AdminError> {
        Self::bind(addr, "admin", Kind::Admin).await
    }
    pub async fn metrics(addr: SocketAddr) -> Result<Self, AdminError> {
        Self::bind(addr, "metrics", Kind::Metrics).await
    }
    pub async fn readiness(addr: SocketAddr) -> Result<Self, AdminError> {
        Self::bind(addr, "readiness", Kind::Readiness).await
    }

    pub async fn run(self, state: Arc<AdminState>, stop: CancellationToken) {
        loop {
            let (tcp, _) = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "admin accept failed");
                        continue;
                    }
                },
            };
            let state = state.clone();
            let kind = self.kind;
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(kind, &state, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }
}

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    r
}

async fn route(kind: Kind, st: &AdminState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    match (kind, req.method(), path.as_str()) {
        (Kind::Readiness, &Method::GET, "/healthz/ready") => {
            if st.ready.load(Ordering::SeqCst) && st.config_loaded.load(Ordering::SeqCst) {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        (Kind::Metrics, &Method::GET, "/metrics") | (Kind::Admin, &Method::GET, "/metrics") => {
            // OpenMetrics for scrapers that ask for it (Prometheus does), the classic text
            // format for everyone else (curl, promtool).
            let wants_openmetrics = req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            if wants_openmetrics {
                reply(
                    StatusCode::OK,
                    mesh_telemetry::CONTENT_TYPE,
                    st.pi.metrics.encode(),
                )
            } else {
                reply(
                    StatusCode::OK,
                    mesh_telemetry::TEXT_CONTENT_TYPE,
                    st.pi.metrics.encode_text(),
                )
            }
        }
        (Kind::Metrics | Kind::Admin, &Method::GET, "/dashboard") => reply(
            StatusCode::OK,
            "text/html; charset=utf-8",
            crate::dashboard::PAGE,
        ),
        (Kind::Metrics | Kind::Admin, &Method::GET, "/stats") => stats(st),
        (Kind::Admin, &Method::GET, "/config_dump") => config_dump(st),
        (Kind::Admin, _, "/logging") => logging(st, &req),
        (Kind::Admin, &Method::GET, "/") => reply(
            StatusCode::OK,
            "text/plain",
            "endpoints: /config_dump /logging?level=<filter> /metrics /dashboard /stats\n",
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// The node dashboard's JSON, from the agent's state and one read of its metrics registry.
fn stats(st: &AdminState) -> Response<Full<Bytes>> {
    let pods = st.pods.lock().map(|p| p.clone()).unwrap_or_default();
    let certs = st.pi.certs.expiries();
    let metrics = st.pi.metrics.snapshot();
    let rejected = st.rejections.borrow().clone();
    let view = crate::dashboard::stats(&crate::dashboard::NodeState {
        node: &st.pi.cfg.node_name,
        backend: st.pi.cfg.redirect,
        ready: st.ready.load(Ordering::SeqCst) && st.config_loaded.load(Ordering::SeqCst),
        pods: &pods,
        certs: &certs,
        metrics: &metrics,
        rejected_objects: &rejected,
        now: std::time::SystemTime::now(),
    });
    match serde_json::to_vec(&view) {
        Ok(body) => {
            let mut r = reply(StatusCode::OK, "application/json", body);
            r.headers_mut().insert(
                http::header::CACHE_CONTROL,
                http::HeaderValue::from_static("no-store"),
            );
            r
        }
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("stats: {e}\n"),
        ),
    }
}

fn config_dump(st: &AdminState) -> Response<Full<Bytes>> {
    let model = st.pi.model.load_full();
    let pods = st.pods.lock().map(|p| p.clone()).unwrap_or_default();
    let dump = ConfigDump {
        config: &st.pi.cfg,
        ready: st.ready.load(Ordering::SeqCst),
        config_rejections: st.rejections.borrow().clone(),
        workloads: pods,
        certificates: st.pi.certs.dump(),
        open_connections: st.pi.conns.len(),
        pool: format!("{:?}", st.pi.pool.stats()),
        model: model.dump(),
    };
    match serde_json::to_vec_pretty(&dump) {
        Ok(body) => reply(StatusCode::OK, "application/json", body),
        Err(e) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            format!("config_dump: {e}\n"),
        ),
    }
}

#[derive(serde::Serialize)]
struct ConfigDump<'a> {
    config: &'a crate::config::Config,
    ready: bool,
    config_rejections: Vec<mesh_kube::Rejection>,
    workloads: Vec<PodStatus>,
    certificates: Vec<mesh_pki::certs::CertSummary>,
    open_connections: usize,
    pool: String,
    model: mesh_model::model::ModelDump<'a>,
}

/// `GET /logging` shows the filter; `POST /logging?level=<filter>` replaces it
/// (`level=debug`, or full directives like `level=info,ztunnel::proxy=debug`).
fn logging(st: &AdminState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let level = req.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|kv| kv.strip_prefix("level="))
            .map(percent_decode)
    });
    match (req.method(), level) {
        (&Method::POST, Some(level)) => match st.log.set(&level) {
            Ok(()) => reply(
                StatusCode::OK,
                "text/plain",
                format!("log level set to {level}\n"),
            ),
            Err(e) => reply(StatusCode::BAD_REQUEST, "text/plain", format!("{e}\n")),
        },
        (&Method::GET, _) => reply(
            StatusCode::OK,
            "text/plain",
            format!("{}\n", st.log.current()),
        ),
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
    use super::percent_decode;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            percent_decode("info%2Cztunnel%3Ddebug"),
            "info,ztunnel=debug"
        );
        assert_eq!(percent_decode("a+b"), "a b");
        assert_eq!(percent_decode("bad%zz"), "bad%zz");
        assert_eq!(percent_decode("trailing%2"), "trailing%2");
        assert_eq!(percent_decode("%"), "%");
    }
}
