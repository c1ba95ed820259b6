//! One issuer's signing keys: the cached key set, the throttled refetch on an unknown
//! `kid`, and the background refresher that keeps the set current. The last good set
//! stays in force while the identity provider is unreachable.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use jsonwebtoken::jwk::{Jwk, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::discovery::{self, FetchError};
use super::jwt::{ClaimRules, PublicKey, UnverifiedToken};
use super::{AuthError, Caller, CallerKind};
use crate::backoff::Backoff;
use crate::config::{token_type, InboundConfig, IssuerConfig, TENANT_PLACEHOLDER};
use crate::metrics::Metrics;

/// A verification key from the issuer's JWKS.
struct SigningKey {
    key: PublicKey,
    /// The JWK's own `alg`, when it names one: the token must then use exactly that.
    alg: Option<Algorithm>,
}

/// One snapshot of an issuer's keys, replaced whole on each fetch.
struct KeySet {
    by_kid: HashMap<String, Arc<SigningKey>>,
}

/// Most keys a JWKS may hold: Entra publishes a handful, and each key costs parsing
/// and memory on every refresh.
pub const MAX_JWKS_KEYS: usize = 100;

#[derive(Deserialize)]
struct JwksDocument {
    keys: BoundedKeys,
}

/// The first [`MAX_JWKS_KEYS`] entries of `keys`, and how many there were: entries past
/// the cap are skipped unparsed.
struct BoundedKeys {
    keys: Vec<serde_json::Value>,
    total: usize,
}

impl<'de> Deserialize<'de> for BoundedKeys {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = BoundedKeys;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an array of JWKs")
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<BoundedKeys, A::Error> {
                let mut keys = Vec::new();
                let mut total = 0usize;
                while total < MAX_JWKS_KEYS {
                    match seq.next_element()? {
                        Some(key) => keys.push(key),
                        None => return Ok(BoundedKeys { keys, total }),
                    }
                    total += 1;
                }
                while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {
                    total = total.saturating_add(1);
                }
                Ok(BoundedKeys { keys, total })
            }
        }
        deserializer.deserialize_seq(Visitor)
    }
}

/// The keys of one issuer, and how tokens of that issuer are validated.
pub struct JwksCache {
    issuer: Arc<str>,
    config: IssuerConfig,
    rules: ClaimRules,
    keys: ArcSwapOption<KeySet>,
    /// Discovered `jwks_uri`, forgotten when a fetch from it fails.
    jwks_uri: Mutex<Option<Url>>,
    /// Held for the duration of a fetch, so concurrent unknown kids cause one fetch.
    fetch_lock: tokio::sync::Mutex<Option<Instant>>,
    refetch_interval: Duration,
    refresh_interval: Duration,
    /// Clock skew allowed on `iat`, as on `exp` and `nbf`.
    leeway: Duration,
    http: reqwest::Client,
    /// Times the refresher was restarted after a panic.
    refresher_restarts: Arc<AtomicU64>,
    metrics: Metrics,
    /// Stands in for the identity provider in unit tests, so the refresher's schedule can
    /// be driven under paused time with no sockets.
    #[cfg(test)]
    fake_fetch: Mutex<Option<FakeFetch>>,
}

/// An identity provider stand-in: each call is one fetch, answering the `kid`s of the new
/// set or the error; the future may never finish (a hung fetch).
#[cfg(test)]
type FakeFetch = Box<
    dyn FnMut() -> std::pin::Pin<
            Box<dyn std::future::Future<Output = Result<Vec<&'static str>, FetchError>> + Send>,
        > + Send,
>;

/// First and longest wait before retrying a failed refresh.
const RETRY_BASE: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// The refresher's wait before its next fetch: `refresh_interval` after a success (and
/// the backoff starts over), the next backoff delay after a failure.
fn next_wait(succeeded: bool, backoff: &mut Backoff, refresh_interval: Duration) -> Duration {
    if succeeded {
        backoff.reset();
        refresh_interval
    } else {
        backoff.next_delay()
    }
}

impl JwksCache {
    pub fn new(
        config: IssuerConfig,
        inbound: &InboundConfig,
        http: reqwest::Client,
        metrics: Metrics,
    ) -> Self {
        let rules = ClaimRules {
            // A template's `iss` differs per tenant; `verify` checks it after decoding.
            issuer: (!config.issuer.contains(TENANT_PLACEHOLDER)).then(|| config.issuer.clone()),
            audiences: config.audiences.clone(),
            leeway: inbound.leeway.as_secs(),
        };
        Self {
            issuer: Arc::from(config.issuer.as_str()),
            jwks_uri: Mutex::new(config.jwks_uri.clone()),
            config,
            rules,
            keys: ArcSwapOption::empty(),
            fetch_lock: tokio::sync::Mutex::new(None),
            refetch_interval: inbound.jwks_refetch_interval,
            refresh_interval: inbound.jwks_refresh_interval,
            leeway: inbound.leeway,
            http,
            refresher_restarts: Arc::new(AtomicU64::new(0)),
            metrics,
            #[cfg(test)]
            fake_fetch: Mutex::new(None),
        }
    }

    /// Times the refresher was restarted after a panic (shared with its supervisor).
    pub fn refresher_restarts(&self) -> &Arc<AtomicU64> {
        &self.refresher_restarts
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// True for a `{tenantid}` issuer template.
    pub fn is_template(&self) -> bool {
        self.config.issuer.contains(TENANT_PLACEHOLDER)
    }

    /// The concrete issuer for a tenant (the issuer itself when it is not a template).
    pub fn issuer_for_tenant(&self, tid: &str) -> String {
        self.config.issuer.replace(TENANT_PLACEHOLDER, tid)
    }

    /// True once a key set has been loaded.
    pub fn is_ready(&self) -> bool {
        self.keys.load().is_some()
    }

    /// Verifies a token that names this issuer.
    pub async fn verify(&self, token: UnverifiedToken<'_>) -> Result<Caller, AuthError> {
        let alg = token.algorithm(&self.config.algorithms)?;
        let kid = token.kid().ok_or(AuthError::MissingKid)?;
        let key = self.key(kid).await?;
        if key.alg.is_some_and(|a| a != alg) {
            return Err(AuthError::DisallowedAlgorithm(format!("{alg:?}")));
        }
        let verified = token.verify(&key.key, alg, &self.rules)?;
        self.check_access_token(verified.token_type.as_deref(), &verified.claims)?;
        let claims = verified.claims;
        let tid = claims.get("tid").and_then(|t| t.as_str());
        let issuer = if self.is_template() {
            // Signed claims now: `iss` must be the template with the token's own `tid`.
            let tid = tid.ok_or_else(|| AuthError::MissingClaim("tid".into()))?;
            let expected = self.issuer_for_tenant(tid);
            if claims.get("iss").and_then(|i| i.as_str()) != Some(expected.as_str()) {
                return Err(AuthError::UnknownIssuer);
            }
            Arc::from(expected)
        } else {
            self.issuer.clone()
        };
        if let Some(tenants) = &self.config.tenants {
            if !tid.is_some_and(|tid| tenants.iter().any(|t| t.eq_ignore_ascii_case(tid))) {
                return Err(AuthError::TenantNotAllowed);
            }
        }
        let kind = CallerKind::from_claims(&self.config.app_only_evidence, &claims);
        Ok(Caller::new(issuer, self.issuer.clone(), kind, claims))
    }

    /// Refuses signed tokens that are not access tokens for an API: ID tokens (they carry
    /// the `nonce` of a sign-in and prove only that a user signed in to some client), a
    /// `typ` the issuer's `token_types` does not list, and an `iat` that is not a number
    /// or lies in the future.
    fn check_access_token(
        &self,
        typ: Option<&str>,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), AuthError> {
        if claims.contains_key("nonce") {
            return Err(AuthError::NotAnAccessToken(
                "it carries a nonce, so it is an ID token",
            ));
        }
        if let Some(types) = &self.config.token_types {
            let typ = typ.map(token_type);
            if !typ.is_some_and(|t| types.contains(&t)) {
                return Err(AuthError::TokenTypeNotAllowed);
            }
        }
        match claims.get("iat") {
            None => {}
            Some(serde_json::Value::Number(iat)) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let latest = (now + self.leeway).as_secs_f64();
                if iat.as_f64().is_none_or(|iat| iat > latest) {
                    return Err(AuthError::IssuedInFuture);
                }
            }
            Some(_) => return Err(AuthError::InvalidClaim("iat".into())),
        }
        Ok(())
    }

    /// The key with this `kid`, refetching the set at most once per `refetch_interval`
    /// when it is unknown (a new key after rotation), so random kids cannot make the
    /// gateway hammer the identity provider.
    async fn key(&self, kid: &str) -> Result<Arc<SigningKey>, AuthError> {
        match self.lookup(kid) {
            Some(Ok(key)) => return Ok(key),
            Some(Err(())) => {}
            None => {
                return Err(AuthError::KeysUnavailable {
                    issuer: self.issuer.to_string(),
                })
            }
        }
        let mut last_fetch = self.fetch_lock.lock().await;
        // Another request may have fetched while this one waited for the lock.
        if let Some(Ok(key)) = self.lookup(kid) {
            return Ok(key);
        }
        if last_fetch.is_some_and(|at| at.elapsed() < self.refetch_interval) {
            return Err(AuthError::UnknownKid);
        }
        *last_fetch = Some(Instant::now());
        if let Err(e) = self.fetch_and_store().await {
            tracing::warn!(issuer = %self.issuer, error = %crate::error::chain(&e), "JWKS refetch for an unknown kid failed; keeping the current keys");
        }
        match self.lookup(kid) {
            Some(Ok(key)) => Ok(key),
            _ => Err(AuthError::UnknownKid),
        }
    }

    /// `None`: no key set yet; `Some(Err)`: set loaded, kid not in it.
    fn lookup(&self, kid: &str) -> Option<Result<Arc<SigningKey>, ()>> {
        let guard = self.keys.load();
        let set = guard.as_ref()?;
        Some(set.by_kid.get(kid).cloned().ok_or(()))
    }

    /// One fetch under the fetch lock, recording the time for the refetch throttle.
    async fn refresh(&self) -> Result<usize, FetchError> {
        let mut last_fetch = self.fetch_lock.lock().await;
        *last_fetch = Some(Instant::now());
        self.fetch_and_store().await
    }

    async fn fetch_and_store(&self) -> Result<usize, FetchError> {
        let result = self.fetch().await;
        let label = if result.is_ok() { "success" } else { "failure" };
        self.metrics
            .jwks_refresh_total
            .with_label_values(&[label])
            .inc();
        let set = result?;
        let count = set.by_kid.len();
        self.keys.store(Some(Arc::new(set)));
        Ok(count)
    }

    async fn fetch(&self) -> Result<KeySet, FetchError> {
        #[cfg(test)]
        {
            let fake = self.fake_fetch.lock().unwrap().as_mut().map(|fake| fake());
            if let Some(fetch) = fake {
                let kids = fetch.await?;
                let key = |kid: &str| {
                    let key = PublicKey::placeholder();
                    (kid.to_string(), Arc::new(SigningKey { key, alg: None }))
                };
                let by_kid = kids.into_iter().map(key).collect();
                return Ok(KeySet { by_kid });
            }
        }
        let known = self.jwks_uri.lock().map(|g| g.clone()).unwrap_or(None);
        let uri = match known {
            Some(uri) => uri,
            None => {
                let uri = discovery::discover_jwks_uri(
                    &self.http,
                    &self.config.discovery_url,
                    &self.config.issuer,
                )
                .await?;
                if let Ok(mut g) = self.jwks_uri.lock() {
                    *g = Some(uri.clone());
                }
                uri
            }
        };
        let doc: JwksDocument = match discovery::get_json(&self.http, &uri).await {
            Ok(doc) => doc,
            Err(e) => {
                // Rediscover next time, in case the issuer moved its keys.
                if self.config.jwks_uri.is_none() {
                    if let Ok(mut g) = self.jwks_uri.lock() {
                        *g = None;
                    }
                }
                return Err(e);
            }
        };
        if doc.keys.total > MAX_JWKS_KEYS {
            return Err(FetchError::TooManyKeys {
                url: uri.to_string(),
                max: MAX_JWKS_KEYS,
            });
        }
        let by_kid: HashMap<_, _> = doc
            .keys
            .keys
            .into_iter()
            .filter_map(|key| signing_key(key, &self.config.algorithms))
            .collect();
        if by_kid.is_empty() {
            return Err(FetchError::NoKeys {
                url: uri.to_string(),
            });
        }
        Ok(KeySet { by_kid })
    }

    /// Keeps the key set fresh until cancelled: at start until the first success (with
    /// backoff), then every `refresh_interval`; a failed refresh keeps the last good set.
    pub async fn run(self: Arc<Self>, cancel: CancellationToken) {
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
        loop {
            // Raced against shutdown: a fetch must not hold the process past its grace.
            let fetched = tokio::select! {
                _ = cancel.cancelled() => return,
                fetched = self.refresh() => fetched,
            };
            let wait = next_wait(fetched.is_ok(), &mut backoff, self.refresh_interval);
            match fetched {
                Ok(count) => {
                    tracing::debug!(issuer = %self.issuer, keys = count, "JWKS refreshed");
                }
                Err(e) => {
                    tracing::warn!(issuer = %self.issuer, error = %crate::error::chain(&e), retry_in = ?wait, "JWKS fetch failed; keeping the last good keys");
                }
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// A usable signature key from one JWKS entry, parsed for the issuer's `algorithms`;
/// encryption keys and keys without `kid` are skipped.
fn signing_key(
    value: serde_json::Value,
    algorithms: &[Algorithm],
) -> Option<(String, Arc<SigningKey>)> {
    let alg = value
        .get("alg")
        .and_then(|a| a.as_str())
        .map(Algorithm::from_str);
    let jwk: Jwk = serde_json::from_value(value).ok()?;
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return None;
    }
    let kid = jwk.common.key_id.clone()?;
    let alg = match alg {
        Some(Ok(a)) => Some(a),
        Some(Err(_)) => return None,
        None => None,
    };
    let key = DecodingKey::from_jwk(&jwk).ok()?;
    // A symmetric key in a public JWKS would let anyone who reads the set sign tokens:
    // `PublicKey::new` refuses it.
    let key = PublicKey::new(&key, algorithms)?;
    Some((kid, Arc::new(SigningKey { key, alg })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};

    /// A cache refreshing every 60 s whose identity provider is `fake`.
    fn cache_with(fake: FakeFetch) -> Arc<JwksCache> {
        let config = crate::config::Config::from_yaml(
            "inbound:\n  jwks_refresh_interval: 60s\n  issuers:\n    - issuer: https://login.microsoftonline.com/t/v2.0\n      audiences: [api://dynamics-gateway]\ndynamics:\n  url: https://contoso.crm.dynamics.com\n  tenant_id: t\n  client_id: c\n  client_secret: s\n",
            &|_| None,
        )
        .unwrap();
        let cache = JwksCache::new(
            config.inbound.issuers[0].clone(),
            &config.inbound,
            reqwest::Client::new(),
            Metrics::new().unwrap(),
        );
        *cache.fake_fetch.lock().unwrap() = Some(fake);
        Arc::new(cache)
    }

    fn has_kid(cache: &JwksCache, kid: &str) -> bool {
        matches!(cache.lookup(kid), Some(Ok(_)))
    }

    #[test]
    fn a_success_waits_the_interval_and_failures_back_off_from_the_start_again() {
        let interval = Duration::from_secs(60);
        let mut backoff = Backoff::new(RETRY_BASE, RETRY_MAX);
        let failures: Vec<_> = (0..12)
            .map(|_| next_wait(false, &mut backoff, interval))
            .collect();
        assert!(failures[0] >= RETRY_BASE / 2 && failures[0] <= RETRY_BASE);
        // 250 ms doubling: 8 s, half of it at the least, by the sixth failure.
        assert!(failures[5] >= Duration::from_secs(4), "{failures:?}");
        assert!(failures.iter().all(|w| *w <= RETRY_MAX), "{failures:?}");
        assert!(failures[11] >= RETRY_MAX / 2, "{failures:?}");
        assert_eq!(next_wait(true, &mut backoff, interval), interval);
        assert!(next_wait(false, &mut backoff, interval) <= RETRY_BASE);
    }

    #[tokio::test(start_paused = true)]
    async fn the_refresher_fetches_every_interval_backs_off_on_failure_and_keeps_the_last_keys() {
        let fetches = Arc::new(AtomicU64::new(0));
        let failing = Arc::new(AtomicBool::new(false));
        let (f, down) = (fetches.clone(), failing.clone());
        let cache = cache_with(Box::new(move || {
            let n = f.fetch_add(1, Ordering::SeqCst);
            let result = if down.load(Ordering::SeqCst) {
                Err(FetchError::Status {
                    url: "https://idp.example/keys".into(),
                    status: 503,
                })
            } else if n == 0 {
                Ok(vec!["first"])
            } else {
                Ok(vec!["rotated"])
            };
            Box::pin(async move { result })
        }));
        let cancel = CancellationToken::new();
        let refresher = tokio::spawn(cache.clone().run(cancel.clone()));
        let start = Instant::now();
        let at = |millis: u64| start + Duration::from_millis(millis);

        tokio::time::sleep_until(at(59_900)).await;
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "fetched once at start");
        assert!(has_kid(&cache, "first"));
        tokio::time::sleep_until(at(60_100)).await;
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            2,
            "refreshed after the interval"
        );
        assert!(has_kid(&cache, "rotated") && !has_kid(&cache, "first"));

        // The identity provider fails from the next refresh (at 120 s) on: retried with
        // a backoff from 250 ms up to 30 s, the last good keys kept meanwhile.
        failing.store(true, Ordering::SeqCst);
        tokio::time::sleep_until(at(120_100)).await;
        assert_eq!(fetches.load(Ordering::SeqCst), 3);
        tokio::time::sleep_until(at(121_000)).await;
        assert!(
            fetches.load(Ordering::SeqCst) >= 4,
            "first retry within 250 ms"
        );
        tokio::time::sleep_until(at(180_000)).await;
        let after_a_minute = fetches.load(Ordering::SeqCst);
        // Doubling from 250 ms (jitter at most halves a wait): 8 to 12 tries in a minute,
        // not one every 250 ms (240) nor one per interval (1).
        assert!((6..=14).contains(&after_a_minute), "{after_a_minute}");
        tokio::time::sleep_until(at(240_000)).await;
        let retries_in_the_next_minute = fetches.load(Ordering::SeqCst) - after_a_minute;
        assert!(
            (2..=4).contains(&retries_in_the_next_minute),
            "capped at 30 s: {retries_in_the_next_minute}"
        );
        assert!(has_kid(&cache, "rotated"), "last good keys kept");

        // Back up: the next retry (at most 30 s away, so between 240 s and 270 s) loads
        // the keys, and the next refresh is a whole interval after it.
        failing.store(false, Ordering::SeqCst);
        tokio::time::sleep_until(at(270_100)).await;
        let recovered = fetches.load(Ordering::SeqCst);
        tokio::time::sleep_until(at(299_900)).await;
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            recovered,
            "no retry after a success"
        );
        tokio::time::sleep_until(at(330_100)).await;
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            recovered + 1,
            "refreshed an interval after the recovery"
        );
        assert!(has_kid(&cache, "rotated"));
        cancel.cancel();
        refresher.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn cancellation_stops_the_refresher_while_it_waits_and_while_a_fetch_hangs() {
        let fetches = Arc::new(AtomicU64::new(0));
        let f = fetches.clone();
        let cache = cache_with(Box::new(move || {
            f.fetch_add(1, Ordering::SeqCst);
            Box::pin(async { Ok(vec!["first"]) })
        }));
        let cancel = CancellationToken::new();
        let refresher = tokio::spawn(cache.clone().run(cancel.clone()));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // Waiting out its 60 s interval: cancelled, it ends at once (paused time would
        // otherwise run to the next fetch before the 1 s bound).
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(1), refresher)
            .await
            .expect("stopped while waiting")
            .unwrap();
        assert_eq!(
            fetches.load(Ordering::SeqCst),
            1,
            "no fetch after cancellation"
        );

        // A fetch that never answers does not hold the refresher past cancellation.
        let hung = cache_with(Box::new(|| Box::pin(std::future::pending())));
        let cancel = CancellationToken::new();
        let refresher = tokio::spawn(hung.clone().run(cancel.clone()));
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(!refresher.is_finished() && !hung.is_ready());
        cancel.cancel();
        tokio::time::timeout(Duration::from_secs(1), refresher)
            .await
            .expect("stopped during a hung fetch")
            .unwrap();
    }
}
