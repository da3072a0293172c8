//! `mesh-dns`: a resolver for the e2e tests, standing in for a pod's cluster DNS.
//!
//! ```text
//! mesh-dns --listen 10.0.0.2:53 --answer 192.0.2.10
//! ```
//!
//! Answers every `A` query, over UDP and TCP, with `--answer` (TTL 5); other types get an
//! empty answer. Prints `listening on <addr>` once both sockets are bound, and a line
//! `query <udp|tcp> <name> <type>` for each query to stdout, so a test can tell which
//! queries reached it (a mesh name the agent answers never does).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket};
use std::thread;

use anyhow::{Context, Result};
use clap::Parser;
use hickory_proto::op::{Message, OpCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    listen: SocketAddr,
    #[arg(long)]
    answer: Ipv4Addr,
}

fn answer(query: &[u8], proto: &str, ip: Ipv4Addr) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut reply = Message::response(q.metadata.id, OpCode::Query);
    reply.metadata.recursion_desired = q.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    for query in &q.queries {
        println!("query {proto} {} {}", query.name(), query.query_type());
        reply.add_query(query.clone());
        if query.query_type() == RecordType::A {
            reply.add_answer(Record::from_rdata(query.name().clone(), 5, RData::A(A(ip))));
        }
    }
    reply.to_vec().ok()
}

fn serve_tcp(listener: TcpListener, ip: Ipv4Addr) {
    for conn in listener.incoming().flatten() {
        thread::spawn(move || {
            let mut conn = conn;
            loop {
                let mut len = [0u8; 2];
                if conn.read_exact(&mut len).is_err() {
                    return;
                }
                let mut msg = vec![0u8; usize::from(u16::from_be_bytes(len))];
                if conn.read_exact(&mut msg).is_err() {
                    return;
                }
                let Some(reply) = answer(&msg, "tcp", ip) else {
                    return;
                };
                let Ok(n) = u16::try_from(reply.len()) else {
                    return;
                };
                let mut frame = n.to_be_bytes().to_vec();
                frame.extend_from_slice(&reply);
                if conn.write_all(&frame).is_err() {
                    return;
                }
            }
        });
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    let udp = UdpSocket::bind(args.listen).with_context(|| format!("bind udp {}", args.listen))?;
    let tcp =
        TcpListener::bind(args.listen).with_context(|| format!("bind tcp {}", args.listen))?;
    println!("listening on {}", args.listen);
    let ip = args.answer;
    thread::spawn(move || serve_tcp(tcp, ip));
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, from) = udp.recv_from(&mut buf).context("recv")?;
        if let Some(reply) = answer(&buf[..n], "udp", ip) {
            let _ = udp.send_to(&reply, from);
        }
    }
}
