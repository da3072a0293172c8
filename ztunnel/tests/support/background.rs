//! Threads a test runs beside itself (servers in its namespaces), stopped and joined on drop.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The threads, and the flag that tells them to stop (each checks it between steps).
#[derive(Default)]
pub struct Background {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Background {
    /// Runs `f(stop)` on a thread of its own; `f` returns soon after `stop` is set.
    pub fn spawn(&mut self, f: impl FnOnce(&AtomicBool) + Send + 'static) {
        let stop = self.stop.clone();
        self.threads.push(std::thread::spawn(move || f(&stop)));
    }

    /// Whether `stop` is set (for the threads' loops).
    pub fn stopped(stop: &AtomicBool) -> bool {
        stop.load(Ordering::Relaxed)
    }

    /// Accepts on `listener` until stopped, handing each connection and its peer to `serve`,
    /// one at a time.
    pub fn serve_tcp(
        &mut self,
        listener: TcpListener,
        mut serve: impl FnMut(TcpStream, SocketAddr) + Send + 'static,
    ) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        self.spawn(move |stop| {
            while !Background::stopped(stop) {
                match listener.accept() {
                    Ok((tcp, peer)) => serve(tcp, peer),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Ok(())
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// What the threads record, shared with the test; a thread that panicked holding it leaves
/// the record as it was.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
