//! The host tools the harness drives (`ip`, `nft`, `dumpcap`), the binaries under test, and
//! the checks that turn "not root" or "tool missing" into one clear sentence.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// Environment variable set on every process the harness starts, holding the mesh's prefix.
/// It lets [`crate::cleanup_stale`] (and `cargo xtask clean`) find leftovers of a killed test
/// run by looking at `/proc/<pid>/environ`, without ever matching processes by name.
pub const MARKER_ENV: &str = "MESH_E2E_PREFIX";

/// Root's tools live in the sbin directories, which a CI or `sudo` PATH may lack.
const SBIN_DIRS: [&str; 4] = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin"];

/// Finds an executable in PATH or in the sbin directories.
pub(crate) fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(SBIN_DIRS.iter().map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

/// Like [`find_tool`], but names the Debian package to install when the tool is missing.
pub(crate) fn tool(name: &str, package: &str) -> Result<PathBuf> {
    find_tool(name).with_context(|| {
        format!("`{name}` not found in PATH or sbin: install it (`apt-get install {package}`)")
    })
}

/// PATH for child processes: the caller's, plus the sbin directories, so that ztunnel finds
/// `nft` even when the test runner was started with a user's PATH.
pub(crate) fn child_path() -> std::ffi::OsString {
    let current = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&current).collect();
    for dir in SBIN_DIRS {
        if !dirs.iter().any(|d| d == Path::new(dir)) {
            dirs.push(PathBuf::from(dir));
        }
    }
    std::env::join_paths(dirs).unwrap_or(current)
}

/// Whether this process runs with an effective uid of 0.
pub(crate) fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Checks what every namespace test needs: root, `ip`, and (when ztunnel will run with its
/// default nftables redirection) `nft`. The errors say what to do, because the usual cause is
/// running `cargo test` as a normal user.
pub fn preflight(need_nft: bool) -> Result<()> {
    if !is_root() {
        bail!(
            "the e2e tests create network namespaces and need root: run them as root \
             (e.g. `sudo -E cargo xtask test`)"
        );
    }
    tool("ip", "iproute2")?;
    if need_nft {
        tool("nft", "nftables")?;
    }
    Ok(())
}

/// Runs a command to completion; a non-zero exit becomes an error carrying the command line
/// and its stderr.
pub(crate) fn run(cmd: &mut Command) -> Result<String> {
    let line = command_line(cmd);
    let out = cmd.output().with_context(|| format!("run `{line}`"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `ip <args>`.
pub(crate) fn ip<S: AsRef<OsStr>>(args: &[S]) -> Result<String> {
    let ip = tool("ip", "iproute2")?;
    run(Command::new(ip).args(args))
}

/// `ip netns exec <netns> <argv...>` with the harness environment (marker and PATH).
/// `ip netns exec` execs the program rather than forking, so the child's pid is the program's.
pub(crate) fn netns_command(netns: &str, prefix: &str, argv: &[&str]) -> Result<Command> {
    let Some((program, _)) = argv.split_first() else {
        bail!("empty command line for netns {netns}");
    };
    if program.is_empty() {
        bail!("empty program name for netns {netns}");
    }
    let mut cmd = Command::new(tool("ip", "iproute2")?);
    cmd.args(["netns", "exec", netns])
        .args(argv)
        .env(MARKER_ENV, prefix)
        .env("PATH", child_path());
    Ok(cmd)
}

/// Renders a command for error messages.
pub(crate) fn command_line(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Where the binaries under test are.
#[derive(Clone, Debug)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// Finds the directory holding the workspace's built binaries: `E2E_BIN_DIR` if set, else
    /// the profile directory of the running test executable (`<target>/debug/deps/x` →
    /// `<target>/debug`, which follows `CARGO_TARGET_DIR` and the profile), else
    /// `$CARGO_TARGET_DIR/debug`, else `<workspace>/target/debug`.
    pub fn locate() -> Self {
        if let Some(dir) = std::env::var_os("E2E_BIN_DIR") {
            return Binaries { dir: dir.into() };
        }
        let from_exe = std::env::current_exe().ok().and_then(|exe| {
            let parent = exe.parent()?;
            if parent.file_name()? == "deps" {
                Some(parent.parent()?.to_path_buf())
            } else {
                Some(parent.to_path_buf())
            }
        });
        if let Some(dir) = from_exe.filter(|d| d.join("mesh-echo").is_file()) {
            return Binaries { dir };
        }
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
        Binaries {
            dir: target.join("debug"),
        }
    }

    /// The directory searched.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Path of the `ztunnel` binary, or an error saying how to build it.
    pub fn ztunnel(&self) -> Result<PathBuf> {
        self.binary("ztunnel")
    }

    /// Path of the `control` binary (the CA service), or an error saying how to build it.
    pub fn control(&self) -> Result<PathBuf> {
        self.binary("control")
    }

    /// Path of the `mesh-echo` binary, or an error saying how to build it.
    pub fn mesh_echo(&self) -> Result<PathBuf> {
        self.binary("mesh-echo")
    }

    /// Path of the `mesh-grpc` binary (gRPC test server and client), or an error saying how
    /// to build it.
    pub fn mesh_grpc(&self) -> Result<PathBuf> {
        self.binary("mesh-grpc")
    }

    /// Path of the `mesh-dns` binary (the tests' stand-in for a pod's resolver).
    pub fn mesh_dns(&self) -> Result<PathBuf> {
        self.binary("mesh-dns")
    }

    fn binary(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        if !path.is_file() {
            bail!(
                "{name} binary not found at {}: run `cargo build --workspace --bins` first \
                 (`cargo xtask test` does it)",
                path.display()
            );
        }
        Ok(path)
    }
}

/// The server side's TCP sockets of `addr` the kernel still has open (peer connected or
/// gone, not yet closed by the server): ESTABLISHED or CLOSE_WAIT in `/proc/net/tcp` of the
/// caller's namespace. Per address, so tests running alongside do not disturb the count.
pub fn held_sockets(addr: std::net::SocketAddr) -> Result<usize> {
    let std::net::IpAddr::V4(ip) = addr.ip() else {
        bail!("IPv4 only");
    };
    // /proc/net/tcp writes the address as the u32 in host order, in hex.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_le_bytes(ip.octets()),
        addr.port()
    );
    let table = std::fs::read_to_string("/proc/net/tcp")?;
    Ok(table
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((*f.get(1)?, *f.get(3)?))
        })
        .filter(|(l, state)| *l == local && matches!(*state, "01" | "08"))
        .count())
}

/// A process's open file descriptors (entries of `/proc/<pid>/fd`).
pub fn fd_count(pid: u32) -> Result<usize> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))
        .with_context(|| format!("list /proc/{pid}/fd"))?
        .count())
}

/// A process's resident memory in KiB (`VmRSS` of `/proc/<pid>/status`).
pub fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("read /proc/{pid}/status"))?;
    parse_vm_rss_kib(&status).with_context(|| format!("no VmRSS in /proc/{pid}/status"))
}

/// `VmRSS` of a `/proc/<pid>/status` text, in KiB.
pub(crate) fn parse_vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.split_whitespace().next()?.parse().ok()
}
