//! The mesh's PKI: the CA, per-workload certificates and the TLS configurations built on them.
//!
//! - [`ca`]: the embedded CA (generated root or Istio's `cacerts` plug-in layout).
//! - [`certs`]: the per-workload certificate cache with rotation at half-life.
//! - [`tls`]: rustls configurations (TLS 1.3, ALPN `h2`) and SPIFFE URI-SAN verification.
//!
//! Only [`ca`] and [`certs`] ever hold private keys.
#![forbid(unsafe_code)]

pub mod ca;
pub mod certs;
pub mod tls;
