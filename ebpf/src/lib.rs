//! eBPF traffic capture for pod network namespaces.
//!
//! The kernel programs are C (`src/*.bpf.c`, compiled by `build.rs` with clang into BTF-carrying
//! objects embedded in this crate); this library loads them with `aya`, attaches them to a pod's
//! network namespace and returns a guard whose `Drop` detaches them.
//!
//! - [`capture`]: an `sk_lookup` program per pod network namespace that steers new inbound TCP
//!   connections to the agent's 15006 listener (except the HBONE port, loopback and the probe
//!   source) and the application's outgoing TCP to the agent's 15001 listener of its address
//!   family, keeping the original destination as the accepted socket's local address;
//!   optionally the application's DNS (UDP and TCP to port 53, IPv4 and IPv6) to the agent's
//!   DNS sockets of each family. The
//!   policy routing that makes outgoing TCP and DNS visible to it is the agent's
//!   (`ztunnel/src/redirect/ebpf.rs`).

#![forbid(unsafe_code)]

pub mod capture;

pub use capture::{
    attach_capture, attach_capture_pinned, load_in_child_processes, probe, serve_load_job,
    CaptureConfig, CaptureError, CaptureGuard, Exemption,
};
