//! The local identity provider: an Entra ID (Azure AD v2) look-alike serving OIDC
//! discovery, the JWKS and the OAuth2 client-credentials token endpoint, plus the helpers
//! that mint caller JWTs signed with its current key. It owns key rotation, the failure
//! modes of its token endpoint and the registry of the S2S tokens it has issued.
//!
//! The token endpoint authenticates a client by secret or by client assertion, checking
//! an assertion as Azure AD does: a certificate assertion against the certificates
//! registered for the app (signature, `aud`, `iss`/`sub`, time range, unused `jti`), a
//! federated token (workload identity) against the app's federated credentials and the
//! issuer's registered keys.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Limited};
use hyper::body::Incoming;
use serde_json::{json, Value};
use tokio::net::TcpListener;

use aws_lc_rs::digest;
use aws_lc_rs::signature::{
    UnparsedPublicKey, VerificationAlgorithm, RSA_PKCS1_2048_8192_SHA256, RSA_PSS_2048_8192_SHA256,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use super::keys::{b64url, RsaSigningKey};
use super::server::{self, full, lock, RespBody, ServerTask};

const DEFAULT_AUDIENCE: &str = "api://dynamics-gateway";
const DEFAULT_TENANT_ID: &str = "72f988bf-86f1-41af-91ab-2d7cd011db47";
const DEFAULT_CLIENT_ID: &str = "gateway-client";
const DEFAULT_CLIENT_SECRET: &str = "gateway-secret";
const DEFAULT_S2S_LIFETIME: u64 = 3599;
const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The audience Azure AD requires of a federated token (workload identity).
const FEDERATED_TOKEN_AUDIENCE: &str = "api://AzureADTokenExchange";
/// Token endpoint forms are small; anything bigger is a client bug.
const MAX_FORM_BYTES: usize = 1024 * 1024;

pub(crate) fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Builder of a local identity provider.
#[derive(Clone)]
pub struct Idp {
    audience: String,
    tenant_id: String,
    client_id: String,
    client_secret: String,
    s2s_lifetime: u64,
    expires_in_as_string: bool,
    /// (client id, certificate DER) pairs: certificate credentials of app registrations.
    certificates: Vec<(String, Vec<u8>)>,
    /// Federated identity credentials: (client id, issuer, subject).
    federated: Vec<(String, String, String)>,
    /// Public keys (SPKI DER) that sign each federated issuer's tokens.
    issuer_keys: Vec<(String, Vec<u8>)>,
}

impl fmt::Debug for Idp {
    // The client secret never appears in debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Idp")
            .field("audience", &self.audience)
            .field("tenant_id", &self.tenant_id)
            .field("client_id", &self.client_id)
            .field("s2s_lifetime", &self.s2s_lifetime)
            .field("expires_in_as_string", &self.expires_in_as_string)
            .finish_non_exhaustive()
    }
}

/// How the token endpoint answers, switchable at run time with
/// [`IdpHandle::set_token_endpoint_mode`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum TokenEndpointMode {
    /// Normal client-credentials behaviour.
    #[default]
    Ok,
    /// 500 with an AAD-shaped JSON error.
    ServerError,
    /// 200 with a body that is not JSON.
    InvalidJson,
    /// 200 with a token but no `expires_in`.
    NoExpiresIn,
    /// Never answers (the connection stays open until the client gives up).
    Hang,
    /// 400 `invalid_client` (AADSTS7000215) whatever the credentials.
    InvalidClient,
    /// A real token whose `expires_in`, `ext_expires_in` and `refresh_in` are `u64::MAX`.
    HugeNumbers,
    /// 503 with `Retry-After: 18446744073709551615` (`u64::MAX` seconds).
    HugeRetryAfter,
    /// 200 with a body that never ends (counted in [`IdpHandle::absurd_bytes_served`]).
    Endless,
}

/// What the JWKS endpoint serves, switchable with [`IdpHandle::set_jwks_document`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum JwksDocument {
    /// The published keys.
    #[default]
    Published,
    /// The published keys followed by this many junk keys.
    Padded(usize),
    /// A key set that never ends (counted in [`IdpHandle::absurd_bytes_served`]).
    Endless,
}

/// Most an endless body serves, so a client without a cap finishes (and fails) a test
/// rather than running it out of memory.
pub const ENDLESS_BODY_BYTES: u64 = 256 << 20;

/// A streamed body of `prefix` then `filler` repeated, up to [`ENDLESS_BODY_BYTES`],
/// counting what it hands to the connection.
pub(crate) struct EndlessBody {
    prefix: Option<Bytes>,
    filler: Bytes,
    served: Arc<AtomicU64>,
    left: u64,
}

impl EndlessBody {
    pub(crate) fn response(
        prefix: &'static str,
        filler: String,
        served: Arc<AtomicU64>,
    ) -> Response<RespBody> {
        let body = EndlessBody {
            prefix: Some(Bytes::from_static(prefix.as_bytes())),
            filler: Bytes::from(filler.repeat(64 * 1024 / filler.len().max(1))),
            served,
            left: ENDLESS_BODY_BYTES,
        };
        let mut resp = Response::new(http_body_util::BodyExt::boxed(body));
        resp.headers_mut().insert(
            header::CONTENT_TYPE,
            header::HeaderValue::from_static("application/json"),
        );
        resp
    }
}

impl http_body::Body for EndlessBody {
    type Data = Bytes;
    type Error = super::server::BoxError;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let chunk = match self.prefix.take() {
            Some(prefix) => prefix,
            None if self.left == 0 => return std::task::Poll::Ready(None),
            None => self.filler.clone(),
        };
        let n = chunk.len() as u64;
        self.left = self.left.saturating_sub(n);
        self.served.fetch_add(n, Ordering::SeqCst);
        std::task::Poll::Ready(Some(Ok(http_body::Frame::data(chunk))))
    }
}

/// Which S2S tokens the IdP issued and which were revoked; shared with the stand-in
/// Dataverse so it accepts only real, current tokens.
#[derive(Clone, Default)]
pub struct S2sRegistry(Arc<Mutex<RegistryInner>>);

impl fmt::Debug for S2sRegistry {
    // Issued tokens are bearer credentials: only their number is shown.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S2sRegistry")
            .field("tokens", &lock(&self.0).tokens.len())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct RegistryInner {
    /// token → (scope it was issued for, revoked)
    tokens: HashMap<String, (String, bool)>,
    /// Where a 401 from Dataverse points clients for a token (`authorization_uri`).
    authorization_uri: String,
}

impl S2sRegistry {
    /// Records that `token` was issued for `scope`.
    pub fn issue(&self, token: &str, scope: &str) {
        lock(&self.0)
            .tokens
            .insert(token.to_owned(), (scope.to_owned(), false));
    }

    /// Whether `token` was issued and not revoked.
    pub fn is_valid(&self, token: &str) -> bool {
        matches!(lock(&self.0).tokens.get(token), Some((_, false)))
    }

    /// The scope `token` was issued for.
    pub fn scope_of(&self, token: &str) -> Option<String> {
        lock(&self.0).tokens.get(token).map(|(s, _)| s.clone())
    }

    /// Revokes every token issued so far (tokens issued later are valid).
    pub fn revoke_all(&self) {
        for (_, revoked) in lock(&self.0).tokens.values_mut() {
            *revoked = true;
        }
    }

    /// The `authorization_uri` a resource server should advertise in `WWW-Authenticate`
    /// (Entra's `common` authority for a registry not made by an IdP).
    pub fn authorization_uri(&self) -> String {
        let uri = lock(&self.0).authorization_uri.clone();
        if uri.is_empty() {
            "https://login.microsoftonline.com/common/oauth2/authorize".to_owned()
        } else {
            uri
        }
    }
}

impl Default for Idp {
    fn default() -> Self {
        Self {
            audience: DEFAULT_AUDIENCE.to_owned(),
            tenant_id: DEFAULT_TENANT_ID.to_owned(),
            client_id: DEFAULT_CLIENT_ID.to_owned(),
            client_secret: DEFAULT_CLIENT_SECRET.to_owned(),
            s2s_lifetime: DEFAULT_S2S_LIFETIME,
            expires_in_as_string: false,
            certificates: Vec::new(),
            federated: Vec::new(),
            issuer_keys: Vec::new(),
        }
    }
}

impl Idp {
    /// A builder with the defaults: audience `api://dynamics-gateway`, tenant
    /// `72f988bf-86f1-41af-91ab-2d7cd011db47`, client `gateway-client`/`gateway-secret`,
    /// S2S lifetime 3599 s sent as a number.
    pub fn builder() -> Idp {
        Idp::default()
    }

    /// The `aud` of caller tokens.
    pub fn audience(mut self, aud: &str) -> Self {
        self.audience = aud.to_owned();
        self
    }

    /// The tenant in the issuer, the URLs and the `tid` claim.
    pub fn tenant_id(mut self, tid: &str) -> Self {
        self.tenant_id = tid.to_owned();
        self
    }

    /// The S2S credentials the token endpoint accepts.
    pub fn client(mut self, client_id: &str, client_secret: &str) -> Self {
        self.client_id = client_id.to_owned();
        self.client_secret = client_secret.to_owned();
        self
    }

    /// The `expires_in` (and `ext_expires_in`) the token endpoint sends, in seconds.
    pub fn s2s_token_lifetime(mut self, secs: u64) -> Self {
        self.s2s_lifetime = secs;
        self
    }

    /// Send `"expires_in":"3599"` (a string) as the v1 and managed-identity endpoints do.
    pub fn expires_in_as_string(mut self, yes: bool) -> Self {
        self.expires_in_as_string = yes;
        self
    }

    /// Registers a certificate credential (DER) for `client_id`: the token endpoint then
    /// accepts client assertions from that app signed with the certificate's key, named by
    /// `x5t#S256` or `x5t`. An app may have several (rotation); `client_id` need not be the
    /// secret-holding client of [`Idp::client`].
    pub fn certificate(mut self, client_id: &str, cert_der: &[u8]) -> Self {
        self.certificates
            .push((client_id.to_owned(), cert_der.to_vec()));
        self
    }

    /// Registers a federated identity credential: `client_id` trusts tokens of `issuer`
    /// about `subject` (e.g. `system:serviceaccount:ns:name`) whose audience is
    /// `api://AzureADTokenExchange`. The issuer's signing keys come from
    /// [`Idp::federated_issuer_key`] (Azure AD would fetch them from the issuer's discovery).
    pub fn federated(mut self, client_id: &str, issuer: &str, subject: &str) -> Self {
        self.federated
            .push((client_id.to_owned(), issuer.to_owned(), subject.to_owned()));
        self
    }

    /// A key that signs `issuer`'s tokens (RS256), e.g. the Kubernetes service-account issuer.
    pub fn federated_issuer_key(mut self, issuer: &str, key: &RsaSigningKey) -> Self {
        self.issuer_keys
            .push((issuer.to_owned(), key.public_key_der()));
        self
    }

    /// Starts the IdP on `127.0.0.1:0`.
    pub async fn start(self) -> std::io::Result<IdpHandle> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        self.start_on(listener).await
    }

    /// Starts the IdP on an already bound listener (the demo binds fixed ports).
    pub async fn start_on(self, listener: TcpListener) -> std::io::Result<IdpHandle> {
        let addr = listener.local_addr()?;
        let base = server::base_url(addr);
        let key_serial = AtomicU64::new(1);
        let kid = new_kid(&key_serial);
        // ~150 ms of CPU in debug builds: keep it off the async workers.
        let key = tokio::task::spawn_blocking(move || RsaSigningKey::generate(kid))
            .await
            .map_err(std::io::Error::other)??;
        let key = Arc::new(key);
        let registry = S2sRegistry::default();
        lock(&registry.0).authorization_uri = format!("{base}/{}/oauth2/authorize", self.tenant_id);
        let certificates = Mutex::new(self.certificates.clone());
        let state = Arc::new(IdpState {
            certificates,
            seen_jtis: Mutex::new(HashSet::new()),
            issuer: format!("{base}/{}/v2.0", self.tenant_id),
            base,
            addr,
            config: self,
            keys: Mutex::new(KeySet {
                current: key.clone(),
                published: vec![key],
            }),
            key_serial,
            mode: Mutex::new(TokenEndpointMode::Ok),
            jwks_document: Mutex::new(JwksDocument::Published),
            token_delay: Mutex::new(std::time::Duration::ZERO),
            absurd_bytes_served: Arc::new(AtomicU64::new(0)),
            available: AtomicBool::new(true),
            discovery_requests: AtomicUsize::new(0),
            jwks_requests: AtomicUsize::new(0),
            token_requests: AtomicUsize::new(0),
            issued: Mutex::new(Vec::new()),
            last_form: Mutex::new(None),
            registry,
        });
        let handler_state = state.clone();
        let server = server::spawn(listener, move |req| {
            let state = handler_state.clone();
            async move { state.handle(req).await }
        });
        tracing::debug!(issuer = %state.issuer, "testkit IdP started");
        Ok(IdpHandle {
            state,
            server: Arc::new(server),
        })
    }
}

fn new_kid(serial: &AtomicU64) -> String {
    let n = serial.fetch_add(1, Ordering::Relaxed);
    // Unique across IdPs in one process, so a key of one IdP never shares a kid with another's.
    let tag = uuid::Uuid::new_v4().simple().to_string();
    format!("testkit-{n}-{}", tag.get(..8).unwrap_or(&tag))
}

struct KeySet {
    current: Arc<RsaSigningKey>,
    published: Vec<Arc<RsaSigningKey>>,
}

struct IdpState {
    config: Idp,
    addr: SocketAddr,
    base: String,
    issuer: String,
    keys: Mutex<KeySet>,
    key_serial: AtomicU64,
    mode: Mutex<TokenEndpointMode>,
    jwks_document: Mutex<JwksDocument>,
    /// How long the token endpoint waits before answering.
    token_delay: Mutex<std::time::Duration>,
    /// Bytes of endless bodies handed to connections.
    absurd_bytes_served: Arc<AtomicU64>,
    available: AtomicBool,
    discovery_requests: AtomicUsize,
    jwks_requests: AtomicUsize,
    token_requests: AtomicUsize,
    issued: Mutex<Vec<String>>,
    last_form: Mutex<Option<HashMap<String, String>>>,
    /// Certificate credentials, changeable at run time (rotation tests).
    certificates: Mutex<Vec<(String, Vec<u8>)>>,
    /// `jti`s of the client assertions accepted so far (replays are refused).
    seen_jtis: Mutex<HashSet<String>>,
    registry: S2sRegistry,
}

/// A running IdP. Clones share it; it stops when the last clone is dropped or on
/// [`IdpHandle::stop`].
#[derive(Clone)]
pub struct IdpHandle {
    state: Arc<IdpState>,
    server: Arc<ServerTask>,
}

impl fmt::Debug for IdpHandle {
    // Secrets, issued tokens and keys stay out of debug output.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdpHandle")
            .field("issuer", &self.state.issuer)
            .finish_non_exhaustive()
    }
}

impl IdpHandle {
    /// `http://127.0.0.1:{port}/{tenant_id}/v2.0`
    pub fn issuer(&self) -> String {
        self.state.issuer.clone()
    }

    /// `{issuer}/.well-known/openid-configuration`
    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.state.issuer)
    }

    /// Discovery for multi-tenant apps: `http://127.0.0.1:{port}/common/v2.0/.well-known/openid-configuration`,
    /// whose issuer is the template `http://127.0.0.1:{port}/{tenantid}/v2.0`.
    pub fn common_discovery_url(&self) -> String {
        format!(
            "{}/common/v2.0/.well-known/openid-configuration",
            self.state.base
        )
    }

    /// `http://127.0.0.1:{port}/{tenant_id}/discovery/v2.0/keys`
    pub fn jwks_uri(&self) -> String {
        self.state.jwks_uri(&self.state.config.tenant_id)
    }

    /// `http://127.0.0.1:{port}/{tenant_id}/oauth2/v2.0/token`
    pub fn token_url(&self) -> String {
        format!(
            "{}/{}/oauth2/v2.0/token",
            self.state.base, self.state.config.tenant_id
        )
    }

    /// `http://127.0.0.1:{port}` (the authority host, for `AZURE_AUTHORITY_HOST`-style config).
    pub fn base_url(&self) -> String {
        self.state.base.clone()
    }

    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    pub fn tenant_id(&self) -> String {
        self.state.config.tenant_id.clone()
    }

    pub fn audience(&self) -> String {
        self.state.config.audience.clone()
    }

    pub fn client_id(&self) -> String {
        self.state.config.client_id.clone()
    }

    pub fn client_secret(&self) -> String {
        self.state.config.client_secret.clone()
    }

    /// A valid caller token for `oid`: the claims of [`IdpHandle::claims_for`] signed with
    /// the current key (RS256, `kid` header).
    pub fn token_for(&self, oid: &str) -> String {
        self.sign(self.claims_for(oid))
    }

    /// Signs arbitrary claims with the current key, header
    /// `{"alg":"RS256","typ":"JWT","kid":<current kid>}`.
    pub fn sign(&self, claims: Value) -> String {
        let key = self.current_key();
        let header = json!({"alg": "RS256", "typ": "JWT", "kid": key.kid()});
        key.sign_jwt(&header, &claims)
    }

    /// The default claims of a v2 access token for `oid`: `iss`, `aud`, `tid`, `oid`,
    /// `sub` (derived from oid and audience, as it is per application), `iat` = `nbf` = now,
    /// `exp` = now + 3600, `ver` "2.0", `name`, `preferred_username`, `scp`, `azp`, `uti`.
    pub fn claims_for(&self, oid: &str) -> Value {
        let now = now_secs();
        let cfg = &self.state.config;
        let sub_digest = aws_lc_rs::digest::digest(
            &aws_lc_rs::digest::SHA256,
            format!("{oid}|{}", cfg.audience).as_bytes(),
        );
        let short = oid.get(..8).unwrap_or(oid);
        json!({
            "aud": cfg.audience,
            "iss": self.state.issuer,
            "iat": now,
            "nbf": now,
            "exp": now + 3600,
            "azp": "00000000-0000-0000-0000-00000000ca11",
            "azpacr": "0",
            "name": format!("Test User {short}"),
            "oid": oid,
            "preferred_username": format!("user-{short}@contoso.example"),
            "scp": "user_impersonation",
            "sub": b64url(sub_digest.as_ref()),
            "tid": cfg.tenant_id,
            "uti": b64url(uuid::Uuid::new_v4().as_bytes()),
            "ver": "2.0",
        })
    }

    /// The key tokens are currently signed with.
    pub fn current_key(&self) -> Arc<RsaSigningKey> {
        lock(&self.state.keys).current.clone()
    }

    /// The kids currently published in the JWKS, in publication order.
    pub fn published_kids(&self) -> Vec<String> {
        lock(&self.state.keys)
            .published
            .iter()
            .map(|k| k.kid().to_owned())
            .collect()
    }

    /// Generates a new key, makes it the signing key and publishes it; `keep_old` keeps
    /// the previously published keys in the JWKS too. Returns the new kid.
    ///
    /// If key generation ever fails the old key stays current and its kid is returned
    /// (logged as an error), so callers see no rotation rather than a crash.
    pub fn rotate_key(&self, keep_old: bool) -> String {
        let kid = new_kid(&self.state.key_serial);
        match RsaSigningKey::generate(kid) {
            Ok(key) => {
                let key = Arc::new(key);
                let mut keys = lock(&self.state.keys);
                if !keep_old {
                    keys.published.clear();
                }
                keys.published.push(key.clone());
                keys.current = key;
                keys.current.kid().to_owned()
            }
            Err(e) => {
                tracing::error!(error = %e, "testkit IdP key rotation failed");
                self.current_key().kid().to_owned()
            }
        }
    }

    pub fn set_token_endpoint_mode(&self, mode: TokenEndpointMode) {
        *lock(&self.state.mode) = mode;
    }

    pub fn set_jwks_document(&self, document: JwksDocument) {
        *lock(&self.state.jwks_document) = document;
    }

    /// Delays every token endpoint answer by `d` (a slow first token); zero turns it off.
    pub fn set_token_delay(&self, d: std::time::Duration) {
        *lock(&self.state.token_delay) = d;
    }

    /// Bytes of endless bodies (JWKS or token endpoint) handed to connections so far: a
    /// client that stops reading at its cap keeps this near the cap plus socket buffers.
    pub fn absurd_bytes_served(&self) -> u64 {
        self.state.absurd_bytes_served.load(Ordering::SeqCst)
    }

    /// `false`: every endpoint answers 503 (an outage); `true`: back to normal.
    pub fn set_available(&self, up: bool) {
        self.state.available.store(up, Ordering::SeqCst);
    }

    /// Requests received for a discovery document (tenant or `common`), answered or not.
    pub fn discovery_requests(&self) -> usize {
        self.state.discovery_requests.load(Ordering::SeqCst)
    }

    /// Requests received for the JWKS, answered or not.
    pub fn jwks_requests(&self) -> usize {
        self.state.jwks_requests.load(Ordering::SeqCst)
    }

    /// Requests received by the token endpoint, whatever the outcome.
    pub fn token_requests(&self) -> usize {
        self.state.token_requests.load(Ordering::SeqCst)
    }

    /// The S2S access tokens issued so far, in order (`s2s-<uuid>`).
    pub fn issued_s2s_tokens(&self) -> Vec<String> {
        lock(&self.state.issued).clone()
    }

    /// The form fields of the last token request (secrets included: assert on them, never
    /// log them).
    pub fn last_token_request(&self) -> Option<HashMap<String, String>> {
        lock(&self.state.last_form).clone()
    }

    /// The registry of issued tokens, for [`super::Dataverse::accept_tokens_from`].
    pub fn s2s_registry(&self) -> S2sRegistry {
        self.state.registry.clone()
    }

    /// Registers another certificate for `client_id` while running (an app may have several).
    pub fn add_certificate(&self, client_id: &str, cert_der: &[u8]) {
        lock(&self.state.certificates).push((client_id.to_owned(), cert_der.to_vec()));
    }

    /// Removes every certificate of `client_id` (a revoked or expired credential).
    pub fn remove_certificates(&self, client_id: &str) {
        lock(&self.state.certificates).retain(|(c, _)| c != client_id);
    }

    /// Stops serving now (clones included); open connections are closed.
    pub fn stop(&self) {
        self.server.stop();
    }
}

/// Which IdP endpoint a path names.
enum Endpoint {
    Discovery { tenant: String },
    Jwks { tenant: String },
    Token { tenant: String },
}

fn route(path: &str) -> Option<Endpoint> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        [tenant, "v2.0", ".well-known", "openid-configuration"] => Some(Endpoint::Discovery {
            tenant: (*tenant).to_owned(),
        }),
        [tenant, "discovery", "v2.0", "keys"] => Some(Endpoint::Jwks {
            tenant: (*tenant).to_owned(),
        }),
        [tenant, "oauth2", "v2.0", "token"] => Some(Endpoint::Token {
            tenant: (*tenant).to_owned(),
        }),
        _ => None,
    }
}

fn json_response(status: StatusCode, body: &Value) -> Response<RespBody> {
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json; charset=utf-8"),
    );
    // AAD marks token responses uncacheable; clients must not rely on HTTP caching.
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store, no-cache"),
    );
    resp
}

/// `2024-05-01 12:34:56Z`, the timestamp format of AAD error bodies.
fn aad_timestamp(secs: u64) -> String {
    // RFC 3339 to the second, with a space where RFC 3339 has its `T`, as Azure AD writes
    // it. A claim past year 9999 (a hostile assertion's `exp`) has no such form.
    let mut out = String::new();
    match UNIX_EPOCH.checked_add(Duration::from_secs(secs)) {
        Some(at) if write!(out, "{}", humantime::format_rfc3339_seconds(at)).is_ok() => {
            out.replacen('T', " ", 1)
        }
        _ => format!("{secs} seconds after 1970"),
    }
}

/// An AAD-shaped OAuth2 error body.
fn aad_error(status: StatusCode, error: &str, code: u32, description: &str) -> Response<RespBody> {
    let trace_id = uuid::Uuid::new_v4().to_string();
    let correlation_id = uuid::Uuid::new_v4().to_string();
    let timestamp = aad_timestamp(now_secs());
    json_response(
        status,
        &json!({
            "error": error,
            "error_description": format!(
                "AADSTS{code}: {description} Trace ID: {trace_id} Correlation ID: {correlation_id} Timestamp: {timestamp}"
            ),
            "error_codes": [code],
            "timestamp": timestamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
            "error_uri": format!("https://login.microsoftonline.com/error?code={code}"),
        }),
    )
}

impl IdpState {
    fn jwks_uri(&self, tenant: &str) -> String {
        format!("{}/{tenant}/discovery/v2.0/keys", self.base)
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<RespBody> {
        let endpoint = route(req.uri().path());
        match &endpoint {
            Some(Endpoint::Discovery { .. }) => {
                self.discovery_requests.fetch_add(1, Ordering::SeqCst);
            }
            Some(Endpoint::Jwks { .. }) => {
                self.jwks_requests.fetch_add(1, Ordering::SeqCst);
            }
            Some(Endpoint::Token { .. }) => {
                self.token_requests.fetch_add(1, Ordering::SeqCst);
            }
            None => {}
        }
        tracing::debug!(method = %req.method(), path = %req.uri().path(), "testkit IdP request");
        if !self.available.load(Ordering::SeqCst) {
            return json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &json!({"error": "temporarily_unavailable", "error_description": "testkit IdP outage"}),
            );
        }
        let tenant_ok = |tenant: &str, allow_common: bool| {
            tenant == self.config.tenant_id
                || (allow_common && matches!(tenant, "common" | "organizations"))
        };
        match endpoint {
            Some(Endpoint::Discovery { tenant }) if req.method() == Method::GET => {
                if !tenant_ok(&tenant, true) {
                    return self.unknown_tenant(&tenant);
                }
                json_response(StatusCode::OK, &self.discovery(&tenant))
            }
            Some(Endpoint::Jwks { tenant }) if req.method() == Method::GET => {
                if !tenant_ok(&tenant, true) {
                    return self.unknown_tenant(&tenant);
                }
                let document = lock(&self.jwks_document).clone();
                if document == JwksDocument::Endless {
                    return EndlessBody::response(
                        "{\"keys\":[",
                        "{\"kty\":\"RSA\",\"kid\":\"junk\",\"n\":\"AQAB\",\"e\":\"AQAB\"},".into(),
                        self.absurd_bytes_served.clone(),
                    );
                }
                let mut keys: Vec<Value> = lock(&self.keys)
                    .published
                    .iter()
                    .map(|k| {
                        let mut jwk = k.jwk();
                        jwk["issuer"] = Value::String(self.issuer.clone());
                        jwk
                    })
                    .collect();
                if let JwksDocument::Padded(n) = document {
                    keys.extend((0..n).map(|i| json!({"kty": "RSA", "kid": format!("junk-{i}"), "n": "AQAB", "e": "AQAB"})));
                }
                json_response(StatusCode::OK, &json!({ "keys": keys }))
            }
            Some(Endpoint::Token { tenant }) if req.method() == Method::POST => {
                if !tenant_ok(&tenant, false) {
                    return self.unknown_tenant(&tenant);
                }
                self.token(req, &tenant).await
            }
            Some(_) => json_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "invalid_request", "error_description": "method not allowed"}),
            ),
            None => json_response(
                StatusCode::NOT_FOUND,
                &json!({"error": "not_found", "error_description": "no such testkit IdP endpoint"}),
            ),
        }
    }

    fn unknown_tenant(&self, tenant: &str) -> Response<RespBody> {
        aad_error(
            StatusCode::BAD_REQUEST,
            "invalid_tenant",
            90002,
            &format!("Tenant '{tenant}' not found. Check to make sure you have the correct tenant ID and are signing into the correct cloud."),
        )
    }

    fn discovery(&self, tenant: &str) -> Value {
        let base = &self.base;
        // Multi-tenant documents give the issuer as a template, as Entra's `common` does.
        let issuer = if tenant == self.config.tenant_id {
            self.issuer.clone()
        } else {
            format!("{base}/{{tenantid}}/v2.0")
        };
        json!({
            "token_endpoint": format!("{base}/{tenant}/oauth2/v2.0/token"),
            "token_endpoint_auth_methods_supported": ["client_secret_post", "private_key_jwt", "client_secret_basic"],
            "jwks_uri": self.jwks_uri(tenant),
            "response_modes_supported": ["query", "fragment", "form_post"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "response_types_supported": ["code", "id_token", "code id_token", "id_token token"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "issuer": issuer,
            "request_uri_parameter_supported": false,
            "userinfo_endpoint": format!("{base}/oidc/userinfo"),
            "authorization_endpoint": format!("{base}/{tenant}/oauth2/v2.0/authorize"),
            "device_authorization_endpoint": format!("{base}/{tenant}/oauth2/v2.0/devicecode"),
            "http_logout_supported": true,
            "frontchannel_logout_supported": true,
            "end_session_endpoint": format!("{base}/{tenant}/oauth2/v2.0/logout"),
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "auth_time", "acr", "nonce", "preferred_username", "name", "tid", "ver", "at_hash", "c_hash", "email"],
            "tenant_region_scope": "EU",
            "cloud_instance_name": "microsoftonline.com",
        })
    }

    async fn token(&self, req: Request<Incoming>, tenant: &str) -> Response<RespBody> {
        let body = match Limited::new(req.into_body(), MAX_FORM_BYTES)
            .collect()
            .await
        {
            Ok(collected) => collected.to_bytes(),
            Err(_) => {
                return aad_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    900144,
                    "The request body could not be read.",
                )
            }
        };
        let form = parse_form(&body);
        *lock(&self.last_form) = Some(form.clone());

        let delay = *lock(&self.token_delay);
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        let mode = lock(&self.mode).clone();
        match mode {
            TokenEndpointMode::Ok
            | TokenEndpointMode::NoExpiresIn
            | TokenEndpointMode::HugeNumbers => {}
            TokenEndpointMode::HugeRetryAfter => {
                let mut resp = aad_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "temporarily_unavailable",
                    50001,
                    "The service is temporarily unavailable.",
                );
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, header::HeaderValue::from(u64::MAX));
                return resp;
            }
            TokenEndpointMode::Endless => {
                return EndlessBody::response(
                    "{\"token_type\":\"Bearer\",\"access_token\":\"",
                    "s2s".into(),
                    self.absurd_bytes_served.clone(),
                );
            }
            TokenEndpointMode::ServerError => {
                return aad_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "temporarily_unavailable",
                    50001,
                    "The service is temporarily unavailable.",
                )
            }
            TokenEndpointMode::InvalidJson => {
                let mut resp = json_response(StatusCode::OK, &Value::Null);
                *resp.body_mut() = full("{\"token_type\":\"Bearer\",\"expires_in\":35");
                return resp;
            }
            TokenEndpointMode::Hang => return std::future::pending().await,
            TokenEndpointMode::InvalidClient => {
                return aad_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_client",
                    7000215,
                    &self.invalid_secret_text(),
                )
            }
        }

        let field = |name: &str| form.get(name).map(String::as_str);
        if field("grant_type") != Some("client_credentials") {
            return aad_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                70003,
                "The app requested an unsupported grant type; only client_credentials is served by the testkit.",
            );
        }
        let Some(client_id) = field("client_id") else {
            return aad_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                900144,
                "The request body must contain the following parameter: 'client_id'.",
            );
        };
        if !self.knows_client(client_id) {
            return aad_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                700016,
                &format!("Application with identifier '{client_id}' was not found in the directory '{}'.", self.config.tenant_id),
            );
        }
        let assertion = field("client_assertion").is_some()
            && field("client_assertion_type") == Some(JWT_BEARER_ASSERTION);
        match field("client_secret") {
            Some(_) if assertion => {
                return aad_error(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    90014,
                    "Only one of 'client_assertion' and 'client_secret' may be sent.",
                )
            }
            Some(secret)
                if client_id == self.config.client_id && secret == self.config.client_secret => {}
            Some(_) => {
                return aad_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    7000215,
                    &self.invalid_secret_text(),
                )
            }
            None if assertion => {
                let jwt = field("client_assertion").unwrap_or_default();
                if let Err(refused) = self.verify_assertion(tenant, client_id, jwt) {
                    return aad_error(
                        StatusCode::UNAUTHORIZED,
                        "invalid_client",
                        refused.code,
                        &refused.text,
                    );
                }
            }
            None => {
                return aad_error(
                    StatusCode::UNAUTHORIZED,
                    "invalid_client",
                    7000218,
                    "The request body must contain the following parameter: 'client_assertion' or 'client_secret'.",
                )
            }
        }
        let scope = field("scope").unwrap_or_default();
        if !scope.ends_with("/.default") || scope.split_whitespace().count() != 1 {
            return aad_error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                1002012,
                &format!("The provided value for scope {scope} is not valid. Client credential flows must have a scope value with /.default suffixed to the resource identifier (application ID URI)."),
            );
        }

        let token = format!("s2s-{}", uuid::Uuid::new_v4());
        self.registry.issue(&token, scope);
        lock(&self.issued).push(token.clone());
        let lifetime = self.config.s2s_lifetime;
        let mut body = json!({"token_type": "Bearer", "access_token": token});
        if mode != TokenEndpointMode::NoExpiresIn {
            let value = if self.config.expires_in_as_string {
                Value::String(lifetime.to_string())
            } else {
                Value::from(lifetime)
            };
            body["expires_in"] = value.clone();
            body["ext_expires_in"] = value;
        }
        if mode == TokenEndpointMode::HugeNumbers {
            for key in ["expires_in", "ext_expires_in", "refresh_in"] {
                body[key] = Value::from(u64::MAX);
            }
        }
        json_response(StatusCode::OK, &body)
    }

    fn knows_client(&self, client_id: &str) -> bool {
        client_id == self.config.client_id
            || lock(&self.certificates).iter().any(|(c, _)| c == client_id)
            || self.config.federated.iter().any(|(c, _, _)| c == client_id)
    }

    /// Checks a client assertion as Azure AD does: a certificate assertion (RFC 7523,
    /// header `x5t#S256`/`x5t`) or a federated token (workload identity). The answer on
    /// refusal is the 401 `invalid_client` Azure AD would give.
    fn verify_assertion(&self, tenant: &str, client_id: &str, jwt: &str) -> Result<(), Refusal> {
        let refuse = |code: u32, text: &str| {
            Err(Refusal {
                code,
                text: text.to_owned(),
            })
        };
        let Some(parsed) = ParsedJwt::parse(jwt) else {
            return refuse(50027, "JWT token is invalid or malformed.");
        };
        let thumbprint = parsed
            .header_str("x5t#S256")
            .map(|t| (t, true))
            .or_else(|| parsed.header_str("x5t").map(|t| (t, false)));
        match thumbprint {
            Some((thumbprint, sha256)) => {
                self.verify_certificate_assertion(tenant, client_id, &parsed, thumbprint, sha256)
            }
            None => self.verify_federated_assertion(client_id, &parsed),
        }
    }

    fn verify_certificate_assertion(
        &self,
        tenant: &str,
        client_id: &str,
        jwt: &ParsedJwt,
        thumbprint: &str,
        sha256: bool,
    ) -> Result<(), Refusal> {
        let refuse = |code: u32, text: &str| {
            Err(Refusal {
                code,
                text: text.to_owned(),
            })
        };
        let certificate = lock(&self.certificates)
            .iter()
            .filter(|(c, _)| c == client_id)
            .map(|(_, der)| der.clone())
            .find(|der| {
                let algorithm = if sha256 {
                    &digest::SHA256
                } else {
                    &digest::SHA1_FOR_LEGACY_USE_ONLY
                };
                URL_SAFE_NO_PAD.encode(digest::digest(algorithm, der)) == thumbprint
            });
        let Some(certificate) = certificate else {
            return refuse(
                700027,
                &format!("The certificate with identifier used to sign the client assertion is not registered on application. [Reason - The key was not found., Thumbprint of key used by client: '{thumbprint}', Please visit the Microsoft Entra admin center to upload the key.]"),
            );
        };
        let algorithm: &'static dyn VerificationAlgorithm = match jwt.header_str("alg") {
            Some("PS256") => &RSA_PSS_2048_8192_SHA256,
            Some("RS256") => &RSA_PKCS1_2048_8192_SHA256,
            _ => {
                return refuse(
                    700027,
                    "Client assertion contains an unsupported signing algorithm.",
                )
            }
        };
        // The key is read with x509-parser, not with the gateway's own certificate code,
        // so the two sides of a certificate credential do not share a parsing bug.
        let Ok((_, parsed_certificate)) = x509_parser::parse_x509_certificate(&certificate) else {
            return refuse(700027, "The registered certificate could not be read.");
        };
        if !jwt.verify(algorithm, parsed_certificate.public_key().raw) {
            return refuse(700027, "Client assertion failed signature validation.");
        }
        let expected_aud = format!("{}/{tenant}/oauth2/v2.0/token", self.base);
        if jwt.claim_str("aud") != Some(expected_aud.as_str()) {
            return refuse(
                700023,
                &format!("Client assertion audience claim does not match Realm issuer. Review the documentation at https://learn.microsoft.com/entra/identity-platform/certificate-credentials. Expected '{expected_aud}'."),
            );
        }
        if jwt.claim_str("iss") != Some(client_id) || jwt.claim_str("sub") != Some(client_id) {
            return refuse(
                700021,
                "Client assertion application identifier doesn't match 'client_id' parameter.",
            );
        }
        let now = now_secs();
        let nbf = jwt.claim_u64("nbf").or_else(|| jwt.claim_u64("iat"));
        let exp = jwt.claim_u64("exp");
        let in_range = match (nbf, exp) {
            // Five minutes of clock skew, as Azure AD allows.
            (Some(nbf), Some(exp)) => {
                exp > now && nbf <= now + 300 && exp > nbf && exp - nbf <= 15 * 60
            }
            _ => false,
        };
        if !in_range {
            return refuse(
                700024,
                &format!("Client assertion is not within its valid time range. Current time: {}, assertion valid from {}, expiry time of assertion {}.", aad_timestamp(now), nbf.map(aad_timestamp).unwrap_or_default(), exp.map(aad_timestamp).unwrap_or_default()),
            );
        }
        let Some(jti) = jwt.claim_str("jti").filter(|j| !j.is_empty()) else {
            return refuse(
                50027,
                "JWT token is invalid or malformed: the client assertion has no jti.",
            );
        };
        if !lock(&self.seen_jtis).insert(jti.to_owned()) {
            return refuse(
                50013,
                "Assertion failed validation: the client assertion's jti has already been used (replay).",
            );
        }
        Ok(())
    }

    fn verify_federated_assertion(&self, client_id: &str, jwt: &ParsedJwt) -> Result<(), Refusal> {
        let refuse = |code: u32, text: &str| {
            Err(Refusal {
                code,
                text: text.to_owned(),
            })
        };
        let issuer = jwt.claim_str("iss").unwrap_or_default();
        let subject = jwt.claim_str("sub").unwrap_or_default();
        let audiences: Vec<&str> = match jwt.claims.get("aud") {
            Some(Value::String(a)) => vec![a.as_str()],
            Some(Value::Array(list)) => list.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let registered = self
            .config
            .federated
            .iter()
            .any(|(c, i, s)| c == client_id && i == issuer && s == subject);
        if !registered {
            return refuse(
                70021,
                &format!("No matching federated identity record found for presented assertion. Assertion Issuer: '{issuer}'. Assertion Subject: '{subject}'. Assertion Audience: '{}'.", audiences.join(",")),
            );
        }
        if !audiences.contains(&FEDERATED_TOKEN_AUDIENCE) {
            return refuse(
                700212,
                &format!("No matching federated identity record found for presented assertion audience '{}'.", audiences.join(",")),
            );
        }
        let signed = jwt.header_str("alg") == Some("RS256")
            && self
                .config
                .issuer_keys
                .iter()
                .filter(|(i, _)| i == issuer)
                .any(|(_, spki)| jwt.verify(&RSA_PKCS1_2048_8192_SHA256, spki));
        if !signed {
            return refuse(
                700027,
                "Client assertion failed signature validation: no key of the issuer verifies it.",
            );
        }
        let now = now_secs();
        let exp = jwt.claim_u64("exp").unwrap_or(0);
        let nbf = jwt.claim_u64("nbf").unwrap_or(0);
        if exp <= now || nbf > now + 300 {
            return refuse(
                700024,
                &format!("Client assertion is not within its valid time range. Current time: {}, expiry time of assertion {}.", aad_timestamp(now), aad_timestamp(exp)),
            );
        }
        Ok(())
    }

    fn invalid_secret_text(&self) -> String {
        format!(
            "Invalid client secret provided. Ensure the secret being sent in the request is the client secret value, not the client secret ID, for a secret added to app '{}'.",
            self.config.client_id
        )
    }
}

/// Why a client assertion was refused: the AADSTS code and its text (always a 401
/// `invalid_client`).
struct Refusal {
    code: u32,
    text: String,
}

/// A JWT split into its decoded parts, for the token endpoint's checks.
struct ParsedJwt {
    header: Value,
    claims: Value,
    signing_input: String,
    signature: Vec<u8>,
}

impl ParsedJwt {
    fn parse(jwt: &str) -> Option<Self> {
        let (signing_input, signature) = jwt.rsplit_once('.')?;
        let (header, claims) = signing_input.split_once('.')?;
        let decode = |s: &str| URL_SAFE_NO_PAD.decode(s).ok();
        let json = |s: &str| serde_json::from_slice::<Value>(&decode(s)?).ok();
        Some(Self {
            header: json(header).filter(Value::is_object)?,
            claims: json(claims).filter(Value::is_object)?,
            signing_input: signing_input.to_owned(),
            signature: decode(signature)?,
        })
    }

    fn header_str(&self, name: &str) -> Option<&str> {
        self.header.get(name)?.as_str()
    }

    fn claim_str(&self, name: &str) -> Option<&str> {
        self.claims.get(name)?.as_str()
    }

    fn claim_u64(&self, name: &str) -> Option<u64> {
        self.claims.get(name)?.as_u64()
    }

    /// Verifies the signature with an RSA public key (SubjectPublicKeyInfo DER).
    fn verify(&self, algorithm: &'static dyn VerificationAlgorithm, spki: &[u8]) -> bool {
        UnparsedPublicKey::new(algorithm, spki)
            .verify(self.signing_input.as_bytes(), &self.signature)
            .is_ok()
    }
}

/// `application/x-www-form-urlencoded` body → map (last value wins, as AAD does not
/// accept repeated fields anyway).
fn parse_form(body: &Bytes) -> HashMap<String, String> {
    url::form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_civil() {
        assert_eq!(aad_timestamp(0), "1970-01-01 00:00:00Z");
        assert_eq!(aad_timestamp(951_782_400), "2000-02-29 00:00:00Z");
        assert_eq!(aad_timestamp(1_714_566_896), "2024-05-01 12:34:56Z");
        assert_eq!(
            aad_timestamp(u64::MAX),
            format!("{} seconds after 1970", u64::MAX)
        );
    }

    #[test]
    fn routes() {
        assert!(matches!(
            route("/t/oauth2/v2.0/token"),
            Some(Endpoint::Token { .. })
        ));
        assert!(route("/t/oauth2/token").is_none());
    }
}
