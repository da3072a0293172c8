//! `cargo xtask <command>`: the project's automation. CI runs exactly `cargo xtask ci`.
//!
//! - `ci`: `cargo fmt --check`, `cargo clippy --workspace --all-targets -D warnings`, `test`.
//! - `test [-- <cargo test args>]`: build every binary, run every test (the e2e tests need
//!   root for network namespaces), then check that no test namespace or process is left.
//! - `clean`: remove the namespaces and processes that killed test runs left behind.
//! - `up [--config DIR] [--once]`: a local ambient mesh from Kubernetes YAML (default
//!   `examples/local-mesh`), exercised and described; stays up until Ctrl-C.
//! - `down`: tear down the mesh of a running or crashed `up`.
//! - `bench [--quick]`: build release binaries, measure every data path (direct, ztunnel
//!   with each redirection backend, haproxy and nginx baselines) and write `BENCHMARKS.md`
//!   and `BENCHMARKS.png` (`tests/src/bin/mesh-bench.rs`).
//!
//! Test leftovers are recognised exactly as the e2e harness names them: namespaces
//! `mt<6 hex>-*` and processes whose environment has `MESH_E2E_PREFIX=mt<6 hex>-`. Nothing is
//! ever matched by process name. The mesh of a live `up` is built the same way and is left
//! alone by `clean` (its prefix is in `up`'s state file).

mod local_mesh;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

/// The environment variable the e2e harness sets on every process it starts.
const MARKER_ENV: &str = "MESH_E2E_PREFIX";
/// Where `ip netns` keeps named namespaces.
const NETNS_DIR: &str = "/var/run/netns";
/// Root's tools live in sbin, which a CI or sudo PATH may lack.
const SBIN_DIRS: [&str; 3] = ["/usr/local/sbin", "/usr/sbin", "/sbin"];
/// How long killed leftovers get to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Parser, Debug)]
#[command(name = "cargo xtask", about = "Project automation")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Format check, clippy with warnings denied, then `test` (what CI runs).
    Ci,
    /// Build all binaries, run all tests (needs root), check nothing was left behind.
    Test {
        /// Extra arguments passed to `cargo test` (e.g. `-- --test-threads 1`).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Remove test network namespaces and processes left by killed test runs.
    Clean,
    /// Start a local ambient mesh from Kubernetes YAML, send traffic, show what happened,
    /// and stay up until Ctrl-C (needs root).
    Up {
        /// Directory of Kubernetes YAML [default: examples/local-mesh].
        #[arg(long, value_name = "DIR")]
        config: Option<PathBuf>,
        /// Exit after the report (tearing everything down); fail if a probe went against
        /// its `local-mesh/send-to` expectation.
        #[arg(long)]
        once: bool,
        /// Build and run release binaries.
        #[arg(long)]
        release: bool,
        /// Do not build: use the binaries already in the target directory.
        #[arg(long)]
        no_build: bool,
        /// If a mesh is already up, tear it down first instead of refusing.
        #[arg(long)]
        replace: bool,
    },
    /// Tear down the mesh of a running or crashed `cargo xtask up`.
    Down,
    /// Build release binaries, benchmark every data path against direct connections and
    /// haproxy/nginx baselines, and write BENCHMARKS.md + BENCHMARKS.png (needs root).
    Bench {
        /// Short runs (under 3 minutes) for development.
        #[arg(long)]
        quick: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Errors are printed plainly: a backtrace of xtask itself never helps.
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(command: Cmd) -> Result<()> {
    match command {
        Cmd::Ci => ci(),
        Cmd::Test { args } => test(&args),
        Cmd::Clean => {
            let removed = clean()?;
            println!("xtask clean: {}", removed.describe());
            Ok(())
        }
        Cmd::Up {
            config,
            once,
            release,
            no_build,
            replace,
        } => local_mesh::up(&local_mesh::UpOptions {
            config,
            once,
            release,
            no_build,
            replace,
        }),
        Cmd::Down => local_mesh::down(),
        Cmd::Bench { quick } => bench(quick),
    }
}

fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest_dir.to_path_buf())
}

/// Where cargo puts build output: `CARGO_TARGET_DIR`, else `<workspace>/target`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => workspace_root().join(dir),
        None => workspace_root().join("target"),
    }
}

fn cargo() -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root());
    cmd
}

/// Runs a command, echoing it first; a failure names the command.
fn run(cmd: &mut Command) -> Result<()> {
    let line = std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ");
    println!("$ {line}");
    let status = cmd.status().with_context(|| format!("run `{line}`"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

fn ci() -> Result<()> {
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    test(&[])
}

fn test(extra: &[String]) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective uid of the process reading it.
    let uid = std::fs::metadata("/proc/self")
        .context("stat /proc/self")?
        .uid();
    if uid != 0 {
        bail!(
            "the tests create network namespaces and need root: run `sudo -E cargo xtask test` \
             (or as root)"
        );
    }
    find_tool("ip").context("`ip` not found: install iproute2")?;

    let stale = clean()?;
    if !stale.is_empty() {
        println!(
            "xtask: removed leftovers of an earlier run: {}",
            stale.describe()
        );
    }
    // The e2e tests run the workspace's binaries (ztunnel, mesh-echo) from the target dir.
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    let tests = run(cargo().args(["test", "--workspace"]).args(extra));

    let left = clean()?;
    tests?;
    if !left.is_empty() {
        bail!(
            "the tests left things behind (now removed): {}",
            left.describe()
        );
    }
    println!("xtask: no test namespaces or processes left behind");
    Ok(())
}

/// Builds the release binaries and runs `mesh-bench`, which writes the report at the
/// workspace root (and the raw samples under `target/bench/`).
fn bench(quick: bool) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    require_root("the benchmarks create network namespaces")?;
    run(cargo().args(["build", "--release", "-p", "ztunnel", "-p", "e2e", "--bins"]))?;
    let root = workspace_root();
    let release = target_dir().join("release");
    // Ctrl-C reaches mesh-bench (same terminal process group), which stops between steps
    // and removes what it created; xtask must outlive it rather than die first.
    // `Command` clears the signal mask of the child it starts.
    let mut stops = SigSet::empty();
    for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
        stops.add(signal);
    }
    stops
        .thread_block()
        .context("block SIGINT, SIGTERM and SIGHUP while mesh-bench runs")?;
    let mut cmd = Command::new(release.join("mesh-bench"));
    if quick {
        cmd.arg("--quick");
    }
    cmd.arg("--out")
        .arg(root.join("BENCHMARKS.md"))
        .arg("--chart")
        .arg(root.join("BENCHMARKS.png"))
        .arg("--json")
        .arg(target_dir().join("bench").join("results.json"))
        .arg("--repo")
        .arg(&root)
        .env("E2E_BIN_DIR", &release);
    run(&mut cmd)
}

fn require_root(why: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective uid of the process reading it.
    let uid = std::fs::metadata("/proc/self")
        .context("stat /proc/self")?
        .uid();
    if uid != 0 {
        bail!("{why} and need root: run `sudo -E cargo xtask ...` (or as root)");
    }
    Ok(())
}

/// What a sweep found and removed.
#[derive(Debug, Default)]
struct Removed {
    netns: Vec<String>,
    pids: Vec<u32>,
}

impl Removed {
    fn is_empty(&self) -> bool {
        self.netns.is_empty() && self.pids.is_empty()
    }

    fn describe(&self) -> String {
        if self.is_empty() {
            return "nothing to remove".to_owned();
        }
        format!(
            "{} namespace(s) [{}], {} process(es) {:?}",
            self.netns.len(),
            self.netns.join(" "),
            self.pids.len(),
            self.pids
        )
    }
}

/// Kills leftover test processes and deletes leftover test namespaces, except those of the
/// mesh a live `cargo xtask up` runs.
fn clean() -> Result<Removed> {
    let keep = local_mesh::running_prefix();
    if let Some(prefix) = &keep {
        println!(
            "xtask: leaving the running local mesh ({prefix}*) alone; `cargo xtask down` \
             removes it"
        );
    }
    let kept = |prefix: &str| keep.as_deref() == Some(prefix);
    let mut netns = leftover_netns()?;
    netns.retain(|name| !name.get(..9).is_some_and(kept));
    let mut pids: Vec<u32> = marked_pids()
        .into_iter()
        .filter(|(_, prefix)| !kept(prefix))
        .map(|(pid, _)| pid)
        .collect();
    if !netns.is_empty() {
        let ip = find_tool("ip").context("`ip` not found: install iproute2")?;
        let own_netns = std::fs::read_link("/proc/self/ns/net").ok();
        for name in &netns {
            let out = Command::new(&ip)
                .args(["netns", "pids", name])
                .output()
                .with_context(|| format!("ip netns pids {name}"))?;
            pids.extend(
                String::from_utf8_lossy(&out.stdout)
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok())
                    // Never a process sharing our own (the host's) namespace.
                    .filter(|pid| {
                        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
                        theirs.is_some() && theirs != own_netns
                    }),
            );
        }
    }
    let own = std::process::id();
    pids.retain(|&p| p != own);
    pids.sort_unstable();
    pids.dedup();
    for pid in &pids {
        // An already-exited process makes kill fail, which is fine.
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
    let deadline = Instant::now() + KILL_TIMEOUT;
    while !pids.iter().all(|&p| is_gone(p)) {
        if Instant::now() >= deadline {
            bail!("leftover processes {pids:?} did not exit within {KILL_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if !netns.is_empty() {
        let ip = find_tool("ip").context("`ip` not found: install iproute2")?;
        for name in &netns {
            let status = Command::new(&ip)
                .args(["netns", "del", name])
                .status()
                .with_context(|| format!("ip netns del {name}"))?;
            if !status.success() {
                bail!("ip netns del {name} failed ({status})");
            }
        }
    }
    Ok(Removed { netns, pids })
}

fn leftover_netns() -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(NETNS_DIR) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("read {NETNS_DIR}")),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.len() > 9 && name.get(..9).is_some_and(is_harness_prefix))
        .collect();
    names.sort();
    Ok(names)
}

/// Processes carrying the harness marker with a harness prefix, with that prefix.
fn marked_pids() -> Vec<(u32, String)> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let env = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let prefix = env.split(|&b| b == 0).find_map(|var| {
                std::str::from_utf8(var)
                    .ok()
                    .and_then(|v| v.strip_prefix(MARKER_ENV)?.strip_prefix('='))
                    .filter(|p| is_harness_prefix(p))
                    .map(str::to_owned)
            })?;
            Some((pid, prefix))
        })
        .collect()
}

/// Names of the network namespaces starting with `prefix`.
fn netns_with_prefix(prefix: &str) -> Vec<String> {
    std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|name| name.starts_with(prefix))
        .collect()
}

/// Exited, or a zombie (its parent will reap it).
fn is_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
    }
}

/// `mt` + 6 lower-case hex digits + `-`: the only prefix shape the harness generates.
fn is_harness_prefix(prefix: &str) -> bool {
    let bytes = prefix.as_bytes();
    bytes.len() == 9
        && prefix.starts_with("mt")
        && bytes[2..8]
            .iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
        && bytes[8] == b'-'
}

fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(prefix: &str, expected: bool) {
        assert_eq!(is_harness_prefix(prefix), expected, "{prefix:?}");
    }

    #[test]
    fn only_the_harness_prefix_shape_is_swept() {
        check("mt1a2b3c-", true);
        check("mt000000-", true);
        check("mt1A2B3C-", false);
        check("mt1a2b3c", false);
        check("mt1a2b3c_", false);
        check("mt1a2b3g-", false);
        check("mtproto-x", false);
        check("docker-01", false);
        check("", false);
    }

    #[test]
    fn the_workspace_root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml"))
            .expect("workspace manifest");
        assert!(manifest.contains("[workspace]"));
    }
}
