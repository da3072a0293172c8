//! `cargo xtask <command>`: the project's automation. CI runs exactly `cargo xtask ci`.
//!
//! - `ci`: `setup --for ci`, `cargo fmt --check`, `cargo clippy --workspace --all-targets
//!   -D warnings`, `layers`, `cargo deny check bans licenses sources` (`deny.toml`),
//!   `manifests`, `test`.
//! - `layers`: the crates' dependency graph against the intended layers ([`layers`]).
//! - `setup --for up|test|ci|bench`: install what that command needs beyond cargo (Debian
//!   packages, the pinned `kubernetes-validate`, `cargo-deny`); `up`, `test`, `ci` and
//!   `bench` do it themselves first ([`setup`]).
//! - `manifests`: validate every `manifests/*.yaml` offline against the Kubernetes API schemas
//!   (`kubernetes-validate --strict`, Kubernetes [`MANIFESTS_K8S_VERSION`]), with what
//!   `gateway render` makes of [`gateway_cli::EXAMPLE`], and the Grafana
//!   dashboards in `manifests/dashboards/` ([`dashboards`]: shape, variables, metric names,
//!   PromQL through `promtool check rules`); and that only the CA's manifest references the
//!   signing key ([`key_holder`]).
//! - `test [-- <cargo test args>]`: build every binary, run every test (the e2e tests need
//!   root for network namespaces), then check that no test namespace or process is left.
//! - `clean`: remove the namespaces and processes that killed test runs left behind.
//! - `up [--config DIR] [--once]`: a local ambient mesh from Kubernetes YAML (default
//!   `examples/local-mesh`), exercised and described; stays up until Ctrl-C.
//! - `down`: tear down the mesh of a running or crashed `up`.
//! - `waypoint apply|delete|list`: deploy, remove and show waypoints, in a local mesh's YAML
//!   directory or (`--kubectl`) in a cluster ([`waypoint_cli`]).
//! - `gateway render|apply|delete`: the objects that run each ingress Gateway (class `istio`)
//!   of a file, rendered from `manifests/ingress-gateway.yaml`, printed or applied with
//!   `kubectl` ([`gateway_cli`]).
//! - `bench [--quick]`: build release binaries, measure every data path (direct, ztunnel
//!   with each redirection backend, haproxy and nginx baselines) and write `BENCHMARKS.md`
//!   and `BENCHMARKS.png` (`tests/src/bin/mesh-bench.rs`).
//! - `soak [--minutes N] [--redirect ebpf|nftables]`: the soak suite (`tests/tests/soak.rs`)
//!   for N minutes per backend (both when none is named): byte-exact traffic through agent
//!   restarts, policy flips, certificate rotations, bad config and re-enrollment; its report
//!   goes to `target/soak-<backend>.txt`.
//! - `fuzz [--time SECS] [TARGET...]`: run each cargo-fuzz target in `fuzz/` for SECS
//!   seconds (nightly + cargo-fuzz; [`fuzz`]), print executions/s, fail on a crash.
//!
//! Test leftovers are recognised exactly as the e2e harness names them: namespaces
//! `mt<6 hex>-*` and processes whose environment has `MESH_E2E_PREFIX=mt<6 hex>-`. Nothing is
//! ever matched by process name. The mesh of a live `up` is built the same way and is left
//! alone by `clean` (its prefix is in `up`'s state file).

mod cluster;
mod dashboards;
mod fuzz;
mod gateway_cli;
mod key_holder;
mod layers;
mod local_mesh;
mod setup;
mod waypoint_cli;

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
/// The Kubernetes version the manifests are validated against: the oldest the agent supports
/// (k8s-openapi's `v1_32` feature in the workspace Cargo.toml).
const MANIFESTS_K8S_VERSION: &str = "1.32.0";
/// The validator (PyPI package `kubernetes-validate`, which ships the schemas: no network).
const VALIDATOR: &str = "kubernetes-validate";
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
    /// Setup, format check, clippy with warnings denied, `layers`, `cargo deny`, `manifests`,
    /// then `test` (what CI runs).
    Ci,
    /// Check the crates' dependencies against the intended layers (mesh-model does no IO).
    Layers,
    /// Install what a command needs beyond cargo (as root on Debian; else print how).
    Setup {
        /// The command to prepare the machine for.
        #[arg(long = "for", value_enum, default_value_t = setup::Purpose::Ci)]
        purpose: setup::Purpose,
    },
    /// Validate the Kubernetes manifests (manifests/*.yaml, and `gateway render` of an example)
    /// offline, strictly; only the CA's references the signing key.
    Manifests,
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
    /// Waypoints (L7 proxies): `apply`, `delete`, `list`, locally or with --kubectl.
    Waypoint {
        #[command(subcommand)]
        command: waypoint_cli::WaypointCmd,
    },
    /// Ingress gateways (Gateways of class istio): `render` the objects that run them, `apply`
    /// or `delete` them with --kubectl.
    Gateway {
        #[command(subcommand)]
        command: gateway_cli::GatewayCmd,
    },
    /// Build release binaries, benchmark every data path against direct connections and
    /// haproxy/nginx baselines, and write BENCHMARKS.md + BENCHMARKS.png (needs root).
    Bench {
        /// Short runs (under 4 minutes of measuring) for development.
        #[arg(long)]
        quick: bool,
    },
    /// Run the soak (tests/tests/soak.rs) for --minutes per backend: echo streams and short
    /// connections with sha256 of every byte while n2's agent restarts, a policy flips,
    /// certificates rotate, bad config is refused and a pod is re-enrolled; asserts 0 bytes
    /// lost to allowed destinations, every refusal matched by an agent's flag, 0 leaked fds,
    /// flat RSS (needs root). Report: target/soak-<backend>.txt.
    Soak {
        /// Minutes of load per backend (fractions allowed).
        #[arg(long, default_value_t = 15.0)]
        minutes: f64,
        /// Only this capture backend (default: eBPF, then nftables).
        #[arg(long, value_parser = ["ebpf", "nftables"])]
        redirect: Option<String>,
    },
    /// Run every cargo-fuzz target in fuzz/ (or those named) for --time seconds each, with
    /// the nightly toolchain and cargo-fuzz; fails if one crashes.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Only these targets (names as in fuzz/Cargo.toml).
        targets: Vec<String>,
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
        Cmd::Layers => layers::check_workspace(),
        Cmd::Setup { purpose } => {
            setup::ensure(purpose)?;
            println!("xtask setup: everything {purpose:?} needs is installed");
            Ok(())
        }
        Cmd::Manifests => manifests(),
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
        } => setup::ensure(setup::Purpose::Up).and_then(|()| {
            local_mesh::up(&local_mesh::UpOptions {
                config,
                once,
                release,
                no_build,
                replace,
            })
        }),
        Cmd::Down => local_mesh::down(),
        Cmd::Waypoint { command } => waypoint_cli::run(command),
        Cmd::Gateway { command } => gateway_cli::run(command),
        Cmd::Bench { quick } => bench(quick),
        Cmd::Fuzz { time, targets } => fuzz::fuzz(time, &targets),
        Cmd::Soak { minutes, redirect } => soak(minutes, redirect.as_deref()),
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
    setup::ensure(setup::Purpose::Ci)?;
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    layers::check_workspace()?;
    // The dependency policy in deny.toml (licences, one crypto backend, crates.io only);
    // advisories are left out: their database comes from the network.
    run(cargo().args(["deny", "check", "bans", "licenses", "sources"]))?;
    manifests()?;
    test(&[])
}

/// `kubernetes-validate --strict` on every manifest and on the ingress gateway objects
/// rendered from [`gateway_cli::EXAMPLE`]: unknown fields, wrong types and missing required
/// fields fail, against the schemas of [`MANIFESTS_K8S_VERSION`] shipped in the package
/// (nothing is fetched). First, that no manifest but the CA's references the signing key
/// ([`key_holder`]).
fn manifests() -> Result<()> {
    let dir = workspace_root().join("manifests");
    key_holder::check_dir(&dir)?;
    println!(
        "xtask: only manifests/{} references the CA's signing key",
        key_holder::KEY_HOLDER
    );
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("read {}", dir.display()))?
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("no manifests (*.yaml) in {}", dir.display());
    }
    // What `gateway render` makes of the template must pass too: validated in the same run.
    files.push(gateway_cli::write_example(&target_dir().join("xtask"))?);
    let mut cmd = match find_tool(VALIDATOR) {
        Some(tool) => Command::new(tool),
        // Installed by pip into a directory not on PATH: the module runs the same.
        None if python_has_validator() => {
            let mut cmd = Command::new("python3");
            cmd.args(["-m", "kubernetes_validate"]);
            cmd
        }
        None => bail!(
            "`{VALIDATOR}` not found: `cargo xtask setup --for ci` installs it (pip install {})",
            setup::KUBERNETES_VALIDATE
        ),
    };
    cmd.args(["--strict", "--kubernetes-version", MANIFESTS_K8S_VERSION])
        .args(&files)
        .current_dir(workspace_root());
    run(&mut cmd)?;
    let queries = dashboards::check_dir(&dir.join("dashboards"))?;
    println!("xtask: dashboards ok ({queries} queries checked)");
    Ok(())
}

fn python_has_validator() -> bool {
    Command::new("python3")
        .args(["-c", "import kubernetes_validate"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn test(extra: &[String]) -> Result<()> {
    require_root("the tests create network namespaces")?;
    setup::ensure(setup::Purpose::Test)?;

    let stale = clean()?;
    if !stale.is_empty() {
        println!(
            "xtask: removed leftovers of an earlier run: {}",
            stale.describe()
        );
    }
    // The e2e tests run the workspace's binaries (ztunnel, mesh-echo) from the target dir.
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    // Every test with the default backend (eBPF), then the end-to-end suites again with the
    // nftables fallback: both backends must pass the same suite.
    let tests = run(cargo().args(["test", "--workspace"]).args(extra)).and_then(|()| {
        let mut nft = cargo();
        nft.env("E2E_REDIRECT", "nftables")
            .args(["test", "-p", "e2e"])
            .args(E2E_SUITES.iter().flat_map(|t| ["--test", t]))
            .args(extra);
        println!("xtask: the end-to-end suites again, with E2E_REDIRECT=nftables");
        run(&mut nft)
    });

    let left = clean()?;
    tests?;
    let programs = capture_programs();
    if !programs.is_empty() {
        bail!("capture programs left loaded after the tests: {programs:?}");
    }
    if !left.is_empty() {
        bail!(
            "the tests left things behind (now removed): {}",
            left.describe()
        );
    }
    println!("xtask: no test namespaces or processes left behind");
    Ok(())
}

/// `cargo xtask soak`: the soak suite with `SOAK_MINUTES`, once per backend asked for, then
/// the same leftover checks as `test`.
fn soak(minutes: f64, redirect: Option<&str>) -> Result<()> {
    if !(minutes.is_finite() && minutes > 0.0) {
        bail!("--minutes {minutes}: expected a positive number");
    }
    require_root("the soak creates network namespaces")?;
    setup::ensure(setup::Purpose::Test)?;
    let stale = clean()?;
    if !stale.is_empty() {
        println!(
            "xtask: removed leftovers of an earlier run: {}",
            stale.describe()
        );
    }
    run(cargo().args([
        "build", "-p", "ztunnel", "-p", "control", "-p", "e2e", "--bins",
    ]))?;
    let backends = match redirect {
        Some(one) => vec![one],
        None => vec!["ebpf", "nftables"],
    };
    let mut result = Ok(());
    for backend in backends {
        println!("xtask: soak for {minutes} min with E2E_REDIRECT={backend}");
        result = run(cargo()
            .env("E2E_REDIRECT", backend)
            .env("SOAK_MINUTES", minutes.to_string())
            .args(["test", "-p", "e2e", "--test", "soak", "--", "--nocapture"]));
        if result.is_err() {
            break;
        }
    }
    let left = clean()?;
    result?;
    if !left.is_empty() {
        bail!(
            "the soak left things behind (now removed): {}",
            left.describe()
        );
    }
    Ok(())
}

/// The e2e test targets that run once per redirection backend (`soak` in its short form:
/// `SOAK_MINUTES` unset is one minute).
const E2E_SUITES: [&str; 20] = [
    "core",
    "ca_service",
    "enrollment",
    "lifecycle",
    "upgrade",
    "bad_peers",
    "waypoint",
    "waypoint_routing",
    "dashboard",
    "waypoint_jwt",
    "waypoint_traffic",
    "waypoint_resilience",
    "waypoint_grpc",
    "bypass_l7",
    "bypass_capture",
    "abuse_hbone",
    "waypoint_abuse",
    "idle_load",
    "half_open",
    "soak",
];
/// The name the kernel shows for ztunnel's capture program (`zt_capture` in capture.bpf.c,
/// truncated to 15 characters by the kernel, which this fits).
const CAPTURE_PROGRAM: &str = "zt_capture";

/// Ids of loaded capture programs (`bpftool prog show`): none may outlive the tests, except
/// those of a running `cargo xtask up`. Empty when bpftool is missing.
fn capture_programs() -> Vec<u64> {
    if local_mesh::running_prefix().is_some() {
        return Vec::new();
    }
    let Some(bpftool) = find_tool("bpftool") else {
        return Vec::new();
    };
    let Ok(out) = Command::new(bpftool).args(["-j", "prog", "show"]).output() else {
        return Vec::new();
    };
    let progs: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    progs
        .iter()
        .filter(|p| p["name"].as_str() == Some(CAPTURE_PROGRAM))
        .filter_map(|p| p["id"].as_u64())
        .collect()
}

/// Builds the release binaries and runs `mesh-bench`, which writes the report at the
/// workspace root (and the raw samples under `target/bench/`).
fn bench(quick: bool) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    require_root("the benchmarks create network namespaces")?;
    setup::ensure(setup::Purpose::Bench)?;
    run(cargo().args([
        "build",
        "--release",
        "-p",
        "ztunnel",
        "-p",
        "waypoint",
        // The harness's CA (the node agents get their certificates from it).
        "-p",
        "control",
        "-p",
        "e2e",
        "--bins",
    ]))?;
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
    bpffs: Vec<String>,
}

impl Removed {
    fn is_empty(&self) -> bool {
        self.netns.is_empty() && self.pids.is_empty() && self.bpffs.is_empty()
    }

    fn describe(&self) -> String {
        if self.is_empty() {
            return "nothing to remove".to_owned();
        }
        format!(
            "{} namespace(s) [{}], {} process(es) {:?}, {} bpffs mount(s) [{}]",
            self.netns.len(),
            self.netns.join(" "),
            self.pids.len(),
            self.pids,
            self.bpffs.len(),
            self.bpffs.join(" ")
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
    let bpffs = stale_bpffs(&kept);
    for mount_point in &bpffs {
        let status = Command::new("umount")
            .args(["-l", mount_point])
            .status()
            .with_context(|| format!("umount {mount_point}"))?;
        if !status.success() {
            bail!("umount {mount_point} failed ({status})");
        }
    }
    Ok(Removed { netns, pids, bpffs })
}

/// bpffs mounts inside a harness work directory (`/tmp/e2e-<prefix>…/bpffs`) whose mesh is
/// not kept.
fn stale_bpffs(kept: &dyn Fn(&str) -> bool) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter_map(|line| {
            let (fields, tail) = line.split_once(" - ")?;
            let mount_point = fields.split(' ').nth(4)?;
            (tail.split(' ').next()? == "bpf").then_some(mount_point)
        })
        .filter(|mount_point| {
            Path::new(mount_point).components().any(|c| {
                let name = c.as_os_str().to_string_lossy();
                name.strip_prefix("e2e-")
                    .and_then(|rest| rest.get(..9))
                    .is_some_and(|prefix| is_harness_prefix(prefix) && !kept(prefix))
            })
        })
        .map(str::to_owned)
        .collect()
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

    fn parse(args: &[&str]) -> Result<Cmd, clap::Error> {
        Cli::try_parse_from(std::iter::once("cargo xtask").chain(args.iter().copied()))
            .map(|c| c.command)
    }

    #[test]
    fn the_soak_command_parses_as_documented() {
        let check = |args: &[&str], expected: Option<(f64, Option<&str>)>| {
            let got = match parse(args) {
                Ok(Cmd::Soak { minutes, redirect }) => Some((minutes, redirect)),
                _ => None,
            };
            assert_eq!(
                got,
                expected.map(|(m, r)| (m, r.map(str::to_owned))),
                "{args:?}"
            );
        };
        check(&["soak"], Some((15.0, None)));
        check(&["soak", "--minutes", "2.5"], Some((2.5, None)));
        check(
            &["soak", "--minutes", "20", "--redirect", "nftables"],
            Some((20.0, Some("nftables"))),
        );
        check(&["soak", "--redirect", "ebpf"], Some((15.0, Some("ebpf"))));
        check(&["soak", "--redirect", "iptables"], None);
        check(&["soak", "--minutes", "soon"], None);
    }

    #[test]
    fn the_waypoint_commands_parse_as_documented() {
        use waypoint_cli::render::WaypointFor;
        use waypoint_cli::WaypointCmd;
        let cmd = parse(&[
            "waypoint",
            "apply",
            "-n",
            "demo",
            "--for",
            "all",
            "--service-account",
            "l7",
            "--enroll-namespace",
            "--config",
            "/tmp/x",
        ])
        .expect("parses");
        let Cmd::Waypoint {
            command: WaypointCmd::Apply(a),
        } = cmd
        else {
            panic!("not apply: {cmd:?}");
        };
        assert_eq!(
            (a.namespace.as_str(), a.name.as_str(), a.waypoint_for),
            ("demo", "waypoint", WaypointFor::All)
        );
        assert_eq!(a.service_account.as_deref(), Some("l7"));
        assert!(a.enroll_namespace && !a.mode.kubectl);
        assert!(parse(&["waypoint", "apply", "-n", "demo", "--kubectl", "--print"]).is_ok());
        assert!(parse(&["waypoint", "delete", "-n", "demo", "--name", "wp"]).is_ok());
        assert!(parse(&["waypoint", "list"]).is_ok());
        assert!(parse(&["waypoint", "list", "-n", "demo", "--kubectl"]).is_ok());
        for bad in [
            &["waypoint", "apply"][..],
            &["waypoint", "apply", "-n", "demo", "--for", "none"],
            &["waypoint", "apply", "-n", "demo", "--print"],
            &[
                "waypoint",
                "apply",
                "-n",
                "demo",
                "--kubectl",
                "--config",
                "/tmp",
            ],
            &[
                "waypoint",
                "apply",
                "-n",
                "demo",
                "--kubectl",
                "--node",
                "n1",
            ],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn the_gateway_commands_parse_as_documented() {
        use gateway_cli::GatewayCmd;
        let cmd = parse(&["gateway", "render", "-f", "gw.yaml", "-n", "shop"]).expect("parses");
        let Cmd::Gateway {
            command: GatewayCmd::Render(r),
        } = cmd
        else {
            panic!("not render: {cmd:?}");
        };
        assert_eq!(r.input.file, PathBuf::from("gw.yaml"));
        assert_eq!(r.input.namespace.as_deref(), Some("shop"));
        let cmd = parse(&["gateway", "delete", "--name", "web", "--kubectl"]).expect("parses");
        let Cmd::Gateway {
            command: GatewayCmd::Delete(d),
        } = cmd
        else {
            panic!("not delete: {cmd:?}");
        };
        assert_eq!((d.namespace.as_str(), d.name.as_str()), ("default", "web"));
        assert!(d.mode.kubectl && !d.mode.print);
        for ok in [
            &["gateway", "apply", "-f", "gw.yaml", "--kubectl"][..],
            &[
                "gateway",
                "apply",
                "--filename",
                "-",
                "--kubectl",
                "--print",
            ],
            &["gateway", "render", "--file", "gw.yaml"],
            &[
                "gateway",
                "delete",
                "-n",
                "shop",
                "--name",
                "web",
                "--kubectl",
                "--print",
            ],
        ] {
            assert!(parse(ok).is_ok(), "{ok:?} must parse");
        }
        for bad in [
            &["gateway", "render"][..],
            &["gateway", "apply", "-f", "gw.yaml"],
            &["gateway", "apply", "-f", "gw.yaml", "--print"],
            &["gateway", "delete", "--name", "web"],
            &["gateway", "delete", "--kubectl"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} must be refused");
        }
    }

    #[test]
    fn the_workspace_root_holds_the_workspace_manifest() {
        let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml"))
            .expect("workspace manifest");
        assert!(manifest.contains("[workspace]"));
    }
}
