//! The agent binary as a process of a test, its output in a log file.

use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

use super::netns::MARKER_ENV;

/// Starts `cmd` (the agent's binary, maybe through `ip netns exec`) with its stdout and
/// stderr in `log`, carrying `marker` for `cargo xtask clean`, logging at debug level for the
/// agent, and without the config-source variables of the environment the tests run in.
pub fn spawn_agent(mut cmd: Command, log: &Path, marker: &str) -> Result<Child> {
    let out = std::fs::File::create(log)?;
    let err = out.try_clone()?;
    cmd.env("RUST_LOG", "info,ztunnel=debug")
        .env(MARKER_ENV, marker)
        .env_remove("ZTUNNEL_CONFIG_DIR")
        .env_remove("ZTUNNEL_CONFIG_SOURCE")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .context("start ztunnel")
}
