//! Forwarding: builds the request to Dataverse from the caller's (same path and query,
//! headers rewritten, body streamed under the size limit), sends it with the S2S token,
//! retries once with a new token if Dataverse rejects the token and the body can be
//! replayed, and streams the answer back with Dataverse's absolute links pointing at the
//! gateway.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::{Bytes, BytesMut};
use http::header::{CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::headers::{self, X_REQUEST_ID};
use super::link_body::{ChunkRewriter, LinkRewritingBody};
use super::odata_links::{
    BatchDirection, BatchLinkRewriter, JsonKeys, JsonLinkRewriter, LinkRewrite,
};
use super::{DataverseClient, TokenSource, UpstreamError};
use crate::access::Grant;
use crate::body::{self, BodyTimeout, BoxError, GatewayBody, PrefixedBody, TimedBody};
use crate::config::{DynamicsConfig, ServerConfig};
use crate::identity::Impersonation;
use crate::metrics::Metrics;

const ODATA_ENTITY_ID: HeaderName = HeaderName::from_static("odata-entityid");

/// Bodies up to this size are held so a request can be replayed after a token refresh or
/// a throttling wait; larger ones stream and are never retried.
const REPLAYABLE_BODY_BYTES: u64 = 64 * 1024;

/// What a forwarded request needs from the stages before it.
pub struct ForwardContext<'a> {
    pub peer: SocketAddr,
    pub request_id: &'a HeaderValue,
    pub impersonation: &'a Impersonation,
    /// What the access rules granted: which Dataverse control headers may pass.
    pub grant: &'a Grant,
    /// The gateway's base URL as the caller sees it, without trailing slash.
    pub public_base: &'a str,
    /// The validated path and query to request upstream.
    pub path_and_query: &'a str,
}

/// The forwarding stage.
pub struct Forwarder {
    client: DataverseClient,
    tokens: Arc<TokenSource>,
    /// Dataverse's time to answer, from the end of the request body.
    request_timeout: Duration,
    /// Longest pause between request body bytes.
    body_read_timeout: Duration,
    /// Longest a whole request may take, upload and Dataverse's answer together.
    exchange_timeout: Duration,
    max_request_body: u64,
    trust_forwarded: bool,
    /// Longest 429 `Retry-After` waited out for idempotent requests, when enabled.
    retry_throttled: Option<Duration>,
    metrics: Metrics,
    /// The link rewrites for the last public base seen: callers nearly always reach the
    /// gateway by one name, so the pair is built once rather than per request.
    links: ArcSwapOption<LinkPair>,
}

/// Both directions of link rewriting for one public base.
struct LinkPair {
    base: String,
    to_upstream: LinkRewrite,
    to_gateway: LinkRewrite,
}

/// The body of the upstream request, held (replayable) or streaming (sent once).
enum RequestBody {
    Held(Bytes),
    Streaming(GatewayBody),
}

/// Bodies that may carry absolute URLs the gateway rewrites.
#[derive(Clone, Copy, PartialEq, Eq)]
enum LinkBearing {
    Json,
    Batch,
    None,
}

/// Methods whose repetition has no further effect (RFC 9110 9.2.2); only these are retried after a 429.
fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE
    )
}

fn link_bearing(headers: &HeaderMap) -> LinkBearing {
    let Some(ct) = headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()) else {
        return LinkBearing::None;
    };
    let mime = ct.split(';').next().unwrap_or_default().trim();
    if mime.eq_ignore_ascii_case("application/json") {
        LinkBearing::Json
    } else if mime.eq_ignore_ascii_case("multipart/mixed") {
        LinkBearing::Batch
    } else {
        LinkBearing::None
    }
}

fn rewriter(
    kind: LinkBearing,
    rewrite: LinkRewrite,
    direction: BatchDirection,
) -> Option<ChunkRewriter> {
    let keys = match direction {
        BatchDirection::Request => JsonKeys::RequestBinds,
        BatchDirection::Response => JsonKeys::ResponseLinks,
    };
    match kind {
        LinkBearing::Json => Some(ChunkRewriter::Json(JsonLinkRewriter::new(rewrite, keys))),
        LinkBearing::Batch => Some(ChunkRewriter::Batch(BatchLinkRewriter::new(
            rewrite, direction,
        ))),
        LinkBearing::None => None,
    }
}

impl Forwarder {
    pub fn new(
        client: DataverseClient,
        tokens: Arc<TokenSource>,
        server: &ServerConfig,
        dynamics: &DynamicsConfig,
        metrics: Metrics,
    ) -> Self {
        Self {
            client,
            tokens,
            request_timeout: server.request_timeout,
            body_read_timeout: server.body_read_timeout,
            exchange_timeout: server.exchange_timeout,
            max_request_body: server.max_request_body,
            trust_forwarded: server.trust_forwarded_headers,
            retry_throttled: dynamics.retry_throttled,
            metrics,
            links: ArcSwapOption::empty(),
        }
    }

    fn links(&self, public_base: &str) -> Arc<LinkPair> {
        if let Some(pair) = self.links.load_full().filter(|p| p.base == public_base) {
            return pair;
        }
        let pair = Arc::new(LinkPair {
            base: public_base.to_string(),
            to_upstream: LinkRewrite::new(public_base, self.client.origin()),
            to_gateway: LinkRewrite::new(self.client.origin(), public_base),
        });
        self.links.store(Some(pair.clone()));
        pair
    }

    pub fn client(&self) -> &DataverseClient {
        &self.client
    }

    /// Forwards the request and returns Dataverse's answer (errors included, unchanged
    /// apart from links), or why it could not be had.
    pub async fn forward(
        &self,
        request: Request<Incoming>,
        ctx: ForwardContext<'_>,
    ) -> Result<Response<GatewayBody>, UpstreamError> {
        let (parts, incoming) = request.into_parts();
        let deadline = Instant::now() + self.exchange_timeout;
        let (incoming, body_over) = TimedBody::new(
            incoming,
            self.body_read_timeout,
            self.exchange_timeout,
            deadline,
        );
        let mut body_over = Some(body_over);
        let mut token = self.tokens.current()?;
        let uri = self.client.uri(ctx.path_and_query)?;
        let mut headers = parts.headers;
        let links = self.links(ctx.public_base);
        let mut body = self
            .request_body(incoming, &mut headers, links.to_upstream.clone())
            .await?;
        let dropped = headers::prepare_upstream_request(
            &mut headers,
            self.client.host_header(),
            token.authorization(),
            ctx.impersonation,
            ctx.peer,
            self.trust_forwarded,
            ctx.request_id,
        );
        crate::access::strip_control_headers(&mut headers, ctx.grant);
        if dropped > 0 {
            tracing::warn!(request_id = ?ctx.request_id, dropped, "caller sent impersonation headers; stripped");
        }

        let mut retried = false;
        let mut throttled_for = Duration::ZERO;
        let response = loop {
            let (body_now, replay) = match body {
                RequestBody::Held(bytes) => (body::full(bytes.clone()), Some(bytes)),
                RequestBody::Streaming(stream) => (stream, None),
            };
            let mut upstream = Request::new(body_now);
            *upstream.method_mut() = parts.method.clone();
            *upstream.uri_mut() = uri.clone();
            *upstream.version_mut() = Version::HTTP_11;
            // Only a replayable request may need the headers again.
            *upstream.headers_mut() = if replay.is_some() {
                headers.clone()
            } else {
                std::mem::take(&mut headers)
            };
            let response = self
                .send(upstream, &parts.method, body_over.take(), deadline)
                .await?;
            match replay {
                Some(bytes) if response.status() == StatusCode::UNAUTHORIZED && !retried => {
                    retried = true;
                    tracing::info!(request_id = ?ctx.request_id, "Dynamics rejected the S2S token; refreshing and retrying once");
                    token = self.tokens.replace_rejected(&token).await?;
                    headers.insert(http::header::AUTHORIZATION, token.authorization().clone());
                    body = RequestBody::Held(bytes);
                }
                Some(bytes)
                    if response.status() == StatusCode::TOO_MANY_REQUESTS
                        && is_idempotent(&parts.method) =>
                {
                    match self.throttle_wait(&response, throttled_for) {
                        Some(wait) => {
                            tracing::info!(request_id = ?ctx.request_id, wait = ?wait, "Dynamics throttled the request; waiting out Retry-After");
                            throttled_for += wait;
                            tokio::time::sleep(wait).await;
                            body = RequestBody::Held(bytes);
                        }
                        None => break response,
                    }
                }
                _ => break response,
            }
        };
        Ok(self.response(response, &parts.method, &links.to_gateway, ctx))
    }

    /// How long to wait before retrying a 429, if retries are on and the total wait stays
    /// within `retry_throttled.max_wait`; otherwise the 429 goes back to the caller.
    fn throttle_wait<B>(&self, response: &Response<B>, waited: Duration) -> Option<Duration> {
        let max = self.retry_throttled?;
        let wait = headers::retry_after(response.headers())?;
        (waited + wait <= max).then_some(wait)
    }

    /// Sends and waits for the response headers. `body_over` completes when the caller's
    /// body has been read to its end: only from then does `request_timeout` run, so a
    /// long upload is bounded by the body's own clocks, not by Dataverse's time to answer.
    /// Nothing waits past `deadline`.
    async fn send(
        &self,
        request: Request<GatewayBody>,
        method: &Method,
        body_over: Option<oneshot::Receiver<()>>,
        deadline: Instant,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let started = Instant::now();
        let result = self.send_within(request, body_over, deadline).await;
        self.metrics
            .upstream_duration_seconds
            .with_label_values(&[method.as_str()])
            .observe(started.elapsed().as_secs_f64());
        result
    }

    async fn send_within(
        &self,
        request: Request<GatewayBody>,
        body_over: Option<oneshot::Receiver<()>>,
        deadline: Instant,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let send = self.client.send(request);
        tokio::pin!(send);
        if let Some(body_over) = body_over {
            tokio::select! {
                biased;
                result = &mut send => return result.map_err(|e| self.classify(e)),
                _ = body_over => {}
                // Dataverse not reading the body leaves the body's own clocks unpolled.
                () = tokio::time::sleep_until(deadline) => {
                    return Err(UpstreamError::ExchangeDeadline(self.exchange_timeout))
                }
            }
        }
        let answer_by = Instant::now() + self.request_timeout;
        match tokio::time::timeout_at(answer_by.min(deadline), send).await {
            Err(_) if answer_by <= deadline => Err(UpstreamError::Timeout(self.request_timeout)),
            Err(_) => Err(UpstreamError::ExchangeDeadline(self.exchange_timeout)),
            Ok(result) => result.map_err(|e| self.classify(e)),
        }
    }

    /// Tells a failure of the caller's body (too large, too slow, cut off) from a failure
    /// to reach Dataverse. The whole cause chain is searched for the body's own errors
    /// first: the client wraps them in a "user body" error that alone would read as "cut off".
    fn classify(&self, error: hyper_util::client::legacy::Error) -> UpstreamError {
        let chain = || {
            std::iter::successors(Some(&error as &(dyn std::error::Error + 'static)), |e| {
                e.source()
            })
        };
        for e in chain() {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                return UpstreamError::BodyTooLarge {
                    limit: self.max_request_body,
                };
            }
            if let Some(timeout) = e.downcast_ref::<BodyTimeout>() {
                return UpstreamError::BodyTimeout(*timeout);
            }
        }
        let from_caller = chain().any(|e| {
            e.downcast_ref::<hyper::Error>()
                .is_some_and(|h| h.is_user() || h.is_incomplete_message())
        });
        if from_caller {
            UpstreamError::RequestBody(Box::new(error))
        } else {
            UpstreamError::Unreachable(Box::new(error))
        }
    }

    /// Applies the size limit and link rewriting to the caller's body; small bodies are
    /// held so they can be replayed after a token refresh.
    async fn request_body(
        &self,
        incoming: TimedBody<Incoming>,
        headers: &mut HeaderMap,
        to_upstream: LinkRewrite,
    ) -> Result<RequestBody, UpstreamError> {
        let too_large = UpstreamError::BodyTooLarge {
            limit: self.max_request_body,
        };
        let declared = headers
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|len| len > self.max_request_body) {
            return Err(too_large);
        }
        let rewriter = rewriter(link_bearing(headers), to_upstream, BatchDirection::Request);
        // Read up to the replay bound before connecting: a small body (declared or chunked)
        // is then held and replayable, and a chunked body over a small limit is refused
        // before anything is sent.
        let mut incoming = Limited::new(
            incoming,
            usize::try_from(self.max_request_body).unwrap_or(usize::MAX),
        );
        let mut head = BytesMut::new();
        let mut ended = false;
        while head.len() as u64 <= REPLAYABLE_BODY_BYTES {
            match incoming.frame().await {
                None => {
                    ended = true;
                    break;
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        head.extend_from_slice(&data);
                    }
                }
                Some(Err(e)) => {
                    return Err(match e.downcast::<LengthLimitError>() {
                        Ok(_) => too_large,
                        Err(e) => match e.downcast::<BodyTimeout>() {
                            Ok(timeout) => UpstreamError::BodyTimeout(*timeout),
                            Err(e) => UpstreamError::RequestBody(e),
                        },
                    })
                }
            }
        }
        let head = head.freeze();
        if ended {
            let bytes = match rewriter {
                Some(r) if !head.is_empty() => r.rewrite_all(&head),
                _ => head,
            };
            if !bytes.is_empty() || headers.contains_key(CONTENT_LENGTH) {
                headers.remove(http::header::TRANSFER_ENCODING);
                headers.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            }
            return Ok(RequestBody::Held(bytes));
        }
        let rest = body::boxed(PrefixedBody::new(head, body::boxed(incoming)));
        Ok(RequestBody::Streaming(match rewriter {
            Some(r) => {
                // The rewritten length is unknown until the end: send it chunked.
                headers.remove(CONTENT_LENGTH);
                body::boxed(LinkRewritingBody::new(rest, r))
            }
            None => rest,
        }))
    }

    /// Dataverse's response for the caller: hop-by-hop headers dropped, absolute links
    /// pointed at the gateway, body streamed.
    fn response(
        &self,
        response: Response<Incoming>,
        method: &Method,
        to_gateway: &LinkRewrite,
        ctx: ForwardContext<'_>,
    ) -> Response<GatewayBody> {
        let (mut parts, incoming) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        for name in [LOCATION, ODATA_ENTITY_ID] {
            let rewritten = parts
                .headers
                .get(&name)
                .and_then(|v| to_gateway.header_value(v.as_bytes()))
                .and_then(|v| HeaderValue::from_bytes(&v).ok());
            if let Some(v) = rewritten {
                parts.headers.insert(name, v);
            }
        }
        parts.headers.insert(X_REQUEST_ID, ctx.request_id.clone());
        let has_body = *method != Method::HEAD
            && parts.status != StatusCode::NO_CONTENT
            && parts.status != StatusCode::NOT_MODIFIED;
        let incoming: GatewayBody = body::boxed(incoming.map_err(|e| -> BoxError { Box::new(e) }));
        let body = match rewriter(
            link_bearing(&parts.headers),
            to_gateway.clone(),
            BatchDirection::Response,
        ) {
            Some(r) if has_body => {
                parts.headers.remove(CONTENT_LENGTH);
                body::boxed(LinkRewritingBody::new(incoming, r))
            }
            _ => incoming,
        };
        Response::from_parts(parts, body)
    }
}
