//! [`Holding`]: a future that keeps some values alive until it completes, without storing the
//! future twice.
//!
//! A spawned per-connection task often needs guards (a slot under a cap, an "open" count)
//! that live as long as the connection. The obvious `async move { let _g = guard; fut.await }`
//! costs the size of `fut` twice: the async block keeps its captured `fut` and, separately,
//! the future it awaits (rustc does not overlap a captured value with a local it is moved
//! into). Per connection that was 2.2–2.4 KiB of every idle tunnel on each side
//! (`mesh-bench --memory`). This wrapper is the future itself plus the held values.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

pin_project_lite::pin_project! {
    /// Polls `fut`; `held` is dropped with it (on completion or cancellation).
    #[must_use = "futures do nothing unless polled"]
    pub struct Holding<F, H> {
        #[pin]
        fut: F,
        held: H,
    }
}

/// `fut`, with `held` kept alive until it completes or is dropped.
pub fn holding<F: Future, H>(fut: F, held: H) -> Holding<F, H> {
    Holding { fut, held }
}

impl<F: Future, H> Future for Holding<F, H> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let _ = this.held;
        this.fut.poll(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A future with a large state, like a connection's.
    async fn big() -> usize {
        let buf = [7u8; 2048];
        tokio::task::yield_now().await;
        buf.iter().map(|&b| usize::from(b)).sum()
    }

    #[test]
    fn holding_costs_the_future_once_where_an_async_block_costs_it_twice() {
        let inner = std::mem::size_of_val(&big());
        let held = Arc::new(());
        let wrapped = holding(big(), held.clone());
        let fut = big();
        let block = async move {
            let _held = held;
            fut.await
        };
        // What this module is for: if rustc learns to overlap the two, the block stops being
        // a hazard, and this assertion says so.
        assert!(
            std::mem::size_of_val(&block) >= 2 * inner,
            "block {} inner {inner}",
            std::mem::size_of_val(&block)
        );
        assert!(
            std::mem::size_of_val(&wrapped) <= inner + 16,
            "holding {} inner {inner}",
            std::mem::size_of_val(&wrapped)
        );
    }

    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[tokio::test]
    async fn held_values_drop_when_the_future_completes_or_is_dropped() {
        let dropped = Arc::new(AtomicUsize::new(0));
        let out = holding(big(), Counted(dropped.clone())).await;
        assert_eq!(out, 7 * 2048);
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
        let pending = holding(std::future::pending::<()>(), Counted(dropped.clone()));
        drop(pending);
        assert_eq!(dropped.load(Ordering::SeqCst), 2);
    }
}
