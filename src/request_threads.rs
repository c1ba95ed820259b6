//! The request threads: one per core, each a single-threaded runtime accepting from the
//! shared listening socket and serving what it accepted, with its own upstream
//! connection pool. A
//! request, its upstream call and its response then stay on one thread: no wake-up of
//! another thread on the request path (issue 14's profile: a pooled connection's task on
//! another worker cost more than the request's own work).

use std::cell::Cell;
use std::sync::{Mutex, PoisonError};
use std::thread::JoinHandle;

use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

thread_local! {
    static CURRENT: Cell<Option<usize>> = const { Cell::new(None) };
}

/// Which request thread this is (`0..count`), or `None` on any other thread.
pub fn current() -> Option<usize> {
    CURRENT.with(Cell::get)
}

/// The running request threads; stopped (and joined) on drop.
pub struct RequestThreads {
    runtimes: Vec<Handle>,
    stop: CancellationToken,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl RequestThreads {
    /// Starts `count` threads (at least one), each running its own runtime.
    pub fn start(count: usize) -> std::io::Result<Self> {
        let stop = CancellationToken::new();
        let mut runtimes = Vec::with_capacity(count.max(1));
        let mut threads = Vec::with_capacity(count.max(1));
        for index in 0..count.max(1) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            runtimes.push(runtime.handle().clone());
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("request-{index}"))
                    .spawn(move || {
                        CURRENT.with(|current| current.set(Some(index)));
                        runtime.block_on(stop.cancelled());
                    })?,
            );
        }
        Ok(Self {
            runtimes,
            stop,
            threads: Mutex::new(threads),
        })
    }

    /// The threads' runtimes, to start a task on each.
    pub fn runtimes(&self) -> &[Handle] {
        &self.runtimes
    }
}

impl Drop for RequestThreads {
    fn drop(&mut self) {
        self.stop.cancel();
        let threads =
            std::mem::take(&mut *self.threads.lock().unwrap_or_else(PoisonError::into_inner));
        for thread in threads {
            // Tasks still on a thread are dropped with its runtime; nothing to report.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_task_on_each_runtime_runs_on_its_own_thread_and_knows_which_one() {
        let threads = RequestThreads::start(2).unwrap();
        assert_eq!(current(), None, "the caller is no request thread");
        let (tx, rx) = std::sync::mpsc::channel();
        for runtime in threads.runtimes() {
            let tx = tx.clone();
            runtime.spawn(async move {
                let _ = tx.send((current(), std::thread::current().name().map(String::from)));
            });
        }
        let mut seen: Vec<_> = (0..2).map(|_| rx.recv().unwrap()).collect();
        seen.sort();
        assert_eq!(
            seen,
            vec![
                (Some(0), Some("request-0".into())),
                (Some(1), Some("request-1".into())),
            ]
        );
        drop(threads);
    }
}
