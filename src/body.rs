//! The body type every response and forwarded request uses: a boxed stream of bytes, so
//! upstream bodies pass through without being collected.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full, LengthLimitError, Limited};
use tokio::sync::oneshot;
use tokio::time::{Instant, Sleep};

/// Error type carried by streamed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed body as it passes through the gateway.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body of known bytes.
pub fn full(bytes: impl Into<Bytes>) -> GatewayBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body with nothing in it.
pub fn empty() -> GatewayBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Boxes any body whose error converts into `BoxError`.
pub fn boxed<B>(body: B) -> GatewayBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Bytes already read from a body, followed by the rest of it.
pub struct PrefixedBody {
    prefix: Option<Bytes>,
    rest: GatewayBody,
}

impl PrefixedBody {
    pub fn new(prefix: Bytes, rest: GatewayBody) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest,
        }
    }
}

impl http_body::Body for PrefixedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        if let Some(prefix) = self.prefix.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(prefix))));
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }
}

/// A caller's request body without its trailers. Dataverse has no use for request trailers,
/// and they would reach it past the header filter (impersonation and credential headers,
/// method overrides, connection headers an HTTP/2 hop refuses) if passed on.
pub struct WithoutTrailers<B>(pub B);

impl<B> http_body::Body for WithoutTrailers<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        loop {
            match std::task::ready!(Pin::new(&mut self.0).poll_frame(cx)) {
                Some(Ok(frame)) if frame.is_trailers() => continue,
                other => return Poll::Ready(other),
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.0.size_hint()
    }
}

/// The most the gateway reads of any document from a dependency (discovery, JWKS, token
/// endpoint, IMDS, user lookup): each is a few KiB, so 1 MiB is generous, and a
/// dependency streaming without end costs at most this much memory.
pub const MAX_DEPENDENCY_BODY_BYTES: usize = 1024 * 1024;

/// Why a capped read gave up.
#[derive(Debug, thiserror::Error)]
pub enum CappedReadError {
    #[error("the body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the body could not be read")]
    Read(#[source] BoxError),
}

/// Reads a whole body of at most `limit` bytes. A declared length over the limit fails
/// before anything is read; otherwise reading stops at the first byte over it, and the
/// body (and with it the connection) is dropped rather than drained.
pub async fn read_capped<B>(body: B, limit: usize) -> Result<Bytes, CappedReadError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let too_large = CappedReadError::TooLarge { limit };
    if usize::try_from(http_body::Body::size_hint(&body).lower()).map_or(true, |n| n > limit) {
        return Err(too_large);
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large),
        Err(e) => Err(CappedReadError::Read(e)),
    }
}

/// [`read_capped`] for a `reqwest` response's body.
pub async fn read_response_capped(
    response: reqwest::Response,
    limit: usize,
) -> Result<Bytes, CappedReadError> {
    read_capped(http::Response::from(response).into_body(), limit).await
}

/// Why a request body stopped being read before its end.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum BodyTimeout {
    #[error("no request body bytes arrived for {} (server.body_read_timeout); send the body without pausing", humantime::format_duration(*.0))]
    Idle(Duration),
    #[error("the request body was still arriving when the {} allowed for the whole request ran out (server.exchange_timeout)", humantime::format_duration(*.0))]
    Deadline(Duration),
    #[error("the request body arrived slower than {} bytes a second over {} (server.min_body_rate); send it faster", .0.bytes_per_second, humantime::format_duration(.0.window))]
    TooSlow(MinBodyRate),
}

/// The slowest a request body may arrive: every `window` spent waiting for the caller's
/// bytes must bring at least `bytes_per_second` times its length. Measured per window, so
/// a fast start buys no credit for a trickle afterwards, and only while the gateway waits
/// for the caller (time Dataverse takes to read does not count).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MinBodyRate {
    pub bytes_per_second: u64,
    pub window: Duration,
}

impl MinBodyRate {
    /// Bytes each window must bring.
    fn per_window(&self) -> u64 {
        let bytes = u128::from(self.bytes_per_second) * self.window.as_millis() / 1000;
        u64::try_from(bytes).unwrap_or(u64::MAX)
    }
}

/// The clocks a request body runs under.
#[derive(Debug, Clone, Copy)]
pub struct BodyClocks {
    /// Longest wait for the next bytes.
    pub idle: Duration,
    /// `None`: any rate, within `idle` and the deadline.
    pub min_rate: Option<MinBodyRate>,
    /// The whole exchange's limit, named when `deadline` passes.
    pub exchange_timeout: Duration,
    pub deadline: Instant,
}

/// Where a body stands against its [`MinBodyRate`].
#[derive(Debug, Default)]
struct RateWindow {
    /// Time waited for the caller in the current window.
    waited: Duration,
    /// Bytes received in the current window.
    received: u64,
}

impl RateWindow {
    /// Counts a wait that ended with `bytes`; false if a window closed short of its bytes.
    fn record(&mut self, rate: MinBodyRate, waited: Duration, bytes: u64) -> bool {
        self.waited += waited;
        self.received = self.received.saturating_add(bytes);
        while self.waited >= rate.window {
            if self.received < rate.per_window() {
                return false;
            }
            self.waited -= rate.window;
            self.received = 0;
        }
        true
    }

    /// How much longer the caller may be waited for with no more bytes.
    fn allowance(&self, rate: MinBodyRate) -> Duration {
        let rest_of_window = rate.window.saturating_sub(self.waited);
        if self.received >= rate.per_window() {
            // This window is paid for; the next one is not.
            rest_of_window + rate.window
        } else {
            rest_of_window
        }
    }
}

/// A caller's request body under its [`BodyClocks`]: each wait for more bytes is bounded by
/// `idle`, the rate by `min_rate`, the whole body by `deadline`. Any of them expiring ends
/// the body with a [`BodyTimeout`] error, which makes the upstream client abort the
/// request rather than complete it. `ended` is dropped when the body ends, fails or is
/// dropped, so whoever holds its receiver knows when the upload is over.
pub struct TimedBody<B> {
    inner: B,
    clocks: BodyClocks,
    /// Set when the body first has to wait; reset rather than reallocated afterwards.
    timer: Option<Pin<Box<Sleep>>>,
    /// When the current wait began, while the body is waiting.
    waiting_since: Option<Instant>,
    /// What `timer` running out means for the current wait.
    expiry: BodyTimeout,
    window: RateWindow,
    ended: Option<oneshot::Sender<()>>,
}

impl<B> TimedBody<B> {
    /// The body, and a receiver that completes once the body is over.
    pub fn new(inner: B, clocks: BodyClocks) -> (Self, oneshot::Receiver<()>) {
        let (ended, over) = oneshot::channel();
        let body = Self {
            inner,
            clocks,
            timer: None,
            waiting_since: None,
            expiry: BodyTimeout::Idle(clocks.idle),
            window: RateWindow::default(),
            ended: Some(ended),
        };
        (body, over)
    }

    fn fail(&mut self, timeout: BodyTimeout) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.ended = None;
        Poll::Ready(Some(Err(Box::new(timeout))))
    }

    /// The first of the clocks to run out if no bytes come from `now` on.
    fn next_expiry(&self, now: Instant) -> (Instant, BodyTimeout) {
        let mut first = (now + self.clocks.idle, BodyTimeout::Idle(self.clocks.idle));
        if let Some(rate) = self.clocks.min_rate {
            if let Some(at) = now.checked_add(self.window.allowance(rate)) {
                if at < first.0 {
                    first = (at, BodyTimeout::TooSlow(rate));
                }
            }
        }
        if self.clocks.deadline <= first.0 {
            first = (
                self.clocks.deadline,
                BodyTimeout::Deadline(self.clocks.exchange_timeout),
            );
        }
        first
    }
}

impl<B> http_body::Body for TimedBody<B>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let now = Instant::now();
                let waited = this
                    .waiting_since
                    .take()
                    .map_or(Duration::ZERO, |since| now - since);
                if now >= this.clocks.deadline {
                    return this.fail(BodyTimeout::Deadline(this.clocks.exchange_timeout));
                }
                if let Some(rate) = this.clocks.min_rate {
                    let bytes = frame.data_ref().map_or(0, |d| d.len() as u64);
                    if !this.window.record(rate, waited, bytes) {
                        return this.fail(BodyTimeout::TooSlow(rate));
                    }
                }
                if this.inner.is_end_stream() {
                    this.ended = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.ended = None;
                Poll::Ready(Some(Err(e.into())))
            }
            Poll::Ready(None) => {
                this.ended = None;
                Poll::Ready(None)
            }
            Poll::Pending => {
                if this.waiting_since.is_none() {
                    let now = Instant::now();
                    this.waiting_since = Some(now);
                    let (at, expiry) = this.next_expiry(now);
                    this.expiry = expiry;
                    match &mut this.timer {
                        Some(timer) => timer.as_mut().reset(at),
                        None => this.timer = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                }
                let Some(timer) = &mut this.timer else {
                    return Poll::Pending;
                };
                if timer.as_mut().poll(cx).is_pending() {
                    return Poll::Pending;
                }
                let expiry = this.expiry;
                this.fail(expiry)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that never ends, counting the frames pulled from it.
    struct Endless {
        pulled: usize,
    }

    impl http_body::Body for Endless {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
            self.pulled += 1;
            std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                b"0123456789",
            )))))
        }
    }

    #[tokio::test]
    async fn reads_up_to_the_limit_and_stops_after_it() {
        assert_eq!(
            read_capped(full("12345"), 5).await.unwrap(),
            Bytes::from("12345")
        );
        // Declared too long: refused before reading.
        assert!(matches!(
            read_capped(full("123456"), 5).await,
            Err(CappedReadError::TooLarge { limit: 5 })
        ));
        // Undeclared and endless: refused at the first frame over the limit.
        let mut endless = Endless { pulled: 0 };
        let result = read_capped(&mut endless, 95).await;
        assert!(matches!(
            result,
            Err(CappedReadError::TooLarge { limit: 95 })
        ));
        assert_eq!(endless.pulled, 10);
    }

    use tokio::sync::mpsc;

    /// A body whose frames the test sends, ending when the sender is dropped.
    struct Fed(mpsc::Receiver<Bytes>);

    impl http_body::Body for Fed {
        type Data = Bytes;
        type Error = std::convert::Infallible;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
            self.0.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
        }
    }

    fn timed(
        idle_ms: u64,
        deadline_ms: u64,
    ) -> (mpsc::Sender<Bytes>, TimedBody<Fed>, oneshot::Receiver<()>) {
        timed_at_rate(idle_ms, deadline_ms, None)
    }

    fn timed_at_rate(
        idle_ms: u64,
        deadline_ms: u64,
        min_rate: Option<MinBodyRate>,
    ) -> (mpsc::Sender<Bytes>, TimedBody<Fed>, oneshot::Receiver<()>) {
        let (tx, rx) = mpsc::channel(8);
        let limit = Duration::from_millis(deadline_ms);
        let (body, over) = TimedBody::new(
            Fed(rx),
            BodyClocks {
                idle: Duration::from_millis(idle_ms),
                min_rate,
                exchange_timeout: limit,
                deadline: Instant::now() + limit,
            },
        );
        (tx, body, over)
    }

    /// 100 bytes a second, measured over 1 s windows.
    const HUNDRED_A_SECOND: MinBodyRate = MinBodyRate {
        bytes_per_second: 100,
        window: Duration::from_secs(1),
    };

    /// Feeds `chunk` every `every` until the body stops taking it; returns what the body
    /// ended with and how many frames it gave before.
    async fn fed_every(
        tx: mpsc::Sender<Bytes>,
        body: &mut TimedBody<Fed>,
        chunk: &'static [u8],
        every: Duration,
    ) -> (usize, Option<BodyTimeout>) {
        let feeder = tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                if tx.send(Bytes::from_static(chunk)).await.is_err() {
                    return;
                }
            }
        });
        let mut frames = 0;
        let ended = loop {
            match body.frame().await {
                Some(Ok(_)) => frames += 1,
                Some(Err(e)) => break Some(timeout_of(e)),
                None => break None,
            }
        };
        feeder.abort();
        (frames, ended)
    }

    fn timeout_of(error: BoxError) -> BodyTimeout {
        *error.downcast::<BodyTimeout>().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_longer_than_the_idle_timeout_ends_the_body_with_idle() {
        let (tx, mut body, mut over) = timed(100, 10_000);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(
            matches!(timeout_of(error), BodyTimeout::Idle(d) if d == Duration::from_millis(100))
        );
        assert_eq!(
            over.try_recv(),
            Err(oneshot::error::TryRecvError::Closed),
            "the body is over once it failed"
        );
        drop(tx);
    }

    #[tokio::test(start_paused = true)]
    async fn bytes_within_the_idle_timeout_keep_it_going_until_the_deadline() {
        let (tx, mut body, _over) = timed(100, 350);
        let feeder = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(60)).await;
                if tx.send(Bytes::from_static(b"a")).await.is_err() {
                    return;
                }
            }
        });
        let mut frames = 0;
        let error = loop {
            match body.frame().await.unwrap() {
                Ok(_) => frames += 1,
                Err(e) => break e,
            }
        };
        assert!(frames >= 4, "{frames} frames before the deadline");
        assert!(matches!(timeout_of(error), BodyTimeout::Deadline(_)));
        feeder.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn the_end_of_the_body_is_signalled() {
        let (tx, mut body, mut over) = timed(100, 10_000);
        tx.send(Bytes::from_static(b"a")).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        assert_eq!(over.try_recv(), Err(oneshot::error::TryRecvError::Empty));
        drop(tx);
        assert!(body.frame().await.is_none());
        assert_eq!(over.try_recv(), Err(oneshot::error::TryRecvError::Closed));
    }

    #[tokio::test(start_paused = true)]
    async fn a_trickle_below_the_minimum_rate_is_cut_at_the_end_of_its_window() {
        let (tx, mut body, _over) = timed_at_rate(60_000, 600_000, Some(HUNDRED_A_SECOND));
        let started = Instant::now();
        // 10 bytes every 200 ms: 50 a second, never idle.
        let (frames, ended) =
            fed_every(tx, &mut body, b"0123456789", Duration::from_millis(200)).await;
        assert!(matches!(ended, Some(BodyTimeout::TooSlow(r)) if r == HUNDRED_A_SECOND));
        assert!(frames <= 5, "{frames} frames: cut within the first window");
        assert!(started.elapsed() <= Duration::from_millis(1000));
    }

    #[tokio::test(start_paused = true)]
    async fn a_fast_start_buys_no_credit_for_a_trickle() {
        let (tx, mut body, _over) = timed_at_rate(60_000, 600_000, Some(HUNDRED_A_SECOND));
        tx.send(Bytes::from(vec![b'x'; 1 << 20])).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        let started = Instant::now();
        let (_, ended) = fed_every(tx, &mut body, b"x", Duration::from_millis(100)).await;
        assert!(matches!(ended, Some(BodyTimeout::TooSlow(_))));
        assert!(
            started.elapsed() <= Duration::from_secs(3),
            "cut {:?} into the trickle",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_body_at_the_minimum_rate_runs_until_the_deadline() {
        let (tx, mut body, _over) = timed_at_rate(60_000, 10_000, Some(HUNDRED_A_SECOND));
        // 30 bytes every 200 ms: 150 a second.
        let (frames, ended) = fed_every(
            tx,
            &mut body,
            b"012345678901234567890123456789",
            Duration::from_millis(200),
        )
        .await;
        assert!(matches!(ended, Some(BodyTimeout::Deadline(_))), "{ended:?}");
        assert!(frames >= 35, "{frames} frames");
    }

    #[tokio::test(start_paused = true)]
    async fn silence_after_a_paid_window_is_cut_by_the_next_window() {
        let (tx, mut body, _over) = timed_at_rate(60_000, 600_000, Some(HUNDRED_A_SECOND));
        tx.send(Bytes::from(vec![b'x'; 500])).await.unwrap();
        assert!(body.frame().await.unwrap().is_ok());
        let started = Instant::now();
        let error = body.frame().await.unwrap().unwrap_err();
        assert!(matches!(timeout_of(error), BodyTimeout::TooSlow(_)));
        assert_eq!(
            started.elapsed(),
            Duration::from_secs(2),
            "this window and the next"
        );
        drop(tx);
    }
}
