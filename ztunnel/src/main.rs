#![forbid(unsafe_code)]

use clap::Parser;

/// jemalloc returns freed memory to the system (background purging), so the agent's RSS falls
/// back after a burst of connections instead of staying at its peak as with glibc's malloc.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;
use ztunnel::config::{Args, Config};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Err(e) = args.check() {
        e.exit();
    }
    let log = ztunnel::logging::init(args.log_format);
    let cfg = Config::from(&args);
    raise_fd_limit();
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

/// Every proxied connection holds file descriptors on both sides; the default soft limit
/// (often 1024) would shed connections long before memory runs out. Raise it to the hard limit.
fn raise_fd_limit() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => {
            if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                tracing::warn!(error = %e, soft, hard, "could not raise the open-file limit");
            }
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the open-file limit"),
    }
}
