//! What the ztunnel node agent and the waypoint share.
//!
//! Layering (each module only uses those above it):
//! - [`identity`]: SPIFFE identities.
//! - [`jwt`]: JWT and JWKS parsing and verification (pure; `ring`); [`jwt::authn`] (which
//!   uses the model and policy types) decides a request's authentication.
//! - [`model`]: the mesh model the proxies query (pure, no IO); [`k8s`] builds it from YAML.
//! - [`policy`]: PeerAuthentication and AuthorizationPolicy evaluation (pure).
//! - [`route`]: path normalisation, HTTPRoute and VirtualService matching, backends,
//!   filters (pure); [`resilience`]: retry, backoff, fault and mirror decisions (pure).
//! - [`ca`], [`certs`]: the embedded CA and the per-workload certificate cache with rotation.
//!   Only these two modules ever hold private keys.
//! - [`tls`]: rustls configurations and SPIFFE verification.
//! - [`hbone`]: HTTP/2 CONNECT tunnels, client pool and server.
//! - [`metrics`]: Prometheus metrics with Istio's names and labels.
//! - [`duration`]: the `500ms` / `30s` / `24h` durations of the proxies' flags.
#![forbid(unsafe_code)]

pub mod ca;
pub mod certs;
/// The in-cluster configuration source (kube-rs list/watch), shared by ztunnel and the
/// waypoint; feature `kube`.
#[cfg(feature = "kube")]
pub mod cluster;
pub mod duration;
pub mod hbone;
pub mod identity;
pub mod jwt;
pub mod k8s;
pub mod metrics;
pub mod model;
pub mod policy;
pub mod resilience;
pub mod route;
pub mod tls;

pub use identity::Identity;
