//! The process shell every mesh binary shares (the node agent, the waypoint, and the
//! control plane and ingress gateway to come), so that they cannot drift apart:
//!
//! - [`config`]: the flags every binary has (config source, CA, trust domain, the three
//!   endpoint addresses, timeouts, log format) as one `#[command(flatten)]` struct, each
//!   default a named constant, env vars under the binary's prefix (`ZTUNNEL_*`, `WAYPOINT_*`);
//! - [`source`]: where the model comes from (a polled YAML directory or the API server) and
//!   the loops that install each good model;
//! - [`logging`]: tracing to stderr with a filter replaceable at runtime;
//! - [`admin`]: `/metrics`, `/healthz/ready`, and on the loopback admin port `/config_dump`,
//!   `/logging`, `/quitquitquit`, `/debug/pprof/profile` ([`profile`]: CPU profiles in the
//!   pprof format); each binary adds its own dump and routes;
//! - [`accept`]: the accept loop that backs off while the process is out of file descriptors;
//! - [`allocator`]: idle workers hand their allocation caches back (RSS falls after a burst);
//! - [`workers`]: a runtime per worker thread (`--threading per-worker`), so that a
//!   connection's tasks stay on the thread that accepted it;
//! - [`process`]: the open-file limit, SIGTERM/SIGINT and `/quitquitquit` as one shutdown
//!   trigger, the drain deadline, and [`process::spawn`] (every task carries a span);
//! - [`limits`]: caps on open connections and TLS handshakes, first-byte and idle
//!   timeouts, TCP keepalive flags, and the budget of refusal log lines;
//! - [`conns`]: a count of open connections that shutdown waits on;
//! - [`certs`]: the certificate manager the CA flags describe (the CA service, or a CA
//!   directory signing in process).
#![deny(unsafe_code)] // allowed only in `allocator::flush_thread_cache` (one mallctl)

pub mod accept;
pub mod admin;
pub mod allocator;
pub mod certs;
pub mod config;
pub mod conns;
pub mod limits;
pub mod logging;
pub mod process;
pub mod profile;
pub mod source;
pub mod workers;

/// The unit tests allocate with jemalloc, as the binaries do (`allocator`'s tests read its
/// counters).
#[cfg(test)]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
