//! One runtime per worker thread for the data path (`--threading per-worker`).
//!
//! On the shared multi-threaded runtime the tasks of one connection (the accepted socket's
//! task, the HTTP/2 connection task it sends its stream through, the task that delivers to
//! the application) are woken on whichever worker polls the I/O driver and stolen by
//! whichever is idle: each request crosses threads, which costs a wake-up, a context switch
//! and cold caches. Here each worker is an OS thread running its own current-thread Tokio
//! runtime; a binary gives every worker its own listeners (bound with `SO_REUSEPORT`, so the
//! kernel spreads new connections over them) and its own connection pools, and everything a
//! connection does then stays on the thread that accepted it.
//!
//! [`current`] tells code running on a worker which one it is (to pick that worker's pool).
//! The workers stop when [`Workers`] is dropped: each runtime is then dropped on its own
//! thread, which cancels the tasks still on it (open connections close, as at process exit).

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;

use tokio::runtime::Handle;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

thread_local! {
    static INDEX: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The index of the worker this thread is, or `None` off the workers (the control runtime,
/// a test's runtime, a blocking thread).
pub fn current() -> Option<usize> {
    INDEX.with(Cell::get)
}

/// A set of worker threads, each running its own current-thread runtime until dropped.
pub struct Workers {
    handles: Vec<Handle>,
    stops: Vec<oneshot::Sender<()>>,
}

impl Workers {
    /// Starts `n` workers (at least one) named `<name>-data-<i>` (Linux keeps 15 bytes of a
    /// thread name), each with I/O and timers, returning its allocation cache when idle
    /// ([`crate::allocator`]).
    pub fn start(name: &str, n: usize) -> io::Result<Workers> {
        let mut workers = Workers {
            handles: Vec::with_capacity(n.max(1)),
            stops: Vec::with_capacity(n.max(1)),
        };
        for index in 0..n.max(1) {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .on_thread_park(crate::allocator::on_park)
                .build()?;
            let (stop, stopped) = oneshot::channel::<()>();
            workers.handles.push(rt.handle().clone());
            workers.stops.push(stop);
            // A failed spawn drops `workers`, which stops the ones already running.
            thread::Builder::new()
                .name(format!("{name}-data-{index}"))
                .spawn(move || {
                    INDEX.with(|i| i.set(Some(index)));
                    // Ends when the sender is dropped (or sends); the runtime, with the
                    // tasks left on it, is dropped here on its own thread.
                    let _ = rt.block_on(stopped);
                })?;
        }
        Ok(workers)
    }

    /// `--threading per-worker`'s data workers (`n`, from `Threading::data_workers`), or
    /// none on a shared runtime (`None`), and their [`Turns`] (empty then).
    pub fn start_data_path(name: &str, n: Option<usize>) -> io::Result<(Option<Workers>, Turns)> {
        let workers = n.map(|n| Workers::start(name, n)).transpose()?;
        let handles = workers
            .as_ref()
            .map(|w| w.handles().to_vec())
            .unwrap_or_default();
        Ok((workers, Turns::new(handles)))
    }

    /// Handles to spawn on each worker, in worker order (what [`current`] returns on it).
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }
}

/// The data workers' runtimes, and whose turn it is: where a long-lived connection (an
/// HBONE connection, a pod's listener) goes, dealt in turn so that the workers' shares stay
/// even (a hash could put a peer's two connections on one worker). Empty on a shared runtime.
#[derive(Debug, Default)]
pub struct Turns {
    handles: Vec<Handle>,
    next: AtomicUsize,
}

impl Turns {
    pub fn new(handles: Vec<Handle>) -> Turns {
        Turns {
            handles,
            next: AtomicUsize::new(0),
        }
    }

    /// Every worker, in worker order (empty on a shared runtime).
    pub fn handles(&self) -> &[Handle] {
        &self.handles
    }

    /// The next worker in turn; `None` on a shared runtime.
    pub fn next(&self) -> Option<&Handle> {
        if self.handles.is_empty() {
            return None;
        }
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        self.handles.get(turn % self.handles.len())
    }
}

/// Serves an accepted connection on the worker `on`: the socket leaves the I/O driver of the
/// runtime that accepted it and is registered with the worker's (inside the spawned task),
/// so that its wake-ups come from the thread that serves it. `None` (and a logged warning)
/// when the socket could not be moved; the task's handle otherwise.
pub fn serve_on<S, F>(on: &Handle, tcp: tokio::net::TcpStream, serve: S) -> Option<JoinHandle<()>>
where
    S: FnOnce(tokio::net::TcpStream) -> F + Send + 'static,
    F: Future<Output = ()> + Send + 'static,
{
    let peer = tcp.peer_addr().ok();
    let std = match tcp.into_std() {
        Ok(std) => std,
        Err(e) => {
            tracing::warn!(error = %e, ?peer, "hand a connection to a worker");
            return None;
        }
    };
    Some(on.spawn(async move {
        match tokio::net::TcpStream::from_std(std) {
            Ok(tcp) => serve(tcp).await,
            Err(e) => tracing::warn!(error = %e, ?peer, "hand a connection to a worker"),
        }
    }))
}

impl Drop for Workers {
    fn drop(&mut self) {
        // Dropping the senders wakes every worker's `block_on`; the threads are not joined
        // (this may run on an async thread, which must not block).
        self.stops.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn each_worker_runs_its_tasks_on_its_own_thread_and_knows_its_index() {
        let workers = Workers::start("test", 3).expect("start");
        assert_eq!(workers.handles().len(), 3);
        assert_eq!(current(), None, "the test's own runtime is no worker");
        let mut threads = Vec::new();
        for i in 0..3 {
            let (index, thread) = workers.handles()[i]
                .spawn(async {
                    // A task it spawns stays on the same worker.
                    tokio::spawn(async { (current(), thread::current().id()) })
                        .await
                        .expect("inner task")
                })
                .await
                .expect("task");
            assert_eq!(index, Some(i));
            threads.push(thread);
        }
        threads.dedup();
        assert_eq!(threads.len(), 3, "three distinct threads");
    }

    #[tokio::test]
    async fn an_accepted_connection_served_on_a_worker_runs_and_carries_bytes_there() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let workers = Workers::start("test", 2).expect("start");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move {
            let mut tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            tcp.write_all(b"ping").await.expect("write");
            let mut back = [0u8; 4];
            tcp.read_exact(&mut back).await.expect("read");
            back
        });
        let (tcp, _) = listener.accept().await.expect("accept");
        let (tx, rx) = oneshot::channel();
        let served = serve_on(&workers.handles()[1], tcp, move |mut tcp| async move {
            let _ = tx.send(current());
            let mut buf = [0u8; 4];
            if tcp.read_exact(&mut buf).await.is_ok() {
                let _ = tcp.write_all(&buf).await;
            }
        })
        .expect("moved to the worker");
        assert_eq!(rx.await.expect("ran"), Some(1), "on worker 1");
        assert_eq!(&client.await.expect("client"), b"ping");
        served.await.expect("served");
    }

    #[test]
    fn turns_go_round_the_workers_and_a_shared_runtime_has_none() {
        let workers = Workers::start("test", 2).expect("start");
        let turns = Turns::new(workers.handles().to_vec());
        let ids: Vec<_> = (0..4)
            .map(|_| turns.next().expect("a worker").id())
            .collect();
        let [a, b] = [workers.handles()[0].id(), workers.handles()[1].id()];
        assert_eq!(ids, vec![a, b, a, b]);
        assert!(Turns::default().next().is_none());
    }

    #[tokio::test]
    async fn dropping_the_workers_cancels_what_still_runs_on_them() {
        let workers = Workers::start("test", 1).expect("start");
        let (tx, rx) = oneshot::channel::<()>();
        let task = workers.handles()[0].spawn(async move {
            let _held = tx;
            std::future::pending::<()>().await
        });
        drop(workers);
        // The task's future (holding the sender) is dropped with the runtime.
        let closed = tokio::time::timeout(Duration::from_secs(5), rx).await;
        assert!(matches!(closed, Ok(Err(_))), "sender dropped: {closed:?}");
        let joined = tokio::time::timeout(Duration::from_secs(5), task).await;
        assert!(
            matches!(joined, Ok(Err(ref e)) if e.is_cancelled()),
            "{joined:?}"
        );
    }
}
