//! The protocol logic of `mesh-echo` (the binary does only IO): deciding whether a connection
//! speaks HTTP/1.x, reading request heads, and building the JSON reply.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

/// How many bytes may arrive before the server must decide: a request line longer than this
/// is not something a test sends, so the connection is treated as raw bytes.
pub const SNIFF_LIMIT: usize = 8 * 1024;

/// Longest delay a request may ask for with `?delay_ms=`.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// Methods recognised at the start of a connection.
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];

/// What the first bytes of a connection say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sniff {
    /// A complete HTTP/1.0 or HTTP/1.1 request line.
    Http,
    /// Anything else: echo it.
    Raw,
    /// Still a possible request line: read more (or, at end of stream, treat as raw).
    NeedMore,
}

/// Classifies the first bytes of a connection. Decides as early as possible, so that raw
/// payloads that cannot be HTTP (e.g. a test marker) are echoed at once without waiting for
/// a newline.
pub fn sniff(buf: &[u8]) -> Sniff {
    if buf.is_empty() {
        return Sniff::NeedMore;
    }
    let could_be_method = METHODS.iter().any(|m| {
        let token = format!("{m} ");
        let token = token.as_bytes();
        if buf.len() < token.len() {
            token.starts_with(buf)
        } else {
            buf.starts_with(token)
        }
    });
    if !could_be_method {
        return Sniff::Raw;
    }
    match buf.iter().position(|&b| b == b'\n') {
        Some(end) => {
            let line = String::from_utf8_lossy(&buf[..end]);
            if parse_request_line(line.trim_end_matches('\r')).is_some() {
                Sniff::Http
            } else {
                Sniff::Raw
            }
        }
        None if buf.len() >= SNIFF_LIMIT => Sniff::Raw,
        None => Sniff::NeedMore,
    }
}

/// Splits `METHOD target HTTP/1.x`.
pub fn parse_request_line(line: &str) -> Option<(&str, &str, &str)> {
    let mut parts = line.split(' ');
    let method = parts.next()?;
    let target = parts.next()?;
    let version = parts.next()?;
    if parts.next().is_some()
        || !METHODS.contains(&method)
        || target.is_empty()
        || !matches!(version, "HTTP/1.1" | "HTTP/1.0")
    {
        return None;
    }
    Some((method, target, version))
}

/// How a request body is delimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    None,
    /// `content-length` bytes.
    Length(u64),
    /// `transfer-encoding: chunked`.
    Chunked,
}

/// A parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    /// Request method.
    pub method: String,
    /// Request target as sent.
    pub path: String,
    /// `HTTP/1.1` or `HTTP/1.0`.
    pub version: String,
    /// Header fields, names lower-cased, in arrival order.
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// Parses the head from its lines (request line first, without the blank line).
    pub fn parse(lines: &[String]) -> Result<Self> {
        let (first, rest) = lines.split_first().context("empty request head")?;
        let (method, path, version) =
            parse_request_line(first).with_context(|| format!("bad request line {first:?}"))?;
        let mut headers = Vec::with_capacity(rest.len());
        for line in rest {
            let (name, value) = line
                .split_once(':')
                .with_context(|| format!("malformed header line {line:?}"))?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
        Ok(RequestHead {
            method: method.to_owned(),
            path: path.to_owned(),
            version: version.to_owned(),
            headers,
        })
    }

    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn connection_has(&self, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(k, _)| k == "connection")
            .flat_map(|(_, v)| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    }

    /// HTTP/1.1 keeps the connection unless told to close; HTTP/1.0 only when asked.
    pub fn keep_alive(&self) -> bool {
        if self.version == "HTTP/1.0" {
            self.connection_has("keep-alive")
        } else {
            !self.connection_has("close")
        }
    }

    /// Whether the client waits for `100 Continue` before sending its body.
    pub fn expects_continue(&self) -> bool {
        self.header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    }

    /// How the body is delimited; a request both chunked and with a length is read as chunked
    /// (RFC 9112 §6.3).
    pub fn body_framing(&self) -> Result<BodyFraming> {
        if self
            .header("transfer-encoding")
            .is_some_and(|te| te.to_ascii_lowercase().contains("chunked"))
        {
            return Ok(BodyFraming::Chunked);
        }
        match self.header("content-length") {
            None => Ok(BodyFraming::None),
            Some(v) => match v.parse::<u64>() {
                Ok(0) => Ok(BodyFraming::None),
                Ok(n) => Ok(BodyFraming::Length(n)),
                Err(_) => bail!("bad content-length {v:?}"),
            },
        }
    }
}

/// The JSON body answered to every request:
/// `{"server","peer","method","path","headers":{..},"body_bytes"}`. Repeated headers are
/// joined with ", ".
pub fn reply_body(server: &str, peer: SocketAddr, head: &RequestHead, body_bytes: u64) -> Value {
    let mut headers = Map::new();
    for (name, value) in &head.headers {
        match headers.get_mut(name) {
            Some(Value::String(existing)) => {
                existing.push_str(", ");
                existing.push_str(value);
            }
            _ => {
                headers.insert(name.clone(), Value::String(value.clone()));
            }
        }
    }
    json!({
        "server": server,
        "peer": peer.to_string(),
        "method": head.method,
        "path": head.path,
        "headers": headers,
        "body_bytes": body_bytes,
    })
}

/// A complete `200 OK` response carrying `body` as JSON (no body bytes for HEAD).
pub fn response_bytes(head: &RequestHead, body: &Value, keep_alive: bool) -> Vec<u8> {
    response_bytes_with_status(head, 200, body, keep_alive)
}

/// A complete response with `status` carrying `body` as JSON (no body bytes for HEAD).
pub fn response_bytes_with_status(
    head: &RequestHead,
    status: u16,
    body: &Value,
    keep_alive: bool,
) -> Vec<u8> {
    let text = body.to_string();
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: {}\r\n\r\n",
        reason_phrase(status),
        text.len(),
        if keep_alive { "keep-alive" } else { "close" }
    )
    .into_bytes();
    if head.method != "HEAD" {
        out.extend_from_slice(text.as_bytes());
    }
    out
}

fn reason_phrase(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        409 => "Conflict",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Status",
    }
}

/// The first value of query parameter `name` in `target`.
fn query_param<'a>(target: &'a str, name: &str) -> Option<&'a str> {
    let query = target.split_once('?')?.1;
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// What a request asks the echo server to do besides answering, from its query:
///
/// - `status=N` (200-599): answer with status `N` instead of 200;
/// - `only=NAME[,NAME..]`: `status` and `delay_ms` apply only on the servers named (the
///   others answer 200 at once), e.g. one bad endpoint among several;
/// - `fail_first=N&key=K`: only the first `N` requests with key `K` that this server sees get
///   `status` (default 503) and `delay_ms`; later ones are answered 200 at once (a backend that
///   fails once, for retry tests).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Behaviour {
    pub status: u16,
    pub delay: Option<Duration>,
}

/// Per-server memory for [`behaviour`]: how many requests each `key` has had, and how many
/// requests each `Host` sent (for `GET /_requests`).
#[derive(Debug, Default)]
pub struct Seen {
    keys: std::collections::HashMap<String, u64>,
    hosts: std::collections::BTreeMap<String, u64>,
    total: u64,
}

impl Seen {
    /// Counts `head` (except `/_requests` itself).
    pub fn record(&mut self, head: &RequestHead) {
        if head.path.starts_with("/_requests") {
            return;
        }
        self.total += 1;
        let host = head.header("host").unwrap_or("-").to_string();
        *self.hosts.entry(host).or_default() += 1;
    }

    /// `{"server", "total", "hosts": {host: count}}`, the answer to `GET /_requests`.
    pub fn report(&self, server: &str) -> Value {
        json!({"server": server, "total": self.total, "hosts": self.hosts})
    }
}

/// How server `server` answers `target`; see [`Behaviour`]. Updates `seen` for `fail_first`.
pub fn behaviour(server: &str, target: &str, seen: &mut Seen) -> Behaviour {
    let plain = Behaviour {
        status: 200,
        delay: None,
    };
    let status = query_param(target, "status").and_then(|s| s.parse::<u16>().ok());
    let delay = requested_delay(target);
    if let Some(only) = query_param(target, "only") {
        if !only.split(',').any(|n| n == server) {
            return plain;
        }
    }
    if let Some(first) = query_param(target, "fail_first").and_then(|n| n.parse::<u64>().ok()) {
        let key = query_param(target, "key").unwrap_or_default().to_string();
        let count = seen.keys.entry(key).or_default();
        *count += 1;
        if *count > first {
            return plain;
        }
        return Behaviour {
            status: status.filter(|s| (200..600).contains(s)).unwrap_or(503),
            delay,
        };
    }
    Behaviour {
        status: status.filter(|s| (200..600).contains(s)).unwrap_or(200),
        delay,
    }
}

/// The protocol a request asks to switch to (`Connection: upgrade` + `Upgrade: <token>`),
/// lower-cased.
pub fn upgrade_requested(head: &RequestHead) -> Option<String> {
    let asks = head
        .headers
        .iter()
        .filter(|(k, _)| k == "connection")
        .flat_map(|(_, v)| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    let token = head.header("upgrade")?.trim().to_ascii_lowercase();
    (asks && !token.is_empty()).then_some(token)
}

/// The `101 Switching Protocols` answer to an upgrade to `protocol`; `accept` is the
/// `Sec-WebSocket-Accept` value for a WebSocket handshake. `x-echo-server` names the server.
pub fn switching_protocols(protocol: &str, accept: Option<&str>, server: &str) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 101 Switching Protocols\r\nconnection: upgrade\r\nupgrade: {protocol}\r\n\
         x-echo-server: {server}\r\n"
    );
    if let Some(accept) = accept {
        out.push_str(&format!("sec-websocket-accept: {accept}\r\n"));
    }
    out.push_str("\r\n");
    out.into_bytes()
}

/// How long to wait before answering a request for `target`: its `delay_ms` query parameter
/// (first occurrence), capped at [`MAX_DELAY`]; none when absent or not a number.
pub fn requested_delay(target: &str) -> Option<Duration> {
    let query = target.split_once('?')?.1;
    let value = query
        .split('&')
        .find_map(|pair| pair.strip_prefix("delay_ms="))?;
    let ms: u64 = value.parse().ok()?;
    Some(Duration::from_millis(ms).min(MAX_DELAY))
}

/// A `400 Bad Request` for heads that cannot be parsed; the connection is closed after it.
pub fn bad_request(reason: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{reason}",
        reason.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(first_bytes: &str, expected: Sniff) {
        assert_eq!(sniff(first_bytes.as_bytes()), expected, "{first_bytes:?}");
    }

    #[test]
    fn connections_are_classified_from_their_first_bytes() {
        check("GET / HTTP/1.1\r\n", Sniff::Http);
        check("POST /x?y=1 HTTP/1.0\n", Sniff::Http);
        check("", Sniff::NeedMore);
        check("G", Sniff::NeedMore);
        check("GET", Sniff::NeedMore);
        check("GET /", Sniff::NeedMore);
        check("PATCH /a HTTP/1.", Sniff::NeedMore);
        check("MARKER-1234", Sniff::Raw);
        check("PING", Sniff::Raw);
        check("hello", Sniff::Raw);
        check("GETX / HTTP/1.1\r\n", Sniff::Raw);
        check("GET me a coffee\n", Sniff::Raw);
        check("GET / HTTP/2.0\r\n", Sniff::Raw);
        check("PRI * HTTP/2.0\r\n", Sniff::Raw);
        check("\u{16}\u{3}\u{1}", Sniff::Raw);
        let long = format!("GET /{} HTTP/1.1", "a".repeat(SNIFF_LIMIT));
        check(&long, Sniff::Raw);
    }

    fn head(lines: &[&str]) -> RequestHead {
        let lines: Vec<String> = lines.iter().map(|s| s.to_string()).collect();
        RequestHead::parse(&lines).expect("valid head")
    }

    #[test]
    fn keep_alive_and_framing_follow_http_1_rules() {
        let cases: [(&[&str], bool, BodyFraming); 6] = [
            (&["GET / HTTP/1.1"], true, BodyFraming::None),
            (
                &["GET / HTTP/1.1", "Connection: close"],
                false,
                BodyFraming::None,
            ),
            (&["GET / HTTP/1.0"], false, BodyFraming::None),
            (
                &["GET / HTTP/1.0", "connection: Keep-Alive"],
                true,
                BodyFraming::None,
            ),
            (
                &["POST / HTTP/1.1", "Content-Length: 5"],
                true,
                BodyFraming::Length(5),
            ),
            (
                &[
                    "POST / HTTP/1.1",
                    "content-length: 5",
                    "transfer-encoding: chunked",
                ],
                true,
                BodyFraming::Chunked,
            ),
        ];
        for (lines, keep_alive, framing) in cases {
            let h = head(lines);
            assert_eq!(h.keep_alive(), keep_alive, "{lines:?}");
            assert_eq!(h.body_framing().expect("framing"), framing, "{lines:?}");
        }
        assert!(head(&["POST / HTTP/1.1", "content-length: x"])
            .body_framing()
            .is_err());
    }

    #[test]
    fn the_reply_names_server_peer_request_and_headers() {
        let h = head(&[
            "GET /hello HTTP/1.1",
            "Host: echo",
            "X-Multi: a",
            "x-multi: b",
        ]);
        let peer: SocketAddr = "10.244.1.2:40000".parse().expect("addr");
        let body = reply_body("v1", peer, &h, 0);
        assert_eq!(
            body,
            json!({
                "server": "v1",
                "peer": "10.244.1.2:40000",
                "method": "GET",
                "path": "/hello",
                "headers": {"host": "echo", "x-multi": "a, b"},
                "body_bytes": 0,
            })
        );
        let bytes = response_bytes(&h, &body, true);
        let response = crate::http::parse_response(&bytes).expect("valid response");
        assert_eq!(response.status, 200);
        assert_eq!(response.json().expect("json"), body);
    }

    #[test]
    fn behaviours_come_from_the_query() {
        let mut seen = Seen::default();
        let ms = |n| Some(Duration::from_millis(n));
        let b = |server: &str, target: &str, seen: &mut Seen| {
            let b = behaviour(server, target, seen);
            (b.status, b.delay)
        };
        assert_eq!(b("v1", "/", &mut seen), (200, None));
        assert_eq!(b("v1", "/?status=503", &mut seen), (503, None));
        assert_eq!(b("v1", "/?status=99", &mut seen), (200, None));
        assert_eq!(b("v1", "/?status=503&only=v2,v3", &mut seen), (200, None));
        assert_eq!(b("v2", "/?status=503&only=v2,v3", &mut seen), (503, None));
        assert_eq!(b("v2", "/?delay_ms=5&only=v1", &mut seen), (200, None));
        // fail_first counts per key: the first N fail, the rest are answered at once.
        let t = "/?fail_first=2&key=a&delay_ms=7";
        assert_eq!(b("v1", t, &mut seen), (503, ms(7)));
        assert_eq!(b("v1", t, &mut seen), (503, ms(7)));
        assert_eq!(b("v1", t, &mut seen), (200, None));
        assert_eq!(
            b("v1", "/?fail_first=1&key=b&status=500", &mut seen),
            (500, None)
        );
        assert_eq!(
            b("v1", "/?fail_first=1&key=b&status=500", &mut seen),
            (200, None)
        );
    }

    #[test]
    fn requests_are_counted_by_host() {
        let mut seen = Seen::default();
        for (path, host) in [
            ("/a", "x"),
            ("/b", "x"),
            ("/c", "y-shadow"),
            ("/_requests", "x"),
        ] {
            seen.record(&head(&[
                &format!("GET {path} HTTP/1.1"),
                &format!("host: {host}"),
            ]));
        }
        assert_eq!(
            seen.report("v1"),
            json!({"server": "v1", "total": 3, "hosts": {"x": 2, "y-shadow": 1}})
        );
    }

    #[test]
    fn delays_come_from_the_query_and_are_bounded() {
        let ms = |n| Some(Duration::from_millis(n));
        for (target, want) in [
            ("/slow?delay_ms=250", ms(250)),
            ("/slow?a=1&delay_ms=5", ms(5)),
            ("/slow?delay_ms=99999999", Some(MAX_DELAY)),
            ("/slow?delay_ms=", None),
            ("/slow?delay_ms=-1", None),
            ("/slow?xdelay_ms=5", None),
            ("/slow", None),
        ] {
            assert_eq!(requested_delay(target), want, "{target}");
        }
    }

    #[test]
    fn malformed_heads_are_errors() {
        for lines in [
            vec![],
            vec!["GET / HTTP/1.1".to_string(), "no colon".to_string()],
            vec!["BREW /pot HTTP/1.1".to_string()],
        ] {
            assert!(RequestHead::parse(&lines).is_err(), "{lines:?}");
        }
    }
}
