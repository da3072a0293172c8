//! `mesh-echo`: the test server of the e2e tests and the local mesh.
//!
//! ```text
//! mesh-echo --port 8080 [--port 9090] [--name v1] [--listen 0.0.0.0]
//!           [--tls-cert cert.pem --tls-key key.pem [--client-ca ca.pem]]
//! ```
//!
//! With `--tls-cert`/`--tls-key` every port serves TLS (1.2 or 1.3, ALPN `http/1.1`),
//! requiring a client certificate from `--client-ca` when given, and each HTTP reply
//! carries a `"tls"` field: the SNI, ALPN and version the connection used and the DNS names
//! of the client certificate (`e2e::tls::describe`).
//!
//! Prints `listening on <addr>` once per bound port (port 0 picks a free one). A connection
//! whose first bytes are an HTTP/1.x request line is served as HTTP with keep-alive: every
//! request is answered `200` with a JSON body naming the server, the peer as seen by the
//! server, the method, path and headers (see `e2e::echo::reply_body`), after the delay a
//! `?delay_ms=N` query asks for (at most 10 s); `?status=`, `?only=` and `?fail_first=&key=`
//! change the status (see `e2e::echo::Behaviour`), and `GET /_requests` reports how many
//! requests the server has seen, by `Host`. An upgrade request (`Connection: upgrade`) is
//! answered `101`: `Upgrade: websocket` then echoes each message (text as `<name>: <text>`),
//! any other protocol echoes raw bytes. Any other connection
//! gets its bytes echoed back until the client shuts down writing; then the server finishes
//! echoing and shuts down its side.

use std::io::Cursor;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Parser;
use e2e::echo::{
    bad_request, behaviour, reply_body, response_bytes_with_status, sniff, switching_protocols,
    upgrade_requested, BodyFraming, RequestHead, Seen, Sniff,
};
use futures::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// Longest request-head line accepted.
const MAX_LINE: u64 = 16 * 1024;
/// Most header lines accepted per request.
const MAX_HEADERS: usize = 128;
/// Pause after a failed accept (e.g. out of file descriptors) so the loop cannot spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Parser, Debug)]
#[command(about = "Echo server for mesh tests: JSON for HTTP/1.x, raw echo otherwise")]
struct Args {
    /// Port to listen on; repeat for several; 0 picks a free port.
    #[arg(long = "port", required = true)]
    ports: Vec<u16>,
    /// Name reported in the "server" field of HTTP replies.
    #[arg(long, default_value = "mesh-echo")]
    name: String,
    /// Address to bind.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    listen: IpAddr,
    /// Serve TLS with this certificate (PEM chain); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The key of --tls-cert (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require a client certificate issued by this CA (PEM); needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    client_ca: Option<PathBuf>,
}

/// What every connection of a listener shares.
struct Shared {
    name: Arc<str>,
    seen: Arc<Mutex<Seen>>,
    tls: Option<TlsAcceptor>,
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            let leaf = e2e::tls::Leaf {
                cert: cert.clone(),
                key: key.clone(),
            };
            let config = e2e::tls::server_config(&leaf, args.client_ca.as_deref(), &[b"http/1.1"])?;
            Some(TlsAcceptor::from(config))
        }
        _ => None,
    };
    let shared = Arc::new(Shared {
        name: Arc::from(args.name),
        seen: Arc::new(Mutex::new(Seen::default())),
        tls,
    });
    let mut servers = JoinSet::new();
    for port in args.ports {
        let addr = SocketAddr::new(args.listen, port);
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("bind {addr}"))?;
        let local = listener
            .local_addr()
            .with_context(|| format!("local address of {addr}"))?;
        // Tests wait for this line before connecting.
        println!("listening on {local}");
        servers.spawn(accept_loop(listener, local, shared.clone()));
    }
    while let Some(joined) = servers.join_next().await {
        joined.context("accept loop panicked")?;
    }
    Ok(())
}

async fn accept_loop(listener: TcpListener, local: SocketAddr, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let shared = shared.clone();
                tokio::spawn(async move {
                    if let Err(e) = accept(stream, peer, &shared).await {
                        eprintln!("mesh-echo {local}: connection from {peer}: {e:#}");
                    }
                });
            }
            Err(e) => {
                eprintln!("mesh-echo {local}: accept: {e}");
                tokio::time::sleep(ACCEPT_BACKOFF).await;
            }
        }
    }
}

/// One accepted connection: the TLS handshake first when serving TLS.
async fn accept(stream: TcpStream, peer: SocketAddr, shared: &Shared) -> Result<()> {
    stream.set_nodelay(true).context("set TCP_NODELAY")?;
    let (name, seen) = (&*shared.name, &*shared.seen);
    match &shared.tls {
        None => serve(stream, peer, name, seen, None).await,
        Some(acceptor) => {
            let tls = acceptor.accept(stream).await.context("tls handshake")?;
            let info = e2e::tls::describe(tls.get_ref().1);
            serve(tls, peer, name, seen, Some(info)).await
        }
    }
}

async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    peer: SocketAddr,
    name: &str,
    seen: &Mutex<Seen>,
    tls: Option<Value>,
) -> Result<()> {
    let (mut read, write) = tokio::io::split(stream);
    let mut first = Vec::with_capacity(1024);
    let kind = loop {
        match sniff(&first) {
            Sniff::NeedMore => {}
            decided => break decided,
        }
        if read.read_buf(&mut first).await.context("read")? == 0 {
            // The client closed before its bytes could be a request: echo what it sent.
            break Sniff::Raw;
        }
    };
    // What was read while sniffing is replayed before the rest of the stream.
    let reader = BufReader::new(Cursor::new(first).chain(read));
    match kind {
        Sniff::Http => serve_http(reader, write, peer, name, seen, tls.as_ref()).await,
        _ => echo(reader, write).await,
    }
}

/// Echoes until the client's end of stream, then half-closes our side.
async fn echo<R: AsyncBufRead + Unpin, W: AsyncWrite + Unpin>(
    mut reader: R,
    mut write: W,
) -> Result<()> {
    tokio::io::copy_buf(&mut reader, &mut write)
        .await
        .context("echo")?;
    write.shutdown().await.context("shut down writing")?;
    Ok(())
}

async fn serve_http<R: AsyncBufRead + Unpin, W: AsyncWrite + Unpin>(
    mut reader: R,
    mut write: W,
    peer: SocketAddr,
    name: &str,
    seen: &Mutex<Seen>,
    tls: Option<&Value>,
) -> Result<()> {
    loop {
        let Some(lines) = read_head(&mut reader).await? else {
            // The client closed between requests: the normal end of a keep-alive connection.
            return Ok(());
        };
        let parsed = RequestHead::parse(&lines).and_then(|head| {
            let framing = head.body_framing()?;
            Ok((head, framing))
        });
        let (head, framing) = match parsed {
            Ok(ok) => ok,
            Err(e) => {
                write.write_all(&bad_request(&format!("{e:#}"))).await?;
                write.shutdown().await?;
                return Ok(());
            }
        };
        if let Some(protocol) = upgrade_requested(&head) {
            return serve_upgraded(reader, write, &head, &protocol, name).await;
        }
        if head.expects_continue() && framing != BodyFraming::None {
            write.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
        }
        let body_bytes = match framing {
            BodyFraming::None => 0,
            BodyFraming::Length(n) => discard_exactly(&mut reader, n).await?,
            BodyFraming::Chunked => discard_chunked(&mut reader).await?,
        };
        let (todo, report) = {
            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
            seen.record(&head);
            let report = (head.path == "/_requests").then(|| seen.report(name));
            (behaviour(name, &head.path, &mut seen), report)
        };
        if let Some(delay) = todo.delay {
            tokio::time::sleep(delay).await;
        }
        let keep_alive = head.keep_alive();
        let mut body = report.unwrap_or_else(|| reply_body(name, peer, &head, body_bytes));
        if let (Some(info), Value::Object(fields)) = (tls, &mut body) {
            fields.insert("tls".to_string(), info.clone());
        }
        write
            .write_all(&response_bytes_with_status(
                &head,
                todo.status,
                &body,
                keep_alive,
            ))
            .await
            .context("write response")?;
        if !keep_alive {
            write.shutdown().await.context("shut down writing")?;
            return Ok(());
        }
    }
}

/// Answers an upgrade with `101`, then speaks WebSocket (echoing messages, text prefixed with
/// the server's name) or, for any other protocol, echoes raw bytes.
async fn serve_upgraded<R: AsyncBufRead + Unpin, W: AsyncWrite + Unpin>(
    reader: R,
    mut write: W,
    head: &RequestHead,
    protocol: &str,
    name: &str,
) -> Result<()> {
    if protocol != "websocket" {
        write
            .write_all(&switching_protocols(protocol, None, name))
            .await
            .context("write 101")?;
        return echo(reader, write).await;
    }
    let key = head
        .header("sec-websocket-key")
        .context("websocket upgrade without sec-websocket-key")?;
    let accept = derive_accept_key(key.as_bytes());
    write
        .write_all(&switching_protocols(protocol, Some(&accept), name))
        .await
        .context("write 101")?;
    let mut ws =
        WebSocketStream::from_raw_socket(tokio::io::join(reader, write), Role::Server, None).await;
    while let Some(msg) = ws.next().await {
        let reply = match msg.context("websocket read")? {
            Message::Text(t) => Message::text(format!("{name}: {}", t.as_str())),
            Message::Binary(b) => Message::Binary(b),
            Message::Close(_) => break,
            // Pings are answered by tungstenite itself.
            _ => continue,
        };
        ws.send(reply).await.context("websocket write")?;
    }
    Ok(())
}

/// Reads a request head up to its blank line; `None` on a clean end of stream before it.
async fn read_head<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Option<Vec<String>>> {
    let mut lines = Vec::new();
    loop {
        let Some(line) = read_line(reader).await? else {
            if lines.is_empty() {
                return Ok(None);
            }
            bail!("connection closed inside a request head");
        };
        if line.is_empty() {
            // Blank lines before a request line are tolerated (RFC 9112 §2.2).
            if lines.is_empty() {
                continue;
            }
            return Ok(Some(lines));
        }
        if lines.len() > MAX_HEADERS {
            bail!("more than {MAX_HEADERS} header lines");
        }
        lines.push(line);
    }
}

/// One line without its CRLF/LF; `None` at end of stream.
async fn read_line<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<Option<String>> {
    let mut line = Vec::new();
    let n = (&mut *reader)
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .await
        .context("read a line")?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        bail!("line too long or cut by end of stream");
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

async fn discard_exactly<R: AsyncBufRead + Unpin>(reader: &mut R, n: u64) -> Result<u64> {
    let got = tokio::io::copy_buf(&mut (&mut *reader).take(n), &mut tokio::io::sink())
        .await
        .context("read request body")?;
    if got != n {
        bail!("request body ended after {got} of {n} bytes");
    }
    Ok(n)
}

async fn discard_chunked<R: AsyncBufRead + Unpin>(reader: &mut R) -> Result<u64> {
    let mut total = 0u64;
    loop {
        let line = read_line(reader)
            .await?
            .context("connection closed inside a chunked body")?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size line {line:?}"))?;
        if size == 0 {
            while read_line(reader).await?.is_some_and(|l| !l.is_empty()) {}
            return Ok(total);
        }
        total += discard_exactly(reader, size).await?;
        let end = read_line(reader)
            .await?
            .context("connection closed after a chunk")?;
        if !end.is_empty() {
            bail!("chunk not followed by CRLF");
        }
    }
}
