//! Where log and audit lines go: a bounded buffer that one writer thread empties to
//! stderr in batches. A request appends its line and moves on: it never waits on stderr
//! (a slow pipe, a full disk behind a collector) and never wakes the writer, which
//! collects for `FLUSH_EVERY` and writes what came in one call (issue 14's profile: a
//! queue handing the writer each line cost a wake-up and a `write` per request). Lines
//! that do not fit, or that the write fails for, are dropped and counted
//! (`dynamics_gateway_log_lines_dropped_total`).

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use tracing_subscriber::fmt::MakeWriter;

/// How long lines collect before a write (also the most a line waits to be written).
const FLUSH_EVERY: Duration = Duration::from_millis(50);
/// A buffer this full is written at once rather than at the end of the period.
const WRITE_AT_BYTES: usize = 64 * 1024;
/// Bytes held for the writer before new lines are dropped: about a third of a second of
/// audit lines at full load.
const MAX_BUFFERED_BYTES: usize = 4 * 1024 * 1024;
/// A batch buffer grown past this by a burst is given back afterwards.
const KEEP_CAPACITY: usize = 1024 * 1024;
/// Longest wait at exit for the buffered lines to be written: a stderr nobody reads must
/// not keep the process from exiting.
const EXIT_WAIT: Duration = Duration::from_secs(2);

/// The process's log writer, for the metrics (set by [`stderr`]).
static PROCESS: OnceLock<Arc<Shared>> = OnceLock::new();

struct Shared {
    pending: Mutex<Pending>,
    /// Signalled when lines arrive in an empty buffer, the buffer passes
    /// `WRITE_AT_BYTES`, or the process is closing.
    ready: Condvar,
    dropped: AtomicU64,
}

#[derive(Default)]
struct Pending {
    bytes: Vec<u8>,
    lines: u64,
    closing: bool,
}

impl Shared {
    fn pending(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Appends one line (the formatter hands over each event whole), or drops it.
    fn push(&self, line: &[u8]) {
        let mut pending = self.pending();
        let before = pending.bytes.len();
        if before + line.len() > MAX_BUFFERED_BYTES {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        pending.bytes.extend_from_slice(line);
        pending.lines += 1;
        let after = pending.bytes.len();
        drop(pending);
        if before == 0 || (before < WRITE_AT_BYTES && after >= WRITE_AT_BYTES) {
            self.ready.notify_one();
        }
    }

    /// The writer thread: waits for lines, lets them collect, writes them in one call.
    fn write_out(&self, mut out: impl Write) {
        let mut batch = Vec::new();
        loop {
            let mut pending = self.pending();
            while pending.bytes.is_empty() && !pending.closing {
                pending = self
                    .ready
                    .wait(pending)
                    .unwrap_or_else(PoisonError::into_inner);
            }
            pending = self
                .ready
                .wait_timeout_while(pending, FLUSH_EVERY, |p| {
                    p.bytes.len() < WRITE_AT_BYTES && !p.closing
                })
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            std::mem::swap(&mut pending.bytes, &mut batch);
            let lines = std::mem::take(&mut pending.lines);
            let closing = pending.closing && batch.is_empty();
            drop(pending);
            if closing {
                return;
            }
            if out.write_all(&batch).and_then(|()| out.flush()).is_err() {
                self.dropped.fetch_add(lines, Ordering::Relaxed);
            }
            batch.clear();
            if batch.capacity() > KEEP_CAPACITY {
                batch.shrink_to(WRITE_AT_BYTES);
            }
        }
    }
}

/// The writer the log layer is given.
#[derive(Clone)]
pub struct LogWriter(Arc<Shared>);

/// One event's line on its way into the buffer.
pub struct LineWriter<'a>(&'a Shared);

impl Write for LineWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.push(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> MakeWriter<'a> for LogWriter {
    type Writer = LineWriter<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        LineWriter(&self.0)
    }
}

/// Writes out what is buffered and stops the writer thread when dropped, waiting at most
/// `EXIT_WAIT` (a writer stuck on a full pipe is left behind): keep it until the process
/// ends.
pub struct FlushGuard {
    shared: Arc<Shared>,
    /// Disconnected when the writer thread has written everything and returned.
    finished: mpsc::Receiver<()>,
}

impl Drop for FlushGuard {
    fn drop(&mut self) {
        self.shared.pending().closing = true;
        self.shared.ready.notify_one();
        let _ = self.finished.recv_timeout(EXIT_WAIT);
    }
}

/// Starts a writer thread writing to `out`.
fn start(out: impl Write + Send + 'static) -> std::io::Result<(LogWriter, FlushGuard)> {
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending::default()),
        ready: Condvar::new(),
        dropped: AtomicU64::new(0),
    });
    let writer = shared.clone();
    let (done, finished) = mpsc::channel::<()>();
    std::thread::Builder::new()
        .name("log-writer".into())
        .spawn(move || {
            writer.write_out(out);
            drop(done);
        })?;
    Ok((LogWriter(shared.clone()), FlushGuard { shared, finished }))
}

/// The writer for the process's log on stderr, and its guard.
pub fn stderr() -> std::io::Result<(LogWriter, FlushGuard)> {
    let (writer, guard) = start(std::io::stderr())?;
    let _ = PROCESS.set(writer.0.clone());
    Ok((writer, guard))
}

/// Lines dropped so far, for the buffer being full or stderr failing (0 when logging is
/// not set up).
pub(crate) fn dropped_lines() -> u64 {
    PROCESS
        .get()
        .map_or(0, |shared| shared.dropped.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the writer thread wrote, and a gate that holds its writes while closed.
    #[derive(Clone, Default)]
    struct Sink {
        written: Arc<Mutex<Vec<u8>>>,
        writes: Arc<AtomicU64>,
    }

    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.writes.fetch_add(1, Ordering::Relaxed);
            self.written.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn line(writer: &LogWriter, text: &str) {
        writer.make_writer().write_all(text.as_bytes()).unwrap();
    }

    #[test]
    fn every_line_is_written_in_order_in_few_writes_and_flushed_at_the_end() {
        let sink = Sink::default();
        let (writer, guard) = start(sink.clone()).unwrap();
        for i in 0..10_000 {
            line(&writer, &format!("line {i}\n"));
        }
        drop(guard);
        let written = String::from_utf8(sink.written.lock().unwrap().clone()).unwrap();
        let expected: String = (0..10_000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(written, expected);
        let writes = sink.writes.load(Ordering::Relaxed);
        assert!(writes < 100, "10,000 lines took {writes} writes");
        assert_eq!(writer.0.dropped.load(Ordering::Relaxed), 0);
    }

    /// A sink whose writes wait until the test lets them go.
    struct Stalled(Mutex<mpsc::Receiver<()>>);

    impl Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _ = self.0.lock().unwrap().recv();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_writer_holds_at_most_the_bound_and_counts_what_it_drops() {
        let (release, gate) = mpsc::channel();
        let (writer, guard) = start(Stalled(Mutex::new(gate))).unwrap();
        let text = format!("{}\n", "x".repeat(1023));
        // The first batch is taken by the writer and stalls; the buffer then fills.
        line(&writer, &text);
        while writer.0.pending().lines > 0 {
            std::thread::yield_now();
        }
        let sent = 2 * MAX_BUFFERED_BYTES / text.len();
        for _ in 0..sent {
            line(&writer, &text);
        }
        let held = writer.0.pending().bytes.len();
        assert!(held <= MAX_BUFFERED_BYTES, "held {held} bytes");
        let kept = (MAX_BUFFERED_BYTES / text.len()) as u64;
        assert_eq!(writer.0.pending().lines, kept);
        assert_eq!(writer.0.dropped.load(Ordering::Relaxed), sent as u64 - kept);
        drop(release);
        drop(guard);
    }

    #[test]
    fn a_writer_stuck_on_its_output_does_not_hold_up_the_exit() {
        let (_never_released, gate) = mpsc::channel();
        let (writer, guard) = start(Stalled(Mutex::new(gate))).unwrap();
        line(&writer, "stuck\n");
        while writer.0.pending().lines > 0 {
            std::thread::yield_now();
        }
        let (dropped, done) = mpsc::channel();
        std::thread::spawn(move || {
            drop(guard);
            let _ = dropped.send(());
        });
        assert!(
            done.recv_timeout(EXIT_WAIT * 5).is_ok(),
            "dropping the guard waits for the stuck writer"
        );
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_a_failing_stderr_loses_are_counted() {
        let (writer, guard) = start(Broken).unwrap();
        for _ in 0..25 {
            line(&writer, "lost\n");
        }
        drop(guard);
        assert_eq!(writer.0.dropped.load(Ordering::Relaxed), 25);
    }
}
