//! `cargo xtask fuzz [--time SECS] [TARGET...]`: a time-boxed pass over the cargo-fuzz
//! targets in `fuzz/` (one per parser of untrusted input).
//!
//! Needs the nightly toolchain and `cargo-fuzz` (both checked first, with how to install
//! them). Builds every target once without a sanitizer (the parsers are safe Rust: libFuzzer's
//! coverage guidance is what matters, and an uninstrumented build runs several times faster),
//! then runs each for `--time` seconds, so the whole pass takes about `targets × time` plus
//! the build. The corpus grows in `fuzz/corpus/<target>` (seeded from `fuzz/seeds/<target>`
//! and, for the YAML translator, `examples/local-mesh`), crashes land in
//! `fuzz/artifacts/<target>` and each run's libFuzzer output in `fuzz/logs/<target>.log`
//! (all gitignored). Prints executions per second and the corpus size per target; fails if a
//! target crashed, naming the input that reproduces it (`cargo +nightly fuzz run -s none
//! <target> <file>`), which then belongs in that parser's regression tests.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};

use crate::{run, workspace_root};

/// What one target's run gave.
struct Outcome {
    target: String,
    runs: Option<u64>,
    secs: f64,
    corpus: usize,
    crash: Option<String>,
}

pub fn fuzz(time: u64, only: &[String]) -> Result<()> {
    if time == 0 {
        bail!("--time must be at least 1 second");
    }
    let dir = workspace_root().join("fuzz");
    check_tools()?;
    let all = targets(&dir.join("Cargo.toml"))?;
    let chosen: Vec<String> = if only.is_empty() {
        all.clone()
    } else {
        for t in only {
            if !all.contains(t) {
                bail!("no fuzz target {t:?} (targets: {})", all.join(", "));
            }
        }
        only.to_vec()
    };
    println!(
        "xtask fuzz: {} targets × {time} s (plus the build)",
        chosen.len()
    );
    run(nightly(&dir).args(["fuzz", "build", "-s", "none"]))?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs).with_context(|| format!("create {}", logs.display()))?;
    let mut outcomes = Vec::new();
    for target in &chosen {
        outcomes.push(run_target(&dir, target, time, &logs)?);
    }
    println!(
        "\n{:<16} {:>12} {:>10} {:>8}  result",
        "target", "executions", "exec/s", "corpus"
    );
    for o in &outcomes {
        let rate = o.runs.map_or("?".to_string(), |r| {
            format!("{:.0}", r as f64 / o.secs.max(1.0))
        });
        println!(
            "{:<16} {:>12} {:>10} {:>8}  {}",
            o.target,
            o.runs.map_or("?".to_string(), |r| r.to_string()),
            rate,
            o.corpus,
            o.crash.as_deref().unwrap_or("ok")
        );
    }
    let crashed: Vec<&Outcome> = outcomes.iter().filter(|o| o.crash.is_some()).collect();
    if !crashed.is_empty() {
        bail!(
            "{} target(s) crashed; reproduce with `cargo +nightly fuzz run -s none <target> \
             <artifact>` in fuzz/ and add the input to the parser's regression tests",
            crashed.len()
        );
    }
    Ok(())
}

/// Nightly and cargo-fuzz, or a clear message on how to get them.
fn check_tools() -> Result<()> {
    let toolchain = Command::new("rustup")
        .args(["run", "nightly", "rustc", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !toolchain.is_ok_and(|s| s.success()) {
        bail!(
            "fuzzing needs the nightly toolchain (libFuzzer's instrumentation): \
             `rustup toolchain install nightly`"
        );
    }
    let fuzz = nightly(Path::new("."))
        .args(["fuzz", "--version"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !fuzz.is_ok_and(|s| s.success()) {
        bail!("fuzzing needs cargo-fuzz: `cargo install cargo-fuzz`");
    }
    Ok(())
}

/// `cargo` of the nightly toolchain in `dir` (not the stable cargo running xtask).
fn nightly(dir: &Path) -> Command {
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"])
        .current_dir(dir)
        .env_remove("CARGO")
        .env_remove("RUSTUP_TOOLCHAIN")
        .env_remove("CARGO_TARGET_DIR")
        .env("CARGO_INCREMENTAL", "0");
    cmd
}

/// The `[[bin]]` names of `fuzz/Cargo.toml`, in order.
fn targets(manifest: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(manifest)
        .with_context(|| format!("read {}", manifest.display()))?;
    Ok(bin_names(&text))
}

fn bin_names(manifest: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin {
            if let Some(name) = line
                .strip_prefix("name")
                .map(str::trim_start)
                .and_then(|l| l.strip_prefix('='))
            {
                names.push(name.trim().trim_matches('"').to_string());
            }
        }
    }
    names
}

fn run_target(dir: &Path, target: &str, time: u64, logs: &Path) -> Result<Outcome> {
    let corpus = dir.join("corpus").join(target);
    std::fs::create_dir_all(&corpus).with_context(|| format!("create {}", corpus.display()))?;
    let mut seeds: Vec<PathBuf> = vec![dir.join("seeds").join(target)];
    if target == "k8s_yaml" {
        seeds.push(workspace_root().join("examples").join("local-mesh"));
    }
    let log_path = logs.join(format!("{target}.log"));
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("create {}", log_path.display()))?;
    let mut cmd = nightly(dir);
    cmd.args(["fuzz", "run", "-s", "none", target]).arg(&corpus);
    cmd.args(seeds.iter().filter(|s| s.is_dir()));
    cmd.arg("--")
        .arg(format!("-max_total_time={time}"))
        // Bounded memory and input size: a parser that needs more is a finding.
        .arg("-rss_limit_mb=2048")
        .arg("-max_len=65536")
        .arg("-print_final_stats=1");
    cmd.stdout(log.try_clone().context("log file")?).stderr(log);
    println!("$ fuzz {target} for {time} s (log: {})", log_path.display());
    let started = Instant::now();
    let status = cmd
        .status()
        .with_context(|| format!("run fuzz target {target}"))?;
    let secs = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log_path).unwrap_or_default();
    let crash = (!status.success()).then(|| {
        artifact(&text).map_or_else(
            || format!("failed ({status}); see {}", log_path.display()),
            |a| format!("CRASH: {a}"),
        )
    });
    let corpus_size = std::fs::read_dir(&corpus).map_or(0, |d| d.count());
    Ok(Outcome {
        target: target.to_string(),
        runs: runs(&text),
        secs,
        corpus: corpus_size,
        crash,
    })
}

/// libFuzzer's `Done N runs in S second(s)`, or its final `stat::number_of_executed_units`.
fn runs(log: &str) -> Option<u64> {
    log.lines().rev().find_map(|l| {
        let l = l.trim();
        l.strip_prefix("stat::number_of_executed_units:")
            .or_else(|| l.strip_prefix("Done ").and_then(|r| r.split(' ').next()))
            .and_then(|n| n.trim().parse().ok())
    })
}

/// The file libFuzzer wrote the crashing input to.
fn artifact(log: &str) -> Option<String> {
    log.lines()
        .find_map(|l| l.split("Test unit written to ").nth(1))
        .map(|p| p.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_fuzz_target_has_its_source() {
        let dir = workspace_root().join("fuzz");
        let names = targets(&dir.join("Cargo.toml")).expect("fuzz/Cargo.toml");
        assert!(names.len() >= 9, "{names:?}");
        for n in &names {
            assert!(
                dir.join("fuzz_targets").join(format!("{n}.rs")).is_file(),
                "{n}"
            );
        }
    }

    #[test]
    fn libfuzzer_output_is_read() {
        let log = "#1024\tpulse  cov: 1\nDone 123456 runs in 61 second(s)\n";
        assert_eq!(runs(log), Some(123456));
        let log = "stat::number_of_executed_units: 99\nstat::peak_rss_mb: 40\n";
        assert_eq!(runs(log), Some(99));
        let crash = "==1== ERROR: libFuzzer: deadly signal\nartifact_prefix='a/'; Test unit written to fuzz/artifacts/jwt/crash-abc\n";
        assert_eq!(
            artifact(crash).as_deref(),
            Some("fuzz/artifacts/jwt/crash-abc")
        );
        assert_eq!(artifact("Done 1 runs"), None);
    }
}
