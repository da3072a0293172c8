//! The mesh model and everything that can be decided from it without IO.
//!
//! This crate is the bottom layer: it depends on no runtime, socket, TLS or HTTP/2 crate
//! (`cargo xtask ci` checks its dependency tree), so every decision it makes is a pure
//! function of its inputs and is tested as one. Modules, each using only those above it:
//! - [`identity`]: SPIFFE identities; [`duration`]: the `500ms` / `30s` / `24h` durations
//!   of flags and YAML.
//! - [`jwt`]: JWT and JWKS parsing and verification (`ring`; keys and time come from the
//!   caller).
//! - [`model`]: the mesh model the proxies query; [`k8s`] builds it from Kubernetes and
//!   Istio YAML (the one YAML reader of the workspace).
//! - [`policy`]: PeerAuthentication and AuthorizationPolicy evaluation, L4 and L7, and
//!   [`policy::authn`], a request's RequestAuthentication outcome.
//! - [`route`]: path normalisation, HTTPRoute / GRPCRoute / VirtualService matching,
//!   backends, filters; [`resilience`]: retry, backoff, fault and mirror decisions.
//! - [`round_robin`]: the per-destination rotating start index both proxies balance with.
//! - [`synthetic`]: a mesh of any size as YAML, for measuring how costs grow with the mesh.
#![forbid(unsafe_code)]

pub mod duration;
pub mod identity;
pub mod jwt;
pub mod k8s;
pub mod model;
pub mod policy;
pub mod resilience;
pub mod round_robin;
pub mod route;
pub mod synthetic;

pub use identity::Identity;
