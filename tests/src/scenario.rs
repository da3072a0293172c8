//! Named scenarios over one shared mesh: a suite whose mesh is slow to build (nodes, agents,
//! a waypoint) declares its checks as named functions and runs them in order from one
//! `#[test]`, instead of building the mesh once per `#[test]`.
//!
//! Each scenario's name is printed as it starts and ends, and a failure (an error or a
//! panicking assertion) names the scenario it happened in. Scenarios run in the order given
//! and share the suite's context (`C`): one that changes shared config restores it before it
//! returns, so the next one starts from the suite's declared state.

use std::time::Instant;

use anyhow::{Context, Result};

/// A scenario: its name (the behaviour it checks, as a `#[test]` would be named) and its body.
pub type Scenario<C> = (&'static str, fn(&mut C) -> Result<()>);

/// `scenarios![a, b]`: the [`Scenario`]s of functions `a` and `b`, each named after its function.
#[macro_export]
macro_rules! scenarios {
    ($($body:ident),+ $(,)?) => {
        [$((stringify!($body), $body as fn(&mut _) -> anyhow::Result<()>)),+]
    };
}

/// Runs `scenarios` in order on `ctx`, stopping at the first that fails; the error (or the
/// panic message's preamble) names it.
pub fn run_scenarios<C>(ctx: &mut C, scenarios: &[Scenario<C>]) -> Result<()> {
    for (name, body) in scenarios {
        eprintln!("scenario {name}: started");
        let started = Instant::now();
        let _reporter = PanicReporter(name);
        body(ctx).with_context(|| format!("scenario {name} failed"))?;
        eprintln!("scenario {name}: ok in {:?}", started.elapsed());
    }
    Ok(())
}

/// Names the scenario an assertion panicked in (says nothing when dropped without a panic).
struct PanicReporter<'a>(&'a str);

impl Drop for PanicReporter<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("scenario {} failed (panicked)", self.0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::bail;

    fn first(log: &mut Vec<&'static str>) -> Result<()> {
        log.push("first");
        Ok(())
    }

    fn second(log: &mut Vec<&'static str>) -> Result<()> {
        log.push("second");
        bail!("boom")
    }

    fn never(log: &mut Vec<&'static str>) -> Result<()> {
        log.push("never");
        Ok(())
    }

    #[test]
    fn scenarios_run_in_order_and_a_failure_names_its_scenario_and_stops_the_rest() {
        let mut log = Vec::new();
        let err = run_scenarios(&mut log, &scenarios![first, second, never])
            .expect_err("the second fails");
        assert_eq!(log, ["first", "second"]);
        let text = format!("{err:#}");
        assert!(text.contains("scenario second failed"), "{text}");
        assert!(text.contains("boom"), "{text}");
    }
}
