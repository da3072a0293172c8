//! Round robin per destination: where a proxy starts in a destination's endpoint list.
//!
//! [`RoundRobin::next`] hands out 0, 1, 2, ... per key (a Service, a pod): the caller takes
//! `n % endpoints.len()` as its first choice and walks on from there on failure.
//!
//! Keys are not tied to the model's lifetime, so the map is bounded instead: when
//! [`RoundRobin::capacity`] keys are held and a new one arrives, the least recently asked
//! for half is forgotten. A deleted Service is no longer asked for, so it goes first; a key
//! forgotten while still in use starts again at 0, which only moves its next start.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

/// Keys held before the least recently used half is forgotten: far more destinations than
/// a proxy sends to at once.
pub const DEFAULT_CAPACITY: usize = 4096;

/// A rotating counter per key. Shared by reference; each call takes one short lock.
#[derive(Debug)]
pub struct RoundRobin<K> {
    inner: Mutex<Inner<K>>,
    capacity: usize,
}

#[derive(Debug)]
struct Inner<K> {
    counters: HashMap<K, Counter>,
    /// Calls so far: orders the keys by last use.
    clock: u64,
}

#[derive(Debug)]
struct Counter {
    next: usize,
    last_used: u64,
}

// === impl RoundRobin ===

impl<K: Hash + Eq + Clone> Default for RoundRobin<K> {
    fn default() -> Self {
        Self::with_capacity(DEFAULT_CAPACITY)
    }
}

impl<K: Hash + Eq + Clone> RoundRobin<K> {
    /// Holds at most `capacity` keys (at least 1).
    pub fn with_capacity(capacity: usize) -> Self {
        RoundRobin {
            inner: Mutex::new(Inner {
                counters: HashMap::new(),
                clock: 0,
            }),
            capacity: capacity.max(1),
        }
    }

    /// The next start index for `key`: 0 the first time, then one more at each call
    /// (wrapping at `usize::MAX`).
    pub fn next(&self, key: &K) -> usize {
        // Every update leaves the map consistent: a panic elsewhere cannot poison its meaning.
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.clock += 1;
        let now = inner.clock;
        if let Some(counter) = inner.counters.get_mut(key) {
            counter.last_used = now;
            let n = counter.next;
            counter.next = n.wrapping_add(1);
            return n;
        }
        if inner.counters.len() >= self.capacity {
            keep_most_recent(&mut inner.counters, self.capacity / 2);
        }
        inner.counters.insert(
            key.clone(),
            Counter {
                next: 1,
                last_used: now,
            },
        );
        0
    }

    /// The most keys held at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.counters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Forgets all but the `keep` most recently used counters (last-use times are distinct).
fn keep_most_recent<K>(counters: &mut HashMap<K, Counter>, keep: usize) {
    let Some(drop) = counters.len().checked_sub(keep).filter(|&d| d > 0) else {
        return;
    };
    if keep == 0 {
        counters.clear();
        return;
    }
    let mut times: Vec<u64> = counters.values().map(|c| c.last_used).collect();
    let (_, &mut oldest_kept, _) = times.select_nth_unstable(drop);
    counters.retain(|_, c| c.last_used >= oldest_kept);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The start indices `rr` hands out for `keys`, in order.
    fn starts(rr: &RoundRobin<String>, keys: &[&str]) -> Vec<usize> {
        keys.iter().map(|k| rr.next(&k.to_string())).collect()
    }

    #[test]
    fn a_key_rotates_through_every_endpoint_in_turn() {
        let rr = RoundRobin::default();
        let endpoints = 3;
        let picks: Vec<usize> = (0..9).map(|_| rr.next(&"svc") % endpoints).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn keys_rotate_independently() {
        let rr = RoundRobin::default();
        assert_eq!(
            starts(&rr, &["a", "a", "b", "a", "b", "c"]),
            [0, 1, 0, 2, 1, 0]
        );
        assert_eq!(rr.len(), 3);
    }

    #[test]
    fn concurrent_callers_get_every_index_once() {
        let rr = RoundRobin::default();
        let mut seen: Vec<usize> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..100).map(|_| rr.next(&"svc")).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("thread"))
                .collect()
        });
        seen.sort_unstable();
        assert_eq!(seen, (0..400).collect::<Vec<_>>());
    }

    #[test]
    fn deleted_destinations_are_forgotten_first_and_live_ones_keep_rotating() {
        let rr = RoundRobin::with_capacity(4);
        starts(&rr, &["a", "b", "deleted-1", "deleted-2"]);
        // Only "a" and "b" are still asked for; then a new destination arrives at capacity.
        assert_eq!(starts(&rr, &["a", "b"]), [1, 1]);
        assert_eq!(starts(&rr, &["new"]), [0]);
        assert_eq!(rr.len(), 3, "the two least recently used went");
        assert_eq!(starts(&rr, &["a", "b", "new"]), [2, 2, 1]);
        // The deleted ones, if they ever come back, start over.
        assert_eq!(starts(&rr, &["deleted-1"]), [0]);
    }

    #[test]
    fn endless_new_keys_stay_within_capacity() {
        let rr = RoundRobin::with_capacity(16);
        for i in 0..1000 {
            // One busy destination among a stream of one-off ones (e.g. churning Services).
            assert_eq!(rr.next(&"busy".to_string()), i);
            rr.next(&format!("svc-{i}"));
            assert!(rr.len() <= rr.capacity(), "after {i} keys: {}", rr.len());
        }
    }

    #[test]
    fn a_capacity_of_one_still_rotates() {
        let rr = RoundRobin::with_capacity(0);
        assert_eq!(rr.capacity(), 1);
        assert_eq!(starts(&rr, &["a", "a", "b", "b", "a"]), [0, 1, 0, 1, 0]);
        assert_eq!(rr.len(), 1);
    }
}
