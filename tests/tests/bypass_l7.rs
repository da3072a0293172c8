//! L7 policy bypass attempts, end to end: a client pod writes raw bytes (HTTP/1.1 by hand,
//! HTTP/2 with the `h2` crate, which sends what it is given) to a Service that uses a
//! waypoint; capture, the node agent and HBONE carry them unchanged to the waypoint, which
//! must decide on exactly what the backend would receive. Every case asserts both the
//! client's answer and what the backend (mesh-echo) saw: the request it echoed, or — for a
//! refused request — that its request count did not move.
//!
//! RELIABILITY numbers covered:
//! - 22 (one authority): [`absolute_form_authority_wins_over_host`],
//!   [`several_or_invalid_host_headers_are_refused`],
//!   [`h2_authority_and_a_disagreeing_host_are_refused`];
//! - 23 (methods): [`case_variants_of_methods_are_refused_on_http1_and_http2`];
//! - 25 (framing, CRLF): [`ambiguous_body_framing_is_refused`],
//!   [`malformed_header_lines_are_refused`];
//! - 21 (paths): [`fragments_and_backslashes_never_reach_the_backend_unseen`],
//!   [`encoded_separators_and_dot_segments_meet_the_path_policy`];
//! - 24 (repeated headers): [`every_value_of_a_repeated_header_meets_the_policy`];
//! - 26 (internal headers): [`internal_control_headers_from_the_client_are_stripped`];
//! - 20 (source address): [`forged_forwarded_headers_do_not_change_the_source_address`].

use std::io::{BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use e2e::http::{read_response, HttpResponse};
use e2e::waypoint::{log_tail, waypoint_mesh, waypoint_service, CLIENT};
use e2e::{scenarios, ChildGuard, Mesh, Pod, Suite};
use serde_json::Value;

const ECHO_VIP: &str = "10.96.0.40";
/// The echo Service's name as a client writes it in an absolute-form target.
const ECHO_FQDN: &str = "echo.default.svc.cluster.local";
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// The DENYs every case tries to get around, all on the `echo` Service: a host, a path
/// prefix, a method, a header value, and three source-address rules scoped to paths: the
/// pods' own network (proves `ipBlocks` sees the real address), and `notIpBlocks` /
/// `notRemoteIpBlocks` of an address range no pod has (a forged header naming it must not
/// open the path).
const POLICIES: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bypass-guards, namespace: default}
spec:
  targetRefs: [{kind: Service, group: "", name: echo}]
  action: DENY
  rules:
  - to: [{operation: {hosts: ["secret.internal"]}}]
  - to: [{operation: {paths: ["/admin*"]}}]
  - to: [{operation: {methods: ["DELETE"]}}]
  - when: [{key: "request.headers[x-user]", values: ["admin"]}]
  - from: [{source: {ipBlocks: ["10.244.0.0/16"]}}]
    to: [{operation: {paths: ["/not-from-pods*"]}}]
  - from: [{source: {notIpBlocks: ["10.99.0.0/16"]}}]
    to: [{operation: {paths: ["/ip-only*"]}}]
  - from: [{source: {notRemoteIpBlocks: ["10.99.0.0/16"]}}]
    to: [{operation: {paths: ["/remote-only*"]}}]
"#;

fn mesh(test: &str) -> Result<Mesh> {
    waypoint_mesh(test)
        .pod(Pod::echo_server("server", "n2"))
        .service(waypoint_service("echo", ECHO_VIP, ("app", "echo")))
        .yaml("bypass.yaml", POLICIES)
        .build()
}

/// The mesh, its one echo server and the waypoint.
struct Bypass {
    wp: ChildGuard,
    _server: ChildGuard,
    /// Last: dropped once the processes in it are gone.
    mesh: Mesh,
}

impl Bypass {
    fn build() -> Result<Self> {
        let mesh = mesh("bypass_l7")?;
        let server = mesh.spawn_echo("default/server", 8080, "server")?;
        let wp = mesh.spawn_default_waypoint()?;
        Ok(Bypass {
            wp,
            _server: server,
            mesh,
        })
    }

    fn echo_addr() -> Result<SocketAddr> {
        Ok(format!("{ECHO_VIP}:80").parse()?)
    }

    /// Writes `raw` (a whole HTTP/1.1 request, or several) on a new connection from the
    /// client pod and reads one response.
    fn raw(&self, raw: &[u8]) -> Result<HttpResponse> {
        let mut tcp = self.mesh.connect(CLIENT, Self::echo_addr()?)?;
        tcp.write_all(raw).context("send the raw request")?;
        read_response(&mut BufReader::new(tcp))
            .with_context(|| format!("response to {:?}", String::from_utf8_lossy(raw)))
    }

    /// How many requests the echo server has received so far (`GET /_requests`, itself not
    /// counted, through the waypoint).
    fn backend_total(&self) -> Result<u64> {
        let r = self.raw(b"GET /_requests HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n")?;
        anyhow::ensure!(r.status == 200, "/_requests: {} {}", r.status, r.text());
        r.json()?["total"].as_u64().context("total")
    }

    /// `raw` must be answered `status` and never reach the backend.
    fn refused(&self, raw: &str, status: u16) -> Result<()> {
        let before = self.backend_total()?;
        let r = self.raw(raw.as_bytes())?;
        if r.status != status {
            bail!("{raw:?}: expected {status}, got {} {}", r.status, r.text());
        }
        let after = self.backend_total()?;
        if after != before {
            bail!("{raw:?}: answered {status}, yet the backend received it");
        }
        Ok(())
    }

    /// `raw` must be answered 200 by the backend: the request it saw.
    fn forwarded(&self, raw: &str) -> Result<Value> {
        let r = self.raw(raw.as_bytes())?;
        if r.status != 200 {
            bail!("{raw:?}: expected 200, got {} {}", r.status, r.text());
        }
        r.json()
    }

    /// One HTTP/2 request (h2c, prior knowledge) from the client pod: `method` on
    /// `http://<authority><path>` with an optional `host` header; status and body.
    fn h2(
        &self,
        method: &str,
        authority: &str,
        host: Option<&str>,
        path: &str,
    ) -> Result<(u16, Vec<u8>)> {
        let tcp = self.mesh.connect(CLIENT, Self::echo_addr()?)?;
        tcp.set_nonblocking(true)?;
        let mut req = http::Request::builder()
            .method(http::Method::from_bytes(method.as_bytes())?)
            .uri(format!("http://{authority}{path}"));
        if let Some(h) = host {
            req = req.header("host", h);
        }
        let req = req.body(())?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let tcp = tokio::net::TcpStream::from_std(tcp)?;
            let (mut client, conn) = h2::client::handshake(tcp).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let (rsp, _) = client.send_request(req, true)?;
            let rsp = tokio::time::timeout(IO_TIMEOUT, rsp)
                .await
                .context("no HTTP/2 response in time")??;
            let status = rsp.status().as_u16();
            let mut body = rsp.into_body();
            let mut bytes = Vec::new();
            while let Some(chunk) = tokio::time::timeout(IO_TIMEOUT, body.data())
                .await
                .context("body")?
            {
                let chunk = chunk?;
                let _ = body.flow_control().release_capacity(chunk.len());
                bytes.extend_from_slice(&chunk);
            }
            Ok((status, bytes))
        })
    }

    /// An HTTP/2 request that must be answered `status` and never reach the backend.
    fn h2_refused(
        &self,
        method: &str,
        authority: &str,
        host: Option<&str>,
        status: u16,
    ) -> Result<()> {
        let before = self.backend_total()?;
        let (got, body) = self.h2(method, authority, host, "/h2")?;
        let what = format!("h2 {method} :authority {authority} host {host:?}");
        if got != status {
            bail!(
                "{what}: expected {status}, got {got} {}",
                String::from_utf8_lossy(&body)
            );
        }
        if self.backend_total()? != before {
            bail!("{what}: answered {status}, yet the backend received it");
        }
        Ok(())
    }
}

impl Suite for Bypass {
    fn explain(&self, err: anyhow::Error) -> anyhow::Error {
        log_tail(&self.wp, err)
    }
}

fn main() -> ExitCode {
    e2e::scenario::main(
        Bypass::build,
        &scenarios![
            absolute_form_authority_wins_over_host,
            several_or_invalid_host_headers_are_refused,
            h2_authority_and_a_disagreeing_host_are_refused,
            case_variants_of_methods_are_refused_on_http1_and_http2,
            ambiguous_body_framing_is_refused,
            malformed_header_lines_are_refused,
            fragments_and_backslashes_never_reach_the_backend_unseen,
            encoded_separators_and_dot_segments_meet_the_path_policy,
            every_value_of_a_repeated_header_meets_the_policy,
            internal_control_headers_from_the_client_are_stripped,
            forged_forwarded_headers_do_not_change_the_source_address,
        ],
        &[],
    )
}

fn host_seen(reply: &Value) -> Result<String> {
    Ok(reply["headers"]["host"]
        .as_str()
        .context("the backend saw no host")?
        .to_string())
}

/// RELIABILITY 22: the DENY on host `secret.internal` holds whichever way the client names
/// it, and the backend receives the authority policy decided on — never the other one.
fn absolute_form_authority_wins_over_host(b: &mut Bypass) -> Result<()> {
    b.refused(
        "GET /abs HTTP/1.1\r\nhost: secret.internal\r\nconnection: close\r\n\r\n",
        403,
    )?;
    b.refused(
        "GET /abs HTTP/1.1\r\nhost: Secret.Internal:80\r\nconnection: close\r\n\r\n",
        403,
    )?;
    b.refused(
        "GET http://secret.internal/abs HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n",
        403,
    )?;
    // The issue's bypass: absolute form names the Service, Host the denied name. The target
    // wins (RFC 9112 §3.2.2): allowed, and the backend sees the target's authority.
    let seen = b.forwarded(&format!(
        "GET http://{ECHO_FQDN}/abs HTTP/1.1\r\nhost: secret.internal\r\nconnection: close\r\n\r\n"
    ))?;
    assert_eq!(host_seen(&seen)?, ECHO_FQDN, "{seen}");
    assert_eq!(seen["path"], "/abs", "{seen}");
    // Origin form: Host is the authority, and goes on unchanged.
    let seen = b.forwarded("GET /plain HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n")?;
    assert_eq!(host_seen(&seen)?, "echo", "{seen}");
    Ok(())
}

/// RELIABILITY 22: a request with two Host headers, or one that is not an authority, has
/// no one authority: 400.
fn several_or_invalid_host_headers_are_refused(b: &mut Bypass) -> Result<()> {
    for raw in [
        "GET /h HTTP/1.1\r\nhost: echo\r\nhost: secret.internal\r\nconnection: close\r\n\r\n",
        "GET /h HTTP/1.1\r\nhost: echo\r\nhost: echo\r\nconnection: close\r\n\r\n",
        "GET /h HTTP/1.1\r\nhost: user@secret.internal\r\nconnection: close\r\n\r\n",
        "GET /h HTTP/1.1\r\nhost: echo secret.internal\r\nconnection: close\r\n\r\n",
        "GET /h HTTP/1.1\r\nhost: echo:port\r\nconnection: close\r\n\r\n",
        "GET http://echo/h HTTP/1.1\r\nhost: a/b\r\nconnection: close\r\n\r\n",
    ] {
        b.refused(raw, 400)?;
    }
    Ok(())
}

/// RELIABILITY 22: HTTP/2 — `:authority` is the authority; a `host` header that disagrees
/// is refused, one that agrees passes and the backend sees that authority.
fn h2_authority_and_a_disagreeing_host_are_refused(b: &mut Bypass) -> Result<()> {
    b.h2_refused("GET", "echo", Some("secret.internal"), 400)?;
    b.h2_refused("GET", "secret.internal", Some("echo"), 400)?;
    b.h2_refused("GET", "secret.internal", None, 403)?;
    b.h2_refused("GET", "SECRET.internal:80", None, 403)?;
    for host in [None, Some("echo"), Some("ECHO")] {
        let (status, body) = b.h2("GET", "echo", host, "/h2")?;
        let text = String::from_utf8_lossy(&body);
        assert_eq!(status, 200, "host {host:?}: {text}");
        let seen: Value = serde_json::from_slice(&body).context("echo reply")?;
        assert_eq!(host_seen(&seen)?, "echo", "host {host:?}: {seen}");
    }
    Ok(())
}

/// RELIABILITY 23: methods are case-sensitive tokens and the DENY names `DELETE`; `delete`
/// or `Delete` (which a backend might read as DELETE) is refused before policy on both
/// protocols, and nothing reaches the backend.
fn case_variants_of_methods_are_refused_on_http1_and_http2(b: &mut Bypass) -> Result<()> {
    b.refused(
        "DELETE /m HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n",
        403,
    )?;
    for m in ["delete", "Delete", "get"] {
        b.refused(
            &format!("{m} /m HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n"),
            400,
        )?;
        b.h2_refused(m, "echo", None, 400)?;
    }
    b.h2_refused("DELETE", "echo", None, 403)?;
    let seen = b.forwarded("GET /m HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n")?;
    assert_eq!(seen["method"], "GET", "{seen}");
    Ok(())
}

/// RELIABILITY 25: a body whose length two parsers could disagree on is refused, whether
/// hyper refuses it itself or the downstream phase does.
fn ambiguous_body_framing_is_refused(b: &mut Bypass) -> Result<()> {
    for raw in [
        // Two different lengths, or a list.
        "POST /f HTTP/1.1\r\nhost: echo\r\ncontent-length: 5\r\ncontent-length: 6\r\nconnection: close\r\n\r\nhello!",
        "POST /f HTTP/1.1\r\nhost: echo\r\ncontent-length: 5, 5\r\nconnection: close\r\n\r\nhello",
        // Encodings other than exactly `chunked`.
        "POST /f HTTP/1.1\r\nhost: echo\r\ntransfer-encoding: gzip, chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "POST /f HTTP/1.1\r\nhost: echo\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        "POST /f HTTP/1.1\r\nhost: echo\r\ntransfer-encoding: identity\r\nconnection: close\r\n\r\nhello",
        // An absurd chunk size (the body is read before anything goes upstream).
        "POST /f HTTP/1.1\r\nhost: echo\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\nfffffffffffffffff\r\nhello\r\n0\r\n\r\n",
    ] {
        b.refused(raw, 400)?;
    }
    // Plain chunked passes, re-framed by the waypoint: the backend gets the 5 bytes.
    let seen = b.forwarded(
        "POST /f HTTP/1.1\r\nhost: echo\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )?;
    assert_eq!(seen["body_bytes"], 5, "{seen}");
    // Two equal lengths: hyper keeps one before the waypoint sees the head (RFC 9110 §8.6
    // allows it), so nothing ambiguous goes on: the backend gets one length and its bytes.
    let seen = b.forwarded(
        "POST /f HTTP/1.1\r\nhost: echo\r\ncontent-length: 5\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
    )?;
    assert_eq!(seen["headers"]["content-length"], "5", "{seen}");
    assert_eq!(seen["body_bytes"], 5, "{seen}");
    // Chunked and a length: hyper drops the length, reads the body as chunked and closes
    // the connection after answering (RFC 9112 §6.1), so no second request can hide in a
    // body read the other way; the backend gets the chunked body alone.
    let mut tcp = b.mesh.connect(CLIENT, Bypass::echo_addr()?)?;
    tcp.write_all(
        b"POST /f HTTP/1.1\r\nhost: echo\r\ntransfer-encoding: chunked\r\ncontent-length: 5\r\n\r\n\
          5\r\nhello\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nhost: echo\r\n\r\n",
    )?;
    let mut reader = BufReader::new(tcp);
    let r = read_response(&mut reader)?;
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = r.json()?;
    assert!(seen["headers"].get("content-length").is_none(), "{seen}");
    assert_eq!(seen["body_bytes"], 5, "{seen}");
    let mut rest = Vec::new();
    reader
        .read_to_end(&mut rest)
        .context("the connection is closed after the response")?;
    assert!(
        rest.is_empty(),
        "nothing after the first response: {:?}",
        String::from_utf8_lossy(&rest)
    );
    Ok(())
}

/// RELIABILITY 25: header lines a lenient parser would read differently: obs-fold,
/// whitespace before the colon, NUL, bare CR or LF inside a value.
fn malformed_header_lines_are_refused(b: &mut Bypass) -> Result<()> {
    for raw in [
        "GET /h HTTP/1.1\r\nhost: echo\r\nx-user: bob\r\n admin\r\nconnection: close\r\n\r\n",
        "GET /h HTTP/1.1\r\nhost: echo\r\nx-user: bob\r\n\tadmin\r\nconnection: close\r\n\r\n",
        "GET /h HTTP/1.1\r\nhost : secret.internal\r\nhost: echo\r\nconnection: close\r\n\r\n",
        "GET /h HTTP/1.1\r\nhost: echo\r\nx-user : admin\r\nconnection: close\r\n\r\n",
        "GET /h HTTP/1.1\r\nhost: echo\r\nx-user: bob\0admin\r\nconnection: close\r\n\r\n",
        "GET /h HTTP/1.1\r\nhost: echo\r\nx-user: bob\radmin\r\nconnection: close\r\n\r\n",
        "GET /h HTTP/1.1\r\nhost: echo\nx-user: admin\r\nconnection: close\r\n\r\n",
    ] {
        // A bare LF ends a line for hyper: that last request carries `x-user: admin` as a
        // header of its own, which the DENY refuses (403) — what matters is that it never
        // reaches the backend.
        let status = if raw.contains("echo\nx-user") {
            403
        } else {
            400
        };
        b.refused(raw, status)?;
    }
    Ok(())
}

/// RELIABILITY 21: a `#fragment` is cut off before policy and the upstream both, so they
/// see one path; a `\` in the path is refused.
fn fragments_and_backslashes_never_reach_the_backend_unseen(b: &mut Bypass) -> Result<()> {
    b.refused(
        "GET /admin#x HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n",
        403,
    )?;
    let seen =
        b.forwarded("GET /public#/../admin HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n")?;
    assert_eq!(seen["path"], "/public", "{seen}");
    for target in ["/public\\..\\admin", "\\admin", "/public\\x"] {
        b.refused(
            &format!("GET {target} HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n"),
            400,
        )?;
    }
    Ok(())
}

/// RELIABILITY 21: encoded separators are refused; dot segments and doubled slashes are
/// resolved once, before the path policy, and the backend gets that same path.
fn encoded_separators_and_dot_segments_meet_the_path_policy(b: &mut Bypass) -> Result<()> {
    for target in [
        "/admin%2Fx",
        "/public%2F..%2Fadmin",
        "/public%5C..%5Cadmin",
        "/a%2fb",
    ] {
        b.refused(
            &format!("GET {target} HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n"),
            400,
        )?;
    }
    for target in [
        "/public/../admin",
        "/public/%2e%2e/admin",
        "//admin",
        "/./admin/x",
    ] {
        b.refused(
            &format!("GET {target} HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n"),
            403,
        )?;
    }
    let seen = b.forwarded(
        "GET /public/./a/../b//c?q=1 HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n",
    )?;
    assert_eq!(seen["path"], "/public/b/c?q=1", "{seen}");
    Ok(())
}

/// RELIABILITY 24: the DENY on `x-user: admin` sees every value of a repeated header.
fn every_value_of_a_repeated_header_meets_the_policy(b: &mut Bypass) -> Result<()> {
    b.refused(
        "GET /u HTTP/1.1\r\nhost: echo\r\nx-user: bob\r\nx-user: admin\r\nconnection: close\r\n\r\n",
        403,
    )?;
    b.refused(
        "GET /u HTTP/1.1\r\nhost: echo\r\nx-user: admin\r\nx-user: bob\r\nconnection: close\r\n\r\n",
        403,
    )?;
    let seen = b.forwarded(
        "GET /u HTTP/1.1\r\nhost: echo\r\nx-user: bob\r\nx-user: carol\r\nconnection: close\r\n\r\n",
    )?;
    assert_eq!(seen["headers"]["x-user"], "bob, carol", "{seen}");
    Ok(())
}

/// RELIABILITY 26: retry/timeout overrides and identity headers a client sets never reach
/// the backend.
fn internal_control_headers_from_the_client_are_stripped(b: &mut Bypass) -> Result<()> {
    let seen = b.forwarded(
        "GET /i HTTP/1.1\r\nhost: echo\r\nx-envoy-retry-on: 5xx\r\nx-envoy-upstream-rq-timeout-ms: 1\r\n\
         x-envoy-original-path: /admin\r\nx-istio-attributes: x\r\n\
         x-forwarded-client-cert: By=spiffe://cluster.local/ns/default/sa/admin\r\nx-kept: 1\r\n\
         connection: close\r\n\r\n",
    )?;
    let headers = seen["headers"].as_object().context("headers")?;
    for name in [
        "x-envoy-retry-on",
        "x-envoy-upstream-rq-timeout-ms",
        "x-envoy-original-path",
        "x-istio-attributes",
        "x-forwarded-client-cert",
    ] {
        assert!(
            !headers.contains_key(name),
            "{name} reached the backend: {seen}"
        );
    }
    assert_eq!(seen["headers"]["x-kept"], "1", "{seen}");
    Ok(())
}

/// RELIABILITY 20: `ipBlocks` is evaluated on the address the mesh carried (the client
/// pod's), and with no trusted proxy (the default) `remoteIpBlocks` too: a forged
/// `x-forwarded-for` / `forwarded` naming an allowed range opens nothing.
fn forged_forwarded_headers_do_not_change_the_source_address(b: &mut Bypass) -> Result<()> {
    const FORGED: &str = "x-forwarded-for: 10.99.0.1\r\nforwarded: for=10.99.0.1\r\n\
                          x-real-ip: 10.99.0.1\r\nx-envoy-external-address: 10.99.0.1\r\n";
    // The pods' network is denied /not-from-pods: the real address is what policy sees,
    // whatever the headers claim.
    b.refused(
        &format!("GET /not-from-pods HTTP/1.1\r\nhost: echo\r\n{FORGED}connection: close\r\n\r\n"),
        403,
    )?;
    for path in ["/ip-only", "/remote-only"] {
        b.refused(
            &format!("GET {path} HTTP/1.1\r\nhost: echo\r\nconnection: close\r\n\r\n"),
            403,
        )?;
        b.refused(
            &format!("GET {path} HTTP/1.1\r\nhost: echo\r\n{FORGED}connection: close\r\n\r\n"),
            403,
        )?;
    }
    // Paths no source rule guards pass with the same headers.
    let seen = b.forwarded(&format!(
        "GET /public HTTP/1.1\r\nhost: echo\r\n{FORGED}connection: close\r\n\r\n"
    ))?;
    assert_eq!(seen["path"], "/public", "{seen}");
    Ok(())
}
