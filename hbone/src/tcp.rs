//! TCP options on every socket the mesh opens or accepts, so that a peer that vanished
//! (node gone, cable pulled: no FIN, no RST) is noticed and its connection reaped instead of
//! holding a descriptor and its buffers forever (RELIABILITY 37).
//!
//! - Keepalive: after [`DEFAULT_KEEPALIVE_IDLE`] without traffic, a probe every
//!   [`DEFAULT_KEEPALIVE_INTERVAL`]; [`DEFAULT_KEEPALIVE_PROBES`] unanswered probes end the
//!   connection. 60 s + 6 × 10 s = 2 min for an idle connection to a dead peer (Istio's
//!   ztunnel uses 180 s + 9 × 20 s = 6 min; we prefer a shorter bound on held memory, and
//!   one probe per minute per idle connection costs nothing).
//! - `TCP_USER_TIMEOUT` [`DEFAULT_USER_TIMEOUT`]: data sent and not acknowledged for this
//!   long ends the connection (keepalive only covers idle ones). Equal to the keepalive
//!   bound, so that both paths reap a dead peer within the same 2 min (on Linux the user
//!   timeout also caps the keepalive probes).

use std::io;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};

pub const DEFAULT_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_KEEPALIVE_PROBES: u32 = 6;
pub const DEFAULT_USER_TIMEOUT: Duration = Duration::from_secs(120);

/// Keepalive and user timeout for one socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Keepalive {
    /// Idle time before the first probe.
    pub idle: Duration,
    /// Time between probes.
    pub interval: Duration,
    /// Unanswered probes before the connection is dropped.
    pub probes: u32,
    /// Unacknowledged data for this long drops the connection (`TCP_USER_TIMEOUT`).
    pub user_timeout: Duration,
}

impl Default for Keepalive {
    fn default() -> Self {
        Keepalive {
            idle: DEFAULT_KEEPALIVE_IDLE,
            interval: DEFAULT_KEEPALIVE_INTERVAL,
            probes: DEFAULT_KEEPALIVE_PROBES,
            user_timeout: DEFAULT_USER_TIMEOUT,
        }
    }
}

impl Keepalive {
    /// Sets the options on `sock` (a `TcpStream`, tokio's or std's, or a `socket2::Socket`).
    pub fn apply<'s>(&self, sock: impl Into<SockRef<'s>>) -> io::Result<()> {
        let sock = sock.into();
        let ka = TcpKeepalive::new()
            .with_time(self.idle)
            .with_interval(self.interval)
            .with_retries(self.probes);
        sock.set_tcp_keepalive(&ka)?;
        sock.set_tcp_user_timeout(Some(self.user_timeout))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the kernel holds for `sock`, read back with getsockopt.
    fn read_back(sock: SockRef<'_>) -> (bool, Keepalive) {
        let ka = Keepalive {
            idle: sock.keepalive_time().expect("TCP_KEEPIDLE"),
            interval: sock.keepalive_interval().expect("TCP_KEEPINTVL"),
            probes: sock.keepalive_retries().expect("TCP_KEEPCNT"),
            user_timeout: sock
                .tcp_user_timeout()
                .expect("TCP_USER_TIMEOUT")
                .unwrap_or_default(),
        };
        (sock.keepalive().expect("SO_KEEPALIVE"), ka)
    }

    #[tokio::test]
    async fn both_ends_of_a_real_connection_carry_the_options() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let client = tokio::net::TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let (on, _) = read_back(SockRef::from(&server));
        assert!(!on, "off until set");
        let chosen = Keepalive {
            idle: Duration::from_secs(7),
            interval: Duration::from_secs(3),
            probes: 4,
            user_timeout: Duration::from_millis(19_000),
        };
        chosen.apply(&server).expect("server");
        Keepalive::default().apply(&client).expect("client");
        assert_eq!(read_back(SockRef::from(&server)), (true, chosen));
        let (on, ka) = read_back(SockRef::from(&client));
        assert!(on);
        assert_eq!(ka, Keepalive::default());
        assert_eq!(ka.user_timeout, Duration::from_secs(120));
    }
}
