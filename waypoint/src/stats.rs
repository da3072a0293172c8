//! The waypoint's own HTTP endpoints: `/metrics` on :15020 and `/healthz/ready` on :15021
//! (both paths are served on both ports), and on the admin address (loopback :15000 by
//! default: it shows the whole mesh) also `/config_dump`, the model the waypoint applies as
//! JSON, as Envoy's admin `config_dump` is.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_model::model::Model;
use mesh_telemetry::Metrics;
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
    /// The model in force, for `/config_dump`.
    pub model: Arc<ArcSwap<Model>>,
}

/// Which endpoints a server answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoints {
    /// `/metrics` and `/healthz/ready`.
    Public,
    /// Also `/config_dump`.
    Admin,
}

/// A bound endpoint server: binding happens in `new`, so a taken port fails startup.
pub struct StatsServer {
    listener: TcpListener,
    endpoints: Endpoints,
}

impl StatsServer {
    pub async fn new(
        addr: SocketAddr,
        what: &'static str,
        endpoints: Endpoints,
    ) -> Result<Self, StatsError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StatsError::Bind { what, addr, source })?;
        Ok(StatsServer {
            listener,
            endpoints,
        })
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
            let endpoints = self.endpoints;
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(&state, &req, endpoints)) }
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

fn route(st: &StatsState, req: &Request<Incoming>, endpoints: Endpoints) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/config_dump") if endpoints == Endpoints::Admin => {
            let model = st.model.load_full();
            let dump = serde_json::json!({
                "ready": st.ready.load(Ordering::SeqCst),
                "model": model.dump(),
            });
            match serde_json::to_vec_pretty(&dump) {
                Ok(json) => reply(StatusCode::OK, "application/json", json),
                Err(e) => reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    format!("serialize the model: {e}\n"),
                ),
            }
        }
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
                    mesh_telemetry::CONTENT_TYPE,
                    st.metrics.encode(),
                )
            } else {
                reply(
                    StatusCode::OK,
                    mesh_telemetry::TEXT_CONTENT_TYPE,
                    st.metrics.encode_text(),
                )
            }
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}
