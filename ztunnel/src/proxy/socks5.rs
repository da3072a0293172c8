//! SOCKS5 (RFC 1928) in place of capture, with `--redirect loopback` only.
//!
//! Without capture a connection accepted on 15001 (outbound) or 15006 (inbound plaintext) has
//! no original destination, so the client names it: no authentication, `CONNECT` only, to an
//! IPv4 or IPv6 address or to a domain name the model knows (a Service's
//! `<name>.<namespace>[.svc[.cluster.local]]`, resolved to its cluster IP). The success reply
//! is sent as soon as the request is read, before anything is planned or dialled: a captured
//! application's `connect()` has succeeded by then too, so everything after (policy, routing,
//! refusals that close the connection) is the same code path as with capture.
//!
//! The handshake reads exactly the bytes of each message, so what the client sends after it
//! stays in the socket for the relay.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use mesh_model::model::{Model, NamespacedName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const VERSION: u8 = 5;
const NO_AUTH: u8 = 0x00;
const NO_ACCEPTABLE_METHOD: u8 = 0xff;
const CONNECT: u8 = 0x01;
const ATYP_V4: u8 = 0x01;
const ATYP_NAME: u8 = 0x03;
const ATYP_V6: u8 = 0x04;

/// Reply codes (RFC 1928 §6).
const SUCCEEDED: u8 = 0x00;
const GENERAL_FAILURE: u8 = 0x01;
const HOST_UNREACHABLE: u8 = 0x04;
const COMMAND_NOT_SUPPORTED: u8 = 0x07;
const ADDRESS_TYPE_NOT_SUPPORTED: u8 = 0x08;

#[derive(Debug, thiserror::Error)]
pub enum Socks5Error {
    #[error("socks5 handshake: {0}")]
    Io(#[from] std::io::Error),
    #[error("socks5: version {0}, expected 5")]
    Version(u8),
    #[error("socks5: the client offers no method without authentication")]
    NoAcceptableMethod,
    #[error("socks5: command {0:#04x} is not CONNECT")]
    Command(u8),
    #[error("socks5: address type {0:#04x} is not supported")]
    AddressType(u8),
    #[error("socks5: {0:?} is not a name the mesh knows")]
    UnknownHost(String),
}

impl Socks5Error {
    /// The reply code that tells the client, when the handshake got as far as a request.
    fn reply_code(&self) -> Option<u8> {
        match self {
            Socks5Error::Io(_) | Socks5Error::NoAcceptableMethod => None,
            Socks5Error::Version(_) => Some(GENERAL_FAILURE),
            Socks5Error::Command(_) => Some(COMMAND_NOT_SUPPORTED),
            Socks5Error::AddressType(_) => Some(ADDRESS_TYPE_NOT_SUPPORTED),
            Socks5Error::UnknownHost(_) => Some(HOST_UNREACHABLE),
        }
    }
}

/// Serves the server side of a SOCKS5 handshake on `io` and returns the destination the
/// client asked for; names are resolved with `resolve`. A refused request is answered with
/// its reply code before the error is returned.
pub async fn accept<S>(
    io: &mut S,
    resolve: impl Fn(&str) -> Option<IpAddr>,
) -> Result<SocketAddr, Socks5Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let [version, n_methods] = read_array(io).await?;
    if version != VERSION {
        return Err(Socks5Error::Version(version));
    }
    let mut methods = vec![0; usize::from(n_methods)];
    io.read_exact(&mut methods).await?;
    if !methods.contains(&NO_AUTH) {
        io.write_all(&[VERSION, NO_ACCEPTABLE_METHOD]).await?;
        return Err(Socks5Error::NoAcceptableMethod);
    }
    io.write_all(&[VERSION, NO_AUTH]).await?;
    match request(io, resolve).await {
        Ok(dst) => {
            reply(io, SUCCEEDED).await?;
            Ok(dst)
        }
        Err(e) => {
            if let Some(code) = e.reply_code() {
                // The client may be gone already; the refusal is what gets reported.
                let _ = reply(io, code).await;
            }
            Err(e)
        }
    }
}

/// Reads one request: `VER CMD RSV ATYP DST.ADDR DST.PORT`.
async fn request<S>(
    io: &mut S,
    resolve: impl Fn(&str) -> Option<IpAddr>,
) -> Result<SocketAddr, Socks5Error>
where
    S: AsyncRead + Unpin,
{
    let [version, command, _reserved, atyp] = read_array(io).await?;
    if version != VERSION {
        return Err(Socks5Error::Version(version));
    }
    if command != CONNECT {
        return Err(Socks5Error::Command(command));
    }
    let ip = match atyp {
        ATYP_V4 => IpAddr::V4(Ipv4Addr::from(read_array::<_, 4>(io).await?)),
        ATYP_V6 => IpAddr::V6(Ipv6Addr::from(read_array::<_, 16>(io).await?)),
        ATYP_NAME => {
            let [len] = read_array(io).await?;
            let mut name = vec![0; usize::from(len)];
            io.read_exact(&mut name).await?;
            let name = String::from_utf8_lossy(&name).into_owned();
            // The port is part of the request: read it before answering either way.
            let port = u16::from_be_bytes(read_array(io).await?);
            let ip = resolve(&name).ok_or(Socks5Error::UnknownHost(name))?;
            return Ok(SocketAddr::new(ip, port));
        }
        other => return Err(Socks5Error::AddressType(other)),
    };
    let port = u16::from_be_bytes(read_array(io).await?);
    Ok(SocketAddr::new(ip, port))
}

/// `VER REP RSV ATYP BND.ADDR BND.PORT`; the bound address is not meaningful here (0.0.0.0:0).
async fn reply<S: AsyncWrite + Unpin>(io: &mut S, code: u8) -> std::io::Result<()> {
    io.write_all(&[VERSION, code, 0, ATYP_V4, 0, 0, 0, 0, 0, 0])
        .await
}

async fn read_array<S: AsyncRead + Unpin, const N: usize>(io: &mut S) -> std::io::Result<[u8; N]> {
    let mut buf = [0; N];
    io.read_exact(&mut buf).await?;
    Ok(buf)
}

/// What a domain name in a request stands for: an IP literal, or a Service of the model by
/// `<name>.<namespace>`, `<name>.<namespace>.svc` or its full hostname (a trailing dot is
/// ignored): its first cluster IP.
pub fn resolve(model: &Model, name: &str) -> Option<IpAddr> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if let Ok(ip) = name.parse() {
        return Some(ip);
    }
    let full = match name.split('.').count() {
        2 => format!("{name}.svc.cluster.local"),
        3 => format!("{name}.cluster.local"),
        _ => name.to_string(),
    };
    // `<name>.<namespace>.svc.cluster.local`; a namespace has no dot, so the last label before
    // the suffix is it: one lookup, not a scan of the Services.
    let (svc, ns) = full.strip_suffix(".svc.cluster.local")?.rsplit_once('.')?;
    model
        .service(&NamespacedName::new(ns, svc))
        .and_then(|svc| svc.cluster_ips.first().copied())
}

#[cfg(test)]
mod tests {
    use super::*;

    use tokio::io::AsyncWriteExt;

    /// Plays `client` against the server side, then returns its result and what it answered.
    async fn exchange(client: &[u8]) -> (Result<SocketAddr, String>, Vec<u8>) {
        let (mut near, mut far) = tokio::io::duplex(1024);
        near.write_all(client).await.expect("write");
        near.shutdown().await.expect("shutdown");
        let resolve = |name: &str| (name == "echo.default").then(|| "10.96.0.10".parse().ok())?;
        let got = accept(&mut far, resolve).await.map_err(|e| e.to_string());
        drop(far);
        let mut answer = Vec::new();
        near.read_to_end(&mut answer).await.expect("read");
        (got, answer)
    }

    const HELLO: [u8; 3] = [5, 1, 0];
    const CHOSEN: [u8; 2] = [5, 0];

    fn with_reply(code: u8) -> Vec<u8> {
        let mut v = CHOSEN.to_vec();
        v.extend([5, code, 0, 1, 0, 0, 0, 0, 0, 0]);
        v
    }

    async fn check(request: &[u8], want: Result<&str, &str>, answer: Vec<u8>) {
        let client = [&HELLO[..], request].concat();
        let (got, answered) = exchange(&client).await;
        match (&got, want) {
            (Ok(dst), Ok(w)) => assert_eq!(dst.to_string(), w, "{request:?}"),
            (Err(e), Err(w)) => assert!(e.contains(w), "{request:?}: {e} lacks {w:?}"),
            _ => panic!("{request:?}: got {got:?}, want {want:?}"),
        }
        assert_eq!(answered, answer, "{request:?}");
    }

    #[tokio::test]
    async fn connect_requests_name_the_destination() {
        let v4 = [5, 1, 0, 1, 127, 1, 2, 3, 0x1f, 0x90];
        check(&v4, Ok("127.1.2.3:8080"), with_reply(SUCCEEDED)).await;
        let mut v6 = vec![5, 1, 0, 4];
        v6.extend(Ipv6Addr::LOCALHOST.octets());
        v6.extend(80u16.to_be_bytes());
        check(&v6, Ok("[::1]:80"), with_reply(SUCCEEDED)).await;
        let mut name = vec![5, 1, 0, 3, 12];
        name.extend(b"echo.default");
        name.extend(80u16.to_be_bytes());
        check(&name, Ok("10.96.0.10:80"), with_reply(SUCCEEDED)).await;
    }

    #[tokio::test]
    async fn requests_other_than_connect_to_a_known_address_are_refused_with_a_reply() {
        let bind = [5, 2, 0, 1, 127, 0, 0, 1, 0, 80];
        check(&bind, Err("not CONNECT"), with_reply(COMMAND_NOT_SUPPORTED)).await;
        let atyp = [5, 1, 0, 9, 0, 0];
        check(
            &atyp,
            Err("address type"),
            with_reply(ADDRESS_TYPE_NOT_SUPPORTED),
        )
        .await;
        let mut name = vec![5, 1, 0, 3, 7];
        name.extend(b"nowhere");
        name.extend(80u16.to_be_bytes());
        check(
            &name,
            Err("not a name the mesh knows"),
            with_reply(HOST_UNREACHABLE),
        )
        .await;
    }

    #[tokio::test]
    async fn a_client_without_the_no_auth_method_or_socks5_is_turned_away() {
        let (got, answer) = exchange(&[5, 1, 2]).await;
        assert!(got.expect_err("user/password only").contains("no method"));
        assert_eq!(answer, [5, NO_ACCEPTABLE_METHOD]);
        let (got, answer) = exchange(b"GET / HTTP/1.1\r\n\r\n").await;
        assert!(got.expect_err("http").contains("version 71"));
        assert!(answer.is_empty());
        let (got, _) = exchange(&[5, 1]).await;
        assert!(got.expect_err("truncated").contains("handshake"));
    }

    /// Capture modes take the destination from the socket and never read a byte of the
    /// client's: a SOCKS5 greeting there is application data, not a request to the agent.
    #[tokio::test]
    async fn only_loopback_mode_speaks_socks5() {
        use crate::config::Redirect;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let model = Model::default();
        let request = [&HELLO[..], &[5, 1, 0, 1, 127, 9, 9, 9, 0, 80]].concat();
        for (redirect, want) in [
            (Redirect::Ebpf, addr),
            (Redirect::None, addr),
            (Redirect::Loopback, "127.9.9.9:80".parse().expect("addr")),
        ] {
            let mut client = tokio::net::TcpStream::connect(addr).await.expect("connect");
            client.write_all(&request).await.expect("write");
            let (mut tcp, _) = listener.accept().await.expect("accept");
            let got = crate::proxy::original_dst(&mut tcp, redirect, &model).await;
            assert_eq!(got, Ok(want), "{redirect:?}");
            if redirect != Redirect::Loopback {
                let mut left = vec![0; request.len()];
                tcp.read_exact(&mut left).await.expect("unread bytes");
                assert_eq!(
                    left, request,
                    "{redirect:?}: the agent read the client's bytes"
                );
            }
        }
    }

    #[test]
    fn names_resolve_to_service_vips() {
        let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: echo, namespace: default}\n\
                    spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";
        let model = mesh_model::k8s::load_docs(&[("svc.yaml".into(), yaml.into())]).expect("model");
        let vip: IpAddr = "10.96.0.10".parse().expect("ip");
        for name in [
            "echo.default",
            "echo.default.svc",
            "echo.default.svc.cluster.local",
            "echo.default.svc.cluster.local.",
        ] {
            assert_eq!(resolve(&model, name), Some(vip), "{name}");
        }
        assert_eq!(resolve(&model, "127.0.0.9"), "127.0.0.9".parse().ok());
        assert_eq!(resolve(&model, "echo"), None);
        assert_eq!(resolve(&model, "other.default"), None);
    }
}
