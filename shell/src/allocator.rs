//! Giving memory back after a burst. The binaries allocate with jemalloc, which already
//! returns freed pages to the system after a second (`dirty_decay_ms:1000`, background
//! threads). What it cannot return is what each thread keeps in its own cache (tcache):
//! freed objects held for the thread's next allocation of that size, a few MiB per worker
//! after 10,000 connections close, and only trimmed by that thread allocating again. A
//! worker that goes idle never does. So a worker about to park flushes its cache back to
//! the arenas (where the background threads purge it), at most once per [`FLUSH_EVERY`]:
//! idle, that is the first park after the work; under load, at most 100 flushes a second
//! per worker, and what a worker keeps when it stops is what it freed in its last 10 ms.
//! (Once a second was too rare: a worker that flushed during the close of a burst and
//! parked again within the second slept on with its cache full.)
//!
//! Measured with `mesh-bench --memory 10000` (RSS 15 s after the connections close, above
//! idle): +4.6 / +4.7 MiB without (jemalloc's counters then: 2.5 MB allocated, 2.0 MB of it
//! in one parked worker's cache); +1.1 / +0.9 MiB with the thread caches off altogether;
//! +1.0 to +1.3 MiB with this flush.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// The shortest time between two flushes of one thread's cache.
pub const FLUSH_EVERY: Duration = Duration::from_millis(10);

thread_local! {
    static LAST_FLUSH: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// For the runtime's `on_thread_park`: flushes this thread's allocation cache when the last
/// flush is [`FLUSH_EVERY`] old (or there was none). Errors are ignored: a process whose
/// allocator is not jemalloc only keeps its caches.
pub fn on_park() {
    let now = Instant::now();
    let due = LAST_FLUSH.with(|last| match last.get() {
        Some(at) if now.duration_since(at) < FLUSH_EVERY => false,
        _ => {
            last.set(Some(now));
            true
        }
    });
    if due {
        flush_thread_cache();
    }
}

/// Returns what this thread's cache holds to the arenas (`thread.tcache.flush`); the cache
/// itself stays, empty. (Turning the cache off and on again, as this did before, also freed
/// and rebuilt the cache's own 32 KiB of bin arrays on every flush: a `madvise` and eight
/// page faults each time, about one fault per request at 1,000 req/s.)
#[allow(unsafe_code)]
pub fn flush_thread_cache() {
    // SAFETY: `thread.tcache.flush` reads and writes nothing: jemalloc requires null old and
    // new pointers and a zero length for it, which is what it gets; the name is a
    // NUL-terminated C string that outlives the call.
    let _ = unsafe {
        tikv_jemalloc_sys::mallctl(
            c"thread.tcache.flush".as_ptr(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            0,
        )
    };
}

#[cfg(test)]
mod tests {
    use super::*;
    use tikv_jemalloc_ctl::{epoch, Access, AsName};

    #[test]
    fn a_thread_flushes_at_most_once_in_ten_milliseconds() {
        on_park();
        let first = LAST_FLUSH.with(Cell::get).expect("the first park flushes");
        on_park();
        assert_eq!(
            LAST_FLUSH.with(Cell::get),
            Some(first),
            "within 10 ms: no flush"
        );
    }

    /// The bytes cached by the threads that use arena `arena`.
    fn cached_in(arena: u32) -> usize {
        epoch::advance().expect("epoch");
        let name = format!("stats.arenas.{arena}.tcache_bytes\0");
        Access::<usize>::read(name.as_bytes().name()).expect("tcache_bytes")
    }

    #[test]
    fn a_flush_hands_the_threads_cache_back_and_the_cache_stays_on() {
        // On a thread of its own, in an arena of its own: no other test's cache is counted.
        std::thread::spawn(|| {
            let arena: u32 = Access::<u32>::read(b"arenas.create\0".name()).expect("arena");
            Access::<u32>::write(b"thread.arena\0".name(), arena).expect("thread.arena");
            let freed: Vec<Box<[u8; 48]>> = (0..64).map(|_| Box::new([1; 48])).collect();
            drop(freed);
            let before = cached_in(arena);
            assert!(
                before >= 32 * 48,
                "64 freed objects of 48 bytes are cached: {before}"
            );
            flush_thread_cache();
            assert_eq!(cached_in(arena), 0, "flushed (was {before})");
            let on = Access::<bool>::read(b"thread.tcache.enabled\0".name());
            assert_eq!(on.ok(), Some(true), "the cache stays on");
            let again: Vec<Box<[u8; 48]>> = (0..64).map(|_| Box::new([2; 48])).collect();
            drop(again);
            assert!(cached_in(arena) > 0, "and caches again");
        })
        .join()
        .expect("the test thread");
    }
}
