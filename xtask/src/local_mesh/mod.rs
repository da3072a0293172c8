//! `cargo xtask up` / `cargo xtask down`: a local ambient mesh from a directory of Kubernetes
//! YAML, built by the e2e harness (nodes and pods are network namespaces, one `ztunnel` per
//! node), exercised with the traffic its pods are annotated to send, and described.
//!
//! - [`config`]: YAML → topology, echo servers, probes, pass-through documents (pure);
//! - [`run`]: the running mesh and the traffic, observed as a report of facts;
//! - [`report`]: the facts as text;
//! - [`state`]: the record that lets `down` (and `clean`) find a mesh `up` left running;
//! - [`signals`]: Ctrl-C and friends as messages, so teardown always runs.

pub mod config;
pub mod forward;
pub mod report;
pub mod run;
pub mod signals;
pub mod state;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use config::LocalMesh;
use run::Running;
use signals::Signals;
use state::{Claim, State, StateFile, STATE_DIR};

/// The sample configuration, relative to the workspace root.
pub const SAMPLE_DIR: &str = "examples/local-mesh";
/// How often a running `up` checks its agents and re-reads the YAML directory.
const TICK: Duration = Duration::from_secs(1);
/// How long `down` gives `up` to tear down by itself before killing it. Long enough for an
/// `up` that is still building its mesh (each agent may take 30 s to become ready).
const DOWN_GRACE: Duration = Duration::from_secs(90);
/// Where the e2e harness takes the binaries it starts itself (the waypoints) from.
const BIN_DIR_ENV: &str = "E2E_BIN_DIR";
/// How long a killed process may take to disappear.
const KILL_WAIT: Duration = Duration::from_secs(10);

/// `cargo xtask up` options.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// The YAML directory (default: the sample).
    pub config: Option<PathBuf>,
    /// Print the report, tear down and exit; fail if a probe went against its expectation.
    pub once: bool,
    /// Build and run release binaries.
    pub release: bool,
    /// Use the binaries already built.
    pub no_build: bool,
    /// Tear down a mesh that is already up instead of refusing to start.
    pub replace: bool,
}

/// Builds, starts, exercises and reports; then stays up until a stop signal (or exits at
/// once with `--once`), tearing everything down on the way out.
pub fn up(opts: &UpOptions) -> Result<()> {
    // Before anything else: every thread started from here on inherits the blocked signals.
    let signals = Signals::install()?;
    e2e::preflight(true)?;
    if crate::find_tool("dumpcap").is_none() && crate::find_tool("tcpdump").is_none() {
        bail!("no capture tool: install tshark (`apt-get install tshark`) or tcpdump");
    }
    let source = match &opts.config {
        Some(dir) => dir.clone(),
        None => crate::workspace_root().join(SAMPLE_DIR),
    };
    let source = source
        .canonicalize()
        .with_context(|| format!("config directory {}", source.display()))?;
    // Read before building anything: a typo should cost a second, not a build.
    let config = LocalMesh::load(&source)?;
    let mut state_file = claim_state(Path::new(STATE_DIR), opts.replace)?;

    if !opts.no_build {
        let mut build = crate::cargo();
        build.args(["build", "--workspace", "--bins"]);
        if opts.release {
            build.arg("--release");
        }
        crate::run(&mut build)?;
    }
    let bin_dir = crate::target_dir().join(if opts.release { "release" } else { "debug" });
    // The harness starts waypoints from its own binary directory: make it this one (with
    // `--release` it would otherwise be xtask's own, the debug one).
    if std::env::var_os(BIN_DIR_ENV).is_none() {
        std::env::set_var(BIN_DIR_ENV, &bin_dir);
    }
    if let Some(signal) = signals.received() {
        bail!("stopped by {signal} before the mesh was built");
    }

    println!(
        "xtask up: starting {} node(s), {} pod(s), {} service(s) from {}",
        config.nodes.len(),
        config.pods.len(),
        config.services.len(),
        source.display()
    );
    let started = Instant::now();
    let mut running = Running::start(config, &bin_dir, Some(source.clone()))?;
    state_file.record_mesh(running.mesh().prefix(), running.mesh().work_dir(), &source)?;
    println!(
        "xtask up: mesh ready in {:.1} s; sending {} probe(s)\n",
        started.elapsed().as_secs_f64(),
        running.config().probe_count()
    );

    let report = match running.exercise(&|| signals.received().is_some()) {
        Ok(report) => report,
        Err(e) => {
            teardown(running);
            return Err(e);
        }
    };
    print!("{}", report::render(&report));
    println!();
    print!(
        "{}",
        report::whereabouts(&running, Some(&state_file.path()))
    );
    let unmet: Vec<String> = report
        .probes
        .iter()
        .filter(|p| p.met() == Some(false))
        .map(|p| format!("{} -> {}", p.client, p.target))
        .collect();
    let expected = report.probes.iter().filter(|p| p.met().is_some()).count();

    if opts.once {
        println!();
        teardown(running);
        if !unmet.is_empty() {
            bail!(
                "{} of {expected} probe(s) did not go as the YAML expects: {}",
                unmet.len(),
                unmet.join("; ")
            );
        }
        println!("xtask up: all {expected} probe(s) went as the YAML expects");
        return Ok(());
    }
    if !unmet.is_empty() {
        println!(
            "\nxtask up: {} of {expected} probe(s) did not go as the YAML expects",
            unmet.len()
        );
    }
    println!("\nxtask up: the mesh is up. Ctrl-C (or `cargo xtask down`) tears it down.");

    let mut reported_exits = std::collections::BTreeSet::new();
    let mut last_error: Option<String> = None;
    let signal = loop {
        if let Some(signal) = signals.wait(TICK) {
            break signal;
        }
        for node in running.config().nodes.clone() {
            if running.mesh().ztunnel_pid(&node).is_none() && reported_exits.insert(node.clone()) {
                println!(
                    "xtask up: the ztunnel of {node} exited; see {}",
                    running
                        .mesh()
                        .work_dir()
                        .join(format!("logs/ztunnel-{node}.log"))
                        .display()
                );
            }
        }
        match running.reapply() {
            Ok(messages) => {
                last_error = None;
                for message in messages {
                    println!("xtask up: {message}");
                }
            }
            // A half-saved file is normal while someone edits: say so once, keep running.
            Err(e) => {
                let text = format!("{e:#}");
                if last_error.as_ref() != Some(&text) {
                    println!("xtask up: not re-applied: {text}");
                    last_error = Some(text);
                }
            }
        }
    };
    println!("\nxtask up: {signal}: tearing down");
    teardown(running);
    Ok(())
}

/// Claims the state file; a live `up` is refused (or torn down with `replace`), a dead one's
/// leftovers are removed first.
fn claim_state(dir: &Path, replace: bool) -> Result<StateFile> {
    for _ in 0..2 {
        let me = State::of_this_process()?;
        match StateFile::claim(dir, me)? {
            Claim::Claimed(file) => return Ok(file),
            Claim::Taken(Some(other)) if other.is_running() && !replace => {
                bail!(
                    "a local mesh is already up (`cargo xtask up`, pid {}{}): run `cargo xtask \
                     down` first, or `cargo xtask up --replace`",
                    other.pid,
                    other
                        .prefix
                        .as_deref()
                        .map(|p| format!(", namespaces {p}*"))
                        .unwrap_or_default()
                );
            }
            Claim::Taken(_) => {
                println!("xtask up: tearing down the previous local mesh first");
                for line in down_in(dir)? {
                    println!("xtask up: {line}");
                }
            }
        }
    }
    bail!(
        "{} keeps being claimed by another `cargo xtask up`",
        state::path(dir).display()
    )
}

/// Stops the mesh's processes and removes its namespaces and work directory, saying so.
fn teardown(running: Running) {
    let prefix = running.mesh().prefix().to_owned();
    let work_dir = running.mesh().work_dir().to_owned();
    let namespaces = crate::netns_with_prefix(&prefix).len();
    drop(running);
    let left = crate::netns_with_prefix(&prefix);
    if left.is_empty() && !work_dir.exists() {
        println!(
            "xtask up: torn down: {namespaces} network namespace(s) {prefix}* and {} removed",
            work_dir.display()
        );
    } else {
        println!(
            "xtask up: teardown left {} namespace(s) {prefix}* behind: run `cargo xtask down`",
            left.len()
        );
    }
}

/// `cargo xtask down`: tears down what a running or crashed `up` left.
pub fn down() -> Result<()> {
    if !nix::unistd::geteuid().is_root() {
        bail!("the local mesh lives in network namespaces: run `cargo xtask down` as root");
    }
    for line in down_in(Path::new(STATE_DIR))? {
        println!("xtask down: {line}");
    }
    Ok(())
}

/// Tears down the mesh recorded in `dir`; returns what happened, line by line.
fn down_in(dir: &Path) -> Result<Vec<String>> {
    let Some(state) = state::read(dir)? else {
        return Ok(vec![format!(
            "no local mesh is up (no {})",
            state::path(dir).display()
        )]);
    };
    let mut lines = Vec::new();
    if state.is_running() {
        let pid = Pid::from_raw(i32::try_from(state.pid).context("pid out of range")?);
        // ESRCH: it exited since the check, which is what we want anyway.
        let _ = kill(pid, Signal::SIGTERM);
        if wait_gone(&state, DOWN_GRACE) {
            lines.push(format!(
                "stopped `cargo xtask up` (pid {}); it tore its mesh down",
                state.pid
            ));
        } else {
            let _ = kill(pid, Signal::SIGKILL);
            if !wait_gone(&state, KILL_WAIT) {
                bail!(
                    "`cargo xtask up` (pid {}) does not exit, even killed",
                    state.pid
                );
            }
            lines.push(format!(
                "`cargo xtask up` (pid {}) did not stop within {DOWN_GRACE:?}: killed it",
                state.pid
            ));
        }
    } else {
        lines.push(format!(
            "`cargo xtask up` (pid {}) is no longer running; removing what it left",
            state.pid
        ));
    }

    match &state.prefix {
        Some(prefix) if crate::is_harness_prefix(prefix) => {
            let swept = e2e::cleanup_stale(prefix)?;
            if swept.netns.is_empty() && swept.killed.is_empty() {
                lines.push(format!("no namespaces or processes {prefix}* were left"));
            } else {
                lines.push(format!(
                    "removed {} namespace(s) [{}] and killed {} process(es) {:?}",
                    swept.netns.len(),
                    swept.netns.join(" "),
                    swept.killed.len(),
                    swept.killed
                ));
            }
        }
        Some(prefix) => lines.push(format!(
            "the state names prefix {prefix:?}, which is not a harness prefix: left alone"
        )),
        None => lines.push(
            "it had not recorded a mesh yet; if it was killed while building one, \
             `cargo xtask clean` removes every test namespace"
                .to_owned(),
        ),
    }
    if let (Some(prefix), Some(work_dir)) = (&state.prefix, &state.work_dir) {
        if is_work_dir_of(work_dir, prefix) && work_dir.exists() {
            std::fs::remove_dir_all(work_dir)
                .with_context(|| format!("remove {}", work_dir.display()))?;
            lines.push(format!("removed {}", work_dir.display()));
        }
    }
    state::remove_if(dir, &state)?;
    Ok(lines)
}

/// Only a directory the harness made for this prefix (`<tmp>/e2e-<prefix>…`, not a symlink)
/// is ever deleted on the word of a state file.
fn is_work_dir_of(dir: &Path, prefix: &str) -> bool {
    dir.is_absolute()
        && dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("e2e-{prefix}")))
        && std::fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir())
}

/// Polls until the recorded process is gone (it is not our child, so it cannot be waited on).
fn wait_gone(state: &State, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while state.is_running() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    true
}

/// The YAML directory a live `up` was started from (`waypoint apply` edits it by default).
pub fn running_source() -> Option<PathBuf> {
    state::read(Path::new(STATE_DIR))
        .ok()
        .flatten()
        .filter(State::is_running)
        .and_then(|s| s.source)
}

/// The prefix of the mesh a live `up` runs, which `cargo xtask clean` must leave alone.
pub fn running_prefix() -> Option<String> {
    state::read(Path::new(STATE_DIR))
        .ok()
        .flatten()
        .filter(State::is_running)
        .and_then(|s| s.prefix)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Removes a scratch directory however the test ends.
    struct Scratch(PathBuf);
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn check(dir: &Path, prefix: &str, expected: bool) {
        assert_eq!(
            is_work_dir_of(dir, prefix),
            expected,
            "{} {prefix}",
            dir.display()
        );
    }

    #[test]
    fn only_the_harness_work_dir_of_the_prefix_is_deleted() {
        let tmp = std::env::temp_dir();
        let real = Scratch(tmp.join(format!("e2e-mt00abcd-test-{}", std::process::id())));
        std::fs::create_dir_all(&real.0).expect("mkdir");
        check(&real.0, "mt00abcd-", true);
        check(&real.0, "mt00abce-", false);
        check(Path::new("/"), "mt00abcd-", false);
        check(Path::new("e2e-mt00abcd-x"), "mt00abcd-", false);
        check(&tmp.join("e2e-mt00abcd-missing"), "mt00abcd-", false);
    }

    #[test]
    fn down_with_nothing_up_says_so() {
        let dir = std::env::temp_dir().join(format!("xtask-down-empty-{}", std::process::id()));
        let lines = down_in(&dir).expect("nothing to do is fine");
        assert_eq!(lines.len(), 1);
        assert!(lines[0].starts_with("no local mesh is up"), "{lines:?}");
    }

    /// Ids of every BPF link loaded now.
    fn link_ids() -> Vec<u64> {
        let out = std::process::Command::new(crate::find_tool("bpftool").expect("bpftool"))
            .args(["-j", "link", "show"])
            .output()
            .expect("run bpftool");
        let links: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).expect("json");
        links.iter().filter_map(|l| l["id"].as_u64()).collect()
    }

    /// An `up` that dies without tearing down (SIGKILL) leaves its agents, echo servers,
    /// namespaces, the nodes' bpffs with the pinned capture programs and the work directory.
    /// `down` removes all of it: afterwards nothing of the mesh is listed anywhere.
    #[test]
    fn down_after_a_crashed_up_leaves_nothing_behind() -> anyhow::Result<()> {
        let sample = crate::workspace_root().join(SAMPLE_DIR);
        let config = LocalMesh::load(&sample)?;
        let bin_dir = e2e::Binaries::locate().dir().to_path_buf();
        let running = Running::start(config, &bin_dir, None)?;
        let prefix = running.mesh().prefix().to_owned();
        let work_dir = running.mesh().work_dir().to_owned();
        let mut links = Vec::new();
        for pod in ["demo/sleep", "demo/echo-v1"] {
            links.extend(running.mesh().capture_links(pod)?);
        }
        if running.mesh().redirect() == Some(e2e::Redirect::Ebpf) {
            assert_eq!(
                links.len(),
                2,
                "one capture link per enrolled pod: {links:?}"
            );
        }
        // The crash: no destructor runs, every process of the mesh keeps running.
        std::mem::forget(running);

        let dir =
            Scratch(std::env::temp_dir().join(format!("xtask-down-crash-{}", std::process::id())));
        std::fs::create_dir_all(&dir.0)?;
        let crashed = State {
            pid: std::process::id(),
            // Not this process's start time: the recorded `up` is gone.
            start_time: 0,
            prefix: Some(prefix.clone()),
            work_dir: Some(work_dir.clone()),
            source: None,
        };
        std::fs::write(state::path(&dir.0), crashed.render())?;
        let lines = down_in(&dir.0)?;
        println!("{lines:#?}");

        assert!(
            crate::netns_with_prefix(&prefix).is_empty(),
            "namespaces left: {lines:?}"
        );
        assert!(!work_dir.exists(), "work dir left: {lines:?}");
        let mounts = std::fs::read_to_string("/proc/self/mountinfo")?;
        assert!(
            !mounts.lines().any(|l| l.contains(&format!("e2e-{prefix}"))),
            "mounts left:\n{mounts}"
        );
        let live = link_ids();
        let left: Vec<&u64> = links.iter().filter(|id| live.contains(id)).collect();
        assert!(left.is_empty(), "capture links left: {left:?}");
        let marked = crate::marked_pids();
        assert!(
            !marked.iter().any(|(_, p)| *p == prefix),
            "processes left: {marked:?}"
        );
        assert!(state::read(&dir.0)?.is_none(), "state file left");
        Ok(())
    }
}
