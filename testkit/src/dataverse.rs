//! The stand-in Dataverse Web API: bearer checks against the IdP's issued S2S tokens,
//! impersonation (`CallerObjectId` / `MSCRMCallerID`), `WhoAmI`, `systemusers` lookups,
//! an in-memory `accounts`/`contacts` store with ETags and opaque paging, `$batch` with
//! change sets, `$metadata` with an ETag (`dataverse/metadata.rs`), and test-only
//! streaming routes (`echo`, `download`, `headers`). Every request but `$metadata` is
//! recorded before it is answered so tests can assert what the gateway sent.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use aws_lc_rs::digest;
use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;

mod file_columns;
mod metadata;

pub use metadata::{MetadataAnswers, CSDL_FIXTURE};

use super::idp::S2sRegistry;
use super::odata_filter::{self, is_guid_text, PropType};
use super::server::{self, full, lock, BoxError, RespBody, ServerTask};

/// The application user every un-impersonated request runs as (`WhoAmI` without headers).
pub const APPLICATION_USER_ID: &str = "5f2c1a9e-8b3d-4e6f-9a71-2c4d6e8f0a1b";
/// Object id of the application user's service principal (its `azureactivedirectoryobjectid`).
pub const APPLICATION_USER_OBJECT_ID: &str = "0b7e4d2c-6a19-4f35-8c2e-7d1a9b3c5e60";
/// The organisation's root business unit.
pub const BUSINESS_UNIT_ID: &str = "1d3f5b7a-9c2e-4a6b-8d0f-2e4a6c8e0b13";
/// The organisation id `WhoAmI` reports.
pub const ORGANIZATION_ID: &str = "7a9c1e3b-5d2f-4b8a-a6c4-0e2b4d6f8a97";

/// Bytes of each request body kept in [`RecordedRequest::body`].
pub const RECORDED_BODY_LIMIT: usize = 64 * 1024;
/// Largest body a buffering route (entity writes, `$batch`) accepts, as Dataverse's 128 MB.
const MAX_BUFFERED_BODY: usize = 128 * 1024 * 1024;
/// Chunk size of the `download` stream.
const DOWNLOAD_CHUNK: usize = 64 * 1024;
const JSON_CONTENT_TYPE: &str = "application/json; odata.metadata=minimal; odata.streaming=true; IEEE754Compatible=false; charset=utf-8";
const DEFAULT_PAGE_SIZE: usize = 5000;
const API_VERSIONS: [&str; 3] = ["v9.0", "v9.1", "v9.2"];

/// A `systemuser` of the organisation, as the impersonation headers and lookups see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryUser {
    pub systemuserid: String,
    pub aad_object_id: String,
    pub internalemailaddress: String,
    pub domainname: String,
    pub disabled: bool,
}

impl DirectoryUser {
    /// An enabled user with a fresh `systemuserid`; `email` is both its
    /// `internalemailaddress` and its `domainname` (the UPN), as in Entra-synced orgs.
    pub fn new(aad_object_id: &str, email: &str) -> Self {
        Self {
            systemuserid: uuid::Uuid::new_v4().to_string(),
            aad_object_id: aad_object_id.to_owned(),
            internalemailaddress: email.to_owned(),
            domainname: email.to_owned(),
            disabled: false,
        }
    }

    /// Marks the user disabled (impersonating it then fails with 403).
    pub fn disabled(mut self, yes: bool) -> Self {
        self.disabled = yes;
        self
    }
}

/// One HTTP request as the stand-in received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    /// The HTTP version it arrived in.
    pub version: http::Version,
    pub method: Method,
    /// Exactly as received on the request line, byte for byte.
    pub path_and_query: String,
    pub headers: HeaderMap,
    /// The first [`RECORDED_BODY_LIMIT`] bytes of the body.
    pub body: Bytes,
    /// Length of the whole body.
    pub body_len: u64,
    /// Lowercase hex SHA-256 of the whole body (empty until the body has been read).
    pub body_sha256: String,
    /// Trailers that followed the body (recorded for bodies the stand-in reads whole).
    pub trailers: HeaderMap,
}

impl RecordedRequest {
    /// The first value of header `name` as text, if present and visible ASCII.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The recorded body head as (lossy) UTF-8, for assertions on JSON and `$batch` bodies.
    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Builder of a stand-in Dataverse.
#[derive(Clone, Debug)]
pub struct Dataverse {
    registry: Option<S2sRegistry>,
    users: Vec<DirectoryUser>,
    group_team_members: Vec<DirectoryUser>,
    record: bool,
    throttling: Throttling,
}

/// Dataverse's service protection, as far as the stand-in plays it; all off by default.
#[derive(Clone, Debug, Default)]
pub struct Throttling {
    /// More requests than this at once are answered 429 `0x80072326`.
    pub max_concurrent: Option<usize>,
    /// More than `.0` requests within `.1` are answered 429 `0x80072322`.
    pub max_requests: Option<(usize, Duration)>,
    /// `Retry-After` of the concurrency 429.
    pub concurrency_retry_after: Duration,
    /// Sent as `x-ms-dop-hint` on every answer.
    pub dop_hint: Option<u32>,
}

impl Default for Dataverse {
    fn default() -> Self {
        Self {
            registry: None,
            users: Vec::new(),
            group_team_members: Vec::new(),
            record: true,
            throttling: Throttling::default(),
        }
    }
}

impl Dataverse {
    pub fn builder() -> Dataverse {
        Dataverse::default()
    }

    /// Accept only bearer tokens the IdP's token endpoint issued and nobody revoked;
    /// without this any bearer is accepted (until [`DataverseHandle::revoke_tokens`]).
    pub fn accept_tokens_from(mut self, registry: S2sRegistry) -> Self {
        self.registry = Some(registry);
        self
    }

    /// Adds a systemuser.
    pub fn user(mut self, user: DirectoryUser) -> Self {
        self.users.push(user);
        self
    }

    /// An Entra user who is a member of a group team but not (yet) a systemuser: as in
    /// Dataverse, it becomes one just in time when looked up by the alternate key
    /// `systemusers(azureactivedirectoryobjectid=<oid>)`, and a `$filter` does not find it.
    pub fn group_team_member(mut self, user: DirectoryUser) -> Self {
        self.group_team_members.push(user);
        self
    }

    /// Whether requests are recorded for [`DataverseHandle::requests`] (default true).
    /// Load benchmarks turn it off so memory and a lock per request stay out of the
    /// numbers; [`DataverseHandle::request_count`] then stays 0.
    pub fn record_requests(mut self, yes: bool) -> Self {
        self.record = yes;
        self
    }

    /// Throttles like Dataverse's service protection (see [`Throttling`]).
    pub fn throttling(mut self, throttling: Throttling) -> Self {
        self.throttling = throttling;
        self
    }

    /// Starts on `127.0.0.1:0`.
    pub async fn start(self) -> std::io::Result<DataverseHandle> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        self.start_on(listener).await
    }

    /// Starts on an already bound listener (the demo binds fixed ports).
    pub async fn start_on(self, listener: TcpListener) -> std::io::Result<DataverseHandle> {
        let addr = listener.local_addr()?;
        let url = server::base_url(addr);
        let state = Arc::new(DvState {
            authorities: vec![
                url.trim_start_matches("http://").to_owned(),
                format!("localhost:{}", addr.port()),
            ],
            link_origin: Mutex::new(url.clone()),
            affinity: format!("{:016x}", rand::random::<u64>()),
            url,
            addr,
            registry: self.registry,
            seen_tokens: Mutex::new(HashSet::new()),
            revoked: Mutex::new(HashSet::new()),
            users: Mutex::new(self.users),
            group_team_members: Mutex::new(self.group_team_members),
            requests: Mutex::new(Vec::new()),
            record: self.record,
            systemuser_lookups: AtomicUsize::new(0),
            canned: Mutex::new(VecDeque::new()),
            delay: Mutex::new(Duration::ZERO),
            store: Mutex::new(Store::seeded()),
            skiptokens: Mutex::new(HashMap::new()),
            throttling: self.throttling,
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: AtomicUsize::new(0),
            window: Mutex::new(VecDeque::new()),
            throttled: AtomicUsize::new(0),
            metadata: metadata::MetadataStandIn::default(),
        });
        let handler_state = state.clone();
        let server = server::spawn(listener, move |req| {
            let state = handler_state.clone();
            // Each request runs to its end in its own task, as on the real service: a
            // client that hangs up does not stop the work it asked for (nor free its
            // place in the concurrency count).
            let work = tokio::spawn(state.handle_protected(req));
            async move {
                work.await.unwrap_or_else(|_| {
                    DvResponse::error(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "0x80040216",
                        "The request handler failed.",
                    )
                    .into_http()
                })
            }
        });
        tracing::debug!(url = %state.url, "testkit Dataverse started");
        Ok(DataverseHandle {
            state,
            server: Arc::new(server),
        })
    }
}

/// A running stand-in Dataverse. Clones share it; it stops when the last clone is dropped
/// or on [`DataverseHandle::stop`].
#[derive(Clone)]
pub struct DataverseHandle {
    state: Arc<DvState>,
    server: Arc<ServerTask>,
}

impl std::fmt::Debug for DataverseHandle {
    // Recorded requests carry bearer tokens: only the URL is shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataverseHandle")
            .field("url", &self.state.url)
            .finish_non_exhaustive()
    }
}

impl DataverseHandle {
    /// The organisation URL, `http://127.0.0.1:{port}` (no trailing slash).
    pub fn url(&self) -> String {
        self.state.url.clone()
    }

    /// `{url}/api/data/v9.2`
    pub fn api_url(&self) -> String {
        format!("{}/api/data/v9.2", self.state.url)
    }

    pub fn addr(&self) -> SocketAddr {
        self.state.addr
    }

    /// This server under its other name, `http://localhost:{port}` (loopback still): as an
    /// organisation's `org.api.crm.dynamics.com` next to `org.crm.dynamics.com`.
    pub fn alias_url(&self) -> String {
        format!("http://localhost:{}", self.state.addr.port())
    }

    /// Writes the absolute links of its responses (`@odata.*`, `Location`, `OData-EntityId`,
    /// inside `$batch` too) with `origin` instead of [`DataverseHandle::url`], e.g. the
    /// [`DataverseHandle::alias_url`] in any case; requests naming either, or `origin`'s
    /// host (a TLS front in front of the stand-in), are accepted.
    pub fn set_link_origin(&self, origin: &str) {
        *lock(&self.state.link_origin) = origin.trim_end_matches('/').to_owned();
    }

    /// Every request received, in order (including `systemusers` lookups).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state.requests).clone()
    }

    pub fn request_count(&self) -> usize {
        lock(&self.state.requests).len()
    }

    /// `systemusers` queries answered (top level and inside `$batch`).
    pub fn systemuser_lookups(&self) -> usize {
        self.state.systemuser_lookups.load(Ordering::SeqCst)
    }

    pub fn add_user(&self, user: DirectoryUser) {
        lock(&self.state.users).push(user);
    }

    /// As [`Dataverse::group_team_member`], while running (a user added to a group team).
    pub fn add_group_team_member(&self, user: DirectoryUser) {
        lock(&self.state.group_team_members).push(user);
    }

    /// The next `n` requests (any path) get this canned response instead of normal
    /// handling; they are still recorded. Calls queue up behind each other.
    pub fn respond_next(&self, n: usize, status: u16, headers: Vec<(String, String)>, body: &str) {
        self.respond_next_bytes(n, status, headers, Bytes::copy_from_slice(body.as_bytes()));
    }

    /// As [`DataverseHandle::respond_next`], with a body of any bytes (e.g. compressed).
    pub fn respond_next_bytes(
        &self,
        n: usize,
        status: u16,
        headers: Vec<(String, String)>,
        body: Bytes,
    ) {
        let canned = Canned {
            status,
            headers,
            body,
        };
        let mut queue = lock(&self.state.canned);
        for _ in 0..n {
            queue.push_back(canned.clone());
        }
    }

    /// Delays every response by `d` (a slow upstream); zero turns it off.
    pub fn set_delay(&self, d: Duration) {
        *lock(&self.state.delay) = d;
    }

    /// Makes every S2S token valid so far invalid (401), as after a key rollover.
    pub fn revoke_tokens(&self) {
        let seen: Vec<String> = lock(&self.state.seen_tokens).iter().cloned().collect();
        lock(&self.state.revoked).extend(seen);
        if let Some(registry) = &self.state.registry {
            registry.revoke_all();
        }
    }

    /// Adds a system view (`savedqueries`) or personal view (`userqueries`) reading the
    /// table `returnedtypecode` (a logical name); returns its id.
    pub fn add_stored_query(&self, set: &str, returnedtypecode: &str) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let mut fields = Map::new();
        fields.insert(
            "returnedtypecode".into(),
            Value::String(returnedtypecode.into()),
        );
        lock(&self.state.store).insert(set, id.clone(), fields, Map::new());
        id
    }

    /// The records of an entity set (`accounts`, `contacts`) as stored, including the
    /// `@odata.bind` values exactly as they arrived.
    pub fn records(&self, entity_set: &str) -> Vec<Value> {
        let store = lock(&self.state.store);
        store.sets.get(entity_set).map_or_else(Vec::new, |set| {
            set.rows
                .iter()
                .map(|row| {
                    let mut obj = row.fields.clone();
                    obj.insert(set.key.to_owned(), Value::String(row.id.clone()));
                    obj.insert("@odata.etag".to_owned(), Value::String(row.etag()));
                    for (k, v) in &row.binds {
                        obj.insert(k.clone(), v.clone());
                    }
                    Value::Object(obj)
                })
                .collect()
        })
    }

    /// The most requests it was handling at once (429s it answered included).
    pub fn max_in_flight(&self) -> usize {
        self.state.max_in_flight.load(Ordering::SeqCst)
    }

    /// Starts [`DataverseHandle::max_in_flight`] again from the requests in flight now.
    pub fn reset_max_in_flight(&self) {
        let now = self.state.in_flight.load(Ordering::SeqCst);
        self.state.max_in_flight.store(now, Ordering::SeqCst);
    }

    /// Requests it is handling now.
    pub fn in_flight(&self) -> usize {
        self.state.in_flight.load(Ordering::SeqCst)
    }

    /// Requests it answered 429 by its own [`Throttling`] (not canned ones); unrecorded.
    pub fn throttled_count(&self) -> usize {
        self.state.throttled.load(Ordering::SeqCst)
    }

    /// Stops serving now (clones included); open connections are closed.
    pub fn stop(&self) {
        self.server.stop();
    }
}

#[derive(Clone)]
struct Canned {
    status: u16,
    headers: Vec<(String, String)>,
    body: Bytes,
}

struct DvState {
    url: String,
    /// The origin written into the links of responses: `url`, or another of this server's
    /// names (an organisation answers on `org.crm.dynamics.com` and `org.api.crm.dynamics.com`).
    link_origin: Mutex<String>,
    /// This server's `ARRAffinity` cookie value.
    affinity: String,
    /// `host:port` forms that name this server in absolute URLs.
    authorities: Vec<String>,
    addr: SocketAddr,
    registry: Option<S2sRegistry>,
    seen_tokens: Mutex<HashSet<String>>,
    revoked: Mutex<HashSet<String>>,
    users: Mutex<Vec<DirectoryUser>>,
    /// Provisioned into `users` on their first alternate-key lookup.
    group_team_members: Mutex<Vec<DirectoryUser>>,
    requests: Mutex<Vec<RecordedRequest>>,
    /// False: nothing is pushed to `requests` (bodies are still hashed for `echo`).
    record: bool,
    systemuser_lookups: AtomicUsize,
    canned: Mutex<VecDeque<Canned>>,
    delay: Mutex<Duration>,
    store: Mutex<Store>,
    /// Issued `$skiptoken` values, exactly as they appear in nextLinks → row offset.
    skiptokens: Mutex<HashMap<String, usize>>,
    throttling: Throttling,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: AtomicUsize,
    /// Arrival times of the requests within `max_requests`' window.
    window: Mutex<VecDeque<tokio::time::Instant>>,
    throttled: AtomicUsize,
    /// `$metadata` (`dataverse/metadata.rs`).
    metadata: metadata::MetadataStandIn,
}

/// Counts a request in flight until its handler returns or is dropped.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------------------
// Entity store

#[derive(Clone)]
struct Row {
    id: String,
    version: u64,
    fields: Map<String, Value>,
    /// `...@odata.bind` (and `$ref`) values as they arrived.
    binds: Map<String, Value>,
}

impl Row {
    fn etag(&self) -> String {
        format!("W/\"{}\"", self.version)
    }
}

#[derive(Clone)]
struct EntitySet {
    /// Logical name (`account`), used in messages and metadata type names.
    logical: &'static str,
    /// Primary key attribute (`accountid`).
    key: &'static str,
    /// Primary name attribute (`name`), as `EntityDefinitions` reports it.
    primary_name: &'static str,
    /// The table's `MetadataId`: stable, as in a real organisation.
    metadata_id: &'static str,
    rows: Vec<Row>,
}

#[derive(Clone)]
struct Store {
    next_version: u64,
    sets: HashMap<String, EntitySet>,
    files: file_columns::Files,
}

impl Store {
    fn seeded() -> Self {
        let mut store = Store {
            // Real row versions are large numbers; start there so ETags look familiar.
            next_version: 468_000,
            sets: HashMap::new(),
            files: file_columns::Files::default(),
        };
        for (set, logical, key, primary_name, metadata_id) in [
            (
                "accounts",
                "account",
                "accountid",
                "name",
                "70816501-edb9-4740-a16c-6a5efbc05d84",
            ),
            (
                "contacts",
                "contact",
                "contactid",
                "fullname",
                "608861bc-50a4-4c5f-a02c-21fe1943e2cf",
            ),
            (
                "savedqueries",
                "savedquery",
                "savedqueryid",
                "name",
                "3d4b7e33-0b0a-4d6f-9c2f-000000001039",
            ),
            (
                "userqueries",
                "userquery",
                "userqueryid",
                "name",
                "3d4b7e33-0b0a-4d6f-9c2f-000000004230",
            ),
        ] {
            store.sets.insert(
                set.to_owned(),
                EntitySet {
                    logical,
                    key,
                    primary_name,
                    metadata_id,
                    rows: Vec::new(),
                },
            );
        }
        for name in ["Contoso", "Fabrikam", "Adventure Works"] {
            let mut fields = Map::new();
            fields.insert("name".into(), Value::String(name.into()));
            store.insert(
                "accounts",
                uuid::Uuid::new_v4().to_string(),
                fields,
                Map::new(),
            );
        }
        for (first, last) in [("Yvonne", "McKay"), ("Susanna", "Stubberod")] {
            let mut fields = Map::new();
            fields.insert("firstname".into(), Value::String(first.into()));
            fields.insert("lastname".into(), Value::String(last.into()));
            fields.insert("fullname".into(), Value::String(format!("{first} {last}")));
            fields.insert(
                "emailaddress1".into(),
                Value::String(format!("{}@contoso.example", first.to_lowercase())),
            );
            store.insert(
                "contacts",
                uuid::Uuid::new_v4().to_string(),
                fields,
                Map::new(),
            );
        }
        store
    }

    fn bump(&mut self) -> u64 {
        self.next_version += 1;
        self.next_version
    }

    fn insert(
        &mut self,
        set: &str,
        id: String,
        fields: Map<String, Value>,
        binds: Map<String, Value>,
    ) {
        let version = self.bump();
        if let Some(s) = self.sets.get_mut(set) {
            s.rows.push(Row {
                id,
                version,
                fields,
                binds,
            });
        }
    }
}

/// The entity set a `savedQuery=` / `userQuery=` reads (its view's `returnedtypecode`),
/// or the error for a view that does not exist; `None` without one.
fn stored_query_table(req: &DvRequest, store: &Store) -> Option<Result<String, DvResponse>> {
    let pairs = query_pairs(req.raw_query.as_deref());
    let (views, id) = [("savedqueries", "savedQuery"), ("userqueries", "userQuery")]
        .into_iter()
        .find_map(|(views, option)| query_param(&pairs, option).map(|id| (views, id)))?;
    let logical = store
        .sets
        .get(views)
        .and_then(|set| set.rows.iter().find(|r| r.id == id.trim()))
        .and_then(|row| row.fields.get("returnedtypecode"))
        .and_then(Value::as_str);
    let table = logical.and_then(|logical| {
        store
            .sets
            .iter()
            .find(|(_, set)| set.logical == logical)
            .map(|(name, _)| name.clone())
    });
    Some(table.ok_or_else(|| {
        DvResponse::error(
            StatusCode::NOT_FOUND,
            "0x80040217",
            &format!("{views} With Id = {id} Does Not Exist"),
        )
    }))
}

// ---------------------------------------------------------------------------------------
// Internal request/response model shared by top-level requests and `$batch` parts

/// A write body split into plain attributes and `@odata.bind` values.
type Payload = (Map<String, Value>, Map<String, Value>);

#[derive(Clone)]
struct DvRequest {
    method: Method,
    api_version: String,
    /// Resource path after `/api/data/{version}/`, percent-decoded.
    resource: String,
    raw_query: Option<String>,
    headers: HeaderMap,
    body: Bytes,
}

impl DvRequest {
    fn base(&self, url: &str) -> String {
        format!("{url}/api/data/{}", self.api_version)
    }

    fn prefer(&self) -> Vec<String> {
        self.headers
            .get_all("prefer")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect()
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Debug, Clone)]
struct DvResponse {
    status: StatusCode,
    /// Canonically cased, as they are written inside `$batch` responses.
    headers: Vec<(String, String)>,
    body: Bytes,
    /// `accounts(<id>)` of a created/updated record, for `$batch` Content-ID references.
    entity_path: Option<String>,
}

impl DvResponse {
    fn empty(status: StatusCode) -> Self {
        Self {
            status,
            headers: Vec::new(),
            body: Bytes::new(),
            entity_path: None,
        }
    }

    fn json(status: StatusCode, value: &Value) -> Self {
        Self::empty(status)
            .header("Content-Type", JSON_CONTENT_TYPE)
            .with_body(value.to_string())
    }

    fn error(status: StatusCode, code: &str, message: &str) -> Self {
        Self::json(
            status,
            &json!({"error": {"code": code, "message": message}}),
        )
    }

    fn method_not_allowed(method: &Method) -> Self {
        Self::error(
            StatusCode::METHOD_NOT_ALLOWED,
            "0x80060888",
            &format!("The HTTP method '{method}' is not supported for this resource."),
        )
    }

    fn not_found_segment(segment: &str) -> Self {
        Self::error(
            StatusCode::NOT_FOUND,
            "0x80060888",
            &format!("Resource not found for the segment '{segment}'."),
        )
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_owned(), value.into()));
        self
    }

    fn with_body(mut self, body: impl Into<Bytes>) -> Self {
        self.body = body.into();
        self
    }

    /// Like Dataverse (IIS dynamic compression): JSON and `$batch` answers compressed when
    /// the request accepts it, brotli preferred over gzip. Its own code, not the gateway's.
    fn compressed_for(mut self, request: &HeaderMap) -> Self {
        use std::io::Write as _;
        let content_type = self
            .headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case("content-type"))
            .map(|(_, v)| v.to_ascii_lowercase())
            .unwrap_or_default();
        if self.body.is_empty()
            || !(content_type.starts_with("application/json")
                || content_type.starts_with("multipart/mixed"))
        {
            return self;
        }
        let accepts = |coding: &str| {
            request
                .get_all(header::ACCEPT_ENCODING)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(','))
                .any(|item| {
                    let mut params = item.split(';');
                    params
                        .next()
                        .is_some_and(|t| t.trim().eq_ignore_ascii_case(coding))
                        && !params.any(|p| p.trim() == "q=0")
                })
        };
        let (coding, compressed) = if accepts("br") {
            let mut out = Vec::new();
            {
                let mut writer = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                let _ = writer.write_all(&self.body);
            }
            ("br", out)
        } else if accepts("gzip") {
            let mut encoder =
                flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            let _ = encoder.write_all(&self.body);
            ("gzip", encoder.finish().unwrap_or_default())
        } else {
            return self;
        };
        self.headers
            .retain(|(n, _)| !n.eq_ignore_ascii_case("content-length"));
        self.body = Bytes::from(compressed);
        self.header("Content-Encoding", coding)
            .header("Vary", "Accept-Encoding")
    }

    fn into_http(self) -> Response<RespBody> {
        let mut resp = Response::new(full(self.body));
        *resp.status_mut() = self.status;
        for (name, value) in self.headers {
            append_header(resp.headers_mut(), &name, &value);
        }
        resp
    }
}

fn append_header(headers: &mut HeaderMap, name: &str, value: &str) {
    match (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        (Ok(n), Ok(v)) => {
            headers.append(n, v);
        }
        _ => tracing::warn!(
            header = name,
            "testkit Dataverse dropped an unencodable header"
        ),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Splits `/api/data/v9.x/rest` into (version, percent-decoded rest).
fn split_api_path(path: &str) -> Option<(String, String)> {
    let rest = path.strip_prefix("/api/data/")?;
    let (version, resource) = rest.split_once('/').unwrap_or((rest, ""));
    if !API_VERSIONS.contains(&version) {
        return None;
    }
    let decoded = percent_decode_str(resource)
        .decode_utf8_lossy()
        .into_owned();
    Some((version.to_owned(), decoded))
}

/// Query pairs, percent-decoded (`+` as space, as ASP.NET reads query strings).
fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    let Some(raw) = raw else {
        return Vec::new();
    };
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let dec = |s: &str| {
                percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

fn query_param(pairs: &[(String, String)], name: &str) -> Option<String> {
    pairs
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

/// The raw (still encoded) pieces of the query, and the raw `$skiptoken` value if any.
fn split_raw_skiptoken(raw: Option<&str>) -> (Vec<String>, Option<String>) {
    let mut others = Vec::new();
    let mut token = None;
    for pair in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let key = pair.split_once('=').map_or(pair, |(k, _)| k);
        let key = percent_decode_str(key).decode_utf8_lossy();
        if key.eq_ignore_ascii_case("$skiptoken") {
            token = Some(pair.split_once('=').map_or("", |(_, v)| v).to_owned());
        } else {
            others.push(pair.to_owned());
        }
    }
    (others, token)
}

/// Percent-encodes like Dataverse's paging cookie: the inner cookie (`upper == false`)
/// with lowercase hex and `=`, `/`, braces encoded too; the outer skiptoken with uppercase
/// hex and only `%`, quotes, spaces and angle brackets encoded.
fn cookie_encode(s: &str, upper: bool) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        let inner_only = matches!(c, '{' | '}' | '=' | '/');
        if matches!(c, '<' | '>' | ' ' | '"' | '%') || (!upper && inner_only) {
            let hex = format!("%{:02x}", c as u32);
            out.push_str(&if upper { hex.to_uppercase() } else { hex });
        } else {
            out.push(c);
        }
    }
    out
}

/// The object id of `systemusers(azureactivedirectoryobjectid=<guid>)`.
fn object_id_key(segment: &str) -> Option<String> {
    let inner = segment
        .strip_prefix("systemusers(azureactivedirectoryobjectid=")?
        .strip_suffix(')')?;
    is_guid_text(inner).then(|| inner.to_ascii_lowercase())
}

fn guid_in_parens(segment: &str) -> Option<(&str, String)> {
    let (name, rest) = segment.split_once('(')?;
    let inner = rest.strip_suffix(')')?;
    let inner = inner.trim_start_matches('{').trim_end_matches('}');
    is_guid_text(inner).then(|| (name, inner.to_ascii_lowercase()))
}

// ---------------------------------------------------------------------------------------
// Request bodies: hashed while read, only the head kept (plus the whole body when a
// buffering route needs it)

struct DrainedBody {
    head: Bytes,
    len: u64,
    sha256: String,
    full: Option<Bytes>,
    too_large: bool,
    trailers: HeaderMap,
}

async fn drain(mut body: Incoming, keep_full: bool) -> Result<DrainedBody, hyper::Error> {
    let mut hasher = digest::Context::new(&digest::SHA256);
    let mut head = BytesMut::new();
    let mut whole = keep_full.then(BytesMut::new);
    let mut len = 0u64;
    let mut too_large = false;
    let mut trailers = HeaderMap::new();
    while let Some(frame) = body.frame().await {
        let data = match frame?.into_data() {
            Ok(data) => data,
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers.extend(t);
                }
                continue;
            }
        };
        hasher.update(&data);
        len += data.len() as u64;
        let room = RECORDED_BODY_LIMIT.saturating_sub(head.len());
        head.extend_from_slice(&data[..room.min(data.len())]);
        if let Some(buf) = whole.as_mut() {
            if buf.len() + data.len() > MAX_BUFFERED_BODY {
                too_large = true;
                whole = None;
            } else {
                buf.extend_from_slice(&data);
            }
        }
    }
    Ok(DrainedBody {
        head: head.freeze(),
        len,
        sha256: hex(hasher.finish().as_ref()),
        full: whole.map(BytesMut::freeze),
        too_large,
        trailers,
    })
}

/// The `echo` response body: the request body streamed back, hashed on the way through
/// and written into the request's record when it ends.
struct EchoBody {
    inner: Incoming,
    state: Arc<DvState>,
    index: usize,
    hasher: Option<digest::Context>,
    head: BytesMut,
    len: u64,
}

impl EchoBody {
    fn finish(&mut self) {
        if let Some(hasher) = self.hasher.take() {
            let sha = hex(hasher.finish().as_ref());
            let head = std::mem::take(&mut self.head).freeze();
            self.state.record_body(self.index, head, self.len, sha);
        }
    }
}

impl Body for EchoBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    if let Some(hasher) = this.hasher.as_mut() {
                        hasher.update(data);
                    }
                    this.len += data.len() as u64;
                    let room = RECORDED_BODY_LIMIT.saturating_sub(this.head.len());
                    this.head.extend_from_slice(&data[..room.min(data.len())]);
                }
                // With a Content-Length, hyper may stop polling after the last byte:
                // record now so the record is complete before the client sees the end.
                if this.inner.is_end_stream() {
                    this.finish();
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(Box::new(e)))),
            Poll::Ready(None) => {
                this.finish();
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for EchoBody {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The `download` response body: byte `i` is `(i % 251) as u8`, produced chunk by chunk.
struct PatternBody {
    offset: u64,
    end: u64,
}

impl PatternBody {
    fn chunk(&mut self) -> Bytes {
        let n = (self.end - self.offset).min(DOWNLOAD_CHUNK as u64);
        let chunk: Vec<u8> = (self.offset..self.offset + n)
            .map(|i| (i % 251) as u8)
            .collect();
        self.offset += n;
        Bytes::from(chunk)
    }
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.offset >= this.end {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(Frame::data(this.chunk()))))
    }

    fn is_end_stream(&self) -> bool {
        self.offset >= self.end
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.end - self.offset)
    }
}

// ---------------------------------------------------------------------------------------
// Top-level handling

impl DvState {
    fn record_body(&self, index: usize, head: Bytes, len: u64, sha256: String) {
        if let Some(rec) = lock(&self.requests).get_mut(index) {
            rec.body = head;
            rec.body_len = len;
            rec.body_sha256 = sha256;
        }
    }

    /// The origin links are written with (see [`DataverseHandle::set_link_origin`]).
    fn link_origin(&self) -> String {
        lock(&self.link_origin).clone()
    }

    /// Adds the headers every Dataverse response carries, keeping any a canned response
    /// set itself (e.g. a rate-limit header counting down to 0).
    fn finalize(&self, mut resp: Response<RespBody>) -> Response<RespBody> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let headers = resp.headers_mut();
        let mut default = |name: &'static str, value: HeaderValue| {
            headers.entry(name).or_insert(value);
        };
        default("odata-version", HeaderValue::from_static("4.0"));
        if let Ok(v) = HeaderValue::from_str(&request_id) {
            default("x-ms-service-request-id", v.clone());
            default("req_id", v);
        }
        // Service-protection diagnostics real Dataverse sends; gateways expose them as metrics.
        default(
            "x-ms-ratelimit-burst-remaining-xrm-requests",
            HeaderValue::from_static("5999"),
        );
        default(
            "x-ms-ratelimit-time-remaining-xrm-requests",
            HeaderValue::from_static("1,200,000.00"),
        );
        // The server-affinity cookies real Dataverse sets on every response.
        if !headers.contains_key(http::header::SET_COOKIE) {
            let cookies = [
                format!("ARRAffinity={}; path=/; secure; HttpOnly", self.affinity),
                format!(
                    "ReqClientId={}; expires=Fri, 01-Jan-2100 00:00:00 GMT; path=/; secure; HttpOnly",
                    uuid::Uuid::new_v4()
                ),
            ];
            for cookie in cookies {
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    headers.append(http::header::SET_COOKIE, v);
                }
            }
        }
        resp
    }

    /// Service protection in front of [`Self::handle`]: concurrency and request-count
    /// limits answered 429 with `Retry-After`, and the dop hint on every answer.
    async fn handle_protected(self: Arc<Self>, req: Request<Incoming>) -> Response<RespBody> {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let _counted = InFlight(self.in_flight.clone());
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let t = &self.throttling;
        let refused = if t.max_concurrent.is_some_and(|max| now > max) {
            Some(
                DvResponse::error(
                    StatusCode::TOO_MANY_REQUESTS,
                    "0x80072326",
                    "Number of concurrent requests exceeded the limit of 52.",
                )
                .header(
                    "Retry-After",
                    t.concurrency_retry_after.as_secs().max(1).to_string(),
                ),
            )
        } else if let Some((max, window)) = t.max_requests {
            let at = tokio::time::Instant::now();
            let mut seen = lock(&self.window);
            while seen
                .front()
                .is_some_and(|first| at.duration_since(*first) >= window)
            {
                seen.pop_front();
            }
            if seen.len() >= max {
                let wait = seen.front().map_or(window, |first| {
                    window.saturating_sub(at.duration_since(*first))
                });
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                Some(
                    DvResponse::error(
                        StatusCode::TOO_MANY_REQUESTS,
                        "0x80072322",
                        "Number of requests exceeded the limit of 6000 over time window of 300 seconds.",
                    )
                    .header("Retry-After", secs.max(1).to_string()),
                )
            } else {
                seen.push_back(at);
                None
            }
        } else {
            None
        };
        let mut resp = match refused {
            Some(r) => {
                self.throttled.fetch_add(1, Ordering::SeqCst);
                self.finalize(r.into_http())
            }
            None => self.clone().handle(req).await,
        };
        if let Some(hint) = self.throttling.dop_hint {
            resp.headers_mut()
                .insert("x-ms-dop-hint", HeaderValue::from(hint));
        }
        resp
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<RespBody> {
        let (parts, body) = req.into_parts();
        // As nginx does: over HTTP/2 the authority is `:authority`, and a `Host` beside it
        // is refused as a duplicate (the worst case of what servers do with both).
        if parts.version == http::Version::HTTP_2 && parts.headers.contains_key(http::header::HOST)
        {
            return self.finalize(
                DvResponse::error(
                    StatusCode::BAD_REQUEST,
                    "0x80040203",
                    "An HTTP/2 request carried a Host header beside :authority.",
                )
                .into_http(),
            );
        }
        if metadata::is_metadata(&parts.method, parts.uri.path()) {
            return self.metadata(&parts.headers).await;
        }
        let path_and_query = parts
            .uri
            .path_and_query()
            .map_or_else(|| "/".to_owned(), |pq| pq.as_str().to_owned());
        tracing::debug!(method = %parts.method, path = %parts.uri.path(), "testkit Dataverse request");
        // `usize::MAX` is never a valid index, so `record_body` ignores unrecorded requests.
        let index = if !self.record {
            usize::MAX
        } else {
            let mut requests = lock(&self.requests);
            requests.push(RecordedRequest {
                version: parts.version,
                method: parts.method.clone(),
                path_and_query,
                headers: parts.headers.clone(),
                body: Bytes::new(),
                body_len: 0,
                body_sha256: String::new(),
                trailers: HeaderMap::new(),
            });
            requests.len() - 1
        };
        let api = split_api_path(parts.uri.path());
        let canned = lock(&self.canned).pop_front();
        let delay = *lock(&self.delay);

        let is_echo = canned.is_none()
            && parts.method == Method::POST
            && matches!(&api, Some((_, r)) if r == "echo");
        if is_echo {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if let Err(denied) = self.authenticate(&parts.headers) {
                self.drain_and_record(index, body, false).await;
                return self.finalize(denied.into_http());
            }
            let mut resp = Response::new(
                EchoBody {
                    inner: body,
                    state: self.clone(),
                    index,
                    hasher: Some(digest::Context::new(&digest::SHA256)),
                    head: BytesMut::new(),
                    len: 0,
                }
                .boxed(),
            );
            for name in [header::CONTENT_TYPE, header::CONTENT_LENGTH] {
                if let Some(v) = parts.headers.get(&name) {
                    resp.headers_mut().insert(name, v.clone());
                }
            }
            return self.finalize(resp);
        }

        let buffering = matches!(parts.method, Method::POST | Method::PATCH | Method::PUT);
        let drained = self.drain_and_record(index, body, buffering).await;
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if let Some(c) = canned {
            let mut resp = Response::new(full(c.body));
            *resp.status_mut() =
                StatusCode::from_u16(c.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            for (name, value) in &c.headers {
                append_header(resp.headers_mut(), name, value);
            }
            return self.finalize(resp);
        }
        let Some(drained) = drained else {
            return self.finalize(
                DvResponse::error(
                    StatusCode::BAD_REQUEST,
                    "0x80048d19",
                    "The request body could not be read.",
                )
                .into_http(),
            );
        };
        if drained.too_large {
            return self.finalize(
                DvResponse::error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "0x80048d19",
                    "The request body exceeds the maximum size the testkit buffers.",
                )
                .into_http(),
            );
        }
        let Some((api_version, resource)) = api else {
            let first = parts
                .uri
                .path()
                .trim_start_matches('/')
                .split('/')
                .next()
                .unwrap_or("");
            return self.finalize(DvResponse::not_found_segment(first).into_http());
        };
        if let Err(denied) = self.authenticate(&parts.headers) {
            return self.finalize(denied.into_http());
        }
        if parts.method == Method::GET && resource == "download" {
            let pairs = query_pairs(parts.uri.query());
            let n = query_param(&pairs, "bytes").and_then(|b| b.parse::<u64>().ok());
            let Some(n) = n else {
                return self.finalize(
                    DvResponse::error(
                        StatusCode::BAD_REQUEST,
                        "0x80060888",
                        "download needs ?bytes=N",
                    )
                    .into_http(),
                );
            };
            let mut resp = Response::new(PatternBody { offset: 0, end: n }.boxed());
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            resp.headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
            return self.finalize(resp);
        }
        let request = DvRequest {
            method: parts.method,
            api_version,
            resource,
            raw_query: parts.uri.query().map(str::to_owned),
            headers: parts.headers,
            body: drained.full.unwrap_or_default(),
        };
        let resp = self.execute(&request, None);
        self.finalize(resp.compressed_for(&request.headers).into_http())
    }

    /// Reads the whole body through the hasher and records it; `None` if reading failed.
    async fn drain_and_record(
        &self,
        index: usize,
        body: Incoming,
        keep_full: bool,
    ) -> Option<DrainedBody> {
        match drain(body, keep_full).await {
            Ok(d) => {
                self.record_body(index, d.head.clone(), d.len, d.sha256.clone());
                if let Some(rec) = lock(&self.requests).get_mut(index) {
                    rec.trailers = d.trailers.clone();
                }
                Some(d)
            }
            Err(e) => {
                tracing::debug!(error = %e, "testkit Dataverse could not read a request body");
                None
            }
        }
    }

    fn authenticate(&self, headers: &HeaderMap) -> Result<(), DvResponse> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty());
        let valid = token.is_some_and(|token| {
            lock(&self.seen_tokens).insert(token.to_owned());
            !lock(&self.revoked).contains(token)
                && self.registry.as_ref().is_none_or(|r| r.is_valid(token))
        });
        if valid {
            return Ok(());
        }
        let authorization_uri = self.registry.as_ref().map_or_else(
            || "https://login.microsoftonline.com/common/oauth2/authorize".to_owned(),
            S2sRegistry::authorization_uri,
        );
        Err(DvResponse::error(
            StatusCode::UNAUTHORIZED,
            "0x80072560",
            "The bearer token is missing, was not issued for this organization, or has been revoked.",
        )
        .header(
            "WWW-Authenticate",
            format!("Bearer authorization_uri={authorization_uri}, resource_id={}/", self.url),
        ))
    }

    /// The effective systemuserid: `CallerObjectId` by object id, else `MSCRMCallerID` by
    /// systemuserid, else the application user. `outer` are the `$batch` request's headers,
    /// used when a part carries no impersonation header of its own.
    fn effective_user(
        &self,
        headers: &HeaderMap,
        outer: Option<&HeaderMap>,
    ) -> Result<String, DvResponse> {
        // Any spelling (`_`, `-`, `.`, case): the worst case, so a header the gateway let
        // through inside a `$batch` part shows as the wrong user.
        let pick = |h: &HeaderMap| -> Option<(bool, String)> {
            let get = |wanted: &str| {
                h.iter()
                    .find(|(n, _)| {
                        n.as_str()
                            .chars()
                            .filter(char::is_ascii_alphanumeric)
                            .eq(wanted.chars())
                    })
                    .and_then(|(_, v)| v.to_str().ok())
                    .map(|s| s.trim().to_owned())
            };
            get("callerobjectid")
                .or_else(|| get("mscrmcallerobjectid"))
                .map(|v| (true, v))
                .or_else(|| get("mscrmcallerid").map(|v| (false, v)))
        };
        let Some((by_object_id, id)) = pick(headers).or_else(|| outer.and_then(pick)) else {
            return Ok(APPLICATION_USER_ID.to_owned());
        };
        let id_lc = id
            .trim_start_matches('{')
            .trim_end_matches('}')
            .to_ascii_lowercase();
        let users = lock(&self.users);
        let found = users.iter().find(|u| {
            let candidate = if by_object_id {
                &u.aad_object_id
            } else {
                &u.systemuserid
            };
            candidate.eq_ignore_ascii_case(&id_lc)
        });
        match found {
            Some(u) if !u.disabled => Ok(u.systemuserid.to_ascii_lowercase()),
            _ => Err(DvResponse::error(
                StatusCode::FORBIDDEN,
                "0x80040225",
                &format!(
                    "The specified user (Id = {id}, given in {}) is disabled or does not exist in this organization.",
                    if by_object_id { "CallerObjectId" } else { "MSCRMCallerID" }
                ),
            )),
        }
    }

    /// Runs one Dataverse request (top level or a `$batch` part). `outer` is `Some` for
    /// batch parts: the enclosing batch request's headers.
    fn execute(&self, req: &DvRequest, outer: Option<&HeaderMap>) -> DvResponse {
        let resource = req.resource.trim_end_matches('/');
        // Test-only routes: no impersonation, so proxies can be checked with any caller.
        match (&req.method, resource) {
            (&Method::POST, "echo") => {
                let mut resp = DvResponse::empty(StatusCode::OK).with_body(req.body.clone());
                if let Some(ct) = req.header("content-type") {
                    resp = resp.header("Content-Type", ct);
                }
                return resp;
            }
            (&Method::GET, "download") => {
                let pairs = query_pairs(req.raw_query.as_deref());
                let n = query_param(&pairs, "bytes")
                    .and_then(|b| b.parse::<u64>().ok())
                    .unwrap_or(0);
                let mut body = PatternBody { offset: 0, end: n };
                let mut bytes = BytesMut::new();
                while !body.is_end_stream() {
                    bytes.extend_from_slice(&body.chunk());
                }
                return DvResponse::empty(StatusCode::OK)
                    .header("Content-Type", "application/octet-stream")
                    .with_body(bytes.freeze());
            }
            (&Method::GET, "headers") => return headers_json(&req.headers),
            (&Method::POST, "$batch") if outer.is_some() => {
                return DvResponse::error(
                    StatusCode::BAD_REQUEST,
                    "0x80060888",
                    "A $batch request cannot contain another $batch request.",
                )
            }
            (&Method::POST, "$batch") => return self.batch(req),
            (&Method::GET, "") => return self.service_document(req),
            _ => {}
        }
        let user = match self.effective_user(&req.headers, outer) {
            Ok(u) => u,
            Err(denied) => return denied,
        };
        let mut segments = resource.splitn(2, '/');
        let first = segments.next().unwrap_or_default();
        let rest = segments.next();
        match (&req.method, first, rest) {
            (&Method::GET, "WhoAmI" | "WhoAmI()", None) => DvResponse::json(
                StatusCode::OK,
                &json!({
                    "@odata.context": format!("{}/$metadata#Microsoft.Dynamics.CRM.WhoAmIResponse", req.base(&self.link_origin())),
                    "BusinessUnitId": BUSINESS_UNIT_ID,
                    "UserId": user,
                    "OrganizationId": ORGANIZATION_ID,
                }),
            ),
            (&Method::GET, "systemusers", None) => {
                self.systemuser_lookups.fetch_add(1, Ordering::SeqCst);
                self.systemusers(req, None)
            }
            (&Method::GET, seg, None) if seg.starts_with("systemusers(") => {
                self.systemuser_lookups.fetch_add(1, Ordering::SeqCst);
                if let Some(oid) = object_id_key(seg) {
                    return self.systemuser_by_object_id(req, &oid);
                }
                match guid_in_parens(seg) {
                    Some((_, id)) => self.systemusers(req, Some(id)),
                    None => bad_key(seg),
                }
            }
            (&Method::GET, "EntityDefinitions", None) => self.entity_definitions(req),
            (&Method::GET, seg, Some(attributes))
                if seg.starts_with("EntityDefinitions(")
                    && attributes.starts_with("Attributes") =>
            {
                self.attribute_definitions(req, seg, attributes)
            }
            _ => self.entities(req, first, rest),
        }
    }

    /// `EntityDefinitions(<MetadataId or LogicalName='x'>)/Attributes[/<type cast>]`: the
    /// stand-in's tables declare only their file columns (no option sets), so a cast to
    /// any other attribute type is an empty list.
    fn attribute_definitions(&self, req: &DvRequest, entity: &str, attributes: &str) -> DvResponse {
        let key = entity
            .trim_start_matches("EntityDefinitions(")
            .trim_end_matches(')');
        let logical = key
            .strip_prefix("LogicalName='")
            .map(|k| k.trim_end_matches('\''));
        let pairs = query_pairs(req.raw_query.as_deref());
        let filter = match parse_filter(&pairs, "AttributeMetadata", &|_| Some(PropType::Any)) {
            Ok(f) => f,
            Err(resp) => return resp,
        };
        let store = lock(&self.store);
        let value: Vec<Value> = store
            .sets
            .iter()
            .filter(|(_, set)| logical.map_or(set.metadata_id == key, |l| set.logical == l))
            .flat_map(|(set_name, _)| {
                file_columns::FILE_COLUMNS
                    .iter()
                    .filter(move |(s, _)| s == set_name)
            })
            .filter(|_| attributes == "Attributes" || attributes.ends_with("FileAttributeMetadata"))
            .filter_map(|(_, column)| {
                let mut row = Map::new();
                row.insert(
                    "@odata.type".into(),
                    json!("#Microsoft.Dynamics.CRM.FileAttributeMetadata"),
                );
                row.insert("LogicalName".into(), json!(column));
                row.insert("SchemaName".into(), json!(column));
                row.insert("AttributeType".into(), json!("Virtual"));
                row.insert(
                    "MetadataId".into(),
                    json!("5c4e0f42-1a39-4c3e-9f3a-000000000001"),
                );
                filter
                    .as_ref()
                    .is_none_or(|f| f.matches(&row))
                    .then_some(Value::Object(row))
            })
            .collect();
        let base = req.base(&self.link_origin());
        DvResponse::json(
            StatusCode::OK,
            &json!({"@odata.context": format!("{base}/$metadata#EntityDefinitions/Attributes"), "value": value}),
        )
    }

    /// `EntityDefinitions` with `$filter` / `$select`, as SDKs query it to map a table's
    /// logical name to its entity set and primary key.
    fn entity_definitions(&self, req: &DvRequest) -> DvResponse {
        let pairs = query_pairs(req.raw_query.as_deref());
        let filter = match parse_filter(&pairs, "EntityMetadata", &|_| Some(PropType::Any)) {
            Ok(f) => f,
            Err(resp) => return resp,
        };
        let select = select_list(&pairs);
        let store = lock(&self.store);
        let mut names: Vec<&String> = store.sets.keys().collect();
        names.sort();
        let value: Vec<Value> = names
            .into_iter()
            .filter_map(|set_name| {
                let set = &store.sets[set_name];
                let mut row = Map::new();
                for (k, v) in [
                    ("LogicalName", set.logical.to_owned()),
                    ("SchemaName", set.logical.to_owned()),
                    ("EntitySetName", set_name.clone()),
                    ("PrimaryIdAttribute", set.key.to_owned()),
                    ("PrimaryNameAttribute", set.primary_name.to_owned()),
                    ("MetadataId", set.metadata_id.to_owned()),
                ] {
                    row.insert(k.to_owned(), Value::String(v));
                }
                if !filter.as_ref().is_none_or(|f| f.matches(&row)) {
                    return None;
                }
                if let Some(select) = &select {
                    row.retain(|k, _| select.iter().any(|s| s == k) || k == "MetadataId");
                }
                Some(Value::Object(row))
            })
            .collect();
        let base = req.base(&self.link_origin());
        DvResponse::json(
            StatusCode::OK,
            &json!({"@odata.context": format!("{base}/$metadata#EntityDefinitions"), "value": value}),
        )
    }

    fn service_document(&self, req: &DvRequest) -> DvResponse {
        let base = req.base(&self.link_origin());
        let sets: Vec<Value> = ["accounts", "contacts", "systemusers"]
            .iter()
            .map(|s| json!({"name": s, "kind": "EntitySet", "url": s}))
            .collect();
        DvResponse::json(
            StatusCode::OK,
            &json!({"@odata.context": format!("{base}/$metadata"), "value": sets}),
        )
    }

    // -- systemusers -------------------------------------------------------------------

    /// `systemusers(azureactivedirectoryobjectid=<oid>)`: the user with that object id,
    /// provisioning a group-team member just in time; 404 when there is none.
    fn systemuser_by_object_id(&self, req: &DvRequest, oid: &str) -> DvResponse {
        let known = lock(&self.users)
            .iter()
            .find(|u| u.aad_object_id.eq_ignore_ascii_case(oid))
            .map(|u| u.systemuserid.to_ascii_lowercase());
        let systemuserid = known.or_else(|| {
            let mut members = lock(&self.group_team_members);
            let at = members
                .iter()
                .position(|u| u.aad_object_id.eq_ignore_ascii_case(oid))?;
            let user = members.remove(at);
            let id = user.systemuserid.to_ascii_lowercase();
            lock(&self.users).push(user);
            Some(id)
        });
        match systemuserid {
            Some(id) => self.systemusers(req, Some(id)),
            None => DvResponse::error(
                StatusCode::NOT_FOUND,
                "0x80040217",
                &format!("systemuser With azureactivedirectoryobjectid = {oid} Does Not Exist"),
            ),
        }
    }

    fn systemusers(&self, req: &DvRequest, single: Option<String>) -> DvResponse {
        let base = req.base(&self.link_origin());
        let pairs = query_pairs(req.raw_query.as_deref());
        let select = select_list(&pairs);
        let mut rows: Vec<Map<String, Value>> = vec![user_row(
            APPLICATION_USER_ID,
            APPLICATION_USER_OBJECT_ID,
            "",
            "# gateway-application-user",
            false,
            Some("00000000-0000-0000-0000-00000000a991"),
        )];
        rows.extend(lock(&self.users).iter().map(|u| {
            user_row(
                &u.systemuserid,
                &u.aad_object_id,
                &u.internalemailaddress,
                &u.domainname,
                u.disabled,
                None,
            )
        }));
        let shape = |row: &Map<String, Value>| -> Value {
            let mut out = Map::new();
            out.insert("@odata.etag".into(), Value::String("W/\"1\"".into()));
            for (k, v) in row {
                if select.as_ref().is_none_or(|s| s.iter().any(|f| f == k)) || k == "systemuserid" {
                    out.insert(k.clone(), v.clone());
                }
            }
            Value::Object(out)
        };
        let context_select = select
            .as_ref()
            .map(|s| format!("({})", s.join(",")))
            .unwrap_or_default();
        if let Some(id) = single {
            return match rows
                .iter()
                .find(|r| r.get("systemuserid").and_then(Value::as_str) == Some(id.as_str()))
            {
                Some(row) => {
                    let mut v = shape(row);
                    v["@odata.context"] = Value::String(format!(
                        "{base}/$metadata#systemusers{context_select}/$entity"
                    ));
                    DvResponse::json(StatusCode::OK, &v)
                }
                None => DvResponse::error(
                    StatusCode::NOT_FOUND,
                    "0x80040217",
                    &format!("systemuser With Id = {id} Does Not Exist"),
                ),
            };
        }
        let filter = match parse_filter(&pairs, "systemuser", &|p| match p {
            "systemuserid" | "azureactivedirectoryobjectid" | "applicationid" => {
                Some(PropType::Guid)
            }
            "internalemailaddress" | "domainname" | "fullname" => Some(PropType::String),
            "isdisabled" => Some(PropType::Boolean),
            _ => None,
        }) {
            Ok(f) => f,
            Err(resp) => return resp,
        };
        let value: Vec<Value> = rows
            .iter()
            .filter(|r| filter.as_ref().is_none_or(|f| f.matches(r)))
            .map(shape)
            .collect();
        DvResponse::json(
            StatusCode::OK,
            &json!({
                "@odata.context": format!("{base}/$metadata#systemusers{context_select}"),
                "value": value,
            }),
        )
    }

    // -- accounts / contacts ------------------------------------------------------------

    fn entities(&self, req: &DvRequest, first: &str, rest: Option<&str>) -> DvResponse {
        let (set_name, id) = match guid_in_parens(first) {
            Some((name, id)) => (name.to_owned(), Some(id)),
            None if first.contains('(') => return bad_key(first),
            None => (first.to_owned(), None),
        };
        let mut store = lock(&self.store);
        if !store.sets.contains_key(&set_name) {
            return DvResponse::not_found_segment(&set_name);
        }
        match (&req.method, id, rest) {
            (&Method::GET, None, None) => match stored_query_table(req, &store) {
                // The worst case: the view's rows, whatever table the path names.
                Some(Ok(table)) => self.list(req, &store, &table),
                Some(Err(resp)) => resp,
                None => self.list(req, &store, &set_name),
            },
            (&Method::GET, None, Some("$count")) => {
                let pairs = query_pairs(req.raw_query.as_deref());
                let filter = match parse_filter(&pairs, "entity", &|_| Some(PropType::Any)) {
                    Ok(f) => f,
                    Err(resp) => return resp,
                };
                let count = store.sets.get(&set_name).map_or(0, |set| {
                    set.rows
                        .iter()
                        .filter(|r| {
                            filter
                                .as_ref()
                                .is_none_or(|f| f.matches(&row_fields(set, r)))
                        })
                        .count()
                });
                DvResponse::empty(StatusCode::OK)
                    .header("Content-Type", "text/plain; charset=utf-8")
                    .with_body(count.to_string())
            }
            (&Method::POST, None, None) => self.create(req, &mut store, &set_name, None),
            (&Method::POST, None, Some("Microsoft.Dynamics.CRM.CreateMultiple")) => {
                self.create_multiple(req, &mut store, &set_name)
            }
            (&Method::GET, Some(id), None) => self.retrieve(req, &store, &set_name, &id),
            (&Method::PATCH, Some(id), None) => self.update(req, &mut store, &set_name, &id),
            (&Method::DELETE, Some(id), None) => self.delete(req, &mut store, &set_name, &id),
            (_, Some(id), Some(column))
                if file_columns::is_file_column(&set_name, column.trim_end_matches("/$value")) =>
            {
                let value = column.ends_with("/$value");
                let column = column.trim_end_matches("/$value");
                self.file_column(req, &mut store, &set_name, &id, column, value)
            }
            (&Method::POST | &Method::PUT | &Method::DELETE, Some(id), Some(nav))
                if nav.ends_with("/$ref") =>
            {
                self.associate(req, &mut store, &set_name, &id, nav)
            }
            (_, _, Some(seg)) => DvResponse::not_found_segment(seg),
            _ => DvResponse::method_not_allowed(&req.method),
        }
    }

    fn list(&self, req: &DvRequest, store: &Store, set_name: &str) -> DvResponse {
        let Some(set) = store.sets.get(set_name) else {
            return DvResponse::not_found_segment(set_name);
        };
        let base = req.base(&self.link_origin());
        let pairs = query_pairs(req.raw_query.as_deref());
        let select = select_list(&pairs);
        let filter = match parse_filter(&pairs, set.logical, &|_| Some(PropType::Any)) {
            Ok(f) => f,
            Err(resp) => return resp,
        };
        let mut rows: Vec<&Row> = set
            .rows
            .iter()
            .filter(|r| {
                filter
                    .as_ref()
                    .is_none_or(|f| f.matches(&row_fields(set, r)))
            })
            .collect();
        let total = rows.len();
        let top = query_param(&pairs, "$top").and_then(|t| t.parse::<usize>().ok());
        let prefer = req.prefer();
        let page_size = prefer
            .iter()
            .find_map(|p| {
                p.strip_prefix("odata.maxpagesize=")
                    .and_then(|n| n.trim_matches('"').parse::<usize>().ok())
            })
            .filter(|n| *n > 0);
        let (raw_others, raw_token) = split_raw_skiptoken(req.raw_query.as_deref());
        let offset = match raw_token {
            None => 0,
            Some(token) => match lock(&self.skiptokens).get(&token) {
                Some(offset) => *offset,
                None => {
                    return DvResponse::error(
                        StatusCode::BAD_REQUEST,
                        "0x80060888",
                        "The $skiptoken is not one this organization issued (was the nextLink modified?).",
                    )
                }
            },
        };
        let mut next_link = None;
        if let Some(top) = top {
            rows.truncate(top);
        } else {
            let size = page_size.unwrap_or(DEFAULT_PAGE_SIZE);
            let end = (offset + size).min(rows.len());
            let start = offset.min(end);
            if end < rows.len() {
                let page = &rows[start..end];
                let first_id = page.first().map(|r| r.id.clone()).unwrap_or_default();
                let last_id = page.last().map(|r| r.id.clone()).unwrap_or_default();
                let page_number = offset / size.max(1) + 1;
                let inner = format!(
                    "<cookie page=\"{page_number}\"><{key} last=\"{{{last}}}\" first=\"{{{first}}}\" /></cookie>",
                    key = set.key,
                    last = last_id.to_uppercase(),
                    first = first_id.to_uppercase(),
                );
                let outer = format!(
                    "<cookie pagenumber=\"{}\" pagingcookie=\"{}\" istracking=\"False\" />",
                    page_number + 1,
                    cookie_encode(&inner, false)
                );
                let token = cookie_encode(&outer, true);
                lock(&self.skiptokens).insert(token.clone(), end);
                let mut query = raw_others.clone();
                query.push(format!("$skiptoken={token}"));
                next_link = Some(format!("{base}/{set_name}?{}", query.join("&")));
            }
            rows = rows[start..end].to_vec();
        }
        let value: Vec<Value> = rows
            .iter()
            .map(|r| row_json(set, r, select.as_deref()))
            .collect();
        let context_select = select
            .as_ref()
            .map(|s| format!("({})", s.join(",")))
            .unwrap_or_default();
        let mut body = json!({
            "@odata.context": format!("{base}/$metadata#{set_name}{context_select}"),
        });
        if query_param(&pairs, "$count").is_some_and(|c| c == "true") {
            body["@odata.count"] = Value::from(total);
        }
        body["value"] = Value::Array(value);
        if let Some(link) = next_link {
            body["@odata.nextLink"] = Value::String(link);
        }
        let mut resp = DvResponse::json(StatusCode::OK, &body);
        let applied: Vec<&String> = prefer
            .iter()
            .filter(|p| {
                p.starts_with("odata.maxpagesize=") || p.starts_with("odata.include-annotations=")
            })
            .collect();
        if !applied.is_empty() {
            let joined: Vec<&str> = applied.iter().map(|s| s.as_str()).collect();
            resp = resp.header("Preference-Applied", joined.join(","));
        }
        resp
    }

    fn retrieve(&self, req: &DvRequest, store: &Store, set_name: &str, id: &str) -> DvResponse {
        let Some(set) = store.sets.get(set_name) else {
            return DvResponse::not_found_segment(set_name);
        };
        let Some(row) = set.rows.iter().find(|r| r.id == id) else {
            return does_not_exist(set, id);
        };
        if req.header("if-none-match") == Some(row.etag().as_str()) {
            return DvResponse::empty(StatusCode::NOT_MODIFIED);
        }
        let pairs = query_pairs(req.raw_query.as_deref());
        let select = select_list(&pairs);
        let mut body = row_json(set, row, select.as_deref());
        body["@odata.context"] = Value::String(entity_context(
            &req.base(&self.link_origin()),
            set_name,
            select.as_deref(),
        ));
        DvResponse::json(StatusCode::OK, &body).header("ETag", row.etag())
    }

    /// Splits a request body into plain attributes and `@odata.bind` values, checking that
    /// absolute bind URLs name this organisation (real Dataverse rejects any other base).
    fn payload(&self, req: &DvRequest, set: &EntitySet) -> Result<Payload, DvResponse> {
        let parsed: Value = if req.body.is_empty() {
            Value::Object(Map::new())
        } else {
            serde_json::from_slice(&req.body).map_err(|e| {
                DvResponse::error(
                    StatusCode::BAD_REQUEST,
                    "0x80048d19",
                    &format!(
                        "Error identified in Payload provided by the user for Entity :'{}': {e}",
                        set.logical
                    ),
                )
            })?
        };
        let Value::Object(obj) = parsed else {
            return Err(DvResponse::error(
                StatusCode::BAD_REQUEST,
                "0x80048d19",
                &format!("Error identified in Payload provided by the user for Entity :'{}': expected a JSON object.", set.logical),
            ));
        };
        let mut fields = Map::new();
        let mut binds = Map::new();
        for (k, v) in obj {
            if k.ends_with("@odata.bind") {
                if let Some(target) = v.as_str() {
                    self.check_reference(req, target)?;
                }
                binds.insert(k, v);
            } else if !k.starts_with("@odata.") {
                fields.insert(k, v);
            }
        }
        Ok((fields, binds))
    }

    fn check_reference(&self, req: &DvRequest, target: &str) -> Result<(), DvResponse> {
        let lower = target.to_ascii_lowercase();
        if !(lower.starts_with("http://") || lower.starts_with("https://")) {
            return Ok(());
        }
        let ok = self.strip_own_origin(target).is_some_and(|path| {
            split_api_path(path.split('?').next().unwrap_or_default()).is_some()
        });
        if ok {
            Ok(())
        } else {
            Err(DvResponse::error(
                StatusCode::BAD_REQUEST,
                "0x80048d19",
                &format!(
                    "The URI '{target}' is not valid because it is not based on '{}/'.",
                    req.base(&self.link_origin())
                ),
            ))
        }
    }

    /// For an absolute URL naming this server, the path-and-query part.
    fn strip_own_origin<'u>(&self, url: &'u str) -> Option<&'u str> {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))?;
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, "/"),
        };
        let origin = self.link_origin();
        let link_authority = origin.split_once("://").map_or("", |(_, a)| a);
        (self
            .authorities
            .iter()
            .any(|a| a.eq_ignore_ascii_case(authority))
            || link_authority.eq_ignore_ascii_case(authority))
        .then_some(path)
    }

    fn create(
        &self,
        req: &DvRequest,
        store: &mut Store,
        set_name: &str,
        forced_id: Option<String>,
    ) -> DvResponse {
        let Some(set) = store.sets.get(set_name) else {
            return DvResponse::not_found_segment(set_name);
        };
        let (mut fields, binds) = match self.payload(req, set) {
            Ok(p) => p,
            Err(resp) => return resp,
        };
        let key = set.key;
        let id = forced_id
            .or_else(|| {
                fields
                    .remove(key)
                    .and_then(|v| v.as_str().map(str::to_ascii_lowercase))
                    .filter(|s| is_guid_text(s))
            })
            .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        if set.rows.iter().any(|r| r.id == id) {
            return DvResponse::error(
                StatusCode::PRECONDITION_FAILED,
                "0x80040237",
                "A record with matching key values already exists.",
            );
        }
        store.insert(set_name, id.clone(), fields, binds);
        self.written(req, store, set_name, &id, StatusCode::CREATED)
    }

    /// The collection-bound `CreateMultiple` action: `{"Targets": [...]}` in, `{"Ids": [...]}`
    /// out; one bad target creates none (Dataverse runs it as one transaction).
    fn create_multiple(&self, req: &DvRequest, store: &mut Store, set_name: &str) -> DvResponse {
        let targets = serde_json::from_slice::<Value>(&req.body)
            .ok()
            .and_then(|body| body.get("Targets").and_then(Value::as_array).cloned());
        let Some(targets) = targets else {
            return DvResponse::error(
                StatusCode::BAD_REQUEST,
                "0x80048d19",
                "CreateMultiple expects a body with a Targets array.",
            );
        };
        let mut created = Vec::new();
        for target in targets {
            let one = DvRequest {
                body: Bytes::from(target.to_string()),
                ..req.clone()
            };
            let Some(set) = store.sets.get(set_name) else {
                return DvResponse::not_found_segment(set_name);
            };
            let (fields, binds) = match self.payload(&one, set) {
                Ok(p) => p,
                Err(resp) => return resp,
            };
            created.push((uuid::Uuid::new_v4().to_string(), fields, binds));
        }
        let ids: Vec<String> = created.iter().map(|(id, _, _)| id.clone()).collect();
        for (id, fields, binds) in created {
            store.insert(set_name, id, fields, binds);
        }
        let base = req.base(&self.link_origin());
        DvResponse::json(
            StatusCode::OK,
            &json!({
                "@odata.context": format!("{base}/$metadata#Microsoft.Dynamics.CRM.CreateMultipleResponse"),
                "Ids": ids,
            }),
        )
    }

    /// The answer to a successful create or update: 204 + `OData-EntityId`, or the record
    /// when the client asked for `return=representation`.
    fn written(
        &self,
        req: &DvRequest,
        store: &Store,
        set_name: &str,
        id: &str,
        rep_status: StatusCode,
    ) -> DvResponse {
        let base = req.base(&self.link_origin());
        let entity_id = format!("{base}/{set_name}({id})");
        let representation = req.prefer().iter().any(|p| p == "return=representation");
        let row = store
            .sets
            .get(set_name)
            .and_then(|s| s.rows.iter().find(|r| r.id == id).map(|r| (s, r)));
        let mut resp = match (representation, row) {
            (true, Some((set, row))) => {
                let select = select_list(&query_pairs(req.raw_query.as_deref()));
                let mut body = row_json(set, row, select.as_deref());
                body["@odata.context"] =
                    Value::String(entity_context(&base, set_name, select.as_deref()));
                DvResponse::json(rep_status, &body)
                    .header("Preference-Applied", "return=representation")
                    .header("ETag", row.etag())
            }
            _ => DvResponse::empty(StatusCode::NO_CONTENT),
        };
        resp = resp.header("OData-EntityId", entity_id);
        resp.entity_path = Some(format!("{set_name}({id})"));
        resp
    }

    /// Applies `If-Match` / `If-None-Match: *` to a write. `Err` is the response to send.
    fn preconditions(
        req: &DvRequest,
        set: &EntitySet,
        row: Option<&Row>,
        id: &str,
    ) -> Result<(), DvResponse> {
        if let (Some("*"), Some(_)) = (req.header("if-none-match"), row) {
            return Err(DvResponse::error(
                StatusCode::PRECONDITION_FAILED,
                "0x80040237",
                "A record with matching key values already exists.",
            ));
        }
        if let Some(if_match) = req.header("if-match") {
            let Some(row) = row else {
                return Err(does_not_exist(set, id));
            };
            if if_match != "*" && !if_match.split(',').any(|e| e.trim() == row.etag()) {
                return Err(DvResponse::error(
                    StatusCode::PRECONDITION_FAILED,
                    "0x80060882",
                    "The version of the existing record doesn't match the RowVersion property provided.",
                ));
            }
        }
        Ok(())
    }

    fn update(&self, req: &DvRequest, store: &mut Store, set_name: &str, id: &str) -> DvResponse {
        let Some(set) = store.sets.get(set_name) else {
            return DvResponse::not_found_segment(set_name);
        };
        let row = set.rows.iter().find(|r| r.id == id);
        if let Err(resp) = Self::preconditions(req, set, row, id) {
            return resp;
        }
        if row.is_none() {
            // PATCH without If-Match is an upsert on Dataverse.
            let resp = self.create(req, store, set_name, Some(id.to_owned()));
            return if resp.status == StatusCode::CREATED {
                DvResponse {
                    status: StatusCode::OK,
                    ..resp
                }
            } else {
                resp
            };
        }
        let (mut fields, binds) = match self.payload(req, set) {
            Ok(p) => p,
            Err(resp) => return resp,
        };
        fields.remove(set.key);
        let version = store.bump();
        if let Some(row) = store
            .sets
            .get_mut(set_name)
            .and_then(|s| s.rows.iter_mut().find(|r| r.id == id))
        {
            row.fields.extend(fields);
            row.binds.extend(binds);
            row.version = version;
        }
        self.written(req, store, set_name, id, StatusCode::OK)
    }

    fn delete(&self, req: &DvRequest, store: &mut Store, set_name: &str, id: &str) -> DvResponse {
        let Some(set) = store.sets.get(set_name) else {
            return DvResponse::not_found_segment(set_name);
        };
        let row = set.rows.iter().find(|r| r.id == id);
        if row.is_none() {
            return does_not_exist(set, id);
        }
        if let Err(resp) = Self::preconditions(req, set, row, id) {
            return resp;
        }
        if let Some(set) = store.sets.get_mut(set_name) {
            set.rows.retain(|r| r.id != id);
        }
        DvResponse::empty(StatusCode::NO_CONTENT)
    }

    /// `POST|PUT {set}({id})/{nav}/$ref` with `{"@odata.id": ...}`, `DELETE` to remove.
    fn associate(
        &self,
        req: &DvRequest,
        store: &mut Store,
        set_name: &str,
        id: &str,
        nav_ref: &str,
    ) -> DvResponse {
        let Some(set) = store.sets.get(set_name) else {
            return DvResponse::not_found_segment(set_name);
        };
        if !set.rows.iter().any(|r| r.id == id) {
            return does_not_exist(set, id);
        }
        let nav = nav_ref.trim_end_matches("/$ref").to_owned();
        let target = if req.method == Method::DELETE {
            None
        } else {
            let parsed: Option<Value> = serde_json::from_slice(&req.body).ok();
            let Some(target) = parsed
                .as_ref()
                .and_then(|v| v.get("@odata.id"))
                .and_then(Value::as_str)
                .map(str::to_owned)
            else {
                return DvResponse::error(
                    StatusCode::BAD_REQUEST,
                    "0x80048d19",
                    "An @odata.id is required to associate records.",
                );
            };
            if let Err(resp) = self.check_reference(req, &target) {
                return resp;
            }
            Some(target)
        };
        let version = store.bump();
        if let Some(row) = store
            .sets
            .get_mut(set_name)
            .and_then(|s| s.rows.iter_mut().find(|r| r.id == id))
        {
            let key = format!("{nav}@odata.id");
            match target {
                Some(t) => {
                    row.binds.insert(key, Value::String(t));
                }
                None => {
                    row.binds.remove(&key);
                }
            }
            row.version = version;
        }
        DvResponse::empty(StatusCode::NO_CONTENT)
    }

    // -- $batch ----------------------------------------------------------------------

    fn batch(&self, req: &DvRequest) -> DvResponse {
        let Some(boundary) = req.header("content-type").and_then(multipart_boundary) else {
            return DvResponse::error(
                StatusCode::BAD_REQUEST,
                "0x80060888",
                "A $batch request must have a multipart/mixed Content-Type with a boundary.",
            );
        };
        let Ok(text) = std::str::from_utf8(&req.body) else {
            return DvResponse::error(
                StatusCode::BAD_REQUEST,
                "0x80060888",
                "The $batch body is not UTF-8.",
            );
        };
        let parts = match split_multipart(text, &boundary) {
            Ok(p) => p,
            Err(msg) => return DvResponse::error(StatusCode::BAD_REQUEST, "0x80060888", &msg),
        };
        let continue_on_error = req.prefer().iter().any(|p| p == "odata.continue-on-error");
        let batch_boundary = format!("batchresponse_{}", uuid::Uuid::new_v4());
        let mut out = String::new();
        for part in parts {
            let (part_headers, content) = split_headers(part);
            let part_type = header_value(&part_headers, "content-type").unwrap_or_default();
            let failed;
            out.push_str(&format!("--{batch_boundary}\r\n"));
            if let Some(e) = declared_length_error(&part_headers, content) {
                out.push_str(&part_response(&e, None));
                failed = true;
            } else if part_type
                .to_ascii_lowercase()
                .starts_with("multipart/mixed")
            {
                let Some(cs_boundary) = multipart_boundary(&part_type) else {
                    out.push_str(&part_response(
                        &DvResponse::error(
                            StatusCode::BAD_REQUEST,
                            "0x80060888",
                            "A change set needs a boundary.",
                        ),
                        None,
                    ));
                    break;
                };
                let (text, ok) = self.changeset(req, content, &cs_boundary);
                out.push_str(&text);
                failed = !ok;
            } else {
                let content_id = header_value(&part_headers, "content-id");
                let resp = match declared_length_error(&part_headers, content) {
                    Some(e) => e,
                    None => self.batch_part(req, content, &HashMap::new()),
                };
                failed = resp.status.as_u16() >= 400;
                out.push_str(&part_response(&resp, content_id.as_deref()));
            }
            if failed && !continue_on_error {
                break;
            }
        }
        out.push_str(&format!("--{batch_boundary}--\r\n"));
        DvResponse::empty(StatusCode::OK)
            .header(
                "Content-Type",
                format!("multipart/mixed; boundary={batch_boundary}"),
            )
            .with_body(out)
    }

    /// Runs a change set atomically. Returns the text of the batch part and whether it
    /// succeeded; on failure the store is rolled back and only the failing response is
    /// returned, as Dataverse does.
    fn changeset(&self, req: &DvRequest, content: &str, boundary: &str) -> (String, bool) {
        let parts = match split_multipart(content, boundary) {
            Ok(p) => p,
            Err(msg) => {
                return (
                    part_response(
                        &DvResponse::error(StatusCode::BAD_REQUEST, "0x80060888", &msg),
                        None,
                    ),
                    false,
                )
            }
        };
        let snapshot = lock(&self.store).clone();
        let mut ids: HashMap<String, String> = HashMap::new();
        let mut responses = Vec::new();
        for part in parts {
            let (part_headers, content) = split_headers(part);
            let content_id = header_value(&part_headers, "content-id");
            let resp = match declared_length_error(&part_headers, content) {
                Some(e) => e,
                None => self.batch_part(req, content, &ids),
            };
            if resp.status.as_u16() >= 400 {
                *lock(&self.store) = snapshot;
                return (part_response(&resp, content_id.as_deref()), false);
            }
            if let (Some(cid), Some(path)) = (&content_id, &resp.entity_path) {
                ids.insert(cid.clone(), path.clone());
            }
            responses.push((resp, content_id));
        }
        let cs_boundary = format!("changesetresponse_{}", uuid::Uuid::new_v4());
        // Only the Content-Type line before the blank line: dynamics-web-api skips exactly
        // one line to find the change set's boundary.
        let mut text = format!("Content-Type: multipart/mixed; boundary={cs_boundary}\r\n\r\n");
        for (resp, cid) in responses {
            text.push_str(&format!("--{cs_boundary}\r\n"));
            text.push_str(&part_response(&resp, cid.as_deref()));
        }
        text.push_str(&format!("--{cs_boundary}--\r\n"));
        (text, true)
    }

    /// Parses one `application/http` part and runs it.
    fn batch_part(
        &self,
        batch: &DvRequest,
        content: &str,
        ids: &HashMap<String, String>,
    ) -> DvResponse {
        let content = content.trim_start_matches(['\r', '\n']);
        let (head, body) = split_headers(content);
        let Some(request_line) = head.first().map(|(line, _)| line.clone()) else {
            return DvResponse::error(
                StatusCode::BAD_REQUEST,
                "0x80060888",
                "A batch part has no request line.",
            );
        };
        // Split at the first and last space: clients leave raw spaces inside the URL.
        let (Some(first), Some(last)) = (request_line.find(' '), request_line.rfind(' ')) else {
            return DvResponse::error(
                StatusCode::BAD_REQUEST,
                "0x80060888",
                &format!("Invalid request line '{request_line}'."),
            );
        };
        if first >= last {
            return DvResponse::error(
                StatusCode::BAD_REQUEST,
                "0x80060888",
                &format!("Invalid request line '{request_line}'."),
            );
        }
        let Ok(method) = Method::from_bytes(&request_line.as_bytes()[..first]) else {
            return DvResponse::error(
                StatusCode::BAD_REQUEST,
                "0x80060888",
                &format!("Invalid request line '{request_line}'."),
            );
        };
        let url = request_line[first + 1..last].trim();
        let mut headers = HeaderMap::new();
        for (name, value) in head.iter().skip(1) {
            append_header(&mut headers, name, value);
        }
        let (api_version, resource, raw_query) = match self.resolve_part_url(batch, url, ids) {
            Ok(r) => r,
            Err(resp) => return resp,
        };
        // With a Content-Length the body is exactly that many bytes (line breaks after it
        // are tolerated), as a length-reading MIME parser takes it.
        let body = match headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
        {
            Some(declared) => match declared.trim().parse::<usize>() {
                Ok(n) if body.len() >= n && body[n..].trim_matches(['\r', '\n']).is_empty() => {
                    &body[..n]
                }
                _ => {
                    return DvResponse::error(
                        StatusCode::BAD_REQUEST,
                        "0x80060888",
                        &format!(
                        "The part's Content-Length {declared} does not match its body of {} bytes.",
                        body.len()
                    ),
                    )
                }
            },
            None => body.trim_end_matches(['\r', '\n']),
        };
        let part = DvRequest {
            method,
            api_version,
            resource,
            raw_query,
            headers,
            body: Bytes::copy_from_slice(body.as_bytes()),
        };
        self.execute(&part, Some(&batch.headers))
    }

    /// Resolves a part's URL: absolute naming this server, `/api/data/v9.x/...`, relative
    /// to the batch, or `$n/...` (a Content-ID reference).
    fn resolve_part_url(
        &self,
        batch: &DvRequest,
        url: &str,
        ids: &HashMap<String, String>,
    ) -> Result<(String, String, Option<String>), DvResponse> {
        let not_based = || {
            DvResponse::error(
                StatusCode::BAD_REQUEST,
                "0x80060888",
                &format!(
                    "The request URI '{url}' is not valid because it is not based on '{}/'.",
                    batch.base(&self.link_origin())
                ),
            )
        };
        let lower = url.to_ascii_lowercase();
        let path: String = if lower.starts_with("http://") || lower.starts_with("https://") {
            self.strip_own_origin(url).ok_or_else(not_based)?.to_owned()
        } else if let Some(reference) = url.strip_prefix('$') {
            let (cid, rest) = reference
                .split_once('/')
                .map_or((reference, ""), |(c, r)| (c, r));
            let Some(entity) = ids.get(cid) else {
                return Err(DvResponse::error(StatusCode::BAD_REQUEST, "0x80060888", &format!("Content-ID reference '${cid}' does not name an earlier request of the change set.")));
            };
            let sep = if rest.is_empty() { "" } else { "/" };
            format!("/api/data/{}/{entity}{sep}{rest}", batch.api_version)
        } else if url.starts_with('/') {
            url.to_owned()
        } else {
            format!("/api/data/{}/{url}", batch.api_version)
        };
        let (path_only, query) = match path.split_once('?') {
            Some((p, q)) => (p, Some(q.to_owned())),
            None => (path.as_str(), None),
        };
        let (version, resource) = split_api_path(path_only).ok_or_else(not_based)?;
        Ok((version, resource, query))
    }
}

// ---------------------------------------------------------------------------------------
// Helpers for rows, queries and multipart text

fn user_row(
    id: &str,
    oid: &str,
    email: &str,
    domain: &str,
    disabled: bool,
    app: Option<&str>,
) -> Map<String, Value> {
    let mut row = Map::new();
    row.insert(
        "systemuserid".into(),
        Value::String(id.to_ascii_lowercase()),
    );
    row.insert(
        "azureactivedirectoryobjectid".into(),
        Value::String(oid.to_ascii_lowercase()),
    );
    row.insert(
        "internalemailaddress".into(),
        Value::String(email.to_owned()),
    );
    row.insert("domainname".into(), Value::String(domain.to_owned()));
    row.insert("isdisabled".into(), Value::Bool(disabled));
    row.insert(
        "fullname".into(),
        Value::String(if app.is_some() {
            "# gateway".into()
        } else {
            email.to_owned()
        }),
    );
    row.insert(
        "applicationid".into(),
        app.map_or(Value::Null, |a| Value::String(a.to_owned())),
    );
    row
}

fn select_list(pairs: &[(String, String)]) -> Option<Vec<String>> {
    query_param(pairs, "$select").map(|s| {
        s.split(',')
            .map(|f| f.trim().to_owned())
            .filter(|f| !f.is_empty())
            .collect()
    })
}

fn parse_filter(
    pairs: &[(String, String)],
    entity: &str,
    types: &dyn Fn(&str) -> Option<PropType>,
) -> Result<Option<odata_filter::Expr>, DvResponse> {
    let Some(text) = query_param(pairs, "$filter") else {
        return Ok(None);
    };
    let expr = odata_filter::parse(&text)
        .map_err(|e| DvResponse::error(StatusCode::BAD_REQUEST, "0x80060888", &e.0))?;
    expr.check(entity, types)
        .map_err(|e| DvResponse::error(StatusCode::BAD_REQUEST, "0x80060888", &e.0))?;
    Ok(Some(expr))
}

/// The row's attributes with its key, as `$filter` sees them.
fn row_fields(set: &EntitySet, row: &Row) -> Map<String, Value> {
    let mut fields = row.fields.clone();
    fields.insert(set.key.to_owned(), Value::String(row.id.clone()));
    fields
}

fn row_json(set: &EntitySet, row: &Row, select: Option<&[String]>) -> Value {
    let mut out = Map::new();
    out.insert("@odata.etag".into(), Value::String(row.etag()));
    for (k, v) in &row.fields {
        if select.is_none_or(|s| s.iter().any(|f| f == k)) {
            out.insert(k.clone(), v.clone());
        }
    }
    // Dataverse always returns the primary key, selected or not.
    out.insert(set.key.to_owned(), Value::String(row.id.clone()));
    Value::Object(out)
}

fn entity_context(base: &str, set_name: &str, select: Option<&[String]>) -> String {
    let sel = select
        .map(|s| format!("({})", s.join(",")))
        .unwrap_or_default();
    format!("{base}/$metadata#{set_name}{sel}/$entity")
}

fn does_not_exist(set: &EntitySet, id: &str) -> DvResponse {
    DvResponse::error(
        StatusCode::NOT_FOUND,
        "0x80040217",
        &format!("{} With Id = {id} Does Not Exist", set.logical),
    )
}

fn bad_key(segment: &str) -> DvResponse {
    DvResponse::error(
        StatusCode::BAD_REQUEST,
        "0x80060888",
        &format!("Bad Request - Error in query syntax: invalid key in '{segment}'."),
    )
}

fn headers_json(headers: &HeaderMap) -> DvResponse {
    let mut out = Map::new();
    for name in headers.keys() {
        let values: Vec<Value> = headers
            .get_all(name)
            .iter()
            .map(|v| Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()))
            .collect();
        let value = match <[Value; 1]>::try_from(values) {
            Ok([single]) => single,
            Err(many) => Value::Array(many),
        };
        out.insert(name.as_str().to_owned(), value);
    }
    DvResponse::json(StatusCode::OK, &Value::Object(out))
}

/// `boundary` parameter of a multipart Content-Type (with or without a space after `;`,
/// quoted or not).
fn multipart_boundary(content_type: &str) -> Option<String> {
    if !content_type
        .trim_start()
        .to_ascii_lowercase()
        .starts_with("multipart/mixed")
    {
        return None;
    }
    content_type
        .split(';')
        .skip(1)
        .find_map(|param| {
            let (k, v) = param.split_once('=')?;
            k.trim()
                .eq_ignore_ascii_case("boundary")
                .then(|| v.trim().trim_matches('"').to_owned())
        })
        .filter(|b| !b.is_empty())
}

/// The parts of a multipart body (text between delimiter lines, without the line break
/// that belongs to the next delimiter). Anything before the first delimiter is preamble.
fn split_multipart<'a>(body: &'a str, boundary: &str) -> Result<Vec<&'a str>, String> {
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut current: Option<usize> = None;
    let mut offset = 0;
    let mut closed = false;
    for line in body.split_inclusive('\n') {
        let trimmed = line.trim_end();
        let is_close = trimmed == format!("{delimiter}--");
        if trimmed == delimiter || is_close {
            if let Some(start) = current.take() {
                let text = &body[start..offset];
                let text = text.strip_suffix('\n').unwrap_or(text);
                parts.push(text.strip_suffix('\r').unwrap_or(text));
            }
            if is_close {
                closed = true;
                break;
            }
            current = Some(offset + line.len());
        }
        offset += line.len();
    }
    if !closed {
        return Err(format!(
            "The multipart body has no closing delimiter '--{boundary}--'."
        ));
    }
    Ok(parts)
}

/// Splits `headers CRLF CRLF rest` into (header lines as (name, value), rest). Lines
/// without a colon (the request line of an HTTP part) come back as (line, "").
fn split_headers(text: &str) -> (Vec<(String, String)>, &str) {
    let mut headers = Vec::new();
    let mut offset = 0;
    for line in text.split_inclusive('\n') {
        offset += line.len();
        let trimmed = line.trim_end_matches(['\r', '\n']);
        if trimmed.is_empty() {
            if headers.is_empty() {
                // Leading blank lines before the headers are tolerated.
                continue;
            }
            return (headers, &text[offset..]);
        }
        match trimmed.split_once(':') {
            Some((name, value)) if !name.contains(' ') => {
                headers.push((name.trim().to_owned(), value.trim().to_owned()))
            }
            _ => headers.push((trimmed.to_owned(), String::new())),
        }
    }
    (headers, "")
}

/// A part whose MIME `Content-Length` is not the length of its content (the text before
/// the line break that belongs to the next delimiter) is refused, as a length-framing reader
/// would misread it.
fn declared_length_error(headers: &[(String, String)], content: &str) -> Option<DvResponse> {
    let declared = header_value(headers, "content-length")?;
    match declared.parse::<usize>() {
        Ok(n) if n == content.len() => None,
        _ => Some(DvResponse::error(
            StatusCode::BAD_REQUEST,
            "0x80060888",
            &format!(
                "The batch part's Content-Length {declared} does not match its {} bytes.",
                content.len()
            ),
        )),
    }
}

fn header_value(headers: &[(String, String)], name: &str) -> Option<String> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.clone())
}

/// One `application/http` response part, ending with the line break before the next
/// delimiter.
fn part_response(resp: &DvResponse, content_id: Option<&str>) -> String {
    let mut text =
        String::from("Content-Type: application/http\r\nContent-Transfer-Encoding: binary\r\n");
    if let Some(cid) = content_id {
        text.push_str(&format!("Content-ID: {cid}\r\n"));
    }
    let reason = resp.status.canonical_reason().unwrap_or("Unknown");
    text.push_str(&format!(
        "\r\nHTTP/1.1 {} {reason}\r\n",
        resp.status.as_u16()
    ));
    for (name, value) in &resp.headers {
        text.push_str(&format!("{name}: {value}\r\n"));
        if name == "OData-EntityId" {
            text.push_str(&format!("Location: {value}\r\n"));
        }
    }
    text.push_str("OData-Version: 4.0\r\n\r\n");
    text.push_str(&String::from_utf8_lossy(&resp.body));
    text.push_str("\r\n");
    text
}
