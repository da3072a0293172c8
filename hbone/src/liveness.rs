//! [`Liveness`]: HTTP/2 PINGs that tell a live peer from a dead one (RELIABILITY 37: a
//! vanished node or a peer that stopped reading leaves a connection that TCP alone may keep
//! for many minutes). Used by both the client pool and the server.

use std::time::Duration;

use h2::{Ping, PingPong};
use tokio::time::Instant;

use super::HboneError;

/// Sends a PING every `interval` (after the last answer) and expects its answer within
/// `timeout`.
pub(crate) struct Liveness {
    pings: Option<PingPong>,
    interval: Option<Duration>,
    timeout: Duration,
    next: Instant,
    /// Deadline of the PING in flight.
    awaiting: Option<Instant>,
}

impl Liveness {
    /// `pings` is the connection's `ping_pong()` handle; `None` or no `interval` disables it.
    pub(crate) fn new(
        pings: Option<PingPong>,
        interval: Option<Duration>,
        timeout: Duration,
    ) -> Self {
        let next = Instant::now() + interval.unwrap_or_default();
        Liveness {
            pings,
            interval,
            timeout,
            next,
            awaiting: None,
        }
    }

    /// One step: sends a PING when one is due, or waits for the answer. `Ok` after each
    /// step, `Err(PingTimeout)` when the answer did not come in time; never resolves when
    /// disabled. Cancel-safe, so it can sit in a `select!` next to the connection.
    pub(crate) async fn check(&mut self) -> Result<(), HboneError> {
        let (Some(pings), Some(interval)) = (self.pings.as_mut(), self.interval) else {
            return std::future::pending().await;
        };
        match self.awaiting {
            None => {
                tokio::time::sleep_until(self.next).await;
                pings.send_ping(Ping::opaque())?;
                self.awaiting = Some(Instant::now() + self.timeout);
                Ok(())
            }
            Some(deadline) => {
                let pong = std::future::poll_fn(|cx| pings.poll_pong(cx));
                match tokio::time::timeout_at(deadline, pong).await {
                    Ok(res) => {
                        res?;
                        self.awaiting = None;
                        self.next = Instant::now() + interval;
                        Ok(())
                    }
                    Err(_) => Err(HboneError::PingTimeout),
                }
            }
        }
    }
}
