//! The gateway's own S2S token for Dataverse (OAuth2 client credentials): fetched at
//! start, refreshed in the background well before it expires, replaced at most once when
//! Dataverse rejects it, and never sent once expired.
//!
//! Concurrency: the current token is an `ArcSwapOption` snapshot that requests read
//! without locking. Every fetch happens under `fetch_lock`, so the background refresher
//! and any number of requests that saw a 401 cause one call to the token endpoint: a
//! waiter that gets the lock after a fetch finds a different token in place and uses it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use http::HeaderValue;
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
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
    #[error("credential: {0}")]
    Credential(#[from] CredentialError),
    #[error("token endpoint {url} unreachable: {source}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
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

/// Holds and refreshes the S2S token.
pub struct TokenSource {
    /// Environment names served by this token (one token per tenant, client and resource).
    label: String,
    config: EnvironmentConfig,
    http: reqwest::Client,
    current: ArcSwapOption<S2sToken>,
    fetch_lock: tokio::sync::Mutex<()>,
    last_error: Mutex<Option<String>>,
    metrics: Metrics,
}

impl TokenSource {
    /// `label` names the environments this token serves, for logs and readiness.
    pub fn new(
        config: &EnvironmentConfig,
        label: String,
        http: reqwest::Client,
        metrics: Metrics,
    ) -> Self {
        Self {
            label,
            config: config.clone(),
            http,
            current: ArcSwapOption::empty(),
            fetch_lock: tokio::sync::Mutex::new(()),
            last_error: Mutex::new(None),
            metrics,
        }
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

    /// Dataverse answered 401 to `rejected`: replace it, unless another request already did.
    pub async fn replace_rejected(
        &self,
        rejected: &Arc<S2sToken>,
    ) -> Result<Arc<S2sToken>, TokenError> {
        let _fetching = self.fetch_lock.lock().await;
        if let Some(now) = self.current.load_full() {
            if !Arc::ptr_eq(&now, rejected) && now.is_usable() {
                return Ok(now);
            }
        }
        self.fetch_and_store().await
    }

    /// One fetch under the lock (the refresher's path).
    async fn refresh(&self) -> Result<Arc<S2sToken>, TokenError> {
        let _fetching = self.fetch_lock.lock().await;
        self.fetch_and_store().await
    }

    async fn fetch_and_store(&self) -> Result<Arc<S2sToken>, TokenError> {
        let result = self.fetch().await;
        let label = if result.is_ok() { "success" } else { "failure" };
        self.metrics
            .token_requests_total
            .with_label_values(&[label])
            .inc();
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
                    *g = Some(e.to_string());
                }
                Err(e)
            }
        }
    }

    async fn fetch(&self) -> Result<S2sToken, TokenError> {
        let url = self.config.token_url.clone();
        let sent_at = Instant::now();
        let response = self
            .config
            .credential
            .request_token(&self.http, &url, &self.config.client_id, &self.config.scope)
            .await?;
        let status = response.status();
        let retry_after = super::headers::retry_after(response.headers());
        let body = response.bytes().await.map_err(|source| TokenError::Http {
            url: url.to_string(),
            source,
        })?;
        if !status.is_success() {
            return Err(match serde_json::from_slice::<OAuthError>(&body) {
                Ok(e) => TokenError::Refused {
                    status: status.as_u16(),
                    error: e.error,
                    // Azure AD's description starts with the AADSTS code; its tail is a
                    // trace id and timestamp, useful in logs, and never contains the secret.
                    description: e
                        .error_description
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string(),
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
        let lifetime = parsed
            .expires_in
            .as_ref()
            .and_then(NumberOrString::seconds)
            .map(Duration::from_secs)
            .ok_or_else(|| TokenError::InvalidResponse("no numeric expires_in".into()))?;
        if lifetime < Duration::from_secs(10) {
            return Err(TokenError::InvalidResponse(format!(
                "expires_in of {}s is too short to use",
                lifetime.as_secs()
            )));
        }
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", token.expose()))
            .map_err(|_| {
                TokenError::InvalidResponse("access_token is not a valid header value".into())
            })?;
        authorization.set_sensitive(true);
        // Stop sending a little before the real expiry so a token never expires in transit.
        let margin = (lifetime / 4).min(Duration::from_secs(300));
        let mut refresh_after = lifetime / 2;
        if let Some(r) = parsed.refresh_in.as_ref().and_then(NumberOrString::seconds) {
            refresh_after = refresh_after.min(Duration::from_secs(r));
        }
        Ok(S2sToken {
            authorization,
            usable_until: sent_at + lifetime - margin,
            refresh_at: sent_at + refresh_after,
        })
    }

    /// Keeps a token in hand until cancelled: fetch now, then refresh at half the
    /// lifetime; after a failure retry with backoff (no sooner than `Retry-After`) while
    /// the current token, if any, keeps serving.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(60));
        loop {
            let wake_at = match self.refresh().await {
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
                    let mut wait = backoff.next_delay();
                    if let Some(after) = e.retry_after() {
                        wait = wait.max(after);
                    }
                    let serving = self.current().is_ok();
                    tracing::warn!(environment = %self.label, error = %e, retry_in = ?wait, still_serving = serving, "S2S token request failed");
                    Instant::now() + wait
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
