//! One environment's CSDL fetched from Dataverse itself (`GET /api/data/v9.2/$metadata`
//! with the gateway's S2S token), when `access.metadata_file` is not set and rules need
//! it. The refresher fetches at start (retrying with backoff until the first success),
//! then every `access.metadata_refresh_interval`, sending the last ETag as
//! `If-None-Match`: a 304 keeps the map in force. A failed or oversize refresh keeps the
//! last good map. The body streams into the same parser as the file
//! ([`Metadata::from_reader`]) on a blocking thread, so a 50 MB document never sits in
//! memory whole and never stalls a request worker; it is cut off at
//! `access.metadata_max_bytes`.

use std::io::BufReader;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::{StreamExt as _, TryStreamExt as _};
use http::header::{ACCEPT, ETAG, IF_NONE_MATCH};
use http::{HeaderMap, HeaderValue, StatusCode};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use tokio::time::Instant;
use tokio_util::io::{StreamReader, SyncIoBridge};
use tokio_util::sync::CancellationToken;

use super::metadata::{Metadata, MetadataError};
use crate::backoff::Backoff;
use crate::identity::lookup::s2s_get_with;
use crate::identity::LookupError;
use crate::metrics::Metrics;
use crate::upstream::{DataverseClient, TokenSource};

/// The path of the CSDL document.
const METADATA_PATH: &str = "/api/data/v9.2/$metadata";

/// How the environments' CSDL is fetched (`access.metadata_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataSettings {
    /// Between successful refreshes (`access.metadata_refresh_interval`, default 1 h).
    pub refresh_interval: Duration,
    /// The largest document accepted (`access.metadata_max_bytes`, default 64 MiB).
    pub max_bytes: u64,
    /// The longest one fetch, body included, may take (`access.metadata_timeout`).
    pub timeout: Duration,
}

impl Default for MetadataSettings {
    fn default() -> Self {
        Self {
            refresh_interval: Duration::from_secs(3600),
            max_bytes: 64 * 1024 * 1024,
            timeout: Duration::from_secs(120),
        }
    }
}

/// Why a fetch of `$metadata` gave no new map.
#[derive(Debug, thiserror::Error)]
pub enum MetadataFetchError {
    #[error(transparent)]
    Request(#[from] LookupError),
    #[error("Dataverse answered {0}")]
    Status(u16),
    #[error("the document is larger than access.metadata_max_bytes ({0} bytes)")]
    TooLarge(u64),
    #[error("the document could not be read")]
    Parse(#[source] MetadataError),
    #[error("the fetch took longer than access.metadata_timeout ({})", humantime::format_duration(*.0))]
    Timeout(Duration),
    #[error("the parser thread failed")]
    Parser,
}

/// What a successful fetch gave.
enum Fetched {
    NotModified,
    New(Arc<Metadata>, Option<HeaderValue>),
}

/// The map in force and the ETag it came with.
struct Loaded {
    metadata: Arc<Metadata>,
    etag: Option<HeaderValue>,
    /// [`Metadata::heap_bytes`], counted once.
    heap_bytes: usize,
}

impl Loaded {
    /// `N entity sets, M KiB`: what the map holds and costs.
    fn summary(&self) -> String {
        format!(
            "{} entity sets, {} KiB",
            self.metadata.set_count(),
            self.heap_bytes / 1024
        )
    }
}

/// One environment's fetched metadata: what the access stage decides with.
pub struct EnvironmentMetadata {
    environment: String,
    client: DataverseClient,
    tokens: Arc<TokenSource>,
    settings: MetadataSettings,
    loaded: ArcSwapOption<Loaded>,
    /// The last fetch's failure, cleared by a success: for `/readyz`.
    last_error: Mutex<Option<String>>,
    /// Times the refresher was restarted after a panic.
    refresher_restarts: Arc<AtomicU64>,
    metrics: Metrics,
    /// Stands in for Dataverse in unit tests, so the refresher's schedule can be driven
    /// under paused time with no sockets.
    #[cfg(test)]
    fake_fetch: Mutex<Option<FakeFetch>>,
}

#[cfg(test)]
type FakeFetch = Box<dyn FnMut() -> Result<Fetched, MetadataFetchError> + Send>;

impl EnvironmentMetadata {
    pub fn new(
        environment: &str,
        client: DataverseClient,
        tokens: Arc<TokenSource>,
        settings: MetadataSettings,
        metrics: Metrics,
    ) -> Self {
        metrics
            .access_metadata_loaded
            .with_label_values(&[environment])
            .set(0);
        for outcome in ["updated", "not_modified", "failure"] {
            metrics
                .access_metadata_refresh_total
                .with_label_values(&[environment, outcome]);
        }
        Self {
            environment: environment.to_string(),
            client,
            tokens,
            settings,
            loaded: ArcSwapOption::empty(),
            last_error: Mutex::new(None),
            refresher_restarts: Arc::new(AtomicU64::new(0)),
            metrics,
            #[cfg(test)]
            fake_fetch: Mutex::new(None),
        }
    }

    pub fn environment(&self) -> &str {
        &self.environment
    }

    /// The map in force, once one was fetched.
    pub fn current(&self) -> Option<Arc<Metadata>> {
        self.loaded.load().as_ref().map(|l| l.metadata.clone())
    }

    /// Times the refresher was restarted after a panic (shared with its supervisor).
    pub fn refresher_restarts(&self) -> &Arc<AtomicU64> {
        &self.refresher_restarts
    }

    /// Takes over the map (and its ETag) another gateway of the same environment holds,
    /// so a reloaded configuration decides at once and revalidates with a 304.
    pub fn adopt(&self, other: &EnvironmentMetadata) {
        if self.loaded.load().is_none() {
            if let Some(loaded) = other.loaded.load_full() {
                self.loaded.store(Some(loaded));
                self.set_loaded_gauge();
            }
        }
    }

    /// The state for `/readyz`: `metadata loaded (N entity sets)`, or why not.
    pub fn state(&self) -> String {
        let error = self
            .last_error
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default();
        match (self.loaded.load().as_ref(), error) {
            (Some(l), None) => format!("metadata loaded ({})", l.summary()),
            (Some(l), Some(e)) => format!(
                "metadata loaded ({}), last refresh failed: {e}",
                l.summary()
            ),
            (None, None) => "metadata not fetched yet".to_string(),
            (None, Some(e)) => format!("no metadata yet: {e}"),
        }
    }

    fn set_loaded_gauge(&self) {
        self.metrics
            .access_metadata_loaded
            .with_label_values(&[&self.environment])
            .set(1);
    }

    /// One fetch, stored when it gives a new map; `Ok(true)` when it did.
    pub async fn refresh(&self) -> Result<bool, MetadataFetchError> {
        let timeout = self.settings.timeout;
        let fetched = tokio::time::timeout(timeout, self.fetch())
            .await
            .unwrap_or(Err(MetadataFetchError::Timeout(timeout)));
        let outcome = match &fetched {
            Ok(Fetched::NotModified) => "not_modified",
            Ok(Fetched::New(..)) => "updated",
            Err(_) => "failure",
        };
        self.metrics
            .access_metadata_refresh_total
            .with_label_values(&[&self.environment, outcome])
            .inc();
        let stored = match fetched {
            Ok(Fetched::NotModified) => false,
            Ok(Fetched::New(metadata, etag)) => {
                let heap_bytes = metadata.heap_bytes();
                self.loaded.store(Some(Arc::new(Loaded {
                    metadata,
                    etag,
                    heap_bytes,
                })));
                self.set_loaded_gauge();
                true
            }
            Err(e) => {
                if let Ok(mut last) = self.last_error.lock() {
                    *last = Some(crate::error::chain(&e));
                }
                return Err(e);
            }
        };
        if let Ok(mut last) = self.last_error.lock() {
            *last = None;
        }
        Ok(stored)
    }

    async fn fetch(&self) -> Result<Fetched, MetadataFetchError> {
        #[cfg(test)]
        if let Some(fake) = self.fake_fetch.lock().unwrap().as_mut() {
            return fake();
        }
        let deadline = Instant::now() + self.settings.timeout;
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT, HeaderValue::from_static("application/xml"));
        if let Some(etag) = self.loaded.load().as_ref().and_then(|l| l.etag.clone()) {
            headers.insert(IF_NONE_MATCH, etag);
        }
        // `refresh` bounds the whole fetch, body included, so that its timeout is the one
        // reported; the head's own bound is only a backstop past it.
        let backstop = self.settings.timeout.saturating_add(Duration::from_secs(1));
        let response =
            s2s_get_with(&self.client, &self.tokens, METADATA_PATH, backstop, headers).await?;
        match response.status() {
            StatusCode::NOT_MODIFIED if self.loaded.load().is_some() => {
                return Ok(Fetched::NotModified)
            }
            StatusCode::OK => {}
            other => return Err(MetadataFetchError::Status(other.as_u16())),
        }
        let etag = response.headers().get(ETAG).cloned();
        let metadata =
            parse_capped(response.into_body(), self.settings.max_bytes, deadline).await?;
        Ok(Fetched::New(Arc::new(metadata), etag))
    }

    /// Keeps the map fresh until cancelled: at start until the first success (with
    /// backoff), then every `refresh_interval`; a failed refresh keeps the last good map
    /// and is retried with backoff.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(60));
        loop {
            // Raced against shutdown: a fetch must not hold the process past its grace.
            let fetched = tokio::select! {
                _ = cancel.cancelled() => return,
                fetched = self.refresh() => fetched,
            };
            let wait = match fetched {
                Ok(updated) => {
                    tracing::debug!(environment = %self.environment, updated, "$metadata refreshed");
                    backoff.reset();
                    self.settings.refresh_interval
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    let kept = self.loaded.load().is_some();
                    tracing::warn!(environment = %self.environment, error = %crate::error::chain(&e), retry_in = ?wait, last_good_kept = kept, "$metadata fetch failed");
                    wait
                }
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// Parses a CSDL body as it arrives, reading at most `max_bytes` of it, and nothing after
/// `deadline`: the parser thread must not outlive the fetch that gave up on it, waiting on
/// a stalled body.
async fn parse_capped<B>(
    body: B,
    max_bytes: u64,
    deadline: Instant,
) -> Result<Metadata, MetadataFetchError>
where
    B: http_body::Body<Data = bytes::Bytes> + Send + Unpin + 'static,
    B::Error: Into<crate::body::BoxError>,
{
    if http_body::Body::size_hint(&body).lower() > max_bytes {
        return Err(MetadataFetchError::TooLarge(max_bytes));
    }
    let limit = usize::try_from(max_bytes).unwrap_or(usize::MAX);
    let over = Arc::new(AtomicBool::new(false));
    let flag = over.clone();
    let stream = Limited::new(body, limit)
        .into_data_stream()
        .map_err(move |e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                flag.store(true, Ordering::Relaxed);
            }
            std::io::Error::other(e)
        });
    let stream = Box::pin(futures_util::stream::unfold(
        Some(Box::pin(stream)),
        move |stream| async move {
            let mut stream = stream?;
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(item)) => Some((item, Some(stream))),
                Ok(None) => None,
                Err(_) => Some((Err(std::io::ErrorKind::TimedOut.into()), None)),
            }
        },
    ));
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    let parsed = tokio::task::spawn_blocking(move || {
        Metadata::from_reader(BufReader::with_capacity(64 * 1024, reader))
    })
    .await
    .map_err(|_| MetadataFetchError::Parser)?;
    match parsed {
        _ if over.load(Ordering::Relaxed) => Err(MetadataFetchError::TooLarge(max_bytes)),
        Ok(metadata) => Ok(metadata),
        Err(e) => Err(MetadataFetchError::Parse(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    const FIXTURE: &str = include_str!("../../tests/fixtures/csdl.xml");

    #[tokio::test(start_paused = true)]
    async fn the_refresher_fetches_every_interval_and_keeps_the_last_good_map_on_failure() {
        let fetches = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let (f, down) = (fetches.clone(), failing.clone());
        let tokens = crate::upstream::token::source_with(Box::new(|| Ok((3600, None))));
        let metadata = Arc::new(EnvironmentMetadata::new(
            "contoso",
            DataverseClient::new(
                &"https://contoso.crm.dynamics.com".parse().unwrap(),
                1,
                crate::config::UpstreamHttp::Auto,
            )
            .unwrap(),
            tokens,
            MetadataSettings {
                refresh_interval: Duration::from_secs(60),
                ..MetadataSettings::default()
            },
            Metrics::new().unwrap(),
        ));
        let map = Arc::new(
            Metadata::from_reader(
                &std::fs::read(concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/tests/fixtures/csdl.xml"
                ))
                .unwrap()[..],
            )
            .unwrap(),
        );
        *metadata.fake_fetch.lock().unwrap() = Some(Box::new(move || {
            let n = f.fetch_add(1, Ordering::SeqCst);
            if down.load(Ordering::SeqCst) {
                Err(MetadataFetchError::Status(503))
            } else if n == 0 {
                Ok(Fetched::New(map.clone(), None))
            } else {
                Ok(Fetched::NotModified)
            }
        }));
        let cancel = CancellationToken::new();
        let refresher = tokio::spawn(metadata.clone().run(cancel.clone()));
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);

        tokio::time::sleep_until(at(59_900)).await;
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "fetched once at start");
        assert!(metadata.current().is_some());
        tokio::time::sleep_until(at(60_100)).await;
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            2,
            "fetched again after the interval"
        );

        // Dataverse fails from the next refresh on: retried with backoff, the map kept.
        failing.store(true, Ordering::SeqCst);
        tokio::time::sleep_until(at(125_000)).await;
        assert!(fetches.load(Ordering::SeqCst) > 4, "failures are retried");
        assert!(metadata.current().is_some(), "last good map kept");
        assert!(
            metadata.state().contains("last refresh failed"),
            "{}",
            metadata.state()
        );

        failing.store(false, Ordering::SeqCst);
        tokio::time::sleep_until(at(125_000 + 61_000)).await;
        assert!(
            metadata.state().starts_with("metadata loaded ("),
            "{}",
            metadata.state()
        );
        assert!(!metadata.state().contains("failed"), "{}", metadata.state());
        cancel.cancel();
        refresher.await.unwrap();
    }

    fn later() -> Instant {
        Instant::now() + Duration::from_secs(60)
    }

    #[tokio::test]
    async fn a_body_streams_into_the_file_parser() {
        let body = Full::new(bytes::Bytes::from_static(FIXTURE.as_bytes()));
        let metadata = parse_capped(body, 1 << 20, later()).await.unwrap();
        assert_eq!(
            metadata.navigation_target("accounts", "contact_customer_accounts"),
            Some("contacts")
        );
    }

    #[tokio::test]
    async fn a_body_over_the_cap_is_refused_declared_or_not() {
        let body = Full::new(bytes::Bytes::from_static(FIXTURE.as_bytes()));
        assert!(matches!(
            parse_capped(body, 100, later()).await,
            Err(MetadataFetchError::TooLarge(100))
        ));
        // No declared length: cut off at the first byte over the cap.
        let chunks = futures_util::stream::iter(
            FIXTURE
                .as_bytes()
                .chunks(256)
                .map(|c| {
                    Ok::<_, std::io::Error>(http_body::Frame::data(bytes::Bytes::copy_from_slice(
                        c,
                    )))
                })
                .collect::<Vec<_>>(),
        );
        let body = http_body_util::StreamBody::new(chunks);
        assert!(matches!(
            parse_capped(body, 1000, later()).await,
            Err(MetadataFetchError::TooLarge(1000))
        ));
    }

    #[tokio::test]
    async fn a_stalled_body_ends_the_parse_at_the_deadline() {
        let head = bytes::Bytes::from_static(&FIXTURE.as_bytes()[..1000]);
        // A thousand bytes, then silence without an end: only the deadline ends the parse.
        let frames =
            futures_util::stream::iter([Ok::<_, std::io::Error>(http_body::Frame::data(head))])
                .chain(futures_util::stream::pending());
        let body = http_body_util::StreamBody::new(frames);
        let deadline = Instant::now() + Duration::from_millis(100);
        let parsed = parse_capped(body, 1 << 20, deadline).await;
        assert!(
            matches!(parsed, Err(MetadataFetchError::Parse(_))),
            "{parsed:?}"
        );
    }
}
