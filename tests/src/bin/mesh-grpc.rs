//! `mesh-grpc`: the gRPC test server and client of the e2e tests (`e2e::grpc`).
//!
//! ```text
//! mesh-grpc server --port 9000 [--name v1] [--listen 0.0.0.0]
//! mesh-grpc client --addr 10.96.0.30:9000 [--kind unary|server-stream|client-stream|bidi]
//!                  [--calls N] [--count M] [--status CODE] [--delay-ms D] [--metadata k=v]...
//!                  [--authority A] [--timeout-ms T] [--message TEXT]
//! ```
//!
//! The server prints `listening on <addr>` and serves `echo.v1.Echo` over h2c. The client
//! opens ONE channel (one HTTP/2 connection) and makes `--calls` calls of `--kind` on it, one
//! JSON line per call on stdout (see `e2e::grpc::run_calls`); it exits non-zero only when it
//! cannot connect or a call hangs past `--call-limit-ms`, never because a call got a non-OK
//! status (the lines say which).

use std::io::Write;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use e2e::grpc::{run_calls, serve_echo, CallSpec, Echo, Kind};
use tokio::net::TcpListener;

#[derive(Parser, Debug)]
#[command(about = "gRPC echo server and client for mesh tests")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Serve echo.v1.Echo over h2c.
    Server {
        #[arg(long)]
        port: u16,
        /// Name every reply carries.
        #[arg(long, default_value = "mesh-grpc")]
        name: String,
        #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
        listen: IpAddr,
    },
    /// Make calls over one channel, one JSON line per call.
    Client {
        #[arg(long)]
        addr: SocketAddr,
        /// unary, server-stream, client-stream or bidi.
        #[arg(long, default_value = "unary", value_parser = parse_kind)]
        kind: Kind,
        #[arg(long, default_value_t = 1)]
        calls: usize,
        /// Replies asked for (server-stream) or messages sent (client-stream, bidi).
        #[arg(long, default_value_t = 3)]
        count: u32,
        /// gRPC status code the server is asked to answer with.
        #[arg(long, default_value_t = 0)]
        status: i32,
        /// Unary: the server waits this long before answering (at most 10 s).
        #[arg(long, default_value_t = 0)]
        delay_ms: u32,
        #[arg(long, default_value = "hello")]
        message: String,
        /// Request metadata `name=value`; repeatable.
        #[arg(long = "metadata", value_parser = parse_pair)]
        metadata: Vec<(String, String)>,
        /// `:authority` (default: the address).
        #[arg(long)]
        authority: Option<String>,
        /// `grpc-timeout` of each call.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Longest one call (or the connect) may take before the client gives up.
        #[arg(long, default_value_t = 20_000)]
        call_limit_ms: u64,
    },
}

fn parse_kind(s: &str) -> Result<Kind, String> {
    Kind::parse(s).ok_or_else(|| format!("unknown kind {s:?}"))
}

fn parse_pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("expected name=value, got {s:?}"))
}

#[tokio::main]
async fn main() -> Result<()> {
    match Args::parse().cmd {
        Cmd::Server { port, name, listen } => {
            let addr = SocketAddr::new(listen, port);
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind {addr}"))?;
            serve_echo(listener, Echo::new(&name)).await
        }
        Cmd::Client {
            addr,
            kind,
            calls,
            count,
            status,
            delay_ms,
            message,
            metadata,
            authority,
            timeout_ms,
            call_limit_ms,
        } => {
            let spec = CallSpec {
                kind,
                message,
                count,
                status,
                delay_ms,
                metadata,
                timeout: timeout_ms.map(Duration::from_millis),
            };
            let stdout = std::io::stdout();
            run_calls(
                addr,
                authority.as_deref(),
                &spec,
                calls,
                Duration::from_millis(call_limit_ms),
                |line| {
                    let mut out = stdout.lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                },
            )
            .await
        }
    }
}
