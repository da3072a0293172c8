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
    let cfg = Config::from(&args);
    mesh_shell::process::main(
        "waypoint",
        args.process.log_format,
        args.threading.runtime_workers(args.process.worker_threads),
        |log| waypoint::app::run(cfg, log),
    )
}
