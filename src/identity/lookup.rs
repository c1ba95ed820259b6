//! `lookup` mode: finds the caller's `systemuserid` in Dataverse with the S2S token and
//! remembers the answer (found, not found, disabled) in a bounded cache, keyed by
//! (issuer, tenant, claim value). "Not found" is remembered for a shorter time. Concurrent
//! requests of one caller share a single lookup.
//!
//! The Entra object id is looked up by Dataverse's alternate key,
//! `systemusers(azureactivedirectoryobjectid=<guid>)` (404: no such user): only that form
//! makes Dataverse add a member of an Entra group team just in time; a `$filter` finds
//! nobody until the user's first sign-in.
//!
//! The claim value goes into the URL, so it is an injection point: a GUID attribute takes
//! only a value that parses as a GUID (written unquoted, canonical), a string attribute
//! takes a single-quoted `$filter` literal with `'` doubled, and the whole filter is
//! percent-encoded. The query can therefore only ever match that exact value.

use std::sync::Arc;
use std::time::Duration;

use http::header::{ACCEPT, AUTHORIZATION};
use http::{HeaderMap, HeaderValue, Request, StatusCode};
use moka::future::Cache;
use moka::Expiry;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use uuid::Uuid;

use super::{IdentityError, Impersonation};
use crate::body;
use crate::config::{IdentityConfig, LookupAttribute};
use crate::metrics::Metrics;
use crate::upstream::{DataverseClient, S2sToken, TokenSource, UpstreamError};

/// Everything but RFC 3986 unreserved characters is encoded.
const FILTER_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// Why a lookup could not be answered. Cloneable: every request waiting on the same
/// in-flight lookup gets the same failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LookupError {
    #[error("no S2S token")]
    NoToken(#[source] Arc<crate::upstream::TokenError>),
    #[error("Dynamics did not answer within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("Dynamics is unreachable")]
    Unreachable(#[source] Arc<dyn std::error::Error + Send + Sync>),
    #[error("Dynamics answered {0}")]
    Status(u16),
    #[error("Dynamics' answer was not the expected JSON")]
    BadAnswer,
}

impl From<UpstreamError> for LookupError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::NoToken(t) => Self::NoToken(Arc::new(t)),
            UpstreamError::Timeout(d) => Self::Timeout(d),
            other => Self::Unreachable(Arc::new(other)),
        }
    }
}

/// A remembered answer.
#[derive(Debug, Clone, Copy)]
enum Outcome {
    Found(Uuid),
    NotFound,
    Disabled,
    Ambiguous,
}

/// Found answers live `cache_ttl`, "not found" only `unknown_user_cache_ttl`.
struct AnswerTtl {
    found: Duration,
    unknown: Duration,
}

impl Expiry<CacheKey, Outcome> for AnswerTtl {
    fn expire_after_create(
        &self,
        _key: &CacheKey,
        value: &Outcome,
        _created_at: std::time::Instant,
    ) -> Option<Duration> {
        Some(match value {
            Outcome::NotFound => self.unknown,
            _ => self.found,
        })
    }
}

/// (issuer, tenant in lowercase, claim value): the same value from another issuer or
/// tenant may be another person.
type CacheKey = (Arc<str>, String, String);

/// The request that finds the user.
enum Query {
    /// `systemusers(<attribute>=<value>)`: one entity, or 404.
    AlternateKey(String),
    /// `systemusers?$filter=...`: a collection of matches.
    Filter(String),
}

impl Query {
    fn path(&self) -> &str {
        match self {
            Self::AlternateKey(p) | Self::Filter(p) => p,
        }
    }
}

#[derive(Deserialize)]
struct SystemUsers {
    value: Vec<SystemUser>,
}

#[derive(Deserialize)]
struct SystemUser {
    systemuserid: Uuid,
    #[serde(default)]
    isdisabled: bool,
}

/// Looks callers up in Dataverse's `systemusers`.
pub struct UserLookup {
    attribute: LookupAttribute,
    client: DataverseClient,
    tokens: Arc<TokenSource>,
    timeout: Duration,
    cache: Cache<CacheKey, Outcome>,
    metrics: Metrics,
}

impl UserLookup {
    pub fn new(
        config: &IdentityConfig,
        attribute: LookupAttribute,
        client: DataverseClient,
        tokens: Arc<TokenSource>,
        timeout: Duration,
        metrics: Metrics,
    ) -> Self {
        let cache = Cache::builder()
            .max_capacity(config.cache_max_entries)
            .expire_after(AnswerTtl {
                found: config.cache_ttl,
                unknown: config.unknown_user_cache_ttl,
            })
            .build();
        Self {
            attribute,
            client,
            tokens,
            timeout,
            cache,
            metrics,
        }
    }

    /// `tenant` is the caller's `tid` (empty when the token has none).
    pub async fn resolve(
        &self,
        issuer: &Arc<str>,
        tenant: &str,
        value: &str,
    ) -> Result<Impersonation, IdentityError> {
        let query = query(self.attribute, value)?;
        let entry = self
            .cache
            .entry((
                issuer.clone(),
                tenant.to_ascii_lowercase(),
                value.to_string(),
            ))
            .or_try_insert_with(self.fetch(query))
            .await
            .map_err(|e| IdentityError::Lookup((*e).clone()))?;
        let result = if entry.is_fresh() { "miss" } else { "hit" };
        self.metrics
            .identity_cache_requests_total
            .with_label_values(&[result])
            .inc();
        match entry.into_value() {
            Outcome::Found(id) => Ok(Impersonation::SystemUserId(id)),
            Outcome::NotFound => Err(IdentityError::UserNotFound),
            Outcome::Disabled => Err(IdentityError::UserDisabled),
            Outcome::Ambiguous => Err(IdentityError::Ambiguous),
        }
    }

    // The target is `telemetry::SPAN_TARGET` (the attribute takes a literal).
    #[tracing::instrument(target = "dynamics_gateway::span", name = "identity.lookup", skip_all)]
    async fn fetch(&self, query: Query) -> Result<Outcome, LookupError> {
        let response = s2s_get(&self.client, &self.tokens, query.path(), self.timeout).await?;
        if matches!(query, Query::AlternateKey(_)) && response.status() == StatusCode::NOT_FOUND {
            return Ok(Outcome::NotFound);
        }
        if !response.status().is_success() {
            return Err(LookupError::Status(response.status().as_u16()));
        }
        let bytes = body::read_capped(response.into_body(), body::MAX_DEPENDENCY_BODY_BYTES)
            .await
            .map_err(|_| LookupError::BadAnswer)?;
        if let Query::AlternateKey(_) = query {
            let user: SystemUser =
                serde_json::from_slice(&bytes).map_err(|_| LookupError::BadAnswer)?;
            return Ok(if user.isdisabled {
                Outcome::Disabled
            } else {
                Outcome::Found(user.systemuserid)
            });
        }
        let users: SystemUsers =
            serde_json::from_slice(&bytes).map_err(|_| LookupError::BadAnswer)?;
        Ok(match users.value.as_slice() {
            [] => Outcome::NotFound,
            [user] if user.isdisabled => Outcome::Disabled,
            [user] => Outcome::Found(user.systemuserid),
            _ => Outcome::Ambiguous,
        })
    }
}

/// A GET of `path` in Dataverse as the application user (the S2S token, no impersonation),
/// retried once with a replacement token if Dataverse rejects the token: for the gateway's
/// own lookups (users, stored queries).
pub(crate) async fn s2s_get(
    client: &DataverseClient,
    tokens: &TokenSource,
    path: &str,
    timeout: Duration,
) -> Result<http::Response<hyper::body::Incoming>, LookupError> {
    s2s_get_with(client, tokens, path, timeout, HeaderMap::new()).await
}

/// As [`s2s_get`], with `headers` added to (or replacing) the usual ones: `Accept` for a
/// document that is not JSON, `If-None-Match` for a revalidation.
pub(crate) async fn s2s_get_with(
    client: &DataverseClient,
    tokens: &TokenSource,
    path: &str,
    timeout: Duration,
    headers: HeaderMap,
) -> Result<http::Response<hyper::body::Incoming>, LookupError> {
    let mut token = tokens
        .current_or_first(tokio::time::Instant::now() + timeout)
        .await
        .map_err(UpstreamError::from)?;
    let mut retried = false;
    loop {
        let response = send(client, path, &token, timeout, &headers).await?;
        if response.status() == StatusCode::UNAUTHORIZED && !retried {
            retried = true;
            if let Some(replacement) = tokens
                .replace_rejected(&token)
                .await
                .map_err(UpstreamError::from)?
            {
                token = replacement;
                continue;
            }
        }
        return Ok(response);
    }
}

async fn send(
    client: &DataverseClient,
    path: &str,
    token: &S2sToken,
    timeout: Duration,
    extra: &HeaderMap,
) -> Result<http::Response<hyper::body::Incoming>, LookupError> {
    let mut request = Request::new(body::empty());
    *request.uri_mut() = client.uri(path)?;
    let headers = request.headers_mut();
    headers.insert(AUTHORIZATION, token.authorization().clone());
    headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
    headers.insert("odata-maxversion", HeaderValue::from_static("4.0"));
    headers.insert("odata-version", HeaderValue::from_static("4.0"));
    for (name, value) in extra {
        headers.insert(name, value.clone());
    }
    match tokio::time::timeout(timeout, client.send(request)).await {
        Err(_) => Err(LookupError::Timeout(timeout)),
        Ok(Err(e)) => Err(LookupError::Unreachable(Arc::new(e))),
        Ok(Ok(response)) => Ok(response),
    }
}

/// The request that finds exactly `value` in `attribute`.
fn query(attribute: LookupAttribute, value: &str) -> Result<Query, IdentityError> {
    const SELECT: &str = "$select=systemuserid,isdisabled";
    Ok(match attribute {
        LookupAttribute::AzureActiveDirectoryObjectId => {
            let id = Uuid::try_parse(value)
                .map_err(|_| IdentityError::NotAGuid(attribute.name().to_string()))?;
            Query::AlternateKey(format!(
                "/api/data/v9.2/systemusers({}={})?{SELECT}",
                attribute.name(),
                id.hyphenated()
            ))
        }
        LookupAttribute::InternalEmailAddress | LookupAttribute::DomainName => {
            Query::Filter(format!(
                "/api/data/v9.2/systemusers?{SELECT}&$filter={}",
                utf8_percent_encode(&filter(attribute, value)?, FILTER_VALUE)
            ))
        }
    })
}

/// The OData filter that matches exactly `value` in `attribute`, before percent-encoding.
pub fn filter(attribute: LookupAttribute, value: &str) -> Result<String, IdentityError> {
    let literal = match attribute {
        LookupAttribute::AzureActiveDirectoryObjectId => {
            let id = Uuid::try_parse(value)
                .map_err(|_| IdentityError::NotAGuid(attribute.name().to_string()))?;
            id.hyphenated().to_string()
        }
        LookupAttribute::InternalEmailAddress | LookupAttribute::DomainName => {
            format!("'{}'", value.replace('\'', "''"))
        }
    };
    Ok(format!("{} eq {literal}", attribute.name()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guid_attribute_takes_only_guids() {
        let f = filter(
            LookupAttribute::AzureActiveDirectoryObjectId,
            "9F2C4C1E-5D7A-4B8E-A6C3-0D1E2F3A4B5C",
        )
        .unwrap();
        assert_eq!(
            f,
            "azureactivedirectoryobjectid eq 9f2c4c1e-5d7a-4b8e-a6c3-0d1e2f3a4b5c"
        );
        assert!(filter(LookupAttribute::AzureActiveDirectoryObjectId, "x or 1 eq 1").is_err());
    }

    #[test]
    fn object_ids_use_the_alternate_key_in_canonical_form() {
        let q = query(
            LookupAttribute::AzureActiveDirectoryObjectId,
            "{9F2C4C1E-5D7A-4B8E-A6C3-0D1E2F3A4B5C}",
        )
        .unwrap();
        assert_eq!(
            q.path(),
            "/api/data/v9.2/systemusers(azureactivedirectoryobjectid=9f2c4c1e-5d7a-4b8e-a6c3-0d1e2f3a4b5c)?$select=systemuserid,isdisabled"
        );
        assert!(query(
            LookupAttribute::AzureActiveDirectoryObjectId,
            "x)?$filter=1"
        )
        .is_err());
    }

    #[test]
    fn string_literals_double_quotes_and_stay_one_literal() {
        let f = filter(
            LookupAttribute::InternalEmailAddress,
            "o'neil@x.com') or (1 eq 1",
        )
        .unwrap();
        assert_eq!(f, "internalemailaddress eq 'o''neil@x.com'') or (1 eq 1'");
        let encoded = utf8_percent_encode(&f, FILTER_VALUE).to_string();
        assert!(
            !encoded.contains('\'') && !encoded.contains(' ') && !encoded.contains('&'),
            "{encoded}"
        );
    }
}
