//! What `up`, `test`, `ci` and `bench` need from the machine beyond cargo, and getting it.
//!
//! Each of those commands calls [`ensure`] first (and `cargo xtask setup --for <command>`
//! does only that). Everything missing is listed at once; as root on Debian (apt-get
//! present) it is installed with one `apt-get update` + `apt-get install -y
//! --no-install-recommends`, unattended; anywhere else the one command to run is printed
//! and the command fails. The table [`NEEDS`] is the single place that knows which tool
//! comes from which Debian package; [`missing_packages`] is pure, so it is unit-tested.

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::{cargo, find_tool, run};

/// The command a machine is being prepared for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Purpose {
    /// `cargo xtask up`: build the binaries (eBPF included) and run a local mesh.
    Up,
    /// `cargo xtask test`: every test, both redirection backends.
    Test,
    /// `cargo xtask ci`: `test` plus the manifest and dashboard checks and `cargo deny`.
    Ci,
    /// `cargo xtask bench`: the data paths and their haproxy/nginx baselines.
    Bench,
}

/// How to tell whether a need is met.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Probe {
    /// A command on PATH (or in sbin).
    Command(&'static str),
    /// A file, such as a header the eBPF programs are compiled against.
    File(&'static str),
}

/// One thing a command needs, and the Debian package that provides it.
struct Need {
    probe: Probe,
    package: &'static str,
    for_: &'static [Purpose],
}

use Purpose::{Bench, Ci, Test, Up};

const ALL: &[Purpose] = &[Up, Test, Ci, Bench];
const TESTS: &[Purpose] = &[Test, Ci];

/// Everything beyond cargo, by command.
const NEEDS: &[Need] = &[
    // Network namespaces, veths, routes; the nftables redirection backend.
    need(Probe::Command("ip"), "iproute2", ALL),
    need(Probe::Command("nft"), "nftables", ALL),
    // The eBPF programs (ebpf/build.rs): clang and the headers they include.
    need(Probe::Command("clang"), "clang", ALL),
    need(
        Probe::File("/usr/include/bpf/bpf_helpers.h"),
        "libbpf-dev",
        ALL,
    ),
    need(
        Probe::File("/usr/include/linux/bpf.h"),
        "linux-libc-dev",
        ALL,
    ),
    // Loaded capture programs, checked after the tests.
    need(Probe::Command("bpftool"), "bpftool", ALL),
    // What the wire carried: `up`'s report and the tests' captures.
    need(Probe::Command("tshark"), "tshark", &[Up, Test, Ci]),
    need(Probe::Command("dumpcap"), "tshark", &[Up, Test, Ci]),
    need(Probe::Command("curl"), "curl", &[Up, Test, Ci]),
    need(Probe::Command("socat"), "socat", TESTS),
    need(Probe::Command("iperf3"), "iperf3", &[Test, Ci, Bench]),
    // A pod's DNS through the agent's DNS proxy (tests/tests/core.rs).
    need(Probe::Command("dig"), "dnsutils", TESTS),
    // One HTTP/2 connection's requests over every endpoint (tests/tests/waypoint.rs), and the
    // benchmark's one connection with 100 concurrent streams.
    need(
        Probe::Command("h2load"),
        "nghttp2-client",
        &[Test, Ci, Bench],
    ),
    need(Probe::Command("ps"), "procps", TESTS),
    // The node dashboard's rendering test (tests/tests/dashboard.rs) loads it headless.
    need(Probe::Command("chromium"), "chromium", TESTS),
    // The dashboards' PromQL (`cargo xtask manifests`).
    need(Probe::Command("promtool"), "prometheus", &[Ci]),
    // `kubernetes-validate` comes from PyPI, through pip (see [`ensure_validator`]).
    need(Probe::Command("python3"), "python3-pip", &[Ci]),
    // The benchmark's load generator, baselines and the chart's font.
    need(Probe::Command("wrk"), "wrk", &[Bench]),
    need(Probe::Command("haproxy"), "haproxy", &[Bench]),
    need(Probe::Command("nginx"), "nginx-light", &[Bench]),
    need(
        Probe::File("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
        "fonts-dejavu-core",
        &[Bench],
    ),
];

const fn need(probe: Probe, package: &'static str, for_: &'static [Purpose]) -> Need {
    Need {
        probe,
        package,
        for_,
    }
}

/// The PyPI package `cargo xtask manifests` validates with, pinned: the version must carry the
/// schemas of the Kubernetes version the manifests are checked against.
pub const KUBERNETES_VALIDATE: &str = "kubernetes-validate==1.37.0";

/// tshark asks whether non-root users may capture; answer no without a prompt.
const DEBCONF_ANSWERS: &str = "wireshark-common wireshark-common/install-setuid boolean false\n";

/// The Debian packages to install for `purpose`, given what is present: sorted, each once.
pub fn missing_packages(purpose: Purpose, present: &dyn Fn(Probe) -> bool) -> Vec<&'static str> {
    let mut packages: Vec<&'static str> = NEEDS
        .iter()
        .filter(|n| n.for_.contains(&purpose) && !present(n.probe))
        .map(|n| n.package)
        .collect();
    packages.sort_unstable();
    packages.dedup();
    packages
}

/// The one command that installs `packages` on Debian.
fn apt_command(packages: &[&str]) -> String {
    format!(
        "apt-get update && apt-get install -y --no-install-recommends {}",
        packages.join(" ")
    )
}

fn is_present(probe: Probe) -> bool {
    match probe {
        Probe::Command(name) => find_tool(name).is_some(),
        Probe::File(path) => Path::new(path).is_file(),
    }
}

/// Makes sure the machine has what `purpose` needs: installs it as root on Debian, else
/// fails with the command to run.
pub fn ensure(purpose: Purpose) -> Result<()> {
    let mut packages = missing_packages(purpose, &is_present);
    if purpose == Ci && !has_validator() && !has_pip() && !packages.contains(&"python3-pip") {
        packages.push("python3-pip");
    }
    if !packages.is_empty() {
        install(&packages)?;
        let still = missing_packages(purpose, &is_present);
        if !still.is_empty() {
            bail!("still missing after apt-get install: {}", still.join(" "));
        }
    }
    if purpose == Ci {
        ensure_validator()?;
        ensure_cargo_deny()?;
    }
    Ok(())
}

fn install(packages: &[&str]) -> Result<()> {
    let command = apt_command(packages);
    let Some(apt_get) = find_tool("apt-get").filter(|_| is_root()) else {
        bail!(
            "missing: {} (Debian packages). Install them as root: `{command}`, \
             or their equivalents on another distribution",
            packages.join(" ")
        );
    };
    println!("xtask setup: installing {}", packages.join(" "));
    if packages.contains(&"tshark") {
        let mut debconf = Command::new("debconf-set-selections")
            .stdin(Stdio::piped())
            .spawn()
            .context("run debconf-set-selections")?;
        debconf
            .stdin
            .take()
            .context("debconf-set-selections stdin")?
            .write_all(DEBCONF_ANSWERS.as_bytes())
            .context("write debconf-set-selections")?;
        let status = debconf.wait().context("wait for debconf-set-selections")?;
        if !status.success() {
            bail!("debconf-set-selections failed ({status})");
        }
    }
    let apt = |args: &[&str]| {
        let mut cmd = Command::new(&apt_get);
        cmd.args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        cmd
    };
    run(&mut apt(&["update", "-q"]))?;
    run(apt(&["install", "-y", "-q", "--no-install-recommends"]).args(packages))
}

/// `kubernetes-validate` for `cargo xtask manifests`, pinned, through pip.
fn ensure_validator() -> Result<()> {
    if has_validator() {
        return Ok(());
    }
    let pip = |extra: &[&str]| {
        let mut cmd = Command::new("python3");
        cmd.args(["-m", "pip", "install", "-q"])
            .args(extra)
            .arg(KUBERNETES_VALIDATE)
            .stdin(Stdio::null());
        cmd
    };
    if !is_root() {
        bail!(
            "`{}` not found: install it with `python3 -m pip install {KUBERNETES_VALIDATE}`",
            crate::VALIDATOR
        );
    }
    println!("xtask setup: installing {KUBERNETES_VALIDATE}");
    // Debian's own python3 refuses system-wide installs unless told (PEP 668).
    if run(&mut pip(&[])).is_err() {
        run(&mut pip(&["--break-system-packages"]))?;
    }
    if let Some(pyenv) = find_tool("pyenv") {
        run(Command::new(pyenv).arg("rehash"))?;
    }
    Ok(())
}

pub fn has_validator() -> bool {
    find_tool(crate::VALIDATOR).is_some() || crate::python_has_validator()
}

fn has_pip() -> bool {
    Command::new("python3")
        .args(["-m", "pip", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The cargo-deny release `ci` installs when it is missing: pinned, so a fresh machine gets
/// the one this project's `deny.toml` was checked with (and that builds with its toolchain).
const CARGO_DENY_VERSION: &str = "0.20.2";

/// `cargo deny` for the dependency policy in `deny.toml`.
fn ensure_cargo_deny() -> Result<()> {
    let present = cargo()
        .args(["deny", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if present {
        return Ok(());
    }
    println!("xtask setup: installing cargo-deny");
    run(cargo().args([
        "install",
        "cargo-deny",
        "--version",
        CARGO_DENY_VERSION,
        "--locked",
    ]))
}

fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective uid of the process reading it.
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(purpose: Purpose, absent: &[Probe], expected: &[&str]) {
        let present = |probe: Probe| !absent.contains(&probe);
        assert_eq!(
            missing_packages(purpose, &present),
            expected,
            "{purpose:?} without {absent:?}"
        );
    }

    #[test]
    fn a_complete_machine_needs_nothing() {
        for purpose in [Up, Test, Ci, Bench] {
            check(purpose, &[], &[]);
        }
    }

    #[test]
    fn each_missing_tool_maps_to_its_package_once() {
        use Probe::{Command as C, File as F};
        let fresh = [
            C("ip"),
            C("nft"),
            C("clang"),
            C("tshark"),
            C("dumpcap"),
            C("h2load"),
            C("promtool"),
            C("wrk"),
            C("nginx"),
            F("/usr/include/bpf/bpf_helpers.h"),
            F("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"),
        ];
        // What every command needs, then what each adds; the result is sorted.
        let base = ["clang", "iproute2", "libbpf-dev", "nftables"];
        let with = |extra: &[&'static str]| {
            let mut all: Vec<&str> = base.iter().chain(extra).copied().collect();
            all.sort_unstable();
            all
        };
        check(Up, &fresh, &with(&["tshark"]));
        check(Test, &fresh, &with(&["nghttp2-client", "tshark"]));
        check(
            Ci,
            &fresh,
            &with(&["nghttp2-client", "prometheus", "tshark"]),
        );
        check(
            Bench,
            &fresh,
            &with(&["fonts-dejavu-core", "nghttp2-client", "nginx-light", "wrk"]),
        );
    }

    #[test]
    fn the_install_command_is_one_line_to_paste() {
        assert_eq!(
            apt_command(&["iproute2", "tshark"]),
            "apt-get update && apt-get install -y --no-install-recommends iproute2 tshark"
        );
    }

    #[test]
    fn every_need_serves_some_command() {
        for n in NEEDS {
            assert!(!n.for_.is_empty(), "{:?} is needed by nothing", n.probe);
        }
    }
}
