//! The process around the proxies: the open-file limit, what ends it (SIGTERM, SIGINT,
//! `/quitquitquit`, or a test dropping its handle), the drain deadline, and spawning tasks
//! that carry a span.

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;

use crate::config::LogFormat;
use crate::logging::LogHandle;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// The body of every binary's `main` once its flags are parsed: installs logging, raises
/// the open-file limit, runs `run` (given the log handle, for `/logging`) on a multi-threaded
/// runtime of `worker_threads` workers (default one per CPU) named `<name>-worker`, each
/// returning its allocation cache when it goes idle ([`crate::allocator`]), and logs a
/// failure before returning it.
pub fn main<F, Fut, E>(
    name: &str,
    log_format: LogFormat,
    worker_threads: Option<u16>,
    run: F,
) -> Result<(), E>
where
    F: FnOnce(LogHandle) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: From<std::io::Error> + std::fmt::Display,
{
    let log = crate::logging::init(log_format);
    raise_fd_limit();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        rt.worker_threads(usize::from(n));
    }
    let rt = rt
        .enable_all()
        .thread_name(format!("{name}-worker"))
        .on_thread_park(crate::allocator::on_park)
        .build()?;
    let result = rt.block_on(run(log));
    if let Err(e) = &result {
        tracing::error!(error = format!("{e:#}"), "{name} failed");
    }
    result
}

/// Spawns `fut` inside `span`, so everything it logs says which task it came from
/// (`spawn(info_span!("config"), watch_config(..))`).
pub fn spawn<F>(span: tracing::Span, fut: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(fut.instrument(span))
}

/// Every proxied connection holds file descriptors on both sides; the default soft limit
/// (often 1024) would shed connections long before memory runs out. Raises it to the hard
/// limit (startup; a failure is logged, not fatal). Returns the soft limit now in force.
pub fn raise_fd_limit() -> Option<u64> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => Some(hard),
            Err(e) => {
                tracing::warn!(error = %e, soft, hard, "could not raise the open-file limit");
                Some(soft)
            }
        },
        Ok((soft, _)) => Some(soft),
        Err(e) => {
            tracing::warn!(error = %e, "could not read the open-file limit");
            None
        }
    }
}

/// What ends the process: a signal, `/quitquitquit`, or whoever holds a clone (an
/// in-process test's handle).
#[derive(Clone, Debug, Default)]
pub struct Shutdown {
    trigger: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    /// Asks the process to shut down (drain, then exit).
    pub fn trigger(&self) {
        self.trigger.cancel();
    }

    pub fn is_triggered(&self) -> bool {
        self.trigger.is_cancelled()
    }

    /// Resolves on SIGTERM, SIGINT or [`Shutdown::trigger`].
    pub async fn signalled(&self) {
        tokio::select! {
            _ = self.trigger.cancelled() => tracing::info!("shutdown requested"),
            sig = signal() => tracing::info!(signal = sig, "shutdown signal"),
        }
    }

    /// Resolves on [`Shutdown::trigger`] only (in-process runs leave signals to the test
    /// harness).
    pub async fn triggered(&self) {
        self.trigger.cancelled().await
    }
}

async fn signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the process ends by being killed or by `/quitquitquit`.
        tracing::warn!("no signal handlers; only /quitquitquit or a kill ends the process");
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}

/// A started process: what it bound, how to stop it, and its end. `run` in a binary is
/// `start`, then [`Shutdown::signalled`], then [`AppHandle::join`]; an in-process test
/// keeps the handle and calls [`AppHandle::shutdown`] instead of sending a signal.
pub struct AppHandle<A> {
    /// The bound addresses (the ports chosen for `:0`).
    pub addrs: A,
    shutdown: Shutdown,
    done: JoinHandle<()>,
}

impl<A> AppHandle<A> {
    /// `done` drains and ends once `shutdown` is triggered.
    pub fn new(addrs: A, shutdown: Shutdown, done: JoinHandle<()>) -> Self {
        AppHandle {
            addrs,
            shutdown,
            done,
        }
    }

    /// What ends the process (shared with `/quitquitquit`).
    pub fn shutdown_trigger(&self) -> Shutdown {
        self.shutdown.clone()
    }

    /// Starts the shutdown: listeners close, open connections drain.
    pub fn shutdown(&self) {
        self.shutdown.trigger();
    }

    /// Waits until the process has drained (after [`AppHandle::shutdown`], a signal or
    /// `/quitquitquit`).
    pub async fn join(self) -> Result<(), tokio::task::JoinError> {
        self.done.await
    }
}

/// A binary's `run`: starts the app with the process's log handle, waits for SIGTERM,
/// SIGINT or `/quitquitquit`, then drains it.
pub async fn run_until_signalled<A, E, S, F>(log: LogHandle, start: S) -> Result<(), E>
where
    S: FnOnce(crate::admin::Control) -> F,
    F: Future<Output = Result<AppHandle<A>, E>>,
    E: From<tokio::task::JoinError>,
{
    let shutdown = Shutdown::new();
    let app = start(crate::admin::Control {
        log: Some(log),
        shutdown: shutdown.clone(),
    })
    .await?;
    shutdown.signalled().await;
    app.shutdown();
    Ok(app.join().await?)
}

/// Waits for open connections to finish (`idle`) at most `deadline`; says how many were
/// left (`open`) when it gives up. Returns whether everything drained.
pub async fn drain<F>(deadline: Duration, idle: F, open: impl Fn() -> usize) -> bool
where
    F: Future<Output = ()>,
{
    if tokio::time::timeout(deadline, idle).await.is_ok() {
        return true;
    }
    tracing::warn!(
        open = open(),
        "drain deadline reached; closing remaining connections"
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_gives_up_at_the_deadline() {
        assert!(drain(Duration::from_secs(5), async {}, || 0).await);
        let never = std::future::pending::<()>();
        assert!(!drain(Duration::from_millis(10), never, || 3).await);
    }

    #[tokio::test]
    async fn a_trigger_ends_the_wait() {
        let s = Shutdown::new();
        let waiter = tokio::spawn({
            let s = s.clone();
            async move { s.signalled().await }
        });
        s.trigger();
        waiter.await.expect("the wait ends");
        assert!(s.is_triggered());
    }

    #[test]
    fn the_open_file_limit_is_at_least_what_it_was() {
        use nix::sys::resource::{getrlimit, Resource};
        let (before, _) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        let now = raise_fd_limit().expect("limit");
        assert!(now >= before);
    }
}
