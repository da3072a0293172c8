//! The mesh's PKI: the CA, per-workload certificates and the TLS configurations built on them.
//!
//! - [`ca`]: the CA's signing (generated root or Istio's `cacerts` plug-in layout); only the
//!   CA process (`control`) and single-process test setups hold it.
//! - [`csr`], [`proto`], [`ca_client`]: certificate requests, Istio's CA service, its client.
//! - [`certs`]: the per-workload certificate cache with rotation at half-life.
//! - [`tls`]: rustls configurations (TLS 1.3, ALPN `h2`) and SPIFFE URI-SAN verification.
//!
//! Only [`ca`] and [`certs`] ever hold private keys.
//!
//! The flow: [`ca`] generates and persists a root on first start (or loads an Istio
//! `cacerts` plug-in CA with intermediates); [`certs`] issues each local workload an ECDSA
//! P-256 leaf (one URI SAN `spiffe://<td>/ns/<ns>/sa/<sa>`) on demand, keeps it in memory
//! only, and renews it at half-life; [`tls`] builds rustls configurations whose certificate
//! resolvers ask [`certs`] at each handshake, so rotation never touches live connections.
#![forbid(unsafe_code)]

pub mod ca;
pub mod ca_client;
pub mod certs;
pub mod csr;
pub mod proto;
pub mod tls;
