//! The gateway's own S2S token for Dataverse (OAuth2 client credentials): fetched at
//! start, refreshed in the background well before it expires, replaced at most once per
//! `dynamics.token_replace_interval` when Dataverse rejects it, and never sent once expired.
//!
//! Every number from the token endpoint is clamped before it touches a clock
//! ([`TokenTimes::from_response`], [`retry_wait`]): a lifetime of `u64::MAX` seconds is a
//! day, not a panic.
//!
//! Concurrency: the current token is an `ArcSwapOption` snapshot that requests read
//! without locking. Every fetch happens under `fetch_lock`, so the background refresher
//! and any number of requests that saw a 401 cause one call to the token endpoint: a
//! waiter that gets the lock after a fetch finds a different token in place and uses it,
//! and a 401 that arrives within the replace interval of the last replacement is passed
//! on rather than buying another token.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::{self, Backoff};
use crate::body::{read_response_capped, CappedReadError, MAX_DEPENDENCY_BODY_BYTES};
use crate::config::EnvironmentConfig;
use crate::metrics::Metrics;
use crate::secret::Secret;
use crate::upstream::credential::CredentialError;

/// An access token for the Dataverse organisation, ready to send.
pub struct S2sToken {
    /// `Bearer <token>`, marked sensitive so no HTTP library logs it.
    authorization: HeaderValue,
    /// After this instant the token is not sent (a margin before its real expiry).
    usable_until: Instant,
    /// When the refresher should replace it.
    refresh_at: Instant,
}

impl std::fmt::Debug for S2sToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S2sToken")
            .field("authorization", &"***")
            .field("usable_until", &self.usable_until)
            .finish()
    }
}

impl S2sToken {
    pub fn authorization(&self) -> &HeaderValue {
        &self.authorization
    }

    pub fn is_usable(&self) -> bool {
        Instant::now() < self.usable_until
    }
}

/// Why no token could be had.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the credential could not be used")]
    Credential(#[from] CredentialError),
    #[error("reading the answer of token endpoint {url} failed")]
    Body {
        url: String,
        #[source]
        source: CappedReadError,
    },
    #[error("token endpoint refused the request ({status}): {error}: {description}")]
    Refused {
        status: u16,
        error: String,
        description: String,
        retry_after: Option<Duration>,
    },
    #[error("token endpoint answered {status} without an OAuth error body")]
    Status {
        status: u16,
        retry_after: Option<Duration>,
    },
    #[error("token endpoint response is unusable: {0}")]
    InvalidResponse(String),
    #[error("no valid Dynamics S2S token; last attempt: {last_error}")]
    NoValidToken { last_error: String },
}

impl TokenError {
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Refused { retry_after, .. } | Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<Secret>,
    token_type: Option<String>,
    expires_in: Option<NumberOrString>,
    refresh_in: Option<NumberOrString>,
}

/// Azure AD's v1 endpoint and managed identity send numbers as strings.
#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrString {
    Number(u64),
    Text(String),
}

impl NumberOrString {
    fn seconds(&self) -> Option<u64> {
        match self {
            Self::Number(n) => Some(*n),
            Self::Text(s) => s.trim().parse().ok(),
        }
    }
}

#[derive(Deserialize)]
struct OAuthError {
    error: String,
    #[serde(default)]
    error_description: String,
}

/// The longest token lifetime believed: a longer `expires_in` is taken as this.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The earliest refresh a token endpoint's `refresh_in` can ask for (a token with a
/// shorter lifetime refreshes at half of it).
pub const MIN_REFRESH_IN: Duration = Duration::from_secs(60);

/// How a token source paces itself.
#[derive(Debug, Clone, Copy)]
pub struct TokenPolicy {
    /// Least time between two 401-caused replacements.
    pub replace_interval: Duration,
    /// Longest wait after a failed fetch, whatever the endpoint's `Retry-After` says.
    pub retry_max_wait: Duration,
    /// Longest a request waits for the first token while its fetch is in flight.
    pub first_fetch_wait: Duration,
}

/// When a token stops being sent and when it is replaced, relative to its request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct TokenTimes {
    /// Sent until then: the lifetime less a margin, so it never expires in transit.
    usable_for: Duration,
    refresh_after: Duration,
}

impl TokenTimes {
    /// From the endpoint's `expires_in` and `refresh_in` seconds: the lifetime at most
    /// [`MAX_TOKEN_LIFETIME`], the refresh at half of it or `refresh_in` if sooner, but
    /// `refresh_in` no sooner than [`MIN_REFRESH_IN`] (nor later than the lifetime).
    fn from_response(expires_in: u64, refresh_in: Option<u64>) -> Result<Self, TokenError> {
        let lifetime = Duration::from_secs(expires_in).min(MAX_TOKEN_LIFETIME);
        if lifetime < Duration::from_secs(10) {
            return Err(TokenError::InvalidResponse(format!(
                "expires_in of {}s is too short to use",
                lifetime.as_secs()
            )));
        }
        let margin = (lifetime / 4).min(Duration::from_secs(300));
        let mut refresh_after = lifetime / 2;
        if let Some(r) = refresh_in {
            let asked = Duration::from_secs(r)
                .max(MIN_REFRESH_IN.min(lifetime))
                .min(lifetime);
            refresh_after = refresh_after.min(asked);
        }
        Ok(Self {
            usable_for: lifetime.saturating_sub(margin),
            refresh_after,
        })
    }
}

/// The wait before the next attempt after a failure: the backoff's delay, or the
/// endpoint's `Retry-After` if longer, but never more than `max`.
fn retry_wait(backoff_delay: Duration, retry_after: Option<Duration>, max: Duration) -> Duration {
    let wait = match retry_after {
        Some(after) => backoff_delay.max(after),
        None => backoff_delay,
    };
    wait.min(max)
}

/// Longest piece of token endpoint error text kept for the log (Azure AD's are a few
/// hundred bytes; a hostile endpoint's could be the whole body, on every retry).
const MAX_ERROR_TEXT: usize = 1024;

/// `text` cut to [`MAX_ERROR_TEXT`] bytes at a character boundary, marked when cut.
fn bounded_text(text: &str) -> String {
    if text.len() <= MAX_ERROR_TEXT {
        return text.to_string();
    }
    let mut end = MAX_ERROR_TEXT;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... (cut)", &text[..end])
}

/// Holds and refreshes the S2S token.
pub struct TokenSource {
    /// Environment names served by this token (one token per tenant, client and resource),
    /// joined for logs and readiness.
    label: String,
    /// The same names, each a value of the token metric's `environment` label.
    environments: Vec<String>,
    config: EnvironmentConfig,
    http: reqwest::Client,
    current: ArcSwapOption<S2sToken>,
    /// Held for every fetch; holds when a 401 last caused a replacement.
    fetch_lock: tokio::sync::Mutex<Option<Instant>>,
    policy: TokenPolicy,
    /// `true` once the first fetch has finished, well or not.
    first_attempt_done: tokio::sync::watch::Sender<bool>,
    last_error: Mutex<Option<String>>,
    /// Times the refresher was restarted after a panic.
    refresher_restarts: Arc<AtomicU64>,
    metrics: Metrics,
    /// Stands in for the token endpoint in unit tests, so the refresher's schedule can be
    /// driven under paused time with no sockets (paused time fires timers while real I/O
    /// is pending).
    #[cfg(test)]
    fake_fetch: Mutex<Option<FakeFetch>>,
}

/// A token endpoint stand-in: `Ok((expires_in, refresh_in))` or the error it answers with.
#[cfg(test)]
pub(crate) type FakeFetch = Box<dyn FnMut() -> Result<(u64, Option<u64>), TokenError> + Send>;

impl TokenSource {
    /// `environments` names the environments this token serves (from config), for logs,
    /// readiness and metrics.
    pub fn new(
        config: &EnvironmentConfig,
        environments: Vec<String>,
        http: reqwest::Client,
        policy: TokenPolicy,
        metrics: Metrics,
    ) -> Self {
        // At 0 from the start, so the first failure is an increase the alerts see.
        for environment in &environments {
            for result in ["success", "failure"] {
                metrics
                    .token_requests_total
                    .with_label_values(&[environment, result]);
            }
        }
        Self {
            label: environments.join(", "),
            environments,
            config: config.clone(),
            http,
            current: ArcSwapOption::empty(),
            fetch_lock: tokio::sync::Mutex::new(None),
            policy,
            first_attempt_done: tokio::sync::watch::Sender::new(false),
            last_error: Mutex::new(None),
            refresher_restarts: Arc::new(AtomicU64::new(0)),
            metrics,
            #[cfg(test)]
            fake_fetch: Mutex::new(None),
        }
    }

    /// As [`Self::current`], but while the very first fetch is still in flight, waits for
    /// it (at most `first_fetch_wait`, and never past the request's `deadline`) instead of
    /// failing: at start-up one environment may be ready before another.
    pub async fn current_or_first(&self, deadline: Instant) -> Result<Arc<S2sToken>, TokenError> {
        if let Ok(token) = self.current() {
            return Ok(token);
        }
        let mut done = self.first_attempt_done.subscribe();
        let until = deadline.min(Instant::now() + self.policy.first_fetch_wait);
        // Waiting only bounds the wait: the outcome is read from `current` either way.
        let _ = tokio::time::timeout_at(until, done.wait_for(|done| *done)).await;
        self.current()
    }

    /// Times the refresher was restarted after a panic (shared with its supervisor).
    pub fn refresher_restarts(&self) -> &Arc<AtomicU64> {
        &self.refresher_restarts
    }

    /// The token to send now; never an expired one.
    pub fn current(&self) -> Result<Arc<S2sToken>, TokenError> {
        match self.current.load_full() {
            Some(token) if token.is_usable() => Ok(token),
            _ => Err(self.no_valid_token()),
        }
    }

    /// The environments this token serves, for logs and readiness.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// True while a usable token is held.
    pub fn is_ready(&self) -> bool {
        self.current().is_ok()
    }

    fn no_valid_token(&self) -> TokenError {
        let last_error = self
            .last_error
            .lock()
            .ok()
            .and_then(|g| g.clone())
            .unwrap_or_else(|| "the first token has not been fetched yet".into());
        TokenError::NoValidToken { last_error }
    }

    /// Dataverse answered 401 to `rejected`: the token to retry with, which is the one
    /// another request or the refresher put in place meanwhile, or a new one; `None` when
    /// a 401 replaced the token less than `replace_interval` ago (the 401 is then passed
    /// on), so however many 401s arrive, the token endpoint sees at most one request per
    /// interval from them.
    pub async fn replace_rejected(
        &self,
        rejected: &Arc<S2sToken>,
    ) -> Result<Option<Arc<S2sToken>>, TokenError> {
        let mut last_replaced = self.fetch_lock.lock().await;
        if let Some(now) = self.current.load_full() {
            if !Arc::ptr_eq(&now, rejected) && now.is_usable() {
                return Ok(Some(now));
            }
        }
        if last_replaced.is_some_and(|at| at.elapsed() < self.policy.replace_interval) {
            return Ok(None);
        }
        *last_replaced = Some(Instant::now());
        self.fetch_and_store().await.map(Some)
    }

    /// One fetch under the lock (the refresher's path).
    async fn refresh(&self) -> Result<Arc<S2sToken>, TokenError> {
        let _fetching = self.fetch_lock.lock().await;
        self.fetch_and_store().await
    }

    async fn fetch_and_store(&self) -> Result<Arc<S2sToken>, TokenError> {
        // Fires when this function ends: after `current` or `last_error` is written below,
        // or when the fetch is cancelled midway.
        let _first_attempt_done = FirstAttemptDone(&self.first_attempt_done);
        let result = self.fetch().await;
        let label = if result.is_ok() { "success" } else { "failure" };
        // Counted for every environment it serves, so each environment's series (and its
        // alert) tells whether that environment has a token.
        for environment in &self.environments {
            self.metrics
                .token_requests_total
                .with_label_values(&[environment, label])
                .inc();
        }
        match result {
            Ok(token) => {
                let token = Arc::new(token);
                self.current.store(Some(token.clone()));
                if let Ok(mut g) = self.last_error.lock() {
                    *g = None;
                }
                Ok(token)
            }
            Err(e) => {
                if let Ok(mut g) = self.last_error.lock() {
                    *g = Some(crate::error::chain(&e));
                }
                Err(e)
            }
        }
    }

    // The target is `telemetry::SPAN_TARGET` (the attribute takes a literal).
    #[tracing::instrument(target = "dynamics_gateway::span", name = "s2s_token.fetch", skip_all)]
    async fn fetch(&self) -> Result<S2sToken, TokenError> {
        let sent_at = Instant::now();
        #[cfg(test)]
        if let Some(fake) = self.fake_fetch.lock().unwrap().as_mut() {
            let (expires_in, refresh_in) = fake()?;
            let times = TokenTimes::from_response(expires_in, refresh_in)?;
            return Ok(S2sToken {
                authorization: HeaderValue::from_static("Bearer fake"),
                usable_until: backoff::instant_after(sent_at, times.usable_for),
                refresh_at: backoff::instant_after(sent_at, times.refresh_after),
            });
        }
        let url = self.config.token_url.clone();
        let response = self
            .config
            .credential
            .request_token(&self.http, &url, &self.config.client_id, &self.config.scope)
            .await?;
        let status = response.status();
        let retry_after = super::headers::retry_after(response.headers());
        let body = read_response_capped(response, MAX_DEPENDENCY_BODY_BYTES)
            .await
            .map_err(|source| TokenError::Body {
                url: url.to_string(),
                source,
            })?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<OAuthError>(&body) {
                Ok(e) => TokenError::Refused {
                    status: status.as_u16(),
                    error: bounded_text(&e.error),
                    // Azure AD's description starts with the AADSTS code; its tail is a
                    // trace id and timestamp, useful in logs, and never contains the secret.
                    description: bounded_text(
                        e.error_description.lines().next().unwrap_or_default(),
                    ),
                    retry_after,
                },
                Err(_) => TokenError::Status {
                    status: status.as_u16(),
                    retry_after,
                },
            });
        }
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| TokenError::InvalidResponse(format!("not the expected JSON ({e})")))?;
        let token = parsed
            .access_token
            .filter(|t| !t.is_empty())
            .ok_or_else(|| TokenError::InvalidResponse("no access_token".into()))?;
        if let Some(t) = &parsed.token_type {
            if !t.eq_ignore_ascii_case("bearer") {
                return Err(TokenError::InvalidResponse(format!(
                    "token_type {t:?} is not Bearer"
                )));
            }
        }
        let expires_in = parsed
            .expires_in
            .as_ref()
            .and_then(NumberOrString::seconds)
            .ok_or_else(|| TokenError::InvalidResponse("no numeric expires_in".into()))?;
        let times = TokenTimes::from_response(
            expires_in,
            parsed.refresh_in.as_ref().and_then(NumberOrString::seconds),
        )?;
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|_| {
                TokenError::InvalidResponse("access_token is not a valid header value".into())
            })?;
        authorization.set_sensitive(true);
        Ok(S2sToken {
            authorization,
            usable_until: backoff::instant_after(sent_at, times.usable_for),
            refresh_at: backoff::instant_after(sent_at, times.refresh_after),
        })
    }

    /// Keeps a token in hand until cancelled: fetch now, then refresh at half the
    /// lifetime; after a failure retry with backoff (no sooner than `Retry-After`) while
    /// the current token, if any, keeps serving.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        loop {
            // Raced against shutdown: a fetch must not hold the process past its grace.
            let fetched = tokio::select! {
                _ = cancel.cancelled() => return,
                fetched = self.refresh() => fetched,
            };
            let wake_at = match fetched {
                Ok(token) => {
                    backoff.reset();
                    tracing::info!(
                        environment = %self.label,
                        usable_for = ?token.usable_until.saturating_duration_since(Instant::now()),
                        "S2S token acquired"
                    );
                    token.refresh_at
                }
                Err(e) => {
                    let wait = retry_wait(
                        backoff.next_delay(),
                        e.retry_after(),
                        self.policy.retry_max_wait,
                    );
                    let serving = self.current().is_ok();
                    tracing::warn!(environment = %self.label, error = %crate::error::chain(&e), retry_in = ?wait, still_serving = serving, "S2S token request failed");
                    backoff::instant_after(Instant::now(), wait)
                }
            };
            // A refresh triggered by a 401 may have replaced the token meanwhile; its own
            // refresh time is then the one that counts.
            let wake_at = match self.current.load_full() {
                Some(t) if t.refresh_at > wake_at && t.is_usable() => t.refresh_at,
                _ => wake_at,
            };
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep_until(wake_at) => {}
            }
        }
    }
}

/// Marks the first fetch finished when dropped, so a waiter is released even if the fetch
/// future is dropped (cancelled) midway.
struct FirstAttemptDone<'a>(&'a tokio::sync::watch::Sender<bool>);

impl Drop for FirstAttemptDone<'_> {
    fn drop(&mut self) {
        self.0
            .send_if_modified(|done| !std::mem::replace(done, true));
    }
}

/// A source for `contoso` whose token endpoint is `fake` (for refresher unit tests).
#[cfg(test)]
pub(crate) fn source_with(fake: FakeFetch) -> Arc<TokenSource> {
    let config = crate::config::Config::from_yaml(
        "inbound:\n  issuers:\n    - issuer: https://login.microsoftonline.com/t/v2.0\n      audiences: [api://dynamics-gateway]\ndynamics:\n  url: https://contoso.crm.dynamics.com\n  tenant_id: t\n  client_id: c\n  client_secret: s\n",
        &|_| None,
    )
    .unwrap();
    let source = TokenSource::new(
        &config.dynamics.environments[0],
        vec!["contoso".into()],
        reqwest::Client::new(),
        TokenPolicy {
            replace_interval: Duration::from_secs(5),
            retry_max_wait: Duration::from_secs(300),
            first_fetch_wait: Duration::from_secs(1),
        },
        Metrics::new().unwrap(),
    );
    *source.fake_fetch.lock().unwrap() = Some(fake);
    Arc::new(source)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_refresher_replaces_the_token_at_half_life_and_stops_sending_it_after_its_margin() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let fetches = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let (f, down) = (fetches.clone(), failing.clone());
        // expires_in 12 s: refreshed at 6 s, not sent after 9 s (a quarter as margin).
        let source = source_with(Box::new(move || {
            f.fetch_add(1, Ordering::SeqCst);
            if down.load(Ordering::SeqCst) {
                Err(TokenError::Status {
                    status: 500,
                    retry_after: None,
                })
            } else {
                Ok((12, None))
            }
        }));
        let cancel = CancellationToken::new();
        let refresher = tokio::spawn(source.clone().run(cancel.clone()));
        let start = Instant::now();
        let at = |secs_tenths: u64| start + Duration::from_millis(secs_tenths * 100);

        tokio::time::sleep_until(at(59)).await;
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "one fetch at start");
        assert!(source.is_ready());
        tokio::time::sleep_until(at(61)).await;
        assert_eq!(fetches.load(Ordering::SeqCst), 2, "refreshed at half life");

        // The endpoint fails from now on: the token fetched at 6 s serves until 6 + 9 s.
        failing.store(true, Ordering::SeqCst);
        tokio::time::sleep_until(at(149)).await;
        assert!(source.is_ready(), "current token used while valid");
        assert!(fetches.load(Ordering::SeqCst) > 3, "failures are retried");
        tokio::time::sleep_until(at(151)).await;
        assert!(matches!(
            source.current(),
            Err(TokenError::NoValidToken { .. })
        ));

        // Back up: the retry (backoff at most 60 s) gets a token without a restart.
        failing.store(false, Ordering::SeqCst);
        tokio::time::sleep_until(at(151 + 610)).await;
        assert!(source.is_ready(), "recovered without restart");
        cancel.cancel();
        refresher.await.unwrap();
    }

    fn times(expires_in: u64, refresh_in: Option<u64>) -> TokenTimes {
        TokenTimes::from_response(expires_in, refresh_in).unwrap()
    }

    #[test]
    fn absurd_lifetimes_are_clamped_to_a_day() {
        let t = times(u64::MAX, Some(u64::MAX));
        assert_eq!(t.usable_for, MAX_TOKEN_LIFETIME - Duration::from_secs(300));
        assert_eq!(t.refresh_after, MAX_TOKEN_LIFETIME / 2);
        // The instants derived from them are in range too.
        let now = Instant::now();
        assert!(backoff::instant_after(now, t.usable_for) > now);
    }

    #[test]
    fn refresh_in_is_kept_within_a_minute_and_the_lifetime() {
        // An hour's token: half-life by default; refresh_in only brings it forward, and
        // never closer than a minute.
        assert_eq!(times(3600, None).refresh_after, Duration::from_secs(1800));
        assert_eq!(
            times(3600, Some(600)).refresh_after,
            Duration::from_secs(600)
        );
        assert_eq!(times(3600, Some(0)).refresh_after, MIN_REFRESH_IN);
        assert_eq!(
            times(3600, Some(u64::MAX)).refresh_after,
            Duration::from_secs(1800)
        );
        // A token shorter than the minimum refreshes at half its life.
        assert_eq!(times(40, Some(0)).refresh_after, Duration::from_secs(20));
        assert_eq!(times(40, None).usable_for, Duration::from_secs(30));
    }

    #[test]
    fn error_text_from_the_endpoint_is_bounded() {
        assert_eq!(bounded_text("AADSTS7000215: bad"), "AADSTS7000215: bad");
        let long = "é".repeat(MAX_ERROR_TEXT);
        let cut = bounded_text(&long);
        assert!(
            cut.len() <= MAX_ERROR_TEXT + 10 && cut.ends_with("(cut)"),
            "{cut}"
        );
    }

    #[test]
    fn too_short_lifetimes_are_refused() {
        assert!(TokenTimes::from_response(9, None).is_err());
        assert!(TokenTimes::from_response(0, Some(0)).is_err());
    }

    #[test]
    fn retry_after_waits_at_most_five_minutes() {
        let b = Duration::from_millis(500);
        // dynamics.token_retry_max_wait's default.
        let max = Duration::from_secs(300);
        assert_eq!(retry_wait(b, None, max), b);
        assert_eq!(
            retry_wait(b, Some(Duration::from_secs(7)), max),
            Duration::from_secs(7)
        );
        assert_eq!(retry_wait(b, Some(Duration::from_secs(u64::MAX)), max), max);
        assert_eq!(retry_wait(Duration::MAX, None, max), max);
    }
}
