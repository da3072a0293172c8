//! [`ReceiveBudget`]: one per-process budget of HTTP/2 receive-window bytes, so that
//! connections × window cannot exhaust memory (issue 14 item 1; ARCHITECTURE.md "Limits and
//! the memory bound").
//!
//! A receive window is a promise: the peer may send that many bytes before we read any, and
//! they sit in memory until the application reads them. Every HTTP/2 connection the mesh
//! runs (HBONE server and client, the waypoint's downstream and upstream HTTP/2) therefore
//! reserves its connection window from the budget before it advertises it, and gives it back
//! when the connection ends ([`Reservation`]'s `Drop`).
//!
//! - While the windows already reserved are under a quarter of the budget, a connection gets
//!   the window it asks for (or what is left of that quarter, whichever is smaller): a few
//!   connections may run at full speed.
//! - Past that, connections get HTTP/2's initial window, [`MIN_WINDOW`] (64 KiB minus one):
//!   a connection window can never be smaller, since the peer may send that much before it
//!   reads our SETTINGS.
//! - When even that does not fit, the connection is refused (flag `OM`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Default budget per process: 1 GiB. At [`MIN_WINDOW`] per connection the three quarters
/// of it not open to large windows hold 12,288 connections (three quarters of the default
/// `--max-connections`, 16,384), the first quarter 16 connections at the full 16 MiB window.
pub const DEFAULT_RECEIVE_BUFFER_BUDGET: u64 = 1 << 30;

/// HTTP/2's initial window (RFC 9113 6.9.2): the least a connection can be held to.
pub const MIN_WINDOW: u32 = 65_535;

/// The part of the budget (1 / this) open to windows larger than [`MIN_WINDOW`].
const LARGE_WINDOW_SHARE: u64 = 4;

/// Bytes of receive window the process may promise its peers. Cheap to clone; clones share
/// the budget.
#[derive(Clone)]
pub struct ReceiveBudget {
    inner: Arc<Inner>,
}

struct Inner {
    limit: u64,
    used: AtomicU64,
}

/// A window reserved from a [`ReceiveBudget`]; given back on drop.
pub struct Reservation {
    budget: ReceiveBudget,
    bytes: u32,
}

// === impl ReceiveBudget ===

impl ReceiveBudget {
    /// A budget of `limit` bytes (at least one [`MIN_WINDOW`]).
    pub fn new(limit: u64) -> Self {
        ReceiveBudget {
            inner: Arc::new(Inner {
                limit: limit.max(u64::from(MIN_WINDOW)),
                used: AtomicU64::new(0),
            }),
        }
    }

    pub fn limit(&self) -> u64 {
        self.inner.limit
    }

    /// Bytes reserved now.
    pub fn used(&self) -> u64 {
        self.inner.used.load(Ordering::Acquire)
    }

    /// A connection window of at most `want` bytes: `want` (or what is left of the large-window
    /// share) while that share lasts, else [`MIN_WINDOW`]; `None` when not even that fits.
    /// Never waits.
    pub fn reserve(&self, want: u32) -> Option<Reservation> {
        let want = u64::from(want.max(MIN_WINDOW));
        let min = u64::from(MIN_WINDOW);
        let large_share = self.inner.limit / LARGE_WINDOW_SHARE;
        let mut used = self.used();
        loop {
            let grant = want.min(large_share.saturating_sub(used).max(min));
            if used + grant > self.inner.limit {
                return None;
            }
            match self.inner.used.compare_exchange_weak(
                used,
                used + grant,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return Some(Reservation {
                        budget: self.clone(),
                        // grant <= want, which came from a u32.
                        bytes: u32::try_from(grant).unwrap_or(MIN_WINDOW),
                    });
                }
                Err(now) => used = now,
            }
        }
    }
}

impl Default for ReceiveBudget {
    fn default() -> Self {
        ReceiveBudget::new(DEFAULT_RECEIVE_BUFFER_BUDGET)
    }
}

impl std::fmt::Debug for ReceiveBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReceiveBudget")
            .field("limit", &self.limit())
            .field("used", &self.used())
            .finish()
    }
}

// === impl Reservation ===

impl Reservation {
    /// The connection window to advertise.
    pub fn window(&self) -> u32 {
        self.bytes
    }

    /// The stream window to advertise with it: `want`, but never above the connection's.
    pub fn stream_window(&self, want: u32) -> u32 {
        want.min(self.bytes)
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget
            .inner
            .used
            .fetch_sub(u64::from(self.bytes), Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("Reservation").field(&self.bytes).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u32 = 1024 * 1024;

    #[test]
    fn large_windows_while_the_first_quarter_lasts_then_the_minimum_then_none() {
        let budget = ReceiveBudget::new(64 * u64::from(MIB));
        // The large-window share is 16 MiB: one full 16 MiB window...
        let first = budget.reserve(16 * MIB).expect("room");
        assert_eq!(first.window(), 16 * MIB);
        assert_eq!(first.stream_window(4 * MIB), 4 * MIB);
        // ...then the minimum.
        let second = budget.reserve(16 * MIB).expect("room");
        assert_eq!(second.window(), MIN_WINDOW);
        assert_eq!(second.stream_window(4 * MIB), MIN_WINDOW);
        drop(first);
        // A partial window from what is left of the share.
        let third = budget.reserve(16 * MIB).expect("room");
        assert_eq!(third.window(), 16 * MIB - MIN_WINDOW);
        // The rest fills with minimum windows until nothing fits.
        let left = 64 * u64::from(MIB) - budget.used();
        let n = left / u64::from(MIN_WINDOW);
        let held: Vec<_> = (0..n)
            .map(|_| budget.reserve(16 * MIB).expect("room"))
            .collect();
        assert!(held.iter().all(|r| r.window() == MIN_WINDOW));
        assert!(budget.reserve(16 * MIB).is_none());
        assert!(budget.reserve(1).is_none());
        // Every byte comes back when the reservations drop (RAII).
        drop((held, second, third));
        assert_eq!(budget.used(), 0);
        assert_eq!(budget.reserve(16 * MIB).expect("room").window(), 16 * MIB);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_small_ask_gets_what_it_asks_and_a_tiny_budget_still_holds_one_connection() {
        let budget = ReceiveBudget::new(0);
        assert_eq!(budget.limit(), u64::from(MIN_WINDOW));
        let only = budget.reserve(1).expect("one minimum window");
        assert_eq!(only.window(), MIN_WINDOW);
        assert!(budget.reserve(1).is_none());
        let big = ReceiveBudget::new(1 << 30);
        assert_eq!(big.reserve(MIB).expect("room").window(), MIB);
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_limit() {
        let budget = ReceiveBudget::new(100 * u64::from(MIN_WINDOW));
        let held = std::sync::Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    for _ in 0..100 {
                        if let Some(r) = budget.reserve(MIN_WINDOW) {
                            held.lock().expect("lock").push(r);
                        }
                    }
                });
            }
        });
        let held = held.into_inner().expect("lock");
        assert_eq!(held.len(), 100);
        assert_eq!(budget.used(), budget.limit());
        drop(held);
        assert_eq!(budget.used(), 0);
    }
}
