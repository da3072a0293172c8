#![forbid(unsafe_code)]

/// jemalloc, as the node agent: freed memory goes back to the system (background purging, 1 s
/// dirty decay from `.cargo/config.toml`) instead of staying at a burst's peak as with glibc's
/// malloc. (Request throughput with one client was the same with either: 2,291 vs 2,264-2,335
/// req/s through the local mesh's waypoint.)
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use waypoint::config::{Args, Config};

fn main() -> anyhow::Result<()> {
    let args = Args::from_env();
    if let Err(e) = args.check() {
        e.exit();
    }
    let log = mesh_shell::logging::init(args.process.log_format);
    let cfg = Config::from(&args);
    mesh_shell::process::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("waypoint-worker")
        .build()?;
    let result = rt.block_on(waypoint::app::run(cfg, log));
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "waypoint failed");
    }
    result
}
