//! eBPF traffic capture for pod network namespaces.
//!
//! The kernel programs are C (`src/*.bpf.c`, compiled by `build.rs` with clang into BTF-carrying
//! objects embedded in this crate); this library loads them with `aya`, attaches them to a pod's
//! network namespace and returns a guard whose `Drop` detaches them.
//!
//! What is here (first increment):
//! - [`inbound`]: an `sk_lookup` program per pod network namespace that steers new inbound TCP
//!   connections to the agent's 15006 listener (except the HBONE port, loopback and the probe
//!   source), keeping the original destination as the accepted socket's local address.
//!
//! Outbound capture (to 15001) is not here yet; the nftables backend still does it.

#![forbid(unsafe_code)]

pub mod inbound;

pub use inbound::{
    attach_inbound, attach_inbound_pinned, Exemption, InboundConfig, InboundError, InboundGuard,
};
