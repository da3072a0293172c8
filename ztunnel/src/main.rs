#![forbid(unsafe_code)]

/// jemalloc returns freed memory to the system (background purging), so the agent's RSS falls
/// back after a burst of connections instead of staying at its peak as with glibc's malloc.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use ztunnel::config::{Args, Config};

fn main() -> anyhow::Result<()> {
    // A child this binary started to load an eBPF program does that and nothing else.
    if let Some(code) = ebpf::serve_load_job() {
        std::process::exit(code);
    }
    // Its own binary, even if the file was replaced since (an upgrade on disk).
    ebpf::load_in_child_processes("/proc/self/exe".into());
    let args = Args::from_env();
    if let Err(e) = args.check() {
        e.exit();
    }
    let cfg = Config::from(&args);
    let log_format = args.process.log_format;
    let workers = args.threading.runtime_workers(args.process.worker_threads);
    if args.release_all {
        return mesh_shell::process::main("ztunnel", log_format, workers, |_| async move {
            ztunnel::uninstall::release_all(&cfg).await.map(|_| ())
        });
    }
    mesh_shell::process::main("ztunnel", log_format, workers, |log| {
        ztunnel::app::run(cfg, log)
    })
}
