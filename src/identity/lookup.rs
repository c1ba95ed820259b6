//! `lookup` mode: finds the caller's `systemuserid` in Dataverse with the S2S token and
//! remembers the answer (found, not found, disabled) in a bounded cache. Concurrent
//! requests of one caller share a single lookup.
//!
//! The claim value goes into an OData `$filter`, so it is an injection point: a GUID
//! attribute takes only a value that parses as a GUID (written unquoted), a string
//! attribute takes a single-quoted literal with `'` doubled, and the whole filter is
//! percent-encoded. The filter can therefore only ever match that exact value.

use std::sync::Arc;
use std::time::Duration;

use http::header::{ACCEPT, AUTHORIZATION, HOST};
use http::{HeaderValue, Request, StatusCode};
use moka::future::Cache;
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
    #[error("no S2S token ({0})")]
    NoToken(String),
    #[error("Dynamics did not answer within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("Dynamics is unreachable ({0})")]
    Unreachable(String),
    #[error("Dynamics answered {0}")]
    Status(u16),
    #[error("Dynamics' answer was not the expected JSON")]
    BadAnswer,
}

impl From<UpstreamError> for LookupError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::NoToken(t) => Self::NoToken(t.to_string()),
            UpstreamError::Timeout(d) => Self::Timeout(d),
            other => Self::Unreachable(crate::error::chain(&other)),
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
    /// Keyed by (issuer, claim value): the same value from two issuers may be two people.
    cache: Cache<(Arc<str>, String), Outcome>,
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
            .time_to_live(config.cache_ttl)
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

    pub async fn resolve(
        &self,
        issuer: &Arc<str>,
        value: &str,
    ) -> Result<Impersonation, IdentityError> {
        let filter = filter(self.attribute, value)?;
        let entry = self
            .cache
            .entry((issuer.clone(), value.to_string()))
            .or_try_insert_with(self.fetch(filter))
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

    async fn fetch(&self, filter: String) -> Result<Outcome, LookupError> {
        let path = format!(
            "/api/data/v9.2/systemusers?$select=systemuserid,isdisabled&$filter={}",
            utf8_percent_encode(&filter, FILTER_VALUE)
        );
        let mut token = self
            .tokens
            .current_or_first()
            .await
            .map_err(UpstreamError::from)?;
        let mut retried = false;
        let response = loop {
            let response = self.send(&path, &token).await?;
            if response.status() == StatusCode::UNAUTHORIZED && !retried {
                retried = true;
                if let Some(replacement) = self
                    .tokens
                    .replace_rejected(&token)
                    .await
                    .map_err(UpstreamError::from)?
                {
                    token = replacement;
                    continue;
                }
            }
            break response;
        };
        if !response.status().is_success() {
            return Err(LookupError::Status(response.status().as_u16()));
        }
        let bytes = body::read_capped(response.into_body(), body::MAX_DEPENDENCY_BODY_BYTES)
            .await
            .map_err(|_| LookupError::BadAnswer)?;
        let users: SystemUsers =
            serde_json::from_slice(&bytes).map_err(|_| LookupError::BadAnswer)?;
        Ok(match users.value.as_slice() {
            [] => Outcome::NotFound,
            [user] if user.isdisabled => Outcome::Disabled,
            [user] => Outcome::Found(user.systemuserid),
            _ => Outcome::Ambiguous,
        })
    }

    async fn send(
        &self,
        path: &str,
        token: &S2sToken,
    ) -> Result<http::Response<hyper::body::Incoming>, LookupError> {
        let mut request = Request::new(body::empty());
        *request.uri_mut() = self.client.uri(path)?;
        let headers = request.headers_mut();
        headers.insert(HOST, self.client.host_header().clone());
        headers.insert(AUTHORIZATION, token.authorization().clone());
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        headers.insert("odata-maxversion", HeaderValue::from_static("4.0"));
        headers.insert("odata-version", HeaderValue::from_static("4.0"));
        match tokio::time::timeout(self.timeout, self.client.send(request)).await {
            Err(_) => Err(LookupError::Timeout(self.timeout)),
            Ok(Err(e)) => Err(LookupError::Unreachable(crate::error::chain(&e))),
            Ok(Ok(response)) => Ok(response),
        }
    }
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
