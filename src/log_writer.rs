//! Where log and audit lines go: a bounded queue in front of one writer thread, which
//! writes to stderr in batches. A request formats its line and moves on; it never waits
//! on stderr (a slow pipe, a full disk behind a collector). When the queue is full the
//! line is dropped and counted (`dynamics_gateway_log_lines_dropped_total`) rather than
//! blocking the request path.

use std::io::{BufWriter, Stderr};
use std::sync::OnceLock;

use tracing_appender::non_blocking::{ErrorCounter, NonBlocking, NonBlockingBuilder, WorkerGuard};

/// Lines held for the writer thread before new ones are dropped: a second or two at full
/// load, some MiB of memory at most (an audit line is a few hundred bytes).
const QUEUED_LINES: usize = 16 * 1024;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// The writer for the log layer, and the guard that flushes what is queued when dropped
/// (keep it until the process ends).
pub fn stderr() -> (NonBlocking, WorkerGuard) {
    // Buffered: the thread flushes when the queue runs dry, so a burst is a few writes.
    let out: BufWriter<Stderr> = BufWriter::new(std::io::stderr());
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("log-writer")
        .finish(out);
    let _ = DROPPED.set(writer.error_counter());
    (writer, guard)
}

/// Lines dropped so far because the queue was full (0 when logging is not set up).
pub(crate) fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}
