//! The L7 engine: every request passes the same fixed sequence of phases (as pingora
//! structures a proxy), one module each, run in order by [`crate::http`]:
//!
//! 1. [`downstream`]: read method, the one authority and path; refuse (400) a request a
//!    backend could frame or read differently; drop hop-by-hop headers, the client's `Host`
//!    and client-supplied internal control headers; add `x-request-id` when absent;
//!    normalise the path once (a path it refuses is answered 400) — policy, routing and the
//!    upstream all see that authority and path;
//! 2. [`authn`]: RequestAuthentication (JWT) for the proxy's Gateway and the destination
//!    Service ([`mesh_model::policy::authn`]); an invalid token → `401 Jwt verification
//!    fails`;
//! 3. [`authz`]: L7 AuthorizationPolicy; a denial → `403 RBAC: access denied`;
//! 4. [`route`]: the HTTPRoute, GRPCRoute or VirtualService rule (none applies → the Service
//!    itself; no rule matches → 404; redirects and direct responses answered here) and what
//!    it decides for later phases (a [`route::RoutePlan`]);
//! 5. [`fault`]: a VirtualService `fault` delay (`DI`), then maybe an abort (`FI`);
//! 6. [`select`]: the backend's cluster (Service, port, subset), its DestinationRule policy
//!    and ready endpoints, the consistent-hash key, one `http2MaxRequests` slot (a
//!    [`select::Selection`]);
//! 7. [`body`]: a small request body is buffered so retries can replay it and mirrors copy
//!    it; a larger one streams once;
//! 8. [`mirrors`]: copies sent in the background, never waited for;
//! 9. [`attempts`]: per attempt one endpoint and one pooled upstream connection, within the
//!    per-try and request timeouts, retried as the route's retry policy says;
//! 10. [`response`]: response headers edited, upgrades spliced, metrics and the access log
//!     written when the response body ends.
//!
//! A phase that answers the request itself returns `Err(`[`LocalReply`]`)`: one classified
//! value (status, [`ResponseFlag`](crate::telemetry::ResponseFlag), body, whether it may be
//! gRPC-shaped) rendered in one place ([`reply`]), with the metrics and the access log of
//! every other response.
//!
//! The phases share a [`RequestContext`] (the request's facts, its labels and access-log
//! line) and hand their decisions on as typed values: the normalised path, the
//! authenticated principal, the [`route::RoutePlan`], the [`select::Selection`] and the
//! [`attempts::AttemptPlan`].

use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use http::request::Parts;
use http::HeaderValue;
use hyper::upgrade::OnUpgrade;
use mesh_model::model::NamespacedName;

use crate::telemetry::{AccessLog, LabelInputs};

pub mod attempts;
pub mod authn;
pub mod authz;
pub mod body;
pub mod downstream;
pub mod fault;
pub mod mirrors;
pub mod reply;
pub mod response;
pub mod route;
pub mod select;

#[cfg(test)]
pub(crate) mod testing;

pub use reply::LocalReply;

/// Whose the engine is: the Gateway whose policies, routes and DestinationRules apply, and
/// the trust domain of the endpoints' identities.
#[derive(Clone, Copy, Debug)]
pub struct Scope<'a> {
    pub gateway: &'a NamespacedName,
    pub trust_domain: &'a str,
}

/// One request as the phases see it: its head (headers edited by the phases), what the
/// downstream phase read from it, and what its metrics and access-log line are made of.
pub struct RequestContext {
    pub parts: Parts,
    /// The request's one authority (see [`downstream`]): absolute-form target or
    /// `:authority`, else `Host`, else the CONNECT authority.
    pub authority: String,
    /// Why the request must be refused before any other phase sees it (see [`downstream`]).
    pub malformed: Option<String>,
    /// The client address for `remote.ip` / `remoteIpBlocks` ([`downstream::remote_ip`]).
    pub remote_ip: IpAddr,
    /// The request target as received (before normalisation).
    pub raw_target: String,
    /// Whether the request is gRPC by its `content-type` (local replies are gRPC-shaped).
    pub grpc_request: bool,
    pub downstream_h2: bool,
    /// The protocol a client asked to switch to (`Upgrade`), kept for the upstream.
    pub upgrade: Option<HeaderValue>,
    /// The downstream half of such a switch, spliced once the upstream agrees.
    pub downstream_upgrade: Option<OnUpgrade>,
    pub labels: LabelInputs,
    pub log: AccessLog,
    /// Request body bytes read so far (`istio_request_bytes`).
    pub req_bytes: Arc<AtomicU64>,
    /// When the request arrived: `timeouts.request` runs from here.
    pub started: Instant,
}
