//! The one place where a failure becomes an HTTP response: status by whose fault it is,
//! and a body in Dataverse's own error shape, `{"error":{"code":..,"message":..}}`, so
//! clients parse gateway errors like Dynamics' errors. The cause chain is logged by the
//! pipeline, never put in the body.

use bytes::Bytes;
use http::header::{HeaderValue, CONNECTION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};

use crate::access::AccessDenied;
use crate::body::{self, GatewayBody};
use crate::identity::{IdentityError, LookupError};
use crate::inbound::AuthError;
use crate::routing::RouteError;
use crate::upstream::headers::X_REQUEST_ID;
use crate::upstream::path::PathError;
use crate::upstream::UpstreamError;

/// Everything that can stop a request inside the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Path(#[from] PathError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Route(#[from] RouteError),
    #[error(transparent)]
    Access(#[from] AccessDenied),
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("the gateway has {0} requests in flight, its limit; retry shortly")]
    Overloaded(usize),
    #[error("the gateway failed while handling the request")]
    Internal,
}

impl GatewayError {
    /// The low-cardinality label used in logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Path(PathError::NotProxied) => "not_proxied",
            Self::Path(PathError::Ambiguous) => "ambiguous_path",
            Self::Path(PathError::BadHost) => "bad_host",
            Self::Auth(e) => e.reason(),
            Self::Route(e) => e.reason(),
            Self::Access(_) => "access_denied",
            Self::Identity(e) => e.reason(),
            Self::Upstream(e) => e.reason(),
            Self::Overloaded(_) => "overloaded",
            Self::Internal => "internal",
        }
    }

    /// Status and the gateway's error code, in one ordered match: the caller's fault is
    /// 4xx, Dataverse unreachable or slow 502/504, a dependency down 503, our bug 500.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        use UpstreamError as U;
        match self {
            Self::Path(PathError::NotProxied) => (StatusCode::NOT_FOUND, "NotProxied"),
            Self::Path(PathError::Ambiguous) => (StatusCode::BAD_REQUEST, "AmbiguousPath"),
            Self::Path(PathError::BadHost) => (StatusCode::BAD_REQUEST, "BadHost"),
            Self::Auth(AuthError::KeysUnavailable { .. }) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "IdentityProviderUnavailable",
            ),
            Self::Auth(AuthError::MissingToken) => (StatusCode::UNAUTHORIZED, "MissingToken"),
            Self::Auth(_) => (StatusCode::UNAUTHORIZED, "InvalidToken"),
            Self::Route(RouteError::UnknownEnvironment(_)) => {
                (StatusCode::NOT_FOUND, "UnknownEnvironment")
            }
            Self::Route(_) => (StatusCode::FORBIDDEN, "EnvironmentNotAllowed"),
            Self::Access(_) => (StatusCode::FORBIDDEN, "AccessDenied"),
            Self::Identity(IdentityError::Lookup(LookupError::NoToken(_))) => {
                (StatusCode::SERVICE_UNAVAILABLE, "NoUpstreamToken")
            }
            Self::Identity(IdentityError::Lookup(LookupError::Timeout(_))) => {
                (StatusCode::GATEWAY_TIMEOUT, "UpstreamTimeout")
            }
            Self::Identity(IdentityError::Lookup(_)) => {
                (StatusCode::BAD_GATEWAY, "UserLookupFailed")
            }
            Self::Identity(_) => (StatusCode::FORBIDDEN, "CallerNotMapped"),
            Self::Upstream(U::BodyTooLarge { .. }) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "RequestBodyTooLarge")
            }
            Self::Upstream(U::RequestBody(_)) => {
                (StatusCode::BAD_REQUEST, "RequestBodyInterrupted")
            }
            Self::Upstream(U::BodyTimeout(_)) => {
                (StatusCode::REQUEST_TIMEOUT, "RequestBodyTimeout")
            }
            Self::Upstream(U::ExchangeDeadline(_)) => {
                (StatusCode::GATEWAY_TIMEOUT, "UpstreamTimeout")
            }
            Self::Upstream(U::NoToken(_)) => (StatusCode::SERVICE_UNAVAILABLE, "NoUpstreamToken"),
            Self::Upstream(U::Timeout(_)) => (StatusCode::GATEWAY_TIMEOUT, "UpstreamTimeout"),
            Self::Upstream(U::Unreachable(_)) => (StatusCode::BAD_GATEWAY, "UpstreamUnreachable"),
            Self::Upstream(U::Build(_)) => (StatusCode::INTERNAL_SERVER_ERROR, "Internal"),
            Self::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "Overloaded"),
            Self::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "Internal"),
        }
    }

    /// Status, Dataverse-shaped JSON body, and the headers RFC 6750 asks for.
    pub fn into_response(&self, request_id: &HeaderValue) -> Response<GatewayBody> {
        let (status, code) = self.status_and_code();
        let id = request_id.to_str().unwrap_or("-");
        let json = serde_json::json!({
            "error": { "code": format!("DynamicsGateway.{code}"), "message": format!("{self} (request id {id})") }
        });
        let mut response = Response::new(body::full(Bytes::from(json.to_string())));
        *response.status_mut() = status;
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/json; charset=utf-8"),
        );
        headers.insert(X_REQUEST_ID, request_id.clone());
        match self {
            Self::Auth(AuthError::MissingToken) => {
                headers.insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            Self::Auth(e) if status == StatusCode::UNAUTHORIZED => {
                // The description is our own text (caller-supplied parts are sanitised), never the token.
                let value = format!(
                    "Bearer error=\"invalid_token\", error_description=\"{}\"",
                    e.to_string().replace(['"', '\\'], "'")
                );
                if let Ok(v) = HeaderValue::from_str(&value) {
                    headers.insert(WWW_AUTHENTICATE, v);
                }
            }
            _ if status == StatusCode::SERVICE_UNAVAILABLE => {
                headers.insert(RETRY_AFTER, HeaderValue::from_static("5"));
            }
            // The rest of a stalled body is never read: the connection cannot carry another request.
            Self::Upstream(UpstreamError::BodyTimeout(_)) => {
                headers.insert(CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

/// Why a connection is refused before any request on it is read.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum ConnectionRefused {
    #[error("the gateway has {0} open connections, its limit; retry shortly")]
    TooMany(usize),
    #[error("your address has {0} open connections to the gateway, the limit per address; reuse or close idle ones, or retry shortly")]
    TooManyFromPeer(usize),
}

impl ConnectionRefused {
    /// The complete HTTP/1.1 503 written to the refused connection, in the same error
    /// shape as every other gateway error. It is written raw: no request is read, so a
    /// flood of connections costs one small write each.
    pub fn http1_response(&self, request_id: &str) -> Vec<u8> {
        let json = serde_json::json!({
            "error": {
                "code": "DynamicsGateway.TooManyConnections",
                "message": format!("{self} (request id {request_id})"),
            }
        })
        .to_string();
        format!(
            "HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json; charset=utf-8\r\nx-request-id: {request_id}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{json}",
            json.len()
        )
        .into_bytes()
    }
}

/// An error and its sources, `: `-joined, for one log line.
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let s = e.to_string();
        if !text.contains(&s) {
            text.push_str(": ");
            text.push_str(&s);
        }
        source = e.source();
    }
    text
}
