//! The configuration file: `RawConfig` is what serde reads (unknown keys refused),
//! `Config` is the validated form the rest of the gateway sees. Every error names the
//! dotted key that was wrong and never a secret's value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

use crate::access::{AccessPolicy, RawAccess};
use crate::body::MinBodyRate;
use crate::secret::Secret;
use crate::upstream::credential::{
    Credential, RawCertificate, RawManagedIdentity, RawWorkloadIdentity,
};

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config is not valid YAML: {0}")]
    Yaml(String),
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

/// Longest connection or body timeout accepted.
const MAX_CONNECTION_TIMEOUT: Duration = Duration::from_secs(24 * 60 * 60);

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

// ---------------------------------------------------------------- raw form

/// The file as written. Durations and sizes are human strings with a unit.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    /// Listeners and request limits.
    #[serde(default)]
    pub server: RawServer,
    /// Who may call: the OIDC issuers whose tokens are accepted.
    pub inbound: RawInbound,
    /// How a caller becomes a Dynamics user.
    #[serde(default)]
    pub identity: RawIdentity,
    /// The Dataverse organisation and the S2S credential.
    pub dynamics: RawDynamics,
    /// The audit log of forwarded requests.
    #[serde(default)]
    pub audit: RawAudit,
    /// Which caller may make which request; without it every verified caller may make any.
    #[serde(default)]
    pub access: Option<RawAccess>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawAudit {
    /// Log paths without query values (OData filters can hold personal data).
    pub redact_query: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetryThrottled {
    /// Retry idempotent requests that Dataverse answered 429.
    #[serde(default)]
    pub enabled: bool,
    /// Longest `Retry-After` the gateway waits out; longer ones go back to the caller.
    #[serde(default = "default_retry_max_wait")]
    pub max_wait: String,
}

fn default_retry_max_wait() -> String {
    "10s".into()
}

/// Dataverse's service-protection budget as the gateway keeps it: how many requests may be
/// in flight to one environment at once, and what waits when they are.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawBudget {
    /// Most requests in flight to Dataverse per bucket (Dataverse allows 52 per user);
    /// `x-ms-dop-hint` may lower it, never raise it.
    pub max_concurrency: usize,
    /// Most requests waiting for a slot per environment; more are answered 503 at once.
    pub max_queue: usize,
    /// Longest a request waits for a slot before it is answered 503 with `Retry-After`.
    pub queue_timeout: String,
    /// Longest a Dataverse 429's `Retry-After` closes a bucket (larger values are clamped).
    pub max_retry_after: String,
    /// Whose budget a request spends: `application` (the application user, default) or
    /// `impersonated_user` (one bucket per impersonated Dynamics user).
    pub bucket: String,
    /// The budget shared by every replica of the gateway; only under `dynamics.budget`.
    pub store: Option<RawBudgetStore>,
}

/// Where replicas keep the budget they share.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawBudgetStore {
    pub valkey: RawValkey,
}

/// A Valkey (or Redis) server holding the concurrency leases and closed buckets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawValkey {
    /// `redis://[user:password@]host:port[/db]` (or `valkey://`); may carry a password,
    /// so it is a secret.
    pub url: Secret,
    /// How many replicas share the budget: without the store each keeps `limit / replicas`.
    pub replicas: usize,
    /// How long a lease outlives a replica that stopped renewing it (killed, cut off).
    #[serde(default = "default_lease_ttl")]
    pub lease_ttl: String,
    /// Longest wait for one store command; past it the gate falls back to the local share.
    #[serde(default = "default_store_timeout")]
    pub command_timeout: String,
    /// Prefix of every key, so several gateways (or other tenants) can share one server.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

fn default_lease_ttl() -> String {
    "30s".into()
}

fn default_store_timeout() -> String {
    "250ms".into()
}

fn default_key_prefix() -> String {
    "dynamics-gateway".into()
}

impl Default for RawBudget {
    fn default() -> Self {
        Self {
            max_concurrency: 52,
            max_queue: 1024,
            queue_timeout: "10s".into(),
            max_retry_after: "5m".into(),
            bucket: "application".into(),
            store: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawServer {
    /// Address apps call.
    pub listen: String,
    /// Address of /metrics /healthz /readyz; never the app port.
    pub admin_listen: String,
    /// Base URL apps use to reach the gateway; default `http://<Host header>`.
    pub public_url: Option<String>,
    /// Take X-Forwarded-For/-Host/-Proto from the caller (only behind a trusted proxy).
    pub trust_forwarded_headers: bool,
    /// Time allowed for Dataverse to answer, counted from the end of the request body
    /// (its own limit is 2 minutes).
    pub request_timeout: String,
    /// Largest request body accepted.
    pub max_request_body: String,
    /// Largest decompressed Dataverse response body the gateway rewrites links in; past it
    /// the answer is cut off rather than held.
    pub max_decoded_response_body: String,
    /// Largest `$batch` part held to rewrite it and fix its `Content-Length` (parts that
    /// declare one; .NET clients do); a larger one is refused with 413.
    pub max_batch_part: String,
    /// Time a client has to send a request's headers (slowloris); also the deadline from
    /// accepting a connection to its first complete request head, HTTP/1 or HTTP/2.
    pub header_read_timeout: String,
    /// A connection with no request in progress is closed after this long; a request
    /// head begun meanwhile has `header_read_timeout` from its first byte.
    pub idle_timeout: String,
    /// An HTTP/2 connection that sends nothing for this long is pinged.
    pub http2_keep_alive_interval: String,
    /// An HTTP/2 ping not answered within this closes the connection.
    pub http2_keep_alive_timeout: String,
    /// A request body that sends no bytes for this long is answered 408 and not forwarded.
    pub body_read_timeout: String,
    /// Slowest average a request body may arrive at, in bytes a second over each
    /// `min_body_rate_window` of waiting for it; 0 for none.
    pub min_body_rate: u64,
    pub min_body_rate_window: String,
    /// Longest one request may take from its head to Dataverse's answer, upload included.
    pub exchange_timeout: String,
    /// Open connections beyond this are refused with 503.
    pub max_connections: usize,
    /// Open connections from one peer address beyond this are refused with 503; default a
    /// tenth of `max_connections` (at least 1); 0 turns the per-address cap off.
    pub max_connections_per_peer: Option<usize>,
    /// Requests in flight beyond this are answered 503 + Retry-After at once.
    pub max_in_flight: usize,
    /// Longest wait for in-flight requests after SIGTERM.
    pub shutdown_grace: String,
    /// Threads serving requests; default: one per core. A sidecar limited to one CPU is
    /// fastest with 1 (no hand-offs between threads).
    pub worker_threads: Option<usize>,
    /// Serve the app port over TLS (HTTPS, HTTP/2 by ALPN); default plain HTTP.
    pub tls: Option<RawTls>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    /// PEM file: the server certificate, then its intermediates.
    pub certificate: String,
    /// PEM file: the certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub private_key: String,
    /// PEM file of CA certificates; when set, clients must present a certificate they issued.
    pub client_ca: Option<String>,
    /// How often the files are checked for a new pair.
    #[serde(default = "default_tls_reload_interval")]
    pub reload_interval: String,
}

fn default_tls_reload_interval() -> String {
    "5s".into()
}

impl Default for RawServer {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            public_url: None,
            trust_forwarded_headers: false,
            request_timeout: "120s".into(),
            max_request_body: "128MiB".into(),
            max_decoded_response_body: "1GiB".into(),
            max_batch_part: "4MiB".into(),
            header_read_timeout: "10s".into(),
            idle_timeout: "60s".into(),
            http2_keep_alive_interval: "30s".into(),
            http2_keep_alive_timeout: "10s".into(),
            body_read_timeout: "30s".into(),
            min_body_rate: 240,
            min_body_rate_window: "5s".into(),
            exchange_timeout: "10m".into(),
            max_connections: 10_000,
            max_connections_per_peer: None,
            max_in_flight: 1024,
            shutdown_grace: "30s".into(),
            worker_threads: None,
            tls: None,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawInbound {
    /// Accepted token issuers; at least one.
    pub issuers: Vec<RawIssuer>,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway: String,
    /// Least time between JWKS refetches caused by unknown `kid`s, per issuer.
    #[serde(default = "default_refetch")]
    pub jwks_refetch_interval: String,
    /// Period of the background JWKS refresh.
    #[serde(default = "default_jwks_refresh")]
    pub jwks_refresh_interval: String,
    /// Verified tokens remembered so a repeated token skips the signature check; 0 turns it off.
    #[serde(default = "default_token_cache")]
    pub token_cache_max_entries: u64,
}

fn default_token_cache() -> u64 {
    10_000
}

fn default_leeway() -> String {
    "60s".into()
}
fn default_refetch() -> String {
    "30s".into()
}
fn default_jwks_refresh() -> String {
    "1h".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIssuer {
    /// Exact `iss` value.
    pub issuer: String,
    /// Accepted `aud` values; at least one.
    pub audiences: Vec<String>,
    /// Allowed signature algorithms; default RS256.
    #[serde(default)]
    pub algorithms: Option<Vec<String>>,
    /// Default `<issuer>/.well-known/openid-configuration`.
    #[serde(default)]
    pub discovery_url: Option<String>,
    /// Set to skip discovery.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// Tenants (`tid`) accepted from this issuer. Required, and non-empty, when the issuer
    /// is a `{tenantid}` template (Azure AD multi-tenant), and for every issuer when the
    /// gateway serves more than one environment or tenant.
    #[serde(default)]
    pub tenants: Option<Vec<String>>,
    /// Accepted `typ` header values, e.g. `[at+jwt]` (RFC 9068); a token whose `typ` is not
    /// listed (or absent) is refused. Default: any `typ`.
    #[serde(default)]
    pub token_types: Option<Vec<String>>,
    /// What proves a token is app-only (a service calling as itself), which
    /// `impersonation: app_only` rules need: `entra` (`idtyp: app`, or without `idtyp`:
    /// `oid` equal to `sub` and no `scp`), `never`, or `{ claim: <name>, value: <value> }`.
    /// Default: `entra` for Microsoft Entra hosts (login.microsoftonline.com, sts.windows.net, ...), else `never`.
    #[serde(default)]
    pub app_only_evidence: Option<RawAppOnlyEvidence>,
}

/// `entra` / `never`, or the claim whose value proves an app-only token.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawAppOnlyEvidence {
    Named(String),
    Claim(RawAppOnlyClaim),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAppOnlyClaim {
    /// The claim the issuer sets only in app-only tokens.
    pub claim: String,
    /// Its value in app-only tokens (a string, or one item of an array claim).
    pub value: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct RawIdentity {
    /// caller_object_id | lookup | static
    pub mode: String,
    /// The claim that identifies the caller.
    pub claim: String,
    /// For `lookup`: which systemuser attribute the claim value is compared with.
    pub lookup: Option<RawLookup>,
    /// For `static`: claim value -> systemuserid, or -> `{ systemuserid, issuer }` naming the
    /// issuer whose tokens this entry trusts (required when there are several issuers).
    #[serde(rename = "static")]
    pub static_map: Option<BTreeMap<String, RawStaticUser>>,
    /// How long a lookup answer that found a user (enabled or disabled) is remembered.
    pub cache_ttl: String,
    /// How long a lookup answer "no such user" is remembered: short, so a user Dataverse
    /// provisions later (group teams) is not locked out for `cache_ttl`.
    pub unknown_user_cache_ttl: String,
    /// Most lookup answers remembered.
    pub cache_max_entries: u64,
}

impl Default for RawIdentity {
    fn default() -> Self {
        Self {
            mode: "caller_object_id".into(),
            claim: "oid".into(),
            lookup: None,
            static_map: None,
            cache_ttl: "15m".into(),
            unknown_user_cache_ttl: "1m".into(),
            cache_max_entries: 100_000,
        }
    }
}

/// One `static` entry: a systemuserid, or a systemuserid and the issuer it trusts.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(crate) enum RawStaticUser {
    SystemUserId(String),
    Trusted(RawTrustedStaticUser),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTrustedStaticUser {
    /// The Dynamics user the caller acts as.
    pub systemuserid: String,
    /// The issuer (as written in `inbound.issuers`) whose tokens may carry this claim value.
    pub issuer: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLookup {
    /// azureactivedirectoryobjectid | internalemailaddress | domainname
    pub attribute: String,
}

/// Where requests go: one organisation written inline (`url`, `tenant_id`, ...), or a
/// list of named `environments` and a `routing` rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDynamics {
    /// Single-environment form: organisation URL, e.g. https://contoso.crm.dynamics.com
    #[serde(default)]
    pub url: Option<String>,
    /// Single-environment form: tenant that owns the organisation.
    #[serde(default)]
    pub tenant_id: Option<String>,
    /// Single-environment form: the app registration's client id.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Single-environment form: the app registration's secret (`${VAR}` from the environment).
    #[serde(default)]
    pub client_secret: Option<String>,
    /// Single-environment form: a certificate credential instead of a secret.
    #[serde(default)]
    pub certificate: Option<RawCertificate>,
    /// Single-environment form: Kubernetes workload identity federation instead of a secret.
    #[serde(default)]
    pub workload_identity: Option<RawWorkloadIdentity>,
    /// Single-environment form: the instance's managed identity instead of a secret.
    #[serde(default)]
    pub managed_identity: Option<RawManagedIdentity>,
    /// Single-environment form: default https://login.microsoftonline.com/<tenant_id>/oauth2/v2.0/token
    #[serde(default)]
    pub token_url: Option<String>,
    /// Single-environment form: default `<url>/.default`.
    #[serde(default)]
    pub scope: Option<String>,
    /// Single-environment form: caller tenants (`tid`) served; default `[tenant_id]`; `"*"`: any.
    #[serde(default)]
    pub tenants: Option<Vec<String>>,
    /// Single-environment form: see `environments[].allow_guest_tenants`.
    #[serde(default)]
    pub allow_guest_tenants: bool,
    /// Single-environment form: see `environments[].url_aliases`.
    #[serde(default)]
    pub url_aliases: Option<Vec<String>>,
    /// Single-environment form: see `environments[].forward_cookies`.
    #[serde(default)]
    pub forward_cookies: bool,
    /// Several organisations or customer tenants, each with a name.
    #[serde(default)]
    pub environments: Option<Vec<RawEnvironment>>,
    /// How a request chooses its environment when there are several.
    #[serde(default)]
    pub routing: Option<RawRouting>,
    /// Waiting out Dataverse's 429 `Retry-After` for idempotent requests; off by default.
    #[serde(default)]
    pub retry_throttled: Option<RawRetryThrottled>,
    /// The service-protection budget of each environment (`environments[].budget` overrides it).
    #[serde(default)]
    pub budget: RawBudget,
    /// Least time between two S2S token replacements caused by Dataverse answering 401
    /// (per token); 401s within it are passed on instead of requesting another token.
    #[serde(default = "default_token_replace_interval")]
    pub token_replace_interval: String,
    /// Longest wait before retrying a failed S2S token request, whatever the token
    /// endpoint's `Retry-After` asks for.
    #[serde(default = "default_token_retry_max_wait")]
    pub token_retry_max_wait: String,
}

fn default_token_replace_interval() -> String {
    "5s".into()
}

fn default_token_retry_max_wait() -> String {
    "5m".into()
}

/// One Dataverse organisation and the credential used for it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawEnvironment {
    /// Used in path-prefix routing (`/<name>/api/data/...`), logs, metrics and `/readyz`.
    pub name: String,
    /// Organisation URL, e.g. https://contoso.crm.dynamics.com
    pub url: String,
    /// Tenant that owns the organisation (in multi-tenant use: the customer's tenant).
    pub tenant_id: String,
    /// The app registration's client id (several environments may share one); workload
    /// and managed identity may leave it to `$AZURE_CLIENT_ID` / the system identity.
    #[serde(default)]
    pub client_id: Option<String>,
    /// The app registration's secret (`${VAR}` from the environment). Exactly one of
    /// `client_secret`, `certificate`, `workload_identity`, `managed_identity`.
    #[serde(default)]
    pub client_secret: Option<String>,
    /// A certificate: the token request carries a signed client assertion.
    #[serde(default)]
    pub certificate: Option<RawCertificate>,
    /// Kubernetes workload identity: the projected service-account token is the assertion.
    #[serde(default)]
    pub workload_identity: Option<RawWorkloadIdentity>,
    /// The instance metadata service's managed identity.
    #[serde(default)]
    pub managed_identity: Option<RawManagedIdentity>,
    /// Default https://login.microsoftonline.com/<tenant_id>/oauth2/v2.0/token
    #[serde(default)]
    pub token_url: Option<String>,
    /// Default `<url>/.default`.
    #[serde(default)]
    pub scope: Option<String>,
    /// Caller tenants (`tid`) this environment serves; default `[tenant_id]`; `"*"`: any.
    #[serde(default)]
    pub tenants: Option<Vec<String>>,
    /// Lets callers whose `tid` is not `tenant_id` (users of other tenants, or tokens
    /// without `tid`) act as a Dynamics user here in `lookup` or `static` mode. Off: only
    /// the organisation's own tenant's users are mapped to users.
    #[serde(default)]
    pub allow_guest_tenants: bool,
    /// Other origins the organisation answers on, e.g. `https://contoso.api.crm.dynamics.com`
    /// next to `url` `https://contoso.crm.dynamics.com`: absolute links Dataverse writes
    /// with any of them (scheme and host in any case) are pointed at the gateway like
    /// links naming `url`. Requests still go to `url` only. Default: none.
    #[serde(default)]
    pub url_aliases: Option<Vec<String>>,
    /// Pass the caller's `Cookie` to Dataverse and Dataverse's `Set-Cookie` (its
    /// server-affinity cookies) to the caller. Off by default: one gateway serves many
    /// apps, and Microsoft advises against affinity for throughput. Turn on only for an
    /// environment whose one app relies on affinity.
    #[serde(default)]
    pub forward_cookies: bool,
    /// This environment's budget, instead of `dynamics.budget`.
    #[serde(default)]
    pub budget: Option<RawBudget>,
}

impl BudgetStoreConfig {
    /// `host:port` of the store, without the URL's credentials, database or anything else.
    pub fn address(&self) -> String {
        match Url::parse(self.url.expose()) {
            Ok(url) => format!(
                "{}:{}",
                url.host_str().unwrap_or_default(),
                url.port().unwrap_or(6379)
            ),
            Err(_) => "(unreadable URL)".into(),
        }
    }
}

/// Far above Dataverse's 52 concurrent requests per user and web server.
const MAX_BUDGET_CONCURRENCY: usize = 10_000;
/// Requests waiting for a slot, per environment.
const MAX_BUDGET_QUEUE: usize = 1_000_000;

/// How a request chooses its environment.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRouting {
    /// `path_prefix`: `/<environment>/api/data/...`; `tenant`: the caller's `tid` picks the
    /// environment whose `tenants` list it.
    pub by: String,
}

// ---------------------------------------------------------------- validated form

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub inbound: InboundConfig,
    pub identity: IdentityConfig,
    pub dynamics: DynamicsConfig,
    pub audit: AuditConfig,
    pub access: AccessPolicy,
}

#[derive(Debug, Clone, Default)]
pub struct AuditConfig {
    pub redact_query: bool,
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    /// Without trailing slash.
    pub public_url: Option<String>,
    pub trust_forwarded_headers: bool,
    pub request_timeout: Duration,
    pub max_request_body: u64,
    pub max_decoded_response_body: u64,
    pub max_batch_part: u64,
    pub header_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub http2_keep_alive_interval: Duration,
    pub http2_keep_alive_timeout: Duration,
    pub body_read_timeout: Duration,
    /// `None`: `server.min_body_rate: 0`.
    pub min_body_rate: Option<MinBodyRate>,
    pub exchange_timeout: Duration,
    pub max_connections: usize,
    /// `None`: no per-address cap.
    pub max_connections_per_peer: Option<NonZeroUsize>,
    pub max_in_flight: usize,
    pub shutdown_grace: Duration,
    pub worker_threads: Option<usize>,
    pub tls: Option<TlsConfig>,
}

/// `server.tls`: the files the app port's TLS is built from (read at start and every
/// `reload_interval`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub reload_interval: Duration,
}

#[derive(Debug, Clone)]
pub struct InboundConfig {
    pub issuers: Vec<IssuerConfig>,
    pub leeway: Duration,
    pub jwks_refetch_interval: Duration,
    pub jwks_refresh_interval: Duration,
    pub token_cache_max_entries: u64,
}

#[derive(Debug, Clone)]
pub struct IssuerConfig {
    /// Exact `iss`, or a template containing `{tenantid}`.
    pub issuer: String,
    /// Accepted `tid` values; `None`: any (only for non-template issuers).
    pub tenants: Option<Vec<String>>,
    pub audiences: Vec<String>,
    pub algorithms: Vec<jsonwebtoken::Algorithm>,
    pub discovery_url: Url,
    pub jwks_uri: Option<Url>,
    /// Accepted `typ` header values (lowercase, without `application/`); `None`: any.
    pub token_types: Option<Vec<String>>,
    pub app_only_evidence: AppOnlyEvidence,
}

/// What proves that a token of an issuer is app-only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AppOnlyEvidence {
    /// No token of this issuer is app-only.
    Never,
    /// Microsoft's test: `idtyp: app`; without `idtyp`, `oid` equal to `sub` and no `scp`.
    Entra,
    /// This claim has this value (or, as an array, contains it).
    Claim { name: String, value: String },
}

/// Hosts of Microsoft Entra ID token issuers (public and sovereign clouds, External ID).
const ENTRA_HOSTS: [&str; 7] = [
    "login.microsoftonline.com",
    "login.windows.net",
    "sts.windows.net",
    "login.microsoftonline.us",
    "login.partner.microsoftonline.cn",
    "login.chinacloudapi.cn",
    "sts.chinacloudapi.cn",
];

fn is_entra_issuer(issuer: &str) -> bool {
    Url::parse(issuer.trim()).is_ok_and(|u| {
        u.host_str().is_some_and(|h| {
            ENTRA_HOSTS.iter().any(|e| h.eq_ignore_ascii_case(e))
                || h.to_ascii_lowercase().ends_with(".ciamlogin.com")
        })
    })
}

#[derive(Debug, Clone)]
pub struct IdentityConfig {
    pub mode: IdentityMode,
    pub claim: String,
    pub cache_ttl: Duration,
    pub unknown_user_cache_ttl: Duration,
    pub cache_max_entries: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityMode {
    CallerObjectId,
    Lookup(LookupAttribute),
    Static(Vec<StaticUser>),
}

/// One `static` entry: a claim value, from one issuer, acts as one Dynamics user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticUser {
    /// The issuer as written in `inbound.issuers` (a `{tenantid}` template included).
    pub issuer: String,
    pub claim_value: String,
    pub systemuserid: uuid::Uuid,
}

/// The systemuser attributes a lookup may compare with, and how their literal is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupAttribute {
    AzureActiveDirectoryObjectId,
    InternalEmailAddress,
    DomainName,
}

impl LookupAttribute {
    pub fn name(self) -> &'static str {
        match self {
            Self::AzureActiveDirectoryObjectId => "azureactivedirectoryobjectid",
            Self::InternalEmailAddress => "internalemailaddress",
            Self::DomainName => "domainname",
        }
    }
}

/// Where requests go.
#[derive(Debug, Clone)]
pub struct DynamicsConfig {
    pub environments: Vec<EnvironmentConfig>,
    pub routing: Routing,
    /// `Some(max_wait)` when 429s of idempotent requests are retried.
    pub retry_throttled: Option<Duration>,
    /// Least time between two 401-caused token replacements of one token source.
    pub token_replace_interval: Duration,
    /// Longest wait before retrying a failed token request.
    pub token_retry_max_wait: Duration,
    /// The budget store shared by the replicas; `None`: each process keeps its own.
    pub budget_store: Option<BudgetStoreConfig>,
}

/// The validated `dynamics.budget.store.valkey`.
#[derive(Debug, Clone)]
pub struct BudgetStoreConfig {
    pub url: Secret,
    pub replicas: usize,
    pub lease_ttl: Duration,
    pub command_timeout: Duration,
    pub key_prefix: String,
}

/// How a request chooses its environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Routing {
    /// One environment serves every request.
    Single,
    /// `/<environment>/api/data/...`
    PathPrefix,
    /// The caller's `tid` picks the environment whose `tenants` list it.
    Tenant,
}

/// One Dataverse organisation.
#[derive(Debug, Clone)]
pub struct EnvironmentConfig {
    pub name: String,
    /// Origin of the organisation.
    pub url: Url,
    pub tenant_id: String,
    /// Empty for a managed identity without a configured client id (the system identity).
    pub client_id: String,
    pub credential: Credential,
    pub token_url: Url,
    pub scope: String,
    /// Caller tenants served; `None`: any.
    pub tenants: Option<Vec<String>>,
    /// Callers of other tenants (or without `tid`) may be mapped to users here.
    pub allow_guest_tenants: bool,
    /// The organisation's other origins (`scheme://host[:port]`, lowercase host): links
    /// naming them are rewritten to the gateway like links naming `url`.
    pub url_aliases: Vec<String>,
    /// The caller's `Cookie` and Dataverse's `Set-Cookie` pass (off: both are removed).
    pub forward_cookies: bool,
    /// The service-protection budget the gateway keeps for this environment.
    pub budget: BudgetConfig,
}

/// Whose service-protection budget a request spends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetBucket {
    /// One bucket per environment: every request counts against the application user.
    Application,
    /// One bucket per impersonated Dynamics user (app-only requests share the application's).
    ImpersonatedUser,
}

/// The validated `dynamics.budget`.
#[derive(Debug, Clone)]
pub struct BudgetConfig {
    pub max_concurrency: usize,
    pub max_queue: usize,
    pub queue_timeout: Duration,
    pub max_retry_after: Duration,
    pub bucket: BudgetBucket,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            max_concurrency: 52,
            max_queue: 1024,
            queue_timeout: Duration::from_secs(10),
            max_retry_after: Duration::from_secs(300),
            bucket: BudgetBucket::Application,
        }
    }
}

fn budget(key: &str, raw: RawBudget) -> Result<BudgetConfig, ConfigError> {
    if raw.store.is_some() && key != "dynamics.budget" {
        return Err(invalid(
            format!("{key}.store"),
            "the replicas share one store for every environment: set it under dynamics.budget.store",
        ));
    }
    if !(1..=MAX_BUDGET_CONCURRENCY).contains(&raw.max_concurrency) {
        return Err(invalid(
            format!("{key}.max_concurrency"),
            format!("must be 1 to {MAX_BUDGET_CONCURRENCY} (Dataverse allows 52 concurrent requests per user and web server)"),
        ));
    }
    if raw.max_queue > MAX_BUDGET_QUEUE {
        return Err(invalid(
            format!("{key}.max_queue"),
            format!("must be at most {MAX_BUDGET_QUEUE}: every queued request holds a connection and its memory"),
        ));
    }
    let bucket = match raw.bucket.as_str() {
        "application" => BudgetBucket::Application,
        "impersonated_user" => BudgetBucket::ImpersonatedUser,
        other => {
            return Err(invalid(
                format!("{key}.bucket"),
                format!("\"{other}\" is not a bucket; use application or impersonated_user"),
            ))
        }
    };
    let queue_timeout = parse_duration(&format!("{key}.queue_timeout"), &raw.queue_timeout)?;
    let max_retry_after = parse_duration(&format!("{key}.max_retry_after"), &raw.max_retry_after)?;
    // Deadlines are computed as now + value.
    for (name, value) in [
        ("queue_timeout", queue_timeout),
        ("max_retry_after", max_retry_after),
    ] {
        if value > MAX_CONNECTION_TIMEOUT {
            return Err(invalid(format!("{key}.{name}"), "must be at most 24h"));
        }
    }
    if max_retry_after < Duration::from_secs(1) {
        return Err(invalid(
            format!("{key}.max_retry_after"),
            "must be at least 1s, or a 429 would never close the bucket",
        ));
    }
    Ok(BudgetConfig {
        max_concurrency: raw.max_concurrency,
        max_queue: raw.max_queue,
        queue_timeout,
        max_retry_after,
        bucket,
    })
}

impl EnvironmentConfig {
    /// `scheme://host[:port]` of the organisation, no trailing slash.
    pub fn origin(&self) -> String {
        self.url.origin().ascii_serialization()
    }

    /// The URL a customer's administrator opens to grant the app admin consent in this
    /// environment's tenant (multi-tenant onboarding). Same authority as the token endpoint,
    /// so sovereign clouds work too.
    pub fn admin_consent_url(&self, redirect_uri: Option<&str>) -> String {
        let mut url = self.token_url.clone();
        url.set_path(&format!("/{}/adminconsent", self.tenant_id.trim()));
        url.set_query(None);
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("client_id", &self.client_id);
            if let Some(r) = redirect_uri {
                query.append_pair("redirect_uri", r);
            }
        }
        url.to_string()
    }

    /// Whether a caller of tenant `tid` may use this environment.
    pub(crate) fn serves_tenant(&self, tid: Option<&str>) -> bool {
        match (&self.tenants, tid) {
            (None, _) => true,
            (Some(list), Some(tid)) => list.iter().any(|t| t.eq_ignore_ascii_case(tid)),
            (Some(_), None) => false,
        }
    }
}

// ---------------------------------------------------------------- loading

impl Config {
    /// Reads, substitutes `${VAR}` from the environment, and validates.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_yaml(&text, &|name| std::env::var(name).ok())
    }

    /// Parses YAML text; `env` resolves `${VAR}` references.
    pub fn from_yaml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigError> {
        let mut value: serde_norway::Value =
            serde_norway::from_str(text).map_err(|e| ConfigError::Yaml(e.to_string()))?;
        substitute_env(&mut value, "", env)?;
        let raw: RawConfig = serde_path_to_error::deserialize(value).map_err(|e| {
            let key = e.path().to_string();
            invalid(
                if key == "." { "config".into() } else { key },
                e.into_inner().to_string(),
            )
        })?;
        Config::try_from(raw)
    }
}

/// Replaces `${VAR}` inside every string, reporting the key of an unset variable.
fn substitute_env(
    value: &mut serde_norway::Value,
    key: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), ConfigError> {
    use serde_norway::Value;
    match value {
        Value::String(s) if s.contains("${") => {
            let mut out = String::with_capacity(s.len());
            let mut rest = s.as_str();
            while let Some(start) = rest.find("${") {
                out.push_str(&rest[..start]);
                let after = &rest[start + 2..];
                let end = after
                    .find('}')
                    .ok_or_else(|| invalid(key, "unterminated ${...} reference"))?;
                let name = &after[..end];
                let val = env(name).ok_or_else(|| {
                    invalid(key, format!("environment variable {name} is not set"))
                })?;
                out.push_str(&val);
                rest = &after[end + 1..];
            }
            out.push_str(rest);
            *s = out;
        }
        Value::Mapping(map) => {
            for (k, v) in map.iter_mut() {
                let name = k.as_str().unwrap_or("?");
                let child = if key.is_empty() {
                    name.to_string()
                } else {
                    format!("{key}.{name}")
                };
                substitute_env(v, &child, env)?;
            }
        }
        Value::Sequence(seq) => {
            for (i, v) in seq.iter_mut().enumerate() {
                substitute_env(v, &format!("{key}[{i}]"), env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// The placeholder of a multi-tenant issuer template.
pub(crate) const TENANT_PLACEHOLDER: &str = "{tenantid}";

/// Parses a duration that must carry a unit (`60s`, `15m`, `1h30m`).
fn tls_config(t: RawTls) -> Result<TlsConfig, ConfigError> {
    let reload_interval = parse_duration("server.tls.reload_interval", &t.reload_interval)?;
    if reload_interval.is_zero() {
        return Err(invalid(
            "server.tls.reload_interval",
            "must be more than 0s",
        ));
    }
    let path = |key: &str, text: String| {
        if text.trim().is_empty() {
            Err(invalid(key, "must name a PEM file"))
        } else {
            Ok(PathBuf::from(text))
        }
    };
    Ok(TlsConfig {
        certificate: path("server.tls.certificate", t.certificate)?,
        private_key: path("server.tls.private_key", t.private_key)?,
        client_ca: t
            .client_ca
            .map(|ca| path("server.tls.client_ca", ca))
            .transpose()?,
        reload_interval,
    })
}

pub(crate) fn parse_duration(key: &str, text: &str) -> Result<Duration, ConfigError> {
    let t = text.trim();
    if !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()) {
        return Err(invalid(
            key,
            format!("\"{t}\" has no unit; use e.g. \"{t}s\""),
        ));
    }
    humantime::parse_duration(t).map_err(|e| {
        invalid(
            key,
            format!("\"{t}\" is not a duration ({e}); use e.g. \"30s\", \"15m\""),
        )
    })
}

/// Parses a size that must carry a unit (`512KiB`, `128MiB`, `1GB`).
pub(crate) fn parse_size(key: &str, text: &str) -> Result<u64, ConfigError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let number: u64 = digits
        .parse()
        .map_err(|_| invalid(key, format!("\"{t}\" is not a size; use e.g. \"128MiB\"")))?;
    let factor: u64 = match unit.trim() {
        "B" => 1,
        "KB" | "kB" => 1_000,
        "KiB" => 1 << 10,
        "MB" => 1_000_000,
        "MiB" => 1 << 20,
        "GB" => 1_000_000_000,
        "GiB" => 1 << 30,
        "" => {
            return Err(invalid(
                key,
                format!("\"{t}\" has no unit; use e.g. \"{t}MiB\""),
            ))
        }
        other => {
            return Err(invalid(
                key,
                format!("unknown size unit \"{other}\"; use B, KiB, MiB, GiB, KB, MB or GB"),
            ))
        }
    };
    number
        .checked_mul(factor)
        .ok_or_else(|| invalid(key, format!("\"{t}\" is too large")))
}

/// Parses a URL; `http://` is only allowed for loopback hosts (tests and the demo).
fn parse_secure_url(key: &str, text: &str) -> Result<Url, ConfigError> {
    let url = Url::parse(text.trim())
        .map_err(|e| invalid(key, format!("\"{text}\" is not an absolute URL ({e})")))?;
    match url.scheme() {
        "https" => {}
        "http" if is_loopback(&url) => {}
        "http" => {
            return Err(invalid(
                key,
                format!("\"{text}\" uses http://; only https:// is allowed (http:// only for loopback hosts)"),
            ))
        }
        other => return Err(invalid(key, format!("unsupported URL scheme \"{other}\"; use https://"))),
    }
    if url.host().is_none() {
        return Err(invalid(key, format!("\"{text}\" has no host")));
    }
    Ok(url)
}

/// The validated `url_aliases` of an environment: each an origin only (`https://`, or
/// `http://` for loopback), none equal to `url` or to another alias.
fn url_aliases(key: &str, url: &Url, raw: Vec<String>) -> Result<Vec<String>, ConfigError> {
    let mut aliases: Vec<String> = Vec::with_capacity(raw.len());
    let primary = url.origin().ascii_serialization();
    for (i, text) in raw.iter().enumerate() {
        let alias_key = format!("{key}.url_aliases[{i}]");
        let alias = parse_secure_url(&alias_key, text)?;
        if alias.path() != "/" || alias.query().is_some() || alias.fragment().is_some() {
            return Err(invalid(
                alias_key,
                format!(
                    "\"{text}\" must be an origin only, e.g. https://contoso.api.crm.dynamics.com"
                ),
            ));
        }
        let origin = alias.origin().ascii_serialization();
        if origin == primary || aliases.contains(&origin) {
            return Err(invalid(
                alias_key,
                format!("\"{text}\" is already the environment's url or listed before"),
            ));
        }
        aliases.push(origin);
    }
    Ok(aliases)
}

/// True for 127.0.0.0/8, ::1 and `localhost`.
pub(crate) fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

fn parse_addr(key: &str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.trim().parse().map_err(|_| {
        invalid(
            key,
            format!("\"{text}\" is not an address; use e.g. \"0.0.0.0:8080\""),
        )
    })
}

fn parse_algorithm(key: &str, text: &str) -> Result<jsonwebtoken::Algorithm, ConfigError> {
    use jsonwebtoken::Algorithm::*;
    // Only asymmetric algorithms: an issuer's keys are public, so an HMAC algorithm
    // would let anyone holding the public key forge tokens.
    Ok(match text.trim() {
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        "EdDSA" => EdDSA,
        other => {
            return Err(invalid(
                key,
                format!("algorithm \"{other}\" is not allowed; use RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA"),
            ))
        }
    })
}

impl TryFrom<RawConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: RawConfig) -> Result<Self, Self::Error> {
        let s = raw.server;
        let public_url = match s.public_url {
            Some(u) => {
                let url = Url::parse(u.trim()).map_err(|e| {
                    invalid(
                        "server.public_url",
                        format!("\"{u}\" is not an absolute URL ({e})"),
                    )
                })?;
                if !matches!(url.scheme(), "http" | "https") {
                    return Err(invalid(
                        "server.public_url",
                        "must be an http:// or https:// URL",
                    ));
                }
                if url.query().is_some() || url.fragment().is_some() {
                    return Err(invalid(
                        "server.public_url",
                        "must not have a query or fragment",
                    ));
                }
                Some(url.as_str().trim_end_matches('/').to_string())
            }
            None => None,
        };
        let server = ServerConfig {
            listen: parse_addr("server.listen", &s.listen)?,
            admin_listen: parse_addr("server.admin_listen", &s.admin_listen)?,
            public_url,
            trust_forwarded_headers: s.trust_forwarded_headers,
            request_timeout: parse_duration("server.request_timeout", &s.request_timeout)?,
            max_request_body: parse_size("server.max_request_body", &s.max_request_body)?,
            max_decoded_response_body: parse_size(
                "server.max_decoded_response_body",
                &s.max_decoded_response_body,
            )?,
            max_batch_part: parse_size("server.max_batch_part", &s.max_batch_part)?,
            header_read_timeout: parse_duration(
                "server.header_read_timeout",
                &s.header_read_timeout,
            )?,
            idle_timeout: parse_duration("server.idle_timeout", &s.idle_timeout)?,
            http2_keep_alive_interval: parse_duration(
                "server.http2_keep_alive_interval",
                &s.http2_keep_alive_interval,
            )?,
            http2_keep_alive_timeout: parse_duration(
                "server.http2_keep_alive_timeout",
                &s.http2_keep_alive_timeout,
            )?,
            body_read_timeout: parse_duration("server.body_read_timeout", &s.body_read_timeout)?,
            min_body_rate: match s.min_body_rate {
                0 => None,
                bytes_per_second => Some(MinBodyRate {
                    bytes_per_second,
                    window: parse_duration(
                        "server.min_body_rate_window",
                        &s.min_body_rate_window,
                    )?,
                }),
            },
            exchange_timeout: parse_duration("server.exchange_timeout", &s.exchange_timeout)?,
            max_connections: s.max_connections,
            max_connections_per_peer: match s.max_connections_per_peer {
                None => NonZeroUsize::new((s.max_connections / 10).max(1)),
                Some(n) if n > s.max_connections => {
                    return Err(invalid(
                        "server.max_connections_per_peer",
                        format!(
                            "{n} is more than server.max_connections ({}); use 0 for no per-address cap",
                            s.max_connections
                        ),
                    ))
                }
                Some(n) => NonZeroUsize::new(n),
            },
            max_in_flight: s.max_in_flight,
            shutdown_grace: parse_duration("server.shutdown_grace", &s.shutdown_grace)?,
            worker_threads: match s.worker_threads {
                Some(0) => return Err(invalid("server.worker_threads", "must be at least 1")),
                other => other,
            },
            tls: match s.tls {
                None => None,
                Some(t) => Some(tls_config(t)?),
            },
        };
        if server.max_connections == 0 {
            return Err(invalid("server.max_connections", "must be at least 1"));
        }
        if server.max_in_flight == 0 {
            return Err(invalid("server.max_in_flight", "must be at least 1"));
        }
        if server.max_batch_part < 64 * 1024 {
            return Err(invalid(
                "server.max_batch_part",
                "must be at least 64KiB (a part's headers and request line are held whole)",
            ));
        }
        for (key, value) in [
            ("server.header_read_timeout", server.header_read_timeout),
            ("server.idle_timeout", server.idle_timeout),
            (
                "server.http2_keep_alive_interval",
                server.http2_keep_alive_interval,
            ),
            (
                "server.http2_keep_alive_timeout",
                server.http2_keep_alive_timeout,
            ),
            ("server.body_read_timeout", server.body_read_timeout),
            ("server.exchange_timeout", server.exchange_timeout),
        ]
        .into_iter()
        .chain(
            server
                .min_body_rate
                .map(|rate| ("server.min_body_rate_window", rate.window)),
        ) {
            if value.is_zero() {
                return Err(invalid(key, "must be more than 0s"));
            }
            // Deadlines are computed as now + value; a day is far beyond any sane limit.
            if value > MAX_CONNECTION_TIMEOUT {
                return Err(invalid(key, "must be at most 24h"));
            }
        }
        if server.exchange_timeout < server.request_timeout {
            return Err(invalid(
                "server.exchange_timeout",
                "must be at least server.request_timeout, or Dataverse's answer would be cut short",
            ));
        }
        if server.listen == server.admin_listen {
            return Err(invalid(
                "server.admin_listen",
                "must differ from server.listen",
            ));
        }

        let i = raw.inbound;
        if i.issuers.is_empty() {
            return Err(invalid(
                "inbound.issuers",
                "at least one issuer is required",
            ));
        }
        let mut issuers = Vec::with_capacity(i.issuers.len());
        for (n, ri) in i.issuers.into_iter().enumerate() {
            let key = format!("inbound.issuers[{n}]");
            parse_secure_url(&format!("{key}.issuer"), &ri.issuer)?;
            if ri.audiences.is_empty() || ri.audiences.iter().any(|a| a.trim().is_empty()) {
                return Err(invalid(
                    format!("{key}.audiences"),
                    "at least one non-empty audience is required",
                ));
            }
            let algorithms = match ri.algorithms {
                None => vec![jsonwebtoken::Algorithm::RS256],
                Some(list) if list.is_empty() => {
                    return Err(invalid(
                        format!("{key}.algorithms"),
                        "must list at least one algorithm",
                    ))
                }
                Some(list) => list
                    .iter()
                    .map(|a| parse_algorithm(&format!("{key}.algorithms"), a))
                    .collect::<Result<_, _>>()?,
            };
            let template = ri.issuer.contains(TENANT_PLACEHOLDER);
            let tenants = match ri.tenants {
                Some(list) if list.is_empty() || list.iter().any(|t| t.trim().is_empty() || t == "*") => {
                    return Err(invalid(
                        format!("{key}.tenants"),
                        "must list tenant ids; an empty list or \"*\" is refused, not read as \"any tenant\"",
                    ))
                }
                Some(list) => Some(list),
                None if template => {
                    return Err(invalid(
                        format!("{key}.tenants"),
                        "an issuer with {tenantid} needs the list of accepted tenant ids",
                    ))
                }
                None => None,
            };
            let discovery_url = match ri.discovery_url {
                Some(d) => parse_secure_url(&format!("{key}.discovery_url"), &d)?,
                None => {
                    // Azure AD's multi-tenant discovery document lives under "organizations"
                    // and names the issuer as the {tenantid} template.
                    let issuer = ri.issuer.replace(TENANT_PLACEHOLDER, "organizations");
                    let base = issuer.trim().trim_end_matches('/');
                    parse_secure_url(
                        &format!("{key}.issuer"),
                        &format!("{base}/.well-known/openid-configuration"),
                    )?
                }
            };
            let jwks_uri = ri
                .jwks_uri
                .map(|j| parse_secure_url(&format!("{key}.jwks_uri"), &j))
                .transpose()?;
            if issuers.iter().any(|x: &IssuerConfig| x.issuer == ri.issuer) {
                return Err(invalid(
                    format!("{key}.issuer"),
                    format!("issuer \"{}\" is listed twice", ri.issuer),
                ));
            }
            let token_types = match ri.token_types {
                None => None,
                Some(list) if list.is_empty() || list.iter().any(|t| t.trim().is_empty()) => {
                    return Err(invalid(
                        format!("{key}.token_types"),
                        "must list token types, e.g. [at+jwt]; leave it out to accept any typ",
                    ))
                }
                Some(list) => Some(list.iter().map(|t| token_type(t)).collect()),
            };
            let app_only_evidence = app_only_evidence(
                &format!("{key}.app_only_evidence"),
                &ri.issuer,
                ri.app_only_evidence,
            )?;
            issuers.push(IssuerConfig {
                issuer: ri.issuer,
                tenants,
                audiences: ri.audiences,
                algorithms,
                discovery_url,
                jwks_uri,
                token_types,
                app_only_evidence,
            });
        }
        let inbound = InboundConfig {
            issuers,
            leeway: parse_duration("inbound.leeway", &i.leeway)?,
            jwks_refetch_interval: parse_duration(
                "inbound.jwks_refetch_interval",
                &i.jwks_refetch_interval,
            )?,
            jwks_refresh_interval: parse_duration(
                "inbound.jwks_refresh_interval",
                &i.jwks_refresh_interval,
            )?,
            token_cache_max_entries: i.token_cache_max_entries,
        };
        if inbound.jwks_refresh_interval < Duration::from_secs(1) {
            return Err(invalid(
                "inbound.jwks_refresh_interval",
                "must be at least 1s",
            ));
        }

        let id = raw.identity;
        if id.claim.trim().is_empty() {
            return Err(invalid("identity.claim", "must name a claim, e.g. \"oid\""));
        }
        let mode = match id.mode.as_str() {
            "caller_object_id" => {
                reject_extra(id.lookup.is_some(), "identity.lookup", "caller_object_id")?;
                reject_extra(
                    id.static_map.is_some(),
                    "identity.static",
                    "caller_object_id",
                )?;
                IdentityMode::CallerObjectId
            }
            "lookup" => {
                reject_extra(id.static_map.is_some(), "identity.static", "lookup")?;
                if id.claim.trim().eq_ignore_ascii_case("email") {
                    return Err(invalid(
                        "identity.claim",
                        "email cannot identify a caller: in Microsoft Entra ID it is mutable and unverified, so anyone able to set it could act as that user; use oid with attribute azureactivedirectoryobjectid",
                    ));
                }
                let attr = id
                    .lookup
                    .as_ref()
                    .map(|l| l.attribute.as_str())
                    .unwrap_or("azureactivedirectoryobjectid");
                IdentityMode::Lookup(match attr {
                    "azureactivedirectoryobjectid" => LookupAttribute::AzureActiveDirectoryObjectId,
                    "internalemailaddress" => LookupAttribute::InternalEmailAddress,
                    "domainname" => LookupAttribute::DomainName,
                    other => {
                        return Err(invalid(
                            "identity.lookup.attribute",
                            format!("\"{other}\" is not supported; use azureactivedirectoryobjectid, internalemailaddress or domainname"),
                        ))
                    }
                })
            }
            "static" => {
                reject_extra(id.lookup.is_some(), "identity.lookup", "static")?;
                let map = id.static_map.unwrap_or_default();
                if map.is_empty() {
                    return Err(invalid(
                        "identity.static",
                        "static mode needs a map of claim value -> systemuserid",
                    ));
                }
                let mut users = Vec::with_capacity(map.len());
                for (k, v) in map {
                    users.push(static_user(&inbound.issuers, k, v)?);
                }
                IdentityMode::Static(users)
            }
            other => {
                return Err(invalid(
                    "identity.mode",
                    format!("\"{other}\" is not a mode; use caller_object_id, lookup or static"),
                ))
            }
        };
        let identity = IdentityConfig {
            mode,
            claim: id.claim,
            cache_ttl: parse_duration("identity.cache_ttl", &id.cache_ttl)?,
            unknown_user_cache_ttl: parse_duration(
                "identity.unknown_user_cache_ttl",
                &id.unknown_user_cache_ttl,
            )?,
            cache_max_entries: id.cache_max_entries,
        };
        if identity.cache_max_entries == 0 {
            return Err(invalid("identity.cache_max_entries", "must be at least 1"));
        }

        let dynamics = dynamics_config(raw.dynamics)?;
        issuers_bound_to_tenants(&inbound, &dynamics)?;
        if identity.mode == IdentityMode::CallerObjectId {
            if let Some(n) = dynamics
                .environments
                .iter()
                .position(|e| e.allow_guest_tenants)
            {
                let key = match dynamics.environments.as_slice() {
                    [only] if only.name == "default" => "dynamics.allow_guest_tenants".to_string(),
                    _ => format!("dynamics.environments[{n}].allow_guest_tenants"),
                };
                return Err(invalid(
                    key,
                    "has no effect in identity.mode caller_object_id: an object id issued by another tenant names nobody in this organisation; remove it, or use lookup or static mode",
                ));
            }
        }

        Ok(Config {
            server,
            inbound,
            identity,
            dynamics,
            audit: AuditConfig {
                redact_query: raw.audit.redact_query,
            },
            access: match raw.access {
                Some(a) => AccessPolicy::from_raw(a, "access")
                    .map_err(|(key, message)| invalid(key, message))?,
                None => AccessPolicy::allow_all(),
            },
        })
    }
}

/// Exactly one credential kind per environment.
fn credential(
    key: &str,
    secret: Option<String>,
    certificate: Option<RawCertificate>,
    workload_identity: Option<RawWorkloadIdentity>,
    managed_identity: Option<RawManagedIdentity>,
) -> Result<Credential, ConfigError> {
    let given = [
        secret.is_some(),
        certificate.is_some(),
        workload_identity.is_some(),
        managed_identity.is_some(),
    ]
    .iter()
    .filter(|g| **g)
    .count();
    if given != 1 {
        return Err(invalid(
            key,
            "needs exactly one credential: client_secret, certificate, workload_identity or managed_identity",
        ));
    }
    let from = |r: Result<Credential, (String, String)>| r.map_err(|(k, m)| invalid(k, m));
    if let Some(secret) = secret {
        if secret.trim().is_empty() {
            return Err(invalid(
                format!("{key}.client_secret"),
                "is empty; set it, e.g. client_secret: ${DYNAMICS_CLIENT_SECRET}",
            ));
        }
        return from(Credential::client_secret(
            Secret::new(secret),
            &format!("{key}.client_secret"),
        ));
    }
    if let Some(raw) = certificate {
        return from(Credential::certificate(raw, &format!("{key}.certificate")));
    }
    if let Some(raw) = workload_identity {
        return from(Credential::workload_identity(
            raw,
            &format!("{key}.workload_identity"),
        ));
    }
    match managed_identity {
        Some(raw) => from(Credential::managed_identity(
            raw,
            &format!("{key}.managed_identity"),
        )),
        None => Err(invalid(key, "needs a credential")),
    }
}

/// Environment names appear in URLs and metric labels: keep them plain, and clear of the
/// label value of requests refused before routing.
fn is_plain_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name != "api"
        && name != crate::metrics::NO_ENVIRONMENT
}

fn dynamics_config(d: RawDynamics) -> Result<DynamicsConfig, ConfigError> {
    let single = d.url.is_some()
        || d.tenant_id.is_some()
        || d.client_id.is_some()
        || d.client_secret.is_some()
        || d.certificate.is_some()
        || d.workload_identity.is_some()
        || d.managed_identity.is_some()
        || d.token_url.is_some()
        || d.scope.is_some()
        || d.tenants.is_some()
        || d.allow_guest_tenants
        || d.url_aliases.is_some()
        || d.forward_cookies;
    let (raw_envs, in_list) = match d.environments {
        Some(_) if single => {
            return Err(invalid(
                "dynamics",
                "write either url/tenant_id/client_id/client_secret for one organisation, or environments: [...], not both",
            ))
        }
        Some(list) if list.is_empty() => return Err(invalid("dynamics.environments", "lists no environment")),
        Some(list) => (list, true),
        None => {
            let required = |v: Option<String>, key: &str| v.ok_or_else(|| invalid(format!("dynamics.{key}"), "is required"));
            let env = RawEnvironment {
                name: "default".into(),
                url: required(d.url, "url")?,
                tenant_id: required(d.tenant_id, "tenant_id")?,
                client_id: d.client_id,
                client_secret: d.client_secret,
                certificate: d.certificate,
                workload_identity: d.workload_identity,
                managed_identity: d.managed_identity,
                token_url: d.token_url,
                scope: d.scope,
                tenants: d.tenants,
                allow_guest_tenants: d.allow_guest_tenants,
                url_aliases: d.url_aliases,
                forward_cookies: d.forward_cookies,
                budget: None,
            };
            (vec![env], false)
        }
    };
    let mut environments: Vec<EnvironmentConfig> = Vec::with_capacity(raw_envs.len());
    for (i, e) in raw_envs.into_iter().enumerate() {
        let key = if in_list {
            format!("dynamics.environments[{i}]")
        } else {
            "dynamics".to_string()
        };
        if !is_plain_name(&e.name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("\"{}\" is not a valid name; use lowercase letters, digits, - and _ (not \"api\" or \"none\")", e.name),
            ));
        }
        if environments.iter().any(|x| x.name == e.name) {
            return Err(invalid(
                format!("{key}.name"),
                format!("environment \"{}\" is listed twice", e.name),
            ));
        }
        let url = parse_secure_url(&format!("{key}.url"), &e.url)?;
        if url.path() != "/" || url.query().is_some() {
            return Err(invalid(
                format!("{key}.url"),
                format!("\"{}\" must be the organisation's origin only, e.g. https://contoso.crm.dynamics.com", e.url),
            ));
        }
        if e.tenant_id.trim().is_empty() {
            return Err(invalid(format!("{key}.tenant_id"), "is required"));
        }
        let url_aliases = url_aliases(&key, &url, e.url_aliases.unwrap_or_default())?;
        let credential = credential(
            &key,
            e.client_secret,
            e.certificate,
            e.workload_identity,
            e.managed_identity,
        )?;
        let client_id = match e
            .client_id
            .or_else(|| credential.default_client_id().map(str::to_string))
        {
            Some(id) if !id.trim().is_empty() => id,
            _ if matches!(credential, Credential::ManagedIdentity(_)) => String::new(),
            _ => return Err(invalid(format!("{key}.client_id"), "is required")),
        };
        let token_url = match e.token_url {
            Some(t) => parse_secure_url(&format!("{key}.token_url"), &t)?,
            None => match credential.default_token_url(Some(e.tenant_id.trim())) {
                Some(url) => url,
                None => parse_secure_url(
                    &format!("{key}.tenant_id"),
                    &format!(
                        "https://login.microsoftonline.com/{}/oauth2/v2.0/token",
                        e.tenant_id.trim()
                    ),
                )?,
            },
        };
        let origin = url.origin().ascii_serialization();
        let tenants = match e.tenants {
            None => Some(vec![e.tenant_id.trim().to_string()]),
            Some(list) if list.is_empty() => {
                return Err(invalid(
                    format!("{key}.tenants"),
                    "is empty; list caller tenant ids, or [\"*\"] for any",
                ))
            }
            Some(list) if list.iter().any(|t| t == "*") => None,
            Some(list) => Some(list),
        };
        let budget = match e.budget {
            Some(raw) => budget(&format!("{key}.budget"), raw)?,
            None => budget("dynamics.budget", d.budget.clone())?,
        };
        environments.push(EnvironmentConfig {
            budget,
            name: e.name,
            scope: e.scope.unwrap_or_else(|| format!("{origin}/.default")),
            url,
            tenant_id: e.tenant_id,
            client_id,
            credential,
            token_url,
            tenants,
            allow_guest_tenants: e.allow_guest_tenants,
            url_aliases,
            forward_cookies: e.forward_cookies,
        });
    }
    let routing = match (d.routing, environments.len()) {
        (None, 1) => Routing::Single,
        (None, _) => {
            return Err(invalid(
                "dynamics.routing",
                "several environments need a routing rule: routing: { by: path_prefix } or { by: tenant }",
            ))
        }
        (Some(r), _) => match r.by.as_str() {
            "path_prefix" => Routing::PathPrefix,
            "tenant" => Routing::Tenant,
            other => {
                return Err(invalid(
                    "dynamics.routing.by",
                    format!("\"{other}\" is not a routing rule; use path_prefix or tenant"),
                ))
            }
        },
    };
    if routing == Routing::Tenant {
        // Each caller tenant must lead to exactly one environment.
        let mut seen: BTreeMap<String, &str> = BTreeMap::new();
        for env in &environments {
            let Some(tenants) = &env.tenants else {
                return Err(invalid(
                    format!("dynamics.environments[{}].tenants", env.name),
                    "routing by tenant needs explicit tenant ids, not \"*\"",
                ));
            };
            for t in tenants {
                if let Some(other) = seen.insert(t.to_ascii_lowercase(), &env.name) {
                    return Err(invalid(
                        "dynamics.environments",
                        format!("tenant {t} is served by both {other} and {}; routing by tenant needs one", env.name),
                    ));
                }
            }
        }
    }
    let retry_throttled = match d.retry_throttled {
        Some(r) if r.enabled => Some(parse_duration(
            "dynamics.retry_throttled.max_wait",
            &r.max_wait,
        )?),
        _ => None,
    };
    let token_replace_interval =
        parse_duration("dynamics.token_replace_interval", &d.token_replace_interval)?;
    let token_retry_max_wait =
        parse_duration("dynamics.token_retry_max_wait", &d.token_retry_max_wait)?;
    if token_retry_max_wait < Duration::from_secs(1) {
        // Shorter caps the backoff near zero: a failing endpoint would be asked in a loop.
        return Err(invalid(
            "dynamics.token_retry_max_wait",
            "must be at least 1s",
        ));
    }
    let budget_store = d.budget.store.map(budget_store).transpose()?;
    if let Some(store) = &budget_store {
        // Away from the store each replica keeps at least one slot: more replicas than the
        // limit would together send more than it.
        if let Some(env) = environments
            .iter()
            .find(|e| e.budget.max_concurrency < store.replicas)
        {
            return Err(invalid(
                "dynamics.budget.store.valkey.replicas",
                format!(
                    "{} replicas is more than max_concurrency ({}) of environment {}: each replica keeps at least 1 slot while the store is away",
                    store.replicas, env.budget.max_concurrency, env.name
                ),
            ));
        }
    }
    Ok(DynamicsConfig {
        environments,
        routing,
        retry_throttled,
        token_replace_interval,
        token_retry_max_wait,
        budget_store,
    })
}

/// Whether every `%` in `text` starts an escape and the escapes decode to UTF-8.
fn is_strictly_percent_encoded(text: &str) -> bool {
    let bytes = text.as_bytes();
    let escapes_well_formed = bytes.iter().enumerate().all(|(i, b)| {
        *b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
    });
    escapes_well_formed
        && percent_encoding::percent_decode_str(text)
            .decode_utf8()
            .is_ok()
}

fn budget_store(raw: RawBudgetStore) -> Result<BudgetStoreConfig, ConfigError> {
    const KEY: &str = "dynamics.budget.store.valkey";
    let v = raw.valkey;
    // Messages never quote the URL: it may hold the store's password.
    let url = Url::parse(v.url.expose())
        .map_err(|e| invalid(format!("{KEY}.url"), format!("is not a URL ({e})")))?;
    match url.scheme() {
        "redis" | "valkey" => {}
        "rediss" | "valkeys" => {
            return Err(invalid(
                format!("{KEY}.url"),
                "TLS to the store is not built in; use redis:// or valkey:// on a private network",
            ))
        }
        _ => {
            return Err(invalid(
                format!("{KEY}.url"),
                "must start with redis:// or valkey://",
            ))
        }
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(invalid(format!("{KEY}.url"), "names no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(invalid(
            format!("{KEY}.url"),
            "must not have a query or fragment: redis://[user:password@]host[:port][/db]",
        ));
    }
    // Read strictly: a lone `%` would be taken literally by the client, or a `%41` meant
    // literally decoded, and the store would refuse a password that looks right.
    for part in [url.username(), url.password().unwrap_or_default()] {
        if !is_strictly_percent_encoded(part) {
            return Err(invalid(
                format!("{KEY}.url"),
                "has a user name or password with a `%` that does not start an escape (%XX of UTF-8); percent-encode `%` as %25 and other reserved characters likewise",
            ));
        }
    }
    // The client's own reading, now rather than at the first command.
    redis::IntoConnectionInfo::into_connection_info(v.url.expose()).map_err(|_| {
        invalid(
            format!("{KEY}.url"),
            "is not a usable store URL (the database, if given, is a number: redis://host:6379/0)",
        )
    })?;
    if v.replicas == 0 {
        return Err(invalid(
            format!("{KEY}.replicas"),
            "must be at least 1 (each replica keeps limit / replicas when the store is away)",
        ));
    }
    let lease_ttl = parse_duration(&format!("{KEY}.lease_ttl"), &v.lease_ttl)?;
    if lease_ttl > Duration::from_secs(3600) {
        return Err(invalid(
            format!("{KEY}.lease_ttl"),
            "must be at most 1h: a dead replica's slots stay taken that long",
        ));
    }
    if lease_ttl < Duration::from_secs(1) {
        // Renewal runs every third of it: shorter would renew faster than a slow store answers.
        return Err(invalid(format!("{KEY}.lease_ttl"), "must be at least 1s"));
    }
    let command_timeout = parse_duration(&format!("{KEY}.command_timeout"), &v.command_timeout)?;
    if command_timeout.is_zero() || command_timeout >= lease_ttl / 3 {
        return Err(invalid(
            format!("{KEY}.command_timeout"),
            "must be above 0 and below a third of lease_ttl",
        ));
    }
    if v.key_prefix.is_empty() || v.key_prefix.chars().any(|c| c.is_whitespace()) {
        return Err(invalid(
            format!("{KEY}.key_prefix"),
            "must be non-empty, without spaces",
        ));
    }
    Ok(BudgetStoreConfig {
        url: v.url,
        replicas: v.replicas,
        lease_ttl,
        command_timeout,
        key_prefix: v.key_prefix,
    })
}

/// A `typ` as compared: lowercase, without the optional `application/` (RFC 7515 4.1.9).
pub fn token_type(text: &str) -> String {
    let t = text.trim().to_ascii_lowercase();
    t.strip_prefix("application/")
        .map(str::to_string)
        .unwrap_or(t)
}

fn app_only_evidence(
    key: &str,
    issuer: &str,
    raw: Option<RawAppOnlyEvidence>,
) -> Result<AppOnlyEvidence, ConfigError> {
    Ok(match raw {
        None if is_entra_issuer(issuer) => AppOnlyEvidence::Entra,
        None => AppOnlyEvidence::Never,
        Some(RawAppOnlyEvidence::Named(name)) => match name.trim() {
            "entra" => AppOnlyEvidence::Entra,
            "never" => AppOnlyEvidence::Never,
            other => {
                return Err(invalid(
                    key,
                    format!("\"{other}\" is not app-only evidence; use entra, never or {{ claim: <name>, value: <value> }}"),
                ))
            }
        },
        Some(RawAppOnlyEvidence::Claim(c)) => {
            if c.claim.trim().is_empty() || c.value.trim().is_empty() {
                return Err(invalid(key, "claim and value must both be written"));
            }
            AppOnlyEvidence::Claim {
                name: c.claim,
                value: c.value,
            }
        }
    })
}

/// A validated `static` entry; without a named issuer it trusts the only issuer there is.
fn static_user(
    issuers: &[IssuerConfig],
    claim_value: String,
    raw: RawStaticUser,
) -> Result<StaticUser, ConfigError> {
    let key = format!("identity.static.{claim_value}");
    let (systemuserid, issuer) = match raw {
        RawStaticUser::SystemUserId(id) => match issuers {
            [only] => (id, only.issuer.clone()),
            _ => {
                return Err(invalid(
                    key,
                    "several issuers are configured, so each static entry must name the one it trusts: { systemuserid: <guid>, issuer: <issuer as in inbound.issuers> }",
                ))
            }
        },
        RawStaticUser::Trusted(t) => {
            if !issuers.iter().any(|i| i.issuer == t.issuer) {
                return Err(invalid(
                    format!("{key}.issuer"),
                    format!("\"{}\" is not one of inbound.issuers", t.issuer),
                ));
            }
            (t.systemuserid, t.issuer)
        }
    };
    let systemuserid = uuid::Uuid::try_parse(systemuserid.trim()).map_err(|_| {
        invalid(
            &key,
            format!("\"{systemuserid}\" is not a systemuserid (a GUID)"),
        )
    })?;
    Ok(StaticUser {
        issuer,
        claim_value,
        systemuserid,
    })
}

/// With several environments or caller tenants, an issuer without a `tenants` list could
/// assert any `tid` and so reach any of them: each must say which tenants it speaks for.
fn issuers_bound_to_tenants(
    inbound: &InboundConfig,
    dynamics: &DynamicsConfig,
) -> Result<(), ConfigError> {
    let mut tenants: Vec<String> = Vec::new();
    let mut any_tenant = false;
    for env in &dynamics.environments {
        tenants.push(env.tenant_id.trim().to_ascii_lowercase());
        match &env.tenants {
            Some(list) => tenants.extend(list.iter().map(|t| t.trim().to_ascii_lowercase())),
            None => any_tenant = true,
        }
    }
    tenants.sort();
    tenants.dedup();
    // One issuer for one environment that serves any tenant has no other issuer to be
    // confused with (and may be one that sends no `tid`, such as Keycloak).
    let several = dynamics.environments.len() > 1
        || tenants.len() > 1
        || (any_tenant && inbound.issuers.len() > 1);
    if !several {
        return Ok(());
    }
    match inbound.issuers.iter().position(|i| i.tenants.is_none()) {
        Some(n) => Err(invalid(
            format!("inbound.issuers[{n}].tenants"),
            format!(
                "issuer \"{}\" must list the tenant ids (tid) it may assert: the gateway serves several environments or tenants, and an issuer without the list could name any of them",
                inbound.issuers[n].issuer
            ),
        )),
        None => Ok(()),
    }
}

fn reject_extra(present: bool, key: &str, mode: &str) -> Result<(), ConfigError> {
    if present {
        Err(invalid(
            key,
            format!("is not used in identity.mode {mode}; remove it or change the mode"),
        ))
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
inbound:
  issuers:
    - issuer: https://login.microsoftonline.com/t/v2.0
      audiences: [api://dynamics-gateway]
dynamics:
  url: https://contoso.crm.dynamics.com
  tenant_id: t
  client_id: c
  client_secret: ${SECRET}
"#;

    fn env(name: &str) -> Option<String> {
        (name == "SECRET").then(|| "s3cr3t-value".to_string())
    }

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(text, &env)
    }

    #[test]
    fn minimal_config_gets_documented_defaults() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(c.server.request_timeout, Duration::from_secs(120));
        assert_eq!(c.server.max_request_body, 128 << 20);
        assert_eq!(c.inbound.leeway, Duration::from_secs(60));
        assert_eq!(c.identity.mode, IdentityMode::CallerObjectId);
        assert_eq!(c.identity.claim, "oid");
        let env = &c.dynamics.environments[0];
        assert_eq!(c.dynamics.routing, Routing::Single);
        assert_eq!(env.name, "default");
        assert_eq!(env.scope, "https://contoso.crm.dynamics.com/.default");
        assert_eq!(
            env.token_url.as_str(),
            "https://login.microsoftonline.com/t/oauth2/v2.0/token"
        );
        assert!(
            matches!(&env.credential, Credential::ClientSecret(s) if s.expose() == "s3cr3t-value")
        );
        assert_eq!(env.tenants, Some(vec!["t".to_string()]));
        assert_eq!(
            c.inbound.issuers[0].discovery_url.as_str(),
            "https://login.microsoftonline.com/t/v2.0/.well-known/openid-configuration"
        );
    }

    #[test]
    fn unknown_key_is_named() {
        let text = MINIMAL
            .replace("  leeway", "x")
            .replace("dynamics:\n", "dynamics:\n  clientsecret: x\n");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("clientsecret"), "{err}");
        assert!(err.starts_with("dynamics"), "{err}");
    }

    #[test]
    fn unset_variable_is_named_with_its_key() {
        let text = MINIMAL.replace("${SECRET}", "${NOT_SET_ANYWHERE}");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("dynamics.client_secret"), "{err}");
        assert!(err.contains("NOT_SET_ANYWHERE"), "{err}");
    }

    #[test]
    fn duration_without_unit_is_refused() {
        let text = MINIMAL.replace("inbound:\n", "inbound:\n  leeway: \"30\"\n");
        let err = load(&text).unwrap_err().to_string();
        assert!(
            err.contains("inbound.leeway") && err.contains("no unit"),
            "{err}"
        );
    }

    #[test]
    fn sizes_need_units() {
        assert_eq!(parse_size("k", "128MiB").unwrap(), 128 << 20);
        assert_eq!(parse_size("k", "1KB").unwrap(), 1000);
        assert!(parse_size("k", "128")
            .unwrap_err()
            .to_string()
            .contains("no unit"));
        assert!(parse_size("k", "12 parsecs").is_err());
    }

    #[test]
    fn max_batch_part_defaults_to_4_mib_and_must_hold_a_request_line() {
        assert_eq!(load(MINIMAL).unwrap().server.max_batch_part, 4 << 20);
        let text = format!("server:\n  max_batch_part: 16KiB\n{MINIMAL}");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("server.max_batch_part"), "{err}");
    }

    #[test]
    fn plain_http_is_refused_unless_loopback() {
        let text = MINIMAL.replace("https://contoso", "http://contoso");
        let err = load(&text).unwrap_err().to_string();
        assert!(
            err.contains("dynamics.url") && err.contains("http://"),
            "{err}"
        );
        let text = MINIMAL.replace("https://contoso.crm.dynamics.com", "http://127.0.0.1:9");
        assert!(load(&text).is_ok());
    }

    #[test]
    fn hmac_and_none_algorithms_are_refused() {
        for alg in ["HS256", "none"] {
            let text = MINIMAL.replace(
                "audiences: [api://dynamics-gateway]",
                &format!("audiences: [a]\n      algorithms: [{alg}]"),
            );
            let err = load(&text).unwrap_err().to_string();
            assert!(err.contains("algorithms") && err.contains(alg), "{err}");
        }
    }

    #[test]
    fn errors_never_contain_the_secret() {
        let text = MINIMAL.replace("tenant_id: t", "tenant_id: \"\"");
        let err = load(&text).unwrap_err().to_string();
        assert!(!err.contains("s3cr3t"), "{err}");
        let dbg = format!("{:?}", load(MINIMAL).unwrap());
        assert!(!dbg.contains("s3cr3t"), "{dbg}");
    }

    #[test]
    fn environments_need_a_routing_rule_and_unique_names() {
        let envs = |routing: &str| {
            [
                "inbound:",
                "  issuers:",
                "    - issuer: https://i.example/",
                "      audiences: [a]",
                "      tenants: [t1, t2]",
                "dynamics:",
                routing,
                "  environments:",
                "    - { name: contoso, url: https://contoso.crm.dynamics.com, tenant_id: t1, client_id: c, client_secret: s }",
                "    - { name: fabrikam, url: https://fabrikam.crm4.dynamics.com, tenant_id: t2, client_id: c, client_secret: s }",
            ]
            .join("\n")
        };
        let err = load(&envs("")).unwrap_err().to_string();
        assert!(err.starts_with("dynamics.routing"), "{err}");
        let c = load(&envs("  routing: { by: tenant }")).unwrap();
        assert_eq!(c.dynamics.routing, Routing::Tenant);
        assert_eq!(
            c.dynamics.environments[1].tenants,
            Some(vec!["t2".to_string()])
        );
        let dup = envs("  routing: { by: path_prefix }").replace("name: fabrikam", "name: contoso");
        assert!(load(&dup).unwrap_err().to_string().contains("listed twice"));
        // "none" is the metrics' environment of requests refused before routing.
        for reserved in ["api", crate::metrics::NO_ENVIRONMENT] {
            let named = envs("  routing: { by: path_prefix }")
                .replace("name: fabrikam", &format!("name: {reserved}"));
            let err = load(&named).unwrap_err().to_string();
            assert!(err.contains("is not a valid name"), "{reserved}: {err}");
        }
        let both = envs("  url: https://x.crm.dynamics.com\n  routing: { by: tenant }");
        assert!(load(&both).unwrap_err().to_string().contains("not both"));
    }

    #[test]
    fn exactly_one_credential_per_environment() {
        let two = MINIMAL.replace(
            "  client_secret: ${SECRET}",
            "  client_secret: ${SECRET}\n  managed_identity: {}",
        );
        let err = load(&two).unwrap_err().to_string();
        assert!(err.contains("exactly one credential"), "{err}");
        let none = MINIMAL.replace("  client_secret: ${SECRET}\n", "");
        assert!(load(&none)
            .unwrap_err()
            .to_string()
            .contains("exactly one credential"));
        let mi = MINIMAL.replace(
            "  client_secret: ${SECRET}",
            "  managed_identity: { endpoint: http://127.0.0.1:9/token }",
        );
        let c = load(&mi).unwrap();
        assert_eq!(
            c.dynamics.environments[0].credential.kind(),
            "managed_identity"
        );
    }

    #[test]
    fn admin_consent_url_uses_the_token_authority_and_tenant() {
        let c = load(MINIMAL).unwrap();
        let url =
            c.dynamics.environments[0].admin_consent_url(Some("https://app.example/onboarded"));
        assert_eq!(
            url,
            "https://login.microsoftonline.com/t/adminconsent?client_id=c&redirect_uri=https%3A%2F%2Fapp.example%2Fonboarded"
        );
    }

    #[test]
    fn with_several_environments_every_issuer_names_its_tenants() {
        let two_envs = |tenants: &str| {
            format!(
                "inbound:\n  issuers:\n    - issuer: https://login.microsoftonline.com/{{tenantid}}/v2.0\n      audiences: [a]\n      tenants: [t1, t2]\n    - issuer: https://keycloak.example/realms/r\n      audiences: [a]\n{tenants}\
dynamics:\n  routing: {{ by: tenant }}\n  environments:\n    \
- {{ name: contoso, url: https://contoso.crm.dynamics.com, tenant_id: t1, client_id: c, client_secret: s }}\n    \
- {{ name: fabrikam, url: https://fabrikam.crm4.dynamics.com, tenant_id: t2, client_id: c, client_secret: s }}\n"
            )
        };
        let err = load(&two_envs("")).unwrap_err().to_string();
        assert!(
            err.starts_with("inbound.issuers[1].tenants")
                && err.contains("https://keycloak.example/realms/r"),
            "{err}"
        );
        assert!(load(&two_envs("      tenants: [t2]\n")).is_ok());
        // One environment serving a second tenant is several tenants too.
        let text = MINIMAL.replace("tenant_id: t\n", "tenant_id: t\n  tenants: [t, u]\n");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.starts_with("inbound.issuers[0].tenants"), "{err}");
        // The old single-issuer single-tenant form still loads without a list, and so does
        // one issuer serving any tenant (nothing to confuse it with).
        assert!(load(MINIMAL).is_ok());
        let any = MINIMAL.replace("tenant_id: t\n", "tenant_id: t\n  tenants: [\"*\"]\n");
        assert!(load(&any).is_ok());
        let two = any.replace(
            "      audiences: [api://dynamics-gateway]\n",
            "      audiences: [api://dynamics-gateway]\n    - issuer: https://other.example/\n      audiences: [a]\n",
        );
        let err = load(&two).unwrap_err().to_string();
        assert!(err.starts_with("inbound.issuers[0].tenants"), "{err}");
    }

    #[test]
    fn app_only_evidence_defaults_to_entra_only_for_entra_hosts() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(
            c.inbound.issuers[0].app_only_evidence,
            AppOnlyEvidence::Entra
        );
        let other = MINIMAL.replace(
            "https://login.microsoftonline.com/t/v2.0",
            "https://login.microsoftonline.com.evil.example/t/v2.0",
        );
        let c = load(&other).unwrap();
        assert_eq!(
            c.inbound.issuers[0].app_only_evidence,
            AppOnlyEvidence::Never
        );
        assert!(is_entra_issuer(
            "https://login.microsoftonline.com/{tenantid}/v2.0"
        ));
        assert!(is_entra_issuer("https://contoso.ciamlogin.com/t/v2.0"));
        assert!(!is_entra_issuer(
            "https://evil.example/login.microsoftonline.com/"
        ));
        let claim = MINIMAL.replace(
            "audiences: [api://dynamics-gateway]",
            "audiences: [a]\n      app_only_evidence: { claim: token_use, value: service }\n      token_types: [application/AT+JWT]",
        );
        let c = load(&claim).unwrap();
        assert_eq!(
            c.inbound.issuers[0].app_only_evidence,
            AppOnlyEvidence::Claim {
                name: "token_use".into(),
                value: "service".into()
            }
        );
        assert_eq!(
            c.inbound.issuers[0].token_types,
            Some(vec!["at+jwt".to_string()])
        );
        let bad = MINIMAL.replace(
            "audiences: [api://dynamics-gateway]",
            "audiences: [a]\n      app_only_evidence: always",
        );
        let err = load(&bad).unwrap_err().to_string();
        assert!(
            err.contains("inbound.issuers[0].app_only_evidence"),
            "{err}"
        );
    }

    #[test]
    fn lookup_by_email_is_refused() {
        let text = format!("{MINIMAL}identity:\n  mode: lookup\n  claim: email\n  lookup: {{ attribute: internalemailaddress }}\n");
        let err = load(&text).unwrap_err().to_string();
        assert!(
            err.starts_with("identity.claim") && err.contains("mutable"),
            "{err}"
        );
    }

    #[test]
    fn static_entries_name_their_issuer_when_there_are_several() {
        let id = "3f2504e0-4f89-11d3-9a0c-0305e82c3301";
        let c = load(&format!(
            "{MINIMAL}identity:\n  mode: static\n  static:\n    alice: {id}\n"
        ))
        .unwrap();
        let IdentityMode::Static(users) = &c.identity.mode else {
            panic!("static mode")
        };
        assert_eq!(users[0].issuer, "https://login.microsoftonline.com/t/v2.0");
        let two = MINIMAL.replace(
            "      audiences: [api://dynamics-gateway]\n",
            "      audiences: [api://dynamics-gateway]\n    - issuer: https://other.example/\n      audiences: [a]\n",
        );
        let err = load(&format!(
            "{two}identity:\n  mode: static\n  static:\n    alice: {id}\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("identity.static.alice") && err.contains("name the one it trusts"),
            "{err}"
        );
        let named = format!("{two}identity:\n  mode: static\n  static:\n    alice: {{ systemuserid: {id}, issuer: https://other.example/ }}\n");
        let c = load(&named).unwrap();
        let IdentityMode::Static(users) = &c.identity.mode else {
            panic!("static mode")
        };
        assert_eq!(users[0].issuer, "https://other.example/");
        let unknown = named.replace(
            "issuer: https://other.example/ }",
            "issuer: https://nowhere.example/ }",
        );
        let err = load(&unknown).unwrap_err().to_string();
        assert!(err.starts_with("identity.static.alice.issuer"), "{err}");
    }

    #[test]
    fn guests_cannot_be_allowed_in_caller_object_id_mode() {
        let text = MINIMAL.replace(
            "tenant_id: t\n",
            "tenant_id: t\n  allow_guest_tenants: true\n",
        );
        let err = load(&text).unwrap_err().to_string();
        assert!(err.starts_with("dynamics.allow_guest_tenants"), "{err}");
        let lookup = format!("{text}identity:\n  mode: lookup\n");
        assert!(load(&lookup).unwrap().dynamics.environments[0].allow_guest_tenants);
        assert_eq!(
            load(&lookup).unwrap().identity.unknown_user_cache_ttl,
            Duration::from_secs(60)
        );
    }

    #[test]
    fn static_mode_requires_guid_values() {
        let text =
            format!("{MINIMAL}identity:\n  mode: static\n  static:\n    alice: not-a-guid\n");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("identity.static.alice"), "{err}");
    }

    #[test]
    fn token_pacing_keys_have_defaults_and_bounds() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.dynamics.token_replace_interval, Duration::from_secs(5));
        assert_eq!(c.dynamics.token_retry_max_wait, Duration::from_secs(300));
        let text = MINIMAL.replace(
            "  client_secret: ${SECRET}\n",
            "  client_secret: ${SECRET}\n  token_replace_interval: 250ms\n  token_retry_max_wait: 2s\n",
        );
        let c = load(&text).unwrap();
        assert_eq!(
            c.dynamics.token_replace_interval,
            Duration::from_millis(250)
        );
        assert_eq!(c.dynamics.token_retry_max_wait, Duration::from_secs(2));
        let err = load(&text.replace("max_wait: 2s", "max_wait: 0s"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("dynamics.token_retry_max_wait"), "{err}");
        let err = load(&text.replace("interval: 250ms", "interval: \"5\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("dynamics.token_replace_interval"), "{err}");
    }

    #[test]
    fn connection_and_body_limits_have_documented_defaults() {
        let c = load(MINIMAL).unwrap();
        assert_eq!(c.server.idle_timeout, Duration::from_secs(60));
        assert_eq!(c.server.http2_keep_alive_interval, Duration::from_secs(30));
        assert_eq!(c.server.http2_keep_alive_timeout, Duration::from_secs(10));
        assert_eq!(c.server.body_read_timeout, Duration::from_secs(30));
        assert_eq!(c.server.exchange_timeout, Duration::from_secs(600));
        assert_eq!(c.server.max_connections_per_peer, NonZeroUsize::new(1000));
    }

    #[test]
    fn per_peer_cap_defaults_to_a_tenth_zero_is_off_and_above_the_total_is_refused() {
        let with = |extra: &str| format!("server:\n{extra}{MINIMAL}");
        let c = load(&with("  max_connections: 5\n")).unwrap();
        assert_eq!(c.server.max_connections_per_peer, NonZeroUsize::new(1));
        let c = load(&with("  max_connections_per_peer: 0\n")).unwrap();
        assert_eq!(c.server.max_connections_per_peer, None);
        let c = load(&with("  max_connections_per_peer: 7\n")).unwrap();
        assert_eq!(c.server.max_connections_per_peer, NonZeroUsize::new(7));
        let err = load(&with(
            "  max_connections: 10\n  max_connections_per_peer: 11\n",
        ))
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("server.max_connections_per_peer:"), "{err}");
    }

    #[test]
    fn connection_and_body_timeouts_must_be_positive_and_the_exchange_covers_the_answer() {
        for key in [
            "idle_timeout",
            "http2_keep_alive_interval",
            "http2_keep_alive_timeout",
            "body_read_timeout",
            "exchange_timeout",
            "min_body_rate_window",
        ] {
            for value in ["0s", "100years"] {
                let text = format!("server:\n  {key}: {value}\n{MINIMAL}");
                let err = load(&text).unwrap_err().to_string();
                assert!(err.starts_with(&format!("server.{key}:")), "{err}");
            }
        }
        let text = format!("server:\n  request_timeout: 2m\n  exchange_timeout: 1m\n{MINIMAL}");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.starts_with("server.exchange_timeout:"), "{err}");
        let text = format!("server:\n  body_read_timeout: \"30\"\n{MINIMAL}");
        let err = load(&text).unwrap_err().to_string();
        assert!(err.contains("server.body_read_timeout"), "{err}");
        // With the rate off, its window is not read.
        let text = format!("server:\n  min_body_rate: 0\n  min_body_rate_window: 0s\n{MINIMAL}");
        assert_eq!(load(&text).unwrap().server.min_body_rate, None);
        assert_eq!(
            load(MINIMAL).unwrap().server.min_body_rate,
            Some(MinBodyRate {
                bytes_per_second: 240,
                window: Duration::from_secs(5)
            })
        );
    }
}
