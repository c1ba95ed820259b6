//! The one place where a failure becomes an HTTP response: status by whose fault it is,
//! and a body in Dataverse's own error shape, `{"error":{"code":..,"message":..}}`, so
//! clients parse gateway errors like Dynamics' errors. The cause chain is logged by the
//! pipeline with the request id, never put in the body: a failure on the gateway's side
//! (a dependency, its credentials) answers a fixed message per kind, so no upstream
//! error text, URL, host name or credential detail ever reaches a caller.

use bytes::Bytes;
use http::header::{HeaderValue, ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Response, StatusCode};

use crate::access::AccessDenied;
use crate::body::{self, GatewayBody};
use crate::identity::{IdentityError, LookupError};
use crate::inbound::AuthError;
use crate::method::{self, MethodNotAllowed};
use crate::request_target::PathError;
use crate::routing::RouteError;
use crate::upstream::batch_parts::BatchRefusal;
use crate::upstream::budget::{self, BudgetError, ThrottleCode};
use crate::upstream::headers::X_REQUEST_ID;
use crate::upstream::UpstreamError;

/// Everything that can stop a request inside the gateway.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Method(#[from] MethodNotAllowed),
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
    #[error("the request's head is larger than {0} bytes; send fewer or smaller headers")]
    HeadTooLarge(usize),
    #[error("the gateway failed while handling the request")]
    Internal,
}

impl GatewayError {
    /// The low-cardinality label used in logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Method(_) => "method_not_allowed",
            Self::Path(PathError::NotProxied) => "not_proxied",
            Self::Path(PathError::Ambiguous) => "ambiguous_path",
            Self::Path(PathError::BadHost) => "bad_host",
            Self::Path(PathError::MisplacedBatch) => "misplaced_batch",
            Self::Auth(e) => e.reason(),
            Self::Route(e) => e.reason(),
            Self::Access(e) if e.metadata_unavailable => "metadata_unavailable",
            Self::Access(_) => "access_denied",
            Self::Identity(e) => e.reason(),
            Self::Upstream(e) => e.reason(),
            Self::Overloaded(_) => "overloaded",
            Self::HeadTooLarge(_) => "head_too_large",
            Self::Internal => "internal",
        }
    }

    /// Status and the gateway's error code, in one ordered match: the caller's fault is
    /// 4xx, Dataverse unreachable or slow 502/504, a dependency down 503, our bug 500.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        use UpstreamError as U;
        match self {
            Self::Method(_) => (StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed"),
            Self::Path(PathError::NotProxied) => (StatusCode::NOT_FOUND, "NotProxied"),
            Self::Path(PathError::Ambiguous) => (StatusCode::BAD_REQUEST, "AmbiguousPath"),
            Self::Path(PathError::BadHost) => (StatusCode::BAD_REQUEST, "BadHost"),
            Self::Path(PathError::MisplacedBatch) => (StatusCode::BAD_REQUEST, "MisplacedBatch"),
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
            Self::Access(e) if e.metadata_unavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "MetadataUnavailable")
            }
            Self::Access(_) => (StatusCode::FORBIDDEN, "AccessDenied"),
            // Pairs of the body, and `$batch` parts, are refused as the request line is.
            Self::Upstream(U::Access(e) | U::Batch(BatchRefusal::PartAccess { denied: e, .. }))
                if e.metadata_unavailable =>
            {
                (StatusCode::SERVICE_UNAVAILABLE, "MetadataUnavailable")
            }
            Self::Upstream(U::Access(_) | U::Batch(BatchRefusal::PartAccess { .. })) => {
                (StatusCode::FORBIDDEN, "AccessDenied")
            }
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
            Self::Upstream(U::UnsupportedEncoding) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedContentEncoding",
            ),
            Self::Upstream(U::UndecodableResponse) => {
                (StatusCode::BAD_GATEWAY, "UndecodableResponse")
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
            Self::Upstream(U::Batch(BatchRefusal::PartTooLarge { .. })) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "BatchPartTooLarge")
            }
            // A control header is refused alike at top level and in a part: 403, as the
            // caller is not allowed what it asked for (the body names header and part).
            Self::Upstream(U::ControlHeader(_) | U::Batch(BatchRefusal::ControlHeader { .. })) => {
                (StatusCode::FORBIDDEN, "ControlHeaderNotAllowed")
            }
            Self::Upstream(U::Batch(_)) => (StatusCode::BAD_REQUEST, "BatchPartRefused"),
            Self::Upstream(U::Budget(BudgetError::Throttled { .. })) => {
                (StatusCode::TOO_MANY_REQUESTS, "Throttled")
            }
            Self::Upstream(U::Budget(BudgetError::QueueTimeout { .. })) => {
                (StatusCode::SERVICE_UNAVAILABLE, "BudgetQueueTimeout")
            }
            Self::Upstream(U::Budget(BudgetError::QueueFull(_))) => {
                (StatusCode::SERVICE_UNAVAILABLE, "BudgetQueueFull")
            }
            Self::Overloaded(_) => (StatusCode::SERVICE_UNAVAILABLE, "Overloaded"),
            Self::HeadTooLarge(_) => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "RequestHeaderFieldsTooLarge",
            ),
            Self::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "Internal"),
        }
    }

    /// What the caller is told. Their own mistakes are described in the gateway's own
    /// words (which name only what the caller sent); the gateway's failures get a fixed
    /// sentence per kind, since their causes describe the gateway's dependencies.
    fn caller_message(&self) -> std::borrow::Cow<'static, str> {
        use UpstreamError as U;
        let fixed = match self {
            Self::Auth(AuthError::KeysUnavailable { .. }) => {
                "the signing keys of the token's issuer are not available yet; retry shortly"
            }
            Self::Identity(IdentityError::Lookup(LookupError::NoToken(_)))
            | Self::Upstream(U::NoToken(_)) => {
                "the gateway holds no valid Dynamics S2S token (its token endpoint has not supplied one); retry shortly"
            }
            Self::Identity(IdentityError::Lookup(LookupError::Timeout(_))) => {
                "Dynamics did not answer the gateway's user lookup in time"
            }
            Self::Identity(IdentityError::Lookup(_)) => {
                "looking up the caller's Dynamics user failed"
            }
            Self::Upstream(U::Timeout(_)) => "Dynamics did not answer in time",
            Self::Upstream(U::Unreachable(_)) => "Dynamics is unreachable",
            Self::Upstream(U::Build(_)) | Self::Internal => {
                "the gateway failed while handling the request"
            }
            _ => return self.to_string().into(),
        };
        fixed.into()
    }

    /// Status, Dataverse-shaped JSON body, and the headers RFC 6750 asks for.
    pub fn into_response(&self, request_id: &HeaderValue) -> Response<GatewayBody> {
        let (status, code) = self.status_and_code();
        let id = request_id.to_str().unwrap_or("-");
        // A closed budget answers with the code Dataverse throttled with, so clients that
        // retry on Dataverse's codes treat the gateway's 429 exactly like Dataverse's.
        let code = match self {
            Self::Upstream(UpstreamError::Budget(BudgetError::Throttled { code, .. }))
                if *code != ThrottleCode::Other =>
            {
                code.as_str().to_string()
            }
            _ => format!("DynamicsGateway.{code}"),
        };
        let json = serde_json::json!({
            "error": {
                "code": code,
                "message": format!("{} (request id {id})", self.caller_message()),
            }
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
            Self::Method(_) => {
                headers.insert(ALLOW, HeaderValue::from_static(method::ALLOW));
            }
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
            Self::Upstream(UpstreamError::Budget(BudgetError::Throttled {
                retry_after, ..
            })) => {
                let secs = budget::retry_after_secs(*retry_after).max(1);
                headers.insert(RETRY_AFTER, HeaderValue::from(secs));
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
pub(crate) enum ConnectionRefused {
    #[error("the gateway has {0} open connections, its limit; retry shortly")]
    TooMany(usize),
    #[error("your address has {0} open connections to the gateway, the limit per address; reuse or close idle ones, or retry shortly")]
    TooManyFromPeer(usize),
}

impl ConnectionRefused {
    /// The complete HTTP/1.1 503 written to the refused connection, in the same error
    /// shape as every other gateway error. It is written raw: no request is read, so a
    /// flood of connections costs one small write each.
    pub(crate) fn http1_response(&self, request_id: &str) -> Vec<u8> {
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

/// An error and its sources, `: `-joined, for one log line. The gateway's own errors never
/// print their source in `Display` (each cause is printed once, here); a source whose text
/// is already in the line is skipped for the third-party errors that do.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_print_their_cause_once_in_the_chain_and_not_in_their_own_text() {
        use crate::identity::lookup::LookupError;
        use crate::identity::IdentityError;
        use crate::upstream::credential::CredentialError;
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file (os error 2)");
        let errors: Vec<Box<dyn std::error::Error>> = vec![
            Box::new(TokenError::Credential(CredentialError::Read {
                path: "/var/run/token".into(),
                source: io(),
            })),
            Box::new(IdentityError::Lookup(LookupError::Status(503))),
            Box::new(crate::config::ConfigError::Read {
                path: "/etc/gateway.yaml".into(),
                source: io(),
            }),
            Box::new(
                crate::config::Config::from_yaml("server: [unclosed", &|_| None)
                    .expect_err("not YAML"),
            ),
        ];
        for error in errors {
            let own = error.to_string();
            let source = error.source().expect("a cause").to_string();
            assert!(!own.contains(&source), "{own} prints its cause {source}");
            let line = chain(error.as_ref());
            assert_eq!(line.matches(&source).count(), 1, "{line}");
            assert!(line.starts_with(&own), "{line}");
        }
    }
    use crate::upstream::TokenError;

    /// Text that describes the gateway's credentials or dependencies.
    const CAUSE: &str = "AADSTS7000215: Invalid client secret provided for a secret added to app 2222 at https://login.example/tenant/oauth2/v2.0/token (idp.internal)";

    fn body_of(error: &GatewayError) -> (StatusCode, String) {
        let response = error.into_response(&HeaderValue::from_static("req-123"));
        let status = response.status();
        let body = text_of(response);
        (status, body)
    }

    fn text_of(response: Response<GatewayBody>) -> String {
        use http_body_util::BodyExt;
        let bytes = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(response.into_body().collect())
            .unwrap()
            .to_bytes();
        String::from_utf8(bytes.to_vec()).unwrap()
    }

    #[test]
    fn dependency_failures_never_show_their_cause() {
        let io = || -> crate::body::BoxError { CAUSE.into() };
        let cases = [
            GatewayError::Upstream(UpstreamError::NoToken(TokenError::NoValidToken {
                last_error: CAUSE.into(),
            })),
            GatewayError::Upstream(UpstreamError::NoToken(TokenError::InvalidResponse(
                CAUSE.into(),
            ))),
            GatewayError::Upstream(UpstreamError::Unreachable(io())),
            GatewayError::Upstream(UpstreamError::Build(io())),
            GatewayError::Auth(AuthError::KeysUnavailable {
                issuer: CAUSE.into(),
            }),
            GatewayError::Identity(IdentityError::Lookup(LookupError::NoToken(
                std::sync::Arc::new(TokenError::InvalidResponse(CAUSE.into())),
            ))),
            GatewayError::Identity(IdentityError::Lookup(LookupError::Unreachable(
                std::sync::Arc::from(io()),
            ))),
            GatewayError::Identity(IdentityError::Lookup(LookupError::Status(401))),
            GatewayError::Internal,
        ];
        for error in &cases {
            let (status, body) = body_of(error);
            assert!(status.is_server_error() || status.is_client_error());
            let json: serde_json::Value = serde_json::from_str(&body).unwrap();
            let message = json["error"]["message"].as_str().unwrap();
            assert!(message.ends_with("(request id req-123)"), "{message}");
            for leak in ["AADSTS", "2222", "http", "idp.internal", "secret"] {
                assert!(!body.contains(leak), "{leak} in {body}");
            }
            // The cause is still there for the log line.
            if !matches!(error, GatewayError::Internal) {
                let logged = chain(error);
                assert!(
                    logged.contains("AADSTS7000215") || logged.contains("401"),
                    "{logged}"
                );
            }
        }
    }

    #[test]
    fn callers_mistakes_are_still_explained() {
        let (status, body) = body_of(&GatewayError::Auth(AuthError::Expired));
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert!(
            body.contains("the token has expired (request id req-123)"),
            "{body}"
        );
    }
}
