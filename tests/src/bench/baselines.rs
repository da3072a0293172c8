//! Configurations of the established proxies the mesh is compared with, and of the nginx
//! that serves HTTP in the server pod. Pure text rendering (unit-tested); `run` writes the
//! files and starts the processes.
//!
//! - haproxy pair (L4 baseline): on node 1, `mode tcp` frontends on the application ports
//!   whose backends speak TLS 1.3 with a client certificate to node 2; on node 2, TLS
//!   frontends (client certificate required) whose backends are the server pod's ports.
//! - nginx HTTP reverse proxy (L7 baseline) on node 1, keep-alive upstream pool.
//! - nginx origin in the server pod: `return 200 "ok\n"`, over HTTP/1.1 and over h2c (HTTP/2
//!   with prior knowledge, on its own port).

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::Path;

/// Offset from an application port to the port the node-2 haproxy terminates TLS on.
pub const TLS_PORT_OFFSET: u16 = 10_000;
/// The DNS name in the node-2 haproxy's certificate, checked by the node-1 haproxy.
pub const TUNNEL_SERVER_NAME: &str = "tunnel.bench.internal";
/// The origin's reply body.
pub const ORIGIN_BODY: &str = "ok\n";

/// Files the haproxy pair needs (PEM).
#[derive(Clone, Copy, Debug)]
pub struct TunnelPki<'a> {
    pub ca: &'a Path,
    /// Certificate followed by its private key, as haproxy's `crt` wants it.
    pub client_crt: &'a Path,
    pub server_crt: &'a Path,
}

fn haproxy_global(out: &mut String, maxconn: u32) {
    let _ = writeln!(
        out,
        "global\n\
         \x20   maxconn {maxconn}\n\
         \x20   ssl-default-bind-options ssl-min-ver TLSv1.3\n\
         \x20   ssl-default-server-options ssl-min-ver TLSv1.3\n\
         \x20   ssl-default-bind-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384\n\
         \x20   ssl-default-server-ciphersuites TLS_AES_128_GCM_SHA256:TLS_AES_256_GCM_SHA384\n\
         \x20   log stderr format raw local0 err\n\
         \n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   maxconn {maxconn}\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 30m\n\
         \x20   timeout server 30m\n"
    );
}

/// haproxy on node 1: for each application port, plain TCP in on `0.0.0.0:<port>`, TLS out
/// to `<peer>:<port + TLS_PORT_OFFSET>`.
pub fn haproxy_client_side(
    ports: &[u16],
    peer: Ipv4Addr,
    pki: TunnelPki<'_>,
    maxconn: u32,
) -> String {
    let mut out = String::new();
    haproxy_global(&mut out, maxconn);
    for &port in ports {
        let tls_port = port + TLS_PORT_OFFSET;
        let _ = writeln!(
            out,
            "frontend in_{port}\n\
             \x20   bind 0.0.0.0:{port}\n\
             \x20   default_backend out_{port}\n\
             \n\
             backend out_{port}\n\
             \x20   server peer {peer}:{tls_port} ssl crt {crt} ca-file {ca} verify required verifyhost {TUNNEL_SERVER_NAME} sni str({TUNNEL_SERVER_NAME})\n",
            crt = pki.client_crt.display(),
            ca = pki.ca.display(),
        );
    }
    out
}

/// haproxy on node 2: TLS in on `<listen>:<port + TLS_PORT_OFFSET>` (client certificate
/// required), plain TCP out to `<app>:<port>`.
pub fn haproxy_server_side(
    ports: &[u16],
    listen: Ipv4Addr,
    app: Ipv4Addr,
    pki: TunnelPki<'_>,
    maxconn: u32,
) -> String {
    let mut out = String::new();
    haproxy_global(&mut out, maxconn);
    for &port in ports {
        let tls_port = port + TLS_PORT_OFFSET;
        let _ = writeln!(
            out,
            "frontend tls_{port}\n\
             \x20   bind {listen}:{tls_port} ssl crt {crt} ca-file {ca} verify required\n\
             \x20   default_backend app_{port}\n\
             \n\
             backend app_{port}\n\
             \x20   server app {app}:{port}\n",
            crt = pki.server_crt.display(),
            ca = pki.ca.display(),
        );
    }
    out
}

/// The parts of an nginx configuration every instance shares: foreground, files under
/// `dir`, no access log, many connections, long keep-alive.
fn nginx_common(out: &mut String, dir: &Path, workers: &str, max_conns: u32) {
    let d = dir.display();
    let _ = writeln!(
        out,
        "daemon off;\n\
         master_process on;\n\
         worker_processes {workers};\n\
         worker_rlimit_nofile {max_conns};\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections {max_conns}; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {d}/body;\n\
         \x20   proxy_temp_path {d}/proxy;\n\
         \x20   fastcgi_temp_path {d}/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/uwsgi;\n\
         \x20   scgi_temp_path {d}/scgi;\n\
         \x20   keepalive_requests 10000000;\n\
         \x20   keepalive_timeout 30m;\n\
         \x20   client_header_timeout 30m;",
    );
}

/// The HTTP origin in the server pod: every request gets `200` with [`ORIGIN_BODY`]:
/// HTTP/1.1 on `port`, h2c (prior knowledge: nginx's `listen ... http2` without TLS) on
/// `h2c_port`.
pub fn nginx_origin(port: u16, h2c_port: u16, dir: &Path, max_conns: u32) -> String {
    let mut out = String::new();
    nginx_common(&mut out, dir, "auto", max_conns);
    let _ = writeln!(
        out,
        "    server {{\n\
         \x20       listen {port} reuseport;\n\
         \x20       listen {h2c_port} http2 reuseport;\n\
         \x20       location / {{ default_type text/plain; return 200 \"ok\\n\"; }}\n\
         \x20   }}\n\
         }}"
    );
    out
}

/// The L7 baseline: an HTTP/1.1 reverse proxy on `0.0.0.0:<port>` to `upstream`, with a
/// keep-alive connection pool (as a waypoint keeps its upstream connections).
pub fn nginx_proxy(port: u16, upstream: SocketAddrV4, dir: &Path, max_conns: u32) -> String {
    let mut out = String::new();
    nginx_common(&mut out, dir, "auto", max_conns);
    let _ = writeln!(
        out,
        "    upstream origin {{ server {upstream}; keepalive 64; keepalive_requests 10000000; }}\n\
         \x20   server {{\n\
         \x20       listen {port} reuseport;\n\
         \x20       location / {{\n\
         \x20           proxy_pass http://origin;\n\
         \x20           proxy_http_version 1.1;\n\
         \x20           proxy_set_header Connection \"\";\n\
         \x20           proxy_buffering off;\n\
         \x20       }}\n\
         \x20   }}\n\
         }}"
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pki() -> TunnelPki<'static> {
        TunnelPki {
            ca: Path::new("/p/ca.pem"),
            client_crt: Path::new("/p/client.pem"),
            server_crt: Path::new("/p/server.pem"),
        }
    }

    #[test]
    fn the_haproxy_pair_tunnels_each_port_over_verified_tls() {
        let peer = Ipv4Addr::new(10, 255, 0, 2);
        let client = haproxy_client_side(&[5201, 9000], peer, pki(), 9_000);
        assert!(client.contains("bind 0.0.0.0:5201\n"));
        assert!(client.contains(
            "server peer 10.255.0.2:15201 ssl crt /p/client.pem ca-file /p/ca.pem verify required verifyhost tunnel.bench.internal"
        ));
        assert!(client.contains("10.255.0.2:19000"));
        assert!(client.contains("ssl-min-ver TLSv1.3"));
        assert!(client.contains("mode tcp"));
        assert!(client.contains("    maxconn 9000\n"));

        let server = haproxy_server_side(&[5201], peer, Ipv4Addr::new(10, 244, 2, 2), pki(), 9_000);
        assert!(server.contains(
            "bind 10.255.0.2:15201 ssl crt /p/server.pem ca-file /p/ca.pem verify required\n"
        ));
        assert!(server.contains("server app 10.244.2.2:5201\n"));
        assert!(!server.contains("19000"));
    }

    #[test]
    fn nginx_runs_in_the_foreground_with_files_in_its_directory() {
        let dir = Path::new("/w/nginx");
        let origin = nginx_origin(8080, 8082, dir, 20_000);
        assert!(origin.starts_with("daemon off;\n"));
        assert!(origin.contains("pid /w/nginx/nginx.pid;"));
        assert!(origin.contains("listen 8080 reuseport;"));
        assert!(origin.contains("listen 8082 http2 reuseport;"));
        assert!(origin.contains("worker_connections 20000;"));
        assert!(origin.contains("return 200 \"ok\\n\";"));
        // Balanced braces: nginx refuses the file otherwise.
        for conf in [
            origin,
            nginx_proxy(8081, "10.244.2.2:8080".parse().expect("addr"), dir, 100),
        ] {
            assert_eq!(
                conf.matches('{').count(),
                conf.matches('}').count(),
                "{conf}"
            );
        }
        let proxy = nginx_proxy(8081, "10.244.2.2:8080".parse().expect("addr"), dir, 100);
        assert!(proxy.contains("upstream origin { server 10.244.2.2:8080; keepalive 64;"));
        assert!(proxy.contains("proxy_set_header Connection \"\";"));
    }
}
