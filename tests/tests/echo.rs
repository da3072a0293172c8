//! mesh-echo on loopback: HTTP with keep-alive answered in JSON, anything else echoed with
//! half-close semantics.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use e2e::http::{read_response, HttpResponse};

/// A mesh-echo process on 127.0.0.1, killed on drop.
struct Echo {
    child: Child,
    addr: SocketAddr,
}

impl Echo {
    fn start(name: &str) -> Result<Echo> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_mesh-echo"))
            .args(["--listen", "127.0.0.1", "--port", "0", "--name", name])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .context("spawn mesh-echo")?;
        let stdout = child.stdout.take().context("mesh-echo stdout")?;
        let mut first = String::new();
        // The server prints this line once bound, so reading it is the readiness wait; if it
        // dies instead, the read ends with an empty line.
        BufReader::new(stdout).read_line(&mut first)?;
        let Some(addr) = first.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            bail!("mesh-echo did not start: {first:?}");
        };
        let addr = addr.parse()?;
        Ok(Echo { child, addr })
    }

    fn connect(&self) -> Result<TcpStream> {
        let stream = TcpStream::connect(self.addr)?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        Ok(stream)
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_one(reader: &mut BufReader<TcpStream>) -> Result<HttpResponse> {
    read_response(reader)
}

#[test]
fn http_requests_on_one_keep_alive_connection_are_each_answered_in_json() -> Result<()> {
    let echo = Echo::start("v1")?;
    let mut stream = echo.connect()?;
    let client = stream.local_addr()?;
    let mut reader = BufReader::new(stream.try_clone()?);

    stream.write_all(b"GET /first HTTP/1.1\r\nHost: echo\r\nX-Test: 1\r\n\r\n")?;
    let first = read_one(&mut reader)?;
    stream
        .write_all(b"POST /second?q=2 HTTP/1.1\r\nHost: echo\r\nContent-Length: 5\r\n\r\nhello")?;
    let second = read_one(&mut reader)?;

    assert_eq!(first.status, 200);
    assert_eq!(first.header("content-type"), Some("application/json"));
    let body = first.json()?;
    assert_eq!(body["server"], "v1");
    assert_eq!(body["peer"], client.to_string());
    assert_eq!(body["method"], "GET");
    assert_eq!(body["path"], "/first");
    assert_eq!(body["headers"]["host"], "echo");
    assert_eq!(body["headers"]["x-test"], "1");
    let body = second.json()?;
    assert_eq!(body["method"], "POST");
    assert_eq!(body["path"], "/second?q=2");
    assert_eq!(body["body_bytes"], 5);
    assert_eq!(body["peer"], client.to_string(), "same connection");
    Ok(())
}

#[test]
fn a_chunked_body_is_consumed_and_connection_close_is_honoured() -> Result<()> {
    let echo = Echo::start("v2")?;
    let mut stream = echo.connect()?;
    stream.write_all(
        b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          3\r\nabc\r\n4;ext=1\r\ndefg\r\n0\r\n\r\n",
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let response = e2e::http::parse_response(&raw)?;
    assert_eq!(response.header("connection"), Some("close"));
    assert_eq!(response.json()?["body_bytes"], 7);
    Ok(())
}

#[test]
fn a_client_expecting_100_continue_is_told_to_go_on() -> Result<()> {
    let echo = Echo::start("v3")?;
    let mut stream = echo.connect()?;
    let mut reader = BufReader::new(stream.try_clone()?);
    stream.write_all(b"POST /big HTTP/1.1\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")?;
    let interim = read_one(&mut reader)?;
    assert_eq!(interim.status, 100);
    stream.write_all(b"xyz")?;
    let response = read_one(&mut reader)?;
    assert_eq!(response.status, 200);
    assert_eq!(response.json()?["body_bytes"], 3);
    Ok(())
}

#[test]
fn anything_that_is_not_http_is_echoed_until_the_client_stops_sending() -> Result<()> {
    let echo = Echo::start("raw")?;
    let check = |payload: &[u8]| -> Result<()> {
        let mut stream = echo.connect()?;
        stream.write_all(payload)?;
        // Half-close: the server must still send everything back, then close its side.
        stream.shutdown(Shutdown::Write)?;
        let mut back = Vec::new();
        stream.read_to_end(&mut back)?;
        assert_eq!(back, payload, "{:?}", String::from_utf8_lossy(payload));
        Ok(())
    };
    check(b"MARKER-1234")?;
    check(b"")?;
    check(b"GET")?;
    check(b"GET me a coffee\n")?;
    check(b"GET / HTTP/2.0\r\n\r\n")?;
    check(&[0x16, 0x03, 0x01, 0x00, 0xff, 0x00])?;
    check(&(0..=255u8).cycle().take(1 << 20).collect::<Vec<u8>>())?;
    Ok(())
}

#[test]
fn raw_bytes_come_back_while_the_connection_stays_open() -> Result<()> {
    let echo = Echo::start("interactive")?;
    let mut stream = echo.connect()?;
    for round in ["PING", "second round", "3"] {
        stream.write_all(round.as_bytes())?;
        let mut back = vec![0; round.len()];
        stream.read_exact(&mut back)?;
        assert_eq!(back, round.as_bytes());
    }
    Ok(())
}

#[test]
fn malformed_http_gets_a_400_and_the_server_keeps_serving() -> Result<()> {
    let echo = Echo::start("strict")?;
    let mut stream = echo.connect()?;
    stream.write_all(b"GET / HTTP/1.1\r\nno colon here\r\n\r\n")?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    assert_eq!(e2e::http::parse_response(&raw)?.status, 400);

    let mut again = echo.connect()?;
    let response = e2e::http::request(&mut again, "GET", "echo", "/still-up", b"")?;
    assert_eq!(response.json()?["path"], "/still-up");
    Ok(())
}
