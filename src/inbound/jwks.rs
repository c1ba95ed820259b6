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
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::discovery::{self, FetchError};
use super::jwt::UnverifiedToken;
use super::{AuthError, Caller, CallerKind};
use crate::backoff::Backoff;
use crate::config::{token_type, InboundConfig, IssuerConfig, TENANT_PLACEHOLDER};
use crate::metrics::Metrics;

/// A verification key from the issuer's JWKS.
struct SigningKey {
    key: DecodingKey,
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
    validations: HashMap<Algorithm, Validation>,
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
}

impl JwksCache {
    pub fn new(
        config: IssuerConfig,
        inbound: &InboundConfig,
        http: reqwest::Client,
        metrics: Metrics,
    ) -> Self {
        let validations = config
            .algorithms
            .iter()
            .map(|alg| {
                let mut v = Validation::new(*alg);
                v.leeway = inbound.leeway.as_secs();
                v.validate_nbf = true;
                v.set_required_spec_claims(&["exp", "iss", "aud"]);
                // A template's `iss` differs per tenant; `verify` checks it after decoding.
                if !config.issuer.contains(TENANT_PLACEHOLDER) {
                    v.set_issuer(&[&config.issuer]);
                }
                v.set_audience(&config.audiences);
                (*alg, v)
            })
            .collect();
        Self {
            issuer: Arc::from(config.issuer.as_str()),
            jwks_uri: Mutex::new(config.jwks_uri.clone()),
            config,
            validations,
            keys: ArcSwapOption::empty(),
            fetch_lock: tokio::sync::Mutex::new(None),
            refetch_interval: inbound.jwks_refetch_interval,
            refresh_interval: inbound.jwks_refresh_interval,
            leeway: inbound.leeway,
            http,
            refresher_restarts: Arc::new(AtomicU64::new(0)),
            metrics,
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
    pub async fn verify(&self, token: &UnverifiedToken<'_>) -> Result<Caller, AuthError> {
        let alg = token.algorithm(&self.config.algorithms)?;
        let kid = token.kid().ok_or(AuthError::MissingKid)?;
        let key = self.key(kid).await?;
        if key.alg.is_some_and(|a| a != alg) {
            return Err(AuthError::DisallowedAlgorithm(format!("{alg:?}")));
        }
        let validation = self
            .validations
            .get(&alg)
            .ok_or_else(|| AuthError::DisallowedAlgorithm(format!("{alg:?}")))?;
        let claims = token.verify(&key.key, validation)?;
        self.check_access_token(token, &claims)?;
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
        token: &UnverifiedToken<'_>,
        claims: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), AuthError> {
        if claims.contains_key("nonce") {
            return Err(AuthError::NotAnAccessToken(
                "it carries a nonce, so it is an ID token",
            ));
        }
        if let Some(types) = &self.config.token_types {
            let typ = token.token_type().map(token_type);
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
        let by_kid: HashMap<_, _> = doc.keys.keys.into_iter().filter_map(signing_key).collect();
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
        let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
        loop {
            // Raced against shutdown: a fetch must not hold the process past its grace.
            let fetched = tokio::select! {
                _ = cancel.cancelled() => return,
                fetched = self.refresh() => fetched,
            };
            let wait = match fetched {
                Ok(count) => {
                    tracing::debug!(issuer = %self.issuer, keys = count, "JWKS refreshed");
                    backoff.reset();
                    self.refresh_interval
                }
                Err(e) => {
                    let wait = backoff.next_delay();
                    tracing::warn!(issuer = %self.issuer, error = %crate::error::chain(&e), retry_in = ?wait, "JWKS fetch failed; keeping the last good keys");
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

/// A usable signature key from one JWKS entry; encryption keys and keys without `kid` are skipped.
fn signing_key(value: serde_json::Value) -> Option<(String, Arc<SigningKey>)> {
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
    // A symmetric key in a public JWKS would let anyone who reads the set sign tokens.
    if matches!(key.family(), jsonwebtoken::AlgorithmFamily::Hmac) {
        return None;
    }
    Some((kid, Arc::new(SigningKey { key, alg })))
}
