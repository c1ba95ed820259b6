//! Upstream: everything about the hop to Dataverse. `token` holds the S2S token,
//! `headers` strips and sets headers (which paths may go is `crate::request_target`), `forward`
//! streams the request and response, `odata_links` and `link_body` rewrite absolute
//! URLs between Dataverse and the gateway, `encoding` decides and applies compression, `client` is the pooled connection to Dataverse,
//! `budget` keeps Dataverse's service-protection budget (the concurrency and 429 gate).

pub mod batch_parts;
pub mod budget;
mod call;
pub(crate) mod client;
pub mod credential;
pub(crate) mod encoding;
pub(crate) mod forward;
pub mod headers;
pub mod link_body;
pub mod odata_links;
pub(crate) mod token;

use std::time::Duration;

pub(crate) use client::DataverseClient;
pub(crate) use forward::{ForwardContext, Forwarder};
pub(crate) use token::{S2sToken, TokenError, TokenPolicy, TokenSource};

use crate::body::{BodyTimeout, BoxError};

/// Why a request could not be sent to, or answered by, Dataverse.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    NoToken(#[from] TokenError),
    #[error("Dynamics did not answer within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("Dynamics is unreachable")]
    Unreachable(#[source] BoxError),
    #[error("the request body is larger than the limit of {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("the request body could not be read from the caller")]
    RequestBody(#[source] BoxError),
    #[error("the request body's Content-Encoding cannot be decoded; send it as gzip, deflate, br or uncompressed")]
    UnsupportedEncoding,
    #[error("Dynamics answered in a content coding the gateway cannot decode")]
    UndecodableResponse,
    #[error(transparent)]
    BodyTimeout(#[from] BodyTimeout),
    #[error("Dynamics had not answered when the {} allowed for the whole request ran out (server.exchange_timeout)", humantime::format_duration(*.0))]
    ExchangeDeadline(Duration),
    #[error("the upstream request could not be built")]
    Build(#[source] BoxError),
    #[error(transparent)]
    Batch(#[from] batch_parts::BatchRefusal),
    /// A pair of the request body no access rule grants.
    #[error(transparent)]
    Access(#[from] crate::access::AccessDenied),
    #[error(transparent)]
    ControlHeader(#[from] crate::access::ControlHeaderRefused),
    #[error(transparent)]
    Budget(#[from] budget::BudgetError),
}

impl From<link_body::BodyRefusal> for UpstreamError {
    fn from(refusal: link_body::BodyRefusal) -> Self {
        match refusal {
            link_body::BodyRefusal::Batch(e) => Self::Batch(e),
            link_body::BodyRefusal::Access(e) => Self::Access(e),
        }
    }
}

impl UpstreamError {
    /// Label for logs and metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoToken(_) => "no_s2s_token",
            Self::Timeout(_) => "upstream_timeout",
            Self::Unreachable(_) => "upstream_unreachable",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::RequestBody(_) => "request_body_failed",
            Self::UnsupportedEncoding => "unsupported_encoding",
            Self::UndecodableResponse => "undecodable_response",
            Self::BodyTimeout(BodyTimeout::Idle(_)) => "body_read_timeout",
            Self::BodyTimeout(BodyTimeout::Deadline(_)) => "exchange_timeout",
            Self::BodyTimeout(BodyTimeout::TooSlow(_)) => "min_body_rate",
            Self::ExchangeDeadline(_) => "exchange_timeout",
            Self::Build(_) => "internal",
            Self::Batch(e) => e.reason(),
            Self::Access(e) if e.metadata_unavailable => "metadata_unavailable",
            Self::Access(_) => "access_denied",
            Self::ControlHeader(_) => "control_header_refused",
            Self::Budget(e) => e.reason(),
        }
    }
}
