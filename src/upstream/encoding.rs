//! Content codings on the hop to Dataverse. The gateway decides them: Dataverse is offered
//! only codings the caller accepts and the gateway can decode, so a compressed answer whose
//! links must be rewritten can be decoded, rewritten as it streams and encoded again in the
//! same coding; other compressed bodies pass untouched. Decoding is bounded: the output is
//! produced in small pieces and counted, never held whole.

use std::io;
use std::pin::Pin;

use async_compression::tokio::bufread::{
    BrotliDecoder, BrotliEncoder, GzipDecoder, GzipEncoder, ZlibDecoder, ZlibEncoder,
};
use async_compression::Level;
use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING};
use http::{HeaderMap, HeaderValue};
use http_body::Frame;
use http_body_util::{BodyDataStream, StreamBody};
use tokio::io::AsyncRead;
use tokio_util::io::{ReaderStream, StreamReader};

use crate::body::{self, BoxError, GatewayBody};

/// Size of each decoded or encoded piece handed on.
const PIECE_BYTES: usize = 16 * 1024;

/// A content coding the gateway can decode and encode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Coding {
    Gzip,
    /// HTTP's `deflate`: the zlib format (RFC 9110 8.4.1.2).
    Deflate,
    Brotli,
}

impl Coding {
    const ALL: [Coding; 3] = [Coding::Gzip, Coding::Deflate, Coding::Brotli];

    fn from_token(token: &str) -> Option<Self> {
        if token.eq_ignore_ascii_case("gzip") || token.eq_ignore_ascii_case("x-gzip") {
            Some(Self::Gzip)
        } else if token.eq_ignore_ascii_case("deflate") {
            Some(Self::Deflate)
        } else if token.eq_ignore_ascii_case("br") {
            Some(Self::Brotli)
        } else {
            None
        }
    }

    fn bit(self) -> u8 {
        match self {
            Self::Gzip => 1,
            Self::Deflate => 2,
            Self::Brotli => 4,
        }
    }
}

/// The codings a caller accepts among those the gateway can decode.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accepted(u8);

impl Accepted {
    /// Reads the caller's `Accept-Encoding` (RFC 9110 12.5.3): listed codings with a
    /// non-zero weight, `*` for every coding not refused by name. No header: identity only,
    /// since a caller that never asked for compression may not expect it.
    pub fn from_caller(headers: &HeaderMap) -> Self {
        let mut accepted = 0u8;
        let mut refused = 0u8;
        let mut any = false;
        for value in headers.get_all(ACCEPT_ENCODING) {
            let Ok(value) = value.to_str() else { continue };
            for item in value.split(',') {
                let mut params = item.split(';');
                let token = params.next().unwrap_or_default().trim();
                let weight_zero = params.any(|p| {
                    p.trim()
                        .strip_prefix("q=")
                        .or_else(|| p.trim().strip_prefix("Q="))
                        .and_then(|q| q.trim().parse::<f32>().ok())
                        .is_some_and(|q| q <= 0.0)
                });
                if token == "*" {
                    any = !weight_zero;
                    continue;
                }
                if let Some(coding) = Coding::from_token(token) {
                    if weight_zero {
                        refused |= coding.bit();
                    } else {
                        accepted |= coding.bit();
                    }
                }
            }
        }
        if any {
            accepted |= Coding::ALL.iter().fold(0, |bits, c| bits | c.bit()) & !refused;
        }
        Self(accepted & !refused)
    }

    pub fn contains(self, coding: Coding) -> bool {
        self.0 & coding.bit() != 0
    }

    /// The `Accept-Encoding` sent to Dataverse.
    pub fn header_value(self) -> HeaderValue {
        HeaderValue::from_static(match self.0 & 7 {
            1 => "gzip",
            2 => "deflate",
            3 => "gzip, deflate",
            4 => "br",
            5 => "gzip, br",
            6 => "deflate, br",
            7 => "gzip, deflate, br",
            _ => "identity",
        })
    }
}

/// How a body is encoded, from its `Content-Encoding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyCoding {
    Identity,
    Known(Coding),
    /// A coding the gateway cannot decode, or several stacked.
    Unknown,
}

impl BodyCoding {
    pub fn of(headers: &HeaderMap) -> Self {
        let mut values = headers.get_all(CONTENT_ENCODING).iter();
        let Some(value) = values.next() else {
            return Self::Identity;
        };
        if values.next().is_some() {
            return Self::Unknown;
        }
        let Ok(token) = value.to_str().map(str::trim) else {
            return Self::Unknown;
        };
        if token.is_empty() || token.eq_ignore_ascii_case("identity") {
            return Self::Identity;
        }
        Coding::from_token(token).map_or(Self::Unknown, Self::Known)
    }
}

/// A decoded body grew past its limit.
#[derive(Debug, thiserror::Error)]
#[error("the decompressed body is larger than the limit of {limit} bytes")]
pub struct DecodedTooLarge {
    pub limit: u64,
}

fn reader(
    body: GatewayBody,
) -> StreamReader<impl futures_util::Stream<Item = io::Result<Bytes>>, Bytes> {
    StreamReader::new(BodyDataStream::new(body).map_err(io::Error::other))
}

fn into_body(read: Pin<Box<dyn AsyncRead + Send>>, limit: u64) -> GatewayBody {
    let mut total = 0u64;
    let pieces = ReaderStream::with_capacity(read, PIECE_BYTES).map(move |piece| {
        let piece = piece.map_err(inner_error)?;
        total = total.saturating_add(piece.len() as u64);
        if total > limit {
            return Err(Box::new(DecodedTooLarge { limit }) as BoxError);
        }
        Ok(Frame::data(piece))
    });
    body::boxed(StreamBody::new(pieces))
}

/// The error a body stream failed with, out of the `io::Error` the codec wrapped it in, so
/// the forwarder still tells a timeout or an over-long body from a broken connection.
fn inner_error(error: io::Error) -> BoxError {
    if error.get_ref().is_none() {
        return Box::new(error);
    }
    error
        .into_inner()
        .unwrap_or_else(|| Box::new(io::Error::other("the body stream failed")))
}

/// `body` decoded from `coding`; an error once more than `limit` bytes come out.
pub fn decode(body: GatewayBody, coding: Coding, limit: u64) -> GatewayBody {
    let input = reader(body);
    let read: Pin<Box<dyn AsyncRead + Send>> = match coding {
        Coding::Gzip => {
            let mut decoder = GzipDecoder::new(input);
            decoder.multiple_members(true);
            Box::pin(decoder)
        }
        Coding::Deflate => Box::pin(ZlibDecoder::new(input)),
        Coding::Brotli => Box::pin(BrotliDecoder::new(input)),
    };
    into_body(read, limit)
}

/// `body` encoded in `coding`, at a fast level: the gateway re-encodes what it rewrote.
/// Reads the first frame of a decoding body before the answer's head goes out, and gives
/// the body back whole; an error there means the body does not decode from its start.
pub async fn decodes_at_start(mut body: GatewayBody) -> Result<GatewayBody, BoxError> {
    use http_body_util::BodyExt as _;
    match body.frame().await {
        None => Ok(crate::body::empty()),
        Some(Err(e)) => Err(e),
        Some(Ok(frame)) => match frame.into_data() {
            Ok(data) => Ok(crate::body::boxed(crate::body::PrefixedBody::new(
                data, body,
            ))),
            // Trailers first: nothing was decoded, so nothing is lost by ending here.
            Err(_) => Ok(crate::body::empty()),
        },
    }
}

pub fn encode(body: GatewayBody, coding: Coding) -> GatewayBody {
    let input = reader(body);
    let read: Pin<Box<dyn AsyncRead + Send>> = match coding {
        Coding::Gzip => Box::pin(GzipEncoder::with_quality(input, Level::Fastest)),
        Coding::Deflate => Box::pin(ZlibEncoder::with_quality(input, Level::Fastest)),
        Coding::Brotli => Box::pin(BrotliEncoder::with_quality(input, Level::Precise(4))),
    };
    into_body(read, u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    fn accept(value: &str) -> Accepted {
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_str(value).unwrap());
        Accepted::from_caller(&headers)
    }

    #[test]
    fn dataverse_is_offered_only_what_the_caller_accepts_and_the_gateway_decodes() {
        assert_eq!(
            Accepted::from_caller(&HeaderMap::new()).header_value(),
            "identity"
        );
        assert_eq!(
            accept("gzip, deflate, br, zstd").header_value(),
            "gzip, deflate, br"
        );
        assert_eq!(accept("zstd").header_value(), "identity");
        assert_eq!(accept("br;q=1.0, gzip;q=0").header_value(), "br");
        assert_eq!(accept("*").header_value(), "gzip, deflate, br");
        assert_eq!(accept("*, br;q=0").header_value(), "gzip, deflate");
        assert_eq!(accept("x-gzip").header_value(), "gzip");
        assert_eq!(accept("identity;q=0, GZIP").header_value(), "gzip");
    }

    #[test]
    fn content_encoding_is_read_once_and_stacked_codings_are_unknown() {
        let of = |v: &str| {
            let mut h = HeaderMap::new();
            for part in v.split('|') {
                h.append(CONTENT_ENCODING, HeaderValue::from_str(part).unwrap());
            }
            BodyCoding::of(&h)
        };
        assert_eq!(BodyCoding::of(&HeaderMap::new()), BodyCoding::Identity);
        assert_eq!(of("gzip"), BodyCoding::Known(Coding::Gzip));
        assert_eq!(of("br"), BodyCoding::Known(Coding::Brotli));
        assert_eq!(of("zstd"), BodyCoding::Unknown);
        assert_eq!(of("gzip, br"), BodyCoding::Unknown);
        assert_eq!(of("gzip|br"), BodyCoding::Unknown);
    }

    async fn collect(body: GatewayBody) -> Result<Vec<u8>, BoxError> {
        Ok(body.collect().await?.to_bytes().to_vec())
    }

    #[tokio::test]
    async fn every_coding_round_trips() {
        let text = b"{\"@odata.context\":\"https://org.crm.dynamics.com/api/data/v9.2/$metadata\"}"
            .repeat(500);
        for coding in Coding::ALL {
            let encoded = collect(encode(body::full(text.clone()), coding))
                .await
                .unwrap();
            assert!(encoded.len() < text.len() / 4, "{coding:?} compresses");
            let decoded = collect(decode(body::full(encoded), coding, u64::MAX))
                .await
                .unwrap();
            assert_eq!(decoded, text, "{coding:?}");
        }
    }

    #[tokio::test]
    async fn a_decompression_bomb_is_stopped_at_the_limit() {
        // 64 MiB of zeros compress to about 64 KiB.
        let bomb = collect(encode(body::full(vec![0u8; 64 << 20]), Coding::Gzip))
            .await
            .unwrap();
        let error = collect(decode(body::full(bomb), Coding::Gzip, 1 << 20))
            .await
            .unwrap_err();
        assert!(error.downcast_ref::<DecodedTooLarge>().is_some(), "{error}");
    }

    #[tokio::test]
    async fn corrupt_input_is_an_error_not_a_short_body() {
        let error = collect(decode(
            body::full(&b"\x1f\x8b\x08\x00garbage"[..]),
            Coding::Gzip,
            u64::MAX,
        ))
        .await;
        assert!(error.is_err());
    }
}
