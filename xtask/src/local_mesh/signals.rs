//! Ctrl-C, `kill` and a closed terminal, turned into messages: `up` must tear its mesh down
//! whichever way it is asked to stop, and only between steps (a half-built mesh is torn
//! down by the same code path as a whole one).
//!
//! SIGINT, SIGTERM and SIGHUP are blocked in the calling thread before any other thread
//! exists, so every later thread inherits the block and one dedicated thread receives them
//! with `sigwait`. Children do not inherit it: `std::process::Command` clears the signal mask
//! of every process it starts.

use std::cell::Cell;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use anyhow::{Context, Result};
use nix::sys::signal::{SigSet, Signal};

/// The stop requests this process has received.
#[derive(Debug)]
pub struct Signals {
    rx: Receiver<Signal>,
    first: Cell<Option<Signal>>,
}

impl Signals {
    /// Blocks the stop signals and starts the thread that receives them. Call it first thing
    /// in `main`, before anything starts a thread.
    pub fn install() -> Result<Self> {
        let mut set = SigSet::empty();
        for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            set.add(signal);
        }
        set.thread_block()
            .context("block SIGINT, SIGTERM and SIGHUP")?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                // After the first, further signals are received and dropped: a second
                // Ctrl-C must not interrupt the teardown the first one started.
                while let Ok(signal) = set.wait() {
                    if tx.send(signal).is_err() {
                        break;
                    }
                }
            })
            .context("spawn the signal thread")?;
        Ok(Signals {
            rx,
            first: Cell::new(None),
        })
    }

    /// The first stop signal received so far, if any.
    pub fn received(&self) -> Option<Signal> {
        if self.first.get().is_none() {
            if let Ok(signal) = self.rx.try_recv() {
                self.first.set(Some(signal));
            }
        }
        self.first.get()
    }

    /// Waits up to `timeout` for a stop signal.
    pub fn wait(&self, timeout: Duration) -> Option<Signal> {
        if self.first.get().is_none() {
            match self.rx.recv_timeout(timeout) {
                Ok(signal) => self.first.set(Some(signal)),
                Err(RecvTimeoutError::Timeout) => {}
                // The receiving thread is gone (sigwait failed): no signal can arrive any
                // more, but the caller's loop must still not spin.
                Err(RecvTimeoutError::Disconnected) => std::thread::sleep(timeout),
            }
        }
        self.first.get()
    }
}
