#![forbid(unsafe_code)]

use std::io::Write;

use clap::Parser;
use control::config::{Args, TokenArgs};
use control::token::{TokenAuthority, TokenClaims};

#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    // `control token ...` mints a token; anything else runs the CA.
    if std::env::args().nth(1).as_deref() == Some("token") {
        return mint(TokenArgs::parse_from(std::env::args().skip(1)));
    }
    let args = Args::from_env();
    if let Err(e) = args.check() {
        e.exit();
    }
    let (log_format, workers) = (args.process.log_format, args.process.worker_threads);
    mesh_shell::process::main("control", log_format, workers, |log| {
        control::app::run(args, log)
    })
}

fn mint(args: TokenArgs) -> anyhow::Result<()> {
    let tokens = TokenAuthority::load_or_create(&args.ca_dir)?;
    let token = tokens.mint(&TokenClaims {
        namespace: args.namespace,
        service_account: args.service_account,
        node: args.node,
        pod: args.pod.map(|name| control::authz::BoundPod {
            name,
            uid: args.pod_uid,
        }),
        audience: args.audience,
        ttl: args.ttl,
    })?;
    match args.out {
        Some(path) => {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)?;
            f.write_all(token.as_bytes())?;
        }
        None => println!("{token}"),
    }
    Ok(())
}
