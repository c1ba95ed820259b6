//! A stand-in Azure instance metadata service (IMDS) serving managed identity tokens:
//! `GET /metadata/identity/oauth2/token?api-version=2018-02-01&resource=...` with the
//! header `Metadata: true` required, answered with IMDS's v1-style body (every number a
//! string). Issued tokens go into an [`S2sRegistry`] so a stand-in Dataverse sharing it
//! accepts them. Failures (410 while "updating", 429, 5xx) can be queued for the next
//! requests.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use http::{header, Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use super::idp::{now_secs, EndlessBody, S2sRegistry};
use super::server::{self, full, lock, RespBody, ServerTask};

const TOKEN_PATH: &str = "/metadata/identity/oauth2/token";
/// The client id IMDS reports for the system-assigned identity.
const SYSTEM_ASSIGNED_CLIENT_ID: &str = "5c3e1f0a-0000-4000-8000-5a5a5a5a5a5a";

/// Builder of a stand-in IMDS.
#[derive(Debug, Clone)]
pub struct Imds {
    registry: S2sRegistry,
    user_assigned: Vec<String>,
    lifetime: u64,
}

impl Default for Imds {
    fn default() -> Self {
        Self {
            registry: S2sRegistry::default(),
            user_assigned: Vec::new(),
            lifetime: 3599,
        }
    }
}

impl Imds {
    /// A builder: system-assigned identity only, tokens for 3599 s, its own registry.
    pub fn builder() -> Self {
        Self::default()
    }

    /// The registry issued tokens are recorded in: pass the one the stand-in Dataverse
    /// accepts tokens from (e.g. [`super::IdpHandle::s2s_registry`]).
    pub fn registry(mut self, registry: S2sRegistry) -> Self {
        self.registry = registry;
        self
    }

    /// A user-assigned identity attached to the "VM", requested with `client_id=`.
    pub fn user_assigned(mut self, client_id: &str) -> Self {
        self.user_assigned.push(client_id.to_owned());
        self
    }

    /// `expires_in` of issued tokens, in seconds.
    pub fn token_lifetime(mut self, secs: u64) -> Self {
        self.lifetime = secs;
        self
    }

    /// Starts the IMDS on `127.0.0.1:0`.
    pub async fn start(self) -> std::io::Result<ImdsHandle> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(ImdsState {
            config: self,
            addr,
            base: server::base_url(addr),
            requests: Mutex::new(Vec::new()),
            queued: Mutex::new(VecDeque::new()),
            issued: Mutex::new(Vec::new()),
            endless: AtomicBool::new(false),
            absurd_bytes_served: Arc::new(AtomicU64::new(0)),
        });
        let handler_state = state.clone();
        let server = server::spawn(listener, move |req| {
            let state = handler_state.clone();
            async move { state.handle(req) }
        });
        Ok(ImdsHandle {
            state,
            server: Arc::new(server),
        })
    }
}

/// One request the IMDS received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImdsRequest {
    pub method: String,
    pub path: String,
    /// Query parameters (last value wins).
    pub query: HashMap<String, String>,
    /// The `Metadata` header, if sent.
    pub metadata: Option<String>,
}

struct ImdsState {
    config: Imds,
    addr: SocketAddr,
    base: String,
    requests: Mutex<Vec<ImdsRequest>>,
    /// Statuses to answer the next requests with, in order.
    queued: Mutex<VecDeque<StatusCode>>,
    issued: Mutex<Vec<String>>,
    /// Answer token requests with a body that never ends.
    endless: AtomicBool,
    absurd_bytes_served: Arc<AtomicU64>,
}

/// A running IMDS; stops when the last clone is dropped or on [`ImdsHandle::stop`].
#[derive(Clone)]
pub struct ImdsHandle {
    state: Arc<ImdsState>,
    server: Arc<ServerTask>,
}

impl fmt::Debug for ImdsHandle {
    // Issued tokens stay out of debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImdsHandle")
            .field("url", &self.url())
            .finish_non_exhaustive()
    }
}

impl ImdsHandle {
    /// The token endpoint, `http://127.0.0.1:{port}/metadata/identity/oauth2/token`, to
    /// configure as `managed_identity.endpoint`.
    pub fn url(&self) -> String {
        format!("{}{TOKEN_PATH}", self.state.base)
    }

    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// Every request received so far, in order.
    pub fn requests(&self) -> Vec<ImdsRequest> {
        lock(&self.state.requests).clone()
    }

    /// The next `n` token requests answer `status` (e.g. 410 while IMDS is updated, 429,
    /// 500) with an IMDS-shaped error body, before normal service resumes.
    pub fn set_status_next(&self, n: usize, status: u16) {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut queued = lock(&self.state.queued);
        queued.clear();
        queued.extend(std::iter::repeat_n(status, n));
    }

    /// `true`: token requests are answered 200 with a body that never ends.
    pub fn set_endless(&self, endless: bool) {
        self.state.endless.store(endless, Ordering::SeqCst);
    }

    /// Bytes of endless bodies handed to connections so far.
    pub fn absurd_bytes_served(&self) -> u64 {
        self.state.absurd_bytes_served.load(Ordering::SeqCst)
    }

    /// The tokens issued so far, in order (`mi-<uuid>`).
    pub fn issued_tokens(&self) -> Vec<String> {
        lock(&self.state.issued).clone()
    }

    /// The registry issued tokens are recorded in.
    pub fn s2s_registry(&self) -> S2sRegistry {
        self.state.config.registry.clone()
    }

    /// Stops serving now (clones included).
    pub fn stop(&self) {
        self.server.stop();
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<RespBody> {
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    resp
}

fn imds_error(status: StatusCode, error: &str, description: &str) -> Response<RespBody> {
    json_response(
        status,
        &json!({"error": error, "error_description": description}),
    )
}

impl ImdsState {
    fn handle(&self, req: Request<Incoming>) -> Response<RespBody> {
        let query: HashMap<String, String> = req
            .uri()
            .query()
            .map(|q| {
                url::form_urlencoded::parse(q.as_bytes())
                    .map(|(k, v)| (k.into_owned(), v.into_owned()))
                    .collect()
            })
            .unwrap_or_default();
        let metadata = req
            .headers()
            .get("metadata")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        lock(&self.requests).push(ImdsRequest {
            method: req.method().to_string(),
            path: req.uri().path().to_owned(),
            query: query.clone(),
            metadata: metadata.clone(),
        });
        if req.uri().path() != TOKEN_PATH {
            return imds_error(StatusCode::NOT_FOUND, "not_found", "no such IMDS endpoint");
        }
        if req.method() != Method::GET {
            return imds_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "method not allowed",
            );
        }
        if let Some(status) = lock(&self.queued).pop_front() {
            let description = match status {
                StatusCode::GONE => "IMDS is being updated; retry within 70 seconds",
                StatusCode::TOO_MANY_REQUESTS => "Too many requests",
                StatusCode::NOT_FOUND => "IMDS is starting",
                _ => "An unexpected error occurred",
            };
            return imds_error(status, "temporarily_unavailable", description);
        }
        if self.endless.load(Ordering::SeqCst) {
            return EndlessBody::response(
                "{\"token_type\":\"Bearer\",\"access_token\":\"",
                "mi".into(),
                self.absurd_bytes_served.clone(),
            );
        }
        // IMDS refuses requests without the header, a guard against SSRF.
        if metadata.as_deref() != Some("true") {
            return imds_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Required metadata header not specified",
            );
        }
        if query.get("api-version").is_none_or(String::is_empty) {
            return imds_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Required query variable 'api-version' is missing",
            );
        }
        let Some(resource) = query.get("resource").filter(|r| !r.is_empty()) else {
            return imds_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Required audience variable missing.",
            );
        };
        let client_id = match query.get("client_id") {
            None => SYSTEM_ASSIGNED_CLIENT_ID.to_owned(),
            Some(id) if self.config.user_assigned.contains(id) => id.clone(),
            Some(_) => {
                return imds_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Identity not found",
                )
            }
        };
        let token = format!("mi-{}", uuid::Uuid::new_v4());
        self.config
            .registry
            .issue(&token, &format!("{resource}/.default"));
        lock(&self.issued).push(token.clone());
        let now = now_secs();
        let lifetime = self.config.lifetime;
        json_response(
            StatusCode::OK,
            &json!({
                "access_token": token,
                "client_id": client_id,
                "expires_in": lifetime.to_string(),
                "expires_on": now.saturating_add(lifetime).to_string(),
                "ext_expires_in": lifetime.to_string(),
                "not_before": now.to_string(),
                "resource": resource,
                "token_type": "Bearer",
            }),
        )
    }
}
