//! Named scenarios over one shared mesh: a suite whose mesh is slow to build (nodes, agents,
//! a waypoint) declares its checks as named functions, and this module is the suite binary's
//! test harness (`harness = false` in `tests/Cargo.toml`, built on `libtest-mimic`).
//!
//! Each scenario is a test of its own, named after its function: listed by `--list`, selected
//! by the usual name filter (`cargo test -p e2e --test waypoint_routing -- header_match`) and
//! reported pass or fail one by one. The suite's shared context (`C`, which owns the mesh) is
//! built once, by the first scenario selected to run, so `--list` or a filter that selects no
//! scenario builds nothing. If it cannot be built, every selected scenario fails with that
//! error. It is dropped (processes killed, namespaces deleted) when the trials are done, before
//! the binary exits, whether they passed, failed or panicked.
//!
//! Scenarios run one at a time, in the order given, on the one context: one that changes
//! shared config restores it before it returns, so the next one starts from the suite's
//! declared state. A failing or panicking scenario fails only itself; the next ones still run.
//! A suite may also have standalone tests (each building its own small mesh), which run first.
//!
//! The harness takes libtest's usual arguments (`--list`, `--exact`, `--skip`, `--nocapture`,
//! `--test-threads`, which is always 1 here, `-q`), with two differences: one name filter, not
//! several; and output is never captured, so what a scenario prints shows as it runs.

use std::any::Any;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::process::ExitCode;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::{Error, Result};
use libtest_mimic::{Arguments, Conclusion, Failed, Trial};

/// A scenario: its name (the behaviour it checks, as a `#[test]` would be named) and its body.
pub type Scenario<C> = (&'static str, fn(&mut C) -> Result<()>);

/// A standalone test of a scenario suite: its name and its body, which needs no shared context.
pub type Test = (&'static str, fn() -> Result<()>);

/// `scenarios![a, b]`: the [`Scenario`]s of functions `a` and `b`, each named after its function.
#[macro_export]
macro_rules! scenarios {
    ($($body:ident),+ $(,)?) => {
        [$((stringify!($body), $body as fn(&mut _) -> anyhow::Result<()>)),+]
    };
}

/// `tests![a, b]`: the standalone [`Test`]s of functions `a` and `b`, named after them.
#[macro_export]
macro_rules! tests {
    ($($body:ident),+ $(,)?) => {
        [$((stringify!($body), $body as fn() -> anyhow::Result<()>)),+]
    };
}

/// What a suite's scenarios share: typically the mesh and the processes started in it, owned
/// (the mesh last among the fields, so the processes in it are stopped before it is removed).
pub trait Suite: Send + 'static {
    /// Adds to a failed scenario's error what helps explain it (a process's last log lines).
    fn explain(&self, err: Error) -> Error {
        err
    }
}

/// The suite binary's `main`: parses the test arguments, runs the selected scenarios (and
/// standalone tests) one at a time, and drops the shared context before returning the exit
/// code.
pub fn main<C: Suite>(
    build: fn() -> Result<C>,
    scenarios: &[Scenario<C>],
    tests: &[Test],
) -> ExitCode {
    run(&Arguments::from_args(), build, scenarios, tests).exit_code()
}

/// Runs `tests` then `scenarios` as `args` select them, each a trial of its own, sequentially
/// (whatever `--test-threads` says); the context is built by `build` when the first selected
/// scenario starts, and dropped before this returns.
pub fn run<C: Suite>(
    args: &Arguments,
    build: impl FnOnce() -> Result<C> + Send + 'static,
    scenarios: &[Scenario<C>],
    tests: &[Test],
) -> Conclusion {
    let mut args = args.clone();
    args.test_threads = Some(1);
    let shared = Arc::new(Mutex::new(Shared::Unbuilt(Some(Box::new(build)))));
    let standalone = tests
        .iter()
        .map(|&(name, body)| Trial::test(name, move || guarded(body).map_err(failed)));
    let scenario_trials = scenarios.iter().map(|&(name, body)| {
        let shared = Arc::clone(&shared);
        Trial::test(name, move || run_scenario(&shared, body))
    });
    let conclusion = libtest_mimic::run(&args, standalone.chain(scenario_trials).collect());
    // The trials (and their handles on the context) are gone; tear the mesh down now, as
    // `exit` would not.
    let context = std::mem::replace(&mut *lock(&shared), Shared::Dropped);
    drop(context);
    conclusion
}

/// The shared context through a suite's life.
enum Shared<C> {
    /// No scenario has run yet: how to build it (taken by the first one).
    Unbuilt(Option<Builder<C>>),
    Built(C),
    /// Building it failed: the error each scenario fails with.
    Broken(String),
    Dropped,
}

type Builder<C> = Box<dyn FnOnce() -> Result<C> + Send>;

/// Runs one scenario on the shared context, building it first if no scenario has yet.
fn run_scenario<C: Suite>(
    shared: &Mutex<Shared<C>>,
    body: fn(&mut C) -> Result<()>,
) -> Result<(), Failed> {
    let mut state = lock(shared);
    if let Shared::Unbuilt(build) = &mut *state {
        let build = build.take().expect("the builder is taken once");
        let started = Instant::now();
        *state = match guarded(build) {
            Ok(context) => {
                eprintln!("scenarios: shared mesh built in {:?}", started.elapsed());
                Shared::Built(context)
            }
            Err(err) => Shared::Broken(format!("{err:?}")),
        };
    }
    match &mut *state {
        Shared::Built(context) => {
            guarded(|| body(context)).map_err(|err| failed(context.explain(err)))
        }
        Shared::Broken(why) => {
            Err(format!("the suite's shared mesh could not be built: {why}").into())
        }
        Shared::Unbuilt(_) | Shared::Dropped => {
            unreachable!("the context is built before and dropped after every scenario")
        }
    }
}

/// Runs `body`, turning a panic (an assertion) into an error so it fails only this trial.
fn guarded<T>(body: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(body))
        .unwrap_or_else(|panic| Err(Error::msg(panic_message(&*panic))))
}

fn panic_message(panic: &(dyn Any + Send)) -> String {
    let text = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("(no message)");
    format!("panicked: {text}")
}

/// A failed trial's message: the error with its causes, as a `#[test]` returning it prints it.
fn failed(err: Error) -> Failed {
    format!("{err:?}").into()
}

/// The shared state, also after a panic while it was held (which [`guarded`] catches anyway).
fn lock<C>(shared: &Mutex<Shared<C>>) -> std::sync::MutexGuard<'_, Shared<C>> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;

    /// A context that records what happens to it in the log its test holds.
    struct Log(Arc<Mutex<Vec<String>>>);

    impl Log {
        fn push(&self, what: &str) {
            self.0.lock().unwrap().push(what.to_string());
        }
    }

    impl Suite for Log {
        fn explain(&self, err: Error) -> Error {
            err.context("explained by the suite")
        }
    }

    impl Drop for Log {
        fn drop(&mut self) {
            self.push("dropped");
        }
    }

    fn first(log: &mut Log) -> Result<()> {
        log.push("first");
        Ok(())
    }

    fn second(log: &mut Log) -> Result<()> {
        log.push("second");
        bail!("boom")
    }

    fn third(log: &mut Log) -> Result<()> {
        log.push("third");
        panic!("assertion failed");
    }

    fn fourth(log: &mut Log) -> Result<()> {
        log.push("fourth");
        Ok(())
    }

    fn alone() -> Result<()> {
        Ok(())
    }

    /// Runs the four scenarios and `alone` with the harness arguments `argv`; returns the
    /// conclusion and the log (what was built, run and dropped, in order).
    fn check(argv: &[&str], build_fails: bool) -> (Conclusion, Vec<String>) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let for_build = Arc::clone(&log);
        let build = move || {
            for_build.lock().unwrap().push("built".to_string());
            if build_fails {
                bail!("no mesh today");
            }
            Ok(Log(for_build))
        };
        // The inner harness reports to /dev/null: its "FAILED" lines are expected here.
        let quiet = ["suite", "--logfile", "/dev/null"];
        let args = Arguments::from_iter(quiet.into_iter().chain(argv.iter().copied()));
        let conclusion = run(
            &args,
            build,
            &scenarios![first, second, third, fourth],
            &tests![alone],
        );
        let log = log.lock().unwrap().clone();
        (conclusion, log)
    }

    #[test]
    fn scenarios_run_in_order_a_failure_or_panic_fails_only_its_own_and_the_context_is_dropped_last(
    ) {
        let (conclusion, log) = check(&[], false);
        assert_eq!(
            log,
            ["built", "first", "second", "third", "fourth", "dropped"]
        );
        assert_eq!((conclusion.num_passed, conclusion.num_failed), (3, 2));
    }

    #[test]
    fn a_filter_selects_scenarios_by_their_function_name() {
        let (conclusion, log) = check(&["--exact", "fourth"], false);
        assert_eq!(log, ["built", "fourth", "dropped"]);
        assert_eq!((conclusion.num_passed, conclusion.num_filtered_out), (1, 4));
    }

    #[test]
    fn nothing_is_built_when_no_scenario_is_selected_or_only_the_list_is_asked_for() {
        let (conclusion, log) = check(&["alone"], false);
        assert!(log.is_empty(), "{log:?}");
        assert_eq!(conclusion.num_passed, 1);
        let (_, log) = check(&["--list"], false);
        assert!(log.is_empty(), "{log:?}");
    }

    #[test]
    fn a_context_that_cannot_be_built_fails_every_selected_scenario_and_is_built_once() {
        let (conclusion, log) = check(&[], true);
        assert_eq!(log, ["built"]);
        assert_eq!((conclusion.num_passed, conclusion.num_failed), (1, 4));
    }

    #[test]
    fn a_failure_carries_its_error_and_the_suites_explanation_and_a_panic_its_message() {
        let shared = Mutex::new(Shared::Built(Log(Arc::default())));
        let err = run_scenario(&shared, second).expect_err("second fails");
        let text = err.message().unwrap_or_default();
        assert!(
            text.contains("boom") && text.contains("explained by the suite"),
            "{text}"
        );
        let err = run_scenario(&shared, third).expect_err("third panics");
        let text = err.message().unwrap_or_default();
        assert!(text.contains("panicked: assertion failed"), "{text}");
        run_scenario(&shared, fourth).expect("the context survives a panic");
    }
}
