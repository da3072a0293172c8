//! The L7 engine of the mesh's proxies: what a waypoint (and, next, an ingress gateway) does
//! with the HTTP requests of a tunnel it has accepted.
//!
//! The binary accepts the connection, decides which [`target::Target`] it is for and which
//! protocol it speaks, and hands it to [`http::serve`] with a [`proxy::ConnCtx`] and the
//! shared [`proxy::Inputs`] (the model, certificates, upstream pool, JWKS cache, metrics,
//! and who the proxy is: [`EngineConfig`]). Every request then passes the phases of
//! [`engine`] in order: it is authenticated, authorized with L7 AuthorizationPolicy on its
//! normalised path, routed by HTTPRoute, GRPCRoute or VirtualService
//! (`mesh_model::route`), load-balanced over the target's endpoints ([`balance`]) and
//! forwarded over HBONE under the proxy's identity ([`upstream`]), with retries, timeouts,
//! faults and mirrors ([`mirror`]).
//!
//! Upstream TLS origination (DestinationRule `tls` `SIMPLE`/`MUTUAL`) is [`origin`].
//! Also here: [`protocol`] (declared / detected), [`upgrade`] (WebSocket and other
//! upgrades), [`io`] (the byte streams), [`jwks`] (remote JWT keys for
//! RequestAuthentication), [`telemetry`] (request metrics, response flags, access log).
//! Not here: listeners, the process, flags, which destinations a proxy serves.
#![forbid(unsafe_code)]

pub mod balance;
pub mod engine;
pub mod http;
pub mod io;
pub mod jwks;
pub mod mirror;
pub mod origin;
pub mod protocol;
pub mod proxy;
pub mod resolve;
pub mod target;
pub mod telemetry;
pub mod upgrade;
pub mod upstream;

pub use jwks::JwksSettings;
pub use proxy::{ConnCtx, EngineConfig, Inputs};
