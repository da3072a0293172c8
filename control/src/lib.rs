//! The mesh control plane. Today: the CA service, the only process holding the mesh's
//! signing key (Istio's istiod plays this part for Istio's ztunnel).
//!
//! - [`service`]: `istio.v1.auth.IstioCertificateService/CreateCertificate` (the proto is
//!   `pki/proto`, shared with the CA clients): authenticate ([`authn`], [`token`]), authorize
//!   ([`authz`], a pure function: a caller gets its own identity, a node agent also those of
//!   pods on its node), check the CSR (`mesh_pki::csr`), sign (`mesh_pki::ca`).
//! - [`server`]: the TLS gRPC listener (:15012) with a serving certificate from the CA.
//! - [`app`]: wiring; the shell's admin endpoints (`/config_dump` lists what was issued to
//!   whom, never keys or tokens), metrics `mesh_ca_*`.
#![forbid(unsafe_code)]

pub mod app;
pub mod authn;
pub mod authz;
pub mod config;
pub mod metrics;
pub mod server;
pub mod service;
pub mod token;
