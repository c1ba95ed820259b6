//! The accept loop shared by the app listener and the admin listener: HTTP/1.1 and h2c
//! on each connection, bounded in number (overall and per peer address) and in time
//! (to the first request, between requests, HTTP/2 pings), and a graceful drain on
//! shutdown (stop accepting, let in-flight requests finish within the grace period,
//! then close what is left).

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, Version};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use prometheus::IntGauge;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::body::{BoxError, GatewayBody};
use crate::error::ConnectionRefused;
use crate::request_threads::RequestThreads;

/// Limits applied to every inbound connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Time a client has to send a request head (slowloris), and from accept to the
    /// first complete request head whatever the protocol.
    pub header_read_timeout: Duration,
    /// A connection with no request in progress is closed after this long (a request
    /// head begun meanwhile has `header_read_timeout` from its first byte).
    pub idle_timeout: Duration,
    /// HTTP/2: ping a connection silent this long ...
    pub http2_keep_alive_interval: Duration,
    /// ... and close it if the ping is not answered within this.
    pub http2_keep_alive_timeout: Duration,
    /// Longest wait for in-flight requests at shutdown.
    pub shutdown_grace: Duration,
    /// Open connections beyond this are answered 503 and closed.
    pub max_connections: usize,
    /// Open connections from one peer address beyond this are answered 503 and closed.
    pub max_connections_per_peer: Option<NonZeroUsize>,
}

impl ConnectionLimits {
    pub fn from_config(server: &crate::config::ServerConfig) -> Self {
        Self {
            header_read_timeout: server.header_read_timeout,
            idle_timeout: server.idle_timeout,
            http2_keep_alive_interval: server.http2_keep_alive_interval,
            http2_keep_alive_timeout: server.http2_keep_alive_timeout,
            shutdown_grace: server.shutdown_grace,
            max_connections: server.max_connections,
            max_connections_per_peer: server.max_connections_per_peer,
        }
    }
}

/// Largest request head accepted (a 16 KiB token plus ordinary headers fits easily).
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in one request head.
const MAX_HEADERS: usize = 100;

/// What sets the app port and the admin port apart.
pub struct Port {
    pub name: &'static str,
    /// Counts the connections being served.
    pub open: IntGauge,
    pub tls: Option<crate::tls::TlsAcceptor>,
    /// Where connections are accepted and run: on each request thread, or on this runtime.
    pub threads: Option<Arc<RequestThreads>>,
}

/// Serves connections from `listener` until `shutdown` is cancelled, then drains.
/// `make_service` builds the per-connection service from the peer address.
pub async fn serve<M, S, F, E>(
    listener: TcpListener,
    make_service: M,
    shutdown: CancellationToken,
    limits: ConnectionLimits,
    port: Port,
) where
    M: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Response<GatewayBody>, Error = E, Future = F>
        + Send
        + 'static,
    F: Future<Output = Result<Response<GatewayBody>, E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper starts this clock when the previous response is done, not at the first
        // byte of the next head; the watcher enforces header_read_timeout from that byte
        // and from accept, so hyper's is only a backstop.
        .header_read_timeout(limits.header_read_timeout + limits.idle_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(limits.http2_keep_alive_interval)
        .keep_alive_timeout(limits.http2_keep_alive_timeout)
        .max_header_list_size(MAX_HEAD_BYTES as u32);
    let Port {
        name,
        open,
        tls,
        threads,
    } = port;
    let acceptor = Arc::new(Acceptor {
        make_service,
        http1_only: builder.clone().http1_only(),
        http2_only: builder.clone().http2_only(),
        builder,
        connections: Arc::new(Semaphore::new(limits.max_connections)),
        peers: limits
            .max_connections_per_peer
            .map(|max| Arc::new(PeerConnections::new(max.get()))),
        refusal_log: Mutex::new(RefusalLog::new()),
        limits,
        name,
        open,
        tls,
        drain: CancellationToken::new(),
        abort: CancellationToken::new(),
        tasks: TaskTracker::new(),
    });
    match threads {
        None => acceptor.clone().accept(listener, shutdown).await,
        Some(threads) => {
            // Each request thread accepts from the same socket and serves what it
            // accepted itself: a connection never changes threads.
            let loops = TaskTracker::new();
            match listener.into_std() {
                Ok(listener) => {
                    for runtime in threads.runtimes() {
                        let listener = match listener.try_clone() {
                            Ok(listener) => listener,
                            Err(e) => {
                                tracing::error!(listener = name, error = %e, "a request thread cannot accept: the others serve the port");
                                continue;
                            }
                        };
                        let (acceptor, shutdown) = (acceptor.clone(), shutdown.clone());
                        runtime.spawn(loops.track_future(async move {
                            match TcpListener::from_std(listener) {
                                Ok(listener) => acceptor.accept(listener, shutdown).await,
                                Err(e) => {
                                    tracing::error!(listener = name, error = %e, "cannot accept on a request thread")
                                }
                            }
                        }));
                    }
                }
                Err(e) => {
                    tracing::error!(listener = name, error = %e, "cannot hand the listener to the request threads")
                }
            }
            loops.close();
            loops.wait().await;
        }
    }
    acceptor.drain.cancel();
    acceptor.tasks.close();
    tokio::select! {
        _ = acceptor.tasks.wait() => tracing::debug!(listener = name, "all connections drained"),
        _ = tokio::time::sleep(limits.shutdown_grace) => {
            tracing::warn!(listener = name, grace = ?limits.shutdown_grace, "shutdown grace elapsed; closing remaining connections");
            acceptor.abort.cancel();
        }
    }
}

/// What the accept loops of one port share: the service, the connection limits and the
/// drain.
struct Acceptor<M> {
    make_service: M,
    /// Reads the first bytes to tell HTTP/2's preface from HTTP/1 (TLS ports).
    builder: auto::Builder<TokioExecutor>,
    /// The same settings for one protocol, chosen by a peek at the first bytes (plain ports).
    http1_only: auto::Builder<TokioExecutor>,
    http2_only: auto::Builder<TokioExecutor>,
    connections: Arc<Semaphore>,
    peers: Option<Arc<PeerConnections>>,
    refusal_log: Mutex<RefusalLog>,
    limits: ConnectionLimits,
    name: &'static str,
    open: IntGauge,
    tls: Option<crate::tls::TlsAcceptor>,
    /// Cancelled at shutdown: every connection finishes its requests and closes.
    drain: CancellationToken,
    /// Cancelled when the grace is over: what is left is closed at once.
    abort: CancellationToken,
    tasks: TaskTracker,
}

impl<M, S, F, E> Acceptor<M>
where
    M: Fn(SocketAddr) -> S + Send + Sync + 'static,
    S: Service<Request<Incoming>, Response = Response<GatewayBody>, Error = E, Future = F>
        + Send
        + 'static,
    F: Future<Output = Result<Response<GatewayBody>, E>> + Send + 'static,
    E: Into<BoxError> + 'static,
{
    /// Accepts until `shutdown`, serving each connection on this runtime.
    async fn accept(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        let name = self.name;
        loop {
            let (stream, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        // Out of file descriptors and the like: back off instead of spinning.
                        tracing::warn!(listener = name, error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let peer_slot = match &self.peers {
                None => None,
                Some(peers) => match peers.try_acquire(peer.ip()) {
                    Some(slot) => Some(slot),
                    None => {
                        self.refuse(stream, peer, ConnectionRefused::TooManyFromPeer(peers.max));
                        continue;
                    }
                },
            };
            let Ok(permit) = self.connections.clone().try_acquire_owned() else {
                self.refuse(
                    stream,
                    peer,
                    ConnectionRefused::TooMany(self.limits.max_connections),
                );
                continue;
            };
            let _ = stream.set_nodelay(true);
            let activity = Arc::new(Activity::new());
            let open = OpenConnection::new(self.open.clone());
            let acceptor = self.clone();
            self.tasks.spawn(async move {
                let _slots = (permit, peer_slot, open);
                let outcome = acceptor.serve(stream, peer, activity).await;
                tracing::debug!(listener = name, %peer, outcome, "connection closed");
            });
        }
    }

    /// Serves one accepted connection to its end; says how it ended.
    async fn serve(
        &self,
        stream: TcpStream,
        peer: SocketAddr,
        activity: Arc<Activity>,
    ) -> &'static str {
        let builder = if self.tls.is_some() {
            &self.builder
        } else {
            let deadline = activity.started + self.limits.header_read_timeout;
            match sniff(&stream, deadline, &self.drain).await {
                Ok(Some(Protocol::Http1)) => &self.http1_only,
                Ok(Some(Protocol::Http2)) => &self.http2_only,
                Ok(None) => &self.builder,
                Err(outcome) => return outcome,
            }
        };
        // On a TLS port the handshake runs inside the connection, under its deadlines.
        let (io, client_certificate) = crate::tls::accept(
            self.tls.as_ref(),
            WatchedIo {
                stream,
                activity: activity.clone(),
            },
        );
        let service = Tracked {
            inner: client_certificate.attach((self.make_service)(peer)),
            activity: activity.clone(),
        };
        let connection = builder
            .serve_connection(TokioIo::new(io), service)
            .into_owned();
        watch(connection, &activity, self.limits, &self.drain, &self.abort).await
    }

    fn refuse(&self, stream: TcpStream, peer: SocketAddr, refused: ConnectionRefused) {
        let response = self
            .refusal_log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .record(peer, refused, self.name);
        if self.tls.is_some() {
            // A plaintext 503 is garbage to a TLS client, and a handshake per refused
            // connection would hand a connection flood the server's most expensive work:
            // close, which TLS clients see as a reset they retry.
            drop(stream);
            return;
        }
        tokio::spawn(refuse(stream, response));
    }
}

/// How a connection that never started a request ended (debug log).
const CLOSED_AT_SHUTDOWN_IDLE: &str = "closed at shutdown: no request in progress";
const CLOSED_NO_FIRST_HEAD: &str = "closed: no complete request head within header_read_timeout";

/// The protocol a plain connection's first bytes announce.
enum Protocol {
    Http1,
    Http2,
}

/// HTTP/2's connection preface, the first bytes of every prior-knowledge HTTP/2 connection.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Peeks at the first bytes, leaving them for the connection to read: with the protocol known,
/// hyper reads the whole first head into its buffer in one read. (Telling them apart by
/// reading, as the auto builder does, hands hyper the first 24 bytes as a short read, after
/// which its read buffer doubles to 16 KiB for every connection.) `None`: the bytes so far
/// are the start of the preface, or the peer closed; the auto builder decides by reading.
/// `Err`: nothing arrived before `deadline` or the shutdown, and the connection is closed.
async fn sniff(
    stream: &TcpStream,
    deadline: Instant,
    drain: &CancellationToken,
) -> Result<Option<Protocol>, &'static str> {
    let mut first = [0u8; HTTP2_PREFACE.len()];
    let n = tokio::select! {
        peeked = stream.peek(&mut first) => peeked.unwrap_or(0),
        () = tokio::time::sleep_until(deadline) => return Err(CLOSED_NO_FIRST_HEAD),
        _ = drain.cancelled() => return Err(CLOSED_AT_SHUTDOWN_IDLE),
    };
    Ok(if n == 0 {
        None
    } else if !HTTP2_PREFACE.starts_with(&first[..n]) {
        Some(Protocol::Http1)
    } else if n == HTTP2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    })
}

/// Runs one connection to its end under the time limits; says how it ended.
async fn watch<C, E>(
    connection: C,
    activity: &Activity,
    limits: ConnectionLimits,
    drain: &CancellationToken,
    abort: &CancellationToken,
) -> &'static str
where
    C: Future<Output = Result<(), E>> + GracefulConnection,
    E: std::fmt::Display,
{
    tokio::pin!(connection);
    let mut closing = false;
    let mut check_at = activity.started + limits.header_read_timeout;
    loop {
        tokio::select! {
            result = &mut connection => {
                return match result {
                    Ok(()) => "ended",
                    Err(e) => {
                        tracing::debug!(error = %e, "connection ended with an error");
                        "failed"
                    }
                };
            }
            _ = abort.cancelled() => return "aborted at the end of the shutdown grace",
            _ = drain.cancelled(), if !closing => {
                // HTTP/1 with no request in progress: at most a head is half sent, and a
                // peer that trickles one must not hold the shutdown for the whole grace.
                if !activity.http2.load(Ordering::Acquire) && activity.idle_since().is_some() {
                    return CLOSED_AT_SHUTDOWN_IDLE;
                }
                closing = true;
                connection.as_mut().graceful();
                check_at = Instant::now() + limits.shutdown_grace;
            }
            () = activity.changed.notified(), if !closing => {
                check_at = Instant::now();
            }
            () = tokio::time::sleep_until(check_at) => {
                if closing {
                    // Closing gracefully did not end it in time: close it now.
                    return "closed when a graceful close did not finish";
                }
                match activity.next(limits, Instant::now()) {
                    Next::CheckAt(at) => check_at = at,
                    // Nothing is in progress, so nothing is lost by dropping it.
                    Next::Close(reason) => return reason,
                    Next::CloseGracefully => {
                        closing = true;
                        connection.as_mut().graceful();
                        check_at = Instant::now() + limits.header_read_timeout;
                    }
                }
            }
        }
    }
}

/// What the watcher does next with a connection.
enum Next {
    CheckAt(Instant),
    Close(&'static str),
    CloseGracefully,
}

/// The connection's socket, telling the watcher when bytes arrive.
struct WatchedIo {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl tokio::io::AsyncRead for WatchedIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.stream).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.on_read();
        }
        result
    }
}

impl tokio::io::AsyncWrite for WatchedIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// A connection that can be asked to finish its requests and close.
trait GracefulConnection {
    fn graceful(self: Pin<&mut Self>);
}

impl<I, S, E> GracefulConnection for auto::Connection<'static, I, S, E>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<BoxError>,
    S::ResBody: http_body::Body + Send + 'static,
    <S::ResBody as http_body::Body>::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn graceful(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// What the connection's watcher needs to know about its requests.
struct Activity {
    started: Instant,
    /// Whether a complete request head has arrived (the service was called).
    seen_request: AtomicBool,
    /// Whether the requests come over HTTP/2 (whose pings and window updates are not
    /// the start of a request head).
    http2: AtomicBool,
    /// Requests whose response has not been sent completely.
    in_progress: AtomicUsize,
    /// Milliseconds after `started` at which the last request finished.
    idle_since_ms: AtomicU64,
    /// Set when the connection becomes idle; cleared by the first byte read after that,
    /// which on HTTP/1 starts the next request head.
    awaiting_head: AtomicBool,
    /// Milliseconds after `started` of that first byte.
    head_started_ms: AtomicU64,
    /// Signalled when the connection becomes idle or the next head starts.
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            seen_request: AtomicBool::new(false),
            in_progress: AtomicUsize::new(0),
            http2: AtomicBool::new(false),
            idle_since_ms: AtomicU64::new(0),
            awaiting_head: AtomicBool::new(false),
            head_started_ms: AtomicU64::new(0),
            changed: Notify::new(),
        }
    }

    fn at(&self, ms: &AtomicU64) -> Instant {
        self.started + Duration::from_millis(ms.load(Ordering::Acquire))
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Bytes arrived from the peer.
    fn on_read(&self) {
        if self.awaiting_head.load(Ordering::Acquire) {
            self.head_started_ms
                .store(self.elapsed_ms(), Ordering::Release);
            self.awaiting_head.store(false, Ordering::Release);
            self.changed.notify_one();
        }
    }

    /// The connection's state against its deadlines: the first request head within
    /// `header_read_timeout` of accept; an idle connection closed after `idle_timeout`;
    /// on HTTP/1 a head started while idle complete within `header_read_timeout`.
    fn next(&self, limits: ConnectionLimits, now: Instant) -> Next {
        if !self.seen_request.load(Ordering::Acquire) {
            let by = self.started + limits.header_read_timeout;
            return if now >= by {
                Next::Close(CLOSED_NO_FIRST_HEAD)
            } else {
                Next::CheckAt(by)
            };
        }
        // In progress: the watcher is told when that changes.
        let Some(since) = self.idle_since() else {
            return Next::CheckAt(now + limits.idle_timeout);
        };
        let head_started =
            !self.http2.load(Ordering::Acquire) && !self.awaiting_head.load(Ordering::Acquire);
        if head_started {
            let by = self.at(&self.head_started_ms) + limits.header_read_timeout;
            return if now >= by {
                Next::Close("closed: next request head not complete within header_read_timeout")
            } else {
                Next::CheckAt(by)
            };
        }
        let by = since + limits.idle_timeout;
        if now >= by {
            Next::CloseGracefully
        } else {
            Next::CheckAt(by)
        }
    }

    /// When the connection last became idle, or `None` while a request is in progress.
    fn idle_since(&self) -> Option<Instant> {
        (self.in_progress.load(Ordering::Acquire) == 0).then(|| self.at(&self.idle_since_ms))
    }
}

/// Counts a request as in progress until its response body is done with.
struct InProgress(Arc<Activity>);

impl InProgress {
    fn start(activity: Arc<Activity>, version: Version) -> Self {
        if version == Version::HTTP_2 {
            activity.http2.store(true, Ordering::Release);
        }
        activity.seen_request.store(true, Ordering::Release);
        activity.in_progress.fetch_add(1, Ordering::AcqRel);
        Self(activity)
    }
}

impl Drop for InProgress {
    fn drop(&mut self) {
        let activity = &self.0;
        activity
            .idle_since_ms
            .fetch_max(activity.elapsed_ms(), Ordering::AcqRel);
        if activity.in_progress.fetch_sub(1, Ordering::AcqRel) == 1 {
            activity.awaiting_head.store(true, Ordering::Release);
            activity.changed.notify_one();
        }
    }
}

/// The per-connection service, marking each request in progress for the watcher.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

type TrackedFuture<E> = Pin<Box<dyn Future<Output = Result<Response<TrackedBody>, E>> + Send>>;

impl<S, F, E> Service<Request<Incoming>> for Tracked<S>
where
    S: Service<Request<Incoming>, Response = Response<GatewayBody>, Error = E, Future = F>,
    F: Future<Output = Result<Response<GatewayBody>, E>> + Send + 'static,
{
    type Response = Response<TrackedBody>;
    type Error = E;
    type Future = TrackedFuture<E>;

    fn call(&self, request: Request<Incoming>) -> Self::Future {
        let in_progress = InProgress::start(self.activity.clone(), request.version());
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| TrackedBody {
                inner,
                _in_progress: in_progress,
            }))
        })
    }
}

/// A response body that keeps its request counted as in progress until it is dropped.
pub struct TrackedBody {
    inner: GatewayBody,
    _in_progress: InProgress,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// One connection counted in the `open_connections` gauge while it lives.
struct OpenConnection(IntGauge);

impl OpenConnection {
    fn new(gauge: IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Open connections per peer address.
struct PeerConnections {
    max: usize,
    open: Mutex<HashMap<IpAddr, usize>>,
}

/// One open connection counted against its peer address; released on drop.
struct PeerSlot {
    peers: Arc<PeerConnections>,
    ip: IpAddr,
}

impl PeerConnections {
    fn new(max: usize) -> Self {
        Self {
            max,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn try_acquire(self: &Arc<Self>, ip: IpAddr) -> Option<PeerSlot> {
        // An IPv4 peer reached over a dual-stack socket is the same peer.
        let ip = ip.to_canonical();
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let count = open.entry(ip).or_insert(0);
        if *count >= self.max {
            return None;
        }
        *count += 1;
        Some(PeerSlot {
            peers: self.clone(),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut open = self
            .peers
            .open
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

/// Tells a connection over a limit why it is closed, without reading its request.
async fn refuse(mut stream: TcpStream, response: Vec<u8>) {
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&response)).await;
    let _ = stream.shutdown().await;
}

/// Refused-connection warnings written per second at most; the rest are counted, so a
/// flood of connections cannot fill the log.
const REFUSAL_WARNINGS_PER_SECOND: u32 = 10;

/// The accept loop's log of refused connections, rate-limited.
struct RefusalLog {
    window_started: Instant,
    written: u32,
    suppressed: u64,
}

impl RefusalLog {
    fn new() -> Self {
        Self {
            window_started: Instant::now(),
            written: 0,
            suppressed: 0,
        }
    }

    /// Whether this refusal gets its own line; the count of those that did not is
    /// reported with the first line of the next second.
    fn admit(&mut self) -> (bool, u64) {
        let mut reported = 0;
        if self.window_started.elapsed() >= Duration::from_secs(1) {
            reported = std::mem::take(&mut self.suppressed);
            self.window_started = Instant::now();
            self.written = 0;
        }
        if self.written >= REFUSAL_WARNINGS_PER_SECOND {
            self.suppressed += 1;
            return (false, reported);
        }
        self.written += 1;
        (true, reported)
    }

    /// Logs the refusal (within the rate) and returns the response for the connection,
    /// with a new request id the log line and the caller share.
    fn record(
        &mut self,
        peer: SocketAddr,
        refused: ConnectionRefused,
        name: &'static str,
    ) -> Vec<u8> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let (log, suppressed) = self.admit();
        if suppressed > 0 {
            tracing::warn!(
                listener = name,
                suppressed,
                "refused-connection warnings suppressed in the last second"
            );
        }
        if log {
            tracing::warn!(listener = name, %peer, request_id, reason = %refused, "connection refused");
        }
        refused.http1_response(&request_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn refusal_warnings_are_capped_per_second_and_the_rest_counted() {
        let mut log = RefusalLog::new();
        let admitted = (0..100).filter(|_| log.admit().0).count();
        assert_eq!(admitted, REFUSAL_WARNINGS_PER_SECOND as usize);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(
            log.admit(),
            (true, 100 - u64::from(REFUSAL_WARNINGS_PER_SECOND))
        );
        assert_eq!(log.admit(), (true, 0));
    }

    #[test]
    fn per_peer_slots_are_counted_per_address_and_released_on_drop() {
        let peers = Arc::new(PeerConnections::new(2));
        let a: IpAddr = "10.0.0.1"
            .parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let mapped: IpAddr = "::ffff:10.0.0.1"
            .parse()
            .unwrap_or(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
        let first = peers.try_acquire(a);
        let second = peers.try_acquire(mapped);
        assert!(first.is_some() && second.is_some());
        assert!(
            peers.try_acquire(a).is_none(),
            "the mapped form is the same peer"
        );
        assert!(peers.try_acquire("10.0.0.2".parse().unwrap()).is_some());
        drop(first);
        assert!(peers.try_acquire(a).is_some());
    }
}
