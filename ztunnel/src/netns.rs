//! Network namespaces: the only module that changes a thread's namespace.
//!
//! The agent runs in the node's namespace and opens sockets inside each pod's namespace. A socket
//! belongs to the namespace it was created in for its whole life, so switching is only needed
//! around `socket()`: [`Netns::run`] enters the pod namespace on the current thread, runs a
//! closure that must not await, and always switches back.
//!
//! With `--redirect loopback` a pod's "namespace" is the agent's own ([`Netns::current`]):
//! every thread is already in it (that is this module's invariant), so running there switches
//! nothing and needs no privilege.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::{Path, PathBuf};

use nix::sched::{setns, CloneFlags};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("open netns {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("setns into {path}: {source}")]
    Enter { path: PathBuf, source: nix::Error },
    #[error("setns back to the agent's netns: {0}")]
    Return(nix::Error),
}

/// An open handle on a network namespace (keeps it alive while held).
#[derive(Debug)]
pub struct Netns {
    file: File,
    path: PathBuf,
    /// The agent's own namespace: [`Netns::run`] need not (and, without `CAP_SYS_ADMIN`,
    /// could not) switch to it.
    own: bool,
}

impl Netns {
    pub fn open(path: &Path) -> Result<Netns, NetnsError> {
        let file = File::open(path).map_err(|source| NetnsError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Netns {
            file,
            path: path.to_path_buf(),
            own: false,
        })
    }

    /// The namespace the agent itself runs in (opened once at startup).
    pub fn current() -> Result<Netns, NetnsError> {
        let netns = Netns::open(Path::new("/proc/thread-self/ns/net"))?;
        Ok(Netns { own: true, ..netns })
    }

    /// Whether this is the agent's own namespace (a pod with `--redirect loopback`), where
    /// sockets are made without switching and no capture rule is there to skip.
    pub fn is_own(&self) -> bool {
        self.own
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` with the current thread inside `self`, then returns to `home`.
    ///
    /// `f` must be synchronous: nothing else may run on this thread while it is switched.
    pub fn run<T>(&self, home: &Netns, f: impl FnOnce() -> T) -> Result<T, NetnsError> {
        if self.own {
            // The thread is in the agent's namespace already (it only ever leaves it here).
            return Ok(f());
        }
        setns(&self.file, CloneFlags::CLONE_NEWNET).map_err(|source| NetnsError::Enter {
            path: self.path.clone(),
            source,
        })?;
        let out = f();
        // If we cannot return, this thread would go on serving the wrong namespace and every
        // later socket could land in a pod: stopping the process is the only safe answer.
        if let Err(e) = setns(&home.file, CloneFlags::CLONE_NEWNET) {
            tracing::error!(error = %NetnsError::Return(e), "cannot leave pod netns; aborting");
            std::process::abort();
        }
        Ok(out)
    }
}

/// The namespace's file descriptor, e.g. to attach BPF programs to it.
impl AsFd for Netns {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
