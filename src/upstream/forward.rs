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
use http::header::{ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE, LOCATION};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, LengthLimitError, Limited};
use hyper::body::Incoming;
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::Instrument as _;

use super::batch_parts::{multipart_mixed_boundary, BatchRefusal, PartRules};
use super::budget::{self, BucketKey, Gate, Permit};
use super::call::DataverseCall;
use super::encoding::{self, Accepted, BodyCoding};
use super::headers::{self, X_REQUEST_ID};
use super::link_body::{BodyRefusal, ChunkRewriter, LinkRewritingBody};
use super::odata_links::{BatchLinkRewriter, JsonKeys, JsonLinkRewriter, LinkRewrite};
use super::{DataverseClient, TokenSource, UpstreamError};
use crate::access::{BodyAccess, Grant};
use crate::body::{
    self, BodyClocks, BodyTimeout, GatewayBody, MinBodyRate, PrefixedBody, TimedBody,
    WithoutTrailers,
};
use crate::config::{DynamicsConfig, EnvironmentConfig, ServerConfig};
use crate::identity::Impersonation;
use crate::metrics::Metrics;
use crate::telemetry::{self, SPAN_TARGET};

const ODATA_ENTITY_ID: HeaderName = HeaderName::from_static("odata-entityid");
/// Most retries of one request after 429s (`retry_throttled`).
const MAX_THROTTLE_RETRIES: u32 = 3;
/// Shortest wait before such a retry, whatever `Retry-After` says.
const MIN_THROTTLE_WAIT: Duration = Duration::from_secs(1);

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
    /// What the body's pairs and `$batch` parts are checked against, when it has them.
    pub body_access: Option<&'a BodyAccess>,
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
    /// Slowest a request body may arrive.
    min_body_rate: Option<MinBodyRate>,
    /// Longest a whole request may take, upload and Dataverse's answer together.
    exchange_timeout: Duration,
    max_request_body: u64,
    max_decoded_response_body: u64,
    /// Most bytes of one `$batch` part held to fix its Content-Length.
    max_batch_part: usize,
    trust_forwarded: bool,
    /// Longest 429 `Retry-After` waited out for idempotent requests, when enabled.
    retry_throttled: Option<Duration>,
    /// This environment's service-protection budget: every send waits on it.
    budget: Gate,
    metrics: Metrics,
    /// This environment's name (from config): the `environment` label of its metrics.
    environment: String,
    /// The organisation's other origins (`url_aliases`): links naming them are rewritten too.
    url_aliases: Vec<String>,
    /// `forward_cookies`: the caller's `Cookie` and Dataverse's `Set-Cookie` pass.
    forward_cookies: bool,
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

/// [`link_bearing`] of a request: a body the access rules read is read as JSON whatever
/// its declared type, as Dataverse reads it.
fn request_link_bearing(headers: &HeaderMap, access: Option<&BodyAccess>) -> LinkBearing {
    match link_bearing(headers) {
        LinkBearing::None if access.is_some_and(BodyAccess::reads_json) => LinkBearing::Json,
        kind => kind,
    }
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

fn response_rewriter(kind: LinkBearing, rewrite: LinkRewrite) -> Option<ChunkRewriter> {
    match kind {
        LinkBearing::Json => Some(ChunkRewriter::Json(JsonLinkRewriter::new(
            rewrite,
            JsonKeys::ResponseLinks,
        ))),
        LinkBearing::Batch => Some(ChunkRewriter::Batch(BatchLinkRewriter::response(rewrite))),
        LinkBearing::None => None,
    }
}

/// The request body's rewriter. A `$batch` (a multipart/mixed body, or any body sent to
/// `$batch`) must be one the part checks can read: multipart/mixed with one boundary and
/// not compressed, or it is refused.
fn request_rewriter(
    headers: &HeaderMap,
    path_and_query: &str,
    rewrite: LinkRewrite,
    grant: &Grant,
    access: Option<&BodyAccess>,
    max_batch_part: usize,
    url_aliases: &[String],
) -> Result<Option<ChunkRewriter>, BatchRefusal> {
    let path = path_and_query.split('?').next().unwrap_or_default();
    let batch_path = path
        .rsplit('/')
        .next()
        .is_some_and(|last| last.eq_ignore_ascii_case("$batch"));
    let kind = request_link_bearing(headers, access);
    if kind != LinkBearing::Batch && !batch_path {
        if kind != LinkBearing::Json {
            return Ok(None);
        }
        return Ok(Some(ChunkRewriter::Json(
            match access.and_then(BodyAccess::inspector) {
                Some(inspector) => JsonLinkRewriter::inspected(rewrite, inspector),
                None => JsonLinkRewriter::new(rewrite, JsonKeys::RequestBinds),
            },
        )));
    }
    let encoded = headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .any(|v| !v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"identity"));
    let boundary = match headers.get_all(CONTENT_TYPE).iter().collect::<Vec<_>>()[..] {
        [one] => multipart_mixed_boundary(one.as_bytes()),
        _ => None,
    };
    match boundary {
        Some(boundary) if !encoded => Ok(Some(ChunkRewriter::Batch(BatchLinkRewriter::request(
            rewrite,
            PartRules::new(grant.clone(), boundary, max_batch_part)
                .with_access(access.and_then(BodyAccess::batch))
                .with_aliases(url_aliases),
        )))),
        _ => Err(BatchRefusal::NotMultipart),
    }
}

/// The caller's body as the rewriters must read it: a compressed body with links (JSON,
/// `$batch`) is decoded and goes on as identity; the size limit then applies to the
/// decoded bytes, so a small bomb cannot grow past it. Other bodies pass as sent.
fn decoded_request(
    incoming: TimedBody<Incoming>,
    headers: &mut HeaderMap,
    access: Option<&BodyAccess>,
) -> Result<GatewayBody, UpstreamError> {
    let body = body::boxed(incoming);
    if request_link_bearing(headers, access) == LinkBearing::None {
        return Ok(body);
    }
    match BodyCoding::of(headers) {
        BodyCoding::Identity => Ok(body),
        BodyCoding::Known(coding) => {
            headers.remove(CONTENT_ENCODING);
            headers.remove(CONTENT_LENGTH);
            Ok(encoding::decode(body, coding, u64::MAX))
        }
        BodyCoding::Unknown => Err(UpstreamError::UnsupportedEncoding),
    }
}

impl Forwarder {
    pub fn new(
        client: DataverseClient,
        tokens: Arc<TokenSource>,
        server: &ServerConfig,
        dynamics: &DynamicsConfig,
        environment: &EnvironmentConfig,
        budget: Gate,
        metrics: Metrics,
    ) -> Self {
        Self {
            client,
            tokens,
            request_timeout: server.request_timeout,
            body_read_timeout: server.body_read_timeout,
            min_body_rate: server.min_body_rate,
            exchange_timeout: server.exchange_timeout,
            max_request_body: server.max_request_body,
            max_decoded_response_body: server.max_decoded_response_body,
            max_batch_part: usize::try_from(server.max_batch_part).unwrap_or(usize::MAX),
            trust_forwarded: server.trust_forwarded_headers,
            retry_throttled: dynamics.retry_throttled,
            budget,
            metrics,
            environment: environment.name.clone(),
            url_aliases: environment.url_aliases.clone(),
            forward_cookies: environment.forward_cookies,
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
            to_gateway: LinkRewrite::with_aliases(
                self.client.origin(),
                &self.url_aliases,
                public_base,
            ),
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
        // Before anything is read or sent: a refused control header ends the request here.
        crate::access::check_control_headers(&parts.headers, ctx.grant)?;
        let deadline = Instant::now() + self.exchange_timeout;
        let (incoming, body_over) = TimedBody::new(
            incoming,
            BodyClocks {
                idle: self.body_read_timeout,
                min_rate: self.min_body_rate,
                exchange_timeout: self.exchange_timeout,
                deadline,
            },
        );
        let mut body_over = Some(body_over);
        let mut token = self
            .tokens
            .current_or_first(deadline)
            .instrument(tracing::info_span!(target: SPAN_TARGET, "s2s_token"))
            .await?;
        let uri = self.client.uri(ctx.path_and_query)?;
        let mut headers = parts.headers;
        let links = self.links(ctx.public_base);
        let accepted = Accepted::from_caller(&headers);
        let incoming = decoded_request(incoming, &mut headers, ctx.body_access)?;
        let rewriter = request_rewriter(
            &headers,
            ctx.path_and_query,
            links.to_upstream.clone(),
            ctx.grant,
            ctx.body_access,
            self.max_batch_part,
            &self.url_aliases,
        )?;
        let mut body = self.request_body(incoming, &mut headers, rewriter).await?;
        let dropped = headers::prepare_upstream_request(
            &mut headers,
            token.authorization(),
            ctx.impersonation,
            ctx.peer,
            self.trust_forwarded,
            ctx.request_id,
        );
        if !self.forward_cookies {
            headers::strip_cookies(&mut headers);
        }
        headers.insert(ACCEPT_ENCODING, accepted.header_value());
        if dropped > 0 {
            tracing::warn!(request_id = ?ctx.request_id, dropped, "caller sent impersonation headers; stripped");
        }

        let mut retried = false;
        let mut throttled_for = Duration::ZERO;
        let mut throttle_retries = 0;
        let bucket = self.budget.bucket_for(ctx.impersonation);
        let (response, permit) = loop {
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
            let (response, permit) = self
                .send(upstream, &parts.method, bucket, body_over.take(), deadline)
                .await?;
            match replay {
                Some(bytes) if response.status() == StatusCode::UNAUTHORIZED && !retried => {
                    retried = true;
                    // `None`: replaced moments ago by another 401; this one is passed on.
                    let Some(replacement) = self.tokens.replace_rejected(&token).await? else {
                        break (response, permit);
                    };
                    tracing::info!(request_id = ?ctx.request_id, "Dynamics rejected the S2S token; retrying once with a replacement");
                    token = replacement;
                    headers.insert(http::header::AUTHORIZATION, token.authorization().clone());
                    body = RequestBody::Held(bytes);
                }
                Some(bytes)
                    if response.status() == StatusCode::TOO_MANY_REQUESTS
                        && is_idempotent(&parts.method) =>
                {
                    match self.throttle_wait(&response, throttled_for, throttle_retries) {
                        Some(wait) => {
                            tracing::info!(request_id = ?ctx.request_id, wait = ?wait, "Dynamics throttled the request; waiting out Retry-After");
                            throttled_for += wait;
                            throttle_retries += 1;
                            // The slot goes back while waiting; the retry queues for one again.
                            drop(permit);
                            self.budget.wait_open(bucket, wait).await;
                            body = RequestBody::Held(bytes);
                        }
                        None => break (response, permit),
                    }
                }
                _ => break (response, permit),
            }
        };
        let (response, decoded) =
            self.response(response, &parts.method, &links.to_gateway, accepted, ctx)?;
        let response = if decoded {
            // A body that does not decode from its first bytes is a 502 now, not a 200 whose
            // body breaks off.
            let (parts, body) = response.into_parts();
            let body = encoding::decodes_at_start(body)
                .await
                .map_err(|_| UpstreamError::UndecodableResponse)?;
            Response::from_parts(parts, body)
        } else {
            response
        };
        Ok(response.map(|b| budget::hold_until_end(b, permit)))
    }

    /// How long to wait before retrying a 429, if retries are on, fewer than
    /// [`MAX_THROTTLE_RETRIES`] were made and the total wait stays within
    /// `retry_throttled.max_wait`; otherwise the 429 goes back to the caller. A wait is at
    /// least [`MIN_THROTTLE_WAIT`]: `Retry-After: 0` must not become a retry loop.
    fn throttle_wait<B>(
        &self,
        response: &Response<B>,
        waited: Duration,
        retries: u32,
    ) -> Option<Duration> {
        let max = self.retry_throttled?;
        if retries >= MAX_THROTTLE_RETRIES {
            return None;
        }
        let wait = headers::retry_after(response.headers())?.max(MIN_THROTTLE_WAIT);
        (waited.saturating_add(wait) <= max).then_some(wait)
    }

    /// Sends once a budget slot is free and waits for the response headers; the slot is
    /// held until the caller drops the permit. `body_over` completes when the caller's
    /// body has been read to its end: only from then does `request_timeout` run, so a
    /// long upload is bounded by the body's own clocks, not by Dataverse's time to answer.
    /// Nothing waits past `deadline`.
    async fn send(
        &self,
        request: Request<GatewayBody>,
        method: &Method,
        bucket: BucketKey,
        body_over: Option<oneshot::Receiver<()>>,
        deadline: Instant,
    ) -> Result<(Response<GatewayBody>, Permit), UpstreamError> {
        let permit = self
            .budget
            .acquire(bucket)
            .instrument(tracing::info_span!(target: SPAN_TARGET, "budget.wait"))
            .await?;
        let started = Instant::now();
        let call = tracing::info_span!(
            target: SPAN_TARGET,
            "dataverse.call",
            http.request.method = method.as_str(),
        );
        let mut request = request;
        call.in_scope(|| telemetry::hand_on(request.headers_mut()));
        let in_flight = DataverseCall::new(self.client.send(request), permit, deadline);
        let result = self
            .send_within(in_flight, body_over, deadline)
            .instrument(call)
            .await;
        self.metrics
            .upstream_duration_seconds
            .with_label_values(&[&self.environment, method.as_str()])
            .observe(started.elapsed().as_secs_f64());
        let (response, permit) = result?;
        let (response, code) = budget::read_throttle_code(response).await;
        let closed = self.budget.observe(
            bucket,
            response.status(),
            response.headers(),
            code.as_deref(),
        );
        if let Some(closed) = closed {
            // Before the 429 goes back: a caller who then asks another replica finds it closed.
            self.budget.share_closed(bucket, closed).await;
        }
        Ok((response, permit))
    }

    async fn send_within(
        &self,
        mut call: DataverseCall,
        body_over: Option<oneshot::Receiver<()>>,
        deadline: Instant,
    ) -> Result<(Response<Incoming>, Permit), UpstreamError> {
        if let Some(body_over) = body_over {
            tokio::select! {
                biased;
                result = &mut call => return result.map_err(|e| self.classify(e)),
                _ = body_over => {}
                // Dataverse not reading the body leaves the body's own clocks unpolled.
                () = tokio::time::sleep_until(deadline) => {
                    call.abandon();
                    return Err(UpstreamError::ExchangeDeadline(self.exchange_timeout));
                }
            }
        }
        let answer_by = Instant::now() + self.request_timeout;
        match tokio::time::timeout_at(answer_by.min(deadline), &mut call).await {
            Ok(result) => result.map_err(|e| self.classify(e)),
            Err(_) => {
                call.abandon();
                Err(if answer_by <= deadline {
                    UpstreamError::Timeout(self.request_timeout)
                } else {
                    UpstreamError::ExchangeDeadline(self.exchange_timeout)
                })
            }
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
            // A part or pair refused after the request started: the body was aborted
            // unfinished.
            if let Some(refusal) = e.downcast_ref::<BodyRefusal>() {
                return refusal.clone().into();
            }
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
    /// held so they can be replayed after a token refresh. What is read before connecting
    /// (up to the replay bound) is rewritten, and `$batch` parts in it checked, before
    /// anything is sent.
    async fn request_body(
        &self,
        incoming: GatewayBody,
        headers: &mut HeaderMap,
        rewriter: Option<ChunkRewriter>,
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
                Some(r) if !head.is_empty() => r.rewrite_all(&head)?,
                Some(ChunkRewriter::Batch(_)) => return Err(BatchRefusal::NotMultipart.into()),
                _ => head,
            };
            if !bytes.is_empty() || headers.contains_key(CONTENT_LENGTH) {
                headers.remove(http::header::TRANSFER_ENCODING);
                headers.insert(CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            }
            return Ok(RequestBody::Held(bytes));
        }
        Ok(RequestBody::Streaming(match rewriter {
            Some(mut r) => {
                let mut rewritten = Vec::with_capacity(head.len());
                r.push(&head, &mut rewritten)?;
                // The rewritten length is unknown until the end: send it chunked.
                headers.remove(CONTENT_LENGTH);
                let rest = body::boxed(LinkRewritingBody::new(
                    body::boxed(WithoutTrailers(incoming)),
                    r,
                ));
                body::boxed(PrefixedBody::new(Bytes::from(rewritten), rest))
            }
            None => body::boxed(PrefixedBody::new(
                head,
                body::boxed(WithoutTrailers(incoming)),
            )),
        }))
    }

    /// Dataverse's response for the caller: hop-by-hop headers dropped, absolute links
    /// pointed at the gateway (in compressed bodies too), body streamed, in a coding the
    /// caller accepts.
    fn response(
        &self,
        response: Response<GatewayBody>,
        method: &Method,
        to_gateway: &LinkRewrite,
        accepted: Accepted,
        ctx: ForwardContext<'_>,
    ) -> Result<(Response<GatewayBody>, bool), UpstreamError> {
        let (mut parts, incoming) = response.into_parts();
        headers::strip_hop_by_hop(&mut parts.headers);
        if !self.forward_cookies {
            headers::strip_set_cookies(&mut parts.headers);
        }
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
        let coding = BodyCoding::of(&parts.headers);
        // Dataverse was offered only codings the caller accepts; one that answers in another
        // anyway is decoded for the caller rather than passed on unreadable.
        let unaccepted = matches!(coding, BodyCoding::Known(c) if !accepted.contains(c));
        let mut decoded = false;
        let body = match response_rewriter(link_bearing(&parts.headers), to_gateway.clone()) {
            Some(r) if has_body => {
                parts.headers.remove(CONTENT_LENGTH);
                match coding {
                    BodyCoding::Identity => body::boxed(LinkRewritingBody::new(incoming, r)),
                    BodyCoding::Known(coding) => {
                        decoded = true;
                        let plain =
                            encoding::decode(incoming, coding, self.max_decoded_response_body);
                        let rewritten = body::boxed(LinkRewritingBody::new(plain, r));
                        if unaccepted {
                            parts.headers.remove(CONTENT_ENCODING);
                            rewritten
                        } else {
                            encoding::encode(rewritten, coding)
                        }
                    }
                    BodyCoding::Unknown => return Err(UpstreamError::UndecodableResponse),
                }
            }
            // Not rewritten: streamed through decoding only, so no size bound applies.
            _ if has_body && unaccepted => {
                parts.headers.remove(CONTENT_LENGTH);
                parts.headers.remove(CONTENT_ENCODING);
                match coding {
                    BodyCoding::Known(coding) => {
                        decoded = true;
                        encoding::decode(incoming, coding, u64::MAX)
                    }
                    _ => incoming,
                }
            }
            _ => incoming,
        };
        if !matches!(coding, BodyCoding::Identity) {
            // What the caller gets depends on its Accept-Encoding: caches must key on it.
            parts.headers.append(
                http::header::VARY,
                HeaderValue::from_static("accept-encoding"),
            );
        }
        Ok((Response::from_parts(parts, body), decoded))
    }
}
