//! The waypoint: an L7 proxy for the Services (or workloads) that use it; and, for a
//! Gateway of class `istio`, the mesh's ingress gateway ([`ingress`]: its HTTP and HTTPS
//! listeners served on their ports to clients outside the mesh, through the same engine).
//!
//! Node agents send traffic for such destinations here over HBONE (port 15008, mTLS with
//! the client's identity, `CONNECT <service-vip>:<port>`). The waypoint authenticates the
//! caller, checks the destination uses this waypoint, and hands HTTP/1.1 or HTTP/2 inside
//! the tunnel to the L7 engine ([`mesh_l7`]: authn, L7 AuthorizationPolicy, HTTPRoute /
//! GRPCRoute routing, endpoints picked per request, forwarded over HBONE under the
//! waypoint's identity). Ports that do not carry HTTP are relayed at L4.
//!
//! Data path, in order: [`inbound`] (HBONE listener, CONNECT, protocol choice) →
//! [`mesh_l7::http`] (drives the request phases of [`mesh_l7::engine`]) →
//! [`mesh_l7::upstream`] (endpoints, HBONE client, connection pool).
//! Pure part: [`destination`] (which destinations use this waypoint). [`stats`] what the
//! waypoint plugs into `mesh_shell`'s endpoints (`/metrics`, readiness, `/config_dump`),
//! [`app`] wiring (`start` returns a handle, so tests run the whole waypoint in-process),
//! [`config`] every setting.
#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod destination;
pub mod inbound;
pub mod ingress;
pub mod stats;
