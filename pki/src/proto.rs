//! `istio.v1.auth`: the CA service's messages, client and server, generated at build time
//! from `proto/istio/v1/auth/ca.proto` (Istio's package, service and field numbers).
#![allow(clippy::all, missing_docs, rust_2018_idioms)]

tonic::include_proto!("istio.v1.auth");

/// The metadata key naming the identity a node agent asks for on a workload's behalf.
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";
