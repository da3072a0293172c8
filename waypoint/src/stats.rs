//! The waypoint's own HTTP endpoints: `/metrics` on :15020 and `/healthz/ready` on :15021
//! (both paths are served on both ports).

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
use mesh::metrics::Metrics;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    #[error("bind {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// What the endpoints read.
pub struct StatsState {
    pub metrics: Arc<Metrics>,
    /// True once a config has loaded and the waypoint's certificate was issued.
    pub ready: Arc<AtomicBool>,
}

/// A bound endpoint server: binding happens in `new`, so a taken port fails startup.
pub struct StatsServer {
    listener: TcpListener,
}

impl StatsServer {
    pub async fn new(addr: SocketAddr, what: &'static str) -> Result<Self, StatsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StatsError::Bind { what, addr, source })?;
        Ok(StatsServer { listener })
    }

    pub async fn run(self, state: Arc<StatsState>, stop: CancellationToken) {
        loop {
            let (tcp, _) = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(e) => {
                        tracing::warn!(error = %e, "stats accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let state = state.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(&state, &req)) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    }
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(content_type),
    );
    r
}

fn route(st: &StatsState, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz/ready") => {
            if st.ready.load(Ordering::SeqCst) {
                reply(StatusCode::OK, "text/plain", "ready\n")
            } else {
                reply(StatusCode::SERVICE_UNAVAILABLE, "text/plain", "not ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let wants_openmetrics = req
                .headers()
                .get(http::header::ACCEPT)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.contains("application/openmetrics-text"));
            if wants_openmetrics {
                reply(
                    StatusCode::OK,
                    mesh::metrics::CONTENT_TYPE,
                    st.metrics.encode(),
                )
            } else {
                reply(
                    StatusCode::OK,
                    mesh::metrics::TEXT_CONTENT_TYPE,
                    st.metrics.encode_text(),
                )
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}
