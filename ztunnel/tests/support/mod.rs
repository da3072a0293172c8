//! Shared by the integration tests: a fake API server, test network namespaces, the
//! in-process agents on loopback (`agents`), and the agent's binary serving pods of test
//! namespaces (`node_agent`), among them a dual-stack pod (`dual_stack`).
// Each test binary uses its own part of this module.
#![allow(dead_code, unused_imports)]

pub mod agents;
pub mod background;
pub mod dual_stack;
pub use e2e::apiserver;
pub mod netns;
pub mod node_agent;
pub mod process;
