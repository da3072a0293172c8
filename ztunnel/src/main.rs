#![forbid(unsafe_code)]

/// jemalloc returns freed memory to the system (background purging), so the agent's RSS falls
/// back after a burst of connections instead of staying at its peak as with glibc's malloc.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use ztunnel::config::{Args, Config};

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
        .thread_name("ztunnel-worker")
        .build()?;
    let result = rt.block_on(ztunnel::app::run(cfg, log));
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "ztunnel failed");
    }
    result
}
