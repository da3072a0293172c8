#![forbid(unsafe_code)]

use clap::Parser;

/// jemalloc, as the node agent: freed memory goes back to the system (background purging, 1 s
/// dirty decay from `.cargo/config.toml`) instead of staying at a burst's peak as with glibc's
/// malloc. (Request throughput with one client was the same with either: 2,291 vs 2,264-2,335
/// req/s through the local mesh's waypoint.)
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use tracing_subscriber::EnvFilter;
use waypoint::config::{Args, Config, LogFormat};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Err(e) = args.check() {
        e.exit();
    }
    init_logging(args.log_format);
    let cfg = Config::from(&args);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("waypoint-worker")
        .build()?;
    let result = rt.block_on(waypoint::app::run(cfg));
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "waypoint failed");
    }
    result
}

/// tracing to stderr, filtered by `RUST_LOG` (default `info`).
fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Json => fmt.json().flatten_event(true).init(),
        LogFormat::Text => fmt.init(),
    }
}
