//! Ctrl-C, `kill` and a closed terminal become a flag the measuring loop checks between
//! runs, so that a stopped benchmark unwinds normally and its guards remove every namespace,
//! process and mount it created.
//!
//! SIGINT, SIGTERM and SIGHUP are blocked in the calling thread before any other thread
//! exists (every later thread inherits the block) and one thread receives them with
//! `sigwait`. Children do not inherit the block: `std::process::Command` resets the signal
//! mask of what it starts.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use nix::sys::signal::{SigSet, Signal};

/// Whether a stop was requested. Cheap to clone.
#[derive(Clone, Debug, Default)]
pub struct Stop {
    flag: Arc<AtomicBool>,
}

impl Stop {
    /// Blocks the stop signals and starts the thread that receives them. Call it first thing
    /// in `main`, before anything starts a thread.
    pub fn install() -> Result<Stop> {
        let mut set = SigSet::empty();
        for signal in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP] {
            set.add(signal);
        }
        set.thread_block()
            .context("block SIGINT, SIGTERM and SIGHUP")?;
        let stop = Stop::default();
        let flag = stop.flag.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                while let Ok(signal) = set.wait() {
                    if !flag.swap(true, Ordering::SeqCst) {
                        eprintln!("mesh-bench: {signal} received; stopping after this step");
                    }
                }
            })
            .context("spawn the signal thread")?;
        Ok(stop)
    }

    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// An error when a stop was requested: `?` it between steps.
    pub fn check(&self) -> Result<()> {
        if self.requested() {
            bail!("stopped by a signal");
        }
        Ok(())
    }

    /// Asks for a stop (as a signal would).
    pub fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_requested_stop_fails_the_next_check() {
        let stop = Stop::default();
        assert!(stop.check().is_ok());
        stop.clone().request();
        assert!(stop.requested());
        assert!(stop.check().is_err());
    }
}
