//! The request, start to finish, as one function that reads like the architecture:
//! path check -> inbound (who is calling?) -> routing (which organisation?) -> access
//! (may it do this?) -> identity (as whom?) -> upstream (forward).
//! Each stage returns a typed value or an error; errors become responses in `error.rs`.
//! The audit facts (caller, environment, impersonation) are recorded into the request's
//! drop-safe accounting by [`Pipeline::handle`] as each stage returns them.

use std::net::SocketAddr;
use std::sync::Arc;

use http::header::HOST;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::Instrument as _;

use crate::access::{AccessPolicy, AccessRequest, BodyAccess, Grant, ImpersonationPolicy};
use crate::audit::{Audit, AuditRecord};
use crate::body::GatewayBody;
use crate::error::GatewayError;
use crate::identity::Impersonation;
use crate::inbound::{Authenticator, Caller};
use crate::method::WebApiMethod;
use crate::metrics::{Metrics, NO_ENVIRONMENT};
use crate::request_target::{request_target, PathError, RequestTarget};
use crate::routing::{Environment, Router};
use crate::telemetry::{self, SPAN_TARGET};
use crate::upstream::batch_parts::BatchRefusal;
use crate::upstream::headers::{X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REQUEST_ID};
use crate::upstream::{ForwardContext, UpstreamError};

/// The three stages and what they share.
pub struct Pipeline {
    pub inbound: Authenticator,
    pub router: Router,
    pub access: AccessPolicy,
    pub metrics: Metrics,
    pub audit: Audit,
    /// `server.public_url`, without trailing slash.
    pub public_url: Option<String>,
    pub trust_forwarded_headers: bool,
    /// The app port serves TLS (`server.tls`): links handed back say `https`.
    pub serves_tls: bool,
}

/// Who the request turned out to be and where it went, for the audit line and metrics.
/// [`Pipeline::handle`] records each fact as soon as a stage returns it, so a caller who
/// hangs up mid-request is still audited with what was known by then.
#[derive(Default)]
struct Facts {
    /// The environment the request was routed to; `None` when refused before routing.
    environment: Option<Arc<Environment>>,
    caller: Option<Caller>,
    caller_key: Option<String>,
    impersonated: Option<Impersonation>,
}

/// What the cheap checks found: where the request goes, and the base for links handed back.
struct Admitted<'a> {
    target: RequestTarget<'a>,
    public_base: String,
}

/// What the access stage granted.
struct Authorized {
    grant: Grant,
    body_access: Option<BodyAccess>,
}

/// The status recorded for a request whose caller hung up before its answer's head
/// (nginx's "client closed request").
const CLIENT_CLOSED_REQUEST: u16 = 499;

/// One request's accounting, written exactly once when it is dropped: after the answer
/// is built, or when the caller hangs up and the handler future is dropped mid-await. So
/// the in-flight gauge, the request metrics and the audit line never miss a request.
struct Accounting {
    pipeline: Arc<Pipeline>,
    started: Instant,
    request_id: HeaderValue,
    peer: SocketAddr,
    method: Method,
    uri: Uri,
    /// Subject of the connection's client certificate (mutual TLS).
    client_certificate: Option<Arc<str>>,
    trace_id: Option<String>,
    facts: Facts,
    /// The answer's status; `None` until it is known.
    status: Option<StatusCode>,
    refusal: Option<GatewayError>,
}

impl Drop for Accounting {
    fn drop(&mut self) {
        let status = self.status.map_or(CLIENT_CLOSED_REQUEST, |s| s.as_u16());
        let elapsed = self.started.elapsed();
        let metrics = &self.pipeline.metrics;
        let environment_label = self
            .facts
            .environment
            .as_ref()
            .map_or(NO_ENVIRONMENT, |e| e.name());
        let method_label = WebApiMethod::label(&self.method);
        metrics.in_flight_requests.dec();
        // Statuses come from Dataverse too: only registered ones (and 499) become labels.
        let mut code = itoa::Buffer::new();
        let status_label = match StatusCode::from_u16(status) {
            Ok(s) if s.canonical_reason().is_some() || status == CLIENT_CLOSED_REQUEST => {
                code.format(status)
            }
            _ => "other",
        };
        metrics
            .requests_total
            .with_label_values(&[environment_label, method_label, status_label])
            .inc();
        metrics
            .request_duration_seconds
            .with_label_values(&[environment_label, method_label])
            .observe(elapsed.as_secs_f64());
        let facts = &self.facts;
        self.pipeline.audit.request(
            &AuditRecord {
                request_id: self.request_id.to_str().unwrap_or("-"),
                peer: self.peer,
                method: &self.method,
                path_and_query: self.uri.path_and_query().map_or("", |p| p.as_str()),
                status,
                duration: elapsed,
                issuer: facts.caller.as_ref().map(|c| &*c.issuer),
                subject: facts.caller.as_ref().map(|c| c.subject()),
                caller: facts.caller_key.as_deref(),
                impersonated: facts.impersonated,
                client_certificate: self.client_certificate.as_deref(),
                trace_id: self.trace_id.as_deref(),
            },
            self.refusal.as_ref(),
        );
    }
}

impl Pipeline {
    /// Handles one request; never fails (errors are answered here).
    pub async fn handle(
        self: Arc<Self>,
        request: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<GatewayBody> {
        self.metrics.in_flight_requests.inc();
        let span = tracing::info_span!(
            target: SPAN_TARGET,
            "request",
            http.request.method = WebApiMethod::label(request.method()),
            http.response.status_code = tracing::field::Empty,
        );
        telemetry::continue_callers_trace(&span, request.headers());
        let mut accounting = Accounting {
            pipeline: self.clone(),
            started: Instant::now(),
            request_id: request_id(request.headers()),
            peer,
            method: request.method().clone(),
            // One copy of the target (a reference count, not a string copy) serves routing,
            // forwarding and the audit line.
            uri: request.uri().clone(),
            client_certificate: request
                .extensions()
                .get::<crate::tls::ClientCertificate>()
                .map(|c| c.0.clone()),
            trace_id: telemetry::trace_id(&span, request.headers()),
            facts: Facts::default(),
            status: None,
            refusal: None,
        };
        let uri = accounting.uri.clone();
        let request_id = accounting.request_id.clone();
        let facts = &mut accounting.facts;
        // The stages in order; each returns what it found, and the facts the audit line
        // needs are recorded here the moment they are known.
        let result = async {
            let admitted = self.admit(&request, &uri)?;
            let caller = &*facts.caller.insert(self.authenticate(&request).await?);
            let deciding = tracing::info_span!(target: SPAN_TARGET, "routing.access");
            let environment =
                deciding.in_scope(|| self.router.route(admitted.target.environment, caller))?;
            facts.environment = Some(environment.clone());
            facts.caller_key = Some(environment.identity.caller_key(caller).to_string());
            let authorized = self
                .authorize(&request, &admitted.target, caller, environment)
                .instrument(deciding)
                .await?;
            let impersonation = *facts.impersonated.insert(
                self.impersonate(&authorized.grant, caller, environment)
                    .await?,
            );
            let ctx = ForwardContext {
                peer,
                request_id: &request_id,
                impersonation: &impersonation,
                grant: &authorized.grant,
                body_access: authorized.body_access.as_ref(),
                public_base: &admitted.public_base,
                path_and_query: admitted.target.path_and_query,
            };
            self.forward(request, environment, ctx).await
        }
        .instrument(span.clone())
        .await;
        let response = match result {
            Ok(response) => response,
            Err(error) => {
                if let GatewayError::Auth(e) = &error {
                    self.metrics
                        .auth_failures_total
                        .with_label_values(&[e.reason()])
                        .inc();
                }
                let response = error.into_response(&request_id);
                accounting.refusal = Some(error);
                response
            }
        };
        accounting.status = Some(response.status());
        span.record("http.response.status_code", response.status().as_u16());
        response
    }

    /// Cheap checks first: a method, path or Host that is never forwarded costs no key
    /// lookup, and no identity lookup at Dataverse.
    fn admit<'u>(
        &self,
        request: &Request<Incoming>,
        uri: &'u Uri,
    ) -> Result<Admitted<'u>, GatewayError> {
        WebApiMethod::from_http(request.method())?;
        // hyper's bound on the head is its read buffer's, which a read can overshoot (a
        // large head arriving in one read into a grown buffer): the parsed head is counted.
        let target_bytes = uri.authority().map_or(0, |a| a.as_str().len())
            + uri.path_and_query().map_or(0, |pq| pq.as_str().len());
        let head_bytes = target_bytes
            + request
                .headers()
                .iter()
                // `: ` and CRLF around each field, as on the wire.
                .map(|(name, value)| name.as_str().len() + value.len() + 4)
                .sum::<usize>();
        if head_bytes > crate::server::MAX_HEAD_BYTES {
            return Err(GatewayError::HeadTooLarge(crate::server::MAX_HEAD_BYTES));
        }
        let target = request_target(uri, self.router.uses_path_prefix())?;
        // Links handed back keep the environment prefix, so apps stay on the same route.
        let mut public_base = self.public_base(request)?;
        if let Some(prefix) = target.environment {
            public_base.push('/');
            public_base.push_str(prefix);
        }
        Ok(Admitted {
            target,
            public_base,
        })
    }

    /// Inbound: who is calling?
    async fn authenticate(&self, request: &Request<Incoming>) -> Result<Caller, GatewayError> {
        Ok(self
            .inbound
            .authenticate(request.headers())
            .instrument(tracing::info_span!(target: SPAN_TARGET, "inbound.validate"))
            .await?)
    }

    /// Access: may this caller do this, there? Counts a refusal by the rule that refused.
    async fn authorize(
        &self,
        request: &Request<Incoming>,
        target: &RequestTarget<'_>,
        caller: &Caller,
        environment: &Environment,
    ) -> Result<Authorized, GatewayError> {
        let stored_query_table = match self.access.reads_stored_queries() {
            true => environment.stored_queries.table_of(target.query).await,
            false => None,
        };
        // Fetched from Dataverse; `None` (and then `access.metadata_file`, if any) until then.
        let metadata = environment.metadata.as_ref().and_then(|m| m.current());
        let access_request = AccessRequest {
            method: request.method(),
            path: target.path,
            query: target.query,
            target: &target.resource,
            metadata: metadata.as_ref(),
            claims: &caller.claims,
            issuer: &caller.issuer,
            tenant: caller.tenant(),
            kind: caller.kind,
            stored_query_table: stored_query_table.as_deref(),
        };
        let grant = self.access.decide(&access_request).inspect_err(|denied| {
            self.metrics
                .access_denied_total
                .with_label_values(&[&denied.rule])
                .inc();
        })?;
        let body_access = self.access.body_access(&access_request, &grant);
        Ok(Authorized { grant, body_access })
    }

    /// Identity: as whom does the request run at Dataverse?
    async fn impersonate(
        &self,
        grant: &Grant,
        caller: &Caller,
        environment: &Environment,
    ) -> Result<Impersonation, GatewayError> {
        Ok(match grant.impersonation {
            ImpersonationPolicy::AppOnly => Impersonation::ApplicationUser,
            ImpersonationPolicy::Required => {
                environment
                    .identity
                    .resolve(caller)
                    .instrument(tracing::info_span!(target: SPAN_TARGET, "identity.resolve"))
                    .await?
            }
        })
    }

    /// Upstream: forwards to the environment's Dataverse.
    async fn forward(
        &self,
        request: Request<Incoming>,
        environment: &Environment,
        ctx: ForwardContext<'_>,
    ) -> Result<Response<GatewayBody>, GatewayError> {
        let response = environment
            .upstream
            .forward(request, ctx)
            .instrument(tracing::info_span!(target: SPAN_TARGET, "upstream"))
            .await;
        // A pair of the body or a `$batch` part refused: counted as a refusal at the line is.
        if let Err(
            UpstreamError::Access(denied)
            | UpstreamError::Batch(BatchRefusal::PartAccess { denied, .. }),
        ) = &response
        {
            self.metrics
                .access_denied_total
                .with_label_values(&[&denied.rule])
                .inc();
        }
        Ok(response?)
    }

    /// The base URL the caller reached the gateway at, for rewriting links: the configured
    /// `public_url`, else `<scheme>://<Host>` with the app port's own scheme (or the
    /// forwarded host and scheme when trusted).
    fn public_base(&self, request: &Request<Incoming>) -> Result<String, GatewayError> {
        if let Some(url) = &self.public_url {
            return Ok(url.clone());
        }
        let headers = request.headers();
        let forwarded = |name| {
            self.trust_forwarded_headers
                .then(|| {
                    headers
                        .get(name)
                        .and_then(|v: &HeaderValue| v.to_str().ok())
                })
                .flatten()
                .and_then(|v| v.split(',').next())
                .map(str::trim)
        };
        let host = forwarded(X_FORWARDED_HOST)
            .or_else(|| headers.get(HOST).and_then(|v| v.to_str().ok()))
            .or_else(|| request.uri().authority().map(|a| a.as_str()))
            .ok_or(PathError::BadHost)?;
        // Only a plain host[:port] may shape the links handed back.
        let authority: http::uri::Authority = host.parse().map_err(|_| PathError::BadHost)?;
        if authority.as_str().contains('@') {
            return Err(PathError::BadHost.into());
        }
        let scheme = match forwarded(X_FORWARDED_PROTO) {
            Some(p) if p.eq_ignore_ascii_case("https") => "https",
            Some(_) => "http",
            None if self.serves_tls => "https",
            None => "http",
        };
        Ok(format!("{scheme}://{authority}"))
    }
}

/// The caller's `x-request-id` when it is short and plain, else a new UUID. A token is
/// no id: kept, it would be logged and echoed.
fn request_id(headers: &HeaderMap) -> HeaderValue {
    headers
        .get(X_REQUEST_ID)
        .filter(|v| {
            let b = v.as_bytes();
            !b.is_empty()
                && b.len() <= 128
                && b.iter()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(c))
                && !crate::audit::holds_jwt(b)
        })
        .cloned()
        .unwrap_or_else(|| {
            // From the thread-local generator: `new_v4` would make a getrandom syscall per request.
            let mut buf = uuid::Uuid::encode_buffer();
            let id = uuid::Builder::from_random_bytes(rand::random())
                .into_uuid()
                .hyphenated()
                .encode_lower(&mut buf);
            HeaderValue::from_str(id).unwrap_or_else(|_| HeaderValue::from_static("-"))
        })
}
