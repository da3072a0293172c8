//! The end-to-end test harness: real binaries in network-namespace topologies.
//!
//! A [`Mesh`] is a small simulated cluster built from Linux network namespaces:
//!
//! ```text
//!   pod netns <prefix><ns>.<pod>          node netns <prefix><node>          <prefix>_wire
//!   eth0 10.244.<i>.<j>/32  ── veth ──  pod<j> 10.244.<i>.1/32
//!                                        wire 10.255.0.<i>/24  ── veth ──  n<i> ─┐
//!                                                                                br0 (10.255.0.254)
//!                                        (other nodes)         ── veth ──  n<k> ─┘
//! ```
//!
//! Each node namespace runs one `ztunnel` (unless declared bare); pods are their own namespaces
//! joined to their node by a veth pair; nodes are joined by a bridge in a namespace of its own,
//! which is where [`Mesh::capture_wire`] listens, so a capture sees every byte between nodes
//! and nothing else. Nothing is ever linked to the root namespace and no namespace has a route
//! out, so test traffic cannot leave the machine.
//!
//! The CA service (`control`, the only process holding the signing key) runs in a namespace of
//! its own, `<prefix>_control`, joined to the bridge like a node (10.255.0.253); the agents and
//! waypoints are its clients with tokens it minted ([`CaMode::Service`], the default;
//! [`CaMode::LocalDir`] has every process sign with `--ca-dir` instead).
//!
//! Every namespace and process a mesh creates carries the mesh's unique prefix (`mt` + 6 hex
//! digits + `-`): dropping the [`Mesh`] (also while a test panics) kills the processes and
//! deletes the namespaces, and [`cleanup_stale`] sweeps what a killed test run left behind.
//!
//! ```no_run
//! use e2e::{Ambient, Mesh, Pod, Service};
//! # fn main() -> anyhow::Result<()> {
//! let mesh = Mesh::builder("plain_connectivity")
//!     .node("n1")
//!     .node("n2")
//!     .namespace("default", Ambient::Yes)
//!     .pod(Pod::new("default", "client").on("n1").service_account("client"))
//!     .pod(Pod::new("default", "server").on("n2").labels([("app", "echo")]))
//!     .service(
//!         Service::new("default", "echo")
//!             .vip("10.96.0.10")
//!             .port(80, 8080)
//!             .selector([("app", "echo")]),
//!     )
//!     .build()?;
//! let _server = mesh.spawn_echo("default/server", 8080, "v1")?;
//! let reply = mesh.http_get("default/client", "10.96.0.10:80".parse()?, "/hello")?;
//! assert_eq!(reply.status, 200);
//! # Ok(())
//! # }
//! ```

pub mod apiserver;
pub mod bench;
mod bpffs;
mod capture;
mod control;
pub mod echo;
pub mod grpc;
mod harness;
pub mod http;
pub mod jwt;
mod netns;
mod process;
pub mod prom;
pub mod scenario;
mod spec;
pub mod stream;
mod sys;
pub mod tls;
mod wait;
pub mod waypoint;
mod yaml;

pub use capture::{parse_pcap, Capture, CaptureSummary, Packet, Proto};
pub use control::CA_SERVER_NAME;
pub use harness::{
    echo_once, Blackhole, Labelled, Mesh, OldAgent, PROBE_SOURCE, UPGRADE_PORT_SHIFT,
};
pub use netns::{cleanup_stale, in_netns, StaleCleanup};
pub use nix::sys::signal::Signal;
pub use process::ChildGuard;
pub use scenario::{Scenario, Suite};
pub use spec::{
    Ambient, CaMode, MeshBuilder, Pod, Redirect, Service, CONTROL_GRPC_PORT, CONTROL_IP,
    REDIRECT_ENV,
};
pub use sys::{fd_count, held_sockets, preflight, rss_kib, Binaries, MARKER_ENV};
pub use wait::{eventually, wait_until};
pub use yaml::Rendered;
