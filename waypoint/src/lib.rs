//! The waypoint: an L7 proxy for the Services (or workloads) that use it.
//!
//! Node agents send traffic for such destinations here over HBONE (port 15008, mTLS with
//! the client's identity, `CONNECT <service-vip>:<port>`). The waypoint authenticates the
//! caller, checks the destination uses this waypoint, parses HTTP/1.1 or HTTP/2 inside the
//! tunnel, authorizes each request with L7 AuthorizationPolicy on its normalised path, routes
//! it by HTTPRoute or GRPCRoute (`mesh_model::route`) to a backend Service, picks an endpoint per request and
//! forwards it over HBONE under its own identity. Ports that do not carry HTTP are
//! relayed at L4.
//!
//! Data path, in order: [`inbound`] (HBONE listener, CONNECT, protocol choice) →
//! [`http`] (drives the request phases of [`engine`]) → [`upstream`] (endpoints, HBONE client, connection pool).
//! Pure parts: [`destination`] (what a CONNECT is for), [`protocol`] (declared / detected).
//! [`jwks`] remote JWT keys for RequestAuthentication. [`telemetry`] metrics and access log, [`stats`] what the waypoint plugs into `mesh_shell`'s
//! endpoints (`/metrics`, readiness, `/config_dump`), [`app`] wiring (`start` returns a handle,
//! so tests run the whole waypoint in-process), [`config`] every setting.
#![forbid(unsafe_code)]

pub mod app;
pub mod balance;
pub mod config;
pub mod destination;
pub mod engine;
pub mod http;
pub mod inbound;
pub mod io;
pub mod jwks;
pub mod mirror;
pub mod protocol;
pub mod proxy;
pub mod stats;
pub mod telemetry;
pub mod upgrade;
pub mod upstream;
