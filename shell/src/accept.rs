//! The accept loop every listener uses. A failed `accept` must neither end the listener nor
//! spin: when the process (`EMFILE`) or the system (`ENFILE`) is out of file descriptors,
//! or the kernel out of buffers, every retry fails at once until a connection closes, so
//! the loop waits, doubling the wait up to [`MAX_BACKOFF`], and starts again at
//! [`MIN_BACKOFF`] after the first success. Errors that concern one connection only (the
//! peer reset it while it was queued) are skipped without a wait.

use std::future::Future;
use std::io;
use std::time::Duration;

use nix::errno::Errno;
use tokio_util::sync::CancellationToken;

/// The first wait after an accept error that will repeat.
pub const MIN_BACKOFF: Duration = Duration::from_millis(5);
/// The longest wait between two accepts while they keep failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// What a failed accept means for the next one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AcceptError {
    /// Out of file descriptors or memory: the next accept fails too until some are freed.
    Exhausted,
    /// Only the connection being accepted failed (reset, aborted, interrupted).
    Connection,
    /// Anything else: retried after a wait, never fatal to the listener.
    Other,
}

impl AcceptError {
    pub fn classify(e: &io::Error) -> Self {
        let Some(code) = e.raw_os_error() else {
            return match e.kind() {
                io::ErrorKind::ConnectionAborted
                | io::ErrorKind::ConnectionReset
                | io::ErrorKind::Interrupted
                | io::ErrorKind::WouldBlock => AcceptError::Connection,
                io::ErrorKind::OutOfMemory => AcceptError::Exhausted,
                _ => AcceptError::Other,
            };
        };
        match Errno::from_raw(code) {
            Errno::EMFILE | Errno::ENFILE | Errno::ENOBUFS | Errno::ENOMEM => {
                AcceptError::Exhausted
            }
            Errno::ECONNABORTED
            | Errno::ECONNRESET
            | Errno::EINTR
            | Errno::EAGAIN
            | Errno::EPROTO
            | Errno::EPERM
            | Errno::ETIMEDOUT
            | Errno::EHOSTUNREACH
            | Errno::ENETUNREACH
            | Errno::ENETDOWN
            | Errno::ENONET
            | Errno::EHOSTDOWN
            | Errno::ENOPROTOOPT
            | Errno::EOPNOTSUPP => AcceptError::Connection,
            _ => AcceptError::Other,
        }
    }
}

/// The wait before the next accept while accepts keep failing.
#[derive(Debug)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
    /// Failures since the last success.
    failures: u64,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff::new(MIN_BACKOFF, MAX_BACKOFF)
    }
}

impl Backoff {
    /// Waits from `min`, doubling up to `max`.
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max,
            next: min,
            failures: 0,
        }
    }

    /// Records a failure; returns the wait before the next attempt (`None`: go on at once).
    pub fn failed(&mut self, kind: AcceptError) -> Option<Duration> {
        self.failures += 1;
        match kind {
            AcceptError::Connection => None,
            AcceptError::Exhausted | AcceptError::Other => {
                let wait = self.next;
                self.next = (self.next * 2).min(self.max);
                Some(wait)
            }
        }
    }

    /// Records a success; returns how many accepts had failed before it.
    pub fn succeeded(&mut self) -> u64 {
        self.next = self.min;
        std::mem::take(&mut self.failures)
    }
}

/// Accepts until `stop` is cancelled, handing each connection to `handle` (which spawns
/// its task). `what` names the listener in logs.
pub async fn serve<C, A, F, H>(what: &'static str, accept: A, handle: H, stop: CancellationToken)
where
    A: FnMut() -> F,
    F: Future<Output = io::Result<C>>,
    H: FnMut(C),
{
    serve_with(Backoff::default(), what, accept, handle, stop).await
}

/// The most connections [`drain_queued`] accepts (a backlog's worth).
pub const MAX_DRAINED: usize = 4096;

/// Accepts what is queued on a listener whose [`serve`] loop has stopped, and what completes
/// its handshake there until none has for `quiet`, handing each connection to `handle`;
/// returns how many. For a listener with no other (`SO_REUSEPORT`) listener to take its
/// queue over, closing with connections queued or mid-handshake resets each of them although
/// the client's connect had succeeded (or is about to). The caller must keep its process
/// alive until what `handle` started is done.
pub async fn drain_queued<C, A, F, H>(
    what: &'static str,
    mut accept: A,
    mut handle: H,
    quiet: Duration,
) -> usize
where
    A: FnMut() -> F,
    F: Future<Output = io::Result<C>>,
    H: FnMut(C),
{
    let mut drained = 0;
    while drained < MAX_DRAINED {
        match tokio::time::timeout(quiet, accept()).await {
            Ok(Ok(conn)) => {
                handle(conn);
                drained += 1;
            }
            // Empty (or failing): nothing more to take.
            _ => break,
        }
    }
    if drained > 0 {
        tracing::debug!(
            listener = what,
            drained,
            "accepted what was queued before closing"
        );
    }
    drained
}

/// [`serve`] with its own backoff.
pub async fn serve_with<C, A, F, H>(
    mut backoff: Backoff,
    what: &'static str,
    mut accept: A,
    mut handle: H,
    stop: CancellationToken,
) where
    A: FnMut() -> F,
    F: Future<Output = io::Result<C>>,
    H: FnMut(C),
{
    loop {
        let result = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            r = accept() => r,
        };
        match result {
            Ok(conn) => {
                let failed = backoff.succeeded();
                if failed > 0 {
                    tracing::info!(listener = what, failed, "accepting again");
                }
                handle(conn);
            }
            Err(e) => {
                let kind = AcceptError::classify(&e);
                let first = backoff.failures == 0;
                match backoff.failed(kind) {
                    None => tracing::debug!(listener = what, error = %e, "accept failed"),
                    Some(wait) => {
                        // Once per streak: while out of descriptors every accept fails.
                        if first {
                            tracing::warn!(listener = what, error = %e, ?kind, "accept failed; backing off until it succeeds");
                        } else {
                            tracing::debug!(listener = what, error = %e, ?wait, "accept failed again");
                        }
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(wait) => {}
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn os(e: Errno) -> io::Error {
        io::Error::from_raw_os_error(e as i32)
    }

    /// What a scripted run saw: the connections in order, how many accepts were made, how
    /// long it took.
    struct Run {
        accepted: Vec<u32>,
        calls: usize,
        took: Duration,
    }

    /// Runs the loop (backoff 1 ms doubling to 4 ms) over a scripted accept: each call
    /// takes the next result; the loop is stopped at the last connection.
    async fn run(script: Vec<io::Result<u32>>) -> Run {
        let start = Instant::now();
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let calls = Arc::new(AtomicUsize::new(0));
        let accepted = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let accept = || {
            calls.fetch_add(1, Ordering::SeqCst);
            let next = script.lock().expect("lock").pop_front();
            async move {
                match next {
                    Some(r) => r,
                    None => std::future::pending().await,
                }
            }
        };
        let handle = |c: u32| {
            accepted.lock().expect("lock").push(c);
            if script.lock().expect("lock").is_empty() {
                stop.cancel();
            }
        };
        serve_with(
            Backoff::new(MS, 4 * MS),
            "test",
            accept,
            handle,
            stop.clone(),
        )
        .await;
        let accepted = accepted.lock().expect("lock").clone();
        Run {
            accepted,
            calls: calls.load(Ordering::SeqCst),
            took: start.elapsed(),
        }
    }

    #[test]
    fn the_wait_doubles_to_the_cap_and_a_success_resets_it() {
        let mut b = Backoff::new(MS, 4 * MS);
        let waits: Vec<_> = (0..5).map(|_| b.failed(AcceptError::Exhausted)).collect();
        let expected = [1, 2, 4, 4, 4].map(|n| Some(n * MS));
        assert_eq!(waits, expected);
        assert_eq!(b.failed(AcceptError::Connection), None);
        assert_eq!(b.succeeded(), 6);
        assert_eq!(b.failed(AcceptError::Other), Some(MS));
        assert_eq!(
            Backoff::default().failed(AcceptError::Exhausted),
            Some(MIN_BACKOFF)
        );
    }

    #[tokio::test]
    async fn out_of_descriptors_backs_off_then_recovers() {
        let mut script: Vec<io::Result<u32>> = (0..10).map(|_| Err(os(Errno::EMFILE))).collect();
        script.push(Ok(1));
        script.push(Err(os(Errno::ENFILE)));
        script.push(Ok(2));
        let run = run(script).await;
        assert_eq!(run.accepted, vec![1, 2]);
        // One accept per scripted result (and the one the stop interrupted): the loop waited
        // instead of spinning, and went on accepting after the descriptors came back.
        assert_eq!(run.calls, 14);
        // 1+2+4+4*7 ms for the streak of ten, then 1 ms again after the success.
        assert!(run.took >= 36 * MS, "{:?}", run.took);
    }

    #[tokio::test]
    async fn a_connection_reset_while_queued_is_skipped_without_waiting() {
        let run = run(vec![
            Err(os(Errno::ECONNABORTED)),
            Err(io::Error::from(io::ErrorKind::ConnectionReset)),
            Ok(7),
        ])
        .await;
        assert_eq!(run.accepted, vec![7]);
        assert_eq!(run.calls, 4);
    }

    #[tokio::test]
    async fn stop_ends_the_loop_during_a_backoff() {
        let stop = CancellationToken::new();
        let accept = || async { Err::<(), _>(os(Errno::EMFILE)) };
        let backoff = Backoff::new(Duration::from_secs(3600), Duration::from_secs(3600));
        let loop_ = tokio::spawn(serve_with(backoff, "test", accept, |_| {}, stop.clone()));
        tokio::task::yield_now().await;
        stop.cancel();
        tokio::time::timeout(Duration::from_secs(5), loop_)
            .await
            .expect("the loop ends at once")
            .expect("no panic");
    }

    #[test]
    fn errors_are_classified_by_what_the_next_accept_can_expect() {
        let check = |e: io::Error, expected| assert_eq!(AcceptError::classify(&e), expected, "{e}");
        check(os(Errno::EMFILE), AcceptError::Exhausted);
        check(os(Errno::ENFILE), AcceptError::Exhausted);
        check(os(Errno::ENOBUFS), AcceptError::Exhausted);
        check(os(Errno::ECONNABORTED), AcceptError::Connection);
        check(os(Errno::EINVAL), AcceptError::Other);
        check(io::Error::other("x"), AcceptError::Other);
    }

    #[tokio::test]
    async fn a_real_listener_serves_through_the_loop() {
        let listener = Arc::new(
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind"),
        );
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(serve(
            "test",
            move || {
                let l = listener.clone();
                async move { l.accept().await }
            },
            move |(_, peer)| {
                let _ = tx.send(peer);
            },
            stop.clone(),
        ));
        let client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let peer = rx.recv().await.expect("accepted");
        assert_eq!(peer, client.local_addr().expect("local"));
        stop.cancel();
        task.await.expect("ends");
    }

    /// Three connections queued (handshake done, never accepted) when the loop is stopped.
    async fn queued_then_stopped(draining: bool) -> usize {
        let listener = Arc::new(
            tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind"),
        );
        let addr = listener.local_addr().expect("addr");
        let mut clients = Vec::new();
        for _ in 0..3 {
            clients.push(tokio::net::TcpStream::connect(addr).await.expect("connect"));
        }
        let stop = CancellationToken::new();
        stop.cancel();
        let handled = Arc::new(AtomicUsize::new(0));
        let accept = move || {
            let l = listener.clone();
            async move { l.accept().await }
        };
        let count = handled.clone();
        let handle = move |_| {
            count.fetch_add(1, Ordering::SeqCst);
        };
        let (mut accept, mut handle) = (accept, handle);
        serve("test", &mut accept, &mut handle, stop).await;
        if draining {
            let quiet = Duration::from_millis(20);
            assert_eq!(drain_queued("test", accept, handle, quiet).await, 3);
        }
        handled.load(Ordering::SeqCst)
    }

    #[tokio::test]
    async fn a_draining_loop_takes_what_was_queued_when_stopped() {
        assert_eq!(queued_then_stopped(true).await, 3);
        assert_eq!(queued_then_stopped(false).await, 0);
    }
}
