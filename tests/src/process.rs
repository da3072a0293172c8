//! Child processes that cannot outlive their test.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::sys::command_line;
use crate::wait::wait_until;

/// A running child process, killed (with its whole process group) when dropped.
///
/// Its stdout and stderr go to files (read them with [`ChildGuard::stdout`] and
/// [`ChildGuard::stderr`]), so a chatty child can never block on a full pipe.
#[derive(Debug)]
pub struct ChildGuard {
    label: String,
    child: Child,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
}

impl ChildGuard {
    /// Starts `cmd` in a process group of its own, stdin closed, output to
    /// `<log_dir>/<label>.out` and `.err`.
    pub(crate) fn spawn(cmd: Command, label: &str, log_dir: &Path) -> Result<Self> {
        let stdout_path = log_dir.join(format!("{label}.out"));
        let stderr_path = log_dir.join(format!("{label}.err"));
        let stdout = File::create(&stdout_path)
            .with_context(|| format!("create {}", stdout_path.display()))?;
        let stderr = File::create(&stderr_path)
            .with_context(|| format!("create {}", stderr_path.display()))?;
        Self::spawn_with(cmd, label, (stdout, stdout_path), (stderr, stderr_path))
    }

    /// Starts `cmd` with stdout and stderr both appended to `log` (used for ztunnel, whose
    /// log must survive restarts).
    pub(crate) fn spawn_logging_to(cmd: Command, label: &str, log: &Path) -> Result<Self> {
        let open = || {
            File::options()
                .create(true)
                .append(true)
                .open(log)
                .with_context(|| format!("open {}", log.display()))
        };
        Self::spawn_with(
            cmd,
            label,
            (open()?, log.to_path_buf()),
            (open()?, log.to_path_buf()),
        )
    }

    fn spawn_with(
        mut cmd: Command,
        label: &str,
        (stdout, stdout_path): (File, PathBuf),
        (stderr, stderr_path): (File, PathBuf),
    ) -> Result<Self> {
        let line = command_line(&cmd);
        // Its own process group, so that dropping the guard also kills whatever it forked.
        cmd.process_group(0)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = cmd.spawn().with_context(|| format!("spawn `{line}`"))?;
        Ok(ChildGuard {
            label: label.to_owned(),
            child,
            stdout_path,
            stderr_path,
        })
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name its logs are filed under.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// Everything it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// Everything it wrote to stderr so far.
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// The last `lines` lines of its stderr, oldest first: what a failed check shows of its log.
    pub fn stderr_tail(&self, lines: usize) -> String {
        let log = self.stderr();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Waits until its stderr (its log) satisfies `holds`, e.g. shows that a config file was
    /// rejected; `what` names the awaited line in the error.
    pub fn wait_for_stderr(
        &self,
        what: &str,
        timeout: Duration,
        holds: impl Fn(&str) -> bool,
    ) -> Result<()> {
        wait_until(
            &format!("{}'s log to show {what}", self.label),
            timeout,
            || Ok(holds(&self.stderr())),
        )
    }

    /// Whether it is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until its stdout contains `needle` (e.g. a "listening on" line); fails early if
    /// the process exits first, quoting its stderr.
    pub fn wait_for_stdout(&mut self, needle: &str, timeout: Duration) -> Result<()> {
        wait_until(
            &format!("{} to print {needle:?}", self.label),
            timeout,
            || {
                if self.stdout().contains(needle) {
                    return Ok(true);
                }
                if let Some(status) = self.child.try_wait()? {
                    bail!(
                        "{} exited ({status}) before printing {needle:?}; stderr: {}",
                        self.label,
                        self.stderr().trim()
                    );
                }
                Ok(false)
            },
        )
    }

    /// Sends `signal` to its process group.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pgid = Pid::from_raw(i32::try_from(self.pid()).context("pid out of range")?);
        killpg(pgid, signal).with_context(|| format!("send {signal} to {}", self.label))
    }

    /// Waits up to `timeout` for it to exit.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Asks it to stop (SIGTERM), and kills it if it has not exited within `grace`.
    pub fn terminate(&mut self, grace: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        // ESRCH: it exited between the check and the signal.
        let _ = self.signal(Signal::SIGTERM);
        match self.wait_timeout(grace)? {
            Some(status) => Ok(status),
            None => self.kill(),
        }
    }

    /// Kills its process group (SIGKILL) and reaps it.
    pub fn kill(&mut self) -> Result<ExitStatus> {
        if let Some(status) = self.child.try_wait()? {
            return Ok(status);
        }
        let _ = self.signal(Signal::SIGKILL);
        self.child
            .wait()
            .with_context(|| format!("wait for {}", self.label))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Err(e) = self.kill() {
            eprintln!("e2e: could not stop {}: {e:#}", self.label);
        }
    }
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}
