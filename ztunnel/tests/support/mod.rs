//! Shared by the integration tests: a fake API server, test network namespaces, and the
//! in-process agents on loopback (`agents`).
// Each test binary uses its own part of this module.
#![allow(dead_code, unused_imports)]

pub mod agents;
pub use e2e::apiserver;
pub mod netns;
pub mod process;
