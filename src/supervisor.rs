//! Supervision of the background refreshers: a refresher that panics is restarted with
//! backoff instead of leaving its keys or token to go stale for good, and each restart is
//! counted (metric `refresher_restarts_total{refresher}` and `/readyz`).

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::metrics::Metrics;

/// Which kind of refresher: the metric label, from this fixed set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refresher {
    Jwks,
    Token,
    Metadata,
}

impl Refresher {
    pub fn label(self) -> &'static str {
        match self {
            Self::Jwks => "jwks",
            Self::Token => "token",
            Self::Metadata => "metadata",
        }
    }
}

/// First and longest wait before a panicked refresher is restarted.
const RESTART_BASE: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);

/// Runs the refresher `start()` makes until it returns (it does when `cancel` fires) or
/// `cancel` fires. A panic restarts it after a backoff delay (reset once a run outlived the
/// longest delay), adding one to `restarts` and to the metric.
pub async fn supervise<F, Fut>(
    kind: Refresher,
    name: String,
    restarts: Arc<AtomicU64>,
    metrics: Metrics,
    cancel: CancellationToken,
    start: F,
) where
    F: Fn() -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut backoff = Backoff::new(RESTART_BASE, RESTART_MAX);
    loop {
        let started = Instant::now();
        let task = tokio::spawn(start());
        let abort = task.abort_handle();
        let outcome = tokio::select! {
            outcome = task => outcome,
            _ = cancel.cancelled() => {
                abort.abort();
                return;
            }
        };
        match outcome {
            Err(e) if e.is_panic() => {
                if started.elapsed() > RESTART_MAX {
                    backoff.reset();
                }
                let wait = backoff.next_delay();
                restarts.fetch_add(1, Ordering::Relaxed);
                metrics
                    .refresher_restarts_total
                    .with_label_values(&[kind.label()])
                    .inc();
                tracing::error!(refresher = kind.label(), %name, restart_in = ?wait, "refresher panicked; restarting it");
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test(start_paused = true)]
    async fn a_panicking_refresher_is_restarted_and_counted() {
        let metrics = Metrics::new().unwrap();
        let restarts = Arc::new(AtomicU64::new(0));
        let runs = Arc::new(AtomicUsize::new(0));
        let cancel = CancellationToken::new();
        let supervisor = tokio::spawn(supervise(
            Refresher::Token,
            "env".into(),
            restarts.clone(),
            metrics.clone(),
            cancel.clone(),
            {
                let runs = runs.clone();
                let cancel = cancel.clone();
                move || {
                    let run = runs.fetch_add(1, Ordering::SeqCst);
                    let cancel = cancel.clone();
                    async move {
                        if run < 2 {
                            panic!("refresher bug {run}");
                        }
                        cancel.cancelled().await;
                    }
                }
            },
        ));
        // Two panics, two restarts after their backoff delays; the third run keeps going.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        assert_eq!(restarts.load(Ordering::SeqCst), 2);
        assert_eq!(
            metrics
                .refresher_restarts_total
                .with_label_values(&["token"])
                .get(),
            2
        );
        cancel.cancel();
        supervisor.await.unwrap();
        assert_eq!(runs.load(Ordering::SeqCst), 3, "no restart after cancel");
    }

    #[tokio::test(start_paused = true)]
    async fn a_refresher_that_returns_is_not_restarted() {
        let runs = Arc::new(AtomicUsize::new(0));
        let counter = runs.clone();
        supervise(
            Refresher::Jwks,
            "issuer".into(),
            Arc::new(AtomicU64::new(0)),
            Metrics::new().unwrap(),
            CancellationToken::new(),
            move || {
                counter.fetch_add(1, Ordering::SeqCst);
                async {}
            },
        )
        .await;
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
