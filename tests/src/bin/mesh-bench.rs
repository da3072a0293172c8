//! `mesh-bench`: measures the data plane against direct connections and established proxies
//! and writes `BENCHMARKS.md` with a PNG chart. Run it through `cargo xtask bench [--quick]`,
//! which builds the release binaries first; it needs root (network namespaces).
//!
//! ```text
//! mesh-bench [--quick] [--out BENCHMARKS.md] [--chart BENCHMARKS.png] [--json results.json]
//! mesh-bench --render results.json [--out ..] [--chart ..]   # re-render a saved run
//! mesh-bench --memory 10000 [--redirect nftables]             # idle-connection memory only
//! mesh-bench --hold                                           # keep the worlds up, for profiling
//! mesh-bench --sizes-only [--quick] [--redirect ebpf] [--json ..]  # the model-size dimension only
//! ```

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use e2e::bench::model::Results;
use e2e::bench::run::{self, Options};
use e2e::bench::signals::Stop;
use e2e::bench::{chart, report, sizes};

#[derive(Parser, Debug)]
#[command(about = "Benchmark the mesh data plane against direct connections and baselines")]
struct Args {
    /// Short runs (under 4 minutes of measuring) for development; the numbers are noisier.
    #[arg(long)]
    quick: bool,
    /// Where to write the report.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Where to write the chart (PNG); the report links it by file name.
    #[arg(long)]
    chart: Option<PathBuf>,
    /// Also keep the raw samples as JSON (to compare runs, or re-render).
    #[arg(long)]
    json: Option<PathBuf>,
    /// Do not measure: render the report from a JSON file an earlier run kept.
    #[arg(long, value_name = "JSON")]
    render: Option<PathBuf>,
    /// The git work tree whose commit the report names.
    #[arg(long, default_value = ".")]
    repo: PathBuf,
    /// Only the idle-connection memory measure, with this many connections, on one ztunnel
    /// world: RSS idle, loaded, and 1 s / 5 s / 15 s after the close, printed (no report).
    #[arg(long, value_name = "N")]
    memory: Option<usize>,
    /// Build the plain and eBPF worlds, print each path's client netns, URL and proxy
    /// pids, and keep them up until Ctrl-C: for profiling by hand. Nothing is measured.
    #[arg(long)]
    hold: bool,
    /// Only the model-size dimension (issue 15: empty, 10k, 50k pods; `--quick`: empty and
    /// 10k): its report section printed, the samples kept with `--json`.
    #[arg(long)]
    sizes_only: bool,
    /// The redirection backend of `--memory`'s world (default nftables) or of
    /// `--sizes-only`'s (default ebpf).
    #[arg(long, value_parser = ["nftables", "ebpf"])]
    redirect: Option<String>,
}

fn main() -> ExitCode {
    // Before any thread exists, so that every thread inherits the blocked signals.
    let stop = match Stop::install() {
        Ok(stop) => stop,
        Err(e) => {
            eprintln!("mesh-bench: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    match real_main(&stop) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(stop: &Stop) -> Result<()> {
    let args = Args::parse();
    if args.hold {
        return run::hold(stop);
    }
    if args.sizes_only {
        let backend = match args.redirect.as_deref() {
            Some("nftables") => e2e::Redirect::Nftables,
            _ => e2e::Redirect::Ebpf,
        };
        let results = run::sizes_only(args.quick, backend, &args.repo, stop)?;
        if let Some(json) = &args.json {
            write_file(json, &serde_json::to_string_pretty(&results)?)?;
        }
        let mut section = String::new();
        sizes::section(&mut section, &results);
        print!("{section}");
        for note in &results.meta.notes {
            eprintln!("mesh-bench: note: {note}");
        }
        return Ok(());
    }
    if let Some(connections) = args.memory {
        let backend = match args.redirect.as_deref() {
            Some("ebpf") => e2e::Redirect::Ebpf,
            _ => e2e::Redirect::Nftables,
        };
        let plan = run::ProbePlan {
            connections,
            backend,
            after_close: [1, 5, 15].map(Duration::from_secs).to_vec(),
        };
        print!("{}", run::memory_probe(&plan, stop)?.render());
        return Ok(());
    }
    let chart_path = args
        .chart
        .clone()
        .unwrap_or_else(|| args.out.with_extension("png"));
    let results = match &args.render {
        Some(json) => {
            let text = std::fs::read_to_string(json)
                .with_context(|| format!("read {}", json.display()))?;
            serde_json::from_str::<Results>(&text)
                .with_context(|| format!("parse {}", json.display()))?
        }
        None => {
            let results = run::run(
                &Options {
                    quick: args.quick,
                    repo: args.repo.clone(),
                },
                stop,
            )?;
            if let Some(json) = &args.json {
                write_file(json, &serde_json::to_string_pretty(&results)?)?;
            }
            results
        }
    };
    write_report(&results, &args.out, &chart_path)
}

fn write_report(results: &Results, out: &Path, chart_path: &Path) -> Result<()> {
    let mut results = results.clone();
    let font = chart::load_font();
    if font.is_none() {
        results.meta.notes.push(format!(
            "No TrueType font found ({}): the chart has no text. `apt-get install \
             fonts-dejavu-core` fixes that.",
            chart::FONT_CANDIDATES[0]
        ));
    }
    let chart_name = match chart::draw(&results, chart_path, font.is_some()) {
        Ok(()) => chart_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned()),
        Err(e) => {
            eprintln!("mesh-bench: no chart: {e:#}");
            results
                .meta
                .notes
                .push(format!("The chart could not be drawn: {e:#}"));
            None
        }
    };
    let mut report = report::render(&results, chart_name.as_deref());
    // Hand-written analysis below the marker survives regeneration.
    if let Some(kept) = std::fs::read_to_string(out).ok().and_then(|old| {
        old.split_once(report::KEPT_MARKER)
            .map(|(_, tail)| tail.to_owned())
    }) {
        report.push('\n');
        report.push_str(report::KEPT_MARKER);
        report.push_str(&kept);
    }
    write_file(out, &report)?;
    eprintln!("mesh-bench: wrote {}", out.display());
    Ok(())
}

fn write_file(path: &Path, content: &str) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    }
    std::fs::write(path, content).with_context(|| format!("write {}", path.display()))
}
