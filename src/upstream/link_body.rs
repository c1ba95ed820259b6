//! A body that passes each chunk through an OData link rewriter as it streams, so links
//! are rewritten without holding the whole body.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::batch_parts::BatchRefusal;
use super::odata_links::{BatchLinkRewriter, JsonLinkRewriter};
use crate::access::AccessDenied;
use crate::body::{BoxError, GatewayBody};

/// Why a request body is refused while it is read: a `$batch` part the gateway will not
/// send, or a pair of the body no access rule grants.
#[derive(Clone, Debug, thiserror::Error)]
pub enum BodyRefusal {
    #[error(transparent)]
    Batch(#[from] BatchRefusal),
    #[error(transparent)]
    Access(#[from] AccessDenied),
}

/// The rewriters a body can be streamed through.
pub enum ChunkRewriter {
    Json(JsonLinkRewriter),
    Batch(BatchLinkRewriter),
}

impl ChunkRewriter {
    /// Feeds the next chunk; rewritten output is appended to `out`. A `$batch` request, and
    /// a body whose pairs are checked, can be refused.
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> Result<(), BodyRefusal> {
        match self {
            Self::Json(r) => {
                r.push(chunk, out);
                match r.refusal() {
                    Some(denied) => Err(denied.clone().into()),
                    None => Ok(()),
                }
            }
            Self::Batch(r) => Ok(r.push(chunk, out)?),
        }
    }

    /// End of body: flushes what is held, and resets for reuse.
    pub fn finish(&mut self, out: &mut Vec<u8>) -> Result<(), BodyRefusal> {
        match self {
            Self::Json(r) => {
                r.finish(out);
                Ok(())
            }
            Self::Batch(r) => Ok(r.finish(out)?),
        }
    }

    /// Rewrites a body already in memory.
    pub(crate) fn rewrite_all(mut self, body: &[u8]) -> Result<Bytes, BodyRefusal> {
        let mut out = Vec::with_capacity(body.len());
        self.push(body, &mut out)?;
        self.finish(&mut out)?;
        Ok(Bytes::from(out))
    }
}

/// `inner`, rewritten chunk by chunk. A refused `$batch` request ends the body with the
/// refusal as its error, so the upstream request is aborted, never completed.
pub(crate) struct LinkRewritingBody {
    inner: GatewayBody,
    rewriter: ChunkRewriter,
    finished: bool,
}

impl LinkRewritingBody {
    pub fn new(inner: GatewayBody, rewriter: ChunkRewriter) -> Self {
        Self {
            inner,
            rewriter,
            finished: false,
        }
    }
}

impl Body for LinkRewritingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => {
                        let mut out = Vec::with_capacity(data.len() + 64);
                        if let Err(e) = this.rewriter.push(&data, &mut out) {
                            this.finished = true;
                            return Poll::Ready(Some(Err(Box::new(e))));
                        }
                        // The rewriter may hold a few bytes back until it can decide.
                        if !out.is_empty() {
                            return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                        }
                    }
                    Err(trailers) => return Poll::Ready(Some(Ok(trailers))),
                },
                Poll::Ready(None) => {
                    this.finished = true;
                    let mut out = Vec::new();
                    if let Err(e) = this.rewriter.finish(&mut out) {
                        return Poll::Ready(Some(Err(Box::new(e))));
                    }
                    if !out.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(Bytes::from(out)))));
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        // Rewriting changes the length, so only a lower bound of zero is known.
        SizeHint::default()
    }
}
