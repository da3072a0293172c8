//! `mesh-bench` (run by `cargo xtask bench`): the data plane measured against no proxy and
//! against established proxies, on the harness's namespace topology, written up as
//! `BENCHMARKS.md` with a PNG chart.
//!
//! Layering, pure parts first (each unit-tested):
//! - [`stats`]: percentiles of one run, median and range over repetitions.
//! - [`tools`]: what `iperf3 -J` and `wrk --latency` print, read into numbers.
//! - [`model`]: data paths, metrics and the results of one run (serialisable).
//! - [`report`]: results → Markdown tables, ratios and the target comparison.
//! - [`baselines`]: haproxy and nginx configurations for the baseline paths.
//! - [`machine`]: what machine, which commit.
//! - IO: [`procstat`] (CPU and RSS of a process group), [`pki`] (baseline certificates),
//!   [`load`] (fixed-rate, connection-rate and idle-connection clients), [`chart`] (PNG),
//!   [`signals`] (Ctrl-C between steps), [`run`] (worlds, scenarios, the measuring loop),
//!   [`sizes`] (the model-size dimension: one world per model size; its ratios and report
//!   section are pure).

pub mod baselines;
pub mod chart;
pub mod load;
pub mod machine;
pub mod model;
pub mod pki;
pub mod procstat;
pub mod report;
pub mod run;
pub mod signals;
pub mod sizes;
pub mod stats;
pub mod tools;
