//! Shared by the integration tests: a fake API server and test network namespaces.
// Each test binary uses its own part of this module.
#![allow(dead_code, unused_imports)]

pub use e2e::apiserver;
pub mod netns;
