//! Which protocol a tunnelled connection speaks: declared by the Service port, or detected
//! from its first bytes. Pure, table-tested.

use mesh_model::model::ServicePort;

/// The HTTP/2 connection preface (RFC 9113 §3.4).
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How many bytes detection may look at before it decides: a request line longer than this
/// is not worth parsing as HTTP, and the connection is relayed as bytes.
pub const SNIFF_LIMIT: usize = 4 * 1024;

/// What a Service port declares (`appProtocol`, else the name's prefix, as Istio reads it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Declared {
    /// `http`, `http-*`, `appProtocol: http`: HTTP/1.1 to the backend.
    Http,
    /// `http2`, `h2c`, `kubernetes.io/h2c`: HTTP/2 to the backend.
    Http2,
    /// `grpc`, `grpc-web`: HTTP/2 to the backend.
    Grpc,
    /// `tcp`, `tls`, `https`, `mongo`, `mysql`, `redis`...: bytes, never parsed.
    Tcp,
    /// Nothing said: detect.
    Unknown,
}

impl Declared {
    /// The protocol of `port`: `appProtocol` wins; otherwise the name, up to its first `-`.
    pub fn of(port: &ServicePort) -> Declared {
        if let Some(app) = port.app_protocol.as_deref() {
            return Self::from_token(app);
        }
        match port.name.as_deref() {
            Some(name) => Self::from_token(name.split('-').next().unwrap_or_default()),
            None => Declared::Unknown,
        }
    }

    /// The protocol of a ServiceEntry port (`protocol: HTTP`, `TCP`, `TLS`, `GRPC`...).
    pub fn of_protocol(protocol: &str) -> Declared {
        Self::from_token(protocol)
    }

    fn from_token(token: &str) -> Declared {
        match token.to_ascii_lowercase().as_str() {
            "http" => Declared::Http,
            "http2" | "h2c" | "kubernetes.io/h2c" => Declared::Http2,
            "grpc" | "grpc-web" => Declared::Grpc,
            "tcp" | "tls" | "https" | "mongo" | "mysql" | "redis" | "kubernetes.io/ws"
            | "kubernetes.io/wss" => Declared::Tcp,
            _ => Declared::Unknown,
        }
    }

    /// Whether the connection is proxied at L7 at all (subject to detection for `Unknown`).
    pub fn is_http(self) -> bool {
        matches!(self, Declared::Http | Declared::Http2 | Declared::Grpc)
    }
}

/// What the first bytes say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Detected {
    Http1,
    Http2,
    /// Not HTTP: relay the bytes.
    Opaque,
    /// Could still be either: read more.
    NeedMore,
}

/// Classifies the first bytes of a connection, deciding as early as it can.
pub fn detect(buf: &[u8]) -> Detected {
    if buf.is_empty() {
        return Detected::NeedMore;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return if buf.len() >= H2_PREFACE.len() {
            Detected::Http2
        } else {
            Detected::NeedMore
        };
    }
    detect_http1(buf)
}

/// `METHOD SP request-target SP HTTP/1.x CRLF`, with a token method of upper-case letters
/// (every registered method is one, lower-case is not HTTP/1.1).
fn detect_http1(buf: &[u8]) -> Detected {
    const MAX_METHOD: usize = 20;
    let method_len = buf.iter().take_while(|b| b.is_ascii_uppercase()).count();
    if method_len > MAX_METHOD {
        return Detected::Opaque;
    }
    match buf.get(method_len) {
        None => return Detected::NeedMore,
        Some(b' ') if method_len > 0 => {}
        Some(_) => return Detected::Opaque,
    }
    let Some(end) = buf.iter().position(|&b| b == b'\n') else {
        return if buf.len() >= SNIFF_LIMIT
            || buf.iter().any(|b| b.is_ascii_control() && *b != b'\r')
        {
            Detected::Opaque
        } else {
            Detected::NeedMore
        };
    };
    let line = &buf[..end];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let mut parts = line.split(|&b| b == b' ');
    let (_method, target, version) = (parts.next(), parts.next(), parts.next());
    let valid = parts.next().is_none()
        && target.is_some_and(|t| !t.is_empty())
        && matches!(version, Some(b"HTTP/1.1") | Some(b"HTTP/1.0"));
    if valid {
        Detected::Http1
    } else {
        Detected::Opaque
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mesh_model::model::TargetPort;

    fn port(name: Option<&str>, app: Option<&str>) -> ServicePort {
        ServicePort {
            name: name.map(str::to_string),
            app_protocol: app.map(str::to_string),
            port: 80,
            target_port: TargetPort::Number(8080),
        }
    }

    #[test]
    fn ports_declare_their_protocol_by_app_protocol_then_name_prefix() {
        for (name, app, want) in [
            (Some("http"), None, Declared::Http),
            (Some("http-web"), None, Declared::Http),
            (Some("HTTP-web"), None, Declared::Http),
            (Some("http2"), None, Declared::Http2),
            (Some("grpc-api"), None, Declared::Grpc),
            (Some("grpc-web"), None, Declared::Grpc),
            (Some("tcp-db"), None, Declared::Tcp),
            (Some("https"), None, Declared::Tcp),
            (Some("web"), None, Declared::Unknown),
            (Some("httpx"), None, Declared::Unknown),
            (None, None, Declared::Unknown),
            (Some("tcp"), Some("http"), Declared::Http),
            (Some("http"), Some("kubernetes.io/h2c"), Declared::Http2),
            (Some("http"), Some("tcp"), Declared::Tcp),
            (None, Some("grpc"), Declared::Grpc),
        ] {
            assert_eq!(Declared::of(&port(name, app)), want, "{name:?} {app:?}");
        }
    }

    fn check(first_bytes: &[u8], want: Detected) {
        assert_eq!(
            detect(first_bytes),
            want,
            "{:?}",
            String::from_utf8_lossy(first_bytes)
        );
    }

    #[test]
    fn the_first_bytes_tell_http1_http2_and_opaque_apart() {
        check(b"", Detected::NeedMore);
        check(b"P", Detected::NeedMore);
        check(b"PRI * HTTP/2.0\r\n", Detected::NeedMore);
        check(H2_PREFACE, Detected::Http2);
        check(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x12\x04",
            Detected::Http2,
        );
        check(b"GET / HTTP/1.1\r\n", Detected::Http1);
        check(b"POST /a?b=c HTTP/1.0\n", Detected::Http1);
        check(b"PRI /x HTTP/1.1\r\n", Detected::Http1);
        check(b"GET", Detected::NeedMore);
        check(b"GET /", Detected::NeedMore);
        check(b"get / HTTP/1.1\r\n", Detected::Opaque);
        check(b"GET / HTTP/2.0\r\n", Detected::Opaque);
        check(b"GET  / HTTP/1.1\r\n", Detected::Opaque);
        check(b"\x16\x03\x01\x02\x00", Detected::Opaque);
        check(b"hello world\n", Detected::Opaque);
        check(b"SSH-2.0-OpenSSH\r\n", Detected::Opaque);
        check(b"GET /\x00", Detected::Opaque);
        let long = [b"GET /".as_slice(), &[b'a'; SNIFF_LIMIT]].concat();
        check(&long, Detected::Opaque);
        check(&[b'A'; 64], Detected::Opaque);
    }
}
