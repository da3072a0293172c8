//! HTTP/2 abuse against the waypoint (RELIABILITY 29-32), end to end: a hostile client pod
//! speaks raw HTTP/2 frames (h2c, prior knowledge) to a Service that uses a waypoint; its
//! ztunnel carries the bytes over HBONE and the waypoint's HTTP/2 server sees exactly what the
//! attacker wrote. Each attack must end with the connection closed (or throttled by
//! backpressure) while the waypoint's memory and CPU stay bounded and another client pod's
//! requests keep succeeding.
//!
//! The frames are written by hand (not with the `h2` crate, which would refuse to misbehave).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use e2e::waypoint::{log_tail, waypoint_mesh, waypoint_service, CLIENT};
use e2e::{scenarios, wait_until, ChildGuard, Mesh, Pod, Suite};

const ATTACKER: &str = "default/attacker";
const ECHO_VIP: &str = "10.96.0.30";
/// Growth of the waypoint's RSS an attack may cause.
const RSS_BUDGET_KIB: u64 = 16 * 1024;
/// 1,000 requests in flight at once (then 1,000 upstream connections) are legitimate load:
/// at most 64 KiB each.
const STREAMS_RSS_BUDGET_KIB: u64 = 64 * 1000;
/// CPU seconds the waypoint may spend on one attack.
const CPU_BUDGET: Duration = Duration::from_secs(8);

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
/// RST_STREAM error code CANCEL.
const CANCEL: u32 = 0x8;

fn mesh(test: &str) -> Result<Mesh> {
    waypoint_mesh(test)
        .pod(
            Pod::new("default", "attacker")
                .on("n1")
                .service_account("attacker"),
        )
        .pod(Pod::echo_server("server", "n2"))
        .service(waypoint_service("echo", ECHO_VIP, ("app", "echo")))
        .yaml("slow.yaml", SLOW)
        .build()
}

/// `/slow` waits 2 s in the waypoint (a fault delay) before going upstream: streams that
/// stay open without costing an upstream connection each.
const SLOW: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: default}
spec:
  hosts: [echo]
  http:
  - match: [{uri: {prefix: /slow}}]
    fault: {delay: {fixedDelay: 2s, percentage: {value: 100}}}
    route: [{destination: {host: echo}}]
  - route: [{destination: {host: echo}}]
"#;
/// The waypoint's limit on concurrent streams per downstream HTTP/2 connection
/// (`mesh_l7::http::MAX_CONCURRENT_STREAMS`).
const WAYPOINT_MAX_STREAMS: usize = 1_000;
/// RST_STREAM error code REFUSED_STREAM.
const REFUSED_STREAM: u32 = 0x7;
/// How long the too-many-streams attack keeps its connection open for the answers (they come
/// after the 2 s fault delay).
const ANSWERS_WAIT: Duration = Duration::from_secs(15);

/// One frame: 9-byte header and payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = Vec::with_capacity(9 + payload.len());
    f.extend_from_slice(&len.to_be_bytes()[1..]);
    f.push(kind);
    f.push(flags);
    f.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// HPACK for `GET http://echo/`: static-table indices and one literal without indexing.
fn request_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x84, 0x01, 4];
    b.extend_from_slice(b"echo");
    b
}

/// HPACK for `GET http://echo/slow`.
fn slow_request_block() -> Vec<u8> {
    let mut b = vec![0x82, 0x86, 0x04, 5];
    b.extend_from_slice(b"/slow");
    b.extend_from_slice(&[0x01, 4]);
    b.extend_from_slice(b"echo");
    b
}

/// A literal header (new name, without indexing) `x-junk: <n bytes>` (lengths < 2^21).
fn junk_header(n: usize) -> Vec<u8> {
    let mut b = vec![0x00, 6];
    b.extend_from_slice(b"x-junk");
    b.extend(hpack_len(n));
    b.extend(std::iter::repeat_n(b'a', n));
    b
}

/// An HPACK string length with a 7-bit prefix (Huffman bit clear).
fn hpack_len(mut n: usize) -> Vec<u8> {
    if n < 127 {
        return vec![n as u8];
    }
    let mut out = vec![127];
    n -= 127;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
    out
}

/// What the waypoint sent back on the attack connection.
#[derive(Debug, Default)]
struct Seen {
    goaway: Option<u32>,
    closed: bool,
    bytes: u64,
    /// Response HEADERS frames.
    responses: usize,
    /// RST_STREAM frames with REFUSED_STREAM.
    refused: usize,
}

/// After `pause` (a peer that does not read), reads frames until GOAWAY, end of stream or
/// `limit`; records what came, and counts the streams answered or refused in `answered` as
/// they come.
fn read_frames(
    mut tcp: TcpStream,
    pause: Duration,
    limit: Duration,
    answered: &AtomicUsize,
) -> Seen {
    // Not a wait for anything: this peer deliberately leaves the waypoint's replies unread
    // for `pause`, which is the behaviour under test (backpressure on a flooding peer).
    std::thread::sleep(pause);
    let deadline = Instant::now() + limit;
    let mut seen = Seen::default();
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    while Instant::now() < deadline {
        match tcp.read(&mut chunk) {
            Ok(0) => {
                seen.closed = true;
                break;
            }
            Ok(n) => {
                seen.bytes += n as u64;
                buf.extend_from_slice(&chunk[..n]);
                while buf.len() >= 9 {
                    let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                    if buf.len() < 9 + len {
                        break;
                    }
                    if buf[3] == GOAWAY && len >= 8 {
                        let code = u32::from_be_bytes([buf[13], buf[14], buf[15], buf[16]]);
                        seen.goaway.get_or_insert(code);
                    }
                    if buf[3] == HEADERS {
                        seen.responses += 1;
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    if buf[3] == RST_STREAM
                        && len == 4
                        && u32::from_be_bytes([buf[9], buf[10], buf[11], buf[12]]) == REFUSED_STREAM
                    {
                        seen.refused += 1;
                        answered.fetch_add(1, Ordering::SeqCst);
                    }
                    buf.drain(..9 + len);
                }
                if seen.goaway.is_some() {
                    break;
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => {
                seen.closed = true;
                break;
            }
        }
    }
    seen
}

/// The waypoint process's resident memory (KiB) and CPU time.
fn usage(wp: &ChildGuard) -> Result<(u64, Duration)> {
    let pid = wp.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("VmRSS")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(") ").context("stat")?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>()? + fields[12].parse::<u64>()?;
    // USER_HZ is 100 on Linux.
    Ok((rss, Duration::from_millis(ticks * 10)))
}

/// Runs `attack` (writing on the attack connection, whose replies a reader thread collects
/// after `pause`, counting the streams answered or refused in the counter `attack` is given)
/// from the attacker pod while the client pod keeps making requests; checks that the
/// waypoint stayed within budget and the client was never refused. Returns what the
/// attacker saw.
fn under_attack(
    mesh: &Mesh,
    wp: &ChildGuard,
    name: &str,
    pause: Duration,
    rss_budget_kib: u64,
    attack: impl FnOnce(&mut TcpStream, &AtomicUsize) -> Result<()> + Send,
) -> Result<Seen> {
    let (rss_before, cpu_before) = usage(wp)?;
    let stop = AtomicBool::new(false);
    let addr = format!("{ECHO_VIP}:80");
    let (seen, client) = std::thread::scope(|s| {
        let client = s.spawn(|| -> Result<u32> {
            let mut ok = 0;
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let r = mesh.http_get(CLIENT, addr.parse()?, "/during-attack")?;
                anyhow::ensure!(r.status == 200, "client got {} during {name}", r.status);
                ok += 1;
            }
            Ok(ok)
        });
        let seen = mesh.in_pod(ATTACKER, || -> Result<Seen> {
            let mut tcp = TcpStream::connect(&addr)?;
            tcp.set_read_timeout(Some(Duration::from_millis(200)))?;
            tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
            let reader = tcp.try_clone()?;
            let answered = Arc::new(AtomicUsize::new(0));
            let counted = answered.clone();
            let collector = std::thread::spawn(move || {
                read_frames(reader, pause, Duration::from_secs(30), &counted)
            });
            tcp.write_all(PREFACE)?;
            tcp.write_all(&frame(SETTINGS, 0, 0, &[]))?;
            // A write error means the waypoint closed the connection: the attack is over.
            let _ = attack(&mut tcp, &answered);
            let _ = tcp.shutdown(std::net::Shutdown::Write);
            collector
                .join()
                .map_err(|_| anyhow::anyhow!("frame reader panicked"))
        });
        stop.store(true, Ordering::Relaxed);
        (seen, client.join())
    });
    let seen = seen??;
    let served = client.map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    // One more request after the attack: the waypoint is still serving.
    let after = mesh.http_get(CLIENT, addr.parse()?, "/after-attack")?;
    assert_eq!(after.status, 200, "{name}: request after the attack");
    let (rss_after, cpu_after) = usage(wp)?;
    let grew = rss_after.saturating_sub(rss_before);
    let cpu = cpu_after.saturating_sub(cpu_before);
    eprintln!(
        "{name}: attacker saw {seen:?}; waypoint RSS +{grew} KiB, CPU {cpu:?}; \
         {served} client requests served meanwhile"
    );
    assert!(grew <= rss_budget_kib, "{name}: RSS grew {grew} KiB");
    assert!(cpu <= CPU_BUDGET, "{name}: CPU {cpu:?}");
    assert!(
        served >= 1,
        "{name}: no client request completed during the attack"
    );
    Ok(seen)
}

/// What the scenarios share: the mesh and its waypoint, whose memory and CPU each attack
/// measures.
struct Abuse {
    wp: ChildGuard,
    _server: ChildGuard,
    /// Last: dropped once the processes in it are gone.
    mesh: Mesh,
}

impl Abuse {
    fn build() -> Result<Self> {
        let mesh = mesh("waypoint_abuse")?;
        let server = mesh.spawn_echo("default/server", 8080, "server")?;
        let wp = mesh.spawn_default_waypoint()?;
        Ok(Abuse {
            wp,
            _server: server,
            mesh,
        })
    }
}

impl Suite for Abuse {
    fn explain(&self, err: anyhow::Error) -> anyhow::Error {
        log_tail(&self.wp, err)
    }
}

/// With `ABUSE_LOG` set, the waypoint's whole log once the attacks are over.
impl Drop for Abuse {
    fn drop(&mut self) {
        if std::env::var_os("ABUSE_LOG").is_some() {
            eprintln!("{}", self.wp.stderr());
        }
    }
}

/// One mesh for all attacks, one after the other (each measures the waypoint's growth over
/// its own run, and checks the client is served throughout).
fn main() -> ExitCode {
    e2e::scenario::main(
        Abuse::build,
        &scenarios![
            rapid_reset_is_cut_off,
            a_continuation_flood_is_cut_off,
            a_header_list_over_64_kib_is_refused,
            ping_and_settings_floods_from_a_peer_that_does_not_read_are_bounded,
            streams_over_the_limit_are_refused_and_the_connection_stays,
            an_empty_data_flood_is_bounded,
        ],
        &[],
    )
}

/// RELIABILITY 29: Rapid reset: open a stream and cancel it at once, 20,000 times.
fn rapid_reset_is_cut_off(a: &mut Abuse) -> Result<()> {
    let (mesh, wp) = (&a.mesh, &a.wp);
    let seen = under_attack(
        mesh,
        wp,
        "rapid reset",
        Duration::ZERO,
        RSS_BUDGET_KIB,
        |tcp, _| {
            let block = request_block();
            let mut batch = Vec::new();
            for i in 0..20_000u32 {
                let id = 2 * i + 1;
                batch.extend(frame(HEADERS, END_HEADERS | END_STREAM, id, &block));
                batch.extend(frame(RST_STREAM, 0, id, &CANCEL.to_be_bytes()));
                if batch.len() > 16 * 1024 {
                    tcp.write_all(&batch)?;
                    batch.clear();
                }
            }
            tcp.write_all(&batch)?;
            Ok(())
        },
    )?;
    assert!(
        seen.goaway.is_some() || seen.closed,
        "rapid reset: the connection was neither sent GOAWAY nor closed: {seen:?}"
    );
    Ok(())
}

/// RELIABILITY 30: CONTINUATION flood: a header block that never ends, 1 KiB at a time, 4 MiB in all.
fn a_continuation_flood_is_cut_off(a: &mut Abuse) -> Result<()> {
    let (mesh, wp) = (&a.mesh, &a.wp);
    let seen = under_attack(
        mesh,
        wp,
        "continuation flood",
        Duration::ZERO,
        RSS_BUDGET_KIB,
        |tcp, _| {
            tcp.write_all(&frame(HEADERS, 0, 1, &request_block()))?;
            let piece = junk_header(1000);
            for _ in 0..4096 {
                tcp.write_all(&frame(CONTINUATION, 0, 1, &piece))?;
            }
            Ok(())
        },
    )?;
    assert!(
        seen.goaway.is_some() || seen.closed,
        "continuation flood: connection still open: {seen:?}"
    );
    Ok(())
}

/// RELIABILITY 30: A header list over 64 KiB in one request: refused, the connection may stay.
fn a_header_list_over_64_kib_is_refused(a: &mut Abuse) -> Result<()> {
    let (mesh, wp) = (&a.mesh, &a.wp);
    under_attack(
        mesh,
        wp,
        "oversized headers",
        Duration::ZERO,
        RSS_BUDGET_KIB,
        |tcp, _| {
            let mut block = request_block();
            block.extend(junk_header(100 * 1024));
            let (first, rest) = block.split_at(16 * 1024);
            tcp.write_all(&frame(HEADERS, END_STREAM, 1, first))?;
            let chunks: Vec<&[u8]> = rest.chunks(16 * 1024).collect();
            for (i, c) in chunks.iter().enumerate() {
                let flags = if i + 1 == chunks.len() {
                    END_HEADERS
                } else {
                    0
                };
                tcp.write_all(&frame(CONTINUATION, flags, 1, c))?;
            }
            Ok(())
        },
    )?;
    Ok(())
}

/// RELIABILITY 31: PING and SETTINGS floods from a peer that never reads its replies (the reader
/// thread only starts reading after a pause): bounded by backpressure, then closed.
fn ping_and_settings_floods_from_a_peer_that_does_not_read_are_bounded(
    a: &mut Abuse,
) -> Result<()> {
    let (mesh, wp) = (&a.mesh, &a.wp);
    for (name, kind) in [("ping flood", PING), ("settings flood", SETTINGS)] {
        under_attack(
            mesh,
            wp,
            name,
            Duration::from_secs(6),
            RSS_BUDGET_KIB,
            |tcp, _| {
                let payload: &[u8] = if kind == PING { &[0u8; 8] } else { &[] };
                let one = frame(kind, 0, 0, payload);
                let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 4096).collect();
                let deadline = Instant::now() + Duration::from_secs(5);
                // At most 200,000 frames, 5 s.
                for _ in 0..50 {
                    if Instant::now() > deadline {
                        break;
                    }
                    tcp.write_all(&batch)?;
                }
                Ok(())
            },
        )?;
    }
    Ok(())
}

/// RELIABILITY 32: More streams than allowed (the waypoint allows 1000 at a time): 1,100 requests
/// that each wait 2 s in the waypoint, sent at once by a client that ignores the limit.
/// The extra ones are refused (RST_STREAM REFUSED_STREAM) and the connection stays: the
/// others are answered.
fn streams_over_the_limit_are_refused_and_the_connection_stays(a: &mut Abuse) -> Result<()> {
    let (mesh, wp) = (&a.mesh, &a.wp);
    let seen = under_attack(
        mesh,
        wp,
        "too many streams",
        Duration::ZERO,
        STREAMS_RSS_BUDGET_KIB,
        |tcp, answered| {
            let block = slow_request_block();
            let mut batch = Vec::new();
            for i in 0..1_100u32 {
                batch.extend(frame(HEADERS, END_HEADERS | END_STREAM, 2 * i + 1, &block));
            }
            tcp.write_all(&batch)?;
            // Keep the connection open until every stream is answered or refused (the
            // assertions below report it if some never are).
            wait_until("every stream answered or refused", ANSWERS_WAIT, || {
                Ok(answered.load(Ordering::SeqCst) >= 1_100)
            })
        },
    )?;
    assert!(
        seen.refused >= 1_100 - WAYPOINT_MAX_STREAMS,
        "streams over the limit refused: {seen:?}"
    );
    assert_eq!(seen.goaway, None, "the connection stays: {seen:?}");
    assert_eq!(
        seen.responses + seen.refused,
        1_100,
        "every stream answered or refused: {seen:?}"
    );
    Ok(())
}

/// RELIABILITY 31: Empty DATA frames on an open stream.
fn an_empty_data_flood_is_bounded(a: &mut Abuse) -> Result<()> {
    let (mesh, wp) = (&a.mesh, &a.wp);
    under_attack(
        mesh,
        wp,
        "empty data flood",
        Duration::ZERO,
        RSS_BUDGET_KIB,
        |tcp, _| {
            tcp.write_all(&frame(HEADERS, END_HEADERS, 1, &request_block()))?;
            let one = frame(DATA, 0, 1, &[]);
            let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 8192).collect();
            for _ in 0..25 {
                tcp.write_all(&batch)?;
            }
            Ok(())
        },
    )?;
    Ok(())
}
