#![forbid(unsafe_code)]

use clap::Parser;
use ztunnel::config::{Args, Config};

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let log = ztunnel::logging::init(args.log_format);
    let cfg = Config::from(&args);
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
