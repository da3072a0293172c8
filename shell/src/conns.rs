//! How many connections are open, so shutdown can wait for them to finish.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// The count of open connections; [`Active::enter`] counts one until its guard drops.
#[derive(Debug, Default)]
pub struct Active {
    count: AtomicUsize,
    idle: Notify,
}

/// One open connection; dropping it decrements the count.
#[derive(Debug)]
pub struct ActiveGuard(Arc<Active>);

// === impl Active ===

impl Active {
    pub fn enter(self: &Arc<Self>) -> ActiveGuard {
        self.count.fetch_add(1, Ordering::SeqCst);
        ActiveGuard(self.clone())
    }

    pub fn len(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves once no connection is open.
    pub async fn idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.is_empty() {
                return;
            }
            notified.await;
        }
    }
}

// === impl ActiveGuard ===

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        if self.0.count.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn idle_waits_for_the_last_guard() {
        let active = Arc::new(Active::default());
        active.idle().await;
        let a = active.enter();
        let b = active.enter();
        assert_eq!(active.len(), 2);
        let waiter = tokio::spawn({
            let active = active.clone();
            async move { active.idle().await }
        });
        drop(a);
        assert!(!waiter.is_finished());
        drop(b);
        waiter.await.expect("idle resolves");
        assert!(active.is_empty());
    }
}
