//! The body type every response and forwarded request uses: a boxed stream of bytes, so
//! upstream bodies pass through without being collected.

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Empty, Full, LengthLimitError, Limited};

/// Error type carried by streamed bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed body as it passes through the gateway.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

/// A body of known bytes.
pub fn full(bytes: impl Into<Bytes>) -> GatewayBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A body with nothing in it.
pub fn empty() -> GatewayBody {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// Boxes any body whose error converts into `BoxError`.
pub fn boxed<B>(body: B) -> GatewayBody
where
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    body.map_err(Into::into).boxed_unsync()
}

/// Bytes already read from a body, followed by the rest of it.
pub struct PrefixedBody {
    prefix: Option<Bytes>,
    rest: GatewayBody,
}

impl PrefixedBody {
    pub fn new(prefix: Bytes, rest: GatewayBody) -> Self {
        Self {
            prefix: (!prefix.is_empty()).then_some(prefix),
            rest,
        }
    }
}

impl http_body::Body for PrefixedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        if let Some(prefix) = self.prefix.take() {
            return std::task::Poll::Ready(Some(Ok(http_body::Frame::data(prefix))));
        }
        std::pin::Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.rest.is_end_stream()
    }
}

/// The most the gateway reads of any document from a dependency (discovery, JWKS, token
/// endpoint, IMDS, user lookup): each is a few KiB, so 1 MiB is generous, and a
/// dependency streaming without end costs at most this much memory.
pub const MAX_DEPENDENCY_BODY_BYTES: usize = 1024 * 1024;

/// Why a capped read gave up.
#[derive(Debug, thiserror::Error)]
pub enum CappedReadError {
    #[error("the body is larger than the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("the body could not be read")]
    Read(#[source] BoxError),
}

/// Reads a whole body of at most `limit` bytes. A declared length over the limit fails
/// before anything is read; otherwise reading stops at the first byte over it, and the
/// body (and with it the connection) is dropped rather than drained.
pub async fn read_capped<B>(body: B, limit: usize) -> Result<Bytes, CappedReadError>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    let too_large = CappedReadError::TooLarge { limit };
    if usize::try_from(http_body::Body::size_hint(&body).lower()).map_or(true, |n| n > limit) {
        return Err(too_large);
    }
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<LengthLimitError>().is_some() => Err(too_large),
        Err(e) => Err(CappedReadError::Read(e)),
    }
}

/// [`read_capped`] for a `reqwest` response's body.
pub async fn read_response_capped(
    response: reqwest::Response,
    limit: usize,
) -> Result<Bytes, CappedReadError> {
    read_capped(http::Response::from(response).into_body(), limit).await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A body that never ends, counting the frames pulled from it.
    struct Endless {
        pulled: usize,
    }

    impl http_body::Body for Endless {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: std::pin::Pin<&mut Self>,
            _cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
            self.pulled += 1;
            std::task::Poll::Ready(Some(Ok(http_body::Frame::data(Bytes::from_static(
                b"0123456789",
            )))))
        }
    }

    #[tokio::test]
    async fn reads_up_to_the_limit_and_stops_after_it() {
        assert_eq!(
            read_capped(full("12345"), 5).await.unwrap(),
            Bytes::from("12345")
        );
        // Declared too long: refused before reading.
        assert!(matches!(
            read_capped(full("123456"), 5).await,
            Err(CappedReadError::TooLarge { limit: 5 })
        ));
        // Undeclared and endless: refused at the first frame over the limit.
        let mut endless = Endless { pulled: 0 };
        let result = read_capped(&mut endless, 95).await;
        assert!(matches!(
            result,
            Err(CappedReadError::TooLarge { limit: 95 })
        ));
        assert_eq!(endless.pulled, 10);
    }
}
