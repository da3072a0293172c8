//! The load `mesh-bench` generates itself, where wrk cannot: HTTP/1.1 keep-alive requests at
//! a fixed rate (open loop), new connections per second, and many idle connections.
//!
//! Every client socket is created inside the client pod's network namespace (threads that
//! entered it, see [`crate::in_netns`]), so the pod's capture applies exactly as to its own
//! applications. Blocking IO on dedicated threads: the fixed-rate client must wake on time,
//! and one thread per connection keeps the timing free of a scheduler's batching.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A small keep-alive request.
pub const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: mesh-bench\r\n\r\n";
/// The same asking the server to close after answering.
pub const REQUEST_CLOSE: &[u8] =
    b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: mesh-bench\r\nConnection: close\r\n\r\n";
/// Bound on any single read or write of a benchmark connection.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on a connect.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Largest response head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Timer slack for the fixed-rate threads: wake within a microsecond of the schedule rather
/// than the default 50 µs.
const TIMER_SLACK_NS: u64 = 1_000;

/// What a response head says about the response.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResponseHead {
    pub status: u16,
    /// Bytes up to and including the blank line.
    pub head_len: usize,
    pub content_length: usize,
}

/// Parses an HTTP/1.x response head at the start of `buf`; `Ok(None)` while incomplete.
/// Bodies must be framed by `Content-Length` (what nginx sends for `return 200`).
pub fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            bail!("response head longer than {MAX_HEAD} bytes");
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut words = status_line.split_whitespace();
    match words.next() {
        Some(v) if v.starts_with("HTTP/1.") => {}
        _ => bail!("not an HTTP/1.x response: {status_line:?}"),
    }
    let status: u16 = words
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status code in {status_line:?}"))?;
    let mut content_length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let name = name.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .trim()
                    .parse::<usize>()
                    .with_context(|| format!("content-length {value:?}"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("chunked responses are not supported by the benchmark client");
        }
    }
    Ok(Some(ResponseHead {
        status,
        head_len: end + 4,
        content_length: content_length.unwrap_or(0),
    }))
}

/// One keep-alive HTTP/1.1 connection.
pub struct HttpConn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` holding data not yet consumed.
    filled: usize,
}

impl HttpConn {
    pub fn new(stream: TcpStream) -> Result<HttpConn> {
        stream.set_nodelay(true).context("set TCP_NODELAY")?;
        stream
            .set_read_timeout(Some(IO_TIMEOUT))
            .context("set read timeout")?;
        stream
            .set_write_timeout(Some(IO_TIMEOUT))
            .context("set write timeout")?;
        Ok(HttpConn {
            stream,
            buf: vec![0; 4096],
            filled: 0,
        })
    }

    /// Sends `request` and reads the whole response; returns its status.
    pub fn request(&mut self, request: &[u8]) -> Result<u16> {
        self.stream.write_all(request).context("send request")?;
        self.read_response()
    }

    fn read_response(&mut self) -> Result<u16> {
        loop {
            if let Some(head) = parse_response_head(&self.buf[..self.filled])? {
                let total = head.head_len + head.content_length;
                while self.filled < total {
                    self.fill()?;
                }
                self.buf.copy_within(total..self.filled, 0);
                self.filled -= total;
                return Ok(head.status);
            }
            self.fill()?;
        }
    }

    fn fill(&mut self) -> Result<()> {
        if self.filled == self.buf.len() {
            let len = self.buf.len() * 2;
            self.buf.resize(len, 0);
        }
        let n = self
            .stream
            .read(&mut self.buf[self.filled..])
            .context("read response")?;
        if n == 0 {
            bail!("connection closed before the response was complete");
        }
        self.filled += n;
        Ok(())
    }
}

/// When a request's latency starts. Normally when it was sent; but if it left late because
/// the previous response on its connection arrived after this request was due, from when it
/// was due, so that a slow response is charged to every request it delayed (no coordinated
/// omission). Late wake-ups of the client itself are not charged.
pub fn latency_start(due: Instant, sent: Instant, previous_done: Option<Instant>) -> Instant {
    match previous_done {
        Some(done) if done > due => due,
        _ => sent,
    }
}

/// A fixed-rate run's parameters.
#[derive(Clone, Copy, Debug)]
pub struct FixedRate {
    /// Requests per second over all connections.
    pub rate: f64,
    /// Measured time, after `warmup`.
    pub duration: Duration,
    /// Requests due before this are sent but not counted.
    pub warmup: Duration,
}

/// What a fixed-rate run saw in its measured window.
#[derive(Clone, Debug, Default)]
pub struct RateRun {
    pub latencies_ns: Vec<u64>,
    pub errors: u64,
    pub non_200: u64,
    /// Every completed request, warm-up included (for CPU per request).
    pub sent_total: u64,
    pub measured: Duration,
}

impl RateRun {
    /// Completed requests per second.
    pub fn achieved(&self) -> f64 {
        self.latencies_ns.len() as f64 / self.measured.as_secs_f64().max(1e-9)
    }
}

/// Sends requests at `cfg.rate` spread evenly over `conns` (each already connected from
/// inside the client pod), one thread per connection, staggered so that the sends
/// interleave. A connection that fails stops; its error is counted.
pub fn fixed_rate(conns: Vec<TcpStream>, cfg: FixedRate) -> Result<RateRun> {
    if conns.is_empty() || cfg.rate <= 0.0 {
        bail!("a fixed-rate run needs connections and a positive rate");
    }
    let n = conns.len();
    let interval = Duration::from_secs_f64(n as f64 / cfg.rate);
    let start = Instant::now() + Duration::from_millis(20);
    let measure_from = start + cfg.warmup;
    let end = measure_from + cfg.duration;
    let mut conns: Vec<HttpConn> = conns
        .into_iter()
        .map(HttpConn::new)
        .collect::<Result<_>>()?;
    let runs: Vec<RateRun> = std::thread::scope(|scope| {
        let handles: Vec<_> = conns
            .iter_mut()
            .enumerate()
            .map(|(k, conn)| {
                let offset = interval.mul_f64(k as f64 / n as f64);
                scope.spawn(move || {
                    let _ = nix::sys::prctl::set_timerslack(TIMER_SLACK_NS);
                    one_connection(conn, start + offset, interval, measure_from, end)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut total = RateRun {
        measured: cfg.duration,
        ..RateRun::default()
    };
    for run in runs {
        total.latencies_ns.extend(run.latencies_ns);
        total.errors += run.errors;
        total.non_200 += run.non_200;
        total.sent_total += run.sent_total;
    }
    Ok(total)
}

fn one_connection(
    conn: &mut HttpConn,
    first: Instant,
    interval: Duration,
    measure_from: Instant,
    end: Instant,
) -> RateRun {
    let mut run = RateRun::default();
    let mut previous_done = None;
    for i in 0u32.. {
        let due = first + interval * i;
        if due >= end {
            break;
        }
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let sent = Instant::now();
        match conn.request(REQUEST) {
            Ok(status) => {
                let done = Instant::now();
                run.sent_total += 1;
                if due >= measure_from {
                    if status == 200 {
                        let from = latency_start(due, sent, previous_done);
                        let ns = u64::try_from((done - from).as_nanos()).unwrap_or(u64::MAX);
                        run.latencies_ns.push(ns);
                    } else {
                        run.non_200 += 1;
                    }
                }
                previous_done = Some(done);
            }
            Err(_) => {
                run.errors += 1;
                break;
            }
        }
    }
    run
}

/// What a connection-rate run counted.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ConnRun {
    pub completed: u64,
    pub errors: u64,
    pub elapsed: Duration,
}

impl ConnRun {
    pub fn per_second(&self) -> f64 {
        self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// New connections per second: `workers` threads inside `netns`, each in a loop of connect,
/// one `Connection: close` request, read to the end, close, for `duration`.
pub fn connection_rate(
    netns: &str,
    target: SocketAddr,
    workers: usize,
    duration: Duration,
) -> Result<ConnRun> {
    crate::in_netns(netns, || {
        let start = Instant::now();
        let end = start + duration;
        let counts: Vec<(u64, u64)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|_| {
                    scope.spawn(move || {
                        let (mut ok, mut errors) = (0u64, 0u64);
                        while Instant::now() < end {
                            match one_shot(target) {
                                Ok(200) => ok += 1,
                                _ => errors += 1,
                            }
                            // A path that refuses everything must not spin.
                            if errors > 1_000 && ok == 0 {
                                break;
                            }
                        }
                        (ok, errors)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or((0, 1)))
                .collect()
        });
        ConnRun {
            completed: counts.iter().map(|c| c.0).sum(),
            errors: counts.iter().map(|c| c.1).sum(),
            elapsed: start.elapsed(),
        }
    })
}

/// One connection with one `Connection: close` request; returns the status. Must run on a
/// thread inside the client's namespace.
pub fn one_shot(target: SocketAddr) -> Result<u16> {
    let stream = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
        .with_context(|| format!("connect to {target}"))?;
    let mut conn = HttpConn::new(stream)?;
    let status = conn.request(REQUEST_CLOSE)?;
    // Wait for the server's close, so the connection is over when we count it.
    let mut rest = [0u8; 256];
    loop {
        match conn.stream.read(&mut rest) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => return Err(e).context("read to the end"),
        }
    }
    Ok(status)
}

/// One `one_shot` with short timeouts, for probing enrollment: the duration when it
/// succeeded with 200.
pub fn try_request(target: SocketAddr, timeout: Duration) -> Option<Duration> {
    let start = Instant::now();
    let stream = TcpStream::connect_timeout(&target, timeout).ok()?;
    stream.set_read_timeout(Some(timeout)).ok()?;
    stream.set_nodelay(true).ok()?;
    let mut stream = stream;
    stream.write_all(REQUEST_CLOSE).ok()?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 1024];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Ok(Some(head)) = parse_response_head(&buf) {
                    if buf.len() >= head.head_len + head.content_length {
                        return (head.status == 200).then(|| start.elapsed());
                    }
                }
            }
            Err(_) => return None,
        }
    }
    None
}

/// Opens `count` connections from inside `netns` to a raw echo server at `target` and
/// checks each end to end (one byte out, the same byte back), with `workers` threads.
/// Returns them open; dropping them closes them.
pub fn open_idle(
    netns: &str,
    target: SocketAddr,
    count: usize,
    workers: usize,
) -> Result<Vec<TcpStream>> {
    let workers = workers.clamp(1, count.max(1));
    crate::in_netns(netns, || {
        std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    let mine = count / workers + usize::from(w < count % workers);
                    scope.spawn(move || -> Result<Vec<TcpStream>> {
                        let mut held = Vec::with_capacity(mine);
                        for i in 0..mine {
                            let mut s = TcpStream::connect_timeout(&target, CONNECT_TIMEOUT)
                                .with_context(|| {
                                    format!("idle connection {i} of worker {w} to {target}")
                                })?;
                            s.set_read_timeout(Some(IO_TIMEOUT))?;
                            s.write_all(b"x").context("send the probe byte")?;
                            let mut back = [0u8; 1];
                            s.read_exact(&mut back)
                                .with_context(|| format!("echo on idle connection {i}"))?;
                            if &back != b"x" {
                                bail!("echo returned {back:?}");
                            }
                            held.push(s);
                        }
                        Ok(held)
                    })
                })
                .collect();
            let mut all = Vec::with_capacity(count);
            for h in handles {
                let held = h
                    .join()
                    .map_err(|_| anyhow::anyhow!("an idle-connection worker panicked"))??;
                all.extend(held);
            }
            Ok(all)
        })
    })?
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn response_heads_are_parsed_once_complete() {
        let full = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 3\r\n\r\nok\n";
        let head = parse_response_head(full).expect("valid").expect("complete");
        assert_eq!(
            head,
            ResponseHead {
                status: 200,
                head_len: full.len() - 3,
                content_length: 3
            }
        );
        assert_eq!(parse_response_head(&full[..20]).expect("partial"), None);
        let no_body = b"HTTP/1.0 404 Not Found\r\ncontent-length:0\r\n\r\n";
        assert_eq!(
            parse_response_head(no_body)
                .expect("valid")
                .map(|h| (h.status, h.content_length)),
            Some((404, 0))
        );
        assert!(parse_response_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
        assert!(
            parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n").is_err()
        );
        assert!(parse_response_head(b"HTTP/1.1 2x0 OK\r\n\r\n").is_err());
        assert!(parse_response_head(&vec![b'a'; MAX_HEAD + 1]).is_err());
    }

    #[test]
    fn a_late_response_is_charged_to_the_requests_it_delayed() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        // On time: from when it was sent (the client's own wake-up delay is not charged).
        assert_eq!(latency_start(t0, t0 + ms(1), Some(t0 - ms(1))), t0 + ms(1));
        assert_eq!(latency_start(t0, t0 + ms(1), None), t0 + ms(1));
        // The previous response came after this request was due: from when it was due.
        assert_eq!(latency_start(t0, t0 + ms(5), Some(t0 + ms(4))), t0);
    }

    /// A minimal keep-alive HTTP server on loopback answering every request with "ok\n".
    fn serve_ok(listener: TcpListener, close: bool) {
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    loop {
                        let Ok(n) = stream.read(&mut chunk) else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        buf.extend_from_slice(&chunk[..n]);
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            let reply: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n";
                            if stream.write_all(reply).is_err() {
                                return;
                            }
                            if close {
                                return;
                            }
                        }
                    }
                });
            }
        });
    }

    #[test]
    fn the_fixed_rate_client_keeps_its_schedule_on_loopback() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        serve_ok(listener, false);
        let conns = (0..2)
            .map(|_| TcpStream::connect(addr).expect("connect"))
            .collect();
        let run = fixed_rate(
            conns,
            FixedRate {
                rate: 400.0,
                duration: Duration::from_millis(500),
                warmup: Duration::from_millis(100),
            },
        )
        .expect("run");
        assert_eq!((run.errors, run.non_200), (0, 0));
        // 400 req/s for 0.5 s: 200 requests in the window (± the edges).
        let n = run.latencies_ns.len();
        assert!((190..=210).contains(&n), "{n} requests measured");
        assert!((run.achieved() - 400.0).abs() < 25.0, "{}", run.achieved());
        assert!(run.latencies_ns.iter().all(|&ns| ns > 0));
    }

    #[test]
    fn one_shot_requests_wait_for_the_close() {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        serve_ok(listener, true);
        assert_eq!(one_shot(addr).expect("request"), 200);
        assert!(try_request(addr, Duration::from_secs(2)).is_some());
        let closed = TcpListener::bind("127.0.0.1:0").expect("bind");
        let refused = closed.local_addr().expect("addr");
        drop(closed);
        assert!(one_shot(refused).is_err());
        assert!(try_request(refused, Duration::from_millis(200)).is_none());
    }
}
