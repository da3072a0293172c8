//! A deliberately small HTTP/1.1 client for tests: enough to read ztunnel's readiness, metrics
//! and admin endpoints and the echo server's replies, with no dependency on the code under
//! test.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;

use anyhow::{bail, Context, Result};

/// Longest status or header line accepted.
const MAX_LINE: u64 = 64 * 1024;
/// Most header lines accepted.
const MAX_HEADERS: usize = 256;
/// Largest body accepted, so that a corrupt length cannot exhaust memory.
const MAX_BODY: usize = 256 * 1024 * 1024;

/// A parsed HTTP response.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status code, e.g. 200.
    pub status: u16,
    /// Header fields in arrival order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON.
    pub fn json(&self) -> Result<serde_json::Value> {
        serde_json::from_slice(&self.body)
            .with_context(|| format!("parse response body as json: {:?}", self.text()))
    }
}

/// Sends one request on `stream` with `Connection: close` and reads the response.
pub fn request(
    stream: &mut TcpStream,
    method: &str,
    host: &str,
    path: &str,
    body: &[u8],
) -> Result<HttpResponse> {
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {host}\r\nuser-agent: e2e\r\naccept: */*\r\n\
         content-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body))
        .with_context(|| format!("send {method} {path} to {host}"))?;
    read_response(&mut BufReader::new(stream))
        .with_context(|| format!("read response to {method} {path} from {host}"))
}

/// Parses a complete response held in memory.
pub fn parse_response(raw: &[u8]) -> Result<HttpResponse> {
    read_response(&mut BufReader::new(raw))
}

/// Reads exactly one response from `reader`, so the same reader can be used for the next
/// response on a keep-alive connection. The body is framed by `transfer-encoding: chunked`,
/// `content-length`, or the end of the stream, in that order of precedence.
pub fn read_response<R: BufRead>(reader: &mut R) -> Result<HttpResponse> {
    let status_line = read_line(reader)?.context("connection closed before a status line")?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        bail!("not an HTTP/1 status line: {status_line:?}");
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status code in {status_line:?}"))?;

    let mut headers = Vec::new();
    loop {
        let line = read_line(reader)?.context("connection closed inside the headers")?;
        if line.is_empty() {
            break;
        }
        if headers.len() >= MAX_HEADERS {
            bail!("more than {MAX_HEADERS} header lines");
        }
        let (name, value) = line
            .split_once(':')
            .with_context(|| format!("malformed header line {line:?}"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let mut response = HttpResponse {
        status,
        headers,
        body: Vec::new(),
    };

    let bodyless = (100..200).contains(&status) || status == 204 || status == 304;
    if bodyless {
        return Ok(response);
    }
    let chunked = response
        .header("transfer-encoding")
        .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"));
    if chunked {
        response.body = read_chunked(reader)?;
    } else if let Some(length) = response.header("content-length") {
        let length: usize = length
            .parse()
            .with_context(|| format!("bad content-length {length:?}"))?;
        if length > MAX_BODY {
            bail!("content-length {length} exceeds {MAX_BODY}");
        }
        let mut body = vec![0; length];
        reader
            .read_exact(&mut body)
            .with_context(|| format!("read a {length}-byte body"))?;
        response.body = body;
    } else {
        reader
            .read_to_end(&mut response.body)
            .context("read body to end of stream")?;
    }
    Ok(response)
}

/// Decodes a chunked body (chunk extensions and trailers are read and ignored).
pub fn read_chunked<R: BufRead>(reader: &mut R) -> Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(reader)?.context("connection closed inside a chunked body")?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16)
            .with_context(|| format!("bad chunk size line {line:?}"))?;
        if size == 0 {
            // Trailers, up to the blank line.
            while read_line(reader)?.is_some_and(|l| !l.is_empty()) {}
            return Ok(body);
        }
        let start = body.len();
        if start.saturating_add(size) > MAX_BODY {
            bail!("chunked body exceeds {MAX_BODY} bytes");
        }
        body.resize(start + size, 0);
        reader
            .read_exact(&mut body[start..])
            .with_context(|| format!("read a {size}-byte chunk"))?;
        let end = read_line(reader)?.context("connection closed after a chunk")?;
        if !end.is_empty() {
            bail!("chunk not followed by CRLF: {end:?}");
        }
    }
}

/// Reads one CRLF- (or LF-) terminated line without its terminator; `None` at end of stream.
pub(crate) fn read_line<R: BufRead>(reader: &mut R) -> Result<Option<String>> {
    let mut line = Vec::new();
    let n = reader
        .take(MAX_LINE)
        .read_until(b'\n', &mut line)
        .context("read a line")?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        if n as u64 >= MAX_LINE {
            bail!("line longer than {MAX_LINE} bytes");
        }
        bail!("stream ended inside a line");
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some(String::from_utf8_lossy(&line).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(raw: &str, status: u16, body: &str) {
        let response =
            parse_response(raw.as_bytes()).unwrap_or_else(|e| panic!("parse {raw:?}: {e:#}"));
        assert_eq!(response.status, status, "{raw:?}");
        assert_eq!(response.text(), body, "{raw:?}");
    }

    #[test]
    fn bodies_are_framed_by_length_chunks_or_end_of_stream() {
        check(
            "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            200,
            "hello",
        );
        check(
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhello",
            200,
            "he",
        );
        check(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n1\r\n!\r\n0\r\nx-trailer: 1\r\n\r\n",
            200,
            "hello!",
        );
        check(
            "HTTP/1.0 503 Service Unavailable\r\n\r\nnot ready",
            503,
            "not ready",
        );
        check("HTTP/1.1 204 No Content\r\n\r\n", 204, "");
        check(
            "HTTP/1.1 200 OK\nx: y\n\nbare newlines",
            200,
            "bare newlines",
        );
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for raw in [
            "",
            "SSH-2.0-OpenSSH\r\n",
            "HTTP/1.1 abc\r\n\r\n",
            "HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nshort",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nffffffffffff\r\n",
            "HTTP/1.1 200 OK\r\ncontent-length: 99999999999\r\n\r\n",
        ] {
            assert!(parse_response(raw.as_bytes()).is_err(), "{raw:?}");
        }
    }

    #[test]
    fn headers_are_found_case_insensitively() {
        let response =
            parse_response(b"HTTP/1.1 200 OK\r\nX-Thing: a\r\n\r\n").expect("valid response");
        assert_eq!(response.header("x-thing"), Some("a"));
        assert_eq!(response.header("X-THING"), Some("a"));
        assert_eq!(response.header("missing"), None);
    }
}
