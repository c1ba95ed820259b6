//! OIDC discovery: where an issuer publishes its signing keys.

use serde::Deserialize;
use url::Url;

/// Why discovery or a key fetch failed; logged, and counted, never shown to callers.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("GET {url} failed")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url} answered {status}")]
    Status { url: String, status: u16 },
    /// Too large, or cut off: the read stops at the cap so a dependency streaming without
    /// end costs bounded memory.
    #[error("reading the answer of {url} failed")]
    Body {
        url: String,
        #[source]
        source: crate::body::CappedReadError,
    },
    #[error("{url} did not return the expected JSON")]
    Json {
        url: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("discovery document at {url} names issuer {found:?}, not the configured {expected:?}")]
    IssuerMismatch {
        url: String,
        found: String,
        expected: String,
    },
    #[error("discovery document at {url} has jwks_uri {jwks_uri:?}, which is not an https (or loopback http) URL")]
    InsecureJwksUri { url: String, jwks_uri: String },
    #[error("the key set at {url} holds no usable signing key")]
    NoKeys { url: String },
    #[error("the key set at {url} holds more than {max} keys")]
    TooManyKeys { url: String, max: usize },
}

#[derive(Deserialize)]
struct DiscoveryDocument {
    issuer: String,
    jwks_uri: String,
}

/// GETs JSON of at most [`crate::body::MAX_DEPENDENCY_BODY_BYTES`], mapping each failure
/// to a `FetchError` naming the URL.
pub async fn get_json<T: for<'de> Deserialize<'de>>(
    http: &reqwest::Client,
    url: &Url,
) -> Result<T, FetchError> {
    let response = http
        .get(url.clone())
        .send()
        .await
        .map_err(|source| FetchError::Http {
            url: url.to_string(),
            source,
        })?;
    if !response.status().is_success() {
        return Err(FetchError::Status {
            url: url.to_string(),
            status: response.status().as_u16(),
        });
    }
    let bytes = crate::body::read_response_capped(response, crate::body::MAX_DEPENDENCY_BODY_BYTES)
        .await
        .map_err(|source| FetchError::Body {
            url: url.to_string(),
            source,
        })?;
    serde_json::from_slice(&bytes).map_err(|source| FetchError::Json {
        url: url.to_string(),
        source,
    })
}

/// Reads the discovery document and returns its `jwks_uri`, after checking that the
/// document speaks for the configured issuer.
pub async fn discover_jwks_uri(
    http: &reqwest::Client,
    discovery_url: &Url,
    issuer: &str,
) -> Result<Url, FetchError> {
    let doc: DiscoveryDocument = get_json(http, discovery_url).await?;
    if doc.issuer != issuer {
        return Err(FetchError::IssuerMismatch {
            url: discovery_url.to_string(),
            found: doc.issuer,
            expected: issuer.to_string(),
        });
    }
    let insecure = || FetchError::InsecureJwksUri {
        url: discovery_url.to_string(),
        jwks_uri: doc.jwks_uri.clone(),
    };
    let jwks_uri = Url::parse(&doc.jwks_uri).map_err(|_| insecure())?;
    let secure = jwks_uri.scheme() == "https"
        || (jwks_uri.scheme() == "http" && crate::config::is_loopback(&jwks_uri));
    if !secure {
        return Err(insecure());
    }
    Ok(jwks_uri)
}
