//! Bounded polling: the only way the harness waits. Every wait has a deadline and its error
//! says what was awaited and what the last attempt saw.

use std::time::{Duration, Instant};

use anyhow::{anyhow, Result};

/// Pause between polls: short enough that waits end soon after the condition holds, long
/// enough not to burn a core on a 2-core machine.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Polls `check` until it returns `Ok(true)` or `timeout` passes. `Ok(false)` and errors both
/// mean "not yet"; the last error is reported if time runs out.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Result<bool>,
) -> Result<()> {
    eventually(what, timeout, || match check() {
        Ok(true) => Ok(()),
        Ok(false) => Err(anyhow!("condition not met yet")),
        Err(e) => Err(e),
    })
}

/// Retries `attempt` until it succeeds or `timeout` passes, returning the first success.
/// Use it for effects that happen asynchronously (a policy file being reloaded, a listener
/// coming up); the error names `what` and carries the last failure.
pub fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut attempt: impl FnMut() -> Result<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match attempt() {
            Ok(value) => return Ok(value),
            Err(e) if Instant::now() >= deadline => {
                return Err(e.context(format!("{what}: still failing after {timeout:?}")));
            }
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_that_becomes_true_ends_the_wait() {
        let mut calls = 0;
        let result = wait_until("third call", Duration::from_secs(5), || {
            calls += 1;
            Ok(calls == 3)
        });
        assert!(result.is_ok());
        assert_eq!(calls, 3);
    }

    #[test]
    fn a_condition_that_never_holds_reports_what_was_awaited_and_the_last_error() {
        let err = eventually::<()>("the impossible", Duration::from_millis(60), || {
            Err(anyhow!("nope"))
        })
        .expect_err("never succeeds");
        let text = format!("{err:#}");
        assert!(text.contains("the impossible"), "{text}");
        assert!(text.contains("nope"), "{text}");
    }
}
